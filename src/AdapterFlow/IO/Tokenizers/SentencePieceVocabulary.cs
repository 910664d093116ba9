using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;

namespace AdapterFlow.IO;

/// <summary>
/// Turns the SentencePiece-style vocabulary a GGUF file (<c>tokenizer.ggml.model = "llama"</c>) or a llama2.c
/// tokenizer.bin carries — pieces with scores — into the tokenizer.json a Hugging Face conversion would give:
/// BPE with byte fallback, merges ordered by the score of the merged piece (SentencePiece BPE merges the
/// highest-scoring adjacent pair first; a merge list ranked by that score makes the Hugging Face BPE pick the same
/// pair), the "▁" space normalizer, the byte-fallback decoder and a BOS template. So a model file alone is
/// enough to generate text. Written here because Microsoft.ML.Tokenizers has no constructor from a scored
/// piece list, and our tokenizer.json engine already matches the Hugging Face library exactly.
/// </summary>
public static partial class SentencePieceVocabulary
{
    private const string Space = "▁";

    // GGUF token types (llama.cpp's llama_token_type).
    private const int Normal = 1, Unknown = 2, Control = 3, UserDefined = 4, Unused = 5, Byte = 6;

    /// <summary>True when <see cref="ToTokenizer"/> can build a tokenizer from this vocabulary.</summary>
    public static bool IsSupported(EmbeddedVocabulary vocabulary) => vocabulary.Model is "llama" or "llama2.c";

    /// <summary>Builds the tokenizer; <paramref name="source"/> names the file in error messages.</summary>
    public static HFTokenizer ToTokenizer(EmbeddedVocabulary vocabulary, string source)
    {
        ArgumentNullException.ThrowIfNull(vocabulary);
        if (!IsSupported(vocabulary))
            throw new NotSupportedException(
                $"{source}: the embedded '{vocabulary.Model}' tokenizer cannot be used yet (only SentencePiece 'llama' vocabularies); put the model's tokenizer.json beside the file");
        var (pieces, types) = Pieces(vocabulary);
        var scores = vocabulary.Scores ?? throw new InvalidDataException($"{source}: the embedded vocabulary has no scores (tokenizer.ggml.scores), which SentencePiece merges need");

        var vocab = new JsonObject();
        var ids = new Dictionary<string, int>(StringComparer.Ordinal);
        for (int i = 0; i < pieces.Length; i++)
        {
            // Duplicate pieces would make the vocabulary ambiguous; the first id wins, as SentencePiece does.
            if (!ids.TryAdd(pieces[i], i)) continue;
            vocab[pieces[i]] = i;
        }

        int unk = vocabulary.UnknownTokenId ?? Array.FindIndex(types, t => t == Unknown);
        if (unk < 0) unk = 0;
        int? bos = vocabulary.BosTokenId, eos = vocabulary.EosTokenId;

        var added = new JsonArray();
        for (int i = 0; i < pieces.Length; i++)
            if (types[i] is Control or Unknown or UserDefined)
                added.Add(new JsonObject
                {
                    ["id"] = i, ["content"] = pieces[i], ["single_word"] = false, ["lstrip"] = false, ["rstrip"] = false,
                    ["normalized"] = types[i] == UserDefined, ["special"] = types[i] != UserDefined,
                });

        var json = new JsonObject
        {
            ["version"] = "1.0",
            ["truncation"] = null,
            ["padding"] = null,
            ["added_tokens"] = added,
            ["normalizer"] = new JsonObject
            {
                ["type"] = "Sequence",
                ["normalizers"] = new JsonArray(
                    new JsonObject { ["type"] = "Prepend", ["prepend"] = Space },
                    new JsonObject { ["type"] = "Replace", ["pattern"] = new JsonObject { ["String"] = " " }, ["content"] = Space }),
            },
            ["pre_tokenizer"] = null,
            ["post_processor"] = bos is int b ? ByteLevelBpeTrainer.BosTemplate(pieces[b], b) : null,
            ["decoder"] = new JsonObject
            {
                ["type"] = "Sequence",
                ["decoders"] = new JsonArray(
                    new JsonObject { ["type"] = "Replace", ["pattern"] = new JsonObject { ["String"] = Space }, ["content"] = " " },
                    new JsonObject { ["type"] = "ByteFallback" },
                    new JsonObject { ["type"] = "Fuse" },
                    new JsonObject { ["type"] = "Strip", ["content"] = " ", ["start"] = 1, ["stop"] = 0 }),
            },
            ["model"] = new JsonObject
            {
                ["type"] = "BPE",
                ["dropout"] = null,
                ["unk_token"] = pieces[unk],
                ["continuing_subword_prefix"] = null,
                ["end_of_word_suffix"] = null,
                ["fuse_unk"] = true,
                ["byte_fallback"] = true,
                ["ignore_merges"] = false,
                ["vocab"] = vocab,
                ["merges"] = new JsonArray(Merges(pieces, types, scores, ids).Select(m => (JsonNode)JsonValue.Create($"{m.Left} {m.Right}")!).ToArray()),
            },
        };
        var config = new JsonObject
        {
            ["add_bos_token"] = bos is not null,
            ["add_eos_token"] = false,
            ["unk_token"] = pieces[unk],
            ["clean_up_tokenization_spaces"] = false,
            ["tokenizer_class"] = "LlamaTokenizer",
        };
        if (bos is int bosId) config["bos_token"] = pieces[bosId];
        if (eos is int eosId) config["eos_token"] = pieces[eosId];
        if (vocabulary.PaddingTokenId is int pad) config["pad_token"] = pieces[pad];
        return HFTokenizer.FromNodes(json, config, source);
    }

    /// <summary>
    /// SentencePiece merges: every way of splitting a normal piece into two pieces of the vocabulary, ranked by
    /// the merged piece's score (highest first), then by the ids of the left and right parts.
    /// </summary>
    public static IReadOnlyList<(string Left, string Right)> Merges(string[] pieces, int[] types, float[] scores, IReadOnlyDictionary<string, int> ids)
    {
        var merges = new List<(string Left, string Right, float Score, int Merged, int LeftId, int RightId)>();
        for (int i = 0; i < pieces.Length; i++)
        {
            if (types[i] is not (Normal or UserDefined) || ids[pieces[i]] != i) continue;
            var piece = pieces[i];
            // Split only between whole characters (a surrogate pair is one character).
            var starts = StringInfo.ParseCombiningCharacters(piece);
            for (int s = 1; s < starts.Length; s++)
            {
                var left = piece[..starts[s]];
                var right = piece[starts[s]..];
                if (ids.TryGetValue(left, out var l) && ids.TryGetValue(right, out var r))
                    merges.Add((left, right, scores[i], i, l, r));
            }
        }
        return merges
            .OrderByDescending(m => m.Score)
            .ThenBy(m => m.Merged)
            .ThenBy(m => m.LeftId)
            .ThenBy(m => m.RightId)
            .Select(m => (m.Left, m.Right))
            .ToArray();
    }

    /// <summary>The pieces in SentencePiece spelling and each one's token type.</summary>
    private static (string[] Pieces, int[] Types) Pieces(EmbeddedVocabulary vocabulary)
    {
        var pieces = (string[])vocabulary.Tokens.Clone();
        var types = vocabulary.TokenTypes is { } given ? (int[])given.Clone() : new int[pieces.Length];
        if (vocabulary.Model == "llama2.c")
        {
            // llama2.c's exporter wrote pieces with "▁" turned into a space and BOS/EOS as "\n<s>\n" / "\n</s>\n";
            // undo both so the pieces are SentencePiece's again. It keeps no token types: ids 0–2 are unk, BOS, EOS.
            for (int i = 0; i < pieces.Length; i++)
            {
                var trimmed = pieces[i].Trim('\n');
                if (i <= 2) { pieces[i] = trimmed; types[i] = i == 0 ? Unknown : Control; }
                else if (ByteToken().IsMatch(pieces[i])) types[i] = Byte;
                else { pieces[i] = pieces[i].Replace(" ", Space, StringComparison.Ordinal); types[i] = Normal; }
            }
        }
        else if (vocabulary.TokenTypes is null)
        {
            for (int i = 0; i < pieces.Length; i++)
                types[i] = i == vocabulary.UnknownTokenId ? Unknown
                    : i == vocabulary.BosTokenId || i == vocabulary.EosTokenId ? Control
                    : ByteToken().IsMatch(pieces[i]) ? Byte : Normal;
        }
        return (pieces, types);
    }

    [GeneratedRegex("^<0x[0-9A-Fa-f]{2}>$")]
    private static partial Regex ByteToken();
}

using System.Text.Json.Nodes;
using AdapterFlow.IO.Tokenizers;

namespace AdapterFlow.IO;

/// <summary>
/// Trains a small byte-level BPE tokenizer (GPT-2 style: ByteLevel pre-tokenizer, BPE model, ByteLevel decoder)
/// in the Hugging Face tokenizer.json format, for freshly initialised models. All 256 bytes are in the
/// vocabulary, so any text encodes and decodes back unchanged.
/// </summary>
/// <remarks>Written here rather than taken from Microsoft.ML.Tokenizers because that package has no BPE trainer.</remarks>
public static class ByteLevelBpeTrainer
{
    /// <summary>BOS, EOS and padding tokens given to a trained tokenizer unless told otherwise.</summary>
    public static readonly IReadOnlyList<string> DefaultSpecialTokens = ["<s>", "</s>", "<pad>"];

    /// <summary>
    /// Learns merges from <paramref name="corpus"/> until the vocabulary (special tokens + 256 bytes + merges)
    /// has <paramref name="vocabSize"/> entries or no pair occurs <paramref name="minFrequency"/> times.
    /// Special tokens get the first ids; the first three play BOS, EOS and padding.
    /// </summary>
    public static HFTokenizer Train(IEnumerable<string> corpus, int vocabSize, IReadOnlyList<string>? specialTokens = null, int minFrequency = 2)
    {
        ArgumentNullException.ThrowIfNull(corpus);
        specialTokens ??= DefaultSpecialTokens;
        if (specialTokens.Distinct(StringComparer.Ordinal).Count() != specialTokens.Count || specialTokens.Any(string.IsNullOrEmpty))
            throw new ArgumentException("special tokens must be distinct, non-empty strings", nameof(specialTokens));
        if (specialTokens.Any(t => t.Length == 1 && ByteLevelAlphabet.CharToByte(t[0]) >= 0))
            throw new ArgumentException("a special token cannot be a single byte-level character (it is already a byte token)", nameof(specialTokens));
        var minimum = specialTokens.Count + 256;
        if (vocabSize < minimum)
            throw new ArgumentOutOfRangeException(nameof(vocabSize), vocabSize, $"must be at least {minimum} (special tokens + 256 bytes)");
        if (minFrequency < 1) throw new ArgumentOutOfRangeException(nameof(minFrequency), minFrequency, "must be at least 1");

        // Vocabulary: special tokens, then the 256 byte characters in byte order.
        var tokens = new List<string>(vocabSize);
        tokens.AddRange(specialTokens);
        var byteBase = tokens.Count;
        for (var b = 0; b < 256; b++) tokens.Add(ByteLevelAlphabet.ByteToChar[b].ToString());

        var known = new HashSet<string>(tokens, StringComparer.Ordinal);

        // Word frequencies after GPT-2 pre-tokenization.
        var wordCounts = new Dictionary<string, long>(StringComparer.Ordinal);
        var spans = new List<(int Start, int Length)>();
        foreach (var text in corpus)
        {
            if (string.IsNullOrEmpty(text)) continue;
            spans.Clear();
            Gpt2Split.Split(text, spans);
            foreach (var (start, length) in spans)
            {
                var word = ByteLevelAlphabet.Encode(text.AsSpan(start, length));
                wordCounts[word] = wordCounts.GetValueOrDefault(word) + 1;
            }
        }
        var words = new List<int[]>(wordCounts.Count);
        var counts = new List<long>(wordCounts.Count);
        foreach (var (word, count) in wordCounts)
        {
            words.Add(word.Select(c => byteBase + ByteLevelAlphabet.CharToByte(c)).ToArray());
            counts.Add(count);
        }

        var pairCounts = new Dictionary<long, long>();
        var pairWords = new Dictionary<long, HashSet<int>>();
        for (var w = 0; w < words.Count; w++)
            for (var i = 0; i + 1 < words[w].Length; i++)
            {
                var key = Key(words[w][i], words[w][i + 1]);
                pairCounts[key] = pairCounts.GetValueOrDefault(key) + counts[w];
                if (!pairWords.TryGetValue(key, out var set)) pairWords[key] = set = [];
                set.Add(w);
            }
        // Most frequent pair first; ties broken by the smaller ids, so training is deterministic.
        var queue = new PriorityQueue<long, (long NegCount, long Key)>();
        foreach (var (key, count) in pairCounts) queue.Enqueue(key, (-count, key));

        var merges = new List<(string A, string B)>();
        var changed = new HashSet<long>();
        while (tokens.Count < vocabSize && queue.TryDequeue(out var best, out var priority))
        {
            var count = pairCounts.GetValueOrDefault(best);
            if (count != -priority.NegCount) continue;   // stale entry
            if (count < minFrequency) break;
            var (a, b) = ((int)(best >> 32), (int)(best & 0xFFFFFFFF));
            var mergedText = tokens[a] + tokens[b];
            if (!known.Add(mergedText))
            {
                // The merge would spell an existing token (e.g. "<s" + ">" = the special "<s>"): never merge this pair.
                pairCounts[best] = 0;
                continue;
            }
            var merged = tokens.Count;
            tokens.Add(mergedText);
            merges.Add((tokens[a], tokens[b]));
            changed.Clear();
            foreach (var w in pairWords[best].ToArray())
            {
                var old = words[w];
                var next = new List<int>(old.Length);
                for (var i = 0; i < old.Length; i++)
                {
                    if (i + 1 < old.Length && old[i] == a && old[i + 1] == b) { next.Add(merged); i++; }
                    else next.Add(old[i]);
                }
                if (next.Count == old.Length) continue;
                for (var i = 0; i + 1 < old.Length; i++)
                {
                    var key = Key(old[i], old[i + 1]);
                    pairCounts[key] -= counts[w];
                    changed.Add(key);
                }
                var updated = next.ToArray();
                for (var i = 0; i + 1 < updated.Length; i++)
                {
                    var key = Key(updated[i], updated[i + 1]);
                    pairCounts[key] = pairCounts.GetValueOrDefault(key) + counts[w];
                    if (!pairWords.TryGetValue(key, out var set)) pairWords[key] = set = [];
                    set.Add(w);
                    changed.Add(key);
                }
                words[w] = updated;
            }
            foreach (var key in changed)
                if (pairCounts[key] > 0) queue.Enqueue(key, (-pairCounts[key], key));
        }
        return HFTokenizer.FromNodes(BuildTokenizerJson(tokens, merges, specialTokens), BuildConfig(specialTokens), "trained tokenizer.json");
    }

    private static long Key(int a, int b) => ((long)a << 32) | (uint)b;

    private static JsonObject BuildTokenizerJson(List<string> tokens, List<(string A, string B)> merges, IReadOnlyList<string> specials)
    {
        var vocab = new JsonObject();
        for (var id = 0; id < tokens.Count; id++) vocab[tokens[id]] = id;
        var mergeArray = new JsonArray();
        foreach (var (a, b) in merges) mergeArray.Add(new JsonArray(a, b));
        var added = new JsonArray();
        for (var id = 0; id < specials.Count; id++)
            added.Add(new JsonObject
            {
                ["id"] = id, ["content"] = specials[id], ["single_word"] = false, ["lstrip"] = false, ["rstrip"] = false,
                ["normalized"] = false, ["special"] = true,
            });
        JsonNode postProcessor = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["trim_offsets"] = false, ["use_regex"] = true };
        if (specials.Count > 0)
        {
            // Encoding with special tokens prepends BOS, as Llama-style tokenizers do.
            var bos = specials[0];
            postProcessor = BosTemplate(bos, 0);
        }
        return new JsonObject
        {
            ["version"] = "1.0",
            ["truncation"] = null,
            ["padding"] = null,
            ["added_tokens"] = added,
            ["normalizer"] = null,
            ["pre_tokenizer"] = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["trim_offsets"] = true, ["use_regex"] = true },
            ["post_processor"] = postProcessor,
            ["decoder"] = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = true, ["trim_offsets"] = true, ["use_regex"] = true },
            ["model"] = new JsonObject
            {
                ["type"] = "BPE", ["dropout"] = null, ["unk_token"] = null, ["continuing_subword_prefix"] = null, ["end_of_word_suffix"] = null,
                ["fuse_unk"] = false, ["byte_fallback"] = false, ["ignore_merges"] = false, ["vocab"] = vocab, ["merges"] = mergeArray,
            },
        };
    }

    /// <summary>
    /// A TemplateProcessing post-processor that puts BOS before each sequence (transformers' Llama-style
    /// tokenizers): "BOS A" for one sequence, "BOS A BOS B" for a pair.
    /// </summary>
    internal static JsonObject BosTemplate(string bos, int bosId) => new()
    {
        ["type"] = "TemplateProcessing",
        ["single"] = new JsonArray(Special(bos, 0), Sequence("A", 0)),
        ["pair"] = new JsonArray(Special(bos, 0), Sequence("A", 0), Special(bos, 1), Sequence("B", 1)),
        ["special_tokens"] = new JsonObject { [bos] = new JsonObject { ["id"] = bos, ["ids"] = new JsonArray(bosId), ["tokens"] = new JsonArray(bos) } },
    };

    private static JsonObject Special(string id, int typeId) => new() { ["SpecialToken"] = new JsonObject { ["id"] = id, ["type_id"] = typeId } };
    private static JsonObject Sequence(string id, int typeId) => new() { ["Sequence"] = new JsonObject { ["id"] = id, ["type_id"] = typeId } };

    private static JsonObject BuildConfig(IReadOnlyList<string> specials)
    {
        var config = new JsonObject
        {
            ["tokenizer_class"] = "PreTrainedTokenizerFast",
            ["clean_up_tokenization_spaces"] = false,
            ["model_max_length"] = 1_000_000,
        };
        if (specials.Count > 0) config["bos_token"] = specials[0];
        if (specials.Count > 1) config["eos_token"] = specials[1];
        if (specials.Count > 2) config["pad_token"] = specials[2];
        var decoderTable = new JsonObject();
        for (var id = 0; id < specials.Count; id++)
            decoderTable[id.ToString(System.Globalization.CultureInfo.InvariantCulture)] = new JsonObject
            {
                ["content"] = specials[id], ["lstrip"] = false, ["normalized"] = false, ["rstrip"] = false, ["single_word"] = false, ["special"] = true,
            };
        config["added_tokens_decoder"] = decoderTable;
        return config;
    }
}

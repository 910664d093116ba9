using System.Text;
using System.Text.Json.Nodes;

namespace AdapterFlow.IO.Tokenizers;

/// <summary>A tokenizer.json "decoder": turns token strings back into text (HF's decode_chain, then concatenation).</summary>
internal abstract class TokenDecoder
{
    public abstract List<string> DecodeChain(List<string> tokens);

    public string Decode(List<string> tokens) => string.Concat(DecodeChain(tokens));

    public static TokenDecoder? FromJson(JsonNode? node, JsonFields f, string field)
    {
        if (node is null) return null;
        var obj = f.Object(node, field);
        var type = f.Type(obj, field);
        switch (type)
        {
            case "ByteLevel": return new ByteLevel();
            case "ByteFallback": return new ByteFallbackDecoder();
            case "Fuse": return new Fuse();
            case "Replace":
                return new Replace(TextPattern.FromJson(obj["pattern"], f, field + ".pattern"), f.String(obj["content"], field + ".content"));
            case "Strip":
                var content = f.String(obj["content"], field + ".content");
                if (content.Length != 1) throw f.Error(field + ".content", "must be a single character");
                return new Strip(content[0], f.OptionalInt(obj["start"], field + ".start", 0), f.OptionalInt(obj["stop"], field + ".stop", 0));
            case "Metaspace":
                var scheme = PreTokenizer.Metaspace.ReadScheme(obj, f, field);
                return new Metaspace(PreTokenizer.ReadReplacement(obj, f, field)[0], scheme != PreTokenizer.Metaspace.Scheme.Never);
            case "WordPiece":
                return new WordPiece(obj["prefix"] is null ? "##" : f.String(obj["prefix"], field + ".prefix"), f.Bool(obj["cleanup"], field + ".cleanup", true));
            case "BPEDecoder":
                return new BpeSuffix(obj["suffix"] is null ? "</w>" : f.String(obj["suffix"], field + ".suffix"));
            case "Sequence":
                var items = f.Array(obj["decoders"], field + ".decoders");
                return new Sequence(items.Select((n, i) => FromJson(n, f, $"{field}.decoders[{i}]")).OfType<TokenDecoder>().ToArray());
            default:
                throw f.Error(field + ".type", $"'{type}' is not a supported decoder (ByteLevel, ByteFallback, Fuse, Replace, Strip, Metaspace, WordPiece, BPEDecoder, Sequence)");
        }
    }

    /// <summary>Byte-level characters back to bytes, then lossy UTF-8 (one U+FFFD per maximal invalid subsequence, as Rust's from_utf8_lossy).</summary>
    internal sealed class ByteLevel : TokenDecoder
    {
        public override List<string> DecodeChain(List<string> tokens)
        {
            var bytes = new List<byte>(tokens.Count * 4);
            foreach (var t in tokens) ByteLevelAlphabet.AppendBytes(t, bytes);
            return [Encoding.UTF8.GetString(System.Runtime.InteropServices.CollectionsMarshal.AsSpan(bytes))];
        }
    }

    /// <summary>Runs of &lt;0xXX&gt; tokens become their UTF-8 text, or one U+FFFD per byte when invalid.</summary>
    private sealed class ByteFallbackDecoder : TokenDecoder
    {
        private static readonly UTF8Encoding Strict = new(false, true);

        internal static int ParseByteToken(string token)
        {
            if (token.Length != 6 || !token.StartsWith("<0x", StringComparison.Ordinal) || token[5] != '>') return -1;
            return byte.TryParse(token.AsSpan(3, 2), System.Globalization.NumberStyles.AllowHexSpecifier, null, out var b) ? b : -1;
        }

        public override List<string> DecodeChain(List<string> tokens)
        {
            var output = new List<string>(tokens.Count);
            var pending = new List<byte>();
            void Flush()
            {
                if (pending.Count == 0) return;
                try { output.Add(Strict.GetString(pending.ToArray())); }
                catch (DecoderFallbackException) { for (var i = 0; i < pending.Count; i++) output.Add("\uFFFD"); }
                pending.Clear();
            }
            foreach (var t in tokens)
            {
                var b = ParseByteToken(t);
                if (b >= 0) { pending.Add((byte)b); continue; }
                Flush();
                output.Add(t);
            }
            Flush();
            return output;
        }
    }

    private sealed class Fuse : TokenDecoder
    {
        public override List<string> DecodeChain(List<string> tokens) => [string.Concat(tokens)];
    }

    private sealed class Replace(TextPattern pattern, string content) : TokenDecoder
    {
        public override List<string> DecodeChain(List<string> tokens) => tokens.ConvertAll(t => pattern.ReplaceAll(t, content));
    }

    /// <summary>Removes up to <c>start</c> leading and <c>stop</c> trailing <c>content</c> characters from each token.</summary>
    private sealed class Strip(char content, int start, int stop) : TokenDecoder
    {
        public override List<string> DecodeChain(List<string> tokens) => tokens.ConvertAll(t =>
        {
            var from = 0;
            while (from < start && from < t.Length && t[from] == content) from++;
            var to = t.Length;
            while (t.Length - to < stop && to > from && t[to - 1] == content) to--;
            return t[from..to];
        });
    }

    /// <summary>'▁' back to spaces; in the first token every '▁' is dropped when a prefix was prepended (as HF does).</summary>
    private sealed class Metaspace(char replacement, bool prefixWasAdded) : TokenDecoder
    {
        public override List<string> DecodeChain(List<string> tokens)
        {
            var output = new List<string>(tokens.Count);
            for (var i = 0; i < tokens.Count; i++)
            {
                var sb = new StringBuilder(tokens[i].Length);
                foreach (var c in tokens[i])
                {
                    if (c != replacement) sb.Append(c);
                    else if (i != 0 || !prefixWasAdded) sb.Append(' ');
                }
                output.Add(sb.ToString());
            }
            return output;
        }
    }

    private sealed class WordPiece(string prefix, bool cleanup) : TokenDecoder
    {
        public override List<string> DecodeChain(List<string> tokens)
        {
            var output = new List<string>(tokens.Count);
            for (var i = 0; i < tokens.Count; i++)
            {
                var t = tokens[i];
                if (i != 0) t = t.StartsWith(prefix, StringComparison.Ordinal) ? t[prefix.Length..] : " " + t;
                if (cleanup) t = HFTokenizer.CleanUpTokenizationSpaces(t).Replace(" do not", " don't", StringComparison.Ordinal);
                output.Add(t);
            }
            return output;
        }
    }

    private sealed class BpeSuffix(string suffix) : TokenDecoder
    {
        public override List<string> DecodeChain(List<string> tokens) =>
            tokens.Select((t, i) => t.Replace(suffix, i == tokens.Count - 1 ? "" : " ", StringComparison.Ordinal)).ToList();
    }

    private sealed class Sequence(TokenDecoder[] items) : TokenDecoder
    {
        public override List<string> DecodeChain(List<string> tokens)
        {
            foreach (var d in items) tokens = d.DecodeChain(tokens);
            return tokens;
        }
    }
}

/// <summary>
/// A tokenizer.json "post_processor", reduced to what a single sequence needs: the special tokens put before and
/// after it when special tokens are requested.
/// </summary>
internal sealed record PostProcessor(int[] PrefixIds, string[] PrefixTokens, int[] SuffixIds, string[] SuffixTokens)
{
    public static readonly PostProcessor None = new([], [], [], []);

    public bool AddsNothing => PrefixIds.Length == 0 && SuffixIds.Length == 0;

    public static PostProcessor? FromJson(JsonNode? node, JsonFields f, string field, Func<string, int?> tokenToId)
    {
        if (node is null) return null;
        var obj = f.Object(node, field);
        var type = f.Type(obj, field);
        switch (type)
        {
            case "ByteLevel":
                return None;
            case "TemplateProcessing":
                return FromTemplate(obj, f, field);
            case "RobertaProcessing":
            case "BertProcessing":
                var cls = f.Array(obj["cls"], field + ".cls");
                var sep = f.Array(obj["sep"], field + ".sep");
                return new PostProcessor([f.Int(cls[1], field + ".cls[1]")], [f.String(cls[0], field + ".cls[0]")],
                    [f.Int(sep[1], field + ".sep[1]")], [f.String(sep[0], field + ".sep[0]")]);
            case "Sequence":
                var items = f.Array(obj["processors"], field + ".processors");
                var result = None;
                for (var i = 0; i < items.Count; i++)
                {
                    var p = FromJson(items[i], f, $"{field}.processors[{i}]", tokenToId) ?? None;
                    result = new PostProcessor([.. p.PrefixIds, .. result.PrefixIds], [.. p.PrefixTokens, .. result.PrefixTokens],
                        [.. result.SuffixIds, .. p.SuffixIds], [.. result.SuffixTokens, .. p.SuffixTokens]);
                }
                return result;
            default:
                throw f.Error(field + ".type", $"'{type}' is not a supported post-processor (TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing, Sequence)");
        }
    }

    private static PostProcessor FromTemplate(JsonObject obj, JsonFields f, string field)
    {
        var specials = obj["special_tokens"] is null ? new JsonObject() : f.Object(obj["special_tokens"], field + ".special_tokens");
        var single = obj["single"];
        JsonArray parts;
        if (single is JsonValue)
        {
            // Short form "<s> $A </s>" as written by some converters.
            parts = new JsonArray(f.String(single, field + ".single").Split(' ', StringSplitOptions.RemoveEmptyEntries)
                .Select(p => (JsonNode)(p.StartsWith('$') ? new JsonObject { ["Sequence"] = new JsonObject { ["id"] = "A" } }
                    : new JsonObject { ["SpecialToken"] = new JsonObject { ["id"] = p.Split(':')[0] } })).ToArray());
        }
        else parts = f.Array(single, field + ".single");
        var prefixIds = new List<int>(); var prefixTokens = new List<string>();
        var suffixIds = new List<int>(); var suffixTokens = new List<string>();
        var seenSequence = false;
        for (var i = 0; i < parts.Count; i++)
        {
            var part = f.Object(parts[i], $"{field}.single[{i}]");
            if (part["Sequence"] is not null) { seenSequence = true; continue; }
            var specialName = f.String(f.Object(part["SpecialToken"], $"{field}.single[{i}].SpecialToken")["id"], $"{field}.single[{i}].SpecialToken.id");
            var special = f.Object(specials[specialName], $"{field}.special_tokens[\"{specialName}\"]");
            var ids = f.Array(special["ids"], $"{field}.special_tokens[\"{specialName}\"].ids");
            var tokens = f.Array(special["tokens"], $"{field}.special_tokens[\"{specialName}\"].tokens");
            if (ids.Count != tokens.Count) throw f.Error($"{field}.special_tokens[\"{specialName}\"]", "has different numbers of ids and tokens");
            for (var k = 0; k < ids.Count; k++)
            {
                (seenSequence ? suffixIds : prefixIds).Add(f.Int(ids[k], $"{field}.special_tokens[\"{specialName}\"].ids[{k}]"));
                (seenSequence ? suffixTokens : prefixTokens).Add(f.String(tokens[k], $"{field}.special_tokens[\"{specialName}\"].tokens[{k}]"));
            }
        }
        return new PostProcessor([.. prefixIds], [.. prefixTokens], [.. suffixIds], [.. suffixTokens]);
    }
}

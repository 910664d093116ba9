using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;

namespace AdapterFlow.IO.Tokenizers;

/// <summary>A tokenizer.json "normalizer": rewrites each piece of text between added tokens.</summary>
internal abstract class TextNormalizer
{
    public abstract string Normalize(string text);

    public static TextNormalizer? FromJson(JsonNode? node, JsonFields f, string field)
    {
        if (node is null) return null;
        var obj = f.Object(node, field);
        var type = f.Type(obj, field);
        switch (type)
        {
            case "NFC": return new UnicodeForm(NormalizationForm.FormC);
            case "NFD": return new UnicodeForm(NormalizationForm.FormD);
            case "NFKC": return new UnicodeForm(NormalizationForm.FormKC);
            case "NFKD": return new UnicodeForm(NormalizationForm.FormKD);
            case "Lowercase": return new Lowercase();
            case "StripAccents": return new StripAccents();
            case "Strip":
                return new Strip(f.Bool(obj["strip_left"], field + ".strip_left", true), f.Bool(obj["strip_right"], field + ".strip_right", true));
            case "Prepend": return new Prepend(f.String(obj["prepend"], field + ".prepend"));
            case "Replace":
                return new Replace(TextPattern.FromJson(obj["pattern"], f, field + ".pattern"), f.String(obj["content"], field + ".content"));
            case "ByteLevel": return new ByteLevelNormalizer();
            case "BertNormalizer":
                return new Bert(
                    f.Bool(obj["clean_text"], field + ".clean_text", true),
                    f.Bool(obj["handle_chinese_chars"], field + ".handle_chinese_chars", true),
                    obj["strip_accents"] is null ? null : f.Bool(obj["strip_accents"], field + ".strip_accents", false),
                    f.Bool(obj["lowercase"], field + ".lowercase", true));
            case "Sequence":
                var items = f.Array(obj["normalizers"], field + ".normalizers");
                return new Sequence(items.Select((n, i) => FromJson(n, f, $"{field}.normalizers[{i}]")).OfType<TextNormalizer>().ToArray());
            default:
                throw f.Error(field + ".type", $"'{type}' is not a supported normalizer (NFC, NFD, NFKC, NFKD, Lowercase, Strip, StripAccents, Prepend, Replace, ByteLevel, BertNormalizer, Sequence)");
        }
    }

    private sealed class UnicodeForm(NormalizationForm form) : TextNormalizer
    {
        public override string Normalize(string text) => text.IsNormalized(form) ? text : text.Normalize(form);
    }

    private sealed class Lowercase : TextNormalizer
    {
        public override string Normalize(string text) => text.ToLowerInvariant();
    }

    private sealed class StripAccents : TextNormalizer
    {
        public override string Normalize(string text) => RemoveMarks(text);
    }

    internal static string RemoveMarks(string text)
    {
        var sb = new StringBuilder(text.Length);
        foreach (var c in text)
        {
            var cat = CharUnicodeInfo.GetUnicodeCategory(c);
            if (cat is UnicodeCategory.NonSpacingMark or UnicodeCategory.SpacingCombiningMark or UnicodeCategory.EnclosingMark) continue;
            sb.Append(c);
        }
        return sb.ToString();
    }

    private sealed class Strip(bool left, bool right) : TextNormalizer
    {
        public override string Normalize(string text) => left && right ? text.Trim() : left ? text.TrimStart() : right ? text.TrimEnd() : text;
    }

    private sealed class Prepend(string prefix) : TextNormalizer
    {
        public override string Normalize(string text) => text.Length == 0 ? text : prefix + text;
    }

    private sealed class Replace(TextPattern pattern, string content) : TextNormalizer
    {
        public override string Normalize(string text) => pattern.ReplaceAll(text, content);
    }

    private sealed class ByteLevelNormalizer : TextNormalizer
    {
        public override string Normalize(string text) => ByteLevelAlphabet.Encode(text);
    }

    private sealed class Bert(bool cleanText, bool chineseChars, bool? stripAccents, bool lowercase) : TextNormalizer
    {
        public override string Normalize(string text)
        {
            var sb = new StringBuilder(text.Length + 8);
            for (var i = 0; i < text.Length; i++)
            {
                var c = text[i];
                if (cleanText)
                {
                    if (c == '\0' || c == '\uFFFD' || (char.IsControl(c) && c is not ('\t' or '\n' or '\r'))) continue;
                    if (char.IsWhiteSpace(c)) { sb.Append(' '); continue; }
                }
                var len = char.IsSurrogatePair(text, i) ? 2 : 1;
                var cp = len == 2 ? char.ConvertToUtf32(text, i) : c;
                if (chineseChars && IsChinese(cp)) sb.Append(' ').Append(text, i, len).Append(' ');
                else sb.Append(text, i, len);
                i += len - 1;
            }
            var result = sb.ToString();
            // As in BERT: accents are stripped when asked, or by default when lowercasing.
            if (stripAccents ?? lowercase) result = RemoveMarks(result.Normalize(NormalizationForm.FormD));
            return lowercase ? result.ToLowerInvariant() : result;
        }

        private static bool IsChinese(int cp) =>
            cp is >= 0x4E00 and <= 0x9FFF or >= 0x3400 and <= 0x4DBF or >= 0x20000 and <= 0x2A6DF or >= 0x2A700 and <= 0x2B73F
                or >= 0x2B740 and <= 0x2B81F or >= 0x2B920 and <= 0x2CEAF or >= 0xF900 and <= 0xFAFF or >= 0x2F800 and <= 0x2FA1F;
    }

    private sealed class Sequence(TextNormalizer[] items) : TextNormalizer
    {
        public override string Normalize(string text)
        {
            foreach (var n in items) text = n.Normalize(text);
            return text;
        }
    }
}

/// <summary>A tokenizer.json pattern: <c>{"String": "..."}</c> (literal) or <c>{"Regex": "..."}</c>.</summary>
internal sealed class TextPattern
{
    private readonly string? _literal;
    private readonly Regex? _regex;

    private TextPattern(string? literal, Regex? regex) { _literal = literal; _regex = regex; }

    public static TextPattern FromJson(JsonNode? node, JsonFields f, string field)
    {
        var obj = f.Object(node, field);
        if (obj["String"] is { } s) return new TextPattern(f.String(s, field + ".String"), null);
        if (obj["Regex"] is { } r)
        {
            var pattern = f.String(r, field + ".Regex");
            try
            {
                return new TextPattern(null, new Regex(pattern, RegexOptions.CultureInvariant | RegexOptions.Compiled));
            }
            catch (ArgumentException e)
            {
                throw f.Error(field + ".Regex", $"is not a valid regular expression ({e.Message.Split('\n')[0]})");
            }
        }
        throw f.Error(field, "must have a \"String\" or \"Regex\" member");
    }

    public string ReplaceAll(string text, string content) =>
        _literal is not null ? (_literal.Length == 0 ? text : text.Replace(_literal, content, StringComparison.Ordinal)) : _regex!.Replace(text, content.Replace("$", "$$"));

    /// <summary>(start, length) of every non-overlapping match, left to right.</summary>
    public void Matches(string text, List<(int Start, int Length)> output)
    {
        output.Clear();
        if (_literal is not null)
        {
            if (_literal.Length == 0) return;
            for (var i = text.IndexOf(_literal, StringComparison.Ordinal); i >= 0; i = text.IndexOf(_literal, i + _literal.Length, StringComparison.Ordinal))
                output.Add((i, _literal.Length));
            return;
        }
        for (var m = _regex!.Match(text); m.Success; m = m.NextMatch())
            if (m.Length > 0) output.Add((m.Index, m.Length));
    }
}

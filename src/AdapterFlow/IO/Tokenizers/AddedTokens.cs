using System.Text.Json.Nodes;

namespace AdapterFlow.IO.Tokenizers;

/// <summary>An entry of tokenizer.json "added_tokens".</summary>
internal sealed record AddedToken(int Id, string Content, bool SingleWord, bool LStrip, bool RStrip, bool Normalized, bool Special)
{
    public static AddedToken FromJson(JsonNode? node, JsonFields f, string field)
    {
        var obj = f.Object(node, field);
        var content = f.String(obj["content"], field + ".content");
        if (content.Length == 0) throw f.Error(field + ".content", "is empty");
        return new AddedToken(f.Int(obj["id"], field + ".id"), content,
            f.Bool(obj["single_word"], field + ".single_word", false), f.Bool(obj["lstrip"], field + ".lstrip", false),
            f.Bool(obj["rstrip"], field + ".rstrip", false), f.Bool(obj["normalized"], field + ".normalized", !f.Bool(obj["special"], field + ".special", false)),
            f.Bool(obj["special"], field + ".special", false));
    }
}

/// <summary>
/// Finds added tokens in text the way HF's AddedVocabulary does: leftmost-longest, non-overlapping matches;
/// single_word tokens only between non-word characters; lstrip/rstrip swallow neighbouring whitespace.
/// </summary>
internal sealed class AddedTokenMatcher
{
    private readonly Dictionary<char, (string Pattern, AddedToken Token)[]> _byFirstChar;

    public AddedTokenMatcher(IEnumerable<(string Pattern, AddedToken Token)> patterns)
    {
        _byFirstChar = patterns.Where(p => p.Pattern.Length > 0)
            .GroupBy(p => p.Pattern[0])
            .ToDictionary(g => g.Key, g => g.OrderByDescending(p => p.Pattern.Length).ToArray());
    }

    public bool IsEmpty => _byFirstChar.Count == 0;

    /// <summary>Segments covering <paramref name="text"/>: added-token matches (Token set) and the text between them.</summary>
    public void Split(string text, List<(int Start, int End, AddedToken? Token)> output)
    {
        output.Clear();
        var emitted = 0;
        var i = 0;
        while (i < text.Length)
        {
            if (!_byFirstChar.TryGetValue(text[i], out var candidates)) { i++; continue; }
            (string Pattern, AddedToken Token)? hit = null;
            foreach (var c in candidates)
                if (string.CompareOrdinal(text, i, c.Pattern, 0, c.Pattern.Length) == 0) { hit = c; break; }
            if (hit is null) { i++; continue; }
            var (pattern, token) = hit.Value;
            var start = i;
            var stop = i + pattern.Length;
            i = stop;
            if (token.SingleWord)
            {
                var wordBefore = start > 0 && IsWordChar(text, start - 1, before: true);
                var wordAfter = stop < text.Length && IsWordChar(text, stop, before: false);
                if (wordBefore || wordAfter) continue;
            }
            if (token.LStrip)
            {
                var s = start;
                while (s > emitted && char.IsWhiteSpace(text[s - 1])) s--;
                start = s;
            }
            if (token.RStrip)
                while (stop < text.Length && char.IsWhiteSpace(text[stop])) stop++;
            if (start > emitted) output.Add((emitted, start, null));
            output.Add((start, stop, token));
            emitted = stop;
            i = Math.Max(i, stop);
        }
        if (emitted < text.Length) output.Add((emitted, text.Length, null));
    }

    private static bool IsWordChar(string text, int index, bool before)
    {
        var c = text[index];
        if (char.IsSurrogate(c))
        {
            var pairStart = before ? index - 1 : index;
            if (pairStart >= 0 && pairStart + 1 < text.Length && char.IsSurrogatePair(text[pairStart], text[pairStart + 1]))
                return char.IsLetterOrDigit(text, pairStart);
            return false;
        }
        return char.IsLetterOrDigit(c) || c == '_';
    }
}

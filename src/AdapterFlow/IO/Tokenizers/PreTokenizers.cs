using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;

namespace AdapterFlow.IO.Tokenizers;

/// <summary>A piece of text on its way to the model; <see cref="AtStart"/>: it begins at offset 0 of the input.</summary>
internal readonly record struct Piece(string Text, bool AtStart);

internal enum SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous }

/// <summary>A tokenizer.json "pre_tokenizer": cuts normalized text into words the model encodes separately.</summary>
internal abstract partial class PreTokenizer
{
    public abstract void Split(Piece piece, List<Piece> output);

    public static PreTokenizer? FromJson(JsonNode? node, JsonFields f, string field)
    {
        if (node is null) return null;
        var obj = f.Object(node, field);
        var type = f.Type(obj, field);
        switch (type)
        {
            case "ByteLevel":
                return new ByteLevel(f.Bool(obj["add_prefix_space"], field + ".add_prefix_space", true), f.Bool(obj["use_regex"], field + ".use_regex", true));
            case "Metaspace":
                return new Metaspace(ReadReplacement(obj, f, field), Metaspace.ReadScheme(obj, f, field), f.Bool(obj["split"], field + ".split", true));
            case "Split":
                var behavior = ReadBehavior(obj["behavior"], f, field + ".behavior");
                return new SplitByPattern(TextPattern.FromJson(obj["pattern"], f, field + ".pattern"), behavior, f.Bool(obj["invert"], field + ".invert", false));
            case "Digits":
                return new CharClass(c => IsNumber(c), f.Bool(obj["individual_digits"], field + ".individual_digits", false) ? SplitBehavior.Isolated : SplitBehavior.Contiguous);
            case "Punctuation":
                return new CharClass(IsPunctuation, obj["behavior"] is null ? SplitBehavior.Isolated : ReadBehavior(obj["behavior"], f, field + ".behavior"));
            case "WhitespaceSplit":
                return new CharClass(Rune.IsWhiteSpace, SplitBehavior.Removed);
            case "CharDelimiterSplit":
                var delimiter = f.String(obj["delimiter"], field + ".delimiter");
                if (delimiter.Length != 1) throw f.Error(field + ".delimiter", "must be a single character");
                return new CharClass(r => r.Value == delimiter[0], SplitBehavior.Removed);
            case "Whitespace":
                return new Whitespace();
            case "BertPreTokenizer":
                return new Sequence([new CharClass(Rune.IsWhiteSpace, SplitBehavior.Removed), new CharClass(IsPunctuation, SplitBehavior.Isolated)]);
            case "Sequence":
                var items = f.Array(obj["pretokenizers"], field + ".pretokenizers");
                return new Sequence(items.Select((n, i) => FromJson(n, f, $"{field}.pretokenizers[{i}]")).OfType<PreTokenizer>().ToArray());
            default:
                throw f.Error(field + ".type", $"'{type}' is not a supported pre-tokenizer (ByteLevel, Metaspace, Split, Digits, Punctuation, Whitespace, WhitespaceSplit, CharDelimiterSplit, BertPreTokenizer, Sequence)");
        }
    }

    internal static string ReadReplacement(JsonObject obj, JsonFields f, string field)
    {
        var replacement = obj["replacement"] is null ? "\u2581" : f.String(obj["replacement"], field + ".replacement");
        if (replacement.Length != 1) throw f.Error(field + ".replacement", "must be a single character");
        return replacement;
    }

    private static SplitBehavior ReadBehavior(JsonNode? node, JsonFields f, string field)
    {
        var s = f.String(node, field);
        return s switch
        {
            "Removed" => SplitBehavior.Removed,
            "Isolated" => SplitBehavior.Isolated,
            "MergedWithPrevious" => SplitBehavior.MergedWithPrevious,
            "MergedWithNext" => SplitBehavior.MergedWithNext,
            "Contiguous" => SplitBehavior.Contiguous,
            _ => throw f.Error(field, $"'{s}' is not a split behaviour (Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous)"),
        };
    }

    internal static bool IsNumber(Rune r) => Rune.GetUnicodeCategory(r) is UnicodeCategory.DecimalDigitNumber or UnicodeCategory.LetterNumber or UnicodeCategory.OtherNumber;

    private static bool IsPunctuation(Rune r) =>
        (r.IsAscii && char.IsAsciiLetterOrDigit((char)r.Value) is false && r.Value is > 32 and < 127) || Rune.IsPunctuation(r);

    /// <summary>
    /// Turns the matches of a pattern into pieces the way HF's NormalizedString::split does for each behaviour.
    /// <paramref name="segments"/> cover the whole text in order, each flagged as a match or not.
    /// </summary>
    internal static void ApplyBehavior(Piece piece, List<(int Start, int End, bool IsMatch)> segments, SplitBehavior behavior, List<Piece> output)
    {
        var merged = new List<(int Start, int End)>(segments.Count);
        switch (behavior)
        {
            case SplitBehavior.Removed:
                foreach (var s in segments) if (!s.IsMatch) merged.Add((s.Start, s.End));
                break;
            case SplitBehavior.Isolated:
                foreach (var s in segments) merged.Add((s.Start, s.End));
                break;
            case SplitBehavior.MergedWithPrevious:
            {
                var previousMatch = false;
                foreach (var s in segments)
                {
                    if (s.IsMatch && !previousMatch && merged.Count > 0) merged[^1] = (merged[^1].Start, s.End);
                    else merged.Add((s.Start, s.End));
                    previousMatch = s.IsMatch;
                }
                break;
            }
            case SplitBehavior.MergedWithNext:
            {
                var previousMatch = false;
                for (var i = segments.Count - 1; i >= 0; i--)
                {
                    var s = segments[i];
                    if (s.IsMatch && !previousMatch && merged.Count > 0) merged[^1] = (s.Start, merged[^1].End);
                    else merged.Add((s.Start, s.End));
                    previousMatch = s.IsMatch;
                }
                merged.Reverse();
                break;
            }
            case SplitBehavior.Contiguous:
            {
                var previousMatch = false;
                foreach (var s in segments)
                {
                    if (s.IsMatch == previousMatch && merged.Count > 0) merged[^1] = (merged[^1].Start, s.End);
                    else merged.Add((s.Start, s.End));
                    previousMatch = s.IsMatch;
                }
                break;
            }
        }
        foreach (var (start, end) in merged)
            if (end > start) output.Add(new Piece(piece.Text.Substring(start, end - start), piece.AtStart && start == 0));
    }

    /// <summary>GPT-2 regex split, then UTF-8 bytes as byte-level characters.</summary>
    internal sealed class ByteLevel(bool addPrefixSpace, bool useRegex) : PreTokenizer
    {
        [ThreadStatic] private static List<(int Start, int Length)>? t_words;

        public override void Split(Piece piece, List<Piece> output)
        {
            var text = piece.Text;
            if (addPrefixSpace && !text.StartsWith(' ')) text = " " + text;
            if (!useRegex)
            {
                if (text.Length > 0) output.Add(new Piece(ByteLevelAlphabet.Encode(text), piece.AtStart));
                return;
            }
            var words = t_words ??= new List<(int, int)>();
            words.Clear();
            Gpt2Split.Split(text, words);
            foreach (var (start, length) in words)
                output.Add(new Piece(ByteLevelAlphabet.Encode(text.AsSpan(start, length)), piece.AtStart && start == 0));
        }
    }

    /// <summary>SentencePiece's space handling: spaces become '▁' and a '▁' is prepended per the prepend scheme.</summary>
    internal sealed class Metaspace(string replacement, Metaspace.Scheme prependScheme, bool split) : PreTokenizer
    {
        internal enum Scheme { Always, First, Never }

        internal static Scheme ReadScheme(JsonObject obj, JsonFields f, string field)
        {
            if (obj["prepend_scheme"] is { } node)
            {
                var s = f.String(node, field + ".prepend_scheme");
                return s switch
                {
                    "always" => Scheme.Always,
                    "first" => Scheme.First,
                    "never" => Scheme.Never,
                    _ => throw f.Error(field + ".prepend_scheme", $"'{s}' is not one of always, first, never"),
                };
            }
            // Files from before prepend_scheme existed say add_prefix_space instead.
            return f.Bool(obj["add_prefix_space"], field + ".add_prefix_space", true) ? Scheme.Always : Scheme.Never;
        }

        public override void Split(Piece piece, List<Piece> output)
        {
            var text = piece.Text.Replace(" ", replacement, StringComparison.Ordinal);
            if (!text.StartsWith(replacement, StringComparison.Ordinal)
                && (prependScheme == Scheme.Always || (prependScheme == Scheme.First && piece.AtStart)))
                text = replacement + text;
            if (!split)
            {
                if (text.Length > 0) output.Add(piece with { Text = text });
                return;
            }
            var segments = new List<(int, int, bool)>();
            var previous = 0;
            for (var i = text.IndexOf(replacement[0]); i >= 0; i = text.IndexOf(replacement[0], i + 1))
            {
                if (i > previous) segments.Add((previous, i, false));
                segments.Add((i, i + 1, true));
                previous = i + 1;
            }
            if (previous < text.Length) segments.Add((previous, text.Length, false));
            ApplyBehavior(piece with { Text = text }, segments, SplitBehavior.MergedWithNext, output);
        }
    }

    private sealed class SplitByPattern(TextPattern pattern, SplitBehavior behavior, bool invert) : PreTokenizer
    {
        public override void Split(Piece piece, List<Piece> output)
        {
            var matches = new List<(int Start, int Length)>();
            pattern.Matches(piece.Text, matches);
            var segments = new List<(int, int, bool)>(matches.Count * 2 + 1);
            var previous = 0;
            foreach (var (start, length) in matches)
            {
                if (start > previous) segments.Add((previous, start, invert));
                segments.Add((start, start + length, !invert));
                previous = start + length;
            }
            if (previous < piece.Text.Length) segments.Add((previous, piece.Text.Length, invert));
            ApplyBehavior(piece, segments, behavior, output);
        }
    }

    /// <summary>Splits on characters of a class: each such character is one match, as in HF's char-predicate split.</summary>
    private sealed class CharClass(Func<Rune, bool> isMatch, SplitBehavior behavior) : PreTokenizer
    {
        public override void Split(Piece piece, List<Piece> output)
        {
            var text = piece.Text;
            var segments = new List<(int, int, bool)>();
            var runStart = 0;
            for (var i = 0; i < text.Length;)
            {
                Rune.DecodeFromUtf16(text.AsSpan(i), out var rune, out var used);
                if (isMatch(rune))
                {
                    if (i > runStart) segments.Add((runStart, i, false));
                    segments.Add((i, i + used, true));
                    runStart = i + used;
                }
                i += used;
            }
            if (runStart < text.Length) segments.Add((runStart, text.Length, false));
            ApplyBehavior(piece, segments, behavior, output);
        }
    }

    /// <summary>HF's Whitespace pre-tokenizer: the words are the matches of \w+|[^\w\s]+.</summary>
    private sealed partial class Whitespace : PreTokenizer
    {
        [GeneratedRegex(@"\w+|[^\w\s]+", RegexOptions.CultureInvariant)]
        private static partial Regex WordsOrSymbols();

        public override void Split(Piece piece, List<Piece> output)
        {
            for (var m = WordsOrSymbols().Match(piece.Text); m.Success; m = m.NextMatch())
                output.Add(new Piece(m.Value, piece.AtStart && m.Index == 0));
        }
    }

    private sealed class Sequence(PreTokenizer[] items) : PreTokenizer
    {
        public override void Split(Piece piece, List<Piece> output)
        {
            var current = new List<Piece> { piece };
            var next = new List<Piece>();
            foreach (var item in items)
            {
                next.Clear();
                foreach (var p in current) item.Split(p, next);
                (current, next) = (next, current);
            }
            output.AddRange(current);
        }
    }
}

/// <summary>
/// GPT-2's pre-tokenization regex <c>'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+</c>,
/// written out by hand: it classifies Unicode scalar values (a .NET Regex sees UTF-16 halves and would call a
/// supplementary-plane letter "not a letter", unlike the Oniguruma regex HF uses), and it is several times faster.
/// </summary>
internal static class Gpt2Split
{
    private enum Kind : byte { Letter, Number, Space, Other }

    private static Kind Classify(string s, int i, out int length)
    {
        var c = s[i];
        if (c < 128)
        {
            length = 1;
            if (char.IsAsciiLetter(c)) return Kind.Letter;
            if (char.IsAsciiDigit(c)) return Kind.Number;
            return c is ' ' or '\t' or '\n' or '\r' or '\v' or '\f' ? Kind.Space : Kind.Other;
        }
        if (Rune.DecodeFromUtf16(s.AsSpan(i), out var rune, out length) != System.Buffers.OperationStatus.Done)
            return Kind.Other;
        if (Rune.IsWhiteSpace(rune)) return Kind.Space;
        if (Rune.IsLetter(rune)) return Kind.Letter;
        return PreTokenizer.IsNumber(rune) ? Kind.Number : Kind.Other;
    }

    /// <summary>Appends (start, length) of every word of <paramref name="text"/>.</summary>
    public static void Split(string text, List<(int Start, int Length)> words)
    {
        var n = text.Length;
        var i = 0;
        while (i < n)
        {
            var start = i;
            var c = text[i];
            if (c == '\'' && i + 1 < n)
            {
                var c1 = text[i + 1];
                if (c1 is 's' or 't' or 'm' or 'd') { words.Add((i, 2)); i += 2; continue; }
                if (i + 2 < n)
                {
                    var c2 = text[i + 2];
                    if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) { words.Add((i, 3)); i += 3; continue; }
                }
            }
            var kind = Classify(text, i, out var len);
            var body = i;
            if (c == ' ' && i + 1 < n)
            {
                var nextKind = Classify(text, i + 1, out var nextLen);
                if (nextKind != Kind.Space) { kind = nextKind; body = i + 1; len = nextLen; }
            }
            if (kind != Kind.Space)
            {
                // ' ?' + a run of one class (letters, numbers, or anything that is none of letter/number/space).
                var j = body + len;
                while (j < n && Classify(text, j, out var l) == kind) j += l;
                words.Add((start, j - start));
                i = j;
                continue;
            }
            // Whitespace run: \s+(?!\S) leaves the last space for the next word when a non-space follows.
            var end = i + len;
            var lastLen = len;
            while (end < n && Classify(text, end, out var l) == Kind.Space) { lastLen = l; end += l; }
            if (end < n && end - lastLen > start) end -= lastLen;
            words.Add((start, end - start));
            i = end;
        }
    }
}

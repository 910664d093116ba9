using System.Runtime.InteropServices;

namespace AdapterFlow.IO;

/// <summary>
/// Incremental detokenization for streaming generation: <see cref="Append"/> each generated id and get the new
/// text, which only ever holds complete characters (a byte-level or byte-fallback token may carry part of a
/// UTF-8 character; that text is held back until the character is complete). The concatenation of everything
/// returned, <see cref="Flush"/> included, equals <c>Decode(allIds)</c>.
/// </summary>
/// <remarks>
/// Works on a short window of ids: the text of the window is decoded with and without the ids not yet emitted,
/// and the difference is the new text. Decoding the window rather than the single id keeps decoder context
/// (a SentencePiece decoder strips the leading space of the first token only; byte runs need their neighbours),
/// and the window keeps the cost per id constant however long the generation.
/// </remarks>
public sealed class TokenizerStreamingDecoder
{
    private readonly ITokenizer _tokenizer;
    private readonly bool _skipSpecialTokens;
    private readonly List<int> _ids = [];
    private int _prefixStart;   // first id of the decode window
    private int _emittedUpTo;   // ids before this have had their text returned
    private string _emittedWindowText = "";

    public TokenizerStreamingDecoder(ITokenizer tokenizer, bool skipSpecialTokens = false)
    {
        _tokenizer = tokenizer;
        _skipSpecialTokens = skipSpecialTokens;
    }

    /// <summary>All ids appended so far.</summary>
    public IReadOnlyList<int> Ids => _ids;

    /// <summary>Adds one id; returns the text that became complete (often empty for partial characters).</summary>
    public string Append(int id)
    {
        _ids.Add(id);
        var window = CollectionsMarshal.AsSpan(_ids)[_prefixStart..].ToArray();
        var text = _tokenizer.Decode(window, _skipSpecialTokens);
        if (text.Length == 0 || text[^1] == '\uFFFD' || char.IsHighSurrogate(text[^1])) return "";
        if (!text.StartsWith(_emittedWindowText, StringComparison.Ordinal))
        {
            // The decoder rewrote text already returned (not seen with HF decoders); keep waiting for a stable point.
            return "";
        }
        var fresh = text[_emittedWindowText.Length..];
        // Slide the window: the next decode starts at the last emitted id, which keeps the context one id long.
        _prefixStart = _emittedUpTo;
        _emittedUpTo = _ids.Count;
        _emittedWindowText = _tokenizer.Decode(CollectionsMarshal.AsSpan(_ids)[_prefixStart.._emittedUpTo].ToArray(), _skipSpecialTokens);
        return fresh;
    }

    /// <summary>Returns whatever is still held back (e.g. an incomplete character at the end, as U+FFFD).</summary>
    public string Flush()
    {
        if (_emittedUpTo == _ids.Count) return "";
        var text = _tokenizer.Decode(CollectionsMarshal.AsSpan(_ids)[_prefixStart..].ToArray(), _skipSpecialTokens);
        var fresh = text.StartsWith(_emittedWindowText, StringComparison.Ordinal) ? text[_emittedWindowText.Length..] : text;
        _prefixStart = _emittedUpTo = _ids.Count;
        _emittedWindowText = "";
        return fresh;
    }

    /// <summary>Forgets all ids, to start a new sequence.</summary>
    public void Reset()
    {
        _ids.Clear();
        _prefixStart = _emittedUpTo = 0;
        _emittedWindowText = "";
    }
}

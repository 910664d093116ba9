using System.Text;

namespace AdapterFlow.Generation;

/// <summary>
/// Watches a row's text for stop strings. Text that might be the beginning of a stop string is held back, so a
/// stream never shows any part of the stop string that ends the sequence.
/// </summary>
public sealed class StopStringMatcher
{
    private readonly string[] _stops;
    private readonly int _longest;
    private readonly StringBuilder _text = new();
    private int _released;

    public StopStringMatcher(IReadOnlyList<string> stops)
    {
        _stops = stops.Where(s => !string.IsNullOrEmpty(s)).Distinct().ToArray();
        _longest = _stops.Length == 0 ? 0 : _stops.Max(s => s.Length);
    }

    /// <summary>The text so far, cut before the stop string once one matched.</summary>
    public string Text => _text.ToString();

    /// <summary>Adds final text. Returns what can be shown now; <paramref name="matched"/> is the stop string found, if any.</summary>
    public string Append(string piece, out string? matched)
    {
        matched = null;
        int searchFrom = Math.Max(0, _text.Length - (_longest - 1));
        _text.Append(piece);
        if (_stops.Length == 0) return Release(_text.Length);
        var text = _text.ToString();
        int best = -1;
        foreach (var stop in _stops)
        {
            int at = text.IndexOf(stop, searchFrom, StringComparison.Ordinal);
            if (at >= 0 && (best < 0 || at < best || (at == best && stop.Length > matched!.Length)))
            {
                best = at;
                matched = stop;
            }
        }
        if (best >= 0)
        {
            _text.Length = best;
            return Release(best);
        }
        return Release(text.Length - LongestStopPrefixAtEnd(text));
    }

    /// <summary>Releases whatever was held back (the sequence ended without a stop string).</summary>
    public string Flush() => Release(_text.Length);

    private string Release(int upTo)
    {
        if (upTo <= _released) return "";
        var piece = _text.ToString(_released, upTo - _released);
        _released = upTo;
        return piece;
    }

    /// <summary>Length of the longest end of <paramref name="text"/> that is a proper beginning of a stop string.</summary>
    private int LongestStopPrefixAtEnd(string text)
    {
        int best = 0;
        foreach (var stop in _stops)
            for (int n = Math.Min(stop.Length - 1, text.Length); n > best; n--)
                if (string.CompareOrdinal(text, text.Length - n, stop, 0, n) == 0)
                {
                    best = n;
                    break;
                }
        return best;
    }
}

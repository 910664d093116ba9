using System.Text;
using AdapterFlow.Generation;

namespace AdapterFlow.Tests.Generation;

public class StopStringMatcherTests
{
    /// <summary>Feeds pieces; returns what was released, the stop string and the final text.</summary>
    private static (string Released, string? Matched, string Text) Feed(string[] stops, params string[] pieces)
    {
        var matcher = new StopStringMatcher(stops);
        var released = new StringBuilder();
        foreach (var piece in pieces)
        {
            released.Append(matcher.Append(piece, out var matched));
            if (matched is not null) return (released.ToString(), matched, matcher.Text);
        }
        released.Append(matcher.Flush());
        return (released.ToString(), null, matcher.Text);
    }

    [Fact]
    public void StopStringSplitAcrossPiecesIsFoundAndNeverReleased()
    {
        var (released, matched, text) = Feed(["\n\n"], "Hello", "\n", "\nWorld");
        Assert.Equal("\n\n", matched);
        Assert.Equal("Hello", released);
        Assert.Equal("Hello", text);
    }

    [Fact]
    public void HeldBackTextIsReleasedWhenItStopsLookingLikeAStopString()
    {
        var matcher = new StopStringMatcher(["END"]);
        Assert.Equal("ab", matcher.Append("abE", out _));
        Assert.Equal("", matcher.Append("N", out _));
        Assert.Equal("ENx", matcher.Append("x", out var matched));
        Assert.Null(matched);
        Assert.Equal("", matcher.Flush());
        Assert.Equal("abENx", matcher.Text);
    }

    [Fact]
    public void EarliestOfSeveralStopStringsWins()
    {
        var (released, matched, text) = Feed(["world", "lo w"], "hel", "lo world");
        Assert.Equal("lo w", matched);
        Assert.Equal("hel", text);
        Assert.Equal("hel", released);
    }

    [Fact]
    public void WithoutAMatchEverythingIsReleasedAtTheEnd()
    {
        var (released, matched, text) = Feed(["xyz"], "abc", "x", "y");
        Assert.Null(matched);
        Assert.Equal("abcxy", released);
        Assert.Equal("abcxy", text);
    }

    [Fact]
    public void StopStringInsideOnePieceCutsThatPiece()
    {
        var (released, matched, text) = Feed(["."], "Once", " upon. A time");
        Assert.Equal(".", matched);
        Assert.Equal("Once upon", released);
        Assert.Equal("Once upon", text);
    }
}

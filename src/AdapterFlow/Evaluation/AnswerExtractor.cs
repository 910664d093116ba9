using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;

namespace AdapterFlow.Evaluation;

/// <summary>How AQuA's option letter is read from a response.</summary>
public enum AquaScoring
{
    /// <summary>
    /// Default: the letter right after the last "answer is" ("The answer is (C)", "the answer is: B"); failing
    /// that, the last standalone option letter ("(D)", "D)", "D." or a lone D; a capital A followed by a
    /// lower-case word is read as the article "A", not an option).
    /// </summary>
    Strict,

    /// <summary>LLM-Adapters' extract_answer_letter: the first capital A, B, C, D or E anywhere in the response (so "A train..." answers A).</summary>
    LlmAdapters,
}

/// <summary>
/// Reads the predicted answer from a response the way LLM-Adapters does, so numbers stay comparable:
/// numbers — commas removed, every match of <c>-?\d+\.?\d*</c>, the last one wins, no number is wrong (∞);
/// a prediction is correct when within 0.001 of the label.
/// </summary>
public static partial class AnswerExtractor
{
    /// <summary>LLM-Adapters' tolerance: |label − prediction| ≤ 0.001.</summary>
    public const double Tolerance = 0.001;

    // Same pattern as LLM-Adapters. Like Python 3's re on str, .NET's \d matches any Unicode decimal digit.
    [GeneratedRegex(@"-?\d+\.?\d*", RegexOptions.CultureInvariant)]
    private static partial Regex NumberPattern();

    [GeneratedRegex("A|B|C|D|E", RegexOptions.CultureInvariant)]
    private static partial Regex AnyOptionLetter();

    // "answer is" (any case), optional colon, optional "(", a capital A–E not followed by a letter or digit.
    [GeneratedRegex(@"(?i:answer\s+is)\s*:?\s*\(?([A-E])(?![A-Za-z0-9])", RegexOptions.CultureInvariant)]
    private static partial Regex AnswerIsLetter();

    // A standalone option letter: not inside a word or number; "A" before a lower-case word is the article.
    [GeneratedRegex(@"(?<![A-Za-z0-9])(A(?!\s+[a-z])|[B-E])(?![A-Za-z0-9'’])", RegexOptions.CultureInvariant)]
    private static partial Regex StandaloneOptionLetter();

    /// <summary>The last number of the response (commas removed); +∞ when there is none (always wrong), as in LLM-Adapters.</summary>
    public static double ExtractNumber(string response)
    {
        ArgumentNullException.ThrowIfNull(response);
        var matches = NumberPattern().Matches(response.Replace(",", ""));
        if (matches.Count == 0) return double.PositiveInfinity;
        return ParsePythonFloat(matches[^1].Value);
    }

    /// <summary>LLM-Adapters' test: |label − prediction| ≤ 0.001 (∞ never is).</summary>
    public static bool IsCorrectNumber(double label, double prediction) => Math.Abs(label - prediction) <= Tolerance;

    /// <summary>The predicted option letter ("" when none).</summary>
    public static string ExtractLetter(string response, AquaScoring scoring)
    {
        ArgumentNullException.ThrowIfNull(response);
        var text = response.Trim();
        if (scoring == AquaScoring.LlmAdapters)
        {
            var first = AnyOptionLetter().Match(text);
            return first.Success ? first.Value : "";
        }
        var stated = AnswerIsLetter().Matches(text);
        if (stated.Count > 0) return stated[^1].Groups[1].Value;
        var options = StandaloneOptionLetter().Matches(text);
        return options.Count > 0 ? options[^1].Groups[1].Value : "";
    }

    /// <summary>The name used on the command line and in reports.</summary>
    public static string Name(AquaScoring scoring) => scoring == AquaScoring.LlmAdapters ? "llm-adapters" : "strict";

    /// <summary>Parses <see cref="Name(AquaScoring)"/>.</summary>
    public static AquaScoring ParseScoring(string name) => name.Trim().ToLowerInvariant() switch
    {
        "strict" => AquaScoring.Strict,
        "llm-adapters" or "llm_adapters" or "llmadapters" => AquaScoring.LlmAdapters,
        _ => throw new ArgumentException($"unknown AQuA scoring '{name}' (choose strict or llm-adapters)"),
    };

    /// <summary>
    /// float() of a regex match: digits of any script become ASCII (Python's float accepts them; .NET's parser
    /// does not); "5." is 5; a number too large for a double is ∞, as in Python.
    /// </summary>
    private static double ParsePythonFloat(string match)
    {
        var ascii = new StringBuilder(match.Length);
        foreach (var c in match)
            ascii.Append(c is >= '0' and <= '9' || !char.IsDigit(c) ? c : (char)('0' + (int)char.GetNumericValue(c)));
        return double.Parse(ascii.ToString(), NumberStyles.AllowLeadingSign | NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture);
    }
}

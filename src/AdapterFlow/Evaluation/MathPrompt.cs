namespace AdapterFlow.Evaluation;

/// <summary>
/// The prompt LLM-Adapters' evaluate.py (<c>generate_prompt</c>) builds for its math evaluation, byte for byte,
/// so that scores are comparable. Its Python triple-quoted f-strings keep the source indentation: after the
/// first line every line starts with 16 spaces, the no-input header ends with a space, and the prompt ends with
/// "### Response:" + newline + 16 spaces. (finetune.py's training template differs slightly — two trailing
/// spaces on the header, an indented blank line — and LLM-Adapters evaluates with this one regardless.)
/// </summary>
public static class MathPrompt
{
    private const string Indent = "                "; // 16 spaces: the indentation inside evaluate.py's f-string

    /// <summary>Header used when there is no input (the trailing space is in LLM-Adapters' source).</summary>
    public const string HeaderWithoutInput =
        "Below is an instruction that describes a task. Write a response that appropriately completes the request. ";

    /// <summary>Header used with an input.</summary>
    public const string HeaderWithInput =
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.";

    /// <summary>
    /// The evaluation prompt. LLM-Adapters calls it with the instruction only (its math sets have empty inputs);
    /// a non-empty <paramref name="input"/> selects its with-input variant.
    /// </summary>
    public static string Format(string instruction, string? input = null)
    {
        ArgumentNullException.ThrowIfNull(instruction);
        // Python's `if input:` — an empty string counts as no input.
        if (!string.IsNullOrEmpty(input))
        {
            return HeaderWithInput + "\n\n" +
                   Indent + "### Instruction:\n" +
                   Indent + instruction + "\n\n" +
                   Indent + "### Input:\n" +
                   Indent + input + "\n\n" +
                   Indent + "### Response:\n" +
                   Indent;
        }
        return HeaderWithoutInput + "\n\n" +
               Indent + "### Instruction:\n" +
               Indent + instruction + "\n\n" +
               Indent + "### Response:\n" +
               Indent;
    }

    /// <summary>
    /// Texts that end a response. LLM-Adapters scores <c>decoded.split("### Response:")[1].strip()</c>, so nothing after
    /// a second "### Response:" is ever scored: stopping there changes nothing. Stopping at the model's next
    /// "### Instruction" saves the time of over-generation (LLM-Adapters generates on and would also scan a
    /// hallucinated next question for numbers — the one place our response can differ from theirs).
    /// </summary>
    public static IReadOnlyList<string> StopStrings { get; } = ["### Instruction", "### Response:"];

    /// <summary>The scored response: <paramref name="generated"/> cut before the first stop string, then trimmed (Python's strip()).</summary>
    public static string Response(string generated)
    {
        int cut = generated.Length;
        foreach (var stop in StopStrings)
        {
            int at = generated.IndexOf(stop, StringComparison.Ordinal);
            if (at >= 0 && at < cut) cut = at;
        }
        return generated[..cut].Trim();
    }
}

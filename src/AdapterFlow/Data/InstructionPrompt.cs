namespace AdapterFlow.Data;

/// <summary>
/// The training prompt of LLM-Adapters' finetune.py (<c>generate_prompt</c>), byte for byte. Its Python
/// triple-quoted f-strings keep the source indentation: after the header every line starts with 16 spaces and
/// the blank lines between sections are 16 spaces too. The no-input header ends with two spaces, the with-input
/// header with one. (The evaluation template, <see cref="Evaluation.MathPrompt"/>, differs in these details.)
/// </summary>
public static class InstructionPrompt
{
    private const string Indent = "                "; // 16 spaces: the indentation inside finetune.py's f-string

    /// <summary>Header without input (two trailing spaces, as in LLM-Adapters' source).</summary>
    public const string HeaderWithoutInput =
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.  ";

    /// <summary>Header with input (one trailing space).</summary>
    public const string HeaderWithInput =
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request. ";

    /// <summary>The full training text: prompt followed by <paramref name="output"/>.</summary>
    public static string Format(string instruction, string? input, string output)
    {
        ArgumentNullException.ThrowIfNull(instruction);
        ArgumentNullException.ThrowIfNull(output);
        // Python's `if data_point["input"]:` — an empty string counts as no input.
        if (!string.IsNullOrEmpty(input))
        {
            return HeaderWithInput + "\n\n" +
                   Indent + "### Instruction:\n" +
                   Indent + instruction + "\n" +
                   Indent + "\n" +
                   Indent + "### Input:\n" +
                   Indent + input + "\n" +
                   Indent + "\n" +
                   Indent + "### Response:\n" +
                   Indent + output;
        }
        return HeaderWithoutInput + "\n\n" +
               Indent + "### Instruction:\n" +
               Indent + instruction + "\n" +
               Indent + "\n" +
               Indent + "### Response:\n" +
               Indent + output;
    }

    /// <summary>The prompt part alone (the template with an empty output), whose tokens SFT masks out of the loss.</summary>
    public static string Prompt(string instruction, string? input) => Format(instruction, input, "");
}

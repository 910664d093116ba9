using System.Globalization;
using System.CommandLine;
using System.CommandLine.Parsing;

namespace AdapterFlow.Cli;

/// <summary>Options shared by several commands, built fresh per command (System.CommandLine symbols have one parent).</summary>
internal static class CommonOptions
{
    public static Option<bool> Json(string description) => new("--json")
    {
        Description = description,
    };

    public static Option<string> Device() => new Option<string>("--device")
    {
        Description = "Where the model runs: cpu, cuda or cuda:N.",
        DefaultValueFactory = _ => "cpu",
        HelpName = "cpu|cuda",
    };

    public static Option<string?> DType() => new Option<string?>("--dtype")
    {
        Description = "Weight dtype for the run: float32 or bfloat16 ; default: as stored in the checkpoint.",
        HelpName = "float32|bfloat16",
    }.AcceptOnlyFromAmong("float32", "bfloat16");

    public static Option<string?> Adapter() => new("--adapter")
    {
        Description = "A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) to apply to the model.",
        HelpName = "DIR",
    };

    public static Option<string> ModelDir(string description) => new("--model", "-m")
    {
        Description = description,
        Required = true,
        HelpName = "DIR",
    };

    /// <summary>Adds a validator that reports a one-line error unless <paramref name="isValid"/> holds.</summary>
    public static Option<string?> DraftVocab() => new("--draft-vocab")
    {
        Description = "Self-speculative decoding: the tokens the draft may propose, a file written by `adapterflow draft-vocab` (its head then " +
                      $"computes only their logits, plus the prompt's and generated tokens'; the output does not change). Default: the model " +
                      $"folder's {Generation.DraftVocabulary.FileName} if there is one, else the whole vocabulary; 'none' for the whole vocabulary.",
        HelpName = "FILE|none",
    };

    public static Option<double> DraftConfidence() => new Option<double>("--draft-confidence")
    {
        Description = "Self-speculative decoding: end a round's drafting early after a draft whose probability under the draft itself is " +
                      "below P, so that --num-speculations is the most drafts per round (transformers' assistant_confidence_threshold); " +
                      "0 = always draft K. The output does not change.",
        HelpName = "P",
        DefaultValueFactory = _ => 0,
    }.Check(p => p >= 0 && p < 1, "must be in [0, 1)");

    /// <summary>A comma-separated list of positive integers given to <paramref name="option"/>, duplicates dropped; a usage error otherwise.</summary>
    public static int[] PositiveIntegers(string text, string option)
    {
        var parts = text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        if (parts.Length == 0) throw new CliUsageException($"{option} holds no values");
        return parts.Select(p => int.TryParse(p, NumberStyles.None, CultureInfo.InvariantCulture, out var v) && v >= 1
            ? v
            : throw new CliUsageException($"{option}: '{p}' is not a positive integer")).Distinct().ToArray();
    }

    public static Option<bool> NoPackedWeights() => new("--no-packed-weights")
    {
        Description = "Self-speculative decoding on the CPU: verify over the model's own weights instead of a copy of the late layers' and " +
                      "the head's weights laid out for several tokens at once (32-row panels, made once per model: faster verification " +
                      "for that part of the weights' memory again; used with AVX-512 only). The output does not change.",
    };

    /// <summary>The draft vocabulary <c>--draft-vocab</c> selects: the named file, none, or the model folder's file if present.</summary>
    public static Generation.DraftVocabulary? ReadDraftVocab(string? value, string modelPath) => value switch
    {
        "none" => null,
        null => Generation.DraftVocabulary.FromModelFolder(modelPath),
        _ => Generation.DraftVocabulary.Load(value),
    };

    public static Option<T> Check<T>(this Option<T> option, Func<T, bool> isValid, string requirement)
    {
        option.Validators.Add(result =>
        {
            if (result.Tokens.Count == 0) return;
            T? value;
            try { value = result.GetValueOrDefault<T>(); }
            catch (InvalidOperationException) { return; } // a type error is already reported by the parser
            if (value is not null && !isValid(value))
                result.AddError($"{option.Name} {requirement} (got {FormatValue(value)})");
        });
        return option;
    }

    private static string FormatValue<T>(T value) => value switch
    {
        double d => d.ToString(System.Globalization.CultureInfo.InvariantCulture),
        float f => f.ToString(System.Globalization.CultureInfo.InvariantCulture),
        _ => value?.ToString() ?? "",
    };
}

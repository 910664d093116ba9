using System.Globalization;
using System.Text;
using AdapterFlow.Generation;

namespace AdapterFlow.Bench;

/// <summary>
/// The `speculative` suite: <see cref="SpeculativeSweep"/> (the library code behind `adapterflow bench-speculative`) on
/// a model folder, as a Markdown table for docs/benchmarks.md.
/// </summary>
public static class SpeculativeBench
{
    public static string Table(string modelDir, string machine, int newTokens, string? exitLayers, string? numSpeculations, int repeats,
        bool cpuKernels = true, string? draftVocabulary = null, double draftConfidence = 0, string? promptsFile = null, int? maxPrompts = null, bool packedWeights = true)
    {
        using var textModel = TextModel.Load(modelDir);
        var model = textModel.Model;
        // Both sides of the comparison take the same path: libtorch only, or the managed CPU decode kernels where they apply.
        if (model is AdapterFlow.Models.LlamaForCausalLM llama) llama.UseCpuDecodeKernels = cpuKernels;
        var texts = promptsFile is null ? SpeculativeSweep.DefaultPrompts : SpeculativeSweep.ReadPrompts(promptsFile, maxPrompts);
        var prompts = texts.Select(t => textModel.Tokenizer.Encode(t, addSpecialTokens: true)).ToArray();
        var options = new SpeculativeSweepOptions
        {
            ExitLayers = exitLayers is null ? null : Parse(exitLayers),
            NumSpeculations = numSpeculations is null ? new SpeculativeSweepOptions().NumSpeculations : Parse(numSpeculations),
            MaxNewTokens = newTokens,
            StopTokenIds = textModel.GenerationStopTokenIds,
            Repeats = repeats,
            DraftVocabulary = draftVocabulary is null ? null : DraftVocabulary.Load(draftVocabulary),
            DraftConfidenceThreshold = draftConfidence,
            PackVerificationWeights = packedWeights,
        };
        Console.WriteLine($"Self-speculative sweep on {modelDir}: {model.NumLayers} layers, {model.ParameterCount() / 1e6:F1}M parameters");
        var result = SpeculativeSweep.Run(model, prompts, options, line => Console.WriteLine("  " + line));

        var table = new StringBuilder();
        table.AppendLine(machine);
        table.AppendLine();
        table.AppendLine(string.Create(CultureInfo.InvariantCulture,
            $"Model: `{Path.GetFileName(Path.GetFullPath(modelDir).TrimEnd(Path.DirectorySeparatorChar))}` ({model.Config.ModelType}, {model.NumLayers} layers, {model.ParameterCount() / 1e6:F1}M parameters, {model.DType}); ") +
            string.Create(CultureInfo.InvariantCulture,
            $"{prompts.Length} {(promptsFile is null ? "built-in prompts" : $"prompts from `{Path.GetFileName(promptsFile)}`")} one at a time, greedy, up to {newTokens} new tokens ({result.GeneratedTokens} in all), warm-up, then per setting {repeats} timed passes each right after a baseline pass (speed-up = median ratio of the pairs; tok/s = fastest pass). ") +
            string.Create(CultureInfo.InvariantCulture, $"Autoregressive baseline measured in the same run: {result.BaselineTokensPerSecond:F1} tok/s (decode, fastest pass). CPU decode kernels: {(cpuKernels ? "on (one-token steps of the baseline and of the drafts, and the verification passes over d + 1 positions)" : "off (everything through libtorch)")}.") +
            (options.DraftVocabulary is { } draft ? string.Create(CultureInfo.InvariantCulture, $" Draft head over {draft.Count} tokens (`{Path.GetFileName(draftVocabulary)}`) plus those of the text so far; the verifier's head is whole.") : " Draft head: the whole vocabulary.") +
            (cpuKernels ? (packedWeights && AdapterFlow.Models.Cpu.PanelMatrix.Supported
                ? " Verification reads a 32-row panel copy of the late layers' and the head's weights."
                : " Verification reads the row-major weights (no panel copy).") : "") +
            (draftConfidence > 0 ? string.Create(CultureInfo.InvariantCulture, $" Drafting stops early after a draft with probability below {draftConfidence} (K = most drafts per round).") : ""));
        table.AppendLine();
        table.AppendLine("| exit layer E | drafts K | decode tok/s | speed-up | acceptance | tokens/round | same tokens as autoregressive |");
        table.AppendLine("|---:|---:|---:|---:|---:|---:|---|");
        foreach (var p in result.Points)
            table.AppendLine(string.Create(CultureInfo.InvariantCulture,
                $"| {p.ExitLayer} | {p.NumSpeculations} | {p.TokensPerSecond:F1} | {p.Speedup:F2}× | {100 * p.AcceptanceRate:F0}% | {p.TokensPerRound:F2} | {(p.IdenticalOutput ? "yes" : "**NO**")} |"));
        table.AppendLine();
        table.AppendLine(result.Best is { } best
            ? string.Create(CultureInfo.InvariantCulture, $"Best: E = {best.ExitLayer}, K = {best.NumSpeculations}: {best.Speedup:F2}× ({best.TokensPerSecond:F1} tok/s, acceptance {100 * best.AcceptanceRate:F0}%).")
            : "No setting reproduced the autoregressive tokens (a bug).");
        return table.ToString();
    }

    private static int[] Parse(string list) =>
        list.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(x => int.Parse(x, CultureInfo.InvariantCulture)).ToArray();
}

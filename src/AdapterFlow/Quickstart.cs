using System.Diagnostics;
using AdapterFlow.Generation;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow;

/// <summary>Settings of <see cref="Quickstart.Run"/>.</summary>
public sealed record QuickstartOptions
{
    /// <summary>Where the model is written; null = a new folder under the system temp folder.</summary>
    public string? Directory { get; init; }
    public string Architecture { get; init; } = "llama";
    public string Preset { get; init; } = "small";
    public Device? Device { get; init; }
    public string Prompt { get; init; } = "Once upon a time";
    public int MaxNewTokens { get; init; } = 32;
    public long Seed { get; init; }
}

/// <summary>One finished step: what was done and how long it took.</summary>
public sealed record QuickstartStep(int Number, string Title, string Detail, TimeSpan Elapsed);

/// <summary>Everything the quickstart did and measured.</summary>
public sealed record QuickstartResult(
    string Directory,
    string Architecture,
    long Parameters,
    int VocabSize,
    IReadOnlyList<string> Files,
    long BytesOnDisk,
    double ReloadMaxDifference,
    string Prompt,
    string GeneratedText,
    int NewTokens,
    double TokensPerSecond,
    double PrefillTokensPerSecond,
    IReadOnlyList<QuickstartStep> Steps,
    TimeSpan Total);

/// <summary>
/// The end-to-end tour behind <c>adapterflow quickstart</c>: train a tokenizer on the built-in corpus, create a
/// small LLaMA-family model, save it in the Hugging Face layout, load it back (checking the logits are unchanged)
/// and generate from it. Kept in the library so the command line only prints.
/// </summary>
public static class Quickstart
{
    public static QuickstartResult Run(QuickstartOptions options, Action<QuickstartStep>? onStep = null)
    {
        var directory = options.Directory ?? Path.Combine(Path.GetTempPath(), "adapterflow-quickstart-" + DateTime.UtcNow.ToString("yyyyMMdd-HHmmss") + "-" + Guid.NewGuid().ToString("N")[..6]);
        FreshModel.CheckTarget(directory);
        var device = options.Device ?? torch.CPU;
        var steps = new List<QuickstartStep>();
        var total = Stopwatch.StartNew();
        var clock = Stopwatch.StartNew();
        void Done(string title, string detail)
        {
            var step = new QuickstartStep(steps.Count + 1, title, detail, clock.Elapsed);
            steps.Add(step);
            onStep?.Invoke(step);
            clock.Restart();
        }

        var tokenizer = FreshModel.TrainTokenizer(options.Preset);
        Done("Train a tokenizer", $"byte-level BPE on the built-in English/arithmetic corpus: {tokenizer.VocabSize} tokens");

        long parameters;
        string architecture;
        using (var model = FreshModel.CreateModel(options.Architecture, options.Preset, tokenizer, options.Seed, device))
        {
            parameters = model.ParameterCount();
            architecture = model.Config.Architecture;
            var c = model.Config;
            Done("Create a model", $"{architecture} '{options.Preset}', random weights (seed {options.Seed}): {parameters:N0} parameters, " +
                                   $"{c.NumHiddenLayers} layers, {c.NumAttentionHeads} query / {c.NumKeyValueHeads} key-value heads");

            var files = FreshModel.Save(model, tokenizer, directory);
            Done("Save it", $"{directory}: {string.Join(", ", files)}");

            using var reloaded = TextModel.Load(directory, new LoadOptions { Device = device });
            double diff = MaxLogitDifference(model, reloaded.Model, reloaded.Tokenizer.Encode(options.Prompt, addSpecialTokens: true));
            if (diff != 0) throw new InvalidOperationException($"the reloaded model's logits differ from the saved one's by {diff}");
            Done("Load it back", $"config, weights and tokenizer read back; logits identical to the original (max difference {diff})");

            var generator = reloaded.CreateGenerator();
            var generation = generator.Generate([options.Prompt], new GenerationOptions { MaxNewTokens = options.MaxNewTokens, DoSample = false });
            var sequence = generation.Sequences[0];
            Done("Generate", $"greedy, {sequence.Tokens.Count} new tokens at {generation.Stats.GenerationTokensPerSecond:0.#} tokens/s " +
                             "(the weights are untrained, so the text is noise until training arrives)");

            var bytes = files.Sum(f => new FileInfo(Path.Combine(directory, f)).Length);
            return new QuickstartResult(Path.GetFullPath(directory), architecture, parameters, tokenizer.VocabSize, files, bytes, diff,
                options.Prompt, sequence.Text ?? "", sequence.Tokens.Count, generation.Stats.GenerationTokensPerSecond,
                generation.Stats.PromptTokensPerSecond, steps, total.Elapsed);
        }
    }

    /// <summary>Largest absolute difference between two models' logits on the same ids.</summary>
    private static double MaxLogitDifference(CausalLM a, CausalLM b, IReadOnlyList<int> ids)
    {
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        var input = torch.tensor(ids.Select(i => (long)i).ToArray(), device: a.Device).unsqueeze(0);
        return (a.Logits(input) - b.Logits(input.to(b.Device))).abs().max().item<float>();
    }
}

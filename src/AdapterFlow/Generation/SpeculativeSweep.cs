using AdapterFlow.Models;

namespace AdapterFlow.Generation;

/// <summary>What <see cref="SpeculativeSweep.Run"/> measures.</summary>
public sealed record SpeculativeSweepOptions
{
    /// <summary>Draft exit layers E to try; null = <see cref="SpeculativeSweep.DefaultExitLayers"/> for the model.</summary>
    public IReadOnlyList<int>? ExitLayers { get; init; }

    /// <summary>Draft lengths K to try.</summary>
    public IReadOnlyList<int> NumSpeculations { get; init; } = [2, 4, 6];

    /// <summary>New tokens per prompt at most (rows may stop earlier at a stop token, the same way in every setting).</summary>
    public int MaxNewTokens { get; init; } = 64;

    /// <summary>Stop tokens; null = the model config's EOS ids.</summary>
    public IReadOnlyList<int>? StopTokenIds { get; init; }

    /// <summary>Timed passes over the prompts per setting, each paired with a baseline pass just before it; the speed-up is the median ratio.</summary>
    public int Repeats { get; init; } = 1;

    /// <summary>The draft's vocabulary (<see cref="GenerationOptions.DraftVocabulary"/>) in every setting; null = the whole vocabulary.</summary>
    public DraftVocabulary? DraftVocabulary { get; init; }

    /// <summary><see cref="GenerationOptions.DraftConfidenceThreshold"/> in every setting (K is then the most drafts a round makes).</summary>
    public double DraftConfidenceThreshold { get; init; }

    /// <summary><see cref="GenerationOptions.PackVerificationWeights"/> in every setting.</summary>
    public bool PackVerificationWeights { get; init; } = true;
}

/// <summary>One measured setting of the sweep (greedy, prompts one at a time).</summary>
/// <param name="ExitLayer">Layers the draft runs (E).</param>
/// <param name="NumSpeculations">Tokens drafted per round (K).</param>
/// <param name="TokensPerSecond">Decode tokens per second over all prompts (prefill excluded: it is the same pass in every strategy).</param>
/// <param name="Speedup">Median over the timed passes of (this pass's tokens/s) / (tokens/s of the baseline pass run just before it).</param>
/// <param name="AcceptanceRate">Drafted tokens the full model agreed with.</param>
/// <param name="TokensPerRound">Decode tokens per verification round (1 = no gain from drafting).</param>
/// <param name="IdenticalOutput">Every prompt's tokens equal the autoregressive ones (they must: anything else is a bug).</param>
/// <param name="MismatchedPrompts">Indices of prompts whose tokens differ from the baseline's.</param>
public sealed record SpeculativeSweepPoint(int ExitLayer, int NumSpeculations, double TokensPerSecond, double Speedup,
    double AcceptanceRate, double TokensPerRound, bool IdenticalOutput, IReadOnlyList<int> MismatchedPrompts);

/// <summary>The outcome of a sweep: the autoregressive baseline (its fastest pass) measured in the same run and one point per (E, K).</summary>
public sealed record SpeculativeSweepResult(int Layers, int Prompts, long GeneratedTokens, double BaselineTokensPerSecond,
    IReadOnlyList<SpeculativeSweepPoint> Points)
{
    /// <summary>True when every setting reproduced the autoregressive tokens.</summary>
    public bool AllIdentical => Points.All(p => p.IdenticalOutput);

    /// <summary>The fastest setting among those with identical output (null when none).</summary>
    public SpeculativeSweepPoint? Best => Points.Where(p => p.IdenticalOutput).MaxBy(p => p.Speedup);
}

/// <summary>
/// Measures greedy self-speculative decoding against autoregressive decoding on the same prompts in the same run:
/// for every exit layer E and draft length K, decode tokens per second, speed-up, acceptance rate, and whether the
/// output is token-for-token the autoregressive output. Prompts run one at a time (batch 1, as LayerSkip measures).
/// Used by <c>adapterflow bench-speculative</c> and the benchmark project.
/// </summary>
public static class SpeculativeSweep
{
    /// <summary>
    /// Prompts from a file: a <c>.json</c> math set ({instruction, input} items, as LLM-Adapters' and the quickstart's
    /// data) becomes the evaluation prompts a model fine-tuned on it is asked (<see cref="Evaluation.MathPrompt"/>), so
    /// the sweep decodes what the model was trained to answer; a <c>.jsonl</c> file gives its "text" fields, any
    /// other file one prompt per line (<see cref="IO.TextInputs"/>).
    /// </summary>
    public static IReadOnlyList<string> ReadPrompts(string path, int? limit = null)
    {
        IReadOnlyList<string> texts = path.EndsWith(".json", StringComparison.OrdinalIgnoreCase)
            ? Data.MathDataset.Load(path).Items.Select(i => Evaluation.MathPrompt.Format(i.Instruction, i.Input)).ToArray()
            : IO.TextInputs.Read(path);
        if (texts.Count == 0) throw new InvalidDataException($"{path}: the file holds no prompts");
        return limit is int n ? texts.Take(n).ToArray() : texts;
    }

    /// <summary>Built-in prompts: short arithmetic word problems, in the style of the built-in training corpus.</summary>
    public static IReadOnlyList<string> DefaultPrompts { get; } =
    [
        "Tom has 12 apples. He buys 7 more apples at the shop. How many apples does Tom have now? Answer:",
        "A baker made 36 loaves of bread and sold 19 of them in the morning. How many loaves are left? Answer:",
        "There are 4 boxes with 6 pencils in each box. How many pencils are there in all? Answer:",
        "Lily read 15 pages on Monday and twice as many on Tuesday. How many pages did she read on Tuesday? Answer:",
        "A farmer has 48 sheep and puts them into 8 equal groups. How many sheep are in each group? Answer:",
        "The train left with 120 people. At the first stop 35 got off and 12 got on. How many people are on the train? Answer:",
    ];

    /// <summary>About a quarter, half and three quarters of the layers (distinct, at least 1, below the layer count).</summary>
    public static IReadOnlyList<int> DefaultExitLayers(int layers)
    {
        if (layers < 2) return [1];
        return new[] { layers / 4, layers / 2, 3 * layers / 4 }.Select(e => Math.Clamp(e, 1, layers - 1)).Distinct().ToArray();
    }

    /// <summary>Runs the sweep. <paramref name="progress"/> gets one line per measured setting.</summary>
    public static SpeculativeSweepResult Run(CausalLM model, IReadOnlyList<IReadOnlyList<int>> prompts, SpeculativeSweepOptions? options = null,
        Action<string>? progress = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(prompts);
        options ??= new SpeculativeSweepOptions();
        int layers = model.NumLayers;
        var exits = options.ExitLayers ?? DefaultExitLayers(layers);
        if (prompts.Count == 0) throw new ArgumentException("no prompts given");
        if (exits.Count == 0) throw new ArgumentException("no exit layers given");
        if (options.NumSpeculations.Count == 0) throw new ArgumentException("no draft lengths given");
        foreach (var e in exits)
            if (e < 1 || e > layers) throw new ArgumentException($"exit layer {e} is outside 1..{layers} (the model has {layers} layers)");
        foreach (var k in options.NumSpeculations)
            if (k < 1) throw new ArgumentException($"number of speculations must be at least 1, got {k}");
        if (options.MaxNewTokens < 1) throw new ArgumentException($"MaxNewTokens must be at least 1, got {options.MaxNewTokens}");
        if (options.Repeats < 1) throw new ArgumentException($"Repeats must be at least 1, got {options.Repeats}");

        var generator = new TextGenerator(model);
        var greedy = new GenerationOptions { MaxNewTokens = options.MaxNewTokens, StopTokenIds = options.StopTokenIds };
        // Warm-up: the first calls pay for lazy initialisation (allocator, kernels, the verification weights' panel copy
        // from the lowest exit layer up) in both code paths.
        generator.Generate([prompts[0]], greedy with { MaxNewTokens = Math.Min(8, options.MaxNewTokens) });
        generator.Generate([prompts[0]], greedy with
        {
            MaxNewTokens = Math.Min(8, options.MaxNewTokens), Strategy = DecodingStrategyKind.SelfSpeculative, ExitLayer = exits.Min(), NumSpeculations = 2,
            PackVerificationWeights = options.PackVerificationWeights,
        });

        var (baseline, baselineTokens, _) = Measure(generator, prompts, greedy, options.Repeats, cancellationToken);
        long generated = baselineTokens.Sum(t => (long)t.Count);
        progress?.Invoke($"autoregressive: {baseline.Speed:F1} tok/s ({generated} tokens over {prompts.Count} prompts)");

        // Paired measurements: each timed pass of a setting follows a pass of the baseline, and the speed-up is the
        // median of the pairs' ratios. On a busy machine the speed drifts by large factors within seconds; pairs see
        // (nearly) the same conditions, so their ratio is far steadier than either speed.
        double bestBaseline = baseline.Speed;
        var points = new List<SpeculativeSweepPoint>();
        foreach (var exit in exits)
            foreach (var k in options.NumSpeculations)
            {
                var speculative = greedy with
                {
                    Strategy = DecodingStrategyKind.SelfSpeculative, ExitLayer = exit, NumSpeculations = k, DraftVocabulary = options.DraftVocabulary,
                    DraftConfidenceThreshold = options.DraftConfidenceThreshold, PackVerificationWeights = options.PackVerificationWeights,
                };
                var ratios = new List<double>(options.Repeats);
                Timing best = default;
                double rate = 0;
                int[] mismatched = [];
                for (int r = 0; r < options.Repeats; r++)
                {
                    var (reference, _, _) = Measure(generator, prompts, greedy, 1, cancellationToken);
                    var (measured, tokens, passRate) = Measure(generator, prompts, speculative, 1, cancellationToken);
                    bestBaseline = Math.Max(bestBaseline, reference.Speed);
                    if (reference.Speed > 0) ratios.Add(measured.Speed / reference.Speed);
                    if (r == 0 || measured.Speed > best.Speed) best = measured;
                    rate = passRate;
                    mismatched = Enumerable.Range(0, prompts.Count).Where(i => !tokens[i].SequenceEqual(baselineTokens[i])).ToArray();
                }
                var point = new SpeculativeSweepPoint(exit, k, best.Speed, Median(ratios), rate, TokensPerRound(best), mismatched.Length == 0, mismatched);
                points.Add(point);
                progress?.Invoke($"E={exit} K={k}: {point.TokensPerSecond:F1} tok/s, {point.Speedup:F2}x, acceptance {100 * rate:F0}%, {point.TokensPerRound:F2} tokens/round" +
                                 (mismatched.Length == 0 ? "" : $", OUTPUT DIFFERS for prompt(s) {string.Join(", ", mismatched)}"));
            }
        return new SpeculativeSweepResult(layers, prompts.Count, generated, bestBaseline, points);
    }

    private static double Median(List<double> values)
    {
        if (values.Count == 0) return 0;
        values.Sort();
        int mid = values.Count / 2;
        return values.Count % 2 == 1 ? values[mid] : (values[mid - 1] + values[mid]) / 2;
    }

    private static double TokensPerRound(Timing t) => t.Steps > 0 ? (double)t.Tokens / t.Steps : 0;

    private readonly record struct Timing(double Speed, long Tokens, long Steps);

    /// <summary>Generates every prompt alone <paramref name="repeats"/> times; the fastest pass counts.</summary>
    private static (Timing Best, IReadOnlyList<int>[] Tokens, double AcceptanceRate) Measure(TextGenerator generator,
        IReadOnlyList<IReadOnlyList<int>> prompts, GenerationOptions options, int repeats, CancellationToken cancellationToken)
    {
        var tokens = new IReadOnlyList<int>[prompts.Count];
        Timing best = default;
        double rate = 0;
        for (int r = 0; r < repeats; r++)
        {
            double seconds = 0;
            long decodeTokens = 0, steps = 0, drafted = 0, accepted = 0;
            for (int i = 0; i < prompts.Count; i++)
            {
                var result = generator.Generate([prompts[i]], options, cancellationToken);
                tokens[i] = result.Sequences[0].Tokens;
                seconds += result.Stats.DecodeTime.TotalSeconds;
                decodeTokens += result.Stats.DecodeTokens;
                steps += result.Stats.DecodeSteps;
                drafted += result.Stats.DraftedTokens;
                accepted += result.Stats.AcceptedDraftTokens;
            }
            var timing = new Timing(seconds > 0 ? decodeTokens / seconds : 0, decodeTokens, steps);
            if (timing.Speed > best.Speed || r == 0) best = timing;
            rate = drafted > 0 ? (double)accepted / drafted : 0;
        }
        return (best, tokens, rate);
    }
}

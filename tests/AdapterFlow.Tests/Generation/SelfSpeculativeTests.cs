using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using AdapterFlow.Adapters;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.Adapters.PrefixTuning;
using AdapterFlow.Adapters.PromptTuning;
using AdapterFlow.Generation;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Generation;

/// <summary>
/// Early-exit and self-speculative decoding (LayerSkip) on tiny random models: greedy self-speculative output equals
/// autoregressive output token for token (families, exit layers, draft lengths, budgets, stop tokens inside drafts,
/// padded batches, logits processors, adapters), sampling keeps the autoregressive distribution, and the stats.
/// </summary>
public class SelfSpeculativeTests
{
    private const int Layers = 4;

    /// <summary>
    /// A tiny model of <paramref name="family"/> whose layers after the first are damped, so that early exits agree
    /// with the full model often but not always: rounds then accept some drafts and reject others.
    /// </summary>
    internal static CausalLM Model(string family, int layers = Layers, int vocab = 96, double damp = 0.5, int seed = 7)
    {
        var json = family switch
        {
            "llama" => $$"""{"model_type": "llama", "vocab_size": {{vocab}}, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": {{layers}}, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "initializer_range": 0.2}""",
            "gpt2" => $$"""{"model_type": "gpt2", "vocab_size": {{vocab}}, "n_embd": 32, "n_layer": {{layers}}, "n_head": 4, "n_positions": 128, "initializer_range": 0.2}""",
            "bloom" => $$"""{"model_type": "bloom", "vocab_size": {{vocab}}, "hidden_size": 32, "n_layer": {{layers}}, "n_head": 4, "initializer_range": 0.2}""",
            _ => throw new ArgumentException(family),
        };
        var model = AutoModel.FromConfig(AutoModel.ParseConfig((JsonObject)JsonNode.Parse(json)!, family), seed: seed);
        model.eval();
        var layerIndex = new Regex(@"\.(?:layers|h)\.(\d+)\.");
        using (torch.no_grad())
            foreach (var (name, p) in model.named_parameters())
                if (p.dim() == 2 && layerIndex.Match(name) is { Success: true } m && int.Parse(m.Groups[1].Value) >= 1)
                    p.mul_(damp);
        return model;
    }

    internal static IReadOnlyList<IReadOnlyList<int>> Prompts(int count, int seed, int vocab = 96)
    {
        var random = new Random(seed);
        return Enumerable.Range(0, count)
            .Select(_ => (IReadOnlyList<int>)Enumerable.Range(0, random.Next(2, 10)).Select(_ => random.Next(3, vocab)).ToArray())
            .ToArray();
    }

    private static GenerationOptions Speculative(GenerationOptions o, int exit, int k) =>
        o with { Strategy = DecodingStrategyKind.SelfSpeculative, ExitLayer = exit, NumSpeculations = k };

    private static void AssertSameOutput(GenerationResult expected, GenerationResult actual, string setting)
    {
        Assert.Equal(expected.Sequences.Count, actual.Sequences.Count);
        for (int r = 0; r < expected.Sequences.Count; r++)
        {
            Assert.True(expected.Sequences[r].Tokens.SequenceEqual(actual.Sequences[r].Tokens),
                $"{setting}, row {r}: expected [{string.Join(",", expected.Sequences[r].Tokens)}], got [{string.Join(",", actual.Sequences[r].Tokens)}]");
            Assert.Equal(expected.Sequences[r].FinishReason, actual.Sequences[r].FinishReason);
        }
    }

    /// <summary>Greedy self-speculative decoding over every exit layer and several draft lengths equals autoregressive decoding.</summary>
    private static (double MinRate, double MaxRate) AssertGreedyMatches(CausalLM model, IReadOnlyList<IReadOnlyList<int>> prompts, GenerationOptions options, string label)
    {
        var generator = new TextGenerator(model);
        var expected = generator.Generate(prompts, options);
        double min = 1, max = 0;
        for (int exit = 1; exit <= model.NumLayers; exit++)
            foreach (var k in new[] { 1, 2, 3, 5, options.MaxNewTokens + 3 })
            {
                var result = generator.Generate(prompts, Speculative(options, exit, k));
                AssertSameOutput(expected, result, $"{label}: exit {exit}, K {k}");
                var rate = result.Stats.AcceptanceRate;
                if (rate is double r)
                {
                    min = Math.Min(min, r);
                    max = Math.Max(max, r);
                }
            }
        return (min, max);
    }

    [Theory]
    [InlineData("llama")]
    [InlineData("gpt2")]
    [InlineData("bloom")]
    public void GreedyEqualsAutoregressiveForPaddedBatches(string family)
    {
        // BLOOM's late layers matter less in this tiny random model: leave them undamped.
        using var model = Model(family, damp: family == "bloom" ? 1.0 : 0.5);
        var (min, max) = AssertGreedyMatches(model, Prompts(5, seed: 11), new GenerationOptions { MaxNewTokens = 12, StopTokenIds = [] }, family);
        // The damped model makes rounds that accept and rounds that reject: both paths were exercised.
        Assert.True(min < 0.9 && max > 0.3, $"{family}: acceptance rates {min:F2}..{max:F2} do not exercise both accepting and rejecting");
    }

    [Theory]
    [InlineData("llama", 1)]
    [InlineData("llama", 2)]
    [InlineData("gpt2", 1)]
    public void GreedyEqualsAutoregressiveForSinglePromptsAndTinyBudgets(string family, int budget)
    {
        using var model = Model(family);
        foreach (var prompt in Prompts(3, seed: 5))
            AssertGreedyMatches(model, [prompt], new GenerationOptions { MaxNewTokens = budget, StopTokenIds = [] }, $"{family}, budget {budget}");
        foreach (var prompt in Prompts(3, seed: 6))
            AssertGreedyMatches(model, [prompt], new GenerationOptions { MaxNewTokens = 9, StopTokenIds = [] }, $"{family}, one prompt");
    }

    [Theory]
    [InlineData("llama")]
    [InlineData("bloom")]
    public void StopTokenInsideADraftEndsOnlyItsRow(string family)
    {
        using var model = Model(family);
        var prompts = Prompts(6, seed: 21);
        var plain = new GenerationOptions { MaxNewTokens = 14, StopTokenIds = [] };
        // The model's favourite token becomes the stop token: drafts will contain it, and rows end at different times.
        var free = new TextGenerator(model).Generate(prompts, plain);
        int stop = free.Sequences.SelectMany(s => s.Tokens).GroupBy(t => t).MaxBy(g => g.Count())!.Key;
        var options = plain with { StopTokenIds = [stop] };
        var expected = new TextGenerator(model).Generate(prompts, options);
        var lengths = expected.Sequences.Select(s => s.Tokens.Count).ToArray();
        Assert.Contains(expected.Sequences, s => s.FinishReason == FinishReason.StopToken);
        Assert.True(lengths.Distinct().Count() > 1, "rows should end at different times");
        AssertGreedyMatches(model, prompts, options, $"{family}, stop token {stop}");
    }

    [Fact]
    public void PrefixDependentProcessorsSeeEachPositionsOwnPrefix()
    {
        // Repetition penalty reads the prefix (drafts included), min-new-tokens the position: both differ per draft position.
        using var model = Model("llama");
        var prompts = Prompts(4, seed: 31);
        var free = new TextGenerator(model).Generate(prompts, new GenerationOptions { MaxNewTokens = 10, StopTokenIds = [] });
        int stop = free.Sequences.SelectMany(s => s.Tokens).GroupBy(t => t).MaxBy(g => g.Count())!.Key;
        AssertGreedyMatches(model, prompts, new GenerationOptions { MaxNewTokens = 10, StopTokenIds = [stop], RepetitionPenalty = 1.8, MinNewTokens = 4 }, "penalties");
    }

    [Fact]
    public async Task StopStringsAndStreamingWork()
    {
        using var model = Model("llama", vocab: ByteTokenizer.Size);
        var tokenizer = new ByteTokenizer();
        var generator = new TextGenerator(model, tokenizer);
        var prompts = Prompts(3, seed: 41, vocab: ByteTokenizer.Size);
        var plain = new GenerationOptions { MaxNewTokens = 12, StopTokenIds = [] };
        var free = generator.Generate(prompts, plain);
        // A stop string from the middle of row 0's text.
        var text = free.Sequences[0].Text!;
        var stopString = text.Substring(text.Length / 2, Math.Min(2, text.Length - text.Length / 2));
        var options = plain with { StopStrings = [stopString] };
        var expected = generator.Generate(prompts, options);
        Assert.Equal(FinishReason.StopString, expected.Sequences[0].FinishReason);
        var speculative = Speculative(options, 2, 4);
        var result = generator.Generate(prompts, speculative);
        AssertSameOutput(expected, result, "stop string");
        for (int r = 0; r < prompts.Count; r++) Assert.Equal(expected.Sequences[r].Text, result.Sequences[r].Text);

        // Streaming yields the same tokens, each row's text pieces add up to its text.
        var stream = generator.StreamAsync(prompts, speculative);
        var streamed = Enumerable.Range(0, prompts.Count).Select(_ => new List<int>()).ToArray();
        var pieces = Enumerable.Range(0, prompts.Count).Select(_ => "").ToArray();
        await foreach (var token in stream)
        {
            streamed[token.Row].Add(token.TokenId);
            pieces[token.Row] += token.Text;
        }
        for (int r = 0; r < prompts.Count; r++)
        {
            Assert.Equal(expected.Sequences[r].Tokens, streamed[r]);
            Assert.Equal(expected.Sequences[r].Text, pieces[r]);
        }
        Assert.NotNull(stream.Result!.Stats.AcceptanceRate);
    }

    public static TheoryData<string> AdapterMethods => new() { "lora", "prefix", "prompt" };

    [Theory]
    [MemberData(nameof(AdapterMethods))]
    public void GreedyEqualsAutoregressiveWithAdapters(string method)
    {
        using var model = Model("llama");
        PeftConfig config = method switch
        {
            "lora" => new LoraConfig { R = 4, LoraAlpha = 8, InitLoraWeights = LoraInit.Random, TargetModules = ModuleSelector.Pattern(ModuleSelector.AllLinear) },
            "prefix" => new PrefixTuningConfig { NumVirtualTokens = 3 },
            _ => new PromptTuningConfig { NumVirtualTokens = 3 },
        };
        var prompts = Prompts(3, seed: 51);
        var options = new GenerationOptions { MaxNewTokens = 8, StopTokenIds = [] };
        var without = new TextGenerator(model).Generate(prompts, options);
        using var peft = PeftModel.Create(model, config);
        peft.eval();
        // The adapter changes the output (so the test covers its path), and decoding with it stays exact.
        var withAdapter = new TextGenerator(peft).Generate(prompts, options);
        Assert.NotEqual(without.Sequences.Select(s => string.Join(",", s.Tokens)), withAdapter.Sequences.Select(s => string.Join(",", s.Tokens)));
        AssertGreedyMatches(peft, prompts, options, method);
    }

    [Theory]
    [InlineData("llama")]
    [InlineData("gpt2")]
    public void EarlyExitEqualsAManualExitLayerLoop(string family)
    {
        using var model = Model(family);
        var prompts = Prompts(3, seed: 61);
        var generator = new TextGenerator(model);
        for (int exit = 1; exit <= model.NumLayers; exit++)
        {
            var result = generator.Generate(prompts, new GenerationOptions { MaxNewTokens = 7, StopTokenIds = [], Strategy = DecodingStrategyKind.EarlyExit, ExitLayer = exit });
            for (int r = 0; r < prompts.Count; r++)
            {
                var tokens = prompts[r].Select(i => (long)i).ToList();
                for (int step = 0; step < 7; step++)
                {
                    using var scope = torch.NewDisposeScope();
                    using var no = torch.no_grad();
                    var logits = model.forward(new ForwardInput { InputIds = torch.tensor(tokens.ToArray()).unsqueeze(0), ExitLayer = exit }).Logits;
                    tokens.Add(logits[0, -1].argmax().item<long>());
                }
                Assert.Equal(tokens.Skip(prompts[r].Count).Select(i => (int)i), result.Sequences[r].Tokens);
            }
            Assert.Null(result.Stats.AcceptanceRate);
        }
        // Exiting early changes the output of this model (the strategy really skips layers).
        var full = generator.Generate(prompts, new GenerationOptions { MaxNewTokens = 7, StopTokenIds = [] });
        var early = generator.Generate(prompts, new GenerationOptions { MaxNewTokens = 7, StopTokenIds = [], Strategy = DecodingStrategyKind.EarlyExit, ExitLayer = 1 });
        Assert.NotEqual(full.Sequences.Select(s => string.Join(",", s.Tokens)), early.Sequences.Select(s => string.Join(",", s.Tokens)));
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void AcceptanceRateIsOneWhenTheDraftIsTheFullModel(bool sample)
    {
        using var model = Model("llama");
        var options = Speculative(new GenerationOptions { MaxNewTokens = 11, StopTokenIds = [], DoSample = sample, Seed = 3, TopK = 0 }, Layers, 3);
        var stats = new TextGenerator(model).Generate(Prompts(3, seed: 71), options).Stats;
        Assert.True(stats.DraftedTokens > 0);
        Assert.Equal(stats.DraftedTokens, stats.AcceptedDraftTokens);
        Assert.Equal(1.0, stats.AcceptanceRate);
        // Every round yields K + 1 tokens: 10 tokens after the first in rounds of 4, 4, then 2 (the budget).
        Assert.Equal(3, stats.DecodeSteps);
        Assert.Equal(30, stats.DecodeTokens);
    }

    [Fact]
    public void StatsCountDraftsAndRounds()
    {
        using var model = Model("llama");
        var prompts = Prompts(2, seed: 81);
        var result = new TextGenerator(model).Generate(prompts, Speculative(new GenerationOptions { MaxNewTokens = 12, StopTokenIds = [] }, 1, 4));
        var stats = result.Stats;
        Assert.True(stats.DraftedTokens > 0 && stats.AcceptedDraftTokens <= stats.DraftedTokens);
        Assert.InRange(stats.AcceptanceRate!.Value, 0, 1);
        Assert.Equal(2 * 11, stats.DecodeTokens);
        // Fewer rounds than tokens exactly when some drafts were used.
        Assert.True(stats.DecodeSteps <= 11);
        Assert.True(stats.GenerationTokensPerSecond > 0);
        Assert.Null(new TextGenerator(model).Generate(prompts, new GenerationOptions { MaxNewTokens = 4 }).Stats.AcceptanceRate);
    }

    [Fact]
    public void SameSeedSameSampleAndNoTensorsLeak()
    {
        using var model = Model("llama");
        var generator = new TextGenerator(model);
        var prompts = Prompts(3, seed: 91);
        var options = Speculative(new GenerationOptions { MaxNewTokens = 10, StopTokenIds = [], DoSample = true, Seed = 5 }, 2, 3);
        var first = generator.Generate(prompts, options);
        long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        var second = generator.Generate(prompts, options);
        Assert.Equal(before, DisposeScopeManager.Statistics.ThreadTotalLiveCount);
        AssertSameOutput(first, second, "same seed");
        var other = generator.Generate(prompts, options with { Seed = 6 });
        Assert.NotEqual(first.Sequences.Select(s => string.Join(",", s.Tokens)), other.Sequences.Select(s => string.Join(",", s.Tokens)));
    }

    [Fact]
    public void BadSettingsAreRejected()
    {
        using var model = Model("llama");
        var generator = new TextGenerator(model);
        var prompt = Prompts(1, seed: 1);
        var o = new GenerationOptions { MaxNewTokens = 3 };
        Assert.Contains("ExitLayer", Assert.Throws<ArgumentException>(() => generator.Generate(prompt, o with { Strategy = DecodingStrategyKind.SelfSpeculative })).Message);
        Assert.Contains("ExitLayer 5", Assert.Throws<ArgumentException>(() => generator.Generate(prompt, Speculative(o, 5, 2))).Message);
        Assert.Contains("NumSpeculations", Assert.Throws<ArgumentException>(() => generator.Generate(prompt, Speculative(o, 2, 0))).Message);
        Assert.Contains("beam", Assert.Throws<ArgumentException>(() => generator.Generate(prompt, Speculative(o, 2, 2) with { NumBeams = 2 })).Message);
    }

    [Fact]
    public void GenerationConfigAssistantEarlyExitSelectsSelfSpeculativeDecoding()
    {
        var dir = Path.Combine(Path.GetTempPath(), "adapterflow-spec-" + Guid.NewGuid().ToString("N")[..8]);
        Directory.CreateDirectory(dir);
        try
        {
            File.WriteAllText(Path.Combine(dir, "generation_config.json"), """{"assistant_early_exit": 3, "num_assistant_tokens": 5}""");
            var options = GenerationOptions.FromGenerationConfig(dir);
            Assert.Equal(DecodingStrategyKind.SelfSpeculative, options.Strategy);
            Assert.Equal(3, options.ExitLayer);
            Assert.Equal(5, options.NumSpeculations);
        }
        finally
        {
            Directory.Delete(dir, true);
        }
    }

    [Fact]
    public void Sweep_prompts_come_from_math_sets_as_evaluation_prompts_from_jsonl_texts_or_from_lines()
    {
        var dir = Path.Combine(Path.GetTempPath(), "adapterflow-spec-" + Guid.NewGuid().ToString("N")[..8]);
        Directory.CreateDirectory(dir);
        try
        {
            string math = Path.Combine(dir, "set.json"), texts = Path.Combine(dir, "p.jsonl"), lines = Path.Combine(dir, "p.txt"), empty = Path.Combine(dir, "e.txt");
            File.WriteAllText(math, """[{"instruction": "What is 2 + 3?", "input": "", "output": "5", "answer": "5"}, {"instruction": "What is 4 + 4?", "input": "", "output": "8", "answer": "8"}]""");
            File.WriteAllText(texts, "{\"text\": \"one\\ntwo\"}\n\n{\"text\": \"three\"}\n");
            File.WriteAllLines(lines, ["a", "b", "c"]);
            File.WriteAllText(empty, "");
            var prompts = SpeculativeSweep.ReadPrompts(math);
            Assert.Equal([AdapterFlow.Evaluation.MathPrompt.Format("What is 2 + 3?"), AdapterFlow.Evaluation.MathPrompt.Format("What is 4 + 4?")], prompts);
            Assert.Single(SpeculativeSweep.ReadPrompts(math, limit: 1));
            Assert.Equal(["one\ntwo", "three"], SpeculativeSweep.ReadPrompts(texts));
            Assert.Equal(["a", "b"], SpeculativeSweep.ReadPrompts(lines, limit: 2));
            Assert.Contains("e.txt", Assert.Throws<InvalidDataException>(() => SpeculativeSweep.ReadPrompts(empty)).Message);
        }
        finally
        {
            Directory.Delete(dir, true);
        }
    }

    /// <summary>
    /// Sampling keeps the target distribution: the joint distribution of the first three new tokens (the second and third
    /// come from a speculative round: drafted, accepted or resampled) matches the exact autoregressive one, computed by
    /// enumerating every prefix of a 6-token vocabulary, under a chi-square test at p ≈ 3·10⁻⁷ (z = 5), so it cannot
    /// flake. Checked for one batch of many rows (rounds cut short by other rows) and for 500 batches of 4 (rounds that
    /// accept several drafts). The same test rejects plain early-exit sampling (the draft's own distribution), which
    /// shows it has the power to catch a wrong acceptance rule.
    /// </summary>
    [Fact]
    public void SamplingKeepsTheAutoregressiveDistribution()
    {
        const int vocab = 6;
        using var model = Model("llama", layers: 3, vocab: vocab, damp: 0.6, seed: 3);
        int[] prompt = [1, 4, 2];
        var options = new GenerationOptions
        {
            MaxNewTokens = 4, StopTokenIds = [], DoSample = true, Temperature = 0.9, TopK = 5, RepetitionPenalty = 1.3,
        };
        var exact = ExactFirstTokens(model, prompt, options, 3);
        var generator = new TextGenerator(model);
        var speculative = Speculative(options, 1, 2);

        var oneBatch = generator.Generate([prompt], speculative with { NumReturnSequences = 6000, Seed = 1 });
        var (statBatch, limitBatch) = ChiSquare(Histogram(oneBatch, vocab), exact);
        Assert.True(statBatch < limitBatch, $"one batch of 6000 rows: chi-square {statBatch:F1} above {limitBatch:F1}");

        // A draft head over part of the vocabulary (0 and 3, plus the prompt's 1, 4, 2; 5 only once some row writes it):
        // q is zero outside it, and the output distribution must not change.
        var restricted = generator.Generate([prompt], speculative with { NumReturnSequences = 6000, Seed = 2, DraftVocabulary = new DraftVocabulary([0, 3]) });
        var (statRestricted, limitRestricted) = ChiSquare(Histogram(restricted, vocab), exact);
        Assert.True(statRestricted < limitRestricted, $"draft vocabulary, 6000 rows: chi-square {statRestricted:F1} above {limitRestricted:F1}");

        var small = new List<GeneratedSequence>();
        double rate = 0;
        for (int seed = 0; seed < 500; seed++)
        {
            var result = generator.Generate([prompt], speculative with { NumReturnSequences = 4, Seed = 100 + seed });
            small.AddRange(result.Sequences);
            rate += result.Stats.AcceptanceRate ?? 0;
        }
        var (statSmall, limitSmall) = ChiSquare(Histogram(new GenerationResult(small, new GenerationStats()), vocab), exact);
        Assert.True(statSmall < limitSmall, $"500 batches of 4: chi-square {statSmall:F1} above {limitSmall:F1}");
        rate /= 500;
        Assert.InRange(rate, 0.2, 0.95); // drafts are accepted and rejected: both paths are in the sample

        var draftOnly = generator.Generate([prompt], options with { NumReturnSequences = 6000, Seed = 1, Strategy = DecodingStrategyKind.EarlyExit, ExitLayer = 1 });
        var (statDraft, limitDraft) = ChiSquare(Histogram(draftOnly, vocab), exact);
        Assert.True(statDraft > 3 * limitDraft, $"the test should reject the draft's distribution: chi-square {statDraft:F1}, limit {limitDraft:F1}");
    }

    /// <summary>Counts of (t1, t2, t3) as index t1·V² + t2·V + t3.</summary>
    private static long[] Histogram(GenerationResult result, int vocab)
    {
        var counts = new long[vocab * vocab * vocab];
        foreach (var s in result.Sequences) counts[(s.Tokens[0] * vocab + s.Tokens[1]) * vocab + s.Tokens[2]]++;
        return counts;
    }

    /// <summary>
    /// Exact probabilities of the first <paramref name="depth"/> new tokens (index t1·V^(depth−1) + ...) under the
    /// full model and the session's logits processors, from one uncached forward per prefix.
    /// </summary>
    private static double[] ExactFirstTokens(CausalLM model, int[] prompt, GenerationOptions options, int depth)
    {
        int vocab = model.Config.VocabSize;
        var processors = LogitsProcessorList.FromOptions(options, []);
        var probabilities = new List<(List<int> Tokens, double P)> { (new List<int>(prompt), 1.0) };
        for (int step = 0; step < depth; step++)
        {
            var next = new List<(List<int>, double)>();
            foreach (var (tokens, p) in probabilities)
            {
                using var scope = torch.NewDisposeScope();
                using var no = torch.no_grad();
                var ids = torch.tensor(tokens.Select(t => (long)t).ToArray()).unsqueeze(0);
                var scores = model.forward(new ForwardInput { InputIds = ids }).Logits.select(1, -1).to_type(ScalarType.Float32);
                var dist = processors.Process(scores, ids, step).softmax(-1).to_type(ScalarType.Float64).data<double>().ToArray();
                for (int t = 0; t < vocab; t++) next.Add((new List<int>(tokens) { t }, p * dist[t]));
            }
            probabilities = next;
        }
        return probabilities.Select(x => x.P).ToArray();
    }

    /// <summary>
    /// Pearson's chi-square (cells expecting fewer than 5 pooled) and its 1 − 3·10⁻⁷ quantile (Wilson–Hilferty, z = 5);
    /// infinite when an outcome of probability 0 was drawn.
    /// </summary>
    private static (double Statistic, double Limit) ChiSquare(long[] counts, double[] probabilities)
    {
        long n = counts.Sum();
        double statistic = 0, pooledExpected = 0;
        long pooledObserved = 0;
        int bins = 0;
        for (int i = 0; i < counts.Length; i++)
        {
            double expected = probabilities[i] * n;
            if (probabilities[i] == 0 && counts[i] > 0) return (double.PositiveInfinity, 0); // an impossible outcome was drawn
            if (expected >= 5)
            {
                statistic += (counts[i] - expected) * (counts[i] - expected) / expected;
                bins++;
            }
            else
            {
                pooledExpected += expected;
                pooledObserved += counts[i];
            }
        }
        if (pooledExpected > 0)
        {
            statistic += (pooledObserved - pooledExpected) * (pooledObserved - pooledExpected) / pooledExpected;
            bins++;
        }
        int df = bins - 1;
        double limit = df * Math.Pow(1 - 2.0 / (9 * df) + 5 * Math.Sqrt(2.0 / (9 * df)), 3);
        return (statistic, limit);
    }
}

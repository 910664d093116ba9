using System.Text.Json.Nodes;
using Xunit.Abstractions;
using AdapterFlow.Adapters;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.Adapters.PromptTuning;
using AdapterFlow.Models;
using AdapterFlow.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Training;

/// <summary>LayerSkip training on tiny models: layer dropout in the forward pass, the early-exit loss and the trainer.</summary>
[Collection(GlobalTorchRngCollection.Name)]
public sealed class LayerSkipTrainingTests(ITestOutputHelper log) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("af-layerskip-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private const int Vocab = 64;
    private static readonly Collator Collate = new(padTokenId: 0);

    /// <summary>A 4-layer llama small enough to train in a second.</summary>
    internal static CausalLM Deep(long seed = 1, int layers = 4) => AutoModel.FromConfig(AutoModel.ParseConfig(new JsonObject
    {
        ["model_type"] = "llama",
        ["vocab_size"] = Vocab,
        ["hidden_size"] = 32,
        ["intermediate_size"] = 64,
        ["num_hidden_layers"] = layers,
        ["num_attention_heads"] = 4,
        ["num_key_value_heads"] = 2,
        ["max_position_embeddings"] = 64,
        ["initializer_range"] = 0.05,
    }, "deep tiny config.json"), seed);

    private static bool[] SkippedRows(Tensor before, Tensor after) =>
        before.eq(after).flatten(1).all(1).cpu().data<bool>().ToArray();

    [Fact]
    public void Measured_skip_frequency_per_layer_matches_the_schedule_and_draws_are_independent()
    {
        using var scope = NewDisposeScope();
        using var model = Deep();
        var rates = new LayerDropoutSchedule(new LayerDropoutOptions(0.6), 4, 10).RatesAt(0);
        Assert.Equal(0.0, rates[0]);
        const int rows = 4000;
        torch.manual_seed(7);
        var ids = randint(1, Vocab, [rows, 3]);
        model.train();
        ForwardOutput output;
        using (no_grad()) output = model.forward(new ForwardInput { InputIds = ids, LayerDropout = rates, OutputHiddenStates = true });
        model.eval();
        var states = output.HiddenStates!;
        var skipped = Enumerable.Range(0, 4).Select(l => SkippedRows(states[l], states[l + 1])).ToArray();
        for (int l = 0; l < 4; l++)
        {
            double frequency = skipped[l].Count(s => s) / (double)rows;
            double sigma = Math.Sqrt(rates[l] * (1 - rates[l]) / rows);
            Assert.True(Math.Abs(frequency - rates[l]) <= 4 * sigma + 1e-12, $"layer {l}: skipped {frequency:F4} of rows, rate {rates[l]:F4}");
        }
        // Layers are drawn independently: both of the last two skipped ≈ p2·p3.
        double both = Enumerable.Range(0, rows).Count(r => skipped[2][r] && skipped[3][r]) / (double)rows;
        double expected = rates[2] * rates[3];
        Assert.True(Math.Abs(both - expected) <= 4 * Math.Sqrt(expected * (1 - expected) / rows), $"joint skip {both:F4}, expected {expected:F4}");
    }

    [Fact]
    public void Layer_dropout_is_identity_in_eval_and_draws_nothing()
    {
        using var scope = NewDisposeScope();
        using var model = Deep();
        model.eval();
        var rates = new LayerDropoutSchedule(new LayerDropoutOptions(0.9, LayerDropoutScale.Uniform), 4, 10).RatesAt(0);
        var ids = randint(1, Vocab, [8, 5], generator: new Generator(3));
        using var noGrad = no_grad();
        var rngBefore = torch.get_rng_state().data<byte>().ToArray();
        var plain = model.forward(new ForwardInput { InputIds = ids }).Logits;
        var withRates = model.forward(new ForwardInput { InputIds = ids, LayerDropout = rates }).Logits;
        Assert.True(plain.equal(withRates).all().item<bool>());
        Assert.Equal(rngBefore, torch.get_rng_state().data<byte>().ToArray());
        // The same rates in training mode do change the output (so the check above could fail).
        model.train();
        var trained = model.forward(new ForwardInput { InputIds = ids, LayerDropout = rates }).Logits;
        model.eval();
        Assert.False(plain.equal(trained).all().item<bool>());
    }

    private static CausalLM WithMethod(CausalLM model, string method) => method switch
    {
        "full" => model,
        "lora" => PeftModel.Create(model, new LoraConfig { R = 4, LoraAlpha = 8, TargetModules = ModuleSelector.Pattern(ModuleSelector.AllLinear) }),
        "prompt" => PeftModel.Create(model, new PromptTuningConfig { NumVirtualTokens = 3 }),
        _ => throw new ArgumentException(method),
    };

    [Theory]
    [InlineData("full")]
    [InlineData("lora")]
    [InlineData("prompt")]
    public void Lean_backward_gives_the_losses_and_gradients_of_the_whole_early_exit_loss(string method)
    {
        using var scope = NewDisposeScope();
        using var baseModel = Deep();
        var model = WithMethod(baseModel, method);
        model.eval();
        var trainable = model.parameters().Where(p => p.requires_grad).ToArray();
        using var batch = Collate.Collate(TrainerTests.Examples(3));
        // Rotational R = 2 at step 1: layers 1 and 3 only.
        var weights = new EarlyExitSchedule(new EarlyExitOptions(EarlyExitScale.Linear, EarlyExitCurriculum.Rotational, Rotation: 2), 4, 10).WeightsAt(1);
        Assert.Equal(new[] { 0, 2 / 6.0, 0, 4 / 6.0 }, weights);
        const double divisor = 7;
        ForwardOutput Forward() => model.forward(new ForwardInput { InputIds = batch.InputIds, AttentionMask = batch.AttentionMask, OutputHiddenStates = true });

        var whole = EarlyExitLoss.Compute(model, Forward(), batch.Labels, weights, divisor);
        whole.backward();
        var expected = trainable.Select(p => p.grad!.clone()).ToArray();
        foreach (var p in trainable) p.grad!.zero_();

        var output = Forward();
        var losses = EarlyExitLoss.Backward(model, output, batch.Labels, weights, divisor);
        // Relative 1e-6: the two passes may sum in different orders (a float32 ulp at 16 is 2e-6, so "5 decimal places" flaked).
        Assert.Equal(whole.item<float>(), losses.Weighted.item<float>(), 1e-6 * Math.Abs(whole.item<float>()) + 1e-6);
        var lastLogits = output.Logits[.., ^(int)batch.Labels.shape[1]..];
        var last = CausalLMLoss.Sum(lastLogits, batch.Labels).item<float>() / divisor;
        Assert.Equal(last, losses.LastLayer.item<float>(), 1e-6 * Math.Abs(last) + 1e-6);
        var perLayer = losses.PerLayer.data<float>().ToArray();
        Assert.Equal(0f, perLayer[0]);
        Assert.Equal(0f, perLayer[2]);
        Assert.True(perLayer[1] > 0 && perLayer[3] > 0);
        Assert.Equal(losses.Weighted.item<float>(), weights[1] * perLayer[1] + weights[3] * perLayer[3], 1e-6 * Math.Abs(losses.Weighted.item<float>()) + 1e-6);
        Assert.False(losses.Weighted.requires_grad);

        int nonZero = 0;
        for (int i = 0; i < trainable.Length; i++)
        {
            var grad = trainable[i].grad!;
            Assert.True(grad.allclose(expected[i], rtol: 1e-4, atol: 1e-6), $"{method}: gradient {i} differs by {(grad - expected[i]).abs().max().item<float>()}");
            if (grad.abs().max().item<float>() > 0) nonZero++;
        }
        Assert.True(nonZero > 0, "no gradient reached the trainable parameters");
    }

    /// <summary>
    /// With distillation α each early exit's term is (1 − α)·CE + α·KL(p_L ‖ p_l), the last layer's distribution detached:
    /// checked against the divergence written out here, and the lean backward against the whole graph's gradients.
    /// </summary>
    [Theory]
    [InlineData(0.5)]
    [InlineData(1.0)]
    public void Distilled_early_exit_loss_adds_the_divergence_from_the_detached_last_layer(double alpha)
    {
        using var scope = NewDisposeScope();
        using var model = Deep();
        model.eval();
        var parameters = model.parameters().ToArray();
        using var batch = Collate.Collate(TrainerTests.Examples(3));
        double[] weights = [0.25, 0.25, 0.25, 0.25];
        const double divisor = 7;
        ForwardOutput Forward() => model.forward(new ForwardInput { InputIds = batch.InputIds, AttentionMask = batch.AttentionMask, OutputHiddenStates = true });

        double expected;
        var crossEntropies = new double[4];
        using (no_grad())
        {
            var output = Forward();
            var rows = batch.Labels[.., 1..].reshape(-1).ne(Example.IgnoreIndex).nonzero().reshape(-1);
            Tensor Rows(Tensor logits) => logits[.., ..^1, ..].reshape(-1, Vocab).index_select(0, rows);
            var teacher = Rows(output.Logits).log_softmax(-1);
            crossEntropies[3] = CausalLMLoss.Sum(output.Logits, batch.Labels).item<float>() / divisor;
            expected = weights[3] * crossEntropies[3];
            for (int l = 0; l < 3; l++)
            {
                var exitLogits = model.HeadLogits(output.HiddenStates![l + 1]);
                crossEntropies[l] = CausalLMLoss.Sum(exitLogits, batch.Labels).item<float>() / divisor;
                double kl = (teacher.exp() * (teacher - Rows(exitLogits).log_softmax(-1))).sum().item<float>() / divisor;
                Assert.True(kl > 1e-3, $"exit {l}: the random model's exits should disagree with the last layer (KL {kl})");
                expected += weights[l] * ((1 - alpha) * crossEntropies[l] + alpha * kl);
            }
        }

        var whole = EarlyExitLoss.Compute(model, Forward(), batch.Labels, weights, divisor, alpha);
        Assert.Equal(expected, whole.item<float>(), 1e-5 * Math.Abs(expected));
        whole.backward();
        var wholeGradients = parameters.Select(p => p.grad!.clone()).ToArray();
        foreach (var p in parameters) p.grad!.zero_();

        var losses = EarlyExitLoss.Backward(model, Forward(), batch.Labels, weights, divisor, alpha);
        Assert.Equal(expected, losses.Weighted.item<float>(), 1e-5 * Math.Abs(expected));
        // The per-layer losses stay the exits' cross-entropies (what metrics.jsonl reports as exit_losses).
        var perLayer = losses.PerLayer.data<float>().ToArray();
        for (int l = 0; l < 4; l++) Assert.Equal(crossEntropies[l], perLayer[l], 1e-5 * crossEntropies[l]);
        for (int i = 0; i < parameters.Length; i++)
            Assert.True(parameters[i].grad!.allclose(wholeGradients[i], rtol: 1e-4, atol: 1e-6),
                $"gradient {i} differs by {(parameters[i].grad! - wholeGradients[i]).abs().max().item<float>()}");
        Assert.Contains("between 0 and 1", Assert.Throws<ArgumentException>(() => EarlyExitLoss.Compute(model, Forward(), batch.Labels, weights, divisor, 1.5)).Message);
    }

    [Fact]
    public void Early_exit_loss_needs_the_hidden_states_and_sane_weights()
    {
        using var scope = NewDisposeScope();
        using var model = Deep();
        using var batch = Collate.Collate(TrainerTests.Examples(2));
        var plain = model.forward(new ForwardInput { InputIds = batch.InputIds });
        Assert.Contains("OutputHiddenStates", Assert.Throws<ArgumentException>(() => EarlyExitLoss.Compute(model, plain, batch.Labels, [0.25, 0.25, 0.25, 0.25])).Message);
        var full = model.forward(new ForwardInput { InputIds = batch.InputIds, OutputHiddenStates = true });
        Assert.Contains("4 layers", Assert.Throws<ArgumentException>(() => EarlyExitLoss.Backward(model, full, batch.Labels, [0.5, 0.5])).Message);
        Assert.Contains("last layer", Assert.Throws<ArgumentException>(() => EarlyExitLoss.Backward(model, full, batch.Labels, [0.5, 0.5, 0, 0])).Message);
        var exited = model.forward(new ForwardInput { InputIds = batch.InputIds, OutputHiddenStates = true, ExitLayer = 2 });
        Assert.Contains("ExitLayer", Assert.Throws<ArgumentException>(() => EarlyExitLoss.Compute(model, exited, batch.Labels, [0.25, 0.25, 0.25, 0.25])).Message);
    }

    private sealed class NotACausalLM : nn.Module<ForwardInput, ForwardOutput>
    {
        private readonly CausalLM _inner;
        public NotACausalLM(CausalLM inner) : base(nameof(NotACausalLM))
        {
            _inner = inner;
            register_module("inner", inner);
        }
        public override ForwardOutput forward(ForwardInput input) => _inner.forward(input);
    }

    [Fact]
    public void Layer_skip_options_need_a_causal_lm()
    {
        using var model = Deep();
        using var wrapper = new NotACausalLM(model);
        var e = Assert.Throws<ArgumentException>(() => new Trainer(wrapper, wrapper.named_parameters().Select(p => (p.name, p.parameter)),
            new TrainerOptions { EarlyExit = new EarlyExitOptions() }));
        Assert.Contains("CausalLM", e.Message);
        using var plain = new Trainer(wrapper, wrapper.named_parameters().Select(p => (p.name, p.parameter)), new TrainerOptions());
    }

    /// <summary>
    /// Sequences with one fixed step between tokens (t_{i+1} = t_i + d mod V, d depending on the sequence's first
    /// token) — learnable by a shallow model, so the exits have something to learn.
    /// </summary>
    private static Example[] Progressions(int count, int seed)
    {
        var random = new Random(seed);
        return Enumerable.Range(0, count).Select(_ =>
        {
            int start = random.Next(1, Vocab), step = 1 + start % 3;
            var ids = Enumerable.Range(0, 12).Select(i => 1 + (start - 1 + i * step) % (Vocab - 1)).ToArray();
            return new Example(ids, ids);
        }).ToArray();
    }

    [Fact]
    public void A_model_trained_with_the_early_exit_loss_predicts_from_early_layers()
    {
        var data = Progressions(32, seed: 5);
        var options = new TrainerOptions { LearningRate = 1e-2, Schedule = LrScheduleKind.Constant, BatchSize = 8, MicroBatchSize = 8, MaxSteps = 40, Seed = 3 };
        (double[] PerLayer, TrainingResult Result) Train(TrainerOptions o)
        {
            using var model = Deep();
            using var trainer = Trainer.ForModel(model, o);
            var result = trainer.Train(data, Collate);
            return (EarlyExitLoss.PerLayerLosses(model, data, Collate), result);
        }
        var (plain, plainRun) = Train(options);
        var (early, earlyRun) = Train(options with { EarlyExit = new EarlyExitOptions(EarlyExitScale.Uniform) });
        string report = $"per-layer loss plain [{string.Join(", ", plain.Select(l => l.ToString("F3")))}], early exit [{string.Join(", ", early.Select(l => l.ToString("F3")))}]";
        log.WriteLine(report);
        // The first two exits: much better with the early-exit loss.
        Assert.True(early[0] < 0.5 * plain[0], report);
        Assert.True(early[1] < 0.5 * plain[1], report);
        // The last layer still learns (from ln 64 ≈ 4.16 at the start).
        Assert.True(early[3] < 1.0 && plain[3] < 1.0, report);
        // The trainer reports the last layer's loss as Loss and the weighted loss beside it.
        var last = earlyRun.Steps[^1];
        Assert.NotNull(last.EarlyExitLoss);
        Assert.Equal(4, last.ExitLosses!.Count);
        Assert.Equal(last.Loss, last.ExitLosses[3]!.Value, 6);
        Assert.Equal(last.ExitLosses.Average(l => l!.Value), last.EarlyExitLoss!.Value, 5);
        Assert.Null(plainRun.Steps[^1].EarlyExitLoss);
        Assert.Null(plainRun.Steps[^1].ExitLosses);
    }

    [Fact]
    public void Resume_with_layer_dropout_and_early_exit_reproduces_the_uninterrupted_run_exactly()
    {
        var data = TrainerTests.Examples(4);
        var options = new TrainerOptions
        {
            LearningRate = 5e-3, Schedule = LrScheduleKind.Cosine, WarmupSteps = 1, BatchSize = 2, MicroBatchSize = 1, Epochs = 3, Seed = 11,
            LayerDropout = new LayerDropoutOptions(0.5, LayerDropoutScale.Linear, LayerDropoutCurriculum.Exponential),
            EarlyExit = new EarlyExitOptions(EarlyExitScale.Sum, EarlyExitCurriculum.Rotational, Rotation: 2),
        };
        StepMetrics[] Run(TrainerOptions o)
        {
            using var model = Deep();
            using var trainer = Trainer.ForModel(model, o);
            return trainer.Train(data, Collate).Steps.ToArray();
        }
        var uninterrupted = Run(options);
        Assert.Equal(6, uninterrupted.Length);
        // Layer dropout changes the run (so the comparison below is about its draws too).
        Assert.NotEqual(uninterrupted.Select(s => s.Loss), Run(options with { LayerDropout = null }).Select(s => s.Loss));

        var checkpoint = Path.Combine(_dir, "ckpt");
        using (var model = Deep())
        using (var trainer = Trainer.ForModel(model, options))
        {
            trainer.Train(data, Collate, stopAtStep: 3);
            trainer.SaveCheckpoint(checkpoint);
        }
        using (var model = Deep(seed: 99))
        using (var trainer = Trainer.ForModel(model, options))
        {
            trainer.LoadCheckpoint(checkpoint);
            var rest = trainer.Train(data, Collate).Steps.ToArray();
            Assert.Equal(uninterrupted[3..].Select(s => s.Loss), rest.Select(s => s.Loss));
            Assert.Equal(uninterrupted[3..].Select(s => s.EarlyExitLoss), rest.Select(s => s.EarlyExitLoss));
        }
    }

    [Theory]
    [InlineData("lora")]
    [InlineData("prompt")]
    public void Adapters_train_with_layer_dropout_and_early_exit_and_the_base_stays_frozen(string method)
    {
        // A larger init: the frozen head must be able to produce peaked logits.
        using var model = TrainerTests.TinyLlama(initializerRange: 0.5);
        var before = model.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().clone());
        var peft = (PeftModel)WithMethod(model, method);
        var path = Path.Combine(_dir, $"{method}.jsonl");
        using var trainer = Trainer.ForAdapter(peft, new TrainerOptions
        {
            LearningRate = 2e-2, Schedule = LrScheduleKind.Constant, BatchSize = 4, MicroBatchSize = 4, MaxSteps = 25, MetricsPath = path,
            LayerDropout = new LayerDropoutOptions(0.2), EarlyExit = new EarlyExitOptions(EarlyExitScale.Uniform, EarlyExitCurriculum.Rotational, Rotation: 2),
        });
        var result = trainer.Train(TrainerTests.Examples(), Collate);
        log.WriteLine($"{method}: loss {result.Steps[0].Loss} → {result.FinalLoss}, early-exit loss {result.Steps[0].EarlyExitLoss} → {result.Steps[^1].EarlyExitLoss}");
        // Prompt tuning learns slowly (a few virtual tokens steer a frozen model); LoRA fits the examples.
        double factor = method == "lora" ? 0.5 : 0.95;
        Assert.True(result.FinalLoss < factor * result.Steps[0].Loss, $"{method}: loss {result.Steps[0].Loss} → {result.FinalLoss}");
        Assert.All(result.Steps, s => Assert.True(double.IsFinite(s.EarlyExitLoss!.Value)));
        foreach (var (name, parameter) in model.named_parameters())
            if (before.TryGetValue(name, out var original))
                Assert.True(original.equal(parameter).all().item<bool>(), $"base parameter {name} changed");
        // The JSONL log carries the weighted loss and each exit's (null for the layer the rotation left out).
        var lines = File.ReadAllLines(path).Select(l => JsonNode.Parse(l)!).ToArray();
        Assert.Equal(25, lines.Length);
        var first = lines[0]["exit_losses"]!.AsArray();
        Assert.Equal(2, first.Count);
        Assert.NotNull(first[0]);   // step 0: layer 0 ((0 + 0) mod 2 = 0)
        Assert.NotNull(first[1]);
        var second = lines[1]["exit_losses"]!.AsArray();
        Assert.Null(second[0]);     // step 1: only the last layer
        Assert.Equal((double)lines[1]["loss"]!, (double)second[1]!, 6);
        Assert.Equal((double)lines[1]["loss"]!, (double)lines[1]["early_exit_loss"]!, 6);
    }

    [Fact]
    public void Early_exit_gradient_accumulation_matches_one_big_batch()
    {
        // Each exit's loss is normalised by the whole batch's labelled tokens, so micro-batches add up exactly.
        var options = new TrainerOptions
        {
            LearningRate = 5e-3, BatchSize = 4, MicroBatchSize = 4, Epochs = 2, Seed = 2,
            EarlyExit = new EarlyExitOptions(EarlyExitScale.Sqrt, EarlyExitCurriculum.Rotational, Rotation: 3),
        };
        StepMetrics[] Run(TrainerOptions o)
        {
            using var model = Deep();
            using var trainer = Trainer.ForModel(model, o);
            return trainer.Train(TrainerTests.Examples(8), Collate).Steps.ToArray();
        }
        var whole = Run(options);
        var accumulated = Run(options with { MicroBatchSize = 1 });
        Assert.Equal(4, whole.Length);
        for (int i = 0; i < whole.Length; i++)
        {
            // Absolute tolerances: rounding both to N decimals fails when they straddle a rounding boundary.
            Assert.Equal(whole[i].Loss, accumulated[i].Loss, tolerance: 1e-4);
            Assert.Equal(whole[i].EarlyExitLoss!.Value, accumulated[i].EarlyExitLoss!.Value, tolerance: 1e-4);
            Assert.Equal(whole[i].GradNorm!.Value, accumulated[i].GradNorm!.Value, tolerance: 1e-3);
        }
    }

    [Fact]
    public void Memory_stays_flat_across_steps_with_layer_dropout_and_early_exit()
    {
        using var model = Deep();
        using var trainer = Trainer.ForModel(model, new TrainerOptions
        {
            BatchSize = 2, MicroBatchSize = 1, MaxSteps = 8,
            LayerDropout = new LayerDropoutOptions(0.5), EarlyExit = new EarlyExitOptions(Curriculum: EarlyExitCurriculum.Rotational, Rotation: 2),
        });
        var live = new List<long>();
        trainer.Train(TrainerTests.Examples(), Collate, onStep: _ => live.Add(DisposeScopeManager.Statistics.ThreadTotalLiveCount));
        // Step 1 creates AdamW's state; from then on no tensor may survive a step.
        Assert.All(live.Skip(2), count => Assert.Equal(live[1], count));
    }

    [Fact]
    public void Plain_runs_write_no_early_exit_fields()
    {
        var path = Path.Combine(_dir, "plain.jsonl");
        using var model = TrainerTests.TinyLlama();
        using var trainer = Trainer.ForModel(model, new TrainerOptions { BatchSize = 2, MicroBatchSize = 2, MaxSteps = 1, MetricsPath = path });
        trainer.Train(TrainerTests.Examples(), Collate);
        var line = File.ReadAllText(path);
        Assert.DoesNotContain("early_exit", line);
        Assert.DoesNotContain("exit_losses", line);
    }
}

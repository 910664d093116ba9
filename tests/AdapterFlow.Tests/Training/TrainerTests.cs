using System.Text.Json;
using System.Text.Json.Nodes;
using AdapterFlow.Adapters;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.Models;
using AdapterFlow.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Training;

[Collection(GlobalTorchRngCollection.Name)]
public class TrainerTests
{
    private const int Vocab = 64;

    internal static CausalLM TinyLlama(long seed = 1, double initializerRange = 0.05, bool tied = false) => AutoModel.FromConfig(AutoModel.ParseConfig(new JsonObject
    {
        ["model_type"] = "llama",
        ["vocab_size"] = Vocab,
        ["hidden_size"] = 32,
        ["intermediate_size"] = 64,
        ["num_hidden_layers"] = 2,
        ["num_attention_heads"] = 4,
        ["num_key_value_heads"] = 2,
        ["max_position_embeddings"] = 64,
        ["initializer_range"] = initializerRange,
        ["tie_word_embeddings"] = tied,
    }, "tiny config.json"), seed);

    /// <summary>Random token sequences of different lengths; the first 3 labels masked as a "prompt".</summary>
    internal static Example[] Examples(int count = 4, int seed = 3)
    {
        var random = new Random(seed);
        return Enumerable.Range(0, count).Select(i =>
        {
            var ids = Enumerable.Range(0, 10 + 2 * i).Select(_ => random.Next(1, Vocab)).ToArray();
            var labels = ids.Select((id, t) => t < 3 ? Example.IgnoreIndex : id).ToArray();
            return new Example(ids, labels);
        }).ToArray();
    }

    private static readonly Collator Collate = new(padTokenId: 0);

    [Fact]
    public void Loss_ignores_masked_labels_and_shifts_by_one()
    {
        using var scope = NewDisposeScope();
        var logits = randn(1, 4, 5, generator: new Generator(1));
        var labels = tensor(new long[,] { { -100, 2, -100, 4 } });
        var expected = (nn.functional.cross_entropy(logits[0, 0].unsqueeze(0), tensor(new long[] { 2 })) +
                        nn.functional.cross_entropy(logits[0, 2].unsqueeze(0), tensor(new long[] { 4 }))).item<float>();
        Assert.Equal(expected, CausalLMLoss.Sum(logits, labels).item<float>(), 5);
        Assert.Equal(expected / 2, CausalLMLoss.Mean(logits, labels).item<float>(), 5);
    }

    [Fact]
    public void Full_training_overfits_a_few_examples()
    {
        using var model = TinyLlama();
        using var trainer = Trainer.ForModel(model, new TrainerOptions { LearningRate = 1e-2, Schedule = LrScheduleKind.Constant, BatchSize = 4, MicroBatchSize = 2, MaxSteps = 80 });
        var result = trainer.Train(Examples(), Collate);
        Assert.Equal(80, result.Steps.Count);
        Assert.True(result.Steps[0].Loss > 3.5, $"first loss {result.Steps[0].Loss}");
        Assert.True(result.FinalLoss < 0.05, $"final loss {result.FinalLoss}");
        // Norm weights (2 per layer + final norm) go to the no-decay group.
        Assert.Equal(5, trainer.UndecayedParameterCount);
        Assert.Equal([0.0, 0.0], trainer.GroupWeightDecays);
        using var decaying = Trainer.ForModel(model, new TrainerOptions { WeightDecay = 0.1 });
        Assert.Equal([0.1, 0.0], decaying.GroupWeightDecays);
    }

    [Fact]
    public void Tied_embeddings_are_one_parameter_to_the_optimizer()
    {
        using var untied = TinyLlama();
        using var tied = TinyLlama(tied: true);
        using var a = Trainer.ForModel(untied);
        using var b = Trainer.ForModel(tied);
        Assert.Equal(a.DecayedParameterCount - 1, b.DecayedParameterCount);
    }

    [Fact]
    public void Lora_training_overfits_and_leaves_the_base_model_untouched()
    {
        // A larger init: the frozen lm_head must be able to produce peaked logits from a normalised hidden state.
        using var model = TinyLlama(initializerRange: 0.5);
        var before = model.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().clone());
        var peft = PeftModel.Create(model, new LoraConfig { R = 8, LoraAlpha = 16, TargetModules = ModuleSelector.Pattern(ModuleSelector.AllLinear) });
        using var trainer = Trainer.ForAdapter(peft, new TrainerOptions { LearningRate = 2e-2, Schedule = LrScheduleKind.Constant, BatchSize = 4, MicroBatchSize = 4, MaxSteps = 150 });
        Assert.Equal(peft.TrainableParameters().Count(), trainer.DecayedParameterCount + trainer.UndecayedParameterCount);
        var result = trainer.Train(Examples(), Collate);
        Assert.True(result.Steps[0].Loss > 3, $"first loss {result.Steps[0].Loss}");
        Assert.True(result.FinalLoss < 0.1, $"final loss {result.FinalLoss}");
        foreach (var (name, parameter) in model.named_parameters())
            if (before.TryGetValue(name, out var original))
                Assert.True(original.equal(parameter).all().item<bool>(), $"base parameter {name} changed");
    }

    private static double[] Losses(TrainerOptions options)
    {
        using var model = TinyLlama();
        using var trainer = Trainer.ForModel(model, options);
        return trainer.Train(Examples(6), Collate).Steps.Select(s => s.Loss).ToArray();
    }

    [Fact]
    public void Same_seed_gives_identical_losses_and_another_seed_does_not()
    {
        var options = new TrainerOptions { LearningRate = 5e-3, BatchSize = 2, MicroBatchSize = 1, Epochs = 3, WarmupSteps = 2, Seed = 5 };
        var first = Losses(options);
        Assert.Equal(9, first.Length);
        Assert.Equal(first, Losses(options));
        Assert.NotEqual(first, Losses(options with { Seed = 6 }));
    }

    [Fact]
    public void Gradient_accumulation_matches_one_big_batch()
    {
        // Loss is normalised by the batch's labelled tokens, so micro-batches of unequal length add up exactly.
        var options = new TrainerOptions { LearningRate = 5e-3, BatchSize = 4, MicroBatchSize = 4, Epochs = 3, Seed = 2 };
        var whole = Losses(options);
        var accumulated = Losses(options with { MicroBatchSize = 1 });
        Assert.Equal(whole.Length, accumulated.Length);
        for (int i = 0; i < whole.Length; i++) Assert.Equal(whole[i], accumulated[i], 4);
    }

    [Theory]
    [InlineData(LrScheduleKind.Constant, new[] { 0.0, 0.5, 1.0, 1.0, 1.0, 1.0 })]
    [InlineData(LrScheduleKind.Linear, new[] { 0.0, 0.5, 1.0, 0.75, 0.5, 0.0 })]
    [InlineData(LrScheduleKind.Cosine, new[] { 0.0, 0.5, 1.0, 0.8535533905932737, 0.5, 0.0 })]
    public void Schedules_give_transformers_values(LrScheduleKind kind, double[] factors)
    {
        // warmup 2, total 6: steps 0, 1, 2, 3, 4, 6.
        var schedule = new LearningRateSchedule(kind, 2e-4, WarmupSteps: 2, TotalSteps: 6);
        int[] steps = [0, 1, 2, 3, 4, 6];
        for (int i = 0; i < steps.Length; i++) Assert.Equal(2e-4 * factors[i], schedule.At(steps[i]), 12);
        Assert.Equal(LrScheduleKind.Cosine, LearningRateSchedule.ParseKind("COSINE"));
        Assert.Throws<ArgumentException>(() => LearningRateSchedule.ParseKind("step"));
    }

    [Fact]
    public void Trainer_uses_the_schedule_and_writes_a_jsonl_log()
    {
        var path = Path.Combine(Path.GetTempPath(), $"af-metrics-{Guid.NewGuid():N}.jsonl");
        try
        {
            using var model = TinyLlama();
            using var trainer = Trainer.ForModel(model, new TrainerOptions { LearningRate = 1e-3, BatchSize = 2, MicroBatchSize = 2, Epochs = 2, WarmupSteps = 1, MetricsPath = path });
            var result = trainer.Train(Examples(), Collate);
            var expected = new LearningRateSchedule(LrScheduleKind.Linear, 1e-3, 1, 4);
            Assert.Equal(Enumerable.Range(0, 4).Select(expected.At), result.Steps.Select(s => s.LearningRate));
            var lines = File.ReadAllLines(path);
            Assert.Equal(4, lines.Length);
            using var last = JsonDocument.Parse(lines[^1]);
            Assert.Equal(4, last.RootElement.GetProperty("step").GetInt32());
            Assert.Equal(result.FinalLoss, last.RootElement.GetProperty("loss").GetDouble(), 12);
            Assert.True(last.RootElement.GetProperty("tokens_per_second").GetDouble() > 0);
            Assert.True(last.RootElement.TryGetProperty("learning_rate", out _));
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public void Memory_stays_flat_across_steps_and_the_model_mode_is_restored()
    {
        using var model = TinyLlama();
        model.eval();
        using var trainer = Trainer.ForModel(model, new TrainerOptions { BatchSize = 2, MicroBatchSize = 1, MaxSteps = 10 });
        var live = new List<long>();
        trainer.Train(Examples(), Collate, onStep: _ => live.Add(DisposeScopeManager.Statistics.ThreadTotalLiveCount));
        // Step 1 creates AdamW's state; from then on no tensor may survive a step.
        Assert.All(live.Skip(2), count => Assert.Equal(live[1], count));
        Assert.False(model.training);
    }

    [Fact]
    public void Nan_loss_stops_with_a_clear_message()
    {
        using var model = TinyLlama();
        using (no_grad()) model.parameters().First().fill_(double.NaN);
        using var trainer = Trainer.ForModel(model, new TrainerOptions { BatchSize = 2, MicroBatchSize = 2, MaxSteps = 3 });
        var e = Assert.Throws<TrainingDivergedException>(() => trainer.Train(Examples(), Collate));
        Assert.Contains("loss became NaN at step 1", e.Message);
    }

    [Fact]
    public void Gradient_norm_is_reported_and_clipped()
    {
        double? Run(double? maxGradNorm, out double gradNormAfter)
        {
            using var model = TinyLlama();
            using var trainer = Trainer.ForModel(model, new TrainerOptions { BatchSize = 4, MicroBatchSize = 2, MaxSteps = 1, MaxGradNorm = maxGradNorm });
            var reported = trainer.Train(Examples(), Collate).Steps[0].GradNorm;
            // The gradients stay on the parameters until the next step's zero_grad: they are what AdamW used.
            gradNormAfter = Math.Sqrt(model.parameters().Sum(p => p.grad is null ? 0 : p.grad.pow(2).sum().item<float>()));
            return reported;
        }
        Assert.Null(Run(null, out double unclipped));
        double? reported = Run(1e-3, out double clipped);
        Assert.Equal(unclipped, reported!.Value, 3);
        Assert.True(unclipped > 1e-2, $"gradient norm {unclipped}");
        Assert.Equal(1e-3, clipped, 5);
    }

    [Fact]
    public void Bad_options_are_rejected()
    {
        using var model = TinyLlama();
        Assert.Contains("multiple of MicroBatchSize", Assert.Throws<ArgumentException>(() => Trainer.ForModel(model, new TrainerOptions { BatchSize = 6, MicroBatchSize = 4 })).Message);
        Assert.Contains("LearningRate", Assert.Throws<ArgumentException>(() => Trainer.ForModel(model, new TrainerOptions { LearningRate = 0 })).Message);
    }
}

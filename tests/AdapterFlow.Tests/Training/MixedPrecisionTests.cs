using AdapterFlow.Adapters;
using AdapterFlow.Adapters.Bottleneck;
using AdapterFlow.Adapters.IA3;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.Adapters.PrefixTuning;
using AdapterFlow.Adapters.PromptTuning;
using AdapterFlow.IO;
using AdapterFlow.Models;
using AdapterFlow.Training;
using TorchSharp;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Training;

/// <summary>BFloat16 training: mixed precision with float32 master weights, and pure bfloat16.</summary>
[Collection(GlobalTorchRngCollection.Name)]
public sealed class MixedPrecisionTests(ITestOutputHelper output) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("af-training-bf16-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static readonly Collator Collate = new(padTokenId: 0);

    private static readonly TrainerOptions Options = new()
    {
        LearningRate = 5e-3, WeightDecay = 0.1, Schedule = LrScheduleKind.Cosine, WarmupSteps = 2,
        BatchSize = 4, MicroBatchSize = 2, MaxSteps = 30, Seed = 7,
    };

    private static double[] FullLosses(TrainingPrecision precision, int steps = 30)
    {
        using var model = TrainerTests.TinyLlama();
        using var trainer = Trainer.ForModel(model, Options with { Precision = precision, MaxSteps = steps });
        return trainer.Train(TrainerTests.Examples(8), Collate).Steps.Select(s => s.Loss).ToArray();
    }

    [Fact]
    public void Mixed_full_training_tracks_the_float32_loss_curve_and_decreases()
    {
        var fp32 = FullLosses(TrainingPrecision.Float32);
        var mixed = FullLosses(TrainingPrecision.BFloat16Mixed);
        output.WriteLine($"fp32:       {string.Join(" ", fp32.Select(l => l.ToString("F4")))}");
        output.WriteLine($"bf16-mixed: {string.Join(" ", mixed.Select(l => l.ToString("F4")))}");
        output.WriteLine($"largest relative difference {fp32.Zip(mixed).Max(p => Math.Abs(p.First - p.Second) / p.First):P2}");
        Assert.True(mixed[^1] < 0.6 * mixed[0], $"bf16-mixed loss went from {mixed[0]} to {mixed[^1]}");
        // bfloat16 has 8 significant bits: the curves differ by rounding, not in shape (measured: under 0.1% apart).
        for (int i = 0; i < fp32.Length; i++)
            Assert.True(Math.Abs(mixed[i] - fp32[i]) < 0.01 * fp32[i], $"step {i + 1}: fp32 {fp32[i]:F4}, bf16-mixed {mixed[i]:F4}");
        // ... and they do differ: the forward really ran in bfloat16.
        Assert.NotEqual(fp32[0], mixed[0]);
    }

    [Fact]
    public void Pure_bf16_training_holds_everything_in_bfloat16_and_decreases()
    {
        using var model = TrainerTests.TinyLlama();
        using var trainer = Trainer.ForModel(model, Options with { Precision = TrainingPrecision.BFloat16, LearningRate = 1e-2 });
        var losses = trainer.Train(TrainerTests.Examples(8), Collate).Steps.Select(s => s.Loss).ToArray();
        Assert.True(losses[^1] < 0.7 * losses[0], $"bf16 loss went from {losses[0]} to {losses[^1]}");
        Assert.All(model.parameters(), p => Assert.Equal(ScalarType.BFloat16, p.dtype));
        Assert.All(trainer.OptimizedParameters, p => Assert.Equal(ScalarType.BFloat16, p.Parameter.dtype));
        Assert.All(trainer.OptimizerMoments(), m => Assert.Equal(ScalarType.BFloat16, m.dtype));
    }

    [Fact]
    public void Mixed_precision_keeps_float32_masters_and_optimizer_state_and_a_bfloat16_model()
    {
        using var model = TrainerTests.TinyLlama();
        using var trainer = Trainer.ForModel(model, Options with { Precision = TrainingPrecision.BFloat16Mixed, MaxSteps = 4 });
        trainer.Train(TrainerTests.Examples(4), Collate, stopAtStep: 3);
        Assert.All(model.parameters(), p => Assert.Equal(ScalarType.BFloat16, p.dtype));
        var moments = trainer.OptimizerMoments().ToList();
        Assert.Equal(2 * trainer.OptimizedParameters.Count, moments.Count);
        Assert.All(moments, m => Assert.Equal(ScalarType.Float32, m.dtype));
        var modelParameters = model.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        foreach (var (name, master) in trainer.OptimizedParameters)
        {
            Assert.Equal(ScalarType.Float32, master.dtype);
            Assert.NotNull(master.grad);
            Assert.Equal(ScalarType.Float32, master.grad!.dtype);
            // The model holds the masters rounded to bfloat16, and the masters carry bits bfloat16 cannot hold.
            using var rounded = master.to(ScalarType.BFloat16);
            Assert.True(rounded.equal(modelParameters[name]).all().item<bool>(), $"{name}: model copy is not the rounded master");
        }
        Assert.Contains(trainer.OptimizedParameters, p => !p.Parameter.equal(p.Parameter.to(ScalarType.BFloat16).to(ScalarType.Float32)).all().item<bool>());

        // Restoring float32 puts the exact masters into the model; training again goes back to bfloat16.
        trainer.RestoreFloat32Weights();
        modelParameters = model.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        foreach (var (name, master) in trainer.OptimizedParameters)
            Assert.True(master.equal(modelParameters[name]).all().item<bool>(), $"{name} is not the master after RestoreFloat32Weights");
        var more = trainer.Train(TrainerTests.Examples(4), Collate);
        Assert.Single(more.Steps);
        Assert.All(model.parameters(), p => Assert.Equal(ScalarType.BFloat16, p.dtype));
    }

    [Fact]
    public void Gradient_accumulation_under_mixed_precision_sums_in_float32()
    {
        // One batch of 4 against 4 micro-batches of 1: the same update up to bfloat16 rounding of each micro-batch's gradient.
        double[] Run(int micro)
        {
            using var model = TrainerTests.TinyLlama();
            using var trainer = Trainer.ForModel(model, Options with { Precision = TrainingPrecision.BFloat16Mixed, MicroBatchSize = micro, MaxSteps = 4, Schedule = LrScheduleKind.Constant });
            return trainer.Train(TrainerTests.Examples(4), Collate).Steps.Select(s => s.Loss).ToArray();
        }
        var whole = Run(4);
        var accumulated = Run(1);
        for (int i = 0; i < whole.Length; i++) Assert.Equal(whole[i], accumulated[i], 1);
    }

    [Theory]
    [InlineData("full")]
    [InlineData("lora")]
    public void Mixed_precision_resume_reproduces_the_uninterrupted_losses_exactly(string method)
    {
        var data = TrainerTests.Examples(4);
        var options = Options with { Precision = TrainingPrecision.BFloat16Mixed, BatchSize = 2, MicroBatchSize = 1, MaxSteps = 6 };
        Trainer Make(CausalLM model)
        {
            if (method == "full") return Trainer.ForModel(model, options);
            manual_seed(5); // the adapter's random init
            return Trainer.ForAdapter(PeftModel.Create(model, new LoraConfig { R = 4, LoraDropout = 0.1, InitLoraWeights = LoraInit.Random }), options);
        }

        double[] uninterrupted;
        using (var model = TrainerTests.TinyLlama())
        using (var trainer = Make(model))
            uninterrupted = trainer.Train(data, Collate).Steps.Select(s => s.Loss).ToArray();

        var checkpoint = Path.Combine(_dir, $"ckpt-{method}");
        using (var model = TrainerTests.TinyLlama())
        using (var trainer = Make(model))
        {
            Assert.Equal(uninterrupted[..3], trainer.Train(data, Collate, stopAtStep: 3).Steps.Select(s => s.Loss));
            trainer.SaveCheckpoint(checkpoint);
        }
        // Checkpoints hold the float32 masters, not their bfloat16 copies.
        using (var saved = SafetensorsFile.Open(Path.Combine(checkpoint, "trainable.safetensors")))
            Assert.All(saved.Entries, e => Assert.Equal("F32", e.DType));

        // Full training restores every weight from the checkpoint; LoRA needs the same base and re-seeds its adapter init.
        using (var model = TrainerTests.TinyLlama(seed: method == "full" ? 99 : 1))
        using (var trainer = Make(model))
        {
            trainer.LoadCheckpoint(checkpoint);
            Assert.Equal(uninterrupted[3..], trainer.Train(data, Collate).Steps.Select(s => s.Loss));
        }
    }

    public static TheoryData<string> AdapterKinds => ["lora", "ia3", "bottleneck", "prefix", "prompt"];

    private static PeftConfig AdapterConfig(string kind) => kind switch
    {
        "lora" => new LoraConfig { R = 4, LoraAlpha = 8, InitLoraWeights = LoraInit.Random },
        "ia3" => new IA3Config(),
        "bottleneck" => new BottleneckConfig { BottleneckSize = 8 },
        "prefix" => new PrefixTuningConfig { NumVirtualTokens = 4 },
        "prompt" => new PromptTuningConfig { NumVirtualTokens = 4 },
        _ => throw new ArgumentException(kind),
    };

    [Theory]
    [MemberData(nameof(AdapterKinds))]
    public void Every_adapter_trains_under_mixed_precision_and_saves_float32(string kind)
    {
        using var model = TrainerTests.TinyLlama(initializerRange: 0.5);
        var peft = PeftModel.Create(model, AdapterConfig(kind));
        using var trainer = Trainer.ForAdapter(peft, Options with { Precision = TrainingPrecision.BFloat16Mixed, LearningRate = 2e-2, Schedule = LrScheduleKind.Constant, MaxSteps = 15 });
        var initial = trainer.OptimizedParameters.Select(p => p.Parameter.detach().clone()).ToList();
        var losses = trainer.Train(TrainerTests.Examples(4), Collate).Steps.Select(s => s.Loss).ToArray();
        Assert.True(losses[^1] < losses[0], $"{kind}: loss went from {losses[0]} to {losses[^1]}");
        // The frozen base computed in bfloat16 the whole time.
        Assert.All(model.parameters().Where(p => !p.requires_grad), p => Assert.Equal(ScalarType.BFloat16, p.dtype));
        Assert.Contains(trainer.OptimizedParameters.Zip(initial), p => !p.First.Parameter.equal(p.Second).all().item<bool>());

        trainer.RestoreFloat32Weights();
        var outDir = Path.Combine(_dir, kind);
        peft.SavePretrained(outDir);
        using var saved = SafetensorsFile.Open(Path.Combine(outDir, "adapter_model.safetensors"));
        Assert.All(saved.Entries, e => Assert.Equal("F32", e.DType));
    }

    [Fact]
    public void Pure_bf16_adapter_training_saves_a_bfloat16_adapter()
    {
        using var model = TrainerTests.TinyLlama(initializerRange: 0.5);
        var peft = PeftModel.Create(model, AdapterConfig("lora"));
        using var trainer = Trainer.ForAdapter(peft, Options with { Precision = TrainingPrecision.BFloat16, LearningRate = 2e-2, MaxSteps = 3 });
        trainer.Train(TrainerTests.Examples(4), Collate);
        trainer.RestoreFloat32Weights(); // no-op outside mixed precision
        var outDir = Path.Combine(_dir, "bf16-lora");
        peft.SavePretrained(outDir);
        using var saved = SafetensorsFile.Open(Path.Combine(outDir, "adapter_model.safetensors"));
        Assert.All(saved.Entries, e => Assert.Equal("BF16", e.DType));
    }

    [Fact]
    public void Float32_precision_converts_a_bfloat16_model_to_float32()
    {
        using var model = TrainerTests.TinyLlama();
        model.to(ScalarType.BFloat16);
        using var trainer = Trainer.ForModel(model, Options with { MaxSteps = 1 });
        trainer.Train(TrainerTests.Examples(4), Collate);
        Assert.All(model.parameters(), p => Assert.Equal(ScalarType.Float32, p.dtype));
    }

    [Fact]
    public void Recipes_and_names_parse_the_precision()
    {
        var recipe = Path.Combine(_dir, "recipe.yaml");
        File.WriteAllText(recipe, "method: lora\nprecision: bf16-mixed\n");
        Assert.Equal(TrainingPrecision.BFloat16Mixed, TrainRecipe.Load(recipe).ToTrainerOptions(null).Precision);
        Assert.Equal(TrainingPrecision.BFloat16, TrainRecipe.Load(recipe).OverlaidBy(new TrainRecipe { Precision = "bf16" }).ToTrainerOptions(null).Precision);
        Assert.Equal(TrainingPrecision.Float32, new TrainRecipe().ToTrainerOptions(null).Precision);
        File.WriteAllText(recipe, "precision: fp16\n");
        var error = Assert.Throws<ArgumentException>(() => TrainRecipe.Load(recipe));
        Assert.Contains("precision", error.Message);
        Assert.Contains("bf16-mixed", error.Message);
        foreach (var name in TrainingPrecisionNames.All)
            Assert.Equal(name, TrainingPrecisionNames.Name(TrainingPrecisionNames.Parse(name)));
    }
}

using AdapterFlow.Adapters;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.Training;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Training;

/// <summary>The fused CPU AdamW step (and its gradient norm) against TorchSharp's <c>optim.AdamW</c> and <c>clip_grad_norm_</c>.</summary>
[Collection(GlobalTorchRngCollection.Name)]
public sealed class FusedAdamWTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("af-training-fused-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static readonly Collator Collate = new(padTokenId: 0);

    // Odd sizes (vector tails), one over a work chunk of 65536 elements, a scalar-sized one.
    private static readonly long[][] Shapes = [[3, 5], [17], [2 * 65536 + 13], [1], [40, 33], [8]];

    private sealed class Set : IDisposable
    {
        public readonly Parameter[] Parameters;
        public readonly AdamW Optimizer;
        public readonly List<AdamW.ParamGroup> Groups;

        public Set(Tensor[] initial)
        {
            Parameters = initial.Select(t => new Parameter(t.clone(), requires_grad: true)).ToArray();
            // Matrices decayed, 1-D tensors not, as the trainer groups them; different betas per group too.
            Groups =
            [
                new AdamW.ParamGroup(Parameters.Where(p => p.dim() >= 2).ToArray(), lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1),
                new AdamW.ParamGroup(Parameters.Where(p => p.dim() < 2).ToArray(), lr: 1e-2, beta1: 0.8, beta2: 0.99, eps: 1e-6, weight_decay: 0.0),
            ];
            Optimizer = optim.AdamW(Groups);
        }

        public void SetLearningRate(double lr)
        {
            foreach (var group in Optimizer.ParamGroups) group.LearningRate = lr;
        }

        public IEnumerable<AdamW.State> States => Optimizer.state_dict().State.Cast<AdamW.State>();

        public void Dispose()
        {
            Optimizer.Dispose();
            foreach (var p in Parameters) p.Dispose();
        }
    }

    private static void AssertClose(Tensor expected, Tensor actual, double relative, string what)
    {
        // Relative to the tensor's scale: elementwise relative error is meaningless for entries near zero.
        double scale = Math.Max(expected.abs().max().item<float>(), 1e-30);
        double difference = (expected - actual).abs().max().item<float>();
        Assert.True(difference <= relative * scale, $"{what}: max |Δ| {difference:E3} vs scale {scale:E3} (allowed {relative:E0} relative)");
    }

    [Theory]
    [InlineData(1f)]
    [InlineData(0.37f)]
    public void Fused_step_matches_TorchSharp_AdamW_over_several_steps(float gradientScale)
    {
        using var scope = NewDisposeScope();
        var generator = new Generator(5);
        var initial = Shapes.Select(s => randn(s, generator: generator) * 0.1f).ToArray();
        using var reference = new Set(initial);
        using var fused = new Set(initial);
        var fusedStep = FusedAdamW.TryCreate(fused.Optimizer, fused.Groups);
        Assert.NotNull(fusedStep);

        double[] rates = [1e-2, 5e-3, 2e-2, 1e-3, 1e-2];
        for (int step = 0; step < rates.Length; step++)
        {
            reference.SetLearningRate(rates[step]);
            fused.SetLearningRate(rates[step]);
            for (int i = 0; i < Shapes.Length; i++)
            {
                // The second tensor has no gradient in the first step: skipped, its step count stays behind.
                if (step == 0 && i == 1) continue;
                var g = randn(Shapes[i], generator: generator) * (float)(0.01 * (i + 1));
                reference.Parameters[i].grad = g.clone().mul_(gradientScale); // what clip_grad_norm_ leaves
                fused.Parameters[i].grad = g.clone();
            }
            reference.Optimizer.step();
            fusedStep.Step(gradientScale);
        }

        var referenceStates = reference.States.ToArray();
        var fusedStates = fused.States.ToArray();
        for (int i = 0; i < Shapes.Length; i++)
        {
            string name = $"tensor {i} [{string.Join(", ", Shapes[i])}]";
            AssertClose(reference.Parameters[i], fused.Parameters[i], 1e-6, name + " weights");
            AssertClose(reference.Parameters[i].grad!, fused.Parameters[i].grad!, 1e-7, name + " (scaled) gradient");
        }
        // state_dict lists the states group by group, as the groups hold the parameters.
        var ordered = fused.Groups.SelectMany(g => g.Parameters).ToArray();
        for (int s = 0; s < referenceStates.Length; s++)
        {
            Assert.Equal(referenceStates[s].step, fusedStates[s].step);
            AssertClose(referenceStates[s].exp_avg, fusedStates[s].exp_avg, 1e-6, $"state {s} first moment");
            AssertClose(referenceStates[s].exp_avg_sq, fusedStates[s].exp_avg_sq, 1e-6, $"state {s} second moment");
        }
        Assert.Equal(rates.Length - 1, fusedStates[Array.IndexOf(ordered, fused.Parameters[1])].step);
        // The weights really moved (the comparison is not between two untouched copies).
        Assert.True((fused.Parameters[2] - initial[2]).abs().max().item<float>() > 1e-3);
    }

    [Fact]
    public void Gradient_norm_and_clip_coefficient_match_clip_grad_norm()
    {
        using var scope = NewDisposeScope();
        var generator = new Generator(9);
        var initial = Shapes.Select(s => randn(s, generator: generator)).ToArray();
        using var reference = new Set(initial);
        using var fused = new Set(initial);
        for (int i = 0; i < Shapes.Length; i++)
        {
            if (i == 3) continue; // a parameter without a gradient counts for nothing
            var g = randn(Shapes[i], generator: generator) * 0.5f;
            reference.Parameters[i].grad = g.clone();
            fused.Parameters[i].grad = g.clone();
        }
        double exact = Math.Sqrt(fused.Parameters.Where(p => p.grad is not null).Sum(p => p.grad!.to(ScalarType.Float64).pow(2).sum().item<double>()));
        double norm = FusedAdamW.TryCreate(fused.Optimizer, fused.Groups)!.GradientNorm();
        Assert.Equal(exact, norm, exact * 1e-8); // float32 partial sums over 1024 elements, added in double
        double torchNorm = nn.utils.clip_grad_norm_(reference.Parameters, 1.0);
        Assert.Equal(torchNorm, norm, torchNorm * 1e-6);
        // clip_grad_norm_ multiplied the reference gradients by the coefficient.
        float coefficient = FusedAdamW.ClipCoefficient(1.0, norm);
        Assert.True(coefficient < 0.1f);
        AssertClose(reference.Parameters[0].grad!, fused.Parameters[0].grad! * coefficient, 1e-6, "clipped gradient");
        Assert.Equal(1f, FusedAdamW.ClipCoefficient(1e3, norm));

        FusedAdamW.TryCreate(fused.Optimizer, fused.Groups)!.ZeroGradients();
        Assert.All(fused.Parameters.Where(p => p.grad is not null), p => Assert.Equal(0f, p.grad!.abs().max().item<float>()));
        Assert.Null(fused.Parameters[3].grad); // zeroing creates no gradient where there was none
    }

    [Fact]
    public void Fused_step_rounds_the_updated_masters_into_bfloat16_copies_as_torch_does()
    {
        using var scope = NewDisposeScope();
        var generator = new Generator(3);
        var initial = Shapes.Select(s => randn(s, generator: generator)).ToArray();
        using var set = new Set(initial);
        var copies = set.Parameters.ToDictionary(p => p.Handle, p => zeros(p.shape, ScalarType.BFloat16));
        foreach (var p in set.Parameters) p.grad = randn(p.shape, generator: generator);
        FusedAdamW.TryCreate(set.Optimizer, set.Groups)!.Step(1f, master => copies[master.Handle]);
        foreach (var p in set.Parameters)
            Assert.True(p.detach().to(ScalarType.BFloat16).eq(copies[p.Handle]).all().item<bool>(), $"bfloat16 copy of [{string.Join(", ", p.shape)}] differs from torch's rounding");
    }

    [Fact]
    public void Fused_path_is_used_for_float32_and_mixed_masters_and_TorchSharp_otherwise()
    {
        bool Uses(TrainerOptions options)
        {
            using var model = TrainerTests.TinyLlama();
            using var trainer = Trainer.ForModel(model, options);
            return trainer.UsesFusedOptimizer;
        }
        Assert.True(Uses(new TrainerOptions()));
        Assert.True(Uses(new TrainerOptions { Precision = TrainingPrecision.BFloat16Mixed }));
        Assert.False(Uses(new TrainerOptions { Precision = TrainingPrecision.BFloat16 }));
        Assert.False(Uses(new TrainerOptions { FusedOptimizer = false }));
        using var lora = PeftModel.Create(TrainerTests.TinyLlama(), new LoraConfig { R = 4, LoraAlpha = 8 });
        using var adapterTrainer = Trainer.ForAdapter(lora, new TrainerOptions());
        Assert.True(adapterTrainer.UsesFusedOptimizer);
    }

    // Weight decay groups, accumulation, a schedule, and clipping that is active on every step (the norms are ~1).
    private static readonly TrainerOptions Options = new()
    {
        LearningRate = 5e-3, WeightDecay = 0.1, Schedule = LrScheduleKind.Cosine, WarmupSteps = 2,
        BatchSize = 4, MicroBatchSize = 2, MaxSteps = 6, Seed = 7, MaxGradNorm = 0.05,
    };

    private static (double[] Losses, double[] Norms, Dictionary<string, Tensor> Weights, Tensor[] Moments) Train(TrainerOptions options, bool fused)
    {
        using var model = TrainerTests.TinyLlama();
        using var trainer = Trainer.ForModel(model, options with { FusedOptimizer = fused });
        Assert.Equal(fused, trainer.UsesFusedOptimizer);
        var steps = trainer.Train(TrainerTests.Examples(8), Collate).Steps;
        var weights = trainer.OptimizedParameters.ToDictionary(p => p.Name, p => p.Parameter.detach().clone().DetachFromDisposeScope());
        var moments = trainer.OptimizerMoments().Select(m => m.clone().DetachFromDisposeScope()).ToArray();
        return (steps.Select(s => s.Loss).ToArray(), steps.Select(s => s.GradNorm!.Value).ToArray(), weights, moments);
    }

    [Theory]
    [InlineData(TrainingPrecision.Float32)]
    [InlineData(TrainingPrecision.BFloat16Mixed)]
    public void Trainer_with_the_fused_step_matches_TorchSharp_AdamW(TrainingPrecision precision)
    {
        var options = Options with { Precision = precision };
        var reference = Train(options, fused: false);
        var fused = Train(options, fused: true);
        try
        {
            Assert.All(reference.Norms, n => Assert.True(n > 0.05, $"gradient norm {n}: clipping must be active"));
            for (int i = 0; i < reference.Losses.Length; i++)
            {
                Assert.Equal(reference.Losses[i], fused.Losses[i], 1e-5 * reference.Losses[i]);
                Assert.Equal(reference.Norms[i], fused.Norms[i], 1e-5 * reference.Norms[i]);
            }
            // bf16-mixed rounds the masters into the compute weights: a master 1 ulp apart may round differently,
            // which the next forward passes amplify a little, so its tolerance is looser.
            double tolerance = precision == TrainingPrecision.Float32 ? 1e-6 : 1e-4;
            foreach (var (name, weight) in reference.Weights) AssertClose(weight, fused.Weights[name], tolerance, name);
            Assert.Equal(reference.Moments.Length, fused.Moments.Length);
            for (int i = 0; i < reference.Moments.Length; i++) AssertClose(reference.Moments[i], fused.Moments[i], tolerance * 10, $"moment {i}");
        }
        finally
        {
            foreach (var t in reference.Weights.Values.Concat(fused.Weights.Values).Concat(reference.Moments).Concat(fused.Moments)) t.Dispose();
        }
    }

    [Fact]
    public void Checkpoints_of_the_fused_and_TorchSharp_steps_resume_each_other()
    {
        var options = Options with { MaxSteps = null, Epochs = 2, BatchSize = 2, MicroBatchSize = 1 };
        var data = TrainerTests.Examples(4);
        double[] uninterrupted;
        using (var model = TrainerTests.TinyLlama())
        using (var trainer = Trainer.ForModel(model, options with { FusedOptimizer = false }))
            uninterrupted = trainer.Train(data, Collate).Steps.Select(s => s.Loss).ToArray();

        var checkpoint = Path.Combine(_dir, "fused");
        using (var model = TrainerTests.TinyLlama())
        using (var trainer = Trainer.ForModel(model, options))
        {
            Assert.True(trainer.UsesFusedOptimizer);
            trainer.Train(data, Collate, stopAtStep: 2);
            trainer.SaveCheckpoint(checkpoint);
        }
        // The fused run's optimizer file is TorchSharp's format: TorchSharp's AdamW continues from it.
        using (var model = TrainerTests.TinyLlama(seed: 99))
        using (var trainer = Trainer.ForModel(model, options with { FusedOptimizer = false }))
        {
            trainer.LoadCheckpoint(checkpoint);
            var rest = trainer.Train(data, Collate).Steps.Select(s => s.Loss).ToArray();
            for (int i = 0; i < rest.Length; i++) Assert.Equal(uninterrupted[2 + i], rest[i], 1e-5 * uninterrupted[2 + i]);
        }
    }
}

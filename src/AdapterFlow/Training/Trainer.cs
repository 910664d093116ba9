using System.Diagnostics;
using System.Text.Json;
using AdapterFlow.Adapters;
using AdapterFlow.Models;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Training;

/// <summary>
/// What one optimizer step did (also one line of the JSONL metrics log): the 1-based step, the mean loss per
/// labelled token over the whole batch, the learning rate used, the global gradient norm before clipping (null
/// when not clipping), real (non-pad) and labelled tokens, and real tokens per second in this step.
/// </summary>
public sealed record StepMetrics(int Step, int Epoch, double Loss, double LearningRate, double? GradNorm,
    long Tokens, long LabelTokens, double TokensPerSecond, double ElapsedSeconds);

/// <summary>Result of <see cref="Trainer.Train"/>.</summary>
public sealed record TrainingResult(IReadOnlyList<StepMetrics> Steps)
{
    public double FinalLoss => Steps.Count == 0 ? double.NaN : Steps[^1].Loss;
}

/// <summary>Raised when the loss becomes NaN or infinite: training stops instead of corrupting the weights.</summary>
public sealed class TrainingDivergedException(string message) : Exception(message);

/// <summary>
/// Causal-LM training loop: AdamW with parameter groups (no weight decay on norms and biases), a warmup
/// schedule, gradient accumulation over micro-batches, global-norm clipping, seeded data order and dropout.
/// Trains whatever parameters it is given: all of a model (<see cref="ForModel"/>) or an adapter's
/// (<see cref="ForAdapter"/>). Each micro-batch runs in its own dispose scope so memory stays flat.
/// </summary>
public sealed class Trainer : IDisposable
{
    private readonly nn.Module<ForwardInput, ForwardOutput> _model;
    private readonly IReadOnlyList<Parameter> _parameters;
    private readonly OptimizerHelper _optimizer;

    public Trainer(nn.Module<ForwardInput, ForwardOutput> model, IEnumerable<(string Name, Parameter Parameter)> trainable, TrainerOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        Options = options ?? new TrainerOptions();
        Options.Validate();
        _model = model;
        var named = trainable.ToList();
        if (named.Count == 0) throw new ArgumentException("there are no trainable parameters");
        _parameters = named.Select(p => p.Parameter).ToList();
        var decay = named.Where(p => !IsNoDecay(p.Name, p.Parameter)).Select(p => p.Parameter).ToList();
        var noDecay = named.Where(p => IsNoDecay(p.Name, p.Parameter)).Select(p => p.Parameter).ToList();
        var groups = new List<AdamW.ParamGroup>();
        if (decay.Count > 0) groups.Add(new AdamW.ParamGroup(decay, Options.LearningRate, Options.Beta1, Options.Beta2, Options.Epsilon, Options.WeightDecay));
        if (noDecay.Count > 0) groups.Add(new AdamW.ParamGroup(noDecay, Options.LearningRate, Options.Beta1, Options.Beta2, Options.Epsilon, 0.0));
        DecayedParameterCount = decay.Count;
        UndecayedParameterCount = noDecay.Count;
        _optimizer = optim.AdamW(groups, Options.LearningRate, Options.Beta1, Options.Beta2, Options.Epsilon, Options.WeightDecay);
    }

    /// <summary>Full fine-tuning: every parameter of <paramref name="model"/> that requires a gradient.</summary>
    public static Trainer ForModel(CausalLM model, TrainerOptions? options = null) =>
        new(model, model.named_parameters().Where(p => p.parameter.requires_grad).Select(p => (p.name, p.parameter)), options);

    /// <summary>Adapter training: only <see cref="PeftModel.TrainableParameters"/>; the base model stays frozen.</summary>
    public static Trainer ForAdapter(PeftModel model, TrainerOptions? options = null)
    {
        var trainable = model.TrainableParameters().Select(p => p.Handle).ToHashSet();
        var seen = new HashSet<IntPtr>();
        var named = model.named_parameters().Where(p => trainable.Contains(p.parameter.Handle) && seen.Add(p.parameter.Handle))
            .Select(p => (p.name, p.parameter));
        return new Trainer(model, named, options);
    }

    public TrainerOptions Options { get; }

    /// <summary>Optimizer steps completed so far.</summary>
    public int Step { get; private set; }

    /// <summary>Parameters (tensors) in the weight-decay group and in the no-decay group (norms, biases).</summary>
    public int DecayedParameterCount { get; }
    public int UndecayedParameterCount { get; }

    /// <summary>Norm weights and biases (and any other 1-D parameter) are not decayed, as transformers' Trainer.</summary>
    public static bool IsNoDecay(string name, Parameter parameter) =>
        parameter.dim() < 2 || name.EndsWith(".bias", StringComparison.Ordinal) || name.Contains("norm", StringComparison.OrdinalIgnoreCase);

    /// <summary>Optimizer steps a run over <paramref name="exampleCount"/> examples takes.</summary>
    public int TotalSteps(int exampleCount) =>
        Options.MaxSteps ?? Options.Epochs * (int)Math.Ceiling(exampleCount / (double)Options.BatchSize);

    /// <summary>Trains on <paramref name="data"/>; <paramref name="onStep"/> sees every step's metrics.</summary>
    public TrainingResult Train(IReadOnlyList<Example> data, Collator collator, Action<StepMetrics>? onStep = null, CancellationToken cancellation = default)
    {
        ArgumentNullException.ThrowIfNull(data);
        ArgumentNullException.ThrowIfNull(collator);
        if (data.Count == 0) throw new ArgumentException("the training set is empty");
        int totalSteps = TotalSteps(data.Count);
        int warmup = Options.WarmupSteps > 0 ? Options.WarmupSteps : (int)Math.Ceiling(Options.WarmupRatio * totalSteps);
        var schedule = new LearningRateSchedule(Options.Schedule, Options.LearningRate, warmup, totalSteps);
        int stepsPerEpoch = (int)Math.Ceiling(data.Count / (double)Options.BatchSize);
        var device = _parameters[0].device;

        torch.manual_seed(Options.Seed);
        _model.train();
        using var metricsLog = Options.MetricsPath is null ? null : new StreamWriter(Options.MetricsPath, append: Step > 0);
        var steps = new List<StepMetrics>();
        var clock = Stopwatch.StartNew();
        List<int[]>? epochBatches = null;
        int epochOfBatches = -1;
        while (Step < totalSteps)
        {
            cancellation.ThrowIfCancellationRequested();
            int epoch = Step / stepsPerEpoch;
            if (epoch != epochOfBatches)
            {
                epochBatches = EpochBatches(data, epoch);
                epochOfBatches = epoch;
            }
            var batch = epochBatches![Step % stepsPerEpoch];
            var metrics = RunStep(data, batch, collator, schedule.At(Step), device, epoch, clock);
            Step++;
            steps.Add(metrics);
            onStep?.Invoke(metrics);
            if (metricsLog is not null && (Step % Options.LogEvery == 0 || Step == totalSteps))
            {
                metricsLog.WriteLine(JsonSerializer.Serialize(metrics, MetricsJson));
                metricsLog.Flush();
            }
        }
        return new TrainingResult(steps);
    }

    private static readonly JsonSerializerOptions MetricsJson = new() { PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower };

    /// <summary>The batches of one epoch: a shuffle seeded by (seed, epoch), so any step's batch can be found again.</summary>
    private List<int[]> EpochBatches(IReadOnlyList<Example> data, int epoch)
    {
        var random = new Random(HashCode.Combine(Options.Seed, epoch));
        return Options.GroupByLength
            ? Batching.LengthGrouped(data.Select(e => e.Length).ToArray(), Options.BatchSize, random)
            : Batching.Shuffled(data.Count, Options.BatchSize, random);
    }

    private StepMetrics RunStep(IReadOnlyList<Example> data, int[] batch, Collator collator, double lr, Device device, int epoch, Stopwatch clock)
    {
        var started = clock.Elapsed;
        foreach (var group in _optimizer.ParamGroups) group.LearningRate = lr;
        _optimizer.zero_grad();
        var examples = batch.Select(i => data[i]).ToArray();
        // Normalise by the labelled tokens of the whole batch, not per micro-batch, so that accumulating
        // micro-batches gives the same gradient as one big batch (transformers' num_items_in_batch).
        long labelTokens = examples.Sum(LabelTokenCount);
        double divisor = Math.Max(1, labelTokens);
        double loss = 0;
        long tokens = 0;
        foreach (var micro in examples.Chunk(Options.MicroBatchSize))
        {
            using var scope = NewDisposeScope();
            using var inputs = collator.Collate(micro, device);
            var output = _model.forward(new ForwardInput { InputIds = inputs.InputIds, AttentionMask = inputs.AttentionMask });
            var microLoss = CausalLMLoss.Sum(output.Logits, inputs.Labels) / divisor;
            microLoss.backward();
            double value = microLoss.item<float>();
            if (!double.IsFinite(value))
                throw new TrainingDivergedException($"loss became {value} at step {Step + 1} (learning rate {lr:G4}); lower the learning rate, clip gradients or check the data");
            loss += value;
            tokens += inputs.Tokens;
        }
        double? norm = null;
        if (Options.MaxGradNorm is double max)
        {
            norm = nn.utils.clip_grad_norm_(_parameters, max);
            if (!double.IsFinite(norm.Value))
                throw new TrainingDivergedException($"gradient norm became {norm.Value} at step {Step + 1} (learning rate {lr:G4}); lower the learning rate or check the data");
        }
        _optimizer.step();
        var elapsed = (clock.Elapsed - started).TotalSeconds;
        return new StepMetrics(Step + 1, epoch, loss, lr, norm, tokens, labelTokens, tokens / Math.Max(elapsed, 1e-9), clock.Elapsed.TotalSeconds);
    }

    private static long LabelTokenCount(Example example)
    {
        long count = 0;
        for (int i = 1; i < example.Labels.Length; i++) if (example.Labels[i] != Example.IgnoreIndex) count++;
        return count;
    }

    public void Dispose() => _optimizer.Dispose();
}

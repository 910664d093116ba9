using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Serialization;
using AdapterFlow.Adapters;
using AdapterFlow.Models;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Training;

/// <summary>
/// What one optimizer step did (also one line of the JSONL metrics log): the 1-based step, the mean loss per
/// labelled token over the whole batch, the learning rate used, the global gradient norm before clipping (null
/// when not clipping), real (non-pad) and labelled tokens, and real tokens per second in this step. With the
/// early-exit loss (<see cref="TrainerOptions.EarlyExit"/>) <see cref="Loss"/> stays the last layer's, so runs with and
/// without it compare; <see cref="EarlyExitLoss"/> is the weighted loss that was optimised and
/// <see cref="ExitLosses"/> each layer's exit loss (null for layers the curriculum left out of this step).
/// </summary>
public sealed record StepMetrics(int Step, int Epoch, double Loss, double LearningRate, double? GradNorm,
    long Tokens, long LabelTokens, double TokensPerSecond, double ElapsedSeconds,
    [property: JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] double? EarlyExitLoss = null,
    [property: JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)] IReadOnlyList<double?>? ExitLosses = null)
{
    /// <summary>Mean loss on the held-out set, on the steps where it was evaluated.</summary>
    public double? EvalLoss { get; init; }

    /// <summary>The objective's extra metrics (DPO's rewards, say) and, after an evaluation, "eval_"-prefixed ones.</summary>
    [JsonIgnore]
    public IReadOnlyDictionary<string, double> Extra { get; init; } = new Dictionary<string, double>();

    /// <summary>One JSONL line: the fields in snake_case, then the extra metrics.</summary>
    public string ToJson()
    {
        var node = JsonSerializer.SerializeToNode(this, Trainer.MetricsJson)!.AsObject();
        foreach (var (name, value) in Extra) node[name] = double.IsFinite(value) ? value : null;
        return node.ToJsonString();
    }
}

/// <summary>A held-out evaluation: the mean loss (per labelled token, or per pair for DPO) and the mean extra metrics.</summary>
public sealed record EvalResult(double Loss, IReadOnlyDictionary<string, double> Metrics);

/// <summary>
/// Evaluation during training: every <see cref="Every"/> optimizer steps (and after the last) the trainer
/// computes the objective on <see cref="Data"/> without gradients; when the loss is the lowest so far,
/// <see cref="SaveBest"/> writes the model or adapter into a temporary folder that then replaces
/// <see cref="BestDirectory"/> (never half-written).
/// </summary>
public sealed record EvaluationOptions(IReadOnlyList<Example> Data, int Every)
{
    public string? BestDirectory { get; init; }
    public Action<string>? SaveBest { get; init; }
}

/// <summary>Result of <see cref="Trainer.Train"/>.</summary>
public sealed record TrainingResult(IReadOnlyList<StepMetrics> Steps)
{
    /// <summary>The step with the lowest held-out loss so far (also from before a resume) and that loss; null without evaluation.</summary>
    public int? BestStep { get; init; }
    public double? BestEvalLoss { get; init; }

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
    // The fused CPU update over _optimizer's own state (null: TorchSharp's step, e.g. on CUDA or in pure bfloat16).
    private readonly FusedAdamW? _fused;
    private readonly IReadOnlyList<(string Name, Parameter Parameter)> _named;
    private readonly List<AdamW.ParamGroup> _groups;
    // LayerSkip's schedules, built by Train once the run's length is known (null when off).
    private LayerDropoutSchedule? _layerDropout;
    private EarlyExitSchedule? _earlyExit;
    // BFloat16Mixed only: the float32 master weights the optimizer steps and the model's bfloat16 copies of them.
    private readonly PrecisionPlan? _precision;

    public Trainer(nn.Module<ForwardInput, ForwardOutput> model, IEnumerable<(string Name, Parameter Parameter)> trainable, TrainerOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        Options = options ?? new TrainerOptions();
        Options.Validate();
        if ((Options.LayerDropout is not null || Options.EarlyExit is not null) && model is not CausalLM)
            throw new ArgumentException("layer dropout and the early-exit loss need a CausalLM model (decoder layers and a shared head)");
        _model = model;
        var named = trainable.ToList();
        if (named.Count == 0) throw new ArgumentException("there are no trainable parameters");
        // The model is converted to the precision's compute dtype; under mixed precision the optimizer owns float32 masters.
        (var optimized, _precision) = PrecisionPlan.Apply(model, named, Options.Precision);
        named = [.. optimized];
        _named = named;
        _parameters = named.Select(p => p.Parameter).ToList();
        var decay = named.Where(p => !IsNoDecay(p.Name, p.Parameter)).Select(p => p.Parameter).ToList();
        var noDecay = named.Where(p => IsNoDecay(p.Name, p.Parameter)).Select(p => p.Parameter).ToList();
        var groups = new List<AdamW.ParamGroup>();
        if (decay.Count > 0) groups.Add(new AdamW.ParamGroup(decay, Options.LearningRate, Options.Beta1, Options.Beta2, Options.Epsilon, Options.WeightDecay));
        if (noDecay.Count > 0) groups.Add(new AdamW.ParamGroup(noDecay, Options.LearningRate, Options.Beta1, Options.Beta2, Options.Epsilon, 0.0));
        _groups = groups;
        DecayedParameterCount = decay.Count;
        UndecayedParameterCount = noDecay.Count;
        var adamW = optim.AdamW(groups, Options.LearningRate, Options.Beta1, Options.Beta2, Options.Epsilon, Options.WeightDecay);
        _optimizer = adamW;
        // Float32 CPU parameters (the model's own, or the masters under bf16-mixed): the fused update on the same state.
        _fused = Options.FusedOptimizer ? FusedAdamW.TryCreate(adamW, groups) : null;
    }

    /// <summary>Full fine-tuning: every parameter of <paramref name="model"/> that requires a gradient (tied ones once).</summary>
    public static Trainer ForModel(CausalLM model, TrainerOptions? options = null)
    {
        var seen = new HashSet<IntPtr>();
        return new(model, model.named_parameters().Where(p => p.parameter.requires_grad && seen.Add(p.parameter.Handle)).Select(p => (p.name, p.parameter)), options);
    }

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

    /// <summary>What is minimised: causal-LM cross-entropy unless set (e.g. to a <see cref="DpoObjective"/>).</summary>
    public ITrainingObjective Objective { get; set; } = new LanguageModelingObjective();

    /// <summary>Held-out evaluation during <see cref="Train"/> (null: none).</summary>
    public EvaluationOptions? Evaluation { get; set; }

    /// <summary>Lowest held-out loss so far and its step (kept in checkpoints).</summary>
    public double? BestEvalLoss { get; private set; }
    public int? BestStep { get; private set; }

    /// <summary>Weight decay of each AdamW parameter group, as the optimizer holds it (decayed group first).</summary>
    public IReadOnlyList<double> GroupWeightDecays =>
        _groups.Select(g => g.Options.weight_decay!.Value).ToArray();

    /// <summary>Parameters (tensors) in the weight-decay group and in the no-decay group (norms, biases).</summary>
    public int DecayedParameterCount { get; }
    public int UndecayedParameterCount { get; }

    /// <summary>Norm weights and biases (and any other 1-D parameter) are not decayed, as transformers' Trainer.</summary>
    public static bool IsNoDecay(string name, Parameter parameter) =>
        parameter.dim() < 2 || name.EndsWith(".bias", StringComparison.Ordinal) || name.Contains("norm", StringComparison.OrdinalIgnoreCase);

    /// <summary>Optimizer steps a run over <paramref name="exampleCount"/> examples takes.</summary>
    public int TotalSteps(int exampleCount) =>
        Options.MaxSteps ?? Options.Epochs * (int)Math.Ceiling(exampleCount / (double)Options.BatchSize);

    /// <summary>
    /// Trains on <paramref name="data"/> from the current <see cref="Step"/> (0, or where a checkpoint left off)
    /// to the end of the run, or only up to step <paramref name="stopAtStep"/>; <paramref name="onStep"/> sees
    /// every step's metrics. A fresh run seeds torch's generator with <see cref="TrainerOptions.Seed"/>; a resumed
    /// one continues the generator state the checkpoint saved.
    /// </summary>
    public TrainingResult Train(IReadOnlyList<Example> data, Collator collator, Action<StepMetrics>? onStep = null,
        int? stopAtStep = null, CancellationToken cancellation = default)
    {
        ArgumentNullException.ThrowIfNull(data);
        ArgumentNullException.ThrowIfNull(collator);
        if (data.Count == 0) throw new ArgumentException("the training set is empty");
        int totalSteps = TotalSteps(data.Count);
        var schedule = Options.ScheduleFor(totalSteps);
        int stepsPerEpoch = (int)Math.Ceiling(data.Count / (double)Options.BatchSize);
        var device = _parameters[0].device;
        PrepareLayerSkip(totalSteps);
        if ((_layerDropout is not null || _earlyExit is not null) && Objective is not LanguageModelingObjective)
            throw new ArgumentException($"layer dropout and the early-exit loss work with the language-modelling objective, not {Objective.Name}");

        _precision?.EnsureComputeForm();
        if (Step == 0) torch.manual_seed(Options.Seed);
        int endStep = Math.Min(totalSteps, stopAtStep ?? totalSteps);
        // Dropout is on while training; the caller's mode (eval for generation, say) comes back afterwards.
        bool wasTraining = _model.training;
        _model.train();
        try
        {
            return TrainSteps(data, collator, onStep, schedule, stepsPerEpoch, totalSteps, endStep, device, cancellation);
        }
        finally
        {
            if (!wasTraining) _model.eval();
        }
    }

    private TrainingResult TrainSteps(IReadOnlyList<Example> data, Collator collator, Action<StepMetrics>? onStep, LearningRateSchedule schedule,
        int stepsPerEpoch, int totalSteps, int endStep, Device device, CancellationToken cancellation)
    {
        using var metricsLog = Options.MetricsPath is null ? null : new StreamWriter(Options.MetricsPath, append: Step > 0);
        var steps = new List<StepMetrics>();
        var clock = Stopwatch.StartNew();
        List<int[]>? epochBatches = null;
        int epochOfBatches = -1;
        while (Step < endStep)
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
            if (Evaluation is { } evaluation && evaluation.Data.Count > 0 && (Step % evaluation.Every == 0 || Step == totalSteps))
                metrics = WithEvaluation(metrics, evaluation, collator, device);
            steps.Add(metrics);
            onStep?.Invoke(metrics);
            if (metricsLog is not null && (Step % Options.LogEvery == 0 || Step == totalSteps))
            {
                metricsLog.WriteLine(metrics.ToJson());
                metricsLog.Flush();
            }
            if (Options.CheckpointDirectory is not null && Options.CheckpointEvery > 0 && (Step % Options.CheckpointEvery == 0 || Step == totalSteps))
            {
                SaveCheckpoint(Path.Combine(Options.CheckpointDirectory, $"checkpoint-{Step}"));
                if (Options.SaveTotalLimit is int limit) PruneCheckpoints(Options.CheckpointDirectory, limit, BestStep);
            }
        }
        return new TrainingResult(steps) { BestStep = BestStep, BestEvalLoss = BestEvalLoss };
    }

    internal static readonly JsonSerializerOptions MetricsJson = new()
    {
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
    };

    private StepMetrics WithEvaluation(StepMetrics metrics, EvaluationOptions evaluation, Collator collator, Device device)
    {
        var result = Evaluate(evaluation.Data, collator, device);
        var extra = new Dictionary<string, double>(metrics.Extra);
        foreach (var (name, value) in result.Metrics) extra["eval_" + name] = value;
        if (double.IsFinite(result.Loss) && (BestEvalLoss is null || result.Loss < BestEvalLoss))
        {
            BestEvalLoss = result.Loss;
            BestStep = Step;
            if (evaluation.BestDirectory is not null && evaluation.SaveBest is not null)
            {
                // Mixed precision: save the float32 master weights, then carry on training in bfloat16.
                _precision?.RestoreFloat32();
                try { IO.AtomicDirectory.Write(evaluation.BestDirectory, evaluation.SaveBest); }
                finally { _precision?.EnsureComputeForm(); }
            }
        }
        return metrics with { EvalLoss = result.Loss, Extra = extra };
    }

    /// <summary>
    /// The objective on <paramref name="data"/> without gradients and in eval mode (no dropout): the loss
    /// normalised as in training (Σ loss / Σ weight) and the extra metrics' means per example.
    /// </summary>
    public EvalResult Evaluate(IReadOnlyList<Example> data, Collator collator, Device? device = null)
    {
        ArgumentNullException.ThrowIfNull(data);
        if (data.Count == 0) throw new ArgumentException("the evaluation set is empty");
        device ??= _parameters[0].device;
        bool wasTraining = _model.training;
        _model.eval();
        try
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            var names = Objective.MetricNames;
            // Loss and metrics summed on the device, read once.
            var sums = zeros(1 + names.Count, dtype: ScalarType.Float32, device: device);
            long weight = 0;
            foreach (var micro in data.Chunk(Options.MicroBatchSize))
            {
                using var microScope = NewDisposeScope();
                var output = Objective.Compute(_model, micro, collator, device);
                sums[0].add_(output.LossSum.to(ScalarType.Float32));
                for (int i = 0; i < names.Count; i++) sums[1 + i].add_(output.MetricSums[i].to(ScalarType.Float32));
                weight += micro.Sum(Objective.Weight);
            }
            var values = sums.cpu().data<float>().ToArray();
            var metrics = new Dictionary<string, double>();
            for (int i = 0; i < names.Count; i++) metrics[names[i]] = values[1 + i] / data.Count;
            return new EvalResult(values[0] / Math.Max(1, weight), metrics);
        }
        finally
        {
            if (wasTraining) _model.train();
        }
    }

    /// <summary>The batches of one epoch: a shuffle seeded by (seed, epoch), so any step's batch can be found again.</summary>
    private List<int[]> EpochBatches(IReadOnlyList<Example> data, int epoch)
    {
        // Not HashCode.Combine: it is salted per process, so a resumed process would shuffle differently.
        var random = new Random(Data.HeldOut.MixSeed(Options.Seed, epoch));
        return Options.GroupByLength
            ? Batching.LengthGrouped(data.Select(e => Math.Max(e.Length, e.Rejected?.Length ?? 0)).ToArray(), Options.BatchSize, random)
            : Batching.Shuffled(data.Count, Options.BatchSize, random);
    }

    private StepMetrics RunStep(IReadOnlyList<Example> data, int[] batch, Collator collator, double lr, Device device, int epoch, Stopwatch clock)
    {
        var started = clock.Elapsed;
        // Everything a step creates outside the micro-batches (clipping's norms, say) is freed with the step.
        using var stepScope = NewDisposeScope();
        foreach (var group in _optimizer.ParamGroups) group.LearningRate = lr;
        long phaseStart = Stopwatch.GetTimestamp();
        // Mixed precision overwrites the masters' gradients with the first micro-batch's instead (no zeroing pass).
        if (_precision is not null) _precision.BeginStep();
        else if (_fused is not null) _fused.ZeroGradients();
        else _optimizer.zero_grad();
        long zeroed = Stopwatch.GetTimestamp();
        var examples = batch.Select(i => data[i]).ToArray();
        // Normalise by the labelled tokens of the whole batch, not per micro-batch, so that accumulating
        // micro-batches gives the same gradient as one big batch (transformers' num_items_in_batch).
        long labelTokens = examples.Sum(LabelTokenCount);
        // The objective's weights: labelled tokens for language modelling, pairs for DPO.
        double divisor = Math.Max(1, examples.Sum(Objective.Weight));
        long tokens = 0;
        var layerDropout = _layerDropout?.RatesAt(Step);
        var exitWeights = _earlyExit?.WeightsAt(Step);
        // LayerSkip (layer dropout, early-exit loss) changes the forward pass and the backward itself; it is a
        // language-modelling technique, so it goes its own way (Train refuses it with another objective).
        bool layerSkip = layerDropout is not null || exitWeights is not null;
        var metricNames = layerSkip ? [] : Objective.MetricNames;
        // The step's losses (and the objective's metrics) are summed on the device and read once per step: one
        // host sync, not one per micro-batch.
        var lossSum = zeros(exitWeights is not null ? 2 + exitWeights.Length : 1 + metricNames.Count, dtype: ScalarType.Float32, device: device);
        foreach (var micro in examples.Chunk(Options.MicroBatchSize))
        {
            using var scope = NewDisposeScope();
            if (layerSkip)
            {
                using var inputs = collator.Collate(micro, device);
                lossSum.add_(MicroBatchLoss(inputs, divisor, layerDropout, exitWeights));
                _precision?.AccumulateGradients();
                tokens += inputs.Tokens;
                continue;
            }
            var output = Objective.Compute(_model, micro, collator, device);
            var microLoss = output.LossSum / divisor;
            microLoss.backward();
            _precision?.AccumulateGradients();
            lossSum[0].add_(microLoss.detach().to(ScalarType.Float32));
            for (int i = 0; i < metricNames.Count; i++) lossSum[1 + i].add_(output.MetricSums[i].to(ScalarType.Float32));
            tokens += output.Tokens;
        }
        var losses = lossSum.cpu().data<float>().ToArray();
        _precision?.FinishStep();
        long backwardDone = Stopwatch.GetTimestamp();
        double loss = losses[0];
        var extra = new Dictionary<string, double>();
        for (int i = 0; i < metricNames.Count; i++) extra[metricNames[i]] = losses[1 + i] / examples.Length;
        // Checked before the update, so a diverged step never reaches the weights.
        if (!double.IsFinite(loss))
            throw new TrainingDivergedException($"loss became {loss} at step {Step + 1} (learning rate {lr:G4}); lower the learning rate, clip gradients or check the data");
        if (exitWeights is not null && !double.IsFinite(losses[1]))
            throw new TrainingDivergedException($"early-exit loss became {losses[1]} at step {Step + 1} (learning rate {lr:G4}); lower the learning rate, clip gradients or check the data");
        double? norm = null;
        float clipScale = 1f;
        if (Options.MaxGradNorm is double max)
        {
            // The fused path scales the gradients inside the update instead of in a pass of their own.
            if (_fused is not null) norm = _fused.GradientNorm();
            else norm = nn.utils.clip_grad_norm_(_parameters, max);
            if (!double.IsFinite(norm.Value))
                throw new TrainingDivergedException($"gradient norm became {norm.Value} at step {Step + 1} (learning rate {lr:G4}); lower the learning rate or check the data");
            if (_fused is not null) clipScale = FusedAdamW.ClipCoefficient(max, norm.Value);
        }
        long clipped = Stopwatch.GetTimestamp();
        if (_fused is not null)
        {
            // Under bf16-mixed the model's bfloat16 weights are written in the same pass.
            var copies = _precision?.FusableCopies();
            _fused.Step(clipScale, copies);
            if (copies is null) _precision?.CopyToModel();
        }
        else
        {
            _optimizer.step();
            _precision?.CopyToModel();
        }
        long updated = Stopwatch.GetTimestamp();
        LastStepPhases = new StepPhases(Stopwatch.GetElapsedTime(phaseStart, zeroed).TotalSeconds, Stopwatch.GetElapsedTime(zeroed, backwardDone).TotalSeconds,
            Stopwatch.GetElapsedTime(backwardDone, clipped).TotalSeconds, Stopwatch.GetElapsedTime(clipped, updated).TotalSeconds);
        var elapsed = (clock.Elapsed - started).TotalSeconds;
        return new StepMetrics(Step + 1, epoch, loss, lr, norm, tokens, labelTokens, tokens / Math.Max(elapsed, 1e-9), clock.Elapsed.TotalSeconds,
            EarlyExitLoss: exitWeights is null ? null : losses[1],
            ExitLosses: exitWeights?.Select((w, l) => w > 0 ? (double?)losses[2 + l] : null).ToArray()) { Extra = extra };
    }

    /// <summary>
    /// Forward and backward of one micro-batch, its loss divided by the whole batch's labelled tokens. Returns the
    /// detached losses to add up over the step: [last layer], or with the early-exit loss [last layer, weighted, each layer].
    /// </summary>
    private Tensor MicroBatchLoss(Batch inputs, double divisor, double[]? layerDropout, double[]? exitWeights)
    {
        var output = _model.forward(new ForwardInput
        {
            InputIds = inputs.InputIds, AttentionMask = inputs.AttentionMask, LayerDropout = layerDropout, OutputHiddenStates = exitWeights is not null,
        });
        if (exitWeights is not null)
        {
            var exits = EarlyExitLoss.Backward((CausalLM)_model, output, inputs.Labels, exitWeights, divisor, Options.EarlyExit?.Distillation ?? 0);
            return cat([exits.LastLayer.reshape(1), exits.Weighted.reshape(1), exits.PerLayer]);
        }
        // Prompt tuning puts its virtual tokens' logits first; they have no labels (PEFT pads the labels with
        // -100 for them), so only the positions of the real tokens count.
        var logits = output.Logits;
        if (logits.shape[1] > inputs.Labels.shape[1]) logits = logits[.., ^(int)inputs.Labels.shape[1]..];
        var microLoss = CausalLMLoss.Sum(logits, inputs.Labels) / divisor;
        microLoss.backward();
        return microLoss.detach().reshape(1);
    }

    /// <summary>LayerSkip's schedules for a run of <paramref name="totalSteps"/> steps (their curricula need its length).</summary>
    private void PrepareLayerSkip(int totalSteps)
    {
        var model = _model as CausalLM;
        _layerDropout = Options.LayerDropout is { MaxRate: > 0 } dropout ? new LayerDropoutSchedule(dropout, model!.NumLayers, totalSteps) : null;
        _earlyExit = Options.EarlyExit is { } exit ? new EarlyExitSchedule(exit, model!.NumLayers, totalSteps) : null;
    }

    /// <summary>Labelled (predicted) tokens, of both sequences of a preference pair.</summary>
    private static long LabelTokenCount(Example example) =>
        ChatTokenizer.LabelCount(example) + (example.Rejected is { } rejected ? ChatTokenizer.LabelCount(rejected) : 0);

    // ---------------------------------------------------------------- checkpoints

    private const string WeightsFile = "trainable.safetensors";
    private const string OptimizerFile = "optimizer.bin";
    private const string StateFile = "trainer_state.json";

    /// <summary>
    /// Saves what resuming needs — the trained parameters (by name), AdamW's moments and step counts, the
    /// optimizer step and torch's generator state — into <paramref name="directory"/>. The files are written to
    /// a temporary directory beside it that is then renamed, so a crash never leaves a half-written checkpoint.
    /// </summary>
    public void SaveCheckpoint(string directory) => IO.AtomicDirectory.Write(directory, temp =>
    {
        IO.SafetensorsWriter.Save(Path.Combine(temp, WeightsFile), _named.Select(p => KeyValuePair.Create(p.Name, (Tensor)p.Parameter)));
        _optimizer.save_state_dict(Path.Combine(temp, OptimizerFile));
        using var rng = torch.get_rng_state();
        var state = new CheckpointState(Step, Options.Seed, Convert.ToBase64String(rng.data<byte>().ToArray()), BestStep, BestEvalLoss);
        File.WriteAllText(Path.Combine(temp, StateFile), JsonSerializer.Serialize(state, MetricsJson));
    });

    /// <summary>
    /// Deletes the oldest checkpoint-{step} folders of <paramref name="directory"/> beyond the newest
    /// <paramref name="keep"/>, sparing <paramref name="bestStep"/>'s. Only folders named checkpoint-{integer} are touched.
    /// </summary>
    public static IReadOnlyList<string> PruneCheckpoints(string directory, int keep, int? bestStep = null)
    {
        var checkpoints = Directory.GetDirectories(directory, "checkpoint-*")
            .Select(dir => (dir, ok: int.TryParse(Path.GetFileName(dir)["checkpoint-".Length..], System.Globalization.NumberStyles.None,
                System.Globalization.CultureInfo.InvariantCulture, out int step), step))
            .Where(c => c.ok)
            .OrderByDescending(c => c.step)
            .ToList();
        var deleted = new List<string>();
        foreach (var (dir, _, step) in checkpoints.Skip(keep))
        {
            if (step == bestStep) continue;
            Directory.Delete(dir, recursive: true);
            deleted.Add(dir);
        }
        return deleted;
    }

    /// <summary>Restores a checkpoint written by <see cref="SaveCheckpoint"/> into this trainer (same model shape and options).</summary>
    public void LoadCheckpoint(string directory)
    {
        var statePath = Path.Combine(directory, StateFile);
        if (!File.Exists(statePath)) throw new FileNotFoundException($"{statePath}: not a training checkpoint (no {StateFile})");
        CheckpointState state;
        try
        {
            state = JsonSerializer.Deserialize<CheckpointState>(File.ReadAllText(statePath), MetricsJson)
                ?? throw new InvalidDataException($"{statePath}: empty trainer state");
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{statePath}: invalid trainer state ({e.Message.Split('\n')[0]})");
        }
        if (state.Seed != Options.Seed)
            throw new ArgumentException($"{statePath}: checkpoint was trained with seed {state.Seed}, these options have seed {Options.Seed}");
        using (var weights = IO.SafetensorsFile.Open(Path.Combine(directory, WeightsFile)))
        using (no_grad())
        {
            foreach (var (name, parameter) in _named)
            {
                if (!weights.Contains(name)) throw new InvalidDataException($"{Path.Combine(directory, WeightsFile)}: no tensor named '{name}'");
                using var value = weights.Load(name, parameter.device);
                if (!value.shape.SequenceEqual(parameter.shape))
                    throw new InvalidDataException($"{Path.Combine(directory, WeightsFile)}: '{name}' has shape [{string.Join(", ", value.shape)}], the model has [{string.Join(", ", parameter.shape)}]");
                parameter.copy_(value);
            }
        }
        _precision?.CopyToModel();
        _optimizer.load_state_dict(Path.Combine(directory, OptimizerFile));
        using var rng = torch.tensor(Convert.FromBase64String(state.RngState), ScalarType.Byte);
        torch.set_rng_state(rng);
        Step = state.Step;
        BestStep = state.BestStep;
        BestEvalLoss = state.BestEvalLoss;
    }

    private sealed record CheckpointState(int Step, long Seed, string RngState, int? BestStep = null, double? BestEvalLoss = null);

    /// <summary>
    /// After <see cref="TrainingPrecision.BFloat16Mixed"/> training: converts the model back to float32 and puts the
    /// exact float32 master weights into its trained parameters, so that saving writes them in float32 (frozen
    /// parameters keep their bfloat16-rounded values). No-op for the other precisions. Training again returns the
    /// model to bfloat16.
    /// </summary>
    public void RestoreFloat32Weights() => _precision?.RestoreFloat32();

    /// <summary>
    /// Wall-clock seconds of the parts of the last optimizer step (for profiling): zeroing the gradients; forward and
    /// backward of all micro-batches (with bf16-mixed's gradient accumulation into the masters); the gradient norm and
    /// clipping; the AdamW update (with bf16-mixed's copy of the masters into the model).
    /// </summary>
    internal StepPhases? LastStepPhases { get; private set; }

    internal sealed record StepPhases(double ZeroGrad, double ForwardBackward, double Clip, double Update);

    /// <summary>Whether the optimizer step is the fused CPU one (<see cref="TrainerOptions.FusedOptimizer"/>).</summary>
    public bool UsesFusedOptimizer => _fused is not null;

    /// <summary>AdamW's moment tensors (first and second), for tests that check their dtype.</summary>
    internal IEnumerable<Tensor> OptimizerMoments() =>
        _optimizer.state_dict().State.OfType<AdamW.State>().SelectMany(s => new[] { s.exp_avg, s.exp_avg_sq });

    /// <summary>The parameters the optimizer steps, by name: the model's own, or float32 masters under mixed precision.</summary>
    public IReadOnlyList<(string Name, Parameter Parameter)> OptimizedParameters => _named;

    public void Dispose()
    {
        _optimizer.Dispose();
        _precision?.Dispose();
    }
}

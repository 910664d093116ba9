namespace AdapterFlow.Training;

/// <summary>Hyper-parameters of a training run. Defaults follow transformers' TrainingArguments where it has one.</summary>
public sealed record TrainerOptions
{
    /// <summary>Peak learning rate.</summary>
    public double LearningRate { get; init; } = 3e-4;

    /// <summary>AdamW's decoupled weight decay, applied to all but norm weights and biases.</summary>
    public double WeightDecay { get; init; }

    public double Beta1 { get; init; } = 0.9;
    public double Beta2 { get; init; } = 0.999;
    public double Epsilon { get; init; } = 1e-8;

    public LrScheduleKind Schedule { get; init; } = LrScheduleKind.Linear;

    /// <summary>Warmup optimizer steps (takes precedence over <see cref="WarmupRatio"/> when positive).</summary>
    public int WarmupSteps { get; init; }

    /// <summary>Warmup as a fraction of all optimizer steps.</summary>
    public double WarmupRatio { get; init; }

    /// <summary>Learning rate warmup starts from (0 as transformers; the previous run's final rate when re-warming for continued pretraining).</summary>
    public double WarmupStartLearningRate { get; init; }

    /// <summary>Learning rate the linear/cosine decay ends at (0 as transformers).</summary>
    public double MinLearningRate { get; init; }

    /// <summary>The schedule of a run of <paramref name="totalSteps"/> optimizer steps.</summary>
    public LearningRateSchedule ScheduleFor(int totalSteps)
    {
        int warmup = WarmupSteps > 0 ? WarmupSteps : (int)Math.Ceiling(WarmupRatio * totalSteps);
        return new LearningRateSchedule(Schedule, LearningRate, warmup, totalSteps)
        {
            WarmupStartLearningRate = WarmupStartLearningRate,
            MinLearningRate = MinLearningRate,
        };
    }

    /// <summary>Examples per optimizer step.</summary>
    public int BatchSize { get; init; } = 8;

    /// <summary>Examples per forward/backward pass; <see cref="BatchSize"/> / this = gradient-accumulation steps.</summary>
    public int MicroBatchSize { get; init; } = 8;

    /// <summary>Passes over the data (ignored when <see cref="MaxSteps"/> is set).</summary>
    public int Epochs { get; init; } = 1;

    /// <summary>Stop after this many optimizer steps (cycling through the data as needed).</summary>
    public int? MaxSteps { get; init; }

    /// <summary>Clip the global gradient norm to this (null: no clipping).</summary>
    public double? MaxGradNorm { get; init; } = 1.0;

    /// <summary>Seeds data order, dropout and any other torch randomness.</summary>
    public long Seed { get; init; } = 42;

    /// <summary>Batch examples of similar length together (transformers' group_by_length).</summary>
    public bool GroupByLength { get; init; }

    /// <summary>Write one JSON line of metrics per logged step here (null: no file).</summary>
    public string? MetricsPath { get; init; }

    /// <summary>Save a resumable checkpoint-{step} folder here every <see cref="CheckpointEvery"/> steps and at the end (null: none).</summary>
    public string? CheckpointDirectory { get; init; }

    public int CheckpointEvery { get; init; } = 500;

    /// <summary>
    /// Keep at most this many checkpoint-{step} folders in <see cref="CheckpointDirectory"/>: after each save the oldest
    /// are deleted, except the best evaluated step's (transformers' save_total_limit). Null keeps them all.
    /// </summary>
    public int? SaveTotalLimit { get; init; }

    /// <summary>Log every this many optimizer steps.</summary>
    public int LogEvery { get; init; } = 1;

    /// <summary>LayerSkip's layer dropout: per-row skipping of whole layers at rates S(t)·D(l)·p_max (null: off).</summary>
    public LayerDropoutOptions? LayerDropout { get; init; }

    /// <summary>
    /// LayerSkip's early-exit loss: every trained layer's output through the shared final norm and head, the weighted
    /// sum of their losses replacing the plain loss (null: off). The step's reported loss stays the last layer's.
    /// </summary>
    public EarlyExitOptions? EarlyExit { get; init; }

    /// <summary>
    /// Number formats of the run (see <see cref="TrainingPrecision"/>). The trainer converts the model it is given:
    /// to float32 for <see cref="TrainingPrecision.Float32"/>, to bfloat16 for the other two.
    /// </summary>
    public TrainingPrecision Precision { get; init; } = TrainingPrecision.Float32;

    /// <summary>
    /// Step AdamW with the fused CPU update when every parameter the optimizer owns is a contiguous float32 CPU tensor
    /// (full or adapter training in fp32; the float32 masters under bf16-mixed): one pass over the weights instead of
    /// TorchSharp's ten or so per tensor, with the same arithmetic, state and checkpoint format. Other devices and pure
    /// bf16 use TorchSharp's <c>optim.AdamW</c> either way. False: always TorchSharp's.
    /// </summary>
    public bool FusedOptimizer { get; init; } = true;

    internal void Validate()
    {
        static void Positive(string name, double value)
        {
            if (!(value > 0)) throw new ArgumentException($"{name} must be positive, got {value}");
        }
        Positive(nameof(LearningRate), LearningRate);
        Positive(nameof(BatchSize), BatchSize);
        Positive(nameof(MicroBatchSize), MicroBatchSize);
        Positive(nameof(LogEvery), LogEvery);
        if (BatchSize % MicroBatchSize != 0)
            throw new ArgumentException($"BatchSize ({BatchSize}) must be a multiple of MicroBatchSize ({MicroBatchSize})");
        if (MaxSteps is null) Positive(nameof(Epochs), Epochs);
        else Positive(nameof(MaxSteps), MaxSteps.Value);
        if (WeightDecay < 0) throw new ArgumentException($"WeightDecay must be non-negative, got {WeightDecay}");
        if (WarmupSteps < 0) throw new ArgumentException($"WarmupSteps must be non-negative, got {WarmupSteps}");
        if (WarmupRatio is < 0 or > 1) throw new ArgumentException($"WarmupRatio must be in [0, 1], got {WarmupRatio}");
        if (WarmupStartLearningRate < 0 || WarmupStartLearningRate > LearningRate)
            throw new ArgumentException($"WarmupStartLearningRate must be in [0, LearningRate], got {WarmupStartLearningRate}");
        if (MinLearningRate < 0 || MinLearningRate > LearningRate)
            throw new ArgumentException($"MinLearningRate must be in [0, LearningRate], got {MinLearningRate}");
        if (MaxGradNorm is double norm) Positive(nameof(MaxGradNorm), norm);
        if (SaveTotalLimit is int limit) Positive(nameof(SaveTotalLimit), limit);
        if (Beta1 is < 0 or >= 1 || Beta2 is < 0 or >= 1) throw new ArgumentException($"betas must be in [0, 1), got ({Beta1}, {Beta2})");
        LayerDropout?.Validate();
        EarlyExit?.Validate();
    }
}

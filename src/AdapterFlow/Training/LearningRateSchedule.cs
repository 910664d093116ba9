namespace AdapterFlow.Training;

/// <summary>Shape of the learning rate after warmup.</summary>
public enum LrScheduleKind
{
    Constant,
    Linear,
    Cosine,
}

/// <summary>
/// Learning-rate schedules with linear warmup, as transformers' get_{constant,linear,cosine}_schedule_with_warmup:
/// optimizer step s (0-based) uses peak × factor(s), where factor rises as s / warmup during warmup, then stays
/// at 1 (constant), falls linearly to 0 at <c>totalSteps</c> (linear) or follows half a cosine to 0 (cosine).
/// <para>
/// Re-warming for continued pretraining (Ibrahim et al., 2024, "Simple and Scalable Strategies to Continually
/// Pre-train Large Language Models"): a run that starts from a pretrained model warms up again from a low rate
/// (<see cref="WarmupStartLearningRate"/>, typically where the previous run's decay ended) to the peak and then
/// decays to <see cref="MinLearningRate"/> instead of 0: during warmup the rate is
/// start + (peak − start) · s / warmup, afterwards min + (peak − min) · factor(s). With both at 0 (the
/// defaults) the values are transformers'.
/// </para>
/// </summary>
public sealed record LearningRateSchedule(LrScheduleKind Kind, double PeakLearningRate, int WarmupSteps, int TotalSteps)
{
    /// <summary>Where warmup starts (0: from nothing, as transformers).</summary>
    public double WarmupStartLearningRate { get; init; }

    /// <summary>Where linear and cosine decay end (0: to nothing, as transformers).</summary>
    public double MinLearningRate { get; init; }

    /// <summary>The learning rate of optimizer step <paramref name="step"/> (0-based).</summary>
    public double At(int step)
    {
        if (step < 0) throw new ArgumentOutOfRangeException(nameof(step), $"step must be non-negative, got {step}");
        if (step < WarmupSteps) return WarmupStartLearningRate + (PeakLearningRate - WarmupStartLearningRate) * step / Math.Max(1, WarmupSteps);
        // Clamped: past the last step the rate stays at the floor (transformers' cosine would rise again).
        double progress = Math.Min(1.0, (double)(step - WarmupSteps) / Math.Max(1, TotalSteps - WarmupSteps));
        double factor = Kind switch
        {
            LrScheduleKind.Constant => 1.0,
            LrScheduleKind.Linear => Math.Max(0.0, 1.0 - progress),
            LrScheduleKind.Cosine => Math.Max(0.0, 0.5 * (1.0 + Math.Cos(Math.PI * progress))),
            _ => throw new ArgumentOutOfRangeException(nameof(Kind), $"unknown schedule {Kind}"),
        };
        return MinLearningRate + (PeakLearningRate - MinLearningRate) * factor;
    }

    /// <summary>Parses "constant", "linear" or "cosine" (case-insensitive).</summary>
    public static LrScheduleKind ParseKind(string name) =>
        Enum.TryParse<LrScheduleKind>(name, ignoreCase: true, out var kind) && Enum.IsDefined(kind)
            ? kind
            : throw new ArgumentException($"unknown learning-rate schedule '{name}' (expected constant, linear or cosine)");
}

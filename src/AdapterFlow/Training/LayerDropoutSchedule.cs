using System.Globalization;

namespace AdapterFlow.Training;

/// <summary>How layer dropout's rate grows with depth, D(l) (LayerSkip's prob_layer_scale).</summary>
public enum LayerDropoutScale
{
    /// <summary>D(l) = e^{l·ln2/(L−1)} − 1: 0 at the first layer, 1 at the last, rising faster at depth (LayerSkip's default).</summary>
    Exponential,
    /// <summary>D(l) = l/(L−1).</summary>
    Linear,
    /// <summary>D(l) = 1: every layer at p_max.</summary>
    Uniform,
}

/// <summary>How layer dropout's rate grows over training, S(t).</summary>
public enum LayerDropoutCurriculum
{
    /// <summary>S(t) = 1 throughout (fine-tuning and continual pretraining).</summary>
    None,
    /// <summary>S(t) = e^{t·ln2/T} − 1: no dropout at the first step, p_max by the end (pretraining from scratch).</summary>
    Exponential,
}

/// <summary>
/// LayerSkip's layer dropout (Elhoushi et al. 2024, §4.1): during training each batch row skips decoder layer l with
/// probability p_l = S(t)·D(l)·p_max, so late layers are skipped most and the model learns to rely less on them.
/// <c>new LayerDropoutOptions(0.1)</c> is the paper's fine-tuning setting (exponential in depth, constant in time).
/// </summary>
/// <param name="MaxRate">p_max: the rate of the last layer at the end of the curriculum, in [0, 1).</param>
/// <param name="Scale">D(l), the shape over depth.</param>
/// <param name="Curriculum">S(t), the shape over training steps.</param>
public sealed record LayerDropoutOptions(double MaxRate, LayerDropoutScale Scale = LayerDropoutScale.Exponential,
    LayerDropoutCurriculum Curriculum = LayerDropoutCurriculum.None)
{
    /// <summary>Throws a one-line <see cref="ArgumentException"/> when a value is out of range.</summary>
    public void Validate()
    {
        if (!(MaxRate >= 0 && MaxRate < 1))
            throw new ArgumentException($"layer dropout rate must be in [0, 1), got {MaxRate.ToString(CultureInfo.InvariantCulture)}");
        if (!Enum.IsDefined(Scale)) throw new ArgumentException($"unknown layer dropout scale {Scale}");
        if (!Enum.IsDefined(Curriculum)) throw new ArgumentException($"unknown layer dropout curriculum {Curriculum}");
    }

    /// <summary>Parses "exp" (or "exponential"), "linear" or "uniform", case-insensitive.</summary>
    public static LayerDropoutScale ParseScale(string name) => name.ToLowerInvariant() switch
    {
        "exp" or "exponential" => LayerDropoutScale.Exponential,
        "linear" => LayerDropoutScale.Linear,
        "uniform" => LayerDropoutScale.Uniform,
        _ => throw new ArgumentException($"unknown layer dropout scale '{name}' (expected exp, linear or uniform)"),
    };

    /// <summary>Parses "none" or "exp" (or "exponential"), case-insensitive.</summary>
    public static LayerDropoutCurriculum ParseCurriculum(string name) => name.ToLowerInvariant() switch
    {
        "none" or "constant" => LayerDropoutCurriculum.None,
        "exp" or "exponential" => LayerDropoutCurriculum.Exponential,
        _ => throw new ArgumentException($"unknown layer dropout curriculum '{name}' (expected none or exp)"),
    };
}

/// <summary>
/// The per-layer skip probabilities of one training run: <see cref="RatesAt"/> gives what <c>ForwardInput.LayerDropout</c>
/// takes at a step. Pure function of (step, layer), so a resumed run draws with the same rates.
/// </summary>
public sealed class LayerDropoutSchedule
{
    public LayerDropoutSchedule(LayerDropoutOptions options, int numLayers, int totalSteps)
    {
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        if (numLayers < 1) throw new ArgumentException($"layer dropout needs at least one layer, got {numLayers}");
        if (totalSteps < 1) throw new ArgumentException($"layer dropout needs a positive number of training steps, got {totalSteps}");
        Options = options;
        NumLayers = numLayers;
        TotalSteps = totalSteps;
        _depth = Enumerable.Range(0, numLayers).Select(l => options.MaxRate * DepthScale(options.Scale, l, numLayers)).ToArray();
    }

    private readonly double[] _depth; // D(l)·p_max

    public LayerDropoutOptions Options { get; }
    public int NumLayers { get; }
    public int TotalSteps { get; }

    /// <summary>p_l = S(step)·D(l)·p_max for every layer at optimizer step <paramref name="step"/> (0-based).</summary>
    public double[] RatesAt(int step)
    {
        if (step < 0) throw new ArgumentOutOfRangeException(nameof(step), $"step must be non-negative, got {step}");
        double time = TimeScale(Options.Curriculum, step, TotalSteps);
        return _depth.Select(rate => time * rate).ToArray();
    }

    /// <summary>True when no layer is ever dropped (p_max = 0): the trainer then passes no rates at all.</summary>
    public bool IsOff => Options.MaxRate == 0;

    /// <summary>
    /// D(l) for layer <paramref name="layer"/> of <paramref name="numLayers"/>: 0 at the first layer and 1 at the last for
    /// the exponential and linear shapes. A one-layer model has D = 1 (as LayerSkip's get_scale with a zero period).
    /// </summary>
    public static double DepthScale(LayerDropoutScale scale, int layer, int numLayers)
    {
        if (layer < 0 || layer >= numLayers) throw new ArgumentOutOfRangeException(nameof(layer), $"layer {layer} is outside 0..{numLayers - 1}");
        if (numLayers == 1) return 1;
        double x = (double)layer / (numLayers - 1);
        return scale switch
        {
            LayerDropoutScale.Exponential => Math.Exp(x * Math.Log(2)) - 1,
            LayerDropoutScale.Linear => x,
            LayerDropoutScale.Uniform => 1,
            _ => throw new ArgumentOutOfRangeException(nameof(scale), $"unknown layer dropout scale {scale}"),
        };
    }

    /// <summary>S(t) at step <paramref name="step"/> of <paramref name="totalSteps"/>: 1, or e^{t·ln2/T} − 1 (0 at t = 0, 1 at t = T).</summary>
    public static double TimeScale(LayerDropoutCurriculum curriculum, int step, int totalSteps) => curriculum switch
    {
        LayerDropoutCurriculum.None => 1,
        LayerDropoutCurriculum.Exponential => Math.Exp(Math.Min(step, totalSteps) * Math.Log(2) / totalSteps) - 1,
        _ => throw new ArgumentOutOfRangeException(nameof(curriculum), $"unknown layer dropout curriculum {curriculum}"),
    };
}

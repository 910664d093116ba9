using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Training;

/// <summary>
/// The number formats a training run computes and keeps its state in (<see cref="TrainerOptions.Precision"/>).
/// TorchSharp 0.107 has no <c>torch.autocast</c>, so mixed precision is done with master weights (as apex O2 and
/// DeepSpeed's bf16 mode): the model computes in bfloat16, the trainer keeps float32 copies of what it trains.
/// </summary>
public enum TrainingPrecision
{
    /// <summary>Everything in float32: the model's weights, gradients, AdamW's moments.</summary>
    Float32,

    /// <summary>
    /// Forward and backward in bfloat16 (the whole model, frozen base and trainable weights, is held in bfloat16);
    /// float32 master copies of the trainable weights, float32 gradients accumulated across micro-batches and
    /// float32 AdamW moments. Loss, softmax and norm statistics are computed in float32 by the model code.
    /// </summary>
    BFloat16Mixed,

    /// <summary>
    /// Pure bfloat16: weights, gradients and AdamW's moments all in bfloat16 (least memory; updates smaller than
    /// bfloat16's resolution of a weight, about 2⁻⁸ of it, are lost, so prefer <see cref="BFloat16Mixed"/> for long runs).
    /// </summary>
    BFloat16,
}

/// <summary>Command-line and recipe names of <see cref="TrainingPrecision"/>: fp32, bf16-mixed, bf16.</summary>
public static class TrainingPrecisionNames
{
    public static readonly IReadOnlyList<string> All = ["fp32", "bf16-mixed", "bf16"];

    public static TrainingPrecision Parse(string name) => name.ToLowerInvariant() switch
    {
        "fp32" or "float32" => TrainingPrecision.Float32,
        "bf16-mixed" or "bfloat16-mixed" => TrainingPrecision.BFloat16Mixed,
        "bf16" or "bfloat16" => TrainingPrecision.BFloat16,
        _ => throw new ArgumentException($"unknown precision '{name}' (expected {string.Join(", ", All)})"),
    };

    public static string Name(TrainingPrecision precision) => precision switch
    {
        TrainingPrecision.Float32 => "fp32",
        TrainingPrecision.BFloat16Mixed => "bf16-mixed",
        TrainingPrecision.BFloat16 => "bf16",
        _ => throw new ArgumentOutOfRangeException(nameof(precision)),
    };

    /// <summary>The dtype the model computes in under <paramref name="precision"/>.</summary>
    public static ScalarType ComputeType(TrainingPrecision precision) =>
        precision == TrainingPrecision.Float32 ? ScalarType.Float32 : ScalarType.BFloat16;
}

/// <summary>
/// Puts a model into the dtypes a <see cref="TrainingPrecision"/> asks for, and for
/// <see cref="TrainingPrecision.BFloat16Mixed"/> keeps the float32 master weights: bfloat16 gradients are added into
/// the masters' float32 gradients after every backward pass (so accumulation over micro-batches is in float32), the
/// optimizer steps the masters, and the model's bfloat16 weights are refreshed from them after every step.
/// </summary>
internal sealed class PrecisionPlan : IDisposable
{
    private readonly nn.Module _model;
    private readonly string[] _names;
    private readonly Parameter[] _masters;
    private Parameter[] _compute;
    // Which masters' gradients a micro-batch of the current step has written (the first one copies, later ones add).
    private readonly bool[] _accumulated;

    private PrecisionPlan(nn.Module model, string[] names, Parameter[] masters, Parameter[] compute)
    {
        _model = model;
        _names = names;
        _masters = masters;
        _compute = compute;
        _accumulated = new bool[masters.Length];
    }

    /// <summary>
    /// Converts <paramref name="model"/> for <paramref name="precision"/> and returns the parameters the optimizer
    /// should own (the model's own, or float32 masters) and, for mixed precision, the plan that keeps them in step.
    /// </summary>
    public static (IReadOnlyList<(string Name, Parameter Parameter)> Optimized, PrecisionPlan? Plan) Apply(
        nn.Module model, IReadOnlyList<(string Name, Parameter Parameter)> trainable, TrainingPrecision precision)
    {
        var compute = TrainingPrecisionNames.ComputeType(precision);
        if (precision != TrainingPrecision.BFloat16Mixed)
        {
            if (!NeedsConversion(model, compute)) return (trainable, null);
            var names = trainable.Select(p => p.Name).ToArray();
            model.to(compute);
            return (names.Zip(Find(model, names, precision)).ToList(), null);
        }
        var masterNames = trainable.Select(p => p.Name).ToArray();
        Parameter[] masters;
        using (no_grad())
        {
            // Owned by the trainer for its lifetime, not by whatever dispose scope the caller is in.
            masters = trainable.Select(p => new Parameter(p.Parameter.detach().to(ScalarType.Float32, copy: true), requires_grad: true)).ToArray();
            foreach (var master in masters) master.DetachFromDisposeScope();
        }
        if (NeedsConversion(model, compute)) model.to(compute);
        var plan = new PrecisionPlan(model, masterNames, masters, Find(model, masterNames, precision));
        return (masterNames.Zip(masters).ToList(), plan);
    }

    private static bool NeedsConversion(nn.Module model, ScalarType dtype) =>
        model.parameters().Any(p => p.is_floating_point() && p.dtype != dtype);

    /// <summary>The model's parameters with these names: module conversion may replace the Parameter objects.</summary>
    private static Parameter[] Find(nn.Module model, string[] names, TrainingPrecision precision)
    {
        var byName = new Dictionary<string, Parameter>();
        foreach (var (name, parameter) in model.named_parameters()) byName.TryAdd(name, parameter);
        return names.Select(n => byName.TryGetValue(n, out var p) ? p
            : throw new ArgumentException($"precision {TrainingPrecisionNames.Name(precision)}: trainable parameter '{n}' is not named as in the model's named_parameters()")).ToArray();
    }

    /// <summary>Float32 master weights (by name), in the order the optimizer holds them.</summary>
    public IEnumerable<(string Name, Parameter Master)> Masters => _names.Zip(_masters);

    /// <summary>
    /// Starts a step's accumulation instead of zeroing the masters' gradients: the step's first micro-batch
    /// overwrites them (a copy instead of zeroing and then adding: one pass over 4 bytes per parameter less).
    /// </summary>
    public void BeginStep() => Array.Clear(_accumulated);

    /// <summary>Adds the model's bfloat16 gradients into the masters' float32 ones (the step's first: copies them) and clears the model's.</summary>
    public void AccumulateGradients()
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        for (int i = 0; i < _masters.Length; i++)
        {
            var grad = _compute[i].grad;
            if (grad is null) continue;
            var master = _masters[i];
            if (master.grad is not { } sum) master.grad = grad.to(ScalarType.Float32, copy: true);
            else if (_accumulated[i]) sum.add_(grad);
            else sum.copy_(grad);
            _accumulated[i] = true;
            grad.zero_();
        }
    }

    /// <summary>
    /// Ends a step's accumulation: masters that no micro-batch gave a gradient this step (a layer skipped by layer
    /// dropout, say) get a zero one, as the optimizer's zero_grad would have left them.
    /// </summary>
    public void FinishStep()
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        for (int i = 0; i < _masters.Length; i++)
            if (!_accumulated[i] && _masters[i].grad is { } grad) grad.zero_();
    }

    /// <summary>Copies the masters into the model's bfloat16 weights (rounding to nearest).</summary>
    public void CopyToModel()
    {
        using var noGrad = no_grad();
        for (int i = 0; i < _masters.Length; i++) _compute[i].copy_(_masters[i]);
    }

    /// <summary>
    /// The model's bfloat16 weight for a master, for an optimizer that writes the rounded weights itself in the pass
    /// that updates the masters (<see cref="FusedAdamW"/>); null when some copy is not a contiguous bfloat16 CPU tensor
    /// (then <see cref="CopyToModel"/> does it).
    /// </summary>
    public Func<Parameter, Tensor>? FusableCopies()
    {
        if (!InComputeForm || !_compute.All(c => c.dtype == ScalarType.BFloat16 && c.device_type == DeviceType.CPU && c.is_contiguous()))
            return null;
        var byMaster = new Dictionary<IntPtr, Tensor>();
        for (int i = 0; i < _masters.Length; i++) byMaster[_masters[i].Handle] = _compute[i];
        return master => byMaster[master.Handle];
    }

    /// <summary>Whether the model is currently in its bfloat16 training form (false after <see cref="RestoreFloat32"/>).</summary>
    public bool InComputeForm { get; private set; } = true;

    /// <summary>
    /// Converts the model back to float32 and puts the exact master weights into its trained parameters (the frozen
    /// ones keep their bfloat16-rounded values), so that it can be saved or used in float32.
    /// </summary>
    public void RestoreFloat32()
    {
        if (!InComputeForm) return;
        _model.to(ScalarType.Float32);
        _compute = Find(_model, _names, TrainingPrecision.BFloat16Mixed);
        using (no_grad())
            for (int i = 0; i < _masters.Length; i++) _compute[i].copy_(_masters[i]);
        InComputeForm = false;
    }

    /// <summary>Back to the bfloat16 training form after <see cref="RestoreFloat32"/>.</summary>
    public void EnsureComputeForm()
    {
        if (InComputeForm) return;
        _model.to(ScalarType.BFloat16);
        _compute = Find(_model, _names, TrainingPrecision.BFloat16Mixed);
        CopyToModel();
        InComputeForm = true;
    }

    public void Dispose()
    {
        foreach (var master in _masters) master.Dispose();
    }
}

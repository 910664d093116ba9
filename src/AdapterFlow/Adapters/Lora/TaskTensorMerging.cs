using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Adapters.Lora;

/// <summary>How TIES elects the sign each entry keeps (PEFT's majority_sign_method).</summary>
public enum MajoritySignMethod
{
    /// <summary>The sign of the sum of the values.</summary>
    Total,
    /// <summary>The sign most tensors have (count of positive minus count of negative).</summary>
    Frequency,
}

/// <summary>
/// Merging of task tensors (same-shaped tensors from several adapters) as PEFT's merge utilities define it:
/// task arithmetic, magnitude pruning, TIES (trim, elect sign, disjoint merge) and DARE (random drop and rescale).
/// </summary>
public static class TaskTensorMerging
{
    /// <summary>Keeps the ⌊density·numel⌋ entries of largest magnitude, zeroes the rest; density ≥ 1 keeps all.</summary>
    public static Tensor MagnitudePrune(Tensor tensor, double density)
    {
        CheckDensity(density);
        if (density >= 1) return tensor.alias();
        using var scope = torch.NewDisposeScope();
        long k = (long)(density * tensor.numel());
        var flat = tensor.reshape(-1);
        var mask = torch.zeros_like(flat);
        if (k > 0) mask.index_fill_(0, flat.abs().topk((int)k).indexes, 1);
        return (tensor * mask.reshape(tensor.shape)).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Keeps each entry with probability <paramref name="density"/> (a Bernoulli draw from
    /// <paramref name="generator"/>, a CPU generator, or torch's global one), dividing the kept ones by the density
    /// when <paramref name="rescale"/> so that the expected value is unchanged (DARE). density ≥ 1 keeps all.
    /// </summary>
    public static Tensor RandomPrune(Tensor tensor, double density, bool rescale, torch.Generator? generator = null)
    {
        CheckDensity(density);
        if (density >= 1) return tensor.alias();
        using var scope = torch.NewDisposeScope();
        // Drawn on the CPU so that a seeded generator gives the same mask on every device.
        var keep = torch.bernoulli(torch.full(tensor.shape, density, dtype: ScalarType.Float32), generator).to(tensor.dtype).to(tensor.device);
        var pruned = tensor * keep;
        if (rescale) pruned = pruned / density;
        return pruned.MoveToOuterDisposeScope();
    }

    /// <summary>For tensors stacked on dimension 0: true where an entry has the elected (majority) sign; ties elect +.</summary>
    public static Tensor MajoritySignMask(Tensor stacked, MajoritySignMethod method = MajoritySignMethod.Total)
    {
        using var scope = torch.NewDisposeScope();
        var sign = stacked.sign();
        // sum(0L), not sum(0): a literal 0 converts to ScalarType and picks the whole-tensor sum overload.
        var magnitude = method == MajoritySignMethod.Total ? stacked.sum(0L) : sign.sum(0L);
        var majority = magnitude.ge(0).to(sign.dtype) * 2 - 1; // ties (0) elect +
        return sign.eq(majority).MoveToOuterDisposeScope();
    }

    /// <summary>Mean over dimension 0 of the entries that agree with the elected sign (0 where none does).</summary>
    public static Tensor DisjointMerge(Tensor stacked, Tensor signMask)
    {
        using var scope = torch.NewDisposeScope();
        var sum = (stacked * signMask).sum(0L);
        var count = signMask.sum(0L).to(stacked.dtype).clamp_min(1);
        return (sum / count).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Merges same-shaped <paramref name="tensors"/> with <paramref name="weights"/> by <paramref name="combination"/>:
    /// Linear (Σ wᵢ·tᵢ), MagnitudePrune (each pruned to the density, then Σ wᵢ·tᵢ), Ties (magnitude-pruned, sign
    /// elected on the unweighted tensors, disjoint mean of the weighted ones), DareLinear (randomly pruned and
    /// rescaled, then Σ wᵢ·tᵢ) or DareTies (randomly pruned and rescaled, then as Ties).
    /// </summary>
    public static Tensor Merge(LoraCombinationType combination, IReadOnlyList<Tensor> tensors, IReadOnlyList<double> weights,
        double density = 1, MajoritySignMethod majoritySignMethod = MajoritySignMethod.Total, torch.Generator? generator = null)
    {
        if (tensors.Count == 0 || tensors.Count != weights.Count)
            throw new ArgumentException($"give one weight per tensor ({tensors.Count} tensors, {weights.Count} weights)");
        using var scope = torch.NewDisposeScope();
        var pruned = combination switch
        {
            LoraCombinationType.Linear => tensors.ToArray(),
            LoraCombinationType.MagnitudePrune or LoraCombinationType.Ties => tensors.Select(t => MagnitudePrune(t, density)).ToArray(),
            LoraCombinationType.DareLinear or LoraCombinationType.DareTies => tensors.Select(t => RandomPrune(t, density, rescale: true, generator)).ToArray(),
            _ => throw new ArgumentException($"{combination} is not a task-tensor merge (it works on whole LoRA updates)"),
        };
        var stacked = torch.stack(pruned);
        var shape = new long[stacked.dim()];
        Array.Fill(shape, 1L);
        shape[0] = tensors.Count;
        var w = torch.tensor(weights.ToArray(), dtype: stacked.dtype, device: stacked.device).reshape(shape);
        var weighted = stacked * w;
        var merged = combination is LoraCombinationType.Ties or LoraCombinationType.DareTies
            ? DisjointMerge(weighted, MajoritySignMask(stacked, majoritySignMethod))
            : weighted.sum(0L);
        return merged.MoveToOuterDisposeScope();
    }

    private static void CheckDensity(double density)
    {
        if (double.IsNaN(density) || density < 0) throw new ArgumentException($"density must be in [0, 1], got {density}");
    }
}

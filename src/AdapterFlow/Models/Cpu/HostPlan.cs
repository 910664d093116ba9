using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Models.Cpu;

/// <summary>
/// What one generation's host passes (<see cref="LlamaCpuDecoder.HostPass"/>) read of a model: each projection slot's
/// view (weight and bias pointers, LoRA terms, or "through libtorch"), norm and embedding pointers, the head, and the
/// thread count, looked up on first use and then kept. Every one of those lookups is a few native calls into libtorch
/// (dtype, device, shape, contiguity, data pointer); per pass they cost a small model as much as its products do (the
/// 0.7M quickstart model's one-token step: 129 µs without a plan, 63 µs with one, in a tight loop, 12-07). Valid while
/// the weights stay where they are, which the decoding loops assume for a whole generation (as they do for
/// <see cref="LlamaCpuDecoder.CanRunHostPasses"/> and the panel copies): make a new plan per generation.
/// </summary>
internal sealed unsafe class HostPlan
{
    private readonly Dictionary<object, ProjectionView?> _projections = new(ReferenceEqualityComparer.Instance);
    private readonly Dictionary<object, nint> _pointers = new(ReferenceEqualityComparer.Instance);

    /// <summary>Workers for the pass's parallel kernels (torch's thread count when the plan was made, or <see cref="CpuKernels.Threads"/>).</summary>
    public int Workers { get; } = CpuKernels.WorkerCount;

    /// <summary>The LM head's float32 weight when it is a plain one the kernels read (0 when it is not); null until the first pass asks.</summary>
    public nint? HeadWeight { get; set; }

    /// <summary>The kernels' view of a projection slot (<see cref="LlamaCpuDecoder.Describe"/>), null when it runs through libtorch.</summary>
    public ProjectionView? Projection(nn.Module<Tensor, Tensor> module, int inFeatures, int outFeatures)
    {
        if (!_projections.TryGetValue(module, out var view)) _projections[module] = view = LlamaCpuDecoder.Describe(module, inFeatures, outFeatures);
        return view;
    }

    /// <summary>Projection slots described so far.</summary>
    public int ProjectionCount => _projections.Count;

    /// <summary>The memory of a float32 CPU tensor the pass reads (a norm's weight, the embedding table).</summary>
    public float* Pointer(Tensor tensor)
    {
        if (!_pointers.TryGetValue(tensor, out var pointer)) _pointers[tensor] = pointer = (nint)CpuKernels.Pointer(tensor);
        return (float*)pointer;
    }
}

/// <summary>A projection as the kernels run it: y = W x (+ bias) + Σ s · B (A x); pointers to float32 row-major memory (Bias 0 = none).</summary>
internal sealed record ProjectionView(nint Weight, nint Bias, LowRankView[] Terms);

/// <summary>One unmerged LoRA term: A [rank, in], B [out, rank], scale s.</summary>
internal readonly record struct LowRankView(nint A, nint B, int Rank, float Scale);

using System.Runtime.InteropServices;
using AdapterFlow.Adapters.Lora;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Models.Cpu;

/// <summary>
/// Batch-1 decode step of the LLaMA family (Llama, Mistral, Qwen2) on the CPU in float32, computed by
/// <see cref="CpuKernels"/> over the tensors' memory instead of ~50 libtorch calls per layer. It engages only for
/// what it reproduces exactly (same logits as the libtorch path up to summation order, about 1e-6): inference
/// (not training, no autograd), one row, a KV cache, float32 weights on the CPU, rotate-half rotary. One new token
/// is the decode step below; 2..<see cref="MaxTokensPerPass"/> new tokens (short prompt tails, self-speculative
/// verification) run through the multi-token pass in LlamaCpuDecoder.Tokens.cs. Early exit, a start layer with its
/// layer input, hidden-state output and a skipped head work as in <see cref="CausalLM.forward"/>. Anything else
/// returns null and the caller runs the libtorch path.
/// <para>
/// Inside a step, projections it understands (nn.Linear; LoRA wrappers over one with unmerged, non-DoRA adapters
/// and no per-row routing) run as matrix-vector products; any other module in a projection or MLP slot (IA3,
/// bottleneck adapters, DoRA, …) is called through libtorch on a [1, 1, features] tensor, so adapters keep working
/// and only pay for themselves.
/// </para>
/// </summary>
internal static unsafe partial class LlamaCpuDecoder
{
    /// <summary>Decode steps this thread ran through the kernels (tests check that the path engages, or not).</summary>
    [ThreadStatic] internal static int StepsOnThisThread;

    public static ForwardOutput? TryForward(LlamaForCausalLM model, ForwardInput input)
    {
        if (model.training || input.Cache is not { } cache || torch.is_grad_enabled()) return null;
        int layers = input.ExitLayer ?? model.NumLayers;
        int start = input.StartLayer;
        if (layers < 1 || layers > model.NumLayers || start < 0 || start >= layers || cache.NumLayers != model.NumLayers) return null;
        if ((start > 0) != (input.LayerInput is not null)) return null;
        if (model.Rotary.Layout != RotaryLayout.RotateHalf) return null;
        // One new token (a decode step) or a few (drafts to verify, a prompt's short tail): the same pass.
        return TryForwardTokens(model, input, cache, start, layers, NewTokens(input));
    }

    /// <summary>RMSNorm of each of <paramref name="time"/> rows of x into y (its weight was checked before the pass started).</summary>
    private static void RmsNorm(RMSNorm norm, float* x, float* y, int n, int time)
    {
        float* weight = WeightPointer(norm.weight);
        for (int t = 0; t < time; t++) CpuKernels.RmsNorm(x + (long)t * n, weight, y + (long)t * n, n, norm.Eps);
    }

    /// <summary>The gated MLP of <paramref name="time"/> tokens into <see cref="Buffers.Output"/>; an MLP slot holding anything else runs through libtorch.</summary>
    private static void Mlp(nn.Module<Tensor, Tensor> module, LlamaConfig config, int time, Buffers buffers)
    {
        int hidden = config.HiddenSize, inner = config.IntermediateSize;
        if (module is LlamaMLP mlp && config.HiddenAct is "silu" or "swish")
        {
            // gate and up in one parallel region, each row block finishing with silu(gate) · up.
            var gateUp = Group(buffers.Normed, hidden, time);
            bool fused = AddProjection(gateUp, mlp.gate_proj, buffers.Normed, hidden, buffers.Gate, inner, time);
            fused &= AddProjection(gateUp, mlp.up_proj, buffers.Normed, hidden, buffers.Up, inner, time);
            if (fused) gateUp.PairSiluMul();
            gateUp.Run();
            if (!fused) CpuKernels.SiluMul(buffers.Gate, buffers.Up, time * inner);
            Project(mlp.down_proj, buffers.Gate, inner, buffers.Output, hidden, time);
        }
        else
        {
            ThroughTorch(module, buffers.Normed, hidden, buffers.Output, hidden, time);
        }
    }

    /// <summary>y = module(x) for a linear slot: nn.Linear and plain LoRA directly, anything else through libtorch.</summary>
    private static void Project(nn.Module<Tensor, Tensor> module, float* x, int inFeatures, float* y, int outFeatures, int time)
    {
        var group = Group(x, inFeatures, time);
        AddProjection(group, module, x, inFeatures, y, outFeatures, time);
        group.Run();
    }

    [ThreadStatic] private static ProjectionGroup? t_group;

    /// <summary>The panel copies the current pass over several tokens on this thread reads (null for other passes).</summary>
    [ThreadStatic] private static PackedWeights? t_packed;

    /// <summary>The plan of the current host pass on this thread (null for passes from <see cref="TryForward"/>).</summary>
    [ThreadStatic] private static HostPlan? t_plan;

    /// <summary>
    /// Makes (or refreshes, where the weights changed since) panel copies (<see cref="PanelMatrix"/>) of the projection
    /// matrices of layers <paramref name="fromLayer"/>..L−1 and of a plain LM head, which self-speculative verification
    /// runs over d + 1 tokens: there they cost about one token's memory traffic instead of 1.3–1.7 (bench suite
    /// <c>gemmtokens</c>). Does nothing without 512-bit vectors, or when the copies would take more than a quarter of
    /// the memory the runtime sees. Returns the model's copies (<see cref="LlamaForCausalLM.PackedCpuWeights"/>), null
    /// when it has none.
    /// </summary>
    internal static PackedWeights? PackForVerification(LlamaForCausalLM model, int fromLayer)
    {
        if (!PanelMatrix.Supported) return null;
        var config = model.LlamaConfig;
        int hidden = config.HiddenSize, attention = config.NumAttentionHeads * config.HeadDim, kv = config.NumKeyValueHeads * config.HeadDim;
        int inner = config.IntermediateSize;
        var matrices = new List<(nint Weight, int Rows, int Cols)>();
        // The base matrix of every slot the kernels run (an nn.Linear, or the base of a LoRA wrapper), as they see it.
        void Add(nn.Module<Tensor, Tensor> module, int inFeatures, int outFeatures)
        {
            if (Describe(module, inFeatures, outFeatures) is { } view) matrices.Add((view.Weight, outFeatures, inFeatures));
        }
        for (int i = Math.Max(0, fromLayer); i < model.NumLayers; i++)
        {
            var layer = model.model.layers[i];
            Add(layer.self_attn.q_proj, hidden, attention);
            Add(layer.self_attn.k_proj, hidden, kv);
            Add(layer.self_attn.v_proj, hidden, kv);
            Add(layer.self_attn.o_proj, attention, hidden);
            if (layer.mlp is LlamaMLP mlp)
            {
                Add(mlp.gate_proj, hidden, inner);
                Add(mlp.up_proj, hidden, inner);
                Add(mlp.down_proj, inner, hidden);
            }
        }
        if (KernelHead(model) is { } head) matrices.Add(((nint)CpuKernels.Pointer(head), config.VocabSize, hidden));
        lock (PackGate) return Pack(model, matrices);
    }

    /// <summary>Most bytes a model's panel copies may take; null = a quarter of the memory the runtime sees (tests set it).</summary>
    internal static long? PackBudgetBytes { get; set; }

    /// <summary>Generations on other threads may pack the same model at the same time; one at a time changes the copies.</summary>
    private static readonly Lock PackGate = new();

    private static PackedWeights? Pack(LlamaForCausalLM model, List<(nint Weight, int Rows, int Cols)> matrices)
    {
        var packed = model.PackedCpuWeights;
        long needed = matrices.Sum(m => packed?.Find((float*)m.Weight) is null ? (long)m.Rows / PanelMatrix.Width * PanelMatrix.Width * m.Cols * sizeof(float) : 0);
        bool fits = needed == 0 || (packed?.Bytes ?? 0) + needed <= (PackBudgetBytes ?? GC.GetGCMemoryInfo().TotalAvailableMemoryBytes / 4);
        if (!fits && packed is null) return null;
        packed = model.PackedCpuWeights ??= new PackedWeights();
        // Over the budget, the copies already made (for a higher exit layer) are still checked, and kept if current.
        foreach (var (weight, rows, cols) in matrices)
            if (fits || packed.Find((float*)weight) is not null) packed.Add((float*)weight, rows, cols);
        return packed;
    }

    /// <summary>This thread's (empty) projection group over input x [time, inFeatures].</summary>
    private static ProjectionGroup Group(float* x, int inFeatures, int time)
    {
        var group = t_group ??= new ProjectionGroup();
        group.Begin(x, inFeatures, time);
        return group;
    }

    /// <summary>
    /// Adds y = module(x) to the group when the module is an nn.Linear or a plain LoRA over one (true); anything else
    /// runs through libtorch at once (false).
    /// </summary>
    private static bool AddProjection(ProjectionGroup group, nn.Module<Tensor, Tensor> module, float* x, int inFeatures, float* y, int outFeatures, int time)
    {
        var view = t_plan is { } plan ? plan.Projection(module, inFeatures, outFeatures) : Describe(module, inFeatures, outFeatures);
        if (view is null)
        {
            ThroughTorch(module, x, inFeatures, y, outFeatures, time);
            return false;
        }
        group.AddTarget((float*)view.Weight, (float*)view.Bias, y, outFeatures, t_packed?.Find((float*)view.Weight));
        foreach (var term in view.Terms) group.AddLora((float*)term.A, (float*)term.B, term.Rank, term.Scale);
        return true;
    }

    /// <summary>
    /// The LM head's weight when the kernels read it: a plain head (<see cref="LlamaForCausalLM.PlainHead"/>: the tied
    /// embedding or an unbiased nn.Linear) of float32 [vocab, hidden] on the CPU; else null (the head runs through libtorch).
    /// </summary>
    private static Tensor? KernelHead(LlamaForCausalLM model) =>
        model.PlainHead() is (_, var weight) && IsF32Cpu(weight, model.LlamaConfig.VocabSize, model.LlamaConfig.HiddenSize) ? weight : null;

    private static bool IsKernelLinear(Linear linear, int inFeatures, int outFeatures) =>
        linear.weight is { } weight && IsF32Cpu(weight, outFeatures, inFeatures) && (linear.bias is not { } bias || IsF32Cpu(bias, outFeatures));

    /// <summary>
    /// What the kernels read of a projection slot: an nn.Linear's weight (and bias), or a LoRA wrapper's base weight
    /// plus s · B (A x) per active unmerged adapter (dropout is off at inference). Null (the slot runs through libtorch)
    /// for anything else, and for LoRA with routing, DoRA, biases on A/B or tensors the kernels cannot read.
    /// </summary>
    internal static ProjectionView? Describe(nn.Module<Tensor, Tensor> module, int inFeatures, int outFeatures)
    {
        if (module is Linear linear)
            return IsKernelLinear(linear, inFeatures, outFeatures)
                ? new ProjectionView((nint)CpuKernels.Pointer(linear.weight!), linear.bias is { } bias ? (nint)CpuKernels.Pointer(bias) : 0, [])
                : null;
        if (module is not LoraLinear lora || lora.Routing is not null || lora.BaseLayer is not Linear baseLinear || !IsKernelLinear(baseLinear, inFeatures, outFeatures))
            return null;
        var terms = new List<LowRankView>();
        var merged = lora.MergedAdapters;
        foreach (var adapter in lora.Disabled ? [] : lora.ActiveAdapters)
        {
            if (merged.Contains(adapter)) continue;
            if (lora.IsDora(adapter)) return null;
            Linear a = lora.A(adapter), b = lora.B(adapter);
            if (a.bias is not null || b.bias is not null || a.weight is not { } aw || b.weight is not { } bw || aw.dim() != 2) return null;
            long rank = aw.shape[0];
            if (!IsF32Cpu(aw, rank, inFeatures) || !IsF32Cpu(bw, outFeatures, rank)) return null;
            terms.Add(new LowRankView((nint)CpuKernels.Pointer(aw), (nint)CpuKernels.Pointer(bw), (int)rank, (float)lora.Scaling(adapter)));
        }
        var baseView = Describe(baseLinear, inFeatures, outFeatures)!;
        return baseView with { Terms = [.. terms] };
    }

    /// <summary>Runs any module on x as a [1, time, in] tensor and copies its [1, time, out] result to y.</summary>
    private static void ThroughTorch(nn.Module<Tensor, Tensor> module, float* x, int inFeatures, float* y, int outFeatures, int time)
    {
        var input = torch.empty([1, time, inFeatures], ScalarType.Float32);
        new ReadOnlySpan<float>(x, time * inFeatures).CopyTo(new Span<float>(CpuKernels.Pointer(input), time * inFeatures));
        var output = module.forward(input);
        if (output.NumberOfElements != (long)time * outFeatures)
            throw new InvalidOperationException($"{module.GetType().Name} returned [{string.Join(", ", output.shape)}] for a [1, {time}, {inFeatures}] input; expected {outFeatures} features");
        Copy(output.to(ScalarType.Float32, torch.CPU).contiguous(), y, time * outFeatures);
    }

    private static void Copy(float* source, float* destination, int count) =>
        new ReadOnlySpan<float>(source, count).CopyTo(new Span<float>(destination, count));

    private static void Copy(Tensor source, float* destination, int count) =>
        new ReadOnlySpan<float>(CpuKernels.Pointer(source), count).CopyTo(new Span<float>(destination, count));

    private static bool IsF32Cpu(Tensor t, params ReadOnlySpan<long> shape) => IsF32Cpu(t, shape, checkContiguous: true);

    private static bool IsF32Cpu(Tensor t, ReadOnlySpan<long> shape, bool checkContiguous)
    {
        if (t.dtype != ScalarType.Float32 || t.device_type != DeviceType.CPU) return false;
        var actual = t.shape;
        if (actual.Length != shape.Length) return false;
        for (int i = 0; i < shape.Length; i++)
            if (actual[i] != shape[i]) return false;
        // Spans over tensor memory are int-sized (TorchSharp's Tensor.bytes).
        return (!checkContiguous || t.is_contiguous()) && t.NumberOfElements <= int.MaxValue / sizeof(float);
    }

    /// <summary>
    /// A pass's working matrices (<c>time</c> rows each; one row for a one-token step) in one native block, freed when
    /// the pass ends.
    /// </summary>
    private sealed class Buffers : IDisposable
    {
        private readonly float* _block;
        private readonly byte* _allowed;

        public Buffers(LlamaConfig config, int time, int keys)
        {
            int hidden = config.HiddenSize, attention = config.NumAttentionHeads * config.HeadDim, kv = config.NumKeyValueHeads * config.HeadDim;
            int inner = config.IntermediateSize;
            RankCapacity = Math.Max(256, Math.Max(hidden, inner));
            long total = (long)time * (3L * hidden + 2L * attention + 2L * kv + 2L * inner + RankCapacity);
            _block = (float*)NativeMemory.AlignedAlloc((nuint)(total * sizeof(float)), 64);
            float* p = _block;
            Hidden = Take(ref p, time * hidden); Normed = Take(ref p, time * hidden); Output = Take(ref p, time * hidden);
            Query = Take(ref p, time * attention); Attended = Take(ref p, time * attention);
            Key = Take(ref p, time * kv); Value = Take(ref p, time * kv);
            Gate = Take(ref p, time * inner); Up = Take(ref p, time * inner);
            Rank = Take(ref p, time * RankCapacity);
            _allowed = (byte*)NativeMemory.Alloc((nuint)keys);
        }

        private static float* Take(ref float* p, int count)
        {
            var taken = p;
            p += count;
            return taken;
        }

        public float* Hidden { get; }
        public float* Normed { get; }
        public float* Output { get; }
        public float* Query { get; }
        public float* Attended { get; }
        public float* Key { get; }
        public float* Value { get; }
        public float* Gate { get; }
        public float* Up { get; }
        public float* Rank { get; }
        public int RankCapacity { get; }

        /// <summary>One byte per key: may the current query attend to it.</summary>
        public byte* Allowed => _allowed;

        public void Dispose()
        {
            NativeMemory.AlignedFree(_block);
            NativeMemory.Free(_allowed);
        }
    }
}

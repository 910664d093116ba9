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
        var config = model.LlamaConfig;
        int layers = input.ExitLayer ?? model.NumLayers;
        int start = input.StartLayer;
        if (layers < 1 || layers > model.NumLayers || start < 0 || start >= layers || cache.NumLayers != model.NumLayers) return null;
        if ((start > 0) != (input.LayerInput is not null)) return null;
        if (model.Rotary.Layout != RotaryLayout.RotateHalf) return null;
        if (NewTokens(input) is var time && time != 1) return TryForwardTokens(model, input, cache, start, layers, time);
        int hidden = config.HiddenSize;
        var ids = input.InputIds;
        var embeds = input.InputsEmbeds;
        if ((ids is null) == (embeds is null)) return null;
        if (ids is not null && !(ids.dim() == 2 && ids.shape[0] == 1 && ids.shape[1] == 1 && ids.device_type == DeviceType.CPU)) return null;
        if (embeds is not null && !IsF32Cpu(embeds, 1, 1, hidden)) return null;
        if (input.LayerInput is { } layerInput && !IsF32Cpu(layerInput, 1, 1, hidden)) return null;
        if (!IsF32Cpu(model.model.norm.weight, hidden)) return null;
        int heads = config.NumAttentionHeads, kvHeads = config.NumKeyValueHeads, headDim = config.HeadDim;
        // Everything that can decline is checked here, before the cache is touched: past this point the step runs
        // to the end (modules this path does not know run through libtorch) or fails as the libtorch path would.
        for (int i = start; i < layers; i++)
        {
            var layer = model.model.layers[i];
            if (!IsF32Cpu(layer.input_layernorm.weight, hidden) || !IsF32Cpu(layer.post_attention_layernorm.weight, hidden)) return null;
            if (cache.KeyStorage(i) is { } keys && !IsCacheStorage(keys, kvHeads, headDim)) return null;
            if (cache.ValueStorage(i) is { } values && !IsCacheStorage(values, kvHeads, headDim)) return null;
        }

        int past = cache.LayerLength(start);
        int total = past + 1;
        long position = past;
        if (input.PositionIds is { } positions)
        {
            if (positions.dim() != 2 || positions.shape[0] != 1 || positions.shape[1] != 1 || positions.device_type != DeviceType.CPU) return null;
            position = positions.to_type(ScalarType.Int64).item<long>();
        }
        byte[]? keyReal = null;
        if (input.AttentionMask is { } mask)
        {
            if (mask.dim() != 2 || mask.shape[0] != 1 || mask.shape[1] != total || mask.device_type != DeviceType.CPU) return null;
            keyReal = mask.to_type(ScalarType.Byte).contiguous().data<byte>().ToArray();
        }

        using var scope = torch.NewDisposeScope();
        using var buffers = new Buffers(config, 1, total);
        float* x = buffers.Hidden;
        if (input.LayerInput is { } given) Copy(given.contiguous(), x, hidden);
        else if (embeds is not null) Copy(embeds.contiguous(), x, hidden);
        else if (!EmbedInto(model, ids!, x)) return null;
        // Hidden states (before the final norm) in one block [states, 1, 1, hidden]; the list hands out views.
        Tensor? states = input.OutputHiddenStates ? torch.empty([layers - start + 1, 1, 1, hidden], ScalarType.Float32) : null;
        float* statesData = states is null ? null : CpuKernels.Pointer(states);
        if (statesData != null) Copy(x, statesData, hidden);

        // Rotary cos/sin for this position, computed as transformers does: float32 position × float32 inverse frequency.
        int rotaryDim = model.Rotary.RotaryDim;
        long sequenceLength = input.PositionIds is null ? total : position + 1;
        var invFreq = model.Rotary.InverseFrequencies(sequenceLength);
        float scaling = (float)model.Rotary.AttentionScaling;
        float* cos = stackalloc float[rotaryDim];
        float* sin = stackalloc float[rotaryDim];
        for (int i = 0; i < rotaryDim / 2; i++)
        {
            float angle = (float)position * (float)invFreq[i];
            float c = MathF.Cos(angle), s = MathF.Sin(angle);
            if (scaling != 1f) { c *= scaling; s *= scaling; }
            cos[i] = cos[i + rotaryDim / 2] = c;
            sin[i] = sin[i + rotaryDim / 2] = s;
        }

        byte* allowed = null;
        fixed (byte* maskBytes = keyReal)
        {
            for (int i = start; i < layers; i++)
            {
                var layer = model.model.layers[i];
                if (cache.LayerLength(i) != past)
                    throw new InvalidOperationException(
                        $"KV cache layer {i} holds {cache.LayerLength(i)} tokens but layer 0 holds {past}; truncate the cache to a common length first");
                var attention = layer.self_attn;
                RmsNorm(layer.input_layernorm, x, buffers.Normed, hidden);
                // q, k and v (and their LoRA terms) read the same normed input: one parallel region for all three.
                var qkv = Group(buffers.Normed, hidden);
                AddProjection(qkv, attention.q_proj, buffers.Normed, hidden, buffers.Query, heads * headDim);
                AddProjection(qkv, attention.k_proj, buffers.Normed, hidden, buffers.Key, kvHeads * headDim);
                AddProjection(qkv, attention.v_proj, buffers.Normed, hidden, buffers.Value, kvHeads * headDim);
                qkv.Run();
                CpuKernels.RotateHalf(buffers.Query, heads, headDim, cos, sin, rotaryDim / 2);
                CpuKernels.RotateHalf(buffers.Key, kvHeads, headDim, cos, sin, rotaryDim / 2);

                var (keys, values) = cache.Reserve(i, [1, kvHeads, 0, headDim], ScalarType.Float32, torch.CPU, 1);
                if (!IsCacheStorage(keys, kvHeads, headDim) || !IsCacheStorage(values, kvHeads, headDim))
                    throw new InvalidOperationException($"KV cache layer {i}: storage is not float32 [1, {kvHeads}, capacity, {headDim}] on the CPU");
                long capacity = keys.shape[2];
                float* k = CpuKernels.Pointer(keys), v = CpuKernels.Pointer(values);
                for (int h = 0; h < kvHeads; h++)
                {
                    new ReadOnlySpan<float>(buffers.Key + h * headDim, headDim).CopyTo(new Span<float>(k + (h * capacity + past) * headDim, headDim));
                    new ReadOnlySpan<float>(buffers.Value + h * headDim, headDim).CopyTo(new Span<float>(v + (h * capacity + past) * headDim, headDim));
                }
                cache.Advance(i, 1);

                // Keys this query may see: the padding mask (the query itself always), then the sliding window.
                int first = 0;
                if (layer.IsSliding && model.SlidingWindow is int window && window < total) first = Math.Max(0, past - window + 1);
                if (maskBytes != null)
                {
                    allowed = buffers.Allowed;
                    for (int j = 0; j < total; j++) allowed[j] = (byte)(maskBytes[j] != 0 || j == past ? 1 : 0);
                }
                CpuKernels.Attend(buffers.Query, k, v, buffers.Attended, heads, kvHeads, headDim, capacity, first, total, allowed,
                    1f / MathF.Sqrt(headDim));
                Project(attention.o_proj, buffers.Attended, heads * headDim, buffers.Output, hidden);
                CpuKernels.Add(x, buffers.Output, hidden);

                RmsNorm(layer.post_attention_layernorm, x, buffers.Normed, hidden);
                Mlp(layer.mlp, config, buffers);
                CpuKernels.Add(x, buffers.Output, hidden);
                if (statesData != null) Copy(x, statesData + (i - start + 1) * hidden, hidden);
            }
        }

        var hiddenStates = states is null ? null : new StateViews(states.MoveToOuterDisposeScope());
        if (input.SkipHead)
        {
            StepsOnThisThread++;
            return new ForwardOutput(torch.empty([1, 0, config.VocabSize], ScalarType.Float32).MoveToOuterDisposeScope(), hiddenStates);
        }
        RmsNorm(model.model.norm, x, buffers.Normed, hidden);
        var logits = torch.empty([1, 1, config.VocabSize], ScalarType.Float32);
        var head = model.lm_head is TiedLMHead tied ? tied.weight : (model.lm_head as Linear)?.weight;
        if (head is not null && model.lm_head is TiedLMHead or Linear { bias: null } && IsF32Cpu(head, config.VocabSize, hidden))
            CpuKernels.Gemv(CpuKernels.Pointer(head), buffers.Normed, CpuKernels.Pointer(logits), null, config.VocabSize, hidden);
        else ThroughTorch(model.lm_head, buffers.Normed, hidden, CpuKernels.Pointer(logits), config.VocabSize);
        StepsOnThisThread++;
        return new ForwardOutput(logits.MoveToOuterDisposeScope(), hiddenStates);
    }

    /// <summary>The embedding row of the one token id, read from the table; other embedding modules run through libtorch.</summary>
    private static bool EmbedInto(LlamaForCausalLM model, Tensor ids, float* x)
    {
        int hidden = model.LlamaConfig.HiddenSize;
        if (model.model.embed_tokens is Embedding { weight: { } table } && IsF32Cpu(table, model.LlamaConfig.VocabSize, hidden))
        {
            long id = ids.to_type(ScalarType.Int64).item<long>();
            if (id < 0 || id >= model.LlamaConfig.VocabSize)
                throw new ArgumentException($"a token id is outside the vocabulary 0..{model.LlamaConfig.VocabSize - 1} of this {model.LlamaConfig.Architecture}");
            new ReadOnlySpan<float>(CpuKernels.Pointer(table) + id * hidden, hidden).CopyTo(new Span<float>(x, hidden));
            return true;
        }
        var embedded = model.EmbedTokens(ids);
        if (!IsF32Cpu(embedded, 1, 1, hidden)) return false;
        Copy(embedded.contiguous(), x, hidden);
        return true;
    }

    /// <summary>RMSNorm over x into y (its weight was checked before the step started).</summary>
    private static void RmsNorm(RMSNorm norm, float* x, float* y, int n) =>
        CpuKernels.RmsNorm(x, CpuKernels.Pointer(norm.weight), y, n, norm.Eps);

    /// <summary>The gated MLP into <see cref="Buffers.Output"/>; an MLP slot holding anything else runs through libtorch.</summary>
    private static void Mlp(nn.Module<Tensor, Tensor> module, LlamaConfig config, Buffers buffers)
    {
        int hidden = config.HiddenSize, inner = config.IntermediateSize;
        if (module is LlamaMLP mlp && config.HiddenAct is "silu" or "swish")
        {
            // gate and up in one parallel region, each row block finishing with silu(gate) · up.
            var gateUp = Group(buffers.Normed, hidden);
            bool fused = AddProjection(gateUp, mlp.gate_proj, buffers.Normed, hidden, buffers.Gate, inner);
            fused &= AddProjection(gateUp, mlp.up_proj, buffers.Normed, hidden, buffers.Up, inner);
            if (fused) gateUp.PairSiluMul();
            gateUp.Run();
            if (!fused) CpuKernels.SiluMul(buffers.Gate, buffers.Up, inner);
            Project(mlp.down_proj, buffers.Gate, inner, buffers.Output, hidden);
        }
        else
        {
            ThroughTorch(module, buffers.Normed, hidden, buffers.Output, hidden);
        }
    }

    /// <summary>y = module(x) for a linear slot: nn.Linear and plain LoRA directly, anything else through libtorch.</summary>
    private static void Project(nn.Module<Tensor, Tensor> module, float* x, int inFeatures, float* y, int outFeatures)
    {
        var group = Group(x, inFeatures);
        AddProjection(group, module, x, inFeatures, y, outFeatures);
        group.Run();
    }

    [ThreadStatic] private static ProjectionGroup? t_group;

    /// <summary>This thread's (empty) projection group over input x.</summary>
    private static ProjectionGroup Group(float* x, int inFeatures)
    {
        var group = t_group ??= new ProjectionGroup();
        group.Begin(x, inFeatures);
        return group;
    }

    /// <summary>
    /// Adds y = module(x) to the group when the module is an nn.Linear or a plain LoRA over one (true); anything else
    /// runs through libtorch at once (false).
    /// </summary>
    private static bool AddProjection(ProjectionGroup group, nn.Module<Tensor, Tensor> module, float* x, int inFeatures, float* y, int outFeatures)
    {
        if (module is Linear linear && AddLinear(group, linear, y, inFeatures, outFeatures)) return true;
        if (module is LoraLinear lora && AddLora(group, lora, y, inFeatures, outFeatures)) return true;
        ThroughTorch(module, x, inFeatures, y, outFeatures);
        return false;
    }

    private static bool IsKernelLinear(Linear linear, int inFeatures, int outFeatures) =>
        linear.weight is { } weight && IsF32Cpu(weight, outFeatures, inFeatures) && (linear.bias is not { } bias || IsF32Cpu(bias, outFeatures));

    private static bool AddLinear(ProjectionGroup group, Linear linear, float* y, int inFeatures, int outFeatures)
    {
        if (!IsKernelLinear(linear, inFeatures, outFeatures)) return false;
        group.AddTarget(CpuKernels.Pointer(linear.weight!), linear.bias is { } bias ? CpuKernels.Pointer(bias) : null, y, outFeatures);
        return true;
    }

    /// <summary>
    /// y = W x + b + Σ s · B (A x) over the active unmerged adapters (dropout is off at inference). Declines (before
    /// adding anything) for routing, DoRA, biases or tensors the kernels cannot read, so the caller runs the module
    /// through libtorch.
    /// </summary>
    private static bool AddLora(ProjectionGroup group, LoraLinear lora, float* y, int inFeatures, int outFeatures)
    {
        if (lora.Routing is not null || lora.BaseLayer is not Linear baseLinear || !IsKernelLinear(baseLinear, inFeatures, outFeatures)) return false;
        var active = lora.Disabled ? [] : lora.ActiveAdapters;
        var merged = lora.MergedAdapters;
        foreach (var adapter in active)
        {
            if (merged.Contains(adapter)) continue;
            if (lora.IsDora(adapter)) return false;
            Linear a = lora.A(adapter), b = lora.B(adapter);
            if (a.bias is not null || b.bias is not null || a.weight is not { } aw || b.weight is not { } bw || aw.dim() != 2) return false;
            long rank = aw.shape[0];
            if (!IsF32Cpu(aw, rank, inFeatures) || !IsF32Cpu(bw, outFeatures, rank)) return false;
        }
        AddLinear(group, baseLinear, y, inFeatures, outFeatures);
        foreach (var adapter in active)
        {
            if (merged.Contains(adapter)) continue;
            var aw = lora.A(adapter).weight!;
            group.AddLora(CpuKernels.Pointer(aw), CpuKernels.Pointer(lora.B(adapter).weight!), (int)aw.shape[0], (float)lora.Scaling(adapter));
        }
        return true;
    }

    /// <summary>Runs any module on x as a [1, 1, in] tensor and copies its [1, 1, out] result to y.</summary>
    private static void ThroughTorch(nn.Module<Tensor, Tensor> module, float* x, int inFeatures, float* y, int outFeatures)
    {
        var input = torch.empty([1, 1, inFeatures], ScalarType.Float32);
        new ReadOnlySpan<float>(x, inFeatures).CopyTo(new Span<float>(CpuKernels.Pointer(input), inFeatures));
        var output = module.forward(input);
        if (output.NumberOfElements != outFeatures)
            throw new InvalidOperationException($"{module.GetType().Name} returned [{string.Join(", ", output.shape)}] for a [1, 1, {inFeatures}] input; expected {outFeatures} features");
        Copy(output.to(ScalarType.Float32, torch.CPU).contiguous(), y, outFeatures);
    }

    private static void Copy(float* source, float* destination, int count) =>
        new ReadOnlySpan<float>(source, count).CopyTo(new Span<float>(destination, count));

    private static void Copy(Tensor source, float* destination, int count) =>
        new ReadOnlySpan<float>(CpuKernels.Pointer(source), count).CopyTo(new Span<float>(destination, count));

    private static bool IsCacheStorage(Tensor t, int kvHeads, int headDim) =>
        t.dtype == ScalarType.Float32 && t.device_type == DeviceType.CPU && t.dim() == 4 && t.shape[0] == 1 && t.shape[1] == kvHeads &&
        t.shape[3] == headDim && t.is_contiguous() && t.NumberOfElements <= int.MaxValue / sizeof(float);

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

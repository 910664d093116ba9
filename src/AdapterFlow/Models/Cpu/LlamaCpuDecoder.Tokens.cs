using System.Collections;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Models.Cpu;

// The pass over T ≤ 32 new tokens of one row: decode steps (T = 1), self-speculative verification (the d + 1 drafted
// positions through the late layers, from StartLayer with a LayerInput) and prompts' short tails. The projections
// that share an input run as one parallel region (ProjectionGroup: q/k/v, gate/up), reading each weight row once
// for all T tokens; attention runs per (head, query) over the cache and the new keys with causal, padding and
// sliding-window masking.
internal static unsafe partial class LlamaCpuDecoder
{
    /// <summary>Most new tokens a kernel pass takes; longer inputs (real prompts) go to libtorch's GEMMs.</summary>
    internal const int MaxTokensPerPass = 32;

    /// <summary>Passes over several new tokens this thread ran through the kernels (tests check that the path engages).</summary>
    [ThreadStatic] internal static int MultiTokenPassesOnThisThread;

    /// <summary>Multi-token passes that read panel copies of the weights (<see cref="PanelMatrix"/>) on this thread.</summary>
    [ThreadStatic] internal static int PanelPassesOnThisThread;

    /// <summary>Passes of either kind that came through <see cref="HostPass"/> (host-memory decoding loops) on this thread.</summary>
    [ThreadStatic] internal static int HostPassesOnThisThread;

    /// <summary>New tokens of a one-row input (ids or embeddings), or 0 if it is not one row.</summary>
    private static int NewTokens(ForwardInput input)
    {
        var source = input.InputIds ?? input.InputsEmbeds;
        return source is not null && source.dim() >= 2 && source.shape[0] == 1 ? (int)source.shape[1] : 0;
    }

    /// <summary>Layer weights and cache storage the kernels can read, checked before anything is written.</summary>
    private static bool LayersSupported(LlamaForCausalLM model, KVCache cache, int start, int layers)
    {
        var config = model.LlamaConfig;
        int hidden = config.HiddenSize;
        for (int i = start; i < layers; i++)
        {
            var layer = model.model.layers[i];
            if (!IsF32Cpu(layer.input_layernorm.weight, hidden) || !IsF32Cpu(layer.post_attention_layernorm.weight, hidden)) return false;
            if (!cache.IsHostStorage(i, config.NumKeyValueHeads, config.HeadDim)) return false;
        }
        return true;
    }

    private static ForwardOutput? TryForwardTokens(LlamaForCausalLM model, ForwardInput input, KVCache cache, int start, int layers, int time)
    {
        if (time < 1 || time > MaxTokensPerPass) return null;
        var config = model.LlamaConfig;
        int hidden = config.HiddenSize, vocab = config.VocabSize;
        var ids = input.InputIds;
        var embeds = input.InputsEmbeds;
        if ((ids is null) == (embeds is null)) return null;
        if (ids is not null && !(ids.dim() == 2 && ids.device_type == DeviceType.CPU)) return null;
        if (embeds is not null && !IsF32Cpu(embeds, 1, time, hidden)) return null;
        if (input.LayerInput is { } layerInput && !IsF32Cpu(layerInput, 1, time, hidden)) return null;
        if (!IsF32Cpu(model.model.norm.weight, hidden) || !LayersSupported(model, cache, start, layers)) return null;
        bool needsEmbedding = ids is not null && input.LayerInput is null;
        using var scope = torch.NewDisposeScope();
        if (needsEmbedding && !HasPlainEmbedding(model))
        {
            // An embedding the kernels do not read (trainable tokens, LoRA on the embedding, …) runs through its module.
            embeds = model.EmbedTokens(ids!);
            if (!IsF32Cpu(embeds, 1, time, hidden)) return null;
            needsEmbedding = false;
        }

        int past = cache.LayerLength(start);
        int total = past + time;
        var positions = new long[time];
        if (input.PositionIds is { } given)
        {
            if (given.dim() != 2 || given.shape[0] != 1 || given.shape[1] != time || given.device_type != DeviceType.CPU) return null;
            given.to_type(ScalarType.Int64).contiguous().data<long>().CopyTo(positions);
        }
        else
        {
            for (int t = 0; t < time; t++) positions[t] = past + t;
        }
        byte[]? keyReal = null;
        if (input.AttentionMask is { } mask)
        {
            if (mask.dim() != 2 || mask.shape[0] != 1 || mask.shape[1] != total || mask.device_type != DeviceType.CPU) return null;
            keyReal = mask.to_type(ScalarType.Byte).contiguous().data<byte>().ToArray();
        }
        long[]? tokenIds = needsEmbedding ? ids!.to_type(ScalarType.Int64).contiguous().data<long>().ToArray() : null;

        var entering = input.LayerInput ?? embeds;
        if (entering is not null) entering = entering.contiguous();
        // Hidden states (before the final norm) in one block [states, 1, time, hidden]; the list hands out views.
        Tensor? states = input.OutputHiddenStates ? torch.empty([layers - start + 1, 1, time, hidden], ScalarType.Float32) : null;
        int headRows = input.SkipHead ? 0 : input.LastPositionOnly ? 1 : time;
        var logits = torch.empty([1, headRows, vocab], ScalarType.Float32);
        long sequenceLength = input.PositionIds is null ? total : positions.Max() + 1;
        fixed (byte* maskBytes = keyReal)
            RunTokens(model, cache, start, layers, time, tokenIds, entering is null ? null : CpuKernels.Pointer(entering), positions, sequenceLength,
                maskBytes, states is null ? null : CpuKernels.Pointer(states), null, headRows, headRows == 0 ? null : CpuKernels.Pointer(logits),
                panels: input.PackedWeights);
        if (time == 1) StepsOnThisThread++;
        else MultiTokenPassesOnThisThread++;
        return new ForwardOutput(logits.MoveToOuterDisposeScope(), states is null ? null : new StateViews(states.MoveToOuterDisposeScope()));
    }

    private static bool HasPlainEmbedding(LlamaForCausalLM model) =>
        model.model.embed_tokens is Embedding { weight: { } table } && IsF32Cpu(table, model.LlamaConfig.VocabSize, model.LlamaConfig.HiddenSize);

    /// <summary>
    /// Whether <see cref="HostPass"/> can run layers 0..L−1 of this model with this cache: the one-row float32 CPU
    /// conditions of the kernels, a plain embedding table and head. Decoding loops check once per generation (the weights
    /// do not change while it runs; cache storage the kernels grow stays valid).
    /// </summary>
    internal static bool CanRunHostPasses(LlamaForCausalLM model, KVCache cache)
    {
        var config = model.LlamaConfig;
        if (model.training || torch.is_grad_enabled() || !model.UseCpuDecodeKernels || model.Rotary.Layout != RotaryLayout.RotateHalf) return false;
        if (cache.NumLayers != model.NumLayers || !LayersSupported(model, cache, 0, model.NumLayers)) return false;
        return IsF32Cpu(model.model.norm.weight, config.HiddenSize) && HasPlainEmbedding(model) && KernelHead(model) is not null;
    }

    /// <summary>
    /// A pass for decoding loops that keep their tokens on the host (lean greedy self-speculative rounds): no tensors in
    /// or out, so no libtorch call at all for plain weights. Runs layers <paramref name="start"/>..<paramref name="layers"/> − 1
    /// over <paramref name="time"/> new tokens at positions <paramref name="firstPosition"/>.. (no padding), entering
    /// with the embeddings of <paramref name="ids"/> or with <paramref name="input"/> [time, hidden]; writes the last
    /// layer's output [time, hidden] to <paramref name="exitState"/> (if not null) and the logits of the last
    /// <paramref name="headRows"/> tokens [headRows, vocab] to <paramref name="logits"/>. With <paramref name="headMatrix"/>
    /// (one head row), the final norm's output goes through that float32 [<paramref name="headMatrixRows"/>, hidden]
    /// matrix instead of the LM head (a draft head over part of the vocabulary, its rows packed), giving that many
    /// logits. Check <see cref="CanRunHostPasses"/> first.
    /// </summary>
    internal static void HostPass(LlamaForCausalLM model, KVCache cache, int start, int layers, int time, long[]? ids, float* input,
        long firstPosition, float* exitState, int headRows, float* logits, float* headMatrix = null, int headMatrixRows = 0, PackedWeights? panels = null,
        HostPlan? plan = null)
    {
        if (time < 1 || time > MaxTokensPerPass) throw new ArgumentOutOfRangeException(nameof(time), $"{time} tokens; a kernel pass takes 1..{MaxTokensPerPass}");
        if (headMatrix != null && headRows != 1) throw new ArgumentException("a head over a subset of the vocabulary takes one row", nameof(headRows));
        var positions = new long[time];
        for (int t = 0; t < time; t++) positions[t] = firstPosition + t;
        using var scope = torch.NewDisposeScope(); // modules the kernels do not know (IA3, …) run through libtorch
        (t_plan, CpuKernels.PassWorkers) = (plan, plan?.Workers ?? 0);
        try
        {
            RunTokens(model, cache, start, layers, time, input == null ? ids : null, input, positions, firstPosition + time, null, null, exitState, headRows, logits,
                headMatrix, headMatrixRows, panels);
        }
        finally
        {
            (t_plan, CpuKernels.PassWorkers) = (null, 0);
        }
        if (time == 1) StepsOnThisThread++;
        else MultiTokenPassesOnThisThread++;
        HostPassesOnThisThread++;
    }

    /// <summary>
    /// The pass itself, over host memory: enters with the embeddings of <paramref name="tokenIds"/> or with
    /// <paramref name="input"/> [time, hidden]; <paramref name="keyReal"/> is the padding mask over past + time keys
    /// (null = all real); writes every hidden state [(layers − start + 1), time, hidden] to <paramref name="states"/>
    /// and/or the last one to <paramref name="exitState"/>, and the logits of the last <paramref name="headRows"/> tokens.
    /// </summary>
    private static void RunTokens(LlamaForCausalLM model, KVCache cache, int start, int layers, int time, long[]? tokenIds, float* input,
        long[] positions, long sequenceLength, byte* keyReal, float* states, float* exitState, int headRows, float* logits,
        float* headMatrix = null, int headMatrixRows = 0, PackedWeights? panels = null)
    {
        var config = model.LlamaConfig;
        int hidden = config.HiddenSize, vocab = config.VocabSize;
        int heads = config.NumAttentionHeads, kvHeads = config.NumKeyValueHeads, headDim = config.HeadDim;
        if (tokenIds is not null)
            foreach (long id in tokenIds)
                if (id < 0 || id >= vocab)
                    throw new ArgumentException($"a token id is outside the vocabulary 0..{vocab - 1} of this {config.Architecture}");
        int past = cache.LayerLength(start);
        int total = past + time;

        using var buffers = new Buffers(config, time, total);
        // A pass over several tokens reads the panel copies it is given (checked against the weights by the caller).
        // Every pass sets this first, so a pass never sees another's.
        t_packed = time > 1 ? panels : null;
        if (t_packed is not null) PanelPassesOnThisThread++;
        float* x = buffers.Hidden;
        if (input != null) Copy(input, x, time * hidden);
        else
        {
            float* table = WeightPointer(((Embedding)model.model.embed_tokens).weight!);
            for (int t = 0; t < time; t++)
                new ReadOnlySpan<float>(table + tokenIds![t] * hidden, hidden).CopyTo(new Span<float>(x + (long)t * hidden, hidden));
        }

        // Rotary cos/sin per token, as the one-token step computes them (float32 position × float32 inverse frequency).
        int rotaryDim = model.Rotary.RotaryDim, half = rotaryDim / 2;
        var invFreq = model.Rotary.InverseFrequencies(sequenceLength);
        float scaling = (float)model.Rotary.AttentionScaling;
        var cosSin = new float[2 * time * rotaryDim];
        for (int t = 0; t < time; t++)
            for (int i = 0; i < half; i++)
            {
                float angle = (float)positions[t] * (float)invFreq[i];
                float c = MathF.Cos(angle), s = MathF.Sin(angle);
                if (scaling != 1f) { c *= scaling; s *= scaling; }
                cosSin[t * rotaryDim + i] = cosSin[t * rotaryDim + i + half] = c;
                cosSin[(time + t) * rotaryDim + i] = cosSin[(time + t) * rotaryDim + i + half] = s;
            }

        int stateSize = time * hidden;
        if (states != null) Copy(x, states, stateSize);

        int attention = heads * headDim, kv = kvHeads * headDim;
        float scale = 1f / MathF.Sqrt(headDim);
        fixed (float* cosSinData = cosSin)
        {
            byte* maskBytes = keyReal;
            float* cos = cosSinData, sin = cosSinData + time * rotaryDim;
            for (int i = start; i < layers; i++)
            {
                var layer = model.model.layers[i];
                if (cache.LayerLength(i) != past)
                    throw new InvalidOperationException(
                        $"KV cache layer {i} holds {cache.LayerLength(i)} tokens but layer {start} holds {past}; truncate the cache to a common length first");
                var self = layer.self_attn;
                RmsNorm(layer.input_layernorm, x, buffers.Normed, hidden, time);
                // q, k and v (and their LoRA terms) read the same normed input: one parallel region for all three.
                var qkv = Group(buffers.Normed, hidden, time);
                AddProjection(qkv, self.q_proj, buffers.Normed, hidden, buffers.Query, attention, time);
                AddProjection(qkv, self.k_proj, buffers.Normed, hidden, buffers.Key, kv, time);
                AddProjection(qkv, self.v_proj, buffers.Normed, hidden, buffers.Value, kv, time);
                qkv.Run();
                for (int t = 0; t < time; t++)
                {
                    CpuKernels.RotateHalf(buffers.Query + t * attention, heads, headDim, cos + t * rotaryDim, sin + t * rotaryDim, half);
                    CpuKernels.RotateHalf(buffers.Key + t * kv, kvHeads, headDim, cos + t * rotaryDim, sin + t * rotaryDim, half);
                }

                var storage = cache.ReserveHost(i, kvHeads, headDim, time) ??
                    throw new InvalidOperationException($"KV cache layer {i}: storage is not float32 [1, {kvHeads}, capacity, {headDim}] on the CPU");
                long capacity = storage.Capacity;
                float* k = (float*)storage.Keys, v = (float*)storage.Values;
                for (int t = 0; t < time; t++)
                    for (int h = 0; h < kvHeads; h++)
                    {
                        long at = (h * capacity + past + t) * headDim;
                        new ReadOnlySpan<float>(buffers.Key + t * kv + h * headDim, headDim).CopyTo(new Span<float>(k + at, headDim));
                        new ReadOnlySpan<float>(buffers.Value + t * kv + h * headDim, headDim).CopyTo(new Span<float>(v + at, headDim));
                    }
                cache.Advance(i, time);

                // Query t sits at cache index past + t: it sees keys up to itself (causal), those the padding mask lets
                // through (itself always), within the sliding window (keys above past + t − window), as Attention.BuildMask.
                for (int t = 0; t < time; t++)
                {
                    int query = past + t, length = query + 1;
                    int first = layer.IsSliding && model.SlidingWindow is int window ? Math.Max(0, query - window + 1) : 0;
                    byte* allowed = null;
                    if (maskBytes != null)
                    {
                        allowed = buffers.Allowed;
                        for (int j = 0; j < length; j++) allowed[j] = (byte)(maskBytes[j] != 0 || j == query ? 1 : 0);
                    }
                    CpuKernels.Attend(buffers.Query + t * attention, k, v, buffers.Attended + t * attention, heads, kvHeads, headDim, capacity,
                        first, length, allowed, scale);
                }
                Project(self.o_proj, buffers.Attended, attention, buffers.Output, hidden, time);
                CpuKernels.Add(x, buffers.Output, time * hidden);

                RmsNorm(layer.post_attention_layernorm, x, buffers.Normed, hidden, time);
                Mlp(layer.mlp, config, time, buffers);
                CpuKernels.Add(x, buffers.Output, time * hidden);
                if (states != null) Copy(x, states + (long)(i - start + 1) * stateSize, stateSize);
            }
        }
        if (exitState != null) Copy(x, exitState, stateSize);
        if (headRows == 0) return;
        RmsNorm(model.model.norm, x + (long)(time - headRows) * hidden, buffers.Normed, hidden, headRows);
        if (headMatrix != null)
        {
            CpuKernels.Gemv(headMatrix, buffers.Normed, logits, null, headMatrixRows, hidden);
            return;
        }
        float* head = PlainHeadWeight(model);
        if (head != null && headRows > 1 && t_packed?.Find(head) is { } headPanels)
            CpuKernels.PanelGemm(headPanels, buffers.Normed, logits, null, headRows);
        else if (head != null)
            CpuKernels.Gemm(head, buffers.Normed, logits, null, vocab, hidden, headRows);
        else ThroughTorch(model.lm_head, buffers.Normed, hidden, logits, vocab, headRows);
    }

    /// <summary>The memory of the head's weight when the kernels read it (<see cref="KernelHead"/>), else null; kept in the pass's plan.</summary>
    private static float* PlainHeadWeight(LlamaForCausalLM model)
    {
        if (t_plan is { HeadWeight: { } known }) return (float*)known;
        float* pointer = KernelHead(model) is { } head ? CpuKernels.Pointer(head) : null;
        if (t_plan is { } plan) plan.HeadWeight = (nint)pointer;
        return pointer;
    }

    /// <summary>A weight's memory, through the pass's plan when it has one.</summary>
    private static float* WeightPointer(Tensor weight) => t_plan is { } plan ? plan.Pointer(weight) : CpuKernels.Pointer(weight);

    /// <summary>
    /// <see cref="ForwardOutput.HiddenStates"/> over one [states, 1, time, hidden] block: element i is a view made when
    /// it is read, so a caller that reads only the last state (self-speculative drafting) creates one tensor, not L + 1.
    /// </summary>
    private sealed class StateViews(Tensor block) : IReadOnlyList<Tensor>
    {
        public Tensor this[int index] => index >= 0 && index < Count ? block[index] : throw new ArgumentOutOfRangeException(nameof(index));
        public int Count => (int)block.shape[0];

        public IEnumerator<Tensor> GetEnumerator()
        {
            for (int i = 0; i < Count; i++) yield return this[i];
        }

        IEnumerator IEnumerable.GetEnumerator() => GetEnumerator();
    }
}

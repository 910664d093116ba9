using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Models;

// The LLaMA family: Llama, Mistral and Qwen2 share one decoder (pre-norm RMSNorm, rotary attention with grouped
// KV heads, gated MLP) and differ only in configuration: Mistral adds sliding-window attention, Qwen2 bias on
// q/k/v and optional per-layer sliding windows. Configs are in LlamaConfig.cs.
//
// Module convention (the adapters rely on it): every linear sublayer lives in a field typed
// nn.Module<Tensor, Tensor>, registered under its Hugging Face name, and is only ever called through that field.
// An adapter can therefore replace a target (say self_attn.q_proj) in place with a wrapper that keeps the
// original as its `base_layer`, exactly as PEFT does, and the forward pass picks the wrapper up.

/// <summary>Per-forward state of the LLaMA family: masks and the rotary tables, computed once for all layers.</summary>
public sealed class LlamaLayerContext : LayerContext
{
    public LlamaLayerContext(Tensor? mask, bool isCausal, Tensor? slidingMask, bool slidingIsCausal,
        Tensor positionIds, KVCache? cache, int pastLength, Tensor cos, Tensor sin)
        : base(mask, isCausal, positionIds, cache, pastLength)
    {
        SlidingMask = slidingMask;
        SlidingIsCausal = slidingIsCausal;
        Cos = cos;
        Sin = sin;
    }

    /// <summary>Mask for sliding-window layers (same conventions as <see cref="LayerContext.Mask"/>).</summary>
    public Tensor? SlidingMask { get; }
    public bool SlidingIsCausal { get; }

    /// <summary>Rotary cos/sin [batch, 1, time, head_dim] in the activation dtype.</summary>
    public Tensor Cos { get; }
    public Tensor Sin { get; }

    public override LayerContext? SelectRows(Tensor rows) => Cache is null
        ? new LlamaLayerContext(RowsOf(Mask, rows), IsCausal, RowsOf(SlidingMask, rows), SlidingIsCausal, RowsOf(PositionIds, rows)!, null,
            PastLength, RowsOf(Cos, rows)!, RowsOf(Sin, rows)!)
        : null;
}

/// <summary>Self-attention with rotary embeddings and grouped KV heads (transformers' LlamaAttention).</summary>
public sealed class LlamaAttention : nn.Module
{
    // Typed as the interface, not Linear, so adapters can swap them in place (see the file comment).
    public nn.Module<Tensor, Tensor> q_proj;
    public nn.Module<Tensor, Tensor> k_proj;
    public nn.Module<Tensor, Tensor> v_proj;
    public nn.Module<Tensor, Tensor> o_proj;

    private readonly int _heads;
    private readonly int _kvHeads;
    private readonly int _headDim;
    private readonly RotaryEmbedding _rotary;

    public LlamaAttention(LlamaConfig config, RotaryEmbedding rotary) : base(nameof(LlamaAttention))
    {
        _heads = config.NumAttentionHeads;
        _kvHeads = config.NumKeyValueHeads;
        _headDim = config.HeadDim;
        _rotary = rotary;
        q_proj = nn.Linear(config.HiddenSize, _heads * _headDim, hasBias: config.QkvBias);
        k_proj = nn.Linear(config.HiddenSize, _kvHeads * _headDim, hasBias: config.QkvBias);
        v_proj = nn.Linear(config.HiddenSize, _kvHeads * _headDim, hasBias: config.QkvBias);
        o_proj = nn.Linear(_heads * _headDim, config.HiddenSize, hasBias: config.OutputBias);
        register_module("q_proj", q_proj);
        register_module("k_proj", k_proj);
        register_module("v_proj", v_proj);
        register_module("o_proj", o_proj);
    }

    /// <summary>Attention over [batch, time, hidden]; appends this layer's keys/values to the cache if any.</summary>
    public Tensor Forward(Tensor x, LlamaLayerContext context, int layer, bool sliding)
    {
        long batch = x.shape[0], time = x.shape[1];
        var q = q_proj.forward(x).view(batch, time, _heads, _headDim).transpose(1, 2);
        var k = k_proj.forward(x).view(batch, time, _kvHeads, _headDim).transpose(1, 2);
        var v = v_proj.forward(x).view(batch, time, _kvHeads, _headDim).transpose(1, 2);
        q = _rotary.Apply(q, context.Cos, context.Sin);
        k = _rotary.Apply(k, context.Cos, context.Sin);
        if (context.Cache is { } cache)
        {
            // The mask and positions were built for layer 0's length; a layer left behind or ahead (early-exit
            // drafting) must be truncated by the caller first, or attention would silently misalign.
            if (cache.LayerLength(layer) != context.PastLength)
                throw new InvalidOperationException(
                    $"KV cache layer {layer} holds {cache.LayerLength(layer)} tokens but layer 0 holds {context.PastLength}; truncate the cache to a common length first");
            (k, v) = cache.Append(layer, k, v);
        }
        var attended = sliding
            ? Attention.Sdpa(q, k, v, context.SlidingMask, context.SlidingIsCausal)
            : Attention.Sdpa(q, k, v, context.Mask, context.IsCausal);
        return o_proj.forward(attended.transpose(1, 2).reshape(batch, time, _heads * _headDim));
    }
}

/// <summary>Gated MLP: down(act(gate(x)) · up(x)).</summary>
public sealed class LlamaMLP : nn.Module<Tensor, Tensor>
{
    public nn.Module<Tensor, Tensor> gate_proj;
    public nn.Module<Tensor, Tensor> up_proj;
    public nn.Module<Tensor, Tensor> down_proj;
    private readonly Func<Tensor, Tensor> _act;

    public LlamaMLP(LlamaConfig config) : base(nameof(LlamaMLP))
    {
        gate_proj = nn.Linear(config.HiddenSize, config.IntermediateSize, hasBias: config.MlpBias);
        up_proj = nn.Linear(config.HiddenSize, config.IntermediateSize, hasBias: config.MlpBias);
        down_proj = nn.Linear(config.IntermediateSize, config.HiddenSize, hasBias: config.MlpBias);
        register_module("gate_proj", gate_proj);
        register_module("up_proj", up_proj);
        register_module("down_proj", down_proj);
        _act = Activations.Resolve(config.HiddenAct);
    }

    public override Tensor forward(Tensor x) => down_proj.forward(_act(gate_proj.forward(x)) * up_proj.forward(x));
}

/// <summary>Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x)).</summary>
public sealed class LlamaDecoderLayer : nn.Module
{
    public LlamaAttention self_attn;
    public nn.Module<Tensor, Tensor> mlp;
    public RMSNorm input_layernorm;
    public RMSNorm post_attention_layernorm;
    private readonly int _index;
    private readonly bool _sliding;

    public LlamaDecoderLayer(LlamaConfig config, RotaryEmbedding rotary, int index) : base(nameof(LlamaDecoderLayer))
    {
        _index = index;
        _sliding = config.LayerTypes[index] == LlamaConfig.SlidingAttention;
        self_attn = new LlamaAttention(config, rotary);
        mlp = new LlamaMLP(config);
        input_layernorm = new RMSNorm(config.HiddenSize, config.RmsNormEps);
        post_attention_layernorm = new RMSNorm(config.HiddenSize, config.RmsNormEps);
        register_module("self_attn", self_attn);
        register_module("mlp", mlp);
        register_module("input_layernorm", input_layernorm);
        register_module("post_attention_layernorm", post_attention_layernorm);
    }

    /// <summary>True for a sliding-window attention layer.</summary>
    public bool IsSliding => _sliding;

    public Tensor Forward(Tensor hidden, LlamaLayerContext context)
    {
        hidden = hidden + self_attn.Forward(input_layernorm.forward(hidden), context, _index, _sliding);
        return hidden + mlp.forward(post_attention_layernorm.forward(hidden));
    }
}

/// <summary>The decoder stack under the <c>model.</c> prefix: embed_tokens, layers, norm.</summary>
public sealed class LlamaModel : nn.Module
{
    public nn.Module<Tensor, Tensor> embed_tokens;
    public ModuleList<LlamaDecoderLayer> layers;
    public RMSNorm norm;

    public LlamaModel(LlamaConfig config, RotaryEmbedding rotary) : base(nameof(LlamaModel))
    {
        embed_tokens = nn.Embedding(config.VocabSize, config.HiddenSize);
        layers = new ModuleList<LlamaDecoderLayer>(
            Enumerable.Range(0, config.NumHiddenLayers).Select(i => new LlamaDecoderLayer(config, rotary, i)).ToArray());
        norm = new RMSNorm(config.HiddenSize, config.RmsNormEps);
        register_module("embed_tokens", embed_tokens);
        register_module("layers", layers);
        register_module("norm", norm);
    }
}

/// <summary>
/// Output head tied to the input embedding: logits = hidden · Eᵀ with E the embedding's own Parameter, read at
/// every call. It owns no parameter (so the state dict has no <c>lm_head.weight</c>, as tied checkpoints on disk,
/// and optimisers see the matrix once), and the tie survives <c>.to(dtype/device)</c>, which replaces each
/// module's parameters separately and would silently untie a parameter registered in two places.
/// </summary>
public sealed class TiedLMHead : nn.Module<Tensor, Tensor>
{
    // A delegate, not a field of type Embedding: TorchSharp registers every Module-typed field of a module as a
    // child, which would put the embedding a second time into the state dict under lm_head.
    private readonly Func<Parameter> _embeddingWeight;

    /// <param name="embeddingWeight">Reads the embedding's base matrix at call time (the embedding module may be
    /// swapped for an adapter wrapper after construction; the head keeps reading the base weight, as PEFT).</param>
    public TiedLMHead(Func<Parameter> embeddingWeight) : base(nameof(TiedLMHead)) => _embeddingWeight = embeddingWeight;

    /// <summary>The shared matrix [vocab, hidden] (the embedding's Parameter).</summary>
    public Parameter weight => _embeddingWeight();

    public override Tensor forward(Tensor hidden) => nn.functional.linear(hidden, _embeddingWeight());
}

/// <summary>LLaMA decoder-only language model (also the implementation of Mistral and Qwen2).</summary>
public class LlamaForCausalLM : CausalLM
{
    public static readonly ModelFamily Family = new("llama", "LlamaForCausalLM",
        (json, path) => LlamaConfig.Read(json, path), config => new LlamaForCausalLM((LlamaConfig)config));

    private readonly LlamaConfig _config;
    private readonly RotaryEmbedding _rotary;
    private readonly int? _slidingWindow;

    public LlamaModel model;

    /// <summary>Output head: a Linear, or a <see cref="TiedLMHead"/> over the embedding when tie_word_embeddings.</summary>
    public nn.Module<Tensor, Tensor> lm_head;

    public LlamaForCausalLM(LlamaConfig config) : this(config, nameof(LlamaForCausalLM)) { }

    protected LlamaForCausalLM(LlamaConfig config, string name) : base(name)
    {
        config.Validate(config.Architecture);
        _config = config;
        _rotary = config.CreateRotary();
        _slidingWindow = config.LayerTypes.Contains(LlamaConfig.SlidingAttention) ? config.EffectiveSlidingWindow : null;
        model = new LlamaModel(config, _rotary);
        lm_head = config.TieWordEmbeddings
            ? new TiedLMHead(() => ModuleSurgery.EmbeddingWeight(model.embed_tokens))
            : nn.Linear(config.HiddenSize, config.VocabSize, hasBias: false);
        register_module("model", model);
        register_module("lm_head", lm_head);
    }

    public override ModelConfig Config => _config;

    /// <summary>The typed configuration.</summary>
    public LlamaConfig LlamaConfig => _config;

    /// <summary>The rotary embedding shared by all layers.</summary>
    internal RotaryEmbedding Rotary => _rotary;

    /// <summary>The sliding window of the sliding-attention layers, if any.</summary>
    internal int? SlidingWindow => _slidingWindow;

    /// <summary>
    /// Batch-1 float32 decode steps on the CPU run through hand-written kernels (<see cref="Cpu.LlamaCpuDecoder"/>:
    /// same logits up to summation order, several times fewer native calls). On by default; off forces libtorch for
    /// every forward (for comparisons).
    /// </summary>
    public bool UseCpuDecodeKernels { get; set; } = true;

    /// <summary>
    /// Panel copies of weight matrices for the CPU kernels' multi-token passes (self-speculative verification), made by
    /// <see cref="Cpu.LlamaCpuDecoder.PackForVerification"/>; null until then. They cost their matrices' memory again.
    /// </summary>
    internal Cpu.PackedWeights? PackedCpuWeights { get; set; }

    /// <summary>
    /// Frees the panel copies of the weights (they are made again when self-speculative decoding next needs them). Not
    /// while a generation on this model runs on another thread.
    /// </summary>
    public void ReleasePackedWeights()
    {
        PackedCpuWeights?.Dispose();
        PackedCpuWeights = null;
    }

    /// <summary>Switching to training frees the panel copies: the weights are about to change.</summary>
    public override void train(bool on = true)
    {
        if (on) ReleasePackedWeights();
        base.train(on);
    }

    protected override void Dispose(bool disposing)
    {
        ReleasePackedWeights();
        base.Dispose(disposing);
    }

    public override ForwardOutput forward(ForwardInput input) =>
        (UseCpuDecodeKernels ? Cpu.LlamaCpuDecoder.TryForward(this, input) : null) ?? base.forward(input);

    public override Tensor EmbedTokens(Tensor inputIds)
    {
        try
        {
            return model.embed_tokens.forward(inputIds);
        }
        catch (System.Runtime.InteropServices.ExternalException e) when (e.Message.StartsWith("index out of range"))
        {
            // Checking ids up front would cost a host sync per step; translating libtorch's multi-line error is free.
            throw new ArgumentException($"a token id is outside the vocabulary 0..{_config.VocabSize - 1} of this {_config.Architecture}");
        }
    }

    protected override LayerContext Prepare(ForwardInput input, out Tensor hidden)
    {
        if ((input.InputIds is null) == (input.InputsEmbeds is null))
            throw new ArgumentException("give exactly one of InputIds and InputsEmbeds");
        hidden = input.InputsEmbeds ?? EmbedTokens(input.InputIds!);
        long batch = hidden.shape[0], time = hidden.shape[1];
        int past = input.PastLength;
        var device = hidden.device;
        Tensor positions;
        long sequenceLength = past + time;
        if (input.PositionIds is { } given)
        {
            if (given.shape.Length != 2 || given.shape[0] != batch || given.shape[1] != time)
                throw new ArgumentException($"position ids have shape [{string.Join(", ", given.shape)}]; expected [{batch}, {time}]");
            positions = given.device == device ? given : given.to(device);
            // Dynamic NTK needs the largest position; only that variant pays for the host sync.
            if (_rotary.Scaling is { Type: "dynamic" }) sequenceLength = positions.max().item<long>() + 1;
        }
        else
        {
            positions = Attention.DefaultPositions(batch, time, past, device);
        }
        var (mask, isCausal) = Attention.BuildMask(input.AttentionMask, batch, time, past, device);
        Tensor? slidingMask = null;
        bool slidingIsCausal = false;
        if (_slidingWindow is int window)
            (slidingMask, slidingIsCausal) = Attention.BuildMask(input.AttentionMask, batch, time, past, device, window);
        var (cos, sin) = _rotary.Tables(positions, hidden.dtype, sequenceLength);
        return new LlamaLayerContext(mask, isCausal, slidingMask, slidingIsCausal, positions, input.Cache, past, cos, sin);
    }

    protected override Tensor RunLayer(int index, Tensor hidden, LayerContext context) =>
        model.layers[index].Forward(hidden, (LlamaLayerContext)context);

    protected override Tensor Head(Tensor hidden) => lm_head.forward(model.norm.forward(hidden));

    internal override (Func<Tensor, Tensor> FinalNorm, Tensor Weight)? PlainHead() => lm_head switch
    {
        TiedLMHead tied => (h => model.norm.forward(h), tied.weight),
        Linear { bias: null, weight: { } weight } => (h => model.norm.forward(h), weight),
        _ => null,
    };
}

/// <summary>Mistral: the Llama decoder with sliding-window attention.</summary>
public sealed class MistralForCausalLM : LlamaForCausalLM
{
    public static new readonly ModelFamily Family = new("mistral", "MistralForCausalLM",
        (json, path) => MistralConfig.Read(json, path), config => new MistralForCausalLM((MistralConfig)config));

    public MistralForCausalLM(MistralConfig config) : base(config, nameof(MistralForCausalLM)) { }
}

/// <summary>Qwen2: the Llama decoder with bias on q/k/v and optional sliding-window layers.</summary>
public sealed class Qwen2ForCausalLM : LlamaForCausalLM
{
    public static new readonly ModelFamily Family = new("qwen2", "Qwen2ForCausalLM",
        (json, path) => Qwen2Config.Read(json, path), config => new Qwen2ForCausalLM((Qwen2Config)config));

    public Qwen2ForCausalLM(Qwen2Config config) : base(config, nameof(Qwen2ForCausalLM)) { }
}

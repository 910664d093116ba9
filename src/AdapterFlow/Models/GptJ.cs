using System.Text.Json.Nodes;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Models;

/// <summary>GPT-J config.json (transformers GPTJConfig; absent keys take its defaults).</summary>
public sealed class GptJConfig : ModelConfig
{
    public GptJConfig()
    {
        VocabSize = 50400;
        MaxPositionEmbeddings = 2048;
        HiddenSize = 4096;
        NumHiddenLayers = 28;
        NumAttentionHeads = 16;
        NumKeyValueHeads = 16;
        HeadDim = 256;
        IntermediateSize = 4 * 4096;
        RotaryDim = 64;
        TieWordEmbeddings = false;
        BosTokenId = 50256;
        EosTokenIds = [50256];
    }

    public override string ModelType => "gptj";
    public override string Architecture => "GPTJForCausalLM";

    /// <summary>Dims of each head that are rotated (interleaved pairs); the rest pass through. Null in config.json = whole head.</summary>
    public int RotaryDim { get; set; }

    /// <summary>GPT-J's rotary base (fixed in transformers).</summary>
    public const double RopeTheta = 10000.0;

    public string ActivationFunction { get; set; } = "gelu_new";
    public double LayerNormEpsilon { get; set; } = 1e-5;
    public double ResidPdrop { get; set; }
    public double EmbdPdrop { get; set; }
    public double AttnPdrop { get; set; }

    public static GptJConfig FromJson(JsonObject json, string path)
    {
        var c = new GptJConfig();
        c.ReadCommon(json, path);
        c.HiddenSize = ConfigJson.Int(json, path, "n_embd", ConfigJson.Int(json, path, "hidden_size", c.HiddenSize));
        c.NumHiddenLayers = ConfigJson.Int(json, path, "n_layer", ConfigJson.Int(json, path, "num_hidden_layers", c.NumHiddenLayers));
        c.NumAttentionHeads = ConfigJson.Int(json, path, "n_head", ConfigJson.Int(json, path, "num_attention_heads", c.NumAttentionHeads));
        c.MaxPositionEmbeddings = ConfigJson.Int(json, path, "n_positions", ConfigJson.Int(json, path, "max_position_embeddings", c.MaxPositionEmbeddings));
        c.IntermediateSize = ConfigJson.OptionalInt(json, path, "n_inner") ?? 4 * c.HiddenSize;
        int headDim = DecoderParts.HeadDim(c.HiddenSize, c.NumAttentionHeads, path);
        c.RotaryDim = json.ContainsKey("rotary_dim") ? ConfigJson.OptionalInt(json, path, "rotary_dim") ?? headDim : c.RotaryDim;
        c.ActivationFunction = ConfigJson.OptionalString(json, path, "activation_function") ?? c.ActivationFunction;
        c.LayerNormEpsilon = ConfigJson.Double(json, path, "layer_norm_epsilon", c.LayerNormEpsilon);
        c.InitializerRange = ConfigJson.Double(json, path, "initializer_range", c.InitializerRange);
        c.ResidPdrop = ConfigJson.Double(json, path, "resid_pdrop", c.ResidPdrop);
        c.EmbdPdrop = ConfigJson.Double(json, path, "embd_pdrop", c.EmbdPdrop);
        c.AttnPdrop = ConfigJson.Double(json, path, "attn_pdrop", c.AttnPdrop);
        c.Validate(path);
        return c;
    }

    /// <summary>Derives head_dim and checks the sizes; <paramref name="what"/> names the source in errors.</summary>
    public void Validate(string what)
    {
        HeadDim = DecoderParts.HeadDim(HiddenSize, NumAttentionHeads, what);
        NumKeyValueHeads = NumAttentionHeads;
        if (NumHiddenLayers <= 0) throw new InvalidDataException($"{what}: 'n_layer' must be positive, got {NumHiddenLayers}");
        if (IntermediateSize <= 0) throw new InvalidDataException($"{what}: 'n_inner' must be positive, got {IntermediateSize}");
        if (RotaryDim <= 0 || RotaryDim > HeadDim || RotaryDim % 2 != 0)
            throw new InvalidDataException($"{what}: 'rotary_dim' {RotaryDim} must be even and within the head dim {HeadDim}");
        if (VocabSize <= 0 || MaxPositionEmbeddings <= 0)
            throw new InvalidDataException($"{what}: 'vocab_size' and 'n_positions' must be positive");
        Activations.Check(ActivationFunction, what, "activation_function");
    }

    public override JsonObject ToJson()
    {
        var json = WriteCommon();
        json["n_embd"] = HiddenSize;
        json["n_layer"] = NumHiddenLayers;
        json["n_head"] = NumAttentionHeads;
        json["n_positions"] = MaxPositionEmbeddings;
        json["n_inner"] = IntermediateSize;
        json["rotary_dim"] = RotaryDim;
        json["activation_function"] = ActivationFunction;
        json["layer_norm_epsilon"] = LayerNormEpsilon;
        json["initializer_range"] = InitializerRange;
        json["resid_pdrop"] = ResidPdrop;
        json["embd_pdrop"] = EmbdPdrop;
        json["attn_pdrop"] = AttnPdrop;
        return json;
    }
}

/// <summary>GPT-J's <c>attn</c>: q/k/v/out projections without bias.</summary>
public sealed class GptJAttention : nn.Module
{
    public nn.Module<Tensor, Tensor> q_proj;
    public nn.Module<Tensor, Tensor> k_proj;
    public nn.Module<Tensor, Tensor> v_proj;
    public nn.Module<Tensor, Tensor> out_proj;

    public GptJAttention(GptJConfig config) : base("attn")
    {
        q_proj = nn.Linear(config.HiddenSize, config.HiddenSize, hasBias: false);
        k_proj = nn.Linear(config.HiddenSize, config.HiddenSize, hasBias: false);
        v_proj = nn.Linear(config.HiddenSize, config.HiddenSize, hasBias: false);
        out_proj = nn.Linear(config.HiddenSize, config.HiddenSize, hasBias: false);
        register_module("q_proj", q_proj);
        register_module("k_proj", k_proj);
        register_module("v_proj", v_proj);
        register_module("out_proj", out_proj);
    }
}

/// <summary>GPT-J's <c>mlp</c>.</summary>
public sealed class GptJMlp : nn.Module
{
    public nn.Module<Tensor, Tensor> fc_in;
    public nn.Module<Tensor, Tensor> fc_out;

    public GptJMlp(GptJConfig config) : base("mlp")
    {
        fc_in = nn.Linear(config.HiddenSize, config.IntermediateSize, hasBias: true);
        fc_out = nn.Linear(config.IntermediateSize, config.HiddenSize, hasBias: true);
        register_module("fc_in", fc_in);
        register_module("fc_out", fc_out);
    }
}

/// <summary>One GPT-J block (<c>transformer.h.{i}</c>): attention and MLP in parallel on the same <c>ln_1</c> output.</summary>
public sealed class GptJBlock : nn.Module
{
    public nn.Module<Tensor, Tensor> ln_1;
    public GptJAttention attn;
    public GptJMlp mlp;

    private readonly GptJConfig _config;
    private readonly int _layer;
    private readonly RotaryEmbedding _rotary;
    private readonly Func<Tensor, Tensor> _act;

    public GptJBlock(GptJConfig config, int layer, RotaryEmbedding rotary) : base("block")
    {
        _config = config;
        _layer = layer;
        _rotary = rotary;
        _act = Activations.Resolve(config.ActivationFunction);
        ln_1 = nn.LayerNorm(config.HiddenSize, config.LayerNormEpsilon);
        attn = new GptJAttention(config);
        mlp = new GptJMlp(config);
        register_module("ln_1", ln_1);
        register_module("attn", attn);
        register_module("mlp", mlp);
    }

    public Tensor Forward(Tensor hidden, RotaryLayerContext context)
    {
        long heads = _config.NumAttentionHeads, headDim = _config.HeadDim;
        var h = ln_1.forward(hidden);
        var q = _rotary.Apply(DecoderParts.SplitHeads(attn.q_proj.forward(h), heads, headDim), context.Cos, context.Sin);
        var k = _rotary.Apply(DecoderParts.SplitHeads(attn.k_proj.forward(h), heads, headDim), context.Cos, context.Sin);
        var v = DecoderParts.SplitHeads(attn.v_proj.forward(h), heads, headDim);
        (k, v) = DecoderParts.UpdateCache(context, _layer, k, v);
        var y = Attention.Sdpa(q, k, v, context.Mask, context.IsCausal, training ? _config.AttnPdrop : 0.0);
        var attnOut = DecoderParts.Dropout(attn.out_proj.forward(DecoderParts.MergeHeads(y)), _config.ResidPdrop, training);
        var mlpOut = DecoderParts.Dropout(mlp.fc_out.forward(_act(mlp.fc_in.forward(h))), _config.ResidPdrop, training);
        return attnOut + mlpOut + hidden;
    }
}

/// <summary>GPT-J's <c>transformer</c>.</summary>
public sealed class GptJModel : nn.Module
{
    public nn.Module<Tensor, Tensor> wte;
    public ModuleList<GptJBlock> h;
    public nn.Module<Tensor, Tensor> ln_f;

    public GptJModel(GptJConfig config, RotaryEmbedding rotary) : base("transformer")
    {
        wte = nn.Embedding(config.VocabSize, config.HiddenSize);
        h = new ModuleList<GptJBlock>(Enumerable.Range(0, config.NumHiddenLayers).Select(i => new GptJBlock(config, i, rotary)).ToArray());
        ln_f = nn.LayerNorm(config.HiddenSize, config.LayerNormEpsilon);
        register_module("wte", wte);
        register_module("h", h);
        register_module("ln_f", ln_f);
    }
}

/// <summary>The bias of a tied output head (GPT-J's <c>lm_head.bias</c> when <c>lm_head.weight</c> is the token embedding).</summary>
public sealed class TiedHeadBias : nn.Module
{
    public Parameter bias;

    public TiedHeadBias(long size) : base("lm_head")
    {
        bias = new Parameter(torch.zeros(size));
        register_parameter("bias", bias);
    }
}

/// <summary>GPTJForCausalLM: rotary (interleaved pairs) on the first rotary_dim dims of each head, parallel attention + MLP, biased head.</summary>
public sealed class GptJForCausalLM : CausalLM
{
    public static readonly ModelFamily Family = new("gptj", "GPTJForCausalLM", GptJConfig.FromJson,
        c => new GptJForCausalLM(DecoderParts.ConfigAs<GptJConfig>(c)));

    private readonly GptJConfig _config;
    private readonly RotaryEmbedding _rotary;
    public GptJModel transformer;

    /// <summary>The output head (weight and bias); null when tied, then <see cref="lm_head_bias"/> holds the bias.</summary>
    public nn.Module<Tensor, Tensor>? lm_head;
    public TiedHeadBias? lm_head_bias;

    public GptJForCausalLM(GptJConfig config) : base("GPTJForCausalLM")
    {
        config.Validate("GPT-J config");
        _config = config;
        _rotary = new RotaryEmbedding(config.RotaryDim, GptJConfig.RopeTheta, RotaryLayout.Interleaved, null, config.MaxPositionEmbeddings);
        transformer = new GptJModel(config, _rotary);
        register_module("transformer", transformer);
        if (config.TieWordEmbeddings)
        {
            lm_head_bias = new TiedHeadBias(config.VocabSize);
            register_module("lm_head", lm_head_bias);
        }
        else
        {
            lm_head = nn.Linear(config.HiddenSize, config.VocabSize, hasBias: true);
            register_module("lm_head", lm_head);
        }
    }

    public override ModelConfig Config => _config;

    public override Tensor EmbedTokens(Tensor inputIds) => transformer.wte.forward(inputIds);

    protected override LayerContext Prepare(ForwardInput input, out Tensor hidden) =>
        DecoderParts.PrepareRotary(input, EmbedTokens, _rotary, _config.EmbdPdrop, training, out hidden);

    protected override Tensor RunLayer(int index, Tensor hidden, LayerContext context)
    {
        using var scope = torch.NewDisposeScope();
        return transformer.h[index].Forward(hidden, (RotaryLayerContext)context).MoveToOuterDisposeScope();
    }

    protected override Tensor Head(Tensor hidden)
    {
        hidden = transformer.ln_f.forward(hidden);
        return lm_head is not null
            ? lm_head.forward(hidden)
            : nn.functional.linear(hidden, ModuleSurgery.EmbeddingWeight(transformer.wte), lm_head_bias!.bias);
    }
}

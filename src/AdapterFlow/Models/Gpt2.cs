using System.Text.Json.Nodes;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Models;

/// <summary>GPT-2 config.json (transformers GPT2Config; absent keys take its defaults).</summary>
public sealed class Gpt2Config : ModelConfig
{
    public Gpt2Config()
    {
        VocabSize = 50257;
        MaxPositionEmbeddings = 1024;
        HiddenSize = 768;
        NumHiddenLayers = 12;
        NumAttentionHeads = 12;
        NumKeyValueHeads = 12;
        HeadDim = 64;
        IntermediateSize = 4 * 768;
        TieWordEmbeddings = true;
        BosTokenId = 50256;
        EosTokenIds = [50256];
    }

    public override string ModelType => "gpt2";
    public override string Architecture => "GPT2LMHeadModel";

    /// <summary><c>activation_function</c> of the MLP.</summary>
    public string ActivationFunction { get; set; } = "gelu_new";
    public double LayerNormEpsilon { get; set; } = 1e-5;
    public double ResidPdrop { get; set; } = 0.1;
    public double EmbdPdrop { get; set; } = 0.1;
    public double AttnPdrop { get; set; } = 0.1;

    /// <summary>Divide attention scores by sqrt(head_dim).</summary>
    public bool ScaleAttnWeights { get; set; } = true;

    /// <summary>Further divide the scores of layer i by i + 1.</summary>
    public bool ScaleAttnByInverseLayerIdx { get; set; }

    /// <summary>Compute attention in float32 even for half-precision weights.</summary>
    public bool ReorderAndUpcastAttn { get; set; }

    public static Gpt2Config FromJson(JsonObject json, string path)
    {
        var c = new Gpt2Config();
        c.ReadCommon(json, path);
        c.HiddenSize = ConfigJson.Int(json, path, "n_embd", ConfigJson.Int(json, path, "hidden_size", c.HiddenSize));
        c.NumHiddenLayers = ConfigJson.Int(json, path, "n_layer", ConfigJson.Int(json, path, "num_hidden_layers", c.NumHiddenLayers));
        c.NumAttentionHeads = ConfigJson.Int(json, path, "n_head", ConfigJson.Int(json, path, "num_attention_heads", c.NumAttentionHeads));
        c.MaxPositionEmbeddings = ConfigJson.Int(json, path, "n_positions", ConfigJson.Int(json, path, "max_position_embeddings", c.MaxPositionEmbeddings));
        c.IntermediateSize = ConfigJson.OptionalInt(json, path, "n_inner") ?? 4 * c.HiddenSize;
        c.ActivationFunction = ConfigJson.OptionalString(json, path, "activation_function") ?? c.ActivationFunction;
        c.LayerNormEpsilon = ConfigJson.Double(json, path, "layer_norm_epsilon", c.LayerNormEpsilon);
        c.InitializerRange = ConfigJson.Double(json, path, "initializer_range", c.InitializerRange);
        c.ResidPdrop = ConfigJson.Double(json, path, "resid_pdrop", c.ResidPdrop);
        c.EmbdPdrop = ConfigJson.Double(json, path, "embd_pdrop", c.EmbdPdrop);
        c.AttnPdrop = ConfigJson.Double(json, path, "attn_pdrop", c.AttnPdrop);
        c.ScaleAttnWeights = ConfigJson.Bool(json, path, "scale_attn_weights", c.ScaleAttnWeights);
        c.ScaleAttnByInverseLayerIdx = ConfigJson.Bool(json, path, "scale_attn_by_inverse_layer_idx", c.ScaleAttnByInverseLayerIdx);
        c.ReorderAndUpcastAttn = ConfigJson.Bool(json, path, "reorder_and_upcast_attn", c.ReorderAndUpcastAttn);
        if (ConfigJson.Bool(json, path, "add_cross_attention", false))
            throw new InvalidDataException($"{path}: 'add_cross_attention' (GPT-2 as an encoder-decoder) is not supported");
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
        json["activation_function"] = ActivationFunction;
        json["layer_norm_epsilon"] = LayerNormEpsilon;
        json["initializer_range"] = InitializerRange;
        json["resid_pdrop"] = ResidPdrop;
        json["embd_pdrop"] = EmbdPdrop;
        json["attn_pdrop"] = AttnPdrop;
        json["scale_attn_weights"] = ScaleAttnWeights;
        json["scale_attn_by_inverse_layer_idx"] = ScaleAttnByInverseLayerIdx;
        json["reorder_and_upcast_attn"] = ReorderAndUpcastAttn;
        return json;
    }
}

/// <summary>
/// transformers' Conv1D: a linear layer whose weight is stored [in, out] (GPT-2 checkpoints keep it so), computed
/// as bias + x · weight.
/// </summary>
public sealed class Conv1D : nn.Module<Tensor, Tensor>, IInitializable
{
    public Parameter weight;
    public Parameter bias;
    private readonly double _initScale;

    /// <param name="inFeatures">Input width (rows of the weight).</param>
    /// <param name="outFeatures">Output width (columns of the weight).</param>
    /// <param name="initScale">Multiplies the init std (GPT-2 shrinks residual projections by 1/sqrt(2 · layers)).</param>
    public Conv1D(long inFeatures, long outFeatures, double initScale = 1.0) : base(nameof(Conv1D))
    {
        InFeatures = inFeatures;
        OutFeatures = outFeatures;
        _initScale = initScale;
        weight = new Parameter(torch.empty(inFeatures, outFeatures));
        bias = new Parameter(torch.zeros(outFeatures));
        register_parameter("weight", weight);
        register_parameter("bias", bias);
    }

    public long InFeatures { get; }
    public long OutFeatures { get; }

    public override Tensor forward(Tensor x)
    {
        var shape = x.shape;
        shape[^1] = OutFeatures;
        return torch.addmm(bias, x.reshape(-1, InFeatures), weight, 1, 1).view(shape);
    }

    public void Initialize(double std) => Initialize(std, null);

    public void Initialize(double std, torch.Generator? generator)
    {
        using var no = torch.no_grad();
        weight.normal_(0, std * _initScale, generator);
        nn.init.zeros_(bias);
    }
}

/// <summary>GPT-2's <c>attn</c>: fused <c>c_attn</c> ([q | k | v]) and output <c>c_proj</c>.</summary>
public sealed class Gpt2Attention : nn.Module
{
    public nn.Module<Tensor, Tensor> c_attn;
    public nn.Module<Tensor, Tensor> c_proj;

    public Gpt2Attention(Gpt2Config config) : base("attn")
    {
        c_attn = new Conv1D(config.HiddenSize, 3L * config.HiddenSize);
        c_proj = new Conv1D(config.HiddenSize, config.HiddenSize, 1.0 / Math.Sqrt(2.0 * config.NumHiddenLayers));
        register_module("c_attn", c_attn);
        register_module("c_proj", c_proj);
    }
}

/// <summary>GPT-2's <c>mlp</c>: <c>c_fc</c>, activation, <c>c_proj</c>.</summary>
public sealed class Gpt2Mlp : nn.Module
{
    public nn.Module<Tensor, Tensor> c_fc;
    public nn.Module<Tensor, Tensor> c_proj;

    public Gpt2Mlp(Gpt2Config config) : base("mlp")
    {
        c_fc = new Conv1D(config.HiddenSize, config.IntermediateSize);
        c_proj = new Conv1D(config.IntermediateSize, config.HiddenSize, 1.0 / Math.Sqrt(2.0 * config.NumHiddenLayers));
        register_module("c_fc", c_fc);
        register_module("c_proj", c_proj);
    }
}

/// <summary>One GPT-2 block (<c>transformer.h.{i}</c>): pre-norm attention and MLP with residuals.</summary>
public sealed class Gpt2Block : nn.Module
{
    public nn.Module<Tensor, Tensor> ln_1;
    public Gpt2Attention attn;
    public nn.Module<Tensor, Tensor> ln_2;
    public Gpt2Mlp mlp;

    private readonly Gpt2Config _config;
    private readonly int _layer;
    private readonly double _queryScale;
    private readonly Func<Tensor, Tensor> _act;

    public Gpt2Block(Gpt2Config config, int layer) : base("block")
    {
        _config = config;
        _layer = layer;
        _act = Activations.Resolve(config.ActivationFunction);
        // SDPA divides by sqrt(head_dim); fold GPT-2's other scalings into the queries.
        double scale = (config.ScaleAttnWeights ? 1.0 / Math.Sqrt(config.HeadDim) : 1.0) /
                       (config.ScaleAttnByInverseLayerIdx ? layer + 1 : 1);
        _queryScale = scale * Math.Sqrt(config.HeadDim);
        ln_1 = nn.LayerNorm(config.HiddenSize, config.LayerNormEpsilon);
        attn = new Gpt2Attention(config);
        ln_2 = nn.LayerNorm(config.HiddenSize, config.LayerNormEpsilon);
        mlp = new Gpt2Mlp(config);
        register_module("ln_1", ln_1);
        register_module("attn", attn);
        register_module("ln_2", ln_2);
        register_module("mlp", mlp);
    }

    public Tensor Forward(Tensor hidden, LayerContext context)
    {
        long heads = _config.NumAttentionHeads, headDim = _config.HeadDim, width = _config.HiddenSize;
        var qkv = attn.c_attn.forward(ln_1.forward(hidden));
        var parts = qkv.split(width, 2);
        var q = DecoderParts.SplitHeads(parts[0], heads, headDim);
        var k = DecoderParts.SplitHeads(parts[1], heads, headDim);
        var v = DecoderParts.SplitHeads(parts[2], heads, headDim);
        (k, v) = DecoderParts.UpdateCache(context, _layer, k, v);
        if (_queryScale != 1.0) q = q * _queryScale;
        double dropout = training ? _config.AttnPdrop : 0.0;
        Tensor y;
        if (_config.ReorderAndUpcastAttn && q.dtype != ScalarType.Float32)
        {
            var dtype = q.dtype;
            y = Attention.Sdpa(q.to_type(ScalarType.Float32), k.to_type(ScalarType.Float32), v.to_type(ScalarType.Float32),
                context.Mask, context.IsCausal, dropout).to_type(dtype);
        }
        else
            y = Attention.Sdpa(q, k, v, context.Mask, context.IsCausal, dropout);
        var attnOut = attn.c_proj.forward(DecoderParts.MergeHeads(y));
        hidden = hidden + DecoderParts.Dropout(attnOut, _config.ResidPdrop, training);
        var mlpOut = mlp.c_proj.forward(_act(mlp.c_fc.forward(ln_2.forward(hidden))));
        return hidden + DecoderParts.Dropout(mlpOut, _config.ResidPdrop, training);
    }
}

/// <summary>GPT-2's <c>transformer</c>: token and position embeddings, blocks, final norm.</summary>
public sealed class Gpt2Model : nn.Module
{
    public nn.Module<Tensor, Tensor> wte;
    public Embedding wpe;
    public ModuleList<Gpt2Block> h;
    public nn.Module<Tensor, Tensor> ln_f;

    public Gpt2Model(Gpt2Config config) : base("transformer")
    {
        wte = nn.Embedding(config.VocabSize, config.HiddenSize);
        wpe = nn.Embedding(config.MaxPositionEmbeddings, config.HiddenSize);
        h = new ModuleList<Gpt2Block>(Enumerable.Range(0, config.NumHiddenLayers).Select(i => new Gpt2Block(config, i)).ToArray());
        ln_f = nn.LayerNorm(config.HiddenSize, config.LayerNormEpsilon);
        register_module("wte", wte);
        register_module("wpe", wpe);
        register_module("h", h);
        register_module("ln_f", ln_f);
    }
}

/// <summary>
/// GPT2LMHeadModel. With tied embeddings (the default) there is no separate <c>lm_head</c> module: the head reads
/// <c>transformer.wte.weight</c>, so the tie survives dtype/device moves and the saved file has no head, as
/// save_pretrained writes it.
/// </summary>
public sealed class Gpt2LMHeadModel : CausalLM
{
    public static readonly ModelFamily Family = new("gpt2", "GPT2LMHeadModel", Gpt2Config.FromJson,
        c => new Gpt2LMHeadModel(DecoderParts.ConfigAs<Gpt2Config>(c)));

    private readonly Gpt2Config _config;
    public Gpt2Model transformer;
    public nn.Module<Tensor, Tensor>? lm_head;

    public Gpt2LMHeadModel(Gpt2Config config) : base("GPT2LMHeadModel")
    {
        config.Validate("GPT-2 config");
        _config = config;
        transformer = new Gpt2Model(config);
        register_module("transformer", transformer);
        if (!config.TieWordEmbeddings)
        {
            lm_head = nn.Linear(config.HiddenSize, config.VocabSize, hasBias: false);
            register_module("lm_head", lm_head);
        }
    }

    public override ModelConfig Config => _config;

    public override Tensor EmbedTokens(Tensor inputIds) => transformer.wte.forward(inputIds);

    protected override LayerContext Prepare(ForwardInput input, out Tensor hidden)
    {
        var embeds = DecoderParts.Embed(input, EmbedTokens);
        long batch = embeds.shape[0], time = embeds.shape[1];
        int past = input.PastLength;
        var device = embeds.device;
        DecoderParts.CheckPositionTable(input, past, time, _config.MaxPositionEmbeddings, "n_positions");
        var positions = DecoderParts.Positions(input, batch, time, past, device);
        hidden = DecoderParts.Dropout(embeds + transformer.wpe.forward(positions), _config.EmbdPdrop, training);
        var (mask, isCausal) = Attention.BuildMask(input.AttentionMask, batch, time, past, device);
        return new LayerContext(mask, isCausal, positions, input.Cache, past);
    }

    protected override Tensor RunLayer(int index, Tensor hidden, LayerContext context)
    {
        using var scope = torch.NewDisposeScope();
        return transformer.h[index].Forward(hidden, context).MoveToOuterDisposeScope();
    }

    protected override Tensor Head(Tensor hidden)
    {
        hidden = transformer.ln_f.forward(hidden);
        return lm_head is not null ? lm_head.forward(hidden) : nn.functional.linear(hidden, ModuleSurgery.EmbeddingWeight(transformer.wte));
    }
}

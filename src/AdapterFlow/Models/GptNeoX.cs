using System.Text.Json.Nodes;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Models;

/// <summary>
/// GPT-NeoX config.json (transformers GPTNeoXConfig; absent keys take its defaults). Rotary settings are read from
/// <c>rope_parameters</c> (transformers 5) or <c>rotary_pct</c> / <c>rotary_emb_base</c> / <c>rope_scaling</c> (4.x).
/// </summary>
public sealed class GptNeoXConfig : ModelConfig
{
    public GptNeoXConfig()
    {
        VocabSize = 50432;
        HiddenSize = 6144;
        NumHiddenLayers = 44;
        NumAttentionHeads = 64;
        NumKeyValueHeads = 64;
        HeadDim = 96;
        IntermediateSize = 24576;
        MaxPositionEmbeddings = 2048;
        TieWordEmbeddings = false;
        BosTokenId = 0;
        EosTokenIds = [2];
    }

    public override string ModelType => "gpt_neox";
    public override string Architecture => "GPTNeoXForCausalLM";

    public string HiddenAct { get; set; } = "gelu";
    public double LayerNormEps { get; set; } = 1e-5;

    /// <summary>Attention and MLP both read the layer input (true) or the MLP reads the attention output (false).</summary>
    public bool UseParallelResidual { get; set; } = true;

    /// <summary>Bias on <c>query_key_value</c> and <c>dense</c>.</summary>
    public bool AttentionBias { get; set; } = true;

    public double HiddenDropout { get; set; }
    public double AttentionDropout { get; set; }

    /// <summary>Rotary base, scaling and the share of each head rotated (rotate-half layout).</summary>
    public RopeSettings Rope { get; set; } = new(10000.0, null, 0.25);

    /// <summary>Dims of each head that are rotated: int(head_dim · partial_rotary_factor), as transformers computes it.</summary>
    public int RotaryDim => (int)(HeadDim * Rope.PartialRotaryFactor);

    public static GptNeoXConfig FromJson(JsonObject json, string path)
    {
        var c = new GptNeoXConfig();
        c.ReadCommon(json, path);
        c.HiddenSize = ConfigJson.Int(json, path, "hidden_size", c.HiddenSize);
        c.NumHiddenLayers = ConfigJson.Int(json, path, "num_hidden_layers", c.NumHiddenLayers);
        c.NumAttentionHeads = ConfigJson.Int(json, path, "num_attention_heads", c.NumAttentionHeads);
        c.IntermediateSize = ConfigJson.Int(json, path, "intermediate_size", c.IntermediateSize);
        c.MaxPositionEmbeddings = ConfigJson.Int(json, path, "max_position_embeddings", c.MaxPositionEmbeddings);
        c.HiddenAct = ConfigJson.OptionalString(json, path, "hidden_act") ?? c.HiddenAct;
        c.LayerNormEps = ConfigJson.Double(json, path, "layer_norm_eps", c.LayerNormEps);
        c.InitializerRange = ConfigJson.Double(json, path, "initializer_range", c.InitializerRange);
        c.UseParallelResidual = ConfigJson.Bool(json, path, "use_parallel_residual", c.UseParallelResidual);
        c.AttentionBias = ConfigJson.Bool(json, path, "attention_bias", c.AttentionBias);
        c.HiddenDropout = ConfigJson.Double(json, path, "hidden_dropout", c.HiddenDropout);
        c.AttentionDropout = ConfigJson.Double(json, path, "attention_dropout", c.AttentionDropout);
        c.Rope = RopeConfig.Read(json, path, c.Rope, ["rope_theta", "rotary_emb_base"], ["partial_rotary_factor", "rotary_pct"]);
        c.Validate(path);
        return c;
    }

    /// <summary>Derives head_dim and checks the sizes; <paramref name="what"/> names the source in errors.</summary>
    public void Validate(string what)
    {
        HeadDim = DecoderParts.HeadDim(HiddenSize, NumAttentionHeads, what);
        NumKeyValueHeads = NumAttentionHeads;
        if (NumHiddenLayers <= 0) throw new InvalidDataException($"{what}: 'num_hidden_layers' must be positive, got {NumHiddenLayers}");
        if (IntermediateSize <= 0) throw new InvalidDataException($"{what}: 'intermediate_size' must be positive, got {IntermediateSize}");
        if (RotaryDim <= 0 || RotaryDim % 2 != 0)
            throw new InvalidDataException($"{what}: partial_rotary_factor {Rope.PartialRotaryFactor} of head dim {HeadDim} gives {RotaryDim} rotary dims; it must be a positive even number");
        if (VocabSize <= 0 || MaxPositionEmbeddings <= 0)
            throw new InvalidDataException($"{what}: 'vocab_size' and 'max_position_embeddings' must be positive");
        Activations.Check(HiddenAct, what, "hidden_act");
    }

    public override JsonObject ToJson()
    {
        var json = WriteCommon();
        json["hidden_size"] = HiddenSize;
        json["num_hidden_layers"] = NumHiddenLayers;
        json["num_attention_heads"] = NumAttentionHeads;
        json["intermediate_size"] = IntermediateSize;
        json["max_position_embeddings"] = MaxPositionEmbeddings;
        json["hidden_act"] = HiddenAct;
        json["layer_norm_eps"] = LayerNormEps;
        json["initializer_range"] = InitializerRange;
        json["use_parallel_residual"] = UseParallelResidual;
        json["attention_bias"] = AttentionBias;
        json["hidden_dropout"] = HiddenDropout;
        json["attention_dropout"] = AttentionDropout;
        json.Remove("rope_theta");
        json.Remove("partial_rotary_factor");
        // transformers 4.x reads rotary_pct / rotary_emb_base; 5 reads rope_parameters. Write both so either agrees.
        RopeConfig.Write(json, Rope, "rotary_emb_base", "rotary_pct", writePartial: true);
        return json;
    }
}

/// <summary>GPT-NeoX's <c>attention</c>: fused per-head <c>query_key_value</c> and <c>dense</c>.</summary>
public sealed class GptNeoXAttention : nn.Module
{
    public nn.Module<Tensor, Tensor> query_key_value;
    public nn.Module<Tensor, Tensor> dense;

    public GptNeoXAttention(GptNeoXConfig config) : base("attention")
    {
        query_key_value = nn.Linear(config.HiddenSize, 3L * config.HiddenSize, hasBias: config.AttentionBias);
        dense = nn.Linear(config.HiddenSize, config.HiddenSize, hasBias: config.AttentionBias);
        register_module("query_key_value", query_key_value);
        register_module("dense", dense);
    }
}

/// <summary>GPT-NeoX's <c>mlp</c>.</summary>
public sealed class GptNeoXMlp : nn.Module
{
    public nn.Module<Tensor, Tensor> dense_h_to_4h;
    public nn.Module<Tensor, Tensor> dense_4h_to_h;

    public GptNeoXMlp(GptNeoXConfig config) : base("mlp")
    {
        dense_h_to_4h = nn.Linear(config.HiddenSize, config.IntermediateSize, hasBias: true);
        dense_4h_to_h = nn.Linear(config.IntermediateSize, config.HiddenSize, hasBias: true);
        register_module("dense_h_to_4h", dense_h_to_4h);
        register_module("dense_4h_to_h", dense_4h_to_h);
    }
}

/// <summary>One GPT-NeoX layer (<c>gpt_neox.layers.{i}</c>), parallel or sequential residual.</summary>
public sealed class GptNeoXLayer : nn.Module
{
    public nn.Module<Tensor, Tensor> input_layernorm;
    public nn.Module<Tensor, Tensor> post_attention_layernorm;
    public GptNeoXAttention attention;
    public GptNeoXMlp mlp;

    private readonly GptNeoXConfig _config;
    private readonly int _layer;
    private readonly RotaryEmbedding _rotary;
    private readonly Func<Tensor, Tensor> _act;

    public GptNeoXLayer(GptNeoXConfig config, int layer, RotaryEmbedding rotary) : base("layer")
    {
        _config = config;
        _layer = layer;
        _rotary = rotary;
        _act = Activations.Resolve(config.HiddenAct);
        input_layernorm = nn.LayerNorm(config.HiddenSize, config.LayerNormEps);
        post_attention_layernorm = nn.LayerNorm(config.HiddenSize, config.LayerNormEps);
        attention = new GptNeoXAttention(config);
        mlp = new GptNeoXMlp(config);
        register_module("input_layernorm", input_layernorm);
        register_module("post_attention_layernorm", post_attention_layernorm);
        register_module("attention", attention);
        register_module("mlp", mlp);
    }

    public Tensor Forward(Tensor hidden, RotaryLayerContext context)
    {
        var (q, k, v) = DecoderParts.SplitFusedPerHead(attention.query_key_value.forward(input_layernorm.forward(hidden)),
            _config.NumAttentionHeads, _config.HeadDim);
        q = _rotary.Apply(q, context.Cos, context.Sin);
        k = _rotary.Apply(k, context.Cos, context.Sin);
        (k, v) = DecoderParts.UpdateCache(context, _layer, k, v);
        var y = Attention.Sdpa(q, k, v, context.Mask, context.IsCausal, training ? _config.AttentionDropout : 0.0);
        var attnOut = DecoderParts.Dropout(attention.dense.forward(DecoderParts.MergeHeads(y)), _config.HiddenDropout, training);
        if (_config.UseParallelResidual)
        {
            var mlpOut = Mlp(post_attention_layernorm.forward(hidden));
            return mlpOut + attnOut + hidden;
        }
        attnOut = attnOut + hidden;
        return Mlp(post_attention_layernorm.forward(attnOut)) + attnOut;
    }

    private Tensor Mlp(Tensor x) =>
        DecoderParts.Dropout(mlp.dense_4h_to_h.forward(_act(mlp.dense_h_to_4h.forward(x))), _config.HiddenDropout, training);
}

/// <summary>GPT-NeoX's <c>gpt_neox</c>.</summary>
public sealed class GptNeoXModel : nn.Module
{
    public nn.Module<Tensor, Tensor> embed_in;
    public ModuleList<GptNeoXLayer> layers;
    public nn.Module<Tensor, Tensor> final_layer_norm;

    public GptNeoXModel(GptNeoXConfig config, RotaryEmbedding rotary) : base("gpt_neox")
    {
        embed_in = nn.Embedding(config.VocabSize, config.HiddenSize);
        layers = new ModuleList<GptNeoXLayer>(Enumerable.Range(0, config.NumHiddenLayers).Select(i => new GptNeoXLayer(config, i, rotary)).ToArray());
        final_layer_norm = nn.LayerNorm(config.HiddenSize, config.LayerNormEps);
        register_module("embed_in", embed_in);
        register_module("layers", layers);
        register_module("final_layer_norm", final_layer_norm);
    }
}

/// <summary>
/// GPTNeoXForCausalLM (Pythia, GPT-NeoX-20B): rotate-half rotary on part of each head, fused per-head QKV, head
/// <c>embed_out</c> (absent when tied to <c>gpt_neox.embed_in</c>).
/// </summary>
public sealed class GptNeoXForCausalLM : CausalLM
{
    public static readonly ModelFamily Family = new("gpt_neox", "GPTNeoXForCausalLM", GptNeoXConfig.FromJson,
        c => new GptNeoXForCausalLM(DecoderParts.ConfigAs<GptNeoXConfig>(c)));

    private readonly GptNeoXConfig _config;
    private readonly RotaryEmbedding _rotary;
    public GptNeoXModel gpt_neox;
    public nn.Module<Tensor, Tensor>? embed_out;

    public GptNeoXForCausalLM(GptNeoXConfig config) : base("GPTNeoXForCausalLM")
    {
        config.Validate("GPT-NeoX config");
        _config = config;
        _rotary = new RotaryEmbedding(config.RotaryDim, config.Rope.Theta, RotaryLayout.RotateHalf, config.Rope.Scaling, config.MaxPositionEmbeddings);
        gpt_neox = new GptNeoXModel(config, _rotary);
        register_module("gpt_neox", gpt_neox);
        if (!config.TieWordEmbeddings)
        {
            embed_out = nn.Linear(config.HiddenSize, config.VocabSize, hasBias: false);
            register_module("embed_out", embed_out);
        }
    }

    public override ModelConfig Config => _config;

    public override Tensor EmbedTokens(Tensor inputIds) => gpt_neox.embed_in.forward(inputIds);

    protected override LayerContext Prepare(ForwardInput input, out Tensor hidden) =>
        DecoderParts.PrepareRotary(input, EmbedTokens, _rotary, _config.HiddenDropout, training, out hidden);

    protected override Tensor RunLayer(int index, Tensor hidden, LayerContext context)
    {
        using var scope = torch.NewDisposeScope();
        return gpt_neox.layers[index].Forward(hidden, (RotaryLayerContext)context).MoveToOuterDisposeScope();
    }

    protected override Tensor Head(Tensor hidden)
    {
        hidden = gpt_neox.final_layer_norm.forward(hidden);
        return embed_out is not null ? embed_out.forward(hidden) : nn.functional.linear(hidden, ModuleSurgery.EmbeddingWeight(gpt_neox.embed_in));
    }
}

using System.Text.Json.Nodes;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Models;

/// <summary>OPT config.json (transformers OPTConfig; absent keys take its defaults).</summary>
public sealed class OptConfig : ModelConfig
{
    public OptConfig()
    {
        VocabSize = 50272;
        HiddenSize = 768;
        NumHiddenLayers = 12;
        NumAttentionHeads = 12;
        NumKeyValueHeads = 12;
        HeadDim = 64;
        IntermediateSize = 3072;
        MaxPositionEmbeddings = 2048;
        WordEmbedProjDim = 768;
        TieWordEmbeddings = true;
        PadTokenId = 1;
        BosTokenId = 2;
        EosTokenIds = [2];
    }

    public override string ModelType => "opt";
    public override string Architecture => "OPTForCausalLM";

    /// <summary>Pre-norm (true, most OPT sizes) or post-norm (false, opt-350m).</summary>
    public bool DoLayerNormBefore { get; set; } = true;

    /// <summary>transformers' <c>_remove_final_layer_norm</c>: drop the decoder's final norm.</summary>
    public bool RemoveFinalLayerNorm { get; set; }

    /// <summary>Width of the token embeddings; <c>project_in</c>/<c>project_out</c> map it to the hidden size when they differ.</summary>
    public int WordEmbedProjDim { get; set; }

    public string ActivationFunction { get; set; } = "relu";
    public bool EnableBias { get; set; } = true;
    public bool LayerNormElementwiseAffine { get; set; } = true;
    public double Dropout { get; set; } = 0.1;
    public double AttentionDropout { get; set; }

    /// <summary>OPT's learned position table starts 2 rows in (a fairseq leftover).</summary>
    public const int PositionOffset = 2;

    public static OptConfig FromJson(JsonObject json, string path)
    {
        var c = new OptConfig();
        c.ReadCommon(json, path);
        c.HiddenSize = ConfigJson.Int(json, path, "hidden_size", c.HiddenSize);
        c.NumHiddenLayers = ConfigJson.Int(json, path, "num_hidden_layers", c.NumHiddenLayers);
        c.NumAttentionHeads = ConfigJson.Int(json, path, "num_attention_heads", c.NumAttentionHeads);
        c.IntermediateSize = ConfigJson.Int(json, path, "ffn_dim", c.IntermediateSize);
        c.MaxPositionEmbeddings = ConfigJson.Int(json, path, "max_position_embeddings", c.MaxPositionEmbeddings);
        c.WordEmbedProjDim = ConfigJson.OptionalInt(json, path, "word_embed_proj_dim") ?? c.HiddenSize;
        c.DoLayerNormBefore = ConfigJson.Bool(json, path, "do_layer_norm_before", c.DoLayerNormBefore);
        c.RemoveFinalLayerNorm = ConfigJson.Bool(json, path, "_remove_final_layer_norm", c.RemoveFinalLayerNorm);
        c.ActivationFunction = ConfigJson.OptionalString(json, path, "activation_function") ?? c.ActivationFunction;
        c.EnableBias = ConfigJson.Bool(json, path, "enable_bias", c.EnableBias);
        c.LayerNormElementwiseAffine = ConfigJson.Bool(json, path, "layer_norm_elementwise_affine", c.LayerNormElementwiseAffine);
        c.Dropout = ConfigJson.Double(json, path, "dropout", c.Dropout);
        c.AttentionDropout = ConfigJson.Double(json, path, "attention_dropout", c.AttentionDropout);
        c.InitializerRange = ConfigJson.Double(json, path, "init_std", c.InitializerRange);
        c.Validate(path);
        return c;
    }

    /// <summary>Derives head_dim and checks the sizes; <paramref name="what"/> names the source in errors.</summary>
    public void Validate(string what)
    {
        HeadDim = DecoderParts.HeadDim(HiddenSize, NumAttentionHeads, what);
        NumKeyValueHeads = NumAttentionHeads;
        if (NumHiddenLayers <= 0) throw new InvalidDataException($"{what}: 'num_hidden_layers' must be positive, got {NumHiddenLayers}");
        if (IntermediateSize <= 0) throw new InvalidDataException($"{what}: 'ffn_dim' must be positive, got {IntermediateSize}");
        if (WordEmbedProjDim <= 0) throw new InvalidDataException($"{what}: 'word_embed_proj_dim' must be positive, got {WordEmbedProjDim}");
        if (VocabSize <= 0 || MaxPositionEmbeddings <= 0)
            throw new InvalidDataException($"{what}: 'vocab_size' and 'max_position_embeddings' must be positive");
        Activations.Check(ActivationFunction, what, "activation_function");
    }

    public override JsonObject ToJson()
    {
        var json = WriteCommon();
        json["hidden_size"] = HiddenSize;
        json["num_hidden_layers"] = NumHiddenLayers;
        json["num_attention_heads"] = NumAttentionHeads;
        json["ffn_dim"] = IntermediateSize;
        json["max_position_embeddings"] = MaxPositionEmbeddings;
        json["word_embed_proj_dim"] = WordEmbedProjDim;
        json["do_layer_norm_before"] = DoLayerNormBefore;
        json["_remove_final_layer_norm"] = RemoveFinalLayerNorm;
        json["activation_function"] = ActivationFunction;
        json["enable_bias"] = EnableBias;
        json["layer_norm_elementwise_affine"] = LayerNormElementwiseAffine;
        json["dropout"] = Dropout;
        json["attention_dropout"] = AttentionDropout;
        json["init_std"] = InitializerRange;
        return json;
    }
}

/// <summary>OPT's <c>self_attn</c>: separate q/k/v projections and <c>out_proj</c>.</summary>
public sealed class OptAttention : nn.Module
{
    public nn.Module<Tensor, Tensor> q_proj;
    public nn.Module<Tensor, Tensor> k_proj;
    public nn.Module<Tensor, Tensor> v_proj;
    public nn.Module<Tensor, Tensor> out_proj;

    public OptAttention(OptConfig config) : base("self_attn")
    {
        q_proj = nn.Linear(config.HiddenSize, config.HiddenSize, hasBias: config.EnableBias);
        k_proj = nn.Linear(config.HiddenSize, config.HiddenSize, hasBias: config.EnableBias);
        v_proj = nn.Linear(config.HiddenSize, config.HiddenSize, hasBias: config.EnableBias);
        out_proj = nn.Linear(config.HiddenSize, config.HiddenSize, hasBias: config.EnableBias);
        register_module("q_proj", q_proj);
        register_module("k_proj", k_proj);
        register_module("v_proj", v_proj);
        register_module("out_proj", out_proj);
    }
}

/// <summary>One OPT decoder layer (<c>model.decoder.layers.{i}</c>), pre- or post-norm.</summary>
public sealed class OptDecoderLayer : nn.Module
{
    public OptAttention self_attn;
    public nn.Module<Tensor, Tensor> self_attn_layer_norm;
    public nn.Module<Tensor, Tensor> fc1;
    public nn.Module<Tensor, Tensor> fc2;
    public nn.Module<Tensor, Tensor> final_layer_norm;

    private readonly OptConfig _config;
    private readonly int _layer;
    private readonly Func<Tensor, Tensor> _act;

    public OptDecoderLayer(OptConfig config, int layer) : base("layer")
    {
        _config = config;
        _layer = layer;
        _act = Activations.Resolve(config.ActivationFunction);
        self_attn = new OptAttention(config);
        self_attn_layer_norm = nn.LayerNorm(config.HiddenSize, elementwise_affine: config.LayerNormElementwiseAffine);
        fc1 = nn.Linear(config.HiddenSize, config.IntermediateSize, hasBias: config.EnableBias);
        fc2 = nn.Linear(config.IntermediateSize, config.HiddenSize, hasBias: config.EnableBias);
        final_layer_norm = nn.LayerNorm(config.HiddenSize, elementwise_affine: config.LayerNormElementwiseAffine);
        register_module("self_attn", self_attn);
        register_module("self_attn_layer_norm", self_attn_layer_norm);
        register_module("fc1", fc1);
        register_module("fc2", fc2);
        register_module("final_layer_norm", final_layer_norm);
    }

    public Tensor Forward(Tensor hidden, LayerContext context)
    {
        bool preNorm = _config.DoLayerNormBefore;
        long heads = _config.NumAttentionHeads, headDim = _config.HeadDim;
        var h = preNorm ? self_attn_layer_norm.forward(hidden) : hidden;
        var q = DecoderParts.SplitHeads(self_attn.q_proj.forward(h), heads, headDim);
        var k = DecoderParts.SplitHeads(self_attn.k_proj.forward(h), heads, headDim);
        var v = DecoderParts.SplitHeads(self_attn.v_proj.forward(h), heads, headDim);
        (k, v) = DecoderParts.UpdateCache(context, _layer, k, v);
        var y = Attention.Sdpa(q, k, v, context.Mask, context.IsCausal, training ? _config.AttentionDropout : 0.0);
        var attnOut = self_attn.out_proj.forward(DecoderParts.MergeHeads(y));
        hidden = hidden + DecoderParts.Dropout(attnOut, _config.Dropout, training);
        if (!preNorm) hidden = self_attn_layer_norm.forward(hidden);

        h = preNorm ? final_layer_norm.forward(hidden) : hidden;
        var ffn = fc2.forward(_act(fc1.forward(h)));
        hidden = hidden + DecoderParts.Dropout(ffn, _config.Dropout, training);
        return preNorm ? hidden : final_layer_norm.forward(hidden);
    }
}

/// <summary>OPT's <c>model.decoder</c>.</summary>
public sealed class OptDecoder : nn.Module
{
    public nn.Module<Tensor, Tensor> embed_tokens;
    public Embedding embed_positions;
    public nn.Module<Tensor, Tensor>? project_in;
    public nn.Module<Tensor, Tensor>? project_out;
    public nn.Module<Tensor, Tensor>? final_layer_norm;
    public ModuleList<OptDecoderLayer> layers;

    public OptDecoder(OptConfig config) : base("decoder")
    {
        embed_tokens = nn.Embedding(config.VocabSize, config.WordEmbedProjDim);
        embed_positions = nn.Embedding(config.MaxPositionEmbeddings + OptConfig.PositionOffset, config.HiddenSize);
        register_module("embed_tokens", embed_tokens);
        register_module("embed_positions", embed_positions);
        if (config.WordEmbedProjDim != config.HiddenSize)
        {
            project_out = nn.Linear(config.HiddenSize, config.WordEmbedProjDim, hasBias: false);
            project_in = nn.Linear(config.WordEmbedProjDim, config.HiddenSize, hasBias: false);
            register_module("project_out", project_out);
            register_module("project_in", project_in);
        }
        // Post-norm OPT (opt-350m) normalises inside each layer and has no final norm.
        if (config.DoLayerNormBefore && !config.RemoveFinalLayerNorm)
        {
            final_layer_norm = nn.LayerNorm(config.HiddenSize, elementwise_affine: config.LayerNormElementwiseAffine);
            register_module("final_layer_norm", final_layer_norm);
        }
        layers = new ModuleList<OptDecoderLayer>(Enumerable.Range(0, config.NumHiddenLayers).Select(i => new OptDecoderLayer(config, i)).ToArray());
        register_module("layers", layers);
    }
}

/// <summary>OPT's <c>model</c> (only wraps the decoder, as in transformers).</summary>
public sealed class OptModel : nn.Module
{
    public OptDecoder decoder;

    public OptModel(OptConfig config) : base("model")
    {
        decoder = new OptDecoder(config);
        register_module("decoder", decoder);
    }
}

/// <summary>
/// OPTForCausalLM. Positions come from the attention mask (cumsum(mask) · mask − 1, offset by 2 into the learned
/// table), so left padding does not shift real tokens. With tied embeddings there is no separate <c>lm_head</c>.
/// </summary>
public sealed class OptForCausalLM : CausalLM
{
    public static readonly ModelFamily Family = new("opt", "OPTForCausalLM", OptConfig.FromJson,
        c => new OptForCausalLM(DecoderParts.ConfigAs<OptConfig>(c)));

    private readonly OptConfig _config;
    public OptModel model;
    public nn.Module<Tensor, Tensor>? lm_head;

    public OptForCausalLM(OptConfig config) : base("OPTForCausalLM")
    {
        config.Validate("OPT config");
        _config = config;
        model = new OptModel(config);
        register_module("model", model);
        if (!config.TieWordEmbeddings)
        {
            lm_head = nn.Linear(config.WordEmbedProjDim, config.VocabSize, hasBias: false);
            register_module("lm_head", lm_head);
        }
    }

    public override ModelConfig Config => _config;

    public override Tensor EmbedTokens(Tensor inputIds) => model.decoder.embed_tokens.forward(inputIds);

    protected override LayerContext Prepare(ForwardInput input, out Tensor hidden)
    {
        var decoder = model.decoder;
        var embeds = DecoderParts.Embed(input, EmbedTokens);
        long batch = embeds.shape[0], time = embeds.shape[1];
        int past = input.PastLength;
        var device = embeds.device;
        DecoderParts.CheckPositionTable(input, past, time, _config.MaxPositionEmbeddings, "max_position_embeddings");
        // The mask is checked (and its shape reported) before positions are cut from it.
        var (attnMask, isCausal) = Attention.BuildMask(input.AttentionMask, batch, time, past, device);
        Tensor positions;
        if (input.PositionIds is not null || input.AttentionMask is null)
            positions = DecoderParts.Positions(input, batch, time, past, device);
        else
        {
            var mask = input.AttentionMask.to(device).to_type(ScalarType.Int64);
            positions = (mask.cumsum(1) * mask - 1).narrow(1, past, time);
        }
        if (decoder.project_in is not null) embeds = decoder.project_in.forward(embeds);
        hidden = embeds + decoder.embed_positions.forward(positions + OptConfig.PositionOffset);
        hidden = DecoderParts.Dropout(hidden, _config.Dropout, training);
        return new LayerContext(attnMask, isCausal, positions, input.Cache, past);
    }

    protected override Tensor RunLayer(int index, Tensor hidden, LayerContext context)
    {
        using var scope = torch.NewDisposeScope();
        return model.decoder.layers[index].Forward(hidden, context).MoveToOuterDisposeScope();
    }

    protected override Tensor Head(Tensor hidden)
    {
        var decoder = model.decoder;
        if (decoder.final_layer_norm is not null) hidden = decoder.final_layer_norm.forward(hidden);
        if (decoder.project_out is not null) hidden = decoder.project_out.forward(hidden);
        return lm_head is not null ? lm_head.forward(hidden) : nn.functional.linear(hidden, ModuleSurgery.EmbeddingWeight(decoder.embed_tokens));
    }
}

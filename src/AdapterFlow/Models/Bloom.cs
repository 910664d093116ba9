using System.Text.Json.Nodes;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Models;

/// <summary>BLOOM config.json (transformers BloomConfig; absent keys take its defaults).</summary>
public sealed class BloomConfig : ModelConfig
{
    public BloomConfig()
    {
        VocabSize = 250880;
        HiddenSize = 64;
        NumHiddenLayers = 2;
        NumAttentionHeads = 8;
        NumKeyValueHeads = 8;
        HeadDim = 8;
        IntermediateSize = 4 * 64;
        // ALiBi has no position table; this only bounds what callers should expect to work well.
        MaxPositionEmbeddings = 2048;
        TieWordEmbeddings = true;
        BosTokenId = 1;
        EosTokenIds = [2];
    }

    public override string ModelType => "bloom";
    public override string Architecture => "BloomForCausalLM";

    public double LayerNormEpsilon { get; set; } = 1e-5;

    /// <summary>Residuals start from the normalised input instead of the raw one.</summary>
    public bool ApplyResidualConnectionPostLayernorm { get; set; }

    public double HiddenDropout { get; set; }
    public double AttentionDropout { get; set; }

    public static BloomConfig FromJson(JsonObject json, string path)
    {
        var c = new BloomConfig();
        c.ReadCommon(json, path);
        // BloomConfig takes the hidden size from n_embed when given (older checkpoints), else hidden_size.
        c.HiddenSize = ConfigJson.OptionalInt(json, path, "n_embed") ?? ConfigJson.Int(json, path, "hidden_size", c.HiddenSize);
        c.NumHiddenLayers = ConfigJson.Int(json, path, "n_layer", ConfigJson.Int(json, path, "num_hidden_layers", c.NumHiddenLayers));
        c.NumAttentionHeads = ConfigJson.Int(json, path, "n_head", ConfigJson.Int(json, path, "num_attention_heads", c.NumAttentionHeads));
        c.MaxPositionEmbeddings = ConfigJson.Int(json, path, "seq_length", c.MaxPositionEmbeddings);
        c.LayerNormEpsilon = ConfigJson.Double(json, path, "layer_norm_epsilon", c.LayerNormEpsilon);
        c.InitializerRange = ConfigJson.Double(json, path, "initializer_range", c.InitializerRange);
        c.ApplyResidualConnectionPostLayernorm = ConfigJson.Bool(json, path, "apply_residual_connection_post_layernorm", c.ApplyResidualConnectionPostLayernorm);
        c.HiddenDropout = ConfigJson.Double(json, path, "hidden_dropout", c.HiddenDropout);
        c.AttentionDropout = ConfigJson.Double(json, path, "attention_dropout", c.AttentionDropout);
        c.Validate(path);
        return c;
    }

    /// <summary>Derives head_dim and the fixed 4 × hidden MLP width and checks the sizes.</summary>
    public void Validate(string what)
    {
        HeadDim = DecoderParts.HeadDim(HiddenSize, NumAttentionHeads, what);
        NumKeyValueHeads = NumAttentionHeads;
        IntermediateSize = 4 * HiddenSize;
        if (NumHiddenLayers <= 0) throw new InvalidDataException($"{what}: 'n_layer' must be positive, got {NumHiddenLayers}");
        if (VocabSize <= 0) throw new InvalidDataException($"{what}: 'vocab_size' must be positive, got {VocabSize}");
    }

    public override JsonObject ToJson()
    {
        var json = WriteCommon();
        json.Remove("n_embed");
        json["hidden_size"] = HiddenSize;
        json["n_layer"] = NumHiddenLayers;
        json["n_head"] = NumAttentionHeads;
        json["layer_norm_epsilon"] = LayerNormEpsilon;
        json["initializer_range"] = InitializerRange;
        json["apply_residual_connection_post_layernorm"] = ApplyResidualConnectionPostLayernorm;
        json["hidden_dropout"] = HiddenDropout;
        json["attention_dropout"] = AttentionDropout;
        return json;
    }

    /// <summary>
    /// ALiBi slopes as transformers' build_alibi_tensor: a geometric sequence for the largest power of two ≤ heads,
    /// then every other slope of the sequence for twice as many heads to fill the rest.
    /// </summary>
    public static double[] AlibiSlopes(int heads)
    {
        int closest = 1 << (int)Math.Floor(Math.Log2(heads));
        double Base(int n) => Math.Pow(2, -Math.Pow(2, -(Math.Log2(n) - 3)));
        var slopes = new List<double>(heads);
        double b = Base(closest);
        for (int i = 1; i <= closest; i++) slopes.Add(Math.Pow(b, i));
        if (closest != heads)
        {
            double extra = Base(2 * closest);
            int remaining = Math.Min(closest, heads - closest);
            for (int i = 0; i < remaining; i++) slopes.Add(Math.Pow(extra, 1 + 2 * i));
        }
        return slopes.ToArray();
    }
}

/// <summary>Shared per-forward state of BLOOM: the additive ALiBi + causal/padding bias, [batch, heads, time, keys].</summary>
public sealed class AlibiLayerContext : LayerContext
{
    public AlibiLayerContext(Tensor bias, Tensor positionIds, KVCache? cache, int pastLength)
        : base(null, false, positionIds, cache, pastLength)
    {
        Bias = bias;
    }

    public Tensor Bias { get; }

    public override LayerContext? SelectRows(Tensor rows) =>
        Cache is null ? new AlibiLayerContext(RowsOf(Bias, rows)!, RowsOf(PositionIds, rows)!, null, PastLength) : null;
}

/// <summary>BLOOM's <c>self_attention</c>: fused per-head <c>query_key_value</c> and <c>dense</c>.</summary>
public sealed class BloomAttention : nn.Module
{
    public nn.Module<Tensor, Tensor> query_key_value;
    public nn.Module<Tensor, Tensor> dense;

    public BloomAttention(BloomConfig config) : base("self_attention")
    {
        query_key_value = nn.Linear(config.HiddenSize, 3L * config.HiddenSize, hasBias: true);
        dense = nn.Linear(config.HiddenSize, config.HiddenSize, hasBias: true);
        register_module("query_key_value", query_key_value);
        register_module("dense", dense);
    }
}

/// <summary>BLOOM's <c>mlp</c>.</summary>
public sealed class BloomMlp : nn.Module
{
    public nn.Module<Tensor, Tensor> dense_h_to_4h;
    public nn.Module<Tensor, Tensor> dense_4h_to_h;

    public BloomMlp(BloomConfig config) : base("mlp")
    {
        dense_h_to_4h = nn.Linear(config.HiddenSize, config.IntermediateSize, hasBias: true);
        dense_4h_to_h = nn.Linear(config.IntermediateSize, config.HiddenSize, hasBias: true);
        register_module("dense_h_to_4h", dense_h_to_4h);
        register_module("dense_4h_to_h", dense_4h_to_h);
    }
}

/// <summary>One BLOOM block (<c>transformer.h.{i}</c>).</summary>
public sealed class BloomBlock : nn.Module
{
    public nn.Module<Tensor, Tensor> input_layernorm;
    public BloomAttention self_attention;
    public nn.Module<Tensor, Tensor> post_attention_layernorm;
    public BloomMlp mlp;

    private readonly BloomConfig _config;
    private readonly int _layer;

    public BloomBlock(BloomConfig config, int layer) : base("block")
    {
        _config = config;
        _layer = layer;
        input_layernorm = nn.LayerNorm(config.HiddenSize, config.LayerNormEpsilon);
        self_attention = new BloomAttention(config);
        post_attention_layernorm = nn.LayerNorm(config.HiddenSize, config.LayerNormEpsilon);
        mlp = new BloomMlp(config);
        register_module("input_layernorm", input_layernorm);
        register_module("self_attention", self_attention);
        register_module("post_attention_layernorm", post_attention_layernorm);
        register_module("mlp", mlp);
    }

    public Tensor Forward(Tensor hidden, AlibiLayerContext context)
    {
        bool post = _config.ApplyResidualConnectionPostLayernorm;
        var normed = input_layernorm.forward(hidden);
        var residual = post ? normed : hidden;
        var (q, k, v) = DecoderParts.SplitFusedPerHead(self_attention.query_key_value.forward(normed), _config.NumAttentionHeads, _config.HeadDim);
        (k, v) = DecoderParts.UpdateCache(context, _layer, k, v);
        var y = Attention.Sdpa(q, k, v, context.Bias, false, training ? _config.AttentionDropout : 0.0);
        var attnOut = self_attention.dense.forward(DecoderParts.MergeHeads(y));
        hidden = DecoderParts.Dropout(attnOut, _config.HiddenDropout, training) + residual;

        normed = post_attention_layernorm.forward(hidden);
        residual = post ? normed : hidden;
        var mlpOut = mlp.dense_4h_to_h.forward(Activations.GeluTanh(mlp.dense_h_to_4h.forward(normed)));
        return DecoderParts.Dropout(mlpOut, _config.HiddenDropout, training) + residual;
    }
}

/// <summary>BLOOM's <c>transformer</c>.</summary>
public sealed class BloomModel : nn.Module
{
    public nn.Module<Tensor, Tensor> word_embeddings;
    public nn.Module<Tensor, Tensor> word_embeddings_layernorm;
    public ModuleList<BloomBlock> h;
    public nn.Module<Tensor, Tensor> ln_f;

    public BloomModel(BloomConfig config) : base("transformer")
    {
        word_embeddings = nn.Embedding(config.VocabSize, config.HiddenSize);
        word_embeddings_layernorm = nn.LayerNorm(config.HiddenSize, config.LayerNormEpsilon);
        h = new ModuleList<BloomBlock>(Enumerable.Range(0, config.NumHiddenLayers).Select(i => new BloomBlock(config, i)).ToArray());
        ln_f = nn.LayerNorm(config.HiddenSize, config.LayerNormEpsilon);
        register_module("word_embeddings", word_embeddings);
        register_module("word_embeddings_layernorm", word_embeddings_layernorm);
        register_module("h", h);
        register_module("ln_f", ln_f);
    }
}

/// <summary>
/// BloomForCausalLM: ALiBi attention (a per-head linear bias on key positions counted over real tokens only, so
/// left padding shifts nothing), fused per-head QKV. With tied embeddings there is no separate <c>lm_head</c>.
/// </summary>
public sealed class BloomForCausalLM : CausalLM
{
    public static readonly ModelFamily Family = new("bloom", "BloomForCausalLM", BloomConfig.FromJson,
        c => new BloomForCausalLM(DecoderParts.ConfigAs<BloomConfig>(c)));

    private readonly BloomConfig _config;
    private readonly float[] _slopes;
    public BloomModel transformer;
    public nn.Module<Tensor, Tensor>? lm_head;

    public BloomForCausalLM(BloomConfig config) : base("BloomForCausalLM")
    {
        config.Validate("BLOOM config");
        _config = config;
        _slopes = BloomConfig.AlibiSlopes(config.NumAttentionHeads).Select(s => (float)s).ToArray();
        transformer = new BloomModel(config);
        register_module("transformer", transformer);
        if (!config.TieWordEmbeddings)
        {
            lm_head = nn.Linear(config.HiddenSize, config.VocabSize, hasBias: false);
            register_module("lm_head", lm_head);
        }
    }

    public override ModelConfig Config => _config;

    public override Tensor EmbedTokens(Tensor inputIds) => transformer.word_embeddings.forward(inputIds);

    protected override LayerContext Prepare(ForwardInput input, out Tensor hidden)
    {
        var embeds = DecoderParts.Embed(input, EmbedTokens);
        long batch = embeds.shape[0], time = embeds.shape[1];
        int past = input.PastLength;
        var device = embeds.device;
        hidden = transformer.word_embeddings_layernorm.forward(embeds);
        // An explicit mask makes BuildMask always return the boolean mask the ALiBi bias is merged with.
        var keyMask = input.AttentionMask ?? torch.ones(batch, past + time, dtype: ScalarType.Int64, device: device);
        var (allowed, _) = Attention.BuildMask(keyMask, batch, time, past, device);
        var m = keyMask.to(device).to_type(ScalarType.Int64);
        var keyPositions = ((m.cumsum(1) - 1) * m).to_type(ScalarType.Float32); // [batch, keys]
        var slopes = SlopesOn(device);
        var alibi = slopes * keyPositions.view(batch, 1, 1, -1);            // [batch, heads, 1, keys]
        var blocked = torch.zeros(allowed!.shape, dtype: ScalarType.Float32, device: device).masked_fill(allowed.logical_not(), float.NegativeInfinity);
        var bias = (alibi + blocked).to_type(hidden.dtype);
        // BLOOM takes no position ids (ALiBi reads positions off the mask); the context still carries the defaults.
        var positions = Attention.DefaultPositions(batch, time, past, device);
        return new AlibiLayerContext(bias, positions, input.Cache, past);
    }

    // The slopes as a [1, heads, 1, 1] float32 tensor on the device last used: built once rather than copied from
    // the host on every decode step.
    private Tensor? _slopesTensor;

    private Tensor SlopesOn(Device device)
    {
        var cached = _slopesTensor;
        if (cached is null || cached.device_type != device.type || cached.device_index != device.index)
        {
            cached?.Dispose();
            cached = torch.tensor(_slopes, device: device).view(1, -1, 1, 1).DetachFromDisposeScope();
            _slopesTensor = cached;
        }
        return cached;
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            _slopesTensor?.Dispose();
            _slopesTensor = null;
        }
        base.Dispose(disposing);
    }

    protected override Tensor RunLayer(int index, Tensor hidden, LayerContext context)
    {
        using var scope = torch.NewDisposeScope();
        return transformer.h[index].Forward(hidden, (AlibiLayerContext)context).MoveToOuterDisposeScope();
    }

    protected override Tensor Head(Tensor hidden)
    {
        hidden = transformer.ln_f.forward(hidden);
        return lm_head is not null ? lm_head.forward(hidden) : nn.functional.linear(hidden, ModuleSurgery.EmbeddingWeight(transformer.word_embeddings));
    }
}

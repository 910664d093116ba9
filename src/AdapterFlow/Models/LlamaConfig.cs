using System.Text.Json.Nodes;

namespace AdapterFlow.Models;

/// <summary>
/// config.json of a LLaMA-family model (<c>model_type</c> "llama"), with transformers' defaults for absent keys.
/// Reads both the transformers 5 layout (<c>rope_parameters</c>, <c>dtype</c>) and the 4.x one (<c>rope_theta</c>,
/// <c>rope_scaling</c>, <c>torch_dtype</c>); writes the transformers 5 layout. Mistral and Qwen2 derive from it
/// and change defaults and a few keys.
/// </summary>
public class LlamaConfig : ModelConfig
{
    /// <summary>Attention kinds per layer, as transformers' <c>layer_types</c>.</summary>
    public const string FullAttention = "full_attention";
    public const string SlidingAttention = "sliding_attention";

    public LlamaConfig()
    {
        // transformers LlamaConfig defaults (the 7B shape).
        VocabSize = 32000;
        HiddenSize = 4096;
        IntermediateSize = 11008;
        NumHiddenLayers = 32;
        NumAttentionHeads = 32;
        MaxPositionEmbeddings = 2048;
        BosTokenId = 1;
        EosTokenIds = [2];
    }

    public override string ModelType => "llama";
    public override string Architecture => "LlamaForCausalLM";

    /// <summary>MLP activation name (transformers ACT2FN key).</summary>
    public string HiddenAct { get; set; } = "silu";
    public double RmsNormEps { get; set; } = 1e-6;

    /// <summary>RoPE base.</summary>
    public double RopeTheta { get; set; } = 10000.0;

    /// <summary>RoPE scaling (linear, dynamic, llama3); null = plain RoPE.</summary>
    public RopeScaling? RopeScaling { get; set; }

    /// <summary>Bias on q/k/v/o projections.</summary>
    public bool AttentionBias { get; set; }

    /// <summary>Bias on gate/up/down projections.</summary>
    public bool MlpBias { get; set; }
    public double AttentionDropout { get; set; }
    public int PretrainingTp { get; set; } = 1;
    public bool UseCache { get; set; } = true;

    /// <summary>Keys per query of sliding-window attention layers; null = none (full attention everywhere).</summary>
    public virtual int? EffectiveSlidingWindow => null;

    /// <summary>Bias on the q, k, v projections (Qwen2 has it without <see cref="AttentionBias"/>).</summary>
    public virtual bool QkvBias => AttentionBias;

    /// <summary>Bias on the output projection.</summary>
    public virtual bool OutputBias => AttentionBias;

    /// <summary>The attention kind of each layer (<see cref="FullAttention"/> or <see cref="SlidingAttention"/>).</summary>
    public virtual IReadOnlyList<string> LayerTypes =>
        Enumerable.Repeat(EffectiveSlidingWindow is null ? FullAttention : SlidingAttention, NumHiddenLayers).ToArray();

    /// <summary>Reads a config.json object; errors name <paramref name="path"/> and the key.</summary>
    public static LlamaConfig Read(JsonObject json, string path)
    {
        var config = new LlamaConfig();
        config.ReadFrom(json, path);
        return config;
    }

    /// <summary>Reads every key this family knows, then derives and validates.</summary>
    protected virtual void ReadFrom(JsonObject json, string path)
    {
        ReadCommon(json, path);
        HiddenSize = ConfigJson.Int(json, path, "hidden_size", HiddenSize);
        IntermediateSize = ConfigJson.Int(json, path, "intermediate_size", IntermediateSize);
        NumHiddenLayers = ConfigJson.Int(json, path, "num_hidden_layers", NumHiddenLayers);
        NumAttentionHeads = ConfigJson.Int(json, path, "num_attention_heads", NumAttentionHeads);
        NumKeyValueHeads = ConfigJson.Int(json, path, "num_key_value_heads", NumKeyValueHeads);
        HeadDim = ConfigJson.Int(json, path, "head_dim", HeadDim);
        MaxPositionEmbeddings = ConfigJson.Int(json, path, "max_position_embeddings", MaxPositionEmbeddings);
        InitializerRange = ConfigJson.Double(json, path, "initializer_range", InitializerRange);
        HiddenAct = ConfigJson.OptionalString(json, path, "hidden_act") ?? HiddenAct;
        RmsNormEps = ConfigJson.Double(json, path, "rms_norm_eps", RmsNormEps);
        AttentionBias = ConfigJson.Bool(json, path, "attention_bias", AttentionBias);
        MlpBias = ConfigJson.Bool(json, path, "mlp_bias", MlpBias);
        AttentionDropout = ConfigJson.Double(json, path, "attention_dropout", AttentionDropout);
        PretrainingTp = ConfigJson.Int(json, path, "pretraining_tp", PretrainingTp);
        UseCache = ConfigJson.Bool(json, path, "use_cache", UseCache);
        ReadRope(json, path);
        Validate(path);
    }

    /// <summary>
    /// transformers 5 keeps everything rotary in <c>rope_parameters</c>; 4.x has a top-level <c>rope_theta</c> and
    /// an optional <c>rope_scaling</c> (with <c>type</c> in older files, <c>rope_type</c> in newer ones).
    /// </summary>
    private void ReadRope(JsonObject json, string path)
    {
        RopeTheta = ConfigJson.Double(json, path, "rope_theta", RopeTheta);
        JsonObject? scaling = null;
        string scalingKey = "rope_scaling";
        foreach (var key in new[] { "rope_parameters", "rope_scaling" })
        {
            if (!json.TryGetPropertyValue(key, out var node) || node is null) continue;
            scaling = node as JsonObject ?? throw new InvalidDataException($"{path}: '{key}' must be an object, got {node.ToJsonString()}");
            scalingKey = key;
            break;
        }
        RopeScaling = null;
        if (scaling is null) return;
        string where = $"{path} ({scalingKey})";
        RopeTheta = ConfigJson.Double(scaling, where, "rope_theta", RopeTheta);
        var type = ConfigJson.OptionalString(scaling, where, "rope_type") ?? ConfigJson.OptionalString(scaling, where, "type") ?? "default";
        if (type == "default") return;
        if (type is not ("linear" or "dynamic" or "llama3"))
            throw new InvalidDataException($"{path}: rope_type '{type}' is not supported (supported: default, linear, dynamic, llama3)");
        var factor = ConfigJson.OptionalDouble(scaling, where, "factor")
                     ?? throw new InvalidDataException($"{path}: rope_type '{type}' needs '{scalingKey}.factor'");
        if (!(factor >= 1.0)) throw new InvalidDataException($"{path}: '{scalingKey}.factor' must be >= 1, got {factor}");
        if (type == "llama3")
        {
            double low = ConfigJson.OptionalDouble(scaling, where, "low_freq_factor")
                         ?? throw new InvalidDataException($"{path}: rope_type 'llama3' needs '{scalingKey}.low_freq_factor'");
            double high = ConfigJson.OptionalDouble(scaling, where, "high_freq_factor")
                          ?? throw new InvalidDataException($"{path}: rope_type 'llama3' needs '{scalingKey}.high_freq_factor'");
            int original = ConfigJson.OptionalInt(scaling, where, "original_max_position_embeddings")
                           ?? throw new InvalidDataException($"{path}: rope_type 'llama3' needs '{scalingKey}.original_max_position_embeddings'");
            if (!(high > low) || !(low > 0))
                throw new InvalidDataException($"{path}: rope_type 'llama3' needs 0 < low_freq_factor < high_freq_factor, got {low} and {high}");
            if (original <= 0)
                throw new InvalidDataException($"{path}: '{scalingKey}.original_max_position_embeddings' must be positive, got {original}");
            RopeScaling = new RopeScaling(type, factor, low, high, original);
        }
        else
        {
            RopeScaling = new RopeScaling(type, factor);
        }
    }

    /// <summary>Fills keys derived from others (head_dim, num_key_value_heads) and checks the shape is buildable.</summary>
    public void Validate(string source = "config")
    {
        if (NumKeyValueHeads <= 0) NumKeyValueHeads = NumAttentionHeads;
        if (HeadDim <= 0 && NumAttentionHeads > 0) HeadDim = HiddenSize / NumAttentionHeads;
        Positive(source, "vocab_size", VocabSize);
        Positive(source, "hidden_size", HiddenSize);
        Positive(source, "intermediate_size", IntermediateSize);
        Positive(source, "num_hidden_layers", NumHiddenLayers);
        Positive(source, "num_attention_heads", NumAttentionHeads);
        Positive(source, "num_key_value_heads", NumKeyValueHeads);
        Positive(source, "head_dim", HeadDim);
        Positive(source, "max_position_embeddings", MaxPositionEmbeddings);
        if (NumAttentionHeads % NumKeyValueHeads != 0)
            throw new InvalidDataException($"{source}: num_attention_heads ({NumAttentionHeads}) must be a multiple of num_key_value_heads ({NumKeyValueHeads})");
        if (HeadDim % 2 != 0)
            throw new InvalidDataException($"{source}: head_dim ({HeadDim}) must be even for rotary embeddings");
        if (!Activations.IsSupported(HiddenAct))
            throw new InvalidDataException($"{source}: hidden_act '{HiddenAct}' is not supported (supported: {string.Join(", ", Activations.Supported)})");
        if (!(RmsNormEps > 0)) throw new InvalidDataException($"{source}: rms_norm_eps must be positive, got {RmsNormEps}");
        if (!(RopeTheta > 0)) throw new InvalidDataException($"{source}: rope_theta must be positive, got {RopeTheta}");
        if (!(InitializerRange >= 0)) throw new InvalidDataException($"{source}: initializer_range must be >= 0, got {InitializerRange}");
        if (EffectiveSlidingWindow is <= 0)
            throw new InvalidDataException($"{source}: sliding_window must be positive, got {EffectiveSlidingWindow}");
        if (LayerTypes.Count != NumHiddenLayers)
            throw new InvalidDataException($"{source}: layer_types has {LayerTypes.Count} entries, num_hidden_layers is {NumHiddenLayers}");
    }

    private static void Positive(string source, string key, int value)
    {
        if (value <= 0) throw new InvalidDataException($"{source}: '{key}' must be a positive integer, got {value}");
    }

    /// <summary>The rotary embedding this config describes (rotate-half layout over the full head).</summary>
    public RotaryEmbedding CreateRotary() =>
        new(HeadDim, RopeTheta, RotaryLayout.RotateHalf, RopeScaling, MaxPositionEmbeddings);

    public override JsonObject ToJson()
    {
        var json = WriteCommon();
        json["hidden_size"] = HiddenSize;
        json["intermediate_size"] = IntermediateSize;
        json["num_hidden_layers"] = NumHiddenLayers;
        json["num_attention_heads"] = NumAttentionHeads;
        json["num_key_value_heads"] = NumKeyValueHeads;
        json["head_dim"] = HeadDim;
        json["max_position_embeddings"] = MaxPositionEmbeddings;
        json["initializer_range"] = InitializerRange;
        json["hidden_act"] = HiddenAct;
        json["rms_norm_eps"] = RmsNormEps;
        json["attention_dropout"] = AttentionDropout;
        json["use_cache"] = UseCache;
        WriteRope(json);
        WriteFamilyKeys(json);
        return json;
    }

    /// <summary>Keys only some families have (Llama: biases and pretraining_tp).</summary>
    protected virtual void WriteFamilyKeys(JsonObject json)
    {
        json["attention_bias"] = AttentionBias;
        json["mlp_bias"] = MlpBias;
        json["pretraining_tp"] = PretrainingTp;
    }

    /// <summary>transformers 5 layout: one rope_parameters object; legacy keys removed so they cannot disagree.</summary>
    private void WriteRope(JsonObject json)
    {
        // Start from what was read so that keys we do not model (e.g. attention_factor) survive.
        var rope = json["rope_parameters"] is JsonObject old ? (JsonObject)old.DeepClone()
                 : json["rope_scaling"] is JsonObject legacy ? (JsonObject)legacy.DeepClone()
                 : new JsonObject();
        rope.Remove("type");
        rope["rope_type"] = RopeScaling?.Type ?? "default";
        rope["rope_theta"] = RopeTheta;
        if (RopeScaling is null)
        {
            foreach (var key in new[] { "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings" })
                rope.Remove(key);
        }
        else
        {
            rope["factor"] = RopeScaling.Factor;
            if (RopeScaling.Type == "llama3")
            {
                rope["low_freq_factor"] = RopeScaling.LowFreqFactor;
                rope["high_freq_factor"] = RopeScaling.HighFreqFactor;
                rope["original_max_position_embeddings"] = RopeScaling.OriginalMaxPositionEmbeddings;
            }
        }
        json.Remove("rope_scaling");
        json.Remove("rope_theta");
        json["rope_parameters"] = rope;
    }
}

/// <summary>config.json of a Mistral model: Llama without biases, with sliding-window attention (default 4096 keys).</summary>
public sealed class MistralConfig : LlamaConfig
{
    public MistralConfig()
    {
        // transformers MistralConfig defaults (Mistral 7B).
        IntermediateSize = 14336;
        NumKeyValueHeads = 8;
        MaxPositionEmbeddings = 4096 * 32;
    }

    public override string ModelType => "mistral";
    public override string Architecture => "MistralForCausalLM";

    /// <summary>Keys per query; null disables the window.</summary>
    public int? SlidingWindow { get; set; } = 4096;

    public override int? EffectiveSlidingWindow => SlidingWindow;

    public static new MistralConfig Read(JsonObject json, string path)
    {
        var config = new MistralConfig();
        config.ReadFrom(json, path);
        return config;
    }

    protected override void ReadFrom(JsonObject json, string path)
    {
        // An explicit null turns the window off; an absent key keeps the default.
        if (json.TryGetPropertyValue("sliding_window", out var node))
            SlidingWindow = node is null ? null : ConfigJson.OptionalInt(json, path, "sliding_window");
        base.ReadFrom(json, path);
        // Mistral has no bias switches: transformers ignores them, so must we.
        AttentionBias = false;
        MlpBias = false;
    }

    protected override void WriteFamilyKeys(JsonObject json)
    {
        json["sliding_window"] = SlidingWindow;
        json.Remove("attention_bias");
        json.Remove("mlp_bias");
    }
}

/// <summary>
/// config.json of a Qwen2 model: Llama with bias on q/k/v, optional sliding-window attention on the layers from
/// <c>max_window_layers</c> on when <c>use_sliding_window</c> is set (off by default), or as <c>layer_types</c> says.
/// </summary>
public sealed class Qwen2Config : LlamaConfig
{
    private string[]? _layerTypes;

    public Qwen2Config()
    {
        // transformers Qwen2Config defaults.
        VocabSize = 151936;
        IntermediateSize = 22016;
        NumKeyValueHeads = 32;
        MaxPositionEmbeddings = 32768;
        BosTokenId = null;
        EosTokenIds = [];
    }

    public override string ModelType => "qwen2";
    public override string Architecture => "Qwen2ForCausalLM";

    public bool UseSlidingWindow { get; set; }

    /// <summary>Window size as configured (used only when <see cref="UseSlidingWindow"/>).</summary>
    public int? SlidingWindow { get; set; } = 4096;
    public int MaxWindowLayers { get; set; } = 28;

    public override int? EffectiveSlidingWindow => UseSlidingWindow ? SlidingWindow : null;
    public override bool QkvBias => true;
    public override bool OutputBias => false;

    /// <summary>Per-layer attention kinds: explicit <c>layer_types</c>, else derived as transformers does.</summary>
    public override IReadOnlyList<string> LayerTypes =>
        _layerTypes ?? Enumerable.Range(0, NumHiddenLayers)
            .Select(i => EffectiveSlidingWindow is not null && i >= MaxWindowLayers ? SlidingAttention : FullAttention)
            .ToArray();

    /// <summary>Sets explicit layer types (null = derive from use_sliding_window and max_window_layers).</summary>
    public void SetLayerTypes(IEnumerable<string>? types) => _layerTypes = types?.ToArray();

    public static new Qwen2Config Read(JsonObject json, string path)
    {
        var config = new Qwen2Config();
        config.ReadFrom(json, path);
        return config;
    }

    protected override void ReadFrom(JsonObject json, string path)
    {
        UseSlidingWindow = ConfigJson.Bool(json, path, "use_sliding_window", UseSlidingWindow);
        if (json.TryGetPropertyValue("sliding_window", out var node))
            SlidingWindow = node is null ? null : ConfigJson.OptionalInt(json, path, "sliding_window");
        MaxWindowLayers = ConfigJson.Int(json, path, "max_window_layers", MaxWindowLayers);
        if (json.TryGetPropertyValue("layer_types", out var types) && types is not null)
        {
            if (types is not JsonArray array || array.Any(t => t is not JsonValue v || !v.TryGetValue<string>(out var s) || s is not (FullAttention or SlidingAttention)))
                throw new InvalidDataException($"{path}: 'layer_types' must be a list of \"{FullAttention}\" / \"{SlidingAttention}\", got {types.ToJsonString()}");
            _layerTypes = array.Select(t => t!.GetValue<string>()).ToArray();
        }
        base.ReadFrom(json, path);
        AttentionBias = false;
        MlpBias = false;
        if (LayerTypes.Contains(SlidingAttention) && EffectiveSlidingWindow is null)
            throw new InvalidDataException($"{path}: layer_types has sliding_attention layers but sliding attention is off (use_sliding_window / sliding_window)");
    }

    protected override void WriteFamilyKeys(JsonObject json)
    {
        json["use_sliding_window"] = UseSlidingWindow;
        // transformers stores the window only when it is in use.
        json["sliding_window"] = EffectiveSlidingWindow;
        json["max_window_layers"] = MaxWindowLayers;
        json["layer_types"] = new JsonArray(LayerTypes.Select(t => (JsonNode?)t).ToArray());
        json.Remove("attention_bias");
        json.Remove("mlp_bias");
        json.Remove("pretraining_tp");
    }
}

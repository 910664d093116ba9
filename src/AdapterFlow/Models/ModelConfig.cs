using System.Text.Json.Nodes;

namespace AdapterFlow.Models;

/// <summary>
/// The fields every decoder-only family shares, read from a Hugging Face <c>config.json</c>. Each family
/// derives a typed configuration that adds its own keys with the transformers defaults for absent ones.
/// The parsed JSON is kept so that keys we do not model survive a load → save round trip.
/// </summary>
public abstract class ModelConfig
{
    /// <summary>Hugging Face <c>model_type</c>, e.g. "llama".</summary>
    public abstract string ModelType { get; }

    /// <summary>Hugging Face architecture class, e.g. "LlamaForCausalLM".</summary>
    public abstract string Architecture { get; }

    public int VocabSize { get; set; }
    public int HiddenSize { get; set; }
    public int NumHiddenLayers { get; set; }
    public int NumAttentionHeads { get; set; }
    public int NumKeyValueHeads { get; set; }
    public int HeadDim { get; set; }
    public int IntermediateSize { get; set; }
    public int MaxPositionEmbeddings { get; set; }
    public bool TieWordEmbeddings { get; set; }

    /// <summary>Std of the normal initialisation (transformers initializer_range / init_std).</summary>
    public double InitializerRange { get; set; } = 0.02;
    public int? BosTokenId { get; set; }
    public int? PadTokenId { get; set; }
    public int[] EosTokenIds { get; set; } = [];

    /// <summary>The dtype the checkpoint declares ("float32", "bfloat16", ...), from <c>dtype</c> or <c>torch_dtype</c>.</summary>
    public string? DType { get; set; }

    /// <summary>The config.json as read (or as built), for keys no typed property covers.</summary>
    public JsonObject Raw { get; protected set; } = new();

    /// <summary>Serialises to Hugging Face config.json form (transformers 5 layout, readable by 4.x too).</summary>
    public abstract JsonObject ToJson();

    /// <summary>Reads the shared keys; <paramref name="path"/> is used in error messages.</summary>
    protected void ReadCommon(JsonObject json, string path)
    {
        Raw = json;
        VocabSize = ConfigJson.Int(json, path, "vocab_size", VocabSize);
        BosTokenId = ConfigJson.OptionalInt(json, path, "bos_token_id") ?? BosTokenId;
        PadTokenId = ConfigJson.OptionalInt(json, path, "pad_token_id") ?? PadTokenId;
        EosTokenIds = ConfigJson.IntOrIntList(json, path, "eos_token_id") ?? EosTokenIds;
        DType = ConfigJson.OptionalString(json, path, "dtype") ?? ConfigJson.OptionalString(json, path, "torch_dtype");
        TieWordEmbeddings = ConfigJson.Bool(json, path, "tie_word_embeddings", TieWordEmbeddings);
    }

    /// <summary>Writes the shared keys (on top of the raw JSON so unknown keys survive).</summary>
    protected JsonObject WriteCommon()
    {
        var json = (JsonObject)Raw.DeepClone();
        json["architectures"] = new JsonArray(Architecture);
        json["model_type"] = ModelType;
        json["vocab_size"] = VocabSize;
        json["bos_token_id"] = BosTokenId;
        json["pad_token_id"] = PadTokenId;
        json["eos_token_id"] = EosTokenIds.Length switch
        {
            0 => null, // transformers writes null, not [], when a model has no eos token
            1 => JsonValue.Create(EosTokenIds[0]),
            _ => new JsonArray(EosTokenIds.Select(e => (JsonNode?)e).ToArray()),
        };
        json["tie_word_embeddings"] = TieWordEmbeddings;
        json["dtype"] = DType ?? "float32";
        json.Remove("torch_dtype");
        return json;
    }
}

/// <summary>Typed reads from config.json with one-line errors that name the file and key.</summary>
public static class ConfigJson
{
    public static int Int(JsonObject o, string path, string key, int fallback) => OptionalInt(o, path, key) ?? fallback;

    public static int? OptionalInt(JsonObject o, string path, string key)
    {
        if (!o.TryGetPropertyValue(key, out var n) || n is null) return null;
        try { return n.GetValue<int>(); }
        catch (Exception) { throw new InvalidDataException($"{path}: '{key}' must be an integer, got {n.ToJsonString()}"); }
    }

    public static double Double(JsonObject o, string path, string key, double fallback) => OptionalDouble(o, path, key) ?? fallback;

    public static double? OptionalDouble(JsonObject o, string path, string key)
    {
        if (!o.TryGetPropertyValue(key, out var n) || n is null) return null;
        // Parsed JSON converts any number; a JsonObject built in code holds the CLR type it was given (e.g. int).
        if (n is JsonValue v)
        {
            if (v.TryGetValue<double>(out var d)) return d;
            if (v.TryGetValue<long>(out var l)) return l;
            if (v.TryGetValue<int>(out var i)) return i;
            if (v.TryGetValue<float>(out var f)) return f;
        }
        throw new InvalidDataException($"{path}: '{key}' must be a number, got {n.ToJsonString()}");
    }

    public static bool Bool(JsonObject o, string path, string key, bool fallback)
    {
        if (!o.TryGetPropertyValue(key, out var n) || n is null) return fallback;
        try { return n.GetValue<bool>(); }
        catch (Exception) { throw new InvalidDataException($"{path}: '{key}' must be true or false, got {n.ToJsonString()}"); }
    }

    public static string? OptionalString(JsonObject o, string path, string key)
    {
        if (!o.TryGetPropertyValue(key, out var n) || n is null) return null;
        try { return n.GetValue<string>(); }
        catch (Exception) { throw new InvalidDataException($"{path}: '{key}' must be a string, got {n.ToJsonString()}"); }
    }

    public static int[]? IntOrIntList(JsonObject o, string path, string key)
    {
        if (!o.TryGetPropertyValue(key, out var n) || n is null) return null;
        try
        {
            return n is JsonArray a ? a.Select(x => x!.GetValue<int>()).ToArray() : [n.GetValue<int>()];
        }
        catch (Exception) { throw new InvalidDataException($"{path}: '{key}' must be an integer or a list of integers, got {n.ToJsonString()}"); }
    }

    /// <summary>Fails with a one-line message when a required key is absent.</summary>
    public static int RequiredInt(JsonObject o, string path, string key) =>
        OptionalInt(o, path, key) ?? throw new InvalidDataException($"{path}: required key '{key}' is missing");
}

using System.Text.Json;
using System.Text.Json.Nodes;
using AdapterFlow.Models;

namespace AdapterFlow.Adapters;

/// <summary>
/// What every adapter_config.json has (PEFT's PeftConfig). The whole file is kept in <see cref="Raw"/>, so keys
/// this library does not model (PEFT grows new ones every release) survive a load → save round trip.
/// </summary>
public abstract class PeftConfig
{
    /// <summary>PEFT's peft_type: LORA, IA3, PROMPT_TUNING, PREFIX_TUNING, ...</summary>
    public abstract string PeftType { get; }

    public string TaskType { get; set; } = "CAUSAL_LM";
    public string? BaseModelNameOrPath { get; set; }
    public string? Revision { get; set; }

    /// <summary>True for an adapter loaded for inference only (nothing trainable).</summary>
    public bool InferenceMode { get; set; }

    /// <summary>Modules trained fully beside the adapter (PEFT modules_to_save); not supported yet when non-empty.</summary>
    public IReadOnlyList<string>? ModulesToSave { get; set; }

    /// <summary>The JSON this config was read from (empty for a config built in code).</summary>
    public JsonObject Raw { get; protected set; } = new();

    /// <summary>Where this config came from, for error messages.</summary>
    public string Source { get; protected set; } = "adapter config";

    /// <summary>The JSON PEFT would write: the original keys, overwritten by this object's values.</summary>
    public JsonObject ToJson()
    {
        var o = (JsonObject)Raw.DeepClone();
        o["peft_type"] = PeftType;
        o["task_type"] = TaskType;
        o["base_model_name_or_path"] = BaseModelNameOrPath;
        o["revision"] = Revision;
        o["inference_mode"] = InferenceMode;
        o["modules_to_save"] = ModulesToSave is null ? null : new JsonArray(ModulesToSave.Select(m => (JsonNode?)m).ToArray());
        WriteFields(o);
        return o;
    }

    /// <summary>Writes the method's own keys.</summary>
    protected abstract void WriteFields(JsonObject json);

    /// <summary>Reads the shared keys; methods call this from their parser.</summary>
    protected void ReadCommon(JsonObject json, string path)
    {
        Raw = (JsonObject)json.DeepClone();
        Source = path;
        TaskType = ConfigJson.OptionalString(json, path, "task_type") ?? "CAUSAL_LM";
        BaseModelNameOrPath = ConfigJson.OptionalString(json, path, "base_model_name_or_path");
        Revision = ConfigJson.OptionalString(json, path, "revision");
        InferenceMode = ConfigJson.Bool(json, path, "inference_mode", false);
        ModulesToSave = PeftJson.OptionalStringList(json, path, "modules_to_save");
    }

    /// <summary>Reads adapter_config.json (a file, or a folder holding one) and returns the typed config.</summary>
    public static PeftConfig Load(string fileOrDirectory)
    {
        var path = Directory.Exists(fileOrDirectory) ? Path.Combine(fileOrDirectory, "adapter_config.json") : fileOrDirectory;
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: adapter config not found", path);
        JsonNode? node;
        try { node = JsonNode.Parse(File.ReadAllText(path)); }
        catch (JsonException e) { throw new InvalidDataException($"{path}: not valid JSON ({e.Message})"); }
        if (node is not JsonObject json) throw new InvalidDataException($"{path}: expected a JSON object");
        return Parse(json, path);
    }

    /// <summary>The typed config for an adapter_config.json object, dispatched on peft_type.</summary>
    public static PeftConfig Parse(JsonObject json, string path)
    {
        var type = ConfigJson.OptionalString(json, path, "peft_type")
                   ?? throw new InvalidDataException($"{path}: required key 'peft_type' is missing");
        var task = ConfigJson.OptionalString(json, path, "task_type");
        if (task is not null && task != "CAUSAL_LM")
            throw new InvalidDataException($"{path}: task_type '{task}' is not supported (AdapterFlow adapts causal language models: CAUSAL_LM)");
        return type switch
        {
            "LORA" => Lora.LoraConfig.Read(json, path),
            "IA3" => IA3.IA3Config.Read(json, path),
            "PROMPT_TUNING" => PromptTuning.PromptTuningConfig.Read(json, path),
            "PREFIX_TUNING" => PrefixTuning.PrefixTuningConfig.Read(json, path),
            "P_TUNING" => PTuning.PromptEncoderConfig.Read(json, path),
            "BOTTLENECK" => Bottleneck.BottleneckConfig.Read(json, path),
            _ => throw new InvalidDataException($"{path}: peft_type '{type}' is not supported (supported: LORA, IA3, PROMPT_TUNING, PREFIX_TUNING, P_TUNING, BOTTLENECK)"),
        };
    }

    /// <summary>Writes adapter_config.json into a folder, indented as PEFT writes it.</summary>
    public void Save(string directory)
    {
        Directory.CreateDirectory(directory);
        IO.AtomicFile.WriteAllText(Path.Combine(directory, "adapter_config.json"),
            ToJson().ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
    }
}

/// <summary>adapter_config.json reads that <see cref="ConfigJson"/> lacks, with the same one-line errors.</summary>
public static class PeftJson
{
    public static IReadOnlyList<string>? OptionalStringList(JsonObject o, string path, string key)
    {
        if (!o.TryGetPropertyValue(key, out var n) || n is null) return null;
        try { return ((JsonArray)n).Select(x => x!.GetValue<string>()).ToArray(); }
        catch (Exception) { throw new InvalidDataException($"{path}: '{key}' must be a list of strings, got {n.ToJsonString()}"); }
    }

    /// <summary>PEFT's target_modules style: null, a string (a regex, or "all-linear"), or a list of names.</summary>
    public static ModuleSelector? OptionalSelector(JsonObject o, string path, string key)
    {
        if (!o.TryGetPropertyValue(key, out var n) || n is null) return null;
        if (n is JsonValue v && v.TryGetValue<string>(out var s)) return ModuleSelector.Pattern(s);
        return ModuleSelector.Names(OptionalStringList(o, path, key)!);
    }

    public static JsonNode? SelectorJson(ModuleSelector? selector) => selector switch
    {
        null => null,
        { Regex: { } r } => r,
        { List: { } l } => new JsonArray(l.Select(x => (JsonNode?)x).ToArray()),
        _ => null,
    };

    /// <summary>A {pattern: number} object (rank_pattern, alpha_pattern).</summary>
    public static IReadOnlyDictionary<string, double> NumberMap(JsonObject o, string path, string key)
    {
        var result = new Dictionary<string, double>();
        if (!o.TryGetPropertyValue(key, out var n) || n is null) return result;
        if (n is not JsonObject map) throw new InvalidDataException($"{path}: '{key}' must be an object of pattern: number, got {n.ToJsonString()}");
        foreach (var (k, v) in map)
        {
            try { result[k] = v!.GetValue<double>(); }
            catch (Exception) { throw new InvalidDataException($"{path}: '{key}.{k}' must be a number, got {v?.ToJsonString() ?? "null"}"); }
        }
        return result;
    }

    public static JsonObject NumberMapJson(IReadOnlyDictionary<string, double> map)
    {
        var o = new JsonObject();
        foreach (var (k, v) in map) o[k] = v == Math.Floor(v) && Math.Abs(v) < int.MaxValue ? JsonValue.Create((int)v) : JsonValue.Create(v);
        return o;
    }

    public static JsonArray? IntListJson(IReadOnlyList<int>? list) =>
        list is null ? null : new JsonArray(list.Select(x => (JsonNode?)x).ToArray());

    public static JsonArray? StringListJson(IReadOnlyList<string>? list) =>
        list is null ? null : new JsonArray(list.Select(x => (JsonNode?)x).ToArray());
}

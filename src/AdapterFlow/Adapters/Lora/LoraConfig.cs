using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using AdapterFlow.Models;

namespace AdapterFlow.Adapters.Lora;

/// <summary>How LoRA's A and B start (PEFT's init_lora_weights).</summary>
public enum LoraInit
{
    /// <summary>A Kaiming-uniform, B zero: the adapter starts as a no-op (PEFT's true).</summary>
    Default,
    /// <summary>A ~ N(0, 1/r), B zero.</summary>
    Gaussian,
    /// <summary>A and B both random (Kaiming-uniform): the adapter changes the output from the start (PEFT's false).</summary>
    Random,
    /// <summary>
    /// PiSSA ("pissa"): A and B from the top r singular triplets of W, which the base weight gives up
    /// (W_res = W − s·B·A), so the output starts unchanged. Changes the base weights, as PEFT.
    /// </summary>
    Pissa,
    /// <summary>OLoRA ("olora"): A and B from the QR decomposition of W (B = Q[:, :r], A = R[:r]); W_res = W − s·B·A.</summary>
    Olora,
    /// <summary>
    /// "orthogonal": A and B random (÷10) from the odd and even rows of a random orthogonal r×r matrix, so B·A = 0 at the
    /// start while both get gradients. r must be even.
    /// </summary>
    Orthogonal,
    /// <summary>EVA ("eva"): data-driven A. Only a saved adapter can be loaded (its A and B are in the file).</summary>
    Eva,
    /// <summary>LoRA-GA ("lora_ga"): gradient-driven A and B. Only a saved adapter can be loaded (its A and B are in the file).</summary>
    LoraGa,
}

/// <summary>LoRA's adapter_config.json (PEFT's LoraConfig).</summary>
public sealed class LoraConfig : PeftConfig
{
    public override string PeftType => "LORA";

    public int R { get; set; } = 8;
    public double LoraAlpha { get; set; } = 8;
    public double LoraDropout { get; set; }

    /// <summary>Modules to wrap; null = PEFT's default for the model type.</summary>
    public ModuleSelector? TargetModules { get; set; }
    public ModuleSelector? ExcludeModules { get; set; }
    public IReadOnlyList<int>? LayersToTransform { get; set; }
    public string? LayersPattern { get; set; }

    /// <summary>"none", "all" or "lora_only": which biases train.</summary>
    public string Bias { get; set; } = "none";

    /// <summary>True for GPT-2's Conv1D ([in, out] weights). Informational: the layer type decides.</summary>
    public bool FanInFanOut { get; set; }
    public bool UseRslora { get; set; }
    public bool UseDora { get; set; }
    public LoraInit InitLoraWeights { get; set; } = LoraInit.Default;

    /// <summary>Per-module rank overrides: regex matched against the end of the module path.</summary>
    public IReadOnlyDictionary<string, double> RankPattern { get; set; } = new Dictionary<string, double>();
    public IReadOnlyDictionary<string, double> AlphaPattern { get; set; } = new Dictionary<string, double>();

    /// <summary>The rank for a module path, honouring rank_pattern (PEFT: first pattern p with (.*\.)?p$ matching).</summary>
    public int RankFor(string path) => (int)(FirstPattern(RankPattern, path) ?? R);

    public double AlphaFor(string path) => FirstPattern(AlphaPattern, path) ?? LoraAlpha;

    /// <summary>The factor s in y = W x + s · B A x.</summary>
    public double ScalingFor(string path)
    {
        int r = RankFor(path);
        double alpha = AlphaFor(path);
        return UseRslora ? alpha / Math.Sqrt(r) : alpha / r;
    }

    private static double? FirstPattern(IReadOnlyDictionary<string, double> patterns, string path)
    {
        foreach (var (pattern, value) in patterns)
            if (Regex.IsMatch(path, $@"^(.*\.)?(?:{pattern})$")) return value;
        return null;
    }

    public void Validate()
    {
        if (R <= 0) throw new ArgumentException($"{Source}: 'r' must be positive, got {R}");
        if (LoraDropout is < 0 or >= 1) throw new ArgumentException($"{Source}: 'lora_dropout' must be in [0, 1), got {LoraDropout}");
        if (Bias is not ("none" or "all" or "lora_only"))
            throw new ArgumentException($"{Source}: 'bias' must be none, all or lora_only, got '{Bias}'");
        // PEFT's LoraConfig refuses these combinations when it reads the file, so they are refused here too.
        if (TargetModules?.Regex is not null && LayersToTransform is not null)
            throw new ArgumentException($"{Source}: layers_to_transform cannot be used when target_modules is a string ('{TargetModules.Regex}'); list the module names instead");
        if (TargetModules?.Regex is not null && LayersPattern is not null)
            throw new ArgumentException($"{Source}: layers_pattern cannot be used when target_modules is a string ('{TargetModules.Regex}')");
        if (!string.IsNullOrEmpty(LayersPattern) && LayersToTransform is not { Count: > 0 })
            throw new ArgumentException($"{Source}: layers_pattern '{LayersPattern}' needs layers_to_transform");
        foreach (var (p, v) in RankPattern)
            if (v <= 0 || v != Math.Floor(v)) throw new ArgumentException($"{Source}: rank_pattern '{p}' must be a positive integer, got {v}");
    }

    public static LoraConfig Read(JsonObject json, string path)
    {
        var c = new LoraConfig();
        c.ReadCommon(json, path);
        c.R = ConfigJson.RequiredInt(json, path, "r");
        c.LoraAlpha = ConfigJson.Double(json, path, "lora_alpha", 8);
        c.LoraDropout = ConfigJson.Double(json, path, "lora_dropout", 0);
        c.TargetModules = PeftJson.OptionalSelector(json, path, "target_modules");
        c.ExcludeModules = PeftJson.OptionalSelector(json, path, "exclude_modules");
        c.LayersToTransform = ConfigJson.IntOrIntList(json, path, "layers_to_transform");
        c.LayersPattern = ReadLayersPattern(json, path);
        c.Bias = ConfigJson.OptionalString(json, path, "bias") ?? "none";
        c.FanInFanOut = ConfigJson.Bool(json, path, "fan_in_fan_out", false);
        c.UseRslora = ConfigJson.Bool(json, path, "use_rslora", false);
        c.UseDora = ConfigJson.Bool(json, path, "use_dora", false);
        c.InitLoraWeights = json["init_lora_weights"] switch
        {
            null => LoraInit.Default,
            JsonValue v when v.TryGetValue<bool>(out var b) => b ? LoraInit.Default : LoraInit.Random,
            JsonValue v when v.TryGetValue<string>(out var s) && s == "gaussian" => LoraInit.Gaussian,
            JsonValue v when v.TryGetValue<string>(out var s) && s == "pissa" => LoraInit.Pissa,
            JsonValue v when v.TryGetValue<string>(out var s) && s.Equals("olora", StringComparison.OrdinalIgnoreCase) => LoraInit.Olora,
            JsonValue v when v.TryGetValue<string>(out var s) && s == "orthogonal" => LoraInit.Orthogonal,
            JsonValue v when v.TryGetValue<string>(out var s) && s == "eva" => LoraInit.Eva,
            JsonValue v when v.TryGetValue<string>(out var s) && s == "lora_ga" => LoraInit.LoraGa,
            var other => throw new InvalidDataException(UnsupportedInit(path, other.ToJsonString())),
        };
        c.RankPattern = PeftJson.NumberMap(json, path, "rank_pattern");
        c.AlphaPattern = PeftJson.NumberMap(json, path, "alpha_pattern");
        if (ConfigJson.Bool(json, path, "lora_bias", false))
            throw new InvalidDataException($"{path}: lora_bias true is not supported yet");
        if (json["layer_replication"] is not null)
            throw new InvalidDataException($"{path}: layer_replication is not supported");
        if (json["trainable_token_indices"] is not null)
            throw new InvalidDataException($"{path}: trainable_token_indices is not supported");
        if (json["target_parameters"] is JsonArray { Count: > 0 })
            throw new InvalidDataException($"{path}: target_parameters is not supported");
        return c;
    }

    private static string UnsupportedInit(string path, string value)
    {
        var name = value.Trim('"');
        string why = name switch
        {
            _ when name.StartsWith("pissa_niter_", StringComparison.Ordinal) =>
                "PiSSA with a randomised SVD cannot be recomputed from the base model; use \"pissa\", or convert the adapter to plain LoRA with PEFT (save_pretrained(path_initial_model_for_weight_conversion=...))",
            "loftq" => "LoftQ needs a quantised base model, which AdapterFlow does not have",
            "corda" => "CorDA moves a data-dependent part of W into the adapter, which cannot be recomputed from the base model; convert the adapter to plain LoRA with PEFT (save_pretrained(path_initial_model_for_weight_conversion=...))",
            "mica" => "the MiCA initialisation is not implemented",
            _ => "not a PEFT init_lora_weights value",
        };
        return $"{path}: init_lora_weights {value} is not supported ({why}); supported: true, false, \"gaussian\", \"pissa\", \"olora\", \"orthogonal\" (and saved \"eva\" / \"lora_ga\" adapters)";
    }

    internal static string? ReadLayersPattern(JsonObject json, string path)
    {
        var node = json["layers_pattern"];
        if (node is null) return null;
        if (node is JsonValue v && v.TryGetValue<string>(out var s)) return s;
        // Each entry is a regex, as in PEFT (tried as alternatives).
        if (node is JsonArray a) return a.Count == 0 ? null : string.Join("|", a.Select(x => x!.GetValue<string>()));
        throw new InvalidDataException($"{path}: 'layers_pattern' must be a string or a list of strings");
    }

    protected override void WriteFields(JsonObject o)
    {
        o["r"] = R;
        o["lora_alpha"] = LoraAlpha == Math.Floor(LoraAlpha) ? JsonValue.Create((int)LoraAlpha) : JsonValue.Create(LoraAlpha);
        o["lora_dropout"] = LoraDropout;
        o["target_modules"] = PeftJson.SelectorJson(TargetModules);
        o["exclude_modules"] = PeftJson.SelectorJson(ExcludeModules);
        o["layers_to_transform"] = PeftJson.IntListJson(LayersToTransform);
        if (!o.ContainsKey("layers_pattern") || LayersPattern is null) o["layers_pattern"] = LayersPattern;
        o["bias"] = Bias;
        o["fan_in_fan_out"] = FanInFanOut;
        o["use_rslora"] = UseRslora;
        o["use_dora"] = UseDora;
        o["init_lora_weights"] = InitLoraWeights switch
        {
            LoraInit.Default => JsonValue.Create(true),
            LoraInit.Random => JsonValue.Create(false),
            LoraInit.Pissa => JsonValue.Create("pissa"),
            LoraInit.Olora => JsonValue.Create("olora"),
            LoraInit.Orthogonal => JsonValue.Create("orthogonal"),
            LoraInit.Eva => JsonValue.Create("eva"),
            LoraInit.LoraGa => JsonValue.Create("lora_ga"),
            _ => JsonValue.Create("gaussian"),
        };
        o["rank_pattern"] = PeftJson.NumberMapJson(RankPattern);
        o["alpha_pattern"] = PeftJson.NumberMapJson(AlphaPattern);
        if (!o.ContainsKey("lora_bias")) o["lora_bias"] = false;
    }
}

using System.Text.Json.Nodes;
using AdapterFlow.Models;

namespace AdapterFlow.Adapters.Bottleneck;

/// <summary>
/// LLM-Adapters' bottleneck adapter config (peft_type BOTTLENECK): series (Houlsby-style) adapters placed on the
/// input or output of the named modules, or parallel adapters (He et al.) beside them.
/// </summary>
public sealed class BottleneckConfig : PeftConfig
{
    public override string PeftType => "BOTTLENECK";

    public int BottleneckSize { get; set; } = 256;

    /// <summary>Activation between down and up projection (an ACT2FN name: tanh, relu, gelu, ...).</summary>
    public string NonLinearity { get; set; } = "tanh";
    public double AdapterDropout { get; set; }

    /// <summary>Modules to adapt; null = the family's defaults (see <see cref="BottleneckPlacement"/>).</summary>
    public ModuleSelector? TargetModules { get; set; }

    /// <summary>True: parallel adapters y = W x + s · up(f(down(x))). False: series adapters.</summary>
    public bool UseParallelAdapter { get; set; }
    public bool UseAdapterp { get; set; }

    /// <summary>The factor s; null means "learned" (a trainable scalar starting at 1).</summary>
    public double? Scaling { get; set; } = 1.0;

    /// <summary>"bert": both projections ~ N(0, 0.02); "mam_adapter": down Kaiming-uniform, up zero (a no-op at start).</summary>
    public string InitWeights { get; set; } = "bert";
    public string Bias { get; set; } = "none";

    public static BottleneckConfig Read(JsonObject json, string path)
    {
        var c = new BottleneckConfig();
        c.ReadCommon(json, path);
        c.BottleneckSize = ConfigJson.Int(json, path, "bottleneck_size", 256);
        c.NonLinearity = ConfigJson.OptionalString(json, path, "non_linearity") ?? "tanh";
        c.AdapterDropout = ConfigJson.Double(json, path, "adapter_dropout", 0);
        c.TargetModules = PeftJson.OptionalSelector(json, path, "target_modules");
        c.UseParallelAdapter = ConfigJson.Bool(json, path, "use_parallel_adapter", false);
        c.UseAdapterp = ConfigJson.Bool(json, path, "use_adapterp", false);
        c.Scaling = json["scaling"] switch
        {
            null => 1.0,
            JsonValue v when v.TryGetValue<double>(out var d) => d,
            JsonValue v when v.TryGetValue<string>(out var s) && s == "learned" => null,
            var other => throw new InvalidDataException($"{path}: 'scaling' must be a number or \"learned\", got {other.ToJsonString()}"),
        };
        c.InitWeights = ConfigJson.OptionalString(json, path, "init_weights") ?? "bert";
        c.Bias = ConfigJson.OptionalString(json, path, "bias") ?? "none";
        c.Validate();
        return c;
    }

    public void Validate()
    {
        if (BottleneckSize <= 0) throw new InvalidDataException($"{Source}: 'bottleneck_size' must be positive, got {BottleneckSize}");
        if (!Activations.Supported.Contains(NonLinearity))
            throw new InvalidDataException($"{Source}: non_linearity '{NonLinearity}' is not supported (supported: {string.Join(", ", Activations.Supported)})");
        if (InitWeights is not ("bert" or "mam_adapter"))
            throw new InvalidDataException($"{Source}: init_weights '{InitWeights}' is not supported (bert, mam_adapter)");
        if (Bias != "none") throw new InvalidDataException($"{Source}: bias '{Bias}' is not supported yet (none)");
        if (AdapterDropout is < 0 or >= 1) throw new InvalidDataException($"{Source}: 'adapter_dropout' must be in [0, 1), got {AdapterDropout}");
    }

    protected override void WriteFields(JsonObject o)
    {
        o["bottleneck_size"] = BottleneckSize;
        o["non_linearity"] = NonLinearity;
        o["adapter_dropout"] = AdapterDropout;
        o["target_modules"] = PeftJson.SelectorJson(TargetModules);
        o["use_parallel_adapter"] = UseParallelAdapter;
        o["use_adapterp"] = UseAdapterp;
        o["scaling"] = Scaling is { } s ? JsonValue.Create(s) : JsonValue.Create("learned");
        o["init_weights"] = InitWeights;
        o["bias"] = Bias;
    }
}

/// <summary>Where a bottleneck adapter sits relative to the module it is attached to.</summary>
public enum BottleneckPlacement
{
    /// <summary>On the module's input: x ← x + s · up(f(down(x))), then the module (LLM-Adapters' mh_adapter).</summary>
    Input,
    /// <summary>On the module's output: y ← y + s · up(f(down(y))) (LLM-Adapters' output_adapter).</summary>
    Output,
    /// <summary>Beside the module: y = W x + s · up(f(down(x))) (parallel adapter).</summary>
    Parallel,
}

/// <summary>LLM-Adapters' table of which MLP modules take a series adapter on their input and which on their output.</summary>
public static class BottleneckDefaults
{
    private static readonly Dictionary<string, Dictionary<string, BottleneckPlacement>> Series = new()
    {
        ["llama"] = new() { ["gate_proj"] = BottleneckPlacement.Input, ["up_proj"] = BottleneckPlacement.Input, ["down_proj"] = BottleneckPlacement.Output },
        ["mistral"] = new() { ["gate_proj"] = BottleneckPlacement.Input, ["up_proj"] = BottleneckPlacement.Input, ["down_proj"] = BottleneckPlacement.Output },
        ["qwen2"] = new() { ["gate_proj"] = BottleneckPlacement.Input, ["up_proj"] = BottleneckPlacement.Input, ["down_proj"] = BottleneckPlacement.Output },
        ["opt"] = new() { ["fc1"] = BottleneckPlacement.Input, ["fc2"] = BottleneckPlacement.Output },
        ["gptj"] = new() { ["fc_in"] = BottleneckPlacement.Input, ["fc_out"] = BottleneckPlacement.Output },
        ["bloom"] = new() { ["dense_h_to_4h"] = BottleneckPlacement.Input, ["dense_4h_to_h"] = BottleneckPlacement.Output },
        ["gpt_neox"] = new() { ["dense_h_to_4h"] = BottleneckPlacement.Input, ["dense_4h_to_h"] = BottleneckPlacement.Output },
        ["gpt2"] = new() { ["c_fc"] = BottleneckPlacement.Input, ["mlp.c_proj"] = BottleneckPlacement.Output },
    };

    /// <summary>The default targets: the module after the MLP (an adapter after the feed-forward block).</summary>
    public static string[] DefaultTargets(string modelType) =>
        Series.TryGetValue(modelType, out var t)
            ? t.Where(kv => kv.Value == BottleneckPlacement.Output).Select(kv => kv.Key).ToArray()
            : throw new ArgumentException($"no default bottleneck target modules for model_type '{modelType}'; set target_modules");

    /// <summary>
    /// Where a series adapter goes on <paramref name="path"/>: as LLM-Adapters' table says for MLP modules, and on
    /// the output of any other module (so targeting o_proj puts an adapter after attention).
    /// </summary>
    public static BottleneckPlacement SeriesPlacement(string modelType, string path)
    {
        if (Series.TryGetValue(modelType, out var table))
            foreach (var (name, placement) in table)
                if (path == name || path.EndsWith("." + name, StringComparison.Ordinal)) return placement;
        return BottleneckPlacement.Output;
    }
}

using System.Text.Json.Nodes;
using AdapterFlow.Models;

namespace AdapterFlow.Adapters.IA3;

/// <summary>IA3's adapter_config.json (PEFT's IA3Config).</summary>
public sealed class IA3Config : PeftConfig
{
    public override string PeftType => "IA3";

    /// <summary>Modules to scale; null = PEFT's default for the model type.</summary>
    public ModuleSelector? TargetModules { get; set; }

    /// <summary>Modules whose input (not output) is scaled; must be among the targets. Null = PEFT's default.</summary>
    public ModuleSelector? FeedforwardModules { get; set; }
    public ModuleSelector? ExcludeModules { get; set; }
    public bool FanInFanOut { get; set; }

    /// <summary>True: vectors start at one (a no-op); false: random (PEFT's init_ia3_weights).</summary>
    public bool InitIA3Weights { get; set; } = true;

    public static IA3Config Read(JsonObject json, string path)
    {
        var c = new IA3Config();
        c.ReadCommon(json, path);
        c.TargetModules = PeftJson.OptionalSelector(json, path, "target_modules");
        c.FeedforwardModules = PeftJson.OptionalSelector(json, path, "feedforward_modules");
        c.ExcludeModules = PeftJson.OptionalSelector(json, path, "exclude_modules");
        c.FanInFanOut = ConfigJson.Bool(json, path, "fan_in_fan_out", false);
        c.InitIA3Weights = ConfigJson.Bool(json, path, "init_ia3_weights", true);
        return c;
    }

    public void Validate()
    {
        // PEFT's IA3Config refuses feed-forward names that are not among the target names (both given as lists).
        if (TargetModules?.List is { } targets && FeedforwardModules?.List is { } feedforward && feedforward.FirstOrDefault(f => !targets.Contains(f)) is { } stray)
            throw new ArgumentException($"{Source}: feedforward_modules must be a subset of target_modules, but '{stray}' is not a target");
    }

    protected override void WriteFields(JsonObject o)
    {
        o["target_modules"] = PeftJson.SelectorJson(TargetModules);
        o["feedforward_modules"] = PeftJson.SelectorJson(FeedforwardModules);
        o["exclude_modules"] = PeftJson.SelectorJson(ExcludeModules);
        o["fan_in_fan_out"] = FanInFanOut;
        o["init_ia3_weights"] = InitIA3Weights;
    }
}

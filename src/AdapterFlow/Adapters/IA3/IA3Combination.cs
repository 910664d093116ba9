using TorchSharp;

namespace AdapterFlow.Adapters.IA3;

/// <summary>PEFT's add_weighted_adapter for IA3: a new adapter whose vectors are the weighted sum of existing ones.</summary>
public static class IA3Combination
{
    /// <param name="peft">The model holding the IA3 adapters.</param>
    /// <param name="adapters">Names of the adapters to combine.</param>
    /// <param name="weights">One weight per adapter.</param>
    /// <param name="newName">Name of the new adapter (added, not activated).</param>
    /// <remarks>As PEFT: l = Σ wᵢ·lᵢ over the adapters present in each module (a module some adapter does not scale
    /// gets nothing from it, so weights that do not sum to one shrink the scaling there).</remarks>
    public static void AddWeightedAdapter(this PeftModel peft, IReadOnlyList<string> adapters, IReadOnlyList<double> weights, string newName)
    {
        if (adapters.Count == 0 || adapters.Count != weights.Count)
            throw new ArgumentException($"give one weight per adapter ({adapters.Count} adapters, {weights.Count} weights)");
        var configs = adapters.Select(a => peft.Configs.TryGetValue(a, out var c)
            ? c as IA3Config ?? throw new ArgumentException($"adapter '{a}' is {c.PeftType}, not IA3")
            : throw new ArgumentException($"no adapter named '{a}'")).ToArray();
        var layers = peft.AdapterLayers
            .Where(kv => kv.Value is IA3Linear l && adapters.Any(l.ia3_l.Contains))
            .ToDictionary(kv => kv.Key, kv => (IA3Linear)kv.Value);
        if (layers.Count == 0) throw new ArgumentException($"adapters {string.Join(", ", adapters)} hold no IA3 layer");
        var paths = layers.Keys.Order(StringComparer.Ordinal).ToArray();
        var config = new IA3Config
        {
            TargetModules = ModuleSelector.Names(paths),
            FeedforwardModules = ModuleSelector.Names(paths.Where(p => layers[p].IsFeedforward).ToArray()),
            FanInFanOut = configs[0].FanInFanOut,
            BaseModelNameOrPath = configs[0].BaseModelNameOrPath,
        };
        peft.AddAdapter(newName, config, activate: false);
        using var no = torch.no_grad();
        foreach (var layer in layers.Values)
        {
            var target = layer.Vector(newName);
            target.zero_();
            for (int i = 0; i < adapters.Count; i++)
                if (layer.ia3_l.Contains(adapters[i])) target.add_(layer.Vector(adapters[i]), alpha: weights[i]);
        }
    }
}

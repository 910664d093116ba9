using System.Reflection;
using System.Text.RegularExpressions;
using AdapterFlow.Models;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Adapters;

/// <summary>
/// PEFT's way of naming modules in a config: a regex matched against the whole module path, the special string
/// "all-linear", or a list of names each matching a path exactly or as its last dotted components.
/// </summary>
public sealed record ModuleSelector(string? Regex, IReadOnlyList<string>? List)
{
    public const string AllLinear = "all-linear";

    public static ModuleSelector Pattern(string regex) => new(regex, null);
    public static ModuleSelector Names(params string[] names) => new(null, names);
    public static ModuleSelector Names(IReadOnlyList<string> names) => new(null, names);

    public bool IsAllLinear => Regex is not null && string.Equals(Regex, AllLinear, StringComparison.OrdinalIgnoreCase);

    /// <summary>PEFT's check_target_module_exists: full regex match, exact name, or a ".name" suffix.</summary>
    public bool Matches(string modulePath)
    {
        if (Regex is not null)
            return System.Text.RegularExpressions.Regex.IsMatch(modulePath, $"^(?:{Regex})$");
        return List!.Any(t => modulePath == t || modulePath.EndsWith("." + t, StringComparison.Ordinal));
    }

    public override string ToString() => Regex ?? "[" + string.Join(", ", List!) + "]";
}

/// <summary>Finding modules by path and swapping one for a wrapper in place (PEFT's _replace_module).</summary>
public static class ModuleSurgery
{
    // Lazy, as PEFT 0.20: the first numbered segment is the layer (not a nested index such as an expert's).
    private static readonly Regex LayerIndex = new(@"^.*?\.[^.]*\.(\d+)\.", RegexOptions.Compiled);

    /// <summary>Every module of <paramref name="root"/> with its dotted path (the root itself excluded).</summary>
    public static IEnumerable<(string Path, nn.Module Module)> Modules(nn.Module root) =>
        root.named_modules().Where(m => m.name.Length > 0).Select(m => (m.name, m.module));

    /// <summary>The layer number in a path such as model.layers.3.mlp.up_proj (PEFT's default layers pattern).</summary>
    public static int? LayerOf(string path, string? layersPattern = null)
    {
        // An empty pattern means any module list, as PEFT.
        var match = string.IsNullOrEmpty(layersPattern)
            ? LayerIndex.Match(path)
            : Regex.Match(path, $@"^.*?\.(?:{layersPattern})\.(\d+)\.");
        return match.Success ? int.Parse(match.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture) : null;
    }

    /// <summary>True for the layers a linear adapter can wrap: nn.Linear and GPT-2's Conv1D.</summary>
    public static bool IsLinear(nn.Module module) => module is Linear or Conv1D;

    /// <summary>
    /// Replaces the child at <paramref name="path"/> with <paramref name="replacement"/>: the parent's field that
    /// holds it is pointed at the replacement (model code calls children through such fields) and the child is
    /// registered again under the same name, so state-dict paths stay those of the model.
    /// </summary>
    public static void Replace(nn.Module root, string path, nn.Module replacement)
    {
        int dot = path.LastIndexOf('.');
        var parentPath = dot < 0 ? "" : path[..dot];
        var name = path[(dot + 1)..];
        var parent = parentPath.Length == 0 ? root : Find(root, parentPath);
        var old = parent.named_children().FirstOrDefault(c => c.name == name).module
                  ?? throw new ArgumentException($"module '{path}' does not exist");
        bool assigned = false;
        for (var type = parent.GetType(); type is not null && type != typeof(nn.Module); type = type.BaseType)
        {
            foreach (var field in type.GetFields(BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.DeclaredOnly))
            {
                if (!ReferenceEquals(field.GetValue(parent), old)) continue;
                if (!field.FieldType.IsInstanceOfType(replacement))
                    throw new NotSupportedException(
                        $"module '{path}' is held in a field of type {field.FieldType.Name}, which a {replacement.GetType().Name} cannot replace");
                if (field.IsInitOnly)
                    throw new NotSupportedException($"module '{path}' is held in a readonly field and cannot be replaced");
                field.SetValue(parent, replacement);
                assigned = true;
            }
        }
        if (!assigned)
            throw new NotSupportedException($"module '{path}' is not held in a field of {parent.GetType().Name}, so it cannot be replaced in place");
        parent.register_module(name, null!); // unregisters
        parent.register_module(name, replacement);
    }

    /// <summary>The module at a dotted path; ArgumentException naming the path otherwise.</summary>
    public static nn.Module Find(nn.Module root, string path)
    {
        var current = root;
        foreach (var part in path.Split('.'))
        {
            current = current.named_children().FirstOrDefault(c => c.name == part).module
                      ?? throw new ArgumentException($"module '{path}' does not exist (no '{part}')");
        }
        return current;
    }
}

/// <summary>PEFT's default target modules per model_type, the only per-family knowledge the adapters need.</summary>
public static class DefaultTargets
{
    private static readonly Dictionary<string, string[]> Lora = new()
    {
        ["llama"] = ["q_proj", "v_proj"],
        ["mistral"] = ["q_proj", "v_proj"],
        ["qwen2"] = ["q_proj", "v_proj"],
        ["opt"] = ["q_proj", "v_proj"],
        ["gptj"] = ["q_proj", "v_proj"],
        ["gpt2"] = ["c_attn"],
        ["bloom"] = ["query_key_value"],
        ["gpt_neox"] = ["query_key_value"],
    };

    private static readonly Dictionary<string, (string[] Targets, string[] FeedForward)> IA3 = new()
    {
        ["llama"] = (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
        ["mistral"] = (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
        ["qwen2"] = (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
        ["opt"] = (["q_proj", "k_proj", "fc2"], ["fc2"]),
        ["gptj"] = (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
        ["gpt2"] = (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
        ["bloom"] = (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
        ["gpt_neox"] = (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    };

    /// <summary>LoRA's default targets for a model_type (PEFT's table).</summary>
    public static string[] ForLora(string modelType) =>
        Lora.TryGetValue(modelType, out var t) ? t
            : throw new ArgumentException($"no default LoRA target modules for model_type '{modelType}'; set target_modules");

    /// <summary>IA3's default targets and feed-forward modules for a model_type (PEFT's table).</summary>
    public static (string[] Targets, string[] FeedForward) ForIA3(string modelType) =>
        IA3.TryGetValue(modelType, out var t) ? t
            : throw new ArgumentException($"no default IA3 target modules for model_type '{modelType}'; set target_modules and feedforward_modules");
}

/// <summary>The weight and bias of a linear layer in [out, in] layout, whether nn.Linear or GPT-2's Conv1D.</summary>
internal static class LinearParts
{
    public static (long In, long Out) Shape(nn.Module layer) => layer switch
    {
        Linear l => (l.in_features, l.out_features),
        Conv1D c => (c.InFeatures, c.OutFeatures),
        _ => throw new NotSupportedException($"{layer.GetType().Name} is not a linear layer"),
    };

    /// <summary>The stored weight Parameter (Linear: [out, in]; Conv1D: [in, out]).</summary>
    public static Parameter Weight(nn.Module layer) => layer switch
    {
        Linear l => l.weight!,
        Conv1D c => c.weight,
        _ => throw new NotSupportedException($"{layer.GetType().Name} is not a linear layer"),
    };

    public static Tensor? Bias(nn.Module layer) => layer switch
    {
        Linear l => l.bias,
        Conv1D c => c.bias,
        _ => null,
    };

    /// <summary>True when the stored weight is [in, out] (PEFT's fan_in_fan_out).</summary>
    public static bool FanInFanOut(nn.Module layer) => layer is Conv1D;

    /// <summary>The weight as [out, in] (a view for Conv1D).</summary>
    public static Tensor WeightOutIn(nn.Module layer) => FanInFanOut(layer) ? Weight(layer).t() : Weight(layer);
}

/// <summary>A module holding one child module per adapter name (PEFT's nn.ModuleDict keyed by adapter).</summary>
public sealed class AdapterModules : nn.Module
{
    private readonly Dictionary<string, nn.Module> _items = new();

    public AdapterModules() : base(nameof(AdapterModules)) { }

    public bool Contains(string adapter) => _items.ContainsKey(adapter);
    public nn.Module this[string adapter] => _items[adapter];
    public IEnumerable<string> Keys => _items.Keys;
    public int Count => _items.Count;

    public void Add(string adapter, nn.Module module)
    {
        _items.Add(adapter, module);
        register_module(adapter, module);
    }

    public void Remove(string adapter)
    {
        if (!_items.Remove(adapter, out var m)) return;
        register_module(adapter, null!);
        m.Dispose();
    }
}

/// <summary>A module holding one Parameter per adapter name (PEFT's nn.ParameterDict keyed by adapter).</summary>
public sealed class AdapterParameters : nn.Module
{
    private readonly Dictionary<string, Parameter> _items = new();

    public AdapterParameters() : base(nameof(AdapterParameters)) { }

    public bool Contains(string adapter) => _items.ContainsKey(adapter);
    public Parameter this[string adapter] => _items[adapter];
    public IEnumerable<string> Keys => _items.Keys;
    public int Count => _items.Count;

    public void Add(string adapter, Parameter parameter)
    {
        _items.Add(adapter, parameter);
        register_parameter(adapter, parameter);
    }

    public void Remove(string adapter)
    {
        if (!_items.Remove(adapter, out var p)) return;
        _internal_params.Remove(adapter);
        p.Dispose();
    }
}

using System.Reflection;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Models;

/// <summary>
/// Finds and replaces submodules by their Hugging Face paths ("model.layers.0.self_attn.q_proj"), the way PEFT
/// swaps a target layer for a wrapper. Works for modules that follow the family convention: the child is held
/// in a field named as it is registered and typed <c>nn.Module&lt;Tensor, Tensor&gt;</c>, and the forward pass
/// calls it through that field, so replacing field and registration together changes what runs.
/// </summary>
public static class ModuleSurgery
{
    /// <summary>The module at a dotted path below <paramref name="root"/> (e.g. "model.layers.1.mlp.up_proj").</summary>
    public static nn.Module Get(nn.Module root, string path)
    {
        nn.Module current = root;
        foreach (var part in path.Split('.'))
            current = Child(current, part) ?? throw new ArgumentException($"module '{path}' not found (no child '{part}')");
        return current;
    }

    /// <summary>
    /// Replaces the module at <paramref name="path"/> with <paramref name="replacement"/> and returns the old one.
    /// The replacement usually keeps the old module as its own child (PEFT's <c>base_layer</c>).
    /// </summary>
    public static nn.Module<Tensor, Tensor> Replace(nn.Module root, string path, nn.Module<Tensor, Tensor> replacement)
    {
        int dot = path.LastIndexOf('.');
        var parent = dot < 0 ? root : Get(root, path[..dot]);
        var name = path[(dot + 1)..];
        var field = FindField(parent.GetType(), name)
                    ?? throw new ArgumentException($"module '{path}' cannot be replaced in place: {parent.GetType().Name} has no field '{name}' typed nn.Module<Tensor, Tensor>");
        var old = field.GetValue(parent) as nn.Module<Tensor, Tensor>
                  ?? throw new ArgumentException($"module '{path}' is not set");
        // TorchSharp has no "replace": unregister (a null module removes the name), then register the new one.
        parent.register_module(name, null!);
        parent.register_module(name, replacement);
        field.SetValue(parent, replacement);
        return old;
    }

    /// <summary>
    /// The base weight [vocab, hidden] of a token embedding held as <c>nn.Module&lt;Tensor, Tensor&gt;</c>: the Embedding's
    /// own Parameter, or, when an adapter wrapper replaced it, that of the Embedding it wraps (child <c>base_layer</c> or
    /// <c>original_module</c>). Tied output heads read this, so they keep using the base matrix as in PEFT.
    /// </summary>
    public static TorchSharp.Modules.Parameter EmbeddingWeight(nn.Module module)
    {
        for (var current = module; ;)
        {
            if (current is TorchSharp.Modules.Embedding embedding) return embedding.weight!;
            current = Child(current, "base_layer") ?? Child(current, "original_module")
                      ?? throw new InvalidOperationException($"{module.GetType().Name} is not an embedding (nor wraps one)");
        }
    }

    private static nn.Module? Child(nn.Module parent, string name)
    {
        foreach (var (childName, child) in parent.named_children())
            if (childName == name) return child;
        return null;
    }

    private static FieldInfo? FindField(Type? type, string name)
    {
        for (; type is not null && type != typeof(object); type = type.BaseType)
        {
            var field = type.GetField(name, BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.DeclaredOnly);
            if (field is not null && field.FieldType == typeof(nn.Module<Tensor, Tensor>) && !field.IsInitOnly) return field;
        }
        return null;
    }
}

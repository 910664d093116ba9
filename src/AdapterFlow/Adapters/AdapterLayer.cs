using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Adapters;

/// <summary>
/// A wrapper that replaced a model module in place and keeps the original as <c>base_layer</c> (PEFT's BaseTunerLayer).
/// It holds one set of adapter tensors per adapter name and applies the active ones.
/// </summary>
public interface IAdapterLayer
{
    /// <summary>The wrapped module, registered as <c>base_layer</c>.</summary>
    nn.Module<Tensor, Tensor> BaseLayer { get; }

    /// <summary>Adapter names this layer holds.</summary>
    IEnumerable<string> AdapterNames { get; }

    /// <summary>The adapters applied by forward (empty: the base layer alone).</summary>
    IReadOnlyList<string> ActiveAdapters { get; set; }

    /// <summary>When true, forward runs the base layer only (PEFT's disable_adapter).</summary>
    bool Disabled { get; set; }

    /// <summary>Adapters currently merged into the base weights, in merge order.</summary>
    IReadOnlyList<string> MergedAdapters { get; }

    /// <summary>Folds an adapter into the base weights.</summary>
    void Merge(string adapter);

    /// <summary>Takes the most recently merged adapter back out of the base weights.</summary>
    void UnmergeLast();

    /// <summary>The adapter's trainable parameters in this layer.</summary>
    IEnumerable<Parameter> AdapterParameters(string adapter);

    /// <summary>Drops an adapter's tensors.</summary>
    void RemoveAdapter(string adapter);
}

/// <summary>
/// An adapter layer that can serve a mixed batch (PEFT's <c>adapter_names</c>): while <see cref="Routing"/> is set,
/// forward applies each listed adapter to its batch rows only, and leaves other rows to the base layer.
/// </summary>
internal interface IRoutableAdapterLayer : IAdapterLayer
{
    /// <summary>Each adapter with the batch rows (a long tensor of row indices) it serves; null outside a mixed pass.</summary>
    IReadOnlyList<(string Adapter, Tensor Rows)>? Routing { get; set; }
}

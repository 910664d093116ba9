using AdapterFlow.Models;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Adapters.Bottleneck;

/// <summary>
/// A bottleneck adapter attached to a linear layer (LLM-Adapters' bottleneck Linear): down-projection, non-linearity,
/// up-projection, scaled, on the layer's input, its output, or beside it. Computed in float32 as LLM-Adapters does.
/// State-dict names: adapter_down.&lt;adapter&gt;.weight, adapter_up.&lt;adapter&gt;.weight, adapter_scaling.&lt;adapter&gt;.
/// </summary>
public sealed class BottleneckLinear : nn.Module<Tensor, Tensor>, IRoutableAdapterLayer
{
    public nn.Module<Tensor, Tensor> base_layer;
    public AdapterModules adapter_down;
    public AdapterModules adapter_up;
    public AdapterParameters adapter_scaling;

    private readonly Dictionary<string, double> _fixedScaling = new();
    private readonly Dictionary<string, Func<Tensor, Tensor>> _act = new();
    private readonly Dictionary<string, double> _dropout = new();
    private IReadOnlyList<string> _active = [];

    public BottleneckLinear(nn.Module<Tensor, Tensor> baseLayer, BottleneckPlacement placement) : base(nameof(BottleneckLinear))
    {
        if (!ModuleSurgery.IsLinear(baseLayer))
            throw new NotSupportedException($"bottleneck adapters attach to Linear and Conv1D layers, not {baseLayer.GetType().Name}");
        base_layer = baseLayer;
        adapter_down = new AdapterModules();
        adapter_up = new AdapterModules();
        adapter_scaling = new AdapterParameters();
        register_module("base_layer", base_layer);
        register_module("adapter_down", adapter_down);
        register_module("adapter_up", adapter_up);
        register_module("adapter_scaling", adapter_scaling);
        Placement = placement;
        (InFeatures, OutFeatures) = LinearParts.Shape(baseLayer);
    }

    public BottleneckPlacement Placement { get; }
    public long InFeatures { get; }
    public long OutFeatures { get; }

    public nn.Module<Tensor, Tensor> BaseLayer => base_layer;
    public IEnumerable<string> AdapterNames => adapter_down.Keys;
    public IReadOnlyList<string> ActiveAdapters { get => _active; set => _active = value.Where(adapter_down.Contains).ToArray(); }
    public bool Disabled { get; set; }
    public IReadOnlyList<string> MergedAdapters => [];

    public Linear Down(string adapter) => (Linear)adapter_down[adapter];
    public Linear Up(string adapter) => (Linear)adapter_up[adapter];

    public void AddAdapter(string adapter, BottleneckConfig config)
    {
        var (inWidth, outWidth) = Placement switch
        {
            BottleneckPlacement.Input => (InFeatures, InFeatures),
            BottleneckPlacement.Output => (OutFeatures, OutFeatures),
            _ => (InFeatures, OutFeatures),
        };
        var device = LinearParts.Weight(base_layer).device;
        // Float32 regardless of the model's dtype: LLM-Adapters computes the adapter in float32.
        var down = nn.Linear(inWidth, config.BottleneckSize, hasBias: false, device: device, dtype: ScalarType.Float32);
        var up = nn.Linear(config.BottleneckSize, outWidth, hasBias: false, device: device, dtype: ScalarType.Float32);
        using (torch.no_grad())
        {
            if (config.InitWeights == "bert")
            {
                nn.init.normal_(down.weight!, 0, 0.02);
                nn.init.normal_(up.weight!, 0, 0.02);
            }
            else
            {
                nn.init.zeros_(up.weight!); // down keeps nn.Linear's Kaiming-uniform (a = √5)
            }
        }
        adapter_down.Add(adapter, down);
        adapter_up.Add(adapter, up);
        if (config.Scaling is { } s) _fixedScaling[adapter] = s;
        else adapter_scaling.Add(adapter, new Parameter(torch.ones(1, ScalarType.Float32, device)));
        _act[adapter] = Activations.Resolve(config.NonLinearity);
        _dropout[adapter] = config.AdapterDropout;
    }

    private Tensor Adapter(string adapter, Tensor x)
    {
        var dtype = x.dtype;
        // The adapter's own dtype: float32 as created, bfloat16 after the whole model is converted (bf16 training).
        var adapterType = Down(adapter).weight!.dtype;
        var h = x.dtype == adapterType ? x : x.to_type(adapterType);
        double p = _dropout[adapter];
        if (p > 0 && training) h = nn.functional.dropout(h, p, true);
        var output = Up(adapter).forward(_act[adapter](Down(adapter).forward(h))).to_type(dtype);
        return _fixedScaling.TryGetValue(adapter, out var s) ? output * s : output * adapter_scaling[adapter].to_type(dtype);
    }

    /// <summary>Per-row adapters for one forward pass (mixed batches): each adapter with the batch rows it serves.</summary>
    public IReadOnlyList<(string Adapter, Tensor Rows)>? Routing { get; set; }

    private Tensor ForwardRouted(Tensor x, IReadOnlyList<(string Adapter, Tensor Rows)> routing)
    {
        var mine = routing.Where(r => adapter_down.Contains(r.Adapter)).ToArray();
        switch (Placement)
        {
            case BottleneckPlacement.Input:
                foreach (var (a, rows) in mine) x = x.index_add(0, rows, Adapter(a, x.index_select(0, rows)), 1);
                return base_layer.forward(x);
            case BottleneckPlacement.Output:
                var y = base_layer.forward(x);
                foreach (var (a, rows) in mine) y = y.index_add(0, rows, Adapter(a, y.index_select(0, rows)), 1);
                return y;
            default:
                var result = base_layer.forward(x);
                foreach (var (a, rows) in mine) result = result.index_add(0, rows, Adapter(a, x.index_select(0, rows)), 1);
                return result;
        }
    }

    public override Tensor forward(Tensor x)
    {
        if (Routing is { } routing) return ForwardRouted(x, routing);
        if (Disabled || _active.Count == 0) return base_layer.forward(x);
        switch (Placement)
        {
            case BottleneckPlacement.Input:
                foreach (var a in _active) x = x + Adapter(a, x);
                return base_layer.forward(x);
            case BottleneckPlacement.Output:
                var y = base_layer.forward(x);
                foreach (var a in _active) y = y + Adapter(a, y);
                return y;
            default:
                var result = base_layer.forward(x);
                foreach (var a in _active) result = result + Adapter(a, x);
                return result;
        }
    }

    public void Merge(string adapter) =>
        throw new NotSupportedException("bottleneck adapters are non-linear and cannot be merged into the weights");

    public void UnmergeLast() { }

    public IEnumerable<Parameter> AdapterParameters(string adapter)
    {
        if (!adapter_down.Contains(adapter)) yield break;
        yield return Down(adapter).weight!;
        yield return Up(adapter).weight!;
        if (adapter_scaling.Contains(adapter)) yield return adapter_scaling[adapter];
    }

    public void RemoveAdapter(string adapter)
    {
        adapter_down.Remove(adapter);
        adapter_up.Remove(adapter);
        adapter_scaling.Remove(adapter);
        _fixedScaling.Remove(adapter);
        _act.Remove(adapter);
        _dropout.Remove(adapter);
        _active = _active.Where(a => a != adapter).ToArray();
    }
}

using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Adapters.IA3;

/// <summary>
/// IA3 around a linear layer: a learned vector scales the layer's input (feed-forward modules, vector [1, in]) or
/// its output, bias included (others, vector [out, 1]). State-dict name: ia3_l.&lt;adapter&gt;, as PEFT.
/// </summary>
public sealed class IA3Linear : nn.Module<Tensor, Tensor>, IRoutableAdapterLayer
{
    public nn.Module<Tensor, Tensor> base_layer;
    public AdapterParameters ia3_l;

    private readonly List<string> _merged = new();
    private IReadOnlyList<string> _active = [];

    public IA3Linear(nn.Module<Tensor, Tensor> baseLayer, bool isFeedforward) : base(nameof(IA3Linear))
    {
        if (!ModuleSurgery.IsLinear(baseLayer))
            throw new NotSupportedException($"IA3 wraps Linear and Conv1D layers, not {baseLayer.GetType().Name}");
        base_layer = baseLayer;
        ia3_l = new AdapterParameters();
        register_module("base_layer", base_layer);
        register_module("ia3_l", ia3_l);
        IsFeedforward = isFeedforward;
        (InFeatures, OutFeatures) = LinearParts.Shape(baseLayer);
    }

    /// <summary>True when the vector scales the input (feedforward_modules), false when it scales the output.</summary>
    public bool IsFeedforward { get; }
    public long InFeatures { get; }
    public long OutFeatures { get; }

    public nn.Module<Tensor, Tensor> BaseLayer => base_layer;
    public IEnumerable<string> AdapterNames => ia3_l.Keys;
    public IReadOnlyList<string> ActiveAdapters { get => _active; set => _active = value.Where(ia3_l.Contains).ToArray(); }
    public bool Disabled { get; set; }
    public IReadOnlyList<string> MergedAdapters => _merged;

    public Parameter Vector(string adapter) => ia3_l[adapter];

    public void AddAdapter(string adapter, bool initOnes)
    {
        var weight = LinearParts.Weight(base_layer);
        long[] shape = IsFeedforward ? [1, InFeatures] : [OutFeatures, 1];
        var v = initOnes
            ? torch.ones(shape, weight.dtype, weight.device)
            : torch.rand(shape, weight.dtype, weight.device); // PEFT leaves init_ia3_weights=false uninitialised; uniform [0, 1) is a defined stand-in
        ia3_l.Add(adapter, new Parameter(v));
    }

    /// <summary>Per-row adapters for one forward pass (mixed batches): each adapter with the batch rows it serves.</summary>
    public IReadOnlyList<(string Adapter, Tensor Rows)>? Routing { get; set; }

    public override Tensor forward(Tensor x)
    {
        if (Routing is { } routing) return ForwardRouted(x, routing);
        if (Disabled || _active.Count == 0) return base_layer.forward(x);
        Tensor? scale = null;
        foreach (var adapter in _active)
        {
            if (_merged.Contains(adapter)) continue;
            var v = ia3_l[adapter].flatten();
            scale = scale is null ? v : scale * v;
        }
        if (scale is null) return base_layer.forward(x);
        return IsFeedforward ? base_layer.forward(x * scale) : base_layer.forward(x) * scale;
    }

    private Tensor ForwardRouted(Tensor x, IReadOnlyList<(string Adapter, Tensor Rows)> routing)
    {
        // One base call: a per-row scale [batch, 1, …, 1, width] holds 1 for base rows and each row's vector otherwise.
        long width = IsFeedforward ? InFeatures : OutFeatures;
        long batch = x.shape[0];
        var scale = torch.ones([batch, width], x.dtype, x.device);
        foreach (var (adapter, rows) in routing)
            if (ia3_l.Contains(adapter))
                scale = scale.index_copy(0, rows, ia3_l[adapter].flatten().to_type(x.dtype).expand(rows.shape[0], width));
        var shape = Enumerable.Repeat(1L, (int)x.dim()).ToArray();
        shape[0] = batch;
        shape[^1] = width;
        scale = scale.view(shape);
        return IsFeedforward ? base_layer.forward(x * scale) : base_layer.forward(x) * scale;
    }

    public void Merge(string adapter)
    {
        if (!ia3_l.Contains(adapter)) throw new ArgumentException($"no adapter '{adapter}' in this layer");
        if (_merged.Contains(adapter)) return;
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        Scale(ia3_l[adapter], invert: false);
        _merged.Add(adapter);
    }

    public void UnmergeLast()
    {
        if (_merged.Count == 0) return;
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        Scale(ia3_l[_merged[^1]], invert: true);
        _merged.RemoveAt(_merged.Count - 1);
    }

    private void Scale(Tensor vector, bool invert)
    {
        var weight = LinearParts.WeightOutIn(base_layer); // view, [out, in]
        // [1, in] scales columns (the input); [out, 1] scales rows and the bias (the output).
        var factor = invert ? 1.0 / (vector + 1e-8) : vector;
        weight.mul_(factor);
        if (!IsFeedforward && LinearParts.Bias(base_layer) is { } bias) bias.mul_(factor.flatten());
    }

    public IEnumerable<Parameter> AdapterParameters(string adapter)
    {
        if (ia3_l.Contains(adapter)) yield return ia3_l[adapter];
    }

    public void RemoveAdapter(string adapter)
    {
        if (_merged.Contains(adapter)) throw new InvalidOperationException($"adapter '{adapter}' is merged; unmerge it before deleting it");
        ia3_l.Remove(adapter);
        _active = _active.Where(a => a != adapter).ToArray();
    }
}

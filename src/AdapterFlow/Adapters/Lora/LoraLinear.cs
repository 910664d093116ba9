using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Adapters.Lora;

/// <summary>
/// LoRA around a linear layer (nn.Linear or GPT-2's Conv1D): y = W x + b + s · B (A dropout(x)), or with DoRA
/// y = (m / ‖W + s·B·A‖) ⊙ ((W + s·B·A) x) + b. State-dict names are PEFT's: base_layer.*, lora_A.&lt;adapter&gt;.weight,
/// lora_B.&lt;adapter&gt;.weight, lora_magnitude_vector.&lt;adapter&gt;.weight.
/// </summary>
public sealed class LoraLinear : nn.Module<Tensor, Tensor>, IRoutableAdapterLayer
{
    // Field names equal the registered names: TorchSharp registers Module-typed fields by field name.
    public nn.Module<Tensor, Tensor> base_layer;
    public AdapterModules lora_A;
    public AdapterModules lora_B;
    public AdapterModules lora_magnitude_vector;

    private readonly Dictionary<string, double> _scaling = new();
    private readonly Dictionary<string, double> _dropout = new();
    private readonly List<string> _merged = new();
    // DoRA merge divides by the norm of the merged weight; unmerge needs the same number back.
    private readonly Dictionary<string, Tensor> _doraMergeNorm = new();
    private IReadOnlyList<string> _active = [];

    public LoraLinear(nn.Module<Tensor, Tensor> baseLayer) : base(nameof(LoraLinear))
    {
        if (!ModuleSurgery.IsLinear(baseLayer))
            throw new NotSupportedException($"LoRA wraps Linear and Conv1D layers, not {baseLayer.GetType().Name}");
        base_layer = baseLayer;
        lora_A = new AdapterModules();
        lora_B = new AdapterModules();
        lora_magnitude_vector = new AdapterModules();
        register_module("base_layer", base_layer);
        register_module("lora_A", lora_A);
        register_module("lora_B", lora_B);
        register_module("lora_magnitude_vector", lora_magnitude_vector);
        (InFeatures, OutFeatures) = LinearParts.Shape(baseLayer);
    }

    public long InFeatures { get; }
    public long OutFeatures { get; }

    public nn.Module<Tensor, Tensor> BaseLayer => base_layer;
    public IEnumerable<string> AdapterNames => lora_A.Keys;
    public IReadOnlyList<string> ActiveAdapters { get => _active; set => _active = value.Where(lora_A.Contains).ToArray(); }
    public bool Disabled { get; set; }
    public IReadOnlyList<string> MergedAdapters => _merged;

    public double Scaling(string adapter) => _scaling[adapter];
    public bool IsDora(string adapter) => lora_magnitude_vector.Contains(adapter);

    public Linear A(string adapter) => (Linear)lora_A[adapter];
    public Linear B(string adapter) => (Linear)lora_B[adapter];

    /// <summary>DoRA's magnitude vector m [out].</summary>
    public Parameter Magnitude(string adapter) => ((DoraMagnitude)lora_magnitude_vector[adapter]).weight;

    /// <summary>Adds adapter tensors of rank <paramref name="r"/>, initialised as asked, on the base layer's device and dtype.</summary>
    public void AddAdapter(string adapter, int r, double scaling, double dropout, LoraInit init, bool useDora)
    {
        if (lora_A.Contains(adapter)) throw new ArgumentException($"adapter '{adapter}' already exists in this layer");
        var weight = LinearParts.Weight(base_layer);
        var a = nn.Linear(InFeatures, r, hasBias: false, device: weight.device, dtype: weight.dtype);
        var b = nn.Linear(r, OutFeatures, hasBias: false, device: weight.device, dtype: weight.dtype);
        using (torch.no_grad())
        {
            // nn.Linear starts Kaiming-uniform (a = √5), which is PEFT's default for A (and for both when init is false).
            if (init == LoraInit.Gaussian) nn.init.normal_(a.weight!, 0, 1.0 / r);
            if (init != LoraInit.Random) nn.init.zeros_(b.weight!);
        }
        lora_A.Add(adapter, a);
        lora_B.Add(adapter, b);
        _scaling[adapter] = scaling;
        _dropout[adapter] = dropout;
        if (useDora)
        {
            using var no = torch.no_grad();
            // m starts as the row norms of W, so DoRA too starts as the identity.
            var m = new DoraMagnitude(RowNorm(LinearParts.WeightOutIn(base_layer), a, b, scaling).detach().clone());
            lora_magnitude_vector.Add(adapter, m);
        }
    }

    private static Tensor RowNorm(Tensor weightOutIn, Linear a, Linear b, double scaling) =>
        (weightOutIn + scaling * b.weight!.matmul(a.weight!)).norm(1, keepdim: false);

    /// <summary>Per-row adapters for one forward pass (mixed batches): each adapter with the batch rows it serves.</summary>
    public IReadOnlyList<(string Adapter, Tensor Rows)>? Routing { get; set; }

    public override Tensor forward(Tensor x)
    {
        if (Routing is { } routing) return ForwardRouted(x, routing);
        if (Disabled || _active.Count == 0) return base_layer.forward(x);
        var result = base_layer.forward(x);
        foreach (var adapter in _active)
        {
            if (_merged.Contains(adapter)) continue;
            // Plain LoRA adds s · B(A x) in one call (add with alpha) instead of a scale and an add.
            result = IsDora(adapter)
                ? result + AdapterDelta(adapter, x, result)
                : result.add(LoraOutput(adapter, x), _scaling[adapter]);
        }
        return result;
    }

    private Tensor ForwardRouted(Tensor x, IReadOnlyList<(string Adapter, Tensor Rows)> routing)
    {
        var result = base_layer.forward(x);
        foreach (var (adapter, rows) in routing)
        {
            if (!lora_A.Contains(adapter)) continue;
            var delta = AdapterDelta(adapter, x.index_select(0, rows), result.index_select(0, rows));
            result = result.index_add(0, rows, delta, 1);
        }
        return result;
    }

    /// <summary>What one adapter adds to the base output <paramref name="baseResult"/> for input x.</summary>
    internal Tensor AdapterDelta(string adapter, Tensor x, Tensor baseResult)
    {
        var a = A(adapter);
        var b = B(adapter);
        double s = _scaling[adapter];
        var dropped = Dropout(adapter, x);
        var lora = b.forward(a.forward(dropped));
        if (!IsDora(adapter)) return lora * s;
        // DoRA: the norm is treated as a constant in the backward pass (DoRA paper §4.3, as PEFT does).
        var weight = LinearParts.WeightOutIn(base_layer);
        var norm = RowNorm(weight, a, b, s).detach();
        var factor = Magnitude(adapter) / norm;
        Tensor plain;
        if (ReferenceEquals(dropped, x))
        {
            plain = baseResult;
            if (LinearParts.Bias(base_layer) is { } bias) plain = plain - bias;
        }
        else
        {
            plain = nn.functional.linear(dropped, weight);
        }
        return (factor - 1) * plain + factor * lora * s;
    }

    /// <summary>B(A dropout(x)), unscaled.</summary>
    private Tensor LoraOutput(string adapter, Tensor x) => B(adapter).forward(A(adapter).forward(Dropout(adapter, x)));

    /// <summary>The adapter's dropout on its input (training only).</summary>
    private Tensor Dropout(string adapter, Tensor x)
    {
        double p = _dropout[adapter];
        return p > 0 && training ? nn.functional.dropout(x, p, true) : x;
    }

    /// <summary>The dense update s · B·A in [out, in] layout.</summary>
    public Tensor DeltaWeight(string adapter) => B(adapter).weight!.matmul(A(adapter).weight!) * _scaling[adapter];

    public void Merge(string adapter)
    {
        if (!lora_A.Contains(adapter)) throw new ArgumentException($"no adapter '{adapter}' in this layer");
        if (_merged.Contains(adapter)) return;
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var weight = LinearParts.WeightOutIn(base_layer); // a view into the stored weight
        var delta = DeltaWeight(adapter);
        if (IsDora(adapter))
        {
            var merged = weight + delta;
            var norm = merged.norm(1, keepdim: false);
            var factor = (Magnitude(adapter) / norm).unsqueeze(1);
            weight.copy_(merged * factor);
            _doraMergeNorm[adapter] = factor.detach().clone().MoveToOuterDisposeScope();
        }
        else
        {
            weight.add_(delta);
        }
        _merged.Add(adapter);
    }

    public void UnmergeLast()
    {
        if (_merged.Count == 0) return;
        var adapter = _merged[^1];
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var weight = LinearParts.WeightOutIn(base_layer);
        var delta = DeltaWeight(adapter);
        if (_doraMergeNorm.Remove(adapter, out var factor))
        {
            weight.copy_(weight / factor - delta);
            factor.Dispose();
        }
        else
        {
            weight.sub_(delta);
        }
        _merged.RemoveAt(_merged.Count - 1);
    }

    public IEnumerable<Parameter> AdapterParameters(string adapter)
    {
        if (!lora_A.Contains(adapter)) yield break;
        yield return A(adapter).weight!;
        yield return B(adapter).weight!;
        if (IsDora(adapter)) yield return Magnitude(adapter);
    }

    public void RemoveAdapter(string adapter)
    {
        if (_merged.Contains(adapter)) throw new InvalidOperationException($"adapter '{adapter}' is merged; unmerge it before deleting it");
        lora_A.Remove(adapter);
        lora_B.Remove(adapter);
        lora_magnitude_vector.Remove(adapter);
        _scaling.Remove(adapter);
        _dropout.Remove(adapter);
        _active = _active.Where(a => a != adapter).ToArray();
    }
}

/// <summary>DoRA's magnitude vector, a module with one Parameter "weight" as PEFT's DoraLinearLayer.</summary>
public sealed class DoraMagnitude : nn.Module
{
    public Parameter weight;

    public DoraMagnitude(Tensor initial) : base(nameof(DoraMagnitude))
    {
        weight = new Parameter(initial);
        register_parameter("weight", weight);
    }
}

using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Adapters.Lora;

/// <summary>
/// LoRA around a token embedding (PEFT's lora.Embedding): y = E[x] + s · (Aᵀ[x]) Bᵀ with A [r, vocab] and B [hidden, r],
/// so the update of the table is s · (B·A)ᵀ. State-dict names are PEFT's: base_layer.weight,
/// lora_embedding_A.&lt;adapter&gt;, lora_embedding_B.&lt;adapter&gt; (files drop the adapter name). A tied output
/// head keeps reading the base table (see <see cref="Models.ModuleSurgery.EmbeddingWeight"/>) until the adapter is merged.
/// </summary>
public sealed class LoraEmbedding : nn.Module<Tensor, Tensor>, IRoutableAdapterLayer
{
    // Field names equal the registered names: TorchSharp registers Module-typed fields by field name.
    public nn.Module<Tensor, Tensor> base_layer;
    public AdapterParameters lora_embedding_A;
    public AdapterParameters lora_embedding_B;
    public AdapterModules lora_magnitude_vector;

    private readonly Dictionary<string, double> _scaling = new();
    private readonly List<string> _merged = new();
    private readonly Dictionary<string, Tensor> _mergedNorm = new(); // DoRA: the column norms a merge divided by
    private IReadOnlyList<string> _active = [];

    public LoraEmbedding(nn.Module<Tensor, Tensor> baseLayer) : base(nameof(LoraEmbedding))
    {
        if (baseLayer is not Embedding embedding)
            throw new NotSupportedException($"LoRA embedding layers wrap Embedding modules, not {baseLayer.GetType().Name}");
        base_layer = baseLayer;
        lora_embedding_A = new AdapterParameters();
        lora_embedding_B = new AdapterParameters();
        register_module("base_layer", base_layer);
        register_module("lora_embedding_A", lora_embedding_A);
        register_module("lora_embedding_B", lora_embedding_B);
        lora_magnitude_vector = new AdapterModules();
        register_module("lora_magnitude_vector", lora_magnitude_vector);
        NumEmbeddings = embedding.weight!.shape[0];
        EmbeddingDim = embedding.weight!.shape[1];
    }

    public long NumEmbeddings { get; }
    public long EmbeddingDim { get; }

    private Parameter Weight => ((Embedding)base_layer).weight!;

    public nn.Module<Tensor, Tensor> BaseLayer => base_layer;
    public IEnumerable<string> AdapterNames => lora_embedding_A.Keys;
    public IReadOnlyList<string> ActiveAdapters { get => _active; set => _active = value.Where(lora_embedding_A.Contains).ToArray(); }
    public bool Disabled { get; set; }
    public IReadOnlyList<string> MergedAdapters => _merged;

    public double Scaling(string adapter) => _scaling[adapter];

    /// <summary>A [r, vocab].</summary>
    public Parameter A(string adapter) => lora_embedding_A[adapter];

    /// <summary>B [hidden, r].</summary>
    public Parameter B(string adapter) => lora_embedding_B[adapter];

    public bool IsDora(string adapter) => lora_magnitude_vector.Contains(adapter);

    /// <summary>DoRA's magnitude vector m [hidden] (one entry per column of the table, as PEFT's DoraEmbeddingLayer).</summary>
    public Parameter Magnitude(string adapter) => ((DoraMagnitude)lora_magnitude_vector[adapter]).weight;

    /// <summary>
    /// Adds adapter tensors of rank <paramref name="r"/>. As PEFT, the default init is A = 0, B ~ N(0, 1) (the
    /// identity at start); <see cref="LoraInit.Random"/> draws both (A ~ N(0, 1), B ~ N(0, 1)).
    /// </summary>
    /// <param name="adapter">The adapter's name.</param>
    /// <param name="r">Its rank.</param>
    /// <param name="scaling">s (lora_alpha / r, or / √r for rsLoRA).</param>
    /// <param name="init">How A and B start.</param>
    /// <param name="useDora">DoRA (PEFT's use_dora on an embedding): the table's columns W + s·(B·A)ᵀ are renormalised to
    /// a learned magnitude m [hidden], which starts as their norms (so the output starts as LoRA's).</param>
    public void AddAdapter(string adapter, int r, double scaling, LoraInit init, bool useDora = false)
    {
        if (lora_embedding_A.Contains(adapter)) throw new ArgumentException($"adapter '{adapter}' already exists in this layer");
        var weight = Weight;
        var a = torch.zeros(r, NumEmbeddings, device: weight.device, dtype: weight.dtype);
        var b = torch.empty(EmbeddingDim, r, device: weight.device, dtype: weight.dtype);
        using (torch.no_grad())
        {
            b.normal_();
            if (init == LoraInit.Random) a.normal_();
        }
        lora_embedding_A.Add(adapter, new Parameter(a));
        lora_embedding_B.Add(adapter, new Parameter(b));
        _scaling[adapter] = scaling;
        if (useDora)
        {
            using var no = torch.no_grad();
            lora_magnitude_vector.Add(adapter, new DoraMagnitude(ColumnNorm(adapter).detach().clone()));
        }
    }

    /// <summary>‖W + s·(B·A)ᵀ‖ over the vocabulary, per hidden column [hidden] (PEFT's weight norm with fan_in_fan_out).</summary>
    private Tensor ColumnNorm(string adapter) => (Weight + DeltaWeight(adapter)).norm(0, keepdim: false);

    /// <summary>
    /// One adapter on top of <paramref name="result"/> (the base lookup of <paramref name="ids"/>): LoRA adds s·(Aᵀ[x])Bᵀ;
    /// DoRA scales both by m / ‖W + s·(B·A)ᵀ‖ (the norm detached from the graph, as PEFT and the DoRA paper).
    /// </summary>
    private Tensor Apply(string adapter, Tensor result, Tensor ids)
    {
        var delta = AdapterDelta(adapter, ids);
        if (!IsDora(adapter)) return result + delta;
        var scale = Magnitude(adapter) / ColumnNorm(adapter).detach();
        return scale * (result + delta);
    }

    /// <summary>Per-row adapters for one forward pass (mixed batches): each adapter with the batch rows it serves.</summary>
    public IReadOnlyList<(string Adapter, Tensor Rows)>? Routing { get; set; }

    public override Tensor forward(Tensor x)
    {
        var result = base_layer.forward(x);
        if (Routing is { } routing)
        {
            foreach (var (adapter, rows) in routing)
                if (lora_embedding_A.Contains(adapter))
                    result = IsDora(adapter)
                        ? result.index_copy(0, rows, Apply(adapter, result.index_select(0, rows), x.index_select(0, rows)))
                        : result.index_add(0, rows, AdapterDelta(adapter, x.index_select(0, rows)), 1);
            return result;
        }
        if (Disabled) return result;
        foreach (var adapter in _active)
            if (!_merged.Contains(adapter)) result = Apply(adapter, result, x);
        return result;
    }

    /// <summary>s · (Aᵀ[x]) Bᵀ: rows of Aᵀ looked up by token id, then projected by B.</summary>
    internal Tensor AdapterDelta(string adapter, Tensor ids)
    {
        var a = A(adapter);
        // TorchSharp 0.107 has no functional embedding: a row gather of Aᵀ is the same lookup.
        var rows = a.t().index_select(0, ids.flatten()).view([.. ids.shape, a.shape[0]]);
        return rows.matmul(B(adapter).t()) * _scaling[adapter];
    }

    /// <summary>The dense update s · (B·A)ᵀ in the table's [vocab, hidden] layout.</summary>
    public Tensor DeltaWeight(string adapter) => B(adapter).matmul(A(adapter)).t() * _scaling[adapter];

    public void Merge(string adapter)
    {
        if (!lora_embedding_A.Contains(adapter)) throw new ArgumentException($"no adapter '{adapter}' in this layer");
        if (_merged.Contains(adapter)) return;
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        if (IsDora(adapter))
        {
            // W' = (W + s·(B·A)ᵀ) · m / ‖W + s·(B·A)ᵀ‖ per column; the norm is kept to undo it exactly.
            var norm = ColumnNorm(adapter);
            Weight.add_(DeltaWeight(adapter)).mul_(Magnitude(adapter) / norm);
            _mergedNorm[adapter] = norm.MoveToOuterDisposeScope();
        }
        else
        {
            Weight.add_(DeltaWeight(adapter));
        }
        _merged.Add(adapter);
    }

    public void UnmergeLast()
    {
        if (_merged.Count == 0) return;
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var adapter = _merged[^1];
        if (_mergedNorm.Remove(adapter, out var norm))
        {
            Weight.div_(Magnitude(adapter) / norm);
            norm.Dispose();
        }
        Weight.sub_(DeltaWeight(adapter));
        _merged.RemoveAt(_merged.Count - 1);
    }

    public IEnumerable<Parameter> AdapterParameters(string adapter)
    {
        if (!lora_embedding_A.Contains(adapter)) yield break;
        yield return A(adapter);
        yield return B(adapter);
        if (IsDora(adapter)) yield return Magnitude(adapter);
    }

    public void RemoveAdapter(string adapter)
    {
        if (_merged.Contains(adapter)) throw new InvalidOperationException($"adapter '{adapter}' is merged; unmerge it before deleting it");
        lora_embedding_A.Remove(adapter);
        lora_embedding_B.Remove(adapter);
        lora_magnitude_vector.Remove(adapter);
        _scaling.Remove(adapter);
        _active = _active.Where(a => a != adapter).ToArray();
    }
}

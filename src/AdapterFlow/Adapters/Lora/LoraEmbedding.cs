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

    private readonly Dictionary<string, double> _scaling = new();
    private readonly List<string> _merged = new();
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

    /// <summary>
    /// Adds adapter tensors of rank <paramref name="r"/>. As PEFT, the default init is A = 0, B ~ N(0, 1) (the
    /// identity at start); <see cref="LoraInit.Random"/> draws both (A ~ N(0, 1), B ~ N(0, 1)).
    /// </summary>
    public void AddAdapter(string adapter, int r, double scaling, LoraInit init)
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
                    result = result.index_add(0, rows, AdapterDelta(adapter, x.index_select(0, rows)), 1);
            return result;
        }
        if (Disabled) return result;
        foreach (var adapter in _active)
            if (!_merged.Contains(adapter)) result = result + AdapterDelta(adapter, x);
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
        Weight.add_(DeltaWeight(adapter));
        _merged.Add(adapter);
    }

    public void UnmergeLast()
    {
        if (_merged.Count == 0) return;
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        Weight.sub_(DeltaWeight(_merged[^1]));
        _merged.RemoveAt(_merged.Count - 1);
    }

    public IEnumerable<Parameter> AdapterParameters(string adapter)
    {
        if (!lora_embedding_A.Contains(adapter)) yield break;
        yield return A(adapter);
        yield return B(adapter);
    }

    public void RemoveAdapter(string adapter)
    {
        if (_merged.Contains(adapter)) throw new InvalidOperationException($"adapter '{adapter}' is merged; unmerge it before deleting it");
        lora_embedding_A.Remove(adapter);
        lora_embedding_B.Remove(adapter);
        _scaling.Remove(adapter);
        _active = _active.Where(a => a != adapter).ToArray();
    }
}

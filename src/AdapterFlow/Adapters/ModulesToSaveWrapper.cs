using AdapterFlow.Models;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Adapters;

/// <summary>
/// PEFT's ModulesToSaveWrapper: a module trained in full beside the adapter (e.g. lm_head). The original stays frozen as
/// <c>original_module</c>; each adapter gets a trainable copy in <c>modules_to_save.&lt;adapter&gt;</c>, used while that
/// adapter is active. Supports Linear and Conv1D modules (an untied output head, a classifier) and token embeddings
/// (a tied output head keeps reading the frozen original table, as in PEFT, where the copy is a new tensor). A tied
/// output head gets an untied Linear copy of the shared table: training it leaves the input embedding alone.
/// </summary>
public sealed class ModulesToSaveWrapper : nn.Module<Tensor, Tensor>, IRoutableAdapterLayer
{
    public nn.Module<Tensor, Tensor> original_module;
    public AdapterModules modules_to_save;
    private IReadOnlyList<string> _active = [];

    public ModulesToSaveWrapper(nn.Module<Tensor, Tensor> original) : base(nameof(ModulesToSaveWrapper))
    {
        if (original is not (Linear or Conv1D or Embedding or TiedLMHead))
            throw new NotSupportedException($"modules_to_save supports Linear, Conv1D and Embedding modules and tied output heads, not {original.GetType().Name}");
        original_module = original;
        modules_to_save = new AdapterModules();
        register_module("original_module", original_module);
        register_module("modules_to_save", modules_to_save);
    }

    public nn.Module<Tensor, Tensor> BaseLayer => original_module;
    public IEnumerable<string> AdapterNames => modules_to_save.Keys;
    public IReadOnlyList<string> ActiveAdapters { get => _active; set => _active = value.Where(modules_to_save.Contains).ToArray(); }
    public bool Disabled { get; set; }
    public IReadOnlyList<string> MergedAdapters => [];

    /// <summary>The trainable copy of one adapter.</summary>
    public nn.Module<Tensor, Tensor> Copy(string adapter) => (nn.Module<Tensor, Tensor>)modules_to_save[adapter];

    public void AddAdapter(string adapter)
    {
        if (original_module is TiedLMHead tied)
        {
            var shared = tied.weight; // [vocab, hidden]
            var head = nn.Linear(shared.shape[1], shared.shape[0], hasBias: false, device: shared.device, dtype: shared.dtype);
            using (torch.no_grad()) head.weight!.copy_(shared);
            modules_to_save.Add(adapter, head);
            return;
        }
        if (original_module is Embedding embedding)
        {
            var table = embedding.weight!;
            var copyEmbedding = nn.Embedding(table.shape[0], table.shape[1], device: table.device, dtype: table.dtype);
            using (torch.no_grad()) copyEmbedding.weight!.copy_(table);
            modules_to_save.Add(adapter, copyEmbedding);
            return;
        }
        var weight = LinearParts.Weight(original_module);
        var bias = LinearParts.Bias(original_module);
        nn.Module<Tensor, Tensor> copy = original_module switch
        {
            Linear l => nn.Linear(l.in_features, l.out_features, hasBias: bias is not null, device: weight.device, dtype: weight.dtype),
            Conv1D c => new Conv1D(c.InFeatures, c.OutFeatures).to(weight.device).to(weight.dtype),
            _ => throw new NotSupportedException(original_module.GetType().Name),
        };
        using (torch.no_grad())
        {
            LinearParts.Weight((nn.Module)copy).copy_(weight);
            if (bias is not null) LinearParts.Bias((nn.Module)copy)!.copy_(bias);
        }
        modules_to_save.Add(adapter, (nn.Module)copy);
    }

    /// <summary>Per-row adapters for one forward pass (mixed batches): each adapter with the batch rows it serves.</summary>
    public IReadOnlyList<(string Adapter, Tensor Rows)>? Routing { get; set; }

    public override Tensor forward(Tensor x)
    {
        if (Routing is { } routing) return ForwardRouted(x, routing);
        return Disabled || _active.Count == 0 ? original_module.forward(x) : Copy(_active[0]).forward(x);
    }

    /// <summary>
    /// A mixed batch (PEFT's _mixed_batch_forward): rows of an adapter with a copy here run through that copy, all other
    /// rows ("__base__", or an adapter without a copy of this module) through the original. Each module sees only its
    /// own rows, so a big module (an output head) is not run twice on any row.
    /// </summary>
    private Tensor ForwardRouted(Tensor x, IReadOnlyList<(string Adapter, Tensor Rows)> routing)
    {
        var groups = routing.Where(r => modules_to_save.Contains(r.Adapter)).ToArray();
        if (groups.Length == 0) return original_module.forward(x);
        long batch = x.shape[0];
        using var covered = torch.zeros(batch, ScalarType.Bool, x.device);
        foreach (var (_, rows) in groups) covered.index_fill_(0, rows, true);
        using var baseRows = covered.logical_not().nonzero().flatten();
        var parts = new List<(Tensor Rows, Tensor Output)>();
        if (baseRows.shape[0] > 0) parts.Add((baseRows, original_module.forward(x.index_select(0, baseRows))));
        foreach (var (adapter, rows) in groups) parts.Add((rows, Copy(adapter).forward(x.index_select(0, rows))));
        var first = parts[0].Output;
        var shape = first.shape.ToArray();
        shape[0] = batch;
        var result = torch.zeros(shape, first.dtype, first.device);
        // Out-of-place index_copy keeps the graph, so a mixed batch can also be trained through.
        foreach (var (rows, output) in parts) result = result.index_copy(0, rows, output);
        return result;
    }

    public void Merge(string adapter) { }
    public void UnmergeLast() { }

    public IEnumerable<Parameter> AdapterParameters(string adapter) =>
        modules_to_save.Contains(adapter) ? ((nn.Module)Copy(adapter)).parameters() : [];

    public void RemoveAdapter(string adapter)
    {
        modules_to_save.Remove(adapter);
        _active = _active.Where(a => a != adapter).ToArray();
    }
}

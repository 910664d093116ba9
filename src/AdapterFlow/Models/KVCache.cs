using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Models;

/// <summary>
/// Keys and values of past tokens, one pair per decoder layer, each [batch, kv_heads, length, head_dim].
/// Storage is preallocated and grown by doubling, so a decode step writes in place instead of concatenating
/// (which would copy the whole cache every token). Layers may hold different lengths (early exit and
/// self-speculative decoding fill the first layers ahead of the rest).
/// </summary>
public sealed class KVCache : IDisposable
{
    private readonly Tensor?[] _keys;
    private readonly Tensor?[] _values;
    private readonly int[] _lengths;
    private readonly int _initialCapacity;
    private readonly HostStorage?[] _host; // a layer's float32 CPU storage as the kernels see it, until the storage changes

    public KVCache(int numLayers, int initialCapacity = 256)
    {
        _keys = new Tensor?[numLayers];
        _values = new Tensor?[numLayers];
        _lengths = new int[numLayers];
        _host = new HostStorage?[numLayers];
        _initialCapacity = Math.Max(1, initialCapacity);
    }

    public int NumLayers => _lengths.Length;

    /// <summary>Tokens stored for layer 0 (the usual "past length").</summary>
    public int Length => _lengths[0];

    /// <summary>Tokens stored for one layer.</summary>
    public int LayerLength(int layer) => _lengths[layer];

    /// <summary>Appends [batch, kv_heads, time, head_dim] keys/values to a layer; returns everything stored for it.</summary>
    public (Tensor Keys, Tensor Values) Append(int layer, Tensor keys, Tensor values)
    {
        int length = _lengths[layer];
        int added = (int)keys.shape[2];
        EnsureCapacity(layer, keys.shape, values.shape, keys.dtype, keys.device, length + added);
        var k = _keys[layer]!;
        var v = _values[layer]!;
        // Keys that carry gradients (prefix tuning's trainable virtual keys/values) are copied with autograd on,
        // so the loss reaches them through the cache; plain activations are copied without building a graph.
        using (var no = keys.requires_grad || values.requires_grad ? null : torch.no_grad())
        {
            k.narrow(2, length, added).copy_(keys);
            v.narrow(2, length, added).copy_(values);
        }
        _lengths[layer] = length + added;
        return (k.narrow(2, 0, length + added), v.narrow(2, 0, length + added));
    }

    /// <summary>A layer's key and value storage in host memory, float32 [1, kvHeads, Capacity, headDim] each.</summary>
    internal readonly record struct HostStorage(nint Keys, nint Values, long Capacity, int KvHeads, int HeadDim);

    /// <summary>
    /// For kernels that write new keys and values in place (then <see cref="Advance"/>): grows a layer's storage to hold <paramref name="added"/> more tokens and
    /// returns its memory, or null when the storage is not float32 [1, <paramref name="kvHeads"/>, capacity,
    /// <paramref name="headDim"/>] on the CPU. The answer is kept until the storage changes, so a decode step asks
    /// libtorch nothing here (its ~12 metadata calls per layer were a third of a small model's step). The memory stays
    /// valid until the next call that grows, reorders or frees the storage.
    /// </summary>
    internal unsafe HostStorage? ReserveHost(int layer, int kvHeads, int headDim, int added)
    {
        int needed = _lengths[layer] + added;
        if (_host[layer] is { } known && known.KvHeads == kvHeads && known.HeadDim == headDim && known.Capacity >= needed) return known;
        long[] shape = [1, kvHeads, 0, headDim];
        EnsureCapacity(layer, shape, shape, ScalarType.Float32, torch.CPU, needed);
        Tensor k = _keys[layer]!, v = _values[layer]!;
        if (!IsHostStorage(k, kvHeads, headDim) || !IsHostStorage(v, kvHeads, headDim)) return null;
        var storage = new HostStorage((nint)Cpu.CpuKernels.Pointer(k), (nint)Cpu.CpuKernels.Pointer(v), k.shape[2], kvHeads, headDim);
        _host[layer] = storage;
        return storage;
    }

    /// <summary>Whether a layer's storage (if any) is what <see cref="ReserveHost"/> hands to the kernels.</summary>
    internal bool IsHostStorage(int layer, int kvHeads, int headDim) =>
        (_keys[layer] is not { } k || IsHostStorage(k, kvHeads, headDim)) && (_values[layer] is not { } v || IsHostStorage(v, kvHeads, headDim));

    private static bool IsHostStorage(Tensor t, int kvHeads, int headDim) =>
        t.dtype == ScalarType.Float32 && t.device_type == DeviceType.CPU && t.dim() == 4 && t.shape[0] == 1 && t.shape[1] == kvHeads &&
        t.shape[3] == headDim && t.is_contiguous() && t.NumberOfElements <= int.MaxValue / sizeof(float);

    /// <summary>Counts <paramref name="added"/> tokens written in place after <see cref="ReserveHost"/>.</summary>
    internal void Advance(int layer, int added) => _lengths[layer] += added;

    /// <summary>The stored keys/values of a layer (views), or null if empty.</summary>
    public (Tensor Keys, Tensor Values)? Get(int layer) =>
        _keys[layer] is null || _lengths[layer] == 0
            ? null
            : (_keys[layer]!.narrow(2, 0, _lengths[layer]), _values[layer]!.narrow(2, 0, _lengths[layer]));

    /// <summary>Forgets everything past <paramref name="length"/> tokens in every layer (rejected draft tokens).</summary>
    public void Truncate(int length)
    {
        for (int i = 0; i < _lengths.Length; i++) TruncateLayer(i, length);
    }

    /// <summary>Forgets everything past <paramref name="length"/> tokens in one layer.</summary>
    public void TruncateLayer(int layer, int length)
    {
        if (length < 0) throw new ArgumentOutOfRangeException(nameof(length));
        _lengths[layer] = Math.Min(_lengths[layer], length);
    }

    /// <summary>Keeps batch rows in the given order (beam search): <paramref name="rows"/> is int64 [new_batch].</summary>
    public void SelectRows(Tensor rows)
    {
        for (int i = 0; i < _keys.Length; i++)
        {
            if (_keys[i] is null) continue;
            var k = _keys[i]!.index_select(0, rows).DetachFromDisposeScope();
            var v = _values[i]!.index_select(0, rows).DetachFromDisposeScope();
            _keys[i]!.Dispose();
            _values[i]!.Dispose();
            _keys[i] = k;
            _values[i] = v;
            _host[i] = null;
        }
    }

    private void EnsureCapacity(int layer, long[] keyShape, long[] valueShape, ScalarType dtype, Device device, int needed)
    {
        var current = _keys[layer];
        if (current is not null && current.shape[2] >= needed) return;
        long capacity = current is null ? _initialCapacity : current.shape[2];
        while (capacity < needed) capacity *= 2;
        var kShape = new[] { keyShape[0], keyShape[1], capacity, keyShape[3] };
        var vShape = new[] { valueShape[0], valueShape[1], capacity, valueShape[3] };
        // The cache outlives the dispose scope of the forward pass that creates it.
        var k = torch.empty(kShape, dtype, device).DetachFromDisposeScope();
        var v = torch.empty(vShape, dtype, device).DetachFromDisposeScope();
        if (current is not null)
        {
            int length = _lengths[layer];
            using (var no = torch.no_grad())
            {
                k.narrow(2, 0, length).copy_(current.narrow(2, 0, length));
                v.narrow(2, 0, length).copy_(_values[layer]!.narrow(2, 0, length));
            }
            current.Dispose();
            _values[layer]!.Dispose();
        }
        _keys[layer] = k;
        _values[layer] = v;
        _host[layer] = null;
    }

    public void Dispose()
    {
        for (int i = 0; i < _keys.Length; i++)
        {
            _keys[i]?.Dispose();
            _values[i]?.Dispose();
            _keys[i] = null;
            _values[i] = null;
            _host[i] = null;
            _lengths[i] = 0;
        }
    }
}

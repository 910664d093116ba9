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

    public KVCache(int numLayers, int initialCapacity = 256)
    {
        _keys = new Tensor?[numLayers];
        _values = new Tensor?[numLayers];
        _lengths = new int[numLayers];
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

    /// <summary>
    /// The whole storage of a layer ([batch, kv_heads, capacity, head_dim]), grown to hold <paramref name="added"/>
    /// more tokens, for kernels that write the new keys/values in place; <see cref="Advance"/> then counts them.
    /// Storage of another shape or dtype is returned as it is (the caller checks).
    /// </summary>
    internal (Tensor Keys, Tensor Values) Reserve(int layer, long[] shape, ScalarType dtype, Device device, int added)
    {
        EnsureCapacity(layer, shape, shape, dtype, device, _lengths[layer] + added);
        return (_keys[layer]!, _values[layer]!);
    }

    /// <summary>The key storage of a layer (null before its first token), for kernels that check it before writing.</summary>
    internal Tensor? KeyStorage(int layer) => _keys[layer];

    /// <summary>The value storage of a layer (null before its first token).</summary>
    internal Tensor? ValueStorage(int layer) => _values[layer];

    /// <summary>Counts <paramref name="added"/> tokens written in place after <see cref="Reserve"/>.</summary>
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
    }

    public void Dispose()
    {
        for (int i = 0; i < _keys.Length; i++)
        {
            _keys[i]?.Dispose();
            _values[i]?.Dispose();
            _keys[i] = null;
            _values[i] = null;
            _lengths[i] = 0;
        }
    }
}

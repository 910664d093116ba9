using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Models;

/// <summary>Shared per-forward state of rotary families: cos/sin tables [batch, 1, time, rotary_dim] for this forward's positions.</summary>
public sealed class RotaryLayerContext : LayerContext
{
    public RotaryLayerContext(Tensor? mask, bool isCausal, Tensor positionIds, KVCache? cache, int pastLength, Tensor cos, Tensor sin)
        : base(mask, isCausal, positionIds, cache, pastLength)
    {
        Cos = cos;
        Sin = sin;
    }

    public Tensor Cos { get; }
    public Tensor Sin { get; }

    public override LayerContext? SelectRows(Tensor rows) => Cache is null
        ? new RotaryLayerContext(RowsOf(Mask, rows), IsCausal, RowsOf(PositionIds, rows)!, null, PastLength, RowsOf(Cos, rows)!, RowsOf(Sin, rows)!)
        : null;
}

/// <summary>Small pieces the decoder families share: input embedding, head reshapes, cache update, positions.</summary>
public static class DecoderParts
{
    /// <summary>
    /// The embedding lookup of <see cref="ForwardInput.InputIds"/>, or <see cref="ForwardInput.InputsEmbeds"/> as
    /// given; exactly one of them must be set.
    /// </summary>
    public static Tensor Embed(ForwardInput input, Func<Tensor, Tensor> embedTokens)
    {
        if (input.InputIds is not null && input.InputsEmbeds is not null)
            throw new ArgumentException("give either input ids or input embeddings, not both");
        if (input.InputIds is not null)
        {
            if (input.InputIds.dim() != 2)
                throw new ArgumentException($"input ids must be [batch, time], got [{string.Join(", ", input.InputIds.shape)}]");
            return embedTokens(input.InputIds);
        }
        if (input.InputsEmbeds is not null)
        {
            if (input.InputsEmbeds.dim() != 3)
                throw new ArgumentException($"input embeddings must be [batch, time, hidden], got [{string.Join(", ", input.InputsEmbeds.shape)}]");
            return input.InputsEmbeds;
        }
        throw new ArgumentException("a forward pass needs input ids or input embeddings");
    }

    /// <summary>Tokens already in the cache (0 without one).</summary>
    /// <summary>
    /// Shared Prepare of the rotary families without a family-specific mask (GPT-J, GPT-NeoX): embeddings (with
    /// dropout in training), positions, the causal/padding mask and the rotary tables once for all layers.
    /// </summary>
    public static RotaryLayerContext PrepareRotary(ForwardInput input, Func<Tensor, Tensor> embedTokens, RotaryEmbedding rotary,
        double embeddingDropout, bool training, out Tensor hidden)
    {
        var embeds = Embed(input, embedTokens);
        long batch = embeds.shape[0], time = embeds.shape[1];
        int past = input.PastLength;
        var device = embeds.device;
        var positions = Positions(input, batch, time, past, device);
        hidden = Dropout(embeds, embeddingDropout, training);
        var (mask, isCausal) = Attention.BuildMask(input.AttentionMask, batch, time, past, device);
        var (cos, sin) = rotary.Tables(positions, embeds.dtype, past + time);
        return new RotaryLayerContext(mask, isCausal, positions, input.Cache, past, cos, sin);
    }


    /// <summary>Positions as given, else past .. past + time - 1 in every row; validated against [batch, time].</summary>
    public static Tensor Positions(ForwardInput input, long batch, long time, long past, Device device)
    {
        if (input.PositionIds is null) return Attention.DefaultPositions(batch, time, past, device);
        var p = input.PositionIds;
        if (p.dim() != 2 || p.shape[1] != time || (p.shape[0] != batch && p.shape[0] != 1))
            throw new ArgumentException($"position ids have shape [{string.Join(", ", p.shape)}]; expected [{batch}, {time}]");
        return p.to(device).to_type(ScalarType.Int64);
    }

    /// <summary>
    /// Positions from a Hugging Face attention mask as <c>generate()</c> assigns them to left-padded rows:
    /// cumsum(mask) - 1, and 1 at padded slots. <paramref name="mask"/> is [batch, length]; returns int64 [batch, length].
    /// </summary>
    public static Tensor PositionIdsFromMask(Tensor mask)
    {
        var m = mask.to_type(ScalarType.Int64);
        return (m.cumsum(1) - 1).masked_fill(m.eq(0), 1);
    }

    /// <summary>
    /// For families with a learned position table: fails with a clear message when the default positions would run
    /// past it (instead of an out-of-range error from the native embedding lookup). Host-side, no device sync.
    /// </summary>
    public static void CheckPositionTable(ForwardInput input, long past, long time, int tableSize, string key)
    {
        if (input.PositionIds is null && past + time > tableSize)
            throw new ArgumentException($"{past + time} tokens (cache {past} + new {time}) exceed the {tableSize} learned positions ('{key}')");
    }

    /// <summary>[batch, time, heads · headDim] → [batch, heads, time, headDim].</summary>
    public static Tensor SplitHeads(Tensor x, long heads, long headDim) =>
        x.view(x.shape[0], x.shape[1], heads, headDim).transpose(1, 2);

    /// <summary>[batch, heads, time, headDim] → [batch, time, heads · headDim].</summary>
    public static Tensor MergeHeads(Tensor x) =>
        x.transpose(1, 2).reshape(x.shape[0], x.shape[2], x.shape[1] * x.shape[3]);

    /// <summary>
    /// Splits a fused projection laid out per head ([q_h | k_h | v_h] for each head h, as BLOOM and GPT-NeoX store
    /// <c>query_key_value</c>) into queries, keys and values, each [batch, heads, time, headDim].
    /// </summary>
    public static (Tensor Query, Tensor Key, Tensor Value) SplitFusedPerHead(Tensor qkv, long heads, long headDim)
    {
        var parts = qkv.view(qkv.shape[0], qkv.shape[1], heads, 3, headDim).permute(3, 0, 2, 1, 4);
        return (parts[0], parts[1], parts[2]);
    }

    /// <summary>Appends this layer's keys/values to the cache (if any) and returns what attention should read.</summary>
    public static (Tensor Keys, Tensor Values) UpdateCache(LayerContext context, int layer, Tensor keys, Tensor values) =>
        context.Cache is { } cache ? cache.Append(layer, keys, values) : (keys, values);

    /// <summary>Dropout that costs nothing at inference.</summary>
    public static Tensor Dropout(Tensor x, double p, bool training) =>
        training && p > 0 ? nn.functional.dropout(x, p, true) : x;

    /// <summary>Fails with a one-line message when the hidden size does not split into heads.</summary>
    public static int HeadDim(int hidden, int heads, string what)
    {
        if (heads <= 0) throw new InvalidDataException($"{what}: the number of attention heads must be positive, got {heads}");
        if (hidden <= 0 || hidden % heads != 0)
            throw new InvalidDataException($"{what}: hidden size {hidden} is not a positive multiple of the {heads} attention heads");
        return hidden / heads;
    }

    /// <summary>The family's typed config, or an ArgumentException naming both types.</summary>
    public static T ConfigAs<T>(ModelConfig config) where T : ModelConfig =>
        config as T ?? throw new ArgumentException($"expected a {typeof(T).Name}, got {config.GetType().Name} (model_type '{config.ModelType}')");
}

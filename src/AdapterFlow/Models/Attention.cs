using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Models;

/// <summary>Attention helpers shared by every family.</summary>
public static class Attention
{
    /// <summary>
    /// Builds the shared mask for one forward pass. Returns (null, true) when SDPA's causal flag suffices,
    /// (null, false) for a single query with nothing to mask, else a boolean [batch, 1, time, past + time].
    /// Padding queries may attend to themselves: a row with nothing to attend to would make NaNs that then
    /// leak through masked values (0 · NaN = NaN).
    /// </summary>
    public static (Tensor? Mask, bool IsCausal) BuildMask(Tensor? attentionMask, long batch, long time, long past,
        Device device, long? slidingWindow = null)
    {
        long total = past + time;
        bool window = slidingWindow is long w && w < total;
        if (attentionMask is null && !window)
        {
            if (past == 0 && time > 1) return (null, true);
            if (time == 1) return (null, false);
        }
        var queryPos = torch.arange(past, total, dtype: ScalarType.Int64, device: device).unsqueeze(1);
        var keyPos = torch.arange(0, total, dtype: ScalarType.Int64, device: device).unsqueeze(0);
        var allowed = keyPos.le(queryPos);
        if (window) allowed = allowed.logical_and(keyPos.gt(queryPos - slidingWindow!.Value));
        var mask = allowed.unsqueeze(0).unsqueeze(0).expand(batch, 1, time, total);
        if (attentionMask is not null)
        {
            if (attentionMask.shape[0] != batch || attentionMask.shape[1] != total)
                throw new ArgumentException(
                    $"attention mask has shape [{string.Join(", ", attentionMask.shape)}]; expected [{batch}, {total}] (past + new tokens)");
            var keyReal = attentionMask.to(device).to_type(ScalarType.Bool).unsqueeze(1).unsqueeze(1);
            mask = mask.logical_and(keyReal).logical_or(keyPos.eq(queryPos).unsqueeze(0).unsqueeze(0));
        }
        return (mask, false);
    }

    /// <summary>
    /// Scaled dot-product attention over [batch, heads, time, head_dim] queries and [batch, kv_heads, keys, head_dim]
    /// keys/values; kv heads are repeated for grouped-query attention. A float mask is added to the scores, a
    /// boolean one selects keys. <paramref name="dropout"/> is the attention-probability dropout (training only).
    /// </summary>
    public static Tensor Sdpa(Tensor query, Tensor key, Tensor value, Tensor? mask, bool isCausal, double dropout = 0.0)
    {
        long heads = query.shape[1];
        long kvHeads = key.shape[1];
        if (heads != kvHeads && query.shape[2] == 1 && !(isCausal && mask is null))
        {
            // Decode step with grouped KV heads: fold the query heads of each group into the query axis
            // ([b, kv, group, d]) and attend to the cached keys as they are, instead of repeating the whole
            // cache per token. A [b, 1, 1, keys] mask broadcasts over the folded axis.
            long b = query.shape[0], d = query.shape[3];
            var folded = query.reshape(b, kvHeads, heads / kvHeads, d);
            return nn.functional.scaled_dot_product_attention(folded, key, value, mask, 0.0, false).reshape(b, heads, 1, d);
        }
        if (heads != kvHeads)
        {
            key = RepeatKv(key, heads / kvHeads);
            value = RepeatKv(value, heads / kvHeads);
        }
        return nn.functional.scaled_dot_product_attention(query, key, value, mask, dropout, isCausal && mask is null);
    }

    /// <summary>[b, kv, s, d] → [b, kv · n, s, d], each kv head repeated n times in place (as transformers' repeat_kv).</summary>
    public static Tensor RepeatKv(Tensor x, long n)
    {
        if (n == 1) return x;
        long b = x.shape[0], kv = x.shape[1], s = x.shape[2], d = x.shape[3];
        return x.unsqueeze(2).expand(b, kv, n, s, d).reshape(b, kv * n, s, d);
    }

    /// <summary>Default positions past .. past + time - 1 for every row, as transformers assigns them.</summary>
    public static Tensor DefaultPositions(long batch, long time, long past, Device device) =>
        torch.arange(past, past + time, dtype: ScalarType.Int64, device: device).unsqueeze(0).expand(batch, time);
}

using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Training;

/// <summary>Next-token cross-entropy: position t's logits predict label t+1; labels of −100 carry no loss.</summary>
public static class CausalLMLoss
{
    /// <summary>Summed loss over all labelled positions (float32 whatever the logits' dtype).</summary>
    public static Tensor Sum(Tensor logits, Tensor labels) => Compute(logits, labels, nn.Reduction.Sum);

    /// <summary>Mean loss over labelled positions (NaN when there are none, as PyTorch).</summary>
    public static Tensor Mean(Tensor logits, Tensor labels) => Compute(logits, labels, nn.Reduction.Mean);

    private static Tensor Compute(Tensor logits, Tensor labels, nn.Reduction reduction)
    {
        if (logits.dim() != 3 || labels.dim() != 2 || logits.shape[0] != labels.shape[0] || logits.shape[1] != labels.shape[1])
            throw new ArgumentException($"logits [batch, seq, vocab] and labels [batch, seq] disagree: [{string.Join(", ", logits.shape)}] vs [{string.Join(", ", labels.shape)}]");
        using var scope = NewDisposeScope();
        long vocab = logits.shape[2];
        var shiftedLogits = logits[.., ..^1, ..].reshape(-1, vocab).to(ScalarType.Float32);
        var shiftedLabels = labels[.., 1..].reshape(-1).to(ScalarType.Int64);
        var loss = nn.functional.cross_entropy(shiftedLogits, shiftedLabels, ignore_index: Example.IgnoreIndex, reduction: reduction);
        return loss.MoveToOuterDisposeScope();
    }
}

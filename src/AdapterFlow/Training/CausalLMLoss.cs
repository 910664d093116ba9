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

    /// <summary>Logits [batch · (seq − 1), vocab] of the positions that predict a next token, row i scored against <see cref="NextTokenLabels"/>[i].</summary>
    internal static Tensor NextTokenLogits(Tensor logits) => logits[.., ..^1, ..].reshape(-1, logits.shape[2]);

    /// <summary>Labels [batch · (seq − 1)] of the next tokens (<see cref="Example.IgnoreIndex"/> where nothing is scored).</summary>
    internal static Tensor NextTokenLabels(Tensor labels) => labels[.., 1..].reshape(-1);

    private static Tensor Compute(Tensor logits, Tensor labels, nn.Reduction reduction)
    {
        if (logits.dim() != 3 || labels.dim() != 2 || logits.shape[0] != labels.shape[0] || logits.shape[1] != labels.shape[1])
            throw new ArgumentException($"logits [batch, seq, vocab] and labels [batch, seq] disagree: [{string.Join(", ", logits.shape)}] vs [{string.Join(", ", labels.shape)}]");
        using var scope = NewDisposeScope();
        var shiftedLogits = NextTokenLogits(logits).to(ScalarType.Float32);
        var shiftedLabels = NextTokenLabels(labels).to(ScalarType.Int64);
        var loss = nn.functional.cross_entropy(shiftedLogits, shiftedLabels, ignore_index: Example.IgnoreIndex, reduction: reduction);
        return loss.MoveToOuterDisposeScope();
    }
}

using TorchSharp;

namespace AdapterFlow.Generation;

/// <summary>
/// A way of producing tokens from a model: plain autoregressive decoding, beam search, and later early-exit
/// and self-speculative decoding. A strategy drives a <see cref="DecodingSession"/> (which owns the batch,
/// the cache, the logits processors and the stop conditions) until every row is finished.
/// </summary>
public interface IDecodingStrategy
{
    /// <summary>
    /// Runs the session to the end, yielding after each model step the tokens it accepted (possibly several per
    /// row for speculative strategies, none for beam search until the end). Each step must open and close its
    /// own dispose scope and no_grad before yielding: both are per thread and the consumer may resume elsewhere.
    /// </summary>
    IEnumerable<IReadOnlyList<GeneratedToken>> Run(DecodingSession session);
}

/// <summary>
/// One token per row per step: the prompt fills the KV cache, then each step feeds the last token and reads
/// the last position's logits only. Greedy or sampling, depending on the session's token selector.
/// </summary>
public sealed class AutoregressiveDecoding : IDecodingStrategy
{
    public static AutoregressiveDecoding Instance { get; } = new();

    public IEnumerable<IReadOnlyList<GeneratedToken>> Run(DecodingSession session)
    {
        while (!session.AllFinished)
        {
            IReadOnlyList<GeneratedToken> accepted;
            using (var scope = torch.NewDisposeScope())
            using (var noGrad = torch.no_grad())
            {
                var logits = session.GeneratedLength == 0 ? session.PrefillLogits() : session.StepLogits();
                var scores = session.Processors.Process(logits, session.InputIds, session.GeneratedLength);
                accepted = session.Accept(session.Selector.Select(scores));
            }
            yield return accepted;
        }
    }
}

using TorchSharp;

namespace AdapterFlow.Generation;

/// <summary>
/// A way of producing tokens from a model: plain autoregressive decoding, beam search, early-exit and
/// self-speculative decoding. A strategy drives a <see cref="DecodingSession"/> (which owns the batch,
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

    public IEnumerable<IReadOnlyList<GeneratedToken>> Run(DecodingSession session) => Loop(session, exitLayer: null);

    /// <summary>
    /// The one-token-per-step loop through the first <paramref name="exitLayer"/> layers (null = all). Greedy one-row
    /// decoding on the CPU kernels keeps its tokens on the host after the prompt (<see cref="HostGreedySteps"/>).
    /// </summary>
    internal static IEnumerable<IReadOnlyList<GeneratedToken>> Loop(DecodingSession session, int? exitLayer)
    {
        HostGreedySteps? host = null;
        bool hostChecked = false;
        while (!session.AllFinished)
        {
            IReadOnlyList<GeneratedToken> accepted;
            using (var scope = torch.NewDisposeScope())
            using (var noGrad = torch.no_grad())
            {
                if (session.GeneratedLength > 0 && !hostChecked) (host, hostChecked) = (HostGreedySteps.For(session), true);
                accepted = host is not null ? host.Step(session, exitLayer ?? session.Model.NumLayers) : Step(session, exitLayer);
            }
            yield return accepted;
        }
    }

    /// <summary>One step (the prefill when nothing was generated yet): forward, logits processors, token choice, accept.</summary>
    internal static IReadOnlyList<GeneratedToken> Step(DecodingSession session, int? exitLayer)
    {
        var logits = session.GeneratedLength == 0 ? session.PrefillLogits(exitLayer) : session.StepLogits(exitLayer);
        var scores = session.Processors.Process(logits, session.InputIds, session.GeneratedLength);
        return session.Accept(session.Selector.Select(scores));
    }
}

/// <summary>
/// Early exit (LayerSkip's "early-exit inference"): every token, prompt included, runs only the first
/// <see cref="GenerationOptions.ExitLayer"/> layers, then the model's shared final norm and head. Faster in
/// proportion to the layers skipped; the output is the truncated model's, so it is only good for models trained
/// to exit early (layer dropout + early-exit loss). Otherwise like <see cref="AutoregressiveDecoding"/>; only the
/// first E layers of the cache are filled.
/// </summary>
public sealed class EarlyExitDecoding : IDecodingStrategy
{
    public static EarlyExitDecoding Instance { get; } = new();

    public IEnumerable<IReadOnlyList<GeneratedToken>> Run(DecodingSession session)
    {
        int exit = session.Options.ExitLayer ?? throw new ArgumentException("early-exit decoding needs GenerationOptions.ExitLayer");
        return AutoregressiveDecoding.Loop(session, exit);
    }
}

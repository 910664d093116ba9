using AdapterFlow.Models;
using AdapterFlow.Models.Cpu;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Generation;

/// <summary>
/// LayerSkip's self-speculative decoding (Elhoushi et al., 2024): the first E layers of the model draft tokens,
/// the remaining layers check them, so no second model is needed and the draft's work is reused.
/// <para>
/// The prompt runs through the whole model. Then each round, with d = min(K, tokens left − 1) drafts:
/// <list type="number">
/// <item>Draft: the last chosen token, then each new draft, runs through layers 0..E−1 one at a time (their KV cache
/// is kept); the shared norm and head on the exit state give the draft distribution q and the next draft (argmax, or
/// a sample of q). The exit hidden states are saved.</item>
/// <item>Verify: the last draft also runs through layers 0..E−1 (no head), then layers E..L−1 run once over all
/// d + 1 saved exit states, from where their cache stands. That gives the full model's distribution p at each of
/// the d + 1 positions, exactly as autoregressive decoding would have computed it (the early layers' keys are the
/// same ones).</item>
/// <item>Accept: greedy keeps the drafts up to the first one that differs from the verifier's argmax, plus the
/// verifier's token after them. Sampling keeps draft i with probability min(1, p(x)/q(x)) and on the first
/// rejection draws from normalise(max(0, p − q)) instead (after d accepted drafts: from p at the bonus position).
/// p and q are the session's processed scores (repetition penalty, min new tokens, temperature, top-k/p, min-p), each
/// computed with the prefix of its own position, drafts included.</item>
/// <item>The cache (all layers) is cut back to the accepted tokens; the last accepted token is fed next round.</item>
/// </list>
/// </para>
/// <para>
/// Batches: rows stay aligned (one column per token for every row) because each round accepts the same number of
/// tokens a + 1 in every row, a = the smallest number of agreeing drafts over the rows still generating (a row whose
/// accepted tokens include a stop token does not count: it ends there). Row r emits its first a + 1 tokens of what
/// the one-row algorithm would have emitted: drafts 1..a (all accepted in that row), then at position a + 1 its
/// resampled or bonus token if it stopped agreeing there, or its accepted draft a + 1 otherwise. This stays exact:
/// in the one-row algorithm every emitted token, given the tokens before it and that the round reached its
/// position, is distributed as p; a depends only on the other rows' independent draws and on this row's own earlier
/// acceptances, so stopping the round at a + 1 picks a prefix without looking at the tokens after it, and each
/// emitted token keeps its exact distribution. Greedy output is therefore the autoregressive output token for token;
/// sampled output has the autoregressive distribution (tested statistically).
/// </para>
/// <para>
/// Each round reads the chosen tokens and agreement counts to the host once (the only device sync). Speed-up needs
/// a model whose early layers predict well (trained with LayerSkip's layer dropout and early-exit loss); otherwise
/// few drafts are accepted and a round costs more than the tokens it yields. <see cref="GenerationStats.AcceptanceRate"/>
/// reports the fraction of drafts the verifier agreed with.
/// </para>
/// </summary>
public sealed class SelfSpeculativeDecoding : IDecodingStrategy
{
    public static SelfSpeculativeDecoding Instance { get; } = new();

    public IEnumerable<IReadOnlyList<GeneratedToken>> Run(DecodingSession session)
    {
        var options = session.Options;
        int exit = options.ExitLayer ?? throw new ArgumentException("self-speculative decoding needs GenerationOptions.ExitLayer");
        int layers = session.Model.NumLayers;
        if (exit > layers) throw new ArgumentException($"ExitLayer {exit} is beyond the model's {layers} layers");
        if (session.RowsPerPrompt != 1) throw new ArgumentException("self-speculative decoding does not combine with beam search");
        torch.Generator? generator = null;
        if (options.DoSample)
            generator = session.Selector is SamplingSelector sampler
                ? sampler.GeneratorOn(session.Device)
                : throw new NotSupportedException($"self-speculative sampling needs the SamplingSelector, not {session.Selector.GetType().Name}");

        HostGreedyRounds? host = null;
        bool hostChecked = false;
        TensorDraftHead? draftHead = null;
        try
        {
            while (!session.AllFinished)
            {
                int drafts = Math.Min(options.NumSpeculations, session.RemainingTokens - 1);
                IReadOnlyList<GeneratedToken> accepted;
                using (var scope = torch.NewDisposeScope())
                using (var noGrad = torch.no_grad())
                {
                    // The prompt goes through the whole model; a round with no room for a draft is a plain step.
                    if (session.GeneratedLength == 0 || drafts == 0) accepted = AutoregressiveDecoding.Step(session, exitLayer: null);
                    else
                    {
                        // Decided once the prompt has filled the cache (the host rounds check its storage).
                        if (!hostChecked)
                        {
                            (host, hostChecked) = (HostGreedyRounds.For(session, exit), true);
                            if (host is null && options.DraftVocabulary is { } vocabulary && exit < layers) draftHead = TensorDraftHead.For(session, vocabulary);
                            // The tensor rounds' verification passes read the panel copy too where the kernels run them
                            // (one row on the CPU, a LLaMA-family model itself or inside an adapter wrapper).
                            if (host is null && session.BatchSize == 1 && session.Device.type == DeviceType.CPU && HostGreedy.DecodingModel(session) is { } llama)
                                session.VerificationPanels = VerificationPanels(session, llama, exit);
                        }
                        accepted = host is not null ? host.Round(session, exit, drafts) : Round(session, exit, drafts, options.DoSample, generator, draftHead);
                    }
                }
                yield return accepted;
            }
        }
        finally
        {
            session.VerificationPanels = null;
            draftHead?.Dispose();
            host?.Dispose();
        }
    }

    /// <summary>
    /// The panel copy of layers <paramref name="exit"/>..L−1 and the head for this generation's verification passes, made
    /// or checked against the weights now (the weights do not change during a generation); null when the options turn it
    /// off, there is nothing to verify (E = L), or the model gets none.
    /// </summary>
    private static PackedWeights? VerificationPanels(DecodingSession session, LlamaForCausalLM model, int exit) =>
        session.Options.PackVerificationWeights && exit < model.NumLayers ? LlamaCpuDecoder.PackForVerification(model, exit) : null;

    private static IReadOnlyList<GeneratedToken> Round(DecodingSession session, int exit, int drafts, bool sampling, torch.Generator? generator,
        TensorDraftHead? draftHead)
    {
        session.BeginStep();
        int rows = session.BatchSize, layers = session.Model.NumLayers;
        bool draftIsFull = exit == layers;
        var states = new Tensor[drafts + 1];                          // exit hidden states [N, 1, H] of columns 0..drafts
        var draftTokens = new Tensor[drafts];                         // int64 [N]
        var draftProbs = sampling ? new Tensor[drafts] : null;        // q [N, V]
        var draftScores = draftIsFull ? new Tensor[drafts + 1] : null; // with E = L the draft's scores are the verifier's

        // 1. Draft d tokens through the first E layers, one at a time, without leaving the device.
        for (int j = 0; j < drafts; j++)
        {
            using var step = torch.NewDisposeScope();
            // With a draft vocabulary the head runs over its rows only (scores −∞ elsewhere).
            var output = session.ForwardColumns(j, 1, exitLayer: exit, outputHiddenStates: true, lastPositionOnly: true, skipHead: draftHead is not null);
            var raw = draftHead is not null ? draftHead.Scores(output.HiddenStates![^1]) : output.Logits.select(1, 0).to_type(ScalarType.Float32);
            var scores = ProcessOne(session, raw, j);
            Tensor token;
            if (sampling)
            {
                var q = scores.softmax(-1);
                token = torch.multinomial(q, 1, generator: generator).squeeze(-1);
                draftProbs![j] = q.MoveToOuterDisposeScope();
            }
            else token = scores.argmax(-1);
            session.WriteTentative(j, token);
            states[j] = output.HiddenStates![^1].MoveToOuterDisposeScope();
            draftTokens[j] = token.MoveToOuterDisposeScope();
            if (draftScores is not null) draftScores[j] = scores.MoveToOuterDisposeScope();
        }

        // 2. Verify: the last draft through the early layers, then the late layers over all d + 1 positions at once.
        Tensor verifyScores; // processed p, [N, d + 1, V]
        if (draftIsFull)
        {
            var last = session.ForwardColumns(drafts, 1, outputHiddenStates: false, lastPositionOnly: true);
            draftScores![drafts] = ProcessOne(session, last.Logits.select(1, 0).to_type(ScalarType.Float32), drafts);
            verifyScores = torch.stack(draftScores, 1);
        }
        else
        {
            var last = session.ForwardColumns(drafts, 1, exitLayer: exit, outputHiddenStates: true, skipHead: true);
            states[drafts] = last.HiddenStates![^1];
            var logits = session.ForwardColumns(0, drafts + 1, startLayer: exit, layerInput: torch.cat(states, 1)).Logits;
            verifyScores = ProcessBlock(session, logits.to_type(ScalarType.Float32));
        }

        // 3. Accept per row: agreed = drafts the verifier agrees with; chosen[j] = the row's token at position j.
        var draftBlock = torch.stack(draftTokens, 1); // [N, d]
        Tensor agreed, chosen;
        if (!sampling)
        {
            chosen = verifyScores.argmax(-1); // [N, d + 1]
            agreed = chosen.narrow(1, 0, drafts).eq(draftBlock).to_type(ScalarType.Int64).cumprod(1).sum(1);
        }
        else (agreed, chosen) = SampleAcceptance(verifyScores, torch.stack(draftProbs!, 1), draftBlock, generator);
        chosen = torch.where(session.Unfinished.unsqueeze(1), chosen, torch.tensor((long)session.PadTokenId, device: session.Device));

        // The round's one device sync: the chosen tokens and the agreement counts together.
        var host = torch.cat([chosen.flatten(), agreed]).cpu().data<long>().ToArray();
        int stride = drafts + 1, common = drafts;
        long drafted = 0, agreedTotal = 0;
        for (int r = 0; r < rows; r++)
        {
            if (session.IsFinished(r)) continue;
            int rowAgreed = (int)host[rows * stride + r];
            drafted += drafts;
            agreedTotal += rowAgreed;
            // A row that emits a stop token this round ends there and does not hold the others back.
            bool ends = false;
            for (int j = 0; j <= rowAgreed && !ends; j++) ends = session.IsStopToken((int)host[r * stride + j]);
            if (!ends) common = Math.Min(common, rowAgreed);
        }
        session.RecordDrafts(drafted, agreedTotal);
        var events = session.AcceptColumns(chosen, host, stride, common + 1);
        draftHead?.Add(events.Select(e => (long)e.TokenId));
        // Keys of rejected drafts (and of the last accepted token, fed next round) leave every layer's cache.
        session.Cache.Truncate(session.CommittedCacheLength);
        return events;
    }

    /// <summary>
    /// Speculative sampling acceptance (Leviathan et al. 2023; Chen et al. 2023) for every row at once.
    /// Returns the number of leading drafts accepted per row, int64 [N], and the row's tokens [N, d + 1]: the drafts,
    /// with the position after the accepted ones replaced by a draw from normalise(max(0, p − q)) there (p at the
    /// bonus position when all d were accepted).
    /// </summary>
    private static (Tensor Agreed, Tensor Chosen) SampleAcceptance(Tensor verifyScores, Tensor q, Tensor draftBlock, torch.Generator? generator)
    {
        long rows = q.shape[0], drafts = q.shape[1], vocab = q.shape[2];
        var p = verifyScores.softmax(-1); // [N, d + 1, V]
        var index = draftBlock.unsqueeze(-1);
        var pDraft = p.narrow(1, 0, drafts).gather(-1, index).squeeze(-1);
        var qDraft = q.gather(-1, index).squeeze(-1); // > 0: the draft was drawn from q
        var u = torch.rand([rows, drafts], generator: generator, device: q.device);
        // u < p/q, written without a division.
        var accept = (u * qDraft).le(pDraft);
        var agreed = accept.to_type(ScalarType.Int64).cumprod(1).sum(1);
        var at = agreed.view(rows, 1, 1).expand(rows, 1, vocab);
        var pAt = p.gather(1, at).squeeze(1);
        var qAt = q.gather(1, at.clamp_max(drafts - 1)).squeeze(1) * agreed.lt(drafts).unsqueeze(1);
        var residual = (pAt - qAt).clamp_min(0);
        // A rejection implies q > p somewhere, so the residual has mass; guard against rounding to zero.
        residual = torch.where(residual.sum(-1, keepdim: true).gt(0), residual, pAt);
        var drawn = torch.multinomial(residual, 1, generator: generator); // [N, 1]
        var chosen = torch.cat([draftBlock, drawn], 1).scatter(1, agreed.unsqueeze(1), drawn);
        return (agreed, chosen);
    }

    /// <summary>Processed scores of one position: <paramref name="tentative"/> drafts precede it in the prefix.</summary>
    private static Tensor ProcessOne(DecodingSession session, Tensor scores, int tentative) =>
        session.Processors.Process(scores, session.InputIdsWithTentative(tentative), session.GeneratedLength + tentative);

    /// <summary>Processed scores [N, T, V] of T consecutive positions from the last chosen token on.</summary>
    private static Tensor ProcessBlock(DecodingSession session, Tensor scores)
    {
        long rows = scores.shape[0], time = scores.shape[1], vocab = scores.shape[2];
        if (!session.Processors.DependsOnHistory)
            return session.Processors.Process(scores.reshape(rows * time, vocab), session.InputIds, session.GeneratedLength).view(rows, time, vocab);
        // Repetition penalty and min-new-tokens see each position's own prefix (drafts before it included).
        var processed = new Tensor[time];
        for (int t = 0; t < time; t++) processed[t] = ProcessOne(session, scores.select(1, t), t);
        return torch.stack(processed, 1);
    }

    /// <summary>
    /// Greedy rounds for one row on the CPU decode kernels, with the tokens kept on the host: every pass goes straight
    /// to <see cref="LlamaCpuDecoder.HostPass"/> (no tensors in or out) and the drafts' and verifier's argmax are read
    /// from the logits' memory, so a round makes a handful of libtorch calls (reading the last token and writing the
    /// accepted ones) instead of ~15 per draft. Same tokens as <see cref="Round"/>: the same passes over the same cache,
    /// the same argmax (first maximum), the same acceptance. Used only where nothing needs the tensors: greedy, one
    /// row without padding, no logits processors, a LLaMA-family model (itself or inside an adapter wrapper,
    /// <see cref="HostGreedy.DecodingModel"/>) that the kernels can run, and K + 1 within one kernel pass. With a
    /// <see cref="GenerationOptions.DraftVocabulary"/>, a draft's head computes only the logits of that vocabulary's
    /// tokens and of every token in the text so far (added as they appear); the verifier's head stays whole.
    /// </summary>
    private sealed class HostGreedyRounds : IDisposable
    {
        private readonly LlamaForCausalLM _model;
        private readonly float[] _states;  // exit states [K + 1, hidden] of the round's columns
        private readonly float[] _logits;  // [K + 1, vocab]: the drafts', then the verifier's
        private readonly PackedDraftHead? _draftHead;
        private readonly double _confidence;

        private readonly PackedWeights? _panels;
        private readonly HostPlan _plan = new(); // this generation's
        private long _last, _position, _generated = -1; // the last chosen token and its position, as of _generated tokens

        private HostGreedyRounds(LlamaForCausalLM model, int columns, PackedDraftHead? draftHead, double confidence, PackedWeights? panels)
        {
            _panels = panels;
            _confidence = confidence;
            _model = model;
            _states = new float[columns * model.LlamaConfig.HiddenSize];
            _logits = new float[columns * model.LlamaConfig.VocabSize];
            _draftHead = draftHead;
        }

        public static HostGreedyRounds? For(DecodingSession session, int exit)
        {
            int columns = session.Options.NumSpeculations + 1;
            if (HostGreedy.Model(session, columns) is not { } model) return null;
            var panels = VerificationPanels(session, model, exit);
            var draftHead = session.Options.DraftVocabulary is { } vocabulary && model.PlainHead() is (_, var weight)
                ? new PackedDraftHead(DraftTokenSet.For(vocabulary, model.LlamaConfig.VocabSize, session), weight)
                : null;
            return new HostGreedyRounds(model, columns, draftHead, session.Options.DraftConfidenceThreshold, panels);
        }

        public void Dispose() => _draftHead?.Dispose();

        public unsafe IReadOnlyList<GeneratedToken> Round(DecodingSession session, int exit, int drafts)
        {
            session.BeginStep();
            var cache = session.Cache;
            int layers = _model.NumLayers, hidden = _model.LlamaConfig.HiddenSize, vocab = _model.LlamaConfig.VocabSize;
            // Known from the previous round unless something else advanced the session (reading it costs two tensor reads).
            var (last, position) = session.GeneratedLength == _generated ? (_last, _position) : session.LastChosen(0);
            var fed = new long[drafts + 1];    // the round's columns: the last chosen token, then the drafts
            var chosen = new long[drafts + 1]; // the verifier's argmax at each column (the first d + 1 are used)
            fed[0] = last;
            fixed (float* states = _states, logits = _logits)
            {
                // 1. Draft through layers 0..E−1, one token at a time, keeping each exit state; with a confidence threshold,
                // stop early after a draft the draft model itself doubts (its probability below the threshold).
                int made = drafts;
                for (int j = 0; j < drafts; j++)
                {
                    float* draftLogits = logits + (long)j * vocab;
                    int count;
                    // With E = L the drafts' logits are the verifier's, so they stay whole.
                    if (_draftHead is { } draftHead && exit < layers)
                    {
                        LlamaCpuDecoder.HostPass(_model, cache, 0, exit, 1, [fed[j]], null, position + j, states + (long)j * hidden, 1, draftLogits,
                            draftHead.Rows, draftHead.Count, plan: _plan);
                        count = draftHead.Count;
                        fed[j + 1] = draftHead.Tokens[(int)HostGreedy.ArgMax(draftLogits, count)];
                    }
                    else
                    {
                        LlamaCpuDecoder.HostPass(_model, cache, 0, exit, 1, [fed[j]], null, position + j, states + (long)j * hidden, 1, draftLogits, plan: _plan);
                        count = vocab;
                        fed[j + 1] = HostGreedy.ArgMax(draftLogits, count);
                    }
                    if (_confidence > 0 && j + 1 < drafts && HostGreedy.MaxProbability(draftLogits, count) < _confidence)
                    {
                        made = j + 1;
                        break;
                    }
                }
                drafts = made;
                // 2. Verify: the last draft through the early layers (no head), the late layers over all d + 1 exit states.
                if (exit < layers)
                {
                    LlamaCpuDecoder.HostPass(_model, cache, 0, exit, 1, [fed[drafts]], null, position + drafts, states + (long)drafts * hidden, 0, null, plan: _plan);
                    LlamaCpuDecoder.HostPass(_model, cache, exit, layers, drafts + 1, null, states, position, null, drafts + 1, logits, panels: _panels, plan: _plan);
                }
                else LlamaCpuDecoder.HostPass(_model, cache, 0, layers, 1, [fed[drafts]], null, position + drafts, null, 1, logits + (long)drafts * vocab, plan: _plan);
                for (int j = 0; j <= drafts; j++) chosen[j] = HostGreedy.ArgMax(logits + (long)j * vocab, vocab);
            }
            // 3. Accept the drafts up to the first disagreement, plus the verifier's token there (as Round does for one row).
            int agreed = 0;
            while (agreed < drafts && chosen[agreed] == fed[agreed + 1]) agreed++;
            bool ends = false;
            for (int j = 0; j <= agreed && !ends; j++) ends = session.IsStopToken((int)chosen[j]);
            session.RecordDrafts(drafts, agreed);
            for (int j = 0; j <= agreed; j++) _draftHead?.Add(chosen[j]);
            if (chosen.Length > drafts + 1) Array.Resize(ref chosen, drafts + 1);
            using var tokens = torch.tensor(chosen, [1, drafts + 1], ScalarType.Int64, session.Device);
            int taken = ends ? drafts + 1 : agreed + 1;
            var events = session.AcceptColumns(tokens, chosen, drafts + 1, taken);
            (_last, _position, _generated) = (chosen[taken - 1], position + taken, session.GeneratedLength);
            cache.Truncate(session.CommittedCacheLength);
            return events;
        }
    }
}

using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Generation;

/// <summary>
/// Beam search as transformers' BeamSearchScorer does it: each prompt keeps <c>NumBeams</c> running beams
/// scored by their summed log-probabilities (after the logits processors); each step looks at the best
/// 2 × beams continuations, a continuation ending in a stop token becomes a finished hypothesis (if it
/// ranks among the first beams), the others become the next beams. Hypotheses are ranked by
/// sum(log p) / generated_length^LengthPenalty. A prompt is done when it has <c>NumBeams</c> hypotheses and
/// (with EarlyStopping) at once, or (without) when no running beam can beat the worst of them. At
/// MaxNewTokens the running beams are added as hypotheses. Streaming yields each prompt's tokens at the end.
/// </summary>
public sealed class BeamSearchDecoding : IDecodingStrategy
{
    public static BeamSearchDecoding Instance { get; } = new();

    public IEnumerable<IReadOnlyList<GeneratedToken>> Run(DecodingSession session)
    {
        int prompts = session.PromptCount, beams = session.RowsPerPrompt, rows = session.BatchSize;
        var options = session.Options;
        if (options.StopStrings is { Count: > 0 }) throw new ArgumentException("StopStrings are not supported with beam search");
        var beamScores = new double[rows];
        for (int r = 0; r < rows; r++) beamScores[r] = r % beams == 0 ? 0 : -1e9; // first step: expand beam 0 only
        var history = Enumerable.Range(0, rows).Select(_ => new List<int>()).ToArray();
        var hypotheses = Enumerable.Range(0, prompts).Select(_ => new List<(double Score, int[] Tokens, bool Eos)>()).ToArray();
        var done = new bool[prompts];

        while (session.GeneratedLength < options.MaxNewTokens && !done.All(d => d))
        {
            int length = session.GeneratedLength;
            float[] topScores;
            long[] topIndices;
            long vocab;
            using (var scope = torch.NewDisposeScope())
            using (var noGrad = torch.no_grad())
            {
                var logits = length == 0 ? session.PrefillLogits() : session.StepLogits();
                vocab = logits.shape[1];
                var logProbs = logits.log_softmax(-1);
                var scores = session.Processors.Process(logProbs, session.InputIds, length);
                scores = scores + torch.tensor(beamScores.Select(s => (float)s).ToArray(), device: session.Device).unsqueeze(1);
                var (values, indices) = scores.view(prompts, beams * vocab).topk(2 * beams, dim: 1);
                topScores = values.cpu().data<float>().ToArray();
                topIndices = indices.cpu().data<long>().ToArray();
            }

            var nextRows = new long[rows];
            var nextTokens = new long[rows];
            var nextScores = new double[rows];
            for (int p = 0; p < prompts; p++)
            {
                if (done[p])
                {
                    for (int k = 0; k < beams; k++)
                    {
                        nextRows[p * beams + k] = p * beams + k;
                        nextTokens[p * beams + k] = session.PadTokenId;
                    }
                    continue;
                }
                int taken = 0;
                for (int j = 0; j < 2 * beams && taken < beams; j++)
                {
                    long flat = topIndices[p * 2 * beams + j];
                    int row = p * beams + (int)(flat / vocab);
                    int token = (int)(flat % vocab);
                    double score = topScores[p * 2 * beams + j];
                    if (session.IsStopToken(token))
                    {
                        if (j >= beams) continue; // transformers: a stop token outside the top beams is not a hypothesis
                        AddHypothesis(hypotheses[p], beams, score / Math.Pow(length + 1, options.LengthPenalty), [.. history[row], token], true);
                        continue;
                    }
                    nextRows[p * beams + taken] = row;
                    nextTokens[p * beams + taken] = token;
                    nextScores[p * beams + taken] = score;
                    taken++;
                }
                for (; taken < beams; taken++)
                {
                    // Only with several stop ids can the candidates run out; fill with dead beams of this prompt.
                    nextRows[p * beams + taken] = p * beams;
                    nextTokens[p * beams + taken] = session.PadTokenId;
                    nextScores[p * beams + taken] = -1e9;
                }
                double best = topScores[p * 2 * beams];
                done[p] = hypotheses[p].Count >= beams &&
                          (options.EarlyStopping || hypotheses[p].Min(h => h.Score) >= best / Math.Pow(length + 1, options.LengthPenalty));
            }

            history = nextRows.Select((row, i) => new List<int>(history[row]) { (int)nextTokens[i] }).ToArray();
            beamScores = nextScores;
            using (var scope = torch.NewDisposeScope())
            using (var noGrad = torch.no_grad())
            {
                session.ReorderRows(torch.tensor(nextRows, device: session.Device));
                session.AppendColumn(torch.tensor(nextTokens, device: session.Device));
            }
        }

        var events = new List<GeneratedToken>();
        for (int p = 0; p < prompts; p++)
        {
            if (!done[p])
                for (int k = 0; k < beams; k++)
                {
                    int row = p * beams + k;
                    AddHypothesis(hypotheses[p], beams, beamScores[row] / Math.Pow(history[row].Count, options.LengthPenalty), history[row].ToArray(), false);
                }
            var bestHypothesis = hypotheses[p].MaxBy(h => h.Score);
            var reason = bestHypothesis.Eos ? FinishReason.StopToken : FinishReason.Length;
            session.Complete(p, bestHypothesis.Tokens, reason, bestHypothesis.Score);
            var text = session.Tokenizer?.Decode(bestHypothesis.Tokens, options.SkipSpecialTokens);
            for (int i = 0; i < bestHypothesis.Tokens.Length; i++)
            {
                bool last = i == bestHypothesis.Tokens.Length - 1;
                events.Add(new GeneratedToken(p, bestHypothesis.Tokens[i], text is null ? null : last ? text : "", last ? reason : null));
            }
        }
        yield return events;
    }

    private static void AddHypothesis(List<(double Score, int[] Tokens, bool Eos)> list, int beams, double score, int[] tokens, bool eos)
    {
        if (list.Count >= beams && score <= list.Min(h => h.Score)) return;
        list.Add((score, tokens, eos));
        if (list.Count > beams) list.Remove(list.MinBy(h => h.Score));
    }
}

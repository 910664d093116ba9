using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Generation;

/// <summary>
/// Rewrites next-token scores [batch, vocab] before a token is chosen. Processors are small and stateless so
/// that every decoding strategy (autoregressive, beam search, early exit, self-speculative) shares them.
/// They follow the transformers logits processors of the same name exactly, filter value -inf included.
/// </summary>
public interface ILogitsProcessor
{
    /// <param name="scores">Float scores [batch, vocab]; may be modified in place and returned.</param>
    /// <param name="inputIds">int64 [batch, length]: prompt (with its left padding) followed by the tokens generated so far.</param>
    /// <param name="generatedLength">Tokens generated so far (columns of <paramref name="inputIds"/> after the prompt).</param>
    Tensor Process(Tensor scores, Tensor inputIds, int generatedLength);

    /// <summary>
    /// False when the result depends on the scores alone (temperature, top-k/p, min-p): then a strategy may process
    /// the scores of several positions in one call. True (the safe default) when it reads the ids or the length.
    /// </summary>
    bool DependsOnHistory => true;
}

/// <summary>
/// CTRL's repetition penalty as transformers applies it: every token present in <c>inputIds</c> (prompt,
/// padding and output alike) has its score divided by the penalty when positive, multiplied when negative.
/// </summary>
public sealed class RepetitionPenaltyProcessor : ILogitsProcessor
{
    public RepetitionPenaltyProcessor(double penalty)
    {
        if (!(penalty > 0)) throw new ArgumentException($"repetition penalty must be positive, got {penalty}");
        Penalty = penalty;
    }

    public double Penalty { get; }

    public Tensor Process(Tensor scores, Tensor inputIds, int generatedLength)
    {
        var seen = scores.gather(1, inputIds);
        var penalised = torch.where(seen.lt(0), seen * Penalty, seen / Penalty);
        // Repeated ids scatter the same value several times, so the order of writes does not matter.
        return scores.scatter(1, inputIds, penalised);
    }
}

/// <summary>Keeps stop tokens from being chosen until <c>MinNewTokens</c> tokens were generated.</summary>
public sealed class MinNewTokensProcessor : ILogitsProcessor
{
    private readonly long[] _stopTokenIds;

    public MinNewTokensProcessor(int minNewTokens, IReadOnlyList<int> stopTokenIds)
    {
        MinNewTokens = minNewTokens;
        _stopTokenIds = stopTokenIds.Select(i => (long)i).ToArray();
    }

    public int MinNewTokens { get; }

    public Tensor Process(Tensor scores, Tensor inputIds, int generatedLength)
    {
        if (generatedLength >= MinNewTokens || _stopTokenIds.Length == 0) return scores;
        var ids = torch.tensor(_stopTokenIds, device: scores.device);
        return scores.index_fill(1, ids, double.NegativeInfinity);
    }
}

/// <summary>Divides the scores by the temperature.</summary>
public sealed class TemperatureProcessor : ILogitsProcessor
{
    public TemperatureProcessor(double temperature)
    {
        if (!(temperature > 0)) throw new ArgumentException($"temperature must be positive, got {temperature}");
        Temperature = temperature;
    }

    public double Temperature { get; }

    public bool DependsOnHistory => false;

    public Tensor Process(Tensor scores, Tensor inputIds, int generatedLength) => scores / Temperature;
}

/// <summary>Keeps the k highest scores (ties with the k-th included) and sets the rest to -inf.</summary>
public sealed class TopKProcessor : ILogitsProcessor
{
    public TopKProcessor(int topK, int minTokensToKeep = 1)
    {
        if (topK < 1) throw new ArgumentException($"top-k must be at least 1, got {topK}");
        TopK = Math.Max(topK, minTokensToKeep);
    }

    public int TopK { get; }

    public bool DependsOnHistory => false;

    public Tensor Process(Tensor scores, Tensor inputIds, int generatedLength)
    {
        int k = (int)Math.Min(TopK, scores.shape[^1]);
        var kth = scores.topk(k, dim: -1).values.narrow(-1, k - 1, 1);
        return scores.masked_fill(scores.lt(kth), double.NegativeInfinity);
    }
}

/// <summary>
/// Nucleus filtering: keeps the smallest set of most likely tokens whose probabilities add up to at least
/// <c>p</c> (at least <c>minTokensToKeep</c> tokens), sets the rest to -inf.
/// </summary>
public sealed class TopPProcessor : ILogitsProcessor
{
    public TopPProcessor(double topP, int minTokensToKeep = 1)
    {
        if (!(topP > 0 && topP <= 1)) throw new ArgumentException($"top-p must be in (0, 1], got {topP}");
        TopP = topP;
        MinTokensToKeep = Math.Max(1, minTokensToKeep);
    }

    public double TopP { get; }
    public int MinTokensToKeep { get; }

    public bool DependsOnHistory => false;

    public Tensor Process(Tensor scores, Tensor inputIds, int generatedLength)
    {
        // Ascending order: the tokens to drop are the prefix whose cumulative probability stays within 1 - p.
        var (sorted, order) = scores.sort(-1, descending: false);
        var cumulative = sorted.softmax(-1).cumsum(-1);
        var dropSorted = cumulative.le(1 - TopP);
        long keep = Math.Min(MinTokensToKeep, scores.shape[^1]);
        dropSorted.narrow(-1, scores.shape[^1] - keep, keep).fill_(false);
        var drop = dropSorted.scatter(-1, order, dropSorted);
        return scores.masked_fill(drop, double.NegativeInfinity);
    }
}

/// <summary>Min-p filtering: drops tokens whose probability is below <c>p × (probability of the most likely token)</c>.</summary>
public sealed class MinPProcessor : ILogitsProcessor
{
    public MinPProcessor(double minP)
    {
        if (!(minP >= 0 && minP <= 1)) throw new ArgumentException($"min-p must be in [0, 1], got {minP}");
        MinP = minP;
    }

    public double MinP { get; }

    public bool DependsOnHistory => false;

    public Tensor Process(Tensor scores, Tensor inputIds, int generatedLength)
    {
        var probs = scores.softmax(-1);
        var threshold = probs.amax([-1], keepdim: true) * MinP;
        // The most likely token always survives (its probability equals the maximum), so one token is kept.
        return scores.masked_fill(probs.lt(threshold), double.NegativeInfinity);
    }
}

/// <summary>An ordered list of processors applied one after the other.</summary>
public sealed class LogitsProcessorList : ILogitsProcessor
{
    public LogitsProcessorList(IEnumerable<ILogitsProcessor> processors) => Processors = processors.ToList();

    public IReadOnlyList<ILogitsProcessor> Processors { get; }

    public bool DependsOnHistory => Processors.Any(p => p.DependsOnHistory);

    public Tensor Process(Tensor scores, Tensor inputIds, int generatedLength)
    {
        foreach (var p in Processors) scores = p.Process(scores, inputIds, generatedLength);
        return scores;
    }

    /// <summary>
    /// The processors for <paramref name="options"/> in transformers' order: repetition penalty, min new tokens,
    /// then (only when sampling) temperature, top-k, top-p, min-p. Settings at their neutral value add nothing.
    /// </summary>
    public static LogitsProcessorList FromOptions(GenerationOptions options, IReadOnlyList<int> stopTokenIds)
    {
        var list = new List<ILogitsProcessor>();
        if (options.RepetitionPenalty != 1.0) list.Add(new RepetitionPenaltyProcessor(options.RepetitionPenalty));
        if (options.MinNewTokens > 0 && stopTokenIds.Count > 0) list.Add(new MinNewTokensProcessor(options.MinNewTokens, stopTokenIds));
        if (options.DoSample)
        {
            if (options.Temperature != 1.0) list.Add(new TemperatureProcessor(options.Temperature));
            if (options.TopK > 0) list.Add(new TopKProcessor(options.TopK));
            if (options.TopP < 1.0) list.Add(new TopPProcessor(options.TopP));
            if (options.MinP > 0) list.Add(new MinPProcessor(options.MinP));
        }
        return new LogitsProcessorList(list);
    }
}

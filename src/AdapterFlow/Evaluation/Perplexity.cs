using System.Diagnostics;
using System.Text.Json.Nodes;
using AdapterFlow.IO;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Evaluation;

/// <summary>Settings of <see cref="Perplexity"/>.</summary>
public sealed record PerplexityOptions
{
    /// <summary>Tokens per window (context + scored tokens); null = the model's max_position_embeddings.</summary>
    public int? MaxLength { get; init; }

    /// <summary>How far each window moves; null = half the window. stride = window gives disjoint chunks (fastest, least context).</summary>
    public int? Stride { get; init; }

    /// <summary>Encode with the tokenizer's special tokens (BOS), as transformers' tokenizer(text) does.</summary>
    public bool AddSpecialTokens { get; init; } = true;
}

/// <summary>The outcome of a perplexity run.</summary>
/// <param name="Value">exp(mean negative log-likelihood) over the scored tokens.</param>
/// <param name="MeanNll">Mean negative log-likelihood per scored token, in nats.</param>
/// <param name="ScoredTokens">Tokens whose probability was counted (each once).</param>
/// <param name="TotalTokens">Tokens in the text.</param>
/// <param name="Windows">Forward passes run.</param>
/// <param name="MaxLength">Tokens per window.</param>
/// <param name="Stride">Tokens between window starts.</param>
/// <param name="Elapsed">Wall time.</param>
public sealed record PerplexityResult(double Value, double MeanNll, long ScoredTokens, long TotalTokens, int Windows, int MaxLength, int Stride, TimeSpan Elapsed)
{
    public JsonObject ToJson() => new()
    {
        ["perplexity"] = Value,
        ["mean_nll"] = MeanNll,
        ["scored_tokens"] = ScoredTokens,
        ["total_tokens"] = TotalTokens,
        ["windows"] = Windows,
        ["max_length"] = MaxLength,
        ["stride"] = Stride,
        ["seconds"] = Math.Round(Elapsed.TotalSeconds, 3),
    };
}

/// <summary>
/// Perplexity of a text with a sliding window, as in Hugging Face's perplexity guide: windows of
/// <c>maxLength</c> tokens start every <c>stride</c> tokens; each window scores only the tokens the previous
/// window did not reach, so every token is scored once, with up to maxLength − stride tokens of context. The
/// first token of the text (it has no context) is never scored; with stride = maxLength the windows are
/// disjoint and the first token of each is not scored either, as in the guide. Unlike the guide, whose mean
/// of per-window means weights windows equally, the NLL is summed per token and divided by the scored count.
/// </summary>
public static class Perplexity
{
    /// <summary>Perplexity of a text, encoded with <paramref name="tokenizer"/>.</summary>
    public static PerplexityResult OfText(CausalLM model, ITokenizer tokenizer, string text, PerplexityOptions? options = null,
        Action<int, int>? onWindow = null, CancellationToken cancellation = default)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        ArgumentNullException.ThrowIfNull(text);
        options ??= new PerplexityOptions();
        var ids = tokenizer.Encode(text, options.AddSpecialTokens);
        return OfTokens(model, ids, options, onWindow, cancellation);
    }

    /// <summary>Perplexity of a token sequence. <paramref name="onWindow"/> gets (windows done, windows in all).</summary>
    public static PerplexityResult OfTokens(CausalLM model, IReadOnlyList<int> ids, PerplexityOptions? options = null,
        Action<int, int>? onWindow = null, CancellationToken cancellation = default)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(ids);
        options ??= new PerplexityOptions();
        int maxLength = options.MaxLength ?? model.Config.MaxPositionEmbeddings;
        int stride = options.Stride ?? Math.Max(1, maxLength / 2);
        if (maxLength < 2) throw new ArgumentException($"the window (max length) must be at least 2 tokens, got {maxLength}");
        if (stride < 1 || stride > maxLength) throw new ArgumentException($"stride must be in 1..{maxLength} (the window), got {stride}");
        if (ids.Count < 2) throw new ArgumentException($"perplexity needs at least 2 tokens, the text has {ids.Count}");
        int vocab = model.Config.VocabSize;
        foreach (var id in ids)
            if (id < 0 || id >= vocab) throw new ArgumentException($"token id {id} is outside the model's vocabulary 0..{vocab - 1}");

        var clock = Stopwatch.StartNew();
        var all = ids.Select(i => (long)i).ToArray();
        int n = all.Length;
        int windows = WindowCount(n, maxLength, stride);
        double nllSum = 0;
        long scored = 0;
        int done = 0, previousEnd = 0;
        using var noGrad = torch.no_grad();
        for (int begin = 0; ; begin += stride)
        {
            cancellation.ThrowIfCancellationRequested();
            int end = Math.Min(begin + maxLength, n);
            // Targets: the tokens this window reaches that no earlier window scored, each predicted from the
            // logits one position before it (so a window's first token is never a target).
            int firstTarget = Math.Max(previousEnd, begin + 1);
            if (firstTarget < end)
            {
                using var scope = torch.NewDisposeScope();
                var input = torch.tensor(all.AsSpan(begin, end - begin).ToArray(), [1, end - begin], ScalarType.Int64, model.Device);
                var logits = model.forward(new ForwardInput { InputIds = input }).Logits;
                // A prompt-tuning adapter returns logits for its virtual tokens first (as PEFT): keep the window's own.
                if (logits.shape[1] > input.shape[1]) logits = logits.narrow(1, logits.shape[1] - input.shape[1], input.shape[1]);
                // Logits at window positions firstTarget-1-begin .. end-2-begin predict tokens firstTarget .. end-1.
                int count = end - firstTarget;
                var predicting = logits.narrow(1, firstTarget - 1 - begin, count).to_type(ScalarType.Float32);
                var logProbs = predicting.log_softmax(-1);
                var targets = input.narrow(1, firstTarget - begin, count).unsqueeze(-1);
                var nll = -logProbs.gather(-1, targets).to_type(ScalarType.Float64).sum();
                nllSum += nll.item<double>();
                scored += count;
            }
            previousEnd = end;
            done++;
            onWindow?.Invoke(done, windows);
            if (end == n) break;
        }
        double mean = nllSum / scored;
        return new PerplexityResult(Math.Exp(mean), mean, scored, n, done, maxLength, stride, clock.Elapsed);
    }

    /// <summary>Windows the loop runs for a text of <paramref name="n"/> tokens.</summary>
    public static int WindowCount(int n, int maxLength, int stride)
    {
        int count = 0;
        for (int begin = 0; ; begin += stride)
        {
            count++;
            if (Math.Min(begin + maxLength, n) == n) return count;
        }
    }
}

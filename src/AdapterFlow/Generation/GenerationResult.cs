namespace AdapterFlow.Generation;

/// <summary>Why a sequence ended.</summary>
public enum FinishReason
{
    /// <summary>It produced a stop token (EOS); the token is the last one of <see cref="GeneratedSequence.Tokens"/>.</summary>
    StopToken,

    /// <summary>Its text came to contain one of the stop strings; <see cref="GeneratedSequence.Text"/> ends before it.</summary>
    StopString,

    /// <summary>It reached <see cref="GenerationOptions.MaxNewTokens"/>.</summary>
    Length,
}

/// <summary>The continuation of one prompt.</summary>
public sealed class GeneratedSequence
{
    public GeneratedSequence(IReadOnlyList<int> tokens, string? text, FinishReason finishReason, string? stopString, double? score)
    {
        Tokens = tokens;
        Text = text;
        FinishReason = finishReason;
        StopString = stopString;
        Score = score;
    }

    /// <summary>New token ids (no prompt, no padding); a stop token that ended the sequence is included, as transformers does.</summary>
    public IReadOnlyList<int> Tokens { get; }

    /// <summary>Decoded continuation (null without a tokenizer), cut before the stop string that ended it.</summary>
    public string? Text { get; }

    public FinishReason FinishReason { get; }

    /// <summary>The stop string that ended the sequence, if any.</summary>
    public string? StopString { get; }

    /// <summary>Beam search: the length-normalised log-probability the hypothesis was ranked by. Null otherwise.</summary>
    public double? Score { get; }
}

/// <summary>Timing of one generation call. Prefill is the prompt forward pass; decode is every step after it.</summary>
public sealed record GenerationStats
{
    /// <summary>Real (non-padding) prompt tokens over all rows.</summary>
    public long PromptTokens { get; init; }

    /// <summary>New tokens over all rows (padding of finished rows not counted).</summary>
    public long GeneratedTokens { get; init; }

    /// <summary>Time of the prompt forward pass, up to and including choosing the first new token.</summary>
    public TimeSpan PrefillTime { get; init; }

    /// <summary>Time of all later steps (model, logits processing and token choice; not a stream consumer's time between tokens).</summary>
    public TimeSpan DecodeTime { get; init; }

    /// <summary>Tokens produced by the decode steps (all but the first token of each row).</summary>
    public long DecodeTokens { get; init; }

    /// <summary>Decode steps run (forward passes after the prefill).</summary>
    public int DecodeSteps { get; init; }

    /// <summary>Self-speculative decoding: tokens drafted by the early layers (over the rows still generating). 0 otherwise.</summary>
    public long DraftedTokens { get; init; }

    /// <summary>Self-speculative decoding: drafted tokens the full model agreed with (the longest agreeing prefix of each row's draft).</summary>
    public long AcceptedDraftTokens { get; init; }

    /// <summary>Accepted drafts / drafted tokens (self-speculative decoding); null when nothing was drafted.</summary>
    public double? AcceptanceRate => DraftedTokens > 0 ? (double)AcceptedDraftTokens / DraftedTokens : null;

    /// <summary>Prompt tokens per second of prefill.</summary>
    public double PromptTokensPerSecond => PrefillTime > TimeSpan.Zero ? PromptTokens / PrefillTime.TotalSeconds : 0;

    /// <summary>New tokens per second of decoding (over all rows of the batch).</summary>
    public double GenerationTokensPerSecond => DecodeTime > TimeSpan.Zero ? DecodeTokens / DecodeTime.TotalSeconds : 0;
}

/// <summary>The outcome of <see cref="TextGenerator.Generate(IReadOnlyList{IReadOnlyList{int}}, GenerationOptions?, CancellationToken)"/>: one sequence per prompt (N per prompt with NumReturnSequences = N), in order.</summary>
public sealed class GenerationResult
{
    public GenerationResult(IReadOnlyList<GeneratedSequence> sequences, GenerationStats stats)
    {
        Sequences = sequences;
        Stats = stats;
    }

    public IReadOnlyList<GeneratedSequence> Sequences { get; }
    public GenerationStats Stats { get; }

    /// <summary>New tokens as a rectangle [prompts, longest], shorter rows filled with <paramref name="padTokenId"/> (transformers' layout).</summary>
    public int[][] ToPaddedArray(int padTokenId)
    {
        int width = Sequences.Count == 0 ? 0 : Sequences.Max(s => s.Tokens.Count);
        return Sequences.Select(s =>
        {
            var row = Enumerable.Repeat(padTokenId, width).ToArray();
            for (int i = 0; i < s.Tokens.Count; i++) row[i] = s.Tokens[i];
            return row;
        }).ToArray();
    }
}

/// <summary>One streamed token of one prompt.</summary>
/// <param name="Row">Index of the sequence: the prompt, or with NumReturnSequences = N, prompt · N + sample.</param>
/// <param name="TokenId">The new token.</param>
/// <param name="Text">
/// Text that became final with this token (null without a tokenizer; may be empty: an incomplete UTF-8 character,
/// or text held back because it may be the start of a stop string). The pieces of a row add up to its final text.
/// </param>
/// <param name="FinishReason">Set on the last token of a row.</param>
public readonly record struct GeneratedToken(int Row, int TokenId, string? Text, FinishReason? FinishReason);

using System.Text.Json;
using System.Text.Json.Nodes;
using AdapterFlow.Models;

namespace AdapterFlow.Generation;

/// <summary>
/// How to generate. Names and defaults follow Hugging Face's <c>GenerationConfig</c> so that settings carry
/// over one to one: greedy unless <see cref="DoSample"/>; when sampling, temperature, top-k (50 by default, as
/// in transformers), top-p and min-p filter the distribution in that order, after the repetition penalty.
/// </summary>
public sealed record GenerationOptions
{
    /// <summary>Tokens to generate per prompt at most (the prompt is not counted).</summary>
    public int MaxNewTokens { get; init; } = 20;

    /// <summary>End-of-sequence tokens are suppressed until this many tokens were generated.</summary>
    public int MinNewTokens { get; init; }

    /// <summary>Sample from the (filtered) distribution; false = greedy (argmax).</summary>
    public bool DoSample { get; init; }

    /// <summary>Divides the logits before sampling (&lt; 1 sharpens, &gt; 1 flattens). Ignored when greedy.</summary>
    public double Temperature { get; init; } = 1.0;

    /// <summary>Keep only the k most likely tokens when sampling; 0 disables.</summary>
    public int TopK { get; init; } = 50;

    /// <summary>Nucleus sampling: keep the smallest set of tokens whose probability adds up to at least p; 1 disables.</summary>
    public double TopP { get; init; } = 1.0;

    /// <summary>Drop tokens less likely than <c>MinP × p(most likely token)</c>; 0 disables.</summary>
    public double MinP { get; init; }

    /// <summary>CTRL-style penalty on every token already in the prompt or the output (1 = off, &gt; 1 discourages repeats).</summary>
    public double RepetitionPenalty { get; init; } = 1.0;

    /// <summary>Seed of a private random generator: the same seed gives the same sample. Null uses torch's global generator.</summary>
    public long? Seed { get; init; }

    /// <summary>Tokens that end a sequence (kept in its output). Null: the EOS ids of the model config and the tokenizer.</summary>
    public IReadOnlyList<int>? StopTokenIds { get; init; }

    /// <summary>Texts that end a sequence as soon as the decoded continuation contains one; the text is cut before it. Needs a tokenizer.</summary>
    public IReadOnlyList<string>? StopStrings { get; init; }

    /// <summary>Fills left padding and rows that finished early. Null: config pad id, tokenizer pad id, else the first stop token.</summary>
    public int? PadTokenId { get; init; }

    /// <summary>
    /// Sequences per prompt (e.g. several samples for pass@k). Results are ordered prompt by prompt: sequences
    /// r·N .. r·N + N − 1 belong to prompt r, as in transformers. Not supported with beam search.
    /// </summary>
    public int NumReturnSequences { get; init; } = 1;

    /// <summary>Beam search with this many beams (1 = no beam search). Deterministic: ignores sampling settings.</summary>
    public int NumBeams { get; init; } = 1;

    /// <summary>Beam search: finished beams are ranked by sum(log p) / length^LengthPenalty.</summary>
    public double LengthPenalty { get; init; } = 1.0;

    /// <summary>Beam search: stop as soon as <see cref="NumBeams"/> hypotheses are finished (transformers' early_stopping=True).</summary>
    public bool EarlyStopping { get; init; }

    /// <summary>
    /// How tokens are produced: plain autoregressive decoding (the default; beam search when <see cref="NumBeams"/>
    /// &gt; 1), early exit at <see cref="ExitLayer"/>, or LayerSkip's self-speculative decoding (draft with the first
    /// <see cref="ExitLayer"/> layers, verify with the rest). See docs/generation.md.
    /// </summary>
    public DecodingStrategyKind Strategy { get; init; } = DecodingStrategyKind.Autoregressive;

    /// <summary>
    /// The layer count E of <see cref="DecodingStrategyKind.EarlyExit"/> (every token runs the first E layers, then the
    /// shared final norm and head) and of <see cref="DecodingStrategyKind.SelfSpeculative"/> (the draft runs them).
    /// Required by those strategies, unused by the others. 1 ≤ E ≤ the model's layer count.
    /// </summary>
    public int? ExitLayer { get; init; }

    /// <summary>Self-speculative decoding: tokens drafted per round before one verification pass (LayerSkip's d).</summary>
    public int NumSpeculations { get; init; } = 4;

    /// <summary>
    /// Self-speculative decoding: the tokens the draft may propose (its head computes only their logits, plus the
    /// prompt's and the generated tokens'); null = the whole vocabulary. The output does not change (the verifier
    /// runs the full head; with sampling the draft distribution is zero outside the subset, which speculative sampling
    /// allows); a smaller draft head makes drafts cheaper on bandwidth-bound models. LLaMA-family models with a plain
    /// head; others draft over the whole vocabulary.
    /// </summary>
    public DraftVocabulary? DraftVocabulary { get; init; }

    /// <summary>
    /// Self-speculative decoding: stop a round's drafting early after a draft whose probability under the draft's own
    /// distribution is below this (transformers' assistant_confidence_threshold), so that K is the most drafts a round
    /// makes, not the number; 0 = off (always K). Doubtful drafts are the ones the verifier rejects, and each costs a
    /// pass through E layers. The output does not change. Used by greedy one-row decoding on the CPU decode kernels.
    /// </summary>
    public double DraftConfidenceThreshold { get; init; }

    /// <summary>
    /// Self-speculative decoding on the CPU decode kernels (one row, a LLaMA-family model, with or without adapters): keep a copy of the
    /// late layers' and the head's weights laid out in 32-row panels, so that verifying d + 1 positions costs about one
    /// token's weight traffic (measured 0.99–1.14 one-token passes for 2–5 tokens and ~1.4 for 6–8, against 1.2–2.7 over the row-major
    /// weights; docs/benchmarks.md). Made at the first such generation, kept on the model for the next ones and made again
    /// where the weights changed; it costs that part of the weights' memory again (350 MB for the 109.5M model at E = 3;
    /// <see cref="Models.LlamaForCausalLM.ReleasePackedWeights"/> frees it) and is skipped when it would take more than a
    /// quarter of the machine's memory, or without AVX-512. The output does not change.
    /// </summary>
    public bool PackVerificationWeights { get; init; } = true;

    /// <summary>Leave special tokens (EOS, pad...) out of the decoded text.</summary>
    public bool SkipSpecialTokens { get; init; } = true;

    /// <summary>Checks the settings; throws <see cref="ArgumentException"/> naming the bad one.</summary>
    public void Validate()
    {
        if (MaxNewTokens < 1) throw new ArgumentException($"MaxNewTokens must be at least 1, got {MaxNewTokens}");
        if (MinNewTokens < 0) throw new ArgumentException($"MinNewTokens must be non-negative, got {MinNewTokens}");
        if (!(Temperature > 0) || double.IsInfinity(Temperature)) throw new ArgumentException($"Temperature must be a positive number, got {Temperature}");
        if (TopK < 0) throw new ArgumentException($"TopK must be non-negative (0 = off), got {TopK}");
        if (!(TopP > 0 && TopP <= 1)) throw new ArgumentException($"TopP must be in (0, 1], got {TopP}");
        if (!(MinP >= 0 && MinP <= 1)) throw new ArgumentException($"MinP must be in [0, 1], got {MinP}");
        if (!(RepetitionPenalty > 0) || double.IsInfinity(RepetitionPenalty)) throw new ArgumentException($"RepetitionPenalty must be a positive number, got {RepetitionPenalty}");
        if (NumBeams < 1) throw new ArgumentException($"NumBeams must be at least 1, got {NumBeams}");
        if (NumReturnSequences < 1) throw new ArgumentException($"NumReturnSequences must be at least 1, got {NumReturnSequences}");
        if (NumReturnSequences > 1 && NumBeams > 1) throw new ArgumentException("NumReturnSequences > 1 is not supported with beam search");
        if (NumBeams > 1 && DoSample) throw new ArgumentException("beam search with sampling (NumBeams > 1 and DoSample) is not supported");
        if (ExitLayer is < 1) throw new ArgumentException($"ExitLayer must be at least 1, got {ExitLayer}");
        if (NumSpeculations < 1) throw new ArgumentException($"NumSpeculations must be at least 1, got {NumSpeculations}");
        if (!(DraftConfidenceThreshold >= 0 && DraftConfidenceThreshold < 1))
            throw new ArgumentException($"DraftConfidenceThreshold must be in [0, 1), got {DraftConfidenceThreshold}");
        switch (Strategy)
        {
            case DecodingStrategyKind.Autoregressive:
                if (ExitLayer is not null)
                    throw new ArgumentException($"ExitLayer {ExitLayer} is used by the EarlyExit and SelfSpeculative strategies; set Strategy to one of them (it is Autoregressive)");
                break;
            case DecodingStrategyKind.EarlyExit:
            case DecodingStrategyKind.SelfSpeculative:
                if (ExitLayer is null) throw new ArgumentException($"the {Strategy} strategy needs ExitLayer (the number of layers the {(Strategy == DecodingStrategyKind.EarlyExit ? "model" : "draft")} runs)");
                if (NumBeams > 1) throw new ArgumentException($"beam search (NumBeams {NumBeams}) is not supported with the {Strategy} strategy");
                break;
            default:
                throw new ArgumentException($"unknown decoding strategy {(int)Strategy}");
        }
        if (StopStrings is not null && StopStrings.Any(string.IsNullOrEmpty)) throw new ArgumentException("StopStrings must not contain an empty string");
    }

    /// <summary>
    /// Reads a Hugging Face <c>generation_config.json</c> (a file, or the model folder holding one) on top of
    /// <paramref name="defaults"/>: eos/pad ids, do_sample, temperature, top_k, top_p, min_p, repetition_penalty,
    /// max_new_tokens, min_new_tokens, num_beams, length_penalty, early_stopping, and transformers' LayerSkip keys
    /// assistant_early_exit (→ self-speculative decoding with that exit layer) and num_assistant_tokens. Absent keys keep the defaults.
    /// </summary>
    public static GenerationOptions FromGenerationConfig(string fileOrDirectory, GenerationOptions? defaults = null)
    {
        var path = Directory.Exists(fileOrDirectory) ? Path.Combine(fileOrDirectory, "generation_config.json") : fileOrDirectory;
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: generation_config.json not found");
        JsonObject json;
        try
        {
            json = JsonNode.Parse(File.ReadAllText(path)) as JsonObject
                   ?? throw new InvalidDataException($"{path}: generation_config.json must hold a JSON object");
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{path}: invalid JSON ({e.Message})");
        }
        var o = defaults ?? new GenerationOptions();
        bool earlyStopping = o.EarlyStopping;
        // early_stopping may also be the string "never"; only true changes our behaviour.
        if (json["early_stopping"] is JsonValue es && es.TryGetValue<bool>(out var esBool)) earlyStopping = esBool;
        // transformers' LayerSkip support: assistant_early_exit = E drafts with the first E layers of the model itself.
        int? assistantExit = ConfigJson.OptionalInt(json, path, "assistant_early_exit");
        var result = o with
        {
            Strategy = assistantExit is null ? o.Strategy : DecodingStrategyKind.SelfSpeculative,
            ExitLayer = assistantExit ?? o.ExitLayer,
            NumSpeculations = assistantExit is null ? o.NumSpeculations : ConfigJson.Int(json, path, "num_assistant_tokens", o.NumSpeculations),
            StopTokenIds = ConfigJson.IntOrIntList(json, path, "eos_token_id") ?? o.StopTokenIds,
            PadTokenId = ConfigJson.OptionalInt(json, path, "pad_token_id") ?? o.PadTokenId,
            DoSample = ConfigJson.Bool(json, path, "do_sample", o.DoSample),
            Temperature = ConfigJson.Double(json, path, "temperature", o.Temperature),
            TopK = ConfigJson.Int(json, path, "top_k", o.TopK),
            TopP = ConfigJson.Double(json, path, "top_p", o.TopP),
            MinP = ConfigJson.Double(json, path, "min_p", o.MinP),
            RepetitionPenalty = ConfigJson.Double(json, path, "repetition_penalty", o.RepetitionPenalty),
            MaxNewTokens = ConfigJson.Int(json, path, "max_new_tokens", o.MaxNewTokens),
            MinNewTokens = ConfigJson.Int(json, path, "min_new_tokens", o.MinNewTokens),
            NumBeams = ConfigJson.Int(json, path, "num_beams", o.NumBeams),
            NumReturnSequences = ConfigJson.Int(json, path, "num_return_sequences", o.NumReturnSequences),
            LengthPenalty = ConfigJson.Double(json, path, "length_penalty", o.LengthPenalty),
            EarlyStopping = earlyStopping,
        };
        try { result.Validate(); }
        catch (ArgumentException e) { throw new InvalidDataException($"{path}: {e.Message}"); }
        return result;
    }
}

/// <summary>The decoding strategies <see cref="TextGenerator"/> picks from <see cref="GenerationOptions.Strategy"/>.</summary>
public enum DecodingStrategyKind
{
    /// <summary>One full forward pass per token (<see cref="AutoregressiveDecoding"/>; beam search when NumBeams &gt; 1).</summary>
    Autoregressive,

    /// <summary>Every token runs only the first <see cref="GenerationOptions.ExitLayer"/> layers (<see cref="EarlyExitDecoding"/>): faster, different output.</summary>
    EarlyExit,

    /// <summary>
    /// Draft <see cref="GenerationOptions.NumSpeculations"/> tokens with the first <see cref="GenerationOptions.ExitLayer"/>
    /// layers, verify them with the remaining layers in one pass (<see cref="SelfSpeculativeDecoding"/>). Same output as
    /// autoregressive decoding (greedy: token for token; sampling: the same distribution).
    /// </summary>
    SelfSpeculative,
}

using System.Diagnostics;
using System.Globalization;
using System.Text.Json.Nodes;
using AdapterFlow.Data;
using AdapterFlow.Generation;
using AdapterFlow.IO;
using AdapterFlow.Models;

namespace AdapterFlow.Evaluation;

/// <summary>Settings of <see cref="MathEvaluator"/>.</summary>
public sealed record MathEvalOptions
{
    /// <summary>Prompts generated together (left-padded, one KV cache).</summary>
    public int BatchSize { get; init; } = 8;

    /// <summary>Longest response; LLM-Adapters uses 256.</summary>
    public int MaxNewTokens { get; init; } = 256;

    /// <summary>1 = greedy (default); more = beam search (LLM-Adapters uses 4 beams).</summary>
    public int NumBeams { get; init; } = 1;

    /// <summary>How AQuA letters are read; <see cref="AquaScoring.Strict"/> by default.</summary>
    public AquaScoring AquaScoring { get; init; } = AquaScoring.Strict;

    public void Validate()
    {
        if (BatchSize < 1) throw new ArgumentException($"batch size must be at least 1, got {BatchSize}");
        if (MaxNewTokens < 1) throw new ArgumentException($"max new tokens must be at least 1, got {MaxNewTokens}");
        if (NumBeams < 1) throw new ArgumentException($"number of beams must be at least 1, got {NumBeams}");
    }
}

/// <summary>The outcome of one problem.</summary>
/// <param name="Dataset">Name of the set.</param>
/// <param name="Index">Position of the item in its file.</param>
/// <param name="Prompt">The exact prompt text (LLM-Adapters' template).</param>
/// <param name="Generation">The generated text (special tokens skipped; cut before a stop string that ended generation).</param>
/// <param name="Response">What was scored: the generation up to "### Instruction"/"### Response:", trimmed.</param>
/// <param name="Extracted">The prediction: a number ("∞"-free: null when the response holds none) or a letter ("" when none).</param>
/// <param name="Label">The answer from the file.</param>
/// <param name="Correct">Scored as LLM-Adapters does (numbers within 0.001; letters equal).</param>
/// <param name="NewTokens">Tokens generated (EOS included when it ended the response).</param>
/// <param name="FinishReason">Why generation stopped.</param>
public sealed record MathItemResult(string Dataset, int Index, string Prompt, string Generation, string Response, string? Extracted,
    string Label, bool Correct, int NewTokens, FinishReason FinishReason)
{
    /// <summary>One JSONL record: dataset, index, prompt, generation, response, extracted, label, correct, new_tokens, finish_reason.</summary>
    public JsonObject ToJson() => new()
    {
        ["dataset"] = Dataset,
        ["index"] = Index,
        ["prompt"] = Prompt,
        ["generation"] = Generation,
        ["response"] = Response,
        ["extracted"] = Extracted,
        ["label"] = Label,
        ["correct"] = Correct,
        ["new_tokens"] = NewTokens,
        ["finish_reason"] = FinishReason switch
        {
            FinishReason.StopToken => "stop_token",
            FinishReason.StopString => "stop_string",
            _ => "length",
        },
    };
}

/// <summary>Accuracy on one set, with every item's outcome.</summary>
public sealed record MathEvalResult(
    string Dataset, AnswerKind Kind, string Scoring, Accuracy Accuracy, IReadOnlyList<MathItemResult> Items,
    long GeneratedTokens, TimeSpan Elapsed)
{
    /// <summary>True when the evaluation was cancelled: <see cref="Items"/> and the accuracy cover only the items scored before.</summary>
    public bool Interrupted { get; init; }

    /// <summary>Items the set holds (more than <see cref="Accuracy"/>'s total when <see cref="Interrupted"/>).</summary>
    public int Requested { get; init; }

    /// <summary>n, correct, accuracy, the 95% Wilson interval and the scoring mode.</summary>
    public JsonObject ToJson()
    {
        var (low, high) = Accuracy.Interval95;
        return new JsonObject
        {
            ["n"] = Accuracy.Total,
            ["correct"] = Accuracy.Correct,
            ["accuracy"] = Math.Round(Accuracy.Value, 6),
            ["ci95_low"] = Math.Round(low, 6),
            ["ci95_high"] = Math.Round(high, 6),
            ["scoring"] = Scoring,
            ["generated_tokens"] = GeneratedTokens,
            ["interrupted"] = Interrupted,
            ["requested"] = Requested,
            ["seconds"] = Math.Round(Elapsed.TotalSeconds, 3),
        };
    }
}

/// <summary>
/// Scores a model on math word problems the way LLM-Adapters' evaluate.py does — same prompt, same answer
/// extraction, same tolerance — so numbers are comparable, but batched: prompts are sorted by length (less
/// padding), left-padded and decoded together with the KV cache, and generation stops at EOS or at the model's
/// next "### Instruction". Greedy by default (LLM-Adapters uses 4-beam search: <see cref="MathEvalOptions.NumBeams"/>).
/// </summary>
public sealed class MathEvaluator
{
    private readonly TextGenerator _generator;

    public MathEvaluator(CausalLM model, ITokenizer tokenizer, MathEvalOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(tokenizer);
        Options = options ?? new MathEvalOptions();
        Options.Validate();
        Tokenizer = tokenizer;
        _generator = new TextGenerator(model, tokenizer);
    }

    public MathEvalOptions Options { get; }
    public ITokenizer Tokenizer { get; }

    /// <summary>Name of the scoring used for a set of the given kind (reported with every result).</summary>
    public string ScoringName(AnswerKind kind) => kind == AnswerKind.Letter
        ? "letter:" + AnswerExtractor.Name(Options.AquaScoring)
        : "last-number (llm-adapters)";

    /// <summary>
    /// Generates and scores every item. <paramref name="onItem"/> is called as items finish (in the order they
    /// are generated: longest prompts first); the result lists them in file order. Cancelling
    /// <paramref name="cancellation"/> stops generation within the current batch and returns the items scored
    /// before it (<see cref="MathEvalResult.Interrupted"/>), so a stopped run still has its partial results.
    /// </summary>
    public MathEvalResult Evaluate(MathDataset dataset, Action<MathItemResult>? onItem = null, CancellationToken cancellation = default)
    {
        ArgumentNullException.ThrowIfNull(dataset);
        var clock = Stopwatch.StartNew();
        var items = dataset.Items;
        var prompts = items.Select(i => MathPrompt.Format(i.Instruction, i.Input)).ToArray();
        // As transformers' tokenizer(prompt) in LLM-Adapters: with the tokenizer's special tokens (BOS for LLaMA).
        var ids = prompts.Select(p => Tokenizer.Encode(p, addSpecialTokens: true)).ToArray();
        // Longest first: similar lengths share a batch (little padding), and a batch that does not fit fails at once.
        // The order does not depend on the batch size, so neither do the batches' contents' order.
        var order = Enumerable.Range(0, items.Count).OrderByDescending(i => ids[i].Count).ThenBy(i => i).ToArray();
        var options = new GenerationOptions
        {
            MaxNewTokens = Options.MaxNewTokens,
            DoSample = false,
            NumBeams = Options.NumBeams,
            // Beam search takes no stop strings; its hypotheses are cut after the fact (MathPrompt.Response), which scores the same.
            StopStrings = Options.NumBeams == 1 ? MathPrompt.StopStrings : null,
            SkipSpecialTokens = true,
        };
        var results = new MathItemResult?[items.Count];
        long generated = 0;
        bool interrupted = false;
        for (int start = 0; start < order.Length; start += Options.BatchSize)
        {
            var batch = order.Skip(start).Take(Options.BatchSize).ToArray();
            GenerationResult output;
            try
            {
                // The token is checked after every decoding step, so a cancelled run stops within the current batch.
                cancellation.ThrowIfCancellationRequested();
                output = _generator.Generate(batch.Select(i => ids[i]).ToArray(), options, cancellation);
            }
            catch (OperationCanceledException) when (cancellation.IsCancellationRequested)
            {
                // What was scored so far is kept: the half-done batch is dropped, the result says it is partial.
                interrupted = true;
                break;
            }
            for (int b = 0; b < batch.Length; b++)
            {
                int i = batch[b];
                var sequence = output.Sequences[b];
                var result = Score(dataset, items[i], prompts[i], sequence);
                generated += sequence.Tokens.Count;
                results[i] = result;
                onItem?.Invoke(result);
            }
        }
        var all = results.Where(r => r is not null).Select(r => r!).ToArray();
        return new MathEvalResult(dataset.Name, dataset.Kind, ScoringName(dataset.Kind),
            new Accuracy(all.Count(r => r.Correct), all.Length), all, generated, clock.Elapsed)
        {
            Interrupted = interrupted,
            Requested = items.Count,
        };
    }

    private MathItemResult Score(MathDataset dataset, MathItem item, string prompt, GeneratedSequence sequence)
    {
        var generation = sequence.Text ?? "";
        var response = MathPrompt.Response(generation);
        string? extracted;
        bool correct;
        if (dataset.Kind == AnswerKind.Letter)
        {
            extracted = AnswerExtractor.ExtractLetter(response, Options.AquaScoring);
            correct = extracted == item.Answer;
        }
        else
        {
            double prediction = AnswerExtractor.ExtractNumber(response);
            correct = AnswerExtractor.IsCorrectNumber(item.NumericAnswer, prediction);
            extracted = double.IsInfinity(prediction) && !ContainsDigit(response) ? null : prediction.ToString("R", CultureInfo.InvariantCulture);
        }
        return new MathItemResult(dataset.Name, item.Index, prompt, generation, response, extracted, item.Answer, correct,
            sequence.Tokens.Count, sequence.FinishReason);
    }

    private static bool ContainsDigit(string text) => text.Any(char.IsDigit);
}

/// <summary>Results on several sets: LLM-Adapters' table (one column per set, then the average of the accuracies).</summary>
public sealed class MathEvalSummary
{
    public MathEvalSummary(IReadOnlyList<MathEvalResult> results, AquaScoring aquaScoring, int? limit)
    {
        Results = results;
        AquaScoring = aquaScoring;
        Limit = limit;
    }

    public IReadOnlyList<MathEvalResult> Results { get; }
    public AquaScoring AquaScoring { get; }
    public int? Limit { get; }

    /// <summary>True when the run was cancelled: the last set is partial and the sets after it are missing.</summary>
    public bool Interrupted => Results.Any(r => r.Interrupted);

    /// <summary>Unweighted mean of the per-set accuracies, as LLM-Adapters' "Avg" column.</summary>
    public double Average => Results.Count == 0 ? 0 : Results.Average(r => r.Accuracy.Value);

    /// <summary>The --json object: per set n, correct, accuracy (+ interval), the average and the scoring used.</summary>
    public JsonObject ToJson()
    {
        var sets = new JsonObject();
        foreach (var r in Results) sets[r.Dataset] = r.ToJson();
        return new JsonObject
        {
            ["datasets"] = sets,
            ["average_accuracy"] = Math.Round(Average, 6),
            ["scoring"] = new JsonObject
            {
                ["numbers"] = "last-number (llm-adapters)",
                ["aqua"] = AnswerExtractor.Name(AquaScoring),
            },
            ["limit"] = Limit,
            ["interrupted"] = Interrupted,
        };
    }

    /// <summary>A Markdown table in LLM-Adapters' layout (accuracy in percent), for reports.</summary>
    public string ToMarkdown()
    {
        var header = "| " + string.Join(" | ", Results.Select(r => r.Dataset)) + " | Avg |";
        var rule = "|" + string.Concat(Enumerable.Repeat(" ---: |", Results.Count + 1));
        var row = "| " + string.Join(" | ", Results.Select(r => Percent(r.Accuracy.Value))) + " | " + Percent(Average) + " |";
        return header + "\n" + rule + "\n" + row + "\n";
    }

    public static string Percent(double x) => (100 * x).ToString("0.0", CultureInfo.InvariantCulture);
}

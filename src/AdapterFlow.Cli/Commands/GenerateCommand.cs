using System.CommandLine;
using System.Diagnostics;
using System.Text.Json.Nodes;
using AdapterFlow.Generation;
using AdapterFlow.Models;

namespace AdapterFlow.Cli.Commands;

/// <summary><c>adapterflow generate</c>: stream a continuation of a prompt.</summary>
internal static class GenerateCommand
{
    public static Command Create(CliContext context)
    {
        var model = CommonOptions.ModelDir("The model folder (config.json, model.safetensors and tokenizer.json).");
        var adapter = CommonOptions.Adapter();
        var prompt = new Option<string?>("--prompt")
        {
            Description = "The text to continue.",
            HelpName = "TEXT",
        };
        var promptIds = new Option<string?>("--prompt-ids")
        {
            Description = "Token ids to continue instead of a text, comma-separated (e.g. 1,415,2063); a tokenizer is then optional.",
            HelpName = "IDS",
        };
        var maxNewTokens = new Option<int>("--max-new-tokens", "-n")
        {
            HelpName = "N",
            Description = "Maximum number of tokens to generate.",
            DefaultValueFactory = _ => 64,
        }.Check(n => n >= 1, "must be at least 1");
        var temperature = new Option<double>("--temperature")
        {
            HelpName = "T",
            Description = "Sampling temperature; 0 = greedy (always the most likely token).",
            DefaultValueFactory = _ => 0.8,
        }.Check(t => t >= 0 && double.IsFinite(t), "must be 0 or more");
        var topK = new Option<int>("--top-k")
        {
            HelpName = "K",
            Description = "Sample only from the K most likely tokens; 0 = no limit.",
            DefaultValueFactory = _ => 0,
        }.Check(k => k >= 0, "must be 0 or more");
        var topP = new Option<double>("--top-p")
        {
            HelpName = "P",
            Description = "Nucleus sampling: sample from the smallest set of tokens whose probability adds up to P; 1 = no limit.",
            DefaultValueFactory = _ => 1.0,
        }.Check(p => p > 0 && p <= 1, "must be in (0, 1]");
        var repetitionPenalty = new Option<double>("--repetition-penalty")
        {
            HelpName = "R",
            Description = "Penalty for tokens already in the prompt or output (as in transformers); 1 = none.",
            DefaultValueFactory = _ => 1.0,
        }.Check(r => r > 0 && double.IsFinite(r), "must be greater than 0");
        var seed = new Option<long?>("--seed")
        {
            HelpName = "S",
            Description = "Random seed for sampling (same seed, same output).",
        };
        var stop = new Option<string[]>("--stop")
        {
            Description = "Stop when the output contains this text (the stop text is not printed). Repeat for several.",
            HelpName = "STR",
            AllowMultipleArgumentsPerToken = false,
        };
        var strategy = new Option<string>("--strategy")
        {
            Description = "How tokens are produced. autoregressive: the whole model for every token. early-exit: only the first " +
                          "--exit-layer layers for every token (faster; output differs unless the model was trained for early exit). " +
                          "self-speculative: LayerSkip's decoding: the first --exit-layer layers draft --num-speculations tokens, the " +
                          "remaining layers check them in one pass; the output is exactly the autoregressive output (greedy: token for " +
                          "token; sampling: the same distribution). It is faster when the model was trained with LayerSkip's recipe " +
                          "(layer dropout + early-exit loss), otherwise about as fast or slower.",
            HelpName = "autoregressive|early-exit|self-speculative",
            DefaultValueFactory = _ => "autoregressive",
        }.AcceptOnlyFromAmong("autoregressive", "early-exit", "self-speculative");
        var exitLayer = new Option<int?>("--exit-layer")
        {
            HelpName = "E",
            Description = "Layers run by early-exit decoding, or by the draft of self-speculative decoding (1 to the model's layer count).",
        }.Check(e => e >= 1, "must be at least 1");
        var numSpeculations = new Option<int?>("--num-speculations")
        {
            HelpName = "K",
            Description = "Self-speculative decoding: tokens drafted per round before they are verified (default 4).",
        }.Check(k => k >= 1, "must be at least 1");
        var draftVocab = CommonOptions.DraftVocab();
        var draftConfidence = CommonOptions.DraftConfidence();
        var noPacked = CommonOptions.NoPackedWeights();
        var device = CommonOptions.Device();
        var dtype = CommonOptions.DType();
        var json = CommonOptions.Json("After the streamed text, print one JSON object as the last line: text, token_ids, prompt_tokens, new_tokens, " +
                                      "tokens_per_second and other speeds, strategy, acceptance_rate (self-speculative; else null), finish_reason.");
        var command = new Command("generate", "Generate a continuation of a prompt, streaming text as it is produced.")
        {
            model, adapter, prompt, promptIds, maxNewTokens, temperature, topK, topP, repetitionPenalty, seed, stop, strategy, exitLayer, numSpeculations,
            draftVocab, draftConfidence, noPacked, device, dtype, json,
        };
        command.SetAction(async (parse, cancellation) =>
        {
            var promptText = parse.GetValue(prompt);
            var idsText = parse.GetValue(promptIds);
            if (promptText is null == idsText is null) throw new CliUsageException("give exactly one of --prompt or --prompt-ids");
            var ids = idsText is null ? null : ParseIds(idsText);
            var target = Devices.Parse(parse.GetRequiredValue(device));
            var load = new LoadOptions { Device = target, DType = parse.GetValue(dtype) is { } d ? Devices.ParseDType(d) : null };
            double t = parse.GetValue(temperature);
            var (strategyKind, exit, speculations) = ReadStrategy(parse.GetValue(strategy)!, parse.GetValue(exitLayer), parse.GetValue(numSpeculations));
            var options = new GenerationOptions
            {
                Strategy = strategyKind,
                ExitLayer = exit,
                NumSpeculations = speculations ?? new GenerationOptions().NumSpeculations,
                MaxNewTokens = parse.GetValue(maxNewTokens),
                // Temperature 0 means greedy, as in most command-line front ends (transformers itself rejects 0).
                DoSample = t > 0,
                Temperature = t > 0 ? t : 1.0,
                TopK = parse.GetValue(topK),
                TopP = parse.GetValue(topP),
                RepetitionPenalty = parse.GetValue(repetitionPenalty),
                Seed = parse.GetValue(seed),
                StopStrings = parse.GetValue(stop) is { Length: > 0 } stops ? stops : null,
            };
            options.Validate();
            bool asJson = parse.GetValue(json);
            var modelPath = parse.GetRequiredValue(model);
            if (strategyKind == DecodingStrategyKind.SelfSpeculative)
                options = options with
                {
                    DraftVocabulary = CommonOptions.ReadDraftVocab(parse.GetValue(draftVocab), modelPath),
                    DraftConfidenceThreshold = parse.GetValue(draftConfidence),
                    PackVerificationWeights = !parse.GetValue(noPacked),
                };
            else if (parse.GetValue(draftVocab) is not null || parse.GetValue(draftConfidence) != 0 || parse.GetValue(noPacked))
                throw new CliUsageException("--draft-vocab, --draft-confidence and --no-packed-weights are used by --strategy self-speculative");
            using var textModel = ids is null ? TextModel.Load(modelPath, load, parse.GetValue(adapter)) : null;
            var stopIds = textModel is null ? TextModel.ReadGenerationStopIds(modelPath) : textModel.GenerationStopTokenIds;
            if (stopIds is { Count: > 0 }) options = options with { StopTokenIds = stopIds };
            // Ids need no tokenizer: the model alone (with the adapter), and the tokenizer only when there is one to show text.
            using var idsModel = ids is null ? null : LoadForIds(modelPath, load, parse.GetValue(adapter));
            var generator = textModel?.CreateGenerator() ?? new TextGenerator(idsModel!.Value.Model, idsModel.Value.Tokenizer);
            if (exit > generator.Model.NumLayers)
                throw new CliUsageException($"--exit-layer {exit} is beyond the model's {generator.Model.NumLayers} layers");
            var started = Stopwatch.StartNew();
            var stream = ids is null ? generator.StreamAsync(promptText!, options) : generator.StreamAsync([ids], options);
            if (!asJson) context.Out.Write(promptText ?? (generator.Tokenizer is { } tk ? tk.Decode(ids!, skipSpecialTokens: false) : ""));
            try
            {
                await foreach (var token in stream.WithCancellation(cancellation))
                {
                    if (asJson) continue;
                    var piece = generator.Tokenizer is null ? $" {token.TokenId}" : token.Text;
                    if (string.IsNullOrEmpty(piece)) continue;
                    context.Out.Write(piece);
                    context.Out.Flush();
                }
            }
            catch (OperationCanceledException) when (cancellation.IsCancellationRequested)
            {
                // Ctrl+C: keep what was printed, end the line, exit as interrupted programs do.
                context.Out.WriteLine();
                context.Err.WriteLine("interrupted");
                return 130;
            }
            var result = stream.Result ?? throw new InvalidOperationException("generation ended without a result");
            var sequence = result.Sequences[0];
            var stats = result.Stats;
            double seconds = started.Elapsed.TotalSeconds;
            if (asJson)
            {
                context.WriteJson(new JsonObject
                {
                    ["text"] = sequence.Text,
                    ["token_ids"] = new JsonArray(sequence.Tokens.Select(i => (JsonNode?)i).ToArray()),
                    ["prompt_tokens"] = stats.PromptTokens,
                    ["new_tokens"] = sequence.Tokens.Count,
                    ["tokens_per_second"] = Math.Round(stats.GenerationTokensPerSecond, 2),
                    ["prefill_tokens_per_second"] = Math.Round(stats.PromptTokensPerSecond, 2),
                    ["prefill_seconds"] = Math.Round(stats.PrefillTime.TotalSeconds, 4),
                    ["decode_seconds"] = Math.Round(stats.DecodeTime.TotalSeconds, 4),
                    ["seconds"] = Math.Round(seconds, 4),
                    ["strategy"] = parse.GetValue(strategy),
                    ["exit_layer"] = exit,
                    ["num_speculations"] = strategyKind == DecodingStrategyKind.SelfSpeculative ? options.NumSpeculations : null,
                    ["acceptance_rate"] = stats.AcceptanceRate is double rate ? Math.Round(rate, 4) : null,
                    ["decode_steps"] = stats.DecodeSteps,
                    ["finish_reason"] = FinishReasonName(sequence.FinishReason),
                    ["stop_string"] = sequence.StopString,
                });
            }
            else
            {
                context.Out.WriteLine();
                // Plain text (not Spectre markup): a console width must not wrap this line.
                context.Out.WriteLine(
                    $"[{sequence.Tokens.Count} new tokens after {stats.PromptTokens} prompt tokens; " +
                    $"prefill {Format.Number(stats.PromptTokensPerSecond, "0")} tok/s, decode {Format.Number(stats.GenerationTokensPerSecond, "0.#")} tok/s; " +
                    (stats.AcceptanceRate is double accepted ? $"drafts accepted {Format.Number(100 * accepted, "0")}%; " : "") +
                    $"finished: {FinishReasonName(sequence.FinishReason)}]");
            }
            return CliApp.Success;
        });
        return command;
    }

    /// <summary>The strategy options, checked together: an exit layer only with a strategy that uses one, and so on.</summary>
    internal static (DecodingStrategyKind Kind, int? ExitLayer, int? NumSpeculations) ReadStrategy(string name, int? exitLayer, int? numSpeculations)
    {
        var kind = name switch
        {
            "early-exit" => DecodingStrategyKind.EarlyExit,
            "self-speculative" => DecodingStrategyKind.SelfSpeculative,
            _ => DecodingStrategyKind.Autoregressive,
        };
        if (kind == DecodingStrategyKind.Autoregressive && exitLayer is not null)
            throw new CliUsageException("--exit-layer needs --strategy early-exit or self-speculative");
        if (kind != DecodingStrategyKind.Autoregressive && exitLayer is null)
            throw new CliUsageException($"--strategy {name} needs --exit-layer E (the number of layers the {(kind == DecodingStrategyKind.EarlyExit ? "model" : "draft")} runs)");
        if (kind != DecodingStrategyKind.SelfSpeculative && numSpeculations is not null)
            throw new CliUsageException("--num-speculations is only used with --strategy self-speculative");
        return (kind, exitLayer, numSpeculations);
    }

    private static int[] ParseIds(string text)
    {
        var parts = text.Split([',', ' '], StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        if (parts.Length == 0) throw new CliUsageException("--prompt-ids holds no ids");
        return parts.Select(p => int.TryParse(p, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out var id)
            ? id
            : throw new CliUsageException($"--prompt-ids: '{p}' is not a token id (a non-negative integer)")).ToArray();
    }

    /// <summary>The model (with the adapter, if any) and, when the folder has one, its tokenizer.</summary>
    private static ModelAndTokenizer? LoadForIds(string path, LoadOptions load, string? adapterDir)
    {
        if (adapterDir is not null && !Directory.Exists(adapterDir)) throw new DirectoryNotFoundException($"{adapterDir}: adapter folder not found");
        var folder = Directory.Exists(path) ? path : Path.GetDirectoryName(Path.GetFullPath(path))!;
        var tokenizer = File.Exists(Path.Combine(folder, "tokenizer.json")) ? TextModel.LoadTokenizer(folder) : null;
        CausalLM lm = AutoModel.FromPath(path, load);
        try
        {
            if (adapterDir is not null) lm = Adapters.PeftModel.FromPretrained(lm, adapterDir);
        }
        catch
        {
            lm.Dispose();
            throw;
        }
        return new ModelAndTokenizer(lm, tokenizer);
    }

    private readonly record struct ModelAndTokenizer(CausalLM Model, AdapterFlow.IO.HFTokenizer? Tokenizer) : IDisposable
    {
        public void Dispose() => Model.Dispose();
    }

    /// <summary>Snake-case names as in OpenAI-style APIs and the JSON output.</summary>
    internal static string FinishReasonName(FinishReason reason) => reason switch
    {
        FinishReason.StopToken => "stop_token",
        FinishReason.StopString => "stop_string",
        _ => "length",
    };
}

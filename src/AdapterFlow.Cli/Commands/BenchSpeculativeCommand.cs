using System.CommandLine;
using System.Globalization;
using System.Text.Json.Nodes;
using AdapterFlow.Generation;
using AdapterFlow.IO;
using AdapterFlow.Models;
using Spectre.Console;

namespace AdapterFlow.Cli.Commands;

/// <summary><c>adapterflow bench-speculative</c>: sweep self-speculative decoding settings against autoregressive decoding.</summary>
internal static class BenchSpeculativeCommand
{
    public static Command Create(CliContext context)
    {
        var model = CommonOptions.ModelDir("The model folder (config.json, model.safetensors and tokenizer.json).");
        var adapter = CommonOptions.Adapter();
        var promptsFile = new Option<string?>("--prompts")
        {
            Description = "Prompts to generate from: a .json math set ({instruction, input} items, e.g. the quickstart's data/pretrain-test.json; each becomes " +
                          "the evaluation prompt), a .jsonl file with a \"text\" field per line, or any other file with one prompt per line. " +
                          "Default: a few built-in arithmetic word problems.",
            HelpName = "FILE",
        };
        var exitLayers = new Option<string?>("--exit-layers")
        {
            Description = "Draft exit layers E to try, comma-separated (default: about 1/4, 1/2 and 3/4 of the layers).",
            HelpName = "E,E,...",
        };
        var numSpeculations = new Option<string>("--num-speculations")
        {
            Description = "Draft lengths K to try, comma-separated.",
            HelpName = "K,K,...",
            DefaultValueFactory = _ => "2,4,6",
        };
        var maxNewTokens = new Option<int>("--max-new-tokens", "-n")
        {
            HelpName = "N",
            Description = "Tokens to generate per prompt at most.",
            DefaultValueFactory = _ => 64,
        }.Check(n => n >= 1, "must be at least 1");
        var repeats = new Option<int>("--repeats")
        {
            HelpName = "R",
            Description = "Timed passes per setting, each right after a pass of the autoregressive baseline; the speed-up is the median " +
                          "of the pairs' ratios (steadier on a busy machine).",
            DefaultValueFactory = _ => 3,
        }.Check(n => n >= 1, "must be at least 1");
        var draftVocab = CommonOptions.DraftVocab();
        var draftConfidence = CommonOptions.DraftConfidence();
        var noPacked = CommonOptions.NoPackedWeights();
        var device = CommonOptions.Device();
        var dtype = CommonOptions.DType();
        var json = CommonOptions.Json("Print one JSON object as the last line: best_speedup, best_exit_layer, best_num_speculations, " +
                                      "baseline_tokens_per_second, all_identical and the whole sweep.");
        var command = new Command("bench-speculative",
            "Measure self-speculative decoding (LayerSkip): greedy decoding with every draft exit layer E and draft length K, against " +
            "autoregressive decoding in the same run. Prints tokens/s, speed-up and acceptance per setting and the best one, and checks " +
            "that every setting gives exactly the autoregressive tokens. Speed-ups need a model trained with LayerSkip's recipe " +
            "(layer dropout + early-exit loss); other models typically show 1x or less.")
        {
            model, adapter, promptsFile, exitLayers, numSpeculations, maxNewTokens, repeats, draftVocab, draftConfidence, noPacked, device, dtype, json,
        };
        command.SetAction((parse, cancellation) =>
        {
            var exits = parse.GetValue(exitLayers) is { } e ? CommonOptions.PositiveIntegers(e, "--exit-layers") : null;
            var ks = CommonOptions.PositiveIntegers(parse.GetRequiredValue(numSpeculations), "--num-speculations");
            var texts = parse.GetValue(promptsFile) is { } file ? SpeculativeSweep.ReadPrompts(file) : SpeculativeSweep.DefaultPrompts;
            var load = new LoadOptions
            {
                Device = Devices.Parse(parse.GetRequiredValue(device)),
                DType = parse.GetValue(dtype) is { } d ? Devices.ParseDType(d) : null,
            };
            bool asJson = parse.GetValue(json);
            using var textModel = TextModel.Load(parse.GetRequiredValue(model), load, parse.GetValue(adapter));
            int layers = textModel.Model.NumLayers;
            foreach (var exit in exits ?? [])
                if (exit > layers) throw new CliUsageException($"--exit-layers: {exit} is beyond the model's {layers} layers");
            var prompts = texts.Select(t => textModel.Tokenizer.Encode(t, addSpecialTokens: true)).ToArray();
            var options = new SpeculativeSweepOptions
            {
                ExitLayers = exits,
                NumSpeculations = ks,
                MaxNewTokens = parse.GetValue(maxNewTokens),
                StopTokenIds = textModel.GenerationStopTokenIds,
                Repeats = parse.GetValue(repeats),
                DraftVocabulary = CommonOptions.ReadDraftVocab(parse.GetValue(draftVocab), parse.GetRequiredValue(model)),
                DraftConfidenceThreshold = parse.GetValue(draftConfidence),
                PackVerificationWeights = !parse.GetValue(noPacked),
            };
            // Progress goes to stderr with --json (stdout's last line is the JSON), else to stdout above the table.
            var log = asJson ? context.Err : context.Out;
            log.WriteLine($"Sweeping {prompts.Length} prompts, {layers} layers, up to {options.MaxNewTokens} new tokens each (greedy, batch 1; " +
                          (options.DraftVocabulary is { } dv ? $"draft head over {dv.Count} tokens" : "draft head over the whole vocabulary") + ")...");
            log.Flush();
            var result = SpeculativeSweep.Run(textModel.Model, prompts, options, line =>
            {
                log.WriteLine("  " + line);
                log.Flush();
            }, cancellation);
            var best = result.Best;
            if (!result.AllIdentical)
                context.Err.WriteLine("warning: some settings did not reproduce the autoregressive tokens (a bug; please report it): " +
                                      string.Join("; ", result.Points.Where(p => !p.IdenticalOutput).Select(p => $"E={p.ExitLayer} K={p.NumSpeculations}")));
            if (asJson)
            {
                context.WriteJson(new JsonObject
                {
                    ["best_speedup"] = best is null ? null : Math.Round(best.Speedup, 3),
                    ["best_exit_layer"] = best?.ExitLayer,
                    ["best_num_speculations"] = best?.NumSpeculations,
                    ["baseline_tokens_per_second"] = Math.Round(result.BaselineTokensPerSecond, 2),
                    ["layers"] = result.Layers,
                    ["prompts"] = result.Prompts,
                    ["generated_tokens"] = result.GeneratedTokens,
                    ["all_identical"] = result.AllIdentical,
                    ["draft_vocab_size"] = options.DraftVocabulary?.Count,
                    ["draft_confidence"] = options.DraftConfidenceThreshold,
                    ["packed_weights"] = options.PackVerificationWeights,
                    ["sweep"] = new JsonArray(result.Points.Select(p => (JsonNode?)new JsonObject
                    {
                        ["exit_layer"] = p.ExitLayer,
                        ["num_speculations"] = p.NumSpeculations,
                        ["tokens_per_second"] = Math.Round(p.TokensPerSecond, 2),
                        ["speedup"] = Math.Round(p.Speedup, 3),
                        ["acceptance_rate"] = Math.Round(p.AcceptanceRate, 4),
                        ["tokens_per_round"] = Math.Round(p.TokensPerRound, 3),
                        ["identical"] = p.IdenticalOutput,
                    }).ToArray()),
                });
            }
            else
            {
                var table = new Table().Title($"self-speculative vs autoregressive ({Format.Number(result.BaselineTokensPerSecond, "0.#")} tok/s)")
                    .AddColumn(new TableColumn("E").RightAligned()).AddColumn(new TableColumn("K").RightAligned())
                    .AddColumn(new TableColumn("tok/s").RightAligned()).AddColumn(new TableColumn("speed-up").RightAligned())
                    .AddColumn(new TableColumn("acceptance").RightAligned()).AddColumn(new TableColumn("tokens/round").RightAligned())
                    .AddColumn("identical");
                foreach (var p in result.Points)
                    table.AddRow(p.ExitLayer.ToString(CultureInfo.InvariantCulture), p.NumSpeculations.ToString(CultureInfo.InvariantCulture),
                        Format.Number(p.TokensPerSecond, "0.#"), Format.Number(p.Speedup, "0.00") + "x", Format.Number(100 * p.AcceptanceRate, "0") + "%",
                        Format.Number(p.TokensPerRound, "0.00"), p.IdenticalOutput ? "yes" : "NO");
                context.Console.Write(table);
                context.Out.WriteLine(best is null
                    ? "No setting reproduced the autoregressive output."
                    : $"Best: --exit-layer {best.ExitLayer} --num-speculations {best.NumSpeculations}: {Format.Number(best.Speedup, "0.00")}x " +
                      $"({Format.Number(best.TokensPerSecond, "0.#")} tok/s, acceptance {Format.Number(100 * best.AcceptanceRate, "0")}%)");
            }
            return Task.FromResult(result.AllIdentical ? CliApp.Success : CliApp.Failure);
        });
        return command;
    }

}

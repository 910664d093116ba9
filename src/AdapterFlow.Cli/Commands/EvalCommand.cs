using System.CommandLine;
using System.Text;
using AdapterFlow.Data;
using AdapterFlow.Evaluation;
using AdapterFlow.Models;
using Spectre.Console;

namespace AdapterFlow.Cli.Commands;

/// <summary><c>adapterflow eval</c>: LLM-Adapters' math benchmarks, or perplexity of a text file.</summary>
internal static class EvalCommand
{
    public static Command Create(CliContext context)
    {
        var model = CommonOptions.ModelDir("The model folder (config.json, model.safetensors and tokenizer.json).");
        var adapter = CommonOptions.Adapter();
        var dataset = new Option<string?>("--dataset", "-d")
        {
            Description = $"A math set by name ({string.Join(", ", MathDataset.StandardNames)}), 'all' for the seven, " +
                          "or a JSON file of {instruction, input, output, answer} records.",
            HelpName = "NAME|FILE|all",
        };
        var dataDir = new Option<string?>("--data-dir")
        {
            Description = "Folder holding <name>/test.json for each set (default: ../shared/data/math beside the repository).",
            HelpName = "DIR",
        };
        var limit = new Option<int?>("--limit")
        {
            Description = "Evaluate only the first N items of each set.",
            HelpName = "N",
        }.Check(n => n is null or >= 1, "must be at least 1");
        var batchSize = new Option<int>("--batch-size", "-b")
        {
            Description = "Prompts generated together (left-padded, one KV cache).",
            DefaultValueFactory = _ => 8,
            HelpName = "B",
        }.Check(b => b >= 1, "must be at least 1");
        var maxNewTokens = new Option<int>("--max-new-tokens", "-n")
        {
            Description = "Longest response in tokens (LLM-Adapters: 256).",
            DefaultValueFactory = _ => 256,
            HelpName = "N",
        }.Check(n => n >= 1, "must be at least 1");
        var numBeams = new Option<int>("--num-beams")
        {
            Description = "1 = greedy (default); more = beam search (LLM-Adapters uses 4; slower, no early stop at '### Instruction').",
            DefaultValueFactory = _ => 1,
            HelpName = "K",
        }.Check(k => k >= 1, "must be at least 1");
        var aquaScoring = new Option<string>("--aqua-scoring")
        {
            Description = "How AQuA's letter is read: strict (the letter after 'The answer is', else the last option letter) " +
                          "or llm-adapters (the first capital A-E anywhere, as LLM-Adapters does).",
            DefaultValueFactory = _ => "strict",
            HelpName = "strict|llm-adapters",
        }.AcceptOnlyFromAmong("strict", "llm-adapters");
        var output = new Option<string?>("--out", "-o")
        {
            Description = "Write one JSON line per item (dataset, index, prompt, generation, response, extracted, label, correct).",
            HelpName = "FILE.jsonl",
        };
        var perplexity = new Option<string?>("--perplexity")
        {
            Description = "Instead of a math set: the perplexity of this text file (sliding window).",
            HelpName = "FILE",
        };
        var maxLength = new Option<int?>("--max-length")
        {
            Description = "Perplexity: tokens per window (default: the model's context length).",
            HelpName = "N",
        }.Check(n => n is null or >= 2, "must be at least 2");
        var stride = new Option<int?>("--stride")
        {
            Description = "Perplexity: tokens between window starts (default: half the window; = window for disjoint chunks).",
            HelpName = "N",
        }.Check(n => n is null or >= 1, "must be at least 1");
        var device = CommonOptions.Device();
        var dtype = CommonOptions.DType();
        var json = CommonOptions.Json("Print one JSON object as the last line: per set n, correct, accuracy, 95% interval, and the scoring used (or the perplexity).");
        var command = new Command("eval",
            "Evaluate a model on LLM-Adapters' math word problems (scored exactly as LLM-Adapters does) or the perplexity of a text.")
        {
            model, adapter, dataset, dataDir, limit, batchSize, maxNewTokens, numBeams, aquaScoring, output,
            perplexity, maxLength, stride, device, dtype, json,
        };
        command.SetAction((parse, cancellation) =>
        {
            var adapterDir = parse.GetValue(adapter);
            var textFile = parse.GetValue(perplexity);
            var datasetName = parse.GetValue(dataset);
            if (textFile is null == datasetName is null)
                throw new CliUsageException("give either --dataset NAME|FILE|all or --perplexity FILE");
            var load = new LoadOptions
            {
                Device = Devices.Parse(parse.GetRequiredValue(device)),
                DType = parse.GetValue(dtype) is { } d ? Devices.ParseDType(d) : null,
            };
            bool asJson = parse.GetValue(json);
            if (textFile is not null)
            {
                if (!File.Exists(textFile)) throw new FileNotFoundException($"{textFile}: text file not found (--perplexity)");
                var options = new PerplexityOptions { MaxLength = parse.GetValue(maxLength), Stride = parse.GetValue(stride) };
                var text = File.ReadAllText(textFile);
                using var lm = TextModel.Load(parse.GetRequiredValue(model), load, adapterDir);
                var result = WithProgress(context, !asJson, $"perplexity of {Path.GetFileName(textFile)}", 1,
                    task => Perplexity.OfText(lm.Model, lm.Tokenizer, text, options, (done, total) =>
                    {
                        task.MaxValue = total;
                        task.Value = done;
                    }, cancellation));
                if (asJson)
                {
                    var node = result.ToJson();
                    node["model"] = lm.Path;
                    if (adapterDir is not null) node["adapter"] = adapterDir;
                    node["file"] = textFile;
                    context.WriteJson(node);
                }
                else
                {
                    context.Out.WriteLine(
                        $"perplexity {Format.Number(result.Value, "0.###")} (mean NLL {Format.Number(result.MeanNll, "0.####")} nats) over {result.ScoredTokens} of {result.TotalTokens} tokens; " +
                        $"{result.Windows} windows of {result.MaxLength} tokens, stride {result.Stride}; {Format.Number(result.Elapsed.TotalSeconds)} s");
                }
                return Task.FromResult(CliApp.Success);
            }

            var names = string.Equals(datasetName, "all", StringComparison.OrdinalIgnoreCase) ? MathDataset.StandardNames : [datasetName!];
            int? take = parse.GetValue(limit);
            // Read every set before loading the model: a missing one should fail at once.
            var sets = names.Select(n => MathDataset.Resolve(n, parse.GetValue(dataDir)).Take(take)).ToArray();
            var evalOptions = new MathEvalOptions
            {
                BatchSize = parse.GetValue(batchSize),
                MaxNewTokens = parse.GetValue(maxNewTokens),
                NumBeams = parse.GetValue(numBeams),
                AquaScoring = AnswerExtractor.ParseScoring(parse.GetRequiredValue(aquaScoring)),
            };
            using var textModel = TextModel.Load(parse.GetRequiredValue(model), load, adapterDir);
            var evaluator = new MathEvaluator(textModel.Model, textModel.Tokenizer, evalOptions);
            using var jsonl = parse.GetValue(output) is { } outPath ? new StreamWriter(outPath, append: false, new UTF8Encoding(false)) : null;
            var results = new List<MathEvalResult>();
            foreach (var set in sets)
            {
                var result = WithProgress(context, !asJson, $"{set.Name} ({set.Items.Count} items)", set.Items.Count, task =>
                    evaluator.Evaluate(set, item =>
                    {
                        // Flushed per item: Ctrl-C leaves the process a short grace period, and every scored item must be on disk.
                        jsonl?.WriteLine(item.ToJson().ToJsonString(CliContext.ReadableJson));
                        jsonl?.Flush();
                        task.Increment(1);
                    }, cancellation));
                results.Add(result);
                // Plain text (not Spectre markup): a console width must not wrap this line.
                if (!asJson) context.Out.WriteLine(SummaryLine(result));
                // Ctrl-C: the partial set is reported like a finished one, the sets after it are not started.
                if (result.Interrupted) break;
            }
            var summary = new MathEvalSummary(results, evalOptions.AquaScoring, take);
            if (asJson)
            {
                var node = summary.ToJson();
                node["model"] = textModel.Path;
                if (adapterDir is not null) node["adapter"] = adapterDir;
                node["num_beams"] = evalOptions.NumBeams;
                node["max_new_tokens"] = evalOptions.MaxNewTokens;
                context.WriteJson(node);
            }
            else if (results.Count > 1)
            {
                var table = new Table().Title("accuracy (%)" + (take is int l ? $", first {l} items of each set" : ""));
                foreach (var r in results) table.AddColumn(new TableColumn(Markup.Escape(r.Dataset)).RightAligned());
                table.AddColumn(new TableColumn("Avg").RightAligned());
                table.AddRow([.. results.Select(r => MathEvalSummary.Percent(r.Accuracy.Value)), MathEvalSummary.Percent(summary.Average)]);
                context.Console.Write(table);
                context.Out.WriteLine($"AQuA scoring: {AnswerExtractor.Name(evalOptions.AquaScoring)}; numbers: last number, within 0.001 (LLM-Adapters)");
            }
            if (summary.Interrupted)
            {
                context.Err.WriteLine($"interrupted: {results.Sum(r => r.Accuracy.Total)} items scored in {results.Count} of {sets.Length} sets" +
                                        (parse.GetValue(output) is { } written ? $"; their results are in {written}" : ""));
                return Task.FromResult(CliApp.Interrupted);
            }
            return Task.FromResult(CliApp.Success);
        });
        return command;
    }

    private static string SummaryLine(MathEvalResult r)
    {
        var (low, high) = r.Accuracy.Interval95;
        return $"{r.Dataset}: " + (r.Interrupted ? $"INTERRUPTED after {r.Accuracy.Total} of {r.Requested} items: " : "") + $"{r.Accuracy.Correct}/{r.Accuracy.Total} correct = {MathEvalSummary.Percent(r.Accuracy.Value)}% " +
               $"(95% CI {MathEvalSummary.Percent(low)}-{MathEvalSummary.Percent(high)}%), scoring {r.Scoring}; " +
               $"{r.GeneratedTokens} tokens in {Format.Number(r.Elapsed.TotalSeconds)} s";
    }

    /// <summary>Runs <paramref name="work"/> under a Spectre progress bar when stdout is an interactive terminal; plainly otherwise.</summary>
    private static T WithProgress<T>(CliContext context, bool show, string title, int total, Func<IProgressTask, T> work)
    {
        if (!show || !context.Console.Profile.Capabilities.Interactive) return work(new NoProgress());
        return context.Console.Progress()
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn(), new RemainingTimeColumn())
            .Start(ctx =>
            {
                var task = ctx.AddTask(Markup.Escape(title), maxValue: total);
                return work(new SpectreProgress(task));
            });
    }

    /// <summary>What the work reports progress to.</summary>
    private interface IProgressTask
    {
        double MaxValue { set; }
        double Value { set; }
        void Increment(double by);
    }

    private sealed class SpectreProgress(ProgressTask task) : IProgressTask
    {
        public double MaxValue { set => task.MaxValue = value; }
        public double Value { set => task.Value = value; }
        public void Increment(double by) => task.Increment(by);
    }

    private sealed class NoProgress : IProgressTask
    {
        public double MaxValue { set { } }
        public double Value { set { } }
        public void Increment(double by) { }
    }
}

using System.CommandLine;
using AdapterFlow.Evaluation;
using Spectre.Console;

namespace AdapterFlow.Cli.Commands;

/// <summary><c>adapterflow quickstart</c>: the whole story on a built-in default (all of it is <see cref="Quickstart.Run"/>).</summary>
internal static class QuickstartCommand
{
    public static Command Create(CliContext context)
    {
        var defaults = new QuickstartOptions();
        var output = new Option<string?>("--out", "-o")
        {
            Description = "Keep what the quickstart makes here: base/ (the pretrained model, Hugging Face layout), adapter/ (PEFT layout), " +
                          "merged/ (Hugging Face layout) and data/ (the generated problems). Default: a temporary folder, deleted at the end.",
            HelpName = "DIR",
        };
        var seed = new Option<int>("--seed")
        {
            Description = "Seeds the problems, weights, data order and adapter: the same seed gives the same run.",
            DefaultValueFactory = _ => defaults.Seed,
            HelpName = "N",
        };
        var pretrainSteps = Positive("--pretrain-steps", defaults.PretrainSteps,
            $"Optimizer steps of pretraining from scratch on addition/subtraction (batch {defaults.BatchSize}). Fewer: faster, and a weaker base model.");
        var finetuneSteps = Positive("--finetune-steps", defaults.FinetuneSteps,
            "Optimizer steps of LoRA fine-tuning on multiplication. Fewer: faster, and a lower accuracy after.");
        var pretrainProblems = Positive("--pretrain-problems", defaults.PretrainProblems, "Generated addition/subtraction problems to pretrain on.");
        var finetuneProblems = Positive("--finetune-problems", defaults.FinetuneProblems, "Generated multiplication problems to fine-tune on.");
        var evalProblems = Positive("--eval-problems", defaults.EvalProblems,
            "Held-out problems of each kind scored before and after fine-tuning (never trained on).");
        var layers = Positive("--layers", defaults.Layers, "Decoder layers of the model.");
        var hidden = Positive("--hidden-size", defaults.HiddenSize, "Width of the model (a multiple of 8: 4 attention heads of even size).");
        var noLayerSkip = new Option<bool>("--no-layerskip")
        {
            Description = "Pretrain without LayerSkip's layer dropout and early-exit loss (by default they are on, so that " +
                          "early-exit and self-speculative decoding work on the model).",
        };
        var device = CommonOptions.Device();
        var json = CommonOptions.Json("Print the steps as they finish, then as the last line one JSON object: accuracy_before, accuracy_after, " +
                                      "seconds, losses, parameter counts, paths.");
        var command = new Command("quickstart",
            "The whole story, no download: create a small LLaMA-family model and tokenizer, pretrain it from scratch on generated " +
            "addition/subtraction word problems, score it on held-out multiplication problems (LLM-Adapters' scoring), fine-tune a LoRA " +
            "adapter on multiplication, score again, merge the adapter and generate. A few minutes on a 2-core laptop.")
        {
            output, seed, pretrainSteps, finetuneSteps, pretrainProblems, finetuneProblems, evalProblems, layers, hidden, noLayerSkip, device, json,
        };
        command.SetAction((parse, cancellation) =>
        {
            var options = defaults with
            {
                Directory = parse.GetValue(output),
                Seed = parse.GetValue(seed),
                PretrainSteps = parse.GetValue(pretrainSteps),
                FinetuneSteps = parse.GetValue(finetuneSteps),
                PretrainProblems = parse.GetValue(pretrainProblems),
                FinetuneProblems = parse.GetValue(finetuneProblems),
                EvalProblems = parse.GetValue(evalProblems),
                Layers = parse.GetValue(layers),
                HiddenSize = parse.GetValue(hidden),
                LayerSkip = !parse.GetValue(noLayerSkip),
                Device = Devices.Parse(parse.GetRequiredValue(device)),
            };
            options.Validate();
            bool asJson = parse.GetValue(json);
            var console = context.Console;
            if (!asJson)
                console.MarkupLine("[bold]AdapterFlow quickstart[/]: pretrain a small LLaMA on addition and subtraction, teach it multiplication with LoRA.");
            void PrintStep(QuickstartStep step)
            {
                // JSON mode keeps stdout for the one object at the end... but a plain line per step still helps a log reader.
                if (asJson) return;
                console.MarkupLine($"[green]{step.Number}.[/] [bold]{Markup.Escape(step.Title)}[/] [grey]({Format.Number(step.Elapsed.TotalSeconds)} s)[/]\n   {Markup.Escape(step.Detail)}");
            }
            QuickstartResult result;
            if (!asJson && console.Profile.Capabilities.Interactive)
            {
                result = console.Progress()
                    .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn(), new RemainingTimeColumn())
                    .Start(progress =>
                    {
                        ProgressTask? task = null;
                        return Quickstart.Run(options, e =>
                        {
                            switch (e)
                            {
                                case QuickstartStageStarted { Total: > 0 } started:
                                    task = progress.AddTask(Markup.Escape(started.Title), maxValue: started.Total);
                                    break;
                                case QuickstartProgress p when task is not null:
                                    task.Value = p.Done;
                                    task.Description = Markup.Escape(p.Loss is double loss ? $"{p.Title}  step {p.Done}/{p.Total}  loss {loss:F3}" : $"{p.Title}  {p.Done}/{p.Total}");
                                    break;
                                case QuickstartStep step:
                                    if (task is not null)
                                    {
                                        task.Value = task.MaxValue;
                                        task.StopTask();
                                        task = null;
                                    }
                                    PrintStep(step);
                                    break;
                            }
                        }, cancellation);
                    });
            }
            else
            {
                result = Quickstart.Run(options, e =>
                {
                    if (e is QuickstartStep step) PrintStep(step);
                }, cancellation);
            }
            if (asJson)
            {
                context.WriteJson(result.ToJson());
                return Task.FromResult(CliApp.Success);
            }
            console.Write(SummaryTable(result));
            if (result.Directory is { } dir)
            {
                console.MarkupLine(Markup.Escape($"Next: adapterflow eval --model {Path.Combine(dir, "merged")} --dataset {Path.Combine(dir, "data", "multiplication-test.json")}") + "\n" +
                                   Markup.Escape($"      adapterflow generate --model {Path.Combine(dir, "base")} --adapter {Path.Combine(dir, "adapter")} --prompt \"...\""));
            }
            return Task.FromResult(CliApp.Success);
        });
        return command;
    }

    private static Option<int> Positive(string name, int defaultValue, string description) => new Option<int>(name)
    {
        Description = description,
        DefaultValueFactory = _ => defaultValue,
        HelpName = "N",
    }.Check(n => n >= 1, "must be at least 1");

    private static Table SummaryTable(QuickstartResult r)
    {
        static string Score(Accuracy a) => $"{a.Correct}/{a.Total} = {MathEvalSummary.Percent(a.Value)}%";
        var table = new Table().Title("quickstart summary").AddColumn("").AddColumn(new TableColumn("before LoRA").RightAligned()).AddColumn(new TableColumn("after LoRA").RightAligned());
        table.AddRow(Markup.Escape($"held-out {r.NewSkill} (new skill)"), Score(r.AccuracyBefore), $"[bold]{Score(r.AccuracyAfter)}[/]");
        table.AddRow(Markup.Escape($"held-out {r.PretrainedSkill} (pretrained)"), Score(r.PretrainedSkillBefore), Score(r.PretrainedSkillAfter));
        table.AddEmptyRow();
        table.AddRow("model", Markup.Escape($"{r.Architecture}, {Format.Count(r.Parameters)} parameters"), Markup.Escape($"LoRA: {Format.Count(r.AdapterParameters)} trainable"));
        table.AddRow("training loss", Markup.Escape($"{r.Pretraining.FirstLoss:0.###} → {r.Pretraining.FinalLoss:0.###} ({r.Pretraining.Steps} steps)"),
            Markup.Escape($"{r.Finetuning.FirstLoss:0.###} → {r.Finetuning.FinalLoss:0.###} ({r.Finetuning.Steps} steps)"));
        table.AddRow("training time", $"{Format.Number(r.Pretraining.Elapsed.TotalSeconds)} s", $"{Format.Number(r.Finetuning.Elapsed.TotalSeconds)} s");
        table.AddEmptyRow();
        table.AddRow("question", Markup.Escape(r.SampleQuestion), "");
        table.AddRow("merged model", Markup.Escape(r.SampleResponse), Markup.Escape($"label {r.SampleLabel}"));
        table.AddRow("total time", $"{Format.Number(r.Total.TotalSeconds)} s", "");
        return table;
    }
}

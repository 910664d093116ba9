using System.CommandLine;
using System.Diagnostics;
using System.Text.Json.Nodes;
using AdapterFlow.Adapters;
using AdapterFlow.Data;
using AdapterFlow.Models;
using AdapterFlow.Training;
using Spectre.Console;

namespace AdapterFlow.Cli.Commands;

/// <summary>
/// <c>adapterflow train</c>: supervised fine-tuning of a whole model or an adapter on instruction data, over the
/// library's <see cref="Trainer"/>. Settings come from an optional recipe file overlaid by the flags.
/// </summary>
internal static class TrainCommand
{
    public static Command Create(CliContext context)
    {
        var model = CommonOptions.ModelDir("The base model folder (config.json + model.safetensors + tokenizer.json).");
        var data = new Option<string>("--data")
        {
            Description = "Training data, a JSON array (.json) or JSON Lines (.jsonl): {instruction, input?, output} or {messages: [{role, content}]} for sft, "
                + "{prompt, chosen, rejected} for dpo, {text} records or a .txt file for pretrain.",
            Required = true,
            HelpName = "FILE",
        };
        var method = new Option<string?>("--method")
        {
            Description = "What to train: the whole model or one adapter kind (required unless the recipe sets it).",
            HelpName = string.Join("|", TrainRecipe.Methods),
        }.AcceptOnlyFromAmong([.. TrainRecipe.Methods]);
        var output = new Option<string>("--out", "-o")
        {
            Description = "Output folder: the adapter (PEFT format) or full model, tokenizer files, metrics.jsonl, loss.png, checkpoints.",
            Required = true,
            HelpName = "DIR",
        };
        var config = new Option<string?>("--config")
        {
            Description = "A recipe file (.yaml/.yml/.json) whose snake_case keys are these options; flags override it.",
            HelpName = "RECIPE",
        };
        var epochs = new Option<int?>("--epochs") { Description = "Passes over the data (default 1)." }.Check(v => v is null or >= 1, "must be at least 1");
        var learningRate = new Option<double?>("--learning-rate") { Description = "Peak learning rate (default 3e-4).", HelpName = "LR" }
            .Check(v => v is null or > 0, "must be positive");
        var batchSize = new Option<int?>("--batch-size") { Description = "Examples per optimizer step (default 8).", HelpName = "B" }
            .Check(v => v is null or >= 1, "must be at least 1");
        var microBatchSize = new Option<int?>("--micro-batch-size") { Description = "Examples per forward pass; gradients accumulate up to --batch-size (default: the largest divisor of the batch size up to 8).", HelpName = "M" }
            .Check(v => v is null or >= 1, "must be at least 1");
        var cutoff = new Option<int?>("--cutoff-len") { Description = "Truncate examples to this many tokens (default 256).", HelpName = "N" }
            .Check(v => v is null or >= 1, "must be at least 1");
        var warmup = new Option<int?>("--warmup-steps") { Description = "Linear warmup steps (default 0).", HelpName = "N" }
            .Check(v => v is null or >= 0, "must not be negative");
        var scheduler = new Option<string?>("--lr-scheduler") { Description = "Learning-rate schedule after warmup (default linear).", HelpName = "constant|linear|cosine" }
            .AcceptOnlyFromAmong("constant", "linear", "cosine");
        var loraR = new Option<int?>("--lora-r") { Description = "LoRA rank (default 8).", HelpName = "R" }.Check(v => v is null or >= 1, "must be at least 1");
        var loraAlpha = new Option<double?>("--lora-alpha") { Description = "LoRA alpha; the update is scaled by alpha/r (default 16).", HelpName = "A" }
            .Check(v => v is null or > 0, "must be positive");
        var loraDropout = new Option<double?>("--lora-dropout") { Description = "Dropout on the LoRA input (default 0.05).", HelpName = "D" }
            .Check(v => v is null or (>= 0 and < 1), "must be in [0, 1)");
        var targets = new Option<string?>("--target-modules") { Description = "Comma-separated module names to adapt (default: the method's defaults for the architecture).", HelpName = "a,b,c" };
        var trainOnInputs = new Option<bool>("--train-on-inputs") { Description = "Also train on the prompt tokens (default: only the response is learned)." };
        var seed = new Option<long?>("--seed") { Description = "Seed for data order, dropout and initialisation (default 42).", HelpName = "S" };
        var saveSteps = new Option<int?>("--save-steps") { Description = "Write a resumable checkpoint-{step} folder every N steps and at the end.", HelpName = "N" }
            .Check(v => v is null or >= 1, "must be at least 1");
        var saveTotalLimit = new Option<int?>("--save-total-limit")
        {
            Description = "Keep only the newest N checkpoint folders (and the best evaluated one); older ones are deleted after each save. Default: keep all.",
            HelpName = "N",
        }.Check(v => v is null or >= 1, "must be at least 1");
        var resume = new Option<bool>("--resume") { Description = "Continue from the latest checkpoint-{step} folder in --out." };
        var maxSteps = new Option<int?>("--max-steps") { Description = "Stop after N optimizer steps (overrides --epochs).", HelpName = "N" }
            .Check(v => v is null or >= 1, "must be at least 1");
        var objective = new Option<string?>("--objective")
        {
            Description = "What is learned: sft (instruction or chat data; only the responses carry loss), pretrain (text packed into "
                + "--cutoff-len blocks; continued pretraining with --rewarm-steps) or dpo (preference pairs; the reference is the base model "
                + "with the adapter disabled, or precomputed once for --method full). Default sft.",
            HelpName = string.Join("|", TrainRecipe.Objectives),
        }.AcceptOnlyFromAmong([.. TrainRecipe.Objectives]);
        var chatTemplate = new Option<string?>("--chat-template")
        {
            Description = $"Chat format for chat and preference data (and instruction data other than Alpaca): a built-in name ({string.Join(", ", ChatTemplate.BuiltInNames)}) "
                + "or a template file (.json/.yaml). Default: the model's tokenizer_config.json chat_template when it is a known format; alpaca for instruction data.",
            HelpName = "NAME|FILE",
        };
        var beta = new Option<double?>("--beta") { Description = "DPO: β, how far the policy may move from the reference (default 0.1).", HelpName = "B" }
            .Check(v => v is null or > 0, "must be positive");
        var labelSmoothing = new Option<double?>("--label-smoothing") { Description = "DPO: probability that a preference label is wrong (conservative DPO; default 0).", HelpName = "E" }
            .Check(v => v is null or (>= 0 and < 0.5), "must be in [0, 0.5)");
        var evalData = new Option<string?>("--eval-data") { Description = "Held-out data file (same shape as --data), evaluated every --eval-every steps; the best model/adapter is kept in OUT/best.", HelpName = "FILE" };
        var evalSplit = new Option<double?>("--eval-split") { Description = "Hold out this fraction of --data (seeded by --seed) instead of --eval-data.", HelpName = "FRACTION" }
            .Check(v => v is null or (> 0 and < 1), "must be in (0, 1)");
        var evalEvery = new Option<int?>("--eval-every") { Description = "Evaluate every N optimizer steps and after the last (default: ten times per run).", HelpName = "N" }
            .Check(v => v is null or >= 1, "must be at least 1");
        var rewarm = new Option<int?>("--rewarm-steps") { Description = "Continued pretraining: warm the learning rate up again over N steps from --min-learning-rate to the peak, then decay back to it.", HelpName = "N" }
            .Check(v => v is null or >= 1, "must be at least 1");
        var minLearningRate = new Option<double?>("--min-learning-rate") { Description = "Where the linear/cosine decay ends and re-warming starts (default 0; a tenth of the peak with --rewarm-steps).", HelpName = "LR" }
            .Check(v => v is null or >= 0, "must not be negative");
        var badRecords = new Option<string?>("--bad-records") { Description = "A bad data record (missing field, wrong role or type, empty output): fail (default) stops with file:line; skip skips it and lists it.", HelpName = "fail|skip" }
            .AcceptOnlyFromAmong("fail", "skip");
        var layerDropout = new Option<double?>("--layer-dropout")
        {
            Description = "LayerSkip layer dropout: each example skips layer l with probability S(t)·D(l)·P; P is the rate of the last layer (default 0: off).",
            HelpName = "P",
        }.Check(v => v is null or (>= 0 and < 1), "must be in [0, 1)");
        var layerDropoutScale = new Option<string?>("--layer-dropout-scale")
        {
            Description = "Layer dropout over depth, D(l): exp = e^(l·ln2/(L−1)) − 1, 0 at the first layer and 1 at the last (default); linear = l/(L−1); uniform = 1.",
            HelpName = "exp|linear|uniform",
        }.AcceptOnlyFromAmong("exp", "linear", "uniform");
        var layerDropoutCurriculum = new Option<string?>("--layer-dropout-curriculum")
        {
            Description = "Layer dropout over training, S(t): none = 1 (fine-tuning, default); exp = e^(t·ln2/T) − 1, from 0 to 1 over the T steps (pretraining from scratch).",
            HelpName = "none|exp",
        }.AcceptOnlyFromAmong("none", "exp");
        var earlyExitLoss = new Option<bool>("--early-exit-loss")
        {
            Description = "LayerSkip early-exit loss: every layer's output goes through the final norm and LM head and the loss is the weighted sum over layers (the reported loss stays the last layer's).",
        };
        var earlyExitScale = new Option<string?>("--early-exit-scale")
        {
            Description = "Weight of layer l's loss before normalising: uniform = 1, linear = l+1, sum = 1+2+…+(l+1) (default), sqrt = √(l+1), inv = 1/(l+1), inv-sqrt = 1/√(l+1).",
            HelpName = "uniform|linear|sum|sqrt|inv|inv-sqrt",
        }.AcceptOnlyFromAmong("uniform", "linear", "sum", "sqrt", "inv", "inv-sqrt");
        var earlyExitCurriculum = new Option<string?>("--early-exit-curriculum")
        {
            Description = "Which exits are trained per step (the last always is): none = all (default); rotational = every R-th layer, shifting by one each step; gradual = switched on from the last layer down, all by mid-training.",
            HelpName = "none|rotational|gradual",
        }.AcceptOnlyFromAmong("none", "rotational", "gradual");
        var earlyExitRotation = new Option<int?>("--early-exit-rotation")
        {
            Description = "R of the rotational curriculum: layer l is trained at step t when (l + t) mod R = 0 (default 4).",
            HelpName = "R",
        }.Check(v => v is null or >= 1, "must be at least 1");
        var earlyExitLayerScale = new Option<double?>("--early-exit-layer-scale")
        {
            Description = "Factor on every early layer's weight before normalising (LayerSkip's e_scale, default 1); below 1 the last layer keeps more weight.",
            HelpName = "E",
        }.Check(v => v is null or > 0, "must be positive");
        var earlyExitDistillation = new Option<double?>("--early-exit-distillation")
        {
            Description = "α in [0, 1]: train each early exit on (1 − α)·cross-entropy + α·KL divergence from the last layer's (detached) " +
                          "next-token distribution, so the exits learn to agree with the last layer, which is what self-speculative " +
                          "decoding accepts (default 0, the paper's loss).",
            HelpName = "A",
        }.Check(v => v is null or (>= 0 and <= 1), "must be between 0 and 1");
        var earlyExitLayers = new Option<string?>("--early-exit-layers")
        {
            Description = "Train only these exits (and the last layer), as exit layers counted from 1 like --exit-layer, e.g. 2,3: the exit " +
                          "self-speculative decoding drafts from then gets every step's gradient (default: every layer).",
            HelpName = "E,E,...",
        };
        var precision = new Option<string?>("--precision")
        {
            Description = "Number formats of the run (default fp32). fp32: everything in float32. bf16-mixed: forward and backward in " +
                          "bfloat16 (the whole model is held in bfloat16; faster where the CPU has bfloat16 matrix units), float32 master " +
                          "weights, gradients and AdamW state; the result is saved in float32. bf16: weights, gradients and AdamW state all " +
                          "in bfloat16 (least memory, small updates can be lost); the result is saved in bfloat16.",
            HelpName = string.Join("|", TrainingPrecisionNames.All),
        }.AcceptOnlyFromAmong([.. TrainingPrecisionNames.All]);
        var device = CommonOptions.Device();
        var json = CommonOptions.Json("Print one JSON object last: final_loss, steps, tokens_per_second, seconds, output.");

        var command = new Command("train", "Fine-tune a model or train an adapter (LoRA, IA3, prefix, prompt, bottleneck) on instruction data.")
        {
            model, data, method, output, config, epochs, learningRate, batchSize, microBatchSize, cutoff, warmup, scheduler,
            loraR, loraAlpha, loraDropout, targets, trainOnInputs, seed, saveSteps, saveTotalLimit, resume, maxSteps, objective, chatTemplate, beta, labelSmoothing,
            evalData, evalSplit, evalEvery, rewarm, minLearningRate, badRecords,
            layerDropout, layerDropoutScale, layerDropoutCurriculum, earlyExitLoss, earlyExitScale, earlyExitCurriculum, earlyExitRotation, earlyExitLayerScale, earlyExitDistillation, earlyExitLayers,
            precision, device, json,
        };
        command.SetAction(parse =>
        {
            var flags = new TrainRecipe
            {
                Method = parse.GetValue(method),
                Epochs = parse.GetValue(epochs),
                LearningRate = parse.GetValue(learningRate),
                BatchSize = parse.GetValue(batchSize),
                MicroBatchSize = parse.GetValue(microBatchSize),
                CutoffLen = parse.GetValue(cutoff),
                WarmupSteps = parse.GetValue(warmup),
                LrScheduler = parse.GetValue(scheduler),
                LoraR = parse.GetValue(loraR),
                LoraAlpha = parse.GetValue(loraAlpha),
                LoraDropout = parse.GetValue(loraDropout),
                TargetModules = parse.GetValue(targets)?.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries),
                TrainOnInputs = parse.GetValue(trainOnInputs) ? true : null,
                Seed = parse.GetValue(seed),
                SaveSteps = parse.GetValue(saveSteps),
                SaveTotalLimit = parse.GetValue(saveTotalLimit),
                MaxSteps = parse.GetValue(maxSteps),
                Objective = parse.GetValue(objective),
                ChatTemplate = parse.GetValue(chatTemplate),
                Beta = parse.GetValue(beta),
                LabelSmoothing = parse.GetValue(labelSmoothing),
                EvalData = parse.GetValue(evalData),
                EvalSplit = parse.GetValue(evalSplit),
                EvalEvery = parse.GetValue(evalEvery),
                RewarmSteps = parse.GetValue(rewarm),
                MinLearningRate = parse.GetValue(minLearningRate),
                BadRecords = parse.GetValue(badRecords),
                LayerDropout = parse.GetValue(layerDropout),
                LayerDropoutScale = parse.GetValue(layerDropoutScale),
                LayerDropoutCurriculum = parse.GetValue(layerDropoutCurriculum),
                EarlyExitLoss = parse.GetValue(earlyExitLoss) ? true : null,
                EarlyExitScale = parse.GetValue(earlyExitScale),
                EarlyExitCurriculum = parse.GetValue(earlyExitCurriculum),
                EarlyExitRotation = parse.GetValue(earlyExitRotation),
                EarlyExitLayerScale = parse.GetValue(earlyExitLayerScale),
                EarlyExitDistillation = parse.GetValue(earlyExitDistillation),
                EarlyExitLayers = parse.GetValue(earlyExitLayers) is { } exitList ? CommonOptions.PositiveIntegers(exitList, "--early-exit-layers") : null,
                Precision = parse.GetValue(precision),
            };
            var recipe = parse.GetValue(config) is { } recipePath ? TrainRecipe.Load(recipePath).OverlaidBy(flags) : flags;
            recipe.Validate(parse.GetValue(config) is null ? "options" : $"{parse.GetValue(config)} with the options");
            if (recipe.Method is null) throw new CliUsageException($"--method is required (one of {string.Join(", ", TrainRecipe.Methods)}) unless the recipe sets 'method'");
            return Run(context, recipe, parse.GetRequiredValue(model), parse.GetRequiredValue(data), parse.GetRequiredValue(output),
                parse.GetValue(resume), parse.GetValue(json), new LoadOptions { Device = Devices.Parse(parse.GetRequiredValue(device)) });
        });
        return command;
    }

    private static int Run(CliContext context, TrainRecipe recipe, string modelDir, string dataPath, string outDir, bool resume, bool json, LoadOptions load)
    {
        // Cheap checks first: the data, template and recipe should fail before the weights are read.
        string objective = recipe.Objective ?? "sft";
        var policy = recipe.ToBadRecordPolicy();
        var trainRecords = TrainingRecords.Load(dataPath, objective, policy);
        var evalRecords = recipe.EvalData is { } evalPath ? TrainingRecords.Load(evalPath, objective, policy) : null;
        var explicitTemplate = recipe.ChatTemplate is { } templateName ? ChatTemplate.Resolve(templateName) : null;
        var peftConfig = recipe.ToPeftConfig();
        var options = recipe.ToTrainerOptions(outDir);
        var dpoOptions = objective == "dpo" ? recipe.ToDpoOptions() : null;
        string? checkpoint = resume ? LatestCheckpoint(outDir) : null;
        if (Path.GetFullPath(outDir).TrimEnd('/', '\\') == Path.GetFullPath(modelDir).TrimEnd('/', '\\'))
            throw new ArgumentException($"{outDir}: the output folder must differ from the model folder");
        // A finished run is not silently replaced (as merge refuses to); --resume continues one.
        if (checkpoint is null && (File.Exists(Path.Combine(outDir, "adapter_config.json")) || File.Exists(Path.Combine(outDir, "model.safetensors"))))
            throw new IOException($"{outDir}: already holds a trained adapter or model; choose a new folder (or --resume a run saved with --save-steps)");
        Directory.CreateDirectory(outDir);
        // A fresh run starts a fresh log; a resumed one appends (the trainer opens it in append mode then).
        if (checkpoint is null && options.MetricsPath is not null) File.Delete(options.MetricsPath);
        foreach (var problem in trainRecords.Problems.Concat(evalRecords?.Problems ?? [])) context.Err.WriteLine($"skipped {problem}");

        using var lm = TextModel.Load(modelDir, load);
        var template = explicitTemplate ?? TrainingRecords.DefaultTemplate(trainRecords.Shape, lm.Tokenizer, context.Err);
        var problems = new List<string>();
        var train = trainRecords.Tokenize(lm.Tokenizer, template, recipe, policy, problems);
        var dataset = train.Examples;
        IReadOnlyList<Example>? evalSet = evalRecords?.Tokenize(lm.Tokenizer, template, recipe, policy, problems).Examples;
        if (recipe.EvalSplit is double fraction)
        {
            var (trainPart, heldOut) = HeldOut.Split(dataset, fraction, options.Seed);
            dataset = trainPart;
            evalSet = heldOut;
        }
        foreach (var problem in problems) context.Err.WriteLine($"skipped {problem}");
        if (dataset.Count == 0) throw new InvalidDataException($"{dataPath}: no usable training records");
        if (evalSet is { Count: 0 }) throw new InvalidDataException($"{recipe.EvalData ?? dataPath}: no usable evaluation records");

        // The adapter's random initialisation is part of the run: the same seed gives the same adapter.
        TorchSharp.torch.manual_seed(options.Seed);
        PeftModel? peft = peftConfig is null ? null : PeftModel.Create(lm.Model, peftConfig, tokenizer: lm.Tokenizer);
        using var trainer = peft is null ? Trainer.ForModel(lm.Model, options) : Trainer.ForAdapter(peft, options);
        var collator = new Collator(lm.Tokenizer.PadTokenId ?? lm.Tokenizer.EosTokenId ?? 0, padToMultipleOf: 8);
        if (dpoOptions is not null)
        {
            trainer.Objective = new DpoObjective(dpoOptions, peft);
            if (peft is null)
            {
                // Full fine-tuning moves the reference's own weights: its log-probabilities are taken once, now.
                // (On --resume the model already holds trained weights, so the checkpoint is loaded after this.)
                var device = load.Device;
                dataset = DpoObjective.PrecomputeReference(lm.Model, dataset, collator, options.MicroBatchSize, device);
                if (evalSet is not null) evalSet = DpoObjective.PrecomputeReference(lm.Model, evalSet, collator, options.MicroBatchSize, device);
            }
        }
        else if (objective == "pretrain") trainer.Objective = new LanguageModelingObjective("pretrain");
        if (checkpoint is not null) trainer.LoadCheckpoint(checkpoint);
        int totalSteps = trainer.TotalSteps(dataset.Count);
        var bestDir = Path.Combine(outDir, "best");
        if (evalSet is not null)
        {
            trainer.Evaluation = new EvaluationOptions(evalSet, recipe.EvalEvery ?? Math.Max(1, totalSteps / 10))
            {
                BestDirectory = bestDir,
                SaveBest = dir => SaveOutput(lm, peft, modelDir, dir),
            };
        }

        var clock = Stopwatch.StartNew();
        TrainingResult result;
        if (!json && context.Console.Profile.Out.IsTerminal)
        {
            result = context.Console.Progress()
                .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
                .Start(progress =>
                {
                    var task = progress.AddTask($"step {trainer.Step}/{totalSteps}", maxValue: totalSteps);
                    task.Value = trainer.Step;
                    return trainer.Train(dataset, collator, step =>
                    {
                        task.Description = $"step {step.Step}/{totalSteps}  loss {step.Loss:F4}{Describe(step)}  lr {step.LearningRate:G3}  {step.TokensPerSecond:F0} tok/s";
                        task.Value = step.Step;
                    });
                });
        }
        else
        {
            // Redirected output (a log file): a progress bar would only clutter it, so one plain line per evaluation,
            // at the last step, and otherwise at most every 30 s, with the ETA a bar would show.
            var sinceLine = Stopwatch.StartNew();
            int firstStep = trainer.Step;
            result = trainer.Train(dataset, collator, json ? null : step =>
            {
                if (step.EvalLoss is null && step.Step < totalSteps && sinceLine.Elapsed.TotalSeconds < 30) return;
                sinceLine.Restart();
                double perStep = clock.Elapsed.TotalSeconds / Math.Max(1, step.Step - firstStep);
                var eta = TimeSpan.FromSeconds(Math.Round(perStep * (totalSteps - step.Step)));
                context.Out.WriteLine($"step {step.Step}/{totalSteps}  loss {step.Loss:F4}{Describe(step)}  lr {step.LearningRate:G3}  {step.TokensPerSecond:F0} tok/s  eta {eta:g}");
                context.Out.Flush();
            });
        }
        double seconds = clock.Elapsed.TotalSeconds;

        // Mixed precision trained float32 master weights: save those, not their bfloat16 copies.
        trainer.RestoreFloat32Weights();
        SaveOutput(lm, peft, modelDir, outDir);
        // The plot covers the whole run, also the part before a resume: read it back from the log.
        var allSteps = ReadMetrics(options.MetricsPath!, result.Steps);
        var plotPath = Path.Combine(outDir, "loss.png");
        if (allSteps.Count > 0) LossPlot.Save(allSteps, plotPath);

        long tokens = result.Steps.Sum(s => s.Tokens);
        double tokensPerSecond = seconds > 0 ? tokens / seconds : 0;
        if (json)
        {
            var summary = new JsonObject
            {
                ["final_loss"] = double.IsFinite(result.FinalLoss) ? result.FinalLoss : null,
                ["steps"] = trainer.Step,
                ["tokens_per_second"] = tokensPerSecond,
                ["seconds"] = seconds,
                ["output"] = outDir,
                ["method"] = recipe.Method,
                ["precision"] = TrainingPrecisionNames.Name(options.Precision),
                ["objective"] = objective,
                ["chat_template"] = template?.Name,
                ["truncated_examples"] = train.TruncatedExamples,
                ["skipped_records"] = trainRecords.Problems.Count + problems.Count,
                ["examples"] = dataset.Count,
                ["eval_examples"] = evalSet?.Count,
                ["best_step"] = trainer.BestStep,
                ["best_eval_loss"] = trainer.BestEvalLoss,
                ["best_output"] = trainer.BestStep is null ? null : bestDir,
                ["learning_rate"] = options.LearningRate,
                ["min_learning_rate"] = options.MinLearningRate,
                ["warmup_steps"] = options.WarmupSteps,
                ["early_exit_loss"] = result.Steps.Count > 0 ? result.Steps[^1].EarlyExitLoss : null,
            };
            if (trainer.Objective is DpoObjective dpo)
            {
                summary["beta"] = dpo.Options.Beta;
                summary["label_smoothing"] = dpo.Options.LabelSmoothing;
                summary["reference"] = peft is null ? "precomputed" : "adapter disabled";
            }
            if (trainer.Evaluation is { } evaluation) summary["eval_every"] = evaluation.Every;
            var last = result.Steps.Count > 0 ? result.Steps[^1] : null;
            var lastEval = result.Steps.LastOrDefault(s => s.EvalLoss is not null);
            if (lastEval is not null) summary["eval_loss"] = lastEval.EvalLoss;
            foreach (var (name, value) in (last?.Extra ?? new Dictionary<string, double>()).Concat(lastEval?.Extra.Where(e => e.Key.StartsWith("eval_")) ?? []))
                summary[name] = double.IsFinite(value) ? value : null;
            context.WriteJson(summary);
        }
        else
        {
            var table = new Table().AddColumn("").AddColumn("");
            table.ShowHeaders = false;
            table.AddRow("method", Markup.Escape(recipe.Method!));
            table.AddRow("precision", TrainingPrecisionNames.Name(options.Precision));
            table.AddRow("objective", Markup.Escape(objective + (template is null ? "" : $" ({template.Name} template)")));
            table.AddRow("steps", $"{trainer.Step} ({dataset.Count} {(objective == "dpo" ? "pairs" : "examples")}, {train.TruncatedExamples} truncated)");
            table.AddRow("final loss", double.IsFinite(result.FinalLoss) ? result.FinalLoss.ToString("F4") : "-");
            if (result.Steps.Count > 0 && result.Steps[^1].Extra.TryGetValue("reward_accuracy", out var accuracy))
                table.AddRow("reward accuracy", $"{accuracy:P0} (margin {result.Steps[^1].Extra["reward_margin"]:F3})");
            if (trainer.BestStep is int bestStep)
                table.AddRow("best eval loss", Markup.Escape($"{trainer.BestEvalLoss:F4} at step {bestStep} ({bestDir})"));
            if (result.Steps.Count > 0 && result.Steps[^1].EarlyExitLoss is double exitLoss)
                table.AddRow("early-exit loss", exitLoss.ToString("F4"));
            table.AddRow("tokens/s", tokensPerSecond.ToString("F0"));
            table.AddRow("time", $"{seconds:F1} s");
            table.AddRow(peft is null ? "model" : "adapter", Markup.Escape(outDir));
            table.AddRow("metrics", Markup.Escape(options.MetricsPath!));
            if (allSteps.Count > 0) table.AddRow("loss plot", Markup.Escape(plotPath));
            context.Console.Write(table);
        }
        return CliApp.Success;
    }

    /// <summary>The trained adapter (PEFT layout) or whole model, with the base model's tokenizer files.</summary>
    private static void SaveOutput(TextModel lm, PeftModel? peft, string modelDir, string outDir)
    {
        Directory.CreateDirectory(outDir);
        if (peft is null) AutoModel.Save(lm.Model, outDir);
        else peft.SavePretrained(outDir);
        foreach (var name in AdapterMerge.CompanionFiles)
        {
            var source = Path.Combine(modelDir, name);
            if (File.Exists(source)) File.Copy(source, Path.Combine(outDir, name), overwrite: true);
        }
    }

    /// <summary>The eval loss and DPO's reward accuracy of a step, for the progress line.</summary>
    private static string Describe(StepMetrics step)
    {
        var text = "";
        if (step.Extra.TryGetValue("reward_accuracy", out var accuracy)) text += $"  acc {accuracy:F2}";
        if (step.EvalLoss is double evalLoss) text += $"  eval {evalLoss:F4}";
        if (step.Extra.TryGetValue("eval_reward_accuracy", out var evalAccuracy)) text += $"  eval acc {evalAccuracy:F2}";
        return text;
    }

    /// <summary>The checkpoint-{step} folder with the highest step in <paramref name="outDir"/>.</summary>
    private static string LatestCheckpoint(string outDir)
    {
        var latest = (Directory.Exists(outDir) ? Directory.GetDirectories(outDir, "checkpoint-*") : [])
            .Select(dir => (dir, ok: int.TryParse(Path.GetFileName(dir)["checkpoint-".Length..], out var step), step))
            .Where(c => c.ok)
            .OrderByDescending(c => c.step)
            .FirstOrDefault();
        return latest.dir ?? throw new CliUsageException($"{outDir}: --resume found no checkpoint-{{step}} folder (train with --save-steps)");
    }

    private static List<StepMetrics> ReadMetrics(string path, IReadOnlyList<StepMetrics> fallback)
    {
        if (!File.Exists(path)) return [.. fallback];
        var steps = new List<StepMetrics>();
        foreach (var line in File.ReadLines(path))
        {
            if (string.IsNullOrWhiteSpace(line)) continue;
            var node = JsonNode.Parse(line)!;
            steps.Add(new StepMetrics((int)node["step"]!, (int?)node["epoch"] ?? 0, (double)node["loss"]!, (double?)node["learning_rate"] ?? 0,
                (double?)node["grad_norm"], (long?)node["tokens"] ?? 0, (long?)node["label_tokens"] ?? 0, (double?)node["tokens_per_second"] ?? 0,
                (double?)node["elapsed_seconds"] ?? 0, EarlyExitLoss: (double?)node["early_exit_loss"]) { EvalLoss = (double?)node["eval_loss"] });
        }
        return steps;
    }
}

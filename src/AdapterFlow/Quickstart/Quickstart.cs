using System.Diagnostics;
using System.Globalization;
using AdapterFlow.Adapters;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.Data;
using AdapterFlow.Evaluation;
using AdapterFlow.Generation;
using AdapterFlow.IO;
using AdapterFlow.Models;
using AdapterFlow.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow;

/// <summary>
/// The whole story behind <c>adapterflow quickstart</c>, with no download: generate arithmetic word problems, train
/// a byte-level BPE tokenizer on them, create a small LLaMA-family model, pretrain it from scratch on addition and
/// subtraction problems, score it on held-out multiplication problems (a skill it never saw), fine-tune a LoRA
/// adapter on multiplication, score again, merge the adapter and generate with the merged model. Every piece is
/// the library's own (<see cref="ArithmeticProblems"/>, <see cref="ByteLevelBpeTrainer"/>, <see cref="Trainer"/>,
/// <see cref="PeftModel"/>, <see cref="MathEvaluator"/>), so the command line only prints.
/// </summary>
public static class Quickstart
{
    /// <summary>The operations pretraining teaches.</summary>
    public static IReadOnlyList<ArithmeticOperation> PretrainedOperations { get; } = [ArithmeticOperation.Addition, ArithmeticOperation.Subtraction];

    /// <summary>The skill the adapter adds.</summary>
    public static ArithmeticOperation NewOperation => ArithmeticOperation.Multiplication;

    /// <summary>The modules LoRA adapts: every linear layer of the decoder blocks.</summary>
    public static IReadOnlyList<string> LoraTargets { get; } = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    public static QuickstartResult Run(QuickstartOptions options, Action<QuickstartEvent>? report = null, CancellationToken cancellation = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        bool keep = options.Directory is not null;
        var directory = options.Directory ?? Path.Combine(Path.GetTempPath(), "adapterflow-quickstart-" + Guid.NewGuid().ToString("N")[..12]);
        foreach (var part in new[] { "base", "adapter", "merged" })
            FreshModel.CheckTarget(Path.Combine(directory, part));
        if (keep && File.Exists(Path.Combine(directory, "adapter", PeftModel.ConfigFile)))
            throw new IOException($"{Path.Combine(directory, "adapter")}: already holds {PeftModel.ConfigFile}; choose a new or empty folder");
        try
        {
            return RunIn(directory, keep, options, report ?? (_ => { }), cancellation);
        }
        finally
        {
            if (!keep && System.IO.Directory.Exists(directory)) System.IO.Directory.Delete(directory, recursive: true);
        }
    }

    private static QuickstartResult RunIn(string directory, bool keep, QuickstartOptions options, Action<QuickstartEvent> report, CancellationToken cancellation)
    {
        var device = options.Device ?? torch.CPU;
        var steps = new List<QuickstartStep>();
        var total = Stopwatch.StartNew();
        var clock = Stopwatch.StartNew();
        void Start(string title, int units = 0)
        {
            clock.Restart();
            report(new QuickstartStageStarted(title, units));
        }
        void Done(string title, string detail)
        {
            var step = new QuickstartStep(steps.Count + 1, title, detail, clock.Elapsed);
            steps.Add(step);
            report(step);
        }

        // 1. Problems: the pretraining and the new skill come from different generators and operations, and each
        //    held-out split is disjoint from its training split (ArithmeticProblems.Split).
        Start("Generate problems");
        var pretrainData = ArithmeticProblems.Split(PretrainedOperations, options.PretrainProblems, options.EvalProblems, options.Seed);
        var skillData = ArithmeticProblems.Split([NewOperation], options.FinetuneProblems, options.EvalProblems, options.Seed + 1);
        var skillTest = MathDataset.FromItems("multiplication", skillData.HeldOut);
        var pretrainedTest = MathDataset.FromItems("addition-subtraction", pretrainData.HeldOut);
        if (keep)
        {
            var data = Path.Combine(directory, "data");
            ArithmeticProblems.Save(pretrainData.Train, Path.Combine(data, "pretrain.json"));
            ArithmeticProblems.Save(pretrainData.HeldOut, Path.Combine(data, "pretrain-test.json"));
            ArithmeticProblems.Save(skillData.Train, Path.Combine(data, "multiplication-train.json"));
            ArithmeticProblems.Save(skillData.HeldOut, Path.Combine(data, "multiplication-test.json"));
        }
        Done("Generate problems",
            $"{pretrainData.Train.Count:N0} addition/subtraction problems to pretrain on, {skillData.Train.Count:N0} multiplication problems to fine-tune on, " +
            $"{options.EvalProblems} held-out problems of each kind; answers end \"The answer is N.\" (seed {options.Seed})" +
            (keep ? $"; written to {Path.Combine(directory, "data")}" : ""));

        // 2. Tokenizer: trained on the pretraining text only, so multiplication's words are new to it as to the model.
        Start("Train a tokenizer");
        var pretrainExamples = ArithmeticProblems.AsExamples(pretrainData.Train, "pretrain");
        var tokenizer = ByteLevelBpeTrainer.Train(pretrainExamples.Select(e => MathPrompt.Format(e.Instruction, e.Input) + e.Output), options.VocabSize);
        Done("Train a tokenizer", $"byte-level BPE on the pretraining problems: {tokenizer.VocabSize} tokens");

        // 3. Model.
        Start("Create a model");
        using var model = AutoModel.FromConfig(ModelConfigFor(options, tokenizer), options.Seed, device: device);
        long parameters = model.ParameterCount();
        var c = model.Config;
        Done("Create a model", $"{c.Architecture}, random weights: {parameters:N0} parameters, {c.NumHiddenLayers} layers of width {c.HiddenSize}, " +
                               $"{c.NumAttentionHeads} query / {c.NumKeyValueHeads} key-value heads");

        // 4. Pretraining from scratch: the whole problem text carries loss (prompt included), one problem per sequence.
        var pretrainTokens = SftTokenizer.Tokenize(pretrainExamples, tokenizer, Sft with { TrainOnInputs = true });
        var collator = new Collator(tokenizer.PadTokenId ?? 0);
        Start("Pretrain", options.PretrainSteps);
        QuickstartTraining pretraining;
        using (var trainer = Trainer.ForModel(model, PretrainOptions(options)))
            pretraining = Train(trainer, pretrainTokens.Examples, collator, "Pretrain", options.PretrainSteps, report, cancellation);
        model.eval();
        Done("Pretrain", $"{options.PretrainSteps} steps of {options.BatchSize} problems (all weights, lr {Lr(options.PretrainLearningRate)}" +
                         (options.LayerSkip ? ", LayerSkip: layer dropout + early-exit loss" : "") + "): " +
                         $"loss {pretraining.FirstLoss:0.###} → {pretraining.FinalLoss:0.###}, {pretraining.TokensPerSecond:N0} tokens/s");

        Start("Save the base model");
        var baseDir = Path.Combine(directory, "base");
        FreshModel.Save(model, tokenizer, baseDir);
        Done("Save the base model", $"{baseDir} (Hugging Face layout)");

        // 5. Before: the pretrained model on the new skill (and on its own, as a check that pretraining worked).
        var evalOptions = new MathEvalOptions { BatchSize = options.EvalBatchSize, MaxNewTokens = options.MaxNewTokens };
        Start("Evaluate before", 2 * options.EvalProblems);
        var skillBefore = Evaluate(model, tokenizer, evalOptions, skillTest, "Evaluate before", 0, report, cancellation);
        var pretrainedBefore = Evaluate(model, tokenizer, evalOptions, pretrainedTest, "Evaluate before", options.EvalProblems, report, cancellation);
        Done("Evaluate before", $"held-out multiplication {Describe(skillBefore)}; held-out addition/subtraction {Describe(pretrainedBefore)}");

        // 6. LoRA fine-tuning on the new skill: the base stays frozen, only the prompt is masked out of the loss.
        // The adapter's random initialisation is part of the run: the same seed gives the same adapter.
        torch.manual_seed(options.Seed);
        var peft = PeftModel.Create(model, new LoraConfig
        {
            R = options.LoraRank,
            LoraAlpha = 2 * options.LoraRank,
            TargetModules = ModuleSelector.Names([.. LoraTargets]),
        });
        long adapterParameters = peft.CountParameters().Trainable;
        var skillTokens = SftTokenizer.Tokenize(ArithmeticProblems.AsExamples(skillData.Train, "multiplication"), tokenizer, Sft);
        Start("Fine-tune a LoRA adapter", options.FinetuneSteps);
        QuickstartTraining finetuning;
        using (var trainer = Trainer.ForAdapter(peft, FinetuneOptions(options)))
            finetuning = Train(trainer, skillTokens.Examples, collator, "Fine-tune a LoRA adapter", options.FinetuneSteps, report, cancellation);
        peft.eval();
        Done("Fine-tune a LoRA adapter", $"rank {options.LoraRank} on {string.Join(", ", LoraTargets)}: {adapterParameters:N0} trainable parameters " +
                                         $"({100.0 * adapterParameters / parameters:0.#}% of the model); {options.FinetuneSteps} steps, lr {Lr(options.FinetuneLearningRate)}: " +
                                         $"loss {finetuning.FirstLoss:0.###} → {finetuning.FinalLoss:0.###}");

        Start("Evaluate after", 2 * options.EvalProblems);
        var skillAfter = Evaluate(peft, tokenizer, evalOptions, skillTest, "Evaluate after", 0, report, cancellation);
        var pretrainedAfter = Evaluate(peft, tokenizer, evalOptions, pretrainedTest, "Evaluate after", options.EvalProblems, report, cancellation);
        Done("Evaluate after", $"held-out multiplication {Describe(skillAfter)}; held-out addition/subtraction {Describe(pretrainedAfter)}");

        Start("Save the adapter");
        var adapterDir = Path.Combine(directory, "adapter");
        peft.SavePretrained(adapterDir);
        Done("Save the adapter", $"{adapterDir} (PEFT layout: {PeftModel.ConfigFile}, {PeftModel.WeightsFile})");

        // 7. Merge: the adapter folded into the weights must give the logits base+adapter gives.
        Start("Merge");
        var sample = skillData.HeldOut[0];
        var samplePrompt = MathPrompt.Format(sample.Instruction, sample.Input);
        var sampleIds = tokenizer.Encode(samplePrompt + sample.Output, addSpecialTokens: true);
        using var adapted = Logits(peft, sampleIds);
        var merged = peft.MergeAndUnload();
        merged.eval();
        using var mergedLogits = Logits(merged, sampleIds);
        double mergeDifference;
        using (torch.no_grad()) mergeDifference = (adapted - mergedLogits).abs().max().item<float>();
        var mergedDir = Path.Combine(directory, "merged");
        FreshModel.Save(merged, tokenizer, mergedDir);
        Done("Merge", $"LoRA folded into the weights (max logit difference to base+adapter {mergeDifference:0.##e+0}); {mergedDir} (Hugging Face layout)");

        // 8. Generate with the merged model, as a user would.
        Start("Generate");
        var generation = new TextGenerator(merged, tokenizer).Generate([tokenizer.Encode(samplePrompt, addSpecialTokens: true)], new GenerationOptions
        {
            MaxNewTokens = options.MaxNewTokens,
            DoSample = false,
            StopStrings = MathPrompt.StopStrings,
        }, cancellation);
        var response = MathPrompt.Response(generation.Sequences[0].Text ?? "");
        Done("Generate", $"merged model, greedy, {generation.Stats.GenerationTokensPerSecond:0} tokens/s: \"{sample.Instruction}\" → \"{response}\"");

        return new QuickstartResult
        {
            Directory = keep ? Path.GetFullPath(directory) : null,
            Seed = options.Seed,
            Architecture = c.Architecture,
            Parameters = parameters,
            AdapterParameters = adapterParameters,
            VocabSize = tokenizer.VocabSize,
            Layers = c.NumHiddenLayers,
            HiddenSize = c.HiddenSize,
            LayerSkip = options.LayerSkip,
            PretrainedSkill = "addition and subtraction",
            NewSkill = "multiplication",
            Pretraining = pretraining,
            Finetuning = finetuning,
            AccuracyBefore = skillBefore.Accuracy,
            AccuracyAfter = skillAfter.Accuracy,
            PretrainedSkillBefore = pretrainedBefore.Accuracy,
            PretrainedSkillAfter = pretrainedAfter.Accuracy,
            MergeMaxDifference = mergeDifference,
            SampleQuestion = sample.Instruction,
            SampleResponse = response,
            SampleLabel = sample.Answer,
            TokensPerSecond = generation.Stats.GenerationTokensPerSecond,
            Steps = steps,
            Total = total.Elapsed,
        };
    }

    /// <summary>
    /// How problems become training sequences: in the prompt <see cref="MathEvaluator"/> asks with (LLM-Adapters'
    /// evaluate.py template), tokenised apart from the answer, so that training sees exactly the ids evaluation
    /// starts from. LLM-Adapters trains large models on finetune.py's template, whose whitespace differs slightly;
    /// a model of a million parameters trained from scratch does not carry that over (it writes garbage after the
    /// unfamiliar prompt ending), which would measure the template instead of the skill.
    /// </summary>
    public static SftOptions Sft { get; } = new()
    {
        CutoffLength = 256,
        PromptFormat = (instruction, input) => MathPrompt.Format(instruction, input),
        TokenizeSeparately = true,
    };

    /// <summary>
    /// The quickstart model's config: LLaMA (SwiGLU, RMSNorm, RoPE, grouped-query attention) at the size the options
    /// ask for, with the tokenizer's vocabulary and special ids. Built from the preset's config.json so the family's
    /// own parser validates it.
    /// </summary>
    public static ModelConfig ModelConfigFor(QuickstartOptions options, ITokenizer tokenizer)
    {
        var special = new SpecialTokenIds(tokenizer.BosTokenId, tokenizer.EosTokenId, tokenizer.PadTokenId);
        var json = ModelPresets.CreateConfigJson("llama", "tiny", tokenizer.VocabSize, special);
        int heads = options.AttentionHeads;
        json["hidden_size"] = options.HiddenSize;
        json["num_hidden_layers"] = options.Layers;
        json["num_attention_heads"] = heads;
        json["num_key_value_heads"] = heads % 2 == 0 ? heads / 2 : heads;
        json["head_dim"] = options.HiddenSize / heads;
        json["intermediate_size"] = (int)Math.Ceiling(options.HiddenSize * 8.0 / 3 / 32) * 32;
        json["max_position_embeddings"] = 256;
        return AutoModel.ParseConfig(json, "quickstart model");
    }

    /// <summary>
    /// Pretraining from scratch: AdamW with a short warmup and cosine decay; with <see cref="QuickstartOptions.LayerSkip"/>,
    /// LayerSkip's pretraining recipe (recipes/layerskip-pretrain.yaml): layer dropout up to 0.1 at the last layer,
    /// exponential in depth and over training, and the early-exit loss (equal weights on every exit, exits switched on
    /// from the last layer down by mid-training).
    /// </summary>
    public static TrainerOptions PretrainOptions(QuickstartOptions options) => new()
    {
        LayerDropout = options.LayerSkip ? new LayerDropoutOptions(0.1, LayerDropoutScale.Exponential, LayerDropoutCurriculum.Exponential) : null,
        EarlyExit = options.LayerSkip ? new EarlyExitOptions(EarlyExitScale.Uniform, EarlyExitCurriculum.Gradual) : null,
        LearningRate = options.PretrainLearningRate,
        Schedule = LrScheduleKind.Cosine,
        WarmupRatio = 0.05,
        WeightDecay = 0.1,
        Beta2 = 0.98,
        BatchSize = options.BatchSize,
        MicroBatchSize = options.BatchSize,
        MaxSteps = options.PretrainSteps,
        Seed = options.Seed,
        GroupByLength = true,
    };

    /// <summary>LoRA fine-tuning: a higher learning rate than full training (LoRA's usual), linear decay.</summary>
    public static TrainerOptions FinetuneOptions(QuickstartOptions options) => new()
    {
        LearningRate = options.FinetuneLearningRate,
        Schedule = LrScheduleKind.Linear,
        WarmupRatio = 0.05,
        BatchSize = options.BatchSize,
        MicroBatchSize = options.BatchSize,
        MaxSteps = options.FinetuneSteps,
        Seed = options.Seed,
        GroupByLength = true,
    };

    private static QuickstartTraining Train(Trainer trainer, IReadOnlyList<Example> data, Collator collator, string title, int totalSteps,
        Action<QuickstartEvent> report, CancellationToken cancellation)
    {
        var clock = Stopwatch.StartNew();
        var result = trainer.Train(data, collator, m => report(new QuickstartProgress(title, m.Step, totalSteps, m.Loss)), cancellation: cancellation);
        long tokens = result.Steps.Sum(s => s.Tokens);
        return new QuickstartTraining(data.Count, result.Steps.Count, result.Steps[0].Loss, result.FinalLoss, tokens,
            tokens / Math.Max(clock.Elapsed.TotalSeconds, 1e-9), clock.Elapsed);
    }

    /// <summary>Scores one held-out set; both sets of a stage share one progress bar, this one starting at <paramref name="offset"/>.</summary>
    private static MathEvalResult Evaluate(CausalLM model, ITokenizer tokenizer, MathEvalOptions options, MathDataset set, string title, int offset,
        Action<QuickstartEvent> report, CancellationToken cancellation)
    {
        int done = offset, total = 2 * set.Items.Count;
        var result = new MathEvaluator(model, tokenizer, options).Evaluate(set, _ => report(new QuickstartProgress(title, ++done, total, null)), cancellation);
        // An interrupted evaluation is partial: the quickstart stops rather than report it as the score.
        if (result.Accuracy.Total < set.Items.Count) cancellation.ThrowIfCancellationRequested();
        return result;
    }

    private static Tensor Logits(CausalLM model, IReadOnlyList<int> ids)
    {
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        var input = torch.tensor(ids.Select(i => (long)i).ToArray(), device: model.Device).unsqueeze(0);
        return model.Logits(input).MoveToOuterDisposeScope();
    }

    private static string Describe(MathEvalResult r) =>
        $"{r.Accuracy.Correct}/{r.Accuracy.Total} = {MathEvalSummary.Percent(r.Accuracy.Value)}%";

    private static string Lr(double lr) => lr.ToString("0.####", CultureInfo.InvariantCulture);
}

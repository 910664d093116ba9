using System.Globalization;
using System.Text.Json.Nodes;
using AdapterFlow.Evaluation;
using static TorchSharp.torch;

namespace AdapterFlow;

/// <summary>
/// Settings of <see cref="Quickstart.Run"/>. The defaults are the built-in story, tuned to finish in a few minutes
/// on a 2-core laptop with the adapter clearly learning the new skill; tests shrink the knobs.
/// </summary>
public sealed record QuickstartOptions
{
    /// <summary>Where to keep base/, adapter/, merged/ and data/; null = a temporary folder deleted at the end.</summary>
    public string? Directory { get; init; }

    public Device? Device { get; init; }

    /// <summary>Seeds the problems, the weights, the data order and dropout: the same seed gives the same run.</summary>
    public int Seed { get; init; } = 1;

    // ---- model
    public int HiddenSize { get; init; } = 96;
    public int Layers { get; init; } = 6;
    public int AttentionHeads { get; init; } = 4;

    /// <summary>The byte-level BPE tokenizer trained on the pretraining problems aims for this many tokens.</summary>
    public int VocabSize { get; init; } = 768;

    // ---- pretraining (addition and subtraction, full model, from scratch)
    public int PretrainProblems { get; init; } = 8000;
    public int PretrainSteps { get; init; } = 800;
    public double PretrainLearningRate { get; init; } = 3e-3;

    /// <summary>
    /// Pretrain with LayerSkip's recipe (layer dropout rising with depth and over training, early-exit loss on every
    /// layer switched on gradually), so that early-exit and self-speculative decoding work on the model.
    /// </summary>
    public bool LayerSkip { get; init; } = true;

    // ---- fine-tuning (multiplication, LoRA)
    public int FinetuneProblems { get; init; } = 1000;
    public int FinetuneSteps { get; init; } = 1200;
    public double FinetuneLearningRate { get; init; } = 1e-2;
    public int LoraRank { get; init; } = 16;

    /// <summary>Examples per optimizer step in both training runs.</summary>
    public int BatchSize { get; init; } = 32;

    // ---- evaluation
    /// <summary>Held-out problems of the new skill (and of the pretrained skills) scored before and after.</summary>
    public int EvalProblems { get; init; } = 100;
    public int EvalBatchSize { get; init; } = 50;

    /// <summary>Longest generated answer; the chain-of-thought answers take about 25–30 tokens.</summary>
    public int MaxNewTokens { get; init; } = 48;

    public void Validate()
    {
        static void AtLeast(string name, double value, double minimum)
        {
            if (!(value >= minimum)) throw new ArgumentException($"{name} must be at least {minimum.ToString(CultureInfo.InvariantCulture)}, got {value.ToString(CultureInfo.InvariantCulture)}");
        }
        AtLeast(nameof(HiddenSize), HiddenSize, 8);
        AtLeast(nameof(Layers), Layers, 1);
        AtLeast(nameof(AttentionHeads), AttentionHeads, 1);
        if (HiddenSize % AttentionHeads != 0 || HiddenSize / AttentionHeads % 2 != 0)
            throw new ArgumentException($"{nameof(HiddenSize)} ({HiddenSize}) must be a multiple of {nameof(AttentionHeads)} ({AttentionHeads}) with an even head size");
        AtLeast(nameof(VocabSize), VocabSize, 300);
        AtLeast(nameof(PretrainProblems), PretrainProblems, 1);
        AtLeast(nameof(PretrainSteps), PretrainSteps, 1);
        AtLeast(nameof(FinetuneProblems), FinetuneProblems, 1);
        AtLeast(nameof(FinetuneSteps), FinetuneSteps, 1);
        AtLeast(nameof(LoraRank), LoraRank, 1);
        AtLeast(nameof(BatchSize), BatchSize, 1);
        AtLeast(nameof(EvalProblems), EvalProblems, 1);
        AtLeast(nameof(EvalBatchSize), EvalBatchSize, 1);
        AtLeast(nameof(MaxNewTokens), MaxNewTokens, 1);
        if (!(PretrainLearningRate > 0)) throw new ArgumentException($"{nameof(PretrainLearningRate)} must be positive, got {PretrainLearningRate}");
        if (!(FinetuneLearningRate > 0)) throw new ArgumentException($"{nameof(FinetuneLearningRate)} must be positive, got {FinetuneLearningRate}");
    }
}

/// <summary>What <see cref="Quickstart.Run"/> reports as it goes.</summary>
public abstract record QuickstartEvent;

/// <summary>A stage begins; <paramref name="Total"/> units (steps, problems) will follow as <see cref="QuickstartProgress"/> (0 = none).</summary>
public sealed record QuickstartStageStarted(string Title, int Total) : QuickstartEvent;

/// <summary><paramref name="Done"/> of <paramref name="Total"/> units of the current stage; <paramref name="Loss"/> for training steps.</summary>
public sealed record QuickstartProgress(string Title, int Done, int Total, double? Loss) : QuickstartEvent;

/// <summary>One finished stage: what was done and how long it took.</summary>
public sealed record QuickstartStep(int Number, string Title, string Detail, TimeSpan Elapsed) : QuickstartEvent;

/// <summary>A training run of the quickstart: steps, first and last loss, speed.</summary>
public sealed record QuickstartTraining(int Examples, int Steps, double FirstLoss, double FinalLoss, long Tokens, double TokensPerSecond, TimeSpan Elapsed);

/// <summary>Everything the quickstart did and measured.</summary>
public sealed record QuickstartResult
{
    /// <summary>The folder holding base/, adapter/, merged/ and data/; null when nothing was kept.</summary>
    public string? Directory { get; init; }
    public required int Seed { get; init; }
    public required string Architecture { get; init; }
    public required long Parameters { get; init; }
    public required long AdapterParameters { get; init; }
    public required int VocabSize { get; init; }
    public required int Layers { get; init; }
    public required int HiddenSize { get; init; }

    /// <summary>Pretrained with LayerSkip's layer dropout and early-exit loss.</summary>
    public required bool LayerSkip { get; init; }
    public required string PretrainedSkill { get; init; }
    public required string NewSkill { get; init; }
    public required QuickstartTraining Pretraining { get; init; }
    public required QuickstartTraining Finetuning { get; init; }

    /// <summary>Held-out problems of the new skill, scored with LLM-Adapters' rules, before and after the adapter.</summary>
    public required Accuracy AccuracyBefore { get; init; }
    public required Accuracy AccuracyAfter { get; init; }

    /// <summary>Held-out problems of the pretrained skills, before and after the adapter (does it forget?).</summary>
    public required Accuracy PretrainedSkillBefore { get; init; }
    public required Accuracy PretrainedSkillAfter { get; init; }

    /// <summary>Largest difference between the merged model's logits and the base+adapter ones.</summary>
    public required double MergeMaxDifference { get; init; }

    /// <summary>A held-out question, the merged model's answer, and the label.</summary>
    public required string SampleQuestion { get; init; }
    public required string SampleResponse { get; init; }
    public required string SampleLabel { get; init; }
    public required double TokensPerSecond { get; init; }
    public required IReadOnlyList<QuickstartStep> Steps { get; init; }
    public required TimeSpan Total { get; init; }

    /// <summary>The --json object (snake_case): accuracies, losses, sizes, paths, timings.</summary>
    public JsonObject ToJson()
    {
        static JsonObject Train(QuickstartTraining t) => new()
        {
            ["examples"] = t.Examples,
            ["steps"] = t.Steps,
            ["first_loss"] = Math.Round(t.FirstLoss, 4),
            ["final_loss"] = Math.Round(t.FinalLoss, 4),
            ["tokens"] = t.Tokens,
            ["tokens_per_second"] = Math.Round(t.TokensPerSecond, 1),
            ["seconds"] = Math.Round(t.Elapsed.TotalSeconds, 2),
        };
        static JsonObject Score(Accuracy a) => new() { ["correct"] = a.Correct, ["n"] = a.Total, ["accuracy"] = Math.Round(a.Value, 4) };
        return new JsonObject
        {
            ["accuracy_before"] = Math.Round(AccuracyBefore.Value, 4),
            ["accuracy_after"] = Math.Round(AccuracyAfter.Value, 4),
            ["held_out"] = AccuracyAfter.Total,
            ["new_skill"] = NewSkill,
            ["new_skill_before"] = Score(AccuracyBefore),
            ["new_skill_after"] = Score(AccuracyAfter),
            ["pretrained_skill"] = PretrainedSkill,
            ["pretrained_skill_before"] = Score(PretrainedSkillBefore),
            ["pretrained_skill_after"] = Score(PretrainedSkillAfter),
            ["pretraining"] = Train(Pretraining),
            ["finetuning"] = Train(Finetuning),
            ["architecture"] = Architecture,
            ["parameters"] = Parameters,
            ["adapter_parameters"] = AdapterParameters,
            ["vocab_size"] = VocabSize,
            ["layers"] = Layers,
            ["hidden_size"] = HiddenSize,
            ["layerskip"] = LayerSkip,
            ["merge_max_difference"] = MergeMaxDifference,
            ["sample"] = new JsonObject { ["question"] = SampleQuestion, ["response"] = SampleResponse, ["label"] = SampleLabel },
            ["tokens_per_second"] = Math.Round(TokensPerSecond, 1),
            ["seed"] = Seed,
            ["out"] = Directory,
            ["base"] = Directory is null ? null : Path.Combine(Directory, "base"),
            ["adapter"] = Directory is null ? null : Path.Combine(Directory, "adapter"),
            ["merged"] = Directory is null ? null : Path.Combine(Directory, "merged"),
            ["stages"] = new JsonArray(Steps.Select(s => (JsonNode?)new JsonObject
            {
                ["title"] = s.Title,
                ["seconds"] = Math.Round(s.Elapsed.TotalSeconds, 3),
            }).ToArray()),
            ["seconds"] = Math.Round(Total.TotalSeconds, 2),
        };
    }
}

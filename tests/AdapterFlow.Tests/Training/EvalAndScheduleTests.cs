using System.Text.Json.Nodes;
using AdapterFlow.Adapters;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.Training;

namespace AdapterFlow.Tests.Training;

/// <summary>Held-out evaluation during training (best adapter kept) and learning-rate re-warming.</summary>
[Collection(GlobalTorchRngCollection.Name)]
public sealed class EvalAndScheduleTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("af-eval-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static readonly Collator Collate = new(padTokenId: 0);

    [Fact]
    public void Evaluation_logs_eval_loss_and_keeps_the_lowest_eval_loss_adapter()
    {
        using var model = TrainerTests.TinyLlama();
        var peft = PeftModel.Create(model, new LoraConfig { R = 4, LoraAlpha = 8, TargetModules = ModuleSelector.Pattern(ModuleSelector.AllLinear) });
        var train = TrainerTests.Examples(count: 4, seed: 3);
        // Unrelated random sequences: over-fitting the training set soon makes them worse, so the best step is
        // not simply the last one.
        var eval = TrainerTests.Examples(count: 3, seed: 11);
        var best = Path.Combine(_dir, "best");
        var metricsPath = Path.Combine(_dir, "metrics.jsonl");
        using var trainer = Trainer.ForAdapter(peft, new TrainerOptions
        {
            LearningRate = 3e-2, Schedule = LrScheduleKind.Constant, BatchSize = 4, MicroBatchSize = 4, MaxSteps = 12, MetricsPath = metricsPath,
        });
        var saved = new List<int>();
        trainer.Evaluation = new EvaluationOptions(eval, Every: 3)
        {
            BestDirectory = best,
            SaveBest = dir => { saved.Add(trainer.Step); peft.SavePretrained(dir); },
        };
        var result = trainer.Train(train, Collate);

        var evaluated = result.Steps.Where(s => s.EvalLoss is not null).ToList();
        Assert.Equal([3, 6, 9, 12], evaluated.Select(s => s.Step));
        var lowest = evaluated.MinBy(s => s.EvalLoss!.Value)!;
        Assert.Equal(lowest.Step, result.BestStep);
        Assert.Equal(lowest.EvalLoss, result.BestEvalLoss);
        Assert.Equal(lowest.Step, saved[^1]);
        // Saved only when a new lowest loss came, and nothing half-written beside it.
        Assert.Equal(saved, saved.Order());
        Assert.Equal(["best", "metrics.jsonl"], Directory.GetFileSystemEntries(_dir).Select(Path.GetFileName).Order());

        // The folder holds the adapter of that step: loaded onto a fresh base, it gives the best eval loss.
        using var fresh = TrainerTests.TinyLlama();
        var reloaded = PeftModel.FromPretrained(fresh, best, isTrainable: true);
        using var check = Trainer.ForAdapter(reloaded, new TrainerOptions { MicroBatchSize = 4, BatchSize = 4 });
        Assert.Equal(result.BestEvalLoss!.Value, check.Evaluate(eval, Collate).Loss, tolerance: 1e-4);

        // The JSONL has eval_loss on the evaluated steps only.
        var lines = File.ReadLines(metricsPath).Select(l => JsonNode.Parse(l)!.AsObject()).ToList();
        Assert.Equal(12, lines.Count);
        Assert.Equal([3, 6, 9, 12], lines.Where(l => l.ContainsKey("eval_loss")).Select(l => (int)l["step"]!));
        Assert.Equal(evaluated.Select(s => s.EvalLoss!.Value), lines.Where(l => l.ContainsKey("eval_loss")).Select(l => (double)l["eval_loss"]!));

        // The plot draws both curves.
        var png = Path.Combine(_dir, "loss.png");
        LossPlot.Save(result.Steps, png);
        Assert.True(new FileInfo(png).Length > 5_000);
    }

    [Fact]
    public void Eval_loss_is_the_token_weighted_mean_without_dropout_and_checkpoints_keep_the_best()
    {
        using var model = TrainerTests.TinyLlama();
        var eval = TrainerTests.Examples(count: 3, seed: 11);
        using var trainer = Trainer.ForModel(model, new TrainerOptions { BatchSize = 2, MicroBatchSize = 1, MaxSteps = 2, LearningRate = 1e-2 });
        var a = trainer.Evaluate(eval, Collate);
        var b = trainer.Evaluate(eval, Collate);
        Assert.Equal(a.Loss, b.Loss);
        // Σ summed losses / Σ labelled tokens, the same normalisation as a training step.
        using var batch = Collate.Collate(eval);
        using var logits = model.forward(new AdapterFlow.Models.ForwardInput { InputIds = batch.InputIds, AttentionMask = batch.AttentionMask }).Logits;
        using var sum = CausalLMLoss.Sum(logits, batch.Labels);
        Assert.Equal(sum.item<float>() / batch.LabelTokens, a.Loss, tolerance: 1e-4);

        trainer.Evaluation = new EvaluationOptions(eval, Every: 1);
        trainer.Train(TrainerTests.Examples(), Collate);
        Assert.NotNull(trainer.BestStep);
        var checkpoint = Path.Combine(_dir, "ckpt");
        trainer.SaveCheckpoint(checkpoint);
        using var again = Trainer.ForModel(model, trainer.Options);
        again.LoadCheckpoint(checkpoint);
        Assert.Equal(trainer.BestStep, again.BestStep);
        Assert.Equal(trainer.BestEvalLoss, again.BestEvalLoss);
    }

    [Fact]
    public void Rewarming_warms_from_the_floor_to_the_peak_then_decays_to_the_floor()
    {
        // Continued pretraining: 10 re-warming steps from 1e-4 to 1e-3, cosine back to 1e-4 at step 110.
        var cosine = new LearningRateSchedule(LrScheduleKind.Cosine, 1e-3, 10, 110) { WarmupStartLearningRate = 1e-4, MinLearningRate = 1e-4 };
        Assert.Equal(1e-4, cosine.At(0), tolerance: 1e-12);
        Assert.Equal(1e-4 + 0.9e-3 * 0.5, cosine.At(5), tolerance: 1e-12);
        Assert.Equal(1e-3, cosine.At(10), tolerance: 1e-12);
        Assert.Equal(1e-4 + 0.9e-3 * 0.5 * (1 + Math.Cos(Math.PI * 0.25)), cosine.At(35), tolerance: 1e-12);
        Assert.Equal(5.5e-4, cosine.At(60), tolerance: 1e-12);
        Assert.Equal(1e-4, cosine.At(110), tolerance: 1e-12);
        Assert.Equal(1e-4, cosine.At(200), tolerance: 1e-12);
        var linear = cosine with { Kind = LrScheduleKind.Linear };
        Assert.Equal(1e-4 + 0.9e-3 * 0.75, linear.At(35), tolerance: 1e-12);
        // Without a floor and start the values stay transformers' (warmup from 0, decay to 0).
        var plain = new LearningRateSchedule(LrScheduleKind.Linear, 1e-3, 10, 110);
        Assert.Equal(0, plain.At(0));
        Assert.Equal(5e-4, plain.At(5), tolerance: 1e-12);
        Assert.Equal(0, plain.At(110), tolerance: 1e-12);

        // The recipe's rewarm_steps: the floor defaults to a tenth of the peak.
        var options = new TrainRecipe { RewarmSteps = 10, LearningRate = 1e-3, LrScheduler = "cosine" }.ToTrainerOptions(null);
        Assert.Equal(10, options.WarmupSteps);
        Assert.Equal(1e-4, options.WarmupStartLearningRate, tolerance: 1e-12);
        Assert.Equal(1e-4, options.MinLearningRate, tolerance: 1e-12);
        Assert.Equal(cosine.At(35), options.ScheduleFor(110).At(35), tolerance: 1e-12);
        var floor = new TrainRecipe { RewarmSteps = 10, LearningRate = 1e-3, MinLearningRate = 3e-5 }.ToTrainerOptions(null);
        Assert.Equal(3e-5, floor.WarmupStartLearningRate);
        Assert.Throws<ArgumentException>(() => new TrainRecipe { RewarmSteps = 10, WarmupSteps = 5 }.Validate("flags"));
        Assert.Throws<ArgumentException>(() => new TrainRecipe { LearningRate = 1e-3, MinLearningRate = 1e-2 }.Validate("flags"));
    }

    [Fact]
    public void A_rewarmed_run_uses_the_schedule_in_the_trainer()
    {
        using var model = TrainerTests.TinyLlama();
        using var trainer = Trainer.ForModel(model, new TrainerOptions
        {
            LearningRate = 1e-3, WarmupSteps = 4, WarmupStartLearningRate = 2e-4, MinLearningRate = 2e-4, Schedule = LrScheduleKind.Linear,
            BatchSize = 4, MicroBatchSize = 4, MaxSteps = 8,
        });
        var result = trainer.Train(TrainerTests.Examples(), Collate);
        var expected = trainer.Options.ScheduleFor(8);
        Assert.Equal(Enumerable.Range(0, 8).Select(expected.At), result.Steps.Select(s => s.LearningRate));
        Assert.Equal(2e-4, result.Steps[0].LearningRate, tolerance: 1e-12);
        Assert.Equal(1e-3, result.Steps[4].LearningRate, tolerance: 1e-12);
        Assert.Throws<ArgumentException>(() => Trainer.ForModel(model, new TrainerOptions { LearningRate = 1e-3, MinLearningRate = 1e-2 }));
    }
}

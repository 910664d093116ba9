using AdapterFlow.Adapters;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.Models;
using AdapterFlow.Training;

namespace AdapterFlow.Tests.Training;

[Collection(GlobalTorchRngCollection.Name)]
public sealed class CheckpointTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("af-training-ckpt-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static readonly Collator Collate = new(padTokenId: 0);

    // Momentum, weight decay, a decaying schedule and accumulation: resuming must restore all of their state.
    private static readonly TrainerOptions Options = new()
    {
        LearningRate = 5e-3, WeightDecay = 0.1, Schedule = LrScheduleKind.Cosine, WarmupSteps = 2,
        BatchSize = 2, MicroBatchSize = 1, Epochs = 3, Seed = 11,
    };

    [Fact]
    public void Resume_reproduces_the_uninterrupted_losses_exactly_for_full_training()
    {
        var data = TrainerTests.Examples(4);
        double[] uninterrupted;
        using (var model = TrainerTests.TinyLlama())
        using (var trainer = Trainer.ForModel(model, Options))
            uninterrupted = trainer.Train(data, Collate).Steps.Select(s => s.Loss).ToArray();
        Assert.Equal(6, uninterrupted.Length);

        var checkpoint = Path.Combine(_dir, "ckpt");
        using (var model = TrainerTests.TinyLlama())
        using (var trainer = Trainer.ForModel(model, Options))
        {
            Assert.True(trainer.UsesFusedOptimizer); // float32 on the CPU: the fused AdamW step, whose state must resume exactly
            var first = trainer.Train(data, Collate, stopAtStep: 4).Steps.Select(s => s.Loss).ToArray();
            Assert.Equal(uninterrupted[..4], first);
            trainer.SaveCheckpoint(checkpoint);
        }
        Assert.Equal(["optimizer.bin", "trainable.safetensors", "trainer_state.json"], Directory.GetFiles(checkpoint).Select(Path.GetFileName).Order());
        Assert.Single(Directory.GetDirectories(_dir)); // no temporary folder left behind

        // A differently initialised model: everything must come from the checkpoint.
        using (var model = TrainerTests.TinyLlama(seed: 99))
        using (var trainer = Trainer.ForModel(model, Options))
        {
            trainer.LoadCheckpoint(checkpoint);
            Assert.Equal(4, trainer.Step);
            var rest = trainer.Train(data, Collate).Steps.Select(s => s.Loss).ToArray();
            Assert.Equal(uninterrupted[4..], rest);
        }
    }

    [Fact]
    public void Resume_reproduces_the_uninterrupted_losses_exactly_for_lora_with_dropout()
    {
        var data = TrainerTests.Examples(4);
        var options = Options with { CheckpointDirectory = _dir, CheckpointEvery = 3 };
        PeftModel Create(CausalLM model) => PeftModel.Create(model, new LoraConfig { R = 4, LoraAlpha = 8, LoraDropout = 0.2 });
        double[] uninterrupted;
        using (var model = TrainerTests.TinyLlama())
        using (var trainer = Trainer.ForAdapter(Create(model), options))
            uninterrupted = trainer.Train(data, Collate).Steps.Select(s => s.Loss).ToArray();
        Assert.True(Directory.Exists(Path.Combine(_dir, "checkpoint-3")) && Directory.Exists(Path.Combine(_dir, "checkpoint-6")));

        using (var model = TrainerTests.TinyLlama())
        using (var trainer = Trainer.ForAdapter(Create(model), options with { CheckpointDirectory = null }))
        {
            trainer.LoadCheckpoint(Path.Combine(_dir, "checkpoint-3"));
            Assert.Equal(uninterrupted[3..], trainer.Train(data, Collate).Steps.Select(s => s.Loss).ToArray());
        }
    }

    [Fact]
    public void Saving_over_a_checkpoint_replaces_it_and_bad_checkpoints_are_named()
    {
        var checkpoint = Path.Combine(_dir, "ckpt");
        using var model = TrainerTests.TinyLlama();
        using var trainer = Trainer.ForModel(model, Options);
        trainer.Train(TrainerTests.Examples(4), Collate, stopAtStep: 1);
        trainer.SaveCheckpoint(checkpoint);
        trainer.Train(TrainerTests.Examples(4), Collate, stopAtStep: 2);
        trainer.SaveCheckpoint(checkpoint);
        Assert.Contains("\"step\":2", File.ReadAllText(Path.Combine(checkpoint, "trainer_state.json")));
        Assert.Single(Directory.GetDirectories(_dir));

        var empty = Directory.CreateDirectory(Path.Combine(_dir, "empty")).FullName;
        Assert.Contains("not a training checkpoint", Assert.Throws<FileNotFoundException>(() => trainer.LoadCheckpoint(empty)).Message);
        using var other = Trainer.ForModel(model, Options with { Seed = 1 });
        Assert.Contains("seed 11", Assert.Throws<ArgumentException>(() => other.LoadCheckpoint(checkpoint)).Message);
    }

    [Fact]
    public void Save_total_limit_keeps_the_newest_checkpoints_and_the_best_one()
    {
        // 6 steps, a checkpoint every step, keep 2: only checkpoint-5 and checkpoint-6 remain, and the last resumes.
        var options = Options with { CheckpointDirectory = _dir, CheckpointEvery = 1, SaveTotalLimit = 2 };
        var stray = Directory.CreateDirectory(Path.Combine(_dir, "checkpoint-final")).FullName; // not checkpoint-{step}: never touched
        using (var model = TrainerTests.TinyLlama())
        using (var trainer = Trainer.ForModel(model, options))
            Assert.Equal(6, trainer.Train(TrainerTests.Examples(4), Collate).Steps.Count);
        Assert.Equal(["checkpoint-5", "checkpoint-6", "checkpoint-final"], Directory.GetDirectories(_dir).Select(Path.GetFileName).Order());
        Assert.Contains("\"step\":6", File.ReadAllText(Path.Combine(_dir, "checkpoint-6", "trainer_state.json")));

        // The best evaluated step's checkpoint survives pruning even when it is old.
        foreach (int step in new[] { 2, 9, 10, 11 }) Directory.CreateDirectory(Path.Combine(_dir, $"checkpoint-{step}"));
        var deleted = Trainer.PruneCheckpoints(_dir, keep: 2, bestStep: 2).Select(Path.GetFileName).Order();
        Assert.Equal(["checkpoint-5", "checkpoint-6", "checkpoint-9"], deleted);
        Assert.Equal(["checkpoint-10", "checkpoint-11", "checkpoint-2", "checkpoint-final"], Directory.GetDirectories(_dir).Select(Path.GetFileName).Order());
        Assert.True(Directory.Exists(stray));
        using var tiny = TrainerTests.TinyLlama();
        Assert.Contains("SaveTotalLimit", Assert.Throws<ArgumentException>(() => Trainer.ForModel(tiny, Options with { SaveTotalLimit = 0 })).Message);
    }
}

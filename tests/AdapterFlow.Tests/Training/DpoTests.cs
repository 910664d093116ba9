using AdapterFlow.Adapters;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.Models;
using AdapterFlow.Training;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Training;

/// <summary>DPO on a tiny LLaMA: the loss at init, the margin it raises, and where the reference comes from.</summary>
[Collection(GlobalTorchRngCollection.Name)]
public class DpoTests
{
    private static readonly Collator Collate = new(padTokenId: 0);

    /// <summary>Pairs sharing a random prompt; the replies are different random tokens, labels on the reply only.</summary>
    internal static Example[] Pairs(int count = 4, int seed = 5)
    {
        var random = new Random(seed);
        int[] Tokens(int n) => Enumerable.Range(0, n).Select(_ => random.Next(1, 64)).ToArray();
        Example Sequence(int[] prompt, int[] reply) =>
            new([.. prompt, .. reply], [.. prompt.Select(_ => Example.IgnoreIndex), .. reply]);
        return Enumerable.Range(0, count).Select(i =>
        {
            var prompt = Tokens(5 + i);
            return Sequence(prompt, Tokens(4)) with { Rejected = Sequence(prompt, Tokens(3 + i % 2)) };
        }).ToArray();
    }

    private static PeftModel Lora(CausalLM model, double dropout = 0) =>
        PeftModel.Create(model, new LoraConfig { R = 8, LoraAlpha = 16, LoraDropout = dropout, TargetModules = ModuleSelector.Pattern(ModuleSelector.AllLinear) });

    private static TrainerOptions Options(int steps, double lr = 1e-2) => new()
    {
        LearningRate = lr, Schedule = LrScheduleKind.Constant, BatchSize = 4, MicroBatchSize = 2, MaxSteps = steps,
    };

    [Fact]
    public void Loss_at_init_is_log_2_when_the_policy_is_the_reference()
    {
        using var model = TrainerTests.TinyLlama();
        var peft = Lora(model);
        foreach (var smoothing in new[] { 0.0, 0.2 })
        {
            // LoRA starts with B = 0: the adapted model is the base model, so every implicit reward is 0.
            using var trainer = Trainer.ForAdapter(peft, Options(1));
            trainer.Objective = new DpoObjective(new DpoOptions { Beta = 0.1, LabelSmoothing = smoothing }, peft);
            var result = trainer.Evaluate(Pairs(), Collate);
            Assert.Equal(Math.Log(2), result.Loss, tolerance: 1e-5);
            Assert.Equal(0, result.Metrics["reward_margin"], tolerance: 1e-5);
            Assert.Equal(0, result.Metrics["reward_accuracy"]);
            Assert.Equal(result.Metrics["logps_chosen"], result.Metrics["ref_logps_chosen"], tolerance: 1e-4);
            Assert.True(result.Metrics["logps_chosen"] < -1, "log-probabilities of several tokens are well below 0");
        }
        // Full fine-tuning with the reference precomputed from the same weights: log 2 too.
        using var full = TrainerTests.TinyLlama();
        var pairs = DpoObjective.PrecomputeReference(full, Pairs(), Collate);
        using var fullTrainer = Trainer.ForModel(full, Options(1));
        fullTrainer.Objective = new DpoObjective();
        Assert.Equal(Math.Log(2), fullTrainer.Evaluate(pairs, Collate).Loss, tolerance: 1e-5);
    }

    [Fact]
    public void Lora_dpo_raises_the_margin_and_the_reference_is_the_frozen_base()
    {
        using var model = TrainerTests.TinyLlama();
        var data = Pairs();
        // The base model's log-probabilities before any training: what the reference must be throughout.
        var before = DpoObjective.PrecomputeReference(model, data, Collate);
        var peft = Lora(model, dropout: 0.1);
        using var trainer = Trainer.ForAdapter(peft, Options(10, lr: 3e-2) with { MicroBatchSize = 4 });
        trainer.Objective = new DpoObjective(new DpoOptions { Beta = 0.5 }, peft);
        var result = trainer.Train(data, Collate);

        var first = result.Steps[0].Extra;
        var last = result.Steps[^1].Extra;
        Assert.Equal(Math.Log(2), result.Steps[0].Loss, tolerance: 1e-4);
        Assert.True(last["reward_margin"] > 1.0, $"margin {last["reward_margin"]}");
        Assert.Equal(1.0, last["reward_accuracy"]);
        Assert.True(result.FinalLoss < 0.3, $"final loss {result.FinalLoss}");
        // The policy moved: chosen up relative to rejected.
        Assert.True(last["logps_chosen"] - last["logps_rejected"] > first["logps_chosen"] - first["logps_rejected"] + 2);

        // Every step (the whole data set is one batch) saw the same reference log-probabilities, those of the
        // base model before training: the adapter was disabled for them and the base weights never changed.
        double refChosen = before.Average(p => p.ReferenceLogps!.Value.Chosen);
        double refRejected = before.Average(p => p.ReferenceLogps!.Value.Rejected);
        Assert.All(result.Steps, s =>
        {
            Assert.Equal(refChosen, s.Extra["ref_logps_chosen"], tolerance: 1e-3);
            Assert.Equal(refRejected, s.Extra["ref_logps_rejected"], tolerance: 1e-3);
        });
        // And the adapted model is no longer the reference.
        Assert.True(Math.Abs(last["logps_chosen"] - refChosen) > 0.5);
        using (peft.DisableAdapters())
        {
            var after = DpoObjective.PrecomputeReference(peft, data, Collate);
            for (int i = 0; i < data.Length; i++) Assert.Equal(before[i].ReferenceLogps!.Value.Chosen, after[i].ReferenceLogps!.Value.Chosen, tolerance: 1e-4);
        }
    }

    [Fact]
    public void Full_fine_tuning_dpo_uses_the_precomputed_reference()
    {
        using var model = TrainerTests.TinyLlama();
        var data = DpoObjective.PrecomputeReference(model, Pairs(), Collate);
        using var trainer = Trainer.ForModel(model, Options(8, lr: 5e-3));
        trainer.Objective = new DpoObjective(new DpoOptions { Beta = 0.5 });
        var result = trainer.Train(data, Collate);
        Assert.True(result.Steps[^1].Extra["reward_margin"] > 1.0, $"margin {result.Steps[^1].Extra["reward_margin"]}");
        double refChosen = data.Average(p => p.ReferenceLogps!.Value.Chosen);
        Assert.All(result.Steps, s => Assert.Equal(refChosen, s.Extra["ref_logps_chosen"], 4));
        // Recomputed now, the model's own log-probabilities have moved away from the stored reference.
        var now = DpoObjective.PrecomputeReference(model, Pairs(), Collate);
        Assert.True(Math.Abs(now.Average(p => p.ReferenceLogps!.Value.Chosen) - refChosen) > 0.5);
    }

    [Fact]
    public void Loss_is_minus_log_sigmoid_of_the_margin_with_label_smoothing()
    {
        using var model = TrainerTests.TinyLlama();
        var peft = Lora(model);
        var pair = Pairs(count: 1);
        using var trainer = Trainer.ForAdapter(peft, Options(5) with { BatchSize = 1, MicroBatchSize = 1 });
        trainer.Objective = new DpoObjective(new DpoOptions { Beta = 0.3 }, peft);
        trainer.Train(pair, Collate);
        foreach (var smoothing in new[] { 0.0, 0.25 })
        {
            trainer.Objective = new DpoObjective(new DpoOptions { Beta = 0.3, LabelSmoothing = smoothing }, peft);
            var result = trainer.Evaluate(pair, Collate);
            double margin = result.Metrics["reward_margin"];
            Assert.True(Math.Abs(margin) > 0.05, $"margin {margin}");
            // The margin is β·((π_c − ref_c) − (π_r − ref_r)) as logged.
            double fromLogps = 0.3 * ((result.Metrics["logps_chosen"] - result.Metrics["ref_logps_chosen"]) - (result.Metrics["logps_rejected"] - result.Metrics["ref_logps_rejected"]));
            Assert.Equal(fromLogps, margin, tolerance: 1e-4);
            static double LogSigmoid(double x) => -Math.Log(1 + Math.Exp(-x));
            Assert.Equal(-(1 - smoothing) * LogSigmoid(margin) - smoothing * LogSigmoid(-margin), result.Loss, tolerance: 1e-4);
        }
    }

    [Fact]
    public void Dpo_without_a_reference_or_pairs_says_what_is_missing()
    {
        using var model = TrainerTests.TinyLlama();
        using var trainer = Trainer.ForModel(model, Options(1));
        trainer.Objective = new DpoObjective();
        Assert.Contains("reference", Assert.Throws<InvalidOperationException>(() => trainer.Evaluate(Pairs(), Collate)).Message);
        Assert.Contains("preference pairs", Assert.Throws<ArgumentException>(() => trainer.Evaluate(TrainerTests.Examples(), Collate)).Message);
        Assert.Throws<ArgumentException>(() => new DpoObjective(new DpoOptions { Beta = 0 }));
        Assert.Throws<ArgumentException>(() => new DpoObjective(new DpoOptions { LabelSmoothing = 0.5 }));
    }
}

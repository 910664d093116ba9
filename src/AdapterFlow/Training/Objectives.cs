using AdapterFlow.Adapters;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Training;

/// <summary>
/// What an objective computed for one micro-batch: the loss summed over its examples (the trainer divides by
/// the batch's total <see cref="ITrainingObjective.Weight"/>), extra metrics summed over its examples (the
/// trainer reports their mean per example; device tensors, read once per step), and its real tokens.
/// </summary>
public sealed record ObjectiveResult(Tensor LossSum, IReadOnlyList<Tensor> MetricSums, long Tokens);

/// <summary>
/// The seam between <see cref="Trainer"/> and what it minimises: causal-LM cross-entropy
/// (<see cref="LanguageModelingObjective"/>, for pretraining and SFT) or DPO (<see cref="DpoObjective"/>).
/// The trainer keeps batching, accumulation, clipping, logging and checkpoints.
/// </summary>
public interface ITrainingObjective
{
    /// <summary>Short name for logs ("sft", "dpo").</summary>
    string Name { get; }

    /// <summary>Names of the extra metrics, in the order of <see cref="ObjectiveResult.MetricSums"/> (snake_case, as logged).</summary>
    IReadOnlyList<string> MetricNames { get; }

    /// <summary>
    /// An example's share of a batch's normaliser: the loss of a step is Σ micro-batch LossSum / Σ Weight, so
    /// accumulating micro-batches equals one big batch. Labelled tokens for language modelling, 1 for a DPO pair.
    /// </summary>
    long Weight(Example example);

    /// <summary>Runs the model on <paramref name="examples"/> (autograd on unless the caller disabled it).</summary>
    ObjectiveResult Compute(nn.Module<ForwardInput, ForwardOutput> model, IReadOnlyList<Example> examples, Collator collator, Device device);
}

/// <summary>Shared pieces of the objectives.</summary>
internal static class ObjectiveParts
{
    /// <summary>The model's logits for the batch's real tokens.</summary>
    public static Tensor Logits(nn.Module<ForwardInput, ForwardOutput> model, Batch inputs)
    {
        var output = model.forward(new ForwardInput { InputIds = inputs.InputIds, AttentionMask = inputs.AttentionMask });
        // Prompt tuning puts its virtual tokens' logits first; they have no labels (PEFT pads the labels with
        // -100 for them), so only the positions of the real tokens count.
        var logits = output.Logits;
        if (logits.shape[1] > inputs.Labels.shape[1]) logits = logits[.., ^(int)inputs.Labels.shape[1]..];
        return logits;
    }

    /// <summary>
    /// Per-row sum of log p(label t | tokens before t) over the labelled positions, in float32: [batch].
    /// Through cross_entropy with reduction none, so no [batch, seq, vocab] log-softmax is kept for backward.
    /// </summary>
    public static Tensor SequenceLogProbs(Tensor logits, Tensor labels)
    {
        using var scope = NewDisposeScope();
        long rows = logits.shape[0], vocab = logits.shape[2];
        var shiftedLogits = logits[.., ..^1, ..].reshape(-1, vocab).to(ScalarType.Float32);
        var shiftedLabels = labels[.., 1..].reshape(-1).to(ScalarType.Int64);
        var nll = nn.functional.cross_entropy(shiftedLogits, shiftedLabels, ignore_index: Example.IgnoreIndex, reduction: nn.Reduction.None);
        return (-nll.reshape(rows, -1).sum(1)).MoveToOuterDisposeScope();
    }
}

/// <summary>Next-token cross-entropy over the labelled tokens: pretraining, continued pretraining and SFT.</summary>
public sealed class LanguageModelingObjective(string name = "sft") : ITrainingObjective
{
    public string Name { get; } = name;

    public IReadOnlyList<string> MetricNames { get; } = [];

    public long Weight(Example example) => ChatTokenizer.LabelCount(example);

    public ObjectiveResult Compute(nn.Module<ForwardInput, ForwardOutput> model, IReadOnlyList<Example> examples, Collator collator, Device device)
    {
        using var inputs = collator.Collate(examples, device);
        var logits = ObjectiveParts.Logits(model, inputs);
        return new ObjectiveResult(CausalLMLoss.Sum(logits, inputs.Labels), [], inputs.Tokens);
    }
}

/// <summary>Hyper-parameters of DPO.</summary>
public sealed record DpoOptions
{
    /// <summary>β: how far the policy may move from the reference (TRL's default 0.1).</summary>
    public double Beta { get; init; } = 0.1;

    /// <summary>ε of conservative DPO: the preference labels are assumed flipped with this probability (0 = plain DPO).</summary>
    public double LabelSmoothing { get; init; }

    internal void Validate()
    {
        if (!(Beta > 0) || !double.IsFinite(Beta)) throw new ArgumentException($"beta must be positive, got {Beta}");
        if (LabelSmoothing is < 0 or >= 0.5) throw new ArgumentException($"label smoothing must be in [0, 0.5), got {LabelSmoothing}");
    }
}

/// <summary>
/// Direct Preference Optimization (Rafailov et al., 2023) on pairs (<see cref="Example"/> = chosen,
/// <see cref="Example.Rejected"/> = rejected, labels on the replies): with log-probabilities summed over the
/// reply tokens, h = β·[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))] and
/// loss = −(1−ε)·log σ(h) − ε·log σ(−h) (ε = label smoothing, as cDPO / TRL's "sigmoid" loss).
/// The reference is either the same model with its adapter disabled (<paramref name="reference"/>: no second
/// copy of the weights, evaluated under no_grad in eval mode), or log-probabilities precomputed once before
/// training (<see cref="PrecomputeReference"/>, needed for full fine-tuning, where the weights themselves move).
/// Metrics per pair, as TRL logs them: rewards β·(log π − log π_ref) of chosen and rejected, their margin, the
/// fraction of pairs whose chosen reward is higher, and the policy and reference log-probabilities.
/// </summary>
public sealed class DpoObjective(DpoOptions? options = null, PeftModel? reference = null) : ITrainingObjective
{
    public DpoOptions Options { get; } = Validated(options ?? new DpoOptions());

    private static DpoOptions Validated(DpoOptions options)
    {
        options.Validate();
        return options;
    }

    public string Name => "dpo";

    public IReadOnlyList<string> MetricNames { get; } =
        ["rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "logps_chosen", "logps_rejected", "ref_logps_chosen", "ref_logps_rejected"];

    public long Weight(Example example) => 1;

    public ObjectiveResult Compute(nn.Module<ForwardInput, ForwardOutput> model, IReadOnlyList<Example> examples, Collator collator, Device device)
    {
        var (chosen, rejected) = Split(examples);
        using var inputs = collator.Collate([.. chosen, .. rejected], device);
        // Chosen and rejected in one forward pass: rows [0, n) are chosen, [n, 2n) rejected.
        var logps = ObjectiveParts.SequenceLogProbs(ObjectiveParts.Logits(model, inputs), inputs.Labels);
        int n = examples.Count;
        var policyChosen = logps[..n];
        var policyRejected = logps[n..];
        Tensor refChosen, refRejected;
        if (examples.All(e => e.ReferenceLogps is not null))
        {
            refChosen = tensor(examples.Select(e => (float)e.ReferenceLogps!.Value.Chosen).ToArray(), device: device);
            refRejected = tensor(examples.Select(e => (float)e.ReferenceLogps!.Value.Rejected).ToArray(), device: device);
        }
        else
        {
            if (reference is null)
                throw new InvalidOperationException("DPO needs reference log-probabilities: train an adapter (the base model with the adapter disabled is the reference) or precompute them (DpoObjective.PrecomputeReference)");
            var refLogps = ReferenceLogProbs(reference, inputs);
            refChosen = refLogps[..n];
            refRejected = refLogps[n..];
        }
        var h = Options.Beta * ((policyChosen - refChosen) - (policyRejected - refRejected));
        var losses = -(1 - Options.LabelSmoothing) * nn.functional.logsigmoid(h);
        if (Options.LabelSmoothing > 0) losses = losses - Options.LabelSmoothing * nn.functional.logsigmoid(-h);
        var rewardChosen = Options.Beta * (policyChosen - refChosen).detach();
        var rewardRejected = Options.Beta * (policyRejected - refRejected).detach();
        var margin = rewardChosen - rewardRejected;
        Tensor[] metrics =
        [
            rewardChosen.sum(), rewardRejected.sum(), margin.sum(), (margin > 0).to(ScalarType.Float32).sum(),
            policyChosen.detach().sum(), policyRejected.detach().sum(), refChosen.sum(), refRejected.sum(),
        ];
        return new ObjectiveResult(losses.sum(), metrics, inputs.Tokens);
    }

    /// <summary>Log-probabilities of the base model (adapter disabled), without autograd and without dropout.</summary>
    private static Tensor ReferenceLogProbs(PeftModel model, Batch inputs)
    {
        using var noGrad = no_grad();
        bool training = model.training;
        if (training) model.eval();
        try
        {
            using var disabled = model.DisableAdapters();
            return ObjectiveParts.SequenceLogProbs(ObjectiveParts.Logits(model, inputs), inputs.Labels);
        }
        finally
        {
            if (training) model.train();
        }
    }

    private static (Example[] Chosen, Example[] Rejected) Split(IReadOnlyList<Example> examples)
    {
        var chosen = new Example[examples.Count];
        var rejected = new Example[examples.Count];
        for (int i = 0; i < examples.Count; i++)
        {
            var e = examples[i];
            rejected[i] = e.Rejected ?? throw new ArgumentException("DPO needs preference pairs (examples with a rejected sequence); this one has none");
            chosen[i] = new Example(e.InputIds, e.Labels);
        }
        return (chosen, rejected);
    }

    /// <summary>
    /// The pairs with <see cref="Example.ReferenceLogps"/> filled in by <paramref name="reference"/> (run once,
    /// under no_grad, in eval mode, <paramref name="microBatchSize"/> pairs at a time). For full fine-tuning
    /// call it before training, while the model is still the reference; for an adapter, call it inside
    /// <see cref="PeftModel.DisableAdapters"/> to save the second forward pass per step.
    /// </summary>
    public static IReadOnlyList<Example> PrecomputeReference(nn.Module<ForwardInput, ForwardOutput> reference, IReadOnlyList<Example> pairs, Collator collator,
        int microBatchSize = 8, Device? device = null)
    {
        ArgumentNullException.ThrowIfNull(reference);
        device ??= reference.parameters().FirstOrDefault()?.device ?? CPU;
        var result = new List<Example>(pairs.Count);
        bool training = reference.training;
        reference.eval();
        try
        {
            using var noGrad = no_grad();
            foreach (var micro in pairs.Chunk(Math.Max(1, microBatchSize)))
            {
                using var scope = NewDisposeScope();
                var (chosen, rejected) = Split(micro);
                using var inputs = collator.Collate([.. chosen, .. rejected], device);
                var logps = ObjectiveParts.SequenceLogProbs(ObjectiveParts.Logits(reference, inputs), inputs.Labels).to(ScalarType.Float64).cpu().data<double>().ToArray();
                for (int i = 0; i < micro.Length; i++) result.Add(micro[i] with { ReferenceLogps = (logps[i], logps[micro.Length + i]) });
            }
        }
        finally
        {
            if (training) reference.train();
        }
        return result;
    }
}

using System.Globalization;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Training;

/// <summary>The per-layer scale e(l) of the early-exit loss before normalisation (l = 0-based layer index).</summary>
public enum EarlyExitScale
{
    /// <summary>e(l) = 1.</summary>
    Uniform,
    /// <summary>e(l) = l + 1: later exits weigh more.</summary>
    Linear,
    /// <summary>e(l) = Σ_{i=1}^{l+1} i = (l+1)(l+2)/2 (LayerSkip's sum_l); grows quadratically with depth.</summary>
    Sum,
    /// <summary>e(l) = √(l + 1).</summary>
    Sqrt,
    /// <summary>e(l) = 1/(l + 1): early exits weigh more.</summary>
    Inverse,
    /// <summary>e(l) = 1/√(l + 1).</summary>
    InverseSqrt,
}

/// <summary>Which layers' exits are trained at a step, C(t, l). The last layer is always trained.</summary>
public enum EarlyExitCurriculum
{
    /// <summary>Every layer at every step.</summary>
    None,
    /// <summary>Every R-th layer, the set rotating by one layer per step: layer l at step t when (l + t) mod R = 0.</summary>
    Rotational,
    /// <summary>Layers switched on from the last down: layer l from step T·(L − l)/(2L), so all are on by mid-training.</summary>
    Gradual,
}

/// <summary>
/// LayerSkip's early-exit loss (Elhoushi et al. 2024, §4.2): the shared final norm and LM head read every trained
/// layer's output, and the loss is J = Σ_l ẽ(t, l)·CE_l with ẽ(t, l) = C(t, l)·e(l) / Σ_i C(t, i)·e(i).
/// <c>new EarlyExitOptions()</c> trains every exit with LayerSkip's sum-of-l scale.
/// </summary>
/// <param name="Scale">e(l), the weight of each layer's loss before normalisation.</param>
/// <param name="Curriculum">C(t, l), which exits are trained at step t.</param>
/// <param name="Rotation">R of the rotational curriculum: every R-th layer is trained at a step.</param>
/// <param name="EarlyLayerScale">
/// LayerSkip's e_scale: multiplies e(l) of every layer but the last before normalising, so below 1 the last layer
/// keeps more of the weight (0 would leave only the last layer, i.e. plain training, and is refused).
/// </param>
/// <param name="Distillation">
/// α in [0, 1]: an early exit's term becomes (1 − α)·CE_l + α·KL(p_L ‖ p_l), the KL divergence from the last layer's
/// next-token distribution (detached: a teacher, not trained by this term) to the exit's. Not in the paper (α = 0):
/// self-speculative drafts are accepted when the exit agrees with the last layer, not with the data, so this trains
/// the exits toward what verification checks.
/// </param>
/// <param name="Layers">
/// The exits trained, as exit layers E (1-based: the output of the first E layers, as <c>--exit-layer</c> counts them);
/// null = every layer. Not in the paper: self-speculative decoding drafts from one exit, so training only that exit (and
/// its neighbours) gives it every step's gradient instead of a share. The curriculum still applies to the listed exits,
/// and the last layer is always trained.
/// </param>
public sealed record EarlyExitOptions(EarlyExitScale Scale = EarlyExitScale.Sum, EarlyExitCurriculum Curriculum = EarlyExitCurriculum.None,
    int Rotation = 4, double EarlyLayerScale = 1.0, double Distillation = 0, IReadOnlyList<int>? Layers = null)
{
    /// <summary>Throws a one-line <see cref="ArgumentException"/> when a value is out of range.</summary>
    public void Validate()
    {
        if (!Enum.IsDefined(Scale)) throw new ArgumentException($"unknown early-exit scale {Scale}");
        if (!Enum.IsDefined(Curriculum)) throw new ArgumentException($"unknown early-exit curriculum {Curriculum}");
        if (Rotation < 1) throw new ArgumentException($"early-exit rotation must be at least 1, got {Rotation}");
        if (!(EarlyLayerScale > 0) || !double.IsFinite(EarlyLayerScale))
            throw new ArgumentException($"early-exit layer scale must be a positive number, got {EarlyLayerScale.ToString(CultureInfo.InvariantCulture)}");
        if (!(Distillation >= 0 && Distillation <= 1))
            throw new ArgumentException($"early-exit distillation must be between 0 and 1, got {Distillation.ToString(CultureInfo.InvariantCulture)}");
        if (Layers is { Count: 0 }) throw new ArgumentException("early-exit layers: the list is empty (leave it out to train every exit)");
        foreach (int layer in Layers ?? [])
            if (layer < 1) throw new ArgumentException($"early-exit layers count from 1 (the first layer's output), got {layer}");
    }

    /// <summary>Parses uniform, linear, sum, sqrt, inv or inv-sqrt (LayerSkip's one, l, sum_l, sqrt_l, inv_l, inv_sqrt_l also work).</summary>
    public static EarlyExitScale ParseScale(string name) => name.ToLowerInvariant().Replace('-', '_') switch
    {
        "uniform" or "one" => EarlyExitScale.Uniform,
        "linear" or "l" => EarlyExitScale.Linear,
        "sum" or "sum_l" => EarlyExitScale.Sum,
        "sqrt" or "sqrt_l" => EarlyExitScale.Sqrt,
        "inv" or "inverse" or "inv_l" => EarlyExitScale.Inverse,
        "inv_sqrt" or "inverse_sqrt" or "inv_sqrt_l" => EarlyExitScale.InverseSqrt,
        _ => throw new ArgumentException($"unknown early-exit scale '{name}' (expected uniform, linear, sum, sqrt, inv or inv-sqrt)"),
    };

    /// <summary>Parses none, rotational (or rot) or gradual.</summary>
    public static EarlyExitCurriculum ParseCurriculum(string name) => name.ToLowerInvariant() switch
    {
        "none" => EarlyExitCurriculum.None,
        "rotational" or "rot" => EarlyExitCurriculum.Rotational,
        "gradual" => EarlyExitCurriculum.Gradual,
        _ => throw new ArgumentException($"unknown early-exit curriculum '{name}' (expected none, rotational or gradual)"),
    };
}

/// <summary>
/// The normalised early-exit weights ẽ(t, l) of one training run. A pure function of the step, so a resumed run
/// weighs its layers exactly as the uninterrupted one.
/// </summary>
public sealed class EarlyExitSchedule
{
    /// <summary>Fraction of training by which the gradual curriculum has switched every layer on (LayerSkip: half).</summary>
    public const double GradualFraction = 0.5;

    public EarlyExitSchedule(EarlyExitOptions options, int numLayers, int totalSteps)
    {
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        if (numLayers < 1) throw new ArgumentException($"the early-exit loss needs at least one layer, got {numLayers}");
        if (totalSteps < 1) throw new ArgumentException($"the early-exit loss needs a positive number of training steps, got {totalSteps}");
        foreach (int layer in options.Layers ?? [])
            if (layer > numLayers) throw new ArgumentException($"early-exit layer {layer} is beyond the model's {numLayers} layers");
        Options = options;
        NumLayers = numLayers;
        TotalSteps = totalSteps;
    }

    public EarlyExitOptions Options { get; }
    public int NumLayers { get; }
    public int TotalSteps { get; }

    /// <summary>C(t, l): whether layer l's exit is trained at optimizer step <paramref name="step"/> (0-based); the last layer always is.</summary>
    public bool[] ActiveLayers(int step)
    {
        if (step < 0) throw new ArgumentOutOfRangeException(nameof(step), $"step must be non-negative, got {step}");
        int layers = NumLayers;
        var active = new bool[layers];
        for (int l = 0; l < layers; l++)
        {
            active[l] = Options.Curriculum switch
            {
                EarlyExitCurriculum.None => true,
                EarlyExitCurriculum.Rotational => (l + (long)step) % Options.Rotation == 0,
                // Layer l joins once the trained fraction reaches half of (L − l)/L: the last layer at 1/(2L), layer 0 at 1/2.
                EarlyExitCurriculum.Gradual => (double)step / TotalSteps >= GradualFraction * (layers - l) / layers,
                _ => throw new ArgumentOutOfRangeException(nameof(step), $"unknown early-exit curriculum {Options.Curriculum}"),
            };
        }
        if (Options.Layers is { } listed)
            for (int l = 0; l < layers; l++) active[l] &= listed.Contains(l + 1);
        active[^1] = true;
        return active;
    }

    /// <summary>ẽ(t, l) for every layer at step <paramref name="step"/>: 0 for layers not trained then, summing to 1.</summary>
    public double[] WeightsAt(int step)
    {
        var active = ActiveLayers(step);
        var weights = new double[NumLayers];
        double total = 0;
        for (int l = 0; l < NumLayers; l++)
        {
            if (!active[l]) continue;
            weights[l] = LayerScale(Options.Scale, l) * (l < NumLayers - 1 ? Options.EarlyLayerScale : 1.0);
            total += weights[l];
        }
        for (int l = 0; l < NumLayers; l++) weights[l] /= total;
        return weights;
    }

    /// <summary>e(l) for 0-based layer <paramref name="layer"/>, before the early-layer factor and normalisation.</summary>
    public static double LayerScale(EarlyExitScale scale, int layer)
    {
        if (layer < 0) throw new ArgumentOutOfRangeException(nameof(layer), $"layer must be non-negative, got {layer}");
        double n = layer + 1;
        return scale switch
        {
            EarlyExitScale.Uniform => 1,
            EarlyExitScale.Linear => n,
            EarlyExitScale.Sum => n * (n + 1) / 2,
            EarlyExitScale.Sqrt => Math.Sqrt(n),
            EarlyExitScale.Inverse => 1 / n,
            EarlyExitScale.InverseSqrt => 1 / Math.Sqrt(n),
            _ => throw new ArgumentOutOfRangeException(nameof(scale), $"unknown early-exit scale {scale}"),
        };
    }
}

/// <summary>
/// Computing the early-exit loss of a forward pass run with <see cref="ForwardInput.OutputHiddenStates"/>. Each
/// exit's logits are [batch, time, vocab], as large as the model's own output, so <see cref="Backward"/> (what the
/// trainer uses) never holds more than one exit's logits at a time.
/// </summary>
public static class EarlyExitLoss
{
    /// <summary>The losses of one micro-batch, detached, on the model's device (read them once per step).</summary>
    /// <param name="Weighted">J = Σ_l ẽ_l·CE_l (with distillation, the early exits' terms mix in the KL divergence: the objective optimised).</param>
    /// <param name="LastLayer">CE of the last layer (the plain training loss).</param>
    /// <param name="PerLayer">[layers] CE of each exit, 0 where the weight was 0.</param>
    public sealed record Losses(Tensor Weighted, Tensor LastLayer, Tensor PerLayer);

    /// <summary>
    /// J = Σ_l ẽ_l·CE_l as one tensor with its whole graph, CE_l being the summed next-token cross-entropy at layer l's
    /// exit divided by <paramref name="divisor"/> (the batch's labelled tokens). Simple, but keeps every exit's logits
    /// alive until backward; prefer <see cref="Backward"/> for training.
    /// </summary>
    public static Tensor Compute(CausalLM model, ForwardOutput output, Tensor labels, IReadOnlyList<double> weights, double divisor = 1,
        double distillation = 0)
    {
        var states = CheckArguments(model, output, labels, weights, divisor, distillation);
        int layers = model.NumLayers;
        using var teacher = distillation > 0 ? Teacher.From(LabelledPositions(output.Logits, labels), labels) : null;
        Tensor? total = null;
        for (int l = 0; l < layers; l++)
        {
            if (weights[l] == 0) continue;
            Tensor term;
            if (l == layers - 1) term = CausalLMLoss.Sum(LabelledPositions(output.Logits, labels), labels) / divisor;
            else (term, _) = ExitObjective(model.HeadLogits(LabelledPositions(states[l + 1], labels)), labels, divisor, teacher, distillation);
            term = term * weights[l];
            total = total is null ? term : total + term;
        }
        return total!;
    }

    /// <summary>
    /// An early exit's term of J and its cross-entropy (per <paramref name="divisor"/>): the cross-entropy alone, or
    /// with a teacher (1 − α)·CE + α·KL(teacher ‖ exit) over the same shifted, labelled positions.
    /// </summary>
    private static (Tensor Objective, Tensor CrossEntropy) ExitObjective(Tensor logits, Tensor labels, double divisor, Teacher? teacher, double alpha)
    {
        var ce = CausalLMLoss.Sum(logits, labels) / divisor;
        if (teacher is null) return (ce, ce);
        var student = teacher.Select(logits).log_softmax(-1);
        var kl = (teacher.Entropy - (teacher.Probabilities * student).sum()) / divisor; // Σ p (log p − log q)
        return (ce * (1 - alpha) + kl * alpha, ce);
    }

    /// <summary>The last layer's next-token distribution at the labelled positions, detached (the distillation target).</summary>
    private sealed class Teacher : IDisposable
    {
        private readonly Tensor _rows;   // indices into the flattened shifted positions that carry a label
        public Tensor Probabilities { get; }
        public Tensor Entropy { get; }   // Σ p log p over those rows (negative entropy), a constant of the KL

        private Teacher(Tensor rows, Tensor probabilities, Tensor entropy) => (_rows, Probabilities, Entropy) = (rows, probabilities, entropy);

        public static Teacher From(Tensor lastLogits, Tensor labels)
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            // The rows CausalLMLoss scores, so CE and KL cover the same positions.
            var rows = (CausalLMLoss.NextTokenLabels(labels) != Example.IgnoreIndex).nonzero().reshape(-1);
            var logProbabilities = Shifted(lastLogits.detach(), rows).log_softmax(-1);
            var probabilities = logProbabilities.exp();
            var negativeEntropy = (probabilities * logProbabilities).sum();
            return new Teacher(rows.MoveToOuterDisposeScope(), probabilities.MoveToOuterDisposeScope(), negativeEntropy.MoveToOuterDisposeScope());
        }

        /// <summary>The same rows of another exit's logits, float32.</summary>
        public Tensor Select(Tensor logits) => Shifted(logits, _rows);

        private static Tensor Shifted(Tensor logits, Tensor rows) =>
            CausalLMLoss.NextTokenLogits(logits).index_select(0, rows).to(ScalarType.Float32);

        public void Dispose()
        {
            _rows.Dispose();
            Probabilities.Dispose();
            Entropy.Dispose();
        }
    }

    /// <summary>
    /// Back-propagates J (as <see cref="Compute"/> defines it) and returns the losses, detached. Each early exit's head
    /// runs on a detached copy of its hidden state and is back-propagated at once, which frees its logits; the
    /// gradients that reach the hidden states are then sent through the layers in one backward pass together with
    /// the last layer's loss, so the layers are back-propagated once, not once per exit.
    /// </summary>
    public static Losses Backward(CausalLM model, ForwardOutput output, Tensor labels, IReadOnlyList<double> weights, double divisor = 1,
        double distillation = 0)
    {
        var states = CheckArguments(model, output, labels, weights, divisor, distillation);
        int layers = model.NumLayers;
        using var teacher = distillation > 0 ? Teacher.From(LabelledPositions(output.Logits, labels), labels) : null;
        var perLayer = new Tensor[layers];
        var device = output.Logits.device;
        Tensor? weighted = null;
        Tensor? surrogate = null;
        for (int l = 0; l < layers - 1; l++)
        {
            if (weights[l] == 0)
            {
                perLayer[l] = zeros(1, dtype: ScalarType.Float32, device: device);
                continue;
            }
            var state = LabelledPositions(states[l + 1], labels);
            using var exitInput = state.detach().requires_grad_(state.requires_grad);
            Tensor loss, objective;
            using (var scope = NewDisposeScope())
            {
                var (term, ce) = ExitObjective(model.HeadLogits(exitInput), labels, divisor, teacher, distillation);
                if (term.requires_grad) (term * weights[l]).backward();
                loss = ce.detach().MoveToOuterDisposeScope();
                objective = ReferenceEquals(term, ce) ? loss : term.detach().MoveToOuterDisposeScope();
            }
            perLayer[l] = loss.reshape(1);
            weighted = weighted is null ? objective * weights[l] : weighted + objective * weights[l];
            if (exitInput.grad is { } grad)
            {
                // d(Σ state·grad)/d(state) = grad: the head's gradient continues into the layers with the last exit's.
                var term = (state * grad).sum();
                surrogate = surrogate is null ? term : surrogate + term;
            }
        }
        var last = CausalLMLoss.Sum(LabelledPositions(output.Logits, labels), labels) / divisor;
        var lastTerm = last * weights[^1];
        surrogate = surrogate is null ? lastTerm : surrogate + lastTerm;
        if (surrogate.requires_grad) surrogate.backward();
        var lastDetached = last.detach();
        perLayer[^1] = lastDetached.reshape(1);
        weighted = weighted is null ? lastDetached * weights[^1] : weighted + lastDetached * weights[^1];
        return new Losses(weighted, lastDetached, cat(perLayer));
    }

    /// <summary>
    /// Mean next-token cross-entropy per labelled token at every exit (element l = after layer l; the last element is
    /// the model's ordinary loss), over <paramref name="data"/> in eval mode: how well early exits predict.
    /// </summary>
    public static double[] PerLayerLosses(CausalLM model, IReadOnlyList<Example> data, Collator collator, int batchSize = 8)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(data);
        ArgumentNullException.ThrowIfNull(collator);
        if (data.Count == 0) throw new ArgumentException("no examples to evaluate");
        if (batchSize < 1) throw new ArgumentException($"batch size must be positive, got {batchSize}");
        bool wasTraining = model.training;
        model.eval();
        try
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            var device = model.Device;
            var sums = zeros(model.NumLayers, dtype: ScalarType.Float64, device: device);
            long labelled = 0;
            foreach (var batch in data.Chunk(batchSize))
            {
                using var batchScope = NewDisposeScope();
                using var inputs = collator.Collate(batch, device);
                var output = model.forward(new ForwardInput { InputIds = inputs.InputIds, AttentionMask = inputs.AttentionMask, OutputHiddenStates = true });
                var states = output.HiddenStates!;
                for (int l = 0; l < model.NumLayers; l++)
                {
                    var logits = l == model.NumLayers - 1 ? LabelledPositions(output.Logits, inputs.Labels) : model.HeadLogits(LabelledPositions(states[l + 1], inputs.Labels));
                    sums[l].add_(CausalLMLoss.Sum(logits, inputs.Labels).to(ScalarType.Float64));
                }
                labelled += inputs.LabelTokens;
            }
            return sums.cpu().data<double>().Select(s => s / Math.Max(1, labelled)).ToArray();
        }
        finally
        {
            if (wasTraining) model.train();
        }
    }

    /// <summary>Prompt tuning puts virtual tokens before the real ones; they carry no labels, so only the last positions count.</summary>
    private static Tensor LabelledPositions(Tensor perPosition, Tensor labels) =>
        perPosition.shape[1] > labels.shape[1] ? perPosition[.., ^(int)labels.shape[1]..] : perPosition;

    private static IReadOnlyList<Tensor> CheckArguments(CausalLM model, ForwardOutput output, Tensor labels, IReadOnlyList<double> weights, double divisor,
        double distillation)
    {
        if (!(distillation >= 0 && distillation <= 1)) throw new ArgumentException($"the distillation weight must be between 0 and 1, got {distillation.ToString(CultureInfo.InvariantCulture)}");
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(output);
        ArgumentNullException.ThrowIfNull(labels);
        ArgumentNullException.ThrowIfNull(weights);
        var states = output.HiddenStates ?? throw new ArgumentException("the early-exit loss needs the hidden states: run the forward with OutputHiddenStates");
        if (states.Count != model.NumLayers + 1)
            throw new ArgumentException($"the early-exit loss needs the hidden state after each of the {model.NumLayers} layers, got {states.Count - 1} (was the forward run with ExitLayer or StartLayer?)");
        if (weights.Count != model.NumLayers) throw new ArgumentException($"early-exit weights give {weights.Count} values for {model.NumLayers} layers");
        if (weights.Any(w => !(w >= 0) || !double.IsFinite(w))) throw new ArgumentException("early-exit weights must be non-negative numbers");
        if (!(weights[^1] > 0)) throw new ArgumentException("the last layer's early-exit weight must be positive");
        if (!(divisor > 0)) throw new ArgumentException($"the loss divisor must be positive, got {divisor}");
        return states;
    }
}

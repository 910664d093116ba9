using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Models;

/// <summary>What one forward pass of a causal language model gets.</summary>
public sealed class ForwardInput
{
    /// <summary>Token ids, int64 [batch, time]. Give this or <see cref="InputsEmbeds"/>.</summary>
    public Tensor? InputIds { get; init; }

    /// <summary>Input vectors [batch, time, hidden] in place of the embedding lookup (prompt tuning feeds these).</summary>
    public Tensor? InputsEmbeds { get; init; }

    /// <summary>
    /// Hugging Face convention: [batch, past + time], 1 for a real token, 0 for padding, covering the cached
    /// keys and the new tokens. Null means every key is real.
    /// </summary>
    public Tensor? AttentionMask { get; init; }

    /// <summary>Positions [batch, time]. Null means past .. past + time - 1 in every row, as transformers does.</summary>
    public Tensor? PositionIds { get; init; }

    /// <summary>Key/value cache to read and extend; null runs without one.</summary>
    public KVCache? Cache { get; init; }

    /// <summary>Run only the first N decoder layers, then the final norm and head (early exit). Null = all layers.</summary>
    public int? ExitLayer { get; init; }

    /// <summary>Return the hidden state before each layer and after the last one run.</summary>
    public bool OutputHiddenStates { get; init; }

    /// <summary>Compute logits for the last position only (decoding: saves the vocabulary GEMM on the prompt).</summary>
    public bool LastPositionOnly { get; init; }
}

/// <summary>What a forward pass returns.</summary>
public sealed class ForwardOutput
{
    public ForwardOutput(Tensor logits, IReadOnlyList<Tensor>? hiddenStates)
    {
        Logits = logits;
        HiddenStates = hiddenStates;
    }

    /// <summary>[batch, time, vocab] (time = 1 with <see cref="ForwardInput.LastPositionOnly"/>).</summary>
    public Tensor Logits { get; }

    /// <summary>
    /// With <see cref="ForwardInput.OutputHiddenStates"/>: element 0 is the embedding output and element i + 1 the
    /// output of decoder layer i, before the final norm.
    /// </summary>
    public IReadOnlyList<Tensor>? HiddenStates { get; }
}

/// <summary>
/// Per-forward state the decoder layers share: the attention mask, positions and cache. Families with extra
/// shared state (rotary tables, ALiBi slopes) derive from it.
/// </summary>
public class LayerContext
{
    public LayerContext(Tensor? mask, bool isCausal, Tensor positionIds, KVCache? cache, int pastLength)
    {
        Mask = mask;
        IsCausal = isCausal;
        PositionIds = positionIds;
        Cache = cache;
        PastLength = pastLength;
    }

    /// <summary>Boolean [batch, 1, time, past + time], true = may attend; null when <see cref="IsCausal"/> or nothing to mask.</summary>
    public Tensor? Mask { get; }

    /// <summary>True when plain causal masking is enough (no padding, no cache): SDPA's fast path.</summary>
    public bool IsCausal { get; }

    public Tensor PositionIds { get; }
    public KVCache? Cache { get; }
    public int PastLength { get; }
}

/// <summary>
/// A decoder-only language model: embeddings, a stack of decoder layers, a final norm and an output head.
/// Submodules are registered under the Hugging Face names so that state-dict keys match checkpoints and PEFT
/// target modules one to one. Families implement the three stages; the loop lives here so that early exit,
/// hidden-state output and layer-wise tricks work the same for every family.
/// </summary>
public abstract class CausalLM : nn.Module<ForwardInput, ForwardOutput>
{
    protected CausalLM(string name) : base(name) { }

    /// <summary>The typed configuration this model was built from.</summary>
    public abstract ModelConfig Config { get; }

    /// <summary>Number of decoder layers.</summary>
    public int NumLayers => Config.NumHiddenLayers;

    /// <summary>The input embedding lookup (token embeddings only: no positions, no scaling).</summary>
    public abstract Tensor EmbedTokens(Tensor inputIds);

    /// <summary>Builds the shared per-forward state and the hidden state that enters layer 0.</summary>
    protected abstract LayerContext Prepare(ForwardInput input, out Tensor hidden);

    /// <summary>Runs decoder layer <paramref name="index"/>.</summary>
    protected abstract Tensor RunLayer(int index, Tensor hidden, LayerContext context);

    /// <summary>Final norm (if the family has one) and output head.</summary>
    protected abstract Tensor Head(Tensor hidden);

    public override ForwardOutput forward(ForwardInput input)
    {
        var context = Prepare(input, out var hidden);
        int layers = input.ExitLayer ?? NumLayers;
        if (layers < 1 || layers > NumLayers)
            throw new ArgumentOutOfRangeException(nameof(input), $"exit layer {layers} is outside 1..{NumLayers}");
        var states = input.OutputHiddenStates ? new List<Tensor>(layers + 1) : null;
        for (int i = 0; i < layers; i++)
        {
            states?.Add(hidden);
            hidden = RunLayer(i, hidden, context);
        }
        states?.Add(hidden);
        if (input.LastPositionOnly)
            hidden = hidden.narrow(1, hidden.shape[1] - 1, 1);
        return new ForwardOutput(Head(hidden), states);
    }

    /// <summary>Convenience overload: logits for token ids.</summary>
    public Tensor Logits(Tensor inputIds, Tensor? attentionMask = null, Tensor? positionIds = null) =>
        forward(new ForwardInput { InputIds = inputIds, AttentionMask = attentionMask, PositionIds = positionIds }).Logits;

    /// <summary>A cache with one slot per decoder layer.</summary>
    public virtual KVCache CreateCache() => new(NumLayers);

    /// <summary>
    /// A cache for generating <paramref name="batchSize"/> rows. Models that place virtual tokens before the prompt
    /// (prefix or prompt tuning) return it pre-filled; its length is then where the prompt starts.
    /// </summary>
    public virtual KVCache CreateCache(long batchSize) => CreateCache();

    /// <summary>Number of parameters (tied weights counted once).</summary>
    public long ParameterCount()
    {
        var seen = new HashSet<IntPtr>();
        long total = 0;
        foreach (var p in parameters())
            if (seen.Add(p.Handle)) total += p.numel();
        return total;
    }

    /// <summary>The dtype of the weights.</summary>
    public ScalarType DType => parameters().First().dtype;

    /// <summary>The device of the weights.</summary>
    public Device Device => parameters().First().device;
}

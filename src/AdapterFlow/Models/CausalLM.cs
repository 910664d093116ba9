using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Models;

/// <summary>
/// What one forward pass of a causal language model gets. A record, so wrappers (adapters) pass it on with
/// <c>input with { ... }</c> and never drop a field they do not know about.
/// </summary>
public sealed record ForwardInput
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

    /// <summary>
    /// Start at this decoder layer instead of 0, with <see cref="LayerInput"/> as the hidden state entering it
    /// (self-speculative verification runs the remaining layers on the draft's cached exit states). The ids or
    /// embeddings are still needed for the batch shape; the cache's past length is that of this layer.
    /// </summary>
    public int StartLayer { get; init; }

    /// <summary>The hidden state [batch, time, hidden] entering <see cref="StartLayer"/> (required when it is above 0).</summary>
    public Tensor? LayerInput { get; init; }

    /// <summary>
    /// Layer dropout (LayerSkip): per layer, the probability that a batch row skips it (its hidden state passes
    /// through unchanged). Applied only while the model is training; null or zeros = no dropout.
    /// </summary>
    public IReadOnlyList<double>? LayerDropout { get; init; }

    /// <summary>Tokens already in the cache for the first layer this pass runs (0 without a cache).</summary>
    public int PastLength => Cache?.LayerLength(StartLayer) ?? 0;

    /// <summary>Return the hidden state before each layer and after the last one run.</summary>
    public bool OutputHiddenStates { get; init; }

    /// <summary>Compute logits for the last position only (decoding: saves the vocabulary GEMM on the prompt).</summary>
    public bool LastPositionOnly { get; init; }

    /// <summary>
    /// Skip the final norm and head: <see cref="ForwardOutput.Logits"/> is empty [batch, 0, vocab]. For passes whose
    /// hidden states (<see cref="OutputHiddenStates"/>) only feed later layers, e.g. the last draft token of
    /// self-speculative decoding, where the head would be a wasted vocabulary GEMM.
    /// </summary>
    public bool SkipHead { get; init; }

    /// <summary>
    /// Panel copies of weight matrices (<see cref="Cpu.PanelMatrix"/>) the CPU decode kernels read instead of the
    /// matrices themselves in a pass over several tokens. Whoever passes them has checked them against the weights
    /// (self-speculative verification does, once per generation); null = the weights themselves.
    /// </summary>
    internal Cpu.PackedWeights? PackedWeights { get; init; }
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
    /// With <see cref="ForwardInput.OutputHiddenStates"/>: element 0 is the hidden state entering the first layer
    /// run (the embedding output unless <see cref="ForwardInput.StartLayer"/> is set) and element i + 1 the output
    /// of the i-th layer run, before the final norm.
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

    /// <summary>
    /// This context for the batch rows <paramref name="rows"/> (int64 indices) only, so a layer can run on a subset of
    /// the batch (layer dropout); null when that is not possible (a KV cache holds every row). Families with extra
    /// state override it; a derived context that does not is never sliced (null), rather than losing its state.
    /// </summary>
    public virtual LayerContext? SelectRows(Tensor rows) =>
        GetType() == typeof(LayerContext) && Cache is null
            ? new LayerContext(RowsOf(Mask, rows), IsCausal, RowsOf(PositionIds, rows)!, null, PastLength)
            : null;

    /// <summary>The rows of a [batch, ...] tensor; one broadcast row ([1, ...]) or none stays as it is.</summary>
    protected static Tensor? RowsOf(Tensor? t, Tensor rows) => t is null || t.shape[0] == 1 ? t : t.index_select(0, rows);
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

    /// <summary>
    /// The final norm and output head applied to a hidden state [batch, time, hidden] taken after any layer:
    /// early-exit logits, as LayerSkip shares one head across all exits.
    /// </summary>
    public virtual Tensor HeadLogits(Tensor hidden) => Head(hidden);

    /// <summary>
    /// The final norm and the head's weight [vocab, hidden] when the head is a plain bias-free matrix product
    /// (a draft head over part of the vocabulary can then take rows of it), else null.
    /// </summary>
    internal virtual (Func<Tensor, Tensor> FinalNorm, Tensor Weight)? PlainHead() => null;

    public override ForwardOutput forward(ForwardInput input)
    {
        int start = input.StartLayer;
        int layers = input.ExitLayer ?? NumLayers;
        if (layers < 1 || layers > NumLayers)
            throw new ArgumentOutOfRangeException(nameof(input), $"exit layer {layers} is outside 1..{NumLayers}");
        if (start < 0 || start >= layers)
            throw new ArgumentOutOfRangeException(nameof(input), $"start layer {start} is outside 0..{layers - 1} (exit layer {layers})");
        if ((start > 0) != (input.LayerInput is not null))
            throw new ArgumentException(start > 0 ? $"start layer {start} needs LayerInput, the hidden state entering it" : "LayerInput is only used with a StartLayer above 0");
        if (input.LayerDropout is { } rates && rates.Count != NumLayers)
            throw new ArgumentException($"layer dropout gives {rates.Count} rates for {NumLayers} layers");
        var context = Prepare(input, out var hidden);
        if (input.LayerInput is { } given)
        {
            if (given.dim() != 3 || given.shape[0] != hidden.shape[0] || given.shape[1] != hidden.shape[1] || given.shape[2] != hidden.shape[2])
                throw new ArgumentException($"layer input has shape [{string.Join(", ", given.shape)}]; expected [{string.Join(", ", hidden.shape)}]");
            hidden = given;
        }
        var states = input.OutputHiddenStates ? new List<Tensor>(layers - start + 1) : null;
        var dropout = training ? input.LayerDropout : null;
        for (int i = start; i < layers; i++)
        {
            states?.Add(hidden);
            hidden = dropout is not null && dropout[i] > 0
                ? RunLayerWithDropout(i, hidden, context, dropout[i])
                : RunLayer(i, hidden, context);
        }
        states?.Add(hidden);
        if (input.SkipHead)
            return new ForwardOutput(torch.empty(hidden.shape[0], 0, Config.VocabSize, dtype: hidden.dtype, device: hidden.device), states);
        if (input.LastPositionOnly)
            hidden = hidden.narrow(1, hidden.shape[1] - 1, 1);
        return new ForwardOutput(Head(hidden), states);
    }

    /// <summary>
    /// Runs a layer for the rows that keep it; rows drawn (with probability <paramref name="rate"/>, from torch's
    /// generator so seeded runs repeat) to skip it pass their hidden state through. Only the kept rows are computed
    /// (the saving layer dropout is for): the context is sliced to them and their outputs are put back in place.
    /// Where the context cannot be sliced (a KV cache), the layer runs on the whole batch and the skipping rows are
    /// restored instead.
    /// </summary>
    private Tensor RunLayerWithDropout(int index, Tensor hidden, LayerContext context, double rate)
    {
        if (rate >= 1) return hidden;
        long batch = hidden.shape[0];
        var keep = torch.rand(batch, device: hidden.device).ge(rate);
        var kept = keep.nonzero().squeeze(1);
        long count = kept.shape[0];
        if (count == 0) return hidden;
        if (count == batch) return RunLayer(index, hidden, context);
        if (context.SelectRows(kept) is { } rows)
            return hidden.index_copy(0, kept, RunLayer(index, hidden.index_select(0, kept), rows));
        var output = RunLayer(index, hidden, context);
        return torch.where(keep.view(-1, 1, 1), output, hidden);
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

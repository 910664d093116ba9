using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Adapters.PrefixTuning;

/// <summary>
/// Prefix tuning's per-layer virtual keys and values (PEFT's PrefixEncoder): a table [n, layers · 2 · token_dim],
/// or, with prefix_projection while training, an embedding [n, token_dim] through Linear → tanh → Linear.
/// </summary>
public sealed class PrefixEncoder : nn.Module
{
    public Embedding embedding;
    public Sequential? transform;

    /// <param name="config">The adapter's config.</param>
    /// <param name="device">Where the tensors live.</param>
    /// <param name="dtype">Their type.</param>
    /// <param name="table">True for a plain table (a saved adapter), false to train through the MLP if configured.</param>
    public PrefixEncoder(PrefixTuningConfig config, Device device, ScalarType dtype, bool table = false) : base(nameof(PrefixEncoder))
    {
        long width = (long)config.NumLayers * 2 * config.TokenDim;
        Projected = config.PrefixProjection && !config.InferenceMode && !table;
        if (Projected)
        {
            if (config.EncoderHiddenSize <= 0)
                throw new ArgumentException($"{config.Source}: prefix_projection needs a positive encoder_hidden_size");
            embedding = nn.Embedding(config.NumVirtualTokens, config.TokenDim, device: device, dtype: dtype);
            transform = nn.Sequential(
                ("0", nn.Linear(config.TokenDim, config.EncoderHiddenSize, device: device, dtype: dtype)),
                ("1", nn.Tanh()),
                ("2", nn.Linear(config.EncoderHiddenSize, width, device: device, dtype: dtype)));
            register_module("embedding", embedding);
            register_module("transform", transform);
        }
        else
        {
            embedding = nn.Embedding(config.NumVirtualTokens, width, device: device, dtype: dtype);
            register_module("embedding", embedding);
        }
    }

    /// <summary>True when the table is computed by the MLP (training with prefix_projection).</summary>
    public bool Projected { get; }

    /// <summary>The key/value table [n, layers · 2 · token_dim] (what PEFT saves as prompt_embeddings).</summary>
    public Tensor Table() => transform is null ? embedding.weight! : transform.forward(embedding.weight!);
}

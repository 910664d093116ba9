using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Adapters.PTuning;

/// <summary>
/// P-tuning's virtual tokens (PEFT's PromptEncoder): an embedding [n, token_dim] re-parameterised by an MLP
/// (Linear → ReLU → Linear → ReLU → Linear) while training; a plain table of the MLP's output once loaded for inference,
/// which is also what is saved as prompt_embeddings.
/// </summary>
public sealed class PromptEncoder : nn.Module
{
    public Embedding embedding;
    public Sequential? mlp_head;

    /// <param name="config">The adapter's config.</param>
    /// <param name="device">Where the tensors live.</param>
    /// <param name="dtype">Their type.</param>
    /// <param name="table">True for a plain table (a saved adapter), false to train through the MLP.</param>
    public PromptEncoder(PromptEncoderConfig config, Device device, ScalarType dtype, bool table = false) : base(nameof(PromptEncoder))
    {
        embedding = nn.Embedding(config.NumVirtualTokens, config.TokenDim, device: device, dtype: dtype);
        register_module("embedding", embedding);
        if (table || config.InferenceMode) return;
        if (config.EncoderReparameterizationType != "MLP")
            throw new NotSupportedException($"{config.Source}: encoder_reparameterization_type '{config.EncoderReparameterizationType}' is not supported yet (MLP)");
        int hidden = config.EncoderHiddenSize > 0 ? config.EncoderHiddenSize : config.TokenDim;
        mlp_head = nn.Sequential(
            ("0", nn.Linear(config.TokenDim, hidden, device: device, dtype: dtype)),
            ("1", nn.ReLU()),
            ("2", nn.Linear(hidden, hidden, device: device, dtype: dtype)),
            ("3", nn.ReLU()),
            ("4", nn.Linear(hidden, config.TokenDim, device: device, dtype: dtype)));
        register_module("mlp_head", mlp_head);
    }

    /// <summary>True while the MLP computes the tokens (training); false for a loaded table.</summary>
    public bool Projected => mlp_head is not null;

    /// <summary>The virtual tokens [n, token_dim].</summary>
    public Tensor Tokens() => mlp_head is null ? embedding.weight! : mlp_head.forward(embedding.weight!);
}

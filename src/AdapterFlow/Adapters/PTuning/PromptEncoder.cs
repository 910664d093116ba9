using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Adapters.PTuning;

/// <summary>
/// P-tuning's virtual tokens (PEFT's PromptEncoder): an embedding [n, token_dim] re-parameterised while training by
/// either an MLP (Linear → ReLU → Linear → ReLU → Linear, encoder_reparameterization_type "MLP") or a bidirectional
/// LSTM of encoder_num_layers layers followed by an MLP head (Linear(2h, 2h) → ReLU → Linear(2h, token_dim), "LSTM").
/// Once loaded for inference it is a plain table of the encoder's output, which is also what is saved as
/// prompt_embeddings. Parameter names and shapes are PEFT's (embedding, lstm_head.weight_ih_l0[_reverse], …,
/// mlp_head.0 / .2 / .4), so state dicts carry over.
/// </summary>
public sealed class PromptEncoder : nn.Module
{
    public Embedding embedding;
    public LSTM? lstm_head;
    public Sequential? mlp_head;

    /// <param name="config">The adapter's config (encoder_hidden_size already resolved: positive).</param>
    /// <param name="device">Where the tensors live.</param>
    /// <param name="dtype">Their type.</param>
    /// <param name="table">True for a plain table (a saved adapter), false to train through the encoder.</param>
    public PromptEncoder(PromptEncoderConfig config, Device device, ScalarType dtype, bool table = false) : base(nameof(PromptEncoder))
    {
        embedding = nn.Embedding(config.NumVirtualTokens, config.TokenDim, device: device, dtype: dtype);
        register_module("embedding", embedding);
        if (table || config.InferenceMode) return;
        int hidden = config.EncoderHiddenSize > 0 ? config.EncoderHiddenSize : config.TokenDim;
        switch (config.EncoderReparameterizationType)
        {
            case "MLP":
                mlp_head = nn.Sequential(
                    ("0", nn.Linear(config.TokenDim, hidden, device: device, dtype: dtype)),
                    ("1", nn.ReLU()),
                    ("2", nn.Linear(hidden, hidden, device: device, dtype: dtype)),
                    ("3", nn.ReLU()),
                    ("4", nn.Linear(hidden, config.TokenDim, device: device, dtype: dtype)));
                break;
            case "LSTM":
                // batch_first: the table is run as one sequence of n virtual tokens (a batch of one).
                lstm_head = nn.LSTM(config.TokenDim, hidden, numLayers: config.EncoderNumLayers, batchFirst: true,
                    dropout: config.EncoderDropout, bidirectional: true, device: device, dtype: dtype);
                register_module("lstm_head", lstm_head);
                mlp_head = nn.Sequential(
                    ("0", nn.Linear(2 * hidden, 2 * hidden, device: device, dtype: dtype)),
                    ("1", nn.ReLU()),
                    ("2", nn.Linear(2 * hidden, config.TokenDim, device: device, dtype: dtype)));
                break;
            default:
                throw new ArgumentException(
                    $"{config.Source}: encoder_reparameterization_type '{config.EncoderReparameterizationType}' is not one of MLP, LSTM");
        }
        register_module("mlp_head", mlp_head);
    }

    /// <summary>True while the encoder computes the tokens (training); false for a loaded table.</summary>
    public bool Projected => mlp_head is not null;

    /// <summary>The virtual tokens [n, token_dim].</summary>
    public Tensor Tokens()
    {
        var table = embedding.weight!;
        if (mlp_head is null) return table;
        if (lstm_head is null) return mlp_head.forward(table);
        var (output, hn, cn) = lstm_head.forward(table.unsqueeze(0));
        hn.Dispose();
        cn.Dispose();
        return mlp_head.forward(output).squeeze(0);
    }
}

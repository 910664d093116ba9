using System.Text.Json.Nodes;
using AdapterFlow.Models;

namespace AdapterFlow.Adapters;

/// <summary>
/// The keys PEFT's prompt-learning methods share (its PromptLearningConfig): prompt tuning, P-tuning and prefix
/// tuning all place <see cref="NumVirtualTokens"/> learned tokens before the real ones.
/// </summary>
public abstract class PromptLearningConfig : PeftConfig
{
    public int NumVirtualTokens { get; set; } = 20;

    /// <summary>Width of each virtual token; 0 = from the model (hidden size, or kv_heads · head_dim for prefix tuning).</summary>
    public int TokenDim { get; set; }
    public int NumTransformerSubmodules { get; set; } = 1;

    /// <summary>Attention heads (key/value heads for prefix tuning); 0 = from the model.</summary>
    public int NumAttentionHeads { get; set; }
    public int NumLayers { get; set; }

    /// <summary>Reads the shared keys (after <see cref="PeftConfig"/>'s own); num_virtual_tokens is required and positive.</summary>
    protected void ReadPromptLearning(JsonObject json, string path)
    {
        ReadCommon(json, path);
        NumVirtualTokens = ConfigJson.RequiredInt(json, path, "num_virtual_tokens");
        TokenDim = ConfigJson.Int(json, path, "token_dim", 0);
        NumTransformerSubmodules = ConfigJson.Int(json, path, "num_transformer_submodules", 1);
        NumAttentionHeads = ConfigJson.Int(json, path, "num_attention_heads", 0);
        NumLayers = ConfigJson.Int(json, path, "num_layers", 0);
        if (NumVirtualTokens <= 0) throw new InvalidDataException($"{path}: 'num_virtual_tokens' must be positive, got {NumVirtualTokens}");
    }

    protected void WritePromptLearning(JsonObject o)
    {
        o["num_virtual_tokens"] = NumVirtualTokens;
        o["token_dim"] = TokenDim;
        o["num_transformer_submodules"] = NumTransformerSubmodules;
        o["num_attention_heads"] = NumAttentionHeads;
        o["num_layers"] = NumLayers;
    }
}

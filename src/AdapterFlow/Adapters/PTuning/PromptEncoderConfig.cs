using System.Text.Json.Nodes;
using AdapterFlow.Models;

namespace AdapterFlow.Adapters.PTuning;

/// <summary>P-tuning's adapter_config.json (PEFT's PromptEncoderConfig, peft_type P_TUNING).</summary>
public sealed class PromptEncoderConfig : PeftConfig
{
    public override string PeftType => "P_TUNING";

    public int NumVirtualTokens { get; set; } = 20;

    /// <summary>Width of each virtual token; 0 = the model's hidden size.</summary>
    public int TokenDim { get; set; }
    public int NumTransformerSubmodules { get; set; } = 1;
    public int NumAttentionHeads { get; set; }
    public int NumLayers { get; set; }

    /// <summary>"MLP" (supported) or "LSTM" (not yet).</summary>
    public string EncoderReparameterizationType { get; set; } = "MLP";
    public int EncoderHiddenSize { get; set; }
    public int EncoderNumLayers { get; set; } = 2;
    public double EncoderDropout { get; set; }

    public static PromptEncoderConfig Read(JsonObject json, string path)
    {
        var c = new PromptEncoderConfig();
        c.ReadCommon(json, path);
        c.NumVirtualTokens = ConfigJson.RequiredInt(json, path, "num_virtual_tokens");
        c.TokenDim = ConfigJson.Int(json, path, "token_dim", 0);
        c.NumTransformerSubmodules = ConfigJson.Int(json, path, "num_transformer_submodules", 1);
        c.NumAttentionHeads = ConfigJson.Int(json, path, "num_attention_heads", 0);
        c.NumLayers = ConfigJson.Int(json, path, "num_layers", 0);
        c.EncoderReparameterizationType = ConfigJson.OptionalString(json, path, "encoder_reparameterization_type") ?? "MLP";
        c.EncoderHiddenSize = ConfigJson.Int(json, path, "encoder_hidden_size", 0);
        c.EncoderNumLayers = ConfigJson.Int(json, path, "encoder_num_layers", 2);
        c.EncoderDropout = ConfigJson.Double(json, path, "encoder_dropout", 0);
        if (c.NumVirtualTokens <= 0) throw new InvalidDataException($"{path}: 'num_virtual_tokens' must be positive, got {c.NumVirtualTokens}");
        return c;
    }

    protected override void WriteFields(JsonObject o)
    {
        o["num_virtual_tokens"] = NumVirtualTokens;
        o["token_dim"] = TokenDim;
        o["num_transformer_submodules"] = NumTransformerSubmodules;
        o["num_attention_heads"] = NumAttentionHeads;
        o["num_layers"] = NumLayers;
        o["encoder_reparameterization_type"] = EncoderReparameterizationType;
        o["encoder_hidden_size"] = EncoderHiddenSize;
        o["encoder_num_layers"] = EncoderNumLayers;
        o["encoder_dropout"] = EncoderDropout;
    }
}

using System.Text.Json.Nodes;
using AdapterFlow.Models;

namespace AdapterFlow.Adapters.PrefixTuning;

/// <summary>Prefix tuning's adapter_config.json (PEFT's PrefixTuningConfig).</summary>
public sealed class PrefixTuningConfig : PeftConfig
{
    public override string PeftType => "PREFIX_TUNING";

    public int NumVirtualTokens { get; set; } = 20;

    /// <summary>Key/value width per layer: kv_heads · head_dim (0 = from the model).</summary>
    public int TokenDim { get; set; }

    /// <summary>Key/value heads (0 = from the model).</summary>
    public int NumAttentionHeads { get; set; }
    public int NumLayers { get; set; }
    public int NumTransformerSubmodules { get; set; } = 1;

    /// <summary>Reparameterise the prefix through an MLP (token_dim → encoder_hidden_size → layers·2·token_dim).</summary>
    public bool PrefixProjection { get; set; }
    public int EncoderHiddenSize { get; set; }

    public static PrefixTuningConfig Read(JsonObject json, string path)
    {
        var c = new PrefixTuningConfig();
        c.ReadCommon(json, path);
        c.NumVirtualTokens = ConfigJson.RequiredInt(json, path, "num_virtual_tokens");
        c.TokenDim = ConfigJson.Int(json, path, "token_dim", 0);
        c.NumAttentionHeads = ConfigJson.Int(json, path, "num_attention_heads", 0);
        c.NumLayers = ConfigJson.Int(json, path, "num_layers", 0);
        c.NumTransformerSubmodules = ConfigJson.Int(json, path, "num_transformer_submodules", 1);
        c.PrefixProjection = ConfigJson.Bool(json, path, "prefix_projection", false);
        c.EncoderHiddenSize = ConfigJson.Int(json, path, "encoder_hidden_size", 0);
        if (c.NumVirtualTokens <= 0) throw new InvalidDataException($"{path}: 'num_virtual_tokens' must be positive, got {c.NumVirtualTokens}");
        return c;
    }

    protected override void WriteFields(JsonObject o)
    {
        o["num_virtual_tokens"] = NumVirtualTokens;
        o["token_dim"] = TokenDim;
        o["num_attention_heads"] = NumAttentionHeads;
        o["num_layers"] = NumLayers;
        o["num_transformer_submodules"] = NumTransformerSubmodules;
        o["prefix_projection"] = PrefixProjection;
        o["encoder_hidden_size"] = EncoderHiddenSize;
    }
}

using System.Text.Json.Nodes;
using AdapterFlow.Models;

namespace AdapterFlow.Adapters.PrefixTuning;

/// <summary>Prefix tuning's adapter_config.json (PEFT's PrefixTuningConfig).</summary>
public sealed class PrefixTuningConfig : PromptLearningConfig
{
    public override string PeftType => "PREFIX_TUNING";

    /// <summary>Reparameterise the prefix through an MLP (token_dim → encoder_hidden_size → layers·2·token_dim).</summary>
    public bool PrefixProjection { get; set; }
    public int EncoderHiddenSize { get; set; }

    public static PrefixTuningConfig Read(JsonObject json, string path)
    {
        var c = new PrefixTuningConfig();
        c.ReadPromptLearning(json, path);
        c.PrefixProjection = ConfigJson.Bool(json, path, "prefix_projection", false);
        c.EncoderHiddenSize = ConfigJson.Int(json, path, "encoder_hidden_size", 0);
        return c;
    }

    protected override void WriteFields(JsonObject o)
    {
        WritePromptLearning(o);
        o["prefix_projection"] = PrefixProjection;
        o["encoder_hidden_size"] = EncoderHiddenSize;
    }
}

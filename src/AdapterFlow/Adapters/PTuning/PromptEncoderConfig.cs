using System.Text.Json.Nodes;
using AdapterFlow.Models;

namespace AdapterFlow.Adapters.PTuning;

/// <summary>P-tuning's adapter_config.json (PEFT's PromptEncoderConfig, peft_type P_TUNING).</summary>
public sealed class PromptEncoderConfig : PromptLearningConfig
{
    public override string PeftType => "P_TUNING";

    /// <summary>"MLP" (supported) or "LSTM" (not yet).</summary>
    public string EncoderReparameterizationType { get; set; } = "MLP";
    public int EncoderHiddenSize { get; set; }
    public int EncoderNumLayers { get; set; } = 2;
    public double EncoderDropout { get; set; }

    public static PromptEncoderConfig Read(JsonObject json, string path)
    {
        var c = new PromptEncoderConfig();
        c.ReadPromptLearning(json, path);
        c.EncoderReparameterizationType = ConfigJson.OptionalString(json, path, "encoder_reparameterization_type") ?? "MLP";
        c.EncoderHiddenSize = ConfigJson.Int(json, path, "encoder_hidden_size", 0);
        c.EncoderNumLayers = ConfigJson.Int(json, path, "encoder_num_layers", 2);
        c.EncoderDropout = ConfigJson.Double(json, path, "encoder_dropout", 0);
        return c;
    }

    protected override void WriteFields(JsonObject o)
    {
        WritePromptLearning(o);
        o["encoder_reparameterization_type"] = EncoderReparameterizationType;
        o["encoder_hidden_size"] = EncoderHiddenSize;
        o["encoder_num_layers"] = EncoderNumLayers;
        o["encoder_dropout"] = EncoderDropout;
    }
}

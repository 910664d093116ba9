using System.Text.Json.Nodes;
using AdapterFlow.Models;

namespace AdapterFlow.Adapters.PTuning;

/// <summary>P-tuning's adapter_config.json (PEFT's PromptEncoderConfig, peft_type P_TUNING).</summary>
public sealed class PromptEncoderConfig : PromptLearningConfig
{
    public override string PeftType => "P_TUNING";

    /// <summary>"MLP" (Linear → ReLU → Linear → ReLU → Linear) or "LSTM" (bidirectional LSTM, then a two-layer MLP).</summary>
    public string EncoderReparameterizationType { get; set; } = "MLP";

    /// <summary>Width of the encoder's hidden layers (PEFT requires it); 0 = the token width, filled in when the adapter is added.</summary>
    public int EncoderHiddenSize { get; set; }

    /// <summary>LSTM layers (the MLP always has three linear layers, as PEFT).</summary>
    public int EncoderNumLayers { get; set; } = 2;

    /// <summary>Dropout between LSTM layers while training.</summary>
    public double EncoderDropout { get; set; }

    public void Validate()
    {
        if (EncoderReparameterizationType is not ("MLP" or "LSTM"))
            throw new ArgumentException($"{Source}: encoder_reparameterization_type must be MLP or LSTM, got '{EncoderReparameterizationType}'");
        if (EncoderHiddenSize < 0) throw new ArgumentException($"{Source}: encoder_hidden_size must be positive, got {EncoderHiddenSize}");
        if (EncoderReparameterizationType == "LSTM" && EncoderNumLayers < 1)
            throw new ArgumentException($"{Source}: encoder_num_layers must be at least 1 for the LSTM encoder, got {EncoderNumLayers}");
        if (EncoderDropout is < 0 or >= 1) throw new ArgumentException($"{Source}: encoder_dropout must be in [0, 1), got {EncoderDropout}");
    }

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

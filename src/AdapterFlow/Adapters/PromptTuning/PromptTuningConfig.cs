using System.Text.Json.Nodes;
using AdapterFlow.Models;

namespace AdapterFlow.Adapters.PromptTuning;

/// <summary>Prompt tuning's adapter_config.json (PEFT's PromptTuningConfig).</summary>
public sealed class PromptTuningConfig : PeftConfig
{
    public override string PeftType => "PROMPT_TUNING";

    public int NumVirtualTokens { get; set; } = 20;

    /// <summary>Width of each virtual token; 0 = the model's hidden size.</summary>
    public int TokenDim { get; set; }
    public int NumTransformerSubmodules { get; set; } = 1;
    public int NumAttentionHeads { get; set; }
    public int NumLayers { get; set; }

    /// <summary>RANDOM, TEXT (from <see cref="PromptTuningInitText"/>) or SAMPLE_VOCAB.</summary>
    public string PromptTuningInit { get; set; } = "RANDOM";
    public string? PromptTuningInitText { get; set; }
    public string? TokenizerNameOrPath { get; set; }

    public static PromptTuningConfig Read(JsonObject json, string path)
    {
        var c = new PromptTuningConfig();
        c.ReadCommon(json, path);
        c.NumVirtualTokens = ConfigJson.RequiredInt(json, path, "num_virtual_tokens");
        c.TokenDim = ConfigJson.Int(json, path, "token_dim", 0);
        c.NumTransformerSubmodules = ConfigJson.Int(json, path, "num_transformer_submodules", 1);
        c.NumAttentionHeads = ConfigJson.Int(json, path, "num_attention_heads", 0);
        c.NumLayers = ConfigJson.Int(json, path, "num_layers", 0);
        c.PromptTuningInit = ConfigJson.OptionalString(json, path, "prompt_tuning_init") ?? "RANDOM";
        c.PromptTuningInitText = ConfigJson.OptionalString(json, path, "prompt_tuning_init_text");
        c.TokenizerNameOrPath = ConfigJson.OptionalString(json, path, "tokenizer_name_or_path");
        if (c.NumVirtualTokens <= 0) throw new InvalidDataException($"{path}: 'num_virtual_tokens' must be positive, got {c.NumVirtualTokens}");
        if (c.PromptTuningInit is not ("RANDOM" or "TEXT" or "SAMPLE_VOCAB"))
            throw new InvalidDataException($"{path}: prompt_tuning_init '{c.PromptTuningInit}' is not supported (RANDOM, TEXT, SAMPLE_VOCAB)");
        return c;
    }

    protected override void WriteFields(JsonObject o)
    {
        o["num_virtual_tokens"] = NumVirtualTokens;
        o["token_dim"] = TokenDim;
        o["num_transformer_submodules"] = NumTransformerSubmodules;
        o["num_attention_heads"] = NumAttentionHeads;
        o["num_layers"] = NumLayers;
        o["prompt_tuning_init"] = PromptTuningInit;
        o["prompt_tuning_init_text"] = PromptTuningInitText;
        o["tokenizer_name_or_path"] = TokenizerNameOrPath;
    }
}

using System.Text.Json.Nodes;
using AdapterFlow.Models;

namespace AdapterFlow.Adapters.PromptTuning;

/// <summary>Prompt tuning's adapter_config.json (PEFT's PromptTuningConfig).</summary>
public sealed class PromptTuningConfig : PromptLearningConfig
{
    public override string PeftType => "PROMPT_TUNING";

    /// <summary>RANDOM, TEXT (from <see cref="PromptTuningInitText"/>) or SAMPLE_VOCAB.</summary>
    public string PromptTuningInit { get; set; } = "RANDOM";
    public string? PromptTuningInitText { get; set; }
    public string? TokenizerNameOrPath { get; set; }

    public static PromptTuningConfig Read(JsonObject json, string path)
    {
        var c = new PromptTuningConfig();
        c.ReadPromptLearning(json, path);
        c.PromptTuningInit = ConfigJson.OptionalString(json, path, "prompt_tuning_init") ?? "RANDOM";
        c.PromptTuningInitText = ConfigJson.OptionalString(json, path, "prompt_tuning_init_text");
        c.TokenizerNameOrPath = ConfigJson.OptionalString(json, path, "tokenizer_name_or_path");
        if (c.PromptTuningInit is not ("RANDOM" or "TEXT" or "SAMPLE_VOCAB"))
            throw new InvalidDataException($"{path}: prompt_tuning_init '{c.PromptTuningInit}' is not supported (RANDOM, TEXT, SAMPLE_VOCAB)");
        return c;
    }

    protected override void WriteFields(JsonObject o)
    {
        WritePromptLearning(o);
        o["prompt_tuning_init"] = PromptTuningInit;
        o["prompt_tuning_init_text"] = PromptTuningInitText;
        o["tokenizer_name_or_path"] = TokenizerNameOrPath;
    }
}

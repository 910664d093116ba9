using System.Text.Json.Nodes;

namespace AdapterFlow.Models;

/// <summary>The families AdapterFlow can build, keyed by Hugging Face model_type.</summary>
public static class ModelRegistry
{
    // One line per family; each family file exposes a static Family descriptor.
    private static readonly ModelFamily[] Families =
    [
        LlamaForCausalLM.Family,
        MistralForCausalLM.Family,
        Qwen2ForCausalLM.Family,
        Gpt2LMHeadModel.Family,
        OptForCausalLM.Family,
        BloomForCausalLM.Family,
        GptJForCausalLM.Family,
    ];

    public static IReadOnlyList<ModelFamily> All => Families;

    public static ModelFamily ForModelType(string modelType) =>
        Families.FirstOrDefault(f => f.ModelType == modelType)
        ?? throw new NotSupportedException($"model_type '{modelType}' is not supported (supported: {string.Join(", ", Families.Select(f => f.ModelType))})");

    /// <summary>Picks the family of a config.json from model_type, else from architectures[0].</summary>
    public static ModelFamily Find(JsonObject json, string path)
    {
        var modelType = ConfigJson.OptionalString(json, path, "model_type");
        if (modelType is not null)
            return Families.FirstOrDefault(f => f.ModelType == modelType)
                   ?? throw new InvalidDataException($"{path}: model_type '{modelType}' is not supported (supported: {string.Join(", ", Families.Select(f => f.ModelType))})");
        var arch = (json["architectures"] as JsonArray)?.FirstOrDefault()?.GetValue<string>();
        return Families.FirstOrDefault(f => f.Architecture == arch)
               ?? throw new InvalidDataException($"{path}: neither 'model_type' nor a supported 'architectures' entry found");
    }
}

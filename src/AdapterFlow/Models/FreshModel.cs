using System.Text.Json.Nodes;
using AdapterFlow.Data;
using AdapterFlow.IO;

namespace AdapterFlow.Models;

/// <summary>What <see cref="FreshModel.Create"/> wrote.</summary>
public sealed record FreshModelInfo(
    string Directory,
    string Architecture,
    string Preset,
    long Seed,
    long Parameters,
    int VocabSize,
    ModelConfig Config,
    IReadOnlyList<string> Files);

/// <summary>
/// A randomly initialised model of a preset size plus a byte-level BPE tokenizer trained on the built-in corpus,
/// written in the Hugging Face layout (config.json, model.safetensors, generation_config.json, tokenizer.json,
/// tokenizer_config.json): the starting point for training from scratch and for tests.
/// </summary>
public static class FreshModel
{
    /// <summary>Vocabulary the tokenizer trainer aims for; the built-in corpus may end it earlier.</summary>
    public static int TargetVocabSize(string preset) => preset.Trim().ToLowerInvariant() switch
    {
        "tiny" => 512,
        "small" => 4096,
        // The built-in corpus is too small for a 32,000-token vocabulary; pair this size with a real tokenizer.
        "base" => 32000,
        _ => throw new ArgumentException($"unknown preset '{preset}' (choose from {string.Join(", ", ModelPresets.Names)})"),
    };

    /// <summary>
    /// Writes a fresh model to <paramref name="directory"/> (created if absent; refused if it already holds a model).
    /// The model's vocabulary size and special token ids are the tokenizer's: <paramref name="tokenizer"/> when given
    /// (e.g. a real tokenizer.json, to pretrain a model for it), otherwise a byte-level BPE trained on
    /// <paramref name="corpus"/> or the built-in corpus. Same seed, same weights.
    /// </summary>
    public static FreshModelInfo Create(string architecture, string preset, string directory, long seed = 0, IEnumerable<string>? corpus = null,
        HFTokenizer? tokenizer = null)
    {
        ModelPresets.ModelTypeOf(architecture); // fail on a bad name before any work
        CheckTarget(directory);
        tokenizer ??= TrainTokenizer(preset, corpus);
        using var model = CreateModel(architecture, preset, tokenizer, seed);
        var files = Save(model, tokenizer, directory);
        return new FreshModelInfo(Path.GetFullPath(directory), model.Config.ModelType, preset, seed,
            model.ParameterCount(), tokenizer.VocabSize, model.Config, files);
    }

    /// <summary>Refuses a target that is a file or already holds a model (nothing is overwritten).</summary>
    public static void CheckTarget(string directory)
    {
        if (File.Exists(directory)) throw new IOException($"{directory}: is a file, not a folder");
        foreach (var existing in new[] { "config.json", "model.safetensors", "tokenizer.json" })
            if (File.Exists(Path.Combine(directory, existing)))
                throw new IOException($"{directory}: already holds {existing}; choose a new or empty folder");
    }

    /// <summary>A byte-level BPE tokenizer trained on <paramref name="corpus"/> (default: the built-in corpus).</summary>
    public static HFTokenizer TrainTokenizer(string preset, IEnumerable<string>? corpus = null) =>
        ByteLevelBpeTrainer.Train(corpus ?? BuiltInCorpus.Texts, TargetVocabSize(preset));

    /// <summary>A randomly initialised model of the preset whose vocabulary and special ids are the tokenizer's.</summary>
    public static CausalLM CreateModel(string architecture, string preset, ITokenizer tokenizer, long seed = 0,
        TorchSharp.torch.Device? device = null)
    {
        var special = new SpecialTokenIds(tokenizer.BosTokenId, tokenizer.EosTokenId, tokenizer.PadTokenId);
        var config = ModelPresets.CreateConfig(architecture, preset, tokenizer.VocabSize, special);
        return AutoModel.FromConfig(config, seed, device: device);
    }

    /// <summary>Writes the model, its generation_config.json and the tokenizer; returns the file names in the folder.</summary>
    public static IReadOnlyList<string> Save(CausalLM model, HFTokenizer tokenizer, string directory)
    {
        Directory.CreateDirectory(directory);
        AutoModel.Save(model, directory);
        tokenizer.Save(directory);
        var config = model.Config;
        AtomicFile.WriteAllText(Path.Combine(directory, "generation_config.json"), new JsonObject
        {
            ["bos_token_id"] = config.BosTokenId,
            ["eos_token_id"] = config.EosTokenIds.Length == 1 ? config.EosTokenIds[0] : new JsonArray(config.EosTokenIds.Select(e => (JsonNode?)e).ToArray()),
            ["pad_token_id"] = config.PadTokenId,
        }.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }) + "\n");
        return System.IO.Directory.GetFiles(directory).Select(f => Path.GetFileName(f)).Order(StringComparer.Ordinal).ToList();
    }
}

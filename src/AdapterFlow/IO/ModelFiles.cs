using System.Text.Json;
using System.Text.Json.Nodes;
using AdapterFlow.Models;

namespace AdapterFlow.IO;

/// <summary>
/// One entry point for every model layout we read: a Hugging Face folder (config.json + safetensors, single or
/// sharded), a GGUF file, or a llama2.c checkpoint. The format is recognised by content, not by file name.
/// </summary>
public static class ModelFiles
{
    /// <summary>Opens the weights and config of <paramref name="path"/> (a folder or a file) in the Hugging Face layout.</summary>
    public static ImportedCheckpoint Open(string path)
    {
        if (Directory.Exists(path)) return OpenFolder(path);
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: no such file or folder", path);

        Span<byte> head = stackalloc byte[8];
        int n;
        using (var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read))
            n = stream.ReadAtLeast(head, head.Length, throwOnEndOfStream: false);
        head = head[..n];

        if (GgufFile.HasMagic(head)) return GgufImport.Open(path);
        if (PickleCheck.IsPickleOrTorchZip(head)) throw new InvalidDataException(PickleCheck.RefusalMessage(path));
        var name = Path.GetFileName(path);
        if (name.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase)
            || name.EndsWith(".safetensors.index.json", StringComparison.OrdinalIgnoreCase)
            || name.Equals("config.json", StringComparison.OrdinalIgnoreCase))
            return OpenHuggingFace(Path.GetDirectoryName(Path.GetFullPath(path))!, path);
        if (Llama2C.TryReadHeader(path) is not null) return Llama2C.Open(path, FindLlama2CTokenizer(path));
        throw new InvalidDataException(
            $"{path}: unrecognised model file (expected a Hugging Face folder with config.json, a .gguf file or a llama2.c .bin checkpoint)");
    }

    /// <summary>Opens <paramref name="path"/> and builds the model with <see cref="AutoModel.FromCheckpoint"/>.</summary>
    public static CausalLM Load(string path, LoadOptions? options = null)
    {
        using var imported = Open(path);
        var config = AutoModel.ParseConfig(imported.Config, imported.Path);
        return AutoModel.FromCheckpoint(config, imported.Tensors, options);
    }

    private static ImportedCheckpoint OpenFolder(string folder)
    {
        if (File.Exists(Path.Combine(folder, "config.json"))) return OpenHuggingFace(folder, Path.Combine(folder, "config.json"));
        var gguf = Directory.GetFiles(folder, "*.gguf");
        if (gguf.Length == 1) return GgufImport.Open(gguf[0]);
        if (gguf.Length > 1)
            throw new InvalidDataException($"{folder}: holds {gguf.Length} .gguf files ({string.Join(", ", gguf.Select(Path.GetFileName))}); pass the one to load");
        var llama2c = Directory.GetFiles(folder, "*.bin").Where(f => Llama2C.TryReadHeader(f) is not null).ToArray();
        if (llama2c.Length == 1) return Llama2C.Open(llama2c[0], FindLlama2CTokenizer(llama2c[0]));
        if (llama2c.Length > 1)
            throw new InvalidDataException($"{folder}: holds {llama2c.Length} llama2.c checkpoints; pass the one to load");
        var pickle = Directory.GetFiles(folder).FirstOrDefault(f =>
            (f.EndsWith(".bin") || f.EndsWith(".pt") || f.EndsWith(".pth")) && PickleCheck.IsPickleOrTorchZip(f));
        if (pickle is not null) throw new InvalidDataException(PickleCheck.RefusalMessage(pickle));
        throw new FileNotFoundException(
            $"{folder}: no model found (expected config.json with safetensors weights, a .gguf file or a llama2.c .bin checkpoint)");
    }

    private static ImportedCheckpoint OpenHuggingFace(string folder, string configOrWeights)
    {
        var configPath = Path.Combine(folder, "config.json");
        if (!File.Exists(configPath))
            throw new FileNotFoundException($"{configOrWeights}: config.json not found beside it (a Hugging Face checkpoint needs one)", configPath);
        JsonObject config;
        try
        {
            config = JsonNode.Parse(File.ReadAllText(configPath)) as JsonObject
                     ?? throw new InvalidDataException($"{configPath}: config.json must hold a JSON object");
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{configPath}: invalid JSON ({e.Message})");
        }
        var weights = configOrWeights.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase)
                      || configOrWeights.EndsWith(".index.json", StringComparison.OrdinalIgnoreCase)
            ? Checkpoint.Open(configOrWeights)
            : Checkpoint.Open(folder);
        return new ImportedCheckpoint("safetensors", configPath, config, weights, null);
    }

    /// <summary>tokenizer.bin or a tok*.bin beside a llama2.c checkpoint (llama2.c's own naming), if any.</summary>
    private static string? FindLlama2CTokenizer(string checkpoint)
    {
        var folder = Path.GetDirectoryName(Path.GetFullPath(checkpoint))!;
        var candidates = new[] { Path.Combine(folder, "tokenizer.bin") }
            .Concat(Directory.GetFiles(folder, "tok*.bin").Order(StringComparer.Ordinal))
            .Where(File.Exists)
            .Where(f => Path.GetFullPath(f) != Path.GetFullPath(checkpoint));
        var header = Llama2C.TryReadHeader(checkpoint)?.Header;
        foreach (var candidate in candidates)
        {
            try
            {
                Llama2C.ReadVocabulary(candidate, header?.VocabSize);
                return candidate;
            }
            catch (InvalidDataException)
            {
                // Not the tokenizer of this model (wrong size); keep looking.
            }
        }
        return null;
    }
}

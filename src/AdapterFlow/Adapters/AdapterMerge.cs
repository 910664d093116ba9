using AdapterFlow.Models;

namespace AdapterFlow.Adapters;

/// <summary>What <see cref="AdapterMerge.MergeToFolder"/> wrote.</summary>
/// <param name="Directory">The folder holding the merged model.</param>
/// <param name="PeftType">The adapter's method (LORA or IA3).</param>
/// <param name="MergedModules">How many modules had the adapter folded into their weights.</param>
/// <param name="CopiedFiles">Tokenizer and generation files copied from the model folder.</param>
public sealed record MergeResult(string Directory, string PeftType, int MergedModules, IReadOnlyList<string> CopiedFiles);

/// <summary>Merging an adapter folder into a model folder, giving a plain model in the Hugging Face layout.</summary>
public static class AdapterMerge
{
    /// <summary>Files beside the weights that belong with the merged model (copied as they are when present).</summary>
    public static readonly IReadOnlyList<string> CompanionFiles =
    [
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
        "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json",
    ];

    /// <summary>
    /// PEFT's merge_and_unload + save_pretrained on folders: loads the model in <paramref name="modelDir"/>, applies
    /// the adapter in <paramref name="adapterDir"/> (LoRA, DoRA or IA3), folds it into the weights and writes
    /// config.json + model.safetensors to <paramref name="outDir"/>, with the model folder's tokenizer files.
    /// </summary>
    public static MergeResult MergeToFolder(string modelDir, string adapterDir, string outDir, LoadOptions? options = null)
    {
        if (!System.IO.Directory.Exists(modelDir)) throw new DirectoryNotFoundException($"{modelDir}: model folder not found");
        if (!System.IO.Directory.Exists(adapterDir)) throw new DirectoryNotFoundException($"{adapterDir}: adapter folder not found");
        if (Path.GetFullPath(outDir).TrimEnd('/', '\\') == Path.GetFullPath(modelDir).TrimEnd('/', '\\'))
            throw new ArgumentException($"{outDir}: the output folder must differ from the model folder");
        if (File.Exists(Path.Combine(outDir, "config.json")) || File.Exists(Path.Combine(outDir, "model.safetensors")))
            throw new IOException($"{outDir}: already holds a model; choose an empty or new folder");
        // The config first: a method that cannot be merged should fail before the weights are read.
        var config = PeftConfig.Load(adapterDir);
        if (config is not (Lora.LoraConfig or IA3.IA3Config))
            throw new NotSupportedException($"{adapterDir}: {config.PeftType} adapters add virtual tokens or modules and cannot be merged into the weights (only LoRA, DoRA and IA3 can)");

        using var model = AutoModel.FromPretrained(modelDir, options);
        var peft = PeftModel.FromPretrained(model, adapterDir);
        int modules = peft.AdapterLayers.Count;
        var merged = peft.MergeAndUnload();
        AutoModel.Save(merged, outDir);
        var copied = new List<string>();
        foreach (var name in CompanionFiles)
        {
            var source = Path.Combine(modelDir, name);
            if (!File.Exists(source)) continue;
            File.Copy(source, Path.Combine(outDir, name), overwrite: true);
            copied.Add(name);
        }
        return new MergeResult(outDir, config.PeftType, modules, copied);
    }
}

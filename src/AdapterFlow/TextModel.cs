using AdapterFlow.Generation;
using AdapterFlow.IO;
using AdapterFlow.Models;

namespace AdapterFlow;

/// <summary>
/// A causal language model together with its tokenizer, loaded from one place: a Hugging Face folder
/// (config.json, safetensors weights, tokenizer.json), or a GGUF / llama2.c file with a tokenizer.json beside it.
/// </summary>
public sealed class TextModel : IDisposable
{
    private TextModel(string path, CausalLM model, HFTokenizer tokenizer)
    {
        Path = path;
        Model = model;
        Tokenizer = tokenizer;
    }

    /// <summary>Where the model was loaded from.</summary>
    public string Path { get; }
    /// <summary>The model; a <see cref="Adapters.PeftModel"/> after <see cref="LoadAdapter"/>.</summary>
    public CausalLM Model { get; private set; }
    public HFTokenizer Tokenizer { get; }

    /// <summary>The adapter folder applied with <see cref="LoadAdapter"/>, if any.</summary>
    public string? AdapterPath { get; private set; }

    /// <summary>
    /// Applies a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) for inference: from now on
    /// <see cref="Model"/> is the adapted model, and generators made from it use the adapter.
    /// </summary>
    public void LoadAdapter(string directory)
    {
        if (AdapterPath is not null) throw new InvalidOperationException($"adapter {AdapterPath} is already applied");
        Model = Adapters.PeftModel.FromPretrained(Model, directory);
        AdapterPath = directory;
    }

    /// <summary>
    /// End-of-sequence ids from generation_config.json when it has them (some models list more there than in
    /// config.json, e.g. an end-of-turn token); null to use the model's and tokenizer's.
    /// </summary>
    public IReadOnlyList<int>? GenerationStopTokenIds { get; private init; }

    /// <summary>A generator over this model and tokenizer.</summary>
    public TextGenerator CreateGenerator(GenerationOptions? defaults = null) => new(Model, Tokenizer, defaults);

    /// <summary>Loads the weights (any layout <see cref="ModelFiles"/> reads) and the tokenizer beside them.</summary>
    public static TextModel Load(string path, LoadOptions? options = null, string? adapterPath = null)
    {
        // A missing adapter folder should fail before the model is read.
        if (adapterPath is not null && !Directory.Exists(adapterPath)) throw new DirectoryNotFoundException($"{adapterPath}: adapter folder not found");
        if (!Directory.Exists(path) && !File.Exists(path)) throw new FileNotFoundException($"{path}: model folder or file not found");
        // The tokenizer first: it is cheap, and a missing one should fail before gigabytes are read. Files beside
        // the model win; otherwise a GGUF / llama2.c model's own vocabulary is used.
        var folder = Directory.Exists(path) ? path : System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!;
        var tokenizer = HasTokenizerFiles(folder) ? LoadTokenizer(folder) : null;
        CausalLM model;
        using (var imported = ModelFiles.Open(path))
        {
            if (tokenizer is null)
            {
                if (imported.Vocabulary is null) LoadTokenizer(folder); // throws its "no tokenizer.json" message
                tokenizer = SentencePieceVocabulary.ToTokenizer(imported.Vocabulary!, imported.Path);
            }
            model = AutoModel.FromCheckpoint(AutoModel.ParseConfig(imported.Config, imported.Path), imported.Tensors, options);
        }
        if (tokenizer.VocabSize > model.Config.VocabSize)
        {
            model.Dispose();
            throw new InvalidDataException(
                $"{path}: the tokenizer has {tokenizer.VocabSize} tokens but the model's vocabulary has only {model.Config.VocabSize} (they do not belong together)");
        }
        var textModel = new TextModel(path, model, tokenizer) { GenerationStopTokenIds = ReadGenerationStopIds(path) };
        if (adapterPath is not null)
        {
            try { textModel.LoadAdapter(adapterPath); }
            catch
            {
                textModel.Dispose();
                throw;
            }
        }
        return textModel;
    }

    /// <summary>eos_token_id of the generation_config.json beside a model (folder or file), or null when there is none.</summary>
    public static int[]? ReadGenerationStopIds(string path)
    {
        var file = System.IO.Path.Combine(Directory.Exists(path) ? path : System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!, "generation_config.json");
        if (!File.Exists(file)) return null;
        System.Text.Json.Nodes.JsonObject? json;
        try { json = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(file)) as System.Text.Json.Nodes.JsonObject; }
        catch (System.Text.Json.JsonException e) { throw new InvalidDataException($"{file}: invalid JSON ({e.Message})"); }
        if (json is null) throw new InvalidDataException($"{file}: must hold a JSON object");
        return ConfigJson.IntOrIntList(json, file, "eos_token_id");
    }

    private static bool HasTokenizerFiles(string folder) =>
        File.Exists(System.IO.Path.Combine(folder, "tokenizer.json")) || File.Exists(System.IO.Path.Combine(folder, "vocab.json"));

    /// <summary>
    /// A tokenizer from a folder holding tokenizer.json (and tokenizer_config.json), from a tokenizer.json file, or
    /// from the vocabulary a GGUF file embeds.
    /// </summary>
    public static HFTokenizer LoadTokenizer(string folderOrFile)
    {
        if (File.Exists(folderOrFile) && GgufFile.IsGgufFile(folderOrFile))
        {
            using var gguf = GgufFile.Open(folderOrFile);
            var vocabulary = GgufImport.Vocabulary(gguf) ?? throw new InvalidDataException($"{folderOrFile}: the GGUF file embeds no tokenizer (no tokenizer.ggml.tokens)");
            return SentencePieceVocabulary.ToTokenizer(vocabulary, folderOrFile);
        }
        if (File.Exists(folderOrFile))
        {
            var folder = System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(folderOrFile))!;
            var config = System.IO.Path.Combine(folder, "tokenizer_config.json");
            return HFTokenizer.FromFile(folderOrFile, File.Exists(config) ? config : null);
        }
        if (!Directory.Exists(folderOrFile)) throw new FileNotFoundException($"{folderOrFile}: tokenizer folder or file not found");
        return HFTokenizer.FromDirectory(folderOrFile);
    }

    public void Dispose() => Model.Dispose();
}

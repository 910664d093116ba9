using System.Text.Json.Nodes;
using AdapterFlow.IO;

namespace AdapterFlow.Models;

/// <summary>
/// What a model folder holds, read from config.json and the safetensors headers only: no weights are
/// loaded, so inspecting a multi-gigabyte checkpoint is instant.
/// </summary>
public sealed record ModelSummary
{
    public required string Path { get; init; }
    public required string ModelType { get; init; }
    public required string Architecture { get; init; }
    /// <summary>Parameters stored in the checkpoint (a tied head is stored once and counted once).</summary>
    public required long Parameters { get; init; }
    /// <summary>Weight dtypes found in the checkpoint, most common first ("float32", "bfloat16", ...).</summary>
    public required IReadOnlyList<string> DTypes { get; init; }
    /// <summary>The dtype config.json declares, if any.</summary>
    public string? ConfigDType { get; init; }
    public required long CheckpointBytes { get; init; }
    public required int Tensors { get; init; }
    public required int Layers { get; init; }
    public required int Heads { get; init; }
    public required int KeyValueHeads { get; init; }
    public required int HeadDim { get; init; }
    public required int HiddenSize { get; init; }
    public required int IntermediateSize { get; init; }
    public required int VocabSize { get; init; }
    /// <summary>Maximum context the position encoding was built for; null when the family has no limit (ALiBi).</summary>
    public int? ContextLength { get; init; }
    public required bool TiedEmbeddings { get; init; }
    public int? BosTokenId { get; init; }
    public IReadOnlyList<int> EosTokenIds { get; init; } = [];
    public int? PadTokenId { get; init; }
    /// <summary>True when a tokenizer.json sits beside the weights.</summary>
    public required bool HasTokenizer { get; init; }

    /// <summary>Reads config.json and the safetensors header(s) of a Hugging Face model folder.</summary>
    public static ModelSummary Read(string directory)
    {
        if (File.Exists(directory) || (Directory.Exists(directory) && !File.Exists(System.IO.Path.Combine(directory, "config.json"))))
            return ReadImported(directory);
        if (!Directory.Exists(directory))
            throw new DirectoryNotFoundException($"{directory}: model folder or file not found");
        var config = AutoModel.LoadConfig(directory);
        long parameters = 0, bytes = 0;
        int tensors = 0;
        var dtypeCounts = new Dictionary<string, long>();
        foreach (var file in WeightFiles(directory))
        {
            using var st = SafetensorsFile.Open(file);
            bytes += new FileInfo(file).Length;
            foreach (var e in st.Entries)
            {
                long n = e.Shape.Aggregate(1L, (a, d) => a * d);
                parameters += n;
                tensors++;
                var name = DTypeName(e.DType);
                dtypeCounts[name] = dtypeCounts.GetValueOrDefault(name) + n;
            }
        }
        return Build(config, directory, "safetensors", parameters, dtypeCounts, bytes, tensors, directory);
    }

    /// <summary>Where the weights came from: "safetensors", "gguf" or "llama2.c".</summary>
    public string Format { get; init; } = "safetensors";

    /// <summary>
    /// A GGUF or llama2.c file (or a folder holding one): these carry no safetensors header, so each tensor is
    /// read once (and dequantised) to count parameters; dtypes are those of the loaded tensors.
    /// </summary>
    private static ModelSummary ReadImported(string path)
    {
        using var imported = ModelFiles.Open(path);
        var config = AutoModel.ParseConfig(imported.Config, imported.Path);
        long parameters = 0;
        var dtypeCounts = new Dictionary<string, long>();
        foreach (var name in imported.Tensors.Names)
        {
            using var t = imported.Tensors.Load(name);
            parameters += t.numel();
            var dtype = Devices.DTypeName(t.dtype);
            dtypeCounts[dtype] = dtypeCounts.GetValueOrDefault(dtype) + t.numel();
        }
        var folder = Directory.Exists(path) ? path : System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!;
        long bytes = File.Exists(path) ? new FileInfo(path).Length : Directory.GetFiles(path).Sum(f => new FileInfo(f).Length);
        return Build(config, path, imported.Format, parameters, dtypeCounts, bytes, imported.Tensors.Names.Count, folder);
    }

    /// <summary>The summary fields both layouts share: everything the config says, plus what was counted.</summary>
    private static ModelSummary Build(ModelConfig config, string path, string format, long parameters,
        Dictionary<string, long> dtypeCounts, long bytes, int tensors, string folder) => new()
    {
        Path = System.IO.Path.GetFullPath(path),
        Format = format,
        ModelType = config.ModelType,
        Architecture = config.Architecture,
        Parameters = parameters,
        DTypes = dtypeCounts.OrderByDescending(kv => kv.Value).Select(kv => kv.Key).ToList(),
        ConfigDType = config.DType,
        CheckpointBytes = bytes,
        Tensors = tensors,
        Layers = config.NumHiddenLayers,
        Heads = config.NumAttentionHeads,
        KeyValueHeads = config.NumKeyValueHeads,
        HeadDim = config.HeadDim,
        HiddenSize = config.HiddenSize,
        IntermediateSize = config.IntermediateSize,
        VocabSize = config.VocabSize,
        ContextLength = config.MaxPositionEmbeddings > 0 ? config.MaxPositionEmbeddings : null,
        TiedEmbeddings = config.TieWordEmbeddings,
        BosTokenId = config.BosTokenId,
        EosTokenIds = config.EosTokenIds,
        PadTokenId = config.PadTokenId,
        HasTokenizer = File.Exists(System.IO.Path.Combine(folder, "tokenizer.json")),
    };

    /// <summary>One JSON object with every field (snake_case keys), for scripts.</summary>
    public JsonObject ToJson() => new()
    {
        ["path"] = Path,
        ["format"] = Format,
        ["model_type"] = ModelType,
        ["architecture"] = Architecture,
        ["parameters"] = Parameters,
        ["dtype"] = DTypes.FirstOrDefault() ?? ConfigDType,
        ["dtypes"] = new JsonArray(DTypes.Select(d => (JsonNode?)d).ToArray()),
        ["config_dtype"] = ConfigDType,
        ["checkpoint_bytes"] = CheckpointBytes,
        ["tensors"] = Tensors,
        ["layers"] = Layers,
        ["heads"] = Heads,
        ["kv_heads"] = KeyValueHeads,
        ["head_dim"] = HeadDim,
        ["hidden_size"] = HiddenSize,
        ["intermediate_size"] = IntermediateSize,
        ["vocab_size"] = VocabSize,
        ["context_length"] = ContextLength,
        ["tied_embeddings"] = TiedEmbeddings,
        ["bos_token_id"] = BosTokenId,
        ["eos_token_ids"] = new JsonArray(EosTokenIds.Select(e => (JsonNode?)e).ToArray()),
        ["pad_token_id"] = PadTokenId,
        ["has_tokenizer"] = HasTokenizer,
    };

    /// <summary>model.safetensors, or the shards listed in model.safetensors.index.json.</summary>
    private static IReadOnlyList<string> WeightFiles(string directory)
    {
        var single = System.IO.Path.Combine(directory, "model.safetensors");
        if (File.Exists(single)) return [single];
        var index = System.IO.Path.Combine(directory, "model.safetensors.index.json");
        if (!File.Exists(index))
            throw new FileNotFoundException($"{directory}: no model.safetensors (or model.safetensors.index.json) found");
        JsonObject? map;
        try
        {
            map = (JsonNode.Parse(File.ReadAllText(index)) as JsonObject)?["weight_map"] as JsonObject;
        }
        catch (System.Text.Json.JsonException e)
        {
            throw new InvalidDataException($"{index}: invalid JSON ({e.Message})");
        }
        if (map is null) throw new InvalidDataException($"{index}: 'weight_map' object is missing");
        var files = new SortedSet<string>(StringComparer.Ordinal);
        foreach (var (tensor, file) in map)
        {
            string name;
            try { name = file!.GetValue<string>(); }
            catch (Exception) { throw new InvalidDataException($"{index}: weight_map['{tensor}'] must be a file name"); }
            if (name.Contains('/') || name.Contains('\\') || name.Contains(".."))
                throw new InvalidDataException($"{index}: weight_map['{tensor}'] = '{name}' must be a file in the same folder");
            files.Add(System.IO.Path.Combine(directory, name));
        }
        foreach (var f in files)
            if (!File.Exists(f)) throw new FileNotFoundException($"{f}: shard listed in {index} is missing");
        return files.ToList();
    }

    private static string DTypeName(string safetensorsDType) => safetensorsDType switch
    {
        "F64" => "float64",
        "F32" => "float32",
        "F16" => "float16",
        "BF16" => "bfloat16",
        "I64" => "int64",
        "I32" => "int32",
        "I16" => "int16",
        "I8" => "int8",
        "U8" => "uint8",
        "BOOL" => "bool",
        _ => safetensorsDType.ToLowerInvariant(),
    };
}

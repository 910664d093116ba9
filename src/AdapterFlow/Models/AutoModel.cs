using System.Text.Json;
using System.Text.Json.Nodes;
using AdapterFlow.IO;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Models;

/// <summary>One model family: how to read its config.json and build the model.</summary>
public sealed record ModelFamily(
    string ModelType,
    string Architecture,
    Func<JsonObject, string, ModelConfig> ReadConfig,
    Func<ModelConfig, CausalLM> Create);

/// <summary>How weights are loaded.</summary>
public sealed class LoadOptions
{
    /// <summary>Weight dtype after loading; null keeps what the checkpoint stores (float32 or bfloat16).</summary>
    public ScalarType? DType { get; init; }

    /// <summary>Target device; null = CPU.</summary>
    public Device? Device { get; init; }
}

/// <summary>Builds, loads and saves models in the Hugging Face layout (config.json + model.safetensors).</summary>
public static class AutoModel
{
    /// <summary>Checkpoint keys that hold no weights we need (precomputed buffers of older transformers).</summary>
    private static readonly string[] IgnoredSuffixes = [".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias"];

    /// <summary>Reads config.json and picks the family from <c>model_type</c> (or <c>architectures</c>).</summary>
    public static ModelConfig LoadConfig(string directoryOrFile)
    {
        var path = Directory.Exists(directoryOrFile) ? Path.Combine(directoryOrFile, "config.json") : directoryOrFile;
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: config.json not found (expected a Hugging Face model folder)");
        JsonObject json;
        try
        {
            json = JsonNode.Parse(File.ReadAllText(path)) as JsonObject
                   ?? throw new InvalidDataException($"{path}: config.json must hold a JSON object");
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{path}: invalid JSON ({e.Message})");
        }
        return ParseConfig(json, path);
    }

    /// <summary>Parses a config.json object (also used by the GGUF and llama2.c importers).</summary>
    public static ModelConfig ParseConfig(JsonObject json, string path) => ModelRegistry.Find(json, path).ReadConfig(json, path);

    /// <summary>A randomly initialised model (for training from scratch), deterministic for a seed.</summary>
    public static CausalLM FromConfig(ModelConfig config, long seed = 0, ScalarType dtype = ScalarType.Float32, Device? device = null)
    {
        // A private generator, not torch.manual_seed: the global one may be drawn from by other threads meanwhile,
        // which would make "same seed, same weights" fail under concurrency. (Tensor.normal_ is used for the draws
        // because TorchSharp 0.107's nn.init.normal_ ignores its generator argument.)
        using var generator = new torch.Generator((ulong)seed);
        var model = ModelRegistry.ForModelType(config.ModelType).Create(config);
        InitializeWeights(model, config, generator);
        model.eval();
        if (dtype != ScalarType.Float32) model.to(dtype);
        if (device is not null) model.to(device);
        return model;
    }

    /// <summary>Loads config.json and model.safetensors (or a sharded set) from a folder.</summary>
    public static CausalLM FromPretrained(string directory, LoadOptions? options = null)
    {
        var config = LoadConfig(directory);
        using var checkpoint = Checkpoint.Open(directory);
        return FromCheckpoint(config, checkpoint, options);
    }

    /// <summary>Builds the model for <paramref name="config"/> and fills it from a checkpoint.</summary>
    public static CausalLM FromCheckpoint(ModelConfig config, ITensorSource checkpoint, LoadOptions? options = null)
    {
        var model = ModelRegistry.ForModelType(config.ModelType).Create(config);
        model.eval();
        var stored = checkpoint.Names.Where(n => !IgnoredSuffixes.Any(n.EndsWith)).ToHashSet();
        var expected = model.state_dict();
        ScalarType? loadedType = null;
        using (torch.no_grad())
        {
            foreach (var (name, target) in expected)
            {
                if (!stored.Remove(name))
                {
                    if (config.TieWordEmbeddings && IsOutputHead(name)) continue;
                    throw new InvalidDataException($"{checkpoint.Description}: tensor '{name}' is missing (needed by {config.Architecture})");
                }
                using var source = checkpoint.Load(name);
                if (!source.shape.SequenceEqual(target.shape))
                    throw new InvalidDataException(
                        $"{checkpoint.Description}: tensor '{name}' has shape [{string.Join(", ", source.shape)}], {config.Architecture} with this config.json needs [{string.Join(", ", target.shape)}]");
                if (source.is_floating_point()) loadedType ??= source.dtype;
                target.copy_(source);
            }
        }
        // Tied heads stored anyway (some checkpoints do) are fine; anything else unexpected is an error.
        stored.RemoveWhere(n => config.TieWordEmbeddings && IsOutputHead(n));
        if (stored.Count > 0)
            throw new InvalidDataException($"{checkpoint.Description}: unexpected tensor '{stored.Order().First()}' for {config.Architecture} (and {stored.Count - 1} more)");
        var dtype = options?.DType ?? loadedType ?? ScalarType.Float32;
        if (dtype != ScalarType.Float32) model.to(dtype);
        if (options?.Device is { } device) model.to(device);
        return model;
    }

    private static bool IsOutputHead(string name) => name is "lm_head.weight" or "embed_out.weight";

    /// <summary>
    /// Loads a model from any layout we read, recognised by content: a Hugging Face folder (config.json +
    /// safetensors, single or sharded), a .gguf file or a llama2.c .bin checkpoint (see <see cref="ModelFiles"/>).
    /// </summary>
    public static CausalLM FromPath(string path, LoadOptions? options = null) => ModelFiles.Load(path, options);

    /// <summary>
    /// Writes config.json and model.safetensors as transformers' save_pretrained does (tied head omitted); with
    /// <paramref name="maxShardBytes"/>, larger checkpoints are split into shards plus model.safetensors.index.json.
    /// </summary>
    public static void Save(CausalLM model, string directory, long? maxShardBytes = null)
    {
        if (model is Adapters.PeftModel)
            throw new ArgumentException("a PeftModel is saved with SavePretrained (the adapter alone) or merged first (MergeAndUnload, then Save)");
        Directory.CreateDirectory(directory);
        var config = model.Config;
        config.DType = model.DType switch
        {
            ScalarType.BFloat16 => "bfloat16",
            ScalarType.Float16 => "float16",
            _ => "float32",
        };
        var json = config.ToJson();
        var tensors = new List<KeyValuePair<string, Tensor>>();
        foreach (var (name, tensor) in model.state_dict())
        {
            if (config.TieWordEmbeddings && IsOutputHead(name)) continue;
            tensors.Add(new(name, tensor));
        }
        var metadata = new Dictionary<string, string> { ["format"] = "pt" };
        // Also removes the files of an earlier save in the other layout (single file vs shards).
        SafetensorsWriter.SaveSharded(directory, tensors, maxShardBytes ?? long.MaxValue, metadata);
        AtomicFile.WriteAllText(Path.Combine(directory, "config.json"),
            json.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
    }

    /// <summary>
    /// transformers' _init_weights for these families: linear and embedding weights ~ N(0, initializer_range),
    /// biases zero, norm weights one (already so at construction).
    /// </summary>
    public static void InitializeWeights(nn.Module model, ModelConfig config, torch.Generator? generator = null)
    {
        using var no = torch.no_grad();
        double std = config.InitializerRange;
        // Tensor.normal_ rather than nn.init.normal_: TorchSharp's init function ignores its generator argument.
        foreach (var (_, module) in model.named_modules())
        {
            switch (module)
            {
                // Tensor.normal_ rather than nn.init.normal_: TorchSharp 0.107's nn.init.normal_ ignores the
                // generator argument and draws from the global one (seen as flaky same-seed weights in parallel tests).
                case Linear linear:
                    linear.weight!.normal_(0, std, generator);
                    if (linear.bias is not null) nn.init.zeros_(linear.bias);
                    break;
                case Embedding embedding:
                    embedding.weight!.normal_(0, std, generator);
                    break;
                case IInitializable custom:
                    custom.Initialize(std, generator);
                    break;
            }
        }
    }
}

/// <summary>A family-specific module (e.g. GPT-2's Conv1D) that initialises its own weights.</summary>
public interface IInitializable
{
    void Initialize(double std);

    /// <summary>Draws from <paramref name="generator"/> when given (so init depends on the seed alone).</summary>
    void Initialize(double std, torch.Generator? generator) => Initialize(std);
}

using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.IO;

/// <summary>
/// A model read from a non-Hugging-Face layout (GGUF, llama2.c), translated to the Hugging Face one: a
/// config.json-equivalent object and a tensor source under Hugging Face tensor names, so that
/// <c>AutoModel.ParseConfig</c> + <c>AutoModel.FromCheckpoint</c> build the model as from a HF folder.
/// </summary>
public sealed class ImportedCheckpoint(string format, string path, JsonObject config, ITensorSource tensors, EmbeddedVocabulary? vocabulary)
    : IDisposable
{
    /// <summary>"safetensors", "gguf" or "llama2.c".</summary>
    public string Format { get; } = format;
    public string Path { get; } = path;
    public JsonObject Config { get; } = config;
    public ITensorSource Tensors { get; } = tensors;

    /// <summary>The tokenizer vocabulary the file embeds (GGUF) or that lies beside it (llama2.c tokenizer.bin), if any.</summary>
    public EmbeddedVocabulary? Vocabulary { get; } = vocabulary;

    public void Dispose() => Tensors.Dispose();
}

/// <summary>
/// A tokenizer vocabulary carried by a model file: token strings with optional SentencePiece scores and token
/// types (GGUF <c>tokenizer.ggml.*</c>; llama2.c tokenizer.bin), for building a tokenizer later.
/// </summary>
public sealed record EmbeddedVocabulary(
    string Model,
    string[] Tokens,
    float[]? Scores,
    int[]? TokenTypes,
    string[]? Merges,
    int? BosTokenId,
    int? EosTokenId,
    int? UnknownTokenId,
    int? PaddingTokenId)
{
    /// <summary>llama2.c only: the longest token in bytes, as its file declares.</summary>
    public int? MaxTokenLength { get; init; }

    /// <summary>The raw bytes of each token where the source stores bytes (llama2.c), else null.</summary>
    public byte[][]? TokenBytes { get; init; }
}

/// <summary>Pieces shared by the GGUF and llama2.c importers of LLaMA models.</summary>
public static class LlamaImport
{
    /// <summary>A transformers LlamaForCausalLM config.json with the given dimensions.</summary>
    public static JsonObject Config(int hiddenSize, int intermediateSize, int numLayers, int numHeads, int numKvHeads,
        int headDim, double rmsNormEps, double ropeTheta, int vocabSize, int maxPositions, bool tieWordEmbeddings,
        int? bosTokenId, int? eosTokenId, int? padTokenId = null, string dtype = "float32") => new()
    {
        ["architectures"] = new JsonArray("LlamaForCausalLM"),
        ["model_type"] = "llama",
        ["hidden_size"] = hiddenSize,
        ["intermediate_size"] = intermediateSize,
        ["num_hidden_layers"] = numLayers,
        ["num_attention_heads"] = numHeads,
        ["num_key_value_heads"] = numKvHeads,
        ["head_dim"] = headDim,
        ["vocab_size"] = vocabSize,
        ["max_position_embeddings"] = maxPositions,
        ["rms_norm_eps"] = rmsNormEps,
        ["rope_theta"] = ropeTheta,
        ["hidden_act"] = "silu",
        ["attention_bias"] = false,
        ["mlp_bias"] = false,
        ["tie_word_embeddings"] = tieWordEmbeddings,
        ["bos_token_id"] = bosTokenId,
        ["eos_token_id"] = eosTokenId,
        ["pad_token_id"] = padTokenId,
        ["dtype"] = dtype,
    };

    /// <summary>
    /// Meta/llama.cpp store q and k projection rows per head with rotary pairs interleaved (x0,x1 rotate together);
    /// transformers' rotate-half layout pairs row i with row i + head_dim/2. This is the permutation transformers'
    /// convert_llama_weights_to_hf applies (works on weights [rows, in] and biases [rows]).
    /// </summary>
    public static Tensor InterleavedToRotateHalf(Tensor weight, int heads, string where)
    {
        long rows = weight.shape[0];
        if (heads <= 0 || rows % heads != 0 || rows / heads % 2 != 0)
            throw new InvalidDataException($"{where}: {rows} rows cannot be split into {heads} heads of even size");
        long headDim = rows / heads;
        var rest = weight.shape.Skip(1).ToArray();
        using var scope = torch.NewDisposeScope();
        var result = weight.view([heads, headDim / 2, 2, .. rest]).transpose(1, 2).reshape(weight.shape).contiguous();
        return result.MoveToOuterDisposeScope();
    }
}

/// <summary>An <see cref="ITensorSource"/> that exposes another format's tensors under new names, transforming some on load.</summary>
internal sealed class MappedTensorSource : ITensorSource
{
    private readonly Dictionary<string, Func<Tensor>> _loaders;
    private readonly List<string> _order;
    private readonly IDisposable _owner;

    public MappedTensorSource(string description, IDisposable owner, IEnumerable<(string Name, Func<Tensor> Load)> tensors)
    {
        Description = description;
        _owner = owner;
        _order = new();
        _loaders = new(StringComparer.Ordinal);
        foreach (var (name, load) in tensors)
        {
            _order.Add(name);
            _loaders[name] = load;
        }
    }

    public string Description { get; }
    public IReadOnlyCollection<string> Names => _order;

    public Tensor Load(string name) =>
        _loaders.TryGetValue(name, out var load) ? load() : throw new KeyNotFoundException($"{Description}: no tensor named '{name}'");

    public void Dispose() => _owner.Dispose();
}

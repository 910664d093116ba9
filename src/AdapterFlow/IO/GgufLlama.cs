using System.Text.RegularExpressions;
using static TorchSharp.torch;

namespace AdapterFlow.IO;

/// <summary>Translates a GGUF file of a supported architecture (llama) to the Hugging Face layout.</summary>
public static partial class GgufImport
{
    /// <summary>Opens a GGUF file and translates it; the result owns the file.</summary>
    public static ImportedCheckpoint Open(string path)
    {
        var gguf = GgufFile.Open(path);
        try
        {
            var arch = gguf.OptionalString("general.architecture")
                       ?? throw new InvalidDataException($"{path}: metadata 'general.architecture' is missing");
            return arch switch
            {
                "llama" => Llama(gguf),
                _ => throw new NotSupportedException($"{path}: GGUF architecture '{arch}' is not supported yet (supported: llama)"),
            };
        }
        catch
        {
            gguf.Dispose();
            throw;
        }
    }

    /// <summary>The embedded tokenizer (tokenizer.ggml.*), or null when the file has none.</summary>
    public static EmbeddedVocabulary? Vocabulary(GgufFile gguf)
    {
        var tokens = gguf.OptionalArray<string>("tokenizer.ggml.tokens");
        if (tokens is null) return null;
        var scores = gguf.OptionalArray<float>("tokenizer.ggml.scores");
        var types = gguf.OptionalArray<int>("tokenizer.ggml.token_type");
        foreach (var (name, length) in new[] { ("tokenizer.ggml.scores", scores?.Length), ("tokenizer.ggml.token_type", types?.Length) })
            if (length is { } n && n != tokens.Length)
                throw new InvalidDataException($"{gguf.Path}: '{name}' has {n} entries but tokenizer.ggml.tokens has {tokens.Length}");
        return new EmbeddedVocabulary(
            gguf.OptionalString("tokenizer.ggml.model") ?? "unknown",
            tokens, scores, types,
            gguf.OptionalArray<string>("tokenizer.ggml.merges"),
            TokenId(gguf, "tokenizer.ggml.bos_token_id", tokens.Length),
            TokenId(gguf, "tokenizer.ggml.eos_token_id", tokens.Length),
            TokenId(gguf, "tokenizer.ggml.unknown_token_id", tokens.Length),
            TokenId(gguf, "tokenizer.ggml.padding_token_id", tokens.Length));
    }

    /// <summary>A token id, or null when absent or set to the "none" value (-1 / 0xFFFFFFFF) llama.cpp writes.</summary>
    private static int? TokenId(GgufFile gguf, string key, int vocabSize)
    {
        var id = gguf.OptionalInt(key);
        if (id is null || id < 0 || id == uint.MaxValue) return null;
        if (id >= vocabSize) throw new InvalidDataException($"{gguf.Path}: metadata '{key}' = {id} is outside the vocabulary of {vocabSize} tokens");
        return (int)id;
    }

    [GeneratedRegex(@"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")]
    private static partial Regex BlockTensor();

    private static ImportedCheckpoint Llama(GgufFile gguf)
    {
        string path = gguf.Path;
        int Int(string key, long? fallback = null)
        {
            var v = gguf.OptionalInt(key) ?? fallback ?? throw new InvalidDataException($"{path}: required metadata '{key}' is missing");
            if (v <= 0 || v > int.MaxValue) throw new InvalidDataException($"{path}: metadata '{key}' = {v} must be a positive integer");
            return (int)v;
        }

        int hidden = Int("llama.embedding_length");
        int layers = Int("llama.block_count");
        int heads = Int("llama.attention.head_count");
        int kvHeads = Int("llama.attention.head_count_kv", heads);
        int intermediate = Int("llama.feed_forward_length");
        int headDim = Int("llama.attention.key_length", hidden / Math.Max(heads, 1));
        if (heads % kvHeads != 0) throw new InvalidDataException($"{path}: head_count {heads} is not a multiple of head_count_kv {kvHeads}");
        if (gguf.Has("llama.rope.scaling.type") && gguf.OptionalString("llama.rope.scaling.type") is { } scaling && scaling != "none")
            throw new NotSupportedException($"{path}: RoPE scaling '{scaling}' in GGUF files is not supported yet");
        if (gguf.Contains("rope_freqs.weight"))
            throw new NotSupportedException($"{path}: tensor 'rope_freqs.weight' (Llama 3 RoPE scaling) is not supported yet");
        if (gguf.Contains("token_embd.weight") is false)
            throw new InvalidDataException($"{path}: tensor 'token_embd.weight' is missing");

        var embed = gguf.Tensor("token_embd.weight");
        var vocab = Vocabulary(gguf);
        int vocabSize = (int)Math.Min(int.MaxValue, embed.Shape[0]);
        if (gguf.OptionalInt("llama.vocab_size") is { } declared && declared != vocabSize)
            throw new InvalidDataException($"{path}: llama.vocab_size {declared} disagrees with token_embd.weight rows {vocabSize}");

        // The head is tied when there is no output.weight, or when the converter wrote a byte-identical copy
        // of the embedding (llama.cpp's llama2.c converter does); keeping one copy matches the HF checkpoint.
        bool tied = !gguf.Contains("output.weight")
                    || (gguf.Tensor("output.weight") is var output && output.Type == embed.Type && output.Dims.SequenceEqual(embed.Dims)
                        && gguf.ReadBytes("output.weight").AsSpan().SequenceEqual(gguf.ReadBytes("token_embd.weight")));

        var config = LlamaImport.Config(
            hiddenSize: hidden, intermediateSize: intermediate, numLayers: layers, numHeads: heads, numKvHeads: kvHeads,
            headDim: headDim,
            rmsNormEps: gguf.OptionalFloat("llama.attention.layer_norm_rms_epsilon") ?? 1e-5,
            ropeTheta: gguf.OptionalFloat("llama.rope.freq_base") ?? 10000.0,
            vocabSize: vocabSize,
            maxPositions: Int("llama.context_length", 2048),
            tieWordEmbeddings: tied,
            bosTokenId: vocab?.BosTokenId,
            eosTokenId: vocab?.EosTokenId,
            padTokenId: vocab?.PaddingTokenId,
            dtype: embed.Type switch { GgmlType.F16 => "float16", GgmlType.BF16 => "bfloat16", _ => "float32" });

        if (gguf.Tensors.Any(t => t.Name.EndsWith(".attn_q.bias", StringComparison.Ordinal))) config["attention_bias"] = true;

        var map = new List<(string, Func<Tensor>)>();
        string Where(string name) => $"{path}: tensor '{name}'";
        foreach (var info in gguf.Tensors)
        {
            var name = info.Name;
            switch (name)
            {
                case "token_embd.weight": map.Add(("model.embed_tokens.weight", () => gguf.Load(name))); continue;
                case "output_norm.weight": map.Add(("model.norm.weight", () => gguf.Load(name))); continue;
                case "output.weight":
                    if (!tied) map.Add(("lm_head.weight", () => gguf.Load(name)));
                    continue;
            }
            var m = BlockTensor().Match(name);
            if (!m.Success) throw new InvalidDataException($"{Where(name)} is not part of a llama model");
            if (!int.TryParse(m.Groups[1].Value, out var layer) || layer >= layers)
                throw new InvalidDataException($"{Where(name)}: layer {m.Groups[1].Value} is outside block_count {layers}");
            var kind = m.Groups[3].Value;
            string prefix = $"model.layers.{layer}.";
            var (hfName, permuteHeads) = m.Groups[2].Value switch
            {
                "attn_q" => ("self_attn.q_proj", heads),
                "attn_k" => ("self_attn.k_proj", kvHeads),
                "attn_v" => ("self_attn.v_proj", 0),
                "attn_output" => ("self_attn.o_proj", 0),
                "attn_norm" => ("input_layernorm", 0),
                "ffn_norm" => ("post_attention_layernorm", 0),
                "ffn_gate" => ("mlp.gate_proj", 0),
                "ffn_up" => ("mlp.up_proj", 0),
                "ffn_down" => ("mlp.down_proj", 0),
                _ => throw new InvalidDataException($"{Where(name)} is not part of a llama model"),
            };
            if (permuteHeads > 0)
                map.Add(($"{prefix}{hfName}.{kind}", () =>
                {
                    using var raw = gguf.Load(name);
                    return LlamaImport.InterleavedToRotateHalf(raw, permuteHeads, Where(name));
                }));
            else
                map.Add(($"{prefix}{hfName}.{kind}", () => gguf.Load(name)));
        }
        var source = new MappedTensorSource(path, gguf, map);
        return new ImportedCheckpoint("gguf", path, config, source, vocab);
    }
}

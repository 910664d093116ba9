using System.Text;
using System.Text.Json.Nodes;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.IO;

/// <summary>One tensor to write into a GGUF file, in PyTorch shape, stored as <paramref name="Type"/>.</summary>
public sealed record GgufTensorToWrite(string Name, Tensor Tensor, GgmlType Type);

/// <summary>
/// Writes GGUF v3 files (little-endian): metadata of any GGUF value type, tensors as F32, F16, BF16 or Q8_0.
/// Values are mapped by CLR type: byte/sbyte/ushort/short/uint/int/float/bool/string/ulong/long/double and
/// arrays of them.
/// </summary>
public static class GgufWriter
{
    public static void Save(string path, IEnumerable<KeyValuePair<string, object>> metadata, IEnumerable<GgufTensorToWrite> tensors, int alignment = 32)
    {
        if (alignment <= 0 || (alignment & (alignment - 1)) != 0) throw new ArgumentException($"alignment must be a power of two, got {alignment}");
        var meta = metadata.ToList();
        if (alignment != 32 && meta.All(kv => kv.Key != "general.alignment")) meta.Add(new("general.alignment", (uint)alignment));
        var list = tensors.ToList();
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var t in list)
            if (!names.Add(t.Name)) throw new ArgumentException($"{path}: tensor '{t.Name}' is given twice");

        using var file = new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20);
        using var w = new BinaryWriter(file, Encoding.UTF8, leaveOpen: true);
        w.Write(GgufFile.Magic);
        w.Write(3u);
        w.Write((ulong)list.Count);
        w.Write((ulong)meta.Count);
        foreach (var (key, value) in meta)
        {
            WriteString(w, key);
            WriteValue(w, key, value);
        }

        var encoded = new List<byte[]>();
        long offset = 0;
        foreach (var t in list)
        {
            var bytes = Encode(t);
            encoded.Add(bytes);
            WriteString(w, t.Name);
            var dims = t.Tensor.shape.Reverse().ToArray();
            w.Write((uint)dims.Length);
            foreach (var d in dims) w.Write((ulong)d);
            w.Write((uint)t.Type);
            w.Write((ulong)offset);
            offset = Align(offset + bytes.Length, alignment);
        }
        w.Flush();
        Pad(file, alignment);
        long dataStart = file.Position;
        foreach (var bytes in encoded)
        {
            file.Write(bytes);
            Pad(file, alignment, dataStart);
        }
    }

    private static long Align(long x, int alignment) => (x + alignment - 1) / alignment * alignment;

    private static void Pad(Stream s, int alignment, long origin = 0)
    {
        long target = origin + Align(s.Position - origin, alignment);
        while (s.Position < target) s.WriteByte(0);
    }

    private static void WriteString(BinaryWriter w, string s)
    {
        var bytes = Encoding.UTF8.GetBytes(s);
        w.Write((ulong)bytes.Length);
        w.Write(bytes);
    }

    private static uint TypeOf(object value, string key) => value switch
    {
        byte => 0, sbyte => 1, ushort => 2, short => 3, uint => 4, int => 5, float => 6, bool => 7, string => 8,
        Array => 9, ulong => 10, long => 11, double => 12,
        _ => throw new ArgumentException($"GGUF metadata '{key}': values of type {value.GetType().Name} cannot be stored"),
    };

    private static void WriteValue(BinaryWriter w, string key, object value)
    {
        uint type = TypeOf(value, key);
        w.Write(type);
        WritePayload(w, key, value);
    }

    private static void WritePayload(BinaryWriter w, string key, object value)
    {
        switch (value)
        {
            case byte v: w.Write(v); break;
            case sbyte v: w.Write(v); break;
            case ushort v: w.Write(v); break;
            case short v: w.Write(v); break;
            case uint v: w.Write(v); break;
            case int v: w.Write(v); break;
            case float v: w.Write(v); break;
            case bool v: w.Write((byte)(v ? 1 : 0)); break;
            case string v: WriteString(w, v); break;
            case ulong v: w.Write(v); break;
            case long v: w.Write(v); break;
            case double v: w.Write(v); break;
            case Array a:
                var elementType = a.GetType().GetElementType()!;
                uint inner = elementType == typeof(object)
                    ? (a.Length > 0 ? TypeOf(a.GetValue(0)!, key) : 9u)
                    : TypeOf(elementType == typeof(string) ? "" : Activator.CreateInstance(elementType)!, key);
                w.Write(inner);
                w.Write((ulong)a.Length);
                foreach (var item in a) WritePayload(w, key, item!);
                break;
            default:
                throw new ArgumentException($"GGUF metadata '{key}': values of type {value.GetType().Name} cannot be stored");
        }
    }

    /// <summary>The stored bytes of one tensor in its GGUF type.</summary>
    private static byte[] Encode(GgufTensorToWrite t)
    {
        using var scope = torch.NewDisposeScope();
        var x = t.Tensor.detach().cpu().contiguous();
        switch (t.Type)
        {
            case GgmlType.F32: return x.to_type(ScalarType.Float32).bytes.ToArray();
            case GgmlType.F16: return x.to_type(ScalarType.Float16).bytes.ToArray();
            case GgmlType.BF16: return x.to_type(ScalarType.BFloat16).bytes.ToArray();
            case GgmlType.Q8_0: return QuantizeQ8_0(t.Name, x);
            default: throw new NotSupportedException($"writing GGUF tensors as {t.Type} is not supported (F32, F16, BF16, Q8_0 are)");
        }
    }

    /// <summary>
    /// Q8_0 as ggml's reference quantiser: per block of 32, d = max|x| / 127 (stored as float16), q = round(x / d).
    /// </summary>
    private static byte[] QuantizeQ8_0(string name, Tensor x)
    {
        long n = x.NumberOfElements;
        if (x.dim() == 0 || x.shape[^1] % 32 != 0)
            throw new ArgumentException($"tensor '{name}': Q8_0 needs a last dimension divisible by 32, got [{string.Join(", ", x.shape)}]");
        var blocks = x.to_type(ScalarType.Float32).reshape(-1, 32);
        var d = blocks.abs().amax([1], keepdim: true) / 127f;
        var inverse = torch.where(d.eq(0), torch.zeros_like(d), d.reciprocal());
        var q = (blocks * inverse).round().clamp(-127, 127).to_type(ScalarType.Int8).contiguous();
        var scales = d.to_type(ScalarType.Float16).contiguous();
        var scaleBytes = scales.bytes;
        var quantBytes = q.bytes;
        long count = n / 32;
        var result = new byte[count * 34];
        for (long b = 0; b < count; b++)
        {
            scaleBytes.Slice((int)(b * 2), 2).CopyTo(result.AsSpan((int)(b * 34), 2));
            quantBytes.Slice((int)(b * 32), 32).CopyTo(result.AsSpan((int)(b * 34 + 2), 32));
        }
        return result;
    }
}

/// <summary>Writes Hugging Face-layout LLaMA / Qwen2 models as GGUF files llama.cpp can run.</summary>
public static class GgufExport
{
    /// <summary>
    /// Writes a model (config.json object + tensors under Hugging Face names) as GGUF. Matrices are stored as
    /// <paramref name="weightType"/> (F32, F16, BF16 or Q8_0), norms and biases as F32 (as llama.cpp does);
    /// q/k rows of llama models are permuted to the interleaved RoPE layout llama.cpp expects. The vocabulary,
    /// when given, is embedded as tokenizer.ggml.* (llama.cpp needs it to run the file).
    /// </summary>
    public static void Save(JsonObject configJson, ITensorSource tensors, string path, GgmlType weightType = GgmlType.F16,
        EmbeddedVocabulary? vocabulary = null, string? name = null)
    {
        var config = AutoModel.ParseConfig(configJson, tensors.Description) as LlamaConfig
                     ?? throw new NotSupportedException($"{tensors.Description}: GGUF export supports llama and qwen2 models");
        string arch = config.ModelType switch
        {
            "llama" => "llama",
            "qwen2" => "qwen2",
            _ => throw new NotSupportedException($"{tensors.Description}: GGUF export supports llama and qwen2 models, not {config.ModelType}"),
        };
        if (weightType is not (GgmlType.F32 or GgmlType.F16 or GgmlType.BF16 or GgmlType.Q8_0))
            throw new ArgumentException($"weight type {weightType} is not supported for export (F32, F16, BF16, Q8_0 are)");
        var meta = new List<KeyValuePair<string, object>>
        {
            new("general.architecture", arch),
            new("general.name", name ?? Path.GetFileNameWithoutExtension(path)),
            new("general.file_type", (uint)(weightType switch { GgmlType.F32 => 0, GgmlType.F16 => 1, GgmlType.Q8_0 => 7, _ => 32 })),
            new($"{arch}.context_length", (uint)config.MaxPositionEmbeddings),
            new($"{arch}.embedding_length", (uint)config.HiddenSize),
            new($"{arch}.block_count", (uint)config.NumHiddenLayers),
            new($"{arch}.feed_forward_length", (uint)config.IntermediateSize),
            new($"{arch}.attention.head_count", (uint)config.NumAttentionHeads),
            new($"{arch}.attention.head_count_kv", (uint)config.NumKeyValueHeads),
            new($"{arch}.attention.layer_norm_rms_epsilon", (float)config.RmsNormEps),
            new($"{arch}.rope.freq_base", (float)config.RopeTheta),
            new($"{arch}.rope.dimension_count", (uint)config.HeadDim),
            new($"{arch}.vocab_size", (uint)config.VocabSize),
        };
        if (config.HeadDim * config.NumAttentionHeads != config.HiddenSize)
        {
            meta.Add(new($"{arch}.attention.key_length", (uint)config.HeadDim));
            meta.Add(new($"{arch}.attention.value_length", (uint)config.HeadDim));
        }
        if (config.RopeScaling is { } rope)
        {
            if (rope.Type != "linear") throw new NotSupportedException($"{tensors.Description}: RoPE scaling '{rope.Type}' cannot be exported to GGUF yet");
            meta.Add(new($"{arch}.rope.scaling.type", "linear"));
            meta.Add(new($"{arch}.rope.scaling.factor", (float)rope.Factor));
        }
        if (vocabulary is not null)
        {
            meta.Add(new("tokenizer.ggml.model", vocabulary.Model));
            meta.Add(new("tokenizer.ggml.tokens", vocabulary.Tokens));
            if (vocabulary.Scores is not null) meta.Add(new("tokenizer.ggml.scores", vocabulary.Scores));
            if (vocabulary.TokenTypes is not null) meta.Add(new("tokenizer.ggml.token_type", vocabulary.TokenTypes));
            if (vocabulary.Merges is not null) meta.Add(new("tokenizer.ggml.merges", vocabulary.Merges));
            foreach (var (key, id) in new[]
                     {
                         ("bos", vocabulary.BosTokenId ?? config.BosTokenId), ("eos", vocabulary.EosTokenId ?? (config.EosTokenIds.Length > 0 ? config.EosTokenIds[0] : null)),
                         ("unknown", vocabulary.UnknownTokenId), ("padding", vocabulary.PaddingTokenId ?? config.PadTokenId),
                     })
                if (id is { } value) meta.Add(new($"tokenizer.ggml.{key}_token_id", (uint)value));
        }

        using var scope = torch.NewDisposeScope();
        var output = new List<GgufTensorToWrite>();
        bool llama = arch == "llama";
        foreach (var hfName in tensors.Names)
        {
            var (ggufName, permuteHeads) = GgufName(hfName, config, llama, tensors.Description);
            if (ggufName is null) continue;
            var t = tensors.Load(hfName);
            if (permuteHeads > 0) t = LlamaImport.RotateHalfToInterleaved(t, permuteHeads, $"{tensors.Description}: tensor '{hfName}'");
            var type = t.dim() < 2 ? GgmlType.F32 : weightType == GgmlType.Q8_0 && t.shape[^1] % 32 != 0 ? GgmlType.F16 : weightType;
            output.Add(new GgufTensorToWrite(ggufName, t, type));
        }
        AtomicFile.Write(path, tmp => GgufWriter.Save(tmp, meta, output));
    }

    /// <summary>Writes a loaded model as GGUF.</summary>
    public static void Save(CausalLM model, string path, GgmlType weightType = GgmlType.F16, EmbeddedVocabulary? vocabulary = null, string? name = null)
    {
        using var source = new StateDictSource(model);
        Save(model.Config.ToJson(), source, path, weightType, vocabulary, name);
    }

    private static (string? Name, int PermuteHeads) GgufName(string hf, LlamaConfig config, bool llama, string where)
    {
        switch (hf)
        {
            case "model.embed_tokens.weight": return ("token_embd.weight", 0);
            case "model.norm.weight": return ("output_norm.weight", 0);
            case "lm_head.weight": return config.TieWordEmbeddings ? (null, 0) : ("output.weight", 0);
        }
        var parts = hf.Split('.');
        if (parts.Length >= 5 && parts[0] == "model" && parts[1] == "layers" && int.TryParse(parts[2], out var layer))
        {
            var rest = string.Join('.', parts[3..^1]);
            var kind = parts[^1];
            (string? name, int heads) = rest switch
            {
                "self_attn.q_proj" => ("attn_q", llama ? config.NumAttentionHeads : 0),
                "self_attn.k_proj" => ("attn_k", llama ? config.NumKeyValueHeads : 0),
                "self_attn.v_proj" => ("attn_v", 0),
                "self_attn.o_proj" => ("attn_output", 0),
                "input_layernorm" => ("attn_norm", 0),
                "post_attention_layernorm" => ("ffn_norm", 0),
                "mlp.gate_proj" => ("ffn_gate", 0),
                "mlp.up_proj" => ("ffn_up", 0),
                "mlp.down_proj" => ("ffn_down", 0),
                _ => (null, 0),
            };
            if (name is not null) return ($"blk.{layer}.{name}.{kind}", heads);
        }
        throw new NotSupportedException($"{where}: tensor '{hf}' has no GGUF counterpart");
    }

    /// <summary>A model's state_dict as a tensor source.</summary>
    private sealed class StateDictSource(CausalLM model) : ITensorSource
    {
        private readonly Dictionary<string, Tensor> _tensors = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value);
        public string Description => model.Config.Architecture;
        public IReadOnlyCollection<string> Names => _tensors.Keys;
        public Tensor Load(string name) => _tensors[name].detach();
        public void Dispose() { }
    }
}

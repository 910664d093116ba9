using System.IO.MemoryMappedFiles;
using System.Text;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.IO;

/// <summary>The 7 int32 hyper-parameters at the start of a llama2.c checkpoint.</summary>
public sealed record Llama2CHeader(int Dim, int HiddenDim, int NumLayers, int NumHeads, int NumKvHeads, int VocabSize, int SeqLen, bool SharedClassifier)
{
    public int HeadSize => Dim / NumHeads;
    public int KvDim => Dim / NumHeads * NumKvHeads;
}

/// <summary>
/// Reads llama2.c checkpoints (Karpathy's run.c format) and translates them to the Hugging Face LLaMA layout.
/// Supported: the legacy format (7 int32, vocab_size negative when the classifier is separate, then float32
/// weights in run.c order) and the "ak42" version-1 float32 export. Files are recognised by content: the header
/// must describe a model whose weights fill the file exactly.
/// </summary>
public static class Llama2C
{
    private const uint VersionedMagic = 0x616b3432; // "ak42"
    private const int VersionedHeaderBytes = 256;

    /// <summary>The header when <paramref name="path"/> is a llama2.c checkpoint, else null (never throws for other formats).</summary>
    public static (Llama2CHeader Header, int Version)? TryReadHeader(string path)
    {
        var head = new byte[VersionedHeaderBytes];
        long length;
        using (var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read))
        {
            length = stream.Length;
            int n = stream.ReadAtLeast(head, head.Length, throwOnEndOfStream: false);
            Array.Resize(ref head, n);
        }
        if (head.Length < 28) return null;
        int I(int index) => BitConverter.ToInt32(head, index * 4);
        if (BitConverter.ToUInt32(head, 0) == VersionedMagic)
        {
            if (head.Length < 37) return null;
            int version = I(1);
            var h = Make(I(2), I(3), I(4), I(5), I(6), I(7), I(8), head[36] != 0);
            if (h is null) return null;
            return version == 1 && length == VersionedHeaderBytes + 4 * WeightCount(h, version: 1) ? (h, 1) : version != 1 ? (h, version) : null;
        }
        int vocab = I(5);
        var legacy = Make(I(0), I(1), I(2), I(3), I(4), Math.Abs(vocab), I(6), vocab > 0);
        if (legacy is null) return null;
        return length == 28 + 4 * WeightCount(legacy, version: 0) ? (legacy, 0) : null;
    }

    private static Llama2CHeader? Make(int dim, int hidden, int layers, int heads, int kvHeads, int vocab, int seqLen, bool shared)
    {
        // Plausibility bounds keep arbitrary files from passing as llama2.c and the size arithmetic from overflowing.
        if (dim <= 0 || hidden <= 0 || layers <= 0 || heads <= 0 || kvHeads <= 0 || vocab <= 0 || seqLen <= 0) return null;
        if (dim > 1 << 16 || hidden > 1 << 18 || layers > 1024 || vocab > 1 << 22 || seqLen > 1 << 22) return null;
        if (dim % heads != 0 || heads % kvHeads != 0 || dim / heads % 2 != 0) return null;
        return new Llama2CHeader(dim, hidden, layers, heads, kvHeads, vocab, seqLen, shared);
    }

    private static long WeightCount(Llama2CHeader h, int version) =>
        Layout(h, version).Sum(t => t.Count);

    /// <summary>The tensors of the file in storage order: name, element offset and count.</summary>
    private static List<(string Name, long Offset, long Count)> Layout(Llama2CHeader h, int version)
    {
        long dim = h.Dim, hidden = h.HiddenDim, layers = h.NumLayers, vocab = h.VocabSize, kv = h.KvDim;
        var sizes = new List<(string, long)>();
        var embed = ("token_embedding_table", vocab * dim);
        var norms = new[] { ("rms_att_weight", layers * dim), ("rms_ffn_weight", layers * dim) };
        var projections = new[]
        {
            ("wq", layers * dim * dim), ("wk", layers * kv * dim), ("wv", layers * kv * dim), ("wo", layers * dim * dim),
        };
        var ffn = new[] { ("w1", layers * hidden * dim), ("w2", layers * dim * hidden), ("w3", layers * hidden * dim) };
        if (version == 0)
        {
            sizes.Add(embed);
            sizes.Add(norms[0]);
            sizes.AddRange(projections);
            sizes.Add(norms[1]);
            sizes.AddRange(ffn);
            sizes.Add(("rms_final_weight", dim));
            sizes.Add(("freq_cis_real", (long)h.SeqLen * h.HeadSize / 2));
            sizes.Add(("freq_cis_imag", (long)h.SeqLen * h.HeadSize / 2));
        }
        else
        {
            // export.py version 1: all norms first, then the embedding, then the matrices; no RoPE tables.
            sizes.AddRange(norms);
            sizes.Add(("rms_final_weight", dim));
            sizes.Add(embed);
            sizes.AddRange(projections);
            sizes.AddRange(ffn);
        }
        if (!h.SharedClassifier) sizes.Add(("wcls", vocab * dim));
        var layout = new List<(string, long, long)>();
        long offset = 0;
        foreach (var (name, count) in sizes)
        {
            layout.Add((name, offset, count));
            offset += count;
        }
        return layout;
    }

    /// <summary>Opens a llama2.c checkpoint; <paramref name="tokenizerPath"/> (tokenizer.bin / tok512.bin) is optional.</summary>
    public static ImportedCheckpoint Open(string path, string? tokenizerPath = null)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: file not found", path);
        PickleCheck.ThrowIfPickle(path);
        var found = TryReadHeader(path)
                    ?? throw new InvalidDataException($"{path}: not a llama2.c checkpoint (the header's dimensions do not match the file size; truncated or another format?)");
        var (h, version) = found;
        if (version is not (0 or 1))
            throw new NotSupportedException($"{path}: llama2.c export version {version} (quantised) is not supported; export with --version 0 or 1");
        var vocabulary = tokenizerPath is null ? null : ReadVocabulary(tokenizerPath, h.VocabSize);

        var config = LlamaImport.Config(
            hiddenSize: h.Dim, intermediateSize: h.HiddenDim, numLayers: h.NumLayers, numHeads: h.NumHeads,
            numKvHeads: h.NumKvHeads, headDim: h.HeadSize, rmsNormEps: 1e-5, ropeTheta: 10000.0, vocabSize: h.VocabSize,
            maxPositions: h.SeqLen, tieWordEmbeddings: h.SharedClassifier,
            // run.c's fixed conventions: BOS = 1, EOS = 2 (SentencePiece Llama 2 vocabulary).
            bosTokenId: 1, eosTokenId: 2);

        var weights = new MappedFloats(path, version == 0 ? 28 : VersionedHeaderBytes);
        var offsets = Layout(h, version).ToDictionary(t => t.Name, t => t.Offset);
        long dim = h.Dim, hidden = h.HiddenDim, kv = h.KvDim;
        var map = new List<(string, Func<Tensor>)>();
        void Add(string hfName, string array, long index, long[] shape, int permuteHeads = 0)
        {
            long count = shape.Aggregate(1L, (a, b) => a * b);
            long offset = offsets[array] + index * count;
            map.Add((hfName, () =>
            {
                var t = weights.Load(offset, shape);
                if (permuteHeads == 0) return t;
                using (t) return LlamaImport.InterleavedToRotateHalf(t, permuteHeads, $"{path}: {array}");
            }));
        }
        Add("model.embed_tokens.weight", "token_embedding_table", 0, [h.VocabSize, dim]);
        for (int l = 0; l < h.NumLayers; l++)
        {
            var p = $"model.layers.{l}.";
            Add(p + "input_layernorm.weight", "rms_att_weight", l, [dim]);
            Add(p + "self_attn.q_proj.weight", "wq", l, [dim, dim], h.NumHeads);
            Add(p + "self_attn.k_proj.weight", "wk", l, [kv, dim], h.NumKvHeads);
            Add(p + "self_attn.v_proj.weight", "wv", l, [kv, dim]);
            Add(p + "self_attn.o_proj.weight", "wo", l, [dim, dim]);
            Add(p + "post_attention_layernorm.weight", "rms_ffn_weight", l, [dim]);
            Add(p + "mlp.gate_proj.weight", "w1", l, [hidden, dim]);
            Add(p + "mlp.down_proj.weight", "w2", l, [dim, hidden]);
            Add(p + "mlp.up_proj.weight", "w3", l, [hidden, dim]);
        }
        Add("model.norm.weight", "rms_final_weight", 0, [dim]);
        if (!h.SharedClassifier) Add("lm_head.weight", "wcls", 0, [h.VocabSize, dim]);
        return new ImportedCheckpoint("llama2.c", path, config, new MappedTensorSource(path, weights, map), vocabulary);
    }

    /// <summary>
    /// Reads a llama2.c tokenizer file: int32 max_token_length, then per token a float32 score, an int32 byte
    /// length and the bytes. With <paramref name="vocabSize"/> exactly that many tokens are read; without, until the end.
    /// </summary>
    public static EmbeddedVocabulary ReadVocabulary(string path, int? vocabSize = null)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: tokenizer file not found", path);
        var data = File.ReadAllBytes(path);
        if (data.Length < 4) throw new InvalidDataException($"{path}: too short for a llama2.c tokenizer");
        int maxLength = BitConverter.ToInt32(data, 0);
        if (maxLength <= 0 || maxLength > 1 << 16) throw new InvalidDataException($"{path}: max_token_length {maxLength} is not plausible");
        var tokens = new List<string>();
        var bytes = new List<byte[]>();
        var scores = new List<float>();
        long pos = 4;
        while (vocabSize is { } n ? tokens.Count < n : pos < data.Length)
        {
            int i = tokens.Count;
            if (data.Length - pos < 8) throw new InvalidDataException($"{path}: file ends inside token {i} (expected {vocabSize?.ToString() ?? "more"} tokens)");
            float score = BitConverter.ToSingle(data, (int)pos);
            int length = BitConverter.ToInt32(data, (int)pos + 4);
            pos += 8;
            if (length < 0 || length > maxLength || length > data.Length - pos)
                throw new InvalidDataException($"{path}: token {i} has length {length} (max_token_length {maxLength}, {data.Length - pos} bytes left)");
            var tokenBytes = data.AsSpan((int)pos, length).ToArray();
            pos += length;
            scores.Add(score);
            bytes.Add(tokenBytes);
            tokens.Add(Encoding.UTF8.GetString(tokenBytes));
        }
        if (vocabSize is not null && pos != data.Length)
            throw new InvalidDataException($"{path}: {data.Length - pos} bytes follow the {vocabSize} tokens the model expects (tokenizer for another model?)");
        return new EmbeddedVocabulary("llama2.c", tokens.ToArray(), scores.ToArray(), null, null, 1, 2, 0, null)
        {
            MaxTokenLength = maxLength,
            TokenBytes = bytes.ToArray(),
        };
    }

    /// <summary>A read-only memory map of float32 values after a header.</summary>
    private sealed class MappedFloats : IDisposable
    {
        private readonly string _path;
        private readonly MemoryMappedFile _map;
        private readonly MemoryMappedViewAccessor _view;
        private readonly long _start;

        public MappedFloats(string path, long start)
        {
            _path = path;
            _start = start;
            _map = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
            _view = _map.CreateViewAccessor(0, 0, MemoryMappedFileAccess.Read);
        }

        public unsafe Tensor Load(long elementOffset, long[] shape)
        {
            long count = shape.Aggregate(1L, (a, b) => a * b);
            long begin = _start + elementOffset * 4, length = count * 4;
            if (begin + length > _view.Capacity) throw new InvalidDataException($"{_path}: weights end before the header says (truncated?)");
            var tensor = torch.empty(shape, ScalarType.Float32);
            byte* basePtr = null;
            _view.SafeMemoryMappedViewHandle.AcquirePointer(ref basePtr);
            try
            {
                TensorBytes.CopyInto(basePtr + _view.PointerOffset + begin, length, tensor);
            }
            finally
            {
                _view.SafeMemoryMappedViewHandle.ReleasePointer();
            }
            return tensor;
        }

        public void Dispose()
        {
            _view.Dispose();
            _map.Dispose();
        }
    }
}

using System.Text;
using AdapterFlow.IO;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.IO;

/// <summary>Builds GGUF v3 files byte by byte for tests (we only read GGUF in the library).</summary>
public sealed class GgufBuilder
{
    private readonly List<(string Key, uint Type, byte[] Value)> _kv = new();
    private readonly List<(string Name, long[] Dims, GgmlType Type, byte[] Data)> _tensors = new();
    public int Alignment { get; set; } = 32;
    public uint Version { get; set; } = 3;

    private static byte[] Str(string s)
    {
        var b = Encoding.UTF8.GetBytes(s);
        return [.. BitConverter.GetBytes((ulong)b.Length), .. b];
    }

    public GgufBuilder Raw(string key, uint type, byte[] value) { _kv.Add((key, type, value)); return this; }
    public GgufBuilder U32(string key, uint v) => Raw(key, 4, BitConverter.GetBytes(v));
    public GgufBuilder I32(string key, int v) => Raw(key, 5, BitConverter.GetBytes(v));
    public GgufBuilder F32(string key, float v) => Raw(key, 6, BitConverter.GetBytes(v));
    public GgufBuilder String(string key, string v) => Raw(key, 8, Str(v));

    public GgufBuilder Strings(string key, string[] items) =>
        Raw(key, 9, [.. BitConverter.GetBytes(8u), .. BitConverter.GetBytes((ulong)items.Length), .. items.SelectMany(Str)]);

    public GgufBuilder Floats(string key, float[] items) =>
        Raw(key, 9, [.. BitConverter.GetBytes(6u), .. BitConverter.GetBytes((ulong)items.Length), .. items.SelectMany(BitConverter.GetBytes)]);

    public GgufBuilder Ints(string key, int[] items) =>
        Raw(key, 9, [.. BitConverter.GetBytes(5u), .. BitConverter.GetBytes((ulong)items.Length), .. items.SelectMany(BitConverter.GetBytes)]);

    public GgufBuilder Tensor(string name, long[] dims, GgmlType type, byte[] data) { _tensors.Add((name, dims, type, data)); return this; }

    /// <summary>A float32 tensor given in PyTorch shape (stored with dims reversed, as ggml does).</summary>
    public GgufBuilder Tensor(string name, Tensor t) =>
        Tensor(name, t.shape.Reverse().ToArray(), GgmlType.F32, t.to_type(ScalarType.Float32).contiguous().bytes.ToArray());

    public byte[] Build()
    {
        var s = new MemoryStream();
        s.Write("GGUF"u8);
        s.Write(BitConverter.GetBytes(Version));
        s.Write(BitConverter.GetBytes((ulong)_tensors.Count));
        s.Write(BitConverter.GetBytes((ulong)_kv.Count));
        foreach (var (key, type, value) in _kv)
        {
            s.Write(Str(key));
            s.Write(BitConverter.GetBytes(type));
            s.Write(value);
        }
        long offset = 0;
        var offsets = new List<long>();
        foreach (var (name, dims, type, data) in _tensors)
        {
            s.Write(Str(name));
            s.Write(BitConverter.GetBytes((uint)dims.Length));
            foreach (var d in dims) s.Write(BitConverter.GetBytes((ulong)d));
            s.Write(BitConverter.GetBytes((uint)type));
            s.Write(BitConverter.GetBytes((ulong)offset));
            offsets.Add(offset);
            offset = (offset + data.Length + Alignment - 1) / Alignment * Alignment;
        }
        while (s.Length % Alignment != 0) s.WriteByte(0);
        long dataStart = s.Length;
        for (int i = 0; i < _tensors.Count; i++)
        {
            while (s.Length < dataStart + offsets[i]) s.WriteByte(0);
            s.Write(_tensors[i].Data);
        }
        return s.ToArray();
    }

    public string Save(string path)
    {
        File.WriteAllBytes(path, Build());
        return path;
    }
}

public class GgufTests
{
    [Fact]
    public void Metadata_of_every_value_type_is_read()
    {
        using var temp = new TempFolder();
        var b = new GgufBuilder { Alignment = 64 }
            .U32("general.alignment", 64)
            .Raw("u8", 0, [200]).Raw("i8", 1, [0xFE]).Raw("u16", 2, BitConverter.GetBytes((ushort)60000))
            .Raw("i16", 3, BitConverter.GetBytes((short)-3)).U32("u32", 4_000_000_000).I32("i32", -7).F32("f32", 1.5f)
            .Raw("bool", 7, [1]).String("str", "héllo").Raw("u64", 10, BitConverter.GetBytes(ulong.MaxValue))
            .Raw("i64", 11, BitConverter.GetBytes(-9L)).Raw("f64", 12, BitConverter.GetBytes(2.25))
            .Strings("strings", ["a", "", "▁the"]).Floats("floats", [0.5f, -1f]).Ints("ints", [1, 2, 3])
            // An array of two arrays of u8.
            .Raw("nested", 9, [.. BitConverter.GetBytes(9u), .. BitConverter.GetBytes(2UL),
                .. BitConverter.GetBytes(0u), .. BitConverter.GetBytes(1UL), 5,
                .. BitConverter.GetBytes(0u), .. BitConverter.GetBytes(2UL), 6, 7])
            .Tensor("t", torch.arange(6, dtype: ScalarType.Float32).reshape(2, 3));
        using var gguf = GgufFile.Open(b.Save(temp.File("meta.gguf")));
        var m = gguf.Metadata;
        Assert.Equal(3u, gguf.Version);
        Assert.Equal((byte)200, m["u8"]);
        Assert.Equal((sbyte)-2, m["i8"]);
        Assert.Equal((ushort)60000, m["u16"]);
        Assert.Equal((short)-3, m["i16"]);
        Assert.Equal(4_000_000_000u, m["u32"]);
        Assert.Equal(-7, m["i32"]);
        Assert.Equal(1.5f, m["f32"]);
        Assert.Equal(true, m["bool"]);
        Assert.Equal("héllo", m["str"]);
        Assert.Equal(ulong.MaxValue, m["u64"]);
        Assert.Equal(-9L, m["i64"]);
        Assert.Equal(2.25, m["f64"]);
        Assert.Equal(new[] { "a", "", "▁the" }, m["strings"]);
        Assert.Equal(new[] { 0.5f, -1f }, m["floats"]);
        Assert.Equal(new[] { 1, 2, 3 }, m["ints"]);
        var nested = Assert.IsType<object[]>(m["nested"]);
        Assert.Equal(new byte[] { 5 }, nested[0]);
        Assert.Equal(new byte[] { 6, 7 }, nested[1]);
        Assert.Equal(4_000_000_000L, gguf.OptionalInt("u32"));
        Assert.Throws<InvalidDataException>(() => gguf.OptionalInt("str"));

        var info = gguf.Tensor("t");
        Assert.Equal(new long[] { 3, 2 }, info.Dims);
        Assert.Equal(new long[] { 2, 3 }, info.Shape);
        using var t = gguf.Load("t");
        Assert.Equal(new float[] { 0, 1, 2, 3, 4, 5 }, t.data<float>().ToArray());
        Assert.Equal(new long[] { 2, 3 }, t.shape);
    }

    [Fact]
    public void Float16_bfloat16_and_quantised_tensors_load()
    {
        using var temp = new TempFolder();
        var values = torch.randn([2, 64], generator: new Generator(5));
        var half = values.to_type(ScalarType.Float16);
        var bf16 = values.to_type(ScalarType.BFloat16);

        // Q8_0: per 32 values one float16 scale d and 32 int8 quants; value = d * q.
        var rng = new Random(1);
        var q8 = new List<byte>();
        var q8Expected = new List<float>();
        var q4 = new List<byte>();
        var q4Expected = new float[128];
        for (int block = 0; block < 4; block++)
        {
            var d = (Half)(0.25f * (block + 1));
            q8.AddRange(BitConverter.GetBytes(d));
            for (int i = 0; i < 32; i++)
            {
                var q = (sbyte)rng.Next(-128, 128);
                q8.Add((byte)q);
                q8Expected.Add((float)d * q);
            }
            // Q4_0: scale, then 16 bytes; byte j holds element j (low nibble) and element j + 16 (high nibble), offset 8.
            q4.AddRange(BitConverter.GetBytes(d));
            for (int j = 0; j < 16; j++)
            {
                int lo = rng.Next(16), hi = rng.Next(16);
                q4.Add((byte)(lo | (hi << 4)));
                q4Expected[block * 32 + j] = (float)d * (lo - 8);
                q4Expected[block * 32 + j + 16] = (float)d * (hi - 8);
            }
        }
        var b = new GgufBuilder()
            .Tensor("half", [64, 2], GgmlType.F16, half.bytes.ToArray())
            .Tensor("bf16", [64, 2], GgmlType.BF16, bf16.bytes.ToArray())
            .Tensor("q8", [64, 2], GgmlType.Q8_0, q8.ToArray())
            .Tensor("q4", [64, 2], GgmlType.Q4_0, q4.ToArray())
            .Tensor("q6k", [256], GgmlType.Q6_K, new byte[210]);
        using var gguf = GgufFile.Open(b.Save(temp.File("types.gguf")));
        Assert.True(half.SameAs(gguf.Load("half")));
        Assert.True(bf16.SameAs(gguf.Load("bf16")));
        using var q8Loaded = gguf.Load("q8");
        Assert.Equal(ScalarType.Float32, q8Loaded.dtype);
        Assert.Equal(new long[] { 2, 64 }, q8Loaded.shape);
        Assert.Equal(q8Expected, q8Loaded.reshape(-1).data<float>().ToArray());
        Assert.Equal(q4Expected, gguf.Load("q4").reshape(-1).data<float>().ToArray());
        var e = Assert.Throws<NotSupportedException>(() => gguf.Load("q6k"));
        Assert.Contains("tensor 'q6k' is quantised as Q6_K", e.Message);
    }

    private static string OpenError(string path)
    {
        var e = Assert.Throws<InvalidDataException>(() => GgufFile.Open(path).Dispose());
        Assert.StartsWith(path + ": ", e.Message);
        Assert.DoesNotContain('\n', e.Message);
        return e.Message;
    }

    [Fact]
    public void Malformed_files_give_clear_messages()
    {
        using var temp = new TempFolder();
        var good = new GgufBuilder().String("general.architecture", "llama").Tensor("w", torch.ones(4, 8)).Build();
        string Write(string name, byte[] bytes)
        {
            var p = temp.File(name);
            File.WriteAllBytes(p, bytes);
            return p;
        }

        Assert.Contains("not a GGUF file", OpenError(Write("magic.gguf", [.. "GGUX"u8, .. good[4..]])));
        Assert.Contains("GGUF version 1 is obsolete", OpenError(Write("v1.gguf", [.. good[..4], 1, 0, 0, 0, .. good[8..]])));
        Assert.Contains("unsupported GGUF version 7", OpenError(Write("v7.gguf", [.. good[..4], 7, 0, 0, 0, .. good[8..]])));
        Assert.Contains("tensor count", OpenError(Write("count.gguf", [.. good[..8], .. BitConverter.GetBytes(ulong.MaxValue), .. good[16..]])));
        Assert.Contains("too short for a GGUF header", OpenError(Write("tiny.gguf", good[..10])));
        Assert.Contains("metadata key #0: string length 20 runs past the end of the file (at byte 32; truncated?)", OpenError(Write("cut.gguf", good[..40])));
        Assert.Contains("file ends while reading metadata 'general.architecture' type", OpenError(Write("cut2.gguf", good[..54])));

        var stringTooLong = new GgufBuilder().Raw("k", 8, [.. BitConverter.GetBytes(1UL << 40), 1, 2]).Build();
        Assert.Contains("metadata 'k': string length 1099511627776 runs past the end", OpenError(Write("str.gguf", stringTooLong)));

        var unknownValue = new GgufBuilder().Raw("k", 99, [0, 0, 0, 0]).Build();
        Assert.Contains("metadata 'k' has unknown value type 99", OpenError(Write("vt.gguf", unknownValue)));

        var truncatedData = good[..^8];
        Assert.Contains("tensor 'w': bytes [0, 128] of the data region lie outside the file", OpenError(Write("data.gguf", truncatedData)));

        var unknownType = new GgufBuilder().Tensor("w", [32], (GgmlType)77, new byte[32]).Build();
        Assert.Contains("tensor 'w' has ggml type 77, which is not supported", OpenError(Write("type.gguf", unknownType)));

        var badBlock = new GgufBuilder().Tensor("w", [33], GgmlType.Q8_0, new byte[68]).Build();
        Assert.Contains("first dimension 33 is not a multiple of the Q8_0 block size 32", OpenError(Write("block.gguf", badBlock)));

        var badAlignment = new GgufBuilder().U32("general.alignment", 24).Build();
        Assert.Contains("general.alignment must be a power of two", OpenError(Write("align.gguf", badAlignment)));
    }

    [Fact]
    public void Fuzzed_files_open_or_fail_with_InvalidDataException()
    {
        using var temp = new TempFolder();
        var pristine = new GgufBuilder()
            .String("general.architecture", "llama").Strings("tokenizer.ggml.tokens", ["<unk>", "<s>", "a", "b"])
            .Floats("tokenizer.ggml.scores", [0, 0, -1, -2]).U32("llama.block_count", 1)
            .Tensor("a", torch.ones(4, 8)).Tensor("b", torch.ones(3)).Build();
        var rng = new Random(99);
        int opened = 0;
        for (int round = 0; round < 200; round++)
        {
            var bytes = (byte[])pristine.Clone();
            if (rng.Next(3) == 0) bytes = bytes[..rng.Next(bytes.Length)];
            else
                for (int k = rng.Next(1, 4); k > 0; k--)
                    bytes[rng.Next(Math.Min(bytes.Length, 320))] = (byte)rng.Next(256);
            var path = temp.File($"f{round}.gguf");
            File.WriteAllBytes(path, bytes);
            try
            {
                using var gguf = GgufFile.Open(path);
                foreach (var t in gguf.Tensors)
                {
                    try { gguf.Load(t.Name).Dispose(); }
                    catch (NotSupportedException) { }
                }
                opened++;
            }
            catch (InvalidDataException e)
            {
                Assert.StartsWith(path + ": ", e.Message);
            }
            File.Delete(path);
        }
        Assert.True(opened > 0);
    }

    /// <summary>llama.cpp's converter: Hugging Face rotate-half q/k rows → interleaved (Meta) order.</summary>
    public static Tensor RotateHalfToInterleaved(Tensor w, int heads) =>
        w.reshape([heads, 2, w.shape[0] / heads / 2, .. w.shape.Skip(1)]).transpose(1, 2).reshape(w.shape);

    [Fact]
    public void Llama_gguf_imports_as_the_hugging_face_model_with_q_and_k_unpermuted()
    {
        using var temp = new TempFolder();
        using var scope = torch.NewDisposeScope();
        var g = new Generator(17);
        Tensor R(params long[] shape) => torch.randn(shape, generator: g) * 0.2;
        // hidden 16, 4 heads of 4, 2 KV heads, ffn 24, vocab 20, 2 layers; untied head.
        var hf = new Dictionary<string, Tensor>
        {
            ["model.embed_tokens.weight"] = R(20, 16),
            ["model.norm.weight"] = R(16) + 1,
            ["lm_head.weight"] = R(20, 16),
        };
        var b = new GgufBuilder()
            .String("general.architecture", "llama")
            .U32("llama.embedding_length", 16).U32("llama.block_count", 2).U32("llama.feed_forward_length", 24)
            .U32("llama.attention.head_count", 4).U32("llama.attention.head_count_kv", 2).U32("llama.context_length", 64)
            .F32("llama.attention.layer_norm_rms_epsilon", 1e-6f).F32("llama.rope.freq_base", 500000f)
            .Strings("tokenizer.ggml.tokens", Enumerable.Range(0, 20).Select(i => $"t{i}").ToArray())
            .Floats("tokenizer.ggml.scores", Enumerable.Range(0, 20).Select(i => -(float)i).ToArray())
            .Ints("tokenizer.ggml.token_type", Enumerable.Range(0, 20).Select(i => i < 3 ? 3 : 1).ToArray())
            .String("tokenizer.ggml.model", "llama")
            .U32("tokenizer.ggml.bos_token_id", 1).U32("tokenizer.ggml.eos_token_id", 2).U32("tokenizer.ggml.padding_token_id", uint.MaxValue)
            .Tensor("token_embd.weight", hf["model.embed_tokens.weight"])
            .Tensor("output_norm.weight", hf["model.norm.weight"])
            .Tensor("output.weight", hf["lm_head.weight"]);
        for (int l = 0; l < 2; l++)
        {
            var p = $"model.layers.{l}.";
            hf[p + "self_attn.q_proj.weight"] = R(16, 16);
            hf[p + "self_attn.k_proj.weight"] = R(8, 16);
            hf[p + "self_attn.v_proj.weight"] = R(8, 16);
            hf[p + "self_attn.o_proj.weight"] = R(16, 16);
            hf[p + "mlp.gate_proj.weight"] = R(24, 16);
            hf[p + "mlp.up_proj.weight"] = R(24, 16);
            hf[p + "mlp.down_proj.weight"] = R(16, 24);
            hf[p + "input_layernorm.weight"] = R(16) + 1;
            hf[p + "post_attention_layernorm.weight"] = R(16) + 1;
            b.Tensor($"blk.{l}.attn_q.weight", RotateHalfToInterleaved(hf[p + "self_attn.q_proj.weight"], 4))
             .Tensor($"blk.{l}.attn_k.weight", RotateHalfToInterleaved(hf[p + "self_attn.k_proj.weight"], 2))
             .Tensor($"blk.{l}.attn_v.weight", hf[p + "self_attn.v_proj.weight"])
             .Tensor($"blk.{l}.attn_output.weight", hf[p + "self_attn.o_proj.weight"])
             .Tensor($"blk.{l}.ffn_gate.weight", hf[p + "mlp.gate_proj.weight"])
             .Tensor($"blk.{l}.ffn_up.weight", hf[p + "mlp.up_proj.weight"])
             .Tensor($"blk.{l}.ffn_down.weight", hf[p + "mlp.down_proj.weight"])
             .Tensor($"blk.{l}.attn_norm.weight", hf[p + "input_layernorm.weight"])
             .Tensor($"blk.{l}.ffn_norm.weight", hf[p + "post_attention_layernorm.weight"]);
        }
        var path = b.Save(temp.File("tiny-llama.gguf"));

        using var imported = ModelFiles.Open(path);
        Assert.Equal("gguf", imported.Format);
        Assert.Equal(hf.Keys.Order(), imported.Tensors.Names.Order());
        foreach (var (name, expected) in hf)
            Assert.True(expected.SameAs(imported.Tensors.Load(name)), name);

        var c = imported.Config;
        Assert.Equal(16, (int)c["hidden_size"]!);
        Assert.Equal(24, (int)c["intermediate_size"]!);
        Assert.Equal(2, (int)c["num_hidden_layers"]!);
        Assert.Equal(4, (int)c["num_attention_heads"]!);
        Assert.Equal(2, (int)c["num_key_value_heads"]!);
        Assert.Equal(4, (int)c["head_dim"]!);
        Assert.Equal(1e-6, (double)c["rms_norm_eps"]!);
        Assert.Equal(500000.0, (double)c["rope_theta"]!);
        Assert.Equal(64, (int)c["max_position_embeddings"]!);
        Assert.Equal(20, (int)c["vocab_size"]!);
        Assert.False((bool)c["tie_word_embeddings"]!);
        Assert.Equal(1, (int)c["bos_token_id"]!);
        Assert.Equal(2, (int)c["eos_token_id"]!);
        Assert.Null(c["pad_token_id"]);

        var vocab = imported.Vocabulary!;
        Assert.Equal("llama", vocab.Model);
        Assert.Equal("t5", vocab.Tokens[5]);
        Assert.Equal(-5f, vocab.Scores![5]);
        Assert.Equal(3, vocab.TokenTypes![0]);
        Assert.Null(vocab.PaddingTokenId);

        // The imported model computes what the model built from the Hugging Face tensors computes.
        var config = AutoModel.ParseConfig(imported.Config, path);
        using var fromGguf = AutoModel.FromCheckpoint(config, imported.Tensors);
        var hfFile = temp.File("model.safetensors");
        SafetensorsWriter.Save(hfFile, hf);
        using var hfCheckpoint = Checkpoint.Open(hfFile);
        using var fromHf = AutoModel.FromCheckpoint(config, hfCheckpoint);
        using var no = torch.no_grad();
        var ids = torch.tensor(new long[] { 1, 5, 9, 3, 17, 2 }).unsqueeze(0);
        Assert.True(fromHf.Logits(ids).SameAs(fromGguf.Logits(ids)));
    }

    [Fact]
    public void Unknown_llama_tensor_and_architecture_are_refused()
    {
        using var temp = new TempFolder();
        var noArch = new GgufBuilder().Tensor("w", torch.ones(2)).Save(temp.File("noarch.gguf"));
        Assert.Contains("'general.architecture' is missing", Assert.Throws<InvalidDataException>(() => GgufImport.Open(noArch)).Message);
        var gpt = new GgufBuilder().String("general.architecture", "mamba").Save(temp.File("mamba.gguf"));
        Assert.Contains("architecture 'mamba' is not supported", Assert.Throws<NotSupportedException>(() => GgufImport.Open(gpt)).Message);
        var stray = new GgufBuilder().String("general.architecture", "llama")
            .U32("llama.embedding_length", 4).U32("llama.block_count", 1).U32("llama.feed_forward_length", 4).U32("llama.attention.head_count", 2)
            .Tensor("token_embd.weight", torch.ones(3, 4)).Tensor("blk.0.mystery.weight", torch.ones(4)).Save(temp.File("stray.gguf"));
        Assert.Contains("tensor 'blk.0.mystery.weight' is not part of a llama model",
            Assert.Throws<InvalidDataException>(() => GgufImport.Open(stray)).Message);
    }
}

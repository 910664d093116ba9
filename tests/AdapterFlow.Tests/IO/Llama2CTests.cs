using System.Text;
using AdapterFlow.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.IO;

public class Llama2CTests
{
    /// <summary>Writes a legacy llama2.c checkpoint from Hugging Face tensors (q/k back to interleaved rows, as run.c expects).</summary>
    private static void WriteLegacy(string path, Dictionary<string, Tensor> hf, int layers, int heads, int kvHeads, int seqLen, bool shared)
    {
        var embed = hf["model.embed_tokens.weight"];
        int vocab = (int)embed.shape[0], dim = (int)embed.shape[1];
        int hidden = (int)hf["model.layers.0.mlp.gate_proj.weight"].shape[0];
        using var f = File.Create(path);
        foreach (var v in new[] { dim, hidden, layers, heads, kvHeads, shared ? vocab : -vocab, seqLen }) f.Write(BitConverter.GetBytes(v));
        void W(Tensor t) => f.Write(t.to_type(ScalarType.Float32).contiguous().bytes);
        void All(string suffix, int permuteHeads = 0)
        {
            for (int l = 0; l < layers; l++)
            {
                var t = hf[$"model.layers.{l}.{suffix}"];
                W(permuteHeads > 0 ? GgufTests.RotateHalfToInterleaved(t, permuteHeads) : t);
            }
        }
        W(embed);
        All("input_layernorm.weight");
        All("self_attn.q_proj.weight", heads);
        All("self_attn.k_proj.weight", kvHeads);
        All("self_attn.v_proj.weight");
        All("self_attn.o_proj.weight");
        All("post_attention_layernorm.weight");
        All("mlp.gate_proj.weight");
        All("mlp.down_proj.weight");
        All("mlp.up_proj.weight");
        W(hf["model.norm.weight"]);
        int headSize = dim / heads;
        W(torch.zeros(seqLen * headSize / 2)); // freq_cis_real (unused: RoPE is recomputed)
        W(torch.zeros(seqLen * headSize / 2)); // freq_cis_imag
        if (!shared) W(hf["lm_head.weight"]);
    }

    [Fact]
    public void Legacy_checkpoint_with_separate_classifier_imports_as_hugging_face_tensors()
    {
        using var temp = new TempFolder();
        using var scope = torch.NewDisposeScope();
        var g = new Generator(23);
        Tensor R(params long[] shape) => torch.randn(shape, generator: g);
        var hf = new Dictionary<string, Tensor>
        {
            ["model.embed_tokens.weight"] = R(10, 8),
            ["model.norm.weight"] = R(8),
            ["lm_head.weight"] = R(10, 8),
        };
        for (int l = 0; l < 2; l++)
        {
            var p = $"model.layers.{l}.";
            hf[p + "input_layernorm.weight"] = R(8);
            hf[p + "self_attn.q_proj.weight"] = R(8, 8);
            hf[p + "self_attn.k_proj.weight"] = R(4, 8);
            hf[p + "self_attn.v_proj.weight"] = R(4, 8);
            hf[p + "self_attn.o_proj.weight"] = R(8, 8);
            hf[p + "post_attention_layernorm.weight"] = R(8);
            hf[p + "mlp.gate_proj.weight"] = R(12, 8);
            hf[p + "mlp.down_proj.weight"] = R(8, 12);
            hf[p + "mlp.up_proj.weight"] = R(12, 8);
        }
        var path = temp.File("model.bin");
        WriteLegacy(path, hf, layers: 2, heads: 2, kvHeads: 1, seqLen: 16, shared: false);

        var header = Llama2C.TryReadHeader(path)!.Value.Header;
        Assert.Equal(new Llama2CHeader(8, 12, 2, 2, 1, 10, 16, SharedClassifier: false), header);
        using var imported = ModelFiles.Open(path);
        Assert.Equal("llama2.c", imported.Format);
        Assert.Equal(hf.Keys.Order(), imported.Tensors.Names.Order());
        foreach (var (name, expected) in hf)
            Assert.True(expected.SameAs(imported.Tensors.Load(name)), name);
        Assert.False((bool)imported.Config["tie_word_embeddings"]!);
        Assert.Equal(1, (int)imported.Config["num_key_value_heads"]!);
        Assert.Equal(16, (int)imported.Config["max_position_embeddings"]!);
        Assert.Null(imported.Vocabulary);

        // A truncated file is no longer recognised, and says so.
        var bytes = File.ReadAllBytes(path);
        var cut = temp.File("cut.bin");
        File.WriteAllBytes(cut, bytes[..^4]);
        Assert.Null(Llama2C.TryReadHeader(cut));
        var e = Assert.Throws<InvalidDataException>(() => Llama2C.Open(cut));
        Assert.StartsWith(cut + ": not a llama2.c checkpoint", e.Message);
    }

    [Fact]
    public void Tokenizer_file_is_read_with_scores_and_bytes()
    {
        using var temp = new TempFolder();
        var path = temp.File("tok.bin");
        var tokens = new (float Score, byte[] Bytes)[] { (0f, "<unk>"u8.ToArray()), (0f, "\n<s>\n"u8.ToArray()), (-1.5f, " the"u8.ToArray()), (-2f, [0xE2, 0x96]) };
        using (var f = File.Create(path))
        {
            f.Write(BitConverter.GetBytes(7));
            foreach (var (score, bytes) in tokens)
            {
                f.Write(BitConverter.GetBytes(score));
                f.Write(BitConverter.GetBytes(bytes.Length));
                f.Write(bytes);
            }
        }
        var vocab = Llama2C.ReadVocabulary(path);
        Assert.Equal(7, vocab.MaxTokenLength);
        Assert.Equal(4, vocab.Tokens.Length);
        Assert.Equal(" the", vocab.Tokens[2]);
        Assert.Equal(-1.5f, vocab.Scores![2]);
        Assert.Equal(new byte[] { 0xE2, 0x96 }, vocab.TokenBytes![3]);
        Assert.Equal(1, vocab.BosTokenId);

        Assert.Contains("file ends inside token 4", Assert.Throws<InvalidDataException>(() => Llama2C.ReadVocabulary(path, 5)).Message);
        Assert.Contains("bytes follow the 3 tokens", Assert.Throws<InvalidDataException>(() => Llama2C.ReadVocabulary(path, 3)).Message);
        File.WriteAllBytes(path, [.. BitConverter.GetBytes(7), .. BitConverter.GetBytes(0f), .. BitConverter.GetBytes(99), 1, 2]);
        Assert.Contains("token 0 has length 99", Assert.Throws<InvalidDataException>(() => Llama2C.ReadVocabulary(path)).Message);
    }
}

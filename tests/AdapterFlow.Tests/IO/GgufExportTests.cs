using System.Text.Json.Nodes;
using AdapterFlow.IO;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.IO;

public class GgufExportTests
{
    [Fact]
    public void Writer_metadata_and_tensors_read_back()
    {
        using var temp = new TempFolder();
        var path = temp.File("w.gguf");
        var x = torch.randn([3, 64], generator: new Generator(2));
        GgufWriter.Save(path,
            [
                new("u8", (byte)7), new("i16", (short)-2), new("u32", 5u), new("i32", -5), new("f32", 0.25f), new("bool", true),
                new("str", "ä"), new("u64", 9UL), new("i64", -9L), new("f64", 0.5), new("strings", new[] { "x", "yz" }),
                new("floats", new[] { 1f, 2f }), new("nested", new object[] { new[] { 1, 2 }, new[] { 3 } }),
            ],
            [new("f32", x, GgmlType.F32), new("f16", x, GgmlType.F16), new("bf16", x, GgmlType.BF16), new("q8", x, GgmlType.Q8_0)],
            alignment: 64);
        using var gguf = GgufFile.Open(path);
        Assert.Equal((byte)7, gguf.Metadata["u8"]);
        Assert.Equal((short)-2, gguf.Metadata["i16"]);
        Assert.Equal(true, gguf.Metadata["bool"]);
        Assert.Equal("ä", gguf.Metadata["str"]);
        Assert.Equal(new[] { "x", "yz" }, gguf.Metadata["strings"]);
        Assert.Equal(new[] { 3 }, ((object[])gguf.Metadata["nested"])[1]);
        Assert.Equal(64u, gguf.Metadata["general.alignment"]);
        Assert.True(x.SameAs(gguf.Load("f32")));
        Assert.True(x.to_type(ScalarType.Float16).SameAs(gguf.Load("f16")));
        Assert.True(x.to_type(ScalarType.BFloat16).SameAs(gguf.Load("bf16")));
        // Q8_0 error is at most half a quantisation step (d = max|block| / 127) plus float16 rounding of d.
        var q8 = gguf.Load("q8");
        var step = x.reshape(-1, 32).abs().amax([1], keepdim: true) / 127;
        var error = (q8.reshape(-1, 32) - x.reshape(-1, 32)).abs();
        Assert.True((error <= step * 0.51 + 1e-3 * x.reshape(-1, 32).abs()).all().item<bool>());
        Assert.True(error.max().item<float>() > 0); // it really was quantised
    }

    [Fact]
    public void Random_llama_model_round_trips_through_gguf_in_every_weight_type()
    {
        using var temp = new TempFolder();
        var json = LlamaImport.Config(hiddenSize: 64, intermediateSize: 96, numLayers: 2, numHeads: 4, numKvHeads: 2, headDim: 16,
            rmsNormEps: 1e-5, ropeTheta: 10000, vocabSize: 40, maxPositions: 128, tieWordEmbeddings: false, bosTokenId: 1, eosTokenId: 2);
        using var model = AutoModel.FromConfig(AutoModel.ParseConfig(json, "test"), seed: 9);
        using var no = torch.no_grad();
        var ids = torch.tensor(new long[] { 1, 7, 3, 30, 12, 5 }).unsqueeze(0);
        var expected = model.Logits(ids);
        foreach (var (type, tolerance) in new[] { (GgmlType.F32, 0.0), (GgmlType.F16, 2e-3), (GgmlType.BF16, 2e-2), (GgmlType.Q8_0, 2e-2) })
        {
            var path = temp.File($"m-{type}.gguf");
            GgufExport.Save(model, path, type);
            using var loaded = ModelFiles.Load(path, new LoadOptions { DType = ScalarType.Float32 });
            var diff = (loaded.Logits(ids) - expected).abs().max().item<float>();
            Assert.True(diff <= tolerance, $"{type}: max |Δlogit| = {diff}");
            using var gguf = GgufFile.Open(path);
            Assert.Equal(GgmlType.F32, gguf.Tensor("blk.0.attn_norm.weight").Type);
            Assert.Equal(type, gguf.Tensor("blk.1.ffn_down.weight").Type);
        }
    }

    [SkippableFact]
    public void Stories260K_exported_from_hugging_face_equals_the_llama_cpp_file()
    {
        var hfFolder = SharedFiles.Require("models", "stories260K-hf");
        var original = SharedFiles.Require("models", "stories260K-gguf", "stories260K.gguf");
        using var temp = new TempFolder();
        var path = temp.File("stories.gguf");
        using (var hf = ModelFiles.Open(hfFolder))
        using (var reference = ModelFiles.Open(original))
            GgufExport.Save(hf.Config, hf.Tensors, path, GgmlType.F32, reference.Vocabulary);

        using var ours = GgufFile.Open(path);
        using var theirs = GgufFile.Open(original);
        // Same tensors byte for byte (q/k rows permuted back to llama.cpp's layout); the tied head is not duplicated.
        Assert.Equal(theirs.Tensors.Select(t => t.Name).Where(n => n != "output.weight").Order(), ours.Tensors.Select(t => t.Name).Order());
        foreach (var t in ours.Tensors)
        {
            Assert.Equal(theirs.Tensor(t.Name).Dims, t.Dims);
            Assert.Equal(theirs.ReadBytes(t.Name), ours.ReadBytes(t.Name));
        }
        foreach (var key in new[] { "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                     "llama.block_count", "llama.rope.dimension_count", "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.bos_token_id",
                     "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.model" })
            Assert.Equal(theirs.Metadata[key], ours.Metadata[key]);
        Assert.Equal((string[])theirs.Metadata["tokenizer.ggml.tokens"], (string[])ours.Metadata["tokenizer.ggml.tokens"]);

        // And it runs: greedy tokens from the exported file match the golden reference.
        var golden = (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(hfFolder, "golden_reference.json")))!;
        var tokenIds = ((JsonArray)golden["token_ids"]!).Select(x => x!.GetValue<long>()).ToArray();
        using var model = ModelFiles.Load(path);
        Assert.Equal(tokenIds[1..21], AdapterFlow.Tests.Models.ReferenceCase.GreedyWithoutCache(model, [tokenIds[0]], 20));
    }
}

using System.Text.Json.Nodes;
using AdapterFlow.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.IO;

public class CheckpointTests
{
    private static List<KeyValuePair<string, Tensor>> SomeTensors()
    {
        var generator = new Generator(3);
        return
        [
            new("model.embed_tokens.weight", torch.randn([16, 8], generator: generator)),
            new("model.layers.0.mlp.up_proj.weight", torch.randn([12, 8], generator: generator)),
            new("model.layers.0.input_layernorm.weight", torch.randn([8], generator: generator).to_type(ScalarType.BFloat16)),
            new("model.norm.weight", torch.randn([8], generator: generator)),
        ];
    }

    [Fact]
    public void Sharded_checkpoint_round_trips_through_the_index()
    {
        using var temp = new TempFolder();
        var tensors = SomeTensors();
        // 16*8*4 = 512 bytes, 12*8*4 = 384: a 600-byte limit gives shards {embed}, {up_proj, norms}.
        var written = SafetensorsWriter.SaveSharded(temp.Path, tensors, maxShardBytes: 600);
        Assert.Equal(3, written.Count);
        Assert.True(File.Exists(temp.File("model-00001-of-00002.safetensors")));
        Assert.True(File.Exists(temp.File("model-00002-of-00002.safetensors")));
        Assert.False(File.Exists(temp.File("model.safetensors")));
        var index = (JsonObject)JsonNode.Parse(File.ReadAllText(temp.File(Checkpoint.IndexFile)))!;
        Assert.Equal(512 + 384 + 16 + 32, index["metadata"]!["total_size"]!.GetValue<long>());
        Assert.Equal("model-00001-of-00002.safetensors", index["weight_map"]!["model.embed_tokens.weight"]!.GetValue<string>());

        using var checkpoint = Checkpoint.Open(temp.Path);
        Assert.Equal(2, checkpoint.Files.Count);
        Assert.Equal(tensors.Select(t => t.Key).Order(), checkpoint.Names.Order());
        foreach (var (name, expected) in tensors)
        {
            using var loaded = checkpoint.Load(name);
            Assert.Equal(expected.dtype, loaded.dtype);
            Assert.True(expected.SameAs(loaded), name);
        }

        // Saving again under a large limit replaces the shards with one file (no stale, conflicting files).
        SafetensorsWriter.SaveSharded(temp.Path, tensors, maxShardBytes: 1 << 20);
        Assert.True(File.Exists(temp.File("model.safetensors")));
        Assert.False(File.Exists(temp.File(Checkpoint.IndexFile)));
        Assert.Empty(Directory.GetFiles(temp.Path, "model-*"));
    }

    [Fact]
    public void Missing_shard_is_named()
    {
        using var temp = new TempFolder();
        SafetensorsWriter.SaveSharded(temp.Path, SomeTensors(), maxShardBytes: 600);
        File.Delete(temp.File("model-00002-of-00002.safetensors"));
        var e = Assert.Throws<FileNotFoundException>(() => Checkpoint.Open(temp.Path));
        Assert.Contains(Checkpoint.IndexFile, e.Message);
        Assert.Contains("shard 'model-00002-of-00002.safetensors'", e.Message);
        Assert.Contains("is missing", e.Message);
    }

    [Fact]
    public void Tensor_listed_in_index_but_absent_from_its_shard_is_named()
    {
        using var temp = new TempFolder();
        SafetensorsWriter.SaveSharded(temp.Path, SomeTensors(), maxShardBytes: 600);
        var indexPath = temp.File(Checkpoint.IndexFile);
        var index = (JsonObject)JsonNode.Parse(File.ReadAllText(indexPath))!;
        ((JsonObject)index["weight_map"]!)["model.layers.0.self_attn.q_proj.weight"] = "model-00001-of-00002.safetensors";
        File.WriteAllText(indexPath, index.ToJsonString());
        var e = Assert.Throws<InvalidDataException>(() => Checkpoint.Open(temp.Path));
        Assert.Contains("tensor 'model.layers.0.self_attn.q_proj.weight' is listed in shard 'model-00001-of-00002.safetensors' but that shard does not contain it", e.Message);
    }

    [Theory]
    [InlineData("""{"weight_map": 5}""", "'weight_map' (tensor name → shard file) is missing or not an object")]
    [InlineData("""{"weight_map": {"a": 5}}""", "weight_map entry 'a' must be a shard file name")]
    [InlineData("""{"weight_map": {"a": "../elsewhere.safetensors"}}""", "outside the model folder")]
    [InlineData("""{"weight_map": """, "invalid JSON")]
    public void Malformed_index_gives_a_clear_message(string json, string expected)
    {
        using var temp = new TempFolder();
        File.WriteAllText(temp.File(Checkpoint.IndexFile), json);
        var e = Assert.Throws<InvalidDataException>(() => Checkpoint.Open(temp.Path));
        Assert.StartsWith(temp.File(Checkpoint.IndexFile), e.Message);
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void Folder_without_weights_says_what_it_looked_for()
    {
        using var temp = new TempFolder();
        var e = Assert.Throws<FileNotFoundException>(() => Checkpoint.Open(temp.Path));
        Assert.Contains("no model.safetensors or model.safetensors.index.json", e.Message);
    }

    public static TheoryData<string, byte[]> PickleFiles => new()
    {
        // torch.save (zip, the default since PyTorch 1.6) and a bare pickle with protocol 2 (legacy torch.save).
        { "pytorch_model.bin", [(byte)'P', (byte)'K', 3, 4, 0, 0, 0, 0] },
        { "model.pt", [0x80, 0x02, (byte)'c', (byte)'t', (byte)'o', (byte)'r', (byte)'c', (byte)'h'] },
        { "weights.pth", [0x80, 0x04, 0x95, 0, 0, 0, 0, 0] },
    };

    [Theory]
    [MemberData(nameof(PickleFiles))]
    public void Pickle_checkpoints_are_refused_with_a_conversion_hint(string name, byte[] content)
    {
        using var temp = new TempFolder();
        var path = temp.File(name);
        File.WriteAllBytes(path, [.. content, .. new byte[64]]);
        foreach (var open in new Func<IDisposable>[] { () => Checkpoint.Open(path), () => ModelFiles.Open(path), () => ModelFiles.Open(temp.Path) })
        {
            var e = Assert.Throws<InvalidDataException>(() => open().Dispose());
            Assert.StartsWith(path + ": ", e.Message);
            Assert.Contains("pickle", e.Message);
            Assert.Contains("arbitrary code", e.Message);
            Assert.Contains("save_pretrained(out, safe_serialization=True)", e.Message);
            Assert.DoesNotContain('\n', e.Message);
        }
    }

    [Fact]
    public void Folder_with_only_pytorch_model_bin_is_refused_by_Checkpoint()
    {
        using var temp = new TempFolder();
        File.WriteAllBytes(temp.File("pytorch_model.bin"), [(byte)'P', (byte)'K', 3, 4, 0, 0]);
        var e = Assert.Throws<InvalidDataException>(() => Checkpoint.Open(temp.Path));
        Assert.Contains("pytorch_model.bin: this is a PyTorch pickle checkpoint", e.Message);
    }

    [Fact]
    public void Unrecognised_file_is_refused_by_ModelFiles()
    {
        using var temp = new TempFolder();
        var path = temp.File("random.bin");
        File.WriteAllBytes(path, Enumerable.Range(0, 100).Select(i => (byte)(i * 7)).ToArray());
        var e = Assert.Throws<InvalidDataException>(() => ModelFiles.Open(path));
        Assert.Contains("unrecognised model file", e.Message);
    }
}

using System.Text.Json.Nodes;
using AdapterFlow.IO;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Models;

/// <summary>Save / load of the LLaMA family: bit-identical round trips, config round trips, dtypes, bad checkpoints.</summary>
public sealed class LlamaCheckpointTests : IDisposable
{
    private readonly string _temp = Path.Combine(Path.GetTempPath(), "adapterflow-llama-" + Guid.NewGuid().ToString("N"));

    public static TheoryData<string> Architectures => new() { "llama", "mistral", "qwen2" };

    public void Dispose()
    {
        if (Directory.Exists(_temp)) Directory.Delete(_temp, recursive: true);
    }

    private static void AssertSameTensors(CausalLM expected, CausalLM actual)
    {
        var a = expected.state_dict();
        var b = actual.state_dict();
        Assert.Equal(a.Keys.Order(), b.Keys.Order());
        foreach (var (name, tensor) in a)
        {
            Assert.Equal(tensor.dtype, b[name].dtype);
            Assert.True(tensor.shape.SequenceEqual(b[name].shape) && tensor.eq(b[name]).all().item<bool>(), $"tensor '{name}' changed in the round trip");
        }
    }

    [SkippableTheory]
    [MemberData(nameof(Architectures))]
    public void Save_then_load_is_bit_identical_and_keeps_the_config(string arch)
    {
        using var reference = ReferenceCase.Open(arch);
        using var model = AutoModel.FromPretrained(reference.Folder);
        var dir = Path.Combine(_temp, arch);
        AutoModel.Save(model, dir);
        using var loaded = AutoModel.FromPretrained(dir);
        AssertSameTensors(model, loaded);

        // The saved file holds exactly the checkpoint's tensors (a tied head is not written).
        using (var original = SafetensorsFile.Open(Path.Combine(reference.Folder, "model.safetensors")))
        using (var saved = SafetensorsFile.Open(Path.Combine(dir, "model.safetensors")))
            Assert.Equal(original.Names.Order(), saved.Names.Order());

        // Every key transformers wrote survives with its value (we may add keys, never change one).
        var written = (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))!;
        var source = (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(reference.Folder, "config.json")))!;
        foreach (var (key, value) in source)
            Assert.True(JsonNode.DeepEquals(value, written[key]), $"{arch}: config key '{key}' was {value?.ToJsonString()}, saved {written[key]?.ToJsonString()}");
        Assert.True(JsonNode.DeepEquals(model.Config.ToJson(), loaded.Config.ToJson()));
    }

    [Fact]
    public void Random_model_round_trips_in_float32_and_bfloat16()
    {
        foreach (var (dtype, tied) in new[] { (ScalarType.Float32, true), (ScalarType.BFloat16, false) })
        {
            using var model = AutoModel.FromConfig(LlamaTestConfigs.Tiny("qwen2", tied), seed: 11, dtype: dtype);
            var dir = Path.Combine(_temp, $"random-{dtype}");
            AutoModel.Save(model, dir);
            using var loaded = AutoModel.FromPretrained(dir);
            Assert.Equal(dtype, loaded.DType);
            AssertSameTensors(model, loaded);
            Assert.Equal(dtype == ScalarType.BFloat16 ? "bfloat16" : "float32", AutoModel.LoadConfig(dir).DType);
        }
    }

    [SkippableFact]
    public void Bfloat16_load_keeps_bfloat16_and_logits_stay_close()
    {
        using var reference = ReferenceCase.Open("llama");
        using var model = AutoModel.FromPretrained(reference.Folder, new LoadOptions { DType = ScalarType.BFloat16 });
        Assert.All(model.parameters(), p => Assert.Equal(ScalarType.BFloat16, p.dtype));
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var mask = reference.Tensor("attention_mask");
        var logits = model.Logits(reference.Tensor("input_ids"), mask);
        Assert.Equal(ScalarType.BFloat16, logits.dtype);
        var expected = reference.Tensor("logits");
        double diff = ReferenceCase.MaxDiffWhereReal(logits, expected, mask);
        Assert.True(diff < 0.25, $"bfloat16 logits are {diff} away");
        // The tied head follows the embedding through the dtype change.
        var tied = (TiedLMHead)((LlamaForCausalLM)model).lm_head;
        Assert.Equal(ScalarType.BFloat16, tied.weight.dtype);
        Assert.True(tied.weight.eq(ModuleSurgery.EmbeddingWeight(((LlamaForCausalLM)model).model.embed_tokens)).all().item<bool>());
    }

    private string WriteCheckpoint(string reference, Func<string, Tensor, Tensor?> edit)
    {
        var dir = Path.Combine(_temp, "edited-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        File.Copy(Path.Combine(reference, "config.json"), Path.Combine(dir, "config.json"));
        using var source = SafetensorsFile.Open(Path.Combine(reference, "model.safetensors"));
        using var scope = torch.NewDisposeScope();
        var tensors = new List<KeyValuePair<string, Tensor>>();
        foreach (var name in source.Names)
            if (edit(name, source.Load(name)) is { } t)
                tensors.Add(new(name, t));
        SafetensorsWriter.Save(Path.Combine(dir, "model.safetensors"), tensors, new Dictionary<string, string> { ["format"] = "pt" });
        return dir;
    }

    [SkippableFact]
    public void Missing_tensor_is_a_one_line_error_naming_it()
    {
        var folder = SharedFiles.Require("reference", "qwen2");
        const string victim = "model.layers.1.self_attn.k_proj.bias";
        var dir = WriteCheckpoint(folder, (name, t) => name == victim ? null : t);
        var e = Assert.Throws<InvalidDataException>(() => AutoModel.FromPretrained(dir).Dispose());
        Assert.Contains($"'{victim}'", e.Message);
        Assert.Contains("missing", e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [SkippableFact]
    public void Wrong_shape_is_a_one_line_error_naming_the_tensor()
    {
        var folder = SharedFiles.Require("reference", "mistral");
        const string victim = "model.layers.0.mlp.up_proj.weight";
        var dir = WriteCheckpoint(folder, (name, t) => name == victim ? t.narrow(0, 0, t.shape[0] - 1) : t);
        var e = Assert.Throws<InvalidDataException>(() => AutoModel.FromPretrained(dir).Dispose());
        Assert.Contains($"'{victim}'", e.Message);
        Assert.Contains("shape", e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [SkippableFact]
    public void Untied_head_missing_is_an_error_but_tied_head_may_be_absent()
    {
        var folder = SharedFiles.Require("reference", "mistral");
        var dir = WriteCheckpoint(folder, (name, t) => name == "lm_head.weight" ? null : t);
        var e = Assert.Throws<InvalidDataException>(() => AutoModel.FromPretrained(dir).Dispose());
        Assert.Contains("'lm_head.weight'", e.Message);
    }
}

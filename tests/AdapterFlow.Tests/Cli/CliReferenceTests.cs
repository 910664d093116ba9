using AdapterFlow.IO;
using AdapterFlow.Tests.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Cli;

/// <summary>inspect and forward on the transformers reference model in ../shared/reference/llama.</summary>
public class CliReferenceTests
{
    [SkippableFact]
    public void Forward_matches_transformers_logits_where_the_mask_is_one()
    {
        var folder = SharedFiles.Require("reference", "llama");
        var reference = Path.Combine(folder, "reference.safetensors");
        using var tmp = new TempDir();
        var output = tmp.File("out.safetensors");
        CliRunner.Run("forward", "--model", folder, "--inputs", reference, "--out", output).AssertSuccess();

        using var scope = torch.NewDisposeScope();
        using var expectedFile = SafetensorsFile.Open(reference);
        using var actualFile = SafetensorsFile.Open(output);
        Assert.Equal(["logits"], actualFile.Names);
        Assert.Equal("F32", actualFile.Entry("logits").DType);
        var logits = actualFile.Load("logits");
        var expected = expectedFile.Load("logits");
        Assert.Equal(expected.shape, logits.shape);
        var diff = ReferenceCase.MaxDiffWhereReal(logits, expected, expectedFile.Load("attention_mask"));
        Assert.True(diff < 1e-4, $"max |Δlogit| = {diff}");
    }

    [SkippableFact]
    public void Inspect_reports_the_reference_model()
    {
        var folder = SharedFiles.Require("reference", "llama");
        var json = CliRunner.Run("inspect", folder, "--json").AssertSuccess().LastJson();
        Assert.Equal("llama", json.GetProperty("model_type").GetString());
        Assert.Equal("LlamaForCausalLM", json.GetProperty("architecture").GetString());
        Assert.Equal("float32", json.GetProperty("dtype").GetString());
        Assert.Equal(2, json.GetProperty("layers").GetInt32());
        Assert.Equal(4, json.GetProperty("heads").GetInt32());
        Assert.Equal(2, json.GetProperty("kv_heads").GetInt32());
        Assert.Equal(64, json.GetProperty("hidden_size").GetInt32());
        Assert.Equal(384, json.GetProperty("vocab_size").GetInt32());
        Assert.Equal(256, json.GetProperty("context_length").GetInt32());
        Assert.True(json.GetProperty("tied_embeddings").GetBoolean());
        // Parameter count of the stored tensors: embeddings + 2 layers + final norm (tied head not stored).
        long perLayer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 172 + 2 * 64;
        Assert.Equal(384 * 64 + 2 * perLayer + 64, json.GetProperty("parameters").GetInt64());

        var table = CliRunner.Run("inspect", folder).AssertSuccess().Stdout;
        Assert.Contains("LlamaForCausalLM", table);
        Assert.Contains("4 query / 2 key-value", table);
    }

    [SkippableFact]
    public void Inspect_agrees_across_the_safetensors_gguf_and_llama2c_layouts_of_stories260K()
    {
        var hf = SharedFiles.Require("models", "stories260K-hf");
        var gguf = SharedFiles.Require("models", "stories260K-gguf", "stories260K.gguf");
        var llama2c = SharedFiles.Require("models", "stories260K", "stories260K.bin");
        var summaries = new[] { hf, gguf, llama2c }.Select(p => CliRunner.Run("inspect", p, "--json").AssertSuccess().LastJson()).ToArray();
        Assert.Equal(["safetensors", "gguf", "llama2.c"], summaries.Select(s => s.GetProperty("format").GetString()));
        foreach (var s in summaries)
        {
            Assert.Equal("LlamaForCausalLM", s.GetProperty("architecture").GetString());
            Assert.Equal(summaries[0].GetProperty("parameters").GetInt64(), s.GetProperty("parameters").GetInt64());
            Assert.Equal(5, s.GetProperty("layers").GetInt32());
            Assert.Equal(4, s.GetProperty("kv_heads").GetInt32());
            Assert.Equal(512, s.GetProperty("vocab_size").GetInt32());
        }
        // The real model (with its tokenizer.json) generates its well-known greedy story.
        var story = CliRunner.Run("generate", "--model", hf, "--prompt", "Once upon a time", "--max-new-tokens", "20", "--temperature", "0", "--json")
            .AssertSuccess().LastJson().GetProperty("text").GetString();
        Assert.StartsWith(", there was a little girl", story);
    }

    [SkippableFact]
    public void Forward_rejects_bad_inputs_with_one_line_naming_the_file()
    {
        var folder = SharedFiles.Require("reference", "llama");
        using var tmp = new TempDir();
        using var scope = torch.NewDisposeScope();

        var noIds = tmp.File("no-ids.safetensors");
        SafetensorsWriter.Save(noIds, [new("tokens", torch.ones(1, 3, ScalarType.Int64))]);
        var message = CliRunner.Run("forward", "--model", folder, "--inputs", noIds, "--out", tmp.File("o.safetensors")).AssertUsageError();
        Assert.Contains(noIds, message);
        Assert.Contains("input_ids", message);

        var outOfVocab = tmp.File("oov.safetensors");
        SafetensorsWriter.Save(outOfVocab, [new("input_ids", torch.tensor(new long[] { 5, 384 }).unsqueeze(0))]);
        message = CliRunner.Run("forward", "--model", folder, "--inputs", outOfVocab, "--out", tmp.File("o.safetensors")).AssertUsageError();
        Assert.Contains("384", message);

        var floatIds = tmp.File("float.safetensors");
        SafetensorsWriter.Save(floatIds, [new("input_ids", torch.ones(1, 3))]);
        Assert.Contains("integer", CliRunner.Run("forward", "--model", folder, "--inputs", floatIds, "--out", tmp.File("o.safetensors")).AssertUsageError());

        var badMask = tmp.File("mask.safetensors");
        SafetensorsWriter.Save(badMask, [new("input_ids", torch.ones(1, 3, ScalarType.Int64)), new("attention_mask", torch.ones(1, 4, ScalarType.Int64))]);
        Assert.Contains("attention_mask", CliRunner.Run("forward", "--model", folder, "--inputs", badMask, "--out", tmp.File("o.safetensors")).AssertUsageError());

        var garbage = tmp.File("garbage.safetensors");
        File.WriteAllBytes(garbage, [1, 2, 3]);
        Assert.Contains(garbage, CliRunner.Run("forward", "--model", folder, "--inputs", garbage, "--out", tmp.File("o.safetensors")).AssertUsageError());

        Assert.Contains("adapter folder not found", CliRunner.Run("forward", "--model", folder, "--adapter", tmp.File("no-adapter"),
            "--inputs", Path.Combine(folder, "reference.safetensors"), "--out", tmp.File("o.safetensors")).AssertUsageError());
        Assert.False(File.Exists(tmp.File("o.safetensors")));
    }
}

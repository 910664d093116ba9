using AdapterFlow.Adapters;
using AdapterFlow.IO;
using AdapterFlow.Models;
using AdapterFlow.Tests.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Adapters;

/// <summary>
/// The seven PEFT adapters of every reference model (../shared/reference/&lt;arch&gt;/adapters/&lt;method&gt;, written by
/// peft 0.20 with peft's logits): loaded by AdapterFlow they must give peft's logits within 1e-4.
/// </summary>
public class PeftReferenceTests
{
    public static readonly string[] Arches = ["llama", "mistral", "qwen2", "gpt2", "opt", "bloom", "gptj", "gpt_neox"];
    public static readonly string[] Methods = ["lora", "lora_rslora", "lora_dora", "lora_all_linear", "ia3", "prefix_tuning", "prompt_tuning"];

    public static TheoryData<string, string> Cases()
    {
        var data = new TheoryData<string, string>();
        foreach (var a in Arches)
            foreach (var m in Methods) data.Add(a, m);
        return data;
    }

    internal static string AdapterFolder(string arch, string method) => SharedFiles.Require("reference", arch, "adapters", method);

    internal static CausalLM LoadBase(string arch) => AutoModel.FromPretrained(SharedFiles.Require("reference", arch));

    [SkippableTheory]
    [MemberData(nameof(Cases))]
    public void Adapter_gives_peft_logits(string arch, string method)
    {
        var folder = AdapterFolder(arch, method);
        using var reference = SafetensorsFile.Open(Path.Combine(folder, "reference.safetensors"));
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var peft = PeftModel.FromPretrained(LoadBase(arch), folder);
        var ids = reference.Load("input_ids");
        var mask = reference.Contains("attention_mask") ? reference.Load("attention_mask") : null;
        var expected = reference.Load("logits");

        var logits = peft.Logits(ids, mask);
        Assert.Equal(expected.shape, logits.shape);
        var diff = ReferenceCase.MaxDiffWhereReal(logits, expected, mask);
        Assert.True(diff < ReferenceCase.LogitTolerance, $"{arch}/{method}: logits differ from peft's by {diff}");

        // The adapter must matter: the base model alone is far from peft's output.
        using (peft.DisableAdapters())
        {
            var baseLogits = peft.Logits(ids, mask);
            if (baseLogits.shape.SequenceEqual(expected.shape))
                Assert.True(ReferenceCase.MaxDiffWhereReal(baseLogits, expected, mask) > 0.1, $"{arch}/{method}: disabling the adapter changed nothing");
        }

        if (reference.Contains("logits_merged"))
        {
            var merged = reference.Load("logits_merged");
            peft.Merge();
            var mergedLogits = peft.Logits(ids, mask);
            var mergedDiff = ReferenceCase.MaxDiffWhereReal(mergedLogits, merged, mask);
            Assert.True(mergedDiff < ReferenceCase.LogitTolerance, $"{arch}/{method}: merged logits differ from peft's by {mergedDiff}");
            Assert.True(ReferenceCase.MaxDiffWhereReal(mergedLogits, logits, mask) < ReferenceCase.LogitTolerance, "merged != unmerged");
            peft.Unmerge();
            var again = peft.Logits(ids, mask);
            Assert.True(ReferenceCase.MaxDiffWhereReal(again, logits, mask) < 2e-5, $"{arch}/{method}: unmerge did not restore the model");
        }
    }

    [SkippableTheory]
    [MemberData(nameof(Cases))]
    public void Saved_adapter_has_peft_names_and_bytes_and_loads_back(string arch, string method)
    {
        var folder = AdapterFolder(arch, method);
        var output = Path.Combine(Path.GetTempPath(), $"af-peft-{arch}-{method}-{Guid.NewGuid():N}");
        try
        {
            using var scope = torch.NewDisposeScope();
            using var no = torch.no_grad();
            var peft = PeftModel.FromPretrained(LoadBase(arch), folder);
            peft.SavePretrained(output);

            using (var original = SafetensorsFile.Open(Path.Combine(folder, PeftModel.WeightsFile)))
            using (var saved = SafetensorsFile.Open(Path.Combine(output, PeftModel.WeightsFile)))
            {
                Assert.Equal(original.Names.Order(), saved.Names.Order());
                foreach (var name in original.Names)
                {
                    var a = original.Load(name);
                    var b = saved.Load(name);
                    Assert.Equal(a.shape, b.shape);
                    Assert.True(a.eq(b).all().item<bool>(), $"{name} changed in the round trip");
                }
            }

            // Every key of peft's config survives, with the same value.
            var peftJson = (System.Text.Json.Nodes.JsonObject)System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(folder, PeftModel.ConfigFile)))!;
            var ourJson = (System.Text.Json.Nodes.JsonObject)System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(output, PeftModel.ConfigFile)))!;
            foreach (var (key, value) in peftJson)
            {
                Assert.True(ourJson.ContainsKey(key), $"saved config lost '{key}'");
                Assert.True(System.Text.Json.Nodes.JsonNode.DeepEquals(value, ourJson[key]),
                    $"'{key}': peft {value?.ToJsonString()} vs ours {ourJson[key]?.ToJsonString()}");
            }

            var reloaded = PeftModel.FromPretrained(LoadBase(arch), output);
            using var reference = SafetensorsFile.Open(Path.Combine(folder, "reference.safetensors"));
            var ids = reference.Load("input_ids");
            var mask = reference.Contains("attention_mask") ? reference.Load("attention_mask") : null;
            Assert.True(peft.Logits(ids, mask).eq(reloaded.Logits(ids, mask)).all().item<bool>(), "reloaded adapter gives different logits");
        }
        finally
        {
            if (Directory.Exists(output)) Directory.Delete(output, recursive: true);
        }
    }

    [SkippableTheory]
    [InlineData("llama")]
    [InlineData("gpt2")]
    [InlineData("opt")]
    public void Merge_and_unload_equals_peft_merged_checkpoint(string arch)
    {
        var folder = AdapterFolder(arch, "lora");
        var mergedFolder = SharedFiles.Require("reference", arch, "adapters", "lora", "merged");
        using var scope = torch.NewDisposeScope();
        var model = PeftModel.FromPretrained(LoadBase(arch), folder).MergeAndUnload();
        var names = model.state_dict().Keys.ToArray();
        Assert.DoesNotContain(names, n => n.Contains("lora_") || n.Contains("base_layer"));

        var output = Path.Combine(Path.GetTempPath(), $"af-merged-{arch}-{Guid.NewGuid():N}");
        try
        {
            AutoModel.Save(model, output);
            using var ours = Checkpoint.Open(output);
            using var peft = Checkpoint.Open(mergedFolder);
            Assert.Equal(peft.Names.Order(), ours.Names.Order());
            foreach (var name in peft.Names)
            {
                var diff = (peft.Load(name) - ours.Load(name)).abs().max().item<float>();
                Assert.True(diff < 1e-5, $"{arch}: merged tensor {name} differs from peft's by {diff}");
            }
        }
        finally
        {
            if (Directory.Exists(output)) Directory.Delete(output, recursive: true);
        }
    }

    public static TheoryData<string, string> GreedyCases()
    {
        var data = new TheoryData<string, string>();
        foreach (var a in new[] { "llama", "gpt2", "bloom", "gpt_neox" })
            foreach (var m in Methods) data.Add(a, m);
        return data;
    }

    /// <summary>peft_model.generate's 10 greedy tokens, reproduced by a plain argmax loop over the adapted model.</summary>
    [SkippableTheory]
    [MemberData(nameof(GreedyCases))]
    public void Greedy_tokens_match_peft_generate(string arch, string method)
    {
        var folder = AdapterFolder(arch, method);
        var json = (System.Text.Json.Nodes.JsonObject)System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(folder, "reference.json")))!;
        var prompt = ((System.Text.Json.Nodes.JsonArray)json["greedy"]!["prompt"]!).Select(x => x!.GetValue<long>()).ToList();
        var expected = ((System.Text.Json.Nodes.JsonArray)json["greedy"]!["new_tokens"]!).Select(x => x!.GetValue<long>()).ToArray();
        var peft = PeftModel.FromPretrained(LoadBase(arch), folder);
        var tokens = prompt.ToList();
        for (int i = 0; i < expected.Length; i++)
        {
            using var scope = torch.NewDisposeScope();
            using var no = torch.no_grad();
            var logits = peft.Logits(torch.tensor(tokens.ToArray()).unsqueeze(0));
            tokens.Add(logits[0, -1].argmax().item<long>());
        }
        Assert.Equal(expected, tokens.Skip(prompt.Count).ToArray());
    }
}

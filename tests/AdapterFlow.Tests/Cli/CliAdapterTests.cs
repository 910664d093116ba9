using AdapterFlow.Adapters;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.Adapters.PromptTuning;
using AdapterFlow.Evaluation;
using AdapterFlow.IO;
using AdapterFlow.Models;
using AdapterFlow.Tests.Adapters;
using AdapterFlow.Tests.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Cli;

/// <summary>--adapter on forward, generate and eval: PEFT adapter folders applied by the front end.</summary>
[Collection(TinyModelCollection.Name)]
public class CliAdapterTests(TinyModelFixture tiny)
{
    public static TheoryData<string, string> ForwardCases()
    {
        var data = new TheoryData<string, string>();
        foreach (var arch in PeftReferenceTests.Arches)
            foreach (var method in new[] { "lora", "ia3", "prefix_tuning" })
                data.Add(arch, method);
        return data;
    }

    [SkippableTheory]
    [MemberData(nameof(ForwardCases))]
    public void Forward_with_adapter_gives_peft_logits(string arch, string method)
    {
        var folder = PeftReferenceTests.AdapterFolder(arch, method);
        var reference = Path.Combine(folder, "reference.safetensors");
        using var tmp = new TempDir();
        var output = tmp.File("out.safetensors");
        var run = CliRunner.Run("forward", "--model", SharedFiles.Require("reference", arch), "--adapter", folder,
            "--inputs", reference, "--out", output).AssertSuccess();
        Assert.Contains("with adapter", run.Stdout);

        using var scope = torch.NewDisposeScope();
        using var expectedFile = SafetensorsFile.Open(reference);
        using var actualFile = SafetensorsFile.Open(output);
        var expected = expectedFile.Load("logits");
        var logits = actualFile.Load("logits");
        Assert.Equal(expected.shape, logits.shape);
        var mask = expectedFile.Contains("attention_mask") ? expectedFile.Load("attention_mask") : null;
        var diff = ReferenceCase.MaxDiffWhereReal(logits, expected, mask);
        Assert.True(diff < 1e-4, $"max |Δlogit| = {diff}");
    }

    [SkippableTheory]
    [InlineData("llama", "lora")]
    [InlineData("llama", "lora_dora")]
    [InlineData("llama", "ia3")]
    [InlineData("llama", "prompt_tuning")]
    [InlineData("llama", "prefix_tuning")]
    [InlineData("gpt2", "prefix_tuning")]
    [InlineData("opt", "prompt_tuning")]
    public void Generate_with_adapter_gives_peft_greedy_tokens(string arch, string method)
    {
        var folder = PeftReferenceTests.AdapterFolder(arch, method);
        var (prompt, expected) = PeftGenerationTests.Greedy(folder);
        var json = CliRunner.Run("generate", "--model", SharedFiles.Require("reference", arch), "--adapter", folder,
            "--prompt-ids", string.Join(",", prompt), "--max-new-tokens", expected.Length.ToString(), "--temperature", "0", "--json")
            .AssertSuccess().LastJson();
        Assert.Equal(expected, json.GetProperty("token_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray());
        Assert.Equal(prompt.Length, json.GetProperty("prompt_tokens").GetInt32());
    }

    [SkippableFact]
    public void Generate_with_prompt_ids_and_no_tokenizer_prints_ids()
    {
        var llama = SharedFiles.Require("reference", "llama");
        var folder = PeftReferenceTests.AdapterFolder("llama", "lora");
        var (prompt, expected) = PeftGenerationTests.Greedy(folder);
        var run = CliRunner.Run("generate", "--model", llama, "--adapter", folder, "--prompt-ids", string.Join(",", prompt),
            "--max-new-tokens", "3", "--temperature", "0").AssertSuccess();
        Assert.StartsWith(" " + string.Join(" ", expected.Take(3)), run.StdoutLines[0]);
        Assert.Contains("not a token id", CliRunner.Run("generate", "--model", llama, "--prompt-ids", "1,x").AssertUsageError());
        Assert.Contains("exactly one of --prompt or --prompt-ids", CliRunner.Run("generate", "--model", llama, "--prompt", "a", "--prompt-ids", "1").AssertUsageError());
    }

    [SkippableFact]
    public void Adapter_for_another_model_is_a_one_line_usage_error()
    {
        var llama = SharedFiles.Require("reference", "llama");
        var gpt2Lora = PeftReferenceTests.AdapterFolder("gpt2", "lora");
        using var tmp = new TempDir();
        var message = CliRunner.Run("forward", "--model", llama, "--adapter", gpt2Lora,
            "--inputs", Path.Combine(llama, "reference.safetensors"), "--out", tmp.File("o.safetensors")).AssertUsageError();
        Assert.Contains("adapter", message);
        Assert.False(File.Exists(tmp.File("o.safetensors")));
        // generate and eval load the adapter the same way (the tiny model has a tokenizer; the adapter does not fit it).
        Assert.Contains(gpt2Lora, CliRunner.Run("generate", "--model", tiny.ModelDir, "--adapter", gpt2Lora, "--prompt", "Once").AssertUsageError());
        Assert.Contains(gpt2Lora, CliRunner.Run("generate", "--model", llama, "--adapter", gpt2Lora, "--prompt-ids", "1,2").AssertUsageError());
        var text = tmp.File("text.txt");
        File.WriteAllText(text, "Once upon a time there was a dog.");
        Assert.Contains(gpt2Lora, CliRunner.Run("eval", "--model", tiny.ModelDir, "--adapter", gpt2Lora, "--perplexity", text).AssertUsageError());
        Assert.Contains("adapter folder not found", CliRunner.Run("generate", "--model", tiny.ModelDir, "--adapter", tmp.File("none"), "--prompt", "Once").AssertUsageError());
    }

    /// <summary>A prompt-tuning adapter (random virtual tokens) saved in PEFT's format for the tiny model.</summary>
    private string PromptAdapter()
    {
        var dir = tiny.Scratch("prompt-adapter");
        if (File.Exists(Path.Combine(dir, PeftModel.WeightsFile))) return dir;
        using var peft = PeftModel.Create(AutoModel.FromPretrained(tiny.ModelDir), new PromptTuningConfig { NumVirtualTokens = 4 });
        peft.SavePretrained(dir);
        return dir;
    }

    [Fact]
    public void Generate_with_prompt_adapter_matches_a_full_forward_greedy_loop()
    {
        tiny.InitRun.AssertSuccess();
        var adapter = PromptAdapter();
        var json = CliRunner.Run("generate", "--model", tiny.ModelDir, "--adapter", adapter, "--prompt", "Once upon a time",
            "--max-new-tokens", "6", "--temperature", "0", "--json").AssertSuccess().LastJson();
        var ids = json.GetProperty("token_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        Assert.NotEmpty(ids);

        // Independent of the cache and positions generation uses: argmax over a full forward of the whole sequence.
        using var textModel = TextModel.Load(tiny.ModelDir, adapterPath: adapter);
        Assert.IsType<PeftModel>(textModel.Model);
        var sequence = textModel.Tokenizer.Encode("Once upon a time", addSpecialTokens: true).Select(x => (long)x).ToList();
        using var no = torch.no_grad();
        foreach (var id in ids)
        {
            using var scope = torch.NewDisposeScope();
            var logits = textModel.Model.Logits(torch.tensor(sequence.ToArray()).unsqueeze(0));
            Assert.Equal(id, (int)logits[0, -1].argmax().item<long>());
            sequence.Add(id);
        }
    }

    [Fact]
    public void Eval_perplexity_with_adapter_uses_it()
    {
        tiny.InitRun.AssertSuccess();
        var adapter = tiny.Scratch("lora-adapter");
        using (var peft = PeftModel.Create(AutoModel.FromPretrained(tiny.ModelDir), new LoraConfig { R = 4, LoraAlpha = 8 }))
        {
            using var no = torch.no_grad();
            // Fresh LoRA has B = 0 (no effect): give it weights that change the output.
            foreach (var (name, p) in peft.AdapterTensors(PeftModel.DefaultAdapter))
                if (name.Contains("lora_B")) p.normal_(0, 0.5);
            peft.SavePretrained(adapter);
        }
        var text = tiny.Scratch("ppl.txt");
        File.WriteAllText(text, "Once upon a time there was a little dog who liked to run in the park with his friends.");
        double Ppl(params string[] extra) => CliRunner.Run(["eval", "--model", tiny.ModelDir, "--perplexity", text, "--json", .. extra])
            .AssertSuccess().LastJson().GetProperty("perplexity").GetDouble();
        var withAdapter = Ppl("--adapter", adapter);
        Assert.NotEqual(Ppl(), withAdapter, 6);

        using var lm = TextModel.Load(tiny.ModelDir, adapterPath: adapter);
        var expected = Perplexity.OfText(lm.Model, lm.Tokenizer, File.ReadAllText(text), new PerplexityOptions()).Value;
        Assert.Equal(expected, withAdapter, 6);
    }

    [Fact]
    public void Perplexity_with_prompt_adapter_scores_the_text_tokens_only()
    {
        tiny.InitRun.AssertSuccess();
        var adapter = PromptAdapter();
        var text = "Once upon a time there was a little dog.";
        using var lm = TextModel.Load(tiny.ModelDir, adapterPath: adapter);
        var result = Perplexity.OfText(lm.Model, lm.Tokenizer, text, new PerplexityOptions());
        // By hand: mean NLL of tokens 1.. given the prefix, from logits after the virtual tokens.
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var ids = lm.Tokenizer.Encode(text, addSpecialTokens: true).Select(x => (long)x).ToArray();
        var logits = lm.Model.Logits(torch.tensor(ids).unsqueeze(0));
        int n = ((PromptTuningConfig)((PeftModel)lm.Model).ActiveConfig).NumVirtualTokens;
        Assert.Equal(n + ids.Length, logits.shape[1]);
        var logProbs = logits[0].narrow(0, n, ids.Length - 1).log_softmax(-1);
        var targets = torch.tensor(ids[1..]).unsqueeze(-1);
        var nll = -logProbs.gather(1, targets).mean().item<float>();
        Assert.Equal(nll, result.MeanNll, 4);
    }

    [SkippableFact]
    public void Merge_writes_a_model_equal_to_the_adapter_model_and_to_peft_merged()
    {
        var llama = SharedFiles.Require("reference", "llama");
        var folder = PeftReferenceTests.AdapterFolder("llama", "lora");
        var peftMerged = Path.Combine(folder, "merged");
        Skip.IfNot(Directory.Exists(peftMerged), $"{peftMerged} is absent");
        using var tmp = new TempDir();
        var output = tmp.File("merged");
        var json = CliRunner.Run("merge", "--model", llama, "--adapter", folder, "--out", output, "--json").AssertSuccess().LastJson();
        Assert.Equal("LORA", json.GetProperty("peft_type").GetString());
        Assert.Equal(4, json.GetProperty("merged_modules").GetInt32()); // q_proj and v_proj of 2 layers
        Assert.Contains("generation_config.json", json.GetProperty("copied_files").EnumerateArray().Select(e => e.GetString()));

        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        using var reference = SafetensorsFile.Open(Path.Combine(folder, "reference.safetensors"));
        var ids = reference.Load("input_ids");
        var mask = reference.Load("attention_mask");
        using var merged = AutoModel.FromPretrained(output);
        var mergedLogits = merged.Logits(ids, mask);
        using var adapted = PeftModel.FromPretrained(AutoModel.FromPretrained(llama), folder);
        var adapterLogits = adapted.Logits(ids, mask);
        using var theirs = AutoModel.FromPretrained(peftMerged);
        var theirLogits = theirs.Logits(ids, mask);
        foreach (var (name, other) in new[] { ("adapter model", adapterLogits), ("peft's merged model", theirLogits), ("peft's logits_merged", reference.Load("logits_merged")) })
        {
            var diff = ReferenceCase.MaxDiffWhereReal(mergedLogits, other, mask);
            Assert.True(diff < 1e-4, $"merged vs {name}: max |Δlogit| = {diff}");
        }
        // Same tensors as PEFT's merged checkpoint.
        using var ourFile = SafetensorsFile.Open(Path.Combine(output, "model.safetensors"));
        using var theirFile = SafetensorsFile.Open(Path.Combine(peftMerged, "model.safetensors"));
        Assert.Equal(theirFile.Names.Order(), ourFile.Names.Order());
        foreach (var name in ourFile.Names)
            Assert.True((ourFile.Load(name) - theirFile.Load(name)).abs().max().item<float>() < 1e-5, name);
    }

    [Fact]
    public void Merged_tiny_model_keeps_its_tokenizer_and_generates_as_the_adapter_does()
    {
        tiny.InitRun.AssertSuccess();
        var adapter = tiny.Scratch("lora-merge-adapter");
        using (var peft = PeftModel.Create(AutoModel.FromPretrained(tiny.ModelDir), new LoraConfig { R = 4, LoraAlpha = 8 }))
        {
            using var no = torch.no_grad();
            foreach (var (name, p) in peft.AdapterTensors(PeftModel.DefaultAdapter))
                if (name.Contains("lora_B")) p.normal_(0, 0.5);
            peft.SavePretrained(adapter);
        }
        var output = tiny.Scratch("merged-" + Guid.NewGuid().ToString("N")[..8]);
        var run = CliRunner.Run("merge", "--model", tiny.ModelDir, "--adapter", adapter, "--out", output).AssertSuccess();
        Assert.Contains("tokenizer.json", run.Stdout);
        Assert.True(File.Exists(Path.Combine(output, "tokenizer.json")));
        string[] greedy = ["--prompt", "Once upon a time", "--max-new-tokens", "8", "--temperature", "0", "--json"];
        var viaAdapter = CliRunner.Run(["generate", "--model", tiny.ModelDir, "--adapter", adapter, .. greedy]).AssertSuccess().LastJson().GetProperty("token_ids").ToString();
        var viaMerged = CliRunner.Run(["generate", "--model", output, .. greedy]).AssertSuccess().LastJson().GetProperty("token_ids").ToString();
        Assert.Equal(viaAdapter, viaMerged);

        // A second merge into the same folder, and merging virtual-token adapters, are one-line errors.
        Assert.Contains("already holds a model", CliRunner.Run("merge", "--model", tiny.ModelDir, "--adapter", adapter, "--out", output).AssertUsageError());
        Assert.Contains("cannot be merged", CliRunner.Run("merge", "--model", tiny.ModelDir, "--adapter", PromptAdapter(), "--out", tiny.Scratch("x")).AssertUsageError());
    }
}

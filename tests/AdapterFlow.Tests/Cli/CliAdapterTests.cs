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
}

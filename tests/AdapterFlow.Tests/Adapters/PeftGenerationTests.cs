using System.Text.Json;
using AdapterFlow.Adapters;
using AdapterFlow.Adapters.PromptTuning;
using AdapterFlow.Generation;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Adapters;

/// <summary>
/// Generation with an adapter: greedy continuations of PEFT's reference adapters must be the tokens peft's
/// generate() chose (reference.json greedy.new_tokens), with virtual tokens placed where PEFT places them.
/// </summary>
public class PeftGenerationTests
{
    public static TheoryData<string, string> Cases()
    {
        var data = new TheoryData<string, string>();
        foreach (var arch in PeftReferenceTests.Arches)
            foreach (var method in new[] { "lora", "lora_dora", "ia3", "prompt_tuning", "prefix_tuning" })
                data.Add(arch, method);
        return data;
    }

    internal static (int[] Prompt, int[] NewTokens) Greedy(string folder)
    {
        using var json = JsonDocument.Parse(File.ReadAllText(Path.Combine(folder, "reference.json")));
        var greedy = json.RootElement.GetProperty("greedy");
        static int[] Ints(JsonElement e) => e.EnumerateArray().Select(x => x.GetInt32()).ToArray();
        return (Ints(greedy.GetProperty("prompt")), Ints(greedy.GetProperty("new_tokens")));
    }

    [SkippableTheory]
    [MemberData(nameof(Cases))]
    public void Greedy_generation_with_the_adapter_gives_peft_tokens(string arch, string method)
    {
        var folder = PeftReferenceTests.AdapterFolder(arch, method);
        var (prompt, expected) = Greedy(folder);
        using var peft = PeftModel.FromPretrained(PeftReferenceTests.LoadBase(arch), folder);
        var generator = new TextGenerator(peft);
        var result = generator.Generate(prompt, new GenerationOptions { MaxNewTokens = expected.Length, StopTokenIds = [] });
        Assert.Equal(expected, result.Tokens.ToArray());
    }

    [SkippableTheory]
    [InlineData("prompt_tuning")]
    [InlineData("prefix_tuning")]
    [InlineData("lora")]
    public void Left_padded_batch_gives_each_prompt_its_own_continuation(string method)
    {
        var folder = PeftReferenceTests.AdapterFolder("llama", method);
        var (prompt, _) = Greedy(folder);
        using var peft = PeftModel.FromPretrained(PeftReferenceTests.LoadBase("llama"), folder);
        var generator = new TextGenerator(peft);
        var options = new GenerationOptions { MaxNewTokens = 6, StopTokenIds = [] };
        int[] shorter = prompt[4..];
        var batch = generator.Generate([prompt, shorter], options);
        Assert.Equal(generator.Generate(prompt, options).Tokens.ToArray(), batch.Sequences[0].Tokens.ToArray());
        Assert.Equal(generator.Generate(shorter, options).Tokens.ToArray(), batch.Sequences[1].Tokens.ToArray());
    }

    [SkippableFact]
    public void Prompt_tuning_cache_holds_the_virtual_tokens_and_matches_a_full_forward()
    {
        var folder = PeftReferenceTests.AdapterFolder("llama", "prompt_tuning");
        var (prompt, _) = Greedy(folder);
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        using var peft = PeftModel.FromPretrained(PeftReferenceTests.LoadBase("llama"), folder);
        int n = ((PromptTuningConfig)peft.ActiveConfig).NumVirtualTokens;
        var ids = torch.tensor(prompt.Select(x => (long)x).ToArray()).unsqueeze(0);
        var full = peft.Logits(ids); // [1, n + T, vocab]: virtual + real positions
        using var cache = peft.CreateCache(1);
        Assert.Equal(n, cache.Length);
        var cached = peft.forward(new ForwardInput { InputIds = ids, Cache = cache, PositionIds = torch.arange(n, n + prompt.Length).unsqueeze(0) }).Logits;
        var diff = (full.narrow(1, n, prompt.Length) - cached).abs().max().item<float>();
        Assert.True(diff < 1e-4, $"max |Δlogit| = {diff}");
    }

    [SkippableFact]
    public void A_peft_model_is_a_causal_lm_of_its_base_but_is_not_saved_as_a_plain_model()
    {
        var folder = PeftReferenceTests.AdapterFolder("llama", "lora");
        using var peft = PeftModel.FromPretrained(PeftReferenceTests.LoadBase("llama"), folder);
        CausalLM lm = peft;
        Assert.Same(peft.Model.Config, lm.Config);
        Assert.Equal(peft.Model.NumLayers, lm.NumLayers);
        var message = Assert.Throws<ArgumentException>(() => AutoModel.Save(lm, Path.Combine(Path.GetTempPath(), "af-never-written"))).Message;
        Assert.Contains("SavePretrained", message);
        Assert.False(Directory.Exists(Path.Combine(Path.GetTempPath(), "af-never-written")));
    }
}

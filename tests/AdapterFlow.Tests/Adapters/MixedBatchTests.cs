using AdapterFlow.Adapters;
using AdapterFlow.Adapters.Bottleneck;
using AdapterFlow.Adapters.IA3;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Adapters;

/// <summary>Mixed-adapter batches (PEFT's adapter_names) for every routable layer type: each row as if run alone.</summary>
public class MixedBatchTests
{
    private static Tensor Ids() => torch.tensor(new long[,]
    {
        { 5, 17, 42, 9, 33, 101, 7, 64 }, { 11, 12, 13, 14, 15, 16, 17, 18 }, { 5, 17, 42, 9, 33, 101, 7, 64 },
    });

    public static TheoryData<string, string> Cases() => new()
    {
        { "llama", "ia3" }, { "gpt2", "ia3" }, { "bloom", "ia3" },
        { "llama", "series" }, { "gpt2", "series" }, { "llama", "parallel" }, { "opt", "parallel" },
        { "llama", "lora_embedding" }, { "gpt2", "lora_embedding" }, { "mistral", "dora_embedding" },
    };

    private static PeftConfig Config(string method, string arch, int variant) => method switch
    {
        "ia3" => new IA3Config { InitIA3Weights = false },
        "series" => new BottleneckConfig { BottleneckSize = 4 + variant, InitWeights = "bert", NonLinearity = "tanh" },
        "parallel" => new BottleneckConfig { BottleneckSize = 4 + variant, InitWeights = "bert", UseParallelAdapter = true, Scaling = variant == 0 ? 2.0 : null },
        "lora_embedding" => new LoraConfig
        {
            R = 2 + variant, InitLoraWeights = LoraInit.Random,
            TargetModules = ModuleSelector.Names(arch == "gpt2" ? ["wte", "c_attn"] : ["embed_tokens", "v_proj"]),
        },
        "dora_embedding" => new LoraConfig
        {
            R = 2 + variant, InitLoraWeights = LoraInit.Random, UseDora = true,
            TargetModules = ModuleSelector.Names(["embed_tokens"]),
        },
        _ => throw new ArgumentException(method),
    };

    [SkippableTheory]
    [MemberData(nameof(Cases))]
    public void Mixed_batch_rows_equal_single_adapter_runs(string arch, string method)
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var peft = PeftModel.Create(PeftReferenceTests.LoadBase(arch), Config(method, arch, 0));
        peft.AddAdapter("second", Config(method, arch, 1));
        var ids = Ids();
        var mixed = peft.Forward(new ForwardInput { InputIds = ids }, ["default", "second", "__base__"]).Logits;

        peft.SetAdapter("default");
        var a = peft.Logits(ids);
        peft.SetAdapter("second");
        var b = peft.Logits(ids);
        Tensor plain;
        using (peft.DisableAdapters()) plain = peft.Logits(ids);
        float Diff(Tensor x, Tensor y) => (x - y).abs().max().item<float>();
        Assert.True(Diff(mixed[0], a[0]) < 1e-5f, $"{arch}/{method}: row 0 (default) differs by {Diff(mixed[0], a[0])}");
        Assert.True(Diff(mixed[1], b[1]) < 1e-5f, $"{arch}/{method}: row 1 (second) differs by {Diff(mixed[1], b[1])}");
        Assert.True(Diff(mixed[2], plain[2]) < 1e-5f, $"{arch}/{method}: row 2 (base) differs by {Diff(mixed[2], plain[2])}");
        // Rows 0 and 2 hold the same tokens, so the adapters must visibly differ from each other and from the base.
        Assert.True(Diff(a[0], b[0]) > 1e-3f, $"{arch}/{method}: the two adapters should differ");
        Assert.True(Diff(a[0], plain[0]) > 1e-3f, $"{arch}/{method}: the adapter should change the logits");
        // Routing is cleared afterwards: a plain forward is the active adapter's again.
        Assert.True(Diff(peft.Logits(ids), b) < 1e-6f);
    }

    [SkippableTheory]
    [InlineData("qwen2", "lm_head")]        // an untied Linear head
    [InlineData("llama", "lm_head")]        // a tied head: each adapter's copy is an untied Linear
    [InlineData("llama", "embed_tokens")]   // a token embedding
    [InlineData("gpt2", "mlp.c_proj")]      // GPT-2's Conv1D
    public void Mixed_batch_routes_modules_to_save_rows_to_their_own_copy(string arch, string module)
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var lora = arch == "gpt2" ? "c_attn" : "v_proj";
        LoraConfig Config(bool save) => new()
        {
            R = 2, InitLoraWeights = LoraInit.Random, TargetModules = ModuleSelector.Names(lora),
            ModulesToSave = save ? [module] : null,
        };
        var peft = PeftModel.Create(PeftReferenceTests.LoadBase(arch), Config(true));
        peft.AddAdapter("second", Config(true));
        peft.AddAdapter("plain", Config(false)); // no copy of the module: its rows use the original
        var wrappers = peft.AdapterLayers.Values.OfType<ModulesToSaveWrapper>().ToArray();
        Assert.NotEmpty(wrappers);
        // Make each adapter's copy differ from the original and from the other copy.
        var generator = new torch.Generator(11);
        foreach (var wrapper in wrappers)
            foreach (var adapter in new[] { "default", "second" })
                foreach (var p in ((nn.Module)wrapper.Copy(adapter)).parameters())
                    p.add_(torch.randn(p.shape, generator: generator).to(p.dtype) * 0.05);

        var ids = torch.tensor(new long[,]
        {
            { 5, 17, 42, 9, 33, 101, 7, 64 }, { 11, 12, 13, 14, 15, 16, 17, 18 }, { 5, 17, 42, 9, 33, 101, 7, 64 },
            { 5, 17, 42, 9, 33, 101, 7, 64 }, { 11, 12, 13, 14, 15, 16, 17, 18 },
        });
        string[] rows = ["second", "default", "__base__", "plain", "second"];
        var mixed = peft.Forward(new ForwardInput { InputIds = ids }, rows).Logits;
        var single = new Dictionary<string, Tensor>();
        foreach (var name in new[] { "default", "second", "plain" })
        {
            peft.SetAdapter(name);
            single[name] = peft.Logits(ids);
        }
        using (peft.DisableAdapters()) single["__base__"] = peft.Logits(ids);
        float Diff(Tensor x, Tensor y) => (x - y).abs().max().item<float>();
        for (int i = 0; i < rows.Length; i++)
            Assert.True(Diff(mixed[i], single[rows[i]][i]) < 1e-5f, $"{arch}/{module}: row {i} ({rows[i]}) differs by {Diff(mixed[i], single[rows[i]][i])}");
        // The copies must matter, or the routing would not be tested.
        Assert.True(Diff(single["default"][0], single["second"][0]) > 1e-3f);
        Assert.True(Diff(single["default"][0], single["__base__"][0]) > 1e-3f);
    }

    [SkippableFact]
    public void Mixed_batch_refuses_virtual_token_adapters_with_a_clear_message()
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var peft = PeftModel.Create(PeftReferenceTests.LoadBase("llama"), new AdapterFlow.Adapters.PromptTuning.PromptTuningConfig { NumVirtualTokens = 2 });
        var error = Assert.Throws<NotSupportedException>(() => peft.Forward(new ForwardInput { InputIds = Ids() }, ["default", "default", "__base__"]));
        Assert.Contains("PROMPT_TUNING", error.Message);
    }

    [SkippableFact]
    public void Mixed_batch_refuses_layer_dropout_in_training()
    {
        using var scope = torch.NewDisposeScope();
        var peft = PeftModel.Create(PeftReferenceTests.LoadBase("llama"), Config("lora_embedding", "llama", 0));
        peft.Model.train();
        var rates = Enumerable.Repeat(0.5, peft.Model.NumLayers).ToArray();
        // Layer dropout runs layers on row subsets, which per-row routing (row indices) would not follow.
        var error = Assert.Throws<NotSupportedException>(() =>
            peft.Forward(new ForwardInput { InputIds = Ids(), LayerDropout = rates }, ["default", "default", "__base__"]));
        Assert.Contains("layer dropout", error.Message);
    }
}

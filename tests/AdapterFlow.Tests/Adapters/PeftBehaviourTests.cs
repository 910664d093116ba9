using System.Globalization;
using AdapterFlow.Adapters;
using AdapterFlow.Adapters.Bottleneck;
using AdapterFlow.Adapters.IA3;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.Adapters.PrefixTuning;
using AdapterFlow.Adapters.PromptTuning;
using AdapterFlow.Models;
using AdapterFlow.Tests.Models;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Adapters;

/// <summary>What adapters must do besides matching PEFT's numbers: start as no-ops, train only themselves, route rows.</summary>
public class PeftBehaviourTests
{
    private static Tensor Ids() => torch.tensor(new long[,] { { 5, 17, 42, 9, 33, 101, 7, 64 }, { 11, 12, 13, 14, 15, 16, 17, 18 } });

    public static TheoryData<string, string> InitCases()
    {
        var data = new TheoryData<string, string>();
        foreach (var arch in new[] { "llama", "qwen2", "gpt2", "bloom" })
            foreach (var method in new[] { "lora", "dora", "ia3", "lora_gaussian", "series", "parallel" }) data.Add(arch, method);
        return data;
    }

    private static PeftConfig NewConfig(string method) => method switch
    {
        "lora" => new LoraConfig { R = 4, LoraAlpha = 8 },
        "lora_gaussian" => new LoraConfig { R = 4, LoraAlpha = 8, InitLoraWeights = LoraInit.Gaussian, TargetModules = ModuleSelector.Pattern(ModuleSelector.AllLinear) },
        "dora" => new LoraConfig { R = 4, LoraAlpha = 8, UseDora = true, UseRslora = true },
        "ia3" => new IA3Config(),
        "prompt" => new PromptTuningConfig { NumVirtualTokens = 3 },
        "prefix" => new PrefixTuningConfig { NumVirtualTokens = 3 },
        "prefix_projection" => new PrefixTuningConfig { NumVirtualTokens = 3, PrefixProjection = true, EncoderHiddenSize = 16 },
        "series" => new BottleneckConfig { BottleneckSize = 8, InitWeights = "mam_adapter", NonLinearity = "relu" },
        "series_all" => new BottleneckConfig { BottleneckSize = 8, InitWeights = "bert", Scaling = null, TargetModules = ModuleSelector.Pattern(".*(mlp|attn|attention)\\.[^.]*") },
        "parallel" => new BottleneckConfig { BottleneckSize = 8, InitWeights = "mam_adapter", UseParallelAdapter = true, NonLinearity = "gelu", Scaling = 2.0 },
        "ptuning" => new AdapterFlow.Adapters.PTuning.PromptEncoderConfig { NumVirtualTokens = 4, EncoderHiddenSize = 32 },
        "lora_head" => new LoraConfig { R = 4, ModulesToSave = ["lm_head"] },
        _ => throw new ArgumentException(method),
    };

    [SkippableTheory]
    [MemberData(nameof(InitCases))]
    public void New_adapter_leaves_the_output_unchanged(string arch, string method)
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var model = PeftReferenceTests.LoadBase(arch);
        var before = model.Logits(Ids());
        var peft = PeftModel.Create(model, NewConfig(method));
        Assert.NotEmpty(peft.AdapterLayers);
        var after = peft.Logits(Ids());
        var diff = (after - before).abs().max().item<float>();
        Assert.True(diff < 1e-5, $"{arch}/{method}: a fresh adapter moved the logits by {diff}");
        // The wrappers carry PEFT's state-dict names.
        var names = peft.state_dict().Keys.ToArray();
        Assert.Contains(names, n => n.StartsWith("base_model.model.", StringComparison.Ordinal) && n.Contains(".base_layer.weight"));
    }

    public static TheoryData<string, string> StepCases()
    {
        var data = new TheoryData<string, string>();
        foreach (var method in new[] { "lora", "dora", "ia3", "prompt", "prefix", "prefix_projection", "series_all", "parallel", "ptuning" }) data.Add("llama", method);
        foreach (var method in new[] { "lora", "ia3", "prefix" }) data.Add("gpt2", method);
        data.Add("qwen2", "lora_head");
        return data;
    }

    [SkippableTheory]
    [MemberData(nameof(StepCases))]
    public void One_optimiser_step_changes_only_adapter_tensors(string arch, string method)
    {
        using var scope = torch.NewDisposeScope();
        var model = PeftReferenceTests.LoadBase(arch);
        var peft = PeftModel.Create(model, NewConfig(method));
        var baseBefore = model.state_dict()
            .Where(kv => !IsAdapterTensor(kv.Key))
            .ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
        var trainable = peft.TrainableParameters().ToArray();
        Assert.NotEmpty(trainable);
        var adapterBefore = trainable.Select(p => p.detach().clone()).ToArray();

        peft.train();
        var optimizer = torch.optim.Adam(trainable, lr: 1e-2);
        optimizer.zero_grad();
        var logits = peft.Logits(Ids());
        var targets = torch.randint(0, logits.shape[^1], [logits.shape[0] * logits.shape[1]], generator: new torch.Generator(7));
        var loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[^1]), targets);
        loss.backward();
        optimizer.step();

        foreach (var (name, tensor) in model.state_dict().Where(kv => !IsAdapterTensor(kv.Key)))
            Assert.True(tensor.eq(baseBefore[name]).all().item<bool>(), $"{arch}/{method}: base tensor {name} changed");
        Assert.Equal(baseBefore.Count, model.state_dict().Count(kv => !IsAdapterTensor(kv.Key)));
        bool anyChanged = trainable.Zip(adapterBefore).Any(x => !x.First.eq(x.Second).all().item<bool>());
        Assert.True(anyChanged, $"{arch}/{method}: no adapter tensor changed");
        foreach (var p in model.parameters())
            Assert.True(!p.requires_grad || trainable.Any(t => t.Handle == p.Handle), "a base parameter is trainable");
    }

    private static bool IsAdapterTensor(string name) =>
        name.Contains(".lora_") || name.Contains(".ia3_l.") || name.Contains(".adapter_") || name.Contains(".modules_to_save.");

    [SkippableFact]
    public void Trainable_parameter_line_counts_adapter_and_base_as_peft()
    {
        using var scope = torch.NewDisposeScope();
        var model = PeftReferenceTests.LoadBase("llama");
        long baseCount = model.ParameterCount();
        var peft = PeftModel.Create(model, new LoraConfig { R = 4, LoraAlpha = 8, TargetModules = ModuleSelector.Names("q_proj", "v_proj") });
        var c = model.Config;
        long perLayer = 4 * (c.HiddenSize + c.NumAttentionHeads * c.HeadDim) + 4 * (c.HiddenSize + c.NumKeyValueHeads * c.HeadDim);
        long trainable = perLayer * c.NumHiddenLayers;
        long all = baseCount + trainable;
        Assert.Equal((trainable, all), peft.CountParameters());
        var pct = (100.0 * trainable / all).ToString("F4", CultureInfo.InvariantCulture);
        Assert.Equal($"trainable params: {trainable.ToString("N0", CultureInfo.InvariantCulture)} || all params: {all.ToString("N0", CultureInfo.InvariantCulture)} || trainable%: {pct}",
            peft.TrainableParametersLine());
    }

    [SkippableFact]
    public void Mixed_adapter_batch_rows_equal_single_adapter_runs()
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var peft = PeftModel.Create(PeftReferenceTests.LoadBase("llama"), new LoraConfig { R = 4, LoraAlpha = 8, InitLoraWeights = LoraInit.Random });
        peft.AddAdapter("second", new LoraConfig { R = 2, LoraAlpha = 4, InitLoraWeights = LoraInit.Random, UseDora = true, TargetModules = ModuleSelector.Names("k_proj", "v_proj", "down_proj") });
        var ids = torch.cat([Ids(), Ids()[0].unsqueeze(0)], 0); // 3 rows
        var mixed = peft.Forward(new ForwardInput { InputIds = ids }, ["default", "second", "__base__"]).Logits;

        peft.SetAdapter("default");
        var a = peft.Logits(ids);
        peft.SetAdapter("second");
        var b = peft.Logits(ids);
        Tensor plain;
        using (peft.DisableAdapters()) plain = peft.Logits(ids);
        Assert.True((mixed[0] - a[0]).abs().max().item<float>() < 1e-5, "row 0 (default) differs");
        Assert.True((mixed[1] - b[1]).abs().max().item<float>() < 1e-5, "row 1 (second) differs");
        Assert.True((mixed[2] - plain[2]).abs().max().item<float>() < 1e-5, "row 2 (base) differs");
        Assert.True((a[0] - b[0]).abs().max().item<float>() > 1e-2, "the two adapters should differ");
    }

    [SkippableFact]
    public void Named_adapters_can_be_added_switched_saved_in_subfolders_and_deleted()
    {
        var output = Path.Combine(Path.GetTempPath(), $"af-named-{Guid.NewGuid():N}");
        try
        {
            using var scope = torch.NewDisposeScope();
            using var no = torch.no_grad();
            var peft = PeftModel.Create(PeftReferenceTests.LoadBase("llama"), new LoraConfig { R = 4, InitLoraWeights = LoraInit.Random });
            peft.AddAdapter("other", new LoraConfig { R = 8, InitLoraWeights = LoraInit.Random });
            Assert.Equal("default", peft.ActiveAdapter);
            var first = peft.Logits(Ids());
            peft.SetAdapter("other");
            var second = peft.Logits(Ids());
            Assert.True((first - second).abs().max().item<float>() > 1e-2);
            // Only the active adapter trains.
            var q = (LoraLinear)peft.AdapterLayers["model.layers.0.self_attn.q_proj"];
            Assert.True(q.A("other").weight!.requires_grad);
            Assert.False(q.A("default").weight!.requires_grad);

            peft.SavePretrained(output);
            Assert.True(File.Exists(Path.Combine(output, "adapter_model.safetensors")));
            Assert.True(File.Exists(Path.Combine(output, "other", "adapter_model.safetensors")));
            var reloaded = PeftModel.FromPretrained(PeftReferenceTests.LoadBase("llama"), output);
            reloaded.LoadAdapter(Path.Combine(output, "other"), "other");
            Assert.True(reloaded.Logits(Ids()).eq(first).all().item<bool>());
            reloaded.SetAdapter("other");
            Assert.True(reloaded.Logits(Ids()).eq(second).all().item<bool>());
            // The parent folder finds a non-default adapter in its sub-folder.
            var viaParent = PeftModel.FromPretrained(PeftReferenceTests.LoadBase("llama"), output);
            viaParent.LoadAdapter(output, "other");
            viaParent.SetAdapter("other");
            Assert.True(viaParent.Logits(Ids()).eq(second).all().item<bool>());

            peft.DeleteAdapter("other");
            Assert.Equal("default", peft.ActiveAdapter);
            Assert.DoesNotContain(peft.state_dict().Keys, k => k.Contains(".other."));
            Assert.True(peft.Logits(Ids()).eq(first).all().item<bool>());
        }
        finally
        {
            if (Directory.Exists(output)) Directory.Delete(output, true);
        }
    }

    [SkippableFact]
    public void Target_selection_follows_peft_rules()
    {
        using var scope = torch.NewDisposeScope();
        var model = PeftReferenceTests.LoadBase("llama");
        var peft = PeftModel.Create(model, new LoraConfig
        {
            R = 4,
            TargetModules = ModuleSelector.Names("q_proj", "up_proj"),
            LayersToTransform = [1],
            RankPattern = new Dictionary<string, double> { ["up_proj"] = 2 },
            AlphaPattern = new Dictionary<string, double> { ["q_proj"] = 16 },
        });
        Assert.Equal(["model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj"], peft.AdapterLayers.Keys.Order());
        var up = (LoraLinear)peft.AdapterLayers["model.layers.1.mlp.up_proj"];
        var q = (LoraLinear)peft.AdapterLayers["model.layers.1.self_attn.q_proj"];
        Assert.Equal(2, up.A("default").weight!.shape[0]);
        Assert.Equal(8.0 / 2, up.Scaling("default"));
        Assert.Equal(16.0 / 4, q.Scaling("default"));

        var all = PeftModel.Create(PeftReferenceTests.LoadBase("llama"), new LoraConfig
        {
            R = 4,
            TargetModules = ModuleSelector.Pattern("all-linear"),
            ExcludeModules = ModuleSelector.Names("down_proj"),
        });
        Assert.Equal(2 * 6, all.AdapterLayers.Count);
        Assert.DoesNotContain(all.AdapterLayers.Keys, k => k.Contains("down_proj") || k.Contains("lm_head"));
    }

    [SkippableFact]
    public void Loading_an_adapter_for_another_model_names_the_first_mismatch()
    {
        using var scope = torch.NewDisposeScope();
        // Resolve the shared folders first: a missing ../shared must skip the test, not satisfy ThrowsAny.
        var llama = PeftReferenceTests.LoadBase("llama");
        var gpt2Lora = PeftReferenceTests.AdapterFolder("gpt2", "lora");
        // Wrong family: GPT-2's c_attn does not exist in LLaMA.
        var e1 = Assert.ThrowsAny<Exception>(() => PeftModel.FromPretrained(llama, gpt2Lora));
        Assert.Contains("c_attn", e1.Message);
        Assert.DoesNotContain('\n', e1.Message);
        // Wrong shape: llama's down_proj takes 172 inputs, mistral's 160.
        var e2 = Assert.Throws<InvalidDataException>(() => PeftModel.FromPretrained(PeftReferenceTests.LoadBase("mistral"), PeftReferenceTests.AdapterFolder("llama", "ia3")));
        Assert.Contains("down_proj.ia3_l", e2.Message);
        Assert.Contains("[1, 172]", e2.Message);
        // Wrong prefix geometry: gpt2 has 4 key/value heads of 16, llama 2 of 16.
        var e3 = Assert.ThrowsAny<ArgumentException>(() => PeftModel.FromPretrained(PeftReferenceTests.LoadBase("llama"), PeftReferenceTests.AdapterFolder("gpt2", "prefix_tuning")));
        Assert.Contains("does not fit", e3.Message);
    }

    [SkippableFact]
    public void Bad_adapter_config_gives_a_one_line_error()
    {
        var dir = Path.Combine(Path.GetTempPath(), $"af-badcfg-{Guid.NewGuid():N}");
        Directory.CreateDirectory(dir);
        try
        {
            File.WriteAllText(Path.Combine(dir, "adapter_config.json"), "{\"peft_type\": \"LORA\", \"r\": \"four\"}");
            var e = Assert.Throws<InvalidDataException>(() => PeftConfig.Load(dir));
            Assert.Contains("'r'", e.Message);
            File.WriteAllText(Path.Combine(dir, "adapter_config.json"), "{\"peft_type\": \"VERA\"}");
            Assert.Contains("VERA", Assert.Throws<InvalidDataException>(() => PeftConfig.Load(dir)).Message);
            File.WriteAllText(Path.Combine(dir, "adapter_config.json"), "{\"peft_type\": \"LORA\", \"r\": 4, \"future_key\": {\"x\": 1}}");
            var config = PeftConfig.Load(dir);
            Assert.Equal(1, config.ToJson()["future_key"]!["x"]!.GetValue<int>());
        }
        finally
        {
            Directory.Delete(dir, true);
        }
    }

    [SkippableFact]
    public void Gpt2_conv1d_lora_and_ia3_merge_equals_unmerged()
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        foreach (var config in new PeftConfig[]
                 {
                     new LoraConfig { R = 4, InitLoraWeights = LoraInit.Random, UseDora = true, TargetModules = ModuleSelector.Pattern("all-linear") },
                     new IA3Config { InitIA3Weights = false },
                 })
        {
            var peft = PeftModel.Create(PeftReferenceTests.LoadBase("gpt2"), config);
            var unmerged = peft.Logits(Ids());
            peft.Merge();
            var merged = peft.Logits(Ids());
            Assert.True((merged - unmerged).abs().max().item<float>() < 1e-4, $"{config.PeftType}: merged != unmerged");
            var plain = peft.MergeAndUnload().Logits(Ids());
            Assert.True((plain - unmerged).abs().max().item<float>() < 1e-4, $"{config.PeftType}: merge_and_unload != unmerged");
        }
    }

    [SkippableFact]
    public void Prefix_cache_for_generation_matches_full_forward()
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var folder = PeftReferenceTests.AdapterFolder("llama", "prefix_tuning");
        var peft = PeftModel.FromPretrained(PeftReferenceTests.LoadBase("llama"), folder);
        var ids = Ids()[0].unsqueeze(0);
        var full = peft.Logits(ids);
        using var cache = peft.CreateCache(1);
        var first = peft.Forward(new ForwardInput { InputIds = ids.narrow(1, 0, 5), Cache = cache }, null).Logits;
        var rest = peft.Forward(new ForwardInput { InputIds = ids.narrow(1, 5, 3), Cache = cache }, null).Logits;
        var stepwise = torch.cat([first, rest], 1);
        Assert.True((stepwise - full).abs().max().item<float>() < 1e-4);
    }

    [SkippableFact]
    public void Bottleneck_adapters_compute_llm_adapters_formulas_and_round_trip_with_its_names()
    {
        var output = Path.Combine(Path.GetTempPath(), $"af-bottleneck-{Guid.NewGuid():N}");
        try
        {
            using var scope = torch.NewDisposeScope();
            using var no = torch.no_grad();
            var config = new BottleneckConfig { BottleneckSize = 8, NonLinearity = "tanh", Scaling = 0.5, TargetModules = ModuleSelector.Names("up_proj", "down_proj", "o_proj") };
            var peft = PeftModel.Create(PeftReferenceTests.LoadBase("llama"), config);
            var up = (BottleneckLinear)peft.AdapterLayers["model.layers.0.mlp.up_proj"];
            var down = (BottleneckLinear)peft.AdapterLayers["model.layers.0.mlp.down_proj"];
            var o = (BottleneckLinear)peft.AdapterLayers["model.layers.0.self_attn.o_proj"];
            Assert.Equal(BottleneckPlacement.Input, up.Placement);   // LLM-Adapters' mh_adapter
            Assert.Equal(BottleneckPlacement.Output, down.Placement); // output_adapter
            Assert.Equal(BottleneckPlacement.Output, o.Placement);    // after attention
            Assert.Equal(up.InFeatures, up.Down("default").weight!.shape[1]);

            var x = torch.randn(2, 3, up.InFeatures);
            var series = up.BaseLayer.forward(x + 0.5 * up.Up("default").forward(torch.tanh(up.Down("default").forward(x))));
            Assert.True((up.forward(x) - series).abs().max().item<float>() < 1e-5, "series (input) formula");
            var h = torch.randn(2, 3, down.InFeatures);
            var y = down.BaseLayer.forward(h);
            var after = y + 0.5 * down.Up("default").forward(torch.tanh(down.Down("default").forward(y)));
            Assert.True((down.forward(h) - after).abs().max().item<float>() < 1e-5, "series (output) formula");

            var parallel = PeftModel.Create(PeftReferenceTests.LoadBase("llama"), new BottleneckConfig { BottleneckSize = 4, UseParallelAdapter = true, Scaling = 3, NonLinearity = "relu" });
            var p = (BottleneckLinear)parallel.AdapterLayers["model.layers.1.mlp.down_proj"];
            var z = torch.randn(2, 3, p.InFeatures);
            var expected = p.BaseLayer.forward(z) + 3 * p.Up("default").forward(nn.functional.relu(p.Down("default").forward(z)));
            Assert.True((p.forward(z) - expected).abs().max().item<float>() < 1e-5, "parallel formula");

            var before = peft.Logits(Ids());
            peft.SavePretrained(output);
            using (var file = AdapterFlow.IO.SafetensorsFile.Open(Path.Combine(output, "adapter_model.safetensors")))
            {
                Assert.Contains("base_model.model.model.layers.0.mlp.up_proj.adapter_down.weight", file.Names);
                Assert.Contains("base_model.model.model.layers.1.self_attn.o_proj.adapter_up.weight", file.Names);
                Assert.Equal(2 * 3 * 2, file.Names.Count);
            }
            Assert.Equal("BOTTLENECK", PeftConfig.Load(output).PeftType);
            var reloaded = PeftModel.FromPretrained(PeftReferenceTests.LoadBase("llama"), output);
            Assert.True(reloaded.Logits(Ids()).eq(before).all().item<bool>(), "reloaded bottleneck adapter differs");
            Assert.Throws<NotSupportedException>(() => peft.Merge());
        }
        finally
        {
            if (Directory.Exists(output)) Directory.Delete(output, true);
        }
    }

    [SkippableFact]
    public void Weighted_lora_combinations_give_the_weighted_update()
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var peft = PeftModel.Create(PeftReferenceTests.LoadBase("llama"), new LoraConfig { R = 4, LoraAlpha = 8, InitLoraWeights = LoraInit.Random });
        peft.AddAdapter("b", new LoraConfig { R = 2, LoraAlpha = 2, UseRslora = true, InitLoraWeights = LoraInit.Random });
        peft.AddAdapter("c", new LoraConfig { R = 4, LoraAlpha = 16, InitLoraWeights = LoraInit.Random });
        peft.AddWeightedAdapter(["default", "b"], [0.7, -1.5], "cat", LoraCombinationType.Cat);
        peft.AddWeightedAdapter(["default", "b"], [0.7, -1.5], "svd", LoraCombinationType.Svd, svdRank: 6);
        peft.AddWeightedAdapter(["default"], [0.25], "linear", LoraCombinationType.Linear);
        Assert.Throws<ArgumentException>(() => peft.AddWeightedAdapter(["default", "b"], [1, 1], "bad", LoraCombinationType.Linear));
        foreach (var layer in peft.AdapterLayers.Values.Cast<LoraLinear>())
        {
            var expected = layer.DeltaWeight("default") * 0.7 - layer.DeltaWeight("b") * 1.5;
            Assert.True((layer.DeltaWeight("cat") - expected).abs().max().item<float>() < 1e-5, "cat");
            Assert.True((layer.DeltaWeight("svd") - expected).abs().max().item<float>() < 1e-4, "svd at full rank");
            Assert.True((layer.DeltaWeight("linear") - layer.DeltaWeight("default") * 0.25).abs().max().item<float>() < 1e-5, "linear of one adapter");
            Assert.Equal(6, layer.A("cat").weight!.shape[0]);
        }
        // The combined adapter is an ordinary adapter: it runs and saves.
        peft.SetAdapter("cat");
        Assert.False(peft.Logits(Ids()).isnan().any().item<bool>());
    }

    [SkippableFact]
    public void Modules_to_save_train_a_copy_that_is_saved_under_the_module_name_and_survives_unload()
    {
        var output = Path.Combine(Path.GetTempPath(), $"af-mts-{Guid.NewGuid():N}");
        try
        {
            using var scope = torch.NewDisposeScope();
            var peft = PeftModel.Create(PeftReferenceTests.LoadBase("qwen2"), new LoraConfig { R = 4, InitLoraWeights = LoraInit.Random, ModulesToSave = ["lm_head"] });
            var wrapper = Assert.IsType<ModulesToSaveWrapper>(peft.AdapterLayers["lm_head"]);
            Assert.Contains("base_model.model.lm_head.modules_to_save.default.weight", peft.state_dict().Keys);
            Assert.Contains("base_model.model.lm_head.original_module.weight", peft.state_dict().Keys);
            using (torch.no_grad()) LinearParts(wrapper).add_(0.05);
            Tensor before;
            using (torch.no_grad()) before = peft.Logits(Ids());
            peft.SavePretrained(output);
            using (var file = AdapterFlow.IO.SafetensorsFile.Open(Path.Combine(output, "adapter_model.safetensors")))
                Assert.Contains("base_model.model.lm_head.weight", file.Names);
            var reloaded = PeftModel.FromPretrained(PeftReferenceTests.LoadBase("qwen2"), output);
            using (torch.no_grad())
            {
                Assert.True(reloaded.Logits(Ids()).eq(before).all().item<bool>(), "reloaded modules_to_save differ");
                var plain = peft.MergeAndUnload();
                Assert.True((plain.Logits(Ids()) - before).abs().max().item<float>() < 1e-4, "unloaded model lost the trained head");
            }
        }
        finally
        {
            if (Directory.Exists(output)) Directory.Delete(output, true);
        }
    }

    private static Tensor LinearParts(ModulesToSaveWrapper wrapper) => ((Linear)wrapper.Copy("default")).weight!;

    [SkippableTheory]
    [InlineData("ptuning")]
    [InlineData("prefix_projection")]
    public void Reparameterised_prompts_save_their_computed_table_and_reload_for_inference(string method)
    {
        var output = Path.Combine(Path.GetTempPath(), $"af-reparam-{Guid.NewGuid():N}");
        try
        {
            using var scope = torch.NewDisposeScope();
            using var no = torch.no_grad();
            var peft = PeftModel.Create(PeftReferenceTests.LoadBase("llama"), NewConfig(method));
            var ids = Ids();
            var before = peft.Logits(ids);
            using (peft.DisableAdapters())
                Assert.True(before.shape[1] != ids.shape[1] || (peft.Logits(ids) - before).abs().max().item<float>() > 1e-3, "the virtual tokens did nothing");
            peft.SavePretrained(output);
            var reloaded = PeftModel.FromPretrained(PeftReferenceTests.LoadBase("llama"), output);
            Assert.True((reloaded.Logits(ids) - before).abs().max().item<float>() < 1e-5, "reloaded table differs from the trained encoder");
            Assert.Equal(0, reloaded.CountParameters().Trainable);
            // Loaded to train further: the saved table itself trains.
            var trainable = PeftModel.FromPretrained(PeftReferenceTests.LoadBase("llama"), output, isTrainable: true);
            Assert.True((trainable.Logits(ids) - before).abs().max().item<float>() < 1e-5);
            Assert.Equal(trainable.prompt_encoder["default"].parameters().Sum(p => p.numel()), trainable.CountParameters().Trainable);
        }
        finally
        {
            if (Directory.Exists(output)) Directory.Delete(output, true);
        }
    }

    [SkippableFact]
    public void Disabling_or_switching_a_merged_model_unmerges_it_first()
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var model = PeftReferenceTests.LoadBase("llama");
        var plain = model.Logits(Ids());
        var peft = PeftModel.Create(model, new LoraConfig { R = 4, InitLoraWeights = LoraInit.Random });
        peft.AddAdapter("ia", new LoraConfig { R = 2, InitLoraWeights = LoraInit.Random });
        var adapted = peft.Logits(Ids());
        peft.Merge();
        using (peft.DisableAdapters())
            Assert.True((peft.Logits(Ids()) - plain).abs().max().item<float>() < 1e-5, "disabled merged model still carries the adapter");
        peft.Merge();
        peft.SetAdapter("ia");
        peft.SetAdapter("default");
        Assert.True((peft.Logits(Ids()) - adapted).abs().max().item<float>() < 1e-5, "switching adapters on a merged model went wrong");
    }

    [SkippableFact]
    public void Lora_bias_modes_and_dropout_behave_as_peft()
    {
        using var scope = torch.NewDisposeScope();
        var all = PeftModel.Create(PeftReferenceTests.LoadBase("qwen2"), new LoraConfig { R = 4, Bias = "all" });
        var trainableNames = all.named_parameters().Where(p => p.parameter.requires_grad).Select(p => p.name).ToArray();
        Assert.Contains("base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias", trainableNames);
        Assert.Contains("base_model.model.model.layers.0.self_attn.k_proj.bias", trainableNames); // not wrapped, still trained
        Assert.Contains("base_model.model.model.layers.0.self_attn.k_proj.bias", all.AdapterTensors("default").Keys);

        var only = PeftModel.Create(PeftReferenceTests.LoadBase("qwen2"), new LoraConfig { R = 4, Bias = "lora_only" });
        var onlyNames = only.named_parameters().Where(p => p.parameter.requires_grad).Select(p => p.name).ToArray();
        Assert.Contains("base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias", onlyNames);
        Assert.DoesNotContain("base_model.model.model.layers.0.self_attn.k_proj.bias", onlyNames);

        var none = PeftModel.Create(PeftReferenceTests.LoadBase("qwen2"), new LoraConfig { R = 4 });
        Assert.DoesNotContain(none.named_parameters(), p => p.parameter.requires_grad && p.name.EndsWith("bias"));

        var dropout = PeftModel.Create(PeftReferenceTests.LoadBase("llama"), new LoraConfig { R = 4, LoraDropout = 0.5, InitLoraWeights = LoraInit.Random });
        using var no = torch.no_grad();
        dropout.train();
        var a = dropout.Logits(Ids());
        var b = dropout.Logits(Ids());
        Assert.True((a - b).abs().max().item<float>() > 1e-4, "dropout is not applied in training");
        dropout.eval();
        Assert.True(dropout.Logits(Ids()).eq(dropout.Logits(Ids())).all().item<bool>(), "eval mode must be deterministic");
    }
}

using System.Text.Json.Nodes;
using AdapterFlow.Adapters;
using AdapterFlow.Adapters.IA3;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.IO;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Adapters;

/// <summary>Details where AdapterFlow must do exactly what PEFT does: parameter counts, default targets, init modes, layer selection.</summary>
public class PeftParityTests
{
    private static Tensor Ids() => torch.tensor(new long[,] { { 5, 17, 42, 9, 33, 101, 7, 64 }, { 11, 12, 13, 14, 15, 16, 17, 18 } });

    private static long FileNumel(string path)
    {
        using var file = SafetensorsFile.Open(path);
        return file.Names.Sum(n => file.Entry(n).Shape.Aggregate(1L, (a, b) => a * b));
    }

    /// <summary>
    /// PEFT's get_nb_trainable_parameters after get_peft_model with each reference config: the trainable tensors are
    /// exactly those PEFT saved (adapter_model.safetensors), and all = the base model's unique tensors (model.safetensors,
    /// tied matrices stored once) + those.
    /// </summary>
    [SkippableTheory]
    [MemberData(nameof(PeftReferenceTests.Cases), MemberType = typeof(PeftReferenceTests))]
    public void Trainable_parameter_counts_equal_peft_for_the_reference_configs(string arch, string method)
    {
        var folder = PeftReferenceTests.AdapterFolder(arch, method);
        using var scope = torch.NewDisposeScope();
        var config = PeftConfig.Load(folder);
        config.InferenceMode = false; // as get_peft_model: a new adapter to train
        var peft = PeftModel.Create(PeftReferenceTests.LoadBase(arch), config);
        long trainable = FileNumel(Path.Combine(folder, PeftModel.WeightsFile));
        long all = FileNumel(Path.Combine(SharedFiles.Require("reference", arch), "model.safetensors")) + trainable;
        Assert.Equal((trainable, all), peft.CountParameters());
        var ci = System.Globalization.CultureInfo.InvariantCulture;
        Assert.Equal($"trainable params: {trainable.ToString("N0", ci)} || all params: {all.ToString("N0", ci)} || trainable%: {(100.0 * trainable / all).ToString("F4", ci)}",
            peft.TrainableParametersLine());
    }

    [SkippableFact]
    public void Reparameterised_prompt_encoders_count_as_peft()
    {
        using var scope = torch.NewDisposeScope();
        var model = PeftReferenceTests.LoadBase("llama");
        long baseCount = model.ParameterCount();
        var c = model.Config;
        long d = c.HiddenSize, kv = c.NumKeyValueHeads * c.HeadDim, layers = c.NumHiddenLayers, h = 16, n = 3;
        // PEFT's PrefixEncoder with prefix_projection: Embedding(n, token_dim) → Linear(token_dim, h) → Tanh → Linear(h, layers·2·token_dim).
        var prefix = PeftModel.Create(model, new AdapterFlow.Adapters.PrefixTuning.PrefixTuningConfig { NumVirtualTokens = (int)n, PrefixProjection = true, EncoderHiddenSize = (int)h });
        long prefixCount = n * kv + (kv * h + h) + (h * layers * 2 * kv + layers * 2 * kv);
        Assert.Equal((prefixCount, baseCount + prefixCount), prefix.CountParameters());
        // PEFT's PromptEncoder, MLP: Embedding(n, d) → Linear(d, h) → ReLU → Linear(h, h) → ReLU → Linear(h, d).
        var ptuning = PeftModel.Create(PeftReferenceTests.LoadBase("llama"), new AdapterFlow.Adapters.PTuning.PromptEncoderConfig { NumVirtualTokens = (int)n, EncoderHiddenSize = (int)h });
        long ptuningCount = n * d + (d * h + h) + (h * h + h) + (h * d + d);
        Assert.Equal((ptuningCount, baseCount + ptuningCount), ptuning.CountParameters());
    }

    /// <summary>PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for the eight families (peft 0.20).</summary>
    public static TheoryData<string, string[]> LoraDefaults() => new()
    {
        { "llama", ["q_proj", "v_proj"] }, { "mistral", ["q_proj", "v_proj"] }, { "qwen2", ["q_proj", "v_proj"] },
        { "opt", ["q_proj", "v_proj"] }, { "gptj", ["q_proj", "v_proj"] }, { "gpt2", ["c_attn"] },
        { "bloom", ["query_key_value"] }, { "gpt_neox", ["query_key_value"] },
    };

    [SkippableTheory]
    [MemberData(nameof(LoraDefaults))]
    public void Default_targets_are_peft_tables_for_every_family(string arch, string[] loraTargets)
    {
        using var scope = torch.NewDisposeScope();
        Assert.Contains(ModelRegistry.All, f => f.ModelType == arch);
        var lora = PeftModel.Create(PeftReferenceTests.LoadBase(arch), new LoraConfig());
        Assert.Equal(loraTargets.Order(), lora.AdapterLayers.Keys.Select(k => k.Split('.')[^1]).Distinct().Order());
        // IA3's defaults: the reference ia3 adapter was made by PEFT with target_modules left to its table.
        var reference = (IA3Config)PeftConfig.Load(PeftReferenceTests.AdapterFolder(arch, "ia3"));
        var ia3 = new IA3Config();
        var peft = PeftModel.Create(PeftReferenceTests.LoadBase(arch), ia3);
        Assert.Equal(reference.TargetModules!.List!.Order(), ia3.TargetModules!.List!.Order());
        Assert.Equal(reference.FeedforwardModules!.List!.Order(), ia3.FeedforwardModules!.List!.Order());
        Assert.NotEmpty(peft.AdapterLayers);
    }

    [SkippableTheory]
    [InlineData("llama", LoraInit.Pissa)]
    [InlineData("llama", LoraInit.Olora)]
    [InlineData("gpt2", LoraInit.Pissa)]   // Conv1D: the [in, out] weight is decomposed as [out, in], as PEFT's fan_in_fan_out
    [InlineData("gpt2", LoraInit.Olora)]
    public void Pissa_and_olora_move_a_slice_of_w_into_the_adapter_and_reload_on_the_original_model(string arch, LoraInit init)
    {
        var output = Path.Combine(Path.GetTempPath(), $"af-pissa-{Guid.NewGuid():N}");
        try
        {
            using var scope = torch.NewDisposeScope();
            using var no = torch.no_grad();
            var model = PeftReferenceTests.LoadBase(arch);
            var before = model.Logits(Ids());
            var original = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
            var peft = PeftModel.Create(model, new LoraConfig { R = 4, LoraAlpha = 8, InitLoraWeights = init });
            var diff = (peft.Logits(Ids()) - before).abs().max().item<float>();
            Assert.True(diff < 1e-4, $"{init}: the output moved by {diff} at initialisation");
            foreach (var (path, layer) in peft.AdapterLayers)
            {
                var lora = (LoraLinear)layer;
                var a = lora.A("default").weight!;
                var b = lora.B("default").weight!;
                var w = original[path + ".weight"];
                var wOutIn = arch == "gpt2" ? w.t() : w;
                var residual = arch == "gpt2" ? ((Conv1D)lora.BaseLayer).weight.t() : ((TorchSharp.Modules.Linear)lora.BaseLayer).weight!;
                // W_res + s·B·A = W, and the adapter holds a real part of W (not a zero update).
                Assert.True((residual + 2.0 * b.matmul(a) - wOutIn).abs().max().item<float>() < 1e-5, $"{path}: W_res + s·B·A ≠ W");
                Assert.True((residual - wOutIn).abs().max().item<float>() > 1e-3, $"{path}: the base weight did not give up anything");
                if (init == LoraInit.Olora)
                {
                    // B = Q[:, :r]: orthonormal columns.
                    Assert.True((b.t().matmul(b) - torch.eye(4)).abs().max().item<float>() < 1e-5);
                }
                else
                {
                    // s·B·A is the best rank-r approximation of W: its top r singular values.
                    var top = torch.linalg.svdvals(wOutIn).narrow(0, 0, 4);
                    Assert.True((torch.linalg.svdvals(2.0 * b.matmul(a)).narrow(0, 0, 4) - top).abs().max().item<float>() < 1e-4);
                }
            }
            // "Train", save, and load on a fresh copy of the original model: PEFT recomputes the same residual.
            foreach (var layer in peft.AdapterLayers.Values.Cast<LoraLinear>()) layer.B("default").weight!.mul_(1.1);
            var trained = peft.Logits(Ids());
            peft.SavePretrained(output);
            Assert.Equal(init == LoraInit.Pissa ? "pissa" : "olora", PeftConfig.Load(output).ToJson()["init_lora_weights"]!.GetValue<string>());
            var reloaded = PeftModel.FromPretrained(PeftReferenceTests.LoadBase(arch), output);
            Assert.True((reloaded.Logits(Ids()) - trained).abs().max().item<float>() < 1e-4, "reloaded adapter differs");
        }
        finally
        {
            if (Directory.Exists(output)) Directory.Delete(output, true);
        }
    }

    [SkippableFact]
    public void Orthogonal_init_starts_as_identity_with_both_factors_nonzero()
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var model = PeftReferenceTests.LoadBase("llama");
        var before = model.Logits(Ids());
        var peft = PeftModel.Create(model, new LoraConfig { R = 4, InitLoraWeights = LoraInit.Orthogonal });
        Assert.True((peft.Logits(Ids()) - before).abs().max().item<float>() < 1e-5, "orthogonal init changed the output");
        foreach (var layer in peft.AdapterLayers.Values.Cast<LoraLinear>())
        {
            Assert.True(layer.A("default").weight!.abs().max().item<float>() > 1e-3);
            Assert.True(layer.B("default").weight!.abs().max().item<float>() > 1e-3);
            Assert.True(layer.B("default").weight!.matmul(layer.A("default").weight!).abs().max().item<float>() < 1e-5, "B·A ≠ 0");
        }
        Assert.Throws<ArgumentException>(() => PeftModel.Create(PeftReferenceTests.LoadBase("llama"), new LoraConfig { R = 3, InitLoraWeights = LoraInit.Orthogonal }));
    }

    [SkippableTheory]
    [InlineData("eva")]
    [InlineData("lora_ga")]
    public void Data_driven_inits_load_from_files_but_cannot_start_a_new_adapter(string init)
    {
        var output = Path.Combine(Path.GetTempPath(), $"af-datainit-{Guid.NewGuid():N}");
        try
        {
            using var scope = torch.NewDisposeScope();
            using var no = torch.no_grad();
            var peft = PeftModel.Create(PeftReferenceTests.LoadBase("llama"), new LoraConfig { R = 4, InitLoraWeights = LoraInit.Random });
            var logits = peft.Logits(Ids());
            peft.SavePretrained(output);
            // The same adapter as if made by PEFT with this init: the file holds the resulting A and B.
            var path = Path.Combine(output, PeftModel.ConfigFile);
            var json = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
            json["init_lora_weights"] = init;
            File.WriteAllText(path, json.ToJsonString());
            var reloaded = PeftModel.FromPretrained(PeftReferenceTests.LoadBase("llama"), output);
            Assert.True(reloaded.Logits(Ids()).eq(logits).all().item<bool>());
            var config = PeftConfig.Load(output);
            config.InferenceMode = false;
            var error = Assert.Throws<NotSupportedException>(() => PeftModel.Create(PeftReferenceTests.LoadBase("llama"), config));
            Assert.Contains(init, error.Message);
        }
        finally
        {
            if (Directory.Exists(output)) Directory.Delete(output, true);
        }
    }

    [Theory]
    [InlineData("loftq")]
    [InlineData("pissa_niter_4")]
    [InlineData("corda")]
    [InlineData("mica")]
    public void Unsupported_init_modes_are_refused_naming_the_supported_ones(string init)
    {
        var json = JsonNode.Parse($"{{\"peft_type\": \"LORA\", \"r\": 4, \"init_lora_weights\": \"{init}\"}}")!.AsObject();
        var error = Assert.Throws<InvalidDataException>(() => PeftConfig.Parse(json, "adapter_config.json"));
        Assert.Contains(init, error.Message);
        Assert.Contains("\"pissa\"", error.Message);
        Assert.DoesNotContain('\n', error.Message);
    }

    [SkippableFact]
    public void Layers_to_transform_and_layers_pattern_follow_peft()
    {
        using var scope = torch.NewDisposeScope();
        // layers_pattern names the module list: "layers" for LLaMA, "h" for GPT-2.
        var llama = PeftModel.Create(PeftReferenceTests.LoadBase("llama"), new LoraConfig
        {
            R = 2, TargetModules = ModuleSelector.Names("q_proj", "down_proj"), LayersToTransform = [1], LayersPattern = "layers",
        });
        Assert.Equal(["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"], llama.AdapterLayers.Keys.Order(StringComparer.Ordinal));
        var gpt2 = PeftModel.Create(PeftReferenceTests.LoadBase("gpt2"), new LoraConfig
        {
            R = 2, TargetModules = ModuleSelector.Names("c_attn"), LayersToTransform = [0], LayersPattern = "h",
        });
        Assert.Equal(["transformer.h.0.attn.c_attn"], gpt2.AdapterLayers.Keys);
        var anyList = PeftModel.Create(PeftReferenceTests.LoadBase("llama"), new LoraConfig
        {
            R = 2, TargetModules = ModuleSelector.Names("q_proj"), LayersToTransform = [0], LayersPattern = "",
        });
        Assert.Equal(["model.layers.0.self_attn.q_proj"], anyList.AdapterLayers.Keys);
        // A pattern that names no module list selects nothing: a clear error.
        Assert.Throws<ArgumentException>(() => PeftModel.Create(PeftReferenceTests.LoadBase("llama"), new LoraConfig
        {
            R = 2, TargetModules = ModuleSelector.Names("q_proj"), LayersToTransform = [0], LayersPattern = "blocks",
        }));
        // PEFT's LoraConfig refuses these; so do we (a file PEFT cannot read must not be written).
        var regex = Assert.Throws<ArgumentException>(() => PeftModel.Create(PeftReferenceTests.LoadBase("llama"), new LoraConfig
        {
            R = 2, TargetModules = ModuleSelector.Pattern(@".*\.q_proj"), LayersToTransform = [0],
        }));
        Assert.Contains("layers_to_transform", regex.Message);
        var patternOnly = Assert.Throws<ArgumentException>(() => PeftModel.Create(PeftReferenceTests.LoadBase("llama"), new LoraConfig
        {
            R = 2, TargetModules = ModuleSelector.Names("q_proj"), LayersPattern = "layers",
        }));
        Assert.Contains("layers_pattern", patternOnly.Message);
        // A module in modules_to_save is never also wrapped by the tuner (PEFT's rule).
        var saved = PeftModel.Create(PeftReferenceTests.LoadBase("qwen2"), new LoraConfig
        {
            R = 2, TargetModules = ModuleSelector.Names("q_proj", "lm_head"), ModulesToSave = ["lm_head"],
        });
        Assert.IsType<ModulesToSaveWrapper>(saved.AdapterLayers["lm_head"]);
    }

    [SkippableFact]
    public void Ia3_weighted_adapter_is_the_weighted_sum_of_vectors()
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var peft = PeftModel.Create(PeftReferenceTests.LoadBase("llama"), new IA3Config { InitIA3Weights = false });
        peft.AddAdapter("b", new IA3Config { InitIA3Weights = false, TargetModules = ModuleSelector.Names("v_proj", "down_proj"), FeedforwardModules = ModuleSelector.Names("down_proj") });
        peft.AddWeightedAdapter(["default", "b"], [0.25, 0.75], "mix");
        foreach (var layer in peft.AdapterLayers.Values.Cast<IA3Linear>())
        {
            var expected = layer.Vector("default") * 0.25 + (layer.ia3_l.Contains("b") ? layer.Vector("b") * 0.75 : torch.zeros_like(layer.Vector("default")));
            Assert.True((layer.Vector("mix") - expected).abs().max().item<float>() < 1e-6);
        }
        var mix = (IA3Config)peft.Configs["mix"];
        Assert.All(mix.FeedforwardModules!.List!, f => Assert.EndsWith("down_proj", f));
        peft.SetAdapter("mix");
        Assert.False(peft.Logits(Ids()).isnan().any().item<bool>());
        // PEFT's rule: feed-forward modules must be targets.
        Assert.Throws<ArgumentException>(() => PeftModel.Create(PeftReferenceTests.LoadBase("llama"),
            new IA3Config { TargetModules = ModuleSelector.Names("k_proj"), FeedforwardModules = ModuleSelector.Names("down_proj") }));
    }
}

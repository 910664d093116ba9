using System.Text.Json.Nodes;
using AdapterFlow.Models;

namespace AdapterFlow.Tests.Models;

/// <summary>Config parsing of the LLaMA family: defaults, both transformers layouts, validation, round trips.</summary>
public class LlamaConfigTests
{
    private static ModelConfig Parse(string json) => AutoModel.ParseConfig((JsonObject)JsonNode.Parse(json)!, "x/config.json");

    [Fact]
    public void Absent_keys_take_transformers_defaults()
    {
        var llama = (LlamaConfig)Parse("""{"model_type": "llama"}""");
        Assert.Equal(32000, llama.VocabSize);
        Assert.Equal(4096, llama.HiddenSize);
        Assert.Equal(11008, llama.IntermediateSize);
        Assert.Equal(32, llama.NumKeyValueHeads); // = num_attention_heads
        Assert.Equal(128, llama.HeadDim);
        Assert.Equal(2048, llama.MaxPositionEmbeddings);
        Assert.Equal(1e-6, llama.RmsNormEps);
        Assert.Equal(10000.0, llama.RopeTheta);
        Assert.Null(llama.RopeScaling);
        Assert.Equal("silu", llama.HiddenAct);
        Assert.False(llama.TieWordEmbeddings);
        Assert.Equal(1, llama.BosTokenId);
        Assert.Equal(new[] { 2 }, llama.EosTokenIds);
        Assert.Equal(0.02, llama.InitializerRange);

        var mistral = (MistralConfig)Parse("""{"model_type": "mistral"}""");
        Assert.Equal(14336, mistral.IntermediateSize);
        Assert.Equal(8, mistral.NumKeyValueHeads);
        Assert.Equal(4096, mistral.SlidingWindow);
        Assert.Equal(131072, mistral.MaxPositionEmbeddings);
        Assert.All(mistral.LayerTypes, t => Assert.Equal(LlamaConfig.SlidingAttention, t));

        var qwen = (Qwen2Config)Parse("""{"model_type": "qwen2"}""");
        Assert.Equal(151936, qwen.VocabSize);
        Assert.Equal(22016, qwen.IntermediateSize);
        Assert.Equal(32768, qwen.MaxPositionEmbeddings);
        Assert.False(qwen.UseSlidingWindow);
        Assert.Null(qwen.EffectiveSlidingWindow);
        Assert.True(qwen.QkvBias);
        Assert.False(qwen.OutputBias);
        Assert.Null(qwen.BosTokenId);
        Assert.All(qwen.LayerTypes, t => Assert.Equal(LlamaConfig.FullAttention, t));
    }

    [Fact]
    public void Architectures_entry_picks_the_family_when_model_type_is_absent()
    {
        Assert.IsType<Qwen2Config>(Parse("""{"architectures": ["Qwen2ForCausalLM"]}"""));
    }

    [Fact]
    public void Transformers_4_layout_is_read_and_written_as_transformers_5()
    {
        var config = (LlamaConfig)Parse("""
            {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1,
             "rope_theta": 500000.0, "torch_dtype": "bfloat16", "custom_key": [1, 2],
             "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}}
            """);
        Assert.Equal(500000.0, config.RopeTheta);
        Assert.Equal(new RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), config.RopeScaling);
        Assert.Equal("bfloat16", config.DType);
        Assert.Equal(16, config.HeadDim);

        var json = config.ToJson();
        Assert.False(json.ContainsKey("rope_theta"));
        Assert.False(json.ContainsKey("rope_scaling"));
        Assert.False(json.ContainsKey("torch_dtype"));
        Assert.Equal("bfloat16", json["dtype"]!.GetValue<string>());
        Assert.Equal("llama3", json["rope_parameters"]!["rope_type"]!.GetValue<string>());
        Assert.Equal(500000.0, json["rope_parameters"]!["rope_theta"]!.GetValue<double>());
        Assert.Equal(8192, json["rope_parameters"]!["original_max_position_embeddings"]!.GetValue<int>());
        Assert.Equal("[1,2]", json["custom_key"]!.ToJsonString());

        var again = (LlamaConfig)AutoModel.ParseConfig(json, "again");
        Assert.Equal(config.RopeScaling, again.RopeScaling);
        Assert.Equal(config.RopeTheta, again.RopeTheta);
        Assert.True(JsonNode.DeepEquals(json, again.ToJson()));
    }

    [Fact]
    public void Legacy_type_key_and_transformers_5_rope_parameters_are_read()
    {
        var linear = (LlamaConfig)Parse("""{"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}}""");
        Assert.Equal(new RopeScaling("linear", 2.0), linear.RopeScaling);
        var dynamic = (MistralConfig)Parse("""{"model_type": "mistral", "rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1000.0}}""");
        Assert.Equal("dynamic", dynamic.RopeScaling!.Type);
        Assert.Equal(1000.0, dynamic.RopeTheta);
        var plain = (Qwen2Config)Parse("""{"model_type": "qwen2", "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}""");
        Assert.Null(plain.RopeScaling);
        Assert.Equal(1e6, plain.RopeTheta);
    }

    [Fact]
    public void Explicit_head_dim_and_null_sliding_window_are_kept()
    {
        var config = (MistralConfig)Parse("""{"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "sliding_window": null}""");
        Assert.Equal(32, config.HeadDim);
        Assert.Null(config.SlidingWindow);
        Assert.All(config.LayerTypes, t => Assert.Equal(LlamaConfig.FullAttention, t));
        var json = config.ToJson();
        Assert.True(json.ContainsKey("sliding_window"));
        Assert.Null(json["sliding_window"]);
    }

    [Theory]
    [InlineData("""{"model_type": "llama", "hidden_size": "big"}""", "'hidden_size'")]
    [InlineData("""{"model_type": "llama", "num_attention_heads": 6, "num_key_value_heads": 4}""", "num_key_value_heads")]
    [InlineData("""{"model_type": "llama", "hidden_act": "swiglu9"}""", "hidden_act 'swiglu9'")]
    [InlineData("""{"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}""", "rope_type 'yarn'")]
    [InlineData("""{"model_type": "llama", "rope_scaling": {"rope_type": "linear"}}""", "factor")]
    [InlineData("""{"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}""", "low_freq_factor")]
    [InlineData("""{"model_type": "llama", "rope_parameters": 3}""", "'rope_parameters'")]
    [InlineData("""{"model_type": "llama", "num_hidden_layers": 0}""", "'num_hidden_layers'")]
    [InlineData("""{"model_type": "llama", "rms_norm_eps": -1}""", "rms_norm_eps")]
    [InlineData("""{"model_type": "llama", "tie_word_embeddings": "yes"}""", "'tie_word_embeddings'")]
    [InlineData("""{"model_type": "mistral", "sliding_window": 0}""", "sliding_window")]
    [InlineData("""{"model_type": "qwen2", "num_hidden_layers": 2, "layer_types": ["full_attention"]}""", "layer_types")]
    [InlineData("""{"model_type": "qwen2", "layer_types": ["local"]}""", "'layer_types'")]
    public void Bad_values_give_one_line_errors_naming_the_key(string json, string expected)
    {
        var e = Assert.Throws<InvalidDataException>(() => Parse(json));
        Assert.Contains(expected, e.Message);
        Assert.StartsWith("x/config.json", e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public void Hidden_act_variants_build_working_models()
    {
        foreach (var act in Activations.Supported)
        {
            var json = LlamaTestConfigs.Tiny("llama").ToJson();
            json["hidden_act"] = act;
            using var model = AutoModel.FromConfig(AutoModel.ParseConfig(json, "c"), seed: 2);
            using var scope = TorchSharp.torch.NewDisposeScope();
            var logits = model.Logits(TorchSharp.torch.tensor(new long[] { 5, 6, 7 }).unsqueeze(0));
            Assert.False(logits.isnan().any().item<bool>(), act);
        }
    }

    [Fact]
    public void Random_init_reads_initializer_range_and_ties_the_head()
    {
        using var model = (LlamaForCausalLM)AutoModel.FromConfig(LlamaTestConfigs.Tiny("llama", tied: true), seed: 4);
        var std = model.model.layers[0].self_attn.q_proj is TorchSharp.Modules.Linear q ? q.weight!.std().item<float>() : 0f;
        Assert.InRange(std, 0.27, 0.33); // initializer_range 0.3
        Assert.IsType<TiedLMHead>(model.lm_head);
        Assert.DoesNotContain("lm_head.weight", model.state_dict().Keys);
        // The head's matrix is the embedding's own Parameter (a write to one shows in the other), counted once.
        using (TorchSharp.torch.no_grad())
            AdapterFlow.Models.ModuleSurgery.EmbeddingWeight(model.model.embed_tokens)[3, 5] = TorchSharp.torch.tensor(42f);
        Assert.Equal(42f, ((TiedLMHead)model.lm_head).weight[3, 5].item<float>());
        long expected = 97 * 32 + 2 * (4 * 32 * 8 + 2 * 2 * 32 * 8 + 4 * 8 * 32 + 3 * 32 * 48 + 2 * 32) + 32;
        Assert.Equal(expected, model.ParameterCount());
    }

    [Fact]
    public void Out_of_vocabulary_token_is_a_one_line_error()
    {
        using var model = AutoModel.FromConfig(LlamaTestConfigs.Tiny("llama"), seed: 1);
        var e = Assert.Throws<ArgumentException>(() => model.Logits(TorchSharp.torch.tensor(new long[] { 3, 97 }).unsqueeze(0)));
        Assert.Contains("0..96", e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public void Qwen2_without_eos_writes_null_and_omits_a_derived_head_dim()
    {
        var json = new Qwen2Config().ToJson();
        Assert.True(json.ContainsKey("eos_token_id"));
        Assert.Null(json["eos_token_id"]);
        Assert.False(json.ContainsKey("head_dim"));
        var custom = (Qwen2Config)Parse("""{"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}""");
        Assert.Equal(32, custom.ToJson()["head_dim"]!.GetValue<int>());
    }

    [Fact]
    public void Module_names_match_hugging_face()
    {
        using var model = AutoModel.FromConfig(LlamaTestConfigs.Tiny("qwen2"), seed: 1);
        var names = model.state_dict().Keys.ToHashSet();
        foreach (var expected in new[]
                 {
                     "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                     "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.bias",
                     "model.layers.1.self_attn.k_proj.bias", "model.layers.1.self_attn.v_proj.bias",
                     "model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.gate_proj.weight",
                     "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight",
                     "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
                 })
            Assert.Contains(expected, names);
        Assert.DoesNotContain("model.layers.1.self_attn.o_proj.bias", names);
        Assert.Equal(3 + 2 * 12, names.Count);
    }
}

/// <summary>The in-place replacement convention the adapters rely on.</summary>
public class LlamaModuleSurgeryTests
{
    /// <summary>A stand-in for an adapter: keeps the original as base_layer and scales its output.</summary>
    private sealed class Scaled : TorchSharp.torch.nn.Module<TorchSharp.torch.Tensor, TorchSharp.torch.Tensor>
    {
        public TorchSharp.torch.nn.Module<TorchSharp.torch.Tensor, TorchSharp.torch.Tensor> base_layer;

        public Scaled(TorchSharp.torch.nn.Module<TorchSharp.torch.Tensor, TorchSharp.torch.Tensor> inner) : base(nameof(Scaled))
        {
            base_layer = inner;
            register_module("base_layer", base_layer);
        }

        public override TorchSharp.torch.Tensor forward(TorchSharp.torch.Tensor x) => base_layer.forward(x) * 0.5;
    }

    [Theory]
    [InlineData("model.layers.1.self_attn.v_proj")]
    [InlineData("model.layers.0.mlp.down_proj")]
    [InlineData("lm_head")]
    public void Wrapping_a_target_changes_the_forward_and_nests_its_weights(string target)
    {
        using var model = AutoModel.FromConfig(LlamaTestConfigs.Tiny("qwen2"), seed: 6);
        using var scope = TorchSharp.torch.NewDisposeScope();
        using var no = TorchSharp.torch.no_grad();
        var ids = TorchSharp.torch.tensor(new long[] { 5, 8, 13, 21 }).unsqueeze(0);
        var before = model.Logits(ids);
        var original = ModuleSurgery.Get(model, target);
        var old = ModuleSurgery.Replace(model, target, new Scaled((TorchSharp.torch.nn.Module<TorchSharp.torch.Tensor, TorchSharp.torch.Tensor>)original));
        Assert.Same(original, old);
        Assert.IsType<Scaled>(ModuleSurgery.Get(model, target));
        Assert.Contains(target + ".base_layer.weight", model.state_dict().Keys);
        Assert.DoesNotContain(target + ".weight", model.state_dict().Keys);
        Assert.True((model.Logits(ids) - before).abs().max().item<float>() > 1e-4);
        ModuleSurgery.Replace(model, target, old);
        Assert.True((model.Logits(ids) - before).abs().max().item<float>() == 0);
    }

    [Fact]
    public void Unknown_or_unreplaceable_paths_are_errors()
    {
        using var model = AutoModel.FromConfig(LlamaTestConfigs.Tiny("llama"), seed: 6);
        Assert.Throws<ArgumentException>(() => ModuleSurgery.Get(model, "model.layers.7.self_attn"));
        var norm = (TorchSharp.torch.nn.Module<TorchSharp.torch.Tensor, TorchSharp.torch.Tensor>)ModuleSurgery.Get(model, "model.norm");
        var e = Assert.Throws<ArgumentException>(() => ModuleSurgery.Replace(model, "model.norm", norm));
        Assert.Contains("model.norm", e.Message);
    }
}

using System.Text.Json.Nodes;
using AdapterFlow.IO;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Models;

/// <summary>Typed configs of GPT-2, OPT, BLOOM, GPT-J, GPT-NeoX: defaults, both transformers layouts, errors, init.</summary>
public class FamilyConfigTests
{
    private static ModelConfig Parse(string json, string path = "test/config.json") =>
        AutoModel.ParseConfig((JsonObject)JsonNode.Parse(json)!, path);

    [Fact]
    public void AbsentKeysTakeTransformersDefaults()
    {
        var gpt2 = Assert.IsType<Gpt2Config>(Parse("""{"model_type": "gpt2"}"""));
        Assert.Equal((50257, 768, 12, 12, 1024, 3072, 64), (gpt2.VocabSize, gpt2.HiddenSize, gpt2.NumHiddenLayers, gpt2.NumAttentionHeads, gpt2.MaxPositionEmbeddings, gpt2.IntermediateSize, gpt2.HeadDim));
        Assert.True(gpt2.TieWordEmbeddings);
        Assert.Equal("gelu_new", gpt2.ActivationFunction);
        Assert.Equal([50256], gpt2.EosTokenIds);

        var opt = Assert.IsType<OptConfig>(Parse("""{"model_type": "opt", "hidden_size": 384, "word_embed_proj_dim": null}"""));
        Assert.Equal((50272, 384, 3072, 2048, 384), (opt.VocabSize, opt.HiddenSize, opt.IntermediateSize, opt.MaxPositionEmbeddings, opt.WordEmbedProjDim));
        Assert.True(opt.DoLayerNormBefore);
        Assert.Equal("relu", opt.ActivationFunction);
        Assert.Equal((1, 2), (opt.PadTokenId, opt.BosTokenId));

        var bloom = Assert.IsType<BloomConfig>(Parse("""{"model_type": "bloom", "n_embed": 128}"""));
        Assert.Equal((250880, 128, 2, 8, 512, 16), (bloom.VocabSize, bloom.HiddenSize, bloom.NumHiddenLayers, bloom.NumAttentionHeads, bloom.IntermediateSize, bloom.HeadDim));

        var gptj = Assert.IsType<GptJConfig>(Parse("""{"model_type": "gptj"}"""));
        Assert.Equal((50400, 4096, 28, 16, 64, 16384), (gptj.VocabSize, gptj.HiddenSize, gptj.NumHiddenLayers, gptj.NumAttentionHeads, gptj.RotaryDim, gptj.IntermediateSize));
        Assert.False(gptj.TieWordEmbeddings);

        var neox = Assert.IsType<GptNeoXConfig>(Parse("""{"model_type": "gpt_neox"}"""));
        Assert.Equal((50432, 6144, 44, 64, 24576, 96, 24), (neox.VocabSize, neox.HiddenSize, neox.NumHiddenLayers, neox.NumAttentionHeads, neox.IntermediateSize, neox.HeadDim, neox.RotaryDim));
        Assert.Equal(10000.0, neox.Rope.Theta);
        Assert.True(neox.UseParallelResidual);
        Assert.True(neox.AttentionBias);
    }

    [Fact]
    public void GptNeoXReadsTransformers4And5RotaryLayouts()
    {
        var v4 = Assert.IsType<GptNeoXConfig>(Parse("""
            {"model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 2, "rotary_pct": 0.5, "rotary_emb_base": 500,
             "rope_scaling": {"type": "dynamic", "factor": 3.0}, "torch_dtype": "bfloat16"}
            """));
        Assert.Equal((500.0, 0.5, 16), (v4.Rope.Theta, v4.Rope.PartialRotaryFactor, v4.RotaryDim));
        Assert.Equal(new RopeScaling("dynamic", 3.0), v4.Rope.Scaling);
        Assert.Equal("bfloat16", v4.DType);

        var v5 = Assert.IsType<GptNeoXConfig>(Parse("""
            {"model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 2, "dtype": "float16",
             "rope_parameters": {"rope_type": "dynamic", "factor": 3.0, "rope_theta": 500.0, "partial_rotary_factor": 0.5}}
            """));
        Assert.Equal(v4.Rope, v5.Rope);
        Assert.Equal("float16", v5.DType);

        // The written config carries both layouts, and reading it back gives the same settings.
        var written = v4.ToJson();
        Assert.Equal("dynamic", written["rope_parameters"]!["rope_type"]!.GetValue<string>());
        Assert.Equal(0.5, written["rotary_pct"]!.GetValue<double>());
        Assert.Equal(500.0, written["rotary_emb_base"]!.GetValue<double>());
        Assert.False(written.ContainsKey("torch_dtype"));
        Assert.Equal(v4.Rope, ((GptNeoXConfig)Parse(written.ToJsonString())).Rope);
    }

    [SkippableFact]
    public void GptNeoXReferenceGivesTheSameLogitsFromA4xStyleConfig()
    {
        using var reference = ReferenceCase.Open("gpt_neox");
        var json = (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(reference.Folder, "config.json")))!;
        var rope = (JsonObject)json["rope_parameters"]!;
        json.Remove("rope_parameters");
        json["rotary_pct"] = rope["partial_rotary_factor"]!.GetValue<double>();
        json["rotary_emb_base"] = rope["rope_theta"]!.GetValue<double>();
        json["torch_dtype"] = json["dtype"]!.GetValue<string>();
        json.Remove("dtype");
        var config = AutoModel.ParseConfig(json, "4.x-style config.json");
        using var checkpoint = Checkpoint.Open(reference.Folder);
        using var model = AutoModel.FromCheckpoint(config, checkpoint);
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var mask = reference.Tensor("attention_mask");
        double diff = ReferenceCase.MaxDiffWhereReal(model.Logits(reference.Tensor("input_ids"), mask), reference.Tensor("logits"), mask);
        Assert.True(diff < ReferenceCase.LogitTolerance, $"max |logit difference| {diff}");
    }

    [Theory]
    [InlineData("""{"model_type": "gpt2", "n_embd": 30, "n_head": 4}""", "hidden size 30")]
    [InlineData("""{"model_type": "gpt2", "n_layer": "two"}""", "'n_layer'")]
    [InlineData("""{"model_type": "gpt2", "activation_function": "gelu_magic"}""", "'activation_function'")]
    [InlineData("""{"model_type": "opt", "do_layer_norm_before": "yes"}""", "'do_layer_norm_before'")]
    [InlineData("""{"model_type": "bloom", "n_head": 0}""", "attention heads")]
    [InlineData("""{"model_type": "gptj", "n_embd": 64, "n_head": 4, "rotary_dim": 3}""", "'rotary_dim'")]
    [InlineData("""{"model_type": "gptj", "n_embd": 64, "n_head": 4, "rotary_dim": 32}""", "'rotary_dim'")]
    [InlineData("""{"model_type": "gpt_neox", "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}""", "'yarn'")]
    [InlineData("""{"model_type": "gpt_neox", "rope_scaling": 2}""", "'rope_scaling'")]
    [InlineData("""{"model_type": "gpt_neox", "hidden_size": 64, "num_attention_heads": 4, "rotary_pct": 0.1}""", "rotary dims")]
    [InlineData("""{"model_type": "gpt_neox", "hidden_act": "gelu_magic"}""", "'hidden_act'")]
    public void BadConfigsFailWithOneLineNamingFileAndKey(string json, string expectedFragment)
    {
        var e = Assert.Throws<InvalidDataException>(() => Parse(json, "models/x/config.json"));
        Assert.Contains("models/x/config.json", e.Message);
        Assert.Contains(expectedFragment, e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public void AlibiSlopesMatchTransformersForPowerOfTwoAndOtherHeadCounts()
    {
        Assert.Equal(Enumerable.Range(1, 8).Select(i => Math.Pow(2, -i)), BloomConfig.AlibiSlopes(8), new ToleranceComparer());
        // 6 heads: 4 slopes of base 2^-2, then slopes 1 and 3 of the 8-head sequence (base 2^-1).
        Assert.Equal(new[] { 0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125 }, BloomConfig.AlibiSlopes(6), new ToleranceComparer());
        // 12 heads: 8 slopes of base 2^-1, then 4 odd powers of 2^-0.5.
        var twelve = BloomConfig.AlibiSlopes(12);
        Assert.Equal(12, twelve.Length);
        Assert.Equal(new[] { Math.Pow(2, -0.5), Math.Pow(2, -1.5), Math.Pow(2, -2.5), Math.Pow(2, -3.5) }, twelve.Skip(8), new ToleranceComparer());
    }

    private sealed class ToleranceComparer : IEqualityComparer<double>
    {
        public bool Equals(double x, double y) => Math.Abs(x - y) < 1e-12;
        public int GetHashCode(double obj) => 0;
    }

    [Fact]
    public void RandomInitFollowsInitializerRangeWithScaledResidualProjections()
    {
        var config = (Gpt2Config)Parse("""{"model_type": "gpt2", "vocab_size": 2000, "n_embd": 128, "n_layer": 8, "n_head": 4, "n_positions": 256, "initializer_range": 0.05}""");
        using var model = AutoModel.FromConfig(config, seed: 1);
        var p = model.state_dict();
        double Std(string name) => p[name].std().item<float>();
        Assert.InRange(Std("transformer.wte.weight"), 0.048, 0.052);
        Assert.InRange(Std("transformer.wpe.weight"), 0.047, 0.053);
        Assert.InRange(Std("transformer.h.0.attn.c_attn.weight"), 0.048, 0.052);
        // transformers scales residual projections (c_proj) by 1/sqrt(2 · n_layer) = 1/4 here.
        Assert.InRange(Std("transformer.h.0.attn.c_proj.weight"), 0.0115, 0.0135);
        Assert.InRange(Std("transformer.h.3.mlp.c_proj.weight"), 0.0115, 0.0135);
        Assert.Equal(0f, p["transformer.h.0.attn.c_attn.bias"].abs().max().item<float>());
        Assert.Equal(1f, p["transformer.ln_f.weight"].min().item<float>());

        var opt = AutoModel.FromConfig(Parse("""{"model_type": "opt", "vocab_size": 2000, "hidden_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "ffn_dim": 256, "init_std": 0.3}"""), seed: 1);
        Assert.InRange(opt.state_dict()["model.decoder.layers.0.fc1.weight"].std().item<float>(), 0.29, 0.31);
        Assert.Equal(0f, opt.state_dict()["model.decoder.layers.0.fc1.bias"].abs().max().item<float>());
        opt.Dispose();
    }

    [Fact]
    public void SameSeedSameWeightsAndWrongConfigTypeIsRejected()
    {
        var config = Parse("""{"model_type": "bloom", "vocab_size": 50, "hidden_size": 16, "n_layer": 1, "n_head": 2}""");
        using var a = AutoModel.FromConfig(config, seed: 4);
        using var b = AutoModel.FromConfig(config, seed: 4);
        foreach (var (name, t) in a.state_dict())
            Assert.True(FamilyTestKit.Same(t, b.state_dict()[name]), name);
        Assert.Throws<ArgumentException>(() => GptJForCausalLM.Family.Create(config));
    }

    [Fact]
    public void RegistryKnowsTheFiveFamiliesByTypeAndArchitecture()
    {
        foreach (var (type, arch) in new[] { ("gpt2", "GPT2LMHeadModel"), ("opt", "OPTForCausalLM"), ("bloom", "BloomForCausalLM"), ("gptj", "GPTJForCausalLM"), ("gpt_neox", "GPTNeoXForCausalLM") })
        {
            Assert.Equal(arch, ModelRegistry.ForModelType(type).Architecture);
            var byArch = ModelRegistry.Find(new JsonObject { ["architectures"] = new JsonArray(arch) }, "config.json");
            Assert.Equal(type, byArch.ModelType);
        }
    }
}

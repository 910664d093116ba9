using System.Text.Json.Nodes;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Models;

/// <summary>
/// Config variants the reference models do not cover, on random tiny models: they build, run, keep the cache
/// consistent with the full forward and survive save → load. No shared files needed.
/// </summary>
public class FamilyVariantTests
{
    /// <summary>Tiny config.json texts keyed by a short name; each exercises a non-default path.</summary>
    public static readonly Dictionary<string, string> Variants = new()
    {
        ["gpt2_untied_inverse_layer_scale"] = """
            {"model_type": "gpt2", "vocab_size": 96, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
             "tie_word_embeddings": false, "scale_attn_by_inverse_layer_idx": true, "activation_function": "gelu", "initializer_range": 0.2}
            """,
        ["gpt2_unscaled_upcast"] = """
            {"model_type": "gpt2", "vocab_size": 96, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64,
             "scale_attn_weights": false, "reorder_and_upcast_attn": true, "initializer_range": 0.1}
            """,
        ["opt_post_norm_projected"] = """
            {"model_type": "opt", "vocab_size": 96, "hidden_size": 32, "word_embed_proj_dim": 16, "num_hidden_layers": 2,
             "num_attention_heads": 4, "ffn_dim": 48, "max_position_embeddings": 64, "do_layer_norm_before": false,
             "activation_function": "gelu", "init_std": 0.2, "pad_token_id": 1}
            """,
        ["opt_no_bias_no_final_norm_untied"] = """
            {"model_type": "opt", "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "ffn_dim": 48, "max_position_embeddings": 64, "enable_bias": false, "_remove_final_layer_norm": true,
             "layer_norm_elementwise_affine": false, "tie_word_embeddings": false, "init_std": 0.2}
            """,
        ["bloom_six_heads_post_ln_residual_untied"] = """
            {"model_type": "bloom", "vocab_size": 96, "hidden_size": 48, "n_layer": 2, "n_head": 6,
             "apply_residual_connection_post_layernorm": true, "tie_word_embeddings": false, "initializer_range": 0.2}
            """,
        ["gptj_tied_full_rotary"] = """
            {"model_type": "gptj", "vocab_size": 96, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
             "rotary_dim": null, "n_inner": null, "tie_word_embeddings": true, "initializer_range": 0.2}
            """,
        ["gpt_neox_sequential_residual_4x"] = """
            {"model_type": "gpt_neox", "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64, "use_parallel_residual": false, "rotary_pct": 0.5,
             "rotary_emb_base": 500, "torch_dtype": "float32", "attention_bias": false, "initializer_range": 0.2}
            """,
        ["gpt_neox_tied_linear_scaling"] = """
            {"model_type": "gpt_neox", "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 64, "max_position_embeddings": 64, "tie_word_embeddings": true, "initializer_range": 0.2,
             "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 1.0}}
            """,
    };

    public static TheoryData<string> VariantNames => new(Variants.Keys);

    private static ModelConfig Parse(string name) =>
        AutoModel.ParseConfig((JsonObject)JsonNode.Parse(Variants[name])!, name);

    private static (Tensor Ids, Tensor Mask) Batch()
    {
        var ids = torch.tensor(new long[,] { { 5, 17, 33, 8, 61, 12, 90, 44, 7, 23 }, { 3, 3, 3, 9, 14, 77, 31, 52, 66, 10 } });
        var mask = torch.tensor(new long[,] { { 1, 1, 1, 1, 1, 1, 1, 1, 1, 1 }, { 0, 0, 0, 1, 1, 1, 1, 1, 1, 1 } });
        return (ids, mask);
    }

    [Theory]
    [MemberData(nameof(VariantNames))]
    public void VariantRunsAndCacheMatchesFullForward(string name)
    {
        using var model = AutoModel.FromConfig(Parse(name), seed: 7);
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var (ids, mask) = Batch();
        var logits = model.Logits(ids, mask);
        Assert.Equal(new long[] { 2, 10, 96 }, logits.shape);
        Assert.True(logits.isfinite().all().item<bool>(), $"{name}: non-finite logits");
        Assert.True(logits.std().item<float>() > 1e-3, $"{name}: logits are (nearly) constant");
        bool positions = model.Config.ModelType != "bloom";
        foreach (var fromMask in positions ? new[] { false, true } : new[] { false })
        {
            double diff = FamilyTestKit.CacheVsFullMaxDiff(model, ids, mask, fromMask, 4);
            Assert.True(diff < 1e-4, $"{name} (positions from mask: {fromMask}): cached vs full {diff}");
        }
        double plain = FamilyTestKit.CacheVsFullMaxDiff(model, ids.narrow(0, 0, 1), null, false, 3);
        Assert.True(plain < 1e-4, $"{name} without mask: cached vs full {plain}");
    }

    [Theory]
    [MemberData(nameof(VariantNames))]
    public void VariantSurvivesSaveLoad(string name)
    {
        using var model = AutoModel.FromConfig(Parse(name), seed: 11);
        var dir = FamilyTestKit.TempDirectory();
        try
        {
            using var loaded = FamilyTestKit.SaveLoadIdentical(model, dir);
            using var scope = torch.NewDisposeScope();
            using var no = torch.no_grad();
            var (ids, mask) = Batch();
            Assert.True(FamilyTestKit.Same(model.Logits(ids, mask), loaded.Logits(ids, mask)), $"{name}: logits changed after save → load");
            // A second parse of the saved config.json gives the same typed config (config round trip).
            var again = AutoModel.LoadConfig(dir);
            Assert.Equal(model.Config.ToJson().ToJsonString(), again.ToJson().ToJsonString());
        }
        finally
        {
            Directory.Delete(dir, true);
        }
    }

    [Theory]
    [MemberData(nameof(VariantNames))]
    public void InputsEmbedsEarlyExitAndHiddenStatesAgree(string name)
    {
        using var model = AutoModel.FromConfig(Parse(name), seed: 3);
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var (ids, mask) = Batch();
        var byIds = model.forward(new ForwardInput { InputIds = ids, AttentionMask = mask, OutputHiddenStates = true });
        var byEmbeds = model.forward(new ForwardInput { InputsEmbeds = model.EmbedTokens(ids), AttentionMask = mask });
        Assert.True(FamilyTestKit.Same(byIds.Logits, byEmbeds.Logits), $"{name}: inputs_embeds path differs from input ids");
        Assert.Equal(model.NumLayers + 1, byIds.HiddenStates!.Count);
        var last = model.forward(new ForwardInput { InputIds = ids, AttentionMask = mask, LastPositionOnly = true }).Logits;
        Assert.True((last.squeeze(1) - byIds.Logits.select(1, -1)).abs().max().item<float>() < 1e-5, $"{name}: last-position logits differ");
        var early = model.forward(new ForwardInput { InputIds = ids, AttentionMask = mask, ExitLayer = 1 }).Logits;
        Assert.Equal(byIds.Logits.shape, early.shape);
        Assert.False(FamilyTestKit.Same(early, byIds.Logits), $"{name}: exiting after layer 1 changed nothing");
    }

    [Theory]
    [MemberData(nameof(VariantNames))]
    public void TrainingModeBackpropagatesToEveryParameter(string name)
    {
        using var model = AutoModel.FromConfig(Parse(name), seed: 5);
        model.train();
        using var scope = torch.NewDisposeScope();
        var (ids, mask) = Batch();
        var logits = model.Logits(ids, mask);
        var loss = nn.functional.cross_entropy(logits.reshape(-1, 96), ids.reshape(-1));
        loss.backward();
        foreach (var (paramName, p) in model.named_parameters())
        {
            Assert.True(p.grad is not null, $"{name}: {paramName} got no gradient");
            Assert.True(p.grad!.isfinite().all().item<bool>(), $"{name}: {paramName} has a non-finite gradient");
        }
        model.eval();
    }

    [Theory]
    [InlineData("gpt2_untied_inverse_layer_scale")]
    [InlineData("opt_post_norm_projected")]
    [InlineData("bloom_six_heads_post_ln_residual_untied")]
    [InlineData("gptj_tied_full_rotary")]
    [InlineData("gpt_neox_sequential_residual_4x")]
    public void BFloat16ModelRunsAndStaysCloseToFloat32(string name)
    {
        using var f32 = AutoModel.FromConfig(Parse(name), seed: 9);
        using var bf16 = AutoModel.FromConfig(Parse(name), seed: 9, dtype: ScalarType.BFloat16);
        Assert.Equal(ScalarType.BFloat16, bf16.DType);
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var (ids, mask) = Batch();
        var a = f32.Logits(ids, mask);
        var b = bf16.Logits(ids, mask);
        Assert.Equal(ScalarType.BFloat16, b.dtype);
        double diff = ReferenceCase.MaxDiffWhereReal(b, a, mask);
        double scale = a.abs().max().item<float>();
        Assert.True(diff < 0.1 * scale + 0.05, $"{name}: bf16 logits off by {diff} (float32 max {scale})");
    }
}

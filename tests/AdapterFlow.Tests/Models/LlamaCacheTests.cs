using System.Text.Json.Nodes;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Models;

/// <summary>Prefill + token-by-token decoding with a KVCache gives the logits of one full forward pass.</summary>
public class LlamaCacheTests
{
    public static TheoryData<string> Architectures => new() { "llama", "mistral", "qwen2" };

    /// <summary>
    /// Runs <paramref name="ids"/> [batch, time] as a prefill of <paramref name="prefill"/> tokens and then one token
    /// per call, passing the growing attention mask and the matching slice of positions; returns all logits.
    /// </summary>
    internal static Tensor DecodeWithCache(CausalLM model, Tensor ids, Tensor? mask, Tensor? positions, int prefill, int? exitLayer = null)
    {
        using var cache = model.CreateCache();
        long time = ids.shape[1];
        var pieces = new List<Tensor>();
        for (long start = 0; start < time;)
        {
            long length = start == 0 ? prefill : 1;
            var output = model.forward(new ForwardInput
            {
                InputIds = ids.narrow(1, start, length),
                AttentionMask = mask?.narrow(1, 0, start + length),
                PositionIds = positions?.narrow(1, start, length),
                Cache = cache,
                ExitLayer = exitLayer,
            });
            pieces.Add(output.Logits);
            start += length;
            Assert.Equal((int)start, cache.Length);
        }
        return torch.cat(pieces, 1);
    }

    [SkippableTheory]
    [MemberData(nameof(Architectures))]
    public void Decoding_with_cache_matches_full_forward(string arch)
    {
        using var reference = ReferenceCase.Open(arch);
        using var model = AutoModel.FromPretrained(reference.Folder);
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var ids = reference.Tensor("input_ids")[0..1];
        var full = model.Logits(ids);
        var decoded = DecodeWithCache(model, ids, null, null, prefill: 5);
        Assert.True(ReferenceCase.MaxDiffWhereReal(decoded, full, null) < ReferenceCase.LogitTolerance);
        // The cached path reproduces the transformers logits too, not just our own full pass.
        var expected = reference.Tensor("logits")[0..1];
        Assert.True(ReferenceCase.MaxDiffWhereReal(decoded, expected, null) < ReferenceCase.LogitTolerance);
    }

    [SkippableTheory]
    [MemberData(nameof(Architectures))]
    public void Decoding_a_left_padded_batch_with_cache_matches_full_forward(string arch)
    {
        using var reference = ReferenceCase.Open(arch);
        using var model = AutoModel.FromPretrained(reference.Folder);
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var ids = reference.Tensor("input_ids");
        var mask = reference.Tensor("attention_mask");
        var positions = reference.Tensor("position_ids_from_mask");
        var decoded = DecodeWithCache(model, ids, mask, positions, prefill: 4);
        var expected = reference.Tensor("logits_position_ids_from_mask");
        double diff = ReferenceCase.MaxDiffWhereReal(decoded, expected, mask);
        Assert.True(diff < ReferenceCase.LogitTolerance, $"{arch}: {diff}");
        // Without position ids the default positions (past .. past + time - 1) must match the plain padded logits.
        var decodedDefault = DecodeWithCache(model, ids, mask, null, prefill: 4);
        diff = ReferenceCase.MaxDiffWhereReal(decodedDefault, reference.Tensor("logits"), mask);
        Assert.True(diff < ReferenceCase.LogitTolerance, $"{arch} (default positions): {diff}");
    }

    [SkippableTheory]
    [MemberData(nameof(Architectures))]
    public void Early_exit_with_cache_matches_early_exit_full_forward(string arch)
    {
        using var reference = ReferenceCase.Open(arch);
        using var model = AutoModel.FromPretrained(reference.Folder);
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var ids = reference.Tensor("input_ids");
        var mask = reference.Tensor("attention_mask");
        var positions = reference.Tensor("position_ids_from_mask");
        var full = model.forward(new ForwardInput { InputIds = ids, AttentionMask = mask, PositionIds = positions, ExitLayer = 1 }).Logits;
        var decoded = DecodeWithCache(model, ids, mask, positions, prefill: 3, exitLayer: 1);
        Assert.True(ReferenceCase.MaxDiffWhereReal(decoded, full, mask) < ReferenceCase.LogitTolerance);
        // Exiting after layer 1 of 2 really skips a layer.
        Assert.True(ReferenceCase.MaxDiffWhereReal(full, reference.Tensor("logits_position_ids_from_mask"), mask) > 1e-2);
    }

    [Fact]
    public void Last_position_only_and_hidden_states_are_consistent()
    {
        using var model = AutoModel.FromConfig(LlamaTestConfigs.Tiny("llama"), seed: 3);
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var ids = torch.randint(4, 100, [2, 7], dtype: ScalarType.Int64);
        var full = model.forward(new ForwardInput { InputIds = ids, OutputHiddenStates = true });
        var last = model.forward(new ForwardInput { InputIds = ids, LastPositionOnly = true }).Logits;
        Assert.Equal(new long[] { 2, 1, 97 }, last.shape);
        Assert.True((last - full.Logits[.., ^1..]).abs().max().item<float>() < 1e-5);
        Assert.Equal(model.NumLayers + 1, full.HiddenStates!.Count);
        // Element 0 is the embedding output; feeding it back as InputsEmbeds gives the same logits.
        var fromEmbeds = model.forward(new ForwardInput { InputsEmbeds = full.HiddenStates[0] }).Logits;
        Assert.True((fromEmbeds - full.Logits).abs().max().item<float>() < 1e-5);
    }

    [Fact]
    public void Sliding_window_limits_attention_and_decodes_consistently()
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var windowed = (MistralConfig)LlamaTestConfigs.Tiny("mistral");
        windowed.SlidingWindow = 3;
        var open = (MistralConfig)LlamaTestConfigs.Tiny("mistral");
        open.SlidingWindow = null;
        using var a = AutoModel.FromConfig(windowed, seed: 5);
        using var b = AutoModel.FromConfig(open, seed: 5);
        var ids = torch.randint(4, 90, [2, 8], dtype: ScalarType.Int64);
        var la = a.Logits(ids);
        var lb = b.Logits(ids);
        // Within the window both agree; past it the window changes the result.
        Assert.True((la[.., ..3] - lb[.., ..3]).abs().max().item<float>() < 1e-5);
        Assert.True((la[.., 3..] - lb[.., 3..]).abs().max().item<float>() > 1e-3);
        // Cached decoding honours the window as well, with and without a padding mask.
        var decoded = DecodeWithCache(a, ids, null, null, prefill: 2);
        Assert.True(ReferenceCase.MaxDiffWhereReal(decoded, la, null) < ReferenceCase.LogitTolerance);
        var mask = torch.ones([2, 8], dtype: ScalarType.Int64);
        mask[1, ..2] = torch.tensor(0L);
        var fullMasked = a.Logits(ids, mask);
        var decodedMasked = DecodeWithCache(a, ids, mask, null, prefill: 4);
        Assert.True(ReferenceCase.MaxDiffWhereReal(decodedMasked, fullMasked, mask) < ReferenceCase.LogitTolerance);
    }

    [Fact]
    public void Qwen2_sliding_layers_follow_layer_types()
    {
        var json = LlamaTestConfigs.Tiny("qwen2").ToJson();
        json["use_sliding_window"] = true;
        json["sliding_window"] = 2;
        json["max_window_layers"] = 1;
        json.Remove("layer_types");
        var config = (Qwen2Config)AutoModel.ParseConfig(json, "config.json");
        Assert.Equal(new[] { LlamaConfig.FullAttention, LlamaConfig.SlidingAttention }, config.LayerTypes);
        using var model = (Qwen2ForCausalLM)AutoModel.FromConfig(config, seed: 1);
        Assert.False(model.model.layers[0].IsSliding);
        Assert.True(model.model.layers[1].IsSliding);
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var ids = torch.randint(4, 90, [1, 6], dtype: ScalarType.Int64);
        var decoded = DecodeWithCache(model, ids, null, null, prefill: 1);
        Assert.True(ReferenceCase.MaxDiffWhereReal(decoded, model.Logits(ids), null) < ReferenceCase.LogitTolerance);
    }
}

/// <summary>Tiny configs for tests that need no shared files.</summary>
internal static class LlamaTestConfigs
{
    public static LlamaConfig Tiny(string modelType, bool tied = false)
    {
        var json = new JsonObject
        {
            ["model_type"] = modelType,
            ["vocab_size"] = modelType == "llama" ? 97 : 91,
            ["hidden_size"] = 32,
            ["intermediate_size"] = 48,
            ["num_hidden_layers"] = 2,
            ["num_attention_heads"] = 4,
            ["num_key_value_heads"] = 2,
            ["max_position_embeddings"] = 64,
            ["initializer_range"] = 0.3,
            ["tie_word_embeddings"] = tied,
        };
        return (LlamaConfig)AutoModel.ParseConfig(json, "tiny config.json");
    }
}

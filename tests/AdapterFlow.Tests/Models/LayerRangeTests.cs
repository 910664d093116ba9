using System.Text.Json.Nodes;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Models;

/// <summary>
/// The layer-range plumbing LayerSkip builds on, for every family: running the first E layers and then the rest
/// from the saved hidden state (StartLayer + LayerInput) equals one full pass, with and without a KV cache whose
/// early layers run ahead of the late ones; the public head equals the forward's logits; layer dropout is
/// identity in eval mode and skips everything at rate 1.
/// </summary>
public class LayerRangeTests
{
    public static TheoryData<string> Families => new(FamilyVariantTests.Variants.Keys.Append("llama"));

    internal static CausalLM Model(string name, bool noDropout = false)
    {
        var json = name == "llama"
            ? "{\"model_type\": \"llama\", \"vocab_size\": 96, \"hidden_size\": 32, \"intermediate_size\": 64, \"num_hidden_layers\": 3, " +
              "\"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"max_position_embeddings\": 64, \"initializer_range\": 0.2}"
            : FamilyVariantTests.Variants[name];
        var config = (JsonObject)JsonNode.Parse(json)!;
        if (noDropout)
            foreach (var key in new[] { "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout", "attention_dropout", "hidden_dropout", "activation_dropout" })
                config[key] = 0.0;
        var model = AutoModel.FromConfig(AutoModel.ParseConfig(config, name), seed: 7);
        model.eval();
        return model;
    }

    internal static Tensor Ids(long batch, long time, int seed) =>
        torch.randint(3, 96, [batch, time], generator: new torch.Generator((ulong)seed));

    [Theory]
    [MemberData(nameof(Families))]
    public void SplitAtEveryLayerEqualsTheFullPass(string name)
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var model = Model(name);
        var ids = Ids(2, 7, 1);
        var full = model.forward(new ForwardInput { InputIds = ids, OutputHiddenStates = true });
        for (int exit = 1; exit < model.NumLayers; exit++)
        {
            var early = model.forward(new ForwardInput { InputIds = ids, ExitLayer = exit, OutputHiddenStates = true });
            var exitState = early.HiddenStates![^1];
            Assert.True(exitState.allclose(full.HiddenStates![exit], 1e-5, 1e-6));
            var rest = model.forward(new ForwardInput { InputIds = ids, StartLayer = exit, LayerInput = exitState });
            Assert.True((rest.Logits - full.Logits).abs().max().item<float>() < 1e-5, $"{name}: resuming at layer {exit} changed the logits");
            // The early exit's logits are the shared head applied to the exit state.
            Assert.True(early.Logits.allclose(model.HeadLogits(exitState), 1e-5, 1e-6));
        }
    }

    [Theory]
    [MemberData(nameof(Families))]
    public void EarlyLayersRunningAheadInTheCacheMatchAFullPass(string name)
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var model = Model(name);
        int exit = 1, prompt = 4, draft = 3;
        var ids = Ids(2, prompt + draft, 2);
        var full = model.forward(new ForwardInput { InputIds = ids }).Logits;
        using var cache = model.CreateCache();
        model.forward(new ForwardInput { InputIds = ids.narrow(1, 0, prompt), Cache = cache });
        // Draft: the next tokens through the first layers only, one at a time, keeping their exit states.
        var states = new List<Tensor>();
        for (int t = prompt; t < prompt + draft; t++)
            states.Add(model.forward(new ForwardInput { InputIds = ids.narrow(1, t, 1), Cache = cache, ExitLayer = exit, OutputHiddenStates = true }).HiddenStates![^1]);
        Assert.Equal(prompt + draft, cache.LayerLength(0));
        Assert.Equal(prompt, cache.LayerLength(model.NumLayers - 1));
        // Verify: the remaining layers on all draft positions at once, from the saved states.
        var verified = model.forward(new ForwardInput
        {
            InputIds = ids.narrow(1, prompt, draft), Cache = cache, StartLayer = exit, LayerInput = torch.cat(states, 1),
        }).Logits;
        Assert.True((verified - full.narrow(1, prompt, draft)).abs().max().item<float>() < 1e-4, $"{name}: verification differs from the full pass");
        for (int l = 0; l < model.NumLayers; l++) Assert.Equal(prompt + draft, cache.LayerLength(l));
    }

    [Fact]
    public void LayerDropoutIsIdentityInEvalAndSkipsEverythingAtRateOne()
    {
        using var scope = torch.NewDisposeScope();
        var model = Model("llama");
        var ids = Ids(3, 5, 3);
        var rates = Enumerable.Repeat(1.0, model.NumLayers).ToArray();
        using (torch.no_grad())
        {
            var plain = model.forward(new ForwardInput { InputIds = ids }).Logits;
            var evalDropout = model.forward(new ForwardInput { InputIds = ids, LayerDropout = rates }).Logits;
            Assert.True(plain.equal(evalDropout).all().item<bool>());
        }
        model.train();
        var skipped = model.forward(new ForwardInput { InputIds = ids, LayerDropout = rates, OutputHiddenStates = true });
        model.eval();
        using (torch.no_grad())
            Assert.True(skipped.Logits.allclose(model.HeadLogits(model.EmbedTokens(ids)), 1e-5, 1e-6));
    }

    [Fact]
    public void BadLayerRangesAreRejected()
    {
        using var scope = torch.NewDisposeScope();
        var model = Model("llama");
        var ids = Ids(1, 3, 4);
        Assert.Throws<ArgumentException>(() => model.forward(new ForwardInput { InputIds = ids, StartLayer = 1 }));
        Assert.Throws<ArgumentOutOfRangeException>(() => model.forward(new ForwardInput { InputIds = ids, StartLayer = 2, ExitLayer = 2, LayerInput = torch.zeros(1, 3, 32) }));
        Assert.Throws<ArgumentException>(() => model.forward(new ForwardInput { InputIds = ids, StartLayer = 1, LayerInput = torch.zeros(1, 3, 16) }));
        Assert.Throws<ArgumentException>(() => model.forward(new ForwardInput { InputIds = ids, LayerDropout = [0.1] }));
    }
}

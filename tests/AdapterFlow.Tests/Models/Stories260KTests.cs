using System.Text.Json.Nodes;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Models;

/// <summary>stories260K, a real pretrained LLaMA (TinyStories), against its float64 golden reference.</summary>
public class Stories260KTests
{
    private static (CausalLM Model, JsonObject Golden) Load()
    {
        var folder = SharedFiles.Require("models", "stories260K-hf");
        var golden = (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(folder, "golden_reference.json")))!;
        return (AutoModel.FromPretrained(folder), golden);
    }

    private static long[] Longs(JsonNode node) => ((JsonArray)node).Select(x => x!.GetValue<long>()).ToArray();
    private static float[] Floats(JsonNode node) => ((JsonArray)node).Select(x => (float)x!.GetValue<double>()).ToArray();

    [SkippableFact]
    public void Logits_and_argmax_match_the_golden_reference()
    {
        var (model, golden) = Load();
        using var _ = model;
        Assert.IsType<LlamaForCausalLM>(model);
        Assert.Equal(260_032, model.ParameterCount());
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var tokens = Longs(golden["token_ids"]!);
        var logits = model.Logits(torch.tensor(tokens).unsqueeze(0))[0];
        foreach (var (position, key) in new[] { (0, "logits_pos0"), (1, "logits_pos1") })
        {
            var expected = torch.tensor(Floats(golden[key]!));
            double diff = (logits[position] - expected).abs().max().item<float>();
            Assert.True(diff < 1e-4, $"{key}: max |Δlogit| = {diff}");
        }
        Assert.Equal(Longs(golden["argmax_per_pos"]!), logits.argmax(-1).data<long>().ToArray());
    }

    [SkippableFact]
    public void Greedy_decode_from_bos_matches_the_golden_tokens()
    {
        var (model, golden) = Load();
        using var _ = model;
        var expected = Longs(golden["token_ids"]!);
        var prompt = expected[..1];

        // With a KV cache, one token per step.
        var tokens = new List<long>(prompt);
        using (var cache = model.CreateCache())
        {
            for (int step = 0; step < expected.Length - 1; step++)
            {
                using var scope = torch.NewDisposeScope();
                using var no = torch.no_grad();
                var input = step == 0 ? torch.tensor(prompt).unsqueeze(0) : torch.tensor(new[] { tokens[^1] }).unsqueeze(0);
                var logits = model.forward(new ForwardInput { InputIds = input, Cache = cache, LastPositionOnly = true }).Logits;
                tokens.Add(logits[0, -1].argmax().item<long>());
            }
        }
        Assert.Equal(expected, tokens.ToArray());

        // And by plain full forward passes.
        Assert.Equal(expected[1..], ReferenceCase.GreedyWithoutCache(model, prompt, expected.Length - 1));
    }
}

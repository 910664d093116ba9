using System.Text.Json.Nodes;
using AdapterFlow.IO;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Models;

/// <summary>
/// GPT-2, OPT, BLOOM, GPT-J and GPT-NeoX against the tiny transformers models in ../shared/reference: logits of the
/// padded batch, greedy tokens, cache vs full forward, save → load.
/// </summary>
public class FamilyReferenceTests
{
    public static TheoryData<string> Archs => new() { "gpt2", "opt", "bloom", "gptj", "gpt_neox" };

    /// <summary>generate() passes positions from the mask to every family whose forward takes position ids (not BLOOM).</summary>
    private static bool TakesPositionIds(string arch) => arch != "bloom";

    private static CausalLM Load(ReferenceCase reference) => AutoModel.FromPretrained(reference.Folder);

    [SkippableTheory]
    [MemberData(nameof(Archs))]
    public void LogitsOfPaddedBatchMatchTransformers(string arch)
    {
        using var reference = ReferenceCase.Open(arch);
        using var model = Load(reference);
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var ids = reference.Tensor("input_ids");
        var mask = reference.Tensor("attention_mask");
        var logits = model.Logits(ids, mask);
        Assert.Equal(reference.Tensor("logits").shape, logits.shape);
        double diff = ReferenceCase.MaxDiffWhereReal(logits, reference.Tensor("logits"), mask);
        Assert.True(diff < ReferenceCase.LogitTolerance, $"{arch}: max |logit difference| {diff}");
        if (reference.Has("logits_position_ids_from_mask"))
        {
            var positions = reference.Tensor("position_ids_from_mask");
            Assert.True(FamilyTestKit.Same(positions, DecoderParts.PositionIdsFromMask(mask)), "PositionIdsFromMask differs from transformers'");
            var withPositions = model.Logits(ids, mask, positions);
            double diff2 = ReferenceCase.MaxDiffWhereReal(withPositions, reference.Tensor("logits_position_ids_from_mask"), mask);
            Assert.True(diff2 < ReferenceCase.LogitTolerance, $"{arch} with positions from the mask: max |logit difference| {diff2}");
        }
        else
        {
            Assert.True(arch is "opt" or "bloom", $"{arch}: the reference should have logits_position_ids_from_mask");
        }
    }

    [SkippableTheory]
    [MemberData(nameof(Archs))]
    public void GreedyContinuationMatchesTransformers(string arch)
    {
        using var reference = ReferenceCase.Open(arch);
        using var model = Load(reference);
        var expected = reference.GreedyNewTokens;
        Assert.Equal(expected, ReferenceCase.GreedyWithoutCache(model, reference.GreedyPrompt, expected.Length));
        using var scope = torch.NewDisposeScope();
        var prompt = torch.tensor(reference.GreedyPrompt, dtype: ScalarType.Int64).unsqueeze(0);
        Assert.Equal(expected, FamilyTestKit.GreedyWithCache(model, prompt, null, false, expected.Length)[0]);
    }

    [SkippableTheory]
    [MemberData(nameof(Archs))]
    public void GreedyPaddedBatchWithCacheMatchesGenerate(string arch)
    {
        using var reference = ReferenceCase.Open(arch);
        using var model = Load(reference);
        using var scope = torch.NewDisposeScope();
        var expected = reference.GreedyBatchNewTokens;
        var actual = FamilyTestKit.GreedyWithCache(model, reference.Tensor("input_ids"), reference.Tensor("attention_mask"),
            TakesPositionIds(arch), expected[0].Length);
        Assert.Equal(expected, actual);
    }

    [SkippableTheory]
    [MemberData(nameof(Archs))]
    public void CachedDecodeEqualsFullForward(string arch)
    {
        using var reference = ReferenceCase.Open(arch);
        using var model = Load(reference);
        using var scope = torch.NewDisposeScope();
        var ids = reference.Tensor("input_ids");
        var mask = reference.Tensor("attention_mask");
        // Unpadded row, no mask at all.
        double plain = FamilyTestKit.CacheVsFullMaxDiff(model, ids.narrow(0, 0, 1), null, false, 4);
        Assert.True(plain < ReferenceCase.LogitTolerance, $"{arch} without mask: {plain}");
        // Left-padded batch with default positions, then with positions from the mask.
        double padded = FamilyTestKit.CacheVsFullMaxDiff(model, ids, mask, false, 5);
        Assert.True(padded < ReferenceCase.LogitTolerance, $"{arch} padded batch: {padded}");
        if (TakesPositionIds(arch))
        {
            double fromMask = FamilyTestKit.CacheVsFullMaxDiff(model, ids, mask, true, 5);
            Assert.True(fromMask < ReferenceCase.LogitTolerance, $"{arch} padded batch, positions from mask: {fromMask}");
        }
        // Prefill shorter than the padding: the first decode steps are pads.
        double earlyPads = FamilyTestKit.CacheVsFullMaxDiff(model, ids, mask, TakesPositionIds(arch), 1);
        Assert.True(earlyPads < ReferenceCase.LogitTolerance, $"{arch} prefill of one token: {earlyPads}");
    }

    [SkippableTheory]
    [MemberData(nameof(Archs))]
    public void SaveLoadIsBitIdenticalAndKeepsCheckpointNames(string arch)
    {
        using var reference = ReferenceCase.Open(arch);
        using var model = Load(reference);
        var dir = FamilyTestKit.TempDirectory();
        try
        {
            using var loaded = FamilyTestKit.SaveLoadIdentical(model, dir);
            // The saved file holds exactly the tensors transformers wrote.
            using var original = SafetensorsFile.Open(Path.Combine(reference.Folder, "model.safetensors"));
            using var saved = SafetensorsFile.Open(Path.Combine(dir, "model.safetensors"));
            Assert.Equal(original.Names.Order(), saved.Names.Order());
            foreach (var name in original.Names)
            {
                using var a = original.Load(name);
                using var b = saved.Load(name);
                Assert.True(FamilyTestKit.Same(a, b), $"{arch}: {name} differs from the checkpoint after load → save");
            }
            // Config: every key transformers wrote survives with its value (dtype key normalised to 'dtype').
            var originalJson = (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(reference.Folder, "config.json")))!;
            var savedJson = (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))!;
            foreach (var (key, value) in originalJson)
            {
                Assert.True(savedJson.ContainsKey(key), $"{arch}: config key '{key}' lost");
                if (key == "rope_parameters")
                {
                    foreach (var (k2, v2) in (JsonObject)value!)
                        Assert.True(JsonNode.DeepEquals(v2, savedJson[key]![k2]), $"{arch}: rope_parameters.{k2} changed");
                }
                else if (value is JsonValue v && v.TryGetValue<double>(out var number))
                    Assert.Equal(number, savedJson[key]!.GetValue<double>());
                else
                    Assert.True(JsonNode.DeepEquals(value, savedJson[key]), $"{arch}: config key '{key}' changed: {value?.ToJsonString()} → {savedJson[key]?.ToJsonString()}");
            }
        }
        finally
        {
            Directory.Delete(dir, true);
        }
    }
}

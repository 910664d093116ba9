using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Models;

/// <summary>Llama / Mistral / Qwen2 against the transformers reference models in ../shared/reference.</summary>
public class LlamaReferenceTests
{
    public static TheoryData<string> Architectures => new() { "llama", "mistral", "qwen2" };

    private static CausalLM Load(ReferenceCase reference) => AutoModel.FromPretrained(reference.Folder);

    [SkippableTheory]
    [MemberData(nameof(Architectures))]
    public void Loads_the_right_family(string arch)
    {
        using var reference = ReferenceCase.Open(arch);
        using var model = Load(reference);
        var expected = arch switch
        {
            "llama" => typeof(LlamaForCausalLM),
            "mistral" => typeof(MistralForCausalLM),
            _ => typeof(Qwen2ForCausalLM),
        };
        Assert.Equal(expected, model.GetType());
        Assert.Equal(arch, model.Config.ModelType);
    }

    [SkippableTheory]
    [MemberData(nameof(Architectures))]
    public void Padded_batch_logits_match_transformers(string arch)
    {
        using var reference = ReferenceCase.Open(arch);
        using var model = Load(reference);
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var ids = reference.Tensor("input_ids");
        var mask = reference.Tensor("attention_mask");
        var logits = model.Logits(ids, mask);
        var expected = reference.Tensor("logits");
        Assert.Equal(expected.shape, logits.shape);
        var diff = ReferenceCase.MaxDiffWhereReal(logits, expected, mask);
        Assert.True(diff < ReferenceCase.LogitTolerance, $"{arch}: max |Δlogit| = {diff}");
    }

    [SkippableTheory]
    [MemberData(nameof(Architectures))]
    public void Logits_with_positions_from_mask_match_transformers(string arch)
    {
        using var reference = ReferenceCase.Open(arch);
        using var model = Load(reference);
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var ids = reference.Tensor("input_ids");
        var mask = reference.Tensor("attention_mask");
        var positions = reference.Tensor("position_ids_from_mask");
        var logits = model.Logits(ids, mask, positions);
        var diff = ReferenceCase.MaxDiffWhereReal(logits, reference.Tensor("logits_position_ids_from_mask"), mask);
        Assert.True(diff < ReferenceCase.LogitTolerance, $"{arch}: max |Δlogit| = {diff}");
        // Rotary attention only sees position differences, so row 1 must also equal row 1 run alone, unpadded.
        var alone = model.Logits(ids[1..2, 3..], null, positions[1..2, 3..]);
        var diffAlone = ReferenceCase.MaxDiffWhereReal(alone, logits[1..2, 3..], null);
        Assert.True(diffAlone < ReferenceCase.LogitTolerance, $"{arch}: padded row vs row alone: {diffAlone}");
    }

    [SkippableTheory]
    [MemberData(nameof(Architectures))]
    public void Greedy_continuation_matches_transformers(string arch)
    {
        using var reference = ReferenceCase.Open(arch);
        using var model = Load(reference);
        var tokens = ReferenceCase.GreedyWithoutCache(model, reference.GreedyPrompt, reference.GreedyNewTokens.Length);
        Assert.Equal(reference.GreedyNewTokens, tokens);
    }
}

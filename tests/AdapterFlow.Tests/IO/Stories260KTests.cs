using System.Text.Json.Nodes;
using AdapterFlow.IO;
using AdapterFlow.Models;
using AdapterFlow.Tests.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.IO;

/// <summary>stories260K (a real LLaMA) in its three layouts from ../shared/models: same tensors, same config, same outputs.</summary>
public class Stories260KTests
{
    public static TheoryData<string> Formats => new() { "hf", "gguf", "llama2c" };

    private static string PathOf(string format) => format switch
    {
        "hf" => SharedFiles.Require("models", "stories260K-hf"),
        "gguf" => SharedFiles.Require("models", "stories260K-gguf", "stories260K.gguf"),
        _ => SharedFiles.Require("models", "stories260K", "stories260K.bin"),
    };

    [SkippableTheory]
    [InlineData("gguf")]
    [InlineData("llama2c")]
    public void Tensors_equal_the_hugging_face_conversion_name_for_name(string format)
    {
        using var hf = Checkpoint.Open(PathOf("hf"));
        using var imported = ModelFiles.Open(PathOf(format));
        Assert.Equal(hf.Names.Order(), imported.Tensors.Names.Order());
        foreach (var name in hf.Names)
        {
            using var scope = torch.NewDisposeScope();
            var expected = hf.Load(name);
            var actual = imported.Tensors.Load(name);
            Assert.Equal(expected.shape, actual.shape);
            Assert.Equal(expected.dtype, actual.dtype);
            double diff = (expected - actual).abs().max().item<float>();
            Assert.True(diff <= 1e-6, $"{format} {name}: max |Δ| = {diff}");
        }
    }

    [SkippableTheory]
    [InlineData("gguf")]
    [InlineData("llama2c")]
    public void Configs_agree_with_the_hugging_face_config(string format)
    {
        var hfPath = PathOf("hf");
        var expected = (LlamaConfig)AutoModel.LoadConfig(hfPath);
        using var imported = ModelFiles.Open(PathOf(format));
        var actual = Assert.IsType<LlamaConfig>(AutoModel.ParseConfig(imported.Config, imported.Path));
        Assert.Equal(expected.HiddenSize, actual.HiddenSize);
        Assert.Equal(expected.IntermediateSize, actual.IntermediateSize);
        Assert.Equal(expected.NumHiddenLayers, actual.NumHiddenLayers);
        Assert.Equal(expected.NumAttentionHeads, actual.NumAttentionHeads);
        Assert.Equal(expected.NumKeyValueHeads, actual.NumKeyValueHeads);
        Assert.Equal(expected.HeadDim, actual.HeadDim);
        Assert.Equal(expected.VocabSize, actual.VocabSize);
        Assert.Equal(expected.RmsNormEps, actual.RmsNormEps);
        Assert.Equal(expected.RopeTheta, actual.RopeTheta);
        Assert.Equal(expected.TieWordEmbeddings, actual.TieWordEmbeddings);
        Assert.Equal(expected.BosTokenId, actual.BosTokenId);
        Assert.Equal(expected.EosTokenIds, actual.EosTokenIds);
        // The GGUF file declares llama.context_length 2048 where llama2.c and the HF conversion say 512.
        Assert.Equal(format == "gguf" ? 2048 : expected.MaxPositionEmbeddings, actual.MaxPositionEmbeddings);
    }

    [SkippableFact]
    public void Embedded_vocabularies_agree()
    {
        using var gguf = ModelFiles.Open(PathOf("gguf"));
        using var llama2c = ModelFiles.Open(PathOf("llama2c"));
        var a = gguf.Vocabulary!;
        var b = llama2c.Vocabulary!; // tok512.bin found beside stories260K.bin
        Assert.Equal(512, a.Tokens.Length);
        Assert.Equal(512, b.Tokens.Length);
        Assert.Equal("llama", a.Model);
        Assert.Equal(1, a.BosTokenId);
        Assert.Equal(2, a.EosTokenId);
        Assert.Equal(0, a.UnknownTokenId);
        Assert.Equal("<0x00>", a.Tokens[3]);
        Assert.Equal(6, a.TokenTypes![3]); // byte token
        Assert.Equal(a.Scores, b.Scores);
        // llama2.c spells SentencePiece's word-start "▁" as a space; otherwise the token strings are the same.
        for (int i = 3; i < 512; i++) Assert.Equal(a.Tokens[i].Replace('▁', ' '), b.Tokens[i]);
    }

    [SkippableTheory]
    [MemberData(nameof(Formats))]
    public void Logits_and_greedy_tokens_match_the_golden_reference(string format)
    {
        var golden = (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(PathOf("hf"), "golden_reference.json")))!;
        var tokenIds = ((JsonArray)golden["token_ids"]!).Select(x => x!.GetValue<long>()).ToArray();
        using var model = ModelFiles.Load(PathOf(format));
        Assert.IsType<LlamaForCausalLM>(model);
        using (var scope = torch.NewDisposeScope())
        using (torch.no_grad())
        {
            var logits = model.Logits(torch.tensor(tokenIds[..2]).unsqueeze(0));
            for (int pos = 0; pos < 2; pos++)
            {
                var expected = torch.tensor(((JsonArray)golden[$"logits_pos{pos}"]!).Select(x => x!.GetValue<double>()).ToArray());
                var diff = (logits[0, pos].to_type(ScalarType.Float64) - expected).abs().max().item<double>();
                Assert.True(diff < 1e-4, $"{format} position {pos}: max |Δlogit| = {diff}");
            }
        }
        var greedy = ReferenceCase.GreedyWithoutCache(model, [tokenIds[0]], tokenIds.Length - 1);
        Assert.Equal(tokenIds[1..], greedy);
    }
}

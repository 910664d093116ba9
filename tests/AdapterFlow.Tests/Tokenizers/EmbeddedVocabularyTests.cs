using System.Text.Json.Nodes;
using AdapterFlow.IO;

namespace AdapterFlow.Tests.Tokenizers;

/// <summary>
/// Tokenizers built from the vocabulary a model file carries (GGUF tokenizer.ggml.*, llama2.c tok512.bin) for
/// stories260K: the same merges as the Hugging Face conversion's tokenizer.json, the golden ids, and the same ids,
/// tokens and decoded text as tokenizer.json on hundreds of real texts.
/// </summary>
public class EmbeddedVocabularyTests
{
    private static HFTokenizer FromGguf() =>
        TextModel.LoadTokenizer(SharedFiles.Require("models", "stories260K-gguf", "stories260K.gguf"));

    private static HFTokenizer FromLlama2C()
    {
        var vocabulary = Llama2C.ReadVocabulary(SharedFiles.Require("models", "stories260K", "tok512.bin"), 512);
        return SentencePieceVocabulary.ToTokenizer(vocabulary, "tok512.bin");
    }

    private static HFTokenizer Reference() => TextModel.LoadTokenizer(SharedFiles.Require("models", "stories260K-hf"));

    public static TheoryData<string> Sources => new() { "gguf", "llama2c" };

    private static HFTokenizer From(string source) => source == "gguf" ? FromGguf() : FromLlama2C();

    [SkippableTheory]
    [MemberData(nameof(Sources))]
    public void Merges_equal_the_hugging_face_conversion(string source)
    {
        var built = JsonNode.Parse(From(source).TokenizerJson)!["model"]!;
        var reference = JsonNode.Parse(File.ReadAllText(Path.Combine(SharedFiles.Require("models", "stories260K-hf"), "tokenizer.json")))!["model"]!;
        Assert.Equal(reference["merges"]!.AsArray().Select(m => m!.ToString()), built["merges"]!.AsArray().Select(m => m!.ToString()));
        Assert.Equal(reference["vocab"]!.ToJsonString(), built["vocab"]!.ToJsonString());
    }

    [SkippableTheory]
    [MemberData(nameof(Sources))]
    public void Golden_tokenizer_checks_pass(string source)
    {
        var golden = JsonNode.Parse(File.ReadAllText(Path.Combine(SharedFiles.Require("models", "stories260K-hf"), "golden_reference.json")))!["tokenizer_checks"]!.AsObject();
        var tokenizer = From(source);
        Assert.NotEmpty(golden);
        foreach (var (text, ids) in golden)
            Assert.Equal(ids!.AsArray().Select(i => (int)i!), tokenizer.Encode(text, addSpecialTokens: true));
    }

    [SkippableTheory]
    [MemberData(nameof(Sources))]
    public void Real_texts_tokenize_and_decode_as_tokenizer_json(string source)
    {
        var math = JsonNode.Parse(File.ReadAllText(SharedFiles.Require("data", "math", "math_data.json")))!.AsArray();
        var texts = math.Take(300).SelectMany(item => new[] { item!["instruction"]!.ToString(), item["output"]!.ToString() })
            .Append("  leading spaces, trailing  ").Append("tabs\tand\r\nnewlines").Append("emoji 🙂 and 日本語 bytes").ToArray();
        var built = From(source);
        var reference = Reference();
        foreach (var text in texts)
        {
            var expected = reference.Encode(text, addSpecialTokens: true);
            Assert.Equal(expected, built.Encode(text, addSpecialTokens: true));
            Assert.Equal(reference.Decode(expected, skipSpecialTokens: true), built.Decode(expected, skipSpecialTokens: true));
        }
        Assert.Equal(reference.BosTokenId, built.BosTokenId);
        Assert.Equal(reference.EosTokenId, built.EosTokenId);
    }

    [SkippableFact]
    public void A_gguf_model_file_alone_loads_with_its_tokenizer()
    {
        using var model = TextModel.Load(SharedFiles.Require("models", "stories260K-gguf", "stories260K.gguf"));
        Assert.Equal(512, model.Tokenizer.VocabSize);
        var golden = JsonNode.Parse(File.ReadAllText(Path.Combine(SharedFiles.Require("models", "stories260K-hf"), "golden_reference.json")))!;
        var generator = model.CreateGenerator();
        // Greedy from BOS alone ("" plus the BOS the embedded template adds) must retrace the golden story.
        var result = generator.Generate([""], new AdapterFlow.Generation.GenerationOptions { MaxNewTokens = 24 });
        var expected = golden["token_ids"]!.AsArray().Skip(1).Take(24).Select(i => (int)i!);
        Assert.Equal(expected, result.Sequences[0].Tokens);
        Assert.StartsWith("Once upon a time, there was a little girl named Lily.", result.Sequences[0].Text);
    }

    [Fact]
    public void Vocabularies_of_other_tokenizer_models_are_refused_with_a_hint()
    {
        var vocabulary = new EmbeddedVocabulary("gpt2", ["a", "b"], null, null, ["a b"], null, null, null, null);
        var e = Assert.Throws<NotSupportedException>(() => SentencePieceVocabulary.ToTokenizer(vocabulary, "x.gguf"));
        Assert.Contains("tokenizer.json", e.Message);
    }
}

using System.Text;
using System.Text.Json.Nodes;
using AdapterFlow.Generation;
using AdapterFlow.IO;
using AdapterFlow.Models;

namespace AdapterFlow.Tests.Generation;

/// <summary>Text generation with a real pretrained model (stories260K) and its real tokenizer.</summary>
public class StoriesGenerationTests
{
    private static (CausalLM Model, HFTokenizer Tokenizer, JsonObject Golden) Load()
    {
        var folder = SharedFiles.Require("models", "stories260K-hf");
        Skip.If(ModelRegistry.All.All(f => f.ModelType != "llama"), "the llama family is not on this branch yet");
        var golden = (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(folder, "golden_reference.json")))!;
        return (AutoModel.FromPretrained(folder), HFTokenizer.FromDirectory(folder), golden);
    }

    [SkippableFact]
    public void GreedyTextFromBosEqualsTheGoldenStory()
    {
        var (model, tokenizer, golden) = Load();
        using var _ = model;
        var ids = ((JsonArray)golden["token_ids"]!).Select(x => x!.GetValue<int>()).ToArray();
        var generator = new TextGenerator(model, tokenizer);
        var result = generator.Generate([ids[0]], new GenerationOptions { MaxNewTokens = 60 });
        Assert.Equal(ids.Skip(1), result.Tokens);
        Assert.Equal(golden["text"]!.GetValue<string>(), result.Text);
        // The same through the text API: "" with special tokens is just BOS.
        Assert.Equal(golden["text"]!.GetValue<string>(), generator.GenerateText("", new GenerationOptions { MaxNewTokens = 60 }));
    }

    [SkippableFact]
    public void SelfSpeculativeDecodingWritesTheGoldenStoryAtEveryExitLayer()
    {
        var (model, tokenizer, golden) = Load();
        using var _ = model;
        var ids = ((JsonArray)golden["token_ids"]!).Select(x => x!.GetValue<int>()).ToArray();
        var generator = new TextGenerator(model, tokenizer);
        for (int exit = 1; exit <= model.NumLayers; exit++)
            foreach (var k in new[] { 2, 6 })
            {
                var result = generator.Generate([ids[0]], new GenerationOptions
                {
                    MaxNewTokens = 60, Strategy = DecodingStrategyKind.SelfSpeculative, ExitLayer = exit, NumSpeculations = k,
                });
                Assert.Equal(ids.Skip(1), result.Tokens);
                Assert.Equal(golden["text"]!.GetValue<string>(), result.Text);
            }
        // A padded batch of story openings: each row equals autoregressive decoding of the same batch.
        string[] prompts = ["Once upon a time", "Lily and Tom went to the park. They saw a big", "One day, a little dog"];
        var plain = new GenerationOptions { MaxNewTokens = 30 };
        var expected = generator.Generate(prompts, plain);
        var speculative = generator.Generate(prompts, plain with { Strategy = DecodingStrategyKind.SelfSpeculative, ExitLayer = 3, NumSpeculations = 4 });
        for (int r = 0; r < prompts.Length; r++) Assert.Equal(expected.Sequences[r].Tokens, speculative.Sequences[r].Tokens);
    }

    [SkippableFact]
    public async Task StreamedTextAddsUpToTheTextAndStopStringsCutIt()
    {
        var (model, tokenizer, golden) = Load();
        using var _ = model;
        var story = golden["text"]!.GetValue<string>();
        var generator = new TextGenerator(model, tokenizer);
        var options = new GenerationOptions { MaxNewTokens = 60, StopStrings = ["park."] };
        var streamed = new StringBuilder();
        FinishReason? reason = null;
        var stream = generator.StreamAsync("", options);
        await foreach (var token in stream)
        {
            streamed.Append(token.Text);
            reason = token.FinishReason ?? reason;
        }
        var expected = story[..story.IndexOf("park.", StringComparison.Ordinal)];
        Assert.Equal(expected, streamed.ToString());
        Assert.Equal(expected, stream.Result!.Sequences[0].Text);
        Assert.Equal(FinishReason.StopString, reason);
        Assert.Equal("park.", stream.Result.Sequences[0].StopString);
        Assert.True(stream.Result.Sequences[0].Tokens.Count < 60);
    }

    [SkippableFact]
    public void TextBatchOfDifferentLengthsEqualsEachPromptAlone()
    {
        var (model, tokenizer, _) = Load();
        using var __ = model;
        var generator = new TextGenerator(model, tokenizer);
        var options = new GenerationOptions { MaxNewTokens = 20 };
        string[] prompts = ["Once upon a time", "Tom and Sam went to the park. They saw", "Lily"];
        var batch = generator.Generate(prompts, options);
        for (int i = 0; i < prompts.Length; i++)
        {
            Assert.Equal(generator.GenerateText(prompts[i], options), batch.Sequences[i].Text);
            Assert.False(string.IsNullOrWhiteSpace(batch.Sequences[i].Text));
        }
    }
}

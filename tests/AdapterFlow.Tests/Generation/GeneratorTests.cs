using System.Text;
using AdapterFlow.Generation;
using AdapterFlow.Tests.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Generation;

/// <summary>TextGenerator behaviour on a tiny seeded model (no shared files needed).</summary>
public class GeneratorTests
{
    private static readonly int[] PromptA = [40, 77, 120, 9, 200, 31, 18];
    private static readonly int[] PromptB = [5, 250, 66];
    private static readonly int[] PromptC = [101, 102, 103, 104, 105];

    /// <summary>No stop tokens, so every row runs to MaxNewTokens.</summary>
    private static GenerationOptions Plain(int maxNew = 12) => new() { MaxNewTokens = maxNew, StopTokenIds = [] };

    [Fact]
    public void GreedyWithCacheEqualsFullForwardLoop()
    {
        using var model = new TinyLM();
        var generated = new TextGenerator(model).Generate(PromptA, Plain(16));
        var expected = ReferenceCase.GreedyWithoutCache(model, PromptA.Select(i => (long)i).ToArray(), 16);
        Assert.Equal(expected.Select(i => (int)i), generated.Tokens);
        Assert.Equal(FinishReason.Length, generated.FinishReason);
    }

    [Fact]
    public void EveryRowOfAPaddedBatchEqualsThatPromptAlone()
    {
        using var model = new TinyLM();
        var generator = new TextGenerator(model);
        var batch = generator.Generate([PromptA, PromptB, PromptC], Plain());
        foreach (var (prompt, row) in new[] { PromptA, PromptB, PromptC }.Zip(batch.Sequences))
            Assert.Equal(generator.Generate(prompt, Plain()).Tokens, row.Tokens);
        Assert.Equal(3, batch.Sequences.Count);
    }

    [Fact]
    public void StopTokenEndsItsRowOnlyAndTheRowIsPadded()
    {
        using var model = new TinyLM();
        var generator = new TextGenerator(model);
        var free = generator.Generate(PromptA, Plain(12)).Tokens;
        int stop = free[3];
        int firstAt = free.ToList().IndexOf(stop);
        var options = Plain(12) with { StopTokenIds = [stop, 259] };

        var batch = generator.Generate([PromptA, PromptB], options);
        var a = batch.Sequences[0];
        Assert.Equal(free.Take(firstAt + 1), a.Tokens);
        Assert.Equal(FinishReason.StopToken, a.FinishReason);
        var b = batch.Sequences[1];
        Assert.Equal(generator.Generate(PromptB, options).Tokens, b.Tokens);

        var padded = batch.ToPaddedArray(ByteTokenizer.Pad);
        Assert.Equal(Math.Max(a.Tokens.Count, b.Tokens.Count), padded[0].Length);
        Assert.All(padded[0].Skip(a.Tokens.Count), t => Assert.Equal(ByteTokenizer.Pad, t));
    }

    [Fact]
    public void EosFromTheConfigStopsByDefault()
    {
        using var free = new TinyLM();
        var tokens = new TextGenerator(free).Generate(PromptB, Plain(10)).Tokens;
        // A model whose EOS is the third greedy token stops there, with no options given.
        using var model = new TinyLM(eos: tokens[2]);
        var result = new TextGenerator(model).Generate(PromptB, new GenerationOptions { MaxNewTokens = 10 });
        Assert.Equal(tokens.Take(tokens.ToList().IndexOf(tokens[2]) + 1), result.Tokens);
        Assert.Equal(FinishReason.StopToken, result.FinishReason);
    }

    [Fact]
    public void MinNewTokensDelaysTheStopToken()
    {
        using var model = new TinyLM();
        var generator = new TextGenerator(model);
        int first = generator.Generate(PromptC, Plain(1)).Tokens[0];
        var result = generator.Generate(PromptC, Plain(4) with { StopTokenIds = [first], MinNewTokens = 2 });
        Assert.NotEqual(first, result.Tokens[0]);
        Assert.NotEqual(first, result.Tokens[1]);
    }

    [Fact]
    public void StopStringsEndTheTextAndAreCutFromIt()
    {
        using var model = new TinyLM();
        var tokenizer = new ByteTokenizer();
        var generator = new TextGenerator(model, tokenizer);
        var free = generator.Generate(PromptA, Plain(24));
        var text = free.Text!;
        Assert.Equal(tokenizer.Decode(free.Tokens, true), text);
        // A stop string taken from the middle of the free-running text, made of whole characters (random bytes
        // decode to U+FFFD where a UTF-8 sequence is incomplete, and that can change as more bytes arrive).
        int at = Enumerable.Range(text.Length / 2, text.Length - text.Length / 2 - 1)
            .First(i => text.Substring(i, 2).All(c => c != '\uFFFD' && !char.IsSurrogate(c)));
        var stop = text.Substring(at, 2);
        int cut = text.IndexOf(stop, StringComparison.Ordinal);

        var stopped = generator.Generate(PromptA, Plain(24) with { StopStrings = ["never appears \u0001", stop] });
        Assert.Equal(FinishReason.StopString, stopped.FinishReason);
        Assert.Equal(stop, stopped.StopString);
        Assert.Equal(text[..cut], stopped.Text);
        Assert.Equal(free.Tokens.Take(stopped.Tokens.Count), stopped.Tokens);
        // It stopped at the first token whose text completes the stop string.
        Assert.Contains(stop, tokenizer.Decode(stopped.Tokens, true));
        Assert.DoesNotContain(stop, tokenizer.Decode(stopped.Tokens.Take(stopped.Tokens.Count - 1).ToArray(), true));
    }

    [Fact]
    public void SameSeedSameSampleDifferentSeedDifferentSample()
    {
        using var model = new TinyLM();
        var generator = new TextGenerator(model);
        var options = Plain(20) with { DoSample = true, TopK = 0, Seed = 1234 };
        var a = generator.Generate([PromptA, PromptB], options);
        var b = generator.Generate([PromptA, PromptB], options);
        var c = generator.Generate([PromptA, PromptB], options with { Seed = 99 });
        Assert.Equal(a.Sequences[0].Tokens, b.Sequences[0].Tokens);
        Assert.Equal(a.Sequences[1].Tokens, b.Sequences[1].Tokens);
        Assert.NotEqual(a.Sequences[0].Tokens, c.Sequences[0].Tokens);
        // Sampling differs from greedy on this flat-ish model.
        Assert.NotEqual(generator.Generate(PromptA, Plain(20)).Tokens, a.Sequences[0].Tokens);
    }

    [Fact]
    public void SeveralSamplesPerPromptComeInPromptOrder()
    {
        using var model = new TinyLM();
        var generator = new TextGenerator(model);
        var options = Plain(10) with { DoSample = true, TopK = 0, Seed = 11, NumReturnSequences = 3 };
        var result = generator.Generate([PromptA, PromptB], options);
        Assert.Equal(6, result.Sequences.Count);
        // Samples of one prompt differ from each other.
        Assert.NotEqual(result.Sequences[0].Tokens, result.Sequences[1].Tokens);
        // Greedy "samples" of one prompt are identical and equal that prompt's greedy output.
        var greedy = generator.Generate([PromptA, PromptB], Plain(10) with { NumReturnSequences = 2 });
        Assert.Equal(4, greedy.Sequences.Count);
        var aloneA = generator.Generate(PromptA, Plain(10)).Tokens;
        var aloneB = generator.Generate(PromptB, Plain(10)).Tokens;
        Assert.Equal(aloneA, greedy.Sequences[0].Tokens);
        Assert.Equal(aloneA, greedy.Sequences[1].Tokens);
        Assert.Equal(aloneB, greedy.Sequences[2].Tokens);
        Assert.Equal(aloneB, greedy.Sequences[3].Tokens);
        Assert.Throws<ArgumentException>(() => generator.Generate(PromptA, Plain() with { NumBeams = 2, NumReturnSequences = 2 }));
    }

    [Fact]
    public void TopKOneSamplingEqualsGreedy()
    {
        using var model = new TinyLM();
        var generator = new TextGenerator(model);
        var greedy = generator.Generate([PromptA, PromptB], Plain(15));
        var sampled = generator.Generate([PromptA, PromptB], Plain(15) with { DoSample = true, TopK = 1, Temperature = 1.7, Seed = 5 });
        Assert.Equal(greedy.Sequences[0].Tokens, sampled.Sequences[0].Tokens);
        Assert.Equal(greedy.Sequences[1].Tokens, sampled.Sequences[1].Tokens);
    }

    [Theory]
    [InlineData(1.8, 40)]
    [InlineData(0.3, 12)] // < 1 rewards repeats: here it must change the output
    public void RepetitionPenaltyMatchesAHandWrittenGreedyLoop(double penalty, int newTokens)
    {
        using var model = new TinyLM(headScale: 1.0);
        var result = new TextGenerator(model).Generate(PromptB, Plain(newTokens) with { RepetitionPenalty = penalty });

        // The transformers formula written out on full forward passes without a cache.
        var tokens = PromptB.ToList();
        for (int step = 0; step < newTokens; step++)
        {
            using var scope = torch.NewDisposeScope();
            using var no = torch.no_grad();
            var logits = model.Logits(torch.tensor(tokens.Select(t => (long)t).ToArray()).unsqueeze(0))[0, -1].data<float>().ToArray();
            foreach (var seen in tokens.Distinct())
                logits[seen] = logits[seen] < 0 ? (float)(logits[seen] * penalty) : (float)(logits[seen] / penalty);
            tokens.Add(Array.IndexOf(logits, logits.Max()));
        }
        Assert.Equal(tokens.Skip(PromptB.Length), result.Tokens);
        // And the penalty changed something here (otherwise the test would prove nothing).
        Assert.NotEqual(new TextGenerator(model).Generate(PromptB, Plain(newTokens)).Tokens, result.Tokens);
    }

    [Fact]
    public async Task StreamingYieldsTheSameTokensAndTextAsGenerate()
    {
        using var model = new TinyLM();
        var generator = new TextGenerator(model, new ByteTokenizer());
        var full = generator.Generate([PromptA, PromptB, PromptC], Plain(20));
        var stopStrings = new[] { full.Sequences[1].Text!.Substring(6, 2) };
        var options = Plain(20) with { StopStrings = stopStrings };
        var expected = generator.Generate([PromptA, PromptB, PromptC], options);

        var tokens = Enumerable.Range(0, 3).Select(_ => new List<int>()).ToArray();
        var texts = Enumerable.Range(0, 3).Select(_ => new StringBuilder()).ToArray();
        var reasons = new FinishReason?[3];
        var stream = generator.StreamAsync([PromptA, PromptB, PromptC], options);
        await foreach (var token in stream)
        {
            Assert.Null(reasons[token.Row]); // nothing after a row's last token
            tokens[token.Row].Add(token.TokenId);
            texts[token.Row].Append(token.Text);
            reasons[token.Row] = token.FinishReason;
            // The streamed text never shows a stop string.
            Assert.DoesNotContain(stopStrings[0], texts[token.Row].ToString());
        }
        for (int r = 0; r < 3; r++)
        {
            Assert.Equal(expected.Sequences[r].Tokens, tokens[r]);
            Assert.Equal(expected.Sequences[r].Text, texts[r].ToString());
            Assert.Equal(expected.Sequences[r].FinishReason, reasons[r]);
        }
        Assert.Equal(FinishReason.StopString, expected.Sequences[1].FinishReason);
        Assert.NotNull(stream.Result);
        Assert.Equal(expected.Sequences[0].Tokens, stream.Result!.Sequences[0].Tokens);
    }

    [Fact]
    public async Task StreamingTextPromptOverloadAndCancellation()
    {
        using var model = new TinyLM();
        var generator = new TextGenerator(model, new ByteTokenizer());
        var text = generator.GenerateText("héllo", Plain(8));
        var streamed = new StringBuilder();
        await foreach (var token in generator.StreamAsync("héllo", Plain(8))) streamed.Append(token.Text);
        Assert.Equal(text, streamed.ToString());

        using var cancel = new CancellationTokenSource();
        int seen = 0;
        await Assert.ThrowsAsync<OperationCanceledException>(async () =>
        {
            await foreach (var _ in generator.StreamAsync("héllo", Plain(8)).WithCancellation(cancel.Token))
                if (++seen == 2) cancel.Cancel();
        });
        Assert.Equal(2, seen);
    }

    [Fact]
    public void GenerateStopsWhenCancelled()
    {
        using var model = new TinyLM();
        using var cancel = new CancellationTokenSource();
        cancel.Cancel();
        Assert.Throws<OperationCanceledException>(() => new TextGenerator(model).Generate([PromptA], Plain(), cancel.Token));
    }

    [Fact]
    public void StatsCountPromptAndGeneratedTokens()
    {
        using var model = new TinyLM();
        var result = new TextGenerator(model).Generate([PromptA, PromptB], Plain(6));
        var stats = result.Stats;
        Assert.Equal(PromptA.Length + PromptB.Length, stats.PromptTokens);
        Assert.Equal(12, stats.GeneratedTokens);
        Assert.Equal(5, stats.DecodeSteps);
        Assert.Equal(10, stats.DecodeTokens);
        Assert.True(stats.PrefillTime > TimeSpan.Zero && stats.DecodeTime > TimeSpan.Zero);
        Assert.True(stats.PromptTokensPerSecond > 0 && stats.GenerationTokensPerSecond > 0);
    }

    [Fact]
    public async Task MemoryStaysFlatAcrossDecodeSteps()
    {
        using var model = new TinyLM();
        var generator = new TextGenerator(model);
        // Warm up (first calls may create lazily cached tensors).
        generator.Generate(PromptA, Plain(4));
        long before = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        var live = new List<long>();
        // Each step completes synchronously, so the awaits continue on this thread (the statistics are per thread).
        await foreach (var token in generator.StreamAsync([PromptA, PromptB], Plain(60)))
            if (token.Row == 1) live.Add(DisposeScopeManager.Statistics.ThreadTotalLiveCount);
        long after = DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        // Same number of live tensors after every step (the cache grows in place), none left at the end.
        Assert.Equal(60, live.Count);
        Assert.All(live.Skip(1), n => Assert.Equal(live[1], n));
        Assert.Equal(before, after);
    }

    [Fact]
    public void ExitLayerIsPassedToTheModel()
    {
        using var model = new TinyLM();
        var earlyExit = Plain(2) with { Strategy = DecodingStrategyKind.EarlyExit };
        var ex = Assert.Throws<ArgumentException>(() => new TextGenerator(model).Generate(PromptA, earlyExit with { ExitLayer = 2 }));
        Assert.Contains("ExitLayer 2", ex.Message);
        // The strategy is explicit: an exit layer alone is a mistake, and early exit without one too.
        Assert.Contains("Strategy", Assert.Throws<ArgumentException>(() => new TextGenerator(model).Generate(PromptA, Plain(2) with { ExitLayer = 1 })).Message);
        Assert.Contains("ExitLayer", Assert.Throws<ArgumentException>(() => new TextGenerator(model).Generate(PromptA, earlyExit)).Message);
        Assert.Equal(new TextGenerator(model).Generate(PromptA, Plain(5)).Tokens,
            new TextGenerator(model).Generate(PromptA, Plain(5) with { Strategy = DecodingStrategyKind.EarlyExit, ExitLayer = 1 }).Tokens);
    }

    [Fact]
    public void BadInputGivesOneLineArgumentErrors()
    {
        using var model = new TinyLM();
        var generator = new TextGenerator(model);
        Assert.Contains("prompt 1 is empty", Assert.Throws<ArgumentException>(() => generator.Generate([PromptA, Array.Empty<int>()], Plain())).Message);
        Assert.Contains("token id 999", Assert.Throws<ArgumentException>(() => generator.Generate([1, 999], Plain())).Message);
        Assert.Contains("tokenizer", Assert.Throws<ArgumentException>(() => generator.Generate(PromptA, Plain() with { StopStrings = ["x"] })).Message);
        Assert.Contains("TopP", Assert.Throws<ArgumentException>(() => generator.Generate(PromptA, Plain() with { TopP = 0 })).Message);
        Assert.Contains("MaxNewTokens", Assert.Throws<ArgumentException>(() => generator.Generate(PromptA, Plain() with { MaxNewTokens = 0 })).Message);
        Assert.Throws<InvalidOperationException>(() => generator.GenerateText("hi"));
    }

    [Fact]
    public void OptionsReadAGenerationConfig()
    {
        var dir = Directory.CreateTempSubdirectory("af-gen-");
        try
        {
            File.WriteAllText(Path.Combine(dir.FullName, "generation_config.json"),
                """{"bos_token_id": 1, "eos_token_id": [2, 7], "pad_token_id": 0, "do_sample": true, "temperature": 0.6, "top_p": 0.9, "top_k": null, "repetition_penalty": 1.1, "max_new_tokens": 33}""");
            var options = GenerationOptions.FromGenerationConfig(dir.FullName);
            Assert.Equal(new[] { 2, 7 }, options.StopTokenIds);
            Assert.Equal(0, options.PadTokenId);
            Assert.True(options.DoSample);
            Assert.Equal(0.6, options.Temperature);
            Assert.Equal(0.9, options.TopP);
            Assert.Equal(50, options.TopK);
            Assert.Equal(1.1, options.RepetitionPenalty);
            Assert.Equal(33, options.MaxNewTokens);

            File.WriteAllText(Path.Combine(dir.FullName, "generation_config.json"), """{"top_p": 1.5}""");
            var ex = Assert.Throws<InvalidDataException>(() => GenerationOptions.FromGenerationConfig(dir.FullName));
            Assert.Contains("generation_config.json", ex.Message);
            Assert.Contains("TopP", ex.Message);
        }
        finally
        {
            dir.Delete(true);
        }
    }
}

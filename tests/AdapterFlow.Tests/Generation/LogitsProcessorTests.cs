using AdapterFlow.Generation;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Generation;

/// <summary>Logits processors on hand-made numbers, against the transformers formulas worked out by hand.</summary>
public class LogitsProcessorTests
{
    private static Tensor Row(params float[] values) => torch.tensor(values).unsqueeze(0);

    private static float[] Values(Tensor t) => t.squeeze(0).data<float>().ToArray();

    [Fact]
    public void RepetitionPenaltyDividesPositiveAndMultipliesNegativeScoresOfSeenTokens()
    {
        using var scope = torch.NewDisposeScope();
        var scores = Row(2f, -1f, 0.5f, -3f, 4f);
        // Token 1 appears twice: penalised once, not twice (transformers gathers, then scatters the same value).
        var ids = torch.tensor(new long[] { 0, 1, 1, 3 }).unsqueeze(0);
        var result = Values(new RepetitionPenaltyProcessor(2.0).Process(scores, ids, 0));
        Assert.Equal(new[] { 1f, -2f, 0.5f, -6f, 4f }, result);
    }

    [Fact]
    public void RepetitionPenaltyWorksPerRow()
    {
        using var scope = torch.NewDisposeScope();
        var scores = torch.tensor(new float[] { 3f, 3f, -3f, 3f, 3f, -3f }, [2, 3]);
        var ids = torch.tensor(new long[] { 0, 2, 1, 1 }, [2, 2]);
        var result = new RepetitionPenaltyProcessor(1.5).Process(scores, ids, 0).data<float>().ToArray();
        Assert.Equal(new[] { 2f, 3f, -4.5f, 3f, 2f, -3f }, result);
    }

    [Fact]
    public void TopKKeepsTheKHighestScoresAndTies()
    {
        using var scope = torch.NewDisposeScope();
        var scores = Row(1f, 5f, 3f, 3f, -2f);
        var k2 = Values(new TopKProcessor(2).Process(scores.clone(), scores, 0));
        Assert.Equal(new[] { float.NegativeInfinity, 5f, 3f, 3f, float.NegativeInfinity }, k2); // tie with the 2nd kept
        var k1 = Values(new TopKProcessor(1).Process(scores.clone(), scores, 0));
        Assert.Equal(new[] { float.NegativeInfinity, 5f, float.NegativeInfinity, float.NegativeInfinity, float.NegativeInfinity }, k1);
        var kBig = Values(new TopKProcessor(50).Process(scores.clone(), scores, 0));
        Assert.Equal(new[] { 1f, 5f, 3f, 3f, -2f }, kBig);
    }

    [Fact]
    public void TopPKeepsTheSmallestSetReachingP()
    {
        using var scope = torch.NewDisposeScope();
        // Probabilities 0.5, 0.3, 0.15, 0.05 (given as log-probabilities).
        var probs = new[] { 0.15f, 0.5f, 0.05f, 0.3f };
        var scores = Row(probs.Select(p => MathF.Log(p)).ToArray());
        float NegInf = float.NegativeInfinity;

        // p = 0.7: 0.5 alone is not enough, 0.5 + 0.3 = 0.8 is → keep tokens 1 and 3.
        var kept = Values(new TopPProcessor(0.7).Process(scores.clone(), scores, 0));
        Assert.Equal(new[] { NegInf, MathF.Log(0.5f), NegInf, MathF.Log(0.3f) }, kept);

        // p = 0.78: reached by {0.5, 0.3} → still those two.
        kept = Values(new TopPProcessor(0.78).Process(scores.clone(), scores, 0));
        Assert.True(float.IsNegativeInfinity(kept[0]) && float.IsNegativeInfinity(kept[2]));
        Assert.False(float.IsNegativeInfinity(kept[1]) || float.IsNegativeInfinity(kept[3]));

        // p = 0.9: needs 0.15 too.
        kept = Values(new TopPProcessor(0.9).Process(scores.clone(), scores, 0));
        Assert.Equal(new[] { false, false, true, false }, kept.Select(float.IsNegativeInfinity).ToArray());

        // Tiny p: the single most likely token survives.
        kept = Values(new TopPProcessor(0.01).Process(scores.clone(), scores, 0));
        Assert.Equal(new[] { true, false, true, true }, kept.Select(float.IsNegativeInfinity).ToArray());

        // p = 1 keeps everything.
        kept = Values(new TopPProcessor(1.0).Process(scores.clone(), scores, 0));
        Assert.DoesNotContain(kept, float.IsNegativeInfinity);
    }

    [Fact]
    public void MinPDropsTokensBelowAFractionOfTheTopProbability()
    {
        using var scope = torch.NewDisposeScope();
        var probs = new[] { 0.5f, 0.3f, 0.15f, 0.05f };
        var scores = Row(probs.Select(p => MathF.Log(p)).ToArray());
        var kept = Values(new MinPProcessor(0.2).Process(scores.clone(), scores, 0)); // threshold 0.1
        Assert.Equal(new[] { false, false, false, true }, kept.Select(float.IsNegativeInfinity).ToArray());
    }

    [Fact]
    public void TemperatureDividesScores()
    {
        using var scope = torch.NewDisposeScope();
        var result = Values(new TemperatureProcessor(0.5).Process(Row(1f, -2f), Row(0f), 0));
        Assert.Equal(new[] { 2f, -4f }, result);
    }

    [Fact]
    public void MinNewTokensSuppressesStopTokensUntilReached()
    {
        using var scope = torch.NewDisposeScope();
        var processor = new MinNewTokensProcessor(2, [1, 3]);
        var early = Values(processor.Process(Row(1f, 2f, 3f, 4f), Row(0f), 1));
        Assert.Equal(new[] { 1f, float.NegativeInfinity, 3f, float.NegativeInfinity }, early);
        var later = Values(processor.Process(Row(1f, 2f, 3f, 4f), Row(0f), 2));
        Assert.Equal(new[] { 1f, 2f, 3f, 4f }, later);
    }

    [Fact]
    public void OptionsBuildTheTransformersOrder()
    {
        var list = LogitsProcessorList.FromOptions(new GenerationOptions
        {
            DoSample = true, Temperature = 0.7, TopK = 10, TopP = 0.9, MinP = 0.05, RepetitionPenalty = 1.2, MinNewTokens = 3,
        }, [2]);
        Assert.Equal(
            new[] { typeof(RepetitionPenaltyProcessor), typeof(MinNewTokensProcessor), typeof(TemperatureProcessor), typeof(TopKProcessor), typeof(TopPProcessor), typeof(MinPProcessor) },
            list.Processors.Select(p => p.GetType()).ToArray());
        // Greedy: sampling filters are left out, as transformers does.
        var greedy = LogitsProcessorList.FromOptions(new GenerationOptions { Temperature = 0.7, TopK = 10, RepetitionPenalty = 1.2 }, [2]);
        Assert.Equal(new[] { typeof(RepetitionPenaltyProcessor) }, greedy.Processors.Select(p => p.GetType()).ToArray());
    }

    [Fact]
    public void SeededSamplingIsReproducibleAndFollowsTheDistribution()
    {
        using var scope = torch.NewDisposeScope();
        var scores = torch.log(torch.tensor(new float[] { 0.7f, 0.2f, 0.1f })).unsqueeze(0).expand(4000, 3);
        long[] Draw(long seed)
        {
            using var selector = new SamplingSelector(seed);
            return selector.Select(scores).data<long>().ToArray();
        }
        var a = Draw(7);
        Assert.Equal(a, Draw(7));
        Assert.NotEqual(a, Draw(8));
        double share0 = a.Count(x => x == 0) / 4000.0, share2 = a.Count(x => x == 2) / 4000.0;
        Assert.InRange(share0, 0.66, 0.74);
        Assert.InRange(share2, 0.08, 0.12);
    }
}

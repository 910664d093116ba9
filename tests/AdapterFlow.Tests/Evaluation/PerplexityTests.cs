using AdapterFlow.Evaluation;
using AdapterFlow.Tests.Generation;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Evaluation;

public class PerplexityTests
{
    private static int[] Ids(int n, int seed)
    {
        var random = new Random(seed);
        return Enumerable.Range(0, n).Select(_ => random.Next(ByteTokenizer.Offset, ByteTokenizer.Size)).ToArray();
    }

    /// <summary>−log p(ids[t] | ids[start..t−1]), by running the model on exactly that context; softmax done here in doubles.</summary>
    private static double TokenNll(TinyLM model, int[] ids, int start, int t)
    {
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        var input = torch.tensor(ids[start..t].Select(i => (long)i).ToArray(), [1, t - start], ScalarType.Int64);
        var logits = model.Logits(input)[0, -1].data<float>().Select(x => (double)x).ToArray();
        double max = logits.Max();
        double logSumExp = max + Math.Log(logits.Sum(x => Math.Exp(x - max)));
        return logSumExp - logits[ids[t]];
    }

    [Fact]
    public void DisjointWindowsGiveExpOfMeanNll()
    {
        using var model = new TinyLM(seed: 4);
        var ids = Ids(50, seed: 1);
        const int window = 16;
        var result = Perplexity.OfTokens(model, ids, new PerplexityOptions { MaxLength = window, Stride = window });
        // By hand: chunks [0,16) [16,32) [32,48) [48,50); inside each, token t is predicted from the chunk's tokens before it.
        double sum = 0;
        int count = 0;
        for (int begin = 0; begin < ids.Length; begin += window)
        {
            for (int t = begin + 1; t < Math.Min(begin + window, ids.Length); t++)
            {
                sum += TokenNll(model, ids, begin, t);
                count++;
            }
        }
        Assert.Equal(count, result.ScoredTokens);
        Assert.Equal(4, result.Windows);
        Assert.Equal(50, result.TotalTokens);
        Assert.Equal(sum / count, result.MeanNll, 5);
        Assert.Equal(Math.Exp(sum / count), result.Value, 1e-4 * result.Value);
    }

    [Theory]
    [InlineData(16, 4)]
    [InlineData(16, 5)]
    [InlineData(10, 1)]
    public void SlidingWindowScoresEveryTokenOnceWithItsContext(int window, int stride)
    {
        using var model = new TinyLM(seed: 6);
        var ids = Ids(41, seed: 2);
        var result = Perplexity.OfTokens(model, ids, new PerplexityOptions { MaxLength = window, Stride = stride });
        Assert.Equal(ids.Length - 1, result.ScoredTokens); // every token but the first, once
        double sum = 0;
        for (int t = 1; t < ids.Length; t++)
        {
            // Token t is scored by the first window reaching it: begin k·stride with k·stride + window > t.
            int k = t < window ? 0 : (t - window) / stride + 1;
            int start = k * stride;
            Assert.True(t - start >= Math.Min(t, window - stride), $"token {t} got only {t - start} tokens of context");
            sum += TokenNll(model, ids, start, t);
        }
        Assert.Equal(sum / (ids.Length - 1), result.MeanNll, 5);
        Assert.Equal(Perplexity.WindowCount(ids.Length, window, stride), result.Windows);
    }

    [Fact]
    public void BadSettingsAreRejected()
    {
        using var model = new TinyLM(seed: 1);
        var ids = Ids(20, seed: 3);
        Assert.Throws<ArgumentException>(() => Perplexity.OfTokens(model, ids, new PerplexityOptions { MaxLength = 8, Stride = 9 }));
        Assert.Throws<ArgumentException>(() => Perplexity.OfTokens(model, ids, new PerplexityOptions { MaxLength = 1 }));
        Assert.Throws<ArgumentException>(() => Perplexity.OfTokens(model, [5], new PerplexityOptions { MaxLength = 8 }));
        Assert.Throws<ArgumentException>(() => Perplexity.OfTokens(model, [5, 9999], new PerplexityOptions { MaxLength = 8 }));
    }
}

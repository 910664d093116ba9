using AdapterFlow.Models.Cpu;

namespace AdapterFlow.Tests.Models;

/// <summary>
/// The decode kernels' attention over the cache (<see cref="CpuKernels.Attend"/>) against a float64 reference: head
/// sizes that take the four-keys-at-a-time scores and ones that do not, a masked key, a window start, grouped KV heads,
/// and a context long enough to split heads across threads.
/// </summary>
[Collection(KernelSettingsCollection.Name)]
public class AttentionKernelTests
{
    [Theory]
    [InlineData(24, 4, 2, 37, 0, false)]  // the quickstart model's heads: 3 vectors of 8 per key
    [InlineData(24, 4, 2, 37, 9, true)]   // window start and a padding mask
    [InlineData(20, 2, 1, 13, 0, true)]   // head size not a multiple of 8: one key at a time
    [InlineData(64, 8, 8, 3, 0, false)]   // fewer keys than one group of four
    [InlineData(16, 16, 4, 900, 0, false)] // long context: heads in parallel
    public unsafe void Attend_matches_a_float64_reference(int headDim, int heads, int kvHeads, int length, int first, bool masked)
    {
        int saved = CpuKernels.Threads;
        CpuKernels.Threads = 2;
        try
        {
            var random = new Random(headDim * 1000 + length);
            const int capacity = 1024;
            float[] Fill(int n) => Enumerable.Range(0, n).Select(_ => (float)(random.NextDouble() * 2 - 1)).ToArray();
            float[] q = Fill(heads * headDim), keys = Fill(kvHeads * capacity * headDim), values = Fill(kvHeads * capacity * headDim);
            var allowed = Enumerable.Range(0, length).Select(j => (byte)(masked && j % 5 == 2 && j != length - 1 ? 0 : 1)).ToArray();
            var output = new float[heads * headDim];
            float scale = 1f / MathF.Sqrt(headDim);
            fixed (float* qp = q, kp = keys, vp = values, op = output)
            fixed (byte* ap = allowed)
                CpuKernels.Attend(qp, kp, vp, op, heads, kvHeads, headDim, capacity, first, length, masked ? ap : null, scale);

            for (int h = 0; h < heads; h++)
            {
                int kv = h / (heads / kvHeads);
                var weights = new double[length];
                double max = double.NegativeInfinity;
                for (int j = first; j < length; j++)
                {
                    if (allowed[j] == 0) { weights[j] = double.NegativeInfinity; continue; }
                    double dot = 0;
                    for (int d = 0; d < headDim; d++) dot += (double)q[h * headDim + d] * keys[((long)kv * capacity + j) * headDim + d];
                    weights[j] = dot * scale;
                    max = Math.Max(max, weights[j]);
                }
                double total = 0;
                for (int j = first; j < length; j++) total += weights[j] = double.IsNegativeInfinity(weights[j]) ? 0 : Math.Exp(weights[j] - max);
                for (int d = 0; d < headDim; d++)
                {
                    double expected = 0;
                    for (int j = first; j < length; j++) expected += weights[j] / total * values[((long)kv * capacity + j) * headDim + d];
                    Assert.True(Math.Abs(output[h * headDim + d] - expected) < 2e-6, $"head {h}, dim {d}: {output[h * headDim + d]} against {expected}");
                }
            }
        }
        finally
        {
            CpuKernels.Threads = saved;
        }
    }

    [Fact]
    public unsafe void Scores_sum_each_key_exactly_as_dot_does()
    {
        // Autoregressive steps and verification passes must score a key identically whichever way the keys are grouped.
        var random = new Random(5);
        const int headDim = 24, keys = 11;
        var q = Enumerable.Range(0, headDim).Select(_ => (float)random.NextDouble()).ToArray();
        var k = Enumerable.Range(0, headDim * keys).Select(_ => (float)random.NextDouble()).ToArray();
        var scores = new float[keys];
        fixed (float* qp = q, kp = k, sp = scores)
        {
            CpuKernels.Scores(qp, kp, sp, headDim, 0, keys, 0.5f);
            for (int j = 0; j < keys; j++) Assert.Equal(CpuKernels.Dot(qp, kp + j * headDim, headDim) * 0.5f, scores[j]);
        }
    }
}

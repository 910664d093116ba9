using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace AdapterFlow.Models.Cpu;

// Kernels for a few new tokens of one row at once (self-speculative verification, short prompt tails).
internal static unsafe partial class CpuKernels
{
    /// <summary>
    /// y[t, r] = Σ_c w[r, c] · x[t, c] (+ bias[r]) for <paramref name="tokens"/> input vectors x [tokens, cols] and a
    /// row-major [rows, cols] matrix; y is [tokens, rows]; y += … when <paramref name="accumulate"/>. Each matrix row is
    /// read from memory once for all tokens (then from L1 for each group of four), so a bandwidth-bound model pays
    /// about one token's weight traffic for the whole group: the point of verifying d drafts in one pass.
    /// </summary>
    public static void Gemm(float* w, float* x, float* y, float* bias, int rows, int cols, int tokens, bool accumulate = false)
    {
        if (tokens == 1)
        {
            Gemv(w, x, y, bias, rows, cols, accumulate);
            return;
        }
        int workers = WorkerCount;
        if (workers <= 1 || (long)rows * cols * tokens < ParallelThreshold)
        {
            GemmRows(w, x, y, bias, rows, cols, tokens, 0, rows, accumulate);
            return;
        }
        int rowBlock = Math.Max(16, (rows / (workers * 4) + 3) & ~3);
        int blocks = (rows + rowBlock - 1) / rowBlock;
        nint wp = (nint)w, xp = (nint)x, yp = (nint)y, bp = (nint)bias;
        KernelPool.For(blocks, workers, block =>
        {
            int r0 = block * rowBlock;
            GemmRows((float*)wp, (float*)xp, (float*)yp, (float*)bp, rows, cols, tokens, r0, Math.Min(rows, r0 + rowBlock), accumulate);
        });
    }

    internal static void GemmRows(float* w, float* x, float* y, float* bias, int rows, int cols, int tokens, int r0, int r1, bool accumulate)
    {
        // With AVX-512 (Zen 4/5, recent Xeons) and more than Max256BitTokens tokens: 512-bit multiply-adds over one row at
        // a time for groups of up to four tokens, with a software prefetch a few KB ahead in the row stream (on 11-24,
        // one-token pass 9.1 ms: 3 and 4 tokens 1.07 and 1.11 of it with the prefetch, 1.37 and 1.44 without). Fewer
        // tokens take the 256-bit kernels below in pairs, whatever the width, which measured faster for them on later days
        // (see Max256BitTokens); without AVX-512 those kernels keep their blocks of four.
        bool pairsOnly = Vector512.IsHardwareAccelerated && tokens <= Max256BitTokens;
        if (Vector512.IsHardwareAccelerated && (cols & 31) == 0 && !pairsOnly)
        {
            int ahead = PrefetchFloats;
            for (int r = r0; r < r1; r++)
            {
                float* wr = w + (long)r * cols;
                int t = 0;
                for (; t + 4 <= tokens; t += 4) RowFourTokens512(wr, x + (long)t * cols, y + (long)t * rows, bias, rows, cols, r, accumulate, ahead);
                if (tokens - t == 3)
                {
                    RowThreeTokens512(wr, x + (long)t * cols, y + (long)t * rows, bias, rows, cols, r, accumulate, ahead);
                    t += 3;
                }
                else if (tokens - t == 2)
                {
                    RowTwoTokens512(wr, x + (long)t * cols, y + (long)t * rows, bias, rows, cols, r, accumulate, ahead);
                    t += 2;
                }
                if (t < tokens) Store(y + (long)t * rows, bias, r, Dot512(wr, x + (long)t * cols, cols, ahead), accumulate);
            }
            return;
        }
        for (int r = r0; r < r1; r++)
        {
            float* wr = w + (long)r * cols;
            int t = 0;
            if (Vector256.IsHardwareAccelerated)
            {
                // Four tokens per pass over the row, two accumulators each: eight independent FMA chains, one load of
                // the weights per four multiply-adds.
                for (; t + 4 <= tokens && !pairsOnly; t += 4)
                {
                    float* x0 = x + (long)t * cols, x1 = x0 + cols, x2 = x1 + cols, x3 = x2 + cols;
                    var a0 = Vector256<float>.Zero; var a1 = Vector256<float>.Zero; var a2 = Vector256<float>.Zero; var a3 = Vector256<float>.Zero;
                    var b0 = Vector256<float>.Zero; var b1 = Vector256<float>.Zero; var b2 = Vector256<float>.Zero; var b3 = Vector256<float>.Zero;
                    int c = 0;
                    for (; c + 16 <= cols; c += 16)
                    {
                        var wa = Vector256.Load(wr + c);
                        var wb = Vector256.Load(wr + c + 8);
                        a0 = Vector256.FusedMultiplyAdd(wa, Vector256.Load(x0 + c), a0);
                        a1 = Vector256.FusedMultiplyAdd(wa, Vector256.Load(x1 + c), a1);
                        a2 = Vector256.FusedMultiplyAdd(wa, Vector256.Load(x2 + c), a2);
                        a3 = Vector256.FusedMultiplyAdd(wa, Vector256.Load(x3 + c), a3);
                        b0 = Vector256.FusedMultiplyAdd(wb, Vector256.Load(x0 + c + 8), b0);
                        b1 = Vector256.FusedMultiplyAdd(wb, Vector256.Load(x1 + c + 8), b1);
                        b2 = Vector256.FusedMultiplyAdd(wb, Vector256.Load(x2 + c + 8), b2);
                        b3 = Vector256.FusedMultiplyAdd(wb, Vector256.Load(x3 + c + 8), b3);
                    }
                    for (; c + 8 <= cols; c += 8)
                    {
                        var wa = Vector256.Load(wr + c);
                        a0 = Vector256.FusedMultiplyAdd(wa, Vector256.Load(x0 + c), a0);
                        a1 = Vector256.FusedMultiplyAdd(wa, Vector256.Load(x1 + c), a1);
                        a2 = Vector256.FusedMultiplyAdd(wa, Vector256.Load(x2 + c), a2);
                        a3 = Vector256.FusedMultiplyAdd(wa, Vector256.Load(x3 + c), a3);
                    }
                    float s0 = Vector256.Sum(a0 + b0), s1 = Vector256.Sum(a1 + b1), s2 = Vector256.Sum(a2 + b2), s3 = Vector256.Sum(a3 + b3);
                    for (; c < cols; c++)
                    {
                        float wc = wr[c];
                        s0 += wc * x0[c]; s1 += wc * x1[c]; s2 += wc * x2[c]; s3 += wc * x3[c];
                    }
                    Store(y + (long)t * rows, bias, r, s0, accumulate);
                    Store(y + (long)(t + 1) * rows, bias, r, s1, accumulate);
                    Store(y + (long)(t + 2) * rows, bias, r, s2, accumulate);
                    Store(y + (long)(t + 3) * rows, bias, r, s3, accumulate);
                }
                // The remainder (d + 1 = 5 or 6 verified positions is common): two tokens, then one, still with four chains.
                for (; t + 2 <= tokens; t += 2)
                {
                    float* x0 = x + (long)t * cols, x1 = x0 + cols;
                    var a0 = Vector256<float>.Zero; var a1 = Vector256<float>.Zero; var b0 = Vector256<float>.Zero; var b1 = Vector256<float>.Zero;
                    int c = 0;
                    for (; c + 16 <= cols; c += 16)
                    {
                        var wa = Vector256.Load(wr + c);
                        var wb = Vector256.Load(wr + c + 8);
                        a0 = Vector256.FusedMultiplyAdd(wa, Vector256.Load(x0 + c), a0);
                        a1 = Vector256.FusedMultiplyAdd(wa, Vector256.Load(x1 + c), a1);
                        b0 = Vector256.FusedMultiplyAdd(wb, Vector256.Load(x0 + c + 8), b0);
                        b1 = Vector256.FusedMultiplyAdd(wb, Vector256.Load(x1 + c + 8), b1);
                    }
                    for (; c + 8 <= cols; c += 8)
                    {
                        var wa = Vector256.Load(wr + c);
                        a0 = Vector256.FusedMultiplyAdd(wa, Vector256.Load(x0 + c), a0);
                        a1 = Vector256.FusedMultiplyAdd(wa, Vector256.Load(x1 + c), a1);
                    }
                    float s0 = Vector256.Sum(a0 + b0), s1 = Vector256.Sum(a1 + b1);
                    for (; c < cols; c++)
                    {
                        s0 += wr[c] * x0[c];
                        s1 += wr[c] * x1[c];
                    }
                    Store(y + (long)t * rows, bias, r, s0, accumulate);
                    Store(y + (long)(t + 1) * rows, bias, r, s1, accumulate);
                }
                if (t < tokens)
                {
                    float* x0 = x + (long)t * cols;
                    var a0 = Vector256<float>.Zero; var a1 = Vector256<float>.Zero; var a2 = Vector256<float>.Zero; var a3 = Vector256<float>.Zero;
                    int c = 0;
                    for (; c + 32 <= cols; c += 32)
                    {
                        a0 = Vector256.FusedMultiplyAdd(Vector256.Load(wr + c), Vector256.Load(x0 + c), a0);
                        a1 = Vector256.FusedMultiplyAdd(Vector256.Load(wr + c + 8), Vector256.Load(x0 + c + 8), a1);
                        a2 = Vector256.FusedMultiplyAdd(Vector256.Load(wr + c + 16), Vector256.Load(x0 + c + 16), a2);
                        a3 = Vector256.FusedMultiplyAdd(Vector256.Load(wr + c + 24), Vector256.Load(x0 + c + 24), a3);
                    }
                    for (; c + 8 <= cols; c += 8) a0 = Vector256.FusedMultiplyAdd(Vector256.Load(wr + c), Vector256.Load(x0 + c), a0);
                    float s0 = Vector256.Sum((a0 + a1) + (a2 + a3));
                    for (; c < cols; c++) s0 += wr[c] * x0[c];
                    Store(y + (long)t * rows, bias, r, s0, accumulate);
                    t++;
                }
            }
            for (; t < tokens; t++) Store(y + (long)t * rows, bias, r, Dot(wr, x + (long)t * cols, cols), accumulate);
        }
    }

    /// <summary>
    /// Up to this many tokens take the 256-bit kernels in pairs (then one) even where AVX-512 is accelerated; more take
    /// the 512-bit ones. Measured with the bench suite <c>gemmtokens</c> (Zen 4, 2 cores, one-token pass 11.7 ms): 2, 3, 4
    /// and 5 tokens over all weights of the 109.5M model cost 0.96, 1.27, 1.32 and 1.50 one-token passes in 256-bit pairs
    /// against 1.20, 2.03, 1.90 and 1.74 on the 512-bit kernels; from 6 tokens the 512-bit ones are ahead (2.13 against
    /// 2.11–2.83; the token vectors of the 2048-wide down projection then no longer fit in L1 beside the weights).
    /// The suite varies it.
    /// </summary>
    internal static int Max256BitTokens { get; set; } = 5;

    /// <summary>
    /// How many floats ahead in the weight stream the 512-bit token kernels prefetch; 0 = none. 4 KB measured best of
    /// 0/2/4/8 KB on a Zen 5 (bench suite <c>gemmtokens</c>, which sets it).
    /// </summary>
    internal static int PrefetchFloats { get; set; } = 1024;

    /// <summary>Row <paramref name="r"/> times four token vectors (cols a multiple of 32), 512 bits wide, into y [4, rows].</summary>
    private static void RowFourTokens512(float* wr, float* x0, float* y, float* bias, int rows, int cols, int r, bool accumulate, int ahead)
    {
        float* x1 = x0 + cols, x2 = x1 + cols, x3 = x2 + cols;
        var a0 = Vector512<float>.Zero; var a1 = Vector512<float>.Zero; var a2 = Vector512<float>.Zero; var a3 = Vector512<float>.Zero;
        var b0 = Vector512<float>.Zero; var b1 = Vector512<float>.Zero; var b2 = Vector512<float>.Zero; var b3 = Vector512<float>.Zero;
        for (int c = 0; c < cols; c += 32)
        {
            if (ahead > 0) Prefetch(wr + c + ahead);
            var wa = Vector512.Load(wr + c);
            var wb = Vector512.Load(wr + c + 16);
            a0 = Vector512.FusedMultiplyAdd(wa, Vector512.Load(x0 + c), a0);
            a1 = Vector512.FusedMultiplyAdd(wa, Vector512.Load(x1 + c), a1);
            a2 = Vector512.FusedMultiplyAdd(wa, Vector512.Load(x2 + c), a2);
            a3 = Vector512.FusedMultiplyAdd(wa, Vector512.Load(x3 + c), a3);
            b0 = Vector512.FusedMultiplyAdd(wb, Vector512.Load(x0 + c + 16), b0);
            b1 = Vector512.FusedMultiplyAdd(wb, Vector512.Load(x1 + c + 16), b1);
            b2 = Vector512.FusedMultiplyAdd(wb, Vector512.Load(x2 + c + 16), b2);
            b3 = Vector512.FusedMultiplyAdd(wb, Vector512.Load(x3 + c + 16), b3);
        }
        Store(y, bias, r, Vector512.Sum(a0 + b0), accumulate);
        Store(y + rows, bias, r, Vector512.Sum(a1 + b1), accumulate);
        Store(y + 2L * rows, bias, r, Vector512.Sum(a2 + b2), accumulate);
        Store(y + 3L * rows, bias, r, Vector512.Sum(a3 + b3), accumulate);
    }

    /// <summary>Row <paramref name="r"/> times three token vectors (cols a multiple of 32), 512 bits wide, into y [3, rows].</summary>
    private static void RowThreeTokens512(float* wr, float* x0, float* y, float* bias, int rows, int cols, int r, bool accumulate, int ahead)
    {
        float* x1 = x0 + cols, x2 = x1 + cols;
        var a0 = Vector512<float>.Zero; var a1 = Vector512<float>.Zero; var a2 = Vector512<float>.Zero;
        var b0 = Vector512<float>.Zero; var b1 = Vector512<float>.Zero; var b2 = Vector512<float>.Zero;
        for (int c = 0; c < cols; c += 32)
        {
            if (ahead > 0) Prefetch(wr + c + ahead);
            var wa = Vector512.Load(wr + c);
            var wb = Vector512.Load(wr + c + 16);
            a0 = Vector512.FusedMultiplyAdd(wa, Vector512.Load(x0 + c), a0);
            a1 = Vector512.FusedMultiplyAdd(wa, Vector512.Load(x1 + c), a1);
            a2 = Vector512.FusedMultiplyAdd(wa, Vector512.Load(x2 + c), a2);
            b0 = Vector512.FusedMultiplyAdd(wb, Vector512.Load(x0 + c + 16), b0);
            b1 = Vector512.FusedMultiplyAdd(wb, Vector512.Load(x1 + c + 16), b1);
            b2 = Vector512.FusedMultiplyAdd(wb, Vector512.Load(x2 + c + 16), b2);
        }
        Store(y, bias, r, Vector512.Sum(a0 + b0), accumulate);
        Store(y + rows, bias, r, Vector512.Sum(a1 + b1), accumulate);
        Store(y + 2L * rows, bias, r, Vector512.Sum(a2 + b2), accumulate);
    }

    /// <summary>Row <paramref name="r"/> times two token vectors (cols a multiple of 32), 512 bits wide, into y [2, rows].</summary>
    private static void RowTwoTokens512(float* wr, float* x0, float* y, float* bias, int rows, int cols, int r, bool accumulate, int ahead)
    {
        float* x1 = x0 + cols;
        var a0 = Vector512<float>.Zero; var a1 = Vector512<float>.Zero; var b0 = Vector512<float>.Zero; var b1 = Vector512<float>.Zero;
        for (int c = 0; c < cols; c += 32)
        {
            if (ahead > 0) Prefetch(wr + c + ahead);
            var wa = Vector512.Load(wr + c);
            var wb = Vector512.Load(wr + c + 16);
            a0 = Vector512.FusedMultiplyAdd(wa, Vector512.Load(x0 + c), a0);
            a1 = Vector512.FusedMultiplyAdd(wa, Vector512.Load(x1 + c), a1);
            b0 = Vector512.FusedMultiplyAdd(wb, Vector512.Load(x0 + c + 16), b0);
            b1 = Vector512.FusedMultiplyAdd(wb, Vector512.Load(x1 + c + 16), b1);
        }
        Store(y, bias, r, Vector512.Sum(a0 + b0), accumulate);
        Store(y + rows, bias, r, Vector512.Sum(a1 + b1), accumulate);
    }

    /// <summary>Σ a[i] · b[i] for n a multiple of 32, 512 bits wide with two chains (prefetching ahead in a).</summary>
    private static float Dot512(float* a, float* b, int n, int ahead)
    {
        var s0 = Vector512<float>.Zero; var s1 = Vector512<float>.Zero;
        for (int i = 0; i < n; i += 32)
        {
            if (ahead > 0) Prefetch(a + i + ahead);
            s0 = Vector512.FusedMultiplyAdd(Vector512.Load(a + i), Vector512.Load(b + i), s0);
            s1 = Vector512.FusedMultiplyAdd(Vector512.Load(a + i + 16), Vector512.Load(b + i + 16), s1);
        }
        return Vector512.Sum(s0 + s1);
    }

    /// <summary>Prefetches the two cache lines at <paramref name="p"/> (a hint: never faults, even past the end of the matrix).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Prefetch(float* p)
    {
        if (Sse.IsSupported)
        {
            Sse.Prefetch0(p);
            Sse.Prefetch0(p + 16);
        }
    }
}

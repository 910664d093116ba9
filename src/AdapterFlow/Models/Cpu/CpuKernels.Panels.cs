using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace AdapterFlow.Models.Cpu;

// Products of a few token vectors with a matrix packed in panels (PanelMatrix): self-speculative verification.
internal static unsafe partial class CpuKernels
{
    /// <summary>Tokens per sweep over a panel: 2 × 5 accumulators, 2 weight vectors and 5 broadcasts fit the 32 vector registers.</summary>
    private const int PanelTokens = 5;

    /// <summary>
    /// Rows [r0, r1) of y [tokens, rows] = x [tokens, cols] · wᵀ (+ bias; y += … when <paramref name="accumulate"/>) for
    /// a matrix with a panel copy: whole panels inside the range through the panels, other rows (a range not aligned to
    /// 32, the rows past the last panel) through <see cref="GemmRows"/> on the row-major source.
    /// </summary>
    public static void PanelRows(PanelMatrix m, float* x, float* y, float* bias, int tokens, int r0, int r1, bool accumulate)
    {
        int rows = m.Rows, cols = m.Cols;
        int p0 = (r0 + PanelMatrix.Width - 1) / PanelMatrix.Width, p1 = Math.Min(r1, m.PackedRows) / PanelMatrix.Width;
        if (p0 >= p1)
        {
            GemmRows(m.Source, x, y, bias, rows, cols, tokens, r0, r1, accumulate);
            return;
        }
        int a = p0 * PanelMatrix.Width, b = p1 * PanelMatrix.Width;
        if (r0 < a) GemmRows(m.Source, x, y, bias, rows, cols, tokens, r0, a, accumulate);
        for (int p = p0; p < p1; p++)
            for (int t = 0; t < tokens; t += PanelTokens)
                Panel(m.Data + (long)p * PanelMatrix.Width * cols, x + (long)t * cols, y + (long)t * rows + p * PanelMatrix.Width,
                    bias == null ? null : bias + p * PanelMatrix.Width, rows, cols, Math.Min(PanelTokens, tokens - t), accumulate);
        if (b < r1) GemmRows(m.Source, x, y, bias, rows, cols, tokens, b, r1, accumulate);
    }

    /// <summary>y [tokens, rows] = x · wᵀ over a whole packed matrix, the panels split across the kernel workers.</summary>
    public static void PanelGemm(PanelMatrix m, float* x, float* y, float* bias, int tokens, bool accumulate = false)
    {
        int workers = WorkerCount, rows = m.Rows;
        if (workers <= 1 || (long)rows * m.Cols * tokens < ParallelThreshold)
        {
            PanelRows(m, x, y, bias, tokens, 0, rows, accumulate);
            return;
        }
        // Blocks of whole panels, a few per worker so a core busy elsewhere is rebalanced.
        int panelBlock = Math.Max(1, rows / PanelMatrix.Width / (workers * 4));
        int rowBlock = panelBlock * PanelMatrix.Width;
        int blocks = (rows + rowBlock - 1) / rowBlock;
        nint xp = (nint)x, yp = (nint)y, bp = (nint)bias;
        KernelPool.For(blocks, workers, block =>
        {
            int r0 = block * rowBlock;
            PanelRows(m, (float*)xp, (float*)yp, (float*)bp, tokens, r0, Math.Min(rows, r0 + rowBlock), accumulate);
        });
    }

    /// <summary>
    /// One panel (32 rows, column-major) times 1–5 token vectors into y [n, rows] at the panel's first row. Each column
    /// is one 128-byte line: two weight vectors, each multiplied by every token's broadcast input value.
    /// </summary>
    private static void Panel(float* w, float* x, float* y, float* bias, int rows, int cols, int n, bool accumulate)
    {
        var a0 = Vector512<float>.Zero; var a1 = Vector512<float>.Zero; var a2 = Vector512<float>.Zero; var a3 = Vector512<float>.Zero; var a4 = Vector512<float>.Zero;
        var b0 = Vector512<float>.Zero; var b1 = Vector512<float>.Zero; var b2 = Vector512<float>.Zero; var b3 = Vector512<float>.Zero; var b4 = Vector512<float>.Zero;
        float* x0 = x, x1 = x0 + cols, x2 = x1 + cols, x3 = x2 + cols, x4 = x3 + cols;
        const int W = PanelMatrix.Width;
        // One loop per token count, written out: the JIT keeps accumulators in registers only as separate locals (not
        // in an array or span), and a loop over all five with idle ones would spend their multiply-adds.
        switch (n)
        {
            case 1:
            {
                // Two columns per iteration into separate accumulators: one token alone would be one dependent chain.
                var c0 = Vector512<float>.Zero; var c1 = Vector512<float>.Zero;
                int c = 0;
                for (; c + 2 <= cols; c += 2)
                {
                    float* wc = w + (long)c * W;
                    var s0 = Vector512.Create(x0[c]); var s1 = Vector512.Create(x0[c + 1]);
                    a0 = Vector512.FusedMultiplyAdd(Vector512.Load(wc), s0, a0);
                    b0 = Vector512.FusedMultiplyAdd(Vector512.Load(wc + 16), s0, b0);
                    c0 = Vector512.FusedMultiplyAdd(Vector512.Load(wc + W), s1, c0);
                    c1 = Vector512.FusedMultiplyAdd(Vector512.Load(wc + W + 16), s1, c1);
                }
                if (c < cols)
                {
                    var s0 = Vector512.Create(x0[c]);
                    a0 = Vector512.FusedMultiplyAdd(Vector512.Load(w + (long)c * W), s0, a0);
                    b0 = Vector512.FusedMultiplyAdd(Vector512.Load(w + (long)c * W + 16), s0, b0);
                }
                a0 += c0;
                b0 += c1;
                break;
            }
            case 2:
                for (int c = 0; c < cols; c++)
                {
                    float* wc = w + (long)c * W;
                    var wa = Vector512.Load(wc); var wb = Vector512.Load(wc + 16);
                    var s0 = Vector512.Create(x0[c]); var s1 = Vector512.Create(x1[c]);
                    a0 = Vector512.FusedMultiplyAdd(wa, s0, a0); b0 = Vector512.FusedMultiplyAdd(wb, s0, b0);
                    a1 = Vector512.FusedMultiplyAdd(wa, s1, a1); b1 = Vector512.FusedMultiplyAdd(wb, s1, b1);
                }
                break;
            case 3:
                for (int c = 0; c < cols; c++)
                {
                    float* wc = w + (long)c * W;
                    var wa = Vector512.Load(wc); var wb = Vector512.Load(wc + 16);
                    var s0 = Vector512.Create(x0[c]); var s1 = Vector512.Create(x1[c]); var s2 = Vector512.Create(x2[c]);
                    a0 = Vector512.FusedMultiplyAdd(wa, s0, a0); b0 = Vector512.FusedMultiplyAdd(wb, s0, b0);
                    a1 = Vector512.FusedMultiplyAdd(wa, s1, a1); b1 = Vector512.FusedMultiplyAdd(wb, s1, b1);
                    a2 = Vector512.FusedMultiplyAdd(wa, s2, a2); b2 = Vector512.FusedMultiplyAdd(wb, s2, b2);
                }
                break;
            case 4:
                for (int c = 0; c < cols; c++)
                {
                    float* wc = w + (long)c * W;
                    var wa = Vector512.Load(wc); var wb = Vector512.Load(wc + 16);
                    var s0 = Vector512.Create(x0[c]); var s1 = Vector512.Create(x1[c]); var s2 = Vector512.Create(x2[c]); var s3 = Vector512.Create(x3[c]);
                    a0 = Vector512.FusedMultiplyAdd(wa, s0, a0); b0 = Vector512.FusedMultiplyAdd(wb, s0, b0);
                    a1 = Vector512.FusedMultiplyAdd(wa, s1, a1); b1 = Vector512.FusedMultiplyAdd(wb, s1, b1);
                    a2 = Vector512.FusedMultiplyAdd(wa, s2, a2); b2 = Vector512.FusedMultiplyAdd(wb, s2, b2);
                    a3 = Vector512.FusedMultiplyAdd(wa, s3, a3); b3 = Vector512.FusedMultiplyAdd(wb, s3, b3);
                }
                break;
            default:
                for (int c = 0; c < cols; c++)
                {
                    float* wc = w + (long)c * W;
                    var wa = Vector512.Load(wc); var wb = Vector512.Load(wc + 16);
                    var s0 = Vector512.Create(x0[c]); var s1 = Vector512.Create(x1[c]); var s2 = Vector512.Create(x2[c]);
                    var s3 = Vector512.Create(x3[c]); var s4 = Vector512.Create(x4[c]);
                    a0 = Vector512.FusedMultiplyAdd(wa, s0, a0); b0 = Vector512.FusedMultiplyAdd(wb, s0, b0);
                    a1 = Vector512.FusedMultiplyAdd(wa, s1, a1); b1 = Vector512.FusedMultiplyAdd(wb, s1, b1);
                    a2 = Vector512.FusedMultiplyAdd(wa, s2, a2); b2 = Vector512.FusedMultiplyAdd(wb, s2, b2);
                    a3 = Vector512.FusedMultiplyAdd(wa, s3, a3); b3 = Vector512.FusedMultiplyAdd(wb, s3, b3);
                    a4 = Vector512.FusedMultiplyAdd(wa, s4, a4); b4 = Vector512.FusedMultiplyAdd(wb, s4, b4);
                }
                break;
        }
        StorePanel(y, bias, a0, b0, accumulate);
        if (n > 1) StorePanel(y + rows, bias, a1, b1, accumulate);
        if (n > 2) StorePanel(y + 2L * rows, bias, a2, b2, accumulate);
        if (n > 3) StorePanel(y + 3L * rows, bias, a3, b3, accumulate);
        if (n > 4) StorePanel(y + 4L * rows, bias, a4, b4, accumulate);
    }

    /// <summary>32 outputs of one token: (+ bias), then written or added to y, as <see cref="Store"/> does per row.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StorePanel(float* y, float* bias, Vector512<float> a, Vector512<float> b, bool accumulate)
    {
        if (bias != null)
        {
            a += Vector512.Load(bias);
            b += Vector512.Load(bias + 16);
        }
        if (accumulate)
        {
            a += Vector512.Load(y);
            b += Vector512.Load(y + 16);
        }
        a.Store(y);
        b.Store(y + 16);
    }
}

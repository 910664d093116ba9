using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Models.Cpu;

/// <summary>
/// Float32 kernels for batch-1 decoding on the CPU, over raw tensor memory. Hand-written because a decode step is
/// a chain of matrix-vector products and tiny vector operations: through libtorch each costs a P/Invoke, a tensor
/// handle and a dispose-scope entry (10–15 µs, ~600 per token for a 12-layer model), and libtorch's batch-1
/// <c>linear</c> reads a large matrix at well under the memory bandwidth. Here the matrix-vector product streams
/// four rows at a time with 256-bit fused multiply-adds, split across the cores; everything else is a plain loop.
/// Results differ from libtorch's only by summation order (about 1e-6 relative).
/// </summary>
internal static unsafe partial class CpuKernels
{
    /// <summary>Rows per parallel work item of a matrix-vector product: big enough to amortise scheduling, small enough to balance.</summary>
    private const int RowBlock = 64;

    /// <summary>Below this many multiply-adds a matrix-vector product runs on the calling thread only.</summary>
    internal const long ParallelThreshold = 1 << 16;

    /// <summary>The float32 memory of a contiguous CPU tensor (the caller has checked dtype, device and layout).</summary>
    public static float* Pointer(Tensor t) => (float*)Unsafe.AsPointer(ref MemoryMarshal.GetReference(t.bytes));

    /// <summary>Workers used for the parallel kernels; 0 = torch's intra-op thread count.</summary>
    public static int Threads { get; set; }

    internal static int WorkerCount => PassWorkers > 0 ? PassWorkers : Threads > 0 ? Threads : Math.Max(1, torch.get_num_threads());

    /// <summary>The thread count a host pass fixed for its kernels on this thread (0 = none): asking torch is a native call, ~25 per layer.</summary>
    [ThreadStatic] internal static int PassWorkers;

    /// <summary>y[r] = Σ_c w[r, c] · x[c] (+ bias[r]) for a row-major [rows, cols] matrix; y += … when <paramref name="accumulate"/>.</summary>
    public static void Gemv(float* w, float* x, float* y, float* bias, int rows, int cols, bool accumulate = false)
    {
        nint wp = (nint)w, xp = (nint)x, yp = (nint)y, bp = (nint)bias;
        RowBlocks(rows, cols, (r0, r1) => GemvRows((float*)wp, (float*)xp, (float*)yp, (float*)bp, cols, r0, r1, accumulate));
    }

    /// <summary>
    /// Runs <paramref name="body"/>(r0, r1) over rows [0, rows) of a product with <paramref name="cols"/> columns: on the
    /// calling thread below <see cref="ParallelThreshold"/>, else as a few blocks per worker on the kernel pool (enough
    /// to rebalance when a core is busy elsewhere, few enough to keep scheduling cheap).
    /// </summary>
    private static void RowBlocks(int rows, int cols, Action<int, int> body)
    {
        int workers = WorkerCount;
        if (workers <= 1 || (long)rows * cols < ParallelThreshold)
        {
            body(0, rows);
            return;
        }
        int rowBlock = Math.Max(RowBlock, (rows / (workers * 4) + 3) & ~3);
        int blocks = (rows + rowBlock - 1) / rowBlock;
        KernelPool.For(blocks, workers, block =>
        {
            int r0 = block * rowBlock;
            body(r0, Math.Min(rows, r0 + rowBlock));
        });
    }

    internal static void GemvRows(float* w, float* x, float* y, float* bias, int cols, int r0, int r1, bool accumulate)
    {
        // One row at a time with four independent accumulators: the matrix is read as one sequential stream, which
        // the hardware prefetcher follows best (measured: about 1.6× the bandwidth of interleaving 2 or 4 rows).
        int r = r0;
        if (Vector256.IsHardwareAccelerated)
        {
            for (; r < r1; r++)
            {
                float* w0 = w + (long)r * cols;
                var a0 = Vector256<float>.Zero; var a1 = Vector256<float>.Zero; var a2 = Vector256<float>.Zero; var a3 = Vector256<float>.Zero;
                int c = 0;
                for (; c + 32 <= cols; c += 32)
                {
                    a0 = Vector256.FusedMultiplyAdd(Vector256.Load(w0 + c), Vector256.Load(x + c), a0);
                    a1 = Vector256.FusedMultiplyAdd(Vector256.Load(w0 + c + 8), Vector256.Load(x + c + 8), a1);
                    a2 = Vector256.FusedMultiplyAdd(Vector256.Load(w0 + c + 16), Vector256.Load(x + c + 16), a2);
                    a3 = Vector256.FusedMultiplyAdd(Vector256.Load(w0 + c + 24), Vector256.Load(x + c + 24), a3);
                }
                for (; c + 8 <= cols; c += 8) a0 = Vector256.FusedMultiplyAdd(Vector256.Load(w0 + c), Vector256.Load(x + c), a0);
                float s0 = Vector256.Sum((a0 + a1) + (a2 + a3));
                for (; c < cols; c++) s0 += w0[c] * x[c];
                Store(y, bias, r, s0, accumulate);
            }
        }
        for (; r < r1; r++) Store(y, bias, r, Dot(w + (long)r * cols, x, cols), accumulate);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Store(float* y, float* bias, int r, float sum, bool accumulate)
    {
        if (bias != null) sum += bias[r];
        y[r] = accumulate ? y[r] + sum : sum;
    }

    /// <summary>Σ a[i] · b[i].</summary>
    public static float Dot(float* a, float* b, int n)
    {
        int i = 0;
        float sum = 0;
        if (Vector256.IsHardwareAccelerated && n >= 8)
        {
            var acc = Vector256<float>.Zero;
            for (; i + 8 <= n; i += 8) acc = Vector256.FusedMultiplyAdd(Vector256.Load(a + i), Vector256.Load(b + i), acc);
            sum = Vector256.Sum(acc);
        }
        for (; i < n; i++) sum += a[i] * b[i];
        return sum;
    }

    /// <summary>y = weight ⊙ (x · rsqrt(mean(x²) + eps)), as Llama's RMSNorm computes it in float32.</summary>
    public static void RmsNorm(float* x, float* weight, float* y, int n, double eps)
    {
        double squares = 0;
        for (int i = 0; i < n; i++) squares += (double)x[i] * x[i];
        float inv = 1f / MathF.Sqrt((float)(squares / n) + (float)eps);
        for (int i = 0; i < n; i++) y[i] = weight[i] * (x[i] * inv);
    }

    /// <summary>x += y.</summary>
    public static void Add(float* x, float* y, int n)
    {
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
            for (; i + 8 <= n; i += 8) (Vector256.Load(x + i) + Vector256.Load(y + i)).Store(x + i);
        for (; i < n; i++) x[i] += y[i];
    }

    /// <summary>gate = silu(gate) · up.</summary>
    public static void SiluMul(float* gate, float* up, int n)
    {
        for (int i = 0; i < n; i++)
        {
            float g = gate[i];
            gate[i] = g / (1f + MathF.Exp(-g)) * up[i];
        }
    }

    /// <summary>
    /// Rotate-half rotary embedding in place on <paramref name="heads"/> consecutive heads of <paramref name="headDim"/>
    /// values, over the first 2·half dims of each head: (x1, x2) → (x1·cos − x2·sin, x2·cos + x1·sin).
    /// </summary>
    public static void RotateHalf(float* x, int heads, int headDim, float* cos, float* sin, int half)
    {
        for (int h = 0; h < heads; h++)
        {
            float* v = x + h * headDim;
            for (int i = 0; i < half; i++)
            {
                float x1 = v[i], x2 = v[i + half];
                v[i] = x1 * cos[i] + -x2 * sin[i];
                v[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
            }
        }
    }

    /// <summary>
    /// One query per head against a layer's cached keys/values ([kvHeads, capacity, headDim] storage, the first
    /// <paramref name="length"/> positions valid): softmax(q·kᵀ · scale) · v with keys in [<paramref name="first"/>,
    /// length) that <paramref name="keyAllowed"/> (if given, one byte per key) lets through. Query head h reads KV
    /// head h / (heads / kvHeads). Heads run in parallel once the context is long.
    /// </summary>
    public static void Attend(float* q, float* keys, float* values, float* output, int heads, int kvHeads, int headDim,
        long capacity, int first, int length, byte* keyAllowed, float scale)
    {
        int span = length - first;
        long size = (long)heads * span;
        // Scores for all heads: on the stack for the short contexts of small models (a native allocation per query per
        // layer cost them more than the arithmetic), else a native block.
        const int StackScores = 4096;
        float* stack = stackalloc float[size <= StackScores ? (int)size : 0];
        float* scores = size <= StackScores ? stack : (float*)NativeMemory.Alloc((nuint)(size * sizeof(float)));
        try
        {
            var job = new AttentionJob(q, keys, values, output, scores, keyAllowed, heads / kvHeads, headDim, capacity, first, length, scale);
            if (WorkerCount <= 1 || size * headDim < ParallelThreshold)
                for (int h = 0; h < heads; h++) job.Head(h);
            else
                KernelPool.For(heads, WorkerCount, job.Head);
        }
        finally
        {
            if (scores != stack) NativeMemory.Free(scores);
        }
    }

    /// <summary>One <see cref="Attend"/> call's arguments; <see cref="Head"/> does one query head.</summary>
    private sealed class AttentionJob(float* q, float* keys, float* values, float* output, float* scores, byte* allowed, int group, int headDim,
        long capacity, int first, int length, float scale)
    {
        public void Head(int h)
        {
            int kv = h / group, span = length - first;
            float* qh = q + h * headDim;
            float* kh = keys + kv * capacity * headDim;
            float* vh = values + kv * capacity * headDim;
            float* sh = scores + (long)h * span;
            float* oh = output + h * headDim;
            Scores(qh, kh, sh, headDim, first, length, scale);
            if (allowed != null)
                for (int j = first; j < length; j++)
                    if (allowed[j] == 0) sh[j - first] = float.NegativeInfinity;
            float total = SoftmaxNumerators(sh, span);
            new Span<float>(oh, headDim).Clear();
            float inv = 1f / total;
            for (int j = 0; j < span; j++)
            {
                float p = sh[j] * inv;
                if (p == 0) continue;
                Axpy(p, vh + (long)(j + first) * headDim, oh, headDim);
            }
        }
    }

    /// <summary>
    /// s[j − first] = (q · k_j) · scale for keys j in [first, length) of one head's [capacity, headDim] rows, each exactly
    /// as <see cref="Dot"/> sums it. Four keys at a time when headDim is a multiple of 8: their four sums are
    /// independent, so the multiply-add latency of one key's short chain (3 steps at headDim 24) no longer sets the pace.
    /// </summary>
    internal static void Scores(float* q, float* k, float* s, int headDim, int first, int length, float scale)
    {
        int j = first;
        if (Vector256.IsHardwareAccelerated && headDim % 8 == 0)
        {
            for (; j + 4 <= length; j += 4)
            {
                float* k0 = k + (long)j * headDim;
                float* k1 = k0 + headDim, k2 = k1 + headDim, k3 = k2 + headDim;
                Vector256<float> a0 = Vector256<float>.Zero, a1 = a0, a2 = a0, a3 = a0;
                for (int i = 0; i < headDim; i += 8)
                {
                    var qv = Vector256.Load(q + i);
                    a0 = Vector256.FusedMultiplyAdd(qv, Vector256.Load(k0 + i), a0);
                    a1 = Vector256.FusedMultiplyAdd(qv, Vector256.Load(k1 + i), a1);
                    a2 = Vector256.FusedMultiplyAdd(qv, Vector256.Load(k2 + i), a2);
                    a3 = Vector256.FusedMultiplyAdd(qv, Vector256.Load(k3 + i), a3);
                }
                float* out0 = s + (j - first);
                out0[0] = Vector256.Sum(a0) * scale;
                out0[1] = Vector256.Sum(a1) * scale;
                out0[2] = Vector256.Sum(a2) * scale;
                out0[3] = Vector256.Sum(a3) * scale;
            }
        }
        for (; j < length; j++) s[j - first] = Dot(q, k + (long)j * headDim, headDim) * scale;
    }

    /// <summary>
    /// s[j] = exp(s[j] − max s) in place (masked scores, −∞, become 0); returns their sum. The exponentials are
    /// vectorised (.NET's Vector.Exp, within an ulp or so of MathF.Exp) instead of one libm call per key.
    /// </summary>
    internal static float SoftmaxNumerators(float* s, int n)
    {
        float max = float.NegativeInfinity;
        for (int j = 0; j < n; j++) max = Math.Max(max, s[j]);
        int i = 0;
        float total = 0;
        if (Vector.IsHardwareAccelerated && n >= Vector<float>.Count)
        {
            var m = new Vector<float>(max);
            var sum = Vector<float>.Zero;
            for (; i + Vector<float>.Count <= n; i += Vector<float>.Count)
            {
                var e = Vector.Exp(Vector.Load(s + i) - m);
                e.Store(s + i);
                sum += e;
            }
            total = Vector.Sum(sum);
        }
        for (; i < n; i++)
        {
            float e = s[i] == float.NegativeInfinity ? 0f : MathF.Exp(s[i] - max);
            s[i] = e;
            total += e;
        }
        return total;
    }

    /// <summary>y += a · x.</summary>
    public static void Axpy(float a, float* x, float* y, int n)
    {
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            var av = Vector256.Create(a);
            for (; i + 8 <= n; i += 8) Vector256.FusedMultiplyAdd(av, Vector256.Load(x + i), Vector256.Load(y + i)).Store(y + i);
        }
        for (; i < n; i++) y[i] += a * x[i];
    }
}

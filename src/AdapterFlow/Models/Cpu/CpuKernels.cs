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
    /// head h / (heads / kvHeads). Heads run in parallel.
    /// </summary>
    public static void Attend(float* q, float* keys, float* values, float* output, int heads, int kvHeads, int headDim,
        long capacity, int first, int length, byte* keyAllowed, float scale)
    {
        int group = heads / kvHeads;
        int span = length - first;
        // Scores for all heads: at most a few thousand floats per head for typical contexts.
        float* scores = (float*)NativeMemory.Alloc((nuint)((long)heads * span * sizeof(float)));
        try
        {
            nint qp = (nint)q, kp = (nint)keys, vp = (nint)values, op = (nint)output, sp = (nint)scores, mp = (nint)keyAllowed;
            void Head(int h)
            {
                int kv = h / group;
                float* qh = (float*)qp + h * headDim;
                float* kh = (float*)kp + kv * capacity * headDim;
                float* vh = (float*)vp + kv * capacity * headDim;
                float* sh = (float*)sp + (long)h * span;
                float* oh = (float*)op + h * headDim;
                byte* allowed = (byte*)mp;
                float max = float.NegativeInfinity;
                for (int j = first; j < length; j++)
                {
                    float s = allowed != null && allowed[j] == 0 ? float.NegativeInfinity : Dot(qh, kh + (long)j * headDim, headDim) * scale;
                    sh[j - first] = s;
                    if (s > max) max = s;
                }
                float total = 0;
                for (int j = 0; j < span; j++)
                {
                    float e = sh[j] == float.NegativeInfinity ? 0f : MathF.Exp(sh[j] - max);
                    sh[j] = e;
                    total += e;
                }
                new Span<float>(oh, headDim).Clear();
                float inv = 1f / total;
                for (int j = 0; j < span; j++)
                {
                    float p = sh[j] * inv;
                    if (p == 0) continue;
                    Axpy(p, vh + (long)(j + first) * headDim, oh, headDim);
                }
            }
            if (WorkerCount <= 1 || (long)heads * span * headDim < ParallelThreshold)
                for (int h = 0; h < heads; h++) Head(h);
            else
                KernelPool.For(heads, WorkerCount, Head);
        }
        finally
        {
            NativeMemory.Free(scores);
        }
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

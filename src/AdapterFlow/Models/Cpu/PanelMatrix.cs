using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace AdapterFlow.Models.Cpu;

/// <summary>
/// A float32 copy of a row-major [rows, cols] matrix laid out for products with a few token vectors at once: its
/// rows in panels of <see cref="Width"/>, each panel column-major ([rows / 32][cols][32]), so one 128-byte line holds
/// column c of 32 rows. The product then walks one sequential stream and multiplies each line by broadcast input
/// values into 32-row accumulators, one per token: about one load per two multiply-adds instead of the row kernels'
/// one or more, which lets the arithmetic of 2–8 tokens hide behind the memory stream. Rows past the last full panel
/// are not copied; the kernels read them from <see cref="Source"/>.
/// Measured on the 109.5M model's weights (bench suite <c>gemmtokens</c>) this is what brings a verification pass
/// over d + 1 positions close to the cost of a one-token step; see docs/benchmarks.md.
/// </summary>
internal sealed unsafe class PanelMatrix : IDisposable
{
    /// <summary>Rows per panel: two 512-bit vectors.</summary>
    public const int Width = 32;

    /// <summary>Positions compared by <see cref="Matches"/>.</summary>
    private const int Samples = 64;

    private PanelMatrix(float* source, int rows, int cols)
    {
        Source = source;
        Rows = rows;
        Cols = cols;
        PackedRows = rows / Width * Width;
        Data = (float*)NativeMemory.AlignedAlloc((nuint)Math.Max(1L, (long)PackedRows * cols * sizeof(float)), 64);
    }

    /// <summary>The row-major matrix this was copied from (its tail rows are read there).</summary>
    public float* Source { get; }

    public int Rows { get; }
    public int Cols { get; }

    /// <summary>Rows held in panels: <see cref="Rows"/> rounded down to a multiple of <see cref="Width"/>.</summary>
    public int PackedRows { get; }

    /// <summary>[PackedRows / 32][Cols][32].</summary>
    public float* Data { get; private set; }

    public long Bytes => (long)PackedRows * Cols * sizeof(float);

    /// <summary>Whether the kernels can use panels here (they are 512 bits wide).</summary>
    public static bool Supported => Vector512.IsHardwareAccelerated;

    /// <summary>Copies <paramref name="source"/> [rows, cols] into panels, the panels split across the kernel workers.</summary>
    public static PanelMatrix Pack(float* source, int rows, int cols)
    {
        var matrix = new PanelMatrix(source, rows, cols);
        matrix.Refresh();
        return matrix;
    }

    /// <summary>Copies the source again (its values changed; same shape and memory).</summary>
    public void Refresh()
    {
        nint src = (nint)Source, dst = (nint)Data;
        int cols = Cols, panels = PackedRows / Width;
        void Panel(int p)
        {
            // Eight rows at a time: each pass reads eight row streams and writes 32-byte pieces of every 128-byte line.
            float* from = (float*)src + (long)p * Width * cols;
            float* to = (float*)dst + (long)p * Width * cols;
            for (int r0 = 0; r0 < Width; r0 += 8)
                for (int c = 0; c < cols; c++)
                {
                    float* line = to + (long)c * Width + r0;
                    for (int r = 0; r < 8; r++) line[r] = from[(long)(r0 + r) * cols + c];
                }
        }
        if (panels > 0) KernelPool.For(panels, CpuKernels.WorkerCount, Panel);
    }

    /// <summary>
    /// Whether the panels still hold the source's values at a spread of sampled positions (every panel row and column
    /// is covered over the samples): catches weights changed in place after packing (training, merging an adapter)
    /// at the cost of a few cache misses.
    /// </summary>
    public bool Matches()
    {
        if (PackedRows == 0) return true;
        long count = (long)PackedRows * Cols;
        for (int i = 0; i < Samples; i++)
        {
            long at = i == Samples - 1 ? count - 1 : count / Samples * i + i * 7919 % Math.Max(1, count / Samples);
            long r = at / Cols, c = at % Cols;
            if (Data[r / Width * Width * Cols + c * Width + r % Width] != Source[at]) return false;
        }
        return true;
    }

    public void Dispose()
    {
        if (Data == null) return;
        NativeMemory.AlignedFree(Data);
        Data = null;
    }
}

/// <summary>
/// The panel copies of a model's matrices (<see cref="PanelMatrix"/>), keyed by the weight's memory. Verification
/// passes look their matrices up here; matrices not packed take the row kernels.
/// </summary>
internal sealed unsafe class PackedWeights : IDisposable
{
    private readonly Dictionary<nint, PanelMatrix> _panels = [];

    public int Count => _panels.Count;

    public long Bytes => _panels.Values.Sum(p => p.Bytes);

    public PanelMatrix? Find(float* weight) => _panels.TryGetValue((nint)weight, out var panels) ? panels : null;

    /// <summary>Packs the matrix if it is not packed yet; repacks it when its values changed since (<see cref="PanelMatrix.Matches"/>).</summary>
    public void Add(float* weight, int rows, int cols)
    {
        if (_panels.TryGetValue((nint)weight, out var existing))
        {
            if (existing.Rows == rows && existing.Cols == cols)
            {
                if (!existing.Matches()) existing.Refresh();
                return;
            }
            existing.Dispose();
        }
        _panels[(nint)weight] = PanelMatrix.Pack(weight, rows, cols);
    }

    public void Dispose()
    {
        foreach (var panels in _panels.Values) panels.Dispose();
        _panels.Clear();
    }
}

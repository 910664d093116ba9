using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using AdapterFlow.Models.Cpu;

namespace AdapterFlow.Bench;

/// <summary>
/// The multi-token kernel (<see cref="CpuKernels.Gemm"/>) over every projection of the 109.5M benchmark LLaMA (12 layers
/// and the tied 32000 × 768 head, 438 MB of float32 weights, more than any cache) for T tokens of one row, as a
/// self-speculative verification pass runs it: time per pass, weight GB/s, GFLOP/s and the pass's cost in one-token
/// passes, with the software prefetch distance varied, against T separate one-token passes. Variants alternate within
/// each repeat, so a change in the machine's bandwidth during the run hits all of them alike.
/// </summary>
public static unsafe class GemmTokensBench
{
    public static string Run(int[] tokenCounts, int repeats, string machine)
    {
        var shapes = new List<(int Rows, int Cols)>();
        for (int layer = 0; layer < 12; layer++)
        {
            for (int i = 0; i < 4; i++) shapes.Add((768, 768)); // q, k, v, o
            shapes.Add((2048, 768)); shapes.Add((2048, 768)); shapes.Add((768, 2048)); // gate, up, down
        }
        shapes.Add((32000, 768)); // head
        var random = new Random(1);
        var matrices = new List<nint>();
        long floats = 0;
        foreach (var (rows, cols) in shapes)
        {
            float* w = (float*)NativeMemory.AlignedAlloc((nuint)((long)rows * cols * sizeof(float)), 64);
            for (long i = 0; i < (long)rows * cols; i++) w[i] = (float)(random.NextDouble() - 0.5) * 0.04f;
            matrices.Add((nint)w);
            floats += (long)rows * cols;
        }
        // The verification path's layout: a panel copy of every matrix (PanelMatrix, 512-bit kernels only).
        var packClock = Stopwatch.StartNew();
        var panels = PanelMatrix.Supported ? matrices.Select((w, m) => PanelMatrix.Pack((float*)w, shapes[m].Rows, shapes[m].Cols)).ToList() : null;
        double packSeconds = packClock.Elapsed.TotalSeconds;
        int maxTokens = tokenCounts.Max();
        float* x = (float*)NativeMemory.AlignedAlloc((nuint)(maxTokens * 2048 * sizeof(float)), 64);
        for (int i = 0; i < maxTokens * 2048; i++) x[i] = (float)(random.NextDouble() - 0.5);
        float* y = (float*)NativeMemory.AlignedAlloc((nuint)(maxTokens * 32000 * sizeof(float)), 64);
        int savedPrefetch = CpuKernels.PrefetchFloats;
        int savedMax256 = CpuKernels.Max256BitTokens;
        try
        {
            void Pass(int tokens, bool oneAtATime, bool packed)
            {
                for (int m = 0; m < shapes.Count; m++)
                {
                    var (rows, cols) = shapes[m];
                    if (packed) CpuKernels.PanelGemm(panels![m], x, y, null, tokens);
                    else if (!oneAtATime) CpuKernels.Gemm((float*)matrices[m], x, y, null, rows, cols, tokens);
                    else for (int t = 0; t < tokens; t++) CpuKernels.Gemv((float*)matrices[m], x + (long)t * cols, y + (long)t * rows, null, rows, cols);
                }
            }
            // Max256BitTokens 0 = the 512-bit kernels for every T (with their prefetch), 32 = the 256-bit ones for every T.
            var variants = new List<(string Name, int Prefetch, bool OneAtATime, int Max256, bool Packed)> { ("T one-token passes", savedPrefetch, true, savedMax256, false) };
            foreach (int kb in new[] { 0, 4, 8 }) variants.Add(($"one T-token pass, 512-bit, prefetch {(kb == 0 ? "off" : $"{kb} KB ahead")}", kb * 256, false, 0, false));
            variants.Add(("one T-token pass, 256-bit (pairs, then one)", savedPrefetch, false, 32, false));
            variants.Add(($"one T-token pass, row-major as shipped (256-bit up to {savedMax256} tokens)", savedPrefetch, false, savedMax256, false));
            if (panels is not null) variants.Add(("one T-token pass, 32-row panels (the verification path)", savedPrefetch, false, savedMax256, true));
            var medians = new double[variants.Count, tokenCounts.Length];
            double oneToken = 0;
            for (int ti = 0; ti < tokenCounts.Length; ti++)
            {
                var samples = variants.Select(_ => new List<double>()).ToArray();
                for (int r = -2; r < repeats; r++)
                    for (int v = 0; v < variants.Count; v++)
                    {
                        CpuKernels.PrefetchFloats = variants[v].Prefetch;
                        CpuKernels.Max256BitTokens = variants[v].Max256;
                        var clock = Stopwatch.StartNew();
                        Pass(tokenCounts[ti], variants[v].OneAtATime, variants[v].Packed);
                        if (r >= 0) samples[v].Add(clock.Elapsed.TotalSeconds);
                    }
                for (int v = 0; v < variants.Count; v++)
                {
                    samples[v].Sort();
                    medians[v, ti] = samples[v][samples[v].Count / 2];
                }
                if (tokenCounts[ti] == 1) oneToken = medians[0, ti];
            }
            if (oneToken == 0)
            {
                CpuKernels.PrefetchFloats = savedPrefetch;
                CpuKernels.Max256BitTokens = savedMax256;
                var samples = new List<double>();
                for (int r = -2; r < repeats; r++)
                {
                    var clock = Stopwatch.StartNew();
                    Pass(1, true, false);
                    if (r >= 0) samples.Add(clock.Elapsed.TotalSeconds);
                }
                samples.Sort();
                oneToken = samples[samples.Count / 2];
            }
            var table = new StringBuilder();
            table.AppendLine(machine);
            table.AppendLine();
            table.AppendLine(string.Create(CultureInfo.InvariantCulture,
                $"All projections of the 109.5M LLaMA ({floats * 4 / 1e6:F0} MB of float32 weights) for T tokens of one row through `CpuKernels.Gemm`, {CpuKernels.WorkerCount} workers, median of {repeats} passes per cell (variants alternating). A one-token pass (GEMV) takes {oneToken * 1e3:F2} ms ({floats * 4 / oneToken / 1e9:F1} GB/s). Cell: ms per pass, its cost in one-token passes, GFLOP/s. 512-bit kernels: {(System.Runtime.Intrinsics.Vector512.IsHardwareAccelerated ? "yes" : "no (256-bit; the prefetch applies to the 512-bit kernels only)")}.") +
                (panels is null ? " No panel copies (they need AVX-512)." : string.Create(CultureInfo.InvariantCulture, $" Copying every matrix into 32-row panels took {packSeconds * 1e3:F0} ms.")));
            table.AppendLine();
            table.AppendLine("| variant | " + string.Join(" | ", tokenCounts.Select(t => $"T = {t}")) + " |");
            table.AppendLine("|---|" + string.Concat(tokenCounts.Select(_ => "---:|")));
            for (int v = 0; v < variants.Count; v++)
            {
                table.Append("| " + variants[v].Name + " |");
                for (int ti = 0; ti < tokenCounts.Length; ti++)
                {
                    double s = medians[v, ti];
                    table.Append(string.Create(CultureInfo.InvariantCulture, $" {s * 1e3:F2} ms, {s / oneToken:F2}, {2.0 * floats * tokenCounts[ti] / s / 1e9:F0} |"));
                }
                table.AppendLine();
            }
            return table.ToString();
        }
        finally
        {
            CpuKernels.PrefetchFloats = savedPrefetch;
            CpuKernels.Max256BitTokens = savedMax256;
            foreach (var p in panels ?? []) p.Dispose();
            foreach (var w in matrices) NativeMemory.AlignedFree((void*)w);
            NativeMemory.AlignedFree(x);
            NativeMemory.AlignedFree(y);
        }
    }
}

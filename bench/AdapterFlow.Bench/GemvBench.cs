using System.Diagnostics;
using System.Globalization;
using System.Text;
using AdapterFlow.Models.Cpu;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Bench;

/// <summary>
/// The batch-1 output head alone (a [vocab, hidden] float32 matrix times one vector), the largest single read of a
/// decode step, through libtorch's ways of writing it and through the managed kernel with 1 and N threads: GB/s of
/// weight read and the largest difference from <c>linear</c>.
/// </summary>
public static class GemvBench
{
    public sealed record Row(string Method, double Milliseconds, double GigabytesPerSecond, double MaxAbsDiff);

    public static unsafe IReadOnlyList<Row> Run(int rows = 32000, int cols = 768, int repeats = 50)
    {
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        var weight = torch.randn(rows, cols) * 0.02f;
        var x = torch.randn(1, 1, cols);
        var reference = nn.functional.linear(x, weight).view(-1);
        var transposed = weight.t().contiguous();
        double bytes = (double)rows * cols * sizeof(float);
        var results = new List<Row>();
        void Measure(string method, Func<Tensor> run)
        {
            run().Dispose();
            double best = double.MaxValue;
            Tensor last = run();
            for (int i = 0; i < repeats; i++)
            {
                last.Dispose();
                var sw = Stopwatch.StartNew();
                last = run();
                best = Math.Min(best, sw.Elapsed.TotalSeconds);
            }
            double diff = last.view(-1).sub(reference).abs().max().item<float>();
            last.Dispose();
            results.Add(new Row(method, best * 1e3, bytes / best / 1e9, diff));
        }
        Measure("torch linear(x, W)", () => nn.functional.linear(x, weight));
        Measure("torch mv(W, x)", () => torch.mv(weight, x.view(-1)));
        Measure("torch matmul(x, Wᵀ contiguous)", () => torch.matmul(x, transposed));
        float* w = CpuKernels.Pointer(weight), xp = CpuKernels.Pointer(x);
        int saved = CpuKernels.Threads;
        foreach (var threads in new[] { 1, torch.get_num_threads() }.Distinct())
        {
            CpuKernels.Threads = threads;
            Measure($"managed GEMV, {threads} thread(s)", () =>
            {
                var y = torch.empty(rows);
                CpuKernels.Gemv(w, xp, CpuKernels.Pointer(y), null, rows, cols);
                return y;
            });
        }
        if (torch.get_num_threads() > 1)
        {
            KernelPool.UseParallelFor = true;
            Measure($"managed GEMV, {torch.get_num_threads()} threads via Parallel.For", () =>
            {
                var y = torch.empty(rows);
                CpuKernels.Gemv(w, xp, CpuKernels.Pointer(y), null, rows, cols);
                return y;
            });
            KernelPool.UseParallelFor = false;
        }
        CpuKernels.Threads = saved;
        return results;
    }

    /// <summary>
    /// Microseconds to start and join one parallel call of <paramref name="threads"/> empty items: what each of the
    /// ~100 parallel kernel calls of a decode step pays on top of its work (best of many, kernel pool vs Parallel.For).
    /// </summary>
    public static (double Pool, double ParallelFor) DispatchMicroseconds(int threads, int calls = 2000)
    {
        double Time(bool parallelFor)
        {
            KernelPool.UseParallelFor = parallelFor;
            double best = double.MaxValue;
            for (int round = 0; round < 5; round++)
            {
                var sw = Stopwatch.StartNew();
                for (int i = 0; i < calls; i++) KernelPool.For(threads, threads, static _ => { });
                best = Math.Min(best, sw.Elapsed.TotalSeconds / calls);
            }
            KernelPool.UseParallelFor = false;
            return best * 1e6;
        }
        return (Time(false), Time(true));
    }

    public static string Table(IReadOnlyList<Row> rows)
    {
        var table = new StringBuilder();
        table.AppendLine("| output head 32000 × 768 F32, batch 1 | ms | weight GB/s | max |Δ| vs linear |");
        table.AppendLine("|---|---:|---:|---:|");
        foreach (var r in rows)
            table.AppendLine(string.Create(CultureInfo.InvariantCulture, $"| {r.Method} | {r.Milliseconds:F2} | {r.GigabytesPerSecond:F1} | {r.MaxAbsDiff:E1} |"));
        int threads = torch.get_num_threads();
        if (threads > 1)
        {
            var (pool, parallelFor) = DispatchMicroseconds(threads);
            table.AppendLine();
            table.AppendLine(string.Create(CultureInfo.InvariantCulture,
                $"Starting one parallel kernel call on {threads} threads: {pool:F1} µs (kernel pool), {parallelFor:F1} µs (Parallel.For)."));
        }
        return table.ToString();
    }
}

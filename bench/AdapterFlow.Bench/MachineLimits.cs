using System.Diagnostics;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Bench;

/// <summary>
/// The machine's own limits, measured in the same run as the workload so that ratios are honest:
/// dense GEMM throughput and memory bandwidth (STREAM-style copy and read-only sum).
/// </summary>
public sealed record MachineLimits(double GemmF32Flops, double GemmBf16Flops, double CopyBytesPerSecond, double ReadBytesPerSecond, int Threads)
{
    public static MachineLimits Measure(Device device)
    {
        return new MachineLimits(
            GemmFlops(ScalarType.Float32, device),
            GemmFlops(ScalarType.BFloat16, device),
            CopyBandwidth(device),
            ReadBandwidth(device),
            torch.get_num_threads());
    }

    /// <summary>Best of several timed square matmuls (n = 2048): 2·n³ floating-point operations each.</summary>
    public static double GemmFlops(ScalarType dtype, Device device, int n = 2048, int repeats = 5)
    {
        using var scope = torch.NewDisposeScope();
        var a = torch.randn(n, n, device: device).to_type(dtype);
        var b = torch.randn(n, n, device: device).to_type(dtype);
        torch.mm(a, b).Dispose(); // warm-up
        double best = double.MaxValue;
        for (int i = 0; i < repeats; i++)
        {
            var sw = Stopwatch.StartNew();
            using var c = torch.mm(a, b);
            Sync(c);
            best = Math.Min(best, sw.Elapsed.TotalSeconds);
        }
        return 2.0 * n * n * (double)n / best;
    }

    /// <summary>STREAM "copy" convention: bytes read plus bytes written per second, 256 MiB buffers.</summary>
    public static double CopyBandwidth(Device device, long bytes = 256L << 20, int repeats = 5)
    {
        using var scope = torch.NewDisposeScope();
        long n = bytes / 4;
        var src = torch.rand(n, device: device);
        var dst = torch.empty(n, device: device);
        dst.copy_(src);
        double best = double.MaxValue;
        for (int i = 0; i < repeats; i++)
        {
            var sw = Stopwatch.StartNew();
            dst.copy_(src);
            Sync(dst);
            best = Math.Min(best, sw.Elapsed.TotalSeconds);
        }
        return 2.0 * bytes / best;
    }

    /// <summary>Read-only bandwidth: a sum over a 256 MiB buffer (what decoding does to weights).</summary>
    public static double ReadBandwidth(Device device, long bytes = 256L << 20, int repeats = 5)
    {
        using var scope = torch.NewDisposeScope();
        long n = bytes / 4;
        var src = torch.rand(n, device: device);
        src.sum().item<float>();
        double best = double.MaxValue;
        for (int i = 0; i < repeats; i++)
        {
            var sw = Stopwatch.StartNew();
            src.sum().item<float>();
            best = Math.Min(best, sw.Elapsed.TotalSeconds);
        }
        return bytes / best;
    }

    private static void Sync(Tensor t)
    {
        if (t.device.type == DeviceType.CUDA) torch.cuda.synchronize();
        else t.view(-1)[0].to_type(ScalarType.Float32).item<float>();
    }
}

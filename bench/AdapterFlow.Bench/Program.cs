using AdapterFlow.Bench;
using TorchSharp;

var device = torch.CPU;
var limits = MachineLimits.Measure(device);
Console.WriteLine($"threads {limits.Threads}");
Console.WriteLine($"GEMM F32  {limits.GemmF32Flops / 1e9:F1} GFLOP/s");
Console.WriteLine($"GEMM BF16 {limits.GemmBf16Flops / 1e9:F1} GFLOP/s");
Console.WriteLine($"copy      {limits.CopyBytesPerSecond / 1e9:F2} GB/s (read + write)");
Console.WriteLine($"read      {limits.ReadBytesPerSecond / 1e9:F2} GB/s");

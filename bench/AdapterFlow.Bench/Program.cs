using System.Globalization;
using System.Text;
using AdapterFlow.Bench;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

// Usage: dotnet run --project bench/AdapterFlow.Bench -c Release -- [--out docs/benchmarks.md] [--new-tokens 64] [--prompt 128] [--quick]
var argsList = args.ToList();
string? Value(string name) { int i = argsList.IndexOf(name); return i >= 0 && i + 1 < argsList.Count ? argsList[i + 1] : null; }
bool quick = argsList.Contains("--quick");
int newTokens = int.Parse(Value("--new-tokens") ?? (quick ? "16" : "64"), CultureInfo.InvariantCulture);
int promptLength = int.Parse(Value("--prompt") ?? (quick ? "32" : "128"), CultureInfo.InvariantCulture);
string? outPath = Value("--out");
var device = torch.CPU;

Console.WriteLine("Measuring the machine's limits (GEMM, memory bandwidth)...");
var limits = MachineLimits.Measure(device);
Console.WriteLine($"  threads {limits.Threads}; GEMM F32 {limits.GemmF32Flops / 1e9:F1} GFLOP/s, BF16 {limits.GemmBf16Flops / 1e9:F1} GFLOP/s; " +
                  $"copy {limits.CopyBytesPerSecond / 1e9:F2} GB/s (read+write); read {limits.ReadBytesPerSecond / 1e9:F2} GB/s");

var results = new List<DecodeResult>();
foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16 })
{
    using var model = AutoModel.FromConfig(BenchModels.Llama110M(), seed: 1, dtype: dtype, device: device);
    Console.WriteLine($"LLaMA {model.ParameterCount() / 1e6:F1}M parameters, {dtype}");
    foreach (var batch in new[] { 1, 8 })
    {
        var r = DecodeBench.Run(model, batch, promptLength, newTokens);
        results.Add(r);
        Console.WriteLine($"  batch {batch}: prefill {r.PrefillTokensPerSecond:F0} tok/s; decode {r.DecodeTokensPerSecond:F1} tok/s " +
                          $"(bare loop {r.ModelLoopDecodeTokensPerSecond:F1}); weights {r.DecodeWeightBytesPerSecond / 1e9:F2} GB/s = " +
                          $"{100 * r.DecodeWeightBytesPerSecond / limits.CopyBytesPerSecond:F0}% of copy bandwidth");
    }
}

var table = new StringBuilder();
table.AppendLine($"Machine (measured in the same run): {Environment.ProcessorCount} cores, {limits.Threads} torch threads; " +
                 $"GEMM F32 {limits.GemmF32Flops / 1e9:F1} GFLOP/s, BF16 {limits.GemmBf16Flops / 1e9:F1} GFLOP/s; " +
                 $"memory copy {limits.CopyBytesPerSecond / 1e9:F2} GB/s (bytes read + written), read-only {limits.ReadBytesPerSecond / 1e9:F2} GB/s.");
table.AppendLine();
table.AppendLine($"Model: LLaMA 109.5M (hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000, tied), random weights; prompt {promptLength} tokens, {newTokens} new tokens, greedy, KV cache, best of 2 runs after a warm-up.");
table.AppendLine();
table.AppendLine("| dtype | batch | prefill tok/s | decode tok/s | bare-loop decode tok/s | weight GB/s in decode | % of copy bandwidth | % of read bandwidth | bandwidth limit tok/s (copy) |");
table.AppendLine("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
foreach (var r in results)
{
    double limitTokens = limits.CopyBytesPerSecond / r.WeightBytes * r.Batch;
    table.AppendLine(string.Create(CultureInfo.InvariantCulture,
        $"| {r.DType} | {r.Batch} | {r.PrefillTokensPerSecond:F0} | {r.DecodeTokensPerSecond:F1} | {r.ModelLoopDecodeTokensPerSecond:F1} | {r.DecodeWeightBytesPerSecond / 1e9:F2} | {100 * r.DecodeWeightBytesPerSecond / limits.CopyBytesPerSecond:F0}% | {100 * r.DecodeWeightBytesPerSecond / limits.ReadBytesPerSecond:F0}% | {limitTokens:F0} |"));
}
Console.WriteLine();
Console.WriteLine(table);

if (outPath is not null)
{
    const string begin = "<!-- bench:decode:begin -->", end = "<!-- bench:decode:end -->";
    var section = $"{begin}\n{table}{end}";
    var text = File.Exists(outPath) ? File.ReadAllText(outPath) : "# Benchmarks\n\n";
    int b = text.IndexOf(begin, StringComparison.Ordinal), e = text.IndexOf(end, StringComparison.Ordinal);
    text = b >= 0 && e > b ? text[..b] + section + text[(e + end.Length)..] : text.TrimEnd() + "\n\n" + section + "\n";
    File.WriteAllText(outPath, text);
    Console.WriteLine($"Wrote {outPath}");
}

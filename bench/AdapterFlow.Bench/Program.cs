using System.Globalization;
using System.Text;
using AdapterFlow.Bench;
using AdapterFlow.Models;
using AdapterFlow.Models.Cpu;
using AdapterFlow.Training;
using TorchSharp;
using static TorchSharp.torch;

const string Usage = """
    Usage: dotnet run --project bench/AdapterFlow.Bench -c Release -- SUITE [options]

    Suites (each measures the machine's GEMM FLOP/s and memory bandwidth first and reports against them):
      decode      batch-1 and batch-8 decode of the 109.5M benchmark LLaMA, F32 and BF16 (default)
      adapters    a training step and decode with each adapter method on the benchmark model   [--decode-only]
      lorastep    unmerged vs merged LoRA r=32 decode steps, alternating   [--rounds 8]
      gemv        the output head's matrix-vector product, kernels vs libtorch
      gemmtokens  the multi-token kernel over all of the model's weights   [--tokens 1,2,3,4,5,7] [--repeats 15]
      train       training throughput per method and precision, one child process each   [--steps 3] [--no-fused-adamw]
      all         decode, adapters and train
      speculative self-speculative sweep on a model folder: --model DIR [--section NAME] [--exit-layers 2,4]
                  [--num-speculations 2,4,6] [--repeats 2] [--draft-vocab FILE] [--draft-confidence P] [--no-cpu-kernels]
                  [--no-packed-weights (verify over the row-major weights, no panel copy)]
                  [--prompts FILE (.json math set, .jsonl {text}, or lines)] [--max-prompts N]
      exitagreement how often each early exit's argmax equals the last layer's on fixed text (teacher-forced):
                  --models DIR,DIR,... --prompts FILE (.json math set, .jsonl {text}, or lines) [--max-prompts 64]
      specpasses  the kernel passes of a self-speculative round, timed one by one: --model DIR [--draft-vocab FILE]
                  [--no-packed-weights]

    Common options:
      --out FILE        write the suite's table into FILE between <!-- bench:NAME:begin/end --> markers
      --new-tokens N    tokens to generate (default 64; 16 with --quick)
      --prompt N        prompt length of the decode suite (default 128; 32 with --quick)
      --quick           shorter runs (smoke test, not for numbers)
      --512-bit-tokens  multi-token passes (verification) on the 512-bit kernels for every token count, as before, to compare
    """;
if (args.Contains("--help") || args.Contains("-h"))
{
    Console.WriteLine(Usage);
    return 0;
}
var argsList = args.ToList();
string? Value(string name) { int i = argsList.IndexOf(name); return i >= 0 && i + 1 < argsList.Count ? argsList[i + 1] : null; }
int IntValue(string name, int fallback) => Value(name) is { } v ? int.Parse(v, CultureInfo.InvariantCulture) : fallback;
string suite = args.Length > 0 && !args[0].StartsWith("--", StringComparison.Ordinal) ? args[0] : "decode";
// One training setting in a child process of the `train` suite (so that its peak memory is its own).
if (suite == "train-one")
    return TrainBench.RunChild(Value("--method")!, TrainingPrecisionNames.Parse(Value("--precision")!), IntValue("--batch", 1), IntValue("--length", 128), IntValue("--steps", 3),
        fusedOptimizer: !args.Contains("--no-fused-adamw"));
if (suite is not ("decode" or "adapters" or "lorastep" or "gemv" or "gemmtokens" or "train" or "speculative" or "specpasses" or "exitagreement" or "all"))
{
    Console.Error.WriteLine($"error: unknown suite '{suite}' (decode, adapters, lorastep, gemv, train, gemmtokens, speculative, specpasses, exitagreement, all)");
    return 2;
}
if (suite is "speculative" or "specpasses" && Value("--model") is null)
{
    Console.Error.WriteLine("error: the speculative suite needs --model DIR (a model folder with tokenizer.json)");
    return 2;
}
bool quick = argsList.Contains("--quick");
// train: TorchSharp's AdamW step instead of the fused CPU one (before/after comparisons in one build).
bool fusedAdamW = !argsList.Contains("--no-fused-adamw");
// Multi-token passes on the 512-bit kernels for every token count, as before Max256BitTokens (before/after in one build).
if (argsList.Contains("--512-bit-tokens")) CpuKernels.Max256BitTokens = 0;
int newTokens = int.Parse(Value("--new-tokens") ?? (quick ? "16" : "64"), CultureInfo.InvariantCulture);
int promptLength = int.Parse(Value("--prompt") ?? (quick ? "32" : "128"), CultureInfo.InvariantCulture);
string? outPath = Value("--out");
var device = torch.CPU;

if (suite is "lorastep")
{
    // Unmerged vs merged LoRA r=32 decode steps on one model, alternating (robust to a busy machine), 1 and N threads.
    using var peft = AdapterBench.Lora(AutoModel.FromConfig(BenchModels.Llama110M(), seed: 1, device: device), 32);
    foreach (var p in peft.parameters()) p.requires_grad = false;
    peft.eval();
    foreach (var threads in new[] { 1, torch.get_num_threads() }.Distinct())
    {
        var r = LoraStepBench.Run(peft, threads, rounds: IntValue("--rounds", 8));
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"LoRA r=32 decode step, {threads} thread(s): merged {1e3 * r.MergedMedian:F2} ms median ({1 / r.MergedMedian:F1} tok/s), best {1e3 * r.MergedBest:F2} ms; " +
            $"unmerged {1e3 * r.UnmergedMedian:F2} ms median ({1 / r.UnmergedMedian:F1} tok/s), best {1e3 * r.UnmergedBest:F2} ms; " +
            $"unmerged slower by {100 * r.MedianSlowdown:F1}% (median), {100 * r.BestSlowdown:F1}% (best); " +
            $"calling thread's CPU time per step (median): merged {1e3 * r.MergedCpuMedian:F2} ms, unmerged {1e3 * r.UnmergedCpuMedian:F2} ms " +
            $"({100 * (r.UnmergedCpuMedian / r.MergedCpuMedian - 1):F1}%)"));
    }
    return 0;
}
if (suite is "gemv")
{
    Console.WriteLine(GemvBench.Table(GemvBench.Run()));
    return 0;
}
Console.WriteLine("Measuring the machine's limits (GEMM, memory bandwidth)...");
var limits = MachineLimits.Measure(device);
var machine = $"Machine (measured in the same run): {Environment.ProcessorCount} cores, {limits.Threads} torch threads; " +
              $"GEMM F32 {limits.GemmF32Flops / 1e9:F1} GFLOP/s, BF16 {limits.GemmBf16Flops / 1e9:F1} GFLOP/s; " +
              $"memory copy {limits.CopyBytesPerSecond / 1e9:F2} GB/s (bytes read + written), read-only {limits.ReadBytesPerSecond / 1e9:F2} GB/s.";
Console.WriteLine("  " + machine);

if (suite is "decode" or "all") WriteSection("decode", DecodeTable());
if (suite is "adapters" or "all") WriteSection("adapters", AdapterTable());
if (suite is "train" or "all") WriteSection("train", TrainTable());
if (suite == "speculative") WriteSection(Value("--section") ?? "speculative", SpeculativeBench.Table(Value("--model")!, machine, newTokens,
    Value("--exit-layers"), Value("--num-speculations"), int.Parse(Value("--repeats") ?? "2", CultureInfo.InvariantCulture),
    cpuKernels: !argsList.Contains("--no-cpu-kernels"), draftVocabulary: Value("--draft-vocab"),
    draftConfidence: double.Parse(Value("--draft-confidence") ?? "0", CultureInfo.InvariantCulture),
    promptsFile: Value("--prompts"), maxPrompts: Value("--max-prompts") is null ? null : IntValue("--max-prompts", 0),
    packedWeights: !argsList.Contains("--no-packed-weights")));
if (suite == "gemmtokens") WriteSection("gemmtokens", GemmTokensBench.Run((Value("--tokens") ?? "1,2,3,4,5,7").Split(',').Select(int.Parse).ToArray(),
    IntValue("--repeats", 15), machine));
if (suite == "exitagreement") WriteSection(Value("--section") ?? "exitagreement", ExitAgreementBench.Table(Value("--models")!.Split(','), machine,
    Value("--prompts")!, Value("--max-prompts") is null ? 64 : IntValue("--max-prompts", 64)));
if (suite == "specpasses") WriteSection(Value("--section") ?? "specpasses", SpeculativePassesBench.Table(Value("--model")!, machine, Value("--draft-vocab"),
    packed: !argsList.Contains("--no-packed-weights")));
return 0;

string TrainTable()
{
    // The grid: full vs LoRA r=32, each precision, batch × length. --quick: one small shape, fp32 vs bf16-mixed.
    (int Batch, int Length)[] shapes = quick ? [(1, 128)] : [(1, 256), (4, 256), (8, 128), (2, 512)];
    TrainingPrecision[] precisions = quick ? [TrainingPrecision.Float32, TrainingPrecision.BFloat16Mixed]
        : [TrainingPrecision.Float32, TrainingPrecision.BFloat16Mixed, TrainingPrecision.BFloat16];
    int steps = IntValue("--steps", quick ? 2 : 3);
    var results = new List<TrainResult>();
    foreach (var method in new[] { "full", "lora" })
        foreach (var (batch, length) in shapes)
            foreach (var precision in precisions)
            {
                var r = TrainBench.RunInChild(method, precision, batch, length, steps, fusedAdamW);
                results.Add(r);
                Console.WriteLine($"  {method} {r.Precision} {batch}x{length}: {r.TokensPerSecond:F0} tok/s, {r.SecondsPerStep:F2} s/step, " +
                                  $"peak RSS {r.PeakRssBytes / (1 << 30):F2} GiB, losses [{string.Join(", ", r.Losses.Select(l => l.ToString("F4", CultureInfo.InvariantCulture)))}]; " +
                                  string.Join(", ", TrainResult.PhaseNames.Zip(r.PhaseSeconds!, (n, s) => $"{n} {s:F3} s")));
            }

    var table = new StringBuilder();
    table.AppendLine(machine);
    table.AppendLine();
    table.AppendLine($"Model: LLaMA 109.5M, random weights, random tokens (every position labelled); LoRA r=32 α=64 on q,k,v,up,down; " +
                     $"AdamW ({(fusedAdamW ? "the fused CPU step" : "TorchSharp's optim.AdamW, --no-fused-adamw")}), gradient clipping at 1.0; one warm-up step, then the mean of {steps} complete optimizer steps " +
                     "(forward + backward + clipping + AdamW step), each setting in a fresh process.");
    table.AppendLine();
    table.AppendLine("| method | precision | batch × length | trainable params | tokens/s | s/step | speed-up vs fp32 | model GFLOP/s | % of GEMM peak (dtype) | peak RSS GiB | RSS before training GiB | max \\|Δ loss\\| vs fp32 |");
    table.AppendLine("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    foreach (var r in results)
    {
        var fp32 = results.First(x => x.Method == r.Method && x.Batch == r.Batch && x.Length == r.Length && x.Precision == "fp32");
        double flops = r.TokensPerSecond * r.ModelFlopsPerToken;
        bool bf16 = r.Precision != "fp32";
        double peakFlops = bf16 ? limits.GemmBf16Flops : limits.GemmF32Flops;
        double lossGap = r.Losses.Zip(fp32.Losses).Max(p => Math.Abs(p.First - p.Second));
        table.AppendLine(string.Create(CultureInfo.InvariantCulture,
            $"| {r.Method} | {r.Precision} | {r.Batch} × {r.Length} | {r.TrainableParameters:N0} | {r.TokensPerSecond:F0} | {r.SecondsPerStep:F2} | " +
            $"{r.TokensPerSecond / fp32.TokensPerSecond:F2}× | {flops / 1e9:F1} | {100 * flops / peakFlops:F0}% ({(bf16 ? "BF16" : "F32")}) | " +
            $"{r.PeakRssBytes / (1 << 30):F2}{(r.PeakIsTrainingOnly ? "" : "*")} | {r.RssBeforeBytes / (1 << 30):F2} | {(bf16 ? lossGap.ToString("F4", CultureInfo.InvariantCulture) : "—")} |"));
    }
    table.AppendLine();
    table.AppendLine("Where the time of a step goes (mean seconds per timed step; the AdamW update includes bf16-mixed's copy of the masters into the model, forward + backward its accumulation of the gradients into the masters):");
    table.AppendLine();
    table.AppendLine("| method | precision | batch × length | " + string.Join(" | ", TrainResult.PhaseNames) + " |");
    table.AppendLine("|---|---|---|" + string.Concat(TrainResult.PhaseNames.Select(_ => "---:|")));
    foreach (var r in results)
        table.AppendLine($"| {r.Method} | {r.Precision} | {r.Batch} × {r.Length} | " +
                         string.Join(" | ", r.PhaseSeconds!.Select(x => x.ToString("F3", CultureInfo.InvariantCulture))) + " |");
    table.AppendLine();
    table.AppendLine("Model FLOPs per token: 6N for full training; for LoRA 2N forward + 2N backward through the activations + 2·N_lora for the " +
                     "adapter's weight gradients (N = all parameters including the adapter's; attention's own FLOPs not counted). " +
                     "The % is of the measured GEMM peak of the dtype the model computes in. Peak RSS is the process's resident-memory " +
                     "high-water mark (Linux VmHWM) over the training steps only, reset after the model and trainer were built (so it starts from the resident size then, shown as " +
                     "\"RSS before training\": the model, the runtime, and memory glibc kept from building the model)" +
                     (results.Any(r => !r.PeakIsTrainingOnly) ? " (* where the reset was not allowed: the whole process)" : "") +
                     "; it includes the .NET runtime and libtorch. Losses are on random tokens (about ln 32000 ≈ 10.4); " +
                     "the last column is the largest per-step difference from the fp32 run of the same setting.");
    return table.ToString();
}

string DecodeTable()
{
    var results = new List<DecodeResult>();
    foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16 })
    {
        using var model = AutoModel.FromConfig(BenchModels.Llama110M(), seed: 1, dtype: dtype, device: device);
        Console.WriteLine($"LLaMA {model.ParameterCount() / 1e6:F1}M parameters, {dtype}");
        foreach (var (batch, kernels) in new[] { (1, true), (1, false), (8, true) })
        {
            // Batch-1 float32 also without the CPU decode kernels, to show what they change (the libtorch path).
            if (!kernels && (dtype != ScalarType.Float32 || model is not LlamaForCausalLM)) continue;
            if (model is LlamaForCausalLM llama) llama.UseCpuDecodeKernels = kernels;
            var r = DecodeBench.Run(model, batch, promptLength, newTokens) with { Path = kernels ? "" : " (libtorch path)" };
            if (model is LlamaForCausalLM restore) restore.UseCpuDecodeKernels = true;
            results.Add(r);
            Console.WriteLine($"  batch {batch}{r.Path}: prefill {r.PrefillTokensPerSecond:F0} tok/s; decode {r.DecodeTokensPerSecond:F1} tok/s " +
                              $"(bare loop {r.ModelLoopDecodeTokensPerSecond:F1}); weights {r.DecodeWeightBytesPerSecond / 1e9:F2} GB/s = " +
                              $"{100 * r.DecodeWeightBytesPerSecond / limits.CopyBytesPerSecond:F0}% of copy bandwidth");
        }
    }
    Console.WriteLine("Output head alone (batch-1 matrix-vector product)...");
    var gemv = GemvBench.Table(GemvBench.Run());
    var table = new StringBuilder();
    table.AppendLine(machine);
    table.AppendLine();
    table.AppendLine($"Model: LLaMA 109.5M (hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000, tied), random weights; prompt {promptLength} tokens, {newTokens} new tokens, greedy, KV cache, best of 2 runs after a warm-up.");
    table.AppendLine();
    table.AppendLine("| dtype | batch | prefill tok/s | decode tok/s | bare-loop decode tok/s | weight GB/s in decode | % of copy bandwidth | % of read bandwidth | bandwidth limit tok/s (copy) |");
    table.AppendLine("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    foreach (var r in results)
    {
        double limitTokens = limits.CopyBytesPerSecond / r.WeightBytes * r.Batch;
        table.AppendLine(string.Create(CultureInfo.InvariantCulture,
            $"| {r.DType}{r.Path} | {r.Batch} | {r.PrefillTokensPerSecond:F0} | {r.DecodeTokensPerSecond:F1} | {r.ModelLoopDecodeTokensPerSecond:F1} | {r.DecodeWeightBytesPerSecond / 1e9:F2} | {100 * r.DecodeWeightBytesPerSecond / limits.CopyBytesPerSecond:F0}% | {100 * r.DecodeWeightBytesPerSecond / limits.ReadBytesPerSecond:F0}% | {limitTokens:F0} |"));
    }
    table.AppendLine();
    table.Append(gemv);
    return table.ToString();
}

string AdapterTable()
{
    int batch = quick ? 2 : 4, length = quick ? 64 : 256;
    var steps = new List<StepResult>();
    // --decode-only: just the unmerged-vs-merged LoRA decode comparison (quick A/B runs).
    if (!argsList.Contains("--decode-only"))
    {
        using (var model = AutoModel.FromConfig(BenchModels.Llama110M(), seed: 1, device: device))
        {
            foreach (var p in model.parameters()) p.requires_grad = false;
            steps.Add(AdapterBench.Step("forward only (no grad)", model, backward: false, batch, length));
            Console.WriteLine($"  {steps[^1].Setting}: {steps[^1].TokensPerSecond:F0} tok/s");
            foreach (var p in model.parameters()) p.requires_grad = true;
            steps.Add(AdapterBench.Step("full fine-tuning (forward + backward)", model, backward: true, batch, length));
            Console.WriteLine($"  {steps[^1].Setting}: {steps[^1].TokensPerSecond:F0} tok/s");
        }
        foreach (var r in new[] { 8, 32 })
        {
            using var peft = AdapterBench.Lora(AutoModel.FromConfig(BenchModels.Llama110M(), seed: 1, device: device), r);
            steps.Add(AdapterBench.Step($"LoRA r={r} on q,k,v,up,down (forward + backward)", peft, backward: true, batch, length));
            Console.WriteLine($"  {steps[^1].Setting}: {steps[^1].TokensPerSecond:F0} tok/s");
        }
    }

    // Inference: the same LoRA r=32 unmerged (adapter layers in the forward) and merged into the weights.
    DecodeResult unmerged, merged;
    using (var peft = AdapterBench.Lora(AutoModel.FromConfig(BenchModels.Llama110M(), seed: 1, device: device), 32))
    {
        foreach (var p in peft.parameters()) p.requires_grad = false;
        int fastSteps = AdapterFlow.Models.Cpu.LlamaCpuDecoder.StepsOnThisThread;
        unmerged = DecodeBench.Run(peft, 1, promptLength, newTokens);
        Console.WriteLine($"  unmerged: {AdapterFlow.Models.Cpu.LlamaCpuDecoder.StepsOnThisThread - fastSteps} decode steps through the CPU kernels");
        using var plain = peft.MergeAndUnload();
        merged = DecodeBench.Run(plain, 1, promptLength, newTokens);
    }
    Console.WriteLine($"  LoRA r=32 decode: unmerged {unmerged.DecodeTokensPerSecond:F1} tok/s, merged {merged.DecodeTokensPerSecond:F1} tok/s");

    var table = new StringBuilder();
    table.AppendLine(machine);
    table.AppendLine();
    table.AppendLine($"Model: LLaMA 109.5M, float32, random weights, batch {batch} × {length} tokens, best of 2 steps after a warm-up; " +
                     "loss = next-token cross-entropy; no optimiser step (forward + backward only).");
    table.AppendLine();
    table.AppendLine("| setting | trainable params | tokens/s | s/step | model GFLOP/s | % of GEMM F32 peak |");
    table.AppendLine("|---|---:|---:|---:|---:|---:|");
    foreach (var s in steps)
    {
        double flops = s.TokensPerSecond * s.ModelFlopsPerToken;
        table.AppendLine(string.Create(CultureInfo.InvariantCulture,
            $"| {s.Setting} | {s.TrainableParameters:N0} | {s.TokensPerSecond:F0} | {s.SecondsPerStep:F2} | {flops / 1e9:F1} | {100 * flops / limits.GemmF32Flops:F0}% |"));
    }
    table.AppendLine();
    table.AppendLine($"Model FLOPs per token: 2N for the forward, 6N for full fine-tuning, 4N for adapter training (N = 109.5M; attention's own FLOPs not counted).");
    table.AppendLine();
    table.AppendLine($"LoRA r=32 on q,k,v,up,down at inference (float32, batch 1, prompt {promptLength}, {newTokens} new tokens, greedy):");
    table.AppendLine();
    table.AppendLine("| LoRA | prefill tok/s | decode tok/s | decode slowdown vs merged |");
    table.AppendLine("|---|---:|---:|---:|");
    table.AppendLine(string.Create(CultureInfo.InvariantCulture, $"| merged into the weights | {merged.PrefillTokensPerSecond:F0} | {merged.DecodeTokensPerSecond:F1} | — |"));
    table.AppendLine(string.Create(CultureInfo.InvariantCulture,
        $"| unmerged (adapter layers) | {unmerged.PrefillTokensPerSecond:F0} | {unmerged.DecodeTokensPerSecond:F1} | {100 * (merged.DecodeTokensPerSecond / unmerged.DecodeTokensPerSecond - 1):F0}% |"));
    return table.ToString();
}

void WriteSection(string name, string table)
{
    Console.WriteLine();
    Console.WriteLine(table);
    if (outPath is null) return;
    string begin = $"<!-- bench:{name}:begin -->", end = $"<!-- bench:{name}:end -->";
    var section = $"{begin}\n{table}{end}";
    var text = File.Exists(outPath) ? File.ReadAllText(outPath) : "# Benchmarks\n\n";
    int b = text.IndexOf(begin, StringComparison.Ordinal), e = text.IndexOf(end, StringComparison.Ordinal);
    text = b >= 0 && e > b ? text[..b] + section + text[(e + end.Length)..] : text.TrimEnd() + "\n\n" + section + "\n";
    File.WriteAllText(outPath, text);
    Console.WriteLine($"Wrote section '{name}' of {outPath}");
}

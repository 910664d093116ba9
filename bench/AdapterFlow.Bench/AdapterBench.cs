using System.Diagnostics;
using AdapterFlow.Adapters;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Bench;

/// <summary>One measured training-step setting.</summary>
public sealed record StepResult(string Setting, long TrainableParameters, double TokensPerSecond, double ModelFlopsPerToken, double SecondsPerStep);

/// <summary>
/// Forward + backward throughput of the benchmark model with LoRA, against full fine-tuning and the bare forward,
/// and the decode cost of an unmerged LoRA against the same LoRA merged into the weights.
/// </summary>
public static class AdapterBench
{
    public static readonly string[] LoraTargets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"];

    /// <summary>Timed forward (+ backward) steps on random token batches: best of <paramref name="repeats"/> after a warm-up.</summary>
    public static StepResult Step(string setting, CausalLM model, bool backward, int batch, int length, int repeats = 2)
    {
        long parameters = model.ParameterCount();
        long trainable = model.parameters().Where(p => p.requires_grad).Sum(p => p.numel());
        double best = double.MaxValue;
        var random = new torch.Generator(7);
        for (int r = 0; r <= repeats; r++)
        {
            using var scope = torch.NewDisposeScope();
            var ids = torch.randint(3, model.Config.VocabSize, [batch, length], dtype: ScalarType.Int64, generator: random).to(model.Device);
            var sw = Stopwatch.StartNew();
            if (backward)
            {
                var logits = model.forward(new ForwardInput { InputIds = ids }).Logits;
                var loss = nn.functional.cross_entropy(logits.narrow(1, 0, length - 1).reshape(-1, logits.shape[2]),
                    ids.narrow(1, 1, length - 1).reshape(-1));
                loss.backward();
                loss.item<float>();
                foreach (var p in model.parameters()) p.grad?.zero_();
            }
            else
            {
                using var noGrad = torch.no_grad();
                model.forward(new ForwardInput { InputIds = ids }).Logits.view(-1)[0].item<float>();
            }
            if (r > 0) best = Math.Min(best, sw.Elapsed.TotalSeconds);
        }
        // Model FLOPs per token: 2N forward; a full backward adds 4N (activations and weights), an adapter backward
        // about 2N (activations only; the adapters' own weight gradients are negligible).
        double flopsPerToken = !backward ? 2.0 * parameters : trainable >= parameters ? 6.0 * parameters : 4.0 * parameters;
        return new StepResult(setting, trainable, batch * length / best, flopsPerToken, best);
    }

    public static PeftModel Lora(CausalLM model, int r) => PeftModel.Create(model, new LoraConfig
    {
        R = r,
        LoraAlpha = 2 * r,
        TargetModules = ModuleSelector.Names(LoraTargets),
        // Random B as after training, so that merged and unmerged compute the same non-trivial function.
        InitLoraWeights = LoraInit.Random,
    });
}

/// <summary>
/// Unmerged vs merged LoRA decode on ONE model (PeftModel.Merge/Unmerge in place), alternating in short rounds so
/// that both see the same machine load: per-step times of bare batch-1 decode steps with the KV cache.
/// </summary>
public static class LoraStepBench
{
    public sealed record Result(int Threads, double MergedBest, double MergedMedian, double UnmergedBest, double UnmergedMedian,
        double MergedCpuMedian, double UnmergedCpuMedian)
    {
        /// <summary>Slowdown of unmerged vs merged by median step time.</summary>
        public double MedianSlowdown => UnmergedMedian / MergedMedian - 1;
        public double BestSlowdown => UnmergedBest / MergedBest - 1;
    }

    public static Result Run(AdapterFlow.Adapters.PeftModel peft, int threads, int rounds = 8, int stepsPerRound = 24, int prompt = 128)
    {
        int saved = AdapterFlow.Models.Cpu.CpuKernels.Threads;
        AdapterFlow.Models.Cpu.CpuKernels.Threads = threads;
        var merged = new List<double>();
        var unmerged = new List<double>();
        var mergedCpu = new List<double>();
        var unmergedCpu = new List<double>();
        try
        {
            for (int round = 0; round <= rounds; round++)
                foreach (bool merge in new[] { round % 2 == 0, round % 2 != 0 })
                {
                    if (merge) peft.Merge(); else peft.Unmerge();
                    var (times, cpu) = Steps(peft, prompt, stepsPerRound, seed: round);
                    if (round == 0) continue; // warm-up
                    (merge ? merged : unmerged).AddRange(times);
                    (merge ? mergedCpu : unmergedCpu).AddRange(cpu);
                }
        }
        finally
        {
            peft.Unmerge();
            AdapterFlow.Models.Cpu.CpuKernels.Threads = saved;
        }
        static double Median(List<double> x) { x.Sort(); return x[x.Count / 2]; }
        return new Result(threads, merged.Min(), Median(merged), unmerged.Min(), Median(unmerged), Median(mergedCpu), Median(unmergedCpu));
    }

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "clock_gettime")]
    private static extern int ClockGetTime(int clock, out TimeSpec time);

    private struct TimeSpec
    {
        public long Seconds, Nanoseconds;
    }

    /// <summary>CPU seconds the calling thread has run (Linux CLOCK_THREAD_CPUTIME_ID; NaN elsewhere): with one kernel
    /// thread, a step's work without the time other processes held the core.</summary>
    private static double ThreadCpuSeconds() =>
        OperatingSystem.IsLinux() && ClockGetTime(3, out var t) == 0 ? t.Seconds + t.Nanoseconds * 1e-9 : double.NaN;

    private static (List<double> Wall, List<double> Cpu) Steps(CausalLM model, int prompt, int steps, int seed)
    {
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        using var cache = model.CreateCache();
        var ids = torch.randint(3, model.Config.VocabSize, [1, prompt], dtype: ScalarType.Int64, generator: new torch.Generator((ulong)seed + 1));
        var next = model.forward(new ForwardInput { InputIds = ids, Cache = cache, LastPositionOnly = true }).Logits.select(1, 0).argmax(-1, keepdim: true);
        var times = new List<double>();
        var cpu = new List<double>();
        for (int i = 0; i < steps; i++)
        {
            using var step = torch.NewDisposeScope();
            double cpu0 = ThreadCpuSeconds();
            var sw = Stopwatch.StartNew();
            var chosen = model.forward(new ForwardInput { InputIds = next, Cache = cache, LastPositionOnly = true }).Logits.select(1, 0).argmax(-1, keepdim: true);
            chosen.cpu().Dispose();
            times.Add(sw.Elapsed.TotalSeconds);
            cpu.Add(ThreadCpuSeconds() - cpu0);
            next = chosen.MoveToOuterDisposeScope();
        }
        return (times, cpu);
    }
}

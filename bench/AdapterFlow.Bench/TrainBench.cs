using System.Diagnostics;
using System.Globalization;
using System.Reflection;
using System.Text.Json;
using AdapterFlow.Adapters;
using AdapterFlow.Models;
using AdapterFlow.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Bench;

/// <summary>One measured training setting: complete optimizer steps through the library's <see cref="Trainer"/>.</summary>
public sealed record TrainResult(string Method, string Precision, int Batch, int Length, long Parameters, long TrainableParameters,
    double TokensPerSecond, double SecondsPerStep, double ModelFlopsPerToken, double RssBeforeBytes, double PeakRssBytes, bool PeakIsTrainingOnly, double[] Losses,
    double[]? PhaseSeconds = null)
{
    /// <summary>Names of <see cref="PhaseSeconds"/>' entries: mean seconds per timed step of each part of it.</summary>
    public static readonly string[] PhaseNames = ["zero_grad", "forward + backward", "grad norm + clip", "AdamW update"];
}

/// <summary>
/// Training throughput of the benchmark model: full fine-tuning and LoRA r = 32 on q, k, v, up, down, under each
/// <see cref="TrainingPrecision"/>, over a batch × length grid. Every setting runs in a fresh child process so that
/// its peak resident memory is its own (glibc keeps freed memory mapped, so one process could not tell the
/// settings apart).
/// </summary>
public static class TrainBench
{
    /// <summary>Child-process entry: runs one setting and prints its result as one JSON line after <c>RESULT </c>.</summary>
    public static int RunChild(string method, TrainingPrecision precision, int batch, int length, int steps, bool fusedOptimizer = true)
    {
        var result = Measure(method, precision, batch, length, steps, CPU, fusedOptimizer);
        Console.WriteLine("RESULT " + JsonSerializer.Serialize(result));
        return 0;
    }

    /// <summary>Runs one setting in a child process (this executable with the <c>train-one</c> command).</summary>
    public static TrainResult RunInChild(string method, TrainingPrecision precision, int batch, int length, int steps, bool fusedOptimizer = true)
    {
        var start = new ProcessStartInfo { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        var self = Environment.ProcessPath!;
        start.FileName = self;
        // Under `dotnet Bench.dll` the process is the dotnet host: pass the assembly first.
        if (Path.GetFileNameWithoutExtension(self) == "dotnet") start.ArgumentList.Add(Assembly.GetExecutingAssembly().Location);
        foreach (var arg in new[] { "train-one", "--method", method, "--precision", TrainingPrecisionNames.Name(precision),
                     "--batch", batch.ToString(CultureInfo.InvariantCulture), "--length", length.ToString(CultureInfo.InvariantCulture),
                     "--steps", steps.ToString(CultureInfo.InvariantCulture) })
            start.ArgumentList.Add(arg);
        if (!fusedOptimizer) start.ArgumentList.Add("--no-fused-adamw");
        using var child = Process.Start(start)!;
        var stderr = child.StandardError.ReadToEndAsync();
        var stdout = child.StandardOutput.ReadToEnd();
        child.WaitForExit();
        var line = stdout.Split('\n').FirstOrDefault(l => l.StartsWith("RESULT ", StringComparison.Ordinal));
        if (child.ExitCode != 0 || line is null)
            throw new InvalidOperationException($"train-one {method} {TrainingPrecisionNames.Name(precision)} {batch}x{length} failed (exit {child.ExitCode}): {stderr.Result}{stdout}");
        return JsonSerializer.Deserialize<TrainResult>(line["RESULT ".Length..])!;
    }

    /// <summary>
    /// <paramref name="steps"/> timed optimizer steps (forward, backward, clipping, AdamW) after one warm-up step, on
    /// random tokens, every position labelled. Tokens/s is the mean over the timed steps. <paramref name="fusedOptimizer"/>
    /// false: TorchSharp's AdamW step instead of the fused CPU one (<see cref="TrainerOptions.FusedOptimizer"/>), to compare.
    /// </summary>
    public static TrainResult Measure(string method, TrainingPrecision precision, int batch, int length, int steps, Device device, bool fusedOptimizer = true)
    {
        var model = AutoModel.FromConfig(BenchModels.Llama110M(), seed: 1, device: device);
        torch.manual_seed(1); // the LoRA's random init: the same adapter in every setting, so losses compare
        long parameters = model.ParameterCount();
        nn.Module<ForwardInput, ForwardOutput> trained = method switch
        {
            "full" => model,
            "lora" => AdapterBench.Lora(model, 32),
            _ => throw new ArgumentException($"unknown method '{method}' (full, lora)"),
        };
        var options = new TrainerOptions
        {
            LearningRate = 1e-4, Schedule = LrScheduleKind.Constant, BatchSize = batch, MicroBatchSize = batch,
            MaxSteps = steps + 1, Precision = precision, Seed = 1, FusedOptimizer = fusedOptimizer,
        };
        using var trainer = trained is PeftModel peft ? Trainer.ForAdapter(peft, options) : Trainer.ForModel(model, options);
        long trainable = trainer.OptimizedParameters.Sum(p => p.Parameter.numel());

        var random = new Random(5);
        var data = Enumerable.Range(0, batch * (steps + 1)).Select(_ =>
        {
            var ids = Enumerable.Range(0, length).Select(_ => random.Next(3, model.Config.VocabSize)).ToArray();
            return new Example(ids, ids);
        }).ToArray();

        // The peak covers training only (weights, gradients, optimizer state, activations), not model construction.
        double before = PeakMemory.ResidentBytes();
        bool trainingOnly = PeakMemory.Reset();
        var phases = new List<double[]>();
        var metrics = trainer.Train(data, new Collator(padTokenId: 0), onStep: _ =>
        {
            var p = trainer.LastStepPhases!;
            phases.Add([p.ZeroGrad, p.ForwardBackward, p.Clip, p.Update]);
        }).Steps;
        double peak = PeakMemory.HighWaterMarkBytes();
        var timed = metrics.Skip(1).ToArray();
        double seconds = timed.Average(s => batch * length / s.TokensPerSecond);

        // Model FLOPs per token: full training 6N (2N forward, 4N backward). An adapter's backward computes activation
        // gradients through every layer (2N) but weight gradients only for the adapter (2·trainable).
        double flopsPerToken = method == "full" ? 6.0 * parameters : 4.0 * (parameters + trainable) + 2.0 * trainable;
        trained.Dispose();
        return new TrainResult(method, TrainingPrecisionNames.Name(precision), batch, length, parameters, trainable,
            batch * length / seconds, seconds, flopsPerToken, before, peak, trainingOnly, metrics.Select(s => s.Loss).ToArray(),
            Enumerable.Range(0, 4).Select(k => phases.Skip(1).Average(p => p[k])).ToArray());
    }
}

/// <summary>The process's resident-memory high-water mark (Linux /proc/self/status VmHWM).</summary>
public static class PeakMemory
{
    /// <summary>Resets the high-water mark to the current resident size (Linux ≥ 4.0); false where that is not allowed.</summary>
    public static bool Reset()
    {
        try
        {
            File.WriteAllText("/proc/self/clear_refs", "5");
            return true;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return false;
        }
    }

    public static double HighWaterMarkBytes() => StatusBytes("VmHWM:");

    /// <summary>Current resident size (VmRSS).</summary>
    public static double ResidentBytes() => StatusBytes("VmRSS:");

    private static double StatusBytes(string field)
    {
        if (!File.Exists("/proc/self/status")) return double.NaN;
        foreach (var line in File.ReadLines("/proc/self/status"))
            if (line.StartsWith(field, StringComparison.Ordinal))
                return double.Parse(line[field.Length..].Trim().Split(' ')[0], CultureInfo.InvariantCulture) * 1024;
        return double.NaN;
    }
}

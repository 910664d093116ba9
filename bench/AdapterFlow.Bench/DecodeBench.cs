using System.Diagnostics;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Bench;

/// <summary>One measured generation setting.</summary>
public sealed record DecodeResult(string DType, int Batch, int PromptLength, int NewTokens, double PrefillTokensPerSecond,
    double DecodeTokensPerSecond, double WeightBytes);

/// <summary>
/// Prefill and decode throughput of a model with the KV cache: greedy, a fixed number of new tokens, no early
/// stop, best of a few runs. Decode reads every weight once per step, so weight bytes × steps/s is the
/// bandwidth it achieves.
/// </summary>
public static class DecodeBench
{
    public static DecodeResult Run(CausalLM model, int batch, int promptLength, int newTokens, int repeats = 2)
    {
        double weightBytes = model.parameters().Select(p => (double)p.numel() * p.ElementSize).Sum();
        // A tied head is one tensor counted once by parameters(); nothing else to correct.
        double bestPrefill = double.MaxValue, bestDecode = double.MaxValue;
        var vocab = model.Config.VocabSize;
        for (int r = 0; r < repeats + 1; r++)
        {
            using var scope = torch.NewDisposeScope();
            using var noGrad = torch.no_grad();
            var gen = new torch.Generator(1234 + (ulong)r);
            var prompt = torch.randint(3, vocab, [batch, promptLength], dtype: ScalarType.Int64, generator: gen).to(model.Device);
            using var cache = model.CreateCache();
            var sw = Stopwatch.StartNew();
            var logits = model.forward(new ForwardInput { InputIds = prompt, Cache = cache, LastPositionOnly = true }).Logits;
            var next = logits.select(1, 0).argmax(-1, keepdim: true);
            next.cpu().Dispose();
            double prefill = sw.Elapsed.TotalSeconds;
            sw.Restart();
            for (int i = 0; i < newTokens; i++)
            {
                using var step = torch.NewDisposeScope();
                var positions = torch.full(batch, 1, promptLength + i, dtype: ScalarType.Int64, device: model.Device);
                var output = model.forward(new ForwardInput { InputIds = next, PositionIds = positions, Cache = cache, LastPositionOnly = true });
                var chosen = output.Logits.select(1, 0).argmax(-1, keepdim: true);
                chosen.cpu().Dispose(); // the host sync a real decoder needs to read the token
                next = chosen.MoveToOuterDisposeScope();
            }
            double decode = sw.Elapsed.TotalSeconds;
            if (r == 0) continue; // warm-up
            bestPrefill = Math.Min(bestPrefill, prefill);
            bestDecode = Math.Min(bestDecode, decode);
        }
        return new DecodeResult(model.DType.ToString(), batch, promptLength, newTokens,
            batch * promptLength / bestPrefill, batch * newTokens / bestDecode, weightBytes);
    }
}

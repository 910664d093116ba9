using System.Diagnostics;
using AdapterFlow.Generation;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Bench;

/// <summary>One measured generation setting.</summary>
public sealed record DecodeResult(string DType, int Batch, int PromptLength, int NewTokens,
    double PrefillTokensPerSecond, double DecodeTokensPerSecond, double ModelLoopDecodeTokensPerSecond, double WeightBytes)
{
    /// <summary>Weight bytes read per second while decoding (each step reads every weight once, whatever the batch).</summary>
    public double DecodeWeightBytesPerSecond => DecodeTokensPerSecond / Batch * WeightBytes;

    /// <summary>Empty for the default path; a note such as " (libtorch path)" for a comparison run.</summary>
    public string Path { get; init; } = "";
}

/// <summary>
/// Prefill and decode throughput with the KV cache, greedy, a fixed number of new tokens (no early stop), best of
/// a few runs after a warm-up. Measured twice: through <see cref="TextGenerator"/> (what users get) and through a bare
/// forward loop over the model (to show the generator's own overhead).
/// </summary>
public static class DecodeBench
{
    public static DecodeResult Run(CausalLM model, int batch, int promptLength, int newTokens, int repeats = 2)
    {
        double weightBytes = model.parameters().Select(p => (double)p.numel() * p.ElementSize).Sum();
        var generator = new AdapterFlow.Generation.TextGenerator(model);
        var options = new GenerationOptions { MaxNewTokens = newTokens, MinNewTokens = newTokens, StopTokenIds = [] };
        double bestPrefill = 0, bestDecode = 0, bestLoop = 0;
        for (int r = 0; r <= repeats; r++)
        {
            var prompts = RandomPrompts(model.Config.VocabSize, batch, promptLength, seed: 1234 + r);
            var result = generator.Generate(prompts, options);
            double loop = BareLoopTokensPerSecond(model, prompts, newTokens);
            if (r == 0) continue; // warm-up
            bestPrefill = Math.Max(bestPrefill, result.Stats.PromptTokensPerSecond);
            bestDecode = Math.Max(bestDecode, result.Stats.GenerationTokensPerSecond);
            bestLoop = Math.Max(bestLoop, loop);
        }
        return new DecodeResult(model.DType.ToString(), batch, promptLength, newTokens, bestPrefill, bestDecode, bestLoop, weightBytes);
    }

    private static IReadOnlyList<IReadOnlyList<int>> RandomPrompts(int vocab, int batch, int length, int seed)
    {
        var random = new Random(seed);
        return Enumerable.Range(0, batch).Select(_ => (IReadOnlyList<int>)Enumerable.Range(0, length).Select(_ => random.Next(3, vocab)).ToArray()).ToArray();
    }

    /// <summary>Decode tokens/s of the plainest loop: forward one token per row with the cache, argmax, repeat.</summary>
    private static double BareLoopTokensPerSecond(CausalLM model, IReadOnlyList<IReadOnlyList<int>> prompts, int newTokens)
    {
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        int batch = prompts.Count, length = prompts[0].Count;
        var ids = torch.tensor(prompts.SelectMany(p => p.Select(x => (long)x)).ToArray(), [batch, length]).to(model.Device);
        using var cache = model.CreateCache();
        var next = model.forward(new ForwardInput { InputIds = ids, Cache = cache, LastPositionOnly = true }).Logits.select(1, 0).argmax(-1, keepdim: true);
        next.cpu().Dispose();
        var sw = Stopwatch.StartNew();
        for (int i = 0; i < newTokens - 1; i++)
        {
            using var step = torch.NewDisposeScope();
            var positions = torch.full(batch, 1, length + i, dtype: ScalarType.Int64, device: model.Device);
            var chosen = model.forward(new ForwardInput { InputIds = next, PositionIds = positions, Cache = cache, LastPositionOnly = true })
                .Logits.select(1, 0).argmax(-1, keepdim: true);
            chosen.cpu().Dispose(); // the one host sync a decoder needs: reading the chosen ids
            next = chosen.MoveToOuterDisposeScope();
        }
        return batch * (newTokens - 1) / sw.Elapsed.TotalSeconds;
    }
}

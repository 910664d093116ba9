using AdapterFlow.Generation;
using AdapterFlow.Models;
using AdapterFlow.Tests.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Generation;

/// <summary>
/// Generation against transformers' generate() on the shared reference models: every architecture whose
/// family is registered on this branch runs; the others skip with a message.
/// </summary>
public class GenerationReferenceTests
{
    public static TheoryData<string> Architectures => new() { "llama", "mistral", "qwen2", "gpt2", "opt", "bloom", "gptj", "gpt_neox" };

    private static CausalLM Load(ReferenceCase reference)
    {
        var modelType = reference.Json["model_type"]!.GetValue<string>();
        Skip.If(ModelRegistry.All.All(f => f.ModelType != modelType), $"model family '{modelType}' is not on this branch yet");
        return AutoModel.FromPretrained(reference.Folder);
    }

    /// <summary>The rows of the reference batch without their left padding.</summary>
    private static int[][] UnpaddedPrompts(ReferenceCase reference)
    {
        using var ids = reference.Tensor("input_ids");
        using var mask = reference.Tensor("attention_mask");
        long rows = ids.shape[0], width = ids.shape[1];
        var id = ids.data<long>().ToArray();
        var m = mask.data<long>().ToArray();
        return Enumerable.Range(0, (int)rows)
            .Select(r => Enumerable.Range(0, (int)width).Where(t => m[r * width + t] == 1).Select(t => (int)id[r * width + t]).ToArray())
            .ToArray();
    }

    [SkippableTheory]
    [MemberData(nameof(Architectures))]
    public void GreedyWithCacheEqualsTransformers(string arch)
    {
        using var reference = ReferenceCase.Open(arch);
        using var model = Load(reference);
        var prompt = reference.GreedyPrompt.Select(i => (int)i).ToArray();
        var result = new TextGenerator(model).Generate(prompt, new GenerationOptions { MaxNewTokens = 10 });
        Assert.Equal(reference.GreedyNewTokens.Select(i => (int)i), result.Tokens);
        Assert.Equal(FinishReason.Length, result.FinishReason);
    }

    [SkippableTheory]
    [MemberData(nameof(Architectures))]
    public void PaddedBatchEqualsTransformersAndEachRowAlone(string arch)
    {
        using var reference = ReferenceCase.Open(arch);
        using var model = Load(reference);
        var prompts = UnpaddedPrompts(reference);
        Assert.True(prompts[0].Length != prompts[1].Length, "the reference batch should need padding");
        var generator = new TextGenerator(model);
        var options = new GenerationOptions { MaxNewTokens = 10 };
        var batch = generator.Generate(prompts, options);
        var expected = reference.GreedyBatchNewTokens;
        var actual = batch.ToPaddedArray(model.Config.PadTokenId ?? 0);
        for (int r = 0; r < expected.Length; r++)
        {
            Assert.Equal(expected[r].Select(i => (int)i), actual[r]);
            Assert.Equal(generator.Generate(prompts[r], options).Tokens, batch.Sequences[r].Tokens);
        }
    }

    [SkippableTheory]
    [MemberData(nameof(Architectures))]
    public void SampledBatchRowsEqualRowsSampledAloneWithTopKOne(string arch)
    {
        // Top-k = 1 makes sampling deterministic, so the padded batch must agree with greedy exactly.
        using var reference = ReferenceCase.Open(arch);
        using var model = Load(reference);
        var prompts = UnpaddedPrompts(reference);
        var generator = new TextGenerator(model);
        var sampled = generator.Generate(prompts, new GenerationOptions { MaxNewTokens = 10, DoSample = true, TopK = 1, Seed = 3 });
        var expected = reference.GreedyBatchNewTokens;
        for (int r = 0; r < expected.Length; r++)
            Assert.Equal(expected[r].Select(i => (int)i), sampled.Sequences[r].Tokens);
    }

    [SkippableTheory]
    [MemberData(nameof(Architectures))]
    public void StopTokenInTheMiddleEndsTheRowWithPadding(string arch)
    {
        using var reference = ReferenceCase.Open(arch);
        using var model = Load(reference);
        var prompts = UnpaddedPrompts(reference);
        var expected = reference.GreedyBatchNewTokens;
        int stop = (int)expected[0][4];
        int at = Array.IndexOf(expected[0], (long)stop);
        var result = new TextGenerator(model).Generate(prompts, new GenerationOptions { MaxNewTokens = 10, StopTokenIds = [stop] });
        Assert.Equal(expected[0].Take(at + 1).Select(i => (int)i), result.Sequences[0].Tokens);
        Assert.Equal(FinishReason.StopToken, result.Sequences[0].FinishReason);
        int atRow1 = Array.IndexOf(expected[1], (long)stop);
        var row1 = atRow1 < 0 ? expected[1] : expected[1].Take(atRow1 + 1).ToArray();
        Assert.Equal(row1.Select(i => (int)i), result.Sequences[1].Tokens);
    }

    [SkippableTheory]
    [MemberData(nameof(Architectures))]
    public void EarlyExitDecodingEqualsAnEarlyExitLoopWithoutCache(string arch)
    {
        using var reference = ReferenceCase.Open(arch);
        using var model = Load(reference);
        var prompts = UnpaddedPrompts(reference);
        var result = new TextGenerator(model).Generate(prompts, new GenerationOptions { MaxNewTokens = 8, StopTokenIds = [], Strategy = DecodingStrategyKind.EarlyExit, ExitLayer = 1 });
        for (int r = 0; r < prompts.Length; r++)
        {
            var tokens = prompts[r].Select(i => (long)i).ToList();
            for (int step = 0; step < 8; step++)
            {
                using var scope = torch.NewDisposeScope();
                using var no = torch.no_grad();
                var logits = model.forward(new ForwardInput { InputIds = torch.tensor(tokens.ToArray()).unsqueeze(0), ExitLayer = 1 }).Logits;
                tokens.Add(logits[0, -1].argmax().item<long>());
            }
            Assert.Equal(tokens.Skip(prompts[r].Length).Select(i => (int)i), result.Sequences[r].Tokens);
        }
    }

    [SkippableTheory]
    [MemberData(nameof(Architectures))]
    public void BeamSearchMatchesAPlainBeamSearchWithoutCache(string arch)
    {
        using var reference = ReferenceCase.Open(arch);
        using var model = Load(reference);
        var prompts = UnpaddedPrompts(reference);
        var generator = new TextGenerator(model);
        var options = new GenerationOptions { MaxNewTokens = 6, NumBeams = 3, StopTokenIds = [], LengthPenalty = 0 };
        var beams = generator.Generate(prompts, options);
        for (int r = 0; r < prompts.Length; r++)
        {
            var best = beams.Sequences[r];
            Assert.Equal(6, best.Tokens.Count);
            // The reported score is the sum of log-probabilities of the chosen tokens (length penalty 0).
            double logProb = SequenceLogProb(model, prompts[r], best.Tokens);
            Assert.Equal(logProb, best.Score!.Value, 3);
            // The same prompt alone gives the same beam result (padding and cache reordering are right).
            var alone = generator.Generate(prompts[r], options);
            Assert.Equal(best.Tokens, alone.Tokens);
            // An independent beam search: full forward passes, no cache, no batching.
            Assert.Equal(PlainBeamSearch(model, prompts[r], beams: 3, newTokens: 6), best.Tokens);
        }
    }

    /// <summary>Beam search without stop tokens, written as plainly as possible: keep the best beams by summed log-probability.</summary>
    private static int[] PlainBeamSearch(CausalLM model, int[] prompt, int beams, int newTokens)
    {
        var running = new List<(int[] Tokens, double Score)> { ([], 0.0) };
        for (int step = 0; step < newTokens; step++)
        {
            var candidates = new List<(int[] Tokens, double Score)>();
            foreach (var (tokens, score) in running)
            {
                using var scope = torch.NewDisposeScope();
                using var no = torch.no_grad();
                var ids = torch.tensor(prompt.Concat(tokens).Select(i => (long)i).ToArray()).unsqueeze(0);
                var logProbs = model.Logits(ids)[0, -1].log_softmax(-1).data<float>().ToArray();
                candidates.AddRange(logProbs.Select((lp, id) => ((int[])[.. tokens, id], score + lp)));
            }
            running = candidates.OrderByDescending(c => c.Score).Take(beams).ToList();
        }
        return running[0].Tokens;
    }

    private static double SequenceLogProb(CausalLM model, IReadOnlyList<int> prompt, IReadOnlyList<int> tokens)
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var all = prompt.Concat(tokens).Select(i => (long)i).ToArray();
        var logProbs = model.Logits(torch.tensor(all).unsqueeze(0))[0].log_softmax(-1);
        double total = 0;
        for (int i = 0; i < tokens.Count; i++)
            total += logProbs[prompt.Count - 1 + i, tokens[i]].item<float>();
        return total;
    }
}

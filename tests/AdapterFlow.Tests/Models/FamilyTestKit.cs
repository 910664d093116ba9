using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Models;

/// <summary>Checks every family needs: cache vs full forward, cached greedy decoding, save → load.</summary>
public static class FamilyTestKit
{
    /// <summary>
    /// Runs the full sequence once, then the same sequence as a prefill of <paramref name="prefill"/> tokens followed
    /// by one-token decode steps with a KVCache (attention mask growing, positions from the mask when asked).
    /// Returns the max |difference| of the logits over real positions.
    /// </summary>
    public static double CacheVsFullMaxDiff(CausalLM model, Tensor ids, Tensor? mask, bool positionsFromMask, int prefill)
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        long time = ids.shape[1];
        var positions = positionsFromMask && mask is not null ? DecoderParts.PositionIdsFromMask(mask) : null;
        var full = model.forward(new ForwardInput { InputIds = ids, AttentionMask = mask, PositionIds = positions }).Logits;
        using var cache = model.CreateCache();
        var steps = new List<Tensor>();
        var first = model.forward(new ForwardInput
        {
            InputIds = ids.narrow(1, 0, prefill),
            AttentionMask = mask?.narrow(1, 0, prefill),
            PositionIds = positions?.narrow(1, 0, prefill),
            Cache = cache,
        }).Logits;
        steps.Add(first);
        for (int t = prefill; t < time; t++)
        {
            var logits = model.forward(new ForwardInput
            {
                InputIds = ids.narrow(1, t, 1),
                AttentionMask = mask?.narrow(1, 0, t + 1),
                PositionIds = positions?.narrow(1, t, 1),
                Cache = cache,
            }).Logits;
            steps.Add(logits);
        }
        Assert.Equal((int)time, cache.Length);
        var cached = torch.cat(steps.ToArray(), 1);
        return ReferenceCase.MaxDiffWhereReal(cached, full, mask);
    }

    /// <summary>
    /// Greedy decoding of a (possibly left-padded) batch with a KVCache, as generate() does it: the mask grows by
    /// one real column per step and, when asked, positions come from the mask.
    /// </summary>
    public static long[][] GreedyWithCache(CausalLM model, Tensor ids, Tensor? mask, bool positionsFromMask, int newTokens)
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        long batch = ids.shape[0];
        mask ??= torch.ones_like(ids);
        using var cache = model.CreateCache();
        var result = Enumerable.Range(0, (int)batch).Select(_ => new long[newTokens]).ToArray();
        var input = ids;
        for (int step = 0; step < newTokens; step++)
        {
            using var stepScope = torch.NewDisposeScope();
            var positions = positionsFromMask ? DecoderParts.PositionIdsFromMask(mask).narrow(1, mask.shape[1] - input.shape[1], input.shape[1]) : null;
            var logits = model.forward(new ForwardInput
            {
                InputIds = input, AttentionMask = mask, PositionIds = positions, Cache = cache, LastPositionOnly = true,
            }).Logits;
            var next = logits.select(1, 0).argmax(-1); // [batch]
            var values = next.data<long>().ToArray();
            for (int b = 0; b < batch; b++) result[b][step] = values[b];
            input = next.unsqueeze(1).MoveToOuterDisposeScope();
            mask = torch.cat([mask, torch.ones(batch, 1, dtype: mask.dtype)], 1).MoveToOuterDisposeScope();
        }
        return result;
    }

    /// <summary>Saves, reloads and checks every state-dict tensor is bit-identical; returns the reloaded model.</summary>
    public static CausalLM SaveLoadIdentical(CausalLM model, string directory)
    {
        AutoModel.Save(model, directory);
        var loaded = AutoModel.FromPretrained(directory);
        var expected = model.state_dict();
        var actual = loaded.state_dict();
        Assert.Equal(expected.Keys.Order(), actual.Keys.Order());
        foreach (var (name, tensor) in expected)
        {
            Assert.True(tensor.dtype == actual[name].dtype, $"{name}: dtype changed");
            Assert.True(Same(tensor, actual[name]), $"{name}: values changed after save → load");
        }
        Assert.Equal(model.Config.ToJson().ToJsonString(), loaded.Config.ToJson().ToJsonString());
        return loaded;
    }

    /// <summary>Same shape, dtype and values.</summary>
    public static bool Same(Tensor a, Tensor b)
    {
        using var scope = torch.NewDisposeScope();
        return a.dtype == b.dtype && a.shape.SequenceEqual(b.shape) && a.eq(b).all().item<bool>();
    }

    public static string TempDirectory()
    {
        var dir = Path.Combine(Path.GetTempPath(), "adapterflow-tests", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        return dir;
    }
}

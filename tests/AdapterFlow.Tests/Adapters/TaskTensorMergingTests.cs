using AdapterFlow.Adapters;
using AdapterFlow.Adapters.Lora;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Adapters;

/// <summary>TIES, DARE and magnitude pruning on small hand-made tensors, and in AddWeightedAdapter.</summary>
public class TaskTensorMergingTests
{
    private static Tensor T(params float[] values) => torch.tensor(values);

    private static void AssertClose(float[] expected, Tensor actual, double tolerance = 1e-6)
    {
        var got = actual.to_type(ScalarType.Float32).data<float>().ToArray();
        Assert.Equal(expected.Length, got.Length);
        for (int i = 0; i < expected.Length; i++)
            Assert.True(Math.Abs(expected[i] - got[i]) <= tolerance, $"[{i}]: expected {expected[i]}, got {got[i]} (all: {string.Join(", ", got)})");
    }

    [Fact]
    public void Magnitude_prune_keeps_the_largest_entries()
    {
        using var scope = torch.NewDisposeScope();
        var t = torch.tensor(new float[,] { { 1, -4 }, { 3, 0.5f } });
        AssertClose([0, -4, 3, 0], TaskTensorMerging.MagnitudePrune(t, 0.5));
        AssertClose([0, -4, 0, 0], TaskTensorMerging.MagnitudePrune(t, 0.3)); // ⌊0.3·4⌋ = 1 entry
        AssertClose([0, 0, 0, 0], TaskTensorMerging.MagnitudePrune(t, 0));
        AssertClose([1, -4, 3, 0.5f], TaskTensorMerging.MagnitudePrune(t, 1));
        Assert.Throws<ArgumentException>(() => TaskTensorMerging.MagnitudePrune(t, -0.1));
    }

    [Fact]
    public void Sign_election_by_total_and_by_frequency()
    {
        using var scope = torch.NewDisposeScope();
        var stacked = torch.stack([T(1, -1, 2), T(-3, -1, 0), T(1, 2, -2)]);
        // Sums -1, 0, 0 → signs -, +, + (ties go to +); a zero never has the elected sign.
        var total = TaskTensorMerging.MajoritySignMask(stacked, MajoritySignMethod.Total);
        Assert.Equal(new[] { false, false, true, true, false, false, false, true, false }, total.reshape(-1).data<bool>().ToArray());
        // Sign counts 1, -1, 0 → +, -, +.
        var frequency = TaskTensorMerging.MajoritySignMask(stacked, MajoritySignMethod.Frequency);
        Assert.Equal(new[] { true, true, true, false, true, false, true, false, false }, frequency.reshape(-1).data<bool>().ToArray());
    }

    [Fact]
    public void Ties_trims_elects_on_unweighted_values_and_averages_the_agreeing_weighted_ones()
    {
        using var scope = torch.NewDisposeScope();
        // density 0.75 keeps 3 of 4: t1 → [1, -2, 3, 0], t2 → [-4, 1, 2, 0]; sums [-3, -1, 5, 0] → signs [-, -, +, +].
        // Weighted (1, 0.5): [1, -2, 3, 0] and [-2, 0.5, 1, 0]; agreeing entries averaged: [-2, -2, (3+1)/2, 0].
        var merged = TaskTensorMerging.Merge(LoraCombinationType.Ties, [T(1, -2, 3, 0.1f), T(-4, 1, 2, 0.2f)], [1, 0.5], density: 0.75);
        AssertClose([-2, -2, 2, 0], merged);
        // Magnitude pruning alone: the weighted sum of the trimmed tensors.
        var pruned = TaskTensorMerging.Merge(LoraCombinationType.MagnitudePrune, [T(1, -2, 3, 0.1f), T(-4, 1, 2, 0.2f)], [1, 0.5], density: 0.75);
        AssertClose([-1, -1.5f, 4, 0], pruned);
        // Linear ignores the density.
        AssertClose([-1, -1.5f, 4, 0.2f], TaskTensorMerging.Merge(LoraCombinationType.Linear, [T(1, -2, 3, 0.1f), T(-4, 1, 2, 0.2f)], [1, 0.5]));
    }

    [Fact]
    public void Dare_drops_at_random_and_rescales_the_rest_reproducibly_with_a_seed()
    {
        using var scope = torch.NewDisposeScope();
        var ones = torch.ones(4000);
        var first = TaskTensorMerging.RandomPrune(ones, 0.3, rescale: true, new torch.Generator(11));
        var values = first.data<float>().ToArray();
        Assert.All(values, v => Assert.True(v == 0 || Math.Abs(v - 1 / 0.3f) < 1e-5, $"{v} is neither dropped nor rescaled"));
        double kept = values.Count(v => v != 0) / (double)values.Length;
        Assert.InRange(kept, 0.26, 0.34);
        Assert.InRange(values.Average(), 0.85, 1.15); // the expected value survives the rescaling
        Assert.True(first.eq(TaskTensorMerging.RandomPrune(ones, 0.3, rescale: true, new torch.Generator(11))).all().item<bool>(), "same seed, same mask");
        Assert.False(first.eq(TaskTensorMerging.RandomPrune(ones, 0.3, rescale: true, new torch.Generator(12))).all().item<bool>(), "another seed, another mask");
        AssertClose(values.Select(v => v == 0 ? 0 : 1f).ToArray(), TaskTensorMerging.RandomPrune(ones, 0.3, rescale: false, new torch.Generator(11)));

        // dare_linear: the weighted sum of the pruned tensors; dare_ties: their sign-elected disjoint mean.
        Tensor a = T(1, -2, 3, -4, 5, -6), b = T(-1, 2, 2, 4, -5, -6);
        var linear = TaskTensorMerging.Merge(LoraCombinationType.DareLinear, [a, b], [0.5, 2], density: 0.5, generator: new torch.Generator(3));
        var replay = new torch.Generator(3);
        var pa = TaskTensorMerging.RandomPrune(a, 0.5, true, replay);
        var pb = TaskTensorMerging.RandomPrune(b, 0.5, true, replay);
        AssertClose((pa * 0.5 + pb * 2).data<float>().ToArray(), linear);
        var ties = TaskTensorMerging.Merge(LoraCombinationType.DareTies, [a, b], [0.5, 2], density: 0.5, generator: new torch.Generator(3));
        var pa2 = pa.data<float>().ToArray();
        var pb2 = pb.data<float>().ToArray();
        var expected = new float[6];
        for (int i = 0; i < 6; i++)
        {
            float sign = pa2[i] + pb2[i] >= 0 ? 1 : -1;
            float sum = 0;
            int count = 0;
            if (Math.Sign(pa2[i]) == sign) { sum += pa2[i] * 0.5f; count++; }
            if (Math.Sign(pb2[i]) == sign) { sum += pb2[i] * 2; count++; }
            expected[i] = count == 0 ? 0 : sum / count;
        }
        AssertClose(expected, ties, 1e-5);
    }

    [SkippableFact]
    public void AddWeightedAdapter_with_ties_dare_and_magnitude_prune()
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var peft = PeftModel.Create(PeftReferenceTests.LoadBase("llama"), new LoraConfig { R = 4, LoraAlpha = 8, InitLoraWeights = LoraInit.Random });
        peft.AddAdapter("b", new LoraConfig { R = 4, LoraAlpha = 16, InitLoraWeights = LoraInit.Random });
        // With nothing pruned, one adapter: each pair scaled by √(w·s), so the update is w·ΔW.
        peft.AddWeightedAdapter(["default"], [0.6], "ties1", LoraCombinationType.Ties, density: 1);
        peft.AddWeightedAdapter(["default"], [0.6], "dare1", LoraCombinationType.DareLinear, density: 1);
        // Two adapters, nothing pruned: magnitude_prune is the linear combination.
        peft.AddWeightedAdapter(["default", "b"], [0.6, 0.3], "mp", LoraCombinationType.MagnitudePrune, density: 1);
        peft.AddWeightedAdapter(["default", "b"], [0.6, 0.3], "lin", LoraCombinationType.Linear);
        peft.AddWeightedAdapter(["default", "b"], [0.6, 0.3], "ties", LoraCombinationType.Ties, density: 0.5);
        peft.AddWeightedAdapter(["default", "b"], [0.6, 0.3], "dt", LoraCombinationType.DareTies, density: 0.5, generator: new torch.Generator(1));
        foreach (var layer in peft.AdapterLayers.Values.Cast<LoraLinear>())
        {
            var expected = layer.DeltaWeight("default") * 0.6;
            Assert.True((layer.DeltaWeight("ties1") - expected).abs().max().item<float>() < 1e-5, "ties of one adapter");
            Assert.True((layer.DeltaWeight("dare1") - expected).abs().max().item<float>() < 1e-5, "dare of one adapter at density 1");
            Assert.True((layer.DeltaWeight("mp") - layer.DeltaWeight("lin")).abs().max().item<float>() < 1e-5, "magnitude_prune at density 1");
            // TIES on A and on B separately, each adapter's pair weighted by √(w·scaling) (PEFT's convention).
            double[] factors = [Math.Sqrt(0.6 * layer.Scaling("default")), Math.Sqrt(0.3 * layer.Scaling("b"))];
            Assert.Equal(2.0, layer.Scaling("default"));
            Assert.Equal(4.0, layer.Scaling("b"));
            var tiesA = TaskTensorMerging.Merge(LoraCombinationType.Ties, [layer.A("default").weight!, layer.A("b").weight!], factors, 0.5);
            var tiesB = TaskTensorMerging.Merge(LoraCombinationType.Ties, [layer.B("default").weight!, layer.B("b").weight!], factors, 0.5);
            Assert.True((layer.A("ties").weight! - tiesA).abs().max().item<float>() < 1e-6, "ties A");
            var linA = layer.A("default").weight! * factors[0] + layer.A("b").weight! * factors[1];
            Assert.True((layer.A("lin").weight! - linA).abs().max().item<float>() < 1e-6, "linear A = Σ √(w·s)·A");
            Assert.True((layer.B("ties").weight! - tiesB).abs().max().item<float>() < 1e-6, "ties B");
            Assert.True((layer.DeltaWeight("ties") - tiesB.matmul(tiesA)).abs().max().item<float>() < 1e-5, "ties update = B·A at scaling 1");
            Assert.True(layer.A("dt").weight!.isfinite().all().item<bool>());
        }
        Assert.Throws<ArgumentException>(() => peft.AddWeightedAdapter(["default", "b"], [1, 1], "nodensity", LoraCombinationType.Ties));
        // Negative weights (PEFT ≥ 0.18): the sign goes on A only, so one adapter at weight −w gives −w·ΔW.
        peft.AddWeightedAdapter(["default"], [-0.4], "neg", LoraCombinationType.Linear);
        peft.AddWeightedAdapter(["default", "b"], [1, -1], "negties", LoraCombinationType.DareTies, density: 0.5, generator: new torch.Generator(2));
        foreach (var layer in peft.AdapterLayers.Values.Cast<LoraLinear>())
        {
            Assert.True((layer.DeltaWeight("neg") + layer.DeltaWeight("default") * 0.4).abs().max().item<float>() < 1e-5, "negative weight");
            Assert.True(layer.B("neg").weight!.mul(layer.B("default").weight!).ge(0).all().item<bool>(), "B keeps its sign");
            Assert.True(layer.A("negties").weight!.isfinite().all().item<bool>());
        }
    }

    /// <summary>The rank-k truncation U_k·S_k·V_kᴴ of a matrix (what an SVD combination keeps).</summary>
    private static Tensor Truncate(Tensor m, long k)
    {
        var (u, s, vh) = torch.linalg.svd(m, fullMatrices: false);
        k = Math.Min(k, s.shape[0]);
        return (u.narrow(1, 0, k) * s.narrow(0, 0, k)).matmul(vh.narrow(0, 0, k));
    }

    public static TheoryData<LoraCombinationType, LoraCombinationType> SvdCases() => new()
    {
        { LoraCombinationType.Svd, LoraCombinationType.Linear },
        { LoraCombinationType.TiesSvd, LoraCombinationType.Ties },
        { LoraCombinationType.DareLinearSvd, LoraCombinationType.DareLinear },
        { LoraCombinationType.DareTiesSvd, LoraCombinationType.DareTies },
        { LoraCombinationType.MagnitudePruneSvd, LoraCombinationType.MagnitudePrune },
    };

    [SkippableTheory]
    [MemberData(nameof(SvdCases))]
    public void Svd_variants_merge_whole_updates_then_truncate(LoraCombinationType combination, LoraCombinationType onUpdates)
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var peft = PeftModel.Create(PeftReferenceTests.LoadBase("llama"), new LoraConfig { R = 4, LoraAlpha = 8, InitLoraWeights = LoraInit.Random });
        peft.AddAdapter("b", new LoraConfig { R = 2, LoraAlpha = 2, UseRslora = true, InitLoraWeights = LoraInit.Random });
        double[] weights = [0.7, -1.2];
        const int rank = 3;
        peft.AddWeightedAdapter(["default", "b"], weights, "mix", combination, svdRank: rank, density: 0.5,
            majoritySignMethod: MajoritySignMethod.Frequency, generator: new torch.Generator(42));
        // Replay the same merge on the whole updates (one generator draw per layer, in the same order).
        var replay = new torch.Generator(42);
        foreach (var layer in peft.AdapterLayers.Values.Cast<LoraLinear>())
        {
            Assert.Equal(rank, layer.A("mix").weight!.shape[0]);
            Assert.Equal(1.0, layer.Scaling("mix"));
            var merged = TaskTensorMerging.Merge(onUpdates, [layer.DeltaWeight("default"), layer.DeltaWeight("b")], weights, 0.5,
                MajoritySignMethod.Frequency, replay);
            var expected = Truncate(merged, rank);
            var diff = (layer.DeltaWeight("mix") - expected).abs().max().item<float>();
            Assert.True(diff < 1e-4, $"{combination}: the combined update differs from the rank-{rank} truncation of {onUpdates} by {diff}");
            // Truncation matters here (the merged update has a higher rank), so this is not the plain merge.
            Assert.True(torch.linalg.matrix_rank(merged).item<long>() > rank);
        }
        Assert.Throws<ArgumentException>(() => peft.AddWeightedAdapter(["default", "b"], [1, 1], "nodensity", combination == LoraCombinationType.Svd ? LoraCombinationType.TiesSvd : combination));
    }

    [SkippableFact]
    public void Svd_clamp_limits_the_factors_to_a_quantile()
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var peft = PeftModel.Create(PeftReferenceTests.LoadBase("llama"), new LoraConfig { R = 4, InitLoraWeights = LoraInit.Random });
        peft.AddAdapter("b", new LoraConfig { R = 4, InitLoraWeights = LoraInit.Random });
        peft.AddWeightedAdapter(["default", "b"], [1, 1], "free", LoraCombinationType.Svd);
        peft.AddWeightedAdapter(["default", "b"], [1, 1], "clamped", LoraCombinationType.Svd, svdClamp: 0.9);
        foreach (var layer in peft.AdapterLayers.Values.Cast<LoraLinear>())
        {
            var a = layer.A("free").weight!;
            var b = layer.B("free").weight!;
            var all = torch.cat([b.flatten(), a.flatten()]);
            double limit = torch.quantile(all, torch.tensor(0.9f)).item<float>();
            Assert.True((layer.A("clamped").weight! - a.clamp(-limit, limit)).abs().max().item<float>() < 1e-6);
            Assert.True((layer.B("clamped").weight! - b.clamp(-limit, limit)).abs().max().item<float>() < 1e-6);
            Assert.True(a.abs().max().item<float>() > limit || b.abs().max().item<float>() > limit, "nothing was clamped");
        }
        Assert.Throws<ArgumentException>(() => peft.AddWeightedAdapter(["default", "b"], [1, 1], "bad", LoraCombinationType.Cat, svdClamp: 0.9));
    }

    [SkippableFact]
    public void Embedding_loras_and_a_trained_module_combine()
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        LoraConfig Config(bool saveHead) => new()
        {
            R = 2, InitLoraWeights = LoraInit.Random, TargetModules = ModuleSelector.Names("embed_tokens", "q_proj"),
            ModulesToSave = saveHead ? ["lm_head"] : null,
        };
        var peft = PeftModel.Create(PeftReferenceTests.LoadBase("qwen2"), Config(true));
        peft.AddAdapter("b", Config(false));
        var head = Assert.IsType<ModulesToSaveWrapper>(peft.AdapterLayers["lm_head"]);
        var trained = ((TorchSharp.Modules.Linear)head.Copy("default")).weight!;
        trained.add_(0.01);
        peft.AddWeightedAdapter(["default", "b"], [0.5, 2], "cat", LoraCombinationType.Cat);
        peft.AddWeightedAdapter(["default", "b"], [0.5, 2], "svd", LoraCombinationType.Svd, svdRank: 4);
        var embedding = Assert.IsType<LoraEmbedding>(peft.AdapterLayers["model.embed_tokens"]);
        var expected = embedding.DeltaWeight("default") * 0.5 + embedding.DeltaWeight("b") * 2;
        Assert.True((embedding.DeltaWeight("cat") - expected).abs().max().item<float>() < 1e-4, "cat on an embedding");
        Assert.True((embedding.DeltaWeight("svd") - expected).abs().max().item<float>() < 1e-3, "svd at full rank on an embedding");
        // The head trained by "default" comes with the combination.
        Assert.True(((TorchSharp.Modules.Linear)head.Copy("cat")).weight!.eq(trained).all().item<bool>());
        // Two adapters that both train the head cannot be combined (as PEFT).
        peft.AddAdapter("c", Config(true));
        var error = Assert.Throws<ArgumentException>(() => peft.AddWeightedAdapter(["default", "c"], [1, 1], "bad", LoraCombinationType.Cat));
        Assert.Contains("lm_head", error.Message);
    }
}

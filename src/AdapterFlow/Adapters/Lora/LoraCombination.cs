using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Adapters.Lora;

/// <summary>How <see cref="LoraCombination.AddWeightedAdapter"/> combines LoRA adapters (PEFT's combination_type).</summary>
public enum LoraCombinationType
{
    /// <summary>A = Σ ±√|wᵢ·sᵢ|·Aᵢ, B = Σ √|wᵢ·sᵢ|·Bᵢ (same rank required; not the exact sum of the updates, as PEFT).</summary>
    Linear,
    /// <summary>A and B stacked along the rank: exactly Σ wᵢ·ΔWᵢ, rank Σ rᵢ.</summary>
    Cat,
    /// <summary>Σ wᵢ·ΔWᵢ truncated to a rank by SVD.</summary>
    Svd,
    /// <summary>TIES on A and on B (factors as Linear): keep the top density by magnitude, elect signs, disjoint mean.</summary>
    Ties,
    /// <summary>DARE on A and on B: drop entries at random (keep probability density), rescale by 1/density, weighted sum.</summary>
    DareLinear,
    /// <summary>DARE pruning followed by TIES' sign election and disjoint mean, on A and on B.</summary>
    DareTies,
    /// <summary>Magnitude pruning of A and of B to the density, then a weighted sum.</summary>
    MagnitudePrune,
    /// <summary>TIES on the whole updates wᵢ·ΔWᵢ, truncated to a rank by SVD (PEFT's ties_svd).</summary>
    TiesSvd,
    /// <summary>DARE (drop and rescale) on the whole updates, summed, truncated by SVD (PEFT's dare_linear_svd).</summary>
    DareLinearSvd,
    /// <summary>DARE then TIES on the whole updates, truncated by SVD (PEFT's dare_ties_svd).</summary>
    DareTiesSvd,
    /// <summary>Magnitude pruning of the whole updates, summed, truncated by SVD (PEFT's magnitude_prune_svd).</summary>
    MagnitudePruneSvd,
}

/// <summary>PEFT's add_weighted_adapter for LoRA: a new adapter made from weighted existing ones.</summary>
public static class LoraCombination
{
    /// <summary>The combinations that work on A and B separately (same rank needed).</summary>
    private static bool OnFactors(LoraCombinationType c) => c is LoraCombinationType.Linear or LoraCombinationType.Ties
        or LoraCombinationType.DareLinear or LoraCombinationType.DareTies or LoraCombinationType.MagnitudePrune;

    /// <summary>The combinations that merge whole updates and factor the result by SVD.</summary>
    private static bool OnUpdates(LoraCombinationType c) => c is LoraCombinationType.Svd or LoraCombinationType.TiesSvd
        or LoraCombinationType.DareLinearSvd or LoraCombinationType.DareTiesSvd or LoraCombinationType.MagnitudePruneSvd;

    /// <summary>The task-tensor merge an SVD variant applies to the whole updates before factoring them.</summary>
    private static LoraCombinationType UpdateMerge(LoraCombinationType c) => c switch
    {
        LoraCombinationType.TiesSvd => LoraCombinationType.Ties,
        LoraCombinationType.DareLinearSvd => LoraCombinationType.DareLinear,
        LoraCombinationType.DareTiesSvd => LoraCombinationType.DareTies,
        LoraCombinationType.MagnitudePruneSvd => LoraCombinationType.MagnitudePrune,
        _ => LoraCombinationType.Linear,
    };

    /// <param name="peft">The model holding the LoRA adapters.</param>
    /// <param name="adapters">Names of the adapters to combine.</param>
    /// <param name="weights">One weight per adapter (negative weights subtract an adapter).</param>
    /// <param name="newName">Name of the new adapter (added, not activated).</param>
    /// <param name="combination">How to combine (PEFT's combination_type). With one adapter PEFT always uses Linear, and so does this.</param>
    /// <param name="svdRank">Rank of the SVD combinations (default: the largest rank combined, rank_pattern included).</param>
    /// <param name="density">Fraction of entries kept by the TIES, DARE and magnitude-prune combinations (required for them).</param>
    /// <param name="majoritySignMethod">How the TIES combinations elect signs.</param>
    /// <param name="generator">Random source of DARE's drops (a CPU generator; null: torch's global one).</param>
    /// <param name="svdClamp">PEFT's svd_clamp: clamp the SVD factors to ± this quantile of their entries (0..1; null: no clamping).</param>
    public static void AddWeightedAdapter(this PeftModel peft, IReadOnlyList<string> adapters, IReadOnlyList<double> weights,
        string newName, LoraCombinationType combination = LoraCombinationType.Svd, int? svdRank = null,
        double? density = null, MajoritySignMethod majoritySignMethod = MajoritySignMethod.Total, torch.Generator? generator = null,
        double? svdClamp = null)
    {
        if (adapters.Count == 0 || adapters.Count != weights.Count)
            throw new ArgumentException($"give one weight per adapter ({adapters.Count} adapters, {weights.Count} weights)");
        var configs = adapters.Select(a => peft.Configs.TryGetValue(a, out var c)
            ? c as LoraConfig ?? throw new ArgumentException($"adapter '{a}' is {c.PeftType}, not LoRA")
            : throw new ArgumentException($"no adapter named '{a}'")).ToArray();
        // As PEFT: a single adapter is always combined linearly (exact: w·ΔW).
        if (adapters.Count == 1) combination = LoraCombinationType.Linear;
        bool pruning = combination is not (LoraCombinationType.Linear or LoraCombinationType.Cat or LoraCombinationType.Svd);
        if (pruning && density is not (>= 0 and <= 1))
            throw new ArgumentException($"the {combination} combination needs a density in [0, 1] (the fraction of entries kept), got {(density?.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? "none")}");
        if (svdClamp is not null && (!OnUpdates(combination) || svdClamp is not (> 0 and <= 1)))
            throw new ArgumentException($"svd_clamp must be a quantile in (0, 1] and needs an SVD combination (got {svdClamp} with {combination})");
        if (configs.Any(c => c.UseDora)) throw new NotSupportedException("DoRA adapters cannot be combined (as in PEFT)");

        var layers = peft.AdapterLayers
            .Where(kv => adapters.Any(a => Factors(kv.Value, a) is not null))
            .ToDictionary(kv => kv.Key, kv => kv.Value);
        if (layers.Count == 0) throw new ArgumentException($"adapters {string.Join(", ", adapters)} hold no LoRA layer");
        int Rank(IAdapterLayer layer, string a) => (int)Factors(layer, a)!.Value.A.shape[0];
        var ranks = layers.Values.SelectMany(l => adapters.Where(a => Factors(l, a) is not null).Select(a => Rank(l, a))).ToArray();

        int newRank;
        if (OnFactors(combination))
        {
            newRank = ranks.Distinct().Count() == 1
                ? ranks[0]
                : throw new ArgumentException($"the {combination} combination needs adapters of one rank; use Cat or an SVD combination");
        }
        else if (combination == LoraCombinationType.Cat)
        {
            // Ranks can differ per module (rank_pattern): the concatenated rank is the largest per-module sum.
            newRank = layers.Values.Max(l => adapters.Where(a => Factors(l, a) is not null).Sum(a => Rank(l, a)));
        }
        else
        {
            newRank = svdRank ?? configs.Max(c => c.RankPattern.Count == 0 ? c.R : Math.Max(c.R, (int)c.RankPattern.Values.Max()));
            if (newRank <= 0) throw new ArgumentException($"svd_rank must be positive, got {newRank}");
        }

        var saved = ModulesToSaveSources(peft, adapters);
        var config = new LoraConfig
        {
            R = newRank,
            LoraAlpha = newRank, // scaling 1: the weights and scalings are folded into A and B
            TargetModules = ModuleSelector.Names(layers.Keys.Order(StringComparer.Ordinal).ToArray()),
            LoraDropout = configs[0].LoraDropout,
            BaseModelNameOrPath = configs[0].BaseModelNameOrPath,
            ModulesToSave = saved.Count == 0 ? null : configs.SelectMany(c => c.ModulesToSave ?? []).Distinct().ToArray(),
        };
        peft.AddAdapter(newName, config, activate: false);

        using var no = torch.no_grad();
        // A module trained in full by one of the adapters keeps that training in the combination.
        foreach (var (wrapper, source) in saved)
            foreach (var (target, from) in ((nn.Module)wrapper.Copy(newName)).parameters().Zip(((nn.Module)wrapper.Copy(source)).parameters()))
                target.copy_(from);

        foreach (var layer in layers.Values)
        {
            using var scope = torch.NewDisposeScope();
            var (a, b, _) = Factors(layer, newName)!.Value;
            var present = adapters.Select((name, i) => (name, w: weights[i], f: Factors(layer, name)))
                .Where(x => x.f is not null).Select(x => (x.name, x.w, f: x.f!.Value)).ToArray();
            a.zero_();
            b.zero_();
            if (OnFactors(combination))
            {
                // As PEFT: A and B are merged separately, each adapter's pair weighted by √|wᵢ·sᵢ| with the sign on A
                // only, so that for a single adapter with nothing pruned the product is wᵢ·sᵢ·BᵢAᵢ.
                var ws = present.Select(x => x.w * x.f.S).ToArray();
                var factorsA = ws.Select(v => Math.Sign(v) * Math.Sqrt(Math.Abs(v))).ToArray();
                var factorsB = ws.Select(v => Math.Sqrt(Math.Abs(v))).ToArray();
                a.copy_(TaskTensorMerging.Merge(combination, present.Select(x => x.f.A).ToArray(), factorsA, density ?? 1, majoritySignMethod, generator));
                b.copy_(TaskTensorMerging.Merge(combination, present.Select(x => x.f.B).ToArray(), factorsB, density ?? 1, majoritySignMethod, generator));
            }
            else if (combination == LoraCombinationType.Cat)
            {
                // As PEFT: Aᵢ carries wᵢ·sᵢ, Bᵢ is copied as it is.
                long offset = 0;
                foreach (var (_, w, f) in present)
                {
                    long r = f.A.shape[0];
                    a.narrow(0, offset, r).copy_(f.A * (w * f.S));
                    b.narrow(1, offset, r).copy_(f.B);
                    offset += r;
                }
            }
            else
            {
                // Whole updates sᵢ·BᵢAᵢ ([out, in]; an embedding's [hidden, vocab]) merged with the weights wᵢ, then
                // factored. PEFT 0.20 multiplies the weights by sᵢ once more (the scaling applied twice); this follows
                // the maintainers' fix (huggingface/peft#3111), which drops the extra factor.
                var updates = present.Select(x => x.f.B.to_type(ScalarType.Float32).matmul(x.f.A.to_type(ScalarType.Float32)) * x.f.S).ToArray();
                var merged = TaskTensorMerging.Merge(UpdateMerge(combination), updates, present.Select(x => x.w).ToArray(),
                    density ?? 1, majoritySignMethod, generator);
                var (u, s, vh) = torch.linalg.svd(merged, fullMatrices: false);
                long k = Math.Min(newRank, s.shape[0]);
                var left = u.narrow(1, 0, k) * s.narrow(0, 0, k);
                var right = vh.narrow(0, 0, k);
                if (svdClamp is { } q)
                {
                    var limit = Quantile(torch.cat([left.flatten(), right.flatten()]), q);
                    left = left.clamp(-limit, limit);
                    right = right.clamp(-limit, limit);
                }
                a.narrow(0, 0, k).copy_(right);
                b.narrow(1, 0, k).copy_(left);
            }
        }
    }

    /// <summary>The LoRA factors of one adapter in a layer: A [r, in], B [out, r] and the scaling; null if it has none there.</summary>
    private static (Tensor A, Tensor B, double S)? Factors(IAdapterLayer layer, string adapter) => layer switch
    {
        LoraLinear l when l.lora_A.Contains(adapter) => (l.A(adapter).weight!, l.B(adapter).weight!, l.Scaling(adapter)),
        LoraEmbedding e when e.lora_embedding_A.Contains(adapter) => (e.A(adapter), e.B(adapter), e.Scaling(adapter)),
        _ => null,
    };

    /// <summary>
    /// Modules trained in full (modules_to_save) by the combined adapters, each with the one adapter that trained it.
    /// As PEFT, two adapters with their own copy of one module cannot be combined: copies cannot be merged.
    /// </summary>
    private static List<(ModulesToSaveWrapper Wrapper, string Source)> ModulesToSaveSources(PeftModel peft, IReadOnlyList<string> adapters)
    {
        var result = new List<(ModulesToSaveWrapper, string)>();
        foreach (var (path, layer) in peft.AdapterLayers)
        {
            if (layer is not ModulesToSaveWrapper wrapper) continue;
            var owners = adapters.Where(wrapper.modules_to_save.Contains).ToArray();
            if (owners.Length > 1)
                throw new ArgumentException($"adapters {string.Join(" and ", owners)} each train their own copy of '{path}' (modules_to_save), which cannot be combined");
            if (owners.Length == 1) result.Add((wrapper, owners[0]));
        }
        return result;
    }

    /// <summary>
    /// The q-quantile of a 1-D tensor with linear interpolation (torch.quantile's default). Sorted by hand because
    /// torch.quantile refuses inputs over 2^24 entries, which the factors of a large layer exceed.
    /// </summary>
    private static double Quantile(Tensor values, double q)
    {
        var (sorted, _) = values.sort();
        double position = q * (sorted.shape[0] - 1);
        long lo = (long)Math.Floor(position), hi = (long)Math.Ceiling(position);
        double low = sorted[lo].item<float>(), high = sorted[hi].item<float>();
        return low + (high - low) * (position - lo);
    }
}

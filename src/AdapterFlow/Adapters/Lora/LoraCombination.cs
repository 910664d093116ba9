using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Adapters.Lora;

/// <summary>How <see cref="LoraCombination.AddWeightedAdapter"/> combines LoRA adapters (PEFT's combination_type).</summary>
public enum LoraCombinationType
{
    /// <summary>A = Σ √(wᵢ·sᵢ)·Aᵢ, B = Σ √(wᵢ·sᵢ)·Bᵢ (same rank required; not the exact sum of the updates, as PEFT).</summary>
    Linear,
    /// <summary>A and B stacked along the rank: exactly Σ wᵢ·ΔWᵢ, rank Σ rᵢ.</summary>
    Cat,
    /// <summary>Σ wᵢ·ΔWᵢ truncated to a rank by SVD.</summary>
    Svd,
    /// <summary>TIES on A and on B (with √(wᵢ·sᵢ) each): keep the top density by magnitude, elect signs, disjoint mean.</summary>
    Ties,
    /// <summary>DARE on A and on B: drop entries at random (keep probability density), rescale by 1/density, weighted sum.</summary>
    DareLinear,
    /// <summary>DARE pruning followed by TIES' sign election and disjoint mean.</summary>
    DareTies,
    /// <summary>Magnitude pruning to the density, then a weighted sum.</summary>
    MagnitudePrune,
}

/// <summary>PEFT's add_weighted_adapter for LoRA: a new adapter made from weighted existing ones.</summary>
public static class LoraCombination
{
    /// <param name="peft">The model holding the LoRA adapters.</param>
    /// <param name="adapters">Names of the adapters to combine.</param>
    /// <param name="weights">One weight per adapter.</param>
    /// <param name="newName">Name of the new adapter (added, not activated).</param>
    /// <param name="combination">How to combine (PEFT's combination_type).</param>
    /// <param name="svdRank">Rank of the SVD combination (default: the largest rank combined).</param>
    /// <param name="density">Fraction of entries kept by Ties, DareLinear, DareTies and MagnitudePrune (required for them).</param>
    /// <param name="majoritySignMethod">How Ties and DareTies elect signs.</param>
    /// <param name="generator">Random source of DARE's drops (a CPU generator; null: torch's global one).</param>
    public static void AddWeightedAdapter(this PeftModel peft, IReadOnlyList<string> adapters, IReadOnlyList<double> weights,
        string newName, LoraCombinationType combination = LoraCombinationType.Svd, int? svdRank = null,
        double? density = null, MajoritySignMethod majoritySignMethod = MajoritySignMethod.Total, torch.Generator? generator = null)
    {
        if (adapters.Count == 0 || adapters.Count != weights.Count)
            throw new ArgumentException($"give one weight per adapter ({adapters.Count} adapters, {weights.Count} weights)");
        bool taskMerge = combination is LoraCombinationType.Ties or LoraCombinationType.DareLinear or LoraCombinationType.DareTies or LoraCombinationType.MagnitudePrune;
        if (taskMerge && density is not (>= 0 and <= 1))
            throw new ArgumentException($"the {combination} combination needs a density in [0, 1] (the fraction of entries kept), got {(density?.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? "none")}");
        var configs = adapters.Select(a => peft.Configs.TryGetValue(a, out var c)
            ? c as LoraConfig ?? throw new ArgumentException($"adapter '{a}' is {c.PeftType}, not LoRA")
            : throw new ArgumentException($"no adapter named '{a}'")).ToArray();
        if ((combination == LoraCombinationType.Linear || taskMerge) && weights.Any(w => w < 0))
            throw new ArgumentException($"the {combination} combination takes square roots of the weights; use Cat or Svd for negative weights");
        if (configs.Any(c => c.UseDora)) throw new NotSupportedException("DoRA adapters cannot be combined (as in PEFT)");
        if (peft.AdapterLayers.Values.Any(l => l is LoraEmbedding e && adapters.Any(e.lora_embedding_A.Contains)))
            throw new NotSupportedException("adapters with LoRA on an embedding cannot be combined yet");
        var layers = peft.AdapterLayers.Where(kv => kv.Value is LoraLinear l && adapters.Any(a => l.lora_A.Contains(a)))
            .ToDictionary(kv => kv.Key, kv => (LoraLinear)kv.Value);
        var ranks = layers.Values.SelectMany(l => adapters.Where(l.lora_A.Contains).Select(a => (int)l.A(a).weight!.shape[0])).ToArray();

        int newRank = combination switch
        {
            LoraCombinationType.Linear or LoraCombinationType.Ties or LoraCombinationType.DareLinear
                or LoraCombinationType.DareTies or LoraCombinationType.MagnitudePrune => ranks.Distinct().Count() == 1
                ? ranks[0]
                : throw new ArgumentException($"the {combination} combination needs adapters of one rank; use Cat or Svd"),
            LoraCombinationType.Cat => adapters.Sum(a => configs[adapters.ToList().IndexOf(a)].R),
            _ => svdRank ?? configs.Max(c => c.R),
        };
        if (combination == LoraCombinationType.Cat)
        {
            // Ranks can differ per module (rank_pattern): the concatenated rank is the largest per-module sum.
            newRank = layers.Values.Max(l => adapters.Where(l.lora_A.Contains).Sum(a => (int)l.A(a).weight!.shape[0]));
        }
        var config = new LoraConfig
        {
            R = newRank,
            LoraAlpha = newRank, // scaling 1: the weights and scalings are folded into A and B
            TargetModules = ModuleSelector.Names(layers.Keys.Order().ToArray()),
            LoraDropout = configs[0].LoraDropout,
            BaseModelNameOrPath = configs[0].BaseModelNameOrPath,
        };
        peft.AddAdapter(newName, config, activate: false);

        using var no = torch.no_grad();
        foreach (var layer in layers.Values)
        {
            using var scope = torch.NewDisposeScope();
            var a = layer.A(newName).weight!;
            var b = layer.B(newName).weight!;
            var present = adapters.Select((name, i) => (name, w: weights[i])).Where(x => layer.lora_A.Contains(x.name)).ToArray();
            switch (combination)
            {
                case LoraCombinationType.Linear or LoraCombinationType.Ties or LoraCombinationType.DareLinear or LoraCombinationType.DareTies or LoraCombinationType.MagnitudePrune:
                {
                    // As PEFT (0.7 on): A and B are merged separately, each adapter's pair weighted by √(wᵢ·sᵢ), so that
                    // for a single adapter with nothing pruned the product is wᵢ·sᵢ·BᵢAᵢ.
                    var factors = present.Select(x => Math.Sqrt(x.w * layer.Scaling(x.name))).ToArray();
                    a.copy_(TaskTensorMerging.Merge(combination, present.Select(x => layer.A(x.name).weight!).ToArray(), factors, density ?? 1, majoritySignMethod, generator));
                    b.copy_(TaskTensorMerging.Merge(combination, present.Select(x => layer.B(x.name).weight!).ToArray(), factors, density ?? 1, majoritySignMethod, generator));
                    break;
                }
                case LoraCombinationType.Cat:
                    a.zero_();
                    b.zero_();
                    long offset = 0;
                    foreach (var (name, w) in present)
                    {
                        long r = layer.A(name).weight!.shape[0];
                        // Negative weights: the sign goes on B only, so that B·A carries w exactly.
                        a.narrow(0, offset, r).copy_(layer.A(name).weight! * (Math.Sqrt(Math.Abs(w)) * layer.Scaling(name)));
                        b.narrow(1, offset, r).copy_(layer.B(name).weight! * (Math.Sign(w) * Math.Sqrt(Math.Abs(w))));
                        offset += r;
                    }
                    break;
                default:
                    Tensor? delta = null;
                    foreach (var (name, w) in present)
                    {
                        var d = layer.DeltaWeight(name) * w;
                        delta = delta is null ? d : delta + d;
                    }
                    var (u, s, vh) = torch.linalg.svd(delta!, fullMatrices: false);
                    long k = Math.Min(newRank, s.shape[0]);
                    a.zero_();
                    b.zero_();
                    a.narrow(0, 0, k).copy_(vh.narrow(0, 0, k));
                    b.narrow(1, 0, k).copy_(u.narrow(1, 0, k) * s.narrow(0, 0, k));
                    break;
            }
        }
    }
}

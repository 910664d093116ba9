using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Adapters.Lora;

/// <summary>How <see cref="LoraCombination.AddWeightedAdapter"/> combines LoRA adapters (PEFT's combination_type).</summary>
public enum LoraCombinationType
{
    /// <summary>A = Σ √wᵢ·sᵢ·Aᵢ, B = Σ √wᵢ·Bᵢ (same rank required; not the exact sum of the updates, as PEFT).</summary>
    Linear,
    /// <summary>A and B stacked along the rank: exactly Σ wᵢ·ΔWᵢ, rank Σ rᵢ.</summary>
    Cat,
    /// <summary>Σ wᵢ·ΔWᵢ truncated to a rank by SVD.</summary>
    Svd,
}

/// <summary>PEFT's add_weighted_adapter for LoRA: a new adapter made from weighted existing ones.</summary>
public static class LoraCombination
{
    public static void AddWeightedAdapter(this PeftModel peft, IReadOnlyList<string> adapters, IReadOnlyList<double> weights,
        string newName, LoraCombinationType combination = LoraCombinationType.Svd, int? svdRank = null)
    {
        if (adapters.Count == 0 || adapters.Count != weights.Count)
            throw new ArgumentException($"give one weight per adapter ({adapters.Count} adapters, {weights.Count} weights)");
        var configs = adapters.Select(a => peft.Configs.TryGetValue(a, out var c)
            ? c as LoraConfig ?? throw new ArgumentException($"adapter '{a}' is {c.PeftType}, not LoRA")
            : throw new ArgumentException($"no adapter named '{a}'")).ToArray();
        if (combination == LoraCombinationType.Linear && weights.Any(w => w < 0))
            throw new ArgumentException("the linear combination takes square roots of the weights; use Cat or Svd for negative weights");
        if (configs.Any(c => c.UseDora)) throw new NotSupportedException("DoRA adapters cannot be combined (as in PEFT)");
        var layers = peft.AdapterLayers.Where(kv => kv.Value is LoraLinear l && adapters.Any(a => l.lora_A.Contains(a)))
            .ToDictionary(kv => kv.Key, kv => (LoraLinear)kv.Value);
        var ranks = layers.Values.SelectMany(l => adapters.Where(l.lora_A.Contains).Select(a => (int)l.A(a).weight!.shape[0])).ToArray();

        int newRank = combination switch
        {
            LoraCombinationType.Linear => ranks.Distinct().Count() == 1
                ? ranks[0]
                : throw new ArgumentException("the linear combination needs adapters of one rank; use Cat or Svd"),
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
                case LoraCombinationType.Linear:
                    a.zero_();
                    b.zero_();
                    foreach (var (name, w) in present)
                    {
                        a.add_(layer.A(name).weight! * (Math.Sqrt(w) * layer.Scaling(name)));
                        b.add_(layer.B(name).weight! * Math.Sqrt(w));
                    }
                    break;
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

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

using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Adapters.Lora;

/// <summary>
/// LoRA initialisations that take A and B from the base weight and remove that part from it (PEFT's pissa_init and
/// olora_init): the adapter starts carrying a slice of W, and W_res + s·B·A = W keeps the output unchanged. Both are
/// deterministic, so loading a saved adapter with the same init on the original base model recomputes the same
/// residual weight before the trained A and B are loaded, as PEFT does.
/// </summary>
internal static class LoraWeightInit
{
    /// <summary>Applies <paramref name="init"/> (Pissa, Olora or Orthogonal; others are done by the layer) to one adapter of a layer.</summary>
    public static void Apply(LoraLinear layer, string adapter, LoraInit init, string source)
    {
        if (init is not (LoraInit.Pissa or LoraInit.Olora or LoraInit.Orthogonal)) return;
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var a = layer.A(adapter).weight!;
        var b = layer.B(adapter).weight!;
        long r = a.shape[0];
        if (init == LoraInit.Orthogonal)
        {
            // PEFT's orthogonal_init: the odd and even rows of a random orthogonal matrix are mutually orthogonal, so
            // B·A = Gᴮ·Q_even·Q_oddᵀ·Gᴬ = 0 while A and B are both non-zero (drawn from torch's global generator, as PEFT).
            if (r % 2 != 0) throw new ArgumentException($"{source}: orthogonal initialisation needs an even rank, got r = {r}");
            var (qFull, _) = torch.linalg.qr(torch.randn(r, r));
            var odd = qFull.index_select(0, torch.arange(0, r, 2));
            var even = qFull.index_select(0, torch.arange(1, r, 2));
            a.copy_(torch.randn(a.shape[1], r / 2).matmul(odd).t() / 10.0);
            b.copy_(torch.randn(r / 2, b.shape[0]).t().matmul(even) / 10.0);
            return;
        }
        double s = layer.Scaling(adapter);
        // [out, in] for Linear and Conv1D alike (a transposed view of Conv1D's [in, out]), so writes land in place.
        var stored = LinearParts.WeightOutIn(layer.BaseLayer);
        var dtype = stored.dtype;
        if (dtype is not (ScalarType.Float32 or ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float64))
            throw new NotSupportedException($"{source}: {init} initialisation needs a floating-point base weight, not {dtype}");
        var w = stored.to_type(ScalarType.Float32);
        long rank = Math.Min(w.shape[0], w.shape[1]);
        if (r > rank)
            throw new ArgumentException($"{source}: {init} initialisation needs r ≤ min(out, in) = {rank}, got r = {r}");
        Tensor newA, newB;
        if (init == LoraInit.Pissa)
        {
            // W = V·S·Uᴴ; the top r triplets split √(S/s) between B and A so that s·B·A is exactly their part of W.
            var (v, sv, uh) = torch.linalg.svd(w, fullMatrices: false);
            var root = (sv.narrow(0, 0, r) / s).sqrt();
            newA = root.unsqueeze(1) * uh.narrow(0, 0, r);
            newB = v.narrow(1, 0, r) * root.unsqueeze(0);
        }
        else
        {
            var (q, rr) = torch.linalg.qr(w);
            newA = rr.narrow(0, 0, r);
            newB = q.narrow(1, 0, r);
        }
        a.copy_(newA);
        b.copy_(newB);
        stored.copy_((w - s * newB.matmul(newA)).to_type(dtype));
    }
}

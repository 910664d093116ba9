using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Models;

/// <summary>RMSNorm as in Llama: computed in float32, scaled by a learned weight (parameter name <c>weight</c>).</summary>
public sealed class RMSNorm : nn.Module<Tensor, Tensor>
{
    private readonly double _eps;
    public Parameter weight;

    /// <summary>The epsilon added to the mean square.</summary>
    public double Eps => _eps;

    public RMSNorm(long size, double eps) : base(nameof(RMSNorm))
    {
        _eps = eps;
        weight = new Parameter(torch.ones(size));
        register_parameter("weight", weight);
    }

    public override Tensor forward(Tensor x)
    {
        var dtype = x.dtype;
        var h = x.to_type(ScalarType.Float32);
        h = h * torch.rsqrt(h.pow(2).mean([-1], keepdim: true) + _eps);
        return weight * h.to_type(dtype);
    }
}

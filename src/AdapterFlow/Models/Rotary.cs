using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Models;

/// <summary>How a family lays out the rotated dimensions inside a head.</summary>
public enum RotaryLayout
{
    /// <summary>Llama / Mistral / Qwen2 / GPT-NeoX: the first and second halves of the rotated dims form the pairs.</summary>
    RotateHalf,

    /// <summary>GPT-J: adjacent dims (2i, 2i+1) form the pairs.</summary>
    Interleaved,
}

/// <summary>
/// Rotary position embedding over the first <see cref="RotaryDim"/> dims of each head, with the
/// transformers rope_type variants: default, linear, dynamic (NTK) and llama3.
/// </summary>
public sealed class RotaryEmbedding
{
    private readonly double[] _invFreq;
    private readonly double _attentionScaling;

    // The float32 inverse frequencies on the device last used: built once instead of copied from the host on
    // every forward pass (a decode step would otherwise pay a host-to-device copy per token).
    private Tensor? _invFreqTensor;

    public RotaryEmbedding(int rotaryDim, double theta, RotaryLayout layout, RopeScaling? scaling = null, int maxPositionEmbeddings = 2048)
    {
        if (rotaryDim % 2 != 0) throw new ArgumentException($"rotary dim {rotaryDim} must be even");
        RotaryDim = rotaryDim;
        Layout = layout;
        Scaling = scaling;
        MaxPositionEmbeddings = maxPositionEmbeddings;
        Theta = theta;
        _invFreq = InverseFrequencies(rotaryDim, theta, scaling, out _attentionScaling);
    }

    public int RotaryDim { get; }
    public RotaryLayout Layout { get; }
    public RopeScaling? Scaling { get; }
    public int MaxPositionEmbeddings { get; }
    public double Theta { get; }

    /// <summary>Factor applied to cos and sin (1 for every rope_type supported so far).</summary>
    public double AttentionScaling => _attentionScaling;

    /// <summary>
    /// The inverse frequencies used for a sequence of <paramref name="sequenceLength"/> positions (only dynamic NTK
    /// depends on it), rotaryDim / 2 values.
    /// </summary>
    public double[] InverseFrequencies(long sequenceLength = 0) =>
        DynamicBase(sequenceLength) is double b ? InverseFrequencies(RotaryDim, b, null, out _) : (double[])_invFreq.Clone();

    /// <summary>transformers' dynamic NTK grows the base once the sequence outgrows max_position_embeddings.</summary>
    private double? DynamicBase(long sequenceLength) =>
        Scaling is { Type: "dynamic" } s && sequenceLength > MaxPositionEmbeddings
            ? Theta * Math.Pow(s.Factor * sequenceLength / MaxPositionEmbeddings - (s.Factor - 1), RotaryDim / (RotaryDim - 2.0))
            : null;

    private static double[] InverseFrequencies(int dim, double theta, RopeScaling? scaling, out double attentionScaling)
    {
        attentionScaling = 1.0;
        var inv = new double[dim / 2];
        for (int i = 0; i < inv.Length; i++) inv[i] = 1.0 / Math.Pow(theta, 2.0 * i / dim);
        if (scaling is null) return inv;
        switch (scaling.Type)
        {
            case "default":
                break;
            case "linear":
                for (int i = 0; i < inv.Length; i++) inv[i] /= scaling.Factor;
                break;
            case "dynamic":
                // Applied per forward from the sequence length (see Tables).
                break;
            case "llama3":
            {
                double lowWavelen = scaling.OriginalMaxPositionEmbeddings / scaling.LowFreqFactor;
                double highWavelen = scaling.OriginalMaxPositionEmbeddings / scaling.HighFreqFactor;
                for (int i = 0; i < inv.Length; i++)
                {
                    double wavelen = 2 * Math.PI / inv[i];
                    if (wavelen > lowWavelen)
                        inv[i] /= scaling.Factor;
                    else if (wavelen >= highWavelen)
                    {
                        double smooth = (scaling.OriginalMaxPositionEmbeddings / wavelen - scaling.LowFreqFactor) /
                                        (scaling.HighFreqFactor - scaling.LowFreqFactor);
                        inv[i] = (1 - smooth) * inv[i] / scaling.Factor + smooth * inv[i];
                    }
                }
                break;
            }
            default:
                throw new NotSupportedException($"rope_type '{scaling.Type}' is not supported (default, linear, dynamic, llama3 are)");
        }
        return inv;
    }

    /// <summary>
    /// cos and sin tables for int64 positions [batch, time]: [batch, 1, time, rotaryDim], laid out for
    /// <see cref="Layout"/>, in <paramref name="dtype"/>. Computed in float32 as transformers does.
    /// </summary>
    public (Tensor Cos, Tensor Sin) Tables(Tensor positionIds, ScalarType dtype, long sequenceLength)
    {
        Tensor invFreq;
        if (DynamicBase(sequenceLength) is double dynamicBase)
        {
            invFreq = torch.tensor(InverseFrequencies(RotaryDim, dynamicBase, null, out _).Select(x => (float)x).ToArray(),
                device: positionIds.device);
        }
        else
        {
            var cached = _invFreqTensor;
            if (cached is null || cached.device_type != positionIds.device_type || cached.device_index != positionIds.device_index)
            {
                cached?.Dispose();
                cached = torch.tensor(_invFreq.Select(x => (float)x).ToArray(), device: positionIds.device).DetachFromDisposeScope();
                _invFreqTensor = cached;
            }
            invFreq = cached;
        }
        var freqs = positionIds.to_type(ScalarType.Float32).unsqueeze(-1) * invFreq; // [b, t, dim/2]
        Tensor emb = Layout == RotaryLayout.RotateHalf
            ? torch.cat([freqs, freqs], -1)
            : freqs.unsqueeze(-1).expand(freqs.shape[0], freqs.shape[1], freqs.shape[2], 2).reshape(freqs.shape[0], freqs.shape[1], RotaryDim);
        var cos = emb.cos();
        var sin = emb.sin();
        if (_attentionScaling != 1.0)
        {
            cos = cos * _attentionScaling;
            sin = sin * _attentionScaling;
        }
        return (cos.unsqueeze(1).to_type(dtype), sin.unsqueeze(1).to_type(dtype));
    }

    /// <summary>Rotates the first RotaryDim dims of x [batch, heads, time, head_dim]; the rest pass through.</summary>
    public Tensor Apply(Tensor x, Tensor cos, Tensor sin)
    {
        long headDim = x.shape[3];
        if (RotaryDim == headDim) return x * cos + Rotate(x) * sin;
        var rot = x.narrow(3, 0, RotaryDim);
        var pass = x.narrow(3, RotaryDim, headDim - RotaryDim);
        return torch.cat([rot * cos + Rotate(rot) * sin, pass], 3);
    }

    private Tensor Rotate(Tensor x)
    {
        long d = x.shape[3];
        if (Layout == RotaryLayout.RotateHalf)
        {
            var x1 = x.narrow(3, 0, d / 2);
            var x2 = x.narrow(3, d / 2, d / 2);
            return torch.cat([-x2, x1], 3);
        }
        // (x0, x1, x2, x3, ...) → (-x1, x0, -x3, x2, ...)
        var pairs = x.reshape(x.shape[0], x.shape[1], x.shape[2], d / 2, 2);
        var even = pairs.select(4, 0);
        var odd = pairs.select(4, 1);
        return torch.stack([-odd, even], 4).reshape(x.shape[0], x.shape[1], x.shape[2], d);
    }
}

/// <summary>transformers' rope_scaling / rope_parameters beyond the plain default.</summary>
public sealed record RopeScaling(string Type, double Factor = 1.0, double LowFreqFactor = 1.0, double HighFreqFactor = 4.0,
    int OriginalMaxPositionEmbeddings = 8192);

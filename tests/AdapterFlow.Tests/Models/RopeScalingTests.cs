using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Models;

/// <summary>
/// Inverse frequencies of the rope_type variants for head_dim 16, theta 10000, against values worked out by hand
/// from the published formulas (transformers' modeling_rope_utils):
/// default  inv_i = theta^(-2i/d) = 10^(-i/2);
/// linear   inv_i / factor;
/// llama3   wavelength λ_i = 2π / inv_i; λ &lt; orig/high keeps inv_i, λ &gt; orig/low divides by factor, in between
///          s = (orig/λ - low) / (high - low) and inv = (1 - s)·inv_i/factor + s·inv_i;
/// dynamic  for a sequence of L &gt; max positions, base' = theta·(factor·L/max - (factor - 1))^(d/(d-2)).
/// </summary>
public class RopeScalingTests
{
    private const int Dim = 16;
    private const double Theta = 10000;

    private static readonly double[] Plain =
        [1.0, 0.31622776601683794, 0.1, 0.03162277660168379, 0.01, 0.003162277660168379, 0.001, 0.00031622776601683794];

    private static void AssertClose(double[] expected, double[] actual)
    {
        Assert.Equal(expected.Length, actual.Length);
        for (int i = 0; i < expected.Length; i++)
            Assert.True(Math.Abs(expected[i] - actual[i]) <= 1e-12 * Math.Max(1, Math.Abs(expected[i])) + 1e-15,
                $"inv_freq[{i}]: expected {expected[i]}, got {actual[i]}");
    }

    [Fact]
    public void Default_frequencies()
    {
        var rope = new RotaryEmbedding(Dim, Theta, RotaryLayout.RotateHalf);
        AssertClose(Plain, rope.InverseFrequencies());
    }

    [Fact]
    public void Linear_divides_every_frequency_by_the_factor()
    {
        var rope = new RotaryEmbedding(Dim, Theta, RotaryLayout.RotateHalf, new RopeScaling("linear", 4.0));
        AssertClose(Plain.Select(x => x / 4).ToArray(), rope.InverseFrequencies());
    }

    [Fact]
    public void Llama3_keeps_high_frequencies_scales_low_ones_and_blends_between()
    {
        // orig 8192, low 1, high 4: λ < 2048 kept (i = 0..5, λ_5 ≈ 1987), λ_6 ≈ 6283 blended with s ≈ 0.10127,
        // λ_7 ≈ 19869 > 8192 divided by 8.
        var rope = new RotaryEmbedding(Dim, Theta, RotaryLayout.RotateHalf, new RopeScaling("llama3", 8.0, 1.0, 4.0, 8192));
        double[] expected =
        [
            1.0, 0.31622776601683794, 0.1, 0.03162277660168379, 0.01, 0.003162277660168379,
            0.00021360754402756864, 3.952847075210474e-05,
        ];
        AssertClose(expected, rope.InverseFrequencies());
    }

    [Fact]
    public void Dynamic_grows_the_base_only_past_max_positions()
    {
        var rope = new RotaryEmbedding(Dim, Theta, RotaryLayout.RotateHalf, new RopeScaling("dynamic", 2.0), maxPositionEmbeddings: 64);
        AssertClose(Plain, rope.InverseFrequencies(64));
        // L = 128: base' = 10000 · 3^(16/14) ≈ 35097.92.
        double[] expected =
        [
            1.0, 0.27029612569240363, 0.07305999556432365, 0.019747833744140873, 0.005337762951858991,
            0.001442776645751933, 0.000389976937586229, 0.00010540925533894597,
        ];
        AssertClose(expected, rope.InverseFrequencies(128));
    }

    private static CausalLM TinyWithRope(string? ropeJson, int maxPositions = 64)
    {
        var json = LlamaTestConfigs.Tiny("llama").ToJson();
        json["max_position_embeddings"] = maxPositions;
        json.Remove("rope_parameters");
        if (ropeJson is not null) json["rope_scaling"] = System.Text.Json.Nodes.JsonNode.Parse(ropeJson);
        return AutoModel.FromConfig(AutoModel.ParseConfig(json, "c"), seed: 9);
    }

    [Fact]
    public void Linear_scaling_in_the_model_equals_positions_divided_by_the_factor()
    {
        using var plain = TinyWithRope(null);
        using var linear = TinyWithRope("""{"rope_type": "linear", "factor": 2.0}""");
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var ids = torch.tensor(new long[] { 5, 9, 13, 17, 21, 25 }).unsqueeze(0);
        var even = torch.arange(0, 12, 2, dtype: ScalarType.Int64).unsqueeze(0);
        var half = torch.arange(0, 6, dtype: ScalarType.Int64).unsqueeze(0);
        var a = linear.Logits(ids, null, even);
        var b = plain.Logits(ids, null, half);
        Assert.True((a - b).abs().max().item<float>() < 1e-4);
        Assert.True((linear.Logits(ids) - plain.Logits(ids)).abs().max().item<float>() > 1e-3);
    }

    [Fact]
    public void Dynamic_scaling_in_the_model_acts_only_on_long_sequences()
    {
        using var plain = TinyWithRope(null, maxPositions: 8);
        using var dynamic = TinyWithRope("""{"type": "dynamic", "factor": 2.0}""", maxPositions: 8);
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var shortIds = torch.arange(4, 12, dtype: ScalarType.Int64).unsqueeze(0);
        double shortDiff = (dynamic.Logits(shortIds) - plain.Logits(shortIds)).abs().max().item<float>();
        Assert.True(shortDiff < 1e-5, $"short: {shortDiff}");
        var longIds = torch.arange(4, 20, dtype: ScalarType.Int64).unsqueeze(0);
        var longLogits = dynamic.Logits(longIds);
        Assert.True((longLogits - plain.Logits(longIds)).abs().max().item<float>() > 1e-3);
        // Explicit positions give the same sequence length, hence the same logits.
        var positions = torch.arange(0, 16, dtype: ScalarType.Int64).unsqueeze(0);
        Assert.True((dynamic.Logits(longIds, null, positions) - longLogits).abs().max().item<float>() < 1e-5);
    }
}

using AdapterFlow.Models;
using AdapterFlow.Tests.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Models;

/// <summary>
/// Layer dropout computes a layer only for the rows that keep it (the context — masks, positions, rotary tables,
/// ALiBi bias — is sliced to them): each row of a batch equals that row run alone through exactly the layers it
/// kept. Seeds torch's global generator, so it runs alone.
/// </summary>
[Collection(GlobalTorchRngCollection.Name)]
public class LayerDropoutRowsTests
{
    public static TheoryData<string> Families => LayerRangeTests.Families;

    [Theory]
    [MemberData(nameof(Families))]
    public void LayerDropoutComputesOnlyTheKeptRowsAndEachRowEqualsItsOwnLayerSubset(string name)
    {
        using var scope = torch.NewDisposeScope();
        var model = LayerRangeTests.Model(name, noDropout: true);
        model.train(); // layer dropout applies in training (the families' own dropout is set to 0)
        long batch = 5, time = 6;
        var ids = LayerRangeTests.Ids(batch, time, 4);
        // Left padding on two rows, so the sliced masks and positions matter.
        var mask = torch.ones(batch, time, dtype: ScalarType.Int64);
        mask[1, ..2] = 0;
        mask[3, ..1] = 0;
        var rates = Enumerable.Range(0, model.NumLayers).Select(l => 0.3 + 0.1 * l).ToArray();
        torch.manual_seed(11);
        var batched = model.forward(new ForwardInput { InputIds = ids, AttentionMask = mask, LayerDropout = rates }).Logits;
        // The same draws as the forward: one rand(batch) per layer, keep = u ≥ rate.
        torch.manual_seed(11);
        var keeps = rates.Select(r => torch.rand(batch).ge(r).data<bool>().ToArray()).ToArray();
        Assert.Contains(keeps, k => k.Contains(true) && k.Contains(false)); // some layer runs on a strict subset of the rows
        using var no = torch.no_grad();
        for (long r = 0; r < batch; r++)
        {
            // Rate 1 skips a layer without a draw, rate 0 runs it: this row's own layer subset.
            var own = keeps.Select(k => k[r] ? 0.0 : 1.0).ToArray();
            var alone = model.forward(new ForwardInput { InputIds = ids.narrow(0, r, 1), AttentionMask = mask.narrow(0, r, 1), LayerDropout = own }).Logits;
            var real = mask[r].nonzero().squeeze(1);
            var difference = (batched.narrow(0, r, 1) - alone).index_select(1, real).abs().max().item<float>();
            Assert.True(difference < 1e-5, $"{name} row {r}: {difference}");
        }
    }
}

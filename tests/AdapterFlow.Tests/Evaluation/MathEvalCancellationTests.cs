using System.Text.Json;
using AdapterFlow.Data;
using AdapterFlow.Evaluation;
using AdapterFlow.Tests.Cli;
using AdapterFlow.Tests.Generation;

namespace AdapterFlow.Tests.Evaluation;

/// <summary>Ctrl-C during an evaluation: it stops within the current batch and keeps what was scored.</summary>
public class MathEvalCancellationTests
{
    private static MathDataset Set(TempDir dir, int count)
    {
        var records = Enumerable.Range(0, count).Select(i => new Dictionary<string, string>
        {
            ["instruction"] = $"What is {i} plus {i + 1}? " + new string('x', i % 5),
            ["input"] = "",
            ["output"] = "",
            ["answer"] = (2 * i + 1).ToString(System.Globalization.CultureInfo.InvariantCulture),
        });
        var path = dir.File("set.json");
        File.WriteAllText(path, JsonSerializer.Serialize(records));
        return MathDataset.Load(path);
    }

    [Fact]
    public void Cancelling_between_batches_returns_the_finished_batches_marked_interrupted()
    {
        using var dir = new TempDir();
        var set = Set(dir, 7);
        using var model = new TinyLM(seed: 3);
        var options = new MathEvalOptions { BatchSize = 3, MaxNewTokens = 8 };
        var full = new MathEvaluator(model, new ByteTokenizer(), options).Evaluate(set);
        Assert.False(full.Interrupted);
        Assert.Equal(7, full.Requested);

        using var stop = new CancellationTokenSource();
        var seen = new List<MathItemResult>();
        var partial = new MathEvaluator(model, new ByteTokenizer(), options).Evaluate(set, item =>
        {
            seen.Add(item);
            stop.Cancel(); // "Ctrl-C" while the first batch is being scored
        }, stop.Token);
        Assert.True(partial.Interrupted);
        Assert.Equal(7, partial.Requested);
        // The batch in hand is finished, nothing after it is started.
        Assert.Equal(3, partial.Accuracy.Total);
        Assert.Equal(seen.Select(i => i.Index).Order(), partial.Items.Select(i => i.Index));
        // What was scored is what an uninterrupted run scores for those items.
        foreach (var item in partial.Items)
            Assert.Equal(full.Items[item.Index].Generation, item.Generation);
        Assert.True(partial.ToJson()["interrupted"]!.GetValue<bool>());
        var summary = new MathEvalSummary([partial], AquaScoring.Strict, null);
        Assert.True(summary.Interrupted);
        Assert.True(summary.ToJson()["interrupted"]!.GetValue<bool>());
    }

    [Fact]
    public void Cancelling_in_the_middle_of_a_batch_stops_generation_at_once()
    {
        using var dir = new TempDir();
        var set = Set(dir, 6);
        using var model = new TinyLM(seed: 3);
        using var stop = new CancellationTokenSource();
        int forwards = 0;
        // The third forward pass of the first batch (prefill, then two decoding steps) presses Ctrl-C.
        model.BeforeForward = () =>
        {
            if (++forwards == 3) stop.Cancel();
        };
        var options = new MathEvalOptions { BatchSize = 2, MaxNewTokens = 200 };
        var result = new MathEvaluator(model, new ByteTokenizer(), options).Evaluate(set, cancellation: stop.Token);
        Assert.True(result.Interrupted);
        Assert.Empty(result.Items);
        // Not 200 steps of the batch, nor the other batches: at most one more step after the request.
        Assert.InRange(forwards, 3, 4);
    }

    [Fact]
    public void An_already_cancelled_token_scores_nothing()
    {
        using var dir = new TempDir();
        using var model = new TinyLM(seed: 3);
        var result = new MathEvaluator(model, new ByteTokenizer()).Evaluate(Set(dir, 2), cancellation: new CancellationToken(canceled: true));
        Assert.True(result.Interrupted);
        Assert.Equal(0, result.Accuracy.Total);
    }
}

using ScottPlot;

namespace AdapterFlow.Training;

/// <summary>Draws the training loss (and the held-out loss, where evaluated) against the optimizer step as a PNG (ScottPlot).</summary>
public static class LossPlot
{
    /// <summary>Writes <paramref name="path"/> from the run's step metrics; throws when there are none.</summary>
    public static void Save(IReadOnlyList<StepMetrics> steps, string path, int width = 800, int height = 500)
    {
        ArgumentNullException.ThrowIfNull(steps);
        if (steps.Count == 0) throw new ArgumentException("no training steps to plot");
        var plot = new Plot();
        var train = plot.Add.Scatter(steps.Select(s => (double)s.Step).ToArray(), steps.Select(s => s.Loss).ToArray());
        var evaluated = steps.Where(s => s.EvalLoss is double v && double.IsFinite(v)).ToArray();
        if (evaluated.Length > 0)
        {
            train.LegendText = "training";
            var eval = plot.Add.Scatter(evaluated.Select(s => (double)s.Step).ToArray(), evaluated.Select(s => s.EvalLoss!.Value).ToArray());
            eval.LegendText = "held-out";
            eval.MarkerSize = 7;
            // Losses fall, so the upper right corner is where the curves are least likely to be.
            plot.ShowLegend(Alignment.UpperRight);
            plot.Title("Training and held-out loss");
        }
        else
        {
            // One series: the title says what it is, and no legend hides the last points.
            plot.Title("Training loss");
        }
        plot.XLabel("step");
        plot.YLabel("loss");
        plot.SavePng(path, width, height);
    }
}

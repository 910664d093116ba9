using ScottPlot;

namespace AdapterFlow.Training;

/// <summary>Draws the training loss against the optimizer step as a PNG (ScottPlot).</summary>
public static class LossPlot
{
    /// <summary>Writes <paramref name="path"/> from the run's step metrics; throws when there are none.</summary>
    public static void Save(IReadOnlyList<StepMetrics> steps, string path, int width = 800, int height = 500)
    {
        ArgumentNullException.ThrowIfNull(steps);
        if (steps.Count == 0) throw new ArgumentException("no training steps to plot");
        var plot = new Plot();
        // One series: the title says what it is, and no legend hides the last points.
        plot.Add.Scatter(steps.Select(s => (double)s.Step).ToArray(), steps.Select(s => s.Loss).ToArray());
        plot.Title("Training loss");
        plot.XLabel("step");
        plot.YLabel("loss (per labelled token)");
        plot.SavePng(path, width, height);
    }
}

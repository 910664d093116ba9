using AdapterFlow.Training;

namespace AdapterFlow.Tests.Training;

/// <summary>LayerSkip's schedules as pure functions: dropout rates, early-exit weights and curricula.</summary>
public class LayerSkipScheduleTests
{
    private static readonly double Sqrt2 = Math.Sqrt(2);

    [Fact]
    public void Exponential_depth_scale_is_zero_at_the_first_layer_and_p_max_at_the_last()
    {
        var schedule = new LayerDropoutSchedule(new LayerDropoutOptions(0.2), numLayers: 5, totalSteps: 10);
        var rates = schedule.RatesAt(0);
        Assert.Equal(5, rates.Length);
        Assert.Equal(0.0, rates[0], 12);
        Assert.Equal(0.2, rates[4], 12);
        // e^{l·ln2/(L−1)} − 1 at l = 2 of 5: 2^{1/2} − 1.
        Assert.Equal(0.2 * (Sqrt2 - 1), rates[2], 12);
        Assert.Equal(0.2 * (Math.Pow(2, 0.25) - 1), rates[1], 12);
        for (int l = 1; l < 5; l++) Assert.True(rates[l] > rates[l - 1], "rates rise with depth");
        // No curriculum: every step the same.
        Assert.Equal(rates, schedule.RatesAt(9));
    }

    [Fact]
    public void Linear_and_uniform_depth_scales_follow_their_formulas()
    {
        var linear = new LayerDropoutSchedule(new LayerDropoutOptions(0.3, LayerDropoutScale.Linear), 4, 10).RatesAt(3);
        Assert.Equal([0.0, 0.1, 0.2, 0.3], linear.Select(r => Math.Round(r, 12)));
        var uniform = new LayerDropoutSchedule(new LayerDropoutOptions(0.3, LayerDropoutScale.Uniform), 4, 10).RatesAt(3);
        Assert.All(uniform, r => Assert.Equal(0.3, r, 12));
        // One layer: the whole rate (a zero-length period scales by 1, as LayerSkip).
        Assert.Equal(0.3, new LayerDropoutSchedule(new LayerDropoutOptions(0.3), 1, 10).RatesAt(0)[0], 12);
    }

    [Fact]
    public void Exponential_time_curriculum_goes_from_zero_to_p_max()
    {
        var schedule = new LayerDropoutSchedule(new LayerDropoutOptions(0.4, LayerDropoutScale.Uniform, LayerDropoutCurriculum.Exponential), 3, totalSteps: 100);
        Assert.All(schedule.RatesAt(0), r => Assert.Equal(0.0, r, 12));
        Assert.All(schedule.RatesAt(50), r => Assert.Equal(0.4 * (Sqrt2 - 1), r, 12));
        Assert.All(schedule.RatesAt(100), r => Assert.Equal(0.4, r, 12));
        Assert.Equal(1.0, LayerDropoutSchedule.TimeScale(LayerDropoutCurriculum.Exponential, 7, 7), 12);
        Assert.Equal(1.0, LayerDropoutSchedule.TimeScale(LayerDropoutCurriculum.None, 0, 7), 12);
        // Both shapes at once: S(t)·D(l)·p_max.
        var both = new LayerDropoutSchedule(new LayerDropoutOptions(0.4, LayerDropoutScale.Exponential, LayerDropoutCurriculum.Exponential), 3, 100).RatesAt(50);
        Assert.Equal(0.4 * (Sqrt2 - 1) * (Sqrt2 - 1), both[1], 12);
    }

    [Fact]
    public void Bad_layer_dropout_options_give_one_line_errors()
    {
        foreach (var rate in new[] { 1.0, -0.1, double.NaN, 1.5 })
        {
            var e = Assert.Throws<ArgumentException>(() => new LayerDropoutOptions(rate).Validate());
            Assert.Contains("[0, 1)", e.Message);
            Assert.DoesNotContain('\n', e.Message);
        }
        Assert.Throws<ArgumentException>(() => new LayerDropoutSchedule(new LayerDropoutOptions(0.1), 0, 10));
        Assert.Throws<ArgumentException>(() => new LayerDropoutSchedule(new LayerDropoutOptions(0.1), 2, 0));
        Assert.Contains("exp, linear or uniform", Assert.Throws<ArgumentException>(() => LayerDropoutOptions.ParseScale("cubic")).Message);
        Assert.Contains("none or exp", Assert.Throws<ArgumentException>(() => LayerDropoutOptions.ParseCurriculum("linear")).Message);
        Assert.Equal(LayerDropoutScale.Exponential, LayerDropoutOptions.ParseScale("EXP"));
        Assert.Equal(LayerDropoutCurriculum.Exponential, LayerDropoutOptions.ParseCurriculum("exponential"));
        // Through the trainer's options too.
        var options = new TrainerOptions { LayerDropout = new LayerDropoutOptions(1.0) };
        using var model = TrainerTests.TinyLlama();
        Assert.Throws<ArgumentException>(() => Trainer.ForModel(model, options));
        Assert.Throws<ArgumentException>(() => Trainer.ForModel(model, new TrainerOptions { EarlyExit = new EarlyExitOptions(Rotation: 0) }));
        Assert.Throws<ArgumentException>(() => Trainer.ForModel(model, new TrainerOptions { EarlyExit = new EarlyExitOptions(EarlyLayerScale: 0) }));
    }

    [Fact]
    public void Early_exit_weights_sum_to_one_and_include_the_last_layer_for_every_scale_curriculum_and_step()
    {
        foreach (var scale in Enum.GetValues<EarlyExitScale>())
        foreach (var curriculum in Enum.GetValues<EarlyExitCurriculum>())
        foreach (int layers in new[] { 1, 2, 5, 8 })
        foreach (int rotation in new[] { 1, 3 })
        foreach (double early in new[] { 1.0, 0.1 })
        {
            var schedule = new EarlyExitSchedule(new EarlyExitOptions(scale, curriculum, rotation, early), layers, totalSteps: 20);
            for (int step = 0; step <= 20; step++)
            {
                var weights = schedule.WeightsAt(step);
                var active = schedule.ActiveLayers(step);
                string where = $"{scale}/{curriculum}/L={layers}/R={rotation}/e={early} step {step}";
                Assert.True(Math.Abs(weights.Sum() - 1) < 1e-12, $"{where}: weights sum to {weights.Sum()}");
                Assert.True(active[^1] && weights[^1] > 0, $"{where}: last layer left out");
                for (int l = 0; l < layers; l++)
                    Assert.True(active[l] ? weights[l] > 0 : weights[l] == 0, $"{where}: layer {l} active {active[l]} weight {weights[l]}");
            }
        }
    }

    [Theory]
    [InlineData(EarlyExitScale.Uniform, new[] { 1.0, 1, 1 })]
    [InlineData(EarlyExitScale.Linear, new[] { 1.0, 2, 3 })]
    [InlineData(EarlyExitScale.Sum, new[] { 1.0, 3, 6 })]
    [InlineData(EarlyExitScale.Sqrt, new[] { 1.0, 1.4142135623730951, 1.7320508075688772 })]
    [InlineData(EarlyExitScale.Inverse, new[] { 1.0, 0.5, 1.0 / 3 })]
    [InlineData(EarlyExitScale.InverseSqrt, new[] { 1.0, 0.7071067811865476, 0.5773502691896258 })]
    public void Early_exit_scales_follow_their_formulas(EarlyExitScale scale, double[] expected)
    {
        var weights = new EarlyExitSchedule(new EarlyExitOptions(scale), 3, 10).WeightsAt(0);
        double total = expected.Sum();
        for (int l = 0; l < 3; l++) Assert.Equal(expected[l] / total, weights[l], 12);
        // e_scale multiplies the early layers only.
        var scaled = new EarlyExitSchedule(new EarlyExitOptions(scale, EarlyLayerScale: 0.5), 3, 10).WeightsAt(0);
        double scaledTotal = 0.5 * (expected[0] + expected[1]) + expected[2];
        Assert.Equal(expected[2] / scaledTotal, scaled[2], 12);
        Assert.Equal(0.5 * expected[0] / scaledTotal, scaled[0], 12);
    }

    [Fact]
    public void Rotational_curriculum_trains_every_rth_layer_rotating_each_step_plus_the_last()
    {
        var schedule = new EarlyExitSchedule(new EarlyExitOptions(EarlyExitScale.Uniform, EarlyExitCurriculum.Rotational, Rotation: 3), 7, 100);
        int[] Active(int step) => schedule.ActiveLayers(step).Select((a, l) => (a, l)).Where(x => x.a).Select(x => x.l).ToArray();
        Assert.Equal([0, 3, 6], Active(0));
        Assert.Equal([2, 5, 6], Active(1));
        Assert.Equal([1, 4, 6], Active(2));
        Assert.Equal([0, 3, 6], Active(3));
        Assert.Equal([0, 3, 6], Active(99));
        // Over R consecutive steps every layer is trained exactly once (the last every step).
        var counts = new int[7];
        for (int step = 10; step < 13; step++) foreach (var l in Active(step)) counts[l]++;
        Assert.Equal([1, 1, 1, 1, 1, 1, 3], counts);
        // Uniform weights over the active set.
        Assert.Equal(new[] { 0, 0, 1.0 / 3, 0, 0, 1.0 / 3, 1.0 / 3 }, schedule.WeightsAt(1), new ToleranceComparer());
    }

    [Fact]
    public void Gradual_curriculum_switches_layers_on_from_the_last_down_by_mid_training()
    {
        // L = 4, T = 100: layer l joins at t/T ≥ (4 − l)/8 → layer 2 at step 25, layer 1 at 37.5 → 38, layer 0 at 50.
        var schedule = new EarlyExitSchedule(new EarlyExitOptions(EarlyExitScale.Uniform, EarlyExitCurriculum.Gradual), 4, 100);
        int[] Active(int step) => schedule.ActiveLayers(step).Select((a, l) => (a, l)).Where(x => x.a).Select(x => x.l).ToArray();
        Assert.Equal([3], Active(0));
        Assert.Equal([3], Active(24));
        Assert.Equal([2, 3], Active(25));
        Assert.Equal([2, 3], Active(37));
        Assert.Equal([1, 2, 3], Active(38));
        Assert.Equal([1, 2, 3], Active(49));
        Assert.Equal([0, 1, 2, 3], Active(50));
        Assert.Equal([0, 1, 2, 3], Active(99));
        Assert.Equal(new[] { 0, 0, 0, 1.0 }, schedule.WeightsAt(0));
    }

    [Fact]
    public void Listed_exit_layers_are_the_only_early_exits_trained_and_the_curriculum_still_applies()
    {
        // Exit layers count from 1 (E = 2 is the output of layers 0 and 1, index 1).
        var listed = new EarlyExitSchedule(new EarlyExitOptions(EarlyExitScale.Uniform, Layers: [2, 3]), 6, 100);
        int[] Active(EarlyExitSchedule schedule, int step) => schedule.ActiveLayers(step).Select((a, l) => (a, l)).Where(x => x.a).Select(x => x.l).ToArray();
        Assert.Equal([1, 2, 5], Active(listed, 0));
        Assert.Equal([1, 2, 5], Active(listed, 57));
        Assert.Equal(new[] { 0, 1.0 / 3, 1.0 / 3, 0, 0, 1.0 / 3 }, listed.WeightsAt(3), new ToleranceComparer());
        var rotating = new EarlyExitSchedule(new EarlyExitOptions(EarlyExitScale.Uniform, EarlyExitCurriculum.Rotational, Rotation: 2, Layers: [2, 3]), 6, 100);
        Assert.Equal([2, 5], Active(rotating, 0));
        Assert.Equal([1, 5], Active(rotating, 1));
        // The last layer alone is listed: plain training.
        Assert.Equal(new[] { 0, 0, 0, 0, 0, 1.0 }, new EarlyExitSchedule(new EarlyExitOptions(Layers: [6]), 6, 10).WeightsAt(0));
        Assert.Contains("7", Assert.Throws<ArgumentException>(() => new EarlyExitSchedule(new EarlyExitOptions(Layers: [2, 7]), 6, 10)).Message);
        Assert.Contains("from 1", Assert.Throws<ArgumentException>(() => new EarlyExitOptions(Layers: [0, 2]).Validate()).Message);
        Assert.Contains("empty", Assert.Throws<ArgumentException>(() => new EarlyExitOptions(Layers: []).Validate()).Message);
    }

    [Fact]
    public void Early_exit_option_names_parse_and_bad_ones_are_named()
    {
        Assert.Equal(EarlyExitScale.Sum, EarlyExitOptions.ParseScale("sum_l"));
        Assert.Equal(EarlyExitScale.InverseSqrt, EarlyExitOptions.ParseScale("inv-sqrt"));
        Assert.Equal(EarlyExitScale.Inverse, EarlyExitOptions.ParseScale("INV"));
        Assert.Equal(EarlyExitCurriculum.Rotational, EarlyExitOptions.ParseCurriculum("rot"));
        Assert.Contains("'cubic'", Assert.Throws<ArgumentException>(() => EarlyExitOptions.ParseScale("cubic")).Message);
        Assert.Contains("'random'", Assert.Throws<ArgumentException>(() => EarlyExitOptions.ParseCurriculum("random")).Message);
        Assert.Throws<ArgumentException>(() => new EarlyExitSchedule(new EarlyExitOptions(), 4, 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => new EarlyExitSchedule(new EarlyExitOptions(), 4, 5).WeightsAt(-1));
    }

    private sealed class ToleranceComparer : IEqualityComparer<double>
    {
        public bool Equals(double x, double y) => Math.Abs(x - y) < 1e-9;
        public int GetHashCode(double obj) => 0;
    }
}

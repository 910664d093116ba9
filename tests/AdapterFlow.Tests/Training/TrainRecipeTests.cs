using AdapterFlow.Adapters.Bottleneck;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.Adapters.PrefixTuning;
using AdapterFlow.Training;

namespace AdapterFlow.Tests.Training;

public class TrainRecipeTests
{
    internal static string RecipesDir()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "AdapterFlow.sln"))) return Path.Combine(dir.FullName, "recipes");
        throw new DirectoryNotFoundException("repository root (AdapterFlow.sln) not found");
    }

    [Fact]
    public void Every_shipped_recipe_parses_into_valid_options()
    {
        // LLM-Adapters' math recipes share these settings; the LayerSkip and DPO recipes have their own tests.
        var files = Directory.GetFiles(RecipesDir(), "math-*").Where(f => f.EndsWith(".yaml") || f.EndsWith(".json")).ToArray();
        Assert.True(files.Length >= 4, $"expected the math recipes, found {files.Length}");
        foreach (var file in files)
        {
            var recipe = TrainRecipe.Load(file);
            var options = recipe.ToTrainerOptions("out");
            options.Validate();
            Assert.NotNull(recipe.ToPeftConfig());
            Assert.Equal(3, options.Epochs);
            Assert.Equal(16, options.BatchSize);
            Assert.Equal(4, options.MicroBatchSize);
            Assert.Equal(100, options.WarmupSteps);
            Assert.Equal(256, recipe.ToSftOptions().CutoffLength);
        }
    }

    [Fact]
    public void Dpo_recipe_parses_with_its_objective_and_flags_override_it()
    {
        var recipe = TrainRecipe.Load(Path.Combine(RecipesDir(), "dpo-lora.yaml"));
        Assert.Equal("dpo", recipe.Objective);
        Assert.Equal(0.1, recipe.ToDpoOptions().Beta);
        Assert.Equal(0.1, recipe.EvalSplit);
        Assert.Equal(50, recipe.EvalEvery);
        var options = recipe.ToTrainerOptions("out");
        options.Validate();
        Assert.Equal(5e-5, options.LearningRate);
        Assert.IsType<LoraConfig>(recipe.ToPeftConfig());
        var overlaid = recipe.OverlaidBy(new TrainRecipe { Beta = 0.3, LabelSmoothing = 0.1, ChatTemplate = "zephyr", EvalEvery = 5, BadRecords = "skip" });
        Assert.Equal(0.3, overlaid.ToDpoOptions().Beta);
        Assert.Equal(0.1, overlaid.ToDpoOptions().LabelSmoothing);
        Assert.Equal("zephyr", overlaid.ChatTemplate);
        Assert.Equal(5, overlaid.EvalEvery);
        Assert.Equal(0.1, overlaid.EvalSplit);
        Assert.Equal(AdapterFlow.Data.BadRecordPolicy.Skip, overlaid.ToBadRecordPolicy());
    }

    [Theory]
    [InlineData("objective: rlhf\n", "unknown objective 'rlhf'")]
    [InlineData("beta: 0\n", "beta must be positive")]
    [InlineData("label_smoothing: 0.7\n", "label_smoothing must be in [0, 0.5)")]
    [InlineData("eval_split: 1.5\n", "eval_split must be a fraction")]
    [InlineData("eval_split: 0.1\neval_data: x.json\n", "not both")]
    [InlineData("eval_every: 5\n", "eval_every needs eval_data or eval_split")]
    [InlineData("bad_records: ignore\n", "bad_records must be fail or skip")]
    [InlineData("rewarm_steps: 10\nwarmup_steps: 5\n", "warmup_steps or rewarm_steps")]
    [InlineData("save_total_limit: 0\n", "save_total_limit")]
    public void Bad_objective_settings_name_the_key(string yaml, string expected)
    {
        var path = Path.Combine(Path.GetTempPath(), $"af-recipe-{Guid.NewGuid():N}.yaml");
        File.WriteAllText(path, yaml);
        try
        {
            var error = Assert.ThrowsAny<Exception>(() => TrainRecipe.Load(path));
            Assert.Contains(expected, error.Message);
            Assert.Contains(path, error.Message);
        }
        finally { File.Delete(path); }
    }

    [Fact]
    public void Math_recipes_hold_llm_adapters_settings()
    {
        var lora = TrainRecipe.Load(Path.Combine(RecipesDir(), "math-lora.yaml"));
        var config = Assert.IsType<LoraConfig>(lora.ToPeftConfig());
        Assert.Equal(32, config.R);
        Assert.Equal(64, config.LoraAlpha);
        Assert.Equal(["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], config.TargetModules!.List!);
        Assert.Equal(3e-4, lora.ToTrainerOptions(null).LearningRate);

        var series = Assert.IsType<BottleneckConfig>(TrainRecipe.Load(Path.Combine(RecipesDir(), "math-bottleneck-series.yaml")).ToPeftConfig());
        Assert.Equal(256, series.BottleneckSize);
        Assert.False(series.UseParallelAdapter);
        var parallel = Assert.IsType<BottleneckConfig>(TrainRecipe.Load(Path.Combine(RecipesDir(), "math-bottleneck-parallel.yaml")).ToPeftConfig());
        Assert.True(parallel.UseParallelAdapter);

        var prefixRecipe = TrainRecipe.Load(Path.Combine(RecipesDir(), "math-prefix.json"));
        Assert.Equal(10, Assert.IsType<PrefixTuningConfig>(prefixRecipe.ToPeftConfig()).NumVirtualTokens);
        Assert.Equal(3e-2, prefixRecipe.ToTrainerOptions(null).LearningRate);
    }

    [Theory]
    [InlineData(12, 6)]
    [InlineData(16, 8)]
    [InlineData(3, 3)]
    [InlineData(7, 7)]
    [InlineData(14, 7)]
    public void Default_micro_batch_divides_the_batch(int batch, int micro)
    {
        var recipe = new TrainRecipe { Method = "lora", BatchSize = batch };
        recipe.Validate("test");
        Assert.Equal(micro, recipe.ToTrainerOptions(null).MicroBatchSize);
    }

    [Fact]
    public void Overlay_keeps_unset_values()
    {
        var file = new TrainRecipe { Method = "lora", LoraR = 32, Epochs = 3 };
        var merged = file.OverlaidBy(new TrainRecipe { LoraR = 4, SaveTotalLimit = 3 });
        Assert.Equal(4, merged.LoraR);
        Assert.Equal(3, merged.ToTrainerOptions("out").SaveTotalLimit);
        Assert.Equal(3, merged.Epochs);
        Assert.Equal("lora", merged.Method);
    }

    [Fact]
    public void LayerSkip_recipes_turn_into_layer_dropout_and_early_exit_options()
    {
        var pretrain = TrainRecipe.Load(Path.Combine(RecipesDir(), "layerskip-pretrain.yaml"));
        Assert.Null(pretrain.ToPeftConfig());
        var options = pretrain.ToTrainerOptions("out");
        options.Validate();
        Assert.Equal(new LayerDropoutOptions(0.1, LayerDropoutScale.Exponential, LayerDropoutCurriculum.Exponential), options.LayerDropout);
        Assert.Equal(new EarlyExitOptions(EarlyExitScale.Uniform, EarlyExitCurriculum.Gradual), options.EarlyExit);

        var finetune = TrainRecipe.Load(Path.Combine(RecipesDir(), "layerskip-finetune.yaml")).ToTrainerOptions(null);
        Assert.Equal(new LayerDropoutOptions(0.1), finetune.LayerDropout);
        Assert.Equal(new EarlyExitOptions(EarlyExitScale.Sum, EarlyExitCurriculum.Rotational, Rotation: 4), finetune.EarlyExit);
    }

    [Fact]
    public void LayerSkip_keys_default_overlay_and_fail_cleanly()
    {
        // Only the rate: exponential in depth, constant in time; early exit off.
        var options = new TrainRecipe { Method = "full", LayerDropout = 0.2 }.ToTrainerOptions(null);
        Assert.Equal(new LayerDropoutOptions(0.2), options.LayerDropout);
        Assert.Null(options.EarlyExit);
        Assert.Null(new TrainRecipe { Method = "full", LayerDropout = 0 }.ToTrainerOptions(null).LayerDropout);
        Assert.Equal(new EarlyExitOptions(), new TrainRecipe { EarlyExitLoss = true }.ToTrainerOptions(null).EarlyExit);

        var file = new TrainRecipe { EarlyExitLoss = true, EarlyExitScale = "sum", EarlyExitRotation = 2, LayerDropout = 0.1 };
        var merged = file.OverlaidBy(new TrainRecipe { EarlyExitScale = "inv", LayerDropoutScale = "linear" });
        Assert.Equal(new EarlyExitOptions(EarlyExitScale.Inverse, Rotation: 2), merged.ToEarlyExitOptions());
        Assert.Equal(new LayerDropoutOptions(0.1, LayerDropoutScale.Linear), merged.ToLayerDropoutOptions());

        using var dir = new AdapterFlow.Tests.Cli.TempDir();
        string Bad(string yaml)
        {
            var path = dir.File($"r{Guid.NewGuid():N}.yaml");
            File.WriteAllText(path, yaml);
            var e = Assert.ThrowsAny<Exception>(() => TrainRecipe.Load(path));
            Assert.True(e is ArgumentException or InvalidDataException, e.GetType().Name);
            Assert.DoesNotContain('\n', e.Message);
            Assert.Contains(path, e.Message);
            return e.Message;
        }
        Assert.Contains("layer_dropout", Bad("layer_dropout: 1.0\n"));
        Assert.Contains("layer_dropout_scale", Bad("layer_dropout: 0.1\nlayer_dropout_scale: cubic\n"));
        Assert.Contains("early_exit_curriculum", Bad("early_exit_loss: true\nearly_exit_curriculum: random\n"));
        Assert.Contains("early_exit_rotation", Bad("early_exit_loss: true\nearly_exit_rotation: 0\n"));
        Assert.Contains("need early_exit_loss", Bad("early_exit_scale: sum\n"));
        Assert.Contains("need layer_dropout", Bad("layer_dropout_curriculum: exp\n"));
        Assert.Contains("early_exit_loss", Bad("early_exit_loss: maybe\n"));
        Assert.Contains("early_exit_distillation", Bad("early_exit_loss: true\nearly_exit_distillation: 1.5\n"));
        Assert.Contains("need early_exit_loss", Bad("early_exit_distillation: 0.5\n"));
        Assert.Contains("early_exit_layers", Bad("early_exit_loss: true\nearly_exit_layers: [0, 2]\n"));
        Assert.Contains("early_exit_layers", Bad("early_exit_loss: true\nearly_exit_layers: [two]\n"));
        Assert.Contains("need early_exit_loss", Bad("early_exit_layers: [2]\n"));
        foreach (var list in new[] { "[2, 3]", "2, 3" })
        {
            string path = Path.Combine(Path.GetTempPath(), $"af-recipe-{Guid.NewGuid():N}.yaml");
            File.WriteAllText(path, $"early_exit_loss: true\nearly_exit_layers: {list}\n");
            try
            {
                Assert.Equal([2, 3], TrainRecipe.Load(path).ToEarlyExitOptions()!.Layers!);
            }
            finally
            {
                File.Delete(path);
            }
        }

        var distilled = new TrainRecipe { EarlyExitLoss = true, EarlyExitScale = "uniform" }.OverlaidBy(new TrainRecipe { EarlyExitDistillation = 0.5 });
        Assert.Equal(new EarlyExitOptions(EarlyExitScale.Uniform, Distillation: 0.5), distilled.ToEarlyExitOptions());
        Assert.Contains("distillation", Assert.Throws<ArgumentException>(() => new EarlyExitOptions(Distillation: -0.1).Validate()).Message);
    }
}

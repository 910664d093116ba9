using System.Text.Json.Nodes;

namespace AdapterFlow.Tests.Cli;

/// <summary>`adapterflow train` with LayerSkip's flags on the 4-layer tiny model made by `init`.</summary>
[Collection(TinyModelCollection.Name)]
public class CliLayerSkipTrainTests(TinyModelFixture tiny)
{
    private static string WriteDataset(TempDir tmp)
    {
        var path = tmp.File("data.jsonl");
        File.WriteAllLines(path, Enumerable.Range(0, 8).Select(i => $"{{\"instruction\": \"Count from {i}.\", \"output\": \"{string.Join(" ", Enumerable.Range(i, 5))}\"}}"));
        return path;
    }

    private static JsonNode[] Metrics(string outDir) =>
        File.ReadLines(Path.Combine(outDir, "metrics.jsonl")).Where(l => l.Length > 0).Select(l => JsonNode.Parse(l)!).ToArray();

    private static bool[] ExitsTrained(JsonNode step) => step["exit_losses"]!.AsArray().Select(l => l is not null).ToArray();

    private static string RecipesDir()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "AdapterFlow.sln"))) return Path.Combine(dir.FullName, "recipes");
        throw new DirectoryNotFoundException("repository root (AdapterFlow.sln) not found");
    }

    [Fact]
    public void Layer_skip_flags_reach_the_trainer()
    {
        Assert.Equal(0, tiny.InitRun.ExitCode);
        using var tmp = new TempDir();
        var data = WriteDataset(tmp);
        string[] Args(string outDir, params string[] extra) =>
            ["train", "--model", tiny.ModelDir, "--data", data, "--method", "full", "--out", tmp.File(outDir), "--max-steps", "2", "--batch-size", "4",
             "--seed", "3", "--json", .. extra];

        var summary = CliRunner.Run(Args("skip", "--layer-dropout", "0.5", "--layer-dropout-scale", "uniform", "--layer-dropout-curriculum", "none",
            "--early-exit-loss", "--early-exit-scale", "uniform", "--early-exit-curriculum", "rotational", "--early-exit-rotation", "2",
            "--early-exit-layer-scale", "0.5")).AssertSuccess().LastJson();
        Assert.True(summary.GetProperty("early_exit_loss").GetDouble() > 0);
        var metrics = Metrics(tmp.File("skip"));
        // Rotation 2 over 4 layers: layers 0 and 2 (and the last) at the first step, 1 and 3 at the second.
        Assert.Equal([true, false, true, true], ExitsTrained(metrics[0]));
        Assert.Equal([false, true, false, true], ExitsTrained(metrics[1]));
        // e_scale 0.5, uniform: weights 0.25, 0.25, 0.5 at the first step.
        var exits = metrics[0]["exit_losses"]!.AsArray();
        double expected = 0.25 * (double)exits[0]! + 0.25 * (double)exits[2]! + 0.5 * (double)exits[3]!;
        Assert.Equal(expected, (double)metrics[0]["early_exit_loss"]!, 4);
        Assert.Equal((double)metrics[0]["loss"]!, (double)exits[3]!, 6);

        // Distillation α = 1: the early exits' terms are their KL divergences from the last layer, no longer their CEs.
        CliRunner.Run(Args("distilled", "--early-exit-loss", "--early-exit-scale", "uniform", "--early-exit-distillation", "1")).AssertSuccess();
        var distilled = Metrics(tmp.File("distilled"))[0];
        var distilledExits = distilled["exit_losses"]!.AsArray().Select(e => (double)e!).ToArray();
        double crossEntropyOnly = distilledExits.Average();
        Assert.True(Math.Abs((double)distilled["early_exit_loss"]! - crossEntropyOnly) > 1e-3,
            $"J {(double)distilled["early_exit_loss"]!} equals the plain weighted cross-entropy {crossEntropyOnly}: the distillation flag did not reach the loss");
        Assert.Contains("--early-exit-distillation", CliRunner.Run(Args("bad", "--early-exit-loss", "--early-exit-distillation", "1.5")).AssertUsageError());

        // Layer dropout changes the computation from the first step; without the flags no early-exit fields appear.
        CliRunner.Run(Args("plain")).AssertSuccess();
        var plain = Metrics(tmp.File("plain"));
        Assert.Null(plain[0]["early_exit_loss"]);
        CliRunner.Run(Args("dropout-only", "--layer-dropout", "0.5", "--layer-dropout-scale", "uniform")).AssertSuccess();
        Assert.NotEqual((double)plain[0]["loss"]!, (double)Metrics(tmp.File("dropout-only"))[0]["loss"]!);
    }

    [Fact]
    public void The_layerskip_recipe_trains_and_flags_override_it()
    {
        using var tmp = new TempDir();
        var outDir = tmp.File("out");
        CliRunner.Run("train", "--model", tiny.ModelDir, "--data", WriteDataset(tmp), "--config", Path.Combine(RecipesDir(), "layerskip-pretrain.yaml"),
            "--out", outDir, "--max-steps", "1", "--batch-size", "4", "--micro-batch-size", "2", "--early-exit-curriculum", "none", "--json").AssertSuccess();
        // The recipe's gradual curriculum would train only the last exit at step 0; the flag's "none" trains all.
        Assert.Equal([true, true, true, true], ExitsTrained(Metrics(outDir)[0]));
        Assert.True(File.Exists(Path.Combine(outDir, "model.safetensors")));
    }

    [Fact]
    public void Bad_layer_skip_flags_exit_2_naming_the_flag()
    {
        using var tmp = new TempDir();
        var data = WriteDataset(tmp);
        string[] Base(string outName) => ["train", "--model", tiny.ModelDir, "--data", data, "--method", "full", "--out", tmp.File(outName), "--max-steps", "1"];
        Assert.Contains("--layer-dropout", CliRunner.Run([.. Base("a"), "--layer-dropout", "1"]).AssertUsageError());
        Assert.Contains("cubic", CliRunner.Run([.. Base("b"), "--early-exit-loss", "--early-exit-scale", "cubic"]).AssertUsageError());
        Assert.Contains("--early-exit-rotation", CliRunner.Run([.. Base("c"), "--early-exit-loss", "--early-exit-rotation", "0"]).AssertUsageError());
        Assert.Contains("early_exit_loss", CliRunner.Run([.. Base("d"), "--early-exit-curriculum", "gradual"]).AssertUsageError());
        Assert.Contains("layer_dropout", CliRunner.Run([.. Base("e"), "--layer-dropout-scale", "linear"]).AssertUsageError());
        Assert.Contains("--early-exit-layers: 'two'", CliRunner.Run([.. Base("f"), "--early-exit-loss", "--early-exit-layers", "2,two"]).AssertUsageError());
        Assert.Contains("early_exit_loss", CliRunner.Run([.. Base("g"), "--early-exit-layers", "2"]).AssertUsageError());
    }

    [Fact]
    public void Help_explains_every_layer_skip_flag()
    {
        var help = CliRunner.Run("train", "--help").AssertSuccess().Stdout;
        foreach (var option in new[] { "--layer-dropout", "--layer-dropout-scale", "--layer-dropout-curriculum", "--early-exit-loss", "--early-exit-scale",
                     "--early-exit-curriculum", "--early-exit-rotation", "--early-exit-layer-scale", "--early-exit-distillation", "--early-exit-layers", "exp|linear|uniform", "none|rotational|gradual" })
            Assert.Contains(option, help);
    }
}

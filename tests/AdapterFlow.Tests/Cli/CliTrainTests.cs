using System.Text.Json;
using System.Text.Json.Nodes;

namespace AdapterFlow.Tests.Cli;

/// <summary>`adapterflow train`: a few steps on the tiny model made by `init`, with a small generated dataset.</summary>
[Collection(TinyModelCollection.Name)]
public class CliTrainTests(TinyModelFixture tiny)
{
    private static string WriteDataset(TempDir tmp, int count = 12)
    {
        var records = new JsonArray();
        for (int i = 0; i < count; i++)
            records.Add(new JsonObject { ["instruction"] = $"Add {i} and {i + 1}.", ["input"] = i % 3 == 0 ? "quickly" : "", ["output"] = $"The sum is {2 * i + 1}." });
        var path = tmp.File("data.json");
        File.WriteAllText(path, records.ToJsonString());
        return path;
    }

    private static List<JsonNode> Metrics(string outDir) =>
        File.ReadLines(Path.Combine(outDir, "metrics.jsonl")).Where(l => l.Length > 0).Select(l => JsonNode.Parse(l)!).ToList();

    private static void AssertPng(string path)
    {
        Assert.True(File.Exists(path), $"{path} missing");
        var bytes = File.ReadAllBytes(path);
        Assert.Equal(new byte[] { 0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A }, bytes[..8]);
        Assert.True(bytes.Length > 5_000, $"loss.png is only {bytes.Length} bytes");
    }

    [Fact]
    public void Lora_training_writes_a_loadable_adapter_metrics_and_plot()
    {
        Assert.Equal(0, tiny.InitRun.ExitCode);
        using var tmp = new TempDir();
        var outDir = tmp.File("lora-out");
        var run = CliRunner.Run("train", "--model", tiny.ModelDir, "--data", WriteDataset(tmp), "--method", "lora", "--out", outDir,
            "--max-steps", "4", "--batch-size", "4", "--micro-batch-size", "2", "--learning-rate", "1e-2", "--lora-r", "4", "--json").AssertSuccess();
        var summary = run.LastJson();
        Assert.Equal(4, summary.GetProperty("steps").GetInt32());
        Assert.True(double.IsFinite(summary.GetProperty("final_loss").GetDouble()));
        Assert.True(summary.GetProperty("tokens_per_second").GetDouble() > 0);
        Assert.Equal(outDir, summary.GetProperty("output").GetString());

        foreach (var name in new[] { "adapter_config.json", "adapter_model.safetensors", "tokenizer.json" })
            Assert.True(File.Exists(Path.Combine(outDir, name)), $"{name} missing");
        // A second run into the same folder is refused rather than replacing the adapter.
        Assert.Contains("already holds", CliRunner.Run("train", "--model", tiny.ModelDir, "--data", WriteDataset(tmp), "--method", "lora",
            "--out", outDir, "--max-steps", "1").AssertUsageError());
        var adapterConfig = JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "adapter_config.json")))!;
        Assert.Equal("LORA", (string?)adapterConfig["peft_type"]);
        Assert.Equal(4, (int?)adapterConfig["r"]);

        var metrics = Metrics(outDir);
        Assert.Equal([1, 2, 3, 4], metrics.Select(m => (int)m["step"]!));
        Assert.All(metrics, m => Assert.True(double.IsFinite((double)m["loss"]!)));
        AssertPng(Path.Combine(outDir, "loss.png"));

        var generated = CliRunner.Run("generate", "--model", tiny.ModelDir, "--adapter", outDir, "--prompt", "Add 1 and 2.", "--max-new-tokens", "4", "--json")
            .AssertSuccess().LastJson();
        Assert.Equal(JsonValueKind.Object, generated.ValueKind);
    }

    [Fact]
    public void Full_training_writes_a_loadable_model_with_changed_weights()
    {
        using var tmp = new TempDir();
        var outDir = tmp.File("full-out");
        var run = CliRunner.Run("train", "--model", tiny.ModelDir, "--data", WriteDataset(tmp), "--method", "full", "--out", outDir,
            "--max-steps", "2", "--batch-size", "4").AssertSuccess();
        Assert.Contains("final loss", run.Stdout);
        Assert.Contains(outDir, run.Stdout);
        // Redirected output gets plain progress lines (here the last step's) instead of a progress bar.
        Assert.Contains(run.StdoutLines, l => l.StartsWith("step 2/2  loss ") && l.Contains(" tok/s  eta "));
        foreach (var name in new[] { "config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png" })
            Assert.True(File.Exists(Path.Combine(outDir, name)), $"{name} missing");
        Assert.NotEqual(File.ReadAllBytes(Path.Combine(tiny.ModelDir, "model.safetensors")), File.ReadAllBytes(Path.Combine(outDir, "model.safetensors")));
        CliRunner.Run("generate", "--model", outDir, "--prompt", "Add 1 and 2.", "--max-new-tokens", "3").AssertSuccess();
    }

    [Theory]
    [InlineData("bf16-mixed", "lora", "F32")]
    [InlineData("bf16", "lora", "BF16")]
    [InlineData("bf16-mixed", "full", "F32")]
    public void Bf16_training_saves_in_the_documented_dtype(string precision, string method, string savedDType)
    {
        using var tmp = new TempDir();
        var outDir = tmp.File($"{method}-{precision}");
        var summary = CliRunner.Run("train", "--model", tiny.ModelDir, "--data", WriteDataset(tmp), "--method", method, "--out", outDir,
            "--max-steps", "2", "--batch-size", "4", "--precision", precision, "--json").AssertSuccess().LastJson();
        Assert.Equal(precision, summary.GetProperty("precision").GetString());
        Assert.True(double.IsFinite(summary.GetProperty("final_loss").GetDouble()));
        var weights = Path.Combine(outDir, method == "full" ? "model.safetensors" : "adapter_model.safetensors");
        using var saved = AdapterFlow.IO.SafetensorsFile.Open(weights);
        Assert.All(saved.Entries, e => Assert.Equal(savedDType, e.DType));
    }

    [Fact]
    public void Flags_override_the_recipe()
    {
        using var tmp = new TempDir();
        var recipe = tmp.File("recipe.yaml");
        File.WriteAllText(recipe, "method: lora\nlora_r: 8\nlora_alpha: 24\nmax_steps: 2\nbatch_size: 4\ntarget_modules: [q_proj, v_proj]\n");
        var outDir = tmp.File("out");
        var summary = CliRunner.Run("train", "--model", tiny.ModelDir, "--data", WriteDataset(tmp), "--config", recipe, "--out", outDir,
            "--lora-r", "2", "--max-steps", "1", "--json").AssertSuccess().LastJson();
        Assert.Equal(1, summary.GetProperty("steps").GetInt32());
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "adapter_config.json")))!;
        Assert.Equal(2, (int?)config["r"]);             // flag wins
        Assert.Equal(24, (double?)config["lora_alpha"]); // from the file
        var targets = config["target_modules"]!.AsArray().Select(t => (string)t!).Order().ToArray();
        Assert.Equal(["q_proj", "v_proj"], targets);
    }

    [Fact]
    public void Bad_inputs_exit_2_with_one_line_naming_the_culprit()
    {
        using var tmp = new TempDir();
        var data = WriteDataset(tmp);
        string[] Base(string outName) => ["train", "--model", tiny.ModelDir, "--out", tmp.File(outName), "--max-steps", "1"];

        var badData = tmp.File("bad.jsonl");
        File.WriteAllText(badData, "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"c\"}\n");
        var message = CliRunner.Run([.. Base("o1"), "--data", badData, "--method", "lora"]).AssertUsageError();
        Assert.Contains("bad.jsonl", message);

        var badKey = tmp.File("badkey.yaml");
        File.WriteAllText(badKey, "method: lora\nlora_rank: 8\n");
        message = CliRunner.Run([.. Base("o2"), "--data", data, "--config", badKey]).AssertUsageError();
        Assert.Contains("lora_rank", message);
        Assert.Contains("badkey.yaml", message);

        var badValue = tmp.File("badvalue.json");
        File.WriteAllText(badValue, "{\"method\": \"lora\", \"learning_rate\": \"fast\"}");
        message = CliRunner.Run([.. Base("o3"), "--data", data, "--config", badValue]).AssertUsageError();
        Assert.Contains("learning_rate", message);

        message = CliRunner.Run([.. Base("o4"), "--data", data, "--method", "qlora"]).AssertUsageError();
        Assert.Contains("qlora", message);

        message = CliRunner.Run([.. Base("o5"), "--data", data]).AssertUsageError();
        Assert.Contains("--method", message);

        message = CliRunner.Run([.. Base("o6"), "--data", data, "--method", "lora", "--batch-size", "6", "--micro-batch-size", "4"]).AssertUsageError();
        Assert.Contains("micro_batch_size", message);

        message = CliRunner.Run([.. Base("o7"), "--data", data, "--method", "lora", "--resume"]).AssertUsageError();
        Assert.Contains("checkpoint", message);
    }

    [Fact]
    public void Help_lists_every_option()
    {
        var help = CliRunner.Run("train", "--help").AssertSuccess().Stdout;
        foreach (var option in new[] { "--model", "--data", "--method", "--out", "--config", "--epochs", "--learning-rate", "--batch-size",
                     "--micro-batch-size", "--cutoff-len", "--warmup-steps", "--lr-scheduler", "--lora-r", "--lora-alpha", "--lora-dropout",
                     "--target-modules", "--train-on-inputs", "--seed", "--save-steps", "--save-total-limit", "--resume", "--max-steps", "--device", "--json" })
            Assert.Contains(option, help);
    }
}

[Collection(TinyModelCollection.Name)]
public class CliTrainMethodTests(TinyModelFixture tiny)
{
    [Theory]
    [InlineData("ia3", "IA3")]
    [InlineData("prefix", "PREFIX_TUNING")]
    [InlineData("prompt", "PROMPT_TUNING")]
    [InlineData("bottleneck", "BOTTLENECK")]
    public void Each_adapter_method_trains_and_loads(string method, string peftType)
    {
        using var tmp = new TempDir();
        var data = tmp.File("data.jsonl");
        File.WriteAllLines(data, Enumerable.Range(0, 6).Select(i => $"{{\"instruction\": \"Count to {i}.\", \"output\": \"{string.Join(" ", Enumerable.Range(1, i + 1))}\"}}"));
        var outDir = tmp.File("out");
        CliRunner.Run("train", "--model", tiny.ModelDir, "--data", data, "--method", method, "--out", outDir, "--max-steps", "2", "--batch-size", "3", "--json")
            .AssertSuccess();
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "adapter_config.json")))!;
        Assert.Equal(peftType, (string?)config["peft_type"], ignoreCase: true);
        CliRunner.Run("generate", "--model", tiny.ModelDir, "--adapter", outDir, "--prompt", "Count to 2.", "--max-new-tokens", "3").AssertSuccess();
    }

    [Fact]
    public void Resume_continues_from_the_latest_checkpoint()
    {
        using var tmp = new TempDir();
        var data = tmp.File("data.jsonl");
        File.WriteAllLines(data, Enumerable.Range(0, 8).Select(i => $"{{\"instruction\": \"Double {i}.\", \"output\": \"{2 * i}\"}}"));
        string[] Args(string outDir, params string[] extra) =>
            ["train", "--model", tiny.ModelDir, "--data", data, "--method", "lora", "--out", outDir, "--batch-size", "2", "--save-steps", "2",
             "--lr-scheduler", "constant", "--json", .. extra]; // a constant rate: the 2-step and 4-step runs share a schedule

        var straight = tmp.File("straight");
        CliRunner.Run(Args(straight, "--max-steps", "4")).AssertSuccess();
        var resumed = tmp.File("resumed");
        CliRunner.Run(Args(resumed, "--max-steps", "2")).AssertSuccess();
        var summary = CliRunner.Run(Args(resumed, "--max-steps", "4", "--resume")).AssertSuccess().LastJson();
        Assert.Equal(4, summary.GetProperty("steps").GetInt32());

        static double[] Losses(string dir) => File.ReadLines(Path.Combine(dir, "metrics.jsonl")).Select(l => (double)JsonNode.Parse(l)!["loss"]!).ToArray();
        var expected = Losses(straight);
        var actual = Losses(resumed);
        Assert.Equal(4, actual.Length);
        for (int i = 0; i < 4; i++) Assert.Equal(expected[i], actual[i], 1e-6);
    }
}

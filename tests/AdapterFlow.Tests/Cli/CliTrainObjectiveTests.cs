using System.Text.Json;
using System.Text.Json.Nodes;
using AdapterFlow.Tests.Training;

namespace AdapterFlow.Tests.Cli;

/// <summary>`adapterflow train --objective sft|pretrain|dpo` with chat templates, held-out evaluation and re-warming.</summary>
[Collection(TinyModelCollection.Name)]
public class CliTrainObjectiveTests(TinyModelFixture tiny)
{
    private static string WritePairs(TempDir tmp, int count = 12)
    {
        var lines = Enumerable.Range(0, count).Select(i => i % 2 == 0
            ? new JsonObject { ["prompt"] = $"What is {i} plus {i}?", ["chosen"] = $"{2 * i}", ["rejected"] = $"{2 * i + 1}" }.ToJsonString()
            : new JsonObject
            {
                ["prompt"] = new JsonArray(new JsonObject { ["role"] = "system", ["content"] = "Answer with a number." },
                                           new JsonObject { ["role"] = "user", ["content"] = $"Double {i}." }),
                ["chosen"] = new JsonArray(new JsonObject { ["role"] = "assistant", ["content"] = $"{2 * i}" }),
                ["rejected"] = new JsonArray(new JsonObject { ["role"] = "assistant", ["content"] = $"{i}" }),
            }.ToJsonString());
        var path = tmp.File("pairs.jsonl");
        File.WriteAllLines(path, lines);
        return path;
    }

    private static string WriteChats(TempDir tmp, int count = 8)
    {
        var lines = Enumerable.Range(0, count).Select(i => new JsonObject
        {
            ["messages"] = new JsonArray(
                new JsonObject { ["role"] = "user", ["content"] = $"Add {i} and 1." },
                new JsonObject { ["role"] = "assistant", ["content"] = $"{i + 1}" },
                new JsonObject { ["role"] = "user", ["content"] = "And again?" },
                new JsonObject { ["role"] = "assistant", ["content"] = $"{i + 2}" }),
        }.ToJsonString());
        var path = tmp.File("chat.jsonl");
        File.WriteAllLines(path, lines);
        return path;
    }

    private static List<JsonObject> Metrics(string outDir) =>
        File.ReadLines(Path.Combine(outDir, "metrics.jsonl")).Where(l => l.Length > 0).Select(l => JsonNode.Parse(l)!.AsObject()).ToList();

    [Fact]
    public void Dpo_lora_recipe_with_flags_eval_split_and_best_adapter()
    {
        using var tmp = new TempDir();
        var outDir = tmp.File("dpo");
        var recipe = Path.Combine(TrainRecipeTests.RecipesDir(), "dpo-lora.yaml");
        var run = CliRunner.Run("train", "--model", tiny.ModelDir, "--data", WritePairs(tmp), "--config", recipe, "--out", outDir,
            "--chat-template", "chatml", "--beta", "0.25", "--label-smoothing", "0.1", "--eval-split", "0.25", "--eval-every", "2",
            "--max-steps", "4", "--batch-size", "3", "--micro-batch-size", "3", "--learning-rate", "1e-2", "--lora-r", "4", "--json").AssertSuccess();
        var summary = run.LastJson();
        Assert.Equal("dpo", summary.GetProperty("objective").GetString());
        Assert.Equal("chatml", summary.GetProperty("chat_template").GetString());
        Assert.Equal(0.25, summary.GetProperty("beta").GetDouble());             // flag over the recipe's 0.1
        Assert.Equal(0.1, summary.GetProperty("label_smoothing").GetDouble());
        Assert.Equal("adapter disabled", summary.GetProperty("reference").GetString());
        Assert.Equal(9, summary.GetProperty("examples").GetInt32());
        Assert.Equal(3, summary.GetProperty("eval_examples").GetInt32());
        Assert.Equal(2, summary.GetProperty("eval_every").GetInt32());
        Assert.Equal(0.01, summary.GetProperty("learning_rate").GetDouble());
        var adapterConfig = JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "adapter_config.json")))!;
        Assert.Equal(4, (int?)adapterConfig["r"]);
        Assert.Equal(32, (double?)adapterConfig["lora_alpha"]);                 // from the recipe

        var metrics = Metrics(outDir);
        Assert.Equal([1, 2, 3, 4], metrics.Select(m => (int)m["step"]!));
        // Step 1: the adapter starts as the identity, so the policy is the reference and the loss is log 2.
        Assert.Equal(Math.Log(2), (double)metrics[0]["loss"]!, tolerance: 1e-4);
        foreach (var key in new[] { "reward_margin", "reward_accuracy", "rewards_chosen", "rewards_rejected" })
            Assert.All(metrics, m => Assert.True(m.ContainsKey(key), $"{key} missing"));
        var evaluated = metrics.Where(m => m.ContainsKey("eval_loss")).ToList();
        Assert.Equal([2, 4], evaluated.Select(m => (int)m["step"]!));
        Assert.All(evaluated, m => Assert.True(m.ContainsKey("eval_reward_accuracy")));
        int best = summary.GetProperty("best_step").GetInt32();
        Assert.Equal(evaluated.MinBy(m => (double)m["eval_loss"]!)!["step"]!.GetValue<int>(), best);
        Assert.True(File.Exists(Path.Combine(outDir, "best", "adapter_config.json")));
        Assert.True(File.Exists(Path.Combine(outDir, "best", "tokenizer.json")));

        // The same run again gives the same split and the same losses (the split is seeded).
        var again = tmp.File("dpo2");
        CliRunner.Run("train", "--model", tiny.ModelDir, "--data", WritePairs(tmp), "--config", recipe, "--out", again,
            "--chat-template", "chatml", "--beta", "0.25", "--label-smoothing", "0.1", "--eval-split", "0.25", "--eval-every", "2",
            "--max-steps", "4", "--batch-size", "3", "--micro-batch-size", "3", "--learning-rate", "1e-2", "--lora-r", "4", "--json").AssertSuccess();
        Assert.Equal(evaluated.Select(m => (double)m["eval_loss"]!), Metrics(again).Where(m => m.ContainsKey("eval_loss")).Select(m => (double)m["eval_loss"]!));
    }

    [Fact]
    public void Chat_sft_with_a_template_file_and_a_table_naming_the_best_step()
    {
        using var tmp = new TempDir();
        var template = tmp.File("template.yaml");
        File.WriteAllText(template, "name: qa\nuser: \"Q: {content}\\n\"\nassistant_start: \"A: \"\nassistant_end: \"{eos}\"\nassistant_after: \"\\n\"\n");
        var evalPath = tmp.File("eval.jsonl");
        File.WriteAllLines(evalPath, File.ReadLines(WriteChats(tmp, 3)));
        var outDir = tmp.File("chat");
        var run = CliRunner.Run("train", "--model", tiny.ModelDir, "--data", WriteChats(tmp), "--method", "lora", "--out", outDir,
            "--chat-template", template, "--eval-data", evalPath, "--eval-every", "1", "--max-steps", "2", "--batch-size", "4").AssertSuccess();
        Assert.Contains("objective", run.Stdout);
        Assert.Contains("qa template", run.Stdout);
        Assert.Contains("best eval loss", run.Stdout);
        Assert.Contains(Path.Combine(outDir, "best"), run.Stdout);
        Assert.Matches(@"at step [12]", run.Stdout);
        Assert.All(Metrics(outDir), m => Assert.True(m.ContainsKey("eval_loss")));
    }

    [Fact]
    public void Pretrain_with_rewarming_follows_the_schedule()
    {
        using var tmp = new TempDir();
        var text = tmp.File("corpus.txt");
        File.WriteAllText(text, string.Concat(Enumerable.Range(0, 60).Select(i => $"Line {i}: the quick brown fox jumps over the lazy dog. ")));
        var outDir = tmp.File("cpt");
        var summary = CliRunner.Run("train", "--model", tiny.ModelDir, "--data", text, "--objective", "pretrain", "--method", "full", "--out", outDir,
            "--cutoff-len", "64", "--rewarm-steps", "2", "--learning-rate", "1e-3", "--lr-scheduler", "cosine", "--max-steps", "4",
            "--batch-size", "2", "--json").AssertSuccess().LastJson();
        Assert.Equal("pretrain", summary.GetProperty("objective").GetString());
        Assert.Equal(1e-4, summary.GetProperty("min_learning_rate").GetDouble(), tolerance: 1e-12);
        var rates = Metrics(outDir).Select(m => (double)m["learning_rate"]!).ToArray();
        // Re-warm from a tenth of the peak over 2 steps, then cosine back towards the floor.
        Assert.Equal(1e-4, rates[0], tolerance: 1e-12);
        Assert.Equal(5.5e-4, rates[1], tolerance: 1e-12);
        Assert.Equal(1e-3, rates[2], tolerance: 1e-12);
        Assert.Equal(1e-4 + 0.9e-3 * 0.5, rates[3], tolerance: 1e-12);
        Assert.All(Metrics(outDir), m => Assert.Equal(128, (int)m["tokens"]!));
    }

    [Fact]
    public void Bad_records_and_mismatched_data_exit_2_with_file_and_line()
    {
        using var tmp = new TempDir();
        string[] Base(string outName) => ["train", "--model", tiny.ModelDir, "--out", tmp.File(outName), "--max-steps", "1", "--method", "lora"];
        var pairs = tmp.File("bad-pairs.jsonl");
        File.WriteAllLines(pairs, [
            """{"prompt": "Q1", "chosen": "a", "rejected": "b"}""",
            """{"prompt": "Q2", "chosen": "a"}""",
            """{"prompt": "Q3", "chosen": "a", "rejected": "c"}""",
        ]);
        var message = CliRunner.Run([.. Base("o1"), "--data", pairs, "--objective", "dpo", "--chat-template", "zephyr"]).AssertUsageError();
        Assert.Contains($"{pairs}:2: missing field 'rejected'", message);
        // Skipped, the run goes on with the others and names the skipped record.
        var skipped = CliRunner.Run([.. Base("o2"), "--data", pairs, "--objective", "dpo", "--chat-template", "zephyr", "--bad-records", "skip", "--json"]).AssertSuccess();
        Assert.Contains($"{pairs}:2: missing field 'rejected'", skipped.Stderr);
        Assert.Equal(2, skipped.LastJson().GetProperty("examples").GetInt32());
        Assert.Equal(1, skipped.LastJson().GetProperty("skipped_records").GetInt32());

        var chats = tmp.File("bad-chat.jsonl");
        File.WriteAllLines(chats, ["""{"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]}"""]);
        message = CliRunner.Run([.. Base("o3"), "--data", chats, "--chat-template", "chatml"]).AssertUsageError();
        Assert.Contains($"{chats}:1: messages[1]: unknown role 'bot'", message);

        message = CliRunner.Run([.. Base("o4"), "--data", pairs, "--chat-template", "chatml"]).AssertUsageError();
        Assert.Contains("--objective dpo", message);
        message = CliRunner.Run([.. Base("o5"), "--data", WriteChats(tmp)]).AssertUsageError();
        Assert.Contains("--chat-template", message);
        message = CliRunner.Run([.. Base("o6"), "--data", WriteChats(tmp), "--chat-template", "nonsense"]).AssertUsageError();
        Assert.Contains("nonsense", message);
        message = CliRunner.Run([.. Base("o7"), "--data", WriteChats(tmp), "--chat-template", "chatml", "--eval-every", "2"]).AssertUsageError();
        Assert.Contains("eval_every needs", message);
    }

    [Fact]
    public void Help_explains_the_new_options()
    {
        var help = CliRunner.Run("train", "--help").AssertSuccess().Stdout;
        foreach (var option in new[] { "--objective", "--chat-template", "--beta", "--label-smoothing", "--eval-data", "--eval-split", "--eval-every",
                     "--rewarm-steps", "--min-learning-rate", "--bad-records", "sft|pretrain|dpo", "llama2", "zephyr" })
            Assert.Contains(option, help);
    }
}

using System.Text.Json;

namespace AdapterFlow.Tests.Cli;

/// <summary>The decoding-strategy flags of `generate` and the `bench-speculative` command, on the tiny `init` model.</summary>
[Collection(TinyModelCollection.Name)]
public class CliSpeculativeTests(TinyModelFixture tiny)
{
    private static int[] Ids(JsonElement json) => json.GetProperty("token_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();

    private string[] Generate(params string[] extra) =>
        ["generate", "--model", tiny.ModelDir, "--prompt", "Tom has 12 apples", "--max-new-tokens", "10", "--temperature", "0", "--json", .. extra];

    [Fact]
    public void Self_speculative_generate_gives_the_autoregressive_tokens_and_reports_acceptance()
    {
        var plain = CliRunner.Run(Generate()).AssertSuccess().LastJson();
        Assert.Equal("autoregressive", plain.GetProperty("strategy").GetString());
        Assert.Equal(JsonValueKind.Null, plain.GetProperty("acceptance_rate").ValueKind);
        foreach (var (exit, k) in new[] { ("1", "3"), ("2", "1"), ("4", "2") })
        {
            var json = CliRunner.Run(Generate("--strategy", "self-speculative", "--exit-layer", exit, "--num-speculations", k)).AssertSuccess().LastJson();
            Assert.Equal(Ids(plain), Ids(json));
            Assert.Equal("self-speculative", json.GetProperty("strategy").GetString());
            Assert.Equal(int.Parse(k), json.GetProperty("num_speculations").GetInt32());
            Assert.InRange(json.GetProperty("acceptance_rate").GetDouble(), 0, 1);
            Assert.True(json.GetProperty("tokens_per_second").GetDouble() >= 0);
            // The draft is the whole model at E = 4: every draft is accepted, so rounds yield several tokens.
            if (exit == "4")
            {
                Assert.Equal(1.0, json.GetProperty("acceptance_rate").GetDouble());
                Assert.True(json.GetProperty("decode_steps").GetInt32() < Ids(json).Length - 1);
            }
        }
        var early = CliRunner.Run(Generate("--strategy", "early-exit", "--exit-layer", "4")).AssertSuccess().LastJson();
        Assert.Equal(Ids(plain), Ids(early)); // all layers: the same model
        Assert.Equal(1, CliRunner.Run(Generate("--strategy", "early-exit", "--exit-layer", "1")).AssertSuccess().LastJson().GetProperty("exit_layer").GetInt32());
    }

    [Fact]
    public void Draft_vocab_writes_a_vocabulary_that_generate_and_bench_use_without_changing_the_tokens()
    {
        var data = tiny.Scratch("draft-corpus.jsonl");
        File.WriteAllLines(data, ["{\"text\": \"Tom has 12 apples and buys 7 more.\"}", "{\"text\": \"A farmer has 48 sheep.\"}", "not json"]);
        var vocabPath = tiny.Scratch("draft-vocab.json");
        var made = CliRunner.Run("draft-vocab", "--model", tiny.ModelDir, "--data", data, "--size", "12", "-o", vocabPath, "--json").AssertSuccess();
        Assert.Contains("skipped 1 malformed record", made.Stderr);
        var json = made.LastJson();
        Assert.Equal(vocabPath, json.GetProperty("path").GetString());
        Assert.InRange(json.GetProperty("size").GetInt32(), 12, 13); // 12 tokens, and EOS unless among them
        Assert.InRange(json.GetProperty("coverage").GetDouble(), 0.3, 1.0);
        Assert.True(File.Exists(vocabPath));

        var plain = Ids(CliRunner.Run(Generate()).AssertSuccess().LastJson());
        foreach (var exit in new[] { "1", "2" })
        {
            var drafted = CliRunner.Run(Generate("--strategy", "self-speculative", "--exit-layer", exit, "--draft-vocab", vocabPath)).AssertSuccess().LastJson();
            Assert.Equal(plain, Ids(drafted));
        }
        Assert.Contains("--draft-vocab", CliRunner.Run(Generate("--draft-vocab", vocabPath)).AssertUsageError());
        // Verifying over the model's own weights instead of the panel copy: the same tokens again.
        Assert.Equal(plain, Ids(CliRunner.Run(Generate("--strategy", "self-speculative", "--exit-layer", "2", "--no-packed-weights")).AssertSuccess().LastJson()));
        Assert.Contains("--no-packed-weights", CliRunner.Run(Generate("--no-packed-weights")).AssertUsageError());
        var bad = tiny.Scratch("bad-vocab.json");
        File.WriteAllText(bad, "{\"token_ids\": [1, -3]}");
        var error = CliRunner.Run(Generate("--strategy", "self-speculative", "--exit-layer", "2", "--draft-vocab", bad));
        Assert.NotEqual(0, error.ExitCode);
        Assert.Contains("bad-vocab.json: token_ids[1]", error.Stderr);

        var bench = CliRunner.Run("bench-speculative", "--model", tiny.ModelDir, "--exit-layers", "2", "--num-speculations", "3", "-n", "6",
            "--repeats", "1", "--draft-vocab", vocabPath, "--json").AssertSuccess().LastJson();
        Assert.True(bench.GetProperty("all_identical").GetBoolean());
        Assert.Equal(json.GetProperty("size").GetInt32(), bench.GetProperty("draft_vocab_size").GetInt32());
        Assert.True(bench.GetProperty("packed_weights").GetBoolean());
    }

    [Fact]
    public void Self_speculative_text_output_shows_the_acceptance()
    {
        var run = CliRunner.Run("generate", "--model", tiny.ModelDir, "--prompt", "Once", "-n", "5", "--temperature", "0",
            "--strategy", "self-speculative", "--exit-layer", "2").AssertSuccess();
        Assert.Contains("drafts accepted", run.Stdout);
    }

    [Theory]
    [InlineData("--exit-layer", "1")]
    [InlineData("--strategy", "early-exit")]
    [InlineData("--strategy", "self-speculative")]
    [InlineData("--num-speculations", "3")]
    [InlineData("--strategy", "early-exit", "--exit-layer", "1", "--num-speculations", "3")]
    [InlineData("--strategy", "self-speculative", "--exit-layer", "9")]
    [InlineData("--strategy", "self-speculative", "--exit-layer", "0")]
    [InlineData("--strategy", "self-speculative", "--exit-layer", "1", "--num-speculations", "0")]
    [InlineData("--strategy", "medusa")]
    public void Bad_strategy_combinations_are_one_line_usage_errors(params string[] extra)
    {
        var error = CliRunner.Run(Generate(extra)).AssertUsageError();
        Assert.Matches("exit-layer|num-speculations|strategy|medusa", error);
    }

    [Fact]
    public void Help_explains_the_strategies()
    {
        var help = CliRunner.Run("generate", "--help").AssertSuccess().Stdout;
        foreach (var word in new[] { "--strategy", "self-speculative", "early-exit", "--exit-layer", "--num-speculations", "LayerSkip" })
            Assert.Contains(word, help);
        var benchHelp = CliRunner.Run("bench-speculative", "--help").AssertSuccess().Stdout;
        foreach (var word in new[] { "--exit-layers", "--num-speculations", "--prompts", "--json", "speed-up" })
            Assert.Contains(word, benchHelp);
    }

    [Fact]
    public void Bench_speculative_json_reports_the_sweep_and_the_best_setting()
    {
        var prompts = tiny.Scratch("bench-prompts.txt");
        File.WriteAllLines(prompts, ["Tom has 3 apples and buys 4 more.", "A farmer has 12 sheep."]);
        var run = CliRunner.Run("bench-speculative", "--model", tiny.ModelDir, "--prompts", prompts, "--exit-layers", "1,4",
            "--num-speculations", "1,3", "--max-new-tokens", "6", "--json").AssertSuccess();
        var json = run.LastJson();
        var sweep = json.GetProperty("sweep").EnumerateArray().ToArray();
        Assert.Equal(4, sweep.Length);
        Assert.Equal(new[] { (1, 1), (1, 3), (4, 1), (4, 3) },
            sweep.Select(p => (p.GetProperty("exit_layer").GetInt32(), p.GetProperty("num_speculations").GetInt32())).ToArray());
        Assert.All(sweep, p => Assert.True(p.GetProperty("identical").GetBoolean()));
        Assert.True(json.GetProperty("all_identical").GetBoolean());
        Assert.Equal(2, json.GetProperty("prompts").GetInt32());
        // E = 4 is the whole model: its drafts are always accepted.
        Assert.All(sweep.Where(p => p.GetProperty("exit_layer").GetInt32() == 4), p => Assert.Equal(1.0, p.GetProperty("acceptance_rate").GetDouble()));
        // The best setting is the sweep's fastest one.
        double best = json.GetProperty("best_speedup").GetDouble();
        var fastest = sweep.MaxBy(p => p.GetProperty("speedup").GetDouble());
        Assert.Equal(fastest.GetProperty("speedup").GetDouble(), best, 3);
        Assert.Equal(fastest.GetProperty("exit_layer").GetInt32(), json.GetProperty("best_exit_layer").GetInt32());
        Assert.Equal(fastest.GetProperty("num_speculations").GetInt32(), json.GetProperty("best_num_speculations").GetInt32());
        Assert.True(json.GetProperty("baseline_tokens_per_second").GetDouble() > 0);
        // Progress went to stderr, so stdout is just the JSON line.
        Assert.Single(run.StdoutLines);
        Assert.Contains("E=4 K=3", run.Stderr);
    }

    [Fact]
    public void Bench_speculative_prints_a_table_with_the_built_in_prompts()
    {
        var run = CliRunner.Run("bench-speculative", "--model", tiny.ModelDir, "--exit-layers", "2", "--num-speculations", "2", "--max-new-tokens", "3").AssertSuccess();
        Assert.Contains("autoregressive:", run.Stdout);
        Assert.Contains("speed-up", run.Stdout);
        Assert.Contains("Best: --exit-layer 2 --num-speculations 2", run.Stdout);
        Assert.Contains("6 prompts", run.Stdout);
    }

    [Theory]
    [InlineData("--exit-layers", "0")]
    [InlineData("--exit-layers", "9")]
    [InlineData("--exit-layers", "a,b")]
    [InlineData("--num-speculations", "")]
    [InlineData("--prompts", "/nonexistent/prompts.txt")]
    public void Bench_speculative_bad_arguments_are_usage_errors(string option, string value)
    {
        CliRunner.Run("bench-speculative", "--model", tiny.ModelDir, option, value, "--max-new-tokens", "2").AssertUsageError();
    }
}

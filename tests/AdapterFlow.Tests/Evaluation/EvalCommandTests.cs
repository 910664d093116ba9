using System.Text.Json;
using AdapterFlow.Evaluation;
using AdapterFlow.Tests.Cli;

namespace AdapterFlow.Tests.Evaluation;

/// <summary>`adapterflow eval` end to end on the real stories260K, and its argument errors.</summary>
public class EvalCommandTests
{
    [SkippableFact]
    public void Stories260KOnAFewGsm8kItemsRunsEndToEnd()
    {
        var model = SharedFiles.Require("models", "stories260K-hf");
        var data = SharedFiles.Require("data", "math");
        using var dir = new TempDir();
        var jsonl = dir.File("items.jsonl");
        var run = CliRunner.Run("eval", "--model", model, "--dataset", "gsm8k", "--data-dir", data, "--limit", "3",
            "--batch-size", "2", "--max-new-tokens", "12", "--out", jsonl, "--json").AssertSuccess();
        var json = run.LastJson();
        var gsm8k = json.GetProperty("datasets").GetProperty("gsm8k");
        Assert.Equal(3, gsm8k.GetProperty("n").GetInt32());
        int correct = gsm8k.GetProperty("correct").GetInt32();
        Assert.InRange(correct, 0, 3);
        Assert.Equal(correct / 3.0, gsm8k.GetProperty("accuracy").GetDouble(), 5);
        Assert.Equal("strict", json.GetProperty("scoring").GetProperty("aqua").GetString());

        var labels = JsonDocument.Parse(File.ReadAllText(Path.Combine(data, "gsm8k", "test.json"))).RootElement
            .EnumerateArray().Take(3).Select(e => e.GetProperty("answer").GetString()).ToArray();
        var lines = File.ReadAllLines(jsonl);
        Assert.Equal(3, lines.Length);
        var seen = new HashSet<int>();
        foreach (var line in lines)
        {
            var item = JsonDocument.Parse(line).RootElement;
            int index = item.GetProperty("index").GetInt32();
            Assert.True(seen.Add(index));
            Assert.Equal("gsm8k", item.GetProperty("dataset").GetString());
            Assert.StartsWith(MathPrompt.HeaderWithoutInput, item.GetProperty("prompt").GetString());
            Assert.Equal(labels[index], item.GetProperty("label").GetString());
            Assert.False(string.IsNullOrEmpty(item.GetProperty("generation").GetString()));
            Assert.InRange(item.GetProperty("new_tokens").GetInt32(), 1, 12);
            var response = item.GetProperty("response").GetString()!;
            var extracted = item.GetProperty("extracted");
            bool expectedCorrect = AnswerExtractor.IsCorrectNumber(double.Parse(labels[index]!, System.Globalization.CultureInfo.InvariantCulture),
                AnswerExtractor.ExtractNumber(response));
            Assert.Equal(expectedCorrect, item.GetProperty("correct").GetBoolean());
            Assert.True(extracted.ValueKind is JsonValueKind.String or JsonValueKind.Null);
        }
        Assert.Equal(new HashSet<int> { 0, 1, 2 }, seen);
    }

    [SkippableFact]
    public void Stories260KPerplexityOfAStoryIsLow()
    {
        var model = SharedFiles.Require("models", "stories260K-hf");
        using var dir = new TempDir();
        var text = dir.File("story.txt");
        File.WriteAllText(text, "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. " +
                                "One day, she saw a big, red ball. She wanted to play with it, but it was too high.");
        var json = CliRunner.Run("eval", "--model", model, "--perplexity", text, "--max-length", "32", "--stride", "16", "--json")
            .AssertSuccess().LastJson();
        double ppl = json.GetProperty("perplexity").GetDouble();
        // A TinyStories model on a TinyStories-like text: far below the 512 of a uniform guess.
        Assert.InRange(ppl, 1.0, 30.0);
        Assert.Equal(json.GetProperty("total_tokens").GetInt32() - 1, json.GetProperty("scored_tokens").GetInt32());
        Assert.Equal(16, json.GetProperty("stride").GetInt32());
    }

    [Fact]
    public void HelpListsEveryOptionWithADescription()
    {
        var run = CliRunner.Run("eval", "--help").AssertSuccess();
        foreach (var option in new[] { "--model", "--adapter", "--dataset", "--data-dir", "--limit", "--batch-size", "--max-new-tokens",
                     "--num-beams", "--aqua-scoring", "--out", "--perplexity", "--max-length", "--stride", "--device", "--dtype", "--json" })
        {
            var line = run.StdoutLines.FirstOrDefault(l => System.Text.RegularExpressions.Regex.IsMatch(l,
                $@"^\s+(-\w, )?{System.Text.RegularExpressions.Regex.Escape(option)}(\s|$)"));
            Assert.True(line is not null, $"eval --help does not list {option}:\n{run.Stdout}");
            Assert.Matches(@"\S\s{2,}\w", line);
        }
        Assert.Contains("  eval", CliRunner.Run("--help").AssertSuccess().Stdout);
    }

    [Fact]
    public void MissingAdapterFolderIsAUsageError()
    {
        var missing = Path.Combine(Path.GetTempPath(), "adapterflow-no-such-adapter-" + Guid.NewGuid().ToString("N"));
        var error = CliRunner.Run("eval", "--model", "m", "--adapter", missing, "--perplexity", "/dev/null").AssertUsageError();
        Assert.Contains("adapter folder not found", error);
    }

    [Fact]
    public void NeedsADatasetOrAPerplexityFile()
    {
        Assert.Contains("--dataset", CliRunner.Run("eval", "--model", "m").AssertUsageError());
        Assert.Contains("--perplexity", CliRunner.Run("eval", "--model", "m", "--dataset", "x", "--perplexity", "y").AssertUsageError());
    }

    [Fact]
    public void UnknownDatasetNamesTheDataFolder()
    {
        using var dir = new TempDir();
        Directory.CreateDirectory(dir.File("gsm8k"));
        File.WriteAllText(dir.File(Path.Combine("gsm8k", "test.json")), """[{"instruction":"x","answer":"1"}]""");
        var error = CliRunner.Run("eval", "--model", "m", "--dataset", "nosuch", "--data-dir", dir.Path).AssertUsageError();
        Assert.Contains("'nosuch'", error);
        Assert.Contains("gsm8k", error);
    }

    [Fact]
    public void BadOptionValuesAreRejected()
    {
        Assert.Contains("--batch-size", CliRunner.Run("eval", "--model", "m", "--dataset", "x", "--batch-size", "0").AssertUsageError());
        CliRunner.Run("eval", "--model", "m", "--dataset", "x", "--aqua-scoring", "loose").AssertUsageError();
    }
}

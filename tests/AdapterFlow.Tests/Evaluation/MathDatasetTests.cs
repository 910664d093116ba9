using AdapterFlow.Data;
using AdapterFlow.Tests.Cli;

namespace AdapterFlow.Tests.Evaluation;

public class MathDatasetTests
{
    private static string Write(TempDir dir, string name, string json)
    {
        var path = dir.File(name);
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        File.WriteAllText(path, json);
        return path;
    }

    [Fact]
    public void ReadsRecordsAndDecidesTheAnswerKind()
    {
        using var dir = new TempDir();
        var numbers = MathDataset.Load(Write(dir, "n.json",
            """[{"instruction":"2+2?","input":"","output":"4","answer":"4.0"},{"instruction":"3-5?","answer":-2}]"""));
        Assert.Equal("n", numbers.Name);
        Assert.Equal(AnswerKind.Number, numbers.Kind);
        Assert.Equal(2, numbers.Items.Count);
        Assert.Equal(4.0, numbers.Items[0].NumericAnswer);
        Assert.Equal(-2.0, numbers.Items[1].NumericAnswer);
        Assert.Equal("", numbers.Items[1].Input);
        Assert.Equal(1, numbers.Items[1].Index);
        Assert.Single(numbers.Take(1).Items);

        var letters = MathDataset.Load(Write(dir, "l.json",
            """[{"instruction":"Pick (A) 1 (B) 2","answer":"B"},{"instruction":"Pick","answer":"E"}]"""));
        Assert.Equal(AnswerKind.Letter, letters.Kind);
    }

    [Theory]
    [InlineData("{\"instruction\":\"x\",\"answer\":\"1\"}", "expected a JSON array")]
    [InlineData("[{\"instruction\":\"x\",\"answer\":\"1\"}, 7]", "item 1: expected an object")]
    [InlineData("[{\"instruction\":\"x\",\"answer\":\"1\"}, {\"answer\":\"2\"}]", "item 1: 'instruction' is missing")]
    [InlineData("[{\"instruction\":\"x\"}]", "item 0: 'answer' is missing")]
    [InlineData("[{\"instruction\":\"x\",\"answer\":true}]", "item 0: 'answer' must be a string or a number")]
    [InlineData("[{\"instruction\":5,\"answer\":\"1\"}]", "item 0: 'instruction' must be a string")]
    [InlineData("[{\"instruction\":\"x\",\"answer\":\"1\"},{\"instruction\":\"y\",\"answer\":\"1,5\"}]", "item 1: answer '1,5' is neither a number")]
    [InlineData("[]", "holds no items")]
    [InlineData("[{\"instruction\":\"x\",", "invalid JSON")]
    public void BadRecordsGiveOneLineErrorsNamingFileAndItem(string json, string expected)
    {
        using var dir = new TempDir();
        var path = Write(dir, "bad.json", json);
        var e = Assert.Throws<InvalidDataException>(() => MathDataset.Load(path));
        Assert.Contains(path, e.Message);
        Assert.Contains(expected, e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public void ResolvesNamesInADataFolderCaseInsensitively()
    {
        using var dir = new TempDir();
        Write(dir, Path.Combine("SVAMP", "test.json"), """[{"instruction":"x","answer":"1"}]""");
        Write(dir, Path.Combine("gsm8k", "test.json"), """[{"instruction":"y","answer":"2"}]""");
        var set = MathDataset.Resolve("svamp", dir.Path);
        Assert.Equal("SVAMP", set.Name);
        Assert.Equal("x", set.Items[0].Instruction);
        // A path to a file works too.
        Assert.Equal("y", MathDataset.Resolve(dir.File(Path.Combine("gsm8k", "test.json"))).Items[0].Instruction);
        var missing = Assert.Throws<FileNotFoundException>(() => MathDataset.Resolve("AQuA", dir.Path));
        Assert.Contains("'AQuA'", missing.Message);
        Assert.Contains("available there: gsm8k, SVAMP", missing.Message);
        var noFolder = Assert.Throws<DirectoryNotFoundException>(() => MathDataset.Resolve("gsm8k", dir.File("nowhere")));
        Assert.Contains("--data-dir", noFolder.Message);
    }

    [SkippableFact]
    public void ReadsTheSevenSharedSets()
    {
        var folder = SharedFiles.Require("data", "math");
        var expected = new Dictionary<string, int>
        {
            ["MultiArith"] = 600, ["gsm8k"] = 1319, ["AddSub"] = 395, ["AQuA"] = 254, ["SingleEq"] = 508, ["SVAMP"] = 1000, ["mawps"] = 238,
        };
        foreach (var name in MathDataset.StandardNames)
        {
            var set = MathDataset.Resolve(name, folder);
            Assert.Equal(expected[name], set.Items.Count);
            Assert.Equal(name == "AQuA" ? AnswerKind.Letter : AnswerKind.Number, set.Kind);
        }
    }
}

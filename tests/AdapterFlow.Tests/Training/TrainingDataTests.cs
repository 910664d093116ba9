using AdapterFlow.Data;

namespace AdapterFlow.Tests.Training;

public sealed class TrainingDataTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("af-training-data-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string Write(string name, string text)
    {
        var path = Path.Combine(_dir, name);
        File.WriteAllText(path, text);
        return path;
    }

    [Fact]
    public void Training_prompt_is_llm_adapters_finetune_template_byte_for_byte()
    {
        // Expected strings written out by hand from finetune.py's generate_prompt: 16-space indentation, blank
        // lines of 16 spaces, two trailing spaces after the no-input header and one after the with-input header.
        const string pad = "                ";
        Assert.Equal(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n" +
            pad + "### Instruction:\n" + pad + "Add 2 and 3.\n" + pad + "\n" + pad + "### Response:\n" + pad + "5",
            InstructionPrompt.Format("Add 2 and 3.", "", "5"));
        Assert.Equal(
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request. \n\n" +
            pad + "### Instruction:\n" + pad + "Add.\n" + pad + "\n" + pad + "### Input:\n" + pad + "2, 3\n" + pad + "\n" + pad + "### Response:\n" + pad + "5",
            InstructionPrompt.Format("Add.", "2, 3", "5"));
        Assert.Equal(InstructionPrompt.Format("Q", null, ""), InstructionPrompt.Prompt("Q", ""));
        Assert.StartsWith(InstructionPrompt.Prompt("Q", "x"), InstructionPrompt.Format("Q", "x", "answer"));
    }

    [Fact]
    public void Reads_json_array_and_jsonl_with_lines()
    {
        var array = Write("a.json", "[\n  {\"instruction\": \"i1\", \"input\": \"\", \"output\": \"o1\"},\n  {\"instruction\": \"i2\", \"input\": null, \"output\": \"o2\", \"answer\": 5}\n]");
        var a = InstructionDataset.Load(array);
        Assert.Equal(["i1", "i2"], a.Items.Select(e => e.Instruction));
        Assert.Equal([2, 3], a.Items.Select(e => e.Line));
        Assert.Equal("", a.Items[1].Input);
        Assert.Equal(0, a.SkippedCount);

        var lines = Write("b.jsonl", "{\"instruction\": \"i1\", \"output\": \"o1\"}\n\n{\"instruction\": \"i2\", \"input\": \"x\", \"output\": \"o2\"}\n");
        var b = InstructionDataset.Load(lines);
        Assert.Equal([1, 3], b.Items.Select(e => e.Line));
        Assert.Equal("x", b.Items[1].Input);
    }

    [Theory]
    [InlineData("{\"instruction\": \"i\"}", "missing field 'output'")]
    [InlineData("{\"instruction\": 3, \"output\": \"o\"}", "field 'instruction' must be a string")]
    [InlineData("{\"instruction\": \"i\", \"output\": \"  \"}", "field 'output' is empty")]
    [InlineData("[1]", "expected an object")]
    [InlineData("{\"instruction\": \"i\", \"output\": ", "invalid JSON")]
    public void Bad_record_error_names_file_and_line(string badLine, string expected)
    {
        var path = Write("bad.jsonl", "{\"instruction\": \"i1\", \"output\": \"o1\"}\n" + badLine + "\n{\"instruction\": \"i3\", \"output\": \"o3\"}\n");
        var e = Assert.Throws<InvalidDataException>(() => InstructionDataset.Load(path, BadRecordPolicy.Fail));
        Assert.StartsWith($"{path}:2: ", e.Message);
        Assert.Contains(expected, e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public void Bad_records_can_be_skipped_and_counted()
    {
        var broken = Write("broken.jsonl", "{\"instruction\": \"i1\", \"output\": \"o1\"}\n{\"instruction\": \n");
        Assert.Single(InstructionDataset.Load(broken, BadRecordPolicy.Skip).Items);
        var brokenArray = Write("broken.json", "[\n{\"instruction\": \"i1\", \"output\": \"o1\"},\n{\"instruction\" 5}\n]");
        Assert.StartsWith($"{brokenArray}:3: invalid JSON", Assert.Throws<InvalidDataException>(() => InstructionDataset.Load(brokenArray, BadRecordPolicy.Skip)).Message);

        var path = Write("bad.json", "[\n{\"instruction\": \"i1\", \"output\": \"o1\"},\n{\"instruction\": \"i2\"},\n{\"instruction\": \"i3\", \"output\": \"\"},\n{\"instruction\": \"i4\", \"output\": \"o4\"}\n]");
        var loaded = InstructionDataset.Load(path, BadRecordPolicy.Skip);
        Assert.Equal(["i1", "i4"], loaded.Items.Select(e => e.Instruction));
        Assert.Equal(2, loaded.SkippedCount);
        Assert.Equal([$"{path}:3: missing field 'output'", $"{path}:4: field 'output' is empty"], loaded.Problems);
        var e = Assert.Throws<InvalidDataException>(() => InstructionDataset.Load(path));
        Assert.StartsWith($"{path}:3: ", e.Message);
    }

    [Fact]
    public void Missing_file_is_named() =>
        Assert.Contains("nope.json", Assert.Throws<FileNotFoundException>(() => InstructionDataset.Load(Path.Combine(_dir, "nope.json"))).Message);

    [Fact]
    public void Text_corpus_reads_txt_and_jsonl()
    {
        var txt = TextCorpus.Load(Write("c.txt", "Once upon a time.\nThe end."));
        Assert.Equal("Once upon a time.\nThe end.", Assert.Single(txt.Items).Text);
        var jsonl = Write("c.jsonl", "{\"text\": \"one\"}\n{\"text\": 5}\n{\"text\": \"three\"}\n");
        var skipped = TextCorpus.Load(jsonl, BadRecordPolicy.Skip);
        Assert.Equal(["one", "three"], skipped.Items.Select(d => d.Text));
        Assert.Equal(1, skipped.SkippedCount);
        Assert.StartsWith($"{jsonl}:2: field 'text' must be a string", Assert.Throws<InvalidDataException>(() => TextCorpus.Load(jsonl)).Message);
    }
}

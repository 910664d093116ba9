using AdapterFlow.Data;
using AdapterFlow.Tests.Generation;
using AdapterFlow.Training;

namespace AdapterFlow.Tests.Data;

/// <summary>Chat and preference records: the accepted shapes, and bad records reported as file:line, skipped or fatal.</summary>
public sealed class ChatDataTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("af-chat-data-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string Write(string name, params string[] lines)
    {
        var path = Path.Combine(_dir, name);
        File.WriteAllText(path, string.Join("\n", lines) + "\n");
        return path;
    }

    private const string Good = """{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}""";

    [Fact]
    public void Reads_conversations_from_jsonl_and_json_arrays()
    {
        var jsonl = ChatDataset.Load(Write("c.jsonl", Good, "", Good));
        Assert.Equal(2, jsonl.Items.Count);
        Assert.Equal([ChatRole.System, ChatRole.User, ChatRole.Assistant], jsonl.Items[0].Messages.Select(m => m.Role));
        Assert.Equal(3, jsonl.Items[1].Line);
        var array = ChatDataset.Load(Write("c.json", "[", Good + ",", Good, "]"));
        Assert.Equal([2, 3], array.Items.Select(i => i.Line));
        Assert.Equal(DataShape.Chat, DataFile.DetectShape(Path.Combine(_dir, "c.json")));
    }

    [Theory]
    [InlineData("""{"text": "no messages"}""", "missing field 'messages'")]
    [InlineData("""{"messages": "hi"}""", "field 'messages' must be a list of messages")]
    [InlineData("""{"messages": []}""", "field 'messages' is an empty list")]
    [InlineData("""{"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}""", "messages[0]: unknown role 'human'")]
    [InlineData("""{"messages": [{"role": "user"}, {"role": "assistant", "content": "Hello"}]}""", "messages[0]: missing field 'content'")]
    [InlineData("""{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "Hello"}]}""", "messages[0]: field 'content' must be a string")]
    [InlineData("""{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}""", "messages[1]: field 'content' is empty")]
    [InlineData("""{"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello"}]}""", "messages[1]: expected an assistant turn, got user")]
    [InlineData("""{"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "x"}]}""", "a system message may only come first")]
    [InlineData("""{"messages": [{"role": "user", "content": "Hi"}]}""", "no assistant turn")]
    [InlineData("""{"messages": [{"role": "assistant", "content": "Hi"}]}""", "messages[0]: expected a user turn")]
    [InlineData("""[1, 2]""", "expected an object")]
    [InlineData("""{"messages": [""", "invalid JSON")]
    public void Bad_chat_records_give_file_and_line(string record, string expected)
    {
        var path = Write("bad.jsonl", Good, record, Good);
        var error = Assert.Throws<InvalidDataException>(() => ChatDataset.Load(path));
        Assert.StartsWith($"{path}:2: ", error.Message);
        Assert.Contains(expected, error.Message);
        var skipped = ChatDataset.Load(path, BadRecordPolicy.Skip);
        Assert.Equal(2, skipped.Items.Count);
        Assert.Equal([1, 3], skipped.Items.Select(i => i.Line));
        Assert.Single(skipped.Problems);
        Assert.Equal(error.Message, skipped.Problems[0]);
    }

    [Fact]
    public void Preference_pairs_in_three_shapes()
    {
        var path = Write("p.jsonl",
            """{"prompt": "2+2?", "chosen": "4", "rejected": "5"}""",
            """{"prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}""",
            """{"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "22"}]}""");
        Assert.Equal(DataShape.Preference, DataFile.DetectShape(path));
        var pairs = PreferenceDataset.Load(path).Items;
        Assert.Equal(3, pairs.Count);
        Assert.Equal([ChatMessage.User("2+2?")], pairs[0].Prompt);
        Assert.Equal(("4", "5"), (pairs[0].Chosen, pairs[0].Rejected));
        Assert.Equal([ChatMessage.System("Be exact."), ChatMessage.User("2+2?")], pairs[1].Prompt);
        Assert.Equal([ChatMessage.User("2+2?")], pairs[2].Prompt);
        Assert.Equal(("4", "22"), (pairs[2].Chosen, pairs[2].Rejected));
    }

    [Theory]
    [InlineData("""{"prompt": "Q", "rejected": "b"}""", "missing field 'chosen'")]
    [InlineData("""{"prompt": "Q", "chosen": "a"}""", "missing field 'rejected'")]
    [InlineData("""{"prompt": "Q", "chosen": "a", "rejected": " "}""", "field 'rejected' is empty")]
    [InlineData("""{"prompt": "", "chosen": "a", "rejected": "b"}""", "field 'prompt' is empty")]
    [InlineData("""{"prompt": 3, "chosen": "a", "rejected": "b"}""", "field 'prompt' must be a string or a list of messages")]
    [InlineData("""{"prompt": "Q", "chosen": 1, "rejected": "b"}""", "field 'chosen' must be a string or a list of messages")]
    [InlineData("""{"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "chosen": "a", "rejected": "b"}""", "field 'prompt' must end with a user turn")]
    [InlineData("""{"prompt": "Q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}""", "the reply must be an assistant message")]
    [InlineData("""{"prompt": "Q", "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}], "rejected": "b"}""", "exactly one assistant message")]
    [InlineData("""{"chosen": "a", "rejected": "b"}""", "missing field 'prompt'")]
    [InlineData("""{"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "R"}, {"role": "assistant", "content": "b"}]}""", "must share every message but the last")]
    public void Bad_preference_records_give_file_and_line(string record, string expected)
    {
        var path = Write("bad.jsonl", """{"prompt": "Q", "chosen": "a", "rejected": "b"}""", record);
        var error = Assert.Throws<InvalidDataException>(() => PreferenceDataset.Load(path));
        Assert.StartsWith($"{path}:2: ", error.Message);
        Assert.Contains(expected, error.Message);
        var skipped = PreferenceDataset.Load(path, BadRecordPolicy.Skip);
        Assert.Single(skipped.Items);
        Assert.Equal([error.Message], skipped.Problems);
    }

    [Fact]
    public void Records_the_template_cannot_hold_are_bad_records_too()
    {
        var path = Write("sys.jsonl", Good, """{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}""");
        var records = ChatDataset.Load(path).Items;
        var alpaca = ChatTemplate.BuiltIn("alpaca");
        var error = Assert.Throws<InvalidDataException>(() => ChatTokenizer.Tokenize(records, alpaca, new ByteTokenizer()));
        Assert.StartsWith($"{path}:1: ", error.Message);
        var problems = new List<string>();
        var data = ChatTokenizer.Tokenize(records, alpaca, new ByteTokenizer(), policy: BadRecordPolicy.Skip, problems: problems);
        Assert.Single(data.Examples);
        Assert.Equal([error.Message], problems);
    }

    [Fact]
    public void Preference_pairs_tokenise_to_chosen_and_rejected_with_reply_labels()
    {
        var path = Write("p.jsonl", """{"prompt": "2+2?", "chosen": "4", "rejected": "five"}""");
        var tokenizer = new ByteTokenizer();
        var pairs = ChatTokenizer.TokenizePairs(PreferenceDataset.Load(path).Items, ChatTemplate.BuiltIn("zephyr"), tokenizer, cutoffLength: 256);
        var pair = Assert.Single(pairs.Pairs);
        Assert.Equal("<|user|>\n2+2?</s>\n<|assistant|>\n4</s>\n", tokenizer.Decode(pair.InputIds));
        Assert.Equal("4</s>", tokenizer.Decode(pair.Labels.Where(l => l >= 0).ToArray()));
        Assert.Equal("five</s>", tokenizer.Decode(pair.Rejected!.Labels.Where(l => l >= 0).ToArray()));
        // The prompt is the same tokens in both.
        int promptLength = Array.FindIndex(pair.Labels, l => l >= 0);
        Assert.Equal(pair.InputIds[..promptLength], pair.Rejected.InputIds[..promptLength]);

        // A cutoff inside the prompt leaves no reply: the pair is dropped and said so.
        var cut = ChatTokenizer.TokenizePairs(PreferenceDataset.Load(path).Items, ChatTemplate.BuiltIn("zephyr"), tokenizer, cutoffLength: 10);
        Assert.Empty(cut.Pairs);
        Assert.Equal(1, cut.DroppedPairs);
        Assert.StartsWith($"{path}:1: dropped", Assert.Single(cut.Problems));
    }

    [Fact]
    public void Held_out_split_is_seeded_disjoint_and_complete()
    {
        var items = Enumerable.Range(0, 50).ToArray();
        var (train, eval) = HeldOut.Split(items, 0.2, seed: 7);
        var (train2, eval2) = HeldOut.Split(items, 0.2, seed: 7);
        Assert.Equal(train, train2);
        Assert.Equal(eval, eval2);
        Assert.Equal(10, eval.Count);
        Assert.Empty(train.Intersect(eval));
        Assert.Equal(items, train.Concat(eval).Order());
        // Both parts keep the file's order, and another seed holds out other records.
        Assert.Equal(train.Order(), train);
        Assert.NotEqual(eval, HeldOut.Split(items, 0.2, seed: 8).Eval);
        Assert.Single(HeldOut.Split(items[..3], 0.1, 1).Eval);
        Assert.Throws<ArgumentException>(() => HeldOut.Split(items[..1], 0.5, 1));
    }
}

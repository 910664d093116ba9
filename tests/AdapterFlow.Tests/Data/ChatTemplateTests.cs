using AdapterFlow.Data;
using AdapterFlow.IO;
using AdapterFlow.Tests.Generation;
using AdapterFlow.Training;

namespace AdapterFlow.Tests.Data;

/// <summary>
/// Each built-in chat template renders a known conversation to the string the format's published definition
/// (the model's tokenizer_config.json chat_template, rendered by transformers' Jinja) gives, and SFT learns only
/// the assistant turns.
/// </summary>
public sealed class ChatTemplateTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("af-chat-template-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static readonly ChatMessage[] WithSystem =
    [
        ChatMessage.System("You are terse."),
        ChatMessage.User("Hi there"),
        ChatMessage.Assistant("Hello!"),
        ChatMessage.User("What is 2+2?"),
        ChatMessage.Assistant("4"),
    ];

    private static readonly ChatMessage[] WithoutSystem = WithSystem[1..];

    private static readonly ChatTokens Sentencepiece = new("<s>", "</s>");
    private static readonly ChatTokens Llama3Tokens = new("<|begin_of_text|>", "<|eot_id|>");

    private static string Render(string name, IReadOnlyList<ChatMessage> messages, ChatTokens tokens, bool generation = false) =>
        ChatTemplate.BuiltIn(name).Render(messages, tokens, generation).Text;

    [Fact]
    public void Llama2_folds_the_system_message_into_the_first_instruction()
    {
        Assert.Equal("<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello! </s><s>[INST] What is 2+2? [/INST] 4 </s>",
            Render("llama2", WithSystem, Sentencepiece));
        Assert.Equal("<s>[INST] Hi there [/INST] Hello! </s><s>[INST] What is 2+2? [/INST] 4 </s>", Render("llama2", WithoutSystem, Sentencepiece));
        // content.strip(), and no generation prompt after [/INST].
        Assert.Equal("<s>[INST] Hi there [/INST]", Render("llama2", [ChatMessage.User("  Hi there \n")], Sentencepiece, generation: true));
    }

    [Fact]
    public void Llama3_uses_header_tokens_and_eot()
    {
        Assert.Equal(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>" +
            "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>" +
            "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
            Render("llama3", WithSystem, Llama3Tokens));
        Assert.Equal(
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            Render("llama3", [ChatMessage.User(" Hi there ")], Llama3Tokens, generation: true));
    }

    [Fact]
    public void Chatml_and_qwen2_default_system()
    {
        const string body = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n" +
                            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n";
        var tokens = new ChatTokens("", "<|im_end|>");
        Assert.Equal("<|im_start|>system\nYou are terse.<|im_end|>\n" + body, Render("chatml", WithSystem, tokens));
        Assert.Equal(body, Render("chatml", WithoutSystem, tokens));
        Assert.Equal("<|im_start|>system\nYou are terse.<|im_end|>\n" + body, Render("qwen2", WithSystem, tokens));
        Assert.Equal("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + body, Render("qwen2", WithoutSystem, tokens));
        Assert.Equal("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
            Render("qwen2", [ChatMessage.User("Hi there")], tokens, generation: true));
    }

    [Fact]
    public void Mistral_instruct()
    {
        Assert.Equal("<s>[INST] Hi there [/INST]Hello!</s>[INST] What is 2+2? [/INST]4</s>", Render("mistral", WithoutSystem, Sentencepiece));
        Assert.Equal("<s>[INST] Hi there [/INST]", Render("mistral", [ChatMessage.User("Hi there")], Sentencepiece, generation: true));
        // The format has no system turn: ours goes before the first instruction.
        Assert.Equal("<s>[INST] You are terse.\n\nHi there [/INST]Hello!</s>[INST] What is 2+2? [/INST]4</s>", Render("mistral", WithSystem, Sentencepiece));
    }

    [Fact]
    public void Zephyr_as_tinyllama_chat()
    {
        Assert.Equal("<|system|>\nYou are terse.</s>\n<|user|>\nHi there</s>\n<|assistant|>\nHello!</s>\n<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n4</s>\n",
            Render("zephyr", WithSystem, Sentencepiece));
        Assert.Equal("<|user|>\nHi there</s>\n<|assistant|>\n", Render("zephyr", [ChatMessage.User("Hi there")], Sentencepiece, generation: true));
    }

    [Fact]
    public void Alpaca_template_is_the_llm_adapters_prompt_and_plain_has_no_markup()
    {
        Assert.Equal("<s>" + InstructionPrompt.Format("Add 2 and 3.", "", "5") + "</s>",
            Render("alpaca", [ChatMessage.User("Add 2 and 3."), ChatMessage.Assistant("5")], Sentencepiece));
        Assert.Equal("You are terse.\n\nHi there\nHello!</s>\nWhat is 2+2?\n4</s>\n", Render("plain", WithSystem, Sentencepiece));
        var error = Assert.Throws<ArgumentException>(() => Render("alpaca", WithSystem, Sentencepiece));
        Assert.Contains("no place for a system message", error.Message);
    }

    [Fact]
    public void Trained_spans_are_the_assistant_replies_with_their_end_marker()
    {
        foreach (var name in ChatTemplate.BuiltInNames)
        {
            var chat = ChatTemplate.BuiltIn(name).Render(WithoutSystem, Sentencepiece);
            var spans = chat.TrainedSpans.Select(s => chat.Text[s.Start..s.End]).ToArray();
            var end = ChatTemplate.BuiltIn(name).AssistantEnd.Replace("{eos}", "</s>");
            Assert.Equal(new[] { "Hello!" + end, "4" + end }, spans);
        }
    }

    [Fact]
    public void Sft_masks_everything_but_the_assistant_turns()
    {
        var tokenizer = new ByteTokenizer();
        foreach (var name in new[] { "llama2", "llama3", "chatml", "mistral", "zephyr", "plain" })
        {
            var template = ChatTemplate.BuiltIn(name);
            var chat = template.Render(WithSystem, ChatTokens.From(tokenizer));
            var example = ChatTokenizer.Tokenize(chat, tokenizer, new SftOptions { CutoffLength = 4096 }, out int cut);
            Assert.Equal(0, cut);
            Assert.Equal(tokenizer.Encode(chat.Text), example.InputIds);
            // The learned tokens, in order, are exactly the two replies with their end markers.
            var learned = tokenizer.Decode(example.Labels.Where(l => l != Example.IgnoreIndex).ToArray());
            var end = template.AssistantEnd.Replace("{eos}", "</s>");
            Assert.Equal("Hello!" + end + "4" + end, learned);
            // And they sit where the replies are: the label run before "4" is masked back to the prompt.
            int firstLearned = Array.FindIndex(example.Labels, l => l != Example.IgnoreIndex);
            Assert.Equal("Hello!", tokenizer.Decode(example.InputIds[firstLearned..(firstLearned + 6)]));

            var all = ChatTokenizer.Tokenize(chat, tokenizer, new SftOptions { CutoffLength = 4096, TrainOnInputs = true }, out _);
            Assert.Equal(all.InputIds, all.Labels);
        }
    }

    [Fact]
    public void Instruction_records_through_a_chat_template_are_one_user_turn()
    {
        var tokenizer = new ByteTokenizer();
        var records = new[]
        {
            new InstructionExample("Add the numbers.", "2, 3", "5", "data.json", 1),
            new InstructionExample("Add 1 and 1.", "", "2", "data.json", 2),
        };
        var data = ChatTokenizer.Tokenize(records, ChatTemplate.BuiltIn("llama2"), tokenizer);
        Assert.Equal("<s>[INST] Add the numbers.\n\n2, 3 [/INST] 5 </s>", tokenizer.Decode(data.Examples[0].InputIds));
        Assert.Equal("<s>[INST] Add 1 and 1. [/INST] 2 </s>", tokenizer.Decode(data.Examples[1].InputIds));
        Assert.Equal("5 </s>", tokenizer.Decode(data.Examples[0].Labels.Where(l => l >= 0).ToArray()));
    }

    [Fact]
    public void Cutoff_truncates_and_counts()
    {
        var tokenizer = new ByteTokenizer();
        var chat = ChatTemplate.BuiltIn("chatml").Render(WithoutSystem, ChatTokens.From(tokenizer));
        var example = ChatTokenizer.Tokenize(chat, tokenizer, new SftOptions { CutoffLength = 40 }, out int cut);
        Assert.Equal(40, example.Length);
        Assert.Equal(tokenizer.Encode(chat.Text).Count - 40, cut);
    }

    [Fact]
    public void Template_file_in_yaml_renders_like_the_built_in()
    {
        var path = Path.Combine(_dir, "chatml.yaml");
        File.WriteAllText(path, """
            # ChatML written as a template file
            name: my-chatml
            system: "<|im_start|>system\n{content}<|im_end|>\n"
            user: "<|im_start|>user\n{content}<|im_end|>\n"
            assistant_start: "<|im_start|>assistant\n"
            assistant_end: "<|im_end|>"
            assistant_after: "\n"
            """);
        var template = ChatTemplate.Resolve(path);
        Assert.Equal("my-chatml", template.Name);
        var tokens = new ChatTokens("", "<|im_end|>");
        Assert.Equal(ChatTemplate.BuiltIn("chatml").Render(WithSystem, tokens), template.Render(WithSystem, tokens), new RenderedChatComparer());

        var json = Path.Combine(_dir, "t.json");
        File.WriteAllText(json, """{"user": "Q: {content}\n", "assistant_start": "A: ", "assistant_end": "{eos}", "assistant_after": "\n", "strip_content": true}""");
        Assert.Equal("Q: hi\nA: yo</s>\n", ChatTemplate.Load(json).Render([ChatMessage.User(" hi "), ChatMessage.Assistant("yo ")], Sentencepiece).Text);
        // A literal brace that is no placeholder stays.
        File.WriteAllText(json, """{"user": "{\"q\": {content}}\n"}""");
        Assert.Equal("{\"q\": {x}}\n", ChatTemplate.Load(json).Render([ChatMessage.User("{x}")], Sentencepiece).Text);
    }

    [Theory]
    [InlineData("""{"system": "{content}"}""", "missing key 'user'")]
    [InlineData("""{"user": "{content}", "colour": "red"}""", "unknown key 'colour'")]
    [InlineData("""{"user": "hello"}""", "key 'user' must contain {content}")]
    [InlineData("""{"user": "{content}", "assistant_start": "{content}"}""", "key 'assistant_start' uses {content}")]
    [InlineData("""{"user": "{content}", "strip_content": "maybe"}""", "strip_content")]
    [InlineData("""{"user": [1, 2]}""", "key 'user' must be a string")]
    public void Bad_template_files_name_the_file_and_key(string text, string expected)
    {
        var path = Path.Combine(_dir, "bad.json");
        File.WriteAllText(path, text);
        var error = Assert.Throws<InvalidDataException>(() => ChatTemplate.Load(path));
        Assert.StartsWith(path, error.Message);
        Assert.Contains(expected, error.Message);
        Assert.Contains("neither a built-in", Assert.Throws<ArgumentException>(() => ChatTemplate.Resolve("no-such-template")).Message);
    }

    [Fact]
    public void Hugging_face_jinja_templates_map_to_the_built_ins()
    {
        Assert.Equal("llama3", ChatTemplate.Detect("{{ bos_token }}{% for m in messages %}<|start_header_id|>...")?.Name);
        Assert.Equal("chatml", ChatTemplate.Detect("{% for m in messages %}{{'<|im_start|>' + m['role']}}")?.Name);
        Assert.Equal("qwen2", ChatTemplate.Detect("{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}<|im_start|>")?.Name);
        Assert.Equal("llama2", ChatTemplate.Detect("{% set content = '<<SYS>>\\n' + system_message %}[INST]")?.Name);
        Assert.Equal("mistral", ChatTemplate.Detect("{{ bos_token }}{{ '[INST] ' + message['content'] + ' [/INST]' }}")?.Name);
        Assert.Null(ChatTemplate.Detect(null));
        Assert.Null(ChatTemplate.Detect("{{ messages }}"));
    }

    [SkippableFact]
    public void Shared_tokenizer_configs_are_recognised_and_masks_hold_with_a_real_tokenizer()
    {
        var dir = SharedFiles.Require("tokenizers", "tinyllama-1.1b-chat-v1.0");
        var tokenizer = HFTokenizer.FromDirectory(dir);
        var template = ChatTemplate.Detect(tokenizer.ChatTemplate);
        Assert.Equal("zephyr", template?.Name);
        // Phi-3's format (<|end|> ends each turn, EOS only at the end) is not one of ours: no wrong guess.
        var phi3 = HFTokenizer.FromDirectory(SharedFiles.Require("tokenizers", "phi-3-mini-4k-instruct"));
        Assert.Null(ChatTemplate.Detect(phi3.ChatTemplate));

        var chat = template!.Render(WithSystem, ChatTokens.From(tokenizer));
        Assert.Equal("<|system|>\nYou are terse.</s>\n<|user|>\nHi there</s>\n<|assistant|>\nHello!</s>\n<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n4</s>\n", chat.Text);
        var example = ChatTokenizer.Tokenize(chat, tokenizer, new SftOptions { CutoffLength = 512 }, out _);
        var learned = example.Labels.Where(l => l != Example.IgnoreIndex).ToArray();
        // "</s>" in the text is the EOS token itself, learned after each reply.
        Assert.Equal(2, learned.Count(id => id == tokenizer.EosTokenId));
        Assert.Equal("Hello!</s>4</s>", tokenizer.Decode(learned).Replace(" ", ""));
        Assert.Equal(tokenizer.EosTokenId, example.InputIds.First(id => id == tokenizer.EosTokenId));
    }

    private sealed class RenderedChatComparer : IEqualityComparer<RenderedChat>
    {
        public bool Equals(RenderedChat? x, RenderedChat? y) => x!.Text == y!.Text && x.TrainedSpans.SequenceEqual(y.TrainedSpans);
        public int GetHashCode(RenderedChat obj) => obj.Text.GetHashCode();
    }
}

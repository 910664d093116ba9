using System.Text;
using YamlDotNet.Core;
using YamlDotNet.Serialization;

namespace AdapterFlow.Data;

/// <summary>The special-token texts a template's <c>{bos}</c> and <c>{eos}</c> stand for.</summary>
public sealed record ChatTokens(string Bos, string Eos)
{
    /// <summary>The tokenizer's BOS/EOS as text (<see cref="IO.HFTokenizer"/>'s names, else the decoded ids; "" when it has none).</summary>
    public static ChatTokens From(IO.ITokenizer tokenizer)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        if (tokenizer is IO.HFTokenizer hf) return new ChatTokens(hf.BosToken ?? "", hf.EosToken ?? "");
        string Text(int? id) => id is int i ? tokenizer.Decode([i]) : "";
        return new ChatTokens(Text(tokenizer.BosTokenId), Text(tokenizer.EosTokenId));
    }
}

/// <summary>
/// A rendered conversation: the text and the character spans the model learns (each assistant reply with its end
/// marker). Everything outside the spans is prompt.
/// </summary>
public sealed record RenderedChat(string Text, IReadOnlyList<(int Start, int End)> TrainedSpans);

/// <summary>
/// A chat format as data: how each turn is written around its content. Templates are chosen by name
/// (<see cref="BuiltIn"/>: llama2, llama3, chatml, qwen2, mistral, zephyr, alpaca, plain) or read from a
/// JSON/YAML file (<see cref="Load"/>) with the snake_case keys of these properties. In the texts,
/// <c>{content}</c> is the message, <c>{system}</c> the system message (in <see cref="FirstUserWithSystem"/>),
/// <c>{bos}</c>/<c>{eos}</c> the tokenizer's BOS/EOS tokens; other braces are literal.
/// A conversation renders as <see cref="Begin"/>, then each turn:
/// system → <see cref="System"/>; user → <see cref="User"/> (the first one as <see cref="FirstUserWithSystem"/>
/// when there is a system message and <see cref="System"/> is null, as Llama-2 folds it into the first
/// instruction); assistant → <see cref="AssistantStart"/> + content + <see cref="AssistantEnd"/> +
/// <see cref="AssistantAfter"/>, of which content + AssistantEnd is what SFT learns.
/// The generation prompt is <see cref="GenerationPrompt"/>, by default <see cref="AssistantStart"/>.
/// </summary>
/// <remarks>
/// Hugging Face ships chat formats as Jinja programs (tokenizer_config.json "chat_template"). Rather than an
/// interpreter for a Jinja subset, which real templates quickly outgrow (namespaces, filters, raise_exception),
/// the LLaMA-family formats are described here as data and checked against their published definitions in the
/// tests; <see cref="Detect"/> maps a model's Jinja template to the matching built-in.
/// </remarks>
public sealed record ChatTemplate
{
    public required string Name { get; init; }

    /// <summary>Text before the first turn (e.g. "{bos}").</summary>
    public string Begin { get; init; } = "";

    /// <summary>A system turn; null: the format has no system turn of its own (see <see cref="FirstUserWithSystem"/>).</summary>
    public string? System { get; init; }

    /// <summary>A user turn.</summary>
    public required string User { get; init; }

    /// <summary>The first user turn when a system message is folded into it ({system} and {content}); null with no <see cref="System"/>: system messages are refused.</summary>
    public string? FirstUserWithSystem { get; init; }

    /// <summary>Before an assistant reply (not learned); also the generation prompt.</summary>
    public string AssistantStart { get; init; } = "";

    /// <summary>After an assistant reply's content, learned with it (the end-of-turn marker).</summary>
    public string AssistantEnd { get; init; } = "";

    /// <summary>What add_generation_prompt appends (null: <see cref="AssistantStart"/>). Llama-2 has none: its prompt ends at "[/INST]".</summary>
    public string? GenerationPrompt { get; init; }

    /// <summary>After <see cref="AssistantEnd"/>, not learned (a separator such as a newline).</summary>
    public string AssistantAfter { get; init; } = "";

    /// <summary>System message used when a conversation has none (Qwen2's "You are a helpful assistant.").</summary>
    public string? DefaultSystem { get; init; }

    /// <summary>Trim whitespace around each message's content (Llama-2's content.strip(), Llama-3's |trim).</summary>
    public bool StripContent { get; init; }

    /// <summary>The names of the built-in templates.</summary>
    public static IReadOnlyList<string> BuiltInNames => BuiltIns.Keys.ToArray();

    // ChatML (SmolLM2, Qwen2 without its default system message). Declared before BuiltIns, which uses it.
    private static readonly ChatTemplate ChatMl = new()
    {
        Name = "chatml",
        System = "<|im_start|>system\n{content}<|im_end|>\n",
        User = "<|im_start|>user\n{content}<|im_end|>\n",
        AssistantStart = "<|im_start|>assistant\n",
        AssistantEnd = "<|im_end|>",
        AssistantAfter = "\n",
    };

    // Written from the formats' published definitions (the models' tokenizer_config.json chat_template).
    private static readonly Dictionary<string, ChatTemplate> BuiltIns = new(StringComparer.OrdinalIgnoreCase)
    {
        // meta-llama/Llama-2-*-chat-hf: <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {reply} </s>
        ["llama2"] = new()
        {
            Name = "llama2",
            User = "{bos}[INST] {content} [/INST]",
            FirstUserWithSystem = "{bos}[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{content} [/INST]",
            AssistantStart = " ",
            AssistantEnd = " {eos}",
            GenerationPrompt = "",
            StripContent = true,
        },
        // meta-llama/Meta-Llama-3-*-Instruct: header tokens, <|eot_id|> ends every turn, BOS once.
        ["llama3"] = new()
        {
            Name = "llama3",
            Begin = "{bos}",
            System = "<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            User = "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
            AssistantStart = "<|start_header_id|>assistant<|end_header_id|>\n\n",
            AssistantEnd = "<|eot_id|>",
            StripContent = true,
        },
        ["chatml"] = ChatMl,
        // Qwen2-Instruct: ChatML with a default system message.
        ["qwen2"] = ChatMl with { Name = "qwen2", DefaultSystem = "You are a helpful assistant." },
        // mistralai/Mistral-7B-Instruct-v0.1/v0.2: <s>[INST] {user} [/INST]{reply}</s>. The format has no system
        // turn; a system message is put before the first instruction, separated by a blank line.
        ["mistral"] = new()
        {
            Name = "mistral",
            Begin = "{bos}",
            User = "[INST] {content} [/INST]",
            FirstUserWithSystem = "[INST] {system}\n\n{content} [/INST]",
            AssistantEnd = "{eos}",
        },
        // HuggingFaceH4/zephyr-7b-beta and TinyLlama-1.1B-Chat: <|user|>\n{user}</s>\n<|assistant|>\n{reply}</s>\n
        ["zephyr"] = new()
        {
            Name = "zephyr",
            System = "<|system|>\n{content}{eos}\n",
            User = "<|user|>\n{content}{eos}\n",
            AssistantStart = "<|assistant|>\n",
            AssistantEnd = "{eos}",
            AssistantAfter = "\n",
        },
        // LLM-Adapters' finetune.py prompt without input (Data/InstructionPrompt), BOS first, EOS after the reply.
        ["alpaca"] = new()
        {
            Name = "alpaca",
            Begin = "{bos}",
            User = InstructionPrompt.HeaderWithoutInput + "\n\n" + AlpacaIndent + "### Instruction:\n" + AlpacaIndent + "{content}\n" +
                   AlpacaIndent + "\n" + AlpacaIndent + "### Response:\n" + AlpacaIndent,
            AssistantEnd = "{eos}",
        },
        // No markup: a system message, then each turn on its own line; replies end with EOS.
        ["plain"] = new()
        {
            Name = "plain",
            System = "{content}\n\n",
            User = "{content}\n",
            AssistantEnd = "{eos}",
            AssistantAfter = "\n",
        },
    };

    private const string AlpacaIndent = "                ";

    /// <summary>A built-in template by name (case-insensitive).</summary>
    public static ChatTemplate BuiltIn(string name) =>
        BuiltIns.TryGetValue(name, out var template)
            ? template
            : throw new ArgumentException($"unknown chat template '{name}' (built-in: {string.Join(", ", BuiltInNames)}; or give a template file)");

    /// <summary>A built-in name, or else a template file (.json/.yaml/.yml).</summary>
    public static ChatTemplate Resolve(string nameOrPath) =>
        BuiltIns.ContainsKey(nameOrPath) ? BuiltIn(nameOrPath)
        : File.Exists(nameOrPath) ? Load(nameOrPath)
        : throw new ArgumentException($"'{nameOrPath}' is neither a built-in chat template ({string.Join(", ", BuiltInNames)}) nor a template file");

    /// <summary>
    /// Reads a template file: a YAML or JSON mapping with the keys name, begin, system, user,
    /// first_user_with_system, assistant_start, assistant_end, assistant_after, generation_prompt, default_system, strip_content
    /// (only user is required). Unknown keys and bad values raise an error naming the file and key.
    /// </summary>
    public static ChatTemplate Load(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: chat template file not found", path);
        Dictionary<string, object?>? map;
        try
        {
            map = new DeserializerBuilder().Build().Deserialize<Dictionary<string, object?>>(File.ReadAllText(path));
        }
        catch (YamlException e)
        {
            throw new InvalidDataException($"{path}: not a YAML/JSON chat template ({e.Start.Line}:{e.Start.Column}: {(e.InnerException ?? e).Message})");
        }
        if (map is null) throw new InvalidDataException($"{path}: empty chat template");
        string? Text(string key)
        {
            if (!map.TryGetValue(key, out var value) || value is null) return null;
            return value as string ?? throw new InvalidDataException($"{path}: key '{key}' must be a string");
        }
        string[] known = ["name", "begin", "system", "user", "first_user_with_system", "assistant_start", "assistant_end", "assistant_after", "generation_prompt", "default_system", "strip_content"];
        foreach (var key in map.Keys)
            if (!known.Contains(key)) throw new InvalidDataException($"{path}: unknown key '{key}' (expected {string.Join(", ", known)})");
        var strip = Text("strip_content")?.ToLowerInvariant() switch
        {
            null or "false" or "no" => false,
            "true" or "yes" => true,
            var other => throw new InvalidDataException($"{path}: key 'strip_content' must be true or false, got '{other}'"),
        };
        var template = new ChatTemplate
        {
            Name = Text("name") ?? Path.GetFileNameWithoutExtension(path),
            Begin = Text("begin") ?? "",
            System = Text("system"),
            User = Text("user") ?? throw new InvalidDataException($"{path}: missing key 'user'"),
            FirstUserWithSystem = Text("first_user_with_system"),
            AssistantStart = Text("assistant_start") ?? "",
            AssistantEnd = Text("assistant_end") ?? "",
            AssistantAfter = Text("assistant_after") ?? "",
            GenerationPrompt = Text("generation_prompt"),
            DefaultSystem = Text("default_system"),
            StripContent = strip,
        };
        template.Validate(path);
        return template;
    }

    /// <summary>Checks that each text uses only the placeholders it may.</summary>
    public void Validate(string source)
    {
        void Check(string key, string? text, params string[] allowed)
        {
            if (text is null) return;
            foreach (var name in Placeholders(text))
                if (!allowed.Contains(name))
                    throw new InvalidDataException($"{source}: key '{key}' uses {{{name}}}, which it cannot (allowed: {string.Join(", ", allowed.Select(a => "{" + a + "}"))})");
        }
        Check("begin", Begin, "bos", "eos");
        Check("system", System, "bos", "eos", "content");
        Check("user", User, "bos", "eos", "content");
        Check("first_user_with_system", FirstUserWithSystem, "bos", "eos", "content", "system");
        Check("assistant_start", AssistantStart, "bos", "eos");
        Check("assistant_end", AssistantEnd, "bos", "eos");
        Check("assistant_after", AssistantAfter, "bos", "eos");
        Check("generation_prompt", GenerationPrompt, "bos", "eos");
        if (!User.Contains("{content}")) throw new InvalidDataException($"{source}: key 'user' must contain {{content}}");
        if (System is not null && !System.Contains("{content}")) throw new InvalidDataException($"{source}: key 'system' must contain {{content}}");
        if (FirstUserWithSystem is not null && !(FirstUserWithSystem.Contains("{content}") && FirstUserWithSystem.Contains("{system}")))
            throw new InvalidDataException($"{source}: key 'first_user_with_system' must contain {{system}} and {{content}}");
    }

    private static readonly string[] PlaceholderNames = ["bos", "eos", "content", "system"];

    private static IEnumerable<string> Placeholders(string text)
    {
        foreach (var name in PlaceholderNames)
            if (text.Contains("{" + name + "}", StringComparison.Ordinal)) yield return name;
    }

    /// <summary>
    /// Renders <paramref name="messages"/> (an optional system message, then alternating user/assistant turns);
    /// with <paramref name="addGenerationPrompt"/> the assistant's start follows. Throws
    /// <see cref="ArgumentException"/> when the template cannot hold the conversation (a system message where
    /// the format has none).
    /// </summary>
    public RenderedChat Render(IReadOnlyList<ChatMessage> messages, ChatTokens tokens, bool addGenerationPrompt = false)
    {
        ArgumentNullException.ThrowIfNull(messages);
        ArgumentNullException.ThrowIfNull(tokens);
        var text = new StringBuilder();
        var spans = new List<(int, int)>();
        string Content(string content) => StripContent ? content.Trim() : content;
        void Append(string template, string? content = null, string? system = null)
        {
            // One pass over the template: a message's own text is never scanned for placeholders.
            int i = 0;
            while (i < template.Length)
            {
                int open = template.IndexOf('{', i);
                if (open < 0) { text.Append(template, i, template.Length - i); break; }
                text.Append(template, i, open - i);
                int close = template.IndexOf('}', open + 1);
                string? value = close < 0 ? null : template[(open + 1)..close] switch
                {
                    "bos" => tokens.Bos,
                    "eos" => tokens.Eos,
                    "content" when content is not null => content,
                    "system" when system is not null => system,
                    _ => null,
                };
                if (value is null) { text.Append('{'); i = open + 1; continue; }
                text.Append(value);
                i = close + 1;
            }
        }

        Append(Begin);
        int start = 0;
        string? system = null;
        if (messages.Count > 0 && messages[0].Role == ChatRole.System) { system = Content(messages[0].Content); start = 1; }
        else if (DefaultSystem is not null) system = DefaultSystem;
        if (system is not null)
        {
            if (System is not null) Append(System, system);
            else if (FirstUserWithSystem is null) throw new ArgumentException($"chat template '{Name}' has no place for a system message");
        }
        bool firstUser = true;
        for (int i = start; i < messages.Count; i++)
        {
            var message = messages[i];
            switch (message.Role)
            {
                case ChatRole.User:
                    if (firstUser && system is not null && System is null) Append(FirstUserWithSystem!, Content(message.Content), system);
                    else Append(User, Content(message.Content));
                    firstUser = false;
                    break;
                case ChatRole.Assistant:
                    Append(AssistantStart);
                    int spanStart = text.Length;
                    text.Append(Content(message.Content));
                    Append(AssistantEnd);
                    spans.Add((spanStart, text.Length));
                    Append(AssistantAfter);
                    break;
                default:
                    throw new ArgumentException($"messages[{i}]: a system message may only come first");
            }
        }
        if (addGenerationPrompt) Append(GenerationPrompt ?? AssistantStart);
        return new RenderedChat(text.ToString(), spans);
    }

    /// <summary>
    /// The built-in template matching a Hugging Face Jinja chat template (tokenizer_config.json "chat_template"),
    /// recognised by its markers: header ids → llama3, &lt;|im_start|&gt; → chatml (qwen2 when it adds "You are
    /// a helpful assistant."), &lt;&lt;SYS&gt;&gt; → llama2, [INST] → mistral, &lt;|user|&gt; with eos_token →
    /// zephyr. Null when none matches (then a template must be named or given as a file).
    /// </summary>
    public static ChatTemplate? Detect(string? jinja)
    {
        if (string.IsNullOrEmpty(jinja)) return null;
        if (jinja.Contains("<|start_header_id|>")) return BuiltIn("llama3");
        if (jinja.Contains("<|im_start|>")) return BuiltIn(jinja.Contains("You are a helpful assistant.") ? "qwen2" : "chatml");
        if (jinja.Contains("<<SYS>>")) return BuiltIn("llama2");
        if (jinja.Contains("[INST]")) return BuiltIn("mistral");
        if (jinja.Contains("<|user|>") && jinja.Contains("eos_token") && jinja.Contains("<|assistant|>") && !jinja.Contains("<|end|>")) return BuiltIn("zephyr");
        return null;
    }
}

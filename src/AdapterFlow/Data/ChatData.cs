using System.Text.Json;

namespace AdapterFlow.Data;

/// <summary>Who says a chat message.</summary>
public enum ChatRole
{
    System,
    User,
    Assistant,
}

/// <summary>One message of a conversation.</summary>
public sealed record ChatMessage(ChatRole Role, string Content)
{
    public static ChatMessage System(string content) => new(ChatRole.System, content);
    public static ChatMessage User(string content) => new(ChatRole.User, content);
    public static ChatMessage Assistant(string content) => new(ChatRole.Assistant, content);
}

/// <summary>A conversation for SFT, with the file and 1-based line it starts on.</summary>
public sealed record ChatExample(IReadOnlyList<ChatMessage> Messages, string Source, int Line);

/// <summary>
/// A preference pair: a prompt (a conversation ending with a user turn) and two assistant replies, the preferred
/// (<see cref="Chosen"/>) and the dispreferred (<see cref="Rejected"/>).
/// </summary>
public sealed record PreferenceExample(IReadOnlyList<ChatMessage> Prompt, string Chosen, string Rejected, string Source, int Line);

/// <summary>Which kind of records a data file holds (decided by the first record that is an object).</summary>
public enum DataShape
{
    /// <summary>{instruction, input?, output} (Alpaca / LLM-Adapters).</summary>
    Instruction,

    /// <summary>{messages: [{role, content}, ...]}.</summary>
    Chat,

    /// <summary>{prompt?, chosen, rejected}.</summary>
    Preference,

    /// <summary>{text} (or a plain .txt file).</summary>
    Text,
}

/// <summary>
/// Chat data: a JSON array or JSON Lines of objects <c>{"messages": [{"role": "system"|"user"|"assistant",
/// "content": "..."}, ...]}</c> (the shape of TRL's and OpenAI's conversational data). A conversation may start
/// with one system message; then user and assistant turns alternate, starting with a user turn, and at least one
/// assistant turn must be there (SFT learns the assistant turns). Bad records are reported with file and line,
/// skipped or fatal as <see cref="BadRecordPolicy"/> says (the same mechanism as <see cref="InstructionDataset"/>).
/// </summary>
public static class ChatDataset
{
    public static LoadedRecords<ChatExample> Load(string path, BadRecordPolicy policy = BadRecordPolicy.Fail) =>
        JsonRecords.LoadObjects<ChatExample>(path, policy, (element, line) =>
        {
            if (!element.TryGetProperty("messages", out var messages) || messages.ValueKind == JsonValueKind.Null)
                return (null, "missing field 'messages'");
            var (list, error) = ChatJson.Messages(messages, "messages");
            if (error is not null) return (null, error);
            error = ChatJson.CheckConversation(list!, "messages", mustEndWithUser: false);
            if (error is null && !list!.Any(m => m.Role == ChatRole.Assistant)) error = "field 'messages' has no assistant turn to learn";
            return error is null ? (new ChatExample(list!, path, line), null) : (null, error);
        });
}

/// <summary>
/// Preference pairs for DPO, a JSON array or JSON Lines of objects in one of three shapes (TRL's):
/// <list type="bullet">
/// <item><c>{"prompt": "text", "chosen": "text", "rejected": "text"}</c> — the prompt is one user turn;</item>
/// <item><c>{"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [...]}</c> — a
/// conversational prompt (ending with a user turn) and one assistant message each (or plain strings);</item>
/// <item><c>{"chosen": [messages], "rejected": [messages]}</c> — two whole conversations that differ only in the
/// last assistant message (an implicit prompt, as Anthropic HH).</item>
/// </list>
/// Chosen and rejected replies must be non-empty; bad records are reported with file and line.
/// </summary>
public static class PreferenceDataset
{
    public static LoadedRecords<PreferenceExample> Load(string path, BadRecordPolicy policy = BadRecordPolicy.Fail) =>
        JsonRecords.LoadObjects<PreferenceExample>(path, policy, (element, line) =>
        {
            var (example, error) = Parse(element, path, line);
            return (example, error);
        });

    private static (PreferenceExample?, string?) Parse(JsonElement element, string path, int line)
    {
        bool hasPrompt = element.TryGetProperty("prompt", out var prompt) && prompt.ValueKind != JsonValueKind.Null;
        if (!element.TryGetProperty("chosen", out var chosen) || chosen.ValueKind == JsonValueKind.Null) return (null, "missing field 'chosen'");
        if (!element.TryGetProperty("rejected", out var rejected) || rejected.ValueKind == JsonValueKind.Null) return (null, "missing field 'rejected'");
        if (!hasPrompt)
        {
            // Implicit prompt: both conversations share everything but their last (assistant) message.
            if (chosen.ValueKind != JsonValueKind.Array || rejected.ValueKind != JsonValueKind.Array)
                return (null, "missing field 'prompt' (without it, 'chosen' and 'rejected' must be whole conversations)");
            var (c, ce) = ChatJson.Messages(chosen, "chosen");
            if (ce is not null) return (null, ce);
            var (r, re) = ChatJson.Messages(rejected, "rejected");
            if (re is not null) return (null, re);
            if (c!.Count < 2 || r!.Count < 2) return (null, "'chosen' and 'rejected' need a prompt and a reply");
            var shared = c.Take(c.Count - 1).ToList();
            if (!shared.SequenceEqual(r.Take(r.Count - 1)))
                return (null, "'chosen' and 'rejected' must share every message but the last (or give 'prompt')");
            string? chosenText = null, rejectedText = null;
            var error = ChatJson.CheckConversation(shared, "prompt", mustEndWithUser: true)
                ?? LastReply(c, "chosen", out chosenText) ?? LastReply(r, "rejected", out rejectedText);
            return error is null ? (new PreferenceExample(shared, chosenText!, rejectedText!, path, line), null) : (null, error);
        }
        List<ChatMessage> promptMessages;
        if (prompt.ValueKind == JsonValueKind.String)
        {
            var text = prompt.GetString()!;
            if (text.Trim().Length == 0) return (null, "field 'prompt' is empty");
            promptMessages = [ChatMessage.User(text)];
        }
        else if (prompt.ValueKind == JsonValueKind.Array)
        {
            var (list, error) = ChatJson.Messages(prompt, "prompt");
            if (error is not null) return (null, error);
            promptMessages = list!;
            error = ChatJson.CheckConversation(promptMessages, "prompt", mustEndWithUser: true);
            if (error is not null) return (null, error);
        }
        else return (null, $"field 'prompt' must be a string or a list of messages, got {prompt.ValueKind}");
        var (chosenReply, chosenError) = Reply(chosen, "chosen");
        if (chosenError is not null) return (null, chosenError);
        var (rejectedReply, rejectedError) = Reply(rejected, "rejected");
        if (rejectedError is not null) return (null, rejectedError);
        return (new PreferenceExample(promptMessages, chosenReply!, rejectedReply!, path, line), null);
    }

    /// <summary>A reply: a non-empty string, or a list holding one assistant message.</summary>
    private static (string?, string?) Reply(JsonElement value, string field)
    {
        if (value.ValueKind == JsonValueKind.String)
        {
            var text = value.GetString()!;
            return text.Trim().Length == 0 ? (null, $"field '{field}' is empty") : (text, null);
        }
        if (value.ValueKind != JsonValueKind.Array) return (null, $"field '{field}' must be a string or a list of messages, got {value.ValueKind}");
        var (list, error) = ChatJson.Messages(value, field);
        if (error is not null) return (null, error);
        if (list!.Count != 1) return (null, $"field '{field}' must hold exactly one assistant message, got {list.Count} messages");
        return LastReply(list, field, out var reply) is { } e ? (null, e) : (reply, null);
    }

    private static string? LastReply(List<ChatMessage> messages, string field, out string? reply)
    {
        reply = null;
        var last = messages[^1];
        if (last.Role != ChatRole.Assistant) return $"field '{field}': the reply must be an assistant message, got {ChatJson.RoleName(last.Role)}";
        if (last.Content.Trim().Length == 0) return $"field '{field}': the assistant reply is empty";
        reply = last.Content;
        return null;
    }
}

/// <summary>Message lists in JSON, checked with messages that say what is wrong.</summary>
internal static class ChatJson
{
    public static string RoleName(ChatRole role) => role.ToString().ToLowerInvariant();

    public static (List<ChatMessage>?, string?) Messages(JsonElement value, string field)
    {
        if (value.ValueKind != JsonValueKind.Array) return (null, $"field '{field}' must be a list of messages, got {value.ValueKind}");
        var list = new List<ChatMessage>();
        int index = 0;
        foreach (var item in value.EnumerateArray())
        {
            string where = $"{field}[{index}]";
            if (item.ValueKind != JsonValueKind.Object) return (null, $"{where} must be an object with 'role' and 'content', got {item.ValueKind}");
            var roleText = JsonRecords.String(item, "role", required: true, out var error);
            if (error is not null) return (null, $"{where}: {error}");
            ChatRole role = roleText switch
            {
                "system" => ChatRole.System,
                "user" => ChatRole.User,
                "assistant" => ChatRole.Assistant,
                _ => (ChatRole)(-1),
            };
            if (!Enum.IsDefined(role)) return (null, $"{where}: unknown role '{roleText}' (expected system, user or assistant)");
            var content = JsonRecords.String(item, "content", required: true, out error);
            if (error is not null) return (null, $"{where}: {error}");
            list.Add(new ChatMessage(role, content!));
            index++;
        }
        if (list.Count == 0) return (null, $"field '{field}' is an empty list");
        return (list, null);
    }

    /// <summary>An optional leading system message, then user and assistant turns alternating from a user turn.</summary>
    public static string? CheckConversation(IReadOnlyList<ChatMessage> messages, string field, bool mustEndWithUser)
    {
        int start = messages.Count > 0 && messages[0].Role == ChatRole.System ? 1 : 0;
        if (start == messages.Count) return $"field '{field}' has only a system message";
        for (int i = start; i < messages.Count; i++)
        {
            var expected = (i - start) % 2 == 0 ? ChatRole.User : ChatRole.Assistant;
            if (messages[i].Role != expected)
                return messages[i].Role == ChatRole.System
                    ? $"{field}[{i}]: a system message may only come first"
                    : $"{field}[{i}]: expected {(expected == ChatRole.User ? "a user" : "an assistant")} turn, got {RoleName(messages[i].Role)} (turns must alternate user/assistant)";
        }
        if (mustEndWithUser && messages[^1].Role != ChatRole.User) return $"field '{field}' must end with a user turn";
        return null;
    }
}

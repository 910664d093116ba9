using AdapterFlow.Data;
using AdapterFlow.IO;

namespace AdapterFlow.Training;

/// <summary>Tokenised preference pairs (<see cref="Example"/>s with <see cref="Example.Rejected"/> set) and what truncation did.</summary>
public sealed record TokenizedPairs(IReadOnlyList<Example> Pairs, int TruncatedPairs, int DroppedPairs, IReadOnlyList<string> Problems);

/// <summary>
/// Tokenisation of conversations and preference pairs through a <see cref="ChatTemplate"/>. The whole rendered
/// text is tokenised at once, without the tokenizer's own special tokens (the template writes BOS/EOS where the
/// format has them), as transformers' apply_chat_template(tokenize=True) does. A token is learned when the
/// text before it ends inside an assistant span: the span boundaries are found by tokenising the text up to
/// each boundary (the common prefix with the whole text's ids), so merges across a boundary cannot misalign
/// the mask.
/// </summary>
public static class ChatTokenizer
{
    /// <summary>
    /// One rendered conversation → ids and labels, cut at <see cref="SftOptions.CutoffLength"/>. Unless
    /// <see cref="SftOptions.TrainOnInputs"/>, only the tokens of <see cref="RenderedChat.TrainedSpans"/>
    /// carry labels. No EOS is appended: the template ends each reply with its own end marker.
    /// </summary>
    public static Example Tokenize(RenderedChat chat, ITokenizer tokenizer, SftOptions options, out int truncatedTokens)
    {
        ArgumentNullException.ThrowIfNull(chat);
        ArgumentNullException.ThrowIfNull(tokenizer);
        if (options.CutoffLength < 1) throw new ArgumentException($"CutoffLength must be positive, got {options.CutoffLength}");
        var full = tokenizer.Encode(chat.Text, addSpecialTokens: false);
        var labels = new int[full.Count];
        if (options.TrainOnInputs) for (int i = 0; i < full.Count; i++) labels[i] = full[i];
        else
        {
            Array.Fill(labels, Example.IgnoreIndex);
            foreach (var (start, end) in chat.TrainedSpans)
            {
                int from = TokenBoundary(chat.Text, start, full, tokenizer);
                int to = TokenBoundary(chat.Text, end, full, tokenizer);
                for (int t = from; t < to; t++) labels[t] = full[t];
            }
        }
        int keep = Math.Min(full.Count, options.CutoffLength);
        truncatedTokens = full.Count - keep;
        return new Example(full.Take(keep).ToArray(), labels[..keep]);
    }

    /// <summary>Tokens of the whole text that come entirely before character <paramref name="offset"/>.</summary>
    private static int TokenBoundary(string text, int offset, IReadOnlyList<int> full, ITokenizer tokenizer)
    {
        if (offset <= 0) return 0;
        if (offset >= text.Length) return full.Count;
        var prefix = tokenizer.Encode(text[..offset], addSpecialTokens: false);
        int n = 0;
        while (n < prefix.Count && n < full.Count && prefix[n] == full[n]) n++;
        return n;
    }

    /// <summary>
    /// Conversations for SFT. A conversation the template cannot hold (a system message where the format has
    /// none) is a bad record: "file:line: …" thrown or, under <see cref="BadRecordPolicy.Skip"/>, added to
    /// <paramref name="problems"/>.
    /// </summary>
    public static TokenizedDataset Tokenize(IEnumerable<ChatExample> examples, ChatTemplate template, ITokenizer tokenizer, SftOptions? options = null,
        BadRecordPolicy policy = BadRecordPolicy.Fail, ICollection<string>? problems = null)
    {
        options ??= new SftOptions();
        var tokens = ChatTokens.From(tokenizer);
        var result = new List<Example>();
        int truncated = 0;
        long cut = 0;
        foreach (var example in examples)
        {
            RenderedChat chat;
            try { chat = template.Render(example.Messages, tokens); }
            catch (ArgumentException e)
            {
                Report($"{example.Source}:{example.Line}: {e.Message}", policy, problems);
                continue;
            }
            result.Add(Tokenize(chat, tokenizer, options, out int lost));
            if (lost > 0) { truncated++; cut += lost; }
        }
        return new TokenizedDataset(result, truncated, cut);
    }

    /// <summary>
    /// Instruction records through a chat template: one user turn (the instruction, then the input after a
    /// blank line when there is one) and the output as the assistant's reply. The Alpaca/LLM-Adapters template
    /// goes through <see cref="SftTokenizer"/> instead, which keeps its with-input variant byte for byte.
    /// </summary>
    public static TokenizedDataset Tokenize(IEnumerable<InstructionExample> examples, ChatTemplate template, ITokenizer tokenizer, SftOptions? options = null,
        BadRecordPolicy policy = BadRecordPolicy.Fail, ICollection<string>? problems = null) =>
        Tokenize(examples.Select(AsChat), template, tokenizer, options, policy, problems);

    /// <summary>An instruction record as a two-turn conversation.</summary>
    public static ChatExample AsChat(InstructionExample example) => new(
        [ChatMessage.User(string.IsNullOrEmpty(example.Input) ? example.Instruction : example.Instruction + "\n\n" + example.Input),
         ChatMessage.Assistant(example.Output)],
        example.Source, example.Line);

    /// <summary>
    /// Preference pairs for DPO: the prompt conversation with each reply as the assistant's turn, labels on the
    /// reply only. Sequences longer than <paramref name="cutoffLength"/> are cut at the end; a pair left with
    /// no reply token on either side is dropped (counted, and listed in Problems).
    /// </summary>
    public static TokenizedPairs TokenizePairs(IEnumerable<PreferenceExample> examples, ChatTemplate template, ITokenizer tokenizer, int cutoffLength,
        BadRecordPolicy policy = BadRecordPolicy.Fail)
    {
        var tokens = ChatTokens.From(tokenizer);
        var options = new SftOptions { CutoffLength = cutoffLength };
        var pairs = new List<Example>();
        var problems = new List<string>();
        int truncated = 0, dropped = 0;
        foreach (var example in examples)
        {
            Example chosen, rejected;
            int lostChosen, lostRejected;
            try
            {
                chosen = Tokenize(template.Render([.. example.Prompt, ChatMessage.Assistant(example.Chosen)], tokens), tokenizer, options, out lostChosen);
                rejected = Tokenize(template.Render([.. example.Prompt, ChatMessage.Assistant(example.Rejected)], tokens), tokenizer, options, out lostRejected);
            }
            catch (ArgumentException e)
            {
                Report($"{example.Source}:{example.Line}: {e.Message}", policy, problems);
                continue;
            }
            if (lostChosen > 0 || lostRejected > 0) truncated++;
            if (LabelCount(chosen) == 0 || LabelCount(rejected) == 0)
            {
                dropped++;
                problems.Add($"{example.Source}:{example.Line}: dropped: the prompt fills the cutoff of {cutoffLength} tokens, no reply token is left");
                continue;
            }
            pairs.Add(chosen with { Rejected = rejected });
        }
        return new TokenizedPairs(pairs, truncated, dropped, problems);
    }

    /// <summary>Labelled tokens that are predicted (the first token never is).</summary>
    internal static int LabelCount(Example example)
    {
        int count = 0;
        for (int i = 1; i < example.Labels.Length; i++) if (example.Labels[i] != Example.IgnoreIndex) count++;
        return count;
    }

    private static void Report(string message, BadRecordPolicy policy, ICollection<string>? problems)
    {
        if (policy == BadRecordPolicy.Fail) throw new InvalidDataException(message);
        problems?.Add(message);
    }
}

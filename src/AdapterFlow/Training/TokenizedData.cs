using AdapterFlow.Data;
using AdapterFlow.IO;
using static TorchSharp.torch;

namespace AdapterFlow.Training;

/// <summary>One training sequence: token ids and per-token labels (<see cref="Example.IgnoreIndex"/> = no loss).</summary>
public sealed record Example(int[] InputIds, int[] Labels)
{
    /// <summary>Label value the loss ignores (PyTorch's cross_entropy default).</summary>
    public const int IgnoreIndex = -100;

    public int Length => InputIds.Length;

    /// <summary>
    /// DPO: the dispreferred sequence of a preference pair, this example being the preferred one (both hold the
    /// same prompt; labels mark the reply). Null for language-modelling examples.
    /// </summary>
    public Example? Rejected { get; init; }

    /// <summary>
    /// DPO: the reference model's summed log-probabilities of the chosen and rejected replies, when computed
    /// before training (<see cref="DpoObjective.PrecomputeReference"/>); null: computed on the fly.
    /// </summary>
    public (double Chosen, double Rejected)? ReferenceLogps { get; init; }
}

/// <summary>How instruction examples become token sequences.</summary>
public sealed record SftOptions
{
    /// <summary>Most tokens per sequence (LLM-Adapters' cutoff_len); longer ones are truncated.</summary>
    public int CutoffLength { get; init; } = 256;

    /// <summary>Also train on the prompt tokens (LLM-Adapters' train_on_inputs). Off by default: only the response carries loss.</summary>
    public bool TrainOnInputs { get; init; }

    /// <summary>Add the tokenizer's BOS (its post-processor's special tokens) in front.</summary>
    public bool AddSpecialTokens { get; init; } = true;

    /// <summary>Append EOS when there is room (as LLM-Adapters: only if the sequence is shorter than the cutoff).</summary>
    public bool AddEos { get; init; } = true;

    /// <summary>
    /// The text before the response, from (instruction, input); null = LLM-Adapters' training template
    /// (<see cref="InstructionPrompt.Prompt"/>). <c>(i, x) =&gt; MathPrompt.Format(i, x)</c> trains on the prompt
    /// <see cref="Evaluation.MathEvaluator"/> asks with.
    /// </summary>
    public Func<string, string?, string>? PromptFormat { get; init; }

    /// <summary>
    /// Tokenise the prompt and the response apart and join the ids, so training sees exactly the prompt ids
    /// generation later starts from (a byte-level BPE merges the prompt's trailing spaces with the response's
    /// first word when they are tokenised together, which a small model does not carry over). False (default):
    /// LLM-Adapters' tokenisation of the whole text at once.
    /// </summary>
    public bool TokenizeSeparately { get; init; }
}

/// <summary>Tokenised examples and what truncation cut.</summary>
public sealed record TokenizedDataset(IReadOnlyList<Example> Examples, int TruncatedExamples, long TruncatedTokens);

/// <summary>Tokenisation for supervised fine-tuning and pretraining.</summary>
public static class SftTokenizer
{
    /// <summary>
    /// LLM-Adapters' generate_and_tokenize_prompt: the full prompt+response is tokenised and cut at the cutoff,
    /// EOS appended if there is room; unless <see cref="SftOptions.TrainOnInputs"/>, the first
    /// len(tokenise(prompt)) labels are <see cref="Example.IgnoreIndex"/>.
    /// </summary>
    public static Example Tokenize(InstructionExample example, ITokenizer tokenizer, SftOptions options, out int truncatedTokens)
    {
        ArgumentNullException.ThrowIfNull(example);
        ArgumentNullException.ThrowIfNull(tokenizer);
        if (options.CutoffLength < 1) throw new ArgumentException($"CutoffLength must be positive, got {options.CutoffLength}");
        var prompt = options.PromptFormat is null
            ? InstructionPrompt.Prompt(example.Instruction, example.Input)
            : options.PromptFormat(example.Instruction, example.Input);
        var promptIds = tokenizer.Encode(prompt, options.AddSpecialTokens);
        IReadOnlyList<int> full = options.TokenizeSeparately
            ? [.. promptIds, .. tokenizer.Encode(example.Output, addSpecialTokens: false)]
            : tokenizer.Encode(prompt + example.Output, options.AddSpecialTokens);
        truncatedTokens = Math.Max(0, full.Count - options.CutoffLength);
        var ids = new List<int>(full.Take(options.CutoffLength));
        if (options.AddEos)
        {
            int eos = tokenizer.EosTokenId ?? throw new ArgumentException("the tokenizer has no EOS token; set AddEos = false");
            if ((ids.Count == 0 || ids[^1] != eos) && ids.Count < options.CutoffLength) ids.Add(eos);
        }
        var input = ids.ToArray();
        var labels = (int[])input.Clone();
        if (!options.TrainOnInputs)
        {
            int promptLength = Math.Min(labels.Length, promptIds.Count);
            Array.Fill(labels, Example.IgnoreIndex, 0, promptLength);
        }
        return new Example(input, labels);
    }

    /// <summary>Tokenises all examples, counting truncations.</summary>
    public static TokenizedDataset Tokenize(IEnumerable<InstructionExample> examples, ITokenizer tokenizer, SftOptions? options = null)
    {
        options ??= new SftOptions();
        var result = new List<Example>();
        int truncated = 0;
        long cut = 0;
        foreach (var example in examples)
        {
            result.Add(Tokenize(example, tokenizer, options, out int lost));
            if (lost > 0) { truncated++; cut += lost; }
        }
        return new TokenizedDataset(result, truncated, cut);
    }

    /// <summary>
    /// Pretraining packing: documents are tokenised, joined with EOS after each and cut into blocks of
    /// <paramref name="blockSize"/> tokens (labels = inputs); the incomplete last block is dropped (as
    /// transformers' run_clm group_texts) and its length reported in TruncatedTokens.
    /// </summary>
    public static TokenizedDataset Pack(IEnumerable<string> documents, ITokenizer tokenizer, int blockSize, bool addSpecialTokens = true)
    {
        if (blockSize < 2) throw new ArgumentException($"blockSize must be at least 2, got {blockSize}");
        var stream = new List<int>();
        foreach (var document in documents)
        {
            stream.AddRange(tokenizer.Encode(document, addSpecialTokens));
            if (tokenizer.EosTokenId is int eos) stream.Add(eos);
        }
        var blocks = new List<Example>();
        for (int start = 0; start + blockSize <= stream.Count; start += blockSize)
        {
            var ids = stream.GetRange(start, blockSize).ToArray();
            blocks.Add(new Example(ids, (int[])ids.Clone()));
        }
        int rest = stream.Count % blockSize;
        return new TokenizedDataset(blocks, rest > 0 ? 1 : 0, rest);
    }
}

/// <summary>A padded batch on a device.</summary>
public sealed class Batch : IDisposable
{
    public Batch(Tensor inputIds, Tensor attentionMask, Tensor labels, long labelTokens, long tokens)
    {
        InputIds = inputIds;
        AttentionMask = attentionMask;
        Labels = labels;
        LabelTokens = labelTokens;
        Tokens = tokens;
    }

    public Tensor InputIds { get; }
    public Tensor AttentionMask { get; }
    public Tensor Labels { get; }

    /// <summary>Tokens whose next token carries loss (counted on the host, so no device sync is needed).</summary>
    public long LabelTokens { get; }

    /// <summary>Real (non-pad) tokens.</summary>
    public long Tokens { get; }

    public void Dispose()
    {
        InputIds.Dispose();
        AttentionMask.Dispose();
        Labels.Dispose();
    }
}

/// <summary>Right-pads examples into a batch (transformers' DataCollatorForSeq2Seq): pad id, mask 0, label −100.</summary>
public sealed class Collator(int padTokenId, int padToMultipleOf = 1)
{
    public Batch Collate(IReadOnlyList<Example> examples, Device? device = null)
    {
        if (examples.Count == 0) throw new ArgumentException("cannot collate an empty batch");
        int longest = examples.Max(e => e.Length);
        int multiple = Math.Max(1, padToMultipleOf);
        int width = (longest + multiple - 1) / multiple * multiple;
        var ids = new long[examples.Count * width];
        var mask = new long[ids.Length];
        var labels = new long[ids.Length];
        Array.Fill(ids, padTokenId);
        Array.Fill(labels, Example.IgnoreIndex);
        long labelTokens = 0, tokens = 0;
        for (int row = 0; row < examples.Count; row++)
        {
            var e = examples[row];
            if (e.Labels.Length != e.InputIds.Length) throw new ArgumentException($"example {row}: {e.InputIds.Length} ids but {e.Labels.Length} labels");
            for (int i = 0; i < e.Length; i++)
            {
                ids[row * width + i] = e.InputIds[i];
                mask[row * width + i] = 1;
                labels[row * width + i] = e.Labels[i];
                // The first token is never predicted (the loss shifts by one).
                if (i > 0 && e.Labels[i] != Example.IgnoreIndex) labelTokens++;
            }
            tokens += e.Length;
        }
        device ??= CPU;
        long[] shape = [examples.Count, width];
        return new Batch(tensor(ids, shape).to(device), tensor(mask, shape).to(device), tensor(labels, shape).to(device), labelTokens, tokens);
    }
}

/// <summary>Orders examples into batches of indices.</summary>
public static class Batching
{
    /// <summary>A seeded shuffle cut into batches of <paramref name="batchSize"/> (the last may be smaller).</summary>
    public static List<int[]> Shuffled(int count, int batchSize, Random random)
    {
        var order = Enumerable.Range(0, count).ToArray();
        random.Shuffle(order);
        return order.Chunk(batchSize).ToList();
    }

    /// <summary>
    /// Length-grouped batches (transformers' LengthGroupedSampler): a seeded shuffle is cut into mega-batches of
    /// 50 batches, each sorted longest first, so batches hold similar lengths (less padding) yet stay random.
    /// The batch holding the longest example comes first so an out-of-memory shows at once.
    /// </summary>
    public static List<int[]> LengthGrouped(IReadOnlyList<int> lengths, int batchSize, Random random, int megaBatchFactor = 50)
    {
        if (batchSize < 1) throw new ArgumentException($"batchSize must be positive, got {batchSize}");
        var order = Enumerable.Range(0, lengths.Count).ToArray();
        random.Shuffle(order);
        var sorted = order.Chunk(batchSize * megaBatchFactor)
            .SelectMany(mega => mega.OrderByDescending(i => lengths[i]))
            .ToArray();
        var batches = sorted.Chunk(batchSize).ToList();
        if (lengths.Count == 0) return batches;
        int maxLength = lengths.Max();
        int longest = batches.FindIndex(b => b.Any(i => lengths[i] == maxLength));
        if (longest > 0) (batches[0], batches[longest]) = (batches[longest], batches[0]);
        return batches;
    }
}

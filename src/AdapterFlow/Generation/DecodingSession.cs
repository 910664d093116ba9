using System.Diagnostics;
using AdapterFlow.IO;
using AdapterFlow.Models;
using AdapterFlow.Models.Cpu;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Generation;

/// <summary>
/// The state of one generation call, shared by every decoding strategy: the left-padded prompt batch, the
/// attention mask and positions, the KV cache, a buffer holding prompt + generated ids, the logits processors
/// and token selector, and per-row bookkeeping (tokens, text, stop conditions, finish reasons, timing).
/// <para>
/// Layout: prompts are left-padded to the longest; row r of the batch is prompt r / <see cref="RowsPerPrompt"/>.
/// Positions follow transformers' generate(): cumsum(mask) − 1, with padded slots set to 1. The attention mask
/// and the id buffer are allocated once for the whole generation; each step passes views of them, so a decode
/// step allocates nothing that grows with the sequence (the cache grows in place, see <see cref="KVCache"/>).
/// </para>
/// <para>
/// Long-lived tensors here belong to no dispose scope (they are disposed with the session); strategies wrap
/// each step in its own scope and close it before yielding, because dispose scopes and no_grad are per thread
/// and a streaming consumer may resume on another thread.
/// </para>
/// </summary>
public sealed class DecodingSession : IDisposable
{
    private readonly RowState[] _rows;
    private readonly HashSet<int> _stopTokenSet;
    private readonly Tensor _sequences;   // int64 [N, L + max]: left-padded prompt, then generated ids (pad after a row finished)
    private readonly Tensor _mask;        // int64 [N, past + L + max]: 1 = real key
    private readonly Tensor _promptIds;   // int64 [N, L] (a view of _sequences)
    private readonly Tensor _promptPositions; // int64 [N, L]
    private readonly Tensor _positions;   // int64 [N, 1]: position of the most recently fed token
    private readonly Tensor _unfinished;  // bool [N]
    private readonly Tensor _offsets;     // int64 [1, max + 2]: 0, 1, 2... (positions of several columns at once)
    private readonly Stopwatch _clock = new();
    private TimeSpan _prefillTime;
    private TimeSpan _decodeTime;
    private TimeSpan _stepStart;
    private long _decodeTokens;
    private int _decodeSteps;
    private long _draftedTokens;
    private long _acceptedDraftTokens;
    private bool _disposed;

    public DecodingSession(CausalLM model, IReadOnlyList<IReadOnlyList<int>> prompts, GenerationOptions options,
        ITokenizer? tokenizer = null, int rowsPerPrompt = 1)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(prompts);
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        if (rowsPerPrompt < 1) throw new ArgumentException($"rowsPerPrompt must be at least 1, got {rowsPerPrompt}");
        if (prompts.Count == 0) throw new ArgumentException("no prompts given");
        int vocab = model.Config.VocabSize;
        for (int p = 0; p < prompts.Count; p++)
        {
            if (prompts[p] is null || prompts[p].Count == 0) throw new ArgumentException($"prompt {p} is empty");
            foreach (var id in prompts[p])
                if (id < 0 || id >= vocab)
                    throw new ArgumentException($"prompt {p} holds token id {id}, outside the model's vocabulary 0..{vocab - 1}");
        }
        if (options.ExitLayer is int exit && exit > model.NumLayers)
            throw new ArgumentException($"ExitLayer {exit} is beyond the model's {model.NumLayers} layers");
        if (options.StopStrings is { Count: > 0 } && tokenizer is null)
            throw new ArgumentException("StopStrings need a tokenizer (pass one to the TextGenerator)");

        Model = model;
        Options = options;
        Tokenizer = tokenizer;
        Device = model.Device;
        RowsPerPrompt = rowsPerPrompt;
        PromptCount = prompts.Count;
        BatchSize = prompts.Count * rowsPerPrompt;
        PromptLength = prompts.Max(p => p.Count);

        StopTokenIds = (options.StopTokenIds ?? model.Config.EosTokenIds.Concat(tokenizer?.EosTokenId is int e ? [e] : Array.Empty<int>()).ToArray())
            .Distinct().ToArray();
        foreach (var id in StopTokenIds)
            if (id < 0 || id >= vocab) throw new ArgumentException($"stop token id {id} is outside the model's vocabulary 0..{vocab - 1}");
        _stopTokenSet = StopTokenIds.ToHashSet();
        PadTokenId = options.PadTokenId ?? model.Config.PadTokenId ?? tokenizer?.PadTokenId ?? (StopTokenIds.Count > 0 ? StopTokenIds[0] : 0);
        if (PadTokenId < 0 || PadTokenId >= vocab) throw new ArgumentException($"pad token id {PadTokenId} is outside the model's vocabulary 0..{vocab - 1}");

        Cache = model.CreateCache(BatchSize);
        // A cache may arrive pre-filled (prefix tuning places virtual tokens in it): they are real keys for every row.
        PastLength = Cache.Length;

        int n = BatchSize, l = PromptLength, max = options.MaxNewTokens, width = l + max, maskWidth = PastLength + width;
        var ids = new long[n * width];
        var mask = new long[n * maskWidth];
        var positions = new long[n * l];
        var last = new long[n];
        PromptTokenCount = 0;
        for (int r = 0; r < n; r++)
        {
            var prompt = prompts[r / rowsPerPrompt];
            int pad = l - prompt.Count;
            for (int t = 0; t < width; t++) ids[r * width + t] = t >= pad && t < l ? prompt[t - pad] : PadTokenId;
            for (int t = 0; t < maskWidth; t++) mask[r * maskWidth + t] = t < PastLength || t >= PastLength + pad ? 1 : 0;
            for (int t = 0; t < l; t++) positions[r * l + t] = t < pad ? 1 : PastLength + t - pad;
            last[r] = PastLength + prompt.Count - 1;
        }
        PromptTokenCount = prompts.Sum(p => (long)p.Count) * rowsPerPrompt;
        HasPadding = prompts.Any(p => p.Count != l);

        _sequences = torch.tensor(ids, [n, width], ScalarType.Int64, Device).DetachFromDisposeScope();
        _mask = torch.tensor(mask, [n, maskWidth], ScalarType.Int64, Device).DetachFromDisposeScope();
        _promptIds = _sequences.narrow(1, 0, l).DetachFromDisposeScope();
        _promptPositions = torch.tensor(positions, [n, l], ScalarType.Int64, Device).DetachFromDisposeScope();
        _positions = torch.tensor(last, [n, 1], ScalarType.Int64, Device).DetachFromDisposeScope();
        _unfinished = torch.ones([n], ScalarType.Bool, Device).DetachFromDisposeScope();
        using (var range = torch.arange(0, max + 2, 1, ScalarType.Int64, Device))
            _offsets = range.unsqueeze(0).DetachFromDisposeScope();

        Processors = LogitsProcessorList.FromOptions(options, StopTokenIds);
        Selector = TokenSelectors.For(options);
        _rows = Enumerable.Range(0, prompts.Count).Select(_ => new RowState(tokenizer, options)).ToArray();
    }

    public CausalLM Model { get; }
    public GenerationOptions Options { get; }
    public ITokenizer? Tokenizer { get; }
    public Device Device { get; }
    public KVCache Cache { get; }

    /// <summary>Batch rows per prompt (beams); 1 otherwise.</summary>
    public int RowsPerPrompt { get; }
    public int PromptCount { get; }

    /// <summary>Rows of the model batch: prompts × rows per prompt.</summary>
    public int BatchSize { get; }

    /// <summary>Length of the longest prompt (the padded prompt width).</summary>
    public int PromptLength { get; }

    /// <summary>Keys already in the cache before the prompt (virtual tokens).</summary>
    public int PastLength { get; }

    public long PromptTokenCount { get; }
    public IReadOnlyList<int> StopTokenIds { get; }
    public int PadTokenId { get; }
    public ILogitsProcessor Processors { get; }
    public ITokenSelector Selector { get; }

    /// <summary>Steps taken so far (columns written after the prompt).</summary>
    public int GeneratedLength { get; private set; }

    public bool AllFinished => _rows.All(r => r.Finish is not null);

    /// <summary>Prompt and generated ids so far, int64 [N, L + generated] (a view).</summary>
    public Tensor InputIds => _sequences.narrow(1, 0, PromptLength + GeneratedLength);

    /// <summary>The attention mask for a forward pass over keys 0..<paramref name="keys"/> − 1 (cached + new), a view.</summary>
    public Tensor MaskView(int keys) => _mask.narrow(1, 0, keys);

    /// <summary>
    /// True when some prompt is padded. Without padding the mask is all ones and forward passes get none, which
    /// lets the model use plain causal attention (SDPA's fast path) and skip building a mask every step.
    /// </summary>
    public bool HasPadding { get; }

    /// <summary>Bool [N]: rows still generating.</summary>
    public Tensor Unfinished => _unfinished;

    public bool IsFinished(int prompt) => _rows[prompt].Finish is not null;

    public bool IsStopToken(int id) => _stopTokenSet.Contains(id);

    /// <summary>Runs the prompt through the model (filling the cache); returns float32 scores [N, vocab] for the next token.</summary>
    /// <param name="exitLayer">Run only the first this many layers (early exit); null = all.</param>
    public Tensor PrefillLogits(int? exitLayer = null)
    {
        if (GeneratedLength != 0 || Cache.Length != PastLength) throw new InvalidOperationException("the prompt was already run");
        _clock.Restart();
        var output = Model.forward(new ForwardInput
        {
            InputIds = _promptIds,
            AttentionMask = HasPadding ? MaskView(PastLength + PromptLength) : null,
            PositionIds = _promptPositions,
            Cache = Cache,
            LastPositionOnly = true,
            ExitLayer = exitLayer,
        });
        return output.Logits.select(1, -1).to_type(ScalarType.Float32);
    }

    /// <summary>Feeds the last chosen token of every row; returns float32 scores [N, vocab] for the next one.</summary>
    /// <param name="exitLayer">Run only the first this many layers (early exit); null = all.</param>
    public Tensor StepLogits(int? exitLayer = null)
    {
        if (GeneratedLength == 0) throw new InvalidOperationException("run the prompt first");
        BeginStep();
        _positions.add_(1);
        var output = Model.forward(new ForwardInput
        {
            InputIds = _sequences.narrow(1, PromptLength + GeneratedLength - 1, 1),
            AttentionMask = HasPadding ? MaskView(PastLength + PromptLength + GeneratedLength) : null,
            PositionIds = _positions,
            Cache = Cache,
            LastPositionOnly = true,
            ExitLayer = exitLayer,
        });
        return output.Logits.select(1, -1).to_type(ScalarType.Float32);
    }

    /// <summary>Marks the start of a decode step: its time counts from here until the tokens are accepted.</summary>
    public void BeginStep() => _stepStart = _clock.Elapsed;

    /// <summary>
    /// Keys every cache layer holds between decode steps: virtual tokens, prompt, and every generated token but the
    /// last, which the next step feeds. Multi-token strategies truncate the cache back to this after a step.
    /// </summary>
    public int CommittedCacheLength => PastLength + PromptLength + GeneratedLength - 1;

    /// <summary>Generated tokens a row may still add (MaxNewTokens − GeneratedLength).</summary>
    public int RemainingTokens => Options.MaxNewTokens - GeneratedLength;

    /// <summary>
    /// Writes tokens int64 [N] into tentative column <paramref name="index"/>: 0 is the column right after the last
    /// chosen token. Tentative columns (drafts) are seen by <see cref="InputIdsWithTentative"/> and
    /// <see cref="ForwardColumns"/> and are overwritten when tokens are accepted.
    /// </summary>
    public void WriteTentative(int index, Tensor tokens)
    {
        if (index < 0 || GeneratedLength + index >= Options.MaxNewTokens)
            throw new ArgumentOutOfRangeException(nameof(index), $"tentative column {index} is beyond MaxNewTokens");
        _sequences.narrow(1, PromptLength + GeneratedLength + index, 1).copy_(tokens.view(-1, 1));
    }

    /// <summary>Prompt, chosen ids and the first <paramref name="tentative"/> tentative columns, int64 [N, L + generated + tentative] (a view).</summary>
    public Tensor InputIdsWithTentative(int tentative) => _sequences.narrow(1, 0, PromptLength + GeneratedLength + tentative);

    /// <summary>
    /// One forward pass over <paramref name="count"/> columns starting <paramref name="first"/> columns after the last
    /// chosen token (0 = that token, which no pass has fed yet; 1.. = tentative columns), at their positions, through
    /// layers <paramref name="startLayer"/> .. <paramref name="exitLayer"/> − 1 with the session's cache and mask.
    /// The cache layer <paramref name="startLayer"/> must hold exactly the keys before the first column: in
    /// self-speculative decoding the draft's layers run ahead of the verifier's, and each pass starts where its layers are.
    /// </summary>
    public ForwardOutput ForwardColumns(int first, int count, int startLayer = 0, int? exitLayer = null, Tensor? layerInput = null,
        bool outputHiddenStates = false, bool lastPositionOnly = false, bool skipHead = false)
    {
        if (GeneratedLength == 0) throw new InvalidOperationException("run the prompt first");
        int column = PromptLength + GeneratedLength - 1 + first;
        if (first < 0 || count < 1 || column + count > _sequences.shape[1])
            throw new ArgumentOutOfRangeException(nameof(count), $"columns {first}..{first + count - 1} after the last chosen token are outside the buffer");
        int past = Cache.LayerLength(startLayer);
        if (past != PastLength + column)
            throw new InvalidOperationException($"cache layer {startLayer} holds {past} keys; a pass from column {column} needs {PastLength + column}");
        return Model.forward(new ForwardInput
        {
            InputIds = _sequences.narrow(1, column, count),
            AttentionMask = HasPadding ? MaskView(past + count) : null,
            // _positions holds the position of the last fed column, the one before the last chosen token.
            PositionIds = _positions + _offsets.narrow(1, 1 + first, count),
            Cache = Cache,
            StartLayer = startLayer,
            ExitLayer = exitLayer,
            LayerInput = layerInput,
            OutputHiddenStates = outputHiddenStates,
            LastPositionOnly = lastPositionOnly,
            SkipHead = skipHead,
            PackedWeights = startLayer > 0 && count > 1 ? VerificationPanels : null,
        });
    }

    /// <summary>
    /// Panel copies of the late layers' weights that passes from a start layer over several columns (self-speculative
    /// verification) hand to the CPU kernels; set by the strategy after checking them against the weights.
    /// </summary>
    internal PackedWeights? VerificationPanels { get; set; }

    /// <summary>The last chosen token of a row and its position (the column the next pass feeds first), read to the host.</summary>
    internal (long Token, long Position) LastChosen(int row)
    {
        if (GeneratedLength == 0) throw new InvalidOperationException("run the prompt first");
        using var scope = torch.NewDisposeScope();
        long token = _sequences[row, PromptLength + GeneratedLength - 1].item<long>();
        // _positions holds the position of the last fed column, the one before the last chosen token.
        return (token, _positions[row, 0].item<long>() + 1);
    }

    /// <summary>Adds to the self-speculative counters: tokens drafted and drafts the verifier agreed with.</summary>
    public void RecordDrafts(long drafted, long accepted)
    {
        _draftedTokens += drafted;
        _acceptedDraftTokens += accepted;
    }

    /// <summary>
    /// Records <paramref name="count"/> chosen tokens per row at once (multi-token strategies): <paramref name="tokens"/>
    /// is int64 [N, ≥ count] on the device and <paramref name="hostTokens"/> the same values already read to the host
    /// (row-major, <paramref name="stride"/> per row), so this adds no device sync. Finished rows must hold the pad
    /// id. Stop conditions apply token by token; a row that ends inside the block gets pad after its last token.
    /// Counts as one decode step (timed from <see cref="BeginStep"/>). Returns the accepted tokens, column by column.
    /// </summary>
    public IReadOnlyList<GeneratedToken> AcceptColumns(Tensor tokens, long[] hostTokens, int stride, int count)
    {
        if (RowsPerPrompt != 1) throw new InvalidOperationException("AcceptColumns is for one row per prompt");
        if (GeneratedLength == 0) throw new InvalidOperationException("run the prompt first");
        if (count < 1 || count > stride || GeneratedLength + count > Options.MaxNewTokens)
            throw new ArgumentOutOfRangeException(nameof(count), $"cannot accept {count} tokens with {RemainingTokens} left");
        if (hostTokens.Length < _rows.Length * stride) throw new ArgumentException("hostTokens holds fewer than N × stride values");
        var events = new List<GeneratedToken>(_rows.Length * count);
        bool finishedNow = false, repadded = false;
        for (int c = 0; c < count; c++)
        {
            for (int r = 0; r < _rows.Length; r++)
            {
                var row = _rows[r];
                if (row.Finish is not null)
                {
                    if (hostTokens[r * stride + c] != PadTokenId)
                    {
                        hostTokens[r * stride + c] = PadTokenId;
                        repadded = true;
                    }
                    continue;
                }
                int id = (int)hostTokens[r * stride + c];
                var (text, reason) = row.Add(id, _stopTokenSet.Contains(id), row.Tokens.Count + 1 >= Options.MaxNewTokens);
                events.Add(new GeneratedToken(r, id, text, reason));
                if (reason is not null) finishedNow = true;
            }
        }
        var target = _sequences.narrow(1, PromptLength + GeneratedLength, count);
        if (repadded)
        {
            // A row ended inside the block: write the corrected block (rare; a small host-to-device copy).
            var block = new long[_rows.Length * count];
            for (int r = 0; r < _rows.Length; r++) Array.Copy(hostTokens, r * stride, block, r * count, count);
            using var corrected = torch.tensor(block, [_rows.Length, count], ScalarType.Int64, Device);
            target.copy_(corrected);
        }
        else target.copy_(tokens.narrow(1, 0, count));
        GeneratedLength += count;
        _positions.add_(count);
        if (finishedNow)
        {
            var flags = _rows.Select(r => r.Finish is null).ToArray();
            using var t = torch.tensor(flags, device: Device);
            _unfinished.copy_(t);
        }
        _decodeTime += _clock.Elapsed - _stepStart;
        _decodeTokens += events.Count;
        _decodeSteps++;
        return events;
    }

    /// <summary>
    /// Records the chosen tokens int64 [N] (one row per prompt; finished rows get the pad id), reads them to the
    /// host — the step's one device sync — and applies the stop conditions. Returns the accepted tokens.
    /// </summary>
    public IReadOnlyList<GeneratedToken> Accept(Tensor next)
    {
        if (RowsPerPrompt != 1) throw new InvalidOperationException("Accept is for one row per prompt; beam search completes rows with Complete");
        if (GeneratedLength >= Options.MaxNewTokens) throw new InvalidOperationException("MaxNewTokens already reached");
        next = torch.where(_unfinished, next, torch.tensor((long)PadTokenId, device: Device));
        _sequences.narrow(1, PromptLength + GeneratedLength, 1).copy_(next.unsqueeze(1));
        var chosen = next.cpu().data<long>().ToArray();
        bool first = GeneratedLength == 0;
        GeneratedLength++;

        var events = new List<GeneratedToken>(_rows.Length);
        bool finishedNow = false;
        for (int r = 0; r < _rows.Length; r++)
        {
            var row = _rows[r];
            if (row.Finish is not null) continue;
            int id = (int)chosen[r];
            var (text, reason) = row.Add(id, _stopTokenSet.Contains(id), row.Tokens.Count + 1 >= Options.MaxNewTokens);
            events.Add(new GeneratedToken(r, id, text, reason));
            if (reason is not null) finishedNow = true;
        }
        if (finishedNow)
        {
            var flags = _rows.Select(r => r.Finish is null).ToArray();
            _unfinished.copy_(torch.tensor(flags, device: Device));
        }
        if (first) _prefillTime = _clock.Elapsed;
        else
        {
            _decodeTime += _clock.Elapsed - _stepStart;
            _decodeTokens += events.Count;
            _decodeSteps++;
        }
        return events;
    }

    /// <summary>
    /// Keeps batch rows in the given order (beam search): the cache, the id buffer and the positions follow.
    /// <paramref name="rows"/> is int64 [N]; rows must stay within their prompt's group (mask and positions are shared by a group).
    /// </summary>
    public void ReorderRows(Tensor rows)
    {
        Cache.SelectRows(rows);
        _sequences.copy_(_sequences.index_select(0, rows));
    }

    /// <summary>Writes the chosen tokens int64 [N] into the id buffer and advances one step (beam search).</summary>
    public void AppendColumn(Tensor next)
    {
        _sequences.narrow(1, PromptLength + GeneratedLength, 1).copy_(next.unsqueeze(1));
        if (GeneratedLength == 0) _prefillTime = _clock.Elapsed;
        else
        {
            _decodeTime += _clock.Elapsed - _stepStart;
            _decodeTokens += BatchSize;
            _decodeSteps++;
        }
        GeneratedLength++;
    }

    /// <summary>Ends a prompt's output with a finished hypothesis (beam search).</summary>
    public void Complete(int prompt, IReadOnlyList<int> tokens, FinishReason reason, double? score)
    {
        _rows[prompt].Complete(tokens, reason, score, Tokenizer, Options.SkipSpecialTokens);
    }

    /// <summary>The outcome so far (every row should be finished).</summary>
    public GenerationResult Result()
    {
        var stats = new GenerationStats
        {
            PromptTokens = PromptTokenCount,
            GeneratedTokens = _rows.Sum(r => (long)r.Tokens.Count),
            PrefillTime = _prefillTime,
            DecodeTime = _decodeTime,
            DecodeTokens = _decodeTokens,
            DecodeSteps = _decodeSteps,
            DraftedTokens = _draftedTokens,
            AcceptedDraftTokens = _acceptedDraftTokens,
        };
        _clock.Stop();
        return new GenerationResult(_rows.Select(r => r.ToSequence()).ToArray(), stats);
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        Cache.Dispose();
        Selector.Dispose();
        foreach (var t in new[] { _promptIds, _sequences, _mask, _promptPositions, _positions, _unfinished, _offsets }) t.Dispose();
    }

    /// <summary>Tokens, text and stop state of one prompt's output.</summary>
    private sealed class RowState
    {
        private readonly TokenizerStreamingDecoder? _detokenizer;
        private readonly StopStringMatcher? _matcher;
        private string? _completedText;
        private double? _score;

        public RowState(ITokenizer? tokenizer, GenerationOptions options)
        {
            if (tokenizer is null) return;
            _detokenizer = new TokenizerStreamingDecoder(tokenizer, options.SkipSpecialTokens);
            _matcher = new StopStringMatcher(options.StopStrings ?? []);
        }

        public List<int> Tokens { get; } = new();
        public FinishReason? Finish { get; private set; }
        public string? StopString { get; private set; }

        /// <summary>Adds a token; returns the text that can be shown now and the finish reason if the row ended.</summary>
        public (string? Text, FinishReason? Reason) Add(int id, bool isStopToken, bool isLast)
        {
            Tokens.Add(id);
            string? text = null;
            if (_detokenizer is not null)
            {
                text = _matcher!.Append(_detokenizer.Append(id), out var matched);
                if (matched is not null)
                {
                    StopString = matched;
                    Finish = FinishReason.StopString;
                    return (text, Finish);
                }
            }
            if (isStopToken) Finish = FinishReason.StopToken;
            else if (isLast) Finish = FinishReason.Length;
            if (Finish is not null && _detokenizer is not null)
            {
                // The end: release held-back text and any incomplete character, which may still complete a stop string.
                text += _matcher!.Append(_detokenizer.Flush(), out var matched);
                if (matched is not null)
                {
                    StopString = matched;
                    Finish = FinishReason.StopString;
                }
                else text += _matcher.Flush();
            }
            return (text, Finish);
        }

        public void Complete(IReadOnlyList<int> tokens, FinishReason reason, double? score, ITokenizer? tokenizer, bool skipSpecial)
        {
            Tokens.Clear();
            Tokens.AddRange(tokens);
            Finish = reason;
            _score = score;
            _completedText = tokenizer?.Decode(tokens, skipSpecial);
        }

        public GeneratedSequence ToSequence() =>
            new(Tokens.ToArray(), _completedText ?? _matcher?.Text, Finish ?? FinishReason.Length, StopString, _score);
    }
}

using System.Runtime.InteropServices;
using System.Text.Json;
using System.Text.Json.Nodes;
using AdapterFlow.Data;
using AdapterFlow.IO;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Generation;

/// <summary>
/// The tokens a self-speculative draft may propose: its head computes the logits of these tokens only (plus every
/// token of the prompt and of the text generated so far), instead of the whole vocabulary. On a bandwidth-bound model
/// the LM head is a large share of a draft's weight traffic (a 32000 × 768 head is 22% of a 109.5M LLaMA), and a few
/// thousand frequent tokens cover most of the text, as in FR-Spec (Zhao et al., 2025). The verifier still computes
/// the full model, so greedy output is unchanged; a token outside the set only costs one rejected draft.
/// <para>
/// Build one from a corpus like the text the model will write (<see cref="FromTexts"/>, or <c>adapterflow draft-vocab</c>);
/// saved as <see cref="FileName"/> in the model folder, <c>generate</c> and <c>bench-speculative</c> pick it up.
/// </para>
/// </summary>
public sealed class DraftVocabulary
{
    /// <summary>The file name looked for in a model folder.</summary>
    public const string FileName = "draft_vocab.json";

    /// <summary>Token ids, most frequent first, each once.</summary>
    public IReadOnlyList<int> TokenIds { get; }

    public int Count => TokenIds.Count;

    public DraftVocabulary(IEnumerable<int> tokenIds)
    {
        var ids = new List<int>();
        var seen = new HashSet<int>();
        foreach (int id in tokenIds)
        {
            if (id < 0) throw new ArgumentException($"draft vocabulary: token id {id} is negative");
            if (seen.Add(id)) ids.Add(id);
        }
        if (ids.Count == 0) throw new ArgumentException("draft vocabulary: no token ids");
        TokenIds = ids;
    }

    /// <summary>
    /// The <paramref name="size"/> most frequent tokens of <paramref name="texts"/> (encoded with special tokens, ties
    /// by lower id), plus the tokenizer's EOS so that a draft can end a text.
    /// </summary>
    public static DraftVocabulary FromTexts(ITokenizer tokenizer, IEnumerable<string> texts, int size)
    {
        if (size < 1) throw new ArgumentOutOfRangeException(nameof(size), $"a draft vocabulary needs at least one token, got {size}");
        var counts = new long[tokenizer.VocabSize];
        foreach (var text in texts)
            foreach (int id in tokenizer.Encode(text, addSpecialTokens: true))
                if (id >= 0 && id < counts.Length) counts[id]++;
        var ranked = Enumerable.Range(0, counts.Length).Where(i => counts[i] > 0)
            .OrderByDescending(i => counts[i]).ThenBy(i => i).Take(size);
        var always = tokenizer.EosTokenId is int eos ? new[] { eos } : [];
        var ids = ranked.Concat(always).ToArray();
        if (ids.Length == 0) throw new ArgumentException("draft vocabulary: the texts hold no tokens");
        return new DraftVocabulary(ids);
    }

    /// <summary>
    /// The texts of a data file, in any shape <c>train</c> reads: plain text (.txt, or {text} records), instruction
    /// records (instruction, input and output), chat records (every message) or preference pairs (prompt and both
    /// answers). With <see cref="BadRecordPolicy.Skip"/>, malformed records are left out and counted in <paramref name="skipped"/>.
    /// </summary>
    public static IReadOnlyList<string> CorpusTexts(string path, BadRecordPolicy policy, out int skipped)
    {
        switch (DataFile.DetectShape(path))
        {
            case DataShape.Text:
                var text = TextCorpus.Load(path, policy);
                skipped = text.Problems.Count;
                return text.Items.Select(d => d.Text).ToArray();
            case DataShape.Chat:
                var chat = ChatDataset.Load(path, policy);
                skipped = chat.Problems.Count;
                return chat.Items.SelectMany(c => c.Messages.Select(m => m.Content)).ToArray();
            case DataShape.Preference:
                var pairs = PreferenceDataset.Load(path, policy);
                skipped = pairs.Problems.Count;
                return pairs.Items.SelectMany(p => p.Prompt.Select(m => m.Content).Append(p.Chosen).Append(p.Rejected)).ToArray();
            default:
                var instructions = InstructionDataset.Load(path, policy);
                skipped = instructions.Problems.Count;
                return instructions.Items.Select(e => string.Join("\n", e.Instruction, e.Input, e.Output)).ToArray();
        }
    }

    /// <summary>Reads a file written by <see cref="Save"/>; errors name the file and the field.</summary>
    public static DraftVocabulary Load(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: draft vocabulary file not found");
        JsonNode? root;
        try { root = JsonNode.Parse(File.ReadAllText(path)); }
        catch (JsonException e) { throw new InvalidDataException($"{path}: invalid JSON ({e.Message})"); }
        if (root is not JsonObject obj || obj["token_ids"] is not JsonArray array)
            throw new InvalidDataException($"{path}: expected an object with a \"token_ids\" array");
        var ids = new List<int>(array.Count);
        for (int i = 0; i < array.Count; i++)
        {
            if (array[i] is not JsonValue value || !value.TryGetValue(out int id) || id < 0)
                throw new InvalidDataException($"{path}: token_ids[{i}] is not a non-negative integer");
            ids.Add(id);
        }
        if (ids.Count == 0) throw new InvalidDataException($"{path}: token_ids is empty");
        return new DraftVocabulary(ids);
    }

    /// <summary>Writes {"token_ids": [...]} (most frequent first), atomically.</summary>
    public void Save(string path, string? source = null)
    {
        var obj = new JsonObject { ["format"] = "adapterflow draft vocabulary", ["size"] = Count };
        if (source is not null) obj["source"] = source;
        obj["token_ids"] = new JsonArray(TokenIds.Select(id => (JsonNode?)id).ToArray());
        AtomicFile.WriteAllText(path, obj.ToJsonString());
    }

    /// <summary>The vocabulary in a model folder (<see cref="FileName"/>), or null if it has none.</summary>
    public static DraftVocabulary? FromModelFolder(string modelDir)
    {
        var path = Path.Combine(modelDir, FileName);
        return Directory.Exists(modelDir) && File.Exists(path) ? Load(path) : null;
    }
}

/// <summary>
/// A generation's draft tokens in pinned memory for the kernels' head over listed rows: the vocabulary's ids (ascending,
/// so the head's rows are read roughly in order), then each prompt or generated token not yet in it.
/// </summary>
internal sealed class DraftTokenSet
{
    private readonly int[] _ids;
    private readonly bool[] _member;

    public DraftTokenSet(DraftVocabulary vocabulary, int vocab)
    {
        _ids = GC.AllocateArray<int>(vocab, pinned: true);
        _member = new bool[vocab];
        foreach (int id in vocabulary.TokenIds.Order())
        {
            if (id >= vocab) throw new ArgumentException($"draft vocabulary: token id {id} is outside the model's vocabulary 0..{vocab - 1}");
            Add(id);
        }
    }

    /// <summary>The set for a session: the vocabulary's ids (checked against the model's <paramref name="vocab"/>), then the prompt's tokens.</summary>
    public static DraftTokenSet For(DraftVocabulary vocabulary, int vocab, DecodingSession session)
    {
        var set = new DraftTokenSet(vocabulary, vocab);
        using var scope = torch.NewDisposeScope();
        foreach (long id in session.InputIds.contiguous().cpu().data<long>().ToArray()) set.Add(id);
        return set;
    }

    public int Count { get; private set; }

    /// <summary>The ids as a pinned array (valid for the set's lifetime); the first <see cref="Count"/> are in use.</summary>
    public unsafe int* Pointer => (int*)Marshal.UnsafeAddrOfPinnedArrayElement(_ids, 0);

    public int this[int index] => _ids[index];

    /// <summary>Adds a token not yet in the set; returns whether it was new.</summary>
    public bool Add(long id)
    {
        if (id < 0 || id >= _member.Length || _member[id]) return false;
        _member[id] = true;
        _ids[Count++] = (int)id;
        return true;
    }
}

/// <summary>
/// A generation's draft head for the host rounds: the head matrix's rows of a <see cref="DraftTokenSet"/>, copied into one
/// contiguous [count, hidden] float32 block (rows appended as the text brings new tokens). Reading the rows in place
/// (a gather) streamed at about a quarter of the memory bandwidth (3 KB at a time from scattered addresses); the packed
/// block is one stream, read like any other matrix (bench suite <c>specpasses</c>). Copied per generation (~12 MB for
/// 4096 rows of 768, about a millisecond), so weights changed between generations (merges) are always seen.
/// </summary>
internal sealed unsafe class PackedDraftHead : IDisposable
{
    private readonly float* _weight;
    private readonly int _hidden;
    private float* _rows;
    private int _capacity;

    /// <summary>
    /// Packs the rows of <paramref name="tokens"/> from <paramref name="weight"/>, a float32 CPU [vocab, hidden] matrix that
    /// must outlive this head, with room for <paramref name="spareRows"/> more before the block grows.
    /// </summary>
    public PackedDraftHead(DraftTokenSet tokens, Tensor weight, int spareRows = 1024)
    {
        if (weight.dtype != ScalarType.Float32 || weight.device_type != DeviceType.CPU || !weight.is_contiguous() || weight.dim() != 2)
            throw new InvalidOperationException("a draft head over part of the vocabulary needs a plain float32 CPU LM head matrix");
        Tokens = tokens;
        _weight = Models.Cpu.CpuKernels.Pointer(weight);
        _hidden = (int)weight.shape[1];
        _capacity = Math.Max(1, tokens.Count + spareRows);
        _rows = (float*)NativeMemory.AlignedAlloc((nuint)((long)_capacity * _hidden * sizeof(float)), 64);
        for (int i = 0; i < tokens.Count; i++) CopyRow(i);
    }

    public DraftTokenSet Tokens { get; }

    /// <summary>The packed rows [<see cref="Count"/>, hidden]; row i is token <c>Tokens[i]</c>.</summary>
    public float* Rows => _rows;

    public int Count => Tokens.Count;

    /// <summary>Adds a token of the text (with its row) if it is new.</summary>
    public void Add(long id)
    {
        if (!Tokens.Add(id)) return;
        if (Tokens.Count > _capacity)
        {
            _capacity = Math.Max(_capacity * 2, Tokens.Count);
            _rows = (float*)NativeMemory.AlignedRealloc(_rows, (nuint)((long)_capacity * _hidden * sizeof(float)), 64);
        }
        CopyRow(Tokens.Count - 1);
    }

    private void CopyRow(int index) =>
        Buffer.MemoryCopy(_weight + (long)Tokens[index] * _hidden, _rows + (long)index * _hidden, (long)_hidden * sizeof(float), (long)_hidden * sizeof(float));

    public void Dispose()
    {
        if (_rows == null) return;
        NativeMemory.AlignedFree(_rows);
        _rows = null;
    }
}

/// <summary>
/// A generation's draft head over part of the vocabulary for the tensor rounds (sampling, batches, adapter wrappers):
/// the head's rows of the draft tokens, gathered once (and again when the text brings new tokens), and scores over the
/// whole vocabulary with −∞ outside them, so the logits processors and the draft distribution q work unchanged (q is
/// zero outside the subset; speculative sampling stays exact for any q).
/// </summary>
internal sealed class TensorDraftHead : IDisposable
{
    private readonly Func<Tensor, Tensor> _finalNorm;
    private readonly CausalLM _model;
    private readonly long _vocab;
    private readonly DraftTokenSet _tokens;
    private Tensor? _idTensor, _rows;

    private TensorDraftHead(CausalLM model, Func<Tensor, Tensor> finalNorm, long vocab, DraftTokenSet tokens)
    {
        _model = model;
        _finalNorm = finalNorm;
        _vocab = vocab;
        _tokens = tokens;
        Gather();
    }

    /// <summary>The head for this session, or null when the model's head is not a plain matrix (then drafts use the whole head).</summary>
    public static TensorDraftHead? For(DecodingSession session, DraftVocabulary vocabulary) =>
        session.Model.PlainHead() is var (norm, weight)
            ? new TensorDraftHead(session.Model, norm, weight.shape[0], DraftTokenSet.For(vocabulary, (int)weight.shape[0], session))
            : null;

    /// <summary>Adds tokens of the text (prompt or accepted); regathers the rows when any is new.</summary>
    public void Add(IEnumerable<long> tokens)
    {
        bool added = false;
        foreach (long id in tokens) added |= _tokens.Add(id);
        if (added) Gather();
    }

    /// <summary>Draft scores float32 [N, vocab] from exit hidden states [N, 1, hidden]: the subset's logits, −∞ elsewhere.</summary>
    public Tensor Scores(Tensor hidden)
    {
        var normed = _finalNorm(hidden).select(1, 0);
        var subset = normed.matmul(_rows!.t()).to_type(ScalarType.Float32);
        var scores = torch.full([normed.shape[0], _vocab], float.NegativeInfinity, ScalarType.Float32, normed.device);
        return scores.index_copy_(1, _idTensor!, subset);
    }

    private void Gather()
    {
        _idTensor?.Dispose();
        _rows?.Dispose();
        using var noGrad = torch.no_grad();
        using var scope = torch.NewDisposeScope();
        // The head's weight is looked up each time: a tied head hands out a new tensor over the embedding's storage,
        // which the dispose scope it was made in frees (keeping one across rounds left a dead handle).
        var weight = _model.PlainHead()!.Value.Weight;
        var ids = new long[_tokens.Count];
        for (int i = 0; i < ids.Length; i++) ids[i] = _tokens[i];
        _idTensor = torch.tensor(ids, ScalarType.Int64, weight.device).DetachFromDisposeScope();
        _rows = weight.index_select(0, _idTensor).DetachFromDisposeScope();
    }

    public void Dispose()
    {
        _idTensor?.Dispose();
        _rows?.Dispose();
    }
}

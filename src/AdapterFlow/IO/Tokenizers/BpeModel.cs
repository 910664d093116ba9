using System.Collections.Concurrent;
using System.Text;
using System.Text.Json.Nodes;

namespace AdapterFlow.IO.Tokenizers;

/// <summary>
/// The "BPE" model of tokenizer.json: characters (or byte-fallback tokens) merged by merge rank, with a
/// per-word cache so that repeated words cost one dictionary lookup.
/// </summary>
internal sealed class BpeModel
{
    private readonly Dictionary<string, int> _vocab;
    private readonly Dictionary<string, int>.AlternateLookup<ReadOnlySpan<char>> _vocabBySpan;
    private readonly string?[] _idToToken;
    private readonly Dictionary<long, (int Rank, int NewId)> _merges;
    private readonly ConcurrentDictionary<string, int[]> _cache = new(StringComparer.Ordinal);
    private readonly int[] _byteFallbackIds;
    private const int CacheCapacity = 200_000;

    public string? UnkToken { get; }
    public int? UnkId { get; }
    public bool FuseUnk { get; }
    public bool ByteFallback { get; }
    public bool IgnoreMerges { get; }
    public string? ContinuingSubwordPrefix { get; }
    public string? EndOfWordSuffix { get; }
    public int MaxId { get; }

    private BpeModel(Dictionary<string, int> vocab, Dictionary<long, (int, int)> merges, string? unk, bool fuseUnk, bool byteFallback,
        bool ignoreMerges, string? prefix, string? suffix)
    {
        _vocab = vocab;
        _vocabBySpan = vocab.GetAlternateLookup<ReadOnlySpan<char>>();
        _merges = merges;
        MaxId = vocab.Count == 0 ? -1 : vocab.Values.Max();
        _idToToken = new string?[MaxId + 1];
        foreach (var (token, id) in vocab) _idToToken[id] = token;
        UnkToken = unk;
        UnkId = unk is not null && vocab.TryGetValue(unk, out var u) ? u : null;
        FuseUnk = fuseUnk;
        ByteFallback = byteFallback;
        IgnoreMerges = ignoreMerges;
        ContinuingSubwordPrefix = string.IsNullOrEmpty(prefix) ? null : prefix;
        EndOfWordSuffix = string.IsNullOrEmpty(suffix) ? null : suffix;
        _byteFallbackIds = new int[256];
        for (var b = 0; b < 256; b++) _byteFallbackIds[b] = vocab.TryGetValue($"<0x{b:X2}>", out var id) ? id : -1;
    }

    public static BpeModel FromJson(JsonObject model, JsonFields f)
    {
        var vocabNode = model["vocab"];
        if (vocabNode is JsonArray) throw f.Error("model.vocab", "is a list (a Unigram model?); only BPE models are supported");
        var vocabObj = f.Object(vocabNode, "model.vocab");
        var vocab = new Dictionary<string, int>(vocabObj.Count, StringComparer.Ordinal);
        foreach (var (token, idNode) in vocabObj)
        {
            var id = f.Int(idNode, $"model.vocab[\"{token}\"]");
            if (id < 0) throw f.Error($"model.vocab[\"{token}\"]", $"has a negative id {id}");
            vocab[token] = id;
        }
        var prefix = f.OptionalString(model["continuing_subword_prefix"], "model.continuing_subword_prefix");
        var mergesArray = f.Array(model["merges"], "model.merges");
        var merges = new Dictionary<long, (int, int)>(mergesArray.Count);
        var prefixLength = prefix?.Length ?? 0;
        for (var rank = 0; rank < mergesArray.Count; rank++)
        {
            var field = $"model.merges[{rank}]";
            string a, b;
            switch (mergesArray[rank])
            {
                case JsonArray pair:
                    if (pair.Count != 2) throw f.Error(field, $"must hold two tokens, not {pair.Count}");
                    a = f.String(pair[0], field + "[0]");
                    b = f.String(pair[1], field + "[1]");
                    break;
                case var node:
                    var line = f.String(node, field);
                    var space = line.IndexOf(' ');
                    if (space < 0 || line.IndexOf(' ', space + 1) >= 0) throw f.Error(field, $"\"{line}\" must be two tokens separated by one space");
                    a = line[..space];
                    b = line[(space + 1)..];
                    break;
            }
            if (!vocab.TryGetValue(a, out var aId)) throw f.Error(field, $"uses '{a}', which is not in model.vocab");
            if (!vocab.TryGetValue(b, out var bId)) throw f.Error(field, $"uses '{b}', which is not in model.vocab");
            var merged = a + (b.Length >= prefixLength ? b[prefixLength..] : "");
            if (!vocab.TryGetValue(merged, out var newId)) throw f.Error(field, $"makes '{merged}', which is not in model.vocab");
            merges[PairKey(aId, bId)] = (rank, newId);
        }
        var unk = f.OptionalString(model["unk_token"], "model.unk_token");
        if (unk is not null && !vocab.ContainsKey(unk)) throw f.Error("model.unk_token", $"'{unk}' is not in model.vocab");
        return new BpeModel(vocab, merges, unk,
            f.Bool(model["fuse_unk"], "model.fuse_unk", false),
            f.Bool(model["byte_fallback"], "model.byte_fallback", false),
            f.Bool(model["ignore_merges"], "model.ignore_merges", false),
            prefix,
            f.OptionalString(model["end_of_word_suffix"], "model.end_of_word_suffix"));
    }

    private static long PairKey(int a, int b) => ((long)a << 32) | (uint)b;

    public int Count => _vocab.Count;

    public string? IdToToken(int id) => (uint)id < (uint)_idToToken.Length ? _idToToken[id] : null;

    public int? TokenToId(string token) => _vocab.TryGetValue(token, out var id) ? id : null;

    public IReadOnlyDictionary<string, int> Vocab => _vocab;

    /// <summary>Appends the ids of one pre-tokenized word.</summary>
    public void Tokenize(string word, List<int> ids)
    {
        if (word.Length == 0) return;
        if (!_cache.TryGetValue(word, out var cached))
        {
            cached = TokenizeUncached(word);
            if (_cache.Count >= CacheCapacity) _cache.Clear();
            _cache.TryAdd(word, cached);
        }
        ids.AddRange(cached);
    }

    private struct Symbol
    {
        public int Id;
        public int Prev;
        public int Next;
        public bool Alive;
    }

    private int[] TokenizeUncached(string word)
    {
        if (IgnoreMerges && _vocab.TryGetValue(word, out var whole)) return [whole];

        // Initial symbols: one per character (with prefix/suffix decoration), else its byte-fallback tokens, else unk.
        var symbols = new List<Symbol>(word.Length + 4);
        int? pendingUnk = null;
        void Add(int id) => symbols.Add(new Symbol { Id = id, Alive = true });
        Span<byte> utf8 = stackalloc byte[4];
        for (var i = 0; i < word.Length;)
        {
            var charLength = char.IsSurrogatePair(word, i) ? 2 : 1;
            var isFirst = i == 0;
            var isLast = i + charLength == word.Length;
            var piece = word.AsSpan(i, charLength);
            int id;
            bool found;
            if ((!isFirst && ContinuingSubwordPrefix is not null) || (isLast && EndOfWordSuffix is not null))
            {
                var decorated = (!isFirst ? ContinuingSubwordPrefix : "") + piece.ToString() + (isLast ? EndOfWordSuffix : "");
                found = _vocab.TryGetValue(decorated, out id);
            }
            else found = _vocabBySpan.TryGetValue(piece, out id);

            if (found)
            {
                if (pendingUnk is { } u) { Add(u); pendingUnk = null; }
                Add(id);
            }
            else
            {
                var handled = false;
                if (ByteFallback)
                {
                    var byteCount = Encoding.UTF8.GetBytes(piece, utf8);
                    handled = true;
                    for (var k = 0; k < byteCount; k++) handled &= _byteFallbackIds[utf8[k]] >= 0;
                    // HF adds the bytes without flushing a pending unk first; kept for identical output.
                    if (handled) for (var k = 0; k < byteCount; k++) Add(_byteFallbackIds[utf8[k]]);
                }
                if (!handled && UnkId is { } unkId)
                {
                    if (pendingUnk is not null && !FuseUnk) Add(pendingUnk.Value);
                    pendingUnk = unkId;
                }
            }
            i += charLength;
        }
        if (pendingUnk is { } last) Add(last);

        var n = symbols.Count;
        var sym = symbols.ToArray();
        for (var k = 0; k < n; k++) { sym[k].Prev = k - 1; sym[k].Next = k + 1 < n ? k + 1 : -1; }

        // Lowest rank first, leftmost on ties: the order of HF's merge heap.
        var queue = new PriorityQueue<(int Pos, int NewId), (int Rank, int Pos)>();
        for (var k = 0; k + 1 < n; k++)
            if (_merges.TryGetValue(PairKey(sym[k].Id, sym[k + 1].Id), out var m)) queue.Enqueue((k, m.NewId), (m.Rank, k));
        while (queue.TryDequeue(out var top, out _))
        {
            var pos = top.Pos;
            if (!sym[pos].Alive || sym[pos].Next < 0) continue;
            var right = sym[pos].Next;
            if (!_merges.TryGetValue(PairKey(sym[pos].Id, sym[right].Id), out var current) || current.NewId != top.NewId) continue;
            sym[pos].Id = top.NewId;
            sym[right].Alive = false;
            sym[pos].Next = sym[right].Next;
            if (sym[pos].Next >= 0) sym[sym[pos].Next].Prev = pos;
            if (sym[pos].Prev >= 0 && _merges.TryGetValue(PairKey(sym[sym[pos].Prev].Id, sym[pos].Id), out var left))
                queue.Enqueue((sym[pos].Prev, left.NewId), (left.Rank, sym[pos].Prev));
            if (sym[pos].Next >= 0 && _merges.TryGetValue(PairKey(sym[pos].Id, sym[sym[pos].Next].Id), out var next))
                queue.Enqueue((pos, next.NewId), (next.Rank, pos));
        }
        var result = new List<int>(n);
        for (var k = 0; k >= 0 && k < n; k = sym[k].Next) result.Add(sym[k].Id);
        return result.ToArray();
    }
}

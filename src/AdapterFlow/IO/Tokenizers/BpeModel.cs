using System.Collections.Concurrent;
using System.Text;
using System.Text.Json;
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
    private const int CacheCapacity = 100_000;
    private const int MaxCachedWordLength = 256;
    private int _cacheAdds;

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
        _splitBeforeMetaspace = !ignoreMerges && ContinuingSubwordPrefix is null && EndOfWordSuffix is null && vocab.ContainsKey("\u2581")
            && !vocab.Keys.Any(t => t.AsSpan(1).Contains(Metaspace) && HasMetaspaceAfterOtherChar(t));
        _byteFallbackIds = new int[256];
        for (var b = 0; b < 256; b++) _byteFallbackIds[b] = vocab.TryGetValue($"<0x{b:X2}>", out var id) ? id : -1;
    }

    /// <summary>Reads a BPE model; vocab and merges straight from the JsonElement (a JsonNode per entry is several times slower).</summary>
    public static BpeModel FromJson(JsonObject model, JsonElement modelElement, JsonFields f)
    {
        if (!modelElement.TryGetProperty("vocab", out var vocabElement) || vocabElement.ValueKind == JsonValueKind.Null)
            throw f.Error("model.vocab", "is missing");
        if (vocabElement.ValueKind == JsonValueKind.Array) throw f.Error("model.vocab", "is a list (a Unigram model?); only BPE models are supported");
        if (vocabElement.ValueKind != JsonValueKind.Object) throw f.Error("model.vocab", $"must be an object, not {vocabElement.ValueKind}");
        var vocab = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var entry in vocabElement.EnumerateObject())
        {
            if (entry.Value.ValueKind != JsonValueKind.Number || !entry.Value.TryGetInt32(out var id) || id < 0)
                throw f.Error($"model.vocab[\"{entry.Name}\"]", $"must be a non-negative integer id, not {entry.Value.GetRawText()}");
            vocab[entry.Name] = id;
        }
        var prefix = f.OptionalString(model["continuing_subword_prefix"], "model.continuing_subword_prefix");
        if (!modelElement.TryGetProperty("merges", out var mergesElement) || mergesElement.ValueKind == JsonValueKind.Null)
            throw f.Error("model.merges", "is missing");
        if (mergesElement.ValueKind != JsonValueKind.Array) throw f.Error("model.merges", $"must be an array, not {mergesElement.ValueKind}");
        var merges = new Dictionary<long, (int, int)>(mergesElement.GetArrayLength());
        var prefixLength = prefix?.Length ?? 0;
        var lookup = vocab.GetAlternateLookup<ReadOnlySpan<char>>();
        var buffer = new char[256];
        var rank = 0;
        foreach (var item in mergesElement.EnumerateArray())
        {
            ReadOnlySpan<char> a, b;
            if (item.ValueKind == JsonValueKind.String)
            {
                var line = item.GetString()!;
                var space = line.IndexOf(' ');
                if (space < 0 || line.IndexOf(' ', space + 1) >= 0)
                    throw f.Error($"model.merges[{rank}]", $"\"{line}\" must be two tokens separated by one space");
                a = line.AsSpan(0, space);
                b = line.AsSpan(space + 1);
            }
            else if (item.ValueKind == JsonValueKind.Array && item.GetArrayLength() == 2
                     && item[0].ValueKind == JsonValueKind.String && item[1].ValueKind == JsonValueKind.String)
            {
                a = item[0].GetString();
                b = item[1].GetString();
            }
            else throw f.Error($"model.merges[{rank}]", "must be \"a b\" or [\"a\", \"b\"]");
            if (!lookup.TryGetValue(a, out var aId)) throw f.Error($"model.merges[{rank}]", $"uses '{a}', which is not in model.vocab");
            if (!lookup.TryGetValue(b, out var bId)) throw f.Error($"model.merges[{rank}]", $"uses '{b}', which is not in model.vocab");
            var bTail = b.Length >= prefixLength ? b[prefixLength..] : [];
            if (buffer.Length < a.Length + bTail.Length) buffer = new char[2 * (a.Length + bTail.Length)];
            a.CopyTo(buffer);
            bTail.CopyTo(buffer.AsSpan(a.Length));
            var merged = buffer.AsSpan(0, a.Length + bTail.Length);
            if (!lookup.TryGetValue(merged, out var newId)) throw f.Error($"model.merges[{rank}]", $"makes '{merged}', which is not in model.vocab");
            merges[PairKey(aId, bId)] = (rank, newId);
            rank++;
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

    private static bool HasMetaspaceAfterOtherChar(string token)
    {
        for (var i = 1; i < token.Length; i++)
            if (token[i] == Metaspace && token[i - 1] != Metaspace) return true;
        return false;
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
        if (_splitBeforeMetaspace && word.Length > 1)
        {
            // SentencePiece-style models get the whole text as one word. No token has '▁' after another
            // character, so no merge crosses the start of a '▁' run: BPE on those pieces separately gives the
            // same ids, and the pieces (words) can be cached.
            var start = 0;
            for (var i = 1; i < word.Length; i++)
            {
                if (word[i] == Metaspace && word[i - 1] != Metaspace)
                {
                    TokenizeWord(word.Substring(start, i - start), ids);
                    start = i;
                }
            }
            TokenizeWord(start == 0 ? word : word[start..], ids);
            return;
        }
        TokenizeWord(word, ids);
    }

    private const char Metaspace = '\u2581';
    private readonly bool _splitBeforeMetaspace;

    private void TokenizeWord(string word, List<int> ids)
    {
        if (_cache.TryGetValue(word, out var cached))
        {
            ids.AddRange(cached);
            return;
        }
        cached = TokenizeUncached(word);
        // Long "words" (a whole text for SentencePiece-style models) rarely repeat: not worth keeping.
        if (word.Length <= MaxCachedWordLength)
        {
            if (Interlocked.Increment(ref _cacheAdds) > CacheCapacity)
            {
                _cache.Clear();
                Interlocked.Exchange(ref _cacheAdds, 0);
            }
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

        // Lowest rank first, leftmost on ties (the order of HF's merge heap): priority = rank << 32 | position.
        var queue = new PriorityQueue<int, long>(n);
        for (var k = 0; k + 1 < n; k++)
            if (_merges.TryGetValue(PairKey(sym[k].Id, sym[k + 1].Id), out var m)) queue.Enqueue(k, ((long)m.Rank << 32) | (uint)k);
        while (queue.TryDequeue(out var pos, out var priority))
        {
            if (!sym[pos].Alive || sym[pos].Next < 0) continue;
            var right = sym[pos].Next;
            // A stale entry: the pair at pos changed since it was queued.
            if (!_merges.TryGetValue(PairKey(sym[pos].Id, sym[right].Id), out var current) || current.Rank != (int)(priority >> 32)) continue;
            sym[pos].Id = current.NewId;
            sym[right].Alive = false;
            sym[pos].Next = sym[right].Next;
            if (sym[pos].Next >= 0) sym[sym[pos].Next].Prev = pos;
            var prev = sym[pos].Prev;
            if (prev >= 0 && _merges.TryGetValue(PairKey(sym[prev].Id, sym[pos].Id), out var left))
                queue.Enqueue(prev, ((long)left.Rank << 32) | (uint)prev);
            if (sym[pos].Next >= 0 && _merges.TryGetValue(PairKey(sym[pos].Id, sym[sym[pos].Next].Id), out var next))
                queue.Enqueue(pos, ((long)next.Rank << 32) | (uint)pos);
        }
        var result = new List<int>(n);
        for (var k = 0; k >= 0 && k < n; k = sym[k].Next) result.Add(sym[k].Id);
        return result.ToArray();
    }
}

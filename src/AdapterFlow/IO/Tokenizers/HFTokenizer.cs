using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.Json.Nodes;
using AdapterFlow.IO.Tokenizers;

namespace AdapterFlow.IO;

/// <summary>Ids of an encoded text together with their token strings (as HF's Encoding.ids / .tokens).</summary>
public sealed record TokenizedText(int[] Ids, string[] Tokens);

/// <summary>
/// A Hugging Face fast tokenizer read from <c>tokenizer.json</c> (+ <c>tokenizer_config.json</c>,
/// <c>special_tokens_map.json</c>): added tokens, normalizer, pre-tokenizer, BPE model, post-processor and
/// decoder, reproducing the ids, tokens and decodes of the HF <c>tokenizers</c> library.
/// </summary>
/// <remarks>
/// Why not Microsoft.ML.Tokenizers (which the project references): its BpeTokenizer/CodeGenTokenizer take
/// vocab.json + merges.txt, not tokenizer.json, and cannot express what these files need to match HF bit for
/// bit — added tokens with lstrip/rstrip/single_word/normalized flags matched before and after normalization,
/// Prepend/Replace normalizer sequences applied per split, Metaspace's prepend_scheme "first", Digits +
/// ByteLevel pre-tokenizer sequences, TemplateProcessing, and the Replace/ByteFallback/Fuse/Strip decoder chain
/// (raw library decode, e.g. llama-2's normalized "▁&lt;s&gt;" added token). Its LlamaTokenizer needs the
/// SentencePiece tokenizer.model protobuf, which tokenizer.json-only checkpoints do not ship. So the pipeline is
/// written here, following the HF component semantics; the BPE merge loop is the standard rank-ordered one.
/// </remarks>
public sealed class HFTokenizer : ITokenizer
{
    private readonly string _tokenizerJsonText;
    private readonly JsonObject? _config;
    private readonly JsonObject? _specialTokensMap;
    private readonly TextNormalizer? _normalizer;
    private readonly PreTokenizer? _preTokenizer;
    private readonly BpeModel _model;
    private readonly PostProcessor _postProcessor;
    private readonly TokenDecoder? _decoder;
    private readonly Dictionary<int, AddedToken> _addedById = new();
    private readonly Dictionary<string, AddedToken> _addedByContent = new(StringComparer.Ordinal);
    private readonly HashSet<string> _specialContents = new(StringComparer.Ordinal);
    private readonly AddedTokenMatcher _rawMatcher;
    private readonly AddedTokenMatcher _normalizedMatcher;
    private readonly string?[] _decodeForm;

    /// <summary>Where this tokenizer was read from (for messages).</summary>
    public string Source { get; }

    public int VocabSize { get; }
    public string? BosToken { get; }
    public string? EosToken { get; }
    public string? PadToken { get; }
    public string? UnkToken { get; }
    public int? BosTokenId { get; }
    public int? EosTokenId { get; }
    public int? PadTokenId { get; }
    public int? UnkTokenId { get; }

    /// <summary>tokenizer_config.json "model_max_length" when it is a sensible number.</summary>
    public int? ModelMaxLength { get; }

    /// <summary>tokenizer_config.json "chat_template" (Jinja source), if any.</summary>
    public string? ChatTemplate { get; }

    /// <summary>tokenizer_config.json "clean_up_tokenization_spaces": what transformers' decode() applies on top of the raw decode.</summary>
    public bool CleanUpTokenizationSpacesByDefault { get; }

    /// <summary>Ids of all added tokens flagged special.</summary>
    public IReadOnlyCollection<int> SpecialTokenIds { get; }

    private HFTokenizer(string tokenizerJsonText, JsonElement root, JsonObject? config, JsonObject? specialTokensMap, string source, string? configSource)
    {
        Source = source;
        _tokenizerJsonText = tokenizerJsonText;
        if (root.ValueKind != JsonValueKind.Object) throw new InvalidDataException($"{source}: must hold a JSON object");
        // A lazy JsonNode view for the small sections; vocab and merges are read from the JsonElement.
        var tokenizerJson = JsonObject.Create(root)!;
        _config = config;
        _specialTokensMap = specialTokensMap;
        var f = new JsonFields(source);

        var model = f.Object(tokenizerJson["model"], "model");
        var modelType = model["type"] is null ? "BPE" : f.String(model["type"], "model.type");
        if (modelType != "BPE")
            throw f.Error("model.type", $"'{modelType}' is not supported (only BPE models: byte-level BPE and SentencePiece-style BPE)");
        _model = BpeModel.FromJson(model, root.GetProperty("model"), f);
        _normalizer = TextNormalizer.FromJson(tokenizerJson["normalizer"], f, "normalizer");
        _preTokenizer = PreTokenizer.FromJson(tokenizerJson["pre_tokenizer"], f, "pre_tokenizer");
        _decoder = TokenDecoder.FromJson(tokenizerJson["decoder"], f, "decoder");

        var maxId = _model.MaxId;
        if (tokenizerJson["added_tokens"] is { } addedNode)
        {
            var added = f.Array(addedNode, "added_tokens");
            for (var i = 0; i < added.Count; i++)
            {
                var token = AddedToken.FromJson(added[i], f, $"added_tokens[{i}]");
                if (token.Id < 0) throw f.Error($"added_tokens[{i}].id", $"is negative ({token.Id})");
                var modelId = _model.TokenToId(token.Content);
                if (modelId is { } mid && mid != token.Id)
                    throw f.Error($"added_tokens[{i}]", $"'{token.Content}' has id {token.Id} but model.vocab gives it {mid}");
                _addedById[token.Id] = token;
                _addedByContent[token.Content] = token;
                if (token.Special) _specialContents.Add(token.Content);
                maxId = Math.Max(maxId, token.Id);
            }
        }
        VocabSize = maxId + 1;
        SpecialTokenIds = _addedById.Values.Where(t => t.Special).Select(t => t.Id).Order().ToArray();

        _rawMatcher = new AddedTokenMatcher(_addedById.Values.Where(t => !t.Normalized).Select(t => (t.Content, t)));
        _normalizedMatcher = new AddedTokenMatcher(_addedById.Values.Where(t => t.Normalized).Select(t => (NormalizedForm(t), t)));

        // Decoding sees added tokens the way tokenizers 0.23 reports them: normalized ones in normalized form.
        _decodeForm = new string?[VocabSize];
        for (var id = 0; id <= _model.MaxId; id++) _decodeForm[id] = _model.IdToToken(id);
        foreach (var t in _addedById.Values) _decodeForm[t.Id] = NormalizedForm(t);

        // Special tokens: special_tokens_map.json overrides tokenizer_config.json (as in transformers).
        var cf = new JsonFields(configSource ?? "tokenizer_config.json");
        string? SpecialToken(string key)
        {
            var fromMap = TokenContent(specialTokensMap?[key], cf, key);
            return fromMap ?? TokenContent(config?[key], cf, key);
        }
        UnkToken = SpecialToken("unk_token") ?? _model.UnkToken;
        BosToken = SpecialToken("bos_token");
        EosToken = SpecialToken("eos_token");
        PadToken = SpecialToken("pad_token");
        if (config is null && specialTokensMap is null)
        {
            // No config (e.g. the GPT-2 Hub repo): fall back to the conventional names present as special tokens.
            EosToken ??= FirstSpecial("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>");
            BosToken ??= FirstSpecial("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>");
        }
        UnkTokenId = UnkToken is null ? null : TokenToId(UnkToken);
        BosTokenId = BosToken is null ? null : TokenToId(BosToken);
        EosTokenId = EosToken is null ? null : TokenToId(EosToken);
        PadTokenId = PadToken is null ? null : TokenToId(PadToken);

        var post = PostProcessor.FromJson(tokenizerJson["post_processor"], f, "post_processor");
        if (post is null || ReferenceEquals(post, PostProcessor.None))
        {
            // No template in tokenizer.json: honour add_bos_token / add_eos_token of tokenizer_config.json.
            var addBos = cf.Bool(config?["add_bos_token"], "add_bos_token", false) && BosTokenId is not null;
            var addEos = cf.Bool(config?["add_eos_token"], "add_eos_token", false) && EosTokenId is not null;
            post = new PostProcessor(addBos ? [BosTokenId!.Value] : [], addBos ? [BosToken!] : [],
                addEos ? [EosTokenId!.Value] : [], addEos ? [EosToken!] : []);
        }
        _postProcessor = post;

        if (config?["model_max_length"] is JsonValue mml && mml.TryGetValue<double>(out var max) && max is > 0 and < int.MaxValue)
            ModelMaxLength = (int)max;
        ChatTemplate = config?["chat_template"] is JsonValue ct && ct.TryGetValue<string>(out var template) ? template : null;
        CleanUpTokenizationSpacesByDefault = config?["clean_up_tokenization_spaces"] is JsonValue cu && cu.TryGetValue<bool>(out var clean) && clean;
    }

    private string? FirstSpecial(params string[] names) => names.FirstOrDefault(n => _addedByContent.TryGetValue(n, out var t) && t.Special);

    private string NormalizedForm(AddedToken t) => t.Normalized && _normalizer is not null ? _normalizer.Normalize(t.Content) : t.Content;

    private static string? TokenContent(JsonNode? node, JsonFields f, string key) => node switch
    {
        null => null,
        JsonValue v when v.TryGetValue<string>(out var s) => s,
        JsonObject o => f.String(o["content"], key + ".content"),
        _ => throw f.Error(key, "must be a string or an object with \"content\""),
    };

    // ---------------------------------------------------------------- loading

    /// <summary>Reads tokenizer.json, tokenizer_config.json and special_tokens_map.json (the last two if present) from a folder.</summary>
    public static HFTokenizer FromDirectory(string directory)
    {
        if (!Directory.Exists(directory)) throw new DirectoryNotFoundException($"tokenizer folder {directory} does not exist");
        var tokenizerJson = Path.Combine(directory, "tokenizer.json");
        var config = Path.Combine(directory, "tokenizer_config.json");
        var map = Path.Combine(directory, "special_tokens_map.json");
        var vocab = Path.Combine(directory, "vocab.json");
        var merges = Path.Combine(directory, "merges.txt");
        if (!File.Exists(tokenizerJson) && File.Exists(vocab) && File.Exists(merges))
            return FromVocabAndMerges(vocab, merges, File.Exists(config) ? config : null, File.Exists(map) ? map : null);
        if (!File.Exists(tokenizerJson))
            throw new FileNotFoundException($"{directory} has no tokenizer.json (nor vocab.json + merges.txt)", tokenizerJson);
        return FromFile(tokenizerJson, File.Exists(config) ? config : null, File.Exists(map) ? map : null);
    }

    /// <summary>Reads a tokenizer.json file, optionally with its tokenizer_config.json and special_tokens_map.json.</summary>
    public static HFTokenizer FromFile(string tokenizerJsonPath, string? configPath = null, string? specialTokensMapPath = null)
    {
        if (!File.Exists(tokenizerJsonPath)) throw new FileNotFoundException($"tokenizer file {tokenizerJsonPath} does not exist", tokenizerJsonPath);
        if (configPath is not null && !File.Exists(configPath)) throw new FileNotFoundException($"tokenizer config {configPath} does not exist", configPath);
        if (specialTokensMapPath is not null && !File.Exists(specialTokensMapPath))
            throw new FileNotFoundException($"special tokens map {specialTokensMapPath} does not exist", specialTokensMapPath);
        return FromJson(File.ReadAllText(tokenizerJsonPath),
            configPath is null ? null : File.ReadAllText(configPath),
            specialTokensMapPath is null ? null : File.ReadAllText(specialTokensMapPath),
            tokenizerJsonPath, configPath, specialTokensMapPath);
    }

    /// <summary>Builds a tokenizer from the text of tokenizer.json (and optionally of the two config files).</summary>
    public static HFTokenizer FromJson(string tokenizerJson, string? configJson = null, string? specialTokensMapJson = null,
        string source = "tokenizer.json", string? configSource = null, string? specialTokensMapSource = null)
    {
        JsonObject? config = null, map = null;
        if (configJson is not null)
            config = JsonFields.Parse(configJson, configSource ?? "tokenizer_config.json") as JsonObject
                ?? throw new InvalidDataException($"{configSource ?? "tokenizer_config.json"}: must hold a JSON object");
        if (specialTokensMapJson is not null)
            map = JsonFields.Parse(specialTokensMapJson, specialTokensMapSource ?? "special_tokens_map.json") as JsonObject
                ?? throw new InvalidDataException($"{specialTokensMapSource ?? "special_tokens_map.json"}: must hold a JSON object");
        using var document = JsonFields.ParseDocument(tokenizerJson, source);
        return new HFTokenizer(tokenizerJson, document.RootElement, config, map, source, configSource);
    }

    /// <summary>
    /// A byte-level BPE tokenizer from the "slow" GPT-2 layout (vocab.json + merges.txt, e.g. OPT), converted the
    /// way transformers' GPT2Converter does; <see cref="Save"/> then writes it as tokenizer.json.
    /// </summary>
    public static HFTokenizer FromVocabAndMerges(string vocabJsonPath, string mergesTxtPath, string? configPath = null, string? specialTokensMapPath = null)
    {
        foreach (var path in new[] { vocabJsonPath, mergesTxtPath, configPath, specialTokensMapPath })
            if (path is not null && !File.Exists(path)) throw new FileNotFoundException($"tokenizer file {path} does not exist", path);
        var config = configPath is null ? null : JsonFields.Parse(File.ReadAllText(configPath), configPath) as JsonObject
            ?? throw new InvalidDataException($"{configPath}: must hold a JSON object");
        var map = specialTokensMapPath is null ? null : JsonFields.Parse(File.ReadAllText(specialTokensMapPath), specialTokensMapPath) as JsonObject
            ?? throw new InvalidDataException($"{specialTokensMapPath}: must hold a JSON object");
        var json = VocabMergesConverter.Convert(vocabJsonPath, mergesTxtPath, config, configPath ?? "tokenizer_config.json");
        return FromNodes(json, config, $"{vocabJsonPath} + {Path.GetFileName(mergesTxtPath)}", map, configPath);
    }

    internal static HFTokenizer FromNodes(JsonObject tokenizerJson, JsonObject? config, string source, JsonObject? specialTokensMap = null, string? configSource = null)
    {
        var text = tokenizerJson.ToJsonString(SaveOptions);
        using var document = JsonDocument.Parse(text);
        return new HFTokenizer(text, document.RootElement, config, specialTokensMap, source, configSource);
    }

    // ---------------------------------------------------------------- encoding

    public IReadOnlyList<int> Encode(string text, bool addSpecialTokens = false)
    {
        var ids = new List<int>(text.Length / 3 + 4);
        EncodeCore(text, addSpecialTokens, ids, null);
        return ids;
    }

    /// <summary>Ids and token strings, exactly as HF's <c>encode(text).ids / .tokens</c>.</summary>
    public TokenizedText EncodeWithTokens(string text, bool addSpecialTokens = false)
    {
        var ids = new List<int>(text.Length / 3 + 4);
        var tokens = new List<string>(ids.Capacity);
        EncodeCore(text, addSpecialTokens, ids, tokens);
        return new TokenizedText([.. ids], [.. tokens]);
    }

    [ThreadStatic] private static List<(int Start, int End, AddedToken? Token)>? t_rawSegments;
    [ThreadStatic] private static List<(int Start, int End, AddedToken? Token)>? t_normalizedSegments;
    [ThreadStatic] private static List<Piece>? t_words;

    private void EncodeCore(string text, bool addSpecialTokens, List<int> ids, List<string>? tokens)
    {
        ArgumentNullException.ThrowIfNull(text);
        if (addSpecialTokens)
        {
            ids.AddRange(_postProcessor.PrefixIds);
            tokens?.AddRange(_postProcessor.PrefixTokens);
        }
        var rawSegments = t_rawSegments ??= new();
        var normalizedSegments = t_normalizedSegments ??= new();
        var words = t_words ??= new();
        if (_rawMatcher.IsEmpty) { rawSegments.Clear(); if (text.Length > 0) rawSegments.Add((0, text.Length, null)); }
        else _rawMatcher.Split(text, rawSegments);

        foreach (var (start, end, added) in rawSegments)
        {
            if (added is not null)
            {
                ids.Add(added.Id);
                tokens?.Add(text[start..end]);
                continue;
            }
            var piece = start == 0 && end == text.Length ? text : text[start..end];
            var normalized = _normalizer?.Normalize(piece) ?? piece;
            if (_normalizedMatcher.IsEmpty) { normalizedSegments.Clear(); if (normalized.Length > 0) normalizedSegments.Add((0, normalized.Length, null)); }
            else _normalizedMatcher.Split(normalized, normalizedSegments);
            foreach (var (ns, ne, nAdded) in normalizedSegments)
            {
                if (nAdded is not null)
                {
                    ids.Add(nAdded.Id);
                    tokens?.Add(normalized[ns..ne]);
                    continue;
                }
                var sub = ns == 0 && ne == normalized.Length ? normalized : normalized[ns..ne];
                var atStart = start == 0 && ns == 0;
                words.Clear();
                if (_preTokenizer is null) words.Add(new Piece(sub, atStart));
                else _preTokenizer.Split(new Piece(sub, atStart), words);
                foreach (var word in words)
                {
                    var before = ids.Count;
                    _model.Tokenize(word.Text, ids);
                    if (tokens is not null)
                        for (var k = before; k < ids.Count; k++) tokens.Add(_model.IdToToken(ids[k])!);
                }
            }
        }
        if (addSpecialTokens)
        {
            ids.AddRange(_postProcessor.SuffixIds);
            tokens?.AddRange(_postProcessor.SuffixTokens);
        }
    }

    // ---------------------------------------------------------------- decoding

    public string Decode(IReadOnlyList<int> ids, bool skipSpecialTokens = false)
    {
        var tokens = new List<string>(ids.Count);
        foreach (var id in ids)
        {
            var token = (uint)id < (uint)_decodeForm.Length ? _decodeForm[id] : null;
            if (token is null || (skipSpecialTokens && _specialContents.Contains(token))) continue;
            tokens.Add(token);
        }
        return _decoder is null ? string.Join(' ', tokens) : _decoder.Decode(tokens);
    }

    /// <summary>Decode, then optionally transformers' clean_up_tokenization (" ." → "." etc.).</summary>
    public string Decode(IReadOnlyList<int> ids, bool skipSpecialTokens, bool cleanUpTokenizationSpaces)
    {
        var text = Decode(ids, skipSpecialTokens);
        return cleanUpTokenizationSpaces ? CleanUpTokenizationSpaces(text) : text;
    }

    /// <summary>transformers' clean_up_tokenization: removes spaces before punctuation and English contractions.</summary>
    public static string CleanUpTokenizationSpaces(string text) => text
        .Replace(" .", ".", StringComparison.Ordinal).Replace(" ?", "?", StringComparison.Ordinal)
        .Replace(" !", "!", StringComparison.Ordinal).Replace(" ,", ",", StringComparison.Ordinal)
        .Replace(" ' ", "'", StringComparison.Ordinal).Replace(" n't", "n't", StringComparison.Ordinal)
        .Replace(" 'm", "'m", StringComparison.Ordinal).Replace(" 's", "'s", StringComparison.Ordinal)
        .Replace(" 've", "'ve", StringComparison.Ordinal).Replace(" 're", "'re", StringComparison.Ordinal);

    /// <summary>A decoder that turns ids into text one at a time for streaming generation.</summary>
    public TokenizerStreamingDecoder CreateStreamingDecoder(bool skipSpecialTokens = false) => new(this, skipSpecialTokens);

    // ---------------------------------------------------------------- vocabulary

    /// <summary>The token string of an id (an added token's content, else the model's vocabulary entry), or null.</summary>
    public string? IdToToken(int id) =>
        _addedById.TryGetValue(id, out var added) ? added.Content : _model.IdToToken(id);

    /// <summary>The id of a token string (added tokens first, as HF), or null.</summary>
    public int? TokenToId(string token) =>
        _addedByContent.TryGetValue(token, out var added) ? added.Id : _model.TokenToId(token);

    public bool IsSpecialToken(int id) => _addedById.TryGetValue(id, out var t) && t.Special;

    /// <summary>The vocabulary (model tokens and added tokens).</summary>
    public IReadOnlyDictionary<string, int> GetVocab()
    {
        var vocab = new Dictionary<string, int>(_model.Vocab, StringComparer.Ordinal);
        foreach (var t in _addedById.Values) vocab[t.Content] = t.Id;
        return vocab;
    }

    // ---------------------------------------------------------------- saving

    private static readonly JsonSerializerOptions SaveOptions = new() { WriteIndented = true, Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    /// <summary>The tokenizer.json text this tokenizer was built from (what <see cref="Save"/> writes).</summary>
    public string TokenizerJson => _tokenizerJsonText;

    /// <summary>
    /// Writes tokenizer.json and tokenizer_config.json (plus special_tokens_map.json when one was read) that
    /// transformers' AutoTokenizer and this class load back identically.
    /// </summary>
    public void Save(string directory)
    {
        Directory.CreateDirectory(directory);
        AtomicFile.WriteAllText(Path.Combine(directory, "tokenizer.json"), _tokenizerJsonText);
        var config = _config?.DeepClone().AsObject() ?? new JsonObject { ["tokenizer_class"] = "PreTrainedTokenizerFast" };
        if (_config is null)
        {
            if (BosToken is not null) config["bos_token"] = BosToken;
            if (EosToken is not null) config["eos_token"] = EosToken;
            if (PadToken is not null) config["pad_token"] = PadToken;
            if (UnkToken is not null) config["unk_token"] = UnkToken;
            config["clean_up_tokenization_spaces"] = false;
            config["model_max_length"] = ModelMaxLength ?? 1_000_000;
            var decoderTable = new JsonObject();
            foreach (var t in _addedById.Values.OrderBy(t => t.Id))
                decoderTable[t.Id.ToString(System.Globalization.CultureInfo.InvariantCulture)] = new JsonObject
                {
                    ["content"] = t.Content, ["lstrip"] = t.LStrip, ["normalized"] = t.Normalized, ["rstrip"] = t.RStrip,
                    ["single_word"] = t.SingleWord, ["special"] = t.Special,
                };
            config["added_tokens_decoder"] = decoderTable;
        }
        AtomicFile.WriteAllText(Path.Combine(directory, "tokenizer_config.json"), config.ToJsonString(SaveOptions));
        if (_specialTokensMap is not null)
            AtomicFile.WriteAllText(Path.Combine(directory, "special_tokens_map.json"), _specialTokensMap.ToJsonString(SaveOptions));
    }
}

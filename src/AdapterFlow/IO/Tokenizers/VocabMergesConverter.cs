using System.Text.Json.Nodes;

namespace AdapterFlow.IO.Tokenizers;

/// <summary>
/// Builds the tokenizer.json that transformers' GPT2Converter makes from the "slow" GPT-2 layout
/// (vocab.json + merges.txt + tokenizer_config.json), for checkpoints such as OPT that ship no tokenizer.json.
/// </summary>
internal static class VocabMergesConverter
{
    public static JsonObject Convert(string vocabPath, string mergesPath, JsonObject? config, string configSource)
    {
        var vocabFields = new JsonFields(vocabPath);
        var vocabNode = vocabFields.Object(JsonFields.Parse(File.ReadAllText(vocabPath), vocabPath), "(root)");
        var vocab = new JsonObject();
        var ids = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var (token, id) in vocabNode)
        {
            var value = vocabFields.Int(id, $"[\"{token}\"]");
            vocab[token] = value;
            ids[token] = value;
        }

        var merges = new JsonArray();
        var lineNumber = 0;
        foreach (var line in File.ReadLines(mergesPath))
        {
            lineNumber++;
            if ((lineNumber == 1 && line.StartsWith("#version", StringComparison.Ordinal)) || line.Length == 0) continue;
            if (line.Split(' ').Length != 2) throw new InvalidDataException($"{mergesPath}: line {lineNumber} \"{line}\" must be two tokens separated by one space");
            merges.Add(line);
        }

        var cf = new JsonFields(configSource);
        string? Special(string key, string? fallback)
        {
            var node = config?[key];
            var content = node switch
            {
                null => fallback,
                JsonValue v when v.TryGetValue<string>(out var s) => s,
                JsonObject o => cf.String(o["content"], key + ".content"),
                _ => null,
            };
            return content is not null && ids.ContainsKey(content) ? content : null;
        }
        // GPT2Tokenizer's defaults: <|endoftext|> is BOS, EOS and UNK.
        var defaultToken = ids.ContainsKey("<|endoftext|>") ? "<|endoftext|>" : null;
        var bos = Special("bos_token", defaultToken);
        var eos = Special("eos_token", defaultToken);
        var unk = Special("unk_token", defaultToken);
        var pad = Special("pad_token", null);
        var added = new SortedDictionary<int, JsonObject>();
        foreach (var key in new[] { "unk_token", "bos_token", "eos_token", "pad_token" })
        {
            var content = key switch { "unk_token" => unk, "bos_token" => bos, "eos_token" => eos, _ => pad };
            if (content is null) continue;
            var flags = config?[key] as JsonObject;
            bool Flag(string name, bool fallback) => flags?[name] is JsonValue v && v.TryGetValue<bool>(out var b) ? b : fallback;
            added[ids[content]] = new JsonObject
            {
                ["id"] = ids[content], ["content"] = content, ["single_word"] = Flag("single_word", false), ["lstrip"] = Flag("lstrip", false),
                ["rstrip"] = Flag("rstrip", false), ["normalized"] = Flag("normalized", true), ["special"] = true,
            };
        }

        var addPrefixSpace = cf.Bool(config?["add_prefix_space"], "add_prefix_space", false);
        var addBos = cf.Bool(config?["add_bos_token"], "add_bos_token", false) && bos is not null;
        JsonObject postProcessor = addBos
            ? new JsonObject
            {
                ["type"] = "TemplateProcessing",
                ["single"] = new JsonArray(SpecialPart(bos!), SequencePart("A")),
                ["pair"] = new JsonArray(SpecialPart(bos!), SequencePart("A"), SequencePart("B")),
                ["special_tokens"] = new JsonObject { [bos!] = new JsonObject { ["id"] = bos, ["ids"] = new JsonArray(ids[bos!]), ["tokens"] = new JsonArray(bos) } },
            }
            : new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = true, ["trim_offsets"] = false, ["use_regex"] = true };
        return new JsonObject
        {
            ["version"] = "1.0",
            ["truncation"] = null,
            ["padding"] = null,
            ["added_tokens"] = new JsonArray(added.Values.Select(a => (JsonNode)a).ToArray()),
            ["normalizer"] = null,
            ["pre_tokenizer"] = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = addPrefixSpace, ["trim_offsets"] = true, ["use_regex"] = true },
            ["post_processor"] = postProcessor,
            ["decoder"] = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = true, ["trim_offsets"] = true, ["use_regex"] = true },
            ["model"] = new JsonObject
            {
                ["type"] = "BPE", ["dropout"] = null, ["unk_token"] = null, ["continuing_subword_prefix"] = "", ["end_of_word_suffix"] = "",
                ["fuse_unk"] = false, ["byte_fallback"] = false, ["vocab"] = vocab, ["merges"] = merges,
            },
        };
    }

    private static JsonObject SpecialPart(string id) => new() { ["SpecialToken"] = new JsonObject { ["id"] = id, ["type_id"] = 0 } };
    private static JsonObject SequencePart(string id) => new() { ["Sequence"] = new JsonObject { ["id"] = id, ["type_id"] = 0 } };
}

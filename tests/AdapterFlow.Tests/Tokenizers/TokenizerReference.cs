using System.Collections.Concurrent;
using System.Text.Json;
using AdapterFlow.IO;

namespace AdapterFlow.Tests.Tokenizers;

/// <summary>One line of shared/tokenizers/&lt;folder&gt;/reference.jsonl (HF tokenizers 0.23.2 output).</summary>
public sealed record ReferenceEncoding(string Id, bool AddSpecialTokens, string Text, int[] Ids, string[] Tokens, string Decoded, string DecodedSkipSpecial);

/// <summary>Loads the shared real tokenizers once per test run and their reference encodings.</summary>
public static class TokenizerReference
{
    public static readonly string[] Folders =
    [
        "gpt2", "gpt-neox-20b", "opt", "phi-2", "smollm2-360m-instruct-ft",
        "llama-2", "tinyllama-1.1b-chat-v1.0", "mistral-7b-v0.1", "phi-3-mini-4k-instruct",
    ];

    public const int TextCount = 43;

    private static readonly ConcurrentDictionary<string, Lazy<HFTokenizer>> Tokenizers = new();
    private static readonly ConcurrentDictionary<string, Lazy<ReferenceEncoding[]>> References = new();

    public static HFTokenizer Load(string folder)
    {
        var dir = SharedFiles.Require("tokenizers", folder);
        return Tokenizers.GetOrAdd(folder, _ => new Lazy<HFTokenizer>(() =>
        {
            // OPT's Hub repo has no tokenizer.json; the shared folder has the one transformers would convert.
            var converted = Path.Combine(dir, "tokenizer.converted.json");
            return File.Exists(converted)
                ? HFTokenizer.FromFile(converted, Path.Combine(dir, "tokenizer_config.json"))
                : HFTokenizer.FromDirectory(dir);
        })).Value;
    }

    public static ReferenceEncoding[] Cases(string folder)
    {
        var path = SharedFiles.Require("tokenizers", folder, "reference.jsonl");
        return References.GetOrAdd(folder, _ => new Lazy<ReferenceEncoding[]>(() => File.ReadLines(path)
            .Where(l => l.Length > 0)
            .Select(l =>
            {
                using var doc = JsonDocument.Parse(l);
                var r = doc.RootElement;
                return new ReferenceEncoding(r.GetProperty("id").GetString()!, r.GetProperty("add_special_tokens").GetBoolean(),
                    r.GetProperty("text").GetString()!,
                    r.GetProperty("ids").EnumerateArray().Select(e => e.GetInt32()).ToArray(),
                    r.GetProperty("tokens").EnumerateArray().Select(e => e.GetString()!).ToArray(),
                    r.GetProperty("decoded").GetString()!, r.GetProperty("decoded_skip_special").GetString()!);
            }).ToArray())).Value;
    }

    /// <summary>Differences between our output and one reference line; empty when identical.</summary>
    public static List<string> Compare(HFTokenizer tokenizer, ReferenceEncoding expected)
    {
        var problems = new List<string>();
        var actual = tokenizer.EncodeWithTokens(expected.Text, expected.AddSpecialTokens);
        if (!actual.Ids.SequenceEqual(expected.Ids))
            problems.Add($"ids: expected [{string.Join(",", expected.Ids)}] got [{string.Join(",", actual.Ids)}]");
        if (!actual.Tokens.SequenceEqual(expected.Tokens))
            problems.Add($"tokens: expected [{string.Join("|", expected.Tokens)}] got [{string.Join("|", actual.Tokens)}]");
        var decoded = tokenizer.Decode(expected.Ids, skipSpecialTokens: false);
        if (decoded != expected.Decoded) problems.Add($"decoded: expected {JsonSerializer.Serialize(expected.Decoded)} got {JsonSerializer.Serialize(decoded)}");
        var skipped = tokenizer.Decode(expected.Ids, skipSpecialTokens: true);
        if (skipped != expected.DecodedSkipSpecial)
            problems.Add($"decoded_skip_special: expected {JsonSerializer.Serialize(expected.DecodedSkipSpecial)} got {JsonSerializer.Serialize(skipped)}");
        return problems;
    }
}

using System.Text.Json;
using System.Text.RegularExpressions;
using Microsoft.ML.Tokenizers;
using Xunit.Abstractions;

namespace AdapterFlow.Tests.Tokenizers;

/// <summary>
/// Microsoft.ML.Tokenizers' BpeTokenizer, configured by hand from a byte-level tokenizer.json (vocab, merges,
/// ByteLevel, GPT-2 regex, added tokens as special tokens), reproduces HF ids on those files; it is used here
/// as an independent second implementation to check HFTokenizer on many more texts (GSM8K questions and
/// answers) than the 43 reference strings. (It cannot do SentencePiece-style BPE with byte fallback from
/// tokenizer.json, nor added-token flags, normalizer sequences or decoder chains: see HFTokenizer's remarks.)
/// </summary>
public class MicrosoftMLCrossCheckTests(ITestOutputHelper output)
{
    private static readonly Regex Gpt2Pattern = new(@"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+", RegexOptions.Compiled);

    [SkippableTheory]
    [InlineData("gpt2")]
    [InlineData("gpt-neox-20b")]
    [InlineData("opt")]
    [InlineData("phi-2")]
    public void Byte_level_ids_agree_with_Microsoft_ML_BpeTokenizer_on_gsm8k(string folder)
    {
        var ours = TokenizerReference.Load(folder);
        var dir = SharedFiles.Require("tokenizers", folder);
        var file = File.Exists(Path.Combine(dir, "tokenizer.json")) ? Path.Combine(dir, "tokenizer.json") : Path.Combine(dir, "tokenizer.converted.json");
        using var doc = JsonDocument.Parse(File.ReadAllText(file));
        var model = doc.RootElement.GetProperty("model");
        var specials = doc.RootElement.GetProperty("added_tokens").EnumerateArray()
            .ToDictionary(t => t.GetProperty("content").GetString()!, t => t.GetProperty("id").GetInt32());
        var options = new BpeOptions(model.GetProperty("vocab").EnumerateObject().Select(p => KeyValuePair.Create(p.Name, p.Value.GetInt32())))
        {
            Merges = model.GetProperty("merges").EnumerateArray()
                .Select(m => m.ValueKind == JsonValueKind.String ? m.GetString()! : $"{m[0].GetString()} {m[1].GetString()}").ToList(),
            ByteLevel = true,
            SpecialTokens = specials,
            PreTokenizer = new RegexPreTokenizer(Gpt2Pattern, specials),
        };
        var theirs = BpeTokenizer.Create(options);

        using var gsm = JsonDocument.Parse(File.ReadAllText(SharedFiles.Require("data", "math", "gsm8k", "test.json")));
        var texts = gsm.RootElement.EnumerateArray().Take(250)
            .SelectMany(e => new[] { e.GetProperty("instruction").GetString()!, e.GetProperty("output").GetString()! }).ToList();
        var mismatches = 0;
        foreach (var text in texts)
        {
            var expected = theirs.EncodeToIds(text).ToArray();
            var actual = ours.Encode(text).ToArray();
            if (!expected.SequenceEqual(actual))
            {
                if (mismatches++ < 3) output.WriteLine($"{folder}: {JsonSerializer.Serialize(text)}\n  ML: [{string.Join(",", expected)}]\n  us: [{string.Join(",", actual)}]");
                continue;
            }
            Assert.Equal(theirs.Decode(expected), ours.Decode(actual));
        }
        output.WriteLine($"{folder}: {texts.Count - mismatches}/{texts.Count} GSM8K texts encode identically");
        Assert.Equal(0, mismatches);
    }
}

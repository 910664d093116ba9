using System.Text.Json.Nodes;
using AdapterFlow.IO.Tokenizers;

namespace AdapterFlow.Tests.Tokenizers;

/// <summary>Normalizers and pre-tokenizers the 9 shared files do not exercise, against HF's documented behaviour.</summary>
public class TokenizerComponentTests
{
    private static readonly JsonFields Fields = new("test.json");

    private static string[] PreTokenize(string json, string text)
    {
        var pre = PreTokenizer.FromJson(JsonNode.Parse(json), Fields, "pre_tokenizer")!;
        var output = new List<Piece>();
        pre.Split(new Piece(text, true), output);
        return output.Select(p => p.Text).ToArray();
    }

    private static string Normalize(string json, string text) => TextNormalizer.FromJson(JsonNode.Parse(json), Fields, "normalizer")!.Normalize(text);

    [Theory]
    // The example of HF's SplitDelimiterBehavior documentation.
    [InlineData("Removed", new[] { "the", "final", "countdown" })]
    [InlineData("Isolated", new[] { "the", "-", "final", "-", "-", "countdown" })]
    [InlineData("MergedWithPrevious", new[] { "the-", "final-", "-", "countdown" })]
    [InlineData("MergedWithNext", new[] { "the", "-final", "-", "-countdown" })]
    [InlineData("Contiguous", new[] { "the", "-", "final", "--", "countdown" })]
    public void Split_behaviours(string behavior, string[] expected)
    {
        Assert.Equal(expected, PreTokenize($$"""{"type": "Split", "pattern": {"String": "-"}, "behavior": "{{behavior}}", "invert": false}""", "the-final--countdown"));
    }

    [Fact]
    public void Llama3_style_regex_split()
    {
        const string json = """
            {"type": "Split", "behavior": "Isolated", "invert": false, "pattern": {"Regex":
              "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}}
            """;
        Assert.Equal(["Hello", " world", " ", "123", "45", "!!\n\n", " ", " x", "'S"], PreTokenize(json, "Hello world 12345!!\n\n  x'S"));
    }

    [Fact]
    public void Digits_metaspace_whitespace_and_sequences()
    {
        Assert.Equal(["Call ", "123", " please"], PreTokenize("""{"type": "Digits", "individual_digits": false}""", "Call 123 please"));
        Assert.Equal(["Call ", "1", "2", "3", " please"], PreTokenize("""{"type": "Digits", "individual_digits": true}""", "Call 123 please"));
        Assert.Equal(["▁Hey", "▁friend!"], PreTokenize("""{"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true}""", "Hey friend!"));
        Assert.Equal(["▁Hey▁friend!"], PreTokenize("""{"type": "Metaspace", "replacement": "▁", "add_prefix_space": true, "split": false}""", "Hey friend!"));
        Assert.Equal(["Hey", "friend", "!", "How", "'", "s"], PreTokenize("""{"type": "Whitespace"}""", "Hey friend!  How's"));
        Assert.Equal(["Hey", "friend!"], PreTokenize("""{"type": "WhitespaceSplit"}""", " Hey   friend! "));
        // HF's ByteLevel prefixes a space to every piece it receives, including each isolated digit.
        Assert.Equal(["ĠHello", "Ġ", "Ġ1", "Ġ2"],
            PreTokenize("""{"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, {"type": "ByteLevel", "add_prefix_space": true}]}""", "Hello 12"));
    }

    [Fact]
    public void Split_with_the_gpt2_pattern_equals_the_gpt2_regex()
    {
        var json = """{"type": "Split", "behavior": "Isolated", "invert": false, "pattern": {"Regex": PATTERN}}"""
            .Replace("PATTERN", System.Text.Json.JsonSerializer.Serialize(Gpt2Split.Pattern));
        var regex = new System.Text.RegularExpressions.Regex(Gpt2Split.Pattern);
        // Plus random strings over the characters where the pattern's alternatives compete.
        const string alphabet = "aZ19 \n\t\r'sdlrevm.,!é中\u00A0\u2003٣";
        var rng = new Random(3);
        var fuzz = Enumerable.Range(0, 500).Select(_ => new string(Enumerable.Range(0, rng.Next(1, 30)).Select(_ => alphabet[rng.Next(alphabet.Length)]).ToArray()));
        foreach (var text in HFTokenizerUnitTests.RoundTripTexts.Concat(HFTokenizerUnitTests.Corpus.Take(50)).Concat(fuzz))
        {
            if (text.Any(char.IsSurrogate)) continue;   // .NET Regex differs there (see Gpt2Split)
            Assert.Equal(regex.Matches(text).Select(m => m.Value), PreTokenize(json, text));
        }
    }

    [Fact]
    public void Gpt2_split_handles_supplementary_plane_letters_as_letters()
    {
        // 𝐀𝐁 are letters (Lu) outside the BMP: one word with the preceding space, as in HF's Oniguruma regex.
        var words = new List<(int, int)>();
        Gpt2Split.Split("a 𝐀𝐁 😀😀 x", words);
        Assert.Equal([(0, 1), (1, 5), (6, 5), (11, 2)], words);
    }

    [Fact]
    public void Normalizers()
    {
        Assert.Equal("é", Normalize("""{"type": "NFC"}""", "e\u0301"));
        Assert.Equal("e\u0301", Normalize("""{"type": "NFD"}""", "é"));
        Assert.Equal("fi2", Normalize("""{"type": "NFKC"}""", "ﬁ²"));
        Assert.Equal("hello wörld", Normalize("""{"type": "Lowercase"}""", "HeLLo WÖRLD"));
        Assert.Equal("resume", Normalize("""{"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "StripAccents"}]}""", "résumé"));
        Assert.Equal("a b", Normalize("""{"type": "Strip", "strip_left": true, "strip_right": true}""", "  a b \n"));
        Assert.Equal("▁Hey▁you", Normalize("""{"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}""", "Hey you"));
        Assert.Equal("a b c", Normalize("""{"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "}""", "a \t b\n\nc"));
        Assert.Equal(" 中  国  hello", Normalize("""{"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true}""", "中国\tHéllo"));
    }
}

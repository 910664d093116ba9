using System.Text;
using AdapterFlow.IO;

namespace AdapterFlow.Tests.Tokenizers;

/// <summary>Tokenizer behaviour that needs no shared files: training, save/load, streaming, added-token flags, errors.</summary>
public class HFTokenizerUnitTests
{
    internal static readonly string[] Corpus = BuildCorpus();

    private static string[] BuildCorpus()
    {
        var lines = new List<string>
        {
            "The quick brown fox jumps over the lazy dog.",
            "Once upon a time there was a little model that wanted to learn.",
            "def add(a, b):\n    return a + b\n",
            "for (int i = 0; i < 10; i++) { total += i; }",
            "Question: What is 15% of 80?\nAnswer: 12",
            "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
        };
        var rng = new Random(7);
        string[] words = ["the", "model", "learns", "to", "add", "numbers", "and", "answer", "questions", "about", "math", "quickly", "tokens", "training"];
        for (var i = 0; i < 300; i++)
            lines.Add(string.Join(' ', Enumerable.Range(0, 8).Select(_ => words[rng.Next(words.Length)])) + (i % 3 == 0 ? "." : "!"));
        return lines.ToArray();
    }

    private static readonly Lazy<HFTokenizer> Trained = new(() => ByteLevelBpeTrainer.Train(Corpus, 600));

    internal static readonly string[] RoundTripTexts =
    [
        "", " ", "Hello, world!", "   leading and trailing   ", "line one\nline two\r\n\ttabbed\n\n",
        "Emoji: 😀🎉👍🏽 ❤️", "你好，世界！", "Ελληνικά και 한국어", "Café naïve Ångström", "<s>literal special</s><pad>",
        "numbers 3.14159 and -42 and 1,000,000", "'s 're 've 'll 'd n't", "\u00A0non-breaking\u2003em space\u3000ideographic",
        "𝐀𝐁𝐂 mathematical letters 𠀀", "\u0000control\u0001chars\u007F",
    ];

    [Fact]
    public void Trained_tokenizer_round_trips_any_text()
    {
        var tokenizer = Trained.Value;
        var rng = new Random(11);
        var texts = RoundTripTexts.ToList();
        for (var i = 0; i < 50; i++)
        {
            var sb = new StringBuilder();
            for (var k = 0; k < 30; k++)
            {
                int cp;
                do cp = rng.Next(3) == 0 ? rng.Next(0x20, 0x7F) : rng.Next(0, 0x10FFFF); while (cp is >= 0xD800 and <= 0xDFFF);
                sb.Append(char.ConvertFromUtf32(cp));
            }
            texts.Add(sb.ToString());
        }
        foreach (var text in texts)
        {
            var ids = tokenizer.Encode(text);
            Assert.Equal(text, tokenizer.Decode(ids));
            Assert.All(ids, id => Assert.InRange(id, 0, tokenizer.VocabSize - 1));
        }
    }

    [Fact]
    public void Trained_tokenizer_learns_merges_and_has_special_tokens()
    {
        var tokenizer = Trained.Value;
        // The corpus is small: merges stop when no pair occurs twice, below the requested 600.
        Assert.InRange(tokenizer.VocabSize, 320, 600);
        Assert.Equal(400, ByteLevelBpeTrainer.Train(Corpus, 400, minFrequency: 1).VocabSize);
        Assert.Equal((0, 1, 2), (tokenizer.BosTokenId, tokenizer.EosTokenId, tokenizer.PadTokenId));
        Assert.Equal(("<s>", "</s>", "<pad>"), (tokenizer.BosToken, tokenizer.EosToken, tokenizer.PadToken));
        Assert.True(tokenizer.IsSpecialToken(1));
        Assert.False(tokenizer.IsSpecialToken(100));
        // Frequent words became single tokens: far fewer ids than bytes.
        var sentence = "the model learns to answer questions about math";
        var ids = tokenizer.Encode(sentence);
        Assert.True(ids.Count <= 10, $"{ids.Count} ids for {sentence.Length} bytes");
        Assert.Equal("Ġmodel", tokenizer.IdToToken(tokenizer.Encode(" model").Single()));
        // Special tokens in text are recognised; add_special_tokens prepends BOS.
        Assert.Equal([0, .. tokenizer.Encode("hi"), 1], tokenizer.Encode("hi</s>", addSpecialTokens: true));
        Assert.Equal("hi", tokenizer.Decode(tokenizer.Encode("<s>hi</s>"), skipSpecialTokens: true));
    }

    [Fact]
    public void Trainer_rejects_bad_arguments()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => ByteLevelBpeTrainer.Train(Corpus, 100));
        Assert.Throws<ArgumentException>(() => ByteLevelBpeTrainer.Train(Corpus, 400, ["<s>", "<s>"]));
        Assert.Throws<ArgumentException>(() => ByteLevelBpeTrainer.Train(Corpus, 400, ["a"]));
    }

    [Fact]
    public void Save_then_FromDirectory_gives_identical_encodings()
    {
        var dir = Path.Combine(Path.GetTempPath(), "af-tok-" + Guid.NewGuid().ToString("N"));
        try
        {
            Trained.Value.Save(dir);
            Assert.True(File.Exists(Path.Combine(dir, "tokenizer.json")));
            Assert.True(File.Exists(Path.Combine(dir, "tokenizer_config.json")));
            var loaded = HFTokenizer.FromDirectory(dir);
            Assert.Equal(Trained.Value.VocabSize, loaded.VocabSize);
            Assert.Equal((Trained.Value.BosTokenId, Trained.Value.EosTokenId, Trained.Value.PadTokenId), (loaded.BosTokenId, loaded.EosTokenId, loaded.PadTokenId));
            foreach (var text in RoundTripTexts.Concat(Corpus.Take(20)))
            {
                Assert.Equal(Trained.Value.EncodeWithTokens(text, true), loaded.EncodeWithTokens(text, true), TokenizedTextComparer.Instance);
                Assert.Equal(text, loaded.Decode(loaded.Encode(text)));
            }
            var config = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "tokenizer_config.json")))!;
            Assert.Equal("PreTrainedTokenizerFast", (string?)config["tokenizer_class"]);
            Assert.Equal("</s>", (string?)config["eos_token"]);
        }
        finally
        {
            if (Directory.Exists(dir)) Directory.Delete(dir, true);
        }
    }

    [Fact]
    public void Streaming_decoder_emits_only_whole_characters()
    {
        var tokenizer = Trained.Value;
        // Rare characters stay split into byte tokens, so one character spans several ids.
        const string text = "ok 😀 日本 é!";
        var ids = tokenizer.Encode(text);
        Assert.True(ids.Count > text.Length / 2);
        var stream = tokenizer.CreateStreamingDecoder();
        var pieces = ids.Select(stream.Append).Append(stream.Flush()).ToList();
        Assert.Equal(text, string.Concat(pieces));
        Assert.All(pieces, p => Assert.DoesNotContain('\uFFFD', p));
        Assert.All(pieces, p => Assert.True(p.Length == 0 || (!char.IsLowSurrogate(p[0]) && !char.IsHighSurrogate(p[^1]))));
        // The emoji's four byte tokens: nothing is emitted until the last one.
        var emoji = tokenizer.Encode("😀");
        Assert.Equal(4, emoji.Count);
        stream.Reset();
        Assert.Equal(["", "", "", "😀"], emoji.Select(stream.Append).ToArray());
        Assert.Equal("", stream.Flush());
    }

    [Fact]
    public void Streaming_decoder_flushes_an_incomplete_character_as_replacement()
    {
        var tokenizer = Trained.Value;
        var emoji = tokenizer.Encode("😀");
        var stream = tokenizer.CreateStreamingDecoder();
        Assert.Equal("", stream.Append(emoji[0]) + stream.Append(emoji[1]));
        Assert.Equal(tokenizer.Decode([emoji[0], emoji[1]]), stream.Flush());
    }

    private const string TinyVocab = """
        {"a":0,"b":1,"c":2,"ab":3,"abc":4,"x":5,"<unk>":6,"Ġ":7,"t":8,"ca":9,"cat":10}
        """;

    private static HFTokenizer Tiny(string addedTokens = "[]", bool ignoreMerges = false, string preTokenizer = "null") =>
        HFTokenizer.FromJson($$$"""
            {"added_tokens": {{{addedTokens}}}, "normalizer": null, "pre_tokenizer": {{{preTokenizer}}}, "post_processor": null, "decoder": null,
             "model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": true, "ignore_merges": {{{(ignoreMerges ? "true" : "false")}}},
                       "vocab": {{{TinyVocab}}}, "merges": ["a b", ["c", "a"], "ca t"]}}
            """);

    [Fact]
    public void Bpe_merges_by_rank_fuses_unknowns_and_honours_ignore_merges()
    {
        var plain = Tiny();
        Assert.Equal([3, 2], plain.Encode("abc"));            // "abc" is in the vocab but no merge makes it
        Assert.Equal([4], Tiny(ignoreMerges: true).Encode("abc"));
        Assert.Equal([3, 6, 5], plain.Encode("abqqx"));       // q q fused into one <unk>
        Assert.Equal([10], plain.Encode("cat"));
    }

    [Fact]
    public void Added_token_flags_lstrip_rstrip_single_word()
    {
        var tokenizer = Tiny("""
            [{"id": 11, "content": "<m>", "lstrip": true, "rstrip": false, "single_word": false, "normalized": false, "special": true},
             {"id": 12, "content": "tt", "lstrip": false, "rstrip": true, "single_word": true, "normalized": false, "special": false}]
            """, preTokenizer: """{"type": "WhitespaceSplit"}""");
        var lstrip = tokenizer.EncodeWithTokens("ab   <m>x");
        Assert.Equal([3, 11, 5], lstrip.Ids);
        Assert.Equal(["ab", "   <m>", "x"], lstrip.Tokens);
        var singleWord = tokenizer.EncodeWithTokens("tt  xtt tt");
        Assert.Equal([12, 5, 8, 8, 12], singleWord.Ids);       // "xtt" has tt inside a word: not the added token
        Assert.Equal(["tt  ", "x", "t", "t", "tt"], singleWord.Tokens);
        Assert.True(tokenizer.IsSpecialToken(11));
        Assert.False(tokenizer.IsSpecialToken(12));
        Assert.Equal(13, tokenizer.VocabSize);
    }

    [Theory]
    [InlineData("{not json", "not valid JSON")]
    [InlineData("""{"model": {"type": "WordPiece", "vocab": {}}}""", "model.type")]
    [InlineData("""{"model": {"type": "BPE", "merges": []}}""", "model.vocab is missing")]
    [InlineData("""{"model": {"type": "BPE", "vocab": {"a": 0}}}""", "model.merges is missing")]
    [InlineData("""{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a z"]}}""", "model.merges[0]")]
    [InlineData("""{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a"]}}""", "model.merges[0]")]
    [InlineData("""{"pre_tokenizer": {"type": "Mystery"}, "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}""", "pre_tokenizer.type")]
    [InlineData("""{"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits"}, {"type": "Nope"}]}, "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}""", "pre_tokenizer.pretokenizers[1].type")]
    [InlineData("""{"normalizer": {"type": "Precompiled"}, "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}""", "normalizer.type")]
    [InlineData("""{"decoder": {"type": "CTC"}, "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}""", "decoder.type")]
    [InlineData("""{"model": {"type": "BPE", "vocab": {"a": "zero"}, "merges": []}}""", "model.vocab[\"a\"]")]
    [InlineData("""{"added_tokens": [{"id": 3}], "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}""", "added_tokens[0].content")]
    public void Malformed_tokenizer_json_gives_one_line_error_naming_file_and_field(string json, string expected)
    {
        var path = Path.Combine(Path.GetTempPath(), $"af-bad-{Guid.NewGuid():N}.json");
        File.WriteAllText(path, json);
        try
        {
            var e = Assert.Throws<InvalidDataException>(() => HFTokenizer.FromFile(path));
            Assert.Contains(path, e.Message);
            Assert.Contains(expected, e.Message);
            Assert.DoesNotContain('\n', e.Message);
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public void Missing_files_give_file_not_found()
    {
        Assert.Throws<FileNotFoundException>(() => HFTokenizer.FromFile("/nonexistent/tokenizer.json"));
        var dir = Directory.CreateTempSubdirectory("af-empty-").FullName;
        try { Assert.Throws<FileNotFoundException>(() => HFTokenizer.FromDirectory(dir)); }
        finally { Directory.Delete(dir); }
    }
}

internal sealed class TokenizedTextComparer : IEqualityComparer<TokenizedText>
{
    public static readonly TokenizedTextComparer Instance = new();
    public bool Equals(TokenizedText? x, TokenizedText? y) => x is not null && y is not null && x.Ids.SequenceEqual(y.Ids) && x.Tokens.SequenceEqual(y.Tokens);
    public int GetHashCode(TokenizedText obj) => obj.Ids.Length;
}

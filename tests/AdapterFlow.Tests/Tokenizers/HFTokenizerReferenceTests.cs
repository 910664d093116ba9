using AdapterFlow.IO;
using Xunit.Abstractions;

namespace AdapterFlow.Tests.Tokenizers;

/// <summary>
/// The 9 real tokenizers of shared/tokenizers against the HF tokenizers library: ids, tokens, decode and
/// decode(skip_special_tokens) for 43 texts, without and with special tokens.
/// </summary>
public class HFTokenizerReferenceTests(ITestOutputHelper output)
{
    public static IEnumerable<object[]> FolderAndText() =>
        from folder in TokenizerReference.Folders
        from index in Enumerable.Range(0, TokenizerReference.TextCount)
        select new object[] { folder, index };

    public static IEnumerable<object[]> FolderNames() => TokenizerReference.Folders.Select(f => new object[] { f });

    [SkippableTheory]
    [MemberData(nameof(FolderAndText))]
    public void Matches_hf_tokenizers(string folder, int textIndex)
    {
        var tokenizer = TokenizerReference.Load(folder);
        var cases = TokenizerReference.Cases(folder);
        Assert.Equal(2 * TokenizerReference.TextCount, cases.Length);
        foreach (var expected in cases.Skip(2 * textIndex).Take(2))
        {
            var problems = TokenizerReference.Compare(tokenizer, expected);
            Assert.True(problems.Count == 0, $"{folder}/{expected.Id} add_special_tokens={expected.AddSpecialTokens}: {string.Join("; ", problems)}");
        }
    }

    [SkippableTheory]
    [MemberData(nameof(FolderNames))]
    public void All_reference_lines_pass(string folder)
    {
        var tokenizer = TokenizerReference.Load(folder);
        var cases = TokenizerReference.Cases(folder);
        var failures = cases.Select(c => (c, p: TokenizerReference.Compare(tokenizer, c))).Where(x => x.p.Count > 0).ToList();
        output.WriteLine($"{folder}: {cases.Length - failures.Count}/{cases.Length} reference lines identical");
        foreach (var (c, p) in failures.Take(5)) output.WriteLine($"  {c.Id} special={c.AddSpecialTokens}: {string.Join("; ", p)}");
        Assert.Empty(failures);
    }

    [SkippableTheory]
    [MemberData(nameof(FolderNames))]
    public void Vocab_sizes_match_the_library(string folder)
    {
        var tokenizer = TokenizerReference.Load(folder);
        var meta = System.Text.Json.JsonDocument.Parse(File.ReadAllText(SharedFiles.Require("tokenizers", folder, "reference.meta.json")));
        Assert.Equal(meta.RootElement.GetProperty("vocab_size_with_added").GetInt32(), tokenizer.VocabSize);
    }
}

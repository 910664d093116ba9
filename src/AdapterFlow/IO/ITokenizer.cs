namespace AdapterFlow.IO;

/// <summary>What generation, training and evaluation need from a tokenizer.</summary>
public interface ITokenizer
{
    /// <summary>Total number of ids, added tokens included.</summary>
    int VocabSize { get; }

    int? BosTokenId { get; }
    int? EosTokenId { get; }
    int? PadTokenId { get; }

    /// <summary>Ids of <paramref name="text"/>; with <paramref name="addSpecialTokens"/> the post-processor's BOS/EOS are added.</summary>
    IReadOnlyList<int> Encode(string text, bool addSpecialTokens = false);

    /// <summary>Text of <paramref name="ids"/>, optionally without special tokens.</summary>
    string Decode(IReadOnlyList<int> ids, bool skipSpecialTokens = false);

    /// <summary>True for special (control) tokens such as BOS, EOS, pad.</summary>
    bool IsSpecialToken(int id);
}

using AdapterFlow.IO;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Adapters.PromptTuning;

/// <summary>Prompt tuning's virtual token embeddings [num_virtual_tokens, token_dim] (PEFT's PromptEmbedding).</summary>
public sealed class PromptEmbedding : nn.Module
{
    public Embedding embedding;

    public PromptEmbedding(PromptTuningConfig config, Tensor wordEmbeddings, ITokenizer? tokenizer) : base(nameof(PromptEmbedding))
    {
        int n = config.NumVirtualTokens;
        long dim = wordEmbeddings.shape[1];
        embedding = nn.Embedding(n, dim, device: wordEmbeddings.device, dtype: wordEmbeddings.dtype);
        register_module("embedding", embedding);
        using var no = torch.no_grad();
        switch (config.PromptTuningInit)
        {
            case "TEXT":
                if (string.IsNullOrEmpty(config.PromptTuningInitText))
                    throw new ArgumentException($"{config.Source}: prompt_tuning_init TEXT needs prompt_tuning_init_text");
                if (tokenizer is null)
                    throw new ArgumentException($"{config.Source}: prompt_tuning_init TEXT needs a tokenizer");
                var ids = tokenizer.Encode(config.PromptTuningInitText).Select(i => (long)i).ToArray();
                if (ids.Length == 0) throw new ArgumentException($"{config.Source}: prompt_tuning_init_text encodes to no tokens");
                // As PEFT: repeat the text's tokens until there are enough, then cut to num_virtual_tokens.
                var repeated = Enumerable.Range(0, n).Select(i => ids[i % ids.Length]).ToArray();
                using (var index = torch.tensor(repeated, device: wordEmbeddings.device))
                    embedding.weight!.copy_(wordEmbeddings.index_select(0, index));
                break;
            case "SAMPLE_VOCAB":
                using (var index = torch.randint(0, wordEmbeddings.shape[0], [n], dtype: ScalarType.Int64, device: wordEmbeddings.device))
                    embedding.weight!.copy_(wordEmbeddings.index_select(0, index));
                break;
            // RANDOM keeps nn.Embedding's N(0, 1) initialisation, as PEFT.
        }
    }

    /// <summary>The virtual tokens for a batch: [batch, n, dim].</summary>
    public Tensor ForBatch(long batch) => embedding.weight!.unsqueeze(0).expand(batch, -1, -1);
}

using System.Text.Json.Nodes;
using AdapterFlow.Models;

namespace AdapterFlow.Bench;

/// <summary>The project's benchmark model: a LLaMA of 109.5M parameters (hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000, tied).</summary>
public static class BenchModels
{
    public static JsonObject Llama110MConfigJson() => new()
    {
        ["architectures"] = new JsonArray("LlamaForCausalLM"),
        ["model_type"] = "llama",
        ["hidden_size"] = 768,
        ["intermediate_size"] = 2048,
        ["num_hidden_layers"] = 12,
        ["num_attention_heads"] = 12,
        ["num_key_value_heads"] = 12,
        ["vocab_size"] = 32000,
        ["max_position_embeddings"] = 2048,
        ["rms_norm_eps"] = 1e-5,
        ["tie_word_embeddings"] = true,
        ["bos_token_id"] = 1,
        ["eos_token_id"] = 2,
    };

    public static ModelConfig Llama110M() => AutoModel.ParseConfig(Llama110MConfigJson(), "bench:llama-110m");
}

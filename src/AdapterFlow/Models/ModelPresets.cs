using System.Text.Json.Nodes;

namespace AdapterFlow.Models;

/// <summary>Token ids a model config must agree with its tokenizer on.</summary>
public sealed record SpecialTokenIds(int? Bos, int? Eos, int? Pad);

/// <summary>
/// Ready-made sizes for fresh (randomly initialised) models of each family. A preset is expressed as the
/// Hugging Face config.json the family would read, so the family's own parser fills its defaults and
/// validates it, and the saved config is what transformers itself would load.
/// </summary>
public static class ModelPresets
{
    /// <summary>
    /// Preset names: <c>tiny</c> (~1M parameters, for tests), <c>small</c> (~10–30M, quick experiments) and <c>base</c>
    /// (the project's benchmark shape: hidden 768, 12 layers, 12 heads, MLP 2048 for LLaMA; 109.5M parameters with a
    /// 32,000-token vocabulary and a tied head).
    /// </summary>
    public static IReadOnlyList<string> Names { get; } = ["tiny", "small", "base"];

    /// <summary>Architecture names accepted by <see cref="CreateConfigJson"/> (command-line spelling).</summary>
    public static IReadOnlyList<string> Architectures { get; } = ["llama", "mistral", "qwen2", "gpt2", "opt", "bloom", "gptj", "gpt-neox"];

    /// <summary>The Hugging Face <c>model_type</c> for an architecture name ("gpt-neox" → "gpt_neox").</summary>
    public static string ModelTypeOf(string architecture)
    {
        var normalized = architecture.Trim().ToLowerInvariant().Replace('_', '-');
        if (!Architectures.Contains(normalized))
            throw new ArgumentException($"unknown architecture '{architecture}' (choose from {string.Join(", ", Architectures)})");
        return normalized.Replace('-', '_');
    }

    /// <summary>Shape of one preset before the family-specific key names are applied.</summary>
    private sealed record Shape(int Hidden, int Layers, int Heads, int KvHeads, int Context, double MlpRatio);

    private static Shape ShapeOf(string preset, bool groupedQuery) => preset.Trim().ToLowerInvariant() switch
    {
        // tiny: 4 layers of width 128 ≈ 0.8–1M parameters with a ~500-token vocabulary.
        "tiny" => new Shape(Hidden: 128, Layers: 4, Heads: 4, KvHeads: groupedQuery ? 2 : 4, Context: 512, MlpRatio: 4),
        // small: 8 layers of width 384 ≈ 15–25M parameters (depending on the family's MLP and the vocabulary).
        "small" => new Shape(Hidden: 384, Layers: 8, Heads: 6, KvHeads: groupedQuery ? 2 : 6, Context: 1024, MlpRatio: 4),
        // base: the benchmark model's shape (multi-head attention, no grouped queries, as the benchmark LLaMA).
        "base" => new Shape(Hidden: 768, Layers: 12, Heads: 12, KvHeads: 12, Context: 2048, MlpRatio: 4),
        _ => throw new ArgumentException($"unknown preset '{preset}' (choose from {string.Join(", ", Names)})"),
    };

    /// <summary>
    /// The config.json of a fresh model: <paramref name="architecture"/> as in <see cref="Architectures"/>,
    /// <paramref name="vocabSize"/> and special ids from the tokenizer it will be paired with.
    /// </summary>
    public static JsonObject CreateConfigJson(string architecture, string preset, int vocabSize, SpecialTokenIds special)
    {
        if (vocabSize < 1) throw new ArgumentException($"vocab size must be positive, got {vocabSize}");
        var modelType = ModelTypeOf(architecture);
        bool gqa = modelType is "llama" or "mistral" or "qwen2";
        var s = ShapeOf(preset, gqa);
        int headDim = s.Hidden / s.Heads;
        // SwiGLU families have three MLP matrices: 8/3 · hidden keeps the MLP the size of a 4x two-matrix MLP
        // (LLaMA's choice), rounded up to a multiple of 32.
        int swiglu = (int)Math.Ceiling(s.Hidden * 8.0 / 3 / 32) * 32;
        int ffn = (int)(s.Hidden * s.MlpRatio);
        var json = new JsonObject { ["model_type"] = modelType };
        switch (modelType)
        {
            case "llama":
            case "mistral":
            case "qwen2":
                json["architectures"] = new JsonArray(modelType switch
                {
                    "llama" => "LlamaForCausalLM",
                    "mistral" => "MistralForCausalLM",
                    _ => "Qwen2ForCausalLM",
                });
                json["hidden_size"] = s.Hidden;
                json["num_hidden_layers"] = s.Layers;
                json["num_attention_heads"] = s.Heads;
                json["num_key_value_heads"] = s.KvHeads;
                json["head_dim"] = headDim;
                json["intermediate_size"] = swiglu;
                json["max_position_embeddings"] = s.Context;
                json["hidden_act"] = "silu";
                json["rms_norm_eps"] = 1e-6;
                json["rope_theta"] = modelType == "qwen2" ? 1000000.0 : 10000.0;
                // Small Qwen2 checkpoints tie the head; LLaMA and Mistral do not, except the base preset, which is the
                // benchmark model (tied, so the head is not a second 32000 × 768 matrix).
                json["tie_word_embeddings"] = modelType == "qwen2" || preset.Trim().ToLowerInvariant() == "base";
                if (modelType == "mistral") json["sliding_window"] = s.Context / 2;
                if (modelType == "qwen2")
                {
                    json["use_sliding_window"] = false;
                    json["sliding_window"] = null;
                }
                break;
            case "gpt2":
                json["architectures"] = new JsonArray("GPT2LMHeadModel");
                json["n_embd"] = s.Hidden;
                json["n_layer"] = s.Layers;
                json["n_head"] = s.Heads;
                json["n_positions"] = s.Context;
                json["n_inner"] = ffn;
                json["activation_function"] = "gelu_new";
                json["layer_norm_epsilon"] = 1e-5;
                json["tie_word_embeddings"] = true;
                break;
            case "opt":
                json["architectures"] = new JsonArray("OPTForCausalLM");
                json["hidden_size"] = s.Hidden;
                json["word_embed_proj_dim"] = s.Hidden;
                json["num_hidden_layers"] = s.Layers;
                json["num_attention_heads"] = s.Heads;
                json["ffn_dim"] = ffn;
                json["max_position_embeddings"] = s.Context;
                json["activation_function"] = "relu";
                json["do_layer_norm_before"] = true;
                json["enable_bias"] = true;
                json["layer_norm_elementwise_affine"] = true;
                json["tie_word_embeddings"] = true;
                break;
            case "bloom":
                // BLOOM's MLP is fixed at 4 x hidden and it has no position table (ALiBi).
                json["architectures"] = new JsonArray("BloomForCausalLM");
                json["hidden_size"] = s.Hidden;
                json["n_layer"] = s.Layers;
                json["n_head"] = s.Heads;
                json["layer_norm_epsilon"] = 1e-5;
                json["apply_residual_connection_post_layernorm"] = false;
                json["tie_word_embeddings"] = true;
                break;
            case "gptj":
                // GPT-J rotates a quarter of each head (GPT-J-6B: 64 of 256).
                json["architectures"] = new JsonArray("GPTJForCausalLM");
                json["n_embd"] = s.Hidden;
                json["n_layer"] = s.Layers;
                json["n_head"] = s.Heads;
                json["n_positions"] = s.Context;
                json["n_inner"] = ffn;
                json["rotary_dim"] = Math.Max(2, headDim / 4);
                json["activation_function"] = "gelu_new";
                json["layer_norm_epsilon"] = 1e-5;
                json["tie_word_embeddings"] = false;
                break;
            case "gpt_neox":
                json["architectures"] = new JsonArray("GPTNeoXForCausalLM");
                json["hidden_size"] = s.Hidden;
                json["num_hidden_layers"] = s.Layers;
                json["num_attention_heads"] = s.Heads;
                json["intermediate_size"] = ffn;
                json["max_position_embeddings"] = s.Context;
                json["rotary_pct"] = 0.25;
                json["rotary_emb_base"] = 10000.0;
                json["hidden_act"] = "gelu";
                json["layer_norm_eps"] = 1e-5;
                json["use_parallel_residual"] = true;
                json["tie_word_embeddings"] = false;
                break;
        }
        json["vocab_size"] = vocabSize;
        json["initializer_range"] = 0.02;
        json["bos_token_id"] = special.Bos;
        json["eos_token_id"] = special.Eos;
        json["pad_token_id"] = special.Pad;
        json["use_cache"] = true;
        json["dtype"] = "float32";
        return json;
    }

    /// <summary>The typed config of a fresh model (parsed by the family, so its defaults and checks apply).</summary>
    public static ModelConfig CreateConfig(string architecture, string preset, int vocabSize, SpecialTokenIds special) =>
        AutoModel.ParseConfig(CreateConfigJson(architecture, preset, vocabSize, special), $"preset {architecture}/{preset}");
}

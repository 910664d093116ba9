using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Models;

/// <summary>Hugging Face <c>hidden_act</c> names (transformers' ACT2FN) mapped to TorchSharp's fused ops.</summary>
public static class Activations
{
    /// <summary>The names <see cref="Resolve"/> accepts.</summary>
    public static readonly IReadOnlyList<string> Supported =
        ["silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu", "relu", "tanh", "sigmoid"];

    /// <summary>True when <paramref name="name"/> is a supported activation.</summary>
    public static bool IsSupported(string name) => Supported.Contains(name);

    /// <summary>The activation function for a hidden_act name; throws a one-line ArgumentException otherwise.</summary>
    public static Func<Tensor, Tensor> Resolve(string name) => name switch
    {
        "silu" or "swish" => x => nn.functional.silu(x),
        "gelu" => x => nn.functional.gelu(x),
        // gelu_new, gelu_fast and gelu_pytorch_tanh are all the tanh approximation (differing only in how
        // transformers writes the constant), which PyTorch's fused kernel computes.
        "gelu_new" or "gelu_pytorch_tanh" or "gelu_fast" => x => nn.functional.gelu(x, GELU.Approximate.tanh),
        "quick_gelu" => x => x * torch.sigmoid(x * 1.702),
        "relu" => x => nn.functional.relu(x),
        "tanh" => x => torch.tanh(x),
        "sigmoid" => x => torch.sigmoid(x),
        _ => throw new ArgumentException($"hidden_act '{name}' is not supported (supported: {string.Join(", ", Supported)})"),
    };
}

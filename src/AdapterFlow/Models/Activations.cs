using TorchSharp;
using static TorchSharp.torch;
using GeluApproximate = TorchSharp.Modules.GELU.Approximate;

namespace AdapterFlow.Models;

/// <summary>
/// The activation functions transformers' <c>ACT2FN</c> names in configs (<c>activation_function</c>,
/// <c>hidden_act</c>), mapped to fused TorchSharp ops.
/// </summary>
public static class Activations
{
    /// <summary>The names <see cref="Get"/> accepts.</summary>
    public static readonly IReadOnlyList<string> Names =
    [
        "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "relu", "relu2", "relu6", "leaky_relu",
        "silu", "swish", "sigmoid", "tanh", "mish", "linear", "gelu_10",
    ];

    /// <summary>
    /// The activation called <paramref name="name"/>; throws ArgumentException naming the unknown activation.
    /// <c>gelu_new</c>, <c>gelu_fast</c> and <c>gelu_pytorch_tanh</c> are all the tanh approximation of GELU
    /// (they differ only in how transformers writes the formula), so they share PyTorch's fused kernel.
    /// </summary>
    public static Func<Tensor, Tensor> Get(string name) => name switch
    {
        "gelu" => x => nn.functional.gelu(x),
        "gelu_new" or "gelu_fast" or "gelu_pytorch_tanh" => GeluTanh,
        "quick_gelu" => x => x * torch.sigmoid(x * 1.702),
        "relu" => x => nn.functional.relu(x),
        "relu2" => x => nn.functional.relu(x).square(),
        "relu6" => x => nn.functional.relu6(x),
        "leaky_relu" => x => nn.functional.leaky_relu(x, 0.01),
        "silu" or "swish" => x => nn.functional.silu(x),
        "sigmoid" => x => torch.sigmoid(x),
        "tanh" => x => torch.tanh(x),
        "mish" => x => nn.functional.mish(x),
        "linear" => x => x,
        "gelu_10" => x => nn.functional.gelu(x).clamp(-10, 10),
        _ => throw new ArgumentException($"activation '{name}' is not supported (supported: {string.Join(", ", Names)})"),
    };

    /// <summary>The names <see cref="Resolve"/> accepts (same as <see cref="Names"/>; LLaMA-family spelling).</summary>
    public static IReadOnlyList<string> Supported => Names;

    /// <summary>True when <paramref name="name"/> is a supported activation.</summary>
    public static bool IsSupported(string name) => Names.Contains(name);

    /// <summary>Same as <see cref="Get"/>.</summary>
    public static Func<Tensor, Tensor> Resolve(string name) => Get(name);

    /// <summary>GELU with the tanh approximation (GPT-2's gelu_new, BLOOM's gelu).</summary>
    public static Tensor GeluTanh(Tensor x) => nn.functional.gelu(x, approximate: GeluApproximate.tanh);
}

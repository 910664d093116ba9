using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow;

/// <summary>Turns user-facing device and dtype names into TorchSharp values, with one-line errors.</summary>
public static class Devices
{
    /// <summary>"cpu", "cuda" or "cuda:N". Fails clearly when CUDA is asked for but this build or machine has none.</summary>
    public static Device Parse(string name)
    {
        var n = name.Trim().ToLowerInvariant();
        if (n == "cpu") return torch.CPU;
        if (n == "cuda" || n.StartsWith("cuda:", StringComparison.Ordinal))
        {
            int index = 0;
            if (n.Length > 5 && !int.TryParse(n.AsSpan(5), out index))
                throw new ArgumentException($"device '{name}': expected cuda or cuda:N");
            if (!torch.cuda.is_available())
                throw new NotSupportedException(
                    $"device '{name}': CUDA is not available (no CUDA-capable GPU, or TorchSharp was loaded without its CUDA backend); use cpu");
            int count = torch.cuda.device_count();
            if (index < 0 || index >= count)
                throw new ArgumentException($"device '{name}': this machine has {count} CUDA device(s)");
            return torch.device(DeviceType.CUDA, index);
        }
        throw new ArgumentException($"unknown device '{name}' (choose cpu or cuda[:N])");
    }

    /// <summary>"float32", "bfloat16" or "float16" (also "fp32", "bf16", "fp16").</summary>
    public static ScalarType ParseDType(string name) => name.Trim().ToLowerInvariant() switch
    {
        "float32" or "fp32" or "f32" => ScalarType.Float32,
        "bfloat16" or "bf16" => ScalarType.BFloat16,
        "float16" or "fp16" or "f16" or "half" => ScalarType.Float16,
        _ => throw new ArgumentException($"unknown dtype '{name}' (choose float32, bfloat16 or float16)"),
    };

    /// <summary>The lower-case name used in config.json ("float32", "bfloat16", ...).</summary>
    public static string DTypeName(ScalarType type) => type switch
    {
        ScalarType.Float32 => "float32",
        ScalarType.BFloat16 => "bfloat16",
        ScalarType.Float16 => "float16",
        ScalarType.Float64 => "float64",
        _ => type.ToString().ToLowerInvariant(),
    };
}

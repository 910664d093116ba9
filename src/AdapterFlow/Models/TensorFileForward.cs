using AdapterFlow.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Models;

/// <summary>Shape of one file-to-file forward run.</summary>
public sealed record TensorFileForwardResult(long Batch, long Time, long Vocab, bool HadAttentionMask);

/// <summary>
/// Runs a model on token ids stored in a safetensors file and stores the logits in another: the language-
/// neutral way to compare AdapterFlow against transformers (numpy/torch can write and read both files).
/// </summary>
public static class TensorFileForward
{
    /// <summary>
    /// Reads <c>input_ids</c> (integer, [batch, time] or [time]) and the optional <c>attention_mask</c> (same shape,
    /// 0/1) from <paramref name="inputsPath"/>, runs <paramref name="model"/> on its own device and writes
    /// <c>logits</c> (float32, [batch, time, vocab]) to <paramref name="outputPath"/>.
    /// </summary>
    public static TensorFileForwardResult Run(CausalLM model, string inputsPath, string outputPath)
    {
        if (!File.Exists(inputsPath)) throw new FileNotFoundException($"{inputsPath}: inputs file not found");
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        Tensor ids;
        Tensor? mask = null;
        using (var file = SafetensorsFile.Open(inputsPath))
        {
            if (!file.Contains("input_ids"))
                throw new InvalidDataException(
                    $"{inputsPath}: tensor 'input_ids' is missing (found: {(file.Names.Count == 0 ? "none" : string.Join(", ", file.Names.Order()))})");
            ids = AsBatch(file.Load("input_ids"), inputsPath, "input_ids");
            if (file.Contains("attention_mask"))
            {
                mask = AsBatch(file.Load("attention_mask"), inputsPath, "attention_mask");
                if (!mask.shape.SequenceEqual(ids.shape))
                    throw new InvalidDataException(
                        $"{inputsPath}: tensor 'attention_mask' has shape [{string.Join(", ", mask.shape)}], input_ids has [{string.Join(", ", ids.shape)}]");
                if (mask.lt(0).logical_or(mask.gt(1)).any().item<bool>())
                    throw new InvalidDataException($"{inputsPath}: tensor 'attention_mask' must hold only 0 and 1");
            }
        }
        long vocab = model.Config.VocabSize;
        if (ids.numel() > 0)
        {
            long min = ids.min().item<long>(), max = ids.max().item<long>();
            if (min < 0 || max >= vocab)
                throw new InvalidDataException(
                    $"{inputsPath}: tensor 'input_ids' holds id {(min < 0 ? min : max)}, outside the model's vocabulary 0..{vocab - 1}");
        }
        var device = model.Device;
        var logits = model.Logits(ids.to(device), mask?.to(device)).to_type(ScalarType.Float32).cpu();
        var full = Path.GetFullPath(outputPath);
        Directory.CreateDirectory(Path.GetDirectoryName(full)!);
        AtomicFile.Write(full, tmp => SafetensorsWriter.Save(tmp, [new("logits", logits)],
            new Dictionary<string, string> { ["format"] = "pt" }));
        return new TensorFileForwardResult(ids.shape[0], ids.shape[1], logits.shape[2], mask is not null);
    }

    /// <summary>An integer [batch, time] int64 tensor from [time] or [batch, time] of any integer (or bool) dtype.</summary>
    private static Tensor AsBatch(Tensor t, string path, string name)
    {
        if (t.is_floating_point() || t.is_complex())
            throw new InvalidDataException($"{path}: tensor '{name}' must be an integer tensor, got {t.dtype}");
        if (t.dim() == 1) t = t.unsqueeze(0);
        if (t.dim() != 2)
            throw new InvalidDataException($"{path}: tensor '{name}' must be [batch, time] (or [time]), got shape [{string.Join(", ", t.shape)}]");
        if (t.shape[0] == 0 || t.shape[1] == 0)
            throw new InvalidDataException($"{path}: tensor '{name}' is empty (shape [{string.Join(", ", t.shape)}])");
        return t.to_type(ScalarType.Int64);
    }
}

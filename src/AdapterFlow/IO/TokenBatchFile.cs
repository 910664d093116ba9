using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.IO;

/// <summary>
/// Token id sequences stored as one padded batch in a safetensors file — <c>input_ids</c> and
/// <c>attention_mask</c> (int64 [batch, time], right padding) — the input layout of <c>adapterflow forward</c>
/// and of transformers' <c>model(input_ids, attention_mask=...)</c>.
/// </summary>
public static class TokenBatchFile
{
    public static void Save(string path, IReadOnlyList<IReadOnlyList<int>> sequences, int padTokenId)
    {
        if (sequences.Count == 0) throw new ArgumentException($"{path}: no sequences to save");
        int width = sequences.Max(s => s.Count);
        if (width == 0) throw new ArgumentException($"{path}: every sequence is empty");
        var ids = new long[sequences.Count * width];
        var mask = new long[ids.Length];
        for (int r = 0; r < sequences.Count; r++)
        for (int t = 0; t < width; t++)
        {
            bool real = t < sequences[r].Count;
            ids[r * width + t] = real ? sequences[r][t] : padTokenId;
            mask[r * width + t] = real ? 1 : 0;
        }
        using var scope = torch.NewDisposeScope();
        var full = Path.GetFullPath(path);
        Directory.CreateDirectory(Path.GetDirectoryName(full)!);
        AtomicFile.Write(full, tmp => SafetensorsWriter.Save(tmp,
        [
            new("input_ids", torch.tensor(ids, ScalarType.Int64).reshape(sequences.Count, width)),
            new("attention_mask", torch.tensor(mask, ScalarType.Int64).reshape(sequences.Count, width)),
        ], new Dictionary<string, string> { ["format"] = "pt" }));
    }
}

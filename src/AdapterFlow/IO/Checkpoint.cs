using static TorchSharp.torch;

namespace AdapterFlow.IO;

/// <summary>A named set of tensors that can be read one at a time (a safetensors file, a sharded set, a GGUF file...).</summary>
public interface ITensorSource : IDisposable
{
    /// <summary>Used in error messages: the file or folder.</summary>
    string Description { get; }
    IReadOnlyCollection<string> Names { get; }
    Tensor Load(string name);
}

/// <summary>Opens the weights of a Hugging Face model folder (single file or sharded).</summary>
public sealed class Checkpoint : ITensorSource
{
    private readonly Dictionary<string, SafetensorsFile> _owner = new();
    private readonly List<SafetensorsFile> _files = new();

    private Checkpoint(string description) => Description = description;

    public string Description { get; }
    public IReadOnlyCollection<string> Names => _owner.Keys;

    public static Checkpoint Open(string directory)
    {
        var single = Path.Combine(directory, "model.safetensors");
        var checkpoint = new Checkpoint(single);
        if (File.Exists(single))
        {
            checkpoint.Add(SafetensorsFile.Open(single));
            return checkpoint;
        }
        throw new FileNotFoundException($"{directory}: no model.safetensors found");
    }

    private void Add(SafetensorsFile file)
    {
        _files.Add(file);
        foreach (var name in file.Names) _owner[name] = file;
    }

    public Tensor Load(string name) => _owner[name].Load(name);

    public void Dispose()
    {
        foreach (var f in _files) f.Dispose();
    }
}

/// <summary>Writes files so that a reader never sees a half-written one: write to a temp file beside it, then rename.</summary>
public static class AtomicFile
{
    public static void Write(string path, Action<string> writeTo)
    {
        var full = Path.GetFullPath(path);
        var tmp = Path.Combine(Path.GetDirectoryName(full)!, $".{Path.GetFileName(full)}.{Environment.ProcessId}.tmp");
        try
        {
            writeTo(tmp);
            File.Move(tmp, full, overwrite: true);
        }
        finally
        {
            if (File.Exists(tmp)) File.Delete(tmp);
        }
    }

    public static void WriteAllText(string path, string text) => Write(path, tmp => File.WriteAllText(tmp, text));
}

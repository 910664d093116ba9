using System.Text.Json;
using System.Text.Json.Nodes;
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

/// <summary>Opens the weights of a Hugging Face model folder: model.safetensors, or shards listed by model.safetensors.index.json.</summary>
public sealed class Checkpoint : ITensorSource
{
    public const string SingleFile = "model.safetensors";
    public const string IndexFile = "model.safetensors.index.json";

    private readonly Dictionary<string, SafetensorsFile> _owner = new(StringComparer.Ordinal);
    private readonly List<string> _order = new();
    private readonly List<SafetensorsFile> _files = new();

    private Checkpoint(string description) => Description = description;

    public string Description { get; }
    public IReadOnlyCollection<string> Names => _order;

    /// <summary>The safetensors files this checkpoint reads.</summary>
    public IReadOnlyList<string> Files => _files.Select(f => f.Path).ToList();

    /// <summary>
    /// Opens a model folder (model.safetensors, else the sharded index), a single .safetensors file, or an index file.
    /// PyTorch pickle checkpoints are refused with a message on how to convert them.
    /// </summary>
    public static Checkpoint Open(string path)
    {
        if (File.Exists(path))
        {
            if (path.EndsWith(".index.json", StringComparison.OrdinalIgnoreCase)) return OpenIndex(path);
            PickleCheck.ThrowIfPickle(path);
            if (IsGguf(path))
                throw new InvalidDataException($"{path}: this is a GGUF file, not safetensors; open it with ModelFiles.Open (or AutoModel.FromPath)");
            var file = new Checkpoint(path);
            file.AddWhole(SafetensorsFile.Open(path));
            return file;
        }
        if (!Directory.Exists(path)) throw new FileNotFoundException($"{path}: no such file or folder", path);

        var single = Path.Combine(path, SingleFile);
        if (File.Exists(single))
        {
            var checkpoint = new Checkpoint(single);
            checkpoint.AddWhole(SafetensorsFile.Open(single));
            return checkpoint;
        }
        var index = Path.Combine(path, IndexFile);
        if (File.Exists(index)) return OpenIndex(index);

        foreach (var pickle in new[] { "pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "consolidated.00.pth" })
        {
            var p = Path.Combine(path, pickle);
            if (File.Exists(p)) throw new InvalidDataException(PickleCheck.RefusalMessage(p));
        }
        throw new FileNotFoundException($"{path}: no {SingleFile} or {IndexFile} found (expected a Hugging Face model folder with safetensors weights)");
    }

    /// <summary>Opens the shards listed by a model.safetensors.index.json (its <c>weight_map</c>: tensor name → shard file).</summary>
    public static Checkpoint OpenIndex(string indexPath)
    {
        JsonObject json;
        try
        {
            json = JsonNode.Parse(File.ReadAllText(indexPath)) as JsonObject
                   ?? throw new InvalidDataException($"{indexPath}: must hold a JSON object");
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{indexPath}: invalid JSON ({e.Message})");
        }
        if (json["weight_map"] is not JsonObject weightMap)
            throw new InvalidDataException($"{indexPath}: 'weight_map' (tensor name → shard file) is missing or not an object");

        var folder = Path.GetDirectoryName(Path.GetFullPath(indexPath))!;
        var checkpoint = new Checkpoint(indexPath);
        var shards = new Dictionary<string, SafetensorsFile>(StringComparer.Ordinal);
        try
        {
            foreach (var (name, value) in weightMap)
            {
                string shard;
                try { shard = value?.GetValue<string>() ?? throw new InvalidOperationException(); }
                catch (Exception) { throw new InvalidDataException($"{indexPath}: weight_map entry '{name}' must be a shard file name, got {value?.ToJsonString() ?? "null"}"); }
                if (Path.IsPathRooted(shard) || shard.Split('/', '\\').Contains(".."))
                    throw new InvalidDataException($"{indexPath}: weight_map entry '{name}' names shard '{shard}' outside the model folder");
                if (!shards.TryGetValue(shard, out var file))
                {
                    var shardPath = Path.Combine(folder, shard);
                    if (!File.Exists(shardPath))
                        throw new FileNotFoundException($"{indexPath}: shard '{shard}' (holding tensor '{name}') is missing from {folder}", shardPath);
                    file = SafetensorsFile.Open(shardPath);
                    shards[shard] = file;
                    checkpoint._files.Add(file);
                }
                if (!file.Contains(name))
                    throw new InvalidDataException($"{indexPath}: tensor '{name}' is listed in shard '{shard}' but that shard does not contain it");
                checkpoint._owner[name] = file;
                checkpoint._order.Add(name);
            }
        }
        catch
        {
            checkpoint.Dispose();
            throw;
        }
        return checkpoint;
    }

    private static bool IsGguf(string path)
    {
        Span<byte> head = stackalloc byte[4];
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read);
        return GgufFile.HasMagic(head[..stream.ReadAtLeast(head, 4, throwOnEndOfStream: false)]);
    }

    private void AddWhole(SafetensorsFile file)
    {
        _files.Add(file);
        foreach (var name in file.Names)
        {
            _owner[name] = file;
            _order.Add(name);
        }
    }

    public bool Contains(string name) => _owner.ContainsKey(name);

    /// <summary>Dtype, shape and location of one tensor without reading it.</summary>
    public SafetensorsEntry Entry(string name) => OwnerOf(name).Entry(name);

    public Tensor Load(string name) => OwnerOf(name).Load(name);

    private SafetensorsFile OwnerOf(string name) =>
        _owner.TryGetValue(name, out var f) ? f : throw new KeyNotFoundException($"{Description}: no tensor named '{name}'");

    public void Dispose()
    {
        foreach (var f in _files) f.Dispose();
        _files.Clear();
    }
}

/// <summary>
/// Recognises PyTorch pickle checkpoints (torch.save: a zip archive, or a bare pickle starting with the 0x80
/// protocol opcode) so that they are refused: unpickling runs arbitrary code, so we never load them.
/// </summary>
public static class PickleCheck
{
    /// <summary>True when the file starts like a pickle stream (0x80, protocol 2..5) or a zip archive ("PK\x03\x04").</summary>
    public static bool IsPickleOrTorchZip(string path)
    {
        Span<byte> head = stackalloc byte[4];
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read);
        int n = stream.ReadAtLeast(head, 4, throwOnEndOfStream: false);
        return IsPickleOrTorchZip(head[..n]);
    }

    public static bool IsPickleOrTorchZip(ReadOnlySpan<byte> head) =>
        (head.Length >= 2 && head[0] == 0x80 && head[1] is >= 2 and <= 5)
        || (head.Length >= 4 && head[0] == (byte)'P' && head[1] == (byte)'K' && head[2] == 3 && head[3] == 4);

    public static string RefusalMessage(string path) =>
        $"{path}: this is a PyTorch pickle checkpoint; AdapterFlow does not load pickle files because unpickling can run arbitrary code. " +
        "Convert it to safetensors first, e.g. in Python: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)";

    /// <summary>Throws the refusal when <paramref name="path"/> is a pickle checkpoint.</summary>
    public static void ThrowIfPickle(string path)
    {
        if (File.Exists(path) && IsPickleOrTorchZip(path)) throw new InvalidDataException(RefusalMessage(path));
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

/// <summary>
/// Writes a folder so that a reader never sees a half-written one: the files go into a temp folder beside it,
/// which then replaces the target (the old one is moved aside first and deleted after).
/// </summary>
public static class AtomicDirectory
{
    public static void Write(string directory, Action<string> writeInto)
    {
        var target = Path.GetFullPath(directory).TrimEnd(Path.DirectorySeparatorChar, Path.AltDirectorySeparatorChar);
        var parent = Path.GetDirectoryName(target)!;
        Directory.CreateDirectory(parent);
        var temp = Path.Combine(parent, $".{Path.GetFileName(target)}.{Environment.ProcessId}.tmp");
        if (Directory.Exists(temp)) Directory.Delete(temp, recursive: true);
        Directory.CreateDirectory(temp);
        try
        {
            writeInto(temp);
            string? old = null;
            if (Directory.Exists(target))
            {
                old = temp + ".old";
                if (Directory.Exists(old)) Directory.Delete(old, recursive: true);
                Directory.Move(target, old);
            }
            Directory.Move(temp, target);
            if (old is not null) Directory.Delete(old, recursive: true);
        }
        finally
        {
            if (Directory.Exists(temp)) Directory.Delete(temp, recursive: true);
        }
    }
}

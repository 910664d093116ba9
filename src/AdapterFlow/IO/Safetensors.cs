using System.IO.MemoryMappedFiles;
using System.Text;
using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.IO;

/// <summary>Name, dtype, shape and byte range of one tensor in a safetensors file.</summary>
public sealed record SafetensorsEntry(string Name, string DType, long[] Shape, long Begin, long End);

/// <summary>
/// A safetensors file opened for lazy reads: the header is parsed up front, tensor bytes are read from a
/// memory map only when asked for. (Minimal first version: header validation and all dtypes are in the IO issue work.)
/// </summary>
public sealed class SafetensorsFile : IDisposable
{
    private readonly MemoryMappedFile _map;
    private readonly MemoryMappedViewAccessor _view;
    private readonly long _dataStart;
    private readonly Dictionary<string, SafetensorsEntry> _entries;

    private SafetensorsFile(string path, MemoryMappedFile map, MemoryMappedViewAccessor view, long dataStart,
        Dictionary<string, SafetensorsEntry> entries, Dictionary<string, string> metadata)
    {
        Path = path;
        _map = map;
        _view = view;
        _dataStart = dataStart;
        _entries = entries;
        Metadata = metadata;
    }

    public string Path { get; }
    public IReadOnlyDictionary<string, string> Metadata { get; }
    public IReadOnlyCollection<string> Names => _entries.Keys;
    public IReadOnlyCollection<SafetensorsEntry> Entries => _entries.Values;
    public bool Contains(string name) => _entries.ContainsKey(name);
    public SafetensorsEntry Entry(string name) =>
        _entries.TryGetValue(name, out var e) ? e : throw new KeyNotFoundException($"{Path}: no tensor named '{name}'");

    public static SafetensorsFile Open(string path)
    {
        var length = new FileInfo(path).Length;
        using var stream = File.OpenRead(path);
        var lenBytes = new byte[8];
        stream.ReadExactly(lenBytes);
        long headerLength = BitConverter.ToInt64(lenBytes);
        var header = new byte[headerLength];
        stream.ReadExactly(header);
        var entries = new Dictionary<string, SafetensorsEntry>();
        var metadata = new Dictionary<string, string>();
        using var doc = JsonDocument.Parse(header);
        foreach (var prop in doc.RootElement.EnumerateObject())
        {
            if (prop.Name == "__metadata__")
            {
                foreach (var m in prop.Value.EnumerateObject()) metadata[m.Name] = m.Value.GetString() ?? "";
                continue;
            }
            var dtype = prop.Value.GetProperty("dtype").GetString()!;
            var shape = prop.Value.GetProperty("shape").EnumerateArray().Select(x => x.GetInt64()).ToArray();
            var offsets = prop.Value.GetProperty("data_offsets").EnumerateArray().Select(x => x.GetInt64()).ToArray();
            entries[prop.Name] = new SafetensorsEntry(prop.Name, dtype, shape, offsets[0], offsets[1]);
        }
        var map = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
        var view = map.CreateViewAccessor(0, length, MemoryMappedFileAccess.Read);
        return new SafetensorsFile(path, map, view, 8 + headerLength, entries, metadata);
    }

    /// <summary>Reads one tensor into a new CPU tensor of the stored dtype, then moves it to <paramref name="device"/>.</summary>
    public unsafe Tensor Load(string name, Device? device = null)
    {
        var e = Entry(name);
        var tensor = torch.empty(e.Shape, ToScalarType(e.DType));
        byte* basePtr = null;
        _view.SafeMemoryMappedViewHandle.AcquirePointer(ref basePtr);
        try
        {
            var source = new ReadOnlySpan<byte>(basePtr + _view.PointerOffset + _dataStart + e.Begin, checked((int)(e.End - e.Begin)));
            source.CopyTo(tensor.bytes);
        }
        finally
        {
            _view.SafeMemoryMappedViewHandle.ReleasePointer();
        }
        return device is null || device.type == DeviceType.CPU ? tensor : tensor.to(device);
    }

    public static ScalarType ToScalarType(string dtype) => dtype switch
    {
        "F64" => ScalarType.Float64,
        "F32" => ScalarType.Float32,
        "F16" => ScalarType.Float16,
        "BF16" => ScalarType.BFloat16,
        "I64" => ScalarType.Int64,
        "I32" => ScalarType.Int32,
        "I16" => ScalarType.Int16,
        "I8" => ScalarType.Int8,
        "U8" => ScalarType.Byte,
        "BOOL" => ScalarType.Bool,
        _ => throw new NotSupportedException($"safetensors dtype '{dtype}' is not supported"),
    };

    public static string FromScalarType(ScalarType type) => type switch
    {
        ScalarType.Float64 => "F64",
        ScalarType.Float32 => "F32",
        ScalarType.Float16 => "F16",
        ScalarType.BFloat16 => "BF16",
        ScalarType.Int64 => "I64",
        ScalarType.Int32 => "I32",
        ScalarType.Int16 => "I16",
        ScalarType.Int8 => "I8",
        ScalarType.Byte => "U8",
        ScalarType.Bool => "BOOL",
        _ => throw new NotSupportedException($"dtype {type} cannot be stored in safetensors"),
    };

    public void Dispose()
    {
        _view.Dispose();
        _map.Dispose();
    }
}

/// <summary>Writes safetensors files.</summary>
public static class SafetensorsWriter
{
    /// <summary>Writes tensors (in the given order) with optional string metadata.</summary>
    public static void Save(string path, IEnumerable<KeyValuePair<string, Tensor>> tensors,
        IReadOnlyDictionary<string, string>? metadata = null)
    {
        var list = tensors.Select(kv => (kv.Key, Tensor: kv.Value.detach().cpu().contiguous())).ToList();
        using var headerStream = new MemoryStream();
        using (var w = new Utf8JsonWriter(headerStream))
        {
            w.WriteStartObject();
            if (metadata is { Count: > 0 })
            {
                w.WritePropertyName("__metadata__");
                w.WriteStartObject();
                foreach (var (k, v) in metadata) w.WriteString(k, v);
                w.WriteEndObject();
            }
            long offset = 0;
            foreach (var (name, t) in list)
            {
                long size = t.NumberOfElements * t.ElementSize;
                w.WritePropertyName(name);
                w.WriteStartObject();
                w.WriteString("dtype", SafetensorsFile.FromScalarType(t.dtype));
                w.WritePropertyName("shape");
                w.WriteStartArray();
                foreach (var d in t.shape) w.WriteNumberValue(d);
                w.WriteEndArray();
                w.WritePropertyName("data_offsets");
                w.WriteStartArray();
                w.WriteNumberValue(offset);
                w.WriteNumberValue(offset + size);
                w.WriteEndArray();
                w.WriteEndObject();
                offset += size;
            }
            w.WriteEndObject();
        }
        var header = headerStream.ToArray().ToList();
        while (header.Count % 8 != 0) header.Add((byte)' ');
        using var file = File.Create(path);
        file.Write(BitConverter.GetBytes((long)header.Count));
        file.Write(header.ToArray());
        foreach (var (_, t) in list) file.Write(t.bytes);
    }
}

using System.IO.MemoryMappedFiles;
using System.Text;
using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.IO;

/// <summary>Name, dtype, shape and byte range (relative to the data region) of one tensor in a safetensors file.</summary>
public sealed record SafetensorsEntry(string Name, string DType, long[] Shape, long Begin, long End)
{
    public long ByteLength => End - Begin;
}

/// <summary>
/// A safetensors file opened for lazy reads: the header is parsed and fully validated up front (any violation is
/// one <see cref="InvalidDataException"/> naming the file and the tensor or field), tensor bytes are copied out of a
/// read-only memory map only when asked for. Format: 8-byte little-endian header length, a UTF-8 JSON header,
/// then the data region, which the tensors must cover exactly (no overlaps, no holes, nothing after the last one).
/// </summary>
public sealed class SafetensorsFile : IDisposable
{
    /// <summary>Largest header accepted (the reference implementation's limit is also 100 MB).</summary>
    public const long MaxHeaderBytes = 100_000_000;

    private readonly MemoryMappedFile _map;
    private readonly MemoryMappedViewAccessor _view;
    private readonly long _dataStart;
    private readonly long _dataLength;
    private readonly Dictionary<string, SafetensorsEntry> _entries;
    private readonly List<string> _order;

    private SafetensorsFile(string path, MemoryMappedFile map, MemoryMappedViewAccessor view, long dataStart, long dataLength,
        Dictionary<string, SafetensorsEntry> entries, List<string> order, Dictionary<string, string> metadata)
    {
        Path = path;
        _map = map;
        _view = view;
        _dataStart = dataStart;
        _dataLength = dataLength;
        _entries = entries;
        _order = order;
        Metadata = metadata;
    }

    public string Path { get; }
    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>Tensor names in header order.</summary>
    public IReadOnlyCollection<string> Names => _order;

    public IReadOnlyCollection<SafetensorsEntry> Entries => _order.Select(n => _entries[n]).ToList();
    public bool Contains(string name) => _entries.ContainsKey(name);

    public SafetensorsEntry Entry(string name) =>
        _entries.TryGetValue(name, out var e) ? e : throw new KeyNotFoundException($"{Path}: no tensor named '{name}'");

    /// <summary>Opens and validates a file; throws <see cref="InvalidDataException"/> for any malformed content.</summary>
    public static SafetensorsFile Open(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: file not found", path);
        var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read);
        try
        {
            long fileLength = stream.Length;
            if (fileLength < 8)
                throw Bad(path, $"file is {fileLength} bytes, too short to hold the 8-byte header length");
            var lenBytes = new byte[8];
            stream.ReadExactly(lenBytes);
            long headerLength = BitConverter.ToInt64(lenBytes);
            if (headerLength < 2 || headerLength > MaxHeaderBytes)
                throw Bad(path, $"header length {headerLength} is not plausible (must be 2..{MaxHeaderBytes} bytes); this is not a safetensors file or it is corrupt");
            if (headerLength > fileLength - 8)
                throw Bad(path, $"header length {headerLength} runs past the end of the file ({fileLength} bytes; truncated?)");
            var header = new byte[headerLength];
            stream.ReadExactly(header);
            long dataLength = fileLength - 8 - headerLength;
            var (entries, order, metadata) = ParseHeader(path, header, dataLength);

            // The file holds at least 10 bytes here, so the mapping is never empty (which would be an error).
            var map = MemoryMappedFile.CreateFromFile(stream, null, 0, MemoryMappedFileAccess.Read, HandleInheritability.None, leaveOpen: false);
            try
            {
                var view = map.CreateViewAccessor(0, fileLength, MemoryMappedFileAccess.Read);
                return new SafetensorsFile(path, map, view, 8 + headerLength, dataLength, entries, order, metadata);
            }
            catch
            {
                map.Dispose();
                throw;
            }
        }
        catch
        {
            stream.Dispose();
            throw;
        }
    }

    private static InvalidDataException Bad(string path, string message) => new($"{path}: {message}");

    private static (Dictionary<string, SafetensorsEntry>, List<string>, Dictionary<string, string>) ParseHeader(
        string path, byte[] header, long dataLength)
    {
        JsonDocument doc;
        try
        {
            // Strict UTF-8 first so that invalid bytes give a clear message rather than a replacement character.
            new UTF8Encoding(false, throwOnInvalidBytes: true).GetCharCount(header);
            doc = JsonDocument.Parse(header, new JsonDocumentOptions { MaxDepth = 16 });
        }
        catch (DecoderFallbackException)
        {
            throw Bad(path, "header is not valid UTF-8");
        }
        catch (JsonException e)
        {
            throw Bad(path, $"header is not valid JSON ({FirstLine(e.Message)})");
        }

        using (doc)
        {
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw Bad(path, $"header must be a JSON object, got {root.ValueKind}");
            var entries = new Dictionary<string, SafetensorsEntry>(StringComparer.Ordinal);
            var order = new List<string>();
            var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
            bool sawMetadata = false;
            foreach (var prop in root.EnumerateObject())
            {
                if (prop.Name == "__metadata__")
                {
                    if (sawMetadata) throw Bad(path, "'__metadata__' appears twice in the header");
                    sawMetadata = true;
                    if (prop.Value.ValueKind != JsonValueKind.Object)
                        throw Bad(path, $"'__metadata__' must be an object of strings, got {prop.Value.ValueKind}");
                    foreach (var m in prop.Value.EnumerateObject())
                    {
                        if (m.Value.ValueKind != JsonValueKind.String)
                            throw Bad(path, $"'__metadata__' entry '{m.Name}' must be a string, got {m.Value.ValueKind}");
                        if (!metadata.TryAdd(m.Name, m.Value.GetString()!))
                            throw Bad(path, $"'__metadata__' entry '{m.Name}' appears twice");
                    }
                    continue;
                }
                var entry = ParseEntry(path, prop.Name, prop.Value);
                if (!entries.TryAdd(prop.Name, entry)) throw Bad(path, $"tensor '{prop.Name}' appears twice in the header");
                order.Add(prop.Name);
            }
            CheckLayout(path, entries.Values, dataLength);
            return (entries, order, metadata);
        }
    }

    private static SafetensorsEntry ParseEntry(string path, string name, JsonElement value)
    {
        string where = $"tensor '{name}'";
        if (value.ValueKind != JsonValueKind.Object)
            throw Bad(path, $"{where}: entry must be an object with dtype, shape and data_offsets, got {value.ValueKind}");
        if (!value.TryGetProperty("dtype", out var dtypeElement) || dtypeElement.ValueKind != JsonValueKind.String)
            throw Bad(path, $"{where}: 'dtype' is missing or not a string");
        var dtype = dtypeElement.GetString()!;
        if (!DTypeSizes.TryGetValue(dtype, out var elementSize))
            throw Bad(path, $"{where}: unknown dtype '{dtype}' (supported: {string.Join(", ", DTypeSizes.Keys)})");
        var shape = ReadIntArray(path, where, value, "shape", null);
        var offsets = ReadIntArray(path, where, value, "data_offsets", 2);
        long begin = offsets[0], end = offsets[1];
        if (begin > end) throw Bad(path, $"{where}: data_offsets [{begin}, {end}] end before they begin");
        long needed;
        try
        {
            needed = elementSize;
            foreach (var d in shape) needed = checked(needed * d);
        }
        catch (OverflowException)
        {
            throw Bad(path, $"{where}: shape [{string.Join(", ", shape)}] of {dtype} is too large (byte size overflows)");
        }
        if (end - begin != needed)
            throw Bad(path, $"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes but shape [{string.Join(", ", shape)}] of {dtype} needs {needed}");
        return new SafetensorsEntry(name, dtype, shape, begin, end);
    }

    private static long[] ReadIntArray(string path, string where, JsonElement value, string field, int? exactLength)
    {
        if (!value.TryGetProperty(field, out var array) || array.ValueKind != JsonValueKind.Array)
            throw Bad(path, $"{where}: '{field}' is missing or not an array");
        int length = array.GetArrayLength();
        if (exactLength is { } n && length != n)
            throw Bad(path, $"{where}: '{field}' must have {n} entries, got {length}");
        var result = new long[length];
        int i = 0;
        foreach (var x in array.EnumerateArray())
        {
            if (x.ValueKind != JsonValueKind.Number || !x.TryGetInt64(out var v) || v < 0)
                throw Bad(path, $"{where}: '{field}' must hold non-negative integers, got {x.GetRawText()}");
            result[i++] = v;
        }
        return result;
    }

    /// <summary>The tensors must tile the data region exactly: sorted by offset, each starts where the previous ended.</summary>
    private static void CheckLayout(string path, IEnumerable<SafetensorsEntry> entries, long dataLength)
    {
        long expectedBegin = 0;
        SafetensorsEntry? previous = null;
        foreach (var e in entries.OrderBy(e => e.Begin).ThenBy(e => e.End))
        {
            if (e.End > dataLength)
                throw Bad(path, $"tensor '{e.Name}': data_offsets [{e.Begin}, {e.End}] lie outside the data region of {dataLength} bytes (file truncated?)");
            if (e.Begin < expectedBegin)
                throw Bad(path, $"tensor '{e.Name}': data_offsets [{e.Begin}, {e.End}] overlap tensor '{previous!.Name}' [{previous.Begin}, {previous.End}]");
            if (e.Begin > expectedBegin)
                throw Bad(path, previous is null
                    ? $"tensor '{e.Name}': data_offsets [{e.Begin}, {e.End}] leave a hole of {e.Begin} bytes at the start of the data region"
                    : $"tensor '{e.Name}': data_offsets [{e.Begin}, {e.End}] leave a hole of {e.Begin - expectedBegin} bytes after tensor '{previous.Name}' [{previous.Begin}, {previous.End}]");
            expectedBegin = e.End;
            previous = e;
        }
        if (expectedBegin != dataLength)
            throw Bad(path, previous is null
                ? $"the header lists no tensors but {dataLength} data bytes follow it (trailing junk)"
                : $"{dataLength - expectedBegin} bytes of trailing junk after the last tensor '{previous.Name}' (data ends at {expectedBegin}, file data region is {dataLength} bytes)");
    }

    private static string FirstLine(string s)
    {
        int i = s.IndexOfAny(['\r', '\n']);
        return i < 0 ? s : s[..i];
    }

    /// <summary>Element sizes in bytes of the dtypes safetensors defines that TorchSharp can hold.</summary>
    public static readonly IReadOnlyDictionary<string, int> DTypeSizes = new Dictionary<string, int>
    {
        ["F64"] = 8, ["F32"] = 4, ["F16"] = 2, ["BF16"] = 2,
        ["I64"] = 8, ["I32"] = 4, ["I16"] = 2, ["I8"] = 1, ["U8"] = 1, ["BOOL"] = 1,
    };

    /// <summary>Reads one tensor into a new CPU tensor of the stored dtype, then moves it to <paramref name="device"/>.</summary>
    public Tensor Load(string name, Device? device = null)
    {
        var e = Entry(name);
        var tensor = torch.empty(e.Shape, ToScalarType(e.DType));
        CopyBytes(e.Begin, e.ByteLength, tensor);
        return device is null || device.type == DeviceType.CPU ? tensor : tensor.to(device);
    }

    /// <summary>The raw stored bytes of one tensor (little-endian), e.g. for hashing or comparing without a tensor.</summary>
    public byte[] ReadBytes(string name)
    {
        var e = Entry(name);
        using var tensor = torch.empty([e.ByteLength], ScalarType.Byte);
        CopyBytes(e.Begin, e.ByteLength, tensor);
        return tensor.bytes.ToArray();
    }

    private unsafe void CopyBytes(long begin, long length, Tensor destination)
    {
        // Validated at open, checked again here because a read past the map would be a crash, not an exception.
        if (begin < 0 || length < 0 || begin + length > _dataLength)
            throw new InvalidDataException($"{Path}: byte range [{begin}, {begin + length}] is outside the data region");
        if (length == 0) return;
        ObjectDisposedException.ThrowIf(_view.SafeMemoryMappedViewHandle.IsClosed, this);
        byte* basePtr = null;
        _view.SafeMemoryMappedViewHandle.AcquirePointer(ref basePtr);
        try
        {
            TensorBytes.CopyInto(basePtr + _view.PointerOffset + _dataStart + begin, length, destination);
        }
        finally
        {
            _view.SafeMemoryMappedViewHandle.ReleasePointer();
        }
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

/// <summary>Writes safetensors files, single or sharded in the Hugging Face layout.</summary>
public static class SafetensorsWriter
{
    /// <summary>Writes tensors (in the given order) with optional string metadata. Not atomic: see <see cref="AtomicFile"/>.</summary>
    public static void Save(string path, IEnumerable<KeyValuePair<string, Tensor>> tensors,
        IReadOnlyDictionary<string, string>? metadata = null)
    {
        var list = new List<(string Name, Tensor Tensor)>();
        using var scope = torch.NewDisposeScope();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (name, tensor) in tensors)
        {
            if (name == "__metadata__") throw new ArgumentException($"{path}: '__metadata__' cannot be a tensor name");
            if (!seen.Add(name)) throw new ArgumentException($"{path}: tensor '{name}' is given twice");
            list.Add((name, tensor.detach().cpu().contiguous()));
        }
        var header = BuildHeader(list, metadata);
        using var file = new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20);
        file.Write(BitConverter.GetBytes((long)header.Length));
        file.Write(header);
        foreach (var (_, t) in list) TensorBytes.WriteTo(file, t);
    }

    private static byte[] BuildHeader(List<(string Name, Tensor Tensor)> list, IReadOnlyDictionary<string, string>? metadata)
    {
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
        // Pad with spaces so the data region starts 8-byte aligned, as the reference writer does.
        int padded = (int)((headerStream.Length + 7) / 8 * 8);
        var header = new byte[padded];
        headerStream.ToArray().CopyTo(header, 0);
        for (int i = (int)headerStream.Length; i < padded; i++) header[i] = (byte)' ';
        return header;
    }

    /// <summary>Byte size of a tensor as stored.</summary>
    public static long ByteSize(Tensor t) => t.NumberOfElements * t.ElementSize;

    /// <summary>
    /// Writes <c>{baseName}.safetensors</c> when everything fits in one shard of at most <paramref name="maxShardBytes"/>,
    /// else <c>{baseName}-00001-of-0000N.safetensors</c>... plus <c>{baseName}.safetensors.index.json</c> (weight_map and
    /// total_size), as transformers' save_pretrained does. A tensor larger than the limit gets a shard of its own.
    /// Each file is written atomically, and the single-file or sharded files of an earlier save are removed so that
    /// the folder never holds two conflicting checkpoints. Returns the files written.
    /// </summary>
    public static IReadOnlyList<string> SaveSharded(string directory, IEnumerable<KeyValuePair<string, Tensor>> tensors,
        long maxShardBytes, IReadOnlyDictionary<string, string>? metadata = null, string baseName = "model")
    {
        if (maxShardBytes <= 0) throw new ArgumentException($"maxShardBytes must be positive, got {maxShardBytes}");
        Directory.CreateDirectory(directory);
        var shards = new List<List<KeyValuePair<string, Tensor>>> { new() };
        long current = 0, total = 0;
        foreach (var kv in tensors)
        {
            long size = ByteSize(kv.Value);
            if (shards[^1].Count > 0 && current + size > maxShardBytes)
            {
                shards.Add(new());
                current = 0;
            }
            shards[^1].Add(kv);
            current += size;
            total += size;
        }
        var single = Path.Combine(directory, $"{baseName}.safetensors");
        var index = Path.Combine(directory, $"{baseName}.safetensors.index.json");
        var stale = Directory.GetFiles(directory, $"{baseName}-*-of-*.safetensors").ToHashSet();
        var written = new List<string>();
        if (shards.Count == 1)
        {
            AtomicFile.Write(single, tmp => Save(tmp, shards[0], metadata));
            written.Add(single);
            if (File.Exists(index)) File.Delete(index);
        }
        else
        {
            var weightMap = new SortedDictionary<string, string>(StringComparer.Ordinal);
            for (int i = 0; i < shards.Count; i++)
            {
                var file = $"{baseName}-{i + 1:D5}-of-{shards.Count:D5}.safetensors";
                var full = Path.Combine(directory, file);
                AtomicFile.Write(full, tmp => Save(tmp, shards[i], metadata));
                foreach (var kv in shards[i]) weightMap[kv.Key] = file;
                written.Add(full);
                stale.Remove(full);
            }
            var json = new System.Text.Json.Nodes.JsonObject
            {
                ["metadata"] = new System.Text.Json.Nodes.JsonObject { ["total_size"] = total },
                ["weight_map"] = new System.Text.Json.Nodes.JsonObject(
                    weightMap.Select(kv => KeyValuePair.Create(kv.Key, (System.Text.Json.Nodes.JsonNode?)kv.Value))),
            };
            AtomicFile.WriteAllText(index, json.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
            written.Add(index);
            if (File.Exists(single)) File.Delete(single);
        }
        foreach (var old in stale) File.Delete(old);
        return written;
    }
}

using System.IO.MemoryMappedFiles;
using System.Text;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.IO;

/// <summary>ggml tensor types (the numbering of ggml.h) that a GGUF file may hold.</summary>
public enum GgmlType : uint
{
    F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
    Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
    I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, BF16 = 30,
}

/// <summary>One tensor of a GGUF file: its ggml dims (fastest first), type and offset in the data region.</summary>
public sealed record GgufTensorInfo(string Name, long[] Dims, GgmlType Type, long Offset, long ByteLength)
{
    /// <summary>The PyTorch shape: ggml lists dims fastest-varying first, so this is <see cref="Dims"/> reversed.</summary>
    public long[] Shape => Dims.Reverse().ToArray();
    public long ElementCount => Dims.Aggregate(1L, (a, b) => a * b);
}

/// <summary>
/// A GGUF (v2/v3, little-endian) file opened for lazy reads: header, metadata and tensor infos are parsed and
/// bounds-checked up front (one <see cref="InvalidDataException"/> naming the file and field for any violation);
/// tensor bytes are read from a memory map when loaded. F32/F16/BF16/F64 and integer tensors load as they are;
/// Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K are dequantised to float32.
/// </summary>
public sealed class GgufFile : IDisposable
{
    public const uint Magic = 0x46554747; // "GGUF" read as a little-endian uint32
    private const int DefaultAlignment = 32;

    private readonly MemoryMappedFile _map;
    private readonly MemoryMappedViewAccessor _view;
    private readonly long _dataStart;
    private readonly Dictionary<string, GgufTensorInfo> _tensors;

    private GgufFile(string path, uint version, MemoryMappedFile map, MemoryMappedViewAccessor view, long dataStart,
        Dictionary<string, object> metadata, List<GgufTensorInfo> tensors)
    {
        Path = path;
        Version = version;
        _map = map;
        _view = view;
        _dataStart = dataStart;
        Metadata = metadata;
        Tensors = tensors;
        _tensors = tensors.ToDictionary(t => t.Name, StringComparer.Ordinal);
    }

    public string Path { get; }
    public uint Version { get; }

    /// <summary>
    /// Metadata values as CLR values: byte, sbyte, ushort, short, uint, int, float, bool, string, ulong, long,
    /// double; arrays as typed arrays (string[], float[], int[]...), arrays of arrays as object[].
    /// </summary>
    public IReadOnlyDictionary<string, object> Metadata { get; }

    /// <summary>Tensor infos in file order.</summary>
    public IReadOnlyList<GgufTensorInfo> Tensors { get; }

    public bool Contains(string name) => _tensors.ContainsKey(name);

    public GgufTensorInfo Tensor(string name) =>
        _tensors.TryGetValue(name, out var t) ? t : throw new KeyNotFoundException($"{Path}: no tensor named '{name}'");

    /// <summary>True when the file starts with the GGUF magic.</summary>
    public static bool HasMagic(ReadOnlySpan<byte> head) =>
        head.Length >= 4 && head[0] == 'G' && head[1] == 'G' && head[2] == 'U' && head[3] == 'F';

    /// <summary>True when the file at <paramref name="path"/> starts with the GGUF magic.</summary>
    public static bool IsGgufFile(string path)
    {
        Span<byte> head = stackalloc byte[4];
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read);
        return stream.ReadAtLeast(head, head.Length, throwOnEndOfStream: false) == head.Length && HasMagic(head);
    }

    public static GgufFile Open(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: file not found", path);
        var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read);
        MemoryMappedFile? map = null;
        MemoryMappedViewAccessor? view = null;
        try
        {
            long length = stream.Length;
            if (length < 24) throw new InvalidDataException($"{path}: file is {length} bytes, too short for a GGUF header");
            map = MemoryMappedFile.CreateFromFile(stream, null, 0, MemoryMappedFileAccess.Read, HandleInheritability.None, leaveOpen: false);
            view = map.CreateViewAccessor(0, length, MemoryMappedFileAccess.Read);
            var reader = new Reader(path, view, length);
            uint magic = reader.U32("magic");
            if (magic != Magic) throw new InvalidDataException($"{path}: not a GGUF file (magic 0x{magic:X8})");
            uint version = reader.U32("version");
            if (version is not (2 or 3))
            {
                if (version == 1) throw new InvalidDataException($"{path}: GGUF version 1 is obsolete and not supported; re-convert with a current llama.cpp");
                if (BitConverter.IsLittleEndian && (version & 0xFFFF) == 0)
                    throw new InvalidDataException($"{path}: big-endian GGUF files are not supported");
                throw new InvalidDataException($"{path}: unsupported GGUF version {version} (2 and 3 are supported)");
            }
            long tensorCount = reader.Count("tensor count", 8 + 4 + 4 + 8);
            long kvCount = reader.Count("metadata count", 8 + 4 + 1);

            var metadata = new Dictionary<string, object>(StringComparer.Ordinal);
            for (long i = 0; i < kvCount; i++)
            {
                var key = reader.String($"metadata key #{i}");
                var type = reader.U32($"metadata '{key}' type");
                var value = reader.Value(type, $"metadata '{key}'", depth: 0);
                if (!metadata.TryAdd(key, value)) throw new InvalidDataException($"{path}: metadata key '{key}' appears twice");
            }

            long alignment = DefaultAlignment;
            if (metadata.TryGetValue("general.alignment", out var a))
            {
                alignment = a switch { uint u => u, int s => s, ulong ul => (long)Math.Min(ul, long.MaxValue), long l => l, _ => -1 };
                if (alignment <= 0 || (alignment & (alignment - 1)) != 0 || alignment > 1 << 20)
                    throw new InvalidDataException($"{path}: general.alignment must be a power of two, got {a}");
            }

            var infos = new List<GgufTensorInfo>();
            var names = new HashSet<string>(StringComparer.Ordinal);
            for (long i = 0; i < tensorCount; i++)
            {
                var name = reader.String($"tensor #{i} name");
                string where = $"tensor '{name}'";
                if (!names.Add(name)) throw new InvalidDataException($"{path}: {where} appears twice");
                uint nDims = reader.U32($"{where} dimension count");
                if (nDims > 4) throw new InvalidDataException($"{path}: {where} has {nDims} dimensions (at most 4 allowed)");
                var dims = new long[nDims];
                for (int d = 0; d < nDims; d++)
                {
                    ulong dim = reader.U64($"{where} dimension {d}");
                    if (dim > long.MaxValue) throw new InvalidDataException($"{path}: {where} dimension {d} = {dim} is too large");
                    dims[d] = (long)dim;
                }
                uint rawType = reader.U32($"{where} type");
                ulong offset = reader.U64($"{where} offset");
                if (!Enum.IsDefined(typeof(GgmlType), rawType))
                    throw new InvalidDataException($"{path}: {where} has ggml type {rawType}, which is not supported");
                var type = (GgmlType)rawType;
                var (block, blockBytes) = BlockLayout(type);
                if (dims.Length > 0 && dims[0] % block != 0)
                    throw new InvalidDataException($"{path}: {where}: first dimension {dims[0]} is not a multiple of the {type} block size {block}");
                long bytes;
                try
                {
                    long count = 1;
                    foreach (var d in dims) count = checked(count * d);
                    bytes = checked(count / block * blockBytes);
                }
                catch (OverflowException)
                {
                    throw new InvalidDataException($"{path}: {where}: dims [{string.Join(", ", dims)}] are too large (byte size overflows)");
                }
                if (offset > long.MaxValue || (long)offset % alignment != 0)
                    throw new InvalidDataException($"{path}: {where}: offset {offset} is not a multiple of the alignment {alignment}");
                infos.Add(new GgufTensorInfo(name, dims, type, (long)offset, bytes));
            }

            long dataStart = (reader.Position + alignment - 1) / alignment * alignment;
            long dataLength = length - dataStart;
            foreach (var t in infos)
            {
                if (dataLength < 0 || t.Offset > dataLength || t.ByteLength > dataLength - t.Offset)
                    throw new InvalidDataException(
                        $"{path}: tensor '{t.Name}': bytes [{t.Offset}, {t.Offset + t.ByteLength}] of the data region lie outside the file (data region is {Math.Max(0, dataLength)} bytes; truncated?)");
            }
            return new GgufFile(path, version, map, view, dataStart, metadata, infos);
        }
        catch
        {
            view?.Dispose();
            if (map is not null) map.Dispose();
            else stream.Dispose();
            throw;
        }
    }

    /// <summary>Elements per block and bytes per block of a ggml type.</summary>
    public static (int Elements, int Bytes) BlockLayout(GgmlType type) => type switch
    {
        GgmlType.F32 => (1, 4), GgmlType.F16 => (1, 2), GgmlType.BF16 => (1, 2), GgmlType.F64 => (1, 8),
        GgmlType.I8 => (1, 1), GgmlType.I16 => (1, 2), GgmlType.I32 => (1, 4), GgmlType.I64 => (1, 8),
        GgmlType.Q4_0 => (32, 18), GgmlType.Q4_1 => (32, 20), GgmlType.Q5_0 => (32, 22), GgmlType.Q5_1 => (32, 24),
        GgmlType.Q8_0 => (32, 34), GgmlType.Q8_1 => (32, 36),
        GgmlType.Q2_K => (256, 84), GgmlType.Q3_K => (256, 110), GgmlType.Q4_K => (256, 144),
        GgmlType.Q5_K => (256, 176), GgmlType.Q6_K => (256, 210), GgmlType.Q8_K => (256, 292),
        _ => throw new NotSupportedException($"ggml type {type}"),
    };

    /// <summary>The raw bytes of a tensor as stored.</summary>
    public byte[] ReadBytes(string name)
    {
        var t = Tensor(name);
        using var tensor = torch.empty([t.ByteLength], ScalarType.Byte);
        CopyBytes(t, tensor);
        return tensor.bytes.ToArray();
    }

    /// <summary>True when two tensors are stored with identical bytes (compared in place in the map, no copies).</summary>
    public unsafe bool BytesEqual(string a, string b)
    {
        GgufTensorInfo x = Tensor(a), y = Tensor(b);
        if (x.ByteLength != y.ByteLength) return false;
        byte* basePtr = null;
        _view.SafeMemoryMappedViewHandle.AcquirePointer(ref basePtr);
        try
        {
            byte* px = basePtr + _view.PointerOffset + _dataStart + x.Offset, py = basePtr + _view.PointerOffset + _dataStart + y.Offset;
            const int chunk = 1 << 30;
            for (long done = 0; done < x.ByteLength; done += chunk)
            {
                int n = (int)Math.Min(chunk, x.ByteLength - done);
                if (!new ReadOnlySpan<byte>(px + done, n).SequenceEqual(new ReadOnlySpan<byte>(py + done, n))) return false;
            }
            return true;
        }
        finally
        {
            _view.SafeMemoryMappedViewHandle.ReleasePointer();
        }
    }

    /// <summary>
    /// Loads a tensor in PyTorch shape (dims reversed). Unquantised types keep their dtype; the block formats listed
    /// on the class are dequantised to float32; others (Q2_K, Q3_K, IQ*) are refused with a clear message.
    /// </summary>
    public Tensor Load(string name, Device? device = null)
    {
        var t = Tensor(name);
        Tensor result;
        switch (t.Type)
        {
            case GgmlType.F32: result = Raw(t, ScalarType.Float32); break;
            case GgmlType.F16: result = Raw(t, ScalarType.Float16); break;
            case GgmlType.BF16: result = Raw(t, ScalarType.BFloat16); break;
            case GgmlType.F64: result = Raw(t, ScalarType.Float64); break;
            case GgmlType.I8: result = Raw(t, ScalarType.Int8); break;
            case GgmlType.I16: result = Raw(t, ScalarType.Int16); break;
            case GgmlType.I32: result = Raw(t, ScalarType.Int32); break;
            case GgmlType.I64: result = Raw(t, ScalarType.Int64); break;
            case GgmlType.Q8_0:
            case GgmlType.Q4_0:
                result = Dequantize(t);
                break;
            default:
                var values = GgmlDequant.Dequantize(t.Type, ReadBytes(name), t.ElementCount)
                    ?? throw new NotSupportedException(
                        $"{Path}: tensor '{name}' is quantised as {t.Type}, which AdapterFlow cannot dequantise yet (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)");
                result = torch.tensor(values, t.Shape);
                break;
        }
        return device is null || device.type == DeviceType.CPU ? result : result.to(device);
    }

    private Tensor Raw(GgufTensorInfo t, ScalarType dtype)
    {
        var tensor = torch.empty(t.Shape, dtype);
        CopyBytes(t, tensor);
        return tensor;
    }

    /// <summary>Block-wise dequantisation with tensor ops over a [blocks, blockBytes] byte view (vectorised, no per-element loop).</summary>
    private Tensor Dequantize(GgufTensorInfo t)
    {
        var (block, blockBytes) = BlockLayout(t.Type);
        long blocks = t.ElementCount / block;
        using var scope = torch.NewDisposeScope();
        var raw = torch.empty([blocks, blockBytes], ScalarType.Byte);
        CopyBytes(t, raw);
        // Both formats start each block with a float16 scale d (read here: TorchSharp cannot reinterpret bytes as float16).
        var scales = new float[blocks];
        var span = raw.bytes;
        for (long b = 0; b < blocks; b++)
            scales[b] = (float)BitConverter.ToHalf(span.Slice((int)(b * blockBytes), 2));
        var scale = torch.tensor(scales).unsqueeze(1); // [blocks, 1]
        Tensor values;
        if (t.Type == GgmlType.Q8_0)
        {
            // int8 quants stored as bytes: values >= 128 are negative (two's complement).
            var q = raw[.., 2..].to_type(ScalarType.Int16);
            values = torch.where(q.ge(128), q - 256, q).to_type(ScalarType.Float32);
        }
        else
        {
            // Q4_0: 16 bytes; low nibbles are elements 0..15, high nibbles 16..31, each stored with an offset of 8.
            var packed = raw[.., 2..];
            var low = packed.bitwise_and(0x0F);
            var high = packed.bitwise_right_shift(4);
            values = torch.cat([low, high], 1).to_type(ScalarType.Float32) - 8f;
        }
        return (values * scale).reshape(t.Shape).MoveToOuterDisposeScope();
    }

    private unsafe void CopyBytes(GgufTensorInfo t, Tensor destination)
    {
        long start = _dataStart + t.Offset;
        if (start < 0 || t.ByteLength < 0 || start + t.ByteLength > _view.Capacity)
            throw new InvalidDataException($"{Path}: tensor '{t.Name}' lies outside the file");
        if (t.ByteLength == 0) return;
        byte* basePtr = null;
        _view.SafeMemoryMappedViewHandle.AcquirePointer(ref basePtr);
        try
        {
            TensorBytes.CopyInto(basePtr + _view.PointerOffset + start, t.ByteLength, destination);
        }
        finally
        {
            _view.SafeMemoryMappedViewHandle.ReleasePointer();
        }
    }

    // ---- typed metadata access with clear errors ----

    public bool Has(string key) => Metadata.ContainsKey(key);

    /// <summary>An integer metadata value (any integer type), or null when absent.</summary>
    public long? OptionalInt(string key)
    {
        if (!Metadata.TryGetValue(key, out var v)) return null;
        return v switch
        {
            byte b => b, sbyte sb => sb, ushort us => us, short s => s, uint u => u, int i => i,
            ulong ul when ul <= long.MaxValue => (long)ul, long l => l,
            _ => throw new InvalidDataException($"{Path}: metadata '{key}' must be an integer, got {Describe(v)}"),
        };
    }

    public long RequiredInt(string key) =>
        OptionalInt(key) ?? throw new InvalidDataException($"{Path}: required metadata '{key}' is missing");

    public double? OptionalFloat(string key)
    {
        if (!Metadata.TryGetValue(key, out var v)) return null;
        return v switch
        {
            // float32 values such as 1e-5 are stored inexactly; the shortest decimal form recovers the intended number.
            float f => double.Parse(f.ToString("R", System.Globalization.CultureInfo.InvariantCulture), System.Globalization.CultureInfo.InvariantCulture),
            double d => d,
            _ => throw new InvalidDataException($"{Path}: metadata '{key}' must be a float, got {Describe(v)}"),
        };
    }

    public string? OptionalString(string key)
    {
        if (!Metadata.TryGetValue(key, out var v)) return null;
        return v as string ?? throw new InvalidDataException($"{Path}: metadata '{key}' must be a string, got {Describe(v)}");
    }

    public T[]? OptionalArray<T>(string key)
    {
        if (!Metadata.TryGetValue(key, out var v)) return null;
        return v as T[] ?? throw new InvalidDataException($"{Path}: metadata '{key}' must be an array of {typeof(T).Name}, got {Describe(v)}");
    }

    private static string Describe(object v) => v is Array a ? $"an array of {a.Length} {v.GetType().GetElementType()!.Name}" : $"{v.GetType().Name} {v}";

    public void Dispose()
    {
        _view.Dispose();
        _map.Dispose();
    }

    /// <summary>Bounds-checked little-endian reads from the mapped header; running past the end is a clear error.</summary>
    private sealed unsafe class Reader
    {
        private readonly string _path;
        private readonly MemoryMappedViewAccessor _view;
        private readonly long _length;

        public Reader(string path, MemoryMappedViewAccessor view, long length)
        {
            _path = path;
            _view = view;
            _length = length;
        }

        public long Position { get; private set; }

        private long Remaining => _length - Position;

        private void Need(long bytes, string what)
        {
            if (bytes < 0 || bytes > Remaining)
                throw new InvalidDataException($"{_path}: file ends while reading {what} (at byte {Position}, {Remaining} bytes left; truncated?)");
        }

        public uint U32(string what) { Need(4, what); var v = _view.ReadUInt32(Position); Position += 4; return v; }
        public ulong U64(string what) { Need(8, what); var v = _view.ReadUInt64(Position); Position += 8; return v; }

        /// <summary>A uint64 count, sane if every item takes at least <paramref name="minItemBytes"/> bytes of what is left.</summary>
        public long Count(string what, long minItemBytes)
        {
            ulong n = U64(what);
            if (n > (ulong)(Remaining / minItemBytes))
                throw new InvalidDataException($"{_path}: {what} {n} is impossible for a file of {_length} bytes (corrupt header?)");
            return (long)n;
        }

        public string String(string what)
        {
            ulong n = U64($"{what} length");
            if (n > (ulong)Remaining)
                throw new InvalidDataException($"{_path}: {what}: string length {n} runs past the end of the file (at byte {Position}; truncated?)");
            var bytes = new byte[n];
            _view.ReadArray(Position, bytes, 0, (int)n);
            Position += (long)n;
            try
            {
                return StrictUtf8.GetString(bytes);
            }
            catch (DecoderFallbackException)
            {
                // Some tokenizers store invalid UTF-8 fragments as tokens; keep them readable rather than failing the file.
                return Encoding.UTF8.GetString(bytes);
            }
        }

        private static readonly UTF8Encoding StrictUtf8 = new(false, true);

        public object Value(uint type, string what, int depth) => type switch
        {
            0 => Scalar(1, what, p => _view.ReadByte(p)),
            1 => Scalar(1, what, p => _view.ReadSByte(p)),
            2 => Scalar(2, what, p => _view.ReadUInt16(p)),
            3 => Scalar(2, what, p => _view.ReadInt16(p)),
            4 => Scalar(4, what, p => _view.ReadUInt32(p)),
            5 => Scalar(4, what, p => _view.ReadInt32(p)),
            6 => Scalar(4, what, p => _view.ReadSingle(p)),
            7 => Scalar(1, what, p => _view.ReadByte(p) != 0),
            8 => String(what),
            9 => Array(what, depth),
            10 => Scalar(8, what, p => _view.ReadUInt64(p)),
            11 => Scalar(8, what, p => _view.ReadInt64(p)),
            12 => Scalar(8, what, p => _view.ReadDouble(p)),
            _ => throw new InvalidDataException($"{_path}: {what} has unknown value type {type}"),
        };

        private object Scalar<T>(int size, string what, Func<long, T> read) where T : notnull
        {
            Need(size, what);
            var v = read(Position);
            Position += size;
            return v;
        }

        private object Array(string what, int depth)
        {
            if (depth > 8) throw new InvalidDataException($"{_path}: {what}: arrays nested too deeply");
            uint elementType = U32($"{what} array type");
            int minSize = elementType switch { 0 or 1 or 7 => 1, 2 or 3 => 2, 4 or 5 or 6 => 4, 8 or 10 or 11 or 12 => 8, 9 => 12, _ => 1 };
            long count = Count($"{what} array length", minSize);
            if (count > int.MaxValue) throw new InvalidDataException($"{_path}: {what}: array of {count} items is too large");
            int n = (int)count;
            switch (elementType)
            {
                case 0: return Fill(new byte[n], 1, p => _view.ReadByte(p), what);
                case 1: return Fill(new sbyte[n], 1, p => _view.ReadSByte(p), what);
                case 2: return Fill(new ushort[n], 2, p => _view.ReadUInt16(p), what);
                case 3: return Fill(new short[n], 2, p => _view.ReadInt16(p), what);
                case 4: return Fill(new uint[n], 4, p => _view.ReadUInt32(p), what);
                case 5: return Fill(new int[n], 4, p => _view.ReadInt32(p), what);
                case 6: return Fill(new float[n], 4, p => _view.ReadSingle(p), what);
                case 7: return Fill(new bool[n], 1, p => _view.ReadByte(p) != 0, what);
                case 10: return Fill(new ulong[n], 8, p => _view.ReadUInt64(p), what);
                case 11: return Fill(new long[n], 8, p => _view.ReadInt64(p), what);
                case 12: return Fill(new double[n], 8, p => _view.ReadDouble(p), what);
                case 8:
                {
                    var strings = new string[n];
                    for (int i = 0; i < n; i++) strings[i] = String($"{what}[{i}]");
                    return strings;
                }
                case 9:
                {
                    var items = new object[n];
                    for (int i = 0; i < n; i++) items[i] = Array($"{what}[{i}]", depth + 1);
                    return items;
                }
                default: throw new InvalidDataException($"{_path}: {what} has unknown array element type {elementType}");
            }
        }

        private T[] Fill<T>(T[] items, int size, Func<long, T> read, string what)
        {
            Need((long)items.Length * size, what);
            for (int i = 0; i < items.Length; i++) items[i] = read(Position + (long)i * size);
            Position += (long)items.Length * size;
            return items;
        }
    }
}

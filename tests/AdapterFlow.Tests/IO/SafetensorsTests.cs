using System.Text;
using AdapterFlow.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.IO;

/// <summary>A temp folder deleted at dispose.</summary>
public sealed class TempFolder : IDisposable
{
    public TempFolder()
    {
        Path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "adapterflow-io-" + Guid.NewGuid().ToString("N")[..12]);
        Directory.CreateDirectory(Path);
    }

    public string Path { get; }
    public string File(string name) => System.IO.Path.Combine(Path, name);

    public void Dispose()
    {
        try { Directory.Delete(Path, recursive: true); } catch (IOException) { }
    }
}

public static class TensorAssertions
{
    /// <summary>Same dtype, shape and bytes (bit-identical, so NaNs and -0 compare as stored).</summary>
    public static bool SameAs(this Tensor a, Tensor b) =>
        a.dtype == b.dtype && a.shape.SequenceEqual(b.shape) && a.contiguous().bytes.SequenceEqual(b.contiguous().bytes);
}

public class SafetensorsTests
{
    public static readonly ScalarType[] AllTypes =
    [
        ScalarType.Float64, ScalarType.Float32, ScalarType.Float16, ScalarType.BFloat16,
        ScalarType.Int64, ScalarType.Int32, ScalarType.Int16, ScalarType.Int8, ScalarType.Byte, ScalarType.Bool,
    ];

    /// <summary>Random values of any dtype, deterministic for the generator's state.</summary>
    public static Tensor Random(ScalarType type, long[] shape, Generator generator) => type switch
    {
        ScalarType.Bool => torch.randint(0, 2, shape, generator: generator).to_type(ScalarType.Bool),
        ScalarType.Byte => torch.randint(0, 256, shape, generator: generator).to_type(type),
        ScalarType.Int8 => torch.randint(-128, 128, shape, generator: generator).to_type(type),
        ScalarType.Int16 => torch.randint(short.MinValue, short.MaxValue, shape, generator: generator).to_type(type),
        ScalarType.Int32 => torch.randint(int.MinValue, int.MaxValue, shape, generator: generator).to_type(type),
        ScalarType.Int64 => torch.randint(long.MinValue / 2, long.MaxValue / 2, shape, generator: generator),
        _ => (torch.randn(shape, generator: generator) * 100).to_type(type),
    };

    private static byte[] Bytes(Tensor t) => t.contiguous().bytes.ToArray();

    [Fact]
    public void Every_dtype_scalars_and_empty_tensors_round_trip_bit_identically()
    {
        using var temp = new TempFolder();
        using var scope = torch.NewDisposeScope();
        var generator = new Generator(7);
        var tensors = new List<KeyValuePair<string, Tensor>>();
        foreach (var type in AllTypes)
        {
            var name = SafetensorsFile.FromScalarType(type);
            tensors.Add(new($"{name}.matrix", Random(type, [3, 5], generator)));
            tensors.Add(new($"{name}.scalar", Random(type, [], generator)));
            tensors.Add(new($"{name}.empty", Random(type, [0, 4], generator)));
        }
        // Special float values survive too.
        tensors.Add(new("specials", torch.tensor(new[] { float.NaN, float.PositiveInfinity, float.NegativeInfinity, -0f, float.Epsilon })));
        // A non-contiguous input is written in logical order.
        tensors.Add(new("transposed", torch.arange(12, dtype: ScalarType.Float32).reshape(3, 4).t()));
        var metadata = new Dictionary<string, string> { ["format"] = "pt", ["note"] = "ünïcode ✓", ["empty"] = "" };
        var path = temp.File("all.safetensors");
        SafetensorsWriter.Save(path, tensors, metadata);

        using var file = SafetensorsFile.Open(path);
        Assert.Equal(tensors.Select(t => t.Key), file.Names);
        Assert.Equal(metadata, file.Metadata);
        foreach (var (name, expected) in tensors)
        {
            using var loaded = file.Load(name);
            Assert.Equal(expected.dtype, loaded.dtype);
            Assert.Equal(expected.shape, loaded.shape);
            Assert.Equal(Bytes(expected), Bytes(loaded));
            Assert.Equal(SafetensorsFile.FromScalarType(expected.dtype), file.Entry(name).DType);
        }
        Assert.Empty(file.Entry("F32.scalar").Shape);
        Assert.Equal(4, file.Entry("F32.scalar").ByteLength);
        Assert.Equal(0, file.Entry("BF16.empty").ByteLength);
        Assert.Equal(new float[] { 0, 4, 8, 1 }, file.Load("transposed").reshape(-1)[..4].data<float>().ToArray());

        // The data region starts 8-byte aligned (header padded with spaces), as the reference writer does.
        var raw = File.ReadAllBytes(path);
        Assert.Equal(0, BitConverter.ToInt64(raw, 0) % 8);
    }

    [Fact]
    public void Empty_file_without_tensors_round_trips()
    {
        using var temp = new TempFolder();
        var path = temp.File("none.safetensors");
        SafetensorsWriter.Save(path, [], new Dictionary<string, string> { ["k"] = "v" });
        using var file = SafetensorsFile.Open(path);
        Assert.Empty(file.Names);
        Assert.Equal("v", file.Metadata["k"]);
    }

    [Fact]
    public void Writer_rejects_duplicate_and_reserved_names()
    {
        using var temp = new TempFolder();
        using var t = torch.zeros(2);
        Assert.Throws<ArgumentException>(() => SafetensorsWriter.Save(temp.File("a.safetensors"), [new("x", t), new("x", t)]));
        Assert.Throws<ArgumentException>(() => SafetensorsWriter.Save(temp.File("b.safetensors"), [new("__metadata__", t)]));
    }

    // ---------- malformed files: each gives one clear InvalidDataException ----------

    /// <summary>Writes a file from a raw header string and data bytes (length prefix computed unless given).</summary>
    private static string Raw(TempFolder temp, string header, int dataBytes, long? lengthPrefix = null, string name = "model.safetensors")
    {
        var path = temp.File(name);
        var headerBytes = Encoding.UTF8.GetBytes(header);
        using var f = File.Create(path);
        f.Write(BitConverter.GetBytes(lengthPrefix ?? headerBytes.Length));
        f.Write(headerBytes);
        f.Write(new byte[dataBytes]);
        return path;
    }

    private static string OpenError(string path)
    {
        var e = Assert.Throws<InvalidDataException>(() => SafetensorsFile.Open(path).Dispose());
        Assert.StartsWith(path + ": ", e.Message);
        Assert.DoesNotContain('\n', e.Message);
        return e.Message;
    }

    [Fact]
    public void Wrong_byte_size_names_tensor_offsets_shape_and_need()
    {
        using var temp = new TempFolder();
        var path = Raw(temp, """{"model.norm.weight":{"dtype":"F16","shape":[4],"data_offsets":[0,12]}}""", 12);
        Assert.Equal($"{path}: tensor 'model.norm.weight': data_offsets [0, 12] hold 12 bytes but shape [4] of F16 needs 8", OpenError(path));
    }

    [Fact]
    public void Overlapping_tensors_are_refused()
    {
        using var temp = new TempFolder();
        var path = Raw(temp, """{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}""", 12);
        var message = OpenError(path);
        Assert.Contains("tensor 'b'", message);
        Assert.Contains("overlap tensor 'a'", message);
    }

    [Fact]
    public void Holes_between_tensors_are_refused()
    {
        using var temp = new TempFolder();
        var path = Raw(temp, """{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}""", 12);
        var message = OpenError(path);
        Assert.Contains("tensor 'b'", message);
        Assert.Contains("hole of 4 bytes after tensor 'a'", message);

        var atStart = Raw(temp, """{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}""", 8, name: "start.safetensors");
        Assert.Contains("hole of 4 bytes at the start", OpenError(atStart));
    }

    [Fact]
    public void Offsets_past_the_data_region_are_refused()
    {
        using var temp = new TempFolder();
        var path = Raw(temp, """{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}""", 8);
        var message = OpenError(path);
        Assert.Contains("tensor 'w'", message);
        Assert.Contains("outside the data region of 8 bytes", message);
    }

    [Fact]
    public void Trailing_junk_is_refused()
    {
        using var temp = new TempFolder();
        var path = Raw(temp, """{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}""", 11);
        var message = OpenError(path);
        Assert.Contains("3 bytes of trailing junk after the last tensor 'w'", message);
    }

    [Theory]
    [InlineData("""{"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}""", "tensor 'w': unknown dtype 'F8_E4M3'")]
    [InlineData("""{"w":{"dtype":7,"shape":[2],"data_offsets":[0,8]}}""", "tensor 'w': 'dtype' is missing or not a string")]
    [InlineData("""{"w":{"shape":[2],"data_offsets":[0,8]}}""", "tensor 'w': 'dtype' is missing")]
    [InlineData("""{"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}""", "tensor 'w': 'shape' must hold non-negative integers, got -2")]
    [InlineData("""{"w":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}}""", "tensor 'w': 'shape' must hold non-negative integers, got 2.5")]
    [InlineData("""{"w":{"dtype":"F32","shape":"2","data_offsets":[0,8]}}""", "tensor 'w': 'shape' is missing or not an array")]
    [InlineData("""{"w":{"dtype":"F32","shape":[2],"data_offsets":[0]}}""", "tensor 'w': 'data_offsets' must have 2 entries, got 1")]
    [InlineData("""{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}""", "tensor 'w': data_offsets [8, 0] end before they begin")]
    [InlineData("""{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}""", "tensor 'w': shape [4294967296, 4294967296] of F32 is too large")]
    [InlineData("""{"w":[1,2]}""", "tensor 'w': entry must be an object")]
    [InlineData("""[1,2,3]""", "header must be a JSON object")]
    [InlineData("""{"w":{"dtype":"F32",""", "header is not valid JSON")]
    [InlineData("""{"__metadata__":{"format":3}}""", "'__metadata__' entry 'format' must be a string")]
    [InlineData("""{"__metadata__":["pt"]}""", "'__metadata__' must be an object of strings")]
    [InlineData("""{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}""", "tensor 'w' appears twice")]
    public void Malformed_headers_give_a_clear_message(string header, string expected)
    {
        using var temp = new TempFolder();
        var path = Raw(temp, header, 8);
        Assert.Contains(expected, OpenError(path));
    }

    [Fact]
    public void Invalid_utf8_header_is_refused()
    {
        using var temp = new TempFolder();
        var path = temp.File("bad.safetensors");
        byte[] header = [(byte)'{', (byte)'"', 0xC3, 0x28, (byte)'"', (byte)':', (byte)'1', (byte)'}'];
        File.WriteAllBytes(path, [.. BitConverter.GetBytes((long)header.Length), .. header]);
        Assert.Contains("header is not valid UTF-8", OpenError(path));
    }

    [Fact]
    public void Truncated_or_absurd_length_prefix_is_refused()
    {
        using var temp = new TempFolder();
        var shortFile = temp.File("short.safetensors");
        File.WriteAllBytes(shortFile, [1, 2, 3]);
        Assert.Contains("too short to hold the 8-byte header length", OpenError(shortFile));

        var truncated = Raw(temp, """{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}""", 0, lengthPrefix: 500, name: "trunc.safetensors");
        Assert.Contains("header length 500 runs past the end of the file", OpenError(truncated));

        var huge = Raw(temp, "{}", 0, lengthPrefix: long.MaxValue, name: "huge.safetensors");
        Assert.Contains("is not plausible", OpenError(huge));

        var negative = Raw(temp, "{}", 0, lengthPrefix: -5, name: "neg.safetensors");
        Assert.Contains("header length -5 is not plausible", OpenError(negative));
    }

    [Fact]
    public void Missing_tensor_name_is_a_key_error_naming_the_file()
    {
        using var temp = new TempFolder();
        var path = temp.File("one.safetensors");
        SafetensorsWriter.Save(path, [new("a", torch.ones(2))]);
        using var file = SafetensorsFile.Open(path);
        var e = Assert.Throws<KeyNotFoundException>(() => file.Load("b"));
        Assert.Contains(path, e.Message);
        Assert.Contains("'b'", e.Message);
    }

    // ---------- fuzz ----------

    [Fact]
    public void Fuzzed_files_load_consistently_or_fail_with_InvalidDataException_naming_the_file()
    {
        using var temp = new TempFolder();
        var generator = new Generator(11);
        var tensors = new List<KeyValuePair<string, Tensor>>();
        var rng = new Random(20261123);
        for (int i = 0; i < 8; i++)
        {
            var type = AllTypes[rng.Next(AllTypes.Length)];
            long[] shape = rng.Next(4) switch { 0 => [], 1 => [rng.Next(0, 3)], _ => [rng.Next(1, 4), rng.Next(1, 5)] };
            tensors.Add(new($"layers.{i}.w", Random(type, shape, generator)));
        }
        var original = temp.File("model.safetensors");
        SafetensorsWriter.Save(original, tensors, new Dictionary<string, string> { ["format"] = "pt" });
        var pristine = File.ReadAllBytes(original);
        long headerEnd = 8 + BitConverter.ToInt64(pristine, 0);
        byte[] jsonish = Encoding.ASCII.GetBytes("0123456789{}[],:\" -.e\"FIUB");

        int loaded = 0, refused = 0;
        for (int round = 0; round < 400; round++)
        {
            var bytes = (byte[])pristine.Clone();
            switch (rng.Next(5))
            {
                case 0: // bit flips in the length prefix or header
                    for (int k = rng.Next(1, 4); k > 0; k--)
                    {
                        int at = rng.Next((int)headerEnd);
                        bytes[at] ^= (byte)(1 << rng.Next(8));
                    }
                    break;
                case 1: // overwrite header bytes with JSON-significant characters
                    for (int k = rng.Next(1, 4); k > 0; k--)
                        bytes[8 + rng.Next((int)headerEnd - 8)] = jsonish[rng.Next(jsonish.Length)];
                    break;
                case 2: // random bytes anywhere
                    for (int k = rng.Next(1, 6); k > 0; k--) bytes[rng.Next(bytes.Length)] = (byte)rng.Next(256);
                    break;
                case 3: // truncation
                    bytes = bytes[..rng.Next(bytes.Length)];
                    break;
                default: // appended junk
                    bytes = [.. bytes, .. Enumerable.Range(0, rng.Next(1, 40)).Select(_ => (byte)rng.Next(256))];
                    break;
            }
            var path = temp.File($"fuzz{round}.safetensors");
            File.WriteAllBytes(path, bytes);
            try
            {
                using var file = SafetensorsFile.Open(path);
                long total = 0;
                foreach (var entry in file.Entries)
                {
                    using var t = file.Load(entry.Name);
                    Assert.Equal(entry.Shape, t.shape);
                    Assert.Equal(entry.ByteLength, t.NumberOfElements * t.ElementSize);
                    total += entry.ByteLength;
                }
                Assert.Equal(bytes.Length - 8 - BitConverter.ToInt64(bytes, 0), total);
                loaded++;
            }
            catch (InvalidDataException e)
            {
                Assert.StartsWith(path + ": ", e.Message);
                refused++;
            }
            File.Delete(path);
        }
        // Both outcomes occur (data-only corruption still loads), so the test exercises both paths.
        Assert.True(loaded > 0 && refused > 100, $"loaded {loaded}, refused {refused}");
    }
}

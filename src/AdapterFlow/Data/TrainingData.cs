using System.Text.Json;

namespace AdapterFlow.Data;

/// <summary>What to do with a bad record (missing field, wrong type, empty output).</summary>
public enum BadRecordPolicy
{
    /// <summary>Throw an <see cref="InvalidDataException"/> naming the file and line.</summary>
    Fail,

    /// <summary>Skip it; the dataset counts and lists the problems.</summary>
    Skip,
}

/// <summary>One instruction example (Alpaca / LLM-Adapters shape), with the file and 1-based line it starts on.</summary>
public sealed record InstructionExample(string Instruction, string Input, string Output, string Source, int Line);

/// <summary>Records read from a file, with the bad ones skipped (<see cref="BadRecordPolicy.Skip"/>) listed.</summary>
public sealed record LoadedRecords<T>(IReadOnlyList<T> Items, IReadOnlyList<string> Problems)
{
    /// <summary>How many records were skipped.</summary>
    public int SkippedCount => Problems.Count;
}

/// <summary>
/// Instruction data as a JSON array or JSON Lines of objects {instruction, input?, output} (LLM-Adapters' and
/// Alpaca's files). <c>input</c> may be absent or null (no input); <c>instruction</c> and <c>output</c> must be
/// non-empty strings.
/// </summary>
public static class InstructionDataset
{
    public static LoadedRecords<InstructionExample> Load(string path, BadRecordPolicy policy = BadRecordPolicy.Fail) =>
        JsonRecords.LoadObjects<InstructionExample>(path, policy, (element, line) =>
        {
            var instruction = JsonRecords.String(element, "instruction", required: true, out var error);
            var input = error is null ? JsonRecords.String(element, "input", required: false, out error) : null;
            var output = error is null ? JsonRecords.String(element, "output", required: true, out error) : null;
            return error is null ? (new InstructionExample(instruction!, input ?? "", output!, path, line), null) : (null, error);
        });
}

/// <summary>One document of a plain-text corpus.</summary>
public sealed record TextDocument(string Text, string Source, int Line);

/// <summary>
/// Plain text for pretraining: a .txt file is one document; a .jsonl/.json file holds objects with a
/// non-empty string field <c>text</c>, one document each.
/// </summary>
public static class TextCorpus
{
    public static LoadedRecords<TextDocument> Load(string path, BadRecordPolicy policy = BadRecordPolicy.Fail)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: text file not found");
        var ext = Path.GetExtension(path).ToLowerInvariant();
        if (ext is not (".json" or ".jsonl"))
        {
            var text = File.ReadAllText(path);
            return new LoadedRecords<TextDocument>(text.Length == 0 ? [] : [new TextDocument(text, path, 1)], []);
        }
        return JsonRecords.LoadObjects<TextDocument>(path, policy, (element, line) =>
        {
            var text = JsonRecords.String(element, "text", required: true, out var error);
            return error is null ? (new TextDocument(text!, path, line), null) : (null, error);
        });
    }
}

/// <summary>Facts about a training data file.</summary>
public static class DataFile
{
    /// <summary>
    /// The shape of a data file's records, from its first record that is an object: <c>messages</c> → chat,
    /// <c>chosen</c> → preference, <c>text</c> → text, otherwise instruction. A .txt file is text.
    /// </summary>
    public static DataShape DetectShape(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: data file not found");
        if (Path.GetExtension(path).ToLowerInvariant() is not (".json" or ".jsonl")) return DataShape.Text;
        foreach (var (element, _, error) in JsonRecords.Read(path))
        {
            if (error is not null || element.ValueKind != JsonValueKind.Object) continue;
            if (element.TryGetProperty("messages", out _)) return DataShape.Chat;
            if (element.TryGetProperty("chosen", out _)) return DataShape.Preference;
            if (element.TryGetProperty("text", out _) && !element.TryGetProperty("instruction", out _)) return DataShape.Text;
            return DataShape.Instruction;
        }
        return DataShape.Instruction;
    }
}

/// <summary>Held-out splits that are the same in every process for the same seed.</summary>
public static class HeldOut
{
    /// <summary>
    /// Splits <paramref name="items"/> into training and held-out parts: a shuffle seeded by
    /// <paramref name="seed"/> picks round(fraction × count) items (at least one) for evaluation; both parts keep
    /// the file's order. The same seed and data always give the same split.
    /// </summary>
    public static (IReadOnlyList<T> Train, IReadOnlyList<T> Eval) Split<T>(IReadOnlyList<T> items, double fraction, long seed)
    {
        ArgumentNullException.ThrowIfNull(items);
        if (!(fraction > 0 && fraction < 1)) throw new ArgumentException($"the held-out fraction must be in (0, 1), got {fraction}");
        int evalCount = Math.Max(1, (int)Math.Round(fraction * items.Count));
        if (evalCount >= items.Count)
            throw new ArgumentException($"holding out {fraction} of {items.Count} records leaves nothing to train on");
        var order = Enumerable.Range(0, items.Count).ToArray();
        new Random(MixSeed(seed, 0x5EED)).Shuffle(order);
        var held = order.Take(evalCount).ToHashSet();
        var train = new List<T>(items.Count - evalCount);
        var eval = new List<T>(evalCount);
        for (int i = 0; i < items.Count; i++) (held.Contains(i) ? eval : train).Add(items[i]);
        return (train, eval);
    }

    /// <summary>A 32-bit seed from a seed and a stream number (SplitMix64's finaliser; stable across processes, unlike HashCode).</summary>
    public static int MixSeed(long seed, long stream)
    {
        ulong z = unchecked((ulong)seed + 0x9E3779B97F4A7C15UL * (ulong)(stream + 1));
        z = unchecked((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL);
        z = unchecked((z ^ (z >> 27)) * 0x94D049BB133111EBUL);
        z ^= z >> 31;
        return unchecked((int)z);
    }
}

/// <summary>
/// Reads the records of a JSON array or a JSON Lines file, each with the line it starts on. A JSON Lines line
/// that does not parse is returned as a parse error (a bad record); a broken JSON array throws, as there is no
/// telling where its next record starts.
/// </summary>
internal static class JsonRecords
{
    public static IEnumerable<(JsonElement Element, int Line, string? Error)> Read(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: data file not found");
        var bytes = File.ReadAllBytes(path);
        int start = 0;
        if (bytes.Length >= 3 && bytes[0] == 0xEF && bytes[1] == 0xBB && bytes[2] == 0xBF) start = 3; // UTF-8 BOM
        int first = start;
        while (first < bytes.Length && bytes[first] is (byte)' ' or (byte)'\t' or (byte)'\r' or (byte)'\n') first++;
        var records = first < bytes.Length && bytes[first] == (byte)'['
            ? ReadArray(path, bytes, start)
            : ReadLines(path, bytes, start);
        return records;
    }

    private static List<(JsonElement, int, string?)> ReadArray(string path, byte[] bytes, int start)
    {
        var result = new List<(JsonElement, int, string?)>();
        var lineStarts = new LineIndex(bytes);
        var reader = new Utf8JsonReader(bytes.AsSpan(start), new JsonReaderOptions { AllowTrailingCommas = true, CommentHandling = JsonCommentHandling.Skip });
        try
        {
            reader.Read(); // '['
            while (reader.Read() && reader.TokenType != JsonTokenType.EndArray)
            {
                int line = lineStarts.LineOf(start + (int)reader.TokenStartIndex);
                using var doc = JsonDocument.ParseValue(ref reader);
                result.Add((doc.RootElement.Clone(), line, null));
            }
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{path}:{e.LineNumber + 1}: invalid JSON ({FirstLine(e.Message)})");
        }
        return result;
    }

    private static List<(JsonElement, int, string?)> ReadLines(string path, byte[] bytes, int start)
    {
        var result = new List<(JsonElement, int, string?)>();
        int line = 0;
        int pos = start;
        while (pos < bytes.Length)
        {
            int end = Array.IndexOf(bytes, (byte)'\n', pos);
            if (end < 0) end = bytes.Length;
            line++;
            var span = bytes.AsSpan(pos, end - pos);
            pos = end + 1;
            if (span.Trim(" \t\r"u8).IsEmpty) continue;
            try
            {
                using var doc = JsonDocument.Parse(span.ToArray());
                result.Add((doc.RootElement.Clone(), line, null));
            }
            catch (JsonException e)
            {
                result.Add((default, line, $"invalid JSON ({FirstLine(e.Message)})"));
            }
        }
        return result;
    }

    /// <summary>
    /// Reads a file's records, each an object that <paramref name="parse"/> turns into an item or an error; a bad
    /// record (unparsable line, not an object, parse error) throws "file:line: error" under
    /// <see cref="BadRecordPolicy.Fail"/> or is skipped and listed under <see cref="BadRecordPolicy.Skip"/>.
    /// </summary>
    public static LoadedRecords<T> LoadObjects<T>(string path, BadRecordPolicy policy, Func<JsonElement, int, (T? Item, string? Error)> parse)
        where T : class
    {
        var items = new List<T>();
        var problems = new List<string>();
        foreach (var (element, line, parseError) in Read(path))
        {
            string? error = parseError;
            T? item = null;
            if (error is not null) { }
            else if (element.ValueKind != JsonValueKind.Object) error = $"expected an object, got {element.ValueKind}";
            else (item, error) = parse(element, line);
            if (error is not null || item is null)
            {
                var message = $"{path}:{line}: {error ?? "bad record"}";
                if (policy == BadRecordPolicy.Fail) throw new InvalidDataException(message);
                problems.Add(message);
            }
            else items.Add(item);
        }
        return new LoadedRecords<T>(items, problems);
    }

    /// <summary>A string field; null with no error when absent/null and not required.</summary>
    public static string? String(JsonElement obj, string name, bool required, out string? error)
    {
        error = null;
        if (!obj.TryGetProperty(name, out var value) || value.ValueKind == JsonValueKind.Null)
        {
            if (required) error = $"missing field '{name}'";
            return null;
        }
        if (value.ValueKind != JsonValueKind.String)
        {
            error = $"field '{name}' must be a string, got {value.ValueKind}";
            return null;
        }
        var text = value.GetString()!;
        if (required && text.Trim().Length == 0) error = $"field '{name}' is empty";
        return text;
    }

    private static string FirstLine(string message)
    {
        int nl = message.IndexOfAny(['\r', '\n']);
        return nl < 0 ? message : message[..nl];
    }

    private sealed class LineIndex(byte[] bytes)
    {
        private readonly List<int> _newlines = Enumerable.Range(0, bytes.Length).Where(i => bytes[i] == (byte)'\n').ToList();

        public int LineOf(int offset)
        {
            int index = _newlines.BinarySearch(offset);
            return (index < 0 ? ~index : index) + 1;
        }
    }
}

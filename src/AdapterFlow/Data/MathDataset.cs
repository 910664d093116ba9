using System.Globalization;
using System.Text.Json;

namespace AdapterFlow.Data;

/// <summary>How the answers of a dataset are scored.</summary>
public enum AnswerKind
{
    /// <summary>The label is a number; the prediction is the last number of the response.</summary>
    Number,

    /// <summary>The label is an option letter A–E (AQuA); the prediction is a letter of the response.</summary>
    Letter,
}

/// <summary>One problem: LLM-Adapters' record shape {instruction, input, output, answer}.</summary>
/// <param name="Index">Position in the file (0-based).</param>
/// <param name="Instruction">The question (with its answer choices for AQuA).</param>
/// <param name="Input">Extra context; empty in all LLM-Adapters math sets.</param>
/// <param name="Output">A reference rationale (training data); not used for scoring.</param>
/// <param name="Answer">The label as written in the file: a number ("576.0") or a letter ("C").</param>
public sealed record MathItem(int Index, string Instruction, string Input, string Output, string Answer)
{
    /// <summary>The numeric label (only for <see cref="AnswerKind.Number"/> datasets).</summary>
    public double NumericAnswer => MathDataset.ParseLabel(Answer);
}

/// <summary>
/// A math word-problem set in LLM-Adapters' format: a JSON array of {instruction, input, output, answer}
/// (answer a string or a number). The seven sets of LLM-Adapters are folders holding test.json
/// (gsm8k, SVAMP, MultiArith, AddSub, AQuA, SingleEq, mawps); <see cref="Resolve"/> finds them by name.
/// </summary>
public sealed class MathDataset
{
    /// <summary>LLM-Adapters' math evaluation sets, in the column order of its results table.</summary>
    public static IReadOnlyList<string> StandardNames { get; } = ["MultiArith", "gsm8k", "AddSub", "AQuA", "SingleEq", "SVAMP", "mawps"];

    private MathDataset(string name, string path, IReadOnlyList<MathItem> items, AnswerKind kind)
    {
        Name = name;
        Path = path;
        Items = items;
        Kind = kind;
    }

    /// <summary>The set's name (folder name for a standard set, file name without extension otherwise).</summary>
    public string Name { get; }

    /// <summary>The file it was read from.</summary>
    public string Path { get; }

    public IReadOnlyList<MathItem> Items { get; }

    /// <summary>Numbers or option letters: decided from the labels (all letters A–E → letters), as AQuA is the only letter set.</summary>
    public AnswerKind Kind { get; }

    /// <summary>The first <paramref name="limit"/> items (all when null).</summary>
    public MathDataset Take(int? limit)
    {
        if (limit is null || limit >= Items.Count) return this;
        if (limit < 0) throw new ArgumentException($"limit must be non-negative, got {limit}");
        return new MathDataset(Name, Path, Items.Take(limit.Value).ToArray(), Kind);
    }

    /// <summary>
    /// A set made in memory (e.g. by <see cref="ArithmeticProblems"/>): numbers or letters decided from the labels as
    /// for a file. <paramref name="path"/> is only reported (empty when the items were never written).
    /// </summary>
    public static MathDataset FromItems(string name, IReadOnlyList<MathItem> items, string path = "")
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(name);
        ArgumentNullException.ThrowIfNull(items);
        if (items.Count == 0) throw new ArgumentException($"dataset '{name}' holds no items");
        return new MathDataset(name, path, items, DecideKind(path.Length > 0 ? path : name, items));
    }

    /// <summary>Reads a JSON array file; one-line errors name the file and the item for bad records.</summary>
    public static MathDataset Load(string path, string? name = null)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: dataset file not found");
        name ??= System.IO.Path.GetFileNameWithoutExtension(path);
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(File.ReadAllBytes(path), new JsonDocumentOptions { AllowTrailingCommas = true });
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{path}: invalid JSON (line {e.LineNumber + 1}: {FirstLine(e.Message)})");
        }
        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Array)
                throw new InvalidDataException($"{path}: expected a JSON array of {{instruction, input, output, answer}} records, found a {doc.RootElement.ValueKind}");
            var items = new List<MathItem>();
            int i = 0;
            foreach (var record in doc.RootElement.EnumerateArray())
            {
                items.Add(ReadItem(path, i, record));
                i++;
            }
            if (items.Count == 0) throw new InvalidDataException($"{path}: the dataset holds no items");
            return new MathDataset(name, path, items, DecideKind(path, items));
        }
    }

    /// <summary>
    /// A dataset by name or path: an existing file is read directly; otherwise a standard set name
    /// (case-insensitive) is looked up as <c>&lt;dataDir&gt;/&lt;name&gt;/test.json</c>.
    /// </summary>
    public static MathDataset Resolve(string nameOrFile, string? dataDir = null)
    {
        if (string.IsNullOrWhiteSpace(nameOrFile)) throw new ArgumentException("dataset name is empty");
        if (File.Exists(nameOrFile)) return Load(nameOrFile);
        var folder = DataDirectory(dataDir);
        var match = Directory.EnumerateDirectories(folder)
            .FirstOrDefault(d => string.Equals(System.IO.Path.GetFileName(d), nameOrFile, StringComparison.OrdinalIgnoreCase));
        if (match is null)
        {
            var available = Directory.EnumerateDirectories(folder)
                .Where(d => File.Exists(System.IO.Path.Combine(d, "test.json")))
                .Select(System.IO.Path.GetFileName).Order(StringComparer.OrdinalIgnoreCase);
            throw new FileNotFoundException(
                $"dataset '{nameOrFile}' is neither a file nor a folder of {folder} (available there: {string.Join(", ", available)})");
        }
        var file = System.IO.Path.Combine(match, "test.json");
        if (!File.Exists(file)) throw new FileNotFoundException($"{file}: dataset '{nameOrFile}' has no test.json");
        return Load(file, System.IO.Path.GetFileName(match));
    }

    /// <summary>
    /// The folder holding the standard sets: <paramref name="dataDir"/> when given; else
    /// $ADAPTERFLOW_SHARED/data/math; else ../shared/data/math beside the repository (found from the current folder, then from the program's folder), else
    /// ./shared/data/math or ../shared/data/math from the current folder. Throws naming every place tried.
    /// </summary>
    public static string DataDirectory(string? dataDir = null)
    {
        if (dataDir is not null)
        {
            if (!Directory.Exists(dataDir)) throw new DirectoryNotFoundException($"{dataDir}: data folder not found (--data-dir)");
            return System.IO.Path.GetFullPath(dataDir);
        }
        var tried = new List<string>();
        foreach (var candidate in DefaultDataDirectories())
        {
            var full = System.IO.Path.GetFullPath(candidate);
            if (tried.Contains(full)) continue;
            tried.Add(full);
            if (Directory.Exists(full)) return full;
        }
        throw new DirectoryNotFoundException(
            $"no math data folder found (tried {string.Join(", ", tried)}); pass --data-dir DIR (a folder with <name>/test.json) or a dataset file");
    }

    private static IEnumerable<string> DefaultDataDirectories()
    {
        // The same variable the tests use to find the shared files (e.g. from a git worktree).
        if (Environment.GetEnvironmentVariable("ADAPTERFLOW_SHARED") is { Length: > 0 } shared)
            yield return System.IO.Path.Combine(shared, "data", "math");
        foreach (var start in new[] { Directory.GetCurrentDirectory(), AppContext.BaseDirectory })
        {
            for (var dir = new DirectoryInfo(start); dir is not null; dir = dir.Parent)
            {
                if (File.Exists(System.IO.Path.Combine(dir.FullName, "AdapterFlow.sln")))
                {
                    yield return System.IO.Path.Combine(dir.FullName, "..", "shared", "data", "math");
                    break;
                }
            }
        }
        yield return System.IO.Path.Combine(Directory.GetCurrentDirectory(), "shared", "data", "math");
        yield return System.IO.Path.Combine(Directory.GetCurrentDirectory(), "..", "shared", "data", "math");
    }

    /// <summary>A numeric label as Python's float() reads it in LLM-Adapters ("576.0", "-3", "1e3"); throws FormatException otherwise.</summary>
    public static double ParseLabel(string label)
    {
        if (double.TryParse(label.Trim(), NumberStyles.Float, CultureInfo.InvariantCulture, out var value)) return value;
        throw new FormatException($"answer '{label}' is not a number");
    }

    private static MathItem ReadItem(string path, int index, JsonElement record)
    {
        string where = $"{path}: item {index}";
        if (record.ValueKind != JsonValueKind.Object)
            throw new InvalidDataException($"{where}: expected an object {{instruction, input, output, answer}}, found a {record.ValueKind}");
        string instruction = Text(record, where, "instruction", required: true)!;
        if (string.IsNullOrWhiteSpace(instruction)) throw new InvalidDataException($"{where}: 'instruction' is empty");
        string input = Text(record, where, "input", required: false) ?? "";
        string output = Text(record, where, "output", required: false) ?? "";
        if (!record.TryGetProperty("answer", out var answer) || answer.ValueKind == JsonValueKind.Null)
            throw new InvalidDataException($"{where}: 'answer' is missing");
        string label = answer.ValueKind switch
        {
            JsonValueKind.String => answer.GetString()!,
            JsonValueKind.Number => answer.GetRawText(),
            _ => throw new InvalidDataException($"{where}: 'answer' must be a string or a number, found a {answer.ValueKind}"),
        };
        if (string.IsNullOrWhiteSpace(label)) throw new InvalidDataException($"{where}: 'answer' is empty");
        return new MathItem(index, instruction, input, output, label.Trim());
    }

    private static string? Text(JsonElement record, string where, string key, bool required)
    {
        if (!record.TryGetProperty(key, out var value) || value.ValueKind == JsonValueKind.Null)
            return required ? throw new InvalidDataException($"{where}: '{key}' is missing") : null;
        if (value.ValueKind != JsonValueKind.String)
            throw new InvalidDataException($"{where}: '{key}' must be a string, found a {value.ValueKind}");
        return value.GetString();
    }

    private static AnswerKind DecideKind(string path, IReadOnlyList<MathItem> items)
    {
        static bool IsLetter(string a) => a.Length == 1 && a[0] is >= 'A' and <= 'E';
        if (items.All(i => IsLetter(i.Answer))) return AnswerKind.Letter;
        foreach (var item in items)
        {
            if (!double.TryParse(item.Answer, NumberStyles.Float, CultureInfo.InvariantCulture, out _))
                throw new InvalidDataException(
                    $"{path}: item {item.Index}: answer '{item.Answer}' is neither a number nor (as in every item of a multiple-choice set) a letter A-E");
        }
        return AnswerKind.Number;
    }

    private static string FirstLine(string message) => message.Split('\n')[0].Trim();
}

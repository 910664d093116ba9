using System.Text.Json;

namespace AdapterFlow.IO;

/// <summary>Reads a list of texts from a file: JSON Lines with a <c>text</c> field, or plain text with one text per line.</summary>
public static class TextInputs
{
    /// <summary>
    /// A <c>.jsonl</c> file holds one JSON object per line with a string <c>text</c> field (so texts may contain
    /// newlines); blank lines are skipped. Any other file is read as one text per line.
    /// </summary>
    public static IReadOnlyList<string> Read(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: file not found");
        if (!path.EndsWith(".jsonl", StringComparison.OrdinalIgnoreCase)) return File.ReadAllLines(path);
        var texts = new List<string>();
        int lineNumber = 0;
        foreach (var line in File.ReadLines(path))
        {
            lineNumber++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            JsonDocument doc;
            try { doc = JsonDocument.Parse(line); }
            catch (JsonException e)
            {
                throw new InvalidDataException($"{path}:{lineNumber}: invalid JSON ({e.Message})");
            }
            using (doc)
            {
                if (doc.RootElement.ValueKind != JsonValueKind.Object)
                    throw new InvalidDataException($"{path}:{lineNumber}: expected a JSON object with a \"text\" field");
                if (!doc.RootElement.TryGetProperty("text", out var text))
                    throw new InvalidDataException($"{path}:{lineNumber}: the \"text\" field is missing");
                if (text.ValueKind != JsonValueKind.String)
                    throw new InvalidDataException($"{path}:{lineNumber}: \"text\" must be a string, got {text.ValueKind.ToString().ToLowerInvariant()}");
                texts.Add(text.GetString()!);
            }
        }
        return texts;
    }
}

using System.Text.Json;
using System.Text.Json.Nodes;

namespace AdapterFlow.IO.Tokenizers;

/// <summary>Reads tokenizer.json fields; every problem becomes a one-line InvalidDataException naming the file and field.</summary>
internal sealed class JsonFields(string file)
{
    public string File { get; } = file;

    public InvalidDataException Error(string field, string problem) => new($"{File}: {field} {problem}");

    public static JsonNode? Parse(string text, string file)
    {
        try
        {
            return JsonNode.Parse(text, documentOptions: new JsonDocumentOptions { AllowTrailingCommas = true, CommentHandling = JsonCommentHandling.Skip });
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{file}: not valid JSON ({e.Message.Split('\n')[0].Trim()})");
        }
    }

    public JsonObject Object(JsonNode? node, string field) =>
        node as JsonObject ?? throw Error(field, node is null ? "is missing" : $"must be an object, not {Kind(node)}");

    public JsonArray Array(JsonNode? node, string field) =>
        node as JsonArray ?? throw Error(field, node is null ? "is missing" : $"must be an array, not {Kind(node)}");

    public string String(JsonNode? node, string field) =>
        node is JsonValue v && v.TryGetValue<string>(out var s) ? s : throw Error(field, node is null ? "is missing" : $"must be a string, not {Kind(node)}");

    public string? OptionalString(JsonNode? node, string field) => node is null ? null : String(node, field);

    public bool Bool(JsonNode? node, string field, bool fallback) =>
        node is null ? fallback : node is JsonValue v && v.TryGetValue<bool>(out var b) ? b : throw Error(field, $"must be true or false, not {Kind(node)}");

    public int Int(JsonNode? node, string field)
    {
        if (node is JsonValue v)
        {
            if (v.TryGetValue<int>(out var i)) return i;
            if (v.TryGetValue<long>(out var l) && l is >= int.MinValue and <= int.MaxValue) return (int)l;
            if (v.TryGetValue<double>(out var d) && d == Math.Floor(d) && d is >= int.MinValue and <= int.MaxValue) return (int)d;
        }
        throw Error(field, node is null ? "is missing" : $"must be an integer, not {Kind(node)}");
    }

    public int OptionalInt(JsonNode? node, string field, int fallback) => node is null ? fallback : Int(node, field);

    public string Type(JsonObject obj, string field) => String(obj["type"], field + ".type");

    private static string Kind(JsonNode node) => node switch
    {
        JsonObject => "an object",
        JsonArray => "an array",
        JsonValue v => v.GetValueKind() switch
        {
            JsonValueKind.String => $"the string \"{Shorten(v.ToString())}\"",
            JsonValueKind.Number => $"the number {v}",
            JsonValueKind.True or JsonValueKind.False => v.ToString(),
            _ => v.GetValueKind().ToString(),
        },
        _ => "null",
    };

    private static string Shorten(string s) => s.Length <= 40 ? s : s[..40] + "…";
}

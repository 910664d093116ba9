using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.Json.Nodes;
using Spectre.Console;

namespace AdapterFlow.Cli;

/// <summary>Where a command writes: plain streams for text and JSON, a Spectre console (same stdout) for tables.</summary>
public sealed class CliContext
{
    /// <summary>Compact, one line, non-ASCII kept readable.</summary>
    public static readonly JsonSerializerOptions ReadableJson = new()
    {
        WriteIndented = false,
        // Keep non-ASCII text readable in JSON output (it is UTF-8 anyway).
        Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
    };

    public CliContext(TextWriter stdout, TextWriter stderr)
    {
        Out = stdout;
        Err = stderr;
        Console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Out = new AnsiConsoleOutput(stdout),
            Ansi = AnsiSupport.Detect,
            ColorSystem = ColorSystemSupport.Detect,
            Interactive = InteractionSupport.Detect,
        });
    }

    public TextWriter Out { get; }
    public TextWriter Err { get; }

    /// <summary>Spectre console over <see cref="Out"/>: colours only when stdout is a terminal.</summary>
    public IAnsiConsole Console { get; }

    /// <summary>Writes one JSON object on one line (the machine-readable contract of --json).</summary>
    public void WriteJson(JsonNode node)
    {
        Out.WriteLine(node.ToJsonString(ReadableJson));
        Out.Flush();
    }
}

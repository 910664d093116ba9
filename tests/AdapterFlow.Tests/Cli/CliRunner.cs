using System.Text.Json;
using AdapterFlow.Cli;

namespace AdapterFlow.Tests.Cli;

/// <summary>One in-process run of the command line.</summary>
public sealed record CliRun(int ExitCode, string Stdout, string Stderr)
{
    public string[] StderrLines => Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries);
    public string[] StdoutLines => Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => l.TrimEnd('\r')).ToArray();

    /// <summary>The last stdout line parsed as JSON (the --json contract).</summary>
    public JsonElement LastJson()
    {
        Assert.True(StdoutLines.Length > 0, "no stdout");
        using var doc = JsonDocument.Parse(StdoutLines[^1]);
        Assert.Equal(JsonValueKind.Object, doc.RootElement.ValueKind);
        return doc.RootElement.Clone();
    }

    /// <summary>Fails with the captured output when the run did not succeed.</summary>
    public CliRun AssertSuccess()
    {
        Assert.True(ExitCode == 0, $"exit {ExitCode}\nstdout:\n{Stdout}\nstderr:\n{Stderr}");
        return this;
    }

    /// <summary>The usage-error contract: exit code 2 and exactly one "error: ..." line on stderr.</summary>
    public string AssertUsageError()
    {
        Assert.True(ExitCode == 2, $"expected exit 2, got {ExitCode}\nstdout:\n{Stdout}\nstderr:\n{Stderr}");
        var lines = StderrLines;
        Assert.True(lines.Length == 1, $"expected one stderr line, got {lines.Length}:\n{Stderr}");
        Assert.StartsWith("error: ", lines[0]);
        Assert.DoesNotContain("   at ", Stderr); // no stack trace
        return lines[0];
    }
}

public static class CliRunner
{
    public static CliRun Run(params string[] args)
    {
        using var stdout = new StringWriter();
        using var stderr = new StringWriter();
        int code = CliApp.Run(args, stdout, stderr);
        return new CliRun(code, stdout.ToString(), stderr.ToString());
    }
}

/// <summary>A temporary folder deleted at the end of the test.</summary>
public sealed class TempDir : IDisposable
{
    public TempDir() => Directory.CreateDirectory(Path);
    public string Path { get; } = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "adapterflow-cli-" + Guid.NewGuid().ToString("N")[..12]);
    public string File(string name) => System.IO.Path.Combine(Path, name);
    public void Dispose()
    {
        try { Directory.Delete(Path, recursive: true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }
}

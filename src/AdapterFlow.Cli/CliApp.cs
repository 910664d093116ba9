using System.CommandLine;
using System.CommandLine.Help;
using System.CommandLine.Invocation;
using AdapterFlow.Cli.Commands;

namespace AdapterFlow.Cli;

/// <summary>
/// The <c>adapterflow</c> command line. A thin front end: it parses arguments, calls the library and prints.
/// Exit codes: 0 success, 2 bad arguments or input files (one <c>error: ...</c> line on stderr), 1 an
/// unexpected failure (also one line; set ADAPTERFLOW_DEBUG=1 for the stack trace).
/// </summary>
public static class CliApp
{
    public const int Success = 0;
    public const int Failure = 1;
    public const int UsageError = 2;

    /// <summary>Stopped by Ctrl-C / SIGINT after writing what was done (128 + SIGINT, as shells report it).</summary>
    public const int Interrupted = 130;

    /// <summary>Runs one command line, writing to the given streams; returns the exit code.</summary>
    public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
    {
        var context = new CliContext(stdout, stderr);
        var root = BuildRoot(context);
        // With no command at all, show the overview rather than a bare "required command" error.
        if (args.Length == 0) args = ["--help"];
        var parse = root.Parse(args);
        if (parse.Action is ParseErrorAction || (parse.Errors.Count > 0 && parse.Action is not HelpAction))
        {
            // An unknown word is the likeliest mistake; report it rather than its consequences ("command required").
            var first = parse.UnmatchedTokens.Count > 0
                ? $"unrecognized command or argument '{parse.UnmatchedTokens[0]}' (see adapterflow --help)"
                : parse.Errors.Count > 0 ? parse.Errors[0].Message : "invalid command line";
            return ReportError(stderr, first, UsageError);
        }
        try
        {
            return parse.Invoke(new InvocationConfiguration
            {
                Output = stdout,
                Error = stderr,
                EnableDefaultExceptionHandler = false,
            });
        }
        catch (Exception e)
        {
            // A single place turns exceptions into one line: library errors name the file/field/tensor already.
            var inner = e is AggregateException { InnerExceptions.Count: 1 } a ? a.InnerException! : e;
            // Ctrl-C in a command that has nothing partial to report (training, quickstart): say so, exit as shells expect.
            if (inner is OperationCanceledException) return ReportError(stderr, "interrupted", Interrupted);
            bool usage = IsUserError(inner);
            if (!usage && Environment.GetEnvironmentVariable("ADAPTERFLOW_DEBUG") == "1") stderr.WriteLine(inner.ToString());
            var message = usage ? inner.Message : $"unexpected {inner.GetType().Name}: {inner.Message}";
            return ReportError(stderr, message, usage ? UsageError : Failure);
        }
    }

    /// <summary>The root command with every subcommand; <paramref name="context"/> supplies the output streams.</summary>
    internal static RootCommand BuildRoot(CliContext context)
    {
        var root = new RootCommand(
            "AdapterFlow: parameter-efficient fine-tuning, evaluation and fast generation for open LLMs in .NET.\n" +
            "Models are Hugging Face folders (config.json + model.safetensors, tokenizer.json beside them).")
        {
            // Also when run in-process (tests) or via `dotnet run`, help shows the installed command's name.
            HelpName = "adapterflow",
        };
        root.Add(InitCommand.Create(context));
        root.Add(InspectCommand.Create(context));
        root.Add(GenerateCommand.Create(context));
        root.Add(BenchSpeculativeCommand.Create(context));
        root.Add(DraftVocabCommand.Create(context));
        root.Add(TokenizeCommand.Create(context));
        root.Add(ForwardCommand.Create(context));
        root.Add(QuickstartCommand.Create(context));
        root.Add(EvalCommand.Create(context));
        root.Add(MergeCommand.Create(context));
        root.Add(TrainCommand.Create(context));
        return root;
    }

    /// <summary>Errors caused by the user's arguments or files (exit 2), as opposed to bugs (exit 1).</summary>
    private static bool IsUserError(Exception e) => e is CliUsageException or InvalidDataException or IOException
        or ArgumentException or NotSupportedException or KeyNotFoundException or UnauthorizedAccessException
        or FormatException or System.Text.Json.JsonException or OperationCanceledException;

    private static int ReportError(TextWriter stderr, string message, int code)
    {
        // Exactly one line, whatever the message held.
        var oneLine = string.Join(" ", message.Split(['\r', '\n'], StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries));
        stderr.WriteLine($"error: {oneLine}");
        stderr.Flush();
        return code;
    }
}

/// <summary>A mistake in how the command was called, found after parsing (e.g. two options that exclude each other).</summary>
public sealed class CliUsageException(string message) : Exception(message);

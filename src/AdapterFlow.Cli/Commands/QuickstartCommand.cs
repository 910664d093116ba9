using System.CommandLine;

namespace AdapterFlow.Cli.Commands;

/// <summary><c>adapterflow quickstart</c>: the whole story on a small built-in example.</summary>
internal static class QuickstartCommand
{
    public static Command Create(CliContext context)
    {
        var output = new Option<string>("--out", "-o")
        {
            Description = "Folder for the quickstart model (default: a new folder under the system temp folder).",
            HelpName = "DIR",
        };
        var device = CommonOptions.Device();
        var json = CommonOptions.Json("End with one JSON object on the last line: paths, sizes, generated text and timings.");
        var command = new Command("quickstart",
            "Create a small LLaMA-family model and tokenizer, save it, load it back and generate from it, explaining each step.")
        {
            output, device, json,
        };
        command.SetAction(int (parse) =>
        {
            Devices.Parse(parse.GetRequiredValue(device));
            throw new NotSupportedException("quickstart is not available yet");
        });
        return command;
    }
}

using System.CommandLine;
using System.Globalization;
using System.Text.Json.Nodes;
using AdapterFlow.Models;
using Spectre.Console;

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
        var preset = new Option<string>("--preset", "-p")
        {
            Description = "Model size: small (~15M parameters) or tiny (~1M, seconds).",
            DefaultValueFactory = _ => "small",
            HelpName = string.Join("|", ModelPresets.Names),
        }.AcceptOnlyFromAmong([.. ModelPresets.Names]);
        var device = CommonOptions.Device();
        var json = CommonOptions.Json("Print only one JSON object (paths, sizes, generated text, timings in seconds) instead of the step-by-step report.");
        var command = new Command("quickstart",
            "Create a small LLaMA-family model and tokenizer, save it, load it back and generate from it, explaining each step.")
        {
            output, preset, device, json,
        };
        command.SetAction(parse =>
        {
            var options = new QuickstartOptions
            {
                Directory = parse.GetValue(output),
                Preset = parse.GetRequiredValue(preset),
                Device = Devices.Parse(parse.GetRequiredValue(device)),
            };
            bool asJson = parse.GetValue(json);
            if (!asJson)
                context.Console.MarkupLine("[bold]AdapterFlow quickstart[/]: a LLaMA-family model from scratch, saved, reloaded and generating.");
            var result = Quickstart.Run(options, asJson ? null : step =>
                context.Console.MarkupLine(
                    $"[green]{step.Number}.[/] [bold]{Markup.Escape(step.Title)}[/] [grey]({Format.Number(step.Elapsed.TotalSeconds)} s)[/]\n   {Markup.Escape(step.Detail)}"));
            if (asJson)
            {
                context.WriteJson(new JsonObject
                {
                    ["directory"] = result.Directory,
                    ["architecture"] = result.Architecture,
                    ["parameters"] = result.Parameters,
                    ["vocab_size"] = result.VocabSize,
                    ["files"] = new JsonArray(result.Files.Select(f => (JsonNode?)f).ToArray()),
                    ["bytes_on_disk"] = result.BytesOnDisk,
                    ["reload_max_difference"] = result.ReloadMaxDifference,
                    ["prompt"] = result.Prompt,
                    ["text"] = result.GeneratedText,
                    ["new_tokens"] = result.NewTokens,
                    ["tokens_per_second"] = Math.Round(result.TokensPerSecond, 2),
                    ["prefill_tokens_per_second"] = Math.Round(result.PrefillTokensPerSecond, 2),
                    ["steps"] = new JsonArray(result.Steps.Select(s => (JsonNode?)new JsonObject
                    {
                        ["title"] = s.Title,
                        ["seconds"] = Math.Round(s.Elapsed.TotalSeconds, 4),
                    }).ToArray()),
                    ["seconds"] = Math.Round(result.Total.TotalSeconds, 3),
                });
                return CliApp.Success;
            }
            var table = new Table().Title("quickstart summary").AddColumn("").AddColumn("");
            table.HideHeaders();
            table.AddRow("model", Markup.Escape($"{result.Architecture}, {Format.Count(result.Parameters)} parameters, vocabulary {result.VocabSize}"));
            table.AddRow("folder", Markup.Escape($"{result.Directory} ({Format.Bytes(result.BytesOnDisk)})"));
            table.AddRow("prompt", Markup.Escape(result.Prompt));
            table.AddRow("continuation", Markup.Escape(result.GeneratedText.ReplaceLineEndings(" ")));
            table.AddRow("speed", $"{Format.Number(result.TokensPerSecond, "0.#")} tokens/s decode, {Format.Number(result.PrefillTokensPerSecond, "0")} tokens/s prefill");
            table.AddRow("total time", $"{Format.Number(result.Total.TotalSeconds)} s");
            context.Console.Write(table);
            context.Console.MarkupLine(Markup.Escape($"Next: adapterflow inspect {result.Directory}") + "\n" +
                                       Markup.Escape($"      adapterflow generate --model {result.Directory} --prompt \"Once upon a time\""));
            return CliApp.Success;
        });
        return command;
    }
}

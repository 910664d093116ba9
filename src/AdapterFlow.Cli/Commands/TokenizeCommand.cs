using System.CommandLine;
using AdapterFlow.IO;

namespace AdapterFlow.Cli.Commands;

/// <summary><c>adapterflow tokenize</c>: ids and tokens of texts.</summary>
internal static class TokenizeCommand
{
    public static Command Create(CliContext context)
    {
        var tokenizer = new Option<string>("--tokenizer", "-t")
        {
            Description = "A folder with tokenizer.json (a model folder works), or the tokenizer.json file itself.",
            Required = true,
            HelpName = "DIR",
        };
        var text = new Option<string>("--text")
        {
            Description = "The text to tokenize. Give --text or --file.",
            HelpName = "TEXT",
        };
        var file = new Option<string>("--file", "-f")
        {
            Description = "Texts to tokenize: a .jsonl file holds one JSON object with a \"text\" field per line; any other file holds one text per line.",
            HelpName = "FILE",
        };
        var special = new Option<bool>("--add-special-tokens")
        {
            Description = "Add the tokenizer's special tokens (e.g. BOS) as its post-processor defines them.",
        };
        var json = CommonOptions.Json("Print one JSON object per text: {\"text\", \"ids\", \"tokens\"}.");
        var command = new Command("tokenize", "Show the token ids and tokens a tokenizer gives for texts.")
        {
            tokenizer, text, file, special, json,
        };
        command.Validators.Add(result =>
        {
            bool hasText = result.GetResult(text) is not null, hasFile = result.GetResult(file) is not null;
            if (hasText == hasFile) result.AddError("give exactly one of --text or --file");
        });
        command.SetAction(int (parse) =>
        {
            var texts = parse.GetValue(text) is { } single ? [single] : TextInputs.Read(parse.GetRequiredValue(file));
            throw new NotSupportedException($"tokenize is not available yet ({texts.Count} texts)");
        });
        return command;
    }
}

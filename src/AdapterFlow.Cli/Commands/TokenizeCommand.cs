using System.CommandLine;
using System.Text.Json.Nodes;
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
        command.SetAction(parse =>
        {
            var tok = TextModel.LoadTokenizer(parse.GetRequiredValue(tokenizer));
            var texts = parse.GetValue(text) is { } single ? [single] : TextInputs.Read(parse.GetRequiredValue(file));
            bool addSpecial = parse.GetValue(special), asJson = parse.GetValue(json);
            foreach (var t in texts)
            {
                var encoded = tok.EncodeWithTokens(t, addSpecial);
                var ids = new JsonArray(encoded.Ids.Select(i => (JsonNode?)i).ToArray());
                var tokens = new JsonArray(encoded.Tokens.Select(s => (JsonNode?)s).ToArray());
                if (asJson)
                {
                    context.WriteJson(new JsonObject { ["text"] = t, ["ids"] = ids, ["tokens"] = tokens });
                    continue;
                }
                context.Out.WriteLine($"{JsonValue.Create(t).ToJsonString(CliContext.ReadableJson)}  ({encoded.Ids.Length} tokens)");
                context.Out.WriteLine($"  ids:    {ids.ToJsonString(CliContext.ReadableJson)}");
                context.Out.WriteLine($"  tokens: {tokens.ToJsonString(CliContext.ReadableJson)}");
            }
            context.Out.Flush();
            return CliApp.Success;
        });
        return command;
    }
}

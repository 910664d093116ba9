using System.CommandLine;
using System.Text.Json.Nodes;
using AdapterFlow.Adapters;

namespace AdapterFlow.Cli.Commands;

/// <summary><c>adapterflow merge</c>: fold a LoRA/DoRA/IA3 adapter into the model's weights and save the result.</summary>
internal static class MergeCommand
{
    public static Command Create(CliContext context)
    {
        var model = CommonOptions.ModelDir("The model folder (config.json + model.safetensors; tokenizer files are copied along).");
        var adapter = new Option<string>("--adapter")
        {
            Description = "The PEFT adapter folder to merge (LoRA, DoRA or IA3).",
            Required = true,
            HelpName = "DIR",
        };
        var output = new Option<string>("--out", "-o")
        {
            Description = "Folder to write the merged model to (Hugging Face layout; must not already hold a model).",
            Required = true,
            HelpName = "DIR",
        };
        var json = CommonOptions.Json("Print one JSON object: out, peft_type, merged_modules, copied_files.");
        var command = new Command("merge",
            "Merge an adapter into a model's weights (PEFT's merge_and_unload) and save a plain model that needs no adapter.")
        {
            model, adapter, output, json,
        };
        command.SetAction(parse =>
        {
            var result = AdapterMerge.MergeToFolder(parse.GetRequiredValue(model), parse.GetRequiredValue(adapter), parse.GetRequiredValue(output));
            if (parse.GetValue(json))
            {
                context.WriteJson(new JsonObject
                {
                    ["out"] = result.Directory,
                    ["peft_type"] = result.PeftType,
                    ["merged_modules"] = result.MergedModules,
                    ["copied_files"] = new JsonArray(result.CopiedFiles.Select(f => (JsonNode?)JsonValue.Create(f)).ToArray()),
                });
            }
            else
            {
                context.Out.WriteLine($"{result.PeftType} adapter merged into {result.MergedModules} modules; model written to {result.Directory}" +
                                      (result.CopiedFiles.Count > 0 ? $" (with {string.Join(", ", result.CopiedFiles)})" : ""));
            }
            return CliApp.Success;
        });
        return command;
    }
}

using System.CommandLine;
using System.Globalization;
using System.Text.Json.Nodes;
using Spectre.Console;
using AdapterFlow.IO;
using AdapterFlow.Models;

namespace AdapterFlow.Cli.Commands;

/// <summary><c>adapterflow init</c>: a fresh, randomly initialised model and a matching tokenizer.</summary>
internal static class InitCommand
{
    public static Command Create(CliContext context)
    {
        var arch = new Option<string>("--arch", "-a")
        {
            Description = $"Model family: {string.Join(", ", ModelPresets.Architectures)}.",
            Required = true,
            HelpName = string.Join("|", ModelPresets.Architectures),
        }.AcceptOnlyFromAmong([.. ModelPresets.Architectures]);
        var preset = new Option<string>("--preset", "-p")
        {
            Description = "Model size: tiny (~1M parameters, for tests), small (~10-30M parameters, quick experiments) or base (the benchmark shape: hidden 768, 12 layers, 12 heads; 109.5M parameters with a 32,000-token tokenizer such as Llama-2's; give it one with --tokenizer).",
            DefaultValueFactory = _ => "tiny",
            HelpName = string.Join("|", ModelPresets.Names),
        }.AcceptOnlyFromAmong([.. ModelPresets.Names]);
        var output = new Option<string>("--out", "-o")
        {
            Description = "Folder to write config.json, model.safetensors, tokenizer.json and tokenizer_config.json to (created if absent; must not already hold a model).",
            Required = true,
            HelpName = "DIR",
        };
        var seed = new Option<long>("--seed")
        {
            HelpName = "N",
            Description = "Random seed of the weight initialisation (same seed, same weights).",
            DefaultValueFactory = _ => 0,
        };
        var tokenizer = new Option<string?>("--tokenizer")
        {
            HelpName = "PATH",
            Description = "Use this tokenizer (a tokenizer.json file, or a folder holding one with its tokenizer_config.json) instead of training a byte-level BPE on the built-in corpus; the model's vocabulary size and special token ids are taken from it.",
        };
        var json = CommonOptions.Json("Print what was written (paths, parameters, vocabulary) as one JSON object.");
        var command = new Command("init",
            "Create a randomly initialised model of a family and size, with a byte-level BPE tokenizer whose vocabulary matches it, in the Hugging Face layout.")
        {
            arch, preset, output, seed, tokenizer, json,
        };
        command.SetAction(parse => Run(context, parse.GetRequiredValue(arch), parse.GetRequiredValue(preset),
            parse.GetRequiredValue(output), parse.GetValue(seed), parse.GetValue(tokenizer), parse.GetValue(json)));
        return command;
    }

    private static int Run(CliContext context, string arch, string preset, string output, long seed, string? tokenizerPath, bool json)
    {
        HFTokenizer? tokenizer = null;
        if (tokenizerPath is not null)
        {
            if (Directory.Exists(tokenizerPath)) tokenizer = HFTokenizer.FromDirectory(tokenizerPath);
            else if (File.Exists(tokenizerPath)) tokenizer = HFTokenizer.FromFile(tokenizerPath);
            else throw new FileNotFoundException($"--tokenizer {tokenizerPath}: no such file or folder");
        }
        var info = FreshModel.Create(arch, preset, output, seed, tokenizer: tokenizer);
        if (json)
        {
            context.WriteJson(new JsonObject
            {
                ["directory"] = info.Directory,
                ["model_type"] = info.Config.ModelType,
                ["architecture"] = info.Config.Architecture,
                ["preset"] = info.Preset,
                ["seed"] = info.Seed,
                ["parameters"] = info.Parameters,
                ["vocab_size"] = info.VocabSize,
                ["files"] = new JsonArray(info.Files.Select(f => (JsonNode?)f).ToArray()),
            });
            return CliApp.Success;
        }
        var c = info.Config;
        var table = new Table().AddColumn("property").AddColumn("value");
        table.AddRow("folder", Markup.Escape(info.Directory));
        table.AddRow("architecture", Markup.Escape($"{c.Architecture} ({info.Preset}, seed {info.Seed})"));
        table.AddRow("parameters", $"{Format.Count(info.Parameters)} ({info.Parameters.ToString("N0", CultureInfo.InvariantCulture)})");
        table.AddRow("shape", $"{c.NumHiddenLayers} layers, hidden {c.HiddenSize}, {c.NumAttentionHeads} heads / {c.NumKeyValueHeads} kv heads");
        table.AddRow("vocabulary", tokenizerPath is null
            ? $"{info.VocabSize} (byte-level BPE trained on the built-in corpus)"
            : Markup.Escape($"{info.VocabSize} (from {tokenizerPath})"));
        table.AddRow("files", Markup.Escape(string.Join(", ", info.Files)));
        context.Console.Write(table);
        return CliApp.Success;
    }
}

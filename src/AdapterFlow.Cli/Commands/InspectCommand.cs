using System.CommandLine;
using System.Globalization;
using AdapterFlow.Models;
using Spectre.Console;

namespace AdapterFlow.Cli.Commands;

/// <summary><c>adapterflow inspect DIR [--json]</c>: what a model folder holds, without loading the weights.</summary>
internal static class InspectCommand
{
    public static Command Create(CliContext context)
    {
        var directory = new Argument<string>("DIR")
        {
            Description = "A Hugging Face model folder (config.json + model.safetensors or a sharded set).",
        };
        var json = CommonOptions.Json("Print the summary as one JSON object instead of a table.");
        var command = new Command("inspect",
            "Show a model's family, size, dtype and shape (layers, heads, hidden size, vocabulary, context) from its config and weight headers.")
        {
            directory,
            json,
        };
        command.SetAction(parse =>
        {
            var summary = ModelSummary.Read(parse.GetRequiredValue(directory));
            if (parse.GetValue(json)) context.WriteJson(summary.ToJson());
            else context.Console.Write(Table(summary));
            return CliApp.Success;
        });
        return command;
    }

    internal static Table Table(ModelSummary s)
    {
        var table = new Table().Title(Markup.Escape(s.Path)).AddColumn("property").AddColumn("value");
        void Row(string name, string value) => table.AddRow(Markup.Escape(name), Markup.Escape(value));
        Row("family", s.ModelType);
        Row("architecture", s.Architecture);
        Row("parameters", $"{Format.Count(s.Parameters)} ({s.Parameters.ToString("N0", CultureInfo.InvariantCulture)})");
        Row("dtype", s.DTypes.Count > 0 ? string.Join(", ", s.DTypes) : s.ConfigDType ?? "?");
        Row("checkpoint size", Format.Bytes(s.CheckpointBytes) + $" in {s.Tensors} tensors");
        Row("layers", s.Layers.ToString(CultureInfo.InvariantCulture));
        Row("attention heads", s.KeyValueHeads == s.Heads
            ? $"{s.Heads} (head dim {s.HeadDim})"
            : $"{s.Heads} query / {s.KeyValueHeads} key-value (grouped-query, head dim {s.HeadDim})");
        Row("hidden size", s.HiddenSize.ToString(CultureInfo.InvariantCulture));
        Row("MLP size", s.IntermediateSize.ToString(CultureInfo.InvariantCulture));
        Row("vocabulary", s.VocabSize.ToString(CultureInfo.InvariantCulture));
        Row("context length", s.ContextLength?.ToString(CultureInfo.InvariantCulture) ?? "unbounded (ALiBi)");
        Row("tied embeddings", s.TiedEmbeddings ? "yes" : "no");
        Row("special tokens", $"bos {s.BosTokenId?.ToString(CultureInfo.InvariantCulture) ?? "-"}, " +
                              $"eos {(s.EosTokenIds.Count > 0 ? string.Join("/", s.EosTokenIds) : "-")}, " +
                              $"pad {s.PadTokenId?.ToString(CultureInfo.InvariantCulture) ?? "-"}");
        Row("tokenizer.json", s.HasTokenizer ? "present" : "absent");
        return table;
    }
}

using System.CommandLine;
using AdapterFlow.Adapters;
using AdapterFlow.Models;

namespace AdapterFlow.Cli.Commands;

/// <summary><c>adapterflow forward</c>: logits for token ids stored in a safetensors file.</summary>
internal static class ForwardCommand
{
    public static Command Create(CliContext context)
    {
        var model = CommonOptions.ModelDir("The model folder (config.json + model.safetensors).");
        var adapter = CommonOptions.Adapter();
        var inputs = new Option<string>("--inputs")
        {
            Description = "A safetensors file with 'input_ids' (integer, [batch, time]) and optionally 'attention_mask' (same shape, 1 = real token, 0 = padding).",
            Required = true,
            HelpName = "IN.safetensors",
        };
        var output = new Option<string>("--out", "-o")
        {
            Description = "Where to write 'logits' (float32, [batch, time, vocab]) as safetensors.",
            Required = true,
            HelpName = "OUT.safetensors",
        };
        var device = CommonOptions.Device();
        var dtype = CommonOptions.DType();
        var command = new Command("forward",
            "Run a model on token ids from a safetensors file and save its logits: for checking against transformers or scripting.")
        {
            model, adapter, inputs, output, device, dtype,
        };
        command.SetAction(parse =>
        {
            var adapterDir = parse.GetValue(adapter);
            if (adapterDir is not null && !Directory.Exists(adapterDir)) throw new DirectoryNotFoundException($"{adapterDir}: adapter folder not found");
            var target = Devices.Parse(parse.GetRequiredValue(device));
            var inputsPath = parse.GetRequiredValue(inputs);
            if (!File.Exists(inputsPath)) throw new FileNotFoundException($"{inputsPath}: inputs file not found");
            using var lm = AutoModel.FromPretrained(parse.GetRequiredValue(model),
                new LoadOptions { Device = target, DType = parse.GetValue(dtype) is { } d ? Devices.ParseDType(d) : null });
            var outPath = parse.GetRequiredValue(output);
            // The adapted model wraps lm (disposed above), so it needs no disposal of its own.
            CausalLM run = adapterDir is null ? lm : PeftModel.FromPretrained(lm, adapterDir);
            var result = TensorFileForward.Run(run, inputsPath, outPath);
            context.Out.WriteLine($"logits [{result.Batch}, {result.Time}, {result.Vocab}] written to {outPath}" +
                                  (result.HadAttentionMask ? " (attention_mask applied)" : "") +
                                  (adapterDir is null ? "" : $" with adapter {adapterDir}"));
            return CliApp.Success;
        });
        return command;
    }
}

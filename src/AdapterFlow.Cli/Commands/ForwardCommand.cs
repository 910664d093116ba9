using System.CommandLine;
using AdapterFlow.Models;

namespace AdapterFlow.Cli.Commands;

/// <summary><c>adapterflow forward</c>: logits for token ids stored in a safetensors file.</summary>
internal static class ForwardCommand
{
    public static Command Create(CliContext context)
    {
        var model = CommonOptions.ModelDir("The model folder (config.json + model.safetensors).");
        var adapter = new Option<string>("--adapter")
        {
            Description = "A PEFT adapter folder to apply on top of the model (adapter_config.json + adapter_model.safetensors).",
            HelpName = "DIR",
        };
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
            if (parse.GetValue(adapter) is { } adapterDir)
                throw new NotSupportedException($"--adapter {adapterDir}: adapters are not supported yet (they arrive with the adapters work)");
            var target = Devices.Parse(parse.GetRequiredValue(device));
            var inputsPath = parse.GetRequiredValue(inputs);
            if (!File.Exists(inputsPath)) throw new FileNotFoundException($"{inputsPath}: inputs file not found");
            using var lm = AutoModel.FromPretrained(parse.GetRequiredValue(model),
                new LoadOptions { Device = target, DType = parse.GetValue(dtype) is { } d ? Devices.ParseDType(d) : null });
            var outPath = parse.GetRequiredValue(output);
            var result = TensorFileForward.Run(lm, inputsPath, outPath);
            context.Out.WriteLine($"logits [{result.Batch}, {result.Time}, {result.Vocab}] written to {outPath}" +
                                  (result.HadAttentionMask ? " (attention_mask applied)" : ""));
            return CliApp.Success;
        });
        return command;
    }
}

using System.CommandLine;

namespace AdapterFlow.Cli.Commands;

/// <summary><c>adapterflow generate</c>: stream a continuation of a prompt.</summary>
internal static class GenerateCommand
{
    public static Command Create(CliContext context)
    {
        var model = CommonOptions.ModelDir("The model folder (config.json, model.safetensors and tokenizer.json).");
        var prompt = new Option<string>("--prompt")
        {
            Description = "The text to continue.",
            Required = true,
            HelpName = "TEXT",
        };
        var maxNewTokens = new Option<int>("--max-new-tokens", "-n")
        {
            HelpName = "N",
            Description = "Maximum number of tokens to generate.",
            DefaultValueFactory = _ => 64,
        }.Check(n => n >= 1, "must be at least 1");
        var temperature = new Option<double>("--temperature")
        {
            HelpName = "T",
            Description = "Sampling temperature; 0 = greedy (always the most likely token).",
            DefaultValueFactory = _ => 0.8,
        }.Check(t => t >= 0 && double.IsFinite(t), "must be 0 or more");
        var topK = new Option<int>("--top-k")
        {
            HelpName = "K",
            Description = "Sample only from the K most likely tokens; 0 = no limit.",
            DefaultValueFactory = _ => 0,
        }.Check(k => k >= 0, "must be 0 or more");
        var topP = new Option<double>("--top-p")
        {
            HelpName = "P",
            Description = "Nucleus sampling: sample from the smallest set of tokens whose probability adds up to P; 1 = no limit.",
            DefaultValueFactory = _ => 1.0,
        }.Check(p => p > 0 && p <= 1, "must be in (0, 1]");
        var repetitionPenalty = new Option<double>("--repetition-penalty")
        {
            HelpName = "R",
            Description = "Penalty for tokens already in the prompt or output (as in transformers); 1 = none.",
            DefaultValueFactory = _ => 1.0,
        }.Check(r => r > 0 && double.IsFinite(r), "must be greater than 0");
        var seed = new Option<long?>("--seed")
        {
            HelpName = "S",
            Description = "Random seed for sampling (same seed, same output).",
        };
        var stop = new Option<string[]>("--stop")
        {
            Description = "Stop when the output contains this text (the stop text is not printed). Repeat for several.",
            HelpName = "STR",
            AllowMultipleArgumentsPerToken = false,
        };
        var device = CommonOptions.Device();
        var dtype = CommonOptions.DType();
        var json = CommonOptions.Json("After the streamed text, print one JSON object as the last line: text, token_ids, prompt_tokens, new_tokens, speeds, finish_reason.");
        var command = new Command("generate", "Generate a continuation of a prompt, streaming text as it is produced.")
        {
            model, prompt, maxNewTokens, temperature, topK, topP, repetitionPenalty, seed, stop, device, dtype, json,
        };
        command.SetAction(int (parse) =>
        {
            throw new NotSupportedException("generate is not available yet");
        });
        return command;
    }
}

namespace AdapterFlow.Tests.Cli;

/// <summary>Help text and argument errors: no model needed.</summary>
public class CliHelpAndErrorTests
{
    public static TheoryData<string, string[]> CommandOptions => new()
    {
        { "init", ["--arch", "--preset", "--out", "--seed", "--tokenizer", "--json"] },
        { "inspect", ["DIR", "--json"] },
        { "generate", ["--model", "--adapter", "--prompt", "--prompt-ids", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--repetition-penalty", "--seed", "--stop", "--device", "--dtype", "--json"] },
        { "tokenize", ["--tokenizer", "--text", "--file", "--add-special-tokens", "--out", "--json"] },
        { "forward", ["--model", "--adapter", "--inputs", "--out", "--device", "--dtype"] },
        { "quickstart", ["--out", "--seed", "--pretrain-steps", "--finetune-steps", "--eval-problems", "--layers", "--hidden-size", "--no-layerskip", "--device", "--json"] },
        { "merge", ["--model", "--adapter", "--out", "--json"] },
        { "train", ["--model", "--data", "--method", "--out", "--config", "--epochs", "--learning-rate", "--batch-size", "--micro-batch-size",
                    "--cutoff-len", "--warmup-steps", "--lr-scheduler", "--lora-r", "--lora-alpha", "--lora-dropout", "--target-modules",
                    "--train-on-inputs", "--seed", "--save-steps", "--save-total-limit", "--resume", "--max-steps", "--precision", "--device", "--json"] },
    };

    [Theory]
    [MemberData(nameof(CommandOptions))]
    public void Help_lists_every_option_with_a_description(string command, string[] options)
    {
        var run = CliRunner.Run(command, "--help").AssertSuccess();
        Assert.Empty(run.Stderr);
        foreach (var option in options)
        {
            // Option rows look like "  -m, --model <DIR> (REQUIRED)  description", argument rows like "  <DIR>  description".
            var line = run.StdoutLines.FirstOrDefault(l => System.Text.RegularExpressions.Regex.IsMatch(l,
                $@"^\s+(-\w, )?(<{option}>|{System.Text.RegularExpressions.Regex.Escape(option)})(\s|$)"));
            Assert.True(line is not null, $"{command} --help does not list {option}:\n{run.Stdout}");
            // A description follows the option's syntax on its line (two or more spaces, then words).
            Assert.Matches(@"\S\s{2,}\w", line);
        }
    }

    [Fact]
    public void Root_help_lists_every_command()
    {
        foreach (var args in new[] { Array.Empty<string>(), ["--help"] })
        {
            var run = CliRunner.Run(args).AssertSuccess();
            Assert.Contains("adapterflow [command] [options]", run.Stdout);
            foreach (var command in new[] { "init", "inspect", "generate", "tokenize", "forward", "quickstart", "merge", "train" })
                Assert.Contains("  " + command, run.Stdout);
        }
    }

    [Theory]
    [InlineData("unrecognized command or argument 'frobnicate'", "frobnicate")]
    [InlineData("--prompt", "generate", "--model", "m")]
    [InlineData("--temperature must be 0 or more", "generate", "--model", "m", "--prompt", "x", "--temperature", "-1")]
    [InlineData("--top-p must be in (0, 1]", "generate", "--model", "m", "--prompt", "x", "--top-p", "1.5")]
    [InlineData("--max-new-tokens", "generate", "--model", "m", "--prompt", "x", "--max-new-tokens", "many")]
    [InlineData("--max-new-tokens must be at least 1", "generate", "--model", "m", "--prompt", "x", "--max-new-tokens", "0")]
    [InlineData("'transformer'", "init", "--arch", "transformer", "--out", "x")]
    [InlineData("'huge'", "init", "--arch", "llama", "--preset", "huge", "--out", "x")]
    [InlineData("exactly one of --text or --file", "tokenize", "--tokenizer", "t")]
    [InlineData("exactly one of --text or --file", "tokenize", "--tokenizer", "t", "--text", "a", "--file", "b")]
    [InlineData("--inputs", "forward", "--model", "m", "--out", "o.safetensors")]
    [InlineData("unrecognized command or argument '--colour'", "inspect", "somewhere", "--colour")]
    public void Bad_arguments_give_one_error_line_and_exit_2(string expected, params string[] args)
    {
        var message = CliRunner.Run(args).AssertUsageError();
        Assert.Contains(expected, message);
    }

    [Fact]
    public void Missing_model_folder_is_named_in_the_error()
    {
        using var tmp = new TempDir();
        var missing = tmp.File("no-such-model");
        Assert.Contains(missing, CliRunner.Run("inspect", missing).AssertUsageError());
        Assert.Contains(missing, CliRunner.Run("generate", "--model", missing, "--prompt", "hi").AssertUsageError());
        Assert.Contains(missing, CliRunner.Run("tokenize", "--tokenizer", missing, "--text", "hi").AssertUsageError());
    }

    [Fact]
    public void Malformed_config_is_named_in_the_error()
    {
        using var tmp = new TempDir();
        File.WriteAllText(tmp.File("config.json"), "{ \"model_type\": \"llama\", ");
        var message = CliRunner.Run("inspect", tmp.Path).AssertUsageError();
        Assert.Contains("config.json", message);
    }

    [SkippableFact]
    public void Unknown_device_and_unavailable_cuda_are_clear_errors()
    {
        using var tmp = new TempDir();
        var inputs = tmp.File("in.safetensors");
        Assert.Contains("unknown device 'tpu'",
            CliRunner.Run("forward", "--model", tmp.Path, "--inputs", inputs, "--out", tmp.File("o.safetensors"), "--device", "tpu").AssertUsageError());
        Skip.If(TorchSharp.torch.cuda.is_available(), "CUDA is present");
        Assert.Contains("CUDA is not available",
            CliRunner.Run("quickstart", "--device", "cuda", "--out", tmp.File("qs")).AssertUsageError());
    }
}

using System.Text.Json;
using AdapterFlow.Adapters;
using AdapterFlow.Data;
using AdapterFlow.Models;
using AdapterFlow.Tests.Cli;
using AdapterFlow.Tests.Training;
using TorchSharp;

namespace AdapterFlow.Tests.Quickstart;

/// <summary>
/// The quickstart end to end with small knobs (the default run takes minutes; this one seconds). It seeds torch's
/// global generator (trainer, adapter initialisation), so it runs alone.
/// </summary>
[Collection(GlobalTorchRngCollection.Name)]
public class QuickstartTests
{
    private static readonly string[] SmallKnobs =
    [
        "--pretrain-steps", "6", "--finetune-steps", "4", "--pretrain-problems", "96", "--finetune-problems", "48",
        "--eval-problems", "6", "--layers", "2", "--hidden-size", "32", "--seed", "3",
    ];

    [Fact]
    public void Quickstart_json_reports_accuracies_and_keeps_base_adapter_and_merged_models_that_load_back()
    {
        using var dir = new TempDir();
        var outDir = dir.File("qs");
        var run = CliRunner.Run(["quickstart", "--out", outDir, "--json", .. SmallKnobs]).AssertSuccess();
        var json = run.LastJson();
        foreach (var key in new[] { "accuracy_before", "accuracy_after" })
            Assert.InRange(json.GetProperty(key).GetDouble(), 0, 1);
        Assert.True(json.GetProperty("seconds").GetDouble() > 0);
        Assert.Equal(6, json.GetProperty("held_out").GetInt32());
        Assert.Equal(6, json.GetProperty("new_skill_after").GetProperty("n").GetInt32());
        Assert.Equal(6, json.GetProperty("pretrained_skill_before").GetProperty("n").GetInt32());
        Assert.Equal(6, json.GetProperty("pretraining").GetProperty("steps").GetInt32());
        Assert.Equal(4, json.GetProperty("finetuning").GetProperty("steps").GetInt32());
        foreach (var run_ in new[] { "pretraining", "finetuning" })
        {
            Assert.True(double.IsFinite(json.GetProperty(run_).GetProperty("first_loss").GetDouble()));
            Assert.True(json.GetProperty(run_).GetProperty("tokens").GetInt64() > 0);
        }
        // Pretraining from scratch does learn: six steps already cut the loss of random weights.
        Assert.True(json.GetProperty("pretraining").GetProperty("final_loss").GetDouble() < json.GetProperty("pretraining").GetProperty("first_loss").GetDouble());
        long parameters = json.GetProperty("parameters").GetInt64(), adapter = json.GetProperty("adapter_parameters").GetInt64();
        Assert.InRange(adapter, 1, parameters / 2);
        Assert.Equal(2, json.GetProperty("layers").GetInt32());
        Assert.True(json.GetProperty("merge_max_difference").GetDouble() < 1e-4);
        Assert.Equal(Path.GetFullPath(outDir), json.GetProperty("out").GetString());
        Assert.Equal(JsonValueKind.String, json.GetProperty("sample").GetProperty("response").ValueKind);

        // The three folders are what they claim to be: HF model, PEFT adapter, HF model.
        var baseDir = Path.Combine(outDir, "base");
        var adapterDir = Path.Combine(outDir, "adapter");
        var mergedDir = Path.Combine(outDir, "merged");
        Assert.Equal(baseDir, json.GetProperty("base").GetString());
        Assert.True(File.Exists(Path.Combine(adapterDir, PeftModel.ConfigFile)));
        using var merged = AutoModel.FromPretrained(mergedDir);
        using var baseModel = AutoModel.FromPretrained(baseDir);
        Assert.Equal(parameters, baseModel.ParameterCount());
        var peft = PeftModel.FromPretrained(baseModel, adapterDir);
        Assert.Equal("LORA", peft.ActiveConfig.PeftType);
        var tokenizer = AdapterFlow.IO.HFTokenizer.FromFile(Path.Combine(baseDir, "tokenizer.json"));
        var test = MathDataset.Load(Path.Combine(outDir, "data", "multiplication-test.json"));
        Assert.Equal(6, test.Items.Count);
        var ids = tokenizer.Encode(AdapterFlow.Evaluation.MathPrompt.Format(test.Items[0].Instruction) + test.Items[0].Output, addSpecialTokens: true);
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        var input = torch.tensor(ids.Select(i => (long)i).ToArray()).unsqueeze(0);
        var adapted = peft.Logits(input);
        var folded = merged.Logits(input);
        Assert.True((adapted - folded).abs().max().item<float>() < 1e-4, "merged logits differ from base+adapter logits");
        // ...and the adapter is not a no-op, so the equality above says something.
        using (peft.DisableAdapters())
            Assert.True((peft.Logits(input) - adapted).abs().max().item<float>() > 1e-5, "the adapter does not change the logits");
    }

    [Fact]
    public void Quickstart_tells_people_each_step_and_ends_with_a_table_and_keeps_nothing_without_out()
    {
        var before = Directory.GetDirectories(Path.GetTempPath(), "adapterflow-quickstart-*").ToHashSet();
        var run = CliRunner.Run(["quickstart", .. SmallKnobs]).AssertSuccess();
        foreach (var step in new[] { "Generate problems", "Train a tokenizer", "Create a model", "Pretrain", "Evaluate before",
                     "Fine-tune a LoRA adapter", "Evaluate after", "Save the adapter", "Merge", "Generate", "quickstart summary", "multiplication" })
            Assert.Contains(step, run.Stdout);
        Assert.Empty(run.Stderr);
        // The temporary folder is gone.
        Assert.DoesNotContain(Directory.GetDirectories(Path.GetTempPath(), "adapterflow-quickstart-*"), d => !before.Contains(d));
    }

    [Fact]
    public void The_same_seed_gives_the_same_run()
    {
        var options = new QuickstartOptions
        {
            PretrainSteps = 3, FinetuneSteps = 2, PretrainProblems = 48, FinetuneProblems = 24, EvalProblems = 4, Layers = 1, HiddenSize = 32, Seed = 5,
        };
        var first = AdapterFlow.Quickstart.Run(options);
        var second = AdapterFlow.Quickstart.Run(options);
        Assert.Equal(first.Pretraining.FinalLoss, second.Pretraining.FinalLoss);
        Assert.Equal(first.Finetuning.FinalLoss, second.Finetuning.FinalLoss);
        Assert.Equal(first.SampleResponse, second.SampleResponse);
        Assert.Null(first.Directory);
    }

    [Fact]
    public void Bad_knobs_and_an_occupied_folder_are_one_line_errors()
    {
        Assert.Contains("--pretrain-steps", CliRunner.Run("quickstart", "--pretrain-steps", "0").AssertUsageError());
        Assert.Contains("HiddenSize", CliRunner.Run("quickstart", "--hidden-size", "36").AssertUsageError());
        using var dir = new TempDir();
        Directory.CreateDirectory(dir.File("base"));
        File.WriteAllText(Path.Combine(dir.File("base"), "config.json"), "{}");
        Assert.Contains("already holds", CliRunner.Run("quickstart", "--out", dir.Path).AssertUsageError());
    }
}

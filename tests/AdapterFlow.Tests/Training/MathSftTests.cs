using AdapterFlow.Adapters;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.Data;
using AdapterFlow.Training;

namespace AdapterFlow.Tests.Training;

/// <summary>The whole SFT pipeline on real files: LLM-Adapters' math training set, stories260K and its tokenizer.</summary>
public class MathSftTests
{
    [SkippableFact]
    public void Lora_sft_on_llm_adapters_math_data_lowers_the_loss_on_stories260K()
    {
        var modelDir = SharedFiles.Require("models", "stories260K-hf");
        var dataFile = Path.Combine(SharedFiles.Require("data", "math"), "math_data.json");
        // The file holds a few records with an empty output: failing names the first, skipping counts them.
        Assert.Matches(@"math_data\.json:\d+: field 'output' is empty$", Assert.Throws<InvalidDataException>(() => InstructionDataset.Load(dataFile)).Message);
        var loaded = InstructionDataset.Load(dataFile, BadRecordPolicy.Skip);
        Assert.True(loaded.Items.Count > 1000, $"{loaded.Items.Count} records");
        Assert.InRange(loaded.SkippedCount, 1, 10);
        Assert.All(loaded.Problems, p => Assert.EndsWith("field 'output' is empty", p));

        using var lm = TextModel.Load(modelDir);
        var items = loaded.Items.Take(8).ToArray();
        var data = SftTokenizer.Tokenize(items, lm.Tokenizer, new SftOptions { CutoffLength = 512 });
        // The response tokens (labels) decode to the output: the prompt is masked at the right place.
        int whole = 0;
        for (int i = 0; i < items.Length; i++)
        {
            var labelled = data.Examples[i].Labels.Where(l => l != Example.IgnoreIndex).ToArray();
            var decoded = lm.Tokenizer.Decode(labelled, skipSpecialTokens: true).Trim();
            if (data.Examples[i].Length < 512)
            {
                whole++;
                Assert.Equal(lm.Tokenizer.EosTokenId, labelled[^1]);
                Assert.Equal(items[i].Output.Trim(), decoded);
            }
            else Assert.StartsWith(decoded, items[i].Output.Trim());
        }
        Assert.True(whole > 0, $"lengths {string.Join(", ", data.Examples.Select(e => e.Length))}");

        var peft = PeftModel.Create(lm.Model, new LoraConfig { R = 8, LoraAlpha = 16, TargetModules = ModuleSelector.Pattern(ModuleSelector.AllLinear) });
        using var trainer = Trainer.ForAdapter(peft, new TrainerOptions
        {
            LearningRate = 1e-2, Schedule = LrScheduleKind.Constant, BatchSize = 8, MicroBatchSize = 4, MaxSteps = 12, GroupByLength = true,
        });
        var result = trainer.Train(data.Examples, new Collator(lm.Tokenizer.PadTokenId ?? 0, padToMultipleOf: 8));
        Assert.True(result.FinalLoss < 0.8 * result.Steps[0].Loss, $"loss {result.Steps[0].Loss} → {result.FinalLoss}");
    }
}

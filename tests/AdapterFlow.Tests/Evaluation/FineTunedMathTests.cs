using AdapterFlow.Data;
using AdapterFlow.Evaluation;
using AdapterFlow.IO;
using AdapterFlow.Models;
using AdapterFlow.Tests.Training;
using AdapterFlow.Training;

namespace AdapterFlow.Tests.Evaluation;

/// <summary>
/// The library end to end on a few problems: tokenizer → tiny LLaMA → SFT (LLM-Adapters' training template, prompt
/// masked) → <see cref="MathEvaluator"/> (LLM-Adapters' evaluation template and scoring). Trained on the very items it
/// is scored on, the model must get all of them: anything less means the pieces disagree (template, masking, EOS,
/// stop strings, answer extraction). Seeds torch's global generator through the trainer, so it runs alone.
/// </summary>
[Collection(GlobalTorchRngCollection.Name)]
public class FineTunedMathTests
{
    [Fact]
    public void A_tiny_model_fine_tuned_on_a_few_problems_scores_all_of_them()
    {
        var items = ArithmeticProblems.Split([ArithmeticOperation.Addition, ArithmeticOperation.Multiplication, ArithmeticOperation.Subtraction], 0, 6, seed: 11).HeldOut;
        var examples = ArithmeticProblems.AsExamples(items);
        var tokenizer = ByteLevelBpeTrainer.Train(examples.Select(e => MathPrompt.Format(e.Instruction, e.Input) + e.Output), 400);
        using var model = AutoModel.FromConfig(AdapterFlow.Quickstart.ModelConfigFor(new QuickstartOptions { HiddenSize = 64, Layers = 2 }, tokenizer), seed: 1);
        var set = MathDataset.FromItems("few", items);
        var evalOptions = new MathEvalOptions { BatchSize = 3, MaxNewTokens = 64 };

        var before = new MathEvaluator(model, tokenizer, evalOptions).Evaluate(set);
        Assert.True(before.Accuracy.Correct < items.Count, "random weights already answer everything: the test would prove nothing");

        // Trained on the evaluation prompt, tokenised apart from the answer (the quickstart's choice, see Quickstart.Sft):
        // a model this small does not carry a memorised answer over to finetune.py's slightly different template.
        var data = SftTokenizer.Tokenize(examples, tokenizer, AdapterFlow.Quickstart.Sft);
        using (var trainer = Trainer.ForModel(model, new TrainerOptions
               {
                   LearningRate = 1e-2, Schedule = LrScheduleKind.Constant, BatchSize = 6, MicroBatchSize = 6, MaxSteps = 80, Seed = 2,
               }))
        {
            var training = trainer.Train(data.Examples, new Collator(tokenizer.PadTokenId ?? 0));
            Assert.True(training.FinalLoss < 0.05, $"the few problems were not learned: loss {training.FinalLoss}");
        }
        model.eval();

        var after = new MathEvaluator(model, tokenizer, evalOptions).Evaluate(set);
        Assert.True(after.Accuracy.Correct == items.Count,
            string.Join("\n", after.Items.Select(i => $"{i.Correct}: {i.Label} ← '{i.Response}'")));
        Assert.Equal(1.0, after.Accuracy.Value);
        // It answered by writing the chain of thought it was taught, then stopped at EOS.
        Assert.All(after.Items, i => Assert.Equal(items[i.Index].Output, i.Response));
        Assert.All(after.Items, i => Assert.Equal(AdapterFlow.Generation.FinishReason.StopToken, i.FinishReason));
    }
}

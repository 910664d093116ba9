using System.Globalization;
using AdapterFlow.Data;
using AdapterFlow.Evaluation;
using AdapterFlow.Tests.Cli;

namespace AdapterFlow.Tests.Quickstart;

public class ArithmeticProblemsTests
{
    private static readonly ArithmeticOperation[] AddSub = [ArithmeticOperation.Addition, ArithmeticOperation.Subtraction];

    [Fact]
    public void The_same_seed_gives_the_same_problems_and_another_seed_others()
    {
        var a = ArithmeticProblems.Split(AddSub, 200, 50, seed: 7);
        var b = ArithmeticProblems.Split(AddSub, 200, 50, seed: 7);
        var c = ArithmeticProblems.Split(AddSub, 200, 50, seed: 8);
        Assert.Equal(a.Train, b.Train);
        Assert.Equal(a.HeldOut, b.HeldOut);
        Assert.NotEqual(a.Train.Select(i => i.Instruction), c.Train.Select(i => i.Instruction));
        Assert.NotEqual(a.HeldOut.Select(i => i.Instruction), c.HeldOut.Select(i => i.Instruction));
    }

    [Fact]
    public void Train_and_held_out_problems_are_disjoint_and_the_held_out_set_does_not_depend_on_the_training_size()
    {
        var small = ArithmeticProblems.Split([ArithmeticOperation.Multiplication], 100, 40, seed: 3);
        var large = ArithmeticProblems.Split([ArithmeticOperation.Multiplication], 1000, 40, seed: 3);
        Assert.Equal(100, small.Train.Count);
        Assert.Equal(1000, large.Train.Count);
        Assert.Equal(small.HeldOut, large.HeldOut);
        var heldOut = large.HeldOut.Select(i => i.Instruction).ToHashSet();
        Assert.Equal(40, heldOut.Count);
        Assert.DoesNotContain(large.Train, i => heldOut.Contains(i.Instruction));
        Assert.Equal(1000, large.Train.Select(i => i.Instruction).Distinct().Count());
        // Numbered in order, as items of a file are.
        Assert.Equal(Enumerable.Range(0, 1000), large.Train.Select(i => i.Index));
        // Excluding a set keeps a further one disjoint from it.
        var more = ArithmeticProblems.Split([ArithmeticOperation.Multiplication], 200, 0, seed: 99, exclude: large.Train.Concat(large.HeldOut));
        Assert.DoesNotContain(more.Train, i => heldOut.Contains(i.Instruction) || large.Train.Any(t => t.Instruction == i.Instruction));
    }

    [Theory]
    [InlineData(ArithmeticOperation.Addition, "+")]
    [InlineData(ArithmeticOperation.Subtraction, "-")]
    [InlineData(ArithmeticOperation.Multiplication, "+")]
    public void Answers_are_right_and_the_evaluator_scores_the_reference_output_correct(ArithmeticOperation operation, string symbol)
    {
        var ranges = new ArithmeticRanges();
        var items = ArithmeticProblems.Split([operation], 300, 0, seed: 1, ranges).Train;
        foreach (var item in items)
        {
            // The chain of thought holds "a op b = c" (multiplication: "b + b + ... = c", a times) and ends "The answer is c."
            int expected;
            if (operation == ArithmeticOperation.Multiplication)
            {
                var match = System.Text.RegularExpressions.Regex.Match(item.Output, @"^(\d+)( \+ \1)+ = (\d+)\.");
                Assert.True(match.Success, item.Output);
                int a = match.Groups[2].Captures.Count + 1, b = int.Parse(match.Groups[1].Value, CultureInfo.InvariantCulture);
                expected = a * b;
                Assert.Equal(expected.ToString(CultureInfo.InvariantCulture), match.Groups[3].Value);
                Assert.Contains($" {a} ", item.Instruction);
                Assert.DoesNotContain("*", item.Output);
            }
            else
            {
                var match = System.Text.RegularExpressions.Regex.Match(item.Output, $@"^(\d+) \{symbol} (\d+) = (\d+)\.");
                Assert.True(match.Success, item.Output);
                int a = int.Parse(match.Groups[1].Value, CultureInfo.InvariantCulture), b = int.Parse(match.Groups[2].Value, CultureInfo.InvariantCulture);
                expected = operation == ArithmeticOperation.Addition ? a + b : a - b;
                Assert.Equal(expected.ToString(CultureInfo.InvariantCulture), match.Groups[3].Value);
            }
            Assert.Equal(expected.ToString(CultureInfo.InvariantCulture), item.Answer);
            Assert.EndsWith($"The answer is {item.Answer}.", item.Output);
            Assert.Equal("", item.Input);
            Assert.True(AnswerExtractor.IsCorrectNumber(item.NumericAnswer, AnswerExtractor.ExtractNumber(item.Output)), item.Output);
            // Operands stay in their ranges, so the answers stay within what pretraining's numbers cover.
            Assert.InRange(expected, 0, 2 * ranges.MaxAddend);
        }
        // Several templates are used.
        Assert.True(items.Select(i => i.Instruction.Split(' ')[^1]).Distinct().Count() + items.Select(i => i.Instruction[..12]).Distinct().Count() > 10);
    }

    [Fact]
    public void A_saved_set_loads_as_an_llm_adapters_math_set()
    {
        using var dir = new TempDir();
        var items = ArithmeticProblems.Split(AddSub, 0, 25, seed: 5).HeldOut;
        var path = dir.File("sub/problems.json");
        ArithmeticProblems.Save(items, path);
        var set = MathDataset.Load(path);
        Assert.Equal(AnswerKind.Number, set.Kind);
        Assert.Equal(items, set.Items);
        var training = InstructionDataset.Load(path);
        Assert.Equal(items.Select(i => i.Output), training.Items.Select(e => e.Output));
        Assert.Equal(items, MathDataset.FromItems("x", items).Items);
    }

    [Fact]
    public void Asking_for_more_distinct_problems_than_exist_fails_clearly()
    {
        var tiny = new ArithmeticRanges { MaxFactor = 2 };
        var e = Assert.Throws<ArgumentException>(() => ArithmeticProblems.Split([ArithmeticOperation.Multiplication], 100_000, 0, seed: 1, tiny));
        Assert.Contains("distinct", e.Message);
        Assert.Throws<ArgumentException>(() => new ArithmeticRanges { MaxAddend = 0 }.Validate());
        Assert.Throws<ArgumentException>(() => ArithmeticProblems.Split([], 1, 1, seed: 1));
    }
}

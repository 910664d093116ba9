using AdapterFlow.Evaluation;

namespace AdapterFlow.Tests.Evaluation;

public class AnswerExtractorTests
{
    [Theory]
    [InlineData("The answer is 576.", 576)]
    [InlineData("He is left with -3 apples. The answer is -3.", -3)]
    [InlineData("Each costs 2.75 dollars, so the answer is 8.25", 8.25)]
    [InlineData("The total is 1,000 dollars.", 1000)]
    [InlineData("1,234,567.5 grains", 1234567.5)]
    [InlineData("The answer is 12. Check: 12 - 5 = 7", 7)] // numbers after the answer win (LLM-Adapters: the last number)
    [InlineData("The answer is 5.", 5)]                      // "5." reads as 5
    [InlineData("10-4", -4)]                                 // a hyphen before digits is a minus sign, as in their regex
    [InlineData("The answer is ٣", 3)]                       // Unicode digits: Python's \d and float() accept them
    [InlineData("0.5 + .5 = 1", 1)]
    public void LastNumberCommasRemoved(string response, double expected)
    {
        Assert.Equal(expected, AnswerExtractor.ExtractNumber(response), 9);
    }

    [Theory]
    [InlineData("")]
    [InlineData("I do not know.")]
    [InlineData("- . ,")]
    public void NoNumberIsInfinityAndWrong(string response)
    {
        var prediction = AnswerExtractor.ExtractNumber(response);
        Assert.True(double.IsPositiveInfinity(prediction));
        Assert.False(AnswerExtractor.IsCorrectNumber(0, prediction));
        Assert.False(AnswerExtractor.IsCorrectNumber(1e300, prediction));
    }

    [Fact]
    public void ToleranceIsOneThousandth()
    {
        Assert.True(AnswerExtractor.IsCorrectNumber(576, 576.0));
        Assert.True(AnswerExtractor.IsCorrectNumber(1.8333333333333335, 1.833));   // |diff| = 0.00033
        Assert.True(AnswerExtractor.IsCorrectNumber(-3, -3.0009));
        Assert.False(AnswerExtractor.IsCorrectNumber(1.8333333333333335, 1.83));   // 0.0033
        Assert.False(AnswerExtractor.IsCorrectNumber(3, -3));
        Assert.False(AnswerExtractor.IsCorrectNumber(1000, 1)); // "1,000" must not read as 1
        Assert.True(AnswerExtractor.IsCorrectNumber(1000, AnswerExtractor.ExtractNumber("It costs $1,000.")));
    }

    [Fact]
    public void HugeNumberIsInfinityLikePython()
    {
        Assert.True(double.IsPositiveInfinity(AnswerExtractor.ExtractNumber(new string('9', 400))));
    }

    [Theory]
    // response, llm-adapters (first capital A-E anywhere), strict
    [InlineData("A train covers 120 km. The answer is (C).", "A", "C")]
    [InlineData("The answer is E", "E", "E")]
    [InlineData("the answer is: (b) no, The answer is B.", "B", "B")]
    [InlineData("Between (A) and (D), D is right.", "B", "D")]               // llm-adapters: the B of "Between"
    [InlineData("Distance = 5 km, so option D.", "D", "D")]
    [InlineData("A boy has 3 apples and eats them.", "A", "")]       // only the article A: strict finds no option
    [InlineData("Compute 3 + 4 = 7", "C", "")]                        // "Compute" starts with C
    [InlineData("no letters here at all", "", "")]
    [InlineData("The answer is (A). But wait, the answer is (E).", "A", "E")] // the last "answer is" wins
    [InlineData("Each DVD costs 2. The answer is B", "E", "B")]
    public void AquaLettersInBothModes(string response, string llmAdapters, string strict)
    {
        Assert.Equal(llmAdapters, AnswerExtractor.ExtractLetter(response, AquaScoring.LlmAdapters));
        Assert.Equal(strict, AnswerExtractor.ExtractLetter(response, AquaScoring.Strict));
    }

    [Fact]
    public void ScoringNamesRoundTrip()
    {
        foreach (var mode in Enum.GetValues<AquaScoring>())
            Assert.Equal(mode, AnswerExtractor.ParseScoring(AnswerExtractor.Name(mode)));
        Assert.Throws<ArgumentException>(() => AnswerExtractor.ParseScoring("loose"));
    }
}

public class MathPromptTests
{
    [Fact]
    public void TemplateIsLlmAdaptersEvaluatePromptByteForByte()
    {
        // LLM-Adapters evaluate.py generate_prompt(instruction): an f-string keeping its 16-space source indentation.
        const string expected =
            "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n" +
            "\n" +
            "                ### Instruction:\n" +
            "                What is 2+3?\n" +
            "\n" +
            "                ### Response:\n" +
            "                ";
        Assert.Equal(expected, MathPrompt.Format("What is 2+3?"));
        Assert.Equal(expected, MathPrompt.Format("What is 2+3?", ""));
    }

    [Fact]
    public void TemplateWithInputIsTheirInputVariant()
    {
        const string expected =
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n" +
            "\n" +
            "                ### Instruction:\n" +
            "                Q\n" +
            "\n" +
            "                ### Input:\n" +
            "                ctx\n" +
            "\n" +
            "                ### Response:\n" +
            "                ";
        Assert.Equal(expected, MathPrompt.Format("Q", "ctx"));
    }

    [Theory]
    [InlineData("  The answer is 4.\n\n                ", "The answer is 4.")]
    [InlineData(" 4 apples.\n\n                ### Instruction:\n                What is 9?", "4 apples.")]
    [InlineData("4\n### Response:\n 9", "4")]
    [InlineData("no stop", "no stop")]
    public void ResponseIsCutAtTheNextInstructionAndTrimmed(string generated, string expected)
    {
        Assert.Equal(expected, MathPrompt.Response(generated));
    }
}

public class AccuracyTests
{
    [Fact]
    public void WilsonIntervalMatchesKnownValues()
    {
        // Reference values: statsmodels proportion_confint(count, nobs, method="wilson").
        var (low, high) = new Accuracy(5, 10).Interval95;
        Assert.Equal(0.236593, low, 1e-6);
        Assert.Equal(0.763407, high, 1e-6);
        (low, high) = new Accuracy(0, 8).Interval95;
        Assert.Equal(0, low, 9);
        Assert.Equal(0.324408, high, 1e-6);
        (low, high) = new Accuracy(20, 20).Interval95;
        Assert.Equal(0.838875, low, 1e-6);
        Assert.Equal(1, high, 9);
        Assert.Equal(0.5, new Accuracy(5, 10).Value);
    }
}

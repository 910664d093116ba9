using AdapterFlow.Data;
using AdapterFlow.Tests.Generation;
using AdapterFlow.Training;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Training;

public class SftTokenizationTests
{
    private static readonly ByteTokenizer Tokenizer = new();

    private static InstructionExample Item(string instruction, string output, string input = "") => new(instruction, input, output, "test", 1);

    [Fact]
    public void Prompt_tokens_carry_no_loss_and_response_tokens_do()
    {
        var item = Item("Add 2 and 3.", "The answer is 5.");
        var example = SftTokenizer.Tokenize(item, Tokenizer, new SftOptions(), out int cut);
        Assert.Equal(0, cut);
        var promptIds = Tokenizer.Encode(InstructionPrompt.Prompt(item.Instruction, item.Input), addSpecialTokens: true);
        var fullIds = Tokenizer.Encode(InstructionPrompt.Format(item.Instruction, item.Input, item.Output), addSpecialTokens: true);
        // BOS + prompt + response + EOS; labels −100 exactly over BOS + prompt.
        Assert.Equal(fullIds.Append(ByteTokenizer.Eos), example.InputIds);
        Assert.All(example.Labels.Take(promptIds.Count), l => Assert.Equal(Example.IgnoreIndex, l));
        Assert.Equal(example.InputIds.Skip(promptIds.Count), example.Labels.Skip(promptIds.Count));
        Assert.Equal("The answer is 5.", Tokenizer.Decode(example.Labels.Skip(promptIds.Count).Where(id => id != ByteTokenizer.Eos).ToArray()));
        Assert.Equal(ByteTokenizer.Eos, example.Labels[^1]);

        var all = SftTokenizer.Tokenize(item, Tokenizer, new SftOptions { TrainOnInputs = true }, out _);
        Assert.Equal(all.InputIds, all.Labels);
    }

    [Fact]
    public void The_evaluation_prompt_tokenised_apart_gives_training_exactly_the_ids_generation_starts_from()
    {
        var item = Item("Tom has 3 boxes of 4 apples. How many apples?", "3 * 4 = 12. The answer is 12.");
        var bpe = AdapterFlow.IO.ByteLevelBpeTrainer.Train(Enumerable.Repeat(AdapterFlow.Evaluation.MathPrompt.Format(item.Instruction) + item.Output, 20), 400);
        var options = new SftOptions { PromptFormat = (i, x) => AdapterFlow.Evaluation.MathPrompt.Format(i, x), TokenizeSeparately = true };
        var example = SftTokenizer.Tokenize(item, bpe, options, out _);
        var promptIds = bpe.Encode(AdapterFlow.Evaluation.MathPrompt.Format(item.Instruction), addSpecialTokens: true);
        Assert.Equal(promptIds, example.InputIds.Take(promptIds.Count));
        Assert.Equal(bpe.Encode(item.Output).Append(bpe.EosTokenId!.Value), example.InputIds.Skip(promptIds.Count));
        Assert.All(example.Labels.Take(promptIds.Count), l => Assert.Equal(Example.IgnoreIndex, l));
        Assert.Equal(example.InputIds.Skip(promptIds.Count), example.Labels.Skip(promptIds.Count));
        // Tokenised together, the prompt's trailing spaces merge with the answer's first word: the prompt's ids are
        // not a prefix of the whole — the mismatch this option removes.
        var joint = SftTokenizer.Tokenize(item, bpe, options with { TokenizeSeparately = false }, out _);
        Assert.NotEqual(promptIds, joint.InputIds.Take(promptIds.Count));
        Assert.Equal(AdapterFlow.Evaluation.MathPrompt.Format(item.Instruction) + item.Output, bpe.Decode(joint.InputIds, skipSpecialTokens: true));
    }

    [Fact]
    public void Cutoff_truncates_counts_and_then_adds_no_eos()
    {
        var items = new[] { Item("short", "x"), Item("a much longer instruction", new string('y', 400)) };
        var data = SftTokenizer.Tokenize(items, Tokenizer, new SftOptions { CutoffLength = 300 });
        Assert.Equal(1, data.TruncatedExamples);
        int fullLength = Tokenizer.Encode(InstructionPrompt.Format(items[1].Instruction, "", items[1].Output), true).Count;
        Assert.Equal(fullLength - 300, data.TruncatedTokens);
        Assert.Equal(300, data.Examples[1].Length);
        Assert.NotEqual(ByteTokenizer.Eos, data.Examples[1].InputIds[^1]);
        Assert.Equal(ByteTokenizer.Eos, data.Examples[0].InputIds[^1]);
    }

    [Fact]
    public void Collator_right_pads_with_mask_and_ignored_labels()
    {
        var a = new Example([1, 10, 11, 12], [-100, -100, 11, 12]);
        var b = new Example([1, 20], [-100, 20]);
        using var scope = NewDisposeScope();
        using var batch = new Collator(padTokenId: 0, padToMultipleOf: 8).Collate([a, b]);
        Assert.Equal(new long[] { 2, 8 }, batch.InputIds.shape);
        Assert.Equal(new long[] { 1, 10, 11, 12, 0, 0, 0, 0, 1, 20, 0, 0, 0, 0, 0, 0 }, batch.InputIds.data<long>().ToArray());
        Assert.Equal(new long[] { 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0 }, batch.AttentionMask.data<long>().ToArray());
        Assert.Equal(new long[] { -100, -100, 11, 12, -100, -100, -100, -100, -100, 20, -100, -100, -100, -100, -100, -100 }, batch.Labels.data<long>().ToArray());
        Assert.Equal(3, batch.LabelTokens);
        Assert.Equal(6, batch.Tokens);
    }

    [Fact]
    public void Length_grouped_batches_cover_everything_once_with_similar_lengths()
    {
        var random = new Random(1);
        var lengths = Enumerable.Range(0, 64).Select(_ => random.Next(1, 500)).ToArray();
        var batches = Batching.LengthGrouped(lengths, 4, new Random(7));
        Assert.Equal(Enumerable.Range(0, 64), batches.SelectMany(b => b).Order());
        Assert.Contains(Array.IndexOf(lengths, lengths.Max()), batches[0]);
        // Within a mega-batch (here all 64) batches are sorted, so padding is far below a random order's.
        static long Padding(IEnumerable<int[]> bs, int[] ls) => bs.Sum(b => b.Length * (long)b.Max(i => ls[i]) - b.Sum(i => (long)ls[i]));
        Assert.True(Padding(batches, lengths) * 4 < Padding(Batching.Shuffled(64, 4, new Random(7)), lengths));
        Assert.Equal(batches.Select(b => string.Join(",", b)), Batching.LengthGrouped(lengths, 4, new Random(7)).Select(b => string.Join(",", b)));
    }

    [Fact]
    public void Packing_joins_documents_with_eos_into_full_blocks()
    {
        var packed = SftTokenizer.Pack(["abc", "defgh"], Tokenizer, blockSize: 4);
        // BOS a b c EOS BOS d e f g h EOS = 12 tokens → 3 blocks, nothing left over.
        Assert.Equal(3, packed.Examples.Count);
        Assert.Equal(0, packed.TruncatedTokens);
        Assert.Equal(new[] { ByteTokenizer.Bos, 'a' + 4, 'b' + 4, 'c' + 4 }, packed.Examples[0].InputIds);
        Assert.Equal(new[] { ByteTokenizer.Eos, ByteTokenizer.Bos, 'd' + 4, 'e' + 4 }, packed.Examples[1].InputIds);
        Assert.All(packed.Examples, e => Assert.Equal(e.InputIds, e.Labels));
        var rest = SftTokenizer.Pack(["abcdef"], Tokenizer, blockSize: 3);
        Assert.Equal(2, rest.Examples.Count);
        Assert.Equal(2, rest.TruncatedTokens);
    }
}

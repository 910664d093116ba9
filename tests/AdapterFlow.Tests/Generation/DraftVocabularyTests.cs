using AdapterFlow.Data;
using AdapterFlow.Generation;
using AdapterFlow.IO;
using AdapterFlow.Models;
using AdapterFlow.Models.Cpu;
using TorchSharp;

namespace AdapterFlow.Tests.Generation;

/// <summary>
/// Self-speculative drafts over part of the vocabulary: the output stays the autoregressive one whatever the subset,
/// the subset head's logits are the full head's at those tokens, and the vocabulary file's build, save and load.
/// </summary>
public class DraftVocabularyTests
{
    private static GenerationOptions Speculative(int exit, int k, DraftVocabulary? draft) => new()
    {
        MaxNewTokens = 14, StopTokenIds = [], Strategy = DecodingStrategyKind.SelfSpeculative, ExitLayer = exit, NumSpeculations = k,
        DraftVocabulary = draft,
    };

    [Fact]
    public void Greedy_output_is_the_autoregressive_output_with_any_draft_vocabulary()
    {
        using var model = SelfSpeculativeTests.Model("llama");
        var generator = new TextGenerator(model);
        var prompts = SelfSpeculativeTests.Prompts(3, seed: 21);
        var whole = new DraftVocabulary(Enumerable.Range(0, 96));
        var few = new DraftVocabulary([5, 17, 40, 41, 90]); // most next tokens are outside it (until they appear in the text)
        var plainOptions = new GenerationOptions { MaxNewTokens = 14, StopTokenIds = [] };
        double fewAcceptance = 0, wholeAcceptance = 0;
        foreach (var prompt in prompts)
        {
            var expected = generator.Generate([prompt], plainOptions).Sequences[0].Tokens;
            foreach (var (exit, k) in new[] { (1, 3), (2, 2), (3, 5), (4, 3) })
            {
                var full = generator.Generate([prompt], Speculative(exit, k, null));
                int passes = LlamaCpuDecoder.MultiTokenPassesOnThisThread, steps = LlamaCpuDecoder.StepsOnThisThread;
                var withWhole = generator.Generate([prompt], Speculative(exit, k, whole));
                Assert.True(LlamaCpuDecoder.StepsOnThisThread > steps, "the host rounds (kernel passes) should run");
                if (exit < model.NumLayers) Assert.True(LlamaCpuDecoder.MultiTokenPassesOnThisThread > passes);
                var withFew = generator.Generate([prompt], Speculative(exit, k, few));
                Assert.Equal(expected, full.Sequences[0].Tokens);
                Assert.Equal(expected, withWhole.Sequences[0].Tokens);
                Assert.Equal(expected, withFew.Sequences[0].Tokens);
                // The whole vocabulary as a subset drafts exactly what the full head drafts.
                Assert.Equal(full.Stats.AcceptanceRate, withWhole.Stats.AcceptanceRate);
                Assert.Equal(full.Stats.DraftedTokens, withWhole.Stats.DraftedTokens);
                if (exit < model.NumLayers)
                {
                    wholeAcceptance += withWhole.Stats.AcceptanceRate ?? 0;
                    fewAcceptance += withFew.Stats.AcceptanceRate ?? 0;
                }
                else Assert.Equal(1.0, withFew.Stats.AcceptanceRate); // E = L: the drafts are the full model's, subset or not
            }
        }
        Assert.True(fewAcceptance < wholeAcceptance, $"a 5-token draft vocabulary should accept less ({fewAcceptance:F2} vs {wholeAcceptance:F2})");
    }

    [Fact]
    public void Tensor_rounds_draft_over_the_vocabulary_too_and_keep_the_output()
    {
        // Padded batches, logits processors and adapter wrappers take the tensor rounds: the draft head gathers the
        // vocabulary's rows there, and the output stays the autoregressive one.
        using var model = SelfSpeculativeTests.Model("llama");
        var prompts = SelfSpeculativeTests.Prompts(3, seed: 29);
        var few = new DraftVocabulary([5, 17, 40, 41, 90]);
        var whole = new DraftVocabulary(Enumerable.Range(0, 96));
        var generator = new TextGenerator(model);
        double fewAcceptance = 0, wholeAcceptance = 0;
        foreach (var options in new[]
                 {
                     new GenerationOptions { MaxNewTokens = 12, StopTokenIds = [] },
                     new GenerationOptions { MaxNewTokens = 12, StopTokenIds = [], RepetitionPenalty = 1.3 },
                 })
        {
            var expected = generator.Generate(prompts, options);
            foreach (var (exit, k) in new[] { (1, 3), (2, 2), (3, 4) })
            {
                var speculative = options with { Strategy = DecodingStrategyKind.SelfSpeculative, ExitLayer = exit, NumSpeculations = k };
                var full = generator.Generate(prompts, speculative);
                var withWhole = generator.Generate(prompts, speculative with { DraftVocabulary = whole });
                var withFew = generator.Generate(prompts, speculative with { DraftVocabulary = few });
                for (int r = 0; r < prompts.Count; r++)
                {
                    Assert.Equal(expected.Sequences[r].Tokens, withFew.Sequences[r].Tokens);
                    Assert.Equal(expected.Sequences[r].Tokens, withWhole.Sequences[r].Tokens);
                }
                Assert.Equal(full.Stats.AcceptanceRate, withWhole.Stats.AcceptanceRate);
                fewAcceptance += withFew.Stats.AcceptanceRate ?? 0;
                wholeAcceptance += withWhole.Stats.AcceptanceRate ?? 0;
            }
        }
        Assert.True(fewAcceptance < wholeAcceptance, $"the 5-token vocabulary should restrict the drafts ({fewAcceptance:F2} vs {wholeAcceptance:F2})");

        using var peft = AdapterFlow.Adapters.PeftModel.Create(model, new AdapterFlow.Adapters.Lora.LoraConfig
        {
            R = 4, LoraAlpha = 8, InitLoraWeights = AdapterFlow.Adapters.Lora.LoraInit.Random,
            TargetModules = AdapterFlow.Adapters.ModuleSelector.Pattern(AdapterFlow.Adapters.ModuleSelector.AllLinear),
        });
        var peftGenerator = new TextGenerator(peft);
        var plain = peftGenerator.Generate([prompts[0]], new GenerationOptions { MaxNewTokens = 12, StopTokenIds = [] });
        var drafted = peftGenerator.Generate([prompts[0]], Speculative(2, 3, few) with { MaxNewTokens = 12 });
        Assert.Equal(plain.Sequences[0].Tokens, drafted.Sequences[0].Tokens);
    }

    [Fact]
    public void Tensor_rounds_with_a_tied_head_keep_their_draft_vocabulary_across_rounds()
    {
        // A tied head hands out a new tensor over the embedding's storage at every lookup, which the dispose scope it was
        // made in frees: the draft head once kept one from its first round, and sampling failed on a dead handle after it.
        var json = """{"model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "initializer_range": 0.2, "tie_word_embeddings": true}""";
        using var model = AutoModel.FromConfig(AutoModel.ParseConfig((System.Text.Json.Nodes.JsonObject)System.Text.Json.Nodes.JsonNode.Parse(json)!, "llama"), seed: 3);
        model.eval();
        Assert.True(model.Config.TieWordEmbeddings);
        var generator = new TextGenerator(model);
        var prompt = SelfSpeculativeTests.Prompts(1, seed: 31)[0];
        var few = new DraftVocabulary([5, 17, 40, 41, 90]);
        var sampled = Speculative(2, 3, few) with { DoSample = true, Seed = 4, MaxNewTokens = 16 };
        var result = generator.Generate([prompt], sampled);
        var plainSampled = generator.Generate([prompt], sampled with { Strategy = DecodingStrategyKind.Autoregressive, ExitLayer = null });
        Assert.Equal(plainSampled.Sequences[0].Tokens.Count, result.Sequences[0].Tokens.Count);
        Assert.True(result.Stats.DecodeSteps > 2, $"{result.Stats.DecodeSteps} rounds");
        // Greedy with a logits processor takes the tensor rounds too, and keeps the autoregressive output.
        var greedy = new GenerationOptions { MaxNewTokens = 16, StopTokenIds = [], RepetitionPenalty = 1.2 };
        var drafted = generator.Generate([prompt], greedy with { Strategy = DecodingStrategyKind.SelfSpeculative, ExitLayer = 2, NumSpeculations = 3, DraftVocabulary = few });
        Assert.Equal(generator.Generate([prompt], greedy).Sequences[0].Tokens, drafted.Sequences[0].Tokens);
    }

    [Fact]
    public void A_confidence_threshold_drafts_less_and_keeps_the_output()
    {
        using var model = SelfSpeculativeTests.Model("llama");
        var generator = new TextGenerator(model);
        foreach (var prompt in SelfSpeculativeTests.Prompts(3, seed: 23))
        {
            var expected = generator.Generate([prompt], new GenerationOptions { MaxNewTokens = 14, StopTokenIds = [] }).Sequences[0].Tokens;
            foreach (var exit in new[] { 1, 2, 3 })
            {
                var always = generator.Generate([prompt], Speculative(exit, 5, null));
                Assert.Equal(expected, always.Sequences[0].Tokens);
                double alwaysPerRound = (double)always.Stats.DraftedTokens / always.Stats.DecodeSteps;
                foreach (var threshold in new[] { 0.2, 0.6, 0.99 })
                {
                    var result = generator.Generate([prompt], Speculative(exit, 5, null) with { DraftConfidenceThreshold = threshold });
                    Assert.Equal(expected, result.Sequences[0].Tokens);
                    double perRound = (double)result.Stats.DraftedTokens / result.Stats.DecodeSteps;
                    // The random model is rarely 99% sure: rounds then stop after one draft or a few.
                    if (threshold == 0.99) Assert.True(perRound < alwaysPerRound, $"exit {exit}: {perRound:F2} drafts a round, {alwaysPerRound:F2} without a threshold");
                }
            }
        }
        Assert.Throws<ArgumentException>(() => (Speculative(2, 3, null) with { DraftConfidenceThreshold = 1 }).Validate());
        Assert.Throws<ArgumentException>(() => (Speculative(2, 3, null) with { DraftConfidenceThreshold = -0.1 }).Validate());
    }

    [Fact]
    public unsafe void The_subset_head_gives_the_full_heads_logits_at_the_listed_tokens()
    {
        using var model = SelfSpeculativeTests.Model("llama");
        var llama = (LlamaForCausalLM)model;
        int vocab = llama.LlamaConfig.VocabSize, hidden = llama.LlamaConfig.HiddenSize;
        int[] listed = [3, 95, 0, 40, 41, 7];
        var full = new float[vocab];
        var subset = new float[listed.Length];
        var stateA = new float[hidden];
        var stateB = new float[hidden];
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        var cacheA = model.CreateCache();
        var cacheB = model.CreateCache();
        Assert.True(LlamaCpuDecoder.CanRunHostPasses(llama, cacheA));
        var tokens = new DraftTokenSet(new DraftVocabulary(listed[..1]), vocab);
        foreach (int id in listed[1..]) tokens.Add(id);
        using var packed = new PackedDraftHead(tokens, llama.PlainHead()!.Value.Weight);
        fixed (float* f = full, s = subset, a = stateA, b = stateB)
        {
            long[] prompt = [4, 9, 33, 12];
            LlamaCpuDecoder.HostPass(llama, cacheA, 0, 4, prompt.Length, prompt, null, 0, null, 0, null);
            LlamaCpuDecoder.HostPass(llama, cacheB, 0, 4, prompt.Length, prompt, null, 0, null, 0, null);
            LlamaCpuDecoder.HostPass(llama, cacheA, 0, 2, 1, [50], null, prompt.Length, a, 1, f);
            LlamaCpuDecoder.HostPass(llama, cacheB, 0, 2, 1, [50], null, prompt.Length, b, 1, s, packed.Rows, packed.Count);
        }
        Assert.Equal(stateA, stateB);
        for (int i = 0; i < listed.Length; i++) Assert.Equal(full[listed[i]], subset[i]); // the same row kernel: bit for bit
        Assert.Contains(full, v => v != 0);
    }

    [Fact]
    public unsafe void The_packed_draft_head_holds_the_head_rows_of_its_tokens_as_they_are_added()
    {
        using var model = SelfSpeculativeTests.Model("llama");
        var llama = (LlamaForCausalLM)model;
        int vocab = llama.LlamaConfig.VocabSize, hidden = llama.LlamaConfig.HiddenSize;
        var weight = llama.PlainHead()!.Value.Weight;
        var tokens = new DraftTokenSet(new DraftVocabulary([7, 2]), vocab);
        using var packed = new PackedDraftHead(tokens, weight, spareRows: 1);
        foreach (long id in new long[] { 2, 11, 5, 11, vocab - 1, 0, 3 }) packed.Add(id); // repeats add nothing; the block grows twice
        Assert.Equal(new[] { 2, 7, 11, 5, vocab - 1, 0, 3 }, Enumerable.Range(0, packed.Count).Select(i => packed.Tokens[i]));
        var rows = weight.contiguous().data<float>().ToArray();
        for (int i = 0; i < packed.Count; i++)
            for (int c = 0; c < hidden; c++)
                Assert.Equal(rows[(long)packed.Tokens[i] * hidden + c], packed.Rows[(long)i * hidden + c]);
        using var bf16 = weight.to_type(torch.ScalarType.BFloat16);
        Assert.Throws<InvalidOperationException>(() => new PackedDraftHead(tokens, bf16));
    }

    [Fact]
    public void From_texts_keeps_the_most_frequent_tokens_then_eos()
    {
        var tokenizer = new CharTokenizer();
        var vocabulary = DraftVocabulary.FromTexts(tokenizer, ["aab", "abc", "aaa"], size: 2);
        // a: 6, b: 2, c: 1 (+ BOS 3 times, id 0): the two most frequent are 'a' and BOS, then EOS.
        Assert.Equal([CharTokenizer.Id('a'), 0, 1], vocabulary.TokenIds);
        Assert.Throws<ArgumentOutOfRangeException>(() => DraftVocabulary.FromTexts(tokenizer, ["a"], 0));
    }

    [Fact]
    public void Save_and_load_round_trip_and_bad_files_name_the_file_and_field()
    {
        var dir = Directory.CreateTempSubdirectory("draftvocab").FullName;
        try
        {
            var path = Path.Combine(dir, DraftVocabulary.FileName);
            new DraftVocabulary([9, 2, 9, 30]).Save(path, source: "corpus.jsonl");
            Assert.Equal([9, 2, 30], DraftVocabulary.Load(path).TokenIds);
            Assert.Equal([9, 2, 30], DraftVocabulary.FromModelFolder(dir)!.TokenIds);
            Assert.Null(DraftVocabulary.FromModelFolder(Path.Combine(dir, "missing")));

            foreach (var (text, field) in new[]
                     {
                         ("not json", "invalid JSON"), ("[1, 2]", "token_ids"), ("{\"token_ids\": []}", "token_ids is empty"),
                         ("{\"token_ids\": [1, -2]}", "token_ids[1]"), ("{\"token_ids\": [1, \"x\"]}", "token_ids[1]"),
                     })
            {
                File.WriteAllText(path, text);
                var error = Assert.Throws<InvalidDataException>(() => DraftVocabulary.Load(path));
                Assert.Contains(path, error.Message);
                Assert.Contains(field, error.Message);
            }
            Assert.Throws<FileNotFoundException>(() => DraftVocabulary.Load(Path.Combine(dir, "nope.json")));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public void A_token_outside_the_models_vocabulary_is_an_error()
    {
        using var model = SelfSpeculativeTests.Model("llama");
        var generator = new TextGenerator(model);
        var error = Assert.Throws<ArgumentException>(() =>
            generator.Generate([[4, 5, 6]], Speculative(2, 3, new DraftVocabulary([1, 96]))));
        Assert.Contains("96", error.Message);
    }

    [Fact]
    public void Corpus_texts_come_from_every_data_shape()
    {
        var dir = Directory.CreateTempSubdirectory("draftcorpus").FullName;
        try
        {
            var text = Path.Combine(dir, "t.jsonl");
            File.WriteAllText(text, "{\"text\": \"one\"}\n{\"text\": \"two\"}\n");
            Assert.Equal(["one", "two"], DraftVocabulary.CorpusTexts(text, BadRecordPolicy.Fail, out _));
            var instructions = Path.Combine(dir, "i.json");
            File.WriteAllText(instructions, "[{\"instruction\": \"Add\", \"input\": \"1 2\", \"output\": \"3\"}, {\"instruction\": \"Bad\", \"output\": \"\"}]");
            Assert.Equal(["Add\n1 2\n3"], DraftVocabulary.CorpusTexts(instructions, BadRecordPolicy.Skip, out int skipped));
            Assert.Equal(1, skipped);
            Assert.Throws<InvalidDataException>(() => DraftVocabulary.CorpusTexts(instructions, BadRecordPolicy.Fail, out _));
            var chat = Path.Combine(dir, "c.jsonl");
            File.WriteAllText(chat, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n");
            Assert.Equal(["hi", "hello"], DraftVocabulary.CorpusTexts(chat, BadRecordPolicy.Fail, out _));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>One id per character ('a' = 2, …), BOS = 0 added in front, EOS = 1.</summary>
    private sealed class CharTokenizer : ITokenizer
    {
        public static int Id(char c) => c - 'a' + 2;
        public int VocabSize => 28;
        public int? BosTokenId => 0;
        public int? EosTokenId => 1;
        public int? PadTokenId => null;

        public IReadOnlyList<int> Encode(string text, bool addSpecialTokens = false) =>
            (addSpecialTokens ? new[] { 0 } : []).Concat(text.Select(Id)).ToArray();

        public string Decode(IReadOnlyList<int> ids, bool skipSpecialTokens = false) =>
            new(ids.Where(i => i >= 2).Select(i => (char)('a' + i - 2)).ToArray());

        public bool IsSpecialToken(int id) => id < 2;
    }
}

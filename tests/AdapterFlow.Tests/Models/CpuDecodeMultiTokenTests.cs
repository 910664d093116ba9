using AdapterFlow.Adapters;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.Generation;
using AdapterFlow.Models;
using AdapterFlow.Models.Cpu;
using AdapterFlow.Tests.Generation;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Models;

/// <summary>
/// What self-speculative decoding asks of the CPU kernels: hidden-state output and a skipped head for one-token
/// steps, and passes over several new tokens of one row (prompt tails, verification from a start layer) — each
/// against the libtorch path (logits, every hidden state, the cache), and the speculative generator really using them.
/// </summary>
public class CpuDecodeMultiTokenTests
{
    private const double Tolerance = 5e-5; // float32 summation orders, as CpuDecodeTests

    private static double MaxDiff(Tensor a, Tensor b)
    {
        Assert.Equal(a.shape, b.shape);
        return a.NumberOfElements == 0 ? 0 : (a - b).abs().max().to_type(ScalarType.Float64).item<double>();
    }

    /// <summary>
    /// Runs <paramref name="passes"/> over one cache with the kernels on or off; returns every pass's logits and hidden
    /// states, then every layer's cached keys and values, and how many one-token and multi-token kernel passes ran.
    /// </summary>
    private static (List<Tensor> Outputs, int Steps, int Passes) Run(CausalLM model, LlamaForCausalLM llama, bool kernels,
        Func<KVCache, List<Tensor>, IEnumerable<ForwardInput>> passes)
    {
        llama.UseCpuDecodeKernels = kernels;
        int steps = LlamaCpuDecoder.StepsOnThisThread, multi = LlamaCpuDecoder.MultiTokenPassesOnThisThread;
        var cache = model.CreateCache();
        var outputs = new List<Tensor>();
        var lastStates = new List<Tensor>();
        try
        {
            foreach (var input in passes(cache, lastStates))
            {
                var output = model.forward(input);
                outputs.Add(output.Logits);
                Assert.Equal(input.OutputHiddenStates, output.HiddenStates is not null);
                if (output.HiddenStates is { } states)
                {
                    Assert.Equal((input.ExitLayer ?? model.NumLayers) - input.StartLayer + 1, states.Count);
                    outputs.AddRange(states);
                    lastStates.Add(states[^1]);
                }
            }
            for (int i = 0; i < model.NumLayers; i++)
                if (cache.Get(i) is var (k, v))
                {
                    outputs.Add(k.clone());
                    outputs.Add(v.clone());
                }
        }
        finally
        {
            llama.UseCpuDecodeKernels = true;
        }
        return (outputs, LlamaCpuDecoder.StepsOnThisThread - steps, LlamaCpuDecoder.MultiTokenPassesOnThisThread - multi);
    }

    private static void AssertSame(List<Tensor> fast, List<Tensor> slow)
    {
        Assert.Equal(slow.Count, fast.Count);
        for (int i = 0; i < fast.Count; i++)
        {
            // Relative to the tensor's scale: hidden states and cached keys of these random models reach the tens, where
            // float32 summation order alone moves them by a few 1e-5 (as CpuDecodeTests' wide-model comparison).
            double diff = MaxDiff(fast[i], slow[i]);
            double scale = slow[i].NumberOfElements == 0 ? 1 : Math.Max(1.0, slow[i].abs().max().to_type(ScalarType.Float64).item<double>());
            Assert.True(diff < Tolerance * scale, $"output {i} [{string.Join(", ", slow[i].shape)}]: max |Δ| {diff}, scale {scale:F1}");
        }
    }

    /// <summary>A left-padded row fed as prefill, a step, a block, and a last-position block with hidden states.</summary>
    private static IEnumerable<ForwardInput> PaddedBlocks(KVCache cache, Tensor ids, Tensor? mask, Tensor? positions)
    {
        (int First, int Count, bool Last, bool States)[] pieces = [(0, 5, false, false), (5, 1, false, true), (6, 4, false, true), (10, 4, true, true)];
        foreach (var (first, count, last, states) in pieces)
            yield return new ForwardInput
            {
                InputIds = ids.narrow(1, first, count), AttentionMask = mask?.narrow(1, 0, first + count),
                PositionIds = positions?.narrow(1, first, count), Cache = cache, LastPositionOnly = last, OutputHiddenStates = states,
            };
    }

    public static TheoryData<string, bool> Families => new() { { "llama", false }, { "llama", true }, { "mistral", true }, { "qwen2", true } };

    [Theory]
    [MemberData(nameof(Families))]
    public void Multi_token_blocks_match_libtorch_with_padding_positions_and_sliding_windows(string arch, bool padded)
    {
        var config = LlamaTestConfigs.Tiny(arch, tied: arch == "llama" && padded);
        // Windows shorter than the blocks so that they cut inside a block; Qwen2 slides only its second layer (GQA 4:2 everywhere).
        if (config is MistralConfig mistral) mistral.SlidingWindow = 3;
        if (config is Qwen2Config qwen) { qwen.UseSlidingWindow = true; qwen.SlidingWindow = 3; qwen.MaxWindowLayers = 1; }
        using var model = (LlamaForCausalLM)AutoModel.FromConfig(config, seed: 31);
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var ids = torch.randint(4, 90, [1, 14], dtype: ScalarType.Int64, generator: new torch.Generator(41));
        Tensor? mask = null, positions = null;
        if (padded)
        {
            mask = torch.ones([1, 14], dtype: ScalarType.Int64);
            mask[0, ..2] = torch.tensor(0L);
            positions = DecoderParts.PositionIdsFromMask(mask);
        }
        var (fast, steps, passes) = Run(model, model, true, (cache, _) => PaddedBlocks(cache, ids, mask, positions));
        var (slow, noSteps, noPasses) = Run(model, model, false, (cache, _) => PaddedBlocks(cache, ids, mask, positions));
        Assert.Equal((1, 3), (steps, passes));
        Assert.Equal((0, 0), (noSteps, noPasses));
        AssertSame(fast, slow);
        Assert.Equal([1, 1, config.VocabSize], fast[9].shape); // the last-position pass: logits of its last token only
    }

    /// <summary>Self-speculative decoding's passes: drafts through the first E layers with hidden states, the last with
    /// no head, then layers E.. over the d + 1 exit states at once.</summary>
    private static IEnumerable<ForwardInput> DraftAndVerify(KVCache cache, List<Tensor> states, Tensor ids, int exit, int drafts)
    {
        yield return new ForwardInput { InputIds = ids.narrow(1, 0, 4), Cache = cache };
        for (int j = 0; j <= drafts; j++)
            yield return new ForwardInput
            {
                InputIds = ids.narrow(1, 4 + j, 1), PositionIds = torch.tensor(new long[] { 4 + j }).view(1, 1), Cache = cache,
                ExitLayer = exit, OutputHiddenStates = true, LastPositionOnly = true, SkipHead = j == drafts,
            };
        yield return new ForwardInput
        {
            InputIds = ids.narrow(1, 4, drafts + 1), PositionIds = torch.arange(4, 5 + drafts, dtype: ScalarType.Int64).view(1, -1),
            Cache = cache, StartLayer = exit, LayerInput = torch.cat(states.ToArray(), 1), OutputHiddenStates = true,
        };
    }

    [Theory]
    [InlineData(1, 3)]
    [InlineData(2, 5)]
    public void Drafts_with_hidden_states_and_verification_from_a_start_layer_match_libtorch(int exit, int drafts)
    {
        var json = LlamaTestConfigs.Tiny("llama", tied: true).ToJson();
        json["num_hidden_layers"] = 3;
        using var model = (LlamaForCausalLM)AutoModel.FromConfig(AutoModel.ParseConfig(json, "config.json"), seed: 12);
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var ids = torch.randint(4, 90, [1, 12], dtype: ScalarType.Int64, generator: new torch.Generator(42));
        var (fast, steps, passes) = Run(model, model, true, (cache, states) => DraftAndVerify(cache, states, ids, exit, drafts));
        var (slow, _, _) = Run(model, model, false, (cache, states) => DraftAndVerify(cache, states, ids, exit, drafts));
        Assert.Equal((drafts + 1, 2), (steps, passes)); // prefill and verification are the multi-token passes
        AssertSame(fast, slow);
        // The skipped head returns no logits; the verification's logits cover every drafted position.
        int verify = 1 + drafts * (exit + 2) + (exit + 1) + 1;
        Assert.Equal([1, 0, 97], fast[1 + drafts * (exit + 2)].shape);
        Assert.Equal([1, drafts + 1, 97], fast[verify].shape);
        // The verifier's logits are the full model's: feeding the same tokens autoregressively gives them too.
        using var cache = model.CreateCache();
        var full = model.forward(new ForwardInput { InputIds = ids.narrow(1, 0, 5 + drafts), Cache = cache }).Logits.narrow(1, 4, drafts + 1);
        Assert.True(MaxDiff(fast[verify], full) < Tolerance);
    }

    [Fact]
    public void Multi_token_blocks_with_unmerged_lora_match_and_long_inputs_decline()
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var llama = (LlamaForCausalLM)AutoModel.FromConfig(LlamaTestConfigs.Tiny("llama", tied: true), seed: 2);
        using var peft = PeftModel.Create(llama, new LoraConfig
        {
            R = 4, LoraAlpha = 8, InitLoraWeights = LoraInit.Random,
            TargetModules = ModuleSelector.Names("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"),
        });
        peft.eval();
        var ids = torch.randint(4, 90, [1, 14], dtype: ScalarType.Int64, generator: new torch.Generator(43));
        var (fast, steps, passes) = Run(peft, llama, true, (cache, _) => PaddedBlocks(cache, ids, null, null));
        var (slow, _, _) = Run(peft, llama, false, (cache, _) => PaddedBlocks(cache, ids, null, null));
        Assert.Equal((1, 3), (steps, passes));
        AssertSame(fast, slow);
        using (peft.DisableAdapters())
        {
            var (plain, _, _) = Run(peft, llama, true, (cache, _) => PaddedBlocks(cache, ids, null, null));
            Assert.True(MaxDiff(plain[0], fast[0]) > 1e-3); // the adapter is applied, not skipped
        }

        var longIds = torch.randint(4, 90, [1, LlamaCpuDecoder.MaxTokensPerPass + 1], dtype: ScalarType.Int64, generator: new torch.Generator(44));
        var (_, longSteps, longPasses) = Run(llama, llama, true, (cache, _) => [new ForwardInput { InputIds = longIds, Cache = cache }]);
        Assert.Equal((0, 0), (longSteps, longPasses));
    }

    [Fact]
    public void Greedy_self_speculative_generation_runs_through_the_kernels_with_the_same_tokens()
    {
        using var model = SelfSpeculativeTests.Model("llama");
        var llama = (LlamaForCausalLM)model;
        var generator = new TextGenerator(model);
        var prompts = SelfSpeculativeTests.Prompts(3, seed: 13);
        foreach (var (exit, k) in new[] { (1, 3), (2, 4), (4, 2) })
            foreach (var prompt in prompts)
            {
                var options = new GenerationOptions
                {
                    MaxNewTokens = 14, StopTokenIds = [], Strategy = DecodingStrategyKind.SelfSpeculative, ExitLayer = exit, NumSpeculations = k,
                };
                int steps = LlamaCpuDecoder.StepsOnThisThread, passes = LlamaCpuDecoder.MultiTokenPassesOnThisThread;
                var fast = generator.Generate([prompt], options);
                steps = LlamaCpuDecoder.StepsOnThisThread - steps;
                passes = LlamaCpuDecoder.MultiTokenPassesOnThisThread - passes;
                llama.UseCpuDecodeKernels = false;
                var slow = generator.Generate([prompt], options);
                llama.UseCpuDecodeKernels = true;
                var plain = generator.Generate([prompt], options with { Strategy = DecodingStrategyKind.Autoregressive, ExitLayer = null });
                Assert.Equal(plain.Sequences[0].Tokens, fast.Sequences[0].Tokens);
                Assert.Equal(slow.Sequences[0].Tokens, fast.Sequences[0].Tokens);
                // Every draft step is a kernel step; every verification (and a prompt of 2+ tokens) a multi-token pass.
                long rounds = fast.Stats.DraftedTokens / k;
                Assert.True(rounds > 0 && steps >= rounds * k, $"exit {exit}: {steps} kernel steps for {fast.Stats.DraftedTokens} drafts");
                if (exit < model.NumLayers) Assert.True(passes >= rounds, $"exit {exit}: {passes} multi-token passes for {rounds}+ rounds");
            }
    }

    [Fact]
    public void Greedy_autoregressive_and_early_exit_steps_run_on_the_host_with_the_same_tokens()
    {
        using var model = SelfSpeculativeTests.Model("llama");
        var llama = (LlamaForCausalLM)model;
        var generator = new TextGenerator(model);
        foreach (var prompt in SelfSpeculativeTests.Prompts(3, seed: 19))
            foreach (var options in new[]
                     {
                         new GenerationOptions { MaxNewTokens = 12, StopTokenIds = [] },
                         new GenerationOptions { MaxNewTokens = 12, StopTokenIds = [], Strategy = DecodingStrategyKind.EarlyExit, ExitLayer = 2 },
                     })
            {
                int host = LlamaCpuDecoder.HostPassesOnThisThread;
                var fast = generator.Generate([prompt], options);
                Assert.Equal(11, LlamaCpuDecoder.HostPassesOnThisThread - host); // every step after the prefill
                llama.UseCpuDecodeKernels = false;
                var slow = generator.Generate([prompt], options);
                llama.UseCpuDecodeKernels = true;
                Assert.Equal(slow.Sequences[0].Tokens, fast.Sequences[0].Tokens);
                Assert.Equal(slow.Sequences[0].FinishReason, fast.Sequences[0].FinishReason);
                // Sampling, processors and batches keep the tensor path.
                host = LlamaCpuDecoder.HostPassesOnThisThread;
                generator.Generate([prompt], options with { RepetitionPenalty = 1.2 });
                generator.Generate([prompt, prompt], options);
                generator.Generate([prompt], options with { DoSample = true, Seed = 3 });
                Assert.Equal(host, LlamaCpuDecoder.HostPassesOnThisThread);
            }
    }

    [Fact]
    public void Self_speculative_rounds_with_processors_or_batches_use_the_kernels_through_tensors()
    {
        // Repetition penalty (history-dependent) and a padded batch take the tensor rounds: the one-row drafts still run
        // through the kernels where they qualify (batch 1), and the output stays the autoregressive one.
        using var model = SelfSpeculativeTests.Model("llama");
        var llama = (LlamaForCausalLM)model;
        var generator = new TextGenerator(model);
        var prompt = SelfSpeculativeTests.Prompts(1, seed: 17)[0];
        var options = new GenerationOptions
        {
            MaxNewTokens = 12, StopTokenIds = [], RepetitionPenalty = 1.3, Strategy = DecodingStrategyKind.SelfSpeculative, ExitLayer = 2, NumSpeculations = 3,
        };
        int passes = LlamaCpuDecoder.MultiTokenPassesOnThisThread;
        var fast = generator.Generate([prompt], options);
        Assert.True(LlamaCpuDecoder.MultiTokenPassesOnThisThread - passes >= 2);
        llama.UseCpuDecodeKernels = false;
        var slow = generator.Generate([prompt], options);
        llama.UseCpuDecodeKernels = true;
        var plain = generator.Generate([prompt], options with { Strategy = DecodingStrategyKind.Autoregressive, ExitLayer = null });
        Assert.Equal(plain.Sequences[0].Tokens, fast.Sequences[0].Tokens);
        Assert.Equal(slow.Sequences[0].Tokens, fast.Sequences[0].Tokens);
    }

    [Theory]
    [InlineData(1, 37, 8)]
    [InlineData(5, 96, 13)]
    [InlineData(6, 41, 130)]
    [InlineData(7, 250, 9)]
    [InlineData(9, 300, 700)] // large enough to run in parallel blocks
    [InlineData(3, 41, 10)]   // with AVX-512, a pair and one through the 256-bit kernels on a ragged width
    // Multiples of 32 wide, where AVX-512 is accelerated: up to CpuKernels.Max256BitTokens tokens take the 256-bit kernels
    // in pairs, more the 512-bit row kernels in groups of 4, 3, 2 and 1.
    [InlineData(4, 64, 37)]
    [InlineData(5, 96, 70)]
    [InlineData(8, 128, 41)]
    [InlineData(9, 64, 21)]
    [InlineData(2, 64, 20)]
    [InlineData(3, 96, 33)]
    [InlineData(7, 128, 300)]
    [InlineData(6, 64, 1100)]
    public unsafe void Gemm_matches_a_float64_reference_for_every_token_count_and_ragged_width(int tokens, int cols, int rows)
    {
        // Widths that are not multiples of 8 or 16 take every remainder path of the 256-bit kernels (4-, 2-, 1-token
        // blocks; 16-, 8-, 1-wide).
        var random = new Random(tokens * 1000 + cols);
        float[] w = Enumerable.Range(0, rows * cols).Select(_ => (float)(random.NextDouble() - 0.5)).ToArray();
        float[] x = Enumerable.Range(0, tokens * cols).Select(_ => (float)(random.NextDouble() - 0.5)).ToArray();
        float[] bias = Enumerable.Range(0, rows).Select(_ => (float)random.NextDouble()).ToArray();
        foreach (bool accumulate in new[] { false, true })
        {
            float[] y = Enumerable.Range(0, tokens * rows).Select(i => (float)(i % 7)).ToArray();
            float[] before = (float[])y.Clone();
            fixed (float* wp = w, xp = x, yp = y, bp = bias)
                CpuKernels.Gemm(wp, xp, yp, bp, rows, cols, tokens, accumulate);
            for (int t = 0; t < tokens; t++)
                for (int r = 0; r < rows; r++)
                {
                    double expected = bias[r] + (accumulate ? before[t * rows + r] : 0);
                    for (int c = 0; c < cols; c++) expected += (double)w[r * cols + c] * x[t * cols + c];
                    Assert.True(Math.Abs(y[t * rows + r] - expected) < 1e-4, $"token {t}, row {r}: {y[t * rows + r]} vs {expected}");
                }
        }
    }

    [Theory]
    [InlineData(1, 37, 40)]
    [InlineData(2, 64, 64)]
    [InlineData(3, 96, 100)]
    [InlineData(5, 128, 70)]
    [InlineData(6, 64, 96)]   // a group of five, then one
    [InlineData(7, 200, 33)]
    [InlineData(11, 48, 130)]
    [InlineData(4, 768, 2100)] // large enough to run in parallel blocks
    public unsafe void Panel_products_match_a_float64_reference_for_every_token_count_and_row_range(int tokens, int cols, int rows)
    {
        // Rows past the last whole panel of 32 and ranges that start or end inside a panel take the row kernels on the
        // source matrix; the rest the panels. Rows outside the range must stay as they were.
        var random = new Random(tokens * 1000 + cols + rows);
        float[] w = Enumerable.Range(0, rows * cols).Select(_ => (float)(random.NextDouble() - 0.5)).ToArray();
        float[] x = Enumerable.Range(0, tokens * cols).Select(_ => (float)(random.NextDouble() - 0.5)).ToArray();
        float[] bias = Enumerable.Range(0, rows).Select(_ => (float)random.NextDouble()).ToArray();
        fixed (float* wp = w, xp = x, bp = bias)
        {
            using var panels = PanelMatrix.Pack(wp, rows, cols);
            Assert.Equal(rows / 32 * 32, panels.PackedRows);
            Assert.True(panels.Matches());
            foreach (var (r0, r1) in new[] { (0, rows), (5, rows - 3), (32, Math.Min(rows, 64)) })
                foreach (bool accumulate in new[] { false, true })
                {
                    float[] y = Enumerable.Range(0, tokens * rows).Select(i => (float)(i % 7)).ToArray();
                    float[] before = (float[])y.Clone();
                    fixed (float* yp = y)
                    {
                        if (r0 == 0 && r1 == rows) CpuKernels.PanelGemm(panels, xp, yp, bp, tokens, accumulate);
                        else CpuKernels.PanelRows(panels, xp, yp, bp, tokens, r0, r1, accumulate);
                    }
                    for (int t = 0; t < tokens; t++)
                        for (int r = 0; r < rows; r++)
                        {
                            double expected = before[t * rows + r];
                            if (r >= r0 && r < r1)
                            {
                                expected = bias[r] + (accumulate ? expected : 0);
                                for (int c = 0; c < cols; c++) expected += (double)w[r * cols + c] * x[t * cols + c];
                            }
                            Assert.True(Math.Abs(y[t * rows + r] - expected) < 1e-4, $"rows {r0}..{r1}, token {t}, row {r}: {y[t * rows + r]} vs {expected}");
                        }
                }
            // The last packed value is always among the sampled positions: a change there is noticed, and Refresh copies again.
            if (rows >= 32)
            {
                wp[(rows / 32 * 32 - 1) * cols + cols - 1] += 1;
                Assert.False(panels.Matches());
                panels.Refresh();
                Assert.True(panels.Matches());
            }
        }
    }

    [Fact]
    public void Self_speculative_verification_reads_panel_copies_that_follow_the_weights()
    {
        using var model = SelfSpeculativeTests.Model("llama");
        var llama = (LlamaForCausalLM)model;
        var generator = new TextGenerator(model);
        var prompt = SelfSpeculativeTests.Prompts(1, seed: 23)[0];
        var options = new GenerationOptions
        {
            MaxNewTokens = 16, StopTokenIds = [], Strategy = DecodingStrategyKind.SelfSpeculative, ExitLayer = 2, NumSpeculations = 4,
        };
        var plainOptions = options with { Strategy = DecodingStrategyKind.Autoregressive, ExitLayer = null };
        int panelPasses = LlamaCpuDecoder.PanelPassesOnThisThread;
        var packed = generator.Generate([prompt], options);
        panelPasses = LlamaCpuDecoder.PanelPassesOnThisThread - panelPasses;
        if (!PanelMatrix.Supported)
        {
            Assert.Null(llama.PackedCpuWeights); // no 512-bit vectors: no copies, the row kernels verify
            return;
        }
        // Layers 2 and 3 (seven matrices each) and the head.
        Assert.Equal(2 * 7 + 1, llama.PackedCpuWeights!.Count);
        Assert.True(panelPasses > 0 && panelPasses <= packed.Stats.DecodeSteps - 1, $"{panelPasses} verification passes on panels in {packed.Stats.DecodeSteps} steps");
        int before = LlamaCpuDecoder.PanelPassesOnThisThread;
        Assert.Equal(generator.Generate([prompt], plainOptions).Sequences[0].Tokens, packed.Sequences[0].Tokens);
        Assert.Equal(generator.Generate([prompt], options with { PackVerificationWeights = false }).Sequences[0].Tokens, packed.Sequences[0].Tokens);
        Assert.Equal(before, LlamaCpuDecoder.PanelPassesOnThisThread); // neither autoregressive decoding nor the option off reads them
        Assert.True(packed.Stats.DraftedTokens > 0 && packed.Stats.AcceptedDraftTokens < packed.Stats.DraftedTokens, "rounds should both accept and reject");

        // The tensor rounds (sampling, logits processors) verify over the copy too, with the same tokens for the same seed.
        foreach (var other in new[] { options with { DoSample = true, Seed = 11 }, options with { RepetitionPenalty = 1.3 } })
        {
            int tensorPasses = LlamaCpuDecoder.PanelPassesOnThisThread;
            var viaPanels = generator.Generate([prompt], other);
            Assert.True(LlamaCpuDecoder.PanelPassesOnThisThread > tensorPasses, "the tensor rounds' verification should read the panel copy");
            Assert.Equal(generator.Generate([prompt], other with { PackVerificationWeights = false }).Sequences[0].Tokens, viaPanels.Sequences[0].Tokens);
        }

        // Weights changed in place after packing (as merging an adapter does): the next generation copies them again,
        // so verification never reads stale values.
        using (torch.no_grad())
            foreach (var (name, p) in model.named_parameters())
                if (name.Contains(".layers.3.") && p.dim() == 2)
                    p.add_(torch.randn(p.shape, generator: new torch.Generator(5)) * 0.3);
        var changed = generator.Generate([prompt], options);
        Assert.Equal(generator.Generate([prompt], plainOptions).Sequences[0].Tokens, changed.Sequences[0].Tokens);
        var gate = ((LlamaMLP)llama.model.layers[3].mlp).gate_proj;
        unsafe
        {
            Assert.True(llama.PackedCpuWeights!.Find(CpuKernels.Pointer(((TorchSharp.Modules.Linear)gate).weight!))!.Matches());
        }

        // Over the memory budget (a lower exit layer would need more copies), the copies already made are still checked
        // against the weights before verification reads them.
        using (torch.no_grad())
            foreach (var (name, p) in model.named_parameters())
                if (name.Contains(".layers.2.") && p.dim() == 2)
                    p.mul_(0.7);
        LlamaCpuDecoder.PackBudgetBytes = 0;
        try
        {
            int budgetPasses = LlamaCpuDecoder.PanelPassesOnThisThread;
            var lower = generator.Generate([prompt], options with { ExitLayer = 1 });
            Assert.True(LlamaCpuDecoder.PanelPassesOnThisThread > budgetPasses, "the copies already made should still be read");
            Assert.Equal(2 * 7 + 1, llama.PackedCpuWeights!.Count); // nothing added for layer 1
            Assert.Equal(generator.Generate([prompt], plainOptions).Sequences[0].Tokens, lower.Sequences[0].Tokens);
        }
        finally
        {
            LlamaCpuDecoder.PackBudgetBytes = null;
        }

        // Training mode frees them; releasing by hand too.
        llama.train();
        Assert.Null(llama.PackedCpuWeights);
        llama.eval();
        generator.Generate([prompt], options);
        Assert.NotNull(llama.PackedCpuWeights);
        llama.ReleasePackedWeights();
        Assert.Null(llama.PackedCpuWeights);
    }
}

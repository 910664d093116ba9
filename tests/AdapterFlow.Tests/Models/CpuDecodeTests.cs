using AdapterFlow.Adapters;
using AdapterFlow.Adapters.IA3;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.Generation;
using AdapterFlow.Models;
using AdapterFlow.Models.Cpu;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Models;

/// <summary>
/// The CPU decode kernels (batch-1 float32 decode steps of the LLaMA family) give the libtorch path's logits and
/// cache, engage where they should, and leave everything else to libtorch. Some tests set the kernels' process-wide
/// thread count and pool mode, so the class runs alone.
/// </summary>
[Collection(KernelSettingsCollection.Name)]
public class CpuDecodeTests
{
    // Two float32 summation orders (the kernels' and libtorch's) over logits of magnitude ~10 differ by about 1e-5;
    // a real error (a wrong row, position or scale) is orders of magnitude larger.
    private const double Tolerance = 5e-5;

    /// <summary>Prefill, then one token per step; the logits of every decode step, with the kernels on or off.</summary>
    private static (Tensor Logits, int FastSteps) Decode(CausalLM model, LlamaForCausalLM llama, bool kernels, Tensor ids, Tensor? mask = null,
        Tensor? positions = null, int prefill = 3, int? exitLayer = null)
    {
        llama.UseCpuDecodeKernels = kernels;
        int before = LlamaCpuDecoder.StepsOnThisThread;
        using var cache = model.CreateCache();
        var pieces = new List<Tensor>();
        long time = ids.shape[1];
        model.forward(new ForwardInput
        {
            InputIds = ids.narrow(1, 0, prefill), AttentionMask = mask?.narrow(1, 0, prefill), PositionIds = positions?.narrow(1, 0, prefill),
            Cache = cache, ExitLayer = exitLayer,
        });
        for (int t = prefill; t < time; t++)
        {
            pieces.Add(model.forward(new ForwardInput
            {
                InputIds = ids.narrow(1, t, 1), AttentionMask = mask?.narrow(1, 0, t + 1), PositionIds = positions?.narrow(1, t, 1),
                Cache = cache, ExitLayer = exitLayer,
            }).Logits);
            Assert.Equal(t + 1, cache.LayerLength(0));
        }
        llama.UseCpuDecodeKernels = true;
        return (torch.cat(pieces, 1), LlamaCpuDecoder.StepsOnThisThread - before);
    }

    private static double MaxDiff(Tensor a, Tensor b) => (a - b).abs().max().to_type(ScalarType.Float64).item<double>();

    [Theory]
    [InlineData("llama", false)]
    [InlineData("llama", true)]
    [InlineData("mistral", false)]
    [InlineData("qwen2", true)]
    public void Decode_steps_match_the_libtorch_path(string arch, bool tied)
    {
        using var model = (LlamaForCausalLM)AutoModel.FromConfig(LlamaTestConfigs.Tiny(arch, tied), seed: 11);
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var ids = torch.randint(4, 90, [1, 12], dtype: ScalarType.Int64, generator: new torch.Generator(21));
        var (fast, steps) = Decode(model, model, kernels: true, ids);
        var (slow, none) = Decode(model, model, kernels: false, ids);
        Assert.Equal(9, steps);
        Assert.Equal(0, none);
        double diff = MaxDiff(fast, slow);
        Assert.True(diff < Tolerance, $"max |Δ| {diff}");
        Assert.True(fast.abs().max().item<float>() > 0.1); // a non-trivial comparison
    }

    [Fact]
    public void Kernels_are_as_accurate_as_libtorch_against_float64()
    {
        // Same weights in float64 (which the kernels leave to libtorch) as the ground truth: the kernels' float32
        // error is of the order of libtorch's own float32 error, i.e. the difference between the paths is rounding.
        var json = LlamaTestConfigs.Tiny("llama").ToJson();
        json["hidden_size"] = 256;
        json["intermediate_size"] = 512;
        var config = (LlamaConfig)AutoModel.ParseConfig(json, "config.json");
        using var model = (LlamaForCausalLM)AutoModel.FromConfig(config, seed: 3);
        using var wide = (LlamaForCausalLM)AutoModel.FromConfig(config, seed: 3, dtype: ScalarType.Float64);
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var ids = torch.randint(4, 90, [1, 16], dtype: ScalarType.Int64, generator: new torch.Generator(5));
        var truth = Decode(wide, wide, false, ids).Logits;
        double fast = MaxDiff(Decode(model, model, true, ids).Logits.to_type(ScalarType.Float64), truth);
        double slow = MaxDiff(Decode(model, model, false, ids).Logits.to_type(ScalarType.Float64), truth);
        Assert.True(fast < 3 * slow + 1e-6, $"kernels' error {fast} vs libtorch's {slow}");
    }

    [Fact]
    public void Padding_mask_positions_sliding_window_and_early_exit_match()
    {
        var config = (MistralConfig)LlamaTestConfigs.Tiny("mistral");
        config.SlidingWindow = 3;
        using var model = (LlamaForCausalLM)AutoModel.FromConfig(config, seed: 4);
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var ids = torch.randint(4, 90, [1, 10], dtype: ScalarType.Int64, generator: new torch.Generator(22));
        // A left-padded row as the generator feeds it: mask 0 on the padding, positions cumsum(mask) - 1.
        var mask = torch.ones([1, 10], dtype: ScalarType.Int64);
        mask[0, ..2] = torch.tensor(0L);
        var positions = DecoderParts.PositionIdsFromMask(mask);
        var (fast, steps) = Decode(model, model, true, ids, mask, positions, prefill: 4);
        var (slow, _) = Decode(model, model, false, ids, mask, positions, prefill: 4);
        Assert.Equal(6, steps);
        Assert.True(MaxDiff(fast, slow) < Tolerance, $"max |Δ| {MaxDiff(fast, slow)}");
        var (fastExit, exitSteps) = Decode(model, model, true, ids, exitLayer: 1);
        var (slowExit, _) = Decode(model, model, false, ids, exitLayer: 1);
        Assert.Equal(7, exitSteps);
        Assert.True(MaxDiff(fastExit, slowExit) < Tolerance);
        Assert.True(MaxDiff(fastExit, Decode(model, model, true, ids).Logits) > 1e-3); // the exit really skipped a layer
    }

    [Fact]
    public void Unmerged_lora_runs_in_the_kernels_and_other_adapters_through_libtorch()
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var ids = torch.randint(4, 90, [1, 9], dtype: ScalarType.Int64, generator: new torch.Generator(23));
        foreach (var dora in new[] { false, true })
        {
            var llama = (LlamaForCausalLM)AutoModel.FromConfig(LlamaTestConfigs.Tiny("llama", tied: true), seed: 2);
            using var peft = PeftModel.Create(llama, new LoraConfig
            {
                R = 4, LoraAlpha = 8, UseDora = dora, InitLoraWeights = LoraInit.Random,
                TargetModules = ModuleSelector.Names("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
            });
            DrawLoraWeights(peft, "default", 51);
            peft.eval();
            var (fast, steps) = Decode(peft, llama, true, ids);
            var (slow, _) = Decode(peft, llama, false, ids);
            Assert.Equal(6, steps);
            Assert.True(MaxDiff(fast, slow) < Tolerance, $"DoRA {dora}: max |Δ| {MaxDiff(fast, slow)}");
            // The adapter changes the output (it is not silently skipped).
            using (peft.DisableAdapters())
                Assert.True(MaxDiff(fast, Decode(peft, llama, true, ids).Logits) > 1e-3);
        }
        var baseModel = (LlamaForCausalLM)AutoModel.FromConfig(LlamaTestConfigs.Tiny("llama"), seed: 2);
        using var ia3 = PeftModel.Create(baseModel, new IA3Config
        {
            TargetModules = ModuleSelector.Names("k_proj", "v_proj", "down_proj"), FeedforwardModules = ModuleSelector.Names("down_proj"),
        });
        foreach (var p in ia3.parameters().Where(p => p.requires_grad)) p.add_(0.5);
        ia3.eval();
        var (fastIa3, ia3Steps) = Decode(ia3, baseModel, true, ids);
        Assert.Equal(6, ia3Steps);
        Assert.True(MaxDiff(fastIa3, Decode(ia3, baseModel, false, ids).Logits) < Tolerance);
    }

    [Fact]
    public void Greedy_generation_gives_the_same_tokens()
    {
        using var model = (LlamaForCausalLM)AutoModel.FromConfig(LlamaTestConfigs.Tiny("llama"), seed: 9);
        var generator = new TextGenerator(model);
        var options = new GenerationOptions { MaxNewTokens = 12, MinNewTokens = 12, StopTokenIds = [] };
        int[] prompt = [5, 17, 33, 2, 60];
        int before = LlamaCpuDecoder.StepsOnThisThread;
        var fast = generator.Generate(prompt, options).Tokens;
        Assert.True(LlamaCpuDecoder.StepsOnThisThread - before >= 11);
        model.UseCpuDecodeKernels = false;
        var slow = generator.Generate(prompt, options).Tokens;
        Assert.Equal(slow, fast);
    }

    [Fact]
    public void Training_autograd_batches_and_prefill_use_libtorch()
    {
        using var model = (LlamaForCausalLM)AutoModel.FromConfig(LlamaTestConfigs.Tiny("llama"), seed: 1);
        using var scope = torch.NewDisposeScope();
        using var cache = model.CreateCache();
        var ids = torch.randint(4, 90, [2, 4], dtype: ScalarType.Int64, generator: new torch.Generator(24));
        int before = LlamaCpuDecoder.StepsOnThisThread;
        using (torch.no_grad())
        {
            model.forward(new ForwardInput { InputIds = ids, Cache = cache });                       // prefill
            model.forward(new ForwardInput { InputIds = ids.narrow(1, 0, 1), Cache = cache });      // batch 2
        }
        using (var single = model.CreateCache())
        {
            var logits = model.forward(new ForwardInput { InputIds = ids[0..1, 0..1], Cache = single }).Logits; // autograd on
            Assert.True(logits.requires_grad);
            model.train();
            using (torch.no_grad()) model.forward(new ForwardInput { InputIds = ids[0..1, 0..1], Cache = model.CreateCache() });
            model.eval();
        }
        Assert.Equal(before, LlamaCpuDecoder.StepsOnThisThread);
    }

    [Fact]
    public void Concurrent_decoders_on_two_threads_stay_correct()
    {
        // The kernels' thread pool serves one call at a time; a concurrent caller takes Parallel.For instead. Each
        // row's sum is computed the same way whichever thread runs it, so concurrent results must equal sequential
        // ones bit for bit. Long enough rows (hidden 256) that the matrix-vector products really go parallel.
        var json = LlamaTestConfigs.Tiny("llama").ToJson();
        json["hidden_size"] = 256;
        json["intermediate_size"] = 512;
        var config = (LlamaConfig)AutoModel.ParseConfig(json, "config.json");
        var models = Enumerable.Range(0, 2).Select(k => (LlamaForCausalLM)AutoModel.FromConfig(config, seed: 20 + k)).ToArray();
        var ids = Enumerable.Range(0, 2).Select(k => torch.randint(4, 90, [1, 24], dtype: ScalarType.Int64, generator: new torch.Generator((ulong)k))).ToArray();
        var concurrent = new Tensor?[2];
        var threads = Enumerable.Range(0, 2).Select(k => new Thread(() =>
        {
            using var no = torch.no_grad();
            for (int round = 0; round < 3; round++)
            {
                var (logits, steps) = Decode(models[k], models[k], true, ids[k]);
                Assert.Equal(21, steps);
                concurrent[k]?.Dispose();
                concurrent[k] = logits.DetachFromDisposeScope();
            }
        })).ToArray();
        foreach (var t in threads) t.Start();
        foreach (var t in threads) t.Join();
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        for (int k = 0; k < 2; k++)
        {
            var sequential = Decode(models[k], models[k], true, ids[k]).Logits;
            Assert.True(MaxDiff(concurrent[k]!, sequential) == 0, $"model {k}: concurrent and sequential decoding differ");
            var slow = Decode(models[k], models[k], false, ids[k]).Logits;
            // Relative to the logits' scale: this wider model's logits reach the tens, where float32 summation order
            // alone moves them by a few 1e-5.
            double relative = MaxDiff(sequential, slow) / Math.Max(1.0, slow.abs().max().item<float>());
            Assert.True(relative < 1e-5, $"model {k}: max |Δ| / max |logit| = {relative}");
            concurrent[k]!.Dispose();
            models[k].Dispose();
        }
    }

    [Fact]
    public void Out_of_vocabulary_ids_fail_with_one_line()
    {
        using var model = (LlamaForCausalLM)AutoModel.FromConfig(LlamaTestConfigs.Tiny("llama"), seed: 1);
        using var no = torch.no_grad();
        using var cache = model.CreateCache();
        var e = Assert.Throws<ArgumentException>(() =>
            model.forward(new ForwardInput { InputIds = torch.tensor(new long[] { 500 }).view(1, 1), Cache = cache }));
        Assert.Contains("outside the vocabulary", e.Message);
        Assert.Equal(0, cache.Length);
    }
    /// <summary>A config big enough that q/k/v, gate/up and down really run as parallel regions (hidden 256, MLP 512).</summary>
    private static LlamaConfig Wide(string arch)
    {
        var json = LlamaTestConfigs.Tiny(arch).ToJson();
        json["hidden_size"] = 256;
        json["intermediate_size"] = 512;
        return (LlamaConfig)AutoModel.ParseConfig(json, "config.json");
    }

    /// <summary>Relative to the logits' scale (wider models' logits reach the tens).</summary>
    private static double RelativeDiff(Tensor fast, Tensor slow) => MaxDiff(fast, slow) / Math.Max(1.0, slow.abs().max().item<float>());

    private static void AssertMatches(CausalLM model, LlamaForCausalLM llama, Tensor ids, string what)
    {
        var (fast, steps) = Decode(model, llama, true, ids);
        Assert.Equal(ids.shape[1] - 3, steps);
        var slow = Decode(model, llama, false, ids).Logits;
        double relative = RelativeDiff(fast, slow);
        Assert.True(relative < 1e-5, $"{what}: max |Δ| / max |logit| = {relative}");
    }

    private static IEnumerable<LoraLinear> LoraLayers(CausalLM model) => model.modules().OfType<LoraLinear>();

    /// <summary>
    /// Redraws an adapter's A and B from a generator of the test's own, with the distribution LoraInit.Random leaves them
    /// in (nn.Linear's default, U(±1/√fan_in)): LoraInit.Random draws from torch's global generator, which tests in other
    /// collections advance at the same time, so the weights (and with them the float32 rounding the tolerance bounds)
    /// would change from run to run.
    /// </summary>
    private static void DrawLoraWeights(CausalLM model, string adapter, ulong seed)
    {
        var generator = new torch.Generator(seed);
        foreach (var layer in LoraLayers(model).Where(l => l.AdapterNames.Contains(adapter)))
            foreach (var weight in new[] { layer.A(adapter).weight!, layer.B(adapter).weight! })
            {
                double bound = 1 / Math.Sqrt(weight.shape[1]);
                weight.copy_((torch.rand(weight.shape, generator: generator) * 2 - 1) * bound);
            }
    }

    [Fact]
    public void Fused_regions_with_lora_on_some_projections_and_several_adapters_match()
    {
        // Qwen2 (biased q/k/v): LoRA on q and v but not k, and on gate but not up, so a region mixes plain and adapted
        // matrices; then a second adapter of another rank on other projections, both active at once; then disabled.
        int saved = CpuKernels.Threads;
        CpuKernels.Threads = 2;
        try
        {
            using var scope = torch.NewDisposeScope();
            using var no = torch.no_grad();
            var llama = (LlamaForCausalLM)AutoModel.FromConfig(Wide("qwen2"), seed: 5);
            using var peft = PeftModel.Create(llama, new LoraConfig
            {
                R = 8, LoraAlpha = 16, InitLoraWeights = LoraInit.Random, TargetModules = ModuleSelector.Names("q_proj", "v_proj", "gate_proj"),
            });
            peft.AddAdapter("second", new LoraConfig
            {
                R = 20, LoraAlpha = 10, InitLoraWeights = LoraInit.Random, TargetModules = ModuleSelector.Names("v_proj", "k_proj", "up_proj", "down_proj", "o_proj"),
            });
            DrawLoraWeights(peft, "default", 52);
            DrawLoraWeights(peft, "second", 53);
            peft.eval();
            var ids = torch.randint(4, 90, [1, 9], dtype: ScalarType.Int64, generator: new torch.Generator(31));
            var baseLogits = Decode(peft, llama, false, ids).Logits;
            AssertMatches(peft, llama, ids, "one adapter on q, v, gate");
            var one = Decode(peft, llama, true, ids).Logits;
            foreach (var layer in LoraLayers(peft)) layer.ActiveAdapters = ["default", "second"];
            AssertMatches(peft, llama, ids, "two active adapters");
            Assert.True(MaxDiff(one, Decode(peft, llama, true, ids).Logits) > 1e-3); // the second adapter really counts
            using (peft.DisableAdapters())
            {
                AssertMatches(peft, llama, ids, "adapters disabled");
                var disabled = Decode(peft, llama, true, ids).Logits;
                Assert.True(MaxDiff(disabled, one) > 1e-3);
            }
            peft.SetAdapter("second");
            AssertMatches(peft, llama, ids, "the second adapter alone");
            Assert.True(MaxDiff(baseLogits, Decode(peft, llama, true, ids).Logits) > 1e-3);
        }
        finally
        {
            CpuKernels.Threads = saved;
        }
    }

    [Fact]
    public void Merge_unmerge_delete_and_replaced_weights_are_seen_by_the_next_step()
    {
        // Whatever changes between steps (merging in place, unmerging, deleting an adapter, a base weight replaced by a
        // new tensor, a weight changed in place), the next kernel step must compute what libtorch computes.
        int saved = CpuKernels.Threads;
        CpuKernels.Threads = 2;
        try
        {
            using var scope = torch.NewDisposeScope();
            using var no = torch.no_grad();
            var llama = (LlamaForCausalLM)AutoModel.FromConfig(Wide("llama"), seed: 6);
            using var peft = PeftModel.Create(llama, new LoraConfig
            {
                R = 16, LoraAlpha = 32, InitLoraWeights = LoraInit.Random, TargetModules = ModuleSelector.Names("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
            });
            DrawLoraWeights(peft, "default", 54);
            peft.eval();
            var ids = torch.randint(4, 90, [1, 8], dtype: ScalarType.Int64, generator: new torch.Generator(32));
            var unmerged = Decode(peft, llama, true, ids).Logits;
            AssertMatches(peft, llama, ids, "unmerged");
            peft.Merge();
            Assert.All(LoraLayers(peft), l => Assert.Single(l.MergedAdapters));
            AssertMatches(peft, llama, ids, "merged");
            var merged = Decode(peft, llama, true, ids).Logits;
            Assert.True(RelativeDiff(merged, unmerged) < 1e-5, "merged and unmerged give the same function");
            peft.Unmerge();
            AssertMatches(peft, llama, ids, "unmerged again");
            Assert.True(RelativeDiff(Decode(peft, llama, true, ids).Logits, unmerged) < 1e-5);

            // A base weight replaced by a new tensor, and one changed in place.
            var q = (LoraLinear)llama.model.layers[0].self_attn.q_proj;
            var baseQ = (TorchSharp.Modules.Linear)q.BaseLayer;
            baseQ.weight = new TorchSharp.Modules.Parameter(baseQ.weight!.detach().clone() * 1.5f, requires_grad: false);
            AssertMatches(peft, llama, ids, "replaced q weight");
            var replaced = Decode(peft, llama, true, ids).Logits;
            Assert.True(MaxDiff(replaced, unmerged) > 1e-3);
            q.B("default").weight!.mul_(3);
            AssertMatches(peft, llama, ids, "lora_B scaled in place");
            Assert.True(MaxDiff(Decode(peft, llama, true, ids).Logits, replaced) > 1e-3);

            peft.AddAdapter("other", new LoraConfig { R = 4, InitLoraWeights = LoraInit.Random, TargetModules = ModuleSelector.Names("q_proj") });
            DrawLoraWeights(peft, "other", 55);
            peft.SetAdapter("other");
            AssertMatches(peft, llama, ids, "another adapter");
            peft.DeleteAdapter("default");
            AssertMatches(peft, llama, ids, "after deleting the first adapter");
        }
        finally
        {
            CpuKernels.Threads = saved;
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public unsafe void Projection_group_equals_separate_products(bool parallelFor)
    {
        // The region kernel directly: three matrices (odd sizes, one with a bias) with LoRA terms on two of them, and
        // a gate/up pair with SiLU, against libtorch. Through Parallel.For too, which hands out items in any order.
        int saved = CpuKernels.Threads;
        CpuKernels.Threads = 2;
        KernelPool.UseParallelFor = parallelFor;
        try
        {
            using var scope = torch.NewDisposeScope();
            using var no = torch.no_grad();
            var g = new torch.Generator(41);
            const int cols = 301;
            var x = torch.randn([cols], generator: g);
            var w = new[] { 517, 133, 260 }.Select(rows => torch.randn([rows, cols], generator: g) * 0.1f).ToArray();
            var bias = torch.randn([133], generator: g);
            var a0 = torch.randn([37, cols], generator: g) * 0.1f;
            var b0 = torch.randn([517, 37], generator: g) * 0.1f;
            var a2 = torch.randn([5, cols], generator: g) * 0.1f;
            var b2 = torch.randn([260, 5], generator: g) * 0.1f;
            var a2b = torch.randn([16, cols], generator: g) * 0.1f;
            var b2b = torch.randn([260, 16], generator: g) * 0.1f;
            var y = w.Select(m => torch.full([m.shape[0]], float.NaN)).ToArray();
            var group = new ProjectionGroup();
            for (int round = 0; round < 3; round++) // reused, as the decoder reuses one per thread
            {
                group.Begin(CpuKernels.Pointer(x), cols);
                group.AddTarget(CpuKernels.Pointer(w[0]), null, CpuKernels.Pointer(y[0]), 517);
                group.AddLora(CpuKernels.Pointer(a0), CpuKernels.Pointer(b0), 37, 0.5f);
                group.AddTarget(CpuKernels.Pointer(w[1]), CpuKernels.Pointer(bias), CpuKernels.Pointer(y[1]), 133);
                group.AddTarget(CpuKernels.Pointer(w[2]), null, CpuKernels.Pointer(y[2]), 260);
                group.AddLora(CpuKernels.Pointer(a2), CpuKernels.Pointer(b2), 5, 2f);
                group.AddLora(CpuKernels.Pointer(a2b), CpuKernels.Pointer(b2b), 16, -1f);
                group.Run();
                var expected = new[]
                {
                    w[0].mv(x) + 0.5f * b0.mv(a0.mv(x)),
                    w[1].mv(x) + bias,
                    w[2].mv(x) + 2f * b2.mv(a2.mv(x)) - b2b.mv(a2b.mv(x)),
                };
                for (int t = 0; t < 3; t++)
                    Assert.True(MaxDiff(y[t], expected[t]) < 1e-4, $"round {round}, matrix {t}: max |Δ| {MaxDiff(y[t], expected[t])}");
            }

            var gate = torch.randn([700, cols], generator: g) * 0.1f;
            var up = torch.randn([700, cols], generator: g) * 0.1f;
            var gateOut = torch.empty([700]);
            var upOut = torch.empty([700]);
            group.Begin(CpuKernels.Pointer(x), cols);
            var upB = torch.randn([700, 37], generator: g) * 0.1f;
            group.AddTarget(CpuKernels.Pointer(gate), null, CpuKernels.Pointer(gateOut), 700);
            group.AddTarget(CpuKernels.Pointer(up), null, CpuKernels.Pointer(upOut), 700);
            group.AddLora(CpuKernels.Pointer(a0), CpuKernels.Pointer(upB), 37, 0.25f);
            group.PairSiluMul();
            group.Run();
            var expectedGate = nn.functional.silu(gate.mv(x)) * (up.mv(x) + 0.25f * upB.mv(a0.mv(x)));
            Assert.True(MaxDiff(gateOut, expectedGate) < 1e-4, $"gate/up: max |Δ| {MaxDiff(gateOut, expectedGate)}");
        }
        finally
        {
            KernelPool.UseParallelFor = false;
            CpuKernels.Threads = saved;
        }
    }
}

using AdapterFlow.Adapters;
using AdapterFlow.Adapters.Bottleneck;
using AdapterFlow.Adapters.IA3;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.Adapters.PrefixTuning;
using AdapterFlow.Adapters.PromptTuning;
using AdapterFlow.Generation;
using AdapterFlow.Models;
using AdapterFlow.Models.Cpu;
using AdapterFlow.Tests.Generation;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Models;

/// <summary>
/// The host passes' per-generation memory of what they read (<see cref="HostPlan"/>) and the KV cache's host view
/// (<see cref="KVCache.ReserveHost"/>): both skip libtorch metadata calls, so both must give exactly what a pass that
/// asks every time gives, and must follow storage that moves.
/// </summary>
public class HostPlanTests
{
    /// <summary>A prompt, two one-token steps and a three-token block; every pass's logits, concatenated.</summary>
    private static unsafe float[] Passes(LlamaForCausalLM model, KVCache cache, HostPlan? plan)
    {
        int vocab = model.LlamaConfig.VocabSize, layers = model.NumLayers;
        var logits = new float[7 * vocab];
        fixed (float* l = logits)
        {
            long[] prompt = [5, 17, 3, 40];
            LlamaCpuDecoder.HostPass(model, cache, 0, layers, prompt.Length, prompt, null, 0, null, 1, l, plan: plan);
            LlamaCpuDecoder.HostPass(model, cache, 0, layers, 1, [8], null, 4, null, 1, l + vocab, plan: plan);
            LlamaCpuDecoder.HostPass(model, cache, 0, layers, 1, [61], null, 5, null, 1, l + 2 * vocab, plan: plan);
            LlamaCpuDecoder.HostPass(model, cache, 0, layers, 3, [2, 9, 30], null, 6, null, 3, l + 3 * vocab, plan: plan);
        }
        return logits;
    }

    [Fact]
    public void Passes_through_a_plan_give_the_logits_of_passes_that_look_everything_up()
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        foreach (bool tied in new[] { true, false })
        {
            var llama = (LlamaForCausalLM)AutoModel.FromConfig(LlamaTestConfigs.Tiny("llama", tied: tied), seed: 4);
            llama.eval();
            var plan = new HostPlan();
            var planned = Passes(llama, llama.CreateCache(), plan);
            var looked = Passes(llama, llama.CreateCache(), null);
            Assert.Equal(looked, planned); // the same kernels over the same memory: bit for bit
            Assert.Contains(planned, v => v != 0);
            Assert.Equal(7 * llama.NumLayers, plan.ProjectionCount); // q, k, v, o, gate, up, down of every layer, once each
            Assert.Equal(0, CpuKernels.PassWorkers); // a pass leaves the thread's kernels as it found them
        }
    }

    [Fact]
    public void A_plan_runs_unmerged_lora_terms_and_remembers_them()
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var llama = (LlamaForCausalLM)AutoModel.FromConfig(LlamaTestConfigs.Tiny("llama", tied: true), seed: 2);
        var plain = Passes(llama, llama.CreateCache(), null);
        using var peft = PeftModel.Create(llama, new LoraConfig
        {
            R = 4, LoraAlpha = 8, InitLoraWeights = LoraInit.Random,
            TargetModules = ModuleSelector.Names("q_proj", "v_proj", "down_proj"),
        });
        peft.eval();
        var plan = new HostPlan();
        var planned = Passes(llama, llama.CreateCache(), plan);
        Assert.Equal(Passes(llama, llama.CreateCache(), null), planned);
        Assert.True(plain.Zip(planned).Max(p => Math.Abs(p.First - p.Second)) > 1e-3); // the adapters are applied, not skipped
        // The same plan over a new cache: the remembered views still carry the terms.
        Assert.Equal(planned, Passes(llama, llama.CreateCache(), plan));
    }

    [Fact]
    public void The_next_generation_sees_a_replaced_weight()
    {
        // A plan lives for one generation: a weight replaced between generations (a new tensor, elsewhere in memory)
        // is what the next generation's host passes read.
        using var model = SelfSpeculativeTests.Model("llama");
        var llama = (LlamaForCausalLM)model;
        var generator = new TextGenerator(model);
        var prompt = SelfSpeculativeTests.Prompts(1, seed: 3)[0];
        ulong seed = 11;
        foreach (var options in new[]
                 {
                     new GenerationOptions { MaxNewTokens = 10, StopTokenIds = [] },
                     new GenerationOptions { MaxNewTokens = 10, StopTokenIds = [], Strategy = DecodingStrategyKind.SelfSpeculative, ExitLayer = 1, NumSpeculations = 3 },
                 })
        {
            var before = generator.Generate([prompt], options).Sequences[0].Tokens;
            var down = (Linear)((LlamaMLP)llama.model.layers[^1].mlp).down_proj;
            using (torch.no_grad())
                down.weight = new Parameter(torch.randn(down.weight!.shape, generator: new torch.Generator(seed++)), requires_grad: false);
            int host = LlamaCpuDecoder.HostPassesOnThisThread;
            var fast = generator.Generate([prompt], options).Sequences[0].Tokens;
            Assert.True(LlamaCpuDecoder.HostPassesOnThisThread > host); // the host passes ran
            llama.UseCpuDecodeKernels = false;
            var slow = generator.Generate([prompt], options).Sequences[0].Tokens;
            llama.UseCpuDecodeKernels = true;
            Assert.Equal(slow, fast);
            Assert.NotEqual(before, fast); // the new weight changes the text, so reading the old one would show
        }
    }

    public static TheoryData<string> AdapterMethods => new() { "lora", "ia3", "series", "prefix", "prompt" };

    [Theory]
    [MemberData(nameof(AdapterMethods))]
    public void Adapter_wrappers_decode_on_the_host_with_the_same_tokens(string method)
    {
        // A decode step through the wrapper is the wrapped model's forward, so greedy steps and self-speculative rounds
        // take the host passes (LoRA in the kernels, IA3 and bottleneck adapters through libtorch per slot, virtual
        // tokens already in the cache) and write what the libtorch path writes.
        using var model = SelfSpeculativeTests.Model("llama");
        var llama = (LlamaForCausalLM)model;
        PeftConfig config = method switch
        {
            "lora" => new LoraConfig { R = 4, LoraAlpha = 8, InitLoraWeights = LoraInit.Random, TargetModules = ModuleSelector.Pattern(ModuleSelector.AllLinear) },
            "ia3" => new IA3Config { InitIA3Weights = false },
            "series" => new BottleneckConfig { BottleneckSize = 4, InitWeights = "bert", NonLinearity = "tanh" },
            "prefix" => new PrefixTuningConfig { NumVirtualTokens = 3 },
            _ => new PromptTuningConfig { NumVirtualTokens = 3 },
        };
        using var peft = PeftModel.Create(model, config);
        using (torch.no_grad())
            foreach (var p in peft.parameters().Where(p => p.requires_grad)) p.add_(0.5); // away from identity initialisations
        peft.eval();
        var generator = new TextGenerator(peft);
        var prompt = SelfSpeculativeTests.Prompts(1, seed: 53)[0];
        var greedy = new GenerationOptions { MaxNewTokens = 10, StopTokenIds = [] };
        var speculative = greedy with { Strategy = DecodingStrategyKind.SelfSpeculative, ExitLayer = 2, NumSpeculations = 3 };
        int host = LlamaCpuDecoder.HostPassesOnThisThread;
        var fastGreedy = generator.Generate([prompt], greedy).Sequences[0].Tokens;
        Assert.Equal(9, LlamaCpuDecoder.HostPassesOnThisThread - host); // every step after the prefill
        host = LlamaCpuDecoder.HostPassesOnThisThread;
        int panels = LlamaCpuDecoder.PanelPassesOnThisThread;
        var fastSpeculative = generator.Generate([prompt], speculative).Sequences[0].Tokens;
        Assert.True(LlamaCpuDecoder.HostPassesOnThisThread > host);
        if (PanelMatrix.Supported) Assert.True(LlamaCpuDecoder.PanelPassesOnThisThread > panels); // verification over the panel copy
        llama.UseCpuDecodeKernels = false;
        var slowGreedy = generator.Generate([prompt], greedy).Sequences[0].Tokens;
        var slowSpeculative = generator.Generate([prompt], speculative).Sequences[0].Tokens;
        llama.UseCpuDecodeKernels = true;
        Assert.Equal(slowGreedy, fastGreedy);
        Assert.Equal(slowGreedy, slowSpeculative);
        Assert.Equal(slowGreedy, fastSpeculative);
        using (peft.DisableAdapters())
            Assert.NotEqual(fastGreedy, generator.Generate([prompt], greedy).Sequences[0].Tokens); // the adapter is in the text
    }

    [Fact]
    public unsafe void Panel_copies_are_made_of_float32_matrices_only()
    {
        // The packer reads rows × cols floats from a weight's memory: a bfloat16 head or projection holds half that.
        // Sampling takes the tensor rounds, which ask for panel copies whatever the model's dtype.
        if (!PanelMatrix.Supported) return; // nothing is packed without 512-bit vectors
        using var scope = torch.NewDisposeScope();
        foreach (bool tied in new[] { true, false })
        {
            var model = (LlamaForCausalLM)AutoModel.FromConfig(LlamaTestConfigs.Tiny("llama", tied: tied), seed: 3, dtype: ScalarType.BFloat16);
            model.eval();
            var packed = LlamaCpuDecoder.PackForVerification(model, 1);
            Assert.True(packed is null || packed.Bytes == 0, $"tied {tied}: {packed?.Bytes} bytes of panels from bfloat16 weights");
        }
    }

    [Fact]
    public unsafe void The_cache_host_view_follows_storage_that_grows_or_is_replaced()
    {
        using var scope = torch.NewDisposeScope();
        const int kvHeads = 2, headDim = 4;
        using var cache = new KVCache(1, initialCapacity: 2);
        var first = cache.ReserveHost(0, kvHeads, headDim, 1)!.Value;
        ((float*)first.Keys)[0] = 3.5f;
        cache.Advance(0, 1);
        Assert.Equal(first, cache.ReserveHost(0, kvHeads, headDim, 1)); // room left: the same memory, nothing asked
        cache.Advance(0, 1);
        var grown = cache.ReserveHost(0, kvHeads, headDim, 1)!.Value;
        Assert.NotEqual(first.Keys, grown.Keys);
        Assert.True(grown.Capacity >= 3);
        Assert.Equal(3.5f, ((float*)grown.Keys)[0]); // what was written survives the move

        // Storage grown by the tensor path (Append) is seen too: the view is dropped whenever the storage changes.
        cache.Advance(0, 1);
        var keys = torch.ones([1, kvHeads, 8, headDim]);
        cache.Append(0, keys, keys);
        cache.Truncate(2); // as rejected drafts are dropped: the old view's capacity would do, its memory would not
        var after = cache.ReserveHost(0, kvHeads, headDim, 1)!.Value;
        Assert.NotEqual(grown.Keys, after.Keys);
        Assert.Equal(3.5f, ((float*)after.Keys)[0]);
        Assert.Equal(1f, ((float*)after.Keys)[3 * headDim]); // the appended keys, in the storage the kernels now get

        // Storage of another layout is not handed out.
        Assert.Null(cache.ReserveHost(0, kvHeads + 1, headDim, 1));
    }

    [Fact]
    public void Host_passes_read_keys_the_tensor_path_wrote_after_the_cache_grew()
    {
        // Host steps, then a long block through libtorch (it grows the storage), then host steps again: the same
        // logits as running every pass through libtorch.
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var llama = (LlamaForCausalLM)AutoModel.FromConfig(LlamaTestConfigs.Tiny("llama", tied: true), seed: 5);
        llama.eval();
        var ids = torch.randint(4, 90, [1, 50], dtype: ScalarType.Int64, generator: new torch.Generator(8));
        Tensor Mixed(bool kernels)
        {
            llama.UseCpuDecodeKernels = kernels;
            try
            {
                var cache = new KVCache(llama.NumLayers, initialCapacity: 4);
                var plan = new HostPlan();
                var outputs = new List<Tensor>();
                outputs.Add(llama.forward(new ForwardInput { InputIds = ids.narrow(1, 0, 3), Cache = cache }).Logits);
                for (int t = 3; t < 6; t++) outputs.Add(Step(t));
                outputs.Add(llama.forward(new ForwardInput { InputIds = ids.narrow(1, 6, 40), Cache = cache }).Logits); // > 32 tokens: libtorch
                for (int t = 46; t < 50; t++) outputs.Add(Step(t));
                return torch.cat(outputs, 1);

                unsafe Tensor Step(int t)
                {
                    var logits = torch.empty([1, 1, llama.LlamaConfig.VocabSize]);
                    if (!kernels) return llama.forward(new ForwardInput { InputIds = ids.narrow(1, t, 1), Cache = cache }).Logits;
                    LlamaCpuDecoder.HostPass(llama, cache, 0, llama.NumLayers, 1, [ids[0, t].item<long>()], null, t, null, 1, CpuKernels.Pointer(logits), plan: plan);
                    return logits;
                }
            }
            finally
            {
                llama.UseCpuDecodeKernels = true;
            }
        }
        var fast = Mixed(true);
        var slow = Mixed(false);
        Assert.True((fast - slow).abs().max().item<float>() < 5e-5);
    }
}

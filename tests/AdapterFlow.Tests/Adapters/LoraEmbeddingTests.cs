using AdapterFlow.Adapters;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.IO;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Adapters;

/// <summary>LoRA on token embeddings (PEFT's lora.Embedding): identity at init, the formula, tied heads, merge, files.</summary>
public class LoraEmbeddingTests
{
    private static Tensor Ids() => torch.tensor(new long[,] { { 5, 17, 42, 9, 33, 101, 7, 64 }, { 11, 12, 13, 14, 15, 16, 17, 18 } });

    private static float MaxDiff(Tensor a, Tensor b) => (a - b).abs().max().item<float>();

    [SkippableFact]
    public void Zero_init_leaves_logits_unchanged_and_names_are_peft()
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var model = PeftReferenceTests.LoadBase("llama");
        var before = model.Logits(Ids());
        var peft = PeftModel.Create(model, new LoraConfig { R = 4, LoraAlpha = 8, TargetModules = ModuleSelector.Names("embed_tokens") });
        var layer = Assert.IsType<LoraEmbedding>(peft.AdapterLayers["model.embed_tokens"]);
        Assert.Equal([4, model.Config.VocabSize], layer.A("default").shape);
        Assert.Equal([model.Config.HiddenSize, 4], layer.B("default").shape);
        Assert.True(MaxDiff(peft.Logits(Ids()), before) < 1e-6f);
        var keys = peft.state_dict().Keys.ToHashSet();
        Assert.Contains("base_model.model.model.embed_tokens.base_layer.weight", keys);
        Assert.Contains("base_model.model.model.embed_tokens.lora_embedding_A.default", keys);
        Assert.Contains("base_model.model.model.embed_tokens.lora_embedding_B.default", keys);
        Assert.Equal(
            ["base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.model.embed_tokens.lora_embedding_B"],
            peft.AdapterTensors("default").Keys.ToArray());
        Assert.True(layer.A("default").requires_grad && layer.B("default").requires_grad);
    }

    [SkippableFact]
    public void Random_adapter_equals_hand_computation_and_tied_head_keeps_base_weight()
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var model = PeftReferenceTests.LoadBase("llama");
        Assert.True(model.Config.TieWordEmbeddings, "the llama reference model should tie its head");
        var baseWeight = AdapterFlow.Models.ModuleSurgery.EmbeddingWeight(((LlamaForCausalLM)model).model.embed_tokens).detach().clone();
        var peft = PeftModel.Create(model, new LoraConfig { R = 3, LoraAlpha = 6, InitLoraWeights = LoraInit.Random, TargetModules = ModuleSelector.Names("embed_tokens") });
        var layer = (LoraEmbedding)peft.AdapterLayers["model.embed_tokens"];
        Assert.Equal(2.0, layer.Scaling("default"));
        var a = layer.A("default");
        var b = layer.B("default");
        var ids = Ids();

        // By hand: E[x] + s · Aᵀ[x] Bᵀ, one token at a time.
        var expected = torch.zeros(ids.shape[0], ids.shape[1], b.shape[0]);
        for (int i = 0; i < ids.shape[0]; i++)
            for (int j = 0; j < ids.shape[1]; j++)
            {
                long t = ids[i, j].item<long>();
                expected[i, j] = baseWeight[t] + 2.0 * b.matmul(a[.., (int)t]);
            }
        var embeds = peft.Model.EmbedTokens(ids);
        Assert.True(MaxDiff(embeds, expected) < 1e-5f, $"embedding differs by {MaxDiff(embeds, expected)}");

        // The whole model: those embeddings through the base model, whose tied head reads the base table (as PEFT).
        var logits = peft.Logits(ids);
        Tensor byHand;
        using (peft.DisableAdapters()) byHand = peft.Model.forward(new ForwardInput { InputsEmbeds = expected }).Logits;
        Assert.True(MaxDiff(logits, byHand) < 1e-4f, $"logits differ by {MaxDiff(logits, byHand)}");
        Assert.True(MaxDiff(logits, PeftReferenceTests.LoadBase("llama").Logits(ids)) > 1e-3f, "a random adapter should change the logits");
        Assert.True(AdapterFlow.Models.ModuleSurgery.EmbeddingWeight(((LlamaForCausalLM)peft.Model).model.embed_tokens).eq(baseWeight).all().item<bool>());

        // Merging would change the tied head too: refused with a clear message.
        var error = Assert.Throws<NotSupportedException>(() => peft.Merge());
        Assert.Contains("tie_word_embeddings", error.Message);
    }

    [SkippableFact]
    public void Merge_equals_unmerged_on_an_untied_model()
    {
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var model = PeftReferenceTests.LoadBase("mistral");
        Assert.False(model.Config.TieWordEmbeddings);
        var peft = PeftModel.Create(model, new LoraConfig { R = 4, LoraAlpha = 8, InitLoraWeights = LoraInit.Random, TargetModules = ModuleSelector.Names("embed_tokens", "q_proj") });
        var unmerged = peft.Logits(Ids());
        peft.Merge();
        var merged = peft.Logits(Ids());
        Assert.True(MaxDiff(merged, unmerged) < 1e-4f, $"merged differs by {MaxDiff(merged, unmerged)}");
        peft.Unmerge();
        Assert.True(MaxDiff(peft.Logits(Ids()), unmerged) < 1e-4f);
        var plain = peft.MergeAndUnload();
        Assert.IsType<TorchSharp.Modules.Embedding>(((LlamaForCausalLM)plain).model.embed_tokens);
        Assert.True(MaxDiff(plain.Logits(Ids()), unmerged) < 1e-4f);
    }

    [SkippableFact]
    public void Save_and_load_round_trip_with_peft_tensor_names()
    {
        var output = Path.Combine(Path.GetTempPath(), $"af-lora-emb-{Guid.NewGuid():N}");
        try
        {
            using var scope = torch.NewDisposeScope();
            using var no = torch.no_grad();
            var peft = PeftModel.Create(PeftReferenceTests.LoadBase("llama"),
                new LoraConfig { R = 4, LoraAlpha = 8, InitLoraWeights = LoraInit.Random, TargetModules = ModuleSelector.Names("embed_tokens", "v_proj") });
            var logits = peft.Logits(Ids());
            peft.SavePretrained(output);
            using (var file = SafetensorsFile.Open(Path.Combine(output, "adapter_model.safetensors")))
            {
                Assert.Contains("base_model.model.model.embed_tokens.lora_embedding_A", file.Names);
                Assert.Contains("base_model.model.model.embed_tokens.lora_embedding_B", file.Names);
                Assert.Contains("base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight", file.Names);
            }
            var reloaded = PeftModel.FromPretrained(PeftReferenceTests.LoadBase("llama"), output);
            Assert.IsType<LoraEmbedding>(reloaded.AdapterLayers["model.embed_tokens"]);
            Assert.True(reloaded.Logits(Ids()).eq(logits).all().item<bool>());
        }
        finally
        {
            if (Directory.Exists(output)) Directory.Delete(output, true);
        }
    }

    [SkippableTheory]
    [InlineData("llama")]   // tied head: PEFT writes lm_head.weight too; the embedding entry sets both
    [InlineData("mistral")] // untied head
    public void Peft_saved_embedding_layers_load_into_the_model(string arch)
    {
        var output = Path.Combine(Path.GetTempPath(), $"af-lora-embsave-{Guid.NewGuid():N}");
        try
        {
            using var scope = torch.NewDisposeScope();
            using var no = torch.no_grad();
            var peft = PeftModel.Create(PeftReferenceTests.LoadBase(arch),
                new LoraConfig { R = 4, InitLoraWeights = LoraInit.Random, TargetModules = ModuleSelector.Names("embed_tokens", "v_proj") });
            peft.SavePretrained(output);
            // What PEFT's save_embedding_layers adds (its default when an embedding is a target): the full matrices.
            var file = Path.Combine(output, "adapter_model.safetensors");
            var tensors = new List<KeyValuePair<string, Tensor>>();
            using (var saved = SafetensorsFile.Open(file))
                foreach (var name in saved.Names) tensors.Add(new(name, saved.Load(name)));
            var model = PeftReferenceTests.LoadBase(arch);
            var embedding = model.state_dict()["model.embed_tokens.weight"] + 0.01f;
            tensors.Add(new("base_model.model.model.embed_tokens.base_layer.weight", embedding));
            var head = model.Config.TieWordEmbeddings ? embedding : model.state_dict()["lm_head.weight"] - 0.02f;
            tensors.Add(new("base_model.model.lm_head.weight", head));
            SafetensorsWriter.Save(file, tensors, new Dictionary<string, string> { ["format"] = "pt" });

            var reloaded = PeftModel.FromPretrained(model, output);
            var state = reloaded.state_dict();
            Assert.True(state["base_model.model.model.embed_tokens.base_layer.weight"].eq(embedding).all().item<bool>(), "embedding not loaded");
            if (!model.Config.TieWordEmbeddings)
                Assert.True(state["base_model.model.lm_head.weight"].eq(head).all().item<bool>(), "output embedding not loaded");

            // A resized vocabulary is named in one line.
            tensors[^2] = new("base_model.model.model.embed_tokens.base_layer.weight", torch.zeros(embedding.shape[0] + 3, embedding.shape[1]));
            SafetensorsWriter.Save(file, tensors, new Dictionary<string, string> { ["format"] = "pt" });
            var error = Assert.Throws<InvalidDataException>(() => PeftModel.FromPretrained(PeftReferenceTests.LoadBase(arch), output));
            Assert.Contains("resized vocabulary", error.Message);
        }
        finally
        {
            if (Directory.Exists(output)) Directory.Delete(output, true);
        }
    }

    [SkippableFact]
    public void Dora_on_an_embedding_renormalises_columns_merges_and_round_trips()
    {
        var output = Path.Combine(Path.GetTempPath(), $"af-dora-emb-{Guid.NewGuid():N}");
        try
        {
            using var scope = torch.NewDisposeScope();
            using var no = torch.no_grad();
            var model = PeftReferenceTests.LoadBase("mistral");
            var before = model.Logits(Ids());
            var fresh = PeftModel.Create(PeftReferenceTests.LoadBase("mistral"), new LoraConfig { R = 4, UseDora = true, TargetModules = ModuleSelector.Names("embed_tokens") });
            Assert.True((fresh.Logits(Ids()) - before).abs().max().item<float>() < 1e-5, "a fresh DoRA embedding adapter changed the output");

            var peft = PeftModel.Create(model, new LoraConfig { R = 4, LoraAlpha = 8, UseDora = true, InitLoraWeights = LoraInit.Random, TargetModules = ModuleSelector.Names("embed_tokens") });
            var layer = Assert.IsType<LoraEmbedding>(peft.AdapterLayers["model.embed_tokens"]);
            var table = ((TorchSharp.Modules.Embedding)layer.BaseLayer).weight!;
            // m starts as the column norms of W + s·(B·A)ᵀ; make it non-trivial.
            var updated = table + 2.0 * layer.B("default").matmul(layer.A("default")).t();
            Assert.True((layer.Magnitude("default") - updated.norm(0, keepdim: false)).abs().max().item<float>() < 1e-5);
            Assert.Equal(new[] { table.shape[1] }, layer.Magnitude("default").shape);
            layer.Magnitude("default").mul_(torch.linspace(0.5, 1.5, table.shape[1]));
            // Hand computation: rows of (W + s·(B·A)ᵀ) scaled per column by m / ‖column‖.
            var ids = Ids();
            var expected = (updated * (layer.Magnitude("default") / updated.norm(0, keepdim: false))).index_select(0, ids.flatten()).view(ids.shape[0], ids.shape[1], -1);
            Assert.True((layer.forward(ids) - expected).abs().max().item<float>() < 1e-5, "DoRA embedding formula");

            var unmerged = peft.Logits(ids);
            peft.Merge();
            Assert.True((peft.Logits(ids) - unmerged).abs().max().item<float>() < 1e-4, "merged differs from unmerged");
            peft.Unmerge();
            Assert.True((table - ((TorchSharp.Modules.Embedding)PeftReferenceTests.LoadBase("mistral").named_modules().First(m => m.name == "model.embed_tokens").module).weight!).abs().max().item<float>() < 1e-5, "unmerge did not restore W");

            peft.SavePretrained(output);
            using (var file = SafetensorsFile.Open(Path.Combine(output, "adapter_model.safetensors")))
                Assert.Equal(new[] { table.shape[1] }, file.Entry("base_model.model.model.embed_tokens.lora_magnitude_vector").Shape);
            var reloaded = PeftModel.FromPretrained(PeftReferenceTests.LoadBase("mistral"), output);
            Assert.True((reloaded.Logits(ids) - unmerged).abs().max().item<float>() < 1e-6, "reloaded DoRA embedding differs");
        }
        finally
        {
            if (Directory.Exists(output)) Directory.Delete(output, true);
        }
    }
}

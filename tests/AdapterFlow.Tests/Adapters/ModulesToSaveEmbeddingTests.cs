using AdapterFlow.Adapters;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.IO;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Adapters;

/// <summary>modules_to_save on a token embedding (PEFT: a trainable copy; a tied head keeps the frozen table).</summary>
public class ModulesToSaveEmbeddingTests
{
    private static Tensor Ids() => torch.tensor(new long[,] { { 5, 17, 42, 9, 33, 101, 7, 64 }, { 11, 12, 13, 14, 15, 16, 17, 18 } });

    private static float MaxDiff(Tensor a, Tensor b) => (a - b).abs().max().item<float>();

    [SkippableFact]
    public void Embedding_copy_trains_alone_saves_under_peft_name_and_reloads()
    {
        var output = Path.Combine(Path.GetTempPath(), $"af-mts-emb-{Guid.NewGuid():N}");
        try
        {
            using var scope = torch.NewDisposeScope();
            using var no = torch.no_grad();
            var model = PeftReferenceTests.LoadBase("llama");
            var before = model.Logits(Ids());
            var original = AdapterFlow.Models.ModuleSurgery.EmbeddingWeight(((LlamaForCausalLM)model).model.embed_tokens).detach().clone();
            var peft = PeftModel.Create(model, new LoraConfig { R = 2, TargetModules = ModuleSelector.Names("q_proj"), ModulesToSave = ["embed_tokens"] });
            var wrapper = Assert.IsType<ModulesToSaveWrapper>(peft.AdapterLayers["model.embed_tokens"]);
            Assert.True(MaxDiff(peft.Logits(Ids()), before) < 1e-6f, "a fresh copy must not change the logits");
            var copy = (TorchSharp.Modules.Embedding)wrapper.Copy("default");
            Assert.True(copy.weight!.requires_grad);
            Assert.False(((TorchSharp.Modules.Embedding)wrapper.original_module).weight!.requires_grad);

            // Train the copy (a visible change): the tokens' embeddings move, the tied head keeps the frozen table.
            copy.weight!.add_(torch.randn(copy.weight.shape) * 0.05);
            var ids = Ids();
            var embeds = peft.Model.EmbedTokens(ids);
            Assert.True(MaxDiff(embeds, copy.weight.index_select(0, ids.flatten()).view(embeds.shape)) == 0f);
            var logits = peft.Logits(ids);
            Tensor byHand;
            using (peft.DisableAdapters()) byHand = peft.Model.forward(new ForwardInput { InputsEmbeds = embeds }).Logits;
            Assert.True(MaxDiff(logits, byHand) < 1e-5f, $"logits differ from the copy's embeddings through the frozen model by {MaxDiff(logits, byHand)}");
            Assert.True(MaxDiff(logits, before) > 1e-3f, "the trained copy should change the logits");
            Assert.True(AdapterFlow.Models.ModuleSurgery.EmbeddingWeight(((LlamaForCausalLM)peft.Model).model.embed_tokens).eq(original).all().item<bool>(),
                "the tied head must read the frozen original table");

            peft.SavePretrained(output);
            using (var file = SafetensorsFile.Open(Path.Combine(output, "adapter_model.safetensors")))
                Assert.Contains("base_model.model.model.embed_tokens.weight", file.Names);
            var reloaded = PeftModel.FromPretrained(PeftReferenceTests.LoadBase("llama"), output);
            Assert.IsType<ModulesToSaveWrapper>(reloaded.AdapterLayers["model.embed_tokens"]);
            Assert.True(MaxDiff(reloaded.Logits(ids), logits) < 1e-6f);
        }
        finally
        {
            if (Directory.Exists(output)) Directory.Delete(output, true);
        }
    }

    [SkippableFact]
    public void Tied_head_gets_an_untied_copy_that_saves_reloads_and_unloads_untied()
    {
        var output = Path.Combine(Path.GetTempPath(), $"af-mts-tied-{Guid.NewGuid():N}");
        try
        {
            using var scope = torch.NewDisposeScope();
            using var no = torch.no_grad();
            var model = PeftReferenceTests.LoadBase("llama");
            Assert.True(model.Config.TieWordEmbeddings);
            var before = model.Logits(Ids());
            var table = AdapterFlow.Models.ModuleSurgery.EmbeddingWeight(((LlamaForCausalLM)model).model.embed_tokens).detach().clone();
            var peft = PeftModel.Create(model, new LoraConfig { R = 2, TargetModules = ModuleSelector.Names("q_proj"), ModulesToSave = ["lm_head"] });
            var wrapper = Assert.IsType<ModulesToSaveWrapper>(peft.AdapterLayers["lm_head"]);
            Assert.True(MaxDiff(peft.Logits(Ids()), before) < 1e-6f, "a fresh head copy must not change the logits");
            var head = Assert.IsType<TorchSharp.Modules.Linear>(wrapper.Copy("default"));
            Assert.True(head.weight!.requires_grad);

            head.weight!.add_(torch.randn(head.weight.shape) * 0.05);
            var logits = peft.Logits(Ids());
            Assert.True(MaxDiff(logits, before) > 1e-3f, "the trained head should change the logits");
            // The input embedding is untouched by training the head copy.
            Assert.True(AdapterFlow.Models.ModuleSurgery.EmbeddingWeight(((LlamaForCausalLM)peft.Model).model.embed_tokens).eq(table).all().item<bool>());

            peft.SavePretrained(output);
            using (var file = SafetensorsFile.Open(Path.Combine(output, "adapter_model.safetensors")))
                Assert.Contains("base_model.model.lm_head.weight", file.Names);
            var reloaded = PeftModel.FromPretrained(PeftReferenceTests.LoadBase("llama"), output);
            Assert.True(MaxDiff(reloaded.Logits(Ids()), logits) < 1e-6f);

            var plain = peft.MergeAndUnload();
            Assert.False(plain.Config.TieWordEmbeddings, "an unloaded model with its own head is no longer tied");
            Assert.True(MaxDiff(plain.Logits(Ids()), logits) < 1e-4f);
            var saved = Path.Combine(output, "merged");
            AutoModel.Save(plain, saved);
            Assert.True(MaxDiff(AutoModel.FromPretrained(saved).Logits(Ids()), logits) < 1e-4f, "the saved merged model lost its own head");
        }
        finally
        {
            if (Directory.Exists(output)) Directory.Delete(output, true);
        }
    }
}

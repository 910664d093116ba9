using AdapterFlow.Adapters;
using AdapterFlow.Adapters.PTuning;
using AdapterFlow.IO;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Adapters;

/// <summary>P-tuning with PEFT's LSTM re-parameterisation (encoder_reparameterization_type "LSTM").</summary>
public class PTuningLstmTests
{
    private static Tensor Ids() => torch.tensor(new long[,] { { 5, 17, 42, 9, 33, 101, 7, 64 }, { 11, 12, 13, 14, 15, 16, 17, 18 } });

    private static PromptEncoderConfig Config() => new()
    {
        NumVirtualTokens = 3, EncoderReparameterizationType = "LSTM", EncoderHiddenSize = 16, EncoderNumLayers = 2,
    };

    [SkippableFact]
    public void Lstm_encoder_has_peft_state_dict_names_and_shapes()
    {
        using var scope = torch.NewDisposeScope();
        var model = PeftReferenceTests.LoadBase("llama");
        long d = model.Config.HiddenSize, h = 16;
        var peft = PeftModel.Create(model, Config());
        var encoder = peft.state_dict()
            .Where(kv => kv.Key.StartsWith("prompt_encoder.", StringComparison.Ordinal))
            .ToDictionary(kv => kv.Key, kv => kv.Value.shape);
        // The keys and shapes torch.nn.LSTM(d, h, num_layers=2, bidirectional=True) and PEFT's mlp_head give.
        var expected = new Dictionary<string, long[]>
        {
            ["prompt_encoder.default.embedding.weight"] = [3, d],
            ["prompt_encoder.default.mlp_head.0.weight"] = [2 * h, 2 * h],
            ["prompt_encoder.default.mlp_head.0.bias"] = [2 * h],
            ["prompt_encoder.default.mlp_head.2.weight"] = [d, 2 * h],
            ["prompt_encoder.default.mlp_head.2.bias"] = [d],
        };
        foreach (var layer in new[] { 0, 1 })
            foreach (var suffix in new[] { "", "_reverse" })
            {
                long input = layer == 0 ? d : 2 * h;
                expected[$"prompt_encoder.default.lstm_head.weight_ih_l{layer}{suffix}"] = [4 * h, input];
                expected[$"prompt_encoder.default.lstm_head.weight_hh_l{layer}{suffix}"] = [4 * h, h];
                expected[$"prompt_encoder.default.lstm_head.bias_ih_l{layer}{suffix}"] = [4 * h];
                expected[$"prompt_encoder.default.lstm_head.bias_hh_l{layer}{suffix}"] = [4 * h];
            }
        Assert.Equal(expected.Keys.Order(StringComparer.Ordinal), encoder.Keys.Order(StringComparer.Ordinal));
        foreach (var (name, shape) in expected) Assert.Equal(shape, encoder[name]);
        // PEFT's trainable count: the embedding, the LSTM and the MLP head; nothing of the base model.
        long trainable = expected.Values.Sum(s => s.Aggregate(1L, (a, b) => a * b));
        Assert.Equal((trainable, model.ParameterCount() + trainable), peft.CountParameters());
        // A state dict (e.g. PEFT's, or a checkpoint) loads back by these names.
        var again = PeftModel.Create(PeftReferenceTests.LoadBase("llama"), Config());
        again.load_state_dict(peft.state_dict());
        using var no = torch.no_grad();
        Assert.True(again.Logits(Ids()).eq(peft.Logits(Ids())).all().item<bool>(), "state dict round trip changed the output");
    }

    [SkippableFact]
    public void Lstm_encoder_trains_only_adapter_tensors_and_saves_its_computed_table()
    {
        var output = Path.Combine(Path.GetTempPath(), $"af-ptlstm-{Guid.NewGuid():N}");
        try
        {
            using var scope = torch.NewDisposeScope();
            var model = PeftReferenceTests.LoadBase("llama");
            var baseBefore = model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone());
            var peft = PeftModel.Create(model, Config());
            var ids = Ids();
            Tensor before;
            using (torch.no_grad()) before = peft.Logits(ids);
            Assert.Equal(ids.shape[1] + 3, before.shape[1]); // the virtual tokens come first

            var lstmWeight = peft.prompt_encoder["default"].named_parameters().Single(p => p.name == "lstm_head.weight_hh_l1_reverse").parameter;
            var lstmBefore = lstmWeight.detach().clone();
            peft.train();
            var optimizer = torch.optim.Adam(peft.TrainableParameters(), lr: 1e-2);
            optimizer.zero_grad();
            var logits = peft.Logits(ids);
            var targets = torch.randint(0, logits.shape[^1], [logits.shape[0] * logits.shape[1]], generator: new torch.Generator(5));
            nn.functional.cross_entropy(logits.reshape(-1, logits.shape[^1]), targets).backward();
            optimizer.step();
            peft.eval();

            Assert.False(lstmWeight.eq(lstmBefore).all().item<bool>(), "the LSTM did not train");
            foreach (var (name, tensor) in model.state_dict())
                Assert.True(tensor.eq(baseBefore[name]).all().item<bool>(), $"base tensor {name} changed");
            Tensor after;
            using (torch.no_grad()) after = peft.Logits(ids);
            Assert.True((after - before).abs().max().item<float>() > 1e-4, "training did not change the output");

            // PEFT's file: only prompt_embeddings, the encoder's output; the config names the LSTM.
            peft.SavePretrained(output);
            using (var file = SafetensorsFile.Open(Path.Combine(output, PeftModel.WeightsFile)))
                Assert.Equal(["prompt_embeddings"], file.Names);
            var config = Assert.IsType<PromptEncoderConfig>(PeftConfig.Load(output));
            Assert.Equal("LSTM", config.EncoderReparameterizationType);
            Assert.Equal(16, config.EncoderHiddenSize);
            Assert.Equal(2, config.EncoderNumLayers);
            var reloaded = PeftModel.FromPretrained(PeftReferenceTests.LoadBase("llama"), output);
            using (torch.no_grad())
                Assert.True((reloaded.Logits(ids) - after).abs().max().item<float>() < 1e-5, "the reloaded table differs from the trained encoder");
        }
        finally
        {
            if (Directory.Exists(output)) Directory.Delete(output, true);
        }
    }

    [SkippableFact]
    public void Encoder_hidden_size_defaults_to_the_token_width_and_bad_types_are_refused()
    {
        using var scope = torch.NewDisposeScope();
        var model = PeftReferenceTests.LoadBase("llama");
        var config = new PromptEncoderConfig { NumVirtualTokens = 2, EncoderReparameterizationType = "LSTM" };
        var peft = PeftModel.Create(model, config);
        Assert.Equal(model.Config.HiddenSize, config.EncoderHiddenSize); // written back, so PEFT can read the file
        var error = Assert.Throws<ArgumentException>(() =>
            PeftModel.Create(PeftReferenceTests.LoadBase("llama"), new PromptEncoderConfig { NumVirtualTokens = 2, EncoderReparameterizationType = "GRU" }));
        Assert.Contains("GRU", error.Message);
    }
}

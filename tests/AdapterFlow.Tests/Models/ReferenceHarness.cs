using System.Text.Json.Nodes;
using AdapterFlow.IO;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Models;

/// <summary>
/// Reads one ../shared/reference/&lt;arch&gt; folder (a tiny model made by Hugging Face transformers with its
/// logits and greedy tokens) and checks a model against it.
/// </summary>
public sealed class ReferenceCase : IDisposable
{
    public const double LogitTolerance = 1e-4;

    private readonly SafetensorsFile _tensors;

    private ReferenceCase(string folder)
    {
        Folder = folder;
        _tensors = SafetensorsFile.Open(Path.Combine(folder, "reference.safetensors"));
        Json = (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(folder, "reference.json")))!;
    }

    public string Folder { get; }
    public JsonObject Json { get; }

    /// <summary>Opens ../shared/reference/&lt;arch&gt;, or skips the test when shared/ is absent.</summary>
    public static ReferenceCase Open(string arch) => new(SharedFiles.Require("reference", arch));

    public bool Has(string tensor) => _tensors.Contains(tensor);
    public Tensor Tensor(string name) => _tensors.Load(name);

    public long[] GreedyPrompt => ((JsonArray)Json["greedy"]!["prompt"]!).Select(x => x!.GetValue<long>()).ToArray();
    public long[] GreedyNewTokens => ((JsonArray)Json["greedy"]!["new_tokens"]!).Select(x => x!.GetValue<long>()).ToArray();

    public long[][] GreedyBatchNewTokens =>
        ((JsonArray)Json["greedy_batch"]!["new_tokens"]!).Select(r => ((JsonArray)r!).Select(x => x!.GetValue<long>()).ToArray()).ToArray();

    /// <summary>Max |a - b| over positions where the attention mask is 1 (logits at padding are meaningless).</summary>
    public static double MaxDiffWhereReal(Tensor actual, Tensor expected, Tensor? attentionMask)
    {
        using var scope = torch.NewDisposeScope();
        var diff = (actual.to_type(ScalarType.Float32) - expected.to_type(ScalarType.Float32)).abs();
        if (attentionMask is not null)
            diff = diff * attentionMask.to_type(ScalarType.Float32).unsqueeze(-1);
        return diff.max().item<float>();
    }

    /// <summary>Greedy continuation by repeated full forward passes (no cache): the plainest possible reference loop.</summary>
    public static long[] GreedyWithoutCache(CausalLM model, long[] prompt, int newTokens)
    {
        var tokens = prompt.ToList();
        for (int i = 0; i < newTokens; i++)
        {
            using var scope = torch.NewDisposeScope();
            using var no = torch.no_grad();
            var ids = torch.tensor(tokens.ToArray(), dtype: ScalarType.Int64).unsqueeze(0);
            var logits = model.Logits(ids);
            tokens.Add(logits[0, -1].argmax().item<long>());
        }
        return tokens.Skip(prompt.Length).ToArray();
    }

    public void Dispose() => _tensors.Dispose();
}

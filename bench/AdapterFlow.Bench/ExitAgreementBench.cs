using System.Globalization;
using System.Text;
using AdapterFlow.Generation;
using AdapterFlow.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Bench;

/// <summary>
/// The `exitagreement` suite: on fixed text (teacher-forced, the same tokens for every model), how often each early
/// exit's next-token argmax (the exit's hidden state through the final norm and head) equals the last layer's. That is
/// what a greedy self-speculative draft from that exit needs, measured independently of the text each model would
/// write itself (a model that writes the same few tokens over and over gets high acceptance from any exit).
/// </summary>
public static class ExitAgreementBench
{
    public static string Table(IReadOnlyList<string> modelDirs, string machine, string textsFile, int maxTexts)
    {
        var texts = SpeculativeSweep.ReadPrompts(textsFile, maxTexts);
        var rows = new List<(string Name, int Layers, long Positions, double[] Agreement)>();
        foreach (var dir in modelDirs)
        {
            using var textModel = TextModel.Load(dir);
            var model = textModel.Model;
            int layers = model.NumLayers;
            var agreed = new long[layers];
            long positions = 0;
            using var noGrad = torch.no_grad();
            foreach (var text in texts)
            {
                using var scope = torch.NewDisposeScope();
                var ids = textModel.Tokenizer.Encode(text, addSpecialTokens: true).Select(i => (long)i).Take(512).ToArray();
                var output = model.forward(new ForwardInput { InputIds = torch.tensor(ids, [1, ids.Length], ScalarType.Int64), OutputHiddenStates = true });
                var last = output.Logits.argmax(-1);
                for (int e = 1; e < layers; e++)
                    agreed[e] += model.HeadLogits(output.HiddenStates![e]).argmax(-1).eq(last).sum().item<long>();
                positions += ids.Length;
            }
            rows.Add((Path.GetFileName(Path.GetFullPath(dir).TrimEnd(Path.DirectorySeparatorChar)), layers, positions,
                agreed.Select(a => (double)a / positions).ToArray()));
            Console.WriteLine($"  {rows[^1].Name}: " + string.Join(", ", Enumerable.Range(1, layers - 1).Select(e => $"E={e} {100 * rows[^1].Agreement[e]:F0}%")));
        }
        int maxLayers = rows.Max(r => r.Layers);
        var table = new StringBuilder();
        table.AppendLine(machine);
        table.AppendLine();
        table.AppendLine(string.Create(CultureInfo.InvariantCulture,
            $"Teacher-forced on {texts.Count} texts from `{Path.GetFileName(textsFile)}` (each up to 512 tokens): share of positions where the argmax of exit E (the first E layers through the final norm and head) equals the last layer's argmax."));
        table.AppendLine();
        table.AppendLine("| model | positions | " + string.Join(" | ", Enumerable.Range(1, maxLayers - 1).Select(e => $"E = {e}")) + " |");
        table.AppendLine("|---|---:|" + string.Concat(Enumerable.Range(1, maxLayers - 1).Select(_ => "---:|")));
        foreach (var (name, layers, positions, agreement) in rows)
            table.AppendLine($"| `{name}` | {positions} | " + string.Join(" | ", Enumerable.Range(1, maxLayers - 1).Select(e => e < layers ? $"{100 * agreement[e]:F0}%" : "")) + " |");
        return table.ToString();
    }
}

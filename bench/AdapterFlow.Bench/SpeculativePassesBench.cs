using System.Diagnostics;
using System.Globalization;
using System.Text;
using AdapterFlow.Generation;
using AdapterFlow.Models;
using AdapterFlow.Models.Cpu;
using TorchSharp;

namespace AdapterFlow.Bench;

/// <summary>
/// The `specpasses` suite: the kernel passes a greedy self-speculative round is made of, timed one by one on a model
/// folder (median of many repetitions over the same cache position), in milliseconds and as a fraction of a full
/// one-token step: the numbers behind the round's cost model.
/// </summary>
public static unsafe class SpeculativePassesBench
{
    public static string Table(string modelDir, string machine, string? draftVocabulary, bool packed = true, int repeats = 40)
    {
        using var textModel = TextModel.Load(modelDir);
        if (textModel.Model is not LlamaForCausalLM model) throw new ArgumentException("the specpasses suite needs a LLaMA-family model");
        using var noGrad = torch.no_grad();
        int layers = model.NumLayers, hidden = model.LlamaConfig.HiddenSize, vocab = model.LlamaConfig.VocabSize;
        var cache = model.CreateCache();
        if (!LlamaCpuDecoder.CanRunHostPasses(model, cache)) throw new ArgumentException("the CPU decode kernels cannot run this model");
        using var draft = draftVocabulary is null ? null : new PackedDraftHead(new DraftTokenSet(DraftVocabulary.Load(draftVocabulary), vocab), model.PlainHead()!.Value.Weight);
        var prompt = textModel.Tokenizer.Encode(SpeculativeSweep.DefaultPrompts[0], addSpecialTokens: true).Select(i => (long)i).Take(LlamaCpuDecoder.MaxTokensPerPass).ToArray();
        foreach (long id in prompt) draft?.Add(id);
        // Verification reads the panel copy of layers 1..L−1 and the head, as the decoding loop does (unless turned off).
        var panels = packed ? LlamaCpuDecoder.PackForVerification(model, 1) : null;
        var plan = new HostPlan(); // as a generation's passes share one
        var states = new float[8 * hidden];
        var logits = new float[8 * (long)vocab];
        int past = prompt.Length;
        fixed (float* s = states, l = logits)
        {
            float* sp = s, lp = l;
            LlamaCpuDecoder.HostPass(model, cache, 0, layers, prompt.Length, prompt, null, 0, null, 0, null, plan: plan);
            double Time(int start, int end, int time, int headRows, bool subset)
            {
                var samples = new double[repeats];
                for (int r = -3; r < repeats; r++)
                {
                    var clock = Stopwatch.StartNew();
                    if (start == 0)
                        LlamaCpuDecoder.HostPass(model, cache, 0, end, time, Enumerable.Repeat(prompt[^1], time).ToArray(), null, past, sp, headRows, lp,
                            subset ? draft!.Rows : null, subset ? draft!.Count : 0, plan: plan);
                    else LlamaCpuDecoder.HostPass(model, cache, start, end, time, null, sp, past, null, headRows, lp, panels: panels, plan: plan);
                    if (r >= 0) samples[r] = clock.Elapsed.TotalMilliseconds;
                    cache.Truncate(past);
                }
                Array.Sort(samples);
                return samples[repeats / 2];
            }
            double step = Time(0, layers, 1, 1, false);
            var table = new StringBuilder();
            table.AppendLine(machine);
            table.AppendLine();
            table.AppendLine(string.Create(CultureInfo.InvariantCulture,
                $"Model: `{Path.GetFileName(Path.GetFullPath(modelDir).TrimEnd(Path.DirectorySeparatorChar))}` ({layers} layers, {model.ParameterCount() / 1e6:F1}M parameters, vocabulary {vocab}); kernel passes through `LlamaCpuDecoder.HostPass` after a {past}-token prompt, median of {repeats} (cache cut back after each). Full one-token step (all layers + head): {step:F2} ms. 512-bit kernels for several tokens: {(System.Runtime.Intrinsics.Vector512.IsHardwareAccelerated ? "yes" : "no (256-bit)")}.") +
                (draft is null ? "" : $" Draft head over {draft.Count} tokens (`{Path.GetFileName(draftVocabulary)}` + the prompt's).") +
                (panels is null ? " Verification over the row-major weights." : " Verification over the panel copy of the weights."));
            table.AppendLine();
            table.AppendLine("| pass | ms | of a full step |");
            table.AppendLine("|---|---:|---:|");
            void Row(string name, double ms) => table.AppendLine(string.Create(CultureInfo.InvariantCulture, $"| {name} | {ms:F2} | {ms / step:F3} |"));
            Row($"full step: layers 0..{layers - 1} + head, 1 token", step);
            Row($"layers 0..{layers - 1}, no head", Time(0, layers, 1, 0, false));
            foreach (int e in new[] { 1, 2, 3, 4, 6 }.Where(e => e < layers))
            {
                Row($"draft E = {e}: layers 0..{e - 1} + full head", Time(0, e, 1, 1, false));
                if (draft is not null) Row($"draft E = {e}: layers 0..{e - 1} + draft head", Time(0, e, 1, 1, true));
                Row($"draft E = {e}: layers 0..{e - 1}, no head", Time(0, e, 1, 0, false));
                foreach (int t in new[] { 3, 5, 7 })
                    Row($"verify E = {e}: layers {e}..{layers - 1} + head over {t} tokens", Time(e, layers, t, t, false));
            }
            return table.ToString();
        }
    }
}

using AdapterFlow.Adapters;
using AdapterFlow.Models;
using AdapterFlow.Models.Cpu;
using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Generation;

/// <summary>
/// Greedy one-row decoding on the CPU decode kernels with the tokens kept on the host: each pass goes straight to
/// <see cref="LlamaCpuDecoder.HostPass"/> (no tensors in or out) and the argmax is read from the logits' memory, so a
/// token costs the kernels' work plus a handful of libtorch calls to record it, instead of ~15. Same tokens as the
/// tensor path: the same kernel passes over the same cache and the same argmax (the first maximum, as torch.argmax).
/// Used only where nothing needs the tensors: greedy, one row without padding, no logits processors, a LLaMA-family
/// model that the kernels can run, itself or inside an adapter wrapper (<see cref="DecodingModel"/>).
/// </summary>
internal static class HostGreedy
{
    /// <summary>The model when <paramref name="session"/> can decode on the host with passes of up to <paramref name="columns"/> tokens, else null.</summary>
    public static LlamaForCausalLM? Model(DecodingSession session, int columns = 1)
    {
        if (session.Options.DoSample || session.BatchSize != 1 || session.HasPadding || session.Device.type != DeviceType.CPU) return null;
        if (session.Selector is not GreedySelector || session.Processors is not LogitsProcessorList { Processors.Count: 0 }) return null;
        if (DecodingModel(session) is not { } model || columns > LlamaCpuDecoder.MaxTokensPerPass) return null;
        return LlamaCpuDecoder.CanRunHostPasses(model, session.Cache) ? model : null;
    }

    /// <summary>
    /// The LLaMA-family model a one-row decode step of this session runs: the session's model, or the one an adapter
    /// wrapper's decode steps are (<see cref="PeftModel.DecodeStepModel"/>; its adapters run inside the kernels or
    /// through libtorch per slot). Null for anything else.
    /// </summary>
    public static LlamaForCausalLM? DecodingModel(DecodingSession session) => session.Model switch
    {
        LlamaForCausalLM model => model,
        PeftModel { DecodeStepModel: LlamaForCausalLM model } => model,
        _ => null,
    };

    /// <summary>The largest softmax probability of <paramref name="count"/> logits: 1 / Σ exp(l − max).</summary>
    public static unsafe double MaxProbability(float* logits, int count)
    {
        float max = logits[0];
        for (int i = 1; i < count; i++) max = Math.Max(max, logits[i]);
        double sum = 0;
        for (int i = 0; i < count; i++) sum += Math.Exp(logits[i] - max);
        return 1 / sum;
    }

    /// <summary>Index of the first maximum, as torch.argmax.</summary>
    public static unsafe long ArgMax(float* values, int count)
    {
        int best = 0;
        float max = values[0];
        for (int i = 1; i < count; i++)
            if (values[i] > max) (max, best) = (values[i], i);
        return best;
    }
}

/// <summary>
/// Autoregressive (and early-exit) greedy steps on the host (<see cref="HostGreedy"/>): one kernel pass through the
/// first <c>layers</c> layers and the head per token.
/// </summary>
internal sealed class HostGreedySteps
{
    private readonly LlamaForCausalLM _model;
    private readonly float[] _logits;
    private readonly HostPlan _plan = new(); // this generation's
    private long _last, _position;

    private HostGreedySteps(LlamaForCausalLM model, DecodingSession session)
    {
        _model = model;
        _logits = new float[model.LlamaConfig.VocabSize];
        (_last, _position) = session.LastChosen(0);
    }

    /// <summary>Host steps for this session (after its prefill), or null when it must take the tensor path.</summary>
    public static HostGreedySteps? For(DecodingSession session) =>
        HostGreedy.Model(session) is { } model ? new HostGreedySteps(model, session) : null;

    public unsafe IReadOnlyList<GeneratedToken> Step(DecodingSession session, int layers)
    {
        session.BeginStep();
        long next;
        fixed (float* logits = _logits)
        {
            LlamaCpuDecoder.HostPass(_model, session.Cache, 0, layers, 1, [_last], null, _position, null, 1, logits, plan: _plan);
            next = HostGreedy.ArgMax(logits, _logits.Length);
        }
        long[] chosen = [next];
        using var token = torch.tensor(chosen, [1, 1], ScalarType.Int64, session.Device);
        var events = session.AcceptColumns(token, chosen, 1, 1);
        (_last, _position) = (next, _position + 1);
        return events;
    }
}

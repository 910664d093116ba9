using TorchSharp;
using static TorchSharp.torch;

namespace AdapterFlow.Generation;

/// <summary>Chooses the next token of every row from processed scores [batch, vocab]; returns int64 [batch] on the same device.</summary>
public interface ITokenSelector : IDisposable
{
    Tensor Select(Tensor scores);
}

/// <summary>The most likely token (ties go to the lowest id, as torch.argmax does).</summary>
public sealed class GreedySelector : ITokenSelector
{
    public Tensor Select(Tensor scores) => scores.argmax(-1);

    public void Dispose() { }
}

/// <summary>
/// Draws from softmax(scores) with torch.multinomial. With a seed the draws come from a private generator on
/// the scores' device, so the same seed gives the same tokens whatever else uses torch's global generator.
/// </summary>
public sealed class SamplingSelector : ITokenSelector
{
    private readonly long? _seed;
    private torch.Generator? _generator;

    public SamplingSelector(long? seed) => _seed = seed;

    public Tensor Select(Tensor scores)
    {
        var probs = scores.to_type(ScalarType.Float32).softmax(-1);
        return torch.multinomial(probs, 1, generator: GeneratorOn(scores.device)).squeeze(-1);
    }

    /// <summary>
    /// The generator every draw of this generation uses (strategies that draw more, like self-speculative decoding,
    /// share it so a seed fixes the whole output): created from the seed on first use, or null without a seed
    /// (torch's global generator).
    /// </summary>
    public torch.Generator? GeneratorOn(Device device)
    {
        if (_seed is long seed && _generator is null)
            _generator = new torch.Generator(unchecked((ulong)seed), device);
        return _generator;
    }

    public void Dispose()
    {
        _generator?.Dispose();
        _generator = null;
    }
}

public static class TokenSelectors
{
    /// <summary>The selector <paramref name="options"/> ask for: sampling when <see cref="GenerationOptions.DoSample"/>, else greedy.</summary>
    public static ITokenSelector For(GenerationOptions options) =>
        options.DoSample ? new SamplingSelector(options.Seed) : new GreedySelector();
}

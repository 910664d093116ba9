using AdapterFlow.IO;
using AdapterFlow.Models;

namespace AdapterFlow.Generation;

/// <summary>
/// Generates text with any <see cref="CausalLM"/>: batches of prompts of different lengths (left padding),
/// greedy, sampling (temperature, top-k, top-p, min-p, seed), repetition penalty, beam search, early-exit and
/// self-speculative decoding (LayerSkip), stop tokens and stop strings, and token-by-token streaming.
/// <code>
/// var generator = new TextGenerator(model, tokenizer);
/// string text = generator.GenerateText("Once upon a time", new GenerationOptions { MaxNewTokens = 50 });
/// await foreach (var token in generator.StreamAsync("Once upon a time")) Console.Write(token.Text);
/// </code>
/// </summary>
public sealed class TextGenerator
{
    public TextGenerator(CausalLM model, ITokenizer? tokenizer = null, GenerationOptions? defaults = null)
    {
        Model = model ?? throw new ArgumentNullException(nameof(model));
        Tokenizer = tokenizer;
        Defaults = defaults ?? new GenerationOptions();
    }

    public CausalLM Model { get; }
    public ITokenizer? Tokenizer { get; }

    /// <summary>Options used when a call passes none.</summary>
    public GenerationOptions Defaults { get; }

    /// <summary>
    /// Decoding strategy to use; null follows <see cref="GenerationOptions.Strategy"/> (beam search when NumBeams &gt; 1,
    /// else autoregressive, early-exit or self-speculative decoding).
    /// </summary>
    public IDecodingStrategy? Strategy { get; init; }

    /// <summary>Continues every prompt (token ids, without padding); returns one sequence per prompt.</summary>
    /// <param name="prompts">Token ids of each prompt (BOS included if the model expects one).</param>
    /// <param name="options">Null uses <see cref="Defaults"/>.</param>
    /// <param name="cancellationToken">Checked between steps.</param>
    public GenerationResult Generate(IReadOnlyList<IReadOnlyList<int>> prompts, GenerationOptions? options = null,
        CancellationToken cancellationToken = default)
    {
        options ??= Defaults;
        using var session = new DecodingSession(Model, Expand(prompts, options), options, Tokenizer, RowsPerPrompt(options));
        foreach (var _ in StrategyFor(options).Run(session)) cancellationToken.ThrowIfCancellationRequested();
        return session.Result();
    }

    /// <summary>Continues one prompt given as token ids.</summary>
    public GeneratedSequence Generate(IReadOnlyList<int> prompt, GenerationOptions? options = null) =>
        Generate([prompt], options).Sequences[0];

    /// <summary>Continues texts (encoded with the tokenizer's special tokens, e.g. BOS, as transformers' tokenizer() does).</summary>
    public GenerationResult Generate(IReadOnlyList<string> prompts, GenerationOptions? options = null, bool addSpecialTokens = true) =>
        Generate(Encode(prompts, addSpecialTokens), options);

    /// <summary>The continuation of one text (without the prompt).</summary>
    public string GenerateText(string prompt, GenerationOptions? options = null, bool addSpecialTokens = true) =>
        Generate([prompt], options, addSpecialTokens).Sequences[0].Text!;

    /// <summary>
    /// Streams new tokens as they are chosen (with their text when a tokenizer is given). After the enumeration
    /// ends, <see cref="GenerationStream.Result"/> holds the same result <see cref="Generate(IReadOnlyList{IReadOnlyList{int}}, GenerationOptions?, CancellationToken)"/> returns.
    /// </summary>
    public GenerationStream StreamAsync(IReadOnlyList<IReadOnlyList<int>> prompts, GenerationOptions? options = null)
    {
        options ??= Defaults;
        var chosen = options;
        return new GenerationStream(() => new DecodingSession(Model, Expand(prompts, chosen), chosen, Tokenizer, RowsPerPrompt(chosen)), StrategyFor(options));
    }

    /// <summary>Streams the continuation of one text.</summary>
    public GenerationStream StreamAsync(string prompt, GenerationOptions? options = null, bool addSpecialTokens = true) =>
        StreamAsync(Encode([prompt], addSpecialTokens), options);

    private IReadOnlyList<IReadOnlyList<int>> Encode(IReadOnlyList<string> prompts, bool addSpecialTokens)
    {
        if (Tokenizer is null) throw new InvalidOperationException("text prompts need a tokenizer (pass one to the TextGenerator)");
        return prompts.Select(p => Tokenizer.Encode(p, addSpecialTokens)).ToArray();
    }

    /// <summary>Each prompt repeated NumReturnSequences times (one batch row per returned sequence).</summary>
    private static IReadOnlyList<IReadOnlyList<int>> Expand(IReadOnlyList<IReadOnlyList<int>> prompts, GenerationOptions options) =>
        options.NumReturnSequences == 1 || prompts is null ? prompts! : prompts.SelectMany(p => Enumerable.Repeat(p, options.NumReturnSequences)).ToArray();

    private static int RowsPerPrompt(GenerationOptions options) => options.NumBeams;

    private IDecodingStrategy StrategyFor(GenerationOptions options) => Strategy ?? options.Strategy switch
    {
        DecodingStrategyKind.EarlyExit => EarlyExitDecoding.Instance,
        DecodingStrategyKind.SelfSpeculative => SelfSpeculativeDecoding.Instance,
        _ => options.NumBeams > 1 ? BeamSearchDecoding.Instance : AutoregressiveDecoding.Instance,
    };
}

/// <summary>A token stream; <see cref="Result"/> is set once it has been enumerated to the end.</summary>
public sealed class GenerationStream : IAsyncEnumerable<GeneratedToken>
{
    private readonly Func<DecodingSession> _start;
    private readonly IDecodingStrategy _strategy;

    internal GenerationStream(Func<DecodingSession> start, IDecodingStrategy strategy)
    {
        _start = start;
        _strategy = strategy;
    }

    /// <summary>The full result (tokens, text, finish reasons, stats) after the enumeration completed; null before.</summary>
    public GenerationResult? Result { get; private set; }

    public IAsyncEnumerator<GeneratedToken> GetAsyncEnumerator(CancellationToken cancellationToken = default) =>
        new Enumerator(this, cancellationToken);

    // The work is compute-bound and runs synchronously inside MoveNextAsync, one model step at a time; each step
    // keeps its dispose scope and no_grad on the calling thread, so consumers may resume on any thread.
    private sealed class Enumerator : IAsyncEnumerator<GeneratedToken>
    {
        private readonly GenerationStream _owner;
        private readonly CancellationToken _cancellation;
        private DecodingSession? _session;
        private IEnumerator<IReadOnlyList<GeneratedToken>>? _steps;
        private IReadOnlyList<GeneratedToken> _pending = [];
        private int _next;

        public Enumerator(GenerationStream owner, CancellationToken cancellation)
        {
            _owner = owner;
            _cancellation = cancellation;
        }

        public GeneratedToken Current { get; private set; }

        public ValueTask<bool> MoveNextAsync()
        {
            try
            {
                while (_next >= _pending.Count)
                {
                    _cancellation.ThrowIfCancellationRequested();
                    if (_session is null)
                    {
                        _session = _owner._start();
                        _steps = _owner._strategy.Run(_session).GetEnumerator();
                    }
                    if (_steps is null || !_steps.MoveNext())
                    {
                        if (_session is not null && _steps is not null) _owner.Result = _session.Result();
                        Release();
                        return ValueTask.FromResult(false);
                    }
                    _pending = _steps.Current;
                    _next = 0;
                }
                Current = _pending[_next++];
                return ValueTask.FromResult(true);
            }
            catch (Exception e)
            {
                Release();
                return ValueTask.FromException<bool>(e);
            }
        }

        private void Release()
        {
            _steps?.Dispose();
            _steps = null;
            _session?.Dispose();
        }

        public ValueTask DisposeAsync()
        {
            Release();
            return ValueTask.CompletedTask;
        }
    }
}

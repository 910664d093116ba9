namespace AdapterFlow.Tests.Cli;

/// <summary>One tiny LLaMA made by `adapterflow init` for the command tests (made once: it takes a second or two).</summary>
public sealed class TinyModelFixture : IDisposable
{
    private readonly TempDir _tmp = new();

    public TinyModelFixture()
    {
        ModelDir = _tmp.File("tiny-llama");
        InitRun = CliRunner.Run("init", "--arch", "llama", "--preset", "tiny", "--out", ModelDir, "--seed", "7");
    }

    public string ModelDir { get; }
    public CliRun InitRun { get; }
    public string Scratch(string name) => _tmp.File(name);

    public void Dispose() => _tmp.Dispose();
}

// Not run in parallel with other tests: `train` seeds and draws from torch's global generator (dropout), which
// tests running at the same time would also draw from, making "same seed, same losses" checks flaky.
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class TinyModelCollection : ICollectionFixture<TinyModelFixture>
{
    public const string Name = "CLI tiny model";
}

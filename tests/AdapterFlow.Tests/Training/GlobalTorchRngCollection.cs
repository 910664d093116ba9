namespace AdapterFlow.Tests.Training;

/// <summary>
/// Tests that train with dropout and compare losses across runs: the trainer seeds torch's global generator, which
/// tests running in parallel would also draw from, so these run alone.
/// </summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class GlobalTorchRngCollection
{
    public const string Name = "global torch RNG";
}

namespace AdapterFlow.Tests.Models;

/// <summary>
/// Tests that change the CPU kernels' process-wide settings (<c>CpuKernels.Threads</c>, <c>KernelPool.UseParallelFor</c>)
/// run alone: a test decoding through the kernels at the same time would otherwise run under another test's settings.
/// </summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class KernelSettingsCollection
{
    public const string Name = "process-wide CPU kernel settings";
}

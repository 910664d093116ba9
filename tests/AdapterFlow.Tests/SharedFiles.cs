namespace AdapterFlow.Tests;

/// <summary>
/// Locates ../shared (beside the repository root) or $ADAPTERFLOW_SHARED. Tests that need it call
/// <see cref="Require"/>, which skips them with a clear message when it is absent.
/// </summary>
public static class SharedFiles
{
    private static readonly Lazy<string?> Root = new(Find);

    public static string? RootOrNull => Root.Value;

    /// <summary>The absolute path of a file or folder under shared/, or a skip when shared/ or that path is absent.</summary>
    public static string Require(params string[] parts)
    {
        var root = Root.Value;
        Skip.If(root is null, "../shared (the reference models, tokenizers and data) is not beside the repository; set ADAPTERFLOW_SHARED to run this test");
        var path = Path.Combine([root!, .. parts]);
        Skip.If(!File.Exists(path) && !Directory.Exists(path), $"shared file {Path.Combine(parts)} is absent");
        return path;
    }

    private static string? Find()
    {
        var env = Environment.GetEnvironmentVariable("ADAPTERFLOW_SHARED");
        if (!string.IsNullOrEmpty(env) && Directory.Exists(env)) return Path.GetFullPath(env);
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "AdapterFlow.sln")))
            {
                var shared = Path.Combine(dir.FullName, "..", "shared");
                return Directory.Exists(shared) ? Path.GetFullPath(shared) : null;
            }
        }
        return null;
    }
}

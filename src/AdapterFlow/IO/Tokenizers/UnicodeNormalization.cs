using System.Runtime.InteropServices;
using System.Text;

namespace AdapterFlow.IO.Tokenizers;

/// <summary>
/// NFC/NFD/NFKC/NFKD that also work when .NET runs with InvariantGlobalization (as this repository builds):
/// string.Normalize then leaves non-ASCII text unchanged, so ICU's unorm2 API is called directly — the same
/// library .NET itself uses for normalization when globalization is on.
/// </summary>
internal static unsafe class UnicodeNormalization
{
    private static readonly bool RuntimeNormalizes = "e\u0301".Normalize(NormalizationForm.FormC) == "\u00E9";

    public static string Normalize(string text, NormalizationForm form)
    {
        if (Ascii.IsValid(text)) return text;   // ASCII is already in every normalization form
        if (RuntimeNormalizes) return text.IsNormalized(form) ? text : text.Normalize(form);
        return Icu.Normalize(text, form);
    }

    private static class Icu
    {
        private static readonly nint[] Instances = new nint[4];
        private static readonly delegate* unmanaged<nint, char*, int, char*, int, int*, int> NormalizeFunction;
        private static readonly string? LoadError;

        static Icu()
        {
            foreach (var (library, version) in Candidates())
            {
                if (!NativeLibrary.TryLoad(library, out var handle)) continue;
                foreach (var suffix in Suffixes(version))
                {
                    if (!NativeLibrary.TryGetExport(handle, "unorm2_normalize" + suffix, out var normalize)) continue;
                    string[] getters = ["unorm2_getNFCInstance", "unorm2_getNFDInstance", "unorm2_getNFKCInstance", "unorm2_getNFKDInstance"];
                    var ok = true;
                    for (var i = 0; i < 4 && ok; i++)
                    {
                        ok = NativeLibrary.TryGetExport(handle, getters[i] + suffix, out var getter);
                        if (!ok) break;
                        var error = 0;
                        Instances[i] = ((delegate* unmanaged<int*, nint>)getter)(&error);
                        ok = error <= 0 && Instances[i] != 0;
                    }
                    if (!ok) continue;
                    NormalizeFunction = (delegate* unmanaged<nint, char*, int, char*, int, int*, int>)normalize;
                    return;
                }
            }
            LoadError = "Unicode normalization (NFC/NFD/NFKC/NFKD) needs ICU (libicuuc) when .NET runs with InvariantGlobalization; install libicu";
        }

        private static IEnumerable<(string Library, int? Version)> Candidates()
        {
            if (OperatingSystem.IsWindows()) return [("icuuc.dll", null), ("icu.dll", null)];
            if (OperatingSystem.IsMacOS()) return [("libicucore.dylib", null), ("/usr/lib/libicucore.dylib", null)];
            return Enumerable.Range(50, 51).Reverse().Select(v => ($"libicuuc.so.{v}", (int?)v)).Append(("libicuuc.so", null));
        }

        private static IEnumerable<string> Suffixes(int? version) =>
            version is { } v ? [$"_{v}", ""] : new[] { "" }.Concat(Enumerable.Range(50, 51).Reverse().Select(x => $"_{x}"));

        private static int Index(NormalizationForm form) => form switch
        {
            NormalizationForm.FormC => 0,
            NormalizationForm.FormD => 1,
            NormalizationForm.FormKC => 2,
            _ => 3,
        };

        public static string Normalize(string text, NormalizationForm form)
        {
            if (NormalizeFunction == null) throw new PlatformNotSupportedException(LoadError);
            var capacity = text.Length * 3 + 16;
            while (true)
            {
                var buffer = new char[capacity];
                var error = 0;
                int length;
                fixed (char* src = text)
                fixed (char* dst = buffer)
                    length = NormalizeFunction(Instances[Index(form)], src, text.Length, dst, capacity, &error);
                if (error == 15 /* U_BUFFER_OVERFLOW_ERROR */) { capacity = length + 1; continue; }
                if (error > 0) throw new InvalidOperationException($"ICU unorm2_normalize failed with error {error}");
                return new string(buffer, 0, length);
            }
        }
    }
}

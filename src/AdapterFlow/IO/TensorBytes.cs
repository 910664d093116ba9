using static TorchSharp.torch;

namespace AdapterFlow.IO;

/// <summary>
/// Copies raw bytes between native memory (memory-mapped files) and CPU tensors. TorchSharp exposes a tensor's
/// memory only as an int-sized Span, so large tensors are handled in chunks of a flat view.
/// </summary>
internal static class TensorBytes
{
    private const long ChunkBytes = 1L << 30;

    /// <summary>Fills the contiguous CPU tensor <paramref name="destination"/> from <paramref name="source"/>.</summary>
    public static unsafe void CopyInto(byte* source, long length, Tensor destination)
    {
        if (length != destination.NumberOfElements * destination.ElementSize)
            throw new InvalidOperationException($"byte count {length} does not match the tensor");
        if (length == 0) return;
        if (length <= ChunkBytes)
        {
            new ReadOnlySpan<byte>(source, (int)length).CopyTo(destination.bytes);
            return;
        }
        using var flat = destination.view(-1);
        long chunkElements = ChunkBytes / destination.ElementSize;
        for (long start = 0; start < flat.shape[0]; start += chunkElements)
        {
            long count = Math.Min(chunkElements, flat.shape[0] - start);
            using var piece = flat.narrow(0, start, count);
            new ReadOnlySpan<byte>(source + start * destination.ElementSize, (int)(count * destination.ElementSize)).CopyTo(piece.bytes);
        }
    }

    /// <summary>Writes the bytes of a contiguous CPU tensor to a stream.</summary>
    public static void WriteTo(Stream stream, Tensor tensor)
    {
        long length = tensor.NumberOfElements * tensor.ElementSize;
        if (length == 0) return;
        if (length <= ChunkBytes)
        {
            stream.Write(tensor.bytes);
            return;
        }
        using var flat = tensor.view(-1);
        long chunkElements = ChunkBytes / tensor.ElementSize;
        for (long start = 0; start < flat.shape[0]; start += chunkElements)
        {
            using var piece = flat.narrow(0, start, Math.Min(chunkElements, flat.shape[0] - start));
            stream.Write(piece.bytes);
        }
    }
}

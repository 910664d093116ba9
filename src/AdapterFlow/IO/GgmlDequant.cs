namespace AdapterFlow.IO;

/// <summary>
/// Dequantisation of ggml block formats to float32, following the block layouts of ggml's reference
/// (ggml-common.h / ggml-quants.c). Written by hand because no .NET library reads them; plain loops over the
/// bytes are fast enough for a one-time load (K-quants need per-sub-block scale unpacking that tensor ops
/// would not make simpler).
/// </summary>
internal static class GgmlDequant
{
    private static float Half(ReadOnlySpan<byte> b, int at) => (float)BitConverter.ToHalf(b.Slice(at, 2));

    /// <summary>Dequantises <paramref name="elements"/> values stored as <paramref name="type"/>; null when the type is not handled here.</summary>
    public static float[]? Dequantize(GgmlType type, ReadOnlySpan<byte> data, long elements)
    {
        var (block, bytes) = GgufFile.BlockLayout(type);
        long blocks = elements / block;
        var y = new float[elements];
        switch (type)
        {
            case GgmlType.Q4_1:
                for (long i = 0; i < blocks; i++) Q4_1(data.Slice((int)(i * bytes), bytes), y.AsSpan((int)(i * block), block));
                return y;
            case GgmlType.Q5_0:
            case GgmlType.Q5_1:
                for (long i = 0; i < blocks; i++) Q5(type == GgmlType.Q5_1, data.Slice((int)(i * bytes), bytes), y.AsSpan((int)(i * block), block));
                return y;
            case GgmlType.Q4_K:
                for (long i = 0; i < blocks; i++) Q4_K(data.Slice((int)(i * bytes), bytes), y.AsSpan((int)(i * block), block));
                return y;
            case GgmlType.Q5_K:
                for (long i = 0; i < blocks; i++) Q5_K(data.Slice((int)(i * bytes), bytes), y.AsSpan((int)(i * block), block));
                return y;
            case GgmlType.Q6_K:
                for (long i = 0; i < blocks; i++) Q6_K(data.Slice((int)(i * bytes), bytes), y.AsSpan((int)(i * block), block));
                return y;
            default:
                return null;
        }
    }

    /// <summary>Q4_1: f16 d, f16 m, 16 bytes of nibbles (low = elements 0..15, high = 16..31); x = d·q + m.</summary>
    private static void Q4_1(ReadOnlySpan<byte> b, Span<float> y)
    {
        float d = Half(b, 0), m = Half(b, 2);
        var qs = b.Slice(4, 16);
        for (int j = 0; j < 16; j++)
        {
            y[j] = d * (qs[j] & 0x0F) + m;
            y[j + 16] = d * (qs[j] >> 4) + m;
        }
    }

    /// <summary>Q5_0 (f16 d, u32 high bits, 16 nibble bytes; x = d·(q − 16)) and Q5_1 (f16 d, f16 m, ...; x = d·q + m).</summary>
    private static void Q5(bool withMin, ReadOnlySpan<byte> b, Span<float> y)
    {
        float d = Half(b, 0), m = withMin ? Half(b, 2) : 0f;
        int at = withMin ? 4 : 2;
        uint qh = BitConverter.ToUInt32(b.Slice(at, 4));
        var qs = b.Slice(at + 4, 16);
        int offset = withMin ? 0 : 16;
        for (int j = 0; j < 16; j++)
        {
            int high0 = (int)((qh >> j) & 1) << 4;
            int high1 = (int)((qh >> (j + 16)) & 1) << 4;
            y[j] = d * (((qs[j] & 0x0F) | high0) - offset) + m;
            y[j + 16] = d * (((qs[j] >> 4) | high1) - offset) + m;
        }
    }

    /// <summary>The 6-bit scale and min of sub-block <paramref name="j"/> (0..7) packed in the 12 scale bytes of Q4_K/Q5_K.</summary>
    private static (int Scale, int Min) ScaleMin(ReadOnlySpan<byte> scales, int j) =>
        j < 4
            ? (scales[j] & 63, scales[j + 4] & 63)
            : ((scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4));

    /// <summary>Q4_K: 256 values in 8 sub-blocks of 32; f16 d, f16 dmin, 12 scale bytes, 128 nibble bytes; x = d·sc·q − dmin·m.</summary>
    private static void Q4_K(ReadOnlySpan<byte> b, Span<float> y)
    {
        float d = Half(b, 0), dmin = Half(b, 2);
        var scales = b.Slice(4, 12);
        var qs = b.Slice(16, 128);
        for (int chunk = 0; chunk < 4; chunk++) // each 64 values: 32 low nibbles, then 32 high nibbles of the same bytes
        {
            var (sc0, m0) = ScaleMin(scales, 2 * chunk);
            var (sc1, m1) = ScaleMin(scales, 2 * chunk + 1);
            var q = qs.Slice(32 * chunk, 32);
            var o = y.Slice(64 * chunk, 64);
            for (int l = 0; l < 32; l++)
            {
                o[l] = d * sc0 * (q[l] & 0x0F) - dmin * m0;
                o[l + 32] = d * sc1 * (q[l] >> 4) - dmin * m1;
            }
        }
    }

    /// <summary>Q5_K: as Q4_K plus 32 bytes of fifth bits (qh) before the nibbles.</summary>
    private static void Q5_K(ReadOnlySpan<byte> b, Span<float> y)
    {
        float d = Half(b, 0), dmin = Half(b, 2);
        var scales = b.Slice(4, 12);
        var qh = b.Slice(16, 32);
        var qs = b.Slice(48, 128);
        for (int chunk = 0; chunk < 4; chunk++)
        {
            var (sc0, m0) = ScaleMin(scales, 2 * chunk);
            var (sc1, m1) = ScaleMin(scales, 2 * chunk + 1);
            var q = qs.Slice(32 * chunk, 32);
            var o = y.Slice(64 * chunk, 64);
            int bit0 = 1 << (2 * chunk), bit1 = 1 << (2 * chunk + 1);
            for (int l = 0; l < 32; l++)
            {
                o[l] = d * sc0 * ((q[l] & 0x0F) + ((qh[l] & bit0) != 0 ? 16 : 0)) - dmin * m0;
                o[l + 32] = d * sc1 * ((q[l] >> 4) + ((qh[l] & bit1) != 0 ? 16 : 0)) - dmin * m1;
            }
        }
    }

    /// <summary>Q6_K: 128 bytes low nibbles, 64 bytes of 2-bit highs, 16 int8 scales (one per 16 values), f16 d; x = d·sc·(q − 32).</summary>
    private static void Q6_K(ReadOnlySpan<byte> b, Span<float> y)
    {
        var ql = b.Slice(0, 128);
        var qh = b.Slice(128, 64);
        var sc = b.Slice(192, 16);
        float d = Half(b, 208);
        for (int half = 0; half < 2; half++) // each 128 values
        {
            var l4 = ql.Slice(64 * half, 64);
            var h2 = qh.Slice(32 * half, 32);
            var s = sc.Slice(8 * half, 8);
            var o = y.Slice(128 * half, 128);
            for (int l = 0; l < 32; l++)
            {
                int isc = l / 16;
                int q1 = ((l4[l] & 0x0F) | (((h2[l] >> 0) & 3) << 4)) - 32;
                int q2 = ((l4[l + 32] & 0x0F) | (((h2[l] >> 2) & 3) << 4)) - 32;
                int q3 = ((l4[l] >> 4) | (((h2[l] >> 4) & 3) << 4)) - 32;
                int q4 = ((l4[l + 32] >> 4) | (((h2[l] >> 6) & 3) << 4)) - 32;
                o[l] = d * (sbyte)s[isc] * q1;
                o[l + 32] = d * (sbyte)s[isc + 2] * q2;
                o[l + 64] = d * (sbyte)s[isc + 4] * q3;
                o[l + 96] = d * (sbyte)s[isc + 6] * q4;
            }
        }
    }
}

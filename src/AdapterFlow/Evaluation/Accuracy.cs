namespace AdapterFlow.Evaluation;

/// <summary>A proportion with its Wilson score interval.</summary>
public readonly record struct Accuracy(int Correct, int Total)
{
    /// <summary>z for a two-sided 95% interval.</summary>
    public const double Z95 = 1.959963984540054;

    /// <summary>Correct / total (0 for an empty set).</summary>
    public double Value => Total == 0 ? 0 : (double)Correct / Total;

    /// <summary>
    /// The 95% Wilson score interval. Chosen over the normal approximation because it stays inside [0, 1] and
    /// is meaningful at 0% or 100% accuracy and for small sets — both common here.
    /// </summary>
    public (double Low, double High) Interval95 => Wilson(Z95);

    /// <summary>The Wilson score interval for a given z.</summary>
    public (double Low, double High) Wilson(double z)
    {
        if (Total == 0) return (0, 1);
        double n = Total, p = Value, z2 = z * z;
        double denominator = 1 + z2 / n;
        double center = (p + z2 / (2 * n)) / denominator;
        double half = z / denominator * Math.Sqrt(p * (1 - p) / n + z2 / (4 * n * n));
        return (Math.Max(0, center - half), Math.Min(1, center + half));
    }
}

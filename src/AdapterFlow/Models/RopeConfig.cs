using System.Text.Json.Nodes;

namespace AdapterFlow.Models;

/// <summary>Rotary settings of a config.json: base, scaling and the share of each head that is rotated.</summary>
public sealed record RopeSettings(double Theta, RopeScaling? Scaling, double PartialRotaryFactor);

/// <summary>
/// Reads and writes rotary settings in both layouts: transformers 5 (<c>rope_parameters</c> with <c>rope_type</c>,
/// <c>rope_theta</c>, <c>partial_rotary_factor</c>, scaling factors) and 4.x (top-level <c>rope_theta</c> or a
/// family alias such as GPT-NeoX's <c>rotary_emb_base</c>, <c>rope_scaling</c>, <c>partial_rotary_factor</c> or
/// <c>rotary_pct</c>).
/// </summary>
public static class RopeConfig
{
    private static readonly string[] SupportedTypes = ["default", "linear", "dynamic", "llama3"];

    /// <param name="json">The config.json object.</param>
    /// <param name="path">File name for error messages.</param>
    /// <param name="defaults">Values for absent keys (transformers' defaults for the family).</param>
    /// <param name="thetaAliases">4.x top-level keys for the base, most preferred first (e.g. rope_theta, rotary_emb_base).</param>
    /// <param name="partialAliases">4.x top-level keys for the rotated share (e.g. partial_rotary_factor, rotary_pct).</param>
    public static RopeSettings Read(JsonObject json, string path, RopeSettings defaults, string[] thetaAliases, string[] partialAliases)
    {
        double theta = defaults.Theta;
        double partial = defaults.PartialRotaryFactor;
        foreach (var key in thetaAliases.Reverse())
            theta = ConfigJson.Double(json, path, key, theta);
        foreach (var key in partialAliases.Reverse())
            partial = ConfigJson.Double(json, path, key, partial);

        JsonObject? scaling = null;
        string scalingKey = "rope_scaling";
        if (json["rope_parameters"] is JsonObject parameters)
        {
            scaling = parameters;
            scalingKey = "rope_parameters";
            theta = ConfigJson.Double(parameters, path, "rope_theta", theta);
            partial = ConfigJson.Double(parameters, path, "partial_rotary_factor", partial);
        }
        else if (json["rope_scaling"] is JsonObject legacy)
            scaling = legacy;
        else if (json["rope_parameters"] is not null)
            throw new InvalidDataException($"{path}: 'rope_parameters' must be an object, got {json["rope_parameters"]!.ToJsonString()}");
        else if (json["rope_scaling"] is not null)
            throw new InvalidDataException($"{path}: 'rope_scaling' must be an object or null, got {json["rope_scaling"]!.ToJsonString()}");

        if (theta <= 0) throw new InvalidDataException($"{path}: rotary base (rope_theta) must be positive, got {theta}");
        if (partial <= 0 || partial > 1) throw new InvalidDataException($"{path}: partial_rotary_factor must be in (0, 1], got {partial}");

        RopeScaling? ropeScaling = defaults.Scaling;
        if (scaling is not null)
        {
            var type = ConfigJson.OptionalString(scaling, path, "rope_type") ?? ConfigJson.OptionalString(scaling, path, "type") ?? "default";
            if (!SupportedTypes.Contains(type))
                throw new InvalidDataException($"{path}: {scalingKey}.rope_type '{type}' is not supported (supported: {string.Join(", ", SupportedTypes)})");
            ropeScaling = type == "default"
                ? null
                : new RopeScaling(type,
                    ConfigJson.Double(scaling, path, "factor", 1.0),
                    ConfigJson.Double(scaling, path, "low_freq_factor", 1.0),
                    ConfigJson.Double(scaling, path, "high_freq_factor", 4.0),
                    ConfigJson.Int(scaling, path, "original_max_position_embeddings", 8192));
        }
        return new RopeSettings(theta, ropeScaling, partial);
    }

    /// <summary>
    /// Writes <c>rope_parameters</c> (transformers 5) and the 4.x keys given (so 4.x reads the same rotary
    /// settings instead of its defaults); <c>rope_scaling</c> only when there is scaling.
    /// </summary>
    public static void Write(JsonObject json, RopeSettings settings, string? legacyThetaKey, string? legacyPartialKey, bool writePartial)
    {
        var parameters = new JsonObject { ["rope_type"] = settings.Scaling?.Type ?? "default", ["rope_theta"] = settings.Theta };
        if (writePartial) parameters["partial_rotary_factor"] = settings.PartialRotaryFactor;
        JsonObject? legacyScaling = null;
        if (settings.Scaling is { } s)
        {
            legacyScaling = new JsonObject { ["type"] = s.Type, ["rope_type"] = s.Type, ["factor"] = s.Factor };
            parameters["factor"] = s.Factor;
            if (s.Type == "llama3")
            {
                foreach (var target in new[] { parameters, legacyScaling })
                {
                    target["low_freq_factor"] = s.LowFreqFactor;
                    target["high_freq_factor"] = s.HighFreqFactor;
                    target["original_max_position_embeddings"] = s.OriginalMaxPositionEmbeddings;
                }
            }
        }
        json["rope_parameters"] = parameters;
        json.Remove("rope_scaling");
        if (legacyScaling is not null) json["rope_scaling"] = legacyScaling;
        if (legacyThetaKey is not null) json[legacyThetaKey] = settings.Theta;
        if (legacyPartialKey is not null) json[legacyPartialKey] = settings.PartialRotaryFactor;
    }
}

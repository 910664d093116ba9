using System.Globalization;
using AdapterFlow.Adapters;
using AdapterFlow.Adapters.Bottleneck;
using AdapterFlow.Adapters.IA3;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.Adapters.PrefixTuning;
using AdapterFlow.Adapters.PromptTuning;
using YamlDotNet.Core;
using YamlDotNet.Serialization;

namespace AdapterFlow.Training;

/// <summary>
/// A training run's settings as a recipe file (YAML or JSON, snake_case keys) or command-line flags: every value
/// is optional so a file can be overlaid by flags (<see cref="OverlaidBy"/>). <see cref="ToTrainerOptions"/> and
/// <see cref="ToPeftConfig"/> turn it into the library's options; unset values take the library defaults.
/// </summary>
public sealed record TrainRecipe
{
    public static readonly IReadOnlyList<string> Methods = ["full", "lora", "ia3", "prefix", "prompt", "bottleneck"];

    /// <summary>What is learned: SFT on instruction or chat data, causal-LM (continued) pretraining on text, DPO on preference pairs.</summary>
    public static readonly IReadOnlyList<string> Objectives = ["sft", "pretrain", "dpo"];

    /// <summary>sft (default), pretrain or dpo.</summary>
    public string? Objective { get; init; }
    /// <summary>A built-in chat template name or a template file (<see cref="Data.ChatTemplate"/>).</summary>
    public string? ChatTemplate { get; init; }
    /// <summary>DPO's β (default 0.1).</summary>
    public double? Beta { get; init; }
    /// <summary>DPO's label smoothing ε (default 0).</summary>
    public double? LabelSmoothing { get; init; }
    /// <summary>Held-out data file (same shape as the training data).</summary>
    public string? EvalData { get; init; }
    /// <summary>Hold out this fraction of the training records (seeded) instead of an eval file.</summary>
    public double? EvalSplit { get; init; }
    /// <summary>Evaluate every N optimizer steps (default: 10 evaluations per run).</summary>
    public int? EvalEvery { get; init; }
    /// <summary>Continued pretraining: warm up again over N steps from <see cref="MinLearningRate"/> to the peak, then decay back to it.</summary>
    public int? RewarmSteps { get; init; }
    /// <summary>Where decay ends (and re-warming starts); with rewarm_steps the default is a tenth of the peak.</summary>
    public double? MinLearningRate { get; init; }
    /// <summary>"fail" (default): a bad data record stops the run; "skip": it is skipped and reported.</summary>
    public string? BadRecords { get; init; }

    public string? Method { get; init; }
    public int? Epochs { get; init; }
    public double? LearningRate { get; init; }
    public int? BatchSize { get; init; }
    public int? MicroBatchSize { get; init; }
    public int? CutoffLen { get; init; }
    public int? WarmupSteps { get; init; }
    public string? LrScheduler { get; init; }
    public int? LoraR { get; init; }
    public double? LoraAlpha { get; init; }
    public double? LoraDropout { get; init; }
    public IReadOnlyList<string>? TargetModules { get; init; }
    public bool? TrainOnInputs { get; init; }
    public long? Seed { get; init; }
    public int? SaveSteps { get; init; }
    /// <summary>Keep only the newest N checkpoints (and the best evaluated one), as transformers' save_total_limit.</summary>
    public int? SaveTotalLimit { get; init; }
    public int? MaxSteps { get; init; }
    /// <summary>Bottleneck adapters: hidden size of the down/up projection (LLM-Adapters' bottleneck_size).</summary>
    public int? BottleneckSize { get; init; }
    /// <summary>Bottleneck adapters: parallel to the module instead of after it.</summary>
    public bool? UseParallelAdapter { get; init; }
    /// <summary>Prefix and prompt tuning: number of virtual tokens.</summary>
    public int? NumVirtualTokens { get; init; }
    /// <summary>LayerSkip: layer dropout's p_max (0 or unset: off).</summary>
    public double? LayerDropout { get; init; }
    /// <summary>LayerSkip: layer dropout's shape over depth, exp, linear or uniform.</summary>
    public string? LayerDropoutScale { get; init; }
    /// <summary>LayerSkip: layer dropout's shape over training, none or exp.</summary>
    public string? LayerDropoutCurriculum { get; init; }
    /// <summary>LayerSkip: train every layer's exit with the early-exit loss.</summary>
    public bool? EarlyExitLoss { get; init; }
    /// <summary>LayerSkip: per-layer weights of the early-exit loss, uniform, linear, sum, sqrt, inv or inv-sqrt.</summary>
    public string? EarlyExitScale { get; init; }
    /// <summary>LayerSkip: which exits are trained per step, none, rotational or gradual.</summary>
    public string? EarlyExitCurriculum { get; init; }
    /// <summary>LayerSkip: R of the rotational curriculum.</summary>
    public int? EarlyExitRotation { get; init; }
    /// <summary>LayerSkip's e_scale: factor on every early layer's weight before normalising.</summary>
    public double? EarlyExitLayerScale { get; init; }
    /// <summary>α of the early exits' distillation toward the last layer (<see cref="EarlyExitOptions.Distillation"/>).</summary>
    public double? EarlyExitDistillation { get; init; }
    /// <summary>The exits trained, as 1-based exit layers (<see cref="EarlyExitOptions.Layers"/>); null = all.</summary>
    public IReadOnlyList<int>? EarlyExitLayers { get; init; }
    /// <summary>Training precision: fp32, bf16-mixed or bf16 (<see cref="TrainingPrecisionNames"/>).</summary>
    public string? Precision { get; init; }

    /// <summary>This recipe with every value <paramref name="overrides"/> sets replacing this one's.</summary>
    public TrainRecipe OverlaidBy(TrainRecipe overrides) => new()
    {
        Method = overrides.Method ?? Method,
        Epochs = overrides.Epochs ?? Epochs,
        LearningRate = overrides.LearningRate ?? LearningRate,
        BatchSize = overrides.BatchSize ?? BatchSize,
        MicroBatchSize = overrides.MicroBatchSize ?? MicroBatchSize,
        CutoffLen = overrides.CutoffLen ?? CutoffLen,
        WarmupSteps = overrides.WarmupSteps ?? WarmupSteps,
        LrScheduler = overrides.LrScheduler ?? LrScheduler,
        LoraR = overrides.LoraR ?? LoraR,
        LoraAlpha = overrides.LoraAlpha ?? LoraAlpha,
        LoraDropout = overrides.LoraDropout ?? LoraDropout,
        TargetModules = overrides.TargetModules ?? TargetModules,
        TrainOnInputs = overrides.TrainOnInputs ?? TrainOnInputs,
        Seed = overrides.Seed ?? Seed,
        SaveSteps = overrides.SaveSteps ?? SaveSteps,
        SaveTotalLimit = overrides.SaveTotalLimit ?? SaveTotalLimit,
        MaxSteps = overrides.MaxSteps ?? MaxSteps,
        BottleneckSize = overrides.BottleneckSize ?? BottleneckSize,
        UseParallelAdapter = overrides.UseParallelAdapter ?? UseParallelAdapter,
        NumVirtualTokens = overrides.NumVirtualTokens ?? NumVirtualTokens,
        Objective = overrides.Objective ?? Objective,
        ChatTemplate = overrides.ChatTemplate ?? ChatTemplate,
        Beta = overrides.Beta ?? Beta,
        LabelSmoothing = overrides.LabelSmoothing ?? LabelSmoothing,
        EvalData = overrides.EvalData ?? EvalData,
        EvalSplit = overrides.EvalSplit ?? EvalSplit,
        EvalEvery = overrides.EvalEvery ?? EvalEvery,
        RewarmSteps = overrides.RewarmSteps ?? RewarmSteps,
        MinLearningRate = overrides.MinLearningRate ?? MinLearningRate,
        BadRecords = overrides.BadRecords ?? BadRecords,
        LayerDropout = overrides.LayerDropout ?? LayerDropout,
        LayerDropoutScale = overrides.LayerDropoutScale ?? LayerDropoutScale,
        LayerDropoutCurriculum = overrides.LayerDropoutCurriculum ?? LayerDropoutCurriculum,
        EarlyExitLoss = overrides.EarlyExitLoss ?? EarlyExitLoss,
        EarlyExitScale = overrides.EarlyExitScale ?? EarlyExitScale,
        EarlyExitCurriculum = overrides.EarlyExitCurriculum ?? EarlyExitCurriculum,
        EarlyExitRotation = overrides.EarlyExitRotation ?? EarlyExitRotation,
        EarlyExitLayerScale = overrides.EarlyExitLayerScale ?? EarlyExitLayerScale,
        EarlyExitDistillation = overrides.EarlyExitDistillation ?? EarlyExitDistillation,
        EarlyExitLayers = overrides.EarlyExitLayers ?? EarlyExitLayers,
        Precision = overrides.Precision ?? Precision,
    };

    /// <summary>
    /// Reads a recipe file: a YAML or JSON mapping of snake_case keys (JSON is read by the YAML parser, of which it
    /// is a subset). Unknown keys and bad values raise <see cref="InvalidDataException"/> naming the file and key.
    /// </summary>
    public static TrainRecipe Load(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: recipe file not found", path);
        Dictionary<string, object?>? map;
        try
        {
            map = new DeserializerBuilder().Build().Deserialize<Dictionary<string, object?>>(File.ReadAllText(path));
        }
        catch (YamlException e)
        {
            throw new InvalidDataException($"{path}: not a YAML/JSON mapping of settings ({e.Start.Line}:{e.Start.Column}: {(e.InnerException ?? e).Message})");
        }
        var recipe = new TrainRecipe();
        foreach (var (key, value) in map ?? [])
        {
            string where = $"{path}: key '{key}'";
            recipe = key switch
            {
                "method" => recipe with { Method = ParseMethod(Text(value, where), where) },
                "epochs" => recipe with { Epochs = Int(value, where) },
                "learning_rate" => recipe with { LearningRate = Real(value, where) },
                "batch_size" => recipe with { BatchSize = Int(value, where) },
                "micro_batch_size" => recipe with { MicroBatchSize = Int(value, where) },
                "cutoff_len" => recipe with { CutoffLen = Int(value, where) },
                "warmup_steps" => recipe with { WarmupSteps = Int(value, where) },
                "lr_scheduler" => recipe with { LrScheduler = ParseScheduler(Text(value, where), where) },
                "lora_r" => recipe with { LoraR = Int(value, where) },
                "lora_alpha" => recipe with { LoraAlpha = Real(value, where) },
                "lora_dropout" => recipe with { LoraDropout = Real(value, where) },
                "target_modules" => recipe with { TargetModules = Names(value, where) },
                "train_on_inputs" => recipe with { TrainOnInputs = Bool(value, where) },
                "seed" => recipe with { Seed = Int(value, where) },
                "save_steps" => recipe with { SaveSteps = Int(value, where) },
                "save_total_limit" => recipe with { SaveTotalLimit = Int(value, where) },
                "max_steps" => recipe with { MaxSteps = Int(value, where) },
                "bottleneck_size" => recipe with { BottleneckSize = Int(value, where) },
                "use_parallel_adapter" => recipe with { UseParallelAdapter = Bool(value, where) },
                "num_virtual_tokens" => recipe with { NumVirtualTokens = Int(value, where) },
                "objective" => recipe with { Objective = Text(value, where) },
                "chat_template" => recipe with { ChatTemplate = RelativeTo(path, Text(value, where)) },
                "beta" => recipe with { Beta = Real(value, where) },
                "label_smoothing" => recipe with { LabelSmoothing = Real(value, where) },
                "eval_data" => recipe with { EvalData = RelativeTo(path, Text(value, where)) },
                "eval_split" => recipe with { EvalSplit = Real(value, where) },
                "eval_every" => recipe with { EvalEvery = Int(value, where) },
                "rewarm_steps" => recipe with { RewarmSteps = Int(value, where) },
                "min_learning_rate" => recipe with { MinLearningRate = Real(value, where) },
                "bad_records" => recipe with { BadRecords = Text(value, where) },
                "layer_dropout" => recipe with { LayerDropout = Real(value, where) },
                "layer_dropout_scale" => recipe with { LayerDropoutScale = Named(value, where, LayerDropoutOptions.ParseScale) },
                "layer_dropout_curriculum" => recipe with { LayerDropoutCurriculum = Named(value, where, LayerDropoutOptions.ParseCurriculum) },
                "early_exit_loss" => recipe with { EarlyExitLoss = Bool(value, where) },
                "early_exit_scale" => recipe with { EarlyExitScale = Named(value, where, EarlyExitOptions.ParseScale) },
                "early_exit_curriculum" => recipe with { EarlyExitCurriculum = Named(value, where, EarlyExitOptions.ParseCurriculum) },
                "early_exit_rotation" => recipe with { EarlyExitRotation = Int(value, where) },
                "early_exit_layer_scale" => recipe with { EarlyExitLayerScale = Real(value, where) },
                "early_exit_distillation" => recipe with { EarlyExitDistillation = Real(value, where) },
                "early_exit_layers" => recipe with { EarlyExitLayers = Ints(value, where) },
                "precision" => recipe with { Precision = ParsePrecision(Text(value, where), where) },
                _ => throw new InvalidDataException($"{path}: unknown key '{key}'"),
            };
        }
        recipe.Validate(path);
        return recipe;
    }

    /// <summary>Checks ranges and combinations; <paramref name="source"/> names where the values came from.</summary>
    public void Validate(string source)
    {
        void Positive(string key, double? value)
        {
            if (value is double v && !(v > 0)) throw new ArgumentException($"{source}: {key} must be positive (got {v.ToString(CultureInfo.InvariantCulture)})");
        }
        if (Method is not null) ParseMethod(Method, source);
        if (LrScheduler is not null) ParseScheduler(LrScheduler, source);
        if (Precision is not null) ParsePrecision(Precision, source);
        Positive("epochs", Epochs); Positive("learning_rate", LearningRate); Positive("batch_size", BatchSize);
        Positive("micro_batch_size", MicroBatchSize); Positive("cutoff_len", CutoffLen); Positive("lora_r", LoraR);
        Positive("lora_alpha", LoraAlpha); Positive("save_steps", SaveSteps); Positive("save_total_limit", SaveTotalLimit); Positive("max_steps", MaxSteps);
        Positive("bottleneck_size", BottleneckSize); Positive("num_virtual_tokens", NumVirtualTokens);
        if (Objective is not null && !Objectives.Contains(Objective))
            throw new ArgumentException($"{source}: unknown objective '{Objective}' (expected {string.Join(", ", Objectives)})");
        if (Objective == "dpo" && (LayerDropout is > 0 || EarlyExitLoss == true))
            throw new ArgumentException($"{source}: layer dropout and the early-exit loss work with the sft and pretrain objectives, not dpo");
        if (BadRecords is not null and not ("fail" or "skip")) throw new ArgumentException($"{source}: bad_records must be fail or skip (got '{BadRecords}')");
        Positive("beta", Beta); Positive("eval_every", EvalEvery); Positive("rewarm_steps", RewarmSteps);
        if (LabelSmoothing is < 0 or >= 0.5) throw new ArgumentException($"{source}: label_smoothing must be in [0, 0.5) (got {LabelSmoothing?.ToString(CultureInfo.InvariantCulture)})");
        if (EvalSplit is not null && !(EvalSplit > 0 && EvalSplit < 1)) throw new ArgumentException($"{source}: eval_split must be a fraction in (0, 1) (got {EvalSplit?.ToString(CultureInfo.InvariantCulture)})");
        if (EvalSplit is not null && EvalData is not null) throw new ArgumentException($"{source}: give eval_data or eval_split, not both");
        if (EvalEvery is not null && EvalSplit is null && EvalData is null) throw new ArgumentException($"{source}: eval_every needs eval_data or eval_split");
        if (RewarmSteps is not null && WarmupSteps is > 0) throw new ArgumentException($"{source}: give warmup_steps or rewarm_steps, not both");
        if (MinLearningRate is double min && (min < 0 || min > (LearningRate ?? new TrainerOptions().LearningRate)))
            throw new ArgumentException($"{source}: min_learning_rate must be in [0, learning_rate] (got {min.ToString(CultureInfo.InvariantCulture)})");
        if (WarmupSteps is < 0) throw new ArgumentException($"{source}: warmup_steps must be non-negative (got {WarmupSteps})");
        if (LoraDropout is < 0 or >= 1) throw new ArgumentException($"{source}: lora_dropout must be in [0, 1) (got {LoraDropout?.ToString(CultureInfo.InvariantCulture)})");
        int batch = BatchSize ?? new TrainerOptions().BatchSize, micro = MicroBatchSize ?? DefaultMicroBatch(batch);
        if (batch % micro != 0) throw new ArgumentException($"{source}: batch_size ({batch}) must be a multiple of micro_batch_size ({micro})");
        if (LayerDropout is < 0 or >= 1) throw new ArgumentException($"{source}: layer_dropout must be in [0, 1) (got {LayerDropout?.ToString(CultureInfo.InvariantCulture)})");
        if (LayerDropoutScale is not null) Checked(source, "layer_dropout_scale", () => LayerDropoutOptions.ParseScale(LayerDropoutScale));
        if (LayerDropoutCurriculum is not null) Checked(source, "layer_dropout_curriculum", () => LayerDropoutOptions.ParseCurriculum(LayerDropoutCurriculum));
        if ((LayerDropoutScale ?? LayerDropoutCurriculum) is not null && LayerDropout is null)
            throw new ArgumentException($"{source}: layer_dropout_scale and layer_dropout_curriculum need layer_dropout (the maximum rate)");
        if (EarlyExitScale is not null) Checked(source, "early_exit_scale", () => EarlyExitOptions.ParseScale(EarlyExitScale));
        if (EarlyExitCurriculum is not null) Checked(source, "early_exit_curriculum", () => EarlyExitOptions.ParseCurriculum(EarlyExitCurriculum));
        if (EarlyExitRotation is < 1) throw new ArgumentException($"{source}: early_exit_rotation must be at least 1 (got {EarlyExitRotation})");
        Positive("early_exit_layer_scale", EarlyExitLayerScale);
        if (EarlyExitDistillation is { } alpha && !(alpha >= 0 && alpha <= 1))
            throw new ArgumentException($"{source}: early_exit_distillation must be between 0 and 1 (got {alpha.ToString(CultureInfo.InvariantCulture)})");
        if (EarlyExitLayers is { } exits) Checked(source, "early_exit_layers", () => { new EarlyExitOptions(Layers: exits).Validate(); return 0; });
        if (EarlyExitLoss != true && (EarlyExitScale ?? EarlyExitCurriculum ?? (object?)EarlyExitRotation ?? EarlyExitLayerScale ?? EarlyExitDistillation ?? (object?)EarlyExitLayers) is not null)
            throw new ArgumentException($"{source}: early_exit_scale, early_exit_curriculum, early_exit_rotation, early_exit_layer_scale, early_exit_distillation and early_exit_layers need early_exit_loss: true");
    }

    /// <summary>The LayerSkip options the recipe sets (null when off), with the library's defaults for unset values.</summary>
    public LayerDropoutOptions? ToLayerDropoutOptions() => LayerDropout is double rate && rate > 0
        ? new LayerDropoutOptions(rate,
            LayerDropoutScale is null ? Training.LayerDropoutScale.Exponential : LayerDropoutOptions.ParseScale(LayerDropoutScale),
            LayerDropoutCurriculum is null ? Training.LayerDropoutCurriculum.None : LayerDropoutOptions.ParseCurriculum(LayerDropoutCurriculum))
        : null;

    /// <inheritdoc cref="ToLayerDropoutOptions"/>
    public EarlyExitOptions? ToEarlyExitOptions()
    {
        if (EarlyExitLoss != true) return null;
        var defaults = new EarlyExitOptions();
        return new EarlyExitOptions(
            EarlyExitScale is null ? defaults.Scale : EarlyExitOptions.ParseScale(EarlyExitScale),
            EarlyExitCurriculum is null ? defaults.Curriculum : EarlyExitOptions.ParseCurriculum(EarlyExitCurriculum),
            EarlyExitRotation ?? defaults.Rotation,
            EarlyExitLayerScale ?? defaults.EarlyLayerScale,
            EarlyExitDistillation ?? defaults.Distillation,
            EarlyExitLayers);
    }

    private static void Checked<T>(string source, string key, Func<T> parse)
    {
        try { parse(); }
        catch (ArgumentException e) { throw new ArgumentException($"{source}: {key}: {e.Message}"); }
    }

    /// <summary>The trainer's options; <paramref name="outputDirectory"/> receives metrics.jsonl and checkpoints.</summary>
    public TrainerOptions ToTrainerOptions(string? outputDirectory)
    {
        var defaults = new TrainerOptions();
        int batch = BatchSize ?? defaults.BatchSize;
        double peak = LearningRate ?? defaults.LearningRate;
        // Re-warming (continued pretraining): from the floor up to the peak, then back down to the floor; the
        // floor defaults to a tenth of the peak, as in Ibrahim et al. (2024).
        double floor = MinLearningRate ?? (RewarmSteps is null ? 0 : 0.1 * peak);
        return defaults with
        {
            Epochs = Epochs ?? defaults.Epochs,
            LearningRate = peak,
            MinLearningRate = floor,
            WarmupStartLearningRate = RewarmSteps is null ? 0 : floor,
            BatchSize = batch,
            MicroBatchSize = MicroBatchSize ?? DefaultMicroBatch(batch),
            WarmupSteps = RewarmSteps ?? WarmupSteps ?? defaults.WarmupSteps,
            Schedule = LrScheduler is null ? defaults.Schedule : LearningRateSchedule.ParseKind(LrScheduler),
            Seed = Seed ?? defaults.Seed,
            MaxSteps = MaxSteps,
            MetricsPath = outputDirectory is null ? null : Path.Combine(outputDirectory, "metrics.jsonl"),
            CheckpointDirectory = outputDirectory is null || SaveSteps is null ? null : outputDirectory,
            CheckpointEvery = SaveSteps ?? defaults.CheckpointEvery,
            SaveTotalLimit = SaveTotalLimit,
            LayerDropout = ToLayerDropoutOptions(),
            EarlyExit = ToEarlyExitOptions(),
            Precision = Precision is null ? defaults.Precision : TrainingPrecisionNames.Parse(Precision),
        };
    }

    /// <summary>Tokenisation options (cutoff, whether the prompt is trained on).</summary>
    public SftOptions ToSftOptions()
    {
        var defaults = new SftOptions();
        return defaults with { CutoffLength = CutoffLen ?? defaults.CutoffLength, TrainOnInputs = TrainOnInputs ?? false };
    }

    /// <summary>The adapter's configuration for the recipe's method; null for full fine-tuning.</summary>
    public PeftConfig? ToPeftConfig()
    {
        var targets = TargetModules is { Count: > 0 } t ? ModuleSelector.Names(t) : null;
        switch (Method ?? throw new ArgumentException("no training method given (full, lora, ia3, prefix, prompt or bottleneck)"))
        {
            case "full": return null;
            case "lora":
                var lora = new LoraConfig { R = LoraR ?? 8, LoraAlpha = LoraAlpha ?? 16, LoraDropout = LoraDropout ?? 0.05 };
                if (targets is not null) lora.TargetModules = targets;
                return lora;
            case "ia3":
                var ia3 = new IA3Config();
                if (targets is not null) ia3.TargetModules = targets;
                return ia3;
            case "prefix": return new PrefixTuningConfig { NumVirtualTokens = NumVirtualTokens ?? 10 };
            case "prompt": return new PromptTuningConfig { NumVirtualTokens = NumVirtualTokens ?? 10 };
            case "bottleneck":
                var bottleneck = new BottleneckConfig { BottleneckSize = BottleneckSize ?? 256, UseParallelAdapter = UseParallelAdapter ?? false };
                if (targets is not null) bottleneck.TargetModules = targets;
                return bottleneck;
            default: throw new ArgumentException($"unknown method '{Method}'");
        }
    }

    /// <summary>DPO's options (β, label smoothing).</summary>
    public DpoOptions ToDpoOptions() => new() { Beta = Beta ?? 0.1, LabelSmoothing = LabelSmoothing ?? 0 };

    /// <summary>What to do with bad data records.</summary>
    public Data.BadRecordPolicy ToBadRecordPolicy() => BadRecords == "skip" ? Data.BadRecordPolicy.Skip : Data.BadRecordPolicy.Fail;

    /// <summary>A path in a recipe file is relative to the file (a template name stays a name).</summary>
    private static string RelativeTo(string recipePath, string value)
    {
        if (Path.IsPathRooted(value) || Data.ChatTemplate.BuiltInNames.Contains(value, StringComparer.OrdinalIgnoreCase)) return value;
        var candidate = Path.Combine(Path.GetDirectoryName(Path.GetFullPath(recipePath))!, value);
        return File.Exists(candidate) ? candidate : value;
    }

    /// <summary>Without a micro-batch size: the largest divisor of the batch up to the trainer's default (8).</summary>
    private static int DefaultMicroBatch(int batch)
    {
        int micro = Math.Min(batch, new TrainerOptions().MicroBatchSize);
        while (batch % micro != 0) micro--;
        return micro;
    }

    private static string ParseMethod(string value, string where) => Methods.Contains(value)
        ? value
        : throw new ArgumentException($"{where}: unknown method '{value}' (expected {string.Join(", ", Methods)})");

    private static string ParseScheduler(string value, string where) => value is "constant" or "linear" or "cosine"
        ? value
        : throw new ArgumentException($"{where}: unknown lr_scheduler '{value}' (expected constant, linear or cosine)");

    /// <summary>A name checked by <paramref name="parse"/> (an unknown one names the file and key), kept as written.</summary>
    private static string Named<T>(object? value, string where, Func<string, T> parse)
    {
        var text = Text(value, where);
        try { parse(text); }
        catch (ArgumentException e) { throw new InvalidDataException($"{where}: {e.Message}"); }
        return text;
    }

    private static string ParsePrecision(string value, string where) => TrainingPrecisionNames.All.Contains(value)
        ? value
        : throw new ArgumentException($"{where}: unknown precision '{value}' (expected {string.Join(", ", TrainingPrecisionNames.All)})");

    private static string Text(object? value, string where) =>
        value as string ?? throw new InvalidDataException($"{where}: expected a single value");

    private static int Int(object? value, string where) =>
        int.TryParse(Text(value, where), NumberStyles.Integer, CultureInfo.InvariantCulture, out var v)
            ? v : throw new InvalidDataException($"{where}: expected an integer, got '{value}'");

    private static double Real(object? value, string where) =>
        double.TryParse(Text(value, where), NumberStyles.Float, CultureInfo.InvariantCulture, out var v) && double.IsFinite(v)
            ? v : throw new InvalidDataException($"{where}: expected a number, got '{value}'");

    private static bool Bool(object? value, string where) => Text(value, where).ToLowerInvariant() switch
    {
        "true" or "yes" => true,
        "false" or "no" => false,
        var other => throw new InvalidDataException($"{where}: expected true or false, got '{other}'"),
    };

    /// <summary>A list of integers: a YAML list, or one value "2, 3".</summary>
    private static IReadOnlyList<int> Ints(object? value, string where) =>
        Items(value, where, "integers").Select(item => int.TryParse(item, NumberStyles.Integer, CultureInfo.InvariantCulture, out var v)
            ? v : throw new InvalidDataException($"{where}: expected integers, got '{item}'")).ToArray();

    private static IReadOnlyList<string> Names(object? value, string where) => Items(value, where, "module names");

    /// <summary>The items of a YAML list, or of one comma-separated value.</summary>
    private static string[] Items(object? value, string where, string what) => value switch
    {
        string s => s.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries),
        List<object?> list => list.Select(item => Text(item, where)).ToArray(),
        _ => throw new InvalidDataException($"{where}: expected a list of {what}"),
    };
}

using System.Globalization;
using AdapterFlow.Adapters.Bottleneck;
using AdapterFlow.Adapters.IA3;
using AdapterFlow.Adapters.Lora;
using AdapterFlow.Adapters.PrefixTuning;
using AdapterFlow.Adapters.PTuning;
using AdapterFlow.Adapters.PromptTuning;
using AdapterFlow.IO;
using AdapterFlow.Models;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Adapters;

/// <summary>Holds the wrapped model under the name <c>model</c>, so state-dict paths read base_model.model.… as PEFT's.</summary>
public sealed class TunerModel : nn.Module
{
    public CausalLM model;

    public TunerModel(CausalLM model) : base(nameof(TunerModel))
    {
        this.model = model;
        register_module("model", model);
    }
}

/// <summary>
/// A frozen causal LM with small trainable adapters attached (PEFT's PeftModelForCausalLM). LoRA and IA3 wrap
/// target modules in place; prompt and prefix tuning add virtual tokens. Several named adapters of one method can
/// live on a model; one is active. Files are PEFT's: adapter_config.json + adapter_model.safetensors.
/// It is itself a <see cref="CausalLM"/> (config, embeddings and cache of the wrapped model, its own forward), so
/// generation, evaluation and everything else that takes a model runs with the adapter as it is.
/// </summary>
public sealed class PeftModel : CausalLM
{
    public const string DefaultAdapter = "default";
    public const string ConfigFile = "adapter_config.json";
    public const string WeightsFile = "adapter_model.safetensors";
    private const string Prefix = "base_model.model.";

    public TunerModel base_model;
    public AdapterModules prompt_encoder;

    private readonly Dictionary<string, PeftConfig> _configs = new();
    private readonly Dictionary<string, IAdapterLayer> _layers = new(); // module path (in the CausalLM) → wrapper
    private string _active = DefaultAdapter;
    private bool _unloaded;
    private bool _loadingSaved;

    private PeftModel(CausalLM model) : base(nameof(PeftModel))
    {
        base_model = new TunerModel(model);
        prompt_encoder = new AdapterModules();
        register_module("base_model", base_model);
        register_module("prompt_encoder", prompt_encoder);
        foreach (var p in model.parameters()) p.requires_grad = false;
    }

    /// <summary>The wrapped model (its linear layers may now be adapter wrappers).</summary>
    public CausalLM Model => base_model.model;

    /// <summary>
    /// The wrapped model, whose forward a decode step through this wrapper is exactly (a cache that already holds the
    /// prompt, no attention mask, no per-row adapters): LoRA, IA3 and bottleneck adapters live inside the model's
    /// modules, prompt tuning and P-tuning add their virtual tokens on the first pass only, and a prefix is already in the
    /// cache. Decoding loops that run the model's kernels directly (greedy host steps and rounds) go through it; null once
    /// unloaded.
    /// </summary>
    internal CausalLM? DecodeStepModel => _unloaded ? null : Model;

    public override ModelConfig Config => Model.Config;

    public override Tensor EmbedTokens(Tensor inputIds) => Model.EmbedTokens(inputIds);

    // forward is overridden below and goes through the wrapped model's own layer loop, so these stages are never
    // reached; C# does not let a subclass call another instance's protected members to delegate them.
    protected override LayerContext Prepare(ForwardInput input, out Tensor hidden) => throw StagesNotUsed();
    protected override Tensor RunLayer(int index, Tensor hidden, LayerContext context) => throw StagesNotUsed();
    protected override Tensor Head(Tensor hidden) => throw StagesNotUsed();

    /// <summary>The wrapped model's final norm and head (with any adapter on them, as they are wrapped in place).</summary>
    public override Tensor HeadLogits(Tensor hidden) => Model.HeadLogits(hidden);

    /// <summary>The wrapped model's plain head (null when an adapter wraps the head: it is wrapped in place).</summary>
    internal override (Func<Tensor, Tensor> FinalNorm, Tensor Weight)? PlainHead() => Model.PlainHead();
    private static NotSupportedException StagesNotUsed() => new("PeftModel runs the wrapped model's forward; its layer stages are not used");

    public IReadOnlyDictionary<string, PeftConfig> Configs => _configs;
    public string ActiveAdapter => _active;
    public PeftConfig ActiveConfig => _configs[_active];

    /// <summary>Adapter wrappers by module path inside <see cref="Model"/>.</summary>
    public IReadOnlyDictionary<string, IAdapterLayer> AdapterLayers => _layers;

    /// <summary>PEFT's get_peft_model: freezes the model and attaches a new adapter initialised per the config.</summary>
    public static PeftModel Create(CausalLM model, PeftConfig config, string adapterName = DefaultAdapter, ITokenizer? tokenizer = null)
    {
        var peft = new PeftModel(model);
        peft.AddAdapter(adapterName, config, tokenizer);
        return peft;
    }

    /// <summary>
    /// PEFT's PeftModel.from_pretrained: attaches the adapter saved in <paramref name="directory"/>. With
    /// <paramref name="isTrainable"/> false the adapter is frozen too (inference mode).
    /// </summary>
    public static PeftModel FromPretrained(CausalLM model, string directory, string adapterName = DefaultAdapter, bool isTrainable = false)
    {
        var peft = new PeftModel(model);
        peft.LoadAdapter(directory, adapterName, isTrainable);
        return peft;
    }

    /// <summary>
    /// Adds an adapter saved in PEFT's format under a new name (it does not become active). For a name other than
    /// "default", a sub-folder of that name (as <see cref="SavePretrained"/> writes) is used when present.
    /// </summary>
    public void LoadAdapter(string directory, string adapterName, bool isTrainable = false)
    {
        // SavePretrained puts a non-default adapter in <folder>/<name>: given the parent folder, that sub-folder is the
        // adapter meant (the parent's own adapter_config.json is the default adapter's).
        if (adapterName != DefaultAdapter && File.Exists(Path.Combine(directory, adapterName, ConfigFile)))
            directory = Path.Combine(directory, adapterName);
        var config = PeftConfig.Load(directory);
        var weights = Path.Combine(directory, WeightsFile);
        if (!File.Exists(weights)) throw new FileNotFoundException($"{weights}: adapter weights not found", weights);
        config.InferenceMode = !isTrainable;
        bool first = _configs.Count == 0;
        // Saved virtual tokens are the computed table (PEFT saves a re-parameterised prompt so), so a loaded prompt
        // is a plain table even when the adapter is loaded to train further.
        _loadingSaved = true;
        try { AddAdapter(adapterName, config, tokenizer: null, activate: first); }
        finally { _loadingSaved = false; }
        using var file = SafetensorsFile.Open(weights);
        LoadWeights(adapterName, file);
    }

    /// <summary>Attaches a new adapter. The first one added becomes active.</summary>
    public void AddAdapter(string adapterName, PeftConfig config, ITokenizer? tokenizer = null, bool? activate = null)
    {
        EnsureUsable();
        if (string.IsNullOrEmpty(adapterName) || adapterName.Contains('.'))
            throw new ArgumentException($"adapter name '{adapterName}' must be non-empty and contain no '.'");
        if (_configs.ContainsKey(adapterName)) throw new ArgumentException($"an adapter named '{adapterName}' already exists");
        if (_configs.Count > 0 && _configs.Values.First().PeftType != config.PeftType)
            throw new ArgumentException($"this model holds {_configs.Values.First().PeftType} adapters; a {config.PeftType} adapter cannot be added beside them");
        using (torch.no_grad())
        {
            switch (config)
            {
                case LoraConfig lora: InjectLora(adapterName, lora); break;
                case IA3Config ia3: InjectIA3(adapterName, ia3); break;
                case BottleneckConfig bottleneck: InjectBottleneck(adapterName, bottleneck); break;
                case PromptTuningConfig prompt: AddPromptTuning(adapterName, prompt, tokenizer); break;
                case PromptEncoderConfig ptuning: AddPTuning(adapterName, ptuning); break;
                case PrefixTuningConfig prefix: AddPrefixTuning(adapterName, prefix); break;
                default: throw new NotSupportedException($"{config.PeftType} adapters are not supported");
            }
            AddModulesToSave(adapterName, config);
        }
        _configs[adapterName] = config;
        if (activate ?? _configs.Count == 1) SetAdapter(adapterName);
        else MarkTrainable();
    }

    // ---------------------------------------------------------------- injection

    /// <summary>Module paths a tuner config selects, with PEFT's rules (targets, layers_to_transform, exclusions).</summary>
    private List<string> SelectTargets(ModuleSelector targets, ModuleSelector? exclude, IReadOnlyList<int>? layers, string? layersPattern, string what,
        IReadOnlyList<string>? modulesToSave = null)
    {
        // As PEFT: a module in modules_to_save (or inside one) is trained in full, never wrapped by the tuner too.
        var savedPatterns = (modulesToSave ?? []).Select(m => new System.Text.RegularExpressions.Regex($@"^(.*\.)?{m}(\..*)?$")).ToArray();
        var candidates = new List<(string Path, nn.Module Module)>();
        var wrapped = new List<string>();
        foreach (var (path, module) in ModuleSurgery.Modules(Model))
        {
            // Skip what lives inside adapter wrappers (base_layer, lora_A, ...): the wrapper itself is the target.
            if (wrapped.Any(w => path.StartsWith(w + ".", StringComparison.Ordinal))) continue;
            if (module is IAdapterLayer) wrapped.Add(path);
            candidates.Add((path, module));
        }
        var head = OutputHeadPath();
        var selected = new List<string>();
        foreach (var (path, module) in candidates)
        {
            bool match = targets.IsAllLinear
                ? (ModuleSurgery.IsLinear(module) || module is IAdapterLayer) && path != head
                : targets.Matches(path);
            if (!match) continue;
            if (layers is not null)
            {
                var layer = ModuleSurgery.LayerOf(path, layersPattern);
                if (layer is null || !layers.Contains(layer.Value)) continue;
            }
            if (exclude is not null && !exclude.IsAllLinear && exclude.Matches(path)) continue;
            if (savedPatterns.Any(p => p.IsMatch(path))) continue;
            selected.Add(path);
        }
        if (selected.Count == 0)
        {
            var linears = candidates.Where(c => ModuleSurgery.IsLinear(c.Module) || c.Module is IAdapterLayer)
                .Select(c => c.Path.Split('.')[^1]).Distinct().ToArray();
            throw new ArgumentException(
                $"{what}: target_modules {targets} match no module of {Model.GetType().Name} (its linear layers are named {string.Join(", ", linears)})");
        }
        return selected;
    }

    private string? OutputHeadPath() =>
        Model.named_children().Select(c => c.name).FirstOrDefault(n => n is "lm_head" or "embed_out");

    private T Wrap<T>(string path, Func<nn.Module<Tensor, Tensor>, T> create, bool allowEmbedding = false) where T : nn.Module, IAdapterLayer
    {
        if (_layers.TryGetValue(path, out var existing))
            return existing as T ?? throw new InvalidOperationException($"module '{path}' already holds a {existing.GetType().Name}");
        var module = ModuleSurgery.Find(Model, path);
        bool supported = ModuleSurgery.IsLinear(module) || (allowEmbedding && module is TorchSharp.Modules.Embedding);
        if (module is not nn.Module<Tensor, Tensor> typed || !supported)
            throw new NotSupportedException(
                $"target module '{path}' is a {module.GetType().Name}; only Linear and Conv1D layers{(allowEmbedding ? " and embeddings" : "")} can be adapted");
        var wrapper = create(typed);
        ModuleSurgery.Replace(Model, path, wrapper);
        _layers[path] = wrapper;
        return wrapper;
    }

    private void AddModulesToSave(string adapter, PeftConfig config)
    {
        if (config.ModulesToSave is not { Count: > 0 } names) return;
        var selector = ModuleSelector.Names(names);
        var paths = ModuleSurgery.Modules(Model).Select(m => m.Path)
            .Where(p => selector.Matches(p) && !_layers.Keys.Any(l => p.StartsWith(l + ".", StringComparison.Ordinal)))
            .ToArray();
        if (paths.Length == 0)
            throw new ArgumentException($"{config.Source}: modules_to_save [{string.Join(", ", names)}] match no module of {Model.GetType().Name}");
        foreach (var path in paths)
        {
            nn.Module<Tensor, Tensor> module;
            ModulesToSaveWrapper wrapper;
            if (_layers.TryGetValue(path, out var existing))
            {
                wrapper = existing as ModulesToSaveWrapper
                          ?? throw new InvalidOperationException($"module '{path}' holds a {existing.GetType().Name} and cannot also be in modules_to_save");
            }
            else
            {
                module = ModuleSurgery.Find(Model, path) as nn.Module<Tensor, Tensor>
                         ?? throw new NotSupportedException($"{config.Source}: module '{path}' cannot be in modules_to_save");
                wrapper = new ModulesToSaveWrapper(module);
                ModuleSurgery.Replace(Model, path, wrapper);
                _layers[path] = wrapper;
            }
            wrapper.AddAdapter(adapter);
        }
    }

    private void InjectLora(string adapter, LoraConfig config)
    {
        config.Validate();
        // EVA and LoRA-GA compute A (and B) from data passes before training; a saved adapter carries the result.
        if (config.InitLoraWeights is LoraInit.Eva or LoraInit.LoraGa && !_loadingSaved)
            throw new NotSupportedException(
                $"{config.Source}: init_lora_weights \"{(config.InitLoraWeights == LoraInit.Eva ? "eva" : "lora_ga")}\" needs statistics from passes over training data, which AdapterFlow does not compute; saved adapters made so load normally");
        config.TargetModules ??= ModuleSelector.Names(DefaultTargets.ForLora(Model.Config.ModelType));
        var targets = SelectTargets(config.TargetModules, config.ExcludeModules, config.LayersToTransform, config.LayersPattern, config.Source, config.ModulesToSave);
        // As PEFT: a resolved all-linear is written back as the list of modules it chose.
        if (config.TargetModules.IsAllLinear) config.TargetModules = ModuleSelector.Names(targets);
        foreach (var path in targets)
        {
            if (ModuleSurgery.Find(Model, path) is TorchSharp.Modules.Embedding || _layers.GetValueOrDefault(path) is LoraEmbedding)
            {
                var embedding = Wrap(path, b => new LoraEmbedding(b), allowEmbedding: true);
                embedding.AddAdapter(adapter, config.RankFor(path), config.ScalingFor(path), config.InitLoraWeights, config.UseDora);
                continue;
            }
            var layer = Wrap(path, b => new LoraLinear(b));
            config.FanInFanOut |= LinearParts.FanInFanOut(layer.BaseLayer);
            layer.AddAdapter(adapter, config.RankFor(path), config.ScalingFor(path), config.LoraDropout, config.InitLoraWeights, config.UseDora);
            LoraWeightInit.Apply(layer, adapter, config.InitLoraWeights, config.Source);
        }
    }

    private void InjectIA3(string adapter, IA3Config config)
    {
        config.Validate();
        if (config.TargetModules is null)
        {
            var (t, f) = DefaultTargets.ForIA3(Model.Config.ModelType);
            config.TargetModules = ModuleSelector.Names(t);
            config.FeedforwardModules ??= ModuleSelector.Names(f);
        }
        var targets = SelectTargets(config.TargetModules, config.ExcludeModules, null, null, config.Source, config.ModulesToSave);
        if (config.TargetModules.IsAllLinear) config.TargetModules = ModuleSelector.Names(targets);
        foreach (var path in targets)
        {
            bool feedforward = config.FeedforwardModules is { } ff && ff.Matches(path);
            var layer = Wrap(path, b => new IA3Linear(b, feedforward));
            if (layer.IsFeedforward != feedforward)
                throw new ArgumentException($"{config.Source}: module '{path}' is a feed-forward module in one IA3 adapter and not in another");
            config.FanInFanOut |= LinearParts.FanInFanOut(layer.BaseLayer);
            layer.AddAdapter(adapter, config.InitIA3Weights);
        }
    }

    private void InjectBottleneck(string adapter, BottleneckConfig config)
    {
        config.Validate();
        var modelType = Model.Config.ModelType;
        config.TargetModules ??= ModuleSelector.Names(BottleneckDefaults.DefaultTargets(modelType));
        var targets = SelectTargets(config.TargetModules, null, null, null, config.Source, config.ModulesToSave);
        if (config.TargetModules.IsAllLinear) config.TargetModules = ModuleSelector.Names(targets);
        foreach (var path in targets)
        {
            var placement = config.UseParallelAdapter ? BottleneckPlacement.Parallel : BottleneckDefaults.SeriesPlacement(modelType, path);
            var layer = Wrap(path, b => new BottleneckLinear(b, placement));
            if (layer.Placement != placement)
                throw new ArgumentException($"{config.Source}: module '{path}' already has a {layer.Placement} bottleneck adapter; a {placement} one cannot join it");
            layer.AddAdapter(adapter, config);
        }
    }

    private void AddPromptTuning(string adapter, PromptTuningConfig config, ITokenizer? tokenizer)
    {
        var words = WordEmbeddingWeight();
        if (config.TokenDim == 0) config.TokenDim = (int)words.shape[1];
        if (config.TokenDim != words.shape[1])
            throw new ArgumentException($"{config.Source}: token_dim {config.TokenDim} differs from the model's embedding width {words.shape[1]}");
        if (config.NumLayers == 0) config.NumLayers = Model.NumLayers;
        if (config.NumAttentionHeads == 0) config.NumAttentionHeads = Model.Config.NumAttentionHeads;
        prompt_encoder.Add(adapter, new PromptEmbedding(config, words, tokenizer));
    }

    private void AddPTuning(string adapter, PromptEncoderConfig config)
    {
        var words = WordEmbeddingWeight();
        if (config.TokenDim == 0) config.TokenDim = (int)words.shape[1];
        if (config.TokenDim != words.shape[1])
            throw new ArgumentException($"{config.Source}: token_dim {config.TokenDim} differs from the model's embedding width {words.shape[1]}");
        if (config.NumLayers == 0) config.NumLayers = Model.NumLayers;
        if (config.NumAttentionHeads == 0) config.NumAttentionHeads = Model.Config.NumAttentionHeads;
        // PEFT has no default hidden size (None fails); the token width is the usual choice, and writing it back keeps
        // the saved config loadable by PEFT.
        if (config.EncoderHiddenSize == 0) config.EncoderHiddenSize = config.TokenDim;
        config.Validate();
        prompt_encoder.Add(adapter, new PromptEncoder(config, words.device, words.dtype, table: _loadingSaved));
    }

    private void AddPrefixTuning(string adapter, PrefixTuningConfig config)
    {
        var mc = Model.Config;
        int kvWidth = mc.NumKeyValueHeads * mc.HeadDim;
        if (config.TokenDim == 0) config.TokenDim = kvWidth;
        if (config.NumAttentionHeads == 0) config.NumAttentionHeads = mc.NumKeyValueHeads;
        if (config.NumLayers == 0) config.NumLayers = Model.NumLayers;
        if (config.TokenDim != kvWidth || config.NumAttentionHeads != mc.NumKeyValueHeads || config.NumLayers != Model.NumLayers)
            throw new ArgumentException(
                $"{config.Source}: prefix for {config.NumLayers} layers × {config.NumAttentionHeads} heads (token_dim {config.TokenDim}) does not fit {Model.GetType().Name} ({Model.NumLayers} layers × {mc.NumKeyValueHeads} key/value heads of {mc.HeadDim})");
        if (config.NumTransformerSubmodules != 1)
            throw new ArgumentException($"{config.Source}: num_transformer_submodules must be 1 for a decoder-only model");
        var weight = Model.parameters().First();
        prompt_encoder.Add(adapter, new PrefixEncoder(config, weight.device, weight.dtype, table: _loadingSaved));
    }

    /// <summary>The token-embedding matrix: the Embedding whose rows EmbedTokens returns (GPT-2's position table can have the same shape).</summary>
    private Tensor WordEmbeddingWeight()
    {
        using var no = torch.no_grad();
        using var probe = torch.tensor(new long[] { 1 }, device: Model.Device).unsqueeze(0);
        using var embedded = Model.EmbedTokens(probe);
        foreach (var (_, m) in ModuleSurgery.Modules(Model))
        {
            if (m is not TorchSharp.Modules.Embedding e || e.weight!.shape[0] != Model.Config.VocabSize) continue;
            // A scope here would dispose the returned Parameter; the comparison's temporaries go in their own.
            bool same;
            using (var scope = torch.NewDisposeScope())
                same = e.weight[1].eq(embedded[0, 0]).all().item<bool>();
            if (same) return e.weight!;
        }
        throw new NotSupportedException($"{Model.GetType().Name} has no token embedding of vocabulary size {Model.Config.VocabSize}");
    }

    // ---------------------------------------------------------------- adapters: activate, disable, delete

    /// <summary>Makes one adapter the active one (the only trainable one, unless loaded for inference).</summary>
    public void SetAdapter(string adapterName)
    {
        EnsureUsable();
        if (!_configs.ContainsKey(adapterName)) throw new ArgumentException($"no adapter named '{adapterName}' (have: {string.Join(", ", _configs.Keys)})");
        // As PEFT: switching adapters on a merged model unmerges it first.
        if (adapterName != _active) Unmerge();
        _active = adapterName;
        foreach (var layer in _layers.Values) layer.ActiveAdapters = [adapterName];
        MarkTrainable();
    }

    /// <summary>While the returned scope lives, forward runs the base model alone (PEFT's disable_adapter()).</summary>
    public IDisposable DisableAdapters()
    {
        EnsureUsable();
        // Merged weights would keep the adapter in the "base" output: unmerge first, as PEFT does.
        Unmerge();
        AdaptersDisabled = true;
        foreach (var layer in _layers.Values) layer.Disabled = true;
        return new Restore(() =>
        {
            AdaptersDisabled = false;
            foreach (var layer in _layers.Values) layer.Disabled = false;
        });
    }

    public bool AdaptersDisabled { get; private set; }

    /// <summary>Removes an adapter and its tensors. The active adapter moves to another one if any remains.</summary>
    public void DeleteAdapter(string adapterName)
    {
        EnsureUsable();
        if (!_configs.Remove(adapterName)) throw new ArgumentException($"no adapter named '{adapterName}'");
        foreach (var layer in _layers.Values) layer.RemoveAdapter(adapterName);
        prompt_encoder.Remove(adapterName);
        if (_active == adapterName && _configs.Count > 0) SetAdapter(_configs.Keys.First());
    }

    private void MarkTrainable()
    {
        foreach (var layer in _layers.Values)
            foreach (var adapter in layer.AdapterNames)
                foreach (var p in layer.AdapterParameters(adapter))
                    p.requires_grad = adapter == _active && !_configs[adapter].InferenceMode;
        foreach (var name in prompt_encoder.Keys)
            foreach (var p in prompt_encoder[name].parameters())
                p.requires_grad = name == _active && !_configs[name].InferenceMode;
        if (_configs.TryGetValue(_active, out var config) && config is LoraConfig { Bias: not "none" } lora && !lora.InferenceMode)
        {
            IEnumerable<(string, nn.Module)> owners = lora.Bias == "all"
                ? ModuleSurgery.Modules(Model)
                : _layers.Values.OfType<LoraLinear>().Select(l => ("", (nn.Module)l.base_layer));
            foreach (var (_, m) in owners)
                foreach (var (n, p) in m.named_parameters(recurse: false))
                    if (n == "bias") p.requires_grad = true;
        }
    }

    // ---------------------------------------------------------------- forward

    public override ForwardOutput forward(ForwardInput input) => Forward(input, null);

    /// <summary>
    /// Forward pass with the active adapter. <paramref name="rowAdapters"/> (LoRA only) names an adapter per batch
    /// row — "__base__" for none — as PEFT's adapter_names: each row is computed as if its adapter alone were active.
    /// </summary>
    public ForwardOutput Forward(ForwardInput input, IReadOnlyList<string>? rowAdapters)
    {
        EnsureUsable();
        if (rowAdapters is not null) return ForwardMixed(input, rowAdapters);
        if (AdaptersDisabled || _configs.Count == 0) return Model.forward(input);
        return _configs[_active] switch
        {
            PromptTuningConfig => ForwardPromptTuning(input, ((PromptEmbedding)prompt_encoder[_active]).embedding.weight!),
            PromptEncoderConfig => ForwardPromptTuning(input, ((PromptEncoder)prompt_encoder[_active]).Tokens()),
            PrefixTuningConfig c => ForwardPrefixTuning(input, c, (PrefixEncoder)prompt_encoder[_active]),
            _ => Model.forward(input),
        };
    }

    private ForwardOutput ForwardMixed(ForwardInput input, IReadOnlyList<string> rowAdapters)
    {
        var layers = _layers.Values.OfType<IRoutableAdapterLayer>().ToArray();
        // Virtual-token adapters (prompt, prefix, P-tuning) change the sequence itself, so rows cannot differ in them.
        if (layers.Length == 0 || _configs.Values.Any(c => c is PromptLearningConfig))
            throw new NotSupportedException($"per-row adapters (mixed batches) need LoRA, IA3 or bottleneck adapters, not {_configs[_active].PeftType}");
        if (layers.Length != _layers.Count)
            throw new NotSupportedException(
                $"per-row adapters (mixed batches) are not supported with {string.Join(", ", _layers.Values.Where(l => l is not IRoutableAdapterLayer).Select(l => l.GetType().Name).Distinct())}");
        if (layers.Any(l => l.MergedAdapters.Count > 0)) throw new InvalidOperationException("per-row adapters need unmerged adapters; unmerge first");
        // Layer dropout runs a layer on a subset of the rows, which the per-row routing (row indices) does not follow.
        if (input.LayerDropout is not null && Model.training)
            throw new NotSupportedException("per-row adapters (mixed batches) do not combine with layer dropout");
        var batch = (input.InputIds ?? input.InputsEmbeds)!.shape[0];
        if (rowAdapters.Count != batch) throw new ArgumentException($"{rowAdapters.Count} adapter names for a batch of {batch} rows");
        foreach (var name in rowAdapters)
            if (name != "__base__" && !_configs.ContainsKey(name)) throw new ArgumentException($"no adapter named '{name}'");
        var device = Model.Device;
        var routing = rowAdapters.Select((name, row) => (name, row)).Where(x => x.name != "__base__")
            .GroupBy(x => x.name)
            .Select(g => (g.Key, torch.tensor(g.Select(x => (long)x.row).ToArray(), device: device)))
            .ToArray();
        try
        {
            foreach (var l in layers) l.Routing = routing;
            return Model.forward(input);
        }
        finally
        {
            foreach (var l in layers) l.Routing = null;
            foreach (var (_, rows) in routing) rows.Dispose();
        }
    }

    private ForwardOutput ForwardPromptTuning(ForwardInput input, Tensor tokens)
    {
        // Only the first pass of a generation sees the virtual tokens; later steps find them in the cache.
        if (input.Cache is { Length: > 0 }) return Model.forward(input);
        var embeds = input.InputsEmbeds ?? Model.EmbedTokens(input.InputIds ?? throw new ArgumentException("give InputIds or InputsEmbeds"));
        long batch = embeds.shape[0];
        var virtualTokens = tokens.unsqueeze(0).expand(batch, -1, -1).to_type(embeds.dtype);
        var mask = input.AttentionMask is { } m
            ? torch.cat([torch.ones(batch, virtualTokens.shape[1], dtype: m.dtype, device: m.device), m], 1)
            : null;
        // PEFT ignores position_ids with prompt learning; positions run over virtual + real tokens.
        return Model.forward(input with
        {
            InputIds = null,
            InputsEmbeds = torch.cat([virtualTokens, embeds], 1),
            AttentionMask = mask,
            PositionIds = null,
        });
    }

    /// <summary>An empty cache of the wrapped model (a forward with it fills in the virtual tokens first).</summary>
    public override KVCache CreateCache() => Model.CreateCache();

    /// <summary>
    /// A cache pre-filled with the active adapter's virtual tokens for <paramref name="batch"/> rows: a prefix
    /// adapter's keys/values, or the keys/values a prompt (or P-tuning) adapter's virtual tokens produce at positions
    /// 0..n−1. Generation starts from it, so prompt tokens take positions n.. as in PEFT. Empty for other methods.
    /// </summary>
    public override KVCache CreateCache(long batch)
    {
        EnsureUsable();
        var cache = Model.CreateCache();
        if (AdaptersDisabled) return cache;
        try
        {
            switch (_configs.GetValueOrDefault(_active))
            {
                case PrefixTuningConfig c:
                    FillPrefix(cache, c, (PrefixEncoder)prompt_encoder[_active], batch);
                    break;
                case PromptTuningConfig:
                    FillVirtualTokens(cache, ((PromptEmbedding)prompt_encoder[_active]).embedding.weight!, batch);
                    break;
                case PromptEncoderConfig:
                    FillVirtualTokens(cache, ((PromptEncoder)prompt_encoder[_active]).Tokens(), batch);
                    break;
            }
        }
        catch
        {
            cache.Dispose();
            throw;
        }
        return cache;
    }

    private void FillVirtualTokens(KVCache cache, Tensor tokens, long batch)
    {
        // Causal attention: the virtual tokens, which come first, never see the prompt, so their keys/values can be
        // computed once before it. Only the cache is kept (for generation: no graph).
        using var scope = torch.NewDisposeScope();
        using var no = torch.no_grad();
        var embeds = tokens.unsqueeze(0).expand(batch, -1, -1).to_type(Model.DType);
        Model.forward(new ForwardInput { InputsEmbeds = embeds, Cache = cache, LastPositionOnly = true });
    }

    private void FillPrefix(KVCache cache, PrefixTuningConfig config, PrefixEncoder encoder, long batch)
    {
        int n = config.NumVirtualTokens, layers = config.NumLayers, heads = config.NumAttentionHeads;
        long headDim = config.TokenDim / heads;
        // [n, layers · 2, heads, head_dim]: slot 2i is layer i's key, 2i + 1 its value; used without rotary.
        var table = encoder.Table().view(n, layers * 2, heads, headDim).permute(1, 2, 0, 3); // [layers·2, heads, n, hd]
        for (int i = 0; i < layers; i++)
        {
            var k = table[2 * i].unsqueeze(0).expand(batch, -1, -1, -1);
            var v = table[2 * i + 1].unsqueeze(0).expand(batch, -1, -1, -1);
            cache.Append(i, k, v);
        }
    }

    private ForwardOutput ForwardPrefixTuning(ForwardInput input, PrefixTuningConfig config, PrefixEncoder encoder)
    {
        var x = (input.InputIds ?? input.InputsEmbeds) ?? throw new ArgumentException("give InputIds or InputsEmbeds");
        long batch = x.shape[0], time = x.shape[1];
        int n = config.NumVirtualTokens;
        var cache = input.Cache;
        bool ownCache = cache is null;
        if (cache is null)
        {
            cache = Model.CreateCache();
            FillPrefix(cache, config, encoder, batch);
        }
        else if (cache.Length == 0)
        {
            FillPrefix(cache, config, encoder, batch);
        }
        try
        {
            var mask = input.AttentionMask;
            // A mask that leaves out the virtual tokens gets ones for them, as PEFT prepends.
            // (The cache length is that of the first layer run: with StartLayer the early layers may be ahead.)
            if (mask is not null && mask.shape[1] == cache.LayerLength(input.StartLayer) + time - n)
                mask = torch.cat([torch.ones(batch, n, dtype: mask.dtype, device: mask.device), mask], 1);
            return Model.forward(input with { AttentionMask = mask, Cache = cache });
        }
        finally
        {
            if (ownCache) cache.Dispose();
        }
    }

    // ---------------------------------------------------------------- parameters

    /// <summary>(trainable, all) parameter counts as PEFT's get_nb_trainable_parameters (shared tensors counted once).</summary>
    public (long Trainable, long All) CountParameters()
    {
        var seen = new HashSet<IntPtr>();
        long trainable = 0, all = 0;
        foreach (var p in parameters())
        {
            if (!seen.Add(p.Handle)) continue;
            all += p.numel();
            if (p.requires_grad) trainable += p.numel();
        }
        return (trainable, all);
    }

    /// <summary>PEFT's print_trainable_parameters line: <c>trainable params: N || all params: M || trainable%: P</c>.</summary>
    public string TrainableParametersLine()
    {
        var (t, a) = CountParameters();
        var ci = CultureInfo.InvariantCulture;
        return $"trainable params: {t.ToString("N0", ci)} || all params: {a.ToString("N0", ci)} || trainable%: {(a == 0 ? 0 : 100.0 * t / a).ToString("F4", ci)}";
    }

    /// <summary>Writes <see cref="TrainableParametersLine"/> to the console.</summary>
    public void PrintTrainableParameters() => Console.WriteLine(TrainableParametersLine());

    /// <summary>The parameters an optimiser should update (those with requires_grad).</summary>
    public IEnumerable<Parameter> TrainableParameters()
    {
        var seen = new HashSet<IntPtr>();
        foreach (var p in parameters())
            if (p.requires_grad && seen.Add(p.Handle)) yield return p;
    }

    // ---------------------------------------------------------------- files

    /// <summary>
    /// Each tensor of one adapter under the name PEFT writes to adapter_model.safetensors, bound to the live
    /// Parameter (or, for a projected prefix, to nothing: see <see cref="SaveTensors"/>).
    /// </summary>
    public IReadOnlyDictionary<string, Parameter> AdapterTensors(string adapterName)
    {
        if (!_configs.TryGetValue(adapterName, out var config)) throw new ArgumentException($"no adapter named '{adapterName}'");
        var map = new SortedDictionary<string, Parameter>(StringComparer.Ordinal);
        foreach (var (path, layer) in _layers)
        {
            var module = Prefix + path;
            switch (layer)
            {
                case LoraLinear lora when lora.lora_A.Contains(adapterName):
                    map[module + ".lora_A.weight"] = lora.A(adapterName).weight!;
                    map[module + ".lora_B.weight"] = lora.B(adapterName).weight!;
                    if (lora.IsDora(adapterName)) map[module + ".lora_magnitude_vector"] = lora.Magnitude(adapterName);
                    break;
                case LoraEmbedding emb when emb.lora_embedding_A.Contains(adapterName):
                    // PEFT's ParameterDict entries: the file drops the adapter name.
                    map[module + ".lora_embedding_A"] = emb.A(adapterName);
                    map[module + ".lora_embedding_B"] = emb.B(adapterName);
                    if (emb.IsDora(adapterName)) map[module + ".lora_magnitude_vector"] = emb.Magnitude(adapterName);
                    break;
                case BottleneckLinear bn when bn.adapter_down.Contains(adapterName):
                    // LLM-Adapters' names: the adapter's tensors sit directly under the adapted module.
                    map[module + ".adapter_down.weight"] = bn.Down(adapterName).weight!;
                    map[module + ".adapter_up.weight"] = bn.Up(adapterName).weight!;
                    if (bn.adapter_scaling.Contains(adapterName)) map[module + ".adapter_scaling"] = bn.adapter_scaling[adapterName];
                    break;
                case ModulesToSaveWrapper saved when saved.modules_to_save.Contains(adapterName):
                    // PEFT writes the trained copy under the module's own name.
                    foreach (var (n, p) in ((nn.Module)saved.Copy(adapterName)).named_parameters())
                        map[module + "." + n] = p;
                    break;
                case IA3Linear ia3 when ia3.ia3_l.Contains(adapterName):
                    map[module + ".ia3_l"] = ia3.Vector(adapterName);
                    break;
            }
        }
        if (config is LoraConfig { Bias: not "none" } lc)
        {
            // As PEFT: bias "all" saves every bias, "lora_only" those of LoRA-wrapped layers.
            foreach (var (name, p) in Model.named_parameters())
            {
                if (!name.EndsWith("bias", StringComparison.Ordinal)) continue;
                bool inLora = name.EndsWith(".base_layer.bias", StringComparison.Ordinal) && _layers.ContainsKey(name[..^".base_layer.bias".Length]);
                if (lc.Bias == "all" || inLora) map[Prefix + name] = p;
            }
        }
        if (config is PromptTuningConfig) map["prompt_embeddings"] = ((PromptEmbedding)prompt_encoder[adapterName]).embedding.weight!;
        if (config is PromptEncoderConfig && !((PromptEncoder)prompt_encoder[adapterName]).Projected)
            map["prompt_embeddings"] = ((PromptEncoder)prompt_encoder[adapterName]).embedding.weight!;
        if (config is PrefixTuningConfig && !((PrefixEncoder)prompt_encoder[adapterName]).Projected)
            map["prompt_embeddings"] = ((PrefixEncoder)prompt_encoder[adapterName]).embedding.weight!;
        return map;
    }

    private List<KeyValuePair<string, Tensor>> SaveTensors(string adapterName)
    {
        var list = AdapterTensors(adapterName).Select(kv => new KeyValuePair<string, Tensor>(kv.Key, kv.Value)).ToList();
        if (_configs[adapterName] is PrefixTuningConfig && prompt_encoder[adapterName] is PrefixEncoder { Projected: true } enc)
        {
            // PEFT saves a projected prefix as the table the MLP computes.
            using var no = torch.no_grad();
            list.Add(new("prompt_embeddings", enc.Table().detach()));
        }
        if (_configs[adapterName] is PromptEncoderConfig && prompt_encoder[adapterName] is PromptEncoder { Projected: true } pt)
        {
            using var no = torch.no_grad();
            list.Add(new("prompt_embeddings", pt.Tokens().detach()));
        }
        return list;
    }

    /// <summary>
    /// PEFT's save_pretrained: the default adapter into <paramref name="directory"/>, any other adapter into
    /// <paramref name="directory"/>/&lt;name&gt;; each as adapter_config.json + adapter_model.safetensors.
    /// </summary>
    public void SavePretrained(string directory, IEnumerable<string>? adapterNames = null)
    {
        EnsureUsable();
        foreach (var name in adapterNames ?? _configs.Keys)
        {
            var config = _configs[name];
            var folder = name == DefaultAdapter ? directory : Path.Combine(directory, name);
            Directory.CreateDirectory(folder);
            var tensors = SaveTensors(name);
            AtomicFile.Write(Path.Combine(folder, WeightsFile),
                tmp => SafetensorsWriter.Save(tmp, tensors, new Dictionary<string, string> { ["format"] = "pt" }));
            bool inference = config.InferenceMode;
            config.InferenceMode = true; // PEFT writes inference_mode true
            try { config.Save(folder); }
            finally { config.InferenceMode = inference; }
        }
    }

    private void LoadWeights(string adapterName, SafetensorsFile file)
    {
        var expected = AdapterTensors(adapterName);
        var config = _configs[adapterName];
        string where = file.Path;
        using var no = torch.no_grad();
        var embeddingLayers = SavedEmbeddingLayers();
        foreach (var name in file.Names.Order(StringComparer.Ordinal))
        {
            if (!expected.TryGetValue(name, out var target))
            {
                // PEFT's save_embedding_layers (on by default when an embedding is a LoRA target, or the vocabulary was
                // resized) stores the full input/output embedding matrices beside the adapter; PEFT loads them into the
                // model, and so does this.
                if (embeddingLayers.TryGetValue(name, out var layer))
                {
                    var shape = file.Entry(name).Shape;
                    if (layer is null)
                    {
                        // A tied head has no matrix of its own: the input embedding's entry sets both.
                        continue;
                    }
                    if (!shape.SequenceEqual(layer.shape))
                        throw new InvalidDataException(
                            $"{where}: embedding tensor '{name}' has shape [{string.Join(", ", shape)}], but {Model.GetType().Name} has [{string.Join(", ", layer.shape)}] (the adapter was trained with a resized vocabulary; resize the model's embeddings to {shape[0]} tokens first)");
                    using var embedding = file.Load(name);
                    layer.copy_(embedding);
                    continue;
                }
                throw new InvalidDataException($"{where}: {DescribeUnexpected(name, config)}");
            }
            var entry = file.Entry(name);
            if (!entry.Shape.SequenceEqual(target.shape))
                throw new InvalidDataException(
                    $"{where}: tensor '{name}' has shape [{string.Join(", ", entry.Shape)}], but {Model.GetType().Name} needs [{string.Join(", ", target.shape)}]");
            using var source = file.Load(name);
            target.copy_(source);
        }
        var missing = expected.Keys.FirstOrDefault(k => !file.Contains(k));
        if (missing is not null)
            throw new InvalidDataException($"{where}: tensor '{missing}' is missing (the adapter_config.json selects module '{ModuleOf(missing)}')");
    }

    /// <summary>
    /// The names under which PEFT saves the input and output embedding matrices (save_embedding_layers), with the
    /// Parameter each loads into; null for a tied output head, which has none of its own.
    /// </summary>
    private Dictionary<string, Parameter?> SavedEmbeddingLayers()
    {
        var result = new Dictionary<string, Parameter?>(StringComparer.Ordinal);
        var head = OutputHeadPath();
        var parameters = Model.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        foreach (var (path, module) in ModuleSurgery.Modules(Model))
        {
            bool embedding = module is TorchSharp.Modules.Embedding && TokenEmbeddingNames.Contains(OwnerName(path));
            bool isHead = path == head || path == head + ".base_layer" || path == head + ".original_module";
            if (!embedding && !isHead) continue;
            if (parameters.TryGetValue(path + ".weight", out var weight)) result[Prefix + path + ".weight"] = weight;
            else if (module is TiedLMHead) result[Prefix + path + ".weight"] = null;
        }
        return result;
    }

    // The token embeddings of the families (get_input_embeddings in transformers); the model's own name, so that a
    // LoRA-wrapped or trained copy (…embed_tokens.base_layer / .original_module) is found by its owner's name.
    private static readonly HashSet<string> TokenEmbeddingNames = ["embed_tokens", "wte", "word_embeddings", "embed_in"];

    private static string OwnerName(string path)
    {
        foreach (var wrapperPart in new[] { ".base_layer", ".original_module" })
            if (path.EndsWith(wrapperPart, StringComparison.Ordinal)) path = path[..^wrapperPart.Length];
        return path[(path.LastIndexOf('.') + 1)..];
    }

    private static string ModuleOf(string tensorName)
    {
        var n = tensorName.StartsWith(Prefix, StringComparison.Ordinal) ? tensorName[Prefix.Length..] : tensorName;
        foreach (var suffix in new[] { ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".ia3_l", ".adapter_down.weight", ".adapter_up.weight", ".adapter_scaling", ".lora_embedding_A", ".lora_embedding_B" })
            if (n.EndsWith(suffix, StringComparison.Ordinal)) return n[..^suffix.Length];
        return n;
    }

    private string DescribeUnexpected(string name, PeftConfig config)
    {
        if (!name.StartsWith(Prefix, StringComparison.Ordinal))
            return $"unexpected tensor '{name}' for a {config.PeftType} adapter";
        var module = ModuleOf(name);
        bool exists;
        try { ModuleSurgery.Find(Model, module); exists = true; }
        catch (ArgumentException) { exists = false; }
        if (!exists)
            return $"tensor '{name}' is for module '{module}', which {Model.GetType().Name} does not have (an adapter for another model family?)";
        return $"tensor '{name}' is for module '{module}', which adapter_config.json does not select (or it needs a feature not in the config)";
    }

    // ---------------------------------------------------------------- merging

    /// <summary>Folds the active adapter into the base weights (LoRA, DoRA, IA3); forward then costs nothing extra.</summary>
    public void Merge()
    {
        EnsureUsable();
        EnsureMergeable();
        foreach (var layer in _layers.Values) layer.Merge(_active);
    }

    /// <summary>Takes every merged adapter back out of the base weights.</summary>
    public void Unmerge()
    {
        EnsureUsable();
        foreach (var layer in _layers.Values)
            while (layer.MergedAdapters.Count > 0) layer.UnmergeLast();
    }

    /// <summary>
    /// PEFT's merge_and_unload: merges the active adapter, puts the original modules back and returns the plain
    /// model (save it with <see cref="AutoModel.Save"/>). This PeftModel is unusable afterwards.
    /// </summary>
    public CausalLM MergeAndUnload()
    {
        EnsureUsable();
        EnsureMergeable();
        foreach (var layer in _layers.Values)
            if (!layer.MergedAdapters.Contains(_active)) layer.Merge(_active);
        return Unload();
    }

    /// <summary>Puts the original modules back without merging (PEFT's unload) and returns the plain model.</summary>
    public CausalLM Unload()
    {
        EnsureUsable();
        foreach (var (path, layer) in _layers)
        {
            // A module trained in full comes back as its trained copy (PEFT's unload does the same).
            var restored = layer is ModulesToSaveWrapper { ActiveAdapters.Count: > 0 } saved && !AdaptersDisabled
                ? saved.Copy(saved.ActiveAdapters[0])
                : layer.BaseLayer;
            // A trained copy of a tied head is a Linear of its own: the unloaded model no longer ties them.
            if (layer.BaseLayer is TiedLMHead && restored is not TiedLMHead) Model.Config.TieWordEmbeddings = false;
            ModuleSurgery.Replace(Model, path, (nn.Module)restored);
        }
        _layers.Clear();
        _unloaded = true;
        var model = Model;
        foreach (var p in model.parameters()) p.requires_grad = false;
        return model;
    }

    private void EnsureMergeable()
    {
        if (_configs.Count == 0) throw new InvalidOperationException("no adapter to merge");
        if (_configs[_active] is not (LoraConfig or IA3Config))
            throw new NotSupportedException($"{_configs[_active].PeftType} adapters cannot be merged into the weights");
        // PEFT would merge and so silently change the tied output head as well; refuse instead.
        if (Model.Config.TieWordEmbeddings && _layers.Values.Any(l => l is LoraEmbedding e && e.lora_embedding_A.Contains(_active)))
            throw new NotSupportedException(
                $"adapter '{_active}' has LoRA on the token embedding, which the output head shares (tie_word_embeddings); merging would change the head too, so keep it unmerged");
    }

    private void EnsureUsable()
    {
        if (_unloaded) throw new InvalidOperationException("this PeftModel was unloaded; use the model Unload/MergeAndUnload returned");
    }

    private sealed class Restore(Action action) : IDisposable
    {
        private Action? _action = action;
        public void Dispose() { _action?.Invoke(); _action = null; }
    }
}

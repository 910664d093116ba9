using AdapterFlow.Data;
using AdapterFlow.IO;

namespace AdapterFlow.Training;

/// <summary>
/// A data file read for one training objective — instruction or chat records for "sft", text for "pretrain",
/// preference pairs for "dpo" — and turned into <see cref="Example"/>s with a chat template. What
/// <c>adapterflow train</c> does with --data and --eval-data.
/// </summary>
public sealed class TrainingRecords
{
    private TrainingRecords(string path, DataShape shape, IReadOnlyList<string> problems) { Path = path; Shape = shape; Problems = problems; }

    public string Path { get; }
    public DataShape Shape { get; }

    /// <summary>Bad records that were skipped ("file:line: …").</summary>
    public IReadOnlyList<string> Problems { get; }

    private IReadOnlyList<InstructionExample> _instructions = [];
    private IReadOnlyList<ChatExample> _chats = [];
    private IReadOnlyList<PreferenceExample> _pairs = [];
    private IReadOnlyList<TextDocument> _texts = [];

    /// <summary>Number of usable records.</summary>
    public int Count => _instructions.Count + _chats.Count + _pairs.Count + _texts.Count;

    /// <summary>Reads <paramref name="path"/>, whose records must suit <paramref name="objective"/> (sft, pretrain or dpo).</summary>
    public static TrainingRecords Load(string path, string objective, BadRecordPolicy policy)
    {
        var shape = DataFile.DetectShape(path);
        string Mismatch(string what, string suggestion) => $"{path}: holds {what}, which --objective {objective} cannot use ({suggestion})";
        switch (objective)
        {
            case "sft" when shape == DataShape.Instruction:
                var instructions = InstructionDataset.Load(path, policy);
                return new TrainingRecords(path, shape, instructions.Problems) { _instructions = instructions.Items };
            case "sft" when shape == DataShape.Chat:
                var chats = ChatDataset.Load(path, policy);
                return new TrainingRecords(path, shape, chats.Problems) { _chats = chats.Items };
            case "sft":
                throw new InvalidDataException(shape == DataShape.Preference
                    ? Mismatch("preference pairs", "use --objective dpo")
                    : Mismatch("plain text", "use --objective pretrain, or give {instruction, output} or {messages} records"));
            case "pretrain" when shape == DataShape.Text:
                var texts = TextCorpus.Load(path, policy);
                return new TrainingRecords(path, shape, texts.Problems) { _texts = texts.Items };
            case "pretrain":
                throw new InvalidDataException(Mismatch($"{shape.ToString().ToLowerInvariant()} records", "pretraining reads a .txt file or {text} records"));
            case "dpo" when shape == DataShape.Preference:
                var pairs = PreferenceDataset.Load(path, policy);
                return new TrainingRecords(path, shape, pairs.Problems) { _pairs = pairs.Items };
            case "dpo":
                throw new InvalidDataException(Mismatch($"{shape.ToString().ToLowerInvariant()} records", "DPO reads {prompt, chosen, rejected} records"));
            default:
                throw new ArgumentException($"unknown objective '{objective}' (expected sft, pretrain or dpo)");
        }
    }

    /// <summary>
    /// The template used when none is named: none for instruction data (LLM-Adapters' Alpaca prompt) and text;
    /// for chat and preference data the built-in matching the tokenizer's chat_template (a note is written to
    /// <paramref name="notes"/>), else an error asking for one.
    /// </summary>
    public static ChatTemplate? DefaultTemplate(DataShape shape, ITokenizer tokenizer, TextWriter? notes = null)
    {
        if (shape is DataShape.Instruction or DataShape.Text) return null;
        var jinja = (tokenizer as HFTokenizer)?.ChatTemplate;
        var detected = ChatTemplate.Detect(jinja);
        if (detected is not null)
        {
            notes?.WriteLine($"chat template: {detected.Name} (recognised in the model's tokenizer_config.json chat_template)");
            return detected;
        }
        throw new ArgumentException(jinja is null
            ? $"the model has no chat_template; choose a chat template with --chat-template ({string.Join(", ", ChatTemplate.BuiltInNames)} or a template file)"
            : $"the model's chat_template is not one of the known formats; choose one with --chat-template ({string.Join(", ", ChatTemplate.BuiltInNames)} or a template file)");
    }

    /// <summary>
    /// Token sequences: SFT examples (the Alpaca template, or none, through <see cref="SftTokenizer"/>; any
    /// other template or chat data through <see cref="ChatTokenizer"/>), packed pretraining blocks of
    /// cutoff_len tokens, or DPO pairs. Records the template cannot hold, and pairs truncation left without a
    /// reply, go to <paramref name="problems"/> (or throw under <see cref="BadRecordPolicy.Fail"/>).
    /// </summary>
    public TokenizedDataset Tokenize(ITokenizer tokenizer, ChatTemplate? template, TrainRecipe recipe, BadRecordPolicy policy, ICollection<string> problems)
    {
        var sft = recipe.ToSftOptions();
        switch (Shape)
        {
            case DataShape.Instruction when template is null || template.Name == "alpaca":
                return SftTokenizer.Tokenize(_instructions, tokenizer, sft);
            case DataShape.Instruction:
                return ChatTokenizer.Tokenize(_instructions, template, tokenizer, sft, policy, problems);
            case DataShape.Chat:
                return ChatTokenizer.Tokenize(_chats, template ?? throw new ArgumentException("chat data needs a chat template"), tokenizer, sft, policy, problems);
            case DataShape.Text:
                return SftTokenizer.Pack(_texts.Select(t => t.Text), tokenizer, sft.CutoffLength);
            case DataShape.Preference:
                var pairs = ChatTokenizer.TokenizePairs(_pairs, template ?? throw new ArgumentException("preference data needs a chat template"), tokenizer, sft.CutoffLength, policy);
                foreach (var problem in pairs.Problems) problems.Add(problem);
                return new TokenizedDataset(pairs.Pairs, pairs.TruncatedPairs, 0);
            default:
                throw new InvalidOperationException($"unknown data shape {Shape}");
        }
    }
}

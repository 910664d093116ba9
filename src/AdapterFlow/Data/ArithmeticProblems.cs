using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace AdapterFlow.Data;

/// <summary>The operation an arithmetic word problem asks for.</summary>
public enum ArithmeticOperation
{
    Addition,
    Subtraction,
    Multiplication,
}

/// <summary>
/// Number ranges of generated problems. The defaults keep every product (up to 25) among the numbers addition
/// problems reach (up to 26), so a model pretrained on addition and subtraction has seen every number a
/// multiplication answer can be, and keep the tables small enough for a tiny model to learn in a minute.
/// </summary>
public sealed record ArithmeticRanges
{
    /// <summary>Operands of an addition: each in [1, this]; sums up to twice this.</summary>
    public int MaxAddend { get; init; } = 13;

    /// <summary>A subtraction starts from a number in [2, this] and takes away less than it.</summary>
    public int MaxMinuend { get; init; } = 20;

    /// <summary>Factors of a multiplication: each in [2, this].</summary>
    public int MaxFactor { get; init; } = 5;

    public void Validate()
    {
        if (MaxAddend < 1) throw new ArgumentException($"MaxAddend must be at least 1, got {MaxAddend}");
        if (MaxMinuend < 2) throw new ArgumentException($"MaxMinuend must be at least 2, got {MaxMinuend}");
        if (MaxFactor < 2) throw new ArgumentException($"MaxFactor must be at least 2, got {MaxFactor}");
    }
}

/// <summary>A training split and a held-out split whose problems (instruction texts) never coincide.</summary>
public sealed record ProblemSplit(IReadOnlyList<MathItem> Train, IReadOnlyList<MathItem> HeldOut);

/// <summary>
/// Templated arithmetic word problems with chain-of-thought answers ending "The answer is N.", in LLM-Adapters'
/// math item shape ({instruction, input, output, answer}) so the same loaders, trainer and
/// <see cref="Evaluation.MathEvaluator"/> handle them as they handle gsm8k or SVAMP. Generation is seeded (same
/// seed, same problems on every machine: <see cref="Random"/> with a seed is stable across .NET versions) and
/// the quickstart uses it to pretrain on addition and subtraction, then teach multiplication with an adapter.
/// Written for this project.
/// </summary>
public static class ArithmeticProblems
{
    private static readonly string[] Names =
    [
        "Tom", "Lily", "Sam", "Mia", "Ben", "Anna", "Leo", "Emma", "Max", "Zoe", "Jack", "Nora", "Omar", "Ruth", "Ivan",
        "Lucy", "Paul", "Rosa", "Hugo", "Ella",
    ];

    // (plural, container) pairs: "boxes of apples".
    private static readonly (string Things, string Container)[] Things =
    [
        ("apples", "box"), ("pencils", "pack"), ("marbles", "bag"), ("stickers", "sheet"), ("cookies", "jar"),
        ("books", "shelf"), ("eggs", "carton"), ("flowers", "vase"), ("coins", "purse"), ("shells", "bucket"),
        ("cards", "deck"), ("stamps", "album"), ("grapes", "bunch"), ("balloons", "bundle"), ("crayons", "tin"),
    ];

    private static string Plural(string container) => container switch
    {
        "box" => "boxes",
        "shelf" => "shelves",
        "bunch" => "bunches",
        "purse" => "purses",
        _ => container + "s",
    };

    /// <summary>
    /// One problem of <paramref name="operation"/> drawn from <paramref name="random"/>: one of several templates,
    /// names, objects and numbers in <paramref name="ranges"/>. <see cref="MathItem.Index"/> is 0; lists renumber.
    /// </summary>
    public static MathItem Create(ArithmeticOperation operation, Random random, ArithmeticRanges? ranges = null)
    {
        ArgumentNullException.ThrowIfNull(random);
        ranges ??= new ArithmeticRanges();
        ranges.Validate();
        string name = Names[random.Next(Names.Length)];
        string friend = Names[random.Next(Names.Length)];
        if (friend == name) friend = Names[(Array.IndexOf(Names, name) + 1) % Names.Length];
        var (things, container) = Things[random.Next(Things.Length)];
        int template = random.Next(3);
        string instruction, reasoning;
        int answer;
        // The answers are short on purpose: a tiny model learns the arithmetic, not long sentences. Multiplication is
        // written as repeated addition, so its answers use only tokens pretraining has taught ("+", "=", numbers):
        // what the adapter must learn is the skill, not new words.
        switch (operation)
        {
            case ArithmeticOperation.Addition:
            {
                int a = random.Next(1, ranges.MaxAddend + 1), b = random.Next(1, ranges.MaxAddend + 1);
                answer = a + b;
                instruction = template switch
                {
                    0 => $"{name} has {a} {things}. {friend} gives {name} {b} more {things}. How many {things} does {name} have now?",
                    1 => $"{name} picked {a} {things} in the morning and {b} {things} in the afternoon. How many {things} did {name} pick in all?",
                    _ => $"There are {a} {things} on the table and {name} puts {b} more there. How many {things} are on the table?",
                };
                reasoning = $"{a} + {b} = {answer}.";
                break;
            }
            case ArithmeticOperation.Subtraction:
            {
                int a = random.Next(2, ranges.MaxMinuend + 1), b = random.Next(1, a);
                answer = a - b;
                instruction = template switch
                {
                    0 => $"{name} has {a} {things} and gives {b} of them to {friend}. How many {things} does {name} have left?",
                    1 => $"A shop had {a} {things}. It sold {b} {things} today. How many {things} does the shop have now?",
                    _ => $"{name} needs {a} {things} and already has {b}. How many more {things} does {name} need?",
                };
                reasoning = $"{a} - {b} = {answer}.";
                break;
            }
            case ArithmeticOperation.Multiplication:
            {
                int a = random.Next(2, ranges.MaxFactor + 1), b = random.Next(2, ranges.MaxFactor + 1);
                answer = a * b;
                string containers = Plural(container);
                instruction = template switch
                {
                    0 => $"{name} has {a} {containers} of {things}. Each {container} holds {b} {things}. How many {things} does {name} have?",
                    1 => $"{name} buys {a} {containers} of {things} with {b} {things} in each {container}. How many {things} did {name} buy?",
                    _ => $"There are {a} {containers} and each {container} has {b} {things} in it. How many {things} are there in all?",
                };
                // a groups of b: b + b + ... (a times).
                reasoning = string.Join(" + ", Enumerable.Repeat(b.ToString(CultureInfo.InvariantCulture), a)) + $" = {answer}.";
                break;
            }
            default:
                throw new ArgumentOutOfRangeException(nameof(operation), operation, "unknown operation");
        }
        string label = answer.ToString(CultureInfo.InvariantCulture);
        return new MathItem(0, instruction, "", $"{reasoning} The answer is {label}.", label);
    }

    /// <summary>
    /// <paramref name="trainCount"/> + <paramref name="heldOutCount"/> distinct problems (no instruction text twice)
    /// of the given operations, taken in turn, from one generator seeded with <paramref name="seed"/>; the first
    /// <paramref name="heldOutCount"/> distinct ones are held out, so the held-out set does not depend on how
    /// many training problems are asked for. Problems in <paramref name="exclude"/> (by instruction) are never
    /// produced, which keeps further sets disjoint from earlier ones.
    /// </summary>
    public static ProblemSplit Split(IReadOnlyList<ArithmeticOperation> operations, int trainCount, int heldOutCount, int seed,
        ArithmeticRanges? ranges = null, IEnumerable<MathItem>? exclude = null)
    {
        ArgumentNullException.ThrowIfNull(operations);
        if (operations.Count == 0) throw new ArgumentException("give at least one operation");
        if (trainCount < 0) throw new ArgumentException($"trainCount must be non-negative, got {trainCount}");
        if (heldOutCount < 0) throw new ArgumentException($"heldOutCount must be non-negative, got {heldOutCount}");
        var random = new Random(seed);
        var seen = new HashSet<string>((exclude ?? []).Select(i => i.Instruction), StringComparer.Ordinal);
        var heldOut = new List<MathItem>(heldOutCount);
        var train = new List<MathItem>(trainCount);
        int wanted = trainCount + heldOutCount;
        // Repeats grow as the templates' space is used up; this many in a row means it is (nearly) exhausted.
        const int MaxRepeatsInARow = 10_000;
        int repeats = 0;
        while (heldOut.Count + train.Count < wanted)
        {
            var item = Create(operations[(heldOut.Count + train.Count) % operations.Count], random, ranges);
            if (!seen.Add(item.Instruction))
            {
                if (++repeats >= MaxRepeatsInARow)
                    throw new ArgumentException(
                        $"could only find {heldOut.Count + train.Count} distinct {string.Join("/", operations)} problems of the {wanted} asked for; ask for fewer or widen the number ranges");
                continue;
            }
            repeats = 0;
            if (heldOut.Count < heldOutCount) heldOut.Add(item with { Index = heldOut.Count });
            else train.Add(item with { Index = train.Count });
        }
        return new ProblemSplit(train, heldOut);
    }

    /// <summary>The items as training examples (the same instruction, input and output).</summary>
    public static IReadOnlyList<InstructionExample> AsExamples(IEnumerable<MathItem> items, string source = "generated") =>
        items.Select(i => new InstructionExample(i.Instruction, i.Input, i.Output, source, i.Index + 1)).ToArray();

    /// <summary>
    /// Writes the items as a JSON array of {instruction, input, output, answer} — the layout of LLM-Adapters' math
    /// sets, so <see cref="MathDataset.Load"/>, <see cref="InstructionDataset.Load"/> and <c>adapterflow eval --dataset FILE</c> read it.
    /// </summary>
    public static void Save(IEnumerable<MathItem> items, string path)
    {
        var array = new JsonArray(items.Select(i => (JsonNode?)new JsonObject
        {
            ["instruction"] = i.Instruction,
            ["input"] = i.Input,
            ["output"] = i.Output,
            ["answer"] = i.Answer,
        }).ToArray());
        var directory = Path.GetDirectoryName(Path.GetFullPath(path));
        if (directory is not null) Directory.CreateDirectory(directory);
        IO.AtomicFile.WriteAllText(path, array.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
    }
}

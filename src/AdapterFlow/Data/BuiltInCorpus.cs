using System.Globalization;

namespace AdapterFlow.Data;

/// <summary>
/// A small English and arithmetic corpus shipped with the library, so that fresh models get a usable
/// tokenizer (and the quickstart something to learn) without any download. Written for this project.
/// </summary>
public static class BuiltInCorpus
{
    private static readonly string[] Sentences =
    [
        "The sun rose over the quiet village, and the baker opened his shop.",
        "A small dog ran across the field to meet the children coming home from school.",
        "She wrote a letter to her brother, who lived by the sea.",
        "Every morning the old man fed the birds in the park.",
        "The train was late, so we waited on the platform and talked about the weather.",
        "He learned to play the piano when he was seven years old.",
        "The river flows from the mountains to the sea.",
        "Water boils at one hundred degrees Celsius at sea level.",
        "There are seven days in a week and twelve months in a year.",
        "The library is open from nine in the morning until six in the evening.",
        "Tom and Lily built a sand castle on the beach, and the waves washed it away.",
        "Once upon a time, a little girl found a shiny stone in the garden.",
        "The cat sat by the window and watched the rain fall.",
        "If you add two apples to three apples, you have five apples.",
        "A triangle has three sides, and a square has four.",
        "The teacher asked the class to read the first chapter of the book.",
        "We planted tomatoes, beans and carrots in the spring.",
        "The moon goes around the earth about once a month.",
        "It was a cold winter night, and the stars were bright above the hills.",
        "The team worked together to finish the project before the deadline.",
        "Please close the door when you leave the room.",
        "Reading every day makes it easier to learn new words.",
        "The farmer counted his sheep: one, two, three, four, five.",
        "Computers follow instructions written as programs.",
        "A good question is often more useful than a quick answer.",
        "The bird built its nest high in the old oak tree.",
        "They walked along the path until they reached the bridge.",
        "Mia was happy because her friend came to visit.",
        "The wind was strong, so the boats stayed in the harbour.",
        "He forgot his umbrella and got wet on the way home.",
        "The children laughed when the clown fell over.",
        "Light travels faster than sound.",
        "The shop sells bread, milk, eggs and fresh fruit.",
        "After dinner, the family played a game of cards.",
        "Numbers can be added, subtracted, multiplied and divided.",
        "Half of ten is five, and double ten is twenty.",
        "The little fox was hungry, so it looked for berries in the forest.",
        "When the bell rang, the students went out to play.",
        "She smiled and said, \"Thank you for your help!\"",
        "Why is the sky blue? Because air scatters blue light more than red light.",
    ];

    /// <summary>English sentences, then simple arithmetic facts ("12 + 7 = 19."), deterministic.</summary>
    public static IReadOnlyList<string> Texts { get; } = Build();

    /// <summary>Arithmetic facts of the form "a op b = c." for small numbers, in a fixed pseudo-random order.</summary>
    public static IEnumerable<string> Arithmetic(int count, int seed = 1234)
    {
        var random = new Random(seed);
        for (int i = 0; i < count; i++)
        {
            int a = random.Next(0, 50), b = random.Next(0, 50);
            yield return (i % 3) switch
            {
                0 => string.Create(CultureInfo.InvariantCulture, $"{a} + {b} = {a + b}."),
                1 => string.Create(CultureInfo.InvariantCulture, $"{Math.Max(a, b)} - {Math.Min(a, b)} = {Math.Max(a, b) - Math.Min(a, b)}."),
                _ => string.Create(CultureInfo.InvariantCulture, $"{a % 13} * {b % 13} = {a % 13 * (b % 13)}."),
            };
        }
    }

    private static IReadOnlyList<string> Build()
    {
        var texts = new List<string>(Sentences);
        texts.AddRange(Arithmetic(300));
        return texts;
    }
}

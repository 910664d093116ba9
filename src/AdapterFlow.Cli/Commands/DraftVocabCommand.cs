using System.CommandLine;
using System.Globalization;
using System.Text.Json.Nodes;
using AdapterFlow.Data;
using AdapterFlow.Generation;

namespace AdapterFlow.Cli.Commands;

/// <summary><c>adapterflow draft-vocab</c>: the most frequent tokens of a corpus, for self-speculative drafts.</summary>
internal static class DraftVocabCommand
{
    public static Command Create(CliContext context)
    {
        var model = CommonOptions.ModelDir("The model folder whose tokenizer.json encodes the corpus; the vocabulary is saved there by default.");
        var data = new Option<string>("--data", "-d")
        {
            Description = "Text like the text the model will write: a data file in any shape `train` reads (.txt, or .json/.jsonl with " +
                          "text, instruction/input/output, messages or preference records).",
            Required = true,
            HelpName = "FILE",
        };
        var size = new Option<int>("--size")
        {
            Description = "Tokens to keep, most frequent first (the tokenizer's EOS is always added).",
            HelpName = "N",
            DefaultValueFactory = _ => 4096,
        }.Check(n => n >= 1, "must be at least 1");
        var output = new Option<string?>("--out", "-o")
        {
            Description = $"Where to write the vocabulary (default: MODEL/{DraftVocabulary.FileName}, which generate and bench-speculative pick up).",
            HelpName = "FILE",
        };
        var json = CommonOptions.Json("Print one JSON object: path, size, vocab_size, corpus_tokens and coverage (the share of the corpus's tokens in the vocabulary).");
        var command = new Command("draft-vocab",
            "Choose the tokens a self-speculative draft may propose: the N most frequent tokens of a corpus. The draft's head then computes " +
            "only their logits (and those of the prompt's and generated tokens), which makes drafts cheaper on models whose LM head is a " +
            "large part of the weights; the verifier still runs the full head, so the output does not change.")
        {
            model, data, size, output, json,
        };
        command.SetAction(parse =>
        {
            var modelDir = parse.GetRequiredValue(model);
            var tokenizer = TextModel.LoadTokenizer(modelDir);
            // A malformed record does not matter to a frequency count: skip it and say so.
            var texts = DraftVocabulary.CorpusTexts(parse.GetRequiredValue(data), BadRecordPolicy.Skip, out int skipped);
            if (skipped > 0) context.Err.WriteLine($"note: skipped {skipped} malformed record(s) of {parse.GetRequiredValue(data)}");
            if (texts.Count == 0) throw new CliUsageException("--data: the file holds no texts");
            int n = parse.GetValue(size);
            var vocabulary = DraftVocabulary.FromTexts(tokenizer, texts, n);
            // Coverage: how often the corpus's next token is in the set (an upper bound on the draft's reach).
            var members = vocabulary.TokenIds.ToHashSet();
            long total = 0, covered = 0;
            foreach (var text in texts)
                foreach (int id in tokenizer.Encode(text, addSpecialTokens: true))
                {
                    total++;
                    if (members.Contains(id)) covered++;
                }
            var path = parse.GetValue(output) ?? Path.Combine(modelDir, DraftVocabulary.FileName);
            vocabulary.Save(path, source: Path.GetFileName(parse.GetRequiredValue(data)));
            double coverage = total == 0 ? 0 : (double)covered / total;
            if (parse.GetValue(json))
                context.WriteJson(new JsonObject
                {
                    ["path"] = path, ["size"] = vocabulary.Count, ["vocab_size"] = tokenizer.VocabSize, ["corpus_tokens"] = total, ["skipped_records"] = skipped,
                    ["coverage"] = Math.Round(coverage, 5),
                });
            else
                context.Out.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"wrote {vocabulary.Count} of {tokenizer.VocabSize} tokens to {path}: they cover {100 * coverage:F2}% of the corpus's {total} tokens"));
            context.Out.Flush();
            return CliApp.Success;
        });
        return command;
    }
}

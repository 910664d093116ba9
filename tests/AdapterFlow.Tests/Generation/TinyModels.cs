using System.Text;
using System.Text.Json.Nodes;
using AdapterFlow.IO;
using AdapterFlow.Models;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace AdapterFlow.Tests.Generation;

/// <summary>Configuration of <see cref="TinyLM"/>.</summary>
internal sealed class TinyConfig : ModelConfig
{
    public override string ModelType => "tiny-test";
    public override string Architecture => "TinyTestForCausalLM";
    public override JsonObject ToJson() => WriteCommon();
}

/// <summary>
/// A one-layer attention model with learned positions, written for generation tests so they run without any
/// model family: it uses the shared mask builder, SDPA and KV cache, so cached decoding, padding and position
/// handling are exercised exactly as in the real families. Weights come from a seed.
/// </summary>
internal sealed class TinyLM : CausalLM
{
    private readonly TinyConfig _config;
    private readonly Embedding wte, wpe;
    private readonly Linear q_proj, k_proj, v_proj, o_proj, lm_head;
    private readonly int _heads, _headDim;

    public TinyLM(int vocab = ByteTokenizer.Size, int hidden = 32, int heads = 4, long seed = 1, double headScale = 4.0,
        int eos = ByteTokenizer.Eos, int pad = ByteTokenizer.Pad) : base("tiny")
    {
        _config = new TinyConfig
        {
            VocabSize = vocab, HiddenSize = hidden, NumHiddenLayers = 1, NumAttentionHeads = heads, NumKeyValueHeads = heads,
            HeadDim = hidden / heads, MaxPositionEmbeddings = 512, EosTokenIds = [eos], PadTokenId = pad, BosTokenId = ByteTokenizer.Bos,
        };
        _heads = heads;
        _headDim = hidden / heads;
        wte = nn.Embedding(vocab, hidden);
        wpe = nn.Embedding(512, hidden);
        q_proj = nn.Linear(hidden, hidden);
        k_proj = nn.Linear(hidden, hidden);
        v_proj = nn.Linear(hidden, hidden);
        o_proj = nn.Linear(hidden, hidden);
        lm_head = nn.Linear(hidden, vocab);
        // Weights from a private generator: the global one is shared by tests running in parallel.
        using (torch.no_grad())
        {
            using var generator = new torch.Generator((ulong)seed);
            foreach (var embedding in new[] { wte, wpe }) embedding.weight!.normal_(0, 1, generator);
            foreach (var linear in new[] { q_proj, k_proj, v_proj, o_proj, lm_head })
            {
                double bound = 1 / Math.Sqrt(linear.weight!.shape[1]);
                linear.weight!.uniform_(-bound, bound, generator);
                linear.bias!.uniform_(-bound, bound, generator);
            }
            // Spread the logits so greedy decisions do not hinge on float noise between cached and uncached runs.
            lm_head.weight!.mul_(headScale);
        }
        RegisterComponents();
        eval();
    }

    public override ModelConfig Config => _config;

    /// <summary>Called before every forward pass (tests use it to act in the middle of a generation).</summary>
    public Action? BeforeForward { get; set; }

    public override ForwardOutput forward(ForwardInput input)
    {
        BeforeForward?.Invoke();
        return base.forward(input);
    }

    public override Tensor EmbedTokens(Tensor inputIds) => wte.forward(inputIds);

    protected override LayerContext Prepare(ForwardInput input, out Tensor hidden)
    {
        var embeds = input.InputsEmbeds ?? EmbedTokens(input.InputIds!);
        long batch = embeds.shape[0], time = embeds.shape[1];
        int past = input.PastLength;
        var positions = input.PositionIds ?? Attention.DefaultPositions(batch, time, past, embeds.device);
        var (mask, causal) = Attention.BuildMask(input.AttentionMask, batch, time, past, embeds.device);
        hidden = embeds + wpe.forward(positions);
        return new LayerContext(mask, causal, positions, input.Cache, past);
    }

    protected override Tensor RunLayer(int index, Tensor hidden, LayerContext context)
    {
        long b = hidden.shape[0], t = hidden.shape[1];
        Tensor Heads(Tensor x) => x.view(b, t, _heads, _headDim).transpose(1, 2);
        var q = Heads(q_proj.forward(hidden));
        var k = Heads(k_proj.forward(hidden));
        var v = Heads(v_proj.forward(hidden));
        if (context.Cache is not null) (k, v) = context.Cache.Append(index, k, v);
        var attn = Attention.Sdpa(q, k, v, context.Mask, context.IsCausal);
        return hidden + o_proj.forward(attn.transpose(1, 2).reshape(b, t, _heads * _headDim));
    }

    protected override Tensor Head(Tensor hidden) => lm_head.forward(hidden);
}

/// <summary>
/// Byte-level tokenizer for tests: ids 0..3 are pad, BOS, EOS and unknown; id 4 + b is byte b. Decoding
/// joins the bytes and reads them as UTF-8, so a character split across tokens decodes to U+FFFD until its
/// last byte arrives — the case incremental decoding must handle.
/// </summary>
internal sealed class ByteTokenizer : ITokenizer
{
    public const int Pad = 0, Bos = 1, Eos = 2, Unk = 3, Offset = 4, Size = 260;

    public int VocabSize => Size;
    public int? BosTokenId => Bos;
    public int? EosTokenId => Eos;
    public int? PadTokenId => Pad;

    public int DecodeCalls { get; private set; }

    public IReadOnlyList<int> Encode(string text, bool addSpecialTokens = false)
    {
        var ids = Encoding.UTF8.GetBytes(text).Select(b => b + Offset).ToList();
        if (addSpecialTokens) ids.Insert(0, Bos);
        return ids;
    }

    public string Decode(IReadOnlyList<int> ids, bool skipSpecialTokens = false)
    {
        DecodeCalls++;
        var text = new StringBuilder();
        var bytes = new List<byte>();
        void FlushBytes()
        {
            text.Append(Encoding.UTF8.GetString(bytes.ToArray()));
            bytes.Clear();
        }
        foreach (var id in ids)
        {
            if (id >= Offset) bytes.Add((byte)(id - Offset));
            else
            {
                FlushBytes();
                if (!skipSpecialTokens) text.Append(id switch { Pad => "<pad>", Bos => "<s>", Eos => "</s>", _ => "<unk>" });
            }
        }
        FlushBytes();
        return text.ToString();
    }

    public bool IsSpecialToken(int id) => id < Offset;
}

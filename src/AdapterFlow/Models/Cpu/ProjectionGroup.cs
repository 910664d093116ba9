namespace AdapterFlow.Models.Cpu;

/// <summary>
/// Several matrix products over one input (q, k and v of a layer; gate and up of its MLP; or one projection alone),
/// with their unmerged LoRA terms, as ONE parallel region instead of one per matrix plus two serial products per
/// adapter. The input is one vector (a decode step) or a few token vectors [time, cols] (verifying drafts, short
/// prompt tails); each weight row is then read once for all of them (<see cref="CpuKernels.Gemm"/>'s row kernel). The work items are, in order: row blocks of every adapter's A (rank × in, into a
/// small scaled rank vector), then row blocks of every base matrix. A base block, once its rows are done, adds its
/// rows of s · B (A x): it first helps finish any A block nobody has claimed yet and waits for the claimed ones, which
/// are short and already running (A items come first, so by then they are almost always done). With
/// <see cref="PairSiluMul"/>, each block computes the same rows of gate and up and ends with gate = silu(gate) · up.
/// <para>
/// Each output row is summed exactly as <see cref="CpuKernels.Gemv"/> (one token) or <see cref="CpuKernels.Gemm"/>
/// (several) sums it (same row kernel, same order), whichever thread runs it, so results do not depend on scheduling. One instance per thread (it holds the call's state).
/// </para>
/// </summary>
internal sealed unsafe class ProjectionGroup
{
    private const int MaxTargets = 4;

    /// <summary>Rows of an adapter's A per work item: a rank-32 A of a 768-wide layer is two items.</summary>
    private const int LowRankBlock = 16;

    private struct Target
    {
        public float* Weight, Bias, Output;
        public int Rows, FirstTerm, Terms;
        public PanelMatrix? Panels; // the weight's panel copy, used for passes over several tokens
    }

    private struct Term
    {
        public float* A, B, Low;
        public int Rank;
        public float Scale;
    }

    private struct Item
    {
        public int Index, Row0, Row1; // Index: a term (A items) or a target (output items; -1 = the gate/up pair)
    }

    private readonly Target[] _targets = new Target[MaxTargets];
    private Term[] _terms = new Term[8];
    private Item[] _items = new Item[64];
    private float[] _low = GC.AllocateArray<float>(256, pinned: true);
    private readonly Action<int> _body;
    private int _targetCount, _termCount, _lowUsed, _lowItems, _itemCount;
    private float* _x;
    private int _cols, _time;
    private bool _pair;
    private int _lowNext, _lowDone;

    public ProjectionGroup() => _body = Body;

    /// <summary>Starts a new group over input x [time, cols] (row-major; outputs are [time, rows]).</summary>
    public void Begin(float* x, int cols, int time = 1)
    {
        _x = x;
        _cols = cols;
        _time = time;
        _targetCount = _termCount = _lowUsed = 0;
        _pair = false;
    }

    /// <summary>y = W x (+ bias) with W row-major [rows, cols]; returns the target's index for <see cref="AddLora"/>.</summary>
    public int AddTarget(float* weight, float* bias, float* y, int rows, PanelMatrix? panels = null)
    {
        if (_targetCount == MaxTargets) throw new InvalidOperationException("a projection group holds at most 4 matrices");
        _targets[_targetCount] = new Target { Weight = weight, Bias = bias, Output = y, Rows = rows, FirstTerm = _termCount, Panels = panels };
        return _targetCount++;
    }

    /// <summary>Adds s · B (A x) to the last target (A: [rank, cols], B: [rows, rank], both row-major).</summary>
    public void AddLora(float* a, float* b, int rank, float scale)
    {
        if (_targetCount == 0) throw new InvalidOperationException("add a target before its LoRA terms");
        if (_termCount == _terms.Length) Array.Resize(ref _terms, _terms.Length * 2);
        _terms[_termCount++] = new Term { A = a, B = b, Rank = rank, Scale = scale };
        _targets[_targetCount - 1].Terms++;
        _lowUsed += rank;
    }

    /// <summary>Targets 0 and 1 (same rows) are gate and up: each block ends with gate = silu(gate) · up.</summary>
    public void PairSiluMul()
    {
        if (_targetCount != 2 || _targets[0].Rows != _targets[1].Rows) throw new InvalidOperationException("the SiLU pair needs exactly two targets with equal rows");
        _pair = true;
    }

    public int TargetCount => _targetCount;

    /// <summary>Runs everything added since <see cref="Begin"/>.</summary>
    public void Run()
    {
        if (_targetCount == 0) return;
        int lowSize = _lowUsed * _time;
        if (_low.Length < lowSize) _low = GC.AllocateArray<float>(Math.Max(lowSize, 2 * _low.Length), pinned: true);
        long work = 0;
        int rows = 0;
        for (int t = 0; t < _targetCount; t++) rows += _targets[t].Rows;
        work += (long)rows * _cols * _time;
        // The array is pinned (allocated so), so its address stays valid after the fixed block.
        fixed (float* low = _low)
        {
            float* next = low;
            for (int i = 0; i < _termCount; i++)
            {
                _terms[i].Low = next;
                next += _terms[i].Rank * _time;
                work += ((long)_terms[i].Rank * _cols + (long)_terms[i].Rank * 64) * _time;
            }
        }
        int workers = CpuKernels.WorkerCount;
        bool parallel = workers > 1 && work >= CpuKernels.ParallelThreshold;

        // Items: A blocks first, then output blocks of about rows / (8 · workers) rows: starting an item costs well
        // under a microsecond, and small items keep the region's tail (one thread done, the other finishing its
        // last item) short. Each matrix is split into equal blocks, so no block is a sliver.
        _itemCount = 0;
        for (int i = 0; i < _termCount; i++)
            for (int r = 0; r < _terms[i].Rank; r += LowRankBlock)
                AddItem(i, r, Math.Min(_terms[i].Rank, r + LowRankBlock));
        _lowItems = _itemCount;
        int rowBlock = parallel ? Math.Max(32, rows / (workers * 8)) : int.MaxValue;
        if (_pair) AddBlocks(-1, _targets[0].Rows, Math.Max(16, rowBlock / 2));
        else
            for (int t = 0; t < _targetCount; t++) AddBlocks(t, _targets[t].Rows, rowBlock);
        _lowNext = _lowDone = 0;
        if (parallel) KernelPool.For(_itemCount, workers, _body);
        else for (int i = 0; i < _itemCount; i++) Body(i);
    }

    /// <summary>
    /// Rows [0, rows) as about equal blocks of at most about <paramref name="rowBlock"/> rows, their bounds on multiples
    /// of 32 (whole panels of a <see cref="PanelMatrix"/>; the row kernels do not mind).
    /// </summary>
    private void AddBlocks(int index, int rows, int rowBlock)
    {
        int blocks = (int)Math.Max(1, ((long)rows + rowBlock - 1) / rowBlock);
        int previous = 0;
        for (int b = 1; b <= blocks; b++)
        {
            int end = b == blocks ? rows : (int)((long)rows * b / blocks / PanelMatrix.Width * PanelMatrix.Width);
            if (end <= previous) continue;
            AddItem(index, previous, end);
            previous = end;
        }
    }

    private void AddItem(int index, int row0, int row1)
    {
        if (_itemCount == _items.Length) Array.Resize(ref _items, _items.Length * 2);
        _items[_itemCount++] = new Item { Index = index, Row0 = row0, Row1 = row1 };
    }

    private void Body(int item)
    {
        if (item < _lowItems)
        {
            ClaimLowRank();
            return;
        }
        var it = _items[item];
        if (it.Index < 0)
        {
            ref var gate = ref _targets[0];
            ref var up = ref _targets[1];
            Rows(ref gate, it.Row0, it.Row1);
            Rows(ref up, it.Row0, it.Row1);
            for (int t = 0; t < _time; t++)
                CpuKernels.SiluMul(gate.Output + (long)t * gate.Rows + it.Row0, up.Output + (long)t * up.Rows + it.Row0, it.Row1 - it.Row0);
        }
        else
        {
            Rows(ref _targets[it.Index], it.Row0, it.Row1);
        }
    }

    /// <summary>Rows [r0, r1) of one target: base product, then its LoRA terms.</summary>
    private void Rows(ref Target target, int r0, int r1)
    {
        if (_time > 1 && target.Panels is { } panels) CpuKernels.PanelRows(panels, _x, target.Output, target.Bias, _time, r0, r1, accumulate: false);
        else Product(target.Weight, _x, target.Output, target.Bias, target.Rows, _cols, r0, r1, accumulate: false);
        if (target.Terms == 0) return;
        FinishLowRank();
        for (int i = target.FirstTerm; i < target.FirstTerm + target.Terms; i++)
        {
            ref var term = ref _terms[i];
            Product(term.B, term.Low, target.Output, null, target.Rows, term.Rank, r0, r1, accumulate: true);
        }
    }

    /// <summary>Rows [r0, r1) of y [time, rows] = x [time, cols] · wᵀ: the one-token kernel for one token, the small GEMM's otherwise.</summary>
    private void Product(float* w, float* x, float* y, float* bias, int rows, int cols, int r0, int r1, bool accumulate)
    {
        if (_time == 1) CpuKernels.GemvRows(w, x, y, bias, cols, r0, r1, accumulate);
        else CpuKernels.GemmRows(w, x, y, bias, rows, cols, _time, r0, r1, accumulate);
    }

    /// <summary>Runs one unclaimed A block, if any is left; false when all are claimed.</summary>
    private bool ClaimLowRank()
    {
        int i = Interlocked.Increment(ref _lowNext) - 1;
        if (i >= _lowItems) return false;
        try
        {
            var it = _items[i];
            ref var term = ref _terms[it.Index];
            Product(term.A, _x, term.Low, null, term.Rank, _cols, it.Row0, it.Row1, accumulate: false);
            for (int t = 0; t < _time; t++)
                for (int r = it.Row0; r < it.Row1; r++) term.Low[t * term.Rank + r] *= term.Scale;
        }
        finally
        {
            Interlocked.Increment(ref _lowDone);
        }
        return true;
    }

    /// <summary>
    /// Returns once every A block is done: claims what is left, then waits for blocks other threads are running
    /// (they never wait on anything, so this cannot deadlock whatever order a scheduler hands out items in).
    /// </summary>
    private void FinishLowRank()
    {
        if (Volatile.Read(ref _lowDone) == _lowItems) return;
        while (ClaimLowRank()) { }
        var spinner = new SpinWait();
        while (Volatile.Read(ref _lowDone) < _lowItems) spinner.SpinOnce(-1);
    }
}

using System.Diagnostics;

namespace AdapterFlow.Models.Cpu;

/// <summary>
/// A small fork-join pool for the decode kernels. A decode step makes ~100 parallel calls of 10–100 µs each, a few
/// microseconds apart; <c>Parallel.For</c> wakes thread-pool threads for each (several µs, more on a busy machine).
/// Here the helper threads spin briefly between calls (the next call is usually microseconds away) and then sleep,
/// so back-to-back calls start at once and an idle pool costs nothing. One call at a time: a second caller (another
/// model decoding on another thread) falls back to <c>Parallel.For</c>.
/// </summary>
internal static class KernelPool
{
    /// <summary>How long an idle helper spins before it sleeps.</summary>
    private static readonly long SpinTicks = Stopwatch.Frequency / 5000; // 200 µs

    private static readonly object Busy = new();
    private static Worker[] _workers = [];

    /// <summary>The current call. Each call is a new object with its own counters, so a helper that wakes late
    /// finds its items all taken and never runs a finished call's body.</summary>
    private static Job? _job;

    private sealed class Job(Action<int> body, int items)
    {
        public readonly Action<int> Body = body;
        public readonly int Items = items;
        public int Next;
        public int Remaining = items;
        public Exception? Error;

        /// <summary>Takes items until none are left.</summary>
        public void Work()
        {
            for (int i; (i = Interlocked.Increment(ref Next) - 1) < Items;)
            {
                try
                {
                    Body(i);
                }
                catch (Exception e)
                {
                    Error ??= e;
                }
                Interlocked.Decrement(ref Remaining);
            }
        }
    }

    /// <summary>When set, calls go to <c>Parallel.For</c> instead (benchmark comparison).</summary>
    public static bool UseParallelFor { get; set; }

    /// <summary>Runs body(0) … body(items − 1) on the calling thread and up to <paramref name="threads"/> − 1 helpers.</summary>
    public static void For(int items, int threads, Action<int> body)
    {
        if (items <= 0) return;
        if (threads <= 1 || items == 1)
        {
            for (int i = 0; i < items; i++) body(i);
            return;
        }
        if (UseParallelFor || !Monitor.TryEnter(Busy))
        {
            Parallel.For(0, items, new ParallelOptions { MaxDegreeOfParallelism = threads }, body);
            return;
        }
        try
        {
            EnsureWorkers(threads - 1);
            var job = new Job(body, items);
            Volatile.Write(ref _job, job);
            for (int w = 0; w < threads - 1; w++) _workers[w].Wake();
            job.Work();
            var spinner = new SpinWait();
            while (Volatile.Read(ref job.Remaining) > 0) spinner.SpinOnce(-1);
            if (job.Error is { } error) throw new AggregateException(error);
        }
        finally
        {
            Monitor.Exit(Busy);
        }
    }

    private static void EnsureWorkers(int count)
    {
        if (_workers.Length >= count) return;
        var workers = new Worker[count];
        Array.Copy(_workers, workers, _workers.Length);
        for (int w = _workers.Length; w < count; w++) workers[w] = new Worker(w);
        _workers = workers;
    }

    private sealed class Worker
    {
        private readonly SemaphoreSlim _wake = new(0);
        private int _sleeping;
        private Job? _seen;

        public Worker(int index)
        {
            _seen = Volatile.Read(ref _job);
            new Thread(Loop) { IsBackground = true, Name = $"AdapterFlow kernel {index + 1}" }.Start();
        }

        public void Wake()
        {
            if (Interlocked.Exchange(ref _sleeping, 0) == 1) _wake.Release();
        }

        private void Loop()
        {
            while (true)
            {
                long start = Stopwatch.GetTimestamp();
                while (Volatile.Read(ref _job) == _seen)
                {
                    if (Stopwatch.GetTimestamp() - start < SpinTicks)
                    {
                        Thread.SpinWait(20);
                        continue;
                    }
                    // Announce the sleep, then look once more: a caller either sees the flag and wakes us, or we see its call.
                    Interlocked.Exchange(ref _sleeping, 1);
                    if (Volatile.Read(ref _job) == _seen) _wake.Wait();
                    Interlocked.Exchange(ref _sleeping, 0);
                    start = Stopwatch.GetTimestamp();
                }
                _seen = Volatile.Read(ref _job);
                _seen?.Work();
            }
        }
    }
}

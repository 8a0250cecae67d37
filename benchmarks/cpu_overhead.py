"""CPU overhead of safeloss: forward+backward of ``SafeCrossEntropyLoss`` vs stock ``nn.CrossEntropyLoss``.

Both run in the same process, interleaved call by call (stock, safe, safe-strict, in a rotating
order), on the same rotated inputs, many times; the report is the ratio of medians and the median
of the per-round paired ratios. Absolute times on a shared 2-core machine are noise; the ratios
are what this measures.

On a busy machine (other processes on the same cores) wall time includes time spent descheduled,
which inflates small, many-op calls at random. ``--threads 1`` runs torch single-threaded, and then
the per-thread CPU clock (``time.thread_time_ns``) counts exactly the work of the call; its ratios
are printed as well ("cpu" columns) and are the more trustworthy ones on a shared box.

Large shapes are also sensitive to glibc malloc: when it hands a freed multi-MB buffer back to
the OS, the next allocation page-faults it in again (kernel time, counted in both clocks). Which
calls pay depends on the order of allocations, so the page faults per call are printed too. To
take the allocator out of the comparison, keep freed memory in the heap:

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296 \
        python benchmarks/cpu_overhead.py --threads 1

    python benchmarks/cpu_overhead.py                 # the three shapes of the core issue
    python benchmarks/cpu_overhead.py --seconds 2     # shorter
    python benchmarks/cpu_overhead.py --threads 1     # + CPU-clock ratios, robust to other load
    python benchmarks/cpu_overhead.py --profile       # + where safeloss spends its extra time

Targets (fp32): (4096, 1000) <= 1.10x, (512, 32000) <= 1.10x, (256, 10) <= 1.5x.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch

CASES: list[tuple[int, int, float]] = [(4096, 1000, 1.10), (512, 32000, 1.10), (256, 10, 1.5)]


def _pool(n: int, c: int, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(n, c, generator=g).requires_grad_(), torch.randint(0, c, (n,), generator=g))
        for _ in range(k)
    ]


def _step(loss_fn: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def run(x: torch.Tensor, t: torch.Tensor) -> None:
        # autograd.grad, not .backward(): no .grad accumulation, the same work for every provider.
        torch.autograd.grad(loss_fn(x, t), (x,))

    return run


def _minor_faults() -> int:
    """Minor page faults of this thread so far (Linux): each is a fresh 4 KiB page the kernel had
    to zero because the allocator returned memory to the OS and took it back."""
    if not hasattr(resource, "RUSAGE_THREAD"):
        return 0
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def measure(n: int, c: int, seconds: float, min_rounds: int = 30) -> dict[str, float]:
    import safeloss

    # Rotate enough copies that the working set exceeds a typical L2 (~1-2 MB/core); the large
    # shapes are far beyond any cache already, so a few copies suffice.
    k = max(2, min(16, (8 << 20) // max(1, n * c * 4)))
    pool = _pool(n, c, k)
    fns = {
        "stock": _step(torch.nn.CrossEntropyLoss()),
        "safe": _step(safeloss.SafeCrossEntropyLoss()),
        "strict": _step(safeloss.SafeCrossEntropyLoss(strict=True)),
    }
    names = list(fns)
    for name in names:  # warm-up: allocator, first-call caches, the weight check cache etc.
        for x, t in pool:
            fns[name](x, t)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, int] = dict.fromkeys(names, 0)
    deadline = time.perf_counter() + seconds
    r = 0
    while r < min_rounds or time.perf_counter() < deadline:
        x, t = pool[r % k]
        order = names[r % 3:] + names[:r % 3]  # rotate who goes first (cache / frequency effects)
        for name in order:
            f0 = _minor_faults()
            c0 = time.thread_time_ns()
            t0 = time.perf_counter_ns()
            fns[name](x, t)
            t1 = time.perf_counter_ns()
            c1 = time.thread_time_ns()
            faults[name] += _minor_faults() - f0
            wall[name].append((t1 - t0) / 1e3)
            cpu[name].append((c1 - c0) / 1e3)
        r += 1
    out: dict[str, float] = {"rounds": r}
    for name in names:
        out[f"faults_{name}"] = faults[name] / r
    for clock, times in (("wall", wall), ("cpu", cpu)):
        for name in names:
            out[f"{clock}_{name}_us"] = statistics.median(times[name])
        for name in ("safe", "strict"):
            out[f"{clock}_{name}_ratio"] = out[f"{clock}_{name}_us"] / out[f"{clock}_stock_us"]
            out[f"{clock}_{name}_paired"] = statistics.median(
                a / b for a, b in zip(times[name], times["stock"]) if b > 0)
    return out


def profile(n: int, c: int, strict: bool) -> None:
    """cProfile of safeloss' fwd+bwd: cumulative time per Python function, top entries.

    cProfile charges each torch op to the Python function that called it, so this attributes the
    extra time to safeloss functions (validation, checks, reduction); its own per-call overhead
    inflates small Python functions, so read it for *where*, and the timings above for *how much*.
    """
    import cProfile
    import pstats

    import safeloss

    fn = _step(safeloss.SafeCrossEntropyLoss(strict=strict))
    calls = 300 if n * c <= 1 << 20 else 20
    pool = _pool(n, c, 2)
    for x, t in pool:
        fn(x, t)
    prof = cProfile.Profile()
    prof.enable()
    for i in range(calls):
        x, t = pool[i % 2]
        fn(x, t)
    prof.disable()
    print(f"\n--- cProfile, ({n}, {c}) fp32, strict={strict}, {calls} calls (times are totals) ---")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="timing budget per shape")
    ap.add_argument("--profile", action="store_true", help="cProfile safeloss at each shape")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # The thread CPU clock misses intra-op worker threads, so it only means something single-threaded.
    clocks = ("wall", "cpu") if torch.get_num_threads() == 1 else ("wall",)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fwd+bwd, mean reduction, fp32; "
          "ratio = median(safeloss) / median(stock); paired = median of per-round ratios")
    print(f"{'shape':>14} {'clock':>5} {'stock us':>10} {'safe us':>10} {'strict us':>10} "
          f"{'safe x':>8} {'strict x':>9} {'paired':>15} {'target':>7} {'rounds':>7}")
    ok = True
    for n, c, target in CASES:
        m = measure(n, c, args.seconds)
        for clock in clocks:
            g = {k.removeprefix(f"{clock}_"): v for k, v in m.items() if k.startswith(f"{clock}_")}
            hit = g["safe_ratio"] <= target and g["strict_ratio"] <= target
            ok &= hit
            print(f"{f'({n}, {c})':>14} {clock:>5} {g['stock_us']:10.1f} {g['safe_us']:10.1f} "
                  f"{g['strict_us']:10.1f} {g['safe_ratio']:7.3f}x {g['strict_ratio']:8.3f}x "
                  f"{g['safe_paired']:6.3f}/{g['strict_paired']:6.3f}x {f'<={target}':>7} "
                  f"{int(m['rounds']):7d}" + ("" if hit else "  MISSED"))
        print(f"{'':>14} page faults per call: stock {m['faults_stock']:.0f}, safe {m['faults_safe']:.0f}, "
              f"strict {m['faults_strict']:.0f}")
        sys.stdout.flush()
    if args.profile:
        for n, c, _ in CASES:
            for strict in (False, True):
                profile(n, c, strict)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

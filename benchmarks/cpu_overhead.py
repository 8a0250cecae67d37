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

    python benchmarks/cpu_overhead.py                 # every case below, then the gradchecks
    python benchmarks/cpu_overhead.py --seconds 2     # shorter
    python benchmarks/cpu_overhead.py --threads 1     # + CPU-clock ratios, robust to other load
    python benchmarks/cpu_overhead.py --profile       # + where safeloss spends its extra time
    python benchmarks/cpu_overhead.py --no-gradcheck  # skip the gradcheck / double backward part

Targets (fp32, fwd+bwd): class indices (4096, 1000) <= 1.10x, (512, 32000) <= 1.10x,
(256, 10) <= 1.5x; per-call overhead at (8, 10) <= 1.25x; probability targets (4096, 1000)
<= 1.10x.

Then small-input autograd checks, where the per-call cost is all there is: gradcheck and
gradgradcheck of ``F.cross_entropy`` and of ``F.linear_cross_entropy`` (its reference path
calls ``F.cross_entropy``) on tiny float64 inputs, stock and under ``safeloss.patch()``, and a
double backward (grad of grad) at (8, 10), stock module vs ``SafeCrossEntropyLoss``. These
report ratios only (no target): the patched calls run every check each time.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch

# (N, C, probability targets, target ratio)
CASES: list[tuple[int, int, bool, float]] = [
    (4096, 1000, False, 1.10), (512, 32000, False, 1.10), (256, 10, False, 1.5),
    (8, 10, False, 1.25), (4096, 1000, True, 1.10),
]


def _pool(n: int, c: int, k: int, prob: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(n, c, generator=g).requires_grad_(),
         torch.randn(n, c, generator=g).softmax(1) if prob else torch.randint(0, c, (n,), generator=g))
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


def measure(n: int, c: int, seconds: float, min_rounds: int = 30, prob: bool = False) -> dict[str, float]:
    import safeloss

    # Rotate enough copies that the working set exceeds a typical L2 (~1-2 MB/core); the large
    # shapes are far beyond any cache already, so a few copies suffice.
    k = max(2, min(16, (8 << 20) // max(1, n * c * 4)))
    pool = _pool(n, c, k, prob)
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


def _paired(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median thread-CPU time of each function in us, called in a rotating order per round."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            c0 = time.thread_time_ns()
            fns[name]()
            times[name].append((time.thread_time_ns() - c0) / 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def gradchecks(rounds: int = 15) -> list[tuple[str, float, float]]:
    """(what, stock us, safeloss us) for the small-input autograd checks (see the docstring).

    Inputs and settings as PyTorch's OpInfo gradient tests use them: float64, a few entries,
    probability targets that require grad, fast mode, batched gradients. ``F.cross_entropy`` is looked up at call time, so ``safeloss.patch()``
    routes it (and the reference path of ``F.linear_cross_entropy``) through safeloss.
    """
    import functools

    from torch.autograd import gradcheck, gradgradcheck

    import safeloss

    # The defaults of PyTorch's own test suite (torch.testing._internal.common_utils.gradcheck).
    gradcheck = functools.partial(gradcheck, fast_mode=True, check_batched_grad=True)
    gradgradcheck = functools.partial(gradgradcheck, fast_mode=True, check_batched_grad=True)
    fn = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 5, (4,), generator=g)
    y = torch.randn(4, 5, dtype=torch.float64, generator=g).softmax(1).requires_grad_()
    h = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    checks: dict[str, Callable[[], object]] = {
        "gradcheck F.cross_entropy, class indices": lambda: gradcheck(lambda a: fn.cross_entropy(a, t), (x,)),
        "gradgradcheck F.cross_entropy, class indices": lambda: gradgradcheck(lambda a: fn.cross_entropy(a, t), (x,)),
        "gradcheck F.cross_entropy, probabilities": lambda: gradcheck(fn.cross_entropy, (x, y)),
        "gradgradcheck F.cross_entropy, probabilities": lambda: gradgradcheck(fn.cross_entropy, (x, y)),
        "gradcheck F.linear_cross_entropy": lambda: gradcheck(lambda a, b: fn.linear_cross_entropy(a, b, t), (h, w)),
        "gradgradcheck F.linear_cross_entropy": lambda: gradgradcheck(lambda a, b: fn.linear_cross_entropy(a, b, t), (h, w)),
    }
    stock_loss, safe_loss = torch.nn.CrossEntropyLoss(), safeloss.SafeCrossEntropyLoss()
    xd, td = _pool(8, 10, 1)[0]

    def double_backward(loss_fn: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            (gx,) = torch.autograd.grad(loss_fn(xd, td), (xd,), create_graph=True)
            return torch.autograd.grad(gx.square().sum(), (xd,))
        return run

    with safeloss.patch():  # the first patch() imports torch._dynamo: outside the timings
        for check in checks.values():
            check()
    out = []
    for what, check in checks.items():
        # Alternating stock and patched calls; patch() and unpatch() themselves (a walk over
        # sys.modules) stay outside the timed interval.
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(rounds):
            for patched in ((False, True) if r % 2 else (True, False)):
                handle = safeloss.patch() if patched else None
                c0 = time.thread_time_ns()
                check()
                times[patched].append((time.thread_time_ns() - c0) / 1e3)
                if handle is not None:
                    safeloss.unpatch()
        out.append((what, statistics.median(times[False]), statistics.median(times[True])))
    m = _paired({"stock": double_backward(stock_loss), "safe": double_backward(safe_loss)}, rounds * 50)
    out.append(("double backward (8, 10) fp32, module", m["stock"], m["safe"]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="timing budget per shape")
    ap.add_argument("--profile", action="store_true", help="cProfile safeloss at each shape")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--min-rounds", type=int, default=30, help="rounds per case at least")
    ap.add_argument("--no-gradcheck", action="store_true", help="skip the small-input autograd checks")
    ap.add_argument("--gradcheck-rounds", type=int, default=15, help="rounds of each autograd check")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # The thread CPU clock misses intra-op worker threads, so it only means something single-threaded.
    clocks = ("wall", "cpu") if torch.get_num_threads() == 1 else ("wall",)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fwd+bwd, mean reduction, fp32; "
          "ratio = median(safeloss) / median(stock); paired = median of per-round ratios")
    print(f"{'case':>19} {'clock':>5} {'stock us':>10} {'safe us':>10} {'strict us':>10} "
          f"{'safe x':>8} {'strict x':>9} {'paired':>15} {'target':>7} {'rounds':>7}")
    ok = True
    for n, c, prob, target in CASES:
        m = measure(n, c, args.seconds, args.min_rounds, prob)
        name = f"({n}, {c})" + (" prob" if prob else "")
        for clock in clocks:
            g = {k.removeprefix(f"{clock}_"): v for k, v in m.items() if k.startswith(f"{clock}_")}
            hit = g["safe_ratio"] <= target and g["strict_ratio"] <= target
            ok &= hit
            print(f"{name:>19} {clock:>5} {g['stock_us']:10.1f} {g['safe_us']:10.1f} "
                  f"{g['strict_us']:10.1f} {g['safe_ratio']:7.3f}x {g['strict_ratio']:8.3f}x "
                  f"{g['safe_paired']:6.3f}/{g['strict_paired']:6.3f}x {f'<={target}':>7} "
                  f"{int(m['rounds']):7d}" + ("" if hit else "  MISSED"))
        print(f"{'':>19} page faults per call: stock {m['faults_stock']:.0f}, safe {m['faults_safe']:.0f}, "
              f"strict {m['faults_strict']:.0f}")
        sys.stdout.flush()
    if not args.no_gradcheck:
        print("\nsmall-input autograd checks, float64 (double backward: fp32), thread CPU time, medians; "
              "safeloss = under safeloss.patch() (double backward: SafeCrossEntropyLoss)")
        print(f"{'check':>46} {'stock ms':>10} {'safeloss ms':>12} {'ratio':>7}")
        for what, a, b in gradchecks(args.gradcheck_rounds):
            print(f"{what:>46} {a / 1e3:10.3f} {b / 1e3:12.3f} {b / a:6.2f}x")
    if args.profile:
        for n, c, _, _ in CASES:
            for strict in (False, True):
                profile(n, c, strict)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

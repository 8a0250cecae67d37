"""Per-call cost of safeloss on the CPU (issue 16, section 1): fwd+bwd against stock torch.

Every row is a pair: a safeloss call and the stock call it replaces, both forward + backward
(``torch.autograd.grad``), in the same process, interleaved call by call in a rotating order on
the same rotated inputs, with every check on (the default mode). The verdict is the median of
the per-round paired ratios (safeloss / stock); the medians of each side are printed too.

Clocks (each row names its own):

* ``thread``: ``time.thread_time_ns``, the CPU time of the calling thread. With one torch thread
  it counts exactly the work of the call and nothing of other processes, so it is the clock to
  trust on a shared machine. Rows run single-threaded use it.
* ``wall``: ``time.perf_counter_ns``; with several torch threads the only clock that counts
  the intra-op workers' work as the user waits for it. Includes time spent descheduled.
* ``proc``: ``time.process_time_ns``, every thread of the process (printed next to ``wall`` for
  multi-threaded rows: robust to other load, but counts spinning workers too).

Sections:

1. ``torch``: the pure-torch backend, ``SafeCrossEntropyLoss`` vs ``nn.CrossEntropyLoss``
   (module) and ``safeloss.cross_entropy`` vs ``F.cross_entropy`` (functional); targets
   (8, 10) <= 1.20x, (256, 10) <= 1.15x, (4096, 1000) <= 1.05x, probability targets
   (4096, 1000) <= 1.10x with 1 and with 2 threads. glibc's default allocator (no tuning): a
   freed multi-MB buffer handed back to the OS page-faults in again at the next allocation, for
   stock and safeloss alike; page faults per call are printed for the large rows, where each
   timed call follows an untimed call of the same step (``interleave``'s ``prime``).
2. ``stubbed``: ``backend="triton"`` with every kernel launch a no-op
   (``safeloss.parallel.triton_stats.stubbed_launches``), so what is timed is safeloss's host work
   around the kernels, runnable on any CPU: findings deferred as on CUDA (``checks.DEFER_ON_CPU``),
   the outputs allocated with their real shapes. Target: (8, 10) and (4096, 10) host time
   <= 1.5x stock's whole CPU fwd+bwd at the same shape. Printed beside: Python function calls
   per fwd+bwd (``sys.setprofile`` "call" events: Python frames entered, generators' resumptions
   included) of stock, the torch backend and the stubbed Triton path. The ``floor`` row (no
   target) times, in the same rounds, a minimal ``torch.autograd.Function`` doing only what any
   Python-level node around the kernels must (the outputs, a mean, its derivative, the gradient
   buffer): how much of the ratio is the Python autograd node itself; the ``node`` row times
   safeloss's own node as a planned call runs it (its buffers, launch configurations, the shared
   reduction), without the entry and the deferred findings record: the rows between ``node``
   and ``safe`` are the price of the checks' machinery around the kernels.
3. ``family``: linear + cross-entropy (``safeloss.linear_cross_entropy`` vs stock
   ``F.cross_entropy(F.linear(h, W), t)``) and vocab-parallel cross-entropy (one gloo rank,
   ``safeloss.vocab_parallel_cross_entropy`` against two baselines: stock ``F.cross_entropy``
   plus the very all-reduces safeloss makes, a lower bound; and ``plain_vocab_parallel_ce``, a
   plain unchecked vocab-parallel cross-entropy with its own three all-reduces, the op's own
   math and collectives) at a small shape, each interleaved with the cross-entropy pair at the
   same logits shape. Target: each op's extra time over its baseline (the median of safeloss
   minus the median of the baseline: its overhead on top of its own matmuls / collectives) no
   more than the cross-entropy path's extra time in the same rounds. (A ratio would favour the
   ops, whose baseline includes the matmuls or collectives.)

    python benchmarks/cpu_overhead.py                    # everything, 1 thread (+ the 2-thread row)
    python benchmarks/cpu_overhead.py --seconds 2        # shorter
    python benchmarks/cpu_overhead.py --only stubbed     # one section (torch, stubbed, family)
    python benchmarks/cpu_overhead.py --profile          # + cProfile of the safeloss side of each row
    python benchmarks/cpu_overhead.py --out benchmarks/results/cpu-overhead   # + results.json / .md
    python benchmarks/cpu_overhead.py --gradcheck        # + the small-input autograd checks

Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

Step = Callable[[int], object]  # one fwd+bwd on the inputs of round r


class Row:
    """One target: a safeloss call against the stock call it replaces. (Not a dataclass: the
    script is also loaded by path, outside ``sys.modules``, where dataclasses cannot resolve
    string annotations.)"""

    def __init__(self, section: str, case: str, api: str, threads: int, clock: str,
                 limit: float | None, versus: str | None = None) -> None:
        self.section, self.case, self.api, self.threads, self.clock = section, case, api, threads, clock
        # Target on the paired ratio (None: no target, a reference row); with ``versus``, on the
        # paired extra time instead: at most ``limit`` us more than stock (family section).
        self.limit = limit
        self.versus = versus  # the row whose extra time is this row's limit
        self.safe_us = self.stock_us = self.paired = self.extra_us = 0.0
        self.rounds = 0
        self.extra: dict[str, Any] = {}

    @property
    def ok(self) -> bool:
        if self.limit is None:
            return True
        return (self.extra_us if self.versus else self.paired) <= self.limit


# (N, C, probability targets, threads, target)
TORCH_CASES: list[tuple[int, int, bool, int, float]] = [
    (8, 10, False, 1, 1.20), (256, 10, False, 1, 1.15), (4096, 1000, False, 1, 1.05),
    (4096, 1000, True, 1, 1.10), (4096, 1000, True, 2, 1.10),
]
PRIME_NUMEL = 1 << 20  # logits from this size on: primed calls (see ``interleave``)
LARGE_ROUNDS = 100  # rounds of those at least
STUB_CASES: list[tuple[int, int, float]] = [(8, 10, 1.5), (4096, 10, 1.5)]
# linear: (N, H, V); vocab-parallel: (N, C)
LINEAR_SHAPE = (8, 16, 10)
VOCAB_SHAPE = (8, 10)


# --------------------------------------------------------------------------- measurement


def _minor_faults() -> int:
    """Minor page faults of this thread so far (Linux): each a fresh page the kernel zeroed
    because the allocator had returned memory to the OS."""
    if not hasattr(resource, "RUSAGE_THREAD"):
        return 0
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


_CLOCKS: dict[str, Callable[[], int]] = {
    "thread": time.thread_time_ns, "wall": time.perf_counter_ns, "proc": time.process_time_ns,
}


def interleave(steps: dict[str, Step], clocks: tuple[str, ...], seconds: float, min_rounds: int,
               warmup: int = 5, prime: bool = False,
               ) -> tuple[dict[str, dict[str, list[float]]], dict[str, float], int]:
    """Run every step once per round, in an order rotated each round, until ``seconds`` passed
    (at least ``min_rounds``). Returns the times in us per clock and step, the page faults per
    call of each step and the number of rounds.

    ``prime``: each timed call follows an untimed call of the same step (large shapes). glibc
    hands a freed multi-MB buffer back to the OS or keeps it depending on what else is on the
    heap, so without it a call's page faults (up to a third of its time here) depend on which
    step ran just before it; primed, each side runs in its own steady state, as a training loop
    calling the same loss every step does."""
    names = list(steps)
    for r in range(warmup):  # first-call caches, plans, the allocator's steady state
        for name in names:
            steps[name](r)
    times = {c: {n: [] for n in names} for c in clocks}
    faults = dict.fromkeys(names, 0)
    fns = [_CLOCKS[c] for c in clocks]
    deadline = time.perf_counter() + seconds
    r = 0
    while r < min_rounds or time.perf_counter() < deadline:
        k = r % len(names)
        for name in names[k:] + names[:k]:
            step = steps[name]
            if prime:
                step(r)
            f0 = _minor_faults()
            t0 = [f() for f in fns]
            step(r)
            t1 = [f() for f in fns]
            faults[name] += _minor_faults() - f0
            for c, a, b in zip(clocks, t0, t1):
                times[c][name].append((b - a) / 1e3)
        r += 1
    return times, {n: faults[n] / r for n in names}, r


def _paired(times: dict[str, list[float]], safe: str, stock: str) -> float:
    return statistics.median(a / b for a, b in zip(times[safe], times[stock]) if b > 0)


def _fill(row: Row, times: dict[str, dict[str, list[float]]], safe: str, stock: str, rounds: int) -> Row:
    t = times[row.clock]
    row.safe_us, row.stock_us = statistics.median(t[safe]), statistics.median(t[stock])
    row.paired, row.rounds = _paired(t, safe, stock), rounds
    # Median minus median: per-round differences of these short calls depend on which step ran
    # just before (the rotation), which a ratio of nearly equal times hides but a difference of
    # a few us does not.
    row.extra_us = row.safe_us - row.stock_us
    for other in times:
        if other != row.clock:
            row.extra[f"paired_{other}"] = _paired(times[other], safe, stock)
    return row


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _clocks(threads: int) -> tuple[str, ...]:
    # The thread clock misses the intra-op workers: single-threaded rows only.
    return ("thread", "wall") if threads == 1 else ("wall", "proc")


def count_calls(fn: Callable[..., object], *args: object) -> int:
    """Python function calls (frames entered) during ``fn(*args)``, C functions not counted."""
    n = 0

    def prof(frame: object, event: str, arg: object) -> None:
        nonlocal n
        if event == "call":
            n += 1

    sys.setprofile(prof)
    try:
        fn(*args)
    finally:
        sys.setprofile(None)
    return n - 1  # fn itself


def _pool(n: int, c: int, prob: bool, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(n, c, generator=g).requires_grad_(),
         torch.randn(n, c, generator=g).softmax(1) if prob else torch.randint(0, c, (n,), generator=g))
        for _ in range(k)
    ]


def _copies(n: int, c: int) -> int:
    # Enough copies that the working set exceeds a typical L2 (~1-2 MB a core) at small shapes.
    return max(2, min(16, (8 << 20) // max(1, n * c * 4)))


def _ce_steps(pool: list[tuple[torch.Tensor, torch.Tensor]], prefix: str = "", **kw: Any) -> dict[str, Step]:
    """Module and functional pairs, stock and safeloss, on the rotated pool."""
    import safeloss

    k = len(pool)
    stock_m, safe_m = torch.nn.CrossEntropyLoss(), safeloss.SafeCrossEntropyLoss(**kw)
    safe_f = safeloss.cross_entropy

    def step(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Step:
        # autograd.grad, not .backward(): no .grad accumulation, the same work for every side.
        def run(r: int) -> object:
            x, t = pool[r % k]
            return torch.autograd.grad(loss(x, t), (x,))
        return run

    return {
        f"{prefix}stock-module": step(stock_m), f"{prefix}safe-module": step(safe_m),
        f"{prefix}stock-functional": step(F.cross_entropy),
        f"{prefix}safe-functional": step(lambda x, t: safe_f(x, t, **kw)),
    }


# --------------------------------------------------------------------------- sections


def torch_rows(seconds: float, min_rounds: int) -> list[Row]:
    rows = []
    for n, c, prob, threads, limit in TORCH_CASES:
        with _threads(threads):
            clocks = _clocks(threads)
            steps = _ce_steps(_pool(n, c, prob, _copies(n, c)))
            large = n * c >= PRIME_NUMEL
            # Large calls vary by +-15% from round to round on a shared machine (memory bandwidth):
            # enough rounds that the median ratio is good to about +-2%.
            times, faults, r = interleave(steps, clocks, seconds, max(min_rounds, LARGE_ROUNDS) if large
                                          else min_rounds, prime=large)
        case = f"({n}, {c})" + (" prob" if prob else "")
        for api in ("module", "functional"):
            row = _fill(Row("torch", case, api, threads, clocks[0], limit), times,
                        f"safe-{api}", f"stock-{api}", r)
            row.extra["faults_safe"], row.extra["faults_stock"] = faults[f"safe-{api}"], faults[f"stock-{api}"]
            rows.append(row)
        _progress(rows[-2:])
    return rows


@contextlib.contextmanager
def stubbed() -> Iterator[None]:
    """Kernel launches stubbed, findings deferred as on CUDA (see the module docstring)."""
    from safeloss.core import checks
    from safeloss.parallel.triton_stats import stubbed_launches

    before = checks.DEFER_ON_CPU
    checks.DEFER_ON_CPU = True
    try:
        with stubbed_launches():
            yield
    finally:
        checks.flush(None, None)
        checks.DEFER_ON_CPU = before


class _Floor(torch.autograd.Function):
    """The least a Python-level autograd node around a forward and a backward kernel does (the
    ``floor`` row): the outputs the kernels would write (per-position losses, the findings
    vector, the log-sum-exp), the mean (a sum and a division by the counted positions), and in
    backward the mean's derivative and the gradient buffer. No checks, no plan, no findings read."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        n = x.shape[0]
        losses, flags, lse = x.new_empty((n,)), x.new_zeros(8, dtype=torch.int32), x.new_empty((n,))
        ctx.save_for_backward(x, t, lse)
        denom = (t != -100).sum()
        ctx.denom = denom
        ctx.mark_non_differentiable(flags)
        return losses.sum() / denom, flags

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, _flags: Any) -> tuple[Any, ...]:  # type: ignore[override]
        x, _t, _lse = ctx.saved_tensors
        (g / ctx.denom).expand(x.shape[0])
        return torch.empty_like(x), None


def _node_step(pool: list[tuple[torch.Tensor, torch.Tensor]]) -> Step:
    """The ``node`` row: safeloss's own autograd node around the (stubbed) kernels, as a planned
    call runs it (the output buffers, the launch configurations, the shared reduction and its
    derivative, the gradient buffer), without the entry (signature lookup, mode) and without the
    findings record (the deferred copies and the next call's read of them): how much of the
    ``safe`` rows' time is the node itself and how much the safety machinery around it."""
    from safeloss.backends import triton_backend
    from safeloss.core.plan import Skeleton
    from safeloss.core.validation import normalize

    k = len(pool)
    p0 = normalize(pool[0][0], pool[0][1], None, -100, "mean", 0.0)
    skeleton, node = Skeleton(p0), triton_backend.Planned(p0, False, False, math.inf)

    def run(r: int) -> object:
        x, t = pool[r % k]
        return torch.autograd.grad(node(x, t, None, skeleton.problem(x, t, None))[2], (x,))
    return run


def _floor_step(pool: list[tuple[torch.Tensor, torch.Tensor]]) -> Step:
    k = len(pool)

    def run(r: int) -> object:
        x, t = pool[r % k]
        return torch.autograd.grad(_Floor.apply(x, t)[0], (x,))
    return run


def stub_rows(seconds: float, min_rounds: int) -> list[Row]:

    rows = []
    with _threads(1):
        for n, c, limit in STUB_CASES:
            pool = _pool(n, c, False, _copies(n, c))
            steps = _ce_steps(pool, backend="triton")
            steps["floor"] = _floor_step(pool)
            steps["node"] = _node_step(pool)
            with stubbed():
                times, _, r = interleave(steps, ("thread", "wall"), seconds, min_rounds)
                calls = {
                    "stock": count_calls(steps["stock-module"], 0),
                    "triton-stubbed": count_calls(steps["safe-module"], 0),
                    "triton-stubbed-functional": count_calls(steps["safe-functional"], 0),
                }
            torch_step = _ce_steps(pool)["safe-module"]
            torch_step(0)
            calls["torch-backend"] = count_calls(torch_step, 0)
            for api in ("module", "functional"):
                row = _fill(Row("stubbed", f"({n}, {c})", api, 1, "thread", limit), times,
                            f"safe-{api}", f"stock-{api}", r)
                row.extra["python_calls"] = calls
                rows.append(row)
            # Context for the target, not a target: the same rounds' floor of any design that
            # wraps the kernels in a Python autograd.Function (stock's nodes are C++).
            rows.append(_fill(Row("stubbed", f"({n}, {c})", "floor", 1, "thread", None), times,
                              "floor", "stock-module", r))
            rows.append(_fill(Row("stubbed", f"({n}, {c})", "node", 1, "thread", None), times,
                              "node", "stock-module", r))
            _progress(rows[-4:])
    return rows


def _linear_steps(n: int, h: int, v: int) -> dict[str, Step]:
    import safeloss

    g = torch.Generator().manual_seed(0)
    k = 8
    hs = [torch.randn(n, h, generator=g).requires_grad_() for _ in range(k)]
    w = torch.randn(v, h, generator=g).div_(h**0.5).requires_grad_()
    ts = [torch.randint(0, v, (n,), generator=g) for _ in range(k)]

    def stock(r: int) -> object:
        x = hs[r % k]
        return torch.autograd.grad(F.cross_entropy(F.linear(x, w), ts[r % k]), (x, w))

    def safe(r: int) -> object:
        x = hs[r % k]
        return torch.autograd.grad(safeloss.linear_cross_entropy(x, w, ts[r % k]), (x, w))

    return {"stock-linear": stock, "safe-linear": safe}


def family_rows(seconds: float, min_rounds: int) -> list[Row]:
    rows = []
    with _threads(1):
        n, h, v = LINEAR_SHAPE
        steps = {**_ce_steps(_pool(n, v, False, 8), prefix="ce-"), **_linear_steps(n, h, v)}
        del steps["ce-stock-module"], steps["ce-safe-module"]
        times, _, r = interleave(steps, ("thread", "wall"), seconds, min_rounds)
        ce = _fill(Row("family", f"({n}, {v}) logits", "cross_entropy", 1, "thread", None), times,
                   "ce-safe-functional", "ce-stock-functional", r)
        lin = _fill(Row("family", f"({n}, {h}) x ({v}, {h})", "linear_cross_entropy", 1, "thread",
                        ce.extra_us, versus="cross_entropy"), times, "safe-linear", "stock-linear", r)
        rows += [ce, lin]
        _progress(rows[-2:])
        rows += _vocab_rows(seconds, min_rounds)
    return rows


@contextlib.contextmanager
def _one_rank() -> Iterator[None]:
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _SumRanks(torch.autograd.Function):
    """The plain baseline's sum over the ranks: every rank computes the same loss from the sum,
    so the gradient of each rank's part is the upstream gradient (Megatron's reduce-from-region)."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        v = v.clone()
        dist.all_reduce(v, group=group)
        return v

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g, None


def plain_vocab_parallel_ce(logits: torch.Tensor, target: torch.Tensor, group: Any = None) -> torch.Tensor:
    """A plain, unchecked vocab-parallel cross-entropy (the ``vocab_parallel (plain)`` row's
    baseline): this rank holds classes [rank * C_local, (rank + 1) * C_local) of (N, C_local)
    logits; the mean over the positions, no ignore_index, no checks. The local max, all-reduced
    (MAX, no gradient: the loss does not depend on the shift); the sums of exponentials of the
    shifted logits, all-reduced (SUM); the target's shifted logit from the rank that holds it,
    all-reduced (SUM); loss = log(sum) - (x_y - max). Three all-reduces, as safeloss's call; the
    backward is autograd's through these ops."""
    import torch.distributed as dist

    c_local = logits.shape[1]
    lo = dist.get_rank(group) * c_local
    m = logits.detach().amax(1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    z = logits - m.unsqueeze(1)
    sumexp = _SumRanks.apply(z.exp().sum(1), group)
    owned = (target >= lo) & (target < lo + c_local)
    zy = z.gather(1, (target - lo).clamp(0, c_local - 1).unsqueeze(1)).squeeze(1)
    zy = _SumRanks.apply(torch.where(owned, zy, 0.0), group)
    return (sumexp.log() - zy).mean()


@contextlib.contextmanager
def _vocab_steps(pool: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[dict[str, Step], int, int]]:
    """Inside one gloo rank: the vocab-parallel steps (``stock-vocab``: stock plus the very
    all-reduces safeloss issues; ``plain-vocab``; ``safe-vocab``), the number of all-reduces
    and the world size."""
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    import safeloss

    with _one_rank():
        # The all-reduces safeloss's call makes (payload and op, seen as the ops it dispatches),
        # replayed on the stock side as the same op issued the same way, so that the first
        # baseline is stock's loss plus the very same collectives: a lower bound.
        payloads: list[tuple[torch.Tensor, str, Any]] = []
        reduce_op = torch.ops._c10d_functional.all_reduce.default
        wait_op = torch.ops._c10d_functional.wait_tensor.default

        class Collectives(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                if func is reduce_op:
                    payloads.append((torch.zeros_like(args[0]), args[1], args[2]))
                return func(*args, **(kwargs or {}))

        x, t = pool[0]
        with Collectives():
            torch.autograd.grad(safeloss.vocab_parallel_cross_entropy(x, t), (x,))
        below = torch._C._AutoDispatchBelowAutograd
        want = F.cross_entropy(x, t)
        got = plain_vocab_parallel_ce(x, t)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got, want)  # the baseline is a CE

        def stock(r: int) -> object:
            x, t = pool[r % len(pool)]
            with below():
                for buf, op, group in payloads:
                    wait_op(reduce_op(buf, op, group))
            return torch.autograd.grad(F.cross_entropy(x, t), (x,))

        def plain(r: int) -> object:
            x, t = pool[r % len(pool)]
            return torch.autograd.grad(plain_vocab_parallel_ce(x, t), (x,))

        def safe(r: int) -> object:
            x, t = pool[r % len(pool)]
            return torch.autograd.grad(safeloss.vocab_parallel_cross_entropy(x, t), (x,))

        yield {"stock-vocab": stock, "plain-vocab": plain, "safe-vocab": safe}, len(payloads), dist.get_world_size()


def _vocab_rows(seconds: float, min_rounds: int) -> list[Row]:
    n, c = VOCAB_SHAPE
    pool = _pool(n, c, False, 8)
    with _vocab_steps(pool) as (vocab, n_reduces, world):
        steps = {**_ce_steps(pool, prefix="ce-"), **vocab}
        del steps["ce-stock-module"], steps["ce-safe-module"]
        with _threads(1):
            times, _, r = interleave(steps, ("thread", "wall"), seconds, min_rounds)
    ce = _fill(Row("family", f"({n}, {c}) logits", "cross_entropy", 1, "thread", None), times,
               "ce-safe-functional", "ce-stock-functional", r)
    # Baseline 1 (a lower bound): stock's cross-entropy on the full logits plus the same
    # all-reduces. Baseline 2: a plain vocab-parallel cross-entropy, its own 3 all-reduces
    # (torch.distributed.all_reduce, in place, as Megatron's) and autograd's backward: what the
    # op costs without its checks. Each judged on its extra time against the cross-entropy's.
    vp = _fill(Row("family", f"({n}, {c}), {world} gloo rank, {n_reduces} all-reduces", "vocab_parallel",
                   1, "thread", ce.extra_us, versus="cross_entropy"), times, "safe-vocab", "stock-vocab", r)
    plain_row = _fill(Row("family", f"({n}, {c}), {world} gloo rank, vs plain", "vocab_parallel (plain)",
                          1, "thread", ce.extra_us, versus="cross_entropy"), times, "safe-vocab", "plain-vocab", r)
    vp.extra["all_reduces"] = plain_row.extra["all_reduces"] = n_reduces
    rows = [ce, vp, plain_row]
    _progress(rows)
    return rows


# --------------------------------------------------------------------------- instructions

# (section, case, api, safe step, stock step, target as in the timed rows, versus): the timed
# rows' pairs, counted in executed instructions instead of time (``--instructions``).
ICOUNT_ROWS: list[tuple[str, str, str, str, str, float | None, str | None]] = [
    ("torch", "(8, 10)", "module", "torch/safe-module", "torch/stock-module", 1.20, None),
    ("torch", "(8, 10)", "functional", "torch/safe-functional", "torch/stock-functional", 1.20, None),
    ("stubbed", "(8, 10)", "module", "stubbed/safe-module", "stubbed/stock-module", 1.5, None),
    ("stubbed", "(8, 10)", "floor", "stubbed/floor", "stubbed/stock-module", None, None),
    ("stubbed", "(8, 10)", "node", "stubbed/node", "stubbed/stock-module", None, None),
    ("family", "(8, 16) x (10, 16)", "linear_cross_entropy", "linear/safe-linear", "linear/stock-linear", None,
     "cross_entropy"),
    ("family", "(8, 10), 1 gloo rank", "vocab_parallel", "vocab/safe-vocab", "vocab/stock-vocab", None,
     "cross_entropy"),
    ("family", "(8, 10), 1 gloo rank, vs plain", "vocab_parallel (plain)", "vocab/safe-vocab",
     "vocab/plain-vocab", None, "cross_entropy"),
]
ICOUNT_CALLS = 300


@contextlib.contextmanager
def _icount_step(name: str) -> Iterator[Step]:
    """The step ``name`` ("section/step") of :data:`ICOUNT_ROWS`, inside its setting."""
    section, step = name.split("/")
    with _threads(1):
        if section == "torch":
            yield _ce_steps(_pool(8, 10, False, 4))[step]
        elif section == "stubbed":
            pool = _pool(8, 10, False, 4)
            steps = {**_ce_steps(pool, backend="triton"), "floor": _floor_step(pool), "node": _node_step(pool)}
            with stubbed():
                yield steps[step]
        elif section == "linear":
            yield _linear_steps(*LINEAR_SHAPE)[step]
        else:
            with _vocab_steps(_pool(*VOCAB_SHAPE, False, 4)) as (steps, _, _):
                yield steps[step]


# Valgrind client requests (callgrind.h), called from Python through ctypes: instrument and count
# only the measured calls (imports and warm-up run uninstrumented, ~5x faster), and dump the count
# of each stretch of calls (a dump zeroes the counters).
_CALLGRIND_C = """
#include <valgrind/callgrind.h>
void safeloss_start(void) { CALLGRIND_START_INSTRUMENTATION; CALLGRIND_ZERO_STATS; }
void safeloss_dump(void) { CALLGRIND_DUMP_STATS; }
"""


def _icount_child(name: str, calls: int, lib: str | None = None) -> None:
    """One step's process under callgrind: warm-up, then two stretches of ``calls`` calls, each
    dumped (the first absorbs the instrumentation's start; the second is the one read)."""
    import ctypes

    requests = ctypes.CDLL(lib) if lib else None
    with _icount_step(name) as step:
        for r in range(30):  # first calls: plans, caches, lazy imports
            step(r)
        for stretch in range(2):
            if requests is not None and stretch == 0:
                requests.safeloss_start()
            for r in range(calls):
                step(r)
            if requests is not None:
                requests.safeloss_dump()


def _instructions(name: str, calls: int, workdir: Path, lib: str) -> float:
    """Instructions per fwd+bwd of step ``name``, counted by valgrind's callgrind in a process of
    its own. Deterministic (the same count on a busy machine), so small differences are real;
    but it weighs every instruction alike (no cache misses, no memory traffic): a measure of
    host work at small shapes only."""
    import subprocess

    prefix = workdir / name.replace("/", "_")
    subprocess.run(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={prefix}.%p",
         sys.executable, str(Path(__file__).resolve()), "--icount-child", name, str(calls), lib],
        capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"}, check=True)
    (dump,) = workdir.glob(f"{prefix.name}.*.2")  # the second stretch's dump
    total = next(ln for ln in dump.read_text().splitlines() if ln.startswith("totals:"))
    return int(total.split()[1]) / calls


def _callgrind_requests(workdir: Path) -> str:
    """The client-request library, compiled here (needs a C compiler and valgrind's headers)."""
    import subprocess

    src, lib = workdir / "requests.c", workdir / "requests.so"
    src.write_text(_CALLGRIND_C)
    subprocess.run([os.environ.get("CC", "cc"), "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)],
                   check=True, capture_output=True, text=True)
    return str(lib)


def instruction_rows(calls: int = ICOUNT_CALLS) -> list[Row]:
    """The ``instr`` rows: :data:`ICOUNT_ROWS` counted by valgrind (one process pair per step,
    as many at once as there are cores). Rows print thousands of instructions in the ``us``
    columns; family rows are judged on their extra instructions against the cross-entropy
    path's (``torch/safe-functional`` minus ``torch/stock-functional``)."""
    import concurrent.futures
    import shutil
    import tempfile

    missing = [tool for tool in ("valgrind", os.environ.get("CC", "cc")) if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"--instructions needs valgrind (with its headers) and a C compiler; not found: "
                         f"{', '.join(missing)} (Debian: apt-get install valgrind gcc)")
    names = sorted({n for row in ICOUNT_ROWS for n in row[3:5]})
    with tempfile.TemporaryDirectory() as tmp, \
            concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        lib = _callgrind_requests(Path(tmp))
        counts = dict(zip(names, pool.map(lambda n: _instructions(n, calls, Path(tmp), lib), names), strict=True))
    ce_extra = (counts["torch/safe-functional"] - counts["torch/stock-functional"]) / 1e3
    rows = []
    for section, case, api, safe, stock, limit, versus in ICOUNT_ROWS:
        row = Row(section, case, api, 1, "instr", ce_extra if versus else limit, versus=versus)
        row.safe_us, row.stock_us = counts[safe] / 1e3, counts[stock] / 1e3
        row.paired, row.extra_us, row.rounds = row.safe_us / row.stock_us, row.safe_us - row.stock_us, calls
        rows.append(row)
    _progress(rows)
    return rows


# --------------------------------------------------------------------------- profile


def profile(row_filter: str, calls: int = 300) -> None:
    """cProfile of the safeloss side of the small rows: where the time goes per Python function
    (cProfile's own per-call cost inflates small functions: read it for *where*)."""
    import cProfile
    import pstats

    import safeloss

    def show(title: str, fn: Callable[[], object]) -> None:
        for _ in range(20):
            fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        print(f"\n--- cProfile: {title}, {calls} calls (times are totals) ---")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)

    with _threads(1):
        x, t = _pool(8, 10, False, 1)[0]
        if row_filter in ("all", "torch"):
            m = safeloss.SafeCrossEntropyLoss()
            show("torch backend (8, 10), module", lambda: torch.autograd.grad(m(x, t), (x,)))
        if row_filter in ("all", "stubbed"):
            m = safeloss.SafeCrossEntropyLoss(backend="triton")
            with stubbed():
                show("triton stubbed (8, 10), module", lambda: torch.autograd.grad(m(x, t), (x,)))
        if row_filter in ("all", "family"):
            n, h, v = LINEAR_SHAPE
            step = _linear_steps(n, h, v)["safe-linear"]
            show(f"linear_cross_entropy ({n}, {h}) x ({v}, {h})", lambda: step(0))


# --------------------------------------------------------------------------- gradchecks


def gradchecks(rounds: int = 15) -> list[tuple[str, float, float]]:
    """(what, stock us, safeloss us): gradcheck / gradgradcheck of ``F.cross_entropy`` and of
    ``F.linear_cross_entropy`` on tiny float64 inputs, stock and under ``safeloss.patch()``, and
    a double backward at (8, 10). Ratios only (no target): patched calls run every check."""
    import functools

    from torch.autograd import gradcheck, gradgradcheck

    import safeloss

    gradcheck = functools.partial(gradcheck, fast_mode=True, check_batched_grad=True)
    gradgradcheck = functools.partial(gradgradcheck, fast_mode=True, check_batched_grad=True)
    fn = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 5, (4,), generator=g)
    y = torch.randn(4, 5, dtype=torch.float64, generator=g).softmax(1).requires_grad_()
    h = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    checks_: dict[str, Callable[[], object]] = {
        "gradcheck F.cross_entropy, class indices": lambda: gradcheck(lambda a: fn.cross_entropy(a, t), (x,)),
        "gradgradcheck F.cross_entropy, class indices": lambda: gradgradcheck(lambda a: fn.cross_entropy(a, t), (x,)),
        "gradcheck F.cross_entropy, probabilities": lambda: gradcheck(fn.cross_entropy, (x, y)),
        "gradgradcheck F.cross_entropy, probabilities": lambda: gradgradcheck(fn.cross_entropy, (x, y)),
        "gradcheck F.linear_cross_entropy": lambda: gradcheck(lambda a, b: fn.linear_cross_entropy(a, b, t), (h, w)),
        "gradgradcheck F.linear_cross_entropy": lambda: gradgradcheck(lambda a, b: fn.linear_cross_entropy(a, b, t), (h, w)),
    }
    with safeloss.patch():  # the first patch() imports torch._dynamo: outside the timings
        for check in checks_.values():
            check()
    out = []
    for what, check in checks_.items():
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
    stock_loss, safe_loss = torch.nn.CrossEntropyLoss(), safeloss.SafeCrossEntropyLoss()
    xd, td = _pool(8, 10, False, 1)[0]

    def double_backward(loss_fn: torch.nn.Module) -> Step:
        def run(r: int) -> object:
            (gx,) = torch.autograd.grad(loss_fn(xd, td), (xd,), create_graph=True)
            return torch.autograd.grad(gx.square().sum(), (xd,))
        return run

    tm, _, _ = interleave({"stock": double_backward(stock_loss), "safe": double_backward(safe_loss)},
                          ("thread",), 0.0, rounds * 50)
    out.append(("double backward (8, 10) fp32, module", statistics.median(tm["thread"]["stock"]),
                statistics.median(tm["thread"]["safe"])))
    return out


# --------------------------------------------------------------------------- output


def _verdict(row: Row) -> str:
    return "PASS" if row.ok else "FAIL"


def _limit(row: Row) -> str:
    if row.limit is None:
        return "-"
    if row.versus:
        unit = "Ki" if row.clock == "instr" else "us"  # instr rows: thousands of instructions
        return f"+{row.extra_us:.1f} <= +{row.limit:.1f} {unit}"
    return f"<= {row.limit:.2f}x"


HEADER = (f"{'section':<8} {'case':<34} {'api':<20} {'thr':>3} {'clock':<6} {'stock us':>10} "
          f"{'safe us':>10} {'paired':>8} {'target':>26} {'rounds':>7}  verdict")


def _line(row: Row) -> str:
    return (f"{row.section:<8} {row.case:<34} {row.api:<20} {row.threads:>3} {row.clock:<6} "
            f"{row.stock_us:10.1f} {row.safe_us:10.1f} {row.paired:7.3f}x {_limit(row):>26} "
            f"{row.rounds:7d}  {_verdict(row) if row.limit is not None else ''}")


def _progress(rows: list[Row]) -> None:
    for row in rows:
        print(_line(row))
        extra = []
        for k, v in row.extra.items():
            if k.startswith("paired_"):
                extra.append(f"paired on the {k[7:]} clock {v:.3f}x")
            elif k == "faults_safe" and (v or row.extra["faults_stock"]):
                extra.append(f"page faults per call: stock {row.extra['faults_stock']:.0f}, safe {v:.0f}")
            elif k == "python_calls" and row.api == "module":
                extra.append("Python calls per fwd+bwd: " + ", ".join(f"{n} {c}" for n, c in v.items()))
        if extra:
            print(f"{'':<8} " + "; ".join(extra))
    sys.stdout.flush()


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu, "cores": os.cpu_count(),
        "load_average": [round(v, 1) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }


def write(out: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "rows": [
        {**{k: v for k, v in row.__dict__.items() if k != "extra"}, **row.extra, "ok": row.ok}
        for row in rows]}
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [
        "# CPU per-call cost: safeloss vs stock, fwd+bwd",
        "",
        f"`python benchmarks/cpu_overhead.py {' '.join(meta['argv'])}` on {meta['cpu']} "
        f"({meta['cores']} cores, shared: load average {meta['load_average']}), torch {meta['torch']}, "
        f"Python {meta['python']}, {meta['utc']}. Paired = median of the per-round ratios "
        "safeloss / stock, interleaved in one process; extra = median of safeloss minus median "
        "of stock (the family rows are judged on it, against the cross-entropy row of the same "
        "rounds); `thread` = `time.thread_time_ns` (one torch "
        "thread), `wall` = `time.perf_counter_ns`, `proc` = `time.process_time_ns`; `instr` = "
        "instructions executed per fwd+bwd counted by valgrind (`--instructions`; thousands in the "
        "us columns; deterministic, blind to cache misses and memory traffic).",
        "",
        "| section | case | api | threads | clock | stock us | safeloss us | paired | extra us | target | verdict |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row.section} | {row.case} | {row.api} | {row.threads} | {row.clock} | "
                     f"{row.stock_us:.1f} | {row.safe_us:.1f} | {row.paired:.3f}x | {row.extra_us:+.1f} | "
                     f"{_limit(row)} | "
                     f"{_verdict(row) if row.limit is not None else ''} |")
    calls = [row for row in rows if "python_calls" in row.extra and row.api == "module"]
    if calls:
        lines += ["", "Python function calls per fwd+bwd (`sys.setprofile` call events):", "",
                  "| case | " + " | ".join(calls[0].extra["python_calls"]) + " |",
                  "|---|" + "---:|" * len(calls[0].extra["python_calls"])]
        for row in calls:
            lines.append(f"| {row.case} | " + " | ".join(str(v) for v in row.extra["python_calls"].values()) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="timing budget per case")
    ap.add_argument("--min-rounds", type=int, default=30, help="rounds per case at least")
    ap.add_argument("--only", choices=("torch", "stubbed", "family", "gradcheck", "instructions"), action="append",
                    help="run only these sections (repeatable; gradcheck: the autograd checks alone; "
                         "instructions: the valgrind counts alone)")
    ap.add_argument("--profile", action="store_true", help="cProfile the safeloss side of the small rows")
    ap.add_argument("--gradcheck", action="store_true", help="also time the small-input autograd checks")
    ap.add_argument("--gradcheck-rounds", type=int, default=15)
    ap.add_argument("--out", type=Path, default=None, help="write results.json and results.md here")
    ap.add_argument("--instructions", action="store_true",
                    help="also count instructions per call of the small rows under valgrind (deterministic)")
    ap.add_argument("--icount-child", nargs=3, metavar=("STEP", "CALLS", "LIB"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv if argv is not None else sys.argv[1:])
    if args.icount_child:
        _icount_child(args.icount_child[0], int(args.icount_child[1]), args.icount_child[2])
        return 0
    sections = args.only or ["torch", "stubbed", "family"]
    if "gradcheck" in sections:
        args.gradcheck = True
    if "instructions" in sections:
        args.instructions = True
    print(f"torch {torch.__version__}; fwd+bwd, mean reduction, fp32; paired = median of per-round "
          "ratios safeloss / stock; clock: thread = thread CPU time (1 torch thread), wall, "
          "proc = process CPU time")
    print(HEADER)
    rows: list[Row] = []
    if "torch" in sections:
        rows += torch_rows(args.seconds, args.min_rounds)
    if "stubbed" in sections:
        rows += stub_rows(args.seconds, args.min_rounds)
    if "family" in sections:
        rows += family_rows(args.seconds, args.min_rounds)
    if args.instructions:
        rows += instruction_rows()
    ok = all(row.ok for row in rows)
    missed = [f"{r.section} {r.case} {r.api} ({r.threads} thr)" for r in rows if not r.ok]
    print("\nall targets met" if ok else "\nMISSED: " + "; ".join(missed))
    if args.gradcheck:
        print("\nsmall-input autograd checks, float64 (double backward: fp32), thread CPU time, medians; "
              "safeloss = under safeloss.patch() (double backward: SafeCrossEntropyLoss)")
        print(f"{'check':>46} {'stock ms':>10} {'safeloss ms':>12} {'ratio':>7}")
        for what, a, b in gradchecks(args.gradcheck_rounds):
            print(f"{what:>46} {a / 1e3:10.3f} {b / 1e3:12.3f} {b / a:6.2f}x")
    if args.profile:
        for s in sections:
            if s not in ("gradcheck", "instructions"):
                profile(s)
    if args.out is not None:
        write(args.out, rows, {**_machine(), "argv": list(argv if argv is not None else sys.argv[1:])})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

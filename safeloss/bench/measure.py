"""Measurement: timers (CUDA events; on the CPU, interleaved blocks of calls summarized as
``torch.utils.benchmark.Measurement``), copy bandwidth, memory, and the timed steps that every
section shares.

No workload or provider lives here: ``safeloss.bench`` (cross-entropy) and ``safeloss.bench.linear``
(linear + cross-entropy) both time with these.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Skip(Exception):
    """A provider cannot run this workload here; the message says why (shown as a note)."""


_GiB = 1 << 30
# A provider's loss function: (logits, target) -> scalar mean loss, differentiable w.r.t. logits.
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclasses.dataclass
class Timing:
    median_ms: float
    q20_ms: float
    q80_ms: float
    reps: int


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _summary(ms: list[float]) -> Timing:
    return Timing(statistics.median(ms), _quantile(ms, 0.2), _quantile(ms, 0.8), len(ms))


def cuda_time(fn: Callable[[], object], warmup_ms: float, rep_ms: float,
              setup: Callable[[], object] | None = None) -> Timing:
    """CUDA-event time of ``fn``: triton's do_bench (L2 flushed before each call) when available.

    ``setup`` runs before each call outside the timed interval (before the L2 flush and the start
    event): in-place providers get their overwritten logits restored there."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None and setup is None:
        med, q20, q80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(med, q20, q80, -1)  # do_bench does not report its rep count
    # Same method without triton: flush L2 with a 256 MB write, time each call with events.
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    setup = setup or (lambda: None)
    setup()
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        setup()
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        setup()
        fn()
    n = max(5, int(rep_ms / est))
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in evs:
        setup()
        flush.zero_()
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return _summary([a.elapsed_time(b) for a, b in evs])


def cpu_clock() -> Callable[[], float]:
    """The clock of CPU timings: with one torch thread (the CPU default of ``safeloss bench``),
    the calling thread's CPU time, which counts the work of the calls and not the time other
    processes hold the cores (on a shared machine, most of the spread of wall time); with more
    threads, whose work that clock would miss, wall time."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def cpu_time_interleaved(fns: dict[str, Callable[[], object]], seconds: float, min_rounds: int,
                         block_s: float = 0.02) -> dict[str, Timing]:
    """Time per call on the CPU, providers interleaved block by block in a rotating order (so
    that load from other processes hits all of them alike), until both ``min_rounds`` rounds and
    ``seconds`` have passed.

    A block is ``number`` calls in a row, enough to last about ``block_s`` (one for calls longer
    than that), and its mean is one sample: per-call times of microseconds to milliseconds on a
    shared machine are mostly scheduler noise, block means are steady, and their q20..q80 spread
    says how steady. The blocks of a provider become one ``torch.utils.benchmark.Measurement``
    (merged; median over blocks). Blocks are timed here rather than by ``Timer.timeit``, which
    runs ``max(number // 100, 2)`` uncounted warm-up calls before each block: three times the
    cost of a block of one long call (a linear head's reference path takes seconds). One warm-up
    call per provider, which also sizes its blocks, is not counted."""
    from torch.utils.benchmark import Measurement
    from torch.utils.benchmark.utils.common import TaskSpec

    names = list(fns)
    number: dict[str, int] = {}
    for name in names:
        t0 = time.perf_counter()
        fns[name]()
        number[name] = max(1, int(block_s / max(time.perf_counter() - t0, 1e-7)))
    threads = torch.get_num_threads()
    clock = cpu_clock()
    blocks: dict[str, list[Measurement]] = {n: [] for n in names}
    specs = {n: TaskSpec(stmt="fn()", setup="pass", label=n, num_threads=threads) for n in names}
    deadline = time.perf_counter() + seconds
    r = 0
    while r < min_rounds or time.perf_counter() < deadline:
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, k = fns[name], number[name]
            t0 = clock()
            for _ in range(k):
                fn()
            blocks[name].append(Measurement(k, [clock() - t0], specs[name]))
        r += 1
    out = {}
    for name in names:
        merged = Measurement.merge(blocks[name])[0]
        ms = [t * 1e3 for t in merged.times]  # per-call mean of each block, in ms
        out[name] = Timing(merged.median * 1e3, _quantile(ms, 0.2), _quantile(ms, 0.8),
                           len(ms) * number[name])
    return out


# A row whose q20..q80 interval is wider than this share of its median is flagged as too noisy to
# trust (on a shared CPU, other processes' load; its speedup may be off by as much).
SPREAD_MAX = 0.2


def spread(row: dict[str, Any], key: str = "fwdbwd") -> float | None:
    """(q80 - q20) / median of a finished row's ``key`` timing, or None when not timed."""
    tm = row.get(key)
    if isinstance(tm, Timing):  # not finished yet
        med, lo, hi = tm.median_ms, tm.q20_ms, tm.q80_ms
    else:
        med, lo, hi = row.get(f"{key}_ms"), row.get(f"{key}_q20_ms"), row.get(f"{key}_q80_ms")
    if not all(isinstance(v, float) for v in (med, lo, hi)) or not med:
        return None
    return (hi - lo) / med


def copy_bandwidth(dev: torch.device, quick: bool) -> float:
    """GB/s of a device-to-device copy (read + write counted) on a buffer far beyond cache."""
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        nbytes = min(_GiB, free // 4)
    else:
        nbytes = (64 << 20) if quick else (256 << 20)
    n = nbytes // 4
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)

    if dev.type == "cuda":
        t = cuda_time(copy, 25, 100).median_ms
    else:
        t = cpu_time_interleaved({"copy": copy}, 0.5, 10)["copy"].median_ms
    return 2 * n * 4 / (t * 1e-3) / 1e9


def _fwd(fn: LossFn, x: Tensor, t: Tensor) -> None:
    fn(x, t)


def _fwdbwd(fn: LossFn, x: Tensor, t: Tensor) -> None:
    # autograd.grad, not backward(): no .grad accumulation, the same work for every provider.
    torch.autograd.grad(fn(x, t), (x,))


def _restorer(pool: list[tuple[Tensor, Tensor]], clean: list[Tensor] | None,
              at: list[int]) -> Callable[[], None] | None:
    """For in-place providers: put clean logits back into the pool entry used next."""
    if clean is None:
        return None

    def setup() -> None:
        j = at[0] % len(pool)
        with torch.no_grad():
            pool[j][0].copy_(clean[j])

    return setup


def _rotating(step: Callable[[LossFn, Tensor, Tensor], None], fn: LossFn,
              pool: list[tuple[Tensor, Tensor]], at: list[int] | None = None) -> Callable[[], None]:
    i = at if at is not None else [0]  # shared with _restorer: which entry the next call uses

    def call() -> None:
        x, t = pool[i[0] % len(pool)]
        i[0] += 1
        step(fn, x, t)

    return call


def cuda_memory(fn: LossFn, x: Tensor, t: Tensor) -> tuple[int, int]:
    """(peak above what was allocated before the call, held from forward to backward), bytes."""
    import safeloss

    # Earlier calls' deferred check records (O(N) copies each) are released by a later call once
    # the GPU is done with them: flush them first, or they would be freed inside the measurement.
    safeloss.check_pending()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = fn(x, t)
    torch.cuda.synchronize()
    saved = torch.cuda.memory_allocated() - base
    grads = torch.autograd.grad(loss, (x,))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del loss, grads
    return peak, saved


# Workloads whose logits are at most this size are also timed as a replayed CUDA graph.
GRAPH_MAX_LOGITS = 256 << 20


def cuda_graph_time(fn: LossFn, x: Tensor, t: Tensor, s: Settings, inplace: bool = False) -> Timing:
    """GPU time of one fwd+bwd with the host out of the picture: captured once, replayed.

    For launch-bound shapes a Python loop measures the host (argument checks, dispatch, kernel
    launches), not the GPU; in a training step that host work overlaps the GPU work of the model,
    so both numbers matter. A provider that syncs with the host cannot be captured."""
    clean = x.detach().clone() if inplace else None  # before any call overwrites x
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, autotuning, JIT)
        for _ in range(3):
            _fwdbwd(fn, x, t)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _fwdbwd(fn, x, t)
    return cuda_time(graph.replay, s.cuda_warmup_ms, s.cuda_rep_ms,
                     _restorer([(x, t)], [clean], [0]) if clean is not None else None)


@dataclasses.dataclass
class Settings:
    cuda_warmup_ms: float = 25
    cuda_rep_ms: float = 100
    cpu_seconds: float = 2.0
    cpu_min_rounds: int = 5
    cpu_max_logits: int = _GiB  # CPU runs skip larger workloads (stock needs ~4x the logits)



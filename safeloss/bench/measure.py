"""Measurement: timers (CUDA events, interleaved CPU wall time) and what every section shares.

No workload or provider lives here: ``safeloss.bench`` (cross-entropy) and ``safeloss.bench.linear``
(linear + cross-entropy) both time with these.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Skip(Exception):
    """A provider cannot run this workload here; the message says why (shown as a note)."""



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


def cpu_time_interleaved(fns: dict[str, Callable[[], object]], seconds: float, min_rounds: int) -> dict[str, Timing]:
    """Wall time per call, providers interleaved call by call in a rotating order, until both
    ``min_rounds`` rounds and ``seconds`` have passed. One warm-up round is not counted."""
    names = list(fns)
    for name in names:
        fns[name]()
    ms: dict[str, list[float]] = {name: [] for name in names}
    deadline = time.perf_counter() + seconds
    r = 0
    while r < min_rounds or time.perf_counter() < deadline:
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter_ns()
            fns[name]()
            ms[name].append((time.perf_counter_ns() - t0) / 1e6)
        r += 1
    return {name: _summary(v) for name, v in ms.items()}



"""``safeloss bench``: speed and memory of safeloss against stock torch and the best kernels.

Every number in a run comes from that run: the providers are measured in the same process, on
identical inputs, against stock eager torch and against the device's own copy bandwidth measured
at the start. Methods (bytes counted, bandwidth, memory) are documented in ``benchmarks/README.md``.

* CUDA: ``triton.testing.do_bench`` (CUDA events, warm-up excluded, L2 flushed between calls;
  median and 20/80% quantiles), providers one after the other; inputs rotated through a pool
  larger than L2; peak memory from ``torch.cuda.max_memory_allocated``.
* CPU: wall time of each call with ``time.perf_counter_ns``, providers interleaved call by call
  (so load from other processes hits all of them alike), many rounds, medians.

Nothing here runs at import; triton, matplotlib and the optional providers (Liger-Kernel, quack)
are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import importlib
import importlib.metadata
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .measure import _DTYPES, Skip, Timing, cpu_time_interleaved, cuda_time

# Stop starting new workloads after this many seconds (partial results are still written).
BUDGET_ENV = "SAFELOSS_BENCH_BUDGET_S"

_GiB = 1 << 30


# =============================================================================== workloads


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    family: str  # classification | llm | segmentation
    shape: tuple[int, ...]  # logits, classes in dim 1
    dtype: str  # key of _DTYPES
    prob: bool = False  # probability targets (the logits' shape) instead of class indices
    label_smoothing: float = 0.0

    @property
    def classes(self) -> int:
        return self.shape[1]

    @property
    def positions(self) -> int:
        return math.prod(self.shape) // self.shape[1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def variant(self) -> str:
        if self.prob:
            return "prob-target"
        if self.label_smoothing:
            return f"smooth{self.label_smoothing:g}"
        return "index"

    def logits_bytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize

    def target_bytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize if self.prob else self.positions * 8


def _cls(n: int, c: int, dt: str) -> Workload:
    return Workload(f"cls-N{n}-C{c}-{dt}", "classification", (n, c), dt)


def _llm(n: int, v: int, dt: str, prob: bool = False, eps: float = 0.0) -> Workload:
    tag = "prob-" if prob else f"smooth{eps:g}-" if eps else ""
    return Workload(f"llm-{tag}N{n}-V{v}-{dt}", "llm", (n, v), dt, prob, eps)


def _seg(b: int, c: int, h: int, w: int, dt: str) -> Workload:
    return Workload(f"seg-B{b}-C{c}-{h}x{w}-{dt}", "segmentation", (b, c, h, w), dt)


def full_workloads() -> list[Workload]:
    """The issue's matrix: classification, LLM vocabularies, segmentation, prob / smoothing; bf16 and fp32."""
    out: list[Workload] = []
    for dt in ("bf16", "fp32"):
        out += [_cls(n, c, dt) for n in (256, 4096, 65536) for c in (10, 100, 1000)]
        out += [_llm(n, v, dt) for n in (4096, 8192, 16384) for v in (32000, 128256, 151936, 262144)]
        out += [_seg(8, 21, 512, 512, dt), _seg(8, 150, 512, 512, dt)]
        out += [_llm(8192, 128256, dt, prob=True), _llm(8192, 128256, dt, eps=0.1)]
    return out


def quick_workloads(device: str) -> list[Workload]:
    """Small presets. CUDA: exactly what the GPU targets need, target shapes first, so that one
    run answers them (see benchmarks/README.md). CPU: scaled-down shapes that finish in ~1-2 min."""
    if device == "cuda":
        return [
            _llm(8192, 128256, "bf16"),  # the headline target
            _cls(4096, 10, "fp32"), _cls(4096, 100, "fp32"),  # "not slower than stock eager"
            _llm(8192, 32000, "bf16"), _llm(8192, 262144, "bf16"),  # the curve against V
            _llm(8192, 128256, "bf16", eps=0.1), _llm(4096, 128256, "bf16", prob=True),
            _seg(8, 21, 512, 512, "bf16"),
            # the rest of the curve and the other dimensions, one step each
            _llm(8192, 151936, "bf16"), _llm(16384, 128256, "bf16"), _llm(8192, 128256, "fp32"),
            _seg(8, 150, 512, 512, "bf16"), _cls(65536, 1000, "bf16"),
        ]
    # Three points along C / V at a fixed N give the plots a trend; (256, 10) is all per-call overhead.
    return [
        _cls(256, 10, "fp32"), _cls(4096, 10, "fp32"), _cls(4096, 100, "fp32"), _cls(4096, 1000, "fp32"),
        _llm(256, 32000, "fp32"), _llm(256, 50257, "fp32"), _llm(256, 128256, "fp32"),
        _llm(256, 32000, "bf16"), _llm(256, 32000, "fp32", prob=True), _llm(256, 32000, "fp32", eps=0.1),
        _seg(2, 21, 128, 128, "fp32"),
    ]


# =============================================================================== providers


# A provider's loss function: (logits, target) -> scalar mean loss, differentiable w.r.t. logits.
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    make: Callable[[Workload, torch.device], LossFn]  # raises Skip
    inplace: bool = False  # writes the gradient into the logits' storage (memory is O(N))
    context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None  # around its runs
    not_capturable: str = ""  # why it cannot run inside a CUDA graph (a host sync), if it cannot


def _safeloss(backend: str, inplace: bool = False) -> Callable[[Workload, torch.device], LossFn]:
    def make(w: Workload, dev: torch.device) -> LossFn:
        import safeloss

        from ..backends.dispatch import triton_unavailable_reason

        if backend == "triton":
            if dev.type != "cuda":
                raise Skip("Triton runs on CUDA; on CPU only under TRITON_INTERPRET=1, far too slow to time")
            reason = triton_unavailable_reason(dev)
            if reason:
                raise Skip(reason)
        eps = w.label_smoothing
        return functools.partial(safeloss.cross_entropy, label_smoothing=eps, backend=backend,
                                 inplace_backward=inplace)

    return make


@contextlib.contextmanager
def _softmax_check_off() -> Iterator[None]:
    """The Triton kernel with its one optional check (the softmaxed-input scan) compiled out.

    The backend takes ``check_softmax=`` at its seam, ``triton_backend.row_losses``, which the
    public API does not expose; dispatch looks that function up at call time, so a partial with
    the flag off measures exactly the same pipeline minus the check. The other findings (bad
    targets, non-finite rows) are counted by the kernel unconditionally and cannot be turned off.
    """
    from ..backends import triton_backend as tb

    orig = tb.row_losses
    if "check_softmax" not in inspect.signature(orig).parameters:
        raise Skip("the Triton backend exposes no way to compile its checks out")
    tb.row_losses = functools.partial(orig, check_softmax=False)
    try:
        yield
    finally:
        tb.row_losses = orig


def _stock_fn(w: Workload) -> LossFn:
    eps = w.label_smoothing
    return lambda x, t: F.cross_entropy(x, t, label_smoothing=eps)


def _eager(w: Workload, dev: torch.device) -> LossFn:
    return _stock_fn(w)


def _compiled(w: Workload, dev: torch.device) -> LossFn:
    if not hasattr(torch, "compile"):
        raise Skip("torch.compile is not available in this torch")
    # A fresh cache per workload: dynamo's recompile limit would otherwise silently send later
    # shapes back to eager. dynamic=False: kernels specialised to the shape, compile's best case.
    torch._dynamo.reset()
    return torch.compile(_stock_fn(w), dynamic=False)


def _liger(w: Workload, dev: torch.device) -> LossFn:
    if dev.type != "cuda":
        raise Skip("Liger-Kernel runs on CUDA only")
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy as fn
    except ImportError:
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except ImportError:
            raise Skip("Liger-Kernel is not installed (pip install liger-kernel)") from None
        fn = None
    if w.prob:
        raise Skip("Liger-Kernel takes class-index targets only")
    if len(w.shape) != 2:
        raise Skip("Liger-Kernel takes (N, C) logits only")
    eps = w.label_smoothing
    if fn is None:
        mod = LigerCrossEntropyLoss(label_smoothing=eps)
        return lambda x, t: mod(x, t)

    def call(x: Tensor, t: Tensor) -> Tensor:
        out = fn(x, t, label_smoothing=eps)
        return out[0] if isinstance(out, tuple) else out  # some versions return (loss, z_loss)

    return call


def _quack(w: Workload, dev: torch.device) -> LossFn:
    if dev.type != "cuda":
        raise Skip("quack runs on CUDA only")
    try:
        from quack.cross_entropy import cross_entropy as fn
    except ImportError:
        raise Skip("quack is not installed (pip install quack-kernels)") from None
    if w.prob or w.label_smoothing:
        raise Skip("quack takes class-index targets without label smoothing only")
    if len(w.shape) != 2:
        raise Skip("quack takes (N, C) logits only")
    if "reduction" in inspect.signature(fn).parameters:
        return lambda x, t: fn(x, t, reduction="mean")
    return lambda x, t: fn(x, t).mean()  # older quack returns per-row losses


PROVIDERS: list[Provider] = [
    Provider("torch-eager", _eager),
    Provider("torch-compile", _compiled),
    Provider("safeloss-torch", _safeloss("torch")),
    Provider("safeloss-triton", _safeloss("triton")),
    Provider("safeloss-triton-inplace", _safeloss("triton", inplace=True), inplace=True),
    Provider("safeloss-triton-nocheck", _safeloss("triton"), context=_softmax_check_off),
    Provider("liger", _liger, inplace=True,
             not_capturable="reads the number of non-ignored targets with .item(), a host sync"),
    Provider("quack", _quack),
]
BASELINE = "torch-eager"


# =============================================================================== inputs


def _seed(w: Workload) -> int:
    return zlib.crc32(w.name.encode())


def make_inputs(w: Workload, dev: torch.device, k: int) -> list[tuple[Tensor, Tensor]]:
    """``k`` (logits, target) pairs; the same values for every provider (seeded by the name)."""
    g = torch.Generator(device=dev).manual_seed(_seed(w))
    out = []
    for _ in range(k):
        x = torch.randn(w.shape, generator=g, device=dev, dtype=torch.float32)
        x = x.to(w.torch_dtype).requires_grad_()
        if w.prob:  # valid distributions, so safeloss's probability check stays quiet
            t = torch.randn(w.shape, generator=g, device=dev).softmax(1).to(w.torch_dtype)
        else:
            tshape = (w.shape[0], *w.shape[2:])
            t = torch.randint(0, w.classes, tshape, generator=g, device=dev)
        out.append((x, t))
    return out


def pool_size(w: Workload, dev: torch.device) -> int:
    """Copies to rotate through so the working set is at least twice the last-level cache."""
    per = w.logits_bytes() + w.target_bytes()
    if dev.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    else:
        cache = 32 << 20  # a generous L3 share
    return max(1, min(8, math.ceil(2 * cache / per)))


def reference_loss(w: Workload, x: Tensor, t: Tensor) -> float:
    """Mean loss in fp64 from the same inputs, in chunks so that huge logits need no fp64 copy."""
    total = 0.0
    step = max(1, (256 << 20) // (8 * (math.prod(x.shape) // x.shape[0])))
    with torch.no_grad():
        for i in range(0, x.shape[0], step):
            xs = x[i:i + step].double()
            ts = t[i:i + step].double() if w.prob else t[i:i + step]
            total += float(F.cross_entropy(xs, ts, label_smoothing=w.label_smoothing, reduction="sum"))
    return total / w.positions


# =============================================================================== bytes


def must_move_bytes(w: Workload) -> tuple[int, int]:
    """(forward, forward+backward) bytes any implementation must move: read the logits and the
    targets once; fwd+bwd also writes the gradient once (a fused kernel can do exactly that)."""
    x, t = w.logits_bytes(), w.target_bytes()
    return x + t, 2 * x + t


def streamed_bytes(w: Workload) -> int:
    """fwd+bwd bytes of the usual two-kernel design (and of safeloss's kernel for rows too long
    for one block): the forward reads the logits, the backward reads them again and writes the
    gradient; probability targets are read in both."""
    x, t = w.logits_bytes(), w.target_bytes()
    return 3 * x + (2 * t if w.prob else t)


# =============================================================================== timing


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


# =============================================================================== one workload


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


def _base_row(w: Workload, p: Provider) -> dict[str, Any]:
    fwd_b, fb_b = must_move_bytes(w)
    return {
        "workload": w.name, "family": w.family, "shape": list(w.shape), "positions": w.positions,
        "classes": w.classes, "dtype": w.dtype, "target": "prob" if w.prob else "index",
        "label_smoothing": w.label_smoothing, "provider": p.name, "inplace": p.inplace,
        "status": "ok", "note": "", "bytes_fwd": fwd_b, "bytes_fwdbwd": fb_b,
        "bytes_fwdbwd_streamed": streamed_bytes(w), "grad_bytes": w.logits_bytes(),
    }


def _error_note(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def _measure(p: Provider, w: Workload, dev: torch.device, s: Settings, k: int, ref: float,
             row: dict[str, Any]) -> tuple[LossFn, list[tuple[Tensor, Tensor]]] | None:
    """Check and, on CUDA, time and measure one provider. A function of its own so that its inputs
    are freed when it returns or raises (before the next provider allocates its own).
    On CPU, returns the loss function and its inputs for the interleaved timing."""
    fn = p.make(w, dev)
    with p.context() if p.context else contextlib.nullcontext():
        pool = make_inputs(w, dev, k)
        # Correctness first (also compiles / JITs): a fast wrong answer is not a result.
        loss = float(fn(*pool[0]).detach())
        row["loss_rel_err"] = abs(loss - ref) / max(abs(ref), 1e-12)
        _fwdbwd(fn, *pool[-1])
        if dev.type != "cuda":
            return fn, pool
        # In-place providers overwrite their logits with the gradient: restore them before every
        # timed call (outside the timed interval), or later calls would time a different input.
        clean = [x.detach().clone() for x, _ in pool] if p.inplace else None
        for key, step in (("fwd", _fwd), ("fwdbwd", _fwdbwd)):
            at = [0]
            row[key] = cuda_time(_rotating(step, fn, pool, at), s.cuda_warmup_ms, s.cuda_rep_ms,
                                 _restorer(pool, clean, at))
        del clean
        del pool
        x, t = make_inputs(w, dev, 1)[0]
        row["peak_mem_bytes"], row["saved_mem_bytes"] = cuda_memory(fn, x, t)
        if w.logits_bytes() <= GRAPH_MAX_LOGITS and p.not_capturable:
            row["note"] = f"no CUDA graph time: {p.not_capturable}"
        elif w.logits_bytes() <= GRAPH_MAX_LOGITS:
            try:
                row["graph_fwdbwd_ms"] = cuda_graph_time(fn, x, t, s, p.inplace).median_ms
            except Exception as e:  # e.g. a host sync inside the provider: not capturable
                row["note"] = f"not capturable in a CUDA graph ({_error_note(e)})"[:300]
    return None


def _checks_ratio(w: Workload, dev: torch.device, s: Settings, k: int, rounds: int = 3) -> float:
    """fwd+bwd time with the kernel's optional check on / compiled out, measured alternately
    (on, off, on, off...) on the same inputs; median of the per-round ratios. The target is a few
    percent, below what two do_bench calls minutes apart can resolve reliably (clocks drift)."""
    fn = _safeloss("triton")(w, dev)
    pool = make_inputs(w, dev, k)
    ratios = []
    for _ in range(rounds):
        a = cuda_time(_rotating(_fwdbwd, fn, pool), s.cuda_warmup_ms, s.cuda_rep_ms).median_ms
        with _softmax_check_off():
            b = cuda_time(_rotating(_fwdbwd, fn, pool), s.cuda_warmup_ms, s.cuda_rep_ms).median_ms
        ratios.append(a / b)
    return statistics.median(ratios)


def run_workload(w: Workload, providers: list[Provider], dev: torch.device, s: Settings,
                 tick: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = {p.name: _base_row(w, p) for p in providers}
    if dev.type == "cpu" and w.logits_bytes() > s.cpu_max_logits:
        for r in rows.values():
            r.update(status="skipped", note=f"logits of {w.logits_bytes() / _GiB:.1f} GiB: too large for a CPU run")
        tick(w.name)
        return list(rows.values())
    k = pool_size(w, dev)
    ref = reference_loss(w, *make_inputs(w, dev, 1)[0])
    fns: dict[str, LossFn] = {}
    pools: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for p in providers:
        row = rows[p.name]
        try:
            kept = _measure(p, w, dev, s, k, ref, row)
            if kept is not None:  # CPU: timed below, all providers together
                fns[p.name], pools[p.name] = kept
        except Skip as e:
            row.update(status="skipped", note=str(e))
        except torch.cuda.OutOfMemoryError as e:
            row.update(status="oom", note=_error_note(e))
        except Exception as e:  # one provider's failure must not end the run; it is reported
            row.update(status="error", note=_error_note(e))
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        if dev.type == "cuda":
            tick(w.name)
    on, off = rows.get("safeloss-triton"), rows.get("safeloss-triton-nocheck")
    if dev.type == "cuda" and on and off and on["status"] == off["status"] == "ok":
        try:
            off["checks_ratio_paired"] = _checks_ratio(w, dev, s, k)
        except Exception as e:
            off["note"] = f"paired checks comparison failed: {_error_note(e)}"
        finally:
            torch.cuda.empty_cache()
    if dev.type == "cpu" and fns:
        # Interleaved, so that whatever else runs on the machine slows every provider alike.
        for step, key in ((_fwd, "fwd"), (_fwdbwd, "fwdbwd")):
            try:
                times = cpu_time_interleaved(
                    {n: _rotating(step, fns[n], pools[n]) for n in fns}, s.cpu_seconds, s.cpu_min_rounds)
            except Exception as e:
                for n in fns:
                    rows[n].update(status="error", note=_error_note(e))
                break
            for n, tm in times.items():
                rows[n][key] = tm
        tick(w.name)
    return [_finish(r, rows.get(BASELINE)) for r in rows.values()]


def _finish(row: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """Flatten timings, add speedups against the baseline and bandwidth."""
    for key in ("fwd", "fwdbwd"):
        tm = row.pop(key, None)
        if not isinstance(tm, Timing):
            continue
        row[f"{key}_ms"], row[f"{key}_q20_ms"], row[f"{key}_q80_ms"] = tm.median_ms, tm.q20_ms, tm.q80_ms
        row[f"{key}_reps"] = tm.reps
        row[f"gbps_{key}"] = row[f"bytes_{key}"] / (tm.median_ms * 1e-3) / 1e9
    if "fwdbwd_ms" in row:
        row["gbps_fwdbwd_streamed"] = row["bytes_fwdbwd_streamed"] / (row["fwdbwd_ms"] * 1e-3) / 1e9
    if base is not None and row.get("graph_fwdbwd_ms") and base.get("graph_fwdbwd_ms"):
        row["speedup_graph_fwdbwd"] = base["graph_fwdbwd_ms"] / row["graph_fwdbwd_ms"]
    if "peak_mem_bytes" in row and not row["inplace"]:
        row["peak_minus_grad_bytes"] = row["peak_mem_bytes"] - row["grad_bytes"]
    if base is not None:
        for key in ("fwd", "fwdbwd"):
            b = base.get(f"{key}_ms") if isinstance(base.get(f"{key}_ms"), float) else None
            if b is None and isinstance(base.get(key), Timing):
                b = base[key].median_ms
            if b and f"{key}_ms" in row:
                row[f"speedup_{key}"] = b / row[f"{key}_ms"]
    # A speedup is as noisy as the noisier of its two timings.
    wide = []
    for key in ("fwd", "fwdbwd"):
        own = spread(row, key)
        if own is not None:
            row[f"{key}_spread"] = own
        if own is None:
            continue  # a skipped row has no timing to distrust
        both = [v for v in (own, spread(base, key) if base is not None else None) if v is not None]
        if both and max(both) > SPREAD_MAX:
            wide.append(f"{'fwd+bwd' if key == 'fwdbwd' else key} {max(both):.0%}")
    if wide:
        row["noisy"] = True
        row["note"] = "; ".join(filter(None, [
            row.get("note", ""),
            f"too noisy to trust: q20-q80 spread {', '.join(wide)} of the median "
            f"(this row's or torch-eager's; limit {SPREAD_MAX:.0%})",
        ]))
    return row


# =============================================================================== metadata


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git() -> tuple[str | None, bool | None]:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return commit, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None, None


def metadata(dev: torch.device, preset: str) -> dict[str, Any]:
    import safeloss

    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        name, mem = props.name, props.total_memory
    else:
        name, mem = platform.processor() or platform.machine(), None
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    commit, dirty = _git()
    return {
        "device": name, "device_type": dev.type, "device_memory_bytes": mem,
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": _version("triton"), "safeloss": safeloss.__version__,
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "quack": _version("quack-kernels"), "python": platform.python_version(),
        "git_commit": commit, "git_dirty": dirty, "preset": preset,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# =============================================================================== reports


def _fmt_ms(v: Any) -> str:
    if not isinstance(v, float):
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _fmt_spread(r: dict[str, Any]) -> str:
    """The fwd+bwd q20..q80 interval in ms and its width as a share of the median."""
    lo, hi, sp = r.get("fwdbwd_q20_ms"), r.get("fwdbwd_q80_ms"), r.get("fwdbwd_spread")
    if not isinstance(sp, float):
        return "-"
    return f"{_fmt_ms(lo)}-{_fmt_ms(hi)} ({sp:.0%})"


def _fmt_x(v: Any) -> str:
    return f"{v:.2f}x" if isinstance(v, float) else "-"


def _fmt_gbps(v: Any) -> str:
    if not isinstance(v, float):
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _fmt_mib(v: Any) -> str:
    return f"{v / (1 << 20):.1f}" if isinstance(v, int) else "-"


def _cell(text: str) -> str:
    """Text for a markdown table cell: a '|' (in an exception message, say) would split it."""
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]], notes: list[str]) -> str:
    cuda = meta["device_type"] == "cuda"
    lines = [
        f"# safeloss bench ({meta['preset']})", "",
        f"- device: **{meta['device']}** ({meta['device_type']}), copy bandwidth measured in this "
        f"run: **{meta.get('copy_gbps', 0):.0f} GB/s**",
        f"- torch {meta['torch']}, triton {meta['triton']}, safeloss {meta['safeloss']}, "
        f"liger-kernel {meta['liger_kernel']}, quack {meta['quack']}, python {meta['python']}",
        f"- git {meta['git_commit']}{' (dirty)' if meta['git_dirty'] else ''}, {meta['timestamp']}",
        "- times: median ms " + ("(CUDA events, do_bench)" if cuda else
                                 f"(wall clock, providers interleaved, {meta['cpu_threads']} "
                                 f"thread{'s' if meta['cpu_threads'] != 1 else ''})")
        + "; q20-q80: the middle 60% of the calls, and its width over the median; a row whose "
        f"spread (or torch-eager's) exceeds {SPREAD_MAX:.0%} is marked (noisy): its speedup is not "
        "to be trusted"
        + "; speedup = torch-eager time / provider time, same run; GB/s counts the bytes every "
        "implementation must move (logits + targets; fwd+bwd adds the gradient write); "
        "%copy = that GB/s over the copy bandwidth; peak = memory above the inputs during fwd+bwd "
        "(CUDA only); held = memory kept from forward to backward. Method: benchmarks/README.md", "",
    ]
    if cuda:
        lines += targets(rows) + [""]
    by_wl: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_wl.setdefault(r["workload"], []).append(r)
    for wl, rs in by_wl.items():
        r0 = rs[0]
        graph = any(r.get("graph_fwdbwd_ms") for r in rs)
        lines += [f"## {wl}", "",
                  f"logits {tuple(r0['shape'])} {r0['dtype']}, {r0['target']} targets"
                  + (f", label_smoothing={r0['label_smoothing']:g}" if r0["label_smoothing"] else ""), "",
                  "| provider | fwd ms | fwd+bwd ms | fwd+bwd q20-q80 | speedup fwd | speedup fwd+bwd | GB/s fwd+bwd "
                  "| %copy | %copy (3-pass) | peak MiB | held MiB | loss rel err |"
                  + (" fwd+bwd ms, CUDA graph | speedup, CUDA graph |" if graph else "") + " note |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if graph else "")
                  + "---|"]
        copy = meta.get("copy_gbps") or float("nan")
        for r in rs:
            if r["status"] != "ok":
                lines.append(f"| {r['provider']} | - | - | - | - | - | - | - | - | - | - | - | "
                             + ("- | - | " if graph else "") + f"{r['status']}: {_cell(r['note'])} |")
                continue
            g = r.get("gbps_fwdbwd")
            gs = r.get("gbps_fwdbwd_streamed")
            err = r.get("loss_rel_err")
            flag = " (noisy)" if r.get("noisy") else ""
            lines.append(
                f"| {r['provider']} | {_fmt_ms(r.get('fwd_ms'))} | {_fmt_ms(r.get('fwdbwd_ms'))} | "
                f"{_fmt_spread(r)} | "
                f"{_fmt_x(r.get('speedup_fwd'))}{flag} | {_fmt_x(r.get('speedup_fwdbwd'))}{flag} | "
                f"{_fmt_gbps(g)} | {f'{100 * g / copy:.0f}%' if g else '-'} | "
                f"{f'{100 * gs / copy:.0f}%' if gs else '-'} | {_fmt_mib(r.get('peak_mem_bytes'))} | "
                f"{_fmt_mib(r.get('saved_mem_bytes'))} | {f'{err:.1e}' if err is not None else '-'} | "
                + (f"{_fmt_ms(r.get('graph_fwdbwd_ms'))} | {_fmt_x(r.get('speedup_graph_fwdbwd'))} | "
                   if graph else "")
                + _cell("; ".join(filter(None, ["in-place gradient" if r["inplace"] else "", r.get("note", "")])))
                + " |")
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _get(rows: list[dict[str, Any]], wl: str, prov: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["workload"] == wl and r["provider"] == prov and r["status"] == "ok"), None)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's GPU targets, judged from this run's rows (n/a when a row is missing)."""
    out = ["## GPU targets (bf16 fwd+bwd unless noted)", "", "| target | value | verdict |", "|---|---:|---|"]

    def line(what: str, value: float | None, ok: bool | None, fmt: str = "{:.2f}x") -> None:
        verdict = "n/a" if ok is None else "PASS" if ok else "MISS"
        out.append(f"| {what} | {fmt.format(value) if value is not None else '-'} | {verdict} |")

    def ratio(wl: str, slow: str, fast: str, key: str = "fwdbwd_ms") -> float | None:
        a, b = _get(rows, wl, slow), _get(rows, wl, fast)
        return a[key] / b[key] if a and b and a.get(key) and b.get(key) else None

    head = "llm-N8192-V128256-bf16"
    for other, need in (("torch-eager", 2.5), ("torch-compile", 1.3), ("liger", 1.0)):
        v = ratio(head, other, "safeloss-triton")
        line(f"{head}: safeloss-triton vs {other} (>= {need}x)", v, None if v is None else v >= need)
    for prov in ("safeloss-triton", "safeloss-triton-inplace"):
        r = _get(rows, head, prov)
        copy = r.get("copy_gbps") if r else None
        for key, label in (("gbps_fwdbwd", "must-move bytes, 2 passes"),
                           ("gbps_fwdbwd_streamed", "bytes of the 3-pass design")):
            v = r[key] / copy if r and copy and r.get(key) else None
            line(f"{head}: {prov} bandwidth / copy ({label}) (>= 80%)", v,
                 None if v is None else v >= 0.8, "{:.0%}")
    r = _get(rows, head, "safeloss-triton")
    if r and "peak_minus_grad_bytes" in r:
        per_pos = r["peak_minus_grad_bytes"] / r["positions"]
        # O(N): a handful of fp32/int64 values per position (losses, lse, flags) plus allocator
        # rounding; 64 bytes per position is a generous allowance, the value is shown to judge.
        line(f"{head}: safeloss-triton peak - grad, bytes per position (<= O(N), ~<= 64)",
             per_pos, per_pos <= 64, "{:.1f} B")
    else:
        line(f"{head}: safeloss-triton peak - grad (<= O(N))", None, None)
    r = _get(rows, head, "safeloss-triton-inplace")
    if r and "peak_mem_bytes" in r:
        per_pos = r["peak_mem_bytes"] / r["positions"]
        line(f"{head}: safeloss-triton-inplace peak, bytes per position (O(N), ~<= 64)",
             per_pos, per_pos <= 64, "{:.1f} B")
    else:
        line(f"{head}: safeloss-triton-inplace peak (O(N))", None, None)
    for wl in ("cls-N4096-C10-fp32", "cls-N4096-C100-fp32"):
        v = ratio(wl, "torch-eager", "safeloss-triton")
        line(f"{wl}: safeloss-triton vs torch-eager (>= 1.0x, fp32), Python loop (host-bound)", v,
             None if v is None else v >= 1.0)
        v = ratio(wl, "torch-eager", "safeloss-triton", "graph_fwdbwd_ms")
        line(f"{wl}: safeloss-triton vs torch-eager (>= 1.0x, fp32), GPU time (CUDA graph replay)", v,
             None if v is None else v >= 1.0)
    for wl in (head, "cls-N4096-C10-fp32", "cls-N4096-C100-fp32"):
        r = _get(rows, wl, "safeloss-triton-nocheck")
        v = r.get("checks_ratio_paired") if r else None  # alternating measurement, else the plain one
        v = v if v is not None else ratio(wl, "safeloss-triton", "safeloss-triton-nocheck")
        line(f"{wl}: checks on / softmax check compiled out (<= 1.03x)", v, None if v is None else v <= 1.03)
    return out


def _fmt_count(c: int) -> str:
    if c >= 1000 and c % 1000 == 0:
        return f"{c // 1000}k"
    return f"{c / 1000:.1f}k" if c >= 10000 else str(c)


def plots(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """time / GB/s / memory against the number of classes, one panel per (family, variant,
    positions, dtype) with at least three class counts (two, or one, when no panel has three);
    a plot with nothing measured (memory on CPU) is not written. Returns the files written."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, NullLocator
    except ImportError:
        return []
    plain = FuncFormatter(lambda v, _pos: f"{v:.3g}")
    # Minor ticks of a log axis: label 2x and 5x only, or the labels overlap.
    sparse = FuncFormatter(lambda v, _pos: f"{v:.3g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else "")
    groups: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == "ok":
            variant = r["target"] if r["target"] == "prob" else f"smooth{r['label_smoothing']:g}" if r["label_smoothing"] else "index"
            groups.setdefault((r["family"], variant, r["positions"], r["dtype"]), []).append(r)
    # A trend needs three points; fewer where no group has them (a filtered run: every group).
    curves = ({k: v for k, v in groups.items() if len({r["classes"] for r in v}) >= 3}
              or {k: v for k, v in groups.items() if len({r["classes"] for r in v}) >= 2} or groups)
    written = []
    specs = [
        ("time_vs_classes.png", "fwdbwd_ms", "fwd+bwd median time (ms; band: q20-q80)", 1.0, True),
        ("bandwidth_vs_classes.png", "gbps_fwdbwd", "fwd+bwd GB/s (must-move bytes)", 1.0, False),
        ("memory_vs_classes.png", "peak_mem_bytes", "peak memory above inputs (MiB)", 1 / (1 << 20), True),
    ]
    for fname, key, ylabel, scale, logy in specs:
        if not any(isinstance(r.get(key), (int, float)) for v in curves.values() for r in v):
            continue  # e.g. memory on CPU, which is not measured: no empty plot
        keys = sorted(curves)
        ncol = min(3, max(1, len(keys)))
        nrow = max(1, math.ceil(len(keys) / ncol))
        fig = Figure(figsize=(5.5 * ncol, 4 * nrow), layout="constrained")
        axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
        any_data = False
        for ax, gk in zip(axes, keys):
            fam, variant, n, dt = gk
            provs: dict[str, list[tuple[int, float]]] = {}
            for r in curves[gk]:
                if isinstance(r.get(key), (int, float)):
                    provs.setdefault(r["provider"], []).append((r["classes"], r[key] * scale))
            for prov, pts in sorted(provs.items()):
                pts.sort()
                # The q20..q80 band around the median: a trend narrower than it is not one.
                band = [r for r in sorted(curves[gk], key=lambda r: r["classes"]) if r["provider"] == prov
                        and isinstance(r.get(key), (int, float))]
                line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)[0]
                if key == "fwdbwd_ms" and all(isinstance(r.get("fwdbwd_q20_ms"), float) for r in band):
                    ax.fill_between([r["classes"] for r in band], [r["fwdbwd_q20_ms"] for r in band],
                                    [r["fwdbwd_q80_ms"] for r in band], color=line.get_color(), alpha=0.12,
                                    lw=0)
                any_data = True
            if key == "gbps_fwdbwd" and meta.get("copy_gbps"):
                ax.axhline(meta["copy_gbps"], color="k", ls="--", lw=1, label="copy bandwidth")
            ax.set_title(f"{fam} {variant}, N={n}, {dt}", fontsize=9)
            ax.set_xscale("log")
            # Ticks at the measured class counts, in plain numbers (10, 1k, 128k), not 10^x.
            cs = sorted({r["classes"] for r in curves[gk]})
            ax.set_xticks(cs, [_fmt_count(c) for c in cs])
            ax.xaxis.set_minor_locator(NullLocator())
            if logy and provs:
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(sparse)
            ax.set_xlabel("classes C (vocabulary V)")
            ax.set_ylabel(ylabel)
            if provs:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not measured on CPU" if key == "peak_mem_bytes" else "no data",
                        ha="center", va="center", transform=ax.transAxes)
        for ax in axes[len(keys):]:
            ax.set_visible(False)
        if not keys:
            axes[0].text(0.5, 0.5, "no successful rows", ha="center", va="center")
        fig.suptitle(f"safeloss bench - {meta['device']} ({meta['device_type']}), "
                     f"{meta['timestamp']}" + ("" if any_data else " - no data"), fontsize=10)
        fig.savefig(out / fname, dpi=110)
        written.append(fname)
    return written


# =============================================================================== progress


class _Progress:
    """tqdm when installed (an optional nicety, not a dependency), else one line per step."""

    def __init__(self, total: int) -> None:
        self.bar: Any = None
        self.n, self.total = 0, total
        self.t0 = time.perf_counter()
        with contextlib.suppress(ImportError):
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, label: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        else:
            print(f"[{self.n}/{self.total} {time.perf_counter() - self.t0:6.1f}s] {label}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# =============================================================================== entry point


def _write(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]], notes: list[str]) -> None:
    full = [{**meta, **r} for r in rows]  # every row self-contained (device, versions, commit...)
    (out / "results.json").write_text(json.dumps({"meta": meta, "notes": notes, "rows": full}, indent=1))
    (out / "results.md").write_text(markdown(meta, rows, notes))


def main(quick: bool = False, device: str | None = None, out: str = "bench-out",
         workloads: list[str] | None = None, threads: int | None = None) -> int:
    """Run the benchmark; write results.json, results.md and PNG plots into ``out``.

    ``threads``: torch's intra-op threads for the run; on CPU one by default. With more, an op
    large enough to go parallel stalls for a scheduler slice whenever another process holds a
    core, and on a shared machine the ratios become noise (1.6x "speedups" of identical code).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("safeloss bench: --device cuda, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device(device)
    preset = "quick" if quick else "full"
    wls = quick_workloads(dev.type) if quick else full_workloads()
    from . import linear as bench_linear  # the linear + cross-entropy heads: their own section

    heads = bench_linear.select(dev.type, quick, workloads)
    if workloads:
        wls = [w for w in wls if any(pat in w.name for pat in workloads)]
        if not wls and not heads:
            names = ", ".join(w.name for w in (quick_workloads(dev.type) if quick else full_workloads()))
            print(f"safeloss bench: no {preset} workload matches {workloads}; available: {names}", file=sys.stderr)
            return 2
    settings = Settings()
    if quick:
        settings = Settings(cuda_warmup_ms=25, cuda_rep_ms=150, cpu_seconds=0.5, cpu_min_rounds=5)
    if threads is not None and threads < 1:
        print(f"safeloss bench: --threads must be at least 1, got {threads}", file=sys.stderr)
        return 2
    budget = float(os.environ.get(BUDGET_ENV, "inf"))
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    old_threads = torch.get_num_threads()
    if threads is not None or dev.type == "cpu":
        torch.set_num_threads(threads or 1)
    try:
        with _quiet_compile_workers(dev):
            rc = _run(wls, dev, preset, quick, settings, budget, outdir) if wls else 0
        return rc or (bench_linear.run(heads, dev, quick, outdir) if heads else 0)
    finally:
        torch.set_num_threads(old_threads)


@contextlib.contextmanager
def _quiet_compile_workers(dev: torch.device) -> Iterator[None]:
    """On CPU, compile in-process: inductor's pool of compile subprocesses keeps the cores busy
    for seconds after a compile and slows every provider timed meanwhile (measured: 200x on 2
    cores). Only compile speed changes, not the generated code. CUDA timing is unaffected."""
    if dev.type != "cpu":
        yield
        return
    try:
        from torch._inductor import config
    except ImportError:
        yield
        return
    old = config.compile_threads
    config.compile_threads = 1
    try:
        yield
    finally:
        config.compile_threads = old


def _run(wls: list[Workload], dev: torch.device, preset: str, quick: bool, settings: Settings,
         budget: float, outdir: Path) -> int:
    meta = metadata(dev, preset)
    meta["copy_gbps"] = copy_bandwidth(dev, quick)
    print(f"safeloss bench ({preset}) on {meta['device']} ({dev.type}); copy bandwidth "
          f"{meta['copy_gbps']:.0f} GB/s; {len(wls)} workloads -> {outdir}", file=sys.stderr)
    notes: list[str] = []
    if dev.type == "cpu":
        notes.append("CPU run: safeloss-triton, Liger and quack need CUDA and are skipped; peak memory "
                     "is measured on CUDA only.")
    rows: list[dict[str, Any]] = []
    steps = len(wls) * (len(PROVIDERS) if dev.type == "cuda" else 1)
    progress = _Progress(steps)
    t0 = time.perf_counter()
    try:
        for w in wls:
            if time.perf_counter() - t0 > budget:
                note = f"not run: the {BUDGET_ENV}={budget:g} s budget was spent"
                rows += [{**_base_row(w, p), "status": "skipped", "note": note} for p in PROVIDERS]
                if note not in notes:
                    notes.append(note)
                for _ in range(steps // len(wls)):
                    progress(w.name)
                continue
            rows += run_workload(w, PROVIDERS, dev, settings, progress)
            for r in rows[-len(PROVIDERS):]:
                r["copy_gbps"] = meta["copy_gbps"]
            _write(outdir, meta, rows, notes)  # partial results survive a kill
    finally:
        progress.close()
    written = plots(outdir, meta, rows)
    if not written:
        notes.append("matplotlib is not installed: no plots (pip install 'safeloss[bench]').")
    _write(outdir, meta, rows, notes)
    print(markdown(meta, rows, notes))
    print(f"wrote {outdir / 'results.json'}, {outdir / 'results.md'}"
          + "".join(f", {outdir / f}" for f in written), file=sys.stderr)
    return 0

"""The linear + cross-entropy section of ``safeloss bench``: LLM heads, (hidden states, head
weight, labels) -> mean loss, forward + backward (d/dinput and d/dlinear_weight).

Providers: stock torch's reference path (``options=None``: the full logits), stock's chunked path
(``options=LinearCrossEntropyOptions()``), safeloss (torch tiles; Triton tiles on CUDA),
Liger-Kernel's fused linear cross-entropy and Apple's Cut Cross-Entropy (optional extras,
CUDA only, skipped with a note where not importable).

Every provider is measured the same way, after one warm-up call (one-time initialisation, such as
stock's first-call setup, is not a per-call cost):

* Time: CPU wall time, providers interleaved call by call in rotating order for several rounds
  (``_interleaved``); ratios are medians of the per-round ratios, with their range, because on a
  shared machine the absolute times drift between rounds. CUDA: CUDA events (``bench.cuda_time``).
* Memory: the peak of live tensor bytes during one forward + backward, minus what was live before
  it (the inputs); "extra" also subtracts the gradients the call returns. CUDA:
  ``torch.cuda.max_memory_allocated``. CPU: the allocator's own records (``torch.profiler`` with
  ``profile_memory``: every allocation and free of torch's CPU allocator, inside custom ops too),
  in a fresh process per provider; checked against the process's peak resident set in the same
  process (glibc told to return freed memory, so that freed-but-cached pages neither hide nor
  inflate a peak). Memory that a BLAS library allocates by itself is only in the second number.

Results: ``linear_results.json`` and ``linear_results.md`` next to the cross-entropy results.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import measure as bench

_MiB = 1 << 20
_STOCK: Callable[..., Tensor] | None = getattr(torch.nn.functional, "linear_cross_entropy", None)


@dataclasses.dataclass(frozen=True)
class Head:
    n: int  # rows (tokens)
    h: int  # hidden size
    c: int  # vocabulary
    dtype: str  # key of bench._DTYPES

    @property
    def name(self) -> str:
        return f"lce-N{self.n}-H{self.h}-V{self.c}-{self.dtype}"

    @property
    def input_bytes(self) -> int:
        el = bench._DTYPES[self.dtype].itemsize
        return (self.n * self.h + self.c * self.h) * el + self.n * 8


def heads(device: str, quick: bool) -> list[Head]:
    if device == "cuda":
        out = [Head(8192, 4096, 128256, "bf16")]  # the GPU target shape first
        out += [Head(4096, 4096, v, "bf16") for v in (32000, 128256, 262144)]
        return out if quick else out + [Head(8192, 4096, 128256, "fp32")]
    return [Head(4096, 64, 50000, "fp32")]  # the CPU target shape


def select(device: str, quick: bool, patterns: list[str] | None) -> list[Head]:
    hs = heads(device, quick)
    if patterns:
        hs = [h for h in hs if any(p in h.name for p in patterns)]
    return hs


# ------------------------------------------------------------------------------ providers

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, W, labels) -> mean loss


def _stock_reference(dev: torch.device) -> LossFn:
    if _STOCK is None:
        raise bench.Skip("this torch has no F.linear_cross_entropy (torch >= 2.13)")
    return lambda x, w, t: _STOCK(x, w, t)


def _stock_chunked(dev: torch.device) -> LossFn:
    if _STOCK is None:
        raise bench.Skip("this torch has no F.linear_cross_entropy (torch >= 2.13)")
    opts = torch.nn.LinearCrossEntropyOptions()
    return lambda x, w, t: _STOCK(x, w, t, options=opts)


def _safeloss(backend: str) -> Callable[[torch.device], LossFn]:
    def make(dev: torch.device) -> LossFn:
        import safeloss

        from ..backends.dispatch import triton_unavailable_reason

        if backend == "triton":
            if dev.type != "cuda":
                raise bench.Skip("the Triton tile runs on CUDA")
            reason = triton_unavailable_reason(dev)
            if reason:
                raise bench.Skip(reason)
        return lambda x, w, t: safeloss.linear_cross_entropy(x, w, t, backend=backend)

    return make


def _liger(dev: torch.device) -> LossFn:
    if dev.type != "cuda":
        raise bench.Skip("Liger-Kernel runs on CUDA")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        raise bench.Skip(f"liger-kernel not importable ({e}); pip install liger-kernel") from None
    fn = LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, t: fn(w, x, t)


def _cce(dev: torch.device) -> LossFn:
    if dev.type != "cuda":
        raise bench.Skip("Cut Cross-Entropy runs on CUDA")
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError as e:
        raise bench.Skip(f"cut-cross-entropy not importable ({e}); pip install cut-cross-entropy") from None
    return lambda x, w, t: cce(x, w, t)


PROVIDERS: dict[str, Callable[[torch.device], LossFn]] = {
    "stock-reference": _stock_reference,
    "stock-chunked": _stock_chunked,
    "safeloss-torch": _safeloss("torch"),
    "safeloss-triton": _safeloss("triton"),
    "liger": _liger,
    "cce": _cce,
}
BASELINE = "stock-reference"


def inputs(hd: Head, dev: torch.device, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = bench._DTYPES[hd.dtype]
    x = torch.randn(hd.n, hd.h, generator=g).to(dev, dt).requires_grad_(True)
    w = (torch.randn(hd.c, hd.h, generator=g) / hd.h ** 0.5).to(dev, dt).requires_grad_(True)
    t = torch.randint(0, hd.c, (hd.n,), generator=g).to(dev)
    return x, w, t


def _step(fn: LossFn, x: Tensor, w: Tensor, t: Tensor) -> Callable[[], None]:
    def call() -> None:
        x.grad = w.grad = None
        fn(x, w, t).backward()

    return call


# ------------------------------------------------------------------------------ memory

# glibc returns freed blocks of 128 KiB and more to the system at once: the resident-set cross-check
# then follows the allocations instead of the heap's high-water mark.
_GLIBC_RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
                       "MALLOC_TOP_PAD_": "0"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def allocator_peak(call: Callable[[], None]) -> int:
    """Peak of live bytes of torch's CPU allocator during ``call``, above what was live before it,
    from the profiler's allocation records (one per allocation and free, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = prof.profiler.kineto_results.events() if prof.profiler is not None else []
    deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return peak


def cpu_peak_probe(provider: str, hd: Head, threads: int) -> dict[str, int]:
    """In this (fresh) process, after one warm-up call: bytes above the inputs during one
    forward + backward (``peak``: allocator records; ``rss_peak``: resident set, meaningful with
    ``_GLIBC_RETURN_FREED`` in the environment) and the bytes of the gradients it returns."""
    torch.set_num_threads(threads)
    fn = PROVIDERS[provider](torch.device("cpu"))
    x, w, t = inputs(hd, torch.device("cpu"))
    step = _step(fn, x, w, t)
    step()  # warm-up
    x.grad = w.grad = None
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _status_kib("VmRSS")
    step()
    rss = (_status_kib("VmHWM") - base) * 1024
    grads = sum(v.grad.nbytes for v in (x, w) if v.grad is not None)
    x.grad = w.grad = None
    gc.collect()
    return {"peak": allocator_peak(step), "rss_peak": rss, "grads": grads}


def _cpu_peak(provider: str, hd: Head) -> tuple[dict[str, int] | None, str]:
    code = (
        "import sys, json; from safeloss.bench import linear as b; "
        f"hd = b.Head({hd.n}, {hd.h}, {hd.c}, {hd.dtype!r}); "
        f"print(json.dumps(b.cpu_peak_probe({provider!r}, hd, {torch.get_num_threads()})))"
    )
    # (a GLIBC_TUNABLES that keeps freed memory, for the timings, would defeat the cross-check)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(_GLIBC_RETURN_FREED, PYTHONPATH=os.pathsep.join(sys.path))
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    except subprocess.TimeoutExpired:
        return None, "memory probe timed out"
    if r.returncode != 0:
        return None, "memory probe failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:200]
    return json.loads(r.stdout.strip().splitlines()[-1]), ""


def _cuda_peak(fn: LossFn, x: Tensor, w: Tensor, t: Tensor) -> dict[str, int]:
    import safeloss

    _step(fn, x, w, t)()  # warm-up: kernels compiled, caches built
    x.grad = w.grad = None
    # The warm-up's deferred check records are released by a later call once the GPU is done
    # with them: flush them now, or they are freed inside the measurement (peak understated).
    safeloss.check_pending()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(fn, x, w, t)()
    torch.cuda.synchronize()
    grads = sum(v.grad.nbytes for v in (x, w) if v.grad is not None)
    return {"peak": torch.cuda.max_memory_allocated() - base, "grads": grads}


# ------------------------------------------------------------------------------ time


def _interleaved(fns: dict[str, Callable[[], None]], rounds: int, label: str) -> dict[str, list[float]]:
    """Wall time (ms) of each provider, called once per round in a rotating order (every provider
    already warmed up). One call per provider per round, so a slow spell of the machine hits all
    of them within the same round and the per-round ratios stay comparable."""
    names = list(fns)
    ms: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        print(f"safeloss bench: {label}: timing round {r + 1}/{rounds}", file=sys.stderr, flush=True)
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter_ns()
            fns[name]()
            ms[name].append((time.perf_counter_ns() - t0) / 1e6)
    return ms


def _ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median, min and max over rounds of a[i] / b[i]."""
    rs = sorted(x / y for x, y in zip(a, b))
    return statistics.median(rs), rs[0], rs[-1]


# ------------------------------------------------------------------------------ the run


CPU_ROUNDS = {True: 3, False: 9}  # quick, full: one call of the reference path takes seconds


def run_head(hd: Head, dev: torch.device, quick: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    fns: dict[str, Callable[[], None]] = {}
    made: dict[str, LossFn] = {}
    x, w, t = inputs(hd, dev)
    for name, make in PROVIDERS.items():
        row: dict[str, Any] = {"workload": hd.name, "provider": name, "n": hd.n, "h": hd.h,
                               "c": hd.c, "dtype": hd.dtype, "device_type": dev.type,
                               "status": "ok", "note": ""}
        try:
            made[name] = make(dev)
        except bench.Skip as e:  # not runnable here: no row (the markdown lists why under the table)
            row.update(status="skipped", note=str(e))
            rows.append(row)
            continue
        rows.append(row)
        print(f"safeloss bench: {hd.name}: warm-up {name}", file=sys.stderr, flush=True)
        try:
            fns[name] = _step(made[name], x, w, t)
            fns[name]()
        except Exception as e:  # a provider that breaks must not stop the others
            row.update(status="error", note=f"{type(e).__name__}: {str(e)[:200]}")
            fns.pop(name, None)
    by = {r["provider"]: r for r in rows}
    if dev.type == "cpu":
        ms = _interleaved(fns, CPU_ROUNDS[quick], hd.name)
        for name, v in ms.items():
            by[name].update(fwdbwd_ms=statistics.median(v), fwdbwd_min_ms=min(v), fwdbwd_max_ms=max(v),
                            rounds=len(v))
        for ref, key in ((BASELINE, "reference"), ("stock-chunked", "stock_chunked")):
            if ref in ms:
                for name, v in ms.items():
                    med, lo, hi = _ratio(v, ms[ref])
                    by[name].update({f"time_vs_{key}": med, f"time_vs_{key}_min": lo, f"time_vs_{key}_max": hi})
    else:
        for name, f in fns.items():
            tm = bench.cuda_time(f, 25 if quick else 100, 200 if quick else 1000)
            by[name].update(fwdbwd_ms=tm.median_ms, fwdbwd_q20_ms=tm.q20_ms, fwdbwd_q80_ms=tm.q80_ms)
        for ref, key in ((BASELINE, "reference"), ("stock-chunked", "stock_chunked")):
            base = by.get(ref, {}).get("fwdbwd_ms")
            for r in rows:
                if "fwdbwd_ms" in r and base:
                    r[f"time_vs_{key}"] = r["fwdbwd_ms"] / base
    for name in fns:
        print(f"safeloss bench: {hd.name}: memory of {name}", file=sys.stderr, flush=True)
        if dev.type == "cpu":
            mem, note = _cpu_peak(name, hd)
            if note:
                by[name]["note"] = note
        else:
            mem = _cuda_peak(made[name], x, w, t)
        if mem is not None:
            by[name].update(peak_mem_bytes=mem["peak"], grad_bytes=mem["grads"],
                            extra_mem_bytes=mem["peak"] - mem["grads"])
            if "rss_peak" in mem:
                by[name]["rss_peak_mem_bytes"] = mem["rss_peak"]
    return rows


def _mib(b: int | None) -> str:
    return "" if b is None else f"{b / _MiB:.1f} MiB"


def _x(r: dict[str, Any], key: str) -> str:
    if r.get(key) is None:
        return ""
    lo, hi = r.get(key + "_min"), r.get(key + "_max")
    return f"{r[key]:.2f}x" + (f" ({lo:.2f}-{hi:.2f})" if lo is not None else "")


def markdown(rows: list[dict[str, Any]], threads: int) -> str:
    ran = [r for r in rows if r["status"] != "skipped"]
    cpu = any(r["device_type"] == "cpu" for r in ran)
    rounds = max((r.get("rounds", 0) for r in ran), default=0)
    how = (f"CPU wall time, providers interleaved call by call for {rounds} rounds after a warm-up "
           "call each: median [min-max] of the rounds; ratios are medians (ranges) of the per-round "
           "ratios" if cpu else "CUDA events (median)")
    lines = [
        "## Linear + cross-entropy heads (fwd+bwd, mean loss)", "",
        f"torch threads: {threads}. Time: {how}. Memory, after a warm-up call: peak of live tensor "
        "bytes during one forward + backward above the inputs (gradients included), and the part of "
        "it that is not the returned gradients (\"extra\")"
        + ("; CPU: torch allocator records in a fresh process per provider, resident-set peak as a "
           "cross-check." if cpu else "."), "",
        "| workload | provider | fwd+bwd | vs stock chunked | vs reference | peak above inputs | extra | "
        + ("resident-set peak | " if cpu else "") + "note |",
        "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if cpu else "") + "---|",
    ]
    for r in ran:
        if "fwdbwd_ms" in r:
            ms = f"{r['fwdbwd_ms']:.0f} ms"
            if "fwdbwd_min_ms" in r:
                ms += f" [{r['fwdbwd_min_ms']:.0f}-{r['fwdbwd_max_ms']:.0f}]"
        else:
            ms = r["status"]
        cells = [r["workload"], r["provider"], ms, _x(r, "time_vs_stock_chunked"), _x(r, "time_vs_reference"),
                 _mib(r.get("peak_mem_bytes")), _mib(r.get("extra_mem_bytes"))]
        if cpu:
            cells.append(_mib(r.get("rss_peak_mem_bytes")))
        cells.append(r["note"].replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    skipped = [r for r in rows if r["status"] == "skipped"]
    if skipped:
        lines += ["", "Not run here: " + "; ".join(f"{r['provider']} ({r['note']})" for r in skipped) + "."]
    return "\n".join(lines) + "\n"


def run(hs: list[Head], dev: torch.device, quick: bool, out: Path) -> int:
    rows: list[dict[str, Any]] = []
    for hd in hs:
        print(f"safeloss bench: {hd.name}", file=sys.stderr, flush=True)
        rows += run_head(hd, dev, quick)
        (out / "linear_results.json").write_text(json.dumps({"rows": rows}, indent=1))
    md = markdown(rows, torch.get_num_threads())
    (out / "linear_results.md").write_text(md)
    print(md)
    return 0

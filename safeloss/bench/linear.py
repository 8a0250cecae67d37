"""The linear + cross-entropy section of ``safeloss bench``: LLM heads, (hidden states, head
weight, labels) -> mean loss, forward + backward (d/dinput and d/dlinear_weight).

Providers: stock torch's reference path (``options=None``: the full logits), stock's chunked path
(``options=LinearCrossEntropyOptions()``), safeloss (torch tiles; Triton tiles on CUDA),
Liger-Kernel's fused linear cross-entropy and Apple's Cut Cross-Entropy (optional extras,
CUDA only, skipped with a note where not importable).

* Time: CPU wall time interleaved call by call (``bench.cpu_time_interleaved``); CUDA events
  (``bench.cuda_time``).
* Memory, "above the inputs": the peak during one forward + backward minus what was allocated
  before it (the inputs), gradients included. CUDA: ``torch.cuda.max_memory_allocated``. CPU:
  the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) in a fresh
  subprocess per provider, so that no provider inherits another's freed-but-cached pages.

Results: ``linear_results.json`` and ``linear_results.md`` next to the cross-entropy results.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
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


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def cpu_peak_probe(provider: str, hd: Head, threads: int) -> int:
    """In this (fresh) process: bytes of resident memory above the inputs during one fwd+bwd."""
    torch.set_num_threads(threads)
    fn = PROVIDERS[provider](torch.device("cpu"))
    x, w, t = inputs(hd, torch.device("cpu"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    base = _status_kib("VmRSS")
    _step(fn, x, w, t)()
    return (_status_kib("VmHWM") - base) * 1024


def _cpu_peak(provider: str, hd: Head) -> tuple[int | None, str]:
    code = (
        "import sys, json; from safeloss.bench import linear as b; "
        f"hd = b.Head({hd.n}, {hd.h}, {hd.c}, {hd.dtype!r}); "
        f"print(json.dumps(b.cpu_peak_probe({provider!r}, hd, {torch.get_num_threads()})))"
    )
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    except subprocess.TimeoutExpired:
        return None, "memory probe timed out"
    if r.returncode != 0:
        return None, "memory probe failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:200]
    return int(json.loads(r.stdout.strip().splitlines()[-1])), ""


def _cuda_peak(fn: LossFn, x: Tensor, w: Tensor, t: Tensor) -> int:
    _step(fn, x, w, t)()  # warm-up: kernels compiled, caches built
    x.grad = w.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(fn, x, w, t)()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# ------------------------------------------------------------------------------ the run


def run_head(hd: Head, dev: torch.device, quick: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    fns: dict[str, Callable[[], None]] = {}
    made: dict[str, LossFn] = {}
    x, w, t = inputs(hd, dev)
    for name, make in PROVIDERS.items():
        row: dict[str, Any] = {"workload": hd.name, "provider": name, "n": hd.n, "h": hd.h,
                               "c": hd.c, "dtype": hd.dtype, "device_type": dev.type,
                               "status": "ok", "note": ""}
        rows.append(row)
        try:
            made[name] = make(dev)
            fns[name] = _step(made[name], x, w, t)
            fns[name]()
        except bench.Skip as e:
            row.update(status="skipped", note=str(e))
            fns.pop(name, None)
        except Exception as e:  # a provider that breaks must not stop the others
            row.update(status="error", note=f"{type(e).__name__}: {str(e)[:200]}")
            fns.pop(name, None)
    by = {r["provider"]: r for r in rows}
    if dev.type == "cpu":
        # One call of the reference path takes seconds here: few rounds.
        times = bench.cpu_time_interleaved(fns, seconds=0.0, min_rounds=2 if quick else 5)
    else:
        times = {n: bench.cuda_time(f, 25 if quick else 100, 200 if quick else 1000) for n, f in fns.items()}
    for name, tm in times.items():
        by[name].update(fwdbwd_ms=tm.median_ms, fwdbwd_q20_ms=tm.q20_ms, fwdbwd_q80_ms=tm.q80_ms)
    for name in fns:
        if dev.type == "cpu":
            peak, note = _cpu_peak(name, hd)
            if note:
                by[name]["note"] = note
        else:
            peak = _cuda_peak(made[name], x, w, t)
        by[name]["peak_mem_bytes"] = peak
    base = by.get(BASELINE, {}).get("fwdbwd_ms")
    chunked = by.get("stock-chunked", {}).get("fwdbwd_ms")
    for r in rows:
        if "fwdbwd_ms" in r:
            r["time_vs_reference"] = r["fwdbwd_ms"] / base if base else None
            r["time_vs_stock_chunked"] = r["fwdbwd_ms"] / chunked if chunked else None
    return rows


def markdown(rows: list[dict[str, Any]], threads: int) -> str:
    lines = [
        "## Linear + cross-entropy heads (fwd+bwd, mean loss)", "",
        f"torch threads: {threads}. time / stock reference path; peak = memory above the inputs "
        "during one forward + backward, gradients included (CPU: peak resident set in a fresh "
        "process per provider).", "",
        "| workload | provider | fwd+bwd | vs reference | vs stock chunked | peak above inputs | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ms = f"{r['fwdbwd_ms']:.1f} ms" if "fwdbwd_ms" in r else r["status"]
        vr = f"{r['time_vs_reference']:.2f}x" if r.get("time_vs_reference") else ""
        vc = f"{r['time_vs_stock_chunked']:.2f}x" if r.get("time_vs_stock_chunked") else ""
        mem = f"{r['peak_mem_bytes'] / _MiB:.0f} MiB" if r.get("peak_mem_bytes") is not None else ""
        lines.append(f"| {r['workload']} | {r['provider']} | {ms} | {vr} | {vc} | {mem} | "
                     f"{r['note'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def run(hs: list[Head], dev: torch.device, quick: bool, out: Path) -> int:
    rows: list[dict[str, Any]] = []
    for hd in hs:
        print(f"safeloss bench: {hd.name}", file=sys.stderr)
        rows += run_head(hd, dev, quick)
        (out / "linear_results.json").write_text(json.dumps({"rows": rows}, indent=1))
    md = markdown(rows, torch.get_num_threads())
    (out / "linear_results.md").write_text(md)
    print(md)
    return 0

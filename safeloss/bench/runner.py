"""Running ``safeloss bench``: each workload's providers checked, timed and measured, the
sections in order (environment, copy bandwidth, the workloads, plots, the linear + cross-entropy
heads of :mod:`safeloss.bench.linear`), a progress line for each, and the list of files written."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import output
from .measure import (
    GRAPH_MAX_LOGITS,
    SPREAD_MAX,
    LossFn,
    Settings,
    Skip,
    Timing,
    _fwd,
    _fwdbwd,
    _GiB,
    _restorer,
    _rotating,
    copy_bandwidth,
    cpu_time_interleaved,
    cuda_graph_time,
    cuda_memory,
    cuda_time,
    spread,
)
from .providers import BASELINE, Provider, _safeloss, _softmax_check_off, for_device
from .workloads import (
    Workload,
    full_workloads,
    make_inputs,
    must_move_bytes,
    pool_size,
    quick_workloads,
    reference_loss,
    streamed_bytes,
)

# Stop starting new workloads after this many seconds (partial results are still written).
BUDGET_ENV = "SAFELOSS_BENCH_BUDGET_S"


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
        vals, bad = _memory_reading(*cuda_memory(fn, x, t), w.logits_bytes(), p.inplace)
        row.update(vals)
        row["note"] = bad
        if w.logits_bytes() <= GRAPH_MAX_LOGITS and p.not_capturable:
            row["note"] = f"no CUDA graph time: {p.not_capturable}"
        elif w.logits_bytes() <= GRAPH_MAX_LOGITS:
            try:
                row["graph_fwdbwd_ms"] = cuda_graph_time(fn, x, t, s, p.inplace).median_ms
            except Exception as e:  # e.g. a host sync inside the provider: not capturable
                row["note"] = "; ".join(filter(None, [
                    row["note"], f"not capturable in a CUDA graph ({_error_note(e)})"]))[:300]
    return None


def _memory_reading(peak: int, saved: int, grad_bytes: int, inplace: bool) -> tuple[dict[str, int], str]:
    """The memory columns of a row, or none and a note when the reading is impossible: memory
    held from forward to backward below zero, or a peak below the gradient an out-of-place
    provider returns, means something allocated before the call was freed inside it (run 2 on
    the H200: earlier calls' deferred records), and the numbers would understate the provider."""
    if saved < 0 or (not inplace and peak < grad_bytes):
        return {}, (f"memory not valid: held {saved} B, peak {peak} B above the inputs"
                    f"{'' if inplace else f' (the gradient alone is {grad_bytes} B)'}: memory "
                    "allocated before the call was freed during it")
    return {"peak_mem_bytes": peak, "saved_mem_bytes": saved}, ""


def _loss_tolerance(dtype: str) -> float:
    """Largest relative error of a mean loss against the fp64 reference (same inputs) that is
    still a right answer: 8 ulps of a half-precision result (the loss is returned in the logits'
    dtype: stock bf16 is 1.6e-3 off), 1e-4 in fp32 (fp32 accumulation over millions of terms)."""
    return {"bf16": 8 * 2.0**-8, "fp16": 8 * 2.0**-11}.get(dtype, 1e-4)


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
        tick(f"{w.name}: skipped, too large for a CPU run")
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
            tick(f"{w.name}: {p.name} {row['status']}")
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
        tick(f"{w.name}: timed {', '.join(fns)}")
    return [_finish(r, rows.get(BASELINE)) for r in rows.values()]


def _finish(row: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """Flatten timings, add speedups against the baseline and bandwidth. A row whose loss is
    off the fp64 reference is ``wrong``: its times stay in the JSON, but it gets no speedup and
    no target verdict (a fast wrong answer is not a result)."""
    err = row.get("loss_rel_err")
    if row["status"] == "ok" and isinstance(err, float) and not err <= _loss_tolerance(row["dtype"]):
        row["status"] = "wrong"
        row["note"] = "; ".join(filter(None, [
            row.get("note", ""), f"loss {err:.1e} off the fp64 reference (relative; tolerance "
            f"{_loss_tolerance(row['dtype']):.0e} in {row['dtype']}): not a result"]))
    if base is not None and base.get("status") == "wrong":
        base = None  # no speedups against a wrong baseline
    for key in ("fwd", "fwdbwd"):
        tm = row.pop(key, None)
        if not isinstance(tm, Timing):
            continue
        row[f"{key}_ms"], row[f"{key}_q20_ms"], row[f"{key}_q80_ms"] = tm.median_ms, tm.q20_ms, tm.q80_ms
        row[f"{key}_reps"] = tm.reps
        row[f"gbps_{key}"] = row[f"bytes_{key}"] / (tm.median_ms * 1e-3) / 1e9
    if "fwdbwd_ms" in row:
        row["gbps_fwdbwd_streamed"] = row["bytes_fwdbwd_streamed"] / (row["fwdbwd_ms"] * 1e-3) / 1e9
    if base is not None and row["status"] == "ok" and row.get("graph_fwdbwd_ms") and base.get("graph_fwdbwd_ms"):
        row["speedup_graph_fwdbwd"] = base["graph_fwdbwd_ms"] / row["graph_fwdbwd_ms"]
    if "peak_mem_bytes" in row and not row["inplace"]:
        row["peak_minus_grad_bytes"] = row["peak_mem_bytes"] - row["grad_bytes"]
    if base is not None and row["status"] == "ok":
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


# =============================================================================== progress


class Progress:
    """One line per step on stderr: ``[step/total  elapsed] what``, for every section of the run
    (so a run that takes minutes is never silent for long)."""

    def __init__(self, total: int) -> None:
        self.n, self.total = 0, total
        self.t0 = time.perf_counter()

    def __call__(self, label: str) -> None:
        self.n += 1
        print(f"[{self.n}/{self.total} {time.perf_counter() - self.t0:6.1f}s] {label}",
              file=sys.stderr, flush=True)

    def note(self, label: str) -> None:
        """A line that is not a step (a section's start)."""
        print(f"[{self.n}/{self.total} {time.perf_counter() - self.t0:6.1f}s] {label}",
              file=sys.stderr, flush=True)


# =============================================================================== entry point


def _linear_heads(linear: Any, dev: torch.device, quick: bool, workloads: list[str] | None) -> list[Any]:
    """The heads of the linear + cross-entropy section. The CPU quick preset times a smaller head
    than the CPU target shape (4096, 64, 50000): there, stock's reference path materializes 0.8 GB
    of logits per call and the section alone takes minutes; ``--workload lce`` runs the target."""
    if workloads or not (quick and dev.type == "cpu"):
        return linear.select(dev.type, quick, workloads)
    return [linear.Head(1024, 64, 8192, "fp32")]


def main(quick: bool = False, device: str | None = None, out: str = "bench-out",
         workloads: list[str] | None = None, threads: int | None = None) -> int:
    """Run the benchmark; write results.json, results.md, env.txt and PNG plots into ``out`` (and
    linear_results.json / .md for the linear + cross-entropy heads).

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

    heads = _linear_heads(bench_linear, dev, quick, workloads)
    if workloads:
        wls = [w for w in wls if any(pat in w.name for pat in workloads)]
        if not wls and not heads:
            names = ", ".join(w.name for w in (quick_workloads(dev.type) if quick else full_workloads()))
            print(f"safeloss bench: no {preset} workload matches {workloads}; available: {names}", file=sys.stderr)
            return 2
    settings = Settings()
    if quick:
        settings = Settings(cuda_warmup_ms=25, cuda_rep_ms=150, cpu_seconds=1.5, cpu_min_rounds=10)
    if threads is not None and threads < 1:
        print(f"safeloss bench: --threads must be at least 1, got {threads}", file=sys.stderr)
        return 2
    budget = float(os.environ.get(BUDGET_ENV, "inf"))
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    old_threads = torch.get_num_threads()
    if threads is not None or dev.type == "cpu":
        torch.set_num_threads(threads or 1)
    providers, left_out = for_device(dev)
    per_workload = len(providers) if dev.type == "cuda" else 1
    # environment, copy bandwidth, the workloads, plots; the linear section's start is a note
    progress = Progress((2 + len(wls) * per_workload + 1 if wls else 0) + (1 if heads else 0))
    written: list[str] = []
    try:
        with _quiet_compile_workers(dev):
            if wls:
                written += _run(wls, providers, left_out, dev, preset, quick, settings, budget, outdir, progress)
        if heads:
            progress.note(f"linear + cross-entropy heads: {', '.join(h.name for h in heads)} (safeloss.bench.linear)")
            t0 = time.perf_counter()
            rc = bench_linear.run(heads, dev, quick, outdir)
            progress(f"linear + cross-entropy heads: done in {time.perf_counter() - t0:.0f} s")
            written += [f for f in ("linear_results.json", "linear_results.md") if (outdir / f).is_file()]
            if rc:
                return rc
    finally:
        torch.set_num_threads(old_threads)
    print("wrote " + ", ".join(str(outdir / f) for f in written), file=sys.stderr)
    return 0


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


def _run(wls: list[Workload], providers: list[Provider], left_out: list[str], dev: torch.device,
         preset: str, quick: bool, settings: Settings, budget: float, outdir: Path,
         progress: Progress) -> list[str]:
    """The cross-entropy section; returns the files it wrote (names in ``outdir``)."""
    env = output.environment()
    meta = output.metadata(dev, preset, env)
    env_file = output.write_env(outdir, env)
    progress(f"environment: {meta['device']}, torch {meta['torch']} (torch.utils.collect_env)")
    meta["copy_gbps"] = copy_bandwidth(dev, quick)
    progress(f"copy bandwidth: {meta['copy_gbps']:.0f} GB/s; {len(wls)} workloads, providers "
             f"{', '.join(p.name for p in providers)} -> {outdir}")
    notes: list[str] = []
    if left_out:
        notes.append("Not part of a CPU run (they need CUDA): " + "; ".join(left_out)
                     + ". Peak memory is measured on CUDA only.")
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for w in wls:
        if time.perf_counter() - t0 > budget:
            note = f"not run: the {BUDGET_ENV}={budget:g} s budget was spent"
            rows += [{**_base_row(w, p), "status": "skipped", "note": note} for p in providers]
            if note not in notes:
                notes.append(note)
            for _ in range(len(providers) if dev.type == "cuda" else 1):
                progress(f"{w.name}: not run (budget spent)")
            continue
        rows += run_workload(w, providers, dev, settings, progress)
        for r in rows[-len(providers):]:
            r["copy_gbps"] = meta["copy_gbps"]
        output._write(outdir, meta, rows, notes)  # partial results survive a kill
    noisy = sum(1 for r in rows if r.get("noisy"))
    if noisy:
        notes.append(f"{noisy} of {sum(1 for r in rows if r['status'] == 'ok')} rows are marked (noisy) "
                     f"(q20-q80 spread over {SPREAD_MAX:.0%} of the median): their speedups are not to "
                     "be trusted; the plots ring them in red.")
    plotted = output.plots(outdir, meta, rows)
    progress(f"plots: {', '.join(plotted) if plotted else 'none (matplotlib is not installed)'}")
    if not plotted:
        notes.append("matplotlib is not installed: no plots (pip install 'safeloss[bench]').")
    output._write(outdir, meta, rows, notes)
    print(output.markdown(meta, rows, notes))
    return ["results.json", "results.md", *([env_file] if env_file else []), *plotted]

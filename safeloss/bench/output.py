"""What ``safeloss bench`` writes: the run's metadata (``torch.utils.collect_env``), results.json,
results.md (markdown tables), the GPU-target verdicts and the PNG plots.

The markdown tables are written by a few lines here rather than by a table library: the ones
that would serve (tabulate, rich) are not dependencies of safeloss, and torch's own
``torch.utils.benchmark.Compare`` prints fixed-width text, not markdown.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import math
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from .measure import SPREAD_MAX


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


def environment() -> Any:
    """torch's own environment report (``python -m torch.utils.collect_env``): OS, compilers,
    CPU, GPU models and driver, CUDA/cuDNN, relevant pip packages. None if it fails."""
    try:
        from torch.utils import collect_env

        return collect_env.get_env_info()
    except Exception:  # it shells out (lscpu, nvidia-smi, pip): never let that end a run
        return None


def metadata(dev: torch.device, preset: str, env: Any = None) -> dict[str, Any]:
    import safeloss

    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        name, mem = props.name, props.total_memory
    else:
        name, mem = platform.processor() or platform.machine(), None
        cpu_info = getattr(env, "cpu_info", None) or ""
        model = next((ln.split(":", 1)[1].strip() for ln in cpu_info.splitlines()
                      if ln.strip().startswith("Model name")), None)
        if model is None:
            with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
                model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        name = model or name
    commit, dirty = _git()
    return {
        "device": name, "device_type": dev.type, "device_memory_bytes": mem,
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": _version("triton"), "safeloss": safeloss.__version__,
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "quack": _version("quack-kernels"), "python": platform.python_version(),
        "os": getattr(env, "os", None) or platform.platform(),
        "nvidia_driver": getattr(env, "nvidia_driver_version", None),
        "git_commit": commit, "git_dirty": dirty, "preset": preset,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_env(out: Path, env: Any) -> str | None:
    """env.txt: collect_env's report, as ``python -m torch.utils.collect_env`` prints it."""
    if env is None:
        return None
    from torch.utils import collect_env

    (out / "env.txt").write_text(collect_env.pretty_str(env) + "\n")
    return "env.txt"


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
                                 f"({'thread CPU time' if meta['cpu_threads'] == 1 else 'wall clock'}, "
                                 f"providers interleaved, {meta['cpu_threads']} "
                                 f"thread{'s' if meta['cpu_threads'] != 1 else ''}; each sample the mean "
                                 "of a block of calls, torch.utils.benchmark.Measurement)")
        + "; q20-q80: the middle 60% of the " + ("calls" if cuda else "blocks")
        + ", and its width over the median; a row whose "
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
            if r["status"] == "skipped":
                continue  # not a result: named under the table
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
        skipped = [r for r in rs if r["status"] == "skipped"]
        if skipped:
            lines += ["", "Not run on this workload: " + "; ".join(f"{r['provider']} ({r['note']})" for r in skipped) + "."]
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _get(rows: list[dict[str, Any]], wl: str, prov: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["workload"] == wl and r["provider"] == prov and r["status"] == "ok"), None)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's GPU targets, judged from this run's rows (n/a when a row is missing)."""
    out = ["## GPU targets (bf16 fwd+bwd unless noted)", "", "| target | value | verdict |", "|---|---:|---|"]

    def line(what: str, value: float | None, ok: bool | None, fmt: str = "{:.2f}x",
             valid: bool = True) -> None:
        # An impossible reading (memory below zero) is no evidence either way.
        verdict = "invalid reading" if not valid else "n/a" if ok is None else "PASS" if ok else "MISS"
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
             per_pos, per_pos <= 64, "{:.1f} B", _memory_valid(r))
    else:
        line(f"{head}: safeloss-triton peak - grad (<= O(N))", None, None)
    r = _get(rows, head, "safeloss-triton-inplace")
    if r and "peak_mem_bytes" in r:
        per_pos = r["peak_mem_bytes"] / r["positions"]
        line(f"{head}: safeloss-triton-inplace peak, bytes per position (O(N), ~<= 64)",
             per_pos, per_pos <= 64, "{:.1f} B", _memory_valid(r))
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


def _memory_valid(r: dict[str, Any]) -> bool:
    """Whether a row's memory reading is possible: nothing held below zero, and out of place a
    peak of at least the gradient (rows of runs before the harness dropped such readings)."""
    if r.get("saved_mem_bytes", 0) < 0:
        return False
    return r["inplace"] or r.get("peak_minus_grad_bytes", 0) >= 0


def _fmt_count(c: int) -> str:
    if c >= 1000 and c % 1000 == 0:
        return f"{c // 1000}k"
    return f"{c / 1000:.1f}k" if c >= 10000 else str(c)


def plots(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """time / GB/s / memory against the number of classes, one panel per (variant, positions,
    dtype) with at least three class counts (two, or one, when no panel has three);
    a plot with nothing measured (memory on CPU) is not written. Returns the files written."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, NullLocator
    except ImportError:
        return []
    plain = FuncFormatter(lambda v, _pos: f"{v:.3g}")
    # Minor ticks of a log axis: label 2x and 5x only, or the labels overlap.
    sparse = FuncFormatter(lambda v, _pos: f"{v:.3g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else "")
    # Along C at one N, whatever the family (classification at C = 1000, an LLM at 32000).
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == "ok":
            variant = r["target"] if r["target"] == "prob" else f"smooth{r['label_smoothing']:g}" if r["label_smoothing"] else "index"
            groups.setdefault((variant, r["positions"], r["dtype"]), []).append(r)
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
        flagged = 0
        for ax, gk in zip(axes, keys):
            variant, n, dt = gk
            fam = "/".join(sorted({r["family"] for r in curves[gk]}))
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
                # The same flag as the tables: a hollow red-ringed marker is too noisy to trust.
                noisy = [(r["classes"], r[key] * scale) for r in band if r.get("noisy") and key != "peak_mem_bytes"]
                if noisy:
                    flagged += len(noisy)
                    ax.plot([p[0] for p in noisy], [p[1] for p in noisy], ls="none", marker="o", ms=11,
                            mfc="none", mec="red", mew=1.5)
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
                     f"{meta['timestamp']}" + ("" if any_data else " - no data")
                     + (f"\nred rings: {flagged} point{'s' if flagged != 1 else ''} too noisy to trust"
                        f"\n(q20-q80 spread over {SPREAD_MAX:.0%} of the median: (noisy) in results.md)"
                        if flagged else ""), fontsize=9)
        fig.savefig(out / fname, dpi=110)
        written.append(fname)
    return written


def _write(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]], notes: list[str]) -> None:
    full = [{**meta, **r} for r in rows]  # every row self-contained (device, versions, commit...)
    (out / "results.json").write_text(json.dumps({"meta": meta, "notes": notes, "rows": full}, indent=1))
    (out / "results.md").write_text(markdown(meta, rows, notes))

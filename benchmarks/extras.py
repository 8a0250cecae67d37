"""The LLM and RL extras (z-loss + softcap + statistics) on each op: forward+backward time.

For each op, three providers on identical inputs, interleaved call by call in one process:

* ``plain``: the safeloss op without extras (what the extras cost on top of it);
* ``extras``: the same op with ``z_loss=1e-4, softcap=30.0, return_stats=True``;
* ``reference``: the same math written with stock torch ops (softcap, ``F.cross_entropy``,
  ``z_loss * logsumexp^2``, entropy and accuracy); for linear cross-entropy it materializes the
  (N, C) logits, which safeloss never does.

The vocab-parallel op runs on 2 CPU gloo ranks (``--parallel``), where the reference gathers the
logits. Only ratios from one run mean anything on a shared machine. On CUDA the cross-entropy
and linear ops run the extras inside the Triton kernels (compiled ahead of time, not yet timed on
a GPU); on CPU as torch ops.

    python benchmarks/extras.py                   # CPU, small shapes, every op
    python benchmarks/extras.py --device cuda     # larger shapes
    python benchmarks/extras.py --json out.json   # also write the rows
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

EXTRAS = dict(z_loss=1e-4, softcap=30.0, return_stats=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fns: dict[str, Callable[[], None]], seconds: float, device: str) -> dict[str, float]:
    """Median ms per call of each function, interleaved (a rotating order) for ``seconds``."""
    names = list(fns)
    for f in fns.values():  # warm-up
        f()
    times: dict[str, list[float]] = {n: [] for n in names}
    end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < end or min(len(v) for v in times.values()) < 5:
        for n in names[i % len(names):] + names[: i % len(names)]:
            _sync(device)
            t0 = time.perf_counter()
            fns[n]()
            _sync(device)
            times[n].append((time.perf_counter() - t0) * 1e3)
        i += 1
    return {n: statistics.median(v) for n, v in times.items()}


def _reference(z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The extras' math in stock torch ops (mean reduction, ignore_index=-100)."""
    zt = 30.0 * torch.tanh(z.float() / 30.0)
    ce = F.cross_entropy(zt, t)
    lse = torch.logsumexp(zt, 1)
    valid = t != -100
    zl = 1e-4 * (torch.where(valid, lse, 0.0) ** 2).sum() / valid.sum()
    with torch.no_grad():
        logp = zt.log_softmax(1)
        ent = -(logp.exp() * logp).sum(1)
        acc = ((z.argmax(1) == t) & valid).sum() / valid.sum()
    return ce + zl, (lse.detach(), ent, zl.detach(), acc)


def bench_ce(n: int, c: int, device: str, seconds: float) -> list[dict[str, Any]]:
    import safeloss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=g).to(device).requires_grad_()
    t = torch.randint(0, c, (n,), generator=g).to(device)
    t[::7] = -100

    def plain() -> None:
        safeloss.cross_entropy(x, t).backward()

    def extras() -> None:
        safeloss.cross_entropy(x, t, **EXTRAS)[0].backward()

    def reference() -> None:
        _reference(x, t)[0].backward()

    ms = _time(dict(plain=plain, extras=extras, reference=reference), seconds, device)
    return [dict(op="cross_entropy", shape=[n, c], provider=k, median_ms=v) for k, v in ms.items()]


def bench_linear(n: int, h: int, c: int, device: str, seconds: float) -> list[dict[str, Any]]:
    import safeloss

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, h, generator=g) / h**0.5).to(device).requires_grad_()
    W = torch.randn(c, h, generator=g).to(device).requires_grad_()
    t = torch.randint(0, c, (n,), generator=g).to(device)
    t[::7] = -100

    def plain() -> None:
        safeloss.linear_cross_entropy(x, W, t).backward()

    def extras() -> None:
        safeloss.linear_cross_entropy(x, W, t, **EXTRAS)[0].backward()

    def reference() -> None:  # materializes the (N, C) logits
        _reference(x @ W.T, t)[0].backward()

    ms = _time(dict(plain=plain, extras=extras, reference=reference), seconds, device)
    return [dict(op="linear_cross_entropy", shape=[n, h, c], provider=k, median_ms=v) for k, v in ms.items()]


def _parallel_worker(rank: int, world: int, store: str, n: int, c: int, seconds: float, out: str) -> None:
    import datetime

    import torch.distributed as dist

    import safeloss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    g = torch.Generator().manual_seed(0)
    full = torch.randn(n, c, generator=g)
    t = torch.randint(0, c, (n,), generator=g)
    t[::7] = -100
    width = c // world
    xl = full[:, rank * width:(rank + 1) * width].clone().requires_grad_()

    def plain() -> None:
        safeloss.vocab_parallel_cross_entropy(xl, t).backward()

    def extras() -> None:
        safeloss.vocab_parallel_cross_entropy(xl, t, **EXTRAS)[0].backward()

    def reference() -> None:  # gathers the logits, then the single-device math
        parts = [torch.empty_like(xl) for _ in range(world)]
        dist.all_gather(parts, xl.detach())
        z = torch.cat(parts, 1).requires_grad_()
        _reference(z, t)[0].backward()

    # Every rank runs the same sequence of calls (the collectives must pair up): a fixed count.
    fns = dict(plain=plain, extras=extras, reference=reference)
    for f in fns.values():
        f()
    reps = max(5, int(seconds * 20))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    if rank == 0:
        rows = [dict(op="vocab_parallel_cross_entropy", shape=[n, c], provider=k,
                     median_ms=statistics.median(v), ranks=world) for k, v in times.items()]
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def bench_parallel(n: int, c: int, seconds: float) -> list[dict[str, Any]]:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        out = os.path.join(tmp, "rows.json")
        mp.start_processes(_parallel_worker, args=(2, os.path.join(tmp, "store"), n, c, seconds, out),
                           nprocs=2, start_method="spawn")
        with open(out) as f:
            return json.load(f)


def report(rows: list[dict[str, Any]]) -> str:
    lines = ["| op | shape | provider | fwd+bwd | vs reference | vs plain |", "|---|---|---|---|---|---|"]
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = {r["provider"]: r for r in rows if r["op"] == op}
        ref, plain = mine["reference"]["median_ms"], mine["plain"]["median_ms"]
        for name, r in mine.items():
            shape = "(" + ", ".join(str(s) for s in r["shape"]) + ")"
            lines.append(f"| {op} | {shape} | {name} | {r['median_ms']:.2f} ms | "
                         f"{r['median_ms'] / ref:.2f}x | {r['median_ms'] / plain:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seconds", type=float, default=2.0, help="per op")
    ap.add_argument("--no-parallel", action="store_true", help="skip the 2-rank gloo workload")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    big = args.device == "cuda"
    rows = bench_ce(*((8192, 32000) if big else (1024, 8192)), args.device, args.seconds)
    rows += bench_linear(*((8192, 2048, 32000) if big else (1024, 256, 8192)), args.device, args.seconds)
    if not args.no_parallel:
        rows += bench_parallel(512, 8192, args.seconds)
    print(report(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

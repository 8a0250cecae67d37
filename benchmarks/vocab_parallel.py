"""Vocab-parallel cross-entropy: bytes communicated and time per call, safeloss vs stock loss_parallel.

Two CPU ranks over gloo (loopback) by default. Per shape, forward+backward of

* ``stock``: ``F.cross_entropy`` on a DTensor sharded on the classes under ``loss_parallel()``
  (no checks);
* ``safeloss-dtensor``: the same call through ``safeloss.cross_entropy`` (every check);
* ``safeloss-shards``: ``safeloss.vocab_parallel_cross_entropy`` on the plain local slice;

interleaved call by call, every call started after a barrier, medians of rank 0's wall time.
Bytes are the payloads of the all-reduces each rank enters per call, counted by wrapping the
functional all-reduce that both stock and safeloss use (and ``torch.distributed.all_reduce``, in
case either ever calls it; a ring all-reduce
moves about 2 (p-1)/p times its payload over each rank's link). safeloss also reads 13 + p int64
values on the host per call (its first all-reduce), which is where its errors agree across ranks.

    python benchmarks/vocab_parallel.py                       # default shapes, 2 ranks
    python benchmarks/vocab_parallel.py --world 3 --iters 10
    python benchmarks/vocab_parallel.py --out benchmarks/results/vocab_parallel-cpu-gloo.md

NCCL numbers need a machine with several GPUs; none were measured for this page.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SHAPES = [(1024, 32000), (4096, 8192), (256, 128256)]


class _Counter:
    """Sums the bytes of every all-reduce entered: the c10d and the functional API (stock
    ``loss_parallel()``), and safeloss's engine, which calls the functional op itself."""

    def __init__(self) -> None:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        from safeloss.parallel import vocab

        self.bytes = 0
        self.calls = 0
        orig, forig, vorig = dist.all_reduce, funcol.all_reduce, vocab._all_reduce

        def all_reduce(tensor: torch.Tensor, *a: Any, **k: Any) -> Any:
            self.bytes += tensor.numel() * tensor.element_size()
            self.calls += 1
            return orig(tensor, *a, **k)

        def f_all_reduce(tensor: torch.Tensor, *a: Any, **k: Any) -> Any:
            self.bytes += tensor.numel() * tensor.element_size()
            self.calls += 1
            return forig(tensor, *a, **k)

        def v_all_reduce(tensor: torch.Tensor, op: str, group: Any) -> Any:
            if group is not vocab._LOCAL:  # no collective: every class on this rank
                self.bytes += tensor.numel() * tensor.element_size()
                self.calls += 1
            return vorig(tensor, op, group)

        dist.all_reduce = all_reduce
        funcol.all_reduce = f_all_reduce
        vocab._all_reduce = v_all_reduce

    def take(self) -> tuple[int, int]:
        out = (self.bytes, self.calls)
        self.bytes = self.calls = 0
        return out


def _worker(rank: int, world: int, store: str, shapes: list[tuple[int, int]], iters: int, out: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    import safeloss

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        mesh = init_device_mesh("cpu", (world,))
        counter = _Counter()
        rows = []
        for n, c in shapes:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, c, generator=g)
            t = torch.randint(0, c, (n,), generator=g)
            dx = distribute_tensor(x, mesh, [Shard(1)])
            local = dx.to_local().clone()

            def stock(dx: Any = dx, t: torch.Tensor = t) -> None:
                d = dx.detach().requires_grad_()
                with loss_parallel():
                    F.cross_entropy(d, t).backward()

            def safe_dtensor(dx: Any = dx, t: torch.Tensor = t) -> None:
                d = dx.detach().requires_grad_()
                with loss_parallel():
                    safeloss.cross_entropy(d, t).backward()

            def safe_shards(local: torch.Tensor = local, t: torch.Tensor = t) -> None:
                xl = local.detach().requires_grad_()
                safeloss.vocab_parallel_cross_entropy(xl, t).backward()

            fns = {"stock": stock, "safeloss-dtensor": safe_dtensor, "safeloss-shards": safe_shards}
            times: dict[str, list[float]] = {k: [] for k in fns}
            comm: dict[str, tuple[int, int]] = {}
            for name, fn in fns.items():  # warm-up, and one counted call each
                fn()
                counter.take()
                dist.barrier()
                fn()
                comm[name] = counter.take()
            for i in range(iters):
                order = list(fns)[i % 3:] + list(fns)[: i % 3]
                for name in order:
                    dist.barrier()
                    t0 = time.perf_counter()
                    fns[name]()
                    times[name].append(time.perf_counter() - t0)
            counter.take()
            for name in fns:
                rows.append(dict(shape=[n, c], provider=name, median_ms=1e3 * statistics.median(times[name]),
                                 bytes=comm[name][0], all_reduces=comm[name][1]))
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(world: int = 2, shapes: list[tuple[int, int]] | None = None, iters: int = 20) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "store"), shapes or SHAPES, iters, out),
                           nprocs=world, join=True, start_method="spawn")
        return json.loads(Path(out).read_text())


def report(rows: list[dict[str, Any]], world: int) -> str:
    lines = [
        f"# Vocab-parallel cross-entropy, {world} CPU ranks (gloo), torch {torch.__version__.split('+')[0]}",
        "",
        "Forward+backward per call, fp32, `reduction=\"mean\"`, median of rank 0's wall time; bytes: "
        "the all-reduce payloads each rank enters per call (`python benchmarks/vocab_parallel.py`).",
        "",
        "| shape (N, C) | provider | time | vs stock | all-reduces | bytes per call | bytes per row |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    stock = {tuple(r["shape"]): r for r in rows if r["provider"] == "stock"}
    for r in rows:
        s = stock[tuple(r["shape"])]
        n = r["shape"][0]
        lines.append(
            f"| {tuple(r['shape'])} | {r['provider']} | {r['median_ms']:.2f} ms | "
            f"{r['median_ms'] / s['median_ms']:.2f}x | {r['all_reduces']} | {r['bytes']:,} | {r['bytes'] / n:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--shape", action="append", help="N,C (repeatable)")
    ap.add_argument("--out", help="write the markdown table here (and the rows next to it as .json)")
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] if args.shape else None
    rows = run(args.world, shapes, args.iters)  # type: ignore[arg-type]
    text = report(rows, args.world)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()

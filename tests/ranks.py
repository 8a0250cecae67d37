"""Gloo ranks on the CPU for the multi-process tests: each file spawns its ranks once (module
fixtures) and runs every case in that one spawn (spawning is the slow part); each rank records
every case's outcome, and the tests judge the saved records in the parent process."""

from __future__ import annotations

import datetime
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import safeloss


def init_gloo(rank: int, world: int, store: str, seconds: int = 30) -> None:
    """This rank's gloo group over a file store, one torch thread, a collective timeout of
    ``seconds`` (a rank left waiting fails instead of hanging)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=seconds))


def record(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn``: its result ("ok") or error (class name, message, whether it is a SafeLossError,
    its builtin bases), the SafeLossWarnings it emitted, and the seconds it took."""
    safeloss.reset_warnings()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        t0 = time.monotonic()
        try:
            res: dict[str, Any] = {"ok": fn()}
        except Exception as e:
            res = {"error": type(e).__name__, "message": str(e), "safeloss": isinstance(e, safeloss.SafeLossError),
                   "builtins": [c.__name__ for c in type(e).__mro__ if c.__module__ == "builtins"]}
        res["seconds"] = time.monotonic() - t0
    res["warnings"] = [str(w.message) for w in rec if issubclass(w.category, safeloss.SafeLossWarning)]
    return res


def spawn(worker: Callable[..., None], world: int, tmp: Path, deadline_s: float, what: str) -> list[dict[str, Any]]:
    """Start ``worker(rank, world, store, out)`` on ``world`` ranks and return each rank's saved
    records (``torch.save(records, f"{out}.{rank}")``); a spawn still running after
    ``deadline_s`` is killed and fails the test (a hang)."""
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only; inherited by the workers
    ctx = mp.start_processes(worker, args=(world, str(tmp / "store"), str(tmp / "out")),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{what} ({world} ranks) did not finish in {deadline_s} s: a hang")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(tmp / f"out.{r}", weights_only=False) for r in range(world)]

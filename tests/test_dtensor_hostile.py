"""Hostile DTensor calls through safeloss: uneven shards, DTensor weights and targets of other
placements or meshes, half precision, extras, no-grad, an upstream gradient of another layout,
arguments that differ on one rank, and stock calls under ``safeloss.patch()``.

One spawn per world size (2 ranks on a 1-D mesh; 4 ranks on a 2 x 2 mesh) runs every case; each
rank saves its results and the single-process stock reference on the whole tensors, judged here:
values, gradients (non-trivial upstream gradient, ``.full_tensor()``), the result's placements as
docs/compatibility.md states them (``none``: sharded like the positions; ``sum`` / ``mean``:
replicated), and, for errors and warnings, the same class and text on every rank.
A gloo timeout of 30 s turns a hang into an error on every rank; a kill deadline bounds the join.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import safeloss
from tests.ranks import init_gloo, record, spawn
from tests.tolerances import assert_matches

DEADLINE_S = 240
N, C = 5, 7  # uneven over 2 and 4 ranks (rows and classes)


def _data(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(N, C, generator=gen, dtype=torch.float64) * 2).to(dtype)
    t = torch.randint(0, C, (N,), generator=gen)
    t[::3] = -100
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.2
    return x, t, w


def _pl(names: str) -> list[Any]:
    from torch.distributed.tensor import Partial, Replicate, Shard

    return [Replicate() if n == "R" else Partial() if n == "P" else Shard(int(n[1:])) for n in names.split(",")]


def _run(mesh: Any, x: torch.Tensor, t: torch.Tensor, xpl: str, tpl: str | None, *, w: torch.Tensor | None = None,
         wpl: str | None = None, red: str = "mean", eps: float = 0.0, lp: bool = False, api: str = "fn",
         extras: dict[str, Any] | None = None, grad: str = "full", tmesh: Any = None) -> dict[str, Any]:
    """One call on DTensors and stock's on the whole tensors. ``grad``: "full" (an upstream
    gradient through ``full_tensor()``), "dtensor" (``backward`` of a Replicate upstream DTensor),
    "none" (logits without requires_grad) or "nograd" (under ``torch.no_grad()``)."""
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    dx = distribute_tensor(x, mesh, _pl(xpl))
    if grad in ("full", "dtensor"):
        dx.requires_grad_()
    dt = t if tpl is None else distribute_tensor(t, mesh if tmesh is None else tmesh, _pl(tpl))
    dw = w if w is None or wpl is None else distribute_tensor(w, mesh, _pl(wpl))
    kw: dict[str, Any] = dict(reduction=red, label_smoothing=eps)
    with loss_parallel() if lp else nullcontext(), torch.no_grad() if grad == "nograd" else nullcontext():
        if api == "fn":
            out = safeloss.cross_entropy(dx, dt, dw, **kw, **(extras or {}))
        elif api == "module":
            out = safeloss.SafeCrossEntropyLoss(weight=dw, **kw)(dx, dt)
        elif api == "patch-fn":
            with safeloss.patch():
                out = F.cross_entropy(dx, dt, dw, **kw)
        else:  # patch-module
            with safeloss.patch():
                out = torch.nn.CrossEntropyLoss(weight=dw, **kw)(dx, dt)
    stats = None
    if isinstance(out, tuple):
        out, stats = out
    xr = x.clone().requires_grad_(grad in ("full", "dtensor"))
    with torch.no_grad() if grad == "nograd" else nullcontext():
        # stock for the plain loss; for extras, single-device safeloss (itself tested against stock)
        ref = (F.cross_entropy(xr, t, w, **kw) if not extras
               else safeloss.cross_entropy(xr, t, w, **kw, **extras))
    rstats = None
    if isinstance(ref, tuple):
        ref, rstats = ref
    res: dict[str, Any] = {"out": out.full_tensor().detach(), "ref": ref.detach(),
                           "placements": [repr(p) for p in out.placements],
                           "requires_grad": out.requires_grad, "ref_requires_grad": ref.requires_grad}
    if grad in ("full", "dtensor"):
        g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=ref.dtype)
        (ref * g).sum().backward()
        if grad == "full":
            (out.full_tensor() * g).sum().backward()
        else:
            out.backward(distribute_tensor(g, mesh, [Replicate()] * mesh.ndim).redistribute(mesh, out.placements))
        res["grad"], res["ref_grad"] = dx.grad.full_tensor(), xr.grad
        res["grad_placements"] = [repr(p) for p in dx.grad.placements]
    if stats is not None:
        for f in ("lse", "entropy", "z_loss", "accuracy"):
            a = getattr(stats, f)
            res[f"stats.{f}"] = (a.full_tensor().detach(), getattr(rstats, f).detach())
    return res


def _mismatch(mesh: Any, rank: int, xpl: str, tpl: str, what: str) -> Any:
    from torch.distributed.tensor import distribute_tensor

    x, t, _ = _data()
    kw: dict[str, Any] = {"strict": rank == 1} if what == "strict" else {"temperature": 1.0 + rank}
    tt = t[:, None] if what == "strict" else t  # default mode squeezes (N, 1); strict mode refuses it
    return safeloss.cross_entropy(distribute_tensor(x, mesh, _pl(xpl)),
                                  distribute_tensor(tt, mesh, _pl(tpl)), **kw).full_tensor()


def _bad_rows(mesh: Any, xpl: str, tpl: str) -> Any:
    """A bad label in the last rows only (one rank's shard of a Shard(0) target)."""
    from torch.distributed.tensor import distribute_tensor

    x, t, _ = _data()
    t[-1] = C + 3
    return safeloss.cross_entropy(distribute_tensor(x, mesh, _pl(xpl)), distribute_tensor(t, mesh, _pl(tpl)))


def _nan_shard(mesh: Any, xpl: str, tpl: str) -> Any:
    from torch.distributed.tensor import distribute_tensor

    x, t, _ = _data()
    x[N - 1, C - 1] = math.nan  # the last rank's rows and classes only
    return safeloss.cross_entropy(distribute_tensor(x, mesh, _pl(xpl)), distribute_tensor(t, mesh, _pl(tpl))
                                  ).full_tensor()


def _other_mesh(mesh: Any, xpl: str, tpl: str, red: str) -> dict[str, Any]:
    """The target a DTensor on another mesh of the same ranks (named dims): gathered, then laid
    out as the logits' positions."""
    from torch.distributed.device_mesh import init_device_mesh

    names = tuple(f"d{i}" for i in range(mesh.ndim))
    other = init_device_mesh("cpu", tuple(mesh.shape), mesh_dim_names=names)
    x, t, w = _data()
    return _run(mesh, x, t, xpl, tpl, w=w, red=red, tmesh=other)


def _cases(world: int) -> dict[str, Callable[[Any, int], Any]]:
    x, t, w = _data()
    cases: dict[str, Callable[[Any, int], Any]] = {}
    if world == 2:
        for xpl, tpl, lp in (("S1", "R", True), ("S1", "R", False), ("S0", "S0", False), ("R", "R", False),
                             ("S1", "S0", True), ("R", "S0", False), ("S0", "R", False)):
            for red in ("none", "sum", "mean"):
                # a DTensor weight (uneven Shard(0): 7 classes over 2 ranks) with smoothing and ignored rows
                cases[f"{xpl}/{tpl}/lp={lp}/{red}/weight-S0"] = (
                    lambda m, r, a=(xpl, tpl, lp, red): _run(m, x, t, a[0], a[1], w=w, wpl="S0", red=a[3],
                                                             eps=0.1, lp=a[2]))
        for red in ("none", "mean"):
            cases[f"S1/R/weight-Partial/{red}"] = lambda m, r, red=red: _run(m, x, t, "S1", "R", w=w / 2,
                                                                            wpl="P", red=red)
            cases[f"S1/plain-target/{red}"] = lambda m, r, red=red: _run(m, x, t, "S1", None, red=red, lp=True)
            for xpl, tpl in (("S1", "R"), ("S0", "S0"), ("R", "R")):
                cases[f"{xpl}/{tpl}/extras/{red}"] = (
                    lambda m, r, a=(xpl, tpl, red): _run(m, x, t, a[0], a[1], red=a[2], extras=dict(
                        return_stats=True, temperature=1.5, z_loss=1e-2, softcap=4.0)))
                cases[f"{xpl}/{tpl}/upstream-dtensor/{red}"] = (
                    lambda m, r, a=(xpl, tpl, red): _run(m, x, t, a[0], a[1], red=a[2], grad="dtensor"))
                cases[f"{xpl}/{tpl}/other-mesh-target/{red}"] = (
                    lambda m, r, a=(xpl, tpl, red): _other_mesh(m, a[0], a[1], a[2]))
        for dt in (torch.float16, torch.bfloat16):
            xh, _, _ = _data(dt)
            for xpl, tpl in (("S1", "R"), ("S0", "S0")):
                cases[f"{xpl}/{tpl}/{dt}"] = lambda m, r, a=(xh, xpl, tpl): _run(m, a[0], t, a[1], a[2],
                                                                                 w=w.to(a[0].dtype), eps=0.1)
        for grad in ("none", "nograd"):
            cases[f"S1/R/grad={grad}"] = lambda m, r, g=grad: _run(m, x, t, "S1", "R", lp=True, grad=g)
        for api in ("module", "patch-fn", "patch-module"):
            for xpl, tpl, lp in (("S1", "R", True), ("S0", "S0", False)):
                cases[f"{xpl}/{tpl}/{api}"] = lambda m, r, a=(xpl, tpl, lp, api): _run(
                    m, x, t, a[0], a[1], w=w, wpl="S0", eps=0.1, lp=a[2], api=a[3])
        cases["1d-logits-classes-S0"] = lambda m, r: _run(m, x[1], t[1], "S0", "R", lp=True)
        for xpl, tpl in (("S1", "R"), ("S0", "S0"), ("R", "R")):
            for what in ("strict", "temperature"):
                cases[f"{xpl}/{tpl}/{what}-on-one-rank"] = lambda m, r, a=(xpl, tpl, what): _mismatch(m, r, *a)
            cases[f"{xpl}/{tpl}/bad-rows"] = lambda m, r, a=(xpl, tpl): _bad_rows(m, *a)
            cases[f"{xpl}/{tpl}/nan-shard"] = lambda m, r, a=(xpl, tpl): _nan_shard(m, *a)
    else:
        for xpl, tpl in (("S0,S1", "S0,R"), ("R,S1", "R,R"), ("S1,S0", "R,S0"), ("P,S1", "R,R")):
            for red in ("none", "mean"):
                cases[f"{xpl}/{tpl}/{red}/weight-S0"] = lambda m, r, a=(xpl, tpl, red): _run(
                    m, x, t, a[0], a[1], w=w, wpl="S0,R", red=a[2], eps=0.1, lp=True)
                cases[f"{xpl}/{tpl}/extras/{red}"] = lambda m, r, a=(xpl, tpl, red): _run(
                    m, x, t, a[0], a[1], red=a[2], extras=dict(return_stats=True, z_loss=1e-2, temperature=2.0))
            cases[f"{xpl}/{tpl}/other-mesh-target"] = lambda m, r, a=(xpl, tpl): _other_mesh(m, a[0], a[1], "none")
            cases[f"{xpl}/{tpl}/bad-rows"] = lambda m, r, a=(xpl, tpl): _bad_rows(m, *a)
            cases[f"{xpl}/{tpl}/nan-shard"] = lambda m, r, a=(xpl, tpl): _nan_shard(m, *a)
            cases[f"{xpl}/{tpl}/strict-on-one-rank"] = lambda m, r, a=(xpl, tpl): _mismatch(m, r, *a, "strict")
    return cases


# =============================================================================== the ranks


_record = record


def _worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    init_gloo(rank, world, store)
    results: dict[str, Any] = {}
    try:
        mesh = init_device_mesh("cpu", (world,) if world == 2 else (2, 2))
        for name, fn in _cases(world).items():
            results[name] = _record(lambda fn=fn: fn(mesh, rank))
        dist.barrier()
    finally:
        torch.save(results, f"{out}.{rank}")
        dist.destroy_process_group()


def _spawn(tmp: Any, world: int) -> list[dict[str, Any]]:
    return spawn(_worker, world, tmp, DEADLINE_S, "DTensor workers")


_RESULTS: dict[int, list[dict[str, Any]]] = {}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], list[dict[str, Any]]]:
    def get(world: int) -> list[dict[str, Any]]:
        if world not in _RESULTS:
            _RESULTS[world] = _spawn(tmp_path_factory.mktemp(f"dtensor{world}"), world)
        return _RESULTS[world]
    return get


# =============================================================================== judged here


_AGREED = ("strict-on-one-rank", "temperature-on-one-rank", "bad-rows", "nan-shard")
_VALUE = [(w, n) for w in (2, 4) for n in _cases(w) if not n.endswith(_AGREED)]
_SAME = [(w, n) for w in (2, 4) for n in _cases(w) if n.endswith(_AGREED)]


def _want_placements(name: str, world: int, got: dict[str, Any]) -> list[str]:
    """docs/compatibility.md: ``none`` sharded like the positions, ``sum`` / ``mean`` replicated."""
    if got["out"].dim() == 0:
        return ["Replicate()"] * (1 if world == 2 else 2)
    xpl = name.split("/")[0].split(",")
    return ["Shard(dim=0)" if p == "S0" else "Replicate()" for p in xpl] if not name.startswith("1d") else ["Replicate()"]


@pytest.mark.parametrize(("world", "name"), _VALUE, ids=[f"{w}-{n}" for w, n in _VALUE])
def test_matches_stock_on_the_whole_tensors(spawned: Callable[[int], list[dict]], world: int, name: str) -> None:
    for rank, res in enumerate(spawned(world)):
        got = res[name]
        assert "ok" in got, f"{name} rank {rank}: {got.get('error')}: {got.get('message')}"
        assert got["warnings"] == [], got["warnings"]
        r = got["ok"]
        what = f"{name} (rank {rank} of {world})"
        half = r["out"].dtype in (torch.float16, torch.bfloat16)
        truth = None
        if half:  # the fp64 truth: stock on the logits upcast (the same values)
            x, t, w = _data(r["out"].dtype)
            truth = F.cross_entropy(x.double(), t, w.to(x.dtype).double(), label_smoothing=0.1)
        assert_matches(r["out"], r["ref"], truth, what=f"{what} loss")
        assert r["requires_grad"] == r["ref_requires_grad"], what
        assert r["placements"] == _want_placements(name, world, r), (what, r["placements"])
        if "grad" in r:
            if half:  # the half-format gradient: judged against stock's, within the half tolerance
                torch.testing.assert_close(r["grad"].double(), r["ref_grad"].double(), rtol=2e-2, atol=2e-3)
            else:
                assert_matches(r["grad"], r["ref_grad"], what=f"{what} grad")
        for key, (a, b) in ((k, v) for k, v in r.items() if k.startswith("stats.")):
            if a.dtype == torch.bool or not a.is_floating_point():
                assert torch.equal(a, b), f"{what} {key}"
            else:
                assert_matches(a, b, what=f"{what} {key}")


_MESSAGES = {  # the case's ending: (error class or None, a piece of every rank's message / warning)
    "strict-on-one-rank": ("TargetShapeError", "strict mode stops here"),
    "temperature-on-one-rank": ("ParallelMismatchError", "different extras"),
    "bad-rows": ("TargetOutOfRangeError", f"bad values: {C + 3} at [{N - 1}]"),
    "nan-shard": (None, f"NaN or infinite at 1 of {N} positions (first at [{N - 1}])"),
}


@pytest.mark.parametrize(("world", "name"), _SAME, ids=[f"{w}-{n}" for w, n in _SAME])
def test_every_rank_raises_or_warns_alike(spawned: Callable[[int], list[dict]], world: int, name: str) -> None:
    err, piece = _MESSAGES[name.rsplit("/", 1)[-1]]
    got = [res[name] for res in spawned(world)]
    for g in got:
        if err is None:
            assert "ok" in g and math.isnan(float(g["ok"])), g
            assert len(g["warnings"]) == 1 and piece in g["warnings"][0], g["warnings"]
        else:
            assert g.get("error") == err and piece in g["message"], g
    assert len({(g.get("error"), g.get("message"), tuple(g["warnings"])) for g in got}) == 1, got

"""DTensor logits of every layout through safeloss.cross_entropy, on 4 CPU ranks over gloo.

One process group of 4 ranks runs every case: layouts on a 1-D mesh of 4 (replicated logits, the
batch sharded, the classes sharded in and outside ``loss_parallel()``, a sequence dim sharded) and
on a 2 x 2 mesh (batch x classes, classes x batch, a ``Partial`` dim beside the classes, replicas x
batch). Each case is judged against single-process stock cross-entropy on the whole tensors, and
every rank must return the same value or raise the same error (class and text).

The rule under test (issue 16): what a call computes and exchanges is decided from the placements,
never from values one rank sees, so no input makes one rank enter a collective the others left
(before, batch-sharded logits whose shards' means straddled the softmax check's band hung).

No ports (a FileStore in tmp_path), a gloo timeout so that a hang becomes an error on every rank,
a hard deadline on the join, and a final barrier before destroy_process_group.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import safeloss
from tests.ranks import record, spawn
from tests.tolerances import assert_matches

WORLD = 4
DEADLINE_S = 300  # a loaded 2-core machine; a hang fails on the gloo timeout first
N, C, D = 6, 7, 3  # batch, classes (uneven over 2 and 4), a trailing sequence dim

# name: (mesh shape, placements (as strings), logits dims, under loss_parallel())
LAYOUTS: dict[str, tuple[tuple[int, ...], tuple[str, ...], int, bool]] = {
    "replicate": ((4,), ("R",), 2, False),
    "batch": ((4,), ("S0",), 2, False),
    "classes": ((4,), ("S1",), 2, False),  # outside loss_parallel(): stock gathers the classes
    "classes-lp": ((4,), ("S1",), 2, True),
    "sequence": ((4,), ("S2",), 3, False),
    "2d-batch-classes-lp": ((2, 2), ("S0", "S1"), 2, True),
    "2d-classes-batch": ((2, 2), ("S1", "S0"), 3, False),
    "2d-partial-classes-lp": ((2, 2), ("P", "S1"), 2, True),
    "2d-replicas-batch": ((2, 2), ("R", "S0"), 2, False),
}
PROB_LAYOUTS = ["classes-lp", "batch", "2d-batch-classes-lp"]  # probability targets given as DTensors
OPTIONS = {  # reduction, weight, label smoothing, ignored positions
    "mean": ("mean", False, 0.0, False),
    "sum-weight-smoothing-ignore": ("sum", True, 0.1, True),
    "none-weight-ignore": ("none", True, 0.0, True),
    "mean-weight-smoothing-ignore": ("mean", True, 0.2, True),
}


def _data(dims: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (N, C) if dims == 2 else (N, C, D)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    t = torch.randint(0, C, shape[:1] + shape[2:], generator=gen)
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.2
    return x, t, w


def _band_straddling() -> tuple[torch.Tensor, torch.Tensor]:
    """Clean labels; the first half's rows are near-uniform (loss ~ log C, inside the softmaxed
    input check's band), the second half's confidently wrong: per-shard means fall on both sides."""
    x = torch.zeros(N * 2, C, dtype=torch.float64)
    x[:N] = torch.randn(N, C, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.1
    x[N:, 0] = 20.0
    t = torch.arange(N * 2) % C
    t[N:] = 1
    return x, t


# =============================================================================== the ranks


def _placements(names: tuple[str, ...]) -> list[Any]:
    from torch.distributed.tensor import Partial, Replicate, Shard

    return [Replicate() if n == "R" else Partial() if n == "P" else Shard(int(n[1:])) for n in names]


def _target_placements(names: tuple[str, ...], dims: int) -> list[Any]:
    from torch.distributed.tensor import Replicate, Shard

    out: list[Any] = []
    for n in names:
        d = int(n[1:]) if n.startswith("S") else None
        out.append(Shard(d if d == 0 else d - 1) if d is not None and d != 1 and dims >= 2 else Replicate())
    return out


def _logits(x: torch.Tensor, mesh: Any, names: tuple[str, ...]) -> tuple[Any, torch.Tensor]:
    """The DTensor logits and the leaf whose gradient is checked."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if "P" not in names:
        dx = distribute_tensor(x, mesh, _placements(names)).requires_grad_()
        return dx, dx
    # Partial on a mesh dim: the local parts sum to the logits (3/4 and 1/4 of them).
    full = distribute_tensor(x, mesh, _placements(tuple("R" if n == "P" else n for n in names)))
    pdim = names.index("P")
    share = 0.75 if mesh.get_coordinate()[pdim] == 0 else 0.25
    leaf = (full.to_local() * share).requires_grad_()
    return DTensor.from_local(leaf, mesh, _placements(names), run_check=False, shape=x.shape, stride=x.stride()), leaf


_record = record


def _case(mesh: Any, layout: str, option: str, variant: str = "") -> dict[str, Any]:
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    _, names, dims, lp = LAYOUTS[layout]
    red, use_w, eps, ignore = OPTIONS[option]
    x, t, w = _data(dims)
    if ignore:
        t.view(-1)[::4] = -100
    if variant == "nan":
        x[N - 1, C - 1] = math.nan  # the last shard's rows and classes
    elif variant == "bad":
        t.view(-1)[-1] = C
    dx, leaf = _logits(x, mesh, names)
    dt = distribute_tensor(t, mesh, _target_placements(names, dims))
    ctx = loss_parallel() if lp else _nullcontext()
    with ctx:
        out = safeloss.cross_entropy(dx, dt, w if use_w else None, reduction=red, label_smoothing=eps)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        (out.full_tensor() * g).sum().backward()
    grad = leaf.grad.full_tensor() if hasattr(leaf.grad, "full_tensor") else leaf.grad
    return {"out": out.full_tensor().detach(), "placements": [repr(p) for p in out.placements],
            "grad": grad.detach(), "local_out": out.to_local().detach()}


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def _prob_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x, _, _ = _data(2, seed=4)
    y = torch.rand(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64).softmax(1)
    return x, y


def _prob_case(mesh: Any, layout: str) -> dict[str, Any]:
    """Probability targets as a DTensor of the logits' layout: the classes are gathered (no
    per-slice loss exists for them), as stock does outside loss_parallel()."""
    from torch.distributed.tensor import distribute_tensor

    names = LAYOUTS[layout][1]
    x, y = _prob_inputs()
    dx = distribute_tensor(x, mesh, _placements(names)).requires_grad_()
    out = safeloss.cross_entropy(dx, distribute_tensor(y, mesh, _placements(names)), label_smoothing=0.1)
    out.backward()
    return {"out": out.full_tensor().detach(), "grad": dx.grad.full_tensor()}


def _plain_target_batch_sharded(mesh: Any) -> Any:
    from torch.distributed.tensor import Shard, distribute_tensor

    x, t, _ = _data(2)
    return safeloss.cross_entropy(distribute_tensor(x, mesh, [Shard(0)]), t)


def _straddling(mesh: Any) -> Any:
    from torch.distributed.tensor import Shard, distribute_tensor

    x, t = _band_straddling()
    return safeloss.cross_entropy(distribute_tensor(x, mesh, [Shard(0)]), distribute_tensor(t, mesh, [Shard(0)])
                                  ).full_tensor().detach()


def _worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    results: dict[str, Any] = {}
    try:
        meshes = {(4,): init_device_mesh("cpu", (4,)), (2, 2): init_device_mesh("cpu", (2, 2))}
        for layout, (mshape, *_) in LAYOUTS.items():
            mesh = meshes[mshape]
            for option in OPTIONS:
                results[f"{layout}/{option}"] = _record(lambda m=mesh, ly=layout, o=option: _case(m, ly, o))
            for variant in ("nan", "bad"):
                results[f"{layout}/{variant}"] = _record(lambda m=mesh, ly=layout, v=variant: _case(m, ly, "mean", v))
        for layout in PROB_LAYOUTS:
            mesh = meshes[LAYOUTS[layout][0]]
            results[f"{layout}/prob"] = _record(lambda m=mesh, ly=layout: _prob_case(m, ly))
        results["plain-target-batch-sharded"] = _record(lambda: _plain_target_batch_sharded(meshes[(4,)]))
        results["straddling"] = _record(lambda: _straddling(meshes[(4,)]))
        dist.barrier()
    finally:
        torch.save(results, f"{out}.{rank}")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return spawn(_worker, WORLD, tmp_path_factory.mktemp("dtensor"), DEADLINE_S, "DTensor workers")


# =============================================================================== judged here


def _reference(layout: str, option: str) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, dims, _ = LAYOUTS[layout]
    red, use_w, eps, ignore = OPTIONS[option]
    x, t, w = _data(dims)
    if ignore:
        t.view(-1)[::4] = -100
    x = x.clone().requires_grad_()
    ref = F.cross_entropy(x, t, w if use_w else None, reduction=red, label_smoothing=eps)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (ref * g).sum().backward()
    return ref.detach(), x.grad


def _leaf_slice(grad: torch.Tensor, layout: str, rank: int) -> torch.Tensor:
    """The part of the full gradient a Partial layout's local leaf holds (its class shard)."""
    sizes = [4, 3]  # 7 classes over the 2 ranks of the class mesh dim
    tp = rank % 2
    return grad.narrow(1, sum(sizes[:tp]), sizes[tp])


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_matches_stock_on_the_whole_tensors(ranks: list[dict], layout: str, option: str) -> None:
    ref, grad = _reference(layout, option)
    red = OPTIONS[option][0]
    names = LAYOUTS[layout][1]
    for rank, res in enumerate(ranks):
        got = res[f"{layout}/{option}"]
        assert "ok" in got, f"{layout}/{option} rank {rank}: {got}"
        assert got["warnings"] == [], got["warnings"]
        r = got["ok"]
        assert_matches(r["out"], ref, what=f"{layout}/{option} loss, rank {rank}")
        want = grad if "P" not in names else _leaf_slice(grad, layout, rank)
        assert_matches(r["grad"], want, what=f"{layout}/{option} grad, rank {rank}")
        # none: sharded like the positions; sum and mean: the global value, replicated.
        if red == "none":
            dims = LAYOUTS[layout][2]
            assert r["placements"] == [repr(p) for p in _target_placements(names, dims)]
        else:
            assert set(r["placements"]) == {"Replicate()"}
            assert_matches(r["local_out"], ref, what=f"{layout}/{option} local value, rank {rank}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_nan_logit_warns_on_every_rank(ranks: list[dict], layout: str) -> None:
    """Was: RuntimeError aten.nonzero.default (replicated logits, classes outside loss_parallel())."""
    dims = LAYOUTS[layout][2]
    where = "1 of 6 positions (first at [5])" if dims == 2 else f"{D} of {N * D} positions (first at [5, 0]"
    got = [r[f"{layout}/nan"] for r in ranks]
    for g in got:
        assert "ok" in g, g
        assert math.isnan(float(g["ok"]["out"]))
        assert len(g["warnings"]) == 1 and f"NaN or infinite at {where}" in g["warnings"][0], g["warnings"]
    assert len({tuple(g["warnings"]) for g in got}) == 1


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bad_label_raises_the_same_error_on_every_rank(ranks: list[dict], layout: str) -> None:
    """Was: aten.nonzero.default, or (2-D mesh under loss_parallel()) stock's number with the
    position scored 0. Stock raises IndexError: safeloss's error is one too."""
    dims = LAYOUTS[layout][2]
    where = "[5]" if dims == 2 else "[5, 2]"
    got = [r[f"{layout}/bad"] for r in ranks]
    for g in got:
        assert g.get("error") == "TargetOutOfRangeError" and "IndexError" in g["builtins"], g
        assert f"bad values: {C} at {where}" in g["message"], g["message"]
    assert len({g["message"] for g in got}) == 1


@pytest.mark.parametrize("layout", PROB_LAYOUTS)
def test_probability_targets_gather_the_classes(ranks: list[dict], layout: str) -> None:
    x, y = _prob_inputs()
    x = x.clone().requires_grad_()
    ref = F.cross_entropy(x, y, label_smoothing=0.1)
    ref.backward()
    for rank, r in enumerate(ranks):
        got = r[f"{layout}/prob"]
        assert "ok" in got and got["warnings"] == [], got
        assert_matches(got["ok"]["out"], ref.detach(), what=f"{layout} probabilities, rank {rank}")
        assert_matches(got["ok"]["grad"], x.grad, what=f"{layout} probabilities grad, rank {rank}")


def test_plain_target_with_sharded_positions_is_refused_alike(ranks: list[dict]) -> None:
    got = [r["plain-target-batch-sharded"] for r in ranks]
    for g in got:
        assert g.get("error") == "TargetShapeError" and "ValueError" in g["builtins"], g
        assert "plain tensor target" in g["message"] and "DTensor.from_local" in g["message"]
    assert len({g["message"] for g in got}) == 1


def test_batch_sharded_means_straddling_the_softmax_band_do_not_hang(ranks: list[dict]) -> None:
    """Was a hang: each rank judged the softmax check on its own shard's mean; one entered a
    redistribute the other never did."""
    x, t = _band_straddling()
    for r in ranks:
        got = r["straddling"]
        assert "ok" in got, got
        assert_matches(got["ok"], F.cross_entropy(x, t))

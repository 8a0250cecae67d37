"""A hostile user of ``safeloss.vocab_parallel_cross_entropy`` (plain slices, gloo, CPU ranks).

One spawn per world size runs every case (spawning is the slow part); each rank records what it
got per case, and the tests here judge it: values and gradients against stock ``F.cross_entropy``
on the gathered logits with a non-trivial upstream gradient, errors as one class and text on every
rank. A gloo timeout turns a hang into an error, and the fixture kills the workers at a deadline.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import safeloss
from tests.ranks import init_gloo, record, spawn
from tests.tolerances import assert_matches

DEADLINE_S = 240


# =============================================================================== cases

def _sizes(C: int, world: int, kind: str) -> list[int]:
    if kind == "even":
        base = [C // world] * world
        base[-1] += C - sum(base)
        return base
    if kind == "empty-first":
        return [0] + _sizes(C, world - 1, "even")
    if kind == "empty-last":
        return _sizes(C, world - 1, "even") + [0]
    if kind == "lopsided":
        return [1] * (world - 1) + [C - (world - 1)]
    raise AssertionError(kind)


# Calls that must match stock on the gathered logits, on every world size.
MATCH: list[dict[str, Any]] = [
    dict(name="uneven", C=7, split="lopsided"),
    dict(name="empty-first", C=5, split="empty-first", weight=True, eps=0.1),
    dict(name="empty-last", C=5, split="empty-last", red="none"),
    dict(name="C2-over-all", C=2, split="lopsided", red="sum"),
    dict(name="kd", C=6, shape=(3, 2, 2), weight=True, red="none"),
    dict(name="kd-mean-eps", C=6, shape=(2, 3, 2), weight=True, eps=0.2, ignore=True),
    dict(name="1d-0d-target", C=6, shape=(), red="none"),
    dict(name="1d-0d-target-eps-w", C=6, shape=(), eps=0.3, weight=True),
    dict(name="transposed", C=6, layout="transposed", weight=True),
    dict(name="strided", C=6, layout="strided", eps=0.1),
    dict(name="kd-channels-last", C=6, shape=(2, 2, 3), layout="channels-last", red="none"),
    dict(name="float32", C=7, dtype=torch.float32, weight=True, eps=0.1),
    dict(name="float16", C=7, dtype=torch.float16, weight=True, eps=0.1),
    dict(name="bfloat16", C=7, dtype=torch.bfloat16, red="none"),
    dict(name="ignore-last-class", C=6, ignore_index=5, ignore=True, weight=True, eps=0.1),
    dict(name="ignore-other-rank-class", C=6, ignore_index=1, ignore=True, red="sum"),
    dict(name="ignore-negative", C=6, ignore_index=-1, ignore=True, red="none"),
    dict(name="ignore-0", C=6, ignore_index=0, ignore=True, weight=True),
    dict(name="smoothing-weight-sum", C=7, eps=0.25, weight=True, red="sum"),
    dict(name="all-ignored-mean", C=5, all_ignored=True, warns=True),
    dict(name="all-ignored-sum", C=5, all_ignored=True, red="sum"),
    dict(name="all-ignored-none", C=5, all_ignored=True, red="none", eps=0.1),
    dict(name="zero-total-weight", C=5, zero_weight=True, warns=True),
    dict(name="nan-one-rank", C=6, nan_on_last=True, red="none", warns=True),
    dict(name="posinf-one-rank", C=6, posinf_on_first=True, red="none", warns=True),
    dict(name="neginf-one-rank-row", C=6, neginf_on_last=True, red="none"),
    dict(name="neginf-one-rank-row-smoothing", C=6, neginf_on_last=True, eps=0.1, red="none", warns=True),
    dict(name="expanded", C=6, layout="expanded", weight=True, red="none"),
    dict(name="expanded-triton", C=6, layout="expanded", dtype=torch.float32, backend="triton", eps=0.1),
    dict(name="strided-triton-kd", C=6, shape=(2, 2), layout="channels-last", dtype=torch.float32,
         backend="triton", eps=0.1, weight=True),
    dict(name="target-transposed-kd", C=6, shape=(3, 2), target_layout="transposed", red="none"),
    dict(name="weight-strided", C=6, weight_layout="strided", eps=0.1),
    dict(name="bf16-kd-eps-weight", C=6, shape=(3, 2), dtype=torch.bfloat16, eps=0.1, weight=True),
    dict(name="smoothing-one", C=5, eps=1.0, weight=True, ignore=True),
    dict(name="stats-ties", C=6, ties=True, extras=dict(return_stats=True), red="none"),
    dict(name="stats-ties-triton", C=6, ties=True, dtype=torch.float32, backend="triton",
         extras=dict(return_stats=True), red="none"),
    dict(name="stats-all-ignored", C=6, all_ignored=True, extras=dict(return_stats=True), red="sum"),
    dict(name="stats-nan-one-rank", C=6, nan_on_last=True, extras=dict(return_stats=True), red="none", warns=True),
    dict(name="stats-posinf", C=6, posinf_on_first=True, extras=dict(return_stats=True),
         red="none", warns=True),
    dict(name="extras-empty-slice", C=5, split="empty-first", extras=dict(softcap=2.5, temperature=2.0,
         z_loss=1e-2, return_stats=True), eps=0.1, weight=True),
    dict(name="extras-triton-empty-slice", C=5, split="empty-last", dtype=torch.float32, backend="triton",
         extras=dict(softcap=2.5, z_loss=1e-2, return_stats=True), ignore=True),
    dict(name="extras-fp16-triton", C=6, dtype=torch.float16, backend="triton",
         extras=dict(softcap=5.0, temperature=0.5), eps=0.1),
    dict(name="extras-bf16-1d", C=6, shape=(), dtype=torch.bfloat16,
         extras=dict(temperature=0.5, z_loss=1e-2, return_stats=True)),
    dict(name="retain-graph-twice", C=6, twice=True, weight=True, eps=0.1),
    dict(name="empty-batch-sum", C=5, shape=(0,), red="sum"),
    dict(name="empty-batch-none", C=5, shape=(0,), red="none"),
    dict(name="triton", C=6, dtype=torch.float32, backend="triton", weight=True, eps=0.1, ignore=True),
    dict(name="triton-fp16-kd", C=6, shape=(2, 2), dtype=torch.float16, backend="triton", red="none"),
    dict(name="extras", C=7, extras=dict(softcap=3.0, temperature=0.7, z_loss=1e-2), weight=True, eps=0.1,
         ignore=True),
    dict(name="extras-stats", C=7, extras=dict(z_loss=1e-3, return_stats=True), red="sum", ignore=True),
    dict(name="extras-stats-kd", C=6, shape=(2, 3), extras=dict(softcap=2.0, return_stats=True), red="none"),
    dict(name="extras-triton", C=6, dtype=torch.float32, backend="triton",
         extras=dict(softcap=4.0, temperature=1.3, z_loss=1e-2, return_stats=True), ignore=True),
]


def _inputs(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Full logits, labels, weight and upstream gradient of a case (the same in every process)."""
    gen = torch.Generator().manual_seed(sum(map(ord, case["name"])))
    C = case["C"]
    dtype = case.get("dtype", torch.float64)
    shape = case.get("shape", (5,))
    ii = case.get("ignore_index", -100)
    if shape == ():
        x = torch.randn(C, generator=gen, dtype=torch.float64) * 2
        t = torch.randint(0, C, (), generator=gen)
    else:
        n, *rest = shape
        x = torch.randn(n, C, *rest, generator=gen, dtype=torch.float64) * 2
        t = torch.randint(0, C, (n, *rest), generator=gen)
        if case.get("ignore") and t.numel():
            t.view(-1)[::2] = ii
    if case.get("all_ignored"):
        t = torch.full_like(t, ii)
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.2 if case.get("weight") else None
    if case.get("zero_weight"):
        w = torch.zeros(C, dtype=torch.float64)
        w[C - 1] = 1.0
        t = t.clamp(max=C - 2)
    if case.get("nan_on_last"):
        x.view(x.shape[0], C, -1)[1, C - 1] = math.nan
    if case.get("posinf_on_first"):
        x[2, 0] = math.inf
    if case.get("layout") == "expanded":
        x[:] = x[:1].clone()
    if case.get("ties"):  # the row maximum on two ranks' slices (argmax: the lowest column)
        x[:, 0] = x[:, C - 1] = 9.0
        t[0], t[1] = C - 1, 0
    if case.get("neginf_on_last"):
        x[1, C // 2:] = -math.inf
        t[1] = 0
    x = x.to(dtype)
    w = None if w is None else w.to(dtype)
    if case.get("target_layout") == "transposed":
        t = t.transpose(0, -1).contiguous().transpose(0, -1)
    if case.get("weight_layout") == "strided":
        w = torch.stack([torch.rand(C, generator=gen, dtype=dtype) + 0.2, torch.zeros(C, dtype=dtype)], 1)[:, 0]
    red = case.get("red", "mean")
    g = (torch.randn(t.shape, generator=gen, dtype=torch.float64) if red == "none"
         else torch.tensor(1.7, dtype=torch.float64)).to(dtype)
    return x, t, w, g


def _slice(x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    off = sum(sizes[:rank])
    return x.narrow(0 if x.dim() == 1 else 1, off, sizes[rank])


def _layout(xl: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The same values as ``xl`` in a hostile memory layout (a leaf that requires grad)."""
    if how == "transposed":  # (C_local, N) storage, viewed as (N, C_local)
        leaf = xl.t().contiguous().requires_grad_()
        return leaf, leaf.t()
    if how == "strided":  # every other element of a wider buffer
        buf = torch.zeros(xl.shape[0], 2 * xl.shape[1], dtype=xl.dtype)
        buf[:, ::2] = xl
        leaf = buf.requires_grad_()
        return leaf, leaf[:, ::2]
    if how == "expanded":  # stride 0 over the positions: every row the first one
        leaf = xl[:1].clone().requires_grad_()
        return leaf, leaf.expand(xl.shape)
    if how == "channels-last":
        leaf = xl.movedim(1, -1).contiguous().requires_grad_()
        return leaf, leaf.movedim(-1, 1)
    leaf = xl.clone().requires_grad_()
    return leaf, leaf


def _match_case(case: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    x, t, w, g = _inputs(case)
    sizes = _sizes(case["C"], world, case.get("split", "even"))
    leaf, xl = _layout(_slice(x, sizes, rank), case.get("layout", "contig"))
    ex = case.get("extras", {})
    res = safeloss.vocab_parallel_cross_entropy(
        xl, t, w, ignore_index=case.get("ignore_index", -100), reduction=case.get("red", "mean"),
        label_smoothing=case.get("eps", 0.0), backend=case.get("backend", "auto"), **ex)
    out, stats = (res if ex.get("return_stats") else (res, None))
    (out * g).sum().backward(retain_graph=bool(case.get("twice")))
    grad1 = leaf.grad.clone()
    if case.get("twice"):
        (out * g).sum().backward()
        assert torch.equal(leaf.grad, 2 * grad1), "second backward differs"
    grad = grad1 if case.get("layout", "contig") == "contig" else _layout_back(grad1, case["layout"])
    return {"out": out.detach(), "grad": grad, "stats": stats}


def _layout_back(g: torch.Tensor, how: str) -> torch.Tensor:
    if how == "expanded":
        return g
    if how == "transposed":
        return g.t()
    if how == "strided":
        return g[:, ::2]
    return g.movedim(-1, 1)


_call = record


# Calls every rank must refuse with one error (class and text), in the same call.
def _error_case(name: str, rank: int, world: int) -> Any:
    C = 6
    sizes = _sizes(C, world, "even")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, C, generator=gen, dtype=torch.float64)
    t = torch.randint(0, C, (4,), generator=gen)
    xl = _slice(x, sizes, rank).clone()
    kw: dict[str, Any] = {}
    last = rank == world - 1
    w = None
    if name == "label-C":  # in no rank's slice: one past the last
        t[1] = C
    elif name == "label-C-last-rank-only":
        if last:
            t[1] = C
    elif name == "label-negative-one-rank":
        if rank == 0:
            t[2] = -5
    elif name == "label-ignore-on-one-rank":  # one rank's ignore_index differs
        kw["ignore_index"] = -1 if last else -100
    elif name == "batch-differs":
        if last:
            xl, t = xl[:3], t[:3]
    elif name == "batch-differs-target-only":
        if last:
            t = t[:3]
    elif name == "dtype-differs":
        if last:
            xl = xl.float()
    elif name == "target-dtype-differs":
        if last:
            t = t.int()
    elif name == "meta-one-rank":
        if last:
            xl = xl.to("meta")
    elif name == "meta-target-one-rank":
        if last:
            t = t.to("meta")
    elif name == "strict-one-rank-softmaxed":
        xl = _slice(torch.softmax(x, 1), sizes, rank).clone()
        kw["strict"] = rank == 0
    elif name == "strict-one-rank-nan":
        if last:
            xl[0, 0] = math.nan
        kw["strict"] = rank == 0
    elif name == "strict-one-rank-all-ignored":
        t[:] = -100
        kw["strict"] = last
    elif name == "weight-differs-one-rank":
        w = torch.ones(C, dtype=torch.float64)
        if last:
            w[0] = 2
    elif name == "weight-dtype-one-rank":
        w = torch.ones(C, dtype=torch.float32 if last else torch.float64)
    elif name == "weight-one-rank-only":
        w = torch.ones(C, dtype=torch.float64) if last else None
    elif name == "weight-local-slice":  # the Megatron habit: this rank's slice of the weight
        w = torch.ones(sizes[rank], dtype=torch.float64)
    elif name == "reduction-one-rank":
        kw["reduction"] = "sum" if last else "mean"
    elif name == "extras-one-rank":
        kw["z_loss"] = 1e-3 if last else 0.0
    elif name == "bad-temperature-one-rank":
        kw["temperature"] = 0.0 if last else 1.0
    elif name == "triton-fp64":
        kw["backend"] = "triton"
    elif name == "triton-one-rank":
        x32 = x.float()
        xl = _slice(x32, sizes, rank).clone()
        kw["backend"] = "triton" if last else "torch"
    elif name == "grad-mode-one-rank":
        xl.requires_grad_()
        with torch.set_grad_enabled(not last):
            return safeloss.vocab_parallel_cross_entropy(xl, t, w, **kw)
    elif name == "double-backward":
        xl.requires_grad_()
        out = safeloss.vocab_parallel_cross_entropy(xl, t)
        (gx,) = torch.autograd.grad(out, xl, create_graph=True)
        return gx
    elif name == "no-group":
        return None
    else:
        raise AssertionError(name)
    return safeloss.vocab_parallel_cross_entropy(xl, t, w, **kw)


ERRORS = {
    "label-C": "TargetOutOfRangeError",
    "label-C-last-rank-only": "TargetOutOfRangeError",
    "label-negative-one-rank": "TargetOutOfRangeError",
    "label-ignore-on-one-rank": "ParallelMismatchError",
    "batch-differs": "ParallelMismatchError",
    "batch-differs-target-only": None,  # any one error, the same on every rank
    "dtype-differs": "ParallelMismatchError",
    "target-dtype-differs": "ParallelMismatchError",
    "meta-one-rank": None,
    "meta-target-one-rank": None,
    "strict-one-rank-softmaxed": "InputError",
    "strict-one-rank-nan": "NonFiniteError",
    "strict-one-rank-all-ignored": None,
    "weight-differs-one-rank": "ParallelMismatchError",
    "weight-dtype-one-rank": "ParallelMismatchError",
    "weight-one-rank-only": "ParallelMismatchError",
    "weight-local-slice": "WeightError",
    "reduction-one-rank": "ParallelMismatchError",
    "extras-one-rank": "ParallelMismatchError",
    "bad-temperature-one-rank": None,
    "triton-fp64": "BackendError",
    "grad-mode-one-rank": "ParallelMismatchError",
    "double-backward": "BackendError",
}


def _no_grad_case(rank: int, world: int, mode: str) -> dict[str, Any]:
    case = dict(name=f"nograd-{mode}", C=6, weight=True, eps=0.1)
    x, t, w, _ = _inputs(case)
    xl = _slice(x, _sizes(6, world, "even"), rank).clone().requires_grad_()
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        out = safeloss.vocab_parallel_cross_entropy(xl, t, w, label_smoothing=0.1)
    return {"out": out, "requires_grad": out.requires_grad}


def _subgroup_case(rank: int, world: int, group: Any) -> Any:
    """Ranks 0 and 1 of 3 form the tensor-parallel group; rank 2 does not call."""
    case = dict(name="subgroup", C=5, weight=True, eps=0.1)
    x, t, w, g = _inputs(case)
    if rank == 2:
        return None
    xl = _slice(x, [2, 3], rank).clone().requires_grad_()
    out = safeloss.vocab_parallel_cross_entropy(xl, t, w, label_smoothing=0.1, group=group)
    (out * g).sum().backward()
    return {"out": out.detach(), "grad": xl.grad}


def _subgroup_bad_label(rank: int, group: Any) -> Any:
    if rank == 2:
        return None
    t = torch.tensor([0, 1, 9 if rank == 1 else 0])
    return safeloss.vocab_parallel_cross_entropy(torch.randn(3, 2 + rank), t, group=group)


def _group_case(name: str, rank: int, world: int, solo: Any) -> Any:
    """Wrong things passed as ``group``: a group this rank is not in, a DeviceMesh, a rank list."""
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0, 3, 1])
    if name == "group-not-member":  # rank 0 alone holds every class; the others are not members
        return safeloss.vocab_parallel_cross_entropy(x, t, group=solo)
    sizes = _sizes(4, world, "even")
    xl = _slice(x, sizes, rank)
    if name == "group-mesh":
        from torch.distributed.device_mesh import init_device_mesh

        return safeloss.vocab_parallel_cross_entropy(xl, t, group=init_device_mesh("cpu", (world,)))
    if name == "group-rank-list":
        return safeloss.vocab_parallel_cross_entropy(xl, t, group=list(range(world)))
    raise AssertionError(name)


GROUPS = ["group-not-member", "group-mesh", "group-rank-list"]


def _tiny_C(rank: int, world: int, C: int) -> dict[str, Any]:
    """C = 1 or 2 classes over every rank (empty slices on the others)."""
    sizes = [0] * world
    for i in range(C):
        sizes[world - 1 - i] = 1
    x = torch.randn(4, C, generator=torch.Generator().manual_seed(C), dtype=torch.float64)
    t = torch.tensor([0, C - 1, 0, C - 1])
    xl = _slice(x, sizes, rank).clone().requires_grad_()
    g = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float64)
    out = safeloss.vocab_parallel_cross_entropy(xl, t, reduction="none")
    (out * g).sum().backward()
    return {"out": out.detach(), "grad": xl.grad, "sizes": sizes}


def _worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    init_gloo(rank, world, store)
    results: dict[str, Any] = {}
    try:
        for case in MATCH:
            results[case["name"]] = _call(lambda case=case: _match_case(case, rank, world))
        for name in ERRORS:
            results[name] = _call(lambda name=name: _error_case(name, rank, world))
        results["triton-one-rank"] = _call(lambda: _error_case("triton-one-rank", rank, world))
        for mode in ("no_grad", "inference_mode"):
            results[f"nograd-{mode}"] = _call(lambda m=mode: _no_grad_case(rank, world, m))
        for c in (1, 2):
            results[f"tinyC-{c}"] = _call(lambda c=c: _tiny_C(rank, world, c))
        solo = dist.new_group([0])
        for name in GROUPS:
            results[name] = _call(lambda name=name: _group_case(name, rank, world, solo))
        if world == 3:
            group = dist.new_group([0, 1])
            results["subgroup"] = _call(lambda: _subgroup_case(rank, world, group))
            results["subgroup-bad-label"] = _call(lambda: _subgroup_bad_label(rank, group))
        results["after"] = _call(lambda: _match_case(MATCH[0], rank, world))  # the group still works
        dist.barrier()
    finally:
        torch.save(results, f"{out}.{rank}")
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[dict]]:
    world = request.param
    return world, spawn(_worker, world, tmp_path_factory.mktemp(f"vh{world}"), DEADLINE_S, "workers")


# =============================================================================== judged here

def _reference(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """Stock on the gathered logits (safeloss.cross_entropy for the extras, which stock lacks),
    in the case's dtype and in float64 (the truth for half formats)."""
    x, t, w, g = _inputs(case)
    red, eps, ii = case.get("red", "mean"), case.get("eps", 0.0), case.get("ignore_index", -100)
    outs = []
    for dt in (x.dtype, torch.float64):
        xx = x.to(dt).clone().requires_grad_()
        ww = None if w is None else w.to(dt)
        ex = case.get("extras")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if ex and set(ex) != {"return_stats"}:
                res = safeloss.cross_entropy(xx, t, ww, ignore_index=ii, reduction=red, label_smoothing=eps, **ex)
                out, stats = res if ex.get("return_stats") else (res, None)
            else:  # the loss from stock; the statistics from the single-device safeloss
                out, stats = F.cross_entropy(xx, t, ww, ignore_index=ii, reduction=red, label_smoothing=eps), None
                if ex:
                    stats = safeloss.cross_entropy(xx.detach(), t, ww, ignore_index=ii, reduction=red,
                                                   label_smoothing=eps, return_stats=True)[1]
        (out * g.to(dt)).sum().backward()
        outs.append((out.detach(), xx.grad, stats))
    (o, gr, st), (o64, gr64, _) = outs
    return o, gr, o64, gr64, st


@pytest.mark.parametrize("case", MATCH, ids=lambda c: c["name"])
def test_matches_stock_on_gathered_logits(ranks: tuple[int, list[dict]], case: dict[str, Any]) -> None:
    world, res = ranks
    ref, grad, ref64, grad64, stats = _reference(case)
    sizes = _sizes(case["C"], world, case.get("split", "even"))
    for rank in range(world):
        got = res[rank][case["name"]]
        assert "ok" in got, f"rank {rank}: {got}"
        assert bool(got["warnings"]) == bool(case.get("warns")), f"rank {rank}: {got['warnings']}"
        what = f"{case['name']} rank {rank}"
        assert_matches(got["ok"]["out"], ref, ref64, what=f"{what} loss")
        gr, gr64 = _slice(grad, sizes, rank), _slice(grad64, sizes, rank)
        if case.get("layout") == "expanded":  # the leaf is one row, broadcast to every position
            gr, gr64 = gr.sum(0, keepdim=True), gr64.sum(0, keepdim=True)
        assert_matches(got["ok"]["grad"], gr, gr64, what=f"{what} grad")
        if stats is not None:
            for field in ("lse", "entropy", "z_loss", "accuracy"):
                torch.testing.assert_close(getattr(got["ok"]["stats"], field), getattr(stats, field),
                                           equal_nan=True, msg=lambda m, f=field, w=what: f"{w} stats.{f}: {m}")


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors_are_one_error_on_every_rank(ranks: tuple[int, list[dict]], name: str) -> None:
    _, res = ranks
    got = [r[name] for r in res]
    for rank, g in enumerate(got):
        assert "error" in g, f"rank {rank} did not raise: {g}"
        assert g["seconds"] < 20, f"rank {rank} took {g['seconds']:.1f} s: waited on a collective"
    cls = ERRORS[name]
    if cls is not None:
        assert got[0]["error"] == cls, got[0]
    assert len({(g["error"], g["message"]) for g in got}) == 1, [(g["error"], g["message"]) for g in got]
    assert got[0]["safeloss"], got[0]  # safeloss's message, never torch's internals


# Messages that must name the likely cause of the parallel setting, not the single-device one.
MESSAGES = {
    # was the single-device hint "computed from the labels present (torch.bincount ...)"
    "weight-local-slice": r"weight has shape \(3,\): the width of this rank's slice of the classes \(rank 0 "
                          r"holds classes 0\.\.2 of 6\)(?s:.*)full \(C,\) class weight(?s:.*)"
                          r"Fix: pass the full weight \(6 entries\) on every rank",
    # The mismatches name what differs and each rank's value (was one sentence listing every
    # argument the fingerprint covers, and the data-loader fix for a wrong reduction or dtype).
    "reduction-one-rank": r"reduction: 'mean' on ranks? 0[^;]*; 'sum' on rank L(?s:.*)Fix: pass the same "
                          r"arguments on every rank",
    "dtype-differs": r"logits dtype: torch.float64 on ranks? 0[^;]*; torch.float32 on rank L",
    "grad-mode-one-rank": r"grad mode: enabled on ranks? 0[^;]*; disabled on rank L(?s:.*)torch.no_grad",
    "batch-differs": r"positions shape: \(4,\) on ranks? 0[^;]*; \(3,\) on rank L(?s:.*)data loader",
    "target-dtype-differs": r"target: \(4,\) torch.int64 on ranks? 0[^;]*; \(4,\) torch.int32 on rank L",
    "label-ignore-on-one-rank": r"ignore_index: -100 on ranks? 0[^;]*; -1 on rank L",
    "weight-dtype-one-rank": r"weight: \(6,\) torch.float64 on ranks? 0[^;]*; \(6,\) torch.float32 on rank L",
    "weight-one-rank-only": r"weight: None on ranks? 0[^;]*; \(6,\) torch.float64 on rank L",
}


@pytest.mark.parametrize("name", MESSAGES)
def test_messages_name_the_parallel_cause(ranks: tuple[int, list[dict]], name: str) -> None:
    import re

    world, res = ranks
    if name == "weight-local-slice" and world == 3:
        pattern = MESSAGES[name].replace("3,", "2,").replace("0\\.\\.2", "0\\.\\.1")
    else:
        pattern = MESSAGES[name]
    pattern = pattern.replace("rank L", f"rank {world - 1}")
    for rank in range(world):
        assert re.search(pattern, res[rank][name].get("message", "")), res[rank][name]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_grad_and_inference_mode(ranks: tuple[int, list[dict]], mode: str) -> None:
    world, res = ranks
    case = dict(name=f"nograd-{mode}", C=6, weight=True, eps=0.1)
    x, t, w, _ = _inputs(case)
    ref = F.cross_entropy(x, t, w, label_smoothing=0.1)
    for rank in range(world):
        got = res[rank][f"nograd-{mode}"]
        assert "ok" in got, got
        assert not got["ok"]["requires_grad"]
        assert_matches(got["ok"]["out"], ref, what=mode)


@pytest.mark.parametrize("C", [1, 2])
def test_one_or_two_classes_over_every_rank(ranks: tuple[int, list[dict]], C: int) -> None:
    world, res = ranks
    x = torch.randn(4, C, generator=torch.Generator().manual_seed(C), dtype=torch.float64).requires_grad_()
    t = torch.tensor([0, C - 1, 0, C - 1])
    g = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float64)
    ref = F.cross_entropy(x, t, reduction="none")
    (ref * g).sum().backward()
    for rank in range(world):
        got = res[rank][f"tinyC-{C}"]
        assert "ok" in got, got
        assert_matches(got["ok"]["out"], ref.detach(), what=f"C={C} rank {rank}")
        assert_matches(got["ok"]["grad"], _slice(x.grad, got["ok"]["sizes"], rank), what=f"C={C} grad rank {rank}")


def test_subgroup_of_two_of_three_ranks(ranks: tuple[int, list[dict]]) -> None:
    world, res = ranks
    if world != 3:
        pytest.skip("a subgroup needs 3 ranks")
    case = dict(name="subgroup", C=5, weight=True, eps=0.1)
    x, t, w, g = _inputs(case)
    x = x.clone().requires_grad_()
    ref = F.cross_entropy(x, t, w, label_smoothing=0.1)
    (ref * g).sum().backward()
    for rank in (0, 1):
        got = res[rank]["subgroup"]
        assert "ok" in got, got
        assert_matches(got["ok"]["out"], ref.detach(), what=f"subgroup rank {rank}")
        assert_matches(got["ok"]["grad"], _slice(x.grad, [2, 3], rank), what=f"subgroup grad rank {rank}")
    bad = [res[r]["subgroup-bad-label"] for r in (0, 1)]
    assert all(b.get("error") == "TargetOutOfRangeError" for b in bad), bad
    assert bad[0]["message"] == bad[1]["message"]
    assert "rank 1 of 2" in bad[0]["message"], bad[0]["message"]  # the rank in the group, not the world


def test_group_still_usable_after_every_case(ranks: tuple[int, list[dict]]) -> None:
    world, res = ranks
    for rank in range(world):
        assert "ok" in res[rank]["after"], res[rank]["after"]


def test_backend_may_differ_between_ranks(ranks: tuple[int, list[dict]]) -> None:
    """The backend is a local choice (Triton or torch statistics of the same slice): no agreement."""
    _, res = ranks
    outs = [r["triton-one-rank"] for r in res]
    assert all("ok" in o for o in outs), outs
    for o in outs[1:]:
        assert_matches(o["ok"], outs[0]["ok"], what="backend per rank")


GROUP_ERRORS = {
    # was ValueError "Unsupported group type: <class 'int'>, -100" (get_rank(group) is -1 there)
    "group-not-member": ("BackendError", r"\(global rank 1\) is not a member of the group passed as group= "
                         r"\(new_group returned GroupMember.NON_GROUP_MEMBER here\)(?s:.*)Fix: .*get_rank\(group\) >= 0"),
    # was ValueError "Group DeviceMesh(...) is not registered"
    "group-mesh": ("ArgumentTypeError", r"group= takes a ProcessGroup, got a DeviceMesh(?s:.*)"
                   r"Fix: group=mesh.get_group\(\)"),
    # was TypeError "unhashable type: 'list'"
    "group-rank-list": ("ArgumentTypeError", r"group= takes a ProcessGroup, got a list(?s:.*)"
                        r"Fix: group=torch.distributed.new_group\(\[0, 1"),
}


@pytest.mark.parametrize("name", GROUP_ERRORS)
def test_wrong_group_is_a_clear_error(ranks: tuple[int, list[dict]], name: str) -> None:
    """Raised locally (no collective can run on such a group), with the fix; never torch's
    internals. A non-member rank raises; the member computes the loss of its classes alone."""
    import re

    world, res = ranks
    cls, pattern = GROUP_ERRORS[name]
    for rank in range(world):
        got = res[rank][name]
        if name == "group-not-member" and rank == 0:
            assert "ok" in got, got
            continue
        assert got.get("error") == cls, got
        assert re.search(pattern.replace("rank 1\\)", f"rank {rank}\\)"), got["message"]), got["message"]
        assert "TypeError" in got["builtins"] or cls != "ArgumentTypeError"


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("extra", [dict(return_stats=True), dict(temperature=2.0), dict(z_loss=1e-4),
                                   dict(temperature=0.5, label_smoothing=0.1)], ids=str)
@pytest.mark.parametrize("row", ["posinf", "all-neginf"])
def test_single_device_extras_keep_stocks_nan_for_a_nonfinite_row(op: str, extra: dict, row: str) -> None:
    """A row holding +inf (or only -inf) is NaN for stock (log_softmax's inf - inf), and for
    the vocab-parallel loss; the single-device extras paths gave +inf (lse - z_y with lse = inf).
    The finite rows keep their values bit for bit."""
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if row == "posinf":
        x[1, 0] = math.inf
    else:
        x[1] = -math.inf
    t = torch.tensor([1, 2, 3])
    kw = dict(extra)
    eps = kw.pop("label_smoothing", 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = F.cross_entropy(x / kw.get("temperature", 1.0), t, reduction="none", label_smoothing=eps)
        if op == "cross_entropy":
            got = safeloss.cross_entropy(x, t, reduction="none", label_smoothing=eps, **kw)
        else:  # the logits as a head: the identity over 4 classes
            got = safeloss.linear_cross_entropy(x, torch.eye(4, dtype=x.dtype), t, reduction="none",
                                                label_smoothing=eps, **kw)
    got = got[0] if isinstance(got, tuple) else got
    assert torch.equal(got.isnan(), ref.isnan()) and bool(got[1].isnan()), (got, ref)
    if "z_loss" not in kw:
        finite = ~ref.isnan()
        torch.testing.assert_close(got[finite], ref[finite])

"""Vocab-parallel cross-entropy (safeloss.parallel) on 2 and 3 CPU ranks over gloo.

One process group per world size runs every case (process start-up is paid once); each rank
writes what it got, and the tests here judge it against single-process stock cross-entropy on the
gathered logits. Cases that raise must raise the same error class and text on every rank, and the
group must stay usable after them (the next case's all-reduces would hang or fail otherwise).

No ports (a FileStore in tmp_path), a gloo timeout so that a hang becomes an error, a hard
deadline on the join, and destroy_process_group after a final barrier on every rank (a rank that
exits while another is still inside a collective aborts gloo's threads).
"""

from __future__ import annotations

import collections
import datetime
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import safeloss
from tests.ranks import record, spawn
from tests.tolerances import assert_matches

C = 7  # classes: uneven over 2 and 3 ranks
SLICES = {2: [3, 4], 3: [2, 0, 5]}  # plain path; 3 ranks include an empty slice
DEADLINE_S = 300  # the 3-rank fixture runs every case in one spawn: slow on a loaded 2-core machine


# =============================================================================== cases


def _grid() -> list[dict[str, Any]]:
    out = []
    i = 0
    for red in ("mean", "sum", "none"):
        for eps in (0.0, 0.1):
            for weight in (False, True):
                for shape in ((6,), (3, 2)):  # (N, C) and (N, C, d)
                    out.append(dict(name=f"plain-{red}-eps{eps}-w{int(weight)}-{len(shape)}d", kind="plain",
                                    seed=i, shape=shape, red=red, eps=eps, weight=weight, ignore=True))
                    i += 1
    out.append(dict(name="plain-float32", kind="plain", seed=90, shape=(5,), red="mean", eps=0.05,
                    weight=True, ignore=False, dtype=torch.float32))
    out.append(dict(name="plain-int32-labels", kind="plain", seed=94, shape=(6,), red="sum", eps=0.0,
                    weight=True, ignore=True, target_dtype=torch.int32))
    # Masked vocabulary: a -inf class, and a row whose first slice is all -inf.
    out.append(dict(name="plain-neginf", kind="plain", seed=95, shape=(6,), red="mean", eps=0.0,
                    weight=True, ignore=True, neginf=True))
    out.append(dict(name="plain-ignore255", kind="plain", seed=91, shape=(6,), red="mean", eps=0.0,
                    weight=False, ignore=True, ignore_index=255))
    # The Triton statistics kernel (interpreter here), an empty slice on 3 ranks included.
    out.append(dict(name="plain-triton", kind="plain", seed=93, shape=(4,), red="mean", eps=0.1,
                    weight=True, ignore=True, dtype=torch.float32, backend="triton"))
    out.append(dict(name="plain-1d-input", kind="plain", seed=92, shape=(), red="sum", eps=0.1,
                    weight=True, ignore=False))
    # Non-finite rows as stock (they warn): a +inf logit makes its whole row NaN, loss and gradient
    # (not +inf with finite gradients on the other ranks); a masked (-inf) slice with zero class
    # weights under smoothing is 0 * inf = NaN (not finite).
    out.append(dict(name="plain-posinf", kind="plain", seed=96, shape=(6,), red="none", eps=0.1,
                    weight=True, ignore=True, posinf=True, warns=True))
    out.append(dict(name="plain-masked-zero-weight-smoothing", kind="plain", seed=97, shape=(6,), red="none",
                    eps=0.1, weight=True, ignore=False, masked_zero_weight=True, warns=True))
    return out


ERRORS = [
    # name, what the worker does, the error class every rank must raise
    ("bad-label-one-rank", "TargetOutOfRangeError"),
    ("bad-label-every-rank", "TargetOutOfRangeError"),
    ("targets-differ", "ParallelMismatchError"),
    ("local-error-one-rank", "BatchSizeMismatchError"),
    ("softmax-strict-one-rank", "InputError"),
    ("nan-strict", "NonFiniteError"),
    ("weight-wrong-length", "WeightError"),
    ("positions-differ", "ParallelMismatchError"),
    ("probability-targets", "TargetShapeError"),
    ("weight-requires-grad", "WeightError"),
    ("int64-min-label", "TargetOutOfRangeError"),
    ("weights-differ", "ParallelMismatchError"),  # was: each rank's loss from its own weight  # -(-2**63) wraps: was silently a valid row
    ("double-backward", "BackendError"),  # was a silently non-differentiable gradient
    # One rank alone passes something wrong: every rank raises its error (class, builtin, text)
    # in the same call, never one rank raising while another waits in a collective (issue 19).
    ("sparse-weight-one-rank", "LayoutError"),  # was: raised before the first collective, a hang
    ("bad-reduction-one-rank", "ReductionError"),
    ("bad-smoothing-one-rank", "LabelSmoothingError"),
    ("ignore-index-type-one-rank", "ArgumentTypeError"),
    ("target-list-one-rank", "ArgumentTypeError"),
    ("bad-backend-one-rank", "BackendError"),
    ("integer-logits-one-rank", "InputDtypeError"),
    ("fractional-labels-one-rank", "TargetDtypeError"),  # found reading this rank's label values
    ("zero-d-target-one-rank", "TargetShapeError"),  # stock: ValueError; the agreed error is one too
    ("smoothing-differs", "ParallelMismatchError"),  # label_smoothing is one of the agreed arguments
    ("minus-one-label-one-rank", "TargetOutOfRangeError"),  # the range check, not weakened by one
    ("two-ranks-fail-differently", "ReductionError"),  # the lowest failing rank's error, everywhere
    # Labels that differ in a structured way: the old int64 checksum passed each of these.
    ("labels-equal-checksum", "ParallelMismatchError"),  # [2, 5, 2] vs [3, 3, 3]
    ("labels-reversed", "ParallelMismatchError"),  # an order-insensitive fingerprint passes it
    ("labels-two-swapped", "ParallelMismatchError"),
    ("weights-permuted", "ParallelMismatchError"),
    # Shapes judged on the global shape: every rank the same text, naming the gathered logits.
    ("narrow-squeezed-strict", "TargetShapeError"),  # was: each rank named its own slice
    ("narrow-two-column-target", "TargetShapeError"),
    ("dt-bad-label", "TargetOutOfRangeError"),
]
# The builtin every rank's error must also be (stock torch's class for the input).
BUILTINS = {"zero-d-target-one-rank": "ValueError", "local-error-one-rank": "ValueError",
            "sparse-weight-one-rank": "NotImplementedError", "bad-label-one-rank": "IndexError",
            "target-list-one-rank": "TypeError", "narrow-two-column-target": "RuntimeError"}
# Width-1 slices: a (C,) logits' (1,) target, single-class heuristics, (N, 1) and (N, 2) targets.
NARROW = {2: [1, 6], 3: [1, 1, 5]}
WARNS = ["softmax-warns", "nan-warns", "empty-mean", "neginf-smoothing"]
# Calls that must succeed, judged against stock on the gathered logits.
AGREED = ["narrow-clean-strict", "narrow-1d-logits-1-target", "softmax-negative-entries",
          "plain-triton-masked-row",
          *(f"smoothing-weight-zero-mean-{i}" for i in range(3))]
DTENSOR = [
    *(dict(name=f"dt-{red}-{api}", red=red, eps=0.0, weight=w, shape=(6,), api=api)
      for red in ("mean", "sum", "none") for w, api in ((False, "safeloss"), (True, "patch-functional"))),
    dict(name="dt-kdim", red="mean", eps=0.0, weight=False, shape=(3, 2), api="safeloss"),
    dict(name="dt-smoothing-sharded-weight", red="mean", eps=0.1, weight="shard", shape=(6,), api="patch-functional"),
    dict(name="dt-smoothing-module", red="sum", eps=0.2, weight=True, shape=(6,), api="patch-module"),
    dict(name="dt-safe-module", red="mean", eps=0.1, weight=True, shape=(6,), api="safe-module"),
    # Stock loss_parallel fails in backward here (it gathers the weight at ignore_index = -100).
    dict(name="dt-target-dtensor-weight-ignore", red="none", eps=0.0, weight=True, shape=(6,),
         api="patch-module", target="dtensor", ignore=True, stock_fails=True),
    # TP x replicas (a (1, p) mesh): stock supports "sum" there, not "mean".
    dict(name="dt-2d-mesh-sum", red="sum", eps=0.0, weight=False, shape=(6,), api="safeloss", mesh="2d"),
    dict(name="dt-2d-mesh-mean", red="mean", eps=0.0, weight=False, shape=(6,), api="safeloss", mesh="2d",
         stock_fails=True),
    dict(name="dt-target-dtensor", red="mean", eps=0.0, weight=False, shape=(6,), api="patch-module",
         target="dtensor", ignore=True),
]


def _inputs(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Full logits, labels, weight and upstream gradient of a case (the same in every process)."""
    gen = torch.Generator().manual_seed(int(case.get("seed", 0)))
    dtype = case.get("dtype", torch.float64)
    shape = case["shape"]
    if shape == ():
        x = torch.randn(C, generator=gen, dtype=dtype) * 2
        t = torch.randint(0, C, (), generator=gen)
    else:
        n, *rest = shape
        x = torch.randn(n, C, *rest, generator=gen, dtype=dtype) * 2
        t = torch.randint(0, C, (n, *rest), generator=gen)
        if case.get("ignore"):
            t.view(-1)[::3] = case.get("ignore_index", -100)
    t = t.to(case.get("target_dtype", torch.int64))
    if case.get("neginf"):  # a -inf class in every row; row 1's first slice all -inf (3 ranks)
        x[:, C - 2] = -math.inf
        x[1, :3] = -math.inf
        t[t == C - 2] = C - 1
        t[1] = C - 1
    w = torch.rand(C, generator=gen, dtype=dtype) + 0.2 if case.get("weight") else None
    if case.get("posinf"):
        x[2, C - 1] = math.inf  # on the last rank's slice
    if case.get("masked_zero_weight"):  # classes 0, 1: all of rank 0's slice on 3 ranks
        x[:, :2] = -math.inf
        t = t.clamp(min=2)
        assert w is not None
        w[:2] = 0
    g = torch.randn(t.shape, generator=gen, dtype=dtype) if case["red"] == "none" else torch.tensor(1.7, dtype=dtype)
    return x, t, w, g


def _slice(x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    off = sum(sizes[:rank])
    return x.narrow(0 if x.dim() == 1 else 1, off, sizes[rank])


# =============================================================================== the ranks


_call = record


def _plain_case(case: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    x, t, w, g = _inputs(case)
    xl = _slice(x, SLICES[world], rank).clone().requires_grad_()
    out = safeloss.vocab_parallel_cross_entropy(
        xl, t, w, ignore_index=case.get("ignore_index", -100), reduction=case["red"],
        label_smoothing=case["eps"], backend=case.get("backend", "auto"))
    (out * g).sum().backward()
    return {"out": out.detach(), "grad": xl.grad}


def _error_case(name: str, rank: int, world: int) -> Any:
    case = dict(seed=7, shape=(6,), red="mean", eps=0.0, weight=False)
    x, t, _, _ = _inputs(case)
    xl = _slice(x, SLICES[world], rank)
    kw: dict[str, Any] = {}
    last = rank == world - 1
    if name == "bad-label-one-rank":
        t = t.clone()
        if last:
            t[4] = C + 2
    elif name == "bad-label-every-rank":
        t = t.clone()
        t[1] = C
        t[3] = C
    elif name == "targets-differ":
        t = t.clone()
        if last:
            t[0] = (t[0] + 1) % C
    elif name == "local-error-one-rank":
        if last:
            t = torch.cat([t, t[:2]])
    elif name in ("softmax-strict-one-rank", "softmax-warns"):
        xl = _slice(x.softmax(1), SLICES[world], rank)
        if name == "softmax-strict-one-rank":
            kw["strict"] = True if rank == 0 else None
    elif name in ("nan-strict", "nan-warns"):
        x = x.clone()
        x[2, C - 1] = math.nan  # on the last rank's slice only
        xl = _slice(x, SLICES[world], rank)
        kw["strict"] = name == "nan-strict"
    elif name == "weight-wrong-length":
        kw["weight"] = torch.ones(C + 1, dtype=x.dtype)
    elif name == "positions-differ":
        if last:
            xl, t = xl[:5], t[:5]
    elif name == "empty-mean":
        xl, t = xl[:0], t[:0]
    elif name == "neginf-smoothing":  # every class enters the loss: +inf, as stock
        x, t, _, _ = _inputs(dict(seed=95, shape=(6,), red="mean", neginf=True))
        xl = _slice(x, SLICES[world], rank)
        kw["label_smoothing"] = 0.1
    elif name == "weight-requires-grad":
        kw["weight"] = torch.ones(C, dtype=x.dtype, requires_grad=True)
    elif name == "probability-targets":
        t = xl.detach().softmax(1)
    elif name == "weights-differ":
        kw["weight"] = torch.ones(C, dtype=x.dtype)
        if last:
            kw["weight"][0] = 2.0
    elif name == "int64-min-label":
        t = t.clone()
        t[3] = -(2**63)
    elif name == "double-backward":
        xl = xl.clone().requires_grad_()
        (g,) = torch.autograd.grad(safeloss.vocab_parallel_cross_entropy(xl, t), xl, create_graph=True)
        return {"out": g.detach()}
    elif name == "minus-one-label-one-rank":
        if last:
            t = t.clone()
            t[1] = -1
    elif name.endswith("-one-rank") and last:
        bad = {"sparse-weight-one-rank": ("weight", torch.ones(C, dtype=x.dtype).to_sparse()),
               "bad-reduction-one-rank": ("reduction", "avg"),
               "bad-smoothing-one-rank": ("label_smoothing", 1.5),
               "ignore-index-type-one-rank": ("ignore_index", "pad"),
               "bad-backend-one-rank": ("backend", "cuda")}
        if name in bad:
            kw[bad[name][0]] = bad[name][1]
        elif name == "target-list-one-rank":
            t = t.tolist()
        elif name == "integer-logits-one-rank":
            xl = xl.long()
        elif name == "fractional-labels-one-rank":
            t = t.double()
            t[2] += 0.5
        elif name == "zero-d-target-one-rank":
            t = t[0]
    elif name == "fractional-labels-one-rank":
        t = t.double()  # whole numbers on the other ranks: only the last rank's values fail
    elif name == "two-ranks-fail-differently":
        if rank == 0:
            kw["reduction"] = "avg"
        if last:
            kw["label_smoothing"] = 2.0
    elif name == "smoothing-differs":
        kw["label_smoothing"] = 0.1 if last else 0.0
    elif name in ("labels-equal-checksum", "labels-reversed", "labels-two-swapped"):
        xl, t = xl[:3], torch.tensor({"labels-equal-checksum": [2, 5, 2], "labels-reversed": [0, 1, 4],
                                      "labels-two-swapped": [1, 6, 3]}[name])
        if last:
            t = {"labels-equal-checksum": torch.tensor([3, 3, 3]), "labels-reversed": t.flip(0),
                 "labels-two-swapped": t[[1, 0, 2]]}[name]
    elif name == "weights-permuted":
        kw["weight"] = torch.arange(1, C + 1, dtype=x.dtype)
        if last:
            kw["weight"] = kw["weight"].flip(0)
    elif name.startswith("narrow-"):
        xl = _slice(x, NARROW[world], rank)
        if name == "narrow-squeezed-strict":
            t, kw["strict"] = t[:, None], True
        elif name == "narrow-two-column-target":
            t = torch.stack([t, t], 1)
    out = safeloss.vocab_parallel_cross_entropy(xl, t, **kw)
    return {"out": out.detach()}


def _agreed_case(name: str, rank: int, world: int) -> Any:
    """Calls that must work; the same inputs as ``_agreed_reference`` (a single process, stock)."""
    x, t, w, kw = _agreed_inputs(name)
    sizes = NARROW[world] if name.startswith("narrow-") else SLICES[world]
    xl = _slice(x, sizes, rank).clone().requires_grad_()
    out = safeloss.vocab_parallel_cross_entropy(xl, t, w, **kw)
    out.sum().backward()
    return {"out": out.detach(), "grad": xl.grad}


def _agreed_inputs(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    x, t, w, _ = _inputs(dict(seed=11, shape=(6,), red="mean", weight=True))
    kw: dict[str, Any] = {}
    if name == "narrow-clean-strict":  # a 1-wide slice is no single-class logits
        kw["strict"], w = True, None
    elif name == "narrow-1d-logits-1-target":  # stock accepts a (1,) target for (C,) logits
        x, t = x[0], t[:1]
    elif name == "softmax-negative-entries":
        # Rows in [-0.2, 0.6] that sum to 1: not softmaxed (negative entries, on the last slice only).
        x = (x / 8).softmax(1)
        x[:, 0] += 0.3
        x[:, C - 1] -= 0.3
    elif name == "plain-triton-masked-row":  # the Triton statistics of an all -inf slice: -inf, not NaN
        x, w = x.float(), w.float()
        x[1, :4] = -math.inf
        t[1] = C - 1
        kw.update(backend="triton")
    elif name.startswith("smoothing-weight-zero-mean-"):
        # Every label's class weight is 0: nothing to average, NaN as stock (was: inf, "overflow").
        i = int(name.rsplit("-", 1)[1])
        w = w.clone()
        w[t] = 0
        if i == 1:
            t[::2] = -100
        if i == 2:
            w[:] = 0
        kw.update(label_smoothing=(0.1, 0.5, 0.2)[i], reduction="mean")
    return x, t, w, kw


def _bytes_per_call(rank: int, world: int) -> dict[str, Any]:
    """What one call sends, for the formula the docs state."""
    from safeloss.parallel import vocab

    out: dict[str, Any] = {}
    for eps in (0.0, 0.1):
        stats: dict[str, int] = {}
        x = torch.randn(100, SLICES[world][rank])
        t = torch.randint(0, C, (100,), generator=torch.Generator().manual_seed(0))  # same everywhere
        vocab.run(x, t, None, -100, "mean", eps, group=None, strict=None,
                  backend="auto", owner=None, stats=stats)
        out[str(eps)] = stats["bytes"]
    # Every sampled logit in [0, 1] on every rank (the head says so): the sampled rows' sums
    # follow in the SUM round (otherwise no row can look softmaxed, and none are sent).
    stats = {}
    x = torch.randn(100, C).softmax(1).narrow(1, sum(SLICES[world][:rank]), SLICES[world][rank])
    t = torch.randint(0, C, (100,), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the softmaxed-input finding
        vocab.run(x, t, None, -100, "mean", 0.0, group=None, strict=None, backend="auto", owner=None, stats=stats)
    out["softmaxed"] = stats["bytes"]
    # The last rank's label values fail a check (a fraction): it idles through the loss's two
    # all-reduces (_idle_rounds) with contributions of the clean call's sizes, and raises after.
    for eps, with_stats in ((0.0, False), (0.1, False), (0.0, True), (0.1, True)):
        stats = {}
        x = torch.randn(100, SLICES[world][rank])
        t = torch.randint(0, C, (100,), generator=torch.Generator().manual_seed(0)).double()
        if rank == world - 1:
            t[7] += 0.5
        try:
            vocab.run(x, t, None, -100, "mean", eps, group=None, strict=None, backend="auto", owner=None,
                      stats=stats, extras=(None, 1.0, 0.0, True) if with_stats else None)
            raised = None
        except safeloss.SafeLossError as e:
            raised = type(e).__name__
        out[f"idle-{eps}-{with_stats}"] = (stats.get("bytes"), raised)
    return out


def _host_reads(rank: int, world: int) -> dict[str, list[str]]:
    """The tensor reads on the host of one clean call (on CUDA each is a sync): the documented
    head, and one read of the counts (was three more: two counts and the mean's value)."""
    from torch.overrides import TorchFunctionMode

    class Reads(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            name = getattr(func, "__name__", "")
            if name in ("item", "tolist", "__int__", "__bool__", "__float__", "__index__"):
                self.seen.append(name)
            return func(*args, **(kwargs or {}))

    x, t, w, _ = _inputs(dict(seed=9, shape=(6,), red="mean", weight=True, ignore=True))
    out = {}
    for red, eps in (("mean", 0.0), ("none", 0.1)):
        xl = _slice(x, SLICES[world], rank).clone().requires_grad_()
        with Reads() as reads:
            safeloss.vocab_parallel_cross_entropy(xl, t, w, reduction=red, label_smoothing=eps)
        out[red] = reads.seen
    return out


def _planned_on_some_ranks(rank: int, world: int) -> dict[str, Any]:
    """Plans are per process (core.plan): the last rank forgets its plans before every call, the
    others take theirs. A planned and an unplanned rank make the same collectives and reach the
    same verdicts: values, errors (bad label, labels or weights that differ), warnings (negative
    weight entries read per call) and strictness set on one rank only."""
    from safeloss.core import plan as plans

    x, t, w, _ = _inputs(dict(seed=13, shape=(6,), red="mean", weight=True))
    last = rank == world - 1

    def call(xx: torch.Tensor, tt: torch.Tensor, ww: torch.Tensor, **kw: Any) -> torch.Tensor:
        if last:
            plans.clear()
        return safeloss.vocab_parallel_cross_entropy(_slice(xx, SLICES[world], rank), tt, ww, **kw).detach()

    bad, other, w_other, neg = t.clone(), t.clone(), w.clone(), w.clone()  # type: ignore[union-attr]
    if last:
        bad[4] = C + 3
        other[1] = (other[1] + 1) % C
        w_other[2] += 0.5
    neg[3] = -1.0  # every rank
    out = {"warm": record(lambda: call(x, t, w))}  # plans made (kept on every rank but the last)
    out["clean"] = record(lambda: call(x, t, w))
    out["bad-label"] = record(lambda: call(x, bad, w))
    out["labels-differ"] = record(lambda: call(x, other, w))
    out["weights-differ"] = record(lambda: call(x, t, w_other))
    out["negative-weight"] = record(lambda: call(x, t, neg))
    out["strict-softmaxed"] = record(lambda: call(x.softmax(1), t, w, strict=True if last else None))
    # An argument that differs on one rank: the planned ranks judge the mismatch as the others.
    out["smoothing-differs"] = record(lambda: call(x, t, w, label_smoothing=0.1 if last else 0.0))
    out["target-shape-differs"] = record(lambda: call(x, t[:5] if last else t, w))
    out["after"] = record(lambda: call(x, t, w))
    return out


def _compiled(rank: int, world: int) -> dict[str, Any]:
    """Under torch.compile the function runs eagerly: inductor's graph of it gave wrong losses."""
    x, t, _, g = _inputs(dict(seed=8, shape=(6,), red="none"))
    xl = _slice(x, SLICES[world], rank).clone().requires_grad_()
    traced: list[str] = []

    def backend(gm: torch.fx.GraphModule, _: Any) -> Any:
        traced.extend(str(n.target) for n in gm.graph.nodes)
        return gm

    fn = torch.compile(lambda a, b: safeloss.vocab_parallel_cross_entropy(a, b, reduction="none") * 2,
                       backend=backend)
    out = fn(xl, t)
    (out * g).sum().backward()
    return {"out": out.detach(), "grad": xl.grad, "collectives_traced": [n for n in traced if "c10d" in n]}


def _mixed_softmax_inputs(world: int, softmaxed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows a rank; the first ``softmaxed`` rows softmaxed (the others raw logits, with
    negative entries)."""
    x, t, _, _ = _inputs(dict(seed=13, shape=(2 * world,), red="mean"))
    x[:softmaxed] = x[:softmaxed].softmax(1)
    return x, t


def _dt_rows_softmax(mesh: Any, world: int, softmaxed: int) -> Any:
    """Rows sharded over the mesh, the classes whole on each rank (no loss_parallel())."""
    from torch.distributed.tensor import Shard, distribute_tensor

    x, t = _mixed_softmax_inputs(world, softmaxed)
    out = safeloss.cross_entropy(distribute_tensor(x, mesh, [Shard(0)]), distribute_tensor(t, mesh, [Shard(0)]))
    return out.full_tensor()


def _rows_stats_inputs(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows a rank: the label is the argmax in the first shard's rows only (accuracy 1 there,
    0 on every other shard, 1 / world over all)."""
    x, _, _, _ = _inputs(dict(seed=14, shape=(2 * world,), red="mean"))
    t = x.argmax(1)
    t[2:] = (t[2:] + 1) % C
    return x, t


def _dt_rows_stats(mesh: Any, world: int) -> Any:
    """Rows sharded over the mesh (the classes whole on each rank), with return_stats."""
    from torch.distributed.tensor import Shard, distribute_tensor

    x, t = _rows_stats_inputs(world)
    out, st = safeloss.cross_entropy(distribute_tensor(x, mesh, [Shard(0)]), distribute_tensor(t, mesh, [Shard(0)]),
                                     reduction="none", return_stats=True)
    return tuple(v.full_tensor() for v in (out, st.lse, st.entropy, st.accuracy))


def _dt_whole_classes(mesh: Any, placement: str) -> Any:
    """Logits whose classes are not split, on a 1-D mesh: replicated, or Partial (each rank holds
    a share; their sum is the logits); the mean loss and the gradient of the logits."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    x, t, _, _ = _inputs(dict(seed=15, shape=(6,), red="mean"))
    share = 0.25 if mesh.get_coordinate()[0] == 0 else 0.75 / (mesh.size() - 1)
    leaf = (x * share if placement == "partial" else x).clone().requires_grad_()
    dx = DTensor.from_local(leaf, mesh, [Partial() if placement == "partial" else Replicate()], run_check=False,
                            shape=x.shape, stride=x.stride())
    out = safeloss.cross_entropy(dx, t)
    out.backward()
    return {"out": out.full_tensor().detach(), "placements": [repr(p) for p in out.placements], "grad": leaf.grad}


def _dt_plain_target_rows_sharded(mesh: Any) -> Any:
    """A plain tensor target for row-sharded logits: refused on every rank (ambiguous)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    x, t, _, _ = _inputs(dict(seed=16, shape=(6,), red="mean"))
    return safeloss.cross_entropy(distribute_tensor(x, mesh, [Shard(0)]), t).full_tensor()


def _dtensor_case(case: dict[str, Any], mesh: Any, world: int) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    x, t, w, g = _inputs(case)
    placements: list[Any] = [Shard(1)]
    if case.get("mesh") == "2d":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
        placements = [Replicate(), Shard(1)]
    dx = distribute_tensor(x, mesh, placements).requires_grad_()
    dg = distribute_tensor(g, mesh, [Replicate()] * mesh.ndim)
    kw = dict(reduction=case["red"], label_smoothing=case["eps"])
    weight: Any = w
    if case["weight"] == "shard":
        weight = distribute_tensor(w, mesh, [Shard(0)])
    if case.get("target") == "dtensor":
        t = distribute_tensor(t, mesh, [Replicate()])
    res: dict[str, Any] = {}
    with loss_parallel():
        if case["api"] == "safeloss":
            from torch.distributed.tensor.debug import CommDebugMode

            with CommDebugMode() as comm:  # as torch's own loss_parallel test counts them
                out = safeloss.cross_entropy(dx, t, weight, **kw)
            res["all_reduces"] = comm.get_comm_counts().get(funcol_ops().all_reduce, -1)
            res["comms"] = comm.get_total_counts()
        elif case["api"] == "patch-functional":
            with safeloss.patch():
                out = F.cross_entropy(dx, t, weight, **kw)
        elif case["api"] == "patch-module":
            with safeloss.patch():
                out = torch.nn.CrossEntropyLoss(weight, **kw)(dx, t)
        else:
            out = safeloss.SafeCrossEntropyLoss(weight, **kw)(dx, t)
        from torch.distributed.tensor.debug import CommDebugMode

        with CommDebugMode() as comm:
            (out * dg).sum().backward()
        res["backward_comms"] = comm.get_total_counts()
        res["type"] = type(out).__name__
        res["out"] = out.to_local().detach()
        res["grad"] = dx.grad.full_tensor()
        res["grad_placements"] = str(dx.grad.placements[-1])
        # Stock loss_parallel on the same call, where it works.
        dx2 = distribute_tensor(x, mesh, placements).requires_grad_()
        try:
            ref = F.cross_entropy(dx2, t, weight, **kw)
            (ref * dg).sum().backward()
            res["stock"] = (ref.to_local().detach(), dx2.grad.full_tensor())
        except Exception as e:
            res["stock"] = f"{type(e).__name__}: {e}"
    return res


def funcol_ops() -> Any:
    return torch.ops.c10d_functional  # the key CommDebugMode counts under (torch's test uses it)


def _dt_bad_label(mesh: Any) -> Any:
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    x, t, _, _ = _inputs(dict(seed=3, shape=(6,), red="mean"))
    t = t.clone()
    t[2] = C + 5
    dx = distribute_tensor(x, mesh, [Shard(1)])
    with loss_parallel(), safeloss.patch():
        return F.cross_entropy(dx, t).to_local()


def _dt_outside(mesh: Any) -> Any:
    """Outside loss_parallel() a DTensor runs the single-device pipeline through DTensor's ops
    (as before the vocab-parallel path existed): a bad label still raises."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    x, t, _, _ = _inputs(dict(seed=4, shape=(6,), red="mean"))
    dx = distribute_tensor(x, mesh, [Shard(1)])
    dt = distribute_tensor(t, mesh, [Replicate()])
    value = safeloss.cross_entropy(dx, dt).full_tensor()
    bad = t.clone()
    bad[3] = C
    try:
        safeloss.cross_entropy(dx, distribute_tensor(bad, mesh, [Replicate()]))
        raised = None
    except Exception as e:
        raised = type(e).__name__
    return value, raised


def _dt_compiled(mesh: Any, api: str) -> Any:
    """torch.compile of a loss on class-sharded DTensor logits under loss_parallel() (issue 16):
    safeloss.cross_entropy compiles where stock does (was: "masked_fill got mixed torch.Tensor and
    DTensor"), and a compiled stock call under patch() is checked (was: stock's, unchecked)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    x, t, _, g = _inputs(dict(seed=12, shape=(6,), red="none"))
    if api == "patched-bad-label":
        t = t.clone()
        t[4] = C
    dx = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
    torch._dynamo.reset()
    with loss_parallel(), (safeloss.patch() if api.startswith("patched") else _nullcontext()):
        ce = safeloss.cross_entropy if api == "safeloss" else F.cross_entropy
        fn = torch.compile(lambda a, b: ce(a, b, reduction="none") * 2, backend="eager")
        out = fn(dx, t)
        (out.full_tensor() * g).sum().backward()
    return {"out": out.full_tensor().detach(), "grad": dx.grad.full_tensor()}


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def _stock_bad_label(mesh: Any) -> Any:
    """What stock loss_parallel does with a label >= C (documented: it returns a number)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    x, t, _, _ = _inputs(dict(seed=3, shape=(6,), red="mean"))
    t = t.clone()
    t[2] = C + 5
    with loss_parallel():
        return F.cross_entropy(distribute_tensor(x, mesh, [Shard(1)]), t).to_local()


DT_DIRECT = [("input", "shard1"), ("input", "replicate"), ("input", "shard0"), ("target", "replicate"),
             ("weight", "replicate")]


def _dt_direct_api(mesh: Any, which: str, placement: str) -> Any:
    """``vocab_parallel_cross_entropy`` (the plain-slice API) given a DTensor: one clear error on
    every rank (was DTensor's "got mixed torch.Tensor and DTensor" RuntimeError, deep inside)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    x, t, _, _ = _inputs(dict(seed=5, shape=(6,), red="mean"))
    place = {"shard1": Shard(1), "replicate": Replicate(), "shard0": Shard(0)}[placement]
    args: dict[str, Any] = {"input": x, "target": t, "weight": torch.ones(C)}
    args[which] = distribute_tensor(args[which], mesh, [place])
    return safeloss.vocab_parallel_cross_entropy(args["input"], args["target"], args["weight"])


def _dt_direct_fix(mesh: Any) -> Any:
    """The error's fix: the DTensor's local slice and the mesh's group (stock's loss)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    x, t, _, _ = _inputs(dict(seed=5, shape=(6,), red="mean"))
    dx = distribute_tensor(x, mesh, [Shard(1)])
    return safeloss.vocab_parallel_cross_entropy(dx.to_local(), t, group=mesh.get_group())


def _worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    results: dict[str, Any] = {}
    try:
        for case in _grid():
            results[case["name"]] = _call(lambda case=case: _plain_case(case, rank, world))
        for name, _ in ERRORS[:-1]:
            results[name] = _call(lambda name=name: _error_case(name, rank, world))
        for name in WARNS:
            results[name] = _call(lambda name=name: _error_case(name, rank, world))
        for name in AGREED:
            results[name] = _call(lambda name=name: _agreed_case(name, rank, world))
        results["bytes"] = _call(lambda: _bytes_per_call(rank, world))
        results["compiled"] = _call(lambda: _compiled(rank, world))
        results["host-reads"] = _call(lambda: _host_reads(rank, world))
        results["planned"] = _call(lambda: _planned_on_some_ranks(rank, world))
        mesh = init_device_mesh("cpu", (world,))
        for case in DTENSOR:
            results[case["name"]] = _call(lambda case=case: _dtensor_case(case, mesh, world))
        results["dt-bad-label"] = _call(lambda: _dt_bad_label(mesh))
        results["dt-outside-loss-parallel"] = _call(lambda: _dt_outside(mesh))
        results["stock-bad-label"] = _call(lambda: _stock_bad_label(mesh))
        for softmaxed in (2, 2 * world):  # the first shard's rows only; every row
            results[f"dt-rows-softmax-{softmaxed}"] = _call(lambda s=softmaxed: _dt_rows_softmax(mesh, world, s))
        results["dt-rows-stats"] = _call(lambda: _dt_rows_stats(mesh, world))
        for placement in ("replicate", "partial"):
            results[f"dt-whole-{placement}"] = _call(lambda p=placement: _dt_whole_classes(mesh, p))
        results["dt-plain-target-rows-sharded"] = _call(lambda: _dt_plain_target_rows_sharded(mesh))
        for which, placement in DT_DIRECT:
            results[f"dt-direct-{which}-{placement}"] = _call(
                lambda w=which, p=placement: _dt_direct_api(mesh, w, p))
        results["dt-direct-fix"] = _call(lambda: _dt_direct_fix(mesh))
        for api in ("safeloss", "patched", "patched-bad-label") if world == 2 else ():  # compiling costs
            results[f"dt-compiled-{api}"] = _call(lambda api=api: _dt_compiled(mesh, api))
        dist.barrier()  # nobody tears gloo down while another rank is still in a collective
    finally:
        torch.save(results, f"{out}.{rank}")
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}ranks")
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[dict]]:
    world = request.param
    return world, spawn(_worker, world, tmp_path_factory.mktemp(f"tp{world}"), DEADLINE_S, "vocab-parallel workers")


# =============================================================================== judged here


def _reference(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    x, t, w, g = _inputs(case)
    x = x.clone().requires_grad_()
    ref = F.cross_entropy(x, t.long(), w, ignore_index=case.get("ignore_index", -100), reduction=case["red"],
                          label_smoothing=case["eps"])
    (ref * g).sum().backward()
    return ref.detach(), x.grad


def test_plain_shards_match_stock_on_gathered_logits(ranks: tuple[int, list[dict]]) -> None:
    world, res = ranks
    for case in _grid():
        ref, grad = _reference(case)
        for rank in range(world):
            got = res[rank][case["name"]]
            assert "ok" in got, f"{case['name']} rank {rank}: {got}"
            assert bool(got["warnings"]) == bool(case.get("warns")), got["warnings"]
            assert_matches(got["ok"]["out"], ref, what=f"{case['name']} loss, rank {rank}")
            assert_matches(got["ok"]["grad"], _slice(grad, SLICES[world], rank),
                           what=f"{case['name']} grad, rank {rank}")


@pytest.mark.parametrize("name,cls", ERRORS)
def test_errors_agree_across_ranks(ranks: tuple[int, list[dict]], name: str, cls: str) -> None:
    world, res = ranks
    got = [r[name] for r in res]
    for g in got:
        assert g.get("error") == cls and g["safeloss"], g
    assert len({g["message"] for g in got}) == 1, "ranks raised different messages"
    msg = got[0]["message"]
    if name == "bad-label-one-rank":
        assert f"{C + 2} at [4]" in msg and "outside the class range 0..6" in msg
        assert f"found in the labels of rank {world - 1} of {world}" in msg
    elif name == "bad-label-every-rank":
        assert "7 at [1] and [3]" in msg and "differ" not in msg
    elif name == "local-error-one-rank":
        assert f"raised on rank {world - 1} of the {world} ranks" in msg
    elif name == "dt-bad-label":
        assert f"{C + 5} at [2]" in msg
    elif name == "int64-min-label":
        assert f"{-(2**63)} at [3]" in msg
    elif name == "weights-differ":
        assert "different class weights" in msg
    elif name == "double-backward":
        assert "no double backward" in msg and "create_graph=True" in msg
    elif name == "minus-one-label-one-rank":
        assert "-1 at [1]" in msg and f"found in the labels of rank {world - 1} of {world}" in msg, msg
    elif name == "two-ranks-fail-differently":
        assert f"raised on rank 0 of the {world} ranks" in msg, msg
    elif name.endswith("-one-rank") and name != "softmax-strict-one-rank":
        assert f"raised on rank {world - 1} of the {world} ranks" in msg, msg
    elif name.startswith(("labels-", "smoothing-differs", "weights-permuted")):
        want = {"smoothing-differs": "label_smoothing", "weights-permuted": "different class weights"}
        assert want.get(name, "the labels differ between ranks") in msg, msg
    elif name == "narrow-squeezed-strict":  # the global logits, not a slice
        assert "targets of shape (6, 1) for logits (6, 7)" in msg, msg
    elif name == "narrow-two-column-target":
        assert "with 2 columns where the model has 7 classes" in msg and "(6, 7)" in msg, msg
    if name in BUILTINS:
        for g in got:
            assert BUILTINS[name] in g["builtins"], (name, g["builtins"])


def _agreed_reference(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, t, w, kw = _agreed_inputs(name)
    kw = {k: v for k, v in kw.items() if k not in ("strict", "backend")}
    value = F.cross_entropy(x, t, w, **kw)  # stock's forward accepts a (1,) target for (C,) logits ...
    x = x.clone().requires_grad_()
    ref = F.cross_entropy(x, t.reshape(()) if name == "narrow-1d-logits-1-target" else t, w, **kw)
    ref.sum().backward()  # ... its backward does not ("size mismatch"): the 0-d target's gradient
    return value, x.grad


@pytest.mark.parametrize("name", AGREED)
def test_calls_that_must_work_match_stock(ranks: tuple[int, list[dict]], name: str) -> None:
    """Each as stock on the gathered logits, on every rank, with no warning except the true one."""
    world, res = ranks
    ref, grad = _agreed_reference(name)
    sizes = NARROW[world] if name.startswith("narrow-") else SLICES[world]
    for rank in range(world):
        got = res[rank][name]
        assert "ok" in got, f"{name} rank {rank}: {got}"
        assert_matches(got["ok"]["out"], ref, what=f"{name} loss, rank {rank}")
        if name.startswith("smoothing-weight-zero-mean"):
            # NaN as stock, and why: nothing to average (was inf, "overflowed float32").
            assert math.isnan(float(got["ok"]["out"])) and math.isnan(float(ref))
            assert len(got["warnings"]) == 1 and "nothing to average" in got["warnings"][0], got["warnings"]
            continue
        assert got["warnings"] == [], got["warnings"]
        assert_matches(got["ok"]["grad"], _slice(grad, sizes, rank), what=f"{name} grad, rank {rank}")


def test_two_host_reads_per_call(ranks: tuple[int, list[dict]]) -> None:
    """Two reads of results per call; validation reads a CPU weight's negative entries too (free
    on the CPU; on CUDA once per version of the weight, as for the single-device loss)."""
    _, res = ranks
    for r in res:
        assert r["host-reads"]["ok"] == {"mean": ["tolist", "__bool__", "tolist"],
                                         "none": ["tolist", "__bool__", "tolist"]}


def test_a_planned_and_an_unplanned_rank_agree(ranks: tuple[int, list[dict]]) -> None:
    """Class: plans never make ranks take different paths (_planned_on_some_ranks)."""
    _, res = ranks
    x, t, w, _ = _inputs(dict(seed=13, shape=(6,), red="mean", weight=True))
    want = F.cross_entropy(x, t, w)
    expect = {"bad-label": ("TargetOutOfRangeError", f"{C + 3} at [4]"),
              "labels-differ": ("ParallelMismatchError", "the labels differ between ranks"),
              "weights-differ": ("ParallelMismatchError", "the ranks pass different class weights"),
              "strict-softmaxed": ("InputError", "looks already softmaxed"),
              "smoothing-differs": ("ParallelMismatchError", "label_smoothing: 0.0 on rank"),
              "target-shape-differs": ("BatchSizeMismatchError", "got 6 predictions but 5 targets")}
    runs = [r["planned"]["ok"] for r in res]
    for case in runs[0]:
        got = [run[case] for run in runs]
        for g in got[1:]:
            assert (g.get("error"), g.get("message"), g["warnings"]) == (
                got[0].get("error"), got[0].get("message"), got[0]["warnings"]), (case, got)
        if case in expect:
            cls, text = expect[case]
            assert got[0].get("error") == cls and text in got[0]["message"], (case, got[0])
        else:
            assert "ok" in got[0], (case, got[0])
            if case != "negative-weight":
                assert_matches(got[0]["ok"], want.detach(), what=case)
                assert got[0]["warnings"] == [], (case, got[0])
    assert any("negative entr" in m for m in runs[0]["negative-weight"]["warnings"]), runs[0]["negative-weight"]


def test_compiled_call_runs_eagerly(ranks: tuple[int, list[dict]]) -> None:
    world, res = ranks
    x, t, _, g = _inputs(dict(seed=8, shape=(6,), red="none"))
    x = x.clone().requires_grad_()
    ref = F.cross_entropy(x, t, reduction="none") * 2
    (ref * g).sum().backward()
    for rank, r in enumerate(res):
        got = r["compiled"]["ok"]
        assert got["collectives_traced"] == [], got["collectives_traced"]
        assert_matches(got["out"], ref.detach(), what=f"compiled loss, rank {rank}")
        assert_matches(got["grad"], _slice(x.grad, SLICES[world], rank), what=f"compiled grad, rank {rank}")


def test_compiled_dtensor_loss_is_checked(ranks: tuple[int, list[dict]]) -> None:
    """Compiled safeloss and compiled patched stock on class-sharded DTensors: stock's numbers,
    and a bad label raises on every rank (the call runs eagerly, a graph break)."""
    world, res = ranks
    if world != 2:
        pytest.skip("compiled on 2 ranks only (compiling costs seconds per rank)")
    x, t, _, g = _inputs(dict(seed=12, shape=(6,), red="none"))
    x = x.clone().requires_grad_()
    ref = F.cross_entropy(x, t, reduction="none") * 2
    (ref * g).sum().backward()
    for rank, r in enumerate(res):
        for api in ("safeloss", "patched"):
            got = r[f"dt-compiled-{api}"]
            assert "ok" in got, (api, got)
            assert_matches(got["ok"]["out"], ref.detach(), what=f"compiled {api}, rank {rank}")
            assert_matches(got["ok"]["grad"], x.grad, what=f"compiled {api} grad, rank {rank}")
        bad = r["dt-compiled-patched-bad-label"]
        assert bad.get("error") == "TargetOutOfRangeError" and f"{C} at [4]" in bad["message"], bad
    assert len({r["dt-compiled-patched-bad-label"]["message"] for r in res}) == 1


def test_bytes_per_call_as_documented(ranks: tuple[int, list[dict]]) -> None:
    """docs/migration.md: (16 + p) int64, N + 16 floats (MAX), 2N (3N smoothing) (SUM), plus the
    64 sampled rows' sums where every sampled logit lies in [0, 1]."""
    world, res = ranks
    n = 100
    for r in res:
        got = r["bytes"]["ok"]
        assert got["0.0"] == 8 * (16 + world) + 4 * (n + 16) + 4 * (2 * n)
        assert got["0.1"] == 8 * (16 + world) + 4 * (n + 16) + 4 * (3 * n)
        assert got["softmaxed"] == 8 * (16 + world) + 4 * (n + 16) + 4 * (2 * n + 64)


def test_bytes_per_call_are_the_same_where_one_rank_idles(ranks: tuple[int, list[dict]]) -> None:
    """Class: the idle rounds' sizes and their bytes accounting (_idle_rounds). A rank whose label
    values fail a check still enters the loss's two all-reduces, with contributions of the clean
    call's sizes (smoothing and statistics included), and counts what it sent: every rank sends,
    and reports, the documented bytes of a clean call, the idle one included."""
    world, res = ranks
    n = 100
    for rank, r in enumerate(res):
        got = r["bytes"]["ok"]
        for eps in (0.0, 0.1):
            for st in (False, True):
                extra = 2 * n if st else 0  # statistics: the key and NaN flag (MAX), entropy and argmax (SUM)
                want = 8 * (16 + world) + 4 * (n + 16 + extra) + 4 * ((3 if eps else 2) * n + extra)
                assert got[f"idle-{eps}-{st}"] == (want, "TargetDtypeError"), (rank, eps, st, got)


def test_row_sharded_dtensor_check_counts_add_up_over_the_shards(ranks: tuple[int, list[dict]]) -> None:
    """Class: counts over mesh dims that shard the positions (_reduce_outer sums them). Rows
    sharded over the mesh with only the first shard's rows softmaxed: the sampled rows that look
    softmaxed are not all the sampled rows, so nothing is reported, as on the gathered logits (a
    maximum over the shards would read the first shard's "2 of 2"); every row softmaxed warns."""
    world, res = ranks
    for softmaxed, warns in ((2, False), (2 * world, True)):
        x, t = _mixed_softmax_inputs(world, softmaxed)
        safeloss.reset_warnings()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            ref = safeloss.cross_entropy(x, t)
        want = [str(w.message) for w in rec if issubclass(w.category, safeloss.SafeLossWarning)]
        assert bool(want) == warns and all("softmaxed" in w for w in want), want
        for rank, r in enumerate(res):
            got = r[f"dt-rows-softmax-{softmaxed}"]
            assert "ok" in got, (rank, got)
            assert got["warnings"] == want, (rank, softmaxed, got["warnings"])
            torch.testing.assert_close(got["ok"], ref, rtol=1e-12, atol=1e-12)


def test_row_sharded_dtensor_statistics_are_global(ranks: tuple[int, list[dict]]) -> None:
    """Class: statistics over mesh dims that shard the positions. Rows sharded over the mesh with
    return_stats: the accuracy is the global one on every rank (the hits and the counted
    positions summed over the shards), not each shard's own (1 on the first shard, 0 elsewhere),
    and the per-position statistics are the single-device ones."""
    world, res = ranks
    x, t = _rows_stats_inputs(world)
    loss, st = safeloss.cross_entropy(x, t, reduction="none", return_stats=True)
    want = (loss, st.lse, st.entropy, st.accuracy)
    assert st.accuracy.item() == pytest.approx(1 / world)
    for rank, r in enumerate(res):
        got = r["dt-rows-stats"]
        assert "ok" in got, (rank, got)
        for a, b, what in zip(got["ok"], want, ("loss", "lse", "entropy", "accuracy"), strict=True):
            torch.testing.assert_close(a, b, msg=lambda m, what=what, rank=rank: f"{what}, rank {rank}: {m}")


@pytest.mark.parametrize("placement", ["replicate", "partial"])
def test_dtensor_whole_classes_count_each_position_once(ranks: tuple[int, list[dict]], placement: str) -> None:
    """Class: DTensor layouts whose other mesh dims must replicate the positions (never sum them).
    Logits replicated over the mesh, or Partial (summed first, as DTensor's own ops would): stock's
    mean on the whole logits, replicated; a mesh dim that replicates the positions is reduced with a
    maximum (replicas count once), and a Partial one is no per-shard loss (a rank's share of the
    logits is not its logits). The gradient of a Partial leaf is the whole gradient on every rank."""
    _, res = ranks
    x, t, _, _ = _inputs(dict(seed=15, shape=(6,), red="mean"))
    x = x.clone().requires_grad_()
    ref = F.cross_entropy(x, t)
    ref.backward()
    for rank, r in enumerate(res):
        got = r[f"dt-whole-{placement}"]
        assert "ok" in got, (rank, got)
        assert got["ok"]["placements"] == ["Replicate()"], got["ok"]["placements"]
        assert_matches(got["ok"]["out"], ref.detach(), what=f"{placement} loss, rank {rank}")
        assert_matches(got["ok"]["grad"], x.grad, what=f"{placement} grad, rank {rank}")
        assert got["warnings"] == [], got["warnings"]


def test_dtensor_plain_target_for_sharded_rows_is_a_value_error(ranks: tuple[int, list[dict]]) -> None:
    """Class: an agreed error keeps its stock builtin class. A plain tensor target for row-sharded
    DTensor logits: every rank raises the same TargetShapeError, which is also a ValueError (stock
    raises a ValueError for a target of the wrong shape)."""
    _, res = ranks
    got = [r["dt-plain-target-rows-sharded"] for r in res]
    for g in got:
        assert g.get("error") == "TargetShapeError" and g["safeloss"], g
        assert "ValueError" in g["builtins"], g["builtins"]
        assert "plain tensor target" in g["message"], g["message"]
    assert len({g["message"] for g in got}) == 1


def test_stock_loss_parallel_accepts_a_bad_label(ranks: tuple[int, list[dict]]) -> None:
    """The motivation, kept honest: stock returns a number where safeloss raises."""
    _, res = ranks
    assert "ok" in res[0]["stock-bad-label"] and math.isfinite(float(res[0]["stock-bad-label"]["ok"]))


@pytest.mark.parametrize("which,placement", DT_DIRECT)
def test_dtensor_given_to_the_slice_api_is_one_clear_error(
    ranks: tuple[int, list[dict]], which: str, placement: str,
) -> None:
    _, res = ranks
    got = [r[f"dt-direct-{which}-{placement}"] for r in res]
    for g in got:
        assert g.get("error") == "ArgumentTypeError" and g["safeloss"] and "TypeError" in g["builtins"], g
    assert len({g["message"] for g in got}) == 1, "ranks raised different messages"
    msg = got[0]["message"]
    shape = "(6, 7)" if which == "input" else "(6,)" if which == "target" else "(7,)"
    assert f"got a DTensor as {which} (global shape {shape}, placements (" in msg, msg
    assert "safeloss.cross_entropy, of any placement" in msg and "logits.to_local()" in msg, msg
    # the fix it names gives stock's loss of the gathered logits
    x, t, _, _ = _inputs(dict(seed=5, shape=(6,), red="mean"))
    for r in res:
        assert "ok" in r["dt-direct-fix"], r["dt-direct-fix"]
        assert_matches(r["dt-direct-fix"]["ok"], F.cross_entropy(x, t), what="to_local() slices")


def test_dtensor_outside_loss_parallel_keeps_the_single_device_path(ranks: tuple[int, list[dict]]) -> None:
    _, res = ranks
    for r in res:
        value, raised = r["dt-outside-loss-parallel"]["ok"]
        x, t, _, _ = _inputs(dict(seed=4, shape=(6,), red="mean"))
        torch.testing.assert_close(value, F.cross_entropy(x, t))
        assert raised == "TargetOutOfRangeError"


def test_warnings_agree_across_ranks(ranks: tuple[int, list[dict]]) -> None:
    world, res = ranks
    for name, needle in [("softmax-warns", "looks already softmaxed"), ("nan-warns", "NaN or infinite"),
                         ("empty-mean", "empty batch"), ("neginf-smoothing", "NaN or infinite")]:
        got = [r[name] for r in res]
        for g in got:
            assert "ok" in g, g
            assert any(needle in w for w in g["warnings"]), (name, g["warnings"])
        assert len({tuple(g["warnings"]) for g in got}) == 1
    assert math.isnan(float(res[0]["nan-warns"]["ok"]["out"]))
    assert math.isnan(float(res[0]["empty-mean"]["ok"]["out"]))
    x, t, _, _ = _inputs(dict(seed=95, shape=(6,), red="mean", neginf=True))
    assert F.cross_entropy(x, t, label_smoothing=0.1).item() == math.inf
    assert float(res[0]["neginf-smoothing"]["ok"]["out"]) == math.inf
    # softmaxed input: the value is still stock's
    x, t, _, _ = _inputs(dict(seed=7, shape=(6,), red="mean"))
    torch.testing.assert_close(res[world - 1]["softmax-warns"]["ok"]["out"], F.cross_entropy(x.softmax(1), t))


def test_dtensor_matches_stock_and_gathered(ranks: tuple[int, list[dict]]) -> None:
    world, res = ranks
    for case in DTENSOR:
        ref, grad = _reference(case)
        for rank in range(world):
            got = res[rank][case["name"]]
            assert "ok" in got, f"{case['name']} rank {rank}: {got}"
            r = got["ok"]
            assert r["type"] == "DTensor" and r["grad_placements"] == "S(1)"
            # Like stock: three all-reduces forward (the logits never move), nothing in backward.
            assert r["backward_comms"] == 0
            if "comms" in r:
                assert r["comms"] == r["all_reduces"] == 3, (r["comms"], r["all_reduces"])
            assert_matches(r["out"], ref, what=f"{case['name']} loss")
            assert_matches(r["grad"], grad, what=f"{case['name']} grad")
            if case["eps"] or case["weight"] == "shard" or case.get("stock_fails"):
                assert isinstance(r["stock"], str), "stock loss_parallel was expected to fail here"
            else:  # equal to stock loss_parallel itself where it works
                torch.testing.assert_close(r["out"], r["stock"][0], rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(r["grad"], r["stock"][1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows,cols", [(5, 3), (3, 40), (2, 300)])
def test_triton_shard_stats_match_torch(rows: int, cols: int) -> None:
    """The kernel's per-slice log-sum-exp and smoothing sum, -inf rows and strided input included."""
    from safeloss.parallel import triton_stats

    gen = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(cols, rows, generator=gen).t() * 3  # column-major: strides (1, rows)
    x[0, 1] = -math.inf
    w = torch.rand(cols, generator=gen)
    lse, q, _ = triton_stats.shard_stats(x, w, True)
    want = torch.logsumexp(x, 1)
    torch.testing.assert_close(lse, want)
    torch.testing.assert_close(q, (w * (want[:, None] - x)).sum(1))
    lse2, q2, _ = triton_stats.shard_stats(x, None, False)
    assert q2 is None
    torch.testing.assert_close(lse2, want)


def _slice_plan(backend: str, ex: Any, w: torch.Tensor | None, eps: float) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(backend=backend, ex=ex, w_local=w, eps=eps, acc=torch.float32)


@pytest.mark.parametrize("cols", [3, 40, 5000])  # several rows a program; one; several column blocks
@pytest.mark.parametrize("extras", [dict(return_stats=True), dict(softcap=2.0, temperature=0.7, return_stats=True),
                                    dict(temperature=1.5)])
def test_slice_statistics_agree_across_backends_and_with_the_formulas(cols: int, extras: dict) -> None:
    """The per-row slice quantities the vocab-parallel forward combines, from the Triton kernel
    (extras and statistics in its one pass) and from torch: L and Q of the capped, scaled logits,
    A = sum softmax(zt)(zt - L), and torch.argmax's (key, code) of the raw logits, with NaN,
    +-inf, all -inf rows, ties across column blocks and strided input."""
    from safeloss.core import extras as X
    from safeloss.parallel import vocab

    gen = torch.Generator().manual_seed(cols)
    x = (torch.randn(cols, 9, generator=gen) * 3).t()  # strides (1, 9)
    x[1] = -math.inf
    x[2, cols // 2] = math.nan
    x[3, 0] = math.inf
    x[4, -1] = x[4, 0] = math.inf  # a tie: the lowest column
    x[5, cols - 1] = math.nan
    x[5, 0] = math.inf  # a NaN after +inf still wins
    x[6, : max(1, cols - 2)] = -math.inf
    x[7, -1] = x[7, cols // 3] = 9.0
    w = torch.rand(cols, generator=gen) + 0.2
    ex = X.check(extras.get("softcap"), extras.get("temperature", 1.0), 0.0, extras.get("return_stats", False),
                 op="vocab_parallel_cross_entropy")
    got = {b: vocab._local_stats(x, _slice_plan(b, ex, w, 0.1)) for b in ("torch", "triton")}
    zt = X.transform(x.double(), ex)
    lse = torch.logsumexp(zt, 1)
    for b, (L, Q, st) in got.items():
        fin = lse.isfinite()
        torch.testing.assert_close(L[fin].double(), lse[fin], rtol=2e-6, atol=2e-6, msg=lambda m, b=b: f"{b} L: {m}")
        if ex.softcap is None:  # a cap maps -inf to -s / T
            assert L[1].item() == -math.inf, b
        q = (w.double() * (lse[:, None] - zt)).sum(1)
        torch.testing.assert_close(Q[fin].double(), q[fin], rtol=2e-5, atol=2e-5, msg=lambda m, b=b: f"{b} Q: {m}")
        if not ex.return_stats:
            assert st is None
            continue
        a, key, code = st
        p = (zt - lse[:, None]).exp()
        want_a = torch.where(lse.isneginf(), 0.0, (p * torch.where(p > 0, zt - lse[:, None], 0.0)).sum(1))
        torch.testing.assert_close(a[fin].double(), want_a[fin], rtol=2e-5, atol=2e-5, msg=lambda m, b=b: f"{b} A: {m}")
        if ex.softcap is None:
            assert a[1].item() == 0.0
        arg = x.argmax(1)  # torch.argmax: a NaN wins, then the lowest column of the max
        hasnan = x.isnan().any(1)
        col = torch.where(code < 0, code.long() + cols, code.long())
        assert torch.equal(col, arg), (b, col, arg)
        assert torch.equal(code < 0, hasnan), b
        want_key = torch.where(x.isnan(), math.inf, x).amax(1)
        assert torch.equal(key, want_key), b
    for u, v in zip(got["torch"][2] or (), got["triton"][2] or ()):
        if u.dtype == torch.int32:
            assert torch.equal(u, v)


def test_vocab_parallel_extras_make_no_pass_over_the_logits_besides_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend="triton" with softcap, temperature, z-loss and statistics: the forward's only pass
    over the (R, C_local) slice is the statistics kernel (launches stubbed here; every torch op
    of the call is recorded: none but views makes a tensor of the slice's size)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from safeloss.parallel import triton_stats, vocab

    R, C = 100, 96  # more rows than the softmax check samples
    x = torch.randn(R, C, requires_grad=True)
    t = torch.randint(0, C, (R,))
    views = {"expand.default", "detach.default", "view.default", "alias.default", "t.default",
             "select.int", "slice.Tensor", "as_strided.default", "_unsafe_view.default"}
    big: list[str] = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor) and o.numel() >= R * C and o.device.type != "meta":
                    big.append(func.__name__)
            return out

    # One rank of a one-rank group: the collectives are the identity.
    monkeypatch.setattr(vocab.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(vocab.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(vocab.dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(vocab, "_all_reduce", lambda t, op, group: t)
    for backend, want_pass in (("torch", True), ("triton", False)):
        big.clear()
        # The stubbed kernels leave their outputs unwritten: whatever the loss holds is not judged here.
        with triton_stats.stubbed_launches(), Sizes(), warnings.catch_warnings():
            warnings.simplefilter("ignore", safeloss.SafeLossWarning)
            vocab.run(x, t, None, -100, "mean", 0.1, strict=None, backend=backend, owner=None,
                      sharding=vocab.Sharding(object()), extras=(30.0, 0.7, 1e-3, True))
        passes = set(big) - views
        assert bool(passes) == want_pass, (backend, passes)  # torch: the recorder does see a pass


def test_benchmark_report_counts_bytes_per_row(benchmark_script: Any) -> None:
    bench = benchmark_script("vocab_parallel")
    rows = [dict(shape=[100, 8], provider="stock", median_ms=2.0, bytes=1200, all_reduces=3),
            dict(shape=[100, 8], provider="safeloss-shards", median_ms=1.0, bytes=2112, all_reduces=3)]
    text = bench.report(rows, 2)
    assert "| (100, 8) | safeloss-shards | 1.00 ms | 0.50x | 3 | 2,112 | 21.1 |" in text


@pytest.mark.parametrize("smooth", [False, True])
def test_triton_shard_stats_of_an_all_masked_row_are_minus_inf(smooth: bool) -> None:
    """A row whose whole slice is -inf (a masked vocabulary slice): its log-sum-exp is -inf,
    never NaN ((-inf) - (-inf)), and the other rows of the same program are unaffected."""
    from safeloss.parallel import triton_stats

    gen = torch.Generator().manual_seed(1)
    for cols in (5, 40):  # several rows a program, and one
        x = torch.randn(4, cols, generator=gen)
        x[2] = -math.inf
        w = torch.rand(cols, generator=gen)
        lse, q, _ = triton_stats.shard_stats(x, w if smooth else None, smooth)
        assert lse[2].item() == -math.inf
        keep = [0, 1, 3]
        torch.testing.assert_close(lse[keep], torch.logsumexp(x[keep], 1))
        if smooth:
            assert q is not None
            torch.testing.assert_close(q[keep], (w * (lse[keep, None] - x[keep])).sum(1))


@pytest.mark.parametrize("a,b", [([2, 5, 2], [3, 3, 3]), ([0, 1, 4], [4, 1, 0]), ([1, 6, 3], [6, 1, 3]),
                                 ([0, 0, 0, 0], [0, 0, 0, 1]), ([6, 6], [-100, 6])])
def test_salted_label_hash_tells_structured_differences_apart(a: list[int], b: list[int]) -> None:
    """The label agreement's hash: equal labels agree under a salt; labels that differ in the
    patterns a checksum or an order-insensitive fingerprint misses differ, for every salt tried."""
    from safeloss.parallel.vocab import _label_values, _salted_hash

    va, vb = (_label_values(torch.tensor(v), -100, 7) for v in (a, b))
    for salt in range(200):
        assert torch.equal(_salted_hash(va, salt, 0), _salted_hash(va.clone(), salt, 0))
        assert not torch.equal(_salted_hash(va, salt, 0), _salted_hash(vb, salt, 0)), salt
    vc = _label_values(torch.tensor([1, 2, 3]), -100, 7)
    assert len({tuple(_salted_hash(vc, salt, 0).tolist()) for salt in range(20)}) == 20  # salted


@pytest.mark.parametrize("rows", [65, 1000, 2**24 + 4, 2**40 + 3])
def test_sampled_rows_stay_in_range(rows: int) -> None:
    """The softmax check's sample (no process group needed): a float32 linspace indexed row R."""
    from safeloss.parallel.vocab import K_SAMPLE, _sample_positions

    pos = _sample_positions(torch.empty(0), rows)
    assert pos.numel() == K_SAMPLE and int(pos[0]) == 0 and int(pos[-1]) == rows - 1
    assert bool((pos[1:] > pos[:-1]).all())


class _RecordedLaunch:
    """Stands in for the statistics kernel: records the launch's I64 instead of running it."""

    def __init__(self) -> None:
        self.i64: list[bool] = []

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: self.i64.append(kwargs["I64"])


@pytest.mark.parametrize("shape,stride,want", [
    ((4, 40), (40, 1), False),  # a usual slice
    ((1, 2**31 - 4096), (0, 1), False),  # every index below 2**31, the last block's padding included
    ((2**16, 2**16), (1, 2**16), True),  # column-major: the column offsets pass int32
    ((2, 2**31 + 1), (0, 0), True),  # expanded columns: only the last column block's padding passes
    ((2**31 + 1, 3), (0, 1), True),  # expanded rows: the (R,) outputs' indices pass int32
], ids=["small", "just-below", "column-major", "expanded-columns", "expanded-rows"])
def test_triton_shard_stats_offsets_are_int64_where_an_index_can_pass_int32(
        monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int], stride: tuple[int, int], want: bool) -> None:
    """Class: the int64 offset (I64) condition of triton_stats.shard_stats: the largest offset of
    the slice (both strides), the row padding of the last program and the column padding of the
    last block. Slices of these sizes do not fit here: meta tensors of the shape and strides, and
    the launch is recorded, not run."""
    from safeloss.parallel import triton_stats

    launch = _RecordedLaunch()
    monkeypatch.setattr(triton_stats, "shard_stats_kernel", launch)
    xr = torch.empty_strided(shape, stride, device="meta")
    lse, _, _ = triton_stats.shard_stats(xr, None, False)
    assert lse.shape == (shape[0],)
    assert launch.i64 == [want]


def test_needs_a_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(safeloss.BackendError, match=r"initialized torch\.distributed process group"):
        safeloss.vocab_parallel_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))



def test_each_call_draws_a_fresh_salt(monkeypatch: pytest.MonkeyPatch) -> None:
    """The salt of the label hash is fresh every call (a fixed salt would let one structured
    difference pass every call): the head of two calls carries different 62-bit draws."""
    from safeloss.parallel import vocab

    heads: list[list[int]] = []

    def record(t: torch.Tensor, op: str, group: object) -> torch.Tensor:
        if t.dtype == torch.int64 and t.numel() == 1 + vocab._HEAD:  # the head of a one-rank group
            heads.append(t.tolist())
        return t

    monkeypatch.setattr(vocab.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(vocab.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(vocab.dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(vocab, "_all_reduce", record)
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        vocab.run(x, t, None, -100, "mean", 0.0, strict=None, backend="torch", owner=None,
                  sharding=vocab.Sharding(object()))
    salts = [h[1 + vocab._SALT] for h in heads]  # one rank: the head starts after its width
    assert len(salts) == 3 and len(set(salts)) == 3, salts
    assert all(0 <= s < 2**62 for s in salts), salts


# =============================================================================== one rank, in process


class _Ops(TorchDispatchMode):
    """The aten (and c10d) ops a block dispatches, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


# The ops of one clean fwd+bwd (torch.autograd.grad) of a one-rank (8, 10) call, plan taken: 62
# (165 before v13), 6 of them the three all-reduces and their waits. A little above what the call
# needs: a pass added to the clean call fails here.
CLEAN_CALL_OPS = 64


def test_clean_call_op_ceiling(one_rank: None) -> None:
    """Class: the per-call host cost of the clean call (issue 16), as the aten ops it dispatches
    (each a few us of host time at small shapes); its three all-reduces; planned (the plan only
    skips Python work: the same collectives, fewer ops) and not."""
    from safeloss.core import plan as plans

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 10, generator=gen).requires_grad_()
    t = torch.randint(0, 10, (8,), generator=gen)
    seen = {}
    for planned in (False, True):
        plans.clear()
        if planned:
            safeloss.vocab_parallel_cross_entropy(x, t)  # the signature's first clean call plans it
            assert plans.size() == 1
        with _Ops() as ops:
            torch.autograd.grad(safeloss.vocab_parallel_cross_entropy(x, t), (x,))
        seen[planned] = ops.seen
    ops_of = {p: collections.Counter(s) for p, s in seen.items()}
    assert len(seen[True]) <= CLEAN_CALL_OPS, (len(seen[True]), ops_of[True].most_common())
    # Unplanned: validation's stand-in for the global logits, and the plan's (on the meta device).
    assert len(seen[False]) <= len(seen[True]) + 3, (len(seen[False]), (ops_of[False] - ops_of[True]))
    collectives = [[o for o in s if "c10d" in o] for s in seen.values()]
    assert collectives[0] == collectives[1] == ["_c10d_functional.all_reduce.default",
                                                "_c10d_functional.wait_tensor.default"] * 3, collectives


def _plan_case(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the arguments of a clean call of the case's signature, the case's own arguments)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, C, generator=gen)
    t = torch.randint(0, C, (6,), generator=gen)
    w = torch.rand(C, generator=gen) + 0.5
    clean = dict(input=x, target=t, weight=w)
    case = dict(clean)
    if name == "bad-label":
        case["target"] = t.clone().index_fill_(0, torch.tensor([4]), C + 2)
    elif name == "negative-weight":
        case["weight"] = w.clone().index_fill_(0, torch.tensor([2]), -1.0)
    elif name == "softmaxed":
        case["input"] = x.softmax(1)
    elif name == "strict-softmaxed":
        case.update(input=x.softmax(1), strict=True)
    elif name == "nan-logit":
        case["input"] = x.clone().index_fill_(0, torch.tensor([2]), math.nan)
    elif name == "all-ignored":
        case["target"] = torch.full_like(t, -100)
    return clean, case


@pytest.mark.parametrize("name", ["bad-label", "negative-weight", "softmaxed", "strict-softmaxed", "nan-logit",
                                  "all-ignored", "clean"])
def test_planned_call_matches_a_full_call(one_rank: None, name: str) -> None:
    """Class: a plan holds nothing read from values. The same call, the signature planned by a
    clean call first and not: the same value, error (class, text) and warnings, the same
    all-reduces."""
    from safeloss.core import plan as plans
    from safeloss.parallel import vocab

    clean, case = _plan_case(name)
    got = {}
    for planned in (False, True):
        plans.clear()
        if planned:
            safeloss.vocab_parallel_cross_entropy(**clean)
            assert plans.size() == 1
        calls: list[tuple[str, int]] = []

        def spy(v: torch.Tensor, op: str, g: object, calls: list = calls, real: Any = vocab._all_reduce) -> Any:
            calls.append((op, v.numel()))
            return real(v, op, g)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(vocab, "_all_reduce", spy)
            got[planned] = record(lambda: safeloss.vocab_parallel_cross_entropy(**case))
        got[planned]["calls"] = calls
        got[planned].pop("seconds")
    full, planned_ = got[False], got[True]
    if "ok" in full:
        assert torch.equal(full.pop("ok").nan_to_num(), planned_.pop("ok").nan_to_num())
    assert full == planned_
    if name == "clean":
        assert full["warnings"] == [] and "error" not in full


def test_no_plan_for_a_call_with_a_finding_of_its_arguments(one_rank: None) -> None:
    """Class: only a clean signature is planned (its argument checks found and converted
    nothing): whole-number float labels are converted with a finding every call."""
    from safeloss.core import plan as plans

    clean, _ = _plan_case("clean")
    plans.clear()
    for _ in range(2):
        safeloss.reset_warnings()
        with pytest.warns(safeloss.SafeLossWarning, match="class-index targets stored as torch.float64"):
            safeloss.vocab_parallel_cross_entropy(clean["input"], clean["target"].double())
        assert plans.size() == 0
    safeloss.vocab_parallel_cross_entropy(clean["input"], clean["target"])
    assert plans.size() == 1

"""Hostile pass on the vocab-parallel call path after its per-call rewrite (v13): plans per call
signature, the reduction inside the loss's node, the label hashes mod P. Each case changes one
thing between a clean call that plans its signature and the call under test, and compares the
planned call with a full one (values, errors, warnings); gradients against
``safeloss.cross_entropy`` on the full logits; label hashes of ranks that differ only where one
rank ignores a position, planned and unplanned ranks in one collective."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import safeloss
from tests.ranks import init_gloo, record, spawn
from tests.tolerances import assert_matches

C = 10


def _base() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, C, generator=gen)
    t = torch.randint(0, C, (6,), generator=gen)
    w = torch.rand(C, generator=gen) + 0.5
    return dict(input=x, target=t, weight=w)


def _one_change(name: str) -> tuple[dict[str, Any], dict[str, Any], Callable[[], Any]]:
    """(clean call's arguments, the changed call's, the context both run in)."""
    b = _base()
    x, t, w = b["input"], b["target"], b["weight"]
    ctx: Callable[[], Any] = contextlib.nullcontext
    changed: dict[str, Any] = {
        "label-past-C": dict(b, target=t.clone().index_fill_(0, torch.tensor([1]), C)),
        "negative-label": dict(b, target=t.clone().index_fill_(0, torch.tensor([1]), -5)),
        "nan-weight": dict(b, weight=w.clone().index_fill_(0, torch.tensor([1]), math.nan)),
        "zero-weights": dict(b, weight=torch.zeros(C)),
        "minus-zero-weight": dict(b, weight=w.clone().index_fill_(0, torch.tensor([1]), -0.0)),
        "minus-inf-target-logit": dict(b, input=x.clone().index_fill_(1, torch.tensor([int(t[0])]), -math.inf)),
        "minus-inf-row": dict(b, input=x.clone().index_fill_(0, torch.tensor([0]), -math.inf)),
        "log-softmaxed": dict(b, input=x.log_softmax(1)),
        "smoothing-int": dict(b, label_smoothing=0),
        "ignore-index-0d": dict(b, ignore_index=torch.tensor(-100)),
        "ignore-index-bool": dict(b, ignore_index=True),
        "weight-requires-grad": dict(b, weight=w.clone().requires_grad_()),
        "float64-logits": dict(b, input=x.double()),
        "int32-labels": dict(b, target=t.int()),
        "transposed-logits": dict(b, input=torch.randn(C, 6).t()),
        "strided-weight": dict(b, weight=(torch.rand(2 * C) + 0.5)[::2]),
        "all-ignored-zero-weights": dict(b, target=torch.full_like(t, -100), weight=torch.zeros(C),
                                         label_smoothing=0.1),
    }
    if name in ("no-grad", "inference-mode", "autocast", "no-grad-weight-requires-grad"):
        ctx = {"no-grad": torch.no_grad, "inference-mode": torch.inference_mode,
               "no-grad-weight-requires-grad": torch.no_grad,
               "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}[name]
        case = dict(b, weight=w.clone().requires_grad_()) if "weight" in name else b
        return b, case, ctx
    return b, changed[name], ctx


CHANGES = ["label-past-C", "negative-label", "nan-weight", "zero-weights", "minus-zero-weight",
           "minus-inf-target-logit", "minus-inf-row", "log-softmaxed", "smoothing-int", "ignore-index-0d",
           "ignore-index-bool", "weight-requires-grad", "float64-logits", "int32-labels", "transposed-logits",
           "strided-weight", "all-ignored-zero-weights", "no-grad", "inference-mode", "autocast",
           "no-grad-weight-requires-grad"]


@pytest.mark.parametrize("name", CHANGES)
def test_one_change_after_a_planned_call_matches_a_fresh_call(one_rank: None, name: str) -> None:
    """Class: a plan hides no check. The clean call plans its signature; the call with one thing
    changed then behaves as in a process that never planned (same value, error, warnings)."""
    from safeloss.core import plan as plans

    clean, case, ctx = _one_change(name)
    got = {}
    for planned in (False, True):
        plans.clear()
        if planned:
            with ctx():
                safeloss.vocab_parallel_cross_entropy(**clean)
            assert plans.size() == 1
        with ctx():
            got[planned] = record(lambda: safeloss.vocab_parallel_cross_entropy(**case))
        got[planned].pop("seconds")
        if "ok" in got[planned]:
            got[planned]["ok"] = got[planned]["ok"].detach().nan_to_num().tolist()
    assert got[False] == got[True]


def _grad(fn: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, up: torch.Tensor | None,
          twice: bool, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    a = x.detach().clone().requires_grad_()
    loss = fn(a, t, **kw)
    u = torch.ones_like(loss) if up is None else up
    (g,) = torch.autograd.grad(loss, (a,), u, retain_graph=twice)
    if twice:  # retain_graph: a second backward of the same node gives the same gradient
        (g2,) = torch.autograd.grad(loss, (a,), u)
        assert torch.equal(g.nan_to_num(), g2.nan_to_num()) and torch.equal(g.isnan(), g2.isnan())
    return loss.detach(), g


def _grad_case(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, C, generator=gen)
    t = torch.randint(0, C, (6,), generator=gen)
    w = torch.rand(C, generator=gen) + 0.5
    ign = torch.full_like(t, -100)
    xk = torch.randn(2, C, 3, 4, generator=gen)
    tk = torch.randint(0, C, (2, 3, 4), generator=gen)
    tk[0, 1, 2] = -100
    return {
        "mean": (x, t, None, {}),
        "weighted-mean": (x, t, None, dict(weight=w)),
        "mean-all-ignored": (x, ign, None, {}),
        "weighted-smoothed-mean-all-ignored": (x, ign, None, dict(weight=w, label_smoothing=0.1)),
        "smoothed-mean-zero-weights": (x, t, None, dict(weight=torch.zeros(C), label_smoothing=0.1)),
        "sum-scaled": (x, t, torch.tensor(2.5), dict(reduction="sum")),
        "sum-weighted-smoothed": (x, t, torch.tensor(-1.5), dict(reduction="sum", weight=w, label_smoothing=0.2)),
        "none-upstream": (x, t, torch.randn(6, generator=gen), dict(reduction="none")),
        "none-strided-upstream": (x, t, torch.randn(12, generator=gen)[::2], dict(reduction="none")),
        "none-expanded-upstream": (x, t, torch.tensor(2.0).expand(6), dict(reduction="none", weight=w)),
        "kdim-mean": (xk, tk, None, {}),
        "kdim-none": (xk, tk, torch.randn(2, 3, 4, generator=gen), dict(reduction="none")),
        "kdim-weighted-smoothed": (xk, tk, None, dict(weight=w, label_smoothing=0.1)),
        "one-d": (x[0], t[0], None, {}),
        "one-d-ignored": (x[0], torch.tensor(-100), None, {}),
        "empty-mean": (torch.randn(0, C), torch.zeros(0, dtype=torch.long), None, {}),
        "float64-weighted-smoothed": (x.double(), t, None, dict(weight=w.double(), label_smoothing=0.3)),
        "float16-mean": (x.half(), t, None, {}),
        "bfloat16-none": (x.bfloat16(), t, torch.randn(6, generator=gen).bfloat16(), dict(reduction="none")),
    }[name]


GRADS = ["mean", "weighted-mean", "mean-all-ignored", "weighted-smoothed-mean-all-ignored",
         "smoothed-mean-zero-weights", "sum-scaled", "sum-weighted-smoothed", "none-upstream",
         "none-strided-upstream", "none-expanded-upstream", "kdim-mean", "kdim-none", "kdim-weighted-smoothed",
         "one-d", "one-d-ignored", "empty-mean", "float64-weighted-smoothed", "float16-mean", "bfloat16-none"]


@pytest.mark.parametrize("planned", [False, True], ids=["full", "planned"])
@pytest.mark.parametrize("name", GRADS)
def test_reduction_inside_the_node_matches_the_single_device_loss(one_rank: None, name: str, planned: bool) -> None:
    """Class: the node's own reduction (reduce_with_divisor / rows_grad) gives the single-device
    loss's value and gradient for every reduction, upstream gradient, weight, smoothing and
    degenerate divisor, planned or not, and backward twice (retain_graph) the same."""
    from safeloss.core import plan as plans

    x, t, up, kw = _grad_case(name)
    plans.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", safeloss.SafeLossWarning)  # the degenerate means warn
        if planned:
            safeloss.vocab_parallel_cross_entropy(x, t, **kw)
        loss, g = _grad(safeloss.vocab_parallel_cross_entropy, x, t, up, True, **kw)
        ref_loss, ref_g = _grad(safeloss.cross_entropy, x, t, up, False, **kw)
        half = x.dtype in (torch.float16, torch.bfloat16)
        k64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        truth = _grad(safeloss.cross_entropy, x.double(), t, None if up is None else up.double(), False,
                      **k64) if half else (None, None)
    for ours, ref, tr, what in ((loss, ref_loss, truth[0], "loss"), (g, ref_g, truth[1], "grad")):
        assert torch.equal(ours.isnan(), ref.isnan()), (what, ours, ref)
        assert_matches(ours.nan_to_num(), ref.nan_to_num(), None if tr is None else tr.nan_to_num(),
                       what=f"{name} {what}")


def test_double_backward_and_weight_grad_are_refused_as_before(one_rank: None) -> None:
    b = _base()
    a = b["input"].clone().requires_grad_()
    loss = safeloss.vocab_parallel_cross_entropy(a, b["target"])
    with pytest.raises(safeloss.SafeLossError, match="no double backward"):
        torch.autograd.grad(loss, (a,), create_graph=True)
    with pytest.raises(safeloss.SafeLossError, match="weight requires grad"):
        safeloss.vocab_parallel_cross_entropy(a, b["target"], weight=b["weight"].clone().requires_grad_())


# ====================================================================== ranks: label hashes, plans

P = 2**24 - 3


def _hash_cases(rank: int) -> dict[str, dict[str, Any]]:
    """Each rank's arguments: labels that differ between ranks in ways a weak hash would miss."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 4, generator=gen)  # this rank's slice of 4 classes
    t = torch.randint(0, 8, (5,), generator=gen)
    w = torch.rand(8, generator=gen) + 0.5
    other = rank == 1
    cases = {
        # rank 1 counts a position rank 0 ignores
        "ignored-on-one-rank": dict(input=x, target=t.clone().index_fill_(0, torch.tensor([2]), -100) if not other
                                    else t.clone().index_fill_(0, torch.tensor([2]), 3)),
        # ignore_index whose residue mod P is a label's: 3 - P is ignored on rank 0, 3 on rank 1
        "ignore-index-congruent-to-a-label": dict(
            input=x, ignore_index=3 - P,
            target=t.clone().index_fill_(0, torch.tensor([1]), 3 - P if not other else 3)),
        "ignore-index-P-plus-label": dict(
            input=x, ignore_index=P + 3,
            target=t.clone().index_fill_(0, torch.tensor([1]), P + 3 if not other else 3)),
        "swapped-labels": dict(input=x, target=t if not other else t.flip(0)),
        "one-weight-differs": dict(input=x, target=t, weight=w if not other else w.clone().index_fill_(
            0, torch.tensor([7]), 2.0)),
        "int32-vs-int64-labels": dict(input=x, target=t if not other else t.int()),
        "same": dict(input=x, target=t, weight=w),
    }
    if bool((t.flip(0) == t).all()):
        raise AssertionError("the swapped labels must differ")
    return cases


def _hash_worker(rank: int, world: int, store: str, out: str) -> None:
    from safeloss.core import plan as plans

    init_gloo(rank, world, store)
    res = {}
    for name, case in _hash_cases(rank).items():
        for planned in (False, True):
            plans.clear()
            if planned:
                # The signature's clean call (labels every rank agrees on, this rank's dtype) on
                # every rank; then rank 1 forgets it: rank 0 planned, rank 1 fresh.
                clean = dict(case, target=torch.zeros_like(case["target"]))
                with contextlib.suppress(Exception):
                    safeloss.vocab_parallel_cross_entropy(**clean)
                if rank == 1:
                    plans.clear()
            r = record(lambda case=case: safeloss.vocab_parallel_cross_entropy(**case))
            r.pop("seconds")
            if "ok" in r:
                r["ok"] = r["ok"].item()
            res[(name, planned)] = r
    torch.save(res, f"{out}.{rank}")


@pytest.fixture(scope="module")
def hash_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return spawn(_hash_worker, 2, Path(tmp_path_factory.mktemp("hash")), 60, "label hashes")


@pytest.mark.parametrize("planned", [False, True], ids=["fresh", "rank0-planned"])
@pytest.mark.parametrize("name", ["ignored-on-one-rank", "ignore-index-congruent-to-a-label",
                                  "ignore-index-P-plus-label", "swapped-labels", "one-weight-differs",
                                  "int32-vs-int64-labels"])
def test_ranks_with_different_labels_are_caught(hash_ranks: list[dict], name: str, planned: bool) -> None:
    """Class: labels (or weights) that differ between ranks raise the same ParallelMismatchError
    on every rank, wherever the difference lies (a position one rank ignores, an ignore_index
    congruent to a label mod P, a permutation), a planned rank beside a fresh one."""
    got = [r[(name, planned)] for r in hash_ranks]
    assert got[0] == got[1], got
    assert got[0].get("error") == "ParallelMismatchError", got[0]


@pytest.mark.parametrize("planned", [False, True], ids=["fresh", "rank0-planned"])
def test_ranks_with_the_same_labels_agree(hash_ranks: list[dict], planned: bool) -> None:
    got = [r[("same", planned)] for r in hash_ranks]
    assert "ok" in got[0] and got[0] == got[1], got

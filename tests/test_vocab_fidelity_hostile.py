"""Hostile pass on ``safeloss.vocab_parallel_cross_entropy``'s fidelity to stock on odd inputs:
ignore_index extremes, odd label_smoothing types, dtypes, empty and all-ignored batches, in-place
edits between forward and backward, double backward, and repeated (planned) calls. One rank in
this process for most cases; one short two-rank spawn for the errors that must agree."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import safeloss
from safeloss.core import plan
from tests.ranks import init_gloo, record, spawn

V = safeloss.vocab_parallel_cross_entropy


def _case() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 5, generator=g), torch.tensor([0, 1, -100, 4])


# ------------------------------------------------------------------ ignore_index extremes

@pytest.mark.parametrize("ii", [2**63, -(2**63) - 1, 2**64])
@pytest.mark.parametrize("labels", [[0, 1, -100, 4], [0, 1, 2, 4]])
def test_ignore_index_outside_int64_is_the_single_device_error(one_rank: None, ii: int, labels: list[int]) -> None:
    """Stock: "Overflow when unpacking long long" (a ValueError) whatever the labels. Was: a
    TargetOutOfRangeError about the -100 label, or a ParallelMismatchError wrapping Python's
    OverflowError from comparing the labels with it."""
    x, t = torch.randn(4, 5), torch.tensor(labels)
    with pytest.raises(ValueError, match="Overflow when unpacking long long"):
        F.cross_entropy(x, t, ignore_index=ii)
    with pytest.raises(safeloss.IgnoreIndexError, match=r"vocab_parallel_cross_entropy: ignore_index=-?\d+ "
                       r"does not fit int64") as e:
        V(x, t, ignore_index=ii)
    assert isinstance(e.value, ValueError)


def test_ignore_index_bool_tensor_is_refused(one_rank: None) -> None:
    """Was read as ignore_index=1 (operator.index of a bool tensor), so the -100 label was blamed."""
    x, t = _case()
    with pytest.raises(RuntimeError, match="INTERNAL ASSERT"):
        F.cross_entropy(x, t, ignore_index=torch.tensor(True))
    with pytest.raises(safeloss.ArgumentTypeError, match=r"ignore_index must be an int, got tensor\(True\) "
                       r"\(a bool tensor") as e:
        V(x, t, ignore_index=torch.tensor(True))
    assert isinstance(e.value, RuntimeError)


def test_ignore_index_meta_tensor_is_refused(one_rank: None) -> None:
    """Was a ParallelMismatchError quoting "RuntimeError: Tensor.item() cannot be called on meta
    tensors"."""
    x, t = _case()
    ii = torch.tensor(1, device="meta")
    with pytest.raises(RuntimeError, match="meta tensors"):
        F.cross_entropy(x, t, ignore_index=ii)
    with pytest.raises(safeloss.ArgumentTypeError, match=r"ignore_index must be a number, got .*a meta tensor") as e:
        V(x, t, ignore_index=ii)
    assert isinstance(e.value, RuntimeError)


@pytest.mark.parametrize("ii", [torch.tensor(-100), torch.tensor(2, dtype=torch.int8), -(2**63), 2**63 - 1, 2, -7])
def test_ignore_index_int_likes_match_stock(one_rank: None, ii: object) -> None:
    x, t = torch.randn(4, 5), torch.tensor([0, 2, 2, 4]) if not isinstance(ii, torch.Tensor) or ii.item() != -100 \
        else torch.tensor([0, 1, -100, 4])
    xs, xv = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = F.cross_entropy(xs, t, ignore_index=ii), V(xv, t, ignore_index=ii)  # type: ignore[arg-type]
    torch.testing.assert_close(got, want)
    want.backward()
    got.backward()
    torch.testing.assert_close(xv.grad, xs.grad)


# ------------------------------------------------------------------ label_smoothing and reduction

@pytest.mark.parametrize("ls", [Fraction(1, 10), torch.tensor(0.1, requires_grad=True)])
def test_label_smoothing_types_stock_refuses_are_type_errors(one_rank: None, ls: object) -> None:
    x, t = _case()
    with pytest.raises(TypeError):
        F.cross_entropy(x, t, label_smoothing=ls)  # type: ignore[arg-type]
    with pytest.raises(safeloss.ArgumentTypeError, match=r"label_smoothing must be a number between 0\.0 and 1\.0") as e:
        V(x, t, label_smoothing=ls)  # type: ignore[arg-type]
    assert isinstance(e.value, TypeError)


@pytest.mark.parametrize("ls", [torch.tensor(0.1), 1.0, 1, -0.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_values_stock_takes_match(one_rank: None, ls: object, reduction: str) -> None:
    x, t = _case()
    xs, xv = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = F.cross_entropy(xs, t, label_smoothing=ls, reduction=reduction)  # type: ignore[arg-type]
    got = V(xv, t, label_smoothing=ls, reduction=reduction)  # type: ignore[arg-type]
    torch.testing.assert_close(got, want)
    want.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(xv.grad, xs.grad)


def test_label_smoothing_nan_and_true_are_refused_as_documented(one_rank: None) -> None:
    """Deliberate (docs/migration.md): stock reads NaN as 0.0 and True as 1.0, silently."""
    x, t = _case()
    with pytest.raises(safeloss.LabelSmoothingError, match=r"label_smoothing must be between 0\.0 and 1\.0, got nan"):
        V(x, t, label_smoothing=math.nan)
    with pytest.raises(safeloss.ArgumentTypeError, match=r"label_smoothing must be a number between 0\.0 and 1\.0, got True"):
        V(x, t, label_smoothing=True)


# ------------------------------------------------------------------ dtypes and degenerate batches

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["empty", "all-ignored", "all-ignored-eps-weight", "C1"])
def test_degenerate_batches_match_stock(one_rank: None, case: str, reduction: str) -> None:
    x, t = _case()
    kw: dict[str, Any] = {"reduction": reduction}
    if case == "empty":
        x, t = torch.randn(0, 5), torch.zeros(0, dtype=torch.long)
    elif case.startswith("all-ignored"):
        t = torch.full((4,), -100)
        if case.endswith("weight"):
            kw.update(label_smoothing=0.1, weight=torch.rand(5))
    else:
        x, t = torch.randn(4, 1), torch.zeros(4, dtype=torch.long)
    xs, xv = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = F.cross_entropy(xs, t, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", safeloss.SafeLossWarning)
        got = V(xv, t, **kw)
    torch.testing.assert_close(got, want, equal_nan=True)
    want.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(xv.grad, xs.grad)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.uint8])
def test_narrow_label_dtypes_give_int64s_result(one_rank: None, dtype: torch.dtype) -> None:
    """Accepted as documented (README: lossless), with ignore_index equal to a class."""
    x, t = torch.randn(4, 5), torch.tensor([0, 1, 2, 4])
    want = F.cross_entropy(x, t, ignore_index=2)
    torch.testing.assert_close(V(x, t.to(dtype), ignore_index=2), want)


def test_nan_logits_in_ignored_rows_get_zero_gradient(one_rank: None) -> None:
    """Documented difference (docs/migration.md, section 6): the value and every other gradient
    entry are stock's; an ignored row gets exactly 0 where stock's log_softmax backward gives NaN."""
    x, t = _case()
    x[2] = math.nan
    x[2, 0] = math.inf
    xs, xv = x.clone().requires_grad_(), x.clone().requires_grad_()
    F.cross_entropy(xs, t, label_smoothing=0.1).backward()
    got = V(xv, t, label_smoothing=0.1)
    torch.testing.assert_close(got, F.cross_entropy(x, t, label_smoothing=0.1))
    got.backward()
    assert xs.grad is not None and xv.grad is not None
    assert xs.grad[2].isnan().all()
    assert torch.equal(xv.grad[2], torch.zeros(5))
    torch.testing.assert_close(xv.grad[[0, 1, 3]], xs.grad[[0, 1, 3]])


# ------------------------------------------------------------------ autograd

def test_labels_and_weight_edited_before_backward_keep_forwards_values(one_rank: None) -> None:
    """Documented: the labels and weight are read in forward (stock raises autograd's in-place error)."""
    x, t = _case()
    w = torch.rand(5)
    ref = x.clone().requires_grad_()
    V(ref, t, w, label_smoothing=0.1).backward()
    xv, t2, w2 = x.clone().requires_grad_(), t.clone(), w.clone()
    loss = V(xv, t2, w2, label_smoothing=0.1)
    t2.fill_(3)
    w2.mul_(3)
    loss.backward()
    torch.testing.assert_close(xv.grad, ref.grad)


def test_logits_edited_before_backward_raise_autogads_error(one_rank: None) -> None:
    """Documented: backward reads the saved logits (stock saves its log_softmax output instead)."""
    x, t = _case()
    leaf = x.clone().requires_grad_()
    y = leaf * 1.0
    loss = V(y, t)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_double_backward_is_refused_and_retain_graph_twice_adds(one_rank: None) -> None:
    x, t = _case()
    xv = x.clone().requires_grad_()
    loss = V(xv, t, label_smoothing=0.1)
    with pytest.raises(safeloss.BackendError, match="has no double backward"):
        torch.autograd.grad(loss, xv, create_graph=True)
    loss.backward(retain_graph=True)
    assert xv.grad is not None
    once = xv.grad.clone()
    loss.backward()
    torch.testing.assert_close(xv.grad, 2 * once)


# ------------------------------------------------------------------ repeated calls

@pytest.mark.parametrize("ii", [2**63, torch.tensor(True)])
def test_second_call_still_refuses_a_bad_ignore_index(one_rank: None, ii: object) -> None:
    x, t = _case()
    plan.clear()
    V(x, t)
    V(x, t)
    with pytest.raises(safeloss.ArgumentTypeError if isinstance(ii, torch.Tensor) else safeloss.IgnoreIndexError,
                       match=r"ignore_index must be an int, got tensor|does not fit int64"):
        V(x, t, ignore_index=ii)  # type: ignore[arg-type]


def test_second_call_still_checks_values(one_rank: None) -> None:
    x, t = _case()
    ls = torch.tensor(0.1)
    V(x, t, label_smoothing=ls)
    V(x, t, label_smoothing=ls)
    ls.fill_(2.0)
    with pytest.raises(safeloss.LabelSmoothingError, match=r"got tensor\(2\.\)"):
        V(x, t, label_smoothing=ls)
    w = torch.rand(5)
    V(x, t, w)
    safeloss.reset_warnings()
    with pytest.warns(safeloss.SafeLossWarning, match="negative entries"):
        V(x, t, -w)
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"bad values: 5 at \[2\]"):
        V(x, torch.tensor([0, 1, 5, 4]))


# ------------------------------------------------------------------ two ranks

def _worker(rank: int, world: int, store: str, out: str) -> None:
    init_gloo(rank, world, store)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 5, generator=g), torch.tensor([0, 1, -100, 4])
    mine = x[:, :1] if rank == 0 else x[:, 1:]  # C_local = 1 on rank 0
    recs: dict[str, Any] = {}
    for name, ii in (("big", 2**64), ("bool", torch.tensor(True))):
        recs[name] = record(lambda ii=ii: V(mine, t, ignore_index=ii))
    # only rank 1 passes a bad ignore_index: every rank raises its error
    recs["one-rank"] = record(lambda: V(mine, t, ignore_index=2**63 if rank == 1 else -100))
    xn = x.clone()
    xn[2] = math.nan
    xl = (xn[:, :1] if rank == 0 else xn[:, 1:]).clone().requires_grad_()
    loss = V(xl, t, reduction="sum", label_smoothing=0.1)
    loss.backward()
    recs["nan-ignored"] = (loss.detach(), xl.grad)
    xe = torch.randn(0, 5)
    el = (xe[:, :1] if rank == 0 else xe[:, 1:]).clone().requires_grad_()
    loss = V(el, torch.zeros(0, dtype=torch.long), reduction="sum")
    loss.backward()
    recs["empty"] = (loss.detach(), el.grad)
    torch.save(recs, f"{out}.{rank}")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp: Path = tmp_path_factory.mktemp("vocab-fidelity")
    return spawn(_worker, 2, tmp, 120, "vocab fidelity hostile")


def test_two_ranks_raise_the_ignore_index_errors_alike(two_ranks: list[dict[str, Any]]) -> None:
    for rank in range(2):
        big, boolean, one = two_ranks[rank]["big"], two_ranks[rank]["bool"], two_ranks[rank]["one-rank"]
        assert big.get("error") == "IgnoreIndexError" and "does not fit int64" in big["message"], big
        assert "ValueError" in big["builtins"]
        assert boolean.get("error") == "ArgumentTypeError" and "a bool tensor" in boolean["message"], boolean
        assert one.get("error") == "IgnoreIndexError" and "raised on rank 1 of the 2 ranks" in one["message"], one


def test_two_ranks_nan_ignored_row_and_empty_batch(two_ranks: list[dict[str, Any]]) -> None:
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 5, generator=g), torch.tensor([0, 1, -100, 4])
    x[2] = math.nan
    xs = x.clone().requires_grad_()
    want = F.cross_entropy(xs, t, reduction="sum", label_smoothing=0.1)
    want.backward()
    assert xs.grad is not None
    wgrad = xs.grad.nan_to_num(0.0)  # the ignored row: 0 (documented), stock NaN
    for rank, sl in ((0, slice(0, 1)), (1, slice(1, 5))):
        loss, grad = two_ranks[rank]["nan-ignored"]
        torch.testing.assert_close(loss, want.detach())
        torch.testing.assert_close(grad, wgrad[:, sl])
        loss, grad = two_ranks[rank]["empty"]
        assert loss.item() == 0.0 and grad.shape == (0, 1 if rank == 0 else 4)

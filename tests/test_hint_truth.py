"""Hints name only causes the call's own dtypes, shapes and values support."""

from __future__ import annotations

import pytest
import torch

import safeloss


def _weight_dtype_message(weight_dtype: torch.dtype, logits_dtype: torch.dtype) -> str:
    logits = torch.randn(4, 3).to(logits_dtype)
    target = torch.tensor([0, 1, 2, 1])
    with pytest.raises(safeloss.WeightError, match=r"weight is torch\.\w+ but the logits") as exc:
        safeloss.cross_entropy(logits, target, weight=torch.ones(3, dtype=weight_dtype), strict=True)
    return str(exc.value)


def test_float64_weight_with_float32_logits_blames_numpy_not_half():
    msg = _weight_dtype_message(torch.float64, torch.float32)
    assert "NumPy" in msg
    assert ".half()" not in msg


def test_float32_weight_with_half_logits_blames_the_conversion_not_numpy():
    msg = _weight_dtype_message(torch.float32, torch.float16)
    assert "weight stayed torch.float32" in msg
    assert "NumPy" not in msg


def test_narrower_weight_gets_no_invented_cause():
    msg = _weight_dtype_message(torch.float16, torch.float32)
    assert "NumPy" not in msg and ".half()" not in msg and "cause" not in msg


def test_float64_weight_warns_in_default_mode():
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    with pytest.warns(safeloss.SafeLossWarning, match=r"weight is torch\.float64 .*casts the weight"):
        loss = safeloss.cross_entropy(logits, target, weight=torch.ones(3, dtype=torch.float64))
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("weighted", [False, True])
def test_integer_onehot_names_the_weight_caveat_only_with_a_weight(weighted):
    logits = torch.randn(4, 3)
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1]), 3)
    weight = torch.tensor([1.0, 2.0, 3.0]) if weighted else None
    with pytest.warns(safeloss.SafeLossWarning, match="one-hot targets as torch.int64") as w:
        safeloss.cross_entropy(logits, onehot, weight=weight)
    msg = str(w[0].message)
    assert ("ignores class weights" in msg) == weighted
    assert "same loss as class indices" in msg


@pytest.mark.parametrize("bad, advised", [(float("nan"), False), (float("inf"), False), (float("-inf"), True)])
def test_the_minus_inf_advice_comes_only_with_minus_inf_logits(bad, advised):
    logits = torch.randn(3, 5)
    logits[1, 1] = bad  # row 1's target class
    with pytest.warns(safeloss.SafeLossWarning, match="the loss is NaN or infinite") as w:
        safeloss.cross_entropy(logits, torch.tensor([0, 1, 2]))
    msg = str(w[0].message)
    assert ("A -inf logit is fine" in msg) == advised
    assert "Common causes" in msg and "detect_anomaly" in msg


_HALF_X = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float16)
_HALF_W = torch.tensor([[40000.0, 0.0], [-40000.0, 0.0], [0.0, 0.0]], dtype=torch.float16)


@pytest.mark.parametrize("reduction, x, target, what", [
    ("none", _HALF_X, [1, 2], "overflowed at 1 of 2"),  # row 0's loss is 80000
    ("sum", _HALF_X[[0, 0]], [2, 2], "each of the 2 per-position losses is finite"),  # 40000 + 40000
])
def test_linear_overflow_fix_names_the_operands_this_op_takes(reduction, x, target, what):
    # linear_cross_entropy never hands the caller logits: "pass logits.float()" is no fix there.
    with pytest.raises(safeloss.NonFiniteError, match=what) as exc:
        safeloss.linear_cross_entropy(x, _HALF_W, torch.tensor(target), reduction=reduction, strict=True)
    msg = str(exc.value)
    assert "logits.float()" not in msg
    assert "input.float()" in msg and "linear_weight.float()" in msg


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float64, torch.float32), (torch.float16, torch.float32)])
def test_linear_dtype_mismatch_cause_is_marked_as_a_guess(x_dtype, w_dtype):
    # Which side was cast is not in the inputs: the hint may name it only as a guess.
    with pytest.raises(safeloss.InputDtypeError, match="narrower dtype") as exc:
        safeloss.linear_cross_entropy(torch.randn(6, 8, dtype=x_dtype), torch.randn(5, 8, dtype=w_dtype),
                                      torch.randint(0, 5, (6,)))
    assert "a likely cause (a guess)" in str(exc.value)

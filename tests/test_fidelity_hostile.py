"""Drop-in fidelity on odd inputs, attacked (h15): strided, expanded, aliased and K-dimensional
inputs, every dtype stock takes, extreme values and options, and the planned (repeated) call.

The rule under test: where stock torch accepts an input, safeloss gives stock's value, gradient,
dtype and shape; where stock raises, safeloss raises a ``SafeLossError`` that is also the builtin
stock raises (docs/errors.md). Every backend that runs on CPU (torch; Triton through its
interpreter, tiny shapes), ``SafeCrossEntropyLoss`` and ``linear_cross_entropy`` where the class
applies to them.
"""

from __future__ import annotations

import decimal
import fractions

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import safeloss
from tests.test_differential import CPU_BACKENDS


def _stock_error(fn) -> Exception:
    try:
        fn()
    except Exception as e:  # whatever stock raises is the reference
        return e
    raise AssertionError("stock accepted the input")


# ------------------------------------------------------------------ ignore_index outside int64
# Stock's argument parser rejects an ignore_index that does not fit int64 ("Overflow when
# unpacking long long", a ValueError). safeloss passed it on: stock's bare ValueError (torch
# backend), an OverflowError from Triton's launcher, or a value (Triton; the extras path and
# linear_cross_entropy compared the labels with it and ignored nothing).
OUT_OF_INT64 = [2**63, -(2**63) - 1, np.uint64(2**64 - 1), 2**100]


def _ce_calls(ii: object, backend: str) -> dict[str, object]:
    x, t = torch.randn(2, 3), torch.tensor([0, 2])
    h, w = torch.randn(2, 4), torch.randn(3, 4)
    return {
        "cross_entropy": lambda: safeloss.cross_entropy(x, t, ignore_index=ii, backend=backend),
        "cross_entropy-ls-none": lambda: safeloss.cross_entropy(x, t, ignore_index=ii, backend=backend,
                                                                label_smoothing=0.1, reduction="none"),
        "cross_entropy-extras": lambda: safeloss.cross_entropy(x, t, ignore_index=ii, backend=backend, z_loss=1e-4),
        "module": lambda: safeloss.SafeCrossEntropyLoss(ignore_index=ii, backend=backend)(x, t),
        "linear_cross_entropy": lambda: safeloss.linear_cross_entropy(h, w, t, ignore_index=ii, backend=backend),
    }


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("ii", OUT_OF_INT64, ids=str)
def test_ignore_index_outside_int64_raises_stock_class(ii: object, backend: str) -> None:
    stock = _stock_error(lambda: F.cross_entropy(torch.randn(2, 3), torch.tensor([0, 2]), ignore_index=ii))
    assert type(stock) is ValueError
    assert type(_stock_error(lambda: F.linear_cross_entropy(
        torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 2]), ignore_index=ii))) is ValueError
    for name, call in _ce_calls(ii, backend).items():
        with pytest.raises(safeloss.IgnoreIndexError, match=rf"ignore_index={int(ii)} does not fit int64") as e:
            call()
        assert isinstance(e.value, ValueError), name
    # Probability targets: the same argument error (stock's parser runs before anything else).
    with pytest.raises(safeloss.IgnoreIndexError, match="does not fit int64") as e:
        safeloss.cross_entropy(torch.randn(2, 3), torch.rand(2, 3).softmax(1), ignore_index=ii, backend=backend)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("ii", [2**63 - 1, -(2**63)], ids=str)
def test_ignore_index_at_the_int64_bounds_is_stock(ii: int) -> None:
    x, t = torch.randn(3, 4), torch.tensor([0, 3, 1])
    for backend in ("torch", "triton"):
        torch.testing.assert_close(safeloss.cross_entropy(x, t, ignore_index=ii, backend=backend),
                                   F.cross_entropy(x, t, ignore_index=ii))


# ------------------------------------------------------------ label_smoothing of odd Python types
# Stock's argument parser takes a float, an int, a NumPy scalar or a 0-d tensor that does not
# require grad, and raises a TypeError for anything else. safeloss took whatever float() accepts:
# a Fraction, a Decimal, a 1-element 1-D tensor, a 0-d NumPy array, a tensor requiring grad (its
# gradient silently dropped).
class _Float(float):
    pass


REJECTED_SMOOTHING = {
    "fraction": lambda: fractions.Fraction(1, 10),
    "decimal": lambda: decimal.Decimal("0.1"),
    "1-d-tensor": lambda: torch.tensor([0.1]),
    "requires-grad": lambda: torch.tensor(0.1, requires_grad=True),
    "numpy-0-d-array": lambda: np.array(0.1),
}
ACCEPTED_SMOOTHING = {
    "numpy-float32": lambda: np.float32(0.25),
    "numpy-int": lambda: np.int64(0),
    "0-d-tensor": lambda: torch.tensor(0.25),
    "0-d-float64-tensor": lambda: torch.tensor(0.25, dtype=torch.float64),
    "float-subclass": lambda: _Float(0.25),
    "int": lambda: 1,
}


@pytest.mark.parametrize("make", REJECTED_SMOOTHING.values(), ids=REJECTED_SMOOTHING.keys())
def test_label_smoothing_stock_rejects_is_an_argument_type_error(make) -> None:
    x, t = torch.randn(3, 4), torch.tensor([0, 3, 1])
    h, w = torch.randn(3, 2), torch.randn(4, 2)
    assert type(_stock_error(lambda: F.cross_entropy(x, t, label_smoothing=make()))) is TypeError
    assert type(_stock_error(lambda: F.linear_cross_entropy(h, w, t, label_smoothing=make()))) is TypeError
    calls = {
        "cross_entropy": lambda: safeloss.cross_entropy(x, t, label_smoothing=make()),
        "triton": lambda: safeloss.cross_entropy(x, t, label_smoothing=make(), backend="triton"),
        "extras": lambda: safeloss.cross_entropy(x, t, label_smoothing=make(), z_loss=1e-4),
        "module": lambda: safeloss.SafeCrossEntropyLoss(label_smoothing=make()),
        "linear_cross_entropy": lambda: safeloss.linear_cross_entropy(h, w, t, label_smoothing=make()),
    }
    for name, call in calls.items():
        with pytest.raises(safeloss.ArgumentTypeError, match=r"label_smoothing must be a number between 0\.0 and 1\.0, got .*\(of type \w+"):
            call()
        assert isinstance(_stock_error(call), TypeError), name


@pytest.mark.parametrize("make", ACCEPTED_SMOOTHING.values(), ids=ACCEPTED_SMOOTHING.keys())
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_label_smoothing_stock_accepts_is_stock(make, backend: str) -> None:
    x, t = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 3, 1])
    want = F.cross_entropy(x, t, label_smoothing=make())
    torch.testing.assert_close(safeloss.cross_entropy(x, t, label_smoothing=make(), backend=backend), want)
    torch.testing.assert_close(safeloss.SafeCrossEntropyLoss(label_smoothing=make(), backend=backend)(x, t), want)


# ------------------------------------------------------------------ ignore_index as a bool tensor
# Stock fails on a bool tensor as ignore_index (an internal assert, a RuntimeError); safeloss read
# it as 0 or 1 (operator.index) and ignored that class. A Python bool is already rejected (a
# TypeError, as stock's parser).
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ignore_index_bool_tensor_raises_stock_class(backend: str) -> None:
    x, t = torch.randn(3, 3), torch.tensor([0, 2, 1])
    h, w = torch.randn(3, 2), torch.randn(3, 2)
    ii = torch.tensor(True)
    assert isinstance(_stock_error(lambda: F.cross_entropy(x, t, ignore_index=ii)), RuntimeError)
    assert isinstance(_stock_error(lambda: F.linear_cross_entropy(h, w, t, ignore_index=ii)), RuntimeError)
    calls = {
        "cross_entropy": lambda: safeloss.cross_entropy(x, t, ignore_index=ii, backend=backend),
        "extras": lambda: safeloss.cross_entropy(x, t, ignore_index=ii, backend=backend, z_loss=1e-4),
        "module": lambda: safeloss.SafeCrossEntropyLoss(ignore_index=ii, backend=backend)(x, t),
        "linear_cross_entropy": lambda: safeloss.linear_cross_entropy(h, w, t, ignore_index=ii, backend=backend),
    }
    for name, call in calls.items():
        with pytest.raises(safeloss.ArgumentTypeError, match=r"ignore_index must be an int.*got tensor\(True\) \(a bool tensor"):
            call()
        assert isinstance(_stock_error(call), RuntimeError), name

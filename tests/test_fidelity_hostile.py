"""Drop-in fidelity on odd inputs, attacked (h15): strided, expanded, aliased and K-dimensional
inputs, every dtype stock takes, extreme values and options, and the planned (repeated) call.

The rule under test: where stock torch accepts an input, safeloss gives stock's value, gradient,
dtype and shape; where stock raises, safeloss raises a ``SafeLossError`` that is also the builtin
stock raises (docs/errors.md). Every backend that runs on CPU (torch; Triton through its
interpreter, tiny shapes), ``SafeCrossEntropyLoss`` and ``linear_cross_entropy`` where the class
applies to them.
"""

from __future__ import annotations

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

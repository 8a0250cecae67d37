"""Two mistakes in one call of linear_cross_entropy, attacked (h16).

Stock ``F.linear_cross_entropy`` checks in a fixed order: its own shape checks (input,
linear_weight, linear_bias, a K-dimensional head's batch, the target's ``.shape`` and
probability targets with an ``ignore_index``), then ``linear`` (dtypes), then ``cross_entropy``:
the reduction string (a ValueError), its argument parser's types (a TypeError), an
``ignore_index`` outside int64 (a ValueError), and the values last. safeloss raised the
reduction, label_smoothing and argument-type errors before the shape checks, so a call with
two mistakes raised an exception that was not an instance of the class stock raises
(docs/errors.md). Each pair below did; the expected message is safeloss's for the mistake
stock reports first.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import safeloss


def _stock_error(fn) -> Exception:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except Exception as e:  # whatever stock raises is the reference
        return e
    raise AssertionError("stock accepted the input")


# Each mistake: (stock's rank, how it changes the call, safeloss's message for it).
def _input_dim(s):
    s["h"] = s["h"].unsqueeze(0)


def _hidden(s):
    s["w"] = torch.randn(s["w"].shape[0], s["w"].shape[-1] + 1)


def _weight_shape(s):
    s["w"] = s["w"][0]


def _bias_shape(s):
    s["kw"]["linear_bias"] = torch.randn(7)


def _target_list(s):
    s["t"] = s["t"].tolist()


def _prob_ii(s):
    s["t"] = torch.rand(2, 3).softmax(1)
    s["kw"].setdefault("ignore_index", 0)


def _dtype_mismatch(s):
    s["w"] = s["w"].double()


def _reduction(s):
    s["kw"]["reduction"] = "avg"


def _weight_list(s):
    s["kw"]["weight"] = [1.0, 1.0, 1.0]


def _ii_type(s):
    s["kw"]["ignore_index"] = "a"


def _ls_type(s):
    s["kw"]["label_smoothing"] = "a"


def _ii_int64(s):
    s["kw"]["ignore_index"] = 2**63


def _ls_range(s):
    s["kw"]["label_smoothing"] = 1.5


MISTAKES = {
    "input_dim": (1, _input_dim, r"expects the input as \(N, H\) or \(H,\), got a 3-D input"),
    "weight_shape": (2, _weight_shape, r"got a 1-D linear_weight of shape"),
    "hidden": (3, _hidden, r"the input's feature size 4 does not match linear_weight's 5"),
    "bias_shape": (4, _bias_shape, r"got linear_bias of shape \(7,\)"),
    "target_list": (5, _target_list, r"expects the target to be a torch\.Tensor, got list"),
    "prob_ii": (6, _prob_ii, r"cannot be used with probability targets"),
    "dtype_mismatch": (7, _dtype_mismatch, r"input of dtype torch\.float32 but a linear_weight of dtype torch\.float64"),
    "reduction": (8, _reduction, r"reduction='avg' is not a valid reduction for linear_cross_entropy"),
    "weight_list": (9.0, _weight_list, r"expects weight to be a torch\.Tensor, got list"),
    "ii_type": (9.1, _ii_type, r"ignore_index must be an int or None, got 'a'"),
    "ls_type": (9.2, _ls_type, r"label_smoothing must be a number between 0\.0 and 1\.0, got 'a'"),
    "ii_int64": (10, _ii_int64, r"ignore_index=9223372036854775808 does not fit int64"),
    "ls_range": (11, _ls_range, r"label_smoothing must be between 0\.0 and 1\.0, got 1\.5"),
}

# The pairs where safeloss's exception was not an instance of stock's class (a probe over every
# pair of these mistakes and more: wrong batch, out-of-range label, float labels).
PAIRS = [
    ("target_list", "bias_shape"), ("target_list", "input_dim"), ("target_list", "hidden"),
    ("target_list", "weight_shape"), ("target_list", "reduction"), ("target_list", "ls_range"),
    ("target_list", "ls_type"), ("weight_list", "bias_shape"), ("weight_list", "dtype_mismatch"),
    ("weight_list", "input_dim"), ("weight_list", "hidden"), ("weight_list", "weight_shape"),
    ("weight_list", "ls_range"), ("weight_list", "prob_ii"), ("bias_shape", "reduction"),
    ("bias_shape", "ls_type"), ("bias_shape", "ii_type"), ("dtype_mismatch", "reduction"),
    ("dtype_mismatch", "ls_type"), ("dtype_mismatch", "ii_type"), ("input_dim", "reduction"),
    ("input_dim", "ls_type"), ("input_dim", "ii_type"), ("hidden", "reduction"),
    ("hidden", "ls_type"), ("hidden", "ii_type"), ("weight_shape", "reduction"),
    ("weight_shape", "ls_type"), ("weight_shape", "ii_type"), ("reduction", "prob_ii"),
    ("ls_range", "ii_type"), ("ls_range", "ii_int64"), ("ls_type", "prob_ii"), ("ii_type", "prob_ii"),
]


def _call(names: tuple[str, ...]) -> dict:
    s = {"h": torch.randn(2, 4), "w": torch.randn(3, 4), "t": torch.tensor([0, 2]), "kw": {}}
    for n in names:
        MISTAKES[n][1](s)
    return s


@pytest.mark.parametrize("backend, extras", [("torch", {}), ("triton", {}), ("torch", {"z_loss": 1e-4})],
                         ids=["torch", "triton", "torch-z_loss"])
@pytest.mark.parametrize("pair", PAIRS, ids="+".join)
def test_two_mistakes_raise_stock_class(pair: tuple[str, str], backend: str, extras: dict) -> None:
    """With an extra (z_loss: its own path, safeloss/linear/extras.py) stock's arguments are
    checked in the same order."""
    s = _call(pair)
    stock = _stock_error(lambda: F.linear_cross_entropy(s["h"], s["w"], s["t"], **s["kw"]))
    first = min(pair, key=lambda n: MISTAKES[n][0])
    with pytest.raises(safeloss.SafeLossError, match=MISTAKES[first][2]) as e:
        safeloss.linear_cross_entropy(s["h"], s["w"], s["t"], **s["kw"], **extras, backend=backend)
    assert isinstance(e.value, type(stock)), (type(e.value).__mro__, repr(stock))


@pytest.mark.parametrize("first", [n for n in MISTAKES if n != "ls_range"])
def test_each_mistake_alone_is_stock_class(first: str) -> None:
    """The messages the pairs match on, one mistake at a time (the pairs' reference)."""
    s = _call((first,))
    stock = _stock_error(lambda: F.linear_cross_entropy(s["h"], s["w"], s["t"], **s["kw"]))
    with pytest.raises(safeloss.SafeLossError, match=MISTAKES[first][2]) as e:
        safeloss.linear_cross_entropy(s["h"], s["w"], s["t"], **s["kw"], backend="torch")
    assert isinstance(e.value, type(stock))


# The module: the constructor's ignore_index and the attributes set after it (reduction,
# label_smoothing), with a mistake in the forward's arguments.
MODULE_CASES = {
    "ignore_index-type+input_dim": (dict(ignore_index="a"), {}, lambda: (torch.randn(1, 2, 4), torch.tensor([0, 2])),
                                    r"expects the input as \(N, H\) or \(H,\), got a 3-D input"),
    "ignore_index-type+ls_range": (dict(ignore_index="a"), dict(label_smoothing=1.5),
                                   lambda: (torch.randn(2, 4), torch.tensor([0, 5])),
                                   r"ignore_index must be an int or None, got 'a'"),
    "ignore_index-int64+ls_range": (dict(ignore_index=2**63), dict(label_smoothing=1.5),
                                    lambda: (torch.randn(2, 4), torch.tensor([0, 2, 1])),
                                    r"ignore_index=9223372036854775808 does not fit int64"),
    "reduction+target_list": ({}, dict(reduction="avg"), lambda: (torch.randn(2, 4), [0, 2]),
                              r"expects the target to be a torch\.Tensor, got list"),
    "prob_ii+ls_type": (dict(ignore_index=0), dict(label_smoothing="a"),
                        lambda: (torch.randn(2, 4), torch.rand(2, 3).softmax(1)),
                        r"cannot be used with probability targets"),
    "reduction+hidden": ({}, dict(reduction="avg"), lambda: (torch.randn(2, 5), torch.tensor([0, 2])),
                         r"the input's feature size 5 does not match linear_weight's 4"),
}


@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_module_two_mistakes_raise_stock_class(case: str, z_loss: float) -> None:
    ctor, after, inputs, match = MODULE_CASES[case]
    x, t = inputs()
    stock_m = torch.nn.LinearCrossEntropyLoss(4, 3, **ctor)
    ours = safeloss.SafeLinearCrossEntropyLoss(4, 3, **ctor, backend="torch", z_loss=z_loss)
    for k, v in after.items():
        setattr(stock_m, k, v)
        setattr(ours, k, v)
    stock = _stock_error(lambda: stock_m(x, t))
    with pytest.raises(safeloss.SafeLossError, match=match) as e:
        ours(x, t)
    assert isinstance(e.value, type(stock)), (type(e.value).__mro__, repr(stock))

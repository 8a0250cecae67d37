"""Probability (soft) and float one-hot targets, attacked: special values, dtypes, layouts, messages.

Each class of input runs through every op that takes probability targets: ``cross_entropy`` on
the torch and the Triton backend (interpreter on CPU, tiny shapes), ``linear_cross_entropy`` on
both, and the extras path (``z_loss``). What a finding says must be true of the tensor passed:
the counts, the values named (minimum, row sums), the positions and the cause of a NaN loss.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import safeloss
from safeloss import SafeLossWarning
from safeloss.core.checks import PROB_SCAN_AMIN_NUMEL, prob_target_counts, scan_prob_target
from tests.tolerances import assert_matches

H = 4  # hidden size of the linear_cross_entropy cases


def _ce(backend: str, **kw: object) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def call(y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return safeloss.cross_entropy(logits, y, backend=backend, **kw)  # type: ignore[arg-type]
    return call


def _lce(backend: str, **kw: object) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def call(y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        # Logits = h @ W.T exactly: W is the identity on the first C columns of h (C <= H).
        n, c = logits.shape[0], logits.shape[1]
        h = torch.zeros(n, max(H, c), dtype=logits.dtype)
        h[:, :c] = logits
        w = torch.eye(c, max(H, c), dtype=logits.dtype)
        return safeloss.linear_cross_entropy(h, w, y, backend=backend, **kw)  # type: ignore[arg-type]
    return call


# Every 2-D path that reports probability-target findings.
OPS = {
    "ce-torch": _ce("torch"),
    "ce-triton": _ce("triton"),
    "ce-zloss": _ce("torch", z_loss=1e-4),
    "lce-torch": _lce("torch"),
    "lce-triton": _lce("triton"),
    "lce-zloss": _lce("torch", z_loss=1e-4),
}


def warned(fn: Callable[..., torch.Tensor], *args: object) -> tuple[torch.Tensor, list[str]]:
    safeloss.reset_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args)
    return out, [str(c.message) for c in caught if issubclass(c.category, SafeLossWarning)]


def _prob_msg(msgs: list[str]) -> str:
    found = [m for m in msgs if "not probability distributions" in m]
    assert len(found) == 1, msgs
    return found[0]


def _rows(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


GOOD = [0.25, 0.25, 0.5, 0.0]


# ------------------------------------------------------------------------ the values a finding names


@pytest.mark.parametrize("op", OPS)
def test_minus_inf_entry_is_the_minimum_named(op: str) -> None:
    """A -inf entry is a negative entry: the minimum named is -inf, never the smallest finite
    entry (which may be 0 or positive: "negative entries (min 0.02)" was printed)."""
    y = _rows(GOOD, [-math.inf, 0.5, 0.5, 0.25], [0.1, 0.2, 0.3, 0.4])
    _, msgs = warned(OPS[op], y, torch.randn(3, 4))
    msg = _prob_msg(msgs)
    assert re.search(r"1 row with negative entries \(min -inf\)", msg), msg


@pytest.mark.parametrize("op", OPS)
def test_row_sums_named_are_those_of_the_bad_rows(op: str) -> None:
    """The sums quoted are the sums of the rows that do not sum to 1, not the range over every
    row (which named 1, a good row's sum, as if it were a bad one)."""
    y = _rows(GOOD, [2.0, 1.0, 0.5, 0.5], GOOD)
    _, msgs = warned(OPS[op], y, torch.randn(3, 4))
    assert re.search(r"1 row not summing to 1 \(row sum 4\) of 3", _prob_msg(msgs)), msgs
    y = _rows([0.1, 0.1, 0.2, 0.1], GOOD, [2.0, 1.0, 0.0, 0.0], GOOD)
    _, msgs = warned(OPS[op], y, torch.randn(4, 4))
    assert re.search(r"2 rows not summing to 1 \(row sums from 0\.5 to 3\) of 4", _prob_msg(msgs)), msgs


@pytest.mark.parametrize("op", OPS)
def test_positions_of_bad_rows_are_named(op: str) -> None:
    """Which rows are wrong, per kind (the house rule: offending positions are named)."""
    y = _rows(GOOD, GOOD, [-0.2, 0.6, 0.6, 0.0], [0.5, 0.5, 0.5, 0.0], [math.nan, 0.5, 0.5, 0.0],
              [0.3, 0.3, 0.3, 0.3])
    _, msgs = warned(OPS[op], y, torch.randn(6, 4))
    msg = _prob_msg(msgs)
    assert "1 row with negative entries (min -0.2)" in msg, msg
    assert "2 rows not summing to 1 (row sums from 1.2 to 1.5)" in msg, msg
    assert re.search(r"\n  first rows: with negative entries \[2\]; with NaN or inf \[4\]; "
                     r"not summing to 1 \[3\] and \[5\]\n", msg), msg


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind", ["multi-hot", "no-class", "counts"])
def test_the_kind_of_target_named_is_what_the_values_show(op: str, kind: str) -> None:
    """Float rows of 0s and 1s marking several classes (or none) are a multi-label target: the
    hint names BCEWithLogitsLoss, as it does for integer multi-hot targets (it said "counts or
    unnormalized scores"); a row with a 2 keeps the counts hint."""
    onehot = [0.0, 1.0, 0.0, 0.0]
    bad = {"multi-hot": [1.0, 0.0, 1.0, 1.0], "no-class": [0.0, 0.0, 0.0, 0.0],
           "counts": [2.0, 0.0, 1.0, 0.0]}[kind]
    _, msgs = warned(OPS[op], _rows(onehot, bad, onehot), torch.randn(3, 4))
    msg = _prob_msg(msgs)
    if kind == "counts":
        assert "look like counts or unnormalized scores" in msg and "multi-hot" not in msg, msg
    else:
        assert re.search(r"Every entry is 0 or 1, and some rows mark several classes \(or none\): a "
                         r"multi-hot, multi-label target(?s:.*)\nFix: torch\.nn\.BCEWithLogitsLoss\(\)", msg), msg
        assert "counts" not in msg, msg


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_positions_of_bad_rows_in_kd_targets(backend: str) -> None:
    """(N, C, d1, d2) targets: a position is [n, i, j] (the class dim left out)."""
    y = torch.softmax(torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0)), 1)
    y[1, 0, 1, 0] = -0.5
    _, msgs = warned(_ce(backend), y, torch.randn(2, 3, 2, 2))
    msg = _prob_msg(msgs)
    assert re.search(r"first rows: with negative entries \[1, 1, 0\]; not summing to 1 \[1, 1, 0\]", msg), msg


@pytest.mark.parametrize("op", ["lce-torch", "lce-triton", "lce-zloss"])
def test_linear_nan_loss_from_nan_target_names_the_target(op: str) -> None:
    """linear_cross_entropy blamed an overflow of the logits ("every operand is finite") for a
    NaN loss whose cause is a NaN probability target."""
    y = _rows(GOOD, [math.nan, 0.5, 0.5, 0.0], GOOD)
    out, msgs = warned(OPS[op], y, torch.randn(3, 4))
    assert torch.isnan(out)
    nonfinite = [m for m in msgs if "loss is NaN or infinite" in m]
    assert len(nonfinite) == 1, msgs
    assert "every operand is finite" not in nonfinite[0], nonfinite[0]
    # the row's index on every path (the extras path gave the count alone)
    assert "the probability targets hold NaN/inf (1 row: 1)" in nonfinite[0], nonfinite[0]


# ------------------------------------------------------------------------ the host scan


_SPECIALS = {
    "-0.0": -0.0, "-nan": "-nan", "nan": math.nan, "+inf": math.inf, "-inf": -math.inf,
    "-1e-45": -1e-45, "-subnormal": -1e-40, "-tiny": -6e-8, "-1": -1.0,
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("numel", [PROB_SCAN_AMIN_NUMEL, PROB_SCAN_AMIN_NUMEL + 8])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced", "expanded", "neg-view", "kd-channels-last"])
def test_scan_counts_equal_direct_counts(dtype: torch.dtype, numel: int, layout: str) -> None:
    """The sign-bit scan (above PROB_SCAN_AMIN_NUMEL entries) and the direct form count the same
    rows, for every special value in every float dtype and layout."""
    g = torch.Generator().manual_seed(numel)
    c = 8
    for name, v in _SPECIALS.items():
        if layout == "kd-channels-last":
            y = torch.softmax(torch.randn(2, c, 16, numel // (32 * c), generator=g), 1).to(dtype)
            y = y.contiguous(memory_format=torch.channels_last)
        else:
            y = torch.softmax(torch.randn(numel // c, c, generator=g), 1).to(dtype)
        flat = y.view(-1) if y.is_contiguous() else y.permute(0, 2, 3, 1).reshape(-1)
        idx = torch.randint(0, flat.numel(), (3,), generator=g)
        if v == "-nan":
            val = -torch.tensor(math.nan, dtype=dtype).abs()  # a NaN whose sign bit is set
        else:
            val = torch.tensor(v, dtype=torch.float64).to(dtype)
        if layout == "kd-channels-last":
            y.permute(0, 2, 3, 1).view(-1)[idx] = val
        else:
            flat[idx] = val
        if layout == "transposed":
            y = y.t().contiguous().t()
        elif layout == "sliced":
            y = y[::2]
        elif layout == "expanded":
            y = y[:1].expand(y.shape[0], c)
        elif layout == "neg-view":
            # The same values through a negative-bit view (bfloat16 has no complex dtype).
            cdt = {torch.float16: torch.complex32, torch.float32: torch.complex64,
                   torch.float64: torch.complex128}.get(dtype)
            if cdt is not None:
                z = torch.zeros(y.shape, dtype=cdt)
                z.imag.copy_(-y)
                y = z.conj().imag
                assert y.is_neg() and y.dtype == dtype
        got = scan_prob_target(y, 1)
        want = tuple(int(t) for t in prob_target_counts(y, 1))
        assert got == want, (name, got, want)
        neg_rows = int((y.double() < 0).any(1).sum())
        assert got[0] == neg_rows, (name, got, neg_rows)


# ------------------------------------------------------------------------ parity with stock


def _check_parity(fn: Callable[..., torch.Tensor], ref: Callable[..., torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor, **kw: object) -> None:
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    xt, yt = x.double().requires_grad_(), y.double().requires_grad_()
    out, msgs = warned(fn, xs, ys)
    assert not msgs, msgs  # valid distributions: no finding
    want, truth = ref(xr, yr, **kw), ref(xt, yt, **kw)
    assert_matches(out, want, truth, what="loss")
    g = (torch.arange(want.numel(), dtype=torch.float64).reshape(want.shape) % 3 - 0.7)
    gs = torch.autograd.grad(out, (xs, ys), g.to(out.dtype))
    gr = torch.autograd.grad(want, (xr, yr), g.to(want.dtype))
    gt = torch.autograd.grad(truth, (xt, yt), g)
    for name, a, b, t in zip(("dx", "dy"), gs, gr, gt):
        assert_matches(a, b, t, what=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["plain-none", "smooth-weight-mean", "onehot-weight-sum", "kd-weight-mean"])
def test_values_and_gradients_match_stock(backend: str, dtype: torch.dtype, case: str) -> None:
    """Probability targets that require grad, with a non-trivial upstream gradient."""
    g = torch.Generator().manual_seed(len(case))
    kd = case.startswith("kd")
    shape = (2, 5, 3, 2) if kd else (6, 5)
    x = torch.randn(shape, generator=g).to(dtype)
    if case.startswith("onehot"):
        y = F.one_hot(torch.randint(0, 5, (6,), generator=g), 5).to(dtype)
    else:
        y = torch.softmax(torch.randn(shape, generator=g), 1).to(dtype)
    kw: dict[str, object] = {"reduction": case.split("-")[-1]}
    if "weight" in case:
        kw["weight"] = (torch.rand(5, generator=g) + 0.2).to(dtype)
    if "smooth" in case:
        kw["label_smoothing"] = 0.15

    def ref(a: torch.Tensor, b: torch.Tensor, **k: object) -> torch.Tensor:
        w = k.pop("weight", None)
        return F.cross_entropy(a, b, weight=None if w is None else w.to(a.dtype), **k)  # type: ignore[arg-type]

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return safeloss.cross_entropy(a, b, backend=backend, **kw)  # type: ignore[arg-type]

    _check_parity(fn, ref, x, y, **kw)


# ------------------------------------------------------------------------ integer one-hot targets


@pytest.mark.parametrize("rows", [2, 4, 7])
def test_integer_multihot_names_how_many_rows(rows: int) -> None:
    """An integer multi-hot target: the row count and the list of first rows agree (the list of 3
    read "[0], [1] and [2]" for 4 bad rows, as if those were all)."""
    y = torch.zeros(rows, 5, dtype=torch.int64)
    y[:, :2] = 1
    first = f"[0], [1], [2], ... ({rows} in all)" if rows > 3 else "[0] and [1]"
    with pytest.raises(safeloss.TargetDtypeError,
                       match=re.escape(f"not one-hot: {rows} rows without exactly one 1 (first at {first}).")):
        safeloss.cross_entropy(torch.randn(rows, 5), y)

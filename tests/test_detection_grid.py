"""Every safety verdict the same on every dtype and backend.

The softmax detector and the probability-target checks, over dtype x number of classes x
backend x mode, with inputs on both sides of each tolerance (safeloss/_flags.py): a row that sums
to 1 within half its tolerance must be flagged, one off by twice its tolerance must not, so a
tolerance loosened or tightened by a factor of 2 or more fails here. The Triton kernel runs
through its interpreter on CPU: shapes are tiny (4 rows), C up to 2000 covers rows of several
column blocks.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import safeloss
from safeloss import SafeLossWarning
from safeloss.backends import dispatch
from safeloss.core import _flags as F

_triton_reason = dispatch.triton_unavailable_reason(torch.device("cpu"))
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(_triton_reason is not None, reason=str(_triton_reason))),
]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SOFTMAXED = r"looks already softmaxed"
BAD_PROBS = r"are not probability distributions"


# The tolerances as specified, written out here rather than read from safeloss/_flags.py: a
# change there (a mutation, or a deliberate retune) must fail here until this table follows.
SOFTMAX_SUM_TOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
PROB_SUM_TOL = {torch.float64: 1e-2, torch.float32: 1e-2, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def _tol(table: dict[torch.dtype, float], dtype: torch.dtype) -> float:
    return table[dtype]


def _rows(n: int, C: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, generator=g, dtype=torch.float64)


def _summing_to(q: torch.Tensor, target_sum: float, dtype: torch.dtype) -> torch.Tensor:
    """Rows of distribution ``q`` (float64) scaled to sum to ``target_sum``, stored in ``dtype``."""
    return (q * (target_sum / q.sum(1, keepdim=True))).to(dtype)


def _deviation(x: torch.Tensor) -> torch.Tensor:
    """How far each stored row's sum is from 1, exactly."""
    return (x.double().sum(1) - 1).abs()


def _cases(dtype: torch.dtype, C: int) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, logits, should the softmax check fire) for one dtype and class count."""
    tol = _tol(SOFTMAX_SUM_TOL, dtype)
    q = _rows(4, C).softmax(1)
    cases = [
        ("softmaxed", q.to(dtype), True),
        # Uniform rows: a mean loss of log(C), at the edge of the band the torch path uses to skip
        # the scan, which a half-precision loss rounds past (bfloat16 at C=300: 5.71875 > 5.7095).
        ("uniform", torch.full((4, C), 1 / C, dtype=torch.float64).to(dtype), True),
        ("raw logits", _rows(4, C, seed=1).to(dtype), False),
        ("log-softmax", _rows(4, C, seed=1).log_softmax(1).to(dtype), False),
        ("sigmoid", torch.sigmoid(_rows(4, C, seed=1)).to(dtype), False),
    ]
    for sign in (1, -1):
        inside = _summing_to(q, 1 + sign * tol / 2, dtype)
        outside = _summing_to(q, 1 + sign * tol * 2, dtype)
        # The inputs must be where the test says they are, whatever the rounding to ``dtype``.
        assert (_deviation(inside) <= 0.75 * tol).all() and (_deviation(outside) >= 1.5 * tol).all()
        cases.append((f"sum 1{'+-'[sign < 0]}tol/2", inside, True))
        cases.append((f"sum 1{'+-'[sign < 0]}2tol", outside, False))
    neg = q.clone()  # one negative entry per row, its mass moved to another: the rows still sum to 1
    neg[:, 1] = q[:, 1] + q[:, 0] + 0.01
    neg[:, 0] = -0.01
    assert (_deviation(neg) < 1e-12).all()
    cases.append(("negative entry, sums to 1", neg.to(dtype), False))
    one = _rows(4, C, seed=2) * 3
    one[2] = q[2]
    cases.append(("one softmaxed row of 4", one.to(dtype), False))
    return cases


# The interpreter's share: every case at C=5 pins the kernel's tolerance on both sides; the wide
# rows run the cases that differ there (half-precision sums, several column blocks).
WIDE = {"softmaxed", "uniform", "raw logits", "sum 1+tol/2", "sum 1-2tol", "negative entry, sums to 1", "one softmaxed row of 4"}


def _verdict(x, t, backend, strict, pattern, **kw):
    """Whether a finding matching ``pattern`` is reported (raised in strict mode, else warned)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        safeloss.reset_warnings()
        try:
            safeloss.cross_entropy(x, t, backend=backend, strict=strict, **kw)
        except safeloss.SafeLossError as e:
            assert strict, f"default mode raised {e!r}"
            return bool(re.search(pattern, str(e)))
    found = [str(c.message) for c in caught if issubclass(c.category, SafeLossWarning)]
    return any(re.search(pattern, m) for m in found)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C", [5, 300, 2000])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_softmax_detection_grid(dtype, C, backend, monkeypatch):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 always runs on the torch backend")
    if backend == "triton" and C == 2000 and dtype == torch.float32:
        pytest.skip("kept out of the interpreter's share: float32 is covered at C=5 and 300")
    if backend == "triton" and C == 300:
        from safeloss.backends import triton_backend

        monkeypatch.setattr(triton_backend, "FORCE_BLOCK_C", 128)  # 3 column blocks: the early-out path
    t = torch.tensor([0, 1, 2, 3])
    for name, x, fires in _cases(dtype, C):
        if backend == "triton" and C > 5 and name not in WIDE:
            continue
        assert _verdict(x, t, backend, False, SOFTMAXED) == fires, f"default mode, {name}"
        if fires:
            with pytest.raises(safeloss.InputError, match=rf"(?s){SOFTMAXED}: all 4 rows lie in \[0, 1\] and sum to 1"):
                safeloss.cross_entropy(x, t, backend=backend, strict=True)
        elif backend == "torch" or name.endswith("2tol"):
            assert not _verdict(x, t, backend, True, SOFTMAXED), f"strict mode, {name}"


def _sampled(T: int) -> set[int]:
    return {i * T // F.SOFTMAX_SAMPLE for i in range(F.SOFTMAX_SAMPLE)}


@pytest.mark.parametrize("shape", [(100, 5), (2, 5, 40)], ids=["rows", "pixels"])
def test_softmax_sample_is_the_same_on_both_backends(shape):
    """Beyond 64 positions both backends look at the same sampled positions, so a batch whose
    unsampled positions are raw is judged alike (flagged), and a raw sampled one too (not)."""
    if _triton_reason is not None:
        pytest.skip(_triton_reason)
    n = shape[0] * (shape[2] if len(shape) == 3 else 1)
    sampled = _sampled(n)
    off, on = min(set(range(n)) - sampled), max(sampled)
    x = _rows(n, 5).softmax(1)
    raw = _rows(n, 5, seed=4) * 3
    t = torch.zeros(shape[:1] + shape[2:], dtype=torch.long)

    def layout(rows):  # positions in row-major order -> the logits' layout
        return rows if len(shape) == 2 else rows.reshape(shape[0], shape[2], 5).permute(0, 2, 1)

    for pos, fires in ((off, True), (on, False)):
        rows = x.clone()
        rows[pos] = raw[pos]
        verdicts = {b: _verdict(layout(rows).float(), t, b, False, SOFTMAXED) for b in ("torch", "triton")}
        assert verdicts == {"torch": fires, "triton": fires}, (pos, verdicts)
    with pytest.warns(SafeLossWarning, match=rf"all 64 sampled rows \(of {n}\)"):
        safeloss.cross_entropy(layout(x).float(), t, backend="triton")


# ---------------------------------------------------------------------------- probability targets


def _prob_cases(dtype: torch.dtype, C: int) -> list[tuple[str, torch.Tensor, bool]]:
    tol = _tol(PROB_SUM_TOL, dtype)
    q = _rows(4, C, seed=5).softmax(1)
    cases = [("distributions", q.to(dtype), False)]
    for sign in (1, -1):
        inside = _summing_to(q, 1 + sign * tol / 2, dtype)
        outside = _summing_to(q, 1 + sign * tol * 2, dtype)
        assert (_deviation(inside) <= 0.75 * tol).all() and (_deviation(outside) >= 1.5 * tol).all()
        cases.append((f"sum 1{'+-'[sign < 0]}tol/2", inside, False))
        cases.append((f"sum 1{'+-'[sign < 0]}2tol", outside, True))
    neg = q.clone()
    neg[1, 1] = q[1, 1] + q[1, 0] + 0.25
    neg[1, 0] = -0.25  # row 1 still sums to 1
    cases.append(("negative entry, sums to 1", neg.to(dtype), True))
    nan = q.to(dtype, copy=True)
    nan[3, 2] = float("nan")
    cases.append(("NaN entry", nan, True))
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C", [5, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_probability_target_grid(dtype, C, backend):
    x = _rows(4, C, seed=6).float()
    for name, y, fires in _prob_cases(dtype, C):
        if backend == "triton" and C > 5 and name not in ("distributions", "sum 1-2tol", "NaN entry"):
            continue
        assert _verdict(x, y, backend, False, BAD_PROBS) == fires, f"default mode, {name}"
        if fires:
            n = 4 if "tol" in name else 1
            what = "with NaN or infinite entries" if name == "NaN entry" else "with negative" if "negative" in name else "not summing to 1"
            with pytest.raises(safeloss.ProbabilityTargetError, match=rf"(?s){BAD_PROBS}: {n} rows? {what}"):
                safeloss.cross_entropy(x, y, backend=backend, strict=True)
        elif backend == "torch" or C == 5:
            assert not _verdict(x, y, backend, True, BAD_PROBS), f"strict mode, {name}"

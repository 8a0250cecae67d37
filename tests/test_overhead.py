"""The hot-path shortcuts (safeloss/pipeline.py, validation.py, checks.py, the torch backend)
return exactly what the general code they skip returns."""

from __future__ import annotations

import math

import pytest
import torch

from safeloss.backends import torch_backend
from safeloss.core import checks

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _targets(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Probability-like targets with every kind of row the counts must tell apart."""
    g = torch.Generator().manual_seed(0)
    y = torch.rand(shape, generator=g).softmax(1 if len(shape) > 1 else 0).to(dtype)
    if len(shape) == 1:
        return y
    special = [
        (0, 0, -0.5),  # negative, row no longer sums to 1
        (1, 0, -0.0),  # negative zero: not negative
        (2, 0, math.nan),  # NaN only
        (3, 0, math.nan), (3, 1, -1.0),  # NaN and a negative entry: amin is NaN here
        (4, 0, -math.inf),
        (5, 0, math.inf),
        (6, 0, -1e-30),  # tiny negative, sum unchanged
        (7, 0, 2.0),  # bad sum only
        (8, 0, -math.nan),  # a NaN with its sign bit set: not negative (its sum is bad)
        (9, 0, -0.0), (9, 1, -0.0),  # only negative zeros: not negative
    ]
    for r, c, v in special:
        if r < shape[0]:
            y[(r, c) + (0,) * (len(shape) - 2)] = v
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(16, 5), (2000, 7), (600, 5, 3), (7,), (5000,)])
def test_host_prob_scan_counts_as_the_device_counts(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    y = _targets(dtype, shape)
    cdim = 0 if y.dim() == 1 else 1
    neg, badsum = checks.prob_target_counts(y, cdim)
    assert checks.scan_prob_target(y, cdim) == (int(neg), int(badsum))
    if y.dim() > 1:  # rows 0, 3 (with a NaN), 4, 6 are negative; -1e-30 is -0.0 in float16
        assert int(neg) == (3 if dtype == torch.float16 else 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_host_prob_scan_takes_the_sign_bit_path_above_the_threshold(dtype: torch.dtype) -> None:
    y = _targets(dtype, (2000, 7))
    assert y.numel() > checks.PROB_SCAN_AMIN_NUMEL
    # negative: rows 0, 3, 4, 6 (-1e-30 is -0.0 in float16); bad sums: 0, 1, 4, 5, 6, 7 and the
    # three NaN-sum rows (a NaN sum is "not summing to 1", as in the kernel), and row 9, whose
    # -0.0 entries replaced mass but are not negative
    neg = 3 if dtype == torch.float16 else 4
    assert checks.scan_prob_target(y, 1) == (neg, 10)
    # Clean rows with their sign bits clear take no exact pass.
    clean = y[10:]
    assert checks.scan_prob_target(clean, 1) == (0, 0)
    assert checks.scan_prob_target(clean.transpose(0, 1).contiguous().transpose(0, 1), 1) == (0, 0)


@pytest.mark.parametrize("layout", ["transposed", "expanded", "negative-view", "3d", "1d"])
def test_host_prob_scan_counts_any_layout_above_the_threshold(layout: str) -> None:
    """Strided, expanded and negative-bit views (``z.conj().imag``, whose bits are not its
    values) give the device counts too."""
    y = _targets(torch.float32, (2000, 7))
    cdim = 1
    if layout == "transposed":
        y = y.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "expanded":
        y = y[:1].expand(2000, 7)
    elif layout == "negative-view":
        y = torch.complex(torch.zeros_like(y), -y).conj().imag
        assert y.is_neg()
    elif layout == "3d":
        y = y.reshape(1000, 2, 7).transpose(1, 2)
    else:
        y, cdim = y.reshape(-1), 0
    assert y.numel() > checks.PROB_SCAN_AMIN_NUMEL
    neg, badsum = checks.prob_target_counts(y, cdim)
    assert checks.scan_prob_target(y, cdim) == (int(neg), int(badsum))
    assert int(neg) > 0


@pytest.mark.parametrize("C", [2, 3, 10, 1000, 128256])
def test_softmax_band_matches_the_formula(C: int) -> None:
    from safeloss.core.validation import normalize

    x = torch.zeros(2, C)
    p = normalize(x, torch.zeros(2, dtype=torch.long), None, -100, "mean", 0.0)
    lo, hi = math.log1p((C - 1) / math.e), math.log(C - 1 + math.e)
    # float32: the row-sum tolerance 1e-4, 8 ulps of rounding of the loss, and 1e-3 of slack
    margin = 1e-4 + 8 * 2.0**-23 * hi + 1e-3
    lo, hi = lo - margin, hi + margin
    for v in (lo, hi, (lo + hi) / 2):
        assert torch_backend._could_be_softmaxed(v, p)
    for v in (math.nextafter(lo, -math.inf), math.nextafter(hi, math.inf), 0.0, math.inf):
        assert not torch_backend._could_be_softmaxed(v, p)


def test_repeated_warnings_are_not_rebuilt(monkeypatch: pytest.MonkeyPatch) -> None:
    """A warning already shown is dropped by report(); resolve() no longer builds its message
    (host reads of the targets) first. Strict mode raises, and so builds, every time."""
    import safeloss
    from safeloss.core.errors import ProbabilityTargetError

    built = []
    real = checks.prob_target_finding
    monkeypatch.setattr(checks, "prob_target_finding", lambda *a: built.append(1) or real(*a))
    x, y = torch.randn(4, 3), torch.rand(4, 3)  # rows do not sum to 1
    loss = safeloss.SafeCrossEntropyLoss()
    with pytest.warns(safeloss.SafeLossWarning, match="not probability distributions"):
        loss(x, y)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            loss(x, y)
    assert len(built) == 1
    with pytest.warns(safeloss.SafeLossWarning, match="not probability distributions"):
        safeloss.SafeCrossEntropyLoss()(x, y)  # a new instance: shown (and built) again
    assert len(built) == 2
    strict = safeloss.SafeCrossEntropyLoss(strict=True)
    for _ in range(2):
        with pytest.raises(ProbabilityTargetError, match="not probability distributions"):
            strict(x, y)
    assert len(built) == 4


def test_functional_warnings_are_rebuilt_per_call_site() -> None:
    import warnings

    import safeloss

    safeloss.reset_warnings()
    x, y = torch.randn(4, 3), torch.rand(4, 3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(2):
            safeloss.cross_entropy(x, y)  # one call site: one warning
        safeloss.cross_entropy(x, y)  # another line: another warning
    assert [str(m.message).count("not probability distributions") for m in w] == [1, 1]


def test_resolve_guards_name_the_kinds_of_the_findings() -> None:
    """resolve() asks report.shown() by kind before building: the kinds it asks for are the
    kinds the finding constructors give."""
    import inspect

    from safeloss.core.validation import normalize

    src = inspect.getsource(checks.resolve)
    p = normalize(torch.randn(2, 3), torch.rand(2, 3), None, -100, "mean", 0.0)
    from safeloss.core.validation import negative_weight_finding

    # One guard per finding built in resolve(): the overflow kind twice (per position, and
    # of the reduced value).
    kinds = [
        checks.softmax_finding(1, 1, 3, 2).kind,
        checks.prob_target_finding(p, 1, 1).kind,
        negative_weight_finding([0], 1).kind,
        checks.nonfinite_finding(p, None, 1, True).kind,
        checks.overflow_finding(p, 1, "", None, stock_values=False).kind,
        checks.empty_mean_finding(p).kind,
        checks.reduction_overflow_finding(p, None).kind,
    ]
    for kind in kinds:
        assert f'_wanted("{kind}"' in src, kind
    assert src.count("_wanted(") == len(kinds)

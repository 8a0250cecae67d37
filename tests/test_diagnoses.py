"""Every diagnosis true: each message says what the inputs show, on both backends, in the call
itself (CPU) and when read back later (the deferred model of CUDA default mode).

Float16 overflow is reported as an overflow (not as an empty batch, not silently under "sum"),
NaN in probability targets is blamed on the targets, zero classes on the zero classes, a weight
changed without a version bump is still checked, and each message says which value is returned.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import safeloss
from safeloss import SafeLossWarning
from safeloss.core import validation
from tests.test_differential import CPU_BACKENDS
from tests.tolerances import assert_matches


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def deferred(monkeypatch):
    monkeypatch.setattr(safeloss.core.checks, "DEFER_ON_CPU", True)
    yield
    safeloss.core.checks._pending.clear()


def warned(fn, *args, **kw):
    """(result, SafeLossWarning messages) of one call."""
    safeloss.reset_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    return out, [str(c.message) for c in caught if issubclass(c.category, SafeLossWarning)]


def pending() -> list[str]:
    """What the deferred checks report when flushed."""
    _, msgs = warned(safeloss.check_pending)
    return msgs


# ------------------------------------------------------------------------ float16 overflow

# Row 0's loss is 120000 (logits 60000 and -60000 apart): finite in fp32, inf in float16.
X16 = torch.tensor([[60000.0, -60000.0, 0.0], [1.0, 2.0, 3.0]], dtype=torch.float16)
T16 = torch.tensor([1, 0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float16_overflow_is_named_in_every_reduction(backend, reduction):
    stock = F.cross_entropy(X16, T16, reduction=reduction)
    with pytest.raises(safeloss.NonFiniteError, match=r"(?s)the float16 loss overflowed at 1 of 2 positions \(first at \[0\]\): the inputs are finite, but a loss above 65504") as e:
        safeloss.cross_entropy(X16, T16, reduction=reduction, backend=backend, strict=True)
    assert not isinstance(e.value, safeloss.EmptyBatchError)
    assert "ignore_index" not in str(e.value)
    out, msgs = warned(safeloss.cross_entropy, X16, T16, reduction=reduction, backend=backend)
    assert len(msgs) == 1 and "the float16 loss overflowed" in msgs[0], msgs
    # inf where stock's is inf (the kernel computes in fp32, but the float16 result cannot hold
    # these losses, nor their sum, which a float16 mean holds before dividing); the message says so
    assert torch.equal(torch.isinf(out), torch.isinf(stock))
    if backend == "torch":
        said = r"returns stock torch's values" + ("" if reduction == "none" else f", so the {reduction} is inf too")
    elif reduction == "none":
        said = r"safeloss computes in float32, but the result is float16 \(as stock torch's\), so these positions are inf"
    else:
        said = rf"The {reduction} is inf, as with stock torch\."
    assert re.search(said, msgs[0]), msgs[0]


def test_float16_sum_overflow_with_finite_positions(backend):
    """Each position's loss fits float16, their sum does not: stock returns inf without a word."""
    x = torch.zeros(4, 3, dtype=torch.float16)
    x[:, 0] = 30000.0
    t = torch.tensor([1, 1, 1, 1])  # loss 30000 each, 120000 in all
    assert torch.isinf(F.cross_entropy(x, t, reduction="sum"))
    with pytest.raises(safeloss.NonFiniteError, match=r'(?s)reduction="sum" overflowed float16: each of the 4 per-position losses is finite, but their sum, 120000, is above 65504.*inf \(stock torch returns inf too\)'):
        safeloss.cross_entropy(x, t, reduction="sum", backend=backend, strict=True)
    out, msgs = warned(safeloss.cross_entropy, x, t, reduction="sum", backend=backend)
    assert torch.isinf(out) and len(msgs) == 1 and "their sum, 120000, is above 65504" in msgs[0], msgs
    # Their mean fits, but stock torch holds the sum in float16 first: inf, and so does safeloss.
    assert torch.isinf(F.cross_entropy(x, t))
    with pytest.raises(safeloss.NonFiniteError, match=r'(?s)reduction="mean" overflowed float16: each of the 4 per-position losses is finite, but their sum, 120000, is above 65504, the largest float16 value \(stock torch holds the sum in float16 before dividing, and so does safeloss\)'):
        safeloss.cross_entropy(x, t, backend=backend, strict=True)
    out, msgs = warned(safeloss.cross_entropy, x, t, backend=backend)
    assert torch.isinf(out) and len(msgs) == 1


def test_float16_overflow_deferred(deferred, backend):
    """Read back a call later (CUDA default mode), the same diagnosis, with the same value."""
    out = safeloss.cross_entropy(X16, T16, backend=backend)
    msgs = pending()
    assert len(msgs) == 1, msgs
    if backend == "triton":
        assert re.search(r"float16 loss overflowed at 1 of 2 positions \(first at \[0\]\)", msgs[0]), msgs[0]
        assert torch.isinf(out) and "The mean is inf, as with stock torch." in msgs[0], msgs[0]
    else:  # the torch path cannot read the logits later: it names every possible cause
        assert re.search(r"because the logits hold NaN or infinite values, or the float16 loss overflowed", msgs[0]), msgs[0]


def test_autocast_computes_in_float32_no_overflow(backend):
    with torch.autocast("cpu", dtype=torch.float16):
        out, msgs = warned(safeloss.cross_entropy, X16, T16, backend=backend)
        stock = F.cross_entropy(X16, T16)
    assert not msgs and out.dtype == torch.float32
    assert_matches(out, stock)


# ------------------------------------------------------------------------ NaN probability targets


def _nan_targets():
    y = torch.tensor([[0.5, 0.5, 0.0], [float("nan"), 0.5, 0.5]])
    return torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), y


def test_nan_probability_target_is_named(backend):
    x, y = _nan_targets()
    with pytest.raises(safeloss.ProbabilityTargetError, match=r"(?s)not probability distributions: 1 row with NaN or infinite entries of 2\.\n  first rows: with NaN or inf \[1\]\nNaN or inf entries make the loss of their rows NaN.*torch.isfinite\(target\)"):
        safeloss.cross_entropy(x, y, backend=backend, strict=True)
    out, msgs = warned(safeloss.cross_entropy, x, y, backend=backend)
    assert torch.isnan(out)
    assert len(msgs) == 2, msgs
    assert "1 row with NaN or infinite entries" in msgs[0]
    assert re.search(r"because the probability targets hold NaN or infinite values \(1 row\)\.", msgs[1]), msgs[1]
    for m in msgs:
        assert "loss overflowed" not in m and "class weight" not in m, m


def test_nan_probability_target_deferred(deferred, backend):
    x, y = _nan_targets()
    safeloss.cross_entropy(x, y, backend=backend)
    msgs = pending()
    assert any("1 row not summing to 1 (or holding NaN or inf)" in m for m in msgs), msgs
    assert any(re.search(r"because the logits or the probability targets hold NaN or infinite values\.", m) for m in msgs), msgs


def test_nan_and_unnormalized_targets_are_told_apart():
    x = torch.randn(3, 3)
    y = torch.tensor([[0.5, 0.5, 0.0], [float("nan"), 0.5, 0.5], [2.0, 1.0, 1.0]])
    with pytest.raises(safeloss.ProbabilityTargetError, match=r"1 row with NaN or infinite entries and 1 row not summing to 1 \(row sum 4\) of 3\.\n  first rows: with NaN or inf \[1\]; not summing to 1 \[2\]\n"):
        safeloss.cross_entropy(x, y, strict=True)


# ------------------------------------------------------------------------ zero classes


@pytest.mark.parametrize("case", ["all-ignored", "probabilities", "one-sample"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_classes_say_so(backend, case, reduction):
    x = torch.randn(4, 0) if case != "one-sample" else torch.randn(0)
    t = {"all-ignored": torch.full((4,), -100), "probabilities": torch.randn(4, 0), "one-sample": torch.randn(0)}[case]
    stock = F.cross_entropy(x, t, reduction=reduction)
    dim = 0 if case == "one-sample" else 1
    with pytest.raises(safeloss.InputError, match=rf"got logits with no classes \(input shape {re.escape(str(tuple(x.shape)))}: the class dimension, dim {dim}, has size 0\)"):
        safeloss.cross_entropy(x, t, reduction=reduction, backend=backend, strict=True)
    out, msgs = warned(safeloss.cross_entropy, x, t, reduction=reduction, backend=backend)
    assert len(msgs) == 1 and "no classes" in msgs[0], msgs
    assert "ignore_index" not in msgs[0] and "summing" not in msgs[0]
    assert_matches(out, stock)


def test_zero_classes_with_labels_is_an_index_error(backend):
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)class range: the logits have 0 classes, so no label is in range\..*no classes at all"):
        safeloss.cross_entropy(torch.randn(4, 0), torch.zeros(4, dtype=torch.long), backend=backend)


# ------------------------------------------------------------------------ the class weight


def test_weight_changed_through_data_is_checked_again(backend):
    """``.data`` writes bump no version counter; the weight is still read every call on CPU."""
    x, t = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    w = torch.ones(5)
    safeloss.cross_entropy(x, t, w, backend=backend, strict=True)
    version = w._version
    w.data[2] = -1.0
    assert w._version == version  # the case in point
    with pytest.raises(safeloss.WeightError, match=r"weight has 1 negative entry \(classes 2\)"):
        safeloss.cross_entropy(x, t, w, backend=backend, strict=True)
    _, msgs = warned(safeloss.cross_entropy, x, t, w, backend=backend)
    assert len(msgs) == 1 and "1 negative entry (classes 2)" in msgs[0], msgs


@pytest.fixture
def stale_weight_cache(monkeypatch):
    """What the per-version cache of a CUDA weight says after a ``.data`` write: nothing."""
    monkeypatch.setattr(validation, "_negative_classes", lambda weight: [])


def test_negative_weight_counted_by_the_kernel(stale_weight_cache):
    if dict((p.values[0], p.marks) for p in CPU_BACKENDS)["triton"]:
        from safeloss.backends import dispatch

        if dispatch.triton_unavailable_reason(torch.device("cpu")) is not None:
            pytest.skip("the Triton backend cannot run on CPU tensors here")
    x, t = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    w = torch.tensor([1.0, 1.0, -1.0, 1.0, -0.5])
    with pytest.raises(safeloss.WeightError, match=r"weight has 2 negative entries \(classes 2 and 4\)"):
        safeloss.cross_entropy(x, t, w, backend="triton", strict=True)


def test_negative_weight_counted_on_the_device_deferred(stale_weight_cache, deferred, backend):
    x, t = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    w = torch.tensor([1.0, 1.0, -1.0, 1.0, 1.0])
    safeloss.cross_entropy(x, t, w, backend=backend)
    msgs = pending()
    assert len(msgs) == 1 and "weight has 1 negative entry (classes 2)" in msgs[0], msgs


# ------------------------------------------------------------------------ empty means


def test_all_ignored_says_gradients_are_zero(backend):
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(safeloss.EmptyBatchError, match=r"(?s)all 3 targets equal ignore_index=-100.*Gradients are zero"):
        safeloss.cross_entropy(x, torch.full((3,), -100), backend=backend, strict=True)


def test_zero_weight_says_gradients_are_nan(backend):
    """Stock's gradient is NaN there (0/0): the message must not call it zero."""
    x = torch.randn(3, 4, requires_grad=True)
    t, w = torch.tensor([0, -100, 0]), torch.tensor([0.0, 1.0, 1.0, 1.0])
    F.cross_entropy(x, t, w).backward()
    assert torch.isnan(x.grad).any()
    with pytest.raises(safeloss.EmptyBatchError, match=r"(?s)all 2 targets that are not ignore_index=-100 have class weight 0 \(class 0\).*gradients are NaN too") as e:
        safeloss.cross_entropy(x, t, w, backend=backend, strict=True)
    assert "Gradients are zero" not in str(e.value)


def test_one_target_with_zero_weight(backend):
    with pytest.raises(safeloss.EmptyBatchError, match=r"the one target that is not ignore_index=-100 has class weight 0 \(class 1\)"):
        safeloss.cross_entropy(torch.randn(2, 3), torch.tensor([1, -100]), torch.tensor([1.0, 0.0, 1.0]), backend=backend, strict=True)


def test_weighted_mean_overflow_is_not_called_empty(backend):
    """Tiny weights: each weighted loss fits float16, the weighted mean (sum / sum of weights)
    does not. That is an overflow, not 'nothing to average'."""
    x = torch.zeros(2, 3, dtype=torch.float16)
    x[:, 0], x[:, 1] = 60000.0, -60000.0  # each position's loss 120000 before its weight 1e-3
    t = torch.tensor([1, 1])
    w = torch.tensor([1.0, 1e-3, 1.0], dtype=torch.float16)
    if backend == "torch":
        pytest.skip("stock torch computes the unweighted loss in float16 first: an ordinary overflow there")
    with pytest.raises(safeloss.NonFiniteError, match=r'(?s)reduction="mean" overflowed float16.*their weighted mean \(their sum, 240\.\d+, divided by the sum of the targets\' class weights\) is above 65504.*tiny class weights') as e:
        safeloss.cross_entropy(x, t, w, backend=backend, strict=True)
    assert "ignore_index" not in str(e.value)


# ------------------------------------------------------------------------ out-of-range labels


def test_single_output_with_negative_labels_only(backend):
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)bad values: -1 at \[1\].*Every bad value is -1, which looks like padding") as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the single-output warning comes first
        safeloss.cross_entropy(torch.randn(3, 1), torch.tensor([0, -1, 0]), backend=backend)
    assert "more than one class" not in str(e.value)


def test_far_out_of_range_labels_are_not_called_missing_classes(backend):
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)bad values: 4607182418800017408 at \[2\].*far beyond the model's 5 outputs.*torch.empty") as e:
        safeloss.cross_entropy(torch.randn(4, 5), torch.tensor([0, 1, 4607182418800017408, 2]), backend=backend)
    assert "outputs (e.g. nn.Linear" not in str(e.value)

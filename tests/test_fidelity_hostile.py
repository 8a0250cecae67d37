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
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safeloss
from safeloss.backends import dispatch
from safeloss.core import plan as plans
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


# ---------------------------------------------------- K-dimensional logits with no classes (C = 0)
# Stock runs 3-D and 5-D+ logits as 4-D, a reshape that cannot keep the positions of an empty
# class dimension: any class-index target with positions fails with a RuntimeError ("size
# mismatch"). safeloss let stock's bare RuntimeError through (all targets ignored) or raised
# TargetOutOfRangeError, an IndexError (any other label).
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 0, 3), (2, 0, 1), (1, 0, 2, 1, 2)], ids=str)
@pytest.mark.parametrize("fill", [0, -100])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_kd_logits_without_classes_raise_stocks_class(shape, fill, label_smoothing, backend) -> None:
    x = torch.randn(shape)
    t = torch.full(shape[:1] + shape[2:], fill)
    stock = _stock_error(lambda: F.cross_entropy(x, t, label_smoothing=label_smoothing))
    assert type(stock) is RuntimeError
    with pytest.raises(safeloss.InputError, match=rf"logits with no classes \(input shape {re.escape(str(shape))}.*"
                       r"stock torch fails on \d-D logits with an empty class dimension") as e:
        safeloss.cross_entropy(x, t, label_smoothing=label_smoothing, backend=backend)
    assert isinstance(e.value, RuntimeError)
    if len(shape) == 3 and label_smoothing == 0.0:
        # linear_cross_entropy with a K-dimensional head of no classes: stock's reference path
        h, w = torch.randn(shape[0], 2), torch.randn(0, shape[2], 2)
        assert type(_stock_error(lambda: F.linear_cross_entropy(h, w, t))) is RuntimeError
        with pytest.raises(safeloss.InputError, match=r"linear_cross_entropy got logits with no classes") as e:
            safeloss.linear_cross_entropy(h, w, t, backend=backend)
        assert isinstance(e.value, RuntimeError)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 0, 4, 3), (0, 0, 3), (2, 0, 0), (2, 3, 0, 2, 0)], ids=str)
def test_kd_logits_with_empty_classes_or_positions_stock_accepts(shape, backend) -> None:
    """4-D logits run as they are, and no positions at all pass stock's reshape: stock's values."""
    x = torch.randn(shape)
    t = torch.full(shape[:1] + shape[2:], -100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", safeloss.SafeLossWarning)  # no classes / nothing to average
        for reduction in ("mean", "sum", "none"):
            want = F.cross_entropy(x, t, reduction=reduction)
            got = safeloss.cross_entropy(x, t, reduction=reduction, backend=backend)
            torch.testing.assert_close(got, want, equal_nan=True)


# ------------------------------------------- a (1,) target for unbatched logits, with smoothing
# Stock takes a (1,) target for (C,) logits as the 0-d target (safeloss too), except with label
# smoothing, where it raises "output with shape [] doesn't match the broadcast shape [1]" (a
# RuntimeError); safeloss returned a value there. (Without smoothing stock's own backward fails
# with "size mismatch"; safeloss gives the 0-d target's gradient: documented, not changed.)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_one_element_target_for_unbatched_logits_with_smoothing(backend: str, reduction: str) -> None:
    x, t = torch.randn(4), torch.tensor([1])
    assert type(_stock_error(lambda: F.cross_entropy(x, t, label_smoothing=0.1, reduction=reduction))) is RuntimeError
    with pytest.raises(safeloss.TargetShapeError, match=r"(?s)target of shape \(1,\) for unbatched logits of shape \(4,\) "
                       r"with label_smoothing=0\.1.*Fix: target\.reshape\(\(\)\)") as e:
        safeloss.cross_entropy(x, t, label_smoothing=0.1, reduction=reduction, backend=backend)
    assert isinstance(e.value, RuntimeError)
    h, w = torch.randn(3), torch.randn(4, 3)
    assert type(_stock_error(lambda: F.linear_cross_entropy(h, w, t, label_smoothing=0.1))) is RuntimeError
    with pytest.raises(safeloss.TargetShapeError, match=r"target of shape \(1,\) for unbatched") as e:
        safeloss.linear_cross_entropy(h, w, t, label_smoothing=0.1, backend=backend)
    assert isinstance(e.value, RuntimeError)
    # Without smoothing: stock's forward value, silently (and a gradient, where stock's backward fails).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = safeloss.cross_entropy(x, t, reduction=reduction, backend=backend)
    torch.testing.assert_close(got, F.cross_entropy(x, t, reduction=reduction))


# ------------------------------------------------------- odd layouts and the planned call, fuzzed
# No bug found by these (h15 ran each for thousands of examples); they keep the classes covered:
# strided, transposed, expanded (stride 0), storage-offset and channels-last logits, targets and
# weights, K-dimensional shapes with dims of 0 and 1, N = 0, C = 1, half dtypes.
def _relayout(t: torch.Tensor, kind: str, d: int) -> torch.Tensor:
    """The same values (``expand``: the first slice repeated) in another memory layout."""
    if t.dim() == 0 or kind == "contiguous":
        return t
    shape = t.shape
    if kind == "permuted" and t.dim() >= 2:
        p = list(range(t.dim()))[::-1]
        return t.permute(p).contiguous().permute(p)
    if kind == "step":
        big = torch.zeros(*shape[:-1], shape[-1] * 2, dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if kind == "offset":
        flat = torch.zeros(t.numel() + 3, dtype=t.dtype)
        flat[3:] = t.flatten()
        return flat[3:].view(shape)
    if kind == "expand" and shape[d % t.dim()] > 0:
        return t.narrow(d % t.dim(), 0, 1).expand(shape)
    if kind == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


LAYOUTS = ["contiguous", "permuted", "step", "offset", "expand", "channels_last"]


@st.composite
def _odd_calls(draw):
    ndim = draw(st.integers(1, 4))
    C = draw(st.integers(1, 4))
    shape = (C,) if ndim == 1 else (draw(st.integers(0, 3)), C, *[draw(st.integers(0, 2)) for _ in range(ndim - 2)])
    pos = () if ndim == 1 else shape[:1] + shape[2:]
    dt = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dt)
    kw: dict = {"reduction": draw(st.sampled_from(["mean", "sum", "none"])),
                "label_smoothing": draw(st.sampled_from([0.0, 0.1, 1.0]))}
    if draw(st.booleans()):
        t = torch.rand(shape, generator=g, dtype=torch.float64).softmax(0 if ndim == 1 else 1)
        t = t.to(draw(st.sampled_from([dt, torch.float32])))
    else:
        ii = draw(st.sampled_from([-100, -1, 0, C - 1]))
        kw["ignore_index"] = ii
        t = torch.randint(0, C, pos, generator=g)
        if t.numel() and draw(st.booleans()):
            t[(0,) * t.dim()] = ii
        if ndim == 2 and bool((t >= 0).all()):
            t = t.to(draw(st.sampled_from([torch.int64, torch.uint8])))
    if draw(st.booleans()):
        w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.1).to(dt)
        kw["weight"] = _relayout(w, draw(st.sampled_from(["contiguous", "step", "offset", "expand"])), 0)
    x = _relayout(x, draw(st.sampled_from(LAYOUTS)), draw(st.integers(0, 3)))
    t = _relayout(t, draw(st.sampled_from(LAYOUTS)), draw(st.integers(0, 3)))
    backend = draw(st.sampled_from(["torch", "triton"])) if dt != torch.float64 and _TRITON else "torch"
    return x, t, kw, backend


_TRITON = dispatch.triton_unavailable_reason(torch.device("cpu")) is None  # the interpreter runs


def _run(fn, x: torch.Tensor, t: torch.Tensor, kw: dict):
    """(result or the exception, grad of x, grad of t), on fresh leaves."""
    x = x.detach().requires_grad_()
    t = t.detach().requires_grad_() if t.is_floating_point() else t
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = fn(x, t, **kw)
        except Exception as e:  # compared with stock's
            return e, None, None
        if out.requires_grad:
            out.float().sum().backward()
    return out.detach(), x.grad, t.grad if t.is_floating_point() else None


def _same(a, b, dtype: torch.dtype) -> None:
    tol = 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    if a is None or b is None:
        assert a is b, (a, b)
        return
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True)


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(_odd_calls())
def test_odd_layouts_and_shapes_are_stock(call) -> None:
    x, t, kw, backend = call
    want = _run(F.cross_entropy, x, t, kw)
    got = _run(lambda *a, **k: safeloss.cross_entropy(*a, backend=backend, **k), x, t, kw)
    if isinstance(want[0], Exception):
        if t.dtype == torch.uint8 and "weight" in kw and kw["label_smoothing"] and not isinstance(got[0], Exception):
            # lossless uint8 labels stock's weighted smoothing cannot gather with (README)
            assert "gather(): Expected dtype int32/int64 for index" in str(want[0])
            return
        assert isinstance(got[0], Exception), (want[0], got[0])
        if not isinstance(got[0], safeloss.SafeLossError):  # a documented conversion returns
            raise got[0]
        assert isinstance(got[0], type(want[0])), (got[0], want[0])
        return
    assert not isinstance(got[0], Exception), got[0]
    _same(got[0], want[0], x.dtype)
    # The Triton kernel gives an ignored row exactly zero gradient where stock gives NaN for its
    # non-finite logits (docs/migration.md): none here, all logits are finite.
    _same(got[1], want[1], x.dtype)
    _same(got[2], want[2], x.dtype)


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(_odd_calls(), st.data())
def test_a_planned_call_is_a_fresh_call(call, data) -> None:
    """Same signature, other values and strides: the second call (served by the plan of the
    first) raises, warns and returns exactly what the same call does with no plan."""
    x, t, kw, backend = call
    if x.numel() == 0:
        return
    bad = data.draw(st.sampled_from(["none", "nan", "softmaxed", "label", "all-ignored", "negative-weight"]))
    x2 = _relayout(x.clone().contiguous(), data.draw(st.sampled_from(LAYOUTS)), 1)
    x2 = x2.clone() if bad in ("nan", "softmaxed") else x2
    t2 = t.clone()
    kw2 = dict(kw)
    if bad == "nan":
        x2[(0,) * x2.dim()] = float("nan")
    elif bad == "softmaxed":
        x2 = x2.float().softmax(0 if x2.dim() == 1 else 1).to(x.dtype)
    elif bad == "label" and not t2.is_floating_point() and t2.numel():
        t2[(-1,) * t2.dim()] = x.shape[0 if x.dim() == 1 else 1] + (0 if t2.dtype == torch.uint8 else 5)
    elif bad == "all-ignored" and not t2.is_floating_point():
        t2 = torch.full_like(t2.long(), kw["ignore_index"]).to(t2.dtype) if kw["ignore_index"] >= 0 or t2.dtype != torch.uint8 else t2
    elif bad == "negative-weight" and "weight" in kw:
        kw2["weight"] = kw["weight"].clone()
        kw2["weight"][0] = -1.0

    def outcome():
        safeloss.reset_warnings()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = safeloss.cross_entropy(x2, t2, backend=backend, **kw2)
            except safeloss.SafeLossError as e:
                out = e
        msgs = sorted(str(w.message) for w in caught if issubclass(w.category, safeloss.SafeLossWarning))
        return out, msgs

    plans.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            safeloss.cross_entropy(x, t, backend=backend, **kw)
        except safeloss.SafeLossError:
            return
    planned = outcome()
    plans.clear()
    fresh = outcome()
    assert planned[1] == fresh[1], (planned, fresh)
    if isinstance(fresh[0], Exception):
        assert type(planned[0]) is type(fresh[0]) and str(planned[0]) == str(fresh[0])
    else:
        assert not isinstance(planned[0], Exception), planned[0]
        torch.testing.assert_close(planned[0], fresh[0], rtol=0, atol=0, equal_nan=True)


@st.composite
def _odd_linear_calls(draw):
    n, C, H = draw(st.integers(0, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    lead = draw(st.sampled_from([(n,), (2, n), ()]))
    dt = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    lay = st.sampled_from(LAYOUTS[:5])
    h = _relayout(torch.randn(*lead, H, generator=g, dtype=dt), draw(lay), draw(st.integers(0, 3)))
    w = _relayout(torch.randn(C, H, generator=g, dtype=dt), draw(lay), draw(st.integers(0, 3)))
    kw: dict = {"reduction": draw(st.sampled_from(["mean", "sum", "none"])),
                "label_smoothing": draw(st.sampled_from([0.0, 0.2]))}
    if draw(st.booleans()):
        kw["linear_bias"] = _relayout(torch.randn(C, generator=g, dtype=dt), draw(lay), 0)
    if draw(st.booleans()):
        kw["weight"] = _relayout(torch.rand(C, generator=g, dtype=dt) + 0.1, draw(lay), 0)
    if draw(st.booleans()):
        t = torch.rand(*lead, C, generator=g, dtype=dt).softmax(-1)
    else:
        t = torch.randint(0, C, lead, generator=g)
        if draw(st.booleans()):
            kw["ignore_index"] = draw(st.sampled_from([-100, -1, 0]))
            if t.numel():
                t[(0,) * t.dim()] = kw["ignore_index"]
    t = _relayout(t, draw(lay), draw(st.integers(0, 3)))
    return h, w, t, kw, draw(st.sampled_from(["torch", "triton"])) if dt == torch.float32 and _TRITON else "torch"


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(_odd_linear_calls())
def test_odd_linear_calls_are_stock(call) -> None:
    h, w, t, kw, backend = call

    def run(fn):
        hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
        k = dict(kw)
        if "linear_bias" in k:
            k["linear_bias"] = k["linear_bias"].detach().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out = fn(hh, ww, t, **k)
            except Exception as e:  # compared with stock's
                return (e,)
            out.sum().backward()
        return out.detach(), hh.grad, ww.grad, k["linear_bias"].grad if "linear_bias" in k else None

    want = run(F.linear_cross_entropy)
    got = run(lambda *a, **k: safeloss.linear_cross_entropy(*a, backend=backend, **k))
    if isinstance(want[0], Exception):
        assert isinstance(got[0], safeloss.SafeLossError) and isinstance(got[0], type(want[0])), (got[0], want[0])
        return
    assert not isinstance(got[0], Exception), got[0]
    for a, b in zip(got, want):
        _same(a, b, h.dtype)


# ------------------------------------------------------- what a finite overflow is blamed on
# Finite logits, huge finite class weights, reduction="sum": the weighted loss overflows float32
# (stock: inf). The message blamed "the logits spread beyond its range" alone; it names the weights.
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_overflow_from_huge_class_weights_names_the_weights(backend: str) -> None:
    x, t = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 2.0]]), torch.tensor([0, 1])
    w = torch.tensor([3e38, 3e38, 1.0])
    want = F.cross_entropy(x, t, w, reduction="none")
    with pytest.warns(safeloss.SafeLossWarning, match=r"float32 loss overflowed: the logits, targets and class weights "
                      r"are all finite, but the logits' spread, scaled by class weights as large as 3e\+38, left its range"):
        got = safeloss.cross_entropy(x, t, w, reduction="none", backend=backend)
    torch.testing.assert_close(got, want)
    # Without weights the logits' spread is the cause, as before.
    big = torch.tensor([[3e38, -3e38, 0.0]])
    with pytest.warns(safeloss.SafeLossWarning, match=r"but the logits spread beyond its range"):
        safeloss.cross_entropy(big, torch.tensor([1]), backend=backend)


# --------------------------------------------------------------- tensor subclasses: the result's type
# Stock's F.cross_entropy hands a call with any tensor-subclass argument to its __torch_function__,
# so the default one returns the subclass. The Triton backend's eager path looked at the logits
# only: a subclass target or weight got a plain Tensor back.
class _Tagged(torch.Tensor):
    pass


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("which", ["input", "target", "weight"])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_subclass_arguments_give_stocks_type(backend: str, which: str, prob: bool, reduction: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g)
    t = torch.rand(4, 3, generator=g).softmax(1) if prob else torch.tensor([0, 2, 1, 1])
    w = torch.rand(3, generator=g) + 0.5
    args = {"input": x, "target": t, "weight": w}
    args[which] = args[which].as_subclass(_Tagged)
    want = F.cross_entropy(args["input"], args["target"], args["weight"], reduction=reduction)
    got = safeloss.cross_entropy(args["input"], args["target"], args["weight"], reduction=reduction, backend=backend)
    assert type(want) is _Tagged and type(got) is _Tagged
    torch.testing.assert_close(got.as_subclass(torch.Tensor), want.as_subclass(torch.Tensor))


# ------------------------------------------------------------- an option given as a meta tensor
# A 0-d meta tensor passes stock's parser, which then cannot read it ("Tensor.item() cannot be
# called on meta tensors", a RuntimeError); safeloss let the same bare RuntimeError through.
@pytest.mark.parametrize("option", ["label_smoothing", "ignore_index"])
def test_an_option_held_in_a_meta_tensor_is_an_argument_error(option: str) -> None:
    x, t = torch.randn(3, 3), torch.tensor([0, 2, 1])
    h, w = torch.randn(3, 2), torch.randn(3, 2)
    value = torch.tensor(0.1 if option == "label_smoothing" else 2, device="meta")
    assert type(_stock_error(lambda: F.cross_entropy(x, t, **{option: value}))) is RuntimeError
    calls = {
        "cross_entropy": lambda: safeloss.cross_entropy(x, t, **{option: value}),
        "module": lambda: safeloss.SafeCrossEntropyLoss(**{option: value})(x, t),
        "linear_cross_entropy": lambda: safeloss.linear_cross_entropy(h, w, t, **{option: value}),
    }
    for name, call in calls.items():
        with pytest.raises(safeloss.ArgumentTypeError, match=rf"{option} .*a meta tensor, which holds no value"):
            call()
        assert isinstance(_stock_error(call), RuntimeError), name


# -------------------------------------------------------------- one softmaxed row, said in English
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_softmaxed_row_is_one_row(backend: str) -> None:
    x = torch.tensor([0.7, 0.2, 0.1])  # unbatched logits that are probabilities
    with pytest.warns(safeloss.SafeLossWarning, match=r"looks already softmaxed: its one row lies in \[0, 1\] and sums to 1\."):
        got = safeloss.cross_entropy(x, torch.tensor(0), backend=backend)
    torch.testing.assert_close(got, F.cross_entropy(x, torch.tensor(0)))


def test_complex_weight_with_probability_targets_is_rejected_as_documented() -> None:
    """Stock returns a complex loss; safeloss asks for a float weight (docs/migration.md)."""
    x, t = torch.randn(3, 4), torch.rand(3, 4).softmax(1)
    w = torch.rand(4, dtype=torch.complex64)
    assert F.cross_entropy(x, t, weight=w).is_complex()
    with pytest.raises(safeloss.WeightError, match=r"weight must be floating point, got dtype torch\.complex64"):
        safeloss.cross_entropy(x, t, weight=w)


# ------------------------------------------------------------- two mistakes: stock's order of checks
# Stock checks the reduction name (a ValueError), then its argument parser rejects any argument of
# the wrong type (a TypeError), then an ignore_index outside int64 (a ValueError), and only then
# do its kernels check values (RuntimeErrors). safeloss checked label_smoothing's range, and
# probability targets against ignore_index, before the types of weight and ignore_index: a call
# with two mistakes raised another builtin than stock.
TWO_MISTAKES = {
    "smoothing-range+weight-list": ("index", dict(label_smoothing=1.5, weight=[1.0] * 4)),
    "negative-smoothing+weight-list": ("prob", dict(label_smoothing=-0.1, weight=[1.0] * 4)),
    "nan-smoothing+weight-list": ("index", dict(label_smoothing=float("nan"), weight=[1.0] * 4)),
    "smoothing-range+ignore_index-str": ("index", dict(label_smoothing=1.5, ignore_index="a")),
    "ignore_index-overflow+weight-list": ("index", dict(ignore_index=2**63, weight=[1.0] * 4)),
    "ignore_index-overflow+smoothing-str": ("prob", dict(ignore_index=2**63, label_smoothing="x")),
    "prob-ignore_index+weight-list": ("prob", dict(ignore_index=0, weight=[1.0] * 4)),
    "smoothing-range+ignore_index-overflow": ("index", dict(label_smoothing=2.0, ignore_index=2**63)),
}


# A module's weight is a buffer, which cannot hold a list: the module runs the other cases.
_CALLS = [pytest.param(case, api, id=f"{api}-{name}") for name, case in TWO_MISTAKES.items()
          for api in ("functional", "module") if api == "functional" or "weight" not in case[1]]


@pytest.mark.parametrize("case, api", _CALLS)
def test_two_mistakes_raise_stocks_class(case, api: str) -> None:
    kind, kw = case
    x = torch.randn(3, 4)
    t = torch.rand(3, 4).softmax(1) if kind == "prob" else torch.tensor([0, 3, 1])
    stock = _stock_error(lambda: F.cross_entropy(x, t, **kw))
    if api == "functional":
        call = lambda: safeloss.cross_entropy(x, t, **kw)  # noqa: E731
    else:
        loss = safeloss.SafeCrossEntropyLoss()
        for name, value in kw.items():  # set after construction, which checks label_smoothing
            setattr(loss, name, value)
        call = lambda: loss(x, t)  # noqa: E731
    with pytest.raises(safeloss.SafeLossError) as e:
        call()
    assert isinstance(e.value, type(stock)), (e.value, stock)

"""Fuzzing: random valid inputs match torch; random invalid inputs raise a SafeLossError, never
anything else (no stray IndexError from a kernel, no TypeError from validation)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safeloss
from safeloss import SafeLossError, SafeLossWarning
from safeloss.backends import dispatch
from tests.tolerances import assert_matches

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TRITON_REASON = dispatch.triton_unavailable_reason(torch.device("cpu"))


@st.composite
def valid_calls(draw):
    ndim = draw(st.integers(1, 4))
    C = draw(st.integers(1, 6))
    N = draw(st.integers(0, 5))
    spatial = [draw(st.integers(1, 3)) for _ in range(max(0, ndim - 2))]
    shape = (C,) if ndim == 1 else (N, C, *spatial)
    pos = () if ndim == 1 else (N, *spatial)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0, 8.0]))).to(dtype)
    prob = draw(st.booleans())
    ignore_index = -100
    if prob:
        cdim = 0 if ndim == 1 else 1
        t = torch.randn(shape, generator=g, dtype=torch.float64).softmax(cdim).to(dtype)
    else:
        ignore_index = draw(st.sampled_from([-100, -1, 255, *range(C)]))
        t = torch.randint(0, C, pos, generator=g)
        if t.numel() and draw(st.booleans()):
            mask = torch.rand(pos, generator=g) < 0.3
            t = torch.where(mask, torch.full_like(t, ignore_index), t)
        t = t.to(draw(st.sampled_from([torch.int64, torch.int32, torch.uint8] if ignore_index >= 0 or not (t < 0).any() else [torch.int64, torch.int32])))
    w = None
    if draw(st.booleans()):
        w = (torch.rand(C, generator=g, dtype=torch.float64) * 2).to(dtype)
    kw = dict(
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.05, 0.5, 1.0])),
    )
    if not prob:
        kw["ignore_index"] = ignore_index
    return x, t, w, kw


def _compare(x, t, w, kw, backend):
    xs, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = F.cross_entropy(xs, t if t.is_floating_point() else t.long(), w, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SafeLossWarning)  # e.g. all-ignored mean: NaN plus a warning
        out = safeloss.cross_entropy(xo, t, w, backend=backend, **kw)
    assert_matches(out, ref, what="value")
    up = torch.linspace(-1, 2, ref.numel(), dtype=ref.dtype).reshape(ref.shape) if ref.dim() else torch.tensor(0.3, dtype=ref.dtype)
    ref.backward(up)
    out.backward(up)
    assert_matches(xo.grad, xs.grad, what="grad")


@FUZZ
@given(valid_calls())
def test_valid_inputs_match_torch(call):
    _compare(*call, backend="torch")


@pytest.mark.skipif(TRITON_REASON is not None, reason=str(TRITON_REASON))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_calls())
def test_valid_inputs_match_torch_triton(call):
    x, t, w, kw = call
    if x.dtype == torch.float64:
        x = x.float()
        t = t.float() if t.is_floating_point() else t
        w = None if w is None else w.float()
    _compare(x, t, w, kw, backend="triton")


MUTATIONS = [
    "batch", "label-high", "label-negative", "weight-len", "smoothing", "reduction", "int-logits",
    "extra-target-dim", "bool-target", "fractional-target", "prob-ignore", "channels-last", "device",
    "multihot", "not-tensor", "scalar-input", "weight-int",
]


@st.composite
def invalid_calls(draw):
    mutation = draw(st.sampled_from(MUTATIONS))
    N = draw(st.integers(1, 5))
    C = draw(st.integers(2, 6))
    S = draw(st.integers(2, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(N, C, generator=g)
    t = torch.randint(0, C, (N,), generator=g)
    kw: dict = {}
    w = None
    if mutation == "batch":
        t = torch.randint(0, C, (N + draw(st.integers(1, 4)),), generator=g)
    elif mutation == "label-high":
        t[draw(st.integers(0, N - 1))] = C + draw(st.integers(0, 300))
    elif mutation == "label-negative":
        t[draw(st.integers(0, N - 1))] = -draw(st.integers(1, 99))
    elif mutation == "weight-len":
        w = torch.ones(C + draw(st.sampled_from([-1, 1, 2])))
    elif mutation == "smoothing":
        kw["label_smoothing"] = draw(st.sampled_from([-0.5, 1.01, 2.0, math.nan, math.inf]))
    elif mutation == "reduction":
        kw["reduction"] = draw(st.sampled_from(["avg", "Mean", "", "max", None]))
    elif mutation == "int-logits":
        x = x.long()
    elif mutation == "extra-target-dim":
        t = t.view(N, 1).expand(N, S).clone() if S > 1 else t
    elif mutation == "bool-target":
        t = t > 0
    elif mutation == "fractional-target":
        t = t.float() + 0.5
    elif mutation == "prob-ignore":
        t = x.softmax(1)
        kw["ignore_index"] = draw(st.integers(0, 300))
    elif mutation == "channels-last":
        x = torch.randn(N, S, S + 1, C, generator=g)
        t = torch.randint(0, C, (N, S, S + 1), generator=g)
    elif mutation == "device":
        t = t.to("meta")
    elif mutation == "multihot":
        t = (torch.rand(N, C, generator=g) < 0.5).long()
        t[:, 0] = 1
        t[:, 1] = 1
    elif mutation == "not-tensor":
        t = t.tolist()
    elif mutation == "scalar-input":
        x, t = torch.tensor(1.0), torch.tensor(0)
    elif mutation == "weight-int":
        w = torch.ones(C, dtype=torch.long)
    return mutation, x, t, w, kw


@FUZZ
@given(invalid_calls(), st.booleans(), st.booleans())
def test_invalid_inputs_raise_safeloss_errors(call, strict, use_module):
    _mutation, x, t, w, kw = call
    with pytest.raises(SafeLossError), warnings.catch_warnings():
        warnings.simplefilter("ignore", SafeLossWarning)
        if use_module:
            safeloss.SafeCrossEntropyLoss(w, strict=strict, **kw)(x, t)
        else:
            safeloss.cross_entropy(x, t, w, strict=strict, **kw)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 300), st.integers(2, 50), st.floats(1e-3, 50), st.floats(-5, 5), st.integers(0, 2**16),
    st.sampled_from(["randn", "rand", "uniform-small", "logsoftmax"]),
)
def test_no_softmax_false_alarm_on_logits(n, c, scale, shift, seed, kind):
    """Logits of any scale and offset, including values all inside [0, 1], never look softmaxed."""
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        x = torch.randn(n, c, generator=g) * scale + shift
    elif kind == "rand":
        x = torch.rand(n, c, generator=g)  # in [0, 1] but rows sum to about c / 2
    elif kind == "uniform-small":
        x = torch.rand(n, c, generator=g) * (2.0 / c) * min(scale, 0.9)  # rows sum near, not at, 1
    else:
        x = (torch.randn(n, c, generator=g) * scale).log_softmax(1)
    t = torch.randint(0, c, (n,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SafeLossWarning)
        safeloss.cross_entropy(x, t)

"""Plans per call signature (safeloss/core/plan.py) never hide a check.

A repeated clean call of a signature takes its plan (``pipeline.fast`` for cross-entropy,
``linear.api._fast`` for linear + cross-entropy): no argument checks, no backend choice. These
tests make the plan first (several clean calls of the same signature, checked to have stored
one and to hit it), then call with bad *values* under that very signature, and expect exactly
what a call without a plan does: the same error or warning, warnings once per loss (per call
site for the functional API), strict mode raising, deferred findings reported at the next call.
They also hand planned signatures tensors that must not take the plan (meta, sparse, fx proxies,
functorch wrappers, a TorchFunctionMode, autocast) and options that compare equal but are not
the same argument (``ignore_index=True`` is not ``1``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import safeloss
from safeloss.ce import pipeline
from safeloss.core import checks
from safeloss.core import plan as plans

N, C = 6, 5


def _data(n: int = N, c: int = C, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 3, torch.randint(0, c, (n,), generator=g)


def _functional(backend: str) -> Callable[..., torch.Tensor]:
    return lambda x, t, **kw: safeloss.cross_entropy(x, t, backend=backend, **kw)


def _module(backend: str) -> Callable[..., torch.Tensor]:
    m = safeloss.SafeCrossEntropyLoss(backend=backend)
    return lambda x, t: m(x, t)


def _patched_functional(backend: str) -> Callable[..., torch.Tensor]:
    return lambda x, t: F.cross_entropy(x, t)


def _patched_module(backend: str) -> Callable[..., torch.Tensor]:
    m = torch.nn.CrossEntropyLoss()
    return lambda x, t: m(x, t)


APIS = {"functional": _functional, "module": _module, "patched-functional": _patched_functional,
        "patched-module": _patched_module}
# (backend, deferred): the CPU host path, the deferred model of CUDA calls (on CPU), and the
# Triton kernels (interpreter) both ways.
PATHS = [("torch", False), ("torch", True), ("triton", False), ("triton", True)]


@pytest.fixture
def api_path(request, monkeypatch, clean_patch):
    api, (backend, deferred) = request.param
    if api.startswith("patched") and backend != "torch":
        pytest.skip("patch() takes the default backend")
    monkeypatch.setattr(checks, "DEFER_ON_CPU", deferred)
    handle = safeloss.patch() if api.startswith("patched") else None
    try:
        yield APIS[api](backend if backend == "torch" else "triton"), deferred
    finally:
        if handle is not None:
            safeloss.unpatch()
        checks._pending.clear()


PARAMS = [(a, p) for a in APIS for p in PATHS]
IDS = [f"{a}-{b}{'-deferred' if d else ''}" for a, (b, d) in PARAMS]


def _planned(call: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, k: int = 3) -> None:
    """k clean calls of (x, t)'s signature; the plan exists and is hit (one plan for all k)."""
    before = plans.stats["stored"]
    for i in range(k):
        xi, ti = _data(x.shape[0], x.shape[1], seed=100 + i)
        out = call(xi, ti)
        assert math.isfinite(out.item())
    assert plans.stats["stored"] == before + 1, "one plan for one signature"
    assert plans.size() >= 1


def _report_deferred(call: Callable[..., torch.Tensor], deferred: bool) -> None:
    """Deferred findings surface at the next call of the loss: make that call."""
    if deferred:
        call(*_data(seed=7))


@pytest.mark.parametrize("api_path", PARAMS, ids=IDS, indirect=True)
def test_bad_label_after_clean_calls_still_raises(api_path) -> None:
    call, deferred = api_path
    x, t = _data()
    _planned(call, x, t)
    bad = t.clone()
    bad[4] = C + 2
    with pytest.raises(safeloss.TargetOutOfRangeError, match=rf"{C + 2} at \[4\]"):
        out = call(x, bad)
        if deferred:
            assert math.isnan(out.item())  # nothing trains on it meanwhile
        _report_deferred(call, deferred)
    # and the plan still serves clean calls afterwards
    assert math.isfinite(call(*_data(seed=3)).item())


@pytest.mark.parametrize("api_path", PARAMS, ids=IDS, indirect=True)
def test_nan_logits_after_clean_calls_warn_once_per_loss(api_path) -> None:
    call, deferred = api_path
    x, t = _data()
    _planned(call, x, t)
    xn = x.clone()
    xn[2, 1] = math.nan
    with pytest.warns(safeloss.SafeLossWarning, match="NaN or infinite at 1 of 6 positions"):
        call(xn, t)
        _report_deferred(call, deferred)
    with warnings.catch_warnings():  # once per loss (per call site for the functional API)
        warnings.simplefilter("error")
        for _ in range(2):
            call(xn, t)
            _report_deferred(call, deferred)
    checks._pending.clear()


@pytest.mark.parametrize("api_path", PARAMS, ids=IDS, indirect=True)
def test_strict_mode_after_clean_calls_raises(api_path) -> None:
    call, _ = api_path
    x, t = _data()
    _planned(call, x, t)
    xn = x.clone()
    xn[0, 0] = math.inf
    with safeloss.strict_mode(), pytest.raises(safeloss.NonFiniteError, match="NaN or infinite"):
        call(xn, t)  # strict: read at once, even in the deferred model
    safeloss.set_strict(True)
    try:
        with pytest.raises(safeloss.NonFiniteError):
            call(xn, t)
    finally:
        safeloss.set_strict(None)


@pytest.mark.parametrize("n", [8, 200], ids=["band", "first-row"])
@pytest.mark.parametrize("api", ["functional", "module"])
def test_softmaxed_input_after_clean_calls_warns(api: str, n: int) -> None:
    """Both host-path exits of the softmax check: the band of the mean loss (up to 64
    positions) and the first row read raw; inputs whose mean lies in the band included."""
    call = APIS[api]("torch")
    x, t = _data(n, 10)
    _planned(call, x, t)
    # in-band means with ordinary logits take the row read, and stay clean
    for seed in range(20):
        xs, ts = _data(n, 10, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            call(xs * 0.3, ts)
    with pytest.warns(safeloss.SafeLossWarning, match="looks already softmaxed"):
        call(x.softmax(1), t)


def test_bad_probability_targets_and_negative_weights_after_clean_calls() -> None:
    x, _ = _data()
    y = torch.rand(N, C).softmax(1)
    loss = safeloss.SafeCrossEntropyLoss()
    _planned(lambda a, b: loss(a, torch.rand(N, C).softmax(1)), x, y)
    with pytest.warns(safeloss.SafeLossWarning, match="not probability distributions"):
        loss(x, torch.rand(N, C))
    w = torch.ones(C)
    wl = safeloss.SafeCrossEntropyLoss(weight=w)
    _planned(wl, *_data())
    wl.weight[1] = -1.0  # in place, no new signature
    with pytest.warns(safeloss.SafeLossWarning, match="1 negative entry"):
        wl(*_data())


@pytest.mark.parametrize("strict", [False, True])
def test_bad_probability_targets_raise_in_strict_mode_after_clean_calls(strict: bool) -> None:
    x, _ = _data()
    call = _functional("torch")
    _planned(lambda a, b: call(a, torch.rand(N, C).softmax(1), strict=strict), x, None)
    if strict:
        with pytest.raises(safeloss.ProbabilityTargetError, match="not probability distributions"):
            call(x, torch.rand(N, C), strict=True)
    else:
        with pytest.warns(safeloss.SafeLossWarning, match="not probability distributions"):
            call(x, torch.rand(N, C))


def test_options_that_compare_equal_are_not_the_same_signature() -> None:
    """ignore_index=True == 1 and hashes alike: an error, whatever plan ``1`` made."""
    x, t = _data()
    for _ in range(3):
        safeloss.cross_entropy(x, t, ignore_index=1)
    for _ in range(2):
        with pytest.raises(safeloss.SafeLossError, match="ignore_index"):
            safeloss.cross_entropy(x, t, ignore_index=True)
    # the same values passed explicitly: stock's result, plan or not
    for kw in ({}, dict(ignore_index=-100, reduction="mean", label_smoothing=0.0, backend="auto")):
        torch.testing.assert_close(safeloss.cross_entropy(x, t, **kw), F.cross_entropy(x, t))


def test_the_signature_key_is_what_the_plan_is_stored_under() -> None:
    x, t = _data()
    key = pipeline.fast(x, t, None, -100, "mean", 0.0, "auto", False, False, None, None)
    assert isinstance(key, tuple) and plans.size() == 0
    safeloss.cross_entropy(x, t, ignore_index=-100)  # the same values as those objects
    assert plans.size() == 1
    hit = pipeline.fast(x, t, None, -100, "mean", 0.0, "auto", False, False, None, None)
    assert isinstance(hit, torch.Tensor)
    torch.testing.assert_close(hit, F.cross_entropy(x, t))
    # a deprecated reduction name warns every call: no key, no plan
    assert pipeline.fast(x, t, None, -100, "elementwise_mean", 0.0, "auto", False, False, None, None) is None


def test_other_layouts_and_strides_under_a_planned_signature() -> None:
    x, t = _data()
    _planned(_functional("torch"), x, t)
    # meta tensors of the planned shape: stock's abstract result, no value read
    out = safeloss.cross_entropy(x.to("meta"), t.to("meta"))
    assert out.device.type == "meta" and out.shape == ()
    # sparse logits: the layout error, as without a plan
    with pytest.raises(safeloss.LayoutError):
        safeloss.cross_entropy(x.to_sparse(), t)
    # transposed storage (another stride, same signature): stock's values
    xt = x.t().contiguous().t()
    torch.testing.assert_close(safeloss.cross_entropy(xt, t), F.cross_entropy(xt, t))
    with pytest.warns(safeloss.SafeLossWarning, match="looks already softmaxed"):
        safeloss.cross_entropy(x.softmax(1).t().contiguous().t(), t)


def test_tools_see_planned_signatures_as_without_a_plan() -> None:
    x, t = _data()
    loss = safeloss.SafeCrossEntropyLoss()
    _planned(loss, x, t)
    _planned(_functional("torch"), x, t)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.loss = safeloss.SafeCrossEntropyLoss()

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.loss(a, b) + safeloss.cross_entropy(a, b)

    gm = torch.fx.symbolic_trace(Model())  # proxies never enter the plan lookup
    torch.testing.assert_close(gm(x, t), 2 * F.cross_entropy(x, t))
    # vmap over the batch: functorch wrappers take the transform path (stock's values)
    got = torch.func.vmap(lambda a, b: safeloss.cross_entropy(a, b))(x, t)
    torch.testing.assert_close(got, F.cross_entropy(x, t, reduction="none"))
    # a TorchFunctionMode sees the call (stock's Python layer), as without a plan
    seen = []

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Mode():
        safeloss.cross_entropy(x, t)
    assert seen
    # autocast (CPU bfloat16): stock's dtype and values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, ref = safeloss.cross_entropy(x, t), F.cross_entropy(x, t)
    assert got.dtype == ref.dtype
    torch.testing.assert_close(got, ref)


# ------------------------------------------------------------------ linear + cross-entropy

H = 16


def _head(n: int = N, c: int = C, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, H, generator=g, requires_grad=True),
            torch.randn(c, H, generator=g, requires_grad=True), torch.randint(0, c, (n,), generator=g))


def _linear_planned(call: Callable[..., torch.Tensor], k: int = 3, **kw: object) -> None:
    before = plans.stats["stored"]
    for i in range(k):
        h, w, t = _head(seed=50 + i)
        loss = call(h, w, t, **kw)
        torch.autograd.grad(loss.sum(), (h, w))
        torch.testing.assert_close(loss, F.cross_entropy(F.linear(h, w), t, **kw))
    assert plans.stats["stored"] == before + 1


LINEAR_APIS = {
    "functional": lambda: (lambda h, w, t, **kw: safeloss.linear_cross_entropy(h, w, t, **kw)),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_planned_calls_give_stock_values_and_gradients(reduction: str) -> None:
    call = LINEAR_APIS["functional"]()
    _linear_planned(call, reduction=reduction)
    h, w, t = _head(seed=9)
    got = safeloss.linear_cross_entropy(h, w, t, reduction=reduction)
    ref = F.cross_entropy(F.linear(h, w), t, reduction=reduction)
    torch.testing.assert_close(got, ref)
    g1 = torch.autograd.grad(got.sum(), (h, w))
    g2 = torch.autograd.grad(ref.sum(), (h, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_linear_findings_after_clean_calls() -> None:
    call = LINEAR_APIS["functional"]()
    _linear_planned(call)
    h, w, t = _head()
    bad = t.clone()
    bad[1] = C + 3
    with pytest.raises(safeloss.TargetOutOfRangeError, match=rf"(?s)linear_cross_entropy.*{C + 3} at \[1\]"):
        call(h, w, bad)
    hn = h.detach().clone()
    hn[3, 0] = math.nan
    with pytest.warns(safeloss.SafeLossWarning, match="NaN or infinite"):
        call(hn, w, t)
    with safeloss.strict_mode(), pytest.raises(safeloss.NonFiniteError):
        call(hn, w, t)
    wt = torch.ones(C)
    _linear_planned(call, weight=wt)
    wt[2] = -0.5
    with pytest.warns(safeloss.SafeLossWarning, match="negative"):
        call(h, w, t, weight=wt)


def test_linear_module_findings_after_clean_calls() -> None:
    m = safeloss.SafeLinearCrossEntropyLoss(H, C)
    for i in range(3):
        h, _, t = _head(seed=i)
        m(h, t).backward()
    assert plans.size() == 1
    h, _, t = _head()
    bad = t.clone()
    bad[0] = -7
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"-7 at \[0\]"):
        m(h, bad)


def test_linear_heads_too_big_for_the_planned_path_keep_the_chunk_loop() -> None:
    """Logits larger than what the chunk loop keeps for backward ((N + C) * H values): no plan,
    the logits never exist as a whole."""
    h = torch.randn(64, 4, requires_grad=True)
    w = torch.randn(100, 4, requires_grad=True)
    t = torch.randint(0, 100, (64,))
    for _ in range(3):
        torch.testing.assert_close(safeloss.linear_cross_entropy(h, w, t),
                                   F.cross_entropy(F.linear(h, w), t))
    assert plans.size() == 0


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_a_deprecated_reduction_name_warns_every_call(op: str) -> None:
    h, w, t = _head()
    x, _ = _data()
    for _ in range(3):
        with pytest.warns(UserWarning, match="elementwise_mean' is deprecated"):
            if op == "cross_entropy":
                safeloss.cross_entropy(x, t, reduction="elementwise_mean")
            else:
                safeloss.linear_cross_entropy(h, w, t, reduction="elementwise_mean")
    assert plans.size() == 0

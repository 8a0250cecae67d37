"""Hostile pass: the runtime settings a training loop puts a loss in (h14).

Activation checkpointing (plain and selective), saved-tensor hooks, anomaly mode, double,
batched and repeated backward, grad modes, module hooks and mutation, the caller's tensors
edited before backward, warnings filters, threads and global state changed between calls of one
signature (the second call served by a plan must still check what the first did), each against
stock torch. Probes that found nothing are kept as guards where cheap.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import safeloss
from safeloss.core import plan


def _same(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, atol=tol, rtol=tol, equal_nan=True)


# ---------------------------------------------------------------- activation checkpointing


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("prob", [False, True])
def test_linear_checkpoint_non_reentrant_first_call(reduction: str, prob: bool) -> None:
    # The first call of a signature runs the full path (and plans it); checkpoint's recompute in
    # backward then took the planned path, which saves other tensors: CheckpointError.
    torch.manual_seed(0)
    x, W = torch.randn(6, 4), torch.randn(5, 4)
    t = torch.softmax(torch.randn(6, 5), 1) if prob else torch.randint(0, 5, (6,))

    def block(x: torch.Tensor, W: torch.Tensor, safe: bool) -> torch.Tensor:
        if safe:
            return safeloss.linear_cross_entropy(x, W, t, reduction=reduction)
        return F.cross_entropy(x @ W.T, t, reduction=reduction)

    for _ in range(2):  # a signature's first call, then a second (no plan under the hooks)
        a = [v.clone().requires_grad_() for v in (x, W)]
        b = [v.clone().requires_grad_() for v in (x, W)]
        out = checkpoint(block, *a, True, use_reentrant=False)
        out.sum().backward()
        ref = checkpoint(block, *b, False, use_reentrant=False)
        ref.sum().backward()
        _same(out, ref)
        _same(a[0].grad, b[0].grad)
        _same(a[1].grad, b[1].grad)


# ---------------------------------------------------------------- warnings filters


def _nan_logits() -> torch.Tensor:
    x = torch.randn(4, 3)
    x[0, 0] = float("nan")
    return x


def _functional_site(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return safeloss.cross_entropy(x, t)  # one call site for every call of the test


def _linear_site(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return safeloss.linear_cross_entropy(h, torch.randn(3, 2), t)


@pytest.mark.parametrize("action", ["ignore", "error"])
@pytest.mark.parametrize("who", ["functional", "module", "linear"])
def test_warning_not_lost_after_a_filter(action: str, who: str) -> None:
    # A warning that a filter ignored (an eval pass under catch_warnings) or turned into an
    # error was never shown: the next call must still show it (Python's own once-registry
    # records neither), not count it as shown.
    m = safeloss.SafeCrossEntropyLoss()
    t = torch.tensor([0, 1, 2, 0])
    if who == "linear":
        h = torch.randn(4, 2)
        h[0, 0] = float("nan")

        def call() -> object:
            return _linear_site(h, t)
    else:
        x = _nan_logits()

        def call() -> object:
            return _functional_site(x, t) if who == "functional" else m(x, t)

    with warnings.catch_warnings():
        warnings.simplefilter(action)
        if action == "error":
            with pytest.raises(safeloss.SafeLossWarning, match="NaN or infinite"):
                call()
        else:
            call()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        call()
        call()  # shown once, then once-only as before
    msgs = [str(w.message) for w in rec if issubclass(w.category, safeloss.SafeLossWarning)]
    assert len(msgs) == 1 and "NaN or infinite" in msgs[0]


@pytest.mark.parametrize("filt", [
    dict(category=safeloss.SafeLossWarning), dict(message="the loss is NaN"), dict(module=__name__),
    dict(message="looks already softmaxed"), dict(category=DeprecationWarning),
])
def test_warning_filters_matched_as_python_does(filt: dict) -> None:
    # Only a filter that matches this warning (category, message, module) hides it; one that
    # does not leaves it shown then, and once-only after.
    m = safeloss.SafeCrossEntropyLoss()
    x, t = _nan_logits(), torch.tensor([0, 1, 2, 0])
    matches = "softmaxed" not in filt.get("message", "") and filt.get("category") is not DeprecationWarning
    with warnings.catch_warnings(record=True) as inside:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", **filt)
        m(x, t)
    with warnings.catch_warnings(record=True) as after:
        warnings.simplefilter("always")
        m(x, t)
    assert (len(inside), len(after)) == ((0, 1) if matches else (1, 0))


# ---------------------------------------------------------------- backward twice


@pytest.mark.parametrize("prob", [False, True])
def test_fused_grad_second_backward_says_why(prob: bool) -> None:
    # fused_grad scales the gradient it computed in forward in place: a second backward of a
    # retained graph cannot reuse it. It failed with autograd's "modified by an inplace
    # operation ... enable anomaly detection" (nothing the caller modified); now it says so.
    torch.manual_seed(0)
    t = torch.softmax(torch.randn(6, 5), 1) if prob else torch.randint(0, 5, (6,))
    for _ in range(2):  # the planning call, then a planned one
        x = torch.randn(6, 5, requires_grad=True)
        out = safeloss.cross_entropy(x * 2, t, backend="triton", fused_grad=True, reduction="sum")
        out.backward(retain_graph=True)
        ref = torch.randn(6, 5).copy_(x.grad)
        with pytest.raises(safeloss.BackendError, match=r"retain_graph=True.*\n.*Fix: fused_grad=False"):
            out.backward()
        torch.testing.assert_close(x.grad, ref)  # the failed backward added nothing
        # Without fused_grad both backward passes work, as stock's do.
        x.grad = None
        out = safeloss.cross_entropy(x * 2, t, backend="triton", reduction="sum")
        out.backward(retain_graph=True)
        out.backward()
        torch.testing.assert_close(x.grad, 2 * ref)


# ---------------------------------------------------------------- threads

_FIRST_USE_RACE = r"""
import sys, threading, time
import torch, triton, safeloss

# Thread A's first Triton call imports the kernels module; hold that import at its first
# @triton.jit, after the module entered sys.modules (what another thread then sees).
entered, release, jit = threading.Event(), threading.Event(), triton.jit
def held_jit(*args, **kwargs):
    entered.set()
    release.wait(30)
    return jit(*args, **kwargs)
triton.jit = held_jit
x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
results = {}
def call(name):
    try:
        results[name] = float(safeloss.cross_entropy(x, t, backend="triton"))
    except Exception as e:
        results[name] = f"{type(e).__name__}: {e}"
a = threading.Thread(target=call, args=("a",))
a.start()
assert entered.wait(30)
def ask():  # what B's call asks first: may the Triton backend run on CPU tensors here?
    from safeloss.backends import triton_backend
    try:
        results["b"] = triton_backend.unavailable_reason(torch.device("cpu"))
    except Exception as e:
        results["b"] = f"{type(e).__name__}: {e}"
b = threading.Thread(target=ask)
b.start()
b.join(1.0)  # B waits for A's import (or, the bug, fails at once on the half-made module)
triton.jit = jit
release.set()
a.join(30)
b.join(30)
ref = float(torch.nn.functional.cross_entropy(x, t))
print(abs(results["a"] - ref) < 1e-5, results["b"] is None, results)
"""


def test_triton_first_use_from_two_threads() -> None:
    # The first Triton call in two threads at once: the second read the kernels module while
    # the first was still importing it (AttributeError: partially initialized module).
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", _FIRST_USE_RACE], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.stdout.split()[:2] == ["True", "True"], out.stdout + out.stderr


def test_warnings_silenced_by_a_filter_build_no_message(monkeypatch: pytest.MonkeyPatch) -> None:
    # A warning a filter drops is not marked shown, so a loss whose every call has the finding
    # (NaN logits under `simplefilter("ignore")`) must still not pay for its message per call.
    from safeloss.core import checks

    built = []
    real = checks.nonfinite_finding
    monkeypatch.setattr(checks, "nonfinite_finding", lambda *a, **k: built.append(1) or real(*a, **k))
    m = safeloss.SafeCrossEntropyLoss()
    x, t = _nan_logits(), torch.tensor([0, 1, 2, 0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=safeloss.SafeLossWarning)
        for _ in range(3):
            m(x, t)
            _functional_site(x, t)
    assert built == []
    with pytest.warns(safeloss.SafeLossWarning, match="NaN or infinite"):
        m(x, t)
    assert built == [1]


# ---------------------------------------------------------------- a planned call in each setting
#
# A clean call of a signature, twice (the second served by its plan), then one with a bad value:
# the same value, error and warnings as that bad call made fresh (no plan, nothing shown yet),
# inside each runtime setting. (Guards: no setting below broke this in the pass.)


@contextlib.contextmanager
def _global(setter, on, off):  # type: ignore[no-untyped-def]
    setter(on)
    try:
        yield
    finally:
        setter(off)


_SETTINGS = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "anomaly": lambda: torch.autograd.set_detect_anomaly(True),
    "save_on_cpu": torch.autograd.graph.save_on_cpu,
    "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    "deterministic": lambda: _global(torch.use_deterministic_algorithms, True, False),
    "default_float64": lambda: _global(torch.set_default_dtype, torch.float64, torch.float32),
    "checkpoint": contextlib.nullcontext,  # the call inside a non-reentrant checkpoint, then backward
    "checkpoint_reentrant": contextlib.nullcontext,
}


def _planned_case(op: str, bad: str | None, setting: str, m: torch.nn.Module) -> tuple[object, list[str]]:
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)
    h, W = torch.randn(6, 3, generator=g), torch.randn(5, 3, generator=g)
    if bad == "nan":
        x[0, 0] = h[0, 0] = float("nan")
    elif bad == "label":
        t[0] = 7

    def f(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if op == "functional":
            return safeloss.cross_entropy(x, t, label_smoothing=0.1)
        if op == "module":
            return m(x, t)
        return safeloss.linear_cross_entropy(h, W, t)

    x.requires_grad_()
    h.requires_grad_()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        try:
            with _SETTINGS[setting]():
                if setting.startswith("checkpoint"):
                    out = checkpoint(f, x, h, use_reentrant=setting.endswith("reentrant"))
                    out.backward()
                else:
                    out = f(x, h)
            result: object = round(float(out.detach().float()), 4) if bool(out == out) else "nan"
        except safeloss.SafeLossError as e:
            result = (type(e).__name__, str(e))
    return result, [str(w.message) for w in rec if issubclass(w.category, safeloss.SafeLossWarning)]


@pytest.mark.parametrize("bad", ["nan", "label"])
@pytest.mark.parametrize("setting", list(_SETTINGS))
@pytest.mark.parametrize("op", ["functional", "module", "linear"])
def test_planned_call_in_each_setting(op: str, bad: str, setting: str) -> None:
    fresh = _planned_case(op, bad, setting, safeloss.SafeCrossEntropyLoss())
    assert fresh[0] != "nan" or fresh[1], "a bad value with neither an error nor a warning"
    plan.clear()
    safeloss.reset_warnings()
    m = safeloss.SafeCrossEntropyLoss()
    clean = [_planned_case(op, None, setting, m) for _ in range(2)]
    assert clean[0] == clean[1] and clean[0][1] == []
    # Linear calls plan neither under saved-tensor hooks (save_on_cpu, non-reentrant checkpoint)
    # nor where autocast changes the compute dtype; every other case served the second call.
    unplanned = op == "linear" and setting in ("save_on_cpu", "checkpoint", "autocast")
    assert plan.size() == (0 if unplanned else 1)
    assert _planned_case(op, bad, setting, m) == fresh


# ---------------------------------------------------------------- batched backward


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("prob", [False, True])
def test_triton_backward_with_batched_gradients(prob: bool, reduction: str, fused: bool) -> None:
    # torch.autograd.grad(..., is_grads_batched=True) (and so jacobian / hessian with
    # vectorize=True) runs backward on batched upstream gradients, which have no storage for
    # the kernels to read: NotImplementedError "Cannot access storage of BatchedTensorImpl".
    torch.manual_seed(0)
    t = torch.softmax(torch.randn(4, 5), 1) if prob else torch.tensor([0, -100, 4, 2])
    w = torch.rand(5) + 0.1
    x0 = torch.randn(4, 5)

    def jac(fn) -> torch.Tensor:  # type: ignore[no-untyped-def]
        x = x0.clone().requires_grad_()
        out = fn(x * 1.0).reshape(-1)
        eye = torch.eye(out.numel())
        return torch.autograd.grad(out, x, eye, is_grads_batched=True)[0]

    kw = dict(weight=w, label_smoothing=0.1, reduction=reduction)
    for _ in range(2):  # the planning call, then a planned one
        got = jac(lambda x: safeloss.cross_entropy(x, t, backend="triton", fused_grad=fused, **kw))
        _same(got, jac(lambda x: F.cross_entropy(x, t, **kw)))
    # What jacobian(vectorize=True) computes: the same rows.
    ref = torch.autograd.functional.jacobian(lambda x: F.cross_entropy(x, t, **kw), x0, vectorize=True)
    got = torch.autograd.functional.jacobian(
        lambda x: safeloss.cross_entropy(x, t, backend="triton", fused_grad=fused, **kw), x0, vectorize=True)
    _same(got, ref)


def _batched_jacobian(fn, x0: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    x = x0.clone().requires_grad_()
    out = fn(x * 1.0).reshape(-1)
    return torch.autograd.grad(out, x, torch.eye(out.numel()), is_grads_batched=True)[0]


def _looped_jacobian(fn, x0: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    x = x0.clone().requires_grad_()
    out = fn(x * 1.0).reshape(-1)
    return torch.stack([torch.autograd.grad(out, x, e, retain_graph=True)[0] for e in torch.eye(out.numel())])


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("op", ["triton", "torch", "linear"])
def test_extras_backward_with_batched_gradients(op: str, reduction: str) -> None:
    # The extras' backward functions scaled their buffers in place by the upstream gradient:
    # vmap refused a batched one ("aten::mul_ ... is not possible", or the kernels' "Cannot
    # access storage"). Checked against one backward per row (each compared with stock's
    # formulas elsewhere).
    torch.manual_seed(0)
    t = torch.tensor([0, -100, 4, 2])
    kw = dict(z_loss=1e-3, softcap=4.0, label_smoothing=0.1, reduction=reduction)

    def fn(x: torch.Tensor) -> torch.Tensor:
        if op == "linear":
            return safeloss.linear_cross_entropy(x, torch.eye(5), t, ignore_index=-100, **kw)
        return safeloss.cross_entropy(x, t, backend=op, **kw)

    x0 = torch.randn(4, 5)
    _same(_batched_jacobian(fn, x0), _looped_jacobian(fn, x0))


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_vocab_parallel_backward_with_batched_gradients(one_rank: None, reduction: str, z_loss: float) -> None:
    t = torch.tensor([0, -100, 4, 2])
    x0 = torch.randn(4, 5)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return safeloss.vocab_parallel_cross_entropy(x, t, reduction=reduction, z_loss=z_loss)

    got = _batched_jacobian(fn, x0)
    _same(got, _looped_jacobian(fn, x0))
    if not z_loss:
        _same(got, _batched_jacobian(lambda x: F.cross_entropy(x, t, reduction=reduction), x0))


# ---------------------------------------------------------------- selective activation checkpointing


def _save_matmuls(ctx, op, *args, **kwargs):  # type: ignore[no-untyped-def]
    from torch.utils.checkpoint import CheckpointPolicy

    mm = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    return CheckpointPolicy.MUST_SAVE if op in mm else CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize("case", ["plain", "sum", "smoothing-weight", "bias", "prob"])
def test_linear_under_selective_checkpointing(case: str) -> None:
    # A policy that saves the matmuls (torchtitan's): the chunk loop scaled its own matmuls'
    # outputs in place, which the checkpoint had cached ("Tensor cached during selective
    # activation checkpoint has been mutated"; probability targets: "backward an extra time").
    import functools

    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    torch.manual_seed(0)
    h0, W0, b = torch.randn(6, 3), torch.randn(5, 3), torch.randn(5)
    t = torch.softmax(torch.randn(6, 5), 1) if case == "prob" else torch.tensor([0, 4, -100, 2, 1, 3])
    kw: dict = {"sum": dict(reduction="sum"), "smoothing-weight": dict(label_smoothing=0.1, weight=torch.rand(5)),
                "bias": dict(linear_bias=b)}.get(case, {})
    stock_kw = {k: v for k, v in kw.items() if k != "linear_bias"}
    context = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)

    def run(safe: bool) -> tuple[torch.Tensor, ...]:
        h, W = h0.clone().requires_grad_(), W0.clone().requires_grad_()

        def block(h: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
            if safe:
                return safeloss.linear_cross_entropy(h, W, t, ignore_index=None if case == "prob" else -100, **kw)
            return F.cross_entropy(F.linear(h, W, kw.get("linear_bias")), t, **stock_kw)

        out = checkpoint(block, h, W, use_reentrant=False, context_fn=context)
        out.backward()
        return out.detach(), h.grad, W.grad

    for got, ref in zip(run(True), run(False)):
        _same(got, ref)


def _save_titan(ctx, op, *args, **kwargs):  # type: ignore[no-untyped-def]
    from torch.utils.checkpoint import CheckpointPolicy

    # torchtitan's list (matmuls, and abs / max for low-precision scaling): the loss's own
    # checks call abs and max too, and must call them alike in forward and in the recompute.
    saved = (torch.ops.aten.mm.default, torch.ops.aten.abs.default, torch.ops.aten.max.default)
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize("bad", [False, True])
@pytest.mark.parametrize("op", ["torch", "triton", "extras", "linear"])
def test_cross_entropy_under_selective_checkpointing(op: str, bad: bool) -> None:
    # Guards: the first call (which plans), planned calls, and a NaN finding (warned in forward,
    # already shown in the recompute) all match stock under a torchtitan-like policy.
    import functools

    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    torch.manual_seed(0)
    h0, W0 = torch.randn(6, 3), torch.randn(5, 3)
    if bad:
        h0[0, 0] = float("nan")
    t = torch.tensor([0, 4, -100, 2, 1, 3])
    context = functools.partial(create_selective_checkpoint_contexts, _save_titan)

    def block(h: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        if op == "linear":
            return safeloss.linear_cross_entropy(h, W, t, ignore_index=-100, label_smoothing=0.1)
        if op == "extras":
            return safeloss.cross_entropy(h @ W.T, t, label_smoothing=0.1, return_stats=True)[0]
        return safeloss.cross_entropy(h @ W.T, t, label_smoothing=0.1, backend=op)

    h, W = h0.clone().requires_grad_(), W0.clone().requires_grad_()
    ref = F.cross_entropy(h @ W.T, t, label_smoothing=0.1)
    ref.backward()
    for _ in range(2):
        a, b = h0.clone().requires_grad_(), W0.clone().requires_grad_()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            out = checkpoint(block, a, b, use_reentrant=False, context_fn=context)
            out.backward()
        assert len(rec) <= (1 if bad else 0)
        _same(out.detach(), ref.detach())
        _same(a.grad, h.grad)
        _same(b.grad, W.grad)


# ---------------------------------------------------------------- caller's tensors edited before backward


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_vocab_parallel_weight_edited_before_backward(one_rank: None, eps: float) -> None:
    # An optimizer or a schedule updating the class weight in place between forward and
    # backward: stock refuses (its backward saved the weight); vocab-parallel's backward read
    # the live weight for the smoothing term, a silently different gradient. It keeps what
    # forward used now (as it already did without smoothing).
    torch.manual_seed(0)
    x0, t, w = torch.randn(6, 5), torch.tensor([0, 4, -100, 2, 1, 3]), torch.rand(5) + 0.1
    ref = x0.clone().requires_grad_()
    F.cross_entropy(ref, t, weight=w, label_smoothing=eps).backward()
    for _ in range(2):  # the planning call, then a planned one
        weight = w.clone()
        x = x0.clone().requires_grad_()
        out = safeloss.vocab_parallel_cross_entropy(x, t, weight=weight, label_smoothing=eps)
        weight.mul_(3.0)
        out.backward()
        _same(x.grad, ref.grad)

"""The module behaves like the stock module; strict-mode precedence; warn-once; backends; the
deferred (non-blocking) check model; no import-time side effects."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

import safeloss
from safeloss import SafeCrossEntropyLoss, SafeLossWarning
from safeloss.backends import dispatch
from tests.tolerances import assert_matches


def data(n=6, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randint(0, c, (n,), generator=g)


# ---------------------------------------------------------------- drop-in module


def test_is_a_stock_module_and_matches_it():
    w = torch.rand(5) + 0.5
    mod = SafeCrossEntropyLoss(w, ignore_index=2, label_smoothing=0.1)
    stock = torch.nn.CrossEntropyLoss(w, ignore_index=2, label_smoothing=0.1)
    assert isinstance(mod, torch.nn.CrossEntropyLoss)
    x, t = data()
    assert_matches(mod(x, t), stock(x, t))


def test_state_dict_interchangeable():
    w = torch.rand(5) + 0.5
    stock = torch.nn.CrossEntropyLoss(w)
    mod = SafeCrossEntropyLoss(torch.ones(5))
    mod.load_state_dict(stock.state_dict())
    assert torch.equal(mod.weight, w)
    back = torch.nn.CrossEntropyLoss(torch.zeros(5))
    back.load_state_dict(mod.state_dict())
    assert torch.equal(back.weight, w)
    assert list(SafeCrossEntropyLoss().state_dict()) == list(torch.nn.CrossEntropyLoss().state_dict()) == []


def test_pickle_deepcopy_to():
    mod = SafeCrossEntropyLoss(torch.rand(5) + 0.5, reduction="sum", strict=True, backend="torch")
    x, t = data()
    for clone in (pickle.loads(pickle.dumps(mod)), copy.deepcopy(mod)):
        assert clone.strict is True and clone.backend == "torch" and clone.reduction == "sum"
        assert_matches(clone(x, t), mod(x, t))
    m64 = copy.deepcopy(mod).to(torch.float64)
    assert m64.weight.dtype == torch.float64
    assert m64(x.double(), t).dtype == torch.float64
    assert "strict=True" in repr(mod) and "backend='torch'" in repr(mod)


def test_reduction_changed_after_construction_is_checked_at_forward():
    mod = SafeCrossEntropyLoss()
    mod.reduction = "avg"
    with pytest.raises(safeloss.ReductionError, match="'avg' is not a valid reduction"):
        mod(*data())


def test_invalid_backend_name():
    with pytest.raises(safeloss.BackendError, match=r"backend='cuda' is not a safeloss backend"):
        SafeCrossEntropyLoss(backend="cuda")
    with pytest.raises(safeloss.BackendError, match=r"backend='fast' is not a safeloss backend"):
        safeloss.cross_entropy(*data(), backend="fast")


# ---------------------------------------------------------------- strict precedence


def _strict_now(**kw):
    x = torch.randn(4, 3).softmax(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            safeloss.cross_entropy(x, torch.tensor([0, 1, 2, 0]), **kw)
    except safeloss.InputError:
        return True
    return False


def test_strict_precedence(monkeypatch):
    monkeypatch.delenv("SAFELOSS_STRICT", raising=False)
    assert not _strict_now()
    monkeypatch.setenv("SAFELOSS_STRICT", "1")
    assert _strict_now()
    safeloss.set_strict(False)  # global beats env
    assert not _strict_now()
    with safeloss.strict_mode():  # context beats global
        assert _strict_now()
        assert not _strict_now(strict=False)  # explicit beats context
    safeloss.set_strict(None)
    assert _strict_now()  # back to the env
    monkeypatch.setenv("SAFELOSS_STRICT", "0")
    assert not _strict_now() and _strict_now(strict=True)


def test_strict_mode_context_is_thread_local():
    seen = {}
    with safeloss.strict_mode():
        t = threading.Thread(target=lambda: seen.setdefault("other", _strict_now()))
        t.start()
        t.join()
        seen["here"] = _strict_now()
    assert seen == {"other": False, "here": True}


def test_module_strict_argument():
    x = torch.randn(4, 3).softmax(1)
    with pytest.raises(safeloss.InputError, match="already softmaxed"):
        SafeCrossEntropyLoss(strict=True)(x, torch.tensor([0, 1, 2, 0]))


# ---------------------------------------------------------------- warn once


def test_module_warns_once_per_instance():
    x = torch.randn(4, 3).softmax(1)
    t = torch.tensor([0, 1, 2, 0])
    a, b = SafeCrossEntropyLoss(), SafeCrossEntropyLoss()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(5):
            a(x, t)
        b(x, t)
    assert len([r for r in rec if issubclass(r.category, SafeLossWarning)]) == 2
    assert rec[0].filename == __file__  # points at the user's line, not at safeloss internals


def test_functional_warns_once_per_call_site():
    x = torch.randn(4, 3).softmax(1)
    t = torch.tensor([0, 1, 2, 0])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            safeloss.cross_entropy(x, t)
        safeloss.cross_entropy(x, t)  # a second call site
    assert len(rec) == 2 and rec[0].lineno != rec[1].lineno
    assert all(r.filename == __file__ for r in rec)


# ---------------------------------------------------------------- backends


def test_triton_backend_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(safeloss.BackendError, match=r"(?s)backend=\"triton\" cannot run on cpu tensors here.*TRITON_INTERPRET=1"):
        safeloss.cross_entropy(*data(), backend="triton")


def test_triton_missing_is_an_error_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_installed", lambda: False)
    with pytest.raises(safeloss.BackendError, match=r"triton package is not installed"):
        safeloss.cross_entropy(*data(), backend="triton")
    x, t = data()
    assert_matches(safeloss.cross_entropy(x, t, backend="auto"), F.cross_entropy(x, t))


def test_auto_uses_torch_on_cpu():
    x, t = data()
    assert dispatch.select("auto", safeloss.core.validation.normalize(x, t, None, -100, "mean", 0.0)) == "torch"


def test_no_import_time_side_effects():
    code = "import sys, safeloss; print('triton' in sys.modules, 'matplotlib' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


# ---------------------------------------------------------------- deferred checks (the CUDA model, on CPU)


@pytest.fixture
def deferred(monkeypatch):
    monkeypatch.setattr(safeloss.core.checks, "DEFER_ON_CPU", True)
    yield
    safeloss.core.checks._pending.clear()


def test_deferred_bad_target_is_nan_now_and_raises_next_call(deferred):
    x, t = data()
    t[3] = 9
    loss = safeloss.cross_entropy(x, t)  # no host sync: nothing raised yet ...
    assert torch.isnan(loss)  # ... but nothing trains silently either
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)found by an earlier call.*9 at \[3\]"):
        safeloss.cross_entropy(*data())


def test_deferred_per_module_and_check_pending(deferred):
    x, t = data()
    bad = t.clone()
    bad[0] = -5
    mod, other = SafeCrossEntropyLoss(reduction="none"), SafeCrossEntropyLoss()
    out = mod(x, bad)
    assert torch.isnan(out[0]) and not torch.isnan(out[1:]).any()
    other(x, t)  # another loss instance is not blocked by mod's pending error
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"-5 at \[0\]"):
        safeloss.check_pending()
    safeloss.check_pending()  # flushed: nothing left


def test_deferred_warnings(deferred):
    x, t = data()
    mod = SafeCrossEntropyLoss()
    mod(x.softmax(1), t)
    with pytest.warns(SafeLossWarning, match=r"(?s)found by an earlier call.*already softmaxed"):
        mod(x, t)
    mod(x, torch.full_like(t, -100))
    with pytest.warns(SafeLossWarning, match=r"(?s)found by an earlier call.*nothing to average"):
        safeloss.check_pending()


class _FakeEvent:
    """Stands in for a CUDA event whose work has (not yet) finished."""

    def __init__(self, done: bool) -> None:
        self.done, self.waited = done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.waited or not self.done  # waiting on finished work costs nothing
        self.done = True


def _fake_events(monkeypatch) -> list[_FakeEvent]:
    """Every deferred record gets an event the test finishes by hand (the GPU "still running")."""
    events: list[_FakeEvent] = []
    real_defer = safeloss.core.checks.defer

    def fake_defer(*args, **kwargs):
        real_defer(*args, **kwargs)
        rec = safeloss.core.checks._pending[safeloss.core.checks.FUNCTIONAL_KEY][-1]
        rec.event = _FakeEvent(done=False)
        events.append(rec.event)

    monkeypatch.setattr(safeloss.core.checks, "defer", fake_defer)
    return events


def test_deferred_calls_never_wait_for_the_gpu(deferred, monkeypatch):
    """A call reports only what finished on the GPU; unfinished records stay queued, in order,
    and no call waits on an event (that would serialize host and GPU), up to MAX_IN_FLIGHT."""
    events = _fake_events(monkeypatch)
    monkeypatch.setattr(safeloss.core.checks, "MAX_IN_FLIGHT", 3)
    x, t = data()
    bad = t.clone()
    bad[2] = 11
    safeloss.cross_entropy(x, bad)  # call 0 finds a bad label; its GPU work is "still running"
    for _ in range(3):
        safeloss.cross_entropy(x, t)  # calls 1-3: call 0 not finished, so nothing is reported
    assert not any(e.waited for e in events)
    assert len(safeloss.core.checks._pending[safeloss.core.checks.FUNCTIONAL_KEY]) == 4
    events[0].done = True  # the GPU finishes call 0: the next call reports it, without waiting
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)found by an earlier call.*11 at \[2\]"):
        safeloss.cross_entropy(x, t)
    assert not any(e.waited for e in events)
    # Beyond MAX_IN_FLIGHT records, a call waits for the oldest ones (bounded memory).
    for _ in range(3):
        safeloss.cross_entropy(x, t)
    assert events[1].waited and not events[-1].waited
    assert len(safeloss.core.checks._pending[safeloss.core.checks.FUNCTIONAL_KEY]) <= 4
    safeloss.check_pending()  # waits for everything
    assert all(e.done for e in events) and not safeloss.core.checks._pending


def test_deferred_records_survive_a_raising_report(deferred, monkeypatch):
    """Two finished records are reported by one call; the first raises: the second must not be
    lost (it is reported by the next call or check_pending)."""
    events = _fake_events(monkeypatch)
    x, t = data()
    bad = t.clone()
    bad[2] = 11
    xn = x.clone()
    xn[3, 1] = float("nan")
    safeloss.cross_entropy(x, bad)  # call 0: bad label
    safeloss.cross_entropy(xn, t)  # call 1: NaN logits
    for e in events:
        e.done = True
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"11 at \[2\]"):
        safeloss.cross_entropy(x, t)
    with pytest.warns(SafeLossWarning, match=r"(?s)found by an earlier call.*(NaN|non-finite)"):
        safeloss.check_pending()


def test_strict_call_reports_earlier_findings_first(deferred, monkeypatch):
    """A strict call syncs anyway: it must raise the earlier default-mode call's error (the first
    bad batch), not only its own."""
    _fake_events(monkeypatch)
    x, t = data()
    b0, b1 = t.clone(), t.clone()
    b0[2], b1[5] = 11, 12
    safeloss.cross_entropy(x, b0)  # default mode, GPU "busy": not reported yet
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)found by an earlier call.*11 at \[2\]"):
        safeloss.cross_entropy(x, b1, strict=True)


def test_deferred_backlog_is_bounded_in_bytes(deferred, monkeypatch):
    events = _fake_events(monkeypatch)
    monkeypatch.setattr(safeloss.core.checks, "MAX_IN_FLIGHT_BYTES", 1)  # every record is "too big"
    x, t = data()
    safeloss.cross_entropy(x, t)
    safeloss.cross_entropy(x, t)  # waits for the first record instead of keeping both
    assert events[0].waited and len(safeloss.core.checks._pending[safeloss.core.checks.FUNCTIONAL_KEY]) == 1
    assert safeloss.core.checks._pending[safeloss.core.checks.FUNCTIONAL_KEY][0].nbytes > 0


def test_deferred_records_of_a_discarded_loss_are_reported(deferred):
    """A loss module created inline each step (`nn.CrossEntropyLoss()(x, t)` style) never gets a
    second call: its records are reported by the next call of any loss, not kept forever."""
    import gc

    x, t = data()
    bad = t.clone()
    bad[1] = 9
    keep = SafeCrossEntropyLoss()  # alive throughout, so it cannot reuse the other's id (key)
    SafeCrossEntropyLoss()(x, bad)  # the module is garbage right after the call
    gc.collect()
    assert len(safeloss.core.checks._pending) == 1 and id(keep) not in safeloss.core.checks._pending
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"9 at \[1\]"):
        keep(x, t)
    assert not safeloss.core.checks._pending  # reported, not kept (the raising call deferred nothing)


def test_deferred_strict_raises_in_the_same_call(deferred):
    x, t = data()
    t[0] = 7
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"7 at \[0\]"):
        safeloss.cross_entropy(x, t, strict=True)


def test_deferred_values_match_torch(deferred):
    x, t = data()
    w = torch.rand(5) + 0.5
    for red in ("mean", "sum", "none"):
        for ls in (0.0, 0.2):
            xs, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
            ref = F.cross_entropy(xs, t, w, reduction=red, label_smoothing=ls, ignore_index=1)
            out = safeloss.cross_entropy(xo, t, w, reduction=red, label_smoothing=ls, ignore_index=1)
            assert_matches(out, ref)
            ref.sum().backward()
            out.sum().backward()
            assert_matches(xo.grad, xs.grad)
    y = torch.rand(6, 5).softmax(1)
    assert_matches(safeloss.cross_entropy(x, y, w), F.cross_entropy(x, y, w))
    safeloss.check_pending()


@pytest.mark.skipif(dispatch.triton_unavailable_reason(torch.device("cpu")) is not None, reason="no Triton interpreter")
def test_deferred_triton_kernel_flags(deferred):
    """The GPU model end to end, through the interpreter: the kernel counts in-pass, the loss of
    the bad position is NaN, the error comes at the next call with the same message."""
    x, t = data()
    t[2] = 40
    mod = SafeCrossEntropyLoss(reduction="none", backend="triton")
    out = mod(x.requires_grad_(), t)
    assert torch.isnan(out[2]) and torch.isfinite(out[[0, 1, 3, 4, 5]]).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[2] == 0).all()  # no NaN poisoning the weights
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)found by an earlier call.*40 at \[2\]"):
        mod(x, data()[1])
    mod(x.detach().softmax(1), data()[1])
    with pytest.warns(SafeLossWarning, match=r"(?s)found by an earlier call.*all 6 rows lie in \[0, 1\]"):
        safeloss.check_pending()


@pytest.mark.skipif(dispatch.triton_unavailable_reason(torch.device("cpu")) is not None, reason="no Triton interpreter")
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("option", ["fused_grad", "inplace_backward"])
def test_kernel_options_through_the_public_api(reduction, option):
    x, t = data(n=7, c=6)
    w = torch.rand(6) + 0.5
    xs, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = F.cross_entropy(xs, t, w, reduction=reduction, label_smoothing=0.1)
    mod = SafeCrossEntropyLoss(w, reduction=reduction, label_smoothing=0.1, backend="triton", **{option: True})
    assert f"{option}=True" in repr(mod)
    out = mod(xo * 1.0, t)  # a temporary the in-place option may overwrite; xo stays intact
    assert_matches(out, ref)
    up = torch.linspace(0.5, 2, ref.numel()).reshape(ref.shape) if ref.dim() else torch.tensor(1.0)
    ref.backward(up)
    out.backward(up)
    assert_matches(xo.grad, xs.grad)
    assert torch.equal(xo.detach(), x)


@pytest.mark.gpu
def test_cuda_graph_capture_and_default_mode_without_syncs():
    """Default mode on CUDA: no host sync per call (sync debug mode would raise), and the whole
    forward+backward can be captured in a CUDA graph and replayed."""
    x = torch.randn(64, 1000, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (64,), device="cuda")
    loss_fn = SafeCrossEntropyLoss()
    loss_fn(x, t).backward()  # warm-up: first-call imports and kernel compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss_fn(x, t).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    safeloss.check_pending()
    static_x = x.detach().clone().requires_grad_(True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        loss_fn(static_x, t).backward()
    torch.cuda.current_stream().wait_stream(s)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = loss_fn(static_x, t)
        static_loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    ref_x = x.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(ref_x, t)
    ref.backward()
    torch.testing.assert_close(static_loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(static_x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)


def test_copies_of_a_loss_warn_afresh_and_reset_warnings_covers_modules():
    x = torch.randn(4, 3).softmax(1)
    t = torch.tensor([0, 1, 2, 0])
    mod = SafeCrossEntropyLoss()
    with pytest.warns(SafeLossWarning):
        mod(x, t)
    clone = copy.deepcopy(mod)
    restored = pickle.loads(pickle.dumps(mod))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        mod(x, t)  # already warned: silent
        clone(x, t)
        restored(x, t)
    assert len(rec) == 2
    safeloss.reset_warnings()
    with pytest.warns(SafeLossWarning):
        mod(x, t)


def test_deferred_message_survives_a_refilled_label_buffer(deferred):
    x, t = data()
    buf = t.clone()
    buf[2] = 11
    loss_fn = SafeCrossEntropyLoss()
    loss_fn(x, buf)
    buf.copy_(t)  # a static label buffer, refilled for the next step
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"11 at \[2\]"):
        loss_fn(x, buf)


def test_elementwise_mean_warns_like_stock():
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.warns(UserWarning, match="reduction='elementwise_mean' is deprecated") as rec:
        ours = safeloss.cross_entropy(x, t, reduction="elementwise_mean")
    assert not any(issubclass(w.category, safeloss.SafeLossWarning) for w in rec)
    with pytest.warns(UserWarning, match="reduction='elementwise_mean' is deprecated"):
        stock = torch.nn.functional.cross_entropy(x, t, reduction="elementwise_mean")
    torch.testing.assert_close(ours, stock)

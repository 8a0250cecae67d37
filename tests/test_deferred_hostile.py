"""Hostile use of deferred findings (the CUDA default mode, modelled on the CPU by
``checks.DEFER_ON_CPU``): a call's findings are reported at a later call of the same loss or by
``safeloss.check_pending()``. Each finding must be reported exactly once, to the loss that made
it, with what that call saw, whatever the caller does in between."""

from __future__ import annotations

import copy
import gc
import itertools
import threading
import warnings
import weakref

import pytest
import torch

import safeloss
from safeloss import SafeCrossEntropyLoss, SafeLossWarning
from safeloss.core import checks, report


@pytest.fixture(autouse=True)
def deferred(monkeypatch):
    """The deferred model on the CPU; warn-once state and pending records restored afterwards,
    so nothing leaks into other tests (the suite turns SafeLossWarning into errors)."""
    monkeypatch.setattr(checks, "DEFER_ON_CPU", True)
    seen = set(report._seen)
    report._seen.clear()
    checks._pending.clear()
    yield
    checks._pending.clear()
    report._seen.clear()
    report._seen.update(seen)


def data(n: int = 8, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randint(0, c, (n,), generator=g)


def recorded(fn, *args, **kwargs) -> list[str]:
    """The SafeLossWarning messages ``fn`` emits (every one, not once per location)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, SafeLossWarning)]


# Calls whose finding is a warning, each from a different check: (name, make the bad call's
# logits and targets from clean ones).
def _softmaxed(x, t):
    return x.softmax(1), t


def _nan_logits(x, t):
    x = x.clone()
    x[1, 2] = float("nan")
    return x, t


def _all_ignored(x, t):
    return x, torch.full_like(t, -100)


WARNING_CALLS = {
    "softmaxed": (_softmaxed, "already softmaxed"),
    "nan-logits": (_nan_logits, "NaN or infinite"),
    "empty-mean": (_all_ignored, "nothing to average"),
}


# ---------------------------------------------------------------- warn once per loss


@pytest.mark.parametrize("kind", sorted(WARNING_CALLS))
def test_check_pending_warns_once_per_loss(kind):
    """A finding reported by check_pending() counts for its loss: the same finding at a later
    call of that loss is not shown again (each distinct warning once per instance)."""
    make, text = WARNING_CALLS[kind]
    x, t = data()
    loss = SafeCrossEntropyLoss()
    shown = recorded(lambda: (loss(*make(x, t)), safeloss.check_pending()))
    assert len(shown) == 1 and text in shown[0]
    # The same mistake again: reported at the next call, but already shown for this loss.
    shown = recorded(lambda: (loss(*make(x, t)), loss(x, t), safeloss.check_pending()))
    assert shown == []


@pytest.mark.parametrize("kind", sorted(WARNING_CALLS))
def test_dead_loss_record_is_not_charged_to_the_loss_reusing_its_id(kind):
    """A loss garbage-collected with a pending record, and a new loss at the same id (CPython
    reuses ids at once: a loss built inline every step): the old record is reported once, but
    not as the new loss's own warning, which would silence the new loss's real one."""
    make, text = WARNING_CALLS[kind]
    x, t = data()
    old = SafeCrossEntropyLoss()
    old(*make(x, t))
    old_id = id(old)
    del old
    gc.collect()
    new = SafeCrossEntropyLoss()
    if id(new) != old_id:  # the allocator chose another address: re-key as a reused id would be
        rec = checks._pending.pop(old_id)
        for r in rec:
            r.key = id(new)
        checks._pending[id(new)] = rec
    shown = recorded(new, x, t)
    assert len(shown) == 1 and text in shown[0]  # the dead loss's finding, reported once
    # The new loss's own mistake is its first: shown.
    shown = recorded(lambda: (new(*make(x, t)), new(x, t)))
    assert len(shown) == 1 and text in shown[0]
    assert recorded(safeloss.check_pending) == []


# ---------------------------------------------------------------- the caller's tensors change


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("entry", ["module", "functional"])
def test_bad_label_named_after_caller_refills_labels(reduction, entry):
    """The labels are refilled in place (a static buffer) before the next call: the error still
    names the bad call's value and position."""
    x, t = data()
    t[3] = 9
    loss = SafeCrossEntropyLoss(reduction=reduction) if entry == "module" else (
        lambda a, b: safeloss.cross_entropy(a, b, reduction=reduction))
    loss(x, t)
    t.fill_(0)
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)earlier call.*9 at \[3\]"):
        loss(x, t)
    loss(x, t)  # reported once
    safeloss.check_pending()


@pytest.mark.parametrize("overwrite", ["nan_to_num_", "zero_", "masked_fill_"])
def test_nonfinite_count_survives_caller_editing_unreduced_losses(overwrite):
    """reduction='none' returns the per-position losses, which the record keeps to name
    positions: the caller may edit them in place (mask, nan_to_num_) before the report. The
    report must still say what the call found (1 position), never "0 of 8 positions"."""
    x, t = data()
    bad, _ = _nan_logits(x, t)
    loss = SafeCrossEntropyLoss(reduction="none")
    with torch.no_grad():
        out = loss(bad, t)
    if overwrite == "masked_fill_":
        out.masked_fill_(~torch.isfinite(out), 0.0)
    else:
        getattr(out, overwrite)()
    shown = recorded(loss, x, t)
    assert len(shown) == 1 and "NaN or infinite at 1 of 8 positions" in shown[0], shown


def _linear_none_nan(loss_kind: str):
    """A linear_cross_entropy call whose losses are NaN (a NaN in the head's weight), then clean."""
    g = torch.Generator().manual_seed(1)
    h, t = torch.randn(8, 4, generator=g), torch.randint(0, 5, (8,), generator=g)
    lm = safeloss.SafeLinearCrossEntropyLoss(4, 5, reduction="none")
    with torch.no_grad():
        lm.linear.weight[1, 1] = float("nan")
        out = lm(h, t)
        lm.linear.weight[1, 1] = 0.0
    return lm, h, t, out


def test_linear_nonfinite_count_survives_caller_editing_unreduced_losses():
    lm, h, t, out = _linear_none_nan("module")
    n = int(torch.isnan(out).sum())
    out.nan_to_num_()
    shown = recorded(lm, h, t)
    assert len(shown) == 1 and f"NaN or infinite at {n} of 8 positions" in shown[0], shown


# ---------------------------------------------------------------- each loss reports its own


def _bad_labels(c: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    x, t = data(c=c)
    t[2] = 11
    return x, t


def _linear_functional_bad():
    h, t = torch.randn(8, 4), torch.randint(0, 5, (8,))
    t[2] = 11
    safeloss.linear_cross_entropy(h, torch.randn(5, 4), t)
    return lambda: safeloss.linear_cross_entropy(h, torch.randn(5, 4), t.clamp(0, 4))


def _ce_functional_bad():
    x, t = _bad_labels()
    safeloss.cross_entropy(x, t)
    return lambda: safeloss.cross_entropy(x, t.clamp(0, 4))


def _module_bad():
    x, t = _bad_labels()
    m = SafeCrossEntropyLoss()
    m(x, t)
    return lambda: m(x, t.clamp(0, 4))


def _linear_module_bad():
    h, t = torch.randn(8, 4), torch.randint(0, 5, (8,))
    t[2] = 11
    m = safeloss.SafeLinearCrossEntropyLoss(4, 5)
    m(h, t)
    return lambda: m(h, t.clamp(0, 4))


LOSSES = {"ce-functional": _ce_functional_bad, "linear-functional": _linear_functional_bad,
          "ce-module": _module_bad, "linear-module": _linear_module_bad}


@pytest.mark.parametrize(("culprit", "bystander"), list(itertools.permutations(sorted(LOSSES), 2)))
@pytest.mark.parametrize("strict", [False, True])
def test_each_loss_reports_its_own_bad_call(culprit, bystander, strict):
    """A bad call of one loss, then calls of another (default mode or strict, which waits for
    its own earlier findings): the other loss never raises the first one's error; the first
    loss's next call does, once."""
    culprit_again = LOSSES[culprit]()
    bystander_clean = LOSSES[bystander]()  # its own (bad) call: reported by its own next call
    with pytest.raises(safeloss.TargetOutOfRangeError):
        bystander_clean()
    with safeloss.strict_mode(strict):
        for _ in range(2):
            bystander_clean()
        with pytest.raises(safeloss.TargetOutOfRangeError, match="earlier call"):
            culprit_again()
        culprit_again()
    safeloss.check_pending()


# ---------------------------------------------------------------- a report that raises


@pytest.mark.parametrize("how", ["check_pending", "next-calls"])
def test_records_after_a_raising_report_are_reported_later_once(how):
    """Warnings turned into errors: the report that raises stops the flush, and the records not
    reported yet are requeued: each of the three is reported exactly once over later flushes."""
    x, t = data()
    bad = t.clone()
    bad[0] = 7
    a, b = SafeCrossEntropyLoss(), SafeCrossEntropyLoss()
    a(x.softmax(1), t)
    b(x, bad)
    safeloss.cross_entropy(x, torch.full_like(t, -100))
    flushes = ([safeloss.check_pending] * 4 if how == "check_pending" else
               [lambda: a(x, t), lambda: b(x, t), lambda: safeloss.cross_entropy(x, t)] * 2)
    raised = []
    for flush in flushes:
        with warnings.catch_warnings():
            warnings.simplefilter("error", SafeLossWarning)
            try:
                flush()
            except (SafeLossWarning, safeloss.TargetOutOfRangeError) as e:
                raised.append(type(e).__name__ + ": " + str(e).splitlines()[1])
    assert len(raised) == 3, raised
    assert sum("softmaxed" in r for r in raised) == 1
    assert sum("TargetOutOfRange" in r for r in raised) == 1
    assert sum("nothing to average" in r for r in raised) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", SafeLossWarning)
        safeloss.check_pending()  # only clean records left


def test_strict_call_raises_an_earlier_default_mode_finding_first():
    """strict toggled on after a default-mode bad call: the strict call raises the earlier
    error (it waits for it) before anything of its own, once."""
    x, t = _bad_labels()
    loss = SafeCrossEntropyLoss()
    loss(x, t)
    loss.strict = True
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)earlier call.*11 at \[2\]"):
        loss(x.softmax(1), t.clamp(0, 4))
    with pytest.raises(safeloss.InputError, match="already softmaxed"):  # its own, at once
        loss(x.softmax(1), t.clamp(0, 4))
    assert not checks._pending


# ---------------------------------------------------------------- threads


@pytest.mark.parametrize("shared", [False, True])
def test_threads_report_each_bad_call_once(shared):
    """Two threads, each with its own loss or both on one: one bad call in thread 0. Its error is
    raised once, by a later call of that same loss (in either thread when they share it), and
    never by the other thread's own loss."""
    x, t = data()
    bad = t.clone()
    bad[5] = 13
    losses = [SafeCrossEntropyLoss()] * 2 if shared else [SafeCrossEntropyLoss(), SafeCrossEntropyLoss()]
    raised: list[tuple[int, str]] = []
    start = threading.Barrier(2)

    def work(i: int) -> None:
        start.wait()
        for step in range(40):
            try:
                losses[i](x, bad if (i == 0 and step == 10) else t)
            except safeloss.TargetOutOfRangeError as e:
                raised.append((i, str(e)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    safeloss.check_pending()  # nothing left over either
    assert len(raised) == 1 and "13 at [5]" in raised[0][1], raised
    assert shared or raised[0][0] == 0


# ---------------------------------------------------------------- losses that are gone


@pytest.mark.parametrize("reuse_id", [False, True])
@pytest.mark.parametrize("kind", ["bad-label", *sorted(WARNING_CALLS)])
def test_dead_loss_record_reported_once_and_said_to_be_of_a_dead_loss(kind, reuse_id):
    """A loss garbage-collected with a pending record (built inline every step): the record is
    reported once, at the next call of any loss (one at another id, or one reusing the dead
    loss's id), and the message does not claim it came from "this loss"."""
    x, t = data()
    old = SafeCrossEntropyLoss()
    if kind == "bad-label":
        bad = t.clone()
        bad[4] = 17
        old(x, bad)
    else:
        old(*WARNING_CALLS[kind][0](x, t))
    old_id = id(old)
    del old
    gc.collect()
    new = SafeCrossEntropyLoss()
    keep = []
    while (id(new) == old_id) != reuse_id:  # pick an instance at (or away from) the dead id
        keep.append(new)
        new = SafeCrossEntropyLoss()
        if len(keep) > 50:
            rec = checks._pending.pop(old_id)  # the allocator will not: re-key as reuse would
            for r in rec:
                r.key = id(new)
            checks._pending[id(new)] = rec
            break
    if kind == "bad-label":
        with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)a loss that no longer exists.*17 at \[4\]"):
            new(x, t)
    else:
        shown = recorded(new, x, t)
        assert len(shown) == 1 and "a loss that no longer exists" in shown[0]
        assert WARNING_CALLS[kind][1] in shown[0]
    assert recorded(new, x, t) == []
    assert recorded(safeloss.check_pending) == []


# ---------------------------------------------------------------- host buffers and in-flight caps


class _Unfinished:
    """A CUDA event whose work has not finished until waited for (the GPU still running)."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


@pytest.mark.parametrize("cap", [1, 2, 5])
def test_pooled_host_buffers_never_shared_by_unreported_records(monkeypatch, cap):
    """Records in flight (GPU unfinished), clean ones reported and their host buffers recycled
    around an unreported bad one, beyond the in-flight cap: the bad record's counts are never
    overwritten by a later call, no two records share a buffer, and the error names the bad
    call's values, once."""
    real_defer = checks.defer

    def defer(*args, **kwargs):
        real_defer(*args, **kwargs)
        rec = checks._pending[checks.FUNCTIONAL_KEY][-1]
        rec.event = _Unfinished()

    monkeypatch.setattr(checks, "defer", defer)
    monkeypatch.setattr(checks, "MAX_IN_FLIGHT", cap)
    monkeypatch.setattr(checks, "_release", _release_eventless)
    x, t = data()
    bad = t.clone()
    bad[6] = 21
    raised = []
    for step in range(12):
        try:
            safeloss.cross_entropy(x, bad if step == 3 else t)
        except safeloss.TargetOutOfRangeError as e:
            raised.append((step, str(e)))
        queue = checks._pending.get(checks.FUNCTIONAL_KEY, [])
        held = [id(r.bufs[0]) for r in queue]
        pooled = [id(b[0]) for free in checks._free_host.values() for b in free]
        assert len(set(held)) == len(held) and not set(held) & set(pooled)
        if step == 7:
            queue[-1].event.done = True  # the GPU finishes one late record: nothing jumps the queue
    for rec in checks._pending.get(checks.FUNCTIONAL_KEY, []):
        rec.event.done = True
    safeloss.check_pending()
    assert len(raised) == 1 and "21 at [6]" in raised[0][1], raised
    assert raised[0][0] > 3


_REAL_RELEASE = checks._release


def _release_eventless(rec):
    """The fake events are no CUDA events: recycle the host buffers only (as _release does)."""
    rec.event = None
    _REAL_RELEASE(rec)


# ---------------------------------------------------------------- known gaps (xfail, strict)


# Inference tensors have no version counter: the record keeps a copy of reduction='none' losses
# made under torch.inference_mode, so an in-place edit by the caller cannot change the report.
def test_inference_mode_nonfinite_count_survives_caller_editing_losses():
    x, t = data()
    bad, _ = _nan_logits(x, t)
    loss = SafeCrossEntropyLoss(reduction="none")
    with torch.inference_mode():
        loss(bad, t).nan_to_num_()
        shown = recorded(loss, x, t)
    assert len(shown) == 1 and "NaN or infinite at 1 of 8 positions" in shown[0], shown


# The compiled graph's report op knows a loss only by id(module): the loss registers the
# finalizer that forgets its warn-once state when it is made (and when unpickled or copied).
@pytest.mark.parametrize("make", ["new", "deepcopy"])
def test_compiled_loss_warn_once_state_dies_with_the_loss(make: str):
    torch._dynamo.reset()
    x, t = data()

    def warn_once_compiled() -> tuple[int, weakref.ref]:
        loss = SafeCrossEntropyLoss() if make == "new" else copy.deepcopy(SafeCrossEntropyLoss())
        step = torch.compile(lambda a, b: loss(a, b), backend="aot_eager", fullgraph=True)
        assert len(recorded(lambda: (step(x.softmax(1), t), step(x, t)))) == 1
        return id(loss), weakref.ref(loss)

    dead, ref = warn_once_compiled()
    torch._dynamo.reset()
    gc.collect()
    assert ref() is None  # the loss is gone (the test's premise)
    assert not [k for k in report._seen if k[1] == "loss" and k[2] == dead]


@pytest.mark.parametrize("make", ["new", "deepcopy", "pickle"])
@pytest.mark.parametrize("cls", ["SafeCrossEntropyLoss", "SafeLinearCrossEntropyLoss"])
def test_loss_modules_forget_their_warn_once_state_when_gone(cls: str, make: str):
    import pickle

    from safeloss.core import report as rep

    def build() -> object:
        m = SafeCrossEntropyLoss() if cls == "SafeCrossEntropyLoss" else safeloss.SafeLinearCrossEntropyLoss(4, 3)
        return m if make == "new" else copy.deepcopy(m) if make == "deepcopy" else pickle.loads(pickle.dumps(m))

    m = build()
    oid = id(m)
    assert oid in rep._watched
    rep._seen.add(("softmaxed-input", "loss", oid))  # what a compiled call's report op would add
    del m
    gc.collect()
    assert oid not in rep._watched
    assert ("softmaxed-input", "loss", oid) not in rep._seen

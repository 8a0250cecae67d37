"""Hostile use of deferred findings (the CUDA default mode, modelled on the CPU by
``checks.DEFER_ON_CPU``): a call's findings are reported at a later call of the same loss or by
``safeloss.check_pending()``. Each finding must be reported exactly once, to the loss that made
it, with what that call saw, whatever the caller does in between."""

from __future__ import annotations

import gc
import itertools
import threading
import warnings

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

"""Hostile calls of planned signatures (safeloss/core/plan.py): a call that takes a plan must give
the result, error, warnings and gradients the same call gives with every plan forgotten
(``plan.clear()``), and stock torch's where the docs promise it.

Each test makes the plan first (clean calls of one signature), then changes something the key
cannot see (an option object mutated in place, a tensor whose memory is not where its
``data_ptr`` says, a TorchFunctionMode that overrides what the full path calls) and compares
with the same call made without a plan.
"""

from __future__ import annotations

import builtins
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import safeloss
from safeloss.core import plan as plans

N, C, H = 6, 5, 8


def _logits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, C, generator=g) * 3, torch.tensor([0, 1, 2, 3, 4, 0])


def _head(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, H, generator=g), torch.randn(C, H, generator=g), torch.tensor([0, 1, 2, 3, 4, 0])


def _planned_then_cleared(call: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the call as made now, the same call with no plan stored)."""
    planned = call()
    plans.clear()
    return planned, call()


# ------------------------------------------------------------- option objects mutated in place

# Options given as 0-d tensors (stock's argument parser takes them as ints / floats). A tensor
# hashes by identity: a key holding one would match the same object after an in-place change of
# its value, and replay the value the plan was made with.
OPTION_MUTATIONS = {
    "ignore_index": (lambda: torch.tensor(-100), lambda v: v.fill_(0)),
    "label_smoothing": (lambda: torch.tensor(0.0), lambda v: v.fill_(0.4)),
}


def _ce_functional(option: str, value: object) -> Callable[[], torch.Tensor]:
    x, t = _logits()
    return lambda: safeloss.cross_entropy(x, t, **{option: value})


def _ce_module(option: str, value: object) -> Callable[[], torch.Tensor]:
    x, t = _logits()
    m = safeloss.SafeCrossEntropyLoss()
    setattr(m, option, value)
    return lambda: m(x, t)


def _linear_functional(option: str, value: object) -> Callable[[], torch.Tensor]:
    x, w, t = _head()
    return lambda: safeloss.linear_cross_entropy(x, w, t, **{option: value})


OPS = {"ce-functional": _ce_functional, "ce-module": _ce_module, "linear-functional": _linear_functional}


@pytest.mark.parametrize("option", sorted(OPTION_MUTATIONS))
@pytest.mark.parametrize("op", sorted(OPS))
def test_an_option_tensor_changed_in_place_is_read_again(op: str, option: str) -> None:
    make, mutate = OPTION_MUTATIONS[option]
    value = make()
    call = OPS[op](option, value)
    call()
    first = call()
    mutate(value)
    planned, cleared = _planned_then_cleared(call)
    assert not torch.equal(first, cleared), "the mutation must change the loss (else this test proves nothing)"
    torch.testing.assert_close(planned, cleared, rtol=0, atol=0)
    assert plans.size() == 0 or all(
        not isinstance(part, torch.Tensor) for key in plans._plans for part in _flat(key)
    ), "the plan store holds no tensor"


def _flat(key: object) -> list[object]:
    if isinstance(key, tuple):
        return [leaf for part in key for leaf in _flat(part)]
    return [key]


# -------------------------------------------------------------- memory the host path must not read

def test_a_zero_tensor_on_a_planned_signature_gives_stock_values() -> None:
    """A ZeroTensor (``torch._efficientzerotensor``: what forward-mode AD makes of a zero tangent)
    has no memory: data_ptr() is 0. The host path's raw read of the first logit must not follow
    it (a segfault); stock torch computes the loss of all-zero logits, log(C). In a subprocess: a
    regression crashes the interpreter."""
    code = textwrap.dedent(f"""
        import math, torch, safeloss
        x, t = torch.randn({N}, {C}), torch.tensor([0, 1, 2, 3, 4, 0])
        for reduction in ("mean", "sum", "none"):
            for dtype in (torch.float32, torch.float64, torch.float16):
                safeloss.cross_entropy(x.to(dtype), t, reduction=reduction)
                safeloss.cross_entropy(x.to(dtype), t, reduction=reduction)
                z = torch._efficientzerotensor({N}, {C}, dtype=dtype)
                assert z.data_ptr() == 0
                got = safeloss.cross_entropy(z, t, reduction=reduction)
                want = torch.nn.functional.cross_entropy(z, t, reduction=reduction)
                torch.testing.assert_close(got, want)
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", (res.returncode, res.stderr[-2000:])


# ----------------------------------------------------------------------- TorchFunctionMode

class _Override(TorchFunctionMode):
    """Replaces one torch function's result, as a user's mode may (quantization simulators,
    loss-scaling shims): the call that reaches it must see the same functions with or without a plan."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", None) == self.name and isinstance(out, torch.Tensor):
            return out * 0 + 42.0
        return out


def _ce_under_mode() -> torch.Tensor:
    x, t = _logits()
    with _Override("cross_entropy"):
        return safeloss.cross_entropy(x, t)


def _linear_under_mode() -> torch.Tensor:
    x, w, t = _head()
    with _Override("linear"):
        return safeloss.linear_cross_entropy(x, w, t)


@pytest.mark.parametrize("call", [_ce_under_mode, _linear_under_mode], ids=["ce", "linear"])
def test_a_torch_function_mode_sees_the_same_calls_with_a_plan(call: Callable[[], torch.Tensor]) -> None:
    first = call()
    second = call()
    plans.clear()
    third = call()
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(third, first, rtol=0, atol=0)


def test_ce_under_a_function_mode_is_stocks() -> None:
    """What the mode sees of the cross-entropy op: stock's own F.cross_entropy, every call."""
    x, t = _logits()
    with _Override("cross_entropy"):
        want = F.cross_entropy(x, t)
        got = [safeloss.cross_entropy(x, t) for _ in range(3)]
    for g in got:
        torch.testing.assert_close(g, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- autocast

def test_linear_plan_made_under_another_devices_autocast_is_not_taken_under_cpu_autocast(autocast_or_skip) -> None:
    """Autocast on for a device other than the tensors' (XPU here: it needs no such device to be
    entered) changes nothing for a CPU call, which may store a plan; the CPU's own autocast
    changes the compute dtype, which the planned path (plain float32 ops) must not run under:
    the same call with no plan runs the chunk loop in bfloat16, as the full path decides."""
    x, w, t = _head()
    x.requires_grad_()

    def call(device: str) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_or_skip(device):
            out = safeloss.linear_cross_entropy(x, w, t)
        return out, torch.autograd.grad(out, x)[0]

    call("xpu")
    call("xpu")
    planned = call("cpu")
    plans.clear()
    cleared = call("cpu")
    torch.testing.assert_close(planned[0], cleared[0], rtol=0, atol=0)
    torch.testing.assert_close(planned[1], cleared[1], rtol=0, atol=0)


# ------------------------------------------------------------------------------------ threads

def _evicted_by_another_thread(it):  # type: ignore[no-untyped-def]
    """``next`` as seen by ``plan.store`` when another thread evicts the same oldest plan
    between this thread's ``next(iter(...))`` and its ``pop``."""
    key = builtins.next(it)
    plans._plans.pop(key)
    return key


def _changed_by_another_thread(it):  # type: ignore[no-untyped-def]
    """``next`` when another thread stores a plan between ``iter(...)`` and ``next``."""
    raise RuntimeError("dictionary changed size during iteration")


@pytest.mark.parametrize("race", [_evicted_by_another_thread, _changed_by_another_thread],
                         ids=["evicted", "changed"])
def test_a_full_store_raced_by_another_thread_never_fails_the_call(monkeypatch, race) -> None:  # type: ignore[no-untyped-def]
    """Seen with 6 threads calling the loss on ever-new shapes (``MAX_PLANS`` small): a KeyError
    out of a clean call. Reproduced here deterministically at the two points where the eviction
    of the oldest plan can interleave with another thread's."""
    monkeypatch.setattr(plans, "MAX_PLANS", 2)
    for n in (1, 2):
        safeloss.cross_entropy(torch.randn(n, C), torch.zeros(n, dtype=torch.long))
    assert plans.size() == 2
    monkeypatch.setattr(plans, "next", race, raising=False)
    x, t = _logits()
    torch.testing.assert_close(safeloss.cross_entropy(x, t), F.cross_entropy(x, t), rtol=0, atol=0)
    assert plans.size() <= 3

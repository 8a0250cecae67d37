"""Plans: what a call's *signature* settles, worked out once per signature.

A signature is everything an op's argument checks, its backend choice and its launch geometry
depend on other than tensor values: shapes, dtypes, devices, ``requires_grad``, the options,
the grad mode and the autocast state. Each op builds its key from those (one tuple, see
``safeloss.ce.pipeline.signature``); the first *clean* eager call of a signature (its argument
checks found nothing to report and converted nothing) stores a :class:`Plan` under it, and a
later call with an equal key takes the plan: a dictionary lookup instead of the argument checks
and the backend choice, then the per-call value checks and the compute.

What a plan never holds, and a call therefore always does again:

* every check of tensor *values* (labels in range, NaN/inf, softmaxed input, probability rows,
  negative class weights): they run per call exactly as without a plan, and a call whose values
  are bad raises or warns as it would have;
* strictness (``strict=``, ``strict_mode()``, ``set_strict()``, ``SAFELOSS_STRICT``): read per
  call where it matters, as before;
* test hooks read per call (``checks.DEFER_ON_CPU``), and, for the Triton backend on CPU tensors
  (the interpreter), whether Triton can run there (``TRITON_INTERPRET``).

What invalidates a plan is whatever changes its key: a new shape, stride-free layout, dtype,
device, ``requires_grad``, option value (or its type: ``ignore_index=True`` is not ``1``), grad mode
or autocast state gives another key, and so another plan (or none). Calls that carry state a key
cannot see never use plans: non-eager modes (compile, tracers, transforms, DTensor, ...), legacy
``size_average`` / ``reduce`` arguments, and calls with a finding from shapes or dtypes.

The store is bounded (:data:`MAX_PLANS`, oldest dropped first), holds no tensor, and
:func:`clear` empties it (tests, or after monkeypatching safeloss internals).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .validation import Problem

_C = torch._C

# Signatures a process keeps plans for. A training loop has a handful (train / eval batch
# shapes); a loop over ever-new shapes (variable sequence lengths) only cycles the oldest out.
MAX_PLANS = 256

_plans: dict[tuple[Any, ...], Any] = {}
# Counters for tests and the benchmark: plans stored, lookups that found one.
stats = {"stored": 0, "hits": 0}


def get(key: tuple[Any, ...]) -> Any:
    """The plan stored under ``key``, or None."""
    try:
        plan = _plans.get(key)
    except TypeError:  # an unhashable option value (fused_grad=[]): such calls get no plan
        return None
    if plan is not None:
        stats["hits"] += 1
    return plan


def store(key: tuple[Any, ...], plan: Any) -> None:
    try:
        hash(key)
    except TypeError:
        return
    if len(_plans) >= MAX_PLANS:
        _plans.pop(next(iter(_plans)))  # dicts keep insertion order: the oldest first
    _plans[key] = plan
    stats["stored"] += 1


def clear() -> None:
    """Forget every plan (the next call of each signature runs the full checks again)."""
    _plans.clear()


def size() -> int:
    return len(_plans)


def autocast_key(device_type: str) -> bool:
    """Whether autocast applies to tensors of ``device_type`` now (the only autocast state the
    argument checks read: cross_entropy is one of autocast's float32 ops)."""
    if not _C._is_any_autocast_enabled():
        return False
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know
        return False


class Skeleton:
    """A validated :class:`~safeloss.core.validation.Problem` less its tensors: what the argument
    checks concluded for a signature whose tensors they passed through unchanged."""

    __slots__ = ("ignore_index", "label_smoothing", "num_classes", "out_dtype", "prob", "reduction")

    def __init__(self, p: Problem) -> None:
        self.prob = p.prob
        self.ignore_index = p.ignore_index
        self.label_smoothing = p.label_smoothing
        self.reduction = p.reduction
        self.num_classes = p.num_classes
        self.out_dtype = p.out_dtype

    def problem(self, input: Tensor, target: Tensor, weight: Tensor | None) -> Problem:
        """The Problem ``normalize`` returns for these tensors (built only where a call needs it)."""
        return Problem(input, target, self.prob, weight, self.ignore_index, self.label_smoothing,
                       self.reduction, self.num_classes, self.out_dtype, [])

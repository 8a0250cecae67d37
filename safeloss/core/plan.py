"""Plans: what a call's *signature* settles, worked out once per signature.

A signature is everything an op's argument checks, its backend choice and its launch geometry
depend on other than tensor values: shapes, layouts, dtypes, devices, the options (with their
types), whether a class weight requires grad in grad mode, the autocast state and whether a
TorchFunctionMode is active. Each op builds its key from those in the one function that also
serves the planned call (``safeloss.ce.pipeline.fast``, ``safeloss.linear.api._fast``); the
first *clean* eager call of a signature (its argument checks found nothing to report and
converted nothing) stores a plan under it, and a later call with an equal key takes the plan: a
dictionary lookup instead of the argument checks and the backend choice, then the per-call value
checks and the compute. On the CPU a planned call costs ~7-14 us over stock's own op
(benchmarks/cpu_overhead.py).

What a plan never holds, and a call therefore always does again:

* every check of tensor *values* (labels in range, NaN/inf, softmaxed input, probability rows,
  negative class weights): they run per call exactly as without a plan, and a call whose values
  are bad raises or warns as it would have;
* strictness (``strict=``, ``strict_mode()``, ``set_strict()``, ``SAFELOSS_STRICT``): read per
  call where it matters, as before;
* test hooks read per call (``checks.DEFER_ON_CPU``; the linear chunk loop's ``FORCE_ROWS``,
  ``FORCE_VOCAB_TILE``, ``HALF_OPERANDS_ON_CPU`` and CPU ``BUDGET_BYTES``), and, for the Triton backend on CPU tensors
  (the interpreter), whether Triton can run there (``TRITON_INTERPRET``).

What invalidates a plan is whatever changes its key: a new shape, layout, dtype, device, option
value (or its type: ``ignore_index=True`` is not ``1``), weight requiring grad, autocast state
or TorchFunctionMode gives another key, and so another plan (or none). Strides are not in it
(the Triton launch configurations key them themselves; the CPU host path tests what it reads). Calls that carry state a key
cannot see never use plans: non-eager modes (compile, tracers, transforms, DTensor, ...), legacy
``size_average`` / ``reduce`` arguments, calls with a finding from shapes or dtypes, calls
under a TorchFunctionMode (the mode must see the functions the full path calls), and options
held in objects whose value can change in place (a 0-d tensor as ``ignore_index``). Linear
cross-entropy also takes no plan under saved-tensor hooks (``save_on_cpu``, a non-reentrant
checkpoint): its planned call saves other tensors than its full path, and a checkpoint's
recompute must save what its forward saved.

The store is bounded (:data:`MAX_PLANS`, oldest dropped first), holds no tensor with memory (a
vocab-parallel plan's stand-in for the global logits is a meta tensor), and
:func:`clear` empties it (tests, or after monkeypatching safeloss internals).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from .validation import Problem

_C = torch._C

# Signatures a process keeps plans for. A training loop has a handful (train / eval batch
# shapes); a loop over ever-new shapes (variable sequence lengths) only cycles the oldest out.
MAX_PLANS = 256

_plans: dict[tuple[Any, ...], Any] = {}
# Counter for tests and the benchmark: plans stored.
stats = {"stored": 0}


def get(key: tuple[Any, ...]) -> Any:
    """The plan stored under ``key``, or None. (Hot paths call ``_plans.get`` themselves, and
    catch the TypeError of an unhashable option value: such calls get no plan.)"""
    try:
        return _plans.get(key)
    except TypeError:
        return None


def store(key: tuple[Any, ...], plan: Any) -> None:
    """Keep ``plan`` under ``key``, unless the key holds an object whose value can change while
    it stays the same key (a 0-d tensor passed as ``ignore_index``: it hashes by identity, so
    after ``fill_`` the key would still match and replay the old value), or unless a
    TorchFunctionMode is active (a planned call skips stock's Python layer that hands calls to
    the mode, so the mode would see other functions than without a plan). Such calls run the
    full path every time. (Cold: once per signature.)"""
    if _C._is_torch_function_mode_enabled() or not _frozen(key):
        return
    try:
        hash(key)
    except TypeError:
        return
    if len(_plans) >= MAX_PLANS:
        # Suppressed: another thread evicted that plan first, or stored one between iter() and
        # next(); the call that stores must never fail for it (a store or two past the bound,
        # evicted by the next ones).
        with contextlib.suppress(KeyError, RuntimeError, StopIteration):
            _plans.pop(next(iter(_plans)))  # dicts keep insertion order: the oldest first
    _plans[key] = plan
    stats["stored"] += 1


# Values a key may hold: immutable, compared by value. (NumPy scalars are immutable too; NumPy
# is not imported for them: their types' module says it.)
_FROZEN = frozenset({int, float, bool, str, type(None), type, torch.Size, torch.dtype, torch.layout,
                     torch.device})


def _frozen(part: object) -> bool:
    if type(part) is tuple:
        return all(_frozen(p) for p in part)  # type: ignore[union-attr]
    kind = type(part)
    return kind in _FROZEN or (kind.__module__ == "numpy" and kind.__name__ != "ndarray") or (
        # A process group (the vocab-parallel op's): compared by identity, and no value of it
        # that a plan depends on (its ranks) ever changes.
        kind.__name__ == "ProcessGroup" and kind.__module__.startswith("torch."))


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

"""``safeloss.patch()``: route code you did not write (Hugging Face, Lightning, old scripts) through safeloss.

What is reached while patched:

* every call of ``torch.nn.functional.cross_entropy`` looked up through the module at call time
  (``F.cross_entropy(...)``, ``nn.functional.cross_entropy(...)``: Hugging Face's loss functions);
* every ``torch.nn.CrossEntropyLoss`` instance, including those created before ``patch()`` and
  those built from a class reference captured with ``from torch.nn import CrossEntropyLoss``:
  the class's ``forward`` itself is replaced;
* the global ``cross_entropy`` bound by ``from torch.nn.functional import cross_entropy`` in
  modules already imported when ``patch()`` runs (modules imported later pick up the patched
  attribute);
* all of the above inside ``torch.compile``d code (traced like user code; fullgraph works), and
  under ``torch.jit.trace``, ``torch.fx``, ``make_fx``, fake and meta tensors (safeloss.tracing);
* ``torch.nn.functional.linear_cross_entropy`` and ``torch.nn.LinearCrossEntropyLoss`` in the same
  ways, on both of stock's paths (see ``safeloss.linear.patch``);
* the cross-entropy losses of other libraries that compute exactly cross-entropy by hand:
  Hugging Face's ``LabelSmoother`` and timm's ``LabelSmoothingCrossEntropy`` and
  ``SoftTargetCrossEntropy``, when their module is imported (never by safeloss; see
  ``safeloss.patch.thirdparty``).

What is not reached: references kept anywhere else (other names such as ``... import
cross_entropy as ce``, closures, default arguments, class attributes, containers),
``F.nll_loss(F.log_softmax(...))`` and other hand-written losses, fused losses from other libraries,
TorchScript (scripted code compiles stock torch), and tensor subclasses other than tracers' fake
and functional tensors (NestedTensor, ...), which keep stock torch's own dispatch. DTensor arguments
take safeloss's DTensor route (``safeloss.parallel.dtensor``: every layout, in or outside
``loss_parallel()``, eager or under ``torch.compile``, where the call runs eagerly). ``SafeCrossEntropyLoss`` and ``safeloss.cross_entropy`` are unaffected.

``unpatch()`` puts back exactly what was there, and a patched reference that escaped anyway
(kept in a closure while patched) behaves as stock torch once unpatched, so nothing leaks.

Cost: entering and leaving ``patch()`` does not depend on how many modules are imported (each
module is looked at once, when first seen: ``safeloss.patch._index``); about 10 us a ``with``
block with Transformers imported, so ``with safeloss.patch():`` around a training step is free.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

from ..ce import pipeline
from ..ce.functional import cross_entropy as _safe_cross_entropy
from ..core import tools as tracing
from ..core._traceback import boundary, functional_boundary, module_call
from ..core.errors import ArgumentTypeError
from ..core.mode import Mode, decide
from ..core.validation import check_label_smoothing, check_reduction
from ..linear import patch as _linear_patch
from ..parallel import dtensor as _parallel_dtensor
from . import thirdparty as _thirdparty
from ._index import ModuleIndex

_CLS = torch.nn.CrossEntropyLoss
_FUNCTIONAL = torch.nn.functional

_lock = threading.RLock()
_stack: list[_Patch] = []  # active patch() calls, innermost last
_current: _Patch | None = None  # _stack[-1] or None: read once per call, so unpatch() cannot race it
# Thread id -> the innermost active handle that thread's patch() returned, only while handles of two
# or more threads are active (empty otherwise, so a call pays one truthiness test): a thread's own
# ``with patch(strict=...)`` applies in it even when another thread patched after it. Threads with
# no handle of their own (DataParallel's workers, say) follow the innermost handle, ``_current``.
_per_thread: dict[int, _Patch] = {}
_saved_function: Callable[..., Tensor] = _FUNCTIONAL.cross_entropy  # what patch() replaced
_saved_forward: Callable[..., Tensor] = _CLS.forward
_saved_call: Callable[..., Any] | None = None  # the class's own __call__ before patch(), if any
_NAME = "cross_entropy"
_rebound: list[dict[str, Any]] = []  # globals of the modules whose ``cross_entropy`` patch() rebound
# The modules whose globals hold a name patch() rebinds, each module looked at once (see _index).
_modules = ModuleIndex((_NAME, _linear_patch._NAME))

_NO_BUFFER = object()  # a module without a "weight" buffer (reassigned as a Parameter, say)


def _plain(*tensors: object) -> bool:
    """True when every tensor argument is a plain tensor, a parameter, or a tracer's tensor.

    Other subclasses (NestedTensor, user wrappers) carry their own dispatch that the
    checks were not written for; they keep stock behaviour, so patching never breaks them. Fake and
    functional tensors (make_fx, AOTAutograd, non-strict torch.export, FakeTensorMode) are what
    safeloss.tracing handles.
    """
    for t in tensors:  # noqa: SIM110 (a loop, not all(): a generator costs a call per item)
        if t is not None and type(t) not in _ROUTED:
            return False
    return True


_PLAIN = (Tensor, torch.nn.Parameter)
_ROUTED = (Tensor, torch.nn.Parameter, FakeTensor, FunctionalTensor)


def _routed(input: object, target: object, weight: object) -> bool:
    """Whether safeloss takes this call: plain tensors, or DTensor arguments (any layout, eager or
    compiled: a compiled stock call on DTensors would otherwise run unchecked)."""
    if _plain(input, target, weight):
        return True
    return _parallel_dtensor.applies(input, target, weight)


_depth = 0  # patched calls in progress; only read while torch.compile traces (see _reentrant)


def _reentrant() -> bool:
    """True when safeloss itself called the patched function.

    safeloss's torch backend calls the stock function it captured at import, so this is a safety
    net: any safeloss code that looks ``F.cross_entropy`` up on the module while patched must reach
    stock torch, or it would recurse into safeloss. Eagerly, the caller's module settles it, whichever safeloss entry point (the
    patch, ``SafeCrossEntropyLoss``, ``safeloss.cross_entropy``) started the call. torch.compile
    cannot trace frame objects (a graph break per call), so while it traces, a patched call already
    in progress says it instead; a direct ``SafeCrossEntropyLoss`` call is then traced twice over,
    which costs tracing time but not correctness.
    """
    if torch.compiler.is_compiling():
        return _depth > 0
    # Frames: 0 here, 1 _functional, 2 cross_entropy, 3 its caller.
    name = sys._getframe(3).f_globals.get("__name__", "")
    return name == "safeloss" or (name.startswith("safeloss.") and name != __name__)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    # Stock signature exactly: callers that pass arguments by name or position keep working.
    # TorchScript parses this whole body (no try, no global here) but compiles only this branch.
    if torch.jit.is_scripting():
        return _saved_function(
            input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing
        )
    if torch.compiler.is_dynamo_compiling():  # Dynamo: no context manager of ours to trace
        return _functional(
            input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing
        )
    with functional_boundary:  # a SafeLossError's traceback ends at the caller's line (no try: TorchScript)
        return _functional(
            input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing
        )


cross_entropy.__doc__ = (
    "torch.nn.functional.cross_entropy, routed through safeloss by safeloss.patch().\n\n"
    + (_saved_function.__doc__ or "")
)


def _functional(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    size_average: bool | None,
    ignore_index: int,
    reduce: bool | None,
    reduction: str,
    label_smoothing: float,
) -> Tensor:
    global _depth
    current = _current
    if current is None:
        return _saved_function(
            input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing
        )
    if not (type(input) in _PLAIN and type(target) in _PLAIN and (weight is None or type(weight) in _PLAIN)):
        # (Plain tensors, the common case, first: no Proxy among them.)
        if (proxy := tracing.fx_proxy(input, target, weight)) is not None:
            # torch.fx.symbolic_trace: one node calling this function, as stock records one
            # calling its own; the graph reaches safeloss while patched, and stock torch once
            # unpatched.
            return tracing.fx_call(proxy, cross_entropy, input, target, dict(
                weight=weight, size_average=size_average, ignore_index=ignore_index, reduce=reduce,
                reduction=reduction, label_smoothing=label_smoothing))
        if not _routed(input, target, weight):
            return _saved_function(
                input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing
            )
    if _reentrant():
        return _saved_function(
            input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing
        )
    _depth += 1
    try:
        return _safe_cross_entropy(
            input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing,
            strict=strictness(current),
        )
    finally:
        _depth -= 1


def _forward(self: torch.nn.CrossEntropyLoss, input: Tensor, target: Tensor) -> Tensor:
    """``torch.nn.CrossEntropyLoss.forward`` while patched: the module's own settings, safeloss's
    checks. ``owner=self`` gives the same warn-once-per-instance behaviour as SafeCrossEntropyLoss."""
    if torch.jit.is_scripting():  # as in cross_entropy: TorchScript compiles only this branch
        return torch.nn.functional.cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
        )
    if torch.compiler.is_dynamo_compiling():
        return _module_forward(self, input, target)
    with boundary:  # as in cross_entropy
        return _module_forward(self, input, target)


def _module_forward(self: torch.nn.CrossEntropyLoss, input: Tensor, target: Tensor) -> Tensor:
    global _depth
    current = _current
    buffers = self._buffers  # the weight buffer without nn.Module.__getattr__ (about 1 us)
    weight = buffers.get("weight", _NO_BUFFER)
    if weight is _NO_BUFFER:
        weight = self.weight
    if current is None or not _routed(input, target, weight):
        return _saved_forward(self, input, target)
    if _per_thread and not torch.compiler.is_compiling():  # see strictness()
        current = _per_thread.get(threading.get_ident(), current)
    _depth += 1
    try:
        key = None
        if not torch.compiler.is_compiling():
            # A signature seen before: its plan (core.plan), then only the value checks.
            key = pipeline.fast(input, target, weight, self.ignore_index, self.reduction,
                                self.label_smoothing, "auto", False, False, current.strict, self)
            if isinstance(key, Tensor):
                return key
        mode = decide(input, target, weight)
        if mode is Mode.DTENSOR and pipeline.parallel_dtensor.is_dtensor(input):
            # Before any argument check: the parallel engine checks them after its first collective.
            return pipeline.dtensor_logits(input, target, weight, self.ignore_index, self.reduction,
                                           self.label_smoothing, strict=current.strict, backend="auto",
                                           owner=self)  # type: ignore[return-value]
        return pipeline.run(
            mode, input, target, weight, self.ignore_index, check_reduction(self.reduction),
            check_label_smoothing(self.label_smoothing), strict=current.strict,
            backend="auto", inplace_backward=False, owner=self, key=key if mode is Mode.EAGER else None,
        )
    finally:
        _depth -= 1


_forward.__name__ = "forward"
_forward.__qualname__ = "CrossEntropyLoss.forward"


class _Patch:
    """The handle ``patch()`` returns; as a context manager it undoes its own ``patch()``, and
    entered again after that it patches again (``p = patch()``, then ``with p:`` each step)."""

    def __init__(self, strict: bool | None) -> None:
        self.strict = strict
        self.thread = threading.get_ident()  # the thread that called patch() (or entered it again)

    def __enter__(self) -> _Patch:
        if self not in _stack:
            # A handle kept and entered again (``p = patch()`` ... ``with p:`` in a loop) after its
            # block or unpatch() removed it: patch again, or the block would run unpatched, silently.
            with _lock:
                if self not in _stack:
                    self.thread = threading.get_ident()
                    _push(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with _lock:
            if self in _stack:  # unpatch() inside the block already removed everything
                _stack.remove(self)
                _settle()

    def __repr__(self) -> str:
        return f"safeloss.patch(strict={self.strict!r})"


def patch(strict: bool | None = None) -> _Patch:
    """Route ``torch.nn.CrossEntropyLoss`` and ``torch.nn.functional.cross_entropy`` through safeloss.

    Usable as a call (``safeloss.patch()``, undone by ``safeloss.unpatch()``) or as a context
    manager (``with safeloss.patch(): ...``, undone on exit). Calling it again while patched
    installs nothing twice; a nested ``with`` block's ``strict`` applies inside it only.

    Args:
        strict: strict mode for the patched calls; ``None`` follows ``safeloss.strict_mode()``,
            ``safeloss.set_strict()`` and ``SAFELOSS_STRICT``, as ``safeloss.cross_entropy`` does.
    """
    if strict is not None and not isinstance(strict, bool):
        raise ArgumentTypeError(
            f"safeloss.patch(strict=...) takes True, False or None, got {strict!r}.\n"
            "Fix: safeloss.patch(strict=True) to raise on every finding, or patch() to follow "
            "safeloss.strict_mode() / SAFELOSS_STRICT"
        )
    handle = _Patch(strict)
    with _lock:
        _push(handle)
    return handle


def _push(handle: _Patch) -> None:
    """Activate ``handle`` (lock held): install on the first, innermost strict applies."""
    if not _stack:
        _install()
    _stack.append(handle)
    _settle()


def unpatch() -> None:
    """Undo every active ``patch()``: torch is exactly as it was before. A no-op when not patched."""
    with _lock:
        _stack.clear()
        _settle()


def _settle() -> None:
    """After a change of ``_stack`` (lock held): innermost strict applies; uninstall when empty."""
    global _current, _per_thread
    blocks: dict[int, _Patch] = {}
    for h in _stack:  # innermost last: it wins
        blocks[h.thread] = h
    _per_thread = blocks if len(blocks) > 1 else {}
    if _stack:
        _current = _stack[-1]
    elif _current is not None:
        _current = None
        _uninstall()


def strictness(current: _Patch) -> bool | None:
    """The ``strict`` a patched call runs with, given the active ``_current`` (not None): that of
    the calling thread's own innermost handle where handles of several threads are active."""
    if _per_thread and not torch.compiler.is_compiling():
        current = _per_thread.get(threading.get_ident(), current)
    return current.strict


def is_patched() -> bool:
    """True while a ``patch()`` is active."""
    return _current is not None


def _install() -> None:
    global _saved_function, _saved_forward, _saved_call
    _prime_dynamo()
    _saved_function = _FUNCTIONAL.cross_entropy
    _saved_forward = _CLS.__dict__["forward"]
    _FUNCTIONAL.cross_entropy = cross_entropy
    _CLS.forward = _forward
    # An error ends at the user's line, above nn.Module.__call__'s frames (as SafeCrossEntropyLoss).
    _saved_call = _CLS.__dict__.get("__call__")  # None: inherited from nn.Module
    _CLS.__call__ = module_call
    # Only the name that ``from torch.nn.functional import cross_entropy`` binds: other names
    # holding stock torch's function (``_orig = F.cross_entropy``) are usually kept on purpose,
    # to call stock torch, and must keep doing so.
    holders = _modules.update()
    for d in holders:
        if d is not _FUNCTIONAL.__dict__ and d.get(_NAME) is _saved_function:
            d[_NAME] = cross_entropy
            _rebound.append(d)
    _linear_patch.install(holders)
    _thirdparty.install()


def _prime_dynamo() -> None:
    """Make torch.compile see stock ``F.cross_entropy`` under its own name.

    Dynamo's table of torch functions (``trace_rules.get_torch_obj_rule_map``) resolves names such
    as ``torch.nn.functional.cross_entropy`` when it is first needed, and again after anything
    clears it (``torch.distributed.init_process_group`` does). Built while patched, it takes our
    function for a torch op: Dynamo then puts it in the graph unread and runs it on fake tensors,
    so a shape mistake surfaces as Dynamo's ``TorchRuntimeError`` instead of being traced like any
    user code. So the table is built here, before our function takes the name, and an entry that
    a rebuild while patched gave our function goes back to stock's.
    """
    rules = sys.modules.get("torch._dynamo.trace_rules")
    if rules is None:
        with contextlib.suppress(Exception):  # a torch build without dynamo: nothing to prime
            import torch._dynamo  # noqa: F401  (1-2 s, once; Transformers and Lightning import it anyway)
        rules = sys.modules.get("torch._dynamo.trace_rules")
    get = getattr(rules, "get_torch_obj_rule_map", None)
    if get is None:
        return
    with contextlib.suppress(Exception):  # Dynamo internals: a later torch may differ
        table = get()  # cached after the first build
        rule = table.pop(cross_entropy, None)
        if rule is not None:  # rebuilt under an earlier patch: the rule is that patch's saved function's
            table.setdefault(_saved_function, rule)


def _uninstall() -> None:
    # Only undo what is still ours: if another tool patched over us since, its patch stays, and
    # our function underneath it now behaves as stock torch (the stack is empty).
    if _FUNCTIONAL.cross_entropy is cross_entropy:
        _FUNCTIONAL.cross_entropy = _saved_function
    if _CLS.__dict__.get("forward") is _forward:
        _CLS.forward = _saved_forward
    if _CLS.__dict__.get("__call__") is module_call:
        if _saved_call is None:
            del _CLS.__call__  # inherited from nn.Module again, as before
        else:
            _CLS.__call__ = _saved_call
    # Rebound modules, and modules imported while patched (they bound the patched function).
    holders = _modules.update()
    for d in [*_rebound, *holders]:
        if d.get(_NAME) is cross_entropy:
            d[_NAME] = _saved_function
    _rebound.clear()
    pairs = [(cross_entropy, _saved_function)]
    if _linear_patch._saved_function is not None:
        pairs.append((_linear_patch.linear_cross_entropy, _linear_patch._saved_function))
    _linear_patch.uninstall(holders)
    _thirdparty.uninstall()
    _give_back_names(pairs)


def _give_back_names(pairs: list[tuple[Callable[..., Tensor], Callable[..., Tensor]]]) -> None:
    """Put stock's functions back in torch's cached tables that a walk while patched filled in.

    Dynamo's table of torch functions (see ``_prime_dynamo``) and ``torch.overrides``' walks of
    ``torch.nn.functional`` (``get_overridable_functions``, ``resolve_name``,
    ``get_testing_overrides``) are built once and cached; built while patched (a first use, or a
    rebuild after ``init_process_group`` cleared them), they hold our functions under stock's
    names and lack stock's, and kept that after unpatch(). Only tables already built are looked
    at, each a few dict operations: this runs at every unpatch (about 1.5 us).
    """
    overrides = torch.overrides
    rules = sys.modules.get("torch._dynamo.trace_rules")
    try:  # torch internals: a later torch may differ (one try: each costs, at every unpatch)
        get = getattr(rules, "get_torch_obj_rule_map", None)
        if get is not None and get.cache_info().currsize:
            table = get()
            for ours, stock in pairs:
                if ours in table:
                    table.setdefault(stock, table.pop(ours))
        walk = overrides._get_overridable_functions
        if walk.cache_info().currsize:
            by_namespace, names = walk()
            listed = by_namespace.get(_FUNCTIONAL, ())
            for ours, stock in pairs:
                if ours in names:  # then listed too (one walk fills both); a list scan costs us
                    names.setdefault(stock, names.pop(ours))
                    if ours in listed:
                        listed[listed.index(ours)] = stock
        testing = overrides.get_testing_overrides
        if testing.cache_info().currsize:
            lambdas = testing()
            for ours, stock in pairs:
                if ours in lambdas:
                    lambdas.setdefault(stock, lambdas.pop(ours))
    except Exception:
        pass

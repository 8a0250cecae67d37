"""Cross-entropy losses of other libraries that ``safeloss.patch()`` routes through safeloss.

Some clients never call ``F.cross_entropy``: they compute the same loss by hand (log_softmax, then
gather). Where such an implementation has exactly cross-entropy's semantics, ``patch()`` replaces
its method while patched, as it replaces ``nn.CrossEntropyLoss.forward``:

* Hugging Face ``transformers.trainer_pt_utils.LabelSmoother`` (``Trainer`` with
  ``label_smoothing_factor``): ``cross_entropy(..., ignore_index=ignore_index,
  label_smoothing=epsilon, reduction="sum")`` divided by the non-ignored labels (or by
  ``num_items_in_batch``);
* timm's ``LabelSmoothingCrossEntropy`` (``cross_entropy(x, target, label_smoothing=smoothing)``
  with no label skipped) and ``SoftTargetCrossEntropy`` (``cross_entropy`` with probability
  targets, over the last dimension).

Rules:

* Never imports a library: a route is installed when its module is already imported, or, while
  patched, right after it is imported (a finder on ``sys.meta_path`` that only watches these
  module names and is removed by ``unpatch()``).
* Each route is checked before its first use in the process: the original's parameters must be
  the ones this route was written for, and the original and the route must give the same values
  on small real inputs (so an upstream change of semantics turns the route off). A route that
  cannot be installed (class or method missing, new parameters, different values) warns once
  (``SafeLossWarning``) and leaves the library as it is; it never raises.
* Only calls whose arguments the route understands are routed (plain tensors of the shapes the
  original handles, a smoothing factor in [0, 1]); any other call runs the original. Where the
  original silently computes something for a bad label (``LabelSmoother`` reads a negative label
  other than ``ignore_index`` as class 0), the routed call raises
  ``safeloss.TargetOutOfRangeError``, as for every other label outside the class range.
* ``unpatch()`` puts back the very original method; a replacement that escaped (a bound method
  kept somewhere) calls the original once unpatched.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import inspect
import math
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from ..ce.functional import cross_entropy as _safe_ce
from ..core._traceback import boundary
from ..core.errors import SafeLossError, SafeLossWarning, TargetOutOfRangeError, stock_class
from ..core.report import _user_frame

# ignore_index for losses that have none: no label equals it in practice (the int64 minimum), so
# every label outside 0..C-1 is reported, as the original would fail on it.
NO_IGNORE = -(2**63)


def _core() -> Any:
    return sys.modules["safeloss.patch"]


def _current() -> Any:
    return _core()._current


def _plain(*tensors: object) -> bool:
    return all(isinstance(t, Tensor) for t in tensors) and _core()._plain(*tensors)


@dataclass
class Route:
    """One method of one third-party class, replaced while patched."""

    module: str  # where the class is defined (never imported by safeloss)
    cls: str
    attr: str  # "__call__" or "forward"
    label: str  # how messages name it
    params: Sequence[tuple[str, ...]]  # parameter lists of the original this route was written for
    replacement: Callable[[Route, Callable[..., Any]], Callable[..., Any]]  # builds the method
    selftest: Callable[[Route, type, Callable[..., Any]], str | None]  # None: same values
    note: str = ""  # appended to a SafeLossError raised through this route
    # How a bad-label fix reads for this route, in place of "cross_entropy(..., ignore_index=v)"
    # (whose arguments its callers do not write); called with v and the ignore_index in use.
    skip_fix: Callable[[str, str], str] | None = None
    installed: tuple[type, Callable[..., Any], Callable[..., Any]] | None = None  # (cls, original, ours)
    # Per original (by id, the original kept to check identity): the verdict, and our method.
    verdicts: dict[int, tuple[Callable[..., Any], str | None]] = field(default_factory=dict)
    built: dict[int, tuple[Callable[..., Any], Callable[..., Any]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.module}.{self.cls}.{self.attr}"

    def apply(self, mod: ModuleType) -> None:
        if self.installed is not None:
            return
        cls = getattr(mod, self.cls, None)
        original = cls.__dict__.get(self.attr) if isinstance(cls, type) else None
        if original is None or not callable(original):
            _warn_once(self, f"{self.module} has no {self.cls}.{self.attr} any more")
            return
        verdict = self._verdict(cls, original)
        if verdict is not None:
            _warn_once(self, verdict)
            return
        ours = self.built.get(id(original))
        if ours is None or ours[0] is not original:
            ours = self.built[id(original)] = (original, self.replacement(self, original))
        setattr(cls, self.attr, ours[1])
        self.installed = (cls, original, ours[1])

    def _verdict(self, cls: type, original: Callable[..., Any]) -> str | None:
        """Why this original cannot be routed (None: it can); computed once per original."""
        hit = self.verdicts.get(id(original))
        if hit is not None and hit[0] is original:
            return hit[1]
        try:
            names = tuple(inspect.signature(original).parameters)
        except (TypeError, ValueError):
            names = ()
        if names not in self.params:
            verdict: str | None = (
                f"its parameters are now {names}, not the {self.params[-1]} this route was written for"
            )
        else:
            try:
                verdict = self.selftest(self, cls, original)
            except Exception as e:  # an upstream change that breaks the original or the route
                verdict = f"a check on small inputs failed ({type(e).__name__}: {e})"
        self.verdicts[id(original)] = (original, verdict)
        return verdict

    def restore(self) -> None:
        if self.installed is None:
            return
        cls, original, ours = self.installed
        if cls.__dict__.get(self.attr) is ours:  # another tool's patch on top of ours stays
            setattr(cls, self.attr, original)
        self.installed = None

    def original(self) -> Callable[..., Any]:
        assert self.installed is not None
        return self.installed[1]

    def noted(self, e: SafeLossError) -> SafeLossError:
        """The error to raise instead of ``e``: its message naming this route, and for a bad label
        also the ``RuntimeError`` that the original's ``torch.gather`` raises for it."""
        n = str(NO_IGNORE)  # the stand-in for "no ignore_index", never shown as a number
        text = str(e)
        if n in text:
            # A route without ignore_index: a fix that sets one names an argument this loss does
            # not have (its note says so). Drop those positions, or the stock loss that has it.
            text = _NO_IGNORE_FIX.sub(
                lambda m: (f"Fix: leave those positions out (keep = target != {m.group(1)}; x[keep], "
                           f"target[keep]), or use torch.nn.CrossEntropyLoss(ignore_index={m.group(1)}, "
                           "label_smoothing=...) with the same smoothing, which has an ignore_index"),
                text)
        elif self.skip_fix is not None:
            in_use = _IGNORE_IN_USE.search(text)
            if in_use is not None:
                # (the padding variant's "or set the padded labels to ..." says the same: dropped)
                text = _NO_IGNORE_FIX.sub(lambda m: "Fix: " + self.skip_fix(m.group(1), in_use.group(1)), text)
        text = (text.replace(f"ignore_index={n}", "no ignore_index")
                .replace(f"ignore_index is {n}", "there is no ignore_index")
                .replace(f"ignore_index ({n})", "ignore_index (there is none)").replace(n, "none"))
        cls = type(e)
        if isinstance(e, TargetOutOfRangeError) and not isinstance(e, RuntimeError):
            cls = stock_class(TargetOutOfRangeError, RuntimeError)
        return cls(f"{text}\n({self.label}, reached through safeloss.patch(): {self.note})")


# The bad-label fixes that set ignore_index (checks.out_of_range_message), with the padding
# variant's tail ("or set the padded labels to <ignore_index> ...").
_NO_IGNORE_FIX = re.compile(
    r"Fix: cross_entropy\(\.\.\., ignore_index=(-?\d+)\)  or  CrossEntropyLoss\(ignore_index=-?\d+\)"
    r"(; or set the padded labels to -?\d+ where the batch is built)?")

_IGNORE_IN_USE = re.compile(r"target shape [^\n]*, ignore_index=(-?\d+)")

_warned: set[str] = set()


def _warn_once(route: Route, why: str) -> None:
    if route.name in _warned:
        return
    _warned.add(route.name)
    _, _, level = _user_frame()
    warnings.warn(
        f"safeloss.patch() leaves {route.label} ({route.name}) as it is: {why}. Its calls run the "
        "library's own code, without safeloss's checks. (This happens when the library changed; "
        "please report it with the library's version.)",
        SafeLossWarning, stacklevel=level,
    )


def _close(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6))


# ------------------------------------------------------------------ transformers LabelSmoother


def _label_smoother_loss(
    self: Any, model_output: Any, labels: Any, shift_labels: bool, num_items_in_batch: Any,
    strict: bool | None,
) -> Tensor | None:
    """LabelSmoother's loss through safeloss, or None where the call is not one it routes."""
    eps, ii = getattr(self, "epsilon", None), getattr(self, "ignore_index", None)
    if type(ii) is not int or isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return None
    if not 0.0 <= eps <= 1.0:
        return None  # cross_entropy's label_smoothing is a share in [0, 1]; the original is not
    try:
        logits = model_output["logits"] if isinstance(model_output, dict) else model_output[0]
    except (KeyError, IndexError, TypeError):
        return None
    if not _plain(logits, labels) or not logits.is_floating_point() or logits.dim() < 2:
        return None
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        return None
    if shift_labels:
        logits = logits[..., :-1, :].contiguous()
        labels = labels[..., 1:].contiguous()
    if labels.dim() == logits.dim() and labels.shape[-1] == 1:
        labels = labels.squeeze(-1)  # the original gathers with a trailing singleton index as is
    if labels.shape != logits.shape[:-1]:
        return None  # the original's gather broadcasts or fails: leave it to the original
    V = logits.shape[-1]
    total = _safe_ce(
        logits.reshape(-1, V), labels.reshape(-1), ignore_index=ii, label_smoothing=float(eps),
        reduction="sum", strict=strict,
    )
    # The original sums the smoothing term in float32: its result is at least float32.
    total = total.to(torch.promote_types(total.dtype, torch.float32))
    if num_items_in_batch is None:
        denominator: Any = (labels != ii).sum()
    elif isinstance(num_items_in_batch, Tensor):
        denominator = num_items_in_batch.to(total.device)
    else:
        denominator = num_items_in_batch
    return total / denominator


def _label_smoother_call(route: Route, original: Callable[..., Any]) -> Callable[..., Any]:
    takes_count = "num_items_in_batch" in inspect.signature(original).parameters

    def routed(self: Any, model_output: Any, labels: Any, shift_labels: bool, n: Any) -> Any:
        current = _current()
        if current is not None:
            try:
                out = _label_smoother_loss(self, model_output, labels, shift_labels, n, _core().strictness(current))
            except SafeLossError as e:
                raise route.noted(e) from None
            if out is not None:
                return out
        if takes_count:
            return original(self, model_output, labels, shift_labels=shift_labels, num_items_in_batch=n)
        return original(self, model_output, labels, shift_labels=shift_labels)

    if takes_count:
        def __call__(self: Any, model_output: Any, labels: Any, shift_labels: bool = False,
                     num_items_in_batch: Any = None) -> Any:
            if torch.compiler.is_dynamo_compiling():
                return routed(self, model_output, labels, shift_labels, num_items_in_batch)
            with boundary:  # a SafeLossError's traceback ends at the caller's line
                return routed(self, model_output, labels, shift_labels, num_items_in_batch)
    else:  # transformers before num_items_in_batch
        def __call__(self: Any, model_output: Any, labels: Any, shift_labels: bool = False) -> Any:  # type: ignore[misc]
            if torch.compiler.is_dynamo_compiling():
                return routed(self, model_output, labels, shift_labels, None)
            with boundary:
                return routed(self, model_output, labels, shift_labels, None)

    __call__.__qualname__ = f"{route.cls}.__call__"
    __call__.__doc__ = original.__doc__
    return __call__


def _label_smoother_selftest(route: Route, cls: type, original: Callable[..., Any]) -> str | None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, 3:] = -100
    takes_count = "num_items_in_batch" in inspect.signature(original).parameters
    for eps in (0.0, 0.1):
        smoother = cls(epsilon=eps)
        for shift in (False, True):
            for n in ((None, 3) if takes_count else (None,)):
                kw = {"num_items_in_batch": n} if takes_count else {}
                want = original(smoother, {"logits": logits}, labels, shift_labels=shift, **kw)
                got = _label_smoother_loss(smoother, {"logits": logits}, labels, shift, n, False)
                if got is None or not _close(got, want):
                    return (f"it gives {want.item() if isinstance(want, Tensor) else want!r} where "
                            f"cross_entropy gives {None if got is None else got.item()} "
                            f"(epsilon={eps}, shift_labels={shift}, num_items_in_batch={n})")
    return None


# ------------------------------------------------------------------ timm


def _timm_smoothing_loss(self: Any, x: Any, target: Any, strict: bool | None) -> Tensor | None:
    s, conf = getattr(self, "smoothing", None), getattr(self, "confidence", None)
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
        return None
    if not isinstance(conf, (int, float)) or not math.isclose(conf, 1.0 - s, rel_tol=0, abs_tol=1e-12):
        return None  # a confidence set apart from the smoothing: not cross-entropy's weights
    if not _plain(x, target) or not x.is_floating_point() or x.dim() != 2:
        return None  # the original gathers along the last dim with target.unsqueeze(1): (N, C) only
    if target.dim() != 1 or target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        return None
    return _safe_ce(x, target, ignore_index=NO_IGNORE, label_smoothing=float(s), strict=strict)


def _timm_soft_loss(self: Any, x: Any, target: Any, strict: bool | None) -> Tensor | None:
    if not _plain(x, target) or not x.is_floating_point() or not target.is_floating_point():
        return None
    if x.dim() < 1 or target.shape != x.shape:
        return None  # the original broadcasts other shapes: leave those to it
    C = x.shape[-1]
    # The original sums over the last dim and averages over every other position: cross_entropy
    # with probability targets over (positions, C) rows.
    return _safe_ce(x.reshape(-1, C), target.reshape(-1, C), strict=strict)


def _timm_forward(compute: Callable[..., Tensor | None], scripted: str) -> Callable[..., Any]:
    def build(route: Route, original: Callable[..., Any]) -> Callable[..., Any]:
        def routed(self: Any, x: Any, target: Any) -> Any:
            current = _current()
            if current is not None:
                try:
                    out = compute(self, x, target, _core().strictness(current))
                except SafeLossError as e:
                    raise route.noted(e) from None
                if out is not None:
                    return out
            return original(self, x, target)

        if scripted == "smoothing":
            def forward(self: Any, x: Tensor, target: Tensor) -> Tensor:
                # TorchScript compiles only this branch (a scripted model that holds this loss):
                # cross_entropy with the same smoothing, as the patched stock loss does.
                if torch.jit.is_scripting():
                    return torch.nn.functional.cross_entropy(x, target, label_smoothing=self.smoothing)
                if torch.compiler.is_dynamo_compiling():
                    return routed(self, x, target)
                with boundary:
                    return routed(self, x, target)
        else:
            def forward(self: Any, x: Tensor, target: Tensor) -> Tensor:  # type: ignore[misc]
                if torch.jit.is_scripting():
                    return torch.nn.functional.cross_entropy(
                        x.reshape(-1, x.size(-1)), target.reshape(-1, target.size(-1)))
                if torch.compiler.is_dynamo_compiling():
                    return routed(self, x, target)
                with boundary:
                    return routed(self, x, target)

        forward.__name__ = "forward"
        forward.__qualname__ = f"{route.cls}.forward"
        forward.__doc__ = original.__doc__
        return forward

    return build


def _timm_selftest(compute: Callable[..., Tensor | None], soft: bool) -> Callable[..., str | None]:
    def selftest(route: Route, cls: type, original: Callable[..., Any]) -> str | None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(6, 5, generator=g, dtype=torch.float64)
        cases: list[tuple[Any, Tensor]] = []
        if soft:
            cases.append((cls(), torch.randn(6, 5, generator=g, dtype=torch.float64).softmax(-1)))
        else:
            t = torch.randint(0, 5, (6,), generator=g)
            cases += [(cls(smoothing=0.1), t), (cls(smoothing=0.0), t)]
        for loss, t in cases:
            want = original(loss, x, t)
            got = compute(loss, x, t, False)
            if got is None or not _close(got, want):
                return (f"it gives {want.item()} where cross_entropy gives "
                        f"{None if got is None else got.item()} on the same inputs")
        return None

    return selftest


# ------------------------------------------------------------------ the routes, install

ROUTES: list[Route] = [
    Route(
        "transformers.trainer_pt_utils", "LabelSmoother", "__call__", "transformers' LabelSmoother",
        params=[("self", "model_output", "labels", "shift_labels"),
                ("self", "model_output", "labels", "shift_labels", "num_items_in_batch")],
        replacement=_label_smoother_call, selftest=_label_smoother_selftest,
        note="its loss is cross_entropy(logits, labels, ignore_index, label_smoothing=epsilon, "
        "reduction='sum') divided by the number of non-ignored labels (or num_items_in_batch); "
        "positions count its labels flattened, after its shift by one when shift_labels=True",
        # The Trainer builds the smoother itself (ignore_index=-100): the labels are what to change.
        skip_fix=lambda v, ii: (f"labels.masked_fill(labels == {v}, {ii}) where the batch is built "
                                f"(the smoother's ignore_index is {ii}), or LabelSmoother(epsilon, "
                                f"ignore_index={v}) where you build the smoother yourself"),
    ),
    Route(
        "timm.loss.cross_entropy", "LabelSmoothingCrossEntropy", "forward",
        "timm's LabelSmoothingCrossEntropy", params=[("self", "x", "target")],
        replacement=_timm_forward(_timm_smoothing_loss, "smoothing"),
        selftest=_timm_selftest(_timm_smoothing_loss, soft=False),
        note="its loss is cross_entropy(x, target, label_smoothing=smoothing), and it has no "
        "ignore_index: every label must be a class 0..C-1",
    ),
    Route(
        "timm.loss.cross_entropy", "SoftTargetCrossEntropy", "forward",
        "timm's SoftTargetCrossEntropy", params=[("self", "x", "target")],
        replacement=_timm_forward(_timm_soft_loss, "soft"),
        selftest=_timm_selftest(_timm_soft_loss, soft=True),
        note="its loss is cross_entropy with probability targets over the last dimension",
    ),
]
_WATCHED = {r.module for r in ROUTES}


def _apply(name: str) -> None:
    mod = sys.modules.get(name)
    if mod is None:
        return
    spec = getattr(mod, "__spec__", None)
    if spec is not None and getattr(spec, "_initializing", False):
        return  # its import is still running: the finder patches it when it ends
    for route in ROUTES:
        if route.module == name:
            route.apply(mod)


class _Loader(importlib.abc.Loader):
    """Runs a watched module's own loader, then installs its routes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # Leave no trace: the module keeps its own loader.
        if module.__spec__ is not None:
            module.__spec__.loader = self.inner
        module.__loader__ = self.inner
        self.inner.exec_module(module)
        if _current() is not None:
            for route in ROUTES:
                if route.module == module.__name__:
                    route.apply(module)


class _Finder(importlib.abc.MetaPathFinder):
    """On ``sys.meta_path`` while patched; looks only at the modules of the routes."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname not in _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


_finder = _Finder()


def install() -> None:
    """Install every route whose module is imported; watch for the others' import."""
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    for name in _WATCHED:
        _apply(name)


def uninstall() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    for route in ROUTES:
        route.restore()


def reached() -> list[str]:
    """The routes installed now, as ``module.Class.method`` (for tests and ``safeloss bench``)."""
    return [r.name for r in ROUTES if r.installed is not None]

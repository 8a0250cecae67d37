"""Calls that do not run eagerly on plain dense tensors: tracers, fake and meta tensors, sparse layouts.

torch.compile (Dynamo), torch.func transforms and CUDA-graph capture are handled in the pipeline
itself. This module covers every other tool stock ``cross_entropy`` works in, so that swapping the
import changes nothing but the checks (docs/compatibility.md lists what runs where):

* ``torch.jit.trace`` (:data:`JIT`): the checks run at trace time on the example inputs, exactly as
  in eager mode, with the tracer paused; then stock torch's op is recorded on the validated inputs.
  Nothing may be read on the host while recording: it would be frozen into the trace.
* dispatch-mode tracers (:data:`GRAPH`): ``make_fx`` in every tracing mode, non-strict
  ``torch.export``. As under torch.compile: shape checks at trace time, value checks in the graph,
  reported by the effectful ``safeloss::note_findings`` op when the graph runs.
* fake and meta tensors without a tracer (:data:`ABSTRACT`): ``FakeTensorMode``, AOTAutograd's
  metadata pass, meta-device model initialisation. Shapes and dtypes are checked and findings known
  from shapes are reported; nothing is read. Fake tensors compute as in a graph (AOTAutograd must
  see the same ops in both its passes); meta tensors get stock torch's op, on the torch backend
  (no kernel runs on them). Either way the result has stock's shape and dtype.
* sparse layouts (:data:`SPARSE`): probability targets are densified (stock accepts them); sparse
  logits, class-index targets and weights are a :class:`~safeloss.errors.LayoutError`, as stock
  raises ``NotImplementedError`` for them.
* ``torch.onnx.export(dynamo=True)`` (:data:`ONNX`): shape checks at export time; the graph gets
  stock torch's op (ONNX has no translation for safeloss's). The TorchScript-based exporter traces
  with ``torch.jit.trace`` (:data:`JIT`).
* ``torch.fx.symbolic_trace`` passes ``Proxy`` objects: :func:`fx_call` and :func:`fx_module_call`
  record one node, so the traced graph calls safeloss (with every check) when it runs.
* TorchScript compiles :func:`scripted_cross_entropy` in place of ``safeloss.cross_entropy``.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any, Optional

import torch
from torch import Tensor
from torch.fx import Proxy

from .errors import LayoutError, fmt_shape

JIT, GRAPH, ABSTRACT, SPARSE, ONNX = "jit", "graph", "abstract", "sparse", "onnx"

_KEYS = torch._C._TorchDispatchModeKey
_PLAIN = (Tensor, torch.nn.Parameter)
_stock_cross_entropy = torch.nn.functional.cross_entropy  # captured before any safeloss.patch()


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def onnx_exporting() -> bool:
    """Inside ``torch.onnx.export(..., dynamo=True)`` (without importing the exporter)."""
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    return flags is not None and bool(getattr(flags, "_is_onnx_exporting", False))


def kind(input: object, target: object, weight: object, compiling: bool = False) -> str | None:
    """Which of this module's cases a call is; None for eager plain dense tensors (a few C reads).

    ``compiling``: Dynamo is tracing; the pipeline handles that itself, except for ONNX export."""
    if compiling:
        return ONNX if torch.compiler.is_exporting() and onnx_exporting() else None
    if torch._C._is_tracing():
        return JIT
    if torch._C._len_torch_dispatch_stack():
        if torch._C._get_dispatch_mode(_KEYS.PROXY) is not None:
            return ONNX if onnx_exporting() else GRAPH
        if (torch._C._get_dispatch_mode(_KEYS.FAKE) is not None
                or torch._C._get_dispatch_mode(_KEYS.FUNCTIONAL) is not None):
            return ABSTRACT
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        return None  # validation names the argument
    if input.is_meta or target.is_meta:
        return ABSTRACT
    strided = torch.strided
    if input.layout is not strided or target.layout is not strided or (
        isinstance(weight, Tensor) and weight.layout is not strided
    ) or input.is_nested or target.is_nested:
        return SPARSE
    if (type(input) not in _PLAIN and _is_fake(input)) or (type(target) not in _PLAIN and _is_fake(target)):
        return ABSTRACT
    return None


class paused_tracer:
    """``torch.jit.trace`` paused: code run here is neither recorded nor warned about."""

    def __enter__(self) -> None:
        self.state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)

    def __exit__(self, *exc: object) -> None:
        torch._C._set_tracing_state(self.state)


# ------------------------------------------------------------------------------- sparse


def _layout_error(what: str, t: Tensor, fix: str) -> LayoutError:
    return LayoutError(
        f"cross_entropy got {what} with layout {t.layout} (shape {fmt_shape(t.shape)}); it needs a "
        "dense (strided) tensor here. Stock torch has no kernel for this either (it raises "
        "NotImplementedError or an internal error).\n"
        f"Fix: {fix}"
    )


def check_layouts(input: Tensor, target: Tensor, weight: object) -> None:
    """Raise for what cannot be sparse: all but probability targets (which stock accepts)."""
    if input.is_nested or target.is_nested:
        t = input if input.is_nested else target
        raise LayoutError(
            f"cross_entropy got a nested tensor as the {'logits' if t is input else 'target'} "
            f"(layout {t.layout}, {t.size(0)} sequences). Stock torch cannot take the class "
            "softmax of a nested tensor either; the loss needs one row of class scores per "
            "position.\nFix: cross_entropy(logits.values(), target.values()) for jagged tensors "
            "(every position, packed), or pad them with torch.nested.to_padded_tensor and mask the "
            "padding with ignore_index"
        )
    strided = torch.strided
    if input.layout is not strided:
        raise _layout_error(
            "logits", input,
            "logits.to_dense(); every class score enters the softmax, so the logits are dense anyway",
        )
    if isinstance(weight, Tensor) and weight.layout is not strided:
        raise _layout_error("a class weight", weight, "weight.to_dense()")
    if target.layout is not strided and tuple(target.shape) != tuple(input.shape):
        raise _layout_error(
            "class-index targets", target,
            "target.to_dense(); only probability targets (the input's shape) may be sparse",
        )


def densify_result(out: Tensor, target: Tensor, reduction: str) -> Tensor:
    """Stock torch returns a sparse COO loss for ``reduction="none"`` with sparse COO probabilities."""
    if reduction == "none" and target.layout is torch.sparse_coo:
        return out.to_sparse()
    return out


# ------------------------------------------------------------------------------- torch.fx


def fx_proxy(*args: object) -> Proxy | None:
    """The first ``torch.fx.Proxy`` among the arguments (symbolic_trace is running), else None."""
    for a in args:
        if isinstance(a, Proxy):
            return a
    return None


def fx_call(proxy: Proxy, fn: Any, input: object, target: object, kwargs: dict[str, object]) -> Proxy:
    """Record ``fn(input, target, **kwargs)`` as one call_function node, as stock's
    ``__torch_function__`` does for ``F.cross_entropy``: the graph calls ``fn`` when it runs."""
    return proxy.tracer.create_proxy("call_function", fn, (input, target), kwargs)


def fx_module_call(module: torch.nn.Module, proxy: Proxy, input: object, target: object) -> Proxy:
    """Record the loss module as a leaf (one call_module node), as torch.fx does for stock
    ``nn.CrossEntropyLoss``: the graph module calls the instance, with all its checks and settings.
    The root of the trace (or a module not registered in it) becomes a call of the functional form
    with the module's settings."""
    from .functional import cross_entropy

    tracer = proxy.tracer
    if getattr(tracer, "root", None) is not module:
        try:
            path = tracer.path_of_module(module)
        except NameError:
            path = ""
        if path:
            return tracer.create_proxy("call_module", path, (input, target), {})
    return fx_call(proxy, cross_entropy, input, target, module_kwargs(module))


def module_kwargs(module: Any) -> dict[str, object]:
    kwargs: dict[str, object] = {
        "weight": module.weight, "ignore_index": module.ignore_index,
        "reduction": module.reduction, "label_smoothing": module.label_smoothing,
    }
    for name, default in (("strict", None), ("backend", "auto"), ("inplace_backward", False),
                          ("fused_grad", False)):
        value = getattr(module, name, default)
        if value != default:
            kwargs[name] = value
    return kwargs


# ------------------------------------------------------------------------------- TorchScript


def scripted_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,  # noqa: UP045 (TorchScript parses these annotations)
    size_average: Optional[bool] = None,  # noqa: UP045
    ignore_index: int = -100,
    reduce: Optional[bool] = None,  # noqa: UP045
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    strict: Optional[bool] = None,  # noqa: UP045
    backend: str = "auto",
    inplace_backward: bool = False,
    fused_grad: bool = False,
) -> Tensor:
    """What TorchScript compiles for a call of ``safeloss.cross_entropy``: stock torch (scripted
    code cannot call back into Python). The safeloss-only arguments are accepted and unused."""
    return _stock_cross_entropy(
        input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing
    )


def register_for_torchscript(fn: Any) -> None:
    """Make TorchScript compile ``scripted_cross_entropy`` wherever scripted code calls ``fn``.

    TorchScript cannot compile ``fn`` itself: its safeloss-only arguments are keyword-only with
    defaults, which TorchScript rejects. Its table of boolean-dispatched functions (how
    ``F.max_pool2d`` picks a variant) is consulted before it tries: both branches are the scripted
    stand-in, selected by an argument no caller passes. A private table; without it, scripting
    code that calls ``safeloss.cross_entropy`` fails as before, and nothing else changes.
    """
    try:
        from torch._jit_internal import boolean_dispatched
    except ImportError:  # pragma: no cover - a torch without TorchScript internals
        return
    # Scripting the function by itself (not code that calls it) cannot work: say so clearly.
    setattr(fn, "__script_unsupported", (
        "safeloss.cross_entropy cannot be scripted by itself: scripted code cannot call back into "
        "Python, where safeloss's checks run. Script the model or function that calls it (the "
        "call compiles stock torch.nn.functional.cross_entropy there), or script "
        "torch.nn.functional.cross_entropy directly."
    ))
    boolean_dispatched[fn] = {
        "if_true": scripted_cross_entropy, "if_false": scripted_cross_entropy,
        "index": 1 << 20, "default": False, "arg_name": "_safeloss_never_passed",
    }


# ------------------------------------------------------------------------------- the calls


def run(
    kind_: str,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction_: str,
    label_smoothing: float,
    *,
    strict: bool | None,
    backend: str,
    inplace_backward: bool,
    fused_grad: bool,
    owner: object | None,
) -> Tensor:
    """One call in a case :func:`kind` found (arguments as ``pipeline.run`` takes them)."""
    from . import checks, compiled, dispatch, pipeline, reduction
    from .backends import torch_backend
    from .config import LazyStrict
    from .report import report
    from .validation import normalize

    kw: dict[str, Any] = dict(strict=strict, backend=backend, inplace_backward=inplace_backward,
                              fused_grad=fused_grad, owner=owner)
    if kind_ == SPARSE:
        check_layouts(input, target, weight)  # what is left: sparse probability targets
        out = pipeline.run(input, target.to_dense(), weight, ignore_index, reduction_,
                           label_smoothing, **kw)
        return densify_result(out, target, reduction_)

    if kind_ == JIT:
        # Every check, on the example inputs, as eager code; nothing of it enters the trace.
        with paused_tracer(), torch.no_grad():
            pipeline.run(input, target, weight, ignore_index, reduction_, label_smoothing, **kw)
        # While recording, validation's shape comparisons raise TracerWarnings ("might not
        # generalize"): the decisions they make (squeeze, cast, which form of target) are what the
        # trace should freeze, as stock's own Python-level decisions are.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            p = normalize(input, target, weight, ignore_index, reduction_, label_smoothing,
                          read_values=False)
            return torch_backend.per_position(p, p.reduction)  # stock's op, recorded

    p = normalize(input, target, weight, ignore_index, reduction_, label_smoothing,
                  read_values=False)
    static = p.findings
    if p.reduction == "mean" and math.prod(p.positions_shape) == 0:
        static = [*static, checks.empty_mean_finding(p)]
    meta = p.input.is_meta
    name = "torch" if meta else dispatch.select(backend, p)
    if kind_ == ONNX:
        # ONNX has no translation for safeloss's ops: record stock torch's, as for stock (ONNX's
        # SoftmaxCrossEntropyLoss). Checks: shapes, at export time.
        strict_ = LazyStrict(strict)
        for finding in static:
            report(finding, strict_, owner)
        return torch_backend.per_position(p, p.reduction)
    if kind_ == ABSTRACT:
        strict_ = LazyStrict(strict)
        for finding in static:
            report(finding, strict_, owner)
        if meta:
            return torch_backend.per_position(p, p.reduction)  # exactly stock's shape and dtype
    # Value checks in the graph, reported when it runs (see safeloss.compiled). Fake tensors take
    # this path too: AOTAutograd first runs the function on fake tensors to collect metadata (the
    # effect tokens among it), then traces it, and both runs must call the same ops.
    rows = dispatch.row_losses(name, p, False, inplace_backward, fused_grad)
    out = reduction.reduce(rows, p)
    key = checks.FUNCTIONAL_KEY if owner is None else id(owner)
    compiled.note(p, rows, out, key, strict, static)
    return out

"""Helpers for the tools stock ``cross_entropy`` works in, shared by the ops. Which tool a call
runs in is decided once, by ``safeloss.core.mode.decide``; what each op then does is in its
pipeline. Here:

* ``torch.jit.trace``: :class:`paused_tracer` runs the checks on the example inputs unrecorded.
* sparse layouts: probability targets are densified (stock accepts them); sparse logits,
  class-index targets and weights are a :class:`~safeloss.core.errors.LayoutError`, as stock
  raises ``NotImplementedError`` for them (:func:`check_layouts`, :func:`densify_result`).
* ``torch.fx.symbolic_trace`` passes ``Proxy`` objects: :func:`fx_call` and :func:`fx_module_call`
  record one node, so the traced graph calls safeloss (with every check) when it runs.
* TorchScript compiles :func:`scripted_cross_entropy` in place of ``safeloss.cross_entropy``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.fx import Proxy

from .errors import LayoutError, fmt_shape

_stock_cross_entropy = torch.nn.functional.cross_entropy  # captured before any safeloss.patch()


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


def fx_module_call(
    module: torch.nn.Module, fn: Any, proxy: Proxy, input: object, target: object
) -> Proxy:
    """Record the loss module as a leaf (one call_module node), as torch.fx does for stock
    ``nn.CrossEntropyLoss``: the graph module calls the instance, with all its checks and settings.
    The root of the trace (or a module not registered in it) becomes a call of the functional form
    with the module's settings (``fn``: the op's functional form)."""
    tracer = proxy.tracer
    if getattr(tracer, "root", None) is not module:
        try:
            path = tracer.path_of_module(module)
        except NameError:
            path = ""
        if path:
            return tracer.create_proxy("call_module", path, (input, target), {})
    return fx_call(proxy, fn, input, target, module_kwargs(module))


def module_kwargs(module: Any) -> dict[str, object]:
    kwargs: dict[str, object] = {
        "weight": module.weight, "ignore_index": module.ignore_index,
        "reduction": module.reduction, "label_smoothing": module.label_smoothing,
    }
    for name, default in (("strict", None), ("backend", "auto"), ("inplace_backward", False),
                          ("fused_grad", False), ("softcap", None), ("temperature", 1.0),
                          ("z_loss", 0.0), ("return_stats", False)):
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

"""What ``safeloss.patch()`` installs for linear + cross-entropy.

``torch.nn.functional.linear_cross_entropy`` and ``torch.nn.LinearCrossEntropyLoss.forward`` are
replaced, so both stock paths reach safeloss: the reference path (``options=None``, which stock
implements by calling ``F.cross_entropy`` on the full logits) and the chunked path (``options``
set, which stock runs in its own custom op that no cross-entropy patch can see). Install,
uninstall, the strict setting and the reach rules are those of :mod:`safeloss.patch`, which calls
:func:`install` and :func:`uninstall`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .api import linear_cross_entropy as _safe_linear_cross_entropy
from .api import module_forward

_CLS: Any = getattr(torch.nn, "LinearCrossEntropyLoss", None)  # torch >= 2.13
_FUNCTIONAL = torch.nn.functional
_NAME = "linear_cross_entropy"
_saved_function: Callable[..., Tensor] = getattr(_FUNCTIONAL, _NAME, None)  # type: ignore[assignment]
_saved_forward: Callable[..., Tensor] = getattr(_CLS, "forward", None)  # type: ignore[assignment]
_rebound: list[dict[str, Any]] = []


def _core() -> Any:
    return sys.modules["safeloss.patch"]


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: Any = None,
) -> Tensor:
    # Stock signature exactly. TorchScript compiles only the first branch.
    if torch.jit.is_scripting():
        return _saved_function(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight,
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
            options=options,
        )
    core = _core()
    current = core._current
    if current is None or not core._plain(input, linear_weight, target, linear_bias, weight):
        return _saved_function(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight,
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
            options=options,
        )
    return _safe_linear_cross_entropy(
        input, linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
        ignore_index=ignore_index, label_smoothing=label_smoothing, options=options,
        strict=core.strictness(current),
    )


linear_cross_entropy.__doc__ = (
    "torch.nn.functional.linear_cross_entropy, routed through safeloss by safeloss.patch().\n\n"
    + (_saved_function.__doc__ or "")
)


def _forward(self: Any, input: Tensor, target: Tensor) -> Tensor:
    """``torch.nn.LinearCrossEntropyLoss.forward`` while patched: the module's settings, safeloss's
    checks, warnings once per instance."""
    if torch.jit.is_scripting():
        return _saved_forward(self, input, target)
    core = _core()
    current = core._current
    lin = self.linear
    if current is None or not core._plain(input, target, lin.weight, lin.bias, self.weight):
        return _saved_forward(self, input, target)
    return module_forward(self, input, target, core.strictness(current), "auto")


_forward.__name__ = "forward"
_forward.__qualname__ = "LinearCrossEntropyLoss.forward"


def install(module_globals: list[dict[str, Any]]) -> None:
    global _saved_function, _saved_forward
    if _CLS is None or not hasattr(_FUNCTIONAL, _NAME):
        return  # a torch without the op: nothing to reach
    _saved_function = _FUNCTIONAL.linear_cross_entropy
    _saved_forward = _CLS.__dict__["forward"]
    _FUNCTIONAL.linear_cross_entropy = linear_cross_entropy
    _CLS.forward = _forward
    for d in module_globals:
        if d is not _FUNCTIONAL.__dict__ and d.get(_NAME) is _saved_function:
            d[_NAME] = linear_cross_entropy
            _rebound.append(d)


def uninstall(module_globals: list[dict[str, Any]]) -> None:
    if _CLS is None or not hasattr(_FUNCTIONAL, _NAME):
        return
    if _FUNCTIONAL.linear_cross_entropy is linear_cross_entropy:
        _FUNCTIONAL.linear_cross_entropy = _saved_function
    if _CLS.__dict__.get("forward") is _forward:
        _CLS.forward = _saved_forward
    for d in [*_rebound, *module_globals]:
        if d.get(_NAME) is linear_cross_entropy:
            d[_NAME] = _saved_function
    _rebound.clear()

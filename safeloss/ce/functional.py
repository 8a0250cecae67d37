"""``safeloss.cross_entropy``: the signature of ``torch.nn.functional.cross_entropy``, plus safety."""

from __future__ import annotations

from torch import Tensor

from ..backends.dispatch import check_backend
from ..core import tools as tracing
from ..core._traceback import trim
from ..core.errors import SafeLossError
from ..core.mode import Mode, decide
from ..core.validation import check_label_smoothing, resolve_reduction
from . import pipeline


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    strict: bool | None = None,
    backend: str = "auto",
    inplace_backward: bool = False,
    fused_grad: bool = False,
) -> Tensor:
    """Drop-in for :func:`torch.nn.functional.cross_entropy` with checks and a fused GPU kernel.

    Same arguments and, for every input torch accepts, the same values and gradients. Mistakes
    that torch reports cryptically or not at all raise a :class:`safeloss.SafeLossError` or warn
    with a :class:`safeloss.SafeLossWarning` naming the cause and the fix.

    Args:
        strict: turn every warning into an error; ``None`` follows ``safeloss.strict_mode()``,
            ``safeloss.set_strict()`` and the ``SAFELOSS_STRICT`` environment variable.
        backend: ``"auto"`` (Triton on CUDA when available), ``"torch"`` or ``"triton"``.
        inplace_backward: Triton backend only: write the gradient into the logits' storage in
            backward to save memory. The logits are overwritten, so only use it when nothing else
            reads them after the loss.
        fused_grad: Triton backend only: compute the gradient in the same pass as the loss
            (read the logits once, write the gradient once) and scale it by the upstream
            gradient in backward, skipping rows whose upstream gradient is exactly 1 without a
            host sync. Pays off for ``reduction="sum"`` and rows up to 16K classes; it holds a
            logits-sized gradient buffer from forward to backward.
    """
    mode = decide(input, target, weight)
    if mode is Mode.FX:  # torch.fx.symbolic_trace: one node that calls this function when it runs
        kwargs: dict[str, object] = dict(
            weight=weight, size_average=size_average, ignore_index=ignore_index, reduce=reduce,
            reduction=reduction, label_smoothing=label_smoothing,
        )
        for name, value, default in (("strict", strict, None), ("backend", backend, "auto"),
                                     ("inplace_backward", inplace_backward, False),
                                     ("fused_grad", fused_grad, False)):
            if value != default:
                kwargs[name] = value
        return tracing.fx_call(tracing.fx_proxy(input, target, weight), cross_entropy, input, target,
                              kwargs)
    try:
        return pipeline.run(
            mode, input, target, weight, ignore_index,
            resolve_reduction(size_average, reduce, reduction),
            check_label_smoothing(label_smoothing),
            strict=strict, backend=check_backend(backend), inplace_backward=inplace_backward,
            fused_grad=fused_grad, owner=None,
        )
    except SafeLossError as e:  # the traceback ends at the caller's line (safeloss._traceback)
        trim(e)
        raise


# Scripted code that calls safeloss.cross_entropy compiles stock torch (see safeloss.tracing).
tracing.register_for_torchscript(cross_entropy)

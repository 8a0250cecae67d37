"""``safeloss.cross_entropy``: the signature of ``torch.nn.functional.cross_entropy``, plus safety."""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends.dispatch import check_backend
from ..core import extras
from ..core import tools as tracing
from ..core._traceback import trim
from ..core.errors import SafeLossError
from ..core.mode import Mode, decide
from ..core.validation import argument_types, check_label_smoothing, resolve_reduction
from . import extras as ce_extras
from . import pipeline


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = pipeline.IGNORE_INDEX,
    reduce: bool | None = None,
    reduction: str = pipeline.REDUCTION,
    label_smoothing: float = pipeline.LABEL_SMOOTHING,
    *,
    strict: bool | None = None,
    backend: str = pipeline.BACKEND,
    inplace_backward: bool = False,
    fused_grad: bool = False,
    softcap: float | None = None,
    temperature: float = 1.0,
    z_loss: float = 0.0,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, extras.LossStats]:
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
            reads them after the loss. A leaf that requires grad (a Parameter) or a view of
            one is never overwritten: it gets a new gradient buffer.
        fused_grad: Triton backend only: compute the gradient in the same pass as the loss
            (read the logits once, write the gradient once) and scale it by the upstream
            gradient in backward, skipping rows whose upstream gradient is exactly 1 without a
            host sync. Pays off for ``reduction="sum"`` and rows up to 16K classes; it holds a
            logits-sized gradient buffer from forward to backward.
        softcap: logits z become ``softcap * tanh(z / softcap)`` before everything else (Gemma 2's
            ``final_logit_softcapping``); ``None``: no cap.
        temperature: then z becomes ``z / temperature`` (RL: the sampler's temperature).
        z_loss: adds ``z_loss * lse(z)^2`` per non-ignored position (PaLM's z-loss; lse of the
            capped, scaled logits), reduced as the loss: ``"mean"`` over the non-ignored
            positions (unweighted, even with a class ``weight``), ``"sum"``, or per position.
        return_stats: return ``(loss, safeloss.LossStats)``: per-position ``lse`` and
            ``entropy``, the ``z_loss`` term and the ``accuracy`` (no gradient).

    With any of the last four away from its default, the Triton backend computes them inside its
    kernels (one read of the logits forward, one backward); the torch backend with torch ops.
    """
    try:
        key = None
        if (not _is_compiling() and size_average is None and reduce is None and softcap is None
                and return_stats is False and ((temperature is _T1 and z_loss is _Z0)
                                               or extras.defaults(None, temperature, z_loss, False))):
            # An eager call of a signature seen before: its plan (core.plan), then only the value
            # checks; else the signature under which this call stores a plan if it is clean.
            key = pipeline.fast(input, target, weight, ignore_index, reduction, label_smoothing,
                                backend, inplace_backward, fused_grad, strict, None)
            if isinstance(key, Tensor):
                return key
        mode = decide(input, target, weight)
        if mode is Mode.FX:  # torch.fx.symbolic_trace: one node that calls this function when it runs
            kwargs: dict[str, object] = dict(
                weight=weight, size_average=size_average, ignore_index=ignore_index, reduce=reduce,
                reduction=reduction, label_smoothing=label_smoothing,
            )
            for name, value, default in (("strict", strict, None), ("backend", backend, "auto"),
                                         ("inplace_backward", inplace_backward, False),
                                         ("fused_grad", fused_grad, False),
                                         ("softcap", softcap, None), ("temperature", temperature, 1.0),
                                         ("z_loss", z_loss, 0.0), ("return_stats", return_stats, False)):
                if value != default:
                    kwargs[name] = value
            return tracing.fx_call(tracing.fx_proxy(input, target, weight), cross_entropy, input,
                                   target, kwargs)
        plain = extras.defaults(softcap, temperature, z_loss, return_stats)
        if mode is Mode.DTENSOR and pipeline.parallel_dtensor.is_dtensor(input):
            # Before any argument check: the parallel engine checks them after its first collective.
            red = reduction if size_average is None and reduce is None else resolve_reduction(
                size_average, reduce, reduction)
            return pipeline.dtensor_logits(  # type: ignore[return-value]
                input, target, weight, ignore_index, red, label_smoothing, strict=strict,
                backend=backend, owner=None, inplace_backward=inplace_backward, fused_grad=fused_grad,
                extras=None if plain else (softcap, temperature, z_loss, return_stats))
        if not plain:
            return ce_extras.cross_entropy(
                mode, input, target, weight, size_average, ignore_index, reduce, reduction,
                label_smoothing, softcap, temperature, z_loss, return_stats, strict=strict,
                backend=backend, inplace_backward=inplace_backward, fused_grad=fused_grad,
            )
        red = resolve_reduction(size_average, reduce, reduction)  # stock: before its parser
        argument_types(input, target, weight, ignore_index, label_smoothing)  # then types
        return pipeline.run(
            mode, input, target, weight, ignore_index, red,
            check_label_smoothing(label_smoothing),
            strict=strict, backend=check_backend(backend), inplace_backward=inplace_backward,
            fused_grad=fused_grad, owner=None, key=key if mode is Mode.EAGER else None,
        )
    except SafeLossError as e:  # the traceback ends at the caller's line (safeloss._traceback)
        trim(e, "safeloss.cross_entropy")
        raise


_is_compiling = torch.compiler.is_compiling
# The default extras' own objects: the common call tells them by identity (no call); any other
# value, equal or not, is judged by extras.defaults.
_T1, _Z0 = cross_entropy.__kwdefaults__["temperature"], cross_entropy.__kwdefaults__["z_loss"]


# Scripted code that calls safeloss.cross_entropy compiles stock torch (see safeloss.tracing).
tracing.register_for_torchscript(cross_entropy)

"""One call of the cross-entropy op, downward through the shared layers:

entry (``functional`` / ``module``) -> ``core.mode.decide`` (once) -> ``run`` -> argument checks and
target normalization (``core.validation``) -> backend choice (``backends.dispatch``) -> per-position
fp32 losses (``backends``) -> ``core.reduction`` -> findings reported (``core.checks`` / ``report``).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..backends import dispatch, torch_backend
from ..core import checks, compiled, reduction
from ..core.config import LazyStrict
from ..core.mode import Mode, decide
from ..core.report import report
from ..core.tools import check_layouts, densify_result, paused_tracer
from ..core.validation import normalize
from ..parallel import dtensor as parallel_dtensor


def run(
    mode: Mode,
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
    fused_grad: bool = False,
    owner: object | None,
) -> Tensor:
    """One call in ``mode`` (from ``core.mode.decide``; FX proxies are handled by the entries)."""
    if mode is Mode.EAGER:
        return _dense(input, target, weight, ignore_index, reduction_, label_smoothing, strict,
                      backend, inplace_backward, fused_grad, owner, False, False)
    if mode is Mode.COMPILE or mode is Mode.CAPTURE or mode is Mode.TRANSFORM:
        return _dense(input, target, weight, ignore_index, reduction_, label_smoothing, strict,
                      backend, inplace_backward, fused_grad, owner, True, mode is Mode.TRANSFORM)
    if mode is Mode.DTENSOR:
        if parallel_dtensor.is_dtensor(input):
            # DTensor logits, any layout: the parallel op decides from the placements alone what
            # every rank computes and exchanges (never DTensor's own ops on the checks: their
            # collectives would follow values one rank sees).
            return parallel_dtensor.run(input, target, weight, ignore_index, reduction_,
                                        label_smoothing, strict=strict, backend=backend, owner=owner,
                                        inplace_backward=inplace_backward, fused_grad=fused_grad)
        # Plain logits with a DTensor target or weight: this rank's loss on the whole of them.
        target, weight = parallel_dtensor.full(target), parallel_dtensor.full(weight)  # type: ignore[assignment]
        return run(decide(input, target, weight), input, target, weight, ignore_index, reduction_,
                   label_smoothing, strict=strict, backend=backend, inplace_backward=inplace_backward,
                   fused_grad=fused_grad, owner=owner)
    return _in_tool(mode, input, target, weight, ignore_index, reduction_, label_smoothing,
                    strict=strict, backend=backend, inplace_backward=inplace_backward,
                    fused_grad=fused_grad, owner=owner)


def _dense(
    input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction_: str,
    label_smoothing: float, strict: bool | None, backend: str, inplace_backward: bool,
    fused_grad: bool, owner: object | None, no_host: bool, transform: bool,
) -> Tensor:
    """Eager calls (``no_host`` False) and the modes that may not read the host: torch.compile
    (shape checks at trace time, value checks in the graph, reported by the effectful op of
    ``core.compiled``), torch.func transforms and CUDA-graph capture (bad labels masked, NaN
    loss, findings not reported)."""
    tracing = no_host and not transform and torch.compiler.is_compiling()
    key = checks.FUNCTIONAL_KEY if owner is None else id(owner)
    strict_ = LazyStrict(strict)
    if checks._pending and not no_host:
        # What earlier calls found (CUDA default mode): without waiting for the GPU, except in
        # strict mode, which syncs anyway and must raise an earlier call's error before its own.
        checks.flush(key, owner, wait=bool(strict_))

    p = normalize(input, target, weight, ignore_index, reduction_, label_smoothing,
                  read_values=not no_host)
    # Findings known from shapes alone: reported now, or by the compiled graph's report op.
    static = p.findings
    # numel() first: one C call, where positions_shape builds two tuples (0.3 us per call).
    if p.reduction == "mean" and p.input.numel() == 0 and math.prod(p.positions_shape) == 0:
        static = [*static, checks.empty_mean_finding(p)]
    if static and not no_host:
        for finding in static:
            report(finding, strict_, owner)

    name = dispatch.select(backend, p)
    if no_host:
        if transform:
            torch_backend.transform_guard(p)
        rows = dispatch.row_losses(name, p, False, inplace_backward, fused_grad)
        out = reduction.reduce(rows, p)
        if tracing:
            compiled.note(p, rows, out, key, strict, static)
        return out
    # is_cpu, not device.type: the device string costs 0.3 us per call.
    immediate = checks.reads_at_once("cpu" if p.input.is_cpu else p.input.device.type) or bool(strict_)
    rows = dispatch.row_losses(name, p, immediate, inplace_backward, fused_grad)
    if rows.scan is checks.CLEAN:  # the host path found nothing: nothing to resolve (~2 us)
        return reduction.reduce(rows, p)
    if rows.stopped:  # invalid targets found before any compute
        checks.resolve(rows.scan, p, None, None, None, strict_, owner)
    out = reduction.reduce(rows, p)
    if immediate:
        checks.resolve(rows.scan, p, rows.losses_or_recompute(), out, None, strict_, owner)
    else:
        checks.defer(rows.scan, p, rows.losses, out, bool(strict_), key, owner=owner)
    return out


def _in_tool(
    mode: Mode,
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
    """Tracers, fake and meta tensors, sparse layouts (see ``core.mode.TABLE``)."""
    kw: dict[str, object] = dict(strict=strict, backend=backend, inplace_backward=inplace_backward,
                                 fused_grad=fused_grad, owner=owner)
    if mode is Mode.SPARSE:
        check_layouts(input, target, weight)  # what is left: sparse probability targets
        dense = target.to_dense()
        out = run(decide(input, dense, weight), input, dense, weight, ignore_index, reduction_,
                  label_smoothing, **kw)  # type: ignore[arg-type]
        return densify_result(out, target, reduction_)

    if mode is Mode.JIT_TRACE:
        # Every check, on the example inputs, as eager code; nothing of it enters the trace.
        with paused_tracer(), torch.no_grad():
            run(decide(input, target, weight), input, target, weight, ignore_index, reduction_,
                label_smoothing, **kw)  # type: ignore[arg-type]
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
    if mode is Mode.ONNX:
        # ONNX has no translation for safeloss's ops: record stock torch's, as for stock (ONNX's
        # SoftmaxCrossEntropyLoss). Checks: shapes, at export time.
        strict_ = LazyStrict(strict)
        for finding in static:
            report(finding, strict_, owner)
        return torch_backend.per_position(p, p.reduction)
    if mode is Mode.ABSTRACT:
        strict_ = LazyStrict(strict)
        for finding in static:
            report(finding, strict_, owner)
        if meta:
            return torch_backend.per_position(p, p.reduction)  # exactly stock's shape and dtype
    # Value checks in the graph, reported when it runs (see core.compiled). Fake tensors take
    # this path too: AOTAutograd first runs the function on fake tensors to collect metadata (the
    # effect tokens among it), then traces it, and both runs must call the same ops.
    rows = dispatch.row_losses(name, p, False, inplace_backward, fused_grad)
    out = reduction.reduce(rows, p)
    key = checks.FUNCTIONAL_KEY if owner is None else id(owner)
    compiled.note(p, rows, out, key, strict, static)
    return out

"""One call of the loss, layer by layer: validate -> choose backend -> per-position losses ->
shared reduction -> report what the checks found. Used by both the module and the functional API.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import checks, compiled, dispatch, reduction
from .backends import torch_backend
from .config import LazyStrict
from .parallel import dtensor as parallel_dtensor
from .report import report
from .tracing import kind as tool_kind
from .tracing import run as run_in_tool
from .validation import normalize


def _capturing(x: object) -> bool:
    return isinstance(x, Tensor) and x.is_cuda and torch.cuda.is_current_stream_capturing()


def run(
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
    # Under torch.compile, shape/dtype validation runs at trace time exactly as in eager (same
    # errors); value checks run in the graph and are reported by an effectful op after it (see
    # safeloss.compiled). While a CUDA graph is captured, or inside torch.func transforms, nothing
    # may touch the host: bad labels are still masked (NaN loss, no out-of-bounds read) but
    # findings are not reported.
    tracing = torch.compiler.is_compiling()
    if type(input) is not Tensor and not tracing and parallel_dtensor.applies(input, target, weight):
        # DTensor logits sharded on the classes under loss_parallel(): the vocab-parallel path.
        # Other DTensors run the steps below through DTensor's own ops, as they always did.
        return parallel_dtensor.run(input, target, weight, ignore_index, reduction_, label_smoothing,
                                    strict=strict, backend=backend, owner=owner)
    # torch.jit.trace, make_fx, fake / meta tensors, sparse layouts: see safeloss.tracing.
    if (tool := tool_kind(input, target, weight, tracing)) is not None:
        return run_in_tool(tool, input, target, weight, ignore_index, reduction_, label_smoothing,
                           strict=strict, backend=backend, inplace_backward=inplace_backward,
                           fused_grad=fused_grad, owner=owner)
    transform = isinstance(input, Tensor) and dispatch.in_functorch_transform(input)
    compiling = tracing or transform or _capturing(input)
    key = checks.FUNCTIONAL_KEY if owner is None else id(owner)
    strict_ = LazyStrict(strict)
    if checks._pending and not compiling:
        # What earlier calls found (CUDA default mode): without waiting for the GPU, except in
        # strict mode, which syncs anyway and must raise an earlier call's error before its own.
        checks.flush(key, owner, wait=bool(strict_))

    p = normalize(input, target, weight, ignore_index, reduction_, label_smoothing,
                  read_values=not compiling)
    # Findings known from shapes alone: reported now, or by the compiled graph's report op.
    static = p.findings
    # numel() first: one C call, where positions_shape builds two tuples (0.3 us per call).
    if p.reduction == "mean" and p.input.numel() == 0 and math.prod(p.positions_shape) == 0:
        static = [*static, checks.empty_mean_finding(p)]
    if static and not compiling:
        for finding in static:
            report(finding, strict_, owner)

    name = dispatch.select(backend, p)
    if compiling:
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

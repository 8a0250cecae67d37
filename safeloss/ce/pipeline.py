"""One call of the cross-entropy op, downward through the shared layers:

entry (``functional`` / ``module``) -> ``core.mode.decide`` (once) -> ``run`` -> argument checks and
target normalization (``core.validation``) -> backend choice (``backends.dispatch``) -> per-position
fp32 losses (``backends``) -> ``core.reduction`` -> findings reported (``core.checks`` / ``report``).

An eager call whose :func:`signature` has a plan (``core.plan``) takes :func:`planned` instead of
``run``: the argument checks and the backend choice are what they were for the first call of
that signature, so only the value checks and the compute run.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..backends import dispatch, torch_backend
from ..core import checks, compiled, reduction, validation
from ..core import plan as plans
from ..core.config import LazyStrict, env
from ..core.mode import Mode, decide
from ..core.report import report
from ..core.rows import Rows
from ..core.tools import check_layouts, densify_result, paused_tracer
from ..core.validation import REDUCTIONS, Problem, normalize
from ..parallel import dtensor as parallel_dtensor

_C = torch._C


def signature(
    input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: object, reduction: object,
    label_smoothing: object, backend: object, inplace_backward: object, fused_grad: object,
) -> tuple[object, ...] | None:
    """The plan key of an eager call (``core.mode.Mode.EAGER``), or None for a call that never
    takes a plan (a deprecated reduction name, which warns per call; arguments that are not
    tensors, which the full path rejects).

    Everything the argument checks, the backend choice and the Triton launch geometry read other
    than tensor values: types (only plain tensors get plans), shapes, dtypes, devices,
    ``requires_grad``, the options with their types (``True == 1``, but ``ignore_index=True`` is an
    error and ``1`` is not), grad mode (a weight that requires grad), autocast (the compute
    dtype) and whether a ``TorchFunctionMode`` is active (planned calls skip stock's Python layer
    that hands calls to one). Strides are not in it: only the Triton launch geometry reads them,
    and it keys them itself.
    """
    if reduction not in REDUCTIONS:
        return None
    try:
        return (
            type(input), input.shape, input.dtype, input.device, input.requires_grad,
            type(target), target.shape, target.dtype, target.device, target.requires_grad,
            None if weight is None else
            (type(weight), weight.shape, weight.dtype, weight.device, weight.requires_grad),
            ignore_index, type(ignore_index), reduction, label_smoothing, type(label_smoothing),
            backend, inplace_backward, fused_grad, _C.is_grad_enabled(),
            _C._is_any_autocast_enabled() and plans.autocast_key(input.device.type),
            _C._is_torch_function_mode_enabled(),
        )
    except AttributeError:  # not tensors: the full path says what was passed
        return None


class Plan:
    """A planned signature of the cross-entropy op (see ``core.plan``)."""

    __slots__ = ("backend", "cpu_triton", "fused_grad", "host", "inplace_backward", "is_cpu", "skeleton")

    def __init__(self, p: Problem, backend: str, inplace_backward: bool, fused_grad: bool) -> None:
        self.skeleton = plans.Skeleton(p)
        self.backend = backend
        self.is_cpu = p.input.is_cpu
        # The CPU host path of the torch backend: its clean call in one function.
        self.host = torch_backend.HostPlan(p) if backend == "torch" and self.is_cpu else None
        # Triton on CPU tensors (the interpreter) depends on TRITON_INTERPRET, read per call: the
        # plan holds for the value it had when the plan was made.
        self.cpu_triton = env("TRITON_INTERPRET") if backend == "triton" and not p.input.is_cuda else None
        self.inplace_backward = inplace_backward
        self.fused_grad = fused_grad


def _plannable(p: Problem, input: Tensor, target: Tensor, weight: object) -> bool:
    """A clean signature: plain tensors that the checks passed through unchanged (nothing
    converted, squeezed or cast: those calls report a finding), at least two classes (one class
    has a value-dependent finding) and at least one element."""
    return (
        p.input is input and p.target is target and p.weight is weight and p.num_classes > 1
        and input.numel() > 0 and type(input) in _PLAIN and type(target) in _PLAIN
        and (weight is None or type(weight) in _PLAIN)
    )


_PLAIN = (Tensor, torch.nn.Parameter)


def planned(
    plan: Plan, input: Tensor, target: Tensor, weight: Tensor | None, strict: bool | None,
    owner: object | None,
) -> Tensor | None:
    """A call of a planned signature: what ``run`` does for it, less what the signature settled.

    Returns None before anything happened where the call must take ``run`` instead: a class
    weight with negative entries (a finding of the argument checks, read per call), or Triton
    on CPU tensors with another ``TRITON_INTERPRET`` than when the plan was made.
    """
    if weight is not None and validation._negative_classes(weight):
        return None
    if plan.cpu_triton is not None and env("TRITON_INTERPRET") != plan.cpu_triton:
        return None
    host = plan.host
    if host is not None and not checks._pending and not checks.DEFER_ON_CPU:
        # The common CPU call: the host path's value checks, nothing pending, nothing to defer
        # (strictness matters only if something is found).
        out = host.rows(input, target, weight)
        if type(out) is not tuple:
            return out  # type: ignore[return-value]
        rows, p = out
        return _finish(rows, p, True, LazyStrict(strict), _key(owner), owner)
    strict_ = LazyStrict(strict)
    key = _key(owner)
    if checks._pending:
        checks.flush(key, owner, wait=bool(strict_))
    immediate = (plan.is_cpu and not checks.DEFER_ON_CPU) or bool(strict_)
    if host is not None and immediate:
        out = host.rows(input, target, weight)
        if type(out) is not tuple:
            return out  # type: ignore[return-value]
        rows, p = out
    else:
        p = plan.skeleton.problem(input, target, weight)
        rows = dispatch.row_losses(plan.backend, p, immediate, plan.inplace_backward, plan.fused_grad)
    return _finish(rows, p, immediate, strict_, key, owner)


def _key(owner: object | None) -> int:
    """The pending-check key of a loss (``checks.defer``)."""
    return checks.FUNCTIONAL_KEY if owner is None else id(owner)


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
    key: tuple[object, ...] | None = None,
) -> Tensor:
    """One call in ``mode`` (from ``core.mode.decide``; FX proxies are handled by the entries).
    ``key``: the call's :func:`signature` (eager calls), under which a clean call stores its plan."""
    if mode is Mode.EAGER:
        return _dense(input, target, weight, ignore_index, reduction_, label_smoothing, strict,
                      backend, inplace_backward, fused_grad, owner, False, False, key)
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
    signature_key: tuple[object, ...] | None = None,
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
    if signature_key is not None and not static and _plannable(p, input, target, weight):
        # Stored before the compute: the plan is about the signature, whatever the values hold.
        plans.store(signature_key, Plan(p, name, inplace_backward, fused_grad))
    # is_cpu, not device.type: the device string costs 0.3 us per call.
    immediate = checks.reads_at_once("cpu" if p.input.is_cpu else p.input.device.type) or bool(strict_)
    rows = dispatch.row_losses(name, p, immediate, inplace_backward, fused_grad)
    return _finish(rows, p, immediate, strict_, key, owner)


def _finish(rows: Rows, p: Problem, immediate: bool, strict_: LazyStrict, key: int,
            owner: object | None) -> Tensor:
    """From the backend's rows to the result: reduce, then report (host path) or defer."""
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

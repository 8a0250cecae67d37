"""One call of the cross-entropy op, downward through the shared layers:

entry (``functional`` / ``module``) -> ``core.mode.decide`` (once) -> ``run`` -> argument checks and
target normalization (``core.validation``) -> backend choice (``backends.dispatch``) -> per-position
fp32 losses (``backends``) -> ``core.reduction`` -> findings reported (``core.checks`` / ``report``).

An eager call whose signature has a plan (``core.plan``) is done by :func:`fast` instead of
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
from ..core._flags import overflow_bound
from ..core.checks import Scan
from ..core.config import LazyStrict, env
from ..core.mode import Mode, decide
from ..core.report import report
from ..core.rows import Rows
from ..core.tools import check_layouts, densify_result, paused_tracer
from ..core.validation import REDUCTIONS, Problem, normalize
from ..parallel import dtensor as parallel_dtensor

_C = torch._C


_grad_enabled = _C.is_grad_enabled
_any_autocast = _C._is_any_autocast_enabled
_function_mode = _C._is_torch_function_mode_enabled
_tracing = _C._is_tracing
_dispatch_modes = _C._len_torch_dispatch_stack
_functorch = _C._are_functorch_transforms_active
_get_plan = plans._plans.get  # the store itself (a dict never rebound: plan.clear() empties it)

# The default options, as the objects the entries' signatures hold: an argument that *is* one of
# them (identity, so of that type too) was left at its default or passed as that very object;
# a key holds DEFAULTS for all six instead of the options and their types.
IGNORE_INDEX = -100
REDUCTION = "mean"
LABEL_SMOOTHING = 0.0
BACKEND = "auto"
DEFAULTS = ("default options",)
_capturing = torch.cuda.is_current_stream_capturing


def fast(
    input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: object, reduction: object,
    label_smoothing: object, backend: object, inplace_backward: object, fused_grad: object,
    strict: bool | None, owner: object | None,
) -> Tensor | tuple[object, ...] | None:
    """A whole eager call of a planned signature (see ``core.plan``): the result; else, before
    anything happened, the call's signature, its plan key (no plan yet: ``run`` stores one under
    it if the call is clean), or None (no plan for this call: not eager, or not plannable).

    The signature is everything the argument checks, the backend choice and the Triton launch
    geometry read other than tensor values: shapes, layouts, dtypes and devices (of plain
    tensors: ``torch.Tensor`` or ``nn.Parameter``, checked first), whether the weight requires
    grad with grad mode on (an error for index targets, the torch backend for probabilities),
    the options with their types (``True == 1``, but ``ignore_index=True`` is an error and
    ``1`` is not), autocast (the compute dtype) and whether a ``TorchFunctionMode`` is active
    (planned calls skip stock's Python layer that hands calls to one). Not in it: the logits'
    and targets' ``requires_grad`` and grad mode otherwise (nothing the checks conclude depends
    on them; the Triton backend reads them per call), and strides (only the Triton launch
    geometry reads them, and it keys them itself). A deprecated reduction name (warned per
    call) gets no key. Cost of a hit: ~2 us of Python on a 2020s x86 core.

    The entries call it first, outside torch.compile (``torch.compiler.is_compiling()`` is their
    test: Dynamo folds it), with the default extras and no legacy reduction arguments. The
    eager test is ``core.mode.decide``'s for plain dense tensors: plain tensor types, no jit
    tracer, dispatch mode or functorch transform active, no CUDA-graph capture, and (through the
    key, which holds the layouts and devices, and matches only a plan stored for an eager call
    of strided tensors) no sparse, meta or nested tensor.
    """
    if (type(input) not in _PLAIN or type(target) not in _PLAIN
            or (weight is not None and type(weight) not in _PLAIN)):
        return None  # first: reading a Proxy's attributes would record nodes in an fx graph
    if _tracing() or _dispatch_modes() or _functorch():
        return None
    try:
        key = (
            # Devices: True for a CPU tensor (a flag; a device object costs ~1 us per call to
            # build, hash and compare), the device itself for any other.
            input.shape, input.layout, input.dtype, input.is_cpu or input.device,
            target.shape, target.layout, target.dtype, target.is_cpu or target.device,
            None if weight is None else (weight.shape, weight.layout, weight.dtype,
                                         weight.is_cpu or weight.device,
                                         weight.requires_grad and _grad_enabled()),
            # The entries' own default objects stand for themselves (no type calls, no tuple).
            DEFAULTS if (ignore_index is IGNORE_INDEX and reduction is REDUCTION
                         and label_smoothing is LABEL_SMOOTHING and backend is BACKEND
                         and inplace_backward is False and fused_grad is False) else
            (ignore_index, type(ignore_index), reduction, label_smoothing, type(label_smoothing),
             backend, inplace_backward, fused_grad),
            _any_autocast() and plans.autocast_key(input.device.type), _function_mode(),
        )
        plan = _get_plan(key)
    except (AttributeError, RuntimeError, TypeError):  # no sizes (nested), unhashable options
        return None
    if plan is None:
        return key if reduction in REDUCTIONS else None
    host = plan.host
    if host is not None and weight is None and not _pending and not checks.DEFER_ON_CPU:
        # The common CPU call: the host path's value checks, nothing pending, nothing to defer
        # (strictness matters only if something is found).
        out = host.rows(input, target, None)
        if type(out) is not tuple:
            return out  # type: ignore[return-value]
        rows, p = out
        return _finish(rows, p, True, LazyStrict(strict), _key(owner), owner)
    if plan.is_cuda and _capturing():
        return None  # CUDA-graph capture: decide() says so, the full path runs it
    if weight is not None and validation._negative_classes(weight):
        return key  # a finding of the argument checks, read per call
    if plan.cpu_triton is not None and env("TRITON_INTERPRET") != plan.cpu_triton:
        return key
    strict_ = LazyStrict(strict)
    okey = checks.FUNCTIONAL_KEY if owner is None else id(owner)
    if _pending:
        checks.flush(okey, owner, wait=bool(strict_))
    immediate = (plan.is_cpu and not checks.DEFER_ON_CPU) or bool(strict_)
    planned = plan.triton
    if planned is not None and not immediate:
        # The Triton backend's deferred call (CUDA default mode): the kernels, then the record.
        p = plan.skeleton.problem(input, target, weight)
        losses, flags, out = planned(input, target, weight, p)
        checks.defer(Scan(flags), p, losses, out, False, okey, device_type=plan.device_type, owner=owner)
        return out
    if host is not None and immediate:
        out = host.rows(input, target, weight)
        if type(out) is not tuple:
            return out  # type: ignore[return-value]
        rows, p = out
    else:
        p = plan.skeleton.problem(input, target, weight)
        rows = dispatch.row_losses(plan.backend, p, immediate, plan.inplace_backward, plan.fused_grad)
    return _finish(rows, p, immediate, strict_, okey, owner)


_pending = checks._pending  # the deferred records (a dict never rebound: read without the module)


class Plan:
    """A planned signature of the cross-entropy op (see ``core.plan``)."""

    __slots__ = ("backend", "cpu_triton", "device_type", "fused_grad", "host", "inplace_backward", "is_cpu",
                 "is_cuda", "skeleton", "triton")

    def __init__(self, p: Problem, backend: str, inplace_backward: bool, fused_grad: bool) -> None:
        self.skeleton = plans.Skeleton(p)
        self.backend = backend
        self.is_cpu = p.input.is_cpu
        self.is_cuda = p.input.is_cuda
        self.device_type = p.input.device.type
        # The CPU host path of the torch backend: its clean call in one function.
        self.host = torch_backend.HostPlan(p) if backend == "torch" and self.is_cpu else None
        # Triton on CPU tensors (the interpreter) depends on TRITON_INTERPRET, read per call: the
        # plan holds for the value it had when the plan was made.
        self.cpu_triton = env("TRITON_INTERPRET") if backend == "triton" and not p.input.is_cuda else None
        self.inplace_backward = inplace_backward
        self.fused_grad = fused_grad
        # The Triton backend's eager call, its per-signature arguments worked out once.
        self.triton = (dispatch.triton().Planned(p, inplace_backward, fused_grad, overflow_bound(p.out_dtype))
                       if backend == "triton" else None)


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
    ``key``: the call's signature from :func:`fast` (eager calls), under which a clean call stores
    its plan."""
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


def dtensor_logits(
    input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: object,
    label_smoothing: object, *, strict: bool | None, backend: object, owner: object | None,
    inplace_backward: bool = False, fused_grad: bool = False,
    extras: tuple[object, object, object, object] | None = None,
) -> object:
    """A call with DTensor logits, its arguments unchecked: the entries route it before any
    argument check, because the parallel engine checks them only after its first collective
    (an argument wrong on one rank, raised there first, would leave the other ranks waiting in
    that collective). ``extras``: the raw (softcap, temperature, z_loss, return_stats), or None."""
    return parallel_dtensor.run(input, target, weight, ignore_index, reduction,  # type: ignore[arg-type]
                                label_smoothing, strict=strict, backend=backend,  # type: ignore[arg-type]
                                owner=owner, inplace_backward=inplace_backward,
                                fused_grad=fused_grad, extras=extras)


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

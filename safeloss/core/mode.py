"""The one decision of the setting a call runs in, shared by every op.

Each op's entry calls :func:`decide` once, on its tensor arguments, and branches on the
:class:`Mode` it returns; nothing below the entry tests for a tool again. What each mode means
for the checks, for when findings are reported and for the backend is :data:`TABLE` (rendered
into docs/compatibility.md, where each row is also run for real).

Cost: a repeated eager call on plain dense tensors pays a handful of C-level flag reads here
(~1 us); every other mode is found on the slow path, after the fast one failed.
"""

from __future__ import annotations

import enum
import sys
from typing import NamedTuple

import torch
from torch import Tensor

_C = torch._C
_KEYS = _C._TorchDispatchModeKey
_PLAIN = (Tensor, torch.nn.Parameter)
_STRIDED = torch.strided


class Mode(enum.Enum):
    """Where a call runs. The values are the names docs/compatibility.md uses."""

    EAGER = "eager"  # plain dense tensors, eager: every check; CPU/strict report now, CUDA deferred
    CAPTURE = "cuda-graph capture"  # no host reads: bad labels masked (NaN), findings not reported
    TRANSFORM = "torch.func transform"  # vmap / grad / jacrev / jvp: as CAPTURE
    COMPILE = "torch.compile"  # Dynamo: shape checks at trace time, value checks in the graph
    ONNX = "torch.onnx.export(dynamo=True)"  # shape checks at export; stock's op in the graph
    JIT_TRACE = "torch.jit.trace"  # every check on the example inputs; stock's op recorded
    GRAPH = "make_fx / non-strict torch.export"  # as COMPILE (dispatch-mode tracers)
    ABSTRACT = "fake / meta tensors"  # shape checks; nothing read; stock's shapes and dtypes
    SPARSE = "sparse / nested layouts"  # sparse probability targets densified, else LayoutError
    FX = "torch.fx.symbolic_trace"  # one graph node that calls the op (every check when it runs)
    DTENSOR = "DTensor"  # the op's DTensor route (decided from placements, never from values)


class Row(NamedTuple):
    checks: str
    reported: str
    backend: str


TABLE: dict[Mode, Row] = {
    Mode.EAGER: Row(
        "all: arguments, shapes, dtypes, target values, softmaxed input, NaN/inf, overflow",
        "CPU and strict mode: in the call; CUDA default mode: at a later call of the same loss "
        "(no host sync), or by safeloss.check_pending()",
        "Triton on CUDA (auto), torch elsewhere",
    ),
    Mode.CAPTURE: Row(
        "arguments, shapes, dtypes; bad labels masked (NaN loss, never an out-of-bounds read)",
        "not reported (nothing may touch the host while a CUDA graph is captured)",
        "as eager",
    ),
    Mode.TRANSFORM: Row(
        "arguments, shapes, dtypes; bad labels masked (NaN loss, never an out-of-bounds read)",
        "not reported (nothing may be read on the host inside torch.func)",
        "torch (the kernels define no batching rules)",
    ),
    Mode.COMPILE: Row(
        "all: shape checks at trace time (same errors), value checks computed in the graph",
        "when the compiled graph runs, by an effectful op (as eager: at once on CPU / strict)",
        "as eager (the kernels are custom ops)",
    ),
    Mode.ONNX: Row("arguments, shapes, dtypes, at export time", "at export time",
                   "stock torch's op (ONNX has no translation for safeloss's)"),
    Mode.JIT_TRACE: Row("all, on the example inputs, at trace time", "at trace time",
                        "stock torch's op is recorded"),
    Mode.GRAPH: Row("all: shape checks at trace time, value checks in the graph",
                    "when the graph runs, by an effectful op", "as eager"),
    Mode.ABSTRACT: Row("arguments, shapes, dtypes (no values exist)", "in the call",
                       "fake: as eager; meta: stock torch's op"),
    Mode.SPARSE: Row("sparse probability targets: all, on the densified targets; sparse logits, "
                     "weights or index targets and nested tensors: a LayoutError (stock has no kernel)",
                     "as eager", "as eager"),
    Mode.FX: Row("all, when the traced graph runs", "when the graph runs",
                 "as eager, when the graph runs"),
    Mode.DTENSOR: Row(
        "all, on every rank alike (decided from placements; collectives only where every rank "
        "makes them)", "in the call, the same on every rank",
        "logits sharded on the classes under loss_parallel(): the vocab-parallel op; other layouts: "
        "DTensor's own ops",
    ),
}


def _is_dtensor(x: object) -> bool:
    mod = sys.modules.get("torch.distributed.tensor")  # a DTensor argument implies the module
    return mod is not None and isinstance(x, mod.DTensor)  # type: ignore[attr-defined]


def onnx_exporting() -> bool:
    """Inside ``torch.onnx.export(..., dynamo=True)`` (without importing the exporter)."""
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    return flags is not None and bool(getattr(flags, "_is_onnx_exporting", False))


def decide(*tensors: object) -> Mode:
    """The mode of a call whose tensor arguments are ``tensors`` (``None`` entries allowed; the
    first is the one whose device decides CUDA-graph capture). Never reads tensor data."""
    if torch.compiler.is_compiling():
        if any(_is_dtensor(t) for t in tensors):
            return Mode.DTENSOR  # its route runs eagerly (a graph break): collectives, agreement
        return Mode.ONNX if torch.compiler.is_exporting() and onnx_exporting() else Mode.COMPILE
    if not (_C._is_tracing() or _C._len_torch_dispatch_stack() or _C._are_functorch_transforms_active()):
        for t in tensors:  # the common case: plain dense tensors
            if t is not None and (type(t) not in _PLAIN or t.layout is not _STRIDED or t.is_meta
                                  or t.is_nested):
                break
        else:
            first = tensors[0]
            if first is not None and first.is_cuda and torch.cuda.is_current_stream_capturing():  # type: ignore[attr-defined]
                return Mode.CAPTURE
            return Mode.EAGER
    return _slow(tensors)


def _slow(tensors: tuple[object, ...]) -> Mode:
    from torch.fx import Proxy

    if any(isinstance(t, Proxy) for t in tensors):
        return Mode.FX
    if _C._is_tracing():
        return Mode.JIT_TRACE
    if _C._len_torch_dispatch_stack():
        if _C._get_dispatch_mode(_KEYS.PROXY) is not None:
            return Mode.ONNX if onnx_exporting() else Mode.GRAPH
        if _C._get_dispatch_mode(_KEYS.FAKE) is not None or _C._get_dispatch_mode(_KEYS.FUNCTIONAL) is not None:
            return Mode.ABSTRACT
    present = [t for t in tensors if isinstance(t, Tensor)]
    if any(_is_dtensor(t) for t in present):
        return Mode.DTENSOR
    if _C._are_functorch_transforms_active() and any(
            _C._functorch.is_functorch_wrapped_tensor(t) for t in present):
        return Mode.TRANSFORM
    if any(t.is_meta for t in present):
        return Mode.ABSTRACT
    if any(t.layout is not _STRIDED or t.is_nested for t in present):
        return Mode.SPARSE
    if any(type(t) not in _PLAIN and _is_fake(t) for t in present):
        return Mode.ABSTRACT
    first = tensors[0]
    if isinstance(first, Tensor) and first.is_cuda and torch.cuda.is_current_stream_capturing():
        return Mode.CAPTURE
    return Mode.EAGER  # other tensor subclasses run through their own __torch_function__


def under_vmap() -> bool:
    """A ``torch.func.vmap`` level is active (stock's errors there are RuntimeErrors). Error paths
    only: it walks the interpreter stack."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    vmap = _C._functorch.TransformType.Vmap
    return any(i.key() == vmap for i in retrieve_all_functorch_interpreters())


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


# Modes where nothing may be read on the host (no .item(), no data-dependent branch).
NO_HOST_READS = frozenset({Mode.CAPTURE, Mode.TRANSFORM, Mode.COMPILE, Mode.GRAPH, Mode.ABSTRACT,
                           Mode.ONNX})

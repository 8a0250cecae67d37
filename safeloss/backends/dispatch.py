"""Backend choice, per call: Triton for CUDA tensors when it can run, torch otherwise.

``backend="triton"`` where Triton cannot run is an error, never a silent fallback: a user who asks
for the fast kernel must know when they are not getting it. float64 always runs on torch (the
kernel computes in fp32, which would lose the precision fp64 users ask for), and so do a ``weight``
that requires grad (its gradient is stock torch's formula); with ``backend="auto"``, so do calls
inside torch.func transforms (the kernel has no batching rule).
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from ..core import _flags as F
from ..core.checks import Scan
from ..core.errors import BackendError
from ..core.rows import Rows
from ..core.validation import Problem
from . import torch_backend

BACKENDS = ("auto", "torch", "triton")


def check_backend(backend: object) -> str:
    if backend not in BACKENDS:
        raise BackendError(
            f"backend={backend!r} is not a safeloss backend.\n"
            'Valid values: "auto" (Triton for CUDA tensors when available, else torch), "torch", '
            '"triton".\nFix: backend="auto"'
        )
    return backend  # type: ignore[return-value]


_TRITON_INSTALLED: list[bool] = []  # a plain cache: Dynamo warns when it traces functools.cache


def _triton_installed() -> bool:
    if not _TRITON_INSTALLED:
        _TRITON_INSTALLED.append(importlib.util.find_spec("triton") is not None)
    return _TRITON_INSTALLED[0]


def triton_unavailable_reason(device: torch.device) -> str | None:
    if not _triton_installed():
        return (
            'the triton package is not installed (pip install "safeloss[gpu]", or pip install '
            "triton; Linux with a CUDA GPU)"
        )
    try:
        from . import triton_backend
    except ImportError as e:  # a broken triton install must not break the torch path
        return f"the Triton backend failed to import ({e})"
    return triton_backend.unavailable_reason(device)


_NOTICED: list[bool] = []  # the fallback notice is shown once per process


def _notice_fallback(reason: str) -> None:
    """``backend="auto"`` on CUDA without a working Triton: say so once, then run torch.

    A CPU-only install has no triton (it is the ``gpu`` extra); on a GPU machine the user should
    learn that the fused kernel is not running, but a correct, slower loss is not an error. Not
    while torch.compile traces (Dynamo cannot trace ``warnings.warn``): an eager call says it.
    """
    if _NOTICED or torch.compiler.is_dynamo_compiling():
        return
    _NOTICED.append(True)
    from ..core.report import _user_frame

    # A missing triton's reason already names the install command: say it once.
    get = "" if "pip install" in reason else (
        'For the kernel: pip install "safeloss[gpu]" (or pip install triton). ')
    warnings.warn(
        f'safeloss: backend="auto" runs CUDA tensors on the pure-torch backend because {reason}. '
        f"Results are the same, without the fused kernel. {get}backend=\"torch\" picks the torch "
        "backend without this notice, which is shown once per process.",
        UserWarning,
        stacklevel=_user_frame()[2],
    )


def in_functorch_transform(x: torch.Tensor) -> bool:
    """Inside torch.func (vmap, grad, jacrev): nothing may be read on the host there.
    Dynamo cannot trace this probe; while it traces, no functorch wrapper is visible anyway."""
    return not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(x)


def select(backend: str, p: Problem) -> str:
    """Name of the backend that will run this call."""
    if backend == "auto" and not p.input.is_cuda:
        return "torch"  # what the checks below conclude for these too; the common CPU case first
    if backend == "torch" or p.input.dtype == torch.float64 or p.num_classes == 0:
        return "torch"  # no classes: nothing for the kernel to do; stock torch's values
    if p.weight is not None and p.weight.requires_grad and torch.is_grad_enabled():
        return "torch"  # d loss / d weight (probability targets): stock torch's formula
    if in_functorch_transform(p.input):
        if backend == "triton":
            raise BackendError(
                'backend="triton" cannot run inside torch.func transforms (vmap, grad, jacrev, '
                "functional_call): the kernel's custom ops define no functorch rules.\n"
                'Fix: backend="auto" (uses the torch backend there) or backend="torch"'
            )
        return "torch"
    if backend == "auto":
        if p.input.device.type == "cuda":
            reason = triton_unavailable_reason(p.input.device)
            if reason is None:
                return "triton"
            _notice_fallback(reason)
        return "torch"
    reason = triton_unavailable_reason(p.input.device)
    if reason is not None:
        raise BackendError(
            f'backend="triton" cannot run on {p.input.device.type} tensors here: {reason}.\n'
            'Fix: backend="auto" picks Triton where it can run and torch elsewhere; for CPU '
            "testing of the kernels set TRITON_INTERPRET=1 before the first call"
        )
    return "triton"


def row_losses(
    name: str, p: Problem, immediate: bool, inplace_backward: bool, fused_grad: bool = False
) -> Rows:
    if name == "torch":
        return torch_backend.row_losses(p, immediate)
    from . import triton_backend

    weight = None if p.weight is None else p.weight.float().contiguous()
    losses, flags, out = triton_backend.row_losses(
        p.input, p.target, weight=weight, ignore_index=p.ignore_index,
        label_smoothing=p.label_smoothing, prob_target=p.prob,
        inplace_backward=inplace_backward, fused_grad=fused_grad,
        out_max=F.overflow_bound(p.out_dtype), reduce=p,
    )
    return Rows(losses, Scan(flags), out)

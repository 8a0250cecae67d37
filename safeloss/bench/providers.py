"""The providers ``safeloss bench`` compares: stock eager torch (the baseline), ``torch.compile``,
safeloss's backends, and the optional fused kernels (Liger-Kernel, quack), each imported only
when it runs. A provider that cannot run on the device at all is left out of the run (and named
in its notes); one that cannot run one workload raises :class:`Skip` with the reason."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .measure import LossFn, Skip
from .workloads import Workload


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    make: Callable[[Workload, torch.device], LossFn]  # raises Skip
    inplace: bool = False  # writes the gradient into the logits' storage (memory is O(N))
    context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None  # around its runs
    not_capturable: str = ""  # why it cannot run inside a CUDA graph (a host sync), if it cannot
    cuda_only: str = ""  # why it cannot run off CUDA at all (then it is not part of a CPU run)


def _safeloss(backend: str, inplace: bool = False) -> Callable[[Workload, torch.device], LossFn]:
    def make(w: Workload, dev: torch.device) -> LossFn:
        import safeloss

        from ..backends.dispatch import triton_unavailable_reason

        if backend == "triton":
            if dev.type != "cuda":
                raise Skip("Triton runs on CUDA; on CPU only under TRITON_INTERPRET=1, far too slow to time")
            reason = triton_unavailable_reason(dev)
            if reason:
                raise Skip(reason)
        eps = w.label_smoothing
        return functools.partial(safeloss.cross_entropy, label_smoothing=eps, backend=backend,
                                 inplace_backward=inplace)

    return make


@contextlib.contextmanager
def _softmax_check_off() -> Iterator[None]:
    """The Triton kernel with its one optional check (the softmaxed-input scan) compiled out.

    The backend takes ``check_softmax=`` at its two seams, which the public API does not
    expose: ``triton_backend.row_losses`` (a signature's first calls) and
    ``triton_backend.Planned`` (the planned eager call that every later call of the signature
    takes, without ``row_losses``). Both are looked up at call / plan time, so partials with the
    flag off measure exactly the same pipeline minus the check. The plans are dropped on entry
    and on exit: a plan made with the check on (by ``safeloss-triton`` on the same shape) would
    keep it on inside, and one made inside would keep it off after. The other findings (bad
    targets, non-finite rows) are counted by the kernel unconditionally and cannot be turned off.
    """
    from ..backends import triton_backend as tb
    from ..core import plan

    orig, orig_planned = tb.row_losses, tb.Planned
    if any("check_softmax" not in inspect.signature(f).parameters for f in (orig, orig_planned)):
        raise Skip("the Triton backend exposes no way to compile its checks out")
    plan.clear()
    tb.row_losses = functools.partial(orig, check_softmax=False)
    tb.Planned = functools.partial(orig_planned, check_softmax=False)
    try:
        yield
    finally:
        tb.row_losses, tb.Planned = orig, orig_planned
        plan.clear()


def _stock_fn(w: Workload) -> LossFn:
    eps = w.label_smoothing
    return lambda x, t: F.cross_entropy(x, t, label_smoothing=eps)


def _eager(w: Workload, dev: torch.device) -> LossFn:
    return _stock_fn(w)


def _compiled(w: Workload, dev: torch.device) -> LossFn:
    if not hasattr(torch, "compile"):
        raise Skip("torch.compile is not available in this torch")
    # A fresh cache per workload: dynamo's recompile limit would otherwise silently send later
    # shapes back to eager. dynamic=False: kernels specialised to the shape, compile's best case.
    torch._dynamo.reset()
    return torch.compile(_stock_fn(w), dynamic=False)


def _liger(w: Workload, dev: torch.device) -> LossFn:
    if dev.type != "cuda":
        raise Skip("Liger-Kernel runs on CUDA only")
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy as fn
    except ImportError:
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except ImportError:
            raise Skip("Liger-Kernel is not installed (pip install liger-kernel)") from None
        fn = None
    if w.prob:
        raise Skip("Liger-Kernel takes class-index targets only")
    if len(w.shape) != 2:
        raise Skip("Liger-Kernel takes (N, C) logits only")
    eps = w.label_smoothing
    if fn is None:
        mod = LigerCrossEntropyLoss(label_smoothing=eps)
        return lambda x, t: mod(x, t)

    def call(x: Tensor, t: Tensor) -> Tensor:
        out = fn(x, t, label_smoothing=eps)
        return out[0] if isinstance(out, tuple) else out  # some versions return (loss, z_loss)

    return call


def _quack(w: Workload, dev: torch.device) -> LossFn:
    if dev.type != "cuda":
        raise Skip("quack runs on CUDA only")
    try:
        from quack.cross_entropy import cross_entropy as fn
    except ImportError:
        raise Skip("quack is not installed (pip install quack-kernels)") from None
    if w.prob or w.label_smoothing:
        raise Skip("quack takes class-index targets without label smoothing only")
    if len(w.shape) != 2:
        raise Skip("quack takes (N, C) logits only")
    if "reduction" in inspect.signature(fn).parameters:
        return lambda x, t: fn(x, t, reduction="mean")
    return lambda x, t: fn(x, t).mean()  # older quack returns per-row losses


_TRITON_CPU = "Triton runs on CUDA; on CPU only under TRITON_INTERPRET=1, far too slow to time"
PROVIDERS: list[Provider] = [
    Provider("torch-eager", _eager),
    Provider("torch-compile", _compiled),
    Provider("safeloss-torch", _safeloss("torch")),
    Provider("safeloss-triton", _safeloss("triton"), cuda_only=_TRITON_CPU),
    Provider("safeloss-triton-inplace", _safeloss("triton", inplace=True), inplace=True, cuda_only=_TRITON_CPU),
    Provider("safeloss-triton-nocheck", _safeloss("triton"), context=_softmax_check_off, cuda_only=_TRITON_CPU),
    Provider("liger", _liger, inplace=True,
             not_capturable="reads the number of non-ignored targets with .item(), a host sync",
             cuda_only="Liger-Kernel runs on CUDA only"),
    Provider("quack", _quack, cuda_only="quack runs on CUDA only"),
]
BASELINE = "torch-eager"


def for_device(dev: torch.device) -> tuple[list[Provider], list[str]]:
    """The providers that can run on ``dev``, and a note for each left out (why)."""
    if dev.type == "cuda":
        return list(PROVIDERS), []
    left = [p for p in PROVIDERS if p.cuda_only]
    notes = [f"{p.name}: {p.cuda_only}" for p in left]
    return [p for p in PROVIDERS if not p.cuda_only], notes

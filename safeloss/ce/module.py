"""``safeloss.SafeCrossEntropyLoss``: a subclass of ``torch.nn.CrossEntropyLoss``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends.dispatch import check_backend
from ..core import extras, report
from ..core import tools as tracing
from ..core._traceback import boundary, module_call, trim
from ..core.errors import ArgumentTypeError, SafeLossError
from ..core.mode import Mode, decide
from ..core.validation import argument_types, check_label_smoothing, check_reduction
from . import extras as ce_extras
from . import pipeline
from .functional import cross_entropy

_NO_BUFFER = object()  # a module without a "weight" buffer (reassigned as a Parameter, say)


class SafeCrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for :class:`torch.nn.CrossEntropyLoss` with checks and a fused GPU kernel.

    A subclass of the stock module: ``isinstance`` checks, the ``weight`` buffer, ``state_dict``
    (interchangeable with the stock module's), ``.to()``, pickling and ``deepcopy`` behave the same.
    Unlike the stock module, an invalid ``reduction`` or ``label_smoothing`` fails here, at
    construction, not at the first forward. Each distinct warning is shown once per instance.

    Extra keyword-only arguments: ``strict``, ``backend``, ``inplace_backward`` and ``fused_grad``, as in
    :func:`safeloss.cross_entropy`, and its LLM and RL extras ``softcap``, ``temperature``,
    ``z_loss`` and ``return_stats`` (checked here, at construction).
    """

    # Class-level defaults: an instance pickled before these options existed still loads and runs.
    # Unannotated: TorchScript reads class annotations, and cannot parse ``float | None``.
    softcap = None
    temperature = 1.0
    z_loss = 0.0
    return_stats = False

    def __init__(
        self,
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
    ) -> None:
        try:
            extras.check(softcap, temperature, z_loss, return_stats, op="SafeCrossEntropyLoss")
            check_label_smoothing(label_smoothing)
            if weight is not None and not isinstance(weight, Tensor):
                # Stock fails here too (a TypeError from register_buffer); say what to pass instead.
                raise ArgumentTypeError(
                    f"weight must be a 1-D float tensor with one entry per class, got "
                    f"{type(weight).__name__}.\nFix: weight=torch.tensor([...], dtype=torch.float32)"
                )
            if size_average is None and reduce is None:
                check_reduction(reduction, "SafeCrossEntropyLoss")
            backend = check_backend(backend)
        except SafeLossError as e:  # the traceback ends at the caller's line (safeloss._traceback)
            trim(e)
            raise
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.strict = strict
        self.backend = backend
        self.inplace_backward = inplace_backward
        self.fused_grad = fused_grad
        self.softcap, self.temperature, self.z_loss = softcap, temperature, z_loss
        self.return_stats = return_stats
        report.watch(self)  # its warn-once state dies with it, compiled calls' included

    def __setstate__(self, state: dict) -> None:  # unpickled or deep-copied: a new instance
        super().__setstate__(state)
        report.watch(self)

    # A SafeLossError ends at the caller's line, above torch's nn.Module.__call__ frames too.
    __call__ = module_call

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        # TorchScript compiles only this branch (scripted code cannot call back into Python): stock
        # torch's forward, with the same settings. See docs/compatibility.md.
        if torch.jit.is_scripting():
            if (self.softcap is not None or self.temperature != 1.0 or self.z_loss != 0.0
                    or self.return_stats):  # stock has none of them: never drop one silently
                raise RuntimeError(
                    "SafeCrossEntropyLoss with softcap, temperature, z_loss or return_stats cannot "
                    "run in TorchScript, which compiles stock torch's loss.\nFix: call the loss "
                    "outside the scripted code, or use torch.compile")
            return torch.nn.functional.cross_entropy(
                input, target, weight=self.weight, ignore_index=self.ignore_index,
                reduction=self.reduction, label_smoothing=self.label_smoothing,
            )
        # A SafeLossError's traceback ends at the caller's line (safeloss._traceback): with a
        # context manager, as TorchScript parses this body and rejects a try; not while Dynamo
        # traces, which cannot trace the context manager (nor while anything compiles).
        if torch.compiler.is_compiling():
            return _forward(self, input, target, True)
        with boundary:
            return _forward(self, input, target, False)

    def extra_repr(self) -> str:
        parts = []
        if self.reduction != "mean":
            parts.append(f"reduction={self.reduction!r}")
        if self.ignore_index != -100:
            parts.append(f"ignore_index={self.ignore_index}")
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.strict is not None:
            parts.append(f"strict={self.strict}")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        if self.inplace_backward:
            parts.append("inplace_backward=True")
        if self.fused_grad:
            parts.append("fused_grad=True")
        for name, default in (("softcap", None), ("temperature", 1.0), ("z_loss", 0.0),
                              ("return_stats", False)):
            value = getattr(self, name)
            if value != default:
                parts.append(f"{name}={value!r}")
        return ", ".join(parts)


def _forward(self: SafeCrossEntropyLoss, input: Tensor, target: Tensor, compiling: bool) -> Tensor:
    # The weight buffer without nn.Module.__getattr__ (a Python call, about 1 us); ``self.weight``
    # where it is not a buffer (reassigned as a Parameter, say).
    buffers = self._buffers
    weight = buffers.get("weight", _NO_BUFFER)
    if weight is _NO_BUFFER:
        weight = self.weight
    key = None
    if not compiling and self.softcap is None and self.return_stats is False and (
            (self.temperature is _T1 and self.z_loss is _Z0)
            or extras.defaults(None, self.temperature, self.z_loss, False)):
        # An eager call of a signature seen before: its plan (core.plan), then only the value
        # checks; else the signature under which this call stores a plan if it is clean.
        key = pipeline.fast(input, target, weight, self.ignore_index, self.reduction,
                            self.label_smoothing, self.backend, self.inplace_backward,
                            self.fused_grad, self.strict, self)
        if isinstance(key, Tensor):
            return key
    mode = decide(input, target, weight)
    if mode is Mode.FX:  # torch.fx.symbolic_trace
        return tracing.fx_module_call(self, cross_entropy, tracing.fx_proxy(input, target, weight),
                                      input, target)
    plain = extras.defaults(self.softcap, self.temperature, self.z_loss, self.return_stats)
    if mode is Mode.DTENSOR and pipeline.parallel_dtensor.is_dtensor(input):
        # Before any argument check: the parallel engine checks them after its first collective.
        return pipeline.dtensor_logits(  # type: ignore[return-value]
            input, target, weight, self.ignore_index, self.reduction, self.label_smoothing,
            strict=self.strict, backend=self.backend, owner=self, inplace_backward=self.inplace_backward,
            fused_grad=self.fused_grad,
            extras=None if plain else (self.softcap, self.temperature, self.z_loss, self.return_stats))
    if not plain:
        return ce_extras.module_forward(self, input, target)  # type: ignore[return-value]
    red = check_reduction(self.reduction, "SafeCrossEntropyLoss")
    argument_types(input, target, weight, self.ignore_index, self.label_smoothing)  # stock's order
    return pipeline.run(
        mode, input, target, weight, self.ignore_index, red,
        check_label_smoothing(self.label_smoothing), strict=self.strict,
        backend=check_backend(self.backend), inplace_backward=self.inplace_backward,
        fused_grad=self.fused_grad, owner=self, key=key if mode is Mode.EAGER else None,
    )


# The default extras' own objects (as in functional): told by identity, without a call.
_T1 = SafeCrossEntropyLoss.__init__.__kwdefaults__["temperature"]
_Z0 = SafeCrossEntropyLoss.__init__.__kwdefaults__["z_loss"]

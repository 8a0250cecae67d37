"""``safeloss.linear_cross_entropy`` and ``safeloss.SafeLinearCrossEntropyLoss``.

One call, layer by layer, as for cross-entropy: validate (the layer here, the target and weight
through the shared ``normalize``) -> choose the tile backend -> the chunk loop's per-position
losses -> the shared ``safeloss.reduction`` -> the shared checks and reporting.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor

from ..backends import dispatch
from ..core import checks, reduction
from ..core import extras as X
from ..core.checks import Scan, bad_target_mask, prob_target_counts, target_bounds
from ..core.config import LazyStrict
from ..core.errors import (
    LabelSmoothingError,
    NonFiniteError,
    TargetOutOfRangeError,
    fmt_list,
    fmt_shape,
    plural,
)
from ..core.report import Finding, _user_frame, report
from ..core.rows import Rows
from ..core.validation import check_label_smoothing, check_reduction
from . import chunked
from . import extras as linear_extras
from .validation import LinearProblem, autocast_enabled, check_options, reword, reworded, validate


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: Any = None,
    strict: bool | None = None,
    backend: str = "auto",
    softcap: float | None = None,
    temperature: float = 1.0,
    z_loss: float = 0.0,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, X.LossStats]:
    """Drop-in for :func:`torch.nn.functional.linear_cross_entropy`, checked, never holding the logits.

    ``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)`` with stock torch's
    values and gradients (its reference path, ``options=None``), computed in chunks of rows so
    that the ``(N, C)`` logits never exist, whatever ``options`` says (it is accepted for
    compatibility and otherwise ignored). The gradients are computed in the forward's chunk loop;
    backward only scales them.

    Args:
        strict: turn every warning into an error; ``None`` follows ``safeloss.strict_mode()``.
        backend: ``"auto"`` (the Triton kernel for each chunk's tile on CUDA), ``"torch"`` or
            ``"triton"``. The matmuls are torch's (cuBLAS on CUDA) on every backend.
        softcap, temperature, z_loss, return_stats: the LLM and RL extras, as in
            :func:`safeloss.cross_entropy` (the logits still never exist; the tiles run torch
            ops on every backend, and backward recomputes them).
    """
    if not X.defaults(softcap, temperature, z_loss, return_stats):
        return linear_extras.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight,
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
            options=options, strict=strict, backend=backend, softcap=softcap,
            temperature=temperature, z_loss=z_loss, return_stats=return_stats)
    check_options(options)
    return run(
        input, linear_weight, target, linear_bias, weight, check_reduction(reduction), ignore_index,
        check_label_smoothing(label_smoothing), strict=strict,
        backend=dispatch.check_backend(backend), owner=None, options=options,
    )


class _NoStockModule(torch.nn.Module):
    """Stand-in base on a torch without ``nn.LinearCrossEntropyLoss`` (before 2.13)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"SafeLinearCrossEntropyLoss needs torch >= 2.13 (torch.nn.LinearCrossEntropyLoss); "
            f"this is torch {torch.__version__}.\nFix: pip install 'torch>=2.13', or "
            "safeloss.linear_cross_entropy, which runs on any supported torch"
        )


_Base: Any = getattr(torch.nn, "LinearCrossEntropyLoss", _NoStockModule)


class SafeLinearCrossEntropyLoss(_Base):  # type: ignore[misc,valid-type]
    """Drop-in for :class:`torch.nn.LinearCrossEntropyLoss`: the same constructor, parameters and
    ``state_dict`` (interchangeable with the stock module's), plus ``strict``, ``backend`` and the
    extras (``softcap``, ``temperature``, ``z_loss``, ``return_stats``) as in
    :func:`safeloss.linear_cross_entropy`. An invalid ``reduction``, ``label_smoothing``,
    ``options`` or extra fails at construction."""

    # Class-level defaults: an instance pickled before these options existed still loads and runs.
    # Unannotated, as in SafeCrossEntropyLoss (TorchScript reads class annotations).
    softcap = None
    temperature = 1.0
    z_loss = 0.0
    return_stats = False

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options: Any = None,
        strict: bool | None = None,
        backend: str = "auto",
        softcap: float | None = None,
        temperature: float = 1.0,
        z_loss: float = 0.0,
        return_stats: bool = False,
    ) -> None:
        X.check(softcap, temperature, z_loss, return_stats, op="SafeLinearCrossEntropyLoss")
        try:
            check_label_smoothing(label_smoothing)
        except LabelSmoothingError as e:  # stock's text too: code that matches on it keeps working
            raise LabelSmoothingError(
                f"{e}\n(stock torch: expected label_smoothing to be in range [0, 1], got "
                f"{label_smoothing})") from None
        check_reduction(reduction)
        check_options(options)
        super().__init__(
            in_features, num_classes, out_features=out_features, bias=bias, device=device,
            dtype=dtype, reduction=reduction, weight=weight, ignore_index=ignore_index,
            label_smoothing=label_smoothing, options=options,
        )
        self.strict = strict
        self.backend = dispatch.check_backend(backend)
        self.softcap, self.temperature, self.z_loss = softcap, temperature, z_loss
        self.return_stats = return_stats

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if not X.defaults(self.softcap, self.temperature, self.z_loss, self.return_stats):
            return linear_extras.module_forward(self, input, target)  # type: ignore[return-value]
        return module_forward(self, input, target, self.strict, dispatch.check_backend(self.backend))

    def extra_repr(self) -> str:
        extra = [f"strict={self.strict}"] if self.strict is not None else []
        if self.backend != "auto":
            extra.append(f"backend={self.backend!r}")
        for name, default in (("softcap", None), ("temperature", 1.0), ("z_loss", 0.0),
                              ("return_stats", False)):
            if getattr(self, name) != default:
                extra.append(f"{name}={getattr(self, name)!r}")
        return ", ".join([super().extra_repr(), *extra])


def module_forward(m: Any, input: Tensor, target: Tensor,
                   strict: bool | None, backend: str) -> Tensor:
    """The stock module's forward (its flat Linear reshaped to (C, *out_features, H)), through safeloss."""
    lin = m.linear
    w = lin.weight.reshape((m.num_classes, *m.out_features, lin.in_features))
    b = None if lin.bias is None else lin.bias.reshape((m.num_classes, *m.out_features))
    return run(
        input, w, target, b, m.weight, check_reduction(m.reduction), m.ignore_index,
        check_label_smoothing(m.label_smoothing), strict=strict, backend=backend, owner=m,
        options=m.options,
    )


# ------------------------------------------------------------------------------ the pipeline


def _capturing(x: object) -> bool:
    return isinstance(x, Tensor) and x.is_cuda and torch.cuda.is_current_stream_capturing()


def _no_host_reads(x: object) -> bool:
    """Meta, fake and subclass tensors, dispatch modes (make_fx, FakeTensorMode): values cannot be
    read, so the call computes (bad labels masked to NaN) and reports nothing."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return isinstance(x, Tensor) and (
        x.device.type == "meta" or type(x) not in (Tensor, torch.nn.Parameter)
        or _get_current_dispatch_mode() is not None
    )


def _forward_ad(*vs: object) -> bool:
    """Dual tensors of torch.autograd.forward_ad (jvp): the chunk loop's autograd.Function has
    no forward-mode rule, the plain chunked ops have."""
    from torch.autograd import forward_ad

    if forward_ad._current_level < 0:
        return False
    return any(isinstance(v, Tensor) and forward_ad.unpack_dual(v).tangent is not None for v in vs)


def _stock_options_warning(options: object, lp: LinearProblem, target: Tensor) -> None:
    """Stock's own warning when ``options`` cannot take its chunked path, same text and
    condition: code (and tests) that watch for it keep seeing it."""
    if options is None:
        return
    eps = lp.p.label_smoothing
    if lp.out_features or eps != 0.0 or target.dtype != torch.int64 or torch.jit.is_tracing():
        import warnings

        b = lp.b
        bias_shape = None if b is None else (lp.num_classes, *lp.out_features)
        warnings.warn(
            "linear_cross_entropy: ``options`` ignored; chunked path needs "
            "reduction in {'mean','sum','none'}, label_smoothing == 0, target.dtype"
            " == int64, out_features == (). Got "
            f"reduction={lp.p.reduction!r}, label_smoothing={eps}, "
            f"target.dtype={target.dtype}, out_features={tuple(lp.out_features)}"
            f", tracing={torch.jit.is_tracing()}"
            f", linear_bias.shape={bias_shape}.",
            stacklevel=_user_frame()[2],
        )


def _autocast_off(dev: torch.device) -> contextlib.AbstractContextManager[object]:
    # The chunk loop picks its own matmul dtypes; autocast would recast them (and torch.autocast
    # does not accept every device type, e.g. meta).
    if autocast_enabled(dev):
        return torch.autocast(dev.type, enabled=False)
    return contextlib.nullcontext()


def _select(backend: str, lp: LinearProblem) -> str:
    """The tile's backend. The Triton share is the class-index tile of a plain head (the LLM
    case); probability targets and K-dimensional heads use torch ops for the tile everywhere."""
    x = lp.x
    if backend == "torch" or x.dtype == torch.float64:
        return "torch"
    if backend == "auto":
        if x.device.type != "cuda" or dispatch.triton_unavailable_reason(x.device) is not None:
            return "torch"
    else:
        reason = dispatch.triton_unavailable_reason(x.device)
        if reason is not None:
            from ..core.errors import BackendError

            raise BackendError(
                f'backend="triton" cannot run on {x.device.type} tensors here: {reason}.\n'
                'Fix: backend="auto" picks Triton where it can run and torch elsewhere'
            )
    return "triton" if (not lp.p.prob and not lp.out_features) else "torch"


def run(
    input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None,
    weight: Tensor | None, reduction_: str, ignore_index: int | None, label_smoothing: float,
    *, strict: bool | None, backend: str, owner: object | None, options: object = None,
) -> Tensor:
    tracing = torch.compiler.is_compiling()
    transform = any(isinstance(v, Tensor) and dispatch.in_functorch_transform(v)
                    for v in (input, linear_weight, linear_bias, target)) \
        or _forward_ad(input, linear_weight, linear_bias, target)
    compiling = tracing or transform or _capturing(input) or _no_host_reads(input)
    key = checks.FUNCTIONAL_KEY if owner is None else id(owner)
    strict_ = LazyStrict(strict)
    if checks._pending and not compiling:
        checks.flush(key, owner, wait=bool(strict_))

    lp = validate(input, linear_weight, target, linear_bias, weight, reduction_, ignore_index,
                  label_smoothing, read_values=not compiling)
    p = lp.p
    _stock_options_warning(options, lp, target)
    static = list(p.findings)
    if p.reduction == "mean" and math.prod(p.positions_shape) == 0:
        static.append(reworded(checks.empty_mean_finding(p)))
    if static and not compiling:
        for finding in static:
            report(finding, strict_, owner)
    # Index targets with such a weight were refused by validate (as stock does); probability
    # targets: stock differentiates the class weight, which the chunk loop does not, so those
    # calls take the plain chunked ops (reference-path memory, exact gradients).
    weight_grad = p.weight is not None and p.weight.requires_grad and torch.is_grad_enabled()
    name = _select(backend, lp)
    dev = lp.x.device
    immediate = (checks.reads_at_once(dev.type) or bool(strict_)) and not compiling
    C, ii = lp.num_classes, p.ignore_index
    bad = None
    neg = badsum = None
    if p.prob:
        t = lp.target
        valid = torch.ones(t.shape[:1], dtype=torch.bool, device=dev)
        if t.numel():
            neg, badsum = prob_target_counts(t, 1)
    else:
        t = lp.target if lp.target.dtype == torch.int64 else lp.target.long()
        if immediate:
            lo, hi = target_bounds(t)
            if lo < 0 or hi >= C:
                nbad = checks.count_bad_targets(t, C, ii)
                if nbad:
                    raise TargetOutOfRangeError(reword(checks.out_of_range_message(p.target, C, ii, dev.type))) from None
        else:
            bad = bad_target_mask(t, C, ii)
            t = t.masked_fill(bad, ii)  # never a gather out of range; the loss there is NaN
        valid = t != ii

    work = torch.float64 if lp.x.dtype == torch.float64 else torch.float32
    sp = chunked.Spec(
        num_classes=C, positions=lp.positions, ignore_index=ii, eps=p.label_smoothing, prob=p.prob,
        weight=None if p.weight is None else
        (p.weight if weight_grad else p.weight.detach()).to(work).contiguous(), backend=name,
        work=work,
    )
    x, w, b = lp.x, lp.w, lp.b
    if lp.compute_dtype != x.dtype:  # under autocast: stock's linear runs in the autocast dtype
        x, w = x.to(lp.compute_dtype), w.to(lp.compute_dtype)
        b = None if b is None else b.to(lp.compute_dtype)
    grads = torch.is_grad_enabled() and any(
        v is not None and v.requires_grad for v in (x, w, b, t if p.prob else None))
    with _autocast_off(dev):
        if transform or weight_grad:
            losses = chunked.differentiable_losses(x, w, b, t, bad, sp)
        else:
            losses = chunked.LinearCE.apply(x, w, b, t, valid, bad, sp, grads and p.reduction != "none")
    losses = losses.reshape(p.positions_shape)
    out = reduction.reduce(Rows(losses, Scan([0] * 8)), p)
    if compiling:
        return out
    if immediate:
        _resolve(lp, losses, valid, out, neg, badsum, strict_, owner)
    else:
        vv = valid.reshape(p.positions_shape)
        zero = torch.zeros((), dtype=torch.int64, device=dev)
        nonfinite = (~torch.isfinite(losses.detach()) & vv).sum()
        nb = zero if bad is None else bad.sum()
        cv = torch.stack([nb, nonfinite, zero, zero, zero if neg is None else neg,
                          zero if badsum is None else badsum, zero, zero]).to(torch.int32)
        checks.defer(Scan(cv), p, losses, out, bool(strict_), key, owner=owner)
    return out


def _resolve(lp: LinearProblem, losses: Tensor, valid: Tensor, out: Tensor, neg: Tensor | None,
             badsum: Tensor | None, strict: LazyStrict, owner: object | None) -> None:
    """The immediate path's findings (CPU, strict mode), in this API's terms."""
    p = lp.p
    if neg is not None and badsum is not None:
        n_neg, n_bad = int(neg), int(badsum)
        if n_neg or n_bad:
            report(reworded(checks.prob_target_finding(p, n_neg, n_bad)), strict, owner)
    finite = math.isfinite(out.item()) if out.dim() == 0 else bool(torch.isfinite(out).all())
    if finite:
        return
    mask = ~torch.isfinite(losses.detach()) & valid.reshape(losses.shape)
    if bool(mask.any()):
        report(nonfinite_finding(lp, mask), strict, owner)
    elif p.reduction == "mean" and math.prod(p.positions_shape) > 0:
        report(reworded(checks.empty_mean_finding(p)), strict, owner)


def _rows_with(t: Tensor | None, what: str, per: str) -> str | None:
    if t is None:
        return None
    bad = ~torch.isfinite(t.detach())
    if t.dim() > 1:
        bad = bad.flatten(1).any(1)
    idx = bad.nonzero().flatten()
    if not idx.numel():
        return None
    shown = [str(i) for i in idx[:5].tolist()]
    return f"{what} ({plural(idx.numel(), per)}: {fmt_list(shown, total=idx.numel())})"


def nonfinite_finding(lp: LinearProblem, mask: Tensor) -> Finding:
    """Non-finite losses, traced back to the operand that holds NaN/inf (read on this path only)."""
    n = max(1, mask.numel())
    count = int(mask.sum())
    idx = mask.nonzero()
    first = [str(list(r)) if mask.dim() > 1 else f"[{r[0]}]" for r in idx[:5].tolist()] if mask.dim() else []
    where = f" (first at {fmt_list(first, total=count)})" if first else ""
    sources = [s for s in (
        _rows_with(lp.x, "the input holds NaN/inf", "row"),
        _rows_with(lp.w, "linear_weight holds NaN/inf", "class row"),
        _rows_with(lp.b, "linear_bias holds NaN/inf", "entry"),
        _rows_with(lp.p.weight, "the class weight holds NaN/inf", "class"),
    ) if s]
    cause = "; ".join(sources) if sources else (
        "every operand is finite, so the logits overflowed (huge input or weights: a diverged run)")
    return Finding(
        "nonfinite", NonFiniteError,
        f"linear_cross_entropy: the loss is NaN or infinite at {count} of "
        f"{plural(n, 'position')}{where}: {cause}.\n"
        f"  input {fmt_shape(lp.x.shape)} {lp.x.dtype}, linear_weight {fmt_shape(lp.w.shape)}\n"
        "Common causes: a learning rate that is too high (the weights blew up), a log/sqrt/"
        "division by zero earlier in the model, NaN in the input data.\n"
        "Fix: check with torch.isfinite(t).all(), lower the learning rate or clip gradients "
        "(torch.nn.utils.clip_grad_norm_), and use torch.autograd.detect_anomaly() to find the "
        "first op that produces NaN",
    )

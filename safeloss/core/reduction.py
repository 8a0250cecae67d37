"""The one place where per-position losses become the result: torch's exact reductions.

* "none": the per-position losses, in the output dtype.
* "sum": their sum (fp32 accumulation, fp64 for fp64 inputs).
* "mean", index targets: sum / (sum of weight[target] over non-ignored positions); the plain count
  of non-ignored positions without ``weight``. Label smoothing shares this denominator.
* "mean", probability targets: sum / number of positions (torch does not divide by weights here;
  pytorch issue 61309).
* Nothing to average (empty batch, all ignored, total weight 0): NaN, with torch's gradients
  (zeros; NaN where the total weight is 0 but positions are not ignored).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .rows import Rows
from .validation import Problem


def denominator(p: Problem, valid: Tensor | None = None) -> int | Tensor:
    """``valid``: ``p.target != p.ignore_index`` where the caller has it (any shape)."""
    if p.prob:
        # Stock torch divides by input.numel() / C: 0/0 = NaN without classes.
        return math.prod(p.positions_shape) if p.num_classes else 0
    t = p.target
    if p.weight is None:
        # Out-of-range targets need no masking here: their loss is NaN, so the mean is NaN
        # whatever the denominator, and every op saved is a launch saved at small shapes on the GPU.
        return (t != p.ignore_index if valid is None else valid).sum()
    valid = t != p.ignore_index
    acc = torch.float64 if p.weight.dtype == torch.float64 else torch.float32
    # gather, not advanced indexing: it also works for 0-d targets inside torch.func.vmap
    idx = t.long().clamp(0, p.num_classes - 1).reshape(-1)
    w = p.weight.to(acc).gather(0, idx).reshape(t.shape)
    return torch.where(valid, w, 0).sum()


def reduce(rows: Rows, p: Problem) -> Tensor:
    if rows.reduced is not None:
        return rows.reduced  # stock torch's own reduction, or this one run by the backend
    # never None here: the pipeline raises on early exits first
    return reduce_losses(rows.losses, p)[0]  # type: ignore[arg-type]


def reduce_losses(losses: Tensor, p: Problem) -> tuple[Tensor, int | Tensor | None]:
    """(the result, the mean's divisor or None): the per-position losses reduced. The divisor is
    the one the mean divided by (NaN where nothing is averaged: ``_nothing_to_average``), so that a
    backend's own backward (``losses_grad``) gives the gradients autograd gives through this."""
    if p.reduction == "none":  # .to() of the same dtype returns the tensor itself: skip the op
        return (losses if losses.dtype == p.out_dtype else losses.to(p.out_dtype)), None
    acc = torch.float64 if losses.dtype == torch.float64 else torch.float32
    total = losses.sum() if losses.dtype == acc else losses.sum(dtype=acc)
    if p.reduction == "sum":
        return (total if total.dtype == p.out_dtype else total.to(p.out_dtype)), None
    denom = denominator(p)
    if p.out_dtype == torch.float16:
        # Stock torch's float16 mean holds the sum in float16 before dividing: a sum beyond 65504
        # is inf even where the mean would fit. The same result, and the same report.
        total = total.to(torch.float16).to(acc)
    # A plain division reproduces torch in the degenerate cases too: 0/0 = NaN; ignored
    # positions get exactly zero gradient (the backends skip them), and zero-weight positions get
    # 0 * inf = NaN, as stock torch gives for a batch whose total weight is 0.
    denom = _nothing_to_average(denom, p)
    out = total / denom
    return (out if out.dtype == p.out_dtype else out.to(p.out_dtype)), denom


def _nothing_to_average(denom: int | Tensor, p: Problem) -> int | Tensor:
    """The divisor of a mean: NaN for a weighted, smoothed mean whose total weight is 0. Stock
    divides its label term and its smoothing term by the total weight separately, so the label
    term's 0/0 makes the mean NaN (nothing to average), and its gradient NaN at every counted
    position, where the smoothing term alone would give finite/0 = inf and gradients of +-inf."""
    if p.label_smoothing > 0 and p.weight is not None and not p.prob and isinstance(denom, Tensor):
        return torch.where(denom == 0, math.nan, denom)
    return denom


def reduce_across(losses: Tensor, p: Problem, across: Callable[[Tensor], Tensor] | None,
                  valid: Tensor | None = None) -> Tensor:
    """``reduce`` of per-position losses whose positions are split over ranks (a DTensor sharded on
    the batch): ``across`` sums a local partial over the ranks (differentiably); ``None`` when
    this rank holds every position. ``p`` is this rank's problem (its targets and the weight);
    ``valid``: ``p.target != p.ignore_index`` where the caller has it."""
    return reduce_with_divisor(losses, p, across, valid)[0]


def reduce_with_divisor(losses: Tensor, p: Problem, across: Callable[[Tensor], Tensor] | None = None,
                        valid: Tensor | None = None) -> tuple[Tensor, int | Tensor | None]:
    """:func:`reduce_across`, and the divisor the mean divided by (None for "none" and "sum"), for
    a node that runs this reduction inside its own forward (:func:`rows_grad` is its gradient)."""
    if p.reduction == "none":
        return (losses if losses.dtype == p.out_dtype else losses.to(p.out_dtype)), None
    acc = torch.float64 if losses.dtype == torch.float64 else torch.float32
    total = losses.sum(dtype=acc)
    if across is not None:
        total = across(total)
    if p.reduction == "sum":
        return (total if total.dtype == p.out_dtype else total.to(p.out_dtype)), None
    denom = denominator(p, valid)
    if across is not None or not isinstance(denom, Tensor):
        # (A count tensor divides as it is: the division casts it to the sum's dtype, as this
        # cast would. A Python int is cast here, once.)
        denom = torch.as_tensor(denom, dtype=acc, device=losses.device)
    if across is not None:
        denom = across(denom)
    if p.out_dtype == torch.float16:
        total = total.to(torch.float16).to(acc)  # as reduce: stock's float16 sum before dividing
    denom = _nothing_to_average(denom, p)
    return (total / denom).to(p.out_dtype), denom


def rows_grad(grad: Tensor, reduction: str, out_dtype: torch.dtype, denom: int | Tensor | None,
              acc: torch.dtype) -> Tensor:
    """The gradient of :func:`reduce_with_divisor`'s result (no ``across``) with respect to each
    per-position loss (in ``acc``), for an upstream ``grad``: what autograd computes through its
    ops, op for op (the casts, the division, the float16 round trip), without the sum's
    expansion: 0-d for "sum" and "mean" (it broadcasts), per position for "none"."""
    g = grad if grad.dtype == acc else grad.to(acc)
    if reduction == "mean":
        g = g / denom  # type: ignore[operator]
        if out_dtype == torch.float16:  # the float16 round trip of the sum, backwards
            g = g.to(torch.float16).to(acc)
    return g


def losses_grad(
    grad: Tensor, reduction: str, out_dtype: torch.dtype, denom: int | Tensor | None,
    shape: torch.Size | tuple[int, ...],
) -> Tensor:
    """The gradient of :func:`reduce_losses`'s result with respect to the (float32) losses, for
    an upstream ``grad``: what autograd computes through its ops, op for op (casts, the division,
    the sum's expansion), for backends that run the reduction inside their own autograd node."""
    f32 = torch.float32
    if reduction == "none":
        return grad if grad.dtype == f32 else grad.to(f32)
    g = grad if grad.dtype == f32 else grad.to(f32)
    if reduction == "mean":
        g = g / denom  # type: ignore[operator]
        if out_dtype == torch.float16:  # the float16 round trip of the sum, backwards
            g = g.to(torch.float16).to(f32)
    return g.expand(shape)

"""Pure-torch backend: stock torch ops for the losses, plus the cheap checks.

The losses come from stock ``F.cross_entropy`` (captured at import), so values and gradients are
exactly stock torch's; what this module adds is the bookkeeping of the checks, arranged so that
the common case costs no extra pass over the data:

* host-side ("immediate", CPU or strict): stock torch reduces (``Rows.reduced``) and checks the
  label range itself (its IndexError is turned into safeloss's message); one scalar read of the
  result settles non-finite values and, via the softmax band, whether 64 sampled rows need a look.
  On a GPU (strict mode) min/max of the targets is read first, since a bad label there would
  trigger a device-side assert.
* device-side ("deferred", CUDA default mode): no value ever reaches the host; invalid targets
  are masked so torch's kernels never see them (no device-side assert) and their loss is NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as tf
from torch import Tensor

from ..core import _flags as F
from ..core.checks import (
    CLEAN,
    Scan,
    bad_target_mask,
    count_bad_targets,
    prob_target_counts,
    sample_rows,
    scan_prob_target,
    scan_softmax,
    softmax_like,
    target_bounds,
)
from ..core.errors import TargetOutOfRangeError
from ..core.rows import Rows
from ..core.validation import Problem


def row_losses(p: Problem, immediate: bool) -> Rows:
    return _immediate(p) if immediate else _deferred(p)


def transform_guard(p: Problem) -> None:
    """Inside torch.func transforms nothing can be read on the host, but on CPU stock torch's own
    bounds check still runs: let it, so a bad label raises (as it does for stock) instead of
    being masked into a silent zero gradient."""
    if p.prob or p.input.device.type != "cpu":
        return
    try:
        _stock_cross_entropy(p.input.detach(), p.target.long(), weight=p.weight,
                             ignore_index=p.ignore_index, reduction="none")
    except (IndexError, RuntimeError) as e:
        if "out of bounds" not in str(e):
            raise
        raise TargetOutOfRangeError(
            f"a class-index target is outside the class range 0..{p.num_classes - 1} "
            f"({p.num_classes} classes) inside a torch.func transform (vmap, grad, ...), where "
            f"safeloss cannot read the labels to name them. Stock torch reports: {e}\n"
            "Fix: check the labels outside the transform (e.g. call the loss once eagerly on a "
            "batch), or set ignore_index to the value used for 'no label'"
        ) from None


# Captured at import: safeloss.patch() later routes torch.nn.functional.cross_entropy through
# safeloss, and this backend must keep calling the stock function, never itself.
_stock_cross_entropy = tf.cross_entropy


def per_position(p: Problem, reduction: str = "none") -> Tensor:
    """Stock torch on the normalized problem (targets already validated to be in range)."""
    if p.prob:
        return _stock_cross_entropy(p.input, p.target, weight=p.weight,
                                label_smoothing=p.label_smoothing, reduction=reduction)
    t = p.target
    # Positional (size_average and reduce None): keywords cost 0.3 us per call.
    return _stock_cross_entropy(p.input, t if t.dtype == torch.int64 else t.long(), p.weight, None,
                                p.ignore_index, None, reduction, p.label_smoothing)


def _immediate(p: Problem) -> Rows:
    x, C = p.input, p.num_classes
    cdim = 0 if x.dim() == 1 else 1
    counts = [0] * F.SIZE
    if p.prob:
        counts[F.PROB_NEGATIVE], counts[F.PROB_BAD_SUM] = scan_prob_target(p.target, cdim)
    elif not x.is_cpu:
        # Strict mode on a GPU: stock torch would hit a device-side assert, so check first.
        lo, hi = target_bounds(p.target)
        if (lo < 0 or hi >= C) and (nbad := count_bad_targets(p.target, C, p.ignore_index)):
            counts[F.BAD_TARGET] = nbad
            return Rows(None, Scan(counts))
    if p.weight is not None and x.device.type != "cpu":
        # Off the CPU validation reads the weight once per version; this call syncs anyway, so
        # count its negative entries too (a write through .data bumps no version).
        counts[F.WEIGHT_NEGATIVE] = int((p.weight < 0).sum())
    try:
        result = per_position(p, p.reduction)
    except (IndexError, RuntimeError):
        # On CPU, stock torch checks every target itself ("Target 5 is out of bounds."): letting
        # it do so keeps the happy path free of an extra pass over the targets.
        if p.prob or not (nbad := count_bad_targets(p.target, C, p.ignore_index)):
            raise
        counts[F.BAD_TARGET] = nbad
        return Rows(None, Scan(counts))
    out_finite = None
    if result.dim() == 0:
        value = result.item()
        out_finite = math.isfinite(value)
        if out_finite and not _could_be_softmaxed(value, p):
            # CLEAN, the common call: nothing counted, so nothing to build or resolve.
            return _rows(p, result, Scan(counts, True, True) if any(counts) else CLEAN)
    counts[F.SOFTMAX_LIKE], counts[F.SOFTMAX_CHECKED] = scan_softmax(x, cdim, C)
    return _rows(p, result, Scan(counts, nonfinite_from_output=True, out_finite=out_finite))


def _could_be_softmaxed(mean_loss: float, p: Problem) -> bool:
    """Whether a plain mean loss is compatible with softmaxed input at all.

    With probabilities q in [0, 1] summing to 1 as "logits", each position's loss
    logsumexp(q) - q_y lies in [log(1 + (C-1)/e), log(C - 1 + e)], and so does any plain mean of
    them. A mean outside that band rules the mistake out without reading the logits again.
    Only when the softmax check's sample is every position: otherwise the sampled rows can look
    softmaxed while the mean is not. The margin covers the row-sum tolerance (a row summing to
    1 + d moves the loss by at most |d|) and a half-precision loss's rounding.
    """
    if p.reduction != "mean" or p.prob or p.weight is not None or p.label_smoothing:
        return True  # the band is not worth deriving for these; scan the sample
    if math.prod(p.positions_shape) > F.SOFTMAX_SAMPLE:
        return True
    C = p.num_classes
    lo, hi = math.log1p((C - 1) / math.e), math.log(C - 1 + math.e)
    dtype = p.input.dtype
    margin = F.SOFTMAX_SUM_TOL[str(dtype).removeprefix("torch.")] + 8 * torch.finfo(dtype).eps * hi + 1e-3
    return lo - margin <= mean_loss <= hi + margin


def _rows(p: Problem, result: Tensor, scan: Scan) -> Rows:
    if p.reduction == "none":
        return Rows(result, scan)
    return Rows(None, scan, result, lambda: _no_grad_rows(p))  # reduced, recompute


def _no_grad_rows(p: Problem) -> Tensor:
    with torch.no_grad():
        return per_position(p)


def _deferred(p: Problem) -> Rows:
    x, C = p.input, p.num_classes
    cdim = 0 if x.dim() == 1 else 1
    zero = torch.zeros((), dtype=torch.int64, device=x.device)
    bad_count = neg = badsum = zero
    if p.prob:
        if p.target.numel():
            neg, badsum = prob_target_counts(p.target, cdim)
        losses = _stock_cross_entropy(x, p.target, weight=p.weight,
                                  label_smoothing=p.label_smoothing, reduction="none")
        valid = None
    else:
        t = p.target.long()
        bad = bad_target_mask(t, C, p.ignore_index)
        bad_count = bad.sum()
        # Masked as ignored for torch's kernel (never an out-of-bounds read), then NaN'd so that
        # nothing trains silently on a bad label before the error is raised at a later call.
        losses = _stock_cross_entropy(x, t.masked_fill(bad, p.ignore_index), weight=p.weight,
                                  ignore_index=p.ignore_index, label_smoothing=p.label_smoothing,
                                  reduction="none").masked_fill(bad, math.nan)
        valid = (t != p.ignore_index) & ~bad
    nonfinite = ~torch.isfinite(losses.detach())
    if valid is not None:
        nonfinite = nonfinite & valid  # not in place: torch.func.functionalize rejects __iand__
    like = checked = zero
    if C >= 2 and x.numel():
        # fixed: no branch on the batch size where it is symbolic (Dynamo, make_fx "symbolic")
        fixed = torch.compiler.is_compiling() or not isinstance(x.shape[0], int)
        rows = sample_rows(x.detach(), fixed=fixed)
        like = softmax_like(rows).sum()
        checked = torch.full((), rows.shape[0], dtype=torch.int64, device=x.device)
    # Every call, on the device (no sync): negative weights however the weight was changed.
    wneg = zero if p.weight is None else (p.weight.detach() < 0).sum()
    # OVERFLOW stays 0: stock torch computes in the output dtype, so an overflow is an inf loss,
    # counted as non-finite (and explained by checks.nonfinite_finding).
    counts = torch.stack([bad_count, nonfinite.sum(), like, checked, neg, badsum, wneg, zero])
    return Rows(losses, Scan(counts.to(torch.int32)))

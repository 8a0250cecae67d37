"""Pure-torch backend: stock torch ops for the per-position losses, plus the cheap checks.

The losses come from ``F.cross_entropy(..., reduction="none")``, so values and gradients are
exactly stock torch's; what this module adds is the bookkeeping of the checks, arranged so that
the common case costs one read of the targets and one row of the logits:

* host-side ("immediate", CPU or strict): min/max of the targets settles range and ignore_index
  questions at once; the softmax check reads one row and stops unless that row sums to 1.
* device-side ("deferred", CUDA default mode): no value ever reaches the host; invalid targets
  are masked so torch's kernels never see them (no device-side assert) and their loss is NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as tf

from .. import _flags as F
from ..checks import (
    Scan,
    count_bad_targets,
    sample_rows,
    scan_prob_target,
    scan_softmax,
    softmax_like,
    target_bounds,
)
from ..validation import Problem
from . import Rows


def row_losses(p: Problem, immediate: bool) -> Rows:
    return _immediate(p) if immediate else _deferred(p)


def _immediate(p: Problem) -> Rows:
    x, C = p.input, p.num_classes
    cdim = 0 if x.dim() == 1 else 1
    counts = [0] * F.SIZE
    denominator = None
    if p.prob:
        counts[F.PROB_NEGATIVE], counts[F.PROB_BAD_SUM] = scan_prob_target(p.target, cdim)
        losses = tf.cross_entropy(x, p.target, weight=p.weight,
                                  label_smoothing=p.label_smoothing, reduction="none")
        denominator = math.prod(p.positions_shape)
    else:
        t = p.target
        lo, hi = target_bounds(t)
        if lo < 0 or hi >= C:
            nbad = count_bad_targets(t, C, p.ignore_index)
            if nbad:
                counts[F.BAD_TARGET] = nbad
                return Rows(None, Scan(counts))
        losses = tf.cross_entropy(x, t if t.dtype == torch.int64 else t.long(), weight=p.weight,
                                  ignore_index=p.ignore_index, label_smoothing=p.label_smoothing,
                                  reduction="none")
        if p.weight is None and not lo <= p.ignore_index <= hi:
            denominator = t.numel()  # nothing ignored: the mean is a plain average
    counts[F.SOFTMAX_LIKE], counts[F.SOFTMAX_CHECKED] = scan_softmax(x, cdim, C)
    return Rows(losses, Scan(counts, nonfinite_from_output=True), denominator)


def _deferred(p: Problem) -> Rows:
    x, C = p.input, p.num_classes
    cdim = 0 if x.dim() == 1 else 1
    zero = torch.zeros((), dtype=torch.int64, device=x.device)
    bad_count = neg = badsum = zero
    if p.prob:
        if p.target.numel():
            y = p.target.detach()
            tol = F.PROB_SUM_TOL.get(str(y.dtype).removeprefix("torch."), 1e-4)
            neg = (y < 0).any(cdim).sum()
            badsum = ((y.sum(cdim, dtype=torch.float32) - 1).abs() > tol).sum()
        losses = tf.cross_entropy(x, p.target, weight=p.weight,
                                  label_smoothing=p.label_smoothing, reduction="none")
        valid = None
    else:
        t = p.target.long()
        bad = ((t < 0) | (t >= C)) & (t != p.ignore_index)
        bad_count = bad.sum()
        # Masked as ignored for torch's kernel (never an out-of-bounds read), then NaN'd so that
        # nothing trains silently on a bad label before the error is raised at the next call.
        losses = tf.cross_entropy(x, t.masked_fill(bad, p.ignore_index), weight=p.weight,
                                  ignore_index=p.ignore_index, label_smoothing=p.label_smoothing,
                                  reduction="none").masked_fill(bad, math.nan)
        valid = (t != p.ignore_index) & ~bad
    nonfinite = ~torch.isfinite(losses.detach())
    if valid is not None:
        nonfinite &= valid
    like = checked = zero
    if C >= 2 and x.numel():
        rows = sample_rows(x.detach())
        like = softmax_like(rows).sum()
        checked = torch.full((), rows.shape[0], dtype=torch.int64, device=x.device)
    counts = torch.stack([bad_count, nonfinite.sum(), like, checked, neg, badsum, zero, zero])
    return Rows(losses, Scan(counts.to(torch.int32)))

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

import ctypes
import math
import struct

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
from ..core.errors import TargetOutOfRangeError, stock_class
from ..core.plan import Skeleton
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
        # stock's own class there: IndexError, RuntimeError under vmap (its batched gather)
        raise stock_class(TargetOutOfRangeError, IndexError if isinstance(e, IndexError) else RuntimeError)(
            f"a class-index target is outside the class range 0..{p.num_classes - 1} "
            f"({p.num_classes} classes) inside a torch.func transform (vmap, grad, ...), where "
            f"safeloss cannot read the labels to name them. Stock torch reports: {e}\n"
            "Fix: check the labels outside the transform (e.g. call the loss once eagerly on a "
            "batch), or set ignore_index to the value used for 'no label'"
        ) from None


# Captured at import: safeloss.patch() later routes torch.nn.functional.cross_entropy through
# safeloss, and this backend must keep calling the stock function, never itself.
_stock_cross_entropy = tf.cross_entropy
# The op stock F.cross_entropy ends in (the same values, the same autograd graph), for planned
# calls: torch's reduction enum (torch.nn._reduction.get_enum) by name.
_cross_entropy_loss = torch._C._nn.cross_entropy_loss
_REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}


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
    counts = [0] * F.SIZE
    if not p.prob and not x.is_cpu:
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
        return _stock_refused(p, counts)
    if p.prob:  # after the loss (see HostPlan.rows)
        counts[F.PROB_NEGATIVE], counts[F.PROB_BAD_SUM] = scan_prob_target(p.target, _cdim(x))
    return _judge(p, result, counts)


def _cdim(x: Tensor) -> int:
    return 0 if x.dim() == 1 else 1


def _stock_refused(p: Problem, counts: list[int]) -> Rows:
    """Stock torch raised: on CPU it checks every target itself ("Target 5 is out of bounds."),
    and letting it do so keeps the happy path free of an extra pass over the targets. Called from
    the ``except`` clause (a bare ``raise`` re-raises stock's error where it is not ours)."""
    if p.prob or not (nbad := count_bad_targets(p.target, p.num_classes, p.ignore_index)):
        raise
    counts[F.BAD_TARGET] = nbad
    return Rows(None, Scan(counts))


def _judge(p: Problem, result: Tensor, counts: list[int]) -> Rows:
    """The value checks after the loss: one scalar read of the result settles non-finite values
    and, via the softmax band, whether the logits need a look (one row, then a sample)."""
    out_finite = None
    if result.dim() == 0:
        value = result.item()
        out_finite = math.isfinite(value)
        if out_finite and not _could_be_softmaxed(value, p):
            # CLEAN, the common call: nothing counted, so nothing to build or resolve.
            return _rows(p, result, Scan(counts, True, True) if any(counts) else CLEAN)
    counts[F.SOFTMAX_LIKE], counts[F.SOFTMAX_CHECKED] = scan_softmax(p.input, _cdim(p.input), p.num_classes)
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
    band = _band(p)
    return band is None or band[0] <= mean_loss <= band[1]


def _band(p: Problem) -> tuple[float, float] | None:
    """The band of ``_could_be_softmaxed``, or None where it does not apply (every mean could be)."""
    if p.reduction != "mean" or p.prob or p.weight is not None or p.label_smoothing:
        return None  # the band is not worth deriving for these; scan the sample
    if math.prod(p.positions_shape) > F.SOFTMAX_SAMPLE:
        return None
    C = p.num_classes
    lo, hi = math.log1p((C - 1) / math.e), math.log(C - 1 + math.e)
    dtype = p.input.dtype
    margin = F.SOFTMAX_SUM_TOL[str(dtype).removeprefix("torch.")] + 8 * torch.finfo(dtype).eps * hi + 1e-3
    return lo - margin, hi + margin


# ------------------------------------------------------------------------ planned calls


class HostPlan:
    """The host path (CPU tensors) of one planned signature (``safeloss.core.plan``): the constants
    of ``_immediate``'s value checks, so a clean call runs stock torch's op, reads one scalar
    and compares it (or reads the first row of the logits), and returns."""

    __slots__ = (
        "acc",
        "args",
        "band",
        "cast",
        "cdim",
        "first",
        "prob",
        "raw",
        "raw_bytes",
        "row0",
        "scalar",
        "skeleton",
        "slack",
        "tol",
    )

    def __init__(self, p: Problem) -> None:
        self.skeleton = Skeleton(p)
        self.prob = p.prob
        self.cdim = _cdim(p.input)
        self.scalar = p.reduction != "none"
        self.band = _band(p)
        # How scan_softmax reaches the first position's row (its one-row exit).
        x = p.input
        self.row0 = 1 if x.dim() == 1 else 2 if x.dim() == 2 else 3
        self.tol = F.SOFTMAX_SUM_TOL[str(x.dtype).removeprefix("torch.")]
        self.acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        # A short first row is read straight from host memory (see _row0_softmaxed): one bytes
        # copy and an unpack instead of three torch ops, the largest part of a small call's checks.
        C, code = p.num_classes, _STRUCT_CODES.get(x.dtype)
        self.raw = struct.Struct(f"={C}{code}") if code and x.dim() <= 2 and C <= _RAW_ROW_MAX else None
        self.raw_bytes = None if self.raw is None else ctypes.c_char * self.raw.size
        self.first = _CTYPES.get(x.dtype)  # the first logit, read as one value
        # How far torch's sum of a row of non-negative entries (float32 accumulation, any order;
        # float64 for float64) can be from the exact sum s: gamma_C * s <= C * 2**-23 * s, doubled
        # for the float64 sum taken here.
        self.slack = C * (2.0**-51 if x.dtype == torch.float64 else 2.0**-22)
        # Stock F.cross_entropy's own call of its op, less its Python layer (argument checks for
        # torch-function overrides: plans exist only where none can apply).
        self.args = (_REDUCTION_ENUM[p.reduction], p.ignore_index, p.label_smoothing)
        self.cast = not p.prob and p.target.dtype != torch.int64  # the op takes int64 labels

    def rows(self, x: Tensor, t: Tensor, w: Tensor | None) -> Tensor | tuple[Rows, Problem]:
        """``_immediate`` for this signature: the result itself when the value checks find
        nothing to report, else the :class:`Rows` ``_immediate`` returns for these tensors and
        the :class:`Problem` ``normalize`` returned for them."""
        counts: list[int] | None = None
        try:
            result = _cross_entropy_loss(x, t.long() if self.cast else t, w, *self.args)
        except (IndexError, RuntimeError):  # (probability targets: stock's error, re-raised)
            p = self.skeleton.problem(x, t, w)
            return _stock_refused(p, [0] * F.SIZE), p
        if self.prob:
            # After the loss, not before: the same counts, and measurably fewer page faults at
            # large shapes (glibc; benchmarks/cpu_overhead.py) than small allocations made just
            # before stock's large ones.
            neg, badsum = scan_prob_target(t, self.cdim)
            if neg or badsum:
                counts = [0] * F.SIZE
                counts[F.PROB_NEGATIVE], counts[F.PROB_BAD_SUM] = neg, badsum
        if counts is None:
            if self.scalar:
                value = result.item()
                if value - value == 0:  # finite (inf - inf and NaN - NaN are NaN)
                    # A mean outside the band of softmaxed input settles it; else the first row
                    # (scan_softmax's first test: a row that cannot look softmaxed means the
                    # sample cannot all look softmaxed, so _judge would conclude CLEAN too).
                    band = self.band
                    if band is not None and not band[0] <= value <= band[1]:
                        return result
                    # _row0_softmaxed's first test, inline (the common call): a negative entry,
                    # first the position's first logit alone (at data_ptr whatever the strides;
                    # half the rows of raw logits settle here), then the short row read raw.
                    # (ptr 0: no memory behind the tensor, a ZeroTensor: torch's sum below.)
                    first = self.first
                    if first is not None and not x.is_neg() and (ptr := x.data_ptr()):
                        if first.from_address(ptr).value < 0.0:
                            return result
                        raw = self.raw
                        if (raw is not None and x.is_contiguous()
                                and min(raw.unpack_from(self.raw_bytes.from_address(ptr))) < 0.0):  # type: ignore[union-attr]
                            return result
                    if not self._row0_softmaxed(x):
                        return result
            elif not self._row0_softmaxed(x) and bool(torch.isfinite(result).all()):
                # What resolve() concludes for reduction="none": every loss finite (ignored
                # positions are 0) and a first row that is not a distribution.
                return result
        p = self.skeleton.problem(x, t, w)
        return _judge(p, result, [0] * F.SIZE if counts is None else counts), p

    def _row0_softmaxed(self, x: Tensor) -> bool:
        """Could the first position's row be a softmax output? scan_softmax's first test (does it
        sum to 1 within tolerance?), and False where that row cannot look softmaxed at all.

        A short row that is contiguous in host memory is read here from its bytes first: a
        negative entry rules it out (``softmax_like`` wants every entry >= 0, so the sampled rows
        cannot all look softmaxed), and so does an exact sum of non-negative entries farther from
        1 than the tolerance plus the most torch's float32 sum can differ from it. Anything else
        (and NaN/inf) gets torch's own sum: the verdict is always the one torch's sum gives."""
        raw = self.raw
        if raw is not None and (ptr := x.data_ptr()) and x.stride(self.cdim) == 1 and not x.is_neg():
            v = raw.unpack_from(self.raw_bytes.from_address(ptr))  # type: ignore[union-attr]
            if min(v) < 0.0:
                return False
            s = sum(v)
            if abs(s - 1.0) > self.tol + self.slack * s:
                return False
        x = x.detach()
        first = x if self.row0 == 1 else x[0] if self.row0 == 2 else x.flatten(2)[0, :, 0]
        return abs(float(first.sum(dtype=self.acc)) - 1.0) <= self.tol


_STRUCT_CODES = {torch.float32: "f", torch.float64: "d", torch.float16: "e"}
_CTYPES = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}
_RAW_ROW_MAX = 256  # classes; longer rows take torch's sum (negligible next to their loss)


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

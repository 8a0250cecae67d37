"""Linear + cross-entropy with extras (z-loss, softcap, temperature, statistics), never holding the logits.

The entries (``api.linear_cross_entropy``, ``SafeLinearCrossEntropyLoss``) branch here only when
an extra is not at its default. The call: the layer's checks and the shared target normalization
(``validation.validate``) -> a chunk loop over rows (``chunked.chunk_rows``: the memory plan's cut) whose logits
tile becomes the per-position losses with ``core.extras``'s math -> ``core.reduction`` plus the
z-loss term -> the shared findings.

Memory: as the plain op, at most a few tiles alive, never the (N, C) logits. Unlike the plain op,
backward recomputes each tile (one more matmul per chunk) instead of keeping precomputed
gradients: the z-loss term and the cross-entropy reduce with different denominators, so the
upstream gradient is not one number per call. torch.func transforms, forward-mode AD and a class
weight that requires grad take the same chunks as plain differentiable ops (autograd then keeps
the tiles, as the reference path does). Where the tile backend is Triton (``chunked.select``, as
for the plain op: class-index targets of a plain head, float32 tiles) and the call is eager, each
tile goes through the cross-entropy kernels with the extras inside (``backends.triton_extras``):
one kernel pass per tile forward, one per tile backward, its gradient written over the tile.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ..backends.dispatch import check_backend
from ..core import checks, reduction
from ..core import extras as X
from ..core._traceback import trim
from ..core.checks import Scan, bad_target_mask, prob_target_counts, target_bounds
from ..core.config import LazyStrict
from ..core.errors import SafeLossError, TargetOutOfRangeError
from ..core.mode import NO_HOST_READS, Mode, decide
from ..core.report import Finding, report
from ..core.rows import Rows
from ..core.validation import check_label_smoothing, check_reduction
from . import chunked
from .validation import (
    LinearProblem,
    autocast_enabled,
    check_options,
    nonfinite_finding,
    reword,
    reworded,
    stock_first,
    validate,
)

Result = Tensor | tuple[Tensor, X.LossStats]
_OP = "linear_cross_entropy"


def linear_cross_entropy(
    input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Tensor | None,
    weight: Tensor | None, reduction: str, ignore_index: int | None, label_smoothing: float,
    options: Any, strict: bool | None, backend: str, softcap: object, temperature: object,
    z_loss: object, return_stats: object,
) -> Result:
    """``safeloss.linear_cross_entropy`` with an extra that is not at its default."""
    try:
        check_options(options)
        ex = X.check(softcap, temperature, z_loss, return_stats, op=_OP)
        return run(decide(input, linear_weight, target, linear_bias, weight), input, linear_weight,
                   target, linear_bias, weight, check_reduction(reduction, "linear_cross_entropy"), ignore_index,
                   check_label_smoothing(label_smoothing), ex, strict=strict, owner=None,
                   backend=check_backend(backend))
    except SafeLossError as e:  # the traceback ends at the caller's line (core._traceback)
        first = stock_first(e, input, linear_weight, target, linear_bias, weight, reduction,
                            ignore_index, label_smoothing)  # stock's order of checks
        trim(first)
        if first is e:
            raise
        raise first from None


def module_forward(m: Any, input: Tensor, target: Tensor) -> Result:
    """``SafeLinearCrossEntropyLoss.forward`` with an extra set (the stock module's layout)."""
    ex = X.check(m.softcap, m.temperature, m.z_loss, m.return_stats, op="SafeLinearCrossEntropyLoss")
    backend = check_backend(m.backend)
    lin = m.linear
    w = lin.weight.reshape((m.num_classes, *m.out_features, lin.in_features))
    b = None if lin.bias is None else lin.bias.reshape((m.num_classes, *m.out_features))
    try:
        return run(decide(input, w, target, b, m.weight), input, w, target, b, m.weight,
                   check_reduction(m.reduction, "SafeLinearCrossEntropyLoss"), m.ignore_index,
                   check_label_smoothing(m.label_smoothing), ex, strict=m.strict, owner=m, backend=backend)
    except SafeLossError as e:  # stock's order of checks
        first = stock_first(e, input, w, target, b, m.weight, m.reduction, m.ignore_index,
                            m.label_smoothing, "SafeLinearCrossEntropyLoss")
        if first is e:
            raise
        raise first from None


def _forward_ad(*vs: object) -> bool:
    """Dual tensors of torch.autograd.forward_ad: the chunk loop's Function has no jvp rule."""
    from torch.autograd import forward_ad

    if forward_ad._current_level < 0:
        return False
    return any(isinstance(v, Tensor) and forward_ad.unpack_dual(v).tangent is not None for v in vs)


def run(
    mode: Mode, input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None,
    weight: Tensor | None, reduction_: str, ignore_index: int | None, label_smoothing: float,
    ex: X.Extras, *, strict: bool | None, owner: object | None, backend: str = "auto",
) -> Result:
    no_host = mode in NO_HOST_READS
    key = checks.LINEAR_FUNCTIONAL_KEY if owner is None else id(owner)
    strict_ = LazyStrict(strict)
    if checks._pending and not no_host:
        checks.flush(key, owner, wait=bool(strict_))

    lp = validate(input, linear_weight, target, linear_bias, weight, reduction_, ignore_index,
                  label_smoothing, read_values=not no_host)
    p = lp.p
    static = list(p.findings)
    if p.reduction == "mean" and math.prod(p.positions_shape) == 0:
        static.append(reworded(checks.empty_mean_finding(p)))
    if static and not no_host:
        for finding in static:
            report(finding, strict_, owner)

    dev = lp.x.device
    immediate = not no_host and (checks.reads_at_once(dev.type) or bool(strict_))
    C, ii, D = lp.num_classes, p.ignore_index, lp.positions
    work = X.work_dtype(lp.x.dtype)
    weight_grad = p.weight is not None and p.weight.requires_grad and torch.is_grad_enabled()
    bad = None
    if p.prob:
        t = lp.target
        valid = torch.ones((t.shape[0], D), dtype=torch.bool, device=dev)
    else:
        t = lp.target if lp.target.dtype == torch.int64 else lp.target.long()
        if immediate:
            lo, hi = target_bounds(t)
            if (lo < 0 or hi >= C) and checks.count_bad_targets(t, C, ii):
                raise TargetOutOfRangeError(
                    reword(checks.out_of_range_message(p.target, C, ii, dev.type))) from None
        else:
            bad = bad_target_mask(t, C, ii)
            t = t.masked_fill(bad, ii)  # never a gather out of range; the loss there is NaN
        valid = (t != ii).reshape(t.shape[0], D)

    transform = mode is Mode.TRANSFORM or _forward_ad(input, linear_weight, linear_bias, target)
    # The tile backend as the plain op chooses it (its error for backend="triton" where Triton
    # cannot run); the kernels take eager calls (graphs, torch.func and meta tensors: torch ops).
    name = "torch" if lp.x.is_meta and mode is not Mode.CAPTURE else chunked.select(
        backend, lp.x, p.prob, D != 1 or bool(lp.out_features))
    kernel = (name == "triton" and mode in (Mode.EAGER, Mode.CAPTURE) and not transform
              and not weight_grad and work == torch.float32)
    sp = _Spec(C, D, ii, p.label_smoothing, p.prob, ex, work, None if p.weight is None else
               (p.weight if weight_grad else p.weight.detach()).to(work).contiguous(), kernel)
    x, w, b = lp.x, lp.w, lp.b
    if lp.compute_dtype != x.dtype:  # under autocast: stock's linear runs in the autocast dtype
        x, w = x.to(lp.compute_dtype), w.to(lp.compute_dtype)
        b = None if b is None else b.to(lp.compute_dtype)
    with _autocast_off(dev):
        if transform or weight_grad:
            ce, zl, lse, ent, correct = _differentiable(x, w, b, t, valid, sp)
        else:
            ce, zl, lse, ent, correct = _LinearExtras.apply(x, w, b, t, valid, sp)
    pos = p.positions_shape
    ce, zl = ce.reshape(pos), zl.reshape(pos)
    vpos = valid.reshape(pos)
    if bad is not None:
        ce = ce.masked_fill(bad.reshape(pos), math.nan)
    zl_rows = zl if ex.z_loss else None
    ce_red = reduction.reduce(Rows(ce, checks.CLEAN), replace(p, out_dtype=work))
    zl_red = X.reduce_z_loss(zl_rows, None if p.prob else vpos, p.reduction, pos, work, dev)
    out = (ce_red if zl_rows is None else ce_red + zl_red).to(p.out_dtype)
    rows = ce if zl_rows is None else ce + zl_rows
    stats = None
    if ex.return_stats:
        stats = X.LossStats(lse.reshape(pos).float(), ent.reshape(pos).float(), zl_red.detach().float(),
                            X.no_accuracy(dev) if p.prob else X.accuracy(correct, valid.reshape(-1)))

    if not no_host:
        note = ex.note()
        if immediate:
            _resolve(lp, rows, vpos, out, strict_, owner, note)
        else:
            zero = torch.zeros((), dtype=torch.int64, device=dev)
            neg = badsum = zero
            if p.prob and t.numel():
                neg, badsum = prob_target_counts(t, 1)
            nonfinite = (~torch.isfinite(rows.detach()) & vpos).sum()
            cv = torch.stack([zero if bad is None else bad.sum(), nonfinite, zero, zero, neg, badsum,
                              zero, zero]).to(torch.int32)
            checks.defer(Scan(cv), p, rows, out, bool(strict_), key, owner=owner,
                         note=checks.DEFERRED_NOTE + note)
    return out if stats is None else (out, stats)


def _autocast_off(dev: torch.device) -> contextlib.AbstractContextManager[object]:
    # The chunk loop picks its own matmul dtypes; autocast would recast them.
    if autocast_enabled(dev):
        return torch.autocast(dev.type, enabled=False)
    return contextlib.nullcontext()


def _noted(f: Finding, note: str) -> Finding:
    note = checks.noted(note, f.kind)
    return replace(f, message=note + f.message) if note else f


def _resolve(lp: LinearProblem, rows: Tensor, valid: Tensor, out: Tensor, strict: LazyStrict,
             owner: object | None, note: str) -> None:
    """The immediate path's findings (CPU, strict mode), in this API's terms."""
    p = lp.p
    if p.prob and p.target.numel():
        neg, badsum = prob_target_counts(lp.target, 1)
        n_neg, n_bad = int(neg), int(badsum)
        if n_neg or n_bad:
            report(_noted(reworded(checks.prob_target_finding(p, n_neg, n_bad)), note), strict, owner)
    finite = math.isfinite(out.item()) if out.dim() == 0 else bool(torch.isfinite(out).all())
    if finite:
        return
    mask = ~torch.isfinite(rows.detach()) & valid
    if bool(mask.any()):
        report(_noted(nonfinite_finding(lp, mask, _OVERFLOW), note), strict, owner)
    elif p.reduction == "mean" and math.prod(p.positions_shape) > 0:
        report(_noted(reworded(checks.empty_mean_finding(p)), note), strict, owner)


# What overflows when every operand is finite, with the extras.
_OVERFLOW = ("every operand is finite, so the capped, scaled logits or the z-loss term overflowed "
             "(huge input or weights: a diverged run; or a tiny temperature)")


# ------------------------------------------------------------------------------ the chunks


@dataclass
class _Spec:
    num_classes: int
    positions: int  # D: positions per input row (prod(out_features), 1 for a plain head)
    ignore_index: int
    eps: float
    prob: bool
    ex: X.Extras
    work: torch.dtype  # float32 (float64 for float64 inputs)
    weight: Tensor | None  # (C,), work dtype
    # Each tile through the Triton kernels with the extras inside (``backends.triton_extras``):
    # class-index targets of a plain head in float32, eager calls (see ``run``).
    kernel: bool = False


class _Mats:
    """The three matmuls of a tile. Half precision on CUDA: half operands (stock's linear rounds
    the logits to the half dtype too), fp32 accumulators; elsewhere the operands in the work
    dtype (upcast once: CPU half matmuls are emulated and slow), and each tile of logits rounded
    to the half dtype once, as stock's half-precision linear leaves it (the same numbers as
    without the extras, and as on CUDA)."""

    def __init__(self, x: Tensor, w: Tensor, b: Tensor | None, work: torch.dtype) -> None:
        self.half = x.dtype != work and x.is_cuda
        self.round = x.dtype if x.dtype in (torch.float16, torch.bfloat16) and not self.half else None
        if x.dtype != work and not self.half:
            x, w, b = x.to(work), w.to(work), None if b is None else b.to(work)
        self.x, self.w, self.b, self.work = x, w, b, work

    def logits(self, s: int, e: int) -> Tensor:
        z = torch.mm(self.x[s:e], self.w.t())
        if self.b is not None:
            z = z + self.b
        if self.round is not None:
            z = z.to(self.round)
        return z.to(self.work)

    def dx(self, dz: Tensor) -> Tensor:
        return torch.mm(dz.to(self.w.dtype), self.w).to(self.work)

    def dw(self, dz: Tensor, s: int, e: int) -> Tensor:
        return torch.mm(dz.to(self.x.dtype).t(), self.x[s:e]).to(self.work)


def _rows_of(z: Tensor, r: int, sp: _Spec) -> Tensor:
    """(r, C * D) tile -> (r * D, C): one row of classes per position."""
    if sp.positions == 1:
        return z
    return z.view(r, sp.num_classes, sp.positions).movedim(1, 2).reshape(r * sp.positions, sp.num_classes)


def _tile_of(d: Tensor, r: int, sp: _Spec) -> Tensor:
    """The inverse of ``_rows_of``."""
    if sp.positions == 1:
        return d
    return d.view(r, sp.positions, sp.num_classes).movedim(2, 1).reshape(r, sp.num_classes * sp.positions)


def _targets_of(t: Tensor, s: int, e: int, sp: _Spec) -> Tensor:
    """Chunk rows s:e of the targets, one per position: (r * D,) labels or (r * D, C) probabilities."""
    tc = t[s:e]
    if not sp.prob:
        return tc.reshape(-1)
    if sp.positions == 1:
        return tc
    return tc.reshape(e - s, sp.num_classes, sp.positions).movedim(1, 2).reshape(-1, sp.num_classes)


def _forward_tile(z: Tensor, tc: Tensor, vc: Tensor, sp: _Spec, stats: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """(zt, logp, lse, ce, zl, entropy, argmax) of one (positions, C) tile."""
    ex = sp.ex
    zt = X.transform(z, ex)
    lse = torch.logsumexp(zt, 1)
    logp = zt - X.loss_lse(lse).unsqueeze(1)
    ce = X.ce_rows(logp, tc, None if sp.prob else vc, sp.weight, sp.eps, sp.prob)
    zl = X.z_loss_rows(lse, None if sp.prob else vc, ex.z_loss) if ex.z_loss else torch.zeros_like(ce)
    ent = pred = None
    if stats:
        ent = X.entropy(logp.detach())
        pred = X.argmax(z.detach(), 1)
    return zt, logp, lse, ce, zl, ent, pred


def _kernel_tile(z: Tensor, tc: Tensor, sp: _Spec, stats: bool, ce: Tensor, zl: Tensor, lse: Tensor,
                 ent: Tensor | None, correct: Tensor | None) -> None:
    """The tile's rows from the Triton forward kernel with the extras inside (no softmax check:
    the findings are counted from the rows), written into the chunk's slices."""
    from ..backends import triton_extras

    ex = sp.ex
    cc, zc, lc, ec, hit, _flags, _wy = triton_extras._fwd_impl(
        z, tc, sp.weight, sp.ignore_index, sp.eps, False, False, math.inf, ex.softcap or 0.0,
        ex.temperature, ex.z_loss, stats)
    ce.copy_(cc)
    lse.copy_(lc)
    if ex.z_loss:
        zl.copy_(zc)
    else:
        zl.zero_()
    if ent is not None and correct is not None:
        ent.copy_(ec)
        correct.copy_(hit)


def _kernel_tile_grad(z: Tensor, tc: Tensor, sp: _Spec, lse: Tensor, g_ce: Tensor, g_zl: Tensor) -> Tensor:
    """d loss / d z of the tile from the Triton backward kernel (both upstream gradients, through
    cap and temperature), written over the tile itself."""
    from ..backends import triton_extras

    ex = sp.ex
    triton_extras._launch_bwd_x(z, tc, sp.weight, lse, lse, g_ce, g_zl, z, None, sp.ignore_index, sp.eps,
                                False, ex.softcap or 0.0, ex.temperature, ex.z_loss)
    return z


def _differentiable(x: Tensor, w: Tensor, b: Tensor | None, t: Tensor, valid: Tensor, sp: _Spec
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The chunks as plain differentiable ops (torch.func, forward AD, a class weight that
    requires grad, double backward): autograd keeps each tile, as on the reference path."""
    ops = _Mats(x, w, b, sp.work)
    N = ops.x.shape[0]
    vflat = valid.reshape(-1)
    parts: list[list[Tensor]] = [[], [], [], [], []]
    stats = sp.ex.return_stats
    rows = chunked.chunk_rows(N, ops.x.shape[1], ops.w.shape[0], ops.x.dtype, ops.x.device)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        z = _rows_of(ops.logits(s, e), e - s, sp)
        tc, vc = _targets_of(t, s, e, sp), vflat[s * sp.positions : e * sp.positions]
        _, _, lse, ce, zl, ent, pred = _forward_tile(z, tc, vc, sp, stats)
        parts[0].append(ce)
        parts[1].append(zl)
        parts[2].append(lse.detach())
        if stats:
            assert ent is not None and pred is not None
            parts[3].append(ent)
            parts[4].append((pred == tc) if not sp.prob else pred.new_zeros(pred.shape, dtype=torch.bool))
    empty = ops.x.new_zeros((0,), dtype=sp.work)
    out = [torch.cat(ps) if ps else empty for ps in parts[:4]]
    correct = torch.cat(parts[4]) if parts[4] else torch.zeros(0, dtype=torch.bool, device=x.device)
    return out[0], out[1], out[2], out[3], correct


class _LinearExtras(torch.autograd.Function):
    """(x (N, H), W (C*D, H), b, target, valid (N, D), spec) -> per-position (cross-entropy,
    z-loss term, lse, entropy, right prediction), flat over the N * D positions."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, t: Tensor, valid: Tensor,  # type: ignore[override]
                sp: _Spec) -> tuple[Tensor, ...]:
        ops = _Mats(x, w, b, sp.work)
        N, D = x.shape[0], sp.positions
        stats = sp.ex.return_stats
        dev = x.device
        P = N * D
        ce = torch.empty(P, dtype=sp.work, device=dev)
        zl = torch.empty(P, dtype=sp.work, device=dev)
        lse_all = torch.empty(P, dtype=sp.work, device=dev)
        ent = torch.empty(P if stats else 0, dtype=sp.work, device=dev)
        correct = torch.empty(P if stats else 0, dtype=torch.bool, device=dev)
        vflat = valid.reshape(-1)
        rows = chunked.chunk_rows(N, ops.x.shape[1], ops.w.shape[0], ops.x.dtype, dev)
        for s in range(0, N, rows):
            e = min(N, s + rows)
            z = _rows_of(ops.logits(s, e), e - s, sp)
            tc, vc = _targets_of(t, s, e, sp), vflat[s * D : e * D]
            if sp.kernel:  # one kernel pass over the tile: rows, lse, entropy, argmax hits
                _kernel_tile(z, tc, sp, stats, ce[s:e], zl[s:e], lse_all[s:e], ent[s:e] if stats else None,
                             correct[s:e] if stats else None)
                continue
            _, _, lse, cc, zc, ec, pred = _forward_tile(z, tc, vc, sp, stats)
            ce[s * D : e * D] = cc
            zl[s * D : e * D] = zc
            lse_all[s * D : e * D] = lse
            if stats:
                assert ec is not None and pred is not None
                ent[s * D : e * D] = ec
                correct[s * D : e * D] = (pred == tc) if not sp.prob else False
        ctx.sp = sp
        ctx.dtypes = (x.dtype, w.dtype, None if b is None else b.dtype, t.dtype)
        ctx.save_for_backward(x, w, b, t, valid, lse_all if sp.kernel else None)
        ctx.mark_non_differentiable(lse_all, ent, correct)
        return ce, zl, lse_all, ent, correct

    @staticmethod
    def backward(ctx: Any, g_ce: Tensor, g_zl: Tensor, *_: object) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, w, b, t, valid, lse_saved = ctx.saved_tensors
        sp: _Spec = ctx.sp
        xdt, wdt, bdt, tdt = ctx.dtypes
        need_x, need_w, need_b, need_t = ctx.needs_input_grad[:4]
        need_t = need_t and sp.prob
        create = torch.is_grad_enabled()
        if create or X.batched(g_ce, g_zl):
            # Double backward: the same chunks, differentiably; a batched backward
            # (is_grads_batched): the same, without a graph (the chunks below scale in place).
            with torch.enable_grad():
                wrt = [v for v, n in zip((x, w, b, t), (need_x, need_w, need_b, need_t)) if n]
                ce, zl, *_ = _differentiable(x, w, b, t, valid, sp)
                # Without a z-loss term its rows are constant zeros, which autograd cannot differentiate.
                outs = [(o, go.to(o.dtype)) for o, go in ((ce, g_ce), (zl, g_zl)) if o.requires_grad]
                got = iter(torch.autograd.grad([o for o, _ in outs], wrt, [go for _, go in outs],
                                               create_graph=create, allow_unused=True))
            res = [next(got) if n else None for n in (need_x, need_w, need_b, need_t)]
            return (*res, None, None)
        ops = _Mats(x, w, b, sp.work)
        N, D, C = x.shape[0], sp.positions, sp.num_classes
        dev = x.device
        ex = sp.ex
        gce = g_ce.reshape(-1).to(sp.work)
        gzl = g_zl.reshape(-1).to(sp.work)
        vflat = valid.reshape(-1)
        dx = torch.zeros(x.shape, dtype=sp.work, device=dev) if need_x else None
        dw = torch.zeros(w.shape, dtype=sp.work, device=dev) if need_w else None
        db = torch.zeros((w.shape[0],), dtype=sp.work, device=dev) if need_b else None
        dq = torch.zeros(t.shape, dtype=sp.work, device=dev) if need_t else None
        wt = sp.weight
        w_sum: float | Tensor = float(C) if wt is None else wt.sum()

        def add(dz: Tensor, s: int, e: int) -> None:  # a chunk's tile gradient into the inputs'
            if dx is not None:
                dx[s:e] = ops.dx(dz)
            if dw is not None:
                dw.add_(ops.dw(dz, s, e))
            if db is not None:
                db.add_(dz.sum(0))

        rows = chunked.chunk_rows(N, ops.x.shape[1], ops.w.shape[0], ops.x.dtype, dev)
        for s in range(0, N, rows):
            e = min(N, s + rows)
            r = e - s
            z = _rows_of(ops.logits(s, e), r, sp)
            tc, vc = _targets_of(t, s, e, sp), vflat[s * D : e * D]
            gc, gz = gce[s * D : e * D], gzl[s * D : e * D]
            if sp.kernel:  # one kernel pass: the tile's gradient through cap and temperature, in place
                add(_kernel_tile_grad(z, tc, sp, lse_saved[s:e], gc, gz), s, e)
                continue
            zt, logp, lse, *_ = _forward_tile(z, tc, vc, sp, False)
            p = logp.exp()
            if sp.prob:
                dzt, dqc = X.prob_grad(p, logp, tc, wt, sp.eps, gc, gz, lse, ex.z_loss, need_t)
                if dqc is not None and dq is not None:
                    dq[s:e] = dqc if D == 1 else dqc.view(r, D, C).movedim(2, 1)
            else:
                y = torch.where(vc, tc, 0)
                w_y = None if wt is None else wt.gather(0, y)
                dzt = X.index_grad(p, y, vc, vc, w_y, wt, w_sum, sp.eps, C, gc, gz, lse, ex.z_loss)
            add(_tile_of(X.chain(dzt, zt, ex), r, sp), s, e)
        return (None if dx is None else dx.to(xdt), None if dw is None else dw.to(wdt),
                None if db is None else db.to(bdt), None if dq is None else dq.to(tdt), None, None)

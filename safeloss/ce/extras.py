"""The cross-entropy op with extras (z-loss, softcap, temperature, statistics): its own call path.

The entries (``functional.cross_entropy``, ``SafeCrossEntropyLoss``) branch here only when an
extra is not at its default; every other call runs ``pipeline`` untouched. The path, downward as
there: argument checks and target normalization (``core.validation.normalize``, so every shape,
dtype and device check and hint applies) -> per-position fp32 losses of the capped, scaled logits
with differentiable torch ops (``core.extras``) -> ``core.reduction`` plus the z-loss term
(``core.extras.reduce_z_loss``) -> the shared findings (``core.checks``), reported at once,
deferred (CUDA default mode) or by the compiled graph (``core.compiled``).

Where the backend choice (``backends.dispatch.select``, as for the plain op) picks Triton, the
per-position rows come from the cross-entropy kernels with the extras inside their passes
(``backends.triton_extras``: one read of the logits forward, one backward, the kernel's own
findings counts); elsewhere, and in the settings the kernels cannot take (torch.func transforms,
forward-mode AD, ONNX export, the ops a torch.jit.trace records), from the torch ops here.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..backends import dispatch, torch_backend
from ..backends.dispatch import check_backend
from ..core import _flags as F
from ..core import checks, compiled, reduction
from ..core import extras as X
from ..core._traceback import trim
from ..core.config import LazyStrict
from ..core.errors import SafeLossError
from ..core.mode import NO_HOST_READS, Mode, decide
from ..core.report import report
from ..core.rows import Rows
from ..core.tools import check_layouts, densify_result, paused_tracer
from ..core.validation import Problem, check_label_smoothing, check_reduction, normalize, resolve_reduction
from ..parallel import dtensor as parallel_dtensor
from . import pipeline

Result = Tensor | tuple[Tensor, X.LossStats]


def cross_entropy(
    mode: Mode, input: Tensor, target: Tensor, weight: Tensor | None, size_average: bool | None,
    ignore_index: int, reduce: bool | None, reduction_: str, label_smoothing: float,
    softcap: object, temperature: object, z_loss: object, return_stats: object, *,
    strict: bool | None, backend: str, inplace_backward: bool, fused_grad: bool,
) -> Result:
    """``safeloss.cross_entropy`` with an extra that is not at its default (``mode``: the entry's)."""
    try:
        ex = X.check(softcap, temperature, z_loss, return_stats)
        red = resolve_reduction(size_average, reduce, reduction_)
        eps = check_label_smoothing(label_smoothing)
        backend = check_backend(backend)
        if not ex.active:  # defaults spelled otherwise (numpy numbers): the plain path
            return pipeline.run(mode, input, target, weight, ignore_index, red, eps, strict=strict,
                                backend=backend, inplace_backward=inplace_backward,
                                fused_grad=fused_grad, owner=None)
        return run(mode, input, target, weight, ignore_index, red, eps, ex, strict=strict, owner=None,
                   backend=backend)
    except SafeLossError as e:  # the traceback ends at the caller's line (core._traceback)
        trim(e)
        raise


def module_forward(m: torch.nn.CrossEntropyLoss, input: Tensor, target: Tensor) -> Result:
    """``SafeCrossEntropyLoss.forward`` with an extra set (read from the module at every call)."""
    ex = X.check(m.softcap, m.temperature, m.z_loss, m.return_stats,  # type: ignore[attr-defined]
                 op="SafeCrossEntropyLoss")
    mode = decide(input, target, m.weight)
    red, eps = check_reduction(m.reduction, "SafeCrossEntropyLoss"), check_label_smoothing(m.label_smoothing)
    if not ex.active:
        return pipeline.run(mode, input, target, m.weight, m.ignore_index, red, eps,
                            strict=m.strict, backend=check_backend(m.backend),  # type: ignore[attr-defined]
                            inplace_backward=m.inplace_backward,  # type: ignore[attr-defined]
                            fused_grad=m.fused_grad, owner=m)  # type: ignore[attr-defined]
    return run(mode, input, target, m.weight, m.ignore_index, red, eps, ex,
               strict=m.strict, owner=m, backend=check_backend(m.backend))  # type: ignore[attr-defined]


def run(
    mode: Mode, input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
    reduction_: str, label_smoothing: float, ex: X.Extras, *, strict: bool | None,
    owner: object | None, backend: str = "auto",
) -> Result:
    """One call with extras, in ``mode`` (see ``core.mode.TABLE``: the same checks per mode).
    ``backend``: as the plain op's (``backends.dispatch.select``); where it picks Triton, the
    extras run inside the kernels (``backends.triton_extras``), else as torch ops."""
    if mode is Mode.DTENSOR:
        if parallel_dtensor.is_dtensor(input):
            # DTensor logits, any layout: the parallel engine, extras included (as pipeline.run).
            return parallel_dtensor.run(input, target, weight, ignore_index, reduction_,  # type: ignore[return-value]
                                        label_smoothing, strict=strict, backend="auto", owner=owner,
                                        extras=(ex.softcap, ex.temperature, ex.z_loss, ex.return_stats))
        # Plain logits with a DTensor target or weight: this rank's loss on the whole of them.
        target, weight = parallel_dtensor.full(target), parallel_dtensor.full(weight)  # type: ignore[assignment]
        mode = decide(input, target, weight)
    if mode is Mode.SPARSE:
        check_layouts(input, target, weight)  # what is left: sparse probability targets
        dense = target.to_dense()
        res = run(decide(input, dense, weight), input, dense, weight, ignore_index, reduction_,
                  label_smoothing, ex, strict=strict, owner=owner, backend=backend)
        if isinstance(res, tuple):
            return densify_result(res[0], target, reduction_), res[1]
        return densify_result(res, target, reduction_)
    if mode is Mode.JIT_TRACE:
        # Every check, on the example inputs, as eager code; then the ops alone are recorded.
        with paused_tracer(), torch.no_grad():
            _call(Mode.EAGER, input, target, weight, ignore_index, reduction_, label_smoothing, ex,
                  strict, owner, backend)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # Recorded as torch ops (the plain op records stock's): a trace replays anywhere.
            return _call(Mode.CAPTURE, input, target, weight, ignore_index, reduction_,
                         label_smoothing, ex, strict, owner, backend, kernel=False)
    return _call(mode, input, target, weight, ignore_index, reduction_, label_smoothing, ex, strict,
                 owner, backend)


def _call(
    mode: Mode, input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
    reduction_: str, label_smoothing: float, ex: X.Extras, strict: bool | None,
    owner: object | None, backend: str = "auto", kernel: bool = True,
) -> Result:
    no_host = mode in NO_HOST_READS
    key = checks.FUNCTIONAL_KEY if owner is None else id(owner)
    strict_ = LazyStrict(strict)
    if checks._pending and not no_host:
        checks.flush(key, owner, wait=bool(strict_))

    p = normalize(input, target, weight, ignore_index, reduction_, label_smoothing,
                  read_values=not no_host)
    static = p.findings
    if p.reduction == "mean" and math.prod(p.positions_shape) == 0:
        static = [*static, checks.empty_mean_finding(p)]
    if static and (not no_host or mode in (Mode.ONNX, Mode.ABSTRACT)):
        for finding in static:
            report(finding, strict_, owner)
    if mode is Mode.TRANSFORM:
        torch_backend.transform_guard(p)  # CPU: a bad label raises inside torch.func, as stock

    x = p.input
    cdim = 0 if x.dim() == 1 else 1
    C = p.num_classes
    acc = X.work_dtype(x.dtype, p.out_dtype)
    bad = valid = None
    t = p.target
    if not p.prob:
        t = t.long()
        # Bad labels are masked (never an out-of-range gather) and counted: an eager call raises
        # the shared out-of-range error from the counts, before anything is returned.
        bad = checks.bad_target_mask(t, C, p.ignore_index)
        valid = (t != p.ignore_index) & ~bad

    # The backend as the plain op chooses it (its errors too: backend="triton" where Triton
    # cannot run); meta tensors and an op without classes run torch ops, as there.
    name = "torch" if (mode is Mode.ABSTRACT and x.is_meta) or not C else dispatch.select(backend, p)
    pos = p.positions_shape
    counts = hit = zt = None
    if (name == "triton" and kernel and mode is not Mode.ONNX and mode is not Mode.TRANSFORM
            and not _forward_ad(x)):
        # The extras inside the kernels' passes: one read of the logits forward, one backward;
        # the findings are the kernel's counts (the capped, scaled logits' losses; the raw logits
        # for the softmaxed-input check).
        from ..backends import triton_extras

        wk = None if p.weight is None else p.weight.float().contiguous()
        ce, zl_rows, lse, ent, hit, flags = triton_extras.rows(
            x, p.target, wk, ignore_index=p.ignore_index, label_smoothing=p.label_smoothing,
            prob_target=p.prob, ex=ex, out_max=F.overflow_bound(p.out_dtype), check_softmax=C >= 2)
        counts = flags.to(torch.int64)
    else:
        z = x if x.dtype == acc else x.to(acc)
        w = None if p.weight is None else p.weight.to(acc)
        sp = _Spec(ex, p.label_smoothing, p.prob, C)
        one = x.dim() == 1  # (C,): one position, computed as (1, C)
        z2, t2 = (z.unsqueeze(0), t.unsqueeze(0)) if one else (z, t)
        v2 = None if valid is None else (valid.unsqueeze(0) if one else valid)
        plain = (mode is Mode.TRANSFORM or _forward_ad(z, t) or (w is not None and w.requires_grad)
                 or not C)
        if plain:  # torch.func, forward-mode AD, a class weight to differentiate: plain torch ops
            ce, zl, lse, ent, zt = _differentiable(z2, t2, v2, w, sp)
        else:
            x2 = x.unsqueeze(0) if one else x
            ce, zl, lse, ent, zt = _RowsCE.apply(x2, t2, v2, w, sp, acc)
        ce, zl, lse, ent = ce.reshape(pos), zl.reshape(pos), lse.reshape(pos), ent.reshape(
            pos if ex.return_stats else (0,))
        zt = zt.reshape(x.shape)
        zl_rows = zl if ex.z_loss else None
        if bad is not None:
            ce = ce.masked_fill(bad, math.nan)  # nothing trains on a bad label before it is reported
    total_rows = ce if zl_rows is None else ce + zl_rows

    ce_red = reduction.reduce(Rows(ce, checks.CLEAN), replace(p, out_dtype=acc))
    zl_red = X.reduce_z_loss(zl_rows, valid, p.reduction, pos, acc, x.device)
    out = (ce_red if zl_rows is None else ce_red + zl_red).to(p.out_dtype)

    stats = None
    if ex.return_stats:
        acc_ = X.no_accuracy(x.device)
        if not p.prob:
            assert valid is not None
            if hit is not None:
                acc_ = X.accuracy(hit.bool(), valid)
            else:
                pred = X.argmax(x.detach(), cdim) if C else torch.zeros_like(t)
                acc_ = X.accuracy(pred == t, valid)
        assert ent is not None
        stats = X.LossStats(lse.detach().float(), ent.detach().float(), zl_red.detach().float(), acc_)

    _findings(mode, p, x, zt, t, total_rows, valid, bad, out, ex, static, strict, strict_, key, owner,
              counts)
    return out if stats is None else (out, stats)


def _forward_ad(*vs: Tensor) -> bool:
    """Dual tensors of torch.autograd.forward_ad (jvp): ``_RowsCE`` has no forward-mode rule."""
    from torch.autograd import forward_ad

    if forward_ad._current_level < 0:
        return False
    return any(forward_ad.unpack_dual(v).tangent is not None for v in vs)


@dataclass(frozen=True)
class _Spec:
    ex: X.Extras
    eps: float
    prob: bool
    num_classes: int


def _forward(z: Tensor, t: Tensor, valid: Tensor | None, w: Tensor | None, sp: _Spec
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(ce, zl, lse, entropy, zt, logp) per position, classes in dim 1 (differentiable ops)."""
    ex = sp.ex
    zt = X.transform(z, ex)
    lse = torch.logsumexp(zt, 1)
    logp = zt - X.loss_lse(lse).unsqueeze(1)
    ce = X.ce_rows(logp, t, valid, w, sp.eps, sp.prob, 1) if sp.num_classes else logp.sum(1)
    zl = X.z_loss_rows(lse, valid, ex.z_loss) if ex.z_loss else torch.zeros_like(ce)
    ent = X.entropy(logp.detach(), 1) if ex.return_stats else ce.new_empty(0)
    return ce, zl, lse, ent, zt, logp


def _differentiable(z: Tensor, t: Tensor, valid: Tensor | None, w: Tensor | None, sp: _Spec
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    ce, zl, lse, ent, zt, _ = _forward(z, t, valid, w, sp)
    return ce, zl, lse.detach(), ent, zt.detach()


class _RowsCE(torch.autograd.Function):
    """(logits, target, valid, weight, spec, work dtype) -> per-position (cross-entropy, z-loss
    term, lse, entropy, capped scaled logits): the shared formulas, with the hand-written gradient
    of ``core.extras``. Saved for backward: the logits as given, and the capped, scaled logits in
    the work dtype where a cap or a temperature made them (else backward casts the logits
    again): never the work-dtype copy of half-precision logits besides (a double backward
    recomputes from the logits as given)."""

    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor, valid: Tensor | None, w: Tensor | None,  # type: ignore[override]
                sp: _Spec, acc: torch.dtype) -> tuple[Tensor, ...]:
        ex = sp.ex
        z = x if x.dtype == acc else x.to(acc)
        zt = X.transform(z, ex, inplace=True)
        lse = torch.logsumexp(zt, 1)
        lse_ce = X.loss_lse(lse)  # NaN for the rows stock's loss is NaN (its gradient too)
        if sp.prob or sp.eps > 0 or ex.return_stats:
            logp = zt - lse_ce.unsqueeze(1)
            ce = X.ce_rows(logp, t, valid, w, sp.eps, sp.prob, 1)
            ent = X.entropy(logp, 1) if ex.return_stats else ce.new_empty(0)
            del logp
        else:  # the LLM case: no logits-sized intermediate besides the capped, scaled logits
            assert valid is not None
            ce = X.nll_rows(zt, lse_ce, t, valid, w, 1)
            ent = ce.new_empty(0)
        zl = X.z_loss_rows(lse, valid, ex.z_loss) if ex.z_loss else torch.zeros_like(ce)
        zt_out = zt if zt is not x else zt.view_as(zt)
        ctx.sp, ctx.acc = sp, acc
        ctx.save_for_backward(x, t, valid, w, zt_out if zt is not z else None, lse_ce)
        ctx.mark_non_differentiable(lse, ent, zt_out)
        return ce, zl, lse, ent, zt_out

    @staticmethod
    def backward(ctx, g_ce: Tensor, g_zl: Tensor, *_: object) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, t, valid, w, zt, lse = ctx.saved_tensors
        sp: _Spec = ctx.sp
        acc: torch.dtype = ctx.acc
        need_z, need_t = ctx.needs_input_grad[0], sp.prob and ctx.needs_input_grad[1]
        create = torch.is_grad_enabled()
        if create or X.batched(g_ce, g_zl):
            # Double backward: the same formulas, differentiably; a batched backward
            # (is_grads_batched): the same, without a graph (the formulas below scale in place).
            with torch.enable_grad():
                wrt = [v for v, n in ((x, need_z), (t, need_t)) if n]
                ce, zl, *_ = _forward(x.to(acc), t, valid, w, sp)
                # Without a z-loss term its rows are constant zeros, which autograd cannot differentiate.
                outs = [(o, go) for o, go in ((ce, g_ce), (zl, g_zl)) if o.requires_grad]
                got = iter(torch.autograd.grad([o for o, _ in outs], wrt, [go for _, go in outs],
                                               create_graph=create, allow_unused=True))
            return (next(got) if need_z else None, next(got) if need_t else None, None, None, None, None)
        ex = sp.ex
        if zt is None:  # no cap, no temperature: the logits themselves, in the work dtype
            zt = x.to(acc)
        p = torch.sub(zt, lse.unsqueeze(1)).exp_()
        dq = None
        if sp.prob:
            logp = zt - lse.unsqueeze(1) if need_t else p
            dzt, dq = X.prob_grad(p, logp, t, w, sp.eps, g_ce, g_zl, lse, ex.z_loss, need_t)
        else:
            y = torch.where(valid, t, 0)
            w_y = None if w is None else w.gather(0, y.reshape(-1)).reshape(y.shape)
            w_sum: float | Tensor = float(sp.num_classes) if w is None else w.sum()
            dzt = X.index_grad(p, y, valid, valid, w_y, w, w_sum, sp.eps, sp.num_classes, g_ce,
                               g_zl, lse, ex.z_loss)
        dz = X.chain(dzt, zt, ex).to(x.dtype) if need_z else None
        return dz, (None if dq is None else dq.to(t.dtype)), None, None, None, None


def _findings(
    mode: Mode, p: Problem, x: Tensor, zt: Tensor | None, t: Tensor, rows: Tensor,
    valid: Tensor | None, bad: Tensor | None, out: Tensor, ex: X.Extras, static: list,
    strict: bool | None, strict_: LazyStrict, key: int, owner: object | None,
    kernel_counts: Tensor | None = None,
) -> None:
    """The value checks of the call, from one vector of device counts (``core._flags``): the
    kernel's (``kernel_counts``, int64), or counted here with torch ops. ``zt``: the capped, scaled
    logits, None where the kernel never wrote them (recomputed only to name a finding)."""
    compiled_graph = (mode in (Mode.COMPILE, Mode.GRAPH) or (mode is Mode.ABSTRACT and not x.is_meta))
    if mode in NO_HOST_READS and not compiled_graph:
        return  # cuda-graph capture, torch.func, meta tensors, ONNX: nothing can be reported
    if kernel_counts is None:
        kernel_counts = device_counts(p, x, rows, valid, bad, ex, fixed=mode is not Mode.EAGER)
    counts = torch.cat([kernel_counts, torch.isfinite(out.detach()).all().to(torch.int64).reshape(1)])
    if compiled_graph:
        compiled.note(p, Rows(rows, checks.Scan(counts[: F.SIZE])), out, key, strict, static)
        return
    immediate = checks.reads_at_once("cpu" if x.is_cpu else x.device.type) or bool(strict_)
    acc = X.work_dtype(x.dtype, p.out_dtype)
    if immediate:
        host = counts.tolist()  # one read: the counts and whether the result is finite
        found = any(v for i, v in enumerate(host[: F.SIZE]) if i != F.SOFTMAX_CHECKED)
        if zt is None and (found or not host[F.SIZE]):
            zt = X.transform(x.detach().to(acc), ex)  # a finding to word: the logits it judged
        # the NaN/inf finding names the capped, scaled logits
        p_rep = p if zt is None else replace(p, input=zt.detach())
        # A bad label is about the labels alone: its error comes without the extras' note.
        note = "" if host[F.BAD_TARGET] else ex.note()
        checks.resolve(checks.Scan(host[: F.SIZE]), p_rep, rows.detach(), out, bool(host[F.SIZE]),
                       strict_, owner, note=note)
    else:
        # A deferred record keeps the logits' shape and dtype only: a stand-in of zt's.
        stand_in = zt if zt is not None else x.new_empty((), dtype=acc).expand(x.shape)
        checks.defer(checks.Scan(counts[: F.SIZE]), replace(p, input=stand_in.detach()), rows, out,
                     bool(strict_), key, note=checks.DEFERRED_NOTE + ex.note(), owner=owner)


def device_counts(p: Problem, x: Tensor, rows: Tensor, valid: Tensor | None, bad: Tensor | None,
                  ex: X.Extras, fixed: bool) -> Tensor:
    """``core._flags`` counts of a call (int64, on the device, no host read). The softmaxed-input
    check samples the *raw* logits; the others judge the per-position losses of the capped,
    scaled logits (``rows``)."""
    dev = x.device
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    cdim = 0 if x.dim() == 1 else 1
    C = p.num_classes
    r = rows.detach()
    finite = torch.isfinite(r)
    nonfinite = ~finite if valid is None else ~finite & valid
    like = checked = zero
    if C >= 2 and x.numel():
        sample = checks.sample_rows(x.detach(), fixed=fixed or not isinstance(x.shape[0], int))
        like = checks.softmax_like(sample).sum()
        checked = torch.full((), sample.shape[0], dtype=torch.int64, device=dev)
    neg = badsum = zero
    if p.prob and p.target.numel():
        neg, badsum = checks.prob_target_counts(p.target, cdim)
    wneg = zero if p.weight is None else (p.weight.detach() < 0).sum()
    over = zero
    bound = F.overflow_bound(p.out_dtype)
    # A position's loss beyond the half dtype's range, where the extras leave that possible at all
    # (a softcap bounds it for class indices without weights: X.loss_bound).
    if math.isfinite(bound) and X.loss_bound(ex, C, p.prob, p.weight is not None) >= bound:
        big = finite & (r.abs() >= bound)
        over = (big if valid is None else big & valid).sum()
    counts = [zero if bad is None else bad.sum(), nonfinite.sum(), like, checked, neg, badsum, wneg,
              over]
    return torch.stack([c.to(torch.int64) for c in counts])

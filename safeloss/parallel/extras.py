"""The vocab-parallel op with extras (z-loss, softcap, temperature, statistics).

``safeloss.vocab_parallel_cross_entropy`` is defined here: with every extra at its default it is
:func:`safeloss.parallel.vocab.vocab_parallel_cross_entropy`, called as it is; otherwise
:func:`run`, which follows the same phases (local checks, one agreed ``head``, the two all-reduces
of the loss, findings read once) with the helpers of ``vocab``, and this module's own autograd
function for the loss of the capped, scaled slice.

Collectives: the same three all-reduces as without extras. The capped, scaled logits are local
(elementwise); the log-sum-exp, and so the z-loss, is global as before. The statistics ride on the
two all-reduces the loss makes anyway, only with ``return_stats=True``: the row's raw maximum
(MAX, R more values), and the entropy's sum and the argmax test (SUM, 2R more values). The argmax
test needs no index exchange: the labels are the same on every rank, so each rank counts, per row,
its classes that equal the global maximum at an index below the label (plus 1 where it owns the
label and the label's logit is below the maximum); the prediction is right iff the sum is 0 (ties
to the lowest index, as ``torch.argmax``). Every rank computes the same statistics from the same
reduced values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends.dispatch import check_backend
from ..core import _flags as F
from ..core import checks, reduction
from ..core import extras as X
from ..core.config import LazyStrict
from ..core.errors import BackendError, ParallelMismatchError, TargetShapeError, WeightError, fmt_shape
from ..core.report import Finding, report
from ..core.rows import Rows
from ..core.validation import (
    Problem,
    _check_devices,
    _check_weight,
    check_label_smoothing,
    check_reduction,
    normalize,
)
from . import dtensor, vocab

Result = Tensor | tuple[Tensor, X.LossStats]


def vocab_parallel_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    group: object | None = None,
    strict: bool | None = None,
    backend: str = "auto",
    softcap: float | None = None,
    temperature: float = 1.0,
    z_loss: float = 0.0,
    return_stats: bool = False,
) -> Result:
    if X.defaults(softcap, temperature, z_loss, return_stats):
        return vocab.vocab_parallel_cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing, group=group,
            strict=strict, backend=backend)
    fn = run
    if torch.compiler.is_compiling():
        from torch._dynamo import disable  # loaded while tracing anyway

        fn = disable(run, reason=vocab._EAGER_ONLY)
    return fn(input, target, weight, ignore_index, reduction, label_smoothing,
              (softcap, temperature, z_loss, return_stats), group=group, strict=strict,
              backend=backend, owner=None)


vocab_parallel_cross_entropy.__doc__ = (vocab.vocab_parallel_cross_entropy.__doc__ or "") + """
    LLM and RL extras (keyword-only; at their defaults the call is exactly the above):
        softcap: logits z become ``softcap * tanh(z / softcap)`` first (Gemma 2).
        temperature: then ``z / temperature``.
        z_loss: adds ``z_loss * lse^2`` per non-ignored position (lse global over the shards),
            reduced as the loss (``"mean"``: over the non-ignored positions, unweighted).
        return_stats: return ``(loss, safeloss.LossStats)``, the same on every rank. No extra
            collective: the statistics ride on the loss's two all-reduces (3R more values).
"""


def dtensor_applies(input: object, target: object, weight: object) -> bool:
    return dtensor.applies(input, target, weight)


def dtensor_run(
    input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction_: str,
    label_smoothing: float, ex: X.Extras, *, strict: bool | None, owner: object | None,
) -> Result:
    """DTensor logits sharded on the classes under ``loss_parallel()``, with extras: as
    ``dtensor.run``, the loss and each statistic a replicated DTensor."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = input.device_mesh  # type: ignore[attr-defined]
    tp = dtensor._tp_dim(input)
    local = input.to_local()  # type: ignore[attr-defined]
    if isinstance(target, DTensor):
        target = target.to_local()
    if isinstance(weight, DTensor):
        weight = weight.to_local() if dtensor._replicated(weight) else weight.full_tensor()
    res = run(local, target, weight, ignore_index, reduction_, label_smoothing,
              (ex.softcap, ex.temperature, ex.z_loss, ex.return_stats), group=mesh.get_group(tp),
              strict=strict, backend="auto", owner=owner)

    def rep(t: Tensor | None) -> Tensor | None:
        return None if t is None else DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim,
                                                         run_check=False)

    if isinstance(res, tuple):
        out, st = res
        return rep(out), X.LossStats(rep(st.lse), rep(st.entropy), rep(st.z_loss),  # type: ignore[arg-type]
                                     rep(st.accuracy))
    return rep(res)  # type: ignore[return-value]


# head layout after the ``world`` slice widths (as vocab's, plus the extras' fingerprint)
_ERROR, _STRICT, _TMAX, _TMIN = range(4)
_AGREE = ("positions", "config", "weight", "targets", "findings", "extras")
_HEAD = 4 + 2 * len(_AGREE)


def run(
    input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction_: object,
    label_smoothing: object, raw: tuple[object, object, object, object], *, group: object | None,
    strict: bool | None, backend: object, owner: object | None,
) -> Result:
    if not (dist.is_available() and dist.is_initialized()):
        raise BackendError(
            "vocab_parallel_cross_entropy needs an initialized torch.distributed process group "
            "(each rank holds a slice of the classes).\n"
            "Fix: torch.distributed.init_process_group(...) first (torchrun sets it up), or call "
            "safeloss.cross_entropy on the full logits"
        )
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device = vocab._comm_device(input, group)

    # Phase A, local: nothing is raised before the head, or a rank that failed alone would
    # leave the others waiting in the all-reduce.
    local_error: BaseException | None = None
    p: Problem | None = None
    ex = X.Extras()
    findings: list[Finding] = []
    strict_local = False
    try:
        strict_local = bool(LazyStrict(strict))
        ex = X.check(*raw, op="vocab_parallel_cross_entropy")
        red = check_reduction(reduction_)
        eps = check_label_smoothing(label_smoothing)
        check_backend(backend)
        p = normalize(input, target, None, ignore_index, red, eps)
        if p.prob:
            raise TargetShapeError(
                f"vocab_parallel_cross_entropy got a target of the input slice's shape "
                f"{fmt_shape(p.input.shape)}, i.e. class probabilities; only class indices are "
                "supported on the vocab-parallel path.\n"
                "Fix: pass class indices (target.argmax(dim=1) for one-hot rows), or gather the "
                "logits and call safeloss.cross_entropy"
            )
        if weight is not None and not isinstance(weight, Tensor):
            _check_weight(weight, p.input, 0, False)  # raises its ArgumentTypeError
        _check_devices(p.input, p.target, weight)
        if isinstance(weight, Tensor) and weight.requires_grad and torch.is_grad_enabled():
            raise WeightError(
                "weight requires grad, but cross_entropy with class-index targets is not "
                "differentiable with respect to the class weights (stock torch: \"nll_loss_forward "
                "is not differentiable wrt weight\").\nFix: pass weight.detach()"
            )
        findings = [f for f in p.findings if f.kind != "single-class"]  # a 1-class slice is fine
    except Exception as e:  # every local failure must reach the other ranks
        local_error = e
        p = None

    # (1) the head, as vocab's: who failed, widths, label range, fingerprints (extras included).
    head = torch.zeros(world + _HEAD, dtype=torch.int64, device=device)
    agree: dict[str, int] = dict.fromkeys(_AGREE, 0)
    base = world + _HEAD - 2 * len(_AGREE)
    if p is not None:
        x, t = p.input, p.target.long()
        head[rank] = x.shape[0 if x.dim() == 1 else 1]
        keep = t != p.ignore_index
        if t.numel():
            head[world + _TMAX] = torch.where(keep, t, vocab._NONE).max()
            head[world + _TMIN] = torch.where(keep, -t.clamp(min=-(2**63 - 1)), vocab._NONE).max()
        else:
            head[world + _TMAX] = head[world + _TMIN] = vocab._NONE
        agree["positions"] = vocab._hash(vocab._positions_shape(x))
        agree["config"] = vocab._hash(str(x.dtype), p.reduction, p.ignore_index, p.label_smoothing,
                                      str(p.out_dtype), None if weight is None else str(weight.dtype))
        agree["weight"] = -1 if weight is None else int(weight.numel())
        agree["findings"] = vocab._hash(sorted(f.kind for f in findings))
        agree["extras"] = vocab._hash(ex.softcap, ex.temperature, ex.z_loss, ex.return_stats)
    head[world + _ERROR] = int(local_error is not None)
    head[world + _STRICT] = int(strict_local)
    for i, name in enumerate(_AGREE):
        head[base + 2 * i], head[base + 2 * i + 1] = agree[name], -agree[name]
    if p is not None:
        it = base + 2 * _AGREE.index("targets")
        fp = vocab._target_fingerprint(p.target)
        head[it], head[it + 1] = fp, -fp
        if isinstance(weight, Tensor) and weight.numel():
            bits = weight.detach().reshape(-1).to(torch.float64).view(torch.int64)
            fw = vocab._target_fingerprint(bits) + agree["weight"]
            iw = base + 2 * _AGREE.index("weight")
            head[iw], head[iw + 1] = fw, -fw
    h = vocab._all_reduce(head, "max", group).tolist()

    # Phase B: every decision from here on is taken on the agreed numbers.
    if h[world + _ERROR]:
        vocab._raise_agreed(local_error, group, world)
    assert p is not None  # no rank failed, this one included
    strict_ = bool(h[world + _STRICT])
    fields = {n: (h[base + 2 * i], -h[base + 2 * i + 1]) for i, n in enumerate(_AGREE)}
    sizes = h[:world]
    C = sum(sizes)
    for what in ("positions", "config", "weight", "findings"):
        if fields[what][0] != fields[what][1]:
            raise ParallelMismatchError(vocab._mismatch_message(what, world))
    if fields["extras"][0] != fields["extras"][1]:
        raise ParallelMismatchError(
            "vocab_parallel_cross_entropy: the ranks pass different extras (softcap, temperature, "
            "z_loss or return_stats).\n"
            f"Every rank of the vocab-parallel group ({world} ranks) must transform its slice of the "
            "logits the same way, or the shards would belong to different losses.\n"
            "Fix: pass the same softcap, temperature, z_loss and return_stats on every rank (from "
            "the model config, not a per-rank value)"
        )
    tmax, tmin = h[world + _TMAX], -h[world + _TMIN]
    bad_labels = (tmax != vocab._NONE and tmax >= C) or (h[world + _TMIN] != vocab._NONE and tmin < 0)
    targets_differ = fields["targets"][0] != fields["targets"][1]
    if bad_labels:
        vocab._raise_bad_labels(p, C, group, world, targets_differ)
    if targets_differ:
        raise ParallelMismatchError(vocab._mismatch_message("targets", world))

    x, t = p.input, p.target.long()
    global_shape = list(x.shape)
    global_shape[0 if x.dim() == 1 else 1] = C
    meta = torch.empty(global_shape, dtype=x.dtype, device="meta")
    w_full, more = _check_weight(weight, meta, C, True, p.out_dtype)
    findings += more
    gp = Problem(input=meta, target=p.target, prob=False, weight=w_full, ignore_index=p.ignore_index,
                 label_smoothing=p.label_smoothing, reduction=p.reduction, num_classes=C,
                 out_dtype=p.out_dtype)
    if C == 1:
        findings.append(vocab.checks_single_class(meta))
    if p.reduction == "mean" and math.prod(gp.positions_shape) == 0:
        findings.append(checks.empty_mean_finding(gp))
    for f in findings:
        report(f, strict_, owner)

    # Phase C: the loss and the statistics.
    offset, C_local = sum(sizes[:rank]), sizes[rank]
    acc = X.work_dtype(x.dtype)
    tf = t.reshape(-1)
    valid = tf != p.ignore_index
    li = tf - offset
    owned = valid & (li >= 0) & (li < C_local)
    w_y = w_local = None
    w_sum: float | Tensor = float(C)
    if w_full is not None:
        wa = w_full.to(acc)
        w_y = torch.where(valid, wa.gather(0, tf.clamp(0, max(C - 1, 0))), 0.0)
        w_local = wa[offset : offset + C_local]
        w_sum = wa.sum()
    R = tf.numel()
    sample = vocab._sample_positions(x, R) if C >= 2 and R else None
    plan = _Plan(group, valid, owned, li.clamp(0, max(C_local - 1, 0)), tf, offset, w_y, w_local,
                 w_sum, p.label_smoothing, C, acc, sample, ex)
    ce, zl, lse, ent, correct = _ShardCE.apply(x, plan)
    pos = vocab._positions_shape(x)
    ce, zl = ce.reshape(pos), zl.reshape(pos)
    zl_rows = zl if ex.z_loss else None
    ce_red = reduction.reduce(Rows(ce, checks.CLEAN), replace(gp, out_dtype=acc))
    zl_red = X.reduce_z_loss(zl_rows, valid.reshape(pos), p.reduction, pos, acc, x.device)
    out = (ce_red if zl_rows is None else ce_red + zl_red).to(p.out_dtype)
    rows = ce if zl_rows is None else ce + zl_rows

    # Phase D: findings of the values, the same on every rank, read in one go.
    counts = torch.zeros(F.SIZE + 1, dtype=torch.int64, device=x.device)
    if sample is not None:
        counts[F.SOFTMAX_LIKE], counts[F.SOFTMAX_CHECKED] = plan.softmax_like, sample.numel()
    counts[F.NONFINITE_ROW] = (~torch.isfinite(rows.detach()).reshape(-1) & valid).sum()
    counts[F.SIZE] = torch.isfinite(out.detach()).all()
    host = counts.tolist()
    checks.resolve(checks.Scan(host[: F.SIZE], out_finite=bool(host[F.SIZE])), gp, rows, out, None,
                   strict_, owner, have_logits=False, device_type=x.device.type, note=ex.note())
    if not ex.return_stats:
        return out
    return out, X.LossStats(lse.reshape(pos).float(), ent.reshape(pos).float(), zl_red.detach().float(),
                            X.accuracy(correct, valid))


@dataclass
class _Plan:
    """What the autograd function needs besides the slice (all non-differentiable)."""

    group: object | None
    valid: Tensor  # (R,) label not ignored
    owned: Tensor  # (R,) label valid and inside this rank's slice
    local_idx: Tensor  # (R,) label - offset, clamped into the slice
    target: Tensor  # (R,) global labels (int64)
    offset: int  # global index of the slice's first class
    w_y: Tensor | None
    w_local: Tensor | None
    w_sum: float | Tensor
    eps: float
    num_classes: int
    acc: torch.dtype
    sample: Tensor | None  # flat positions sampled for the softmaxed-input check (raw logits)
    ex: X.Extras
    softmax_like: Tensor | None = None  # filled by forward


class _ShardCE(torch.autograd.Function):
    """(slice) -> per-position cross-entropy, z-loss term, and the statistics (lse, entropy,
    right prediction), each computed from the two all-reduces."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: _Plan) -> tuple[Tensor, ...]:  # type: ignore[override]
        group, acc, ex = plan.group, plan.acc, plan.ex
        stats = ex.return_stats
        xr = vocab._rows(x.detach())
        R, C_local = xr.shape
        dev = x.device
        z = xr.to(acc)
        zt = X.transform(z, ex)
        neg_inf = torch.full((R,), -math.inf, dtype=acc, device=dev)
        L = torch.logsumexp(zt, 1) if C_local else neg_inf

        # (2) MAX: slice log-sum-exps; raw min/max of the sampled rows; the raw row maximum (stats).
        parts = [L]
        k = 0
        if plan.sample is not None:
            rows = xr[plan.sample]
            k = rows.shape[0]
            if C_local:
                lo, hi = torch.aminmax(rows.to(acc), dim=1)
                ssum = rows.sum(1, dtype=acc)
            else:
                lo = torch.full((k,), math.inf, dtype=acc, device=dev)
                hi, ssum = -lo, torch.zeros(k, dtype=acc, device=dev)
            parts += [-lo, hi]
        if stats:
            parts.append(z.amax(1) if C_local else neg_inf)
        red = vocab._all_reduce(torch.cat(parts), "max", group)
        M = red[:R]
        M_ref = torch.where(torch.isneginf(M), 0.0, M)  # +inf or NaN: NaN in the row, as stock

        # (3) SUM: rescaled sums of exponentials, the label's logit, the smoothing sum, the sampled
        # rows' sums; with stats the entropy's sum and the argmax test.
        zc = zt - M_ref.unsqueeze(1)
        if C_local:
            term = torch.where(plan.owned, zc.gather(1, plan.local_idx.unsqueeze(1)).squeeze(1), 0.0)
        else:
            term = torch.zeros(R, dtype=acc, device=dev)
        parts = [torch.exp(L - M_ref), term]
        if plan.eps > 0:
            parts.append((zc if plan.w_local is None else zc * plan.w_local).sum(1))
        if plan.sample is not None:
            parts.append(ssum)
        if stats:
            e = torch.exp(zc)
            parts.append((e * torch.where(e > 0, zc, 0.0)).sum(1))
            gmax = red[R + 2 * k : 2 * R + 2 * k].unsqueeze(1)
            cls = torch.arange(C_local, device=dev) + plan.offset
            lower = ((z == gmax) & (cls.unsqueeze(0) < plan.target.unsqueeze(1))).sum(1)
            if C_local:
                hit = z.gather(1, plan.local_idx.unsqueeze(1)) == gmax
                lower = lower + (plan.owned & ~hit.squeeze(1))
            parts.append(lower.to(acc))
        red2 = vocab._all_reduce(torch.cat(parts), "sum", group)

        S = red2[:R]
        log_s = torch.log(S)
        lse = M_ref + log_s
        nll = log_s - red2[R : 2 * R]
        if plan.w_y is not None:
            nll = nll * plan.w_y
        i = 2 * R
        loss = nll
        if plan.eps > 0:
            smooth = plan.w_sum * log_s - red2[i : i + R]
            loss = (1 - plan.eps) * nll + (plan.eps / plan.num_classes) * smooth
            i += R
        ce = torch.where(plan.valid, loss, 0.0)
        zl = X.z_loss_rows(lse, plan.valid, ex.z_loss) if ex.z_loss else torch.zeros_like(ce)
        if plan.sample is not None:
            gsum = red2[i : i + k]
            i += k
            glo, ghi = -red[R : R + k], red[R + k : R + 2 * k]
            tol = F.SOFTMAX_SUM_TOL[str(x.dtype).removeprefix("torch.")]
            plan.softmax_like = ((glo >= 0) & (ghi <= 1) & ((gsum - 1).abs() <= tol)).sum()
        if stats:
            ent = log_s - red2[i : i + R] / S
            correct = plan.valid & (red2[i + R : i + 2 * R] == 0)
        else:
            ent = lse.new_empty(0)
            correct = plan.valid.new_empty(0)
        ctx.plan = plan
        ctx.save_for_backward(x, lse)
        lse_out = lse.detach().clone()
        ctx.mark_non_differentiable(lse_out, ent, correct)
        return ce, zl, lse_out, ent, correct

    @staticmethod
    def backward(ctx, g_ce: Tensor, g_zl: Tensor, *_: object) -> tuple[Tensor | None, None]:  # type: ignore[override]
        if torch.is_grad_enabled():
            raise BackendError(
                "vocab_parallel_cross_entropy has no double backward: its gradient was asked for "
                "with create_graph=True (torch.autograd.grad(..., create_graph=True) or "
                "backward(create_graph=True), e.g. for a gradient penalty).\n"
                "Fix: gather the logits and call safeloss.cross_entropy for the second-order term, "
                "or drop create_graph=True"
            )
        x, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        acc, ex = plan.acc, plan.ex
        xr = vocab._rows(x)
        zt = X.transform(xr.to(acc), ex)
        p = torch.sub(zt, lse.unsqueeze(1)).exp_()
        dzt = X.index_grad(p, plan.local_idx, plan.owned, plan.valid, plan.w_y, plan.w_local,
                           plan.w_sum, plan.eps, plan.num_classes, g_ce.reshape(-1).to(acc),
                           g_zl.reshape(-1).to(acc), lse, ex.z_loss)
        return vocab._unrows(X.chain(dzt, zt, ex).to(x.dtype), x), None

"""Cross-entropy over logits sharded on the class dimension (tensor parallelism), with every check.

Each rank of ``group`` holds a contiguous slice of the classes, ordered by rank (uneven slices and
empty slices allowed); rows (positions) are not sharded, so targets and positions are the same on
every rank. Per call the ranks exchange, with all-reduces only (never the logits):

1. ``head`` (int64, MAX, ``world + 14`` values): every rank's slice width, whether validation
   failed locally, strict mode, the range of the labels, and fingerprints of everything that must
   agree across ranks (positions shape, dtype, arguments, the targets themselves). Read on the host:
   from here on every decision is taken on the same numbers on every rank, so all ranks raise the
   same error, or none does (no rank continues alone into a collective the others left).
2. row statistics (MAX, ``R + 2k`` floats): each rank's log-sum-exp over its slice, plus min/max of
   ``k <= 64`` sampled rows for the softmaxed-input check.
3. row sums (SUM, ``2R`` floats, ``3R`` with label smoothing, plus ``k``): the rescaled sums of
   exponentials, the target logit (from the rank that owns it), the smoothing term, and the
   sampled rows' sums.

``R`` is the number of positions. The loss of every position is then computed identically on every
rank; the gradient of the local slice needs no communication (the saved log-sum-exp is global).

Math, per row (``L_r`` = log-sum-exp of rank r's slice, ``M`` = max_r L_r, ``w`` = class weights
or 1, ``W_r`` = sum of rank r's weights, ``eps`` = label smoothing):
  lse = M + log sum_r exp(L_r - M)
  loss = (1 - eps) w_y (lse - x_y) + (eps / C) sum_c w_c (lse - x_c)
  sum_c w_c (lse - x_c) = W (lse - M) - sum_r [W_r (L_r - M) - Q_r],   Q_r = sum_{c in r} w_c (L_r - x_c)
so nothing of the size of |lse| * W cancels.
"""

from __future__ import annotations

import builtins
import math
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends.dispatch import check_backend, triton_unavailable_reason
from ..core import _flags as F
from ..core import checks, errors
from ..core import reduction as _reduction
from ..core.config import LazyStrict
from ..core.errors import (
    BackendError,
    ParallelMismatchError,
    SafeLossError,
    TargetOutOfRangeError,
    TargetShapeError,
    WeightError,
    fmt_shape,
)
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

K_SAMPLE = 64  # rows sampled for the softmaxed-input check (as checks.sample_rows)
_NONE = -(1 << 62)  # "no value" in a MAX all-reduce (no non-ignored label on this rank)

# head layout after the ``world`` slice widths: single flags, then (name, +v, -v) pairs whose MAX
# gives max and -min; a pair whose max and min differ names what the ranks disagree on.
_ERROR, _STRICT, _TMAX, _TMIN = range(4)
_AGREE = ("positions", "config", "weight", "targets", "findings")
_HEAD = 4 + 2 * len(_AGREE)


def _hash(*parts: object) -> int:
    """A stable 62-bit fingerprint (Python's hash() is salted per process)."""
    return zlib.crc32(repr(parts).encode()) | (zlib.adler32(repr(parts).encode()) << 31)


def _target_fingerprint(t: Tensor) -> Tensor:
    """An int64 checksum of the labels, equal on every rank iff the labels are (almost surely)."""
    flat = t.reshape(-1).long()
    if flat.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=t.device)
    pos = torch.arange(flat.numel(), device=t.device, dtype=torch.int64)
    return ((flat + 7) * (pos * 1000003 + 1)).sum()  # wraps around on overflow: still a checksum


def _all_reduce(t: Tensor, op: str, group: object | None) -> Tensor:
    """The functional all-reduce stock loss_parallel uses too (so CommDebugMode and tracing tools
    count the same ops for both); the input is left unmodified."""
    import torch.distributed._functional_collectives as funcol  # lazily: builds without distributed

    g = dist.group.WORLD if group is None else group
    return funcol.wait_tensor(funcol.all_reduce(t, op, g))  # type: ignore[arg-type]


def _backend_of(group: object | None) -> str:
    try:
        return str(dist.get_backend(group)).lower()
    except Exception:
        return "gloo"


def _comm_device(input: object, group: object | None) -> torch.device:
    if isinstance(input, Tensor) and input.device.type != "meta":
        return input.device
    if "nccl" in _backend_of(group) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class _Plan:
    """What the autograd function needs besides the logits (all non-differentiable)."""

    group: object | None
    valid: Tensor  # (R,) bool: label not ignored
    owned: Tensor  # (R,) bool: label valid and inside this rank's slice
    local_idx: Tensor  # (R,) int64: label - offset, clamped into the slice (0 on an empty slice)
    w_y: Tensor | None  # (R,) weight of the label (None: 1)
    w_local: Tensor | None  # (C_local,) this slice's weights (None: 1)
    w_sum: float | Tensor  # W, the sum of all weights (C without weight)
    w_local_sum: float | Tensor  # W_r
    eps: float
    num_classes: int
    acc: torch.dtype
    sample: Tensor | None  # (k,) flat positions sampled for the softmax check, or None
    backend: str  # "torch" or "triton"
    softmax_like: Tensor | None = None  # filled by forward: sampled rows that look softmaxed (0-d)
    bytes_sent: int = 0  # filled by forward: bytes this rank contributed to the all-reduces


def _rows(x: Tensor) -> Tensor:
    """(R, C_local): positions as rows, classes last (a view for the usual (N, C) layout).
    Sizes are explicit: -1 cannot be inferred for an empty slice (C_local == 0)."""
    if x.dim() == 1:
        return x.reshape(1, x.shape[0])
    if x.dim() == 2:
        return x
    return x.movedim(1, -1).reshape(math.prod(_positions_shape(x)), x.shape[1])


def _unrows(d: Tensor, x: Tensor) -> Tensor:
    if x.dim() <= 2:
        return d.reshape(x.shape)
    return d.reshape(x.shape[0], *x.shape[2:], x.shape[1]).movedim(-1, 1)


def _local_stats(xr: Tensor, plan: _Plan) -> tuple[Tensor, Tensor | None]:
    """(L_r, Q_r) per row over this slice: log-sum-exp, and the smoothing sum (or None)."""
    if plan.backend == "triton" and xr.shape[1] > 0:
        from . import triton_stats

        return triton_stats.shard_stats(xr, plan.w_local, plan.eps > 0)
    xf = xr if xr.dtype == plan.acc else xr.to(plan.acc)
    lse = torch.logsumexp(xf, dim=1)
    if plan.eps <= 0:
        return lse, None
    diff = lse[:, None] - xf
    q = (diff * plan.w_local[None, :]).sum(1) if plan.w_local is not None else diff.sum(1)
    return lse, q


class _VocabParallelCE(torch.autograd.Function):
    """Per-position losses of the gathered logits from this rank's slice (collectives inside)."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: _Plan) -> Tensor:  # type: ignore[override]
        group, acc = plan.group, plan.acc
        xr = _rows(x.detach())
        R, C_local = xr.shape
        L, Q = _local_stats(xr, plan)
        L = L.to(acc)

        # (2) MAX: per-row max of the slices' log-sum-exps, sampled-row min/max.
        parts = [L]
        if plan.sample is not None:
            rows = xr[plan.sample]
            if C_local:
                lo, hi = torch.aminmax(rows.to(acc), dim=1)
                ssum = rows.sum(1, dtype=acc)
            else:
                k = plan.sample.numel()
                lo = torch.full((k,), math.inf, dtype=acc, device=x.device)
                hi, ssum = -lo, torch.zeros(k, dtype=acc, device=x.device)
            parts += [-lo, hi]
        red = _all_reduce(torch.cat(parts), "max", group)
        plan.bytes_sent = red.numel() * red.element_size()
        M = red[:R]
        M_ref = torch.where(torch.isneginf(M), 0.0, M)  # +inf or NaN: NaN everywhere in the row, as stock

        # (3) SUM: rescaled sums of exponentials, target logit, smoothing term, sampled-row sums.
        sumexp = torch.exp(L - M_ref)
        if C_local:
            xy = xr.gather(1, plan.local_idx[:, None])[:, 0].to(acc)
            term = torch.where(plan.owned, xy - M_ref, 0.0)
        else:
            term = torch.zeros(R, dtype=acc, device=x.device)
        parts = [sumexp, term]
        if plan.eps > 0:
            assert Q is not None  # internal invariant: computed whenever eps > 0
            z = plan.w_local_sum * (L - M_ref) - Q.to(acc)
            # An all -inf slice: each class adds w_c * inf to the smoothing sum, as stock: +inf, NaN
            # for a zero weight (0 * inf), nothing for an empty slice.
            q_inf = (plan.w_local * math.inf).sum() if plan.w_local is not None else (math.inf if C_local else 0.0)
            z = torch.where(torch.isneginf(L), -torch.as_tensor(q_inf, dtype=acc, device=x.device), z)
            parts.append(z)
        if plan.sample is not None:
            parts.append(ssum)
        red2 = _all_reduce(torch.cat(parts), "sum", group)
        plan.bytes_sent += red2.numel() * red2.element_size()

        log_s = torch.log(red2[:R])
        lse = M_ref + log_s
        nll = log_s - red2[R : 2 * R]
        if plan.w_y is not None:
            nll = nll * plan.w_y
        loss = (1 - plan.eps) * nll if plan.eps > 0 else nll
        if plan.eps > 0:
            smooth = plan.w_sum * log_s - red2[2 * R : 3 * R]
            loss = loss + (plan.eps / plan.num_classes) * smooth
        loss = torch.where(plan.valid, loss, 0.0)

        if plan.sample is not None:
            k = plan.sample.numel()
            glo, ghi = -red[R : R + k], red[R + k : R + 2 * k]
            gsum = red2[-k:]
            tol = F.SOFTMAX_SUM_TOL[str(x.dtype).removeprefix("torch.")]
            like = (glo >= 0) & (ghi <= 1) & ((gsum - 1).abs() <= tol)
            plan.softmax_like = like.sum()  # read on the host with the other counts

        ctx.plan = plan
        ctx.save_for_backward(x, lse)
        return loss.reshape(_positions_shape(x))

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        # Grad mode is on in backward only for create_graph=True: a second derivative through the
        # detached global lse would be silently missing (once_differentiable only refuses it when
        # the upstream gradient itself requires grad), so refuse it outright.
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
        xr = _rows(x)
        gv = torch.where(plan.valid, g.reshape(-1).to(plan.acc), 0.0)
        hot = (1 - plan.eps) * (plan.w_y if plan.w_y is not None else 1.0)
        a = hot + (plan.eps / plan.num_classes) * plan.w_sum
        d = torch.exp(xr.to(plan.acc) - lse[:, None]) * (gv * a)[:, None]
        if plan.eps > 0:
            smooth = (gv * (plan.eps / plan.num_classes))[:, None]
            d -= smooth * plan.w_local[None, :] if plan.w_local is not None else smooth
        if xr.shape[1]:
            d.scatter_add_(1, plan.local_idx[:, None], -(gv * hot * plan.owned)[:, None])
        d = torch.where(plan.valid[:, None], d, 0.0)  # ignored rows: exactly 0, even for NaN g
        return _unrows(d.to(x.dtype), x), None


def _positions_shape(x: Tensor) -> tuple[int, ...]:
    s = tuple(x.shape)
    return s[1:] if len(s) == 1 else s[:1] + s[2:]


def _raise_agreed(local: BaseException | None, group: object | None, world: int) -> None:
    """Every rank raises the error of the lowest failing rank, with the same class and text."""
    msgs: list[object] = [None] * world
    # The builtin too: a TargetShapeError that is also a ValueError (errors.stock_class) stays one.
    builtin = None if local is None else getattr(type(local).__dict__.get("stock_builtin"), "__name__", None)
    mine = None if local is None else (type(local).__name__, str(local), builtin)
    dist.all_gather_object(msgs, mine, group=group)
    rank, (name, text, builtin) = next((r, m) for r, m in enumerate(msgs) if m is not None)
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SafeLossError)):
        cls = ParallelMismatchError
        text = f"{name}: {text}"
    elif builtin is not None:
        cls = errors.stock_class(cls, getattr(builtins, builtin))
    if world > 1:
        text += f"\n(raised on rank {rank} of the {world} ranks of the vocab-parallel group; every rank raises it)"
    raise cls(text) from (local if local is not None else None)


def _fields(head: list[int], world: int) -> dict[str, tuple[int, int]]:
    base = world + _HEAD - 2 * len(_AGREE)
    return {n: (head[base + 2 * i], -head[base + 2 * i + 1]) for i, n in enumerate(_AGREE)}


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
) -> Tensor:
    """Cross-entropy of logits sharded over the classes, from this rank's slice, with every check.

    Args:
        input: this rank's contiguous slice of the classes, ``(N, C_local)``,
            ``(N, C_local, d1..dK)`` or ``(C_local,)``; slices are ordered by rank in ``group`` and
            may be uneven (or empty).
        target: class indices into the *global* classes, the same on every rank.
        weight: the full ``(C,)`` class weights (not a slice), the same on every rank.
        group: the tensor-parallel process group (``None``: the default group).

    Returns, on every rank, the loss of the gathered logits (same value, dtype and shape as
    ``torch.nn.functional.cross_entropy`` on them); the gradient is this rank's slice of the full
    gradient. A bad label on any rank, or ranks that disagree on shapes, arguments or labels, raise
    the same :class:`safeloss.SafeLossError` on every rank. Communication: three all-reduces of
    O(N) values (the logits never move); two small reads on the host (the first result, and the
    check counts after the loss).
    """
    fn = run
    if torch.compiler.is_compiling():
        # Eager only: the host reads and collectives break the graph anyway, and inductor's graph
        # of this function returned wrong losses (torch 2.13). Dynamo is loaded when tracing, so
        # importing it here costs nothing (a decorator would import it with safeloss).
        from torch._dynamo import disable

        fn = disable(run, reason=_EAGER_ONLY)
    return fn(input, target, weight, ignore_index, reduction, label_smoothing, group=group,
              strict=strict, backend=backend, owner=None)


_EAGER_ONLY = ("safeloss.vocab_parallel_cross_entropy runs eagerly (collectives, host-read agreement "
               "of the ranks); call it outside the fullgraph=True region")


def run(
    input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str,
    label_smoothing: float, *, group: object | None, strict: bool | None, backend: str,
    owner: object | None, stats: dict | None = None,
) -> Tensor:
    if not (dist.is_available() and dist.is_initialized()):
        raise BackendError(
            "vocab_parallel_cross_entropy needs an initialized torch.distributed process group "
            "(each rank holds a slice of the classes).\n"
            "Fix: torch.distributed.init_process_group(...) first (torchrun sets it up), or call "
            "safeloss.cross_entropy on the full logits"
        )
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device = _comm_device(input, group)

    # Phase A, local: every check that needs no other rank. Nothing is raised yet: a rank that
    # failed alone would leave the others waiting in the first all-reduce.
    local_error: BaseException | None = None
    p: Problem | None = None
    findings: list[Finding] = []
    strict_local = False
    name = "torch"
    try:
        strict_local = bool(LazyStrict(strict))
        reduction_ = check_reduction(reduction)
        eps = check_label_smoothing(label_smoothing)
        backend_ = check_backend(backend)
        p = normalize(input, target, None, ignore_index, reduction_, eps)
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
        # As safeloss.dispatch: Triton for CUDA tensors when it can run (float64 stays on torch);
        # backend="triton" where it cannot is an error (the interpreter counts, for CPU tests).
        if backend_ == "triton" or (backend_ == "auto" and p.input.device.type == "cuda"):
            reason = triton_unavailable_reason(p.input.device)
            if reason is None and p.input.dtype != torch.float64:
                name = "triton"
            elif backend_ == "triton":
                raise BackendError(
                    f'backend="triton" cannot run the vocab-parallel statistics here: '
                    f'{reason or "float64 logits run on torch"}.\nFix: backend="auto"'
                )
    except Exception as e:  # every local failure must reach the other ranks
        local_error = e
        p = None

    # (1) the head: who failed, slice widths, label range, fingerprints of what must agree.
    head = torch.zeros(world + _HEAD, dtype=torch.int64, device=device)
    agree: dict[str, int] = dict.fromkeys(_AGREE, 0)
    if p is not None:
        x, t = p.input, p.target.long()  # int32 / uint8 labels: the sentinels need int64
        width = x.shape[0 if x.dim() == 1 else 1]
        head[rank] = width
        keep = t != p.ignore_index
        if t.numel():
            head[world + _TMAX] = torch.where(keep, t, _NONE).max()
            head[world + _TMIN] = torch.where(keep, -t.clamp(min=-(2**63 - 1)), _NONE).max()  # -(-2**63) wraps
        else:
            head[world + _TMAX] = head[world + _TMIN] = _NONE
        agree["positions"] = _hash(_positions_shape(x))
        agree["config"] = _hash(str(x.dtype), p.reduction, p.ignore_index, p.label_smoothing,
                                str(p.out_dtype), None if weight is None else str(weight.dtype))
        agree["weight"] = -1 if weight is None else int(weight.numel())
        agree["findings"] = _hash(sorted(f.kind for f in findings))
    head[world + _ERROR] = int(local_error is not None)
    head[world + _STRICT] = int(strict_local)
    base = world + _HEAD - 2 * len(_AGREE)
    for i, key in enumerate(_AGREE):
        head[base + 2 * i], head[base + 2 * i + 1] = agree[key], -agree[key]
    if p is not None:
        fp = _target_fingerprint(p.target)
        head[base + 2 * _AGREE.index("targets")], head[base + 2 * _AGREE.index("targets") + 1] = fp, -fp
        if isinstance(weight, Tensor) and weight.numel():
            # The values too (their bits), else ranks with different weights return different losses.
            bits = weight.detach().reshape(-1).to(torch.float64).view(torch.int64)
            fw = _target_fingerprint(bits) + agree["weight"]
            head[base + 2 * _AGREE.index("weight")], head[base + 2 * _AGREE.index("weight") + 1] = fw, -fw
    head = _all_reduce(head, "max", group)
    h = head.tolist()
    head_bytes = head.numel() * head.element_size()

    # Phase B: every decision from here on is taken on the agreed numbers.
    if h[world + _ERROR]:
        _raise_agreed(local_error, group, world)
    assert p is not None  # no rank failed, this one included
    strict_ = bool(h[world + _STRICT])  # strict anywhere: strict everywhere
    fields = _fields(h, world)
    sizes = h[:world]
    C = sum(sizes)
    for what in ("positions", "config", "weight", "findings"):
        hi, lo = fields[what]
        if hi != lo:
            raise ParallelMismatchError(_mismatch_message(what, world))
    tmax, tmin = h[world + _TMAX], -h[world + _TMIN]
    bad_labels = (tmax != _NONE and tmax >= C) or (h[world + _TMIN] != _NONE and tmin < 0)
    targets_differ = fields["targets"][0] != fields["targets"][1]
    if bad_labels:
        _raise_bad_labels(p, C, group, world, targets_differ)
    if targets_differ:
        raise ParallelMismatchError(_mismatch_message("targets", world))

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
        findings.append(checks_single_class(meta))
    if p.reduction == "mean" and math.prod(gp.positions_shape) == 0:
        findings.append(checks.empty_mean_finding(gp))
    for f in findings:
        report(f, strict_, owner)

    # Phase C: the loss.
    offset = sum(sizes[:rank])
    C_local = sizes[rank]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    tf = t.reshape(-1)
    valid = tf != p.ignore_index
    li = tf - offset
    owned = valid & (li >= 0) & (li < C_local)
    local_idx = li.clamp(0, max(C_local - 1, 0))
    w_y = w_local = None
    w_sum: float | Tensor = float(C)
    w_local_sum: float | Tensor = float(C_local)
    if w_full is not None:
        wa = w_full.to(acc)
        w_y = torch.where(valid, wa.gather(0, tf.clamp(0, C - 1)), 0.0)
        w_local = wa[offset : offset + C_local]
        w_sum, w_local_sum = wa.sum(), w_local.sum()  # 0-d tensors: no host read
    R = tf.numel()
    sample = None
    if C >= 2 and R:
        sample = _sample_positions(x, R)
    plan = _Plan(group, valid, owned, local_idx, w_y, w_local, w_sum, w_local_sum,
                 p.label_smoothing, C, acc, sample, name)
    losses = _VocabParallelCE.apply(x, plan)
    if stats is not None:
        stats["bytes"] = head_bytes + plan.bytes_sent

    # Phase D: findings of the values, the same on every rank. The counts and whether the output
    # is finite are read on the host in one go (with the head: two reads per call).
    out = _reduction.reduce(Rows(losses, checks.Scan([0] * F.SIZE)), gp)  # reduce reads no counts
    counts = torch.zeros(F.SIZE + 1, dtype=torch.int64, device=x.device)
    if sample is not None:
        counts[F.SOFTMAX_LIKE], counts[F.SOFTMAX_CHECKED] = plan.softmax_like, sample.numel()
    counts[F.NONFINITE_ROW] = (~torch.isfinite(losses.detach()).reshape(-1) & valid).sum()
    counts[F.SIZE] = torch.isfinite(out.detach()).all()
    host = counts.tolist()
    checks.resolve(checks.Scan(host[:F.SIZE], out_finite=bool(host[F.SIZE])), gp, losses, out, None,
                   strict_, owner, have_logits=False, device_type=x.device.type)
    return out


def _sample_positions(x: Tensor, R: int) -> Tensor:
    """Evenly spaced flat row ids, first and last included (the same on every rank). Integer
    arithmetic: a float32 linspace rounds R - 1 up past the last row from R = 2**24 + 4 on."""
    if R <= K_SAMPLE:
        return torch.arange(R, device=x.device)
    return torch.arange(K_SAMPLE, device=x.device, dtype=torch.int64) * (R - 1) // (K_SAMPLE - 1)


def checks_single_class(meta: Tensor) -> Finding:
    from ..core.errors import InputError

    return Finding(
        "single-class", InputError,
        f"cross_entropy got logits with a single class (input shape {fmt_shape(meta.shape)}, "
        "gathered over the vocab-parallel group): softmax over one class is always 1, so the loss "
        "is always 0 and nothing is learned.\n"
        "Fix: torch.nn.BCEWithLogitsLoss with target.float(), or give the model 2 outputs",
    )


def _mismatch_message(what: str, world: int) -> str:
    detail = {
        "positions": "the shapes of the positions (every dim of the logits but the classes) differ "
                     "between ranks",
        "config": "the ranks disagree on the logits' dtype, reduction, ignore_index, "
                  "label_smoothing or whether a weight is given",
        "weight": "the ranks pass different class weights (lengths or values; the weight is the full "
                  "(C,) tensor, the same on every rank)",
        "findings": "the ranks' targets differ in shape or dtype",
        "targets": "the labels differ between ranks (each rank must pass the same class indices; "
                   "they index the global classes)",
    }[what]
    return (
        f"vocab_parallel_cross_entropy: {detail}.\n"
        f"Every rank of the vocab-parallel group ({world} ranks) must see the same rows, labels and "
        "arguments; only the classes are sharded. Different values usually mean the data loader is "
        "sharded over the tensor-parallel ranks as if they were data-parallel.\n"
        "Fix: give every rank of a tensor-parallel group the same batch (broadcast it, or seed the "
        "sampler by data-parallel rank only)"
    )


def _raise_bad_labels(p: Problem, C: int, group: object | None, world: int, differ: bool) -> None:
    """Out-of-range labels somewhere: every rank raises the message of the lowest rank that has them."""
    t = p.target
    n_bad = checks.count_bad_targets(t, C, p.ignore_index)
    mine = None
    if n_bad:
        mine = checks.out_of_range_message(t, C, p.ignore_index, p.input.device.type)
    msgs: list[object] = [None] * world
    dist.all_gather_object(msgs, mine, group=group)
    rank, text = next((r, m) for r, m in enumerate(msgs) if m is not None)
    assert isinstance(text, str)
    if differ:
        text += (
            f"\n(found in the labels of rank {rank} of {world}; the ranks' labels also differ, "
            "but every rank of a vocab-parallel group must pass the same labels)"
        )
    raise TargetOutOfRangeError(text)

"""Cross-entropy over logits sharded on the class dimension (tensor parallelism), with every check.

Each rank of ``group`` holds a contiguous slice of the classes, ordered by rank (uneven slices and
empty slices allowed); rows (positions) are not sharded, so targets and positions are the same on
every rank. Per call the ranks exchange, with all-reduces only (never the logits):

1. ``head`` (int64, MAX, ``world + 16`` values): every rank's slice width, whether a local check
   failed, strict mode, the range of the labels, a random salt (the largest of the ranks' draws:
   the same on every rank, and fresh every call), fingerprints of the metadata that must agree
   (positions shape, the target's shape and dtype, dtype and arguments), and how many logits of
   ``k <= 64`` sampled rows lie outside [0, 1] (the softmaxed-input check's first half). Read on
   the host: every decision between here and the read after the loss is taken on these numbers,
   the same on every rank, so all ranks raise the same error, or none does (no rank continues
   alone into a collective the others left).
2. row statistics (MAX, ``R + 16`` floats): each rank's log-sum-exp over its slice, and the
   salted hashes of the labels and the class weight (see :func:`_salted_hash`), +h and -h (a
   rank whose label values failed a check sends -1, a value no hash takes).
3. row sums (SUM, ``2R`` floats, ``3R`` with label smoothing, plus ``k`` where no rank's sample
   has a logit outside [0, 1]): the rescaled sums of exponentials, the target logit (from the
   rank that owns it), the smoothing term, and the sampled rows' sums (a row looks softmaxed iff
   it sums to 1; with a logit outside [0, 1] anywhere in the sample, none can).

With ``return_stats=True`` (2) also carries each slice's argmax key and a NaN flag (``2R``) and
(3) each slice's entropy term and the argmax test (``2R``): no collective is added. Both come
from per-row values of the slice (``_local_stats``: the Triton kernel's one pass, or torch):
  sum_c exp(zt_c - M)(zt_c - M) = sum_r exp(L_r - M) (A_r + L_r - M),  A_r = sum_{c in r} softmax_r(zt)_c (zt_c - L_r)
and the global argmax (``torch.argmax`` of the raw logits: a NaN wins, then the lowest column)
is right iff no rank holds the winning key below the label and the label's owner holds it there.

``R`` is the number of positions. The loss of every position is then computed identically on every
rank; the gradient of the local slice needs no communication (the saved log-sum-exp is global).
After the loss one small vector is read on the host: the agreed hashes (whether the ranks' labels
or weights differ, or a rank's label values failed a check: those raise there, on every rank
alike), whether the result is finite (the per-position counts of the value checks are taken only
where it is not) and the sampled rows that look softmaxed.

Per call signature (shapes, dtypes, devices, options, group, grad mode, autocast) the direct API
keeps a plan (``core.plan``'s store): what the argument checks settled, and, for the slice widths
of the ranks it was made with, what validation settled. A planned call skips that Python work
only: it reads every value a full call reads and makes the very same collectives, so a rank with
a plan and one without meet in the same all-reduces.

The same engine runs DTensor logits of any layout (``safeloss.parallel.dtensor``): the classes
split over one mesh dim (``Sharding.group``) or not split at all, and the other mesh dims sharding
the positions or replicating them (``Sharding.outer``); then the head, the counts and the reduction
also run over those mesh dims, so a bad label on any rank of the mesh stops every rank.

Math, per row (``L_r`` = log-sum-exp of rank r's slice, ``M`` = max_r L_r, ``w`` = class weights
or 1, ``W_r`` = sum of rank r's weights, ``eps`` = label smoothing):
  lse = M + log sum_r exp(L_r - M)
  loss = (1 - eps) w_y (lse - x_y) + (eps / C) sum_c w_c (lse - x_c)
  sum_c w_c (lse - x_c) = W (lse - M) - sum_r [W_r (L_r - M) - Q_r],   Q_r = sum_{c in r} w_c (L_r - x_c)
so nothing of the size of |lse| * W cancels.
"""

from __future__ import annotations

import array
import builtins
import hashlib
import math
import random
import re
import secrets
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends import dispatch
from ..backends.dispatch import check_backend, triton_unavailable_reason
from ..core import _flags as F
from ..core import checks, errors
from ..core import extras as X
from ..core import plan as plans
from ..core import reduction as _reduction
from ..core._traceback import trim
from ..core.config import LazyStrict
from ..core.errors import (
    ArgumentTypeError,
    BackendError,
    InputDtypeError,
    ParallelMismatchError,
    SafeLossError,
    TargetOutOfRangeError,
    TargetShapeError,
    WeightError,
    fmt_shape,
)
from ..core.report import Finding, report
from ..core.tools import check_layouts
from ..core.validation import (
    Problem,
    _check_devices,
    _check_input,
    _check_weight,
    _negative_classes,
    check_label_smoothing,
    check_reduction,
    fits_int64,
    int_index,
    normalize,
    weight_grad_quote,
)

_OP = "vocab_parallel_cross_entropy"
_WORD = re.compile(r"(?<![\w.])cross_entropy\b")
# Alternatives that name a loss module: this function has none.
_MODULE_ONLY = re.compile(r"  or  CrossEntropyLoss\(ignore_index=[^)]*\)"
                          r"| \(for a loss module: loss_fn\.to\([^)]*\)\)"
                          r"|  \(or loss_fn\.to\(device\) for a module's weight\)")


def reword(message: str) -> str:
    """A shared cross-entropy message as this function's: its name where the caller called
    ``vocab_parallel_cross_entropy`` (not ``cross_entropy``), without module-only fixes.
    (DTensor logits reach the same engine through ``cross_entropy``: their messages stay.)"""
    return _WORD.sub(_OP, _MODULE_ONLY.sub("", message))


checks.WORDING[_OP] = reword

K_SAMPLE = 64  # rows sampled for the softmaxed-input check (as checks.sample_rows)
_NONE = -(1 << 62)  # "no value" in a MAX all-reduce (no non-ignored label on this rank)

# head layout after the ``world`` slice widths: single values, then (name, +v, -v) pairs whose MAX
# gives max and -min (a pair whose max and min differ names what the ranks disagree on), then the
# values computed on the device, last, so that one cat appends them to the part built on the
# host: the label range (the largest label and the largest ~label = -1 - the smallest label; ~
# never overflows, where -(-2**63) would) and whether a sampled logit lies outside [0, 1].
_ERROR, _STRICT, _SALT, _POS_DIFFER, _TGT_DIFFER = range(5)
_AGREE = ("config", "positions", "target", "extras")  # config, extras: every rank of the mesh;
# positions, target: the class group
_FP = 5  # the first fingerprint pair
_TMAX = _FP + 2 * len(_AGREE)
_TMIN = _TMAX + 1  # max of ~label
_SAMPLE_OUT = _TMIN + 1
_HEAD = _SAMPLE_OUT + 1

# The salted hashes (see _salted_hash): four values below _P per hashed tensor (labels, weight),
# exact in float32, sent in (2) as +h and -h (MAX of both: max and -min).
_P = 2**24 - 3  # the largest prime below 2**24
_NHASH = 4
_AGREE_FLOATS = 2 * 2 * _NHASH  # labels, weight; + and - each

# Counts read after the loss: safeloss's findings layout, then flags of this engine.
_X_BERROR, _X_LABELS, _X_WEIGHT, _X_OUT_BAD = range(F.SIZE, F.SIZE + 4)
_COUNTS = F.SIZE + 4
_ROW_COUNTS = (F.BAD_TARGET, F.NONFINITE_ROW, F.PROB_NEGATIVE, F.PROB_BAD_SUM, F.OVERFLOW)


@dataclass(frozen=True)
class Sharding:
    """How this rank's tensors sit in the global problem.

    ``group``: the classes are split over it (``split``), in the order of the ranks in the group
    (DTensor's collectives scatter and gather a mesh dim in that order too). ``outer``: the other groups the call spans, each with whether
    it shards the positions (else it replicates them). DTensor calls also give the global shapes
    (so every shape is judged globally before any communication) and ``gather``, which assembles a
    positions-shaped (or, for probability targets, logits-shaped) local tensor into the global one
    on every rank (a collective; only called where every rank calls it).
    """

    group: object | None
    split: bool = True
    outer: tuple[tuple[object, bool], ...] = ()
    num_classes: int | None = None
    input_shape: tuple[int, ...] | None = None
    target_shape: tuple[int, ...] | None = None
    gather: Callable[[Tensor, str], Tensor] | None = None
    pre_error: BaseException | None = None
    where: str = "vocab-parallel group"
    mesh_size: int | None = None


def _meta_hash(*parts: object) -> int:
    """A 62-bit fingerprint of metadata (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 2


def _salted_hash(values: Tensor, salt: int, stream: int) -> Tensor:
    """Four hashes in [0, P) of ``values`` (int64, each in (-P, P), distinct values with distinct
    residues mod P): h_j = sum_i m_ji v_i mod P.

    The multipliers m_ji are drawn uniformly from [1, P) by a generator seeded with this call's
    salt (the same on every rank, fresh every call, never derived from the data): for any two
    different sequences of the same length, some v_i - v'_i is nonzero mod P, and the m_ji that
    multiplies it takes the one value that would cancel the rest with probability 1/(P - 1). So
    two different label tensors pass with probability at most (P - 1)**-4 < 2**-95, whatever the
    pattern of the difference (reordered, shifted, permuted, equal sums ...), as far as torch's
    generator is indistinguishable from uniform draws. Each hash is below 2**24: exact in float32.
    (The remainder takes the sign of P: a negative sum has its residue in [0, P) too.)
    """
    flat = values if values.dim() == 1 else values.reshape(-1)
    n = flat.numel()
    gen = _generator(flat.device)
    gen.manual_seed((salt * 2 + stream) % (2**63 - 1))
    m = torch.randint(1, _P, (_NHASH, n), generator=gen, device=flat.device, dtype=torch.int64)
    prod = m * flat  # each product < 2**48
    # Below 2**15 values their sum stays below 2**63: reduced once (the same hash).
    return (prod if n < 2**15 else prod % _P).sum(1) % _P


_gens = threading.local()


def _generator(device: torch.device) -> torch.Generator:
    """This thread's generator for ``device`` (reseeded at every use: creating one per call cost
    ~12 us on the CPU)."""
    cache = getattr(_gens, "by_device", None)
    if cache is None:
        cache = _gens.by_device = {}
    gen = cache.get(device)
    if gen is None:
        gen = cache[device] = torch.Generator(device=device)
    return gen


def _label_values(t: Tensor, ignore_index: int, C: int, ignored: Tensor | None = None) -> Tensor:
    """The labels as hash inputs below P: ignored positions (``ignored``, else ``t ==
    ignore_index``) -> C (labels are in range here)."""
    v = t.masked_fill(t == ignore_index if ignored is None else ignored, C)
    if C + 1 < _P:
        return v
    # 2**24 - 4 classes or more: 16-bit pieces
    return torch.stack([v & 0xFFFF, (v >> 16) & 0xFFFF, (v >> 32) & 0xFFFF, v >> 48], -1)


def _bit_values(w: Tensor) -> Tensor:
    """The weight's bits as 16-bit pieces (so that equal hashes mean equal bits)."""
    w = w.detach().contiguous().reshape(-1)
    return w.view(torch.int16).to(torch.int64) & 0xFFFF


_rng: random.Random | None = None
_rng_lock = threading.Lock()


def _salt_draw() -> int:
    """This rank's 62-bit draw for the call's salt: a generator seeded once from the OS (a
    syscall per call cost more than the hash itself). The salt only has to be unknown to the
    labels' author and fresh per call; the ranks agree on the largest draw."""
    global _rng
    with _rng_lock:
        if _rng is None:
            _rng = random.Random(secrets.randbits(128))
        return _rng.getrandbits(62)


_LOCAL = object()  # "no group": every class on this rank (a DTensor whose classes are not split)


_collective: tuple[object, object, Callable[[], object]] | None = None


def _ops() -> tuple[object, object, Callable[[], object]]:
    """(all_reduce, wait_tensor, below-autograd guard), looked up once (lazily: no import-time
    work, and builds without distributed have no such ops)."""
    global _collective
    if _collective is None:
        ops = torch.ops._c10d_functional
        _collective = (ops.all_reduce.default, ops.wait_tensor.default, torch._C._AutoDispatchBelowAutograd)
    return _collective


def _all_reduce(t: Tensor, op: str, group: object | None) -> Tensor:
    """The functional all-reduce stock loss_parallel issues too (``_c10d_functional.all_reduce``
    and its ``wait_tensor``: CommDebugMode, dispatch modes and tracing tools see the same ops for
    both); the input is left unmodified. Called as the op itself, below autograd (no input needs
    a gradient): ``funcol.all_reduce`` wraps the result in an ``AsyncCollectiveTensor`` and runs
    the Python autograd kernels funcol registers for both ops, ~120 us of host work per call on
    the CPU against ~15 us for the op."""
    if group is _LOCAL:
        return t
    g = dist.group.WORLD if group is None else group
    if isinstance(g, dist.ProcessGroup):
        name: object = g.group_name
    else:  # what funcol accepts besides a group (a DeviceMesh, a rank list, a name)
        import torch.distributed._functional_collectives as funcol

        name = funcol._group_or_group_name(funcol._resolve_group(g))  # type: ignore[arg-type]
    reduce, wait, below = _collective if _collective is not None else _ops()
    with below():  # type: ignore[operator]
        return wait(reduce(t, op, name))  # type: ignore[operator]


def _reduce_outer(t: Tensor, sh: Sharding, sharded_op: str) -> Tensor:
    """Over the other mesh dims: ``sharded_op`` where they shard the positions, MAX where they
    replicate them (replicas count once)."""
    for g, sharded in sh.outer:
        t = _all_reduce(t, sharded_op if sharded else "max", g)
    return t


class _SumAcross(torch.autograd.Function):
    """A sum over the mesh dims that shard the positions; its gradient is the upstream one (the
    result is the same on every rank, and each rank's part enters it once)."""

    @staticmethod
    def forward(ctx, t: Tensor, groups: tuple[object, ...]) -> Tensor:  # type: ignore[override]
        for g in groups:
            t = _all_reduce(t, "sum", g)
        return t

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        return g, None


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
    owned: Tensor  # (R,) bool: label inside this rank's slice (any value at ignored positions: masked)
    local_idx: Tensor  # (R, 1) int64: label - offset, clamped into the slice (0 on an empty slice)
    w_y: Tensor | None  # (R,) weight of the label (None: 1)
    w_local: Tensor | None  # (C_local,) this slice's weights (None: 1)
    w_sum: float | Tensor  # W, the sum of all weights (C without weight)
    w_local_sum: float | Tensor  # W_r
    eps: float
    num_classes: int
    acc: torch.dtype
    sums_k: int  # sampled rows whose sums the softmax check adds to (3) (0: none)
    backend: str  # "torch" or "triton"
    agree: list[Tensor]  # the hashes, +h then -h (_AGREE_FLOATS values), compared in the MAX all-reduce
    ex: X.Extras | None = None  # the LLM/RL extras (None: all at their defaults)
    target: Tensor | None = None  # (R,) global labels (int64), for the argmax test of the statistics
    offset: int = 0  # global index of the slice's first class
    ignored: Tensor | None = None  # (R,) bool: ~valid
    not_owned: Tensor | None = None  # (R,) bool: ~owned
    rows: Tensor | None = None  # the logits as (R, C_local) rows, detached (None: from the input)
    tol: float = 0.0  # the softmax check's tolerance on a row's sum
    problem: Problem | None = None  # set: the node reduces the losses itself (core.reduction) and returns that
    losses: Tensor | None = None  # filled by forward where it reduces: the per-position losses
    softmax_like: Tensor | None = None  # filled by forward: sampled rows that look softmaxed (0-d)
    agreed: Tensor | None = None  # filled by forward: the reduced ``agree``
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
        return d if d.shape == x.shape else d.reshape(x.shape)
    return d.reshape(x.shape[0], *x.shape[2:], x.shape[1]).movedim(-1, 1)


def _local_stats(xr: Tensor, plan: _Plan) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor, Tensor] | None]:
    """Per row over this slice, of the capped, scaled logits zt: (L_r, Q_r, stats), the
    log-sum-exp, the smoothing sum (or None), and with ``return_stats`` (A_r, key_r, code_r):
    A_r = sum_c softmax(zt)_c (zt_c - L_r) (0 for an all -inf row) and the argmax of the raw
    logits as (key: the max, NaN as +inf; code: its lowest column, minus C_local for a NaN), the
    same quantities on both backends (the Triton kernel's, in one pass: see triton_stats)."""
    ex = plan.ex
    stats = ex is not None and ex.return_stats
    C = xr.shape[1]
    if plan.backend == "triton" and C > 0:
        from ..backends.triton_backend import extras_params
        from . import triton_stats

        xf = (0, 1.0, 1.0) if ex is None else extras_params(ex.softcap, ex.temperature, 0.0, False)[:3]
        return triton_stats.shard_stats(xr, plan.w_local, plan.eps > 0, xf, stats)
    z = xr if xr.dtype == plan.acc else xr.to(plan.acc)
    zt = z if ex is None else X.transform(z, ex)
    lse = torch.logsumexp(zt, dim=1)
    q = None
    if plan.eps > 0:
        diff = lse[:, None] - zt
        q = (diff * plan.w_local[None, :]).sum(1) if plan.w_local is not None else diff.sum(1)
    if not stats:
        return lse, q, None
    d = zt - lse[:, None]
    p = d.exp()
    a = torch.where(torch.isneginf(lse), 0.0, (p * torch.where(p > 0, d, 0.0)).sum(1))
    if not C:
        return lse, q, (a, torch.full_like(lse, -math.inf), torch.zeros(lse.shape, dtype=torch.int32,
                                                                         device=lse.device))
    isn = torch.isnan(z)
    keys = torch.where(isn, math.inf, z)
    code = torch.where(isn.any(1), isn.to(torch.uint8).argmax(1) - C, keys.argmax(1))
    return lse, q, (a, keys.amax(1), code.to(torch.int32))


class _VocabParallelCE(torch.autograd.Function):
    """Per-position losses of the gathered logits from this rank's slice (collectives inside).

    Outputs: the cross-entropy per position; with extras also the z-loss term per position (empty
    without z-loss), and, not differentiable, the global log-sum-exp, the entropy and the argmax
    test (the last two empty without ``return_stats``). With extras the slice is capped and scaled
    first (elementwise, local: zt = softcap tanh(z / softcap) / temperature); the statistics ride
    on the two all-reduces the loss makes anyway: the row's raw maximum (MAX, R values), the
    entropy's sum and the argmax test (SUM, 2R values). The argmax test needs no index exchange:
    the labels are the same on every rank, so each rank counts, per row, its classes equal to the
    global maximum at an index below the label (plus 1 where it owns the label and the label's
    logit is below the maximum); the prediction is right iff the sum is 0 (ties to the lowest
    index, as ``torch.argmax``).
    """

    @staticmethod
    def forward(ctx, x: Tensor, plan: _Plan) -> Tensor | tuple[Tensor, ...]:  # type: ignore[override]
        group, acc, ex = plan.group, plan.acc, plan.ex
        stats = ex is not None and ex.return_stats
        xr = plan.rows if plan.rows is not None else _rows(x.detach())
        R, C_local = xr.shape
        dev = x.device
        L, Q, st = _local_stats(xr, plan)
        L = L.to(acc)

        # (2) MAX: per-row max of the slices' log-sum-exps, the raw row maximum (statistics),
        # the agreement hashes.
        parts = [L]
        if stats:  # the argmax's key, and whether it is a NaN (a NaN wins over +inf)
            assert st is not None  # internal invariant: computed with return_stats
            parts += [st[1].to(acc), (st[2] < 0).to(acc)]
        red = _all_reduce(torch.cat(parts + plan.agree), "max", group)
        plan.bytes_sent = red.numel() * red.element_size()
        plan.agreed = red[-_AGREE_FLOATS:]
        M = red[:R]
        # A finite stand-in for a row whose logits are all -inf (M = -inf), where exp(L - M)
        # would be NaN; +inf and NaN stay (NaN everywhere in the row, as stock). Every use of
        # it gives what 0 would: exp(-inf - M_ref) = 0, M_ref + log(0) = -inf.
        M_ref = M.clamp_min(torch.finfo(acc).min)

        # (3) SUM: rescaled sums of exponentials, target logit, smoothing term, sampled-row sums,
        # and with statistics the entropy's sum and the argmax test.
        sumexp = torch.exp(L - M_ref)
        if C_local:
            xy = xr.gather(1, plan.local_idx).view(R).to(acc)
            xy = xy if ex is None else X.transform(xy, ex)  # R values: the label's zt
            term = (xy - M_ref).masked_fill_(plan.not_owned, 0.0)  # type: ignore[arg-type]
        else:
            term = torch.zeros(R, dtype=acc, device=dev)
        parts = [sumexp, term]
        if plan.eps > 0:
            assert Q is not None  # internal invariant: computed whenever eps > 0
            zs = plan.w_local_sum * (L - M_ref) - Q.to(acc)
            # An all -inf slice: each class adds w_c * inf to the smoothing sum, as stock: +inf, NaN
            # for a zero weight (0 * inf), nothing for an empty slice.
            q_inf = (plan.w_local * math.inf).sum() if plan.w_local is not None else (math.inf if C_local else 0.0)
            zs = torch.where(torch.isneginf(L), -torch.as_tensor(q_inf, dtype=acc, device=dev), zs)
            parts.append(zs)
        k = plan.sums_k
        if k:  # no rank's sample has a logit outside [0, 1] (the head): the rows' sums decide
            rows = xr if R <= K_SAMPLE else xr[_sample_positions(xr, R)]
            parts.append(rows.sum(1, dtype=acc))
        if stats:
            assert st is not None and plan.target is not None
            # Entropy: sum_c exp(zt_c - M)(zt_c - M) over the slice from its (L_r, A_r), no pass
            # over the logits: exp(L_r - M) (A_r + L_r - M) (0 for an all -inf slice).
            a = st[0].to(acc)
            parts.append(torch.where(torch.isneginf(L), 0.0, sumexp * (a + (L - M_ref))))
            # Argmax: the winning key is the max of the keys, a NaN first; the global argmax is
            # the lowest column holding it over the ranks. Each rank counts its winner below the
            # label, and the label's owner 1 unless the label is its winner: correct iff 0.
            gkey, gnan = red[R : 2 * R], red[2 * R : 3 * R]
            code = st[2].to(torch.int64)
            nan = code < 0
            col = torch.where(nan, code + C_local, code) + plan.offset
            win = (st[1].to(acc) == gkey) & (nan == (gnan > 0)) & (C_local > 0)  # an empty slice holds nothing
            lower = win & (col < plan.target)
            lower = lower.to(acc) + (plan.owned & ~(win & (col == plan.target))).to(acc)
            parts.append(lower)
        red2 = _all_reduce(torch.cat(parts), "sum", group)
        plan.bytes_sent += red2.numel() * red2.element_size()

        S = red2[:R]
        log_s = torch.log(S)
        lse = M_ref + log_s
        nll = log_s - red2[R : 2 * R]
        if plan.w_y is not None:
            nll = nll * plan.w_y
        loss = (1 - plan.eps) * nll if plan.eps > 0 else nll
        i = 2 * R
        if plan.eps > 0:
            smooth = plan.w_sum * log_s - red2[i : i + R]
            loss = loss + (plan.eps / plan.num_classes) * smooth
            i += R
        pos = _positions_shape(x)
        loss = loss.masked_fill_(plan.ignored, 0.0)  # type: ignore[arg-type]
        if loss.shape != pos:
            loss = loss.reshape(pos)

        if k:
            # The head said every sampled logit lies in [0, 1]: a row looks softmaxed iff it sums to 1.
            plan.softmax_like = ((red2[i : i + k] - 1).abs() <= plan.tol).sum()  # read with the counts
            i += k
        ctx.plan = plan
        ctx.save_for_backward(x, lse)
        ctx.set_materialize_grads(False)
        if ex is None:
            if plan.problem is None:
                return loss
            # The reduction in this node: no autograd nodes of its own (a sum, a division, their
            # derivatives), its gradient taken in backward (core.reduction.rows_grad).
            plan.losses = loss
            out, ctx.denom = _reduction.reduce_with_divisor(loss, plan.problem, None, plan.valid)
            return out
        empty = loss.new_empty(0)
        zl = X.z_loss_rows(lse, plan.valid, ex.z_loss).reshape(pos) if ex.z_loss else empty
        if stats:
            ent = (log_s - red2[i : i + R] / S).reshape(pos)
            correct = (plan.valid & (red2[i + R : i + 2 * R] == 0)).reshape(pos)
        else:
            ent, correct = empty, plan.valid.new_empty(0)
        lse_out = lse.detach().reshape(pos).clone()
        if stats:
            # torch.logsumexp's +inf for a row with a +inf logit: without a NaN logit in the row
            # (the argmax's flag), a NaN lse can only come from inf - inf (the loss stays NaN).
            gnan = red[2 * R : 3 * R] > 0
            lse_out = torch.where(~gnan & lse.isnan(), math.inf, lse).reshape(pos)
        ctx.mark_non_differentiable(lse_out, ent, correct)
        return loss, zl, lse_out, ent, correct

    @staticmethod
    def backward(ctx, g: Tensor | None, *rest: Tensor | None):  # type: ignore[override]
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
        ex, acc = plan.ex, plan.acc
        xr = _rows(x)
        z = xr if xr.dtype == acc else xr.to(acc)
        zt = z if ex is None else X.transform(z, ex)
        # d loss / d zt = g (A p - (1 - eps) w_y e_y - (eps / C) w) + g_zl 2 coef lse p (see
        # core.extras.index_grad), then through the transform; ignored rows exactly 0.
        if g is None:
            gce = torch.zeros_like(lse)
        elif plan.problem is not None:  # the gradient of this node's reduction: 0-d for sum and mean
            gce = _reduction.rows_grad(g, plan.problem.reduction, plan.problem.out_dtype, ctx.denom, acc)
            gce = gce if gce.dim() <= 1 else gce.reshape(-1)
        else:
            gce = g if g.dim() == 1 else g.reshape(-1)
            gce = gce if gce.dtype == acc else gce.to(acc)
        g_zl = rest[0] if rest else None
        gzl = None if g_zl is None or not g_zl.numel() else g_zl.reshape(-1).to(acc)
        p = torch.sub(zt, lse[:, None]).exp_()
        if ex is None and plan.eps == 0 and plan.w_y is None:
            # index_grad's plain case, op for op on every counted row (the others are zeroed
            # last there too): p g, minus g at the owned label.
            d = X.scaled(p, gce[:, None] if gce.dim() else gce)
            if d.shape[1]:
                d.scatter_add_(1, plan.local_idx, (gce * plan.owned).neg_().unsqueeze(1))
            d = d.masked_fill_(plan.ignored.unsqueeze(1), 0.0)  # type: ignore[union-attr]
        else:
            d = X.index_grad(p, plan.local_idx.view(-1), plan.owned, plan.valid, plan.w_y, plan.w_local, plan.w_sum,
                             plan.eps, plan.num_classes, gce.expand(lse.shape), gzl, lse,
                             0.0 if ex is None else ex.z_loss)
        if ex is not None:
            d = X.chain(d, zt, ex)
        return _unrows(d if d.dtype == x.dtype else d.to(x.dtype), x), None


def _idle_rounds(R: int, sums_k: int, eps: float, acc: torch.dtype, device: torch.device,
                 agree: list[Tensor], group: object | None, stats: bool) -> tuple[int, Tensor]:
    """A rank whose label values failed a check still enters (2) and (3), with contributions that
    change nothing, so that every rank learns it after the loss, in the same call. Returns the
    bytes sent and the agreed hashes."""
    n_max = R + (2 * R if stats else 0)
    red = _all_reduce(torch.cat([torch.full((n_max,), -math.inf, dtype=acc, device=device), *agree]),
                      "max", group)
    n_sum = (3 if eps > 0 else 2) * R + sums_k + (2 * R if stats else 0)
    red2 = _all_reduce(torch.zeros(n_sum, dtype=acc, device=device), "sum", group)
    return red.numel() * red.element_size() + red2.numel() * red2.element_size(), red[-_AGREE_FLOATS:]


def _positions_shape(x: Tensor) -> tuple[int, ...]:
    s = tuple(x.shape)
    return s[1:] if len(s) == 1 else s[:1] + s[2:]


def _groups(sh: Sharding) -> list[object | None]:
    return ([sh.group] if sh.split else []) + [g for g, _ in sh.outer]


def _first(obj: object, sh: Sharding) -> tuple[int, int, object, bool] | None:
    """The (global rank, rank label, obj, everywhere) of the lowest global rank whose ``obj`` is
    not None, on every rank: a gather over the class group, then over each other mesh dim.
    ``everywhere``: every rank passed an equal ``obj``."""
    label = dist.get_rank(sh.group) if sh.outer == () and sh.split else dist.get_rank()
    cur = None if obj is None else (dist.get_rank(), label, obj, True)
    for g in _groups(sh):
        got: list[object] = [None] * dist.get_world_size(g)
        dist.all_gather_object(got, cur, group=g)
        found = [c for c in got if c is not None]
        if not found:
            cur = None
            continue
        low = min(found, key=lambda c: c[0])  # type: ignore[index]
        same = len(found) == len(got) and all(c[3] and c[2] == low[2] for c in found)  # type: ignore[index]
        cur = (*low[:3], same)  # type: ignore[index]
    return cur  # type: ignore[return-value]


def _world(sh: Sharding) -> int:
    if sh.mesh_size is not None:
        return sh.mesh_size
    return dist.get_world_size(sh.group) if sh.split else 1


def _raise_agreed(local: BaseException | None, sh: Sharding, default: SafeLossError | None = None) -> None:
    """Every rank raises the error of the lowest failing rank, with the same class and text
    (``default`` where no rank has one)."""
    # The builtin too: a TargetShapeError that is also a ValueError (errors.stock_class) stays one.
    builtin = None if local is None else getattr(type(local).__dict__.get("stock_builtin"), "__name__", None)
    mine = None if local is None else (type(local).__name__, str(local), builtin)
    first = _first(mine, sh)
    if first is None:
        assert default is not None  # internal invariant: called with a local error somewhere, or a default
        raise default
    _, rank, (name, text, builtin), everywhere = first  # type: ignore[misc]
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SafeLossError)):
        cls = ParallelMismatchError
        text = f"{name}: {text}"
    elif builtin is not None:
        cls = errors.stock_class(cls, getattr(builtins, builtin))
    world = _world(sh)
    if world > 1 and not everywhere:  # which rank matters only where the ranks' errors differ
        text += f"\n(raised on rank {rank} of the {world} ranks of the {sh.where}; every rank raises it)"
    raise cls(text) from (local if local is not None else None)


def _check_group(group: object | None) -> None:
    """``group`` must be a process group this rank belongs to. Raised on this rank alone, before
    any collective: no collective can run on such a group (torch's own errors for it read
    "Unsupported group type: <class 'int'>, -100" or "unhashable type: 'list'")."""
    if group is None:
        return
    # new_group returns this int on the ranks outside the group
    outside = type(group) is int and group == dist.GroupMember.NON_GROUP_MEMBER
    if not outside and isinstance(group, dist.ProcessGroup) and dist.get_rank(group) < 0:
        outside = True
    if outside:
        members = ("new_group returned GroupMember.NON_GROUP_MEMBER here" if isinstance(group, int)
                   else f"global ranks {dist.get_process_group_ranks(group)}")  # type: ignore[arg-type]
        raise BackendError(
            f"vocab_parallel_cross_entropy: this rank (global rank {dist.get_rank()}) is not a member "
            f"of the group passed as group= ({members}); only the ranks that hold a slice of the "
            "classes take part in the call.\n"
            "Fix: call it on the group's ranks only (if torch.distributed.get_rank(group) >= 0: ...), "
            "or pass this rank's own tensor-parallel group"
        )
    if not isinstance(group, dist.ProcessGroup):
        kind = type(group).__name__
        if kind == "DeviceMesh":
            fix = ("group=mesh.get_group() (a 1-D mesh; on an N-D mesh, mesh.get_group(\"tp\") for its "
                   "tensor-parallel dim)")
        elif isinstance(group, (list, tuple)):
            fix = f"group=torch.distributed.new_group({list(group)!r}) once on every rank, then pass that group"
        else:
            fix = "group=None (every rank) or a group from torch.distributed.new_group(ranks)"
        raise ArgumentTypeError(
            f"vocab_parallel_cross_entropy: group= takes a ProcessGroup, got a {kind} ({group!r:.80}).\n"
            f"Fix: {fix}"
        )


def _slice_weight_error(err: BaseException, weight: object, sizes: list[int], crank: int,
                        C: int) -> BaseException:
    """A weight as wide as every rank's slice is the Megatron habit of sharding it with the logits:
    say so (the single-device hint guesses weights computed from the labels present). Judged on
    the agreed widths and weight shape only, so every rank rewrites alike (uneven slices of the
    weight differ in shape: the config mismatch names them first)."""
    if (not isinstance(err, WeightError) or not isinstance(weight, Tensor) or weight.dim() != 1
            or len(set(sizes)) != 1 or weight.shape[0] != sizes[crank] or sizes[crank] in (0, C)):
        return err
    lo = sum(sizes[:crank])
    return WeightError(
        f"weight has shape {fmt_shape(weight.shape)}: the width of this rank's slice of the classes "
        f"(rank {crank} holds classes {lo}..{lo + sizes[crank] - 1} of {C}), but "
        "vocab_parallel_cross_entropy takes the full (C,) class weight, the same on every rank (the "
        "smoothing term and the mean's denominator need every class's weight).\n"
        f"Fix: pass the full weight ({C} entries) on every rank, not its slice "
        "weight[offset:offset + C_local]"
    )


def _global_input_error(err: BaseException | None, input: object, sizes: list[int],
                        sh: Sharding) -> BaseException | None:
    """Integer (or complex) logits: the error names the global logits' shape, not this rank's slice
    (every rank's width is in the head). Kept as it is where its text also reads the target (the
    swapped-arguments reading: the local shapes are the ones it compares) or a width is unknown."""
    if not isinstance(err, InputDtypeError) or not isinstance(input, Tensor) or input.dim() == 0:
        return err
    if sh.input_shape is not None:
        gshape = tuple(sh.input_shape)
    elif min(sizes) < 0:
        return err
    else:
        gshape = _with_classes(_positions_shape(input), sum(sizes), input.dim() == 1)
    try:
        _check_input(input, None)
    except InputDtypeError as plain:
        if str(plain) != str(err):
            return err  # the reading of the target's shape (swapped arguments)
    try:
        _check_input(_standin(gshape, input.dtype, input.device), None)
    except InputDtypeError as e:
        return e
    return err


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
) -> Tensor | tuple[Tensor, X.LossStats]:
    """Cross-entropy of logits sharded over the classes, from this rank's slice, with every check.

    Args:
        input: this rank's contiguous slice of the classes, ``(N, C_local)``,
            ``(N, C_local, d1..dK)`` or ``(C_local,)``; slices are ordered by rank in ``group`` and
            may be uneven (or empty).
        target: class indices into the *global* classes, the same on every rank.
        weight: the full ``(C,)`` class weights (not a slice), the same on every rank.
        group: the tensor-parallel process group (``None``: the default group); this rank must
            be a member (a ``DeviceMesh`` or a rank list is refused: pass ``mesh.get_group()``).
        softcap, temperature, z_loss, return_stats: the LLM and RL extras, as on
            ``safeloss.cross_entropy`` (logits become ``softcap * tanh(z / softcap) / temperature``;
            ``z_loss * lse^2`` per non-ignored position with the global lse; ``return_stats``
            returns ``(loss, safeloss.LossStats)``, the same on every rank). No extra collective:
            the statistics ride on the loss's all-reduces (4R more values).

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
    extras = None if X.defaults(softcap, temperature, z_loss, return_stats) else (
        softcap, temperature, z_loss, return_stats)
    try:
        return fn(input, target, weight, ignore_index, reduction, label_smoothing, group=group,
                  strict=strict, backend=backend, owner=None, extras=extras)
    except SafeLossError as e:  # the traceback ends at the caller's line; fixes name this call
        trim(e, "safeloss.vocab_parallel_cross_entropy")
        if e.args and isinstance(e.args[0], str):
            e.args = (reword(e.args[0]), *e.args[1:])
        raise


_EAGER_ONLY = ("safeloss.vocab_parallel_cross_entropy runs eagerly (collectives, host-read agreement "
               "of the ranks); call it outside the fullgraph=True region")


def _standin(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A tensor of this shape that costs no memory (validation reads shapes, never logits)."""
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


def _standin_target(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                    input_shape: tuple[int, ...]) -> Tensor:
    """A target with the real one's shape and dtype and values that fail no check (zeros; a valid
    one-hot row where the shape is the logits'): validation of it fails exactly where the real
    target fails for its shape or dtype."""
    if tuple(shape) == tuple(input_shape) and len(shape) >= 1 and not (dtype == torch.bool or dtype.is_complex):
        cdim = 0 if len(shape) == 1 else 1
        hot = torch.zeros(shape[cdim], dtype=dtype, device=device)
        if shape[cdim]:
            hot[0] = 1
        view = [1] * len(shape)
        view[cdim] = shape[cdim]
        return hot.reshape(view).expand(shape)
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


def _with_classes(positions: tuple[int, ...], C: int, one_d: bool) -> tuple[int, ...]:
    return (C,) if one_d else positions[:1] + (C,) + positions[1:]


def _label_range(t: Tensor, ignore_index: int) -> tuple[Tensor, Tensor | None]:
    """([max, max of ~label] of the labels that are not ignore_index, as a (2,) int64 tensor
    (``_NONE`` where there are none), and the mask of ``t == ignore_index`` (None where ``t`` is
    not int64: the call compares its converted target again)), without a host read. ~label =
    -1 - label never overflows (-(-2**63) would wrap). Float labels count where they are whole
    numbers (the others are validation's error); uint64 labels of 2**63 or more turn negative
    (out of range)."""
    if t.dtype == torch.bool or t.is_complex() or t.numel() == 0:
        return torch.full((2,), _NONE, dtype=torch.int64, device=t.device), None
    mask_of_t = t.dtype == torch.int64
    if t.is_floating_point():
        whole = torch.isfinite(t) & (t == t.round()) & (t.abs() < 2.0**62)
        t = torch.where(whole, t, float(ignore_index) if abs(ignore_index) < 2**62 else 0.0).long()
    elif t.dtype == torch.uint64:
        t = t.view(torch.int64)
    elif not mask_of_t:
        t = t.long()
    ignored = t == ignore_index
    both = torch.stack([t, ~t]).masked_fill_(ignored, _NONE)
    return (both.amax(tuple(range(1, both.dim()))) if t.dim() else both), (ignored if mask_of_t else None)


def _sample_outside(xr: Tensor) -> Tensor:
    """(1,) int64: how many logits of the softmax check's sampled rows lie outside [0, 1] (or are
    NaN). Reduced (MAX) in the head: where any rank's are, no sampled row can look softmaxed,
    and the check ends there; only where none are, the rows' sums follow in (3). (A count, not
    a flag: int64 like the head, whose cat of mixed dtypes cost twice a cat of one.)"""
    rows = xr if xr.shape[0] <= K_SAMPLE else xr[_sample_positions(xr, xr.shape[0])]
    return torch.count_nonzero(rows.clamp(0, 1) != rows).view(1)


def _head(vals: list[int], cworld: int, device: torch.device, rng: Tensor | None,
          sample_out: Tensor | None) -> Tensor:
    """The head: ``vals`` built on the host, with the device's label range and sample flag in
    their slots (the last three) where given."""
    tail = [v for v in (rng, sample_out) if v is not None]
    cut = len(vals) if not tail else cworld + (_TMAX if rng is not None else _SAMPLE_OUT)
    # frombuffer: a third of torch.tensor's cost for a list (the cat below, or the all-reduce,
    # copies it; the copy to another device stages the bytes before returning).
    head = torch.frombuffer(array.array("q", vals[:cut]), dtype=torch.int64)
    if device.type != "cpu":
        head = head.to(device, non_blocking=True)
    if not tail:
        return head
    if rng is not None and sample_out is None:
        tail.append(torch.zeros(1, dtype=torch.int64, device=device))
    return torch.cat([head, *tail])


def _as_index(ignore_index: object) -> int | None:
    """``ignore_index`` as an int64 value, or None where validation must raise its error (not
    an int, a bool or bool tensor, a meta tensor, outside int64: the labels are compared with it
    before validation runs)."""
    ii = ignore_index if type(ignore_index) is int else int_index(ignore_index)
    return ii if ii is not None and fits_int64(ii) else None


def _refuse_dtensors(input: object, target: object, weight: object) -> None:
    """The direct API takes this rank's plain slices: DTensors (whose ops would mix with the
    plain tensors of the agreement and fail in DTensor's dispatch) go through the op that reads
    their placements. Raised in phase A, so the ranks agree on it like on any local error."""
    mod = sys.modules.get("torch.distributed.tensor")  # a DTensor argument implies the module
    if mod is None:
        return
    for name, v in (("input", input), ("target", target), ("weight", weight)):
        if isinstance(v, mod.DTensor):
            raise ArgumentTypeError(
                f"vocab_parallel_cross_entropy got a DTensor as {name} (global shape "
                f"{fmt_shape(v.shape)}, placements {tuple(v.placements)}); it takes this rank's "
                "slice of the classes and the full target and weight as plain tensors.\n"
                "Fix: give DTensor logits to safeloss.cross_entropy, of any placement (inside "
                "torch.distributed.tensor.parallel.loss_parallel() for logits sharded on the "
                "classes: the same vocab-parallel loss and checks); or, for logits sharded on "
                "the classes over a 1-D mesh, pass plain tensors: vocab_parallel_cross_entropy("
                "logits.to_local(), target.full_tensor(), group=mesh.get_group())"
            )


def _precheck(input: object, target: object, weight: object, ignore_index: object, reduction: str,
              eps: float) -> tuple[Tensor, Tensor, int]:
    """The checks of a call that need no class count: types, dtypes, layouts, devices."""
    ignore = _as_index(ignore_index)
    if not isinstance(target, Tensor) or ignore is None:
        # validation's own error for these arguments: it checks them before anything else
        normalize(input, target, None, ignore_index, reduction, eps)
    assert isinstance(target, Tensor) and ignore is not None  # normalize raised otherwise
    x = _check_input(input, target)
    check_layouts(x, target, weight)
    if weight is not None and not isinstance(weight, Tensor):
        _check_weight(weight, x, 0, False)  # raises its ArgumentTypeError
    _check_devices(x, target, weight if isinstance(weight, Tensor) else None)
    if isinstance(weight, Tensor) and weight.requires_grad and torch.is_grad_enabled():
        raise WeightError(
            "weight requires grad, but cross_entropy with class-index targets is not "
            f"differentiable with respect to the class weights (stock torch on the gathered logits: "
            f"{weight_grad_quote(x.dim())}).\nFix: pass weight.detach()"
        )
    return x, target, ignore


def _split_normalize(x_standin: Tensor, target: Tensor, weight: Tensor | None, ignore: int,
                     reduction: str, eps: float, op: str = "vocab_parallel_cross_entropy") -> Problem:
    """Validation against the global class count, for logits split over the classes; ``op``:
    the function the caller called (``cross_entropy`` on DTensor logits)."""
    p = normalize(x_standin, target, weight, ignore, reduction, eps)
    if p.prob:
        raise TargetShapeError(
            f"{op} got a target of the logits' global shape "
            f"{fmt_shape(x_standin.shape)}, i.e. class probabilities; only class indices are "
            "supported while the classes are split over ranks.\n"
            "Fix: pass class indices (target.argmax(dim=1) for one-hot rows), or gather the "
            "logits (a DTensor: pass the target as a DTensor of the logits' shape, and safeloss "
            "gathers the classes) and call safeloss.cross_entropy"
        )
    return p


class _Sig:
    """A planned signature of the direct API (see ``core.plan``): what its argument checks
    settled (phase A) and, for the slice widths of the ranks it was made with, what validation
    settled (phase B). Holds nothing read from values, and no tensor with memory (the global
    logits' stand-in is a meta tensor: a planned call's problem reads its shape and dtype only);
    the collectives a planned call makes are a full call's, so a rank with a plan and a rank
    without one meet in the same all-reduces."""

    __slots__ = ("backend", "crank", "cworld", "device", "eps", "ex", "gshape", "name", "out_dtype", "positions",
                 "reduction", "sh", "sizes", "vals", "width", "x_standin")

    def __init__(self, sh: Sharding, crank: int, cworld: int, device: torch.device, width: int, name: str,
                 reduction: str, eps: float, backend: str, ex: X.Extras | None, vals: list[int], sizes: list[int],
                 positions: tuple[int, ...], x_standin: Tensor, gshape: tuple[int, ...], out_dtype: torch.dtype) -> None:
        self.sh, self.crank, self.cworld, self.device, self.width, self.name = sh, crank, cworld, device, width, name
        self.reduction, self.eps, self.backend, self.ex = reduction, eps, backend, ex
        self.vals = list(vals)  # the head's host part: slice width, fingerprints (error, strict, salt: per call)
        # The stand-in for the global logits that validation saw, on the meta device: no memory.
        self.sizes, self.positions = list(sizes), positions
        self.x_standin = torch.empty(x_standin.shape, dtype=x_standin.dtype, device="meta")
        self.gshape, self.out_dtype = gshape, out_dtype


_PLAIN = (Tensor, torch.nn.Parameter)
_C = torch._C
_get_plan = plans._plans.get  # the store itself (a dict never rebound: plan.clear() empties it)


def _sig_key(input: object, target: object, weight: object, ignore_index: object, reduction: object,
             label_smoothing: object, group: object, backend: object, extras: object) -> tuple | None:
    """The plan key of a direct call, or None (not plannable): the shapes, dtypes, layouts and
    devices of plain tensors, the options with their types, the group (the process group object
    itself: a new default group is another key), grad mode and autocast (both in the agreed
    config), and no TorchFunctionMode (it must see the functions a full call calls), tracer or
    functorch transform. (Dispatch modes see the same ops either way: a plan saves Python only.)"""
    if (type(input) not in _PLAIN or type(target) not in _PLAIN or (weight is not None and type(weight) not in _PLAIN)
            or type(ignore_index) is not int or type(reduction) is not str or type(backend) is not str):
        return None
    if _C._is_torch_function_mode_enabled() or _C._is_tracing() or _C._are_functorch_transforms_active():
        return None
    try:
        key = (
            "vocab_parallel_cross_entropy",
            input.shape, input.dtype, input.layout, input.is_cpu or input.device,  # type: ignore[union-attr]
            target.shape, target.dtype, target.layout, target.is_cpu or target.device,  # type: ignore[union-attr]
            None if weight is None else (weight.shape, weight.dtype, weight.layout,  # type: ignore[union-attr]
                                         weight.is_cpu or weight.device, weight.requires_grad),  # type: ignore[union-attr]
            ignore_index, reduction, label_smoothing, type(label_smoothing), backend,
            dist.group.WORLD if group is None else group,
            None if extras is None else (*extras, *map(type, extras)),  # type: ignore[misc]
            _C.is_grad_enabled(),
            _C._is_any_autocast_enabled() and _autocast_key(input),
        )
        hash(key)
    except (AttributeError, RuntimeError, TypeError):  # no sizes (nested), unhashable options
        return None
    return key


def _autocast_key(x: Tensor) -> object:
    dt = x.device.type
    return torch.is_autocast_enabled(dt) and str(torch.get_autocast_dtype(dt))


def _store_plan(key: tuple, sig: _Sig) -> None:
    plans.store(key, sig)


def _checks(input: object, target: object, weight: object, ignore_index: object, reduction: object,
            label_smoothing: object, strict: bool | None, backend: object, extras: object, sh: Sharding,
            direct: bool, fp: dict[str, int]) -> tuple:
    """Phase A's argument checks (see ``run``): (x, t, ignore, backend name, reduction,
    label_smoothing, backend, extras, strict, the validated problem where known (DTensor calls),
    findings); fills ``fp`` with the fingerprints of the metadata. Raises what it finds."""
    strict_local = bool(LazyStrict(strict))
    ex = None
    name = "torch"
    p: Problem | None = None
    findings: list[Finding] = []
    if extras is not None:
        ex = X.check(*extras, op="vocab_parallel_cross_entropy" if direct else "cross_entropy")  # type: ignore[misc]
        ex = ex if ex.active else None
    reduction_ = check_reduction(reduction)
    eps = check_label_smoothing(label_smoothing)
    backend_ = check_backend(backend)
    if sh.pre_error is not None:
        raise sh.pre_error
    if direct:
        _refuse_dtensors(input, target, weight)
    x, t, ignore = _precheck(input, target, weight, ignore_index, reduction_, eps)
    one_d = x.dim() == 1
    if sh.num_classes is not None:
        # DTensor: the global shapes are known on every rank, so shapes are judged globally
        # now (every rank the same message), then this rank's values locally.
        assert sh.input_shape is not None and sh.target_shape is not None  # given with num_classes
        gx = _standin(sh.input_shape, x.dtype, x.device)
        try:
            g = normalize(gx, _standin_target(sh.target_shape, t.dtype, t.device, sh.input_shape),
                          weight, ignore, reduction_, eps)
        except Exception:
            if tuple(t.shape) == tuple(sh.target_shape):
                # this rank holds the whole target: the message of its values (the hints read them)
                normalize(gx, t, weight, ignore, reduction_, eps)
            raise
        findings = g.findings
        if sh.split:
            p = _split_normalize(_standin(_with_classes(_positions_shape(x), sh.num_classes, one_d),
                                          x.dtype, x.device), t, weight, ignore, reduction_, eps,
                                 op="cross_entropy")
        else:
            p = normalize(x, t, weight, ignore, reduction_, eps)
    if sh.split and (backend_ == "triton" or (backend_ == "auto" and x.device.type == "cuda")):
        # As safeloss.dispatch: Triton for CUDA tensors when it can run (float64 stays on torch);
        # backend="triton" where it cannot is an error (the interpreter counts, for CPU tests).
        reason = triton_unavailable_reason(x.device)
        if reason is None and x.dtype != torch.float64:
            name = "triton"
        elif backend_ == "triton":
            raise BackendError(
                f'backend="triton" cannot run the vocab-parallel statistics here: '
                f'{reason or "float64 logits run on torch"}.\nFix: backend="auto"'
            )
    elif not sh.split and p is not None:
        name = dispatch.select(backend_, p)
    if ex is not None and p is not None and p.prob:
        raise BackendError(
            f"cross_entropy with {ex.describe() or 'return_stats=True'} got DTensor logits with "
            "probability targets: the extras run on class-index targets for DTensor logits.\n"
            "Fix: pass class indices (target.argmax(dim=1) for one-hot rows), or call "
            "safeloss.cross_entropy on input.full_tensor() and target.full_tensor()"
        )
    w_meta = None if not isinstance(weight, Tensor) else (str(weight.dtype), tuple(weight.shape))
    fp["config"] = _meta_hash(str(x.dtype), reduction_, ignore, eps, w_meta, torch.is_grad_enabled(),
                              str(torch.get_autocast_dtype(x.device.type))
                              if torch.is_autocast_enabled(x.device.type) else None)
    fp["positions"] = _meta_hash(_positions_shape(x))
    fp["target"] = _meta_hash(tuple(t.shape), str(t.dtype))
    fp["extras"] = _meta_hash(ex)
    return x, t, ignore, name, reduction_, eps, backend_, ex, strict_local, p, findings


def run(
    input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str,
    label_smoothing: float, *, group: object | None = None, strict: bool | None, backend: str,
    owner: object | None, stats: dict | None = None, sharding: Sharding | None = None,
    inplace_backward: bool = False, fused_grad: bool = False,
    extras: tuple[object, object, object, object] | None = None,
) -> Tensor | tuple[Tensor, X.LossStats]:
    """One call (see the module docstring); ``extras``: the raw (softcap, temperature, z_loss,
    return_stats), checked here with the rest (None: all at their defaults). Returns the loss, or
    ``(loss, LossStats)`` with ``return_stats``."""
    if not (dist.is_available() and dist.is_initialized()):
        raise BackendError(
            "vocab_parallel_cross_entropy needs an initialized torch.distributed process group "
            "(each rank holds a slice of the classes).\n"
            "Fix: torch.distributed.init_process_group(...) first (torchrun sets it up), or call "
            "safeloss.cross_entropy on the full logits"
        )
    key = sig = None
    if sharding is None:
        key = _sig_key(input, target, weight, ignore_index, reduction, label_smoothing, group, backend, extras)
        sig = None if key is None else _get_plan(key)
    if sig is not None:
        sh, crank, cworld, device = sig.sh, sig.crank, sig.cworld, sig.device
    else:
        if sharding is None:
            _check_group(group)
        sh = sharding if sharding is not None else Sharding(dist.group.WORLD if group is None else group)
        crank, cworld = (dist.get_rank(sh.group), dist.get_world_size(sh.group)) if sh.split else (0, 1)
        device = _comm_device(input, sh.group)

    # Phase A, local: every check that needs no other rank. Nothing is raised yet: a rank that
    # failed alone would leave the others waiting in the first all-reduce. Nothing below the try
    # may raise on this rank's values alone either.
    local_error: BaseException | None = None
    strict_local = False
    reduction_, eps, backend_, ignore = "mean", 0.0, "auto", -100
    x = t = None
    p: Problem | None = None  # the validated local problem (known here for DTensor calls)
    findings: list[Finding] = []
    fp = dict.fromkeys(_AGREE, 0)
    rng = ignored = rng_of = None  # the label range (device), the mask of rng_of == ignore_index
    xr = sample_out = None  # the logits as rows; whether a sampled value lies outside [0, 1]
    width = -1  # this slice's width, -1 where the input has none (not a tensor, 0-d)
    name = "torch"
    ex: X.Extras | None = None
    try:
        if sig is not None:
            # A planned signature: its argument checks passed for these shapes, dtypes, devices
            # and options (the key holds them); strictness and every value check are this call's.
            x, t, ignore, width, name = input, target, ignore_index, sig.width, sig.name
            reduction_, eps, backend_, ex = sig.reduction, sig.eps, sig.backend, sig.ex
            strict_local = bool(LazyStrict(strict))
        else:
            if isinstance(input, Tensor) and not input.is_nested and input.dim() >= 1:
                width = input.shape[0 if input.dim() == 1 else 1]  # before its checks: see _global_input_error
            x, t, ignore, name, reduction_, eps, backend_, ex, strict_local, p, findings = _checks(
                input, target, weight, ignore_index, reduction, label_smoothing, strict, backend, extras, sh,
                sharding is None, fp)
        if p is None or not p.prob:
            rng_of = p.target if p is not None else t
            rng, ignored = _label_range(rng_of, ignore)
        if sh.split or ex is not None:  # the engine's loss: the softmax check's first half
            xr = _rows(x.detach())
            if xr.numel():
                sample_out = _sample_outside(xr)
    except Exception as e:  # every local failure must reach the other ranks
        local_error = e
        p = None

    # (1) the head: who failed, slice widths, label range, salt, fingerprints of the metadata,
    # whether a sampled logit lies outside [0, 1]. Built on the host and sent in one copy (a copy
    # from pageable memory without a stream sync: the driver stages the few bytes before
    # returning); the label range and the sample's flag come from the device and stay there,
    # appended by one cat (their slots are last): one fill per value cost ~40 small ops per call.
    base = cworld + _FP
    if sig is not None:
        vals = sig.vals.copy()  # the width and the fingerprints of the signature
    else:
        vals = [0] * (cworld + _HEAD)
        vals[crank] = width + 1  # 0: unknown
        vals[cworld + _TMAX] = vals[cworld + _TMIN] = _NONE
        for i, field_ in enumerate(_AGREE):
            vals[base + 2 * i], vals[base + 2 * i + 1] = fp[field_], -fp[field_]
    vals[cworld + _ERROR] = int(local_error is not None)
    vals[cworld + _STRICT] = int(strict_local)
    vals[cworld + _SALT] = _salt_draw()
    head = _head(vals, cworld, device, None if local_error is not None else rng,
                 None if local_error is not None else sample_out)
    nbytes = 0
    if sh.split:
        head = _all_reduce(head, "max", sh.group)
        nbytes += head.numel() * head.element_size()
    if sh.outer:
        # Positions and targets agree within the class group only (the other mesh dims may hold
        # other rows): their verdicts become flags before the reduction over those dims.
        for flag, key in ((_POS_DIFFER, "positions"), (_TGT_DIFFER, "target")):
            i = base + 2 * _AGREE.index(key)
            head[cworld + flag] = (head[i] != -head[i + 1]).to(torch.int64)
        head = _reduce_outer(head, sh, "max")
    h = head.tolist()

    # Phase B: every decision from here on is taken on the agreed numbers.
    sizes = [w - 1 for w in h[:cworld]]
    if h[cworld + _ERROR]:
        _raise_agreed(_global_input_error(local_error, input, sizes, sh), sh)
    assert x is not None and t is not None  # no rank failed, this one included
    strict_ = bool(h[cworld + _STRICT])  # strict anywhere: strict everywhere
    C = sum(sizes) if sh.split else width
    after = sig if sig is not None and sig.sizes == sizes else None  # planned for these widths
    one_d = x.dim() == 1
    positions = after.positions if after is not None else _positions_shape(x)
    # The global logits' stand-in for validation (a plan's is on the meta device: made here
    # wherever validation runs after all).
    x_standin = None if after is not None else _standin(_with_classes(positions, C, one_d), x.dtype, x.device)

    def differ(key: str) -> bool:
        i = base + 2 * _AGREE.index(key)
        return h[i] != -h[i + 1]

    pos_differ = h[cworld + _POS_DIFFER] if sh.outer else differ("positions")
    tgt_differ = h[cworld + _TGT_DIFFER] if sh.outer else differ("target")
    if differ("extras"):
        raise ParallelMismatchError(
            "vocab_parallel_cross_entropy: the ranks pass different extras (softcap, temperature, "
            "z_loss or return_stats).\n"
            f"Every rank of the {sh.where} ({_world(sh)} ranks) must transform its slice of the "
            "logits the same way, or the shards would belong to different losses.\n"
            "Fix: pass the same softcap, temperature, z_loss and return_stats on every rank (from "
            "the model config, not a per-rank value)"
        )
    if differ("config") or pos_differ or tgt_differ:
        # A rank whose own shapes fail validation says why (e.g. its target has the wrong batch size).
        err = None
        if p is None:
            if x_standin is None:
                x_standin = _standin(_with_classes(positions, C, one_d), x.dtype, x.device)
            try:
                _split_normalize(x_standin, t, weight, ignore, reduction_, eps)
            except Exception as e:
                err = e
        what = "positions" if pos_differ else "findings" if tgt_differ else "config"
        w_desc = "None" if not isinstance(weight, Tensor) else f"{fmt_shape(weight.shape)} {weight.dtype}"
        lines = _differences({
            "logits dtype": str(x.dtype), "reduction": repr(reduction_), "ignore_index": str(ignore),
            "label_smoothing": str(eps), "weight": w_desc,
            "grad mode": "enabled" if torch.is_grad_enabled() else "disabled",
            "autocast": (str(torch.get_autocast_dtype(x.device.type)) if torch.is_autocast_enabled(x.device.type)
                         else "off"),
            "positions shape": fmt_shape(_positions_shape(x)), "target": f"{fmt_shape(t.shape)} {t.dtype}",
        }, sh)
        _raise_agreed(err, sh, ParallelMismatchError(_mismatch_message(what, _world(sh), sh, lines)))
    tmax_, tnot = h[cworld + _TMAX], h[cworld + _TMIN]
    if (tmax_ != _NONE and tmax_ >= C) or (tnot != _NONE and ~tnot < 0):
        _raise_bad_labels(p.target if p is not None else t, C, ignore, sh)

    b_error: BaseException | None = None
    if after is not None and (weight is None or not _negative_classes(weight)):  # type: ignore[arg-type]
        # Planned: validation of these shapes, dtypes and options found nothing and converted
        # nothing; the one value it reads, negative weight entries, is read here as it reads it.
        p = Problem(after.x_standin, t, False, weight, ignore, eps, reduction_, C, after.out_dtype, [])
    elif p is None:
        # Plain shards: the class count is known now. Shapes and dtypes are agreed, so validation
        # fails on every rank or on none, except where it reads this rank's label values (float
        # labels with a fraction, ...): such an error waits for the agreement after the loss.
        if x_standin is None:
            x_standin = _standin(_with_classes(positions, C, one_d), x.dtype, x.device)
        try:
            p = _split_normalize(x_standin, t, weight, ignore, reduction_, eps)
            findings = p.findings
        except Exception as e:
            try:
                _split_normalize(x_standin, _standin_target(tuple(t.shape), t.dtype, t.device,
                                                            tuple(x_standin.shape)), weight, ignore, reduction_, eps)
            except Exception:
                # A failure of shapes or dtypes, agreed, so every rank is here: the message of the
                # real target (its hints read the labels), the lowest rank's on every rank.
                _raise_agreed(_slice_weight_error(e, weight, sizes, crank, C), sh)
            b_error = e

    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if after is not None:
        gshape, out_dtype = after.gshape, after.out_dtype
    else:
        if C == 1:
            findings = [f for f in findings if f.kind != "single-class"] + [checks_single_class(x_standin)]
        gshape = tuple(sh.input_shape) if sh.input_shape is not None else tuple(x_standin.shape)
        g_positions = gshape[1:] if len(gshape) == 1 else gshape[:1] + gshape[2:]
        out_dtype = p.out_dtype if p is not None else x.dtype
        if reduction_ == "mean" and math.prod(g_positions) == 0:
            findings = [*findings, checks.empty_mean_finding(
                Problem(_standin(gshape, x.dtype, x.device), t, False, None, ignore, eps, reduction_, C, out_dtype))]

    # Phase C: the loss.
    sharded = tuple(g for g, s in sh.outer if s)
    out: Tensor | None = None  # the result, where the loss's node reduces itself
    counts: Tensor | None = None  # the check counts on the device (the counts path below)
    zl_rows = lse = ent = correct = None
    plan: _Plan | None = None
    k = 0  # rows of the softmax check
    sums_k = 0  # rows whose sums ride in (3): where no rank's sample has a logit outside [0, 1]
    agreed: Tensor | None = None
    if not sh.split and ex is None:
        assert p is not None  # validated in phase A (DTensor calls)
        rows = dispatch.row_losses(name, p, False, inplace_backward, fused_grad)
        losses = rows.losses
        assert losses is not None  # the deferred path always returns per-position losses
        counts = torch.zeros(_COUNTS, dtype=torch.int64, device=x.device)
        counts[: F.SIZE] = torch.as_tensor(rows.scan.counts, device=x.device).to(torch.int64)
        counts[F.BAD_TARGET] = 0  # the head's label range decided bad labels, before the loss
        if any(dist.get_rank(g) for g, s in sh.outer if s):
            counts[F.WEIGHT_NEGATIVE] = 0  # the weight is the same everywhere: counted once
    else:
        R = math.prod(positions)
        k = min(R, K_SAMPLE) if C >= 2 else 0
        sums_k = k if not h[cworld + _SAMPLE_OUT] else 0
        group_ = sh.group if sh.split else _LOCAL
        if p is None:
            # This rank's label values failed a check: its hashes say so (-1, a value no hash
            # takes: the others' minimum shows it), and it idles through (2) and (3).
            flag = torch.zeros(2 * _NHASH, dtype=acc, device=x.device)
            flag[0] = -1
            sent, agreed = _idle_rounds(R, sums_k, eps, acc, x.device, [flag, -flag], group_,
                                        ex is not None and ex.return_stats)
            nbytes += sent
            losses = torch.zeros(positions, dtype=acc, device=x.device)
        else:
            tl = p.target if p.target.dtype == torch.int64 else p.target.long()
            ign = ignored if ignored is not None and p.target is rng_of else tl == ignore
            tf = tl if tl.dim() == 1 else tl.reshape(-1)
            ignf = ign if ign.dim() == 1 else ign.reshape(-1)
            salt = h[cworld + _SALT]
            # The labels hash as they are where ignore_index's residue mod P is no label's (or
            # it is a label): equal residues mean equal values. Else ignored positions become C.
            # In the MAX round's dtype, exactly (each hash is below 2**24): a cat of one dtype.
            raw = C + 1 < _P and C - _P <= ignore < C
            hl = _salted_hash(tf if raw else _label_values(tf, ignore, C, ignf), salt, 0).to(acc)
            if isinstance(weight, Tensor) and weight.numel():
                both = torch.cat([hl, _salted_hash(_bit_values(weight), salt, 1).to(acc)])
                agree = [both, -both]
            else:
                # No weight on any rank (agreed with the config): the label hashes stand in for
                # the weight's, so the weight's verdict is the labels' (raised after them).
                neg = -hl
                agree = [hl, hl, neg, neg]
            plan = _make_plan(p, group_, crank, sizes, C, acc, sums_k, name, agree, ex, xr, tf, ignf)
            if ex is None:
                # The node reduces its losses itself, except where other mesh dims hold other
                # positions (a reduction across them follows).
                plan.problem = None if sharded else p
                losses = _VocabParallelCE.apply(x, plan)
                if plan.problem is not None:
                    out, losses = losses, plan.losses
            else:
                losses, zl_rows, lse, ent, correct = _VocabParallelCE.apply(x, plan)
                if not ex.z_loss:
                    zl_rows = None
            nbytes += plan.bytes_sent
            agreed = plan.agreed

    across = (lambda v: _SumAcross.apply(v, sharded)) if sharded else None
    loss_stats = None
    if p is None:
        out = losses.sum().to(out_dtype) if reduction_ != "none" else losses.to(out_dtype)
    elif out is not None:
        pass  # reduced in the loss's node
    elif ex is None:
        out = _reduction.reduce_across(losses, p, across, None if plan is None else plan.valid)
    else:
        # The z-loss term is reduced over the counted positions, never by the class weights:
        # a "mean" divides by the number of non-ignored positions.
        pacc = replace(p, out_dtype=acc)
        ce_red = _reduction.reduce_across(losses, pacc, across)
        zl_red = (_reduction.reduce_across(zl_rows, replace(pacc, weight=None, label_smoothing=0.0), across)
                  if zl_rows is not None else
                  torch.zeros(positions if reduction_ == "none" else (), dtype=acc, device=x.device))
        out = (ce_red if zl_rows is None else ce_red + zl_red).to(p.out_dtype)
        if zl_rows is not None:
            losses = losses + zl_rows  # what the value checks judge, per position
        if ex.return_stats:
            assert correct is not None and lse is not None and ent is not None  # stats computed
            valid = (p.target != ignore).reshape(correct.shape)
            hits = torch.stack([(correct & valid).sum(dtype=torch.float32), valid.sum(dtype=torch.float32)])
            for g in sharded:  # the positions of the other mesh dims (no gradient: a statistic)
                hits = _all_reduce(hits, "sum", g)
            loss_stats = X.LossStats(lse.float(), ent.float(), zl_red.detach().float(), hits[0] / hits[1])
    if stats is not None:
        stats["bytes"] = nbytes

    # Phase D: what the loss found, the same on every rank, read on the host in one go (with the
    # head: two reads per call).
    overflow = None if p is None or (bound := F.overflow_bound(p.out_dtype)) == math.inf else bound
    if counts is None and not sh.outer:
        # One rank group: the agreed hashes, whether the output is finite (NaN or inf in a sum
        # of it; for "sum" and "mean" a nonfinite position's loss makes the output nonfinite
        # too) and the sampled rows that look softmaxed, as floats (exact: hashes below 2**24,
        # at most 64 rows); the per-position counts are taken only where the output is not
        # finite (a finding follows: one more read).
        assert agreed is not None  # filled by the loss's MAX round
        outd = out.detach()
        parts = [agreed, (outd if outd.dim() == 0 else outd.sum(dtype=acc)).view(1)]
        if sums_k and plan is not None:
            parts.append(plan.softmax_like.view(1))
        over = overflow is not None and plan is not None
        if over:  # half-precision results: positions beyond the dtype's range (see _overflowed)
            parts.append(_overflowed(losses, plan.valid, overflow).to(acc).view(1))
        a = torch.cat(parts).tolist()
        host = [0] * _COUNTS
        host[_X_BERROR], host[_X_LABELS], host[_X_WEIGHT] = _verdicts(a)
        if k:
            host[F.SOFTMAX_CHECKED] = k
            host[F.SOFTMAX_LIKE] = int(a[_AGREE_FLOATS + 1]) if sums_k else 0
        if over:
            host[F.OVERFLOW] = int(a[-1])
        if p is not None and plan is not None and not math.isfinite(a[_AGREE_FLOATS]) and not any(
                host[_X_BERROR : _X_WEIGHT + 1]):
            host[F.NONFINITE_ROW], host[_X_OUT_BAD] = torch.stack([
                (~torch.isfinite(losses.detach()).reshape(-1) & plan.valid).sum(),
                (~torch.isfinite(outd)).any()]).tolist()
    else:
        if counts is None:
            # Over several mesh dims: each rank's verdicts, summed over the other dims.
            assert agreed is not None
            counts = torch.zeros(_COUNTS, dtype=torch.int64, device=x.device)
            half = _AGREE_FLOATS // 2
            differ = (agreed[:half] + agreed[half:]) != 0
            counts[_X_BERROR : _X_WEIGHT + 1] = torch.cat([agreed[half : half + 1] > 0,
                                                           differ.view(2, _NHASH).any(1)])
            if k:
                counts[F.SOFTMAX_CHECKED] = k
                if sums_k and plan is not None:
                    counts[F.SOFTMAX_LIKE] = plan.softmax_like
            if plan is not None:
                counts[F.NONFINITE_ROW] = (~torch.isfinite(losses.detach()).reshape(-1) & plan.valid).sum()
                if overflow is not None:
                    counts[F.OVERFLOW] = _overflowed(losses, plan.valid, overflow)
        counts[_X_OUT_BAD] = (~torch.isfinite(out.detach())).any()
        if sh.outer:
            counts = _reduce_outer(counts, sh, "sum")
        host = counts.tolist()
    if host[_X_BERROR]:
        _raise_agreed(b_error, sh)
    if host[_X_LABELS]:
        raise ParallelMismatchError(_mismatch_message("targets", _world(sh), sh))
    if host[_X_WEIGHT]:
        raise ParallelMismatchError(_mismatch_message("weight", _world(sh), sh))
    assert p is not None  # b_error raised above
    own = sharding is None  # called as vocab_parallel_cross_entropy (else: DTensor logits)
    for f in findings:
        report(replace(f, message=reword(f.message)) if own else f, strict_, owner)
    softmaxed = host[F.SOFTMAX_CHECKED] and host[F.SOFTMAX_LIKE] == host[F.SOFTMAX_CHECKED]
    rowwise = any(host[i] for i in _ROW_COUNTS) or host[_X_OUT_BAD]
    result = out if loss_stats is None else (out, loss_stats)
    if not (rowwise or softmaxed or host[F.WEIGHT_NEGATIVE]):
        if key is not None and after is None and not findings and p.target is t and p.weight is weight and (
                name == "torch" or x.is_cuda):
            # The signature's first clean call (or its first with these widths): plan it.
            _store_plan(key, _Sig(sh, crank, cworld, device, width, name, reduction_, eps, backend_, ex, vals,
                                  sizes, positions, x_standin, gshape, out_dtype))
        return result  # the clean call
    tg, lg = p.target, losses.detach()
    if rowwise and sh.gather is not None and sharded:
        # Messages name global positions: sharded rows are gathered first (every rank is here:
        # the counts are agreed).
        tg = sh.gather(p.target, "input" if p.prob else "positions")
        lg = sh.gather(lg, "positions")
    gp = Problem(input=_standin(gshape, x.dtype, x.device), target=tg, prob=p.prob, weight=p.weight,
                 ignore_index=ignore, label_smoothing=eps, reduction=reduction_, num_classes=C,
                 out_dtype=p.out_dtype, findings=findings)
    scan = checks.Scan(host[: F.SIZE], out_finite=not host[_X_OUT_BAD])
    checks.resolve(scan, gp, lg, out, not host[_X_OUT_BAD], strict_, owner, have_logits=False,
                   device_type=x.device.type, note="" if ex is None else ex.note(), op=_OP if own else "")
    return result


def _verdicts(a: list[float]) -> tuple[int, int, int]:
    """(a rank's label values failed a check, the labels differ, the weights differ) from the
    agreed hashes: MAX of (+h, -h) gives max(h) and -min(h); the ranks agree where they cancel.
    A rank whose label values failed sends -1 as its first label hash (a hash is never
    negative): the first -h slot then holds a positive value."""
    half = _AGREE_FLOATS // 2
    differ = [a[j] + a[half + j] != 0 for j in range(half)]
    return int(a[half] > 0), int(any(differ[:_NHASH])), int(any(differ[_NHASH:]))


def _overflowed(losses: Tensor, valid: Tensor, bound: float) -> Tensor:
    """Counted positions whose float32 loss is finite but beyond the half-precision result's
    range: inf in the result (and in stock torch's, which computes it in that dtype), a finding of
    its own, not a reduction that overflowed."""
    la = losses.detach().reshape(-1)
    return (torch.isfinite(la) & (la.abs() >= bound) & valid).sum()


def _make_plan(p: Problem, group: object | None, crank: int, sizes: list[int], C: int, acc: torch.dtype,
               sums_k: int, name: str, agree: list[Tensor], ex: X.Extras | None, rows: Tensor | None,
               tf: Tensor, ignored: Tensor) -> _Plan:
    """``tf``: the labels, flat, int64; ``ignored``: ``tf == ignore_index``."""
    offset = sum(sizes[:crank])
    C_local = sizes[crank]
    valid = ~ignored
    if C_local == C:  # every class on this rank (offset 0): every valid label is owned here
        local_idx = tf.unsqueeze(1).clamp(0, max(C - 1, 0))
        owned, not_owned = valid, ignored
    elif C_local == 0:
        local_idx = tf.unsqueeze(1).clamp(0, 0)
        owned = torch.zeros_like(valid)
        not_owned = ~owned
    else:
        li = tf - offset if offset else tf
        idx = li.clamp(0, C_local - 1)
        # 0 <= label - offset < C_local; at ignored positions it may hold either way: every use
        # of it there is masked (their loss, gradient and statistics are zeroed after).
        owned = idx == li
        not_owned = ~owned
        local_idx = idx.unsqueeze(1)
    w_y = w_local = None
    w_sum: float | Tensor = float(C)
    w_local_sum: float | Tensor = float(C_local)
    if p.weight is not None:
        # A copy: backward reads w_local, and the caller may update its weight in place before
        # backward (forward's values then stay; stock refuses that backward, nothing silent).
        wa = p.weight.to(acc, copy=True)
        w_y = torch.where(valid, wa.gather(0, tf.clamp(0, C - 1)), 0.0)
        w_local = wa[offset : offset + C_local]
        w_sum, w_local_sum = wa.sum(), w_local.sum()  # 0-d tensors: no host read
    return _Plan(group, valid, owned, local_idx, w_y, w_local, w_sum, w_local_sum,
                 p.label_smoothing, C, acc, sums_k, name, agree, ex, tf if ex is not None else None, offset,
                 ignored=ignored, not_owned=not_owned, rows=rows,
                 tol=F.SOFTMAX_SUM_TOL[str(p.input.dtype).removeprefix("torch.")] if sums_k else 0.0)


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


def _differences(mine: dict[str, str], sh: Sharding) -> list[str]:
    """Lines naming each metadata field the ranks of the class group disagree on, with every
    rank's value (an all-gather: called where the agreed head says they differ, so on every rank).
    Empty for DTensor calls over several mesh dims (the fingerprints span other groups there)."""
    if sh.outer or not sh.split:
        return []
    got: list[dict[str, str]] = [{} for _ in range(dist.get_world_size(sh.group))]
    dist.all_gather_object(got, mine, group=sh.group)  # type: ignore[arg-type]
    lines = []
    for key in mine:
        ranks_of: dict[str, list[int]] = {}
        for r, d in enumerate(got):
            ranks_of.setdefault(d.get(key, "?"), []).append(r)
        if len(ranks_of) > 1:
            lines.append(f"  {key}: " + "; ".join(
                f"{v} on rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}" for v, rs in ranks_of.items()))
    return lines


def _mismatch_message(what: str, world: int, sh: Sharding | None = None, lines: list[str] | None = None) -> str:
    detail = {
        "positions": "the shapes of the positions (every dim of the logits but the classes) differ "
                     "between ranks",
        "config": "the ranks disagree on the logits' dtype, reduction, ignore_index, "
                  "label_smoothing, the class weight's shape or dtype, grad mode or autocast",
        "weight": "the ranks pass different class weights (the weight is the full (C,) tensor, the "
                  "same on every rank)",
        "findings": "the ranks' targets differ in shape or dtype",
        "targets": "the labels differ between ranks (each rank must pass the same class indices; "
                   "they index the global classes)",
    }[what]
    where = sh.where if sh is not None else "vocab-parallel group"
    named = "".join(f"{line}\n" for line in lines or ())
    if what == "config":
        return (
            f"vocab_parallel_cross_entropy: {detail}.\n{named}"
            f"Every rank of the {where} ({world} ranks) computes one loss of the gathered logits, "
            "so every rank must pass the same arguments and run in the same mode.\n"
            "Fix: pass the same arguments on every rank (from the shared config, not a per-rank "
            "value), and wrap the call in torch.no_grad() / autocast on every rank or on none"
        )
    return (
        f"vocab_parallel_cross_entropy: {detail}.\n{named}"
        f"Every rank of the {where} ({world} ranks) must see the same rows, labels and "
        "arguments; only the classes are sharded. Different values usually mean the data loader is "
        "sharded over the tensor-parallel ranks as if they were data-parallel.\n"
        "Fix: give every rank of a tensor-parallel group the same batch (broadcast it, or seed the "
        "sampler by data-parallel rank only)"
    )


def _raise_bad_labels(t: Tensor, C: int, ignore_index: int, sh: Sharding) -> None:
    """Out-of-range labels somewhere: every rank raises the same message, on the global labels
    where positions are sharded, else the message of the lowest rank that has them."""
    if t.dtype == torch.uint64:
        t = t.view(torch.int64)
    elif t.is_floating_point():
        t = torch.where(torch.isfinite(t) & (t == t.round()), t, float(ignore_index)).long()
    if sh.gather is not None and any(s for _, s in sh.outer):
        full = sh.gather(t, "positions")
        raise TargetOutOfRangeError(checks.out_of_range_message(full, C, ignore_index, full.device.type))
    mine = None
    if checks.count_bad_targets(t, C, ignore_index):
        mine = checks.out_of_range_message(t, C, ignore_index, t.device.type)
    first = _first(mine, sh)
    assert first is not None  # the agreed label range says some rank has a bad label
    _, rank, text, everywhere = first
    assert isinstance(text, str)
    world = _world(sh)
    if world > 1 and sh.split and not sh.outer and not everywhere:
        text += f"\n(found in the labels of rank {rank} of {world})"
    raise TargetOutOfRangeError(text)

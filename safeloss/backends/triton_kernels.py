"""Triton kernels for cross-entropy: per-position loss, log-sum-exp and findings in one pass.

Imported lazily by ``triton_backend`` (never at ``import safeloss`` time): ``triton.jit`` decides at
decoration time whether to compile for the GPU or to run under the interpreter (TRITON_INTERPRET=1).

Layout seen by every kernel
---------------------------
The launcher collapses the "positions" (every dim but the class dim) into at most three dims
(S0, S1, S2) with one stride per tensor and dim, plus one class stride per tensor. Nothing is
copied: (N, C), (C, N)-transposed, (N, C, H, W) and channels-last views are all read in place.
A program owns one (i0, i1) pair and BLOCK_P consecutive i2 positions, and walks the classes in
BLOCK_C-wide column blocks, so a tile is [BLOCK_P, BLOCK_C]:
  * LM-style rows (class stride 1): BLOCK_P = 1, BLOCK_C up to 4096 (rows under 1024 classes are
    packed several per program); loads are contiguous along the classes.
  * NCHW segmentation (class stride H*W, position stride 1): BLOCK_P = 128 consecutive pixels x 16
    classes per step; loads are contiguous along the pixels (coalesced), the class loop is strided.
(Tile sizes live in ``triton_backend._tiles``, chosen from ptxas register reports: see
benchmarks/aot_gate.py and benchmarks/results/aot-gate/.)
Offsets are int64 only when a tensor's offsets can pass int32 (``I64``, chosen by the launcher from
shapes and strides: N*C > 2^31 elements is normal for LM heads); otherwise int32, which halves
the registers that each position's addresses take (several positions per thread in multi-row tiles).

Math (per position, x = logits in fp32, w = class weights or 1, eps = label smoothing)
-----------------------------------------------------------------------------------------
Online softmax: running max m and s = sum exp(x - m), rescaled by exp(m_old - m_new) when the max
grows; exp2 with a log2(e) factor (the hardware instruction). lse = m + log(s).
Weighted sums needed by smoothing / probability targets, sum_c k_c (lse - x_c) with k_c = w_c
(smoothing) or k_c = w_c y'_c (probability targets), are accumulated *relative to the running max*
(acc = sum k_c (x_c - m), shifted by -(m_new - m_old) * sum k when the max grows) and finished as
  sum_c k_c (lse - x_c) = K log(s) - acc,  K = sum_c k_c,
so nothing of size |lse| * K cancels (logits around 1e3 with 262k classes stay exact in fp32).
Index targets:  loss = (1-eps) w_y (lse - x_y) + (eps/C) (W log(s) - acc)          (W = sum w)
Prob targets:   y' = (1-eps) y + eps/C,  loss = Wy log(s) - acc                      (Wy = sum w y')
Gradient (p = softmax = exp(x - lse)):
  index: d loss/d x_c = [(1-eps) w_y + (eps/C) W] p_c - (1-eps) w_y [c == y] - (eps/C) w_c
  prob:  d loss/d x_c = Wy p_c - w_c y'_c,     d loss/d y_c = (1-eps) w_c (lse - x_c)

Memory traffic (s = bytes per logit)
------------------------------------
forward: reads the logits once (s per element), writes 4 bytes of loss + 4 of lse per position.
backward: reads the logits once and writes the gradient once (2s) from the saved lse: 3s total.
fused (``FUSED``): when a row fits one block it stays in registers, so forward reads once and writes
the unscaled gradient once (2s); the backward only rescales rows whose upstream gradient is not 1
(``ce_scale_kernel`` exits early otherwise). Longer rows are streamed a second time (3s).
Findings are int32 counters bumped with integer atomics (deterministic), one per program and only
when the program has something to count.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)

# Slots of safeloss._flags (duplicated as constexprs because jit code cannot read module globals
# that are not constexprs; test_triton_kernels checks they agree).
BAD_TARGET = tl.constexpr(0)
NONFINITE_ROW = tl.constexpr(1)
SOFTMAX_LIKE = tl.constexpr(2)
SOFTMAX_CHECKED = tl.constexpr(3)
PROB_NEGATIVE = tl.constexpr(4)
PROB_BAD_SUM = tl.constexpr(5)
WEIGHT_NEGATIVE = tl.constexpr(6)
OVERFLOW = tl.constexpr(7)
N_COUNTS = tl.constexpr(8)  # the slots above: one [BLOCK_P, N_COUNTS] tile counts them all

# do_not_specialize below: scalar arguments that Triton must not specialise on (a launch compiles one variant per value
# equal to 1 and per divisibility by 16 of every integer argument): these only index programs,
# the softmax check's sample and the per-position upstream gradient, where a constant buys nothing,
# and every new batch size would otherwise compile (and ship, in benchmarks/aot_gate.py's table)
# another variant. Strides, C and S2 stay specialised: class stride 1 and aligned rows are what
# vectorises the loads.


@triton.jit
def _offset(v, I64: tl.constexpr):
    """``v`` in the offset type: int64 when a tensor's offsets can pass int32, else int32."""
    if I64:
        return v.to(tl.int64)
    else:
        return v.to(tl.int32)


@triton.jit
def _positions(S1, S2, n_pblocks, BLOCK_P: tl.constexpr, I64: tl.constexpr):
    """Program id -> (i0, i1) scalars, a block of i2 positions, its mask and flat position ids
    (in the offset type)."""
    pid = tl.program_id(0)
    o = pid // n_pblocks  # which (i0, i1) pair
    b = pid - o * n_pblocks  # which block of i2
    o = _offset(o, I64)
    i0 = o // S1
    i1 = o - i0 * S1
    i2 = _offset(b, I64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = i2 < S2
    pflat = o * S2 + i2  # index into the contiguous (S0*S1*S2,) loss / lse buffers
    return pid, i0, i1, i2, pmask, pflat


@triton.jit
def _sampled(pflat, pmask, n_sample, n_total):
    """Whether each position is in the softmax check's sample, the same positions as every
    backend's (safeloss._flags): p is sampled iff i * n_total // n_sample == p for
    i = ceil(p * n_sample / n_total) (the launcher picks I64 when n_total * (n_sample + 1) passes
    int32)."""
    i_s = (pflat * n_sample + n_total - 1) // n_total
    return pmask & (i_s < n_sample) & ((i_s * n_total) // n_sample == pflat)


@triton.jit
def _count(flags_ptr, slot, hit):
    """Add the number of True in ``hit`` to flags[slot]; no atomic at all when it is zero. A
    predicated atomic, not a branch around it: ptxas kept a live register pair on the stack
    across the branch (4-16 bytes of spill at 48-168 registers; benchmarks/aot_gate.py)."""
    n = tl.sum(hit.to(tl.int32), axis=0)
    tl.atomic_add(flags_ptr + slot, n, mask=n > 0, sem="relaxed")


@triton.jit
def _hit(slots, slot, hit):
    """``hit`` (a [BLOCK_P] mask) as column ``slot`` of a [BLOCK_P, N_COUNTS] tile of counts."""
    return (slots[None, :] == slot) & hit[:, None]


@triton.jit
def _class_weights(w_ptr, cols, cmask, NEED_W: tl.constexpr):
    """Per-column weights as a [1, BLOCK_C] row (0 on masked columns). Only loaded when a formula
    needs w_c per element (smoothing, probability targets): otherwise w[y] alone is read."""
    if NEED_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = cmask.to(tl.float32)
    return w[None, :]


@triton.jit
def _index_target(t_ptr, trow, pmask, ignore_index, C, I64: tl.constexpr):
    """Load index targets (any int dtype) and classify them (in int64: any label value is
    judged); the label comes back in the offset type, and is never an address unless valid."""
    y = tl.load(t_ptr + trow, mask=pmask, other=0).to(tl.int64)
    ignored = y == ignore_index
    in_range = (y >= 0) & (y < C)
    use = in_range & (ignored == 0) & pmask
    bad = (in_range == 0) & (ignored == 0) & pmask
    y_safe = _offset(tl.where(use, y, 0), I64)
    return y_safe, use, bad


@triton.jit
def _tanh(u):
    """tanh in fp32 from exp2 (libdevice is not available to the interpreter, and one formula
    runs in both): (1 - e) / (1 + e) with e = exp(-2|u|) where that has no cancellation, an odd
    Taylor polynomial below |u| = 0.3 (its first omitted term, 1382/155925 |u|^11, is under
    1e-8 |u| there). Measured through the interpreter (exact exp2): 2e-7 relative at worst (1.7
    fp32 eps); the GPU's approximate exp2 (2 ulp) can add about 1e-6 just above |u| = 0.3.
    +-inf -> +-1, NaN -> NaN."""
    a = tl.abs(u)
    e = tl.exp2(a * (-2.0 * LOG2E))
    big = (1.0 - e) / (1.0 + e)
    u2 = u * u
    small = a * (1.0 + u2 * (-0.3333333333333333 + u2 * (0.13333333333333333 + u2 * (
        -0.05396825396825397 + u2 * 0.021869488536155203))))
    t = tl.where(a < 0.3, small, big)  # NaN compares False: big, NaN
    return tl.where(u < 0, -t, t)


@triton.jit
def _xform(x, cap_t, inv_cap, XFORM: tl.constexpr):
    """The capped, scaled logits zt of raw fp32 logits x (``core.extras.transform``): XFORM 1,
    a temperature alone: x * (1 / T); XFORM 2, a softcap s: (s / T) * tanh(x / s)."""
    if XFORM == 1:
        x = x * cap_t
    elif XFORM == 2:
        x = cap_t * _tanh(x * inv_cap)
    return x


@triton.jit
def _dxform(x, cap_t, inv_cap, inv_t, XFORM: tl.constexpr):
    """(zt, d zt / d x) of raw fp32 logits x, recomputed in the pass that needs them: 1 / T, or
    (1 - tanh(x / s)^2) / T with a softcap."""
    if XFORM == 2:
        th = _tanh(x * inv_cap)
        return cap_t * th, (1.0 - th * th) * inv_t
    else:
        return x * cap_t, inv_t


@triton.jit
def _z_loss(zcoef, lse_v):
    """The z-loss term of a position, zcoef * lse^2."""
    return zcoef * lse_v * lse_v


@triton.jit
def _z_slope(zcoef, lse_v):
    """d (z-loss term) / d lse = 2 zcoef lse: times softmax, its gradient by the logits."""
    return (2.0 * zcoef) * lse_v


@triton.jit
def _grad_tile(x, lse, a, cols, y, wy_hot, smooth_c, w, wys, PROB: tl.constexpr, SMOOTH: tl.constexpr):
    """Unscaled d loss / d x for one tile (see module docstring); a = coefficient of p_c."""
    p = tl.exp2((x - lse[:, None]) * LOG2E)
    d = a[:, None] * p
    if PROB:
        d = d - wys
    else:
        d = d - tl.where(cols[None, :] == y[:, None], wy_hot[:, None], 0.0)
        if SMOOTH:
            d = d - smooth_c * w
    return d


@triton.jit(do_not_specialize=["S1", "n_pblocks", "n_total", "n_sample", "n_checked", "ignore_index"])
def ce_fwd_kernel(
    x_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, wy_ptr, dx_ptr, flags_ptr, zl_ptr, ent_ptr, hit_ptr,
    S1, S2, C, n_pblocks, n_total, n_sample, n_checked,
    xs0, xs1, xs2, xsc,
    ts0, ts1, ts2, tsc,
    ds0, ds1, ds2, dsc,
    ignore_index, eps, softmax_tol, prob_tol, out_max,
    cap_t, inv_cap, inv_t, tq, zcoef,
    PROB: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, NEED_W: tl.constexpr,
    CHECK_SOFTMAX: tl.constexpr, FUSED: tl.constexpr, Y_ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr, EARLY_OUT: tl.constexpr,
    I64: tl.constexpr, XFORM: tl.constexpr, ZLOSS: tl.constexpr, STATS: tl.constexpr,
):  # fmt: skip
    pid, i0, i1, i2, pmask, pflat = _positions(S1, S2, n_pblocks, BLOCK_P, I64)
    xrow = i0 * xs0 + i1 * xs1 + i2 * xs2
    trow = i0 * ts0 + i1 * ts1 + i2 * ts2
    smooth_c = eps / C
    keep = 1.0 - eps

    ninf = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    zero = tl.zeros((BLOCK_P,), tl.float32)
    m = ninf  # running max
    s = zero  # sum exp(x - m)
    acc = zero  # sum k_c (x_c - m), k = w (smoothing) or w*y' (prob)
    ksum = zero  # sum k_c
    mn = tl.full((BLOCK_P,), float("inf"), tl.float32)  # softmax check: min logit
    xsum = zero  # softmax check: plain sum of logits
    ymin = tl.full((BLOCK_P,), float("inf"), Y_ACC)  # prob check: min target entry
    ysum = tl.zeros((BLOCK_P,), Y_ACC)  # prob check: sum of raw target entries
    x_keep = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)  # the row, when it fits one block
    # The softmax check's sample (see _sampled).
    if EARLY_OUT or not STATS:
        sampled = _sampled(pflat, pmask, n_sample, n_total)
    wys_keep = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    if XFORM > 0:
        if CHECK_SOFTMAX:
            if not (STATS and not PROB):
                rmax = ninf  # max of the raw logits (the softmax check judges those)
    if STATS:
        ea = zero  # sum exp(zt - m) (zt - m): entropy = log(s) - ea / s
        if not PROB:
            # Argmax of the raw logits as (key, code): key = the logit with NaN as +inf, code =
            # its column, minus C for a NaN (so a NaN wins a tie with +inf, and the lowest column
            # wins among equals). The running key is also the raw max of the softmax check.
            akey = ninf
            acode = tl.zeros((BLOCK_P,), tl.int32)
    # One block covers the row unless EARLY_OUT: then the loop's one trip is known at compile
    # time and the loop goes away (ptxas kept a register on the stack across the exit of a
    # loop of runtime trip count; benchmarks/aot_gate.py).
    if EARLY_OUT:
        c_end = C
    else:
        c_end = BLOCK_C
    for c0 in range(0, c_end, BLOCK_C):
        cols = c0 + _offset(tl.arange(0, BLOCK_C), I64)
        cmask = cols < C
        mask = pmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + (xrow[:, None] + cols[None, :] * xsc), mask=mask, other=float("-inf"))
        x = x.to(tl.float32)  # native dtype in memory, fp32 in registers
        if STATS:
            if not PROB:
                # torch.argmax's answer on the raw logits (their order is the capped, scaled
                # ones', without the ties a saturated tanh adds): the lowest index of the
                # maximum, a NaN above everything. Blocks come in column order: on a tie the
                # earlier block keeps it.
                isn = x != x
                key = tl.where(isn, float("inf"), x)
                bkey = tl.max(key, axis=1)
                code = tl.where(isn, cols[None, :] - C, cols[None, :]).to(tl.int32)  # |code| < C
                bcode = tl.min(tl.where((key == bkey[:, None]) & mask, code, C), axis=1)
                take = (bkey > akey) | ((bkey == akey) & (bcode < 0) & (acode >= 0))
                akey = tl.where(take, bkey, akey)
                acode = tl.where(take, bcode, acode)
        if XFORM > 0:
            if CHECK_SOFTMAX:
                xr = x
                if not (STATS and not PROB):
                    rmax = tl.maximum(rmax, tl.max(x, axis=1))
            x = _xform(x, cap_t, inv_cap, XFORM)
            if XFORM == 2:
                x = tl.where(mask, x, float("-inf"))  # the cap maps -inf padding to -s / T
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # A row that is -inf so far keeps reference 0 so that (-inf) - (-inf) never makes a NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        xd = x - m_ref[:, None]  # -inf on masked lanes -> exp2 gives 0
        if STATS:
            # Entropy online, relative to the running max as s: when the max grows by d, every
            # term scales by r = exp(-d) and its (zt - m) drops by d.
            r = tl.exp2((m - m_ref) * LOG2E)
            ex = tl.exp2(xd * LOG2E)
            d_up = tl.where(m == float("-inf"), 0.0, m_ref - m)  # s == 0 while m == -inf
            ea = r * (ea - d_up * s) + tl.sum(ex * tl.where(ex > 0.0, xd, 0.0), axis=1)  # 0, not 0 * -inf
            s = s * r + tl.sum(ex, axis=1)
        else:
            s = s * tl.exp2((m - m_ref) * LOG2E) + tl.sum(tl.exp2(xd * LOG2E), axis=1)
        if PROB or SMOOTH:
            w = _class_weights(w_ptr, cols, cmask, NEED_W)
            if PROB:
                yraw = tl.load(t_ptr + (trow[:, None] + cols[None, :] * tsc), mask=mask, other=0.0)
                ys = tl.where(mask, yraw.to(tl.float32) * keep + smooth_c, 0.0)
                k = w * ys
                ya = yraw.to(Y_ACC)
                ymin = tl.minimum(ymin, tl.min(tl.where(mask, ya, float("inf")), axis=1))
                ysum += tl.sum(ya, axis=1)
                if SINGLE:
                    wys_keep = k
            else:
                k = tl.where(mask, w, 0.0)
            shift = tl.where(m == float("-inf"), 0.0, m_ref - m)  # ksum == 0 while m == -inf
            acc = acc - shift * ksum + tl.sum(k * tl.where(mask, xd, 0.0), axis=1)
            ksum += tl.sum(k, axis=1)
        if CHECK_SOFTMAX:
            if XFORM > 0:
                xc = xr  # the raw logits: a softmax output passed through a cap is still one
                if STATS and not PROB:
                    mc = akey  # NaN as +inf: a row with NaN is no softmax output either way
                else:
                    mc = rmax
            else:
                xc = x
                mc = m_new
            if EARLY_OUT:
                # Rows of several column blocks: a position stays a softmax-output candidate only
                # while every value seen is in [0, 1]; the max is already known, the min only
                # through the previous block. Real logits fail in the first block, after which the
                # two extra reductions per element are skipped for the rest of the row. Measured on
                # an H200 (benchmarks/results/): check on / off 1.00x for LM rows; segmentation
                # (C=21, two blocks) 0.61 ms fwd+bwd against 0.75 ms when always reducing.
                live = sampled & (mn >= 0.0) & (mc <= 1.0)
                if tl.max(live.to(tl.int32), axis=0) > 0:
                    mn = tl.minimum(mn, tl.min(tl.where(mask, xc, float("inf")), axis=1))
                    xsum += tl.sum(tl.where(mask, xc, 0.0), axis=1)
            else:
                # One block per row: there is nothing to skip, and "is any position of the tile
                # still a candidate" would only add a cross-warp reduction (measured: 4096 x 10
                # classification 29 us fwd+bwd instead of 32 us).
                mn = tl.minimum(mn, tl.min(tl.where(mask, xc, float("inf")), axis=1))
                xsum += tl.sum(tl.where(mask, xc, 0.0), axis=1)
        if SINGLE:
            x_keep = x
        m = m_new

    m = tl.where(pmask, m, 0.0)  # padding positions: keep them finite (never stored)
    logs = tl.log(tl.where(pmask, s, 1.0))
    lse = m + logs
    if PROB:
        loss = ksum * logs - acc
        active = pmask
        a = ksum
        y = _offset(tl.zeros((BLOCK_P,), tl.int32), I64)
        wy_hot = zero
        tl.store(wy_ptr + pflat, ksum, mask=pmask)
    else:
        y, active, bad = _index_target(t_ptr, trow, pmask, ignore_index, C, I64)
        x_y = tl.load(x_ptr + (xrow + y * xsc), mask=active, other=0.0).to(tl.float32)
        if XFORM > 0:
            x_y = _xform(x_y, cap_t, inv_cap, XFORM)
        if HAS_WEIGHT:
            w_y = tl.load(w_ptr + y, mask=active, other=0.0).to(tl.float32)
        else:
            w_y = tl.full((BLOCK_P,), 1.0, tl.float32)
        wy_hot = keep * w_y
        loss = wy_hot * ((m - x_y) + logs)
        a = wy_hot
        if SMOOTH:
            loss += smooth_c * (ksum * logs - acc)
            a += smooth_c * ksum
        loss = tl.where(active, loss, tl.where(bad, float("nan"), 0.0))
    tl.store(loss_ptr + pflat, loss, mask=pmask)
    tl.store(lse_ptr + pflat, lse, mask=pmask)
    tot = loss  # the position's whole loss, as the findings judge it
    if ZLOSS:
        # z-loss on the capped, scaled logits' lse, at counted positions; reduced by the caller
        # (its mean divides by the count of positions, the cross-entropy's by the weights).
        zl = tl.where(active, _z_loss(zcoef, lse), 0.0)
        tl.store(zl_ptr + pflat, zl, mask=pmask)
        tot = loss + zl
        a += _z_slope(zcoef, lse)  # fused gradient: d zl / d zt = 2 zcoef lse p
    if STATS:
        tl.store(ent_ptr + pflat, logs - ea / tl.where(pmask, s, 1.0), mask=pmask)
        if not PROB:
            amax_col = tl.where(acode < 0, acode + C, acode)
            tl.store(hit_ptr + pflat, (active & (amax_col == y)).to(tl.int8), mask=pmask)

    if FUSED:
        # Unscaled gradient of this position's loss; ce_scale_kernel applies the upstream gradient.
        # Before the findings below: the row's tile (SINGLE) and addresses die here instead of
        # living through the counters' branches (ptxas spilled an address across them).
        drow = i0 * ds0 + i1 * ds1 + i2 * ds2
        if SINGLE:
            cols = tl.arange(0, BLOCK_C)
            cmask = cols < C
            mask = pmask[:, None] & cmask[None, :]
            w = _class_weights(w_ptr, cols, cmask, NEED_W)
            d = _grad_tile(x_keep, lse, a, cols, y, wy_hot, smooth_c, w, wys_keep, PROB, SMOOTH)
            if XFORM == 1:
                d = d * inv_t
            elif XFORM == 2:
                d = d * (inv_t - tq * x_keep * x_keep)  # (1 - tanh^2) / T from the kept zt
            d = tl.where(active[:, None], d, 0.0)
            dptr = dx_ptr + (drow[:, None] + _offset(cols, I64)[None, :] * dsc)
            tl.store(dptr, d.to(dx_ptr.dtype.element_ty), mask=mask)
        else:
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + _offset(tl.arange(0, BLOCK_C), I64)
                cmask = cols < C
                mask = pmask[:, None] & cmask[None, :]
                x = tl.load(x_ptr + (xrow[:, None] + cols[None, :] * xsc), mask=mask, other=0.0)
                x = x.to(tl.float32)
                if XFORM > 0:
                    x, dzx = _dxform(x, cap_t, inv_cap, inv_t, XFORM)
                w = _class_weights(w_ptr, cols, cmask, NEED_W)
                wys = w
                if PROB:
                    yraw = tl.load(t_ptr + (trow[:, None] + cols[None, :] * tsc), mask=mask, other=0.0)
                    wys = w * (yraw.to(tl.float32) * keep + smooth_c)
                d = _grad_tile(x, lse, a, cols, y, wy_hot, smooth_c, w, wys, PROB, SMOOTH)
                if XFORM > 0:
                    d = d * dzx
                d = tl.where(active[:, None], d, 0.0)
                dptr = dx_ptr + (drow[:, None] + cols[None, :] * dsc)
                tl.store(dptr, d.to(dx_ptr.dtype.element_ty), mask=mask)

    # The findings of the tile's positions, counted in one reduction and one predicated atomic
    # per slot (a reduction and a branch per finding left ptxas juggling, and spilling, registers).
    slots = tl.arange(0, N_COUNTS)
    finite = tl.abs(tot) < float("inf")  # z-loss included
    hits = _hit(slots, NONFINITE_ROW, active & (finite == 0))
    # Finite here (fp32) but rounding to inf in the output dtype (out_max: the smallest magnitude
    # that does; inf when the output is fp32 or wider).
    hits = hits | _hit(slots, OVERFLOW, active & finite & (tl.abs(tot) >= out_max))
    if not PROB:
        hits = hits | _hit(slots, BAD_TARGET, bad)
    if CHECK_SOFTMAX:
        if STATS and not EARLY_OUT:
            # One block per row: not needed in the loop, so not held across it (ptxas spilled
            # a predicate word of the narrowest tiles with every extra on).
            sampled = _sampled(pflat, pmask, n_sample, n_total)
        if XFORM > 0:
            if STATS and not PROB:
                m = akey
            else:
                m = rmax
        softmax_like = sampled & (mn >= 0.0) & (m <= 1.0) & (tl.abs(xsum - 1.0) <= softmax_tol)
        hits = hits | _hit(slots, SOFTMAX_LIKE, softmax_like)
        if pid == 0:
            tl.store(flags_ptr + SOFTMAX_CHECKED, n_checked)  # a plain store: the count is static
    if PROB:
        hits = hits | _hit(slots, PROB_NEGATIVE, pmask & (ymin < 0))
        hits = hits | _hit(slots, PROB_BAD_SUM, pmask & ((tl.abs(ysum - 1.0) <= prob_tol) == 0))
    n = tl.sum(hits.to(tl.int32), axis=0)
    tl.atomic_add(flags_ptr + slots, n, mask=n > 0, sem="relaxed")
    if HAS_WEIGHT:
        if pid == 0:
            # Negative class weights, read every call (C values): found however the weight changed.
            # Last: nothing of the position is live across this loop of runtime trip count.
            for c0 in range(0, C, BLOCK_C):
                wcols = c0 + _offset(tl.arange(0, BLOCK_C), I64)
                wv = tl.load(w_ptr + wcols, mask=wcols < C, other=0.0)
                _count(flags_ptr, WEIGHT_NEGATIVE, wv < 0)



@triton.jit(do_not_specialize=["S1", "n_pblocks", "ignore_index", "gs0", "gs1", "gs2", "zs0", "zs1", "zs2"])
def ce_bwd_kernel(
    x_ptr, t_ptr, w_ptr, wsum_ptr, lse_ptr, wy_ptr, g_ptr, dx_ptr, dy_ptr, gz_ptr,
    S1, S2, C, n_pblocks,
    xs0, xs1, xs2, xsc,
    ts0, ts1, ts2, tsc,
    gs0, gs1, gs2,
    ds0, ds1, ds2, dsc,
    es0, es1, es2, esc,
    zs0, zs1, zs2,
    ignore_index, eps, cap_t, inv_cap, inv_t, zcoef,
    PROB: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, NEED_W: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DY: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, I64: tl.constexpr,
    XFORM: tl.constexpr, ZLOSS: tl.constexpr,
):  # fmt: skip
    """Recompute softmax from the saved lse and write g * d loss / d x (and / d y) in one pass.

    dx may alias x (inplace_backward): each element is read before it is written by the same
    program, and no program reads another program's rows.
    Extras: the tile is the capped, scaled logits zt (recomputed from x), the z-loss term adds
    gz 2 zcoef lse p (gz: its own upstream gradient), and d/dx = d/dzt * d zt / d x.
    """
    _pid, i0, i1, i2, pmask, pflat = _positions(S1, S2, n_pblocks, BLOCK_P, I64)
    xrow = i0 * xs0 + i1 * xs1 + i2 * xs2
    trow = i0 * ts0 + i1 * ts1 + i2 * ts2
    drow = i0 * ds0 + i1 * ds1 + i2 * ds2
    erow = i0 * es0 + i1 * es1 + i2 * es2
    smooth_c = eps / C
    keep = 1.0 - eps
    lse = tl.load(lse_ptr + pflat, mask=pmask, other=0.0)
    g = tl.load(g_ptr + (i0 * gs0 + i1 * gs1 + i2 * gs2), mask=pmask, other=0.0).to(tl.float32)
    if PROB:
        a = tl.load(wy_ptr + pflat, mask=pmask, other=0.0)
        active = pmask
        y = _offset(tl.zeros((BLOCK_P,), tl.int32), I64)
        wy_hot = a
    else:
        y, active, _bad = _index_target(t_ptr, trow, pmask, ignore_index, C, I64)
        if HAS_WEIGHT:
            w_y = tl.load(w_ptr + y, mask=active, other=0.0).to(tl.float32)
        else:
            w_y = tl.full((BLOCK_P,), 1.0, tl.float32)
        wy_hot = keep * w_y
        a = wy_hot
        if SMOOTH:
            if HAS_WEIGHT:
                wsum = tl.load(wsum_ptr)
            else:
                wsum = C * 1.0
            a += smooth_c * wsum
    if ZLOSS:
        gz = tl.load(gz_ptr + (i0 * zs0 + i1 * zs1 + i2 * zs2), mask=pmask, other=0.0).to(tl.float32)
        zc = gz * _z_slope(zcoef, lse)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + _offset(tl.arange(0, BLOCK_C), I64)
        cmask = cols < C
        mask = pmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + (xrow[:, None] + cols[None, :] * xsc), mask=mask, other=0.0).to(tl.float32)
        if XFORM > 0:
            x, dzx = _dxform(x, cap_t, inv_cap, inv_t, XFORM)
        w = _class_weights(w_ptr, cols, cmask, NEED_W)
        wys = w
        if PROB:
            yraw = tl.load(t_ptr + (trow[:, None] + cols[None, :] * tsc), mask=mask, other=0.0)
            wys = w * (yraw.to(tl.float32) * keep + smooth_c)
        if COMPUTE_DX:
            if ZLOSS:  # both upstream gradients inside: g (a p - hot) + zc p
                d = _grad_tile(x, lse, g * a + zc, cols, y, g * wy_hot, (g * smooth_c)[:, None], w,
                               g[:, None] * wys, PROB, SMOOTH)
            else:
                d = g[:, None] * _grad_tile(x, lse, a, cols, y, wy_hot, smooth_c, w, wys, PROB, SMOOTH)
            if XFORM > 0:
                d = d * dzx
            # where(), not a multiply: ignored / bad rows get exactly 0 even for a NaN upstream g.
            d = tl.where(active[:, None], d, 0.0)
            dptr = dx_ptr + (drow[:, None] + cols[None, :] * dsc)
            tl.store(dptr, d.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DY:
            dy = (g * keep)[:, None] * w * (lse[:, None] - x)
            eptr = dy_ptr + (erow[:, None] + cols[None, :] * esc)
            tl.store(eptr, dy.to(dy_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["S1", "n_pblocks", "ignore_index", "gs0", "gs1", "gs2"])
def ce_scale_kernel(
    dx_ptr, t_ptr, g_ptr,
    S1, S2, C, n_pblocks,
    ds0, ds1, ds2, dsc,
    ts0, ts1, ts2,
    gs0, gs1, gs2,
    ignore_index,
    PROB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, I64: tl.constexpr,
):  # fmt: skip
    """Fused mode's backward: dx *= g per position, in place. Rows whose factor is exactly 1
    (sum reduction, or a loss that is not rescaled) and ignored rows (already 0) are skipped
    on the device, so g == 1 costs no traffic and never a host sync."""
    _pid, i0, i1, i2, pmask, _pflat = _positions(S1, S2, n_pblocks, BLOCK_P, I64)
    g = tl.load(g_ptr + (i0 * gs0 + i1 * gs1 + i2 * gs2), mask=pmask, other=1.0).to(tl.float32)
    if PROB:
        active = pmask
    else:
        _y, active, _bad = _index_target(t_ptr, i0 * ts0 + i1 * ts1 + i2 * ts2, pmask, ignore_index, C, I64)
    f = tl.where(active, g, 1.0)
    n = tl.sum((f != 1.0).to(tl.int32), axis=0)
    if n > 0:
        drow = i0 * ds0 + i1 * ds1 + i2 * ds2
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + _offset(tl.arange(0, BLOCK_C), I64)
            mask = pmask[:, None] & (cols < C)[None, :]
            dptr = dx_ptr + (drow[:, None] + cols[None, :] * dsc)
            d = tl.load(dptr, mask=mask, other=0.0).to(tl.float32) * f[:, None]
            tl.store(dptr, d.to(dx_ptr.dtype.element_ty), mask=mask)

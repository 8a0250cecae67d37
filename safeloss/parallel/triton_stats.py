"""Triton kernel for the per-shard statistics of vocab-parallel cross-entropy (CUDA; the
interpreter on CPU for tests). Imported lazily, only when the Triton backend runs.

One program per row of the local slice streams the classes in column blocks with the online
softmax of ``safeloss.backends.triton_kernels`` (running max, rescaled sum of exponentials, exp2)
and writes, in fp32:

* ``L`` = log-sum-exp of the slice (-inf for an all -inf row);
* with label smoothing, ``Q`` = sum_c w_c (L - x_c), accumulated relative to the running max
  (``acc = sum_c w_c (x_c - m)``, shifted when the max grows) and finished as ``W log(s) - acc``,
  so nothing of size |L| * W cancels.

With the LLM / RL extras the logits are capped and scaled in registers first (XFORM, the main
kernel's ``_xform``: L and Q are of zt), and with per-token statistics (STATS) it also writes:

* ``A`` = sum_c softmax(zt)_c (zt_c - L) over the slice, online as the main kernel's entropy
  (``ea = sum exp(zt - m)(zt - m)``, rescaled when the max grows; A = ea / s - log s, 0 for an
  all -inf row). The caller combines slices: sum_c exp(zt_c - M)(zt_c - M) =
  sum_r exp(L_r - M) (A_r + L_r - M);
* the argmax of the raw logits as (key, code): key = the slice's max with NaN as +inf, code =
  the lowest column holding it, minus C for a NaN (a NaN wins, as in ``torch.argmax``). The
  caller finds the global argmax from the keys' max over ranks without a second pass.

The logits are read once, in their own dtype and strides (no copy, no upcast copy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends import triton_backend
from ..backends.triton_kernels import _xform
from ..core import _flags

LOG2E = tl.constexpr(1.4426950408889634)
_INT32_MAX = 2**31 - 1


@triton.jit(do_not_specialize=["R"])  # the row count only bounds the programs: one variant for all
def shard_stats_kernel(
    x_ptr, w_ptr, lse_ptr, q_ptr, a_ptr, key_ptr, code_ptr, R, C, xs_r, xs_c, cap_t, inv_cap,
    HAS_W: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    I64: tl.constexpr, XFORM: tl.constexpr, STATS: tl.constexpr,
):  # fmt: skip
    # Tiles of [BLOCK_P rows, BLOCK_C classes], the layout of the main kernel's LM rows (rows
    # narrower than a block are packed several per program). Offsets are int64 only when an
    # index can pass int32, padding lanes included (I64, from the launcher).
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    rows = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = rows < R
    xrow = rows * xs_r
    m = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_P,), tl.float32)
    acc = tl.zeros((BLOCK_P,), tl.float32)
    ksum = tl.zeros((BLOCK_P,), tl.float32)
    if STATS:
        ea = tl.zeros((BLOCK_P,), tl.float32)
        akey = tl.full((BLOCK_P,), float("-inf"), tl.float32)
        acode = tl.zeros((BLOCK_P,), tl.int32)
    for c0 in range(0, C, BLOCK_C):
        if I64:  # the column index too: cols * xs_c, and no wrap of the last block's padding
            cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        else:
            cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        mask = pmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + (xrow[:, None] + cols[None, :] * xs_c), mask=mask,
                    other=float("-inf")).to(tl.float32)
        if STATS:
            # The lowest column of the raw maximum, NaN above everything (blocks arrive in column
            # order: on a tie the earlier block keeps it); as ce_fwd_kernel's argmax.
            isn = x != x
            key = tl.where(isn, float("inf"), x)
            bkey = tl.max(key, axis=1)
            code = tl.where(isn, cols[None, :] - C, cols[None, :]).to(tl.int32)  # |code| < C
            bcode = tl.min(tl.where((key == bkey[:, None]) & mask, code, C), axis=1)
            take = (bkey > akey) | ((bkey == akey) & (bcode < 0) & (acode >= 0))
            akey = tl.where(take, bkey, akey)
            acode = tl.where(take, bcode, acode)
        if XFORM > 0:
            x = _xform(x, cap_t, inv_cap, XFORM)
            if XFORM == 2:
                x = tl.where(mask, x, float("-inf"))  # the cap maps -inf padding to -s / T
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # never (-inf) - (-inf)
        xd = x - m_ref[:, None]
        r = tl.exp2((m - m_ref) * LOG2E)
        ex = tl.exp2(xd * LOG2E)
        if STATS:
            # When the max grows by d every term scales by r = exp(-d) and its (zt - m) drops by d.
            d_up = tl.where(m == float("-inf"), 0.0, m_ref - m)  # s == 0 while m == -inf
            ea = r * (ea - d_up * s) + tl.sum(ex * tl.where(ex > 0.0, xd, 0.0), axis=1)  # 0, not 0 * -inf
        s = s * r + tl.sum(ex, axis=1)
        if SMOOTH:
            if HAS_W:
                k = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            else:
                k = cmask.to(tl.float32)[None, :]
            k = tl.where(mask, k, 0.0)
            shift = tl.where(m == float("-inf"), 0.0, m_ref - m)
            acc = acc - shift * ksum + tl.sum(k * tl.where(mask, xd, 0.0), axis=1)
            ksum += tl.sum(k, axis=1)
        m = m_new
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    s1 = tl.where(pmask, s, 1.0)
    logs = tl.log(s1)
    tl.store(lse_ptr + rows, m_ref + logs, mask=pmask)
    if SMOOTH:
        tl.store(q_ptr + rows, ksum * logs - acc, mask=pmask)
    if STATS:
        tl.store(a_ptr + rows, tl.where(s > 0.0, ea / s1 - logs, 0.0), mask=pmask)
        tl.store(key_ptr + rows, akey, mask=pmask)
        tl.store(code_ptr + rows, acode, mask=pmask)


def shard_stats(xr: Tensor, w_local: Tensor | None, smooth: bool,
                xform: tuple[int, float, float] = (0, 1.0, 1.0), stats: bool = False
                ) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor, Tensor] | None]:
    """(L, Q or None, (A, key, code) or None) per row of ``xr`` (R, C_local), C_local > 0;
    fp32 (code int32). ``xform``: (XFORM, cap_t, inv_cap) of ``triton_backend.extras_params``."""
    R, C = xr.shape
    dev = xr.device
    lse = torch.empty(R, dtype=torch.float32, device=dev)
    q = torch.empty(R, dtype=torch.float32, device=dev) if smooth else None
    st = (torch.empty(R, dtype=torch.float32, device=dev), torch.empty(R, dtype=torch.float32, device=dev),
          torch.empty(R, dtype=torch.int32, device=dev)) if stats else None
    if R:
        w = None if w_local is None else w_local.to(torch.float32).contiguous()
        block_c = max(16, min(4096, triton.next_power_of_2(C)))
        block_p = max(1, min(16, 1024 // block_c))  # pack narrow rows: ~1024 elements a tile
        a, key, code = st if st is not None else (lse, lse, lse)
        shard_stats_kernel[(triton.cdiv(R, block_p),)](
            xr, xr if w is None else w, lse, lse if q is None else q, a, key, code, R, C, xr.stride(0),
            xr.stride(1), xform[1], xform[2], HAS_W=w is not None, SMOOTH=smooth, BLOCK_P=block_p,
            BLOCK_C=block_c,
            # int64 when an index can pass int32: the slice's offsets, the (R,) outputs' (rows may
            # be expanded), the last row / column block's padding (compared before any access).
            I64=max((R - 1) * xr.stride(0) + (C - 1) * xr.stride(1), triton.cdiv(R, block_p) * block_p - 1,
                    triton.cdiv(C, block_c) * block_c - 1) > _INT32_MAX,
            XFORM=xform[0], STATS=stats,
            num_warps=4,  # 8 warps at 4096 columns spilled on sm_100 (benchmarks/aot_gate.py)
            maxnreg=_flags.max_registers(C, 4),
        )
    return lse, q, st


@contextlib.contextmanager
def stubbed_launches() -> Iterator[None]:
    """``safeloss.backends.triton_backend.stubbed_launches``, and this module's kernel launch a
    no-op too: the host cost of the Triton paths of every op, without a GPU (a benchmark hook)."""
    global shard_stats_kernel
    saved = shard_stats_kernel
    shard_stats_kernel = triton_backend.NO_LAUNCH  # type: ignore[assignment]
    try:
        with triton_backend.stubbed_launches():
            yield
    finally:
        shard_stats_kernel = saved

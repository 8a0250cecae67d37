"""Triton backend: launchers, torch.library custom ops and their autograd.

The seam the rest of safeloss calls is :func:`row_losses` (per-position losses + findings) and
:func:`unavailable_reason`. Inputs arrive validated and normalised; nothing here re-validates
user mistakes, and nothing here syncs with the host (no ``.item()``, no branching on values).

Triton is imported lazily (see :func:`_kernels`): importing this module costs only torch.
The forward, backward and the fused-mode rescale are ``torch.library.custom_op`` s (namespace
``safeloss``) with fake implementations and ``register_autograd``, so ``torch.compile(fullgraph=True)``
traces them as opaque nodes without graph breaks. Eager calls on plain tensors skip the op
dispatch (an autograd.Function calling the same implementations: see "Eager fast path").
"""

import contextlib
import functools
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..core import _flags, reduction
from ..core.validation import Problem

__all__ = ["row_losses", "unavailable_reason"]

# custom_op schemas are inferred from annotations; typing.Optional also works on torch 2.4 / Python 3.10.
_OptTensor = Optional[Tensor]  # noqa: UP045

# Test hooks: force the tile shape (e.g. a tiny BLOCK_C so C=300 spans several column blocks).
FORCE_BLOCK_C: int | None = None
FORCE_BLOCK_P: int | None = None
# Tuning hooks (benchmarks/gpu_tune.py): override the warps / software-pipelining stages.
FORCE_NUM_WARPS: int | None = None
FORCE_NUM_STAGES: int | None = None

_TILE = 4096  # widest column block when streaming a long row
_MAX_POS_BLOCK = 128  # positions per program for NCHW-style inputs (coalesced along the pixels)
# Elements of a tile that holds several positions (rows narrower than a block, NCHW). A thread
# then holds one element of several positions, and the running statistics (forward: max, sum,
# smoothing / target sums, softmax and target checks) or addresses and factors (backward) of
# each: at 4 warps, 4 elements per thread keep every variant, int64 offsets included, within
# 128 registers (>= 25% theoretical occupancy on an H100; benchmarks/results/aot-gate/).
# 1024-element tiles took up to 220 registers (forward) and 128 (backward).
_MULTI_TILE = 512


# --------------------------------------------------------------------------------------------
# Availability and lazy import
# --------------------------------------------------------------------------------------------
_IMPORT_ERROR: list[str | None] = []  # a plain cache: Dynamo warns when it traces functools.cache


def _triton_import_error() -> str | None:
    if not _IMPORT_ERROR:
        try:
            import triton  # noqa: F401

            _IMPORT_ERROR.append(None)
        except Exception as exc:  # ImportError, or a broken install raising anything
            _IMPORT_ERROR.append(f"triton is not importable ({type(exc).__name__}: {exc})")
    return _IMPORT_ERROR[0]


@functools.cache
def _kernels() -> Any:
    """Import the jit kernels on first use (``triton.jit`` picks GPU compilation or the
    interpreter when that module is decorated, from TRITON_INTERPRET at that moment)."""
    from . import triton_kernels

    return triton_kernels


def _kernels_interpreted() -> bool | None:
    """How the kernels module was decorated, or None if it is not imported yet."""
    mod = sys.modules.get("safeloss.backends.triton_kernels")
    if mod is None:
        return None
    if not hasattr(mod, "ce_fwd_kernel"):
        mod = _kernels()  # another thread is importing it: wait for the import to finish
    return type(mod.ce_fwd_kernel).__name__ == "InterpretedFunction"


def unavailable_reason(device: torch.device) -> str | None:
    """None if the Triton backend can run on tensors of ``device``, else a short human reason."""
    device = torch.device(device)
    err = _triton_import_error()
    if err is not None:
        return err
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 (slow, for testing)"
        if _kernels_interpreted() is False:
            return "TRITON_INTERPRET=1 was set after the Triton kernels were compiled for the GPU; set it before first use"
        return None
    return f"Triton runs on CUDA tensors, not on {device.type} tensors"


# --------------------------------------------------------------------------------------------
# Geometry: collapse the positions into at most three (size, stride) dims, no copies
# --------------------------------------------------------------------------------------------
def _class_dim(x: Tensor) -> int:
    return 0 if x.dim() == 1 else 1


def _pos_shape(x: Tensor) -> list[int]:
    return [] if x.dim() == 1 else [x.shape[0], *x.shape[2:]]


def _pos_strides(t: Tensor, full: bool) -> list[int]:
    """Strides of t over the positions dims; ``full`` tensors (logits-shaped) skip the class dim."""
    st = list(t.stride())
    if not full:
        return st
    return [] if t.dim() == 1 else [st[0], *st[2:]]


def _class_stride(t: Tensor) -> int:
    return t.stride(_class_dim(t))


def _collapse(
    sizes: Sequence[int], strides: Sequence[Sequence[int]]
) -> tuple[list[int], list[list[int]]] | None:
    """Merge adjacent position dims that are contiguous with each other in *every* tensor.

    Returns sizes padded to exactly 3 dims (leading size-1, stride-0 dims) and the per-tensor
    strides, or None when more than 3 irreducible dims remain (exotic layouts)."""
    out_sizes: list[int] = []
    out_strides: list[list[int]] = [[] for _ in strides]
    for i, n in enumerate(sizes):
        if n == 1:
            continue
        if out_sizes and all(o[-1] == s[i] * n for o, s in zip(out_strides, strides)):
            out_sizes[-1] *= n
            for o, s in zip(out_strides, strides):
                o[-1] = s[i]
        else:
            out_sizes.append(n)
            for o, s in zip(out_strides, strides):
                o.append(s[i])
    if len(out_sizes) > 3:
        return None
    pad = 3 - len(out_sizes)
    return [1] * pad + out_sizes, [[0] * pad + o for o in out_strides]


def _geometry(x: Tensor, tensors: Sequence[tuple[Tensor, bool]]) -> tuple[list[int], list[list[int]]] | None:
    """Joint collapse of x's positions with ``tensors`` ((tensor, is_logits_shaped) pairs).
    Returns (S0, S1, S2) and one [s0, s1, s2, class_stride] list per tensor, x first."""
    all_t = [(x, True), *tensors]
    res = _collapse(_pos_shape(x), [_pos_strides(t, full) for t, full in all_t])
    if res is None:
        return None
    sizes, strides = res
    return sizes, [[*s, _class_stride(t) if full else 0] for s, (t, full) in zip(strides, all_t)]


def _non_overlapping_and_dense(t: Tensor) -> bool:
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _may_take_gradient(x: Tensor) -> bool:
    """Whether ``inplace_backward`` may write the gradient over x's storage: a dense tensor that
    is neither a leaf requiring grad nor a view of one. Such a leaf is the caller's own tensor
    (a Parameter, or logits they keep): torch refuses in-place ops on it, and overwriting it in
    backward would hand the optimizer the gradient in place of the values. Those take a new
    buffer, as the torch backend always does."""
    if not _non_overlapping_and_dense(x):
        return False
    base = x if x._base is None else x._base
    return not (base.is_leaf and base.requires_grad)


_INT32_MAX = 2**31 - 1


def _i64(*tensors: Tensor | None) -> bool:
    """Whether the kernels need int64 offsets: some element of ``tensors`` lies more than
    int32 elements past its tensor's start (sizes and strides, so views of bigger storages count)."""
    for t in tensors:
        if t is not None:
            ext = 0
            for n, st in zip(t.shape, t.stride()):
                ext += (n - 1) * st
            if ext > _INT32_MAX:
                return True
    return False


def _index_past_int32(n: int, C: int) -> bool:
    """Whether a flat position (0..n-1: the per-position buffers) or a class index passes int32,
    whatever the strides (expanded logits). Tiles are powers of two, which divide 2^31: the
    padding lanes of the last block then stay within int32 too."""
    return max(n, C) - 1 > _INT32_MAX


def _next_pow2(n: int) -> int:
    return 1 << max(0, (max(n, 1) - 1).bit_length())


def _tiles(
    sizes: Sequence[int], C: int, x_strides: Sequence[int], single_max: int = 0, kind: str = "fwd",
    per_column: bool = False, lean: bool = False,
) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) for a [BLOCK_P, BLOCK_C] tile; ``kind`` is "fwd" or "bwd";
    ``per_column``: the kernel keeps more state per column (weights, targets, the target's gradient:
    see _fwd_config, _bwd_config).

    Sizes are checked by the ahead-of-time compile gate (benchmarks/aot_gate.py: every
    configuration compiled for sm_80 / sm_90 / sm_100, registers and spills from ptxas):
      * class-contiguous rows (LM heads, channels-last): [1, 4096] streams a row with no spills.
        Rows shorter than a block are packed several per program, _MULTI_TILE elements in all:
        each thread then holds one element of several positions, and so several positions'
        running statistics (1024-element forward tiles took 150-220 registers).
      * pixel-contiguous NCHW: [32 pixels, 16 classes] at 4 warps: every warp load is coalesced
        along the pixels (64 bytes or more per class), the class loop is strided.
      * ``single_max`` > 0 (fused mode): one block covers the whole row when C <= single_max, so
        the row stays in registers between the loss and the gradient (read once). NCHW rows of
        up to 32 classes only (16 pixels x 32 classes; wider rows are streamed twice).
      * ``lean`` (the forward with extras and the softmax check): tiles of several positions hold
        half as many elements (two per thread): each position adds its entropy, argmax, raw max
        and z-loss state to the check's, and ptxas spilled predicate words of 512-element tiles
        on sm_80 (the linear tile, without the check, keeps 512: 256 made ptxas trade a spill
        for 32 registers on sm_90).
    Streaming long rows, measured on an H200 (benchmarks/results/nvidia-h200-1-before-fixes/tune.txt,
    N=8192, V=128256 bf16): the forward (read only, a max/sum reduction per block) is fastest at
    [1, 4096] with 4 warps (81% of copy bandwidth; 8 warps: 65%; 99% once the softmax check stopped
    early, nvidia-h200-2-quick/tune.txt); the backward (read + write, no reduction) at [1, 8192]
    with 16 warps (94%; [1, 4096] at 8 warps: 92%).
    """
    S2 = sizes[2]
    xs2, xsc = x_strides[2], x_strides[3]
    c2 = _next_pow2(C)
    single = c2 <= single_max
    multi = _MULTI_TILE // 2 if lean else _MULTI_TILE
    if xsc != 1 and xs2 == 1 and S2 > 1:
        bc = c2 if single and c2 <= 32 else min(c2, 16)
        bp = min(_MAX_POS_BLOCK, _next_pow2(S2), max(16, multi // bc))
    else:
        bc = c2 if single else min(c2, _TILE if kind == "fwd" else 2 * _TILE)
        if per_column and not single:
            bc = min(bc, _TILE // 2)
        bp = max(1, min(_next_pow2(S2), multi // bc))
    if FORCE_BLOCK_C is not None:
        bc = FORCE_BLOCK_C
    if FORCE_BLOCK_P is not None:
        bp = FORCE_BLOCK_P
    tile = bp * bc
    num_warps = 4 if tile <= 2048 else 8 if tile <= 4096 else 16 if tile <= 16384 else 32
    if not single and bp == 1 and bc >= 4096:
        num_warps = 4 if kind == "fwd" else 16
    if per_column:
        # At most 8 elements a thread (16 from 8192 columns): [1, 4096] tiles at 4 warps, 32 of
        # each per-column array a thread, took 168-255 registers and spilled; streamed rows go in
        # 2048-column blocks at 8 warps.
        num_warps = min(16, max(4, tile // 256))
    if FORCE_NUM_WARPS is not None:
        num_warps = FORCE_NUM_WARPS
    return bp, bc, num_warps


def _launch_opts(num_warps: int, C: int) -> dict[str, int]:
    opts = {"num_warps": num_warps, "maxnreg": _flags.max_registers(C, num_warps)}
    if FORCE_NUM_STAGES is not None:
        opts["num_stages"] = FORCE_NUM_STAGES
    return opts


def _grid(sizes: Sequence[int], bp: int) -> tuple[int, int]:
    n_pblocks = _cdiv(sizes[2], bp)
    return n_pblocks, sizes[0] * sizes[1] * n_pblocks


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------
# Launchers (eager code that runs inside the custom ops)
# --------------------------------------------------------------------------------------------
# Launch configurations (grid, scalar arguments, constexprs) per signature: the geometry and the
# tiles depend only on shapes, strides, dtypes and options, and working them out is most of a
# small call's host time. Keyed by everything they are computed from (the test hooks too).
_LAUNCHES: dict[tuple[Any, ...], Any] = {}
MAX_LAUNCHES = 256
_EXOTIC = object()  # a cached "more than 3 irreducible position dims": contiguous copies


def _cached(key: tuple[Any, ...], make: Any) -> Any:
    cfg = _LAUNCHES.get(key)
    if cfg is None:
        cfg = make()
        if len(_LAUNCHES) >= MAX_LAUNCHES:
            _LAUNCHES.pop(next(iter(_LAUNCHES)))
        _LAUNCHES[key] = _EXOTIC if cfg is None else cfg
        return cfg
    return None if cfg is _EXOTIC else cfg


# The extras of a launch (``triton_extras``): (XFORM, cap_t, inv_cap, inv_t, tq, zcoef, STATS).
# XFORM 0: logits as they are, 1: a temperature alone (x / T as x * (1 / T)), 2: a softcap s,
# (s / T) tanh(x / s); tq = T / s^2 (d zt / d x from zt); zcoef > 0 turns on the z-loss term.
Extras = tuple[int, float, float, float, float, float, bool]
NO_EXTRAS: Extras = (0, 1.0, 1.0, 1.0, 0.0, 0.0, False)


def extras_params(softcap: float | None, temperature: float, z_loss: float, stats: bool) -> Extras:
    """The kernels' extras arguments of a call (see ``Extras``)."""
    t = float(temperature)
    if softcap is not None:
        s = float(softcap)
        return 2, s / t, 1.0 / s, 1.0 / t, t / (s * s), float(z_loss), bool(stats)
    return (1 if t != 1.0 else 0), 1.0 / t, 1.0, 1.0 / t, 0.0, float(z_loss), bool(stats)


def _launch_fwd(
    x: Tensor, target: Tensor, weight: Tensor | None, losses: Tensor, lse: Tensor, wy: Tensor, dx: Tensor | None,
    flags: Tensor, ignore_index: int, eps: float, prob: bool, check_softmax: bool, out_max: float,
    ex: Extras = NO_EXTRAS, zl: Tensor | None = None, ent: Tensor | None = None, hit: Tensor | None = None,
) -> None:  # fmt: skip
    """``ex``: the extras (``extras_params``); then ``zl`` (z-loss term, with a z-loss), ``ent``
    (entropy) and ``hit`` (int8, argmax == target; index targets) per position (with stats)."""
    has_weight = weight is not None
    key = ("fwd", x.shape, x.stride(), x.dtype, target.shape, target.stride(), target.dtype,
           None if dx is None else dx.stride(), has_weight, ignore_index, eps, prob, check_softmax,
           out_max, ex, FORCE_BLOCK_C, FORCE_BLOCK_P, FORCE_NUM_WARPS, FORCE_NUM_STAGES)
    cfg = _LAUNCHES.get(key)
    if cfg is None or cfg is _EXOTIC:
        cfg = _cached(key, lambda: _fwd_config(x, target, has_weight, dx, ignore_index, eps, prob,
                                               check_softmax, out_max, ex))
    if cfg is None:  # more than 3 irreducible position dims: run on contiguous copies (rare)
        dxc = torch.empty(dx.shape, dtype=dx.dtype, device=dx.device) if dx is not None else None
        _launch_fwd(x.contiguous(), target.contiguous(), weight, losses, lse, wy, dxc, flags,
                    ignore_index, eps, prob, check_softmax, out_max, ex, zl, ent, hit)  # fmt: skip
        if dx is not None:
            dx.copy_(dxc)
        return
    grid, args, kwargs = cfg
    _kernels().ce_fwd_kernel[grid](
        x, target, weight if has_weight else lse, losses, lse, wy if prob else lse,
        dx if dx is not None else lse, flags, lse if zl is None else zl, lse if ent is None else ent,
        lse if hit is None else hit, *args, **kwargs,
    )  # fmt: skip


def _fwd_config(
    x: Tensor, target: Tensor, has_weight: bool, dx: Tensor | None, ignore_index: int, eps: float,
    prob: bool, check_softmax: bool, out_max: float, ex: Extras = NO_EXTRAS,
) -> tuple[tuple[int], tuple[Any, ...], dict[str, Any]] | None:
    """(grid, scalar arguments, keyword arguments) of the forward kernel, or None (exotic layout)."""
    import triton.language as tl

    C = x.shape[_class_dim(x)]
    others = [(target, prob)] + ([(dx, True)] if dx is not None else [])
    geo = _geometry(x, others)
    if geo is None:
        return None
    sizes, (xs, ts, *rest) = geo
    ds = rest[0] if dx is not None else [0, 0, 0, 0]
    smooth = (not prob) and eps > 0.0
    need_w = has_weight and (prob or smooth)
    # Fused mode keeps the row (and w*y' for prob targets) in registers up to this many classes:
    # 32 values per thread at 16 warps (a 32-warp block has 64 registers per thread: 32768
    # columns spilled); 16 with smoothing or probability targets (their sums and weights beside
    # them: 16384 smoothed columns with int64 offsets spilled).
    single_max = 0 if dx is None else 8192 if prob or smooth else 16384
    n = math.prod(_pos_shape(x))
    # The softmax check's sample arithmetic (positions * (SOFTMAX_SAMPLE + 1)) must fit the offset type too.
    i64 = n * (_flags.SOFTMAX_SAMPLE + 1) > _INT32_MAX or _index_past_int32(n, C) or _i64(x, target, dx)
    # More state per column: class weights or target values beside each logit, smoothing with the
    # fused gradient (its streamed form reached 128-160 registers at 4 warps, and spilled), the
    # raw logits kept beside the scaled ones for the softmax check (a temperature or cap), or
    # int64 addresses with the fused gradient, or the per-token statistics (entropy and argmax
    # state beside the max and sum: [1, 4096] at 4 warps needed 169 registers on sm_80):
    # streamed [1, 4096] blocks at 4 warps spilled there (benchmarks/aot_gate.py), 2048-column
    # blocks at 8 warps do not.
    per_column = (prob or need_w or (smooth and dx is not None) or (ex[0] > 0 and check_softmax)
                  or (i64 and dx is not None) or bool(ex[6]))
    bp, bc, num_warps = _tiles(sizes, C, xs, single_max, per_column=per_column,
                               lean=ex != NO_EXTRAS and check_softmax)
    n_pblocks, grid = _grid(sizes, bp)
    args = (
        sizes[1], sizes[2], C, n_pblocks, n, _flags.SOFTMAX_SAMPLE, min(n, _flags.SOFTMAX_SAMPLE),
        *xs, *ts, *ds,
        ignore_index, eps,
        _flags.SOFTMAX_SUM_TOL[_dtype_name(x.dtype)],
        _flags.PROB_SUM_TOL.get(_dtype_name(target.dtype), 1e-4), out_max,
        *ex[1:6],
    )  # fmt: skip
    kwargs = dict(
        PROB=prob, HAS_WEIGHT=has_weight, SMOOTH=smooth, NEED_W=need_w,
        CHECK_SOFTMAX=check_softmax, FUSED=dx is not None,
        Y_ACC=tl.float64 if target.dtype == torch.float64 else tl.float32,
        BLOCK_P=bp, BLOCK_C=bc, SINGLE=dx is not None and bc >= C, EARLY_OUT=bc < C, I64=i64,
        XFORM=ex[0], ZLOSS=ex[5] > 0.0, STATS=ex[6], **_launch_opts(num_warps, C),
    )  # fmt: skip
    return (grid,), args, kwargs


def _launch_bwd(
    x: Tensor, target: Tensor, weight: Tensor | None, lse: Tensor, wy: Tensor, g: Tensor,
    dx: Tensor | None, dy: Tensor | None, ignore_index: int, eps: float, prob: bool,
    ex: Extras = NO_EXTRAS, gz: Tensor | None = None,
) -> None:  # fmt: skip
    """``ex``: the extras (``extras_params``); ``gz``: the upstream gradient of the z-loss term
    per position (None: no z-loss term in the gradient)."""
    has_weight = weight is not None
    key = ("bwd", x.shape, x.stride(), x.dtype, target.shape, target.stride(), g.shape, g.stride(),
           None if dx is None else dx.stride(), None if dy is None else dy.stride(), has_weight,
           ignore_index, eps, prob, ex, None if gz is None else (gz.shape, gz.stride()),
           FORCE_BLOCK_C, FORCE_BLOCK_P, FORCE_NUM_WARPS, FORCE_NUM_STAGES)
    cfg = _LAUNCHES.get(key)
    if cfg is None or cfg is _EXOTIC:
        cfg = _cached(key, lambda: _bwd_config(x, target, has_weight, g, dx, dy, ignore_index, eps, prob, ex, gz))
    if cfg is None:  # exotic layout: contiguous copies in, copy the results back
        dxc = torch.empty(dx.shape, dtype=dx.dtype, device=dx.device) if dx is not None else None
        dyc = torch.empty(dy.shape, dtype=dy.dtype, device=dy.device) if dy is not None else None
        _launch_bwd(x.contiguous(), target.contiguous(), weight, lse, wy, g.contiguous(), dxc, dyc,
                    ignore_index, eps, prob, ex, None if gz is None else gz.contiguous())  # fmt: skip
        if dx is not None:
            dx.copy_(dxc)
        if dy is not None:
            dy.copy_(dyc)
        return
    grid, args, kwargs = cfg
    smooth = (not prob) and eps > 0.0
    # W = sum_c w_c, needed before the column loop (coefficient of p_c); a device tensor, no sync.
    wsum = weight.sum(dtype=torch.float32).reshape(1) if has_weight and smooth else lse
    _kernels().ce_bwd_kernel[grid](
        x, target, weight if has_weight else lse, wsum, lse, wy if prob else lse, g,
        dx if dx is not None else lse, dy if dy is not None else lse, lse if gz is None else gz,
        *args, **kwargs,
    )  # fmt: skip


def _bwd_config(
    x: Tensor, target: Tensor, has_weight: bool, g: Tensor, dx: Tensor | None, dy: Tensor | None,
    ignore_index: int, eps: float, prob: bool, ex: Extras = NO_EXTRAS, gz: Tensor | None = None,
) -> tuple[tuple[int], tuple[Any, ...], dict[str, Any]] | None:
    """(grid, scalar arguments, keyword arguments) of the backward kernel, or None (exotic layout)."""
    C = x.shape[_class_dim(x)]
    others = [(target, prob), (g, False)]
    others += [(dx, True)] if dx is not None else []
    others += [(dy, True)] if dy is not None else []
    others += [(gz, False)] if gz is not None else []
    geo = _geometry(x, others)
    if geo is None:
        return None
    sizes, (xs, ts, gs, *rest) = geo
    ds = rest.pop(0) if dx is not None else [0, 0, 0, 0]
    es = rest.pop(0) if dy is not None else [0, 0, 0, 0]
    zs = rest.pop(0) if gz is not None else [0, 0, 0, 0]
    # The target's gradient beside the logits' (probability targets that require grad): a
    # second value per column, written too; streamed [1, 8192] blocks at 16 warps (128
    # registers at most there) spilled 4-16 bytes (benchmarks/aot_gate.py): 2048-column blocks
    # at 8 warps, as the forward's per-column rows.
    bp, bc, num_warps = _tiles(sizes, C, xs, kind="bwd", per_column=dy is not None)
    n_pblocks, grid = _grid(sizes, bp)
    smooth = (not prob) and eps > 0.0
    args = (
        sizes[1], sizes[2], C, n_pblocks,
        *xs, *ts, *gs[:3], *ds, *es, *zs[:3],
        ignore_index, eps, ex[1], ex[2], ex[3], ex[5],
    )  # fmt: skip
    kwargs = dict(
        PROB=prob, HAS_WEIGHT=has_weight, SMOOTH=smooth, NEED_W=has_weight and (prob or smooth),
        COMPUTE_DX=dx is not None, COMPUTE_DY=dy is not None,
        # int64 offsets when an index of a tensor read or written can pass int32.
        I64=_index_past_int32(math.prod(_pos_shape(x)), C) or _i64(x, target, g, dx, dy, gz),
        BLOCK_P=bp, BLOCK_C=bc, XFORM=ex[0], ZLOSS=gz is not None and ex[5] > 0.0,
        **_launch_opts(num_warps, C),
    )  # fmt: skip
    return (grid,), args, kwargs


def _launch_scale(dx: Tensor, target: Tensor, g: Tensor, ignore_index: int, prob: bool) -> None:
    key = ("scale", dx.shape, dx.stride(), target.shape, target.stride(), g.shape, g.stride(),
           ignore_index, prob, FORCE_BLOCK_C, FORCE_BLOCK_P, FORCE_NUM_WARPS, FORCE_NUM_STAGES)
    cfg = _cached(key, lambda: _scale_config(dx, target, g, ignore_index, prob))
    if cfg is None:  # exotic layout: a plain torch multiply (no early exit, still no sync)
        f = g.to(torch.float32)
        if not prob:
            f = torch.where(target == ignore_index, 1.0, f)
        dx.copy_(dx * f.unsqueeze(_class_dim(dx)))
        return
    grid, args, kwargs = cfg
    _kernels().ce_scale_kernel[grid](dx, target, g, *args, **kwargs)


def _scale_config(
    dx: Tensor, target: Tensor, g: Tensor, ignore_index: int, prob: bool
) -> tuple[tuple[int], tuple[Any, ...], dict[str, Any]] | None:
    C = dx.shape[_class_dim(dx)]
    geo = _geometry(dx, [(target, prob), (g, False)])
    if geo is None:
        return None
    sizes, (ds, ts, gs) = geo
    bp, bc, num_warps = _tiles(sizes, C, ds, kind="bwd")
    n_pblocks, grid = _grid(sizes, bp)
    args = (sizes[1], sizes[2], C, n_pblocks, *ds, *ts[:3], *gs[:3], ignore_index)
    i64 = _index_past_int32(math.prod(_pos_shape(dx)), C) or _i64(dx, target, g)
    kwargs = dict(PROB=prob, BLOCK_P=bp, BLOCK_C=bc, I64=i64, **_launch_opts(num_warps, C))
    return (grid,), args, kwargs


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------
def _fwd_outputs(x: Tensor, prob: bool, fused: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    pos = _pos_shape(x)
    n = math.prod(pos)
    losses = x.new_empty(pos, dtype=torch.float32)
    flags = x.new_zeros((_flags.SIZE,), dtype=torch.int32)
    lse = x.new_empty((n,), dtype=torch.float32)
    wy = x.new_empty((n if prob else 0,), dtype=torch.float32)
    dx = torch.empty_like(x) if fused else x.new_empty((0,))
    return losses, flags, lse, wy, dx


def _fwd_impl(
    x: Tensor, target: Tensor, weight: _OptTensor, ignore_index: int, label_smoothing: float,
    prob_target: bool, check_softmax: bool, fused: bool, inplace_backward: bool, out_max: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(losses, flags, lse, sum_c w_c y'_c [prob targets], unscaled gradient [fused]).
    ``out_max``: losses of this magnitude or more are counted as overflowing the output dtype."""
    losses, flags, lse, wy, dx = _fwd_outputs(x, prob_target, fused)
    if losses.numel() > 0:
        _launch_fwd(x, target, weight, losses, lse, wy, dx if fused else None, flags,
                    ignore_index, label_smoothing, prob_target, check_softmax, out_max)  # fmt: skip
    return losses, flags, lse, wy, dx


_ce_fwd = torch.library.custom_op("safeloss::triton_ce_fwd", _fwd_impl, mutates_args=())


@_ce_fwd.register_fake
def _(x, target, weight, ignore_index, label_smoothing, prob_target, check_softmax, fused, inplace_backward, out_max):  # type: ignore[no-untyped-def]
    return _fwd_outputs(x, prob_target, fused)


def _bwd_impl(
    x: Tensor, target: Tensor, weight: _OptTensor, lse: Tensor, wy: Tensor, grad: Tensor,
    ignore_index: int, label_smoothing: float, prob_target: bool, compute_dx: bool, compute_dy: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(d/dx or empty, d/dtarget or empty), scaled by the upstream per-position gradient."""
    dx = torch.empty_like(x) if compute_dx else x.new_empty((0,))
    dy = torch.empty_like(target) if compute_dy else x.new_empty((0,))
    if lse.numel() > 0 and x.numel() > 0 and (compute_dx or compute_dy):
        _launch_bwd(x, target, weight, lse, wy, grad, dx if compute_dx else None, dy if compute_dy else None,
                    ignore_index, label_smoothing, prob_target)  # fmt: skip
    return dx, dy


_ce_bwd = torch.library.custom_op("safeloss::triton_ce_bwd", _bwd_impl, mutates_args=())


@_ce_bwd.register_fake
def _(x, target, weight, lse, wy, grad, ignore_index, label_smoothing, prob_target, compute_dx, compute_dy):  # type: ignore[no-untyped-def]
    dx = torch.empty_like(x) if compute_dx else x.new_empty((0,))
    dy = torch.empty_like(target) if compute_dy else x.new_empty((0,))
    return dx, dy


def _bwd_inplace_impl(
    x: Tensor, target: Tensor, weight: _OptTensor, lse: Tensor, wy: Tensor, grad: Tensor,
    ignore_index: int, label_smoothing: float, prob_target: bool, compute_dy: bool,
) -> Tensor:  # fmt: skip
    """Overwrite the logits x with d/dx (each element is read before it is written); returns d/dtarget or empty."""
    dy = torch.empty_like(target) if compute_dy else x.new_empty((0,))
    if lse.numel() > 0 and x.numel() > 0:
        _launch_bwd(x, target, weight, lse, wy, grad, x, dy if compute_dy else None,
                    ignore_index, label_smoothing, prob_target)  # fmt: skip
    return dy


_ce_bwd_inplace = torch.library.custom_op(
    "safeloss::triton_ce_bwd_inplace", _bwd_inplace_impl, mutates_args=("x",)
)


@_ce_bwd_inplace.register_fake
def _(x, target, weight, lse, wy, grad, ignore_index, label_smoothing, prob_target, compute_dy):  # type: ignore[no-untyped-def]
    return torch.empty_like(target) if compute_dy else x.new_empty((0,))


def _scale_impl(dx: Tensor, target: Tensor, grad: Tensor, ignore_index: int, prob_target: bool) -> None:
    """Fused mode: dx *= upstream gradient per position, in place; rows with factor 1 are skipped."""
    if dx.numel() > 0:
        _launch_scale(dx, target, grad, ignore_index, prob_target)


_ce_scale_ = torch.library.custom_op("safeloss::triton_ce_scale_", _scale_impl, mutates_args=("dx",))


@_ce_scale_.register_fake
def _(dx, target, grad, ignore_index, prob_target):  # type: ignore[no-untyped-def]
    return None


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, target, weight, ignore_index, eps, prob, _check, fused, inplace, _out_max = inputs
    _losses, flags, lse, wy, dx = output
    ctx.mark_non_differentiable(flags, lse, wy, dx)
    # Fused mode already holds the gradient: keep the logits alive only if d/dtarget needs them.
    keep_x = not fused or (prob and target.requires_grad)
    ctx.save_for_backward(x if keep_x else None, target, weight, lse, wy, dx if fused else None)
    ctx.cfg = (ignore_index, eps, prob, fused, inplace and _may_take_gradient(x))


def _backward(ctx: Any, g: Tensor, *_unused: Any) -> tuple[Any, ...]:
    _reused(ctx)
    x, target, weight, lse, wy, dx = ctx.saved_tensors
    gx, gy = _grads(torch.ops.safeloss, x, target, weight, lse, wy, dx, g, ctx.cfg,
                    ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    ctx.scaled = gx is dx is not None
    return gx, gy, None, None, None, None, None, None, None, None


def _reused(ctx: Any) -> None:
    """A second backward through a fused_grad node whose stored gradient the first one scaled
    in place (``retain_graph=True``): say so, before autograd's saved-tensor version check
    blames "an inplace operation" the caller never made."""
    if getattr(ctx, "scaled", False):
        from ..core.errors import BackendError

        raise BackendError(
            "fused_grad=True computes the gradient in the forward pass and scales it in place in "
            "backward, so a second backward through the same graph (retain_graph=True) cannot "
            "reuse it; stock torch, and safeloss without fused_grad, allow it.\nFix: "
            "fused_grad=False for a graph that is backpropagated more than once"
        )


def _grads(
    ops: Any, x: Tensor | None, target: Tensor, weight: Tensor | None, lse: Tensor, wy: Tensor | None,
    dx: Tensor | None, g: Tensor, cfg: tuple[Any, ...], need_dx: bool, need_target: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """(d/dx, d/dtarget) from the saved forward state; ``ops``: the custom ops, or their eager
    implementations (``_EagerOps``)."""
    ignore_index, eps, prob, fused, inplace = cfg
    need_dy = prob and need_target
    gx = gy = None
    if torch.is_grad_enabled() and (need_dx or need_dy):
        # create_graph=True (double backward, gradient penalties, Hessian-vector products): the
        # kernels' outputs carry no graph, so differentiate torch's formula instead.
        return _differentiable_grads(x, target, weight, g, ignore_index, eps, prob, need_dx, need_dy)
    if (need_dx or need_dy) and not torch.compiler.is_compiling() and (
            _legacy_batched(g) or _functorch_wrapped(g)):
        return _batched_grads(x, target, weight, dx, g, cfg, need_dx, need_dy)
    if fused:
        if need_dx:
            # The op bumps dx's version: a second backward (retain_graph) is refused (_reused;
            # else the saved-tensor check) instead of rescaling the stored gradient twice.
            ops.triton_ce_scale_(dx, target, g, ignore_index, prob)
            gx = dx
        if need_dy:
            gy = ops.triton_ce_bwd(x, target, weight, lse, wy, g, ignore_index, eps, prob, False, True)[1]
    elif need_dx and inplace:
        gy = ops.triton_ce_bwd_inplace(x, target, weight, lse, wy, g, ignore_index, eps, prob, need_dy)
        gx = x
        gy = gy if need_dy else None
    elif need_dx or need_dy:
        gx, gy = ops.triton_ce_bwd(x, target, weight, lse, wy, g, ignore_index, eps, prob, need_dx, need_dy)
        gx = gx if need_dx else None
        gy = gy if need_dy else None
    return gx, gy


_legacy_batched = torch._C._functorch.is_legacy_batchedtensor
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _batched_grads(
    x: Tensor | None, target: Tensor, weight: Tensor | None, dx: Tensor | None, g: Tensor,
    cfg: tuple[Any, ...], need_dx: bool, need_dy: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Backward on a batched upstream gradient (``torch.autograd.grad(..., is_grads_batched=True)``,
    ``jacobian`` / ``hessian`` with ``vectorize=True``, a vmap over ``autograd.grad``): the
    kernels read storage, which a batched tensor has none of, so torch's ops, out of place."""
    ignore_index, eps, prob, fused, _inplace = cfg
    gx = gy = None
    if fused and need_dx and dx is not None:  # the stored gradient, scaled (as _launch_scale's fallback)
        f = g.to(_F32)
        if not prob:
            f = torch.where(target == ignore_index, 1.0, f)
        gx = (dx * f.unsqueeze(_class_dim(dx))).to(dx.dtype)
        need_dx = False
    need_dy = prob and need_dy
    if need_dx or need_dy:
        with torch.enable_grad():  # (backward runs without grad mode: the formula needs it)
            ax, ay = _differentiable_grads(x, target, weight, g, ignore_index, eps, prob, need_dx,
                                           need_dy, create_graph=False)
        gx = gx if ax is None else ax
        gy = ay
    return gx, gy


def _differentiable_grads(
    x: Tensor | None, target: Tensor, weight: Tensor | None, g: Tensor, ignore_index: int,
    eps: float, prob: bool, need_dx: bool, need_dy: bool, create_graph: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """First derivatives as differentiable torch ops (the same values as the kernels); as plain
    values with ``create_graph=False``."""
    from ..core.checks import bad_target_mask
    from ..core.errors import BackendError
    from .torch_backend import _stock_cross_entropy

    if x is None:
        raise BackendError(
            "fused_grad=True computes the gradient in the forward pass, which cannot be "
            "differentiated again (create_graph=True).\nFix: fused_grad=False for double backward"
        )
    xf = x.float()
    if prob:
        loss = _stock_cross_entropy(xf, target.to(xf.dtype), weight, label_smoothing=eps, reduction="none")
    else:
        t = target.long()
        C = x.shape[0 if x.dim() == 1 else 1]
        bad = bad_target_mask(t, C, ignore_index)  # zero gradient, as in the kernel
        loss = _stock_cross_entropy(xf, t.masked_fill(bad, ignore_index), weight,
                                    ignore_index=ignore_index, label_smoothing=eps, reduction="none")
    wrt = [v for v, need in ((x, need_dx), (target, need_dy)) if need]
    grads = list(torch.autograd.grad(loss, wrt, g.to(loss.dtype), create_graph=create_graph))
    gx = grads.pop(0).to(x.dtype) if need_dx else None
    gy = grads.pop(0).to(target.dtype) if need_dy else None
    return gx, gy


_ce_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Eager fast path
# --------------------------------------------------------------------------------------------
# A custom op call goes through the dispatcher, schema checks and a Python autograd wrapper: tens
# of microseconds per call, which is most of the cost of a small loss. In eager mode on plain
# tensors the same implementations run behind a plain autograd.Function (same context, same
# backward). The custom ops remain what torch.compile, export and tensor subclasses see.
class _EagerOps:
    """The custom ops' names, calling the implementations directly (eager backward); unused
    results are None rather than empty tensors (an allocation each)."""

    @staticmethod
    def triton_ce_bwd(
        x: Tensor, target: Tensor, weight: Tensor | None, lse: Tensor, wy: Tensor | None, grad: Tensor,
        ignore_index: int, label_smoothing: float, prob_target: bool, compute_dx: bool, compute_dy: bool,
    ) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
        dx = torch.empty_like(x) if compute_dx else None
        dy = torch.empty_like(target) if compute_dy else None
        if lse.numel() > 0 and x.numel() > 0 and (compute_dx or compute_dy):
            _launch_bwd(x, target, weight, lse, wy, grad, dx, dy, ignore_index, label_smoothing, prob_target)
        return dx, dy

    @staticmethod
    def triton_ce_bwd_inplace(x: Tensor, *args: Any) -> Tensor:
        dy = _bwd_inplace_impl(x, *args)
        torch.autograd.graph.increment_version(x)  # as the mutating op would: stale users fail loudly
        return dy

    @staticmethod
    def triton_ce_scale_(dx: Tensor, *args: Any) -> None:
        _scale_impl(dx, *args)
        torch.autograd.graph.increment_version(dx)


class _EagerCE(torch.autograd.Function):
    """The eager form of ``safeloss::triton_ce_fwd``: the same kernels and backward, returning
    only what a caller uses and keeping the rest on the context, so no unused output is
    allocated, wrapped, or given a zero gradient in backward. With ``p`` (a Problem), the
    shared reduction (``core.reduction``) runs inside this node too, and its derivative in its
    backward: two autograd nodes fewer per call, which dominate at small shapes."""

    # The classic forward(ctx, ...) form: with a separate setup_context, Function.apply binds the
    # arguments through inspect.signature on every call (tens of microseconds).
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, target: Tensor, weight: Tensor | None, cfg: tuple[Any, ...],
        p: Problem | None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        ignore_index, eps, prob, check_softmax, fused, inplace, out_max, pos, n = cfg
        losses = x.new_empty(pos, dtype=_F32)
        flags = x.new_zeros(_flags.SIZE, dtype=torch.int32)
        lse = x.new_empty(n, dtype=_F32)
        wy = x.new_empty(n, dtype=_F32) if prob else None
        dx = torch.empty_like(x) if fused else None
        if n > 0:
            _launch_fwd(x, target, weight, losses, lse, wy, dx, flags, ignore_index, eps, prob,
                        check_softmax, out_max)  # fmt: skip
        ctx.set_materialize_grads(False)
        # Fused mode already holds the gradient: keep the logits alive only if d/dtarget needs them.
        keep_x = not fused or (prob and target.requires_grad)
        ctx.save_for_backward(x if keep_x else None, target, weight, lse, wy, dx)
        ctx.cfg = (ignore_index, eps, prob, fused, inplace and _may_take_gradient(x))
        if p is None:
            ctx.reduced = None
            ctx.mark_non_differentiable(flags)
            return losses, flags, None
        out, denom = reduction.reduce_losses(losses, p)
        ctx.reduced = (p.reduction, p.out_dtype, denom, losses.shape)
        if out is losses:  # reduction "none" in float32: the losses are the result
            ctx.mark_non_differentiable(flags)
            return out, flags, None
        ctx.mark_non_differentiable(flags, losses)
        return out, flags, losses

    @staticmethod
    def backward(ctx: Any, g: Tensor | None, *_unused: Any) -> tuple[Any, ...]:  # type: ignore[override]
        if g is None:
            return None, None, None, None, None
        if ctx.reduced is not None:
            g = reduction.losses_grad(g, *ctx.reduced)
        _reused(ctx)
        x, target, weight, lse, wy, dx = ctx.saved_tensors
        gx, gy = _grads(_EagerOps, x, target, weight, lse, wy, dx, g, ctx.cfg,
                        ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.scaled = gx is dx is not None
        return gx, gy, None, None, None


# What _EagerCE.apply ends in, without its Python layer (a functorch check and a generator over
# the arguments): used where no functorch transform is active, dead functorch wrappers unwrapped
# as Function.apply would.
_apply_eager = torch._C._FunctionBase.__dict__["apply"].__get__(None, _EagerCE)
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def _eager(x: Tensor) -> bool:
    # Plain tensors outside any tracing only. torch.compile, torch.jit.trace and dispatch modes
    # (make_fx, FakeTensorMode, FlopCounterMode, ...) must see the custom op, not its insides
    # (a Triton launch is invisible to them); fake / functional / subclass tensors need it too.
    return (
        type(x) in _PLAIN
        and not torch.compiler.is_compiling()
        and not torch._C._is_tracing()
        and _get_current_dispatch_mode() is None
    )


_PLAIN = (Tensor, torch.nn.Parameter)


# --------------------------------------------------------------------------------------------
# The seam
# --------------------------------------------------------------------------------------------
def row_losses(
    input: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    prob_target: bool,
    inplace_backward: bool = False,
    check_softmax: bool = True,
    fused_grad: bool = False,
    out_max: float = math.inf,
    reduce: Problem | None = None,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Per-position cross-entropy (float32, positions shape) and the int32 findings vector.

    ``inplace_backward``: the backward writes the gradient into the logits' storage and returns
    it (saves one logits-sized allocation; the logits are destroyed, so only for logits nothing
    else needs; other autograd users of them then fail loudly on the version counter). Not for
    a leaf requiring grad or a view of one (``_may_take_gradient``): the caller's own tensor.
    ``fused_grad``: the forward also writes the unscaled gradient (row read once when C <= 16384,
    8192 with probability targets or label smoothing);
    the backward only rescales rows whose upstream gradient is not exactly 1. Pays for
    ``reduction="sum"``-style upstream gradients of 1; with a mean (upstream 1/n) the rescale
    costs a read and a write, more than the plain path. The gradient buffer is held from forward
    to backward; ``inplace_backward`` is ignored in this mode.
    ``out_max``: per-position losses of this magnitude or more are counted in
    ``_flags.OVERFLOW`` (they become inf in a half-precision output).
    ``reduce``: the call's Problem, to reduce the losses here (``core.reduction``) where that
    saves autograd nodes (eager calls on plain tensors): then (losses, flags, result), the result
    None where the caller reduces.
    """
    fused = bool(fused_grad) and input.requires_grad and torch.is_grad_enabled()
    # A tensor subclass among the target and weight takes the custom op too: its
    # __torch_function__ sees the call (stock's result has the subclass's type).
    if _eager(input) and type(target) in _PLAIN and (weight is None or type(weight) in _PLAIN):
        pos = tuple(_pos_shape(input))
        cfg = (int(ignore_index), float(label_smoothing), bool(prob_target), bool(check_softmax),
               fused, bool(inplace_backward), float(out_max), pos, math.prod(pos))
        if torch._C._are_functorch_transforms_active():
            out, flags, losses = _EagerCE.apply(input, target, weight, cfg, reduce)
        else:
            out, flags, losses = _apply_eager(
                _unwrap_if_dead(input), _unwrap_if_dead(target),
                None if weight is None else _unwrap_if_dead(weight), cfg, reduce)
        if reduce is None:
            return out, flags
        return (out if losses is None else losses), flags, out
    losses, flags, _lse, _wy, _dx = torch.ops.safeloss.triton_ce_fwd(
        input, target, weight, int(ignore_index), float(label_smoothing), bool(prob_target),
        bool(check_softmax), fused, bool(inplace_backward) and _may_take_gradient(input), float(out_max),
    )  # fmt: skip
    return (losses, flags) if reduce is None else (losses, flags, None)


class Planned:
    """The eager call of one planned signature (``safeloss.core.plan``; made and called by the
    cross-entropy op's ``pipeline``, which has already found the call eager on plain tensors: no
    compile, tracer, dispatch mode or functorch transform): :func:`row_losses` with ``reduce``,
    with its per-signature arguments worked out once."""

    __slots__ = ("cfg", "cfg_fused", "fused_grad")

    def __init__(self, p: Problem, inplace_backward: bool, fused_grad: bool, out_max: float,
                 check_softmax: bool = True) -> None:
        # check_softmax: False only for the benchmark's checks-compiled-out provider
        pos = tuple(_pos_shape(p.input))
        head = (int(p.ignore_index), float(p.label_smoothing), bool(p.prob), bool(check_softmax))
        tail = (bool(inplace_backward), float(out_max), pos, math.prod(pos))
        self.cfg, self.cfg_fused = (*head, False, *tail), (*head, True, *tail)
        self.fused_grad = bool(fused_grad)

    def __call__(self, x: Tensor, t: Tensor, w: Tensor | None, p: Problem) -> tuple[Tensor, Tensor, Tensor]:
        """(losses, flags, result) for these tensors; ``p``: their Problem."""
        cfg = self.cfg_fused if self.fused_grad and x.requires_grad and _grad_enabled() else self.cfg
        out, flags, losses = _apply_eager(
            _unwrap_if_dead(x), _unwrap_if_dead(t),
            None if w is None else _unwrap_if_dead(w.float().contiguous()), cfg, p)
        return (out if losses is None else losses), flags, out


_F32 = torch.float32
_grad_enabled = torch._C.is_grad_enabled


# --------------------------------------------------------------------------------------------
# Host-cost measurement: launches stubbed
# --------------------------------------------------------------------------------------------
class _NoLaunch:
    """A kernel whose ``kernel[grid](...)`` launches nothing (see :func:`stubbed_launches`)."""

    __slots__ = ()

    def __getitem__(self, grid: object) -> Any:
        return _no_launch


def _no_launch(*args: Any, **kwargs: Any) -> None:
    return None


def _fwd_stand_in(x: Tensor, target: Tensor, weight: Tensor, losses: Tensor, *args: Any, **kwargs: Any) -> None:
    # The forward's losses feed the reduction and the finite-result check: zeros, so that a
    # stubbed call is a clean call (uninitialized memory would read as NaN at random).
    losses.zero_()


class _NoLaunchFwd(_NoLaunch):
    __slots__ = ()

    def __getitem__(self, grid: object) -> Any:
        return _fwd_stand_in


class _NoKernels:
    """Stands in for ``triton_kernels``: every kernel launches nothing."""

    ce_fwd_kernel = _NoLaunchFwd()

    def __getattr__(self, name: str) -> _NoLaunch:
        return _NoLaunch()


@contextlib.contextmanager
def stubbed_launches() -> Iterator[None]:
    """Every Triton kernel launch of this backend becomes a no-op, and the backend accepts CPU
    tensors without ``TRITON_INTERPRET``: what is left of a ``backend="triton"`` call is the host
    work around the kernels (argument checks, plans, launch configurations, the outputs
    allocated with their real shapes, autograd, reduction, findings), measurable on any machine
    (``benchmarks/cpu_overhead.py``). Results hold no meaningful values: a benchmark hook,
    never for real calls; not thread-safe (it swaps module attributes).
    ``safeloss.parallel.triton_stats.stubbed_launches`` covers the vocab-parallel kernel too."""
    global _kernels, unavailable_reason
    saved = _kernels, unavailable_reason
    stub = _NoKernels()
    _kernels = lambda: stub  # noqa: E731
    unavailable_reason = _stub_reason
    try:
        yield
    finally:
        _kernels, unavailable_reason = saved


NO_LAUNCH = _NoLaunch()


def _stub_reason(device: torch.device) -> str | None:
    err = _triton_import_error()
    if err is not None or torch.device(device).type in ("cpu", "cuda"):
        return err
    return f"Triton runs on CUDA tensors, not on {torch.device(device).type} tensors"

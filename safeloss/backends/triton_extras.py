"""Triton backend of the extras (softcap, temperature, z-loss, statistics): the cross-entropy
kernels of ``triton_kernels`` with the extras inside their passes.

The seam is :func:`rows`: per-position cross-entropy and z-loss term (differentiable), the
log-sum-exp, entropy and argmax-hit of the capped, scaled logits, and the int32 findings vector,
from one forward kernel pass over the logits; the backward is one kernel pass too (d/dlogits
through the cap and the temperature, both upstream gradients inside). The reduction is the
caller's (``core.reduction`` and ``core.extras.reduce_z_loss``: their denominators differ).

As ``triton_backend``: eager calls on plain tensors run an ``autograd.Function`` over the
launchers; torch.compile, make_fx, fake tensors and subclasses see the custom ops
``safeloss::triton_cex_fwd`` / ``safeloss::triton_cex_bwd`` (fake implementations, registered
autograd), so ``torch.compile(fullgraph=True)`` traces them without a graph break. Double
backward differentiates the same formulas as torch ops (``core.extras``).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from ..core import _flags
from ..core import extras as X
from ..core.checks import bad_target_mask
from .triton_backend import _eager, _launch_bwd, _launch_fwd, _pos_shape, extras_params

__all__ = ["rows"]

_OptTensor = Optional[Tensor]  # noqa: UP045  (custom_op schemas are inferred from annotations)


def _outputs(x: Tensor, prob: bool, z_loss: float, stats: bool
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(losses, zl, lse, entropy, hit, flags, wy): empty (0,) tensors for what the call does not
    compute (no z-loss, no stats, class-index targets' wy)."""
    pos = _pos_shape(x)
    n = math.prod(pos)
    f32 = torch.float32
    losses = x.new_empty(pos, dtype=f32)
    zl = x.new_empty(pos if z_loss > 0.0 else (0,), dtype=f32)
    lse = x.new_empty(pos, dtype=f32)
    ent = x.new_empty(pos if stats else (0,), dtype=f32)
    hit = x.new_empty(pos if stats and not prob else (0,), dtype=torch.int8)
    flags = x.new_zeros((_flags.SIZE,), dtype=torch.int32)
    wy = x.new_empty((n if prob else 0,), dtype=f32)
    return losses, zl, lse, ent, hit, flags, wy


def _fwd_impl(
    x: Tensor, target: Tensor, weight: _OptTensor, ignore_index: int, eps: float, prob: bool,
    check_softmax: bool, out_max: float, softcap: float, temperature: float, z_loss: float, stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """One forward pass: see :func:`_outputs`; ``softcap`` 0.0 for none."""
    losses, zl, lse, ent, hit, flags, wy = _outputs(x, prob, z_loss, stats)
    if losses.numel() > 0:
        ex = extras_params(softcap or None, temperature, z_loss, stats)
        _launch_fwd(x, target, weight, losses, lse.view(-1), wy, None, flags, ignore_index, eps, prob,
                    check_softmax, out_max, ex, zl if z_loss > 0.0 else None, ent if stats else None,
                    hit if stats and not prob else None)  # fmt: skip
    return losses, zl, lse, ent, hit, flags, wy


_cex_fwd = torch.library.custom_op("safeloss::triton_cex_fwd", _fwd_impl, mutates_args=())


@_cex_fwd.register_fake
def _(x, target, weight, ignore_index, eps, prob, check_softmax, out_max, softcap, temperature, z_loss, stats):  # type: ignore[no-untyped-def]
    return _outputs(x, prob, z_loss, stats)


def _bwd_impl(
    x: Tensor, target: Tensor, weight: _OptTensor, lse: Tensor, wy: Tensor, g: Tensor, gz: _OptTensor,
    ignore_index: int, eps: float, prob: bool, softcap: float, temperature: float, z_loss: float,
    compute_dx: bool, compute_dy: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(d/dx or empty, d/dtarget or empty) for the upstream gradients ``g`` (cross-entropy) and
    ``gz`` (z-loss term; None: none), per position."""
    dx = torch.empty_like(x) if compute_dx else x.new_empty((0,))
    dy = torch.empty_like(target) if compute_dy else x.new_empty((0,))
    _launch_bwd_x(x, target, weight, lse, wy, g, gz, dx if compute_dx else None, dy if compute_dy else None,
                  ignore_index, eps, prob, softcap, temperature, z_loss)  # fmt: skip
    return dx, dy


def _launch_bwd_x(
    x: Tensor, target: Tensor, weight: Tensor | None, lse: Tensor, wy: Tensor, g: Tensor, gz: Tensor | None,
    dx: Tensor | None, dy: Tensor | None, ignore_index: int, eps: float, prob: bool, softcap: float,
    temperature: float, z_loss: float,
) -> None:  # fmt: skip
    if lse.numel() == 0 or x.numel() == 0 or (dx is None and dy is None):
        return
    ex = extras_params(softcap or None, temperature, z_loss, False)
    _launch_bwd(x, target, weight, lse.view(-1), wy if prob else lse.view(-1), g, dx, dy, ignore_index,
                eps, prob, ex, gz if z_loss > 0.0 else None)  # fmt: skip


_cex_bwd = torch.library.custom_op("safeloss::triton_cex_bwd", _bwd_impl, mutates_args=())


@_cex_bwd.register_fake
def _(x, target, weight, lse, wy, g, gz, ignore_index, eps, prob, softcap, temperature, z_loss, compute_dx, compute_dy):  # type: ignore[no-untyped-def]
    dx = torch.empty_like(x) if compute_dx else x.new_empty((0,))
    dy = torch.empty_like(target) if compute_dy else x.new_empty((0,))
    return dx, dy


# --------------------------------------------------------------------------------- autograd
def _grads(
    x: Tensor, target: Tensor, weight: Tensor | None, lse: Tensor, wy: Tensor, g_ce: Tensor | None,
    g_zl: Tensor | None, cfg: tuple[Any, ...], need_dx: bool, need_dy: bool, ops: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """(d/dx, d/dtarget) for the upstream gradients of the two differentiable outputs; ``ops``:
    through the custom op (traced code), else the launcher."""
    ignore_index, eps, prob, _check, _out_max, softcap, temperature, z_loss, _stats = cfg
    need_dy = need_dy and prob
    if not (need_dx or need_dy) or (g_ce is None and (g_zl is None or not z_loss)):
        return None, None
    pos = _pos_shape(x)
    g = g_ce if g_ce is not None else x.new_zeros(pos, dtype=torch.float32)
    gz = g_zl if z_loss > 0.0 and g_zl is not None and g_zl.numel() else None
    if torch.is_grad_enabled():
        # create_graph=True (double backward, gradient penalties): differentiate the formulas.
        return _differentiable_grads(x, target, weight, g, gz, cfg, need_dx, need_dy)
    if X.batched(g, gz):  # the kernels cannot read a batched gradient: the formulas, no graph
        with torch.enable_grad():
            return _differentiable_grads(x, target, weight, g, gz, cfg, need_dx, need_dy, False)
    if ops:
        dx, dy = torch.ops.safeloss.triton_cex_bwd(x, target, weight, lse, wy, g, gz, ignore_index, eps,
                                                   prob, softcap, temperature, z_loss, need_dx, need_dy)
    else:
        dx = torch.empty_like(x) if need_dx else None
        dy = torch.empty_like(target) if need_dy else None
        _launch_bwd_x(x, target, weight, lse, wy, g, gz, dx, dy, ignore_index, eps, prob, softcap,
                      temperature, z_loss)  # fmt: skip
    return (dx if need_dx else None), (dy if need_dy else None)


def _differentiable_grads(
    x: Tensor, target: Tensor, weight: Tensor | None, g: Tensor, gz: Tensor | None,
    cfg: tuple[Any, ...], need_dx: bool, need_dy: bool, create_graph: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """First derivatives as differentiable torch ops (``core.extras``'s formulas, the kernels'
    values); plain values with ``create_graph=False``."""
    ignore_index, eps, prob, _check, _out_max, softcap, temperature, z_loss, _stats = cfg
    ex = X.Extras(softcap or None, temperature, z_loss, False)
    one = x.dim() == 1
    xf = (x.unsqueeze(0) if one else x).float()
    zt = X.transform(xf, ex)
    lse = torch.logsumexp(zt, 1)
    logp = zt - lse.unsqueeze(1)
    w = None if weight is None else weight.float()
    if prob:
        t = (target.unsqueeze(0) if one else target).to(logp.dtype)
        valid = None
    else:
        t = (target.unsqueeze(0) if one else target).long()
        valid = (t != ignore_index) & ~bad_target_mask(t, xf.shape[1], ignore_index)
    ce = X.ce_rows(logp, t, valid, w, eps, prob, 1)
    outs, grads_out = [ce], [g.reshape(ce.shape).to(ce.dtype)]
    if gz is not None:
        outs.append(X.z_loss_rows(lse, valid, z_loss))
        grads_out.append(gz.reshape(ce.shape).to(ce.dtype))
    wrt = [v for v, need in ((x, need_dx), (target, need_dy)) if need]
    got = iter(torch.autograd.grad(outs, wrt, grads_out, create_graph=create_graph, allow_unused=True))
    gx = next(got) if need_dx else None
    gy = next(got) if need_dy else None
    return (None if gx is None else gx.to(x.dtype)), (None if gy is None else gy.to(target.dtype))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, target, weight, *cfg = inputs
    _losses, _zl, lse, ent, hit, flags, wy = output
    ctx.mark_non_differentiable(lse, ent, hit, flags, wy)
    ctx.save_for_backward(x, target, weight, lse, wy)
    ctx.cfg = tuple(cfg)


def _backward(ctx: Any, g_ce: Tensor, g_zl: Tensor, *_unused: Any) -> tuple[Any, ...]:
    x, target, weight, lse, wy = ctx.saved_tensors
    gx, gy = _grads(x, target, weight, lse, wy, g_ce, g_zl, ctx.cfg, ctx.needs_input_grad[0],
                    ctx.needs_input_grad[1], ops=True)
    return (gx, gy) + (None,) * 10


_cex_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerCEX(torch.autograd.Function):
    """The eager form of ``safeloss::triton_cex_fwd`` (the same launchers and backward, without
    the op dispatch's per-call cost): (losses, zl, lse, entropy, hit, flags, wy)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, target: Tensor, weight: Tensor | None,  # type: ignore[override]
                cfg: tuple[Any, ...]) -> tuple[Tensor, ...]:
        out = _fwd_impl(x, target, weight, *cfg)
        _losses, _zl, lse, ent, hit, flags, wy = out
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse, ent, hit, flags, wy)
        ctx.save_for_backward(x, target, weight, lse, wy)
        ctx.cfg = cfg
        return out

    @staticmethod
    def backward(ctx: Any, g_ce: Tensor | None, g_zl: Tensor | None, *_unused: Any) -> tuple[Any, ...]:  # type: ignore[override]
        x, target, weight, lse, wy = ctx.saved_tensors
        gx, gy = _grads(x, target, weight, lse, wy, g_ce, g_zl, ctx.cfg, ctx.needs_input_grad[0],
                        ctx.needs_input_grad[1], ops=False)
        return gx, gy, None, None


# ------------------------------------------------------------------------------------ seam
def rows(
    x: Tensor, target: Tensor, weight: Tensor | None, *, ignore_index: int, label_smoothing: float,
    prob_target: bool, ex: X.Extras, out_max: float = math.inf, check_softmax: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None, Tensor]:
    """(cross-entropy, z-loss term or None, lse, entropy or None, hit or None, flags) per position
    of the capped, scaled logits (float32, positions shape; hit: int8, argmax of the raw logits ==
    target at counted positions, class-index targets with stats). ``x``: logits in any layout and
    float dtype; ``target`` and ``weight`` as ``triton_backend.row_losses`` takes them. The loss
    is 0 at ignored positions and NaN at invalid labels; the z-loss term 0 at both."""
    cfg = (int(ignore_index), float(label_smoothing), bool(prob_target), bool(check_softmax),
           float(out_max), float(ex.softcap or 0.0), float(ex.temperature), float(ex.z_loss),
           bool(ex.return_stats))
    if _eager(x):
        out = _EagerCEX.apply(x, target, weight, cfg)
    else:
        out = torch.ops.safeloss.triton_cex_fwd(x, target, weight, *cfg)
    losses, zl, lse, ent, hit, flags, _wy = out
    stats = ex.return_stats
    return (losses, zl if ex.z_loss > 0.0 else None, lse, ent if stats else None,
            hit if stats and not prob_target else None, flags)

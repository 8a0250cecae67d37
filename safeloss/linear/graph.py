"""The chunk loop as two custom ops, for the modes that trace a graph: ``torch.compile`` (Dynamo and
AOTAutograd), ``make_fx`` / ``torch.export`` and fake tensors.

Why ops and not the loop itself: a Python loop over ``range(0, N, rows)`` makes every tracer read
the batch size, so ``dynamic=True``, ``mark_dynamic``, an export with a dynamic batch dim and
``make_fx(tracing_mode="symbolic")`` all specialize it (a recompile per token count, a constraint
violation, a graph with N baked in); and the eager loop's reused buffers (``mm.out``, in-place
tiles) make a captured graph unreplayable. An opaque op is one node with symbolic shapes (its fake
implementation only allocates the output); the loop runs inside it, eagerly, on the real tensors.

Backward is a second op that runs the loop again with the per-position upstream gradient folded
in (the eager path's exact route): four matmuls instead of three, nothing mutated, and the logits
never exist in either graph. Higher-order gradients of these ops are not defined (a graph that
needs them: use the eager call, which supports double backward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .chunked import Spec, _Operands, run_loop


def _spec(num_classes: int, positions: int, ignore_index: int, eps: float, prob: bool,
          weight: Tensor | None, backend: str, tile_dtype: torch.dtype | None, max_rows: int | None,
          x: Tensor) -> Spec:
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    return Spec(num_classes=num_classes, positions=positions, ignore_index=ignore_index, eps=eps,
                prob=prob, weight=weight, backend=backend, work=work, tile_dtype=tile_dtype,
                max_rows=max_rows)


@torch.library.custom_op("safeloss::linear_ce_losses", mutates_args=())
def linear_ce_losses(
    x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, valid: Tensor, weight: Tensor | None,
    num_classes: int, positions: int, ignore_index: int, eps: float, prob: bool, backend: str,
    tile_dtype: torch.dtype | None, max_rows: int | None,
) -> Tensor:
    """Per-position losses (N,) or (N, D), in the work dtype; ``target`` holds no bad label."""
    sp = _spec(num_classes, positions, ignore_index, eps, prob, weight, backend, tile_dtype,
               max_rows, x)
    losses, _ = run_loop(_Operands(x, w, b, sp.work), target, valid, sp, (False,) * 4, None, True)
    assert losses is not None
    return losses


@linear_ce_losses.register_fake
def _(x, w, b, target, valid, weight, num_classes, positions, ignore_index, eps, prob, backend,  # type: ignore[no-untyped-def]
      tile_dtype, max_rows):
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = (x.shape[0],) if positions == 1 else (x.shape[0], positions)
    return x.new_empty(shape, dtype=work)


@torch.library.custom_op("safeloss::linear_ce_backward", mutates_args=())
def linear_ce_backward(
    grad: Tensor, x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, valid: Tensor,
    weight: Tensor | None, num_classes: int, positions: int, ignore_index: int, eps: float,
    prob: bool, backend: str, tile_dtype: torch.dtype | None, max_rows: int | None,
    need_dx: bool, need_dw: bool, need_db: bool, need_dq: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d/dx, d/dw, d/db, d/dtarget) for the upstream gradient ``grad``; a gradient that is not
    wanted is an empty tensor (custom ops return no None)."""
    sp = _spec(num_classes, positions, ignore_index, eps, prob, weight, backend, tile_dtype,
               max_rows, x)
    need = (need_dx, need_dw, need_db and b is not None, need_dq and prob)
    # Probability targets and K-dimensional heads differentiate stock's cross-entropy on each tile
    # with autograd, which a custom op's kernel runs without: inference_mode(False) restores it
    # (and turns grad mode on, which only those tiles want: they enable it themselves).
    with torch.inference_mode(False), torch.no_grad():
        _, g = run_loop(_Operands(x, w, b, sp.work), target, valid, sp, need, grad.to(sp.work), False)
    empty = x.new_empty(0)
    return (
        empty if g.dx is None else g.dx.to(x.dtype),
        empty.clone() if g.dw is None else g.dw.to(w.dtype),
        empty.clone() if g.db is None or b is None else g.db.to(b.dtype),
        empty.clone() if g.dq is None else g.dq.to(target.dtype),
    )


@linear_ce_backward.register_fake
def _(grad, x, w, b, target, valid, weight, num_classes, positions, ignore_index, eps, prob,  # type: ignore[no-untyped-def]
      backend, tile_dtype, max_rows, need_dx, need_dw, need_db, need_dq):
    def like(t: Tensor | None, wanted: bool) -> Tensor:
        return torch.empty_like(t) if wanted and t is not None else x.new_empty(0)

    return (like(x, need_dx), like(w, need_dw), like(b, need_db), like(target, need_dq and prob))


_SCALARS = ("num_classes", "positions", "ignore_index", "eps", "prob", "backend", "tile_dtype",
            "max_rows")


def _setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, w, b, target, valid, weight, *scalars = inputs
    ctx.save_for_backward(x, w, b, target, valid, weight)
    ctx.scalars = scalars


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, w, b, target, valid, weight = ctx.saved_tensors
    n = ctx.needs_input_grad
    need_q = bool(n[3]) and ctx.scalars[_SCALARS.index("prob")]
    dx, dw, db, dq = torch.ops.safeloss.linear_ce_backward(
        grad, x, w, b, target, valid, weight, *ctx.scalars, bool(n[0]), bool(n[1]),
        bool(n[2]) and b is not None, need_q)
    return (dx if n[0] else None, dw if n[1] else None, db if n[2] and b is not None else None,
            dq if need_q else None, None, None, *([None] * len(_SCALARS)))


linear_ce_losses.register_autograd(_backward, setup_context=_setup)


def losses(x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, valid: Tensor, sp: Spec) -> Tensor:
    """The per-position losses through the op (the graph's one node for the loop)."""
    return torch.ops.safeloss.linear_ce_losses(
        x, w, b, target, valid, sp.weight, sp.num_classes, sp.positions, sp.ignore_index,
        float(sp.eps), sp.prob, sp.backend, sp.tile_dtype, sp.max_rows,
    )

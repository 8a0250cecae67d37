"""DTensor logits, any layout, inside or outside ``torch.distributed.tensor.parallel.loss_parallel()``.

Every call of ``safeloss.cross_entropy`` / ``SafeCrossEntropyLoss`` (and, under ``safeloss.patch()``,
of the stock loss) with a DTensor argument lands here (``core.mode`` returns ``Mode.DTENSOR``).
What happens is decided from the placements alone, which every rank of the mesh holds alike, never
from values one rank sees, so every rank issues the same collectives:

* the class dim sharded on one mesh dim: that mesh dim is the vocab-parallel group of
  :mod:`safeloss.parallel.vocab` (three all-reduces, the logits never move), as stock
  ``loss_parallel()`` does, with every check;
* mesh dims that shard another dim of the logits (the batch, a sequence dim) keep it sharded: each
  rank computes its own positions, and the checks, the mean and the messages are agreed over those
  mesh dims too (a bad label on one data-parallel rank stops every rank, naming the global
  position);
* the classes not sharded at all (``Replicate``, ``Shard(0)``): each rank computes its positions on
  the single-device backends (Triton on CUDA), without any collective in the loss itself.

What is redistributed first, because no per-shard loss exists for it: ``Partial`` placements (the
sum is taken, as DTensor's own ops would), ``_StridedShard`` and a second mesh dim sharding the
classes (gathered), and, for probability targets given as a DTensor, a class-sharded dim (gathered,
as stock does outside ``loss_parallel()``). Targets follow the logits' layout (a DTensor target is
redistributed to it, gathered first when it lives on another mesh; a plain tensor target is taken
as the whole target where no mesh dim shards the positions, and is refused where one does, as stock ``loss_parallel()`` refuses it); a DTensor weight
is gathered (C values). The result is a DTensor: ``reduction="none"`` sharded like the positions,
``sum`` / ``mean`` replicated (the global value: the mean divides by the global count or weight).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from ..core.errors import TargetShapeError, fmt_shape, stock_class
from . import vocab


def _dtensor_module() -> object | None:
    # Nothing to import (or pay for) unless DTensor is in use: a DTensor input implies the module.
    return sys.modules.get("torch.distributed.tensor")


def is_dtensor(x: object) -> bool:
    mod = _dtensor_module()
    return mod is not None and isinstance(x, mod.DTensor)  # type: ignore[attr-defined]


def applies(input: object, target: object, weight: object) -> bool:
    """True when any tensor argument is a DTensor: such calls take this module's route."""
    return is_dtensor(input) or is_dtensor(target) or is_dtensor(weight)


def loss_parallel_active() -> bool:
    """Whether ``loss_parallel()`` is entered (its handlers are installed in DTensor's dispatcher).
    safeloss's route does not depend on it: the placements decide."""
    mod = _dtensor_module()
    lp = sys.modules.get("torch.distributed.tensor.parallel.loss")
    if mod is None or lp is None:
        return False
    handlers = mod.DTensor._op_dispatcher._custom_op_handlers  # type: ignore[attr-defined]
    return handlers.get(torch.ops.aten._log_softmax.default) is lp._log_softmax_handler


def full(t: object) -> object:
    """A DTensor as the whole tensor on every rank (a collective decided by its placements)."""
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


_EAGER_ONLY = ("safeloss.cross_entropy on DTensor logits runs eagerly under torch.compile (collectives "
               "and the ranks' agreement on the host); the rest of the function is compiled")


def run(
    input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str,
    label_smoothing: float, *, strict: bool | None, backend: str, owner: object | None,
    inplace_backward: bool = False, fused_grad: bool = False,
    extras: tuple[object, object, object, object] | None = None,
) -> object:
    """One call with DTensor logits (``input`` must be a DTensor); ``extras`` as ``vocab.run``'s.
    Returns the loss as a DTensor, or ``(loss, LossStats)`` of DTensors with ``return_stats``."""
    fn = _run
    if torch.compiler.is_compiling():
        # A graph break: the call runs eagerly between the compiled parts (see docs/compatibility.md).
        from torch._dynamo import disable

        fn = disable(_run, reason=_EAGER_ONLY)
    return fn(input, target, weight, ignore_index, reduction, label_smoothing, strict=strict,
              backend=backend, owner=owner, inplace_backward=inplace_backward, fused_grad=fused_grad,
              extras=extras)


def _positions_placements(placements: list, cdim: int, ndim: int) -> list:
    """The placements of a positions-shaped tensor (the logits without the class dim)."""
    from torch.distributed.tensor import Replicate, Shard

    out: list = []
    for pl in placements:
        if isinstance(pl, Shard) and ndim >= 2 and pl.dim != cdim:
            out.append(Shard(pl.dim if pl.dim < cdim else pl.dim - 1))
        else:
            out.append(Replicate())
    return out


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


def _run(
    input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str,
    label_smoothing: float, *, strict: bool | None, backend: str, owner: object | None,
    inplace_backward: bool, fused_grad: bool, extras: tuple[object, object, object, object] | None,
) -> object:
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = input.device_mesh  # type: ignore[attr-defined]
    ndim = input.dim()
    cdim = 0 if ndim <= 1 else 1
    shape = tuple(input.shape)

    # The layout to compute in, from the placements alone.
    placements = list(input.placements)  # type: ignore[attr-defined]
    new: list = []
    tp: int | None = None
    for i, pl in enumerate(placements):
        if mesh.size(i) == 1 or pl.is_replicate():
            new.append(pl if pl.is_replicate() or type(pl) is Shard else Replicate())
        elif type(pl) is Shard and ndim >= 1 and pl.dim == cdim and tp is None:
            tp = i
            new.append(pl)
        elif type(pl) is Shard and ndim >= 1 and pl.dim != cdim:
            new.append(pl)
        else:  # Partial, _StridedShard, a second class-sharding dim: no per-shard loss exists
            new.append(Replicate())
    prob_like = isinstance(target, DTensor) and tuple(target.shape) == shape and ndim >= 1
    if prob_like and tp is not None:
        new[tp] = Replicate()  # probability targets: the classes gathered, as stock does
        tp = None
    x = input if new == placements else input.redistribute(mesh, new)  # type: ignore[attr-defined]
    pos_pl = _positions_placements(new, cdim, ndim)
    positions = shape[1:] if ndim == 1 else shape[:1] + shape[2:]

    # The target, in the logits' layout.
    pre_error: BaseException | None = None
    # A nested target has no shape to read (it raises): vocab.run rejects it with every rank, in
    # its guarded phase (nothing here may raise on one rank's arguments alone).
    plain_target = isinstance(target, Tensor) and not target.is_nested
    tshape = tuple(target.shape) if plain_target else ()
    if isinstance(target, DTensor):
        if target.device_mesh != mesh:
            # Another mesh (decided from the meshes, alike on every rank): the whole target, taken
            # as replicated on the logits' mesh so that the layout below slices it like the
            # positions (a local slice, no collective; was: the whole target beside local rows).
            target = DTensor.from_local(target.full_tensor(), mesh, [Replicate()] * mesh.ndim, run_check=False)
        if prob_like:
            tpl = new
        elif tshape == positions:
            tpl = pos_pl
        elif len(tshape) == len(shape) and ndim >= 2 and tshape[1] == 1 and tshape[:1] + tshape[2:] == positions:
            tpl = [Shard(pl.dim) if isinstance(pl, Shard) and pl.dim != cdim else Replicate() for pl in new]
        else:
            tpl = [Replicate()] * mesh.ndim  # a shape validation rejects: its message needs all of it
        t_local = target.redistribute(mesh, tpl).to_local()
        if tpl == [Replicate()] * mesh.ndim and not all(isinstance(p, Replicate) for p in pos_pl):
            # The whole target with sharded logits: validation sees the global shapes first
            # and rejects it; the local one must not disagree with the shards.
            t_local = target.full_tensor()
    else:
        t_local = target
        if any(not isinstance(p, Replicate) for p in pos_pl) and plain_target:
            pre_error = stock_class(TargetShapeError, ValueError)(
                f"cross_entropy got a plain tensor target (shape {fmt_shape(tshape)}) for DTensor "
                f"logits of global shape {fmt_shape(shape)} whose positions are sharded (placements "
                f"{tuple(input.placements)}): a plain tensor could be the whole target or this "  # type: ignore[attr-defined]
                "rank's part of it, so safeloss does not guess (stock loss_parallel() refuses it too).\n"
                "Fix: pass the target as a DTensor, e.g. DTensor.from_local(local_target, mesh, "
                f"{pos_pl}) or distribute_tensor(target, mesh, {pos_pl})"
            )
    w_local = weight.full_tensor() if isinstance(weight, DTensor) else weight  # C values

    split = tp is not None
    outer = tuple((mesh.get_group(i), isinstance(new[i], Shard)) for i in range(mesh.ndim)
                  if i != tp and mesh.size(i) > 1)
    gshape = {"positions": positions, "input": shape}
    gpl = {"positions": pos_pl, "input": new}

    def gather(t: Tensor, kind: str) -> Tensor:
        # Assemble a local positions- (or logits-) shaped tensor into the global one on every rank.
        gs = gshape[kind]
        return DTensor.from_local(t, mesh, gpl[kind], run_check=False, shape=torch.Size(gs),
                                  stride=_contiguous_stride(gs)).full_tensor()

    sh = vocab.Sharding(
        group=mesh.get_group(tp) if split else None, split=split, outer=outer,
        num_classes=shape[cdim] if ndim >= 1 else 0, input_shape=shape,
        target_shape=tshape, gather=gather, pre_error=pre_error, where="device mesh",
        mesh_size=mesh.size(),
    )
    out = vocab.run(x.to_local(), t_local, w_local, ignore_index, reduction, label_smoothing,  # type: ignore[arg-type]
                    strict=strict, backend=backend, owner=owner, sharding=sh,
                    inplace_backward=inplace_backward, fused_grad=fused_grad, extras=extras)

    def per_position(v: Tensor) -> Tensor:
        return DTensor.from_local(v, mesh, pos_pl, run_check=False, shape=torch.Size(positions),
                                  stride=_contiguous_stride(positions))

    def replicated(v: Tensor) -> Tensor:
        return DTensor.from_local(v, mesh, [Replicate()] * mesh.ndim, run_check=False)

    wrap = per_position if reduction == "none" else replicated
    if isinstance(out, tuple):
        loss, st = out
        return wrap(loss), type(st)(per_position(st.lse), per_position(st.entropy), wrap(st.z_loss),
                                    replicated(st.accuracy))
    return wrap(out)

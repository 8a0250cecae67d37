"""DTensor logits sharded on the class dim, under ``torch.distributed.tensor.parallel.loss_parallel()``.

Stock ``loss_parallel()`` swaps DTensor's handlers of log-softmax and NLL for ones with
all-reduces, and checks nothing (a label >= C returns a number). Here the same calls (through
``safeloss.cross_entropy``, ``SafeCrossEntropyLoss`` and, under ``safeloss.patch()``, the stock
loss) run :mod:`safeloss.parallel.vocab` on the local shard instead: every check, the same values
and gradients as stock, and label smoothing and a sharded weight, which stock rejects.

Handled layout: the logits are sharded on the class dim on exactly one mesh dim and replicated on
the others (a 1-D tensor-parallel mesh, or TP x replicas); targets replicated (plain tensor or
DTensor), weight replicated or sharded. Other DTensor calls (other layouts, or outside
``loss_parallel()``) are left as they were: ``safeloss.cross_entropy`` runs its single-device
steps through DTensor's own ops, and the patched stock loss leaves them to stock torch.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from . import vocab


def _dtensor_module() -> object | None:
    # Nothing to import (or pay for) unless DTensor is in use: a DTensor input implies the module.
    return sys.modules.get("torch.distributed.tensor")


def loss_parallel_active() -> bool:
    """Whether ``loss_parallel()`` is entered (its handlers are installed in DTensor's dispatcher)."""
    mod = _dtensor_module()
    lp = sys.modules.get("torch.distributed.tensor.parallel.loss")
    if mod is None or lp is None:
        return False
    handlers = mod.DTensor._op_dispatcher._custom_op_handlers  # type: ignore[attr-defined]
    return handlers.get(torch.ops.aten._log_softmax.default) is lp._log_softmax_handler


def _tp_dim(x: object) -> int | None:
    """The mesh dim that shards the classes, when every other mesh dim replicates; else None."""
    cdim = 0 if x.dim() == 1 else 1  # type: ignore[attr-defined]
    placements = x.placements  # type: ignore[attr-defined]
    shard = [i for i, pl in enumerate(placements) if pl.is_shard(cdim)]
    if len(shard) != 1 or not all(pl.is_replicate() for i, pl in enumerate(placements) if i != shard[0]):
        return None
    return shard[0]


def _replicated(t: object) -> bool:
    return all(pl.is_replicate() for pl in t.placements)  # type: ignore[attr-defined]


def applies(input: object, target: object, weight: object) -> bool:
    """True when this call is a loss_parallel() call on a layout safeloss handles."""
    mod = _dtensor_module()
    if mod is None or not isinstance(input, mod.DTensor) or not loss_parallel_active():  # type: ignore[attr-defined]
        return False
    if _tp_dim(input) is None:
        return False
    if isinstance(target, mod.DTensor) and not _replicated(target):  # type: ignore[attr-defined]
        return False
    return not (isinstance(weight, mod.DTensor) and weight.device_mesh != input.device_mesh)  # type: ignore[attr-defined]


def is_dtensor(x: object) -> bool:
    mod = _dtensor_module()
    return mod is not None and isinstance(x, mod.DTensor)  # type: ignore[attr-defined]


def run(
    input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str,
    label_smoothing: float, *, strict: bool | None, backend: str, owner: object | None,
) -> Tensor:
    from torch.distributed.tensor import DTensor, Replicate

    mesh = input.device_mesh  # type: ignore[attr-defined]
    tp = _tp_dim(input)
    local = input.to_local()  # type: ignore[attr-defined]
    if isinstance(target, DTensor):
        target = target.to_local()
    if isinstance(weight, DTensor):
        # A sharded weight (stock rejects it) is gathered: C values, small next to the logits.
        weight = weight.to_local() if _replicated(weight) else weight.full_tensor()
    out = vocab.run(local, target, weight, ignore_index, reduction, label_smoothing,
                    group=mesh.get_group(tp), strict=strict, backend=backend, owner=owner)
    return DTensor.from_local(out, mesh, [Replicate()] * mesh.ndim, run_check=False)

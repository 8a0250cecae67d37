"""What a backend hands back: per-position losses and the :class:`~safeloss.core.checks.Scan` of what
it counted on the way (ignored positions 0, positions with an invalid target NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .checks import Scan


@dataclass
class Rows:
    losses: Tensor | None  # per-position losses; None with ``reduced`` None: stopped early
    scan: Scan
    # The torch backend on the host path asks stock torch for the reduced value directly: stock
    # torch's reduction *is* the semantics ``safeloss.reduction`` reproduces, and its fused
    # mean/sum backward saves two autograd nodes per call (which dominate at small shapes).
    reduced: Tensor | None = None
    # With ``reduced``: recomputes the per-position losses, only on the error path (to name rows).
    recompute: Callable[[], Tensor] | None = None

    def losses_or_recompute(self) -> Tensor | Callable[[], Tensor] | None:
        return self.losses if self.losses is not None else self.recompute

    @property
    def stopped(self) -> bool:
        return self.losses is None and self.reduced is None

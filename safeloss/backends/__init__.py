"""Backends compute per-position losses; ``safeloss.reduction`` turns them into the result.

Each backend returns :class:`Rows`: the per-position losses (ignored positions 0, positions
with an invalid target NaN) and a :class:`~safeloss.checks.Scan` of what it counted on the way.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..checks import Scan


@dataclass
class Rows:
    losses: Tensor | None  # None: the backend stopped early (invalid targets found on the host)
    scan: Scan
    # Denominator of reduction="mean" when the backend knows it for free (no weight and no
    # ignored target seen); None: the reduction computes it from target and weight.
    denominator: int | None = None

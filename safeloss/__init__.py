"""safeloss: a drop-in, safe and fast replacement for ``torch.nn.CrossEntropyLoss``.

    from safeloss import SafeCrossEntropyLoss as CrossEntropyLoss   # was: torch.nn
"""

from __future__ import annotations

from .ce.functional import cross_entropy
from .ce.module import SafeCrossEntropyLoss
from .core._traceback import trim as _trim
from .core.checks import flush as _flush
from .core.config import set_strict, strict_mode
from .core.errors import (
    ArgumentTypeError,
    BackendError,
    BatchSizeMismatchError,
    DeviceMismatchError,
    EmptyBatchError,
    ExtrasError,
    IgnoreIndexError,
    InputDtypeError,
    InputError,
    LabelSmoothingError,
    LayoutError,
    NonFiniteError,
    OptionsError,
    ParallelMismatchError,
    ProbabilityTargetError,
    ReductionError,
    SafeLossError,
    SafeLossWarning,
    TargetDtypeError,
    TargetOutOfRangeError,
    TargetShapeError,
    WeightError,
)
from .core.extras import LossStats
from .core.report import reset_warnings
from .linear import SafeLinearCrossEntropyLoss, linear_cross_entropy
from .parallel import vocab_parallel_cross_entropy
from .patch import is_patched, patch, unpatch

__version__ = "0.1.0"


def check_pending() -> None:
    """Raise or warn now for anything earlier calls found but have not reported yet.

    On CUDA in default mode, checks are read back without blocking and reported at the start of a
    later call of the same loss (the first that finds the GPU done with them); this waits for the
    GPU and reports everything. Call it at the end of an epoch, or before saving a checkpoint. A no-op on CPU, where every call reports at once.
    """
    try:
        _flush(None, None)
    except SafeLossError as e:  # the traceback ends at the caller's line (safeloss._traceback)
        _trim(e)
        raise


__all__ = [
    "ArgumentTypeError",
    "BackendError",
    "BatchSizeMismatchError",
    "DeviceMismatchError",
    "EmptyBatchError",
    "ExtrasError",
    "IgnoreIndexError",
    "InputDtypeError",
    "InputError",
    "LabelSmoothingError",
    "LayoutError",
    "LossStats",
    "NonFiniteError",
    "OptionsError",
    "ParallelMismatchError",
    "ProbabilityTargetError",
    "ReductionError",
    "SafeCrossEntropyLoss",
    "SafeLinearCrossEntropyLoss",
    "SafeLossError",
    "SafeLossWarning",
    "TargetDtypeError",
    "TargetOutOfRangeError",
    "TargetShapeError",
    "WeightError",
    "__version__",
    "check_pending",
    "cross_entropy",
    "is_patched",
    "linear_cross_entropy",
    "patch",
    "reset_warnings",
    "set_strict",
    "strict_mode",
    "unpatch",
    "vocab_parallel_cross_entropy",
]

"""Errors and warnings raised by safeloss.

Every error subclasses :class:`SafeLossError` *and* the builtin exception stock torch raises for
the same mistake, so ``except ValueError`` / ``except IndexError`` / ``except RuntimeError`` blocks
written for ``torch.nn.CrossEntropyLoss`` keep working after the swap.
"""

from __future__ import annotations

from collections.abc import Sequence


class SafeLossError(Exception):
    """Base class of every error raised by safeloss."""


class BatchSizeMismatchError(SafeLossError, ValueError):
    """Input and target disagree on the batch dimension (stock: ``ValueError``)."""


class TargetShapeError(SafeLossError, RuntimeError):
    """The target's shape fits no form cross-entropy accepts for this input."""


class TargetDtypeError(SafeLossError, RuntimeError):
    """The target's dtype or values cannot be class indices or probabilities."""


class TargetOutOfRangeError(SafeLossError, IndexError):
    """A class-index target lies outside ``[0, C)`` and is not ``ignore_index`` (stock: ``IndexError``)."""


class InputError(SafeLossError, RuntimeError):
    """The logits themselves are unusable (wrong rank, already softmaxed in strict mode, ...)."""


class InputDtypeError(InputError, NotImplementedError):
    """Integer / bool / complex logits (stock: ``NotImplementedError``, a ``RuntimeError``)."""


class NonFiniteError(SafeLossError, RuntimeError):
    """NaN or infinite logits made the loss non-finite (strict mode)."""


class ProbabilityTargetError(SafeLossError, RuntimeError):
    """Probability targets are negative or do not sum to 1 (strict mode)."""


class EmptyBatchError(SafeLossError, RuntimeError):
    """``reduction="mean"`` over a batch with nothing to average (strict mode)."""


class WeightError(SafeLossError, RuntimeError):
    """The class ``weight`` tensor has the wrong length, device or values."""


class ReductionError(SafeLossError, ValueError):
    """``reduction`` is not one of "mean", "sum", "none" (stock: ``ValueError``)."""


class LabelSmoothingError(SafeLossError, RuntimeError):
    """``label_smoothing`` outside [0, 1] (stock: ``RuntimeError`` above 1, silence below 0)."""


class IgnoreIndexError(SafeLossError, RuntimeError):
    """``ignore_index`` cannot apply to these targets (stock: ``RuntimeError``)."""


class DeviceMismatchError(SafeLossError, RuntimeError):
    """Input, target and weight live on different devices."""


class ArgumentTypeError(SafeLossError, TypeError):
    """A safeloss-only argument (``strict`` of ``patch()``, ...) has the wrong type."""


class BackendError(SafeLossError, RuntimeError):
    """The requested backend cannot run here."""


class ParallelMismatchError(SafeLossError, RuntimeError):
    """The ranks of a vocab-parallel group disagree on rows, labels or arguments."""


class SafeLossWarning(UserWarning):
    """A likely mistake that safeloss handled; becomes an error in strict mode."""


# ---------------------------------------------------------------------------------------------
# Small formatting helpers shared by every message, so that all messages read alike.


def fmt_shape(shape: Sequence[int]) -> str:
    """``(8, 5)`` / ``(2,)`` / ``()``: the way Python prints a tuple, which users recognise."""
    return str(tuple(int(s) for s in shape))


def fmt_pos(pos: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(p)) for p in pos) + "]"


def fmt_list(items: Sequence[str], limit: int = 5, total: int | None = None) -> str:
    """``a, b and c`` / ``a, b, c, d, e, ... (12 in all)``."""
    total = len(items) if total is None else total
    items = list(items[:limit])
    if total > len(items):
        return ", ".join(items) + f", ... ({total} in all)"
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def plural(n: int, word: str, plural_word: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural_word or word + 's')}"


# Tracebacks print ``safeloss.BatchSizeMismatchError``: the public name, not the private module.
for _cls in list(globals().values()):
    if isinstance(_cls, type) and issubclass(_cls, (SafeLossError, SafeLossWarning)):
        _cls.__module__ = "safeloss"
del _cls

"""Errors and warnings raised by safeloss.

Every error subclasses :class:`SafeLossError` *and* the builtin exception stock torch raises for
the same input, so ``except ValueError`` / ``except IndexError`` / ``except RuntimeError`` blocks
written for ``torch.nn.CrossEntropyLoss`` keep working after the swap.

Which builtin stock raises depends on the input, not only on the kind of mistake: stock checks the
batch size first (``ValueError``), so a target of the wrong shape *and* batch size is a
``ValueError`` there, one of the right batch size a ``RuntimeError``. A raise site therefore
raises ``stock_class(TargetShapeError, builtin)``: the public class itself when it already derives
from that builtin, else a subclass of it that also derives from the builtin (same name, so
tracebacks read ``safeloss.TargetShapeError``; ``except TargetShapeError`` still catches it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar


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
    """An argument of the wrong type, ordinary or safeloss-only: a list as input, target or weight, a non-integer ``ignore_index``, a string ``label_smoothing``, ``strict``, ``backend`` (stock: ``TypeError``)."""


class BackendError(SafeLossError, RuntimeError):
    """The requested backend cannot run here."""


class ParallelMismatchError(SafeLossError, RuntimeError):
    """The ranks of a vocab-parallel group disagree on rows, labels or arguments."""


class OptionsError(SafeLossError, ValueError):
    """``LinearCrossEntropyOptions`` that cannot apply to this call (stock: ``ValueError``; ``RuntimeError`` for an ``acc_dtype`` the input dtype cannot take)."""


class LayoutError(SafeLossError, NotImplementedError):
    """A layout the loss cannot use: sparse logits, labels or weight; nested tensors (stock: ``NotImplementedError``, a ``RuntimeError``)."""


class ExtrasError(SafeLossError, ValueError):
    """``softcap``, ``temperature`` or ``z_loss`` has a value with no meaning (<= 0, NaN, inf), or one whose scales leave float32."""


E = TypeVar("E", bound=SafeLossError)

# (public class, builtin) -> the subclass deriving from both. Built once, at import, for the pairs
# the raise sites need: a lookup under torch.compile must not create classes while tracing.
_VARIANTS: dict[tuple[type[SafeLossError], type[Exception]], type[SafeLossError]] = {}


def _rebuild(cls: type[SafeLossError], builtin: type[Exception], args: tuple) -> SafeLossError:
    return stock_class(cls, builtin)(*args)


def _variant(cls: type[SafeLossError], builtin: type[Exception]) -> type[SafeLossError]:
    def __reduce__(self: SafeLossError) -> tuple:
        # A variant is not a module attribute: pickle (DataLoader workers, multiprocessing) rebuilds
        # it from the public class and the builtin, both importable.
        return _rebuild, (cls, builtin, self.args), self.__dict__ or None

    return type(cls.__name__, (cls, builtin), {
        "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
        "__reduce__": __reduce__, "stock_builtin": builtin,
    })


def stock_class(cls: type[E], builtin: type[Exception]) -> type[E]:
    """``cls`` if it already derives from ``builtin`` (what stock torch raises for this input),
    else the subclass of ``cls`` that also derives from ``builtin``."""
    if issubclass(cls, builtin):
        return cls
    return _VARIANTS.get((cls, builtin), cls)  # type: ignore[return-value]


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

# Where stock raises another builtin than the public class's for some inputs (tests/test_error_classes.py
# sweeps them): a target of the wrong shape or dtype whose batch size differs too (stock checks
# that first: ValueError), or that stock indexes out of range (0-d targets, 0-d logits: IndexError).
for _cls, _builtin in [
    (TargetShapeError, ValueError), (TargetShapeError, IndexError),
    (TargetDtypeError, ValueError), (TargetDtypeError, IndexError),
    (InputError, IndexError), (InputDtypeError, IndexError), (OptionsError, RuntimeError),
    # linear_cross_entropy: stock reads an attribute of a non-tensor argument first
    (ArgumentTypeError, AttributeError),
    # Third-party losses that gather by hand (routed by safeloss.patch()) fail on a bad label
    # with torch.gather's RuntimeError, not cross_entropy's IndexError; linear_cross_entropy inside
    # torch.func.vmap: stock's batched gather raises a RuntimeError too.
    (TargetOutOfRangeError, RuntimeError),
    # an ignore_index outside int64: stock's argument parser raises a ValueError
    (IgnoreIndexError, ValueError),
    # a bool tensor as ignore_index: stock fails on an internal assert, a RuntimeError
    (ArgumentTypeError, RuntimeError),
]:
    _VARIANTS[_cls, _builtin] = _variant(_cls, _builtin)
del _cls, _builtin

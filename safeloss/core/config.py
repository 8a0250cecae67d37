"""Strict mode: where warnings become errors.

Precedence: explicit ``strict=`` argument > ``with strict_mode():`` > ``set_strict()`` >
the ``SAFELOSS_STRICT`` environment variable (read at call time, so importing safeloss has no
side effects). The context manager uses a ``ContextVar``, so it is local to a thread / asyncio task.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar

_UNSET = object()
_context_strict: ContextVar[object] = ContextVar("safeloss_strict", default=_UNSET)
_global_strict: bool | None = None

_TRUE = {"1", "true", "yes", "on"}


def set_strict(flag: bool | None) -> None:
    """Set the process-wide default; ``None`` goes back to the ``SAFELOSS_STRICT`` variable."""
    global _global_strict
    _global_strict = None if flag is None else bool(flag)


@contextlib.contextmanager
def strict_mode(flag: bool = True) -> Iterator[None]:
    """``with safeloss.strict_mode():`` turns every safeloss warning into an error inside the block."""
    token = _context_strict.set(bool(flag))
    try:
        yield
    finally:
        _context_strict.reset(token)


def is_strict(explicit: bool | None = None) -> bool:
    if explicit is not None:
        return bool(explicit)
    ctx = _context_strict.get()
    if ctx is not _UNSET:
        return bool(ctx)
    if _global_strict is not None:
        return _global_strict
    raw = env("SAFELOSS_STRICT")
    return raw is not None and raw.strip().lower() in _TRUE


# os.environ.get() encodes the name and decodes the value on every call (about 1 us); calls
# that must read the environment each time (strictness, on CUDA: every call) read the mapping
# behind os.environ, which os.environ keeps in sync, through the same key encoding.
_ENV_DATA: dict[object, object] | None = getattr(os.environ, "_data", None)
_ENV_KEYS: dict[str, object] = {}
_ENV_VALUES: dict[object, str] = {}


def env(name: str) -> str | None:
    """``os.environ.get(name)``, read at call time, a little faster."""
    if _ENV_DATA is None:
        return os.environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        try:
            key = _ENV_KEYS[name] = os.environ.encodekey(name)  # type: ignore[attr-defined]
        except AttributeError:
            return os.environ.get(name)
    raw = _ENV_DATA.get(key)
    if raw is None:
        return None
    value = _ENV_VALUES.get(raw)
    if value is None:
        value = os.environ.get(name)
        if value is None:
            return None
        if len(_ENV_VALUES) < 64:
            _ENV_VALUES[raw] = value
    return value


class LazyStrict:
    """``is_strict(explicit)``, evaluated on first use: most calls never need to know."""

    __slots__ = ("_explicit", "_value")

    def __init__(self, explicit: bool | None) -> None:
        self._explicit = explicit
        self._value: bool | None = None

    def __bool__(self) -> bool:
        if self._value is None:
            self._value = is_strict(self._explicit)
        return self._value

"""How a finding reaches the user: an error in strict mode, otherwise a warning shown once.

"Once" means once per kind of finding per ``SafeCrossEntropyLoss`` instance, or per call site of
the functional API: a training loop that hits the same problem every step prints it one time.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass

import torch

from .config import LazyStrict
from .errors import SafeLossError, SafeLossWarning


@dataclass(frozen=True)
class Finding:
    """A likely mistake that safeloss can handle (warning) or that strict mode turns into ``error``."""

    kind: str  # stable key for warn-once, e.g. "softmaxed-input"
    error: type[SafeLossError]
    message: str


_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_seen_call_sites: set[tuple[str, str, int]] = set()
# Per loss instance, kept outside the instance so that a deepcopy or pickled copy of a loss starts
# fresh (and nothing is added to a stock module's state under patch()).
_seen_by_owner: weakref.WeakKeyDictionary[object, set[str]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _user_frame() -> tuple[str, int, int]:
    """(filename, lineno, stacklevel) of the first frame outside safeloss and torch (module
    call glue, and the runtime of compiled graphs, which reports after the graph ran)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        fname = frame.f_code.co_filename
        generated = fname.startswith("<eval_with_key>") or "torchinductor" in fname  # FX / inductor code
        if not (fname.startswith(_PKG_DIR) or fname.startswith(_TORCH_DIR) or generated):
            return fname, frame.f_lineno, level
        frame = frame.f_back
        level += 1
    return "<unknown>", 0, level


def report(finding: Finding, strict: bool | LazyStrict, owner: object | None) -> None:
    """Raise ``finding`` (strict) or warn about it once per owner (module) or call site (functional)."""
    if strict:
        raise finding.error(finding.message) from None
    fname, lineno, level = _user_frame()
    if owner is not None:
        with _lock:
            seen = _seen_by_owner.setdefault(owner, set())
        key: object = finding.kind
    else:
        seen = _seen_call_sites
        key = (finding.kind, fname, lineno)
    with _lock:
        if key in seen:
            return
        seen.add(key)
    # stacklevel counts from report() itself, as _user_frame() does: the warning names the user's line.
    warnings.warn(finding.message, SafeLossWarning, stacklevel=level)


def reset_warnings() -> None:
    """Forget which warnings were shown (for tests and notebooks)."""
    with _lock:
        _seen_call_sites.clear()
        _seen_by_owner.clear()

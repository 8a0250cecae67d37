"""How a finding reaches the user: an error in strict mode, otherwise a warning shown once.

"Once" means once per kind of finding per ``SafeCrossEntropyLoss`` instance, or per call site of
the functional API: a training loop that hits the same problem every step prints it one time.
Only a warning that was shown counts: one that a ``warnings`` filter ignored or turned into an
error is shown by the next call that finds it (as Python's own once-registry records neither).
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


_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # safeloss/
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
# (kind, file, line) for the functional API, (kind, "loss", id) per loss instance: kept outside
# the instance, so a deepcopy or pickled copy of a loss starts fresh and nothing is added to a
# stock module's state under patch().
_seen: set[tuple[object, ...]] = set()
_watched: set[int] = set()


def _forget(oid: int) -> None:
    with _lock:
        _watched.discard(oid)
        for key in [k for k in _seen if k[1] == "loss" and k[2] == oid]:
            _seen.discard(key)
_lock = threading.Lock()


def watch(owner: object) -> None:
    """Forget ``owner``'s warn-once state when it dies. The loss modules call it when made (and
    unpickled or copied): a compiled graph's report op knows a loss only by its id, which a
    later object may reuse, and holds no reference to register this from. Not while Dynamo
    traces (a loss made inside a compiled function): it cannot trace the lock or the finalizer;
    such a loss registers at its first eager finding, as before."""
    if torch.compiler.is_compiling():
        return
    oid = id(owner)
    with _lock:
        if oid in _watched:
            return
        _watched.add(oid)
    try:
        weakref.finalize(owner, _forget, oid)
    except TypeError:  # not weak-referenceable: its id stays taken while it lives anyway
        with _lock:
            _watched.discard(oid)


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
    """Raise ``finding`` (strict) or warn about it once per owner (a loss instance, or its id) or
    per call site (functional API, ``owner=None``)."""
    if strict:
        raise finding.error(finding.message) from None
    fname, lineno, level = _user_frame()
    seen = _seen
    if owner is not None:
        # By identity, the same key in eager calls and in the compiled graph's report op (which
        # only knows id(module)); forgotten when the instance dies, so ids are never confused.
        if isinstance(owner, int):
            oid = owner
        else:
            oid = id(owner)
            if oid not in _watched:
                watch(owner)
        key: tuple[object, ...] = (finding.kind, "loss", oid)
    else:
        key = (finding.kind, fname, lineno)
    if key in seen or _ignored(finding.message, fname, lineno, level):
        return  # ignored: not shown, so not "once" yet (Python's own once-registry records none either)
    with _lock:
        if key in seen:
            return
        seen.add(key)
    # stacklevel counts from report() itself, as _user_frame() does: the warning names the user's line.
    try:
        warnings.warn(finding.message, SafeLossWarning, stacklevel=level)
    except BaseException:  # a filter made it an error: raised, not shown; the next call shows it
        with _lock:
            seen.discard(key)
        raise


def _ignored(text: str | None, fname: str, lineno: int, level: int) -> bool:
    """Whether the warnings filters drop a SafeLossWarning with this text at the user's frame
    (``level`` frames above the caller, ``report`` or ``shown``), matched as
    ``warnings.warn_explicit`` matches them; ``text`` None: whatever its text (a filter on the
    text first leaves it undecided: False). Cold: only calls with a finding ask."""
    try:
        frame = sys._getframe(level)  # report() is level 1, as for warnings.warn's stacklevel
        module = frame.f_globals.get("__name__", "<string>") if fname != "<unknown>" else "<string>"
    except ValueError:
        module = "<string>"
    if not isinstance(module, str):
        module = "<string>"
    get_filters = getattr(warnings, "_get_filters", None)  # context-aware warnings (3.14)
    for action, msg, category, mod, ln in (get_filters() if get_filters else warnings.filters):
        if (issubclass(SafeLossWarning, category) and (mod is None or mod.match(module))
                and (ln == 0 or lineno == ln)):
            if msg is None:
                return action == "ignore"
            if text is None:
                return False
            if msg.match(text):
                return action == "ignore"
    return warnings.defaultaction == "ignore"


def shown(kind: str, owner: object | None) -> bool:
    """Whether ``report()`` would now drop a warning of this ``kind``: shown already for
    ``owner`` (a loss instance, or its id) or, with ``owner=None``, for this call site (found as
    ``report()`` finds it), or dropped by a warnings filter whatever its text. Lets a caller skip
    building a message, and the reads of tensor data behind it, that nobody would see; strict
    mode raises every time, so check that first."""
    if owner is not None:
        if (kind, "loss", owner if isinstance(owner, int) else id(owner)) in _seen:
            return True
        fname, lineno, level = _user_frame()
    else:
        fname, lineno, level = _user_frame()
        if (kind, fname, lineno) in _seen:
            return True
    return _ignored(None, fname, lineno, level)


def reset_warnings() -> None:
    """Forget which warnings were shown (for tests and notebooks)."""
    with _lock:
        _seen.clear()

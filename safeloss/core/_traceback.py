"""Tracebacks that end at the user's call, not four frames deep inside safeloss.

Users read a traceback's last frame first, and a ``SafeLossError`` is about the caller's
arguments. So the public entry points (``safeloss.cross_entropy``, ``SafeCrossEntropyLoss``, the
functions ``safeloss.patch()`` installs, ``safeloss.check_pending``) drop safeloss's own frames,
and torch's frames below them, from the traceback of a ``SafeLossError`` before it leaves them, as
JAX does with its internal frames. The last frame is then the user's line, for a module too: its
``__call__`` (``module_call``) trims around torch's ``nn.Module.__call__``, whose frames would
otherwise end the traceback. ``SAFELOSS_FULL_TRACEBACK=1`` keeps every frame, for debugging
safeloss itself.

How: the entry point catches the error, replaces its ``__traceback__`` by the kept frames and
re-raises it with a bare ``raise``, which (Python 3.11+) adds no frame of its own; the frames above
the entry point are added back as the exception unwinds through them. On the happy path a
``try`` costs nothing in 3.11. Bodies that TorchScript parses cannot hold a ``try`` (the
module's forward, the patched functions): they use ``with boundary:``, whose exit does the same
(about 0.2 us a call: two method calls and a Dynamo probe). While torch.compile
traces, tracebacks are left alone (``is_dynamo_compiling``: an eager rerun inside a compile
session, where ``is_compiling()`` is also true, is trimmed).
"""

from __future__ import annotations

import os
import types

import torch

from .errors import SafeLossError

ENV = "SAFELOSS_FULL_TRACEBACK"
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # safeloss/
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _internal(code: types.CodeType) -> bool:
    name = code.co_filename
    return name.startswith(_PKG_DIR) or name.startswith(_TORCH_DIR)


# Messages write a fix as ``loss_fn(...)``, the module's call; each entry point names the call
# its user wrote instead (``safeloss.cross_entropy(...)``, ``F.cross_entropy(...)``).
# An entry point that calls another (the patched F.cross_entropy calls safeloss.cross_entropy)
# renames the inner one's name too.
_CALLS = ("loss_fn(", "safeloss.cross_entropy(")


def name_call(e: BaseException, call: str | None) -> None:
    """Write ``call`` for the generic ``loss_fn`` in the message of ``e``, in place."""
    if call is None or not e.args or not isinstance(e.args[0], str):
        return
    text = e.args[0]
    for generic in _CALLS:
        text = text.replace(generic, call + "(")
    e.args = (text, *e.args[1:])


def trim(e: BaseException, call: str | None = None) -> None:
    """Drop safeloss's and torch's frames from ``e.__traceback__``, in place (only the frames from
    the entry point down are in it yet; a user callback called from there would be kept); with
    ``call``, also name the caller's function in the message's fixes (see ``name_call``)."""
    if torch.compiler.is_dynamo_compiling():
        return
    name_call(e, call)
    if os.environ.get(ENV, "") not in ("", "0"):
        return
    kept = []
    tb = e.__traceback__
    while tb is not None:
        if not _internal(tb.tb_frame.f_code):
            kept.append(tb)
        tb = tb.tb_next
    new = None
    for t in reversed(kept):
        new = types.TracebackType(new, t.tb_frame, t.tb_lasti, t.tb_lineno)
    e.__traceback__ = new


class _Boundary:
    """``with boundary:`` trims a ``SafeLossError`` leaving the block (for TorchScript-parsed bodies)."""

    __slots__ = ("call",)

    def __init__(self, call: str | None = None) -> None:
        self.call = call

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> bool:
        if isinstance(exc, SafeLossError):
            trim(exc, self.call)
        return False  # re-raised by the interpreter, without a frame of ours


def module_call(self: torch.nn.Module, *args: object, **kwargs: object) -> object:
    """``__call__`` of safeloss's loss modules (and of ``nn.CrossEntropyLoss`` while patched).

    ``forward`` can only trim the frames below itself; torch's ``nn.Module.__call__`` frames
    (``_wrapped_call_impl``, ``_call_impl``) are added above it as the error unwinds. Trimming one
    level up, around ``nn.Module.__call__`` itself, makes a module's error end at the user's line
    too. Hooks, ``module.compile()``, torch.compile (which traces this like user code; nothing is
    trimmed while it traces), torch.fx (whose patched ``nn.Module.__call__`` is looked up here at
    call time) and TorchScript (which compiles ``forward`` only) see the module as before. About
    0.3 us a call (one more Python frame)."""
    if torch.compiler.is_dynamo_compiling():
        return torch.nn.Module.__call__(self, *args, **kwargs)
    try:
        return torch.nn.Module.__call__(self, *args, **kwargs)
    except SafeLossError as e:
        trim(e)
        raise


boundary = _Boundary()  # module calls: the messages' own ``loss_fn(...)``
functional_boundary = _Boundary("F.cross_entropy")  # stock's function, patched

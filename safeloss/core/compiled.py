"""Value checks inside ``torch.compile``d code.

While Dynamo traces, nothing may read a tensor on the host, and Python side effects (warnings,
raising on a value) cannot be traced. So the pipeline adds one *effectful* custom op to the graph,
``safeloss::note_findings``: Dynamo and the compilers keep it (effect tokens, never dead-code
eliminated) and, at run time, it runs in Python with the real tensors. There it does what the
eager pipeline does after the loss: on CPU, or in strict mode, it reports at once (so errors are
raised by the same call, even compiled); on CUDA in default mode it defers, and reports the
findings of earlier calls whose GPU work has finished first (without waiting, as eager calls do).

Strictness is resolved at run time too (a ``strict_mode()`` context is a ContextVar, which Dynamo
cannot trace), and the shape/dtype findings of the trace ride along as one encoded string
(custom-op schemas take no list of strings).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import checks, errors
from .config import is_strict
from .report import Finding, report
from .rows import Rows
from .validation import Problem

_FIELD, _RECORD = "\x1f", "\x1e"

COMPILED_NOTE = (
    "[found by a torch.compile'd call of this loss; value checks in compiled code run after the "
    "graph and are reported at a later call, or by safeloss.check_pending()]\n"
)


def _encode(findings: list[Finding]) -> str:
    return _RECORD.join(_FIELD.join((f.kind, f.error.__name__, f.message)) for f in findings)


def _decode(text: str) -> list[Finding]:
    out = []
    for record in filter(None, text.split(_RECORD)):
        kind, error, message = record.split(_FIELD)
        out.append(Finding(kind, getattr(errors, error), message))
    return out


@torch.library.custom_op("safeloss::note_findings", mutates_args=())
def note_findings(
    counts: Tensor,
    out: Tensor,
    target: Tensor,
    losses: Tensor,
    key: int,
    input_shape: list[int],
    input_dtype: torch.dtype,
    device_type: str,
    prob: bool,
    has_weight: bool,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    num_classes: int,
    strict: int,
    static_findings: str,
    op: str = "",
) -> None:
    """Run time, real tensors: report or defer what the compiled loss counted."""
    strict_ = is_strict(None if strict < 0 else bool(strict))
    meta = torch.empty(input_shape, dtype=input_dtype, device="meta")
    # Compilers may reuse these buffers after this op. Reported now, they are read now; deferred,
    # checks.defer copies the counts and the result to the host in stream order and keeps its own
    # copy of the labels, so only the per-position losses, which it keeps as they are, are copied
    # here (O(N); the logits are never kept).
    p = Problem(
        input=meta, target=meta if prob else target, prob=prob,
        weight=torch.empty(num_classes, device="meta") if has_weight else None,
        ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
        num_classes=num_classes, out_dtype=out.dtype,
    )
    found = _decode(static_findings)
    rows_losses = losses.clone() if losses.numel() or reduction == "none" else None
    scan = checks.Scan(counts)
    owner = None if key in checks.FUNCTIONAL_KEYS else key  # warn once per loss instance, as eager
    if checks.reads_at_once(device_type) or strict_:
        checks.flush(key, owner)  # earlier calls' findings first (this call syncs anyway)
        for f in found:
            report(f, strict_, owner)
        checks.resolve(scan, p, rows_losses, out, None, strict_, owner, have_logits=False,
                       device_type=device_type, op=op)
        return
    checks.flush(key, owner, wait=False)  # earlier calls' findings, as an eager call would
    checks.defer(scan, p, rows_losses, out.detach(), strict_, key, note=COMPILED_NOTE,
                 findings=found, device_type=device_type, op=op)


@note_findings.register_fake
def _(*args: object) -> None:
    return None


# Effect tokens keep the op in the graph and in order. A private API: on a torch without it the
# op could be dropped as unused, which loses reports but never changes a loss.
with contextlib.suppress(Exception):
    torch.library._register_effectful_op(
        torch.ops.safeloss.note_findings.default, torch.library.EffectType.ORDERED
    )


def note(p: Problem, rows: Rows, out: Tensor, key: int, strict: bool | None, static: list[Finding],
         op: str = "") -> None:
    """Trace time: put the op in the graph (called only while Dynamo traces). ``op``: the op
    whose wording the report uses (``checks.WORDING``)."""
    counts = rows.scan.counts
    if not isinstance(counts, Tensor):  # the compile path always counts on the device
        counts = torch.tensor(list(counts), dtype=torch.int32, device=out.device)
    target = p.target if not p.prob else p.target.new_empty(0)
    losses = rows.losses if rows.losses is not None else out.new_empty(0)
    torch.ops.safeloss.note_findings(
        counts, out.detach(), target.detach(), losses.detach(), key, list(p.input.shape),
        p.input.dtype, p.input.device.type, p.prob, p.weight is not None, p.ignore_index,
        float(p.label_smoothing), p.reduction, p.num_classes, -1 if strict is None else int(strict),
        _encode(static), op,
    )

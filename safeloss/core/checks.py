"""Value checks: turning what a backend counted into errors and warnings.

Backends count problems while they compute the loss (see ``_flags``). This module decides what
the counts mean and words the message. It reads tensor data only on the error path (to name
values and positions), never on the happy path.

When the counts live on a GPU, reading them would block the host until the GPU catches up. So in
default mode they are *deferred*: copied to pinned host memory without blocking and examined at
the start of a later call of the same loss, the first one that finds the GPU done with them (an
event query, never a wait), or by :func:`check_pending` (which waits). Strict mode and CPU tensors
read them at once.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import _flags as F
from .config import LazyStrict
from .errors import (
    EmptyBatchError,
    InputError,
    NonFiniteError,
    ProbabilityTargetError,
    TargetOutOfRangeError,
    fmt_list,
    fmt_pos,
    fmt_shape,
    plural,
)
from .report import Finding, _user_frame, shown
from .report import report as _report
from .validation import Problem, _read_negatives, negative_weight_finding

# ------------------------------------------------------------------------ cheap checks (CPU)


def target_bounds(target: Tensor) -> tuple[int, int]:
    """(min, max) of the index targets in one read; (0, -1) for an empty target."""
    if target.numel() == 0:
        return 0, -1
    lo, hi = torch.aminmax(target)
    return int(lo), int(hi)


def bad_target_mask(target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Index targets outside [0, C) that are not ignore_index (the one definition of "bad")."""
    return ((target < 0) | (target >= num_classes)) & (target != ignore_index)


def count_bad_targets(target: Tensor, num_classes: int, ignore_index: int) -> int:
    """Exact count; only called on the error path (bounds or stock torch's check failed)."""
    return int(bad_target_mask(target, num_classes, ignore_index).sum())


def sample_rows(x: Tensor, k: int = F.SOFTMAX_SAMPLE, fixed: bool = False) -> Tensor:
    """Up to ``k`` evenly spaced positions of the logits as a (k, C) tensor, without a full copy.

    A softmax applied before the loss affects every row, so a sample detects it as surely as a
    full scan, at a cost independent of N (the checks must stay cheap at LLM sizes). The
    positions are i * T // k (T positions), the ones the Triton kernel checks (see _flags).
    ``fixed``: always exactly ``k`` rows (repeats when there are fewer positions), with no branch
    on the shape: what torch.compile with dynamic shapes and torch.export need (no guards).
    """
    if x.dim() == 1:
        return x.unsqueeze(0)
    n = x.shape[0]
    if fixed:
        # Integer arithmetic only: linspace on a symbolic size makes the compiler guard on it.
        flat = x.unsqueeze(2) if x.dim() == 2 else x.flatten(2)
        s = flat.shape[2]
        pos = torch.arange(k, device=x.device) * (n * s) // k
        return flat[pos // s, :, pos % s]
    if x.dim() == 2:
        if n <= k:
            return x
        return x[torch.arange(k, device=x.device) * n // k]
    flat = x.flatten(2)  # (N, C, S): a view for the usual contiguous NCHW layout
    s = flat.shape[2]
    total = n * s
    m = min(k, total)
    pos = torch.arange(m, device=x.device) * total // m
    return flat[pos // s, :, pos % s]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums of a row run in fp32 (fp64 for fp64) on every backend: a half-precision sum of a few
    hundred entries is rounded far beyond the tolerances."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_like(rows: Tensor) -> Tensor:
    """Bool per row: every entry in [0, 1] and the row sums to 1 within the dtype's tolerance."""
    tol = F.SOFTMAX_SUM_TOL[str(rows.dtype).removeprefix("torch.")]
    lo, hi = torch.aminmax(rows, dim=-1)
    s = rows.sum(-1, dtype=_acc_dtype(rows.dtype))
    return (lo >= 0) & (hi <= 1) & ((s - 1).abs() <= tol)


def scan_softmax(x: Tensor, cdim: int, num_classes: int) -> tuple[int, int]:
    """(rows that look softmaxed, rows checked), exiting after one cheap read of one row."""
    if num_classes < 2 or x.numel() == 0:
        return 0, 0
    x = x.detach()
    first = x if x.dim() == 1 else (x[0] if x.dim() == 2 else x.flatten(2)[0, :, 0])
    # Raw logits almost never sum to 1, so one row's sum settles the common case.
    tol = F.SOFTMAX_SUM_TOL[str(x.dtype).removeprefix("torch.")]
    if not abs(float(first.sum(dtype=_acc_dtype(x.dtype))) - 1.0) <= tol:
        return 0, 1
    rows = sample_rows(x)
    return int(softmax_like(rows).sum()), rows.shape[0]


def _bad_sums(y: Tensor, cdim: int) -> Tensor:
    """Device count of the positions whose probabilities do not sum to 1 (within tolerance)."""
    tol = F.PROB_SUM_TOL.get(str(y.dtype).removeprefix("torch."), 1e-4)
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    # Not "> tol": a NaN sum fails this comparison too (the kernel's rule).
    return (~((y.sum(cdim, dtype=acc) - 1).abs() <= tol)).sum()


def prob_target_counts(target: Tensor, cdim: int) -> tuple[Tensor, Tensor]:
    """Device counts: (positions with a negative entry, positions not summing to 1, NaN or inf
    entries included: the kernel's comparison, which a NaN sum fails too)."""
    y = target.detach()
    return (y < 0).any(cdim).sum(), _bad_sums(y, cdim)


# Above this many target entries the host scan finds negative rows through their minimum.
PROB_SCAN_AMIN_NUMEL = 1 << 12


# The same-width integer dtype a float's bits are viewed as (``scan_prob_target``).
_SIGN_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
              torch.bfloat16: torch.int16}


def scan_prob_target(target: Tensor, cdim: int) -> tuple[int, int]:
    """``prob_target_counts`` read on the host (the immediate path): the same counts.

    On CPU, ``(y < 0).any(cdim)`` costs more than a third of stock torch's whole fwd+bwd (an
    elementwise bool tensor, then a slow bool reduction: 4 ms of 11 ms at (4096, 1000), one
    thread). A row has a negative entry iff one of its entries has its sign bit set and is
    neither -0.0 nor a NaN; the row minimum of the entries' bits viewed as same-width signed
    integers is negative iff some entry's sign bit is set, and an integer minimum is one
    vectorized pass with no NaN handling (half the time of a float ``amin``, which also
    propagates NaN). Only rows whose sign bits say "maybe" (-0.0, a NaN with its sign bit set,
    or a real negative) are then judged the exact way, ``y < 0``. Small targets keep the direct
    form, which is fewer ops, and so do tensors whose bits are not their values (a negative
    view, such as ``z.conj().imag``: torch refuses to view them as another dtype).
    """
    n = target.numel()
    if n == 0:
        return 0, 0
    ints = _SIGN_VIEW.get(target.dtype)
    if n <= PROB_SCAN_AMIN_NUMEL or ints is None or target.dim() == 0 or target.is_neg():
        neg, badsum = prob_target_counts(target, cdim)
        return int(neg), int(badsum)
    y = target.detach()
    signed = y.view(ints).amin(cdim) < 0
    negative = 0
    if signed.any():
        # A mask, not an index: the positions keep their shape whatever dims the target has.
        negative = int((signed & (y < 0).any(cdim)).sum())
    return negative, int(_bad_sums(y, cdim))


# ------------------------------------------------------------------------ messages


def _positions(mask: Tensor, limit: int = 5) -> tuple[int, list[str]]:
    if mask.dim() == 0:
        return int(mask), ["the single target"] if bool(mask) else []
    idx = mask.nonzero()
    if mask.dim() == 1:
        return idx.shape[0], [f"[{i}]" for i in idx[:limit, 0].tolist()]
    return idx.shape[0], [str(list(p)) for p in idx[:limit].tolist()]


def _flat_source(target: Tensor) -> tuple[int, ...] | None:
    """The shape of the tensor a 1-D target was flattened from, when the target is a view of it
    (``labels.view(-1)``, as Hugging Face flattens shifted labels): the evidence, in the tensor
    itself, that its positions are not the caller's own. None when it is not such a view."""
    base = getattr(target, "_base", None)
    if target.dim() != 1 or base is None or base.dim() < 2 or base.numel() != target.numel():
        return None
    if not (base.is_contiguous() and target.stride(0) == 1
            and target.storage_offset() == base.storage_offset()):
        return None
    return tuple(base.shape)


def _unravel(i: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for d in reversed(shape):
        out.append(i % d)
        i //= d
    return out[::-1]


def _library_caller() -> str | None:
    """``file:line`` of the code that called the loss, when that is an installed library (its
    file under site-packages / dist-packages), which may have reshaped the caller's labels."""
    fname, lineno, _ = _user_frame()
    parts = fname.replace("\\", "/").split("/")
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            rest = parts[parts.index(marker) + 1:]
            return "/".join(rest) + f":{lineno}" if rest else None
    return None


def _padding_runs(rows: Tensor, v: int, ignore_index: int) -> tuple[int, int, str] | None:
    """Evidence that ``v`` is a padding value: every occurrence of it lies in a run that fills the
    end of its row (or every one the start), ignored positions aside; at least 3 positions, and
    runs in 2 rows or one run of 3. Returns (rows padded, longest run, "end" or "start"), or None.

    A label that is a real class (1-based labels, a class the model lacks) also occurs mid-row,
    so it never passes; a padding value leaves exactly this pattern."""
    is_v = rows == v
    count = int(is_v.sum())
    if count < 3 or rows.shape[-1] < 2:
        return None  # two positions are too few to call a pattern
    neutral = is_v | (rows == ignore_index)
    for side in ("end", "start"):
        iv, nt = (is_v, neutral) if side == "end" else (is_v.flip(-1), neutral.flip(-1))
        # From the first v of a row on, only v or ignore_index: v sits in the row's tail.
        seen = iv.cumsum(-1) > 0
        if bool((seen & ~nt).any()):
            continue
        run = iv.sum(-1)
        longest, padded = int(run.max()), int((run > 0).sum())
        if longest >= 2 and (padded >= 2 or longest >= 3):
            return padded, longest, side
    return None


def out_of_range_message(target: Tensor, num_classes: int, ignore_index: int, device_type: str) -> str:
    C = num_classes
    flat_from = _flat_source(target)
    t = target.detach().cpu().long()
    bad = bad_target_mask(t, C, ignore_index)
    nbad = int(bad.sum())
    valid = t[(t != ignore_index)]
    vals, counts = torch.unique(t[bad], return_counts=True)
    order = counts.argsort(descending=True)
    parts = []
    for v in vals[order][:4].tolist():
        _, pos = _positions(bad & (t == v), 3)
        n_v = int((bad & (t == v)).sum())
        if flat_from is not None:  # each flat position, and where it is in the unflattened labels
            idx = (bad & (t == v)).nonzero()[:3, 0].tolist()
            pos = [f"[{i}] (= {fmt_pos(_unravel(i, flat_from))})" for i in idx]
        parts.append(f"{v} at {fmt_list(pos, limit=3, total=n_v)}")
    more = f"; ... ({vals.numel()} distinct bad values)" if vals.numel() > 4 else ""
    lines = [
        f"{nbad} of {plural(t.numel(), 'target')} {'is' if nbad == 1 else 'are'} outside the "
        + (f"class range 0..{C - 1} ({plural(C, 'class', 'classes')})." if C else
           "class range: the logits have 0 classes, so no label is in range."),
        f"  bad values: {'; '.join(parts)}{more}",
        f"  target shape {fmt_shape(t.shape)}, ignore_index={ignore_index}",
    ]
    library = _library_caller() if t.dim() == 1 else None
    if flat_from is not None:
        lines.append(
            f"  positions [i] are in the flattened target: it is a view of a {fmt_shape(flat_from)} "
            "tensor, and (= [...]) is the same position there"
            + (f" (flattened by {library})" if library else "")
        )
    elif library is not None:
        lines.append(
            f"  positions are in the 1-D target that {library} passed to the loss, which may have "
            "flattened (and shifted) the labels you gave it"
        )
    bad_vals = vals.tolist()
    # Positions the target already skips with ignore_index: a fix that changes ignore_index (or
    # shifts every label) would turn them into bad labels, so the fixes keep them.
    n_ignored = int((t == ignore_index).sum())

    def skip(v: int) -> str:
        if not n_ignored:
            return f"Fix: cross_entropy(..., ignore_index={v})  or  CrossEntropyLoss(ignore_index={v})"
        return (f"Fix: target.masked_fill(target == {v}, {ignore_index}), since the target already "
                f"marks {plural(n_ignored, 'position')} with ignore_index={ignore_index}, which "
                f"ignore_index={v} would no longer skip")

    lo = int(valid.min()) if valid.numel() else 0
    hi = int(valid.max()) if valid.numel() else 0
    # Sequences to look for padding in (a negative value is never a class: it needs no evidence):
    # (B, T) labels, the (B, T) labels a 1-D target was flattened from, or a 1-D target as one
    # row. Not image masks (N, H, W), whose rows are no sequences.
    rows = None
    if t.dim() == 2:
        rows = t
    elif flat_from is not None and len(flat_from) == 2:
        rows = t.reshape(flat_from)
    elif t.dim() == 1 and flat_from is None:
        rows = t.unsqueeze(0)  # one row: only a run at its very end (or start) counts
    padding = None
    if rows is not None and len(bad_vals) == 1 and bad_vals[0] >= 0:
        padding = _padding_runs(rows, bad_vals[0], ignore_index)
    # 1-based labels: the largest is exactly C and 0 never occurs, which means something only when
    # the labels cover most of 1..C (an LM batch covers a sliver of its vocabulary).
    covered, one_based, not_one_based = 0, False, ""
    if bad_vals == [C] and lo >= 1:
        values, freq = valid.unique(return_counts=True)
        covered = int(values.numel())
        n_c = int(freq[-1])  # values are sorted: C, the only bad value, is the largest
        most_other = int(freq[:-1].max()) if freq.numel() > 1 else 0
        if covered * 2 < C:
            not_one_based = (f", but these {plural(int(valid.numel()), 'label')} cover too few of "
                             f"the {C} classes to tell")
        elif n_c > 2 * most_other + 1:
            # A 1-based class C is as common as the others; one value far more common is filler.
            not_one_based = (f", but {C} occurs {n_c} times and no other label more than "
                             f"{most_other}: more like a filler value than a class")
        else:
            one_based = True
    if one_based and rows is not None and rows.shape[0] == 1:
        padding = None  # one row: a run at its end is weaker evidence than labels covering 1..C
    if C == 0:
        lines.append("The logits have no classes at all (a zero-sized class dimension).")
        lines.append(
            "Fix: check the final layer's output size (e.g. nn.Linear(d, num_classes) with "
            "num_classes > 0) and that the class dimension is dim 1"
        )
    elif C == 1 and hi >= 1:
        lines.append(
            f"The model has a single output (class 0 only), but the labels go up to {hi}; binary "
            "labels 0/1 need two outputs for cross-entropy."
        )
        lines.append(
            "Fix: torch.nn.BCEWithLogitsLoss with one output and target.float(), or give the "
            "model 2 outputs and keep CrossEntropyLoss"
        )
    elif any(v in (-(2**63), -(2**63) + 1) for v in bad_vals):
        # validation's stand-in, in traced code, for uint64 labels it could not read (>= 2**63)
        lines.append(
            f"{min(bad_vals)} stands for uint64 labels of 2**63 or more (a negative label stored "
            "as unsigned, e.g. -1 as 2**64 - 1) where compiled code cannot read them, or is itself "
            "a corrupt label."
        )
        lines.append("Fix: store the labels as int64: target.to(torch.int64)")
    elif padding is not None:
        v = bad_vals[0]
        n_rows, longest, side = padding
        n_total = rows.shape[0] if rows is not None else 1
        where = (f"the {side} of {n_rows} of {plural(n_total, 'row')}" if n_total > 1
                 else f"the {side} of the target")
        lines.append(
            f"Every bad value is {v}, and it fills {where} (runs of up to {longest}): the pattern a "
            "padding value leaves"
            + (" (e.g. a pad token id equal to the vocabulary size)" if v == C else " (a pad id)")
            + f", not a class. ignore_index is {ignore_index}, so these positions are not skipped."
        )
        lines.append(f"{skip(v)}; or set the padded labels to {ignore_index} where the batch is built")
    elif len(bad_vals) == 1 and bad_vals[0] < 0:
        v = bad_vals[0]
        lines.append(
            f"Every bad value is {v}, which looks like padding/unknown labels (a label is never "
            f"negative), not a class; ignore_index is {ignore_index}, so these positions are not skipped."
        )
        lines.append(skip(v))
    elif len(bad_vals) == 1 and bad_vals[0] in (255, 250, 254, 65535):
        v = bad_vals[0]
        spatial = t.dim() >= 2
        what = (
            "a mask code for 'void' / unlabeled pixels" if spatial else
            "a code for 'no label' (255 is the usual 'void' code of segmentation masks, and what "
            "-1 becomes in uint8)" if v == 255 else "a code for 'no label'"
        )
        lines.append(
            f"Every bad value is {v}, which looks like {what}, not a class; "
            f"ignore_index is {ignore_index}, so these positions are not skipped."
        )
        lines.append(skip(v))
    elif one_based:
        lines.append(
            f"The labels look 1-based: they run from {lo} to {hi}, {covered} of the {C} values "
            f"1..{C} occur, and 0 never does."
        )
        shifted = (f"torch.where(target == {ignore_index}, target, target - 1) (target - 1 would also "
                   f"move the ignore_index={ignore_index} positions to {ignore_index - 1})"
                   if n_ignored else "target - 1")
        lines.append(f"Fix: pass {shifted}, or give the model {C + 1} outputs if class {C} is real.")
    elif hi >= C and (hi >= 2**31 or hi >= 1000 * C) and len(bad_vals) <= 4:
        lines.append(
            f"The bad labels are far beyond the model's {C} outputs (up to {hi}): corrupt or "
            "uninitialized label data (e.g. torch.empty), or the wrong column of the dataset, "
            "rather than a missing class."
        )
        lines.append("Fix: check how the labels are loaded; valid labels are 0..C-1")
    elif hi >= C:
        one_based_note = (
            f" (0 never occurs and the largest label is exactly {C}, as with 1-based labels"
            f"{not_one_based})" if not_one_based else ""
        )
        negatives = [v for v in bad_vals if v < 0]
        lines.append(
            f"The labels go up to {hi} but the model outputs {C} scores (classes 0..{C - 1}): "
            f"either the final layer is too small (the data has at least {hi + 1} classes), or "
            f"the labels are not numbered 0..C-1 (raw class ids that need remapping){one_based_note}."
            + (f" The negative labels ({fmt_list([str(v) for v in negatives])}) are never classes: "
               "set ignore_index to the one used for 'no label'." if negatives else "")
        )
        lines.append(
            f"Fix: build the final layer with {hi + 1} outputs (e.g. nn.Linear(d, {hi + 1})), or "
            "remap the labels to 0..C-1"
        )
    else:
        lines.append(
            f"Negative labels are only allowed when they equal ignore_index ({ignore_index}); "
            f"these take {len(bad_vals)} different negative values, so no single ignore_index covers them."
        )
        lines.append(
            "Fix: set ignore_index to the one value used for 'no label' and map the others to it "
            "(target[target < 0] = ignore_index), or remove those targets"
        )
    if device_type == "cuda":
        lines.append(
            "(Stock torch would have stopped with 'CUDA error: device-side assert triggered' and "
            "left the CUDA context unusable; safeloss never reads the logits at a bad label, so "
            "the CUDA context stays usable.)"
        )
    return "\n".join(lines)


def softmax_finding(like: int, checked: int, num_classes: int, n_positions: int) -> Finding:
    C = num_classes
    floor = math.log1p((C - 1) / math.e)
    rows = f"all {n_positions} rows" if checked >= n_positions else f"all {checked} sampled rows (of {n_positions})"
    # One position (unbatched logits): "its one row lies", never "all 1 rows lie".
    verbs = "lie in [0, 1] and sum to 1" if n_positions != 1 else "lies in [0, 1] and sums to 1"
    rows = rows if n_positions != 1 else "its one row"
    return Finding(
        "softmaxed-input", InputError,
        f"the input to cross_entropy looks already softmaxed: {rows} {verbs}.\n"
        "CrossEntropyLoss applies log-softmax itself and expects raw logits; a softmax before it "
        f"caps the loss (with {C} classes it can never go below {floor:.2f}) and shrinks the "
        "gradients, so training stalls.\n"
        "Fix: remove the nn.Softmax / torch.softmax before the loss (keep it only for inference). "
        "If you really have probabilities, use torch.nn.NLLLoss on probs.log().",
    )


def _known(t: Tensor | None) -> bool:
    """Whether a tensor's values can be read for a message (deferred and compiled checks keep
    meta stand-ins for the logits and probability targets)."""
    return t is not None and t.device.type != "meta"


def _join_or(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _half_loss_dtype(p: Problem) -> torch.dtype | None:
    """float16 where stock torch computes (part of) the loss in it; its range is 65504."""
    if p.out_dtype == torch.float16 or (p.prob and p.input.dtype == torch.float16):
        return torch.float16
    return None


def nonfinite_finding(
    p: Problem, losses: Tensor | None, count: int, have_logits: bool, out: Tensor | None = None
) -> Finding:
    n_pos = max(1, math.prod(p.positions_shape))
    where = ""
    detail = ""
    if losses is not None and losses.dim() > 0:
        mask = ~torch.isfinite(losses.detach())
        if p.prob is False:
            mask &= p.target != p.ignore_index
        count, pos = _positions(mask.cpu())
        where = f" (first at {fmt_list(pos, total=count)})"
    x = p.input
    cdim = 0 if x.dim() == 1 else 1
    found: list[str] = []  # non-finite inputs seen in the data
    unseen: list[str] = []  # inputs whose values this report cannot read
    neg_inf = True  # whether -inf logits may be involved (the -inf advice is shown only then)
    if have_logits and _known(x):
        neg_inf = False
        if x.numel():
            xd = x.detach()
            bits = []
            for what, rows in (("NaN", torch.isnan(xd)), ("+inf", torch.isposinf(xd)), ("-inf", torch.isneginf(xd))):
                k = int(rows.any(cdim).sum())
                if k:
                    bits.append(f"{plural(k, 'row')} with {what}")
                    neg_inf |= what == "-inf"
            if bits:
                detail = f"\n  logits shape {fmt_shape(x.shape)}, dtype {x.dtype}: " + ", ".join(bits)
                found.append("the logits hold NaN or infinite values")
    else:
        unseen.append("the logits")
    if p.weight is not None:
        if _known(p.weight):
            badw = (~torch.isfinite(p.weight.detach())).nonzero().flatten().tolist()
            if badw:
                found.append(f"the class weight is not finite (classes {fmt_list([str(i) for i in badw])})")
        else:
            unseen.append("the class weights")
    target_rows = 0
    if p.prob:
        if _known(p.target):
            if p.target.numel():
                target_rows = int((~torch.isfinite(p.target.detach())).any(cdim).sum())
                if target_rows:
                    found.append(
                        f"the probability targets hold NaN or infinite values ({plural(target_rows, 'row')})"
                    )
        else:
            unseen.append("the probability targets")
    half = _half_loss_dtype(p)
    if not found and not unseen:
        # Every input is finite: the loss left the range of the dtype it was computed in.
        computed = losses.dtype if losses is not None else (half or p.out_dtype)
        if computed == torch.float16:
            return overflow_finding(p, count, where, out, stock_values=True)
        wmax = float(p.weight.detach().abs().max()) if p.weight is not None and p.weight.numel() else 0.0
        cause = (
            f"the {str(computed).removeprefix('torch.')} loss overflowed: the logits, targets and "
            "class weights are all finite, but "
            + (f"the logits' spread, scaled by class weights as large as {wmax:.3g}, left its range" if wmax > 1.0
               else "the logits spread beyond its range")
        )
    elif found:
        cause = " and ".join(found)
    else:
        cause = f"{_join_or(unseen)} hold NaN or infinite values" + (
            ", or the float16 loss overflowed (a loss above 65504)" if half else ""
        )
    spread = p.prob or p.label_smoothing > 0
    if found and target_rows and len(found) == 1:
        tail = (
            "\nNaN or inf in probability targets usually comes from the data pipeline (a division "
            "by a zero count, the log of 0) or from a teacher model's overflowed output.\n"
            "Fix: check the targets where they are made, torch.isfinite(target).all(), and "
            "renormalize rows after replacing bad entries"
        )
    else:
        tail = (
            "\nCommon causes: a learning rate that is too high (the weights blew up), a log/sqrt/"
            "division by zero inside the model, NaN in the input data"
            + (", or float16 overflow (values above 65504)" if half else "")
            + (
                ". A -inf logit is fine on a masked-out class with plain class-index targets, but "
                "never on the target class"
                + (
                    "; with label smoothing or probability targets every class enters the loss, so "
                    "any -inf makes it infinite"
                    + (
                        # A finite mask fixes probability targets that are 0 there; smoothing puts
                        # label_smoothing / C on every class, masked ones too: a finite mask then
                        # gives a loss of ~1e36 (min / 2 times that share), no fix at all.
                        " (NaN where the probability target is 0 on that class: 0 x -inf); mask with a "
                        "large finite value instead, e.g. torch.finfo(dtype).min / 2, with the "
                        "target 0 on the masked classes"
                        if p.prob else
                        " (and a large finite mask only makes it huge: label smoothing gives every "
                        "class, masked ones too, label_smoothing / C of the target); to smooth over "
                        "the allowed classes only, pass probability targets that are 0 on the masked "
                        "classes, and mask with a large finite value (torch.finfo(dtype).min / 2) "
                        "instead of -inf"
                    )
                    if spread else ""
                )
                if neg_inf else ""
            )
            + ".\nFix: check the inputs with torch.isfinite(x).all(), lower the learning rate or clip "
            "gradients (torch.nn.utils.clip_grad_norm_), and use torch.autograd.detect_anomaly() "
            "to find the first op that produces NaN"
            + ("; prefer bfloat16 or torch.amp.GradScaler for float16 training" if half else "")
        )
    return Finding(
        "nonfinite", NonFiniteError,
        f"the loss is NaN or infinite at {count} of {plural(n_pos, 'position')}{where}, because "
        f"{cause}.{detail}" + tail,
    )


def _value(out: Tensor | None) -> float | None:
    if out is None or out.dim() != 0 or not _known(out):
        return None
    return float(out.detach())


def overflow_finding(
    p: Problem, count: int, where: str, out: Tensor | None, stock_values: bool
) -> Finding:
    """Finite inputs, but some positions' loss is beyond the half-precision dtype's range (65504
    for float16).

    ``stock_values``: the backend returned stock torch's values, computed in that dtype (inf
    there); otherwise it computed in fp32 and only the half-precision result can be inf.
    """
    dtype = p.out_dtype if p.out_dtype in (torch.float16, torch.bfloat16) else torch.float16
    dt = str(dtype).removeprefix("torch.")
    big = f"{torch.finfo(dtype).max:.6g}"
    n_pos = max(1, math.prod(p.positions_shape))
    red = p.reduction
    if stock_values:
        returned = (
            f"Stock torch computes the loss in {dt} and returns inf there; safeloss returns stock "
            "torch's values" + ("" if red == "none" else f", so the {red} is inf too") + "."
        )
    elif red == "none":
        returned = (
            f"safeloss computes in float32, but the result is {dt} (as stock torch's), so these "
            "positions are inf, as with stock torch."
        )
    else:
        v = _value(out)
        if v is not None and math.isfinite(v):
            returned = (
                f"Stock torch computes each position in {dt} and returns inf for the {red}; "
                f"safeloss computes in float32 and returns the finite {red} {v:.6g}."
            )
        else:
            returned = f"The {red} is inf, as with stock torch."
    half = dtype == torch.float16
    return Finding(
        "overflow", NonFiniteError,
        f"the {dt} loss overflowed at {count} of {plural(n_pos, 'position')}{where}: the inputs "
        f"are finite, but a loss above {big}, the largest {dt} value, does not fit {dt}.\n"
        + returned + "\n"
        + (
            "A loss this large means logits tens of thousands apart within a row: usually weights "
            "that blew up (a learning rate that is too high) or a missing normalization.\n"
            if half else ""
        )
        + "Fix: compute the loss in float32 (pass logits.float() to the loss), or under "
        "torch.autocast (cross_entropy then computes in float32); lower the learning rate or clip "
        "gradients" + ("; prefer bfloat16 or torch.amp.GradScaler for float16 training" if half else ""),
    )


def reduction_overflow_finding(p: Problem, losses: Tensor | None) -> Finding:
    """Every position's loss is finite, but the reduced result is beyond the dtype's range."""
    dt = str(p.out_dtype).removeprefix("torch.")
    big = f"{torch.finfo(p.out_dtype).max:.6g}"
    n = math.prod(p.positions_shape)
    red = p.reduction
    why = f"their {'sum' if red == 'sum' else 'sum or weighted mean'} is above {big}, the largest {dt} value"
    if isinstance(losses, Tensor) and losses.dim() > 0:
        total = float(losses.detach().double().sum())
        if abs(total) >= F.overflow_bound(p.out_dtype):
            why = f"their sum, {total:.6g}, is above {big}, the largest {dt} value"
            if red == "mean":
                why += f" (stock torch holds the sum in {dt} before dividing, and so does safeloss)"
        elif red == "mean":
            why = (
                f"their weighted mean (their sum, {total:.6g}, divided by the sum of the targets' "
                f"class weights) is above {big}, the largest {dt} value"
            )
    return Finding(
        "overflow", NonFiniteError,
        f'cross_entropy with reduction="{red}" overflowed {dt}: each of the '
        f"{plural(n, 'per-position loss', 'per-position losses')} is finite, but {why}, so the "
        "result is inf (stock torch returns inf too).\n"
        + (
            'Fix: reduction="mean", or sum in float32: pass logits.float() to the loss (or run it '
            "under torch.autocast)"
            if red == "sum" else
            "Fix: compute the loss in float32 (pass logits.float() to the loss), or under "
            "torch.autocast"
            + ("; tiny class weights (the mean divides by their sum) inflate it" if p.weight is not None else "")
        ),
    )


def empty_mean_finding(p: Problem) -> Finding:
    n = math.prod(p.positions_shape)
    zero_grads = (
        "\nGradients are zero, but the NaN loss poisons logging, loss scaling and any sum of "
        "losses; it is common with padding-only micro-batches in language models.\n"
    )
    if n == 0:
        what = (
            f"cross_entropy got an empty batch (input shape {fmt_shape(p.input.shape)}) with "
            'reduction="mean": the mean of no values is NaN (stock torch returns NaN too).'
        )
        why = zero_grads
    else:
        t = p.target
        n_valid = int((t != p.ignore_index).sum()) if not p.prob and _known(t) else None
        why = zero_grads
        if p.weight is not None and n_valid != 0:
            if n_valid is not None and _known(p.weight):
                classes = sorted(set(t[t != p.ignore_index].tolist()))
                what = (
                    f'cross_entropy with reduction="mean" has nothing to average: '
                    f"{'the one target' if n_valid == 1 else f'all {n_valid} targets'} that "
                    f"{'is' if n_valid == 1 else 'are'} not ignore_index={p.ignore_index} "
                    f"{'has' if n_valid == 1 else 'have'} class weight 0 (class"
                    f"{'' if len(classes) == 1 else 'es'} {fmt_list([str(c) for c in classes])}), "
                    "so the weighted mean is 0/0 = NaN (stock torch returns NaN too)."
                )
            else:
                what = (
                    f'cross_entropy with reduction="mean" has nothing to average: every one of the '
                    f"{n} targets is ignore_index={p.ignore_index} or has class weight 0, so the "
                    "loss is 0/0 = NaN (stock torch returns NaN too)."
                )
            why = (
                "\nThe gradients are NaN too (as with stock torch), so one such batch ruins the "
                "model's weights at the next optimizer step.\n"
            )
        else:
            what = (
                f'cross_entropy with reduction="mean" has nothing to average: all {n} targets equal '
                f"ignore_index={p.ignore_index}, so the loss is 0/0 = NaN (stock torch returns NaN too)."
            )
    return Finding(
        "empty-mean", EmptyBatchError,
        what + why
        + 'Fix: skip such batches, or use reduction="sum" and divide by max(number of valid '
        "targets, 1) yourself",
    )


def no_classes_finding(p: Problem) -> Finding:
    cdim = 0 if p.input.dim() == 1 else 1
    return Finding(
        "no-classes", InputError,
        f"cross_entropy got logits with no classes (input shape {fmt_shape(p.input.shape)}: the "
        f"class dimension, dim {cdim}, has size 0), so there is no loss to compute; stock torch "
        'returns NaN for reduction="mean" and zeros otherwise, and so does safeloss.\n'
        "The final layer most likely has 0 outputs, or the logits were sliced or reshaped along "
        "the wrong dimension.\n"
        "Fix: check the final layer's output size (e.g. nn.Linear(d, num_classes) with "
        f"num_classes > 0) and that the classes are in dim {cdim}",
    )


def prob_target_finding(p: Problem, negative: int, badsum: int) -> Finding:
    y = p.target.detach()
    cdim = 0 if y.dim() == 1 else 1
    n = max(1, math.prod(p.positions_shape))
    known = _known(y) and y.numel() > 0
    bits = []
    where = []  # the first positions of each kind (read here, on the finding's path only)
    nonfinite = 0
    if known:
        bad_rows = (~torch.isfinite(y)).any(cdim)
        nonfinite = int(bad_rows.sum())
    if negative:
        # The minimum over every entry but NaN: a -inf entry is the most negative one (the finite
        # minimum of such a row can be 0 or positive).
        ordered = y[~torch.isnan(y)] if known else y.new_empty(0)
        low = f" (min {float(ordered.min()):.4g})" if ordered.numel() else ""
        bits.append(f"{plural(negative, 'row')} with negative entries{low}")
        if known:
            where.append(("with negative entries", (y < 0).any(cdim)))
    if nonfinite:
        bits.append(f"{plural(nonfinite, 'row')} with NaN or infinite entries")
        where.append(("with NaN or inf", bad_rows))
    if known:
        badsum = max(0, badsum - nonfinite)  # a non-finite row never sums to 1: counted above
        if badsum:
            # The sums of the rows that fail the check (the check's own rule and tolerance).
            tol = F.PROB_SUM_TOL.get(str(y.dtype).removeprefix("torch."), 1e-4)
            sums = y.sum(cdim, dtype=torch.float64)
            off = ~((y.sum(cdim, dtype=_acc_dtype(y.dtype)) - 1).abs() <= tol) & ~bad_rows
            shown_sums = sums[off] if off.any() else sums[~bad_rows]
            lo, hi = float(shown_sums.min()), float(shown_sums.max())
            quoted = f"row sum {lo:.4g}" if f"{lo:.4g}" == f"{hi:.4g}" else f"row sums from {lo:.4g} to {hi:.4g}"
            bits.append(f"{plural(badsum, 'row')} not summing to 1 ({quoted})")
            where.append(("not summing to 1", off))
    elif badsum:
        bits.append(f"{plural(badsum, 'row')} not summing to 1 (or holding NaN or inf)")
    located = ""
    if y.dim() > 1 and where:  # a 1-D target is a single row: nothing to locate
        parts = []
        for what, mask in where:
            count, pos = _positions(mask, 3)
            if count:
                parts.append(f"{what} {fmt_list(pos, limit=3, total=count)}")
        located = "\n  first rows: " + "; ".join(parts) if parts else ""
    nan_text = (
        "NaN or inf entries make the loss of their rows NaN; they usually come from the data "
        "pipeline (a division by a zero count, the log of 0) or from a teacher model's overflowed "
        "output.\n"
    )
    if nonfinite and not negative and not badsum:
        body = nan_text + (
            "Fix: check the targets where they are made, torch.isfinite(target).all(), and "
            "renormalize the rows after replacing the bad entries"
        )
    elif not negative and known and y.dim() > 1 and bool(((y == 0) | (y == 1)).all()):
        # Only 0s and 1s, some row not summing to 1: several classes (or none) marked per row,
        # which a softmax over classes cannot express.
        body = (
            "Every entry is 0 or 1, and some rows mark several classes (or none): a multi-hot, "
            "multi-label target, where each class is its own yes/no (a guess from the values). "
            "Cross-entropy is then not a loss between distributions: its minimum is not at the "
            "target.\n"
            "Fix: torch.nn.BCEWithLogitsLoss()(logits, target) for multi-label data, or "
            f"target / target.sum(dim={cdim}, keepdim=True) to train on each row's classes as one "
            "distribution (rows with no class need removing first)"
        )
    else:
        # All-zero rows (no class at all: what a masked or padded position leaves) divide by 0 in
        # the counts fix (NaN): they go first, which also keeps them out of the mean's count.
        zero = (y == 0).all(cdim) if known and badsum else None
        n_zero = int(zero.sum()) if zero is not None else 0
        zeros = ""
        counts_fix = f"target / target.sum(dim={cdim}, keepdim=True) for counts"
        if n_zero:
            _, zpos = _positions(zero, 3)
            zeros = (f"{plural(n_zero, 'row')} {'is' if n_zero == 1 else 'are'} all zeros (at "
                     f"{fmt_list(zpos, limit=3, total=n_zero)}): no class at all, as a masked or padded "
                     "position leaves. ")
            pick = "[keep]" if y.dim() <= 2 else ".movedim(1, -1)[keep]"
            counts_fix = (f"target / target.sum(dim={cdim}, keepdim=True) for counts, after leaving out "
                          f"the all-zero rows, which would divide by 0 (keep = target.sum(dim={cdim}) > 0; "
                          f"input{pick}, target{pick})")
        body = (
            (nan_text if nonfinite else "")
            + zeros
            + "The loss is computed as stock torch does, but it is no longer a cross-entropy between "
            "distributions: its minimum is no longer at the target distribution, and negative "
            "entries can drive it below zero. "
            # Name the kind of tensor the values point to, and say that it is a guess.
            + ("Negative entries suggest logits or log-probabilities passed where probabilities were "
               "expected (a guess from the values).\n"
               if negative else
               f"Every {'finite ' if nonfinite else ''}entry is at least 0, so these look like "
               "counts or unnormalized scores (a guess from the values).\n")
            + f"Fix: target.softmax(dim={cdim}) for logits, {counts_fix}, or class indices of shape "
            + fmt_shape(p.positions_shape)
        )
    return Finding(
        "bad-probabilities", ProbabilityTargetError,
        f"the probability targets (shape {fmt_shape(y.shape)}, same as the input) are not "
        f"probability distributions: {' and '.join(bits)} of {n}.{located}\n" + body,
    )


# ------------------------------------------------------------------------ resolution

# op name -> how that op rewords the shared (cross-entropy) messages; filled by the ops that reuse
# these checks (linear_cross_entropy registers its own), read wherever a finding is reported late
# (deferred CUDA findings, the report op of compiled graphs), where the op's own code is not on the stack.
WORDING: dict[str, Callable[[str], str]] = {}

DEFERRED_NOTE = (
    "[found by an earlier call of this loss; GPU checks are read back without blocking and "
    "reported at a later call, or by safeloss.check_pending()]\n"
)
# The same, for a record whose loss module was garbage-collected before the report (a loss built
# inline every step): reported by whichever call comes next, which is not "this loss".
GONE_NOTE = (
    "[found by an earlier call of a loss that no longer exists (garbage-collected before its "
    "findings were read); GPU checks are read back without blocking and reported at a later "
    "call, or by safeloss.check_pending()]\n"
)


@dataclass
class Scan:
    """What a backend counted: python ints already, or a device tensor to read (maybe later)."""

    counts: Sequence[int] | Tensor  # layout: safeloss._flags
    nonfinite_from_output: bool = False  # the backend did not count; judge from the output
    out_finite: bool | None = None  # the backend already read the (scalar) output


# What the host path returns for a call in which nothing was counted and the (scalar) result
# is finite: shared, so such a call builds no Scan, and the pipeline skips resolve() for it.
CLEAN = Scan((0,) * F.SIZE, nonfinite_from_output=True, out_finite=True)


_NOTED = frozenset({"softmaxed-input", "nonfinite", "overflow"})  # findings judged on the logits


# In the line an extras call's findings start with (``core.extras.Extras.note``).
LOGITS_NOTE_MARK = "are judged on the capped, scaled logits"


def noted(note: str, kind: str) -> str:
    """The part of a call's ``note`` that heads a finding of ``kind``: all of it for a finding
    about the logits; else all but an extras call's line (it says which logits the logits'
    checks judged, nothing about labels, probability targets or empty batches), so the lines
    about when the finding was read (deferred, compiled) stay."""
    if kind in _NOTED or LOGITS_NOTE_MARK not in note:
        return note
    return "".join(line for line in note.splitlines(keepends=True) if LOGITS_NOTE_MARK not in line)


def resolve(
    scan: Scan,
    p: Problem,
    losses: Tensor | Callable[[], Tensor] | None,
    out: Tensor | None,
    out_finite: bool | None,
    strict: bool | LazyStrict,
    owner: object | None,
    have_logits: bool = True,
    device_type: str | None = None,
    note: str = "",
    op: str = "",
) -> None:
    """Raise or warn for what ``scan`` found. ``out_finite`` None means "read it from ``out``".
    ``losses`` may be a callable that computes them, called only when a message needs them.
    ``op``: the op whose call this is, when its messages are worded differently (``WORDING``)."""
    counts = scan.counts.tolist() if isinstance(scan.counts, Tensor) else scan.counts
    if (scan.out_finite if out_finite is None else out_finite) and not any(counts) and p.num_classes:
        return  # the clean call: nothing counted and a finite result (what follows would agree)
    wording = WORDING.get(op) if op else None
    if note or wording:
        def report(f: Finding, strict: bool | LazyStrict, owner: object | None) -> None:
            text = noted(note, f.kind) + f.message
            _report(replace(f, message=wording(text) if wording else text), strict, owner)
    else:
        report = _report
    if counts[F.BAD_TARGET]:
        text = noted(note, "bad-target") + out_of_range_message(p.target, p.num_classes, p.ignore_index,
                                           device_type or p.input.device.type)
        raise TargetOutOfRangeError(wording(text) if wording else text) from None
    if p.num_classes == 0:
        # Nothing was computed over: every other check would only describe the empty rows.
        report(no_classes_finding(p), strict, owner)
        return
    if counts[F.SOFTMAX_CHECKED] and counts[F.SOFTMAX_LIKE] == counts[F.SOFTMAX_CHECKED]:
        if _wanted("softmaxed-input", strict, owner):
            report(softmax_finding(counts[F.SOFTMAX_LIKE], counts[F.SOFTMAX_CHECKED], p.num_classes,
                                   math.prod(p.positions_shape)), strict, owner)
    if counts[F.PROB_NEGATIVE] or counts[F.PROB_BAD_SUM]:
        if _wanted("bad-probabilities", strict, owner):
            report(prob_target_finding(p, counts[F.PROB_NEGATIVE], counts[F.PROB_BAD_SUM]), strict, owner)
    if counts[F.WEIGHT_NEGATIVE] and not any(f.kind == "negative-weight" for f in p.findings):
        # Counted by the backend this call: found even when the weight changed without a version
        # bump (a write through .data), and in compiled code, where validation reads nothing.
        if _wanted("negative-weight", strict, owner):
            classes = _read_negatives(p.weight) if _known(p.weight) else None
            report(negative_weight_finding(classes or None, counts[F.WEIGHT_NEGATIVE]), strict, owner)
    nonfinite = counts[F.NONFINITE_ROW]
    if out_finite is None:
        out_finite = scan.out_finite
    if out_finite is None and out is not None and (scan.nonfinite_from_output or p.reduction != "none"):
        out_finite = math.isfinite(out.item()) if out.dim() == 0 else bool(torch.isfinite(out).all())
    if scan.nonfinite_from_output:
        if out_finite is False and callable(losses):
            losses = losses()
        if out_finite is False and losses is not None:
            finite = torch.isfinite(losses.detach())
            if not p.prob:
                finite |= p.target == p.ignore_index
            nonfinite = int((~finite).sum())
    if callable(losses) and (nonfinite or counts[F.OVERFLOW]):
        losses = losses()
    if nonfinite:
        if _wanted("nonfinite", strict, owner):
            report(nonfinite_finding(p, losses, nonfinite, have_logits, out), strict, owner)
    elif counts[F.OVERFLOW]:
        if _wanted("overflow", strict, owner):
            count, where = counts[F.OVERFLOW], ""
            if isinstance(losses, Tensor) and losses.dim() > 0:
                big = losses.detach().abs() >= F.overflow_bound(p.out_dtype)
                if not p.prob:
                    big &= p.target != p.ignore_index
                count, pos = _positions(big.cpu())
                where = f" (first at {fmt_list(pos, total=count)})"
            report(overflow_finding(p, count, where, out, stock_values=False), strict, owner)
    elif out_finite is False and p.reduction != "none" and math.prod(p.positions_shape) > 0:
        # No position's loss is non-finite, yet the result is: 0/0 (a NaN mean with nothing to
        # average), or a sum / weighted mean beyond the dtype's range (inf).
        v = _value(out)
        if p.reduction == "mean" and not p.prob and (v is None or math.isnan(v)):
            if _wanted("empty-mean", strict, owner):
                report(empty_mean_finding(p), strict, owner)
        elif _wanted("overflow", strict, owner):
            report(reduction_overflow_finding(p, losses() if callable(losses) else losses), strict, owner)


def _wanted(kind: str, strict: bool | LazyStrict, owner: object | None) -> bool:
    """Whether a finding of this kind would reach the user (an error, or a warning not shown yet
    here): repeated warnings skip building their message, whose host reads of the targets or
    logits cost more than the whole loss at small shapes (gradcheck calls the loss hundreds of
    times with the same finding)."""
    return bool(strict) or not shown(kind, owner)


# ------------------------------------------------------------------------ deferral

# Pending-check keys of the functional APIs, one per op (a linear_cross_entropy call's finding is
# never reported by a cross_entropy call, nor the reverse); loss instances use id(module), which
# is an address, never 0 or 1.
FUNCTIONAL_KEY = 0  # cross_entropy
LINEAR_FUNCTIONAL_KEY = 1  # linear_cross_entropy
FUNCTIONAL_KEYS = (FUNCTIONAL_KEY, LINEAR_FUNCTIONAL_KEY)

# When True, CPU calls defer their checks like CUDA calls do (lets CI test the deferred model).
DEFER_ON_CPU = False


def reads_at_once(device_type: str) -> bool:
    """Whether findings on this device are read in the call itself (free on the CPU)."""
    return device_type == "cpu" and not DEFER_ON_CPU


class _Pending:
    """One deferred call's record: host copies of its counts and result (filled in stream
    order), and what a message about it needs. Its :attr:`problem` (the call's Problem with meta
    stand-ins for the logits and probability targets) is built only when a report needs it: a
    clean record, the common case, is read and recycled without it."""

    __slots__ = ("_problem", "bufs", "counts_host", "device_type", "event", "event_device",
                 "findings", "key", "losses", "losses_version", "nbytes", "nonfinite_from_output",
                 "note", "op", "out_host", "owner_ref", "p", "strict", "target")

    def __init__(
        self, p: Problem, target: Tensor | None, losses: Tensor | None, bufs: tuple[Tensor, Tensor | None],
        nonfinite_from_output: bool, event: object | None, strict: bool, device_type: str | None,
        note: str, findings: Sequence[Finding], key: int, nbytes: int,
        owner_ref: Callable[[], object] | None, op: str, event_device: torch.device | None,
    ) -> None:
        # The call's Problem without its tensors: shapes and dtypes of the logits (and of
        # probability targets), from which ``problem`` makes meta stand-ins on demand.
        self.p = (p.input.shape, p.input.dtype, (p.target.shape, p.target.dtype) if p.prob else None,
                  p.prob, p.weight, p.ignore_index, p.label_smoothing, p.reduction, p.num_classes,
                  p.out_dtype,
                  # Reported by this call already: the backend's count of the same thing is not news.
                  [f for f in p.findings if f.kind == "negative-weight"] if p.findings else [])
        self._problem: Problem | None = None
        self.target = target  # the label copy; None for probability targets (meta stand-in)
        self.losses = losses
        # reduction="none" hands these very losses to the caller, who may edit them in place
        # (mask them, nan_to_num_) before the report: their version then differs, and the report
        # keeps to the counts instead of naming positions from values this call never had.
        # (A Python attribute, no op; None: not the caller's tensor, or an inference tensor,
        # which has no version to compare: ``defer`` keeps a copy of those.)
        self.losses_version: int | None = None
        if losses is not None and p.reduction == "none" and not losses.is_inference():
            self.losses_version = losses._version
        self.bufs = bufs
        self.counts_host, self.out_host = bufs
        self.nonfinite_from_output = nonfinite_from_output
        self.event = event
        self.strict = strict
        self.device_type = device_type or ""
        self.note = note
        self.findings = findings
        self.key = key  # which loss it belongs to (requeued there if a report raises)
        self.nbytes = nbytes  # device memory it keeps alive (label copy, per-position losses)
        self.owner_ref = owner_ref  # weak reference to the loss module, if any
        self.op = op  # the op whose wording the report uses (see WORDING)
        self.event_device = event_device  # where ``event`` was recorded

    @property
    def problem(self) -> Problem:
        if self._problem is None:
            xshape, xdtype, tmeta, prob, w, ii, eps, red, C, out_dtype, findings = self.p
            t = self.target if tmeta is None else _meta_of(*tmeta)
            self._problem = Problem(_meta_of(xshape, xdtype), t, prob, w, ii, eps, red, C, out_dtype,  # type: ignore[arg-type]
                                    findings)
        return self._problem


_pending: dict[int, list[_Pending]] = {}
_pending_lock = threading.Lock()


def defer(
    scan: Scan, p: Problem, losses: Tensor | None, out: Tensor, strict: bool, key: int,
    note: str = "", findings: Sequence[Finding] = (), device_type: str | None = None,
    owner: object | None = None, op: str = "",
) -> None:
    """Queue ``scan`` for later: start non-blocking copies to pinned memory, record an event."""
    counts = scan.counts if isinstance(scan.counts, Tensor) else torch.tensor(list(scan.counts))
    pinned = counts.is_cuda
    none = p.reduction == "none"
    bufs = _host_buffers(counts, None if none else out, pinned)
    bufs[0].copy_(counts, non_blocking=pinned)
    if not none:
        bufs[1].copy_(out.detach() if out.requires_grad else out, non_blocking=pinned)  # type: ignore[union-attr]
    event = None
    if pinned:
        try:  # a CUDA event is bound to the device it was first recorded on
            event = _free_events[counts.device].pop()
        except (KeyError, IndexError):
            event = torch.cuda.Event()
        event.record()
    # Index targets and per-position losses are O(N): kept so the message can name positions
    # (a copy of the labels: the caller may refill its label buffer before the report, as with
    # static CUDA buffers). The logits and probability targets are not kept (they can be
    # gigabytes): the record builds meta stand-ins of their shape and dtype if it reports.
    # (detach() only where autograd tracks the tensor: an op per call otherwise.)
    t = None if p.prob else (p.target.detach() if p.target.requires_grad else p.target).clone()
    kept = None if losses is None else losses.detach() if losses.requires_grad else losses
    if kept is not None and p.reduction == "none" and kept.is_inference():
        # The caller gets these very losses and may edit them before the report; an inference
        # tensor has no version counter to tell (see _Pending.losses_version): keep a copy.
        kept = kept.clone()
    # Device bytes the record keeps alive: the label copy and the losses.
    nbytes = (0 if t is None else t.numel() * t.element_size()) + (
        0 if kept is None else kept.numel() * kept.element_size())
    rec = _Pending(p, t, kept, bufs, scan.nonfinite_from_output, event, strict,
                   device_type or p.input.device.type, note or DEFERRED_NOTE, findings, key, nbytes,
                   None if owner is None else _weak(owner), op, counts.device if pinned else None)
    with _pending_lock:
        queue = _pending.get(key)
        if queue is None:
            _pending[key] = [rec]
        else:
            queue.append(rec)


# Meta stand-ins by (shape, dtype): a deferred record keeps one for the logits (and probability
# targets) instead of the tensor; they hold no data, so records share them.
_metas: dict[tuple[object, ...], Tensor] = {}


def _meta(t: Tensor) -> Tensor:
    return _meta_of(t.shape, t.dtype)


def _meta_of(shape: torch.Size, dtype: torch.dtype) -> Tensor:
    k = (shape, dtype)
    m = _metas.get(k)
    if m is None:
        if len(_metas) >= 256:
            _metas.clear()
        m = _metas[k] = torch.empty(shape, dtype=dtype, device="meta")
    return m


# Host buffers of reported records, reused by later records: a training loop defers every
# step, and pinned memory is slow to allocate. The (counts, result) pair returns here only after
# its record was read (its copies had finished: the record's event was waited for).
_free_host: dict[tuple[object, ...], list[tuple[Tensor, Tensor | None]]] = {}
MAX_FREE_HOST = 64


def _host_buffers(counts: Tensor, out: Tensor | None, pinned: bool) -> tuple[Tensor, Tensor | None]:
    k = (counts.shape, counts.dtype, None if out is None else out.dtype, pinned)
    free = _free_host.get(k)
    if free:
        try:
            return free.pop()
        except IndexError:  # another thread took the last one
            pass
    return (torch.empty(counts.shape, dtype=counts.dtype, pin_memory=pinned),
            None if out is None else torch.empty((), dtype=out.dtype, pin_memory=pinned))


# CUDA events of reported records, per device, recorded again by later records (creating one
# costs a driver call).
_free_events: dict[torch.device, list[object]] = {}


def _release(rec: _Pending) -> None:
    pinned = rec.event is not None
    if pinned:
        events = _free_events.setdefault(rec.event_device, [])  # type: ignore[arg-type]
        if len(events) < MAX_FREE_HOST:
            events.append(rec.event)
    counts, out = rec.bufs
    k = (counts.shape, counts.dtype, None if out is None else out.dtype, pinned)
    free = _free_host.get(k)
    if free is None:
        _free_host[k] = [rec.bufs]
    elif len(free) < MAX_FREE_HOST:
        free.append(rec.bufs)


# Records a loss may have in flight before a call waits for the oldest one, by count and by the
# device memory they keep alive (each holds O(N) copies: a label copy and per-position losses).
# A host that runs this far ahead of the GPU is rare (training loops sync on logging, the
# optimizer, the data loader).
MAX_IN_FLIGHT = 64
MAX_IN_FLIGHT_BYTES = 256 << 20


def _weak(owner: object | None) -> Callable[[], object] | None:
    try:
        return None if owner is None else weakref.ref(owner)
    except TypeError:  # not weak-referenceable: never treated as gone
        return None


def _orphaned(rec: _Pending) -> bool:
    """Its loss module was garbage-collected (a loss created inline every step), so no call of
    that loss will ever report it."""
    return rec.owner_ref is not None and rec.owner_ref() is None


def _nbytes(t: Tensor) -> int:
    return 0 if t.device.type == "meta" else t.numel() * t.element_size()


def _ready(rec: _Pending) -> bool:
    return rec.event is None or bool(rec.event.query())  # type: ignore[attr-defined]


def _take(queue: list[_Pending]) -> int:
    """How many records at the front of ``queue`` to report now without blocking: the finished
    ones, oldest first, plus the oldest ones beyond the caps (those are waited for)."""
    if len(queue) == 1:  # the steady state of a loop: the previous call's record
        rec = queue[0]
        return 1 if MAX_IN_FLIGHT < 1 or rec.nbytes > MAX_IN_FLIGHT_BYTES or _ready(rec) else 0
    n, total = 0, sum(r.nbytes for r in queue)
    while n < len(queue):
        over = len(queue) - n > MAX_IN_FLIGHT or total > MAX_IN_FLIGHT_BYTES
        if not (over or _ready(queue[n])):
            break
        total -= queue[n].nbytes
        n += 1
    return n


def flush(key: int | None, owner: object | None, wait: bool = True) -> None:
    """Report what earlier calls of this loss (``key``), or of every loss (None), found.

    ``wait=False`` (default-mode calls): report only the records whose GPU work has finished,
    oldest first, and never block, except on records beyond the caps above. Waiting on the
    previous call's event here would serialize host and GPU: every call would start only when
    the previous loss kernel had finished, and the host work of the call would no longer overlap
    with the GPU's. Strict calls pass ``wait=True``: they sync anyway, and an earlier call's
    finding must be raised before their own.

    If a report raises (an error, or a warning turned into one), the records not reported yet go
    back to the front of their queues: the next call or ``check_pending()`` reports them.
    """
    if not wait and key is not None and len(_pending) == 1 and _clean_single(key):
        return  # the steady state of a loop: the previous call's record, finished and clean
    with _pending_lock:
        if key is None:
            recs = [r for lst in _pending.values() for r in lst]
            _pending.clear()
        elif wait:
            recs = _pending.pop(key, [])
        else:
            recs = []
            # This loss's own finished records, and those of loss modules that no longer exist.
            keys = [key]
            if len(_pending) > 1 or key not in _pending:
                keys += [k for k, q in _pending.items() if k != key and q and _orphaned(q[0])]
            for k in keys:
                queue = _pending.get(k)
                if not queue:
                    continue
                n = _take(queue)
                if n:
                    recs += queue[:n]
                    del queue[:n]
                    if not queue:
                        del _pending[k]
    for i, rec in enumerate(recs):
        try:
            _report_record(rec, _owner(rec, key, owner))
        except BaseException:
            _requeue(recs[i + 1 :])
            raise


def _owner(rec: _Pending, key: int | None, owner: object | None) -> object | None:
    """Whose warn-once state a record's findings count against: the loss that made it, wherever
    it is reported (its own later call, ``check_pending()``, another loss's call); a loss that is
    gone, or the functional API, per call site (``report``). Never the calling loss for a record
    of a dead loss whose id it reuses: that would silence the caller's own first warning."""
    if rec.owner_ref is not None:
        return rec.owner_ref()  # None once garbage-collected
    if key is not None and rec.key == key:
        return owner
    # Compiled graphs record no module, only its id (the owner their report op uses).
    return None if rec.key in FUNCTIONAL_KEYS else rec.key


def _clean_single(key: int) -> bool:
    """Report the only pending record, this loss's own, if it is finished and clean (what
    ``_report_record`` concludes for it: nothing counted, a finite result, no findings): recycle
    it and return True. Anything else is left to the general path."""
    queue = _pending.get(key)
    if queue is None or len(queue) != 1:
        return False
    rec = queue[0]
    if rec.findings or rec.out_host is None or not rec.p[8] or not (
            rec.event is None or rec.event.query()):  # type: ignore[attr-defined]
        return False
    if not _nothing_counted(rec.counts_host.tolist()) or not math.isfinite(rec.out_host.item()):
        return False
    with _pending_lock:
        if _pending.get(key) is not queue or len(queue) != 1 or queue[0] is not rec:
            return False  # another thread got there first
        del _pending[key]
    _release(rec)
    return True


def _nothing_counted(counts: list[int]) -> bool:
    """A record's counts report nothing: every count 0 but the softmax check's sample size
    (``SOFTMAX_CHECKED``, the rows it looked at, never a finding by itself: every call with
    classes and positions samples some), which is what ``resolve`` concludes from them given a
    finite result."""
    return not any(counts[:F.SOFTMAX_CHECKED]) and not any(counts[F.SOFTMAX_CHECKED + 1:])


def _requeue(recs: Sequence[_Pending]) -> None:
    with _pending_lock:
        for rec in reversed(recs):
            _pending.setdefault(rec.key, []).insert(0, rec)


def _report_record(rec: _Pending, owner: object | None) -> None:
    note = rec.note
    if _orphaned(rec) and note.startswith(DEFERRED_NOTE):
        note = GONE_NOTE + note[len(DEFERRED_NOTE):]
    for f in rec.findings:
        _report(replace(f, message=noted(note, f.kind) + f.message), rec.strict, owner)
    if rec.event is not None:
        rec.event.synchronize()  # waits for that call's kernels only, normally long finished
    counts = rec.counts_host.tolist()
    out_finite = None
    losses = rec.losses
    if rec.losses_version is not None and losses is not None and losses._version != rec.losses_version:
        losses = None  # edited by the caller since: the counts alone tell what the call found
    if rec.out_host is not None:
        out_finite = math.isfinite(rec.out_host.item())
        if out_finite and _nothing_counted(counts) and rec.p[8]:  # (the number of classes)
            _release(rec)  # the clean record: what resolve() would conclude
            return
    elif losses is not None:
        out_finite = bool(torch.isfinite(losses).all())
    try:
        resolve(Scan(counts, rec.nonfinite_from_output), rec.problem, losses,
                rec.out_host, out_finite, rec.strict, owner, have_logits=False,
                device_type=rec.device_type, note=note, op=rec.op)
    finally:
        _release(rec)

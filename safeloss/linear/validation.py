"""Validation of a linear + cross-entropy call: pure functions, no kernels.

The layer's own arguments (input, linear_weight, linear_bias, options) are checked here, with
messages in terms of this API (the input's feature size, the layer's (C, H), the target). The
target, the class weight and every finding about them go through the shared
:func:`safeloss.validation.normalize`, run against a zero-stride stand-in for the logits: a real
tensor of the would-be ``(N, C, *out_features)`` shape on the input's device that owns one
element, so nothing logits-sized is ever allocated.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..core import checks
from ..core.errors import (
    ArgumentTypeError,
    BatchSizeMismatchError,
    DeviceMismatchError,
    IgnoreIndexError,
    InputDtypeError,
    InputError,
    LayoutError,
    NonFiniteError,
    OptionsError,
    SafeLossError,
    TargetShapeError,
    WeightError,
    fmt_list,
    fmt_shape,
    plural,
    stock_class,
)
from ..core.report import Finding
from ..core.validation import (
    Problem,
    _smoothing_type,
    check_ignore_index_range,
    check_reduction,
    int_index,
    normalize,
    reject_bool_tensor_index,
)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_WORD = re.compile(r"(?<![\w.])cross_entropy\b")
_CLASS = re.compile(r"(?<!\w)CrossEntropyLoss\b")


_OP = "linear_cross_entropy"
# The shared non-finite report, where it cannot read the logits (this op never makes them).
_UNSEEN = re.compile(r"because the logits( or the class weights| or the probability targets)*( hold)")


def reword(message: str) -> str:
    """A shared cross-entropy message in terms of this API (the names users call)."""
    message = _WORD.sub(_OP, message)
    message = _CLASS.sub("LinearCrossEntropyLoss", message)
    message = _UNSEEN.sub(lambda m: "because the input, linear_weight or linear_bias"
                          + (m.group(1) or "") + m.group(2), message)
    # The shared overflow fixes say "pass logits.float() to the loss"; this op takes no logits.
    message = message.replace("pass logits.float() to the loss",
                              "pass input.float(), linear_weight.float() and any linear_bias.float()")
    message = message.replace("BCEWithLogitsLoss()(logits, target)",
                              "BCEWithLogitsLoss()(torch.nn.functional.linear(input, linear_weight, "
                              "linear_bias), target)")
    return message.replace("input shape", "logits shape").replace("same as the input", "the logits' shape")


def named(message: str) -> str:
    """A shared message reworded, and named as this op's where its first line does not say
    whose it is: what a report after the call (deferred CUDA checks, a compiled graph's report
    op) needs most, since the op's own code is no longer on the stack."""
    message = reword(message)
    note, sep, body = message.partition("]\n") if message.startswith("[") else ("", "", message)
    if _OP not in body.split("\n", 1)[0]:
        body = f"{_OP}: {body}"
    return note + sep + body


checks.WORDING[_OP] = named


def reworded(finding: Finding) -> Finding:
    return replace(finding, message=named(finding.message))


@dataclass
class LinearProblem:
    """A validated call: 2-D operands for the chunk loop plus the shared :class:`Problem`."""

    x: Tensor  # (N, H): the input, batched
    w: Tensor  # (C * D, H): linear_weight with out_features folded into the rows
    b: Tensor | None  # (C * D,)
    target: Tensor  # normalized target, batched: (N, *out) indices or (N, C, *out) probabilities
    p: Problem  # the shared problem; p.input is the zero-stride stand-in for the logits
    num_classes: int
    out_features: tuple[int, ...]
    batched: bool
    compute_dtype: torch.dtype  # dtype of the logits stock torch would compute (autocast applied)

    @property
    def positions(self) -> int:
        return math.prod(self.out_features) if self.out_features else 1


def autocast_enabled(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def _layer(w: Tensor) -> str:
    return f"linear_weight {fmt_shape(w.shape)}"


def check_options(options: object) -> None:
    cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)  # torch >= 2.13
    if options is not None and (cls is None or not isinstance(options, cls)):
        # Stock fails on it with an AttributeError (options._adjust), where it reads it at all.
        raise stock_class(ArgumentTypeError, AttributeError)(
            f"linear_cross_entropy: options must be None or a torch.nn.LinearCrossEntropyOptions, got "
            f"{type(options).__name__}.\nsafeloss never materializes the logits; options picks "
            "the precision of the chunked path as stock's does (acc_policy, acc_dtype) and caps "
            "the rows of a chunk (batch_chunk_size).\nFix: options=None (stock's reference "
            "numbers), or torch.nn.LinearCrossEntropyOptions(...)"
        )


_HALF = (torch.float16, torch.bfloat16)


def stock_chunks(options: object, out_features: tuple[int, ...], eps: float, target: Tensor) -> bool:
    """Whether stock torch would take its chunked path for this call (else its reference path,
    with the "options ignored" warning): the same condition, read from the same arguments."""
    return (options is not None and not out_features and eps == 0.0 and target.dtype == torch.int64
            and not torch.jit.is_tracing())


def tile_plan(options: object, lp: LinearProblem, target: Tensor) -> tuple[torch.dtype | None, int | None]:
    """(the dtype each logits tile is rounded to, a cap on rows per chunk), as stock defines them.

    ``options=None`` (or a call stock's chunked path does not take): stock's reference path,
    whose half-precision ``linear`` rounds the logits to the compute dtype (the input's, or
    autocast's) before the softmax. ``LinearCrossEntropyOptions``: stock's chunked path keeps the
    logits in ``acc_dtype`` where it is wider than the input (float32 for "accurate", and for
    "balanced" / "compact" with bfloat16 input; float16 input under those two keeps float16
    logits), and in the input dtype where ``acc_dtype`` is the input's. Everything after the tile
    accumulates in float32 in every case. ``batch_chunk_size``, when given, caps the rows of a
    chunk; the ``chunking_method`` heuristics are checked as stock checks them, but the tile is
    planned by safeloss (from a memory budget), never larger than ``batch_chunk_size``.
    """
    dtype = lp.compute_dtype
    half = dtype if dtype in _HALF else None
    if not stock_chunks(options, lp.out_features, lp.p.label_smoothing, target):
        return half, None
    try:
        resolved = options._adjust(  # type: ignore[attr-defined]
            num_batches=lp.x.shape[0], in_features=lp.x.shape[-1], num_classes=lp.num_classes,
            dtype=dtype, device=lp.x.device)
    except ValueError as e:
        raise OptionsError(
            f"linear_cross_entropy: options={options!r} cannot apply to this call: {e}\n"
            "Fix: give either batch_chunk_size or chunking_method, not both (chunking_method=None "
            "with batch_chunk_size)"
        ) from None
    acc = resolved.acc_dtype
    if acc != dtype and not (dtype in _HALF and acc == torch.float32):
        raise stock_class(OptionsError, RuntimeError)(
            f"linear_cross_entropy: acc_dtype={acc} cannot accumulate {dtype} input: the chunked "
            "path accumulates either in the input dtype or in float32 for float16/bfloat16 input "
            f"(stock torch: linear_cross_entropy supports float32 acc_dtype with float16/bfloat16 "
            f"inputs, but got {acc} acc_dtype and {dtype} inputs.)\n"
            "Fix: LinearCrossEntropyOptions(acc_dtype=None), which picks for the input"
        )
    cap = getattr(options, "batch_chunk_size", None)
    if half is None:
        return None, cap
    if acc == dtype:
        return dtype, cap
    if resolved.acc_policy in ("balanced", "compact") and dtype == torch.float16:
        return dtype, cap
    return None, cap


def check_layouts(x: Tensor, w: Tensor, t: Tensor, b: object, weight: object) -> None:
    """What cannot be sparse or nested (stock raises too); what it accepts sparse (the input, the
    weight, probability targets) is made dense by the caller."""
    for name, v, why in (
        ("linear_bias", b, "stock torch cannot broadcast a sparse bias either (\"expand is "
                           "unsupported for Sparse tensors\")"),
        ("weight", weight, "stock torch has no sparse kernel for the class weight either"),
    ):
        if isinstance(v, Tensor) and v.layout is not torch.strided:
            raise LayoutError(
                f"linear_cross_entropy got a {v.layout} {name} of shape {fmt_shape(v.shape)}; "
                f"{why}.\nFix: {name}={name}.to_dense()"
            )
    for name, v in (("input", x), ("linear_weight", w), ("target", t)):
        if v.is_nested:
            raise LayoutError(
                f"linear_cross_entropy got a nested tensor as the {name} ({v.size(0)} "
                "sequences); the loss needs one row of H features per position.\n"
                "Fix: pass the packed rows, x.values() with target.values() for jagged tensors, "
                "or pad them (torch.nested.to_padded_tensor) and mark the padding with ignore_index"
            )
    if t.layout is not torch.strided and t.is_floating_point() is False:
        raise LayoutError(
            f"linear_cross_entropy got {t.layout} class-index targets of shape "
            f"{fmt_shape(t.shape)}; stock torch has no sparse kernel for them either.\n"
            "Fix: target.to_dense(); only probability targets may be sparse"
        )


def _tensor(name: str, value: object, what: str, attribute: bool = True) -> Tensor:
    if not isinstance(value, Tensor):
        # stock reads an attribute of it first (input.dim(), target.shape): an AttributeError
        # there; the class weight goes to its argument parser (a TypeError)
        raise stock_class(ArgumentTypeError, AttributeError if attribute else TypeError)(
            f"linear_cross_entropy expects {name} to be a torch.Tensor, got "
            f"{type(value).__name__}.\nFix: pass {what}"
        )
    return value


def _check_input(x: Tensor, w: Tensor) -> None:
    if x.dtype not in _FLOATS:
        raise InputDtypeError(
            f"linear_cross_entropy got an input of dtype {x.dtype} (shape {fmt_shape(x.shape)}); "
            "it must hold float hidden states, one row of H features per sample. If this tensor "
            "holds token ids or labels, it was passed where the hidden states go.\n"
            "Fix: linear_cross_entropy(hidden_states, lm_head.weight, labels)"
        )
    if w.dtype not in _FLOATS:
        raise InputDtypeError(
            f"linear_cross_entropy got a linear_weight of dtype {w.dtype}; it must be the float "
            "weight of the output layer.\nFix: pass lm_head.weight (or head.weight)"
        )
    H, C = (w.shape[-1], w.shape[0]) if w.dim() else (0, 0)
    if x.dim() == 0 or x.dim() > 2:
        if x.dim() == 0:
            raise InputError(
                "linear_cross_entropy got a 0-d input; it needs H features per sample, shape "
                f"(N, H) or (H,).\n  {_layer(w)}: C={C} classes, H={H} features\n"
                "Fix: pass the hidden states that feed the output layer\n"
                "(stock torch: expected input with dimensionality 1 or 2, got 0)"
            )
        h = x.shape[-1]
        lead = fmt_shape(x.shape[:-1])
        fix = (
            f"Fix: linear_cross_entropy(x.reshape(-1, {h}), linear_weight, target.reshape(-1))"
            if h == H else
            "Fix: flatten the leading dimensions (x.reshape(-1, H), target.reshape(-1)), and pass "
            "the hidden states of the layer that feeds this head"
        )
        raise InputError(
            f"linear_cross_entropy expects the input as (N, H) or (H,), got a {x.dim()}-D input of "
            f"shape {fmt_shape(x.shape)}.\n  {_layer(w)}: C={C} classes, H={H} features\n"
            f"Hidden states of shape (batch, seq, H) must be flattened to one row per token "
            f"(here {lead} -> {math.prod(x.shape[:-1])} rows), and the labels with them; unlike "
            "nn.Linear, the loss does not broadcast over leading dimensions.\n" + fix
            + f"\n(stock torch: expected input with dimensionality 1 or 2, got {x.dim()})"
        )
    if w.dim() < 2:
        raise InputError(
            f"linear_cross_entropy got a {w.dim()}-D linear_weight of shape {fmt_shape(w.shape)}; "
            "it must be the layer's weight matrix, shape (C, H): one row of H features per class "
            "(as nn.Linear(H, C).weight stores it).\n"
            + ("A 1-D tensor is usually the layer's bias, or a single row of the weight.\n"
               if w.dim() == 1 else "")
            + "Fix: pass head.weight, and the bias as linear_bias=head.bias\n"
            f"(stock torch: expected linear_weight with dimensionality at least 2, got {w.dim()})"
        )


def _feature_error(x: Tensor, w: Tensor) -> None:
    h, H, C = x.shape[-1], w.shape[-1], w.shape[0]
    if h == H:
        return
    head = (
        f"  input shape {fmt_shape(x.shape)}: {h} features\n"
        f"  {_layer(w)}: C={C} classes, H={H} features\n"
    )
    if h == C and w.dim() == 2:
        if H > C:
            cause = (
                f"linear_weight looks transposed: it has H={H} columns where the input has {h} "
                f"features, and {C} rows, which equals the input's feature size. Weights are "
                "stored (C, H) = (out_features, in_features), as nn.Linear(H, C).weight is; a "
                "(H, C) matrix (a transposed weight, or one built for x @ W) gives this error.\n"
                "Fix: pass linear_weight.T (or the nn.Linear's own .weight); if the input already "
                "holds logits, pass the hidden states that feed the head instead"
            )
        else:
            cause = (
                f"The input has {h} features, exactly the layer's number of classes C={C}: it "
                "looks like the logits, i.e. the hidden states already went through this head "
                "(lm_head(hidden) passed where hidden was expected), so the head would be applied "
                "twice. (Or linear_weight is transposed, (H, C) instead of (C, H).)\n"
                "Fix: pass the hidden states that feed the head, e.g. outputs.hidden_states[-1] "
                "or the input of lm_head, not its output (for logits you already have, use "
                "safeloss.cross_entropy(logits, target)); or linear_weight.T if it is transposed"
            )
    else:
        cause = (
            f"The layer expects {H} input features but the input has {h}: the head was built "
            "for a different hidden size, or the input comes from another layer.\n"
            f"Fix: build the head as nn.Linear({h}, {C}) to match the input, or pass the hidden "
            f"states of size {H} that feed it"
        )
    raise InputError(
        f"linear_cross_entropy: the input's feature size {h} does not match linear_weight's "
        f"{H}.\n" + head + cause + "\n(stock torch: expected equal input and linear_weight last "
        f"dimensions (in_features), got {h} and {H}, respectively)"
    )


def _check_bias(b: Tensor, w: Tensor, x: Tensor) -> None:
    C, out = w.shape[0], tuple(w.shape[1:-1])
    want = (C, *out)
    if b.dtype not in _FLOATS:
        raise InputDtypeError(
            f"linear_cross_entropy got a linear_bias of dtype {b.dtype}.\nFix: linear_bias=head.bias"
        )
    if tuple(b.shape) != want:
        hint = ""
        if b.numel() == math.prod(want) and b.dim() != len(want):
            hint = f"It has the right number of entries: linear_bias.reshape{fmt_shape(want)}.\n"
        elif b.dim() == 1 and b.shape[0] == w.shape[-1]:
            hint = (f"Its length {b.shape[0]} is the hidden size H, not the number of classes: it "
                    "is the bias of another layer.\n")
        raise InputError(
            f"linear_cross_entropy got linear_bias of shape {fmt_shape(b.shape)}, but "
            f"{_layer(w)} needs one bias per output, shape {fmt_shape(want)}.\n"
            f"  input shape {fmt_shape(x.shape)}\n" + hint
            + "Fix: pass the bias of the same layer as linear_weight (head.bias), or no bias\n"
            f"(stock torch: expected linear_bias shape {want}, got {tuple(b.shape)})"
        )


def _check_devices(x: Tensor, others: list[tuple[str, Tensor | None]]) -> None:
    bad = [(name, t.device) for name, t in others if t is not None and t.device != x.device]
    if bad:
        names = " and ".join(f"{name} is on {d}" for name, d in bad)
        fixes = "; ".join(f"{name} = {name}.to(input.device)" for name, _ in bad)
        off = {name for name, _ in bad}
        causes = []  # the cause that fits each tensor that is off
        if "target" in off:
            causes.append("the labels were not moved with the inputs (a DataLoader delivers them "
                          "on the CPU)" if dict(bad)["target"].type == "cpu" else
                          "the labels were made on another device")
        if off & {"linear_weight", "linear_bias"}:
            causes.append("the head's parameters were not moved with the hidden states (a loss "
                          "module's own linear layer moves only with loss_fn.to(device))")
        if "weight" in off:
            causes.append("a class weight stays where it was built")
        raise DeviceMismatchError(
            f"linear_cross_entropy got tensors on different devices: input is on {x.device}, "
            f"{names}.\nEverything must live on one device; {'; '.join(causes)}.\nFix: {fixes}"
        )


def _check_dtypes(x: Tensor, w: Tensor, b: Tensor | None, autocast: bool) -> None:
    wide = torch.float64 in (x.dtype, w.dtype, None if b is None else b.dtype)
    if autocast and not wide:
        return  # stock's linear casts both to the autocast dtype (never float64 ones)
    # Autocast leaves float64 operands as they are (stock raises under it too): offered only
    # where no operand is float64.
    autocast_fix = "" if wide else ", or run the step under torch.autocast"
    if w.dtype != x.dtype:
        raise InputDtypeError(
            f"linear_cross_entropy got an input of dtype {x.dtype} but a linear_weight of dtype "
            f"{w.dtype}; the matrix product needs one dtype (stock torch: \"expected m1 and m2 "
            "to have the same dtype\").\n"
            # Which side was cast is not in the inputs: named as a guess.
            + ("The hidden states are in the narrower dtype; a likely cause (a guess): the model "
               "body was cast (model.half(), model.to(torch.bfloat16)) and the head was not.\n"
               if x.dtype.itemsize < w.dtype.itemsize else
               "The linear_weight is in the narrower dtype; a likely cause (a guess): the head was "
               "cast and the hidden states were not.\n" if x.dtype.itemsize > w.dtype.itemsize else "")
            + f"Fix: input.to(linear_weight.dtype){autocast_fix}"
        )
    if b is not None and b.dtype != x.dtype:
        # The input and the weight agree: the bias alone is off, and it is the one to convert
        # (converting the input would set it against the weight).
        raise InputDtypeError(
            f"linear_cross_entropy got linear_bias of dtype {b.dtype}, but the input and "
            f"linear_weight are {x.dtype}; the bias is added to their product and needs its dtype "
            "(stock torch: \"self and mat2 must have the same dtype\").\n"
            "A likely cause (a guess): the bias was not converted with the weight (built or loaded "
            "apart from the layer, or .to(dtype) applied to the weight alone).\n"
            f"Fix: linear_bias.to(input.dtype){autocast_fix}"
        )


def _target_error(x2: Tensor, w: Tensor, target: Tensor, expected: tuple[int, ...],
                  logits_shape: tuple[int, ...], batched: bool) -> None:
    """The most helpful error for a target that fits neither class indices nor probabilities."""
    N, h, C = x2.shape[0], x2.shape[-1], w.shape[0]
    tshape = tuple(target.shape)
    head = (
        f"  input  shape {fmt_shape(x2.shape if batched else x2.shape[1:])}: "
        + (f"{N} rows of {h} features\n" if batched else f"one sample of {h} features\n")
        + f"  {_layer(w)}: C={C} classes, H={w.shape[-1]} features\n"
        f"  target shape {fmt_shape(tshape)}\n"
    )
    want = (f"class indices of shape {fmt_shape(expected)} or probabilities of shape "
            f"{fmt_shape(logits_shape)}")
    # stock checks the batch size first: a target of another batch (0-d: batch 0) is a ValueError;
    # so is a batch of integer labels for one unbatched sample ("1D target must have size 1")
    other_batch = (batched and (target.dim() == 0 or tshape[0] != N)) or (
        not batched and target.dim() == 1 and tshape[0] != 1 and target.dtype in (torch.int64, torch.uint8))
    shape_error = stock_class(TargetShapeError, ValueError) if other_batch else TargetShapeError
    if batched and target.dim() == 0 and N == 0:  # the batch sizes agree (0): stock indexes it
        shape_error = stock_class(TargetShapeError, IndexError)
    same_rest = (target.dim() == len(expected) and tshape[1:] == expected[1:]) or (
        target.dim() == len(logits_shape) and tshape[1:] == logits_shape[1:])
    if batched and target.dim() >= 1 and tshape[0] != N and same_rest:
        n_t = tshape[0]
        lines = [f"linear_cross_entropy got {N} input rows but {n_t} targets (stock torch: "
                 f"Expected input batch_size ({N}) to match target batch_size ({n_t})).\n"
                 + head.rstrip()]
        if 0 < n_t < N and N % n_t == 0:
            k = N // n_t
            lines.append(
                f"The input has {k}x as many rows as there are targets: hidden states of shape "
                f"({n_t}, {k}, {h}) were flattened to one row per token, but the labels are one "
                "per sequence (or were cut from a different batch).\n"
                f"Fix: per-token labels of shape ({n_t}, {k}) flattened with labels.reshape(-1), "
                "or pool the hidden states to one row per sequence before the head"
            )
        elif N - n_t > 0 and N % (N - n_t) == 0 and N // (N - n_t) >= 2:
            B, T = N - n_t, N // (N - n_t)
            lines.append(
                f"The input has {plural(B, 'row')} more than there are targets, and {N} = {B} x {T}: "
                f"what {plural(B, 'sequence')} of {T} tokens give when the labels are shifted for next-token "
                f"prediction (labels[:, 1:], {T - 1} per sequence) but the hidden states are not "
                "cut to match (hidden[:, :-1]).\n"
                "Fix: hidden[:, :-1].reshape(-1, H) with labels[:, 1:].reshape(-1)"
            )
        elif abs(N - n_t) < max(N, n_t) // 2:
            lines.append(
                "The counts differ by a little. Possible causes (the shapes do not tell which): "
                "labels and hidden states cut differently for next-token prediction (labels[:, 1:] "
                "needs hidden[:, :-1]), or a hard-coded batch size that broke on the last, smaller "
                "batch.\nFix: one target per input row, " + want
            )
        else:
            lines.append("The target comes from a different batch than the input, or the model "
                         "drops or repeats rows.\nFix: one target per input row, " + want)
        raise BatchSizeMismatchError("\n".join(lines))
    if batched and target.dim() >= 2 and target.numel() == N * math.prod(expected[1:]) \
            and not target.is_floating_point():
        raise shape_error(
            f"linear_cross_entropy got {target.dim()}-D targets for {N} input rows.\n" + head
            + "The target holds one label per input row but is not flat: the hidden states were "
            "flattened (reshape(-1, H)) and the labels were not.\n"
            f"Fix: linear_cross_entropy(x, linear_weight, target.reshape{fmt_shape(expected)})"
        )
    if batched and target.dim() == 2 and tshape[0] == N and len(expected) == 1 and _labels_per_position(target):
        T = tshape[1]
        raise shape_error(
            f"linear_cross_entropy got a 2-D target of integer labels other than 0/1 ({T} per input "
            "row).\n" + head
            + f"These read as labels per position (time steps, tokens), {T} for each row of hidden "
            "states: the hidden states were pooled (or cut) to one row per sequence.\n"
            f"Fix: one input row per label: hidden states of shape ({N}, {T}, {h}) flattened with "
            ".reshape(-1, H), together with target.reshape(-1)"
        )
    if batched and target.dim() == 2 and tshape[0] == N and len(expected) == 1:
        raise shape_error(
            f"linear_cross_entropy got a 2-D target with {tshape[1]} columns, but the layer has "
            f"C={C} classes.\n" + head
            + "A 2-D target is read as probabilities (one-hot or soft labels), one column per "
            f"class; {tshape[1]} columns disagree with the layer's {C} outputs.\n"
            "Fix: class indices of shape (N,), e.g. target.argmax(dim=1), and check that the "
            "head's number of classes matches the labels"
        )
    if not batched and target.dim() == 1 and tshape[0] > 1 and not target.is_floating_point():
        n = tshape[0]
        raise shape_error(
            f"linear_cross_entropy got one sample's hidden state but {n} labels.\n" + head
            + f"An input of shape ({h},) is a single sample, whose label is one class index (shape () "
            f"or (1,)); {n} labels mean {n} samples, whose hidden states were not passed (or were "
            "reduced to one).\n"
            f"Fix: pass the hidden states of all {n} samples, shape ({n}, {h}) (torch.stack(rows)), "
            "or one label per sample"
        )
    raise shape_error(
        "linear_cross_entropy cannot pair this target with this input and layer.\n" + head
        + f"The would-be logits have shape {fmt_shape(logits_shape)}; the target must be {want}.\n"
        f"Fix: reshape the target to {fmt_shape(expected)}"
    )


def _labels_per_position(target: Tensor) -> bool:
    """An integer 2-D target holding values other than 0/1: labels per position, not one-hot
    rows. Read on the error path only, where values can be read (not meta, not traced)."""
    if target.is_floating_point() or target.is_complex() or target.numel() == 0:
        return False
    if target.device.type == "meta" or torch.compiler.is_compiling():
        return False
    t = target.to(torch.int64) if target.dtype in (torch.uint16, torch.uint32, torch.uint64) else target
    return not bool(((t == 0) | (t == 1)).all())


def _ignore_index(ignore_index: object) -> int | None:
    ignore_index = _index_type(ignore_index)
    if ignore_index is not None:
        check_ignore_index_range(ignore_index, "linear_cross_entropy")
    return ignore_index


def _index_type(ignore_index: object) -> int | None:
    """``ignore_index`` as an int (or None), its type checked (a TypeError), not its range."""
    if ignore_index is None:
        return None
    if type(ignore_index) is int:
        return ignore_index
    reject_bool_tensor_index(ignore_index, "linear_cross_entropy")
    ii = int_index(ignore_index)
    if ii is None:
        raise ArgumentTypeError(
            f"linear_cross_entropy: ignore_index must be an int or None, got {ignore_index!r}.\nFix: ignore_index=None "
            "(the default: -100 for class indices) or the label value to skip, e.g. -100"
        )
    return ii


def _unbatched_kdim(x: Tensor, w: Tensor, out: tuple[int, ...]) -> None:
    if out and x.dim() != 2:
        raise InputError(
            f"linear_cross_entropy: a K-dimensional loss ({_layer(w)}, out_features {out}) needs "
            f"batched input (N, {w.shape[-1]}), got the unbatched input of shape "
            f"{fmt_shape(x.shape)}.\nFix: input.unsqueeze(0), with the target's batch dimension "
            f"added too\n(stock torch: K-dimensional loss defined by linear_weight shape "
            f"{tuple(w.shape)} requires batched input, (N, {w.shape[-1]}), got unbatched input "
            f"with shape {tuple(x.shape)})"
        )


def _probabilities_with_index(ii: object, logits_shape: tuple[int, ...]) -> None:
    raise IgnoreIndexError(
        f"linear_cross_entropy: ignore_index={ii!r} cannot be used with probability targets (the target has the "
        f"logits' shape {fmt_shape(logits_shape)}, so each entry is a class probability, not "
        "a label that could be skipped); stock torch raises \"ignore_index cannot be "
        "specified when target contains probabilities\".\n"
        "Fix: ignore_index=None; to skip rows, leave them out (input[keep], target[keep])"
    )


def stock_order(
    input: object, linear_weight: object, target: object, linear_bias: object, weight: object,
    reduction: object, ignore_index: object, label_smoothing: object,
    op: str = "linear_cross_entropy",
) -> None:
    """Stock's checks in stock's order, so that a call with two mistakes raises the class stock
    raises (docs/errors.md): its own shape checks (input, linear_weight, linear_bias, a
    K-dimensional head's batch, then probability targets with an ``ignore_index``), then
    ``linear`` (dtypes and devices of the layer), then ``cross_entropy``'s reduction string, its
    argument parser's types (a TypeError), an ``ignore_index`` outside int64 (a ValueError).
    Everything later (values, the target's shape and dtype) is :func:`validate`'s. Run on the
    error path only (:func:`stock_first`): a call that passes safeloss's checks passes these."""
    x = _tensor("the input", input, "the hidden states, shape (N, H)")
    w = _tensor("linear_weight", linear_weight, "the output layer's weight, e.g. lm_head.weight")
    _check_input(x, w)
    _feature_error(x, w)
    b = None if linear_bias is None else _tensor("linear_bias", linear_bias, "head.bias or None")
    if b is not None:
        _check_bias(b, w, x)
    out = tuple(int(d) for d in w.shape[1:-1])
    _unbatched_kdim(x, w, out)
    t = _tensor("the target", target, "torch.as_tensor(labels, device=input.device)")
    logits_shape = tuple(x.shape[:-1]) + (w.shape[0], *out)
    if ignore_index is not None and tuple(t.shape) == logits_shape:
        _probabilities_with_index(ignore_index, logits_shape)
    _check_devices(x, [("linear_weight", w), ("linear_bias", b)])
    _check_dtypes(x, w, b, autocast_enabled(x.device))
    check_reduction(reduction, op)
    if weight is not None and not isinstance(weight, Tensor):
        _tensor("weight", weight, "a 1-D float tensor with one entry per class", attribute=False)
    ii = _index_type(ignore_index)
    if type(label_smoothing) is not float:
        _smoothing_type(label_smoothing)
    if ii is not None:
        check_ignore_index_range(ii, "linear_cross_entropy")


def stock_first(e: SafeLossError, *args: object) -> SafeLossError:
    """``e``, a call's error, or the one stock raises before it for the call's arguments
    (``args``: :func:`stock_order`'s): the error path's, so a clean call pays nothing."""
    try:
        stock_order(*args)  # type: ignore[arg-type]
    except SafeLossError as first:
        return first
    except Exception:  # never hide the call's own error behind a failure of this check
        return e
    return e


def validate(
    input: object, linear_weight: object, target: object, linear_bias: object, weight: object,
    reduction: str, ignore_index: object, label_smoothing: float, read_values: bool = True,
) -> LinearProblem:
    """Check the layer, then the target and class weight through the shared ``normalize``."""
    x = _tensor("the input", input, "the hidden states, shape (N, H)")
    w = _tensor("linear_weight", linear_weight, "the output layer's weight, e.g. lm_head.weight")
    t = _tensor("the target", target, "torch.as_tensor(labels, device=input.device)")
    b = None if linear_bias is None else _tensor("linear_bias", linear_bias, "head.bias or None")
    if weight is not None and not isinstance(weight, Tensor):
        _tensor("weight", weight, "a 1-D float tensor with one entry per class", attribute=False)
    ii = _ignore_index(ignore_index)
    _check_input(x, w)
    _feature_error(x, w)
    if b is not None:
        _check_bias(b, w, x)
    _check_devices(x, [("linear_weight", w), ("linear_bias", b), ("target", t),
                       ("weight", weight if isinstance(weight, Tensor) else None)])
    autocast = autocast_enabled(x.device)
    _check_dtypes(x, w, b, autocast)
    C, out = w.shape[0], tuple(int(d) for d in w.shape[1:-1])
    batched = x.dim() == 2
    _unbatched_kdim(x, w, out)
    # (1, C) and (C, 1) pass on to the shared checks, which take them as cross_entropy does
    flat_ok = weight is not None and weight.numel() == C and max(weight.shape, default=0) == C
    if weight is not None and not flat_ok and (weight.dim() != 1 or weight.shape[0] != C):
        raise WeightError(
            f"linear_cross_entropy: weight has shape {fmt_shape(weight.shape)} but the layer has C={C} classes "
            f"({_layer(w)}).\nweight needs exactly one entry per class, in class order; a length "
            "mismatch usually means the weights were computed on a different label set.\n"
            f"Fix: a 1-D weight of length {C}"
        )
    N = x.shape[0] if batched else None
    logits_shape = ((N,) if batched else ()) + (C, *out)
    expected = ((N,) if batched else ()) + out
    tshape = tuple(t.shape)
    prob_shaped = tshape == logits_shape
    squeezable = (batched and t.dim() == len(expected) + 1 and tshape[1] == 1
                  and tshape[:1] + tshape[2:] == expected)
    if not (prob_shaped or tshape == expected or squeezable or (not batched and tshape == (1,))):
        x2 = x if batched else x.unsqueeze(0)
        _target_error(x2, w, t, expected, logits_shape, batched)
    if prob_shaped and ii is not None:
        _probabilities_with_index(ii, logits_shape)
    compute_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    if compute_dtype not in _FLOATS or x.dtype == torch.float64:
        compute_dtype = x.dtype
    standin = torch.empty((), dtype=compute_dtype, device=x.device).expand(logits_shape)
    try:
        p = normalize(standin, t, weight, -100 if ii is None else ii, reduction, label_smoothing,
                      read_values=read_values)
    except SafeLossError as e:
        msg = named(str(e))
        if prob_shaped and not t.is_floating_point():  # an integer target that is not one-hot
            msg += ("\n(stock torch: Expected floating point type for target with class "
                    f"probabilities, got {str(t.dtype).removeprefix('torch.').capitalize()})")
        raise type(e)(msg) from None
    p.findings = [reworded(f) for f in p.findings]
    target_b = p.target if batched else p.target.unsqueeze(0)
    return LinearProblem(
        x=x if batched else x.unsqueeze(0),
        w=w.reshape(math.prod(w.shape[:-1]), w.shape[-1]) if out else w,
        b=None if b is None else b.reshape(-1),
        target=target_b, p=p, num_classes=C, out_features=out, batched=batched,
        compute_dtype=compute_dtype,
    )


# ------------------------------------------------------------------------------ non-finite losses


def _rows_with(t: Tensor | None, what: str, per: str) -> str | None:
    """``what`` with the count and first indices of ``t``'s rows holding NaN/inf, or None."""
    if t is None:
        return None
    bad = ~torch.isfinite(t.detach())
    if t.dim() > 1:
        bad = bad.flatten(1).any(1)
    idx = bad.nonzero().flatten()
    if not idx.numel():
        return None
    shown = [str(i) for i in idx[:5].tolist()]
    return f"{what} ({plural(idx.numel(), per)}: {fmt_list(shown, total=idx.numel())})"


_OPERANDS = (("the input", "input"), ("linear_weight", "linear_weight"), ("linear_bias", "linear_bias"),
             ("the class weight", "weight"), ("the probability targets", "target"))


def _isfinite_code(sources: list[str]) -> str:
    """``torch.isfinite(...).all()`` of the operands found to hold NaN/inf (every operand of the
    call where none does), in the argument names of this op."""
    names = [name for what, name in _OPERANDS if any(s.startswith(what + " ") for s in sources)]
    names = names or ["input", "linear_weight"]
    return " and ".join(f"torch.isfinite({n}).all()" for n in names)


OVERFLOW_CAUSE = "every operand is finite, so the logits overflowed (huge input or weights: a diverged run)"


def nonfinite_finding(lp: LinearProblem, mask: Tensor, overflow: str = OVERFLOW_CAUSE) -> Finding:
    """Non-finite losses, traced back to the operand that holds NaN/inf (read on this path only);
    ``overflow``: the cause named when every operand is finite (what can overflow differs with
    the extras)."""
    n = max(1, mask.numel())
    count = int(mask.sum())
    idx = mask.nonzero()
    first = [str(list(r)) if mask.dim() > 1 else f"[{r[0]}]" for r in idx[:5].tolist()] if mask.dim() else []
    where = f" (first at {fmt_list(first, total=count)})" if first else ""
    sources = [s for s in (
        _rows_with(lp.x, "the input holds NaN/inf", "row"),
        _rows_with(lp.w, "linear_weight holds NaN/inf", "class row"),
        _rows_with(lp.b, "linear_bias holds NaN/inf", "entry"),
        _rows_with(lp.p.weight, "the class weight holds NaN/inf", "class"),
        _rows_with(lp.target if lp.p.prob else None, "the probability targets hold NaN/inf", "row"),
    ) if s]
    cause = "; ".join(sources) if sources else overflow
    return Finding(
        "nonfinite", NonFiniteError,
        f"linear_cross_entropy: the loss is NaN or infinite at {count} of "
        f"{plural(n, 'position')}{where}: {cause}.\n"
        f"  input {fmt_shape(lp.x.shape)} {lp.x.dtype}, linear_weight {fmt_shape(lp.w.shape)}\n"
        "Common causes: a learning rate that is too high (the weights blew up), a log/sqrt/"
        "division by zero earlier in the model, NaN in the input data.\n"
        f"Fix: check with {_isfinite_code(sources)}, lower the learning rate or clip gradients "
        "(torch.nn.utils.clip_grad_norm_), and use torch.autograd.detect_anomaly() to find the "
        "first op that produces NaN",
    )

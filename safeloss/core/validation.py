"""Validation and target normalization: pure functions, no kernels.

``normalize()`` looks at shapes, dtypes and devices (free: no data is read) and returns a
:class:`Problem` that every backend understands, plus the findings to report. The only places
that read tensor *data* are conversions of inputs stock torch rejects anyway (float or one-hot
integer targets), and the one-off check of a ``weight`` tensor (cached per tensor version).
"""

from __future__ import annotations

import math
import operator
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import (
    ArgumentTypeError,
    BatchSizeMismatchError,
    DeviceMismatchError,
    IgnoreIndexError,
    InputDtypeError,
    InputError,
    LabelSmoothingError,
    ReductionError,
    TargetDtypeError,
    TargetOutOfRangeError,
    TargetShapeError,
    WeightError,
    fmt_list,
    fmt_shape,
    plural,
    stock_class,
)
from .report import Finding

REDUCTIONS = ("mean", "sum", "none")
_INDEX_DTYPES = (torch.int64, torch.uint8, torch.int32, torch.int16, torch.int8)


# Unsigned label dtypes wider than uint8: torch has few kernels for them (no comparisons on CPU),
# and stock cross_entropy rejects them. uint16/uint32 widen losslessly; uint64 is reinterpreted
# as int64, with values >= 2**63 (negative labels stored as unsigned) caught, never wrapped.
_UNSIGNED_WIDE = (torch.uint16, torch.uint32, torch.uint64)
_INT64_MIN = -(2**63)


def _fits(value: int, dtype: torch.dtype) -> bool:
    info = torch.iinfo(dtype)
    return info.min <= value <= info.max


def reject_meta_option(value: object, name: str, op: str = "cross_entropy") -> None:
    """A 0-d meta tensor as an option: stock's parser takes it, then cannot read it (a
    RuntimeError); so would ``float`` / ``operator.index``, without safeloss's words."""
    if isinstance(value, Tensor) and value.is_meta:
        raise stock_class(ArgumentTypeError, RuntimeError)(
            f"{op + ': ' if op else ''}{name} must be a number, got {value!r}: a meta tensor, which holds no value "
            "(stock torch: \"Tensor.item() cannot be called on meta tensors\").\n"
            f"Fix: pass {name} as a Python number"
        )


def reject_bool_tensor_index(ignore_index: object, op: str = "cross_entropy") -> None:
    """A bool tensor as ``ignore_index``: stock fails on it (an internal assert, a RuntimeError);
    ``operator.index`` would read it as 0 or 1. A meta tensor: ``reject_meta_option``."""
    reject_meta_option(ignore_index, "ignore_index", op)
    if isinstance(ignore_index, Tensor) and ignore_index.dtype == torch.bool:
        raise stock_class(ArgumentTypeError, RuntimeError)(
            f"{op}: ignore_index must be an int, got {ignore_index!r} (a bool tensor; stock torch "
            "fails on it with an internal assert).\n"
            "Fix: ignore_index=-100 (the default) or the label value to skip, as a Python int"
        )


def check_ignore_index_range(ignore_index: int, op: str = "cross_entropy") -> None:
    """Stock's argument parser takes ``ignore_index`` as an int64 and rejects any other int
    ("Overflow when unpacking long long", a ValueError), before it looks at anything else."""
    if not fits_int64(ignore_index):
        raise stock_class(IgnoreIndexError, ValueError)(
            f"{op}: ignore_index={ignore_index} does not fit int64 ({_INT64_MIN} .. {2**63 - 1}), "
            "the type labels are compared in (stock torch: \"Overflow when unpacking long long\"), "
            "so no label could ever equal it.\n"
            "Fix: ignore_index=-100 (the default) or the label value to skip, e.g. 255 for "
            "segmentation masks; a -1 stored as uint64 (2**64 - 1) is ignore_index=-1"
        )


# torch's ScalarType names, as its dtype-mismatch errors print them.
_SCALAR_NAME = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
                torch.bfloat16: "BFloat16"}
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class Problem:
    """A validated cross-entropy call, in the one form every backend accepts."""

    input: Tensor  # logits (C,), (N, C) or (N, C, d1..dK); the caller's tensor, never copied
    target: Tensor  # class indices (positions shape) or probabilities (input's shape)
    prob: bool  # True: probability targets
    # (C,), on the input's device: in the input's dtype for class indices (cast, with a finding,
    # where stock torch would reject it), in its own dtype for probabilities (stock promotes).
    weight: Tensor | None
    ignore_index: int
    label_smoothing: float
    reduction: str
    num_classes: int
    out_dtype: torch.dtype
    findings: list[Finding] = field(default_factory=list)

    @property
    def positions_shape(self) -> tuple[int, ...]:
        s = tuple(self.input.shape)
        return s[1:] if len(s) == 1 else s[:1] + s[2:]


# --------------------------------------------------------------------------------- arguments


def resolve_reduction(size_average: bool | None, reduce: bool | None, reduction: str) -> str:
    """torch's legacy precedence (``torch.nn._reduction``), then a check of the string."""
    if size_average is None and reduce is None and reduction in REDUCTIONS:
        return reduction  # the common case, first
    if size_average is not None or reduce is not None:
        # torch's own helper: same precedence and the same deprecation warning text.
        from torch.nn import _reduction

        reduction = _reduction.legacy_get_string(size_average, reduce)
    return check_reduction(reduction)


def check_reduction(reduction: object, op: str = "cross_entropy") -> str:
    """``op``: the function (or module) the caller called, which the message names."""
    if reduction in REDUCTIONS:
        return reduction  # type: ignore[return-value]
    if reduction == "elementwise_mean":
        # Stock accepts the old name with this exact warning (torch.nn._reduction.get_enum).
        warnings.warn("reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.",
                      stacklevel=2)
        return "mean"
    raise ReductionError(
        f"reduction={reduction!r} is not a valid reduction for {op}.\n"
        f'Valid values are "mean" (the default: average over the targets), "sum" and "none" '
        f"(one loss per target).\n"
        f'Fix: reduction="mean"' + (
            " (reduction names are lower-case)" if isinstance(reduction, str)
            and reduction.lower() in REDUCTIONS else ""
        )
    )


def check_label_smoothing(label_smoothing: object) -> float:
    if type(label_smoothing) is float and 0.0 <= label_smoothing <= 1.0:
        return label_smoothing  # the common case, checked on every call: first
    _smoothing_type(label_smoothing)
    try:
        eps = float(label_smoothing)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ArgumentTypeError(
            f"label_smoothing must be a number between 0.0 and 1.0, got {label_smoothing!r}.\n"
            "Fix: label_smoothing=0.1 (or 0.0 to turn it off)"
        ) from None
    return _smoothing_range(eps, label_smoothing)


def _smoothing_type(label_smoothing: object) -> None:
    """What stock's parser rejects (a TypeError), and a meta tensor it cannot read."""
    if isinstance(label_smoothing, (str, bytes, bool)) or label_smoothing is None:
        raise ArgumentTypeError(
            f"label_smoothing must be a number between 0.0 and 1.0, got {label_smoothing!r}.\n"
            "Fix: label_smoothing=0.1 (or 0.0 to turn it off)"
        )
    if not _stock_float(label_smoothing):
        raise ArgumentTypeError(
            f"label_smoothing must be a number between 0.0 and 1.0, got {label_smoothing!r} (of type "
            f"{type(label_smoothing).__name__}); stock torch takes a Python float or int, a NumPy "
            "scalar or a 0-d tensor that does not require grad (no gradient flows into it).\n"
            "Fix: label_smoothing=float(value), e.g. label_smoothing=0.1"
        )
    reject_meta_option(label_smoothing, "label_smoothing", "")


def _smoothing_range(eps: float, label_smoothing: object) -> float:
    if not 0.0 <= eps <= 1.0:  # also rejects NaN
        hint = ""
        if eps < 0:
            hint = (
                "\nStock torch silently treats a negative value as 0.0, so the smoothing you asked "
                "for would never happen."
            )
        elif eps > 1 and eps <= 100:
            hint = f"\nIf you meant a percentage, label_smoothing={eps / 100:g}."
        raise LabelSmoothingError(
            f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing!r}.{hint}\n"
            "It is the share of probability mass spread uniformly over all classes; typical "
            "values are 0.05 to 0.2.\nFix: label_smoothing=0.1 (or 0.0 to turn it off)"
        )
    return eps


def _stock_float(value: object) -> bool:
    """Whether stock's argument parser takes ``value`` for a float argument: a float or int (or a
    subclass), a NumPy scalar, a 0-d tensor that does not require grad, or a symbolic number."""
    kind = type(value)
    if isinstance(value, (float, int)) or (kind.__module__ == "numpy" and kind.__name__ != "ndarray"):
        return True
    if isinstance(value, Tensor):
        return value.dim() == 0 and not value.requires_grad
    return isinstance(value, (torch.SymFloat, torch.SymInt))


# --------------------------------------------------------------------------------- the logits


def _stock_builtin(input: Tensor, target: object) -> type[Exception]:
    """The builtin stock torch raises for a target (or 0-d input) it rejects: which of its checks
    fails first, from shapes and dtypes alone. A batch-size mismatch is checked before anything
    else about the target (``ValueError``), except for 1-D logits, which check the dtype first."""
    if not isinstance(target, Tensor):
        return TypeError
    if input.dim() == 0:  # log_softmax over dim 1, unless the 0-d target is a probability
        return RuntimeError if target.dim() == 0 and not target.is_floating_point() else IndexError
    if target.shape == input.shape:  # probability targets
        return RuntimeError
    if input.dim() == 1:
        size_checked = target.dim() == 1 and target.dtype in (torch.int64, torch.uint8)
        return ValueError if size_checked and target.numel() != 1 else RuntimeError
    if target.dim() == 0:  # stock reads a 0-d target's batch size as 0, then indexes dim 0
        return ValueError if input.shape[0] != 0 else IndexError if input.dim() == 2 else RuntimeError
    return ValueError if target.shape[0] != input.shape[0] else RuntimeError


def _check_input(input: object, target: object = None) -> Tensor:
    if not isinstance(input, Tensor):
        raise ArgumentTypeError(
            f"cross_entropy expects the input (logits) to be a torch.Tensor, got "
            f"{type(input).__name__}.\nFix: pass the model's output tensor, e.g. "
            "loss_fn(model(x), y)"
        )
    if input.dtype not in _INPUT_DTYPES:
        builtin = _stock_builtin(input, target) if input.dim() == 0 else NotImplementedError
        # Swapped arguments show in the shapes: float "labels" whose own labels' shape (dim 1
        # removed) is the integer input's shape.
        swapped = (
            isinstance(target, Tensor) and target.is_floating_point() and target.dim() >= 2
            and tuple(input.shape) == tuple(target.shape[:1]) + tuple(target.shape[2:])
        )
        why = (
            f"The arguments look swapped: the target is a float tensor of shape "
            f"{fmt_shape(target.shape)}, and this integer input has the shape labels for it would "
            "have.\nFix: loss_fn(logits, labels), logits first"
            if swapped else
            "The input must hold raw float scores (logits), one per class, as a model's output "
            "does; if this tensor holds the labels, the logits go first.\n"
            "Fix: loss_fn(logits, labels) with float logits, e.g. model(x), or logits.float() "
            "for integer scores"
        )
        raise stock_class(InputDtypeError, builtin)(
            f"cross_entropy got integer or non-real logits: input dtype {input.dtype}, shape "
            f"{fmt_shape(input.shape)}.\n{why}"
        )
    if input.dim() == 0:
        raise stock_class(InputError, _stock_builtin(input, target))(
            "cross_entropy got a 0-d input (a single number); it needs one score per class.\n"
            "  input shape (): no class dimension\n"
            "Fix: the model should output C scores per sample, shape (N, C); for a single "
            "yes/no score use torch.nn.BCEWithLogitsLoss"
        )
    return input


def _kd_no_classes(x: Tensor) -> None:
    """3-D and 5-D+ logits with an empty class dimension and some positions: stock runs them as
    4-D, ``view(N, C, 1, -1)``, which cannot keep the positions of an empty tensor, and fails
    ("size mismatch", a RuntimeError) for any class-index target."""
    raise InputError(
        f"cross_entropy got logits with no classes (input shape {fmt_shape(x.shape)}: the class "
        "dimension, dim 1, has size 0), so there is no loss to compute; stock torch fails on "
        f"{x.dim()}-D logits with an empty class dimension (\"size mismatch\"), whatever the labels.\n"
        "The final layer most likely has 0 outputs, or the logits were sliced or reshaped along "
        "the wrong dimension.\n"
        "Fix: check the final layer's output size (e.g. nn.Conv1d(d, num_classes, 1) with "
        "num_classes > 0) and that the classes are in dim 1"
    )


# --------------------------------------------------------------------------------- devices


def _check_devices(input: Tensor, target: Tensor, weight: Tensor | None) -> None:
    dev = input.device
    if target.device == dev and (weight is None or weight.device == dev):
        return
    bad = []
    if target.device != dev:
        bad.append(("target", target.device))
    if weight is not None and weight.device != dev:
        bad.append(("weight", weight.device))
    if bad:
        names = " and ".join(f"{name} is on {d}" for name, d in bad)
        fixes = "; ".join(f"{name} = {name}.to(input.device)" for name, _ in bad)
        # Name the cause that fits the tensor that is off: labels and weights go astray differently.
        causes = []
        if target.device != dev:
            causes.append(
                "the labels are still on the CPU, where a DataLoader delivers them, and need "
                ".to(device) like the inputs" if target.device.type == "cpu" else
                f"the labels were made on {target.device} and not moved"
            )
        if weight is not None and weight.device != dev:
            causes.append(
                "a class weight stays where it was built: a loss module's weight moves only with "
                "loss_fn.to(device), and a weight passed per call is not moved at all"
            )
        raise DeviceMismatchError(
            f"cross_entropy got tensors on different devices: input is on {dev}, {names}.\n"
            f"Everything must live on one device; {'; '.join(causes)}.\n"
            f"Fix: {fixes}"
            + ("  (or loss_fn.to(device) for a module's weight)" if weight is not None and weight.device != dev else "")
        )


# --------------------------------------------------------------------------------- weight

# The negative entries of each weight tensor off the CPU, per version: a training loop passes the
# same buffer every step, and reading its data (a host sync on CUDA) once per version is enough.
# The finding itself is re-reported every call (report() shows a warning once; strict mode raises
# each time).
_weight_negatives: dict[int, tuple[weakref.ref[Tensor], int, list[int]]] = {}


def _negative_classes(weight: Tensor) -> list[int]:
    if weight.device.type == "cpu" or weight.is_inference():
        # A read of C entries on the CPU is free: look every call, however the weight was changed
        # (a write through .data, or under no_grad into a view, may bump no version counter).
        # Inference tensors have no version counter to key a cache on at all.
        return _read_negatives(weight)
    # Elsewhere the read is a host sync: once per version here (so the first step reports at once),
    # and every kernel also counts negative entries on the device (_flags.WEIGHT_NEGATIVE), which
    # catches changes that bump no version.
    key = id(weight)
    hit = _weight_negatives.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight._version:
        return hit[2]
    found = _read_negatives(weight)
    ref = weakref.ref(weight, lambda _, key=key: _weight_negatives.pop(key, None))
    _weight_negatives[key] = (ref, weight._version, found)
    return found


def _read_negatives(weight: Tensor) -> list[int]:
    neg = weight < 0
    return neg.nonzero().flatten().tolist() if bool(neg.any()) else []


def negative_weight_finding(classes: list[int] | None, count: int) -> Finding:
    """``classes``: the negative entries' indices, or None where they cannot be read (compiled
    code reports a count only)."""
    where = f" (classes {fmt_list([str(i) for i in classes])})" if classes else ""
    return Finding(
        "negative-weight", WeightError,
        f"weight has {plural(count, 'negative entry', 'negative entries')}{where}.\n"
        "A negative class weight rewards the model for being wrong on that class, so the "
        "loss can fall forever; it is almost always a bug in how the weights were computed.\n"
        "Fix: use non-negative weights, e.g. inverse class frequencies: "
        "weight = counts.sum() / (C * counts)",
    )


def _check_weight(
    weight: object, input: Tensor, num_classes: int, read_values: bool = True,
    compute_dtype: torch.dtype | None = None, prob: bool = False,
) -> tuple[Tensor | None, list[Finding]]:
    if weight is None:
        return None, []
    if not isinstance(weight, Tensor):
        raise ArgumentTypeError(
            f"weight must be a 1-D float tensor with one entry per class, got "
            f"{type(weight).__name__}.\nFix: weight=torch.tensor([...], dtype=torch.float32)"
        )
    if weight.dim() != 1 or weight.numel() != num_classes:
        n = weight.numel()
        cause = (
            "" if weight.dim() != 1 else
            f"; with {num_classes - n} fewer entries than classes, the weights were probably "
            "computed from the labels present (e.g. torch.bincount or np.unique counts), which "
            "leave out classes with no samples" if n < num_classes else
            f"; with {n - num_classes} more entries than classes, the weights were probably "
            "computed for a larger label set than this model's outputs"
        )
        raise WeightError(
            f"weight has shape {fmt_shape(weight.shape)} but the input has {num_classes} classes "
            f"(input shape {fmt_shape(input.shape)}, classes along dim "
            f"{0 if input.dim() == 1 else 1}).\nweight needs exactly one entry per class, in "
            f"class order{cause}.\n"
            f"Fix: a 1-D weight of length {num_classes}, e.g. "
            f"torch.ones({num_classes}) with the known classes filled in"
        )
    if not weight.is_floating_point():
        raise WeightError(
            f"weight must be floating point, got dtype {weight.dtype}.\n"
            "Fix: weight.float()"
        )
    findings = []
    if read_values and weight.device == input.device:
        neg = _negative_classes(weight)
        if neg:
            findings.append(negative_weight_finding(neg, len(neg)))
    if prob:
        # Probability targets: stock torch accepts any float weight and promotes (a float64 weight
        # with float32 logits gives a float64 loss); its own formula needs it as it is.
        return weight, findings
    dtype = compute_dtype or input.dtype
    if weight.dtype != dtype:
        stock_dtype = _autocast_dtype(weight.dtype, input)
        if stock_dtype != dtype:
            # Stock torch raises "expected scalar type Float but found Double": a conversion of
            # what stock rejects, so a finding (warning; strict mode stops), like float labels.
            ac = " (float32 under torch.autocast)" if dtype != input.dtype else ""
            findings.append(Finding(
                "weight-dtype", WeightError,
                f"weight is {weight.dtype} but the logits are {input.dtype}{ac}; with class-index "
                f"targets stock torch rejects this (\"expected scalar type {_SCALAR_NAME[dtype]} "
                f"but found {_SCALAR_NAME[stock_dtype]}\"). Default mode casts the weight to "
                f"{dtype} (strict mode stops here).\n"
                f"{_weight_dtype_cause(weight.dtype, dtype)}"
                f"Fix: create the weight in the logits' dtype, weight.to({dtype}) (for a loss "
                f"module: loss_fn.to({dtype}))",
            ))
        weight = weight.to(dtype)
    return weight, findings


def weight_grad_quote(input_dim: int) -> str:
    """Stock torch's words for a class weight that requires grad, quoted: its nll_loss kernel
    names itself, nll_loss2d_forward for K-d logits (which it runs as 2-d)."""
    fn = "nll_loss2d_forward" if input_dim >= 3 else "nll_loss_forward"
    return f"\"The function '{fn}' is not differentiable with respect to argument 'weight'\""


def _weight_dtype_cause(weight_dtype: torch.dtype, dtype: torch.dtype) -> str:
    """The likely cause of a weight/logits dtype mismatch, only as far as the two dtypes show it:
    a float64 weight points at NumPy, half-precision logits with a wider weight at a converted
    model; other pairs get no guess."""
    causes = []
    if weight_dtype == torch.float64:
        causes.append("a weight built from NumPy, whose arrays are float64")
    if dtype in (torch.float16, torch.bfloat16) and weight_dtype.itemsize > dtype.itemsize:
        causes.append(f"a model converted with .half() / .to(torch.bfloat16) while the weight stayed "
                      f"{weight_dtype}")
    if not causes:
        return ""
    return f"The likely cause{'s' if len(causes) > 1 else ''}: {', or '.join(causes)}.\n"


def _autocast_dtype(dtype: torch.dtype, input: Tensor) -> torch.dtype:
    """The dtype stock torch computes a float tensor in: cross_entropy is one of autocast's
    float32 ops, which casts every floating tensor but float64 to float32."""
    if dtype != torch.float64 and _autocast_on(input.device.type):
        return torch.float32
    return dtype


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta): never autocast
        return False


# --------------------------------------------------------------------------------- targets


def _class_dim(input: Tensor) -> int:
    return 0 if input.dim() == 1 else 1


def _shape_error(input: Tensor, target: Tensor, expected: tuple[int, ...]) -> None:
    """Raise the most helpful error for an index target whose shape is not ``expected``."""
    ishape, tshape = tuple(input.shape), tuple(target.shape)
    C = ishape[_class_dim(input)]
    shape_error = stock_class(TargetShapeError, _stock_builtin(input, target))
    head = (
        f"  input  (logits) shape {fmt_shape(ishape)}\n"
        f"  target (labels) shape {fmt_shape(tshape)}\n"
    )

    # Batch-size mismatch: same rank as expected but a different first dimension.
    if input.dim() >= 2 and target.dim() == len(expected) and target.dim() >= 1 and tshape[0] != ishape[0]:
        if tshape[1:] == expected[1:]:
            n_in, n_t = ishape[0], tshape[0]
            lines = [
                f"cross_entropy got {n_in} predictions but {n_t} targets.",
                f"  input  (logits) shape {fmt_shape(ishape)}: batch {n_in}, {C} classes",
                f"  target (labels) shape {fmt_shape(tshape)}: batch {n_t}",
            ]
            rest = tshape[1:]  # the positions of K-d logits: every shape below carries them
            if n_t == 0:
                lines.append(
                    "The target is empty: the labels were lost before the loss (an empty selection "
                    "such as labels[mask], a wrong dataset column or slice), or the batch was cut "
                    "to nothing on the label side only."
                )
                lines.append(f"Fix: pass the {n_in} labels of this batch, one per prediction "
                             f"(target shape {fmt_shape((n_in, *rest))})")
            elif n_in > n_t and n_in % n_t == 0:
                k = n_in // n_t
                # Only the ratio is known: which dimension was folded, the shapes do not say.
                lines.append(
                    f"The input batch is exactly {k}x the target batch ({n_in} = {k} x {n_t}). "
                    f"A guess from that ratio: a view/reshape inside the model folded {k} positions "
                    "of each sample (time steps, pixels, channel groups) into the batch dimension, "
                    "as x.view(-1, F) does when F is smaller than the per-sample size."
                )
                lines.append(
                    "Fix: flatten per sample with x.flatten(1) or x.view(x.size(0), -1) before the "
                    f"final layer; if the model really predicts {k} positions per sample, pass "
                    + (f"labels of shape ({n_t}, {k}) flattened with .reshape(-1)." if not rest else
                       f"labels of shape {fmt_shape((n_t, k, *rest))} flattened with .flatten(0, 1).")
                )
            elif n_in and n_t > n_in and n_t % n_in == 0:
                k = n_t // n_in
                lines.append(
                    f"The target batch is exactly {k}x the input batch ({n_t} = {k} x {n_in}). "
                    f"Possible causes (the shapes do not tell which): labels flattened from shape "
                    f"{fmt_shape((n_in, k, *rest))} (per-step or per-pixel labels), a model that "
                    f"reduced a dimension it should have kept, or a hard-coded batch size in the model "
                    f"(x.view({n_in}, -1)) that cut the batch."
                )
                # One prediction per label: the logits these labels need, whichever cause it is
                # (reshaping the given logits cannot make more rows).
                lines.append(
                    "Fix: keep one prediction per label: x.view(x.size(0), ...) instead of a fixed "
                    f"batch size; for {k} labels per sample, the model must predict {k} positions "
                    f"per sample too, logits of shape {fmt_shape((n_t, C, *rest))} (e.g. "
                    f"{fmt_shape((n_in, k, C, *rest))} flattened with .flatten(0, 1))."
                )
            else:
                hint = (
                    "The model's batch is larger, and not a multiple of the target batch. A likely "
                    f"cause (a guess): a hard-coded batch size inside the model (x.view({n_in}, -1)), "
                    "which breaks on the last, smaller batch of an epoch — the partial last batch "
                    "itself is normal and not an error."
                    if n_in > n_t else
                    "The target batch is larger: the labels may come from a different batch than "
                    "the inputs, or the model drops samples."
                )
                lines.append(hint)
                lines.append(
                    "Fix: derive shapes from the input (x.view(x.size(0), -1)), never from a fixed "
                    "batch size; do not use drop_last=True to hide this."
                )
            raise BatchSizeMismatchError("\n".join(lines))

    # (N, T, C) sequence logits or channels-last (N, H, W, C) images: classes in the last dim.
    if input.dim() >= 3 and tshape == ishape[:-1]:
        Cl = ishape[-1]
        if input.dim() == 3:
            what = f"sequence logits of shape (N, T, C) = {fmt_shape(ishape)} with {Cl} classes"
            fix = (
                "Fix: loss_fn(logits.transpose(1, 2), target)   # (N, C, T), no copy\n"
                f"  or: loss_fn(logits.reshape(-1, {Cl}), target.reshape(-1))"
            )
        else:
            perm = (0, input.dim() - 1) + tuple(range(1, input.dim() - 1))
            what = f"channels-last logits {fmt_shape(ishape)} with {Cl} classes in the last dimension"
            fix = (
                f"Fix: loss_fn(logits.permute{perm}, target)   # classes to dim 1, no copy\n"
                f"  or: loss_fn(logits.reshape(-1, {Cl}), target.reshape(-1))"
            )
        raise shape_error(
            f"cross_entropy expects classes in dim 1, but this looks like {what}.\n" + head
            + f"cross_entropy reads dim 1 as the classes, so it would see {ishape[1]} classes and "
            f"expect a target of shape {fmt_shape(expected)}. The logits need their class "
            "dimension moved to position 1.\n" + fix
        )

    # (N, C) one-hot / multi-hot integer target with a different class count.
    if input.dim() >= 2 and target.dim() == input.dim() and tshape[0] == ishape[0]:
        if target.dim() == 2:
            # What the columns hold tells one-hot/probability rows from per-position labels.
            binary = (not target.is_floating_point() and target.numel() > 0
                      and bool(((target == 0) | (target == 1)).all()))
            if target.is_floating_point() or binary:
                what = (
                    f"A 2-D target of this batch size is read as {'one-hot rows' if binary else 'probabilities'}"
                    f" and must match the input's shape; its {tshape[1]} columns disagree with the "
                    f"model's {C} outputs.\n"
                    "Fix: pass class indices of shape (N,), e.g. target.argmax(dim=1), and check that "
                    "the model's output size equals the number of classes"
                )
            else:
                what = (
                    f"The target holds integer labels other than 0/1 ({tshape[1]} per sample): labels "
                    f"per position (time steps, tokens) for logits with one prediction per sample; "
                    "the model lost (or pooled away) the position dimension.\n"
                    f"Fix: a model that predicts every position: logits of shape (N, C, {tshape[1]}) "
                    f"(classes in dim 1), or (N, {tshape[1]}, C) logits flattened with "
                    ".reshape(-1, C) together with target.reshape(-1)"
                )
            raise shape_error(
                f"cross_entropy got a 2-D target for 2-D logits, but with {tshape[1]} columns where "
                f"the model has {C} classes.\n" + head + what
            )

    # (N*T,) targets for (N, T, C) logits, or (N, T) targets for (N*T, C) logits.
    if input.dim() == 2 and target.dim() >= 2 and target.numel() == ishape[0]:
        raise shape_error(
            f"cross_entropy got {target.dim()}-D targets for 2-D logits.\n" + head
            + f"The target has one label per input row ({target.numel()}) but is not flat; the "
            "logits were probably flattened (reshape(-1, C)) and the labels were not.\n"
            "Fix: loss_fn(logits, target.reshape(-1))"
        )
    if input.dim() >= 3 and target.dim() == 1 and target.numel() > 0:
        flat_last = math.prod(ishape[:-1])
        if target.numel() in (flat_last, math.prod(expected)):
            Cl = ishape[-1]
            fix = (
                f"Fix: loss_fn(logits.reshape(-1, {Cl}), target)   # classes in the last dim"
                if target.numel() == flat_last else
                f"Fix: loss_fn(logits, target.reshape{fmt_shape(expected)})"
            )
            raise shape_error(
                f"cross_entropy got flat targets for {input.dim()}-D logits.\n" + head
                + f"For {input.dim()}-D logits the target must be {fmt_shape(expected)}; the labels "
                "were flattened but the logits were not.\n" + fix
            )

    if input.dim() == 1:
        # The fix follows from what the target holds: one label or one row of probabilities in
        # another shape (reshape it), or labels of several samples (a batch of logits is missing;
        # logits.unsqueeze(0) would give a batch of one, another mismatch).
        if target.numel() == 1 and not target.is_floating_point():
            fix = "Fix: loss_fn(logits, target.reshape(()))   # one sample, one class index"
        elif target.numel() == C and target.is_floating_point():
            fix = f"Fix: loss_fn(logits, target.reshape({C}))   # one sample's class probabilities"
        elif target.dim() == 1:
            n = tshape[0]
            fix = (f"{n} labels are {n} samples, whose logits were not passed (or were reduced to one "
                   "sample's, e.g. by indexing or a squeeze).\n"
                   f"Fix: pass the logits of all {n} samples, shape ({n}, {C}), or this sample's one "
                   "label as a 0-d class index")
        else:
            fix = (f"Fix: logits of shape (N, {C}) with class indices of shape (N,), or this sample's "
                   "one label as a 0-d class index")
        raise shape_error(
            f"cross_entropy got 1-D logits (one sample, {C} classes) and a target of shape "
            f"{fmt_shape(tshape)}.\n" + head
            + "For a single sample the target is a 0-d class index, e.g. torch.tensor(3).\n" + fix
        )
    raise shape_error(
        "cross_entropy cannot pair this target with these logits.\n" + head
        + f"For logits {fmt_shape(ishape)} (classes in dim 1, {C} classes) the target must hold "
        f"class indices of shape {fmt_shape(expected)}, or probabilities of the input's own shape.\n"
        f"Fix: reshape the target to {fmt_shape(expected)}, or check which dimension of the "
        "logits holds the classes"
    )


# Where a call may not read values (torch.compile, torch.func, make_fx / export, fake and meta
# tensors), a target stock rejects cannot be checked before it is converted: it is rejected as
# stock rejects it (a RuntimeError), with safeloss's message, instead of torch's own complaint
# about a data-dependent branch.
_NO_READ = ("inside a setting where safeloss cannot read tensor values (torch.compile, torch.func, "
            "make_fx / torch.export, fake or meta tensors)")


def _float_index_target(target: Tensor, input: Tensor, read_values: bool = True) -> tuple[Tensor, Finding]:
    """Float labels of index shape: fine when they hold whole numbers (convert), else an error."""
    if not read_values:
        raise TargetDtypeError(
            f"cross_entropy got class-index targets stored as {target.dtype} (shape "
            f"{fmt_shape(target.shape)}) {_NO_READ}, so it cannot check that they hold whole "
            "class numbers; stock torch rejects them (\"expected target dtype to be Long or "
            "Byte\").\nFix: convert the labels before the loss, once in the dataset or collate "
            "function: target.long()"
        )
    finite = torch.isfinite(target)
    whole = finite & (target == target.round())
    if not bool(whole.all()):
        bad_pos = (~whole).nonzero()
        vals = target[~whole]
        k = bad_pos.shape[0]
        shown = [f"{float(v):g} at {list(p)}" for v, p in zip(vals[:5].tolist(), bad_pos[:5].tolist())]
        raise TargetDtypeError(
            f"cross_entropy got float targets of shape {fmt_shape(target.shape)} that are not whole "
            f"class numbers: {plural(k, 'value')} with a fraction or NaN/inf: "
            f"{fmt_list(shown, total=k)}.\n"
            f"  input shape {fmt_shape(input.shape)}, target dtype {target.dtype}\n"
            "Targets of this shape are class indices; soft labels (probabilities) must have the "
            "input's shape, one probability per class.\n"
            "Fix: pass integer class indices (target.long() after checking the labels), or "
            "probabilities of shape " + fmt_shape(input.shape)
        )
    return target.long(), Finding(
        "float-index-target", TargetDtypeError,
        f"cross_entropy got class-index targets stored as {target.dtype} (shape "
        f"{fmt_shape(target.shape)}); they hold whole numbers, so default mode uses them as "
        "class indices (strict mode stops here). Stock torch rejects this (\"expected target dtype to be Long or Byte\").\n"
        "Fix: convert the labels once in the dataset or collate function: target.long()",
    )


def argmax_code(dtype: torch.dtype, cdim: int) -> str:
    """``target.argmax(dim=cdim)`` in a form that runs for a target of ``dtype``: argmax has no
    kernel for bool and uint16/32/64 (RuntimeError / NotImplementedError), so those go through
    ``.long()`` first; ``cdim`` is 0 for the (C,) one-hot of a single sample."""
    cast = ".long()" if dtype == torch.bool or dtype in _UNSIGNED_WIDE else ""
    return f"target{cast}.argmax(dim={cdim})"


def _onehot_target(target: Tensor, input: Tensor, cdim: int, weighted: bool = False,
                   read_values: bool = True) -> tuple[Tensor, Finding]:
    """An integer target with the input's shape: accept a true one-hot (convert to float)."""
    argmax = argmax_code(target.dtype, cdim)
    if not read_values:
        raise TargetDtypeError(
            f"cross_entropy got an integer target ({target.dtype}) with the input's shape "
            f"{fmt_shape(input.shape)} {_NO_READ}, so it cannot check that it is one-hot; stock "
            "torch rejects it (\"Expected floating point type for target with class "
            f"probabilities\").\nFix: class indices {argmax}, or probabilities "
            "target.float(), before the loss"
        )
    if target.dtype == torch.uint64:
        t = target.view(torch.int64)  # values >= 2**63 turn negative: not one-hot, never wrapped to 0/1
    elif target.dtype in (torch.bool, torch.uint16, torch.uint32):
        t = target.to(torch.int64)  # comparisons and sums on these have no CPU kernels
    else:
        t = target
    ok_vals = (t == 0) | (t == 1)
    sums = t.sum(cdim)
    rows_ok = sums == 1
    if not (bool(ok_vals.all()) and bool(rows_ok.all())):
        nbad_vals = int((~ok_vals).sum())
        bad_rows = (~rows_ok).nonzero()
        what = (
            f"{plural(nbad_vals, 'entry', 'entries')} other than 0/1"
            if nbad_vals else
            f"{plural(bad_rows.shape[0], 'row')} without exactly one 1 "
            f"(first at {fmt_list([str(list(p)) for p in bad_rows[:3].tolist()], total=bad_rows.shape[0])})"
        )
        # A row with no 1 at all has no class: argmax reads it as class 0, and dividing it by its
        # sum gives 0/0 = NaN. Such rows go first.
        empty = (sums == 0).nonzero() if t.dim() > 1 else sums.reshape(1)[sums.reshape(1) == 0]
        n_empty = empty.shape[0]
        drop = ""
        if n_empty:
            where = fmt_list([str(list(p)) for p in empty[:3].tolist()], total=n_empty) if t.dim() > 1 else "the one row"
            what += f"; {plural(n_empty, 'row')} with no 1 (at {where})"
            drop = (f"drop the rows with no class first (keep = target.sum(dim={cdim}) > 0; input[keep], "
                    "target[keep]), then ")
        raise TargetDtypeError(
            f"cross_entropy got an integer target with the input's shape {fmt_shape(input.shape)} "
            f"that is not one-hot: {what}.\n"
            f"  target dtype {target.dtype}\n"
            "A target of the input's shape means class probabilities, which must be floating "
            "point; a multi-hot (multi-label) target needs BCEWithLogitsLoss instead.\n"
            f"Fix: {drop}class indices {argmax}, or probabilities target.float() / "
            f"target.sum(dim={cdim}, keepdim=True), or torch.nn.BCEWithLogitsLoss for multi-label data"
        )
    return t.to(input.dtype), Finding(
        "integer-onehot", TargetDtypeError,
        f"cross_entropy got one-hot targets as {target.dtype} (shape {fmt_shape(target.shape)}); "
        "stock torch rejects them (\"Expected floating point type for target with class "
        "probabilities\"). Default mode uses them as probabilities (strict mode stops here), which "
        "gives the same loss as class indices"
        # The one difference, named only when this call has class weights.
        + (" except that the mean ignores class weights in its denominator" if weighted else "")
        + ".\n"
        f"Fix: pass class indices, {argmax} (faster, and what you most likely meant), "
        "or target.float() to keep torch's probability semantics",
    )


def _index_target(
    target: Tensor, input: Tensor, ignore_index: int, read_values: bool = True,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, list[Finding]]:
    # The common case first: int64 labels (N,) for logits (N, C), where nothing below applies;
    # checked in 1/3 of the time the general path takes to get there (~1 us).
    if target.dtype == torch.int64 and input.dim() == 2 and target.shape == (input.shape[0],):
        return target, []
    findings: list[Finding] = []
    cdim = _class_dim(input)
    ishape = tuple(input.shape)
    expected = ishape[:cdim] + ishape[cdim + 1:]

    if target.dtype == torch.bool:
        raise stock_class(TargetDtypeError, _stock_builtin(input, target))(
            f"cross_entropy got boolean targets (shape {fmt_shape(target.shape)}).\n"
            f"  input shape {fmt_shape(ishape)}: {ishape[cdim]} classes\n"
            "Class-index targets must be integers; True/False labels belong to a binary problem.\n"
            "Fix: target.long() with 2 model outputs, or torch.nn.BCEWithLogitsLoss with one "
            "output and target.float()"
        )
    if target.is_complex():
        raise stock_class(TargetDtypeError, _stock_builtin(input, target))(
            f"cross_entropy got complex targets (dtype {target.dtype}); targets must be integer "
            "class indices or real probabilities.\nFix: pass target.real.long() or probabilities"
        )

    tshape = tuple(target.shape)
    if tshape != expected:
        # (N, 1) or (N, 1, d1..dK): a singleton label column; squeeze it.
        if (
            target.dim() == len(expected) + 1 and target.dim() >= 2 and tshape[1] == 1
            and tshape[:1] + tshape[2:] == expected
        ):
            findings.append(Finding(
                "squeezed-target", TargetShapeError,
                f"cross_entropy got targets of shape {fmt_shape(tshape)} for logits "
                f"{fmt_shape(ishape)}; default mode squeezes the singleton dimension to "
                f"{fmt_shape(expected)} (strict mode stops here). Stock torch raises "
                f"\"{_stock_squeeze_error(ishape, tshape)}\".\n"
                # squeeze(1), never view(-1): that would flatten a (N, 1, H, W) mask to N*H*W.
                "Fix: target.squeeze(1), usually in the dataset's __getitem__ or the collate "
                "function",
            ))
            target = target.squeeze(1)
        elif input.dim() == 1 and tshape == (1,):
            if label_smoothing > 0.0:
                raise TargetShapeError(
                    f"cross_entropy got a target of shape (1,) for unbatched logits of shape "
                    f"{fmt_shape(ishape)} with label_smoothing={label_smoothing}; stock torch "
                    "takes it as the 0-d target () only without smoothing (with smoothing: \"output "
                    "with shape [] doesn't match the broadcast shape [1]\").\n"
                    "Fix: target.reshape(()) (e.g. labels[i] instead of labels[i:i + 1]), or "
                    "logits.unsqueeze(0) for a batch of one"
                )
            target = target.reshape(())  # stock accepts a (1,) target for (C,) logits: same result
        else:
            _shape_error(input, target, expected)

    if target.is_floating_point():
        target, finding = _float_index_target(target, input, read_values)
        findings.append(finding)
    elif target.dtype in _UNSIGNED_WIDE:
        target = _unsigned_index_target(target, input, ignore_index, read_values)
    if not target.is_floating_point() and not _fits(ignore_index, target.dtype):
        # A comparison with ignore_index would wrap it into the target's dtype (-100 as uint8 is
        # 156, a real class; 2**40 as int32 is 0); widen once so every check compares true values.
        target = target.to(torch.int32 if _fits(ignore_index, torch.int32) else torch.int64)
    return target, findings


def _stock_squeeze_error(ishape: tuple[int, ...], tshape: tuple[int, ...]) -> str:
    """Stock torch's error text for a target with an extra singleton dim 1: it depends on which
    of its kernels the shape reaches (nll_loss, nll_loss2d for 4-D logits, or the K-d reshape)."""
    if len(ishape) == 2:
        return "0D or 1D target tensor expected, multi-target not supported"
    if len(ishape) == 4:
        return ("only batches of spatial targets supported (3D tensors) but got targets of "
                f"dimension: {len(tshape)}")
    expected = [ishape[0], *ishape[2:]]
    return f"Expected target size {list(expected)}, got {list(tshape)}"


def _unsigned_index_target(target: Tensor, input: Tensor, ignore_index: int, read_values: bool) -> Tensor:
    """uint16/32/64 labels as a signed dtype torch has kernels for, never wrapping a value."""
    if target.dtype == torch.uint16:
        return target.to(torch.int32)
    if target.dtype == torch.uint32:
        return target.to(torch.int64)
    t = target.view(torch.int64)  # free; values >= 2**63 turn negative here
    if not read_values:
        # Traced code cannot read the labels: map those values to one that is never ignore_index
        # and always out of range, so they are reported as bad labels, never skipped.
        sentinel = _INT64_MIN if ignore_index != _INT64_MIN else _INT64_MIN + 1
        return torch.where(t < 0, sentinel, t)
    huge = t < 0
    if bool(huge.any()):  # a read only for uint64 labels, which stock torch rejects anyway
        C = input.shape[_class_dim(input)]
        idx = huge.nonzero()
        k = idx.shape[0]
        vals = target[huge][:5].tolist()
        where = [str(list(p)) if target.dim() else "the single target" for p in idx[:5].tolist()]
        shown = [f"{v} at {w}" for v, w in zip(vals, where)]
        v0 = vals[0]
        raise TargetOutOfRangeError(
            f"{k} of {plural(target.numel(), 'target')} {'is' if k == 1 else 'are'} outside the "
            f"class range 0..{C - 1} ({plural(C, 'class', 'classes')}): uint64 labels of 2**63 "
            "or more.\n"
            f"  bad values: {fmt_list(shown, total=k)}\n"
            f"  target shape {fmt_shape(target.shape)}, dtype torch.uint64, ignore_index={ignore_index}\n"
            f"{v0} is 2**64 - {2**64 - v0}: what the label {v0 - 2**64} becomes when it is stored "
            "as uint64. Unsigned labels are never negative, so it is not compared with "
            "ignore_index as a negative number.\n"
            "Fix: store the labels as int64; target.to(torch.int64) turns these values back into "
            f"{v0 - 2**64}" + (
                f", which ignore_index={ignore_index} then skips" if ignore_index == v0 - 2**64
                else f" (pass ignore_index={v0 - 2**64} if it marks unlabeled positions)"
            )
        )
    return t


def _target_type_error(target: object) -> None:
    raise ArgumentTypeError(
        f"cross_entropy expects the target to be a torch.Tensor, got {type(target).__name__}.\n"
        "Fix: torch.as_tensor(labels, device=logits.device)"
    )


def int_index(value: object) -> int | None:
    """``value`` as an int the way stock's argument parser reads an int argument (Python and
    NumPy integers, 0-d integer tensors), or None where it refuses one: a bool, a bool or meta
    tensor, anything without ``__index__``. Its range is not checked (``fits_int64``)."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and (value.dtype == torch.bool or value.is_meta)):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def fits_int64(value: int) -> bool:
    return _INT64_MIN <= value < 2**63


def _index_value(ignore_index: object) -> int:
    """An int-like ``ignore_index`` as an int (numpy integers, 0-d integer tensors, as torch)."""
    reject_bool_tensor_index(ignore_index)
    ii = int_index(ignore_index)
    if ii is None:
        raise ArgumentTypeError(
            f"ignore_index must be an int, got {ignore_index!r}.\nFix: ignore_index=-100 (the "
            "default) or the label value to skip, e.g. ignore_index=255 for segmentation masks"
        )
    return ii


def argument_types(input: object, target: object, weight: object, ignore_index: object,
                   label_smoothing: object) -> None:
    """Stock's argument parser rejects an argument of the wrong type (a TypeError), then an
    ``ignore_index`` outside int64 (a ValueError), before any check of values: the same order
    here (each with the message the later check gives), so that a call with two mistakes, say
    ``label_smoothing=1.5`` and a list as ``weight``, raises stock's class. Cold path only."""
    if not isinstance(input, Tensor):
        _check_input(input, target)
    if not isinstance(target, Tensor):
        _target_type_error(target)
    if weight is not None and not isinstance(weight, Tensor):
        _check_weight(weight, input, 0)  # type: ignore[arg-type]
    ii = ignore_index if type(ignore_index) is int else _index_value(ignore_index)
    if type(label_smoothing) is not float:
        _smoothing_type(label_smoothing)
    check_ignore_index_range(ii)


def normalize(
    input: object,
    target: object,
    weight: object,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    read_values: bool = True,
) -> Problem:
    """Check shapes, dtypes and devices; convert the targets stock torch would reject but meant.

    ``reduction`` and ``label_smoothing`` must already be checked (``check_reduction`` etc.).
    ``read_values=False`` skips the one check that reads data on the happy path (negative
    ``weight`` entries), for tracing under torch.compile.
    """
    if not isinstance(target, Tensor):  # stock's argument parser checks types first
        _target_type_error(target)
    if type(ignore_index) is not int:
        ignore_index = _index_value(ignore_index)
    if not _INT64_MIN <= ignore_index < 2**63:
        check_ignore_index_range(ignore_index)
    x = _check_input(input, target)
    _check_devices(x, target, weight if isinstance(weight, Tensor) else None)
    cdim = _class_dim(x)
    C = x.shape[cdim]
    findings: list[Finding] = []

    # dim() first: index targets, the common case, differ there, in half the time of a shape test.
    if (target.dim() == x.dim() and target.shape == x.shape
            and (target.is_floating_point() or C > 1 or x.dim() == 1)):
        given_dtype = target.dtype
        if not target.is_floating_point():
            if target.is_complex():
                raise TargetDtypeError(
                    f"cross_entropy got complex targets (dtype {target.dtype}); probabilities "
                    "must be real.\nFix: pass target.real"
                )
            target, finding = _onehot_target(target, x, cdim, weighted=weight is not None,
                                             read_values=read_values)
            findings.append(finding)
        if ignore_index >= 0:
            raise IgnoreIndexError(
                f"ignore_index={ignore_index} cannot be used with probability targets (the target "
                f"has the input's shape {fmt_shape(x.shape)}, so each entry is a class "
                "probability, not a label that could be skipped).\n"
                "Fix: drop ignore_index; to skip rows, leave them out (input[keep], "
                f"target[keep]), or pass class indices ({argmax_code(given_dtype, cdim)} for one-hot "
                "rows) and keep ignore_index"
            )
        prob = True
        out_dtype = torch.promote_types(_autocast_dtype(x.dtype, x), _autocast_dtype(target.dtype, x))
    else:
        target, more = _index_target(target, x, ignore_index, read_values, label_smoothing)
        findings += more
        if C == 0 and x.dim() != 4 and x.dim() >= 3 and target.numel():
            _kd_no_classes(x)
        prob = False
        out_dtype = _autocast_dtype(x.dtype, x)

    if isinstance(weight, Tensor) and weight.dim() != 1 and weight.numel() == C and max(weight.shape) == C:
        # (1, C) or (C, 1): stock accepts these for K-d logits (it checks only the element count)
        # and they mean the same for every input. (A new view per call: off the CPU, its negative
        # entries are read every call; 1-D weights are read once per version.)
        weight = weight.reshape(C)
    # Stock torch's dtype rules (under torch.autocast in the float32 it casts to): class indices
    # need the weight in the logits' dtype (cast here, with a finding); probability targets
    # promote logits, target and weight together.
    w, more = _check_weight(weight, x, C, read_values, out_dtype, prob)
    if prob and w is not None:
        out_dtype = torch.promote_types(out_dtype, _autocast_dtype(w.dtype, x))
    if w is not None and w.requires_grad and not prob and torch.is_grad_enabled():
        raise WeightError(
            f"weight requires grad, but cross_entropy with class-index targets is not "
            f"differentiable with respect to the class weights (stock torch: "
            f"{weight_grad_quote(x.dim())}).\n  weight shape {fmt_shape(w.shape)}, "
            f"target shape {fmt_shape(target.shape)}\n"
            "Fix: pass weight.detach() (class weights are usually constants), or use probability "
            "targets, for which the gradient with respect to the weights exists"
        )
    findings += more

    # Labels other than 0 with one output: the out-of-range error that follows says it all (one
    # message, one fix). Known without a host sync on CPU only; elsewhere both come, same fix.
    if C == 1 and not (
        read_values and not prob and target.device.type == "cpu"
        and bool(((target != 0) & (target != ignore_index)).any())
    ):
        findings.append(Finding(
            "single-class", InputError,
            f"cross_entropy got logits with a single class (input shape {fmt_shape(x.shape)}): "
            "softmax over one class is always 1, so the loss is always 0 and nothing is learned.\n"
            "This is usually a binary problem set up with one output.\n"
            "Fix: torch.nn.BCEWithLogitsLoss with one output and target.float(), or give the "
            "model 2 outputs and keep CrossEntropyLoss",
        ))
    # Positional, in field order: ten keyword arguments double the cost of this line (~1 us).
    return Problem(x, target, prob, w, ignore_index, label_smoothing, reduction, C, out_dtype, findings)

"""``safeloss.linear_cross_entropy`` and ``safeloss.SafeLinearCrossEntropyLoss``.

One call, layer by layer, as for cross-entropy: the entry asks ``core.mode.decide`` once which
setting the call runs in and branches on the answer (nothing below tests for a tool again) ->
validate (the layer here, the target and weight through the shared ``normalize``) -> choose the
tile backend -> the chunk loop's per-position losses (``chunked``; in graphs, the custom ops of
``graph``) -> the shared ``core.reduction`` -> the shared checks and reporting.

Per mode (see ``core.mode.TABLE`` and docs/compatibility.md):

* eager: every check; CPU and strict mode report in the call, CUDA defers (no host sync).
* CUDA-graph capture, torch.func transforms: no host reads; bad labels give a NaN loss (on the CPU
  a transform raises for them, as stock's kernel does there); forward-mode AD and a class weight
  that requires grad take the plain differentiable chunk ops (reference-path memory).
* torch.compile, make_fx / export, fake tensors: the chunk loop is one custom op (symbolic batch
  size, a replayable graph), value checks are computed in the graph and reported when it runs.
* sparse input / linear_weight / probability targets: made dense (stock accepts them), others a
  LayoutError; torch.fx: one graph node; jit.trace, ONNX, meta tensors, DTensor: stock's
  reference path (linear, then cross-entropy) after the shape checks.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

import torch
from torch import _C, Tensor

from ..backends import dispatch
from ..backends.torch_backend import _stock_cross_entropy
from ..core import _flags as F
from ..core import checks, compiled, reduction
from ..core import extras as X
from ..core import plan as plans
from ..core._traceback import trim
from ..core.checks import Scan, bad_target_mask, prob_target_counts, scan_prob_target, target_bounds
from ..core.config import LazyStrict
from ..core.errors import (
    LabelSmoothingError,
    SafeLossError,
    TargetOutOfRangeError,
    fmt_list,
    stock_class,
)
from ..core.mode import Mode, decide, under_vmap
from ..core.report import Finding, _user_frame, report, watch
from ..core.rows import Rows
from ..core.tools import densify_result, fx_proxy, paused_tracer
from ..core.validation import REDUCTIONS, _negative_classes, check_label_smoothing, check_reduction
from . import chunked, graph
from . import extras as linear_extras
from .validation import (
    LinearProblem,
    autocast_enabled,
    check_layouts,
    check_options,
    named,
    nonfinite_finding,
    reworded,
    stock_first,
    tile_plan,
    validate,
)

_OP = "linear_cross_entropy"


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options: Any = None,
    strict: bool | None = None,
    backend: str = "auto",
    softcap: float | None = None,
    temperature: float = 1.0,
    z_loss: float = 0.0,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, X.LossStats]:
    """Drop-in for :func:`torch.nn.functional.linear_cross_entropy`, checked, never holding the logits.

    ``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)`` with stock torch's
    values and gradients, computed in chunks of rows so that the ``(N, C)`` logits never exist,
    whatever ``options`` says. ``options=None`` gives stock's reference-path numbers (in half
    precision each logits tile is rounded to the input dtype, as stock's ``linear`` rounds the
    logits); a ``torch.nn.LinearCrossEntropyOptions`` is honoured as stock's chunked path defines
    it: its ``acc_policy`` / ``acc_dtype`` decide whether the logits keep float32 ("accurate") or
    the input dtype, ``batch_chunk_size`` caps the rows of a chunk. Accumulation is float32 in
    every case. The gradients are computed in the forward's chunk loop; backward only scales them.

    Args:
        strict: turn every warning into an error; ``None`` follows ``safeloss.strict_mode()``.
        backend: ``"auto"`` (the Triton kernel for each chunk's tile on CUDA), ``"torch"`` or
            ``"triton"``. The matmuls are torch's (cuBLAS on CUDA) on every backend.
        softcap, temperature, z_loss, return_stats: the LLM and RL extras, as in
            :func:`safeloss.cross_entropy` (the logits still never exist; the tiles run torch
            ops on every backend, and backward recomputes them).
    """
    key = None
    if (not _is_compiling() and options is None and softcap is None and return_stats is False
            and ((temperature is _T1 and z_loss is _Z0) or X.defaults(None, temperature, z_loss, False))):
        # An eager call of a signature seen before (core.plan): see _fast.
        key = _fast(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                    label_smoothing, backend)
        if isinstance(key, Tensor):
            return key
    mode = decide(input, linear_weight, target, linear_bias, weight)
    plain = X.defaults(softcap, temperature, z_loss, return_stats)
    if mode is Mode.FX:  # torch.fx.symbolic_trace: one node that calls this function when it runs
        kwargs: dict[str, Any] = dict(
            linear_bias=linear_bias, weight=weight, reduction=reduction, ignore_index=ignore_index,
            label_smoothing=label_smoothing, options=options)
        if not plain:
            kwargs.update(softcap=softcap, temperature=temperature, z_loss=z_loss,
                          return_stats=return_stats)
        return _fx_call(input, linear_weight, target, kwargs, strict, backend)
    if not plain:  # the LLM and RL extras: their own path (safeloss/linear/extras.py)
        return linear_extras.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight,
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
            options=options, strict=strict, backend=backend, softcap=softcap,
            temperature=temperature, z_loss=z_loss, return_stats=return_stats)
    try:
        check_options(options)
        return run(
            mode, input, linear_weight, target, linear_bias, weight, check_reduction(reduction, "linear_cross_entropy"),
            ignore_index, check_label_smoothing(label_smoothing), strict=strict,
            backend=dispatch.check_backend(backend), owner=None, options=options,
            key=key if mode is Mode.EAGER else None,
        )
    except SafeLossError as e:  # the traceback ends at the caller's line (core._traceback)
        first = stock_first(e, input, linear_weight, target, linear_bias, weight, reduction,
                            ignore_index, label_smoothing)  # stock's order of checks
        trim(first)
        if first is e:
            raise
        raise first from None


_is_compiling = torch.compiler.is_compiling
# The entry's own default objects (as in safeloss.ce.functional): told by identity, no call.
_T1, _Z0 = linear_cross_entropy.__kwdefaults__["temperature"], linear_cross_entropy.__kwdefaults__["z_loss"]
_DEFAULT_OPTIONS = tuple(linear_cross_entropy.__kwdefaults__[k] for k in (
    "reduction", "ignore_index", "label_smoothing", "backend"))
_DEFAULTS = ("default options",)


def _fx_call(input: Any, linear_weight: Any, target: Any, kwargs: dict[str, Any],
             strict: bool | None, backend: str) -> Any:
    """One call_function node of this function, as stock's ``__torch_function__`` records one of
    ``F.linear_cross_entropy``: the traced graph calls safeloss, with every check, when it runs."""
    proxy = fx_proxy(input, linear_weight, target, kwargs["linear_bias"], kwargs["weight"])
    if strict is not None:
        kwargs["strict"] = strict
    if backend != "auto":
        kwargs["backend"] = backend
    return proxy.tracer.create_proxy(  # type: ignore[union-attr]
        "call_function", linear_cross_entropy, (input, linear_weight, target), kwargs)


class _NoStockModule(torch.nn.Module):
    """Stand-in base on a torch without ``nn.LinearCrossEntropyLoss`` (before 2.13)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"SafeLinearCrossEntropyLoss needs torch >= 2.13 (torch.nn.LinearCrossEntropyLoss); "
            f"this is torch {torch.__version__}.\nFix: pip install 'torch>=2.13', or "
            "safeloss.linear_cross_entropy, which runs on any supported torch"
        )


_Base: Any = getattr(torch.nn, "LinearCrossEntropyLoss", _NoStockModule)


class SafeLinearCrossEntropyLoss(_Base):  # type: ignore[misc,valid-type]
    """Drop-in for :class:`torch.nn.LinearCrossEntropyLoss`: the same constructor, parameters and
    ``state_dict`` (interchangeable with the stock module's), plus ``strict``, ``backend`` and the
    extras (``softcap``, ``temperature``, ``z_loss``, ``return_stats``) as in
    :func:`safeloss.linear_cross_entropy`. An invalid ``reduction``, ``label_smoothing``,
    ``options`` or extra fails at construction."""

    # Class-level defaults: an instance pickled before these options existed still loads and runs.
    # Unannotated, as in SafeCrossEntropyLoss (TorchScript reads class annotations).
    softcap = None
    temperature = 1.0
    z_loss = 0.0
    return_stats = False

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options: Any = None,
        strict: bool | None = None,
        backend: str = "auto",
        softcap: float | None = None,
        temperature: float = 1.0,
        z_loss: float = 0.0,
        return_stats: bool = False,
    ) -> None:
        X.check(softcap, temperature, z_loss, return_stats, op="SafeLinearCrossEntropyLoss")
        try:
            check_label_smoothing(label_smoothing)
        except LabelSmoothingError as e:  # stock's text too: code that matches on it keeps working
            raise LabelSmoothingError(
                f"{e}\n(stock torch: expected label_smoothing to be in range [0, 1], got "
                f"{label_smoothing})") from None
        check_reduction(reduction, "SafeLinearCrossEntropyLoss")
        check_options(options)
        super().__init__(
            in_features, num_classes, out_features=out_features, bias=bias, device=device,
            dtype=dtype, reduction=reduction, weight=weight, ignore_index=ignore_index,
            label_smoothing=label_smoothing, options=options,
        )
        self.strict = strict
        self.backend = dispatch.check_backend(backend)
        self.softcap, self.temperature, self.z_loss = softcap, temperature, z_loss
        self.return_stats = return_stats
        watch(self)  # its warn-once state dies with it, compiled calls' included

    def __setstate__(self, state: dict) -> None:  # unpickled or deep-copied: a new instance
        super().__setstate__(state)
        watch(self)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if not X.defaults(self.softcap, self.temperature, self.z_loss, self.return_stats):
            return linear_extras.module_forward(self, input, target)  # type: ignore[return-value]
        return module_forward(self, input, target, self.strict, dispatch.check_backend(self.backend))

    def extra_repr(self) -> str:
        extra = [f"strict={self.strict}"] if self.strict is not None else []
        if self.backend != "auto":
            extra.append(f"backend={self.backend!r}")
        for name, default in (("softcap", None), ("temperature", 1.0), ("z_loss", 0.0),
                              ("return_stats", False)):
            if getattr(self, name) != default:
                extra.append(f"{name}={getattr(self, name)!r}")
        return ", ".join([super().extra_repr(), *extra])


_NO_BUFFER: Any = object()  # a module whose class weight is not a buffer


def module_forward(m: Any, input: Tensor, target: Tensor,
                   strict: bool | None, backend: str) -> Tensor:
    """The stock module's forward (its flat Linear reshaped to (C, *out_features, H)), through
    safeloss: the entry of the module and of the stock module under ``patch()``."""
    lin = m._modules["linear"]
    # The tensors as stored (a plain read: under torch.fx, attribute access records graph nodes).
    lw, lb, cw = lin._parameters.get("weight"), lin._parameters.get("bias"), m._buffers.get("weight", _NO_BUFFER)
    if cw is _NO_BUFFER:  # the class weight reassigned as a Parameter (nn.Module moves it there)
        cw = m._parameters.get("weight")
    key = None
    if not m.out_features and m.options is None and not _is_compiling():
        # A plain head (its weight is (C, H) as stored): see _fast.
        key = _fast(input, lw, target, lb, cw, m.reduction, m.ignore_index, m.label_smoothing,
                    backend)
        if isinstance(key, Tensor):
            return key
    mode = decide(input, lw, target, lb, cw)
    if mode is Mode.FX:
        return _fx_module(m, input, target, strict, backend)
    try:
        w = lin.weight.reshape((m.num_classes, *m.out_features, lin.in_features))
        b = None if lin.bias is None else lin.bias.reshape((m.num_classes, *m.out_features))
        check_options(m.options)
        return run(
            mode, input, w, target, b, m.weight, check_reduction(m.reduction, "SafeLinearCrossEntropyLoss"), m.ignore_index,
            check_label_smoothing(m.label_smoothing), strict=strict, backend=backend, owner=m,
            options=m.options, key=key if mode is Mode.EAGER else None,
        )
    except SafeLossError as e:
        first = stock_first(e, input, w, target, b, m.weight, m.reduction, m.ignore_index, m.label_smoothing,
                            "SafeLinearCrossEntropyLoss")
        trim(first)
        if first is e:
            raise
        raise first from None


def _fx_module(m: Any, input: Any, target: Any, strict: bool | None, backend: str) -> Any:
    """torch.fx: the loss module as a leaf (one call_module node), as torch.fx records stock
    ``nn.LinearCrossEntropyLoss``; the root of the trace (or a module the root does not hold)
    becomes one call of the functional form on the module's own parameters."""
    proxy = fx_proxy(input, target)
    tracer = proxy.tracer  # type: ignore[union-attr]
    if getattr(tracer, "root", None) is not m:
        try:
            path = tracer.path_of_module(m)
        except NameError:
            path = ""
        if path:
            return tracer.create_proxy("call_module", path, (input, target), {})
    lin = m.linear
    w = lin.weight.reshape((m.num_classes, *m.out_features, lin.in_features))
    b = None if lin.bias is None else lin.bias.reshape((m.num_classes, *m.out_features))
    return _fx_call(input, w, target, dict(
        linear_bias=b, weight=m.weight, reduction=m.reduction, ignore_index=m.ignore_index,
        label_smoothing=m.label_smoothing, options=m.options), strict, backend)


# ------------------------------------------------------------------------------ the pipeline


def run(
    mode: Mode, input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None,
    weight: Tensor | None, reduction_: str, ignore_index: int | None, label_smoothing: float,
    *, strict: bool | None, backend: str, owner: object | None, options: object = None,
    key: tuple[object, ...] | None = None,
) -> Tensor:
    """One call in ``mode`` (from ``core.mode.decide``; torch.fx is handled by the entries).
    ``key``: the call's signature (eager calls, from ``_fast``), under which a clean call that
    the planned path can take stores its plan."""
    args = (input, linear_weight, target, linear_bias, weight, reduction_, ignore_index,
            label_smoothing)
    if mode is Mode.EAGER or mode is Mode.CAPTURE or mode is Mode.TRANSFORM:
        return _dense(mode, *args, strict=strict, backend=backend, owner=owner, options=options,
                      plan_key=key)
    if mode is Mode.COMPILE or mode is Mode.GRAPH:
        return _graph(*args, strict=strict, backend=backend, owner=owner, options=options)
    return _in_tool(mode, *args, strict=strict, backend=backend, owner=owner, options=options)


# ------------------------------------------------------------------------ planned calls
#
# A small plain head on the CPU: when the whole batch is one chunk and its logits take no more
# memory than what the chunk loop keeps from forward to backward (d/dinput and d/dweight,
# (N + C) * H values), the chunk loop's own path (two tiles, then three matmuls, eagerly, plus
# the bookkeeping of its autograd functions) costs several times stock's whole call at small
# shapes, for nothing. A repeated clean call of such a signature runs stock's reference path
# itself (linear, then cross-entropy: stock's values and gradients by construction, autograd
# saving what stock saves) with the CPU's value checks around it; any finding sends the call
# back to the full path, which computes it again and reports exactly as without a plan.


class _Plan:
    """A planned signature of linear + cross-entropy (``core.plan``): stock's op's arguments."""

    __slots__ = ("args", "logits_bytes", "prob", "scalar")

    def __init__(self, lp: LinearProblem) -> None:
        p = lp.p
        self.prob = p.prob
        self.scalar = p.reduction != "none"
        self.args = (_REDUCTION_ENUM[p.reduction], p.ignore_index, p.label_smoothing)
        # What the planned call holds (the whole logits): re-checked against the budget per call.
        self.logits_bytes = lp.x.shape[0] * lp.num_classes * lp.x.element_size()


_REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}
_PLAIN = (Tensor, torch.nn.Parameter)
_linear = torch._C._nn.linear
_ce_loss = torch._C._nn.cross_entropy_loss
_saved_hooks = torch._C._autograd._top_saved_tensors_default_hooks


def _plannable(lp: LinearProblem, x: Tensor, w: Tensor, t: Tensor, b: Tensor | None,
               weight: Tensor | None, options: object) -> bool:
    """A clean eager signature the planned path computes as the full path would: plain CPU
    float32/float64 tensors the checks passed through unchanged, a plain batched head, no
    options or autocast, two classes or more, and a batch small enough (see above)."""
    N, H = x.shape[0] if x.dim() == 2 else 0, x.shape[-1]
    C = lp.num_classes
    return (
        options is None and lp.batched and not lp.out_features and C > 1 and N > 0
        and x.is_cpu and x.dtype in (torch.float32, torch.float64) and lp.compute_dtype == x.dtype
        and lp.x is x and lp.w is w and lp.b is b and lp.target is t and lp.p.weight is weight
        and all(type(v) in _PLAIN for v in (x, w, t, b, weight) if v is not None)
        and not _hooked()
        and N * C <= (N + C) * H and N * C * x.element_size() <= chunked.BUDGET_BYTES["cpu"]
    )


def _hooked() -> bool:
    """A chunk-loop test hook is set: such calls must run the loop itself (read per call, also by
    a planned call: a hook set after a signature was planned must still reach the loop)."""
    return (chunked.FORCE_ROWS is not None or chunked.FORCE_VOCAB_TILE is not None
            or chunked.HALF_OPERANDS_ON_CPU)


def _fast(
    x: Tensor, w: Tensor, t: Tensor, b: Tensor | None, weight: Tensor | None, reduction: object,
    ignore_index: object, label_smoothing: object, backend: object,
) -> Tensor | tuple[object, ...] | None:
    """A whole eager call of a planned signature: the result; else, before anything the caller
    can see happened, the call's signature (its plan key) or None (not eager, not plannable),
    as ``safeloss.ce.pipeline.fast``. The entries call it outside torch.compile, with the
    default extras and no ``options``."""
    if (type(x) not in _PLAIN or type(w) not in _PLAIN or type(t) not in _PLAIN
            or (b is not None and type(b) not in _PLAIN) or (weight is not None and type(weight) not in _PLAIN)):
        return None  # first: reading a Proxy's attributes would record nodes in an fx graph
    if (_C._is_tracing() or _C._len_torch_dispatch_stack() or _C._are_functorch_transforms_active()
            or _saved_hooks(False) is not None):
        # Saved-tensor hooks (non-reentrant checkpoint, save_on_cpu): the planned call saves
        # other tensors than the chunk loop, and checkpoint's recompute must save what its
        # forward saved (a first call plans, its recompute would take the plan): the full path.
        return None
    try:
        key = (
            # (devices as in safeloss.ce.pipeline.fast: True for the CPU)
            "linear", x.shape, x.layout, x.dtype, x.is_cpu or x.device,
            w.shape, w.layout, w.dtype, w.is_cpu or w.device, t.shape, t.layout, t.dtype, t.is_cpu or t.device,
            None if b is None else (b.shape, b.layout, b.dtype, b.is_cpu or b.device),
            None if weight is None else (weight.shape, weight.layout, weight.dtype, weight.is_cpu or weight.device,
                                         weight.requires_grad and _C.is_grad_enabled()),
            # The default options as objects stand for themselves (no type calls, no tuple).
            _DEFAULTS if (reduction is _DEFAULT_OPTIONS[0] and ignore_index is _DEFAULT_OPTIONS[1]
                          and label_smoothing is _DEFAULT_OPTIONS[2] and backend is _DEFAULT_OPTIONS[3])
            else (reduction, ignore_index, type(ignore_index), label_smoothing, type(label_smoothing), backend),
            # Autocast for these tensors' device (one on for another device changes nothing
            # here; the CPU's own changes the compute dtype, which no plan is made for).
            _C._is_any_autocast_enabled() and plans.autocast_key(x.device.type),
            _C._is_torch_function_mode_enabled(),
        )
        plan = plans._plans.get(key)
    except (AttributeError, RuntimeError, TypeError):  # no sizes (nested), unhashable options
        return None
    if plan is None:
        return key if reduction in REDUCTIONS else None  # a deprecated name warns per call: no plan
    if checks._pending or checks.DEFER_ON_CPU:
        return key  # earlier findings to report first / the deferred model: the full path
    if (chunked.FORCE_ROWS is not None or chunked.FORCE_VOCAB_TILE is not None  # as _hooked()
            or chunked.HALF_OPERANDS_ON_CPU or plan.logits_bytes > chunked.BUDGET_BYTES["cpu"]):
        return key  # the chunk loop's hooks, or a budget lowered since the plan was stored
    if weight is not None and _negative_classes(weight):
        return key  # a finding of the argument checks, read per call
    try:
        out = _ce_loss(_linear(x, w, b), t, weight, *plan.args)
    except (IndexError, RuntimeError):  # a label out of range: the full path says so
        return key
    if plan.prob and any(scan_prob_target(t, 1)):
        return key
    if plan.scalar:
        if not math.isfinite(out.item()):
            return key
    elif not bool(torch.isfinite(out).all()):
        return key
    return out


def _forward_ad(*vs: object) -> bool:
    """Dual tensors of torch.autograd.forward_ad: the chunk loop's autograd.Function has no
    forward-mode rule, the plain chunked ops have. (Eager tensors: a flag, then a C call each.)"""
    from torch.autograd import forward_ad

    if forward_ad._current_level < 0:
        return False
    return any(isinstance(v, Tensor) and forward_ad.unpack_dual(v).tangent is not None for v in vs)


def _selective_checkpoint() -> bool:
    """Selective activation checkpointing's dispatch modes are active
    (``create_selective_checkpoint_contexts``): they cache the outputs of the ops a policy saves,
    matmuls among them, and the chunk loop scales its matmuls' outputs in place ("Tensor cached
    during selective activation checkpoint has been mutated"). Other dispatch modes (memory and
    flop counters) keep the chunk loop, whose memory they measure. (Eager tensors: a C call.)"""
    if not _C._len_torch_dispatch_stack():
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any(type(m).__name__ in ("_CachingTorchDispatchMode", "_CachedTorchDispatchMode")
               and type(m).__module__ == "torch.utils.checkpoint" for m in _get_current_dispatch_mode_stack())


def _stock_options_warning(options: object, lp: LinearProblem, target: Tensor) -> None:
    """Stock's own warning when ``options`` cannot take its chunked path, same text and
    condition: code (and tests) that watch for it keep seeing it."""
    if options is None:
        return
    eps = lp.p.label_smoothing
    if lp.out_features or eps != 0.0 or target.dtype != torch.int64 or torch.jit.is_tracing():
        b = lp.b
        bias_shape = None if b is None else (lp.num_classes, *lp.out_features)
        warnings.warn(
            "linear_cross_entropy: ``options`` ignored; chunked path needs "
            "reduction in {'mean','sum','none'}, label_smoothing == 0, target.dtype"
            " == int64, out_features == (). Got "
            f"reduction={lp.p.reduction!r}, label_smoothing={eps}, "
            f"target.dtype={target.dtype}, out_features={tuple(lp.out_features)}"
            f", tracing={torch.jit.is_tracing()}"
            f", linear_bias.shape={bias_shape}.",
            stacklevel=_user_frame()[2],
        )


def _autocast_off(dev: torch.device) -> contextlib.AbstractContextManager[object]:
    # The chunk loop picks its own matmul dtypes; autocast would recast them (and torch.autocast
    # does not accept every device type, e.g. meta).
    if autocast_enabled(dev):
        return torch.autocast(dev.type, enabled=False)
    return contextlib.nullcontext()


def _select(backend: str, lp: LinearProblem) -> str:
    """The tile's backend (``chunked.select``)."""
    return chunked.select(backend, lp.x, lp.p.prob, bool(lp.out_features))


def _prepare(
    input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None,
    weight: Tensor | None, reduction_: str, ignore_index: int | None, label_smoothing: float,
    strict_: LazyStrict, owner: object | None, options: object, read_values: bool,
) -> tuple[LinearProblem, list[Finding], torch.dtype | None, int | None]:
    """Validation, stock's options warning, the tile plan and the findings known from shapes."""
    lp = validate(input, linear_weight, target, linear_bias, weight, reduction_, ignore_index,
                  label_smoothing, read_values=read_values)
    p = lp.p
    _stock_options_warning(options, lp, target)
    tile_dtype, max_rows = tile_plan(options, lp, target)
    static = list(p.findings)
    if p.reduction == "mean" and math.prod(p.positions_shape) == 0:
        static.append(reworded(checks.empty_mean_finding(p)))
    return lp, static, tile_dtype, max_rows


def _spec(lp: LinearProblem, name: str, tile_dtype: torch.dtype | None, max_rows: int | None,
          weight_grad: bool) -> chunked.Spec:
    p = lp.p
    work = torch.float64 if lp.x.dtype == torch.float64 else torch.float32
    return chunked.Spec(
        num_classes=lp.num_classes, positions=lp.positions, ignore_index=p.ignore_index,
        eps=p.label_smoothing, prob=p.prob,
        weight=None if p.weight is None else
        (p.weight if weight_grad else p.weight.detach()).to(work).contiguous(), backend=name,
        work=work, tile_dtype=tile_dtype, max_rows=max_rows,
    )


def _operands(lp: LinearProblem) -> tuple[Tensor, Tensor, Tensor | None]:
    x, w, b = lp.x, lp.w, lp.b
    if lp.compute_dtype != x.dtype:  # under autocast: stock's linear runs in the autocast dtype
        x, w = x.to(lp.compute_dtype), w.to(lp.compute_dtype)
        b = None if b is None else b.to(lp.compute_dtype)
    return x, w, b


class _Densify(torch.autograd.Function):
    """``to_dense()`` whose gradient stays dense, as stock's gradient for a sparse input or
    linear_weight is (its addmm returns a strided one)."""

    @staticmethod
    def forward(ctx: Any, v: Tensor) -> Tensor:  # type: ignore[override]
        return v.to_dense()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


class _SavedLikeStock(torch.autograd.Function):
    """Identity on the losses that saves what stock's reference path saves for backward: the
    input when linear_weight needs a gradient, linear_weight when the input does (addmm), the
    target and the class weight (nll_loss); never the bias. Backward unpacks them, so autograd
    itself raises "modified by an inplace operation" exactly where stock's backward does (an
    optimizer step before backward()), with its own message; the chunk loop reads none of them on
    the usual path (its gradients were computed in forward)."""

    @staticmethod
    def forward(ctx: Any, losses: Tensor, fresh: bool, *saved: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(*saved)
        ctx.n = len(saved)
        # What the caller receives (reduction="none") must be a tensor of its own, which it may
        # change in place (loss.mul_(mask)) as stock's; a view made here could not be.
        return losses.clone() if fresh else losses.view_as(losses)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        ctx.saved_tensors  # noqa: B018 - the unpacking is the version check
        return (grad, None, *([None] * ctx.n))


def _stock_saved(lp: LinearProblem, target: Tensor, weight: Tensor | None) -> list[Tensor]:
    """The caller's tensors stock's reference backward holds (see ``_SavedLikeStock``). Under
    autocast stock's linear saves its own casts, never the caller's tensors."""
    grad = torch.is_grad_enabled()
    x, w, b = lp.x, lp.w, lp.b
    dx, dw = grad and x.requires_grad, grad and w.requires_grad
    if not (dx or dw or (grad and b is not None and b.requires_grad)):
        return []
    saved = [target] + ([weight] if isinstance(weight, Tensor) else [])
    if dw and x.dtype == lp.compute_dtype:
        saved.append(x)
    if dx and w.dtype == lp.compute_dtype:
        saved.append(w)
    return saved


def _transform_guard(t: Tensor, num_classes: int, ignore_index: int) -> None:
    """Inside a torch.func transform on the CPU, stock's own kernel bounds-checks the labels (an
    IndexError even under vmap): so does this call, by a gather that reads no value on the host."""
    if not num_classes or not t.numel():
        return
    idx = torch.where(t == ignore_index, 0, t).reshape(-1)
    try:
        torch.zeros(num_classes, device=t.device).index_select(0, idx)
    except (IndexError, RuntimeError) as e:
        if "out of range" not in str(e) and "out of bounds" not in str(e):
            raise
        # The class stock's own check raises: a RuntimeError under any vmap level (its batched
        # gather, whichever argument is batched), else an IndexError. This gather's own class
        # follows what this call batches, not what stock's logits would be, so it cannot tell.
        builtin = RuntimeError if under_vmap() else IndexError
        raise stock_class(TargetOutOfRangeError, builtin)(
            f"linear_cross_entropy: a class-index target is outside the class range "
            f"0..{num_classes - 1} ({num_classes} classes) inside a torch.func transform (vmap, "
            f"grad, ...), where safeloss cannot read the labels to name them. Stock torch raises "
            f"{builtin.__name__} there too (this call's bounds check: {e}).\n"
            "Fix: check the labels outside the transform (e.g. call the loss once eagerly on a "
            "batch), or set ignore_index to the value used for 'no label'"
        ) from None


def _index_target(lp: LinearProblem, mask: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """(labels for the loop, bad-label mask or None, valid positions). ``mask``: bad labels set
    to ignore_index (their loss becomes NaN), where the call may not read them on the host."""
    p = lp.p
    t = lp.target if lp.target.dtype == torch.int64 else lp.target.long()
    bad = None
    if mask:
        bad = bad_target_mask(t, lp.num_classes, p.ignore_index)
        t = t.masked_fill(bad, p.ignore_index)  # never a gather out of range; the loss there is NaN
    return t, bad, t != p.ignore_index


def _dense(
    mode: Mode, input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None,
    weight: Tensor | None, reduction_: str, ignore_index: int | None, label_smoothing: float,
    *, strict: bool | None, backend: str, owner: object | None, options: object,
    plan_key: tuple[object, ...] | None = None,
) -> Tensor:
    """Eager calls, and the modes that may not read the host: CUDA-graph capture and torch.func
    transforms (bad labels masked, NaN loss, findings not reported)."""
    no_host = mode is not Mode.EAGER
    transform = mode is Mode.TRANSFORM
    key = checks.LINEAR_FUNCTIONAL_KEY if owner is None else id(owner)
    strict_ = LazyStrict(strict)
    if checks._pending and not no_host:
        checks.flush(key, owner, wait=bool(strict_))
    lp, static, tile_dtype, max_rows = _prepare(
        input, linear_weight, target, linear_bias, weight, reduction_, ignore_index,
        label_smoothing, strict_, owner, options, read_values=not no_host)
    p = lp.p
    if static and not no_host:
        for finding in static:
            report(finding, strict_, owner)
    elif plan_key is not None and _plannable(lp, input, linear_weight, target, linear_bias, weight, options):
        # Stored before the compute: the plan is about the signature, whatever the values hold.
        plans.store(plan_key, _Plan(lp))
    # Index targets with such a weight were refused by validate (as stock does); probability
    # targets: stock differentiates the class weight, which the chunk loop does not, so those
    # calls take the plain chunked ops (reference-path memory, exact gradients); so do dual
    # tensors of forward-mode AD, and calls under selective activation checkpointing (see
    # _selective_checkpoint).
    weight_grad = p.weight is not None and p.weight.requires_grad and torch.is_grad_enabled()
    plain_ops = transform or weight_grad or (not no_host and (
        _forward_ad(input, linear_weight, linear_bias, target) or _selective_checkpoint()))
    # A class weight with a tangent (forward-mode AD, torch.func.jvp) or a batch dim (vmap over
    # it): stock's own ops on the whole call, so the result and its tangent are stock's exactly
    # (stock's nll_loss treats the weight as non-differentiable, its label smoothing does not).
    weight_dual = isinstance(weight, Tensor) and (
        _C._functorch.is_functorch_wrapped_tensor(weight) if transform else
        not no_host and _forward_ad(weight))
    name = "torch" if transform else _select(backend, lp)
    dev = lp.x.device
    immediate = not no_host and (checks.reads_at_once(dev.type) or bool(strict_))
    C = lp.num_classes
    bad = neg = badsum = None
    if p.prob:
        t = lp.target
        valid = torch.ones(t.shape[:1], dtype=torch.bool, device=dev)
        if t.numel():
            neg, badsum = prob_target_counts(t, 1)
    elif immediate:
        t, _, valid = _index_target(lp, False)
        lo, hi = target_bounds(t)
        if (lo < 0 or hi >= C) and checks.count_bad_targets(t, C, p.ignore_index):
            raise TargetOutOfRangeError(
                named(checks.out_of_range_message(p.target, C, p.ignore_index, dev.type))) from None
    else:
        if transform and checks.reads_at_once(dev.type):
            _transform_guard(lp.target, C, p.ignore_index)
        t, bad, valid = _index_target(lp, True)

    if not C:  # no classes: nothing for the loop to do; stock's values (NaN mean, zeros) and report
        out = _reference(lp, t, bad)
        if not no_host:
            report(reworded(checks.no_classes_finding(p)), strict_, owner)
        return out
    if weight_dual:
        out = _reference(lp, t, bad)
        if immediate and not bool(torch.isfinite(out).all()):
            with torch.no_grad():
                losses = _reference(lp, t, bad, "none").reshape(p.positions_shape)
            _resolve(lp, losses, valid, out, neg, badsum, strict_, owner)
        return out
    sp = _spec(lp, name, tile_dtype, max_rows, weight_grad)
    x, w, b = _operands(lp)
    with _autocast_off(dev):
        if plain_ops:
            losses = chunked.differentiable_losses(x, w, b, t, bad, sp)
        else:
            saved = _stock_saved(lp, target, weight)
            grads = bool(saved) or (p.prob and torch.is_grad_enabled() and t.requires_grad)
            if saved and b is not None:
                # The loop's own backward (reduction="none", a second backward) recomputes the
                # logits: from the bias as it was, which stock does not save (an in-place update
                # of it between forward and backward must not change the gradients, nor fail).
                b = b.clone()
            losses = chunked.LinearCE.apply(x, w, b, t, valid, bad, sp, grads and p.reduction != "none")
            if saved:
                losses = _SavedLikeStock.apply(losses, p.reduction == "none", *saved)
    losses = losses.reshape(p.positions_shape)
    out = reduction.reduce(Rows(losses, Scan([0] * F.SIZE)), p)
    if no_host:
        return out
    if immediate:
        _resolve(lp, losses, valid, out, neg, badsum, strict_, owner)
    else:
        counts = _device_counts(lp, losses, valid, bad, neg, badsum)
        checks.defer(Scan(counts), p, losses, out, bool(strict_), key, owner=owner, op=_OP)
    return out


def _valid_like(valid: Tensor, losses: Tensor) -> Tensor:
    """The valid mask in the losses' shape: per position for class indices, per row (every one
    valid) for probability targets, whose K-dimensional losses have more positions than rows."""
    if valid.numel() == losses.numel():
        return valid.reshape(losses.shape)
    return valid.reshape(-1, *([1] * (losses.dim() - 1))).expand(losses.shape)


def _device_counts(lp: LinearProblem, losses: Tensor, valid: Tensor, bad: Tensor | None,
                   neg: Tensor | None, badsum: Tensor | None) -> Tensor:
    """The findings vector (``core._flags``) of a call that may not read the host: bad labels,
    non-finite losses, losses that overflow the output dtype, probability targets that are not
    distributions, negative class weights; computed on the device."""
    p = lp.p
    dev = losses.device
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    ll = losses.detach()
    vv = _valid_like(valid, ll)
    finite = torch.isfinite(ll)
    nonfinite = (~finite & vv).sum()
    bound = F.overflow_bound(p.out_dtype)
    over = (finite & vv & (ll.abs() >= bound)).sum() if math.isfinite(bound) else zero
    wneg = zero if p.weight is None else (p.weight.detach() < 0).sum()
    return torch.stack([
        zero if bad is None else bad.sum(), nonfinite, zero, zero, zero if neg is None else neg,
        zero if badsum is None else badsum, wneg, over,
    ]).to(torch.int32)


def _reference(lp: LinearProblem, t: Tensor | None = None, bad: Tensor | None = None,
               reduction_: str | None = None) -> Tensor:
    """Stock's reference path on the validated problem: ``linear`` (autocast applies, as for
    stock), then stock's cross-entropy. The logits exist here (as in stock): for the modes that
    only record or describe the call (jit.trace, ONNX, meta tensors), DTensors, and a class
    weight that requires grad inside a graph or carries a tangent. ``t``: the batched labels
    to use (bad ones masked, ``bad`` marks them: NaN there, as on the chunked paths)."""
    p = lp.p
    red = p.reduction if reduction_ is None else reduction_
    shape = (lp.x.shape[0], lp.num_classes, *lp.out_features)
    logits = torch.nn.functional.linear(lp.x, lp.w, lp.b).reshape(shape)
    if p.prob:
        tgt = p.target if lp.batched else p.target.unsqueeze(0)
        out = _stock_cross_entropy(logits, tgt, weight=p.weight, label_smoothing=p.label_smoothing,
                                   reduction=red)
    else:
        tgt = lp.target.long() if t is None else t
        out = _stock_cross_entropy(logits, tgt, weight=p.weight, ignore_index=p.ignore_index,
                                   label_smoothing=p.label_smoothing, reduction=red)
        if bad is not None:
            out = out.masked_fill(bad, math.nan) if red == "none" else \
                out + torch.where(bad.any(), math.nan, 0.0)
    return out if lp.batched or red != "none" else out.squeeze(0)


def _graph(
    input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None,
    weight: Tensor | None, reduction_: str, ignore_index: int | None, label_smoothing: float,
    *, strict: bool | None, backend: str, owner: object | None, options: object,
) -> Tensor:
    """torch.compile, make_fx / export and fake tensors: shape checks at trace time (raised at
    once, as in eager), value checks computed in the graph and reported when it runs (the
    effectful op of ``core.compiled``); the chunk loop is one custom op (``graph``)."""
    strict_ = LazyStrict(strict)
    lp, static, tile_dtype, max_rows = _prepare(
        input, linear_weight, target, linear_bias, weight, reduction_, ignore_index,
        label_smoothing, strict_, owner, options, read_values=False)
    p = lp.p
    weight_grad = p.weight is not None and p.weight.requires_grad and torch.is_grad_enabled()
    bad = neg = badsum = None
    if p.prob:
        t = lp.target
        valid = torch.ones(t.shape[:1], dtype=torch.bool, device=lp.x.device)
        if t.numel():
            neg, badsum = prob_target_counts(t, 1)
    else:
        t, bad, valid = _index_target(lp, True)
    if weight_grad:  # the class weight's gradient: stock's own ops (the custom op has none)
        out = _reference(lp)
        losses = out if p.reduction == "none" else out.new_empty(0)
    else:
        sp = _spec(lp, _select(backend, lp), tile_dtype, max_rows, False)
        x, w, b = _operands(lp)
        # (in the positions' shape first: the loop's (N,) or (N, D) is not bad's (N, *out_features))
        losses = graph.losses(x, w, b, t, valid, sp).reshape(p.positions_shape)
        if bad is not None:
            losses = losses.masked_fill(bad, math.nan)
        out = reduction.reduce(Rows(losses, Scan([0] * F.SIZE)), p)
    counts = _device_counts(lp, losses if losses.numel() else out.reshape(1),
                            valid if losses.numel() else valid.new_ones(1), bad, neg, badsum)
    key = checks.LINEAR_FUNCTIONAL_KEY if owner is None else id(owner)
    compiled.note(p, Rows(losses if losses.numel() else None, Scan(counts)), out, key, strict,
                  static, op=_OP)
    return out


def _in_tool(
    mode: Mode, input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None,
    weight: Tensor | None, reduction_: str, ignore_index: int | None, label_smoothing: float,
    *, strict: bool | None, backend: str, owner: object | None, options: object,
) -> Tensor:
    """Sparse layouts, jit.trace, ONNX export, fake and meta tensors, DTensors."""
    kw: dict[str, Any] = dict(strict=strict, backend=backend, owner=owner, options=options)
    if mode is Mode.SPARSE:
        # Stock accepts a sparse input or linear_weight (its linear does) and sparse probability
        # targets; the rest is a LayoutError, as stock has no kernel for it.
        check_layouts(input, linear_weight, target, linear_bias, weight)
        x, w, t = (_Densify.apply(v) if v.layout is not torch.strided else v
                   for v in (input, linear_weight, target))
        out = run(decide(x, w, t, linear_bias, weight), x, w, t, linear_bias, weight, reduction_,
                  ignore_index, label_smoothing, **kw)
        return densify_result(out, target, reduction_)
    if mode is Mode.JIT_TRACE:
        # Every check, on the example inputs, as eager code; nothing of it enters the trace.
        with paused_tracer(), torch.no_grad():
            run(decide(input, linear_weight, target, linear_bias, weight), input, linear_weight,
                target, linear_bias, weight, reduction_, ignore_index, label_smoothing, **kw)
        with warnings.catch_warnings():  # validation's shape comparisons, frozen as stock's are
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            lp = validate(input, linear_weight, target, linear_bias, weight, reduction_,
                          ignore_index, label_smoothing, read_values=False)
            return _reference(lp)  # stock's reference path, recorded (stock's own under tracing)
    strict_ = LazyStrict(strict)
    if mode is Mode.ABSTRACT and not any(
            isinstance(v, Tensor) and v.is_meta for v in (input, linear_weight, target)):
        # Fake tensors: the graph path (AOTAutograd's metadata run must call the same ops).
        return _graph(input, linear_weight, target, linear_bias, weight, reduction_,
                      ignore_index, label_smoothing, **kw)
    # ONNX (no translation for safeloss's ops), meta tensors (stock's shapes and dtypes exactly),
    # DTensors (their own ops run it): shape checks, then stock's reference path.
    lp, static, _, _ = _prepare(input, linear_weight, target, linear_bias, weight, reduction_,
                                ignore_index, label_smoothing, strict_, owner, options,
                                read_values=False)
    for finding in static:
        report(finding, strict_, owner)
    return _reference(lp)


def _resolve(lp: LinearProblem, losses: Tensor, valid: Tensor, out: Tensor, neg: Tensor | None,
             badsum: Tensor | None, strict: LazyStrict, owner: object | None) -> None:
    """The immediate path's findings (CPU, strict mode), in this API's terms, in the shared
    order (``core.checks.resolve``): overflow is judged on the value the caller receives, after
    the cast to the output dtype, never on the float32 losses alone."""
    p = lp.p
    if neg is not None and badsum is not None:
        n_neg, n_bad = int(neg), int(badsum)
        if n_neg or n_bad:
            report(reworded(checks.prob_target_finding(p, n_neg, n_bad)), strict, owner)
    if out.dim() == 0 and out.dtype == losses.dtype:  # common case: one read settles it
        if math.isfinite(out.item()):
            return
    elif bool(torch.isfinite(out).all()):
        return
    ll = losses.detach()
    vv = _valid_like(valid, ll)
    mask = ~torch.isfinite(ll) & vv
    if bool(mask.any()):
        report(nonfinite_finding(lp, mask), strict, owner)
        return
    bound = F.overflow_bound(p.out_dtype)
    big = (ll.abs() >= bound) & vv
    if math.isfinite(bound) and bool(big.any()):
        count = int(big.sum())
        pos = [str(list(r)) if big.dim() > 1 else f"[{r[0]}]" for r in big.nonzero()[:5].tolist()]
        where = f" (first at {fmt_list(pos, total=count)})" if pos else ""
        report(reworded(checks.overflow_finding(p, count, where, out, stock_values=False)),
               strict, owner)
    elif p.reduction != "none" and math.prod(p.positions_shape) > 0:
        # No position's loss is non-finite or too big, yet the result is: 0/0 (nothing to
        # average), or a sum / weighted mean beyond the output dtype's range.
        if p.reduction == "mean" and not p.prob and math.isnan(float(out.detach())):
            report(reworded(checks.empty_mean_finding(p)), strict, owner)
        else:
            report(reworded(checks.reduction_overflow_finding(p, losses)), strict, owner)



"""The cross-entropy op with extras (z-loss, softcap, temperature, statistics): its own call path.

The entries (``functional.cross_entropy``, ``SafeCrossEntropyLoss``) branch here only when an
extra is not at its default; every other call runs ``pipeline`` untouched. The path, downward as
there: argument checks and target normalization (``core.validation.normalize``, so every shape,
dtype and device check and hint applies) -> per-position fp32 losses of the capped, scaled logits
with differentiable torch ops (``core.extras``) -> ``core.reduction`` plus the z-loss term
(``core.extras.reduce_z_loss``) -> the shared findings (``core.checks``), reported at once,
deferred (CUDA default mode) or by the compiled graph (``core.compiled``).

Every backend runs these torch ops: the extras are not yet fused into the Triton kernel (one extra
pass over the logits on CUDA).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import torch
from torch import Tensor

from ..backends import torch_backend
from ..backends.dispatch import check_backend
from ..core import _flags as F
from ..core import checks, compiled, reduction
from ..core import extras as X
from ..core._traceback import trim
from ..core.config import LazyStrict
from ..core.errors import SafeLossError
from ..core.mode import NO_HOST_READS, Mode, decide
from ..core.report import report
from ..core.rows import Rows
from ..core.tools import check_layouts, densify_result, paused_tracer
from ..core.validation import Problem, check_label_smoothing, check_reduction, normalize, resolve_reduction
from ..parallel import extras as parallel_extras
from . import pipeline

Result = Tensor | tuple[Tensor, X.LossStats]


def cross_entropy(
    mode: Mode, input: Tensor, target: Tensor, weight: Tensor | None, size_average: bool | None,
    ignore_index: int, reduce: bool | None, reduction_: str, label_smoothing: float,
    softcap: object, temperature: object, z_loss: object, return_stats: object, *,
    strict: bool | None, backend: str, inplace_backward: bool, fused_grad: bool,
) -> Result:
    """``safeloss.cross_entropy`` with an extra that is not at its default (``mode``: the entry's)."""
    try:
        ex = X.check(softcap, temperature, z_loss, return_stats)
        red = resolve_reduction(size_average, reduce, reduction_)
        eps = check_label_smoothing(label_smoothing)
        backend = check_backend(backend)
        if not ex.active:  # defaults spelled otherwise (numpy numbers): the plain path
            return pipeline.run(mode, input, target, weight, ignore_index, red, eps, strict=strict,
                                backend=backend, inplace_backward=inplace_backward,
                                fused_grad=fused_grad, owner=None)
        return run(mode, input, target, weight, ignore_index, red, eps, ex, strict=strict, owner=None)
    except SafeLossError as e:  # the traceback ends at the caller's line (core._traceback)
        trim(e)
        raise


def module_forward(m: torch.nn.CrossEntropyLoss, input: Tensor, target: Tensor) -> Result:
    """``SafeCrossEntropyLoss.forward`` with an extra set (read from the module at every call)."""
    ex = X.check(m.softcap, m.temperature, m.z_loss, m.return_stats,  # type: ignore[attr-defined]
                 op="SafeCrossEntropyLoss")
    mode = decide(input, target, m.weight)
    red, eps = check_reduction(m.reduction), check_label_smoothing(m.label_smoothing)
    if not ex.active:
        return pipeline.run(mode, input, target, m.weight, m.ignore_index, red, eps,
                            strict=m.strict, backend=check_backend(m.backend),  # type: ignore[attr-defined]
                            inplace_backward=m.inplace_backward,  # type: ignore[attr-defined]
                            fused_grad=m.fused_grad, owner=m)  # type: ignore[attr-defined]
    check_backend(m.backend)  # type: ignore[attr-defined]
    return run(mode, input, target, m.weight, m.ignore_index, red, eps, ex,
               strict=m.strict, owner=m)  # type: ignore[attr-defined]


def run(
    mode: Mode, input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
    reduction_: str, label_smoothing: float, ex: X.Extras, *, strict: bool | None,
    owner: object | None,
) -> Result:
    """One call with extras, in ``mode`` (see ``core.mode.TABLE``: the same checks per mode)."""
    if mode is Mode.DTENSOR and parallel_extras.dtensor_applies(input, target, weight):
        # Logits sharded on the classes under loss_parallel(): the vocab-parallel op's extras.
        return parallel_extras.dtensor_run(input, target, weight, ignore_index, reduction_,
                                           label_smoothing, ex, strict=strict, owner=owner)
    if mode is Mode.SPARSE:
        check_layouts(input, target, weight)  # what is left: sparse probability targets
        dense = target.to_dense()
        res = run(decide(input, dense, weight), input, dense, weight, ignore_index, reduction_,
                  label_smoothing, ex, strict=strict, owner=owner)
        if isinstance(res, tuple):
            return densify_result(res[0], target, reduction_), res[1]
        return densify_result(res, target, reduction_)
    if mode is Mode.JIT_TRACE:
        # Every check, on the example inputs, as eager code; then the ops alone are recorded.
        with paused_tracer(), torch.no_grad():
            _call(Mode.EAGER, input, target, weight, ignore_index, reduction_, label_smoothing, ex,
                  strict, owner)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return _call(Mode.CAPTURE, input, target, weight, ignore_index, reduction_,
                         label_smoothing, ex, strict, owner)
    return _call(mode, input, target, weight, ignore_index, reduction_, label_smoothing, ex, strict,
                 owner)


def _call(
    mode: Mode, input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
    reduction_: str, label_smoothing: float, ex: X.Extras, strict: bool | None,
    owner: object | None,
) -> Result:
    no_host = mode in NO_HOST_READS
    key = checks.FUNCTIONAL_KEY if owner is None else id(owner)
    strict_ = LazyStrict(strict)
    if checks._pending and not no_host:
        checks.flush(key, owner, wait=bool(strict_))

    p = normalize(input, target, weight, ignore_index, reduction_, label_smoothing,
                  read_values=not no_host)
    static = p.findings
    if p.reduction == "mean" and math.prod(p.positions_shape) == 0:
        static = [*static, checks.empty_mean_finding(p)]
    if static and (not no_host or mode in (Mode.ONNX, Mode.ABSTRACT)):
        for finding in static:
            report(finding, strict_, owner)
    if mode is Mode.TRANSFORM:
        torch_backend.transform_guard(p)  # CPU: a bad label raises inside torch.func, as stock

    x = p.input
    cdim = 0 if x.dim() == 1 else 1
    C = p.num_classes
    acc = X.work_dtype(x.dtype, p.out_dtype)
    bad = valid = None
    t = p.target
    if not p.prob:
        t = t.long()
        # Bad labels are masked (never an out-of-range gather) and counted: an eager call raises
        # the shared out-of-range error from the counts, before anything is returned.
        bad = checks.bad_target_mask(t, C, p.ignore_index)
        valid = (t != p.ignore_index) & ~bad

    z = x if x.dtype == acc else x.to(acc)
    zt = X.transform(z, ex)
    logp = torch.log_softmax(zt, cdim)
    w = None if p.weight is None else p.weight.to(acc)
    ce = X.ce_rows(logp, t, valid, w, p.label_smoothing, p.prob, cdim) if C else logp.sum(cdim)
    lse = zl = None
    if ex.z_loss:
        lse = torch.logsumexp(zt, cdim)
        zl = X.z_loss_rows(lse, valid, ex.z_loss)
    if bad is not None:
        ce = ce.masked_fill(bad, math.nan)  # nothing trains on a bad label before it is reported
    total_rows = ce if zl is None else ce + zl

    ce_red = reduction.reduce(Rows(ce, checks.CLEAN), replace(p, out_dtype=acc))
    zl_red = X.reduce_z_loss(zl, valid, p.reduction, p.positions_shape, acc, x.device)
    out = (ce_red if zl is None else ce_red + zl_red).to(p.out_dtype)

    stats = None
    if ex.return_stats:
        if lse is None:
            lse = torch.logsumexp(zt.detach(), cdim)
        acc_ = None
        if not p.prob:
            assert valid is not None
            pred = X.argmax(x.detach(), cdim) if C else torch.zeros_like(t)
            acc_ = X.accuracy(pred == t, valid)
        stats = X.LossStats(lse.detach().float(), X.entropy(logp.detach(), cdim).float(),
                            zl_red.detach().float(), acc_)

    _findings(mode, p, x, zt, t, total_rows, valid, bad, out, ex, static, strict, strict_, key, owner)
    return out if stats is None else (out, stats)


def _findings(
    mode: Mode, p: Problem, x: Tensor, zt: Tensor, t: Tensor, rows: Tensor, valid: Tensor | None,
    bad: Tensor | None, out: Tensor, ex: X.Extras, static: list, strict: bool | None,
    strict_: LazyStrict, key: int, owner: object | None,
) -> None:
    """The value checks of the call, from one vector of device counts (``core._flags``)."""
    compiled_graph = (mode in (Mode.COMPILE, Mode.GRAPH) or (mode is Mode.ABSTRACT and not x.is_meta))
    if mode in NO_HOST_READS and not compiled_graph:
        return  # cuda-graph capture, torch.func, meta tensors, ONNX: nothing can be reported
    counts = torch.cat([device_counts(p, x, rows, valid, bad, ex, fixed=mode is not Mode.EAGER),
                        torch.isfinite(out.detach()).all().to(torch.int64).reshape(1)])
    if compiled_graph:
        compiled.note(p, Rows(rows, checks.Scan(counts[: F.SIZE])), out, key, strict, static)
        return
    immediate = checks.reads_at_once("cpu" if x.is_cpu else x.device.type) or bool(strict_)
    p_rep = replace(p, input=zt.detach())  # the NaN/inf finding names the capped, scaled logits
    if immediate:
        host = counts.tolist()  # one read: the counts and whether the result is finite
        # A bad label is about the labels alone: its error comes without the extras' note.
        note = "" if host[F.BAD_TARGET] else ex.note()
        checks.resolve(checks.Scan(host[: F.SIZE]), p_rep, rows.detach(), out, bool(host[F.SIZE]),
                       strict_, owner, note=note)
    else:
        checks.defer(checks.Scan(counts[: F.SIZE]), p_rep, rows, out, bool(strict_), key,
                     note=checks.DEFERRED_NOTE + ex.note(), owner=owner)


def device_counts(p: Problem, x: Tensor, rows: Tensor, valid: Tensor | None, bad: Tensor | None,
                  ex: X.Extras, fixed: bool) -> Tensor:
    """``core._flags`` counts of a call (int64, on the device, no host read). The softmaxed-input
    check samples the *raw* logits; the others judge the per-position losses of the capped,
    scaled logits (``rows``)."""
    dev = x.device
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    cdim = 0 if x.dim() == 1 else 1
    C = p.num_classes
    r = rows.detach()
    finite = torch.isfinite(r)
    nonfinite = ~finite if valid is None else ~finite & valid
    like = checked = zero
    if C >= 2 and x.numel():
        sample = checks.sample_rows(x.detach(), fixed=fixed or not isinstance(x.shape[0], int))
        like = checks.softmax_like(sample).sum()
        checked = torch.full((), sample.shape[0], dtype=torch.int64, device=dev)
    neg = badsum = zero
    if p.prob and p.target.numel():
        neg, badsum = checks.prob_target_counts(p.target, cdim)
    wneg = zero if p.weight is None else (p.weight.detach() < 0).sum()
    over = zero
    bound = F.overflow_bound(p.out_dtype)
    # A position's loss beyond the half dtype's range, where the extras leave that possible at all
    # (a softcap bounds it for class indices without weights: X.loss_bound).
    if math.isfinite(bound) and X.loss_bound(ex, C, p.prob, p.weight is not None) >= bound:
        big = finite & (r.abs() >= bound)
        over = (big if valid is None else big & valid).sum()
    counts = [zero if bad is None else bad.sum(), nonfinite.sum(), like, checked, neg, badsum, wneg,
              over]
    return torch.stack([c.to(torch.int64) for c in counts])

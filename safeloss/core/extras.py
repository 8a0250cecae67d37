"""LLM and RL extras shared by the three ops: z-loss, logit softcapping, temperature, statistics.

What every op's extras path shares, so that the three ops agree to the bit on the semantics:

* :func:`check`: the argument checks (one message per mistake, naming the value and the fix);
* :class:`LossStats`: what ``return_stats=True`` returns next to the loss;
* the math, as pure functions of a logits tile in float32 (float64 for float64 inputs):
  :func:`transform` (``softcap * tanh(z / softcap)``, then ``/ temperature``), :func:`ce_rows`
  (cross-entropy of the transformed logits, stock torch's formula for weights, label smoothing,
  ignore_index and probability targets), :func:`z_loss_rows`, :func:`entropy`, :func:`argmax`,
  :func:`accuracy`; the hand-written gradients the chunked and sharded ops need
  (:func:`index_grad`, :func:`prob_grad`, :func:`chain`); and :func:`reduce_z_loss`, the one
  place the z-loss term meets the call's reduction.

The ops call these from their own glue (``ce/extras.py``, ``linear/extras.py``) and inside the
vocab-parallel engine (``parallel/vocab.py``); with every extra at its default, only the parallel
engine's import reaches this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .errors import ArgumentTypeError, ExtrasError


class LossStats(NamedTuple):
    """Per-token statistics of a call with ``return_stats=True``; none carries a gradient.

    * ``lse``: log-sum-exp over the classes of the capped, scaled logits, per position (float32,
      the positions' shape; ignored positions included: it depends on the logits only).
    * ``entropy``: entropy of softmax of the capped, scaled logits, per position (float32, as ``lse``).
    * ``z_loss``: the z-loss term as added to the loss (float32, the loss's shape; zeros when
      ``z_loss=0``).
    * ``accuracy``: 0-d float32, the share of non-ignored positions whose argmax (ties to the
      lowest index, as ``torch.argmax``) is the target; NaN when no position counts, which is
      always the case for probability targets (no position has a class label). Always a tensor,
      never None: ``torch.func`` transforms and ``vmap`` take only tensors in their outputs.
    """

    lse: Tensor
    entropy: Tensor
    z_loss: Tensor
    accuracy: Tensor


LossStats.__module__ = "safeloss"  # as the errors: the public name in reprs and pickles


@dataclass(frozen=True)
class Extras:
    """The checked extras of one call."""

    softcap: float | None = None
    temperature: float = 1.0
    z_loss: float = 0.0
    return_stats: bool = False

    @property
    def active(self) -> bool:
        return (self.softcap is not None or self.temperature != 1.0 or self.z_loss != 0.0
                or self.return_stats)

    def describe(self) -> str:
        parts = []
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap:g}")
        if self.temperature != 1.0:
            parts.append(f"temperature={self.temperature:g}")
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss:g}")
        return ", ".join(parts)

    def note(self) -> str:
        """The line that heads a finding of an extras call: which logits each check judged."""
        what = self.describe()
        if not what:
            return ""
        return (f"[{what}: NaN/inf and overflow are judged on the capped, scaled logits and the "
                "returned loss; the softmaxed-input check looks at the raw logits]\n")


_NUMBERS = (float, int)


def defaults(softcap: object, temperature: object, z_loss: object, return_stats: object) -> bool:
    """Whether every extra has its default value (the entries' one branch; a few name tests).
    Only plain Python numbers count: ``True`` or a tensor equal to 1 takes the checked path."""
    return (softcap is None and return_stats is False
            and type(temperature) in _NUMBERS and temperature == 1.0
            and type(z_loss) in _NUMBERS and z_loss == 0.0)


def _number(name: str, value: object, op: str, fix: str) -> float:
    if isinstance(value, (bool, str, bytes, Tensor)) or value is None:
        extra = ""
        if isinstance(value, Tensor):
            extra = (" A tensor would be read on the host at every call (a sync on the GPU) and "
                     "recompile torch.compile'd code for each value.")
        raise ArgumentTypeError(
            f"{op}: {name} must be a Python number, got {value!r} ({type(value).__name__}).{extra}\n"
            f"Fix: {fix}"
        )
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:  # an int beyond float's range (10**400): no float, let alone float32
        digits = len(str(abs(value)))  # type: ignore[arg-type]
        raise ExtrasError(
            f"{op}: {name} is an integer of {digits} digits, too large for a float (the loss "
            f"computes in float32, whose largest value is {_F32_MAX:.2e}).\nFix: {fix}"
        ) from None
    except (TypeError, ValueError):
        raise ArgumentTypeError(
            f"{op}: {name} must be a Python number, got {value!r} ({type(value).__name__}).\n"
            f"Fix: {fix}"
        ) from None


def _finite(v: float) -> bool:
    """``math.isfinite`` in a form Dynamo traces on a float it made dynamic (a value that changes
    between compiled calls, such as a temperature schedule, becomes a SymFloat): inf - inf and
    NaN - NaN are NaN, which equals nothing."""
    return v - v == 0


_F32_MAX = float(torch.finfo(torch.float32).max)
_F32_TINY = float(torch.finfo(torch.float32).tiny)  # the smallest normal float32


def _check_float32_range(cap: float | None, temp: float, softcap: object, temperature: object,
                         op: str) -> None:
    """The kernels (and the torch path's hand-written gradient) take 1/temperature, and with a
    cap softcap/temperature, 1/softcap and temperature/softcap**2, as float32 scalars: each must
    be a normal float32 (a subnormal or zero scale collapses every logit to 0, one beyond the
    range makes them inf and the gradient NaN), except that temperature/softcap**2 may underflow
    (it weighs zt**2, which is then far below float32's range too). About 3e-39 < temperature <
    8e37, and at temperature=1 5e-20 < softcap < 8e37."""
    scales = [("1/temperature", 1.0 / temp, True)]
    if cap is not None:
        scales += [("softcap/temperature", cap / temp, True), ("1/softcap", 1.0 / cap, True),
                   ("temperature/softcap**2", temp / cap / cap, False)]
    for what, v, tiny_matters in scales:
        if v > _F32_MAX or (tiny_matters and v < _F32_TINY):
            given = f"temperature={temperature!r}" + ("" if cap is None else f", softcap={softcap!r}")
            side = (f"beyond float32's largest value ({_F32_MAX:.3g})" if v > _F32_MAX else
                    f"below float32's smallest normal value ({_F32_TINY:.3g})")
            raise ExtrasError(
                f"{op}: {given} puts {what} = {v:.3g} {side}: "
                "the logits are capped and scaled in float32, where this scale turns them into "
                "0, inf or NaN.\n"
                "Fix: a temperature near 1 (e.g. 0.7 for sampling, 1.0 for none) and a softcap of "
                "the logits' own scale (e.g. 30.0, Gemma 2's), or softcap=None"
            )


def check(softcap: object, temperature: object, z_loss: object, return_stats: object,
          op: str = "cross_entropy") -> Extras:
    """The checked extras, or an :class:`ExtrasError` (a ``ValueError``) for a value that has no
    meaning, an :class:`ArgumentTypeError` (a ``TypeError``) for one of the wrong type."""
    cap: float | None = None
    if softcap is not None:
        cap = _number("softcap", softcap, op, "softcap=30.0 (Gemma 2's final logit cap), or "
                      "softcap=None for no cap")
        if not (_finite(cap) and cap > 0):
            why = (
                "an infinite cap is no cap at all" if cap == math.inf else
                "NaN would make every logit NaN" if math.isnan(cap) else
                "the cap is the largest magnitude a logit can take (z becomes "
                "softcap * tanh(z / softcap)), so it must be positive"
            )
            raise ExtrasError(
                f"{op}: softcap={softcap!r} is not a positive, finite number: {why}.\n"
                "Fix: softcap=30.0 (Gemma 2's final_logit_softcapping; 50.0 for its attention "
                "logits), or softcap=None to leave the logits uncapped"
            )
    temp = _number("temperature", temperature, op, "temperature=1.0 (no scaling), or the "
                   "sampler's temperature, e.g. temperature=0.7")
    if not (_finite(temp) and temp > 0):
        if temp == 0:
            why = ("0 means greedy decoding, whose distribution puts all mass on the argmax: "
                   "logits / 0 has no log-probabilities to train on")
        elif math.isnan(temp):
            why = "NaN would make every logit NaN"
        elif temp == math.inf:
            why = "an infinite temperature turns every row into the uniform distribution"
        else:
            why = "a negative temperature reverses the order of the classes"
        raise ExtrasError(
            f"{op}: temperature={temperature!r} must be a positive, finite number: {why}.\n"
            "Fix: temperature=1.0 (no scaling), or the temperature the sampler used (> 0), e.g. "
            "temperature=0.7"
        )
    coef = _number("z_loss", z_loss, op, "z_loss=1e-4 (PaLM's coefficient), or z_loss=0.0 to "
                   "turn it off")
    if not (_finite(coef) and coef >= 0):
        why = (
            "a negative coefficient rewards large log-sum-exps, so the logits drift upward "
            "without bound" if coef < 0 else
            "NaN would make the loss NaN" if math.isnan(coef) else
            "an infinite coefficient makes the loss infinite"
        )
        raise ExtrasError(
            f"{op}: z_loss={z_loss!r} must be a finite number >= 0: {why}.\n"
            "Fix: z_loss=1e-4 (PaLM's coefficient: z_loss * logsumexp(logits)^2 per token), or "
            "z_loss=0.0 to turn it off"
        )
    _check_float32_range(cap, temp, softcap, temperature, op)
    if type(return_stats) is not bool:
        raise ArgumentTypeError(
            f"{op}: return_stats must be True or False, got {return_stats!r} "
            f"({type(return_stats).__name__}).\n"
            "Fix: return_stats=True to get (loss, safeloss.LossStats), or leave it out"
        )
    return Extras(cap, temp, coef, return_stats)


# ------------------------------------------------------------------------------- the math


def work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 where any operand is float64, else float32: every sum accumulates in it."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def transform(z: Tensor, ex: Extras, inplace: bool = False) -> Tensor:
    """The capped, scaled logits: ``softcap * tanh(z / softcap) / temperature`` (elementwise,
    differentiable; z in the work dtype). +-inf becomes +-softcap / temperature. ``inplace``:
    one new tensor, transformed in place (no autograd graph: hand-written gradients only)."""
    if ex.softcap is not None:
        if inplace:
            return torch.div(z, ex.softcap).tanh_().mul_(ex.softcap / ex.temperature)
        return torch.tanh(z / ex.softcap) * (ex.softcap / ex.temperature)
    if ex.temperature != 1.0:
        return z / ex.temperature
    return z


def chain(dzt: Tensor, zt: Tensor, ex: Extras) -> Tensor:
    """d loss / d z from d loss / d zt (in place on ``dzt``), with zt = transform(z):
    ``(1 - tanh^2) / temperature``, the tanh recovered from zt itself."""
    if ex.softcap is not None:
        # (1 - th^2) / T = 1 / T - (T / s^2) zt^2: one fused pass, then one multiply
        T, s = ex.temperature, ex.softcap
        f = torch.addcmul(torch.full((), 1.0 / T, dtype=zt.dtype, device=zt.device), zt, zt,
                          value=-T / (s * s))
        # A NaN logit makes its factor NaN. Where the loss does not read the logit (an ignored
        # row: dzt is exactly 0) the gradient stays exactly 0, as the kernels give it; where it
        # does, dzt is NaN already and stays so.
        return dzt.mul_(f.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf))
    if ex.temperature != 1.0:
        return dzt.div_(ex.temperature)
    return dzt


def _along(w: Tensor, dim: int, ndim: int) -> Tensor:
    """A (C,) vector shaped to broadcast along ``dim`` of an ``ndim``-D tensor."""
    dim = dim % ndim
    return w.reshape((-1,) + (1,) * (ndim - dim - 1))


def ce_rows(logp: Tensor, target: Tensor, valid: Tensor | None, weight: Tensor | None, eps: float,
            prob: bool, dim: int = -1) -> Tensor:
    """Per-position cross-entropy from log-probabilities (differentiable), stock torch's formula:

    class indices y: ``(1 - eps) w_y (-logp_y) + (eps / C) sum_c w_c (-logp_c)``, 0 where not
    ``valid``; probabilities q: ``-sum_c w_c ((1 - eps) q_c + eps / C) logp_c``.
    """
    C = logp.shape[dim]
    wb = None if weight is None else _along(weight, dim, logp.dim())
    if prob:
        q = target.to(logp.dtype)
        if eps > 0:
            q = q * (1 - eps) + eps / C
        return -(logp * (q if wb is None else q * wb)).sum(dim)
    assert valid is not None  # internal: class indices always come with their mask
    y = torch.where(valid, target, 0).long()
    loss = -logp.gather(dim, y.unsqueeze(dim)).squeeze(dim)
    if weight is not None:
        loss = loss * weight.gather(0, y.reshape(-1)).reshape(y.shape)
    if eps > 0:
        smooth = -(logp.sum(dim) if wb is None else (logp * wb).sum(dim))
        loss = (1 - eps) * loss + (eps / C) * smooth
    return torch.where(valid, loss, 0.0)


def nll_rows(zt: Tensor, lse: Tensor, target: Tensor, valid: Tensor, weight: Tensor | None,
             dim: int = -1) -> Tensor:
    """``ce_rows`` for class indices without label smoothing, from the log-sum-exp:
    ``w_y (lse - zt_y)``, 0 where not ``valid``; no logits-sized intermediate."""
    y = torch.where(valid, target, 0).long()
    loss = lse - zt.gather(dim, y.unsqueeze(dim)).squeeze(dim)
    if weight is not None:
        loss = loss * weight.gather(0, y.reshape(-1)).reshape(y.shape)
    return torch.where(valid, loss, 0.0)


def loss_lse(lse: Tensor) -> Tensor:
    """The log-sum-exp the loss is computed from: NaN for a row holding +inf or only -inf, where
    stock's log_softmax is NaN (its ``x - max`` is inf - inf), so that such a row's loss is NaN
    as stock's, not +inf (``lse - z_y``). The statistics and the z-loss keep ``lse`` itself
    (+-inf: the log-sum-exp is what it is). ``lse - lse`` is 0 for a finite lse: finite rows keep
    every bit."""
    return lse + (lse - lse)


def z_loss_rows(lse: Tensor, valid: Tensor | None, coef: float) -> Tensor:
    """``coef * lse^2`` per position, 0 where not ``valid`` (gradient 0 there too)."""
    if valid is None:
        return coef * lse * lse
    safe = torch.where(valid, lse, 0.0)
    return coef * safe * safe


def entropy(logp: Tensor, dim: int = -1) -> Tensor:
    """``-sum_c p_c logp_c`` per position; classes of probability 0 add 0 (not 0 * -inf: the
    clamp turns -inf into the dtype's lowest finite value, and leaves NaN a NaN)."""
    return logp.exp().mul_(logp.clamp(min=torch.finfo(logp.dtype).min)).sum(dim).neg_()


def argmax(z: Tensor, dim: int = -1) -> Tensor:
    """The predicted class: ties to the lowest index (``torch.argmax``). The raw logits give the
    same order as the capped, scaled ones (tanh and a positive scale are increasing), without the
    ties a saturated tanh would add in float32."""
    return torch.argmax(z, dim)


def accuracy(correct: Tensor, valid: Tensor) -> Tensor:
    """0-d float32: correct positions / counted positions (0 / 0 = NaN when none counts)."""
    c = (correct & valid).sum(dtype=torch.float32)
    return c / valid.sum(dtype=torch.float32)


def no_accuracy(device: torch.device) -> Tensor:
    """The accuracy of probability targets: no position has a class label, so none counts (NaN,
    as for an all-ignored batch)."""
    return torch.full((), math.nan, dtype=torch.float32, device=device)


def reduce_z_loss(zl: Tensor | None, valid: Tensor | None, reduction: str, shape: tuple[int, ...],
                  dtype: torch.dtype, device: torch.device) -> Tensor:
    """The z-loss term, reduced by the call's reduction, in ``dtype``: ``"mean"`` divides by the
    number of counted positions (non-ignored; every position for probability targets), never by
    class weights; ``"sum"`` sums; ``"none"`` keeps it per position (0 at ignored positions).
    ``zl`` None (``z_loss=0``): zeros of the loss's shape."""
    if zl is None:
        return torch.zeros(shape if reduction == "none" else (), dtype=dtype, device=device)
    if reduction == "none":
        return zl.to(dtype)
    total = zl.sum(dtype=dtype)
    if reduction == "sum":
        return total
    count = zl.numel() if valid is None else valid.sum()
    return total / count


def loss_bound(ex: Extras, num_classes: int, prob: bool, weighted: bool) -> float:
    """An upper bound on one position's loss (cross-entropy + z-loss term), or inf.

    With a softcap the capped, scaled logits lie in [-s, s], s = softcap / temperature, so
    lse <= s + ln C and lse - zt_c <= 2 s + ln C: with class indices and no class weight (label
    smoothing averages such terms) a position's loss is at most 2 s + ln C + z_loss (s + ln C)^2.
    Class weights and probability targets scale it by values the host does not read: no bound.
    """
    if ex.softcap is None or prob or weighted:
        return math.inf
    s = ex.softcap / ex.temperature
    ln_c = math.log(max(num_classes, 1))
    return 2 * s + ln_c + ex.z_loss * (s + ln_c) ** 2


# ------------------------------------------------------------------ hand-written gradients


_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def batched(*grads: Tensor | None) -> bool:
    """An upstream gradient of a batched backward (``torch.autograd.grad(...,
    is_grads_batched=True)``, ``jacobian`` / ``hessian`` with ``vectorize=True``): the backward
    formulas cannot multiply it into their own buffers in place, so the backward functions take
    their differentiable formulas instead (without a graph)."""
    if torch.compiler.is_compiling():  # (Dynamo cannot trace the test; no legacy vmap there)
        return False
    return any(g is not None and _legacy_batched(g) for g in grads)


def scaled(p: Tensor, f: Tensor) -> Tensor:
    """``p.mul_(f)``, out of place where ``f`` is batched (``p`` is not: vmap cannot write into it)."""
    return p * f if not torch.compiler.is_compiling() and _legacy_batched(f) else p.mul_(f)


def index_grad(p: Tensor, y_local: Tensor, owned: Tensor, valid: Tensor, w_y: Tensor | None,
               w_local: Tensor | None, w_sum: float | Tensor, eps: float, num_classes: int,
               g_ce: Tensor, g_zl: Tensor | None, lse: Tensor, coef: float) -> Tensor:
    """d loss / d zt for class-index targets, classes in dim 1 ((rows, C) or (N, C, d1..dK)),
    over all C classes (one device, a chunk's tile) or one rank's slice of them. ``p``: softmax
    over all C classes, restricted to these, *overwritten* with the result; ``y_local``: the
    target's index among these classes where ``owned``; row vectors have the positions' shape.

    cross-entropy: g_ce (A p - (1 - eps) w_y e_y - (eps / C) w), A = (1 - eps) w_y + (eps / C) W;
    z-loss: g_zl 2 coef lse p. Positions not ``valid``: exactly 0.
    """
    gv = torch.where(valid, g_ce, 0.0)
    hot = (1 - eps) * (w_y if w_y is not None else 1.0)
    row = gv * (hot + (eps / num_classes) * w_sum)
    if g_zl is not None and coef:
        row = row + torch.where(valid, g_zl * (2 * coef) * lse, 0.0)
    d = scaled(p, row.unsqueeze(1))
    if eps > 0:
        smooth = (gv * (eps / num_classes)).unsqueeze(1)
        d.sub_(smooth * _along(w_local, 1, d.dim()) if w_local is not None else smooth)
    if d.shape[1]:
        d.scatter_add_(1, y_local.unsqueeze(1), -(gv * hot * owned).unsqueeze(1))
    # 0 * NaN is NaN: a NaN or inf row that is not counted still gets exactly 0
    return d.masked_fill_(~valid.unsqueeze(1), 0.0)


def prob_grad(p: Tensor, logp: Tensor, q: Tensor, weight: Tensor | None, eps: float,
              g_ce: Tensor, g_zl: Tensor | None, lse: Tensor, coef: float,
              need_dq: bool) -> tuple[Tensor, Tensor | None]:
    """(d loss / d zt, d loss / d q) for probability targets q, classes in dim 1 (``p``, the
    softmax, is overwritten): cross-entropy g_ce (p sum_c w_c q'_c - w q'),
    q' = (1 - eps) q + eps / C; z-loss as for class indices; d / dq_c = -g_ce (1 - eps) w_c logp_c."""
    C = p.shape[1]
    wb = None if weight is None else _along(weight, 1, p.dim())
    qq = q.to(p.dtype)
    if eps > 0:
        qq = qq * (1 - eps) + eps / C
    wq = qq if wb is None else qq * wb
    row = g_ce.unsqueeze(1)
    scale = wq.sum(1, keepdim=True) * row
    if g_zl is not None and coef:
        scale = scale + (g_zl * (2 * coef) * lse).unsqueeze(1)
    d = scaled(p, scale).sub_(wq * row)
    dq = None
    if need_dq:
        lw = logp if wb is None else logp * wb
        dq = lw * (row * -(1 - eps))
    return d, dq

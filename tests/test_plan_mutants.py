"""A plan never hides a check: the calls a mutation pass over the plan cache found unguarded.

Each planned signature (``safeloss/core/plan.py``) is compared with the same call made with every
plan forgotten: a *probe* call that differs from the planned calls in one thing the key holds
(a shape, dtype, layout, device, option or its type, the weight, autocast, a TorchFunctionMode),
or that hands the planned signature values its fast path must still judge (softmaxed rows, NaN,
a label out of range, probabilities that are not distributions, memory that is not where the
host path reads it). Its outcome (result, its dtype, type and autograd node, the error and its
message, every warning) must be the outcome of the same probe without a plan.

Then what the planned path itself must keep: the store's bound and eviction order, deferred
findings reported to the loss that made them with what that call saw, the host buffers of clean
records reused, and the probability-target and softmax checks at their tolerances' edges.
"""

from __future__ import annotations

import gc
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import safeloss
from safeloss.backends import dispatch, torch_backend
from safeloss.core import _flags, checks
from safeloss.core import plan as plans
from tests.tolerances import TIGHT

ce = safeloss.cross_entropy
lce = safeloss.linear_cross_entropy
N, C, H = 6, 5, 8


def _x(n: int = N, c: int = C, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).to(dtype)


def _t(n: int = N, c: int = C) -> torch.Tensor:
    return torch.arange(n) % c


def _bad(n: int = N, c: int = C, value: int | None = None) -> torch.Tensor:
    t = _t(n, c)
    t[n // 2] = c + 4 if value is None else value
    return t


def _probs(n: int = N, c: int = C, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, generator=g, dtype=torch.float64).softmax(1).to(dtype)


def _sampled_softmax(n: int, c: int = C) -> torch.Tensor:
    """Logits whose rows at the softmax check's sample positions (i * n // 64) are softmaxed and
    whose other rows are large: the mean loss is far outside the band of softmaxed input, which
    settles nothing here (the sample is not every position), and the sample looks softmaxed."""
    x = _x(n, c) * 20
    pos = torch.arange(_flags.SOFTMAX_SAMPLE) * n // _flags.SOFTMAX_SAMPLE
    x[pos] = _x(len(pos), c, seed=3).softmax(1)
    return x


def _head(n: int = N, c: int = C, seed: int = 0, dtype: torch.dtype = torch.float32,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(c, H, generator=g, dtype=torch.float64).to(dtype)
    return h, w, _t(n, c)


# ------------------------------------------------------------------------- the oracle


def _snapshot(out: object, exact: bool = True) -> object:
    """``exact``: with the autograd node's class (a planned linear call is stock's reference
    path, its first call the chunk loop: equal values to fp32 rounding, other nodes)."""
    if isinstance(out, tuple):
        return tuple(_snapshot(o, exact) for o in out)
    if isinstance(out, torch.Tensor):
        node = None if out.grad_fn is None or not exact else type(out.grad_fn).__name__
        values = None if out.is_meta else out.detach().clone()
        return ("tensor", type(out).__name__, out.dtype, tuple(out.shape), out.device.type, node, values)
    return ("object", repr(out))


def _outcome(call: Callable[[], object], exact: bool = True) -> tuple[object, list[tuple[type, str]]]:
    """What ``call`` does from a clean warn-once state: its result (or error), then whatever
    it left pending (deferred findings), and every warning on the way."""
    safeloss.reset_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got: object = ("returned", _snapshot(call(), exact))
            safeloss.check_pending()
        except Exception as e:
            got = ("raised", type(e), str(e))
            checks._pending.clear()
    return got, [(w.category, str(w.message)) for w in caught]


def _same(a: object, b: object, where: str = "outcome", exact: bool = True) -> None:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        rtol, atol = (0.0, 0.0) if exact else TIGHT.get(a.dtype, (0.0, 0.0))
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{where}: {m}")
        return
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        assert len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (u, v) in enumerate(zip(a, b)):
            _same(u, v, f"{where}[{i}]", exact)
        return
    assert a == b, f"{where}: {a!r} != {b!r}"


def _planned_as_fresh(plan: Callable[[], object], probe: Callable[[], object], k: int = 2,
                      plannable: bool = True, exact: bool = True) -> None:
    """``probe`` after ``k`` calls of ``plan`` gives what it gives with no plan. ``plannable``:
    those calls store a plan (checked: else the comparison proves nothing); False for signatures
    that must never have one. ``exact``: see ``_snapshot``."""
    plans.clear()
    before = plans.stats["stored"]
    for _ in range(k):
        plan()
    if plannable:
        assert plans.stats["stored"] > before, "the planned calls must store a plan"
    planned = _outcome(probe, exact)
    plans.clear()
    checks._pending.clear()
    fresh = _outcome(probe, exact)
    _same(planned, fresh, exact=exact)


@pytest.fixture(autouse=True)
def _no_pending_left() -> Any:
    checks._pending.clear()
    yield
    checks._pending.clear()


# ------------------------------------------------- cross_entropy: each part of the signature

def _meta(t: torch.Tensor) -> torch.Tensor:
    return t.to("meta")


W = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])


def _triton_inplace(ib: bool, fg: bool = False) -> Callable[[], object]:
    """A Triton call on a non-leaf whose backward may write the gradient into its storage."""
    def call() -> object:
        leaf = _x().requires_grad_()
        x = leaf * 1.0
        out = ce(x, _t(), reduction="sum", backend="triton", inplace_backward=ib, fused_grad=fg)
        out.backward()
        return out, leaf.grad, x.detach()
    return call


def _triton_edited(fg: bool) -> Callable[[], object]:
    """A Triton call whose logits the caller edits in place before backward: the fused
    gradient was computed in forward (backward works), the plain one needs the logits as they
    were (autograd's in-place error)."""
    def call() -> object:
        leaf = _x().requires_grad_()
        x = leaf * 1.0
        out = ce(x, _t(), reduction="sum", backend="triton", fused_grad=fg)
        with torch.no_grad():
            x.add_(1.0)
        out.backward()
        return out, leaf.grad
    return call


# (plan, probe): the probe differs from the planned calls in the one part the id names.
CE_SIGNATURE = {
    "batch-size": (lambda: ce(_x(), _t()), lambda: ce(_sampled_softmax(200), _t(200))),
    "classes-softmaxed": (lambda: ce(_x(), _t()), lambda: ce(_x(N, 7).softmax(1), _t(N, 7))),
    "classes-bad-label": (lambda: ce(_x(), _t()), lambda: ce(_x(N, 7), _bad(N, 7))),
    "input-layout": (lambda: ce(_x(), _t()), lambda: ce(_x().to_sparse(), _t())),
    "input-dtype-f64": (lambda: ce(_x(), _t()), lambda: ce(_x(dtype=torch.float64).softmax(1), _t())),
    "input-dtype-f16": (lambda: ce(_x(), _t()), lambda: ce(_x().softmax(1).half(), _t())),
    "input-device": (lambda: ce(_x(), _t()), lambda: ce(_meta(_x()), _t())),
    "target-batch": (lambda: ce(_x(), _t()), lambda: ce(_x(), _t(3))),
    "target-column": (lambda: ce(_x(), _t()), lambda: ce(_x(), _t().unsqueeze(1))),
    "target-layout": (lambda: ce(_x(), _t()), lambda: ce(_x(), _t().to_sparse())),
    "target-int32": (lambda: ce(_x(), _t()), lambda: ce(_x(), _t().int())),
    "target-int32-bad": (lambda: ce(_x(), _t().int()), lambda: ce(_x(), _bad().int())),
    "target-device": (lambda: ce(_x(), _t()), lambda: ce(_x(), _meta(_t()))),
    "weight-added": (lambda: ce(_x(), _t()), lambda: ce(_x(), _t(), W.double())),
    "weight-added-shape": (lambda: ce(_x(), _t()), lambda: ce(_x(), _t(), torch.ones(C + 1))),
    "weight-shape": (lambda: ce(_x(), _t(), W), lambda: ce(_x(), _t(), torch.ones(C + 1))),
    "weight-layout": (lambda: ce(_x(), _t(), W), lambda: ce(_x(), _t(), W.to_sparse())),
    "weight-dtype": (lambda: ce(_x(), _t(), W), lambda: ce(_x(), _t(), W.double())),
    "weight-device": (lambda: ce(_x(), _t(), W), lambda: ce(_x(), _t(), _meta(W))),
    "weight-values": (lambda: ce(_x(), _t(), torch.ones(C)), lambda: ce(_x(), _t(), W)),
    "weight-requires-grad": (lambda: ce(_x(), _t(), W), lambda: ce(_x(), _t(), W.clone().requires_grad_())),
    "ignore-index": (lambda: ce(_x(), _t()), lambda: ce(_x(), _t(), ignore_index=0)),
    "reduction": (lambda: ce(_x(), _t()), lambda: ce(_x(), _t(), reduction="sum")),
    "reduction-none": (lambda: ce(_x(), _t()), lambda: ce(_x(), _t(), reduction="none")),
    "label-smoothing": (lambda: ce(_x(), _t()), lambda: ce(_x(), _t(), label_smoothing=0.3)),
    "backend": (lambda: ce(_x(), _t()), lambda: ce(_x(), _t(), backend="tpu")),
    "inplace-backward": (lambda: ce(_x(), _t()), lambda: ce(_x(), _t(), inplace_backward=True)),
    "fused-grad": (lambda: ce(_x(), _t()), lambda: ce(_x(), _t(), fused_grad=True)),
    "option-ignore-index": (lambda: ce(_x(), _t(), ignore_index=1),
                            lambda: ce(_x(), _t(), ignore_index=2)),
    "option-ignore-index-type": (lambda: ce(_x(), _t(), ignore_index=0),
                                 lambda: ce(_x(), _t(), ignore_index=False)),
    "option-reduction": (lambda: ce(_x(), _t(), reduction="sum"),
                         lambda: ce(_x(), _t(), reduction="none")),
    "option-label-smoothing": (lambda: ce(_x(), _t(), label_smoothing=0.1),
                               lambda: ce(_x(), _t(), label_smoothing=0.4)),
    "option-label-smoothing-type": (lambda: ce(_x(), _t(), label_smoothing=0),
                                    lambda: ce(_x(), _t(), label_smoothing=False)),
    "option-backend": (lambda: ce(_x(), _t(), backend="torch"),
                       lambda: ce(_x(), _t(), backend="tpu")),
    "option-inplace-backward": (_triton_inplace(False), _triton_inplace(True)),
    "option-fused-grad": (_triton_inplace(False), _triton_edited(True)),
    "option-fused-grad-off": (_triton_inplace(False, True), _triton_edited(False)),
}


@pytest.mark.parametrize("case", sorted(CE_SIGNATURE))
def test_a_probe_that_differs_in_one_part_of_the_signature_is_not_served_by_its_plan(case: str) -> None:
    plan, probe = CE_SIGNATURE[case]
    _planned_as_fresh(plan, probe)


def test_a_weight_that_requires_grad_is_its_own_signature_in_grad_mode() -> None:
    """A weight that requires grad is fine with grad mode off and an error with it on (index
    targets): the plan made under no_grad must not serve the grad-mode call."""
    w = W.clone().requires_grad_()

    def plan() -> object:
        with torch.no_grad():
            return ce(_x(), _t(), w)

    _planned_as_fresh(plan, lambda: ce(_x(), _t(), w))


def test_a_plan_made_outside_a_function_mode_does_not_serve_calls_under_it() -> None:
    class Override(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            if getattr(func, "__name__", None) == "cross_entropy":
                return out * 0 + 42.0
            return out

    def probe() -> object:
        with Override():
            return ce(_x(), _t())

    _planned_as_fresh(lambda: ce(_x(), _t()), probe)


def test_a_plan_made_outside_autocast_does_not_serve_calls_under_it() -> None:
    """bfloat16 logits: cross_entropy is one of autocast's float32 ops."""
    def probe() -> object:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ce(_x(dtype=torch.bfloat16), _t(), backend="triton")

    _planned_as_fresh(lambda: ce(_x(dtype=torch.bfloat16), _t(), backend="triton"), probe)


def test_a_plan_made_under_another_devices_autocast_does_not_serve_cpu_autocast(autocast_or_skip) -> None:
    """Autocast for XPU changes nothing for CPU tensors (the plan made there is a plain one);
    the CPU's own autocast is another signature (the Triton path's result dtype follows it)."""
    def call(device: str) -> object:
        with autocast_or_skip(device):
            return ce(_x(dtype=torch.bfloat16), _t(), backend="triton")

    _planned_as_fresh(lambda: call("xpu"), lambda: call("cpu"))


def test_a_plan_is_not_taken_under_a_fake_tensor_mode() -> None:
    """Real tensors under a FakeTensorMode that admits them (what export-style tracers do with
    constants): the abstract result, as without a plan, never the host path's value read."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def probe() -> object:
        x, t = _x(), _t()  # real tensors, made before the mode
        with FakeTensorMode(allow_non_fake_inputs=True):
            out = ce(x, t)
        return type(out).__name__, out.shape, out.dtype

    _planned_as_fresh(lambda: ce(_x(), _t()), probe)


def test_a_plan_is_not_taken_by_a_jit_trace() -> None:
    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ce(a, b)

    def graph() -> list[str]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(f, (_x(), _t()), check_trace=False)
        return [n.kind() for n in traced.graph.nodes()]

    for _ in range(2):
        ce(_x(), _t())
    planned = graph()
    plans.clear()
    assert planned == graph()


def test_a_plan_is_not_taken_under_vmap() -> None:
    probe = lambda: torch.func.vmap(lambda a, b: ce(a, b, reduction="sum"))(_x().unsqueeze(1), _t().unsqueeze(1))  # noqa: E731
    # the per-example signature: (1, C) logits and (1,) labels
    _planned_as_fresh(lambda: ce(_x(1), _t(1), reduction="sum"), probe)


def test_a_tensor_subclass_is_not_served_by_the_plan_of_plain_tensors() -> None:
    class Tagged(torch.Tensor):
        pass

    probe = lambda: ce(_x().as_subclass(Tagged), _t())  # noqa: E731
    _planned_as_fresh(lambda: ce(_x(), _t()), probe)


def test_fx_tracing_a_planned_signature_records_only_the_call() -> None:
    for _ in range(2):
        ce(_x(), _t())
    gm = torch.fx.symbolic_trace(lambda a, b: ce(a, b))
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "placeholder", "call_function", "output"]


# ------------------------------------------------- cross_entropy: values under a planned signature

def _nan(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[1, 2] = math.nan
    return x


def _neg_view(x: torch.Tensor, contiguous: bool = False) -> torch.Tensor:
    """``x`` as a tensor with the negative bit: its memory holds -x. ``z.conj().imag`` (public,
    every other float in memory), or contiguous (``torch._neg_view``: what a host read of a
    row at ``data_ptr`` with unit stride would misread)."""
    v = torch._neg_view(-x) if contiguous else torch.complex(torch.zeros_like(x), -x).conj().imag
    assert v.is_neg() and torch.equal(v, x) and (v.stride(-1) == 1) == contiguous
    return v


def _one_hot_input(n: int = N, c: int = C) -> torch.Tensor:
    """One-hot rows as logits (softmax-like: entries in [0, 1] summing to 1), with the first
    entry of the first row exactly 0.0; its loss lies at the low edge of the band."""
    return F.one_hot(_t(n, c), c).float().roll(1, 1)


def _rows_sum_to(s: float, n: int = N, c: int = C) -> torch.Tensor:
    p = _probs(n, c, seed=5, dtype=torch.float64)
    return (p * s).float()


def _f16_rows() -> torch.Tensor:
    """float16 rows summing (in float32) to 0.98010254, within the float16 softmax tolerance of
    1, whose sum rounded to float16 (0.97998) is not: every backend sums rows in float32."""
    row = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0426], dtype=torch.float16)
    assert abs(float(row.sum(dtype=torch.float32)) - 1) <= _flags.SOFTMAX_SUM_TOL["float16"]
    assert abs(float(row.sum(dtype=torch.float16)) - 1) > _flags.SOFTMAX_SUM_TOL["float16"]
    return row.repeat(N, 1)


def _odd_rows_negative_first(n: int = 128, c: int = C) -> torch.Tensor:
    """Transposed storage: the first C values in memory are the first logits of rows 0..C-1,
    and rows 1, 3, ... (never sampled at 128 positions) start with a negative logit."""
    x = _sampled_softmax(n, c)
    x[1::2, 0] = -5.0
    return x.t().contiguous().t()


def _kd_sampled_softmax() -> torch.Tensor:
    """(2, C, 64) logits softmaxed over the classes, except position (0, 1), which the sample of
    128 positions skips; position (0, 0)'s row starts the memory of a contiguous tensor."""
    x = _x(2 * 64, C).reshape(2, 64, C).softmax(2).transpose(1, 2).contiguous()
    x[0, :, 1] = -3.0
    return x


def _raising(call: Callable[[], object]) -> None:
    """A call whose values raise (after its signature's plan was stored)."""
    with pytest.raises(safeloss.SafeLossError):
        call()


CPU_VALUE_PROBES: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
    "softmaxed": (lambda: ce(_x(), _t()), lambda: ce(_x().softmax(1), _t())),
    "softmaxed-strict": (lambda: ce(_x(), _t()), lambda: ce(_x().softmax(1), _t(), strict=True)),
    "softmaxed-sum": (lambda: ce(_x(), _t(), reduction="sum"), lambda: ce(_x().softmax(1), _t(), reduction="sum")),
    "softmaxed-none": (lambda: ce(_x(), _t(), reduction="none"),
                       lambda: ce(_x().softmax(1), _t(), reduction="none")),
    "softmaxed-many-rows": (lambda: ce(_x(200), _t(200)), lambda: ce(_sampled_softmax(200), _t(200))),
    "softmaxed-f64": (lambda: ce(_x(dtype=torch.float64), _t()),
                      lambda: ce(_x(dtype=torch.float64).softmax(1), _t())),
    "softmaxed-neg-view": (lambda: ce(_x(), _t()), lambda: ce(_neg_view(_x().softmax(1)), _t())),
    "softmaxed-neg-view-contiguous": (lambda: ce(_x(), _t()), lambda: ce(_neg_view(_x().softmax(1), True), _t())),
    "softmaxed-neg-view-many-rows": (lambda: ce(_x(200), _t(200)),
                                     lambda: ce(_neg_view(_sampled_softmax(200)), _t(200))),
    "one-hot-as-logits": (lambda: ce(_x(), _t()), lambda: ce(_one_hot_input(), _t())),
    "one-hot-as-logits-many-rows": (lambda: ce(_x(200), _t(200)), lambda: ce(_one_hot_input(200), _t(200))),
    "rows-at-the-tolerance": (lambda: ce(_x(200), _t(200)), lambda: ce(_rows_sum_to(1 + 6e-5, 200), _t(200))),
    "rows-past-the-tolerance": (lambda: ce(_x(200), _t(200)), lambda: ce(_rows_sum_to(1 + 3e-4, 200), _t(200))),
    "float16-rows-near-the-tolerance": (lambda: ce(_x(dtype=torch.float16), _t()), lambda: ce(_f16_rows(), _t())),
    "transposed-storage": (lambda: ce(_x(128), _t(128)), lambda: ce(_odd_rows_negative_first(), _t(128))),
    "k-dim-softmaxed": (lambda: ce(_x(2 * 64, C).reshape(2, C, 64), _t(128).reshape(2, 64)),
                        lambda: ce(_kd_sampled_softmax(), _t(128).reshape(2, 64))),
    "nan-mean": (lambda: ce(_x(), _t()), lambda: ce(_nan(_x()), _t())),
    "nan-none": (lambda: ce(_x(), _t(), reduction="none"), lambda: ce(_nan(_x()), _t(), reduction="none")),
    "bad-label": (lambda: ce(_x(), _t()), lambda: ce(_x(), _bad())),
    "label-smoothing-values": (lambda: ce(_x(), _t(), label_smoothing=0.2),
                               lambda: ce(_x(seed=4), _t(), label_smoothing=0.2)),
    "ignore-index-values": (lambda: ce(_x(), _t(), ignore_index=0), lambda: ce(_x(seed=4), _t(), ignore_index=0)),
    "int32-labels": (lambda: ce(_x(), _t().int()), lambda: ce(_x(seed=4), _t().int())),
    "one-class": (lambda: _raising(lambda: ce(_x(N, 1), torch.ones(N, dtype=torch.long))),
                  lambda: ce(_x(N, 1), torch.zeros(N, dtype=torch.long))),
    "empty-batch-sum": (lambda: ce(_x(0), _t(0), reduction="sum"), lambda: ce(_x(0), _t(0), reduction="sum")),
    "weighted-negative": (lambda: ce(_x(), _t(), W), lambda: ce(_x(), _t(), -W)),
    "weighted-nan": (lambda: ce(_x(), _t(), W), lambda: ce(_nan(_x()), _t(), W)),
    "uint64-labels": (lambda: ce(_x(), _t().to(torch.uint64)),
                      lambda: ce(_x(), torch.tensor([0, 1, 2, 2**63 + 1, 4, 0], dtype=torch.uint64))),
    "unbatched-label-of-shape-1": (lambda: ce(_x()[0], _t()[:1], reduction="none"),
                                   lambda: ce(_x()[1].softmax(0), _t()[1:2], reduction="none")),
    "weight-of-shape-1-by-C": (lambda: ce(_x(), _t(), W.reshape(1, C)), lambda: ce(_x(seed=4), _t(), W.reshape(1, C))),
    "prob-negative": (lambda: ce(_x(), _probs()), lambda: ce(_x(), _probs() * 2 - _probs(seed=2))),
    "prob-bad-sum": (lambda: ce(_x(), _probs()), lambda: ce(_x(), _probs() * 1.5)),
    "prob-nan": (lambda: ce(_x(), _probs()), lambda: ce(_x(), _nan(_probs()))),
}


# No plan for these: one class (a finding that depends on the labels), no positions, and the
# calls whose tensors the checks replace without a finding (uint64 labels read as int64, a (1,)
# label of unbatched logits, a (1, C) weight): a plan would hand stock's op the tensors as given.
UNPLANNABLE = {"one-class", "empty-batch-sum", "uint64-labels", "unbatched-label-of-shape-1",
               "weight-of-shape-1-by-C"}


@pytest.mark.parametrize("case", sorted(CPU_VALUE_PROBES))
def test_bad_values_under_a_planned_signature_are_judged_as_without_a_plan(case: str) -> None:
    plan, probe = CPU_VALUE_PROBES[case]
    _planned_as_fresh(plan, probe, plannable=case not in UNPLANNABLE)


def test_the_one_hot_and_negative_view_probes_are_findings() -> None:
    """The probes above must be findings without a plan (else comparing proves nothing)."""
    for x, t in ((_one_hot_input(), _t()), (_neg_view(_x().softmax(1)), _t()), (_f16_rows(), _t()),
                 (_rows_sum_to(1 + 6e-5, 200), _t(200)), (_odd_rows_negative_first(), _t(128)),
                 (_kd_sampled_softmax(), _t(128).reshape(2, 64)), (_sampled_softmax(200), _t(200))):
        with pytest.warns(safeloss.SafeLossWarning, match="looks already softmaxed"):
            ce(x, t)
        safeloss.reset_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ce(_rows_sum_to(1 + 3e-4, 200), _t(200))


def test_one_class_labels_that_raise_still_store_no_plan_that_hides_the_warning() -> None:
    """One output and a label 1: the out-of-range error; the next call, labels all 0, is the
    single-class warning, as without a plan."""
    with pytest.raises(safeloss.TargetOutOfRangeError):
        ce(_x(N, 1), torch.ones(N, dtype=torch.long))
    with pytest.warns(safeloss.SafeLossWarning, match="single class"):
        ce(_x(N, 1), torch.zeros(N, dtype=torch.long))


def test_rows_at_the_softmax_bands_edges_are_findings() -> None:
    """One-hot rows as logits (softmax-like) give a mean loss exactly at the band's edges:
    log(C - 1 + e) - 1 on the target (its low edge), log(C - 1 + e) off it (its high edge), and
    above the high edge for rows summing to 1 + d within the tolerance. Every one must reach
    the sample, planned or not."""
    on_target = F.one_hot(_t(), C).float()
    above = _one_hot_input()
    above[torch.arange(N), (_t() + 2) % C] = 9e-5  # rows summing to 1 + 9e-5: above the high edge
    cases = [on_target, _one_hot_input(), above]
    for x in cases:
        for _ in range(3):  # the first call stores the plan, the others take it
            with pytest.warns(safeloss.SafeLossWarning, match="looks already softmaxed"):
                ce(x, _t())
            safeloss.reset_warnings()


# ------------------------------------------------- cross_entropy: the paths a planned call takes

def test_a_planned_triton_call_keeps_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton backend's planned call (the interpreter on CPU) builds its problem from the
    plan: ignore_index, label smoothing and the promoted result dtype of float64 probabilities."""
    probes = [
        lambda: ce(_x(seed=4), _t(), ignore_index=0, backend="triton"),
        lambda: ce(_x(seed=4), _t(), label_smoothing=0.2, backend="triton"),
        lambda: ce(_x(seed=4), _probs(dtype=torch.float64), backend="triton"),
    ]
    plans_ = [
        lambda: ce(_x(), _t(), ignore_index=0, backend="triton"),
        lambda: ce(_x(), _t(), label_smoothing=0.2, backend="triton"),
        lambda: ce(_x(), _probs(dtype=torch.float64), backend="triton"),
    ]
    for plan, probe in zip(plans_, probes):
        _planned_as_fresh(plan, probe)
    for deferred in (False, True):
        monkeypatch.setattr(checks, "DEFER_ON_CPU", deferred)
        _planned_as_fresh(_triton_inplace(True), _triton_inplace(True))
        _planned_as_fresh(_triton_edited(True), _triton_edited(True))


def test_a_triton_plan_is_not_taken_once_the_interpreter_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRITON_INTERPRET is read per call: a plan made with it on does not run the kernels on CPU
    tensors once it is off (the full path's BackendError says how to turn it on)."""
    for _ in range(2):
        ce(_x(), _t(), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(safeloss.BackendError, match="TRITON_INTERPRET=1"):
        ce(_x(), _t(), backend="triton")


def test_the_planned_cpu_call_is_the_host_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A planned clean CPU call is stock's op and the host path's checks: never the backend
    dispatch nor the full immediate path (what makes a planned call cost ~10 us)."""
    for _ in range(2):
        ce(_x(), _t())

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a planned clean CPU call reached the full path")

    monkeypatch.setattr(dispatch, "row_losses", refuse)
    monkeypatch.setattr(torch_backend, "_immediate", refuse)
    torch.testing.assert_close(ce(_x(seed=4), _t()), F.cross_entropy(_x(seed=4), _t()), rtol=0, atol=0)


def test_findings_of_planned_calls_warn_once_per_loss() -> None:
    """Two losses at one call site: each warns once (a loss's warnings are its own), planned or not."""
    losses = [safeloss.SafeCrossEntropyLoss(), safeloss.SafeCrossEntropyLoss()]
    for m in losses:
        for _ in range(2):
            m(_x(), _t())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            for m in losses:
                m(_nan(_x()), _t())
    assert len([w for w in caught if issubclass(w.category, safeloss.SafeLossWarning)]) == 2


@pytest.mark.parametrize("api", ["functional", "module"])
@pytest.mark.parametrize("extra", ["softcap", "temperature", "z_loss", "return_stats", "size_average"])
def test_extras_and_legacy_arguments_never_take_a_plain_plan(api: str, extra: str) -> None:
    """The LLM / RL extras and the legacy reduction arguments are not in the key: such calls
    must never take (nor store) the plain signature's plan."""
    value: object = {"softcap": 2.0, "temperature": 2.0, "z_loss": 0.1, "return_stats": True,
                     "size_average": False}[extra]
    if api == "module" and extra == "size_average":
        pytest.skip("the module takes size_average at construction only")

    def call(**kw: object) -> object:
        if api == "functional":
            return ce(_x(seed=4), _t(), **kw)
        return safeloss.SafeCrossEntropyLoss(**kw)(_x(seed=4), _t())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # size_average's deprecation
        _planned_as_fresh(lambda: call(), lambda: call(**{extra: value}))
        plans.clear()
        # and a plan such a call might store must not serve the plain call
        for _ in range(2):
            call(**{extra: value})
        _planned_as_fresh(lambda: call(), lambda: call(), plannable=False)


# ---------------------------------------------------------------------- the store itself

def test_the_store_keeps_the_newest_plans_up_to_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plans, "MAX_PLANS", 3)
    for n in range(1, 6):
        ce(_x(n), _t(n))
    assert plans.size() == 3
    stored = plans.stats["stored"]
    for n in (3, 4, 5):  # the newest three: planned
        ce(_x(n), _t(n))
    assert plans.stats["stored"] == stored
    ce(_x(1), _t(1))  # the oldest was dropped: stored again, and the store stays at its bound
    assert plans.stats["stored"] == stored + 1 and plans.size() == 3


def test_numpy_integer_options_are_planned() -> None:
    np = pytest.importorskip("numpy")
    for _ in range(3):
        torch.testing.assert_close(ce(_x(), _t(), ignore_index=np.int64(0)), F.cross_entropy(_x(), _t(), ignore_index=0))
    assert plans.size() == 1


# ------------------------------------------------------------- deferred findings (CUDA's model)

@pytest.fixture
def deferred(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(checks, "DEFER_ON_CPU", True)
    return monkeypatch


def test_a_finding_deferred_before_the_cpu_went_immediate_is_reported_by_the_planned_call(deferred) -> None:  # type: ignore[no-untyped-def]
    deferred.setattr(checks, "DEFER_ON_CPU", False)
    for _ in range(2):
        ce(_x(), _t())
    deferred.setattr(checks, "DEFER_ON_CPU", True)
    ce(_x(), _bad())  # deferred: NaN now, the error at the next call
    deferred.setattr(checks, "DEFER_ON_CPU", False)
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"9 at \[3\]"):
        ce(_x(), _t())


def test_a_planned_weighted_call_defers_its_findings(deferred) -> None:  # type: ignore[no-untyped-def]
    for _ in range(2):
        ce(_x(), _t(), W)
    out = ce(_x(), _bad(), W)
    assert math.isnan(out.item())
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"9 at \[3\]"):
        ce(_x(), _t(), W)


def test_a_planned_module_call_defers_to_its_own_loss(deferred) -> None:  # type: ignore[no-untyped-def]
    m = safeloss.SafeCrossEntropyLoss()
    for _ in range(2):
        m(_x(), _t())
        ce(_x(), _t())
    m(_x(), _bad())
    ce(_x(), _t())  # another loss: not its finding
    ce(_x(), _t())
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"9 at \[3\]"):
        m(_x(), _t())


@pytest.mark.parametrize("own_record", [False, True])
def test_a_planned_call_reports_what_a_collected_loss_left(deferred, own_record: bool) -> None:  # type: ignore[no-untyped-def]
    """A loss garbage-collected with a finding pending: the next call of any loss reports it
    (planned or not, with a clean record of its own pending or not)."""
    for _ in range(2):
        ce(_x(), _t())
    safeloss.check_pending()
    if own_record:
        ce(_x(), _t())
    m = safeloss.SafeCrossEntropyLoss()
    m(_x(), _bad())
    del m
    gc.collect()
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)no longer exists.*9 at \[3\]"):
        ce(_x(), _t())


def test_the_report_names_the_labels_the_call_saw(deferred) -> None:  # type: ignore[no-untyped-def]
    """The caller refills its label buffer before the deferred report (static CUDA buffers)."""
    labels = _bad()
    for _ in range(2):
        ce(_x(), _t())
    ce(_x(), labels)
    labels.copy_(_t())
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"9 at \[3\]"):
        ce(_x(), labels)


@pytest.mark.parametrize("reader", ["next-call", "check_pending"])
def test_clean_records_give_their_host_buffers_back(deferred, reader: str) -> None:  # type: ignore[no-untyped-def]
    """A clean record's host buffers (pinned memory on CUDA: slow to allocate) serve the next
    record, whoever read it."""
    checks._free_host.clear()
    ce(_x(), _t())
    first = checks._pending[checks.FUNCTIONAL_KEY][0].bufs
    if reader == "check_pending":
        safeloss.check_pending()
    ce(_x(), _t())
    assert checks._pending[checks.FUNCTIONAL_KEY][-1].bufs[0] is first[0]


def test_a_nan_mean_with_nothing_counted_is_reported(deferred) -> None:  # type: ignore[no-untyped-def]
    """Every label ignored: a NaN mean and no count; the next call says why."""
    ignored = torch.full((N,), -100)
    for _ in range(2):
        ce(_x(), _t())
    assert math.isnan(ce(_x(), ignored).item())
    with pytest.warns(safeloss.SafeLossWarning, match="ignore"):
        ce(_x(), _t())


# ------------------------------------------------------------------ linear + cross-entropy

def _l(**kw: object) -> Callable[[], object]:
    """A linear + cross-entropy call on fresh tensors (seed 0: the planned calls' values)."""
    seed = kw.pop("seed", 0)
    n = kw.pop("n", N)
    c = kw.pop("c", C)

    target = kw.pop("target", None)

    def call() -> object:
        h, w, t = _head(n, c, seed=seed)  # type: ignore[arg-type]
        return lce(h, w, t if target is None else target(), **kw)  # type: ignore[operator]
    return call


LINEAR_SIGNATURE = {
    "target-batch": (_l(), _l(target=lambda: _t(3))),
    "bias-shape": (_l(), _l(linear_bias=torch.zeros(1))),
    "bias-broadcast": (_l(linear_bias=torch.zeros(C)), _l(linear_bias=torch.zeros(1))),
    "reduction": (_l(), _l(reduction="sum")),
    "reduction-none": (_l(), _l(reduction="none")),
    "ignore-index": (_l(), _l(ignore_index=0)),
    "label-smoothing": (_l(), _l(label_smoothing=0.3)),
    "backend": (_l(), _l(backend="tpu")),
    "option-reduction": (_l(reduction="sum"), _l(reduction="none")),
    "option-ignore-index": (_l(ignore_index=1), _l(ignore_index=2)),
    "option-ignore-index-type": (_l(ignore_index=0), _l(ignore_index=False)),
    "option-label-smoothing": (_l(label_smoothing=0.1), _l(label_smoothing=0.4)),
    "option-label-smoothing-type": (_l(label_smoothing=0), _l(label_smoothing=False)),
    "option-backend": (_l(backend="torch"), _l(backend="tpu")),
    "extras-softcap": (_l(), _l(softcap=2.0)),
    "extras-temperature": (_l(), _l(temperature=2.0)),
    "options-ignored": (_l(label_smoothing=0.1),
                        _l(label_smoothing=0.1, options=torch.nn.LinearCrossEntropyOptions())),
    "values-label-smoothing": (_l(label_smoothing=0.2), _l(label_smoothing=0.2, seed=4)),
    "values-reduction-none": (_l(reduction="none"), _l(reduction="none", seed=4)),
    "values-nan-mean": (_l(), lambda: lce(_nan(_head()[0]), _head()[1], _t())),
    "values-nan-none": (_l(reduction="none"),
                        lambda: lce(_nan(_head()[0]), _head()[1], _t(), reduction="none")),
    "values-prob-bad-sum": (_l(target=lambda: _probs()), _l(target=lambda: _probs() * 1.5)),
    "values-prob-negative": (_l(target=lambda: _probs()), _l(target=lambda: _probs() * 2 - _probs(seed=2))),
    "values-one-class": (lambda: _raising(_l(c=1, target=lambda: torch.ones(N, dtype=torch.long))),
                         _l(c=1, target=lambda: torch.zeros(N, dtype=torch.long))),
}
# One class: a finding that depends on the labels. A head with a bias: no plan yet (the
# validated bias is a reshaped view, never the caller's tensor), compared all the same.
LINEAR_UNPLANNABLE = {"values-one-class", "bias-broadcast"}


@pytest.mark.parametrize("case", sorted(LINEAR_SIGNATURE))
def test_linear_probes_under_a_planned_signature_are_judged_as_without_a_plan(case: str) -> None:
    plan, probe = LINEAR_SIGNATURE[case]
    _planned_as_fresh(plan, probe, plannable=case not in LINEAR_UNPLANNABLE, exact=False)


def _half_head(dtype: torch.dtype, autocast: bool) -> Callable[[], object]:
    """A head the planned path would take in float32 ((N, C) logits within the loop's budget)."""
    def call() -> object:
        g = torch.Generator().manual_seed(3)
        h = torch.randn(32, 64, generator=g).to(dtype).requires_grad_()
        w = (torch.randn(50, 64, generator=g) * 0.3).to(dtype).requires_grad_()
        t = torch.randint(0, 50, (32,), generator=g)
        if not autocast:
            return lce(h, w, t)
        with torch.autocast("cpu", dtype=dtype):
            return lce(h.float(), w.float(), t)
    return call


@pytest.mark.parametrize("autocast", [False, True], ids=["half-inputs", "cpu-autocast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_half_precision_heads_are_never_planned(dtype: torch.dtype, autocast: bool) -> None:
    """The planned path is stock's linear and cross-entropy in the operands' dtype; half-precision
    heads (inputs, or float32 ones under CPU autocast) keep the chunk loop's float32 accumulation:
    a repeated call gives bitwise the result of the first."""
    _planned_as_fresh(_half_head(torch.float32, False), lambda: None)  # planned in float32
    call = _half_head(dtype, autocast)
    _planned_as_fresh(call, call, plannable=False)


def test_linear_heads_too_big_for_the_planned_path_never_make_the_logits(whole_logits: list[int]) -> None:
    """(N, C) logits larger than what the chunk loop keeps for backward: no call makes them."""
    h, w, t = _head(64, 100)
    for _ in range(3):
        torch.testing.assert_close(lce(h, w, t), F.cross_entropy(F.linear(h, w), t))
    assert whole_logits == []


def test_linear_module_options_are_not_served_by_a_plan() -> None:
    """Plans are per signature, not per loss: a module with ``options`` must not take the plan
    an equal module without them stored (stock's warning that the options are ignored)."""
    plain = safeloss.SafeLinearCrossEntropyLoss(H, C, label_smoothing=0.1)
    opt = safeloss.SafeLinearCrossEntropyLoss(H, C, label_smoothing=0.1,
                                              options=torch.nn.LinearCrossEntropyOptions())
    _planned_as_fresh(lambda: plain(_head()[0], _t()), lambda: opt(_head()[0], _t()), exact=False)


def test_linear_under_a_function_mode_is_not_served_by_a_plan_made_outside() -> None:
    class Override(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            return out * 0 + 42.0 if getattr(func, "__name__", None) == "linear" else out

    def probe() -> object:
        with Override():
            return _l()()

    _planned_as_fresh(_l(), probe, exact=False)


def test_linear_planned_calls_under_tools_are_stocks() -> None:
    """jit.trace and vmap of a planned linear signature: what they give without a plan."""
    def traced_graph() -> list[str]:
        h, w, t = _head()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr = torch.jit.trace(lambda a, b, c: lce(a, b, c), (h, w, t), check_trace=False)
        return [n.kind() for n in tr.graph.nodes()]

    for _ in range(2):
        _l()()
    planned = traced_graph()
    plans.clear()
    assert planned == traced_graph()

    def vmapped() -> object:
        h, w, t = _head()
        return torch.func.vmap(lambda a, c: lce(a, w, c, reduction="sum"))(h.unsqueeze(1), t.unsqueeze(1))

    _planned_as_fresh(lambda: lce(_head(1)[0], _head()[1], _t(1), reduction="sum"), vmapped, exact=False)


@pytest.fixture
def whole_logits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the planned path's (N, C) logits: ``linear`` over the whole batch."""
    from safeloss.linear import api

    made: list[int] = []
    real = api._linear

    def linear(*args: object) -> torch.Tensor:
        made.append(1)
        return real(*args)

    monkeypatch.setattr(api, "_linear", linear)
    return made


@pytest.mark.parametrize("change", ["budget", "force-rows", "force-vocab-tile", "half-operands", "bigger-batch",
                                    "more-classes"])
def test_linear_heads_the_plan_does_not_cover_keep_the_chunk_loop(
        change: str, whole_logits: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever was planned, a call whose whole logits exceed the budget (lowered since, or a
    larger batch or vocabulary) or that a chunk-loop hook asks for runs the loop: the (N, C)
    logits never exist, and the result is stock's."""
    from safeloss.linear import chunked

    n, c = 64, 5
    for seed in range(2):
        h, w, t = _head(n, c, seed=seed)
        lce(h, w, t)
    assert plans.size() == 1 and whole_logits == [1]  # the second call took the plan
    if change == "budget":
        monkeypatch.setitem(chunked.BUDGET_BYTES, "cpu", n * c * 4 - 1)
    elif change == "force-rows":
        monkeypatch.setattr(chunked, "FORCE_ROWS", 16)
    elif change == "force-vocab-tile":
        monkeypatch.setattr(chunked, "FORCE_VOCAB_TILE", 2)
    elif change == "half-operands":
        monkeypatch.setattr(chunked, "HALF_OPERANDS_ON_CPU", True)
    elif change == "bigger-batch":
        monkeypatch.setitem(chunked.BUDGET_BYTES, "cpu", n * c * 4)
        n = 4 * n
    else:  # (N, C) * 4 > (N + C) * H: the loop keeps less than the logits would take
        c = 100
    h, w, t = _head(n, c, seed=7)
    got = lce(h, w, t)
    assert whole_logits == [1], "the call made the whole logits"
    torch.testing.assert_close(got, F.cross_entropy(F.linear(h, w), t), rtol=TIGHT[torch.float32][0] * 10,
                               atol=TIGHT[torch.float32][1] * 10)


def test_a_linear_finding_deferred_before_the_cpu_went_immediate_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    for _ in range(2):
        _l()()
    monkeypatch.setattr(checks, "DEFER_ON_CPU", True)
    h, w, _ = _head()
    lce(h, w, _bad())
    monkeypatch.setattr(checks, "DEFER_ON_CPU", False)
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"9 at \[3\]"):
        _l()()


# --------------------------------------------- probability targets and softmax at their edges

def _prob_case(name: str, n: int, c: int) -> torch.Tensor:
    y = _probs(n, c, seed=6)
    if name == "negative-entry":  # a row still summing to 1
        y[3, 0] += 0.5
        y[3, 1] = y[3, 1] - 0.5
    elif name == "nan-entry":
        y[3, 2] = math.nan
    elif name == "sum-off":  # a real mistake: off by far more than a rounding
        y[3] *= 1.05
    elif name == "sum-rounded":  # a half-precision teacher's rounding, upcast: within the tolerance
        y[3] *= 1.005
    elif name == "negative-zeros":  # -0.0 is not negative
        y[:, ::2] = -0.0
        y = y / y.sum(1, keepdim=True)
        assert torch.signbit(y).any()
    elif name == "negative-view":
        y = _neg_view(y)
    elif name == "one-hot":
        y = F.one_hot(_t(n, c), c).float()
    return y


PROB_CASES = {
    "negative-entry": "1 row with negative entries",
    "nan-entry": "1 row with NaN or infinite entries",
    "sum-off": "1 row not summing to 1",
    "sum-rounded": None,
    "negative-zeros": None,
    "negative-view": None,
    "one-hot": None,
}


@pytest.mark.parametrize("shape", [(N, C), (64, 100)], ids=["small", "sign-bit-scan"])
@pytest.mark.parametrize("case", sorted(PROB_CASES))
def test_probability_targets_are_judged_alike_planned_or_not(case: str, shape: tuple[int, int]) -> None:
    """Both host scans (the direct one, and the sign-bit one above PROB_SCAN_AMIN_NUMEL entries),
    on the full path (first call) and the planned one (the next calls)."""
    n, c = shape
    assert (n * c > checks.PROB_SCAN_AMIN_NUMEL) == (shape != (N, C))
    x, y = _x(n, c), _prob_case(case, n, c)
    expected = PROB_CASES[case]
    for _ in range(3):
        safeloss.reset_warnings()
        if expected is None:
            out = ce(x, y)  # the suite turns a SafeLossWarning into an error
            torch.testing.assert_close(out, F.cross_entropy(x, y), rtol=0, atol=0)
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ce(x, y)
            assert any(expected in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert plans.size() == 1


def _row_torch_sums_into_the_tolerance(c: int) -> torch.Tensor | None:
    """A float32 row of non-negative entries whose exact sum is 1 + tol + a little (past the
    softmax tolerance) while torch's float32 sum of it rounds to within the tolerance: where
    the host path's raw read must defer to torch's sum. Searched for (the rounding depends on
    torch's summation order on this CPU); None if none turns up."""
    tol = _flags.SOFTMAX_SUM_TOL["float32"]
    g = torch.Generator().manual_seed(0)
    for _ in range(5000):
        v = torch.rand(c, generator=g, dtype=torch.float64) ** 3
        over = 1 + tol + float(torch.rand((), generator=g, dtype=torch.float64)) * 3e-7
        row = (v / v.sum() * over).float()
        if abs(row.double().sum().item() - 1) > tol and abs(float(row.sum(dtype=torch.float32)) - 1) <= tol:
            return row
    return None


def test_the_raw_row_read_defers_to_torchs_sum_at_the_tolerance() -> None:
    c = 64
    row = _row_torch_sums_into_the_tolerance(c)
    if row is None:
        pytest.skip("torch's float32 sum on this CPU never rounded such a row into the tolerance")
    x = row.repeat(N, 1)
    with pytest.warns(safeloss.SafeLossWarning, match="looks already softmaxed"):
        ce(x, _t(N, c))  # the full path: torch's sums say every row sums to 1
    _planned_as_fresh(lambda: ce(_x(N, c), _t(N, c)), lambda: ce(x, _t(N, c)))


def test_a_clean_looking_record_of_a_call_without_classes_is_reported(deferred) -> None:  # type: ignore[no-untyped-def]
    """No classes, every label ignored, reduction="sum": nothing counted and a finite 0, yet
    the record has a finding to report (no loss to compute)."""
    x, ignored = _x(N, 0), torch.full((N,), -100)
    ce(x, ignored, reduction="sum")
    with pytest.warns(safeloss.SafeLossWarning, match="no classes"):
        ce(x, ignored, reduction="sum")


def test_a_compiled_calls_shape_finding_is_reported_by_the_next_call(deferred) -> None:  # type: ignore[no-untyped-def]
    """A torch.compile'd call defers the findings known from shapes with its record: the next
    call reports them, also where the record counted nothing and holds a finite loss (an empty
    batch summed: no row sampled for the softmax check)."""
    column = _t(0).unsqueeze(1)
    f = torch.compile(lambda a, b: ce(a, b, reduction="sum"), backend="eager")
    f(_x(0), column)
    with pytest.warns(safeloss.SafeLossWarning, match="squeezes the singleton"):
        f(_x(0), column)


# ---------------------------------------- reductions of per-row losses (core/reduction.py)

def _reduction_case(case: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, object]]:
    t = _t()
    t[1] = -100
    if case == "weighted-ignored":
        return _x(), t, {"weight": W}
    if case == "weighted-smoothed-zero-total-weight":  # the labels' classes weigh 0, the others not
        return _x(), torch.zeros(N, dtype=torch.long), {"weight": torch.tensor([0.0, 1, 1, 1, 1]),
                                                        "label_smoothing": 0.1}
    # float16: stock holds the sum in float16 before dividing (inf past 65504)
    n = 1024
    return (_x(n) * 30).half(), _t(n), {}


@pytest.mark.parametrize("path", ["deferred", "triton"])
@pytest.mark.parametrize("case", ["weighted-ignored", "weighted-smoothed-zero-total-weight", "float16-sum-overflow"])
def test_means_reduced_by_safeloss_are_stocks(case: str, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The paths whose per-row losses safeloss reduces itself (the deferred model, the Triton
    backend): stock's denominator, its NaN where nothing is averaged, its float16 overflow."""
    x, t, kw = _reduction_case(case)
    x.requires_grad_()
    want = F.cross_entropy(x, t, **kw)  # type: ignore[arg-type]
    assert case != "float16-sum-overflow" or torch.isinf(want)
    want_grad = torch.autograd.grad(want, x)[0] if x.dtype != torch.float16 else None
    monkeypatch.setattr(checks, "DEFER_ON_CPU", path == "deferred")
    backend = "triton" if path == "triton" else "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", safeloss.SafeLossWarning)  # NaN / inf means are findings
        for _ in range(2):
            got = ce(x, t, backend=backend, **kw)  # type: ignore[arg-type]
            tol = (0.0, 0.0) if want.dtype == torch.float16 else TIGHT[want.dtype]
            torch.testing.assert_close(got, want, rtol=tol[0], atol=tol[1], equal_nan=True)
            if want_grad is not None:  # NaN at every counted position where nothing is averaged
                torch.testing.assert_close(torch.autograd.grad(got, x)[0], want_grad, rtol=tol[0], atol=tol[1],
                                           equal_nan=True)
        checks._pending.clear()


@pytest.mark.parametrize("reader", ["next-call", "module-next-call", "check_pending"])
def test_clean_deferred_records_are_recycled_without_resolving(deferred, reader: str) -> None:  # type: ignore[no-untyped-def]
    """The steady state of a CUDA training loop: each call finds the previous call's record
    finished and clean and recycles it (``checks._clean_single``; ``check_pending()``'s clean
    record), never building its problem nor resolving it. A record's softmax-check sample size
    is a count like the others, but never a finding by itself."""
    loss = safeloss.SafeCrossEntropyLoss()
    call = (lambda s: loss(_x(seed=s), _t())) if reader == "module-next-call" else (lambda s: ce(_x(seed=s), _t()))
    call(0)
    resolved: list[object] = []
    real = checks.resolve
    deferred.setattr(checks, "resolve", lambda *a, **k: resolved.append(a) or real(*a, **k))
    for seed in range(1, 4):
        if reader == "check_pending":
            safeloss.check_pending()
        call(seed)
    safeloss.check_pending()
    assert resolved == []
    # and a record with a finding still reaches it: a count before or after the sample size
    f = loss if reader == "module-next-call" else ce
    for bad, match in ((lambda: f(_x().softmax(1), _t()), "looks already softmaxed"),
                       (lambda: f(_x(), _probs() * 1.5), "not probability distributions")):
        bad()
        with pytest.warns(safeloss.SafeLossWarning, match=match):
            call(5)
    assert resolved

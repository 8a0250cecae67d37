"""linear_cross_entropy: the classes of bugs of issue 19, each a parametrized test written to fail
on the code before the fix, and the tests that kill the "Linear modes" mutant classes.

Classes: a non-finite upstream gradient at ignored positions; backward when only a probability
target requires grad; float16 overflow judged on the value returned; in-place updates between
forward and backward (fail exactly where stock fails); half precision (stock's reference numbers
with ``options=None``, ``acc_policy`` / ``acc_dtype`` as stock's chunked path defines them);
deferred findings in this op's words. Mutant classes: bad labels on the torch.func path, negative
labels on the deferred path, float64 under autocast, ``patch(strict=...)`` on both patched stock
entries, tensor subclasses under ``patch()``.
"""

from __future__ import annotations

import math
import re
import typing
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import safeloss
from safeloss.backends import dispatch
from safeloss.core import checks
from safeloss.core.mode import Mode
from safeloss.linear import api, chunked
from tests.tolerances import TIGHT

STOCK = F.linear_cross_entropy  # captured before any patch()
STOCK_FORWARD = torch.nn.LinearCrossEntropyLoss.__dict__["forward"]
H, C, N = 5, 7, 8
KD = (3,)


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunked, "FORCE_ROWS", 3)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _triton(*before: str, after: tuple[str, ...] = ()) -> object:
    reason = dispatch.triton_unavailable_reason(torch.device("cpu"))
    if reason is None and not before and not after:  # a plain value: grids built with itertools.product
        return "triton"
    return pytest.param(*before, "triton", *after,
                        marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


def _head(shape: str, dtype: torch.dtype = torch.float64, bias: bool = True, seed: int = 0):
    out = KD if shape == "kdim" else ()
    x = torch.randn((N, H) if shape != "1d" else (H,), generator=_g(seed), dtype=dtype)
    W = torch.randn((C, *out, H), generator=_g(seed + 1), dtype=dtype)
    b = torch.randn((C, *out), generator=_g(seed + 2), dtype=dtype) if bias else None
    return x, W, b


def _labels(shape: str, seed: int = 3) -> torch.Tensor:
    out = KD if shape == "kdim" else ()
    lead = (N,) if shape != "1d" else ()
    t = torch.randint(0, C, (*lead, *out), generator=_g(seed))
    if t.dim():
        t.view(-1)[::3] = -100
    else:
        t.fill_(-100)
    return t


def _via(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Run the call through one of the op's paths: eager (the chunk loop's autograd.Function),
    graph (the custom ops of torch.compile / make_fx), transform (the plain differentiable ops)."""
    if path != "eager":
        mode = {"graph": Mode.GRAPH, "transform": Mode.TRANSFORM}[path]
        monkeypatch.setattr(api, "decide", lambda *t: mode)


# ------------------------------------------------------------------------ upstream gradient at ignored positions


# (path, backend, head): every route the upstream gradient of reduction="none" takes
UPSTREAM = [("eager", "torch", "2d"), ("eager", "torch", "kdim"), _triton("eager", after=("2d",)),
            ("graph", "torch", "2d"), ("graph", "torch", "kdim"), ("transform", "torch", "2d"),
            ("transform", "torch", "kdim")]


@pytest.mark.parametrize("path,backend,shape", UPSTREAM)
@pytest.mark.parametrize("extras", ["plain", "weight+smoothing"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_upstream_gradient_at_ignored_positions_is_never_read(
        monkeypatch: pytest.MonkeyPatch, path: str, backend: str, shape: str, extras: str, bad: float) -> None:
    """reduction="none": stock's backward never reads the upstream gradient of an ignored
    position, so NaN/inf there (a torch.where over all-padding rows) must not reach any gradient."""
    _via(monkeypatch, path)
    x, W, b = _head(shape)
    t = _labels(shape)
    kw: dict[str, object] = dict(linear_bias=b, reduction="none")
    if extras != "plain":
        kw |= dict(weight=torch.rand(C, generator=_g(5), dtype=torch.float64) + 0.5, label_smoothing=0.1)
    up = torch.randn(t.shape, generator=_g(6), dtype=torch.float64)
    up[t == -100] = bad
    res = []
    for fn, extra in ((STOCK, {}), (safeloss.linear_cross_entropy, {"backend": backend})):
        leaves = [v.clone().requires_grad_(True) for v in (x, W, b)]
        out = fn(leaves[0], leaves[1], t, **{**kw, "linear_bias": leaves[2]}, **extra)
        res.append(torch.autograd.grad(out, leaves, up))
    for a, c in zip(*res):
        assert torch.isfinite(c).all()
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-11)


def test_per_sequence_mean_over_all_padding_rows_trains_like_stock() -> None:
    """The pattern the issue names: per-sequence means, guarded with torch.where for sequences
    that are all padding (their 0/0 gradient is NaN, at positions that are all ignored)."""
    x, W, b = _head("2d")
    t = _labels("2d").view(2, 4)
    t[1] = -100  # the second sequence is all padding
    res = []
    for fn in (STOCK, safeloss.linear_cross_entropy):
        leaves = [v.clone().requires_grad_(True) for v in (x, W, b)]
        rows = fn(leaves[0], leaves[1], t.reshape(-1), linear_bias=leaves[2], reduction="none").view(2, 4)
        count = (t != -100).sum(1)
        per_seq = torch.where(count > 0, rows.sum(1) / count, 0.0)
        res.append(torch.autograd.grad(per_seq.sum(), leaves))
    for a, c in zip(*res):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, c)


# ------------------------------------------------------------------------ only a probability target requires grad


@pytest.mark.parametrize("path", ["eager", "graph", "transform"])
@pytest.mark.parametrize("shape", ["2d", "1d", "kdim"])
@pytest.mark.parametrize("red", ["mean", "none"])
@pytest.mark.parametrize("extras", ["plain", "weight+smoothing"])
def test_backward_when_only_a_probability_target_requires_grad(
        monkeypatch: pytest.MonkeyPatch, path: str, shape: str, red: str, extras: str) -> None:
    """Distillation into a frozen head, learned soft labels: stock returns d/dtarget."""
    _via(monkeypatch, path)
    x, W, b = _head(shape)
    out = KD if shape == "kdim" else ()
    lead = (N,) if shape != "1d" else ()
    q0 = torch.randn((*lead, C, *out), generator=_g(7), dtype=torch.float64).softmax(0 if shape == "1d" else 1)
    kw: dict[str, object] = dict(linear_bias=b, reduction=red)
    if extras != "plain":
        kw |= dict(weight=torch.rand(C, generator=_g(5), dtype=torch.float64) + 0.5, label_smoothing=0.1)
    res = []
    for fn in (STOCK, safeloss.linear_cross_entropy):
        q = q0.clone().requires_grad_(True)
        loss = fn(x, W, q, **kw)
        up = torch.randn(loss.shape, generator=_g(8), dtype=torch.float64)
        res.append(torch.autograd.grad(loss, [q], up)[0])
    torch.testing.assert_close(res[1], res[0])


# ------------------------------------------------------------------------ float16 overflow, judged on what is returned


def _fp16_case(kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Finite float16 operands. "position": one row's loss is 80000 (inf in float16); "sum": two
    rows of 40000 each (each fits, their sum does not); "fine": every value fits."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float16)
    big = {"position": 40000.0, "sum": 20000.0, "fine": 2.0}[kind]
    W = torch.tensor([[big, 0.0], [-big, 0.0], [0.0, 0.0]], dtype=torch.float16)
    t = torch.tensor([1, 1 if kind == "sum" else 2, 0, -100])
    if kind == "sum":
        x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float16)
    return x, W, t


@pytest.mark.parametrize("kind,red,reported", [
    ("position", "none", True), ("position", "sum", True), ("position", "mean", True),
    ("sum", "none", False), ("sum", "sum", True), ("sum", "mean", True),
    ("fine", "none", False), ("fine", "sum", False), ("fine", "mean", False),
])
def test_float16_overflow_is_judged_on_the_value_returned(kind: str, red: str, reported: bool) -> None:
    x, W, t = _fp16_case(kind)
    want = STOCK(x, W, t, reduction=red)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = safeloss.linear_cross_entropy(x, W, t, reduction=red)
    assert torch.equal(torch.isinf(got), torch.isinf(want))  # inf exactly where stock's is
    warned = [w for w in seen if issubclass(w.category, safeloss.SafeLossWarning)]
    if not reported:
        assert not warned and torch.isfinite(got).all()
        safeloss.linear_cross_entropy(x, W, t, reduction=red, strict=True)
        return
    assert len(warned) == 1, [str(w.message) for w in warned]
    assert re.search(r"overflowed float16|float16 loss overflowed", str(warned[0].message))
    with pytest.raises(safeloss.NonFiniteError, match=r"overflowed float16|float16 loss overflowed") as e:
        safeloss.linear_cross_entropy(x, W, t, reduction=red, strict=True)
    assert not isinstance(e.value, safeloss.EmptyBatchError)
    assert "linear_cross_entropy" in str(e.value) or "float16 loss overflowed" in str(e.value)


# ------------------------------------------------------------------------ in-place updates between forward and backward

INPLACE_WHICH = ["input", "linear_weight", "bias", "target", "weight"]
REQUIRES = {"all": ("x", "W", "b"), "input": ("x",), "linear_weight": ("W",), "bias": ("b",)}


def _inplace_run(fn: Callable, which: str, red: str, rg: tuple[str, ...]) -> list[torch.Tensor]:
    x0, W0, b0 = _head("2d", torch.float32)
    leaves = {"x": x0.requires_grad_("x" in rg), "W": W0.requires_grad_("W" in rg), "b": b0.requires_grad_("b" in rg)}
    xv, Wv, bv = leaves["x"] * 1, leaves["W"] * 1, leaves["b"] * 1  # non-leaves one can change in place
    t = _labels("2d")
    cw = torch.rand(C, generator=_g(5)) + 0.5
    loss = fn(xv, Wv, t, linear_bias=bv, weight=cw, reduction=red)
    with torch.no_grad():
        {"input": xv, "linear_weight": Wv, "bias": bv, "weight": cw, "target": t}[which].add_(1)
    (loss.sum() if red == "none" else loss).backward()
    return [leaves[k].grad for k in ("x", "W", "b") if k in rg]


# Where stock keeps what it needs and safeloss recomputes from the operand: reduction="none" (and
# a second backward) re-runs the chunk loop from the input and linear_weight, so an in-place
# update of one that stock did not save fails loudly (autograd's error) instead of silently
# giving gradients of the new values. docs/migration.md lists this.
RECOMPUTE_FAILS = {("none", "input", "input"), ("none", "linear_weight", "linear_weight"),
                   ("none", "input", "bias"), ("none", "linear_weight", "bias")}


@pytest.mark.parametrize("red", ["mean", "sum", "none"])
@pytest.mark.parametrize("rg", list(REQUIRES))
@pytest.mark.parametrize("which", INPLACE_WHICH)
def test_in_place_update_fails_exactly_where_stock_fails(which: str, rg: str, red: str) -> None:
    def outcome(fn: Callable) -> list[torch.Tensor] | RuntimeError:
        try:
            return _inplace_run(fn, which, red, REQUIRES[rg])
        except RuntimeError as e:
            assert "modified by an inplace operation" in str(e), e
            return e

    want, got = outcome(STOCK), outcome(safeloss.linear_cross_entropy)
    if (red, which, rg) in RECOMPUTE_FAILS:
        assert not isinstance(want, RuntimeError) and isinstance(got, RuntimeError)
        return
    assert isinstance(got, RuntimeError) == isinstance(want, RuntimeError), (want, got)
    if not isinstance(want, RuntimeError):
        for a, c in zip(got, want):  # type: ignore[arg-type]
            torch.testing.assert_close(a, c, rtol=TIGHT[torch.float32][0], atol=TIGHT[torch.float32][1])


def test_the_losses_of_reduction_none_can_be_changed_in_place_as_stocks() -> None:
    """loss.mul_(mask) on the per-position losses, then backward: stock allows it."""
    res = []
    for fn in (STOCK, safeloss.linear_cross_entropy):
        x, W, b = (v.clone().requires_grad_(True) for v in _head("2d"))
        rows = fn(x, W, _labels("2d"), linear_bias=b, reduction="none")
        rows.mul_(torch.linspace(0, 1, N, dtype=rows.dtype))
        res.append(torch.autograd.grad(rows.sum(), [x, W, b]))
    for a, c in zip(*res):
        torch.testing.assert_close(a, c)


# ------------------------------------------------------------------------ half precision


def _big_logits(dtype: torch.dtype, prob: bool, seed: int = 0):
    """Logits near 300 that differ by a few units: one ulp of them in bfloat16 / float16 (2 /
    0.25) moves a loss of order 1 by far more than the loss's own rounding, so whether the tile is
    rounded to the input dtype shows (the common offset cancels in the softmax)."""
    x = torch.randn(N, H, generator=_g(seed)).to(dtype)
    W = (torch.randn(C, H, generator=_g(seed + 1)) * 2).to(dtype)
    b = (300 + torch.randn(C, generator=_g(seed + 2)) * 2).to(dtype)
    t = torch.randn(N, C, generator=_g(seed + 3)).softmax(1).to(dtype) if prob else \
        torch.randint(0, C, (N,), generator=_g(seed + 3))
    return x, W, b, t


def _rounded_reference(x, W, b, t, **kw) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Stock's logits (its half-precision linear, rounded to the input dtype), then float32."""
    logits = F.linear(x, W, b).float()
    return F.cross_entropy(logits, t.float() if t.is_floating_point() else t, **kw).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("red", ["mean", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_options_none_rounds_the_logits_as_stocks_reference_path(dtype, prob, red, eps) -> None:
    x, W, b, t = _big_logits(dtype, prob)
    got = safeloss.linear_cross_entropy(x, W, t, linear_bias=b, reduction=red, label_smoothing=eps)
    want = _rounded_reference(x, W, b, t, reduction=red, label_smoothing=eps)
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(got, want, rtol=ulp, atol=ulp)
    stock = STOCK(x, W, t, linear_bias=b, reduction=red, label_smoothing=eps)
    torch.testing.assert_close(got.float(), stock.float(), rtol=4 * ulp, atol=0.05)


# (input dtype, options) -> the dtype stock's chunked path keeps its logits tile in (None: float32)
_O = torch.nn.LinearCrossEntropyOptions
TILE_PLAN = [
    (torch.bfloat16, None, torch.bfloat16), (torch.float16, None, torch.float16),
    (torch.float32, None, None), (torch.float64, None, None),
    (torch.bfloat16, _O(), None),  # CPU "auto": accurate, float32 accumulation
    (torch.float16, _O(), None),
    (torch.bfloat16, _O(acc_policy="accurate", acc_dtype=torch.float32), None),
    (torch.float16, _O(acc_policy="accurate", acc_dtype=torch.float32), None),
    (torch.bfloat16, _O(acc_policy="balanced", acc_dtype=torch.float32), None),
    (torch.float16, _O(acc_policy="balanced", acc_dtype=torch.float32), torch.float16),
    (torch.float16, _O(acc_policy="compact", acc_dtype=torch.float32), torch.float16),
    (torch.bfloat16, _O(acc_policy="compact", acc_dtype=torch.float32), None),
    (torch.bfloat16, _O(acc_policy="accurate"), torch.bfloat16),  # explicit policy: acc_dtype = input's
    (torch.float16, _O(acc_dtype=torch.float16), torch.float16),
    (torch.float32, _O(), None),
]


@pytest.mark.parametrize("dtype,options,tile", TILE_PLAN, ids=[f"{d}-{o}" for d, o, _ in TILE_PLAN])
def test_options_pick_the_logits_dtype_as_stocks_chunked_path(monkeypatch, dtype, options, tile) -> None:
    seen: list[chunked.Spec] = []
    real = chunked.run_loop

    def spy(ops, target, valid, sp, *a, **k):  # type: ignore[no-untyped-def]
        seen.append(sp)
        return real(ops, target, valid, sp, *a, **k)

    monkeypatch.setattr(chunked, "run_loop", spy)
    x, W, b, t = _big_logits(dtype, False)
    got = safeloss.linear_cross_entropy(x, W, t, linear_bias=b, options=options)
    assert seen and all(sp.tile_dtype == tile for sp in seen), [sp.tile_dtype for sp in seen]
    if options is not None and dtype in (torch.bfloat16, torch.float16):
        # ... and the value is stock's chunked path's, whose logits are kept (or not) the same way
        stock = STOCK(x, W, t, linear_bias=b, options=options)
        torch.testing.assert_close(got.float(), stock.float(), rtol=2e-2, atol=0.05)


def test_options_acc_dtype_the_input_cannot_take_is_stocks_runtime_error() -> None:
    x, W, _, t = _big_logits(torch.float32, False)
    opts = _O(acc_dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="supports float32 acc_dtype"):
        STOCK(x, W, t, options=opts)
    with pytest.raises(safeloss.OptionsError, match=r"(?s)acc_dtype=torch.bfloat16 cannot accumulate.*acc_dtype=None") as e:
        safeloss.linear_cross_entropy(x, W, t, options=opts)
    assert isinstance(e.value, RuntimeError)


def test_options_batch_chunk_size_and_a_chunking_method_that_disagree_is_stocks_value_error() -> None:
    x, W, _, t = _big_logits(torch.float32, False)
    opts = _O(batch_chunk_size=3, chunking_method="aspect_ratio")
    with pytest.raises(ValueError, match="give different chunk sizes"):
        STOCK(x, W, t, options=opts)
    with pytest.raises(safeloss.OptionsError, match=r"(?s)cannot apply to this call.*not both"):
        safeloss.linear_cross_entropy(x, W, t, options=opts)


@pytest.mark.parametrize("cap", [1, 2, 5])
def test_options_batch_chunk_size_caps_the_rows_of_a_chunk(monkeypatch, cap: int) -> None:
    monkeypatch.setattr(chunked, "FORCE_ROWS", 4)
    rows: list[int] = []
    real = chunked._Operands.logits

    def spy(self, s, e, out):  # type: ignore[no-untyped-def]
        rows.append(e - s)
        return real(self, s, e, out)

    monkeypatch.setattr(chunked._Operands, "logits", spy)
    x, W, b, t = _big_logits(torch.float32, False)
    safeloss.linear_cross_entropy(x, W, t, linear_bias=b, options=_O(batch_chunk_size=cap, chunking_method=None))
    assert max(rows) == min(cap, 4) and sum(rows) == N


# ------------------------------------------------------------------------ deferred findings, in this op's words


def _deferred_cases() -> dict[str, Callable[[], tuple]]:
    x, W, _ = _head("2d", torch.float32)
    t = _labels("2d")
    nan_x = x.clone()
    nan_x[2, 1] = math.nan
    bad = t.clone()
    bad[1] = C + 4
    neg = t.clone()
    neg[4] = -7
    q = torch.rand(N, C, generator=_g(9))  # not normalized
    fx, fW, ft = _fp16_case("position")
    return {
        "bad-label": lambda: ((x, W, bad), {}, safeloss.TargetOutOfRangeError),
        "negative-label": lambda: ((x, W, neg), {}, safeloss.TargetOutOfRangeError),
        "nan-input": lambda: ((nan_x, W, t), {"strict": True}, safeloss.NonFiniteError),
        "fp16-overflow": lambda: ((fx, fW, ft), {"strict": True, "reduction": "none"}, safeloss.NonFiniteError),
        "all-ignored": lambda: ((x, W, torch.full((N,), -100)), {"strict": True}, safeloss.EmptyBatchError),
        "bad-probabilities": lambda: ((x, W, q), {"strict": True}, safeloss.ProbabilityTargetError),
    }


_FOREIGN = re.compile(r"(?<![\w.])(cross_entropy|CrossEntropyLoss)\b")  # not linear_cross_entropy


@pytest.mark.parametrize("case", list(_deferred_cases()))
def test_deferred_findings_use_this_ops_name(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """The CUDA default path (deferred, no host sync), run on the CPU: the finding of one call is
    reported by the next call of the same loss (an error, or a warning of default mode), named as
    linear_cross_entropy's."""
    monkeypatch.setattr(checks, "DEFER_ON_CPU", True)
    args, kw, err = _deferred_cases()[case]()
    kw = {k: v for k, v in kw.items() if k != "strict"}
    out = safeloss.linear_cross_entropy(*args, **kw)  # nothing reported yet: deferred
    if case.endswith("label"):
        assert torch.isnan(out)  # a bad label's loss is NaN (masked, never read out of range)
    x, W, _ = _head("2d", torch.float32)
    if err is safeloss.TargetOutOfRangeError:
        with pytest.raises(err) as e:
            safeloss.linear_cross_entropy(x, W, _labels("2d"))
        msg = str(e.value)
    else:
        with pytest.warns(safeloss.SafeLossWarning) as rec:
            safeloss.linear_cross_entropy(x, W, _labels("2d"))
        msg = str(rec[0].message)
    assert "found by an earlier call" in msg and "linear_cross_entropy" in msg, msg
    assert not _FOREIGN.search(msg), msg
    assert "logits hold" not in msg


def test_deferred_negative_labels_are_masked_not_gathered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Labels below 0 that are not ignore_index (as well as those >= C) are masked before any
    gather on the deferred path: NaN at exactly those positions, a zero gradient there."""
    monkeypatch.setattr(checks, "DEFER_ON_CPU", True)
    x, W, b = _head("2d")
    t = _labels("2d")
    t[1], t[2], t[4] = -7, C, -1
    xl = x.clone().requires_grad_(True)
    rows = safeloss.linear_cross_entropy(xl, W, t, linear_bias=b, reduction="none")
    assert torch.isnan(rows[[1, 2, 4]]).all()
    ok = [i for i in range(N) if i not in (1, 2, 4)]
    want = STOCK(x, W, torch.where((t < 0) | (t >= C), -100, t), linear_bias=b, reduction="none")
    torch.testing.assert_close(rows[ok], want[ok])
    rows.nan_to_num().sum().backward()
    assert xl.grad[[1, 2, 4]].abs().sum() == 0
    checks._pending.clear()


# ------------------------------------------------------------------------ mutant classes: torch.func path


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_bad_labels_inside_a_transform_give_nan_where_nothing_is_read(monkeypatch, transform: str) -> None:
    """Where a transform may not read the labels (the CUDA path; on the CPU stock's kernel checks
    them): a bad label's loss is NaN, never a silent 0 and never an out-of-range read."""
    from torch.func import grad_and_value, vmap

    monkeypatch.setattr(checks, "DEFER_ON_CPU", True)  # the device that does not read at once
    x, W, b = _head("2d")
    t = _labels("2d")
    t[2] = C + 1
    if transform == "vmap":
        rows = vmap(lambda a, c: safeloss.linear_cross_entropy(a, W, c, linear_bias=b, reduction="none"))(
            x.view(2, 4, H), t.view(2, 4))
        assert torch.isnan(rows.view(-1)[2]) and torch.isfinite(rows.view(-1)[[0, 1, 4, 5, 7]]).all()
    else:
        g, value = grad_and_value(
            lambda w: safeloss.linear_cross_entropy(x, w, t, linear_bias=b, reduction="sum"))(W)
        assert torch.isnan(value) and torch.isfinite(g).all()  # the bad row adds no gradient


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_bad_labels_inside_a_transform_on_the_cpu_raise_as_stocks_kernel_does(transform: str) -> None:
    from torch.func import grad, vmap

    x, W, b = _head("2d")
    t = _labels("2d")
    t[2] = C + 1

    def run(fn):  # type: ignore[no-untyped-def]
        if transform == "vmap":
            return vmap(lambda a, c: fn(a, W, c, linear_bias=b))(x.view(2, 4, H), t.view(2, 4))
        return grad(lambda w: fn(x, w, t, linear_bias=b))(W)

    with pytest.raises((IndexError, RuntimeError)) as stock:
        run(STOCK)
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"inside a torch\.func transform") as e:
        run(safeloss.linear_cross_entropy)
    builtin = next(c for c in type(stock.value).__mro__ if c.__module__ == "builtins")
    assert isinstance(e.value, builtin)


# ------------------------------------------------------------------------ mutant classes: float64 under autocast


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("prob", [False, True])
def test_float64_under_autocast_is_computed_in_float64(autocast_dtype, prob) -> None:
    """autocast leaves float64 alone (stock's linear runs in float64 there): so must safeloss."""
    x, W, b = _head("2d")
    t = torch.randn(N, C, generator=_g(4), dtype=torch.float64).softmax(1) if prob else _labels("2d")
    leaves = [v.clone().requires_grad_(True) for v in (x, W, b)]
    with torch.autocast("cpu", dtype=autocast_dtype):
        got = safeloss.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2], label_smoothing=0.1)
        want = STOCK(x, W, t, linear_bias=b, label_smoothing=0.1)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------ mutant classes: patch()


@pytest.mark.usefixtures("clean_patch")
@pytest.mark.parametrize("entry", ["functional", "module"])
def test_patch_strict_reaches_both_patched_entries(entry: str) -> None:
    """A warning-level finding (an (N, 1) target) raises under patch(strict=True), warns under
    patch(), through F.linear_cross_entropy and through a stock LinearCrossEntropyLoss."""
    x = torch.randn(N, H)
    t = _labels("2d").clamp_min(0).view(N, 1)
    m = torch.nn.LinearCrossEntropyLoss(H, C)

    def call() -> torch.Tensor:
        return F.linear_cross_entropy(x, m.linear.weight, t) if entry == "functional" else m(x, t)

    with safeloss.patch(strict=True), pytest.raises(safeloss.TargetShapeError, match=r"\(8, 1\)"):
        call()
    with safeloss.patch(), pytest.warns(safeloss.SafeLossWarning, match=r"\(8, 1\)"):
        call()
    safeloss.reset_warnings()  # warned once per call site: this one has warned
    # patch(strict=False) wins over the global setting
    with safeloss.patch(strict=False), safeloss.strict_mode(), pytest.warns(safeloss.SafeLossWarning):
        call()


class _Logged(torch.Tensor):
    """A tensor subclass with its own __torch_function__ (a wrapper library's tensor)."""

    calls: typing.ClassVar[list[str]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        cls.calls.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.usefixtures("clean_patch")
@pytest.mark.parametrize("which", ["input", "target", "linear_weight", "bias", "weight"])
@pytest.mark.parametrize("entry", ["functional", "module"])
def test_patch_leaves_tensor_subclasses_to_their_own_torch_function(entry: str, which: str) -> None:
    """Under patch(), a call with a tensor subclass in any tensor argument keeps stock's route:
    the subclass's __torch_function__ sees F.linear_cross_entropy itself (safeloss's checks
    were not written for its dispatch)."""
    torch.manual_seed(0)
    m = torch.nn.LinearCrossEntropyLoss(H, C, bias=True, weight=torch.rand(C) + 0.5)
    x, t = torch.randn(N, H), _labels("2d")
    sub = {"input": x, "target": t}
    if which in sub:
        sub[which] = sub[which].as_subclass(_Logged)
    elif which == "weight":
        m.weight = m.weight.as_subclass(_Logged)
    else:
        lin = m.linear
        name = "weight" if which == "linear_weight" else "bias"
        setattr(lin, name, torch.nn.Parameter(getattr(lin, name).detach().as_subclass(_Logged)))
    _Logged.calls = []
    with safeloss.patch():
        if entry == "functional":
            F.linear_cross_entropy(sub["input"], m.linear.weight, sub["target"], linear_bias=m.linear.bias,
                                   weight=m.weight)
        else:
            m(sub["input"], sub["target"])
    assert "linear_cross_entropy" in _Logged.calls, _Logged.calls[:10]


# ------------------------------------------------------------------------ the catalogue


def test_the_demo_catalogue_holds_this_ops_messages_in_its_words() -> None:
    """Every linear case of ``safeloss demo`` (and so of docs/errors.md) runs, and safeloss's side
    names linear_cross_entropy, never cross-entropy's names."""
    from pathlib import Path

    from safeloss import demo

    errors_md = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    assert len(demo.LINEAR_CASES) >= 15
    for case in demo.LINEAR_CASES:
        _, ours = demo.run_case(case)
        assert ("safeloss." in ours or "SafeLossWarning" in ours) and "linear_cross_entropy" in ours, (case.name, ours)
        assert not _FOREIGN.search(ours), (case.name, ours)
        assert f"### {case.title}" in errors_md, case.name


# ----------------------------------------------------------------- a mean with nothing to average


@pytest.mark.parametrize("backend", ["torch", _triton()])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_zero_total_weight_mean_is_nan_with_the_true_diagnosis(dtype: torch.dtype, eps: float, backend: str) -> None:
    """Every non-ignored target's class weight is 0: stock's mean is 0/0 = NaN with or without
    label smoothing (was: inf and "overflowed float32" with smoothing); strict mode raises
    EmptyBatchError."""
    x, W, b = _head("2d", dtype)
    t = torch.randint(0, C, (N,), generator=_g(9))
    t[::3] = -100
    w = torch.rand(C, generator=_g(10)).to(dtype) + 0.1
    w[t[t >= 0]] = 0
    ref = STOCK(x.double(), W.double(), t, linear_bias=b.double(), weight=w.double(), label_smoothing=eps)
    assert math.isnan(ref.item())
    kw = dict(weight=w, label_smoothing=eps, backend=backend)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = safeloss.linear_cross_entropy(x, W, t, linear_bias=b, **kw)
    assert math.isnan(out.item()), out
    texts = [str(r.message) for r in rec if issubclass(r.category, safeloss.SafeLossWarning)]
    assert len(texts) == 1 and "nothing to average" in texts[0] and "overflowed" not in texts[0], texts
    with pytest.raises(safeloss.EmptyBatchError, match="linear_cross_entropy with reduction=\"mean\" has nothing to average"):
        safeloss.linear_cross_entropy(x, W, t, linear_bias=b, strict=True, **kw)

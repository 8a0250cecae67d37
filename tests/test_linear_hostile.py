"""A hostile user of ``safeloss.linear_cross_entropy`` / ``SafeLinearCrossEntropyLoss``.

Every check compares values AND the gradients w.r.t. input, linear_weight and linear_bias under a
non-trivial upstream gradient against the stock composition ``F.cross_entropy(F.linear(...))``,
in float64 unless the dtype is the attack. Classes: chunk boundaries (forced rows, vocab tiles,
budgets), degenerate shapes, strided operands, partial requires_grad, tied weights, autograd
usage (retain_graph, double backward, accumulation), planned calls whose world changed between
calls (test hooks, module attributes), and the extras with every reduction.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import safeloss
from safeloss.core import plan as plans
from safeloss.linear import chunked
from tests.tolerances import TIGHT, assert_matches

FP64 = torch.float64
REDUCTIONS = ["mean", "sum", "none"]


@pytest.fixture(autouse=True)
def _hooks_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunked, "FORCE_ROWS", None)
    monkeypatch.setattr(chunked, "FORCE_VOCAB_TILE", None)
    monkeypatch.setattr(chunked, "HALF_OPERANDS_ON_CPU", False)
    monkeypatch.setitem(chunked.BUDGET_BYTES, "cpu", chunked.BUDGET_BYTES["cpu"])


def _upstream(out: torch.Tensor) -> torch.Tensor:
    """A gradient that is not one number per position (reduction="none"), and not 1."""
    return torch.linspace(-1.0, 2.0, out.numel(), dtype=FP64).reshape(out.shape).to(out.dtype)


def _both(make: Callable[[], tuple[torch.Tensor, ...]], ours: Callable[..., torch.Tensor],
          stock: Callable[..., torch.Tensor], hooks: dict[str, Any] | None = None,
          ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(loss, grads of the leaves that require grad) of ``ours`` (under the chunk hooks) and of
    ``stock``, each on fresh leaves from ``make``."""
    res = []
    for fn, h in ((ours, hooks or {}), (stock, {})):
        leaves = make()
        saved = {k: getattr(chunked, k) for k in h}
        for k, v in h.items():
            setattr(chunked, k, v)
        try:
            out = fn(*leaves)
        finally:
            for k, v in saved.items():
                setattr(chunked, k, v)
        wrt = [v for v in leaves if isinstance(v, torch.Tensor) and v.requires_grad]
        grads = list(torch.autograd.grad(out, wrt, _upstream(out))) if wrt and out.requires_grad else []
        res.append([out.detach(), *grads])
    return res[0], res[1]


def _same(a: list[torch.Tensor], b: list[torch.Tensor], what: str = "") -> None:
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        assert_matches(x, y, what=f"{what}[{i}]")


def _problem(n: int, h: int, c: int, *, bias: bool = True, ignore: int | None = -100,
             need: tuple[bool, bool, bool] = (True, True, True), dtype: torch.dtype = FP64,
             seed: int = 0) -> tuple[Callable[[], tuple[torch.Tensor, ...]], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0, w0 = torch.randn(n, h, generator=g, dtype=FP64), torch.randn(c, h, generator=g, dtype=FP64)
    b0 = torch.randn(c, generator=g, dtype=FP64)
    t = torch.randint(0, c, (n,), generator=g)
    if n > 1 and ignore is not None:
        t[1] = ignore

    def make() -> tuple[torch.Tensor, ...]:
        x, w = x0.to(dtype).requires_grad_(need[0]), w0.to(dtype).requires_grad_(need[1])
        return (x, w, b0.to(dtype).requires_grad_(need[2])) if bias else (x, w)

    return make, t


def _pair(t: torch.Tensor, **kw: Any) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    def ours(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return safeloss.linear_cross_entropy(x, w, t, linear_bias=b, **kw)

    def stock(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(F.linear(x, w, b), t, **kw)

    return ours, stock


# ------------------------------------------------------------------ chunk and tile boundaries

CUTS = [dict(FORCE_ROWS=1), dict(FORCE_ROWS=3), dict(FORCE_ROWS=2, FORCE_VOCAB_TILE=3),
        dict(FORCE_ROWS=5, FORCE_VOCAB_TILE=1), dict(FORCE_VOCAB_TILE=4)]


@pytest.mark.parametrize("cut", CUTS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1), dict(weight=True, label_smoothing=0.2),
                                  dict(ignore_index=3, label_smoothing=0.1), dict(ignore_index=100)],
                         ids=["plain", "ls", "weight+ls", "ii_in_range", "ii_out_of_range"])
@pytest.mark.parametrize("red", REDUCTIONS)
def test_chunk_boundaries(cut, opts, red):
    """N = 7 and C = 11: no chunk size or tile here divides them."""
    make, t = _problem(7, 5, 11, ignore=opts.get("ignore_index", -100))
    kw = dict(opts, reduction=red)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(11, generator=torch.Generator().manual_seed(5), dtype=FP64)
    _same(*_both(make, *_pair(t, **kw), hooks=cut), "chunks")


# ------------------------------------------------------------------ degenerate and strided operands

SHAPES = {"N=1": (1, 5, 11), "V=2": (4, 5, 2), "H=1": (4, 1, 7), "N=0": (0, 5, 7)}


@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("red", REDUCTIONS)
@pytest.mark.parametrize("rows", [None, 1])
def test_degenerate_shapes(shape, red, rows):
    make, t = _problem(*SHAPES[shape])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the empty-mean finding (stock's NaN too)
        _same(*_both(make, *_pair(t, reduction=red), hooks=dict(FORCE_ROWS=rows)), shape)


VIEWS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "W.t() of an (H, C) matrix": (lambda x: x, lambda w: w.t().contiguous().t()),
    "W[:, :H] slice": (lambda x: x, lambda w: torch.cat([w, w], 1)[:, : w.shape[1]]),
    "expanded h": (lambda x: x[:1].expand(x.shape), lambda w: w),
    "h[::2] rows": (lambda x: torch.cat([x, x], 0)[::2], lambda w: w),
}


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("red", REDUCTIONS)
def test_strided_operands(view, red):
    make, t = _problem(6, 4, 9)
    fx, fw = VIEWS[view]
    ours, stock = _pair(t, reduction=red)
    for hooks in ({}, dict(FORCE_ROWS=4, FORCE_VOCAB_TILE=4)):
        _same(*_both(make, lambda x, w, b: ours(fx(x), fw(w), b), lambda x, w, b: stock(fx(x), fw(w), b),
                     hooks=hooks), view)


@pytest.mark.parametrize("need", [(True, False, True), (False, True, True), (True, True, False),
                                  (False, False, True), (False, False, False)],
                         ids=["W frozen", "h frozen", "b frozen", "only b", "none"])
@pytest.mark.parametrize("red", REDUCTIONS)
def test_partial_requires_grad(need, red):
    make, t = _problem(6, 4, 9, need=need)
    for hooks in ({}, dict(FORCE_ROWS=2)):
        _same(*_both(make, *_pair(t, reduction=red, label_smoothing=0.1), hooks=hooks), str(need))


# ------------------------------------------------------------------ tied weights, autograd usage


@pytest.mark.parametrize("red", REDUCTIONS)
@pytest.mark.parametrize("rows", [None, 3])
def test_tied_embedding_weight(red, rows):
    """The same Parameter embeds the tokens and projects the hidden states: both uses reach .grad."""
    g = torch.Generator().manual_seed(1)
    ids, t = torch.randint(0, 11, (2, 4), generator=g), torch.randint(0, 11, (2, 4), generator=g)
    w0 = torch.randn(11, 5, generator=g, dtype=FP64)
    grads = []
    for fn in (safeloss.linear_cross_entropy, lambda h, w, t, **k: F.cross_entropy(F.linear(h, w), t, **k)):
        emb = torch.nn.Embedding(11, 5, _weight=w0.clone())
        h = torch.tanh(emb(ids)).flatten(0, 1)
        chunked.FORCE_ROWS = rows if fn is safeloss.linear_cross_entropy else None
        try:
            out = fn(h, emb.weight, t.flatten(), reduction=red)
        finally:
            chunked.FORCE_ROWS = None
        out.backward(_upstream(out))
        grads.append([out.detach(), emb.weight.grad])
    _same(*grads, "tied")


@pytest.mark.parametrize("red", REDUCTIONS)
@pytest.mark.parametrize("rows", [None, 2])
def test_backward_twice_and_accumulation(red, rows):
    """retain_graph then a second backward, then a second call: .grad holds the sum of all three."""
    make, t = _problem(5, 4, 6)
    t2 = torch.roll(t, 1)
    got = []
    for impl in ("ours", "stock"):
        leaves = make()
        chunked.FORCE_ROWS = rows if impl == "ours" else None
        try:
            for i, tt in enumerate((t, t2)):
                ours, stock = _pair(tt, reduction=red, label_smoothing=0.1)
                out = (ours if impl == "ours" else stock)(*leaves)
                out.backward(_upstream(out), retain_graph=i == 0)
                if i == 0:
                    out.backward(_upstream(out))
        finally:
            chunked.FORCE_ROWS = None
        got.append([v.grad for v in leaves])
    _same(*got, "accumulated")


@pytest.mark.parametrize("red", REDUCTIONS)
@pytest.mark.parametrize("rows", [None, 1])
def test_double_backward(red, rows):
    make, t = _problem(4, 3, 5)
    res = []
    for impl in ("ours", "stock"):
        leaves = make()
        chunked.FORCE_ROWS = rows if impl == "ours" else None
        try:
            out = _pair(t, reduction=red, label_smoothing=0.1)[impl == "stock"](*leaves)
        finally:
            chunked.FORCE_ROWS = None
        gx, gw, gb = torch.autograd.grad(out, leaves, _upstream(out), create_graph=True)
        res.append(list(torch.autograd.grad(gx.sin().sum() + (gw ** 2).sum() + gb.cos().sum(), leaves)))
    _same(*res, "double backward")


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("rows", [None, 1])
def test_nan_upstream_at_ignored_positions(create_graph, rows):
    """A torch.where over padding rows leaves NaN in the upstream gradient there: stock never reads it."""
    make, t = _problem(4, 5, 6)
    up = torch.tensor([1.0, float("nan"), 2.0, 0.5], dtype=FP64)
    res = []
    for impl in ("ours", "stock"):
        leaves = make()
        chunked.FORCE_ROWS = rows if impl == "ours" else None
        try:
            out = _pair(t, reduction="none", label_smoothing=0.1)[impl == "stock"](*leaves)
        finally:
            chunked.FORCE_ROWS = None
        res.append(list(torch.autograd.grad(out, leaves, up, create_graph=create_graph)))
    _same(*res, "nan upstream")


# ------------------------------------------------------------------ planned calls whose world changed


def _spy_loop(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    orig = chunked.run_loop

    def spy(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(chunked, "run_loop", spy)
    return calls


@pytest.mark.parametrize("hook", ["FORCE_ROWS", "FORCE_VOCAB_TILE", "HALF_OPERANDS_ON_CPU", "BUDGET_BYTES"])
def test_hook_set_after_a_plan_reaches_the_chunk_loop(monkeypatch, hook):
    """A test hook (or a smaller budget) set after a signature was planned: the next call must run
    the chunk loop under it, not replay stock's whole-logits path (the hooks are read per call,
    as core.plan promises for test hooks; a budget below the plan's logits would be exceeded)."""
    make, t = _problem(4, 8, 5, bias=False, ignore=None, dtype=torch.float32)
    x, w = make()
    safeloss.linear_cross_entropy(x, w, t)
    safeloss.linear_cross_entropy(x, w, t)
    assert plans._plans, "the signature was not planned: this test cannot see the bug"
    calls = _spy_loop(monkeypatch)
    safeloss.linear_cross_entropy(x, w, t)
    assert not calls  # the planned call: stock's ops
    if hook == "BUDGET_BYTES":
        monkeypatch.setitem(chunked.BUDGET_BYTES, "cpu", 64)
    else:
        monkeypatch.setattr(chunked, hook, True if hook == "HALF_OPERANDS_ON_CPU" else 2)
    out = safeloss.linear_cross_entropy(x, w, t)
    assert calls, f"{hook} set after the plan was stored: the chunk loop never ran"
    assert_matches(out, F.cross_entropy(F.linear(x, w), t), what="value")


@pytest.mark.parametrize("red", REDUCTIONS)
def test_module_attributes_changed_between_calls(red):
    """reduction / ignore_index / label_smoothing / class weight / bias / options changed on a
    module whose signature was planned: every call is stock's for the new attributes."""
    m = safeloss.SafeLinearCrossEntropyLoss(8, 5, bias=True, reduction=red, dtype=FP64)
    s = torch.nn.LinearCrossEntropyLoss(8, 5, bias=True, reduction=red, dtype=FP64)
    s.load_state_dict(m.state_dict())
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(6, 8, generator=g, dtype=FP64), torch.randint(0, 5, (6,), generator=g)
    t[0] = 2

    def check(what: str) -> None:
        for _ in range(2):  # the second call of a signature is the planned one
            _same([m(x, t)], [s(x, t)], what)

    check("initial")
    for attr, val in [("reduction", "sum"), ("ignore_index", 2), ("label_smoothing", 0.3),
                      ("reduction", red), ("ignore_index", None)]:
        setattr(m, attr, val)
        setattr(s, attr, val)
        check(f"{attr}={val}")
    m.weight = torch.rand(5, generator=g, dtype=FP64)
    s.weight = m.weight.clone()
    check("class weight")
    m.weight.mul_(2)
    s.weight.mul_(2)
    check("class weight in place")
    m.linear.bias = s.linear.bias = None
    check("bias removed")


def test_planned_path_from_threads():
    """Planned and full calls of several signatures from six threads at once."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(16, 8, generator=g, dtype=FP64), torch.randn(5, 8, generator=g, dtype=FP64)
    errors: list[str] = []

    def worker(i: int) -> None:
        tt = torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(i))
        kw = dict(reduction=REDUCTIONS[i % 3], label_smoothing=0.1 * (i % 2))
        for _ in range(30):
            got = safeloss.linear_cross_entropy(x, w, tt, **kw)
            want = F.cross_entropy(F.linear(x, w), tt, **kw)
            if not torch.allclose(got, want, *TIGHT[FP64]):
                errors.append(f"thread {i}: {got} != {want}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]


# ------------------------------------------------------------------ the extras


EXTRAS = [dict(softcap=3.0), dict(temperature=0.7), dict(z_loss=1e-2),
          dict(softcap=2.0, temperature=1.5, z_loss=0.1, return_stats=True)]


@pytest.mark.parametrize("ex", EXTRAS, ids=lambda e: ",".join(e))
@pytest.mark.parametrize("red", REDUCTIONS)
@pytest.mark.parametrize("rows", [None, 3])
def test_extras_match_the_logits_composition(ex, red, rows):
    """The extras without logits == safeloss.cross_entropy on the materialized logits."""
    make, t = _problem(7, 5, 11)
    cw = torch.rand(11, generator=torch.Generator().manual_seed(4), dtype=FP64)
    kw = dict(ex, reduction=red, weight=cw, label_smoothing=0.1)

    def ours(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = safeloss.linear_cross_entropy(x, w, t, linear_bias=b, **kw)
        return out[0] if isinstance(out, tuple) else out

    def ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = safeloss.cross_entropy(F.linear(x, w, b), t, **kw)
        return out[0] if isinstance(out, tuple) else out

    _same(*_both(make, ours, ref, hooks=dict(FORCE_ROWS=rows)), "extras")


# ------------------------------------------------------------------ aliasing, checkpointing, precision


@pytest.mark.parametrize("red", REDUCTIONS)
@pytest.mark.parametrize("cut", [{}, dict(FORCE_ROWS=2), dict(FORCE_ROWS=2, FORCE_VOCAB_TILE=3)],
                         ids=["whole", "rows", "rows+tiles"])
def test_hidden_and_bias_are_views_of_the_head(red, cut):
    """h = W[1:6] and b = W[:, 2]: three uses of one leaf, every gradient summed into W.grad."""
    w0 = torch.randn(7, 4, generator=torch.Generator().manual_seed(6), dtype=FP64)
    t = torch.tensor([-100, 3, 0, 6, 2])
    ours, stock = _pair(t, reduction=red, label_smoothing=0.1)
    _same(*_both(lambda: (w0.clone().requires_grad_(),), lambda w: ours(w[1:6], w, w[:, 2]),
                 lambda w: stock(w[1:6], w, w[:, 2]), hooks=cut), "aliased")


@pytest.mark.parametrize("red", REDUCTIONS)
def test_activation_checkpointing(red):
    """torch.utils.checkpoint reruns the forward in backward; the chunk loop must give the same.
    (use_reentrant=True cannot take autograd.grad, which this harness uses.)"""
    from torch.utils.checkpoint import checkpoint

    make, t = _problem(6, 4, 7)
    ours, stock = _pair(t, reduction=red)
    _same(*_both(make, lambda x, w, b: checkpoint(lambda *a: ours(torch.tanh(a[0]), *a[1:]), x, w, b,
                                                  use_reentrant=False),
                 lambda x, w, b: stock(torch.tanh(x), w, b), hooks=dict(FORCE_ROWS=2)), "checkpoint")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("red", REDUCTIONS)
@pytest.mark.parametrize("rows", [None, 2])
def test_half_precision_against_the_truth(dtype, red, rows):
    """bf16 / fp16 on the CPU: as close to the float64 truth as stock's own composition."""
    make, t = _problem(6, 16, 9)
    ours, stock = _pair(t, reduction=red, label_smoothing=0.1)

    def half() -> tuple[torch.Tensor, ...]:
        return tuple(v.detach().to(dtype).requires_grad_() for v in make())

    got, want = _both(half, ours, stock, hooks=dict(FORCE_ROWS=rows))
    truth = _both(make, stock, stock)[1]
    for i, (a, s, tr) in enumerate(zip(got, want, truth)):
        assert_matches(a, s, tr, what=f"{dtype}[{i}]")


@pytest.mark.parametrize("red", REDUCTIONS)
def test_triton_backend_interpreted(red):
    """backend="triton" (the interpreter on CPU tensors), tiles cut across chunks and classes."""
    from safeloss.backends import dispatch

    if dispatch.triton_unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("Triton cannot run on CPU tensors here (TRITON_INTERPRET unset before import)")
    make, t = _problem(5, 4, 7, dtype=torch.float32)
    kw = dict(reduction=red, label_smoothing=0.1)

    def ours(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return safeloss.linear_cross_entropy(x, w, t, linear_bias=b, backend="triton", **kw)

    for cut in (dict(FORCE_ROWS=2), dict(FORCE_ROWS=2, FORCE_VOCAB_TILE=3)):
        _same(*_both(make, ours, _pair(t, **kw)[1], hooks=cut), f"triton {cut}")

"""linear_cross_entropy in every setting (issue 16, section 2): the cells of the mode table for this
op, each run against stock ``F.linear_cross_entropy`` in the same setting.

The grid: settings that trace a graph must keep the batch size symbolic (one compile for every
token count, an export with a dynamic batch dim, a make_fx graph with a symbolic N) and give
stock's values and gradients at a batch size they were not built on; torch.fx records one node
(as stock does); forward-mode AD and vmap over the class weight give stock's tangents (None where
stock's is None) and values; sparse layouts give stock's values or a LayoutError where stock has
no kernel; a make_fx graph of forward + backward is functional (no ``out=`` op into a captured
buffer) and replays on new values. Shapes are tiny: the file runs in seconds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import safeloss
from safeloss.core import checks
from safeloss.core.mode import Mode, decide
from safeloss.linear import chunked
from tests.tolerances import TIGHT

STOCK = F.linear_cross_entropy  # captured before any patch()
H, C = 5, 7
RT, AT = TIGHT[torch.float32]


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunked, "FORCE_ROWS", 3)  # several chunks even at these sizes


def _data(n: int, seed: int = 0, kind: str = "index", bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g)
    W = torch.randn(C, H, generator=g)
    b = torch.randn(C, generator=g) if bias else None
    if kind == "index":
        t = torch.randint(0, C, (n,), generator=g)
        t[::4] = -100  # ignored positions in every batch
    else:
        t = torch.randn(n, C, generator=g).softmax(1)
    return x, W, b, t


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=RT, atol=AT, equal_nan=True)


class _Fn(torch.nn.Module):
    """``fn(x, W, t, linear_bias=b, reduction=red)`` as a module (export, make_fx, compile)."""

    def __init__(self, fn: Callable, red: str) -> None:
        super().__init__()
        self.fn, self.red = fn, red

    def forward(self, x, W, b, t):  # type: ignore[no-untyped-def]
        return self.fn(x, W, t, linear_bias=b, reduction=self.red)


def _fwd_bwd(run: Callable, x, W, b, t, red: str) -> list[torch.Tensor]:
    leaves = [v.detach().clone().requires_grad_(True) for v in (x, W, b)]
    out = run(leaves[0], leaves[1], leaves[2], t)
    up = torch.linspace(-1, 2, out.numel()).reshape(out.shape) if out.dim() else torch.tensor(1.5)
    return [out.detach(), *torch.autograd.grad(out, leaves, up)]


# ------------------------------------------------------------------------ graphs: batch size stays symbolic

SIZES = (4, 6, 9)


def _compiled(dynamic: str):
    def build(fn, red):
        torch._dynamo.reset()
        from torch._dynamo.testing import CompileCounterWithBackend

        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(_Fn(fn, red), backend=counter, dynamic=True if dynamic == "dynamic" else None)

        def run(x, W, b, t):
            if dynamic == "mark_dynamic":
                torch._dynamo.mark_dynamic(x, 0)
                torch._dynamo.mark_dynamic(t, 0)
            return compiled(x, W, b, t)

        return run, lambda: counter.frame_count
    return build


def _export(fn, red):
    x, W, b, t = _data(SIZES[0])
    n = torch.export.Dim("n", min=2)
    ep = torch.export.export(_Fn(fn, red), (x, W, b, t), dynamic_shapes=({0: n}, None, None, {0: n}))
    return ep.module(), lambda: 1


def _make_fx_symbolic(fn, red):
    from torch.fx.experimental.proxy_tensor import make_fx

    x, W, b, t = _data(SIZES[0])
    gm = make_fx(_Fn(fn, red), tracing_mode="symbolic")(x, W, b, t)
    sizes = [n.meta["val"].shape[0] for n in gm.graph.nodes if n.op == "placeholder"]
    assert not isinstance(sizes[0], int), f"make_fx baked the batch size into the graph: {sizes}"
    return gm, lambda: 1


GRAPHS = {
    "compile-dynamic": _compiled("dynamic"),
    "compile-mark_dynamic": _compiled("mark_dynamic"),
    "export-dynamic-batch": _export,
    "make_fx-symbolic": _make_fx_symbolic,
}


@pytest.mark.parametrize("red", ["mean", "none"])
@pytest.mark.parametrize("setting", list(GRAPHS))
def test_graphs_keep_the_batch_size_symbolic(setting: str, red: str) -> None:
    """One build serves every token count (no recompile, no constraint violation, no baked N),
    with stock's values at sizes it was not built on; forward+backward where the tool trains."""
    run, builds = GRAPHS[setting](safeloss.linear_cross_entropy, red)
    first = None
    for n in SIZES:
        x, W, b, t = _data(n, seed=n)
        ref = _fwd_bwd(lambda *a: STOCK(a[0], a[1], a[3], linear_bias=a[2], reduction=red), x, W, b, t, red)
        if setting.startswith("compile"):
            got = _fwd_bwd(run, x, W, b, t, red)
        else:  # export and make_fx graphs are inference graphs here
            got = [run(x, W, b, t)]
            ref = ref[:1]
        for a, c in zip(got, ref):
            _close(a, c)
        first = builds() if first is None else first
    # (The first build may count twice: Dynamo restarts its analysis once to turn a float
    # argument into a tensor. What matters is that no later batch size builds again.)
    assert builds() == first, f"{setting}: {builds() - first} rebuilds for {len(SIZES) - 1} new batch sizes"


def test_compiled_graph_reports_a_bad_label_in_this_ops_words() -> None:
    """Value checks run in the graph (the effectful report op): on the CPU the call raises."""
    torch._dynamo.reset()
    f = torch.compile(_Fn(safeloss.linear_cross_entropy, "mean"), backend="aot_eager", dynamic=True)
    x, W, b, t = _data(6)
    t[2] = C + 3
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)linear_cross_entropy.*outside the class range"):
        f(x, W, b, t)


def test_make_fx_forward_backward_graph_is_functional_and_replays() -> None:
    """No ``out=`` op writing into a buffer the graph captured, no in-place op on a graph input:
    the graph replays on new values and gives eager's gradients."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(x, W, b, t):  # type: ignore[no-untyped-def]
        leaves = [v.detach().requires_grad_(True) for v in (x, W, b)]
        loss = safeloss.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2])
        return (loss, *torch.autograd.grad(loss, leaves))

    x, W, b, t = _data(6)
    gm = make_fx(step)(x, W, b, t)
    bad = [n for n in gm.graph.nodes if n.op == "call_function"
           and (str(n.target).endswith(".out") or (str(n.target).rstrip("_").endswith("_") and "aten" in str(n.target)))]
    assert not bad, [str(n.target) for n in bad]
    x2, W2, b2, _ = _data(6, seed=3)
    for a, c in zip(gm(x2, W2, b2, t), step(x2, W2, b2, t)):
        _close(a, c)


# ------------------------------------------------------------------------ torch.fx: one node, as stock


class _Head(torch.nn.Module):
    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(C, H))
        self.fn = fn

    def forward(self, x, t):  # type: ignore[no-untyped-def]
        return self.fn(x, self.w, t, reduction="sum")


class _Holder(torch.nn.Module):
    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, x, t):  # type: ignore[no-untyped-def]
        return self.loss(x, t)


def _fx_nodes(gm: torch.fx.GraphModule) -> list[tuple[str, object]]:
    return [(n.op, n.target) for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]


@pytest.mark.parametrize("form", ["functional", "module", "root-module"])
def test_fx_symbolic_trace_records_one_node_that_runs_every_check(form: str) -> None:
    torch.manual_seed(0)
    if form == "functional":
        ours, stock = _Head(safeloss.linear_cross_entropy), _Head(STOCK)
        stock.load_state_dict(ours.state_dict())
        want = [("call_function", safeloss.linear_cross_entropy)]
        want_stock = [("call_function", STOCK)]
    else:
        loss = safeloss.SafeLinearCrossEntropyLoss(H, C, bias=True, reduction="sum")
        sloss = torch.nn.LinearCrossEntropyLoss(H, C, bias=True, reduction="sum")
        sloss.load_state_dict(loss.state_dict())
        ours, stock = (loss, sloss) if form == "root-module" else (_Holder(loss), _Holder(sloss))
        want = [("call_module", "loss")] if form == "module" else None
        want_stock = [("call_module", "loss")]
    gm = torch.fx.symbolic_trace(ours)
    if want is not None:
        assert _fx_nodes(gm) == want
    else:  # the root itself: one call of the functional form on its parameters
        calls = [t for op, t in _fx_nodes(gm) if op == "call_function"]
        assert calls == [safeloss.linear_cross_entropy], _fx_nodes(gm)
    if form != "root-module":
        assert _fx_nodes(torch.fx.symbolic_trace(stock)) == want_stock  # stock does the same
    x, _, _, t = _data(6)
    _close(gm(x, t), stock(x, t))
    t[1] = C  # the graph calls safeloss: its checks run when the graph runs
    with pytest.raises(safeloss.TargetOutOfRangeError, match="linear_cross_entropy"):
        gm(x, t)


# ------------------------------------------------------------------------ forward AD and vmap


def _jvp_func(fn, primal, tangent, which, x, W, b, t, red, cw):
    from torch.func import jvp

    def f(v):  # type: ignore[no-untyped-def]
        args = {"x": x, "W": W, "b": b, "cw": cw, which: v}
        return fn(args["x"], args["W"], t, linear_bias=args["b"], weight=args["cw"], reduction=red,
                  label_smoothing=0.1)
    return jvp(f, (primal,), (tangent,))[1]


def _jvp_dual(fn, primal, tangent, which, x, W, b, t, red, cw):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        args = {"x": x, "W": W, "b": b, "cw": cw, which: fwAD.make_dual(primal, tangent)}
        out = fn(args["x"], args["W"], t, linear_bias=args["b"], weight=args["cw"], reduction=red,
                 label_smoothing=0.1)
        tan = fwAD.unpack_dual(out).tangent
        return None if tan is None else tan.clone()


@pytest.mark.parametrize("red", ["mean", "sum", "none"])
@pytest.mark.parametrize("which", ["x", "W", "b", "cw"])
@pytest.mark.parametrize("api", ["torch.func.jvp", "forward_ad"])
def test_forward_mode_ad_gives_stocks_tangent(api: str, which: str, red: str) -> None:
    """Tangents with respect to every operand, stock's exactly (None where stock's is None: its
    nll_loss treats the class weight as constant, its label smoothing does not)."""
    x, W, b, t = (v.double() if v.is_floating_point() else v for v in _data(6))
    cw = torch.rand(C, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5
    primal = {"x": x, "W": W, "b": b, "cw": cw}[which]
    tangent = torch.randn(primal.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    go = _jvp_func if api == "torch.func.jvp" else _jvp_dual
    got = go(safeloss.linear_cross_entropy, primal, tangent, which, x, W, b, t, red, cw)
    want = go(STOCK, primal, tangent, which, x, W, b, t, red, cw)
    if want is None:
        assert got is None
    else:
        _close(got, want)


@pytest.mark.parametrize("red", ["mean", "none"])
@pytest.mark.parametrize("over", ["class-weight", "input", "target"])
def test_vmap_matches_stock(over: str, red: str) -> None:
    from torch.func import vmap

    x, W, b, t = _data(6)
    cws = torch.rand(3, C, generator=torch.Generator().manual_seed(2)) + 0.5
    xs = torch.randn(3, 6, H, generator=torch.Generator().manual_seed(3))
    ts = torch.randint(0, C, (3, 6), generator=torch.Generator().manual_seed(4))

    def run(fn):  # type: ignore[no-untyped-def]
        # (stock's label smoothing cannot be vmapped over the target: an in-place op inside it)
        kw = dict(linear_bias=b, reduction=red, label_smoothing=0.0 if over == "target" else 0.1)
        if over == "class-weight":
            return vmap(lambda w: fn(x, W, t, weight=w, **kw))(cws)
        if over == "input":
            return vmap(lambda a: fn(a, W, t, **kw))(xs)
        return vmap(lambda c: fn(x, W, c, **kw))(ts)

    _close(run(safeloss.linear_cross_entropy), run(STOCK))


def test_vmap_over_backward_of_a_class_weight_grad_matches_stock() -> None:
    """Per-sample gradients of the class weight (probability targets, where stock differentiates it)."""
    from torch.func import grad, vmap

    x, W, b, q = _data(6, kind="prob")
    cw = torch.rand(C) + 0.5
    qs = torch.stack([q, q.flip(0), q.roll(1, 0)])

    def g(fn):  # type: ignore[no-untyped-def]
        return vmap(grad(lambda w, tq: fn(x, W, tq, linear_bias=b, weight=w)), in_dims=(None, 0))(cw, qs)

    _close(g(safeloss.linear_cross_entropy), g(STOCK))


# ------------------------------------------------------------------------ sparse and nested layouts


def _sparse(kind: str, x, W, b, t, q, cw):
    """(args, kwargs) with one operand in a sparse / nested layout."""
    kw: dict[str, object] = {"linear_bias": b}
    if kind == "input-coo":
        x = x.relu().to_sparse()
    elif kind == "input-csr":
        x = x.relu().to_sparse_csr()
    elif kind == "linear_weight-coo":
        W = W.relu().to_sparse()
    elif kind == "prob-target-coo":
        t = (q * (q > 0.1)).to_sparse()
    elif kind == "index-target-coo":
        t = t.clamp_min(0).to_sparse()
    elif kind == "class-weight-coo":
        kw["weight"] = cw.to_sparse()
    elif kind == "bias-coo":
        kw["linear_bias"] = b.to_sparse()
    elif kind == "input-nested":
        x = torch.nested.nested_tensor([x[:2], x[2:]], layout=torch.jagged)
    return (x, W, t), kw


SPARSE = ["input-coo", "input-csr", "linear_weight-coo", "prob-target-coo", "index-target-coo",
          "class-weight-coo", "bias-coo", "input-nested"]


@pytest.mark.parametrize("red", ["mean", "none"])
@pytest.mark.parametrize("kind", SPARSE)
def test_sparse_layouts_give_stocks_values_or_a_layout_error(kind: str, red: str) -> None:
    x, W, b, t = _data(6)
    q = torch.randn(6, C, generator=torch.Generator().manual_seed(1)).softmax(1)
    cw = torch.rand(C) + 0.5
    (sx, sW, st), kw = _sparse(kind, x, W, b, t, q, cw)
    if kind == "linear_weight-coo":
        # Stock's addmm has no kernel for a sparse weight with a bias: safeloss computes it.
        got = safeloss.linear_cross_entropy(sx, sW, st, reduction=red, **kw)
        _close(got, STOCK(sx, sW.to_dense(), st, reduction=red, **kw))
        kw["linear_bias"] = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stock's sparse-CSR beta notice
            want = STOCK(sx, sW, st, reduction=red, **kw)
    except (RuntimeError, NotImplementedError) as e:
        with pytest.raises(safeloss.LayoutError, match=r"linear_cross_entropy got .*(sparse|nested)") as info:
            safeloss.linear_cross_entropy(sx, sW, st, reduction=red, **kw)
        assert isinstance(info.value, (type(e), RuntimeError))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", safeloss.SafeLossWarning)  # the sparsified targets' sums
        got = safeloss.linear_cross_entropy(sx, sW, st, reduction=red, **kw)
    assert got.layout == want.layout
    _close(got.to_dense(), want.to_dense())


def test_sparse_input_gradients_match_stock() -> None:
    x, W, b, t = _data(6)
    grads = []
    for fn in (STOCK, safeloss.linear_cross_entropy):
        xs = x.relu().to_sparse().requires_grad_(True)
        Wl = W.clone().requires_grad_(True)
        loss = fn(xs, Wl, t, linear_bias=b)
        grads.append([loss, *torch.autograd.grad(loss, [xs, Wl])])
    for a, c in zip(*grads):
        assert a.layout == c.layout
        _close(a.to_dense(), c.to_dense())


# ------------------------------------------------------------------------ the decision itself


def test_the_entry_decides_once_from_every_tensor_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    """decide() sees the class weight and the bias too (a transform over the weight alone is a
    transform), and is asked once per call."""
    from safeloss.linear import api

    calls: list[Mode] = []

    def spy(*tensors):  # type: ignore[no-untyped-def]
        calls.append(decide(*tensors))
        assert len(tensors) == 5, "the entry must pass input, linear_weight, target, bias, weight"
        return calls[-1]

    monkeypatch.setattr(api, "decide", spy)
    x, W, b, t = _data(6)
    safeloss.linear_cross_entropy(x, W, t, linear_bias=b)
    assert calls == [Mode.EAGER]
    calls.clear()
    safeloss.SafeLinearCrossEntropyLoss(H, C)(x, t)
    assert calls == [Mode.EAGER]


@pytest.mark.parametrize("mode", [Mode.CAPTURE, Mode.GRAPH])
def test_no_host_read_modes_mask_bad_labels_without_reading_them(monkeypatch: pytest.MonkeyPatch, mode: Mode) -> None:
    """The no-host-read modes (CUDA-graph capture; a graph whose report op defers, as on CUDA)
    mask bad labels: NaN at that position, a zero gradient there, never an out-of-range read,
    nothing raised in the call."""
    from safeloss.linear import api

    monkeypatch.setattr(api, "decide", lambda *t: mode)
    monkeypatch.setattr(checks, "DEFER_ON_CPU", True)
    x, W, b, t = _data(6)
    t[1], t[3] = C + 2, -7
    xl = x.clone().requires_grad_(True)
    rows = safeloss.linear_cross_entropy(xl, W, t, linear_bias=b, reduction="none")
    assert torch.isnan(rows[[1, 3]]).all() and torch.isfinite(rows[[0, 2, 5]]).all()
    rows.nan_to_num().sum().backward()
    assert xl.grad[[1, 3]].abs().sum() == 0 and xl.grad[2].abs().sum() > 0
    if mode is Mode.CAPTURE:
        assert not checks._pending  # nothing may touch the host while a CUDA graph is captured
    else:  # the graph's report op deferred it: the next call raises it, in this op's words
        with pytest.raises(safeloss.TargetOutOfRangeError, match="linear_cross_entropy"):
            safeloss.check_pending()

"""Every PyTorch tool stock cross_entropy works in: TorchScript, torch.jit.trace, torch.fx, make_fx
(real / fake / symbolic), non-strict torch.export, FakeTensorMode, meta tensors, sparse layouts.

Each works with SafeCrossEntropyLoss, safeloss.cross_entropy and, under patch(), stock torch's API,
and gives stock's values and gradients; the checks that can run there still do (docs/compatibility.md).
"""

from __future__ import annotations

import importlib
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import safeloss
from tests.test_differential import CPU_BACKENDS
from tests.tolerances import assert_matches

patch_mod = importlib.import_module("safeloss.patch")  # the module (safeloss.patch is the function)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")

SETTINGS = {"weight": torch.tensor([1.0, 2.0, 0.5, 1.5]), "ignore_index": 1, "label_smoothing": 0.1}


def data(n: int = 6, c: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randint(0, c, (n,), generator=g)


def bad_labels(n: int = 6):
    y = data(n)[1]
    y[2] = 7
    return y


class WithModule(torch.nn.Module):
    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.loss = loss

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(self.lin(x), y)


class WithSafeFunction(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return safeloss.cross_entropy(self.lin(x), y, reduction="sum", label_smoothing=0.1)


class WithStockFunction(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.lin(x), y, reduction="sum", label_smoothing=0.1)


STOCK = F.cross_entropy  # captured at import, never patched: the reference


def reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Stock torch on the same model's logits."""
    logits = model.lin(x)
    if isinstance(model, WithModule):
        loss = model.loss
        return STOCK(logits, y, weight=loss.weight, ignore_index=loss.ignore_index,
                     reduction=loss.reduction, label_smoothing=loss.label_smoothing)
    return STOCK(logits, y, reduction="sum", label_smoothing=0.1)


API = ["module", "functional", "patch-module", "patch-functional"]


def build(api: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if api == "module":
        return WithModule(safeloss.SafeCrossEntropyLoss(**SETTINGS))
    if api == "functional":
        return WithSafeFunction()
    if api == "patch-module":
        return WithModule(torch.nn.CrossEntropyLoss(**SETTINGS))
    return WithStockFunction()


@pytest.fixture
def api_ctx(request, clean_patch):
    """patch() around the test for the patch-* APIs."""
    api = request.param
    if api.startswith("patch"):
        with safeloss.patch():
            yield api
    else:
        yield api


def same_values_and_grads(run, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    want = reference(model, x, y)
    (gw,) = torch.autograd.grad(want, model.lin.weight, torch.tensor(1.7))
    got = run(x, y)
    (gg,) = torch.autograd.grad(got, model.lin.weight, torch.tensor(1.7))
    assert got.dtype == want.dtype and got.shape == want.shape
    assert_matches(got, want)
    assert_matches(gg, gw)


# ------------------------------------------------------------------------------- TorchScript


@pytest.mark.parametrize("api_ctx", API, indirect=True)
def test_torchscript_compiles_and_matches_stock(api_ctx):
    model = build(api_ctx)
    scripted = torch.jit.script(model)
    x, y = data()
    same_values_and_grads(scripted, model, x, y)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    assert_matches(loaded(x, y), reference(model, x, y))
    # Scripted code runs stock torch: its checks, its messages.
    with pytest.raises(RuntimeError, match="out of bounds") as info:
        scripted(x, bad_labels())
    assert not isinstance(info.value, safeloss.SafeLossError)


def test_torchscript_scripts_the_module_itself_and_safeloss_arguments():
    loss = safeloss.SafeCrossEntropyLoss(**SETTINGS, reduction="none", strict=True, backend="torch")
    scripted = torch.jit.script(loss)
    x, y = data()
    assert_matches(scripted(x, y), F.cross_entropy(x, y, **SETTINGS, reduction="none"))

    class Extra(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return safeloss.cross_entropy(x, y, ignore_index=2, strict=True, backend="torch")

    assert_matches(torch.jit.script(Extra())(x, y), F.cross_entropy(x, y, ignore_index=2))
    with pytest.raises(RuntimeError, match=r"cannot be scripted by itself.*Script the model"):
        torch.jit.script(safeloss.cross_entropy)
    # Eager calls are untouched by the TorchScript registration.
    with pytest.raises(safeloss.TargetOutOfRangeError):
        Extra()(x, bad_labels())


# ------------------------------------------------------------------------------- torch.jit.trace


@pytest.mark.parametrize("api_ctx", API, indirect=True)
def test_jit_trace_matches_stock_and_checks_at_trace_time(api_ctx):
    model = build(api_ctx)
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # nothing of ours is frozen
        traced = torch.jit.trace(model, (x, y))
    x2, y2 = data(seed=3)
    same_values_and_grads(traced, model, x2, y2)
    assert "aten::cross_entropy_loss" in str(traced.inlined_graph)
    with pytest.raises(safeloss.BatchSizeMismatchError, match="6 predictions but 5 targets"):
        torch.jit.trace(build(api_ctx), (x, y[:5]))
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"7 at \[2\]"):
        torch.jit.trace(build(api_ctx), (x, bad_labels()))


def test_jit_trace_reports_shape_findings_and_records_the_conversion():
    loss = safeloss.SafeCrossEntropyLoss()
    x, y = data()
    with pytest.warns(safeloss.SafeLossWarning, match="squeezes the singleton"):
        traced = torch.jit.trace(loss, (x, y[:, None].int()))
    x2, y2 = data(seed=5)
    assert_matches(traced(x2, y2[:, None].int()), F.cross_entropy(x2, y2))
    with pytest.raises(safeloss.TargetShapeError):
        torch.jit.trace(safeloss.SafeCrossEntropyLoss(strict=True), (x, y[:, None]))


# ------------------------------------------------------------------------------- torch.fx


@pytest.mark.parametrize("api_ctx", API, indirect=True)
def test_fx_symbolic_trace_records_one_node_and_checks_when_run(api_ctx):
    model = build(api_ctx)
    gm = torch.fx.symbolic_trace(model)
    ops = [(n.op, n.target) for n in gm.graph.nodes if n.op in ("call_module", "call_function")]
    if api_ctx.endswith("module"):
        assert ops == [("call_module", "lin"), ("call_module", "loss")]  # a leaf, like stock's
    else:
        want = safeloss.cross_entropy if api_ctx == "functional" else patch_mod.cross_entropy
        assert ops == [("call_module", "lin"), ("call_function", want)]
    x, y = data()
    same_values_and_grads(gm, model, x, y)
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"7 at \[2\]"):
        gm(x, bad_labels())
    with pytest.raises(safeloss.BatchSizeMismatchError):
        gm(x, y[:5])


def test_fx_root_module_becomes_the_functional_with_its_settings():
    loss = safeloss.SafeCrossEntropyLoss(**SETTINGS, reduction="sum", strict=True)
    gm = torch.fx.symbolic_trace(loss)
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert node.target is safeloss.cross_entropy
    assert node.kwargs["strict"] is True and node.kwargs["reduction"] == "sum"
    x, y = data()
    assert_matches(gm(x, y), F.cross_entropy(x, y, **SETTINGS, reduction="sum"))
    with pytest.raises(safeloss.TargetOutOfRangeError):
        gm(x, bad_labels())


def test_fx_graph_traced_under_patch_is_stock_once_unpatched(clean_patch):
    with safeloss.patch():
        gm = torch.fx.symbolic_trace(WithStockFunction())
    x = data()[0]
    with pytest.raises(IndexError, match="out of bounds") as info:
        gm(x, bad_labels())
    assert not isinstance(info.value, safeloss.SafeLossError)


# ------------------------------------------------------------------------------- make_fx, export


@pytest.mark.parametrize("mode", ["real", "fake", "symbolic"])
@pytest.mark.parametrize("api_ctx", API, indirect=True)
def test_make_fx_graph_computes_stock_values_and_checks_when_run(api_ctx, mode):
    model = build(api_ctx)
    x, y = data()
    gm = make_fx(model, tracing_mode=mode, _allow_non_fake_inputs=True)(x, y)  # real parameters
    n = 9 if mode == "symbolic" else 6  # symbolic: the graph must not have specialized on N
    x2, y2 = data(n, seed=4)
    same_values_and_grads(gm, model, x2, y2)
    assert "note_findings" in gm.code  # value checks are in the graph
    if mode == "symbolic":
        assert "sym_size" in gm.code
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"7 at \[2\]"):
        gm(x, bad_labels())
    with pytest.raises(safeloss.BatchSizeMismatchError, match="6 predictions but 5 targets"):
        make_fx(build(api_ctx), tracing_mode=mode, _allow_non_fake_inputs=True)(x, y[:5])


def test_make_fx_of_forward_and_backward_matches_stock_gradients():
    x, y = data()

    def step(loss_fn):
        def f(x, y):
            x = x.detach().requires_grad_()
            return torch.autograd.grad(loss_fn(x, y), x)[0]
        return f

    gm = make_fx(step(safeloss.SafeCrossEntropyLoss(**SETTINGS)), tracing_mode="symbolic",
                 _allow_non_fake_inputs=True)(x, y)  # the real weight
    x2, y2 = data(11, seed=2)
    assert_matches(gm(x2, y2), step(torch.nn.CrossEntropyLoss(**SETTINGS))(x2, y2))


@pytest.mark.parametrize("mode", ["real", "symbolic"])
def test_make_fx_triton_backend_records_the_kernel_op(mode):
    from tests.test_differential import _cpu_reason

    if _cpu_reason is not None:
        pytest.skip(str(_cpu_reason))
    x, y = data(4)
    loss = safeloss.SafeCrossEntropyLoss(backend="triton")
    gm = make_fx(loss, tracing_mode=mode)(x, y)
    assert "triton_ce_fwd" in gm.code and "note_findings" in gm.code
    x2, y2 = data(4, seed=8)
    assert_matches(gm(x2, y2), F.cross_entropy(x2, y2))
    with pytest.raises(safeloss.TargetOutOfRangeError):
        gm(x2, bad_labels(4))


@pytest.mark.parametrize("api_ctx", API, indirect=True)
def test_aot_autograd_and_functionalize(api_ctx):
    """AOTAutograd without Dynamo (aot_module / aot_function): a metadata pass on fake tensors, then the traced joint graph;
    both must see the same (effectful) ops. functionalize: no in-place op it cannot replay."""
    from functorch.compile import aot_function, aot_module, nop

    model = build(api_ctx)
    x, y = data()
    same_values_and_grads(aot_module(model, fw_compiler=nop, bw_compiler=nop), model, x, y)
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"7 at \[2\]"):
        aot_module(build(api_ctx), fw_compiler=nop)(x, bad_labels())
    loss = safeloss.SafeCrossEntropyLoss(**SETTINGS)
    assert_matches(aot_module(loss, fw_compiler=nop)(x, y), STOCK(x, y, **SETTINGS))
    assert_matches(aot_function(safeloss.cross_entropy, fw_compiler=nop)(x, y), STOCK(x, y))
    same_values_and_grads(torch.func.functionalize(model), model, x, y)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_trace_and_fx_with_each_backend(backend):
    """jit.trace checks at trace time on the chosen backend, then records stock's op; an fx graph
    calls the module, so it runs the chosen backend with every check."""
    loss = safeloss.SafeCrossEntropyLoss(label_smoothing=0.1, backend=backend)
    x, y = data(4)
    x2, y2 = data(4, seed=9)
    traced = torch.jit.trace(loss, (x, y))
    assert_matches(traced(x2, y2), STOCK(x2, y2, label_smoothing=0.1))
    with pytest.raises(safeloss.TargetOutOfRangeError):
        torch.jit.trace(loss, (x, bad_labels(4)))
    model = WithModule(loss)
    gm = torch.fx.symbolic_trace(model)
    same_values_and_grads(gm, model, x2, y2)
    with pytest.raises(safeloss.TargetOutOfRangeError):
        gm(x2, bad_labels(4))


def test_non_strict_export_with_a_dynamic_batch():
    batch = torch.export.Dim("batch")
    x, y = data(8)
    model = WithSafeFunction()
    ep = torch.export.export(model, (x, y), dynamic_shapes=({0: batch}, {0: batch}), strict=False)
    for n in (3, 50):
        x2, y2 = data(n, seed=n)
        assert_matches(ep.module()(x2, y2), reference(model, x2, y2))


def test_non_strict_export(clean_patch):
    model = build("module")
    x, y = data()
    ep = torch.export.export(model, (x, y), strict=False)
    x2, y2 = data(seed=6)
    assert_matches(ep.module()(x2, y2), reference(model, x2, y2))
    with pytest.raises(safeloss.TargetOutOfRangeError):
        ep.module()(x, bad_labels())
    with safeloss.patch():  # fake tensors reach safeloss under patch() too
        ep = torch.export.export(build("patch-functional"), (x, y), strict=False)
    assert "note_findings" in ep.graph_module.code


# ------------------------------------------------------------------------------- fake and meta

CONFIGS = [
    {},
    {"reduction": "none"},
    {"reduction": "sum", "label_smoothing": 0.2},
    {"weight": torch.tensor([1.0, 2.0, 0.5, 1.0]), "ignore_index": 0},
    {"prob": True},
    {"kdim": True, "reduction": "none"},
]


def _case(cfg: dict[str, object], dtype: torch.dtype = torch.float32):
    cfg = dict(cfg)
    x, y = data()
    if cfg.pop("kdim", False):
        x, y = torch.randn(2, 4, 3), torch.randint(0, 4, (2, 3))
    if cfg.pop("prob", False):
        y = torch.softmax(torch.randn(6, 4), 1).to(dtype)
    return x.to(dtype), y, cfg


def _abstract(kind: str, *tensors: torch.Tensor, mode: FakeTensorMode | None = None):
    if kind == "meta":
        return [t.to("meta") for t in tensors]
    return [mode.from_tensor(t) for t in tensors]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["fake", "meta"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(c) or "default")
def test_fake_and_meta_tensors_give_stocks_shape_and_dtype(kind, cfg, backend):
    x, y, kw = _case(cfg, torch.bfloat16 if "prob" in cfg else torch.float32)
    want = F.cross_entropy(x, y, **kw)
    mode = FakeTensorMode()
    with mode if kind == "fake" else _null():
        xa, ya = _abstract(kind, x, y, mode=mode)
        wa = {k: _abstract(kind, v, mode=mode)[0] if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        got_f = safeloss.cross_entropy(xa, ya, **wa, backend=backend)
        got_m = safeloss.SafeCrossEntropyLoss(**wa, backend=backend)(xa, ya)
    for got in (got_f, got_m):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert got.is_meta == (kind == "meta")


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("kind", ["fake", "meta"])
def test_fake_and_meta_tensors_still_get_shape_checks(kind):
    x, y = data()
    mode = FakeTensorMode()
    mismatch = _abstract(kind, x, y[:5], mode=mode)
    column = _abstract(kind, x, y[:, None], mode=mode)
    bad = _abstract(kind, x, bad_labels(), mode=mode)
    with mode if kind == "fake" else _null():
        with pytest.raises(safeloss.BatchSizeMismatchError, match="6 predictions but 5 targets"):
            safeloss.cross_entropy(*mismatch)
        with pytest.warns(safeloss.SafeLossWarning, match="squeezes"):
            assert safeloss.cross_entropy(*column).shape == ()
        with pytest.raises(safeloss.TargetShapeError):
            safeloss.cross_entropy(*column, strict=True)
        # No value is read: a bad label is not (cannot be) reported here.
        assert safeloss.cross_entropy(*bad).shape == ()


def test_meta_device_model_init_under_patch(clean_patch):
    """Code the user did not write: a meta-device model with a stock loss, under patch()."""
    with safeloss.patch(), torch.device("meta"):
        model = WithModule(torch.nn.CrossEntropyLoss(label_smoothing=0.1))
        out = model(torch.empty(6, 4), torch.zeros(6, dtype=torch.long))
        assert out.is_meta and out.shape == ()
        with pytest.raises(safeloss.BatchSizeMismatchError):
            F.cross_entropy(torch.empty(6, 4), torch.zeros(5, dtype=torch.long))


def test_meta_with_triton_backend_is_not_an_error():
    x = torch.empty(6, 4, device="meta")
    y = torch.zeros(6, dtype=torch.long, device="meta")
    out = safeloss.cross_entropy(x, y, backend="triton", reduction="none")
    assert out.is_meta and out.shape == (6,)


def test_fake_cuda_tensors_take_the_kernel_path_shapes():
    """Fake tensors take their device's backend: on a (fake) CUDA device, Triton's fake op."""
    pytest.importorskip("triton")
    with FakeTensorMode():
        try:
            x = torch.empty(6, 4, device="cuda", dtype=torch.bfloat16)
        except Exception:
            pytest.skip("this torch build cannot make fake CUDA tensors")
        y = torch.zeros(6, dtype=torch.long, device="cuda")
        for red, shape in (("mean", ()), ("none", (6,))):
            out = safeloss.cross_entropy(x, y, reduction=red)
            assert out.shape == shape and out.dtype == torch.bfloat16 and out.device.type == "cuda"


def test_fake_tensors_under_patch_reach_safeloss(clean_patch):
    x, y = data()
    with safeloss.patch():
        gm = make_fx(lambda a, b: F.cross_entropy(a, b), tracing_mode="fake")(x, y)
    assert "note_findings" in gm.code


# ------------------------------------------------------------------------------- sparse


# torch's own notice on building a CSR tensor, not something safeloss says.
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state:UserWarning")
@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sparse_probability_targets_match_stock(layout, reduction, clean_patch):
    x, _ = data()
    x.requires_grad_()
    p = torch.softmax(torch.randn(6, 4), 1)
    sp = p.to_sparse() if layout == "coo" else p.to_sparse_csr()
    try:
        want = F.cross_entropy(x, sp, reduction=reduction)
    except RuntimeError:
        want = F.cross_entropy(x, p, reduction=reduction)  # stock fails (CSR "none"): dense values
    for got in (safeloss.cross_entropy(x, sp, reduction=reduction),
                safeloss.SafeCrossEntropyLoss(reduction=reduction)(x, sp)):
        assert got.layout == want.layout
        assert_matches(got.to_dense(), want.to_dense())
        (g,) = torch.autograd.grad(got.to_dense().sum(), x)
        # (stock's own backward has no sparse kernel: the dense targets' gradient is the truth)
        (gw,) = torch.autograd.grad(F.cross_entropy(x, p, reduction=reduction).sum(), x)
        assert_matches(g, gw)
    with safeloss.patch():
        assert_matches(F.cross_entropy(x, sp, reduction=reduction).to_dense(), want.to_dense())


@pytest.mark.parametrize("what", ["logits", "index-target", "weight"])
def test_sparse_logits_labels_weight_are_a_clear_error(what, clean_patch):
    x, y = data()
    w = torch.ones(4)
    args = {"logits": (x.to_sparse(), y, None), "index-target": (x, y.to_sparse(), None),
            "weight": (x, y, w.to_sparse())}[what]
    with pytest.raises(NotImplementedError):
        F.cross_entropy(*args)  # stock
    match = {"logits": r"got logits with layout torch.sparse_coo \(shape \(6, 4\)\).*Fix: logits.to_dense\(\)",
             "index-target": r"class-index targets with layout torch.sparse_coo .*Fix: target.to_dense\(\)",
             "weight": r"class weight with layout torch.sparse_coo \(shape \(4,\)\).*Fix: weight.to_dense\(\)"}[what]
    with pytest.raises(safeloss.LayoutError, match=f"(?s){match}") as info:
        safeloss.cross_entropy(*args)
    assert isinstance(info.value, NotImplementedError)
    with safeloss.patch(), pytest.raises(safeloss.LayoutError):
        F.cross_entropy(*args)


# ------------------------------------------------------------------------------- the page


def test_compatibility_page_is_current():
    """docs/compatibility.md is what running every tool observes (docs/gen_compatibility.py)."""
    import importlib.util
    import pathlib

    if not torch.__version__.startswith("2.13."):
        pytest.skip("the page quotes what torch 2.13's tools do")
    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gen_compatibility", root / "docs" / "gen_compatibility.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = gen.generate()
    assert "DIFFERENT" not in fresh and "fails:" not in fresh  # every tool gives stock's results
    committed = (root / "docs" / "compatibility.md").read_text()
    assert committed == fresh, "docs/compatibility.md is stale: run `python docs/gen_compatibility.py`"


def test_mkldnn_logits_are_a_clear_error():
    x, y = data()
    with pytest.raises(RuntimeError):
        F.cross_entropy(x.to_mkldnn(), y)  # stock
    with pytest.raises(safeloss.LayoutError, match=r"(?s)logits with layout torch._mkldnn .*Fix: logits.to_dense"):
        safeloss.cross_entropy(x.to_mkldnn(), y)


def test_user_dispatch_modes_keep_the_eager_checks():
    """A non-tracing dispatch mode (FlopCounterMode, logging modes) sees real tensors: every
    check still runs in the call."""
    from torch.utils.flop_counter import FlopCounterMode

    x, y = data()
    with FlopCounterMode(display=False):
        assert_matches(safeloss.cross_entropy(x, y), STOCK(x, y))
        with pytest.raises(safeloss.TargetOutOfRangeError, match=r"7 at \[2\]"):
            safeloss.cross_entropy(x, bad_labels())


# torch's own notice on building a strided nested tensor, not something safeloss says.
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning")
@pytest.mark.parametrize("layout", [torch.jagged, torch.strided])
def test_nested_tensors_are_a_clear_error(layout):
    logits = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)], layout=layout)
    target = torch.nested.nested_tensor([torch.tensor([0, 1]), torch.tensor([2, 1, 0, 0])], layout=layout)
    with pytest.raises(RuntimeError):
        F.cross_entropy(logits, target)  # stock
    with pytest.raises(safeloss.LayoutError, match=r"(?s)nested tensor as the logits .*2 sequences.*values\(\)"):
        safeloss.cross_entropy(logits, target)
    if layout == torch.jagged:
        assert_matches(safeloss.cross_entropy(logits.values(), target.values()),
                       STOCK(logits.values(), target.values()))


def test_onnx_export_records_stocks_op():
    """ONNX has no translation for safeloss's ops: the dynamo exporter gets stock torch's (ONNX's
    SoftmaxCrossEntropyLoss), the TorchScript-based one traces (stock's op too)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    x, y = data()

    def ops(loss: torch.nn.Module, dynamo: bool) -> set[str]:
        if dynamo:
            model = torch.onnx.export(WithModule(loss), (x, y), dynamo=True).model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(WithModule(loss), (x, y), buf, dynamo=False)
            model = onnx.load_from_string(buf.getvalue())
        return {n.op_type for n in model.graph.node}

    for dynamo in (True, False):
        assert ops(safeloss.SafeCrossEntropyLoss(), dynamo) == ops(torch.nn.CrossEntropyLoss(), dynamo)
    with pytest.raises(Exception) as info:
        torch.onnx.export(WithModule(safeloss.SafeCrossEntropyLoss()), (x, y[:5]), dynamo=True)
    cause = info.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, safeloss.BatchSizeMismatchError)


def test_onnx_exporting_graphs_get_stocks_op(monkeypatch):
    """The same without the onnx packages: while the exporter's flag is set, a traced graph holds
    stock torch's ops and no safeloss op."""
    import sys
    import types

    flags = types.ModuleType("torch.onnx._internal.exporter._flags")
    flags._is_onnx_exporting = True
    monkeypatch.setitem(sys.modules, flags.__name__, flags)
    x, y = data()
    gm = make_fx(safeloss.SafeCrossEntropyLoss(), tracing_mode="symbolic")(x, y)
    assert "safeloss" not in gm.code and "nll_loss" in gm.code
    x2, y2 = data(9, seed=2)
    assert_matches(gm(x2, y2), STOCK(x2, y2))
    with pytest.raises(safeloss.BatchSizeMismatchError):
        make_fx(safeloss.SafeCrossEntropyLoss(), tracing_mode="symbolic")(x, y[:5])

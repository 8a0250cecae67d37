"""Hostile use of ``backend="triton"``, through the public API: odd layouts, tiny and degenerate
shapes, every target dtype, awkward ``ignore_index`` values, half precision, non-finite logits,
the memory modes (``inplace_backward``, ``fused_grad``) and autograd corner cases. Every case is
held against stock ``F.cross_entropy`` (values, gradients for a random upstream gradient, result
dtype) and against ``backend="torch"`` (the same warnings for the same input).

Under the Triton interpreter on CPU (TRITON_INTERPRET=1, set before triton is imported): shapes
stay tiny, and ``FORCE_BLOCK_C`` / ``FORCE_BLOCK_P`` make them span several tiles.
"""

import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import torch.nn.functional as F

import safeloss
from safeloss.backends import triton_backend as tb
from tests.tolerances import HALF, TIGHT

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if DEV.type == "cpu" and tb.unavailable_reason(DEV) is not None:
    pytest.skip(f"Triton backend unavailable: {tb.unavailable_reason(DEV)}", allow_module_level=True)

# numpy, under the interpreter, computing a NaN / inf row (a GPU launch warns nothing)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(autouse=True)
def _seed_and_reset() -> None:
    torch.manual_seed(0)
    yield
    tb.FORCE_BLOCK_C = None
    tb.FORCE_BLOCK_P = None


_SAFELOSS_ONLY = ("fused_grad", "inplace_backward")


def _run(backend: str, x: torch.Tensor, t: torch.Tensor, g_seed: int = 1, **kw):
    """(result, d/dx, d/dtarget or None, warning messages) for one call and a random upstream gradient."""
    xo = x.detach().requires_grad_()  # a leaf with x's layout (strides, offset, expanded rows)
    to = t.detach().requires_grad_() if t.is_floating_point() else t
    safeloss.reset_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if backend == "stock":
            out = F.cross_entropy(xo, to, **{k: v for k, v in kw.items() if k not in _SAFELOSS_ONLY})
        else:
            out = safeloss.cross_entropy(xo, to, backend=backend, **kw)
        gen = torch.Generator().manual_seed(g_seed)
        g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
        dx, *dt = torch.autograd.grad(out, [xo, to] if to.requires_grad else [xo], g)
    msgs = [str(w.message) for w in caught if not issubclass(w.category, RuntimeWarning)]
    return out, dx, (dt[0] if dt else None), msgs


def _same(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} != {ref.dtype}"
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    rtol, atol = TIGHT.get(ref.dtype) or HALF[ref.dtype]
    if ref.dtype in HALF:  # the gradient / loss is rounded to the half format once, either side
        rtol, atol = 4 * rtol, 4 * atol
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol, equal_nan=True, msg=what)


def _outcome(backend: str, x: torch.Tensor, t: torch.Tensor, **kw):
    try:
        return _run(backend, x, t, **kw)
    except Exception as exc:  # compared between the backends: the same class and message
        return exc


def _agree(x: torch.Tensor, t: torch.Tensor, **kw) -> None:
    """backend="triton" == stock (values, gradients, dtypes) where stock takes the input, and ==
    backend="torch" everywhere (values, and the same warnings or the same error)."""
    stock = _outcome("stock", x, t, **kw)
    ref = _outcome("torch", x, t, **kw)
    ours = _outcome("triton", x, t, **kw)
    if isinstance(ref, Exception) or isinstance(ours, Exception):
        assert type(ours) is type(ref) and str(ours) == str(ref), f"backend=torch: {ref!r}, triton: {ours!r}"
        return
    k_out, k_dx, k_dt, k_msgs = ours
    r_out, r_dx, _, r_msgs = ref
    if not isinstance(stock, Exception):
        s_out, s_dx, s_dt, _ = stock
        _same(k_out, s_out, "result vs stock")
        _same(k_dx, s_dx, "d/dinput vs stock")
        if s_dt is not None:
            _same(k_dt, s_dt, "d/dtarget vs stock")
    assert k_msgs == r_msgs, f"warnings differ: torch backend {r_msgs}, triton {k_msgs}"
    _same(k_out, r_out, "result vs backend=torch")
    _same(k_dx, r_dx, "d/dinput vs backend=torch")


def _t(n: tuple[int, ...], C: int) -> torch.Tensor:
    return torch.randint(0, C, n, device=DEV)


# ---------------------------------------------------------------------------------- layouts
def _layout(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    C = 5
    r = lambda *s: torch.randn(*s, device=DEV)  # noqa: E731
    if name == "transposed":
        return r(C, 6).t(), _t((6,), C)
    if name == "sliced-columns":
        return r(6, 2 * C)[:, ::2], _t((6,), C)
    if name == "odd-strides":
        return r(18, 3 * C)[::3, 1::3], _t((6,), C)
    if name == "expanded-rows":
        return r(1, C).expand(6, C), _t((6,), C)
    if name == "storage-offset":
        return r(50)[7:37].view(6, C), _t((6,), C)
    if name == "4d-contiguous":
        return r(2, C, 3, 2), _t((2, 3, 2), C)
    if name == "4d-channels-last":
        return r(2, C, 3, 2).contiguous(memory_format=torch.channels_last), _t((2, 3, 2), C)
    if name == "5d-channels-last-3d":
        return r(2, C, 2, 3, 2).contiguous(memory_format=torch.channels_last_3d), _t((2, 2, 3, 2), C)
    if name == "5d-permuted":
        return r(2, 2, 3, C, 2).permute(0, 3, 4, 1, 2), _t((2, 2, 2, 3), C)
    if name == "6d-exotic":  # more than 3 irreducible position dims: contiguous copies
        return r(2, C, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4), _t((2, 2, 2, 2, 2), C)
    if name == "1d-input":
        return r(C), torch.tensor(2, device=DEV)
    if name == "N=1":
        return r(1, C), _t((1,), C)
    if name == "C=1":
        return r(4, 1), torch.zeros(4, dtype=torch.long, device=DEV)
    if name == "C=2":
        return r(4, 2), _t((4,), 2)
    if name == "N=0":
        return r(0, C), _t((0,), C)
    if name == "4d-H=0":
        return r(2, C, 0, 2), _t((2, 0, 2), C)
    raise AssertionError(name)


LAYOUTS = ["transposed", "sliced-columns", "odd-strides", "expanded-rows", "storage-offset",
           "4d-contiguous", "4d-channels-last", "5d-channels-last-3d", "5d-permuted", "6d-exotic",
           "1d-input", "N=1", "C=1", "C=2", "N=0", "4d-H=0"]  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_and_degenerate_shapes(layout: str, reduction: str) -> None:
    x, t = _layout(layout)
    _agree(x, t, reduction=reduction)


# ---------------------------------------------------------------------------------- multi-tile
@pytest.mark.parametrize("C", [3, 7, 13])
@pytest.mark.parametrize(
    "case", ["index-smooth-weight-ignore", "prob-smooth-weight", "4d-fused", "channels-last-fused", "inplace"]
)
def test_many_tiles_small_shapes(C: int, case: str) -> None:
    """2-column blocks (and 2-position blocks): every row streams over several blocks, and the last
    block of a row not a power of two is partly padding."""
    tb.FORCE_BLOCK_C, tb.FORCE_BLOCK_P = 2, 2
    t = _t((5,), C)
    w = torch.rand(C, device=DEV)
    if case == "index-smooth-weight-ignore":
        _agree(torch.randn(5, C, device=DEV), t, weight=w, label_smoothing=0.2, ignore_index=int(t[0]))
    elif case == "prob-smooth-weight":
        y = torch.softmax(torch.randn(5, C, device=DEV), 1)
        _agree(torch.randn(5, C, device=DEV), y, weight=w, label_smoothing=0.1)
    elif case == "4d-fused":
        _agree(torch.randn(2, C, 3, 3, device=DEV), _t((2, 3, 3), C), fused_grad=True, reduction="sum")
    elif case == "channels-last-fused":
        x = torch.randn(2, C, 3, 3, device=DEV).contiguous(memory_format=torch.channels_last)
        _agree(x, _t((2, 3, 3), C), fused_grad=True, weight=w, label_smoothing=0.1)
    else:
        _agree(torch.randn(5, C, device=DEV) * 1.0, t, inplace_backward=True, reduction="none")


# ---------------------------------------------------------------------------------- targets
@pytest.mark.parametrize("tdtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_every_target_dtype(tdtype: torch.dtype) -> None:
    t = _t((6,), 5).to(tdtype)
    _agree(torch.randn(6, 5, device=DEV), t, label_smoothing=0.1)


@pytest.mark.parametrize("ignore_index", [-100, 0, 4, 5, 2**40, -1, -7])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignore_index_values_with_smoothing_and_weights(ignore_index: int, reduction: str) -> None:
    t = _t((6,), 5)
    t[1] = t[2] = ignore_index
    w = torch.rand(5, device=DEV)
    _agree(torch.randn(6, 5, device=DEV), t, ignore_index=ignore_index, label_smoothing=0.2, weight=w,
           reduction=reduction)  # fmt: skip


@pytest.mark.parametrize("case", ["zero-weight-total", "zero-weight-total-smooth", "all-ignored", "all-ignored-smooth"])
def test_nothing_to_average(case: str) -> None:
    """Torch's NaN mean (0/0) and its gradients: zeros, or NaN where the weights sum to 0."""
    t = _t((6,), 5)
    eps = 0.1 if case.endswith("smooth") else 0.0
    if case.startswith("zero-weight"):
        w = torch.rand(5, device=DEV)
        w[t] = 0.0
        _agree(torch.randn(6, 5, device=DEV), t, weight=w, label_smoothing=eps)
    else:
        _agree(torch.randn(6, 5, device=DEV), torch.full_like(t, -100), label_smoothing=eps)


# ---------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["plain", "prob", "fused", "inplace"])
def test_float_dtypes(dtype: torch.dtype, mode: str) -> None:
    x = torch.randn(6, 5, device=DEV, dtype=dtype) * 1.0
    if mode == "prob":
        _agree(x, torch.softmax(torch.randn(6, 5, device=DEV), 1).to(dtype))
    else:
        _agree(x, _t((6,), 5), fused_grad=mode == "fused", inplace_backward=mode == "inplace")


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_fp16_overflow(reduction: str) -> None:
    """Each loss fits float16, their sum does not: inf, as stock, and the same warning as torch's."""
    x = torch.zeros(3, 3, dtype=torch.float16, device=DEV)
    x[:, 0] = 30000
    _agree(x, torch.ones(3, dtype=torch.long, device=DEV), reduction=reduction)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_nonfinite_logits_in_counted_rows(bad: str) -> None:
    x = torch.randn(6, 5, device=DEV)
    x[1, 2] = float(bad)
    _agree(x, _t((6,), 5), reduction="none")


# A documented difference (docs/migration.md, section 4): the kernel gives ignored rows exactly
# zero gradient (``ce_bwd_kernel``: ``tl.where(active, d, 0.0)``), also where their logits hold
# NaN or +inf; stock (and backend="torch", stock's own op) give NaN there (log_softmax's backward:
# 0 - softmax * 0). Every other entry, the loss and the warnings agree.
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nonfinite_logits_in_ignored_rows(bad: str) -> None:
    x = torch.randn(6, 5, device=DEV)
    x[1, 2] = float(bad)
    t = _t((6,), 5)
    t[1] = -100
    s_out, s_dx, _, _ = _run("stock", x, t)
    r_out, r_dx, _, r_msgs = _run("torch", x, t)
    k_out, k_dx, _, k_msgs = _run("triton", x, t)
    assert torch.isnan(s_dx[1]).any() and torch.isnan(r_dx[1]).any()  # stock's, as documented
    assert torch.equal(k_dx[1], torch.zeros_like(k_dx[1]))  # the kernel's exact zero
    keep = torch.arange(6) != 1
    _same(k_dx[keep], s_dx[keep], "d/dinput of the other rows vs stock")
    _same(k_out, s_out, "result vs stock")
    _same(r_out, s_out, "torch backend result vs stock")
    assert k_msgs == r_msgs


# ---------------------------------------------------------------------------------- memory modes
def _leaf_case(kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the tensor the caller holds, the logits passed in, a copy of the held values)."""
    held = torch.randn(4, 5, device=DEV)
    if kind == "parameter":
        held = torch.nn.Parameter(held)
    else:
        held.requires_grad_()
    logits = {"leaf": held, "parameter": held, "view-of-leaf": held[:, :],
              "reshaped-leaf": held.view(2, 2, 5).view(4, 5)}[kind]  # fmt: skip
    return held, logits, held.detach().clone()


@pytest.mark.parametrize("kind", ["leaf", "parameter", "view-of-leaf", "reshaped-leaf"])
@pytest.mark.parametrize("entry", ["functional", "module"])
def test_inplace_backward_never_overwrites_a_leaf(kind: str, entry: str) -> None:
    """A leaf that requires grad (or a view of one) is the caller's own tensor, a Parameter
    maybe: torch refuses in-place ops on it, so inplace_backward must not write the gradient
    over it (the optimizer would then step from the gradient instead of the weights)."""
    held, logits, before = _leaf_case(kind)
    t = _t((4,), 5)
    if entry == "functional":
        loss = safeloss.cross_entropy(logits, t, backend="triton", inplace_backward=True)
    else:
        loss = safeloss.SafeCrossEntropyLoss(backend="triton", inplace_backward=True)(logits, t)
    loss.backward()
    assert torch.equal(held.detach(), before), "inplace_backward overwrote the caller's leaf tensor"
    ref = before.clone().requires_grad_()
    F.cross_entropy(ref, t).backward()
    _same(held.grad, ref.grad, "d/dinput")


@pytest.mark.parametrize("kind", ["parameter", "view-of-leaf"])
def test_inplace_backward_never_overwrites_a_leaf_compiled(kind: str) -> None:
    """The same under torch.compile, where the custom op's autograd sees functional tensors
    (no leaf there): the choice is made where the op is called, on the traced tensors."""
    held, _, before = _leaf_case(kind)
    t = _t((4,), 5)
    view = kind == "view-of-leaf"

    def fn(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return safeloss.cross_entropy(h[:, :] if view else h, t, backend="triton", inplace_backward=True)

    torch._dynamo.reset()
    torch.compile(fn, backend="aot_eager", fullgraph=True)(held, t).backward()
    assert torch.equal(held.detach(), before), "inplace_backward overwrote the caller's leaf tensor"
    ref = before.clone().requires_grad_()
    F.cross_entropy(ref, t).backward()
    _same(held.grad, ref.grad, "d/dinput")


def test_inplace_backward_still_reuses_intermediate_logits() -> None:
    """The fallback is for leaves only: logits a layer produced still take their gradient."""
    a = torch.randn(4, 5, device=DEV, requires_grad=True)
    h = a * 2.0
    t = _t((4,), 5)
    (dh,) = torch.autograd.grad(safeloss.cross_entropy(h, t, backend="triton", inplace_backward=True), h)
    assert dh.data_ptr() == h.data_ptr() and h._version == 1


@pytest.mark.parametrize("mode", ["inplace", "fused"])
def test_memory_modes_second_backward_fails_loudly(mode: str) -> None:
    """retain_graph and a second backward: the stored gradient / the logits were consumed; the
    version counter refuses rather than returning a wrong gradient."""
    a = torch.randn(4, 5, device=DEV, requires_grad=True)
    loss = safeloss.cross_entropy(a * 2.0, _t((4,), 5), backend="triton",
                                  inplace_backward=mode == "inplace", fused_grad=mode == "fused")  # fmt: skip
    loss.backward(retain_graph=True)
    # fused: a safeloss.BackendError that says why (tests/test_runtime_hostile.py)
    match = "modified by an inplace operation" if mode == "inplace" else "second backward through"
    with pytest.raises(RuntimeError, match=match):
        loss.backward()


@pytest.mark.parametrize("mode", ["plain", "inplace", "fused", "prob-smooth-weight"])
def test_double_backward(mode: str) -> None:
    a = torch.randn(3, 5, device=DEV, dtype=torch.float64, requires_grad=True)
    kw: dict = {"inplace_backward": mode == "inplace", "fused_grad": mode == "fused"}
    t = _t((3,), 5)
    if mode == "prob-smooth-weight":
        t = torch.softmax(torch.randn(3, 5, device=DEV, dtype=torch.float64), 1)
        kw = {"label_smoothing": 0.1, "weight": torch.rand(5, device=DEV, dtype=torch.float64)}

    def hvp(fn, **k):
        x = a.detach().requires_grad_()
        (g,) = torch.autograd.grad(fn(x * 1.0, t, **k), x, create_graph=True)
        return torch.autograd.grad((g * g).sum(), x)[0]

    ref_kw = {k: v for k, v in kw.items() if k not in ("inplace_backward", "fused_grad")}
    _same(hvp(safeloss.cross_entropy, backend="triton", **kw), hvp(F.cross_entropy, **ref_kw), "hvp")


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.2, "reduction": "none"}, {"softcap": 2.0, "temperature": 0.7, "z_loss": 0.01}])
def test_gradcheck_probability_targets(kw: dict) -> None:
    x = torch.randn(3, 5, device=DEV, dtype=torch.float64, requires_grad=True)
    y = torch.softmax(torch.randn(3, 5, device=DEV, dtype=torch.float64), 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: safeloss.cross_entropy(x, y, backend="triton", **kw), (x, y))


# ---------------------------------------------------------------------------------- deferred findings
@pytest.mark.parametrize("case", ["label-out-of-range", "negative-label", "softmaxed-input", "nan-logit", "prob-bad-sum"])
def test_deferred_findings_same_as_torch_backend(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU findings model on CPU (DEFER_ON_CPU): the call returns, check_pending() reports;
    the Triton kernel's counts give the same report as the torch backend's."""
    from safeloss.core import checks

    monkeypatch.setattr(checks, "DEFER_ON_CPU", True)
    x, t = torch.randn(4, 5, device=DEV), _t((4,), 5)
    if case == "label-out-of-range":
        t[2] = 7
    elif case == "negative-label":
        t[2] = -3
    elif case == "softmaxed-input":
        x = torch.softmax(x, 1)
    elif case == "nan-logit":
        x[1, 1] = float("nan")
    else:
        t = torch.rand(4, 5, device=DEV)

    def outcome(backend: str) -> list[str]:
        safeloss.reset_warnings()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            safeloss.cross_entropy(x, t, backend=backend)
            try:
                safeloss.check_pending()
                seen = ["no error"]
            except Exception as exc:
                seen = [f"{type(exc).__name__}: {exc}"]
        return seen + [str(w.message) for w in caught if not issubclass(w.category, RuntimeWarning)]

    ref, ours = outcome("torch"), outcome("triton")
    assert ours == ref
    assert len(ref) > 1 or ref[0] != "no error"  # the finding was reported at all

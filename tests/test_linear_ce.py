"""safeloss.linear_cross_entropy / SafeLinearCrossEntropyLoss: the drop-in contract against stock
torch's reference path (values and every gradient), the catalogue in this API's terms, the
memory bound (no logits-sized tensor is ever created), and patch() on both stock paths.

Chunks are forced small (3 rows) so every case runs the chunk loop several times.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import safeloss
from safeloss.backends import dispatch
from safeloss.linear import chunked
from tests.tolerances import assert_matches

STOCK = F.linear_cross_entropy  # captured before any patch()
STOCK_FORWARD = torch.nn.LinearCrossEntropyLoss.__dict__["forward"]
H, C, N = 5, 7, 10
KDIM = (3, 2)


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunked, "FORCE_ROWS", 3)


def _triton_param():
    reason = dispatch.triton_unavailable_reason(torch.device("cpu"))
    return pytest.param("triton", marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(kind: str, shape: str, ignore: int | None, dtype: torch.dtype, bias: bool, weight: bool,
         seed: int = 0):
    out = KDIM if shape == "kdim" else ()
    x = torch.randn((N, H) if shape != "1d" else (H,), generator=_gen(seed), dtype=torch.float64)
    W = torch.randn((C, *out, H), generator=_gen(seed + 1), dtype=torch.float64)
    b = torch.randn((C, *out), generator=_gen(seed + 2), dtype=torch.float64) if bias else None
    lead = (N,) if shape != "1d" else ()
    if kind.startswith("prob"):
        t = torch.randn((*lead, C, *out), generator=_gen(seed + 3), dtype=torch.float64)
        t = t.softmax(0 if shape == "1d" else 1).to(dtype)
        if kind == "prob-grad":
            t.requires_grad_(True)
    else:
        t = torch.randint(0, C, (*lead, *out), generator=_gen(seed + 3))
        if t.dim() and ignore is not None:
            flat = t.view(-1)
            flat[::3] = ignore if not 0 <= ignore < C else flat[::3]
            if 0 <= ignore < C:
                flat[1::3] = ignore
        t = t.clamp_min(0) if kind == "uint8" else t
        t = t.to({"int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}[kind])
    w = torch.rand(C, generator=_gen(seed + 4), dtype=torch.float64).to(dtype) + 0.1 if weight else None
    leaves = [v.to(dtype).requires_grad_(True) if v is not None else None for v in (x, W, b)]
    return (*leaves, t, w)


def _call(fn, x, W, t, b, w, **kw):
    return fn(x, W, t, linear_bias=b, weight=w, **kw)


def _grads(out, leaves, seed=9):
    up = torch.randn(out.shape, generator=_gen(seed), dtype=torch.float64).to(out.dtype) \
        if out.dim() else torch.tensor(2.5, dtype=out.dtype)
    wrt = [v for v in leaves if v is not None and v.requires_grad]
    return list(torch.autograd.grad(out, wrt, up, allow_unused=False))


def _compare(kind, shape, ignore, dtype, bias, weight, red, eps, backend="torch"):
    x, W, b, t, w = make(kind, shape, ignore, dtype, bias, weight)
    kw = dict(reduction=red, label_smoothing=eps)
    if ignore is not None:
        kw["ignore_index"] = ignore
    leaves = [x, W, b, t if kind == "prob-grad" else None]
    # stock rejects int32 labels, and uint8 ones on some paths; safeloss takes them
    st = t.long() if kind in ("int32", "uint8") else t
    stock = _call(STOCK, x, W, st, b, w, **kw)
    gs = _grads(stock, leaves)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", safeloss.SafeLossWarning)
        ours = _call(safeloss.linear_cross_entropy, x, W, t, b, w, backend=backend, **kw)
    go = _grads(ours, leaves)
    truth = None
    if dtype in (torch.float16, torch.bfloat16):
        def up(v):
            return None if v is None else v.detach().double().requires_grad_(v.requires_grad)
        lx, lW, lb, lt = up(x), up(W), up(b), up(t) if kind.startswith("prob") else st
        tw = None if w is None else w.double()
        tr = _call(STOCK, lx, lW, lt, lb, tw, **kw)
        truth = [tr, *_grads(tr, [lx, lW, lb, lt if kind == "prob-grad" else None])]
    names = ["value", "d/dinput", "d/dlinear_weight", "d/dlinear_bias", "d/dtarget"]
    names = ["value"] + [n for n, v in zip(names[1:], leaves) if v is not None]
    for i, (o, s) in enumerate(zip([ours, *go], [stock, *gs])):
        assert_matches(o, s, None if truth is None else truth[i].to(s.dtype), what=names[i])


# ------------------------------------------------------------------------ differential grid

GRID = [
    *[("int64", s, ii) for s in ("2d", "1d", "kdim") for ii in (None, -100, 1, -1)],
    ("int32", "2d", -1), ("uint8", "2d", None), ("uint8", "2d", 1),
    *[(k, s, None) for k in ("prob", "prob-grad") for s in ("2d", "1d", "kdim")],
]


@pytest.mark.parametrize("kind,shape,ignore", GRID)
@pytest.mark.parametrize("red", ["mean", "sum", "none"])
def test_grid_fp64(kind, shape, ignore, red):
    # each of smoothing, bias and class weight alone and with each other
    for eps, bias, weight in ((0.0, False, False), (0.1, True, False), (0.0, True, True), (0.1, False, True)):
        _compare(kind, shape, ignore, torch.float64, bias, weight, red, eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind,shape", [("int64", "2d"), ("int64", "kdim"), ("prob-grad", "2d")])
@pytest.mark.parametrize("red", ["mean", "none"])
def test_grid_dtypes(dtype, kind, shape, red):
    for eps, weight in ((0.0, False), (0.1, True)):
        _compare(kind, shape, -100 if kind == "int64" else None, dtype, True, weight, red, eps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_operand_path_of_cuda_on_cpu(monkeypatch, dtype):
    """The CUDA half-precision path (half matmuls accumulating in fp32, a half d/dlinear_weight
    accumulator), exercised on CPU tensors."""
    monkeypatch.setattr(chunked, "HALF_OPERANDS_ON_CPU", True)
    for red in ("mean", "none"):
        _compare("int64", "2d", -100, dtype, True, True, red, 0.1)
        _compare("prob-grad", "2d", None, dtype, True, False, red, 0.0)


@pytest.mark.parametrize("backend", [_triton_param()])
@pytest.mark.parametrize("red", ["mean", "sum", "none"])
def test_grid_triton_tile(backend, red):
    """The Triton share (the class-index tile of a plain head), through the interpreter on CPU."""
    for eps, weight, ignore in ((0.0, False, None), (0.1, True, 1)):
        _compare("int64", "2d", ignore, torch.float32, True, weight, red, eps, backend=backend)


def test_autocast_matches_stock_dtype_and_value():
    x, W, b, t, _ = make("int64", "2d", None, torch.float32, True, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = STOCK(x, W, t, linear_bias=b)
        o = safeloss.linear_cross_entropy(x, W, t, linear_bias=b)
    assert o.dtype == s.dtype == torch.float32
    torch.testing.assert_close(o, s, rtol=2e-2, atol=2e-2)
    gs = torch.autograd.grad(s, [x, W])
    go = torch.autograd.grad(o, [x, W])
    for a, c in zip(go, gs):
        assert a.dtype == c.dtype
        torch.testing.assert_close(a, c, rtol=5e-2, atol=5e-3)


def test_double_backward_matches_stock():
    x, W, b, t, _ = make("int64", "2d", -100, torch.float64, True, False)
    res = []
    for fn in (STOCK, safeloss.linear_cross_entropy):
        loss = fn(x, W, t, linear_bias=b, label_smoothing=0.1)
        (gx,) = torch.autograd.grad(loss, [x], create_graph=True)
        res.append(torch.autograd.grad((gx ** 2).sum(), [x, W, b]))
    for a, c in zip(*res):
        torch.testing.assert_close(a, c)


def test_retain_graph_backward_twice_gives_the_same_gradients():
    x, W, _, t, _ = make("int64", "2d", None, torch.float64, False, False)
    loss = safeloss.linear_cross_entropy(x, W, t) * 3.0
    loss.backward(retain_graph=True)
    first = W.grad.clone()
    loss.backward()
    torch.testing.assert_close(W.grad, 2 * first)


def test_nonuniform_upstream_gradient_of_a_mean_is_exact():
    """A gradient that is not an expanded scalar (here: the loss used in a product with itself)
    takes the exact path; the shortcut is only for what the reductions produce."""
    x, W, b, t, _ = make("int64", "2d", None, torch.float64, True, False)
    res = []
    for fn in (STOCK, safeloss.linear_cross_entropy):
        rows = fn(x, W, t, linear_bias=b, reduction="none")
        res.append(torch.autograd.grad((rows * torch.arange(N)).sum(), [x, W, b]))
    for a, c in zip(*res):
        torch.testing.assert_close(a, c)


def test_degenerate_means_match_stock():
    x, W, _, _, _ = make("int64", "2d", None, torch.float64, False, False)
    cases = [dict(target=torch.full((N,), -100)),  # all ignored: NaN, zero gradients
             dict(target=torch.zeros(N, dtype=torch.long),  # total weight 0: NaN gradients
                  weight=torch.tensor([0.0] + [1.0] * (C - 1), dtype=torch.float64))]
    for kw in cases:
        res = []
        for fn in (STOCK, safeloss.linear_cross_entropy):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", safeloss.SafeLossWarning)
                loss = fn(x, W, kw["target"], weight=kw.get("weight"))
            res.append([loss, *torch.autograd.grad(loss, [x, W])])
        for a, c in zip(*res):
            torch.testing.assert_close(a, c, equal_nan=True)


def test_empty_batch():
    x = torch.zeros(0, H, requires_grad=True)
    W = torch.randn(C, H, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    assert safeloss.linear_cross_entropy(x, W, t, reduction="none").shape == (0,)
    loss = safeloss.linear_cross_entropy(x, W, t, reduction="sum")
    loss.backward()
    assert loss.item() == 0 and W.grad.abs().sum() == 0


# ------------------------------------------------------------------------ memory


class _Largest(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and o.untyped_storage().nbytes() > 0:
                self.largest = max(self.largest, o.untyped_storage().nbytes() // o.element_size())
        return out


@pytest.mark.parametrize("kind", ["int64", "prob"])
@pytest.mark.parametrize("red", ["mean", "none"])
def test_no_logits_sized_tensor_is_ever_created(monkeypatch, kind, red):
    """Whatever options says: the largest tensor of forward + backward is a tile (or an input's
    gradient), never the (N, C) logits."""
    n, h, c = 64, 8, 1000
    monkeypatch.setattr(chunked, "FORCE_ROWS", 8)
    x = torch.randn(n, h, requires_grad=True)
    W = torch.randn(c, h, requires_grad=True)
    t = torch.randint(0, c, (n,)) if kind == "int64" else None
    # a probability target is itself (N, C): the bound is the tile plus the inputs' own sizes
    q = torch.randn(n, c).softmax(1) if kind == "prob" else None
    mode = _Largest()
    with mode, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "linear_cross_entropy: ``options`` ignored")  # prob
        loss = safeloss.linear_cross_entropy(x, W, t if q is None else q, reduction=red,
                                             options=torch.nn.LinearCrossEntropyOptions())
        (loss.sum() if red == "none" else loss).backward()
    limit = c * h if kind == "int64" else n * c  # dW, or the probability target itself
    assert mode.largest <= max(limit, 2 * 8 * c), mode.largest
    if kind == "int64":
        assert mode.largest < n * c
        # stock's reference path does create the logits (the probe can see them)
        probe = _Largest()
        with probe:
            STOCK(x, W, t).backward()
        assert probe.largest >= n * c


# ------------------------------------------------------------------------ module


def test_module_matches_stock_module_and_state_dict_round_trips():
    for out_features, bias in (((), True), (KDIM, True), ((), False)):
        torch.manual_seed(0)
        stock = torch.nn.LinearCrossEntropyLoss(H, C, out_features=out_features, bias=bias,
                                                dtype=torch.float64, label_smoothing=0.1)
        ours = safeloss.SafeLinearCrossEntropyLoss(H, C, out_features=out_features, bias=bias,
                                                   dtype=torch.float64, label_smoothing=0.1)
        assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
        assert ours.state_dict().keys() == stock.state_dict().keys()
        ours.load_state_dict(stock.state_dict())
        stock.load_state_dict(ours.state_dict())
        x = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
        t = torch.randint(0, C, (N, *out_features))
        s, o = stock(x, t), ours(x, t)
        torch.testing.assert_close(o, s)
        gs = torch.autograd.grad(s, [x, *stock.parameters()])
        go = torch.autograd.grad(o, [x, *ours.parameters()])
        for a, c in zip(go, gs):
            torch.testing.assert_close(a, c)


def test_module_copy_pickle_repr_and_construction_errors():
    m = safeloss.SafeLinearCrossEntropyLoss(H, C, strict=True, backend="torch")
    assert "strict=True" in repr(m) and "backend='torch'" in repr(m)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert clone.strict is True and torch.equal(clone.linear.weight, m.linear.weight)
    with pytest.raises(safeloss.ReductionError, match="not a valid reduction"):
        safeloss.SafeLinearCrossEntropyLoss(H, C, reduction="avg")
    with pytest.raises(safeloss.LabelSmoothingError, match=r"between 0\.0 and 1\.0"):
        safeloss.SafeLinearCrossEntropyLoss(H, C, label_smoothing=-0.1)
    with pytest.raises(safeloss.ArgumentTypeError, match="LinearCrossEntropyOptions"):
        safeloss.SafeLinearCrossEntropyLoss(H, C, options={"batch_chunk_size": 8})
    with pytest.raises(safeloss.BackendError, match="not a safeloss backend"):
        safeloss.SafeLinearCrossEntropyLoss(H, C, backend="cuda")


def test_module_warns_once_per_instance():
    m = safeloss.SafeLinearCrossEntropyLoss(H, C)
    x = torch.randn(N, H)
    t = torch.randint(0, C, (N, 1))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            m(x, t)
    assert len([r for r in rec if issubclass(r.category, safeloss.SafeLossWarning)]) == 1


# ------------------------------------------------------------------------ catalogue


def _x():
    return torch.randn(6, 8)


W8 = torch.randn(5, 8)
T6 = torch.tensor([0, 1, 2, 3, 4, 0])


def lce(*a, **k):
    return safeloss.linear_cross_entropy(*a, **k)


@pytest.mark.parametrize("args,kwargs,err,match", [
    ((torch.randn(2, 3, 8), W8, torch.randint(0, 5, (2, 3))), {}, safeloss.InputError,
     r"expects the input as \(N, H\).*x\.reshape\(-1, 8\).*target\.reshape\(-1\)"),
    ((torch.randn(8).sum(), W8, T6), {}, safeloss.InputError, "0-d input"),
    ((torch.randn(6, 8), torch.randn(8, 50), T6), {}, safeloss.InputError,
     r"feature size 8 does not match.*\(8, 50\).*looks transposed.*linear_weight\.T"),
    ((torch.randn(6, 50), torch.randn(50, 8), T6), {}, safeloss.InputError,
     r"exactly the layer's number of classes C=50.*applied\s+twice"),
    ((torch.randn(6, 7), W8, T6), {}, safeloss.InputError, r"feature size 7.*nn\.Linear\(7, 5\)"),
    ((torch.randint(0, 5, (6, 8)), W8, T6), {}, safeloss.InputDtypeError, "token ids or labels"),
    ((_x(), W8.long(), T6), {}, safeloss.InputDtypeError, "float weight of the output layer"),
    ((_x(), torch.randn(8), T6), {}, safeloss.InputError, r"1-D linear_weight.*usually the layer's bias"),
    ((_x(), W8, T6), {"linear_bias": torch.randn(8)}, safeloss.InputError, "is the hidden size H"),
    ((_x(), W8, T6), {"linear_bias": torch.randn(5, 1)}, safeloss.InputError, r"linear_bias\.reshape\(5,\)"),
    ((_x(), W8, T6), {"linear_bias": torch.zeros(5, dtype=torch.long)}, safeloss.InputDtypeError, "linear_bias of dtype"),
    ((_x().double(), W8, T6), {}, safeloss.InputDtypeError, r"float64 but a linear_weight of dtype torch\.float32"),
    ((_x(), W8, T6), {"linear_bias": torch.randn(5).double()}, safeloss.InputDtypeError, "linear_bias of dtype torch.float64"),
    ((torch.randn(8), torch.randn(5, 2, 8), torch.tensor(1)), {}, safeloss.InputError, "needs batched input"),
    ((_x(), W8, T6), {"weight": torch.ones(4)}, safeloss.WeightError, r"layer has C=5 classes"),
    ((_x(), W8, T6.to("meta")), {}, safeloss.DeviceMismatchError, "target is on meta"),
    ((_x(), W8, torch.randint(0, 5, (3,))), {}, safeloss.BatchSizeMismatchError, r"2x as many rows.*\(3, 2\)"),
    ((_x(), W8, torch.randint(0, 5, (5,))), {}, safeloss.BatchSizeMismatchError, r"hidden\[:, :-1\]"),
    ((_x(), W8, torch.randint(0, 5, (60,))), {}, safeloss.BatchSizeMismatchError, "different batch"),
    ((_x(), W8, torch.randint(0, 5, (2, 3))), {}, safeloss.TargetShapeError, r"target\.reshape\(6,\)"),
    ((_x(), W8, torch.rand(6, 4)), {}, safeloss.TargetShapeError, r"4 columns, but the layer has\s+C=5"),
    ((_x(), W8, torch.randint(0, 5, (6, 2, 2))), {}, safeloss.TargetShapeError, "cannot pair this target"),
    ((_x(), W8, torch.rand(6, 5).softmax(1)), {"ignore_index": -100}, safeloss.IgnoreIndexError, "ignore_index=None"),
    ((_x(), W8, T6), {"ignore_index": "pad"}, safeloss.ArgumentTypeError, "ignore_index must be an int or None"),
    ((_x(), W8, T6), {"options": 3}, safeloss.ArgumentTypeError, "LinearCrossEntropyOptions"),
    ((_x(), W8, torch.tensor([0, 1, 2, 5, 255, 3])), {}, safeloss.TargetOutOfRangeError,
     r"2 of 6 targets are outside the class range 0\.\.4.*nn\.Linear\(d, 256\)"),
    ((_x(), W8, torch.tensor([1, 2, 3, 4, 5, 5])), {}, safeloss.TargetOutOfRangeError, "look 1-based"),
    ((_x(), W8, torch.tensor([0, 1, -1, 3, 4, -1])), {}, safeloss.TargetOutOfRangeError,
     r"linear_cross_entropy\(\.\.\., ignore_index=-1\)"),
    ((_x(), W8, torch.tensor([0.5, 1, 2, 3, 4, 0])), {}, safeloss.TargetDtypeError, "not whole"),
    (("x", W8, T6), {}, safeloss.ArgumentTypeError, "the input to be a torch.Tensor"),
    ((_x(), W8, [0, 1]), {}, safeloss.ArgumentTypeError, "the target to be a torch.Tensor"),
    ((_x(), "W", T6), {}, safeloss.ArgumentTypeError, "linear_weight to be a torch.Tensor"),
    ((_x(), W8, T6), {"linear_bias": [0.0] * 5}, safeloss.ArgumentTypeError, "linear_bias to be a torch.Tensor"),
    ((_x(), W8, T6), {"weight": [1.0] * 5}, safeloss.ArgumentTypeError, "weight to be a torch.Tensor"),
    ((_x(), W8, T6), {"reduction": "avg"}, safeloss.ReductionError, "not a valid reduction"),
    ((_x(), W8, T6), {"backend": "gpu"}, safeloss.BackendError, "not a safeloss backend"),
    # index targets only: stock differentiates the weight of probability targets
    ((_x(), W8, T6), {"weight": torch.ones(5, requires_grad=True)},
     safeloss.WeightError, r"weight\.detach\(\)"),
])
def test_catalogue_errors(args, kwargs, err, match):
    with pytest.raises(err, match="(?s)" + match):
        lce(*args, **kwargs)


def test_forced_triton_where_it_cannot_run(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_unavailable_reason", lambda device: "no GPU here")
    with pytest.raises(safeloss.BackendError, match=r'backend="triton" cannot run on cpu tensors here: no GPU'):
        lce(_x(), W8, T6, backend="triton")
    assert torch.isfinite(lce(_x(), W8, T6))  # auto: the torch tile


def test_module_on_a_torch_without_the_stock_module():
    from safeloss.linear import api

    with pytest.raises(RuntimeError, match=r"needs torch >= 2\.13"):
        api._NoStockModule(8, 5)


def test_module_label_smoothing_error_carries_stock_text():
    with pytest.raises(safeloss.LabelSmoothingError,
                       match=r"(?s)between 0\.0 and 1\.0.*expected label_smoothing to be in range \[0, 1\], got 2\.0"):
        safeloss.SafeLinearCrossEntropyLoss(H, C, label_smoothing=2.0)


def test_errors_are_the_builtins_stock_raises():
    assert issubclass(safeloss.BatchSizeMismatchError, ValueError)
    with pytest.raises(IndexError):
        lce(_x(), W8, torch.tensor([0, 1, 2, 5, 4, 0]))
    with pytest.raises(RuntimeError):  # stock: "expected equal input and linear_weight last dimensions"
        lce(torch.randn(6, 7), W8, T6)


@pytest.mark.parametrize("make_bad,match", [
    (lambda x, w: (x.index_put_((torch.tensor(2), torch.tensor(3)), torch.tensor(float("nan"))), w),
     r"NaN or infinite at 1 of 6 positions \(first at \[2\]\): the input holds NaN/inf \(1 row: 2\)"),
    (lambda x, w: (x, w.index_put_((torch.tensor(4), torch.tensor(0)), torch.tensor(float("inf")))),
     r"linear_weight holds NaN/inf \(1 class row: 4\)"),
    (lambda x, w: (x * 1e30, w * 1e30), "every operand is finite, so the logits overflowed"),
])
def test_nonfinite_names_the_operand(make_bad, match):
    x, w = make_bad(_x(), W8.clone())
    with pytest.warns(safeloss.SafeLossWarning, match=match):
        lce(x, w, T6)
    with pytest.raises(safeloss.NonFiniteError, match=match):
        lce(x, w, T6, strict=True)


@pytest.mark.parametrize("target,kwargs,err,match", [
    (torch.rand(6, 5), {}, safeloss.ProbabilityTargetError, r"the logits' shape\).*not summing to 1"),
    (T6.view(6, 1), {}, safeloss.TargetShapeError, r"targets of shape \(6, 1\) for logits \(6, 5\)"),
    (torch.full((6,), -100), {}, safeloss.EmptyBatchError, "linear_cross_entropy with reduction=\"mean\" has nothing"),
    (T6.float(), {}, safeloss.TargetDtypeError, "stored as torch.float32"),
    (torch.nn.functional.one_hot(T6, 5), {}, safeloss.TargetDtypeError, "one-hot targets as torch.int64"),
])
def test_findings_warn_by_default_and_raise_in_strict_mode(target, kwargs, err, match):
    x = _x()
    match = "(?s)" + match
    with pytest.warns(safeloss.SafeLossWarning, match=match):
        lce(x, W8, target, **kwargs)
    with pytest.raises(err, match=match):
        lce(x, W8, target, strict=True, **kwargs)
    with safeloss.strict_mode(), pytest.raises(err, match=match):
        lce(x, W8, target, **kwargs)


def test_single_class_head_warns():
    with pytest.warns(safeloss.SafeLossWarning, match="single class"):
        lce(_x(), torch.randn(1, 8), torch.zeros(6, dtype=torch.long))


def test_deferred_model_masks_bad_labels_and_reports_later(monkeypatch):
    """The CUDA default-mode path, on CPU: a bad label's loss is NaN (its gradient zero, no
    out-of-range read) and the error comes at the next call of the same loss."""
    from safeloss.core import checks

    monkeypatch.setattr(checks, "DEFER_ON_CPU", True)
    x = _x().requires_grad_()
    W = W8.clone().requires_grad_()
    t = torch.tensor([0, 1, 2, 5, 4, 0])
    rows = lce(x, W, t, reduction="none")
    assert torch.isnan(rows[3]) and torch.isfinite(rows[[0, 1, 2, 4, 5]]).all()
    rows.nan_to_num().sum().backward()
    assert x.grad[3].abs().sum() == 0 and x.grad[0].abs().sum() > 0
    with pytest.raises(safeloss.TargetOutOfRangeError, match="found by an earlier call"):
        lce(_x(), W8, T6)


# ------------------------------------------------------------------------ patch


@pytest.mark.usefixtures("clean_patch")
class TestPatch:
    BAD = torch.tensor([0, 1, 2, 5, 4, 0])

    @pytest.mark.parametrize("options", [None, "chunked"])
    def test_functional_reaches_safeloss_on_both_stock_paths(self, options):
        opts = torch.nn.LinearCrossEntropyOptions() if options else None
        x = _x().requires_grad_()
        with safeloss.patch():
            assert F.linear_cross_entropy is not STOCK
            with pytest.raises(safeloss.TargetOutOfRangeError, match="outside the class range"):
                F.linear_cross_entropy(x, W8, self.BAD, options=opts)
            ours = F.linear_cross_entropy(x, W8, T6, options=opts)
        assert F.linear_cross_entropy is STOCK
        stock = STOCK(x, W8, T6)
        torch.testing.assert_close(ours, stock)
        torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(stock, x)[0])

    @pytest.mark.parametrize("options", [None, "chunked"])
    def test_stock_module_reaches_safeloss(self, options):
        opts = torch.nn.LinearCrossEntropyOptions() if options else None
        m = torch.nn.LinearCrossEntropyLoss(8, 5, bias=True, options=opts)
        x = _x()
        expected = m(x, T6)
        with safeloss.patch():
            assert torch.nn.LinearCrossEntropyLoss.forward is not STOCK_FORWARD
            with pytest.raises(safeloss.TargetOutOfRangeError):
                m(x, self.BAD)
            torch.testing.assert_close(m(x, T6), expected)
        assert torch.nn.LinearCrossEntropyLoss.__dict__["forward"] is STOCK_FORWARD
        with pytest.raises((IndexError, RuntimeError), match="out of bounds"):  # stock again
            m(x, self.BAD)

    def test_strict_flows_and_warns_once_per_stock_instance(self):
        m = torch.nn.LinearCrossEntropyLoss(8, 5)
        x, t = _x(), T6.view(6, 1)
        with safeloss.patch(strict=True), pytest.raises(safeloss.TargetShapeError):
            m(x, t)
        with safeloss.patch(), warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            m(x, t)
            m(x, t)
        assert len([r for r in rec if issubclass(r.category, safeloss.SafeLossWarning)]) == 1

    def test_imported_name_is_rebound_and_restored(self):
        import types

        mod = types.ModuleType("fake_user_module_lce")
        exec("from torch.nn.functional import linear_cross_entropy", mod.__dict__)
        import sys

        sys.modules[mod.__name__] = mod
        try:
            with safeloss.patch(), pytest.raises(safeloss.TargetOutOfRangeError):
                mod.linear_cross_entropy(_x(), W8, self.BAD)
            assert mod.linear_cross_entropy is STOCK
        finally:
            del sys.modules[mod.__name__]


# ------------------------------------------------------------------------ transforms and tracing


def _xwt():
    x, W, b, t, _ = make("int64", "2d", -100, torch.float64, True, False)
    return x, W, b, t


def test_torch_func_grad_and_vmap_match_stock():
    from torch.func import grad, vmap

    x, W, b, t = _xwt()
    ours = safeloss.linear_cross_entropy
    g_ours = grad(lambda w: ours(x, w, t, linear_bias=b))(W)
    g_stock = grad(lambda w: STOCK(x, w, t, linear_bias=b))(W)
    torch.testing.assert_close(g_ours, g_stock)
    xs, ts = x.detach().view(2, 5, H), t.view(2, 5)
    v_ours = vmap(lambda a, c: ours(a, W, c, linear_bias=b))(xs, ts)
    v_stock = vmap(lambda a, c: STOCK(a, W, c, linear_bias=b))(xs, ts)
    torch.testing.assert_close(v_ours, v_stock)


def test_torch_compile_matches_stock():
    x, W, b, t = _xwt()
    f = torch.compile(lambda a, w, c: safeloss.linear_cross_entropy(a, w, c, linear_bias=b),
                      backend="aot_eager")
    ours, stock = f(x, W, t), STOCK(x, W, t, linear_bias=b)
    torch.testing.assert_close(ours, stock)
    for a, c in zip(torch.autograd.grad(ours, [x, W]), torch.autograd.grad(stock, [x, W])):
        torch.testing.assert_close(a, c)


def test_meta_fake_and_make_fx_trace_without_reading_values():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    x, W, _, t = _xwt()
    out = safeloss.linear_cross_entropy(x.to("meta"), W.to("meta"), t.to("meta"), reduction="none")
    assert out.device.type == "meta" and out.shape == (N,)
    with FakeTensorMode():
        fake = safeloss.linear_cross_entropy(torch.randn(N, H), torch.randn(C, H), torch.randint(0, C, (N,)))
    assert fake.shape == ()
    gm = make_fx(lambda a, w, c: safeloss.linear_cross_entropy(a, w, c))(x.detach(), W.detach(), t)
    torch.testing.assert_close(gm(x.detach(), W.detach(), t), STOCK(x.detach(), W.detach(), t))


# ------------------------------------------------------------------------ benchmark section


def test_bench_linear_section_runs_and_reports(tmp_path, monkeypatch):
    """The linear section of ``safeloss bench`` end to end on a tiny head: rows, ratios, memory
    (the subprocess probe replaced by the in-process one, which is what it runs), markdown."""
    from safeloss.bench import linear as bench_linear

    monkeypatch.setattr(chunked, "FORCE_ROWS", None)
    hd = bench_linear.Head(64, 8, 500, "fp32")
    monkeypatch.setattr(bench_linear, "_cpu_peak",
                        lambda name, h: (bench_linear.cpu_peak_probe(name, h, torch.get_num_threads()), ""))
    assert bench_linear.run([hd], torch.device("cpu"), True, tmp_path) == 0
    rows = {r["provider"]: r for r in __import__("json").loads((tmp_path / "linear_results.json").read_text())["rows"]}
    assert set(rows) == set(bench_linear.PROVIDERS)
    for name in ("stock-reference", "stock-chunked", "safeloss-torch"):
        r = rows[name]
        assert r["status"] == "ok" and r["fwdbwd_ms"] > 0 and r["peak_mem_bytes"] >= 0, r
    assert rows["stock-reference"]["time_vs_reference"] == pytest.approx(1.0)
    for name in ("safeloss-triton", "liger", "cce"):
        assert rows[name]["status"] == "skipped" and rows[name]["note"]
    md = (tmp_path / "linear_results.md").read_text()
    assert "lce-N64-H8-V500-fp32" in md and "safeloss-torch" in md
    assert [h.name for h in bench_linear.select("cpu", True, ["lce"])] == ["lce-N4096-H64-V50000-fp32"]
    assert bench_linear.select("cpu", True, ["cls-"]) == []


def test_forward_mode_ad_matches_stock():
    import torch.autograd.forward_ad as fwAD
    from torch.func import jvp

    x, W, _, t = _xwt()
    x, W = x.detach(), W.detach()
    tx = torch.randn(x.shape, generator=_gen(7), dtype=x.dtype)
    tangents = []
    for fn in (STOCK, safeloss.linear_cross_entropy):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(fn(fwAD.make_dual(x, tx), W, t)).tangent)
    tangents.append(jvp(lambda a: safeloss.linear_cross_entropy(a, W, t), (x,), (tx,))[1])
    torch.testing.assert_close(tangents[1], tangents[0])
    torch.testing.assert_close(tangents[2], tangents[0])


def test_stock_options_ignored_warning_is_kept():
    x, W, _, t = _xwt()
    opts = torch.nn.LinearCrossEntropyOptions()
    with pytest.warns(UserWarning, match=r"``options`` ignored; chunked path needs") as rec:
        safeloss.linear_cross_entropy(x, W, t, label_smoothing=0.1, options=opts)
    assert rec[0].filename == __file__  # names the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        safeloss.linear_cross_entropy(x, W, t, options=opts)  # a config stock chunks: no warning


def _f(*shape):
    return torch.randn(*shape)


@pytest.mark.parametrize("args,kwargs,stock_regex", [
    # PyTorch's own error_inputs for F.linear_cross_entropy: under patch() its OpInfo tests run
    # safeloss, so every message also carries stock's text.
    ((_f(2, 3, 3), _f(2, 3), _f(3, 2)), {}, "expected input with dimensionality 1 or 2, got 3"),
    ((_f(2, 3), _f(2), _f(2, 2)), {}, "expected linear_weight with dimensionality at least 2, got 1"),
    ((_f(2, 3), _f(2, 4), _f(2, 2)), {},
     "expected equal input and linear_weight last dimensions [(]in_features[)], got 3 and 4, respectively"),
    ((_f(2, 3), _f(2, 3), _f(2, 2)), {"ignore_index": 0},
     "ignore_index cannot be specified when target contains probabilities"),
    ((_f(3), _f(2, 4, 3), _f(2, 4)), {},
     "K-dimensional loss defined by linear_weight shape [(]2, 4, 3[)] requires batched input, [(]N, 3[)], "
     "got unbatched input with shape [(]3,[)]"),
    ((_f(2, 3), _f(2, 3), _f(2)), {"linear_bias": _f(3)}, r"expected linear_bias shape \(2,\), got \(3,\)"),
])
def test_messages_carry_stock_text(args, kwargs, stock_regex):
    for fn in (STOCK, lce):
        with pytest.raises(RuntimeError, match=stock_regex):
            fn(*args, **kwargs)


@pytest.mark.usefixtures("clean_patch")
def test_pytorch_own_error_inputs_pass_under_patch():
    """PyTorch's OpInfo / ModuleInfo error inputs for linear_cross_entropy, run with patch() on:
    same exception type and stock's message text (the peer suite's check)."""
    import re

    from torch.testing._internal.common_methods_invocations import op_db
    from torch.testing._internal.common_modules import module_db

    checked = 0
    for op in (o for o in op_db if o.name == "nn.functional.linear_cross_entropy"):
        for e in op.error_inputs("cpu"):
            s = e.sample_input
            with safeloss.patch(), pytest.raises(e.error_type, match=e.error_regex) as info:
                F.linear_cross_entropy(s.input, *s.args, **s.kwargs)
            assert isinstance(info.value, safeloss.SafeLossError)
            checked += 1
    mi = next(m for m in module_db if m.module_cls is torch.nn.LinearCrossEntropyLoss)
    for e in mi.module_error_inputs_func(mi, device="cpu", dtype=torch.float32, requires_grad=False,
                                         training=True):
        ci, fi = e.module_error_input.constructor_input, e.module_error_input.forward_input
        for cls in (torch.nn.LinearCrossEntropyLoss, safeloss.SafeLinearCrossEntropyLoss):
            with pytest.raises(e.error_type) as info:
                m = cls(*ci.args, **ci.kwargs)
                with safeloss.patch():
                    m(*fi.args, **fi.kwargs)
            with warnings.catch_warnings():  # stock's own regex "[[]0, 1[]]" warns in re
                warnings.simplefilter("ignore", FutureWarning)
                found = re.search(e.error_regex, str(info.value))
            assert found, (cls, e.error_regex, str(info.value))
            checked += 1
    assert checked >= 6 * 3 + 5 * 2


@pytest.mark.parametrize("shape", ["2d", "kdim"])
def test_probability_target_differentiates_a_class_weight_that_requires_grad(shape):
    """Stock differentiates the class weight of probability targets (index targets: it refuses,
    and so do we); safeloss.cross_entropy does too, so linear_cross_entropy must not refuse."""
    x, W, b, t, w = make("prob", shape, None, torch.float64, True, True)
    res = []
    for fn in (STOCK, safeloss.linear_cross_entropy):
        cw = w.detach().clone().requires_grad_(True)
        loss = fn(x, W, t, linear_bias=b, weight=cw, label_smoothing=0.1)
        res.append([loss, *torch.autograd.grad(loss * 2.5, [x, W, b, cw])])
    for a, c in zip(*res):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("kind,shape,kw", [
    ("int64", "2d", dict(label_smoothing=0.2)), ("prob", "2d", {}), ("int64", "kdim", {})])
def test_backward_is_reentrant_for_gradcheck(kind, shape, kw):
    """A second backward over the same graph (retain_graph, gradcheck's reentrancy check with
    nondet_tol=0) gives bit-identical gradients, as stock's does."""
    x, W, b, t, w = make(kind, shape, None, torch.float64, True, True)
    loss = safeloss.linear_cross_entropy(x, W, t, linear_bias=b, weight=w, **kw)
    up = torch.tensor(0.3, dtype=torch.float64)
    first = torch.autograd.grad(loss, [x, W, b], up, retain_graph=True)
    second = torch.autograd.grad(loss, [x, W, b], up)
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    assert torch.autograd.gradcheck(
        lambda *v: safeloss.linear_cross_entropy(*v[:2], t, linear_bias=v[2], weight=w, **kw),
        [x, W, b])


@pytest.mark.parametrize("target,match", [
    (torch.zeros(0, dtype=torch.long), "6 input rows but 0 targets"),  # was a ZeroDivisionError
    (torch.tensor(2), "cannot pair this target"),
    (torch.randint(0, 5, (4, 3)), "cannot pair this target"),
])
def test_target_of_another_batch_size_is_stocks_value_error(target, match):
    """Stock checks the batch size first: a target whose batch differs is a ValueError there."""
    with pytest.raises(ValueError, match="Expected input batch_size"):
        STOCK(_x(), W8, target)
    with pytest.raises(safeloss.SafeLossError, match=match) as e:
        lce(_x(), W8, target)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("xd,wd", [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_autocast_does_not_hide_a_float64_dtype_mismatch(xd, wd):
    """autocast leaves float64 alone, so stock's matmul fails; ours names the mismatch."""
    x, W = torch.randn(6, 8, dtype=xd), torch.randn(5, 8, dtype=wd)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):
            STOCK(x, W, T6)
        with pytest.raises(safeloss.InputDtypeError, match="linear_weight of dtype"):
            lce(x, W, T6)


@pytest.mark.parametrize("red", ["mean", "sum", "none"])
@pytest.mark.parametrize("prob", [False, True])
def test_empty_batch_of_a_kdim_head_matches_stock(red, prob):
    """N = 0 with out_features: the (N, D) view of the target cannot infer D from zero elements."""
    res = []
    for fn in (STOCK, safeloss.linear_cross_entropy):
        x = torch.zeros(0, H, dtype=torch.float64, requires_grad=True)
        W = torch.randn((C, *KDIM, H), generator=_gen(1), dtype=torch.float64, requires_grad=True)
        b = torch.randn((C, *KDIM), generator=_gen(2), dtype=torch.float64, requires_grad=True)
        t = torch.zeros((0, C, *KDIM), dtype=torch.float64) if prob else torch.zeros((0, *KDIM), dtype=torch.long)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", safeloss.SafeLossWarning)
            loss = fn(x, W, t, linear_bias=b, reduction=red)
        res.append([loss, *torch.autograd.grad(loss.sum(), [x, W, b])])
    for a, c in zip(*res):
        torch.testing.assert_close(a, c, equal_nan=True)


@pytest.mark.parametrize("red", ["mean", "sum", "none"])
@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("out_features", [(1,), (1, 1)])
@pytest.mark.parametrize("path", ["loop", "vmap"])
def test_out_features_of_one_position_match_stock(red, prob, out_features, path):
    """out_features whose product is 1 ((1,), (1, 1)): one position per row, as a plain head, but
    with the target's extra singleton dims (stock computes them; the chunk loop indexed the
    (N, 1) labels as if they were (N,))."""
    res = []
    for fn in (STOCK, safeloss.linear_cross_entropy):
        x = torch.randn(N, H, generator=_gen(0), dtype=torch.float64, requires_grad=True)
        W = torch.randn((C, *out_features, H), generator=_gen(1), dtype=torch.float64, requires_grad=True)
        if prob:
            t = torch.rand((N, C, *out_features), generator=_gen(2), dtype=torch.float64).softmax(1)
        else:
            t = torch.randint(0, C, (N, *out_features), generator=_gen(2))
        if path == "vmap":  # torch.func: the plain chunked ops (one row per example)
            loss = torch.func.vmap(lambda a, b, f=fn, w=W: f(a, w, b, reduction=red))(x.unsqueeze(1), t.unsqueeze(1))
        else:
            loss = fn(x, W, t, reduction=red)
        res.append([loss, *torch.autograd.grad(loss.sum(), [x, W])])
    for a, c in zip(*res):
        torch.testing.assert_close(a, c)


def test_out_features_of_one_position_deferred_and_compiled(monkeypatch):
    """The same shapes where bad labels are masked in the loop (the deferred model) and in the
    compiled graph's custom op: NaN there, the label named at the next call."""
    from safeloss.core import checks

    x = torch.randn(N, H, generator=_gen(0))
    W = torch.randn(C, 1, H, generator=_gen(1))
    t = torch.randint(0, C, (N, 1), generator=_gen(2))
    compiled = torch.compile(lambda a, b: safeloss.linear_cross_entropy(a, W, b), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, t), STOCK(x, W, t))
    bad = t.clone()
    bad[2, 0] = C + 4
    monkeypatch.setattr(checks, "DEFER_ON_CPU", True)
    assert torch.isnan(safeloss.linear_cross_entropy(x, W, bad))
    with pytest.raises(safeloss.TargetOutOfRangeError, match=rf"{C + 4} at \[2, 0\]"):
        safeloss.linear_cross_entropy(x, W, t)


def test_head_changed_in_place_after_the_forward_of_a_frozen_input():
    """Stock's d/dlinear_weight saves only the input, so an in-place update of the weight between
    forward and backward (input without grad) is accepted there; it must be here too."""
    x, W, _, t, _ = make("int64", "2d", None, torch.float64, False, False)
    x = x.detach()
    res = []
    for fn in (STOCK, safeloss.linear_cross_entropy):
        Wc = W.detach().clone().requires_grad_(True)
        Wv = Wc * 1.0  # a non-leaf that can be changed in place
        loss = fn(x, Wv, t)
        with torch.no_grad():
            Wv.add_(1.0)
        res.append(torch.autograd.grad(loss, [Wc])[0])
    torch.testing.assert_close(res[0], res[1])

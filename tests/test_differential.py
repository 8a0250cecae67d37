"""The drop-in contract: for every input stock torch accepts, safeloss gives the same value and the
same gradients (input, and probability targets that require grad), with the same dtype and shape.

One parametrized grid, run for every backend. The Triton backend runs through Triton's
interpreter on CPU (small shapes), or natively on a GPU machine.
"""

from __future__ import annotations

import itertools
import math
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

import safeloss
from safeloss.backends import dispatch
from tests.tolerances import assert_matches

SHAPES = {
    "1d": (5,),
    "2d": (7, 5),
    "3d": (3, 5, 4),
    "4d": (2, 5, 3, 2),
    "5d": (2, 4, 2, 2, 2),
}
TARGETS = ["int64", "uint8", "int32", "prob", "prob-grad"]
WEIGHTS = [None, "w"]
IGNORES = [-100, 1, 255, -1]
REDUCTIONS = ["mean", "sum", "none"]
SMOOTHING = [0.0, 0.1]


def _backend_params():
    out = [pytest.param("torch", id="torch")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = dispatch.triton_unavailable_reason(device)
    out.append(pytest.param("triton", id="triton", marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return out


BACKENDS = _backend_params()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# For tests that pass CPU tensors (the catalogue: its value checks raise in the call itself only on
# CPU). On a GPU machine the kernels are compiled for the device, so CPU tensors cannot reach them
# unless TRITON_INTERPRET=1 was set before the first import (as CI does).
_cpu_reason = dispatch.triton_unavailable_reason(torch.device("cpu"))
CPU_BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(_cpu_reason is not None, reason=str(_cpu_reason))),
]


def make_case(shape, target_kind, weight, ignore_index, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype).to(device)
    C = shape[0] if len(shape) == 1 else shape[1]
    pos = shape[1:] if len(shape) == 1 else shape[:1] + shape[2:]
    if target_kind.startswith("prob"):
        cdim = 0 if len(shape) == 1 else 1
        t = torch.randn(shape, generator=g, dtype=torch.float64).softmax(cdim).to(dtype).to(device)
        if target_kind == "prob-grad":
            t.requires_grad_(True)
    else:
        t = torch.randint(0, C, pos, generator=g)
        if ignore_index is not None and t.numel() > 1:
            # Ignore some positions, never all (all-ignored is its own test).
            flat = t.view(-1)
            flat[:: 3] = ignore_index if not 0 <= ignore_index < C else flat[::3]
            if 0 <= ignore_index < C:
                flat[1::3] = ignore_index
        if ignore_index is not None and t.numel() and bool((t == ignore_index).all()):
            t.view(-1)[0] = (ignore_index + 1) % C
        dt = {"int64": torch.int64, "uint8": torch.uint8, "int32": torch.int32}[target_kind]
        if dt == torch.uint8 and (t < 0).any():
            t = t.clamp_min(0)
        t = t.to(dt).to(device)
    w = None
    if weight:
        w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.25).to(dtype).to(device)
    return x, t, w


def stock(x, t, w, **kw):
    """Stock torch on the input it accepts: int64 class indices."""
    if not t.is_floating_point():
        t = t.long()
    return F.cross_entropy(x, t, weight=w, **kw)


def run_both(backend, x, t, w, reduction, ignore_index, ls):
    kw = dict(reduction=reduction, label_smoothing=ls)
    if not t.is_floating_point():
        kw["ignore_index"] = ignore_index
    xs = x.detach().clone().requires_grad_(True)
    xo = x.detach().clone().requires_grad_(True)
    ts = t.detach().clone().requires_grad_(t.requires_grad)
    to = t.detach().clone().requires_grad_(t.requires_grad)
    ref = stock(xs, ts, w, **kw)
    truth = stock(xs.detach().double(), ts.detach().double() if ts.is_floating_point() else ts,
                  None if w is None else w.double(), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any safeloss warning here is a false alarm
        out = safeloss.cross_entropy(xo, to, w, backend=backend, **kw)
    assert_matches(out, ref, truth, "value")
    # A non-trivial upstream gradient: random per element for "none", 0.7 for a scalar.
    g = torch.Generator().manual_seed(1)
    up = (torch.rand(ref.shape, generator=g, dtype=torch.float64) * 2 - 0.5).to(ref.dtype).to(ref.device)
    if ref.dim() == 0:
        up = torch.tensor(0.7, dtype=ref.dtype, device=ref.device)
    ref.backward(up)
    out.backward(up)
    xt = xs.detach().double().requires_grad_(True)
    tt = ts.detach().double().requires_grad_(True) if ts.requires_grad else ts.detach()
    if tt.is_floating_point() and not ts.requires_grad:
        tt = tt.double()
    stock(xt, tt, None if w is None else w.double(), **kw).backward(up.double())
    assert_matches(xo.grad, xs.grad, xt.grad, "input grad")
    if ts.requires_grad:
        assert_matches(to.grad, ts.grad, tt.grad, "target grad")


def _grid(full: bool):
    """Every combination for the fast torch backend; a covering subset for the interpreter."""
    cases = []
    for i, (sname, tk, wt, red, ls) in enumerate(itertools.product(SHAPES, TARGETS, WEIGHTS, REDUCTIONS, SMOOTHING)):
        ignores = IGNORES if full else [IGNORES[i % len(IGNORES)]]
        for ii in ignores:
            if tk.startswith("prob") and ii != IGNORES[0]:
                continue
            if not full and (i % 3) and not tk.startswith("prob"):
                continue  # interpreter subset: one case in three, every value still covered
            cases.append(pytest.param(sname, tk, wt, ii, red, ls, id=f"{sname}-{tk}-{wt}-ii{ii}-{red}-ls{ls}"))
    return cases


def _grid_params():
    """The full product on torch; the covering subset through the (slow) Triton interpreter."""
    _, triton_param = BACKENDS
    out = [pytest.param("torch", *p.values, id=f"torch-{p.id}") for p in _grid(full=True)]
    sub = _grid(full=False) if torch.cuda.is_available() is False else _grid(full=True)
    out += [pytest.param("triton", *p.values, id=f"triton-{p.id}", marks=triton_param.marks) for p in sub]
    return out


@pytest.mark.parametrize("backend,sname,tk,wt,ii,red,ls", _grid_params())
def test_grid_fp32(backend, sname, tk, wt, ii, red, ls):
    x, t, w = make_case(SHAPES[sname], tk, wt, ii, torch.float32)
    run_both(backend, x, t, w, red, ii, ls)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=["f64", "f16", "bf16"])
@pytest.mark.parametrize("sname", ["1d", "2d", "4d"])
@pytest.mark.parametrize("tk,wt,red,ls", [
    ("int64", None, "mean", 0.0),
    ("int64", "w", "none", 0.1),
    ("uint8", "w", "sum", 0.0),
    ("prob", None, "mean", 0.1),
    ("prob-grad", "w", "none", 0.0),
])
def test_grid_dtypes(backend, dtype, sname, tk, wt, red, ls):
    x, t, w = make_case(SHAPES[sname], tk, wt, -100, dtype, seed=3)
    run_both(backend, x, t, w, red, -100, ls)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3)], ids=str)
@pytest.mark.parametrize("red", ["sum", "none"])
@pytest.mark.parametrize("tk", ["int64", "prob"])
def test_empty_batch_sum_none(backend, shape, red, tk):
    x, t, w = make_case(shape, tk, None, -100, torch.float32)
    run_both(backend, x, t, w, red, -100, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["empty", "all-ignored", "zero-weight", "empty-prob", "zero-weight-smoothing"])
def test_nothing_to_average_is_nan_with_zero_grads(backend, case):
    C = 5
    w = None
    if case == "empty":
        x, t = torch.randn(0, C), torch.zeros(0, dtype=torch.long)
    elif case == "empty-prob":
        x, t = torch.randn(0, C), torch.zeros(0, C)
    elif case == "all-ignored":
        x, t = torch.randn(4, C), torch.full((4,), -100)
    else:
        x, t = torch.randn(4, C), torch.tensor([0, 1, 0, 1])
        w = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    eps = 0.1 if case.endswith("-smoothing") else 0.0  # stock: NaN still (label term 0/0), not inf
    x, t = x.to(DEVICE), t.to(DEVICE)
    w = None if w is None else w.to(DEVICE)
    xs, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref = F.cross_entropy(xs, t, weight=w, label_smoothing=eps)
    with pytest.warns(safeloss.SafeLossWarning, match="nothing to average|empty batch"):
        out = safeloss.cross_entropy(xo, t, weight=w, backend=backend, label_smoothing=eps)
    assert torch.isnan(ref) and torch.isnan(out)
    ref.backward()
    out.backward()
    # torch's gradients: zeros, except NaN (0 * inf) where the weights themselves sum to 0.
    torch.testing.assert_close(xo.grad, xs.grad, equal_nan=True, rtol=0, atol=0)
    assert xo.grad.isnan().any() == case.startswith("zero-weight")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size_average,reduce", [(None, False), (False, None), (True, True), (False, True), (True, False), (None, True)])
def test_legacy_size_average_reduce(backend, size_average, reduce):
    x, t, w = make_case((6, 4), "int64", "w", -100, torch.float32)
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        ref = F.cross_entropy(x, t, w, size_average=size_average, reduce=reduce, reduction="none")
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        out = safeloss.cross_entropy(x, t, w, size_average=size_average, reduce=reduce, reduction="none", backend=backend)
    assert_matches(out, ref)
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        mod = safeloss.SafeCrossEntropyLoss(w, size_average=size_average, reduce=reduce, backend=backend)
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        stock_mod = torch.nn.CrossEntropyLoss(w, size_average=size_average, reduce=reduce)
    assert mod.reduction == stock_mod.reduction
    assert_matches(mod(x, t), stock_mod(x, t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_elementwise_mean_alias(backend):
    x, t, _ = make_case((6, 4), "int64", None, -100, torch.float32)
    with pytest.warns(UserWarning, match="reduction='elementwise_mean' is deprecated"):  # as stock
        out = safeloss.cross_entropy(x, t, reduction="elementwise_mean", backend=backend)
    assert_matches(out, F.cross_entropy(x, t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_onehot_matches_torch_including_weighted_mean(backend):
    """A float one-hot target is valid torch input (probabilities): torch divides its weighted
    mean by N, not by the weights, and safeloss must reproduce that exactly."""
    x, t, w = make_case((8, 5), "int64", "w", None, torch.float32)
    onehot = F.one_hot(t.long(), 5).float()
    for red in REDUCTIONS:
        out = safeloss.cross_entropy(x, onehot, w, reduction=red, backend=backend)
        assert_matches(out, F.cross_entropy(x, onehot, w, reduction=red))
    # ... and the index path's mean differs, which is the point of keeping them apart.
    assert not torch.allclose(F.cross_entropy(x, onehot, w), F.cross_entropy(x, t, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_transposed_inputs(backend):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(5, 9, generator=g).to(DEVICE)
    x = base.t()  # (9, 5), non-contiguous
    t = torch.randint(0, 5, (9,), generator=g).to(DEVICE)
    run_both(backend, x, t, None, "none", -100, 0.0)
    seq = torch.randn(2, 6, 5, generator=g).to(DEVICE)  # (N, T, C) ...
    tt = torch.randint(0, 5, (2, 6), generator=g).to(DEVICE)
    run_both(backend, seq.transpose(1, 2), tt, None, "mean", -100, 0.1)  # ... read as (N, C, T)
    img = torch.randn(2, 3, 4, 5, generator=g).to(DEVICE).permute(0, 3, 1, 2)  # channels-last view
    ti = torch.randint(0, 5, (2, 3, 4), generator=g).to(DEVICE)
    run_both(backend, img, ti, None, "sum", -100, 0.0)


def test_caller_tensors_are_not_mutated():
    x, t, w = make_case((6, 5), "int64", "w", -100, torch.float32)
    x.requires_grad_(True)
    copies = [x.detach().clone(), t.clone(), w.clone()]
    safeloss.cross_entropy(x, t, w, label_smoothing=0.2).backward()
    for before, after in zip(copies, [x.detach(), t, w]):
        assert torch.equal(before, after)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_llm_vocabulary_262144(backend, ls):
    """An LLM-sized row (many column blocks of the online softmax), logits offset by 1000 so any
    lse - x cancellation would show, label smoothing's sum over all classes included. At 1000 an
    fp32 logit carries only ~6e-5 absolute precision, so both safeloss and stock are judged by
    their distance to the fp64 truth: safeloss must be as accurate as stock."""
    g = torch.Generator().manual_seed(0)
    V = 262144
    x = (torch.randn(2, V, generator=g) * 4 + 1000).to(DEVICE)
    t = torch.tensor([5, V - 1], device=DEVICE)
    results = {}
    for name, fn, dtype in [
        ("ours", lambda a: safeloss.cross_entropy(a, t, reduction="none", label_smoothing=ls, backend=backend), torch.float32),
        ("stock", lambda a: F.cross_entropy(a, t, reduction="none", label_smoothing=ls), torch.float32),
        ("truth", lambda a: F.cross_entropy(a, t, reduction="none", label_smoothing=ls), torch.float64),
    ]:
        a = x.detach().to(dtype).clone().requires_grad_()
        out = fn(a)
        out.backward(torch.tensor([0.7, 1.3], dtype=dtype, device=DEVICE))
        results[name] = (out.detach().double(), a.grad.double())
    for i, what in enumerate(["value", "grad"]):
        ours, stock, truth = (results[k][i] for k in ("ours", "stock", "truth"))
        err_ours, err_stock = (ours - truth).abs().max().item(), (stock - truth).abs().max().item()
        assert err_ours <= 2 * err_stock + 1e-6, f"{what}: safeloss error {err_ours:.3g} vs stock {err_stock:.3g}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rows", [65, 100, 128, 129])
@pytest.mark.parametrize("softmaxed", ["sampled", "all"])
def test_softmax_check_samples_the_same_rows_on_every_backend(backend, rows, softmaxed):
    """Above 64 positions both backends check the 64 positions i * N // 64 (the torch backend's
    shortcut of checking every row stops at 64): rows outside the sample do not change the
    verdict, and the message counts the sampled rows."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 6, generator=g).softmax(1)
    if softmaxed == "sampled":
        outside = torch.ones(rows, dtype=torch.bool)
        outside[torch.arange(64) * rows // 64] = False
        x[outside] = torch.randn(int(outside.sum()), 6, generator=g) * 3  # raw logits, never sampled
    t = torch.randint(0, 6, (rows,), generator=g)
    with pytest.warns(safeloss.SafeLossWarning, match=rf"looks already softmaxed: all 64 sampled rows \(of {rows}\)"):
        safeloss.cross_entropy(x, t, backend=backend)


# ---------------------------------------------------------------------------- the backend choice
def _fake_problem(device: str, dtype: torch.dtype) -> types.SimpleNamespace:
    """What dispatch.select reads of a Problem: asks about CUDA tensors on any machine."""
    x = types.SimpleNamespace(device=torch.device(device), dtype=dtype, is_cuda=device == "cuda")
    return types.SimpleNamespace(input=x, weight=None, num_classes=5)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("usable", [True, False], ids=["triton-usable", "triton-missing"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_backend_choice(monkeypatch, backend, device, usable, dtype):
    """The whole table: "auto" runs Triton for CUDA tensors where it can run, torch for CPU tensors,
    and torch with a one-time notice on CUDA without a usable Triton; backend="triton" where Triton
    cannot run is an error on every device; float64 always runs on torch (the kernel is fp32)."""
    reason = None if usable else 'the triton package is not installed (pip install "safeloss[gpu]")'
    monkeypatch.setattr(dispatch, "triton_unavailable_reason", lambda device: reason)
    monkeypatch.setattr(dispatch, "in_functorch_transform", lambda x: False)
    monkeypatch.setattr(dispatch, "_NOTICED", [])
    p = _fake_problem(device, dtype)
    fp32 = dtype == torch.float32
    if backend == "triton" and fp32 and not usable:
        with pytest.raises(safeloss.BackendError, match=rf'backend="triton" cannot run on {device} tensors here: '
                           "the triton package is not installed"):
            dispatch.select(backend, p)
        return
    if backend == "auto" and device == "cuda" and fp32 and not usable:
        with pytest.warns(UserWarning, match="runs CUDA tensors on the pure-torch backend because the triton "
                          "package is not installed"):
            assert dispatch.select(backend, p) == "torch"
        return
    want = "triton" if fp32 and (backend == "triton" or (backend == "auto" and device == "cuda")) else "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select(backend, p) == want


# ------------------------------------------------------------------- findings of small batches
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("C", [2, 6, 50])
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("end", ["low", "high"])
def test_softmaxed_input_is_found_at_both_ends_of_the_mean_band(backend, C, rows, end):
    """Up to 64 positions the torch backend skips reading the logits when the mean loss is outside
    the band softmaxed input can give (the Triton kernel always reads them). Sharp softmax outputs
    with the likeliest (lowest loss) or least likely (highest loss) class as target sit at the two
    ends of that band: both must still be reported, on every backend."""
    g = torch.Generator().manual_seed(C * 1000 + rows)
    x = (torch.randn(rows, C, generator=g) * 8).softmax(1)
    t = x.argmax(1) if end == "low" else x.argmin(1)
    said = "its one row lies" if rows == 1 else f"all {rows} rows lie"
    with pytest.warns(safeloss.SafeLossWarning, match=rf"looks already softmaxed: {said} in \[0, 1\]"):
        safeloss.cross_entropy(x, t, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf at the target"])
@pytest.mark.parametrize("rows", [1, 8, 64])
def test_nonfinite_mean_of_a_small_batch_is_reported(backend, bad, rows):
    """A NaN or infinite mean is reported whatever the batch size (the torch backend's mean-band
    shortcut, used up to 64 positions, must not take a non-finite mean for a clean one)."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 5, generator=g)
    t = torch.randint(0, 5, (rows,), generator=g)
    i = rows // 2
    if bad == "nan":
        x[i, 1] = math.nan
    elif bad == "inf":
        x[i, 1] = math.inf
    else:
        x[i, t[i]] = -math.inf
    with pytest.warns(safeloss.SafeLossWarning, match=rf"the loss is NaN or infinite at 1 of {rows} positions? \(first at \[{i}\]\)"):
        out = safeloss.cross_entropy(x, t, backend=backend)
    assert not math.isfinite(out.item())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("dtype", [torch.float16], ids=["f16"])
def test_half_precision_loss_overflow_is_reported_on_every_backend(backend, reduction, dtype):
    """Finite logits whose loss passes the output dtype's range (65504 for float16): the Triton
    kernel computes in fp32, where the loss is finite, and must count it against the output
    dtype's bound; the torch backend sees the inf."""
    x = torch.zeros(4, 5, dtype=dtype)
    x[1, 0], x[1, 2] = 60000.0, -60000.0
    t = torch.tensor([0, 2, 1, 1])
    with pytest.warns(safeloss.SafeLossWarning, match=r"the float16 loss overflowed at 1 of 4 positions \(first at \[1\]\)"):
        out = safeloss.cross_entropy(x, t, reduction=reduction, backend=backend)
    assert torch.isinf(out).any()

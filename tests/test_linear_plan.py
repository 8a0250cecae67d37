"""The linear CE's memory plan (``safeloss.linear.chunked.plan``): rows per chunk x classes per
tile from a byte budget, its bound checked on paper at the shapes that matter (the CUDA target
(8192, 4096, 128256) bf16, the CPU target, edge shapes) and against the allocator's own records
on CPU; and the values of the two-pass (class-tiled) path against stock torch.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import safeloss
from safeloss.backends import dispatch
from safeloss.bench.linear import allocator_peak
from safeloss.linear import chunked
from tests.tolerances import assert_matches

STOCK = F.linear_cross_entropy
MiB = 1 << 20
BF16, FP32, FP64 = torch.bfloat16, torch.float32, torch.float64


@pytest.fixture(autouse=True)
def _no_forced_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunked, "FORCE_ROWS", None)
    monkeypatch.setattr(chunked, "FORCE_VOCAB_TILE", None)
    monkeypatch.setattr(chunked, "HALF_OPERANDS_ON_CPU", False)


def _bpe(dtype: torch.dtype, device_type: str, backend: str) -> int:
    """Bytes per tile element by the layout the loop allocates (independent of the plan's own)."""
    half = dtype in (torch.float16, BF16) and device_type == "cuda"
    if backend == "triton":
        return 4 + (2 if half else 0)
    return (8 if dtype == FP64 else 4) + (2 if half else 0)


# ------------------------------------------------------------------------------ on paper


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [BF16, FP32], ids=str)
def test_cuda_target_fits_256_mib(backend, dtype):
    """The issue's bound: (8192, 4096, 128256) on CUDA, at most 256 MiB above inputs and gradients,
    in one pass per chunk with enough rows for the tensor cores."""
    p = chunked.plan(8192, 4096, 128256, dtype=dtype, device_type="cuda", backend=backend)
    assert p.peak_extra <= 256 * MiB, p
    assert p.passes == 1 and p.rows >= chunked.MIN_ROWS["cuda"], p
    # what the loop holds per chunk: the tile (and G), the chunk's row-sized vectors, d/dinput rows
    assert p.rows * p.vocab_tile * _bpe(dtype, "cuda", backend) <= p.tile_bytes
    assert p.tile_bytes < p.peak_extra


def test_cpu_target_is_leaner_than_stock_chunked():
    """(4096, 64, 50000) fp32: stock's chunked path holds 13.2 MiB above inputs and gradients there
    (measured after a warm-up: a second copy of the gradients); the plan stays under the 8 MiB
    budget."""
    p = chunked.plan(4096, 64, 50000, dtype=FP32, device_type="cpu")
    assert p.peak_extra <= chunked.BUDGET_BYTES["cpu"] < 13 * MiB
    assert p.passes == 1 and p.rows >= chunked.MIN_ROWS["cpu"], p


SHAPES = [
    (0, 64, 50000),  # empty batch
    (1, 64, 50000),  # tiny N
    (3, 4096, 128256),
    (5, 7, 1),  # one class
    (4096, 64, 50000),
    (8192, 4096, 128256),
    (65536, 4096, 128256),  # N * V > 2^31
    (100_003, 1024, 262_147),  # N * V > 2^34, nothing a power of two
    (64, 64, 50_000_000),  # huge V: a single row is over the CPU budget
    (4096, 8, 2**31 + 11),  # V > 2^31
]


SETTINGS = [(dev, be, dt) for dev, be in (("cpu", "torch"), ("cuda", "torch"), ("cuda", "triton"))
            for dt in (FP32, BF16, FP64) if not (dt == FP64 and be == "triton")]  # fp64: torch tiles


@pytest.mark.parametrize("n,h,c", SHAPES, ids=[f"{n}x{h}x{c}" for n, h, c in SHAPES])
@pytest.mark.parametrize("device_type,backend,dtype", SETTINGS, ids=lambda v: str(v).replace("torch.", ""))
def test_plan_is_a_valid_cut_within_budget(n, h, c, device_type, backend, dtype):
    p = chunked.plan(n, h, c, dtype=dtype, device_type=device_type, backend=backend)
    assert 1 <= p.rows <= max(n, 1)
    assert 1 <= p.vocab_tile <= c and p.width == c
    assert p.rows * p.vocab_tile * _bpe(dtype, device_type, backend) <= p.tile_bytes
    assert p.rows * p.vocab_tile < 2**31  # a tile never needs 64-bit element offsets
    fixed_fits = not (dtype == BF16 and device_type == "cpu")  # CPU upcasts x and W once
    if fixed_fits and (h * c) * 8 < p.budget // 4:  # W's own size leaves room for a tile
        assert p.peak_extra <= p.budget, p
    if p.passes == 2:  # classes split: in whole multiples of 64 (aligned column slices of W)
        assert p.vocab_tile % 64 == 0 and p.vocab_tile >= chunked.MIN_VOCAB_TILE


def test_huge_vocab_splits_classes_and_stays_in_budget():
    p = chunked.plan(64, 64, 50_000_000, dtype=FP32, device_type="cpu")
    assert p.passes == 2 and p.vocab_tile < 50_000_000
    assert p.rows * p.vocab_tile * 4 <= chunked.BUDGET_BYTES["cpu"]


def test_plan_is_pure_and_follows_the_budget():
    kw = dict(dtype=BF16, device_type="cuda", backend="triton")
    a = chunked.plan(8192, 4096, 128256, **kw)
    assert a == chunked.plan(8192, 4096, 128256, **kw)
    half = chunked.plan(8192, 4096, 128256, budget=128 * MiB, **kw)
    assert half.rows < a.rows and half.peak_extra <= 128 * MiB
    forced = chunked.plan(8192, 4096, 128256, rows=100, vocab_tile=1000, **kw)
    assert (forced.rows, forced.vocab_tile) == (100, 1000)
    # probability targets / K-dimensional heads never split the classes
    g = chunked.plan(64, 64, 50_000_000, dtype=FP32, device_type="cpu", fast=False)
    assert g.passes == 1 and g.rows == 1


# ------------------------------------------------------------------------------ measured


def test_allocator_peak_counts_live_bytes():
    def call() -> None:
        a = torch.empty(3 * MiB, dtype=torch.uint8)
        del a
        b = torch.empty(MiB, dtype=torch.uint8)
        c = torch.empty(MiB, dtype=torch.uint8)
        del b, c

    assert allocator_peak(call) == 3 * MiB
    assert allocator_peak(lambda: None) == 0


ONE, TWO = 512 << 10, 270 << 10  # budgets: several chunks of whole rows; classes split in tiles
CASES = {
    "plain": dict(),
    "smooth-weight-bias": dict(eps=0.1, weight=True, bias=True),
    "none": dict(red="none"),
    "two-pass": dict(budget=TWO),
    "two-pass-smooth-weight-bias": dict(budget=TWO, eps=0.1, weight=True, bias=True),
    "two-pass-none": dict(budget=TWO, red="none"),
    "half-operands": dict(dtype=BF16, half=True),
    "bf16-cpu-upcast": dict(dtype=BF16, budget=1 << 20),  # fp32 copies of x and W: a bigger budget
    "prob": dict(prob=True),
}


def _cpu_half_mm_scratch(rows: int, tile: int, h: int, dt: torch.dtype) -> int:
    """Bytes the CPU's half-precision matmuls of one tile (the chunk loop's three: logits,
    d/dinput, d/dweight) allocate beyond their outputs, the largest of the three (they run one
    at a time)."""
    a, w, g = torch.ones(rows, h, dtype=dt), torch.ones(tile, h, dtype=dt), torch.ones(rows, tile, dtype=dt)
    dw = torch.zeros(tile, h, dtype=dt)
    size = torch.tensor([], dtype=dt).element_size()
    calls = [(lambda: torch.mm(a, w.t()), rows * tile * size), (lambda: torch.mm(g, w), rows * h * size),
             (lambda: dw.addmm_(g.t(), a), 0)]
    scratch = 0
    for call, out in calls:
        call()  # warm-up
        scratch = max(scratch, allocator_peak(call) - out)
    return scratch


@pytest.mark.parametrize("case", CASES)
def test_measured_peak_is_within_the_plan(monkeypatch, case):
    """The allocator's records of one forward + backward (after a warm-up): bytes above inputs
    and gradients never exceed what the plan computed for the call."""
    o = dict(dtype=FP32, eps=0.0, weight=False, bias=False, red="mean", budget=ONE, half=False, prob=False)
    o.update(CASES[case])
    n, h, c = 64, 16, 3000
    monkeypatch.setitem(chunked.BUDGET_BYTES, "cpu", o["budget"])
    monkeypatch.setattr(chunked, "HALF_OPERANDS_ON_CPU", o["half"])
    g = torch.Generator().manual_seed(0)
    dt = o["dtype"]
    x = torch.randn(n, h, generator=g).to(dt).requires_grad_(True)
    W = (torch.randn(c, h, generator=g) / h**0.5).to(dt).requires_grad_(True)
    b = torch.randn(c, generator=g).to(dt).requires_grad_(True) if o["bias"] else None
    wt = torch.rand(c, generator=g).to(dt) if o["weight"] else None
    t = torch.randn(n, c, generator=g).softmax(1).to(dt) if o["prob"] else torch.randint(0, c, (n,), generator=g)
    leaves = [v for v in (x, W, b) if v is not None]

    def step() -> None:
        for v in leaves:
            v.grad = None
        loss = safeloss.linear_cross_entropy(x, W, t, linear_bias=b, weight=wt, label_smoothing=o["eps"],
                                             reduction=o["red"])
        (loss.sum() if o["red"] == "none" else loss).backward()

    step()
    for v in leaves:
        v.grad = None
    peak = allocator_peak(step)
    grads = sum(v.grad.nbytes for v in leaves)
    p = chunked.plan(n, h, c, dtype=dt, device_type="cpu", fast=not o["prob"], need=(True, True, b is not None),
                     half_operands=o["half"])
    assert p.passes == (2 if o["budget"] == TWO else 1) and (p.rows < n or p.passes == 2), p
    extra = peak - grads
    # CPU emulation of the half-operand path: torch.mm has no fp32-output kernel for half
    # operands on CPU, so each tile is also materialized once in the half dtype there, and the
    # CPU's own half matmuls may allocate scratch beyond their outputs (none on AVX2 machines;
    # ~3x the tile on AVX-512 ones without bf16 units): measured here, on top of the plan.
    emulation = p.rows * p.vocab_tile * 2 + _cpu_half_mm_scratch(p.rows, p.vocab_tile, h, dt) if o["half"] else 0
    assert 0 < extra <= p.peak_extra + emulation, (extra, p)
    if not o["half"]:
        assert extra >= p.tile_bytes // 2, (extra, p)  # the plan's tile is what the loop allocates


# ------------------------------------------------------------------------------ values of the cut


def _problem(n, h, c, *, bias=True, weight=True, ignore=True, seed=0, dtype=FP64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=FP64).to(dtype).requires_grad_(True)
    W = torch.randn(c, h, generator=g, dtype=FP64).to(dtype).requires_grad_(True)
    b = torch.randn(c, generator=g, dtype=FP64).to(dtype).requires_grad_(True) if bias else None
    wt = torch.rand(c, generator=g, dtype=FP64).to(dtype) + 0.1 if weight else None
    t = torch.randint(0, c, (n,), generator=g)
    if ignore and n:
        t[::3] = -100
    return x, W, b, wt, t


def _check(x, W, b, wt, t, eps, red, backend="torch"):
    """Loss and every gradient against stock; half precision: against the fp64 truth, within a
    factor of stock's own error (tests/tolerances.py)."""
    kw = dict(label_smoothing=eps, reduction=red)
    leaves = [v for v in (x, W, b) if v is not None]
    ref = STOCK(x, W, t, linear_bias=b, weight=wt, **kw)
    out = safeloss.linear_cross_entropy(x, W, t, linear_bias=b, weight=wt, backend=backend, **kw)
    half = x.dtype in (torch.float16, BF16)
    if half:
        leaves64 = [v.detach().double().requires_grad_(True) for v in leaves]
        x64, W64 = leaves64[0], leaves64[1]
        b64 = leaves64[2] if b is not None else None
        truth = STOCK(x64, W64, t, linear_bias=b64, weight=None if wt is None else wt.double(), **kw)
    assert_matches(out, ref, truth.to(ref.dtype).double() if half else None, "loss")
    if not ref.numel():
        return
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5)).to(ref.dtype) if red == "none" \
        else torch.ones((), dtype=ref.dtype)
    gr = torch.autograd.grad(ref, leaves, up)
    go = torch.autograd.grad(out, leaves, up)
    gt = torch.autograd.grad(truth, leaves64, up.double()) if half else [None] * len(leaves)
    for name, a, s_, tr in zip("xWb", go, gr, gt):
        assert_matches(a, s_, tr, f"d/d{name}")


@pytest.mark.parametrize("c,vt", [(7, 3), (50, 16), (129, 128), (64, 64)], ids=lambda v: str(v))
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("red", ["mean", "sum", "none"])
def test_two_pass_matches_stock(monkeypatch, c, vt, eps, red):
    """Classes split into tiles that do not divide C (and one that does), label smoothing with a
    class weight, ignored rows, a non-uniform upstream gradient."""
    monkeypatch.setattr(chunked, "FORCE_ROWS", 4)
    monkeypatch.setattr(chunked, "FORCE_VOCAB_TILE", vt)
    for weight in (False, True):
        _check(*_problem(10, 5, c, weight=weight), eps, red)


def test_two_pass_chosen_by_the_budget_matches_stock(monkeypatch):
    """No hook: a budget too small for whole rows makes the plan split the classes."""
    monkeypatch.setitem(chunked.BUDGET_BYTES, "cpu", 64 << 10)
    n, h, c = 40, 6, 3000
    p = chunked.plan(n, h, c, dtype=FP64, device_type="cpu", need=(True, True, True))
    assert p.passes == 2 and c % p.vocab_tile != 0, p
    _check(*_problem(n, h, c), 0.1, "mean")


@pytest.mark.parametrize("n", [0, 1, 2])
def test_tiny_batches(monkeypatch, n):
    monkeypatch.setattr(chunked, "FORCE_VOCAB_TILE", 4)
    _check(*_problem(n, 5, 11, ignore=False), 0.0, "mean" if n else "sum")
    monkeypatch.setattr(chunked, "FORCE_VOCAB_TILE", None)
    _check(*_problem(n, 5, 11, ignore=False), 0.1, "sum")


@pytest.mark.parametrize("vt", [None, 3])
def test_infinite_logits_match_stock(monkeypatch, vt):
    """-inf logits (a masked vocabulary entry through the bias) give stock's finite loss; a row
    whose logits are all -inf gives NaN, as stock's; in one pass and across class tiles."""
    monkeypatch.setattr(chunked, "FORCE_VOCAB_TILE", vt)
    x, W, _, _, t = _problem(6, 4, 8, ignore=False)
    b = torch.zeros(8, dtype=FP64)
    b[[0, 5]] = -math.inf
    t = torch.where((t == 0) | (t == 5), 1, t)
    _check(x, W, b.requires_grad_(True), None, t, 0.0, "none")
    allneg = torch.full((8,), -math.inf, dtype=FP64)
    ref = STOCK(x.detach(), W.detach(), t, linear_bias=allneg, reduction="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = safeloss.linear_cross_entropy(x.detach(), W.detach(), t, linear_bias=allneg, reduction="none")
        except safeloss.SafeLossError:
            return  # reported as non-finite: also a faithful outcome
    assert torch.isnan(ref).all() and torch.isnan(out).all()


def _triton_param():
    reason = dispatch.triton_unavailable_reason(torch.device("cpu"))
    return pytest.param("triton", marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


@pytest.mark.parametrize("backend", [_triton_param()])
def test_triton_tile_writes_the_half_gradient_directly(monkeypatch, backend):
    """The CUDA half path of the Triton tile (the kernel stores G in bf16 for the matmuls; no
    fp32 gradient tile), through the interpreter on CPU tensors."""
    monkeypatch.setattr(chunked, "HALF_OPERANDS_ON_CPU", True)
    monkeypatch.setattr(chunked, "FORCE_ROWS", 3)
    x, W, b, wt, t = _problem(8, 5, 9, dtype=BF16)
    _check(x, W, b, wt, t, 0.1, "mean", backend=backend)
    _check(x, W, None, None, t, 0.0, "none", backend=backend)


def test_n_times_v_over_2_31_runs_on_meta(monkeypatch):
    """65537 x 32771 logits (> 2^31 elements) on the meta device: every chunk's shapes line up,
    the gradients have the operands' shapes."""
    n, h, c = 65537, 8, 32771
    assert n * c > 2**31
    monkeypatch.setitem(chunked.BUDGET_BYTES, "cpu", 1 << 30)  # a few chunks: meta ops still cost time
    x = torch.empty(n, h, device="meta", requires_grad=True)
    W = torch.empty(c, h, device="meta", requires_grad=True)
    t = torch.empty(n, dtype=torch.long, device="meta")
    loss = safeloss.linear_cross_entropy(x, W, t)
    gx, gw = torch.autograd.grad(loss, [x, W])
    assert loss.shape == () and gx.shape == x.shape and gw.shape == W.shape

"""LLM and RL extras (z-loss, softcap, temperature, per-token statistics) on all three ops.

Values and gradients are judged against a float64 reference written here from the formulas of
the feature (transform the logits, stock cross-entropy of the result, plus z_loss * lse^2 reduced
over the counted positions), independently of safeloss's code. With every extra at its default the
call must be today's, bit for bit; every raise site has a test.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import pickle
import re
import time
import warnings
import zlib
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import safeloss
from safeloss.backends import dispatch
from safeloss.core import _flags as F_
from safeloss.core import checks
from safeloss.core import extras as X
from safeloss.linear import chunked
from tests.tolerances import HALF, TIGHT

C = 5


# ============================================================================ the reference


def reference(z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
              ignore_index: int = -100, reduction: str = "mean", eps: float = 0.0,
              softcap: float | None = None, temperature: float = 1.0, z_loss: float = 0.0
              ) -> tuple[torch.Tensor, dict[str, Any]]:
    """float64 loss and statistics from the formulas (z: logits as float64, any requires_grad)."""
    cdim = 0 if z.dim() == 1 else 1
    zt = z
    if softcap is not None:
        zt = softcap * torch.tanh(zt / softcap)
    zt = zt / temperature
    prob = target.shape == z.shape and target.is_floating_point()
    w = None if weight is None else weight.double()
    if prob:
        ce = F.cross_entropy(zt, target.double(), w, reduction=reduction, label_smoothing=eps)
        counted = torch.ones(zt.shape[:cdim] + zt.shape[cdim + 1:], dtype=torch.bool)
    else:
        ce = F.cross_entropy(zt, target, w, ignore_index=ignore_index, reduction=reduction,
                             label_smoothing=eps)
        counted = target != ignore_index
    lse = torch.logsumexp(zt, cdim)
    zl = torch.where(counted, z_loss * lse**2, torch.zeros_like(lse)) if z_loss else torch.zeros_like(lse)
    if reduction == "none":
        zr = zl
    elif reduction == "sum":
        zr = zl.sum()
    else:
        zr = zl.sum() / counted.sum()
    with torch.no_grad():
        p = zt.softmax(cdim)
        ent = torch.special.entr(p).sum(cdim)
        acc = None
        if not prob:
            acc = ((zt.argmax(cdim) == target) & counted).sum() / counted.sum()
    return ce + zr, dict(lse=lse.detach(), entropy=ent, z_loss=zr.detach(), accuracy=acc)


# ============================================================================ inputs

OPTIONS = {
    "softcap": dict(softcap=2.5),
    "temperature": dict(temperature=0.6),
    "z_loss": dict(z_loss=0.05),
    "stats": dict(return_stats=True),
    "all": dict(softcap=4.0, temperature=1.7, z_loss=1e-2, return_stats=True),
}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]
KINDS = ["index-ignore", "index-weight-smooth", "prob-smooth", "kdim", "1d"]


def make(kind: str, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    kw: dict[str, Any] = {}
    if kind == "1d":
        x = torch.randn(C, generator=g) * 3
        t = torch.randint(0, C, (), generator=g)
    elif kind == "kdim":
        x = torch.randn(3, C, 2, 2, generator=g) * 3
        t = torch.randint(0, C, (3, 2, 2), generator=g)
        t[0, 0, 1] = -100
    else:
        x = torch.randn(7, C, generator=g) * 3
        if kind.startswith("prob"):
            t = torch.randn(7, C, generator=g).softmax(1)
        else:
            t = torch.randint(0, C, (7,), generator=g)
            t[2] = t[5] = -100
    if kind == "index-weight-smooth":
        kw = dict(weight=(torch.rand(C, generator=g) + 0.3).to(dtype), label_smoothing=0.1)
    if kind == "prob-smooth":
        kw = dict(label_smoothing=0.2)
    return x.to(dtype), t, kw


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TIGHT.get(dtype) or HALF[dtype]


def close(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(ours.double(), ref.double(), rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def upstream(out: torch.Tensor) -> torch.Tensor:
    """A non-trivial upstream gradient: random per position, 1.7 for a reduced loss."""
    if out.dim() == 0:
        return torch.tensor(1.7, dtype=out.dtype)
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)


def check_stats(stats: safeloss.LossStats, ref: dict, loss: torch.Tensor, pos: tuple[int, ...]) -> None:
    assert isinstance(stats, safeloss.LossStats)
    for name in ("lse", "entropy", "z_loss"):
        v = getattr(stats, name)
        assert v.dtype == torch.float32 and not v.requires_grad, name
    assert stats.lse.shape == stats.entropy.shape == pos
    assert stats.z_loss.shape == loss.shape
    close(stats.lse, ref["lse"], torch.float32, "lse")
    close(stats.entropy, ref["entropy"], torch.float32, "entropy")
    close(stats.z_loss, ref["z_loss"], torch.float32, "z_loss term")
    if ref["accuracy"] is None:  # probability targets: no position has a class label
        assert stats.accuracy.shape == () and stats.accuracy.dtype == torch.float32
        assert math.isnan(stats.accuracy.item())
    else:
        assert stats.accuracy.shape == () and stats.accuracy.dtype == torch.float32
        close(stats.accuracy, ref["accuracy"], torch.float32, "accuracy")


# ============================================================================ cross_entropy


# Every option with two kinds of targets, and all options together with every kind.
PAIRS = [("all", k) for k in KINDS] + [
    ("softcap", "index-weight-smooth"), ("softcap", "prob-smooth"), ("temperature", "index-ignore"),
    ("temperature", "kdim"), ("z_loss", "index-weight-smooth"), ("z_loss", "prob-smooth"),
    ("z_loss", "1d"), ("stats", "index-ignore"), ("stats", "kdim")]


@pytest.mark.parametrize("red", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option,kind", PAIRS)
def test_cross_entropy_matches_reference(option: str, kind: str, dtype: torch.dtype, red: str) -> None:
    x, t, kw = make(kind, dtype, seed=hash((option, red, kind)) % 1000)
    ex = OPTIONS[option]
    xo = x.clone().requires_grad_()
    prob = kind.startswith("prob")
    tq = t.to(dtype).requires_grad_() if prob else t
    res = safeloss.cross_entropy(xo, tq, reduction=red, **kw, **ex)
    out, stats = res if ex.get("return_stats") else (res, None)
    assert out.dtype == dtype
    xr = x.double().requires_grad_()
    tr = tq.detach().double().requires_grad_() if prob else t
    ref, rstats = reference(xr, tr, kw.get("weight"), reduction=red,
                            eps=kw.get("label_smoothing", 0.0),
                            **{k: v for k, v in ex.items() if k != "return_stats"})
    close(out, ref, dtype, "loss")
    g = upstream(out)
    wrt = [xo, tq] if prob else [xo]
    ours = torch.autograd.grad((out * g).sum(), wrt)
    want = torch.autograd.grad((ref * g.double()).sum(), [xr, tr] if prob else [xr])
    for a, b, name in zip(ours, want, ("d/dlogits", "d/dtarget")):
        assert a.dtype == dtype
        close(a, b, dtype, name)
    if stats is not None:
        check_stats(stats, rstats, out, tuple(t.shape) if not prob else tuple(x.shape[:1]))


# ============================================================================ Triton: the extras fused

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_TRITON_REASON = dispatch.triton_unavailable_reason(DEV)
needs_triton = pytest.mark.skipif(_TRITON_REASON is not None, reason=str(_TRITON_REASON))
TRITON = pytest.param("triton", marks=needs_triton)
# Tests of what CPU calls report at once: the kernels on CPU tensors need the interpreter.
_CPU_REASON = dispatch.triton_unavailable_reason(torch.device("cpu"))
CPU_BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(_CPU_REASON is not None,
                                                                         reason=str(_CPU_REASON)))]
HALF_AND_FP32 = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the kernel launches of the extras' Triton path, and fails any call that takes its
    torch-op path (the extras computed by torch ops: another pass over the logits)."""
    from safeloss.backends import triton_extras
    from safeloss.ce import extras as ce_extras

    n = {"fwd": 0, "bwd": 0}

    def counted(name: str, f: Any) -> Any:
        def launch(*a: Any, **k: Any) -> Any:
            n[name] += 1
            return f(*a, **k)
        return launch

    def torch_path(*a: Any, **k: Any) -> None:
        raise AssertionError("the extras ran as torch ops, not in the kernels")

    monkeypatch.setattr(triton_extras, "_launch_fwd", counted("fwd", triton_extras._launch_fwd))
    monkeypatch.setattr(triton_extras, "_launch_bwd", counted("bwd", triton_extras._launch_bwd))
    monkeypatch.setattr(ce_extras._RowsCE, "apply", torch_path)
    monkeypatch.setattr(ce_extras, "_differentiable", torch_path)
    monkeypatch.setattr(ce_extras, "device_counts", torch_path)
    return n


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("module", [False, True])
def test_backends_and_module_agree(backend: str, module: bool, request: pytest.FixtureRequest) -> None:
    """backend="triton" runs the kernels with the extras inside (one launch forward, one backward)."""
    n = request.getfixturevalue("launches") if backend == "triton" else None
    x, t, kw = make("index-weight-smooth", torch.float32, 3)
    x, t, w = x.to(DEV).requires_grad_(), t.to(DEV), kw["weight"].to(DEV)
    ex = OPTIONS["all"]
    ref, _ = reference(x.detach().cpu().double(), t.cpu(), kw["weight"], eps=0.1, softcap=4.0,
                       temperature=1.7, z_loss=1e-2)
    if module:
        fn = safeloss.SafeCrossEntropyLoss(w, label_smoothing=0.1, backend=backend, **ex)
        out, st = fn(x, t)
    else:
        out, st = safeloss.cross_entropy(x, t, w, label_smoothing=0.1, backend=backend, **ex)
    out.backward()
    close(out.cpu(), ref, torch.float32, "loss")
    assert st.lse.shape == (7,) and st.accuracy.shape == ()
    if n is not None:
        assert n == {"fwd": 1, "bwd": 1}


@needs_triton
@pytest.mark.parametrize("red", REDUCTIONS)
@pytest.mark.parametrize("dtype", HALF_AND_FP32, ids=str)
@pytest.mark.parametrize("option,kind", PAIRS)
def test_triton_matches_reference(option: str, kind: str, dtype: torch.dtype, red: str,
                                  launches: dict[str, int]) -> None:
    """The kernels with the extras fused, against the float64 reference: values, gradients for a
    random upstream gradient (probability targets: d/dtarget too), statistics."""
    x, t, kw = make(kind, dtype, seed=zlib.crc32(f"{option}{kind}{red}".encode()) % 1000)
    ex = OPTIONS[option]
    prob = kind.startswith("prob")
    xo = x.to(DEV).requires_grad_()
    tq = t.to(dtype).to(DEV).requires_grad_() if prob else t.to(DEV)
    kwd = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    res = safeloss.cross_entropy(xo, tq, reduction=red, backend="triton", **kwd, **ex)
    out, stats = res if ex.get("return_stats") else (res, None)
    assert out.dtype == dtype and launches["fwd"] == 1
    xr = x.double().requires_grad_()
    tr = t.to(dtype).double().requires_grad_() if prob else t
    ref, rstats = reference(xr, tr, kw.get("weight"), reduction=red, eps=kw.get("label_smoothing", 0.0),
                            **{k: v for k, v in ex.items() if k != "return_stats"})
    close(out.cpu(), ref, dtype, "loss")
    g = upstream(out.cpu())
    ours = torch.autograd.grad((out * g.to(DEV)).sum(), [xo, tq] if prob else [xo])
    want = torch.autograd.grad((ref * g.double()).sum(), [xr, tr] if prob else [xr])
    assert launches == {"fwd": 1, "bwd": 1}
    for a, b, name in zip(ours, want, ("d/dlogits", "d/dtarget")):
        assert a.dtype == dtype and a.shape == b.shape
        close(a.cpu(), b, dtype, name)
    if stats is not None:
        check_stats(safeloss.LossStats(*(None if v is None else v.cpu() for v in stats)), rstats, out.cpu(),
                    tuple(t.shape) if not prob else tuple(x.shape[:1]))


@needs_triton
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_triton_rows_in_several_blocks(monkeypatch: pytest.MonkeyPatch, softcap: float | None) -> None:
    """Rows streamed in 64-class blocks: the online entropy and argmax across blocks (ties to the
    lowest index across blocks, a NaN above everything, +-inf logits, a constant row), each row
    against torch's argmax and the reference formulas."""
    from safeloss.backends import triton_backend, triton_extras

    monkeypatch.setattr(triton_backend, "FORCE_BLOCK_C", 64)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 300, generator=g, dtype=torch.float64) * 4
    x[0, 10] = x[0, 200] = 40.0  # a tie across blocks: 10
    x[1, 250] = x[1, 70] = 40.0  # a tie, the later block seen first in column order: 70
    x[2, 150] = math.nan  # argmax: the NaN
    x[2, 5] = math.inf
    x[3] = 1.5  # constant: 0
    x[4, 100:] = -math.inf  # masked classes (no cap: probability 0, entropy terms 0)
    x[5, 64] = x[5, 128] = math.inf  # two +inf: the first
    t = torch.tensor([10, 250, 150, 0, 3, 64, -100])
    ex = X.Extras(softcap, 0.8, 0.05, True)
    ce, zl, lse, ent, hit, flags = triton_extras.rows(
        x.float().to(DEV), t.to(DEV), None, ignore_index=-100, label_smoothing=0.0, prob_target=False, ex=ex)
    assert hit is not None and ent is not None and zl is not None
    want_hit = (x.argmax(1) == t) & (t != -100)
    assert hit.cpu().bool().tolist() == want_hit.tolist()
    xf = x.float().double()
    zt = xf if softcap is None else softcap * torch.tanh(xf / softcap)
    zt = zt / 0.8
    rlse = torch.logsumexp(zt, 1)
    logp = zt - rlse[:, None]
    rent = -(logp.exp() * logp.clamp(min=-1e300)).sum(1)
    finite = [r for r in range(7) if r not in (2,) and (softcap is not None or r not in (5,))]
    close(lse.cpu()[finite], rlse[finite], torch.float32, "lse")
    close(ent.cpu()[finite], rent[finite], torch.float32, "entropy")
    valid = t != -100
    rce = torch.where(valid, rlse - logp.new_tensor(0.0) - zt.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
    close(ce.cpu()[finite], rce[finite], torch.float32, "cross-entropy")
    close(zl.cpu()[finite], torch.where(valid, 0.05 * rlse**2, 0.0)[finite], torch.float32, "z-loss term")
    assert bool(torch.isnan(ce[2]).item()) and flags[F_.NONFINITE_ROW] >= 1


@needs_triton
def test_triton_softcap_across_magnitudes() -> None:
    """The kernels' tanh (exp2-based, an odd polynomial below |z / s| = 0.3) against float64 over
    twelve decades of logits, both signs, both branches: loss and gradient to fp32 accuracy."""
    mags = torch.logspace(-8, 4, 25, dtype=torch.float64)
    x = torch.stack([mags, -mags, mags * 0.29, -mags * 0.31, mags.flip(0)], 1).t().contiguous()  # (5, 25)
    t = torch.tensor([0, 3, 24, 12, 7])
    xo = x.float().to(DEV).requires_grad_()
    out = safeloss.cross_entropy(xo, t.to(DEV), softcap=1.0, reduction="none", backend="triton")
    (gx,) = torch.autograd.grad(out.sum(), xo)
    xr = x.float().double().requires_grad_()
    ref, _ = reference(xr, t, reduction="none", softcap=1.0)
    close(out.cpu(), ref, torch.float32, "loss")
    close(gx.cpu(), torch.autograd.grad(ref.sum(), xr)[0], torch.float32, "d/dlogits")


@pytest.mark.gpu
def test_triton_extras_on_cuda_without_host_sync() -> None:
    """On a GPU: the fused extras (forward, backward, statistics, deferred findings) never wait for
    the device, and bf16 LM-sized rows (several 4096-column blocks) match the reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 20000, generator=g) * 4).bfloat16().cuda().requires_grad_()
    t = torch.randint(0, 20000, (16,), generator=g).cuda()
    t[3] = -100
    ex = dict(softcap=30.0, temperature=0.7, z_loss=1e-4)
    safeloss.cross_entropy(x, t, return_stats=True, **ex)[0].backward()  # compile first
    torch.cuda.synchronize()
    x.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, st = safeloss.cross_entropy(x, t, return_stats=True, **ex)
        out.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    xr = x.detach().cpu().double().requires_grad_()
    ref, rs = reference(xr, t.cpu(), **ex)
    close(out.cpu(), ref, torch.bfloat16, "loss")
    close(x.grad.cpu(), torch.autograd.grad(ref, xr)[0], torch.bfloat16, "d/dlogits")
    check_stats(safeloss.LossStats(*(v.cpu() for v in st)), rs, out.cpu(), (16,))


def test_triton_extras_forward_tiles_are_lean() -> None:
    """With extras, tiles of several positions hold 256 elements (512 without): each position's
    extra state (entropy, argmax, raw max) stays in registers (tests/test_aot_gate.py, the gate)."""
    from safeloss.backends import triton_backend as tb

    assert tb._tiles([1, 1, 500], 10, [0, 0, 10, 1]) == (32, 16, 4)
    assert tb._tiles([1, 1, 500], 10, [0, 0, 10, 1], lean=True) == (16, 16, 4)
    assert tb._tiles([1, 4, 4096], 21, [0, 21 * 4096, 1, 4096], lean=True) == (16, 16, 4)  # NCHW
    assert tb._tiles([1, 1, 8], 128256, [0, 0, 128256, 1], lean=True) == (1, 4096, 4)  # LM rows: as before


@needs_triton
def test_triton_makes_no_other_pass_over_the_logits() -> None:
    """Dispatch-mode view (what torch.compile and make_fx see): forward and backward touch the
    logits only through the two kernel ops; every other op works on per-position vectors."""
    x, t, kw = make("index-weight-smooth", torch.float32, 2)
    x, t, w = x.to(DEV).requires_grad_(), t.to(DEV), kw["weight"].to(DEV)

    class Logits(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            seen = [*torch.utils._pytree.tree_leaves((args, kwargs)),
                    *torch.utils._pytree.tree_leaves(out)]
            if any(isinstance(v, torch.Tensor) and v.numel() >= x.numel() for v in seen):
                self.ops.append(func._schema.name)
            return out

    mode = Logits()
    with mode:
        out, st = safeloss.cross_entropy(x, t, w, label_smoothing=0.1, backend="triton", softcap=4.0,
                                         temperature=1.7, z_loss=1e-2, return_stats=True)
        (dx,) = torch.autograd.grad(out, x)
    assert [op for op in mode.ops if op not in ("aten::detach", "aten::empty_like")] == [
        "safeloss::triton_cex_fwd", "safeloss::triton_cex_bwd"], mode.ops
    xr = x.detach().cpu().double().requires_grad_()
    ref, rs = reference(xr, t.cpu(), kw["weight"], eps=0.1, softcap=4.0, temperature=1.7, z_loss=1e-2)
    close(out.cpu(), ref, torch.float32, "loss")
    close(dx.cpu(), torch.autograd.grad(ref, xr)[0], torch.float32, "d/dlogits")
    close(st.entropy.cpu(), rs["entropy"], torch.float32, "entropy")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 6), c=st.integers(1, 9), cap=st.one_of(st.none(), st.floats(0.1, 100)),
       temp=st.floats(0.05, 20), zl=st.floats(0, 1), red=st.sampled_from(REDUCTIONS),
       eps=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2**16))
def test_cross_entropy_property(n: int, c: int, cap: float | None, temp: float, zl: float, red: str,
                                eps: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g, dtype=torch.float64) * 10).requires_grad_()
    t = torch.randint(0, c, (n,), generator=g)
    if n:
        t[0] = -100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", safeloss.SafeLossWarning)  # empty means, one class
        out, stats = safeloss.cross_entropy(x, t, reduction=red, label_smoothing=eps, softcap=cap,
                                            temperature=temp, z_loss=zl, return_stats=True)
    xr = x.detach().clone().requires_grad_()
    ref, rs = reference(xr, t, reduction=red, eps=eps, softcap=cap, temperature=temp, z_loss=zl)
    close(out, ref, torch.float64, "loss")
    if out.numel() and bool(torch.isfinite(ref).all()):
        gx, = torch.autograd.grad(out.sum(), x)
        gr, = torch.autograd.grad(ref.sum(), xr)
        close(gx, gr, torch.float64, "grad")
    close(stats.lse, rs["lse"], torch.float32, "lse")


# ============================================================================ linear_cross_entropy

N, H = 7, 4
LKINDS = ["index-ignore-bias", "index-weight-smooth", "prob", "kdim"]


def make_linear(kind: str, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g)
    out: dict[str, Any] = dict(kw={})
    if kind == "kdim":
        W = torch.randn(C, 2, H, generator=g)
        b = torch.randn(C, 2, generator=g)
        t = torch.randint(0, C, (N, 2), generator=g)
        t[1, 0] = -100
        out["kw"] = dict(ignore_index=-100)
    else:
        W = torch.randn(C, H, generator=g)
        b = torch.randn(C, generator=g) if kind == "index-ignore-bias" else None
        if kind == "prob":
            t = torch.randn(N, C, generator=g).softmax(1).to(dtype)
        else:
            t = torch.randint(0, C, (N,), generator=g)
            t[3] = -100
            out["kw"] = dict(ignore_index=-100)
        if kind == "index-weight-smooth":
            out["kw"] = dict(weight=(torch.rand(C, generator=g) + 0.3).to(dtype), label_smoothing=0.1)
    out.update(x=x.to(dtype), W=W.to(dtype), b=None if b is None else b.to(dtype), t=t)
    return out


def linear_reference(d: dict[str, Any], red: str, ex: dict) -> tuple[torch.Tensor, dict, list[torch.Tensor]]:
    x = d["x"].double().requires_grad_()
    W = d["W"].double().requires_grad_()
    b = None if d["b"] is None else d["b"].double().requires_grad_()
    z = torch.einsum("nh,c...h->nc...", x, W)
    if b is not None:
        z = z + b
    if d["x"].dtype in (torch.float16, torch.bfloat16):
        # Stock's half-precision linear rounds the logits to its dtype (the values safeloss
        # computes from); the derivative is the identity's, as the chain rule through it.
        z = z + (z.to(d["x"].dtype).double() - z).detach()
    t = d["t"]
    prob = t.is_floating_point()
    if prob:
        t = t.double().requires_grad_()
    kw = d["kw"]
    ref, rs = reference(z, t, kw.get("weight"), reduction=red, eps=kw.get("label_smoothing", 0.0),
                        **{k: v for k, v in ex.items() if k != "return_stats"})
    leaves = [x, W] + ([b] if b is not None else []) + ([t] if prob else [])
    return ref, rs, leaves


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunked, "FORCE_ROWS", 3)  # three chunks for N = 7: the loop, not one tile


LPAIRS = [("all", k) for k in LKINDS] + [
    ("softcap", "index-weight-smooth"), ("temperature", "prob"), ("z_loss", "kdim"),
    ("z_loss", "index-ignore-bias"), ("stats", "prob")]


@pytest.mark.parametrize("red", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("option,kind", LPAIRS)
def test_linear_matches_reference(small_chunks: None, option: str, kind: str, dtype: torch.dtype,
                                  red: str) -> None:
    d = make_linear(kind, dtype, seed=hash((option, red, kind)) % 1000)
    ex = OPTIONS[option]
    x, W = d["x"].clone().requires_grad_(), d["W"].clone().requires_grad_()
    b = None if d["b"] is None else d["b"].clone().requires_grad_()
    t = d["t"].clone().requires_grad_() if d["t"].is_floating_point() else d["t"]
    res = safeloss.linear_cross_entropy(x, W, t, linear_bias=b, reduction=red, **d["kw"], **ex)
    out, stats = res if ex.get("return_stats") else (res, None)
    ref, rs, leaves = linear_reference(d, red, ex)
    assert out.dtype == dtype
    # bf16: the reference sees the bf16 operands exactly and rounds the logits to bf16 as stock's
    # linear does; safeloss computes the tile's matmul in float32 and rounds it the same way.
    close(out, ref, dtype, "loss")
    g = upstream(out)
    ours = torch.autograd.grad((out * g).sum(), [v for v in (x, W, b, t) if v is not None and v.requires_grad])
    want = torch.autograd.grad((ref * g.double()).sum(), leaves)
    for a, w_ in zip(ours, want):
        close(a, w_, dtype, "gradient")
    if stats is not None:
        pos = tuple(d["t"].shape) if not d["t"].is_floating_point() else (N,)
        check_stats(stats, rs, out, pos)


@pytest.mark.parametrize("red", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["index-ignore-bias", "index-weight-smooth"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_linear_triton_tiles_match_reference(small_chunks: None, monkeypatch: pytest.MonkeyPatch,
                                             option: str, kind: str, dtype: torch.dtype, red: str) -> None:
    """backend="triton": each chunk's tile goes through the kernels with the extras inside (one
    forward launch per chunk, one backward launch per chunk), never the torch-op tile."""
    from safeloss.backends import triton_extras
    from safeloss.linear import extras as linear_extras

    if _CPU_REASON is not None:
        pytest.skip(_CPU_REASON)
    n = {"fwd": 0, "bwd": 0}
    fwd, bwd = triton_extras._fwd_impl, triton_extras._launch_bwd_x

    def count(name: str, f: Any) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            n[name] += 1
            return f(*a, **k)
        return call

    def torch_tile(*a: Any, **k: Any) -> None:
        raise AssertionError("a tile ran as torch ops")

    monkeypatch.setattr(triton_extras, "_fwd_impl", count("fwd", fwd))
    monkeypatch.setattr(triton_extras, "_launch_bwd_x", count("bwd", bwd))
    monkeypatch.setattr(linear_extras, "_forward_tile", torch_tile)
    d = make_linear(kind, dtype, seed=zlib.crc32(f"{option}{kind}{red}".encode()) % 1000)
    ex = OPTIONS[option]
    x, W = d["x"].clone().requires_grad_(), d["W"].clone().requires_grad_()
    b = None if d["b"] is None else d["b"].clone().requires_grad_()
    res = safeloss.linear_cross_entropy(x, W, d["t"], linear_bias=b, reduction=red, backend="triton",
                                        **d["kw"], **ex)
    out, stats = res if ex.get("return_stats") else (res, None)
    ref, rs, leaves = linear_reference(d, red, ex)
    close(out, ref, dtype, "loss")
    g = upstream(out)
    ours = torch.autograd.grad((out * g).sum(), [v for v in (x, W, b) if v is not None])
    want = torch.autograd.grad((ref * g.double()).sum(), leaves)
    for a, w_ in zip(ours, want):
        close(a, w_, dtype, "gradient")
    assert n == {"fwd": 3, "bwd": 3}  # N = 7 in chunks of 3
    if stats is not None:
        check_stats(stats, rs, out, tuple(d["t"].shape))


def test_linear_module_matches_functional() -> None:
    torch.manual_seed(0)
    m = safeloss.SafeLinearCrossEntropyLoss(H, C, bias=True, reduction="sum", softcap=3.0, z_loss=0.1,
                                            return_stats=True)
    assert "softcap=3.0" in repr(m) and "z_loss=0.1" in repr(m)
    x, t = torch.randn(N, H), torch.randint(0, C, (N,))
    out, st = m(x, t)
    ref, rs = safeloss.linear_cross_entropy(x, m.linear.weight, t, linear_bias=m.linear.bias,
                                            reduction="sum", softcap=3.0, z_loss=0.1, return_stats=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(st.lse, rs.lse)


class _Largest(TorchDispatchMode):
    """The largest tensor storage any op creates (elements)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor) and o.untyped_storage().nbytes() > 0:
                self.largest = max(self.largest, o.untyped_storage().nbytes() // o.element_size())
        return out


@pytest.mark.parametrize("kind,red", [("index", "mean"), ("index", "none"), ("prob", "mean"),
                                      ("kdim", "none")])
def test_linear_never_materializes_the_logits(monkeypatch: pytest.MonkeyPatch, kind: str, red: str) -> None:
    n, h, c, rows = 48, 8, 600, 8
    monkeypatch.setattr(chunked, "FORCE_ROWS", rows)  # 8 rows per chunk
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=g, requires_grad=True)
    if kind == "kdim":
        c = 300  # C * D = 600: the same tile width, 2 positions per row
        W = torch.randn(c, 2, h, generator=g, requires_grad=True)
        t = torch.randint(0, c, (n, 2), generator=g)
    else:
        W = torch.randn(c, h, generator=g, requires_grad=True)
        t = torch.randint(0, c, (n,), generator=g)
    q = torch.randn(n, c, generator=g).softmax(1).requires_grad_() if kind == "prob" else None
    mode = _Largest()
    with mode:
        loss, stats = safeloss.linear_cross_entropy(
            x, W, t if q is None else q, reduction=red, softcap=30.0, temperature=0.7, z_loss=1e-4,
            return_stats=True)
        (loss.sum() if red == "none" else loss).backward()
    assert stats.lse.shape == stats.entropy.shape == tuple(t.shape)
    logits = n * c * (2 if kind == "kdim" else 1)
    # a tile (a few rows of C * D), dW (C * D x H), or the probability target itself (an input)
    limit = max(W.numel(), rows * 600, q.numel() if q is not None else 0)
    assert mode.largest <= limit, (mode.largest, limit)
    if q is None:
        assert mode.largest < logits


def test_linear_extras_grads_under_vmap_and_double_backward(small_chunks: None) -> None:
    from torch.func import grad

    d = make_linear("index-ignore-bias", torch.float64, 5)
    ex = dict(softcap=3.0, temperature=0.8, z_loss=0.1)
    W = d["W"].clone().requires_grad_()

    def f(x: torch.Tensor) -> torch.Tensor:
        return safeloss.linear_cross_entropy(x, W, d["t"], linear_bias=d["b"], **ex)

    gx = grad(f)(d["x"])
    x = d["x"].clone().requires_grad_()
    (gx2,) = torch.autograd.grad(f(x), x, create_graph=True)
    close(gx, gx2.detach(), torch.float64, "func.grad vs autograd")
    # double backward: d/dW of a gradient penalty, against the reference
    (gW,) = torch.autograd.grad(gx2.square().sum(), W)
    xr = d["x"].clone().requires_grad_()
    Wr = d["W"].clone().requires_grad_()
    z = xr @ Wr.T + d["b"]
    ref, _ = reference(z, d["t"], **ex)
    (gxr,) = torch.autograd.grad(ref, xr, create_graph=True)
    (gWr,) = torch.autograd.grad(gxr.square().sum(), Wr)
    close(gW, gWr, torch.float64, "double backward")


# ============================================================================ defaults


def _grads(fn: Any, *leaves: torch.Tensor) -> list[torch.Tensor]:
    leaves2 = [v.detach().clone().requires_grad_() for v in leaves]
    out = fn(*leaves2)
    assert type(out) is torch.Tensor
    return [out, *torch.autograd.grad(out.sum(), leaves2)]


DEFAULTS = dict(softcap=None, temperature=1.0, z_loss=0.0, return_stats=False)


@pytest.mark.parametrize("red", REDUCTIONS)
def test_defaults_are_todays_call_bit_for_bit(monkeypatch: pytest.MonkeyPatch, red: str) -> None:
    """Explicit defaults never reach an extras path: the results are today's, to the bit."""
    from safeloss.ce import extras as ce_extras
    from safeloss.linear import extras as linear_extras

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("the extras path was taken with default extras")

    monkeypatch.setattr(ce_extras, "run", boom)
    monkeypatch.setattr(linear_extras, "run", boom)
    x, t, kw = make("index-weight-smooth", torch.float32, 1)
    for a, b in zip(_grads(lambda v: safeloss.cross_entropy(v, t, reduction=red, **kw, **DEFAULTS), x),
                    _grads(lambda v: safeloss.cross_entropy(v, t, reduction=red, **kw), x)):
        assert torch.equal(a, b)
    m1 = safeloss.SafeCrossEntropyLoss(kw["weight"], reduction=red, **DEFAULTS)
    m2 = safeloss.SafeCrossEntropyLoss(kw["weight"], reduction=red)
    for a, b in zip(_grads(lambda v: m1(v, t), x), _grads(lambda v: m2(v, t), x)):
        assert torch.equal(a, b)
    assert repr(m1) == repr(m2)
    d = make_linear("index-ignore-bias", torch.float32, 2)
    for a, b in zip(
        _grads(lambda v, w: safeloss.linear_cross_entropy(v, w, d["t"], linear_bias=d["b"], reduction=red,
                                                          **DEFAULTS), d["x"], d["W"]),
        _grads(lambda v, w: safeloss.linear_cross_entropy(v, w, d["t"], linear_bias=d["b"], reduction=red),
               d["x"], d["W"]),
    ):
        assert torch.equal(a, b)
    lm = safeloss.SafeLinearCrossEntropyLoss(H, C, reduction=red, **DEFAULTS)
    assert type(lm(d["x"], d["t"])) is torch.Tensor


def test_defaults_spelled_as_numpy_take_the_plain_path() -> None:
    x, t, _ = make("index-ignore", torch.float32)
    a = safeloss.cross_entropy(x, t, temperature=np.float64(1.0), z_loss=np.float32(0.0))
    assert type(a) is torch.Tensor and torch.equal(a, safeloss.cross_entropy(x, t))


def test_stock_signatures_unchanged_under_patch(clean_patch: None) -> None:
    import inspect

    def names(fn: Any) -> list[tuple[str, object]]:
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    stock = [names(F.cross_entropy), names(torch.nn.CrossEntropyLoss.forward),
             names(torch.nn.CrossEntropyLoss.__init__)]
    with safeloss.patch():
        assert [names(F.cross_entropy), names(torch.nn.CrossEntropyLoss.forward),
                names(torch.nn.CrossEntropyLoss.__init__)] == stock


# ============================================================================ raise sites

BAD = [
    (dict(softcap=0.0), safeloss.ExtrasError, r"softcap=0\.0 is not a positive, finite number: the cap is"),
    (dict(softcap=-30), safeloss.ExtrasError, r"softcap=-30 is not a positive.*Fix: softcap=30\.0"),
    (dict(softcap=float("nan")), safeloss.ExtrasError, r"softcap=nan .*NaN would make every logit NaN"),
    (dict(softcap=math.inf), safeloss.ExtrasError, r"softcap=inf .*infinite cap is no cap.*softcap=None"),
    (dict(softcap="30"), safeloss.ArgumentTypeError, r"softcap must be a Python number, got '30' \(str\)"),
    (dict(softcap=True), safeloss.ArgumentTypeError, r"softcap must be a Python number, got True \(bool\)"),
    (dict(softcap=torch.tensor(30.0)), safeloss.ArgumentTypeError, r"softcap must be a Python number.*A tensor would be read"),
    (dict(temperature=0), safeloss.ExtrasError, r"temperature=0 must be a positive.*greedy decoding.*Fix: temperature=1\.0"),
    (dict(temperature=-0.5), safeloss.ExtrasError, r"temperature=-0\.5 .*reverses the order"),
    (dict(temperature=float("nan")), safeloss.ExtrasError, r"temperature=nan .*NaN would make"),
    (dict(temperature=math.inf), safeloss.ExtrasError, r"temperature=inf .*uniform distribution"),
    (dict(temperature=None), safeloss.ArgumentTypeError, r"temperature must be a Python number, got None"),
    (dict(temperature=[0.7]), safeloss.ArgumentTypeError, r"temperature must be a Python number, got \[0\.7\] \(list\)"),
    (dict(z_loss=-1e-4), safeloss.ExtrasError, r"z_loss=-0\.0001 must be a finite number >= 0: a negative.*Fix: z_loss=1e-4"),
    (dict(z_loss=float("nan")), safeloss.ExtrasError, r"z_loss=nan .*NaN would make the loss NaN"),
    (dict(z_loss=math.inf), safeloss.ExtrasError, r"z_loss=inf .*infinite"),
    (dict(z_loss="1e-4"), safeloss.ArgumentTypeError, r"z_loss must be a Python number"),
    (dict(return_stats=1), safeloss.ArgumentTypeError, r"return_stats must be True or False, got 1 \(int\)"),
    (dict(return_stats="yes"), safeloss.ArgumentTypeError, r"return_stats must be True or False, got 'yes'"),
    (dict(return_stats=None), safeloss.ArgumentTypeError, r"return_stats must be True or False, got None"),
    # Beyond float32, where the logits are capped and scaled: each derived scale, both sides.
    (dict(temperature=1e45), safeloss.ExtrasError, r"temperature=1e\+45 puts 1/temperature = 1e-45 below float32's smallest normal value \(1\.18e-38\).*Fix: a temperature near 1"),
    (dict(temperature=1e-39), safeloss.ExtrasError, r"temperature=1e-39 puts 1/temperature = 1e\+39 beyond float32's largest value \(3\.4e\+38\)"),
    (dict(softcap=1e-20), safeloss.ExtrasError, r"temperature=1\.0, softcap=1e-20 puts temperature/softcap\*\*2 = 1e\+40 beyond"),
    (dict(softcap=1e-300), safeloss.ExtrasError, r"temperature=1\.0, softcap=1e-300 puts softcap/temperature = 1e-300 below"),
    (dict(softcap=1e38), safeloss.ExtrasError, r"temperature=1\.0, softcap=1e\+38 puts 1/softcap = 1e-38 below"),
    (dict(softcap=30.0, temperature=1e-38), safeloss.ExtrasError, r"temperature=1e-38, softcap=30\.0 puts softcap/temperature = 3e\+39 beyond float32's largest value"),
    (dict(softcap=10**400), safeloss.ExtrasError, r"softcap is an integer of 401 digits, too large for a float.*Fix: softcap=30\.0"),
    (dict(temperature=-10**400), safeloss.ExtrasError, r"temperature is an integer of 401 digits"),
    (dict(z_loss=10**400), safeloss.ExtrasError, r"z_loss is an integer of 401 digits.*Fix: z_loss=1e-4"),
]


def _ids(case: tuple) -> str:
    return ",".join(f"{k}={v!r}" if len(repr(v)) < 24 else f"{k}={repr(v)[:5]}...({len(repr(v))} chars)"
                    for k, v in case[0].items())


@pytest.mark.parametrize("entry", ["cross_entropy", "SafeCrossEntropyLoss", "linear_cross_entropy",
                                   "SafeLinearCrossEntropyLoss"])
@pytest.mark.parametrize("case", BAD, ids=[_ids(c) for c in BAD])
def test_bad_arguments_raise(entry: str, case: tuple) -> None:
    kw, cls, match = case
    x, t, _ = make("index-ignore", torch.float32)
    op = {"cross_entropy": "cross_entropy", "SafeCrossEntropyLoss": "SafeCrossEntropyLoss",
          "linear_cross_entropy": "linear_cross_entropy",
          "SafeLinearCrossEntropyLoss": "SafeLinearCrossEntropyLoss"}[entry]
    with pytest.raises(cls, match=rf"(?s)^{op}: " + match) as e:
        if entry == "cross_entropy":
            safeloss.cross_entropy(x, t, **kw)
        elif entry == "SafeCrossEntropyLoss":
            safeloss.SafeCrossEntropyLoss(**kw)
        elif entry == "linear_cross_entropy":
            safeloss.linear_cross_entropy(torch.randn(7, H), torch.randn(C, H), t, **kw)
        else:
            safeloss.SafeLinearCrossEntropyLoss(H, C, **kw)
    assert isinstance(e.value, ValueError if cls is safeloss.ExtrasError else TypeError)
    assert isinstance(e.value, safeloss.SafeLossError)


def test_module_rechecks_extras_changed_after_construction() -> None:
    m = safeloss.SafeCrossEntropyLoss(z_loss=1e-4)
    m.z_loss = -1.0
    x, t, _ = make("index-ignore", torch.float32)
    with pytest.raises(safeloss.ExtrasError, match=r"^SafeCrossEntropyLoss: z_loss=-1\.0 must be"):
        m(x, t)
    lm = safeloss.SafeLinearCrossEntropyLoss(H, C, softcap=30.0)
    lm.temperature = 0.0
    with pytest.raises(safeloss.ExtrasError, match=r"^SafeLinearCrossEntropyLoss: temperature=0\.0"):
        lm(torch.randn(7, H), t)


def test_existing_checks_still_apply_on_the_extras_path() -> None:
    x, t, _ = make("index-ignore", torch.float32)
    with pytest.raises(safeloss.BatchSizeMismatchError, match="got 7 predictions but 3 targets"):
        safeloss.cross_entropy(x, t[:3], softcap=30.0)
    bad = t.clone()
    bad[0] = 1
    bad[1] = 9
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)1 of 7 targets is outside.*9 at \[1\]"):
        safeloss.cross_entropy(x, bad, z_loss=1e-4)
    bad[1] = -1  # beside positions at ignore_index=-100: the fix maps -1 to it (h13)
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)-1 at \[1\].*target\.masked_fill\(target == -1, -100\)"):
        safeloss.linear_cross_entropy(torch.randn(7, H), torch.randn(C, H), bad, z_loss=1e-4)
    alone = bad.masked_fill(bad == -100, 0)  # the hint names this API (linear_cross_entropy), as the plain op's does
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)-1 at \[1\].*linear_cross_entropy\(\.\.\., ignore_index=-1\)"):
        safeloss.linear_cross_entropy(torch.randn(7, H), torch.randn(C, H), alone, z_loss=1e-4)
    with pytest.raises(safeloss.ReductionError, match="reduction='avg' is not a valid reduction"):
        safeloss.cross_entropy(x, t, reduction="avg", softcap=30.0)
    with pytest.warns(safeloss.SafeLossWarning, match="squeezes the singleton dimension"):
        safeloss.cross_entropy(x, t.unsqueeze(1), softcap=30.0)


# ============================================================================ statistics


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_accuracy_semantics(backend: str) -> None:
    x = torch.tensor([[1.0, 3.0, 3.0], [5.0, 0.0, 5.0], [0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    # ties go to the lowest index, as torch.argmax: row 0 predicts 1, row 1 predicts 0
    _, st = safeloss.cross_entropy(x, torch.tensor([2, 0, 2, -100]), return_stats=True, backend=backend)
    assert st.accuracy.item() == pytest.approx(2 / 3)
    # a softcap saturates tanh in float32 (both 3e3 and 4e3 cap to 3.0): the raw logits decide
    big = torch.tensor([[3e3, 4e3, 0.0]])
    _, st = safeloss.cross_entropy(big, torch.tensor([1]), softcap=3.0, return_stats=True, backend=backend)
    assert st.accuracy.item() == 1.0
    _, st = safeloss.cross_entropy(x, torch.tensor([1, 2, 0, 0]), return_stats=True, backend=backend)
    assert st.accuracy.item() == pytest.approx(2 / 4)
    with pytest.warns(safeloss.SafeLossWarning, match="nothing to average"):
        loss, st = safeloss.cross_entropy(x, torch.full((4,), -100), return_stats=True, z_loss=1.0,
                                          backend=backend)
    assert math.isnan(st.accuracy.item()) and math.isnan(loss.item())
    _, st = safeloss.cross_entropy(x, x.softmax(1), return_stats=True, backend=backend)
    assert st.accuracy.shape == () and math.isnan(st.accuracy.item())  # no class labels: none counts
    if backend == "triton":
        return
    # the linear and parallel ops share the definition (the latter in the gloo test below)
    W = torch.eye(3)
    _, st = safeloss.linear_cross_entropy(x, W, torch.tensor([2, 0, 2, -100]), return_stats=True)
    assert st.accuracy.item() == pytest.approx(2 / 3)


def test_z_loss_mean_is_unweighted_and_zero_at_ignored_positions() -> None:
    x, t, kw = make("index-weight-smooth", torch.float64, 4)
    t[1] = -100
    w = kw["weight"].double()
    _, st = safeloss.cross_entropy(x, t, w, z_loss=0.5, reduction="none", return_stats=True)
    assert st.z_loss[1] == 0
    torch.testing.assert_close(st.z_loss.double(), torch.where(t != -100, 0.5 * st.lse.double() ** 2, 0.0))
    loss_mean, st_mean = safeloss.cross_entropy(x, t, w, z_loss=0.5, return_stats=True)
    valid = t != -100
    torch.testing.assert_close(st_mean.z_loss.double(), st.z_loss.double().sum() / valid.sum())
    ce = F.cross_entropy(x, t, w)
    torch.testing.assert_close(loss_mean, ce + 0.5 * (torch.logsumexp(x, 1)[valid] ** 2).mean())
    _, st0 = safeloss.cross_entropy(x, t, return_stats=True)
    assert torch.equal(st0.z_loss, torch.zeros(()))


def test_stats_carry_no_gradient_and_loss_keeps_it() -> None:
    x = torch.randn(4, 5, requires_grad=True)
    out, st = safeloss.cross_entropy(x, torch.tensor([0, 1, 2, 3]), softcap=5.0, return_stats=True)
    assert out.requires_grad
    assert not any(v.requires_grad for v in st if v is not None)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softcap_maps_infinite_logits_to_the_cap(backend: str) -> None:
    """z becomes softcap * tanh(z / softcap): +inf is the cap (no NaN/inf warning), -inf is -cap
    (a -inf mask before the cap no longer masks: mask after it, or use a finite large value)."""
    x = torch.tensor([[0.0, math.inf, 1.0], [-math.inf, 0.0, 1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", safeloss.SafeLossWarning)
        out = safeloss.cross_entropy(x, torch.tensor([1, 0]), softcap=2.0, reduction="none", backend=backend)
    zt = 2.0 * torch.tanh(torch.tensor([[0.0, 1e9, 1.0], [-1e9, 0.0, 1.0]]) / 2.0)
    torch.testing.assert_close(out, F.cross_entropy(zt, torch.tensor([1, 0]), reduction="none"))


# ============================================================================ findings


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_is_judged_on_the_scaled_logits_and_says_so(backend: str) -> None:
    x, t, _ = make("index-ignore", torch.float32)
    x[0, 1] = math.nan
    with pytest.warns(safeloss.SafeLossWarning, match=r"(?s)^\[softcap=30, temperature=0\.5: NaN/inf and "
                      r"overflow are judged on the capped, scaled logits.*the loss is NaN or infinite at 1 of 7"
                      r".*1 row with NaN"):
        safeloss.cross_entropy(x, t, softcap=30.0, temperature=0.5, backend=backend)
    with pytest.raises(safeloss.NonFiniteError, match="the loss is NaN or infinite at 1 of 7"):
        safeloss.cross_entropy(x, t, z_loss=1e-4, strict=True, backend=backend)
    # +inf is capped: finite after softcap, so nothing to report; without a cap it is a finding
    x[0, 1] = math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error", safeloss.SafeLossWarning)
        safeloss.cross_entropy(x, t, softcap=30.0, backend=backend)
    with pytest.raises(safeloss.NonFiniteError, match=r"(?s)at 1 of 7.*1 row with \+inf"):
        safeloss.cross_entropy(x, t, temperature=2.0, strict=True, backend=backend)
    if backend == "triton":
        return
    W = torch.randn(C, H)
    W[2, 0] = math.nan
    with pytest.warns(safeloss.SafeLossWarning, match=r"(?s)z_loss=0\.0001.*linear_weight holds NaN/inf \(1 class row: 2\)"):
        safeloss.linear_cross_entropy(torch.randn(7, H), W, t, z_loss=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softmaxed_input_is_detected_on_the_raw_logits(backend: str) -> None:
    """temperature=0.5 doubles the logits: their rows sum to 2, but the raw ones still sum to 1."""
    x, t, _ = make("index-ignore", torch.float32)
    with pytest.warns(safeloss.SafeLossWarning, match="looks already softmaxed"):
        safeloss.cross_entropy(x.softmax(1), t, temperature=0.5, backend=backend)
    with pytest.raises(safeloss.InputError, match="looks already softmaxed"):
        safeloss.cross_entropy(x.softmax(1), t, softcap=30.0, strict=True, backend=backend)
    # the raw logits sum to 2 here, the scaled ones to 1: not a softmax output
    with warnings.catch_warnings():
        warnings.simplefilter("error", safeloss.SafeLossWarning)
        safeloss.cross_entropy(x.softmax(1) * 2, t, temperature=2.0, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp16_overflow_of_a_position_and_of_a_sum(backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, C, generator=g) * 100).half()
    t = torch.randint(0, C, (4,), generator=g)
    # a tiny temperature scales the logits 1000x: positions beyond 65504 are inf in float16
    with pytest.warns(safeloss.SafeLossWarning, match="the float16 loss overflowed at"):
        out = safeloss.cross_entropy(x, t, temperature=1e-3, reduction="none", backend=backend)
    assert torch.isinf(out).any()
    # the z-loss term alone can overflow a position: 0.1 * lse^2 with lse near 1000
    with pytest.warns(safeloss.SafeLossWarning, match="the float16 loss overflowed at"):
        out = safeloss.cross_entropy(x * 10, t, z_loss=0.1, reduction="none", backend=backend)
    # a softcap bounds each position (2 * 30 + ln 5 here), not their sum
    xs = torch.randn(4000, C, generator=g).half() * 1000
    ts = torch.randint(0, C, (4000,), generator=g)
    with pytest.warns(safeloss.SafeLossWarning, match=r'reduction="sum" overflowed float16'):
        out = safeloss.cross_entropy(xs, ts, softcap=30.0, reduction="sum", backend=backend)
    assert out.isinf()


@settings(max_examples=40, deadline=None)
@given(cap=st.floats(0.01, 1e4), temp=st.floats(1e-3, 1e3), zl=st.floats(0, 10), c=st.integers(1, 50),
       eps=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**16))
def test_loss_bound_holds(cap: float, temp: float, zl: float, c: int, eps: float, seed: int) -> None:
    """The bound that lets a softcap skip the per-position overflow count is a true bound."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, c, generator=g, dtype=torch.float64) * 1e6
    x[0] = math.inf
    t = torch.randint(0, c, (16,), generator=g)
    ex = X.Extras(cap, temp, zl)
    out, _ = reference(x, t, reduction="none", eps=eps, softcap=cap, temperature=temp, z_loss=zl)
    assert float(out.max()) <= X.loss_bound(ex, c, False, False) * (1 + 1e-9)
    assert X.loss_bound(ex, c, True, False) == math.inf and X.loss_bound(ex, c, False, True) == math.inf


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deferred_findings_carry_the_note(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """CUDA default mode, simulated on the CPU: reported at the next call or check_pending()."""
    monkeypatch.setattr(checks, "DEFER_ON_CPU", True)
    x, t, _ = make("index-ignore", torch.float32)
    x[3, 0] = math.nan
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        safeloss.cross_entropy(x, t, softcap=30.0, backend=backend)
        assert not [w for w in rec if issubclass(w.category, safeloss.SafeLossWarning)]
        safeloss.check_pending()
    msgs = [str(w.message) for w in rec if issubclass(w.category, safeloss.SafeLossWarning)]
    assert len(msgs) == 1 and "found by an earlier call" in msgs[0] and "[softcap=30:" in msgs[0]
    bad = t.clone()
    bad[4] = 11
    out = safeloss.cross_entropy(x, bad, z_loss=1e-4, reduction="none", backend=backend)
    assert math.isnan(out[4].item())  # masked, NaN until reported
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"11 at \[4\]"):
        safeloss.check_pending()


# ============================================================================ settings


@pytest.mark.parametrize("case", ["index-stats"])
def test_compile_fullgraph(case: str) -> None:
    torch._dynamo.reset()
    kind = {"index-stats": "index-weight-smooth", "prob-stats": "prob-smooth"}[case]
    x, t, kw = make(kind, torch.float32, 9)
    ex = OPTIONS["all"]

    def step(x: torch.Tensor, t: torch.Tensor) -> Any:
        return safeloss.cross_entropy(x, t, reduction="none" if case == "prob-stats" else "mean", **kw, **ex)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = compiled(xc, t), step(xe, t)
    if isinstance(got, tuple):
        for a, b in zip(got[1], want[1]):
            assert (a is None and b is None) or torch.equal(a, b)
        got, want = got[0], want[0]
    torch.testing.assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)


SCHEDULES = {
    "temperature": lambda v: dict(temperature=v),
    "softcap": lambda v: dict(softcap=30.0 * v),
    "z_loss": lambda v: dict(z_loss=v / 100, return_stats=True),
}


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy", "module"])
@pytest.mark.parametrize("extra", list(SCHEDULES))
def test_compile_fullgraph_follows_an_extra_that_changes_value(op: str, extra: str) -> None:
    """Class: an extra whose value changes between compiled calls (a temperature schedule, a
    z-loss warm-up, a module attribute set after compiling) compiles as stock's float arguments
    do: Dynamo makes the float dynamic at its second value, and the argument checks must trace
    on it (``math.isfinite`` broke the graph); every value gives the eager result."""
    torch._dynamo.reset()
    x, t, _ = make("index-ignore", torch.float32, 4)
    h, W = torch.randn(7, H), torch.randn(C, H)
    m = safeloss.SafeCrossEntropyLoss()

    def step(v: float) -> Any:
        ex = SCHEDULES[extra](v)
        if op == "cross_entropy":
            return safeloss.cross_entropy(x, t, **ex)
        if op == "linear_cross_entropy":
            return safeloss.linear_cross_entropy(h, W, t, **ex)
        for k, val in ex.items():
            setattr(m, k, val)
        return m(x, t)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for v in (0.5, 0.7, 0.9):
        got, want = compiled(v), step(v)
        got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
        torch.testing.assert_close(got, want, msg=lambda msg, v=v: f"value {v}: {msg}")


@needs_triton
def test_triton_compile_fullgraph(launches: dict[str, int]) -> None:
    """torch.compile sees the kernels' custom ops (no graph break); same values, gradients and
    statistics as the eager kernel path, and a bad label is still reported by the graph."""
    torch._dynamo.reset()
    x, t, kw = make("index-weight-smooth", torch.float32, 9)
    x, t, w = x.to(DEV), t.to(DEV), kw["weight"].to(DEV)
    ex = OPTIONS["all"]

    def step(x: torch.Tensor, t: torch.Tensor) -> Any:
        return safeloss.cross_entropy(x, t, w, label_smoothing=0.1, backend="triton", **ex)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    (got, gs), (want, ws) = compiled(xc, t), step(xe, t)
    for a, b in zip(gs, ws):
        assert torch.equal(a, b)
    torch.testing.assert_close(got, want)
    (got * 1.3).backward()
    (want * 1.3).backward()
    torch.testing.assert_close(xc.grad, xe.grad)
    assert launches["fwd"] == 2 and launches["bwd"] == 2  # the custom ops run the same launchers
    if DEV.type == "cpu":
        bad = t.clone()
        bad[0] = 8
        with pytest.raises(safeloss.TargetOutOfRangeError, match=r"8 at \[0\]"):
            compiled(x, bad)


@needs_triton
def test_triton_settings_the_kernels_cannot_take() -> None:
    """Double backward differentiates the formulas (as torch ops), torch.func runs torch ops under
    backend="auto" and refuses backend="triton" (as the plain op), fake tensors take the custom
    op's fake implementation, make_fx records the custom ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import grad
    from torch.fx.experimental.proxy_tensor import make_fx

    x, t, _ = make("index-ignore", torch.float32, 6)
    x, t = x.to(DEV), t.to(DEV)
    ex = dict(softcap=3.0, temperature=0.8, z_loss=0.1)
    for prob in (False, True):
        tt = x.softmax(1).detach() if prob else t
        xa = x.clone().requires_grad_()
        xb = x.detach().cpu().double().requires_grad_()
        (ga,) = torch.autograd.grad(safeloss.cross_entropy(xa, tt, label_smoothing=0.1, backend="triton", **ex),
                                    xa, create_graph=True)
        (gb,) = torch.autograd.grad(reference(xb, tt.cpu() if prob else t.cpu(), eps=0.1, **ex)[0], xb,
                                    create_graph=True)
        close(ga.cpu(), gb, torch.float32, "first derivative")
        close(torch.autograd.grad(ga.square().sum(), xa)[0].cpu(),
              torch.autograd.grad(gb.square().sum(), xb)[0], torch.float32, "double backward")
    with pytest.raises(safeloss.BackendError, match=r"cannot run inside torch\.func"):
        grad(lambda v: safeloss.cross_entropy(v, t, backend="triton", **ex))(x)
    gx = grad(lambda v: safeloss.cross_entropy(v, t, **ex))(x)  # auto: torch ops there
    xr = x.detach().cpu().double().requires_grad_()
    close(gx.cpu(), torch.autograd.grad(reference(xr, t.cpu(), **ex)[0], xr)[0], torch.float32, "torch.func")
    with FakeTensorMode():
        out, st = safeloss.cross_entropy(torch.empty(4, C, device=DEV), torch.zeros(4, dtype=torch.long, device=DEV),
                                         backend="triton", reduction="none", return_stats=True, **ex)
    assert out.shape == (4,) and st.entropy.shape == (4,) and st.accuracy.shape == ()
    gm = make_fx(lambda a, b: safeloss.cross_entropy(a, b, backend="triton", **ex))(x, t)
    assert "triton_cex_fwd" in gm.code


def test_compile_fullgraph_reports_a_bad_label_and_linear_compiles() -> None:
    torch._dynamo.reset()
    x, t, _ = make("index-ignore", torch.float32)
    t[0] = 8
    f = torch.compile(lambda a, b: safeloss.cross_entropy(a, b, softcap=30.0), fullgraph=True,
                      backend="aot_eager")
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"8 at \[0\]"):
        f(x, t)
    d = make_linear("index-ignore-bias", torch.float32, 3)
    lf = torch.compile(lambda a, w: safeloss.linear_cross_entropy(
        a, w, d["t"], linear_bias=d["b"], z_loss=1e-2, softcap=3.0, return_stats=True),
        fullgraph=True, backend="aot_eager")
    xc = d["x"].clone().requires_grad_()
    out, st = lf(xc, d["W"])
    out.backward()
    xe = d["x"].clone().requires_grad_()
    ref, rs = safeloss.linear_cross_entropy(xe, d["W"], d["t"], linear_bias=d["b"], z_loss=1e-2,
                                            softcap=3.0, return_stats=True)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(st.accuracy, rs.accuracy)


def test_torch_func_and_fx() -> None:
    from torch.func import grad, vmap

    x, t, _ = make("index-ignore", torch.float64, 6)
    ex = dict(softcap=3.0, temperature=0.8, z_loss=0.1)
    gx = grad(lambda v: safeloss.cross_entropy(v, t, **ex))(x)
    xr = x.clone().requires_grad_()
    ref, _ = reference(xr, t, **ex)
    (gr,) = torch.autograd.grad(ref, xr)
    close(gx, gr, torch.float64, "torch.func.grad")
    per = vmap(lambda v, y: safeloss.cross_entropy(v, y, **ex))(x.unsqueeze(1), t.clamp(min=0).unsqueeze(1))
    close(per, reference(x, t.clamp(min=0), reduction="none", **ex)[0], torch.float64, "vmap")

    # forward-mode AD (jvp) and double backward (a gradient penalty), against the reference
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, tangent = torch.func.jvp(lambda u: safeloss.cross_entropy(u, t, **ex), (x,), (v,))
    close(tangent, (gr * v).sum(), torch.float64, "jvp")
    for prob in (False, True):
        tt = x.softmax(1).detach() if prob else t
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        (ga,) = torch.autograd.grad(safeloss.cross_entropy(xa, tt, label_smoothing=0.1, **ex), xa,
                                    create_graph=True)
        (gb,) = torch.autograd.grad(reference(xb, tt, eps=0.1, **ex)[0], xb, create_graph=True)
        close(torch.autograd.grad(ga.square().sum(), xa)[0], torch.autograd.grad(gb.square().sum(), xb)[0],
              torch.float64, "double backward")

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.loss = safeloss.SafeCrossEntropyLoss(**ex)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.loss(a, b) + safeloss.cross_entropy(a, b, **ex)

    gm = torch.fx.symbolic_trace(M())
    close(gm(x, t), 2 * ref.detach(), torch.float64, "fx")


def test_module_pickles_and_old_instances_run() -> None:
    m = safeloss.SafeCrossEntropyLoss(softcap=30.0, return_stats=True)
    m2 = pickle.loads(pickle.dumps(m))
    assert m2.softcap == 30.0 and m2.return_stats is True
    old = copy.deepcopy(safeloss.SafeCrossEntropyLoss())
    for name in ("softcap", "temperature", "z_loss", "return_stats"):
        del old.__dict__[name]  # as unpickled from before these options existed
    x, t, _ = make("index-ignore", torch.float32)
    assert torch.equal(old(x, t), F.cross_entropy(x, t))
    st = safeloss.cross_entropy(x, t, return_stats=True)[1]
    assert pickle.loads(pickle.dumps(st)).lse.shape == (7,) and repr(st).startswith("LossStats(")


def test_torchscript_refuses_extras_instead_of_dropping_them() -> None:
    """Scripted code compiles stock torch's loss: a module with extras raises there (and one
    without them still scripts)."""
    x, t, _ = make("index-ignore", torch.float32)
    plain = torch.jit.script(safeloss.SafeCrossEntropyLoss())
    torch.testing.assert_close(plain(x, t), F.cross_entropy(x, t))
    scripted = torch.jit.script(safeloss.SafeCrossEntropyLoss(z_loss=1e-4))
    with pytest.raises(torch.jit.Error, match="cannot run in TorchScript"):
        scripted(x, t)


def test_meta_and_fake_tensors() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    out, st = safeloss.cross_entropy(torch.empty(4, C, device="meta"), torch.zeros(4, dtype=torch.long, device="meta"),
                                     z_loss=1e-4, reduction="none", return_stats=True)
    assert out.device.type == "meta" and out.shape == (4,) and st.lse.shape == (4,)
    with FakeTensorMode():
        out = safeloss.linear_cross_entropy(torch.randn(6, H), torch.randn(C, H), torch.randint(0, C, (6,)),
                                            softcap=30.0)
    assert out.shape == ()


# ============================================================================ vocab-parallel (gloo)

SLICES = [2, 3]  # C = 5 over 2 ranks
PCASES = [
    dict(name="mean-weight-smooth", red="mean", weight=True, eps=0.1, ex=OPTIONS["all"]),
    dict(name="none-kdim", red="none", weight=False, eps=0.0, ex=dict(softcap=2.0, z_loss=0.1, return_stats=True), kdim=True),
    dict(name="sum-temperature", red="sum", weight=False, eps=0.2, ex=dict(temperature=0.5, return_stats=True)),
    dict(name="mean-zloss-only", red="mean", weight=True, eps=0.0, ex=dict(z_loss=0.3)),
    dict(name="tie-across-shards", red="mean", weight=False, eps=0.0, ex=dict(return_stats=True), tie=True),
    # torch.argmax's answer with NaN and +inf across the shards (a NaN wins; the lowest column)
    dict(name="nan-argmax", red="none", weight=False, eps=0.0, ex=dict(return_stats=True), nan=True),
]
# The same through the Triton statistics kernel (the interpreter here): the extras and the
# statistics inside its one pass over the slice (float32 logits: its accumulation is fp32).
PCASES += [dict(c, name=f"{c['name']}-triton", backend="triton", dtype=torch.float32)
           for c in PCASES if c["name"] != "mean-zloss-only"]


def _pinputs(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(len(case["name"]))
    if case.get("kdim"):
        x = torch.randn(3, C, 2, generator=g, dtype=torch.float64) * 3
        t = torch.randint(0, C, (3, 2), generator=g)
        t[0, 1] = -100
    else:
        x = torch.randn(6, C, generator=g, dtype=torch.float64) * 3
        t = torch.randint(0, C, (6,), generator=g)
        t[4] = -100
    if case.get("tie"):  # the maximum on both ranks: the lowest index (rank 0's) wins
        x[0, 1] = x[0, 3] = x[1, 1] = x[1, 3] = 50.0
        t[0], t[1] = 1, 3
    if case.get("nan"):  # SLICES: columns 0-1 on rank 0, 2-4 on rank 1
        x[0, 3], t[0] = math.nan, 3  # a NaN wins: right
        x[1, 0], x[1, 4], t[1] = math.inf, math.nan, 4  # a NaN beats +inf on a lower rank: right
        x[2, 1], x[2, 2], t[2] = math.nan, math.nan, 2  # the first NaN wins: wrong
        x[3, 0], x[3, 2], t[3] = math.inf, math.inf, 0  # +inf on both ranks: the lowest column, right
        x[5, 2], x[5, 3], t[5] = math.inf, math.inf, 3  # two +inf on one rank: wrong
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.3 if case["weight"] else None
    return x.to(case.get("dtype", torch.float64)), t, w


def _local(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x.narrow(1, sum(SLICES[:rank]), SLICES[rank])


def _pworker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor.debug import CommDebugMode

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    res: dict[str, Any] = {}

    def call(name: str, fn: Any) -> None:
        safeloss.reset_warnings()
        try:
            res[name] = {"ok": fn()}
        except Exception as e:
            res[name] = {"error": type(e).__name__, "message": str(e)}

    def case_fn(case: dict) -> Any:
        x, t, w = _pinputs(case)
        xl = _local(x, rank).clone().requires_grad_()
        with CommDebugMode() as comm:
            r = safeloss.vocab_parallel_cross_entropy(xl, t, w, reduction=case["red"], label_smoothing=case["eps"],
                                                      backend=case.get("backend", "auto"), **case["ex"])
        out, stats = r if case["ex"].get("return_stats") else (r, None)
        g = upstream(out)
        (out * g).sum().backward()
        return dict(out=out.detach(), grad=xl.grad, stats=stats, comms=comm.get_total_counts())

    try:
        for case in PCASES:
            call(case["name"], lambda case=case: case_fn(case))

        def defaults() -> Any:
            x, t, w = _pinputs(PCASES[0])
            a = safeloss.vocab_parallel_cross_entropy(_local(x, rank), t, w, **DEFAULTS)
            b = safeloss.parallel.vocab.vocab_parallel_cross_entropy(_local(x, rank), t, w)
            return type(a).__name__, torch.equal(a, b)

        call("defaults", defaults)
        x, t, _ = _pinputs(PCASES[0])
        call("bad-softcap-one-rank", lambda: safeloss.vocab_parallel_cross_entropy(
            _local(x, rank), t, softcap=0.0 if rank == 1 else 30.0))
        tf = t.to(torch.float64)
        if rank == 1:
            tf[1] = 2.5  # a label value only this rank's check fails: it idles through the loss's rounds
        call("bad-value-one-rank-stats", lambda: safeloss.vocab_parallel_cross_entropy(
            _local(x, rank), tf, return_stats=True, z_loss=1e-3, label_smoothing=0.1))
        call("extras-differ", lambda: safeloss.vocab_parallel_cross_entropy(
            _local(x, rank), t, z_loss=1e-4 * (rank + 1)))
        xn = x.clone()
        xn[2, 4] = math.nan
        call("nan-strict", lambda: safeloss.vocab_parallel_cross_entropy(
            _local(xn, rank), t, softcap=30.0, strict=True))

        def dtensor_case() -> Any:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import Shard, distribute_tensor
            from torch.distributed.tensor.parallel import loss_parallel

            mesh = init_device_mesh("cpu", (world,))
            x6 = torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            t6 = torch.tensor([0, 5, 2, -100, 4, 1])
            dx = distribute_tensor(x6, mesh, [Shard(1)]).requires_grad_()
            with loss_parallel():
                out, st = safeloss.cross_entropy(dx, t6, softcap=3.0, z_loss=0.1, return_stats=True)
                out.backward()
            return dict(type=type(out).__name__, out=out.to_local().detach(), grad=dx.grad.full_tensor(),
                        lse=st.lse.to_local(), accuracy=st.accuracy.to_local())

        call("dtensor", dtensor_case)

        def dtensor_rows_case() -> Any:
            # rows sharded, classes whole on each rank (no loss_parallel): the same engine, no split
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import Shard, distribute_tensor

            mesh = init_device_mesh("cpu", (world,))
            x6 = torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            t6 = torch.tensor([0, 5, 2, -100, 4, 1])
            dx = distribute_tensor(x6, mesh, [Shard(0)]).requires_grad_()
            dt = distribute_tensor(t6, mesh, [Shard(0)])
            out, st = safeloss.cross_entropy(dx, dt, softcap=3.0, z_loss=0.1, return_stats=True)
            out.backward()
            return dict(out=out.full_tensor().detach(), grad=dx.grad.full_tensor(),
                        lse=st.lse.full_tensor(), accuracy=st.accuracy.full_tensor())

        call("dtensor-rows", dtensor_rows_case)

        def dtensor_prob_case() -> Any:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import Shard, distribute_tensor

            mesh = init_device_mesh("cpu", (world,))
            x6 = torch.randn(6, 6, generator=torch.Generator().manual_seed(3))
            q = torch.softmax(torch.randn(6, 6, generator=torch.Generator().manual_seed(4)), 1)
            return safeloss.cross_entropy(distribute_tensor(x6, mesh, [Shard(0)]),
                                          distribute_tensor(q, mesh, [Shard(0)]), z_loss=0.1)

        call("dtensor-prob", dtensor_prob_case)
        dist.barrier()
    finally:
        torch.save(res, f"{out}.{rank}")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("extras-tp")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.start_processes(_pworker, args=(2, str(tmp / "store"), str(tmp / "out")), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("vocab-parallel workers did not finish in 120 s")
    return [torch.load(tmp / f"out.{r}", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("case", PCASES, ids=[c["name"] for c in PCASES])
def test_parallel_matches_reference_on_gathered_logits(ranks: list[dict], case: dict) -> None:
    x, t, w = _pinputs(case)
    dtype = x.dtype
    xr = x.double().requires_grad_()
    ex = {k: v for k, v in case["ex"].items() if k != "return_stats"}
    ref, rs = reference(xr, t, w, reduction=case["red"], eps=case["eps"], **ex)
    (ref * upstream(ref)).sum().backward()
    for rank, r in enumerate(ranks):
        got = r[case["name"]]
        assert "ok" in got, got
        got = got["ok"]
        close(got["out"], ref.detach(), dtype, f"loss, rank {rank}")
        close(got["grad"], _local(xr.grad, rank), dtype, f"grad, rank {rank}")
        # the same three all-reduces as without extras, statistics or not
        assert got["comms"] == 3, got["comms"]
        if case["ex"].get("return_stats"):
            pos = tuple(t.shape)
            check_stats(got["stats"], rs, got["out"], pos)
    if case["ex"].get("return_stats"):
        a, b = ranks[0][case["name"]]["ok"]["stats"], ranks[1][case["name"]]["ok"]["stats"]
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True)  # every rank alike, bit for bit
    if case.get("tie"):
        assert ranks[0][case["name"]]["ok"]["stats"].accuracy.item() == pytest.approx(1 / 5)
    if case.get("nan"):  # rows 0, 1, 3 of the five counted
        assert rs["accuracy"].item() == pytest.approx(3 / 5)


def test_parallel_defaults_errors_and_dtensor(ranks: list[dict]) -> None:
    for r in ranks:
        assert r["defaults"]["ok"] == ("Tensor", True)
    got = [r["bad-softcap-one-rank"] for r in ranks]
    for g in got:
        assert g.get("error") == "ExtrasError", g
        assert "softcap=0.0 is not a positive, finite number" in g["message"]
        assert "raised on rank 1 of the 2 ranks" in g["message"]
    errs = [r["bad-value-one-rank-stats"] for r in ranks]
    assert all("error" in g for g in errs), errs  # both ranks raise, neither hangs in a collective
    assert errs[0] == errs[1], errs
    assert "raised on rank 1 of the 2 ranks" in errs[0]["message"], errs
    for r in ranks:
        g = r["extras-differ"]
        assert g.get("error") == "ParallelMismatchError" and "different extras" in g["message"], g
        g = r["nan-strict"]
        assert g.get("error") == "NonFiniteError" and "[softcap=30:" in g["message"], g
    x6 = torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64).requires_grad_()
    t6 = torch.tensor([0, 5, 2, -100, 4, 1])
    ref, rs = reference(x6, t6, softcap=3.0, z_loss=0.1)
    ref.backward()
    for r in ranks:
        g = r["dtensor"]
        assert "ok" in g, g
        g = g["ok"]
        assert g["type"] == "DTensor"
        close(g["out"], ref.detach(), torch.float64, "DTensor loss")
        close(g["grad"], x6.grad, torch.float64, "DTensor grad")
        close(g["lse"], rs["lse"], torch.float32, "DTensor lse")
        close(g["accuracy"], rs["accuracy"], torch.float32, "DTensor accuracy")
        g = r["dtensor-prob"]
        assert g.get("error") == "BackendError", g
        assert "z_loss=0.1 got DTensor logits with probability targets" in g["message"], g
        assert "raised on rank" not in g["message"], g  # every rank raised it: no rank is named
        g = r["dtensor-rows"]
        assert "ok" in g, g
        g = g["ok"]
        close(g["out"], ref.detach(), torch.float64, "row-sharded DTensor loss")
        close(g["grad"], x6.grad, torch.float64, "row-sharded DTensor grad")
        close(g["lse"], rs["lse"], torch.float32, "row-sharded DTensor lse")
        close(g["accuracy"], rs["accuracy"], torch.float32, "row-sharded DTensor accuracy")


# ============================================================================ docs


def test_readme_examples_run(capsys: pytest.CaptureFixture[str]) -> None:
    """Every python block of the README's "LLM and RL extras" section runs as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## LLM and RL extras", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "z-loss" in out and "mean entropy" in out


# Issue 19 (a), every op: a mean with nothing to average is NaN with that diagnosis.
ZERO_WEIGHT_EXTRAS = {"none": {}, "z_loss": {"z_loss": 1e-3}, "softcap": {"softcap": 30.0},
                      "temperature": {"temperature": 2.0}, "return_stats": {"return_stats": True}}


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("extra", ZERO_WEIGHT_EXTRAS)
@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_zero_total_weight_mean_is_nan_with_the_true_diagnosis(
        op: str, extra: str, dtype: torch.dtype, eps: float, strict: bool) -> None:
    """Every non-ignored target has class weight 0: stock's mean is 0/0 = NaN, label smoothing or
    not (its label and smoothing terms are divided by the total weight separately). Was: inf and
    "overflowed float32" with smoothing on the extras path and in linear_cross_entropy."""
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(6, 5, generator=gen).to(dtype)
    W = torch.randn(7, 5, generator=gen).to(dtype)
    t = torch.randint(0, 7, (6,), generator=gen)
    t[::3] = -100
    w = (torch.rand(7, generator=gen) + 0.1).to(dtype)
    w[t[t >= 0]] = 0
    assert math.isnan(F.cross_entropy((h @ W.T).double(), t, w.double(), label_smoothing=eps).item())
    kw = dict(label_smoothing=eps, strict=strict, **ZERO_WEIGHT_EXTRAS[extra])

    def call() -> torch.Tensor:
        if op == "cross_entropy":
            return safeloss.cross_entropy(h @ W.T, t, w, **kw)
        return safeloss.linear_cross_entropy(h, W, t, weight=w, **kw)

    if strict:
        with pytest.raises(safeloss.EmptyBatchError, match="nothing to average"):
            call()
        return
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = call()
    out = out[0] if isinstance(out, tuple) else out
    assert math.isnan(out.item()), out
    texts = [str(r.message) for r in rec if issubclass(r.category, safeloss.SafeLossWarning)]
    assert len(texts) == 1 and "nothing to average" in texts[0] and "overflowed" not in texts[0], texts


# 4 ranks, the first slice empty: the statistics (lse, entropy, argmax, z-loss) equal single-device
# safeloss's on NaN, +-inf, all -inf rows and ties across ranks, on both backends.
SLICES4 = [0, 3, 2, 4]


def _inputs4() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    c = sum(SLICES4)
    x = torch.randn(10, c, generator=g) * 3
    t = torch.randint(0, c, (10,), generator=g)
    x[0], t[0] = -math.inf, 0  # all -inf: torch.argmax says 0 (rank 1's first column), right
    x[1], t[1] = -math.inf, 5  # wrong
    x[2, 4] = x[2, 7] = 40.0
    t[2] = 4  # a tie across ranks 1 and 2: the lower column wins, right
    x[3, 6], t[3] = math.nan, 6  # a NaN wins, right
    x[4, 3], x[4, 8], t[4] = math.inf, math.nan, 8  # a NaN beats +inf on a lower rank, right
    t[5] = -100
    x[6, 3:5] = 50.0
    t[6] = 3  # a tie inside a slice, right
    return x, t


def _worker4(rank: int, world: int, store: str, outp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    x, t = _inputs4()
    off = sum(SLICES4[:rank])
    res: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for backend in ("torch", "triton") if _TRITON_REASON is None else ("torch",):
            for name, ex in (("stats", dict(return_stats=True)),
                             ("all", dict(return_stats=True, softcap=3.0, temperature=0.5, z_loss=0.1))):
                xl = x[:, off:off + SLICES4[rank]].clone()
                try:
                    res[f"{backend}-{name}"] = safeloss.vocab_parallel_cross_entropy(
                        xl, t, reduction="none", backend=backend, **ex)
                except Exception as e:  # reported by the test
                    res[f"{backend}-{name}"] = repr(e)
    torch.save(res, f"{outp}.{rank}")
    dist.destroy_process_group()


def test_parallel_statistics_with_an_empty_slice_match_single_device(tmp_path: Any) -> None:
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(_worker4, args=(len(SLICES4), str(tmp_path / "store"), str(tmp_path / "out")),
                       nprocs=len(SLICES4), join=True, start_method="spawn")
    x, t = _inputs4()
    got = [torch.load(tmp_path / f"out.{r}", weights_only=False) for r in range(len(SLICES4))]
    for key in got[0]:
        ex = dict(return_stats=True) if key.endswith("-stats") else dict(return_stats=True, softcap=3.0,
                                                                          temperature=0.5, z_loss=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want, wst = safeloss.cross_entropy(x, t, reduction="none", **ex)
        assert wst.accuracy.item() == pytest.approx(5 / 9)  # rows 0, 2, 3, 4, 6 of the nine counted
        for rank, r in enumerate(got):
            assert not isinstance(r[key], str), (key, rank, r[key])
            out, st = r[key]
            close(out, want, torch.float32, f"{key} loss, rank {rank}")
            for name in ("lse", "entropy", "z_loss", "accuracy"):
                close(getattr(st, name), getattr(wst, name), torch.float32, f"{key} {name}, rank {rank}")


# ============================================================================ hostile-pass classes

NO_Z_LOSS = {
    "temperature": dict(temperature=0.7),
    "softcap": dict(softcap=2.0),
    "stats": dict(return_stats=True),
    "softcap-temperature-stats": dict(softcap=3.0, temperature=1.3, return_stats=True),
    "with-z-loss": dict(softcap=3.0, z_loss=0.05),
}


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("option", list(NO_Z_LOSS))
def test_double_backward_with_and_without_a_z_loss_term(op: str, option: str) -> None:
    """Class: second derivatives on the extras path (a gradient penalty, Hessian-vector
    products) whatever the options: without a z-loss its rows are constant zeros, which the
    double backward must leave out, not differentiate (it raised)."""
    ex = NO_Z_LOSS[option]
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 1, -100, 3])
    x0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    W0 = torch.randn(C, 3, generator=g, dtype=torch.float64)

    def penalty(loss_of: Any, leaf: torch.Tensor) -> torch.Tensor:
        v = leaf.clone().requires_grad_()
        out = loss_of(v)
        (gv,) = torch.autograd.grad(out[0] if isinstance(out, tuple) else out, v, create_graph=True)
        (ggv,) = torch.autograd.grad(gv.square().sum(), v)
        return ggv

    ref_ex = {k: v for k, v in ex.items() if k != "return_stats"}
    if op == "cross_entropy":
        z0 = x0 @ W0.T
        got = penalty(lambda z: safeloss.cross_entropy(z, t, **ex), z0)
        want = penalty(lambda z: reference(z, t, **ref_ex)[0], z0)
    else:
        got = penalty(lambda x: safeloss.linear_cross_entropy(x, W0, t, **ex), x0)
        want = penalty(lambda x: reference(x @ W0.T, t, **ref_ex)[0], x0)
    close(got, want, torch.float64, f"{op} {option}")


# Accepted scales at the edges of float32 (see core.extras._check_float32_range): finite
# values and gradients, the reference's, on both backends.
EDGE_SCALES = [dict(softcap=1e-19), dict(softcap=1e30), dict(temperature=1e37), dict(temperature=1e-3),
               dict(softcap=1e19, temperature=100.0)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("ex", EDGE_SCALES, ids=lambda e: ",".join(f"{k}={v:g}" for k, v in e.items()))
def test_accepted_scales_at_the_edge_of_float32_compute(backend: str, ex: dict) -> None:
    """Class: a softcap / temperature the argument check accepts computes in float32 on every
    backend: forward and backward finite and equal to the float64 reference (the torch path's
    gradient factor temperature/softcap**2 overflowed, Triton's 1/temperature underflowed)."""
    x, t, _ = make("index-ignore", torch.float32)
    z = x.clone().requires_grad_()
    loss = safeloss.cross_entropy(z, t, backend=backend, **ex)
    (gz,) = torch.autograd.grad(loss, z, torch.tensor(1.7))
    zr = x.double().requires_grad_()
    ref, _ = reference(zr, t, **ex)
    (gr,) = torch.autograd.grad(ref, zr, torch.tensor(1.7, dtype=torch.float64))
    assert loss.isfinite() and gz.isfinite().all(), (loss, gz)
    close(loss, ref, torch.float32, "loss")
    close(gz, gr, torch.float32, "gradient")


NAN_IN_IGNORED = {"softcap": dict(softcap=3.0), "temperature": dict(temperature=2.0),
                  "z_loss": dict(z_loss=0.1), "softcap-stats": dict(softcap=3.0, return_stats=True)}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("option", list(NAN_IN_IGNORED))
@pytest.mark.parametrize("entry", ["cross_entropy", "vocab_parallel"])
def test_an_ignored_row_with_a_nan_logit_gets_exactly_zero_gradient(
        monkeypatch: pytest.MonkeyPatch, entry: str, option: str, backend: str) -> None:
    """Class: the loss never reads an ignored row, so its gradient is exactly 0 even where its
    logits hold NaN (padding positions of a sequence), with every extra and on every backend and
    op alike (the softcap's chain rule multiplied that 0 by NaN on the torch paths); the
    counted rows keep the reference's gradient."""
    ex = NAN_IN_IGNORED[option]
    x, t, _ = make("index-ignore", torch.float32)  # rows 2 and 5 ignored
    x[2, 1] = math.nan
    z = x.clone().requires_grad_()
    if entry == "cross_entropy":
        out = safeloss.cross_entropy(z, t, backend=backend, **ex)
    else:
        from safeloss.parallel import vocab

        monkeypatch.setattr(vocab.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(vocab.dist, "get_rank", lambda group=None: 0)
        monkeypatch.setattr(vocab.dist, "get_world_size", lambda group=None: 1)
        monkeypatch.setattr(vocab, "_all_reduce", lambda v, op, group: v)
        ex4 = (ex.get("softcap"), ex.get("temperature", 1.0), ex.get("z_loss", 0.0), ex.get("return_stats", False))
        out = vocab.run(z, t, None, -100, "mean", 0.0, strict=None, backend=backend, owner=None,
                        sharding=vocab.Sharding(object()), extras=ex4)
    loss = out[0] if isinstance(out, tuple) else out
    (gz,) = torch.autograd.grad(loss, z, torch.tensor(1.7))
    assert torch.equal(gz[2], torch.zeros(C)), gz[2]
    keep = [0, 1, 3, 4, 6]
    zr = x.double()[keep].requires_grad_()
    ref_ex = {k: v for k, v in ex.items() if k != "return_stats"}
    ref, _ = reference(zr, t[keep], **ref_ex)
    (gr,) = torch.autograd.grad(ref, zr, torch.tensor(1.7, dtype=torch.float64))
    close(gz[keep], gr, torch.float32, "counted rows")


@pytest.mark.parametrize("how", ["autocast", "half-inputs"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("option", ["stats", "softcap-1e9"])
def test_linear_extras_round_half_precision_logits_as_stock(how: str, dtype: torch.dtype, option: str) -> None:
    """Class: a half-precision head on the CPU (autocast or half tensors) gives stock's logits,
    rounded to the half dtype, with or without extras: an extra that leaves the loss unchanged
    (statistics, a cap far above the logits) leaves the number unchanged (the CPU extras path
    kept float32 logits: 4e-5 relative off at (256, 64) x (1000, 64))."""
    g = torch.Generator().manual_seed(0)
    N, Hd, V = 64, 32, 300
    x = torch.randn(N, Hd, generator=g)
    W = torch.randn(V, Hd, generator=g) * 0.3
    t = torch.randint(0, V, (N,), generator=g)
    ex = dict(return_stats=True) if option == "stats" else dict(softcap=1e9)
    if how == "half-inputs":
        x, W = x.to(dtype), W.to(dtype)
    with torch.autocast("cpu", dtype=dtype, enabled=how == "autocast"):
        plain = safeloss.linear_cross_entropy(x, W, t)
        out = safeloss.linear_cross_entropy(x, W, t, **ex)
        stock = F.cross_entropy(F.linear(x, W), t)
    got = out[0] if isinstance(out, tuple) else out
    # The same rounded logits: equal up to the float32 accumulation order of two loops.
    torch.testing.assert_close(got.float(), plain.float(), rtol=3e-7, atol=0)
    if how == "autocast":  # stock's loss runs in float32 there (half inputs: its own half math)
        torch.testing.assert_close(got.float(), stock.float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("option,most", [("none", 1), ("z_loss", 1), ("stats", 1), ("temperature", 3),
                                         ("softcap", 3)])
def test_torch_backend_saves_no_work_copy_of_half_logits(option: str, most: int) -> None:
    """Class: what the extras path keeps for backward, in units of the bfloat16 logits' bytes: the
    logits as given (1), and the capped, scaled float32 logits where a cap or a temperature
    made them (2 more); never the float32 copy of the logits besides (it kept 2 and 4)."""
    ex = {"none": {}, "z_loss": dict(z_loss=1e-4), "stats": dict(return_stats=True),
          "temperature": dict(temperature=0.7), "softcap": dict(softcap=30.0)}[option]
    z = torch.randn(64, 300).bfloat16().requires_grad_()
    t = torch.randint(0, 300, (64,))
    saved: dict[int, int] = {}

    def pack(v: torch.Tensor) -> torch.Tensor:
        s = v.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        return v

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        out = safeloss.cross_entropy(z, t, backend="torch", **ex)
    unit = z.numel() * z.element_size()
    assert sum(b for b in saved.values() if b >= unit) <= most * unit, (saved, unit)
    loss = out[0] if isinstance(out, tuple) else out
    (g,) = torch.autograd.grad(loss, z)
    assert g.dtype == torch.bfloat16 and g.isfinite().all()


NOTE = r"\[softcap=30: NaN/inf and overflow are judged on the capped, scaled logits"


@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("entry", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("finding", ["nonfinite", "negative-probabilities", "empty-mean"])
def test_only_findings_about_the_logits_carry_the_extras_note(
        monkeypatch: pytest.MonkeyPatch, entry: str, finding: str, deferred: bool) -> None:
    """Class: the extras' line says which logits the logits' checks judged; a finding about the
    targets or an empty batch does not carry it (it headed every finding); a deferred finding
    keeps its own line either way."""
    monkeypatch.setattr(checks, "DEFER_ON_CPU", deferred)
    g = torch.Generator().manual_seed(1)
    n = 0 if finding == "empty-mean" else 4
    h, W = torch.randn(n, H, generator=g), torch.randn(C, H, generator=g)
    t: torch.Tensor = torch.randint(0, C, (n,), generator=g)
    if finding == "negative-probabilities":
        t = torch.full((n, C), 0.2)
        t[1, 0], t[1, 1] = -0.2, 0.6
    elif finding == "nonfinite":
        h[2, 0] = math.nan
    x = h @ W.T
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        if entry == "cross_entropy":
            safeloss.cross_entropy(x, t, softcap=30.0)
        else:
            safeloss.linear_cross_entropy(h, W, t, softcap=30.0)
        safeloss.check_pending()
    msgs = [str(w.message) for w in rec if issubclass(w.category, safeloss.SafeLossWarning)]
    assert len(msgs) == 1, msgs
    assert bool(re.search(NOTE, msgs[0])) == (finding == "nonfinite"), msgs[0]
    assert ("found by an earlier call" in msgs[0]) == (deferred and finding != "empty-mean"), msgs[0]

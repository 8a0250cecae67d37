"""Second hostile pass over the LLM/RL extras (softcap, temperature, z_loss, return_stats) of
``cross_entropy`` and ``linear_cross_entropy``, on both backends (Triton under TRITON_INTERPRET=1).

Every value, statistic and gradient (non-trivial upstream gradient) is judged against a float64
reference written here from the documented formulas alone: z -> softcap * tanh(z / softcap) ->
/ temperature; stock cross-entropy of that; z-loss = z_loss * lse^2 per non-ignored position,
reduced as the loss ("mean": over the non-ignored positions, unweighted); stats: per-position lse
and entropy of the capped, scaled logits (ignored positions included), accuracy = argmax == target
over non-ignored positions (NaN when none counts, None for probability targets).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import safeloss
from safeloss.backends import dispatch
from tests.tolerances import TIGHT

C = 5
_CPU_REASON = dispatch.triton_unavailable_reason(torch.device("cpu"))
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    _CPU_REASON is not None, reason=str(_CPU_REASON)))]
RTOL, ATOL = TIGHT[torch.float32]
# Values, not diagnostics, are judged here: all-ignored and empty means, and the extreme scales'
# overflow findings, warn by design (their messages are tested in tests/test_extras.py).
pytestmark = pytest.mark.filterwarnings("ignore::safeloss.SafeLossWarning")


def reference(z: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None = None,
              ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
              softcap: float | None = None, temperature: float = 1.0, z_loss: float = 0.0
              ) -> tuple[torch.Tensor, dict[str, Any]]:
    """float64 loss and statistics from the documented formulas (z may require grad)."""
    z = z.double()
    cdim = 0 if z.dim() == 1 else 1
    zt = z if softcap is None else softcap * torch.tanh(z / softcap)
    zt = zt / temperature
    prob = t.is_floating_point()
    w = None if weight is None else weight.double()
    ce = F.cross_entropy(zt, t.double() if prob else t, w, ignore_index=ignore_index,
                         reduction=reduction, label_smoothing=label_smoothing)
    lse = torch.logsumexp(zt, cdim)
    valid = torch.ones_like(lse, dtype=torch.bool) if prob else t != ignore_index
    zl = z_loss * torch.where(valid, lse, 0.0) ** 2
    zl = zl if reduction == "none" else zl.sum() if reduction == "sum" else zl.sum() / valid.sum()
    logp = torch.log_softmax(zt, cdim)
    ent = -(logp.exp() * logp).sum(cdim)
    acc = None
    if not prob:
        acc = ((z.argmax(cdim) == t) & valid).sum().double() / valid.sum()
    stats = dict(lse=lse.detach(), entropy=ent.detach(), z_loss=zl.detach(), accuracy=acc)
    return ce + zl, stats


def close(a: torch.Tensor, b: torch.Tensor, what: str, scale: float = 1.0) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    torch.testing.assert_close(a.double(), b.double(), rtol=RTOL * scale, atol=ATOL * scale,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def check_stats(st: safeloss.LossStats, rs: dict[str, Any], scale: float = 1.0) -> None:
    for k in ("lse", "entropy", "z_loss"):
        got = getattr(st, k)
        assert got.dtype == torch.float32 and not got.requires_grad, k
        close(got, rs[k], k, scale)
    if rs["accuracy"] is None:  # probability targets: NaN, a tensor (torch.func takes no None)
        assert st.accuracy.dtype == torch.float32 and st.accuracy.shape == ()
        assert math.isnan(st.accuracy.item())
    else:
        assert st.accuracy is not None and st.accuracy.dtype == torch.float32
        assert st.accuracy.shape == ()
        close(st.accuracy, rs["accuracy"], "accuracy")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _case(name: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(logits, target, kwargs) of one attack class."""
    g = _gen(zlib_crc(name))
    z = torch.randn(6, C, generator=g) * 3
    t = torch.randint(0, C, (6,), generator=g)
    t[1] = -100
    w = torch.rand(C, generator=g) + 0.2
    q = torch.softmax(torch.randn(6, C, generator=g), 1)
    every = dict(softcap=2.0, temperature=0.7, z_loss=0.1)
    cases: dict[str, tuple[torch.Tensor, torch.Tensor, dict[str, Any]]] = {
        "weight-ignore-smoothing": (z, t, dict(weight=w, label_smoothing=0.1, **every)),
        "prob-weight-smoothing": (z, q, dict(weight=w, label_smoothing=0.1, **every)),
        "all-ignored": (z, torch.full((6,), -100), dict(weight=w, **every)),
        "ignore-index-in-range": (z, t.clamp(min=0), dict(ignore_index=2, weight=w, z_loss=0.1)),
        "kd": (torch.randn(2, C, 3, generator=g), torch.tensor([[0, -100, 4], [2, 2, 1]]),
               dict(weight=w, label_smoothing=0.1, **every)),
        "kd-prob": (torch.randn(2, C, 3, generator=g), torch.softmax(torch.randn(2, C, 3, generator=g), 1),
                    dict(**every)),
        "1d": (torch.randn(C, generator=g), torch.tensor(2), dict(**every)),
        "1d-ignored": (torch.randn(C, generator=g), torch.tensor(-100), dict(**every)),
        "1d-prob": (torch.randn(C, generator=g), torch.softmax(torch.randn(C, generator=g), 0), dict(**every)),
        "n0": (torch.randn(0, C), torch.zeros(0, dtype=torch.long), dict(**every)),
        "c1": (torch.randn(6, 1, generator=g), torch.zeros(6, dtype=torch.long), dict(**every)),
        "ties": (torch.zeros(6, C).index_fill_(1, torch.tensor([1, 3]), 1.0),
                 torch.tensor([1, 3, 1, 3, -100, 0]), dict(softcap=0.5, return_stats=True)),
        "temperature-1e-3": (z, t, dict(temperature=1e-3, z_loss=0.1)),
        "temperature-1e3-zloss-10": (z, t, dict(temperature=1e3, z_loss=10.0)),
        "softcap-1e-2-zloss-10": (z, t, dict(softcap=1e-2, z_loss=10.0)),
        "softcap-1e4-temperature-1e-3": (z, t, dict(softcap=1e4, temperature=1e-3, z_loss=10.0)),
    }
    return cases[name]


def zlib_crc(s: str) -> int:
    import zlib
    return zlib.crc32(s.encode())


CASES = ["weight-ignore-smoothing", "prob-weight-smoothing", "all-ignored", "ignore-index-in-range",
         "kd", "kd-prob", "1d", "1d-ignored", "1d-prob", "n0", "c1", "ties", "temperature-1e-3",
         "temperature-1e3-zloss-10", "softcap-1e-2-zloss-10", "softcap-1e4-temperature-1e-3"]
_EXTREME = {"temperature-1e-3": 1e3, "temperature-1e3-zloss-10": 1.0, "softcap-1e-2-zloss-10": 1.0,
            "softcap-1e4-temperature-1e-3": 1e3}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_values_stats_and_grads(backend: str, case: str, reduction: str) -> None:
    z, t, kw = _case(case)
    scale = _EXTREME.get(case, 1.0)  # logits scaled by 1e3: float32's error scales with them
    x = z.clone().requires_grad_()
    xr = z.double().requires_grad_()
    loss, st = safeloss.cross_entropy(x, t, backend=backend, reduction=reduction,
                                      **{**kw, "return_stats": True})
    ref, rs = reference(xr, t, reduction=reduction, **{k: v for k, v in kw.items() if k != "return_stats"})
    assert loss.dtype == torch.float32
    close(loss, ref, "loss", scale)
    check_stats(st, rs, scale)
    if not torch.isfinite(ref).all() or x.numel() == 0:
        return
    g = torch.randn(ref.shape, generator=_gen(1), dtype=torch.float64) + 0.5
    (dx,) = torch.autograd.grad((loss.double() * g).sum(), x)
    (dxr,) = torch.autograd.grad((ref * g).sum(), xr)
    close(dx, dxr, "d/dlogits", scale)


LCASES = ["weight-ignore-smoothing", "prob-weight-smoothing", "all-ignored", "1d", "n0", "c1",
          "temperature-1e-3", "softcap-1e-2-zloss-10"]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", LCASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_values_stats_and_grads(backend: str, case: str, reduction: str) -> None:
    z, t, kw = _case(case)
    H = 3
    g = _gen(2)
    nrows = z.shape[:-1] if z.dim() == 2 else ()
    x0 = torch.randn((*nrows, H), generator=g)
    w0 = torch.randn(z.shape[-1], H, generator=g)
    scale = _EXTREME.get(case, 1.0)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    xr, wr = x0.double().requires_grad_(), w0.double().requires_grad_()
    loss, st = safeloss.linear_cross_entropy(x, w, t, backend=backend, reduction=reduction,
                                             **{**kw, "return_stats": True})
    ref, rs = reference(xr @ wr.T, t, reduction=reduction, **kw)
    close(loss, ref, "loss", scale)
    check_stats(st, rs, scale)
    if not torch.isfinite(ref).all() or x.numel() == 0:
        return
    up = torch.randn(ref.shape, generator=_gen(3), dtype=torch.float64) + 0.5
    got = torch.autograd.grad((loss.double() * up).sum(), (x, w))
    want = torch.autograd.grad((ref * up).sum(), (xr, wr))
    for a, b, what in zip(got, want, ("d/dinput", "d/dlinear_weight")):
        close(a, b, what, 10 * scale)


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_float32(backend: str, reduction: str, kind: str) -> None:
    """Hessian-vector products of float32 logits (float64 ones never reach the Triton kernels)."""
    g = _gen(4)
    z = torch.randn(4, C, generator=g)
    t = torch.tensor([1, -100, 0, 4]) if kind == "index" else torch.softmax(torch.randn(4, C, generator=g), 1)
    w = torch.rand(C, generator=g) + 0.2
    kw = dict(weight=w, label_smoothing=0.1, softcap=3.0, temperature=0.7, z_loss=0.1, reduction=reduction)
    up = torch.randn(4 if reduction == "none" else (), generator=g, dtype=torch.float64) + 0.5
    v = torch.randn(4, C, generator=g, dtype=torch.float64)
    x, xr = z.clone().requires_grad_(), z.double().requires_grad_()
    (gx,) = torch.autograd.grad((safeloss.cross_entropy(x, t, backend=backend, **kw) * up.float()).sum(), x,
                                create_graph=True)
    (hv,) = torch.autograd.grad((gx * v.float()).sum(), x)
    (gr,) = torch.autograd.grad((reference(xr, t, **kw)[0] * up).sum(), xr, create_graph=True)
    (hvr,) = torch.autograd.grad((gr * v).sum(), xr)
    close(gx.detach(), gr.detach(), "gradient")
    close(hv, hvr, "Hessian-vector product")


@pytest.mark.parametrize("upstream", ["expanded", "strided", "sum"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_none_upstream_gradient_layouts(backend: str, upstream: str) -> None:
    """reduction="none" on (N, C, d) logits: the upstream gradient as autograd hands it
    (a stride-0 expand of l.sum(), an expanded scalar, a strided view)."""
    g = _gen(5)
    z = torch.randn(2, C, 3, generator=g)
    t = torch.tensor([[0, -100, 4], [2, 2, 1]])
    kw = dict(softcap=3.0, temperature=0.7, z_loss=0.1)
    x, xr = z.clone().requires_grad_(), z.double().requires_grad_()
    loss = safeloss.cross_entropy(x, t, backend=backend, reduction="none", **kw)
    ref = reference(xr, t, reduction="none", **kw)[0]
    if upstream == "sum":
        loss.sum().backward()
        ref.sum().backward()
    else:
        up = (torch.tensor(0.7).expand(2, 3) if upstream == "expanded"
              else torch.randn(2, 6, generator=g)[:, ::2])
        loss.backward(up)
        ref.backward(up.double())
    assert x.grad is not None and xr.grad is not None
    close(x.grad, xr.grad, "d/dlogits")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_logits_stats_are_float32_and_loss_keeps_the_dtype(backend: str, dtype: torch.dtype) -> None:
    z = torch.randn(4, C, generator=_gen(6)).to(dtype).requires_grad_()
    t = torch.tensor([1, -100, 0, 4])
    loss, st = safeloss.cross_entropy(z, t, backend=backend, softcap=3.0, z_loss=0.1,
                                      reduction="none", return_stats=True)
    assert loss.dtype == dtype
    assert st.accuracy is not None
    assert {s.dtype for s in (st.lse, st.entropy, st.z_loss, st.accuracy)} == {torch.float32}
    loss.sum().backward()
    assert z.grad is not None and z.grad.dtype == dtype
    _, rs = reference(z.detach(), t, reduction="none", softcap=3.0, z_loss=0.1)
    torch.testing.assert_close(st.lse.double(), rs["lse"], rtol=1e-5, atol=1e-5)  # from the half values


@pytest.mark.parametrize("backend", BACKENDS)
def test_extras_under_autocast_return_float32_as_stock(backend: str) -> None:
    lin = torch.nn.Linear(3, C)
    h = torch.randn(4, 3, generator=_gen(7))
    t = torch.tensor([1, -100, 0, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(h)
        stock = F.cross_entropy(logits, t)
        loss, st = safeloss.cross_entropy(logits, t, backend=backend, softcap=3.0, z_loss=0.1,
                                          return_stats=True)
    assert logits.dtype == torch.bfloat16 and loss.dtype == stock.dtype == torch.float32
    assert st.lse.dtype == torch.float32
    ref, _ = reference(logits.detach(), t, softcap=3.0, z_loss=0.1)
    close(loss, ref, "loss")


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_stats_across_sizes(dynamic: bool) -> None:
    """aot_eager, fullgraph, sizes that change: accuracy's and the z-loss mean's divisors follow."""
    kw = dict(weight=torch.rand(C, generator=_gen(8)) + 0.2, label_smoothing=0.1, softcap=3.0,
              z_loss=0.1)
    fn = torch.compile(lambda z, t: safeloss.cross_entropy(z, t, return_stats=True, **kw),
                       fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for n in (4, 7):
        z = torch.randn(n, C, generator=_gen(n))
        t = torch.randint(0, C, (n,), generator=_gen(n))
        t[0] = -100
        loss, st = fn(z, t)
        ref, rs = reference(z, t, **kw)
        close(loss, ref, "loss")
        check_stats(st, rs)


# torch.func takes only tensors in outputs: LossStats.accuracy of probability targets is a NaN
# tensor (no position has a class label), not None (which grad(has_aux=True) and vmap refused).
@pytest.mark.parametrize("transform", ["grad-has-aux", "vmap"])
def test_functorch_returns_stats_of_probability_targets(transform: str) -> None:
    q = torch.softmax(torch.randn(6, C, generator=_gen(9)), 1)

    def f(z: torch.Tensor) -> Any:
        return safeloss.cross_entropy(z, q, softcap=3.0, return_stats=True)

    z = torch.randn(6, C, generator=_gen(10))
    if transform == "grad-has-aux":
        _, st = torch.func.grad(f, has_aux=True)(z)
    else:
        _, st = torch.vmap(f)(z.expand(2, 6, C))
    assert st.lse.shape[-1] == 6
    assert st.accuracy.dtype == torch.float32 and torch.isnan(st.accuracy).all()


@pytest.mark.parametrize("transform", ["grad-has-aux", "vmap"])
def test_functorch_returns_linear_stats_of_probability_targets(transform: str) -> None:
    q = torch.softmax(torch.randn(6, C, generator=_gen(12)), 1)
    w = torch.randn(C, 4, generator=_gen(13))

    def f(h: torch.Tensor) -> Any:
        return safeloss.linear_cross_entropy(h, w, q, softcap=3.0, return_stats=True)

    h = torch.randn(6, 4, generator=_gen(14))
    if transform == "grad-has-aux":
        _, st = torch.func.grad(f, has_aux=True)(h)
    else:
        _, st = torch.vmap(f)(h.expand(2, 6, 4))
    assert st.lse.shape[-1] == 6
    assert st.accuracy.dtype == torch.float32 and torch.isnan(st.accuracy).all()


def test_functorch_returns_stats_of_class_indices() -> None:
    t = torch.tensor([1, -100, 0, 4, 2, 2])
    z = torch.randn(6, C, generator=_gen(11))
    grad, st = torch.func.grad(lambda z: safeloss.cross_entropy(z, t, softcap=3.0, z_loss=0.1,
                                                                return_stats=True), has_aux=True)(z)
    zr = z.double().requires_grad_()
    ref, rs = reference(zr, t, softcap=3.0, z_loss=0.1)
    ref.backward()
    assert zr.grad is not None
    close(grad, zr.grad, "d/dlogits")
    check_stats(st, rs)
    assert not math.isnan(float(st.accuracy))

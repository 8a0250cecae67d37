"""A hostile user's grid: every op x every setting against stock torch, bugs found by probing.

Each test compares one op in one setting (torch.func transforms, compile, tracers, autocast,
grad modes, fake / meta tensors) with the stock equivalent: values, gradients, dtype and shape,
and, where stock raises, the builtin class of the error (code that catches stock's class must
keep catching safeloss's).
"""

from __future__ import annotations

import builtins
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

import safeloss

N, H, C = 4, 3, 5
BAD = C + 2


def _builtin(e: BaseException) -> type[BaseException]:
    """The most derived builtin exception class ``e`` is an instance of (its class for stock's)."""
    return next(c for c in type(e).__mro__ if c.__module__ == "builtins")


def _raised(fn: Callable[[], object]) -> BaseException:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the class is what is compared
        return e
    raise AssertionError("no error raised")


# -------------------------------------------------------------------------------------------
# A bad label inside torch.func transforms: stock raises a RuntimeError under vmap (its batched
# gather) and an IndexError under grad / jvp; safeloss raised IndexError everywhere.

def _bad_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, C, (N,), generator=g)
    t[1] = BAD
    return dict(x=torch.randn(N, C, generator=g), t=t, w=torch.rand(C, generator=g) + 0.5,
                h=torch.randn(N, H, generator=g), W=torch.randn(C, H, generator=g),
                xs=torch.randn(2, N, C, generator=g), hs=torch.randn(2, N, H, generator=g),
                ts=t.expand(2, N).clone(), ws=torch.rand(2, C, generator=g) + 0.5,
                Ws=torch.randn(2, C, H, generator=g))


def _ce(safe: bool) -> Callable[..., torch.Tensor]:
    return safeloss.cross_entropy if safe else F.cross_entropy


def _module_ce(safe: bool) -> Callable[..., torch.Tensor]:
    def f(x: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        cls = safeloss.SafeCrossEntropyLoss if safe else torch.nn.CrossEntropyLoss
        return cls(weight=weight)(x, t)
    return f


def _lce(safe: bool) -> Callable[..., torch.Tensor]:
    if safe:
        return lambda h, W, t, weight=None: safeloss.linear_cross_entropy(h, W, t, weight=weight)
    return lambda h, W, t, weight=None: F.cross_entropy(F.linear(h, W), t, weight=weight)


def _patched(safe: bool) -> Callable[..., torch.Tensor]:
    def f(x: torch.Tensor, t: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if not safe:
            return F.cross_entropy(x, t, weight=weight)
        with safeloss.patch():
            return F.cross_entropy(x, t, weight=weight)
    return f


CE_OPS = {"cross_entropy": _ce, "SafeCrossEntropyLoss": _module_ce, "patch": _patched}
CE_TRANSFORMS: dict[str, Callable[[Callable[..., torch.Tensor], dict], object]] = {
    "vmap logits": lambda f, d: vmap(lambda a: f(a, d["t"]))(d["xs"]),
    "vmap labels": lambda f, d: vmap(lambda b: f(d["x"], b))(d["ts"]),
    "vmap class weight": lambda f, d: vmap(lambda w: f(d["x"], d["t"], w))(d["ws"]),
    "vmap(grad)": lambda f, d: vmap(grad(lambda a, b: f(a, b)))(d["x"], d["t"]),
    "grad": lambda f, d: grad(lambda a: f(a, d["t"]))(d["x"]),
    "jvp": lambda f, d: jvp(lambda a: f(a, d["t"]), (d["x"],), (d["x"],)),
}
LCE_TRANSFORMS: dict[str, Callable[[Callable[..., torch.Tensor], dict], object]] = {
    "vmap hidden": lambda f, d: vmap(lambda a: f(a, d["W"], d["t"]))(d["hs"]),
    "vmap labels": lambda f, d: vmap(lambda b: f(d["h"], d["W"], b))(d["ts"]),
    "vmap linear weight": lambda f, d: vmap(lambda W: f(d["h"], W, d["t"]))(d["Ws"]),
    "vmap class weight": lambda f, d: vmap(lambda w: f(d["h"], d["W"], d["t"], w))(d["ws"]),
    "vmap(grad)": lambda f, d: vmap(grad(lambda a: f(a, d["W"], d["t"])))(d["hs"]),
    "grad": lambda f, d: grad(lambda a: f(a, d["W"], d["t"]))(d["h"]),
    "jvp": lambda f, d: jvp(lambda a: f(a, d["W"], d["t"]), (d["h"],), (d["h"],)),
}
CELLS = ([(op, make, tr, run) for op, make in CE_OPS.items() for tr, run in CE_TRANSFORMS.items()]
         + [("linear_cross_entropy", _lce, tr, run) for tr, run in LCE_TRANSFORMS.items()])


@pytest.mark.parametrize(("op", "make", "transform", "run"), CELLS,
                         ids=[f"{c[0]}-{c[2]}" for c in CELLS])
def test_bad_label_in_torch_func_raises_stocks_class(op: str, make: Callable, transform: str,
                                                     run: Callable) -> None:
    d = _bad_inputs()
    stock = _raised(lambda: run(make(False), d))
    ours = _raised(lambda: run(make(True), d))
    assert isinstance(ours, safeloss.TargetOutOfRangeError), f"{op} {transform}: {ours!r}"
    assert isinstance(ours, _builtin(stock)), (
        f"{op} under {transform}: stock raises {_builtin(stock).__name__}, safeloss "
        f"{type(ours).__mro__}")
    assert issubclass(_builtin(stock), (IndexError, RuntimeError)) and builtins  # stock's own check

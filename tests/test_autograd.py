"""Autograd beyond the first derivative: double backward, torch.func transforms, weight grads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

import safeloss
from tests.test_differential import BACKENDS
from tests.tolerances import assert_matches


def _x_t(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prob", [False, True])
def test_double_backward_matches_stock(backend, prob):
    x, t = _x_t()
    if prob:
        t = torch.randn(6, 5, generator=torch.Generator().manual_seed(2)).softmax(1)
    results = []
    for fn in (lambda a, b: safeloss.cross_entropy(a, b, backend=backend, label_smoothing=0.1),
               lambda a, b: F.cross_entropy(a, b, label_smoothing=0.1)):
        a = x.clone().requires_grad_()
        b = t.clone().requires_grad_(prob)
        inputs = (a, b) if prob else (a,)
        grads = torch.autograd.grad(fn(a, b), inputs, create_graph=True)
        sum(gr.pow(2).sum() for gr in grads).backward()  # a gradient penalty
        results.append([a.grad] + ([b.grad] if prob else []))
    for ours, stock in zip(*results):
        assert_matches(ours, stock)


@pytest.mark.skipif(BACKENDS[1].marks and BACKENDS[1].marks[0].args[0], reason="no Triton")
def test_fused_grad_refuses_double_backward():
    x, t = _x_t()
    x.requires_grad_()
    loss = safeloss.cross_entropy(x, t, backend="triton", fused_grad=True, reduction="sum")
    with pytest.raises(safeloss.BackendError, match=r"fused_grad=True .* cannot be differentiated again"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_vmap_and_per_sample_gradients_match_stock():
    x, t = _x_t()

    def ours(a, b):
        return safeloss.cross_entropy(a[None], b[None])

    def stock(a, b):
        return F.cross_entropy(a[None], b[None])

    assert_matches(vmap(ours)(x, t), vmap(stock)(x, t))
    assert_matches(vmap(grad(ours))(x, t), vmap(grad(stock))(x, t))


def test_vmap_with_the_triton_backend_is_a_clear_error():
    x, t = _x_t()
    with pytest.raises(safeloss.BackendError, match=r"cannot run inside torch.func transforms"):
        vmap(lambda a, b: safeloss.cross_entropy(a[None], b[None], backend="triton"))(x, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_gradient_with_probability_targets(backend):
    x, _ = _x_t()
    y = torch.randn(6, 5, generator=torch.Generator().manual_seed(3)).softmax(1)
    grads = []
    for fn in (lambda a, w: safeloss.cross_entropy(a, y, w, backend=backend),
               lambda a, w: F.cross_entropy(a, y, w)):
        w = (torch.rand(5, generator=torch.Generator().manual_seed(4)) + 0.5).requires_grad_()
        fn(x, w).backward()
        grads.append(w.grad)
    assert_matches(*grads)


def test_bad_label_inside_torch_func_raises_like_stock():
    x, t = _x_t()
    t[1] = 9
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"inside a torch.func transform.*Stock torch reports"):
        grad(lambda a: safeloss.cross_entropy(a, t))(x)
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"inside a torch.func transform"):
        vmap(grad(lambda a, b: safeloss.cross_entropy(a, b)))(x, t)


def test_per_sample_gradients_with_a_class_weight():
    x, t = _x_t()
    w = torch.rand(5, generator=torch.Generator().manual_seed(5)) + 0.5
    ours = vmap(grad(lambda a, b: safeloss.cross_entropy(a, b, weight=w)))(x, t)
    stock = vmap(grad(lambda a, b: F.cross_entropy(a, b, weight=w)))(x, t)
    assert_matches(ours, stock)

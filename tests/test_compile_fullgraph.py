"""torch.compile(fullgraph=True) traces the whole loss, validation included, without graph
breaks, for every backend (Triton through its registered custom ops)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import safeloss
from tests.test_differential import BACKENDS
from tests.tolerances import assert_matches


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["index-mean", "kdim-weight-smooth", "prob-none"])
def test_fullgraph(backend, case):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    w = None
    kw: dict = {}
    if case == "index-mean":
        x, t = torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    elif case == "kdim-weight-smooth":
        x, t = torch.randn(2, 5, 3, 2, generator=g), torch.randint(0, 5, (2, 3, 2), generator=g)
        w, kw = torch.rand(5, generator=g) + 0.5, {"label_smoothing": 0.1, "ignore_index": 1}
    else:
        x, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g).softmax(1)
        kw = {"reduction": "none"}

    def step(x, t):
        return safeloss.cross_entropy(x, t, w, backend=backend, **kw)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xc, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = compiled(xc, t)
    ref = F.cross_entropy(xs, t, w, **kw)
    assert_matches(out, ref)
    out.sum().backward()
    ref.sum().backward()
    assert_matches(xc.grad, xs.grad)


def test_shape_errors_keep_their_type_under_default_compile():
    torch._dynamo.reset()
    loss_fn = safeloss.SafeCrossEntropyLoss()
    compiled = torch.compile(lambda x, t: loss_fn(x, t), backend="aot_eager")
    with pytest.raises(safeloss.BatchSizeMismatchError, match=r"got 8 predictions but 2 targets"):
        compiled(torch.randn(8, 5), torch.randint(0, 5, (2,)))

"""torch.compile(fullgraph=True) traces the whole loss, validation included, without graph
breaks, for every backend (Triton through its registered custom ops)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import safeloss
from tests.test_differential import BACKENDS, CPU_BACKENDS, DEVICE
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

    # On a GPU machine the kernel runs compiled for the device (CPU tensors there would need the
    # interpreter); values only, so the deferred reporting of CUDA changes nothing here.
    x, t = x.to(DEVICE), t.to(DEVICE)
    w = None if w is None else w.to(DEVICE)

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


# ------------------------------------------------------------------ value checks in compiled code


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_label_is_reported_by_the_compiled_call_itself(backend):
    loss_fn = safeloss.SafeCrossEntropyLoss(backend=backend)
    step = _compiled(lambda x, t: loss_fn(x, t))
    x = torch.randn(6, 5)
    step(x, torch.tensor([0, 1, 2, 3, 4, 0]))  # clean
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)1 of 6 targets.*7 at \[3\]"):
        step(x, torch.tensor([0, 1, 2, 7, 4, 0]))  # same graph, bad values: found at run time


def test_warnings_and_strict_mode_in_compiled_code():
    step = _compiled(lambda x, t: safeloss.cross_entropy(x, t))
    x = torch.randn(8, 10).softmax(1)
    t = torch.randint(0, 10, (8,))
    with pytest.warns(safeloss.SafeLossWarning, match="looks already softmaxed"):
        step(x, t)
    with safeloss.strict_mode(), pytest.raises(safeloss.InputError, match="looks already softmaxed"):
        step(x, t)  # strictness is read when the graph runs, not baked in when it was traced


def test_shape_findings_are_reported_from_compiled_code():
    step = _compiled(lambda x, t: safeloss.cross_entropy(x, t, strict=True))
    with pytest.raises(safeloss.TargetShapeError, match="squeezes the singleton dimension"):
        step(torch.randn(4, 3), torch.tensor([[0], [1], [2], [0]]))


def test_compiled_deferred_model(monkeypatch):
    """The CUDA model, on CPU: findings of call k are reported at call k+1 (one record at most)."""
    monkeypatch.setattr(safeloss.core.checks, "DEFER_ON_CPU", True)
    try:
        loss_fn = safeloss.SafeCrossEntropyLoss(reduction="none")
        step = _compiled(lambda x, t: loss_fn(x, t))
        x = torch.randn(4, 3)
        out = step(x, torch.tensor([0, 5, 1, 2]))
        assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3]]).all()
        with pytest.raises(safeloss.TargetOutOfRangeError, match=r"(?s)torch.compile'd call.*5 at \[1\]"):
            step(x, torch.tensor([0, 1, 1, 2]))
        step(x, torch.tensor([0, 1, 1, 2]))
        assert sum(len(v) for v in safeloss.core.checks._pending.values()) == 1  # nothing accumulates
        safeloss.check_pending()
    finally:
        safeloss.core.checks._pending.clear()


def test_inductor_keeps_the_checks():
    pytest.importorskip("torch._inductor")
    torch._dynamo.reset()
    step = torch.compile(lambda x, t: safeloss.cross_entropy(x, t), fullgraph=True)
    x = torch.randn(5, 4, requires_grad=True)
    step(x, torch.tensor([0, 1, 2, 3, 0])).backward()
    with pytest.raises(safeloss.TargetOutOfRangeError, match=r"4 at \[4\]"):
        step(x, torch.tensor([0, 1, 2, 3, 4]))


def test_dynamic_shapes_compile_once_and_export():
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    step = torch.compile(lambda a, b: safeloss.cross_entropy(a.transpose(1, 2), b), backend=counting_backend, dynamic=True)
    for T in range(3, 15):
        x, t = torch.randn(1, T, 7), torch.randint(0, 7, (1, T))
        torch.testing.assert_close(step(x, t), F.cross_entropy(x.transpose(1, 2), t))
    assert len(graphs) <= 2, f"{len(graphs)} graphs: the checks must not guard on the sequence length"

    class M(torch.nn.Module):
        def forward(self, x, t):
            return safeloss.cross_entropy(x, t)

    B = torch.export.Dim("B")
    x, t = torch.randn(8, 5), torch.randint(0, 5, (8,))
    ep = torch.export.export(M(), (x, t), dynamic_shapes=({0: B}, {0: B}))
    x2, t2 = torch.randn(100, 5), torch.randint(0, 5, (100,))
    torch.testing.assert_close(ep.module()(x2, t2), F.cross_entropy(x2, t2))


def test_compiled_warnings_are_once_per_loss_instance():
    torch._dynamo.reset()
    a, b = safeloss.SafeCrossEntropyLoss(), safeloss.SafeCrossEntropyLoss()
    step = _compiled(lambda x, t: a(x, t) + b(x, t))
    x = torch.randn(8, 10).softmax(1)
    t = torch.randint(0, 10, (8,))
    with pytest.warns(safeloss.SafeLossWarning) as rec:
        step(x, t)
        step(x, t)
    assert len([r for r in rec if "softmaxed" in str(r.message)]) == 2  # one per instance, not per line

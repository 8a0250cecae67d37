"""torch's own oracles: the OpInfo samples of nn.functional.cross_entropy, the module inputs of
nn.CrossEntropyLoss, and the reference implementation in common_nn. Their inputs include negative
weights and unnormalized probability targets, which safeloss warns about but must still compute
exactly as torch does."""

from __future__ import annotations

import warnings

import pytest
import torch

import safeloss
from safeloss import SafeLossWarning
from tests.tolerances import assert_matches

pytest.importorskip("expecttest")
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import module_db
from torch.testing._internal.common_nn import loss_reference_fns

OP = next(o for o in op_db if o.name == "nn.functional.cross_entropy")
MODULE = next(m for m in module_db if m.module_cls is torch.nn.CrossEntropyLoss)


def _samples(dtype):
    return list(OP.sample_inputs("cpu", dtype, requires_grad=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opinfo_samples(dtype):
    samples = _samples(dtype)
    assert len(samples) > 10
    for s in samples:
        target, kwargs = s.args[0], dict(s.kwargs)
        ref_in = s.input.detach().clone().requires_grad_(True)
        our_in = s.input.detach().clone().requires_grad_(True)
        ref = torch.nn.functional.cross_entropy(ref_in, target, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SafeLossWarning)
            out = safeloss.cross_entropy(our_in, target, **kwargs)
        assert_matches(out, ref, what=f"{tuple(s.input.shape)} {kwargs}")
        up = torch.rand_like(ref)
        ref.backward(up)
        out.backward(up)
        assert_matches(our_in.grad, ref_in.grad, what=f"grad {tuple(s.input.shape)} {kwargs}")


def test_module_db_inputs():
    inputs = MODULE.module_inputs_func(MODULE, device="cpu", dtype=torch.float64, requires_grad=False, training=True)
    assert len(inputs) > 5
    for mi in inputs:
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy-argument deprecations, safeloss warnings
            stock = torch.nn.CrossEntropyLoss(*args, **kwargs)
            ours = safeloss.SafeCrossEntropyLoss(*args, **kwargs)
            fargs = mi.forward_input.args
            assert_matches(ours(*fargs), stock(*fargs), what=str(kwargs))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ls", [0.0, 0.15])
@pytest.mark.parametrize("ignore_index", [-100, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_common_nn_reference(reduction, ls, ignore_index, weighted):
    ref_fn = loss_reference_fns["CrossEntropyLoss"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 3, generator=g, dtype=torch.float64)
    t = torch.randint(0, 4, (5, 3), generator=g)
    w = torch.rand(4, generator=g, dtype=torch.float64) + 0.1 if weighted else None
    expected = ref_fn(x, t, weight=w, ignore_index=ignore_index, reduction=reduction, label_smoothing=ls)
    out = safeloss.cross_entropy(x, t, w, ignore_index=ignore_index, reduction=reduction, label_smoothing=ls)
    torch.testing.assert_close(out, expected.to(out.dtype), rtol=1e-9, atol=1e-11)

"""Hostile pass: the runtime settings a training loop puts a loss in (h14).

Activation checkpointing, saved-tensor hooks, anomaly mode, double backward, grad modes, module
hooks and mutation, threads and global state changed between calls of one signature (the second
call served by a plan must still check what the first did), each against stock torch.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import safeloss
from safeloss.core import plan


def _same(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, atol=tol, rtol=tol, equal_nan=True)


# ---------------------------------------------------------------- activation checkpointing


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("prob", [False, True])
def test_linear_checkpoint_non_reentrant_first_call(reduction: str, prob: bool) -> None:
    # The first call of a signature runs the full path (and plans it); checkpoint's recompute in
    # backward then took the planned path, which saves other tensors: CheckpointError.
    torch.manual_seed(0)
    x, W = torch.randn(6, 4), torch.randn(5, 4)
    t = torch.softmax(torch.randn(6, 5), 1) if prob else torch.randint(0, 5, (6,))

    def block(x: torch.Tensor, W: torch.Tensor, safe: bool) -> torch.Tensor:
        if safe:
            return safeloss.linear_cross_entropy(x, W, t, reduction=reduction)
        return F.cross_entropy(x @ W.T, t, reduction=reduction)

    for _ in range(2):  # the planning call, then a planned one
        a = [v.clone().requires_grad_() for v in (x, W)]
        b = [v.clone().requires_grad_() for v in (x, W)]
        out = checkpoint(block, *a, True, use_reentrant=False)
        out.sum().backward()
        ref = checkpoint(block, *b, False, use_reentrant=False)
        ref.sum().backward()
        _same(out, ref)
        _same(a[0].grad, b[0].grad)
        _same(a[1].grad, b[1].grad)

"""Backends compute per-position losses (:class:`safeloss.core.rows.Rows`); the shared
``safeloss.core.reduction`` turns them into the result.

* ``dispatch``: which backend runs a call (Triton for CUDA tensors when it can run, else torch).
* ``torch_backend``: pure torch, every device.
* ``triton_backend`` / ``triton_kernels``: the fused kernels, imported lazily (triton is optional).
"""

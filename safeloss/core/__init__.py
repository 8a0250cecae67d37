"""What every op shares, layer by layer (imports flow down this list, never up):

* ``mode``: the one decision of the setting a call runs in (eager, compile, tracers, transforms, ...).
* ``compiled``: the effectful report op that value checks use inside compiled / traced graphs.
* ``reduction``: the one place per-position fp32 losses become the result.
* ``checks`` / ``rows``: counts from the backends -> findings; deferred CUDA findings.
* ``validation``: argument checks and target normalization (pure functions) -> ``Problem``.
* ``tools``: helpers for tools stock torch works in (torch.fx, TorchScript, sparse layouts).
* ``report``: how a finding reaches the user (error in strict mode, else a warning shown once).
* ``errors``, ``config``, ``_flags``, ``_traceback``: the bottom.
"""

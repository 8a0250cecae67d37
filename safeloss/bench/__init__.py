"""``safeloss bench``: speed and memory of safeloss against stock torch and the best kernels.

Every number in a run comes from that run: the providers are measured in the same process, on
identical inputs, against stock eager torch and against the device's own copy bandwidth measured
at the start. Methods (bytes counted, bandwidth, memory) are documented in ``benchmarks/README.md``.

* CUDA: ``triton.testing.do_bench`` (CUDA events, warm-up excluded, L2 flushed between calls;
  median and 20/80% quantiles), providers one after the other; inputs rotated through a pool
  larger than L2; peak memory from ``torch.cuda.max_memory_allocated``.
* CPU: blocks of calls (``torch.utils.benchmark.Measurement`` statistics), providers interleaved
  block by block (so load from other processes hits all of them alike), many rounds, medians
  over blocks.

The package, by concern: :mod:`.workloads` (shapes, presets, inputs, byte model),
:mod:`.providers` (what is compared), :mod:`.measure` (timers, bandwidth, memory),
:mod:`.runner` (the run, section by section, with progress), :mod:`.output` (environment,
JSON, markdown, plots), :mod:`.linear` (the linear + cross-entropy heads).

Nothing here runs at import; triton, matplotlib and the optional providers (Liger-Kernel, quack)
are imported inside the functions that need them.
"""

from __future__ import annotations

from .measure import (
    GRAPH_MAX_LOGITS,
    SPREAD_MAX,
    Settings,
    Skip,
    Timing,
    _restorer,
    _rotating,
    copy_bandwidth,
    cpu_time_interleaved,
    cuda_time,
    spread,
)
from .output import _cell, markdown, metadata, plots, targets
from .providers import BASELINE, PROVIDERS, Provider, for_device
from .runner import BUDGET_ENV, _base_row, _finish, main, run_workload
from .workloads import (
    Workload,
    _cls,
    _llm,
    _seg,
    full_workloads,
    make_inputs,
    must_move_bytes,
    quick_workloads,
    streamed_bytes,
)

__all__ = [
    "BASELINE",
    "BUDGET_ENV",
    "GRAPH_MAX_LOGITS",
    "PROVIDERS",
    "SPREAD_MAX",
    "Provider",
    "Settings",
    "Skip",
    "Timing",
    "Workload",
    "_base_row",
    "_cell",
    "_cls",
    "_finish",
    "_llm",
    "_restorer",
    "_rotating",
    "_seg",
    "copy_bandwidth",
    "cpu_time_interleaved",
    "cuda_time",
    "for_device",
    "full_workloads",
    "main",
    "make_inputs",
    "markdown",
    "metadata",
    "must_move_bytes",
    "plots",
    "quick_workloads",
    "run_workload",
    "spread",
    "streamed_bytes",
    "targets",
]

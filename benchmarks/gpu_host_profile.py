"""Where the host (CPU) time of one safeloss call goes on a GPU machine.

    python benchmarks/gpu_host_profile.py > host_profile.txt

On an H200 a forward+backward of a small loss took about 0.9 ms of host time against 0.1 ms for
stock torch (benchmarks/results/): launch-bound shapes and loops of loss calls are host-bound.
This prints, for (4096, 10) fp32 on CUDA: per-call host time of stock torch and of each safeloss
variant (a loop that never syncs, so host time is what is measured once the queue is full), then
the top functions by own time (cProfile) and the top torch ops by self CPU time (torch.profiler).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F

import safeloss

N, C = 4096, 10
DEV = "cuda"  # the smoke test in tests/test_bench.py runs it on CPU
CALLS = 300


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def per_call_us(fn, n: int = 0) -> float:
    n = n or CALLS
    for _ in range(20):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    x = torch.randn(N, C, device=DEV, requires_grad=True)
    t = torch.randint(0, C, (N,), device=DEV)

    def stock() -> None:
        torch.autograd.grad(F.cross_entropy(x, t), (x,))

    def fwd_only() -> None:
        safeloss.cross_entropy(x.detach(), t)

    def default() -> None:
        torch.autograd.grad(safeloss.cross_entropy(x, t), (x,))

    def torch_backend() -> None:
        torch.autograd.grad(safeloss.cross_entropy(x, t, backend="torch"), (x,))

    def strict() -> None:
        torch.autograd.grad(safeloss.cross_entropy(x, t, strict=True), (x,))

    print(torch.cuda.get_device_name() if DEV == "cuda" else DEV, "torch", torch.__version__)
    for name, fn in [("stock fwd+bwd", stock), ("safeloss fwd only (no grad)", fwd_only),
                     ("safeloss fwd+bwd (triton)", default), ("safeloss fwd+bwd (torch backend)", torch_backend),
                     ("safeloss fwd+bwd strict (syncs)", strict)]:  # fmt: skip
        print(f"{name:36s} {per_call_us(fn):8.1f} us per call")

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(CALLS):
        default()
    _sync()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    print("\n## cProfile, default calls, by own time\n" + buf.getvalue())

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(CALLS):
            default()
        _sync()
    print("## torch.profiler, default calls, by self CPU time")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()

"""Tile sweep for the Triton kernels on a real GPU: which (BLOCK_C, num_warps, num_stages) moves
the bytes fastest, and how many registers / spills each compiled variant has.

    python benchmarks/gpu_tune.py [--budget-s 60] > tune.txt

Times each kernel alone (CUDA events via triton.testing.do_bench, L2 flushed before each call) on
the shapes the GPU targets use, and prints GB/s for the bytes the kernel must move:
  forward:  reads the logits once                      (N * C * s bytes)
  backward: reads the logits, writes the gradient      (2 * N * C * s bytes)
next to the device's copy bandwidth measured in the same run. Tuning aid, not a benchmark of
record: `safeloss bench` is that.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from triton.testing import do_bench

from safeloss import bench
from safeloss.backends import triton_backend as tb

# (BLOCK_C, num_warps, num_stages or None for Triton's default), long rows.
# (None, None, None) = the shipped defaults, timed with the softmax check on and off.
LONG = [
    (None, None, None), (4096, 2, None), (8192, 4, None),
    (2048, 4, None), (2048, 8, None), (4096, 4, None), (4096, 8, None), (4096, 16, None),
    (8192, 8, None), (8192, 16, None), (16384, 16, None), (16384, 32, None),
    (4096, 8, 1), (8192, 16, 1), (4096, 8, 4),
]  # fmt: skip
DEV = "cuda"  # the smoke test in tests/test_bench.py runs it on CPU under the interpreter
SHORT = [(None, None, None), (None, 4, None), (None, 2, None), (None, 8, None), (None, 1, None)]


def compiled_stats(fn: object) -> list[str]:
    """Registers / spills of every variant of a jit function compiled so far (best effort)."""
    out = []
    for caches in getattr(fn, "device_caches", {}).values():
        for key, ck in caches[0].items():
            ck._init_handles() if hasattr(ck, "_init_handles") else None
            md = ck.metadata
            out.append(
                f"warps={md.num_warps} stages={md.num_stages} regs={ck.n_regs} spills={ck.n_spills} "
                f"smem={md.shared} key={str(key)[-80:]}"
            )
    return out


def sweep(n: int, c: int, dtype: torch.dtype, configs: list, copy: float, deadline: float) -> None:
    x = torch.randn(n, c, device=DEV, dtype=dtype)
    t = torch.randint(0, c, (n,), device=DEV)
    g = torch.full((n,), 1.0 / n, device=DEV)
    s = x.element_size()
    ops = torch.ops.safeloss
    print(f"\n## N={n} C={c} {dtype}  (copy bandwidth {copy:.0f} GB/s)")
    print("BLOCK_C warps stages | fwd ms  GB/s  %copy | bwd ms  GB/s  %copy")
    for bc, warps, stages in configs:
        if time.time() > deadline:
            print("(time budget spent)")
            break
        tb.FORCE_BLOCK_C, tb.FORCE_NUM_WARPS, tb.FORCE_NUM_STAGES = bc, warps, stages
        try:
            _l, _f, lse, wy, _d = ops.triton_ce_fwd(x, t, None, -100, 0.0, False, True, False, False, math.inf)
            fwd = do_bench(
                lambda: ops.triton_ce_fwd(x, t, None, -100, 0.0, False, True, False, False, math.inf), warmup=10, rep=40
            )
            bwd = do_bench(
                lambda lse=lse, wy=wy: ops.triton_ce_bwd(
                    x, t, None, lse, wy, g, -100, 0.0, False, True, False
                ),
                warmup=10,
                rep=40,
            )
        except Exception as e:  # a variant that does not compile (shared memory, registers) is a result
            print(f"{bc} {warps} {stages} | failed: {type(e).__name__}: {str(e)[:120]}")
            continue
        if bc is None and warps is None and stages is None:
            off = do_bench(
                lambda: ops.triton_ce_fwd(x, t, None, -100, 0.0, False, False, False, False, math.inf),
                warmup=10,
                rep=40,
            )
            print(
                f"defaults, fwd with the softmax check compiled out: {off:.3f} ms (check on / off {fwd / off:.3f}x)"
            )
        fg = n * c * s / (fwd * 1e-3) / 1e9
        bg = 2 * n * c * s / (bwd * 1e-3) / 1e9
        print(
            f"{bc} {warps} {stages} | {fwd:.3f} {fg:.0f} {100 * fg / copy:.0f}% | {bwd:.3f} {bg:.0f} {100 * bg / copy:.0f}%"
        )
    tb.FORCE_BLOCK_C = tb.FORCE_NUM_WARPS = tb.FORCE_NUM_STAGES = None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=60)
    args = ap.parse_args()
    deadline = time.time() + args.budget_s
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    copy = bench.copy_bandwidth(torch.device(DEV), quick=True)  # the harness's own measurement
    sweep(8192, 128256, torch.bfloat16, LONG, copy, deadline)
    sweep(4096, 100, torch.float32, SHORT, copy, deadline)
    sweep(8192, 32000, torch.bfloat16, LONG[:9], copy, deadline)
    k = tb._kernels()
    for name in ("ce_fwd_kernel", "ce_bwd_kernel"):
        print(f"\n## compiled variants of {name}")
        try:
            print("\n".join(compiled_stats(getattr(k, name))))
        except Exception as e:
            print(f"(unavailable: {type(e).__name__}: {e})")


if __name__ == "__main__":
    main()

"""A kernel that cannot fit its registers, for tests/test_aot_gate.py (compiled there for sm_90)."""

import triton
import triton.language as tl


@triton.jit
def spill_kernel(x_ptr, y_ptr, N: tl.constexpr):
    # N values per program, all live across the reduction: at N = 8192 and one warp, 256 per
    # thread, more than the 255 registers a thread can have.
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, x * tl.sum(x, axis=0))

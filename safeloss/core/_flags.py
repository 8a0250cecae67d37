"""Layout of the small int32 "findings" vector every backend fills during the loss pass.

The backends count problems while they compute the loss (in the same pass over the logits for
the Triton kernel) and write the counts here. ``safeloss.checks`` turns the counts into
warnings/errors, either right away (CPU, strict mode) or at a later call (CUDA default mode),
so that the default path never forces a host sync.
"""

BAD_TARGET = 0  # index targets outside [0, C) that are not ignore_index (row loss set to NaN)
NONFINITE_ROW = 1  # positions (not ignored, target valid) whose loss is NaN or +/-inf
SOFTMAX_LIKE = 2  # positions whose logits all lie in [0, 1] and sum to 1 (within tolerance)
SOFTMAX_CHECKED = 3  # positions examined for SOFTMAX_LIKE
PROB_NEGATIVE = 4  # probability-target positions with a negative entry
PROB_BAD_SUM = 5  # probability-target positions whose entries do not sum to 1 (within tolerance, NaN included)
WEIGHT_NEGATIVE = 6  # negative entries of the class weight (read every call, on the device)
OVERFLOW = 7  # positions whose loss is finite in fp32 but beyond the output dtype's range
SIZE = 8

# The softmax check looks at this many positions, the same ones on every backend: position
# i * T // SOFTMAX_SAMPLE for i < SOFTMAX_SAMPLE, of T positions in row-major order (all of
# them when T <= SOFTMAX_SAMPLE). A softmax before the loss affects every row, so a sample finds
# it as surely as a full scan, and each backend reaching the same verdict needs the same rows.
SOFTMAX_SAMPLE = 64


def overflow_bound(dtype: object) -> float:
    """The smallest magnitude that rounds to inf in ``dtype`` (65520 for float16); inf for the
    dtypes an fp32 value always fits. Pure (no cache to fill): torch.compile guards on a module
    dict it sees mutated, so a lazily filled cache recompiled every first traced call. Only the
    2-byte dtypes pay for the string match (this module imports nothing)."""
    if getattr(dtype, "itemsize", 4) != 2:
        return float("inf")
    name = str(dtype)
    if name == "torch.float16":
        return (2 - 2**-11) * 2.0**15
    return (2 - 2**-8) * 2.0**127 if name == "torch.bfloat16" else float("inf")


# Register limit per thread of every Triton launch (ptxas ``.maxnreg``, Triton's ``maxnreg``). Without
# one, ptxas picks its own target for occupancy and stores a few registers to local memory to
# reach it (4-12 byte spills at 32-128 registers, benchmarks/results/aot-gate). With the limit
# set it allocates what the kernel needs up to the limit: rows of at most NARROW_CLASSES classes
# get NARROW_REGS (the kernel is all latency there: 128 registers keep 16 of an SM's 64 warp
# slots, 25% occupancy), longer rows the hardware's 255; never more than one block can hold in
# an SM's 65536 registers (16 warps: 128 a thread): ptxas takes the limit as given, and a block
# beyond the register file does not launch. benchmarks/aot_gate.py checks both budgets.
NARROW_CLASSES = 1024
NARROW_REGS = 128
MAX_REGS = 255
REGS_PER_SM = 65536  # sm_80, sm_90, sm_100


def max_registers(classes: int, num_warps: int) -> int:
    """The ``maxnreg`` of a launch of ``num_warps`` warps whose rows have ``classes`` classes."""
    return min(NARROW_REGS if classes <= NARROW_CLASSES else MAX_REGS, REGS_PER_SM // (32 * num_warps))


# Tolerances shared by every backend, so all of them flag the same rows. Every backend sums a row
# in fp32 (fp64 for fp64), whatever the dtype it is stored in: a half-precision sum of 300
# values is off by more than these tolerances.
SOFTMAX_SUM_TOL = {"float64": 1e-6, "float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2}
# Probability targets are often made in half precision and upcast (a bf16 teacher's softmax):
# their row sums are off by ~1e-3 whatever the dtype they arrive in. Real mistakes (counts,
# logits, multi-hot rows) are off by far more than 1e-2.
PROB_SUM_TOL = {"float64": 1e-2, "float32": 1e-2, "float16": 2e-2, "bfloat16": 2e-2}

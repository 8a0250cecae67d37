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
PROB_BAD_SUM = 5  # probability-target positions whose entries do not sum to 1 (within tolerance)
SIZE = 8  # spare slots keep the layout stable

# Tolerances shared by every backend, so all of them flag the same rows.
SOFTMAX_SUM_TOL = {"float64": 1e-6, "float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2}
# Probability targets are often made in half precision and upcast (a bf16 teacher's softmax):
# their row sums are off by ~1e-3 whatever the dtype they arrive in. Real mistakes (counts,
# logits, multi-hot rows) are off by far more than 1e-2.
PROB_SUM_TOL = {"float64": 1e-2, "float32": 1e-2, "float16": 2e-2, "bfloat16": 2e-2}

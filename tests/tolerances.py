"""Every numeric tolerance of the test suite, in one place.

fp64/fp32: safeloss must agree with stock torch tightly. fp16/bf16: the stock op itself is only
accurate to the half format, so safeloss must be *as close to the fp64 truth as stock torch is*
(within a factor), not bitwise equal to stock.
"""

import torch

# (rtol, atol) for safeloss vs stock torch
TIGHT = {
    torch.float64: (1e-9, 1e-11),
    torch.float32: (2e-5, 2e-6),
}
# half formats: |safeloss - truth| <= FACTOR * |stock - truth| + (rtol * |truth| + atol)
HALF_FACTOR = 2.0
HALF = {
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


# least precise first: the tolerance of a result is that of its least precise input
PRECISION_ORDER = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def least_precise(*dtypes: torch.dtype | None) -> torch.dtype:
    return min((d for d in dtypes if d is not None), key=PRECISION_ORDER.index)


def assert_matches(
    ours: torch.Tensor, stock: torch.Tensor, truth: torch.Tensor | None = None, what: str = "",
    precision: torch.dtype | None = None,
) -> None:
    """``precision``: the least precise dtype the result was computed from, when it is below the
    result's own (a float64 loss from float32 logits and a float64 weight is float32-accurate)."""
    assert ours.dtype == stock.dtype, f"{what}: dtype {ours.dtype} != stock {stock.dtype}"
    assert ours.shape == stock.shape, f"{what}: shape {tuple(ours.shape)} != stock {tuple(stock.shape)}"
    precision = stock.dtype if precision is None else least_precise(precision, stock.dtype)
    if precision in TIGHT:
        rtol, atol = TIGHT[precision]
        torch.testing.assert_close(ours, stock, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")
        return
    assert truth is not None, "half-precision comparisons need an fp64 truth"
    rtol, atol = HALF[precision]
    o, s, t = ours.double(), stock.double(), truth.double()
    nan = torch.isnan(t)
    assert torch.equal(torch.isnan(o), nan), f"{what}: NaN pattern differs from the truth"
    o, s, t = o[~nan], s[~nan], t[~nan]
    err_o, err_s = (o - t).abs(), (s - t).abs()
    bound = HALF_FACTOR * err_s + rtol * t.abs() + atol
    bad = err_o > bound
    assert not bad.any(), f"{what}: max excess {(err_o - bound).max().item():.3g} over the stock error bound"

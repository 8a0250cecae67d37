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


def assert_matches(ours: torch.Tensor, stock: torch.Tensor, truth: torch.Tensor | None = None, what: str = "") -> None:
    assert ours.dtype == stock.dtype, f"{what}: dtype {ours.dtype} != stock {stock.dtype}"
    assert ours.shape == stock.shape, f"{what}: shape {tuple(ours.shape)} != stock {tuple(stock.shape)}"
    if stock.dtype in TIGHT:
        rtol, atol = TIGHT[stock.dtype]
        torch.testing.assert_close(ours, stock, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")
        return
    assert truth is not None, "half-precision comparisons need an fp64 truth"
    rtol, atol = HALF[stock.dtype]
    o, s, t = ours.double(), stock.double(), truth.double()
    nan = torch.isnan(t)
    assert torch.equal(torch.isnan(o), nan), f"{what}: NaN pattern differs from the truth"
    o, s, t = o[~nan], s[~nan], t[~nan]
    err_o, err_s = (o - t).abs(), (s - t).abs()
    bound = HALF_FACTOR * err_s + rtol * t.abs() + atol
    bad = err_o > bound
    assert not bad.any(), f"{what}: max excess {(err_o - bound).max().item():.3g} over the stock error bound"

"""Rounding a float64 fold result once to the parameter dtype (adapters.torch.precision).

Oracles: numpy's float64 -> float16 cast (a single rounding) and, for bfloat16, rounding the
significand to 8 bits with Python's round-half-even on exact values (math.frexp/ldexp).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from adapters.torch.precision import round_once, scaled_copy  # noqa: E402


def _bf16_oracle(x: float) -> float:
    """x rounded to nearest-even with an 8-bit significand (normal range only)."""
    if x == 0:
        return x
    mantissa, exponent = math.frexp(x)          # x = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    return math.ldexp(round(mantissa * 2**8), exponent - 8)  # exact product; round() is half-even


def _near_ties(dtype: torch.dtype, count: int, seed: int) -> torch.Tensor:
    """float64 values a hair above or below the midpoints between neighbours of ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.rand(count, generator=g, dtype=torch.float64) * 8 - 4).to(dtype)
    up = torch.nextafter(base, torch.full_like(base, math.inf))
    midpoint = (base.double() + up.double()) / 2
    nudge = torch.ldexp(torch.ones(count, dtype=torch.float64), torch.randint(-50, -36, (count,), generator=g))
    sign = torch.where(torch.rand(count, generator=g) < 0.5, -1.0, 1.0).double()
    return midpoint * (1 + sign * nudge)


class TestRoundOnce:
    def test_torch_conversion_double_rounds_and_round_once_does_not(self):
        x = torch.tensor([1 + 2**-11 + 2**-40], dtype=torch.float64)
        assert x.to(torch.float16).item() == 1.0          # through float32: a tie, rounded to even
        assert round_once(x, torch.float16).item() == 1 + 2**-10

    def test_float16_matches_numpy_single_rounding(self):
        x = _near_ties(torch.float16, 20000, seed=1)
        expected = x.numpy().astype(np.float16)
        got = round_once(x, torch.float16).numpy()
        np.testing.assert_array_equal(got, expected)
        # and the plain conversion really is wrong somewhere on this set (the test can fail)
        assert (x.to(torch.float16).numpy() != expected).any()

    def test_bfloat16_matches_exact_rounding(self):
        x = _near_ties(torch.bfloat16, 20000, seed=2)
        expected = [_bf16_oracle(v) for v in x.tolist()]
        got = round_once(x, torch.bfloat16).double().tolist()
        assert got == expected
        assert x.to(torch.bfloat16).double().tolist() != expected

    def test_exact_values_and_specials_pass_through(self):
        x = torch.tensor([0.0, -0.0, 1.5, -2.25, math.inf, -math.inf, 1e6], dtype=torch.float64)
        got = round_once(x, torch.float16)
        assert got.tolist() == [0.0, -0.0, 1.5, -2.25, math.inf, -math.inf, math.inf]  # 1e6 overflows fp16
        assert math.isnan(round_once(torch.tensor([math.nan], dtype=torch.float64), torch.bfloat16).item())

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_wider_targets_are_a_single_conversion(self, dtype):
        x = _near_ties(torch.float16, 100, seed=3)
        expected = torch.from_numpy(x.numpy().astype(np.float32 if dtype == torch.float32 else np.float64))
        assert torch.equal(round_once(x, dtype), expected)  # numpy's casts: a single rounding (none to float64)


class TestScaledCopy:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_product_rounded_once(self, dtype):
        g = torch.Generator().manual_seed(4)
        weight = torch.randn(70, 9, 3, 3, generator=g).to(dtype)
        factor = torch.rand(70, 1, 1, 1, generator=g, dtype=torch.float64) + 0.5
        product = (weight.double() * factor).numpy()       # the float64 product scaled_copy rounds once
        got = scaled_copy(weight, factor)
        assert got.dtype == dtype
        # Independent single roundings: numpy's casts for float32/float16, the bit-level oracle for bfloat16.
        if dtype == torch.bfloat16:
            expected = [_bf16_oracle(v) for v in product.ravel().tolist()]
            assert got.double().flatten().tolist() == expected
        else:
            expected = torch.from_numpy(product.astype(np.float32 if dtype == torch.float32 else np.float16))
            assert torch.equal(got, expected)

    def test_keeps_channels_last(self):
        weight = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
        factor = torch.rand(8, 1, 1, 1, dtype=torch.float64)
        got = scaled_copy(weight, factor)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, (weight.double() * factor).float())

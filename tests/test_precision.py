"""Rounding a float64 fold result once to the parameter dtype (adapters.torch.precision).

Oracles: numpy's float64 -> float16 cast (a single rounding) and, for bfloat16, rounding the
significand to 8 bits with Python's round-half-even on exact values (math.frexp/ldexp).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from adapters.torch.precision import round_once, rounds_to_finite, scaled_copy  # noqa: E402


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


def _all_finite_nonnegative(dtype: torch.dtype) -> torch.Tensor:
    """Every finite non-negative value of a 16-bit float format, ascending, as float64 (exact)."""
    patterns = torch.arange(0, 1 << 15, dtype=torch.int32).to(torch.int16)
    values = patterns.view(dtype).double()
    return values[torch.isfinite(values)]


def _midpoint_cases(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Values at, and just off, every midpoint between neighbours of ``dtype`` (subnormals, zero and the
    overflow threshold included), with the correctly rounded result of each worked out by construction:
    above a midpoint rounds up, below rounds down, on it goes to the neighbour with an even last bit."""
    values = _all_finite_nonnegative(dtype)
    # Past the largest finite value the format would continue one step further: the midpoint towards
    # that step is the overflow threshold (at and above it the rounding is inf).
    upper_edge = (2 * values[-1] - values[-2]).reshape(1)
    lower, upper = values, torch.cat([values[1:], upper_edge])
    midpoint = (lower + upper) / 2                       # exact: one bit more than the format has
    upper_result = torch.cat([values[1:], torch.tensor([math.inf], dtype=torch.float64)])
    even = (torch.arange(len(values)) % 2 == 0)          # consecutive patterns alternate in last bit
    inf = torch.full_like(midpoint, math.inf)
    xs, expected = [], []
    for offset in ("on", "ulp64", "below_float32", "within_float32"):
        for side in (1.0, -1.0):
            if offset == "on":
                x = midpoint
                result = torch.where(even, lower, upper_result)
            elif offset == "ulp64":
                x = torch.nextafter(midpoint, side * inf)
                result = upper_result if side > 0 else lower
            else:
                # 2**-30 relative: lost by a conversion through float32; 2**-20: kept by it. Exact products.
                x = midpoint * (1 + side * 2.0 ** (-30 if offset == "below_float32" else -20))
                result = upper_result if side > 0 else lower
            xs.append(x)
            expected.append(result)
    x, result = torch.cat(xs), torch.cat(expected)
    return torch.cat([x, -x]), torch.cat([result, -result])


class TestRoundOnceEveryMidpoint:
    """Exhaustive over the target format: every midpoint, on it and a hair either side, both signs."""

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_matches_rounding_worked_out_by_construction(self, dtype):
        x, expected = _midpoint_cases(dtype)
        got = round_once(x, dtype).double()
        wrong = torch.nonzero(got != expected).flatten()
        assert wrong.numel() == 0, (f"{wrong.numel()} wrong, e.g. x={x[wrong[0]].item()!r}: "
                                    f"got {got[wrong[0]].item()!r}, expected {expected[wrong[0]].item()!r}")
        # The plain conversion through float32 is wrong on this set (so the test can fail).
        assert not torch.equal(x.to(dtype).double(), expected)

    def test_float16_agrees_with_numpy_everywhere(self):
        x, _ = _midpoint_cases(torch.float16)
        with np.errstate(over="ignore"):  # values past the overflow threshold cast to inf, as they should
            expected = x.numpy().astype(np.float16)
        np.testing.assert_array_equal(round_once(x, torch.float16).numpy(), expected)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_far_outside_the_range(self, dtype):
        x = torch.tensor([2.0**-200, -(2.0**-200), 2.0**-149, 1e39, -1e39, 1e300], dtype=torch.float64)
        got = round_once(x, dtype).double().tolist()
        assert got == [0.0, -0.0, 0.0, math.inf, -math.inf, math.inf]
        assert math.copysign(1.0, got[1]) == -1.0

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_nan_with_only_low_payload_bits_stays_nan(self, dtype):
        # Payload entirely in the bits the odd rounding drops: the sticky bit keeps it a NaN.
        bits = np.array([0x7FF0000000000001, 0xFFF0000000000001], dtype=np.uint64)
        x = torch.from_numpy(bits.view(np.float64).copy())
        assert torch.isnan(x).all()
        assert torch.isnan(round_once(x, dtype)).all()


def _nearest_by_search(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Correct rounding of finite float64 ``x`` within the range of ``dtype``, found by search: the two
    neighbours among every value of the format, the nearer one, the one with an even last bit on a tie."""
    table = _all_finite_nonnegative(dtype)
    magnitude = x.abs()
    upper_index = torch.searchsorted(table, magnitude).clamp(1, len(table) - 1)
    lower, upper = table[upper_index - 1], table[upper_index]
    below, above = magnitude - lower, upper - magnitude      # exact: neighbours within a factor of 2
    lower_even = (upper_index - 1) % 2 == 0
    nearest = torch.where((below < above) | ((below == above) & lower_even), lower, upper)
    return torch.copysign(nearest, x)


class TestScaledCopyRounding:
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_ties_and_near_ties_from_the_product(self, dtype):
        # factor 1.5 makes many products exact midpoints (ties to even); 1 +- (2**-9 + 2**-40) puts many a hair
        # off them, below float32's precision.
        g = torch.Generator().manual_seed(5)
        weight = torch.randn(64, 3, 3, 3, generator=g).to(dtype)
        for value in (1.5, 1 + 2**-9 + 2**-40, 1 - 2**-9 - 2**-40):
            factor = torch.full((64, 1, 1, 1), value, dtype=torch.float64)
            product = weight.double() * factor
            got = scaled_copy(weight, factor)
            assert torch.equal(got.double(), _nearest_by_search(product, dtype)), value
        assert not torch.equal(product.to(dtype).double(), _nearest_by_search(product, dtype))


class TestRoundsToFinite:
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_agrees_with_the_rounding_of_every_midpoint_case(self, dtype):
        x, expected = _midpoint_cases(dtype)
        got = [rounds_to_finite(v, dtype) for v in x.tolist()]
        assert got == torch.isfinite(expected).tolist()
        assert not all(got)  # the cases include the overflow threshold and beyond

    def test_float32_agrees_with_numpy_around_the_threshold(self):
        largest = float(np.finfo(np.float32).max)
        threshold = (largest + 2.0**128) / 2
        values = [largest, math.nextafter(threshold, 0), threshold, math.nextafter(threshold, math.inf), 1e300,
                  -threshold, math.inf, math.nan]
        with np.errstate(over="ignore"):
            expected = [bool(np.isfinite(np.float32(v))) for v in values]
        assert [rounds_to_finite(v, torch.float32) for v in values] == expected

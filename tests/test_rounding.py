"""refimpl.rounding against exact oracles: every float16 / bfloat16 value enumerated from its bit pattern and
compared with Fractions, and float32 by integer arithmetic on the exact rational value of the float64 input."""

from __future__ import annotations

import bisect
import math
import struct
from fractions import Fraction

import numpy as np
import pytest

from refimpl.rounding import bfloat16_bits_to_float32, largest_finite, round_once, round_product


def _half_value(bits: int) -> Fraction:
    """The exact value of a float16 bit pattern (IEEE 754 binary16), from its fields."""
    sign = -1 if bits >> 15 else 1
    exponent, fraction = (bits >> 10) & 0x1F, bits & 0x3FF
    if exponent == 0:
        return sign * Fraction(fraction, 1 << 24)
    return sign * Fraction((1 << 10) + fraction, 1 << 10) * Fraction(2) ** (exponent - 15)


def _bfloat16_value(bits: int) -> Fraction:
    """The exact value of a bfloat16 bit pattern: the upper half of a binary32."""
    return Fraction(struct.unpack("<f", struct.pack("<I", bits << 16))[0])


def _table(decode, exponent_mask: int, exponent_shift: int) -> tuple[list[float], list[int], Fraction]:
    """All finite non-negative values of a 16-bit format in increasing order, their patterns, and the
    overflow threshold (largest finite value plus half its ulp: from there on round-to-nearest gives inf)."""
    patterns = [b for b in range(0x8000) if (b >> exponent_shift) & exponent_mask != exponent_mask]
    values = [decode(b) for b in patterns]
    assert values == sorted(values)
    top, below = values[-1], values[-2]
    return [float(v) for v in values], patterns, top + (top - below) / 2


_FORMATS = {
    "float16": (_half_value, 0x1F, 10),
    "bfloat16": (_bfloat16_value, 0xFF, 7),
}


def _oracle_pattern(x: float, fmt: str) -> int:
    """Bit pattern of ``x`` rounded to nearest, ties to the even pattern, by exact comparison."""
    decode, mask, shift = _FORMATS[fmt]
    values, patterns, overflow = _TABLES[fmt]
    sign = 0x8000 if math.copysign(1.0, x) < 0 else 0
    if math.isinf(x) or Fraction(abs(x)) >= overflow:
        return sign | (mask << shift)  # infinity
    a = Fraction(abs(x))
    i = bisect.bisect_left(values, float(a))
    if i < len(values) and Fraction(values[i]) == a:
        return sign | patterns[i]
    if i == len(values):  # above the largest finite value but below the overflow threshold
        return sign | patterns[-1]
    lo, hi = patterns[i - 1], patterns[i]
    d_lo, d_hi = a - decode(lo), decode(hi) - a
    if d_lo < d_hi or (d_lo == d_hi and lo % 2 == 0):
        return sign | lo
    return sign | hi


_TABLES = {fmt: _table(*spec) for fmt, spec in _FORMATS.items()}


def _float32_oracle(x: float) -> Fraction | float:
    """x rounded to binary32 by integer arithmetic on its exact rational value (inf beyond the range)."""
    if x == 0 or not math.isfinite(x):
        return x
    a = Fraction(abs(x))
    exponent = a.numerator.bit_length() - a.denominator.bit_length()  # floor(log2 a) or one less
    if Fraction(2) ** (exponent + 1) <= a:
        exponent += 1
    quantum = Fraction(2) ** (max(exponent, -126) - 23)
    n, rest = divmod(a, quantum)
    if rest > quantum / 2 or (rest == quantum / 2 and n % 2 == 1):
        n += 1
    value = n * quantum
    if value > Fraction((2 << 23) - 1, 1 << 23) * Fraction(2) ** 127:
        return math.copysign(math.inf, x)
    return value if x > 0 else -value


def _samples(fmt: str, count: int, seed: int) -> np.ndarray:
    """Values around the format's interesting points: exact values, ties, ties +- one float64 ulp,
    subnormals, the overflow threshold, random magnitudes; both signs."""
    rng = np.random.default_rng(seed)
    if fmt == "float32":
        p, emin, emax = 23, -126, 127
    else:
        p, emin, emax = {"float16": (10, -14, 15), "bfloat16": (7, -126, 127)}[fmt]
    exps = rng.integers(emin - p - 2, emax + 2, count)
    mantissa = rng.integers(0, 1 << p, count)
    base = np.ldexp(1.0 + mantissa / 2.0**p, exps)
    half_ulp = np.ldexp(1.0, np.maximum(exps, emin) - p - 1)
    tie = base + half_ulp
    out = [base, tie, np.nextafter(tie, np.inf), np.nextafter(tie, -np.inf),
           np.ldexp(rng.uniform(0.5, 1.0, count), rng.integers(emin - p - 3, emax + 3, count))]
    top = largest_finite(fmt)
    edge = top + np.ldexp(1.0, emax - p - 1)
    out.append(np.array([0.0, top, edge, np.nextafter(edge, 0), np.nextafter(edge, np.inf), 1e300, np.inf,
                         np.ldexp(1.0, emin - p), np.ldexp(1.0, emin - p - 1), np.ldexp(1.5, emin - p - 1),
                         np.ldexp(1.0, emin - p - 2), 1 + 2.0**-11 + 2.0**-40]))
    values = np.concatenate(out)
    return np.concatenate([values, -values])


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_sixteen_bit_formats_match_the_enumerated_oracle(fmt):
    x = _samples(fmt, 300, seed=1 if fmt == "float16" else 2)
    result = round_once(x, fmt)
    got = result.view(np.uint16) if fmt == "float16" else result
    assert got.dtype == np.uint16
    expected = np.array([_oracle_pattern(float(v), fmt) for v in x], dtype=np.uint16)
    wrong = np.flatnonzero(got != expected)
    assert wrong.size == 0, [(float(x[i]).hex(), hex(int(got[i])), hex(int(expected[i]))) for i in wrong[:5]]


def test_float32_matches_integer_arithmetic():
    x = _samples("float32", 300, seed=3)
    got = round_once(x, np.float32)
    assert got.dtype == np.float32
    for value, result in zip(x.tolist(), got.tolist(), strict=True):
        expected = _float32_oracle(value)
        assert result == expected, (value.hex(), result, expected)


def test_double_rounding_is_avoided_where_float32_would_round_twice():
    # Above a float16 tie by 2**-40: float32 drops the excess and the tie goes to even (down).
    x = np.array([1 + 2.0**-11 + 2.0**-40, -(1 + 2.0**-11 + 2.0**-40)])
    assert x.astype(np.float32).astype(np.float16).tolist() == [1.0, -1.0]
    assert round_once(x, "float16").tolist() == [1 + 2.0**-10, -(1 + 2.0**-10)]
    # bfloat16: 1 + 2**-8 is a tie; 2**-30 above it is lost by float32 (24 bits) only beyond 2**-24,
    # so use an excess below float32's resolution.
    y = np.array([1 + 2.0**-8 + 2.0**-30])
    assert int(round_once(y, "bfloat16")[0]) == 0x3F81


def test_nan_signed_zero_and_float64_passthrough():
    x = np.array([np.nan, -0.0, 0.0, -np.inf])
    for fmt in ("float16", "float32"):
        r = round_once(x, fmt)
        assert np.isnan(r[0]) and np.signbit(r[1]) and not np.signbit(r[2]) and r[3] == -np.inf
    bits = round_once(x, "bfloat16")
    assert np.isnan(bfloat16_bits_to_float32(bits)[0]) and bits[1] == 0x8000 and bits[2] == 0 and bits[3] == 0xFF80
    same = round_once(np.array([0.1, 1e300]), "float64")
    assert same.dtype == np.float64 and same.tolist() == [0.1, 1e300]


def test_bfloat16_decoding_is_exact_for_every_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    values = bfloat16_bits_to_float32(bits)
    finite = np.isfinite(values)
    assert np.array_equal(round_once(values[finite].astype(np.float64), "bfloat16"), bits[finite])


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="cannot round to"):
        round_once(np.ones(2), "int8")


@pytest.mark.parametrize("fmt", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("layout", ["per_row", "per_column", "scalar_row"])
@pytest.mark.parametrize("pre", [1.0, -0.75])
def test_round_product_is_round_once_of_the_float64_product(fmt, layout, pre):
    rng = np.random.default_rng(7)
    a = rng.standard_normal((300, 5, 3)).astype(np.float16 if fmt == "float16" else np.float32)
    factor = {"per_row": rng.standard_normal((300, 1, 1)) * 40, "per_column": rng.standard_normal((1, 5, 1)) * 40,
              "scalar_row": np.array([[[1e38]]])}[layout]
    with np.errstate(over="ignore"):
        expected = round_once((a.astype(np.float64) * pre) * factor, fmt)
        got = round_product(a, factor, fmt, pre=pre)
    assert got.dtype == expected.dtype and got.shape == a.shape
    assert np.array_equal(got.view(f"u{got.dtype.itemsize}"), expected.view(f"u{expected.dtype.itemsize}"))

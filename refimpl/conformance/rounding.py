"""Exact rounding of float64 values to a storage dtype, and the raw bits of float16/bfloat16 values.

numpy has no bfloat16, and casting float64 -> float32 -> bfloat16 rounds twice, so the rounding
is done here exactly, in integer arithmetic on the float64 value.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["LOW_PRECISION", "round_to_dtype", "midpoint_distance", "values_to_bits", "bits_to_values",
           "ulp_distance"]

#: Storage dtypes whose expected values must match bit for bit, with (precision p including the
#: implicit bit, minimum normal exponent, maximum exponent) of their IEEE-style binary format.
LOW_PRECISION = {"float16": (11, -14, 15), "bfloat16": (8, -126, 127)}


def _round_scalar(x: float, precision: int, emin: int, emax: int) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    exponent = max(math.frexp(x)[1] - 1, emin)
    quantum_exponent = exponent - (precision - 1)
    # Scaling by a power of two is exact; round() on a float rounds half to even, exactly.
    rounded = math.ldexp(float(round(math.ldexp(x, -quantum_exponent))), quantum_exponent)
    largest = math.ldexp(2.0 - math.ldexp(1.0, 1 - precision), emax)
    return math.copysign(math.inf, x) if abs(rounded) > largest else rounded


def _quantum_exponent(x: float, precision: int, emin: int) -> int:
    """Exponent of the spacing of the format's values around ``x`` (its ulp)."""
    return (max(math.frexp(x)[1] - 1, emin) if x else emin) - (precision - 1)


def midpoint_distance(x: float, dtype: str) -> float:
    """Distance from ``x`` to the nearest rounding midpoint of ``dtype`` (ties decide there).

    >>> midpoint_distance(1.0 + 2.0**-11, "float16"), midpoint_distance(1.0, "float16") == 2.0**-11
    (0.0, True)
    """
    precision, emin, _ = LOW_PRECISION[dtype]
    if x == 0:
        return math.ldexp(1.0, emin - precision)
    quantum_exponent = _quantum_exponent(x, precision, emin)
    scaled = math.ldexp(abs(x), -quantum_exponent)
    return math.ldexp(abs(scaled - math.floor(scaled) - 0.5), quantum_exponent)


def round_to_dtype(values: Any, dtype: str) -> np.ndarray:
    """Round float64 ``values`` to nearest-even in ``dtype``; return the rounded values as float64.

    >>> round_to_dtype([1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11], "float16").tolist()  # ties go to even
    [1.0, 1.001953125]
    >>> round_to_dtype([1.0 + 2.0**-8 + 2.0**-30], "bfloat16").tolist()
    [1.0078125]
    """
    a = np.asarray(values, dtype=np.float64)
    if dtype == "float64":
        return a.copy()
    if dtype == "float32":
        return a.astype(np.float32).astype(np.float64)
    if dtype not in LOW_PRECISION:
        raise ValueError(f"unknown storage dtype {dtype!r}; known: float64, float32, {', '.join(LOW_PRECISION)}")
    p, emin, emax = LOW_PRECISION[dtype]
    return np.array([_round_scalar(float(v), p, emin, emax) for v in a.ravel()], dtype=np.float64).reshape(a.shape)


def values_to_bits(values: np.ndarray, dtype: str) -> list[str]:
    """Raw bits (hex strings, flat) of values already representable in ``dtype``.

    >>> values_to_bits(np.array([1.0, -2.0]), "float16"), values_to_bits(np.array([1.0]), "bfloat16")
    (['0x3c00', '0xc000'], ['0x3f80'])
    """
    if dtype == "float16":
        raw = values.astype(np.float16).view(np.uint16)
    else:
        raw = (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return [f"0x{int(b):04x}" for b in raw.ravel()]


def bits_to_values(bits: Any, dtype: str) -> np.ndarray:
    """Decode hex bit strings (any nesting) of a float16/bfloat16 tensor to float64.

    >>> bits_to_values(["0x3c00", "0xc000"], "float16").tolist(), bits_to_values(["0x3f80"], "bfloat16").tolist()
    ([1.0, -2.0], [1.0])
    """
    if dtype not in LOW_PRECISION:
        raise ValueError(f"raw bits are defined for {sorted(LOW_PRECISION)} only, not {dtype!r}")
    raw = np.vectorize(lambda s: int(s, 16), otypes=[np.uint32])(np.asarray(bits, dtype=object))
    if raw.size and int(raw.max()) > 0xFFFF:
        raise ValueError(f"{dtype} bits must be 16-bit values, got {hex(int(raw.max()))}")
    if dtype == "float16":
        return raw.astype(np.uint16).view(np.float16).astype(np.float64)
    return (raw << 16).astype(np.uint32).view(np.float32).astype(np.float64)


def ulp_distance(actual: float, expected: float, dtype: str) -> str:
    """``|actual - expected|`` in units of ``dtype``'s spacing at ``expected``, as text.

    >>> ulp_distance(1.0 + 2.0**-10, 1.0, "float16"), ulp_distance(float("nan"), 1.0, "bfloat16")
    ('1 ulp', 'non-finite')
    """
    if not (math.isfinite(actual) and math.isfinite(expected)):
        return "non-finite"
    p, emin, _ = LOW_PRECISION[dtype]
    spacing = math.ldexp(1.0, _quantum_exponent(expected, p, emin))
    return f"{abs(actual - expected) / spacing:.3g} ulp"

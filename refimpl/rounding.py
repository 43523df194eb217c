"""Rounding float64 values ONCE to a narrower float format, in numpy (framework-free).

The precision policy (``spec/folding.md``): fold in float64, round once to the parameter dtype,
to nearest with ties to even. A conversion through float32 (what most libraries do for float16
and bfloat16) rounds twice: ``1 + 2**-11 + 2**-40`` becomes float32's ``1 + 2**-11``, a float16 tie,
which goes to even (1.0) although the value lies above the tie.

Here float16 and bfloat16 are rounded directly from the float64 value: with ``e`` the binade
exponent of ``x`` (clamped at the format's smallest normal exponent, so subnormals share one
quantum), the quantum is ``q = 2**(e - p)`` for ``p`` fraction bits, and ``rint(x / q) * q`` is the
nearest multiple of ``q`` with ties to even -- ``x / q`` and ``* q`` scale by powers of two, which
is exact, so ``rint`` is the only rounding. Results beyond the largest finite value become
infinities (IEEE 754's overflow under round-to-nearest). float32 uses numpy's float64 -> float32
cast, a single IEEE 754 conversion. numpy has no bfloat16: bfloat16 results are ``uint16`` bit
patterns (the upper half of the float32 with the same value), as ONNX stores them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["FORMATS", "round_once", "round_product", "bfloat16_bits_to_float32", "largest_finite"]

#: Binary formats by name: (fraction bits p, smallest normal exponent, largest exponent).
FORMATS: dict[str, tuple[int, int, int]] = {
    "float16": (10, -14, 15),
    "bfloat16": (7, -126, 127),
    "float32": (23, -126, 127),
}


def _format_name(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    if name in FORMATS or name == "float64":
        return name
    try:
        name = np.dtype(dtype).name
    except TypeError:
        pass
    if name not in FORMATS and name != "float64":
        raise ValueError(f"cannot round to {dtype!r}: known formats are {sorted(FORMATS)} and float64")
    return name


def largest_finite(dtype: Any) -> float:
    """The largest finite value of a format (``(2 - 2**-p) * 2**emax``).

    >>> largest_finite("float16"), largest_finite("bfloat16") == float.fromhex("0x1.fep127")
    (65504.0, True)
    """
    name = _format_name(dtype)
    if name == "float64":
        return float(np.finfo(np.float64).max)
    p, _, emax = FORMATS[name]
    return float(np.ldexp(2.0 - 2.0**-p, emax))


def round_once(x: Any, dtype: Any) -> np.ndarray:
    """``x`` (converted to float64) rounded once, to nearest with ties to even, to ``dtype``.

    ``dtype``: ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"`` (a copy), or the
    numpy dtype of the first, third or fourth. Returns a float16 / float32 / float64 array, or for
    bfloat16 the ``uint16`` bit patterns. Values that overflow the format become infinities;
    NaN stays NaN.

    >>> x = np.array([1 + 2**-11 + 2**-40])
    >>> float(x.astype(np.float32).astype(np.float16)[0]), float(round_once(x, "float16")[0])
    (1.0, 1.0009765625)
    >>> hex(int(round_once(np.array([1.0, -2.0]), "bfloat16")[1]))
    '0xc000'
    """
    name = _format_name(dtype)
    x = np.asarray(x, dtype=np.float64)
    if name == "float64":
        return x.copy()
    if name == "float32":
        with np.errstate(over="ignore"):
            return x.astype(np.float32)
    p, emin, _ = FORMATS[name]
    _, exponent = np.frexp(x)  # x = m * 2**exponent with 0.5 <= |m| < 1: the binade is exponent - 1
    quantum = np.maximum(exponent - 1, emin) - p
    rounded = np.ldexp(np.rint(np.ldexp(x, -quantum)), quantum)
    rounded = np.where(np.abs(rounded) > largest_finite(name), np.copysign(np.inf, x), rounded)
    if name == "float16":
        return rounded.astype(np.float16)  # exact: every value is a float16 already
    bits = (rounded.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # exact, as above
    return np.where(np.isnan(x), np.uint16(0x7FC0), bits)


def bfloat16_bits_to_float32(bits: Any) -> np.ndarray:
    """bfloat16 ``uint16`` bit patterns to the float32 values they stand for (exact).

    >>> bfloat16_bits_to_float32(np.array([0x3F80, 0xC000], dtype=np.uint16)).tolist()
    [1.0, -2.0]
    """
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


#: Elements per block of :func:`round_product`'s float64 work (1 MiB: stays in cache).
_BLOCK = 1 << 17


def round_product(a: np.ndarray, factor: np.ndarray, dtype: Any, *, pre: float = 1.0) -> np.ndarray:
    """``round_once((a * pre) * factor, dtype)``, computed in float64 a block of rows at a time.

    ``a`` is any float array (float16/float32 values are exact in float64); ``factor`` (float64)
    broadcasts against it and varies along axis 0 or not at all (its axis 0 is 1 or ``a``'s). No
    full-size float64 temporary is made: each block is widened into a small float64 buffer,
    multiplied there in place (plain float64 loops, several times faster than numpy's mixed-dtype
    multiply) and rounded once into the result. Returns what :func:`round_once` returns for
    ``dtype``.

    >>> a = np.array([[1.0, 3.0], [5.0, 7.0]], dtype=np.float16)
    >>> round_product(a, np.array([[0.1], [2.0]]), "float16").tolist()
    [[0.0999755859375, 0.300048828125], [10.0, 14.0]]
    """
    name = _format_name(dtype)
    rows = a.shape[0]
    per_row = a[0].size if rows else 0
    step = max(1, _BLOCK // max(per_row, 1))
    by_row = factor.shape[0] != 1
    out = np.empty(a.shape, dtype=np.uint16 if name == "bfloat16" else np.dtype(name))
    buffer = np.empty(min(rows, step) * per_row, dtype=np.float64)
    for start in range(0, rows, step):
        block = a[start:start + step]
        work = buffer[:block.size].reshape(block.shape)
        np.copyto(work, block)
        if pre != 1.0:
            work *= pre
        work *= factor[start:start + step] if by_row else factor
        if name in ("float32", "float64"):  # the cast is the single IEEE 754 rounding
            with np.errstate(over="ignore"):
                np.copyto(out[start:start + step], work, casting="same_kind")
        else:
            out[start:start + step] = round_once(work, name)
    return out

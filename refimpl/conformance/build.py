"""Assembling a vector from a layer pair: expected values, tolerance policy and probe, all from refimpl.

A case function (``cases.py``) picks a layer pair and its parameters and hands them to
:func:`foldable_vector` or :func:`verdict_vector`; the registry adds the format tag, the name and
the description. Expected values come from refimpl's fold functions in float64, the probe output
from the float64 reference ops, and every value is checked before it is written: the folded layer
must reproduce the unfused pair on the probe, and a bit-exact expected value must not lie within
the float64 fold's error bound of a rounding midpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..tolerance import SAFETY, error_bound
from .encoding import VERDICTS, encode_bn, encode_magnitude, encode_tensor
from .layers import (
    N_WEIGHT,
    bias_rounding_count,
    fold_magnitude,
    fold_pair,
    output_magnitude,
    reduction_length,
    unfused_output,
    verify_fold,
)
from .rounding import LOW_PRECISION, midpoint_distance, round_to_dtype, values_to_bits

__all__ = ["foldable_vector", "verdict_vector"]


def _inputs(weight: np.ndarray, bias: np.ndarray | None, bn: dict) -> dict:
    return {"weight": encode_tensor(weight), "bias": None if bias is None else encode_tensor(bias),
            "bn": encode_bn(bn)}


def _rounded(expected: np.ndarray, bound64: np.ndarray, dtype: str, what: str) -> dict:
    """The rounded tensor of ``expected``, refused when its correctly rounded value is ambiguous."""
    rounded = round_to_dtype(expected, dtype)
    if not np.all(np.isfinite(rounded)):
        raise ValueError(f"{what} overflows {dtype} after folding; pick other values")
    margins = np.array([midpoint_distance(float(v), dtype) for v in expected.ravel()]).reshape(expected.shape)
    if np.any(margins <= bound64):
        index = np.unravel_index(int(np.argmax(bound64 - margins)), expected.shape)
        raise ValueError(f"{what}{list(index)} = {expected[index]!r} lies within the float64 fold's "
                         f"error bound of a {dtype} rounding midpoint, so its correctly rounded value is ambiguous; "
                         "pick other values")
    encoded = encode_tensor(rounded)
    encoded["dtype"] = dtype
    encoded["bits"] = values_to_bits(rounded, dtype)
    return encoded


def _probe(fold: str, layer: dict, weight: np.ndarray, bias: np.ndarray | None, bn: dict,
           folded_weight: np.ndarray, magnitude_bias: np.ndarray, n_bias: int, x: np.ndarray) -> dict:
    """The unfused pair run on ``x`` by the reference ops, after checking the fold reproduces it."""
    check = verify_fold(fold, layer, weight, bias, bn, x)
    if not check.ok:
        raise ValueError("the folded layer does not reproduce the unfused pair on the probe: "
                         + check.describe("probe output"))
    # An implementation runs the folded layer in its own precision: its reduction, plus the errors
    # already in W' and b' (the reference output itself is exact or within float64 roundoff).
    return {"x": encode_tensor(x), "y": encode_tensor(unfused_output(fold, layer, weight, bias, bn, x)),
            "n": reduction_length(layer) + n_bias + 1,
            "magnitude": encode_magnitude(output_magnitude(layer, x, folded_weight, magnitude_bias))}


def foldable_vector(fold: str, layer: dict, weight: np.ndarray, bias: np.ndarray | None, bn: dict, dtype: str,
                    probe_x: np.ndarray | None = None) -> dict[str, Any]:
    """The vector of a layer pair that folds, every expected value computed with refimpl."""
    folded_weight, folded_bias = fold_pair(fold, layer, weight, bias, bn)
    magnitude_weight, magnitude_bias = fold_magnitude(fold, layer, weight, bias, bn)
    n_weight, n_bias = N_WEIGHT, bias_rounding_count(fold, layer)
    expected = {"verdict": "foldable", "weight": encode_tensor(folded_weight), "bias": encode_tensor(folded_bias)}
    tolerance: dict[str, Any]
    if dtype in LOW_PRECISION:
        expected["weight_rounded"] = _rounded(folded_weight, error_bound(magnitude_weight, n_weight, "float64"),
                                              dtype, "weight")
        expected["bias_rounded"] = _rounded(folded_bias, error_bound(magnitude_bias, n_bias, "float64"),
                                            dtype, "bias")
        tolerance = {"policy": "bit_exact", "dtype": dtype}
    else:
        tolerance = {"policy": "error_model", "dtype": dtype, "safety": SAFETY,
                     "weight": {"n": n_weight, "magnitude": encode_magnitude(magnitude_weight)},
                     "bias": {"n": n_bias, "magnitude": encode_magnitude(magnitude_bias)}}
    vector = {"fold": fold, "layer": layer, "storage_dtype": dtype, "inputs": _inputs(weight, bias, bn),
              "expected": expected, "tolerance": tolerance}
    if probe_x is not None:
        vector["probe"] = _probe(fold, layer, weight, bias, bn, folded_weight, magnitude_bias, n_bias, probe_x)
    return vector


def verdict_vector(fold: str, layer: dict, weight: np.ndarray, bias: np.ndarray | None, bn: dict, dtype: str,
                   verdict: str) -> dict[str, Any]:
    """The vector of a layer pair that must not be folded (or has invalid parameters)."""
    if verdict not in VERDICTS:
        raise ValueError(f"unknown verdict {verdict!r}; known: {sorted(VERDICTS)}")
    return {"fold": fold, "layer": layer, "storage_dtype": dtype, "inputs": _inputs(weight, bias, bn),
            "expected": {"verdict": verdict}, "tolerance": {"policy": "verdict"}}

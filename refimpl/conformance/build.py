"""Assembling a vector: expected values, tolerance policy and probe, all from refimpl.

A case function (``cases.py``, ``merge_cases.py``) picks a layer pair and its parameters and hands
them to :func:`foldable_vector` or :func:`verdict_vector`, or picks branches and hands them to
:func:`mergeable_vector` or :func:`merge_verdict_vector`; the registry adds the format tag, the name
and the description. Expected values come from refimpl's fold functions or its kernel algebra in
float64, the probe output from the float64 reference ops, and every value is checked before it is
written: the folded (merged) layer must reproduce the unfused pair (the branches) on the probe, a
bit-exact expected value must not lie within the float64 result's error bound of a rounding
midpoint, and a refusal must be refimpl's own.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..tolerance import SAFETY, error_bound
from .branches import (
    merge_branches,
    merge_magnitude,
    merge_verdict,
    merged_layer,
    probe_magnitude,
    probe_roundings,
    run_branches,
    verify_merge,
)
from .encoding import MERGE, VERDICTS, encode_bn, encode_magnitude, encode_merge_inputs, encode_tensor
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

__all__ = ["foldable_vector", "verdict_vector", "mergeable_vector", "merge_verdict_vector"]


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


def _expected(weight: np.ndarray, bias: np.ndarray, magnitude_weight: np.ndarray, magnitude_bias: np.ndarray,
              n_weight: int, n_bias: int, dtype: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The expected weight and bias (rounded once for float16/bfloat16) and the tolerance that judges them."""
    expected = {"weight": encode_tensor(weight), "bias": encode_tensor(bias)}
    if dtype in LOW_PRECISION:
        expected["weight_rounded"] = _rounded(weight, error_bound(magnitude_weight, n_weight, "float64"), dtype,
                                              "weight")
        expected["bias_rounded"] = _rounded(bias, error_bound(magnitude_bias, n_bias, "float64"), dtype, "bias")
        return expected, {"policy": "bit_exact", "dtype": dtype}
    return expected, {"policy": "error_model", "dtype": dtype, "safety": SAFETY,
                      "weight": {"n": n_weight, "magnitude": encode_magnitude(magnitude_weight)},
                      "bias": {"n": n_bias, "magnitude": encode_magnitude(magnitude_bias)}}


def foldable_vector(fold: str, layer: dict, weight: np.ndarray, bias: np.ndarray | None, bn: dict, dtype: str,
                    probe_x: np.ndarray | None = None) -> dict[str, Any]:
    """The vector of a layer pair that folds, every expected value computed with refimpl."""
    folded_weight, folded_bias = fold_pair(fold, layer, weight, bias, bn)
    magnitude_weight, magnitude_bias = fold_magnitude(fold, layer, weight, bias, bn)
    n_weight, n_bias = N_WEIGHT, bias_rounding_count(fold, layer)
    expected, tolerance = _expected(folded_weight, folded_bias, magnitude_weight, magnitude_bias, n_weight, n_bias,
                                    dtype)
    expected = {"verdict": "foldable", **expected}
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


def mergeable_vector(inputs: dict, dtype: str, probe_x: np.ndarray) -> dict[str, Any]:
    """The vector of branches that merge into one layer, every expected value computed with refimpl.

    ``inputs`` as :func:`.branches.merge_inputs` builds them (every value representable in ``dtype``).
    """
    merged = merge_branches(inputs)
    magnitude = merge_magnitude(inputs)
    layer = merged_layer(merged.kernel, inputs["dims"])
    expected, tolerance = _expected(merged.kernel.weight, merged.kernel.bias, magnitude.weight, magnitude.bias,
                                    merged.n_weight, merged.n_bias, dtype)
    check = verify_merge(inputs, probe_x)
    if not check.ok:
        raise ValueError("the merged layer does not reproduce the branches on the probe: "
                         + check.describe("probe output"))
    probe = {"x": encode_tensor(probe_x), "y": encode_tensor(run_branches(inputs, probe_x)),
             "n": probe_roundings(inputs, merged, layer),
             "magnitude": encode_magnitude(probe_magnitude(layer, probe_x, magnitude))}
    return {"fold": MERGE, "storage_dtype": dtype, "inputs": encode_merge_inputs(inputs),
            "expected": {"verdict": "mergeable", "layer": layer, **expected}, "tolerance": tolerance, "probe": probe}


def merge_verdict_vector(inputs: dict, dtype: str, verdict: str) -> dict[str, Any]:
    """The vector of branches that must not be merged; refimpl must refuse them with ``verdict``."""
    if verdict not in VERDICTS or not verdict.startswith("not_mergeable: "):
        raise ValueError(f"unknown merge verdict {verdict!r}; known: "
                         f"{sorted(v for v in VERDICTS if v.startswith('not_mergeable: '))}")
    refimpl_says = merge_verdict(inputs)
    if refimpl_says != verdict:
        raise ValueError(f"refimpl's verdict on these branches is {refimpl_says!r}, not {verdict!r}")
    return {"fold": MERGE, "storage_dtype": dtype, "inputs": encode_merge_inputs(inputs),
            "expected": {"verdict": verdict}, "tolerance": {"policy": "verdict"}}

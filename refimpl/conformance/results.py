"""refimpl's own answers to the vectors: a working example of the results format."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..fold import bn_scale_shift
from .branches import layer_geometry, merge_branches, merge_verdict, merged_layer
from .encoding import MERGE, RESULTS_FORMAT, decode_bn, decode_merge_inputs, decode_tensor
from .layers import apply_layer, fold_pair, in_channels, out_channels
from .rounding import LOW_PRECISION, round_to_dtype, values_to_bits

__all__ = ["judge_verdict", "reference_results"]


def judge_verdict(vector: dict) -> str:
    """refimpl's verdict on a vector's layer pair (or branches), decided from its layer and inputs alone."""
    if vector["fold"] == MERGE:
        return merge_verdict(decode_merge_inputs(vector["inputs"]))
    layer, fold, bn = vector["layer"], vector["fold"], decode_bn(vector["inputs"]["bn"])
    if not bn["track_running_stats"] or bn["running_mean"] is None or bn["running_var"] is None:
        return "not_foldable: no_running_stats"
    touched = out_channels(layer) if fold in ("conv_bn", "linear_bn") else in_channels(layer)
    if bn["running_var"].shape != (touched,):
        return "invalid: channel_mismatch"
    if np.any(bn["running_var"] < 0):
        return "invalid: negative_variance"
    if fold == "bn_conv" and layer["transposed"]:
        return "not_foldable: transposed_after_bn"
    if fold == "bn_conv" and layer["padding_mode"] == "zeros" and any(p > 0 for p in layer["padding"]):
        _, shift = bn_scale_shift(bn["running_mean"], bn["running_var"], bn["eps"], bn["weight"], bn["bias"])
        if np.any(shift != 0):
            return "not_foldable: zero_padding"
    return "foldable"


def _nested(a: np.ndarray) -> Any:
    """Nested lists of ``a``, with non-finite values as the strings the results format accepts."""
    if a.size and not np.all(np.isfinite(a)):
        return np.vectorize(lambda v: v if math.isfinite(v) else repr(v), otypes=[object])(a).tolist()
    return a.tolist()


def _bits(values: np.ndarray, dtype: str) -> Any:
    return np.reshape(np.array(values_to_bits(values, dtype)), values.shape).tolist()


def reference_results(vectors: dict[str, dict], implementation: str = "refimpl") -> dict:
    """A results file computed by refimpl: folds and merges in float64, rounds once to the storage dtype."""
    results = {}
    for name, vector in sorted(vectors.items()):
        verdict = judge_verdict(vector)
        if verdict not in ("foldable", "mergeable"):
            results[name] = {"verdict": verdict}
            continue
        inputs, dtype = vector["inputs"], vector["storage_dtype"]
        entry: dict[str, Any] = {"verdict": verdict}
        if vector["fold"] == MERGE:
            decoded = decode_merge_inputs(inputs)
            kernel = merge_branches(decoded).kernel
            layer = merged_layer(kernel, decoded["dims"])
            weight, bias = kernel.weight, kernel.bias
            entry["layer"] = layer_geometry(layer)
        else:
            layer = vector["layer"]
            weight, bias = fold_pair(vector["fold"], layer, decode_tensor(inputs["weight"]),
                                     decode_tensor(inputs["bias"]), decode_bn(inputs["bn"]))
        weight, bias = round_to_dtype(weight, dtype), round_to_dtype(bias, dtype)
        if dtype in LOW_PRECISION:
            entry["weight_bits"], entry["bias_bits"] = _bits(weight, dtype), _bits(bias, dtype)
        else:
            entry["weight"], entry["bias"] = _nested(weight), _nested(bias)
        if "probe" in vector:
            entry["output"] = _nested(apply_layer(layer, decode_tensor(vector["probe"]["x"]), weight, bias))
        results[name] = entry
    return {"format": RESULTS_FORMAT, "implementation": implementation, "results": results}

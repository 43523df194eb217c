"""Layer pairs described as vectors describe them, applied with the float64 reference ops.

A layer is a vector's ``layer`` entry (a dict: ``type`` "conv" or "linear" and ``torch.nn``'s
arguments), a BatchNorm its ``inputs.bn`` entry with the tensors decoded. This module runs the
unfused pair and the fold on them, and computes the error model's inputs: the magnitude of every
folded element (the fold run on absolute values) and the number of roundings behind it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import ops
from ..fold import fold_bn_conv, fold_bn_linear, fold_conv_bn, fold_linear_bn
from ..tolerance import Comparison, compare, error_bound

__all__ = ["FOLDS", "conv_layer", "linear_layer", "weight_shape", "out_channels", "in_channels",
           "reduction_length", "apply_layer", "apply_bn", "unfused_output", "fold_pair", "fold_magnitude",
           "N_WEIGHT", "bias_rounding_count", "output_magnitude", "verify_fold"]

#: The dataflow orders a vector's ``fold`` names: the layer before the BatchNorm, or after it.
FOLDS = ("conv_bn", "linear_bn", "bn_conv", "bn_linear")

# Roundings in the fold, per element (each contributes at most u): var + eps, sqrt, divide, multiply.
N_WEIGHT = 4
# The bias b * s + (beta - mu * s): the scale's 3 roundings, two products, a difference and a sum.
_N_BIAS_AFTER = 7


def conv_layer(dims: int, in_channels: int, out_channels: int, kernel: int | Sequence[int], *,
               stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1,
               groups: int = 1, transposed: bool = False, output_padding: int = 0, padding_mode: str = "zeros",
               bias: bool = True) -> dict:
    """A conv (or transposed conv) layer entry; an int size, stride, ... applies to every spatial dim."""
    def per_dim(value: int | Sequence[int]) -> list[int]:
        return [int(v) for v in value] if isinstance(value, Sequence) else [int(value)] * dims

    layer: dict[str, Any] = {
        "type": "conv", "dims": dims, "in_channels": in_channels, "out_channels": out_channels,
        "kernel_size": per_dim(kernel), "stride": per_dim(stride), "padding": per_dim(padding),
        "dilation": per_dim(dilation), "groups": groups, "transposed": transposed, "padding_mode": padding_mode,
        "bias": bias}
    if transposed:
        layer["output_padding"] = [output_padding] * dims
    return layer


def linear_layer(in_features: int, out_features: int, *, bias: bool = True) -> dict:
    """A linear layer entry."""
    return {"type": "linear", "in_features": in_features, "out_features": out_features, "bias": bias}


def weight_shape(layer: dict) -> tuple[int, ...]:
    """The layer's weight shape in torch's layout (transposed convs: input channels first)."""
    if layer["type"] == "linear":
        return (layer["out_features"], layer["in_features"])
    if layer["transposed"]:
        return (layer["in_channels"], layer["out_channels"] // layer["groups"], *layer["kernel_size"])
    return (layer["out_channels"], layer["in_channels"] // layer["groups"], *layer["kernel_size"])


def out_channels(layer: dict) -> int:
    return int(layer["out_features"] if layer["type"] == "linear" else layer["out_channels"])


def in_channels(layer: dict) -> int:
    return int(layer["in_features"] if layer["type"] == "linear" else layer["in_channels"])


def reduction_length(layer: dict) -> int:
    """Terms summed into one output element of the layer."""
    if layer["type"] == "linear":
        return int(layer["in_features"])
    # A transposed conv sums at most in/groups * prod(kernel) taps into an output element, like a conv.
    return layer["in_channels"] // layer["groups"] * math.prod(layer["kernel_size"])


def apply_layer(layer: dict, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Run the layer described by ``layer`` (a vector's ``layer`` entry) on ``x`` in float64."""
    if layer["type"] == "linear":
        return ops.linear(x, weight, bias)
    if layer["transposed"]:
        return ops.conv_transpose(x, weight, bias, stride=layer["stride"], padding=layer["padding"],
                                  output_padding=layer["output_padding"], groups=layer["groups"],
                                  dilation=layer["dilation"])
    return ops.conv(x, weight, bias, stride=layer["stride"], padding=layer["padding"], dilation=layer["dilation"],
                    groups=layer["groups"], padding_mode=layer["padding_mode"])


def apply_bn(bn: dict, x: np.ndarray) -> np.ndarray:
    """Eval-mode BatchNorm from a vector's ``inputs.bn`` entry (arrays already decoded), in float64."""
    return ops.batch_norm(x, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], eps=bn["eps"])


def unfused_output(fold: str, layer: dict, weight: Any, bias: Any, bn: dict, x: np.ndarray) -> np.ndarray:
    """The unfused pair (layer then BatchNorm, or BatchNorm then layer) run on ``x`` in float64."""
    if fold in ("conv_bn", "linear_bn"):
        return apply_bn(bn, apply_layer(layer, x, weight, bias))
    return apply_layer(layer, apply_bn(bn, x), weight, bias)


def fold_pair(fold: str, layer: dict, weight: Any, bias: Any, bn: dict) -> tuple[Any, Any]:
    """Fold the pair with refimpl's fold function for ``fold`` (in the dtype and namespace given)."""
    args = (weight, bias, bn["running_mean"], bn["running_var"], bn["eps"], bn["weight"], bn["bias"])
    if fold == "conv_bn":
        return fold_conv_bn(*args, transposed=layer["transposed"], groups=layer["groups"])
    if fold == "linear_bn":
        return fold_linear_bn(*args)
    if fold == "bn_conv":
        return fold_bn_conv(*args, groups=layer["groups"])
    if fold == "bn_linear":
        return fold_bn_linear(*args)
    raise ValueError(f"unknown fold kind {fold!r}; known: {', '.join(FOLDS)}")


def fold_magnitude(fold: str, layer: dict, weight: Any, bias: Any, bn: dict) -> tuple[Any, Any]:
    """Sum of absolute values of every term of each folded element: the fold run on absolute values.

    With gamma -> |gamma|, beta -> |beta| and mu -> -|mu| the scale becomes |s| and the shift
    beta - mu * s becomes |beta| + |mu| |s|, so the same refimpl function yields the magnitude.
    """
    absolute = dict(bn)
    absolute["running_mean"] = -np.abs(bn["running_mean"])
    absolute["weight"] = None if bn["weight"] is None else np.abs(bn["weight"])
    absolute["bias"] = None if bn["bias"] is None else np.abs(bn["bias"])
    return fold_pair(fold, layer, np.abs(weight), None if bias is None else np.abs(bias), absolute)


def bias_rounding_count(fold: str, layer: dict) -> int:
    """Roundings behind one folded bias element (the ``n`` of its error bound)."""
    if fold in ("conv_bn", "linear_bn"):
        return _N_BIAS_AFTER
    # b + sum_k W_k t_k: the reduction, the shift's own roundings, and the final sum.
    return math.prod(weight_shape(layer)[1:]) + _N_BIAS_AFTER


def output_magnitude(layer: dict, x: np.ndarray, folded_weight: Any, magnitude_bias: Any) -> np.ndarray:
    """Magnitude of each output element of the folded layer on ``x``."""
    # |s| conv(|x|, |W|) = conv(|x|, |W'|), so this bounds the terms of the unfused pair as well.
    magnitude = apply_layer(layer, np.abs(x), np.abs(folded_weight), None)
    return magnitude + np.reshape(magnitude_bias, (1, -1) + (1,) * (magnitude.ndim - 2))


def verify_fold(fold: str, layer: dict, weight: Any, bias: Any, bn: dict, x: np.ndarray) -> Comparison:
    """Run the unfused pair and the folded layer on ``x`` with the float64 reference ops and compare
    them under the float64 error model; return the :class:`~refimpl.tolerance.Comparison`.

    Both runs round: the folded one through its reduction and the fold's own roundings, the
    unfused one through its reduction and the BatchNorm, hence ``n = 2 K + n_bias + 4``.
    """
    folded_weight, folded_bias = fold_pair(fold, layer, weight, bias, bn)
    _, magnitude_bias = fold_magnitude(fold, layer, weight, bias, bn)
    magnitude = output_magnitude(layer, x, folded_weight, magnitude_bias)
    n = 2 * reduction_length(layer) + bias_rounding_count(fold, layer) + 4
    return compare(apply_layer(layer, x, folded_weight, folded_bias), unfused_output(fold, layer, weight, bias, bn, x),
                   error_bound(magnitude, n, "float64"))

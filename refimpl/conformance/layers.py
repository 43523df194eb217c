"""Layer pairs described as vectors describe them, applied with the float64 reference ops.

A layer is a vector's ``layer`` entry (a dict: ``type`` "conv" or "linear" and ``torch.nn``'s
arguments), a BatchNorm its ``inputs.bn`` entry with the tensors decoded. This module runs the
unfused pair and the fold on them, and computes the error model's inputs: the magnitude of every
folded element (the fold run on absolute values) and the number of roundings behind it. What a layer
kind is (weight layout, channel counts, reduction length) and which refimpl function folds a pair come
from :mod:`refimpl.layers`, the one table for every caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import ops
from ..layers import CONV, CONV_TRANSPOSE, LINEAR, NORM_AFTER, NORM_BEFORE, Fold, LayerKind, fold_for
from ..tolerance import Comparison, compare, error_bound

__all__ = ["FOLDS", "conv_layer", "linear_layer", "layer_kind", "vector_fold", "weight_shape", "out_channels",
           "in_channels", "reduction_length", "apply_layer", "apply_bn", "unfused_output", "fold_pair",
           "fold_magnitude", "N_WEIGHT", "bias_rounding_count", "output_magnitude", "verify_fold"]

#: The dataflow orders a vector's ``fold`` names, each with the position of its BatchNorm (refimpl.layers): after
#: the layer (``conv_bn``: the conv's output feeds the norm), or before it.
#: Each name also says the layer's ``type`` (a transposed conv is a ``conv`` with ``transposed`` set).
_FOLD_NAMES = {"conv_bn": ("conv", NORM_AFTER), "linear_bn": ("linear", NORM_AFTER), "bn_conv": ("conv", NORM_BEFORE),
               "bn_linear": ("linear", NORM_BEFORE)}
FOLDS = tuple(_FOLD_NAMES)

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


def layer_kind(layer: dict) -> LayerKind:
    """The :class:`~refimpl.layers.LayerKind` of a vector's ``layer`` entry."""
    if layer["type"] == "linear":
        return LINEAR
    if layer["type"] == "conv":
        return CONV_TRANSPOSE if layer["transposed"] else CONV
    raise ValueError(f"unknown layer type {layer['type']!r}; known: conv, linear")


def _groups(layer: dict) -> int:
    return 1 if layer["type"] == "linear" else int(layer["groups"])


def weight_shape(layer: dict) -> tuple[int, ...]:
    """The layer's weight shape in torch's layout (transposed convs: input channels first)."""
    if layer["type"] == "linear":
        return LINEAR.weight_shape(layer["in_features"], layer["out_features"])
    return layer_kind(layer).weight_shape(layer["in_channels"], layer["out_channels"], layer["kernel_size"],
                                          groups=layer["groups"])


def out_channels(layer: dict) -> int:
    return layer_kind(layer).out_channels(weight_shape(layer), _groups(layer))


def in_channels(layer: dict) -> int:
    return layer_kind(layer).in_channels(weight_shape(layer), _groups(layer))


def reduction_length(layer: dict) -> int:
    """Terms summed into one output element of the layer."""
    return layer_kind(layer).reduction_length(weight_shape(layer), _groups(layer))


def vector_fold(fold: str, layer: dict) -> Fold:
    """The refimpl fold a vector's ``fold`` name stands for on its ``layer``; ValueError when the name is unknown
    or does not fit the layer (``linear_bn`` on a conv, ``bn_conv`` on a transposed conv)."""
    if fold not in _FOLD_NAMES:
        raise ValueError(f"unknown fold kind {fold!r}; known: {', '.join(FOLDS)}")
    layer_type, position = _FOLD_NAMES[fold]
    if layer["type"] != layer_type:
        raise ValueError(f"fold {fold!r} takes a {layer_type} layer, got a {layer['type']} layer")
    return fold_for(layer_kind(layer), position)


def apply_layer(layer: dict, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Run the layer described by ``layer`` (a vector's ``layer`` entry) on ``x`` in float64."""
    kind = layer_kind(layer)
    if kind is LINEAR:
        return ops.linear(x, weight, bias)
    if kind is CONV_TRANSPOSE:
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
    if vector_fold(fold, layer).position == NORM_AFTER:
        return apply_bn(bn, apply_layer(layer, x, weight, bias))
    return apply_layer(layer, apply_bn(bn, x), weight, bias)


def fold_pair(fold: str, layer: dict, weight: Any, bias: Any, bn: dict) -> tuple[Any, Any]:
    """Fold the pair with refimpl's fold function for ``fold`` (in the dtype and namespace given)."""
    return vector_fold(fold, layer)(weight, bias, bn["running_mean"], bn["running_var"], bn["eps"], bn["weight"],
                                    bn["bias"], groups=_groups(layer))


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
    if vector_fold(fold, layer).position == NORM_AFTER:
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

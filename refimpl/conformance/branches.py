"""Branches as merge vectors describe them: run with the float64 reference ops, merged with refimpl's kernel algebra.

A merge vector's ``inputs`` (tensors decoded) describe an expression of one input ``x``::

    y = after(sum over branches b of coefficient_b * ops_b(x))

``dims`` is the number of spatial dims of ``x`` (0: ``x`` is ``(N, in_channels)`` features and the
layers are linear) and ``in_channels`` its channel count. Each branch applies its ``ops`` in order
(no ops: ``x`` itself) and ``after`` is applied to the sum. An op is one of

- ``{"op": "layer", "layer": L, "weight": W, "bias": b}``: a conv (not transposed) or linear layer,
  ``L`` a layer entry as in a fold vector, ``b`` null when the layer has none;
- ``{"op": "batch_norm", "bn": B}``: an eval-mode BatchNorm, ``B`` as a fold vector's ``inputs.bn``;
- ``{"op": "avg_pool", "kernel_size", "stride", "padding", "count_include_pad", "divisor_override"}``:
  as ``torch.nn.AvgPoolNd`` (``ceil_mode=False``);
- ``{"op": "scale", "scale": s}``: multiplication by a constant, one value per channel (shape
  ``(C,)``) or one for all (shape ``()``).

This module runs the expression with the reference ops (a probe's expected output), merges it into
one layer with :class:`refimpl.Kernel`, :func:`refimpl.sum_kernels` and :func:`refimpl.chain_kernels`
(which refuse, with a reason, what is not exact), and computes the error model's inputs: the magnitude
of every merged element (the merge run on absolute values) and the roundings behind it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import ops
from ..merge import ConvGeometry, Kernel, MergeError, avg_pool_geometry, chain_kernels, sum_kernels
from ..tolerance import Comparison, compare, error_bound
from .layers import N_WEIGHT, apply_bn, apply_layer, conv_layer, linear_layer, out_channels, reduction_length

__all__ = ["OPS", "layer_op", "bn_op", "avg_pool_op", "scale_op", "branch", "merge_inputs", "MergedKernel",
           "merge_branches", "merge_magnitude", "merge_verdict", "merged_layer", "GEOMETRY_KEYS", "layer_geometry",
           "run_branches", "reference_roundings", "probe_roundings", "probe_magnitude", "verify_merge"]

#: The ops a branch may hold.
OPS = ("layer", "batch_norm", "avg_pool", "scale")

#: The entries of a merged conv's layer entry that a results file must reproduce exactly.
GEOMETRY_KEYS = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")

# Roundings of a BatchNorm folded into a bias (as in a fold vector): the scale's three, two products,
# a difference and a sum.
_N_BN_BIAS = 7
# Roundings of eval-mode BatchNorm run on a tensor: var + eps, sqrt, x - mu, divide, times gamma, plus beta.
_N_BN_RUN = 6

_LIKE = np.zeros(1)


# ---------------------------------------------------------------------------------------------
# Building inputs (the case functions use these)

def layer_op(layer: dict, weight: np.ndarray, bias: np.ndarray | None) -> dict:
    """A conv or linear layer with its parameters."""
    if layer.get("transposed"):
        raise ValueError("a merge branch cannot hold a transposed conv")
    if (bias is None) == bool(layer["bias"]):
        raise ValueError(f"layer entry says bias={layer['bias']} but the bias given is {bias!r}")
    return {"op": "layer", "layer": layer, "weight": weight, "bias": bias}


def bn_op(bn: dict) -> dict:
    """An eval-mode BatchNorm (a dict as a fold vector's ``inputs.bn``, arrays decoded)."""
    return {"op": "batch_norm", "bn": bn}


def avg_pool_op(dims: int, kernel: int, stride: int, padding: int, *, count_include_pad: bool = True) -> dict:
    """Average pooling with the same window, stride and padding in every spatial dim."""
    return {"op": "avg_pool", "kernel_size": [kernel] * dims, "stride": [stride] * dims, "padding": [padding] * dims,
            "count_include_pad": count_include_pad, "divisor_override": None}


def scale_op(scale: Any) -> dict:
    """Multiplication by a constant: one value per channel, or one value."""
    return {"op": "scale", "scale": np.asarray(scale, dtype=np.float64)}


def branch(*branch_ops: dict, coefficient: float = 1.0) -> dict:
    """One branch: its ops in order (none: the input itself), and its coefficient in the sum."""
    return {"coefficient": float(coefficient), "ops": list(branch_ops)}


def merge_inputs(dims: int, in_channels: int, branches: list[dict], after: tuple[dict, ...] = ()) -> dict:
    """A merge vector's ``inputs``: the input's spatial dims and channels, the branches, the ops after the sum."""
    return {"dims": dims, "in_channels": in_channels, "branches": branches, "after": list(after)}


# ---------------------------------------------------------------------------------------------
# Merging

@dataclass(frozen=True)
class MergedKernel:
    """An expression merged into one kernel, with the roundings behind each element of its weight and bias."""

    kernel: Kernel
    n_weight: int
    n_bias: int


def _layer_kernel(op: dict) -> Kernel:
    layer, weight = op["layer"], op["weight"]
    bias = op["bias"] if op["bias"] is not None else np.zeros(out_channels(layer))
    if layer["type"] == "linear":
        return Kernel(weight, bias, ConvGeometry.pointwise(0), 1)
    geometry = ConvGeometry(tuple(layer["kernel_size"]), tuple(layer["stride"]), tuple(layer["padding"]),
                            tuple(layer["dilation"]), layer["padding_mode"])
    return Kernel(weight, bias, geometry, layer["groups"])


def _pool_geometry(op: dict) -> ConvGeometry:
    return avg_pool_geometry(op["kernel_size"], op["stride"], op["padding"],
                             count_include_pad=op["count_include_pad"], divisor_override=op["divisor_override"])


def _apply(op: dict, current: MergedKernel | None, channels: int, dims: int) -> MergedKernel:
    """``op`` applied after ``current`` (None: the input itself, with ``channels`` channels)."""
    kind = op["op"]
    if kind in ("batch_norm", "scale"):
        base = current or MergedKernel(Kernel.identity(channels, dims, like=_LIKE), 0, 0)
        if kind == "scale":
            return MergedKernel(base.kernel.scaled(op["scale"]), base.n_weight + 1, base.n_bias + 1)
        bn = op["bn"]
        kernel = base.kernel.batch_norm(bn["running_mean"], bn["running_var"], bn["eps"], bn["weight"], bn["bias"])
        return MergedKernel(kernel, base.n_weight + N_WEIGHT, base.n_bias + _N_BN_BIAS)
    if kind == "layer":
        step, n_step = _layer_kernel(op), 0
    elif kind == "avg_pool":
        width = current.kernel.out_channels if current else channels
        step, n_step = Kernel.avg_pool(width, _pool_geometry(op), divisor=op["divisor_override"], like=_LIKE), 1
    else:
        raise ValueError(f"unknown op {kind!r}; known: {', '.join(OPS)}")
    if current is None:
        if step.in_channels != channels:
            raise MergeError("channels_mismatch", f"a layer reading {step.in_channels} channels reads the input, "
                             f"which has {channels}")
        return MergedKernel(step, n_step, 0)
    chained = chain_kernels(step, current.kernel)
    # compose_kernels: each weight a sum of M products over the mid channels of a group; each bias the
    # outer kernel summed over its taps, then M products with the inner bias, then the outer bias.
    mid = step.in_channels // chained.groups
    taps = math.prod(step.geometry.kernel_size)
    return MergedKernel(chained, max(n_step, current.n_weight) + mid,
                          max(n_step + taps, current.n_bias) + mid + 1)


def merge_branches(inputs: dict) -> MergedKernel:
    """The expression of ``inputs`` merged into one kernel in float64, with refimpl's kernel algebra.

    Raises :class:`refimpl.MergeError` (with a reason) when the merge is not exact.
    """
    dims, channels = inputs["dims"], inputs["in_channels"]
    terms = []
    for each in inputs["branches"]:
        current = None
        for op in each["ops"]:
            current = _apply(op, current, channels, dims)
        terms.append(current or MergedKernel(Kernel.identity(channels, dims, like=_LIKE), 0, 0))
    kernel = sum_kernels([t.kernel for t in terms], [each["coefficient"] for each in inputs["branches"]])
    # add_branches: each term times its coefficient, then summed in turn; biases summed from zero.
    count = len(terms)
    merged = MergedKernel(kernel, max(t.n_weight for t in terms) + count, max(t.n_bias for t in terms) + count + 1)
    for op in inputs["after"]:
        merged = _apply(op, merged, channels, dims)
    if merged.kernel.regroupable:
        raise ValueError("the branches hold no conv or linear layer to merge into")
    return merged


def _absolute_op(op: dict) -> dict:
    out = dict(op)
    if op["op"] == "layer":
        out["weight"], out["bias"] = np.abs(op["weight"]), None if op["bias"] is None else np.abs(op["bias"])
    elif op["op"] == "batch_norm":
        bn = dict(op["bn"])
        bn["running_mean"] = -np.abs(bn["running_mean"])
        bn["weight"] = None if bn["weight"] is None else np.abs(bn["weight"])
        bn["bias"] = None if bn["bias"] is None else np.abs(bn["bias"])
        out["bn"] = bn
    elif op["op"] == "scale":
        out["scale"] = np.abs(op["scale"])
    return out


def merge_magnitude(inputs: dict) -> Kernel:
    """The sum of the absolute values of every term of each merged element: the merge run on absolute values.

    With ``|W|``, ``|b|``, ``|gamma|``, ``|beta|``, ``-|mu|``, ``|scale|`` and ``|coefficient|`` every
    product and sum of the merge becomes a sum of absolute values (as :func:`.layers.fold_magnitude`).
    """
    absolute = dict(inputs)
    absolute["branches"] = [{"coefficient": abs(each["coefficient"]), "ops": [_absolute_op(op) for op in each["ops"]]}
                            for each in inputs["branches"]]
    absolute["after"] = [_absolute_op(op) for op in inputs["after"]]
    return merge_branches(absolute).kernel


def merge_verdict(inputs: dict) -> str:
    """refimpl's verdict on the branches: "mergeable", or "not_mergeable: <reason>"."""
    try:
        merge_branches(inputs)
    except MergeError as error:
        return f"not_mergeable: {error.reason}"
    return "mergeable"


def merged_layer(kernel: Kernel, dims: int) -> dict:
    """The layer entry of the merged layer (always with a bias)."""
    if dims == 0:
        return linear_layer(kernel.in_channels, kernel.out_channels)
    g = kernel.geometry
    return conv_layer(dims, kernel.in_channels, kernel.out_channels, g.kernel_size, stride=g.stride,
                      padding=g.padding, dilation=g.dilation, groups=kernel.groups, padding_mode=g.padding_mode)


def layer_geometry(layer: dict) -> dict:
    """The entries of a conv layer entry that place its taps and group its channels (empty for a linear layer)."""
    return {key: layer[key] for key in GEOMETRY_KEYS} if layer["type"] == "conv" else {}


# ---------------------------------------------------------------------------------------------
# Running the branches, and the error model of a probe

def _run_op(op: dict, x: np.ndarray) -> np.ndarray:
    kind = op["op"]
    if kind == "layer":
        return apply_layer(op["layer"], x, op["weight"], op["bias"])
    if kind == "batch_norm":
        return apply_bn(op["bn"], x)
    if kind == "avg_pool":
        return ops.avg_pool(x, op["kernel_size"], op["stride"], op["padding"], False, op["count_include_pad"],
                            op["divisor_override"])
    if kind == "scale":
        scale = op["scale"]
        return x * (scale if scale.ndim == 0 else np.reshape(scale, (1, -1) + (1,) * (x.ndim - 2)))
    raise ValueError(f"unknown op {kind!r}; known: {', '.join(OPS)}")


def run_branches(inputs: dict, x: np.ndarray) -> np.ndarray:
    """The expression of ``inputs`` run on ``x`` with the float64 reference ops, branch by branch."""
    total = None
    for each in inputs["branches"]:
        y = x
        for op in each["ops"]:
            y = _run_op(op, y)
        term = each["coefficient"] * y
        total = term if total is None else total + term
    assert total is not None, "a merge has at least one branch"
    for op in inputs["after"]:
        total = _run_op(op, total)
    return total


def _op_roundings(op: dict) -> int:
    """Roundings one op adds to an element when run on a tensor with the reference ops."""
    kind = op["op"]
    if kind == "layer":
        return reduction_length(op["layer"]) + 1
    if kind == "batch_norm":
        return _N_BN_RUN
    if kind == "avg_pool":
        return math.prod(op["kernel_size"]) + 1
    return 1


def reference_roundings(inputs: dict) -> int:
    """Roundings behind an element of :func:`run_branches`' output: the longest branch, its
    coefficient, the sum of the branches, and the ops after it."""
    longest = max(sum(_op_roundings(op) for op in each["ops"]) for each in inputs["branches"])
    return longest + 1 + len(inputs["branches"]) + sum(_op_roundings(op) for op in inputs["after"])


def probe_roundings(inputs: dict, merged: MergedKernel, layer: dict) -> int:
    """``n`` of a probe: the merged layer's reduction and bias, the roundings already in its weight and
    bias, and those of the float64 reference run of the branches it is compared with."""
    return reduction_length(layer) + 1 + max(merged.n_weight, merged.n_bias) + reference_roundings(inputs)


def probe_magnitude(layer: dict, x: np.ndarray, magnitude: Kernel) -> np.ndarray:
    """Magnitude of each output element: the merged magnitudes run on ``|x|``. It bounds the terms of the
    merged layer and of every branch (each is a part of the merge on absolute values)."""
    output = apply_layer(layer, np.abs(x), magnitude.weight, None)
    return output + np.reshape(magnitude.bias, (1, -1) + (1,) * (output.ndim - 2))


def verify_merge(inputs: dict, x: np.ndarray) -> Comparison:
    """Run the branches and the merged layer on ``x`` with the float64 reference ops and compare them
    under the float64 error model; return the :class:`~refimpl.tolerance.Comparison`."""
    merged = merge_branches(inputs)
    layer = merged_layer(merged.kernel, inputs["dims"])
    bound = error_bound(probe_magnitude(layer, x, merge_magnitude(inputs)), probe_roundings(inputs, merged, layer),
                        "float64")
    return compare(apply_layer(layer, x, merged.kernel.weight, merged.kernel.bias), run_branches(inputs, x), bound)

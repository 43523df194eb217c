"""The vector file format: format tags, verdicts, tensors as JSON, and deterministic JSON text.

A tensor is ``{"shape": [...], "data": [...]}`` with ``data`` flat in row-major order and every
float written in Python's shortest round-trip form (``spec/conformance.md``, "Vector file").
"""

from __future__ import annotations

import json
import math
from typing import Any, overload

import numpy as np

__all__ = ["FORMAT", "MANIFEST_FORMAT", "RESULTS_FORMAT", "VERDICTS", "MERGE", "positive_verdict", "encode_tensor",
           "decode_tensor", "encode_magnitude", "encode_bn", "decode_bn", "encode_merge_inputs", "decode_merge_inputs",
           "dumps"]

#: Format tags written into every vector file and expected in every results file.
FORMAT = "bnfold-conformance-vector/1"
MANIFEST_FORMAT = "bnfold-conformance-manifest/1"
RESULTS_FORMAT = "bnfold-conformance-results/1"

#: Every verdict a case may expect. "foldable" (a fold) or "mergeable" (a merge) is implied by a case with
#: expected weights.
VERDICTS = {
    "foldable": "the BatchNorm folds exactly into the layer",
    "mergeable": "the branches merge exactly into one layer",
    "not_foldable: zero_padding": "BatchNorm before a zero-padded conv with a nonzero shift: the padding zeros "
                                  "enter after the BatchNorm, so the folded conv is wrong at the borders",
    "not_foldable: transposed_after_bn": "BatchNorm before a transposed conv: the number of taps reaching an output "
                                         "position varies, so the shift is not a per-channel constant",
    "not_foldable: no_running_stats": "BatchNorm without running statistics normalises with batch statistics, "
                                      "even in eval mode",
    "invalid: negative_variance": "a running variance is negative: no real scale exists",
    "invalid: channel_mismatch": "the BatchNorm's channel count differs from the layer's channels it touches",
    "not_mergeable: stride_mismatch": "the branches have different strides",
    "not_mergeable: dilation_mismatch": "branches with kernels larger than 1 have different dilations",
    "not_mergeable: padding_misaligned": "a smaller kernel centred in the largest would not read the positions its "
                                         "branch reads (kernel sizes differing by an odd number of taps, or padding "
                                         "other than the merged padding minus the centring offset)",
    "not_mergeable: padding_mode_mismatch": "the branches that pad use different padding modes",
    "not_mergeable: zero_padding": "a chain's pointwise layer has a constant term that a tap of the zero-padded "
                                   "layer after it reads in the padding: the merged conv would see it instead of 0",
    "not_mergeable: sequential_unsupported": "a chain of two layers neither of which is pointwise (kernel 1, "
                                             "stride 1, no padding)",
    "not_mergeable: unsupported_layer": "a branch holds a layer that is no convolution, such as an average pool "
                                        "whose divisor changes at the borders (count_include_pad=False with padding)",
}

#: A vector's ``fold`` entry for a merge of branches (the BatchNorm folds name their dataflow order).
MERGE = "merge"


def positive_verdict(vector: dict) -> str:
    """The verdict of a vector's case when it has expected weights: "mergeable" for a merge, else "foldable"."""
    return "mergeable" if vector["fold"] == MERGE else "foldable"

#: The tensors of a vector's ``inputs.bn`` entry (each may be null).
BN_TENSORS = ("running_mean", "running_var", "weight", "bias")


def encode_tensor(a: Any) -> dict:
    """``{"shape", "data"}`` of a finite float64 array."""
    a = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"a vector tensor must be finite, got {a!r}")
    return {"shape": list(a.shape), "data": [float(v) for v in a.ravel()]}


@overload
def decode_tensor(t: dict) -> np.ndarray: ...
@overload
def decode_tensor(t: None) -> None: ...
def decode_tensor(t: dict | None) -> np.ndarray | None:
    """The float64 array of an encoded tensor (``None`` for a null entry).

    >>> decode_tensor({"shape": [2, 1], "data": [0.5, -1.0]}).tolist(), decode_tensor(None)
    ([[0.5], [-1.0]], None)
    """
    if t is None:
        return None
    return np.asarray(t["data"], dtype=np.float64).reshape(t["shape"])


def encode_magnitude(a: Any) -> dict:
    """Encode a magnitude rounded *up* to 8 significant bits: still a valid bound, and independent
    of the summation order of the BLAS that computed it, so regenerated files match byte for byte."""
    mantissa, exponent = np.frexp(np.asarray(a, dtype=np.float64))
    return encode_tensor(np.ldexp(np.ceil(mantissa * 2.0**8) / 2.0**8, exponent))


def encode_bn(bn: dict) -> dict:
    """A BatchNorm description with its tensors (arrays or ``None``) encoded."""
    out = dict(bn)
    for key in BN_TENSORS:
        out[key] = None if bn[key] is None else encode_tensor(bn[key])
    return out


def decode_bn(bn: dict) -> dict:
    """A vector's ``inputs.bn`` entry with its tensors decoded to float64 arrays (or ``None``)."""
    out = dict(bn)
    for key in BN_TENSORS:
        out[key] = decode_tensor(bn[key])
    return out


def _map_op_tensors(op: dict, tensor: Any, bn: Any) -> dict:
    out = dict(op)
    if op["op"] == "layer":
        out["weight"], out["bias"] = tensor(op["weight"]), None if op["bias"] is None else tensor(op["bias"])
    elif op["op"] == "batch_norm":
        out["bn"] = bn(op["bn"])
    elif op["op"] == "scale":
        out["scale"] = tensor(op["scale"])
    return out


def _map_merge_inputs(inputs: dict, tensor: Any, bn: Any) -> dict:
    out = dict(inputs)
    out["branches"] = [{**branch, "ops": [_map_op_tensors(op, tensor, bn) for op in branch["ops"]]}
                       for branch in inputs["branches"]]
    out["after"] = [_map_op_tensors(op, tensor, bn) for op in inputs["after"]]
    return out


def encode_merge_inputs(inputs: dict) -> dict:
    """A merge vector's ``inputs`` (branches of ops, ops after the sum) with every tensor encoded."""
    return _map_merge_inputs(inputs, encode_tensor, encode_bn)


def decode_merge_inputs(inputs: dict) -> dict:
    """A merge vector's ``inputs`` with every tensor decoded to float64 arrays (or ``None``)."""
    return _map_merge_inputs(inputs, decode_tensor, decode_bn)


def dumps(obj: Any) -> str:
    """Deterministic JSON: sorted keys, two-space indent, lists of scalars on one line, floats in
    Python's shortest round-trip repr (so float64 values parse back exactly)."""
    def encode(value: Any, indent: str) -> str:
        if isinstance(value, dict):
            if not value:
                return "{}"
            inner = indent + "  "
            items = [f"{inner}{json.dumps(str(k))}: {encode(value[k], inner)}" for k in sorted(value)]
            return "{\n" + ",\n".join(items) + "\n" + indent + "}"
        if isinstance(value, (list, tuple)):
            if all(not isinstance(v, (dict, list, tuple)) for v in value):
                return "[" + ", ".join(encode(v, indent) for v in value) + "]"
            inner = indent + "  "
            return "[\n" + ",\n".join(inner + encode(v, inner) for v in value) + "\n" + indent + "]"
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"non-finite float {value!r} cannot be written to a vector file")
        return json.dumps(value, allow_nan=False)
    return encode(obj, "") + "\n"

"""Named conformance cases: language-neutral test vectors for other BatchNorm-folding implementations.

Each case is a small function, registered under a unique name by :func:`case`, that builds its
inputs from a fixed seed (or from hand-picked values) and computes the expected result with
``refimpl``: the fold functions in float64 for the folded weight and bias, the float64 reference
ops for the optional probe output, and the expected verdict for layers that must not be folded.
The function's docstring is the case's description. ``python -m refimpl vectors --out DIR``
writes one JSON file per case plus ``manifest.json``; ``python -m refimpl check VECTORS RESULTS``
judges another implementation's results file. The formats are documented in ``spec/conformance.md``.

Tolerance policies (stated again in the manifest):

``error_model``
    Parameters stored in float32 or float64. Element ``i`` passes when
    ``|actual - expected| <= SAFETY * (gamma_n + u) * magnitude[i]``, with ``u`` the storage
    dtype's unit roundoff and ``n``, ``magnitude`` stored in the vector (see :mod:`refimpl.tolerance`).
``bit_exact``
    Parameters stored in float16 or bfloat16. The expected value is the float64 fold rounded once,
    to nearest-even, to the storage dtype; the result must have exactly these bits. The generator
    refuses a case whose float64 fold lies so close to a rounding midpoint that its own error could
    flip the rounding, so the expected bits are those of the exact real-number fold.
``verdict``
    Layers that must not be folded (or whose parameters are invalid): the result is a verdict string.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import ops
from .fold import bn_scale_shift, fold_bn_conv, fold_bn_linear, fold_conv_bn, fold_linear_bn
from .tolerance import SAFETY, compare, error_bound, unit_roundoff

__all__ = [
    "CASES", "FORMAT", "RESULTS_FORMAT", "VECTORS_DIR", "VERDICTS", "case", "build_case", "build_all",
    "manifest", "dumps", "write_vectors", "load_vectors", "round_to_dtype", "bits_to_values",
    "judge_verdict", "reference_results", "verify_fold", "CaseOutcome", "check_results", "apply_layer", "apply_bn",
]

#: Format tags written into every vector file and expected in every results file.
FORMAT = "bnfold-conformance-vector/1"
MANIFEST_FORMAT = "bnfold-conformance-manifest/1"
RESULTS_FORMAT = "bnfold-conformance-results/1"

#: The committed vectors, when running from a source checkout.
VECTORS_DIR = Path(__file__).resolve().parent.parent / "spec" / "vectors"

#: Every verdict a case may expect. "foldable" is implied by a case with expected weights.
VERDICTS = {
    "foldable": "the BatchNorm folds exactly into the layer",
    "not_foldable: zero_padding": "BatchNorm before a zero-padded conv with a nonzero shift: the padding zeros "
                                  "enter after the BatchNorm, so the folded conv is wrong at the borders",
    "not_foldable: transposed_after_bn": "BatchNorm before a transposed conv: the number of taps reaching an output "
                                         "position varies, so the shift is not a per-channel constant",
    "not_foldable: no_running_stats": "BatchNorm without running statistics normalises with batch statistics, "
                                      "even in eval mode",
    "invalid: negative_variance": "a running variance is negative: no real scale exists",
    "invalid: channel_mismatch": "the BatchNorm's channel count differs from the layer's channels it touches",
}

#: Storage dtypes whose expected values must match bit for bit, with (precision p including the
#: implicit bit, minimum normal exponent, maximum exponent) of their IEEE-style binary format.
_LOW_PRECISION = {"float16": (11, -14, 15), "bfloat16": (8, -126, 127)}

# Roundings in the fold, per element (each contributes at most u): var + eps, sqrt, divide, multiply.
_N_WEIGHT = 4
# The bias b * s + (beta - mu * s): the scale's 3 roundings, two products, a difference and a sum.
_N_BIAS_AFTER = 7

CaseFunction = Callable[[], dict]
CASES: dict[str, CaseFunction] = {}


def case(name: str) -> Callable[[CaseFunction], CaseFunction]:
    """Register a case-building function under ``name`` (its docstring becomes the description)."""
    def register(function: CaseFunction) -> CaseFunction:
        if name in CASES:
            raise ValueError(f"conformance case name {name!r} is registered twice "
                             f"({CASES[name].__qualname__} and {function.__qualname__})")
        CASES[name] = function
        return function
    return register


# ---------------------------------------------------------------------------------------------
# Rounding to storage dtypes (numpy has no bfloat16, and casting float64 -> float32 -> bfloat16
# rounds twice, so the rounding is done here exactly, in integer arithmetic on the float64 value).

def _round_scalar(x: float, precision: int, emin: int, emax: int) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    exponent = max(math.frexp(x)[1] - 1, emin)
    quantum_exponent = exponent - (precision - 1)
    # Scaling by a power of two is exact; round() on a float rounds half to even, exactly.
    rounded = math.ldexp(float(round(math.ldexp(x, -quantum_exponent))), quantum_exponent)
    largest = math.ldexp(2.0 - math.ldexp(1.0, 1 - precision), emax)
    return math.copysign(math.inf, x) if abs(rounded) > largest else rounded


def _midpoint_distance(x: float, precision: int, emin: int) -> float:
    """Distance from ``x`` to the nearest rounding midpoint of the format (ties decide there)."""
    if x == 0:
        return math.ldexp(1.0, emin - precision)
    quantum_exponent = max(math.frexp(x)[1] - 1, emin) - (precision - 1)
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
    if dtype not in _LOW_PRECISION:
        raise ValueError(f"unknown storage dtype {dtype!r}; known: float64, float32, {', '.join(_LOW_PRECISION)}")
    p, emin, emax = _LOW_PRECISION[dtype]
    return np.array([_round_scalar(float(v), p, emin, emax) for v in a.ravel()], dtype=np.float64).reshape(a.shape)


def _values_to_bits(values: np.ndarray, dtype: str) -> list[str]:
    """Raw bits (hex strings) of values already representable in ``dtype``."""
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
    if dtype not in _LOW_PRECISION:
        raise ValueError(f"raw bits are defined for {sorted(_LOW_PRECISION)} only, not {dtype!r}")
    raw = np.vectorize(lambda s: int(s, 16), otypes=[np.uint32])(np.asarray(bits, dtype=object))
    if raw.size and int(raw.max()) > 0xFFFF:
        raise ValueError(f"{dtype} bits must be 16-bit values, got {hex(int(raw.max()))}")
    if dtype == "float16":
        return raw.astype(np.uint16).view(np.float16).astype(np.float64)
    return (raw << 16).astype(np.uint32).view(np.float32).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Applying layers with the float64 reference ops (for probes and for the verdict demonstrations).

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


def _reduction_length(layer: dict) -> int:
    if layer["type"] == "linear":
        return layer["in_features"]
    # A transposed conv sums at most in/groups * prod(kernel) taps into an output element, like a conv.
    return layer["in_channels"] // layer["groups"] * math.prod(layer["kernel_size"])


# ---------------------------------------------------------------------------------------------
# Encoding.

def _tensor(a: np.ndarray) -> dict:
    a = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"a vector tensor must be finite, got {a!r}")
    return {"shape": list(a.shape), "data": [float(v) for v in a.ravel()]}


def _decode(t: dict | None) -> np.ndarray | None:
    if t is None:
        return None
    return np.asarray(t["data"], dtype=np.float64).reshape(t["shape"])


def _magnitude(a: np.ndarray) -> dict:
    """Encode a magnitude rounded *up* to 8 significant bits: still a valid bound, and independent
    of the summation order of the BLAS that computed it, so regenerated files match byte for byte."""
    mantissa, exponent = np.frexp(np.asarray(a, dtype=np.float64))
    return _tensor(np.ldexp(np.ceil(mantissa * 2.0**8) / 2.0**8, exponent))


def _conv_layer(dims: int, in_channels: int, out_channels: int, kernel: int, *, stride: int = 1, padding: int = 0,
                dilation: int = 1, groups: int = 1, transposed: bool = False, output_padding: int = 0,
                padding_mode: str = "zeros", bias: bool = True) -> dict:
    layer = {"type": "conv", "dims": dims, "in_channels": in_channels, "out_channels": out_channels,
             "kernel_size": [kernel] * dims, "stride": [stride] * dims, "padding": [padding] * dims,
             "dilation": [dilation] * dims, "groups": groups, "transposed": transposed,
             "padding_mode": padding_mode, "bias": bias}
    if transposed:
        layer["output_padding"] = [output_padding] * dims
    return layer


def _weight_shape(layer: dict) -> tuple[int, ...]:
    if layer["type"] == "linear":
        return (layer["out_features"], layer["in_features"])
    if layer["transposed"]:
        return (layer["in_channels"], layer["out_channels"] // layer["groups"], *layer["kernel_size"])
    return (layer["out_channels"], layer["in_channels"] // layer["groups"], *layer["kernel_size"])


def _out_channels(layer: dict) -> int:
    return layer["out_features"] if layer["type"] == "linear" else layer["out_channels"]


def _in_channels(layer: dict) -> int:
    return layer["in_features"] if layer["type"] == "linear" else layer["in_channels"]


def _dyadic(rng: np.random.Generator, shape: tuple[int, ...], denominator: int = 8, high: int = 8) -> np.ndarray:
    """Small multiples of 1/denominator: sums of their products are exact in float64 in any order,
    so a probe output does not depend on how a BLAS orders its sums."""
    return rng.integers(-high, high + 1, size=shape).astype(np.float64) / denominator


def _random_bn(rng: np.random.Generator, channels: int, dtype: str, *, exact: bool = False) -> dict:
    """Running statistics and affine parameters; ``exact`` makes the BatchNorm dyadic (var + eps a
    power of 4, so s is a power of 2) so that BN followed by a conv is exact in float64."""
    eps = 2.0**-16 if exact else 1e-5
    if exact:
        var = 4.0 ** rng.integers(-2, 2, size=channels).astype(np.float64) - eps
        mean, gamma, beta = _dyadic(rng, (channels,), 4), _dyadic(rng, (channels,), 8), _dyadic(rng, (channels,), 4)
        gamma = np.where(gamma == 0, 1.0, gamma)
    else:
        var = rng.uniform(0.05, 4.0, channels)
        mean, gamma, beta = rng.normal(0, 1, channels), rng.uniform(0.25, 2.0, channels), rng.normal(0, 0.5, channels)
    return {"num_features": channels, "eps": eps, "affine": True, "track_running_stats": True,
            "running_mean": round_to_dtype(mean, dtype), "running_var": round_to_dtype(var, dtype),
            "weight": round_to_dtype(gamma, dtype), "bias": round_to_dtype(beta, dtype)}


def _encode_bn(bn: dict) -> dict:
    out = dict(bn)
    for key in ("running_mean", "running_var", "weight", "bias"):
        out[key] = None if bn[key] is None else _tensor(bn[key])
    return out


def _fold_args(fold: str, layer: dict, weight, bias, bn: dict):
    args = (weight, bias, bn["running_mean"], bn["running_var"], bn["eps"], bn["weight"], bn["bias"])
    if fold == "conv_bn":
        return fold_conv_bn, args, {"transposed": layer["transposed"], "groups": layer["groups"]}
    if fold == "linear_bn":
        return fold_linear_bn, args, {}
    if fold == "bn_conv":
        return fold_bn_conv, args, {"groups": layer["groups"]}
    if fold == "bn_linear":
        return fold_bn_linear, args, {}
    raise ValueError(f"unknown fold kind {fold!r}; known: conv_bn, linear_bn, bn_conv, bn_linear")


def _fold(fold: str, layer: dict, weight, bias, bn: dict):
    function, args, kwargs = _fold_args(fold, layer, weight, bias, bn)
    return function(*args, **kwargs)


def _fold_magnitude(fold: str, layer: dict, weight, bias, bn: dict):
    """Sum of absolute values of every term of each folded element: the fold run on absolute values.

    With gamma -> |gamma|, beta -> |beta| and mu -> -|mu| the scale becomes |s| and the shift
    beta - mu * s becomes |beta| + |mu| |s|, so the same refimpl function yields the magnitude.
    """
    absolute = dict(bn)
    absolute["running_mean"] = -np.abs(bn["running_mean"])
    absolute["weight"] = None if bn["weight"] is None else np.abs(bn["weight"])
    absolute["bias"] = None if bn["bias"] is None else np.abs(bn["bias"])
    return _fold(fold, layer, np.abs(weight), None if bias is None else np.abs(bias), absolute)


def _bias_rounding_count(fold: str, layer: dict) -> int:
    if fold in ("conv_bn", "linear_bn"):
        return _N_BIAS_AFTER
    # b + sum_k W_k t_k: the reduction, the shift's own roundings, and the final sum.
    return math.prod(_weight_shape(layer)[1:]) + _N_BIAS_AFTER


def _rounded(expected: np.ndarray, bound64: np.ndarray, dtype: str, what: str, name: str) -> dict:
    p, emin, _ = _LOW_PRECISION[dtype]
    rounded = round_to_dtype(expected, dtype)
    if not np.all(np.isfinite(rounded)):
        raise ValueError(f"case {name!r}: {what} overflows {dtype} after folding; pick other values")
    margins = np.array([_midpoint_distance(float(v), p, emin) for v in expected.ravel()]).reshape(expected.shape)
    if np.any(margins <= bound64):
        index = np.unravel_index(int(np.argmax(bound64 - margins)), expected.shape)
        raise ValueError(f"case {name!r}: {what}{list(index)} = {expected[index]!r} lies within the float64 fold's "
                         f"error bound of a {dtype} rounding midpoint, so its correctly rounded value is ambiguous; "
                         "pick other values")
    encoded = _tensor(rounded)
    encoded["dtype"] = dtype
    encoded["bits"] = _values_to_bits(rounded, dtype)
    return encoded


def _foldable_case(name: str, description: str, fold: str, layer: dict, weight: np.ndarray,
                   bias: np.ndarray | None, bn: dict, dtype: str, probe_x: np.ndarray | None = None) -> dict:
    """Assemble a vector for a layer pair that folds, computing every expected value with refimpl."""
    folded_weight, folded_bias = _fold(fold, layer, weight, bias, bn)
    magnitude_weight, magnitude_bias = _fold_magnitude(fold, layer, weight, bias, bn)
    n_weight, n_bias = _N_WEIGHT, _bias_rounding_count(fold, layer)
    expected = {"verdict": "foldable", "weight": _tensor(folded_weight), "bias": _tensor(folded_bias)}
    if dtype in _LOW_PRECISION:
        expected["weight_rounded"] = _rounded(folded_weight, error_bound(magnitude_weight, n_weight, "float64"),
                                              dtype, "weight", name)
        expected["bias_rounded"] = _rounded(folded_bias, error_bound(magnitude_bias, n_bias, "float64"),
                                            dtype, "bias", name)
        tolerance = {"policy": "bit_exact", "dtype": dtype}
    else:
        tolerance = {"policy": "error_model", "dtype": dtype, "safety": SAFETY,
                     "weight": {"n": n_weight, "magnitude": _magnitude(magnitude_weight)},
                     "bias": {"n": n_bias, "magnitude": _magnitude(magnitude_bias)}}
    vector = {"format": FORMAT, "name": name, "description": description, "fold": fold, "layer": layer,
              "storage_dtype": dtype,
              "inputs": {"weight": _tensor(weight), "bias": None if bias is None else _tensor(bias),
                         "bn": _encode_bn(bn)},
              "expected": expected, "tolerance": tolerance}
    if probe_x is not None:
        vector["probe"] = _probe(name, fold, layer, weight, bias, bn, folded_weight, magnitude_bias, n_bias,
                                 probe_x)
    return vector


def _unfused(fold: str, layer: dict, weight, bias, bn: dict, x: np.ndarray) -> np.ndarray:
    if fold in ("conv_bn", "linear_bn"):
        return apply_bn(bn, apply_layer(layer, x, weight, bias))
    return apply_layer(layer, apply_bn(bn, x), weight, bias)


def _output_magnitude(layer: dict, x: np.ndarray, folded_weight, magnitude_bias) -> np.ndarray:
    # |s| conv(|x|, |W|) = conv(|x|, |W'|), so this bounds the terms of the unfused pair as well.
    magnitude = apply_layer(layer, np.abs(x), np.abs(folded_weight), None)
    return magnitude + np.reshape(magnitude_bias, (1, -1) + (1,) * (magnitude.ndim - 2))


def verify_fold(fold: str, layer: dict, weight, bias, bn: dict, x: np.ndarray):
    """Run the unfused pair and the folded layer on ``x`` with the float64 reference ops and compare
    them under the float64 error model; return the :class:`~refimpl.tolerance.Comparison`.

    Both runs round: the folded one through its reduction and the fold's own roundings, the
    unfused one through its reduction and the BatchNorm, hence ``n = 2 K + n_bias + 4``.
    """
    folded_weight, folded_bias = _fold(fold, layer, weight, bias, bn)
    _, magnitude_bias = _fold_magnitude(fold, layer, weight, bias, bn)
    magnitude = _output_magnitude(layer, x, folded_weight, magnitude_bias)
    n = 2 * _reduction_length(layer) + _bias_rounding_count(fold, layer) + 4
    return compare(apply_layer(layer, x, folded_weight, folded_bias), _unfused(fold, layer, weight, bias, bn, x),
                   error_bound(magnitude, n, "float64"))


def _probe(name, fold, layer, weight, bias, bn, folded_weight, magnitude_bias, n_bias, x) -> dict:
    """The unfused pair run on ``x`` by the reference ops, after checking the fold reproduces it."""
    check = verify_fold(fold, layer, weight, bias, bn, x)
    if not check.ok:
        raise ValueError(f"case {name!r}: the folded layer does not reproduce the unfused pair on the probe: "
                         + check.describe("probe output"))
    # An implementation runs the folded layer in its own precision: its reduction, plus the errors
    # already in W' and b' (the reference output itself is exact or within float64 roundoff).
    return {"x": _tensor(x), "y": _tensor(_unfused(fold, layer, weight, bias, bn, x)),
            "n": _reduction_length(layer) + n_bias + 1,
            "magnitude": _magnitude(_output_magnitude(layer, x, folded_weight, magnitude_bias))}


def _verdict_case(name: str, description: str, fold: str, layer: dict, weight: np.ndarray,
                  bias: np.ndarray | None, bn: dict, dtype: str, verdict: str) -> dict:
    if verdict not in VERDICTS:
        raise ValueError(f"case {name!r}: unknown verdict {verdict!r}; known: {sorted(VERDICTS)}")
    return {"format": FORMAT, "name": name, "description": description, "fold": fold, "layer": layer,
            "storage_dtype": dtype,
            "inputs": {"weight": _tensor(weight), "bias": None if bias is None else _tensor(bias),
                       "bn": _encode_bn(bn)},
            "expected": {"verdict": verdict}, "tolerance": {"policy": "verdict"}}


def _doc(function: Callable) -> str:
    return " ".join((function.__doc__ or "").split())


def _conv_then_bn(name: str, doc: str, seed: int, layer: dict, *, dtype: str = "float32", affine: bool = True,
                  batch: int = 2, spatial: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    # Dyadic weights, biases and probe input keep the conv exact in float64, so the probe output is
    # reproducible bit for bit on any machine; the BatchNorm parameters are arbitrary float32 values.
    weight = _dyadic(rng, _weight_shape(layer))
    bias = _dyadic(rng, (layer["out_channels"],), 4) if layer["bias"] else None
    bn = _random_bn(rng, layer["out_channels"], dtype)
    if not affine:
        bn.update(affine=False, weight=None, bias=None)
    x = _dyadic(rng, (batch, layer["in_channels"]) + (spatial,) * layer["dims"], 4)
    return _foldable_case(name, doc, "conv_bn", layer, weight, bias, bn, dtype, x)


def _bn_then_conv(name: str, doc: str, seed: int, layer: dict, *, dtype: str = "float32") -> dict:
    rng = np.random.default_rng(seed)
    weight = _dyadic(rng, _weight_shape(layer))
    bias = _dyadic(rng, (layer["out_channels"],), 4) if layer["bias"] else None
    bn = _random_bn(rng, layer["in_channels"], dtype, exact=True)
    x = _dyadic(rng, (2, layer["in_channels"]) + (5,) * layer["dims"], 4)
    return _foldable_case(name, doc, "bn_conv", layer, weight, bias, bn, dtype, x)


# ---------------------------------------------------------------------------------------------
# The cases. Conv -> BatchNorm.

@case("conv1d_bn")
def _conv1d_bn() -> dict:
    """Conv1d (3 -> 4 channels, kernel 3, padding 1, bias) followed by BatchNorm1d."""
    return _conv_then_bn("conv1d_bn", _doc(_conv1d_bn), 101, _conv_layer(1, 3, 4, 3, padding=1))


@case("conv2d_bn")
def _conv2d_bn() -> dict:
    """Conv2d (2 -> 3 channels, kernel 3, padding 1, bias) followed by BatchNorm2d."""
    return _conv_then_bn("conv2d_bn", _doc(_conv2d_bn), 102, _conv_layer(2, 2, 3, 3, padding=1))


@case("conv3d_bn")
def _conv3d_bn() -> dict:
    """Conv3d (2 -> 2 channels, kernel 3, padding 1, bias) followed by BatchNorm3d."""
    return _conv_then_bn("conv3d_bn", _doc(_conv3d_bn), 103, _conv_layer(3, 2, 2, 3, padding=1), batch=1, spatial=4)


@case("conv2d_bn_float64")
def _conv2d_bn_float64() -> dict:
    """Conv2d followed by BatchNorm2d with parameters stored in float64: the tightest error model."""
    return _conv_then_bn("conv2d_bn_float64", _doc(_conv2d_bn_float64), 104, _conv_layer(2, 2, 3, 3, padding=1),
                         dtype="float64")


@case("conv2d_bn_grouped")
def _conv2d_bn_grouped() -> dict:
    """Grouped Conv2d (4 -> 6 channels, groups 2): the BatchNorm scales output channels, axis 0."""
    return _conv_then_bn("conv2d_bn_grouped", _doc(_conv2d_bn_grouped), 105,
                         _conv_layer(2, 4, 6, 3, padding=1, groups=2))


@case("conv2d_bn_depthwise")
def _conv2d_bn_depthwise() -> dict:
    """Depthwise Conv2d with channel multiplier 2 (3 -> 6 channels, groups 3) followed by BatchNorm2d."""
    return _conv_then_bn("conv2d_bn_depthwise", _doc(_conv2d_bn_depthwise), 106,
                         _conv_layer(2, 3, 6, 3, padding=1, groups=3))


@case("conv2d_bn_dilated")
def _conv2d_bn_dilated() -> dict:
    """Dilated Conv2d (dilation 2, padding 2) followed by BatchNorm2d."""
    return _conv_then_bn("conv2d_bn_dilated", _doc(_conv2d_bn_dilated), 107,
                         _conv_layer(2, 2, 3, 3, padding=2, dilation=2), spatial=6)


@case("conv2d_bn_strided")
def _conv2d_bn_strided() -> dict:
    """Strided Conv2d (stride 2, padding 1) followed by BatchNorm2d."""
    return _conv_then_bn("conv2d_bn_strided", _doc(_conv2d_bn_strided), 108,
                         _conv_layer(2, 2, 3, 3, stride=2, padding=1), spatial=6)


@case("conv_transpose2d_bn_grouped")
def _conv_transpose2d_bn_grouped() -> dict:
    """ConvTranspose2d (4 -> 6 channels, groups 2, stride 2) followed by BatchNorm2d. The weight is
    [in, out/groups, k, k]: output channel g*3 + j is axis-1 index j of group g's input channels, so
    the scale must be laid out per group (scaling axis 1 by s[:3] alone, as torch's fuse helper does,
    is wrong)."""
    layer = _conv_layer(2, 4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, transposed=True)
    return _conv_then_bn("conv_transpose2d_bn_grouped", _doc(_conv_transpose2d_bn_grouped), 109, layer, spatial=3)


@case("conv_transpose1d_bn")
def _conv_transpose1d_bn() -> dict:
    """ConvTranspose1d (3 -> 2 channels, stride 2, no bias) followed by BatchNorm1d."""
    layer = _conv_layer(1, 3, 2, 3, stride=2, transposed=True, bias=False)
    return _conv_then_bn("conv_transpose1d_bn", _doc(_conv_transpose1d_bn), 110, layer, spatial=4)


@case("conv2d_bn_affine_off")
def _conv2d_bn_affine_off() -> dict:
    """Conv2d followed by BatchNorm2d(affine=False): gamma = 1, beta = 0 (weight and bias are null)."""
    return _conv_then_bn("conv2d_bn_affine_off", _doc(_conv2d_bn_affine_off), 111,
                         _conv_layer(2, 2, 3, 3, padding=1), affine=False)


@case("conv2d_nobias_bn")
def _conv2d_nobias_bn() -> dict:
    """Conv2d without bias followed by BatchNorm2d: the folded bias is beta - mu * s."""
    return _conv_then_bn("conv2d_nobias_bn", _doc(_conv2d_nobias_bn), 112,
                         _conv_layer(2, 2, 3, 3, padding=1, bias=False))


@case("conv2d_bn_tiny_variance")
def _conv2d_bn_tiny_variance() -> dict:
    """Running variances 0, 1e-30 and 1e-12 with eps = 1e-10: the scale (about 1e5) is dominated by
    eps, and an implementation that drops eps divides by zero."""
    rng = np.random.default_rng(113)
    layer = _conv_layer(2, 2, 3, 3, padding=1)
    weight, bias = _dyadic(rng, _weight_shape(layer)), _dyadic(rng, (3,), 4)
    bn = _random_bn(rng, 3, "float32")
    bn["running_var"] = round_to_dtype([0.0, 1e-30, 1e-12], "float32")
    bn["eps"] = 1e-10
    x = _dyadic(rng, (1, 2, 4, 4), 4)
    return _foldable_case("conv2d_bn_tiny_variance", _doc(_conv2d_bn_tiny_variance), "conv_bn", layer, weight, bias,
                          bn, "float32", x)


@case("conv2d_bn_large_variance")
def _conv2d_bn_large_variance() -> dict:
    """Running variances 1e6, 1e20 and 1e36 (near float32's largest value) with means up to 3e17:
    the scale goes down to 1e-18 and the folded bias is a difference of large terms, so only a
    relative (not an absolute) tolerance can judge it."""
    rng = np.random.default_rng(114)
    layer = _conv_layer(2, 2, 3, 3, padding=1)
    weight, bias = _dyadic(rng, _weight_shape(layer)), _dyadic(rng, (3,), 4)
    bn = _random_bn(rng, 3, "float32")
    bn["running_var"] = round_to_dtype([1e6, 1e20, 1e36], "float32")
    bn["running_mean"] = round_to_dtype([1e3, -1e10, 3e17], "float32")
    x = _dyadic(rng, (1, 2, 4, 4), 4)
    return _foldable_case("conv2d_bn_large_variance", _doc(_conv2d_bn_large_variance), "conv_bn", layer, weight,
                          bias, bn, "float32", x)


@case("linear_bn")
def _linear_bn() -> dict:
    """Linear (5 -> 4 features, bias) followed by BatchNorm1d."""
    rng = np.random.default_rng(115)
    layer = {"type": "linear", "in_features": 5, "out_features": 4, "bias": True}
    weight, bias = _dyadic(rng, (4, 5)), _dyadic(rng, (4,), 4)
    bn = _random_bn(rng, 4, "float32")
    return _foldable_case("linear_bn", _doc(_linear_bn), "linear_bn", layer, weight, bias, bn, "float32",
                          _dyadic(rng, (3, 5), 4))


# BatchNorm -> conv / linear: exact only without padding or with padding that copies BN outputs.

@case("bn_conv2d")
def _bn_conv2d() -> dict:
    """BatchNorm2d followed by an unpadded Conv2d (3 -> 2 channels, kernel 3): exact; the shift
    folds into the bias as b + sum W * t."""
    return _bn_then_conv("bn_conv2d", _doc(_bn_conv2d), 201, _conv_layer(2, 3, 2, 3))


@case("bn_conv2d_grouped")
def _bn_conv2d_grouped() -> dict:
    """BatchNorm2d followed by an unpadded grouped Conv2d (4 -> 4 channels, groups 2): BN channel c
    scales axis-1 index c mod 2 of the output channels in group c // 2 only."""
    return _bn_then_conv("bn_conv2d_grouped", _doc(_bn_conv2d_grouped), 202, _conv_layer(2, 4, 4, 3, groups=2))


@case("bn_conv2d_reflect")
def _bn_conv2d_reflect() -> dict:
    """BatchNorm2d followed by Conv2d with padding 1, padding_mode='reflect': the padding copies BN
    outputs, so the fold is exact."""
    return _bn_then_conv("bn_conv2d_reflect", _doc(_bn_conv2d_reflect), 203,
                         _conv_layer(2, 2, 3, 3, padding=1, padding_mode="reflect"))


@case("bn_conv2d_replicate")
def _bn_conv2d_replicate() -> dict:
    """BatchNorm2d followed by Conv2d with padding 1, padding_mode='replicate': exact."""
    return _bn_then_conv("bn_conv2d_replicate", _doc(_bn_conv2d_replicate), 204,
                         _conv_layer(2, 2, 3, 3, padding=1, padding_mode="replicate"))


@case("bn_conv1d_circular")
def _bn_conv1d_circular() -> dict:
    """BatchNorm1d followed by Conv1d with padding 2, padding_mode='circular': exact."""
    return _bn_then_conv("bn_conv1d_circular", _doc(_bn_conv1d_circular), 205,
                         _conv_layer(1, 2, 3, 3, padding=2, padding_mode="circular", bias=False))


@case("bn_linear")
def _bn_linear() -> dict:
    """BatchNorm1d followed by Linear (4 -> 3 features): always exact, b' = b + W @ t."""
    rng = np.random.default_rng(206)
    layer = {"type": "linear", "in_features": 4, "out_features": 3, "bias": True}
    weight, bias = _dyadic(rng, (3, 4)), _dyadic(rng, (3,), 4)
    bn = _random_bn(rng, 4, "float32", exact=True)
    return _foldable_case("bn_linear", _doc(_bn_linear), "bn_linear", layer, weight, bias, bn, "float32",
                          _dyadic(rng, (3, 4), 4))


# Low-precision storage: expected values are the float64 fold rounded once; folding in the
# parameter dtype gets them wrong (tests/test_conformance.py checks that it does).

@case("conv2d_bn_float16")
def _conv2d_bn_float16() -> dict:
    """Conv2d 1x1 (2 -> 4 channels) and BatchNorm2d stored in float16. Channel 0: gamma = 300 and
    var + eps = 1.1e-5 make s = 90453, which overflows float16 although every folded value fits.
    Channel 1: the bias cancels ((b - mu) * s ~ -beta). Channel 2: eps = 1e-5 is below float16's
    resolution of var = 0.5. Channel 3: an ordinary channel."""
    layer = _conv_layer(2, 2, 4, 1)
    weight = round_to_dtype([[0.01, -0.0123], [1.37, 0.71], [3.3, -2.9], [0.61, 0.23]], "float16").reshape(4, 2, 1, 1)
    bias = round_to_dtype([0.5, 1000.0, 0.3, -0.7], "float16")
    bn = {"num_features": 4, "eps": 1e-5, "affine": True, "track_running_stats": True,
          "running_mean": round_to_dtype([0.2, 999.5, 0.1, 0.4], "float16"),
          "running_var": round_to_dtype([1e-6, 3.0, 0.5, 1.3], "float16"),
          "weight": round_to_dtype([300.0, 1.0, 1.7, 0.9], "float16"),
          "bias": round_to_dtype([0.1, -0.2886, -0.05, 0.3], "float16")}
    return _foldable_case("conv2d_bn_float16", _doc(_conv2d_bn_float16), "conv_bn", layer, weight, bias, bn,
                          "float16")


@case("linear_bn_bfloat16")
def _linear_bn_bfloat16() -> dict:
    """Linear (3 -> 3 features) and BatchNorm1d stored in bfloat16. Channel 0: the bias cancels.
    Channel 1: eps = 1e-2 is swallowed by var = 1 in bfloat16 arithmetic. Channel 2: a large
    gamma times a large weight."""
    layer = {"type": "linear", "in_features": 3, "out_features": 3, "bias": True}
    weight = round_to_dtype([[1.3, -0.7, 2.1], [0.37, 0.91, -1.23], [170.0, -33.0, 9.5]], "bfloat16")
    bias = round_to_dtype([250.0, 0.4, -3.0], "bfloat16")
    bn = {"num_features": 3, "eps": 1e-2, "affine": True, "track_running_stats": True,
          "running_mean": round_to_dtype([249.0, 0.1, 2.0], "bfloat16"),
          "running_var": round_to_dtype([2.0, 1.0, 0.3], "bfloat16"),
          "weight": round_to_dtype([1.0, 1.5, 300.0], "bfloat16"),
          "bias": round_to_dtype([-0.703, 0.2, 7.0], "bfloat16")}
    return _foldable_case("linear_bn_bfloat16", _doc(_linear_bn_bfloat16), "linear_bn", layer, weight, bias, bn,
                          "bfloat16")


@case("bn_linear_float16")
def _bn_linear_float16() -> dict:
    """BatchNorm1d followed by Linear (6 -> 2 features), stored in float16: the shift b + W @ t is a
    sum of terms that nearly cancel, which float16 accumulation gets wrong by many ulps."""
    rng = np.random.default_rng(303)
    layer = {"type": "linear", "in_features": 6, "out_features": 2, "bias": True}
    weight = round_to_dtype(rng.normal(0, 2, (2, 6)), "float16")
    bias = round_to_dtype([0.25, -1.5], "float16")
    bn = {"num_features": 6, "eps": 1e-5, "affine": True, "track_running_stats": True,
          "running_mean": round_to_dtype(rng.normal(0, 30, 6), "float16"),
          "running_var": round_to_dtype(rng.uniform(0.5, 3, 6), "float16"),
          "weight": round_to_dtype(rng.uniform(0.5, 2, 6), "float16"),
          "bias": round_to_dtype(rng.normal(0, 1, 6), "float16")}
    return _foldable_case("bn_linear_float16", _doc(_bn_linear_float16), "bn_linear", layer, weight, bias, bn,
                          "float16")


@case("conv1d_bn_bfloat16")
def _conv1d_bn_bfloat16() -> dict:
    """Conv1d (2 -> 3 channels, kernel 3) and BatchNorm1d stored in bfloat16, random values: folding
    in bfloat16 arithmetic rounds up to four times, folding in float64 once."""
    rng = np.random.default_rng(304)
    layer = _conv_layer(1, 2, 3, 3)
    weight = round_to_dtype(rng.normal(0, 1, (3, 2, 3)), "bfloat16")
    bias = round_to_dtype(rng.normal(0, 1, 3), "bfloat16")
    bn = {"num_features": 3, "eps": 1e-5, "affine": True, "track_running_stats": True,
          "running_mean": round_to_dtype(rng.normal(0, 1, 3), "bfloat16"),
          "running_var": round_to_dtype(rng.uniform(0.2, 3, 3), "bfloat16"),
          "weight": round_to_dtype(rng.uniform(0.5, 2, 3), "bfloat16"),
          "bias": round_to_dtype(rng.normal(0, 1, 3), "bfloat16")}
    return _foldable_case("conv1d_bn_bfloat16", _doc(_conv1d_bn_bfloat16), "conv_bn", layer, weight, bias, bn,
                          "bfloat16")


# Cases that must not be folded, and invalid parameters.

@case("bn_conv2d_zero_padding")
def _bn_conv2d_zero_padding() -> dict:
    """BatchNorm2d with a nonzero shift followed by a zero-padded Conv2d (padding 1): the padding
    zeros are inserted after the BatchNorm, where a folded conv would see t instead of 0, so the
    borders come out wrong. Expected verdict: not_foldable: zero_padding."""
    rng = np.random.default_rng(401)
    layer = _conv_layer(2, 2, 3, 3, padding=1)
    weight, bias = _dyadic(rng, _weight_shape(layer)), _dyadic(rng, (3,), 4)
    bn = _random_bn(rng, 2, "float32")
    # Demonstrate the verdict with the reference ops: the folded conv misses the error model at a border.
    check = verify_fold("bn_conv", layer, weight, bias, bn, _dyadic(rng, (1, 2, 4, 4), 4))
    if check.ok or 0 < check.index[2] < 3 and 0 < check.index[3] < 3:
        raise ValueError("case 'bn_conv2d_zero_padding': the fold is not wrong at the border; pick another seed")
    return _verdict_case("bn_conv2d_zero_padding", _doc(_bn_conv2d_zero_padding), "bn_conv", layer, weight, bias,
                         bn, "float32", "not_foldable: zero_padding")


@case("bn_conv_transpose2d")
def _bn_conv_transpose2d() -> dict:
    """BatchNorm2d followed by ConvTranspose2d (stride 2, kernel 3): the shift t reaches an output
    position through 1, 2 or 4 kernel taps depending on the position, so it is not a per-channel
    bias. Expected verdict: not_foldable: transposed_after_bn."""
    rng = np.random.default_rng(402)
    layer = _conv_layer(2, 2, 3, 3, stride=2, padding=1, transposed=True)
    weight, bias = _dyadic(rng, _weight_shape(layer)), _dyadic(rng, (3,), 4)
    bn = _random_bn(rng, 2, "float32")
    # The shift's contribution: the layer (without bias) applied to the constant image t.
    _, shift = bn_scale_shift(bn["running_mean"], bn["running_var"], bn["eps"], bn["weight"], bn["bias"])
    contribution = apply_layer(layer, np.broadcast_to(shift[None, :, None, None], (1, 2, 4, 4)).copy(), weight, None)
    if np.ptp(contribution[0, 0]) == 0:
        raise ValueError("case 'bn_conv_transpose2d': the shift happens to be constant per channel; pick another seed")
    return _verdict_case("bn_conv_transpose2d", _doc(_bn_conv_transpose2d), "bn_conv", layer, weight, bias, bn,
                         "float32", "not_foldable: transposed_after_bn")


@case("conv2d_bn_no_running_stats")
def _conv2d_bn_no_running_stats() -> dict:
    """Conv2d followed by BatchNorm2d(track_running_stats=False): it normalises with the statistics
    of each batch, even in eval mode, so there is nothing constant to fold. Expected verdict:
    not_foldable: no_running_stats."""
    rng = np.random.default_rng(403)
    layer = _conv_layer(2, 2, 3, 3, padding=1)
    weight, bias = _dyadic(rng, _weight_shape(layer)), _dyadic(rng, (3,), 4)
    bn = _random_bn(rng, 3, "float32")
    bn.update(track_running_stats=False, running_mean=None, running_var=None)
    return _verdict_case("conv2d_bn_no_running_stats", _doc(_conv2d_bn_no_running_stats), "conv_bn", layer, weight,
                         bias, bn, "float32", "not_foldable: no_running_stats")


@case("conv2d_bn_negative_variance")
def _conv2d_bn_negative_variance() -> dict:
    """Conv2d followed by BatchNorm2d whose running variance of channel 1 is -0.5 (corrupt
    statistics): folding must refuse rather than produce NaN. Expected verdict: invalid: negative_variance."""
    rng = np.random.default_rng(404)
    layer = _conv_layer(2, 2, 3, 3, padding=1)
    weight, bias = _dyadic(rng, _weight_shape(layer)), _dyadic(rng, (3,), 4)
    bn = _random_bn(rng, 3, "float32")
    bn["running_var"][1] = -0.5
    try:
        _fold("conv_bn", layer, weight, bias, bn)
    except ValueError:
        pass
    else:
        raise ValueError("case 'conv2d_bn_negative_variance': refimpl folded a negative variance")
    return _verdict_case("conv2d_bn_negative_variance", _doc(_conv2d_bn_negative_variance), "conv_bn", layer,
                         weight, bias, bn, "float32", "invalid: negative_variance")


@case("conv2d_bn_channel_mismatch")
def _conv2d_bn_channel_mismatch() -> dict:
    """Conv2d with 3 output channels followed by a BatchNorm2d with 4 features. Expected verdict:
    invalid: channel_mismatch."""
    rng = np.random.default_rng(405)
    layer = _conv_layer(2, 2, 3, 3, padding=1)
    weight, bias = _dyadic(rng, _weight_shape(layer)), _dyadic(rng, (3,), 4)
    bn = _random_bn(rng, 4, "float32")
    try:
        _fold("conv_bn", layer, weight, bias, bn)
    except ValueError:
        pass
    else:
        raise ValueError("case 'conv2d_bn_channel_mismatch': refimpl folded mismatched channels")
    return _verdict_case("conv2d_bn_channel_mismatch", _doc(_conv2d_bn_channel_mismatch), "conv_bn", layer, weight,
                         bias, bn, "float32", "invalid: channel_mismatch")


# ---------------------------------------------------------------------------------------------
# Building and writing the vectors.

def build_case(name: str) -> dict:
    """Run the case function registered under ``name`` and return its vector."""
    if name not in CASES:
        raise ValueError(f"unknown conformance case {name!r}; known: {', '.join(sorted(CASES))}")
    return CASES[name]()


def build_all() -> dict[str, dict]:
    """Every registered case's vector, by name, in sorted order."""
    return {name: build_case(name) for name in sorted(CASES)}


def manifest(vectors: dict[str, dict]) -> dict:
    """The manifest: the cases with their fold, storage dtype and policy, and the tolerance policy."""
    storage = sorted({v["storage_dtype"] for v in vectors.values()})
    return {
        "format": MANIFEST_FORMAT,
        "cases": [{"name": name, "file": f"{name}.json", "fold": v["fold"], "storage_dtype": v["storage_dtype"],
                   "policy": v["tolerance"]["policy"], "verdict": v["expected"]["verdict"]}
                  for name, v in sorted(vectors.items())],
        "verdicts": dict(sorted(VERDICTS.items())),
        "tolerance_policy": {
            "error_model": {
                "applies_to": [d for d in storage if d not in _LOW_PRECISION],
                "unit_roundoff": {d: unit_roundoff(d) for d in storage if d not in _LOW_PRECISION},
                "safety": SAFETY,
                "bound": "bound[i] = safety * (gamma_n + u) * magnitude[i], gamma_n = n*u / (1 - n*u); "
                         "u is the unit roundoff of the storage dtype, n and magnitude are stored per tensor "
                         "in the case's 'tolerance' entry (and in 'probe' for the probe output)",
                "passes": "|actual[i] - expected[i]| <= bound[i] for every element i, expected being the "
                          "float64 value in 'expected'",
                "magnitude": "the sum of the absolute values of every term that makes up the element (the fold "
                             "run on |W|, |b|, |gamma|, |beta|, -|mu|; for the probe, the folded layer run on |x| "
                             "and |W'| plus the bias magnitude), rounded up to 8 significant bits",
            },
            "bit_exact": {
                "applies_to": [d for d in storage if d in _LOW_PRECISION],
                "unit_roundoff": {d: unit_roundoff(d) for d in storage if d in _LOW_PRECISION},
                "expected": "'weight_rounded' / 'bias_rounded': the float64 fold rounded once, to nearest with "
                            "ties to even, to the storage dtype ('correctly rounded'); 'data' holds the exact value "
                            "as float64 and 'bits' the raw 16 bits in hex",
                "passes": "every element has exactly the expected bits (0 ulp). Each expected value lies farther "
                          "from a rounding midpoint than the float64 fold's error bound, so it is the correctly "
                          "rounded value of the exact real fold and any implementation that folds in float64 (or "
                          "exactly) and rounds once reproduces it. Allowing 1 ulp would accept folding in the "
                          "parameter dtype, which these cases exist to catch: its error is typically 1 to 4 ulp.",
            },
            "verdict": {"passes": "the results entry's 'verdict' equals the expected verdict string exactly"},
        },
    }


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


def write_vectors(out: str | Path) -> list[Path]:
    """Write every case to ``out/<name>.json`` and the manifest to ``out/manifest.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vectors = build_all()
    written = []
    for name, vector in vectors.items():
        path = out / f"{name}.json"
        path.write_text(dumps(vector), encoding="utf-8")
        written.append(path)
    path = out / "manifest.json"
    path.write_text(dumps(manifest(vectors)), encoding="utf-8")
    written.append(path)
    return written


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{what} {str(path)!r} is not readable JSON: {error}") from None


def load_vectors(directory: str | Path = VECTORS_DIR) -> dict[str, dict]:
    """Read ``manifest.json`` and every case file it lists; ``ValueError`` on a malformed set."""
    directory = Path(directory)
    index = _read_json(directory / "manifest.json", "vectors manifest")
    if not isinstance(index, dict) or index.get("format") != MANIFEST_FORMAT or not isinstance(index.get("cases"),
                                                                                               list):
        raise ValueError(f"{str(directory / 'manifest.json')!r} is not a {MANIFEST_FORMAT} manifest "
                         "(expected an object with 'format' and a 'cases' list)")
    vectors = {}
    for entry in index["cases"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise ValueError(f"manifest entry {entry!r} has no 'file'")
        vector = _read_json(directory / entry["file"], "vector file")
        if not isinstance(vector, dict) or vector.get("format") != FORMAT or "expected" not in vector:
            raise ValueError(f"{str(directory / entry['file'])!r} is not a {FORMAT} vector")
        vectors[vector["name"]] = vector
    return vectors


# ---------------------------------------------------------------------------------------------
# refimpl's own answers: a working example of the results format.

def _decoded_bn(vector: dict) -> dict:
    bn = dict(vector["inputs"]["bn"])
    for key in ("running_mean", "running_var", "weight", "bias"):
        bn[key] = _decode(bn[key])
    return bn


def judge_verdict(vector: dict) -> str:
    """refimpl's verdict on a vector's layer pair, decided from its layer and inputs alone."""
    layer, fold, bn = vector["layer"], vector["fold"], _decoded_bn(vector)
    if not bn["track_running_stats"] or bn["running_mean"] is None or bn["running_var"] is None:
        return "not_foldable: no_running_stats"
    touched = _out_channels(layer) if fold in ("conv_bn", "linear_bn") else _in_channels(layer)
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
    return np.vectorize(lambda v: v if math.isfinite(v) else repr(v), otypes=[object])(a).tolist() \
        if a.size and not np.all(np.isfinite(a)) else a.tolist()


def reference_results(vectors: dict[str, dict], implementation: str = "refimpl") -> dict:
    """A results file computed by refimpl: folds in float64, rounds once to the storage dtype."""
    results = {}
    for name, vector in sorted(vectors.items()):
        verdict = judge_verdict(vector)
        if verdict != "foldable":
            results[name] = {"verdict": verdict}
            continue
        inputs, dtype = vector["inputs"], vector["storage_dtype"]
        weight, bias = _fold(vector["fold"], vector["layer"], _decode(inputs["weight"]), _decode(inputs["bias"]),
                             _decoded_bn(vector))
        weight, bias = round_to_dtype(weight, dtype), round_to_dtype(bias, dtype)
        entry: dict[str, Any] = {"verdict": "foldable"}
        if dtype in _LOW_PRECISION:
            entry["weight_bits"] = np.reshape(np.array(_values_to_bits(weight, dtype)), weight.shape).tolist()
            entry["bias_bits"] = np.reshape(np.array(_values_to_bits(bias, dtype)), bias.shape).tolist()
        else:
            entry["weight"], entry["bias"] = _nested(weight), _nested(bias)
        if "probe" in vector:
            entry["output"] = _nested(apply_layer(vector["layer"], _decode(vector["probe"]["x"]), weight, bias))
        results[name] = entry
    return {"format": RESULTS_FORMAT, "implementation": implementation, "results": results}


# ---------------------------------------------------------------------------------------------
# Checking another implementation's results.

@dataclass(frozen=True)
class CaseOutcome:
    """The judgement of one case: ``ok`` and a one-line ``detail`` naming the worst element."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'pass' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


class ResultsFormatError(ValueError):
    """A results file that cannot be read as the documented format (as opposed to wrong values)."""


def _numbers(value: Any, where: str) -> np.ndarray:
    def number(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ResultsFormatError(f"{where}: expected numbers (or 'inf'/'-inf'/'nan' strings), got {v!r}")
        try:
            return float(v)
        except ValueError:
            raise ResultsFormatError(f"{where}: {v!r} is not a number") from None
    try:
        raw = np.array(value, dtype=object)
    except ValueError as error:  # ragged nesting
        raise ResultsFormatError(f"{where}: not a rectangular nested list ({error})") from None
    if raw.dtype != object or any(isinstance(v, list) for v in raw.ravel()):
        raise ResultsFormatError(f"{where}: not a rectangular nested list")
    return np.array([number(v) for v in raw.ravel()], dtype=np.float64).reshape(raw.shape)


def _bits(value: Any, dtype: str, where: str) -> np.ndarray:
    try:
        raw = np.array(value, dtype=object)
    except ValueError as error:
        raise ResultsFormatError(f"{where}: not a rectangular nested list ({error})") from None
    if raw.size and not all(isinstance(v, str) for v in raw.ravel()):
        raise ResultsFormatError(f"{where}: expected hex strings such as '0x3c00'")
    try:
        return bits_to_values(raw, dtype) if raw.size else raw.astype(np.float64)
    except ValueError as error:
        raise ResultsFormatError(f"{where}: {error}") from None


def _ulps(actual: float, expected: float, dtype: str) -> str:
    if not (math.isfinite(actual) and math.isfinite(expected)):
        return "non-finite"
    p, emin, _ = _LOW_PRECISION[dtype]
    spacing = math.ldexp(1.0, max(math.frexp(expected)[1] - 1, emin) - (p - 1)) if expected else \
        math.ldexp(1.0, emin - (p - 1))
    return f"{abs(actual - expected) / spacing:.3g} ulp"


def _compare_tensor(vector: dict, entry: dict, what: str) -> tuple[bool, float, str]:
    """Compare one folded tensor; return (ok, ratio for ranking, description)."""
    name, dtype = vector["name"], vector["storage_dtype"]
    where = f"results[{name!r}]"
    if dtype in _LOW_PRECISION:
        expected = _decode(vector["expected"][f"{what}_rounded"])
        if f"{what}_bits" in entry:
            actual = _bits(entry[f"{what}_bits"], dtype, f"{where}[{what + '_bits'!r}]")
            if what in entry:
                as_numbers = _numbers(entry[what], f"{where}[{what!r}]")
                if as_numbers.shape != actual.shape or not np.array_equal(as_numbers, actual, equal_nan=True):
                    return False, math.inf, f"{what}: '{what}' and '{what}_bits' disagree"
        elif what in entry:
            actual = _numbers(entry[what], f"{where}[{what!r}]")
        else:
            return False, math.inf, f"{what}: missing (give '{what}' or '{what}_bits')"
        if actual.shape != expected.shape:
            return False, math.inf, f"{what}: shape {list(actual.shape)}, expected {list(expected.shape)}"
        result = compare(actual, expected, 0.0)
        if result.ok:
            return True, 0.0, f"{what} bit-exact ({dtype})"
        bits = f" ({_values_to_bits(np.array([result.expected]), dtype)[0]})"
        return False, result.ratio, (f"{what}{list(result.index)}: expected={result.expected!r}{bits}, "
                                     f"actual={result.actual!r}, {_ulps(result.actual, result.expected, dtype)} off; "
                                     f"{dtype} requires the correctly rounded value, bit for bit")
    if what not in entry:
        return False, math.inf, f"{what}: missing"
    actual = _numbers(entry[what], f"{where}[{what!r}]")
    expected = _decode(vector["expected"][what])
    if actual.shape != expected.shape:
        return False, math.inf, f"{what}: shape {list(actual.shape)}, expected {list(expected.shape)}"
    policy = vector["tolerance"][what]
    bound = error_bound(_decode(policy["magnitude"]), policy["n"], dtype, safety=vector["tolerance"]["safety"])
    return _describe(compare(actual, expected, bound), what)


def _describe(result, what: str) -> tuple[bool, float, str]:
    return result.ok, result.ratio, (f"{what}{list(result.index)}: expected={result.expected!r}, "
                                     f"actual={result.actual!r}, bound={result.bound:.3e}, ratio={result.ratio:.3g}")


def _check_case(vector: dict, entry: Any) -> CaseOutcome:
    name = vector["name"]
    if entry is None:
        return CaseOutcome(name, False, "missing from the results")
    if not isinstance(entry, dict):
        raise ResultsFormatError(f"results[{name!r}] must be an object, got {type(entry).__name__}")
    expected_verdict = vector["expected"]["verdict"]
    verdict = entry.get("verdict", "foldable" if ("weight" in entry or "weight_bits" in entry) else None)
    if verdict is not None and not isinstance(verdict, str):
        raise ResultsFormatError(f"results[{name!r}]['verdict'] must be a string, got {verdict!r}")
    if expected_verdict != "foldable":
        if verdict == expected_verdict:
            return CaseOutcome(name, True, f"verdict {verdict!r}")
        got = "no verdict" if verdict is None else (
            "folded weights" if verdict == "foldable" else f"verdict {verdict!r}")
        return CaseOutcome(name, False, f"expected verdict {expected_verdict!r}, got {got}")
    if verdict != "foldable":
        got = "neither weights nor a verdict" if verdict is None else f"verdict {verdict!r}"
        return CaseOutcome(name, False, f"foldable, but the results give {got}")
    parts = [_compare_tensor(vector, entry, "weight"), _compare_tensor(vector, entry, "bias")]
    if "output" in entry and "probe" in vector:
        probe = vector["probe"]
        actual = _numbers(entry["output"], f"results[{name!r}]['output']")
        expected = _decode(probe["y"])
        if actual.shape != expected.shape:
            parts.append((False, math.inf, f"output: shape {list(actual.shape)}, expected {list(expected.shape)}"))
        else:
            # The probe runs the folded layer in the compute precision: float32 for low-precision storage
            # is not assumed; the storage dtype's own roundoff bounds it.
            bound = error_bound(_decode(probe["magnitude"]), probe["n"], vector["storage_dtype"])
            parts.append(_describe(compare(actual, expected, bound), "output"))
    failed = [detail for ok, _, detail in parts if not ok]
    if failed:
        return CaseOutcome(name, False, "; ".join(failed))
    return CaseOutcome(name, True, max(parts, key=lambda part: part[1])[2])


def check_results(vectors: dict[str, dict], results: Any) -> tuple[list[CaseOutcome], list[str]]:
    """Judge a parsed results file against the vectors: one outcome per case, plus notes.

    Raises :class:`ResultsFormatError` (a ``ValueError``) when ``results`` is not the documented format.
    """
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
        raise ResultsFormatError("a results file must be a JSON object with a 'results' object mapping case names "
                                 f"to entries (format {RESULTS_FORMAT!r})")
    if results.get("format", RESULTS_FORMAT) != RESULTS_FORMAT:
        raise ResultsFormatError(f"results format {results.get('format')!r} is not {RESULTS_FORMAT!r}")
    entries = results["results"]
    outcomes = [_check_case(vector, entries.get(name)) for name, vector in sorted(vectors.items())]
    notes = [f"results give unknown case {name!r} (ignored)" for name in sorted(set(entries) - set(vectors))]
    return outcomes, notes

"""The registry of conformance cases, and the cases.

A case is a function decorated with :func:`case`: its name is the case's name (and file name),
its docstring the case's description, and it returns the vector's body built by
:func:`~.build.foldable_vector` or :func:`~.build.verdict_vector` from a fixed seed or from
hand-picked values. :func:`build_case` runs it and adds the format tag, name and description.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..fold import bn_scale_shift
from .build import foldable_vector, verdict_vector
from .encoding import FORMAT
from .layers import apply_layer, conv_layer, fold_pair, linear_layer, verify_fold, weight_shape
from .rounding import round_to_dtype

__all__ = ["CASES", "case", "describe", "build_case", "build_all"]

CaseFunction = Callable[[], dict]
CASES: dict[str, CaseFunction] = {}


def case(function: CaseFunction) -> CaseFunction:
    """Register ``function`` as the case named ``function.__name__``; its docstring is the description."""
    name = function.__name__
    if name in CASES:
        raise ValueError(f"conformance case name {name!r} is registered twice "
                         f"({CASES[name].__module__}.{CASES[name].__qualname__} and "
                         f"{function.__module__}.{function.__qualname__})")
    if not describe(function):
        raise ValueError(f"conformance case {name!r} has no docstring: it is the case's description")
    CASES[name] = function
    return function


def describe(function: Callable) -> str:
    """A case function's docstring on one line: the vector's ``description``."""
    return " ".join((function.__doc__ or "").split())


def build_case(name: str) -> dict[str, Any]:
    """Run the case function registered under ``name`` and return its vector."""
    if name not in CASES:
        raise ValueError(f"unknown conformance case {name!r}; known: {', '.join(sorted(CASES))}")
    function = CASES[name]
    try:
        body = function()
    except ValueError as error:
        raise ValueError(f"case {name!r}: {error}") from error
    return {"format": FORMAT, "name": name, "description": describe(function), **body}


def build_all() -> dict[str, dict]:
    """Every registered case's vector, by name, in sorted order."""
    return {name: build_case(name) for name in sorted(CASES)}


# ---------------------------------------------------------------------------------------------
# Inputs.

def dyadic(rng: np.random.Generator, shape: tuple[int, ...], denominator: int = 8, high: int = 8) -> np.ndarray:
    """Small multiples of 1/denominator: sums of their products are exact in float64 in any order,
    so a probe output does not depend on how a BLAS orders its sums."""
    return rng.integers(-high, high + 1, size=shape).astype(np.float64) / denominator


def random_bn(rng: np.random.Generator, channels: int, dtype: str, *, exact: bool = False) -> dict:
    """Running statistics and affine parameters; ``exact`` makes the BatchNorm dyadic (var + eps a
    power of 4, so s is a power of 2) so that BN followed by a conv is exact in float64."""
    eps = 2.0**-16 if exact else 1e-5
    if exact:
        var = 4.0 ** rng.integers(-2, 2, size=channels).astype(np.float64) - eps
        mean, gamma, beta = dyadic(rng, (channels,), 4), dyadic(rng, (channels,), 8), dyadic(rng, (channels,), 4)
        gamma = np.where(gamma == 0, 1.0, gamma)
    else:
        var = rng.uniform(0.05, 4.0, channels)
        mean, gamma, beta = rng.normal(0, 1, channels), rng.uniform(0.25, 2.0, channels), rng.normal(0, 0.5, channels)
    return {"num_features": channels, "eps": eps, "affine": True, "track_running_stats": True,
            "running_mean": round_to_dtype(mean, dtype), "running_var": round_to_dtype(var, dtype),
            "weight": round_to_dtype(gamma, dtype), "bias": round_to_dtype(beta, dtype)}


def conv_then_bn(seed: int, layer: dict, *, dtype: str = "float32", affine: bool = True, batch: int = 2,
                 spatial: int = 5) -> dict:
    """A conv (or transposed conv) with dyadic weights followed by a random BatchNorm, with a probe."""
    rng = np.random.default_rng(seed)
    # Dyadic weights, biases and probe input keep the conv exact in float64, so the probe output is
    # reproducible bit for bit on any machine; the BatchNorm parameters are arbitrary float32 values.
    weight = dyadic(rng, weight_shape(layer))
    bias = dyadic(rng, (layer["out_channels"],), 4) if layer["bias"] else None
    bn = random_bn(rng, layer["out_channels"], dtype)
    if not affine:
        bn.update(affine=False, weight=None, bias=None)
    x = dyadic(rng, (batch, layer["in_channels"]) + (spatial,) * layer["dims"], 4)
    return foldable_vector("conv_bn", layer, weight, bias, bn, dtype, x)


def bn_then_conv(seed: int, layer: dict, *, dtype: str = "float32") -> dict:
    """A dyadic BatchNorm (exact in float64) followed by a conv with dyadic weights, with a probe."""
    rng = np.random.default_rng(seed)
    weight = dyadic(rng, weight_shape(layer))
    bias = dyadic(rng, (layer["out_channels"],), 4) if layer["bias"] else None
    bn = random_bn(rng, layer["in_channels"], dtype, exact=True)
    x = dyadic(rng, (2, layer["in_channels"]) + (5,) * layer["dims"], 4)
    return foldable_vector("bn_conv", layer, weight, bias, bn, dtype, x)


def _refuses_to_fold(fold: str, layer: dict, weight: np.ndarray, bias: np.ndarray | None, bn: dict) -> bool:
    try:
        fold_pair(fold, layer, weight, bias, bn)
    except ValueError:
        return True
    return False


# ---------------------------------------------------------------------------------------------
# The cases. Conv -> BatchNorm.

@case
def conv1d_bn() -> dict:
    """Conv1d (3 -> 4 channels, kernel 3, padding 1, bias) followed by BatchNorm1d."""
    return conv_then_bn(101, conv_layer(1, 3, 4, 3, padding=1))


@case
def conv2d_bn() -> dict:
    """Conv2d (2 -> 3 channels, kernel 3, padding 1, bias) followed by BatchNorm2d."""
    return conv_then_bn(102, conv_layer(2, 2, 3, 3, padding=1))


@case
def conv3d_bn() -> dict:
    """Conv3d (2 -> 2 channels, kernel 3, padding 1, bias) followed by BatchNorm3d."""
    return conv_then_bn(103, conv_layer(3, 2, 2, 3, padding=1), batch=1, spatial=4)


@case
def conv2d_bn_float64() -> dict:
    """Conv2d followed by BatchNorm2d with parameters stored in float64: the tightest error model."""
    return conv_then_bn(104, conv_layer(2, 2, 3, 3, padding=1), dtype="float64")


@case
def conv2d_bn_grouped() -> dict:
    """Grouped Conv2d (4 -> 6 channels, groups 2): the BatchNorm scales output channels, axis 0."""
    return conv_then_bn(105, conv_layer(2, 4, 6, 3, padding=1, groups=2))


@case
def conv2d_bn_depthwise() -> dict:
    """Depthwise Conv2d with channel multiplier 2 (3 -> 6 channels, groups 3) followed by BatchNorm2d."""
    return conv_then_bn(106, conv_layer(2, 3, 6, 3, padding=1, groups=3))


@case
def conv2d_bn_dilated() -> dict:
    """Dilated Conv2d (dilation 2, padding 2) followed by BatchNorm2d."""
    return conv_then_bn(107, conv_layer(2, 2, 3, 3, padding=2, dilation=2), spatial=6)


@case
def conv2d_bn_strided() -> dict:
    """Strided Conv2d (stride 2, padding 1) followed by BatchNorm2d."""
    return conv_then_bn(108, conv_layer(2, 2, 3, 3, stride=2, padding=1), spatial=6)


@case
def conv_transpose2d_bn_grouped() -> dict:
    """ConvTranspose2d (4 -> 6 channels, groups 2, stride 2) followed by BatchNorm2d. The weight is
    [in, out/groups, k, k]: output channel g*3 + j is axis-1 index j of group g's input channels, so
    the scale must be laid out per group (scaling axis 1 by s[:3] alone, as torch's fuse helper does,
    is wrong)."""
    layer = conv_layer(2, 4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, transposed=True)
    return conv_then_bn(109, layer, spatial=3)


@case
def conv_transpose1d_bn() -> dict:
    """ConvTranspose1d (3 -> 2 channels, stride 2, no bias) followed by BatchNorm1d."""
    return conv_then_bn(110, conv_layer(1, 3, 2, 3, stride=2, transposed=True, bias=False), spatial=4)


@case
def conv2d_bn_affine_off() -> dict:
    """Conv2d followed by BatchNorm2d(affine=False): gamma = 1, beta = 0 (weight and bias are null)."""
    return conv_then_bn(111, conv_layer(2, 2, 3, 3, padding=1), affine=False)


@case
def conv2d_nobias_bn() -> dict:
    """Conv2d without bias followed by BatchNorm2d: the folded bias is beta - mu * s."""
    return conv_then_bn(112, conv_layer(2, 2, 3, 3, padding=1, bias=False))


@case
def conv2d_bn_tiny_variance() -> dict:
    """Running variances 0, 1e-30 and 1e-12 with eps = 1e-10: the scale (about 1e5) is dominated by
    eps, and an implementation that drops eps divides by zero."""
    rng = np.random.default_rng(113)
    layer = conv_layer(2, 2, 3, 3, padding=1)
    weight, bias = dyadic(rng, weight_shape(layer)), dyadic(rng, (3,), 4)
    bn = random_bn(rng, 3, "float32")
    bn["running_var"] = round_to_dtype([0.0, 1e-30, 1e-12], "float32")
    bn["eps"] = 1e-10
    return foldable_vector("conv_bn", layer, weight, bias, bn, "float32", dyadic(rng, (1, 2, 4, 4), 4))


@case
def conv2d_bn_large_variance() -> dict:
    """Running variances 1e6, 1e20 and 1e36 (near float32's largest value) with means up to 3e17:
    the scale goes down to 1e-18 and the folded bias is a difference of large terms, so only a
    relative (not an absolute) tolerance can judge it."""
    rng = np.random.default_rng(114)
    layer = conv_layer(2, 2, 3, 3, padding=1)
    weight, bias = dyadic(rng, weight_shape(layer)), dyadic(rng, (3,), 4)
    bn = random_bn(rng, 3, "float32")
    bn["running_var"] = round_to_dtype([1e6, 1e20, 1e36], "float32")
    bn["running_mean"] = round_to_dtype([1e3, -1e10, 3e17], "float32")
    return foldable_vector("conv_bn", layer, weight, bias, bn, "float32", dyadic(rng, (1, 2, 4, 4), 4))


@case
def linear_bn() -> dict:
    """Linear (5 -> 4 features, bias) followed by BatchNorm1d."""
    rng = np.random.default_rng(115)
    weight, bias = dyadic(rng, (4, 5)), dyadic(rng, (4,), 4)
    bn = random_bn(rng, 4, "float32")
    return foldable_vector("linear_bn", linear_layer(5, 4), weight, bias, bn, "float32", dyadic(rng, (3, 5), 4))


# BatchNorm -> conv / linear: exact only without padding or with padding that copies BN outputs.

@case
def bn_conv2d() -> dict:
    """BatchNorm2d followed by an unpadded Conv2d (3 -> 2 channels, kernel 3): exact; the shift
    folds into the bias as b + sum W * t."""
    return bn_then_conv(201, conv_layer(2, 3, 2, 3))


@case
def bn_conv2d_grouped() -> dict:
    """BatchNorm2d followed by an unpadded grouped Conv2d (4 -> 4 channels, groups 2): BN channel c
    scales axis-1 index c mod 2 of the output channels in group c // 2 only."""
    return bn_then_conv(202, conv_layer(2, 4, 4, 3, groups=2))


@case
def bn_conv2d_reflect() -> dict:
    """BatchNorm2d followed by Conv2d with padding 1, padding_mode='reflect': the padding copies BN
    outputs, so the fold is exact."""
    return bn_then_conv(203, conv_layer(2, 2, 3, 3, padding=1, padding_mode="reflect"))


@case
def bn_conv2d_replicate() -> dict:
    """BatchNorm2d followed by Conv2d with padding 1, padding_mode='replicate': exact."""
    return bn_then_conv(204, conv_layer(2, 2, 3, 3, padding=1, padding_mode="replicate"))


@case
def bn_conv1d_circular() -> dict:
    """BatchNorm1d followed by Conv1d with padding 2, padding_mode='circular': exact."""
    return bn_then_conv(205, conv_layer(1, 2, 3, 3, padding=2, padding_mode="circular", bias=False))


@case
def bn_linear() -> dict:
    """BatchNorm1d followed by Linear (4 -> 3 features): always exact, b' = b + W @ t."""
    rng = np.random.default_rng(206)
    weight, bias = dyadic(rng, (3, 4)), dyadic(rng, (3,), 4)
    bn = random_bn(rng, 4, "float32", exact=True)
    return foldable_vector("bn_linear", linear_layer(4, 3), weight, bias, bn, "float32", dyadic(rng, (3, 4), 4))


# Low-precision storage: expected values are the float64 fold rounded once; folding in the
# parameter dtype gets them wrong (tests/test_conformance.py checks that it does).

def _low_precision_bn(dtype: str, eps: float, **values: Any) -> dict:
    return {"num_features": len(values["running_mean"]), "eps": eps, "affine": True, "track_running_stats": True,
            **{key: round_to_dtype(value, dtype) for key, value in values.items()}}


@case
def conv2d_bn_float16() -> dict:
    """Conv2d 1x1 (2 -> 4 channels) and BatchNorm2d stored in float16. Channel 0: gamma = 300 and
    var + eps = 1.1e-5 make s = 90453, which overflows float16 although every folded value fits.
    Channel 1: the bias cancels ((b - mu) * s ~ -beta). Channel 2: eps = 1e-5 is below float16's
    resolution of var = 0.5. Channel 3: an ordinary channel."""
    weight = round_to_dtype([[0.01, -0.0123], [1.37, 0.71], [3.3, -2.9], [0.61, 0.23]], "float16").reshape(4, 2, 1, 1)
    bias = round_to_dtype([0.5, 1000.0, 0.3, -0.7], "float16")
    bn = _low_precision_bn("float16", 1e-5, running_mean=[0.2, 999.5, 0.1, 0.4], running_var=[1e-6, 3.0, 0.5, 1.3],
                           weight=[300.0, 1.0, 1.7, 0.9], bias=[0.1, -0.2886, -0.05, 0.3])
    return foldable_vector("conv_bn", conv_layer(2, 2, 4, 1), weight, bias, bn, "float16")


@case
def linear_bn_bfloat16() -> dict:
    """Linear (3 -> 3 features) and BatchNorm1d stored in bfloat16. Channel 0: the bias cancels.
    Channel 1: eps = 1e-2 is swallowed by var = 1 in bfloat16 arithmetic. Channel 2: a large
    gamma times a large weight."""
    weight = round_to_dtype([[1.3, -0.7, 2.1], [0.37, 0.91, -1.23], [170.0, -33.0, 9.5]], "bfloat16")
    bias = round_to_dtype([250.0, 0.4, -3.0], "bfloat16")
    bn = _low_precision_bn("bfloat16", 1e-2, running_mean=[249.0, 0.1, 2.0], running_var=[2.0, 1.0, 0.3],
                           weight=[1.0, 1.5, 300.0], bias=[-0.703, 0.2, 7.0])
    return foldable_vector("linear_bn", linear_layer(3, 3), weight, bias, bn, "bfloat16")


@case
def bn_linear_float16() -> dict:
    """BatchNorm1d followed by Linear (6 -> 2 features), stored in float16: the shift b + W @ t is a
    sum of terms that nearly cancel, which float16 accumulation gets wrong by many ulps."""
    rng = np.random.default_rng(303)
    weight = round_to_dtype(rng.normal(0, 2, (2, 6)), "float16")
    bias = round_to_dtype([0.25, -1.5], "float16")
    bn = _low_precision_bn("float16", 1e-5, running_mean=rng.normal(0, 30, 6), running_var=rng.uniform(0.5, 3, 6),
                           weight=rng.uniform(0.5, 2, 6), bias=rng.normal(0, 1, 6))
    return foldable_vector("bn_linear", linear_layer(6, 2), weight, bias, bn, "float16")


@case
def conv1d_bn_bfloat16() -> dict:
    """Conv1d (2 -> 3 channels, kernel 3) and BatchNorm1d stored in bfloat16, random values: folding
    in bfloat16 arithmetic rounds up to four times, folding in float64 once."""
    rng = np.random.default_rng(304)
    weight = round_to_dtype(rng.normal(0, 1, (3, 2, 3)), "bfloat16")
    bias = round_to_dtype(rng.normal(0, 1, 3), "bfloat16")
    bn = _low_precision_bn("bfloat16", 1e-5, running_mean=rng.normal(0, 1, 3), running_var=rng.uniform(0.2, 3, 3),
                           weight=rng.uniform(0.5, 2, 3), bias=rng.normal(0, 1, 3))
    return foldable_vector("conv_bn", conv_layer(1, 2, 3, 3), weight, bias, bn, "bfloat16")


# Cases that must not be folded, and invalid parameters.

@case
def bn_conv2d_zero_padding() -> dict:
    """BatchNorm2d with a nonzero shift followed by a zero-padded Conv2d (padding 1): the padding
    zeros are inserted after the BatchNorm, where a folded conv would see t instead of 0, so the
    borders come out wrong. Expected verdict: not_foldable: zero_padding."""
    rng = np.random.default_rng(401)
    layer = conv_layer(2, 2, 3, 3, padding=1)
    weight, bias = dyadic(rng, weight_shape(layer)), dyadic(rng, (3,), 4)
    bn = random_bn(rng, 2, "float32")
    # Demonstrate the verdict with the reference ops: the folded conv misses the error model at a border.
    check = verify_fold("bn_conv", layer, weight, bias, bn, dyadic(rng, (1, 2, 4, 4), 4))
    if check.ok or 0 < check.index[2] < 3 and 0 < check.index[3] < 3:
        raise ValueError("the fold is not wrong at the border; pick another seed")
    return verdict_vector("bn_conv", layer, weight, bias, bn, "float32", "not_foldable: zero_padding")


@case
def bn_conv_transpose2d() -> dict:
    """BatchNorm2d followed by ConvTranspose2d (stride 2, kernel 3): the shift t reaches an output
    position through 1, 2 or 4 kernel taps depending on the position, so it is not a per-channel
    bias. Expected verdict: not_foldable: transposed_after_bn."""
    rng = np.random.default_rng(402)
    layer = conv_layer(2, 2, 3, 3, stride=2, padding=1, transposed=True)
    weight, bias = dyadic(rng, weight_shape(layer)), dyadic(rng, (3,), 4)
    bn = random_bn(rng, 2, "float32")
    # The shift's contribution: the layer (without bias) applied to the constant image t.
    _, shift = bn_scale_shift(bn["running_mean"], bn["running_var"], bn["eps"], bn["weight"], bn["bias"])
    contribution = apply_layer(layer, np.broadcast_to(shift[None, :, None, None], (1, 2, 4, 4)).copy(), weight, None)
    if np.ptp(contribution[0, 0]) == 0:
        raise ValueError("the shift happens to be constant per channel; pick another seed")
    return verdict_vector("bn_conv", layer, weight, bias, bn, "float32", "not_foldable: transposed_after_bn")


@case
def conv2d_bn_no_running_stats() -> dict:
    """Conv2d followed by BatchNorm2d(track_running_stats=False): it normalises with the statistics
    of each batch, even in eval mode, so there is nothing constant to fold. Expected verdict:
    not_foldable: no_running_stats."""
    rng = np.random.default_rng(403)
    layer = conv_layer(2, 2, 3, 3, padding=1)
    weight, bias = dyadic(rng, weight_shape(layer)), dyadic(rng, (3,), 4)
    bn = random_bn(rng, 3, "float32")
    bn.update(track_running_stats=False, running_mean=None, running_var=None)
    return verdict_vector("conv_bn", layer, weight, bias, bn, "float32", "not_foldable: no_running_stats")


@case
def conv2d_bn_negative_variance() -> dict:
    """Conv2d followed by BatchNorm2d whose running variance of channel 1 is -0.5 (corrupt
    statistics): folding must refuse rather than produce NaN. Expected verdict: invalid: negative_variance."""
    rng = np.random.default_rng(404)
    layer = conv_layer(2, 2, 3, 3, padding=1)
    weight, bias = dyadic(rng, weight_shape(layer)), dyadic(rng, (3,), 4)
    bn = random_bn(rng, 3, "float32")
    bn["running_var"][1] = -0.5
    if not _refuses_to_fold("conv_bn", layer, weight, bias, bn):
        raise ValueError("refimpl folded a negative variance")
    return verdict_vector("conv_bn", layer, weight, bias, bn, "float32", "invalid: negative_variance")


@case
def conv2d_bn_channel_mismatch() -> dict:
    """Conv2d with 3 output channels followed by a BatchNorm2d with 4 features. Expected verdict:
    invalid: channel_mismatch."""
    rng = np.random.default_rng(405)
    layer = conv_layer(2, 2, 3, 3, padding=1)
    weight, bias = dyadic(rng, weight_shape(layer)), dyadic(rng, (3,), 4)
    bn = random_bn(rng, 4, "float32")
    if not _refuses_to_fold("conv_bn", layer, weight, bias, bn):
        raise ValueError("refimpl folded mismatched channels")
    return verdict_vector("conv_bn", layer, weight, bias, bn, "float32", "invalid: channel_mismatch")

"""The merge cases: parallel branches summed, and chains, merged into one layer (or refused).

Registered with :func:`.cases.case` like the fold cases. Every weight, bias and probe input is
dyadic (:func:`.cases.dyadic`) and every BatchNorm that runs *before* a layer is dyadic too, so each
product and sum a merge or a probe computes ahead of a BatchNorm scale is exact in float64 and the
files do not depend on a BLAS's summation order.
"""

from __future__ import annotations

import numpy as np

from .branches import avg_pool_op, bn_op, branch, layer_op, merge_inputs, scale_op
from .build import merge_verdict_vector, mergeable_vector
from .cases import case, dyadic, random_bn
from .layers import conv_layer, linear_layer, weight_shape
from .rounding import round_to_dtype

__all__: list[str] = []


def _conv(rng: np.random.Generator, dims: int, in_channels: int, out_channels: int, kernel, *, bias: bool = True,
          dtype: str = "float32", **geometry) -> dict:
    """A conv op with dyadic weights (and bias) and the given geometry."""
    layer = conv_layer(dims, in_channels, out_channels, kernel, bias=bias, **geometry)
    weight = round_to_dtype(dyadic(rng, weight_shape(layer)), dtype)
    return layer_op(layer, weight, round_to_dtype(dyadic(rng, (out_channels,), 4), dtype) if bias else None)


def _linear(rng: np.random.Generator, in_features: int, out_features: int, *, bias: bool = True) -> dict:
    layer = linear_layer(in_features, out_features, bias=bias)
    return layer_op(layer, dyadic(rng, weight_shape(layer)), dyadic(rng, (out_features,), 4) if bias else None)


def _bn(rng: np.random.Generator, channels: int, dtype: str = "float32", *, exact: bool = False) -> dict:
    return bn_op(random_bn(rng, channels, dtype, exact=exact))


def _x(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return dyadic(rng, shape, 4)


def _repvgg(seed: int, dtype: str) -> dict:
    """RepVGG's three branches on 4 channels, stored in ``dtype``."""
    rng = np.random.default_rng(seed)
    inputs = merge_inputs(2, 4, [
        branch(_conv(rng, 2, 4, 4, 3, padding=1, bias=False, dtype=dtype), _bn(rng, 4, dtype)),
        branch(_conv(rng, 2, 4, 4, 1, bias=False, dtype=dtype), _bn(rng, 4, dtype)),
        branch(_bn(rng, 4, dtype)),
    ])
    return mergeable_vector(inputs, dtype, _x(rng, (2, 4, 5, 5)))


# ---------------------------------------------------------------------------------------------
# Sums of branches that merge

@case
def merge_repvgg_3x3_1x1_identity() -> dict:
    """RepVGG: conv3x3 (padding 1, no bias) + BN, conv1x1 (no bias) + BN and a BN alone on the input,
    4 channels. The 1x1 kernel is centred in the 3x3 one, the lone BN is the identity kernel scaled
    per channel, and the three folded biases are summed."""
    return _repvgg(501, "float32")


@case
def merge_repvgg_stride2_no_identity() -> dict:
    """A RepVGG block with stride 2 (3 -> 4 channels, no identity branch): conv3x3 (stride 2,
    padding 1) + BN and conv1x1 (stride 2, padding 0) + BN. The 1x1 kernel centred in the 3x3 reads
    the positions it read, so the merged conv has stride 2 and padding 1."""
    rng = np.random.default_rng(502)
    inputs = merge_inputs(2, 3, [
        branch(_conv(rng, 2, 3, 4, 3, stride=2, padding=1, bias=False), _bn(rng, 4)),
        branch(_conv(rng, 2, 3, 4, 1, stride=2, bias=False), _bn(rng, 4)),
    ])
    return mergeable_vector(inputs, "float32", _x(rng, (2, 3, 7, 7)))


@case
def merge_acnet_1x3_3x1() -> dict:
    """ACNet's asymmetric branches, each with its BN (3 -> 4 channels): conv3x3 (padding 1), conv1x3
    (padding (0, 1)) and conv3x1 (padding (1, 0)). Each is centred per dim: the 1x3 kernel lands in
    the middle row of the 3x3, the 3x1 kernel in its middle column."""
    rng = np.random.default_rng(503)
    inputs = merge_inputs(2, 3, [
        branch(_conv(rng, 2, 3, 4, 3, padding=1), _bn(rng, 4)),
        branch(_conv(rng, 2, 3, 4, (1, 3), padding=(0, 1)), _bn(rng, 4)),
        branch(_conv(rng, 2, 3, 4, (3, 1), padding=(1, 0)), _bn(rng, 4)),
    ])
    return mergeable_vector(inputs, "float32", _x(rng, (1, 3, 5, 6)))


@case
def merge_grouped_identity() -> dict:
    """A grouped conv3x3 (8 -> 8 channels, groups 2, padding 1) + BN and a BN alone on the input: the
    depthwise identity is laid out in 2 groups of 4 input channels, output channel o reading input
    position o mod 4 of its group, at the centre tap."""
    rng = np.random.default_rng(504)
    inputs = merge_inputs(2, 8, [
        branch(_conv(rng, 2, 8, 8, 3, padding=1, groups=2, bias=False), _bn(rng, 8)),
        branch(_bn(rng, 8)),
    ])
    return mergeable_vector(inputs, "float32", _x(rng, (1, 8, 4, 4)))


@case
def merge_depthwise_avgpool() -> dict:
    """A depthwise conv3x3 (4 channels, padding 1, bias) plus an average pool (3x3, stride 1,
    padding 1, count_include_pad=True) followed by a BN: the pool is the depthwise kernel 1/9 at every
    tap with zero padding 1, and the BN after it scales that kernel."""
    rng = np.random.default_rng(505)
    inputs = merge_inputs(2, 4, [
        branch(_conv(rng, 2, 4, 4, 3, padding=1, groups=4)),
        branch(avg_pool_op(2, 3, 1, 1), _bn(rng, 4)),
    ])
    return mergeable_vector(inputs, "float32", _x(rng, (1, 4, 5, 5)))


@case
def merge_repmixer_difference() -> dict:
    """FastViT's RepMixer, x + gamma * (mixer(x) - norm(x)) with mixer(x) = BN(dwconv3x3(x)) +
    BN(dwconv1x1(x)) + BN(x) and norm(x) = BN'(x), written as five branches: the input itself, and
    four branches scaled by the layer scale gamma (one value per channel), the last with coefficient
    -1. 4 channels, depthwise convs without bias."""
    rng = np.random.default_rng(506)
    gamma = scale_op(round_to_dtype(rng.uniform(0.05, 1.5, 4), "float32"))
    inputs = merge_inputs(2, 4, [
        branch(),
        branch(_conv(rng, 2, 4, 4, 3, padding=1, groups=4, bias=False), _bn(rng, 4), gamma),
        branch(_conv(rng, 2, 4, 4, 1, groups=4, bias=False), _bn(rng, 4), gamma),
        branch(_bn(rng, 4), gamma),
        branch(_bn(rng, 4), gamma, coefficient=-1.0),
    ])
    return mergeable_vector(inputs, "float32", _x(rng, (2, 4, 4, 4)))


@case
def merge_bn_after_sum() -> dict:
    """RepViT's token mixer, BN(BN3(conv3x3(x)) + conv1x1(x) + x), 4 channels: the BN after the sum
    folds into the merged kernel (as a conv followed by a BN), after the conv1x1's own bias and the
    identity have been summed in."""
    rng = np.random.default_rng(507)
    inputs = merge_inputs(2, 4, [
        branch(_conv(rng, 2, 4, 4, 3, padding=1, bias=False), _bn(rng, 4)),
        branch(_conv(rng, 2, 4, 4, 1)),
        branch(),
    ], after=(_bn(rng, 4),))
    return mergeable_vector(inputs, "float32", _x(rng, (1, 4, 5, 5)))


@case
def merge_linear_identity() -> dict:
    """Linear branches on 6 features, stored in float64: fc1(x) + fc2(x) + x with fc2 without bias.
    A linear layer is a conv without spatial dims; the identity is the 6x6 identity matrix."""
    rng = np.random.default_rng(508)
    inputs = merge_inputs(0, 6, [branch(_linear(rng, 6, 6)), branch(_linear(rng, 6, 6, bias=False)), branch()])
    return mergeable_vector(inputs, "float64", _x(rng, (3, 6)))


@case
def merge_linear_bn_before() -> dict:
    """Two BatchNorm1d -> Linear branches averaged, (l1(bn1(x)) + l2(bn2(x))) * 0.5 (6 -> 3 features,
    float64; l2 without bias). Each BN runs before its linear layer, so it scales the layer's input
    columns and its shift enters the bias through the weights; the 0.5 after the sum scales all."""
    rng = np.random.default_rng(509)
    inputs = merge_inputs(0, 6, [
        branch(_bn(rng, 6, "float64", exact=True), _linear(rng, 6, 3)),
        branch(_bn(rng, 6, "float64", exact=True), _linear(rng, 6, 3, bias=False)),
    ], after=(scale_op(0.5),))
    return mergeable_vector(inputs, "float64", _x(rng, (4, 6)))


@case
def merge_dilated_with_1x1() -> dict:
    """conv3x3 with dilation 2 and padding 2, plus conv1x1 with dilation 3 (3 -> 4 channels, biases): a
    one-tap kernel reads one position whatever its dilation, so the merged conv has dilation 2 and
    padding 2."""
    rng = np.random.default_rng(510)
    inputs = merge_inputs(2, 3, [
        branch(_conv(rng, 2, 3, 4, 3, padding=2, dilation=2)),
        branch(_conv(rng, 2, 3, 4, 1, dilation=3)),
    ])
    return mergeable_vector(inputs, "float32", _x(rng, (1, 3, 6, 6)))


@case
def merge_reflect_with_unpadded() -> dict:
    """conv3x3 with padding 1 in padding_mode='reflect', plus an unpadded conv1x1 (3 -> 4 channels):
    the 1x1 branch never reads padding, so the merged conv pads with reflect."""
    rng = np.random.default_rng(511)
    inputs = merge_inputs(2, 3, [
        branch(_conv(rng, 2, 3, 4, 3, padding=1, padding_mode="reflect")),
        branch(_conv(rng, 2, 3, 4, 1)),
    ])
    return mergeable_vector(inputs, "float32", _x(rng, (1, 3, 5, 5)))


# Chains of two layers, one of them pointwise

@case
def compose_1x1_bn_3x3_valid() -> dict:
    """DBB's chain conv1x1 (3 -> 4 channels, no bias) -> BN -> conv3x3 (4 -> 2 channels, no padding,
    bias): the BN's shift passes through the 3x3 kernel into the bias, exact because nothing pads."""
    rng = np.random.default_rng(512)
    inputs = merge_inputs(2, 3, [branch(_conv(rng, 2, 3, 4, 1, bias=False), _bn(rng, 4, exact=True),
                                        _conv(rng, 2, 4, 2, 3))])
    return mergeable_vector(inputs, "float32", _x(rng, (1, 3, 5, 5)))


@case
def compose_1x1_3x3_no_shift_padded() -> dict:
    """conv1x1 without bias (3 -> 4 channels) -> conv3x3 with padding 1 (4 -> 2 channels, bias): the
    pointwise layer has no constant term, so the padding zeros it would see are zeros of the input
    too, and the chain is exact with padding."""
    rng = np.random.default_rng(513)
    inputs = merge_inputs(2, 3, [branch(_conv(rng, 2, 3, 4, 1, bias=False), _conv(rng, 2, 4, 2, 3, padding=1))])
    return mergeable_vector(inputs, "float32", _x(rng, (1, 3, 4, 4)))


@case
def compose_centre_only_shift() -> dict:
    """conv1x1 with bias (2 -> 3 channels) -> conv3x3 with padding 1 (3 -> 2 channels) whose kernel is
    zero off its centre tap, float64: the centre tap never reads padding, so the 1x1's bias may pass
    through it although the conv zero-pads. The merged conv keeps the 3x3 size and padding 1."""
    rng = np.random.default_rng(514)
    outer = _conv(rng, 2, 3, 2, 3, padding=1)
    centre_only = np.zeros_like(outer["weight"])
    centre_only[:, :, 1, 1] = outer["weight"][:, :, 1, 1]
    outer["weight"] = centre_only
    inputs = merge_inputs(2, 2, [branch(_conv(rng, 2, 2, 3, 1), outer)])
    return mergeable_vector(inputs, "float64", _x(rng, (1, 2, 4, 4)))


@case
def compose_3x3_then_1x1() -> dict:
    """conv3x3 (stride 2, padding 1, bias; 3 -> 4 channels) -> conv1x1 (bias; 4 -> 2 channels): the
    pointwise layer is second, which is always exact; the merged conv has the 3x3 geometry and the
    bias W_1x1 b_3x3 + b_1x1."""
    rng = np.random.default_rng(515)
    inputs = merge_inputs(2, 3, [branch(_conv(rng, 2, 3, 4, 3, stride=2, padding=1), _conv(rng, 2, 4, 2, 1))])
    return mergeable_vector(inputs, "float32", _x(rng, (1, 3, 6, 6)))


# Low-precision storage: the float64 merge rounded once

@case
def merge_repvgg_float16() -> dict:
    """The RepVGG case with every parameter stored in float16: the expected kernel and bias are the
    float64 merge (each branch's BN folded in float64, then centred and summed) rounded once to
    float16, bit for bit. Merging in float16 rounds at every step."""
    return _repvgg(516, "float16")


@case
def merge_repvgg_bfloat16() -> dict:
    """The RepVGG case with every parameter stored in bfloat16: the float64 merge rounded once to
    bfloat16, bit for bit."""
    return _repvgg(517, "bfloat16")


# ---------------------------------------------------------------------------------------------
# Branches that must not be merged

@case
def merge_even_kernel() -> dict:
    """conv2x2 + conv1x1, both with stride 2 and no padding: on even sizes both outputs have the same
    size, but a 2-tap kernel has no centre, so no placement of the 1x1 tap reproduces it at every
    input size. Expected verdict: not_mergeable: padding_misaligned."""
    rng = np.random.default_rng(601)
    inputs = merge_inputs(2, 2, [branch(_conv(rng, 2, 2, 2, 2, stride=2)), branch(_conv(rng, 2, 2, 2, 1, stride=2))])
    return merge_verdict_vector(inputs, "float32", "not_mergeable: padding_misaligned")


@case
def merge_padding_misaligned_stride4() -> dict:
    """conv5x5 (stride 4, padding 2) + conv3x3 (stride 4, padding 0): centred in the 5x5 kernel the
    3x3 taps would need padding 2 - 1 = 1, not 0, to read the positions they read. Expected verdict:
    not_mergeable: padding_misaligned."""
    rng = np.random.default_rng(602)
    inputs = merge_inputs(2, 2, [branch(_conv(rng, 2, 2, 2, 5, stride=4, padding=2)),
                                 branch(_conv(rng, 2, 2, 2, 3, stride=4))])
    return merge_verdict_vector(inputs, "float32", "not_mergeable: padding_misaligned")


@case
def merge_dilation_mismatch() -> dict:
    """conv3x3 with dilation 2 (padding 2) + conv3x3 with dilation 1 (padding 1): the merged conv has
    one dilation, and neither kernel centres in the other with it. (A dense 5x5 kernel with dilation
    1 would hold both; refimpl does not build such kernels.) Expected verdict: not_mergeable:
    dilation_mismatch."""
    rng = np.random.default_rng(603)
    inputs = merge_inputs(2, 2, [branch(_conv(rng, 2, 2, 2, 3, padding=2, dilation=2)),
                                 branch(_conv(rng, 2, 2, 2, 3, padding=1))])
    return merge_verdict_vector(inputs, "float32", "not_mergeable: dilation_mismatch")


@case
def merge_padding_mode_mismatch() -> dict:
    """conv3x3 with padding 1 in padding_mode='reflect' + conv3x3 with zero padding 1: the merged
    conv can fill its padding one way only. Expected verdict: not_mergeable: padding_mode_mismatch."""
    rng = np.random.default_rng(604)
    inputs = merge_inputs(2, 2, [branch(_conv(rng, 2, 2, 2, 3, padding=1, padding_mode="reflect")),
                                 branch(_conv(rng, 2, 2, 2, 3, padding=1))])
    return merge_verdict_vector(inputs, "float32", "not_mergeable: padding_mode_mismatch")


@case
def merge_stride_mismatch() -> dict:
    """conv1x1 with stride 1 + conv1x1 with stride 2: the outputs do not even have the same size.
    Expected verdict: not_mergeable: stride_mismatch."""
    rng = np.random.default_rng(605)
    inputs = merge_inputs(2, 2, [branch(_conv(rng, 2, 2, 2, 1)), branch(_conv(rng, 2, 2, 2, 1, stride=2))])
    return merge_verdict_vector(inputs, "float32", "not_mergeable: stride_mismatch")


@case
def compose_zero_padding() -> dict:
    """conv1x1 -> BN (nonzero shift) -> conv3x3 with zero padding 1: the 3x3 conv's border taps read
    zeros in the original and the BN's shift in the merged conv. Expected verdict: not_mergeable:
    zero_padding."""
    rng = np.random.default_rng(606)
    inputs = merge_inputs(2, 2, [branch(_conv(rng, 2, 2, 3, 1, bias=False), _bn(rng, 3, exact=True),
                                        _conv(rng, 2, 3, 2, 3, padding=1))])
    return merge_verdict_vector(inputs, "float32", "not_mergeable: zero_padding")


@case
def compose_neither_pointwise() -> dict:
    """conv3x3 (padding 1) -> conv3x3 (padding 1): neither layer is pointwise (and the inner padding
    makes the 5x5 composition wrong at the borders). Expected verdict: not_mergeable:
    sequential_unsupported."""
    rng = np.random.default_rng(607)
    inputs = merge_inputs(2, 2, [branch(_conv(rng, 2, 2, 3, 3, padding=1), _conv(rng, 2, 3, 2, 3, padding=1))])
    return merge_verdict_vector(inputs, "float32", "not_mergeable: sequential_unsupported")


@case
def merge_avgpool_exclude_pad() -> dict:
    """A depthwise conv3x3 (padding 1) plus an average pool (3x3, stride 1, padding 1) with
    count_include_pad=False: the border windows are divided by the taps inside the input (4 or 6, not
    9), so no convolution equals the pool. Expected verdict: not_mergeable: unsupported_layer."""
    rng = np.random.default_rng(608)
    inputs = merge_inputs(2, 2, [branch(_conv(rng, 2, 2, 2, 3, padding=1, groups=2)),
                                 branch(avg_pool_op(2, 3, 1, 1, count_include_pad=False))])
    return merge_verdict_vector(inputs, "float32", "not_mergeable: unsupported_layer")

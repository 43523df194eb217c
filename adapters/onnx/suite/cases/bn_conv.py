"""Cases of the bn->conv family: BatchNormalization -> Conv where the conv reads no padding (valid, 1x1 SAME, a
copying Pad between).
"""

from __future__ import annotations

import numpy as np

from .base import GraphBuilder, register


@register("bn_conv_valid", "bn->conv", folds=1, norms_left=0,
          pairs=(("bn", "conv", "bn->conv"),))
def _bn_conv_valid(b: GraphBuilder) -> None:
    """BatchNormalization -> Conv (3x3, no padding): every input the kernel reads is a BN output, so the BN's
    shift folds into the conv bias exactly; one fold."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.conv(b.bn(x, "bn", 3), "conv", 3, 4, 3))


@register("bn_conv_groups_stride", "bn->conv", folds=1, norms_left=0,
          pairs=(("bn", "conv", "bn->conv"),))
def _bn_conv_groups(b: GraphBuilder) -> None:
    """BatchNormalization(4) -> Conv (group 2, stride 2, explicit zero pads, auto_pad VALID-like) -> Relu: BN
    channel c feeds group c // 2; one fold."""
    x = b.input("x", [2, 4, 7, 7])
    b.output(b.node("Relu", [b.conv(b.bn(x, "bn", 4), "conv", 4, 6, 3, group=2, strides=[2, 2],
                                    pads=[0, 0, 0, 0])], "relu"))


@register("bn_conv_same_1x1", "bn->conv", folds=1, norms_left=0,
          pairs=(("bn", "conv", "bn->conv"),))
def _bn_conv_same_1x1(b: GraphBuilder) -> None:
    """BatchNormalization -> Conv 1x1 with auto_pad=SAME_UPPER and stride 2: a 1x1 kernel needs no padding, so
    SAME adds none; one fold."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.conv(b.bn(x, "bn", 3), "conv", 3, 4, 1, auto_pad="SAME_UPPER", strides=[2, 2]))


@register("bn_conv_nobias_valid_auto_pad", "bn->conv", folds=1, norms_left=0,
          pairs=(("bn", "conv", "bn->conv"),))
def _bn_conv_nobias(b: GraphBuilder) -> None:
    """BatchNormalization -> Conv (no bias, auto_pad=VALID, 1-D): the folded conv gains a bias; one fold."""
    x = b.input("x", [2, 3, 9])
    b.output(b.conv(b.bn(x, "bn", 3), "conv", 3, 4, (3,), bias=False, auto_pad="VALID"))


@register("bn_pad_reflect_conv", "bn->conv", folds=1, norms_left=0, opset=18,
          pairs=(("bn", "conv", "bn->conv"),))
def _bn_pad_reflect_conv(b: GraphBuilder) -> None:
    """BatchNormalization -> Pad(mode=reflect, H and W by 1, axes given) -> Conv 3x3 without pads (how exporters
    write a reflect-padded conv): the padded values are copies of BN outputs, so the BN folds into the conv."""
    x = b.input("x", [2, 3, 6, 6])
    pads = b.init("pads", np.array([1, 1, 1, 1], dtype=np.int64))
    axes = b.init("axes", np.array([2, 3], dtype=np.int64))
    y = b.node("Pad", [b.bn(x, "bn", 3), pads, "", axes], "pad", mode="reflect")
    b.output(b.conv(y, "conv", 3, 4, 3))


@register("conv_pad_edge_bn", "conv->bn", folds=1, norms_left=0,
          pairs=(("bn", "conv", "conv->bn"),))
def _conv_pad_edge_bn(b: GraphBuilder) -> None:
    """Conv -> Pad(mode=edge, every spatial side by 2) -> BatchNormalization: edge padding copies conv outputs, so
    BN(pad(conv)) = pad(BN(conv)) and the BN folds into the conv; one fold."""
    x = b.input("x", [2, 3, 6, 6])
    pads = b.init("pads", np.array([0, 0, 2, 2, 0, 0, 2, 2], dtype=np.int64))
    b.output(b.bn(b.node("Pad", [b.conv(x, "conv", 3, 4, 3), pads], "pad", mode="edge"), "bn", 4))


@register("bn_bn_conv", "bn->conv", folds=2, norms_left=0,
          pairs=(("bn2", "conv", "bn->conv"), ("bn1", "conv", "bn->conv")))
def _bn_bn_conv(b: GraphBuilder) -> None:
    """BatchNormalization -> BatchNormalization -> Conv (no padding), the input a graph input: neither BN has
    a producer to fold into, both fold into the conv; two folds."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.conv(b.bn(b.bn(x, "bn1", 3), "bn2", 3), "conv", 3, 4, 3))


@register("bn_add_conv", "bn->conv", folds=1, norms_left=0, pairs=(("bn", "conv", "bn->conv"),))
def _bn_add_conv(b: GraphBuilder) -> None:
    """BatchNormalization -> Add([1, 3, 1, 1]) -> Conv 3x3 without pads: BN + a per-channel constant is still a
    per-channel affine map (its shift B + c), and the conv reads no padding, so it folds exactly; the Add goes;
    one fold."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.conv(b.add_constant(b.bn(x, "bn", 3), "add", (1, 3, 1, 1)), "conv", 3, 4, 3))


@register("bn_add_bn_add_conv", "bn->conv", folds=2, norms_left=0,
          pairs=(("bn2", "conv", "bn->conv"), ("bn1", "conv", "bn->conv")))
def _bn_add_bn_add_conv(b: GraphBuilder) -> None:
    """BN1 -> Add(c1 [3, 1, 1]) -> BN2 -> Add(c2 [1, 3, 1, 1]) -> Conv 1x1: each constant shifts the norm right
    before it (c1 is BN1's, c2 BN2's); both norms fold into the conv, nearest first; two folds."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.add_constant(b.bn(b.add_constant(b.bn(x, "bn1", 3), "add1", (3, 1, 1)), "bn2", 3), "add2", (1, 3, 1, 1))
    b.output(b.conv(y, "conv", 3, 4, 1))

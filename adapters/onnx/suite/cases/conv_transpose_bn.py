"""Cases of the conv_transpose->bn family: ConvTranspose of every rank and grouping -> BatchNormalization."""

from __future__ import annotations

from .base import GraphBuilder, register


@register("conv_transpose2d_bn", "conv_transpose->bn", folds=1, norms_left=0,
          pairs=(("bn", "convt", "conv_transpose->bn"),))
def _convt2d_bn(b: GraphBuilder) -> None:
    """ConvTranspose (3->4, stride 2, pads 1, output_padding 1, bias) -> BatchNormalization: the weight is
    [in, out, k, k], output channel o on axis 1; one fold."""
    x = b.input("x", [2, 3, 5, 5])
    y = b.conv_transpose(x, "convt", 3, 4, 3, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])
    b.output(b.bn(y, "bn", 4))


@register("conv_transpose2d_groups_bn", "conv_transpose->bn", folds=1, norms_left=0,
          pairs=(("bn", "convt", "conv_transpose->bn"),))
def _convt2d_groups_bn(b: GraphBuilder) -> None:
    """Grouped ConvTranspose (4->6, group 2, no bias): weight [in, out/group, k, k], output channel
    g*3 + j sits at axis-1 index j of group g's input rows; one fold."""
    x = b.input("x", [2, 4, 5, 5])
    b.output(b.bn(b.conv_transpose(x, "convt", 4, 6, 3, group=2, bias=False), "bn", 6))


@register("conv_transpose1d_dilation_bn", "conv_transpose->bn", folds=1, norms_left=0,
          pairs=(("bn", "convt", "conv_transpose->bn"),))
def _convt1d_bn(b: GraphBuilder) -> None:
    """1-D ConvTranspose (dilation 2, stride 3) -> BatchNormalization: one fold."""
    x = b.input("x", [2, 3, 7])
    b.output(b.bn(b.conv_transpose(x, "convt", 3, 4, (3,), dilations=[2], strides=[3]), "bn", 4))


@register("conv_transpose3d_groups_bn", "conv_transpose->bn", folds=1, norms_left=0,
          pairs=(("bn", "convt", "conv_transpose->bn"),))
def _convt3d_bn(b: GraphBuilder) -> None:
    """3-D grouped ConvTranspose (6->4, group 2) -> BatchNormalization: one fold."""
    x = b.input("x", [1, 6, 3, 4, 4])
    b.output(b.bn(b.conv_transpose(x, "convt", 6, 4, (2, 2, 2), group=2, strides=[1, 2, 2]), "bn", 4))


@register("paddle_conv_transpose_add_bn", "conv_transpose->bn", folds=1, norms_left=0,
          pairs=(("bn", "convt", "conv_transpose->bn"),))
def _paddle_convt_add_bn(b: GraphBuilder) -> None:
    """ConvTranspose without bias (stride 2) -> Add(bias [1, 4, 1, 1]) -> BatchNormalization, as PaddlePaddle
    exports write a transposed conv's bias: one fold, the Add goes."""
    x = b.input("x", [2, 3, 4, 4])
    y = b.add_constant(b.conv_transpose(x, "convt", 3, 4, 3, bias=False, strides=[2, 2]), "add", (1, 4, 1, 1))
    b.output(b.bn(y, "bn", 4))

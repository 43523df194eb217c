"""Cases of the conv->bn family: Conv -> BatchNormalization, through Identity, Dropout, copying Pads, Concat and
chains of norms.
"""

from __future__ import annotations

from onnx import numpy_helper

from .base import PAD1, GraphBuilder, register


@register("conv2d_bn", "conv->bn", folds=1, norms_left=0,
          pairs=(("bn", "conv", "conv->bn"),))
def _conv2d_bn(b: GraphBuilder) -> None:
    """Conv (3->4, 3x3, pads 1, bias) -> BatchNormalization -> Relu: BN is a per-channel affine map of the
    conv output, so it folds whatever the conv pads; one fold, nothing left."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.node("Relu", [b.bn(b.conv(x, "conv", 3, 4, 3, **PAD1), "bn", 4)], "relu"))


@register("conv2d_nobias_bn", "conv->bn", folds=1, norms_left=0,
          pairs=(("bn", "conv", "conv->bn"),))
def _conv2d_nobias_bn(b: GraphBuilder) -> None:
    """Conv without bias -> BatchNormalization: folds; the folded Conv gains a bias input."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.bn(b.conv(x, "conv", 3, 4, 3, bias=False), "bn", 4))


@register("conv1d_stride_dilation_bn", "conv->bn", folds=1, norms_left=0,
          pairs=(("bn", "conv", "conv->bn"),))
def _conv1d_bn(b: GraphBuilder) -> None:
    """1-D Conv (stride 2, dilation 2, pads 2) -> BatchNormalization on (N, C, L): one fold."""
    x = b.input("x", [2, 3, 11])
    b.output(b.bn(b.conv(x, "conv", 3, 4, (3,), strides=[2], dilations=[2], pads=[2, 2]), "bn", 4))


@register("conv3d_groups_bn", "conv->bn", folds=1, norms_left=0,
          pairs=(("bn", "conv", "conv->bn"),))
def _conv3d_groups_bn(b: GraphBuilder) -> None:
    """3-D Conv with group=2 (4->6 channels) -> BatchNormalization: weight row o still produces channel o, so
    it folds; one fold."""
    x = b.input("x", [1, 4, 4, 5, 5])
    b.output(b.bn(b.conv(x, "conv", 4, 6, (2, 3, 3), group=2, pads=[0, 1, 1, 1, 1, 1]), "bn", 6))


@register("conv2d_depthwise_bn", "conv->bn", folds=1, norms_left=0,
          pairs=(("bn", "conv", "conv->bn"),))
def _conv2d_depthwise_bn(b: GraphBuilder) -> None:
    """Depthwise Conv (group = channels = 4, stride 2) -> BatchNormalization: one fold."""
    x = b.input("x", [2, 4, 7, 7])
    b.output(b.bn(b.conv(x, "conv", 4, 4, 3, group=4, strides=[2, 2], **PAD1), "bn", 4))


@register("conv2d_auto_pad_same_bn", "conv->bn", folds=1, norms_left=0,
          pairs=(("bn", "conv", "conv->bn"),))
def _conv2d_same_bn(b: GraphBuilder) -> None:
    """Conv with auto_pad=SAME_UPPER (zeros added before the products) -> BatchNormalization: one fold."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.bn(b.conv(x, "conv", 3, 4, 3, auto_pad="SAME_UPPER", strides=[2, 2]), "bn", 4))


@register("conv_bn_bn", "conv->bn", folds=2, norms_left=0,
          pairs=(("bn1", "conv", "conv->bn"), ("bn2", "conv", "conv->bn")))
def _conv_bn_bn(b: GraphBuilder) -> None:
    """Conv -> BatchNormalization -> BatchNormalization: a chain of per-channel affine maps; both fold into the
    conv; two folds."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.node("Relu", [b.bn(b.bn(b.conv(x, "conv", 3, 4, 3), "bn1", 4), "bn2", 4)], "relu"))


@register("conv_identity_dropout_bn", "conv->bn", folds=1, norms_left=0, opset=13,
          pairs=(("bn", "conv", "conv->bn"),))
def _conv_identity_bn(b: GraphBuilder) -> None:
    """Conv -> Identity -> Dropout (inference: the identity; mask unused) -> BatchNormalization: the BN
    reads the conv's output unchanged; one fold."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Dropout", [b.node("Identity", [b.conv(x, "conv", 3, 4, 3)], "identity")], "dropout")
    b.output(b.bn(y, "bn", 4))


@register("conv_concat_bn", "conv->bn", folds=1, norms_left=0,
          pairs=(("bn", "conv_a", "conv->bn", (0, 2)), ("bn", "conv_b", "conv->bn", (2, 5))))
def _conv_concat_bn(b: GraphBuilder) -> None:
    """Conv (3->2) and Conv (3->3, other kernel) -> Concat(axis=1) -> BatchNormalization(5): channels [0, 2)
    of the BN fold into the first conv and [2, 5) into the second; one BN removed."""
    x = b.input("x", [2, 3, 6, 6])
    c1 = b.conv(x, "conv_a", 3, 2, 3, **PAD1)
    c2 = b.conv(x, "conv_b", 3, 3, 1, bias=False)
    b.output(b.bn(b.node("Concat", [c1, c2], "concat", axis=1), "bn", 5))


@register("conv_concat_negative_axis_bn", "conv->bn", folds=1, norms_left=0,
          pairs=(
              ("bn", "conv_0", "conv->bn", (0, 2)),
              ("bn", "conv_1", "conv->bn", (2, 4)),
              ("bn", "conv_2", "conv->bn", (4, 6))))
def _conv_concat_neg_bn(b: GraphBuilder) -> None:
    """Three convs -> Concat(axis=-3) of 4-D outputs (the channel axis) -> BatchNormalization: one fold."""
    x = b.input("x", [2, 3, 6, 6])
    parts = [b.conv(x, f"conv_{i}", 3, 2, 1) for i in range(3)]
    b.output(b.bn(b.node("Concat", parts, "concat", axis=-3), "bn", 6))


@register("conv_concat_height_axis_bn", "conv->bn", folds=1, norms_left=0,
          pairs=(("bn", "conv_a", "conv->bn"), ("bn", "conv_b", "conv->bn")))
def _conv_concat_height_bn(b: GraphBuilder) -> None:
    """Two convs (3->4 each) -> Concat(axis=2, the height) -> BatchNormalization(4): every output row of either
    conv carries all 4 channels, so the whole BN folds into each conv; one BN removed."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Concat", [b.conv(x, "conv_a", 3, 4, 1), b.conv(x, "conv_b", 3, 4, 3, **PAD1)], "concat", axis=2)
    b.output(b.bn(y, "bn", 4))


@register("conv_bn_constant_nodes", "conv->bn", folds=1, norms_left=0,
          pairs=(("bn", "conv", "conv->bn"),))
def _conv_bn_constant_nodes(b: GraphBuilder) -> None:
    """Conv whose weight and bias, and a BatchNormalization whose four parameters, all come from Constant
    nodes (not initializers): constants all the same; one fold, the BN's Constant nodes go with it."""
    x = b.input("x", [2, 3, 6, 6])
    w = b.node("Constant", [], "w_const", value=numpy_helper.from_array(b.uniform((4, 3, 3, 3), 0.33), "w"))
    bias = b.node("Constant", [], "b_const", value=numpy_helper.from_array(b.uniform((4,), 0.5), "b"))
    params = [b.node("Constant", [], f"bn_{p}", value=numpy_helper.from_array(a, p))
              for p, a in zip(("scale", "B", "mean", "var"), b.bn_params("bn", 4), strict=True)]
    y = b.node("Conv", [x, w, bias], "conv")
    b.output(b.node("BatchNormalization", [y, *params], "bn"))


@register("conv_bn_value_info", "conv->bn", folds=2, norms_left=0, keep_value_info=True,
          pairs=(("bn1", "conv1", "conv->bn"), ("bn2", "conv2", "conv->bn")))
def _conv_bn_value_info(b: GraphBuilder) -> None:
    """Conv -> BN -> Relu -> Conv -> BN with every intermediate listed in value_info: two folds; the value_info
    of the tensors that disappear must go, the rest stay."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Relu", [b.bn(b.conv(x, "conv1", 3, 4, 3, **PAD1), "bn1", 4)], "relu")
    b.output(b.bn(b.conv(y, "conv2", 4, 4, 1), "bn2", 4))


@register("bn_output_is_graph_output", "conv->bn", folds=1, norms_left=0,
          pairs=(("bn", "conv", "conv->bn"),))
def _bn_output_graph_output(b: GraphBuilder) -> None:
    """Conv -> BatchNormalization whose output is a graph output (and also feeds a Relu, another output): the
    folded conv takes over the BN's output name; one fold, both outputs keep their names."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.bn(b.conv(x, "conv", 3, 4, 3), "bn", 4)
    b.output(y, b.node("Relu", [y], "relu"))


@register("paddle_conv_add_bn", "conv->bn", folds=1, norms_left=0, pairs=(("bn", "conv", "conv->bn"),))
def _paddle_conv_add_bn(b: GraphBuilder) -> None:
    """A PaddlePaddle export's conv: Conv without bias (pads 1) -> Add(bias of shape [1, 4, 1, 1]) ->
    BatchNormalization -> Relu. The Add adds one value per channel, so conv + Add is a conv with that bias; the BN
    folds into it and the Add goes; one fold."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.add_constant(b.conv(x, "conv", 3, 4, 3, bias=False, **PAD1), "add", (1, 4, 1, 1))
    b.output(b.node("Relu", [b.bn(y, "bn", 4)], "relu"))


@register("conv_bias_add_bn", "conv->bn", folds=1, norms_left=0, pairs=(("bn", "conv", "conv->bn"),))
def _conv_bias_add_bn(b: GraphBuilder) -> None:
    """Conv with its own bias -> Add(c, y) with c of shape [4, 1, 1] first (broadcast aligns it with C, H, W) ->
    BatchNormalization: both biases sum into the folded bias; one fold."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.bn(b.add_constant(b.conv(x, "conv", 3, 4, 3), "add", (4, 1, 1), first=True), "bn", 4))


@register("conv1d_add_scalar_bn", "conv->bn", folds=1, norms_left=0, pairs=(("bn", "conv", "conv->bn"),))
def _conv1d_add_scalar_bn(b: GraphBuilder) -> None:
    """1-D Conv -> Add(a scalar constant, shape []) -> BatchNormalization: a scalar is one value for every channel;
    one fold."""
    x = b.input("x", [2, 3, 9])
    b.output(b.bn(b.add_constant(b.conv(x, "conv", 3, 4, (3,)), "add", ()), "bn", 4))


@register("conv_add_bn_bn", "conv->bn", folds=2, norms_left=0,
          pairs=(("bn1", "conv", "conv->bn"), ("bn2", "conv", "conv->bn")))
def _conv_add_bn_bn(b: GraphBuilder) -> None:
    """Conv -> Add([1, 4, 1, 1]) -> BatchNormalization -> BatchNormalization: the Add is the conv's bias, both
    norms fold into it in order; two folds."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.add_constant(b.conv(x, "conv", 3, 4, 3, bias=False), "add", (1, 4, 1, 1))
    b.output(b.bn(b.bn(y, "bn1", 4), "bn2", 4))


@register("bn_conv_add_bn", "conv->bn", folds=2, norms_left=0,
          pairs=(("bn0", "conv", "bn->conv"), ("bn1", "conv", "conv->bn")))
def _bn_conv_add_bn(b: GraphBuilder) -> None:
    """BatchNormalization -> Conv 1x1 (no pads) -> Add([1, 4, 1, 1]) -> BatchNormalization: bn0 folds into the
    conv's input side, bn1 into its output side through the Add (the Add's constant is part of the bias both folds
    see); two folds into one conv."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.add_constant(b.conv(b.bn(x, "bn0", 3), "conv", 3, 4, 1, bias=False), "add", (1, 4, 1, 1))
    b.output(b.bn(y, "bn1", 4))


@register("conv_add_concat_bn", "conv->bn", folds=1, norms_left=0,
          pairs=(("bn", "conv_a", "conv->bn", (0, 2)), ("bn", "conv_b", "conv->bn", (2, 5))))
def _conv_add_concat_bn(b: GraphBuilder) -> None:
    """Conv (3->2, no bias) -> Add([1, 2, 1, 1]) and Conv (3->3, bias) -> Concat(axis=1) -> BatchNormalization(5):
    the Add is conv_a's bias; channels [0, 2) of the BN fold into conv_a (the Add goes), [2, 5) into conv_b; one
    BN removed."""
    x = b.input("x", [2, 3, 6, 6])
    a = b.add_constant(b.conv(x, "conv_a", 3, 2, 3, bias=False, **PAD1), "add", (1, 2, 1, 1))
    c = b.conv(x, "conv_b", 3, 3, 1)
    b.output(b.bn(b.node("Concat", [a, c], "concat", axis=1), "bn", 5))


"""Traps: graphs where a fold would be wrong or impossible, each with the reason codes a correct folder may report
for what stays.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from .base import PAD1, GraphBuilder, register


@register("conv_relu_bn", "trap", folds=0, norms_left=1, skips={"bn": ("no_fusable_neighbour",)})
def _conv_relu_bn(b: GraphBuilder) -> None:
    """Conv -> Relu -> BatchNormalization -> Relu: an activation between; the BN feeds a Relu; nothing folds."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.bn(b.node("Relu", [b.conv(x, "conv", 3, 4, 3)], "relu1"), "bn", 4)
    b.output(b.node("Relu", [y], "relu2"))


@register("conv_output_shared", "trap", folds=0, norms_left=1, skips={"bn": ("output_used_elsewhere",)})
def _conv_output_shared(b: GraphBuilder) -> None:
    """Conv output feeds both a BN and a residual Add: folding would change the Add's input; the BN feeds the
    Add too (not a conv); nothing folds."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.conv(x, "conv", 3, 4, 3, **PAD1)
    b.output(b.node("Add", [b.bn(y, "bn", 4), y], "add"))


@register("conv_output_is_graph_output", "trap", folds=0, norms_left=1, skips={"bn": ("output_used_elsewhere",)})
def _conv_output_graph_output(b: GraphBuilder) -> None:
    """Conv output is a graph output and feeds a BN (whose output is another graph output): nothing folds."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.conv(x, "conv", 3, 4, 3)
    b.output(y, b.bn(y, "bn", 4))


@register("two_bns_on_one_conv", "trap", folds=0, norms_left=2,
           skips={"bn_a": ("output_used_elsewhere",), "bn_b": ("output_used_elsewhere",)})
def _two_bns_one_conv(b: GraphBuilder) -> None:
    """One conv output read by two different BNs: neither can fold into it; neither feeds a conv; none."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.conv(x, "conv", 3, 4, 3)
    b.output(b.node("Add", [b.bn(y, "bn_a", 4), b.bn(y, "bn_b", 4)], "add"))


@register("conv_weight_graph_input", "trap", folds=0, norms_left=1, skips={"bn": ("not_constant",)})
def _conv_weight_input(b: GraphBuilder) -> None:
    """The conv's weight is a graph input (supplied at run time): not a constant; nothing folds."""
    x = b.input("x", [2, 3, 6, 6])
    w = b.input("w", [4, 3, 3, 3], scale=0.3)
    b.output(b.bn(b.node("Conv", [x, w], "conv"), "bn", 4))


@register("initializer_overridable_by_input", "trap", folds=0, norms_left=1, skips={"bn": ("not_constant",)})
def _initializer_overridable(b: GraphBuilder) -> None:
    """IR version >= 4 and the BN's running variance is an initializer that is ALSO a graph input: a default
    value the caller may override, so not a constant; nothing folds."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.bn(b.conv(x, "conv", 3, 4, 3), "bn", 4)
    var = next(t for t in b.initializers if t.name == "bn.var")
    b.inputs.append(helper.make_tensor_value_info("bn.var", TensorProto.FLOAT, [4]))
    b.feeds["bn.var"] = numpy_helper.to_array(var).copy()
    b.output(y)


@register("bn_params_computed", "trap", folds=0, norms_left=1, skips={"bn": ("not_constant",)})
def _bn_params_computed(b: GraphBuilder) -> None:
    """The BN's scale is computed (Mul of an initializer by a graph input): not a constant; nothing folds."""
    x = b.input("x", [2, 3, 6, 6])
    k = b.input("k", [1], value=np.array([1.5], dtype=np.float32))
    y = b.conv(x, "conv", 3, 4, 3)
    s, bias, mean, var = b.bn_params("bn", 4)
    scale = b.node("Mul", [b.init("bn.scale_base", s), k], "scale_mul")
    b.output(b.node("BatchNormalization", [y, scale, b.init("bn.B", bias), b.init("bn.mean", mean),
                                           b.init("bn.var", var)], "bn"))


@register("training_mode_bn", "trap", folds=0, norms_left=1, opset=15, skips={"bn": ("no_running_stats",)})
def _training_mode_bn(b: GraphBuilder) -> None:
    """BatchNormalization-15 with training_mode=1 (normalises with batch statistics; running_mean/var
    outputs): eval semantics do not apply; nothing folds."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.bn(b.conv(x, "conv", 3, 4, 3), "bn", 4, training_mode=1, outputs=["y", "running_mean", "running_var"])
    b.output(y, "running_mean")


@register("bn_opset9_optional_outputs_used", "trap", folds=0, norms_left=1, opset=9,
           skips={"bn": ("no_running_stats", "output_used_elsewhere")})
def _bn9_outputs(b: GraphBuilder) -> None:
    """BatchNormalization-9 with its optional outputs (mean, var, saved_mean, saved_var) present and the mean
    used as a graph output: in opsets 7-13 those outputs mean training mode; it cannot be removed; none."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.bn(b.conv(x, "conv", 3, 4, 3), "bn", 4, outputs=["y", "mean", "var", "saved_mean", "saved_var"])
    b.output(y, "mean")
    b.declare("mean", [4])


@register("bn_conv_zero_padded", "trap", folds=0, norms_left=1, skips={"bn": ("zero_padding",)})
def _bn_conv_zero_padded(b: GraphBuilder) -> None:
    """BatchNormalization -> Conv with pads 1: the conv pads with zeros AFTER the BN, where a folded conv would
    see the BN's shift; not exact at the borders; nothing folds (the BN reads a graph input)."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.conv(b.bn(x, "bn", 3), "conv", 3, 4, 3, **PAD1))


@register("bn_conv_auto_pad_same_3x3", "trap", folds=0, norms_left=1, skips={"bn": ("zero_padding",)})
def _bn_conv_same_3x3(b: GraphBuilder) -> None:
    """BatchNormalization -> Conv 3x3 with auto_pad=SAME_LOWER: zero padding computed at run time; none."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.conv(b.bn(x, "bn", 3), "conv", 3, 4, 3, auto_pad="SAME_LOWER"))


@register("bn_pad_zeros_conv", "trap", folds=0, norms_left=1, skips={"bn": ("zero_padding",)})
def _bn_pad_zeros_conv(b: GraphBuilder) -> None:
    """BatchNormalization -> Pad(mode=constant, zeros) -> Conv without pads: the zeros come after the BN; not exact
    at the borders; none."""
    x = b.input("x", [2, 3, 6, 6])
    pads = b.init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64))
    b.output(b.conv(b.node("Pad", [b.bn(x, "bn", 3), pads], "pad"), "conv", 3, 4, 3))


@register("bn_pad_reflect_channels_conv", "trap", folds=0, norms_left=1,
           skips={"bn": ("zero_padding", "no_fusable_neighbour")})
def _bn_pad_channels(b: GraphBuilder) -> None:
    """BatchNormalization(3) -> Pad(mode=reflect) that also pads the CHANNEL axis (3 -> 5) -> Conv on 5 channels:
    the extra channels copy other channels' values, so no per-input-channel fold exists; none."""
    x = b.input("x", [2, 3, 6, 6])
    pads = b.init("pads", np.array([0, 1, 0, 0, 0, 1, 0, 0], dtype=np.int64))
    b.output(b.conv(b.node("Pad", [b.bn(x, "bn", 3), pads], "pad", mode="reflect"), "conv", 5, 4, 1))


@register("bn_conv_transpose", "trap", folds=0, norms_left=1, skips={"bn": ("transposed_after_bn",)})
def _bn_conv_transpose(b: GraphBuilder) -> None:
    """BatchNormalization -> ConvTranspose: the number of kernel taps reaching an output varies with its
    position, so the shift is not a per-channel constant; none."""
    x = b.input("x", [2, 3, 5, 5])
    b.output(b.conv_transpose(b.bn(x, "bn", 3), "convt", 3, 4, 3, strides=[2, 2]))


@register("bn_output_shared_two_convs", "trap", folds=0, norms_left=1, skips={"bn": ("output_used_elsewhere",)})
def _bn_two_convs(b: GraphBuilder) -> None:
    """BatchNormalization -> two convs (no padding): folding into one would leave the other without the BN;
    none."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.bn(x, "bn", 3)
    b.output(b.node("Add", [b.conv(y, "conv_a", 3, 4, 1), b.conv(y, "conv_b", 3, 4, 1)], "add"))


@register("fp16_overflow", "trap", folds=1, norms_left=1, dtype=np.float16, skips={"bn1": ("overflow",)},
          pairs=(("bn2", "conv2", "conv->bn"),))
def _fp16_overflow(b: GraphBuilder) -> None:
    """float16 Conv (weights up to 8) -> BN1 (scale 100, var 0, eps 1e-5: s = 3.2e4) -> Conv (pads 1) -> BN2.
    W * s exceeds float16's 65504 although the network's outputs stay finite (tiny inputs): BN1 must stay
    (its backward partner zero-pads); BN2 folds; one fold, one left."""
    x = b.input("x", [2, 3, 6, 6], scale=1e-3)
    w = b.init("conv1.weight", (b.rng.choice([-8.0, -1.0, 1.0, 8.0], (4, 3, 3, 3))).astype(np.float16))
    y = b.node("Conv", [x, w], "conv1")
    params = [np.full(4, 100.0), np.zeros(4), np.zeros(4), np.zeros(4)]
    names = [b.init(f"bn1.{p}", a.astype(np.float16))
             for p, a in zip(("scale", "B", "mean", "var"), params, strict=True)]
    y = b.node("BatchNormalization", [y, *names], "bn1")
    b.output(b.bn(b.conv(y, "conv2", 4, 4, 3, **PAD1), "bn2", 4))


@register("fp16_overflow_falls_back", "trap", folds=1, norms_left=0, dtype=np.float16,
          pairs=(("bn", "conv2", "bn->conv"),))
def _fp16_overflow_fallback(b: GraphBuilder) -> None:
    """float16 Conv (weights up to 8) -> BN (s = 3.2e4) -> Conv 1x1 without pads: folding into the first conv
    overflows float16, so the BN folds forward into nothing and BACKWARD into the 1x1 conv instead (its weights
    are at most 0.87, times 3.2e4 fits); one fold, nothing left."""
    x = b.input("x", [2, 3, 6, 6], scale=1e-3)
    w = b.init("conv1.weight", (b.rng.choice([-8.0, -1.0, 1.0, 8.0], (4, 3, 3, 3))).astype(np.float16))
    y = b.node("Conv", [x, w], "conv1")
    params = [np.full(4, 100.0), np.zeros(4), np.zeros(4), np.zeros(4)]
    names = [b.init(f"bn.{p}", a.astype(np.float16))
             for p, a in zip(("scale", "B", "mean", "var"), params, strict=True)]
    y = b.node("BatchNormalization", [y, *names], "bn")
    b.output(b.conv(y, "conv2", 4, 4, 1))


@register("cancelling_bias", "trap", folds=1, norms_left=0,
          pairs=(("bn", "conv", "conv->bn"),))
def _cancelling_bias(b: GraphBuilder) -> None:
    """Conv bias within 1e-4 of the BN's running mean (b - mu nearly cancels) and a small variance: the fold is
    exact in float64; a folder that computes in float32 loses the difference; one fold."""
    x = b.input("x", [2, 3, 6, 6])
    w = b.weight("conv.weight", (4, 3, 3, 3), 27)
    mean = b.rng.uniform(50.0, 100.0, 4).astype(np.float32)
    bias = (mean + b.rng.uniform(-1e-4, 1e-4, 4)).astype(np.float32)
    y = b.node("Conv", [x, w, b.init("conv.bias", bias)], "conv")
    s, beta, _, _ = b.bn_params("bn", 4)
    params = [b.init("bn.scale", s), b.init("bn.B", beta), b.init("bn.mean", mean),
              b.init("bn.var", np.full(4, 1e-3, np.float32))]
    b.output(b.node("BatchNormalization", [y, *params], "bn"))


@register("gemm_c_full_matrix", "trap", folds=0, norms_left=1, skips={"bn": ("not_per_channel",)})
def _gemm_c_matrix(b: GraphBuilder) -> None:
    """Gemm whose C is a full (M, N) matrix -> BN: folding is exact but the folded C would stay (M, N);
    not one value per channel, so it is left; none."""
    x = b.input("x", [3, 4])
    y = b.node("Gemm", [x, b.weight("fc.weight", (5, 4), 4), b.init("fc.bias", b.uniform((3, 5), 0.5))], "fc",
               transB=1)
    b.output(b.bn(y, "bn", 5))


@register("gemm_weight_is_input_a", "trap", folds=0, norms_left=1,
           skips={"bn": ("not_constant", "no_fusable_neighbour")})
def _gemm_weight_a(b: GraphBuilder) -> None:
    """Gemm(W, x) with the constant as A and the data as B: the BN's channels (Gemm columns) are x's columns,
    not a weight's; none."""
    x = b.input("x", [4, 5])
    y = b.node("Gemm", [b.weight("fc.weight", (3, 4), 4), x], "fc")
    b.output(b.bn(y, "bn", 5))


@register("bn_gemm_transa", "trap", folds=0, norms_left=1, skips={"bn": ("unsupported_layer",)})
def _bn_gemm_transa(b: GraphBuilder) -> None:
    """BatchNormalization on (N, C) -> Gemm with transA=1: the Gemm contracts over the BN's batch axis, so the
    BN's channels become output rows; the shift is not a per-column bias; none."""
    x = b.input("x", [4, 3])
    b.output(b.node("Gemm", [b.bn(x, "bn", 3), b.weight("fc.weight", (4, 5), 4)], "fc", transA=1))


@register("matmul_3d_bn", "trap", folds=0, norms_left=1, skips={"bn": ("no_fusable_neighbour", "rank_unknown")})
def _matmul_3d_bn(b: GraphBuilder) -> None:
    """MatMul on a 3-D input (2, 3, 4) @ W(4, 5) -> BatchNormalization(3): the BN's channel axis 1 is the
    token axis, not the MatMul's features; none."""
    x = b.input("x", [2, 3, 4])
    b.output(b.bn(b.node("MatMul", [x, b.weight("fc.weight", (4, 5), 4)], "fc"), "bn", 3))


@register("matmul_rank_unknown_bn", "trap", folds=0, norms_left=1, skips={"bn": ("rank_unknown",)})
def _matmul_rank_unknown(b: GraphBuilder) -> None:
    """Reshape to a run-time shape (an input of unknown length) -> MatMul -> Add -> BN -> ReduceSum to a scalar:
    the MatMul input's rank is not proven 2-D (it is at run time), so the BN is left; none."""
    x = b.input("x", [3, 4])
    shape = b.input("shape", ["r"], np.int64, value=np.array([3, 4], dtype=np.int64))
    y = b.node("MatMul", [b.node("Reshape", [x, shape], "reshape"), b.weight("fc.weight", (4, 5), 4)], "fc")
    y = b.node("Add", [y, b.init("fc.bias", b.uniform((5,), 0.5))], "fc_add")
    b.output(b.node("ReduceSum", [b.bn(y, "bn", 5)], "sum", keepdims=0))
    b.declare("sum_out", [])


@register("bn_opset7_spatial0_per_activation", "trap", folds=0, norms_left=1, opset=7,
           skips={"bn": ("not_per_channel",)})
def _bn7_spatial0(b: GraphBuilder) -> None:
    """Opset 7 BatchNormalization with spatial=0 on a 4-D conv output: statistics per (channel, h, w)
    activation ([C, H, W] parameters), not per channel; none."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.bn(b.conv(x, "conv", 3, 4, 3), "bn", (4, 4, 4), spatial=0))


@register("concat_with_non_conv_input", "trap", folds=0, norms_left=1,
           skips={"bn": ("no_fusable_neighbour",)})
def _concat_non_conv(b: GraphBuilder) -> None:
    """Concat(axis=1) of a conv output and a Relu output -> BN: the Relu's slice has no layer to fold into,
    and a concat folds all-or-none; none."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Concat", [b.conv(x, "conv", 3, 2, 1), b.node("Relu", [x], "relu")], "concat", axis=1)
    b.output(b.bn(y, "bn", 5))


@register("concat_conv_output_shared", "trap", folds=0, norms_left=1,
           skips={"bn": ("output_used_elsewhere",)})
def _concat_shared(b: GraphBuilder) -> None:
    """Concat(axis=1) of two convs -> BN, one conv's output also a graph output: none."""
    x = b.input("x", [2, 3, 6, 6])
    c1 = b.conv(x, "conv_a", 3, 2, 1)
    y = b.node("Concat", [c1, b.conv(x, "conv_b", 3, 3, 1)], "concat", axis=1)
    b.output(b.bn(y, "bn", 5), c1)


@register("bn_in_branch_reads_outer_conv", "trap", folds=0, norms_left=1,
           skips={"bn": ("no_fusable_neighbour", "output_used_elsewhere")})
def _branch_outer_conv(b: GraphBuilder) -> None:
    """A conv in the main graph, a BN inside an If branch reading the conv's output from the outer scope (the
    else-branch uses it too): the pair spans two graphs and the conv output has two readers; none."""
    x = b.input("x", [2, 3, 6, 6])
    cond = b.input("cond", [], np.bool_, value=np.array(True))
    y = b.conv(x, "conv", 3, 4, 3)
    then = GraphBuilder("then_branch", parent=b, rng=b.rng)
    t = then.bn(y, "bn", 4)
    other = GraphBuilder("else_branch", parent=b, rng=b.rng)
    e = other.node("Relu", [y], "relu")
    info = [2, 4, 4, 4]
    b.output(b.node("If", [cond], "if",
                    then_branch=then.graph([helper.make_tensor_value_info(t, TensorProto.FLOAT, info)]),
                    else_branch=other.graph([helper.make_tensor_value_info(e, TensorProto.FLOAT, info)])))


@register("conv_add_last_axis_bn", "trap", folds=0, norms_left=1, skips={"bn": ("not_per_channel",)})
def _conv_add_last_axis_bn(b: GraphBuilder) -> None:
    """Conv (4 channels, 6x6 output) -> Add(c of shape [6]) -> BatchNormalization: broadcasting aligns c with the
    last axis (W), not the channels, so c is no bias; nothing folds."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.bn(b.add_constant(b.conv(x, "conv", 3, 4, 3, **PAD1), "add", (6,)), "bn", 4))


@register("conv_add_full_tensor_bn", "trap", folds=0, norms_left=1, skips={"bn": ("not_per_channel",)})
def _conv_add_full_tensor_bn(b: GraphBuilder) -> None:
    """Conv -> Add(c of shape [1, 4, 6, 6], one value per position) -> BatchNormalization: not a per-channel
    bias; nothing folds."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.bn(b.add_constant(b.conv(x, "conv", 3, 4, 3, **PAD1), "add", (1, 4, 6, 6)), "bn", 4))


@register("conv_add_raises_rank_bn", "trap", folds=0, norms_left=1, skips={"bn": ("not_per_channel",)})
def _conv_add_raises_rank_bn(b: GraphBuilder) -> None:
    """Conv (N=2, 4 channels) -> Add(c of shape [1, 1, 4, 1, 1]) -> BatchNormalization(2): the Add makes a 5-D
    (1, 2, 4, 6, 6) value whose axis 1 is the conv's batch; the BN normalises that axis; nothing folds."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.bn(b.add_constant(b.conv(x, "conv", 3, 4, 3, **PAD1), "add", (1, 1, 4, 1, 1)), "bn", 2))


@register("conv_read_by_add_and_relu", "trap", folds=0, norms_left=1, skips={"bn": ("output_used_elsewhere",)})
def _conv_read_by_add_and_relu(b: GraphBuilder) -> None:
    """Conv -> Add([1, 4, 1, 1]) -> BatchNormalization, and the conv's output also feeds a Relu (another graph
    output): folding would change what the Relu reads; nothing folds."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.conv(x, "conv", 3, 4, 3)
    b.output(b.bn(b.add_constant(y, "add", (1, 4, 1, 1)), "bn", 4), b.node("Relu", [y], "relu"))


@register("conv_add_output_shared", "trap", folds=0, norms_left=1, skips={"bn": ("output_used_elsewhere",)})
def _conv_add_output_shared(b: GraphBuilder) -> None:
    """Conv -> Add([1, 4, 1, 1]) whose output feeds the BatchNormalization and is a graph output too: nothing
    folds."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.add_constant(b.conv(x, "conv", 3, 4, 3), "add", (1, 4, 1, 1))
    b.output(b.bn(y, "bn", 4), y)


@register("conv_add_residual_bn", "trap", folds=0, norms_left=1, skips={"bn": ("no_fusable_neighbour",)})
def _conv_add_residual_bn(b: GraphBuilder) -> None:
    """Conv -> Add(the block's input: a residual, computed) -> BatchNormalization: the Add is no bias; none."""
    x = b.input("x", [2, 4, 6, 6])
    b.output(b.bn(b.node("Add", [b.conv(x, "conv", 4, 4, 3, **PAD1), x], "add"), "bn", 4))


@register("conv_add_bias_overridable", "trap", folds=0, norms_left=1, skips={"bn": ("not_constant",)})
def _conv_add_bias_overridable(b: GraphBuilder) -> None:
    """Conv -> Add(an initializer that is also a graph input: the caller may override it) -> BatchNormalization:
    the bias is not a constant; nothing folds."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.add_constant(b.conv(x, "conv", 3, 4, 3), "add", (1, 4, 1, 1))
    bias = next(t for t in b.initializers if t.name == "add.bias")
    b.inputs.append(helper.make_tensor_value_info("add.bias", TensorProto.FLOAT, [1, 4, 1, 1]))
    b.feeds["add.bias"] = numpy_helper.to_array(bias).copy()
    b.output(b.bn(y, "bn", 4))


@register("bn_add_conv_zero_padded", "trap", folds=0, norms_left=1, skips={"bn": ("zero_padding",)})
def _bn_add_conv_padded(b: GraphBuilder) -> None:
    """BatchNormalization -> Add([1, 3, 1, 1]) -> Conv with pads 1: the zeros come after the BN and the Add; not
    exact at the borders; nothing folds."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.conv(b.add_constant(b.bn(x, "bn", 3), "add", (1, 3, 1, 1)), "conv", 3, 4, 3, **PAD1))


@register("bn_add_last_axis_conv", "trap", folds=0, norms_left=1,
          skips={"bn": ("not_per_channel", "no_fusable_neighbour")})
def _bn_add_last_axis_conv(b: GraphBuilder) -> None:
    """BatchNormalization -> Add(c of shape [6]: along W) -> Conv 1x1: BN + c is not a per-channel map; nothing
    folds (the BN reads a graph input)."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.conv(b.add_constant(b.bn(x, "bn", 3), "add", (6,)), "conv", 3, 4, 1))


@register("gemm_add_concat_bn", "trap", folds=0, norms_left=1, skips={"bn": ("no_fusable_neighbour",)})
def _gemm_add_concat_bn(b: GraphBuilder) -> None:
    """Two Gemm -> Add([3]) outputs -> Concat(axis=1) -> BatchNormalization(6): a Concat joins convs' outputs
    only (for linear layers it is not taken as a fold partner); nothing folds."""
    x = b.input("x", [2, 4])
    parts = [b.add_constant(b.node("Gemm", [x, b.weight(f"fc{i}.weight", (4, 3), 4)], f"fc{i}"), f"add{i}", (3,))
             for i in range(2)]
    b.output(b.bn(b.node("Concat", parts, "concat", axis=1), "bn", 6))


"""BatchNormalization versions and dtypes: opsets 7 (spatial), 9, 14, 15 (mixed dtypes), float16 and float64 graphs."""

from __future__ import annotations

import numpy as np

from .base import PAD1, GraphBuilder, register


@register("bn_opset7_ir3", "norms", folds=1, norms_left=0, opset=7,
          pairs=(("bn", "conv", "conv->bn"),))
def _bn_opset7(b: GraphBuilder) -> None:
    """Opset 7 (BatchNormalization-7 with spatial=1), IR version 3, where every initializer is also listed as a
    graph input: below IR 4 such inputs are constants (not overridable), so Conv -> BN folds; one fold."""
    b.initializers_as_inputs = True
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.bn(b.conv(x, "conv", 3, 4, 3), "bn", 4, spatial=1))


@register("bn_opset7_spatial0_2d", "norms", folds=1, norms_left=0, opset=7,
          pairs=(("bn", "fc", "linear->bn"),))
def _bn_opset7_spatial0(b: GraphBuilder) -> None:
    """Opset 7 BatchNormalization with spatial=0 on the 2-D output of a Gemm: per-activation statistics of an
    (N, C) input are per-channel, so it folds; one fold."""
    x = b.input("x", [3, 4])
    y = b.node("Gemm", [x, b.weight("fc.weight", (5, 4), 4), b.init("fc.bias", b.uniform((5,), 0.5))], "fc",
               transB=1)
    b.output(b.bn(y, "bn", 5, spatial=0))


@register("bn_opset9", "norms", folds=2, norms_left=0, opset=9,
          pairs=(("bn1", "conv1", "conv->bn"), ("bn2", "conv2", "bn->conv")))
def _bn_opset9(b: GraphBuilder) -> None:
    """Opset 9 (BatchNormalization-9: no spatial, Y only = test mode): Conv -> BN -> Relu -> BN -> Conv (no
    pads); two folds (the second BN backward into the second conv)."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Relu", [b.bn(b.conv(x, "conv1", 3, 4, 3, **PAD1), "bn1", 4)], "relu")
    b.output(b.conv(b.bn(y, "bn2", 4), "conv2", 4, 4, 1))


@register("bn_opset14_training_mode_0", "norms", folds=1, norms_left=0, opset=14,
          pairs=(("bn", "conv", "conv->bn"),))
def _bn_opset14(b: GraphBuilder) -> None:
    """Opset 14 BatchNormalization with an explicit training_mode=0: eval mode; one fold."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.bn(b.conv(x, "conv", 3, 4, 3), "bn", 4, training_mode=0))


@register("bn_opset15_mixed_dtypes", "norms", folds=1, norms_left=0, opset=15,
          pairs=(("bn", "conv", "conv->bn"),))
def _bn_opset15_mixed(b: GraphBuilder) -> None:
    """Opset 15: float16 Conv -> BatchNormalization whose scale/B and mean/var are float32 (T1, T2 differ from
    T): the fold is computed in float64 and rounded once to the conv's float16; one fold."""
    x = b.input("x", [2, 3, 6, 6], np.float16)
    b.output(b.bn(b.conv(x, "conv", 3, 4, 3, dtype=np.float16), "bn", 4, dtype=np.float32))


@register("fp16_conv_bn", "norms", folds=2, norms_left=0, dtype=np.float16,
          pairs=(("bn1", "conv", "conv->bn"), ("bn2", "convt", "conv_transpose->bn")))
def _fp16_conv_bn(b: GraphBuilder) -> None:
    """float16 throughout: Conv -> BN -> Relu -> ConvTranspose -> BN; two folds, rounded once to float16."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Relu", [b.bn(b.conv(x, "conv", 3, 4, 3), "bn1", 4)], "relu")
    b.output(b.bn(b.conv_transpose(y, "convt", 4, 4, 2, strides=[2, 2]), "bn2", 4))


@register("float64_gemm_bn", "norms", folds=1, norms_left=0, dtype=np.float64,
          pairs=(("bn", "fc", "linear->bn"),))
def _f64_gemm_bn(b: GraphBuilder) -> None:
    """float64 Gemm -> BatchNormalization (epsilon 1e-3): one fold, no rounding beyond float64."""
    x = b.input("x", [3, 4])
    y = b.node("Gemm", [x, b.weight("fc.weight", (5, 4), 4), b.init("fc.bias", b.uniform((5,), 0.5))], "fc",
               transB=1)
    b.output(b.bn(y, "bn", 5, epsilon=1e-3))

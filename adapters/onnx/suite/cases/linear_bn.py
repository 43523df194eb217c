"""Cases of the linear->bn family: Gemm (alpha, beta, transposes, every shape of C) and MatMul (+ Add) ->
BatchNormalization, also through a Flatten or Reshape that keeps the columns.
"""

from __future__ import annotations

import numpy as np

from .base import GraphBuilder, register


@register("gemm_bn", "linear->bn", folds=1, norms_left=0,
          pairs=(("bn", "fc", "linear->bn"),))
def _gemm_bn(b: GraphBuilder) -> None:
    """Gemm(x, W^T) + C (transB=1, C a vector) -> BatchNormalization on the (N, 5) output: a Gemm output is
    2-D by definition, so the BN's channels are the Gemm's columns; one fold."""
    x = b.input("x", [3, 4])
    y = b.node("Gemm", [x, b.weight("fc.weight", (5, 4), 4), b.init("fc.bias", b.uniform((5,), 0.5))], "fc",
               transB=1)
    b.output(b.bn(y, "bn", 5))


@register("gemm_transa_alpha_beta_bn", "linear->bn", folds=1, norms_left=0,
          pairs=(("bn", "fc", "linear->bn"),))
def _gemm_alpha_bn(b: GraphBuilder) -> None:
    """Gemm with transA=1 (A is [K, M]), transB=0 (B is [K, N]), alpha=0.3, beta=2, C of shape (1, N) ->
    BatchNormalization: transA only permutes the input, alpha and beta scale W and C; one fold."""
    x = b.input("x", [4, 3])
    y = b.node("Gemm", [x, b.weight("fc.weight", (4, 5), 4), b.init("fc.bias", b.uniform((1, 5), 0.5))], "fc",
               transA=1, alpha=0.3, beta=2.0)
    b.output(b.bn(y, "bn", 5))


@register("gemm_scalar_c_bn", "linear->bn", folds=1, norms_left=0,
          pairs=(("bn", "fc", "linear->bn"),))
def _gemm_scalar_c_bn(b: GraphBuilder) -> None:
    """Gemm with a scalar C (shape (1,), broadcast to every column) -> BatchNormalization: the folded C becomes
    one value per column; one fold."""
    x = b.input("x", [3, 4])
    y = b.node("Gemm", [x, b.weight("fc.weight", (5, 4), 4), b.init("fc.bias", b.uniform((1,), 0.5))], "fc",
               transB=1)
    b.output(b.bn(y, "bn", 5))


@register("gemm_no_c_bn", "linear->bn", folds=1, norms_left=0,
          pairs=(("bn", "fc", "linear->bn"),))
def _gemm_no_c_bn(b: GraphBuilder) -> None:
    """Gemm without C -> BatchNormalization: the folded Gemm gains a C input; one fold."""
    x = b.input("x", [3, 4])
    b.output(b.bn(b.node("Gemm", [x, b.weight("fc.weight", (4, 5), 4)], "fc"), "bn", 5))


@register("matmul_add_bn", "linear->bn", folds=1, norms_left=0,
          pairs=(("bn", "fc", "linear->bn"),))
def _matmul_add_bn(b: GraphBuilder) -> None:
    """MatMul(x, W[K, N]) -> Add(bias) -> BatchNormalization with x a 2-D graph input: shape inference proves
    the (N, C) layout the BN needs; W's columns and the bias fold; one fold."""
    x = b.input("x", [3, 4])
    y = b.node("MatMul", [x, b.weight("fc.weight", (4, 5), 4)], "fc")
    y = b.node("Add", [y, b.init("fc.bias", b.uniform((5,), 0.5))], "fc_add")
    b.output(b.bn(y, "bn", 5))


@register("add_bias_first_matmul_bn", "linear->bn", folds=1, norms_left=0,
          pairs=(("bn", "fc", "linear->bn"),))
def _add_first_matmul_bn(b: GraphBuilder) -> None:
    """Add(bias, MatMul(x, W)) -- the constant first -- -> BatchNormalization: one fold."""
    x = b.input("x", [3, 4])
    y = b.node("MatMul", [x, b.weight("fc.weight", (4, 5), 4)], "fc")
    y = b.node("Add", [b.init("fc.bias", b.uniform((5,), 0.5)), y], "fc_add")
    b.output(b.bn(y, "bn", 5))


@register("matmul_bn", "linear->bn", folds=1, norms_left=0,
          pairs=(("bn", "fc", "linear->bn"),))
def _matmul_bn(b: GraphBuilder) -> None:
    """MatMul(x, W) (no bias) -> BatchNormalization on a 2-D input: folds; the BN's shift needs a bias, so the
    MatMul becomes a Gemm with C; one fold."""
    x = b.input("x", [3, 4])
    b.output(b.bn(b.node("MatMul", [x, b.weight("fc.weight", (4, 5), 4)], "fc"), "bn", 5))


@register("flatten_matmul_add_bn", "linear->bn", folds=1, norms_left=0,
          pairs=(("bn", "fc", "linear->bn"),))
def _flatten_matmul_bn(b: GraphBuilder) -> None:
    """Conv -> GlobalAveragePool -> Flatten -> MatMul -> Add -> BatchNormalization: shape inference proves the
    MatMul input 2-D (Flatten gives rank 2); the first conv has no BN; one fold."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Flatten", [b.node("GlobalAveragePool", [b.conv(x, "conv", 3, 4, 3)], "pool")], "flatten")
    y = b.node("Add", [b.node("MatMul", [y, b.weight("fc.weight", (4, 5), 4)], "fc"),
                       b.init("fc.bias", b.uniform((5,), 0.5))], "fc_add")
    b.output(b.bn(y, "bn", 5))


@register("token_matmul_add_flatten_bn", "linear->bn", folds=1, norms_left=0,
          pairs=(("bn", "fc", "linear->bn"),))
def _token_matmul_flatten_bn(b: GraphBuilder) -> None:
    """LeViT's Linear -> flatten(0, 1) -> BatchNorm1d on tokens: MatMul of (2, 5, 6) tokens by a (6, 4) weight
    -> Add bias -> Flatten(axis=2) to (10, 4) -> BatchNormalization(4) -> Reshape back to (2, 5, 4). The
    flattened rows keep the MatMul's 4 columns as the norm's channels; one fold into weight and bias."""
    x = b.input("x", [2, 5, 6])
    y = b.node("Add", [b.node("MatMul", [x, b.weight("fc.weight", (6, 4), 6)], "fc"),
                       b.init("fc.bias", b.uniform((4,), 0.5))], "fc_add")
    y = b.bn(b.node("Flatten", [y], "flatten", axis=2), "bn", 4)
    b.output(b.node("Reshape", [y, b.init("shape", np.array([2, 5, 4], np.int64))], "unflatten"))


@register("token_matmul_reshape_bn_no_bias", "linear->bn", folds=1, norms_left=0,
          pairs=(("bn", "fc", "linear->bn"),))
def _token_matmul_reshape_bn(b: GraphBuilder) -> None:
    """A bias-free MatMul of (2, 3, 5, 6) tokens -> Reshape to (-1, 4) -> BatchNormalization(4) -> Relu: the
    reshape keeps the last axis (4 columns on both sides); one fold. The MatMul's input is 4-D, so its new bias
    comes from an Add after it (a Gemm takes 2-D input only)."""
    x = b.input("x", [2, 3, 5, 6])
    y = b.node("MatMul", [x, b.weight("fc.weight", (6, 4), 6)], "fc")
    y = b.node("Reshape", [y, b.init("shape", np.array([-1, 4], np.int64))], "flatten")
    b.output(b.node("Relu", [b.bn(y, "bn", 4)], "relu"))


@register("token_matmul_reshape_mixes_columns_bn", "trap", folds=0, norms_left=1,
           skips={"bn": ("no_fusable_neighbour",)})
def _token_matmul_reshape_mixes(b: GraphBuilder) -> None:
    """MatMul (2, 5, 6) x (6, 4) -> Reshape to (5, 8) -> BatchNormalization(8): each row of 8 holds two tokens'
    4 columns, so the norm's channel c is the MatMul's column c mod 4 of alternate tokens; no per-column fold
    exists. Left."""
    x = b.input("x", [2, 5, 6])
    y = b.node("MatMul", [x, b.weight("fc.weight", (6, 4), 6)], "fc")
    y = b.node("Reshape", [y, b.init("shape", np.array([5, 8], np.int64))], "regroup")
    b.output(b.bn(y, "bn", 8))


@register("conv_flatten_bn", "trap", folds=0, norms_left=1, skips={"bn": ("no_fusable_neighbour",)})
def _conv_flatten_bn(b: GraphBuilder) -> None:
    """Conv (3->4, 1x1) on 1x1 maps -> Flatten -> BatchNormalization(4): a conv's channels are axis 1, not its
    last axis, so the reshape rule of the linear layers does not apply. Left (a reason, never a wrong fold)."""
    x = b.input("x", [2, 3, 1, 1])
    b.output(b.bn(b.node("Flatten", [b.conv(x, "conv", 3, 4, 1)], "flatten"), "bn", 4))


@register("gemm_add_bn", "linear->bn", folds=1, norms_left=0, pairs=(("bn", "fc", "linear->bn"),))
def _gemm_add_bn(b: GraphBuilder) -> None:
    """Gemm(transB=1, C, beta=0.5) -> Add(a [5] constant: the columns of the (N, 5) output) ->
    BatchNormalization: beta * C plus the Add's constant is the bias; one fold."""
    x = b.input("x", [3, 4])
    y = b.node("Gemm", [x, b.weight("fc.weight", (5, 4), 4), b.init("fc.bias", b.uniform((5,), 0.5))], "fc",
               transB=1, beta=0.5)
    b.output(b.bn(b.add_constant(y, "add", (5,)), "bn", 5))

"""Cases of the bn->linear family: BatchNormalization -> Gemm / MatMul (+ Add) on (N, C) data."""

from __future__ import annotations

from .base import GraphBuilder, register


@register("bn_gemm", "bn->linear", folds=1, norms_left=0,
          pairs=(("bn", "fc", "bn->linear"),))
def _bn_gemm(b: GraphBuilder) -> None:
    """BatchNormalization on (N, 4) -> Gemm(transB=1, C): Gemm's A is 2-D by definition; one fold."""
    x = b.input("x", [3, 4])
    y = b.node("Gemm", [b.bn(x, "bn", 4), b.weight("fc.weight", (5, 4), 4), b.init("fc.bias", b.uniform((5,), 0.5))],
               "fc", transB=1)
    b.output(y)


@register("bn_gemm_alpha_no_c", "bn->linear", folds=1, norms_left=0,
          pairs=(("bn", "fc", "bn->linear"),))
def _bn_gemm_alpha(b: GraphBuilder) -> None:
    """BatchNormalization -> Gemm (transB=0, alpha=3, no C): the BN's shift becomes a new C; one fold."""
    x = b.input("x", [3, 4])
    b.output(b.node("Gemm", [b.bn(x, "bn", 4), b.weight("fc.weight", (4, 5), 4)], "fc", alpha=3.0))


@register("bn_matmul_add", "bn->linear", folds=1, norms_left=0,
          pairs=(("bn", "fc", "bn->linear"),))
def _bn_matmul_add(b: GraphBuilder) -> None:
    """BatchNormalization on a 2-D input -> MatMul -> Add(bias): W's rows take the scale, the bias takes W^T t;
    one fold."""
    x = b.input("x", [3, 4])
    y = b.node("MatMul", [b.bn(x, "bn", 4), b.weight("fc.weight", (4, 5), 4)], "fc")
    b.output(b.node("Add", [y, b.init("fc.bias", b.uniform((5,), 0.5))], "fc_add"))


@register("bn_matmul", "bn->linear", folds=1, norms_left=0,
          pairs=(("bn", "fc", "bn->linear"),))
def _bn_matmul(b: GraphBuilder) -> None:
    """BatchNormalization on a 2-D input -> MatMul (no bias): the shift needs a bias, so the MatMul becomes a
    Gemm with C; one fold."""
    x = b.input("x", [3, 4])
    b.output(b.node("MatMul", [b.bn(x, "bn", 4), b.weight("fc.weight", (4, 5), 4)], "fc"))


@register("bn_add_gemm", "bn->linear", folds=1, norms_left=0, pairs=(("bn", "fc", "bn->linear"),))
def _bn_add_gemm(b: GraphBuilder) -> None:
    """BatchNormalization on (N, 4) -> Add([4], one value per column = channel) -> Gemm(transB=1, C): one fold."""
    x = b.input("x", [3, 4])
    y = b.add_constant(b.bn(x, "bn", 4), "add", (4,))
    b.output(b.node("Gemm", [y, b.weight("fc.weight", (5, 4), 4), b.init("fc.bias", b.uniform((5,), 0.5))], "fc",
                    transB=1))

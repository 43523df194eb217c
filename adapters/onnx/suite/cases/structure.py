"""Graph structure: shared and copied initializers, weights that are graph outputs, If/Loop/Scan bodies and model-
local functions.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .base import PAD1, GraphBuilder, local_function, register


@register("shared_weight_two_bns", "graph", folds=2, norms_left=0,
          pairs=(("bn_a", "conv_a", "conv->bn"), ("bn_b", "conv_b", "conv->bn")))
def _shared_weight_two_bns(b: GraphBuilder) -> None:
    """conv_a and conv_b read ONE weight initializer (and one bias), each followed by its own BN: each folded
    conv needs its own new weight, neither sees the other's fold; two folds."""
    x = b.input("x", [2, 3, 6, 6])
    w = b.weight("shared.weight", (4, 3, 3, 3), 27)
    bias = b.init("shared.bias", b.uniform((4,), 0.5))
    y1 = b.bn(b.node("Conv", [x, w, bias], "conv_a"), "bn_a", 4)
    y2 = b.bn(b.node("Conv", [b.node("Relu", [x], "relu"), w, bias], "conv_b"), "bn_b", 4)
    b.output(b.node("Add", [y1, y2], "add"))


@register("shared_weight_one_unfolded", "graph", folds=1, norms_left=0,
          pairs=(("bn_a", "conv_a", "conv->bn"),))
def _shared_weight_one_unfolded(b: GraphBuilder) -> None:
    """conv_a -> BN and conv_b -> Relu read one weight initializer: conv_a's fold must get a new weight while
    conv_b keeps the original; one fold."""
    x = b.input("x", [2, 3, 6, 6])
    w = b.weight("shared.weight", (4, 3, 3, 3), 27)
    y1 = b.bn(b.node("Conv", [x, w], "conv_a"), "bn_a", 4)
    y2 = b.node("Relu", [b.node("Conv", [x, w], "conv_b")], "relu")
    b.output(b.node("Add", [y1, y2], "add"))


@register("identity_copies_of_parameters", "graph", folds=2, norms_left=0,
          pairs=(("bn_a", "conv_a", "conv->bn"), ("bn_b", "conv_b", "conv->bn")))
def _identity_copies(b: GraphBuilder) -> None:
    """The TorchScript exporter's deduplication: conv_b's weight is an Identity of conv_a's weight initializer,
    bn_b's mean and var are Identity copies of bn_a's and its scale an Identity of an Identity of bn_a's. Copies
    of constants are constants: both pairs fold, conv_a and conv_b each with its own new weight; two folds (the
    Identity nodes and the originals go with the last readers)."""
    x = b.input("x", [2, 3, 6, 6])
    w = b.weight("conv_a.weight", (4, 3, 3, 3), 27)
    y1 = b.bn(b.node("Conv", [x, w], "conv_a"), "bn_a", 4)
    w_copy = b.node("Identity", [w], "copy_w")
    conv_b = b.node("Conv", [b.node("Relu", [x], "relu"), w_copy], "conv_b")
    scale = b.node("Identity", [b.node("Identity", ["bn_a.scale"], "copy_scale")], "copy_copy_scale")
    mean, var = b.node("Identity", ["bn_a.mean"], "copy_mean"), b.node("Identity", ["bn_a.var"], "copy_var")
    bias = b.init("bn_b.B", b.bn_params("bn_b", 4)[1])
    y2 = b.node("BatchNormalization", [conv_b, scale, bias, mean, var], "bn_b")
    b.output(b.node("Add", [y1, y2], "add"))


@register("weight_is_also_graph_output", "graph", folds=1, norms_left=0,
          pairs=(("bn", "conv", "conv->bn"),))
def _weight_graph_output(b: GraphBuilder) -> None:
    """The conv's bias initializer is also passed through an Identity to a graph output: the fold writes a new
    bias and keeps the original for that output; one fold."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.bn(b.conv(x, "conv", 3, 4, 3), "bn", 4)
    b.output(y, b.node("Identity", ["conv.bias"], "bias_out"))


@register("if_branches_bn", "graph", folds=2, norms_left=0,
          pairs=(("then_bn", "then_conv", "conv->bn"), ("else_bn", "else_conv", "conv->bn")))
def _if_branches_bn(b: GraphBuilder) -> None:
    """An If whose then- and else-branches each run Conv -> BN on the outer input x with weights from the main
    graph's initializers (outer scope): each branch folds on its own; two folds."""
    x = b.input("x", [2, 3, 6, 6])
    cond = b.input("cond", [], np.bool_, value=np.array(True))
    branches = []
    for branch in ("then", "else"):
        g = GraphBuilder(f"{branch}_branch", parent=b, rng=b.rng)
        y = g.bn(g.conv(x, f"{branch}_conv", 3, 4, 3, **PAD1), f"{branch}_bn", 4)
        branches.append(g.graph([helper.make_tensor_value_info(y, TensorProto.FLOAT, [2, 4, 6, 6])]))
    b.output(b.node("If", [cond], "if", then_branch=branches[0], else_branch=branches[1]))


@register("loop_body_bn", "graph", folds=1, norms_left=0,
          pairs=(("body_bn", "body_conv", "conv->bn"),))
def _loop_body_bn(b: GraphBuilder) -> None:
    """A Loop (2 iterations) whose body runs Conv -> BN -> Relu on the loop-carried value, weights from the
    outer scope: folds inside the body; one fold."""
    x = b.input("x", [2, 4, 6, 6])
    trips = b.init("trips", np.array(2, dtype=np.int64))
    body = GraphBuilder("loop_body", parent=b, rng=b.rng)
    body.inputs = [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                   helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                   helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 4, 6, 6])]
    y = body.node("Relu", [body.bn(body.conv("v", "body_conv", 4, 4, 3, **PAD1), "body_bn", 4)], "body_relu")
    cond_out = body.node("Identity", ["cond_in"], "body_cond")
    graph = body.graph([helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
                        helper.make_tensor_value_info(y, TensorProto.FLOAT, [2, 4, 6, 6])])
    b.output(b.node("Loop", [trips, "", x], "loop", body=graph))
    b.declare("loop_out", [2, 4, 6, 6])


@register("if_branch_local_initializers", "graph", folds=2, norms_left=0,
          pairs=(("then_bn1", "then_conv", "conv->bn"), ("then_bn2", "then_conv", "conv->bn")))
def _if_branch_local(b: GraphBuilder) -> None:
    """An If whose then-branch holds its own initializers (Conv -> BN -> BN, weights and statistics inside the
    subgraph) and whose else-branch is Conv -> Relu on outer weights: both BNs of the then-branch fold into its
    conv; the subgraph's BN initializers go; two folds."""
    x = b.input("x", [2, 3, 6, 6])
    cond = b.input("cond", [], np.bool_, value=np.array(True))
    then = GraphBuilder("then_branch", parent=b, rng=b.rng, local_initializers=True)
    t = then.bn(then.bn(then.conv(x, "then_conv", 3, 4, 3, **PAD1), "then_bn1", 4), "then_bn2", 4)
    other = GraphBuilder("else_branch", parent=b, rng=b.rng)
    e = other.node("Relu", [other.conv(x, "else_conv", 3, 4, 3, **PAD1)], "else_relu")
    info = [2, 4, 6, 6]
    b.output(b.node("If", [cond], "if",
                    then_branch=then.graph([helper.make_tensor_value_info(t, TensorProto.FLOAT, info)]),
                    else_branch=other.graph([helper.make_tensor_value_info(e, TensorProto.FLOAT, info)])))


@register("scan_body_gemm_bn", "graph", folds=1, norms_left=0,
          pairs=(("body_bn", "body_fc", "linear->bn"),))
def _scan_body_gemm_bn(b: GraphBuilder) -> None:
    """A Scan over 3 steps whose body runs Gemm (outer-scope weight) -> BN -> Add(state) on each (2, 4) slice:
    the Gemm output is 2-D by definition, so the BN folds inside the body; one fold."""
    x = b.input("x", [3, 2, 4])
    state = b.input("state", [2, 5])
    body = GraphBuilder("scan_body", parent=b, rng=b.rng)
    body.inputs = [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [2, 5]),
                   helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [2, 4])]
    y = body.node("Gemm", ["x_t", body.weight("fc.weight", (5, 4), 4), body.init("fc.bias", body.uniform((5,), 0.5))],
                  "body_fc", transB=1)
    s_out = body.node("Add", [body.bn(y, "body_bn", 5), "s_in"], "body_add")
    y_t = body.node("Identity", [s_out], "body_out")
    graph = body.graph([helper.make_tensor_value_info(s_out, TensorProto.FLOAT, [2, 5]),
                        helper.make_tensor_value_info(y_t, TensorProto.FLOAT, [2, 5])])
    b.node("Scan", [state, x], "scan", outputs=["final_state", "ys"], body=graph, num_scan_inputs=1)
    b.output("final_state", "ys")


@register("function_constant_weights_bn", "graph", folds=1, norms_left=0, opset=18,
          pairs=(("bn", "conv", "conv->bn"),))
def _function_bn(b: GraphBuilder) -> None:
    """A model-local function ConvBnRelu whose weights and BN parameters are Constant nodes in its body,
    called twice from the main graph: the body's one BN folds into the body's conv (both calls share it);
    one fold, no BN left anywhere."""
    f = GraphBuilder("ConvBnRelu", rng=b.rng)
    w = f.node("Constant", [], "w", value=numpy_helper.from_array(f.uniform((3, 3, 3, 3), 0.33), "w"))
    params = [f.node("Constant", [], f"bn_{p}", value=numpy_helper.from_array(a, p))
              for p, a in zip(("scale", "B", "mean", "var"), f.bn_params("bn", 3), strict=True)]
    y = f.node("Conv", ["x", w], "conv", pads=[1, 1, 1, 1])
    y = f.node("Relu", [f.node("BatchNormalization", [y, *params], "bn")], "relu")
    b.functions.append(local_function("ConvBnRelu", f.nodes, ["x"], 18))
    b.extra_opsets["bnfold.cases"] = 1
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("ConvBnRelu", [x], "block1", domain="bnfold.cases")
    b.output(b.node("ConvBnRelu", [y], "block2", domain="bnfold.cases"))


@register("function_weights_as_inputs", "graph", folds=0, norms_left=1, opset=18,
           skips={"bn": ("not_constant",)})
def _function_inputs_bn(b: GraphBuilder) -> None:
    """A model-local function Conv -> BN whose weight and BN parameters are function inputs (bound to
    initializers at the call): inside the body they are not constants (another call could pass anything), so
    the BN stays; no fold, one BN left."""
    f = GraphBuilder("ConvBn", rng=b.rng)
    y = f.node("Conv", ["x", "w"], "conv")
    f.node("BatchNormalization", [y, "scale", "B", "mean", "var"], "bn")
    b.functions.append(local_function("ConvBn", f.nodes, ["x", "w", "scale", "B", "mean", "var"], 18))
    b.extra_opsets["bnfold.cases"] = 1
    x = b.input("x", [2, 3, 6, 6])
    w = b.weight("w", (4, 3, 3, 3), 27)
    params = [b.init(p, a) for p, a in zip(("scale", "B", "mean", "var"), b.bn_params("bn", 4), strict=True)]
    b.output(b.node("ConvBn", [x, w, *params], "block", domain="bnfold.cases"))


@register("function_epsilon_attribute", "graph", folds=0, norms_left=1, opset=18,
           skips={"bn": ("not_constant",)})
def _function_eps_attr(b: GraphBuilder) -> None:
    """A model-local function whose BN epsilon refers to the function's attribute ``eps`` (set per call):
    the body's epsilon is not a constant, so the BN stays; no fold, one left."""
    f = GraphBuilder("ConvBnEps", rng=b.rng)
    w = f.node("Constant", [], "w", value=numpy_helper.from_array(f.uniform((3, 3, 1, 1), 0.5), "w"))
    params = [f.node("Constant", [], f"bn_{p}", value=numpy_helper.from_array(a, p))
              for p, a in zip(("scale", "B", "mean", "var"), f.bn_params("bn", 3), strict=True)]
    y = f.node("Conv", ["x", w], "conv")
    eps = helper.make_attribute_ref("epsilon", onnx.AttributeProto.FLOAT)
    eps.ref_attr_name = "eps"
    bn = helper.make_node("BatchNormalization", [y, *params], ["y"], name="bn")
    bn.attribute.append(eps)
    f.nodes.append(bn)
    b.functions.append(local_function("ConvBnEps", f.nodes, ["x"], 18, attributes=["eps"]))
    b.extra_opsets["bnfold.cases"] = 1
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.node("ConvBnEps", [x], "block", domain="bnfold.cases", eps=1e-3))


@register("function_conv_add_bn", "graph", folds=1, norms_left=0, opset=18, pairs=(("bn", "conv", "conv->bn"),))
def _function_conv_add_bn(b: GraphBuilder) -> None:
    """A model-local function whose body is Conv (Constant weight, no bias) -> Add(a Constant [1, 3, 1, 1]) ->
    BatchNormalization -> Relu: the Add is the conv's bias; the BN folds, the Add and its Constant go; one fold."""
    f = GraphBuilder("ConvAddBn", rng=b.rng)
    w = f.node("Constant", [], "w", value=numpy_helper.from_array(f.uniform((3, 3, 3, 3), 0.33), "w"))
    c = f.node("Constant", [], "c", value=numpy_helper.from_array(f.uniform((1, 3, 1, 1), 0.5), "c"))
    params = [f.node("Constant", [], f"bn_{p}", value=numpy_helper.from_array(a, p))
              for p, a in zip(("scale", "B", "mean", "var"), f.bn_params("bn", 3), strict=True)]
    y = f.node("Add", [f.node("Conv", ["x", w], "conv", pads=[1, 1, 1, 1]), c], "add")
    y = f.node("Relu", [f.node("BatchNormalization", [y, *params], "bn")], "relu")
    b.functions.append(local_function("ConvAddBn", f.nodes, ["x"], 18))
    b.extra_opsets["bnfold.cases"] = 1
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.node("ConvAddBn", [x], "block", domain="bnfold.cases"))


@register("if_branch_conv_add_bn", "graph", folds=2, norms_left=0,
          pairs=(("then_bn", "then_conv", "conv->bn"), ("else_bn", "else_bn_conv", "bn->conv")))
def _if_branch_conv_add_bn(b: GraphBuilder) -> None:
    """An If whose then-branch runs Conv -> Add(a main-graph initializer [1, 4, 1, 1]) -> BN and whose
    else-branch runs BN -> Add(another) -> Conv 1x1, on the outer input: each Add folds with its BN inside its
    branch; two folds."""
    x = b.input("x", [2, 3, 6, 6])
    cond = b.input("cond", [], np.bool_, value=np.array(True))
    then = GraphBuilder("then_branch", parent=b, rng=b.rng)
    y = then.bn(then.add_constant(then.conv(x, "then_conv", 3, 4, 3, bias=False, **PAD1), "then_add", (1, 4, 1, 1)),
                "then_bn", 4)
    other = GraphBuilder("else_branch", parent=b, rng=b.rng)
    z = other.conv(other.add_constant(other.bn(x, "else_bn", 3), "else_add", (1, 3, 1, 1)), "else_bn_conv", 3, 4, 1)
    branches = [g.graph([helper.make_tensor_value_info(v, TensorProto.FLOAT, [2, 4, 6, 6])])
                for g, v in ((then, y), (other, z))]
    b.output(b.node("If", [cond], "if", then_branch=branches[0], else_branch=branches[1]))


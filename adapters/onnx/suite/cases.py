"""Named ONNX graphs with a hand-worked answer: how many BatchNormalization nodes a correct folder removes.

Each :class:`Case` builds a tiny ``onnx.ModelProto`` with ``onnx.helper``, in the style of ONNX's own
node tests: a few channels, 6x6 inputs, random weights and randomised BatchNorm statistics drawn
from a ``numpy`` generator seeded by the case name, so every build is identical. Every model passes
``onnx.checker.check_model(full_check=True)`` and runs in onnxruntime.

The expected numbers are the oracle, worked out by hand from each graph's *dataflow*, never by
running a folder (each case's ``doc`` says why):

``folds``
    BatchNormalization nodes a correct folder removes (counted over the main graph, subgraphs
    and model-local functions);
``norms_left``
    BatchNormalization nodes that must remain;
``skips``
    for each BatchNormalization node that must remain (by node name), the report reason codes
    (``adapters.report.REASONS``) a correct folder may give.

The suite depends on numpy and onnx only.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["Case", "CASES", "FAMILIES", "get_case", "iter_cases", "count_batch_norms", "GraphBuilder"]

#: Families: the five fold kinds of the report, BatchNormalization versions, graph structure, and traps.
FAMILIES = ("conv->bn", "conv_transpose->bn", "linear->bn", "bn->conv", "bn->linear", "norms", "graph", "trap")


@dataclass(frozen=True)
class Case:
    """One named graph with its hand-worked expected fold outcome (see the module docstring)."""

    name: str
    family: str
    doc: str
    build: Callable[[], onnx.ModelProto]
    inputs: Callable[[], dict[str, np.ndarray]]
    folds: int
    norms_left: int
    skips: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


CASES: dict[str, Case] = {}


def get_case(name: str) -> Case:
    try:
        return CASES[name]
    except KeyError:
        raise KeyError(f"no ONNX case named {name!r}; known cases: {sorted(CASES)}") from None


def iter_cases(family: str | None = None) -> Iterator[Case]:
    """All cases in registration order, optionally only one family."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; families: {FAMILIES}")
    return (case for case in CASES.values() if family is None or case.family == family)


def count_batch_norms(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes in the main graph, every nested subgraph and every model-local function."""
    def in_nodes(nodes: Any) -> int:
        total = 0
        for node in nodes:
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx"):
                total += 1
            for attr in node.attribute:
                for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    total += in_nodes(graph.node)
        return total
    return in_nodes(model.graph.node) + sum(in_nodes(f.node) for f in model.functions)


# ---------------------------------------------------------------------------------------------
# Building graphs

_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.float64): TensorProto.DOUBLE, np.dtype(np.int64): TensorProto.INT64,
               np.dtype(np.bool_): TensorProto.BOOL}


class GraphBuilder:
    """Collects nodes, initializers, inputs and outputs of one graph (or subgraph), with seeded values.

    Weights are uniform with unit variance per output (``sqrt(3 / fan_in)``), biases uniform in
    [-0.5, 0.5]; BatchNorm statistics are ``mean ~ 0.5 N(0, 1)``, ``var ~ U(0.5, 2)``,
    ``|scale| ~ U(0.5, 1.5)`` negative one time in four, ``B ~ 0.5 N(0, 1)``: a fold that loses a
    shift, a sign or a channel is off by a large fraction of the output.
    """

    def __init__(self, name: str, *, opset: int = 17, dtype: Any = np.float32, parent: GraphBuilder | None = None,
                 rng: np.random.Generator | None = None, keep_value_info: bool = False,
                 local_initializers: bool = False):
        self.name = name
        self.opset = opset
        self.dtype = np.dtype(dtype)
        self.parent = parent
        self.rng = rng if rng is not None else np.random.default_rng(zlib.crc32(name.encode()))
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[str] = []
        self.output_infos: list[onnx.ValueInfoProto] = []
        self.feeds: dict[str, np.ndarray] = {}
        self.functions: list[onnx.FunctionProto] = []
        self.extra_opsets: dict[str, int] = {}
        self.ir_version: int | None = None
        self.initializers_as_inputs = False   # IR version 3 lists every initializer as a graph input
        self.keep_value_info = keep_value_info  # keep the inferred value_info (a folder must clean it up)
        self.local_initializers = local_initializers  # a subgraph that holds its own initializers
        self.declared: dict[str, onnx.ValueInfoProto] = {}  # output types shape inference cannot give

    # -- values ---------------------------------------------------------------------------
    def input(self, name: str, shape: list[Any] | None, dtype: Any = None, *, scale: float = 1.0,
              value: np.ndarray | None = None) -> str:
        """A graph input and its feed (standard normal times ``scale``, or ``value``)."""
        dt = np.dtype(dtype or self.dtype)
        self.inputs.append(helper.make_tensor_value_info(name, _NP_TO_ONNX[dt], shape))
        if value is None:
            concrete = [d if isinstance(d, int) else 2 for d in (shape or [])]
            value = (scale * self.rng.standard_normal(concrete)).astype(dt)
        self.feeds[name] = np.asarray(value, dtype=dt)
        return name

    def init(self, name: str, array: np.ndarray) -> str:
        """An initializer of the main graph (a subgraph reads it from the outer scope), or of this subgraph."""
        root = self
        while root.parent is not None and not root.local_initializers:
            root = root.parent
        root.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def uniform(self, shape: tuple[int, ...], bound: float, dtype: Any = None) -> np.ndarray:
        return self.rng.uniform(-bound, bound, shape).astype(dtype or self.dtype)

    def weight(self, name: str, shape: tuple[int, ...], fan_in: int, dtype: Any = None) -> str:
        return self.init(name, self.uniform(shape, float(np.sqrt(3.0 / max(fan_in, 1))), dtype))

    def bn_params(self, prefix: str, channels: int | tuple[int, ...], dtype: Any = None) -> list[np.ndarray]:
        """scale, B, mean, var for a BatchNorm (see the class docstring)."""
        dt = np.dtype(dtype or self.dtype)
        shape = (channels,) if isinstance(channels, int) else channels
        sign = np.where(self.rng.uniform(size=shape) < 0.25, -1.0, 1.0)
        scale = sign * self.rng.uniform(0.5, 1.5, shape)
        bias = 0.5 * self.rng.standard_normal(shape)
        mean = 0.5 * self.rng.standard_normal(shape)
        var = self.rng.uniform(0.5, 2.0, shape)
        return [a.astype(dt) for a in (scale, bias, mean, var)]

    # -- nodes ----------------------------------------------------------------------------
    def node(self, op: str, inputs: list[str], name: str, *, outputs: list[str] | None = None, domain: str = "",
             **attrs: Any) -> str:
        outs = outputs if outputs is not None else [f"{name}_out"]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0]

    def conv(self, x: str, name: str, cin: int, cout: int, kernel: int | tuple[int, ...], *, group: int = 1,
             bias: bool = True, dtype: Any = None, **attrs: Any) -> str:
        """Conv with weight ``[cout, cin/group, *k]`` (``kernel`` an int means 2-D)."""
        k = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        fan_in = cin // group * int(np.prod(k))
        inputs = [x, self.weight(f"{name}.weight", (cout, cin // group, *k), fan_in, dtype)]
        if bias:
            inputs.append(self.init(f"{name}.bias", self.uniform((cout,), 0.5, dtype)))
        return self.node("Conv", inputs, name, group=group, **attrs) if group != 1 else self.node(
            "Conv", inputs, name, **attrs)

    def conv_transpose(self, x: str, name: str, cin: int, cout: int, kernel: int | tuple[int, ...], *,
                       group: int = 1, bias: bool = True, **attrs: Any) -> str:
        """ConvTranspose with weight ``[cin, cout/group, *k]``."""
        k = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        fan_in = cin // group * int(np.prod(k))
        inputs = [x, self.weight(f"{name}.weight", (cin, cout // group, *k), fan_in)]
        if bias:
            inputs.append(self.init(f"{name}.bias", self.uniform((cout,), 0.5)))
        if group != 1:
            attrs["group"] = group
        return self.node("ConvTranspose", inputs, name, **attrs)

    def bn(self, x: str, name: str, channels: int | tuple[int, ...], *, dtype: Any = None,
           outputs: list[str] | None = None, **attrs: Any) -> str:
        """BatchNormalization with initializer parameters ``{name}.scale/.B/.mean/.var``."""
        names = [self.init(f"{name}.{p}", a) for p, a in zip(("scale", "B", "mean", "var"),
                                                             self.bn_params(name, channels, dtype), strict=True)]
        return self.node("BatchNormalization", [x, *names], name, outputs=outputs, **attrs)

    def output(self, *names: str) -> None:
        self.outputs.extend(names)

    def declare(self, name: str, shape: list[Any], dtype: Any = None) -> None:
        """The type of a graph output that shape inference leaves open (e.g. a Loop's final value)."""
        self.declared[name] = helper.make_tensor_value_info(name, _NP_TO_ONNX[np.dtype(dtype or self.dtype)], shape)

    # -- assembling -----------------------------------------------------------------------
    def graph(self, output_infos: list[onnx.ValueInfoProto] | None = None) -> onnx.GraphProto:
        outputs = output_infos if output_infos is not None else [
            helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in self.outputs]
        inputs = list(self.inputs)
        if self.initializers_as_inputs:
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.initializers]
        return helper.make_graph(self.nodes, self.name, inputs, outputs, self.initializers)

    def model(self) -> onnx.ModelProto:
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, v)
                                                           for d, v in self.extra_opsets.items()]
        model = helper.make_model(self.graph(), opset_imports=opsets, functions=self.functions,
                                  producer_name="bnfold-cases")
        minimum = helper.find_min_ir_version_for(opsets[:1])
        if self.functions:
            minimum = max(minimum, 8)  # model-local functions
        model.ir_version = self.ir_version or max(minimum, 3 if self.initializers_as_inputs else 4)
        # Output types and shapes come from ONNX's own shape inference (full_check requires them).
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        del model.graph.output[:]
        model.graph.output.extend(self.declared.get(o.name, o) for o in inferred.graph.output)
        if self.keep_value_info:
            model.graph.value_info.extend(inferred.graph.value_info)
        return model


def _register(name: str, family: str, *, folds: int, norms_left: int,
              skips: Mapping[str, tuple[str, ...]] | None = None, **options: Any
              ) -> Callable[[Callable[[GraphBuilder], None]], Callable[[GraphBuilder], None]]:
    """Register a case; the decorated function fills a :class:`GraphBuilder`, its docstring is the doc."""
    if family not in FAMILIES:
        raise ValueError(f"case {name!r}: unknown family {family!r}; families: {FAMILIES}")

    def decorator(fill: Callable[[GraphBuilder], None]) -> Callable[[GraphBuilder], None]:
        if name in CASES:
            raise ValueError(f"case {name!r} registered twice")

        def builder() -> GraphBuilder:
            b = GraphBuilder(name, **options)
            fill(b)
            return b

        def build() -> onnx.ModelProto:
            return builder().model()

        def inputs() -> dict[str, np.ndarray]:
            return {k: v.copy() for k, v in builder().feeds.items()}

        build.__name__, inputs.__name__ = f"build_{name}", f"inputs_{name}"
        CASES[name] = Case(name=name, family=family, doc=" ".join((fill.__doc__ or "").split()), build=build,
                           inputs=inputs, folds=folds, norms_left=norms_left, skips=dict(skips or {}))
        return fill

    return decorator


_PAD1: dict[str, Any] = {"pads": [1, 1, 1, 1]}


# ---------------------------------------------------------------------------------------------
# conv -> BN

@_register("conv2d_bn", "conv->bn", folds=1, norms_left=0)
def _conv2d_bn(b: GraphBuilder) -> None:
    """Conv (3->4, 3x3, pads 1, bias) -> BatchNormalization -> Relu: BN is a per-channel affine map of the
    conv output, so it folds whatever the conv pads; one fold, nothing left."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.node("Relu", [b.bn(b.conv(x, "conv", 3, 4, 3, **_PAD1), "bn", 4)], "relu"))


@_register("conv2d_nobias_bn", "conv->bn", folds=1, norms_left=0)
def _conv2d_nobias_bn(b: GraphBuilder) -> None:
    """Conv without bias -> BatchNormalization: folds; the folded Conv gains a bias input."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.bn(b.conv(x, "conv", 3, 4, 3, bias=False), "bn", 4))


@_register("conv1d_stride_dilation_bn", "conv->bn", folds=1, norms_left=0)
def _conv1d_bn(b: GraphBuilder) -> None:
    """1-D Conv (stride 2, dilation 2, pads 2) -> BatchNormalization on (N, C, L): one fold."""
    x = b.input("x", [2, 3, 11])
    b.output(b.bn(b.conv(x, "conv", 3, 4, (3,), strides=[2], dilations=[2], pads=[2, 2]), "bn", 4))


@_register("conv3d_groups_bn", "conv->bn", folds=1, norms_left=0)
def _conv3d_groups_bn(b: GraphBuilder) -> None:
    """3-D Conv with group=2 (4->6 channels) -> BatchNormalization: weight row o still produces channel o, so
    it folds; one fold."""
    x = b.input("x", [1, 4, 4, 5, 5])
    b.output(b.bn(b.conv(x, "conv", 4, 6, (2, 3, 3), group=2, pads=[0, 1, 1, 1, 1, 1]), "bn", 6))


@_register("conv2d_depthwise_bn", "conv->bn", folds=1, norms_left=0)
def _conv2d_depthwise_bn(b: GraphBuilder) -> None:
    """Depthwise Conv (group = channels = 4, stride 2) -> BatchNormalization: one fold."""
    x = b.input("x", [2, 4, 7, 7])
    b.output(b.bn(b.conv(x, "conv", 4, 4, 3, group=4, strides=[2, 2], **_PAD1), "bn", 4))


@_register("conv2d_auto_pad_same_bn", "conv->bn", folds=1, norms_left=0)
def _conv2d_same_bn(b: GraphBuilder) -> None:
    """Conv with auto_pad=SAME_UPPER (zeros added before the products) -> BatchNormalization: one fold."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.bn(b.conv(x, "conv", 3, 4, 3, auto_pad="SAME_UPPER", strides=[2, 2]), "bn", 4))


@_register("conv_bn_bn", "conv->bn", folds=2, norms_left=0)
def _conv_bn_bn(b: GraphBuilder) -> None:
    """Conv -> BatchNormalization -> BatchNormalization: a chain of per-channel affine maps; both fold into the
    conv; two folds."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.node("Relu", [b.bn(b.bn(b.conv(x, "conv", 3, 4, 3), "bn1", 4), "bn2", 4)], "relu"))


@_register("conv_identity_dropout_bn", "conv->bn", folds=1, norms_left=0, opset=13)
def _conv_identity_bn(b: GraphBuilder) -> None:
    """Conv -> Identity -> Dropout (inference: the identity; mask unused) -> BatchNormalization: the BN
    reads the conv's output unchanged; one fold."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Dropout", [b.node("Identity", [b.conv(x, "conv", 3, 4, 3)], "identity")], "dropout")
    b.output(b.bn(y, "bn", 4))


@_register("conv_concat_bn", "conv->bn", folds=1, norms_left=0)
def _conv_concat_bn(b: GraphBuilder) -> None:
    """Conv (3->2) and Conv (3->3, other kernel) -> Concat(axis=1) -> BatchNormalization(5): channels [0, 2)
    of the BN fold into the first conv and [2, 5) into the second; one BN removed."""
    x = b.input("x", [2, 3, 6, 6])
    c1 = b.conv(x, "conv_a", 3, 2, 3, **_PAD1)
    c2 = b.conv(x, "conv_b", 3, 3, 1, bias=False)
    b.output(b.bn(b.node("Concat", [c1, c2], "concat", axis=1), "bn", 5))


@_register("conv_concat_negative_axis_bn", "conv->bn", folds=1, norms_left=0)
def _conv_concat_neg_bn(b: GraphBuilder) -> None:
    """Three convs -> Concat(axis=-3) of 4-D outputs (the channel axis) -> BatchNormalization: one fold."""
    x = b.input("x", [2, 3, 6, 6])
    parts = [b.conv(x, f"conv_{i}", 3, 2, 1) for i in range(3)]
    b.output(b.bn(b.node("Concat", parts, "concat", axis=-3), "bn", 6))


@_register("conv_concat_height_axis_bn", "conv->bn", folds=1, norms_left=0)
def _conv_concat_height_bn(b: GraphBuilder) -> None:
    """Two convs (3->4 each) -> Concat(axis=2, the height) -> BatchNormalization(4): every output row of either
    conv carries all 4 channels, so the whole BN folds into each conv; one BN removed."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Concat", [b.conv(x, "conv_a", 3, 4, 1), b.conv(x, "conv_b", 3, 4, 3, **_PAD1)], "concat", axis=2)
    b.output(b.bn(y, "bn", 4))


@_register("conv_bn_constant_nodes", "conv->bn", folds=1, norms_left=0)
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


@_register("conv_bn_value_info", "conv->bn", folds=2, norms_left=0, keep_value_info=True)
def _conv_bn_value_info(b: GraphBuilder) -> None:
    """Conv -> BN -> Relu -> Conv -> BN with every intermediate listed in value_info: two folds; the value_info
    of the tensors that disappear must go, the rest stay."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Relu", [b.bn(b.conv(x, "conv1", 3, 4, 3, **_PAD1), "bn1", 4)], "relu")
    b.output(b.bn(b.conv(y, "conv2", 4, 4, 1), "bn2", 4))


@_register("bn_output_is_graph_output", "conv->bn", folds=1, norms_left=0)
def _bn_output_graph_output(b: GraphBuilder) -> None:
    """Conv -> BatchNormalization whose output is a graph output (and also feeds a Relu, another output): the
    folded conv takes over the BN's output name; one fold, both outputs keep their names."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.bn(b.conv(x, "conv", 3, 4, 3), "bn", 4)
    b.output(y, b.node("Relu", [y], "relu"))


# ---------------------------------------------------------------------------------------------
# conv_transpose -> BN

@_register("conv_transpose2d_bn", "conv_transpose->bn", folds=1, norms_left=0)
def _convt2d_bn(b: GraphBuilder) -> None:
    """ConvTranspose (3->4, stride 2, pads 1, output_padding 1, bias) -> BatchNormalization: the weight is
    [in, out, k, k], output channel o on axis 1; one fold."""
    x = b.input("x", [2, 3, 5, 5])
    y = b.conv_transpose(x, "convt", 3, 4, 3, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])
    b.output(b.bn(y, "bn", 4))


@_register("conv_transpose2d_groups_bn", "conv_transpose->bn", folds=1, norms_left=0)
def _convt2d_groups_bn(b: GraphBuilder) -> None:
    """Grouped ConvTranspose (4->6, group 2, no bias): weight [in, out/group, k, k], output channel
    g*3 + j sits at axis-1 index j of group g's input rows; one fold."""
    x = b.input("x", [2, 4, 5, 5])
    b.output(b.bn(b.conv_transpose(x, "convt", 4, 6, 3, group=2, bias=False), "bn", 6))


@_register("conv_transpose1d_dilation_bn", "conv_transpose->bn", folds=1, norms_left=0)
def _convt1d_bn(b: GraphBuilder) -> None:
    """1-D ConvTranspose (dilation 2, stride 3) -> BatchNormalization: one fold."""
    x = b.input("x", [2, 3, 7])
    b.output(b.bn(b.conv_transpose(x, "convt", 3, 4, (3,), dilations=[2], strides=[3]), "bn", 4))


@_register("conv_transpose3d_groups_bn", "conv_transpose->bn", folds=1, norms_left=0)
def _convt3d_bn(b: GraphBuilder) -> None:
    """3-D grouped ConvTranspose (6->4, group 2) -> BatchNormalization: one fold."""
    x = b.input("x", [1, 6, 3, 4, 4])
    b.output(b.bn(b.conv_transpose(x, "convt", 6, 4, (2, 2, 2), group=2, strides=[1, 2, 2]), "bn", 4))


# ---------------------------------------------------------------------------------------------
# linear -> BN (Gemm, MatMul [+ Add])

@_register("gemm_bn", "linear->bn", folds=1, norms_left=0)
def _gemm_bn(b: GraphBuilder) -> None:
    """Gemm(x, W^T) + C (transB=1, C a vector) -> BatchNormalization on the (N, 5) output: a Gemm output is
    2-D by definition, so the BN's channels are the Gemm's columns; one fold."""
    x = b.input("x", [3, 4])
    y = b.node("Gemm", [x, b.weight("fc.weight", (5, 4), 4), b.init("fc.bias", b.uniform((5,), 0.5))], "fc",
               transB=1)
    b.output(b.bn(y, "bn", 5))


@_register("gemm_transa_alpha_beta_bn", "linear->bn", folds=1, norms_left=0)
def _gemm_alpha_bn(b: GraphBuilder) -> None:
    """Gemm with transA=1 (A is [K, M]), transB=0 (B is [K, N]), alpha=0.3, beta=2, C of shape (1, N) ->
    BatchNormalization: transA only permutes the input, alpha and beta scale W and C; one fold."""
    x = b.input("x", [4, 3])
    y = b.node("Gemm", [x, b.weight("fc.weight", (4, 5), 4), b.init("fc.bias", b.uniform((1, 5), 0.5))], "fc",
               transA=1, alpha=0.3, beta=2.0)
    b.output(b.bn(y, "bn", 5))


@_register("gemm_scalar_c_bn", "linear->bn", folds=1, norms_left=0)
def _gemm_scalar_c_bn(b: GraphBuilder) -> None:
    """Gemm with a scalar C (shape (1,), broadcast to every column) -> BatchNormalization: the folded C becomes
    one value per column; one fold."""
    x = b.input("x", [3, 4])
    y = b.node("Gemm", [x, b.weight("fc.weight", (5, 4), 4), b.init("fc.bias", b.uniform((1,), 0.5))], "fc",
               transB=1)
    b.output(b.bn(y, "bn", 5))


@_register("gemm_no_c_bn", "linear->bn", folds=1, norms_left=0)
def _gemm_no_c_bn(b: GraphBuilder) -> None:
    """Gemm without C -> BatchNormalization: the folded Gemm gains a C input; one fold."""
    x = b.input("x", [3, 4])
    b.output(b.bn(b.node("Gemm", [x, b.weight("fc.weight", (4, 5), 4)], "fc"), "bn", 5))


@_register("matmul_add_bn", "linear->bn", folds=1, norms_left=0)
def _matmul_add_bn(b: GraphBuilder) -> None:
    """MatMul(x, W[K, N]) -> Add(bias) -> BatchNormalization with x a 2-D graph input: shape inference proves
    the (N, C) layout the BN needs; W's columns and the bias fold; one fold."""
    x = b.input("x", [3, 4])
    y = b.node("MatMul", [x, b.weight("fc.weight", (4, 5), 4)], "fc")
    y = b.node("Add", [y, b.init("fc.bias", b.uniform((5,), 0.5))], "fc_add")
    b.output(b.bn(y, "bn", 5))


@_register("add_bias_first_matmul_bn", "linear->bn", folds=1, norms_left=0)
def _add_first_matmul_bn(b: GraphBuilder) -> None:
    """Add(bias, MatMul(x, W)) -- the constant first -- -> BatchNormalization: one fold."""
    x = b.input("x", [3, 4])
    y = b.node("MatMul", [x, b.weight("fc.weight", (4, 5), 4)], "fc")
    y = b.node("Add", [b.init("fc.bias", b.uniform((5,), 0.5)), y], "fc_add")
    b.output(b.bn(y, "bn", 5))


@_register("matmul_bn", "linear->bn", folds=1, norms_left=0)
def _matmul_bn(b: GraphBuilder) -> None:
    """MatMul(x, W) (no bias) -> BatchNormalization on a 2-D input: folds; the BN's shift needs a bias, so the
    MatMul becomes a Gemm with C; one fold."""
    x = b.input("x", [3, 4])
    b.output(b.bn(b.node("MatMul", [x, b.weight("fc.weight", (4, 5), 4)], "fc"), "bn", 5))


@_register("flatten_matmul_add_bn", "linear->bn", folds=1, norms_left=0)
def _flatten_matmul_bn(b: GraphBuilder) -> None:
    """Conv -> GlobalAveragePool -> Flatten -> MatMul -> Add -> BatchNormalization: shape inference proves the
    MatMul input 2-D (Flatten gives rank 2); the first conv has no BN; one fold."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Flatten", [b.node("GlobalAveragePool", [b.conv(x, "conv", 3, 4, 3)], "pool")], "flatten")
    y = b.node("Add", [b.node("MatMul", [y, b.weight("fc.weight", (4, 5), 4)], "fc"),
                       b.init("fc.bias", b.uniform((5,), 0.5))], "fc_add")
    b.output(b.bn(y, "bn", 5))


@_register("token_matmul_add_flatten_bn", "linear->bn", folds=1, norms_left=0)
def _token_matmul_flatten_bn(b: GraphBuilder) -> None:
    """LeViT's Linear -> flatten(0, 1) -> BatchNorm1d on tokens: MatMul of (2, 5, 6) tokens by a (6, 4) weight
    -> Add bias -> Flatten(axis=2) to (10, 4) -> BatchNormalization(4) -> Reshape back to (2, 5, 4). The
    flattened rows keep the MatMul's 4 columns as the norm's channels; one fold into weight and bias."""
    x = b.input("x", [2, 5, 6])
    y = b.node("Add", [b.node("MatMul", [x, b.weight("fc.weight", (6, 4), 6)], "fc"),
                       b.init("fc.bias", b.uniform((4,), 0.5))], "fc_add")
    y = b.bn(b.node("Flatten", [y], "flatten", axis=2), "bn", 4)
    b.output(b.node("Reshape", [y, b.init("shape", np.array([2, 5, 4], np.int64))], "unflatten"))


@_register("token_matmul_reshape_bn_no_bias", "linear->bn", folds=1, norms_left=0)
def _token_matmul_reshape_bn(b: GraphBuilder) -> None:
    """A bias-free MatMul of (2, 3, 5, 6) tokens -> Reshape to (-1, 4) -> BatchNormalization(4) -> Relu: the
    reshape keeps the last axis (4 columns on both sides); one fold. The MatMul's input is 4-D, so its new bias
    comes from an Add after it (a Gemm takes 2-D input only)."""
    x = b.input("x", [2, 3, 5, 6])
    y = b.node("MatMul", [x, b.weight("fc.weight", (6, 4), 6)], "fc")
    y = b.node("Reshape", [y, b.init("shape", np.array([-1, 4], np.int64))], "flatten")
    b.output(b.node("Relu", [b.bn(y, "bn", 4)], "relu"))


@_register("token_matmul_reshape_mixes_columns_bn", "trap", folds=0, norms_left=1,
           skips={"bn": ("no_fusable_neighbour",)})
def _token_matmul_reshape_mixes(b: GraphBuilder) -> None:
    """MatMul (2, 5, 6) x (6, 4) -> Reshape to (5, 8) -> BatchNormalization(8): each row of 8 holds two tokens'
    4 columns, so the norm's channel c is the MatMul's column c mod 4 of alternate tokens; no per-column fold
    exists. Left."""
    x = b.input("x", [2, 5, 6])
    y = b.node("MatMul", [x, b.weight("fc.weight", (6, 4), 6)], "fc")
    y = b.node("Reshape", [y, b.init("shape", np.array([5, 8], np.int64))], "regroup")
    b.output(b.bn(y, "bn", 8))


@_register("conv_flatten_bn", "trap", folds=0, norms_left=1, skips={"bn": ("no_fusable_neighbour",)})
def _conv_flatten_bn(b: GraphBuilder) -> None:
    """Conv (3->4, 1x1) on 1x1 maps -> Flatten -> BatchNormalization(4): a conv's channels are axis 1, not its
    last axis, so the reshape rule of the linear layers does not apply. Left (a reason, never a wrong fold)."""
    x = b.input("x", [2, 3, 1, 1])
    b.output(b.bn(b.node("Flatten", [b.conv(x, "conv", 3, 4, 1)], "flatten"), "bn", 4))


# ---------------------------------------------------------------------------------------------
# BN -> conv

@_register("bn_conv_valid", "bn->conv", folds=1, norms_left=0)
def _bn_conv_valid(b: GraphBuilder) -> None:
    """BatchNormalization -> Conv (3x3, no padding): every input the kernel reads is a BN output, so the BN's
    shift folds into the conv bias exactly; one fold."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.conv(b.bn(x, "bn", 3), "conv", 3, 4, 3))


@_register("bn_conv_groups_stride", "bn->conv", folds=1, norms_left=0)
def _bn_conv_groups(b: GraphBuilder) -> None:
    """BatchNormalization(4) -> Conv (group 2, stride 2, explicit zero pads, auto_pad VALID-like) -> Relu: BN
    channel c feeds group c // 2; one fold."""
    x = b.input("x", [2, 4, 7, 7])
    b.output(b.node("Relu", [b.conv(b.bn(x, "bn", 4), "conv", 4, 6, 3, group=2, strides=[2, 2],
                                    pads=[0, 0, 0, 0])], "relu"))


@_register("bn_conv_same_1x1", "bn->conv", folds=1, norms_left=0)
def _bn_conv_same_1x1(b: GraphBuilder) -> None:
    """BatchNormalization -> Conv 1x1 with auto_pad=SAME_UPPER and stride 2: a 1x1 kernel needs no padding, so
    SAME adds none; one fold."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.conv(b.bn(x, "bn", 3), "conv", 3, 4, 1, auto_pad="SAME_UPPER", strides=[2, 2]))


@_register("bn_conv_nobias_valid_auto_pad", "bn->conv", folds=1, norms_left=0)
def _bn_conv_nobias(b: GraphBuilder) -> None:
    """BatchNormalization -> Conv (no bias, auto_pad=VALID, 1-D): the folded conv gains a bias; one fold."""
    x = b.input("x", [2, 3, 9])
    b.output(b.conv(b.bn(x, "bn", 3), "conv", 3, 4, (3,), bias=False, auto_pad="VALID"))


@_register("bn_pad_reflect_conv", "bn->conv", folds=1, norms_left=0, opset=18)
def _bn_pad_reflect_conv(b: GraphBuilder) -> None:
    """BatchNormalization -> Pad(mode=reflect, H and W by 1, axes given) -> Conv 3x3 without pads (how exporters
    write a reflect-padded conv): the padded values are copies of BN outputs, so the BN folds into the conv."""
    x = b.input("x", [2, 3, 6, 6])
    pads = b.init("pads", np.array([1, 1, 1, 1], dtype=np.int64))
    axes = b.init("axes", np.array([2, 3], dtype=np.int64))
    y = b.node("Pad", [b.bn(x, "bn", 3), pads, "", axes], "pad", mode="reflect")
    b.output(b.conv(y, "conv", 3, 4, 3))


@_register("conv_pad_edge_bn", "conv->bn", folds=1, norms_left=0)
def _conv_pad_edge_bn(b: GraphBuilder) -> None:
    """Conv -> Pad(mode=edge, every spatial side by 2) -> BatchNormalization: edge padding copies conv outputs, so
    BN(pad(conv)) = pad(BN(conv)) and the BN folds into the conv; one fold."""
    x = b.input("x", [2, 3, 6, 6])
    pads = b.init("pads", np.array([0, 0, 2, 2, 0, 0, 2, 2], dtype=np.int64))
    b.output(b.bn(b.node("Pad", [b.conv(x, "conv", 3, 4, 3), pads], "pad", mode="edge"), "bn", 4))


@_register("bn_bn_conv", "bn->conv", folds=2, norms_left=0)
def _bn_bn_conv(b: GraphBuilder) -> None:
    """BatchNormalization -> BatchNormalization -> Conv (no padding), the input a graph input: neither BN has
    a producer to fold into, both fold into the conv; two folds."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.conv(b.bn(b.bn(x, "bn1", 3), "bn2", 3), "conv", 3, 4, 3))


# ---------------------------------------------------------------------------------------------
# BN -> linear

@_register("bn_gemm", "bn->linear", folds=1, norms_left=0)
def _bn_gemm(b: GraphBuilder) -> None:
    """BatchNormalization on (N, 4) -> Gemm(transB=1, C): Gemm's A is 2-D by definition; one fold."""
    x = b.input("x", [3, 4])
    y = b.node("Gemm", [b.bn(x, "bn", 4), b.weight("fc.weight", (5, 4), 4), b.init("fc.bias", b.uniform((5,), 0.5))],
               "fc", transB=1)
    b.output(y)


@_register("bn_gemm_alpha_no_c", "bn->linear", folds=1, norms_left=0)
def _bn_gemm_alpha(b: GraphBuilder) -> None:
    """BatchNormalization -> Gemm (transB=0, alpha=3, no C): the BN's shift becomes a new C; one fold."""
    x = b.input("x", [3, 4])
    b.output(b.node("Gemm", [b.bn(x, "bn", 4), b.weight("fc.weight", (4, 5), 4)], "fc", alpha=3.0))


@_register("bn_matmul_add", "bn->linear", folds=1, norms_left=0)
def _bn_matmul_add(b: GraphBuilder) -> None:
    """BatchNormalization on a 2-D input -> MatMul -> Add(bias): W's rows take the scale, the bias takes W^T t;
    one fold."""
    x = b.input("x", [3, 4])
    y = b.node("MatMul", [b.bn(x, "bn", 4), b.weight("fc.weight", (4, 5), 4)], "fc")
    b.output(b.node("Add", [y, b.init("fc.bias", b.uniform((5,), 0.5))], "fc_add"))


@_register("bn_matmul", "bn->linear", folds=1, norms_left=0)
def _bn_matmul(b: GraphBuilder) -> None:
    """BatchNormalization on a 2-D input -> MatMul (no bias): the shift needs a bias, so the MatMul becomes a
    Gemm with C; one fold."""
    x = b.input("x", [3, 4])
    b.output(b.node("MatMul", [b.bn(x, "bn", 4), b.weight("fc.weight", (4, 5), 4)], "fc"))


# ---------------------------------------------------------------------------------------------
# BatchNormalization versions

@_register("bn_opset7_ir3", "norms", folds=1, norms_left=0, opset=7)
def _bn_opset7(b: GraphBuilder) -> None:
    """Opset 7 (BatchNormalization-7 with spatial=1), IR version 3, where every initializer is also listed as a
    graph input: below IR 4 such inputs are constants (not overridable), so Conv -> BN folds; one fold."""
    b.initializers_as_inputs = True
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.bn(b.conv(x, "conv", 3, 4, 3), "bn", 4, spatial=1))


@_register("bn_opset7_spatial0_2d", "norms", folds=1, norms_left=0, opset=7)
def _bn_opset7_spatial0(b: GraphBuilder) -> None:
    """Opset 7 BatchNormalization with spatial=0 on the 2-D output of a Gemm: per-activation statistics of an
    (N, C) input are per-channel, so it folds; one fold."""
    x = b.input("x", [3, 4])
    y = b.node("Gemm", [x, b.weight("fc.weight", (5, 4), 4), b.init("fc.bias", b.uniform((5,), 0.5))], "fc",
               transB=1)
    b.output(b.bn(y, "bn", 5, spatial=0))


@_register("bn_opset9", "norms", folds=2, norms_left=0, opset=9)
def _bn_opset9(b: GraphBuilder) -> None:
    """Opset 9 (BatchNormalization-9: no spatial, Y only = test mode): Conv -> BN -> Relu -> BN -> Conv (no
    pads); two folds (the second BN backward into the second conv)."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Relu", [b.bn(b.conv(x, "conv1", 3, 4, 3, **_PAD1), "bn1", 4)], "relu")
    b.output(b.conv(b.bn(y, "bn2", 4), "conv2", 4, 4, 1))


@_register("bn_opset14_training_mode_0", "norms", folds=1, norms_left=0, opset=14)
def _bn_opset14(b: GraphBuilder) -> None:
    """Opset 14 BatchNormalization with an explicit training_mode=0: eval mode; one fold."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.bn(b.conv(x, "conv", 3, 4, 3), "bn", 4, training_mode=0))


@_register("bn_opset15_mixed_dtypes", "norms", folds=1, norms_left=0, opset=15)
def _bn_opset15_mixed(b: GraphBuilder) -> None:
    """Opset 15: float16 Conv -> BatchNormalization whose scale/B and mean/var are float32 (T1, T2 differ from
    T): the fold is computed in float64 and rounded once to the conv's float16; one fold."""
    x = b.input("x", [2, 3, 6, 6], np.float16)
    b.output(b.bn(b.conv(x, "conv", 3, 4, 3, dtype=np.float16), "bn", 4, dtype=np.float32))


@_register("fp16_conv_bn", "norms", folds=2, norms_left=0, dtype=np.float16)
def _fp16_conv_bn(b: GraphBuilder) -> None:
    """float16 throughout: Conv -> BN -> Relu -> ConvTranspose -> BN; two folds, rounded once to float16."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Relu", [b.bn(b.conv(x, "conv", 3, 4, 3), "bn1", 4)], "relu")
    b.output(b.bn(b.conv_transpose(y, "convt", 4, 4, 2, strides=[2, 2]), "bn2", 4))


@_register("float64_gemm_bn", "norms", folds=1, norms_left=0, dtype=np.float64)
def _f64_gemm_bn(b: GraphBuilder) -> None:
    """float64 Gemm -> BatchNormalization (epsilon 1e-3): one fold, no rounding beyond float64."""
    x = b.input("x", [3, 4])
    y = b.node("Gemm", [x, b.weight("fc.weight", (5, 4), 4), b.init("fc.bias", b.uniform((5,), 0.5))], "fc",
               transB=1)
    b.output(b.bn(y, "bn", 5, epsilon=1e-3))


# ---------------------------------------------------------------------------------------------
# Graph structure: shared initializers, subgraphs, functions

@_register("shared_weight_two_bns", "graph", folds=2, norms_left=0)
def _shared_weight_two_bns(b: GraphBuilder) -> None:
    """conv_a and conv_b read ONE weight initializer (and one bias), each followed by its own BN: each folded
    conv needs its own new weight, neither sees the other's fold; two folds."""
    x = b.input("x", [2, 3, 6, 6])
    w = b.weight("shared.weight", (4, 3, 3, 3), 27)
    bias = b.init("shared.bias", b.uniform((4,), 0.5))
    y1 = b.bn(b.node("Conv", [x, w, bias], "conv_a"), "bn_a", 4)
    y2 = b.bn(b.node("Conv", [b.node("Relu", [x], "relu"), w, bias], "conv_b"), "bn_b", 4)
    b.output(b.node("Add", [y1, y2], "add"))


@_register("shared_weight_one_unfolded", "graph", folds=1, norms_left=0)
def _shared_weight_one_unfolded(b: GraphBuilder) -> None:
    """conv_a -> BN and conv_b -> Relu read one weight initializer: conv_a's fold must get a new weight while
    conv_b keeps the original; one fold."""
    x = b.input("x", [2, 3, 6, 6])
    w = b.weight("shared.weight", (4, 3, 3, 3), 27)
    y1 = b.bn(b.node("Conv", [x, w], "conv_a"), "bn_a", 4)
    y2 = b.node("Relu", [b.node("Conv", [x, w], "conv_b")], "relu")
    b.output(b.node("Add", [y1, y2], "add"))


@_register("identity_copies_of_parameters", "graph", folds=2, norms_left=0)
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


@_register("weight_is_also_graph_output", "graph", folds=1, norms_left=0)
def _weight_graph_output(b: GraphBuilder) -> None:
    """The conv's bias initializer is also passed through an Identity to a graph output: the fold writes a new
    bias and keeps the original for that output; one fold."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.bn(b.conv(x, "conv", 3, 4, 3), "bn", 4)
    b.output(y, b.node("Identity", ["conv.bias"], "bias_out"))


@_register("if_branches_bn", "graph", folds=2, norms_left=0)
def _if_branches_bn(b: GraphBuilder) -> None:
    """An If whose then- and else-branches each run Conv -> BN on the outer input x with weights from the main
    graph's initializers (outer scope): each branch folds on its own; two folds."""
    x = b.input("x", [2, 3, 6, 6])
    cond = b.input("cond", [], np.bool_, value=np.array(True))
    branches = []
    for branch in ("then", "else"):
        g = GraphBuilder(f"{branch}_branch", parent=b, rng=b.rng)
        y = g.bn(g.conv(x, f"{branch}_conv", 3, 4, 3, **_PAD1), f"{branch}_bn", 4)
        branches.append(g.graph([helper.make_tensor_value_info(y, TensorProto.FLOAT, [2, 4, 6, 6])]))
    b.output(b.node("If", [cond], "if", then_branch=branches[0], else_branch=branches[1]))


@_register("loop_body_bn", "graph", folds=1, norms_left=0)
def _loop_body_bn(b: GraphBuilder) -> None:
    """A Loop (2 iterations) whose body runs Conv -> BN -> Relu on the loop-carried value, weights from the
    outer scope: folds inside the body; one fold."""
    x = b.input("x", [2, 4, 6, 6])
    trips = b.init("trips", np.array(2, dtype=np.int64))
    body = GraphBuilder("loop_body", parent=b, rng=b.rng)
    body.inputs = [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                   helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                   helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 4, 6, 6])]
    y = body.node("Relu", [body.bn(body.conv("v", "body_conv", 4, 4, 3, **_PAD1), "body_bn", 4)], "body_relu")
    cond_out = body.node("Identity", ["cond_in"], "body_cond")
    graph = body.graph([helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
                        helper.make_tensor_value_info(y, TensorProto.FLOAT, [2, 4, 6, 6])])
    b.output(b.node("Loop", [trips, "", x], "loop", body=graph))
    b.declare("loop_out", [2, 4, 6, 6])


@_register("if_branch_local_initializers", "graph", folds=2, norms_left=0)
def _if_branch_local(b: GraphBuilder) -> None:
    """An If whose then-branch holds its own initializers (Conv -> BN -> BN, weights and statistics inside the
    subgraph) and whose else-branch is Conv -> Relu on outer weights: both BNs of the then-branch fold into its
    conv; the subgraph's BN initializers go; two folds."""
    x = b.input("x", [2, 3, 6, 6])
    cond = b.input("cond", [], np.bool_, value=np.array(True))
    then = GraphBuilder("then_branch", parent=b, rng=b.rng, local_initializers=True)
    t = then.bn(then.bn(then.conv(x, "then_conv", 3, 4, 3, **_PAD1), "then_bn1", 4), "then_bn2", 4)
    other = GraphBuilder("else_branch", parent=b, rng=b.rng)
    e = other.node("Relu", [other.conv(x, "else_conv", 3, 4, 3, **_PAD1)], "else_relu")
    info = [2, 4, 6, 6]
    b.output(b.node("If", [cond], "if",
                    then_branch=then.graph([helper.make_tensor_value_info(t, TensorProto.FLOAT, info)]),
                    else_branch=other.graph([helper.make_tensor_value_info(e, TensorProto.FLOAT, info)])))


@_register("scan_body_gemm_bn", "graph", folds=1, norms_left=0)
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


def _local_function(name: str, nodes: list[onnx.NodeProto], inputs: list[str], opset: int,
                    attributes: list[str] | None = None) -> onnx.FunctionProto:
    return helper.make_function("bnfold.cases", name, inputs, [nodes[-1].output[0]], nodes,
                                [helper.make_opsetid("", opset)], attributes or [])


@_register("function_constant_weights_bn", "graph", folds=1, norms_left=0, opset=18)
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
    b.functions.append(_local_function("ConvBnRelu", f.nodes, ["x"], 18))
    b.extra_opsets["bnfold.cases"] = 1
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("ConvBnRelu", [x], "block1", domain="bnfold.cases")
    b.output(b.node("ConvBnRelu", [y], "block2", domain="bnfold.cases"))


@_register("function_weights_as_inputs", "graph", folds=0, norms_left=1, opset=18,
           skips={"bn": ("not_constant",)})
def _function_inputs_bn(b: GraphBuilder) -> None:
    """A model-local function Conv -> BN whose weight and BN parameters are function inputs (bound to
    initializers at the call): inside the body they are not constants (another call could pass anything), so
    the BN stays; no fold, one BN left."""
    f = GraphBuilder("ConvBn", rng=b.rng)
    y = f.node("Conv", ["x", "w"], "conv")
    f.node("BatchNormalization", [y, "scale", "B", "mean", "var"], "bn")
    b.functions.append(_local_function("ConvBn", f.nodes, ["x", "w", "scale", "B", "mean", "var"], 18))
    b.extra_opsets["bnfold.cases"] = 1
    x = b.input("x", [2, 3, 6, 6])
    w = b.weight("w", (4, 3, 3, 3), 27)
    params = [b.init(p, a) for p, a in zip(("scale", "B", "mean", "var"), b.bn_params("bn", 4), strict=True)]
    b.output(b.node("ConvBn", [x, w, *params], "block", domain="bnfold.cases"))


@_register("function_epsilon_attribute", "graph", folds=0, norms_left=1, opset=18,
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
    b.functions.append(_local_function("ConvBnEps", f.nodes, ["x"], 18, attributes=["eps"]))
    b.extra_opsets["bnfold.cases"] = 1
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.node("ConvBnEps", [x], "block", domain="bnfold.cases", eps=1e-3))


# ---------------------------------------------------------------------------------------------
# Traps

@_register("conv_relu_bn", "trap", folds=0, norms_left=1, skips={"bn": ("no_fusable_neighbour",)})
def _conv_relu_bn(b: GraphBuilder) -> None:
    """Conv -> Relu -> BatchNormalization -> Relu: an activation between; the BN feeds a Relu; nothing folds."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.bn(b.node("Relu", [b.conv(x, "conv", 3, 4, 3)], "relu1"), "bn", 4)
    b.output(b.node("Relu", [y], "relu2"))


@_register("conv_output_shared", "trap", folds=0, norms_left=1, skips={"bn": ("output_used_elsewhere",)})
def _conv_output_shared(b: GraphBuilder) -> None:
    """Conv output feeds both a BN and a residual Add: folding would change the Add's input; the BN feeds the
    Add too (not a conv); nothing folds."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.conv(x, "conv", 3, 4, 3, **_PAD1)
    b.output(b.node("Add", [b.bn(y, "bn", 4), y], "add"))


@_register("conv_output_is_graph_output", "trap", folds=0, norms_left=1, skips={"bn": ("output_used_elsewhere",)})
def _conv_output_graph_output(b: GraphBuilder) -> None:
    """Conv output is a graph output and feeds a BN (whose output is another graph output): nothing folds."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.conv(x, "conv", 3, 4, 3)
    b.output(y, b.bn(y, "bn", 4))


@_register("two_bns_on_one_conv", "trap", folds=0, norms_left=2,
           skips={"bn_a": ("output_used_elsewhere",), "bn_b": ("output_used_elsewhere",)})
def _two_bns_one_conv(b: GraphBuilder) -> None:
    """One conv output read by two different BNs: neither can fold into it; neither feeds a conv; none."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.conv(x, "conv", 3, 4, 3)
    b.output(b.node("Add", [b.bn(y, "bn_a", 4), b.bn(y, "bn_b", 4)], "add"))


@_register("conv_weight_graph_input", "trap", folds=0, norms_left=1, skips={"bn": ("not_constant",)})
def _conv_weight_input(b: GraphBuilder) -> None:
    """The conv's weight is a graph input (supplied at run time): not a constant; nothing folds."""
    x = b.input("x", [2, 3, 6, 6])
    w = b.input("w", [4, 3, 3, 3], scale=0.3)
    b.output(b.bn(b.node("Conv", [x, w], "conv"), "bn", 4))


@_register("initializer_overridable_by_input", "trap", folds=0, norms_left=1, skips={"bn": ("not_constant",)})
def _initializer_overridable(b: GraphBuilder) -> None:
    """IR version >= 4 and the BN's running variance is an initializer that is ALSO a graph input: a default
    value the caller may override, so not a constant; nothing folds."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.bn(b.conv(x, "conv", 3, 4, 3), "bn", 4)
    var = next(t for t in b.initializers if t.name == "bn.var")
    b.inputs.append(helper.make_tensor_value_info("bn.var", TensorProto.FLOAT, [4]))
    b.feeds["bn.var"] = numpy_helper.to_array(var).copy()
    b.output(y)


@_register("bn_params_computed", "trap", folds=0, norms_left=1, skips={"bn": ("not_constant",)})
def _bn_params_computed(b: GraphBuilder) -> None:
    """The BN's scale is computed (Mul of an initializer by a graph input): not a constant; nothing folds."""
    x = b.input("x", [2, 3, 6, 6])
    k = b.input("k", [1], value=np.array([1.5], dtype=np.float32))
    y = b.conv(x, "conv", 3, 4, 3)
    s, bias, mean, var = b.bn_params("bn", 4)
    scale = b.node("Mul", [b.init("bn.scale_base", s), k], "scale_mul")
    b.output(b.node("BatchNormalization", [y, scale, b.init("bn.B", bias), b.init("bn.mean", mean),
                                           b.init("bn.var", var)], "bn"))


@_register("training_mode_bn", "trap", folds=0, norms_left=1, opset=15, skips={"bn": ("no_running_stats",)})
def _training_mode_bn(b: GraphBuilder) -> None:
    """BatchNormalization-15 with training_mode=1 (normalises with batch statistics; running_mean/var
    outputs): eval semantics do not apply; nothing folds."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.bn(b.conv(x, "conv", 3, 4, 3), "bn", 4, training_mode=1, outputs=["y", "running_mean", "running_var"])
    b.output(y, "running_mean")


@_register("bn_opset9_optional_outputs_used", "trap", folds=0, norms_left=1, opset=9,
           skips={"bn": ("no_running_stats", "output_used_elsewhere")})
def _bn9_outputs(b: GraphBuilder) -> None:
    """BatchNormalization-9 with its optional outputs (mean, var, saved_mean, saved_var) present and the mean
    used as a graph output: in opsets 7-13 those outputs mean training mode; it cannot be removed; none."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.bn(b.conv(x, "conv", 3, 4, 3), "bn", 4, outputs=["y", "mean", "var", "saved_mean", "saved_var"])
    b.output(y, "mean")
    b.declare("mean", [4])


@_register("bn_conv_zero_padded", "trap", folds=0, norms_left=1, skips={"bn": ("zero_padding",)})
def _bn_conv_zero_padded(b: GraphBuilder) -> None:
    """BatchNormalization -> Conv with pads 1: the conv pads with zeros AFTER the BN, where a folded conv would
    see the BN's shift; not exact at the borders; nothing folds (the BN reads a graph input)."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.conv(b.bn(x, "bn", 3), "conv", 3, 4, 3, **_PAD1))


@_register("bn_conv_auto_pad_same_3x3", "trap", folds=0, norms_left=1, skips={"bn": ("zero_padding",)})
def _bn_conv_same_3x3(b: GraphBuilder) -> None:
    """BatchNormalization -> Conv 3x3 with auto_pad=SAME_LOWER: zero padding computed at run time; none."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.conv(b.bn(x, "bn", 3), "conv", 3, 4, 3, auto_pad="SAME_LOWER"))


@_register("bn_pad_zeros_conv", "trap", folds=0, norms_left=1, skips={"bn": ("zero_padding",)})
def _bn_pad_zeros_conv(b: GraphBuilder) -> None:
    """BatchNormalization -> Pad(mode=constant, zeros) -> Conv without pads: the zeros come after the BN; not exact
    at the borders; none."""
    x = b.input("x", [2, 3, 6, 6])
    pads = b.init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64))
    b.output(b.conv(b.node("Pad", [b.bn(x, "bn", 3), pads], "pad"), "conv", 3, 4, 3))


@_register("bn_pad_reflect_channels_conv", "trap", folds=0, norms_left=1,
           skips={"bn": ("zero_padding", "no_fusable_neighbour")})
def _bn_pad_channels(b: GraphBuilder) -> None:
    """BatchNormalization(3) -> Pad(mode=reflect) that also pads the CHANNEL axis (3 -> 5) -> Conv on 5 channels:
    the extra channels copy other channels' values, so no per-input-channel fold exists; none."""
    x = b.input("x", [2, 3, 6, 6])
    pads = b.init("pads", np.array([0, 1, 0, 0, 0, 1, 0, 0], dtype=np.int64))
    b.output(b.conv(b.node("Pad", [b.bn(x, "bn", 3), pads], "pad", mode="reflect"), "conv", 5, 4, 1))


@_register("bn_conv_transpose", "trap", folds=0, norms_left=1, skips={"bn": ("transposed_after_bn",)})
def _bn_conv_transpose(b: GraphBuilder) -> None:
    """BatchNormalization -> ConvTranspose: the number of kernel taps reaching an output varies with its
    position, so the shift is not a per-channel constant; none."""
    x = b.input("x", [2, 3, 5, 5])
    b.output(b.conv_transpose(b.bn(x, "bn", 3), "convt", 3, 4, 3, strides=[2, 2]))


@_register("bn_output_shared_two_convs", "trap", folds=0, norms_left=1, skips={"bn": ("output_used_elsewhere",)})
def _bn_two_convs(b: GraphBuilder) -> None:
    """BatchNormalization -> two convs (no padding): folding into one would leave the other without the BN;
    none."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.bn(x, "bn", 3)
    b.output(b.node("Add", [b.conv(y, "conv_a", 3, 4, 1), b.conv(y, "conv_b", 3, 4, 1)], "add"))


@_register("fp16_overflow", "trap", folds=1, norms_left=1, dtype=np.float16, skips={"bn1": ("overflow",)})
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
    b.output(b.bn(b.conv(y, "conv2", 4, 4, 3, **_PAD1), "bn2", 4))


@_register("fp16_overflow_falls_back", "trap", folds=1, norms_left=0, dtype=np.float16)
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


@_register("cancelling_bias", "trap", folds=1, norms_left=0)
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


@_register("gemm_c_full_matrix", "trap", folds=0, norms_left=1, skips={"bn": ("not_per_channel",)})
def _gemm_c_matrix(b: GraphBuilder) -> None:
    """Gemm whose C is a full (M, N) matrix -> BN: folding is exact but the folded C would stay (M, N);
    not one value per channel, so it is left; none."""
    x = b.input("x", [3, 4])
    y = b.node("Gemm", [x, b.weight("fc.weight", (5, 4), 4), b.init("fc.bias", b.uniform((3, 5), 0.5))], "fc",
               transB=1)
    b.output(b.bn(y, "bn", 5))


@_register("gemm_weight_is_input_a", "trap", folds=0, norms_left=1,
           skips={"bn": ("not_constant", "no_fusable_neighbour")})
def _gemm_weight_a(b: GraphBuilder) -> None:
    """Gemm(W, x) with the constant as A and the data as B: the BN's channels (Gemm columns) are x's columns,
    not a weight's; none."""
    x = b.input("x", [4, 5])
    y = b.node("Gemm", [b.weight("fc.weight", (3, 4), 4), x], "fc")
    b.output(b.bn(y, "bn", 5))


@_register("bn_gemm_transa", "trap", folds=0, norms_left=1, skips={"bn": ("unsupported_layer",)})
def _bn_gemm_transa(b: GraphBuilder) -> None:
    """BatchNormalization on (N, C) -> Gemm with transA=1: the Gemm contracts over the BN's batch axis, so the
    BN's channels become output rows; the shift is not a per-column bias; none."""
    x = b.input("x", [4, 3])
    b.output(b.node("Gemm", [b.bn(x, "bn", 3), b.weight("fc.weight", (4, 5), 4)], "fc", transA=1))


@_register("matmul_3d_bn", "trap", folds=0, norms_left=1, skips={"bn": ("no_fusable_neighbour", "rank_unknown")})
def _matmul_3d_bn(b: GraphBuilder) -> None:
    """MatMul on a 3-D input (2, 3, 4) @ W(4, 5) -> BatchNormalization(3): the BN's channel axis 1 is the
    token axis, not the MatMul's features; none."""
    x = b.input("x", [2, 3, 4])
    b.output(b.bn(b.node("MatMul", [x, b.weight("fc.weight", (4, 5), 4)], "fc"), "bn", 3))


@_register("matmul_rank_unknown_bn", "trap", folds=0, norms_left=1, skips={"bn": ("rank_unknown",)})
def _matmul_rank_unknown(b: GraphBuilder) -> None:
    """Reshape to a run-time shape (an input of unknown length) -> MatMul -> Add -> BN -> ReduceSum to a scalar:
    the MatMul input's rank is not proven 2-D (it is at run time), so the BN is left; none."""
    x = b.input("x", [3, 4])
    shape = b.input("shape", ["r"], np.int64, value=np.array([3, 4], dtype=np.int64))
    y = b.node("MatMul", [b.node("Reshape", [x, shape], "reshape"), b.weight("fc.weight", (4, 5), 4)], "fc")
    y = b.node("Add", [y, b.init("fc.bias", b.uniform((5,), 0.5))], "fc_add")
    b.output(b.node("ReduceSum", [b.bn(y, "bn", 5)], "sum", keepdims=0))
    b.declare("sum_out", [])


@_register("bn_opset7_spatial0_per_activation", "trap", folds=0, norms_left=1, opset=7,
           skips={"bn": ("not_per_channel",)})
def _bn7_spatial0(b: GraphBuilder) -> None:
    """Opset 7 BatchNormalization with spatial=0 on a 4-D conv output: statistics per (channel, h, w)
    activation ([C, H, W] parameters), not per channel; none."""
    x = b.input("x", [2, 3, 6, 6])
    b.output(b.bn(b.conv(x, "conv", 3, 4, 3), "bn", (4, 4, 4), spatial=0))


@_register("concat_with_non_conv_input", "trap", folds=0, norms_left=1,
           skips={"bn": ("no_fusable_neighbour",)})
def _concat_non_conv(b: GraphBuilder) -> None:
    """Concat(axis=1) of a conv output and a Relu output -> BN: the Relu's slice has no layer to fold into,
    and a concat folds all-or-none; none."""
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Concat", [b.conv(x, "conv", 3, 2, 1), b.node("Relu", [x], "relu")], "concat", axis=1)
    b.output(b.bn(y, "bn", 5))


@_register("concat_conv_output_shared", "trap", folds=0, norms_left=1,
           skips={"bn": ("output_used_elsewhere",)})
def _concat_shared(b: GraphBuilder) -> None:
    """Concat(axis=1) of two convs -> BN, one conv's output also a graph output: none."""
    x = b.input("x", [2, 3, 6, 6])
    c1 = b.conv(x, "conv_a", 3, 2, 1)
    y = b.node("Concat", [c1, b.conv(x, "conv_b", 3, 3, 1)], "concat", axis=1)
    b.output(b.bn(y, "bn", 5), c1)


@_register("bn_in_branch_reads_outer_conv", "trap", folds=0, norms_left=1,
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

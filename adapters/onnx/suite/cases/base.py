"""The case registry and :class:`GraphBuilder`: what every case module builds its graphs with."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["Case", "Pair", "CASES", "FAMILIES", "get_case", "iter_cases", "count_batch_norms", "GraphBuilder",
           "register", "local_function", "PAD1"]

#: Families: the five fold kinds of the report, BatchNormalization versions, graph structure, and traps.
FAMILIES = ("conv->bn", "conv_transpose->bn", "linear->bn", "bn->conv", "bn->linear", "norms", "graph", "trap")


@dataclass(frozen=True)
class Pair:
    """One expected fold: ``norm`` into ``layer`` (node names, without a subgraph's or function's prefix) as
    ``kind`` (one of ``adapters.report.FOLD_KINDS``), the layer taking the norm's channels ``channels`` (a
    ``[start, stop)`` slice through a Concat; None: all of them)."""

    norm: str
    layer: str
    kind: str
    channels: tuple[int, int] | None = None


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
    pairs: tuple[Pair, ...] = ()


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

    def add_constant(self, x: str, name: str, shape: tuple[int, ...], *, first: bool = False) -> str:
        """Add(x, c) with ``c`` uniform in [-0.5, 0.5] of ``shape`` (initializer ``{name}.bias``), as PaddlePaddle
        exports write a layer's bias; ``first``: Add(c, x)."""
        c = self.init(f"{name}.bias", self.uniform(shape, 0.5))
        return self.node("Add", [c, x] if first else [x, c], name)

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


def register(name: str, family: str, *, folds: int, norms_left: int,
             skips: Mapping[str, tuple[str, ...]] | None = None,
             pairs: Iterable[Pair | tuple[Any, ...]] | None = None, **options: Any
             ) -> Callable[[Callable[[GraphBuilder], None]], Callable[[GraphBuilder], None]]:
    """Register a case; the decorated function fills a :class:`GraphBuilder`, its docstring is the doc.
    ``pairs`` are :class:`Pair` or its fields as a tuple, one per fold; their norms number ``folds``."""
    if family not in FAMILIES:
        raise ValueError(f"case {name!r}: unknown family {family!r}; families: {FAMILIES}")
    expected = tuple(p if isinstance(p, Pair) else Pair(*p) for p in pairs or ())
    if len({p.norm for p in expected}) != folds:
        raise ValueError(f"case {name!r}: {folds} fold(s) but pairs for {len({p.norm for p in expected})} norm(s)")

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
                           inputs=inputs, folds=folds, norms_left=norms_left, skips=dict(skips or {}),
                           pairs=expected)
        return fill

    return decorator


PAD1: dict[str, Any] = {"pads": [1, 1, 1, 1]}


def local_function(name: str, nodes: list[onnx.NodeProto], inputs: list[str], opset: int,
                    attributes: list[str] | None = None) -> onnx.FunctionProto:
    return helper.make_function("bnfold.cases", name, inputs, [nodes[-1].output[0]], nodes,
                                [helper.make_opsetid("", opset)], attributes or [])

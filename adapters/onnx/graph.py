"""Dataflow of an ONNX model: scopes, producers and consumers, constants, ranks, and the fold candidates.

Works on the raw protobuf (only the tensors being folded are ever read) and indexes the main graph, every
subgraph and every model-local function; :func:`find_candidates` pairs each BatchNormalization with the
layer(s) it can fold into, before or after it, by the torch adapter's rules plus an Add of a per-channel
constant on either side (a bias exported as its own node). The design: spec/onnx.md, sections 1 and 3.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, FunctionProto, GraphProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper

from refimpl.rounding import bfloat16_bits_to_float32

__all__ = ["DEFAULT_DOMAINS", "MIN_OPSET", "FLOAT_TYPES", "Scope", "ModelIndex", "ConstRef", "Layer", "Norm",
           "Forward", "Backward", "Shift", "Analysis", "LayerKind", "find_candidates", "read_array",
           "check_readable", "copy_field", "skeleton", "NotConstant"]

DEFAULT_DOMAINS = ("", "ai.onnx")
#: BatchNormalization-7 is the oldest version whose semantics are folded (opsets 1-6 have is_test / consumed_inputs).
MIN_OPSET = 7
#: Floating-point element types a fold can read and write, by the name refimpl.rounding uses.
FLOAT_TYPES: dict[int, str] = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16",
                               TensorProto.DOUBLE: "float64", TensorProto.BFLOAT16: "bfloat16"}
_NUMPY: dict[int, Any] = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16,
                          TensorProto.DOUBLE: np.float64}


#: A tensor's shape as far as it is known: None for a dim without a fixed value.
Dims = tuple[int | None, ...]


class LayerKind:
    CONV = "conv"
    CONV_TRANSPOSE = "conv_transpose"
    GEMM = "gemm"
    MATMUL = "matmul"


class NotConstant(Exception):
    """An attribute or parameter whose value is not known from the graph alone (with the reason)."""


# -- tensors --------------------------------------------------------------------------------

def read_array(tensor: TensorProto, what: str) -> np.ndarray:
    """The values of a floating-point tensor as a numpy array (bfloat16 as float32, exactly).

    Raises ValueError naming ``what`` for data that is not in the model (external data not
    loaded) or does not match its dims.
    """
    dims = tuple(int(d) for d in tensor.dims)
    if tensor.data_location == TensorProto.EXTERNAL and not tensor.HasField("raw_data"):
        raise ValueError(f"{what}: tensor '{tensor.name}' is stored in external data that is not loaded; load the "
                         "model with its external data (onnx.load(path)) or pass the file path")
    data_type = tensor.data_type
    count = math.prod(dims)
    if tensor.HasField("raw_data"):
        raw = tensor.raw_data
        itemsize = 2 if data_type == TensorProto.BFLOAT16 else np.dtype(_NUMPY[data_type]).itemsize
        if len(raw) != count * itemsize:
            raise ValueError(f"{what}: tensor '{tensor.name}' has {len(raw)} bytes of data but dims {list(dims)} "
                             f"need {count * itemsize}")
        if data_type == TensorProto.BFLOAT16:
            return bfloat16_bits_to_float32(np.frombuffer(raw, dtype="<u2")).reshape(dims)
        return np.frombuffer(raw, dtype=np.dtype(_NUMPY[data_type]).newbyteorder("<")).reshape(dims)
    if data_type == TensorProto.BFLOAT16:
        bits = np.asarray(tensor.int32_data, dtype=np.uint32).astype(np.uint16)
        if bits.size != count:
            raise ValueError(f"{what}: tensor '{tensor.name}' has {bits.size} values but dims {list(dims)}")
        return bfloat16_bits_to_float32(bits).reshape(dims)
    try:
        return numpy_helper.to_array(tensor)
    except Exception as exc:  # malformed typed data: report it as bad input
        raise ValueError(f"{what}: tensor '{tensor.name}' cannot be read ({exc})") from exc


def check_readable(tensor: TensorProto, what: str) -> None:
    """What :func:`read_array` would raise for ``tensor``, found without copying its data: the data is in the
    model and its size matches the dims (a serialized size compared with the header's plus the data's)."""
    if tensor.data_location == TensorProto.EXTERNAL and not tensor.HasField("raw_data"):
        raise ValueError(f"{what}: tensor '{tensor.name}' is stored in external data that is not loaded; load the "
                         "model with its external data (onnx.load(path)) or pass the file path")
    count = math.prod(int(d) for d in tensor.dims)
    if tensor.HasField("raw_data"):
        itemsize = 2 if tensor.data_type == TensorProto.BFLOAT16 else np.dtype(_NUMPY[tensor.data_type]).itemsize
        header = TensorProto()
        for fd, value in tensor.ListFields():
            if fd.name != "raw_data":
                copy_field(header, fd, value)
        size = count * itemsize
        # raw_data is field 9, length-delimited: one tag byte, the length as a varint, the bytes.
        if tensor.ByteSize() != header.ByteSize() + 1 + len(_varint(size)) + size:
            raise ValueError(f"{what}: tensor '{tensor.name}' holds a different number of bytes than its dims "
                             f"{[int(d) for d in tensor.dims]} need ({size})")
    else:
        read_array(tensor, what)  # typed fields (float_data, ...): small in practice; read them


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def attribute_value(node: NodeProto, name: str, default: object = None) -> object:
    """A node attribute's value (``default`` when absent); NotConstant for a function attribute reference."""
    for attr in node.attribute:
        if attr.name == name:
            if attr.ref_attr_name:
                raise NotConstant(f"attribute '{name}' of {node.op_type} refers to the function attribute "
                                  f"'{attr.ref_attr_name}' (set per call)")
            return helper.get_attribute_value(attr)
    return default


def _subgraphs(node: NodeProto) -> Iterator[tuple[str, GraphProto]]:
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == AttributeProto.GRAPHS:
            for i, g in enumerate(attr.graphs):
                yield f"{attr.name}[{i}]", g


def _is_default(node: NodeProto) -> bool:
    return node.domain in DEFAULT_DOMAINS


# -- scopes ---------------------------------------------------------------------------------

@dataclass(eq=False)
class Namespace:
    """Value names shared by a main graph and its subgraphs (or a function and its subgraphs)."""

    uses: Counter = field(default_factory=Counter)   # references: node inputs (any depth), scope outputs
    names: set[str] = field(default_factory=set)     # every value name defined or referenced

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name


@dataclass(eq=False)
class Scope:
    """One graph body with its dataflow tables."""

    proto: GraphProto | FunctionProto
    kind: str                       # "graph" (main), "subgraph" or "function"
    parent: Scope | None            # the enclosing scope of a subgraph
    prefix: str                     # prepended to node names in reports
    opset: int                      # default-domain opset in force
    namespace: Namespace
    initializers: dict[str, TensorProto] = field(default_factory=dict)
    overridable: set[str] = field(default_factory=set)   # initializers also listed as graph inputs (IR >= 4)
    inputs: set[str] = field(default_factory=set)
    outputs: list[str] = field(default_factory=list)
    producer: dict[str, tuple[int, int]] = field(default_factory=dict)   # value -> (node index, output index)
    consumers: dict[str, list[int]] = field(default_factory=dict)        # value -> reading node indices
    declared_shapes: dict[str, Dims | None] = field(default_factory=dict)  # from inputs/outputs/value_info
    sparse: set[str] = field(default_factory=set)

    @property
    def nodes(self):
        return self.proto.node

    def label(self, index: int) -> str:
        node = self.nodes[index]
        return self.prefix + (node.name or f"{node.op_type}:{node.output[0] if node.output else index}")

    def describe(self, index: int) -> str:
        return f"{self.nodes[index].op_type} '{self.label(index)}'"


def _shape_of(info: onnx.ValueInfoProto) -> Dims | None:
    """The declared shape (None for a dim without a fixed value: a name, nothing, or a negative value as PaddlePaddle
    writes for a dynamic dim), or None when not even the rank is given."""
    t = info.type
    if t.HasField("tensor_type") and t.tensor_type.HasField("shape"):
        return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                     for d in t.tensor_type.shape.dim)
    return None


class ModelIndex:
    """Every scope of a model with its dataflow tables, constants and ranks.

    ``main_initializers``: the main graph's initializers when they are not (yet) in ``model``
    itself (``fuse`` without ``inplace`` indexes a copy whose main initializers are written last).
    """

    def __init__(self, model: ModelProto, main_initializers: list[TensorProto] | None = None):
        self.model = model
        self.scopes: list[Scope] = []
        self._free: dict[int, set[str]] = {}
        self._inferred: dict[str, Dims | None] | None = None
        opsets = {o.domain: o.version for o in model.opset_import}
        model_opset = opsets.get("", opsets.get("ai.onnx", 0))
        main_ns = Namespace()
        main = Scope(model.graph, "graph", None, "", model_opset, main_ns)
        sources = list(model.graph.initializer) if main_initializers is None else main_initializers
        main.initializers = {t.name: t for t in sources}
        graph_inputs = {i.name for i in model.graph.input}
        if model.ir_version >= 4:  # below IR 4 every initializer is listed as an input and is still a constant
            main.overridable = graph_inputs & set(main.initializers)
        self._add_graph(main)
        for info in model.training_info:  # names the training graphs bind must stay as they are
            for graph in (info.initialization, info.algorithm):
                for node in graph.node:
                    main_ns.uses.update(n for n in node.input if n)
            for binding in list(info.initialization_binding) + list(info.update_binding):
                main_ns.uses.update((binding.key, binding.value))
        for function in model.functions:
            f_opsets = {o.domain: o.version for o in function.opset_import}
            f_opset = f_opsets.get("", f_opsets.get("ai.onnx", model_opset))
            prefix = f"{function.domain}.{function.name}{'@' + function.overload if function.overload else ''}/"
            self._add_function(Scope(function, "function", None, prefix, f_opset, Namespace()))

    # -- building ---------------------------------------------------------------------------
    def _index_nodes(self, scope: Scope) -> None:
        ns = scope.namespace
        for index, node in enumerate(scope.nodes):
            for k, out in enumerate(node.output):
                if out:
                    scope.producer[out] = (index, k)
                    ns.names.add(out)
            for name in node.input:
                if name:
                    scope.consumers.setdefault(name, []).append(index)
                    ns.uses[name] += 1
                    ns.names.add(name)
            for attr_name, graph in _subgraphs(node):
                for name in self._free_names(graph):
                    scope.consumers.setdefault(name, []).append(index)
                sub = Scope(graph, "subgraph", scope, f"{scope.label(index)}/{attr_name}/", scope.opset, ns)
                sub.initializers = {t.name: t for t in graph.initializer}
                self._add_graph(sub)
        for name in scope.outputs:
            ns.uses[name] += 1
            ns.names.add(name)

    def _add_graph(self, scope: Scope) -> None:
        graph = scope.proto
        assert isinstance(graph, GraphProto)
        self.scopes.append(scope)
        scope.inputs = {i.name for i in graph.input}
        scope.outputs = [o.name for o in graph.output]
        scope.sparse = {t.values.name for t in graph.sparse_initializer}
        if scope.kind == "subgraph":
            scope.overridable = scope.inputs & set(scope.initializers)
        for info in list(graph.input) + list(graph.output) + list(graph.value_info):
            scope.declared_shapes[info.name] = _shape_of(info)
        scope.namespace.names.update(scope.inputs | set(scope.initializers) | scope.sparse)
        self._index_nodes(scope)

    def _add_function(self, scope: Scope) -> None:
        function = scope.proto
        assert isinstance(function, FunctionProto)
        self.scopes.append(scope)
        scope.inputs = set(function.input)
        scope.outputs = list(function.output)
        for info in function.value_info:
            scope.declared_shapes[info.name] = _shape_of(info)
        scope.namespace.names.update(scope.inputs)
        self._index_nodes(scope)

    def _free_names(self, graph: GraphProto) -> set[str]:
        """Names a subgraph reads from its enclosing scopes (at any depth)."""
        key = id(graph)
        if key not in self._free:
            defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
            defined |= {t.values.name for t in graph.sparse_initializer}
            used: set[str] = set()
            for node in graph.node:
                defined.update(o for o in node.output if o)
                used.update(n for n in node.input if n)
                for _, sub in _subgraphs(node):
                    used |= self._free_names(sub)
            used.update(o.name for o in graph.output)
            self._free[key] = used - defined
        return self._free[key]

    # -- queries ----------------------------------------------------------------------------
    def constant(self, scope: Scope, name: str) -> ConstRef:
        """The constant behind ``name`` as seen from ``scope``; NotConstant (with why) otherwise."""
        s: Scope | None = scope
        while s is not None:
            if name in s.producer:
                index, _ = s.producer[name]
                node = s.nodes[index]
                if node.op_type == "Constant" and _is_default(node):
                    return ConstRef(name, s, _constant_value(node, name), index)
                if node.op_type == "Identity" and _is_default(node) and node.input and node.input[0]:
                    # Exporters deduplicate equal initializers into Identity nodes: the copy is that constant.
                    source = self.constant(s, node.input[0])
                    return ConstRef(name, s, source.tensor, None, copied=True)
                raise NotConstant(f"'{name}' is computed by {s.describe(index)}")
            if name in s.initializers:
                if name in s.overridable:
                    raise NotConstant(f"'{name}' is an initializer that is also a graph input (the caller may "
                                      "override it)")
                return ConstRef(name, s, s.initializers[name], None)
            if name in s.sparse:
                raise NotConstant(f"'{name}' is a sparse initializer")
            if name in s.inputs:
                raise NotConstant(f"'{name}' is a {'function' if s.kind == 'function' else 'graph'} input")
            s = s.parent
        raise ValueError(f"'{name}' is read in {scope.prefix or 'the main graph'} but defined nowhere")

    def shape(self, scope: Scope, name: str) -> Dims | None:
        """The shape of a value (None for a dim not known statically), from the model's declared types and ONNX
        shape inference, each dim from whichever knows it; None if not even the rank is known."""
        declared: Dims | None = None
        s: Scope | None = scope
        while s is not None and declared is None:
            if s.declared_shapes.get(name) is not None:
                declared = s.declared_shapes[name]
            elif name in s.initializers:
                return tuple(int(d) for d in s.initializers[name].dims)
            s = s.parent
        if declared is not None and all(d is not None for d in declared):
            return declared
        inferred = None if scope.kind == "function" else self.inferred_shapes().get(name)
        if declared is None or inferred is None or len(inferred) != len(declared):
            return declared if declared is not None else inferred
        return tuple(d if d is not None else i for d, i in zip(declared, inferred, strict=True))

    def rank(self, scope: Scope, name: str) -> int | None:
        """The rank of a value, from the model's declared types or ONNX shape inference; None if unknown."""
        shape = self.shape(scope, name)
        return None if shape is None else len(shape)

    def inferred_shapes(self) -> dict[str, Dims | None]:
        """Shapes from ONNX shape inference on the weightless skeleton (computed once, on first need)."""
        if self._inferred is None:
            shapes: dict[str, Dims | None] = {}
            try:
                inferred = onnx.shape_inference.infer_shapes(skeleton(self.model, self.scopes[0].initializers),
                                                             check_type=False, strict_mode=False, data_prop=True)
            except Exception:  # inference is only a source of proofs; no proof is the safe answer
                inferred = None
            if inferred is not None:
                def collect(graph: GraphProto) -> None:
                    for info in list(graph.value_info) + list(graph.output) + list(graph.input):
                        shapes.setdefault(info.name, _shape_of(info))
                    for node in graph.node:
                        for _, sub in _subgraphs(node):
                            collect(sub)
                collect(inferred.graph)
            self._inferred = shapes
        return self._inferred

    def norms(self) -> Iterator[tuple[Scope, int]]:
        for scope in self.scopes:
            for index, node in enumerate(scope.nodes):
                if node.op_type == "BatchNormalization" and _is_default(node):
                    yield scope, index


def _constant_value(node: NodeProto, name: str) -> TensorProto:
    for attr in node.attribute:
        if attr.ref_attr_name:
            raise NotConstant(f"'{name}' is a Constant whose value refers to the function attribute "
                              f"'{attr.ref_attr_name}'")
        if attr.name == "value":
            return attr.t
        if attr.name == "value_float":
            return helper.make_tensor(name, TensorProto.FLOAT, [], [attr.f])
        if attr.name == "value_floats":
            return helper.make_tensor(name, TensorProto.FLOAT, [len(attr.floats)], list(attr.floats))
    raise NotConstant(f"'{name}' is a Constant of a kind that holds no floating-point tensor")


#: Initializers kept in the skeleton (shape inference reads small ones: Reshape shapes, axes).
_SKELETON_KEEP = 1024


def skeleton(model: ModelProto, initializers: dict[str, TensorProto]) -> ModelProto:
    """The model without its large weights: every initializer over a few hundred values becomes a graph input of
    the same type and shape, and a negative dim of the main graph's inputs, outputs and value_info is left
    unknown. Cheap to validate and to run shape inference on, whatever the model's size."""
    skel = ModelProto()
    for fd, value in model.ListFields():
        if fd.name in ("graph", "training_info"):
            continue
        copy_field(skel, fd, value)
    graph = skel.graph
    for fd, value in model.graph.ListFields():
        if fd.name not in ("initializer", "input"):
            copy_field(graph, fd, value)
    graph.input.extend(model.graph.input)
    listed = {i.name for i in model.graph.input}
    for name, tensor in initializers.items():
        small = math.prod(tensor.dims) <= _SKELETON_KEEP and tensor.data_location != TensorProto.EXTERNAL
        if small:
            graph.initializer.append(tensor)
        elif name not in listed:
            graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    # A negative dim value (PaddlePaddle's "dynamic") is no size: shape inference would compute with it.
    for info in (*graph.input, *graph.output, *graph.value_info):
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            for dim in info.type.tensor_type.shape.dim:
                if dim.HasField("dim_value") and dim.dim_value < 0:
                    dim.Clear()
    return skel


def copy_field(target, fd, value) -> None:
    """Copy one field's value (protobuf's repeated ``add().CopyFrom`` is several times faster than ``extend``)."""
    if fd.is_repeated and fd.type == fd.TYPE_MESSAGE:
        field = getattr(target, fd.name)
        for item in value:
            field.add().CopyFrom(item)
    elif fd.is_repeated:
        getattr(target, fd.name).extend(value)
    elif fd.type == fd.TYPE_MESSAGE:
        getattr(target, fd.name).CopyFrom(value)
    else:
        setattr(target, fd.name, value)


@dataclass(eq=False)
class ConstRef:
    """A constant value: an initializer (``node`` None) or the output of a Constant node ``node`` of ``scope``;
    ``copied``: the output ``name`` of Identity nodes that copy such a constant (``tensor`` is the source's), never
    rewritten where it is (the source may have other readers)."""

    name: str
    scope: Scope
    tensor: TensorProto
    node: int | None
    copied: bool = False

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensor.dims)

    @property
    def dtype(self) -> str | None:
        return FLOAT_TYPES.get(self.tensor.data_type)


# -- fold participants ----------------------------------------------------------------------

@dataclass(eq=False)
class Layer:
    """A conv / transposed conv / Gemm / MatMul node a BN can fold into, with its constants resolved."""

    scope: Scope
    node: int
    kind: str
    weight: ConstRef
    bias: ConstRef | None = None     # conv bias, Gemm C, or the MatMul's Add constant
    add: int | None = None           # the Add node carrying a MatMul's bias, or the Add of ``shift``
    shift: ConstRef | None = None    # a per-channel constant an Add adds to a conv's/Gemm's output (removed by a fold)
    group: int = 1
    trans_b: bool = False
    alpha: float = 1.0
    beta: float = 1.0

    @property
    def key(self) -> tuple[int, int]:
        return (id(self.scope), self.node)

    @property
    def label(self) -> str:
        return self.scope.label(self.node)

    @property
    def out_channels(self) -> int:
        dims = self.weight.dims
        if self.kind == LayerKind.CONV:
            return dims[0]
        if self.kind == LayerKind.CONV_TRANSPOSE:
            return dims[1] * self.group
        if self.kind == LayerKind.GEMM:
            return dims[0] if self.trans_b else dims[1]
        return dims[1]

    @property
    def in_channels(self) -> int:
        dims = self.weight.dims
        if self.kind == LayerKind.CONV:
            return dims[1] * self.group
        if self.kind == LayerKind.CONV_TRANSPOSE:
            return dims[0]
        if self.kind == LayerKind.GEMM:
            return dims[1] if self.trans_b else dims[0]
        return dims[0]


@dataclass(eq=False)
class Norm:
    """A BatchNormalization node whose parameters are constants and that runs with its running statistics."""

    scope: Scope
    node: int
    params: tuple[ConstRef, ConstRef, ConstRef, ConstRef]   # scale, B, mean, var
    epsilon: float
    channels: int
    needs_2d: bool   # spatial=0 with (C,) parameters: per-activation equals per-channel only on (N, C) input

    @property
    def key(self) -> tuple[int, int]:
        return (id(self.scope), self.node)

    @property
    def label(self) -> str:
        return self.scope.label(self.node)


@dataclass(eq=False)
class Forward:
    """Layer(s) -> norm: one layer, or one per input of a Concat with the norm's channel slice each takes
    (``None``: all of the norm's channels)."""

    norm: Norm
    parts: tuple[tuple[Layer, tuple[int, int] | None], ...]
    between: tuple[int, ...]   # BN nodes between the layer and this norm (they must fold the same way)


@dataclass(eq=False)
class Backward:
    """Norm -> layer."""

    norm: Norm
    layer: Layer
    between: tuple[int, ...]


@dataclass(eq=False)
class Shift:
    """An Add of a per-channel constant right after a norm (norm -> Add(constant) -> ... -> layer): the norm's
    shift ``B`` becomes ``B + constant`` when the norm folds into the layer after it, and the Add goes."""

    add: int
    constant: ConstRef


@dataclass
class Analysis:
    index: ModelIndex
    all_norms: dict[tuple[int, int], tuple[Scope, int]] = field(default_factory=dict)  # every BN, in model order
    norms: dict[tuple[int, int], Norm] = field(default_factory=dict)
    forward: dict[tuple[int, int], Forward] = field(default_factory=dict)
    backward: dict[tuple[int, int], Backward] = field(default_factory=dict)
    reasons: dict[tuple[int, int], list[tuple[str, str]]] = field(default_factory=dict)
    rejected: dict[tuple[int, int], tuple[str, str]] = field(default_factory=dict)   # norms that cannot fold at all
    shifts: dict[tuple[int, int], Shift] = field(default_factory=dict)   # norm -> the Add right after it

    def note(self, key: tuple[int, int], code: str, detail: str) -> None:
        self.reasons.setdefault(key, []).append((code, detail))


# -- candidates -----------------------------------------------------------------------------

def find_candidates(index: ModelIndex) -> Analysis:
    analysis = Analysis(index)
    for scope, node in index.norms():
        key = (id(scope), node)
        analysis.all_norms[key] = (scope, node)
        try:
            norm = _norm(index, scope, node)
        except NotConstant as exc:
            analysis.rejected[key] = ("not_constant", f"{scope.describe(node)}: {exc}")
            continue
        except _Rejected as exc:
            analysis.rejected[key] = (exc.code, exc.detail)
            continue
        analysis.norms[key] = norm
    for norm in analysis.norms.values():
        _Finder(analysis, norm).run()
    return analysis


class _Rejected(Exception):
    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


def _norm(index: ModelIndex, scope: Scope, node_index: int) -> Norm:
    node = scope.nodes[node_index]
    what = scope.describe(node_index)
    if scope.opset < MIN_OPSET:
        raise ValueError(f"{what}: opset {scope.opset} is not supported (BatchNormalization from opset "
                         f"{MIN_OPSET} on)")
    if len(node.input) != 5 or not all(node.input):
        raise ValueError(f"{what} has inputs {list(node.input)}; BatchNormalization takes X, scale, B, mean, var")
    extra = [o for o in node.output[1:] if o]
    training = attribute_value(node, "training_mode", 0) if scope.opset >= 14 else 0
    if training:
        raise _Rejected("no_running_stats", f"{what} has training_mode=1: it normalises with batch statistics")
    if extra and scope.opset < 14:
        raise _Rejected("no_running_stats", f"{what} has the optional outputs {extra}: in opsets 7-13 they mean "
                        "training mode (batch statistics)")
    used = [o for o in extra if scope.namespace.uses[o]]
    if used:
        raise _Rejected("output_used_elsewhere", f"{what}'s optional outputs {used} are read")
    # Attributes are float32: the default 1e-5 means float32(1e-5), as onnxruntime reads it.
    epsilon = float(np.float32(attribute_value(node, "epsilon", 1e-5)))  # type: ignore[arg-type]
    spatial = attribute_value(node, "spatial", 1) if scope.opset < 9 else 1
    params = tuple(index.constant(scope, name) for name in node.input[1:])
    for ref, role in zip(params, ("scale", "B", "mean", "var"), strict=True):
        if ref.dtype is None:
            raise ValueError(f"{what}: {role} '{ref.name}' has element type "
                             f"{TensorProto.DataType.Name(ref.tensor.data_type)}, not floating point")
    shapes = {ref.dims for ref in params}
    if len(shapes) != 1:
        raise ValueError(f"{what}: scale, B, mean and var have different shapes "
                         f"{[list(ref.dims) for ref in params]}")
    shape = shapes.pop()
    if len(shape) != 1:
        if not spatial:
            raise _Rejected("not_per_channel", f"{what} has spatial=0 with parameters of shape {list(shape)}: "
                            "statistics per activation, not per channel")
        raise ValueError(f"{what}: parameters of shape {list(shape)}, expected one value per channel")
    scale, bias, mean, var = params
    return Norm(scope, node_index, (scale, bias, mean, var), epsilon, shape[0], needs_2d=not spatial)


def _conv_pads_nothing(node: NodeProto, weight_dims: tuple[int, ...]) -> tuple[bool, str]:
    """Whether a Conv reads only real input values (no zeros inserted): explicit pads all zero, or auto_pad
    VALID, or SAME_* where every kernel extent (k - 1) * dilation is zero."""
    auto_pad = attribute_value(node, "auto_pad", b"NOTSET")
    auto = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    kernel = list(weight_dims[2:])
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        dilations = list(attribute_value(node, "dilations", [1] * len(kernel)))  # type: ignore[call-overload]
        if all((k - 1) * d == 0 for k, d in zip(kernel, dilations, strict=False)):
            return True, ""
        return False, f"auto_pad={auto} with kernel {kernel}"
    if auto == "VALID":
        return True, ""
    pads = list(attribute_value(node, "pads", []))  # type: ignore[call-overload]
    if any(pads):
        return False, f"pads={pads}"
    return True, ""


class _Finder:
    """Finds the forward and backward candidates of one norm (the torch adapter's rules, on ONNX nodes)."""

    def __init__(self, analysis: Analysis, norm: Norm):
        self.a = analysis
        self.index = analysis.index
        self.norm = norm
        self.scope = norm.scope
        self.key = norm.key

    def note(self, code: str, detail: str) -> None:
        self.a.note(self.key, code, detail)

    def run(self) -> None:
        self.upstream()
        self.downstream()

    # -- helpers --------------------------------------------------------------------------
    def passes_through(self, index: int) -> bool:
        """Nodes a per-channel affine map commutes with: Identity, inference-mode Dropout (mask unused), a Pad that
        copies values (reflect / edge / wrap) along non-channel axes, and other foldable BNs (the plan checks
        that they fold the same way)."""
        node = self.scope.nodes[index]
        if not _is_default(node):
            return False
        if node.op_type == "Identity":
            return True
        if node.op_type == "Dropout":
            training_input = len(node.input) > 2 and node.input[2]
            mask = len(node.output) > 1 and node.output[1] and self.scope.namespace.uses[node.output[1]]
            return not training_input and not mask
        if node.op_type == "Pad":
            return self.copying_pad(node)
        if node.op_type == "BatchNormalization":
            return (id(self.scope), index) in self.a.norms
        return False

    def copying_pad(self, node: NodeProto) -> bool:
        """A Pad whose new values are copies of input values (mode reflect, edge or wrap), padding neither the batch
        nor the channel axis: BN(pad(x)) == pad(BN(x)) exactly."""
        try:
            mode = attribute_value(node, "mode", b"constant")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            if mode not in ("reflect", "edge", "wrap"):
                return False
            axes: list[int] | None = None
            if self.scope.opset < 11:
                pads = [int(p) for p in np.asarray(attribute_value(node, "pads", [])).reshape(-1)]
            else:
                def ints(position: int) -> list[int] | None:
                    if len(node.input) <= position or not node.input[position]:
                        return None
                    tensor = self.index.constant(self.scope, node.input[position]).tensor
                    return [int(v) for v in numpy_helper.to_array(tensor).reshape(-1)]
                pads = ints(1) or []
                axes = ints(3)
        except (NotConstant, ValueError):
            return False
        if axes is None:
            rank = len(pads) // 2
            axes = list(range(rank))
        else:
            rank_known = self.index.rank(self.scope, node.input[0])
            if any(a < 0 for a in axes):
                if rank_known is None:
                    return False
                axes = [a + rank_known if a < 0 else a for a in axes]
        begin, end = pads[:len(axes)], pads[len(axes):]
        return len(begin) == len(end) and all(b == 0 and e == 0 for a, b, e in zip(axes, begin, end, strict=True)
                                               if a in (0, 1))

    def readers(self, name: str) -> list[int]:
        return self.scope.consumers.get(name, [])

    def sole_reader(self, name: str, reader: int) -> str | None:
        """None if ``reader`` alone reads ``name`` (once, directly) and it is not a scope output; else why not."""
        readers = self.readers(name)
        if name in self.scope.outputs:
            return f"'{name}' is also an output of {self.scope.prefix or 'the graph'}"
        if readers != [reader]:
            others = sorted({self.scope.describe(i) for i in readers if i != reader})
            if not others:
                return f"'{name}' is read twice by {self.scope.describe(reader)}"
            return f"'{name}' is also read by {', '.join(others)}"
        return None

    def layer(self, index: int, code_if_not: str = "no_fusable_neighbour") -> Layer | None:
        """The Conv/ConvTranspose/Gemm/MatMul at ``index`` with its constants, or None after a note."""
        scope = self.scope
        node = scope.nodes[index]
        what = scope.describe(index)
        kind = {"Conv": LayerKind.CONV, "ConvTranspose": LayerKind.CONV_TRANSPOSE, "Gemm": LayerKind.GEMM,
                "MatMul": LayerKind.MATMUL}.get(node.op_type) if _is_default(node) else None
        if kind is None:
            self.note(code_if_not, f"{self.norm.label} meets {what}, not a conv or linear layer")
            return None
        try:
            if len(node.input) < 2 or not node.input[1]:
                raise ValueError(f"{what} has no weight input")
            weight = self.index.constant(scope, node.input[1])
            bias = None
            if len(node.input) > 2 and node.input[2]:
                bias = self.index.constant(scope, node.input[2])
            layer = Layer(scope, index, kind, weight, bias)
            if kind in (LayerKind.CONV, LayerKind.CONV_TRANSPOSE):
                group = attribute_value(node, "group", 1)
                assert isinstance(group, int)
                layer.group = group
            elif kind == LayerKind.GEMM:
                layer.trans_b = bool(attribute_value(node, "transB", 0))
                layer.alpha = float(attribute_value(node, "alpha", 1.0))  # type: ignore[arg-type]
                layer.beta = float(attribute_value(node, "beta", 1.0))  # type: ignore[arg-type]
        except NotConstant as exc:
            self.note("not_constant", f"{what}: {exc}")
            return None
        for ref, role in ((layer.weight, "weight"), (layer.bias, "bias")):
            if ref is not None and ref.dtype is None:
                self.note("unsupported_layer", f"{what}: its {role} '{ref.name}' has element type "
                          f"{TensorProto.DataType.Name(ref.tensor.data_type)}")
                return None
        dims = layer.weight.dims
        if kind in (LayerKind.CONV, LayerKind.CONV_TRANSPOSE):
            if len(dims) < 3 or layer.group < 1 or dims[0] % layer.group:
                raise ValueError(f"{what}: weight '{layer.weight.name}' of shape {list(dims)} does not fit "
                                 f"group={layer.group}")
            if layer.bias is not None and layer.bias.dims != (layer.out_channels,):
                raise ValueError(f"{what}: bias '{layer.bias.name}' has shape {list(layer.bias.dims)}, expected "
                                 f"[{layer.out_channels}]")
        elif len(dims) != 2:
            self.note("unsupported_layer", f"{what}: its weight '{layer.weight.name}' has shape {list(dims)}, not a "
                      "matrix")
            return None
        return layer

    def per_channel_bias(self, layer: Layer, ref: ConstRef) -> bool:
        """Whether a Gemm C / MatMul Add constant is one value per output column (scalar, (N,), (1, N))."""
        dims = ref.dims
        n = layer.out_channels
        if len(dims) <= 2 and all(d == 1 for d in dims[:-1]) and (not dims or dims[-1] in (1, n)):
            return True
        self.note("not_per_channel", f"{layer.scope.describe(layer.add if layer.add is not None else layer.node)}: "
                  f"its bias '{ref.name}' of shape {list(dims)} is not one value per output column")
        return False

    def check_channels(self, layer: Layer, channels: int, side: str) -> None:
        have = layer.out_channels if side == "out" else layer.in_channels
        if have != channels:
            raise ValueError(f"{self.scope.describe(self.norm.node)} has {channels} channels but "
                             f"{self.scope.describe(layer.node)} has {have} {side}put channels (weight "
                             f"'{layer.weight.name}' of shape {list(layer.weight.dims)}, group={layer.group})")

    def matmul_with_bias(self, layer: Layer, add: int | None) -> bool:
        """Attach the Add that adds a constant to a MatMul's output (the MatMul's bias), if there is one."""
        if add is None:
            return True
        node = self.scope.nodes[add]
        other = node.input[1] if node.input[0] == self.scope.nodes[layer.node].output[0] else node.input[0]
        try:
            ref = self.index.constant(self.scope, other)
        except NotConstant:
            return True  # an Add of a computed value is not part of the layer
        if ref.dtype is None or not self.per_channel_bias(layer, ref):
            return False
        layer.add, layer.bias = add, ref
        return True

    def rank(self, name: str) -> int | None:
        return self.index.rank(self.scope, name)

    def constant_or_none(self, name: str) -> ConstRef | None:
        try:
            return self.index.constant(self.scope, name)
        except NotConstant:
            return None

    # -- conv/linear -> norm --------------------------------------------------------------
    def upstream(self) -> None:
        scope, norm = self.scope, self.norm
        between: list[int] = []
        current = norm.node
        shared: str | None = None
        source = -1
        reshape: int | None = None   # a Flatten/Reshape on the way (LeViT's Linear -> flatten(0, 1) -> BatchNorm1d)
        while True:
            name = scope.nodes[current].input[0]
            why = self.sole_reader(name, current)
            if why is not None and shared is None:
                shared = why
            if name not in scope.producer:
                where = "an input or initializer" if scope.parent is None else "a value of an enclosing scope"
                self.note("no_fusable_neighbour", f"{norm.label} reads '{name}', {where}")
                return
            source, _ = scope.producer[name]
            if self.passes_through(source) and scope.nodes[source].input and scope.nodes[source].input[0]:
                if scope.nodes[source].op_type == "BatchNormalization":
                    between.append(source)
                current = source
                continue
            if reshape is None and scope.nodes[source].op_type in ("Flatten", "Reshape") \
                    and _is_default(scope.nodes[source]) and scope.nodes[source].input[0]:
                reshape = source
                current = source
                continue
            break
        node = scope.nodes[source]
        if reshape is not None and not (node.op_type in ("MatMul", "Gemm", "Add") and _is_default(node)):
            self.note("no_fusable_neighbour", f"{norm.label} reads {scope.describe(reshape)}, which reshapes the "
                      f"output of {scope.describe(source)}, not of a MatMul or Gemm")
            return
        if node.op_type == "Concat" and _is_default(node):
            self.into_concat(source, tuple(between), shared)
            return
        add = None
        layer: Layer | None = None
        if node.op_type == "Add" and _is_default(node):
            matmul = self.matmul_before_add(source)
            if matmul is None:
                layer = self.shifted_layer(source)
                if layer is None:
                    return
            else:
                add, source = source, matmul
        if layer is None:
            layer = self.layer(source)
            if layer is None:
                return
        if layer.kind == LayerKind.MATMUL and not self.matmul_with_bias(layer, add):
            return
        if shared is not None:
            self.note("output_used_elsewhere", f"{layer.label} -> {norm.label}: {shared}")
            return
        if reshape is not None:
            if layer.kind not in (LayerKind.MATMUL, LayerKind.GEMM):
                self.note("no_fusable_neighbour", f"{norm.label} reads {scope.describe(reshape)} of "
                          f"{layer.label}, not of a MatMul or Gemm")
                return
            if not self.keeps_columns(layer, reshape, f"{layer.label} -> {norm.label}"):
                return
        elif not self.layer_feeds_norm(layer, f"{layer.label} -> {norm.label}"):
            return
        self.check_channels(layer, norm.channels, "out")
        self.a.forward[self.key] = Forward(norm, ((layer, None),), tuple(between))

    def keeps_columns(self, layer: Layer, reshape: int, pair: str) -> bool:
        """Whether a Flatten/Reshape of a linear layer's output hands the norm (N, C) rows with the layer's columns
        as its channels: its output is proven 2-D with C columns, C the layer's columns and the last dim of its
        input. In row-major order element f is in column f mod C on both sides, whatever the leading dims
        were."""
        scope = self.scope
        node = scope.nodes[reshape]
        if layer.kind == LayerKind.GEMM and layer.bias is not None and not self.per_channel_bias(layer, layer.bias):
            return False
        shape = self.index.shape(scope, node.output[0])
        what = scope.describe(reshape)
        if shape is None or len(shape) != 2 or shape[1] is None:
            code = "rank_unknown" if shape is None or shape[1] is None else "no_fusable_neighbour"
            self.note(code, f"{pair}: the output of {what} is not proven (N, {layer.out_channels}) by shape "
                      f"inference (it is {list(shape) if shape is not None else 'unknown'})")
            return False
        if shape[1] != layer.out_channels:
            self.note("no_fusable_neighbour", f"{pair}: {what} makes {shape[1]} columns of the layer's "
                      f"{layer.out_channels}: the norm's channels are not the layer's columns")
            return False
        return True

    def shifted_layer(self, add: int) -> Layer | None:
        """conv/Gemm -> Add(constant) -> norm, as PaddlePaddle exports write a conv's bias: the layer with the Add's
        constant as its ``shift`` (folded into its bias, the Add removed), or None after a note. The Add must be the
        layer's sole reader and its constant must vary along the channel axis only."""
        scope, norm = self.scope, self.norm
        node = scope.nodes[add]
        what = scope.describe(add)
        found = None
        if len(node.input) == 2 and node.input[0] != node.input[1]:
            for k, name in enumerate(node.input):
                source = scope.producer.get(name, (None, 0))[0]
                if source is not None and _is_default(scope.nodes[source]) \
                        and scope.nodes[source].op_type in ("Conv", "ConvTranspose", "Gemm"):
                    found = source, name, node.input[1 - k]
                    break
        if found is None:
            self.note("no_fusable_neighbour", f"{norm.label} reads {what}, which adds nothing to the output of a "
                      "conv or linear layer")
            return None
        source, name, other = found
        try:
            constant = self.index.constant(scope, other)
        except NotConstant as exc:
            code = "not_constant" if self.is_initializer(other) else "no_fusable_neighbour"
            self.note(code, f"{norm.label} reads {what}, which adds a value that is not a constant to the output of "
                      f"{scope.describe(source)}: {exc}")
            return None
        why = self.sole_reader(name, add)
        if why is not None:
            self.note("output_used_elsewhere", f"{scope.describe(source)} -> {what} -> {norm.label}: {why}")
            return None
        layer = self.layer(source)
        if layer is None:
            return None
        rank = len(layer.weight.dims) if layer.kind != LayerKind.GEMM else 2
        if not self.per_channel_shift(constant, rank, layer.out_channels, what):
            return None
        layer.add, layer.shift = add, constant
        return layer

    def is_initializer(self, name: str) -> bool:
        s: Scope | None = self.scope
        while s is not None:
            if name in s.initializers:
                return True
            s = s.parent
        return False

    def per_channel_shift(self, ref: ConstRef, rank: int, channels: int, what: str) -> bool:
        """Whether an Add of ``ref`` to a rank-``rank`` value with ``channels`` channels on axis 1 adds one value per
        channel and keeps the value's shape: numpy broadcasting aligns ``ref``'s dims with the value's last axes, so
        every dim must be 1 except the one aligned with axis 1 ([C, 1, 1] or [1, C, 1, 1] for NCHW, [C] only for
        (N, C) data; a scalar anywhere)."""
        dims = ref.dims
        if ref.dtype is None:
            self.note("unsupported_layer", f"{what}: its constant '{ref.name}' has element type "
                      f"{TensorProto.DataType.Name(ref.tensor.data_type)}")
            return False
        if len(dims) <= rank and all(d == 1 or (rank - len(dims) + j == 1 and d == channels)
                                     for j, d in enumerate(dims)):
            return True
        self.note("not_per_channel", f"{what}: its constant '{ref.name}' of shape {list(dims)} does not add one "
                  f"value per channel to a rank-{rank} value with {channels} channels on axis 1 (broadcasting "
                  "aligns it with the last axes)")
        return False

    def matmul_before_add(self, add: int) -> int | None:
        """The MatMul whose output an Add reads (and nothing else reads), if the Add's other input is not it."""
        scope = self.scope
        node = scope.nodes[add]
        if len(node.input) != 2:
            return None
        for k, name in enumerate(node.input):
            if name in scope.producer:
                source, _ = scope.producer[name]
                src = scope.nodes[source]
                if src.op_type == "MatMul" and _is_default(src) and node.input[1 - k] != name:
                    if self.sole_reader(name, add) is None:
                        return source
        return None

    def layer_feeds_norm(self, layer: Layer, pair: str) -> bool:
        """Checks of a layer -> norm pair beyond the dataflow: the channel axis, the layer's parameters."""
        scope, node = self.scope, self.scope.nodes[layer.node]
        if layer.kind == LayerKind.GEMM:
            if layer.bias is not None and not self.per_channel_bias(layer, layer.bias):
                return False
            return True  # a Gemm's output is (M, N): the norm's channel axis 1 is the Gemm's columns
        if layer.kind == LayerKind.MATMUL:
            rank = self.rank(node.input[0])
            if rank is None:
                self.note("rank_unknown", f"{pair}: the MatMul input '{node.input[0]}' is not proven 2-D by shape "
                          "inference (the norm's channels are the MatMul's columns only on (N, C) data)")
                return False
            if rank != 2:
                self.note("no_fusable_neighbour", f"{pair}: the MatMul input '{node.input[0]}' has rank {rank}; the "
                          "norm normalises axis 1, not the MatMul's columns")
                return False
            return True
        if self.norm.needs_2d:
            self.note("not_per_channel", f"{pair}: {self.norm.label} has spatial=0 (per-activation statistics) "
                      f"on the output of a {scope.nodes[layer.node].op_type}")
            return False
        return True

    def into_concat(self, concat: int, between: tuple[int, ...], shared: str | None) -> None:
        """conv_1, ..., conv_k -> Concat -> norm: along the channel axis each conv takes its channel slice of the
        norm; along any other axis every conv produces all channels and takes the whole norm."""
        scope, norm = self.scope, self.norm
        node = scope.nodes[concat]
        what = scope.describe(concat)
        if shared is not None:
            self.note("output_used_elsewhere", f"{what} -> {norm.label}: {shared}")
            return
        try:
            axis = attribute_value(node, "axis")
        except NotConstant as exc:
            self.note("not_constant", f"{what}: {exc}")
            return
        assert isinstance(axis, int)
        if axis < 0:
            rank = self.index.rank(scope, node.output[0])
            if rank is None:
                self.note("rank_unknown", f"{what} concatenates along axis {axis} of an output of unknown rank")
                return
            axis += rank
        if len(set(node.input)) != len(node.input):
            self.note("no_fusable_neighbour", f"{norm.label} reads {what}, which concatenates one value twice")
            return
        parts: list[tuple[Layer, tuple[int, int] | None]] = []
        start = 0
        for position, name in enumerate(node.input):
            source = scope.producer.get(name, (None, 0))[0]
            shifted = source is not None and scope.nodes[source].op_type == "Add" and _is_default(scope.nodes[source])
            if source is None or not (shifted or scope.nodes[source].op_type in ("Conv", "ConvTranspose")):
                origin = "an input" if source is None else scope.describe(source)
                self.note("no_fusable_neighbour", f"{norm.label} reads {what}, whose input {position} '{name}' comes "
                          f"from {origin}, not a conv")
                return
            why = self.sole_reader(name, concat)
            if why is not None:
                self.note("output_used_elsewhere", f"{scope.describe(source)} -> {what} -> {norm.label}: {why}")
                return
            # a conv, or a conv -> Add(per-channel constant): its bias as its own node
            layer = self.shifted_layer(source) if shifted else self.layer(source)
            if layer is not None and layer.kind not in (LayerKind.CONV, LayerKind.CONV_TRANSPOSE):
                self.note("no_fusable_neighbour", f"{norm.label} reads {what}, whose input {position} '{name}' comes "
                          f"from {layer.label}, not a conv")
                return
            if layer is None or not self.layer_feeds_norm(layer, f"{layer.label} -> {norm.label}"):
                return
            if axis == 1:
                width = layer.out_channels
                parts.append((layer, (start, start + width)))
                start += width
            else:
                self.check_channels(layer, norm.channels, "out")
                parts.append((layer, None))
        if axis == 1 and start != norm.channels:
            raise ValueError(f"{scope.describe(norm.node)} has {norm.channels} channels but the convs that {what} "
                             f"joins have {start}")
        self.a.forward[self.key] = Forward(norm, tuple(parts), between)

    # -- norm -> conv/linear --------------------------------------------------------------
    def downstream(self) -> None:
        scope, norm = self.scope, self.norm
        between: list[int] = []
        current = norm.node
        shared: str | None = None
        shifts: list[tuple[int, ConstRef]] = []   # Adds of constants on the way (one per norm at most)
        own: Shift | None = None                  # the one right after this norm
        added = False                             # an Add met since the last norm
        while True:
            name = scope.nodes[current].output[0]
            readers = self.readers(name)
            if not readers:
                if name in scope.outputs:
                    self.note("no_fusable_neighbour", f"the output '{name}' after {norm.label} is an output of "
                              f"{scope.prefix or 'the graph'}")
                return
            user = readers[0]
            why = self.sole_reader(name, user)
            if why is not None and shared is None:
                shared = why
            node = scope.nodes[user]
            if name not in node.input:
                self.note("no_fusable_neighbour", f"{norm.label}'s output is read inside a subgraph of "
                          f"{scope.describe(user)}")
                return
            if list(node.input).index(name) == 0 and self.passes_through(user) and node.output and node.output[0]:
                if node.op_type == "BatchNormalization":
                    between.append(user)
                    added = False
                current = user
                continue
            if not added and node.op_type == "Add" and _is_default(node) and len(node.input) == 2 \
                    and list(node.input).count(name) == 1 and node.output and node.output[0]:
                constant = self.constant_or_none(node.input[1 - list(node.input).index(name)])
                if constant is not None:
                    shifts.append((user, constant))
                    if not between:
                        own = Shift(user, constant)
                    added = True
                    current = user
                    continue
            break
        if node.op_type == "Pad" and _is_default(node):
            self.note("zero_padding", f"{norm.label} feeds {scope.describe(user)}, which pads with a constant (or "
                      "along the channel axis): not exact at the borders")
            return
        if node.op_type == "ConvTranspose" and _is_default(node):
            self.note("transposed_after_bn", f"{norm.label} feeds the transposed conv {scope.describe(user)}: the "
                      "shift is not a per-channel constant")
            return
        layer = self.layer(user)
        if layer is None:
            return
        if list(node.input).count(name) != 1 or node.input[0] != name:
            self.note("no_fusable_neighbour", f"{norm.label}'s output is not only the data input of {layer.label}")
            return
        add = None
        if layer.kind == LayerKind.MATMUL:
            out = node.output[0]
            readers = self.readers(out)
            if len(readers) == 1 and out not in scope.outputs and scope.nodes[readers[0]].op_type == "Add" \
                    and _is_default(scope.nodes[readers[0]]) and list(scope.nodes[readers[0]].input).count(out) == 1:
                add = readers[0]
            if not self.matmul_with_bias(layer, add):
                return
        if shared is not None:
            self.note("output_used_elsewhere", f"{norm.label} -> {layer.label}: {shared}")
            return
        pair = f"{norm.label} -> {layer.label}"
        if layer.kind == LayerKind.CONV:
            exact, how = _conv_pads_nothing(node, layer.weight.dims)
            if not exact:
                self.note("zero_padding", f"{pair}: the conv zero-pads ({how}), not exact at the borders")
                return
            if norm.needs_2d:
                self.note("not_per_channel", f"{pair}: {norm.label} has spatial=0 (per-activation statistics)")
                return
        elif layer.kind == LayerKind.GEMM:
            if attribute_value(node, "transA", 0):
                self.note("unsupported_layer", f"{pair}: the Gemm has transA=1 and contracts over the norm's batch "
                          "axis")
                return
            if layer.bias is not None and not self.per_channel_bias(layer, layer.bias):
                return
        else:
            rank = self.rank(node.input[0])
            if rank != 2:
                code = "rank_unknown" if rank is None else "no_fusable_neighbour"
                self.note(code, f"{pair}: the norm's input is not proven 2-D (rank {rank})")
                return
        if shifts:
            rank = 2 if layer.kind in (LayerKind.GEMM, LayerKind.MATMUL) else len(layer.weight.dims)
            for add, constant in shifts:
                if not self.per_channel_shift(constant, rank, norm.channels, scope.describe(add)):
                    return
        self.check_channels(layer, norm.channels, "in")
        self.a.backward[self.key] = Backward(norm, layer, tuple(between))
        if own is not None:
            self.a.shifts[self.key] = own

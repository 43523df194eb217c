"""Running graphs: the feeds (seeded random inputs of the declared shapes), onnxruntime with every graph optimization
off, the float64 reference through onnx's ReferenceEvaluator with the replacement kernels, and copies of a graph
whose float constants are rounded once more (the error baseline).
"""


from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from refimpl.tolerance import perturb_once

from ..graph import FLOAT_TYPES, skeleton
from .kernels import REFERENCE_KERNELS
from .retype import _rounded, load_model, retyped_copy

_PROTO_LIMIT = 1_800_000_000  # serialized protobufs are capped at 2 GiB; larger models go through a file


def _with_outputs(model: onnx.ModelProto, names: Sequence[str],
                  types: Mapping[str, onnx.ValueInfoProto] | None = None) -> onnx.ModelProto:
    """``model`` with ``names`` (values of its main graph, with known types) added to the graph outputs."""
    present = {o.name for o in model.graph.output}
    extra = [n for n in names if n not in present]
    if not extra:
        return model
    typed = _value_types(model) if types is None else types
    missing = [n for n in extra if n not in typed]
    if missing:
        raise ValueError(f"no type known for the value(s) {missing[:5]}: cannot fetch them from onnxruntime")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for name in extra:
        copy.graph.output.append(typed[name])
    return copy


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every main-graph value with a known tensor element type, from the graph and onnx shape inference.

    Shape inference runs on the model's skeleton (large initializers as typed inputs), so its cost
    does not grow with the weights.
    """
    skeleton_model = skeleton(model, {t.name: t for t in model.graph.initializer})
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton_model)
    except Exception:  # a graph the inferencer rejects: use the types it states itself
        inferred = skeleton_model
    found: dict[str, onnx.ValueInfoProto] = {}
    for value in (*inferred.graph.value_info, *model.graph.value_info, *model.graph.output):
        if value.type.WhichOneof("value") == "tensor_type" and value.type.tensor_type.elem_type:
            found[value.name] = value
    return found


def _weight_bytes(model: onnx.ModelProto) -> int:
    """The main graph's initializer bytes, from their dims (no serialization)."""
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
            total += math.prod(tensor.dims) * itemsize
    return total


def onnxruntime_session(model: onnx.ModelProto, threads: int = 0, *, quiet: bool = False) -> Any:
    """An onnxruntime CPU session for ``model`` with every graph optimization disabled (large models via a file);
    ``quiet``: not even errors are logged (runs that are allowed to fail)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4 if quiet else 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if _weight_bytes(model) < _PROTO_LIMIT // 2 or model.ByteSize() < _PROTO_LIMIT:
        return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=providers)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
        return onnxruntime.InferenceSession(str(path), options, providers=providers)


def run_onnxruntime(model: onnx.ModelProto | str | os.PathLike, feeds: Mapping[str, np.ndarray],
                    output_names: Sequence[str] | None = None, *, threads: int = 0) -> list[np.ndarray]:
    """Run ``model`` with onnxruntime on the CPU, every graph optimization disabled.

    ``output_names`` may name intermediate values of the main graph (their types must be known to
    the graph or to shape inference); default: the graph outputs. ``threads`` = 0 lets onnxruntime
    choose. onnxruntime's own exceptions propagate.
    """
    model = load_model(model)
    names = list(output_names) if output_names is not None else [o.name for o in model.graph.output]
    session = onnxruntime_session(_with_outputs(model, names), threads)
    needed = {i.name for i in session.get_inputs()}
    return list(session.run(names, {k: v for k, v in feeds.items() if k in needed}))


def reference_outputs(model: onnx.ModelProto | str | os.PathLike, feeds: Mapping[str, np.ndarray],
                      output_names: Sequence[str] | None = None) -> list[np.ndarray]:
    """The float64 reference run of ``model``: its float64 copy (:func:`retyped_copy`) in the reference evaluator.

    Float feeds are converted to float64 (others are passed as given). ``output_names`` may name
    any value of the main graph; default: the graph outputs. Returns float64 arrays for float values.
    """
    model = load_model(model)
    names = list(output_names) if output_names is not None else [o.name for o in model.graph.output]
    if model.functions:
        # The evaluator runs model-local functions without the replacement kernels: inline them first.
        model = onnx.inliner.inline_local_functions(model)
    evaluator = ReferenceEvaluator(retyped_copy(model), new_ops=list(REFERENCE_KERNELS))
    inputs = {k: (np.asarray(v, dtype=np.float64) if _is_float_array(v) else np.asarray(v)) for k, v in feeds.items()}
    return [np.asarray(r) for r in evaluator.run(names, inputs)]


def _is_float_array(value: Any) -> bool:
    dtype = np.asarray(value).dtype
    return dtype.kind == "f" or dtype.name == "bfloat16"


#: Float inputs that set a shape, not a value (Resize/Upsample scales and roi, Range's bounds): never perturbed.
_SHAPE_INPUTS: dict[str, tuple[int, ...]] = {"Resize": (1, 2), "Upsample": (1,), "Range": (0, 1, 2)}


def _names_read_inside(node: onnx.NodeProto) -> set[str]:
    """Every name the subgraphs of ``node`` read, at any depth (outer-scope values among them)."""
    names: set[str] = set()
    for attribute in node.attribute:
        for graph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs):
            for inner in graph.node:
                names.update(inner.input)
                names |= _names_read_inside(inner)
            names.update(o.name for o in graph.output)
    return names


def _parameter_values(model: onnx.ModelProto, outputs: Sequence[str] | None = None) -> set[str]:
    """Main-graph values that carry numbers into a floating-point graph output (or into ``outputs``), found
    backwards from those.

    A value is one when a node that produces such a value reads it as floating-point data: not what is only
    cast to an integer (pad amounts an exporter computes in float, as timm's Conv2dSame does), read as a shape
    (Resize's scales) or used by an integer or boolean result. Their constants are the network's parameters;
    the others decide shapes and indices, which one more rounding would change (a pad or an output size off
    by one), not perturb.
    """
    graph = model.graph
    types = {name: info.type.tensor_type.elem_type for name, info in _value_types(model).items()}
    types.update((i.name, i.type.tensor_type.elem_type) for i in graph.input if i.type.HasField("tensor_type"))
    types.update((t.name, t.data_type) for t in graph.initializer)
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    types[node.output[0]] = attribute.t.data_type

    def is_float(name: str) -> bool:
        return types.get(name, TensorProto.UNDEFINED) in FLOAT_TYPES or name not in types  # unknown: assume so

    targets = [o.name for o in graph.output] if outputs is None else list(outputs)
    relevant = {name for name in targets if is_float(name)}
    for node in reversed(graph.node):
        if not any(o in relevant for o in node.output if o):
            continue
        shape_slots = _SHAPE_INPUTS.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ()
        relevant.update(name for slot, name in enumerate(node.input)
                        if name and slot not in shape_slots and is_float(name))
        relevant |= _names_read_inside(node)
    return relevant


def rounded_copy(model: onnx.ModelProto, seed: int = 0, outputs: Sequence[str] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` whose floating-point parameters are each rounded once more.

    Every element of every float initializer and ``Constant`` tensor (subgraphs included) that carries
    numbers into a float output (:func:`_parameter_values`; not a constant that only decides a shape, a pad
    or an index) is multiplied by ``1 + delta``, ``delta`` uniform in ``[-u, u]`` for its own dtype, and
    stored back in that dtype (:func:`refimpl.tolerance.perturb_once`): the perturbation a folded graph's
    parameters carry by being rounded once. Its outputs are the ``perturbed`` baseline of
    :func:`refimpl.compare_models`. ``outputs``: the values whose parameters these are (default: the graph
    outputs; a copy that also fetches intermediate values names the original outputs here, so that a float
    value of a shape computation fetched for comparison does not make its constants parameters).
    """
    rng = np.random.default_rng(seed)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    parameters = _parameter_values(copy, outputs)

    def perturb(tensor: TensorProto) -> None:
        if tensor.data_type not in FLOAT_TYPES:
            return
        values = numpy_helper.to_array(tensor)
        if values.size == 0:
            return
        rounded = _rounded(perturb_once(values.astype(np.float64), values.dtype.name, rng), values.dtype)
        tensor.CopyFrom(numpy_helper.from_array(rounded, tensor.name))

    def walk(graph: onnx.GraphProto, main: bool) -> None:
        for tensor in graph.initializer:
            if not main or tensor.name in parameters:
                perturb(tensor)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR and node.op_type == "Constant":
                    if not main or node.output[0] in parameters:
                        perturb(attribute.t)
                elif attribute.type == onnx.AttributeProto.GRAPH:
                    walk(attribute.g, False)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    for graph_ in attribute.graphs:
                        walk(graph_, False)

    walk(copy.graph, True)
    return copy

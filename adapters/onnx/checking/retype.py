"""Float64 copies of a graph for the reference run: every floating-point tensor type, initializer, Constant, Cast
target and value_info of the graph, its subgraphs and functions retyped to float64 (or to float16 for the dtype
sweeps).
"""


from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, helper, numpy_helper

from refimpl.rounding import round_once

from ..graph import FLOAT_TYPES

#: Integer attributes of ai.onnx ops that name an element type (Cast's ``to``; ``dtype`` of EyeLike,
#: RandomNormal and friends; ``output_dtype`` of DequantizeLinear): a float type there becomes the target.
_DTYPE_ATTRIBUTES = frozenset({"to", "dtype", "output_dtype"})


def load_model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """``model`` itself if it is a ModelProto, else the model at that path (external data loaded)."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        return onnx.load(os.fspath(model))
    raise TypeError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")


def _retype_value_type(type_proto: onnx.TypeProto, target: int) -> None:
    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type" or kind == "sparse_tensor_type":
        tensor = getattr(type_proto, kind)
        if tensor.elem_type in FLOAT_TYPES:
            tensor.elem_type = target
    elif kind == "sequence_type":
        _retype_value_type(type_proto.sequence_type.elem_type, target)
    elif kind == "optional_type":
        _retype_value_type(type_proto.optional_type.elem_type, target)
    elif kind == "map_type":
        _retype_value_type(type_proto.map_type.value_type, target)


def _rounded(values: np.ndarray, dtype: Any) -> np.ndarray:
    """``values`` rounded once to the numpy ``dtype`` of an ONNX float type (bfloat16 as ml_dtypes' type)."""
    dtype = np.dtype(dtype)
    rounded = round_once(values, dtype.name)
    return rounded.view(dtype) if dtype.name == "bfloat16" else rounded


def _retype_tensor(tensor: TensorProto, target: int, base_dir: str) -> None:
    if tensor.data_type not in FLOAT_TYPES or tensor.data_type == target:
        return
    values = numpy_helper.to_array(tensor, base_dir).astype(np.float64)
    retyped = numpy_helper.from_array(_rounded(values, helper.tensor_dtype_to_np_dtype(target)), tensor.name)
    retyped.doc_string = tensor.doc_string
    tensor.CopyFrom(retyped)


def _retype_node(node: onnx.NodeProto, target: int, base_dir: str) -> None:
    replaced: list[onnx.AttributeProto] = []
    for attribute in node.attribute:
        kind = attribute.type
        if kind == onnx.AttributeProto.TENSOR:
            _retype_tensor(attribute.t, target, base_dir)
        elif kind == onnx.AttributeProto.TENSORS:
            for tensor in attribute.tensors:
                _retype_tensor(tensor, target, base_dir)
        elif kind == onnx.AttributeProto.SPARSE_TENSOR:
            _retype_tensor(attribute.sparse_tensor.values, target, base_dir)
        elif kind == onnx.AttributeProto.GRAPH:
            _retype_graph(attribute.g, target, base_dir)
        elif kind == onnx.AttributeProto.GRAPHS:
            for graph in attribute.graphs:
                _retype_graph(graph, target, base_dir)
        elif (kind == onnx.AttributeProto.INT and node.domain in ("", "ai.onnx")
              and attribute.name in _DTYPE_ATTRIBUTES and attribute.i in FLOAT_TYPES):
            attribute.i = target
        elif (node.op_type == "Constant" and node.domain in ("", "ai.onnx")
              and attribute.name in ("value_float", "value_floats") and not attribute.ref_attr_name):
            # A float attribute makes a float32 Constant; a tensor attribute of the target type replaces it.
            values = np.array(attribute.f if attribute.name == "value_float" else list(attribute.floats))
            tensor = numpy_helper.from_array(_rounded(values, helper.tensor_dtype_to_np_dtype(target)))
            replaced.append(helper.make_attribute("value", tensor))
            continue
        replaced.append(attribute)
    if len(replaced) != len(node.attribute) or any(a is not b for a, b in zip(replaced, node.attribute, strict=True)):
        copies = [onnx.AttributeProto.FromString(a.SerializeToString()) for a in replaced]
        del node.attribute[:]
        node.attribute.extend(copies)


def _retype_graph(graph: onnx.GraphProto, target: int, base_dir: str) -> None:
    for tensor in graph.initializer:
        _retype_tensor(tensor, target, base_dir)
    for sparse in graph.sparse_initializer:
        _retype_tensor(sparse.values, target, base_dir)
    for value in (*graph.input, *graph.output, *graph.value_info):
        _retype_value_type(value.type, target)
    for node in graph.node:
        _retype_node(node, target, base_dir)


def retyped_copy(model: onnx.ModelProto, target: int = TensorProto.DOUBLE, *, base_dir: str = "") -> onnx.ModelProto:
    """A copy of ``model`` in which every floating-point tensor type is ``target`` (a TensorProto type).

    Converted: initializers (dense and sparse), tensor attributes (``Constant``, ``ConstantOfShape``'s
    ``value``, ...), ``Constant``'s ``value_float(s)``, the element type of every graph input, output
    and value_info, the ``to`` / ``dtype`` / ``output_dtype`` attributes of ai.onnx nodes when they
    name a float type, recursively in subgraphs (If/Loop/Scan bodies) and model-local functions.
    Values are converted through float64 and rounded once (:func:`refimpl.rounding.round_once`).

    The copy computes the original graph's arithmetic in another precision. Inputs that the ONNX
    specification requires to be float32 whatever the data type (Resize's ``scales``) change too:
    the reference evaluator does not mind, onnxruntime would refuse such a graph.
    """
    if target not in FLOAT_TYPES:
        raise ValueError(f"target must be a floating-point TensorProto type, got {target!r}")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _retype_graph(copy.graph, target, base_dir)
    for function in copy.functions:
        for node in function.node:
            _retype_node(node, target, base_dir)
        for value in function.value_info:
            _retype_value_type(value.type, target)
    return copy

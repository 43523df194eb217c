"""Verify a folded ONNX graph against the float64 reference run of the original graph.

Three engines, three roles:

- The **float64 reference** of the original graph (:func:`reference_outputs`): a copy in which every
  floating-point tensor type -- initializers, ``Constant`` values, graph inputs, outputs and
  value_info, the ``to``/``dtype`` attributes of ``Cast`` and friends, subgraphs and model-local
  functions included -- is float64 (:func:`retyped_copy`), run by ``onnx.reference.ReferenceEvaluator``.
  onnxruntime cannot be the reference: it has no float64 ``Conv`` or ``ConvTranspose`` on the CPU.
  Two faults of the evaluator in onnx 1.23 are worked around by replacing its kernels with
  :mod:`refimpl.ops`: ``BatchNormalization`` of opsets 7 to 13 normalises with the batch statistics
  in inference (onnx/onnx#8442; the evaluator's opset-7/8 kernel reads an ``is_test`` attribute that
  those opsets no longer have, the opset-9 kernel treats the always-present ``momentum`` default as
  "training"), and ``ConvTranspose`` with ``group > 1`` raises (onnx/onnx#8446). The replacements
  follow the ONNX operator specification for every opset, including ``spatial=0``, asymmetric
  ``pads``, ``output_shape``, ``auto_pad`` and training mode. A third fault, ``MaxPool`` with ``ceil_mode=1``
  and unit strides sizing its output as if windows could start in the end padding, is routed to the
  evaluator's general pooling kernel, and ``Upsample`` (opsets 7-9), which it runs only as nearest with
  integer scales, is run as the asymmetric Resize it is. The evaluator runs model-local
  functions without replacement kernels, so functions are inlined first.
- The **models in their own dtype** (:func:`run_onnxruntime`): onnxruntime on the CPU with every
  graph optimization disabled, so that onnxruntime's own Conv+BatchNormalization fusion cannot hide
  a missing or wrong fold.
- The **judgement** (:func:`verify`): the project's error model for whole networks,
  :func:`refimpl.compare_models`, exactly as ``adapters.torch.verify`` applies it -- the folded
  graph's relative RMS error against the reference must stay within :data:`refimpl.MODEL_RATIO`
  times the larger of the original graph's own error and that of copies of the original whose
  floating-point initializers are each rounded once more (:func:`rounded_copy`).

Besides the graph outputs, every intermediate value the two graphs share by name is compared the
same way (in the original's node order) unless folding legitimately changes it: constants and what
is computed from constants alone (a fold rewrites a Constant node's value in place), the outputs of
Conv, ConvTranspose, Gemm, MatMul and BatchNormalization nodes, and what merely moves, copies,
averages, concatenates or offsets such a value by constants (a folder may fold through a Pad or a
Reshape, whose output then legitimately differs). The first value that breaks the error model is
named, with the nodes that could have caused it.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops import op_resize as _resize_ops
from onnx.reference.ops.op_max_pool import MaxPool as _EvaluatorMaxPool

import refimpl
from refimpl import compare_models
from refimpl.rounding import round_once
from refimpl.tolerance import perturb_once

from ..verdict import LayerDivergence, ModelRunError, OutputCheck, Verdict
from .graph import FLOAT_TYPES, skeleton

__all__ = ["verify", "reference_outputs", "run_onnxruntime", "retyped_copy", "rounded_copy", "make_feeds",
           "load_model", "graph_feeds", "onnxruntime_session", "Verdict", "OutputCheck", "LayerDivergence",
           "ModelRunError"]

logger = logging.getLogger(__name__)

#: Integer attributes of ai.onnx ops that name an element type (Cast's ``to``; ``dtype`` of EyeLike,
#: RandomNormal and friends; ``output_dtype`` of DequantizeLinear): a float type there becomes the target.
_DTYPE_ATTRIBUTES = frozenset({"to", "dtype", "output_dtype"})

#: Ops whose outputs a fold changes (the folded layers themselves and the norms folded away).
_CHANGED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization"})
#: Ops that hand on a changed value moved, copied, averaged or offset by constants -- what a folder may fold a
#: BatchNormalization through (BN -> Pad(reflect) -> Conv, Conv -> Reshape -> BN, ...): their output changes too.
_PASSING_OPS = frozenset({"Identity", "Dropout", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose",
                          "Split", "Slice", "Gather", "Pad", "Expand", "Tile", "Resize", "Upsample", "DepthToSpace",
                          "SpaceToDepth", "AveragePool", "GlobalAveragePool", "ReduceMean", "Cast", "Add", "Sub",
                          "Mul", "Div"})

_PROTO_LIMIT = 1_800_000_000  # serialized protobufs are capped at 2 GiB; larger models go through a file


# --------------------------------------------------------------------------------------------------
# Loading and retyping


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


# --------------------------------------------------------------------------------------------------
# Kernels replacing the reference evaluator's faulty ones


def _attributes(op: OpRun, given: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes the node sets, those referring to a function's attribute resolved (``given``: the
    evaluator's keyword arguments, whose defaults come from the newest schema only and are not used)."""
    found = {}
    for attribute in op.onnx_node.attribute:
        if not attribute.ref_attr_name:
            found[attribute.name] = helper.get_attribute_value(attribute)
        elif given.get(attribute.name) is not None:
            found[attribute.name] = given[attribute.name]
    return found


class BatchNormalization(OpRun):
    """``BatchNormalization`` of every opset (7 onwards), backed by :func:`refimpl.batch_norm`.

    Inference mode normalises with the running statistics. Training mode -- ``training_mode=1``
    (opset 14+), more than one output (opsets 7-13, whose schema says the number of outputs selects
    the mode), ``is_test=0`` (opset 6) -- normalises with the batch statistics (population variance)
    and returns the updated running statistics, as the specification describes.
    """

    op_domain = ""

    def _run(self, x, scale, bias, mean, var, **given):
        attributes = _attributes(self, given)
        epsilon = float(attributes.get("epsilon", 1e-5))
        momentum = float(attributes.get("momentum", 0.9))
        version = int(self.run_params.get("opsets", {}).get("", 15))
        outputs = list(self.onnx_node.output)
        if version >= 14:
            training = bool(attributes.get("training_mode", 0))
        elif version >= 7:
            training = sum(1 for name in outputs if name) > 1
        else:
            training = not attributes.get("is_test", 0)
        x = np.asarray(x)
        params = [np.asarray(p, dtype=np.float64) for p in (scale, bias, mean, var)]
        channels = x.shape[1]
        per_activation = any(p.size != channels for p in params) or attributes.get("spatial", 1) == 0
        if per_activation:
            # spatial=0 (opsets 7-8): one statistic per activation, shaped like x without its batch axis.
            flat_x = x.reshape(x.shape[0], -1)
            params = [np.broadcast_to(p.reshape(p.shape + (1,) * (x.ndim - 1 - p.ndim)), x.shape[1:]).reshape(-1)
                      for p in params]
        else:
            flat_x = x
        scale_v, bias_v, mean_v, var_v = params
        if training:
            axes = tuple(i for i in range(flat_x.ndim) if i != 1)
            batch_mean = flat_x.astype(np.float64).mean(axis=axes)
            batch_var = flat_x.astype(np.float64).var(axis=axes)
            y = refimpl.batch_norm(flat_x, batch_mean, batch_var, scale_v, bias_v, eps=epsilon)
        else:
            y = refimpl.batch_norm(flat_x, mean_v, var_v, scale_v, bias_v, eps=epsilon)
        y = y.reshape(x.shape).astype(x.dtype, copy=False)
        if not training:
            return (y,)
        running_mean = mean_v * momentum + batch_mean * (1 - momentum)
        running_var = var_v * momentum + batch_var * (1 - momentum)
        extra = [running_mean, running_var, batch_mean, batch_var]
        if per_activation:
            extra = [e.reshape(np.shape(mean)) if e.size == np.size(mean) else e for e in extra]
        results = [y, *(e.astype(x.dtype) for e in extra)]
        return tuple(results[:len(outputs)])


def _conv_transpose_pads(attributes: Mapping[str, Any], spatial: Sequence[int], kernel: Sequence[int],
                         strides: Sequence[int], dilations: Sequence[int], output_padding: Sequence[int]
                         ) -> tuple[list[int], list[int]]:
    """ONNX ConvTranspose's (begin, end) pads per spatial dim, from pads, output_shape or auto_pad."""
    dims = len(spatial)
    full = [s * (n - 1) + op + (k - 1) * d + 1
            for n, s, d, k, op in zip(spatial, strides, dilations, kernel, output_padding, strict=True)]
    auto_pad = attributes.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    output_shape = attributes.get("output_shape")
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if output_shape is None:
            output_shape = [n * s for n, s in zip(spatial, strides, strict=True)]
        output_shape = list(output_shape)[-dims:]
        total = [f - o for f, o in zip(full, output_shape, strict=True)]
        if auto_pad == "SAME_UPPER":
            return [t // 2 for t in total], [t - t // 2 for t in total]
        return [t - t // 2 for t in total], [t // 2 for t in total]
    if auto_pad == "VALID":
        return [0] * dims, [0] * dims
    pads = list(attributes.get("pads", [0] * (2 * dims)))
    return pads[:dims], pads[dims:]


class ConvTranspose(OpRun):
    """``ConvTranspose`` of every opset, any group, backed by :func:`refimpl.conv_transpose`.

    ONNX pads may differ at the two ends of a dim, and ``output_shape``/``auto_pad`` derive them
    from the requested size: the full scatter is computed with :func:`refimpl.conv_transpose`
    (no padding), then cropped by the begin/end pads, ``output_padding`` adding zeros at the end.
    """

    op_domain = ""

    def _run(self, x, w, b=None, **given):
        attributes = _attributes(self, given)
        x = np.asarray(x)
        w = np.asarray(w)
        dims = w.ndim - 2
        spatial = x.shape[2:]
        kernel = w.shape[2:]
        group = int(attributes.get("group", 1))
        strides = list(attributes.get("strides", [1] * dims))
        dilations = list(attributes.get("dilations", [1] * dims))
        output_padding = list(attributes.get("output_padding", [0] * dims))
        begin, end = _conv_transpose_pads(attributes, spatial, kernel, strides, dilations, output_padding)
        scatter = refimpl.conv_transpose(x, w, None, stride=strides, groups=group, dilation=dilations)
        full = [size + op for size, op in zip(scatter.shape[2:], output_padding, strict=True)]
        out_shape = [f - pb - pe for f, pb, pe in zip(full, begin, end, strict=True)]
        if min(out_shape) < 1:
            raise ValueError(f"ConvTranspose {self.onnx_node.name!r}: empty output {out_shape} (x {x.shape}, "
                             f"w {w.shape}, pads {begin + end})")
        y = np.zeros(scatter.shape[:2] + tuple(out_shape))
        # Output index j is index j + begin of the (output-padded) scatter; negative pads add zeros.
        source, target = [], []
        for size, length, pb in zip(scatter.shape[2:], out_shape, begin, strict=True):
            lo, hi = max(pb, 0), min(size, pb + length)
            source.append(slice(lo, max(hi, lo)))
            target.append(slice(lo - pb, max(hi, lo) - pb))
        everything = (slice(None), slice(None))
        y[everything + tuple(target)] = scatter[everything + tuple(source)]
        if b is not None:
            y += np.asarray(b, dtype=np.float64).reshape((1, -1) + (1,) * dims)
        return (y.astype(x.dtype, copy=False),)


class MaxPool(_EvaluatorMaxPool):
    """``MaxPool`` with ``ceil_mode=1`` routed to the evaluator's general kernel.

    The evaluator's shortcut for unit strides and dilations sizes a ``ceil_mode`` output as if the
    last windows could start in the end padding (kernel 3, stride 1, pads 1 on 8 values gives 10
    outputs, not 8: Inception's and GoogLeNet's branch pools then fail to concatenate); its general
    kernel (1- to 3-D) drops windows that would start in the end padding, as the specification says.
    """

    op_domain = ""

    # The signature of onnx's own MaxPool._run (which already differs from CommonPool's).
    def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, pads=None,  # type: ignore[override]
             storage_order=None, strides=None):
        rank = len(kernel_shape) if kernel_shape is not None else 0
        if ceil_mode and 1 <= rank <= 3 and (auto_pad in (None, "NOTSET", b"NOTSET")):
            return self._max_pool(x, auto_pad=auto_pad, ceil_mode=ceil_mode, dilations=dilations or [1] * rank,
                                  kernel_shape=kernel_shape, pads=pads, storage_order=storage_order,
                                  strides=strides or [1] * rank)
        return super()._run(x, auto_pad=auto_pad, ceil_mode=ceil_mode, dilations=dilations,
                            kernel_shape=kernel_shape, pads=pads, storage_order=storage_order, strides=strides)


class Upsample(OpRun):
    """``Upsample`` (opsets 7 to 9; deprecated since 10), nearest and linear, with the evaluator's Resize kernel.

    The evaluator implements only nearest with integer scales (FCN heads exported at opset 9 upsample
    bilinearly by 8). Upsample is Resize with ``coordinate_transformation_mode="asymmetric"`` (an output
    index i reads the input at i / scale), nearest rounding down, output size floor(size * scale), as the
    version converter's Upsample-9 -> Resize-10 adapter maps it.
    """

    op_domain = ""

    def _run(self, x, scales=None, **given):
        attributes = _attributes(self, given)
        factors = np.asarray(scales if scales is not None else attributes["scales"], dtype=np.float64)
        mode = attributes.get("mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if mode == "nearest":
            def coefficients(ratio, scale):
                return _resize_ops._nearest_coeffs(ratio, mode="floor")
        elif mode in ("linear", "bilinear"):
            coefficients = _resize_ops._linear_coeffs
        else:
            raise ValueError(f"Upsample {self.onnx_node.name!r}: unknown mode {mode!r}")
        y = _resize_ops._interpolate_nd(x, coefficients, scale_factors=list(factors),
                                        coordinate_transformation_mode="asymmetric")
        return (np.asarray(y, dtype=x.dtype),)


#: The kernels that replace the evaluator's own in the float64 reference.
REFERENCE_KERNELS: tuple[type[OpRun], ...] = (BatchNormalization, ConvTranspose, MaxPool, Upsample)


# --------------------------------------------------------------------------------------------------
# Running


def graph_feeds(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that must be fed (inputs that are also initializers are optional overrides)."""
    initializers = {t.name for t in model.graph.initializer} | {
        s.values.name for s in model.graph.sparse_initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _float_type(value: onnx.ValueInfoProto) -> int | None:
    if value.type.WhichOneof("value") != "tensor_type":
        return None
    return value.type.tensor_type.elem_type


def make_feeds(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0,
               notes: list[str] | None = None) -> dict[str, np.ndarray]:
    """Seeded random inputs for every graph input: standard normal floats, small non-negative integers.

    A dimension given by name (symbolic) or left unknown takes ``input_shapes[name]`` when given,
    else 1 (and a note is appended to ``notes``). ``input_shapes`` must name existing inputs, and
    may not contradict a fixed dimension.
    """
    shapes = dict(input_shapes or {})
    wanted = graph_feeds(model)
    unknown = set(shapes) - {v.name for v in wanted}
    if unknown:
        raise ValueError(f"input_shapes names no graph input: {sorted(unknown)}; the inputs are "
                         f"{[v.name for v in wanted]}")
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for value in wanted:
        elem_type = _float_type(value)
        if elem_type is None:
            raise ValueError(f"graph input {value.name!r} is not a tensor ({value.type.WhichOneof('value')}): "
                             "pass feeds explicitly")
        dims = value.type.tensor_type.shape.dim if value.type.tensor_type.HasField("shape") else None
        if dims is None:
            if value.name not in shapes:
                raise ValueError(f"graph input {value.name!r} has no shape (not even a rank): pass input_shapes")
            shape = [int(d) for d in shapes[value.name]]
        else:
            fixed = [d.dim_value if d.HasField("dim_value") else None for d in dims]
            given = shapes.get(value.name)
            if given is not None:
                given = [int(d) for d in given]
                if len(given) != len(fixed):
                    raise ValueError(f"input_shapes[{value.name!r}] = {given} has rank {len(given)}, the graph input "
                                     f"has rank {len(fixed)} ({_shape_text(dims)})")
                clash = [i for i, (f, g) in enumerate(zip(fixed, given, strict=True)) if f is not None and f != g]
                if clash:
                    raise ValueError(f"input_shapes[{value.name!r}] = {given} contradicts the fixed dims of the graph "
                                     f"input ({_shape_text(dims)}) at axis {clash[0]}")
                shape = given
            else:
                shape = [1 if f is None else f for f in fixed]
                symbolic = [_dim_text(d) for d, f in zip(dims, fixed, strict=True) if f is None]
                if symbolic and notes is not None:
                    notes.append(f"input {value.name!r} has dynamic dims {symbolic}: fed with 1 there "
                                 f"(shape {shape}); pass input_shapes to choose")
        if any(d < 0 for d in shape):
            raise ValueError(f"input {value.name!r}: negative dimension in shape {shape}")
        np_dtype = helper.tensor_dtype_to_np_dtype(elem_type)
        if elem_type in FLOAT_TYPES:
            feeds[value.name] = rng.standard_normal(shape).astype(np_dtype)
        elif elem_type == TensorProto.BOOL:
            feeds[value.name] = rng.integers(0, 2, shape).astype(bool)
        elif np.issubdtype(np_dtype, np.integer):
            feeds[value.name] = rng.integers(0, 4, shape).astype(np_dtype)
            if notes is not None:
                notes.append(f"input {value.name!r} is {np.dtype(np_dtype).name}: fed with random values in [0, 4)")
        else:
            raise ValueError(f"graph input {value.name!r} has element type "
                             f"{TensorProto.DataType.Name(elem_type)}: pass feeds explicitly")
    return feeds


def _dim_text(dim: onnx.TensorShapeProto.Dimension) -> str:
    if dim.HasField("dim_value"):
        return str(dim.dim_value)
    return dim.dim_param or "?"


def _shape_text(dims: Iterable[onnx.TensorShapeProto.Dimension]) -> str:
    return "[" + ", ".join(_dim_text(d) for d in dims) + "]"


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


def onnxruntime_session(model: onnx.ModelProto, threads: int = 0) -> Any:
    """An onnxruntime CPU session for ``model`` with every graph optimization disabled (large models via a file)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
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


# --------------------------------------------------------------------------------------------------
# Judging


def _constant_values(graph: onnx.GraphProto) -> set[str]:
    """Initializers, Constant outputs and every value computed from constants alone (in node order)."""
    names = {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    for node in graph.node:
        if all(i in names for i in node.input if i):
            names.update(o for o in node.output if o)
    return names


def _changed_values(graph: onnx.GraphProto) -> set[str]:
    """Values a fold legitimately changes: constants (folding rewrites them), outputs of layer/norm nodes,
    and what merely passes such an output on."""
    constants = _constant_values(graph)
    changed: set[str] = set(constants)
    for node in graph.node:
        if node.op_type in _CHANGED_OPS:
            changed.update(node.output)
            continue
        inputs = [i for i in node.input if i]
        varying = [i for i in inputs if i not in constants]
        if node.op_type == "Concat" and any(i in changed for i in varying):
            changed.update(node.output)
        elif node.op_type in _PASSING_OPS and len(varying) == 1 and varying[0] in changed:
            changed.update(node.output)
    return changed


def _judge(fused: np.ndarray, unfused: np.ndarray, reference: np.ndarray, perturbed: Sequence[np.ndarray]
           ) -> tuple[Any, float, str]:
    if fused.shape != reference.shape or unfused.shape != reference.shape:
        return None, math.inf, f"shape {fused.shape} in the folded model vs {reference.shape} in the original"
    perturbed = [p for p in perturbed if p.shape == reference.shape]
    result = compare_models(fused, unfused, reference, unfused.dtype, perturbed=perturbed)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(fused.astype(np.float64) - reference.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    if math.isnan(max_abs) or (diff.size and np.isnan(diff).any()):
        max_abs = math.inf
    return result, max_abs, ""


def _iter_nodes_outputs(graph: onnx.GraphProto) -> Iterator[tuple[onnx.NodeProto, str]]:
    for node in graph.node:
        for name in node.output:
            if name:
                yield node, name


def verify(original: onnx.ModelProto | str | os.PathLike, folded: onnx.ModelProto | str | os.PathLike,
           feeds: Mapping[str, np.ndarray] | None = None, *, input_shapes: Mapping[str, Sequence[int]] | None = None,
           seed: int = 0, per_node: bool = True, rounding_trials: int = 3) -> Verdict:
    """Check a folded ONNX graph against the float64 reference run of the original graph.

    Parameters
    ----------
    original, folded : onnx.ModelProto or path
        The graph before folding and the folded graph (from this project or any other tool).
    feeds : mapping of input name to array, optional
        The inputs to run both graphs on, in the graph inputs' own dtypes. Default: seeded random
        inputs (:func:`make_feeds`) -- symbolic dims take ``input_shapes`` or 1 (with a note).
    input_shapes : mapping of input name to shape, optional
        Shapes for the generated feeds (dynamic dims only; a fixed dim must not be contradicted).
    seed : int
        Seed of the generated feeds and of the parameter-rounded baselines.
    per_node : bool
        Also compare the intermediate values both graphs share by name and name the first that
        diverges (see the module docstring for which values a fold may change). Costs memory for
        every compared value; turn off for very large inputs.
    rounding_trials : int
        Copies of the original with every float constant rounded once more (:func:`rounded_copy`)
        run as the error baseline besides the original itself.

    Returns
    -------
    Verdict
        As ``adapters.torch.verify``: ``ok``, the per-output checks (matched by position; the error
        ``ratio`` = folded error / unfused error), the first diverging node if any.

    Raises
    ------
    ModelRunError
        A graph could not be loaded or run (``which`` is ``"original"``, ``"reference"`` or ``"folded"``).
    ValueError
        The feeds or shapes do not fit the original graph.
    """
    original = load_model(original)
    folded = load_model(folded)
    notes: list[str] = []
    if feeds is None:
        feeds = make_feeds(original, input_shapes, seed, notes)
    missing = [v.name for v in graph_feeds(original) if v.name not in feeds]
    if missing:
        raise ValueError(f"feeds lack the graph input(s) {missing} of the original model")
    feeds = dict(feeds)

    output_names = [o.name for o in original.graph.output]
    folded_outputs = [o.name for o in folded.graph.output]
    if len(folded_outputs) != len(output_names):
        outputs = (OutputCheck("output", False, math.inf, 0.0, 0.0, math.inf, math.inf,
                               f"output structure differs: folded has {len(folded_outputs)} output(s) "
                               f"{folded_outputs}, original {len(output_names)} {output_names}"),)
        return Verdict(False, "unknown", outputs, None, 0, notes=tuple(notes))
    if folded_outputs != output_names:
        notes.append(f"outputs renamed: {output_names} -> {folded_outputs} (compared by position)")

    intermediate: list[str] = []
    types_original: dict[str, onnx.ValueInfoProto] = {}
    types_folded: dict[str, onnx.ValueInfoProto] = {}
    if per_node:
        types_original = _value_types(original)
        types_folded = _value_types(folded)
        changed = _changed_values(original.graph) | _changed_values(folded.graph)
        skip = set(output_names) | set(folded_outputs) | {i.name for i in original.graph.input}
        # Values a node of the folded graph computes (its value_info may still describe values it no longer has).
        produced = {name for _, name in _iter_nodes_outputs(folded.graph)}
        intermediate = [name for _, name in _iter_nodes_outputs(original.graph)
                        if name in produced and name in types_original and name in types_folded and name not in changed
                        and name not in skip and types_original[name].type.tensor_type.elem_type in FLOAT_TYPES]
        intermediate = list(dict.fromkeys(intermediate))
    original_names = output_names + intermediate
    folded_names = folded_outputs + intermediate

    def run(which: str, model: onnx.ModelProto, names: Sequence[str], engine=run_onnxruntime) -> list[np.ndarray]:
        try:
            return engine(model, feeds, names)
        except Exception as error:  # any failure to load or run a graph is reported, naming the graph
            traceback.clear_frames(error.__traceback__)  # no session outlives the run in a frame
            raise ModelRunError(which, error) from error

    reference = run("reference", original, original_names, reference_outputs)
    # Each graph gets its compared values as graph outputs once; its rounded copies inherit them.
    original_fetching = _with_outputs(original, original_names, types_original)
    unfused = run("original", original_fetching, original_names)
    fused = run("folded", _with_outputs(folded, folded_names, types_folded), folded_names)
    perturbed = [run("original", rounded_copy(original_fetching, seed + trial, output_names), original_names)
                 for trial in range(rounding_trials)]

    checks: list[OutputCheck] = []
    for k, name in enumerate(output_names):
        path = name if folded_outputs[k] == name else f"{name} (folded: {folded_outputs[k]})"
        if not _is_float_array(unfused[k]):
            notes.append(f"output {name} is {unfused[k].dtype}, not compared")
            continue
        result, max_abs, detail = _judge(fused[k], unfused[k], reference[k], [p[k] for p in perturbed])
        if result is not None and not math.isfinite(result.unfused_error):
            notes.append(f"the original's own output {name} is not finite on these inputs (overflow in "
                         f"{unfused[k].dtype.name}?): choose inputs that keep it finite")
        if result is None:
            checks.append(OutputCheck(path, False, math.inf, 0.0, 0.0, math.inf, math.inf, detail))
        else:
            checks.append(OutputCheck(path, result.ok, result.fused_error, result.unfused_error, result.limit,
                                      result.ratio, max_abs))

    divergence = None
    compared = 0
    if per_node and intermediate:
        offset = len(output_names)
        position = {name: offset + i for i, name in enumerate(intermediate)}
        suspects: list[str] = []
        for node, name in _iter_nodes_outputs(original.graph):
            if node.op_type in _CHANGED_OPS:
                suspects.append(node.name or f"{node.op_type}->{name}")
                continue
            if name not in position:
                continue
            i = position.pop(name)
            compared += 1
            result, max_abs, detail = _judge(fused[i], unfused[i], reference[i], [p[i] for p in perturbed])
            label = node.name or node.op_type
            if result is None:
                divergence = LayerDivergence(label, 0, name, math.inf, 0.0, 0.0, math.inf, math.inf,
                                             tuple(suspects[-4:]), detail)
                break
            if not result.ok:
                divergence = LayerDivergence(label, 0, name, result.fused_error, result.unfused_error, result.limit,
                                             result.ratio, max_abs, tuple(suspects[-4:]))
                break
            suspects.clear()
    if not checks and not compared:
        raise ValueError("verify: the original model has no floating-point output or intermediate value to compare")
    ok = all(c.ok for c in checks) and divergence is None
    dtype = next((np.asarray(u).dtype.name for u in unfused[:len(output_names)] if _is_float_array(u)), "unknown")
    verdict = Verdict(ok=ok, dtype=dtype, outputs=tuple(checks), first_divergence=divergence,
                      layers_compared=compared, notes=tuple(notes))
    logger.debug("verify: %s", verdict)
    return verdict

"""The inputs a verification runs on: seeded random feeds of the graph inputs' declared shapes, and for dynamic dims
(symbolic, unknown or negative) sizes on which the original graph computes something meaningful: finite outputs
that are not all one value (spec/onnx.md, section 4.1).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..graph import FLOAT_TYPES
from .run import onnxruntime_session, reference_outputs

#: Sizes vision and sequence models are built for, tried for dynamic dims after the graph's own size constants.
TYPICAL_SIZES = (8, 16, 32, 64, 224, 320, 640)
#: At most this many candidate sizes are run (smallest first).
MAX_TRIALS = 10
#: Integer constants of the graph taken as candidate sizes: within these bounds, from tensors this small.
_SIZE_RANGE = (8, 2048)
_SMALL_TENSOR = 8


def fixed_dim(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    """A dim's fixed size; None for a dynamic one (a name, nothing, or a negative value as PaddlePaddle writes)."""
    if dim.HasField("dim_value") and dim.dim_value >= 0:
        return int(dim.dim_value)
    return None


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

    A dimension given by name (symbolic), left unknown or negative (dynamic) takes ``input_shapes[name]``
    when given, else 1 (and a note is appended to ``notes``; :func:`choose_input_shapes` chooses better).
    ``input_shapes`` must name existing inputs, and may not contradict a fixed dimension.
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
            fixed = [fixed_dim(d) for d in dims]
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
    if fixed_dim(dim) is not None:
        return str(dim.dim_value)
    return dim.dim_param or "?"


def _shape_text(dims: Iterable[onnx.TensorShapeProto.Dimension]) -> str:
    return "[" + ", ".join(_dim_text(d) for d in dims) + "]"


def _candidate_sizes(model: onnx.ModelProto) -> list[int]:
    """Sizes to try for dynamic dims, smallest first: the graph's small integer constants that look like sizes (a
    Reshape's shape, a Resize's sizes, a Slice's ends ...), then :data:`TYPICAL_SIZES`, at most :data:`MAX_TRIALS`
    (the typical ones kept first when there are more)."""
    found: set[int] = set()
    tensors = list(model.graph.initializer) + [attr.t for node in model.graph.node if node.op_type == "Constant"
                                               for attr in node.attribute if attr.name == "value"]
    for tensor in tensors:
        if tensor.data_type in (TensorProto.INT64, TensorProto.INT32) and \
                int(np.prod(tensor.dims, dtype=np.int64)) <= _SMALL_TENSOR:
            try:
                values = numpy_helper.to_array(tensor).reshape(-1)
            except Exception:  # a malformed constant is only not a candidate
                continue
            found.update(int(v) for v in values if _SIZE_RANGE[0] <= v <= _SIZE_RANGE[1])
    typical = list(TYPICAL_SIZES)
    own = sorted(found - set(typical))[:max(0, MAX_TRIALS - len(typical))]
    return sorted(set(typical) | set(own))


def _degenerate(outputs: Sequence[Any], names: Sequence[str]) -> str | None:
    """Why these float outputs mean nothing (not finite, or more than one element all of one value), or None."""
    for name, value in zip(names, outputs, strict=True):
        array = np.asarray(value)
        if array.dtype.kind != "f" or array.size == 0:
            continue
        if not np.isfinite(array).all():
            return f"output {name!r} is not finite"
        if array.size > 1 and float(array.max()) == float(array.min()):
            return f"output {name!r} is one value ({float(array.flat[0]):.6g}) everywhere"
    return None


def dynamic_inputs(model: onnx.ModelProto, given: Iterable[str] = ()) -> list[tuple[str, list[int | None], str]]:
    """(name, dims with None where dynamic, the shape as text) of the fed inputs with a dynamic dim and no shape in
    ``given``."""
    out = []
    skip = set(given)
    for value in graph_feeds(model):
        if value.name in skip or value.type.WhichOneof("value") != "tensor_type" \
                or not value.type.tensor_type.HasField("shape"):
            continue
        dims = [fixed_dim(d) for d in value.type.tensor_type.shape.dim]
        if any(d is None for d in dims):
            out.append((value.name, dims, _shape_text(value.type.tensor_type.shape.dim)))
    return out


def choose_input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None,
                        seed: int = 0, notes: list[str] | None = None) -> dict[str, list[int]]:
    """``input_shapes`` completed with a shape for every input that has dynamic dims: axis 0 of an input of rank 2
    or more (the batch) is 1, every other dynamic dim takes one candidate size (:func:`_candidate_sizes`), the
    smallest on which the original graph runs in onnxruntime with outputs that are finite and not one value
    everywhere (when only batch axes are dynamic there is nothing to choose and nothing is run). Raises ValueError
    (one line naming the inputs and an example ``--input-shape``) when no candidate does."""
    shapes = {k: [int(d) for d in v] for k, v in (input_shapes or {}).items()}
    open_inputs = dynamic_inputs(model, shapes)
    if not open_inputs:
        return shapes
    if all(axis == 0 and len(dims) >= 2 for _, dims, _ in open_inputs for axis, d in enumerate(dims) if d is None):
        # only batch axes: nothing to choose (1), and verify's own run of the original warns if it is degenerate
        trial = dict(shapes)
        trial.update((name, [1 if d is None else d for d in dims]) for name, dims, _ in open_inputs)
        if notes is not None:
            described = ", ".join(f"{name!r} {text} as {trial[name]}" for name, _, text in open_inputs)
            notes.append(f"dynamic dims: fed {described} (batch 1); pass input_shapes / --input-shape to choose")
        return trial
    names = [o.name for o in model.graph.output]
    session = None
    failures: list[str] = []
    seen: list[dict[str, list[int]]] = []
    tried: list[int] = []
    sizes = _candidate_sizes(model)
    for size in sizes:
        trial = dict(shapes)
        for name, dims, _ in open_inputs:
            trial[name] = [d if d is not None else (1 if axis == 0 and len(dims) >= 2 else size)
                           for axis, d in enumerate(dims)]
        if trial in seen:
            continue
        seen.append(trial)
        tried.append(size)
        feeds = make_feeds(model, trial, seed)
        try:
            if session is None:
                session = onnxruntime_session(model, quiet=True)
            needed = {i.name for i in session.get_inputs()}
            outputs = session.run(names, {k: v for k, v in feeds.items() if k in needed})
        except Exception as exc:  # a size the graph rejects: try the next
            failures.append(f"{size}: {_short_error(exc)}")
            if session is None:  # the graph does not even load: verify's own run reports that
                return trial
            continue
        why = _degenerate(outputs, names) or _reference_disagrees(model, feeds, names, outputs)
        if why is None:
            if notes is not None:
                described = ", ".join(f"{name!r} {text} as {trial[name]}" for name, _, text in open_inputs)
                notes.append(f"dynamic dims: fed {described} (the smallest tried size on which the original graph's "
                             "outputs are finite and not constant); pass input_shapes / --input-shape to choose")
            return trial
        failures.append(f"{size}: {why}")
    example = " ".join(f"--input-shape {name}=" + ",".join(str(d if d is not None else (1 if axis == 0 and
                                                                                         len(dims) >= 2 else 640))
                                                             for axis, d in enumerate(dims))
                       for name, dims, _ in open_inputs)
    inputs = ", ".join(f"{name!r} {text}" for name, _, text in open_inputs)
    sizes_text = ", ".join(str(size) for size in tried) if len(seen) > 1 else "the one shape the fixed dims allow"
    raise ValueError(f"verify: no size for the dynamic dims of {inputs} makes the original graph's outputs finite "
                     f"and not constant (tried {sizes_text}; at {failures[-1]}); give the shapes, e.g. {example}")


def _reference_disagrees(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], names: Sequence[str],
                         outputs: Sequence[Any]) -> str | None:
    """Why the float64 reference run means nothing on ``feeds`` where onnxruntime's did (it raises, its outputs are
    degenerate, or their shapes differ: onnxruntime's pooling returns 1 where the operator's definition gives 0 on a
    map smaller than the kernel), or None."""
    try:
        reference = reference_outputs(model, feeds, names)
    except Exception as exc:  # the reference evaluator rejects this size: try the next
        return f"the float64 reference raised {_short_error(exc)}"
    for name, ours, theirs in zip(names, reference, outputs, strict=True):
        if np.shape(ours) != np.shape(theirs):
            return (f"output {name!r} has shape {tuple(np.shape(ours))} in the float64 reference, "
                    f"{tuple(np.shape(theirs))} in onnxruntime")
    why = _degenerate(reference, names)
    return None if why is None else f"in the float64 reference, {why}"


def _short_error(exc: Exception) -> str:
    """onnxruntime's message without its source location: the node that failed and why."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", lines[-1])
    head, sep, tail = text.partition(" Status Message: ")
    if sep:
        tail = tail.split(" was false. ", 1)[-1]
        text = f"{head} {tail}"
    return text[:300]

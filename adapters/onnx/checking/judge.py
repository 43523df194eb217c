"""The judgement: :func:`verify` runs the original graph's float64 reference, both graphs in their own dtype and the
rounded baselines, and applies the project's error model (:func:`refimpl.compare_models`) to every output and to
every intermediate value both graphs share that a fold does not legitimately change.
"""


from __future__ import annotations

import logging
import math
import os
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx.inliner

from refimpl import compare_models

from ...verdict import LayerDivergence, ModelRunError, OutputCheck, Verdict
from ..graph import FLOAT_TYPES
from .feeds import _degenerate, choose_input_shapes, graph_feeds, make_feeds
from .retype import load_model
from .run import _is_float_array, _value_types, _with_outputs, reference_outputs, rounded_copy, run_onnxruntime

logger = logging.getLogger("adapters.onnx.checking")

#: The original graph's own relative RMS error against its float64 reference above which a comparison means little
#: (a float32 graph is normally near 1e-6; 1.0 is an output that is all noise or all zero).
FAR_FROM_REFERENCE = 0.1

#: Ops whose outputs a fold changes (the folded layers themselves and the norms folded away).
_CHANGED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization"})

#: Ops that hand on a changed value moved, copied, averaged or offset by constants -- what a folder may fold a
#: BatchNormalization through (BN -> Pad(reflect) -> Conv, Conv -> Reshape -> BN, ...): their output changes too.
_PASSING_OPS = frozenset({"Identity", "Dropout", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose",
                          "Split", "Slice", "Gather", "Pad", "Expand", "Tile", "Resize", "Upsample", "DepthToSpace",
                          "SpaceToDepth", "AveragePool", "GlobalAveragePool", "ReduceMean", "Cast", "Add", "Sub",
                          "Mul", "Div"})


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
        inputs (:func:`make_feeds`) -- dynamic dims (named, unknown or negative) take ``input_shapes``, else the
        smallest candidate size on which the original graph's outputs are finite and not constant
        (:func:`choose_input_shapes`, with a note; ValueError when there is none).
    input_shapes : mapping of input name to shape, optional
        Shapes for the generated feeds (dynamic dims only; a fixed dim must not be contradicted; a negative dim
        in the graph is dynamic).
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
        feeds = make_feeds(original, choose_input_shapes(original, input_shapes, seed, notes), seed, notes)
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

    why = _degenerate(unfused[:len(output_names)], output_names)
    if why is not None:
        notes.append(f"warning: on these inputs the original graph's {why}: the comparison means little")
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
        elif result is not None and result.unfused_error > FAR_FROM_REFERENCE:
            notes.append(f"warning: the original's own {unfused[k].dtype.name} output {name} is far from its float64 "
                         f"reference (relative RMS error {result.unfused_error:.3g}): the comparison means little on "
                         "these inputs")
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

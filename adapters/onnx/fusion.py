"""Folding BatchNormalization in an ONNX model: analyse (:mod:`.graph`), plan one fold per norm and compute every
new weight and bias from refimpl in float64 (vetoing folds that overflow the dtype), then apply layer by layer,
rounding once, with every error the input can cause raised before anything is modified. The design, memory and
time: spec/onnx.md, section 2.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper

from refimpl.layers import NORM_AFTER, NORM_BEFORE, fold_for
from refimpl.rounding import bfloat16_bits_to_float32, largest_finite, round_once, round_product

from ..interrupts import interrupts_held
from ..report import FoldedPair, FusionReport, SkippedNorm, most_specific_reason
from .graph import (
    DEFAULT_DOMAINS,
    FLOAT_TYPES,
    MIN_OPSET,
    Analysis,
    Backward,
    ConstRef,
    Forward,
    Layer,
    LayerKind,
    ModelIndex,
    Norm,
    Scope,
    Shift,
    check_readable,
    copy_field,
    find_candidates,
    read_array,
    skeleton,
)

__all__ = ["fuse", "fuse_bn"]

log = logging.getLogger("adapters.onnx")

#: The refimpl layer kind of each graph layer kind, and the norm position of each fold direction
#: (the fold and its report kind come from refimpl's one table, :func:`refimpl.layers.fold_for`).
_REFIMPL_KIND = {LayerKind.CONV: "conv", LayerKind.CONV_TRANSPOSE: "conv_transpose", LayerKind.GEMM: "linear",
                 LayerKind.MATMUL: "linear"}
_POSITION = {"forward": NORM_AFTER, "backward": NORM_BEFORE}

# -- input ----------------------------------------------------------------------------------

def _load(model: Any) -> tuple[ModelProto, bool]:
    """The ModelProto and whether it was read from a file here (then it is ours to modify)."""
    if isinstance(model, ModelProto):
        return model, False
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        try:
            return onnx.load(path), True  # external data is read from the model's directory
        except Exception as exc:
            raise ValueError(f"cannot read ONNX model '{path}': {type(exc).__name__}: {exc}") from None
    raise TypeError(f"fuse expects an onnx.ModelProto or a path to a .onnx file, got {type(model).__qualname__}")


def _validate(model: ModelProto, initializers: list[TensorProto]) -> None:
    """Opsets in the supported range and ONNX's checker on the weightless skeleton (cheap for any size)."""
    newest = onnx.defs.onnx_opset_version()
    owners = [("the model", model.opset_import)] + [(f"function {f.domain}.{f.name}", f.opset_import)
                                                     for f in model.functions]
    for owner, opsets in owners:
        for opset in opsets:
            if opset.domain in DEFAULT_DOMAINS and not MIN_OPSET <= opset.version <= newest:
                raise ValueError(f"{owner} imports opset {opset.version} of the default domain; supported: "
                                 f"{MIN_OPSET} to {newest} (onnx {onnx.__version__})")
    try:
        onnx.checker.check_model(skeleton(model, {t.name: t for t in initializers}))
    except onnx.checker.ValidationError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ValueError(f"invalid ONNX model: {'; '.join(lines)}") from None


def _copy_without_main_initializers(model: ModelProto) -> ModelProto:
    """A copy of everything but the main graph's initializers (written last, each only once)."""
    copy = ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            copy_field(copy, fd, value)
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            copy_field(copy.graph, fd, value)
    return copy


# -- planning -------------------------------------------------------------------------------

@dataclass
class _Step:
    norm: Norm
    direction: str                       # "forward": the norm runs after the layer; "backward": before it
    order: int                           # norms between this one and the layer
    channels: tuple[int, int] | None     # the norm's channel slice the layer produces (concat); None: all
    shift: ConstRef | None = None        # backward: a constant added to the norm's output before the layer


@dataclass
class _LayerPlan:
    layer: Layer
    steps: list[_Step]
    factors: list[np.ndarray] = field(default_factory=list)  # forward-only: W' = W * pre * factors[-1]
    weight: bytes | None = None          # otherwise the new weight, rounded (raw_data)
    bias: np.ndarray | None = None       # the new bias vector (float64)
    changes: list[float] = field(default_factory=list)
    checked: bool = False                # the weight's overflow check and changes are done

    @property
    def pre(self) -> float:
        """Gemm's alpha, folded into the weight (then set to 1)."""
        return self.layer.alpha if self.layer.kind == LayerKind.GEMM else 1.0

    @property
    def flipped(self) -> bool:
        """A [K, N] MatMul / Gemm(transB=0) weight: refimpl's per-row factor is a per-column factor there."""
        return self.layer.kind == LayerKind.MATMUL or (self.layer.kind == LayerKind.GEMM and not self.layer.trans_b)

    @property
    def factor(self) -> np.ndarray:
        """The final factor in the weight's stored layout."""
        return self.factors[-1].T if self.flipped else self.factors[-1]


Choice = tuple[str, Forward | Backward]


class _Planner:
    def __init__(self, analysis: Analysis):
        self.a = analysis
        self.vetoed_layers: dict[tuple[int, int], tuple[str, str]] = {}
        self.reasons: dict[tuple[int, int], list[tuple[str, str]]] = {}

    def note(self, key: tuple[int, int], code: str, detail: str) -> None:
        self.reasons.setdefault(key, []).append((code, detail))

    @staticmethod
    def layers_of(cand: Forward | Backward) -> list[Layer]:
        return [layer for layer, _ in cand.parts] if isinstance(cand, Forward) else [cand.layer]

    def first_allowed(self, key: tuple[int, int], start: str) -> Choice | None:
        for direction in ("forward", "backward") if start == "forward" else ("backward",):
            cand = self.a.forward.get(key) if direction == "forward" else self.a.backward.get(key)
            if cand is None:
                continue
            vetoes = [self.vetoed_layers[lay.key] for lay in self.layers_of(cand) if lay.key in self.vetoed_layers]
            if vetoes:
                self.note(key, *vetoes[0])
                continue
            return direction, cand
        return None

    def choose(self) -> dict[tuple[int, int], Choice]:
        """One fold per norm; a norm between another and its layer must fold into that layer the same way
        (choices only move from forward to backward to nothing, so the loop ends)."""
        choice: dict[tuple[int, int], Choice] = {}
        for key in self.a.norms:
            first = self.first_allowed(key, "forward")
            if first is not None:
                choice[key] = first
        changed = True
        while changed:
            changed = False
            for key in list(choice):
                direction, cand = choice[key]
                layer_keys = [lay.key for lay in self.layers_of(cand)]
                for node in cand.between:
                    other = choice.get((id(cand.norm.scope), node))
                    if other is None or other[0] != direction or \
                            [lay.key for lay in self.layers_of(other[1])] != layer_keys:
                        label = cand.norm.scope.label(node)
                        self.note(key, "no_fusable_neighbour", f"{label}, between {cand.norm.label} and "
                                  f"{self.layers_of(cand)[0].label}, is not folded")
                        del choice[key]
                        if direction == "forward":
                            fallback = self.first_allowed(key, "backward")
                            if fallback is not None:
                                choice[key] = fallback
                        changed = True
                        break
        return choice

    def layer_plans(self, choice: dict[tuple[int, int], Choice]) -> list[_LayerPlan]:
        plans: dict[tuple[int, int], _LayerPlan] = {}
        for direction, cand in choice.values():
            parts = cand.parts if isinstance(cand, Forward) else ((cand.layer, None),)
            shift = self.a.shifts.get(cand.norm.key) if direction == "backward" else None
            for layer, channels in parts:
                plan = plans.setdefault(layer.key, _LayerPlan(layer, []))
                if layer.shift is not None:
                    plan.layer = layer  # the Add after the layer is folded too (a norm before it found no Add)
                plan.steps.append(_Step(cand.norm, direction, len(cand.between), channels,
                                        shift.constant if shift is not None else None))
        for plan in plans.values():
            # Dataflow order: norms before the layer (nearest first), then norms after it (nearest first).
            plan.steps.sort(key=lambda s: (s.direction != "backward", s.order))
        scope_order = {id(scope): i for i, scope in enumerate(self.a.index.scopes)}
        return sorted(plans.values(), key=lambda p: (scope_order[id(p.layer.scope)], p.layer.node))


# -- computing ------------------------------------------------------------------------------

def _values(ref: ConstRef, what: str) -> np.ndarray:
    return read_array(ref.tensor, what).astype(np.float64)


def _norm_stats(step: _Step) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray]:
    """(mean, var, eps, scale, B) in float64, sliced to the step's channels."""
    norm = step.norm
    what = norm.scope.describe(norm.node)
    scale, bias, mean, var = (_values(ref, what) for ref in norm.params)
    if step.shift is not None:  # norm -> Add(c) -> layer: the norm's shift is B + c (c one value per channel)
        bias = bias + _values(step.shift, what).reshape(-1)
    if step.channels is not None:
        a, b = step.channels
        scale, bias, mean, var = scale[a:b], bias[a:b], mean[a:b], var[a:b]
    return mean, var, norm.epsilon, scale, bias


def _bias_vector(layer: Layer) -> np.ndarray | None:
    """The layer's bias as one float64 value per output channel (Gemm: beta * C), plus the constant of an Add after
    it (``shift``); or None."""
    def per_channel(ref: ConstRef) -> np.ndarray:
        values = _values(ref, layer.scope.describe(layer.node))
        return np.broadcast_to(values.reshape(-1) if values.size > 1 else values.reshape(()), (layer.out_channels,))
    vector = None
    if layer.bias is not None:
        vector = per_channel(layer.bias) * layer.beta if layer.kind == LayerKind.GEMM else np.array(
            per_channel(layer.bias))
    if layer.shift is not None and layer.kind != LayerKind.MATMUL:
        vector = per_channel(layer.shift) + (0.0 if vector is None else vector)
    return vector


def _linear_view(layer: Layer, stored: np.ndarray) -> np.ndarray:
    """The weight as refimpl sees it: conv layouts as stored, a linear layer as [out, in] (Gemm: alpha * B')."""
    if layer.kind in (LayerKind.CONV, LayerKind.CONV_TRANSPOSE):
        return stored
    matrix = stored if layer.kind == LayerKind.GEMM and layer.trans_b else stored.T
    return matrix * layer.alpha if layer.kind == LayerKind.GEMM and layer.alpha != 1.0 else matrix


def _stored_view(layer: Layer, linear: np.ndarray) -> np.ndarray:
    if layer.kind in (LayerKind.CONV, LayerKind.CONV_TRANSPOSE):
        return linear
    return linear if layer.kind == LayerKind.GEMM and layer.trans_b else linear.T


def _fold(plan: _LayerPlan, step: _Step, weight: np.ndarray, bias: np.ndarray | None
          ) -> tuple[np.ndarray, np.ndarray]:
    """One refimpl fold of ``step``'s norm into (weight, bias), in float64, the weight in refimpl's layout."""
    layer = plan.layer
    stats = _norm_stats(step)
    try:
        fold = fold_for(_REFIMPL_KIND[layer.kind], _POSITION[step.direction])
        return fold(weight, bias, *stats, groups=layer.group if fold.layer.spatial else 1)
    except (ValueError, TypeError) as exc:
        norm = step.norm
        order = (f"{layer.label} -> {norm.label}" if step.direction == "forward" else f"{norm.label} -> {layer.label}")
        part = "" if step.channels is None else f" channels [{step.channels[0]}, {step.channels[1]})"
        raise type(exc)(f"cannot fold {order} ({layer.scope.nodes[layer.node].op_type} weight "
                        f"{list(layer.weight.dims)}, BatchNormalization({norm.channels}){part}): {exc}") from exc


def _unit_shape(layer: Layer) -> tuple[int, ...]:
    """refimpl's layout of the per-slot factor of forward folds: per output channel (axis 0), per (input,
    output-in-group) pair for a transposed conv, per row of a linear weight."""
    dims = layer.weight.dims
    if layer.kind == LayerKind.CONV:
        return (dims[0],) + (1,) * (len(dims) - 1)
    if layer.kind == LayerKind.CONV_TRANSPOSE:
        return dims[:2] + (1,) * (len(dims) - 2)
    return (layer.out_channels, 1)


def _slot_max(stored: np.ndarray, factor_shape: tuple[int, ...]) -> np.ndarray:
    """max |W| over the positions each factor entry scales (shaped like the factor): the larger of max W and
    -min W, two reductions that make no temporary the size of the weight."""
    axes = tuple(i for i, d in enumerate(factor_shape) if d == 1)
    if stored.size == 0:
        return np.zeros(factor_shape)
    high = stored.max(axis=axes, keepdims=True).astype(np.float64)
    low = stored.min(axis=axes, keepdims=True).astype(np.float64)
    return np.maximum(high, -low).reshape(factor_shape)


def _relative(change: float, scale: float) -> float:
    return change / scale if scale > 0 else (0.0 if change == 0 else math.inf)


def _fits(value: float, dtype: str) -> bool:
    """Whether a magnitude rounds to a finite value of ``dtype``."""
    if not math.isfinite(value):
        return False
    rounded = round_once(np.array([value]), dtype)
    return bool(np.isfinite(bfloat16_bits_to_float32(rounded) if dtype == "bfloat16" else rounded).all())


def _compute(plan: _LayerPlan, check_weight: bool) -> str | None:
    """The plan's new bias, and its new weight or the factors the weight is scaled by; an overflow detail when
    they do not fit the dtype. ``check_weight=False`` leaves the weight's check to :func:`_check_weight` when it
    is written (a forward-only plan: its factors are known without reading the weight)."""
    layer = plan.layer
    what = layer.scope.describe(layer.node)
    weight_dtype = layer.weight.dtype
    assert weight_dtype is not None
    bias_dtype = layer.bias.dtype if layer.bias is not None else weight_dtype
    assert bias_dtype is not None
    bias = _bias_vector(layer)
    plan.changes, plan.factors, plan.checked, plan.weight = [], [], False, None
    detail = None
    if any(step.direction == "backward" for step in plan.steps):
        w = _linear_view(layer, read_array(layer.weight.tensor, what).astype(np.float64))
        for step in plan.steps:
            new_w, bias = _fold(plan, step, w, bias)
            scale = float(np.abs(w).max()) if w.size else 0.0
            plan.changes.append(_relative(float(np.abs(new_w - w).max()) if w.size else 0.0, scale))
            w = new_w
        peak = float(np.abs(w).max()) if w.size else 0.0
        if not _fits(peak, weight_dtype):
            detail = _overflow_detail(layer, "weight", peak, weight_dtype)
        plan.weight, plan.checked = _encode(_stored_view(layer, w), weight_dtype), True
    else:
        factor = np.ones(_unit_shape(layer))
        plan.factors.append(factor)
        for step in plan.steps:
            factor, bias = _fold(plan, step, factor, bias)
            plan.factors.append(factor)
        if check_weight:
            detail = _check_weight(plan, read_array(layer.weight.tensor, what))
        else:
            check_readable(layer.weight.tensor, what)  # reading it when writing must not fail
    assert bias is not None
    plan.bias = bias
    bias_peak = float(np.abs(bias).max()) if bias.size else 0.0
    if detail is None and not _fits(bias_peak, bias_dtype):
        detail = _overflow_detail(layer, "bias", bias_peak, bias_dtype)
    return detail


def _check_weight(plan: _LayerPlan, stored: np.ndarray) -> str | None:
    """Each step's weight change and whether ``W * pre * factor`` fits the dtype, from the weight's slot maxima:
    ``max |W'_k - W_k|`` is the max over slots of ``max |W_slot| * |S_k - S_(k-1)|``, and rounding is monotone,
    so the largest ``max |W_slot| * |S|`` decides whether any element overflows."""
    layer = plan.layer
    unit = plan.factors[0].shape
    slot_max = _slot_max(stored, unit[::-1] if plan.flipped else unit)
    slot_max = (slot_max.T if plan.flipped else slot_max) * abs(plan.pre)
    weight_max = float(slot_max.max()) if slot_max.size else 0.0
    plan.changes = []
    for before, after in zip(plan.factors, plan.factors[1:], strict=False):
        change = float((slot_max * np.abs(after - before)).max()) if slot_max.size else 0.0
        plan.changes.append(_relative(change, weight_max))
    plan.checked = True
    peak = float((slot_max * np.abs(plan.factors[-1])).max()) if slot_max.size else 0.0
    dtype = layer.weight.dtype
    assert dtype is not None
    return None if _fits(peak, dtype) else _overflow_detail(layer, "weight", peak, dtype)


def _overflow_detail(layer: Layer, what: str, magnitude: float, dtype: str) -> str:
    return (f"folding into {layer.label} gives a {what} of magnitude up to {magnitude:.4g}, beyond the largest "
            f"finite {dtype} ({largest_finite(dtype):.5g})")


# -- writing tensors ------------------------------------------------------------------------

_DATA_FIELDS = {"float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data", "raw_data",
                "external_data", "data_location"}


def _encode(values: np.ndarray, dtype: str) -> bytes:
    """float64 values rounded once to ``dtype``, as little-endian raw_data."""
    rounded = round_once(values, dtype)
    return rounded.astype(rounded.dtype.newbyteorder("<"), copy=False).tobytes()


@dataclass
class _NewValue:
    """A constant's new value: element type and metadata from ``template``, ``dims`` and data."""

    template: TensorProto
    dims: tuple[int, ...]
    raw: bytes

    def fill(self, out: TensorProto, name: str) -> None:
        """Write the value into the empty tensor ``out`` (made in place: its bytes are copied once)."""
        raw = self.raw
        for fd, value in self.template.ListFields():
            if fd.name not in _DATA_FIELDS and fd.name not in ("name", "dims"):
                copy_field(out, fd, value)
        out.name = name
        out.dims.extend(self.dims)
        out.raw_data = raw

    def replace(self, tensor: TensorProto) -> None:
        """Rewrite ``tensor`` (the template itself) in place: same name, element type and metadata."""
        raw = self.raw
        for name in _DATA_FIELDS:
            tensor.ClearField(name)
        del tensor.dims[:]
        tensor.dims.extend(self.dims)
        tensor.raw_data = raw

    def tensor(self, name: str) -> TensorProto:
        out = TensorProto()
        self.fill(out, name)
        return out


# -- applying -------------------------------------------------------------------------------

class _Writer:
    """Applies the plans to ``model`` (the index's model), layer by layer; then removes the folded norms and what
    nothing reads any more. Nothing here fails for a reason the input can cause."""

    def __init__(self, index: ModelIndex, source_initializers: list[TensorProto] | None,
                 shifts: dict[tuple[int, int], Shift] | None = None):
        self.index = index
        self.shifts = shifts or {}                       # norm -> the Add of a constant right after it
        self.model = index.model
        self.source_initializers = source_initializers   # main initializers when ``model`` is a copy without them
        self.slots: dict[str, TensorProto] = {}          # (copy) the main initializers a plan writes, still empty
        self.node_inserts: dict[int, list[tuple[int, NodeProto]]] = {}   # scope -> (before node, Constant node)
        self.removed_nodes: dict[int, set[int]] = {}
        self.gone_values: dict[int, set[str]] = {}       # scope -> value names that no longer exist
        self.released: set[tuple[int, str]] = set()      # (namespace, name) that may have lost their last reader
        self.scope_by_id = {id(s): s for s in index.scopes}

    @staticmethod
    def rewritten(ref: ConstRef | None) -> bool:
        """Whether a layer's constant is rewritten where it is (its only reader is the folded layer)."""
        return ref is not None and not ref.copied and ref.scope.namespace.uses[ref.name] == 1

    def prepare(self, plans: list[_LayerPlan]) -> None:
        """A copy gets the main graph's initializers here, in their order: a copy of each, except an empty slot
        for each one a plan rewrites (written once, by the plan)."""
        if self.source_initializers is None:
            return
        main = self.index.scopes[0]
        mine = {ref.name for plan in plans for ref in (plan.layer.weight, plan.layer.bias)
                if self.rewritten(ref) and ref is not None and ref.node is None and ref.scope is main}
        graph = self.model.graph
        for tensor in self.source_initializers:
            if tensor.name in mine:
                self.slots[tensor.name] = graph.initializer.add()
            else:
                graph.initializer.add().CopyFrom(tensor)  # add().CopyFrom: far faster than append()

    def put_constant(self, layer: Layer, node_index: int, slot: int, ref: ConstRef | None, base: str,
                     value: _NewValue) -> None:
        """Give input ``slot`` of node ``node_index`` (the layer, or its Add) a new constant: rewrite ``ref`` where
        that input is its only reader, else a new initializer (a Constant node in a function) under a new name."""
        scope = layer.scope
        ns = scope.namespace
        node = scope.nodes[node_index]
        if ref is not None and self.rewritten(ref):
            if ref.node is not None:
                constant = ref.scope.nodes[ref.node]
                tensor = value.tensor(ref.name)
                del constant.attribute[:]
                constant.attribute.append(helper.make_attribute("value", tensor))
            elif ref.name in self.slots:
                value.fill(self.slots.pop(ref.name), ref.name)
            else:
                value.replace(ref.tensor)
            return
        name = self.new_constant(layer, base, value)
        if ref is not None:
            self.released.add((id(ns), ref.name))
        if slot < len(node.input):
            node.input[slot] = name
        else:
            node.input.extend([""] * (slot - len(node.input)) + [name])

    def new_constant(self, layer: Layer, base: str, value: _NewValue) -> str:
        """A new initializer of the layer's graph (a Constant node right before the layer in a function, which has
        no initializers) holding ``value``, under a new name made from ``base``."""
        scope = layer.scope
        name = scope.namespace.unique(base)
        if scope.kind == "function":
            constant = helper.make_node("Constant", [], [name], value=value.tensor(name))
            self.node_inserts.setdefault(id(scope), []).append((layer.node, constant))
        else:
            graph = scope.proto
            assert isinstance(graph, GraphProto)
            tensor = graph.initializer.add()
            value.fill(tensor, name)
            if scope.kind == "graph" and self.model.ir_version < 4:  # below IR 4 initializers are also inputs
                graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
        return name

    def add_bias_after(self, layer: Layer, base: str, value: _NewValue) -> None:
        """A MatMul of an input not proven 2-D (Gemm takes 2-D only) gets its new bias from an Add right after it,
        which takes over the MatMul's output name."""
        scope = layer.scope
        node = scope.nodes[layer.node]
        bias = self.new_constant(layer, base, value)
        output = node.output[0]
        node.output[0] = scope.namespace.unique(f"{output}_without_bias")
        add = helper.make_node("Add", [node.output[0], bias], [output],
                               name=scope.namespace.unique(f"{node.name or 'MatMul'}_bias"))
        # Right after the MatMul: its output's readers (the reshape the norm read) all come later.
        self.node_inserts.setdefault(id(scope), []).append((layer.node + 1, add))

    def commit(self, plan: _LayerPlan) -> str | None:
        """Write the plan's weight and bias and rewire its node; an overflow detail instead (nothing written)
        when the weight, checked only now, does not fit its dtype."""
        layer = plan.layer
        scope = layer.scope
        node = scope.nodes[layer.node]
        weight_dtype = layer.weight.dtype
        assert weight_dtype is not None and plan.bias is not None
        if plan.weight is not None:
            raw = plan.weight
        else:
            stored = read_array(layer.weight.tensor, scope.describe(layer.node))
            if not plan.checked:
                detail = _check_weight(plan, stored)
                if detail is not None:
                    self.keep(plan)
                    return detail
            rounded = round_product(stored, plan.factor, weight_dtype, pre=plan.pre)
            del stored  # the copy of the old bytes goes before the new bytes are made: two layers' worth at most
            raw = rounded.astype(rounded.dtype.newbyteorder("<"), copy=False).tobytes()
            del rounded
        self.put_constant(layer, layer.node, 1, layer.weight, f"{layer.weight.name}_folded",
                          _NewValue(layer.weight.tensor, layer.weight.dims, raw))

        template = layer.bias.tensor if layer.bias is not None else layer.weight.tensor
        two_d = layer.bias is not None and len(layer.bias.dims) == 2
        bias = _NewValue(template, (1, layer.out_channels) if two_d else (layer.out_channels,),
                         _encode(plan.bias, FLOAT_TYPES[template.data_type]))
        base = f"{node.name or layer.weight.name}_bias_folded"
        if layer.kind == LayerKind.MATMUL and layer.add is not None:
            slot = 1 if scope.nodes[layer.add].input[0] == node.output[0] else 0
            self.put_constant(layer, layer.add, slot, layer.bias, base, bias)
        elif layer.kind == LayerKind.MATMUL and self.index.rank(scope, node.input[0]) != 2:
            self.add_bias_after(layer, base, bias)
            return None
        else:
            self.put_constant(layer, layer.node, 2, layer.bias, base, bias)
        if layer.kind == LayerKind.GEMM:
            for attr in node.attribute:
                if attr.name in ("alpha", "beta"):
                    attr.f = 1.0  # alpha is in the folded weight, beta in the folded C
        if layer.kind == LayerKind.MATMUL and layer.add is None:
            node.op_type = "Gemm"  # MatMul of a proven 2-D input + a bias: a Gemm with C
        return None

    def keep(self, plan: _LayerPlan) -> None:
        """A plan vetoed while writing: a copy's empty slots for its constants get the original values."""
        for ref in (plan.layer.weight, plan.layer.bias):
            if ref is not None and ref.name in self.slots and ref.node is None:
                self.slots.pop(ref.name).CopyFrom(ref.tensor)

    def remove_norms(self, choice: dict[tuple[int, int], Choice]) -> None:
        """Remove folded norms, wiring their readers to the right value: after a layer the layer's output (or
        the last value before the norm) takes the norm's output name; before a layer the layer reads the
        norm's input."""
        by_scope: dict[int, list[Choice]] = {}
        for direction, cand in choice.values():
            by_scope.setdefault(id(cand.norm.scope), []).append((direction, cand))
        for scope_id, items in by_scope.items():
            scope = self.scope_by_id[scope_id]
            ns = id(scope.namespace)
            producer = dict(scope.producer)
            # The Adds of constants folded with the norms: after a layer (its shift), after a norm folded backward.
            after_layers = {layer.node: layer for d, cand in items if d == "forward"
                            for layer in _Planner.layers_of(cand) if layer.shift is not None and layer.add is not None}
            shifts = {shift.add: shift for d, cand in items if d == "backward"
                      for shift in [self.shifts.get(cand.norm.key)] if shift is not None}
            forward = sorted([(c.norm.node, "norm") for d, c in items if d == "forward"]
                             + [(layer.add, "add") for layer in after_layers.values() if layer.add is not None])
            backward = sorted([(c.norm.node, "norm") for d, c in items if d == "backward"]
                              + [(add, "add") for add in shifts], reverse=True)
            removed = self.removed_nodes.setdefault(scope_id, set())
            gone = self.gone_values.setdefault(scope_id, set())
            reader: dict[str, int] = {}
            layer_of_add = {layer.add: layer for layer in after_layers.values()}
            norms: list[int] = []
            for index, what in forward:
                node = scope.nodes[index]
                if what == "add":  # layer -> Add(c) -> ...: the layer's output takes the Add's output name
                    layer = layer_of_add[index]
                    assert layer.shift is not None
                    x, y = scope.nodes[layer.node].output[0], node.output[0]
                    self.released.add((ns, layer.shift.name))
                else:
                    x, y = node.input[0], node.output[0]
                    norms.append(index)
                source, k = producer[x]
                scope.nodes[source].output[k] = y
                producer[y] = (source, k)
                gone.add(x)
                removed.add(index)
            for index, what in backward:
                node = scope.nodes[index]
                if what == "add":  # norm -> Add(c) -> ...: the Add's reader reads the Add's other input
                    constant = shifts[index].constant.name
                    x = next(name for name in node.input if name != constant)
                    self.released.add((ns, constant))
                else:
                    x = node.input[0]
                    norms.append(index)
                y = node.output[0]
                user = reader.get(y)
                if user is None:
                    user = scope.consumers[y][0]
                target = scope.nodes[user]
                target.input[list(target.input).index(y)] = x
                reader[x] = user
                gone.add(y)
                removed.add(index)
            for index in norms:
                bn = scope.nodes[index]
                gone.update(o for o in bn.output[1:] if o)
                self.released.update((id(scope.namespace), name) for name in bn.input[1:])

    def finish(self) -> None:
        """Remove the folded norms' nodes and the initializers, Constant nodes and value_info that nothing
        reads or names any more; insert the new Constant nodes of functions."""
        uses = self._count_uses()
        for scope in self.index.scopes:
            ns_uses = uses[id(scope.namespace)]
            released = {name for ns, name in self.released if ns == id(scope.namespace) and not ns_uses.get(name)}
            removed = self.removed_nodes.setdefault(id(scope), set())
            # From the end: an Identity that copied a constant for a folded node goes, then what it read if that
            # has no reader left (an Identity of an Identity, a Constant, an initializer).
            for i in range(len(scope.nodes) - 1, -1, -1):
                node = scope.nodes[i]
                if i in removed or node.domain not in DEFAULT_DOMAINS or not node.output \
                        or node.output[0] not in released:
                    continue
                if node.op_type == "Identity" and node.input and node.input[0]:
                    source = node.input[0]
                    ns_uses[source] -= 1
                    if not ns_uses[source]:
                        released.add(source)
                elif node.op_type != "Constant":
                    continue
                removed.add(i)
                self.gone_values.setdefault(id(scope), set()).add(node.output[0])
            self._rewrite_nodes(scope)
            gone = self.gone_values.get(id(scope), set())
            infos = scope.proto.value_info
            for i in range(len(infos) - 1, -1, -1):
                if infos[i].name in gone:
                    del infos[i]
            if isinstance(scope.proto, GraphProto):
                self._drop_initializers(scope, released & set(scope.initializers))

    def _count_uses(self) -> dict[int, dict[str, int]]:
        counts: dict[int, dict[str, int]] = {}
        for scope in self.index.scopes:
            c = counts.setdefault(id(scope.namespace), {})
            removed = self.removed_nodes.get(id(scope), set())
            for i, node in enumerate(scope.nodes):
                if i in removed:
                    continue
                for name in node.input:
                    c[name] = c.get(name, 0) + 1
            for name in scope.outputs:
                c[name] = c.get(name, 0) + 1
            for _, constant in self.node_inserts.get(id(scope), []):
                for name in constant.input:
                    c[name] = c.get(name, 0) + 1
        main = counts.setdefault(id(self.index.scopes[0].namespace), {})
        for info in self.model.training_info:
            for graph in (info.initialization, info.algorithm):
                for node in graph.node:
                    for name in node.input:
                        main[name] = main.get(name, 0) + 1
            for binding in list(info.initialization_binding) + list(info.update_binding):
                for name in (binding.key, binding.value):
                    main[name] = main.get(name, 0) + 1
        return counts

    def _rewrite_nodes(self, scope: Scope) -> None:
        removed = self.removed_nodes.get(id(scope), set())
        inserts = sorted(self.node_inserts.get(id(scope), []), key=lambda item: item[0])
        if not removed and not inserts:
            return
        nodes = scope.nodes
        before: dict[int, list[NodeProto]] = {}
        for position, constant in inserts:
            before.setdefault(position, []).append(constant)
        for i in range(len(nodes) - 1, -1, -1):  # from the end: earlier positions stay valid
            if i in removed:
                del nodes[i]
            for constant in reversed(before.get(i, [])):
                nodes.insert(i, constant)

    def _drop_initializers(self, scope: Scope, dead: set[str]) -> None:
        graph = scope.proto
        assert isinstance(graph, GraphProto)
        if not dead:
            return
        initializers = graph.initializer
        for i in range(len(initializers) - 1, -1, -1):
            if initializers[i].name in dead:
                del initializers[i]
        if scope.kind == "graph" and self.model.ir_version < 4:
            inputs = graph.input
            for i in range(len(inputs) - 1, -1, -1):
                if inputs[i].name in dead:
                    del inputs[i]


# -- the public entry points ----------------------------------------------------------------

def fuse(model: ModelProto | str | os.PathLike, *, inplace: bool = False) -> tuple[ModelProto, FusionReport]:
    """Fold every BatchNormalization that dataflow allows into its neighbouring Conv, ConvTranspose, Gemm or
    MatMul, in the main graph, every subgraph and every model-local function.

    Parameters
    ----------
    model : onnx.ModelProto or path
        The model. A path is read with its external data (the result holds that data in memory; save it
        with ``onnx.save(..., save_as_external_data=True)`` when it is over 2 GB).
    inplace : bool
        Fold ``model`` itself; otherwise a copy is folded and ``model`` is untouched.

    Returns
    -------
    (model, report)
        The folded model and a :class:`adapters.report.FusionReport` (norm and layer names are node names;
        nodes inside subgraphs and functions are prefixed with the node or function that holds them).

    Raises
    ------
    TypeError
        Something that is neither a ModelProto nor a path.
    ValueError
        An unreadable file, an invalid model, an opset outside 7..(newest onnx knows), a BatchNormalization
        whose parameters disagree with its layer or hold a negative variance, external data that is not
        loaded. The model is left unchanged.
    """
    source, loaded = _load(model)
    main_initializers = None if (inplace or loaded) else list(source.graph.initializer)
    _validate(source, list(source.graph.initializer))
    target = source if main_initializers is None else _copy_without_main_initializers(source)
    index = ModelIndex(target, main_initializers)
    analysis = find_candidates(index)
    planner = _Planner(analysis)
    while True:
        planner.reasons = {}
        choice = planner.choose()
        plans = planner.layer_plans(choice)
        overflowed = False
        for plan in plans:
            detail = _compute(plan, check_weight=not _veto_is_local(plan, analysis, choice))
            if detail is not None:
                planner.vetoed_layers[plan.layer.key] = ("overflow", detail)
                overflowed = True
        if not overflowed:
            break
    labels = {key: scope.label(node) for key, (scope, node) in analysis.all_norms.items()}
    labels.update((plan.layer.key, plan.layer.label) for plan in plans)
    writer = _Writer(index, main_initializers, analysis.shifts)
    written: list[_LayerPlan] = []
    with interrupts_held():
        writer.prepare(plans)
        for plan in plans:
            detail = writer.commit(plan)
            if detail is None:
                written.append(plan)
                continue
            for step in plan.steps:  # a local veto: this layer and its norms stay as they are
                planner.note(step.norm.key, "overflow", detail)
                choice.pop(step.norm.key, None)
        writer.remove_norms(choice)
        writer.finish()
    report = _report(analysis, planner, written, choice, labels)
    log.info("%s", report.summary())
    return target, report


def _veto_is_local(plan: _LayerPlan, analysis: Analysis, choice: dict[tuple[int, int], Choice]) -> bool:
    """Whether vetoing this plan could only leave its layer and its norms as they are: every norm folds after the
    layer, wholly into it, with no fold on its other side to fall back to."""
    for step in plan.steps:
        key = step.norm.key
        cand = choice[key][1]
        if step.direction != "forward" or not isinstance(cand, Forward) or len(cand.parts) != 1 \
                or key in analysis.backward:
            return False
    return True


def _report(analysis: Analysis, planner: _Planner, plans: list[_LayerPlan], choice: dict[tuple[int, int], Choice],
            labels: dict[tuple[int, int], str]) -> FusionReport:
    """The report; ``labels`` names every norm and layer by its key (taken before the nodes changed)."""
    report = FusionReport()
    for plan in plans:
        kind = _REFIMPL_KIND[plan.layer.kind]
        for step, change in zip(plan.steps, plan.changes, strict=True):
            report.folded.append(FoldedPair(norm=labels[step.norm.key], layer=labels[plan.layer.key],
                                            kind=fold_for(kind, _POSITION[step.direction]).kind,
                                            max_rel_change=change))
    for key in analysis.all_norms:
        report.norms_found += 1
        if key in choice:
            continue
        label = labels[key]
        if key in analysis.rejected:
            report.skipped.append(SkippedNorm(label, *analysis.rejected[key]))
            continue
        reasons = planner.reasons.get(key, []) + analysis.reasons.get(key, [])
        if reasons:
            report.skipped.append(SkippedNorm(label, *most_specific_reason(reasons)))
        else:
            report.skipped.append(SkippedNorm(label, "no_fusable_neighbour", "no foldable layer next to it"))
    return report


def fuse_bn(model: ModelProto | str | os.PathLike) -> ModelProto:
    """Drop-in style: a folded copy of ``model`` (the report goes to the ``adapters.onnx`` logger)."""
    folded, report = fuse(model)
    log.info("%s", report.table())
    return folded


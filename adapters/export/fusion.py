"""Folding BatchNorm in torch.export programs and FX graphs: plan, compute in float64, then rewrite.

1. **Plan** (dataflow only): for every BatchNorm node, a layer -> norm fold when the norm reads a
   conv/linear output that nothing else reads (chains: the output of a norm already planned into
   a layer counts as that layer's output), else a norm -> layer fold when the norm's output feeds
   only the input of a conv that pads nothing or a linear layer on a 2-D input (nearest norm
   first, chains likewise), else a reason (:data:`adapters.report.REASONS`). A norm the graph
   computes with batch statistics, or whose tensors -- or its layer's -- are user inputs, mutated
   buffers or computed values, is left.
2. **Compute**: every fold is refimpl's, in float64, rounded once to the parameter dtype, exactly as
   :func:`adapters.torch.fuse` does it (folds after a layer compose on a unit kernel and scale the
   weight once, block by block, through :func:`adapters.torch.precision.scaled_copy`), so the two
   adapters give bit-identical weights. A layer whose folded weight or bias overflows its dtype is
   left with its norms (reason ``overflow``). Every error that input can cause is raised here,
   before anything is modified.
3. **Rewrite**: a folded weight read by nothing else replaces the old value under the same name;
   one that other nodes read too (a weight shared by two convs, a conv called twice with two
   norms) gets a new parameter of its own, named so that it collides with nothing, and the
   original stays for the other readers. The norms' nodes go, and every parameter, buffer and
   signature entry nothing reads any more goes with them (a folded norm's ``num_batches_tracked``
   included); the result is a valid ExportedProgram (validated on construction), or the same
   GraphModule kind, recompiled.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram

from refimpl.layers import NORM_AFTER, NORM_BEFORE, fold_for

from ..report import FoldedPair, FusionReport, SkippedNorm, most_specific_reason
from ..torch.precision import round_once, rounds_to_finite, scaled_copy
from .graph import (
    LayerCall,
    NormCall,
    Program,
    bind,
    functional_calls,
    layer_call,
    module_path,
    norm_call,
    op_name,
    rank,
    set_argument,
)

__all__ = ["fuse"]

_AFTER, _BEFORE = NORM_AFTER, NORM_BEFORE


@dataclass
class _Step:
    norm: NormCall
    position: str
    order: int
    #: the norm's channels this layer produces, ``[start, stop)``, when the norm reads a concat of layers
    channels: tuple[int, int] | None = None
    concat: fx.Node | None = None
    #: the pad between the nearest norm before a layer and the layer (reflect, replicate, circular)
    through: fx.Node | None = None


@dataclass
class _Plan:
    layer: LayerCall
    weight_key: str
    weight: torch.Tensor
    bias_key: str | None
    bias: torch.Tensor | None
    steps: list[_Step] = field(default_factory=list)
    factor: torch.Tensor | None = None
    new_weight: torch.Tensor | None = None
    new_bias: torch.Tensor | None = None
    changes: list[float] = field(default_factory=list)


class _Planner:
    def __init__(self, program: Program):
        self.program = program
        self.norms = [call for node in program.graph.nodes if (call := norm_call(node)) is not None]
        self.plans: dict[fx.Node, _Plan] = {}
        self.reasons: dict[fx.Node, list[tuple[str, str]]] = {}
        self.planned: dict[fx.Node, _Plan] = {}  # norm node -> the plan it folds into
        self.through: fx.Node | None = None  # the copying pad the last _before found between norm and layer

    def note(self, norm: NormCall, code: str, detail: str) -> None:
        self.reasons.setdefault(norm.node, []).append((code, detail))

    def _norm_foldable(self, norm: NormCall) -> bool:
        name = module_path(norm.node)
        if norm.training:
            if norm.mean is None or norm.var is None:
                self.note(norm, "no_running_stats", f"{name} ({norm.node.name}) normalises with batch statistics "
                                                    "and has no running statistics")
            else:
                self.note(norm, "training_mode", f"{name} ({norm.node.name}) is computed with training=True")
            return False
        for what, node in (("running_mean", norm.mean), ("running_var", norm.var), ("weight", norm.weight),
                           ("bias", norm.bias)):
            if node is None and what in ("weight", "bias"):
                continue
            found = self.program.source(node)
            if isinstance(found, str):
                self.note(norm, "not_constant", f"{name}'s {what}: {found}")
                return False
            if not found[1].is_floating_point():
                self.note(norm, "unsupported_layer", f"{name}'s {what} has dtype {found[1].dtype}")
                return False
        if norm.value is None:
            self.note(norm, "no_fusable_neighbour", f"{name}'s normalised output is not read")
            return False
        if norm.extra:
            self.note(norm, "output_used_elsewhere", f"{name}'s other outputs are read by "
                                                     f"{', '.join(n.name for n in norm.extra)}")
            return False
        return True

    def _layer_plan(self, norm: NormCall, layer: LayerCall) -> _Plan | None:
        plan = self.plans.get(layer.node)
        if plan is not None:
            return plan
        name = module_path(layer.node)
        weight = self.program.source(layer.weight)
        if isinstance(weight, str):
            self.note(norm, "not_constant", f"the weight of {name} ({layer.node.name}): {weight}")
            return None
        bias: tuple[str, torch.Tensor] | None = None
        if layer.bias is not None:
            found = self.program.source(layer.bias)
            if isinstance(found, str):
                self.note(norm, "not_constant", f"the bias of {name} ({layer.node.name}): {found}")
                return None
            bias = found
        tensors = [weight[1]] + ([] if bias is None else [bias[1]])
        if not all(t.is_floating_point() for t in tensors):
            self.note(norm, "unsupported_layer", f"{name} ({layer.node.name}) has a weight of dtype "
                                                 f"{weight[1].dtype}")
            return None
        if bias is not None and bias[1].dim() != 1:
            self.note(norm, "not_per_channel", f"the bias of {name} ({layer.node.name}) has shape "
                                               f"{tuple(bias[1].shape)}, not one value per output channel")
            return None
        plan = _Plan(layer, weight[0], weight[1], None if bias is None else bias[0],
                     None if bias is None else bias[1])
        self.plans[layer.node] = plan
        return plan

    def _out_channels(self, layer: LayerCall) -> int | None:
        found = self.program.source(layer.weight)
        if isinstance(found, str) or found[1].dim() < 2:
            return None
        shape = found[1].shape
        return int(shape[1] * layer.groups) if layer.kind == "conv_transpose" else int(shape[0])

    def _concat(self, norm: NormCall, cat: fx.Node) -> list[tuple[_Plan, tuple[int, int]]] | None:
        """Slices of a norm that reads ``cat(layers, dim=1)``: one per layer, or None (with a reason)."""
        name = module_path(norm.node)
        bound = bind(cat)
        assert bound is not None
        parts, dim = bound.get("tensors"), bound.get("dim", 0)
        input_rank = rank(cat)
        if input_rank is not None and isinstance(dim, int) and dim < 0:
            dim += input_rank
        if dim != 1 or not isinstance(parts, (list, tuple)):
            self.note(norm, "no_fusable_neighbour", f"{name} reads {cat.name}, a concat along dim {dim}, not the "
                                                    "channels")
            return None
        if len(cat.users) != 1:
            self.note(norm, "output_used_elsewhere", f"the concat {cat.name} that {name} normalises is also read "
                                                     "elsewhere")
            return None
        layers = [layer_call(p) if isinstance(p, fx.Node) else None for p in parts]
        if any(layer is None for layer in layers) or len(set(parts)) != len(parts):
            self.note(norm, "no_fusable_neighbour", f"{name} reads the concat {cat.name}, whose inputs are not all "
                                                    "distinct conv/linear outputs")
            return None
        slices = []
        start = 0
        for part, layer in zip(parts, layers, strict=True):
            assert layer is not None
            if len(part.users) != 1:
                self.note(norm, "output_used_elsewhere", f"{part.name}, concatenated into {name}'s input, is also "
                                                         "read elsewhere")
                return None
            if layer.kind == "linear" and layer.input_rank != 2:
                self.note(norm, "rank_unknown" if layer.input_rank is None else "no_fusable_neighbour",
                          f"{module_path(layer.node)} in the concat before {name}: input not proven 2-D")
                return None
            channels = self._out_channels(layer)
            if channels is None:
                self.note(norm, "not_constant", f"the weight of {module_path(layer.node)} is not a constant")
                return None
            if layer.node in self.plans and self.plans[layer.node].steps:
                self.note(norm, "no_fusable_neighbour", f"{module_path(layer.node)} already folds another norm")
                return None
            plan = self._layer_plan(norm, layer)
            if plan is None:
                return None
            slices.append((plan, (start, start + channels)))
            start += channels
        return slices

    def _after(self, norm: NormCall, chain: dict[fx.Node, _Plan]) -> _Plan | None:
        producer = norm.input
        if not isinstance(producer, fx.Node):
            return None
        name = module_path(norm.node)
        if producer.op == "call_function" and op_name(producer.target) in ("aten::cat", "aten::concat"):
            slices = self._concat(norm, producer)
            if slices is None:
                return None
            for part_plan, channels in slices:
                part_plan.steps.append(_Step(norm, _AFTER, 0, channels, producer))
            self.planned[norm.node] = slices[0][0]
            return None
        plan = chain.get(producer)
        layer = plan.layer if plan is not None else layer_call(producer)
        if layer is None:
            self.note(norm, "no_fusable_neighbour", f"{name} reads {producer.name} "
                                                    f"({op_name(producer.target) or producer.op})")
            return None
        if len(producer.users) != 1:
            others = ", ".join(u.name for u in producer.users if u is not norm.node)
            self.note(norm, "output_used_elsewhere", f"{producer.name}, which {name} normalises, is also read by "
                                                     f"{others}")
            return None
        if layer.kind == "linear" and layer.input_rank != 2:
            if layer.input_rank is None:
                self.note(norm, "rank_unknown", f"{module_path(layer.node)} -> {name}: the graph does not prove "
                                                "the linear layer's input 2-D")
            else:
                self.note(norm, "no_fusable_neighbour", f"{module_path(layer.node)} -> {name}: the linear layer's "
                                                        f"input is {layer.input_rank}-D, so the norm's channels "
                                                        "(dim 1) are not its output features")
            return None
        return plan if plan is not None else self._layer_plan(norm, layer)

    def _before(self, norm: NormCall, chain: dict[fx.Node, tuple[_Plan, int]]) -> tuple[_Plan, int] | None:
        assert norm.value is not None
        name = module_path(norm.node)
        users = list(norm.value.users)
        if len(users) != 1:
            self.note(norm, "output_used_elsewhere", f"{name}'s output is read by "
                                                     f"{', '.join(u.name for u in users) or 'nothing'}")
            return None
        user = users[0]
        if user in chain:
            plan, order = chain[user]
            return plan, order + 1
        self.through = None
        padded = _copying_pad(user)
        if padded is not None:
            # A pad that copies its input's values (reflect, replicate, circular) passes on BN outputs only:
            # the conv after it folds the norm exactly (spec/folding.md, 4.1).
            self.through, user = user, padded
        layer = layer_call(user)
        reads = self.through if self.through is not None else norm.value
        if layer is None or layer.input is not reads or reads in (layer.weight, layer.bias):
            self.note(norm, "no_fusable_neighbour", f"{name}'s output feeds {user.name} "
                                                    f"({op_name(user.target) or user.op})")
            return None
        if layer.kind == "conv_transpose":
            self.note(norm, "transposed_after_bn", f"{name} feeds the transposed conv {module_path(layer.node)}")
            return None
        if layer.zero_padding:
            self.note(norm, "zero_padding", f"{name} feeds {module_path(layer.node)}, which zero-pads")
            return None
        if layer.kind == "linear" and layer.input_rank != 2:
            code = "rank_unknown" if layer.input_rank is None else "no_fusable_neighbour"
            self.note(norm, code, f"{name} -> {module_path(layer.node)}: the linear layer's input is "
                                  f"{'not proven 2-D' if layer.input_rank is None else f'{layer.input_rank}-D'}")
            return None
        new_plan = self._layer_plan(norm, layer)
        return None if new_plan is None else (new_plan, 0)

    def plan(self) -> None:
        foldable = [norm for norm in self.norms if self._norm_foldable(norm)]
        chain: dict[fx.Node, _Plan] = {}
        left: list[NormCall] = []
        for norm in foldable:  # graph order is a topological order
            plan = self._after(norm, chain)
            if plan is None:
                if norm.node not in self.planned:
                    left.append(norm)
                continue
            order = sum(1 for s in plan.steps if s.position == _AFTER)
            plan.steps.append(_Step(norm, _AFTER, order))
            assert norm.value is not None
            chain[norm.value] = plan
            self.planned[norm.node] = plan
        before: dict[fx.Node, tuple[_Plan, int]] = {}
        for norm in reversed(left):
            found = self._before(norm, before)
            if found is None:
                continue
            plan, order = found
            plan.steps.append(_Step(norm, _BEFORE, order))
            plan.steps[-1].through = self.through if order == 0 else None
            before[norm.node] = (plan, order)
            self.planned[norm.node] = plan
            self.reasons.pop(norm.node, None)
        for plan in self.plans.values():
            plan.steps.sort(key=lambda s: (s.position != _BEFORE, s.order))

    def veto(self, plan: _Plan, detail: str) -> None:
        """Leave the plan's layer and its norms; a norm split over a concat is left in every layer it spans."""
        norms = {step.norm.node for step in plan.steps}
        for step in plan.steps:
            self.planned.pop(step.norm.node, None)
            self.reasons[step.norm.node] = [("overflow", detail)]
        plan.steps = []
        for other in self.plans.values():
            if any(step.norm.node in norms for step in other.steps):
                self.veto(other, detail)


# --------------------------------------------------------------------------------------------------
# Compute


def _norm_tensors(program: Program, step: _Step) -> tuple[Any, Any, float, Any, Any]:
    norm = step.norm

    def value(node: Any) -> torch.Tensor | None:
        if node is None:
            return None
        found = program.source(node)
        assert not isinstance(found, str)
        tensor = found[1].detach()
        if step.channels is not None:
            tensor = tensor[step.channels[0]:step.channels[1]]
        return tensor.to(torch.float64)
    return value(norm.mean), value(norm.var), norm.eps, value(norm.weight), value(norm.bias)


def _fold_step(program: Program, plan: _Plan, step: _Step, w: torch.Tensor, b: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    layer = plan.layer
    args = _norm_tensors(program, step)
    try:
        fold = fold_for(layer.kind, step.position)
        return fold(w, b, *args, groups=layer.groups if fold.layer.spatial else 1)
    except (ValueError, TypeError) as error:
        layer_name, norm_name = module_path(layer.node), module_path(step.norm.node)
        order = f"{layer_name} -> {norm_name}" if step.position == _AFTER else f"{norm_name} -> {layer_name}"
        channels = tuple(args[1].shape) if args[1] is not None else ()
        raise type(error)(f"cannot fold {order} (node {layer.node.name} {layer.op}, weight "
                          f"{tuple(plan.weight.shape)}, groups={layer.groups}; BatchNorm node {step.norm.node.name} "
                          f"with statistics of shape {channels}): {error}") from error


def _unit_shape(plan: _Plan) -> tuple[int, ...]:
    weight = plan.weight
    tail = (1,) * (weight.dim() - 1)
    if plan.layer.kind == "conv_transpose":
        return tuple(weight.shape[:2]) + tail[1:]
    return (weight.shape[0],) + tail


def _slot_max_abs(weight: torch.Tensor, unit_shape: tuple[int, ...]) -> torch.Tensor:
    rows = 1
    for size in unit_shape:
        rows *= size
    flat = weight.detach().reshape(rows, -1)
    if flat.shape[1] == 0:
        return torch.zeros(unit_shape, dtype=torch.float64)
    return torch.maximum(flat.amax(dim=1), flat.amin(dim=1).neg()).to(torch.float64).reshape(unit_shape)


def _relative(change: float, scale: float) -> float:
    return change / scale if scale > 0 else (0.0 if change == 0 else float("inf"))


_COPYING_PADS = {f"aten::{kind}_pad{d}d" for kind in ("reflection", "replication") for d in (1, 2, 3)} | {
    "aten::_pad_circular"}


def _copying_pad(node: fx.Node) -> fx.Node | None:
    """The single reader of ``node`` when ``node`` pads by copying its input (reflect, replicate, circular),
    else None."""
    if node.op != "call_function":
        return None
    name = op_name(node.target)
    bound = bind(node) if name else None
    if bound is None:
        return None
    if name == "aten::pad":
        if bound.get("mode") not in ("reflect", "replicate", "circular"):
            return None
    elif name not in _COPYING_PADS:
        return None
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _compute(program: Program, plan: _Plan) -> str | None:
    """The plan's new bias, and its new weight or the factor that scales it; an overflow detail instead
    when they do not fit the dtype."""
    weight = plan.weight
    bias = None if plan.bias is None else plan.bias.detach().to(torch.float64)
    bias_dtype = weight.dtype if plan.bias is None else plan.bias.dtype
    if any(step.position == _BEFORE for step in plan.steps):
        w = weight.detach().to(torch.float64)
        for step in plan.steps:
            new_w, new_bias = _fold_step(program, plan, step, w, bias)
            scale = float(w.abs().max()) if w.numel() else 0.0
            change = float((new_w - w).abs().max()) if w.numel() else 0.0
            plan.changes.append(_relative(change, scale))
            w, bias = new_w, new_bias
        peak = float(w.abs().max()) if w.numel() else 0.0
        plan.new_weight = w
    else:
        unit_shape = _unit_shape(plan)
        factor = torch.ones(unit_shape, dtype=torch.float64, device=weight.device)
        slot_max = _slot_max_abs(weight, unit_shape).to(weight.device)
        weight_max = float(slot_max.max()) if slot_max.numel() else 0.0
        for step in plan.steps:
            new_factor, new_bias = _fold_step(program, plan, step, factor, bias)
            change = float((slot_max * (new_factor - factor).abs()).max()) if slot_max.numel() else 0.0
            plan.changes.append(_relative(change, weight_max))
            factor, bias = new_factor, new_bias
        peak = float((slot_max * factor.abs()).max()) if slot_max.numel() else 0.0
        plan.factor = factor
    assert bias is not None
    bias_peak = float(bias.abs().max()) if bias.numel() else 0.0
    if not rounds_to_finite(peak, weight.dtype) or not rounds_to_finite(bias_peak, bias_dtype):
        plan.factor = plan.new_weight = None
        return (f"folding into {module_path(plan.layer.node)} ({plan.layer.node.name}) gives weight/bias magnitudes "
                f"up to {max(peak, bias_peak):.3g}, beyond the largest finite {weight.dtype} "
                f"({torch.finfo(weight.dtype).max:.3g})")
    plan.new_bias = round_once(bias, bias_dtype)
    return None


# --------------------------------------------------------------------------------------------------
# Rewrite


def _only_reader(program: Program, source: fx.Node, layer: LayerCall) -> bool:
    """Whether ``layer`` alone reads the tensor behind ``source`` (directly or through its transpose)."""
    readers = set(source.users)
    if layer.transposed_weight is not None and layer.transposed_weight in readers:
        if set(layer.transposed_weight.users) != {layer.node}:
            return False
        readers.discard(layer.transposed_weight)
        readers.add(layer.node)
    if readers != {layer.node}:
        return False
    if source.op == "get_attr":
        return sum(1 for n in program.graph.nodes if n.op == "get_attr" and n.target == source.target) == 1
    return True


def _addmm_like(mm_target: Any) -> Any:
    """``aten.addmm`` in the dialect of ``mm_target`` (ATen or ExecuTorch's edge dialect)."""
    if type(mm_target).__name__ == "EdgeOpOverload":
        from executorch.exir.dialects._ops import ops as exir_ops
        return exir_ops.edge.aten.addmm.default
    return torch.ops.aten.addmm.default


def _new_weight(plan: _Plan) -> torch.Tensor:
    if plan.factor is not None:
        return scaled_copy(plan.weight.detach(), plan.factor)
    assert plan.new_weight is not None
    out = torch.empty_like(plan.weight, memory_format=torch.preserve_format)
    return out.copy_(round_once(plan.new_weight, plan.weight.dtype))


def _rewrite(program: Program, plan: _Plan) -> None:
    graph = program.graph
    layer = plan.layer
    node = layer.node
    weight_node = layer.weight
    assert isinstance(weight_node, fx.Node) and plan.new_bias is not None
    kind = program.kind(weight_node)
    requires_grad = bool(getattr(plan.weight, "requires_grad", False))
    new_weight = _new_weight(plan)
    plan.factor = plan.new_weight = None
    if _only_reader(program, weight_node, layer):
        program.replace_value(weight_node, new_weight)
        new_weight_node = weight_node
    else:
        key = program.unique_key(f"{plan.weight_key}_folded")
        new_weight_node = program.add_tensor(key, new_weight, kind, node, weight_node, requires_grad)
        if layer.transposed_weight is not None:
            transpose = layer.transposed_weight
            if set(transpose.users) == {node}:
                transpose.update_arg(0, new_weight_node)
            else:
                with graph.inserting_before(node):
                    copied = graph.node_copy(transpose, lambda n: new_weight_node if n is weight_node else n)
                set_argument(node, "mat2", copied)
        else:
            set_argument(node, "weight", new_weight_node)
    del new_weight

    bias_node = layer.bias
    if isinstance(bias_node, fx.Node) and _only_reader(program, bias_node, layer):
        program.replace_value(bias_node, plan.new_bias)
    else:
        if isinstance(bias_node, fx.Node):
            base = f"{plan.bias_key}_folded"
        else:
            owner = plan.weight_key.rpartition(".")[0]
            base = f"{owner}.bias" if owner else "bias"
        key = program.unique_key(base)
        like = bias_node if isinstance(bias_node, fx.Node) else weight_node
        new_bias_node = program.add_tensor(key, plan.new_bias, kind, node, like, requires_grad)
        if layer.op == "aten::mm":
            with graph.inserting_before(node):
                addmm = graph.call_function(_addmm_like(node.target), (new_bias_node, layer.input, node.args[1]))
            addmm.meta = copy.copy(node.meta)
            node.replace_all_uses_with(addmm)
            program.rename_output(node.name, addmm.name)
            graph.erase_node(node)
            node = addmm
        else:
            set_argument(node, "self" if layer.op == "aten::addmm" else "bias", new_bias_node)
    program.remove_if_unused(bias_node)
    program.remove_if_unused(weight_node)

    after = [s for s in plan.steps if s.position == _AFTER and s.concat is None]
    before = [s for s in plan.steps if s.position == _BEFORE]
    if after:
        last = after[-1].norm.value
        assert last is not None
        last.replace_all_uses_with(node)
        program.rename_output(last.name, node.name)
        for step in reversed(after):
            _erase_norm(program, step.norm)
    if before:
        source = before[-1].norm.input
        if before[0].through is not None:
            before[0].through.update_arg(0, source)
        else:
            set_argument(node, "mat1" if layer.op == "aten::addmm" else
                         ("self" if layer.op == "aten::mm" else "input"), source)
        for step in before:
            _erase_norm(program, step.norm)


def _erase_norm(program: Program, norm: NormCall) -> None:
    for node in norm.nodes:
        program.graph.erase_node(node)
    for source in (norm.weight, norm.bias, norm.mean, norm.var):
        program.remove_if_unused(source)


# --------------------------------------------------------------------------------------------------
# The entry point


def fuse(program: ExportedProgram | fx.GraphModule, *, inplace: bool = False
         ) -> tuple[ExportedProgram | fx.GraphModule, FusionReport]:
    """Fold every BatchNorm of an exported program or FX graph that folds exactly into a conv or linear layer.

    Parameters
    ----------
    program : ExportedProgram or torch.fx.GraphModule
        An ExportedProgram in any IR (the training IR of ``torch.export.export``, the inference IR
        of ``run_decompositions()``, ExecuTorch's edge dialect), or a GraphModule: ATen-level (an
        ExportedProgram's ``.module()``, ``make_fx``) or torch-level (``torch.fx.symbolic_trace``:
        calls of conv, linear and eval-mode BatchNorm modules are first rewritten as the functional
        calls their forwards make, so that each call folds on its own).
    inplace : bool
        Edit ``program`` itself. By default an ExportedProgram is copied (graph, signature and
        tables; the tensors no fold changes are shared with the original, as ``run_decompositions``
        shares them) and a GraphModule is deep-copied.

    Returns
    -------
    (ExportedProgram or GraphModule, FusionReport)
        The folded program, of the kind given, and what was folded or left and why.

    Raises
    ------
    TypeError
        ``program`` is neither an ExportedProgram nor a GraphModule.
    ValueError
        A fold is impossible on the values (a negative running variance, mismatched shapes): the
        message names the layer, the norm, the shapes and the values. Nothing has been modified.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> exported = torch.export.export(model, (torch.randn(1, 3, 8, 8),))
    >>> folded, report = fuse(exported)
    >>> [(p.norm, p.layer, p.kind) for p in report.folded]
    [('1', '0', 'conv->bn')]
    >>> sorted(folded.state_dict)
    ['0.bias', '0.weight']
    """
    module_norms: list[fx.Node] = []
    if isinstance(program, ExportedProgram):
        if inplace:
            target = Program.of(program)
        else:
            signature = copy.deepcopy(program.graph_signature)
            target = Program(_copy_graph_module(program.graph_module), state_dict=dict(program.state_dict),
                             constants=dict(program.constants), input_specs=signature.input_specs,
                             output_specs=signature.output_specs)
    elif isinstance(program, fx.GraphModule):
        target = Program(program if inplace else copy.deepcopy(program))
        module_norms = functional_calls(target.gm)
    else:
        raise TypeError(f"fuse: expected a torch.export.ExportedProgram or a torch.fx.GraphModule, got "
                        f"{type(program).__module__}.{type(program).__qualname__}")

    planner = _Planner(target)
    planner.plan()
    plans = [plan for plan in planner.plans.values() if plan.steps]
    for plan in plans:
        detail = _compute(target, plan)
        if detail is not None:
            planner.veto(plan, detail)
    plans = [plan for plan in plans if plan.steps]

    report = FusionReport(norms_found=len(planner.norms) + len(module_norms))
    for plan in plans:
        for step, change in zip(plan.steps, plan.changes, strict=True):
            report.folded.append(FoldedPair(module_path(step.norm.node), module_path(plan.layer.node),
                                            fold_for(plan.layer.kind, step.position).kind, change))
    for norm in planner.norms:
        if norm.node not in planner.planned:
            code, detail = most_specific_reason(planner.reasons.get(norm.node) or
                                                [("no_fusable_neighbour", "nothing foldable before or after it")])
            report.skipped.append(SkippedNorm(module_path(norm.node), code, detail))
    for node in module_norms:
        module = target.gm.get_submodule(str(node.target))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            code, detail = "training_mode", f"{node.target} ({type(module).__name__}) is in training mode"
        elif not getattr(module, "track_running_stats", True):
            code, detail = "no_running_stats", f"{node.target} has track_running_stats=False"
        else:
            code, detail = "unknown_norm", f"{node.target} is a {type(module).__qualname__} (hooks or a forward " \
                                           "not known)"
        report.skipped.append(SkippedNorm(str(node.target), code, detail))

    outputs_before = _output_names(target)
    released = torch.empty(0)
    concats: dict[fx.Node, _Step] = {}
    for plan in plans:
        _rewrite(target, plan)
        # The layer's old tensors go as soon as nothing in the program reads them: peak memory stays one layer.
        plan.weight, plan.bias, plan.new_bias = released, None, None
        concats.update({step.norm.node: step for step in plan.steps if step.concat is not None})
    for step in concats.values():  # a norm over a concat goes once every layer it spans has its slice
        assert step.norm.value is not None and step.concat is not None
        step.norm.value.replace_all_uses_with(step.concat)
        target.rename_output(step.norm.value.name, step.concat.name)
        _erase_norm(target, step.norm)
    target.remove_orphaned_buffers()
    target.graph.lint()
    target.gm.recompile()
    renamed = dict(zip(outputs_before, _output_names(target), strict=True))
    if not isinstance(program, ExportedProgram):
        target.gm.delete_all_unused_submodules()
        target.gm.recompile()
        return target.gm, report
    if inplace:
        _rename_call_graph(program.module_call_graph, renamed)
        program.validate()
        return program, report
    call_graph = copy.deepcopy(program.module_call_graph)
    _rename_call_graph(call_graph, renamed)
    folded = ExportedProgram(root=target.gm, graph=target.gm.graph, graph_signature=signature,
                             state_dict=target.state_dict, range_constraints=copy.deepcopy(program.range_constraints),
                             module_call_graph=call_graph, example_inputs=program.example_inputs,
                             constants=target.constants, verifiers=program.verifiers)
    return folded, report


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """``copy.deepcopy(gm)`` with every node's name kept: the copy renames nodes whose names are Python
    builtins (``input`` -> ``input_1``), and an ExportedProgram's signature names its nodes."""
    copied = copy.deepcopy(gm)
    for original, node in zip(gm.graph.nodes, copied.graph.nodes, strict=True):
        if node.name != original.name:
            node.name = original.name
            copied.graph._graph_namespace._rename_object(node, original.name)
    copied.recompile()
    return copied


def _output_names(program: Program) -> list[str]:
    output = next(n for n in program.graph.nodes if n.op == "output")
    return [a.name if isinstance(a, fx.Node) else "" for a in torch.utils._pytree.tree_leaves(output.args[0])]


def _rename_call_graph(call_graph: list, renamed: dict[str, str]) -> None:
    """Module call signatures name the program's outputs; a folded norm's output is now its layer's."""
    changes = {old: new for old, new in renamed.items() if old and old != new}
    if not changes:
        return
    from torch.export.graph_signature import TensorArgument
    for entry in call_graph:
        signature = entry.signature
        if signature is None:
            continue
        signature.outputs = [TensorArgument(name=changes[a.name]) if isinstance(a, TensorArgument)
                             and a.name in changes else a for a in signature.outputs]

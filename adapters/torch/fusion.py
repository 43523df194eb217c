"""Planning and applying folds, transactionally.

The pass runs in three stages:

1. **Analyse** (``graph``): trace, list every call site, and find for each norm call site the
   layer call it could fold into (conv/linear before it, or conv/linear after it), or the convs
   whose outputs a channel concat joins before it (each takes its slice of the norm's channels).
2. **Plan**: choose one fold per norm call site so that every module is treated the same at
   all its call sites (a conv folds only if each of its calls is followed by the same norms; a
   norm is removed only if every one of its calls is folded), then compute every new weight and
   bias in float64 on the parameters' device and round once to the parameter dtype.
3. **Apply**: swap the new tensors in and replace folded norms. Nothing is mutated before every
   new tensor exists, and an exception during the swap undoes it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import nn
from torch.nn.parameter import is_lazy

import refimpl
from refimpl.layers import fold_for

from ..interrupts import interrupts_held
from ..report import FoldedPair, FusionReport, SkippedNorm, most_specific_reason
from .graph import (
    CallSite,
    FoldCandidate,
    LayerKind,
    ModelIndex,
    NormPosition,
    SiteAnalysis,
    TraceResult,
    WeightNormed,
    analyse_sites,
    summarize_arguments,
    trace_regions,
)
from .norms import NormInfo, NormRejection, NormStats, norm_stats
from .precision import round_once, rounds_to_finite, rounds_to_odd, scaled_copy, scaled_copy_buffer_size
from .recorded import Recording, inspect_leaves, record
from .running import as_args, copy_model, describe_inputs, eval_mode, listed, meta_tensors

__all__ = ["fuse", "fuse_conv_bn", "FoldedNormAct"]

log = logging.getLogger("adapters.torch")


class FoldedNormAct(nn.Module):
    """What remains of a norm+activation layer (timm ``BatchNormAct2d``) once its norm is folded.

    Keeps the original ``drop`` and ``act`` children under the same names, so their state_dict
    keys and any activation parameters survive.
    """

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


# -- pre-checks ----------------------------------------------------------------------------

def _check_model(model: Any) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"cannot fuse a TorchScript module ({type(model).__name__}); fuse the eager nn.Module "
                        "before scripting it")
    if isinstance(model, torch.export.ExportedProgram):
        raise TypeError("fuse expects a torch.nn.Module, got an ExportedProgram; fold it with "
                        "adapters.export.fuse(program)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse expects a torch.nn.Module, got {type(model).__qualname__}")
    aten_norms = _aten_batch_norms(model)
    if aten_norms:
        raise TypeError("the model is an exported or ATen-level fx graph: its BatchNorms are "
                        f"operator calls ({listed(aten_norms)}), not modules; fold it with "
                        "adapters.export.fuse(graph_module)")
    lazy = []
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            raise TypeError(f"submodule '{name}' is a TorchScript module ({type(module).__name__}); fuse the eager "
                            "model before scripting it")
        for tensors in (module._parameters, module._buffers):
            for tname, tensor in tensors.items():
                if tensor is not None and is_lazy(tensor):
                    qualified = f"{name}.{tname}" if name else tname
                    lazy.append(f"{qualified} ({type(module).__name__})")
    if lazy:
        raise ValueError(f"lazy modules are not initialised; run one forward pass first. Uninitialised: "
                         f"{listed(lazy)}")
    meta = meta_tensors(model)
    if meta:
        raise ValueError(f"the model has tensors on the meta device (no values to fold); materialise it first. "
                         f"Meta tensors: {listed(meta)}")


def _aten_batch_norms(model: nn.Module) -> list[str]:
    """The nodes of an fx graph (``torch.export``'s ``.module()``, ``make_fx``) that call an ATen batch-norm
    operator: such a graph is ``adapters.export``'s to fold (its norms are no modules this adapter can replace)."""
    if not isinstance(model, torch.fx.GraphModule):
        return []
    return [node.name for node in model.graph.nodes
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and "batch_norm" in node.target.__name__]


#: The same input checks for other passes over a model (branch merging).
check_model = _check_model


# -- observation with example inputs --------------------------------------------------------

@dataclass
class _Observation:
    calls: dict[int, int]
    ranks: dict[int, set[int]]
    # The arguments every module that is not a leaf was called with, tensors summarised (graph.summarize_arguments).
    arguments: dict[int, list[tuple[tuple, dict]]]


def _observe(model: nn.Module, index: ModelIndex, example_inputs: Any) -> _Observation:
    """Run the model once in eval mode, counting calls and input ranks of every fold-relevant module.

    Training flags and running statistics are left exactly as they were: the run is in eval
    mode (no statistics update) under ``no_grad``, and every module's flag is restored.
    """
    if not isinstance(example_inputs, (torch.Tensor, tuple, list)):
        raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got "
                        f"{type(example_inputs).__qualname__}")
    args = as_args(example_inputs)
    calls: dict[int, int] = {}
    ranks: dict[int, set[int]] = {}
    arguments: dict[int, list[tuple[tuple, dict]]] = {}

    def count(module, inputs):
        key = id(module)
        calls[key] = calls.get(key, 0) + 1
        if inputs and isinstance(inputs[0], torch.Tensor):
            ranks.setdefault(key, set()).add(inputs[0].dim())

    def record(module, args, kwargs):
        arguments.setdefault(id(module), []).append(summarize_arguments(args, kwargs))

    handles = []
    try:
        for module in index.modules:
            if index.is_leaf(module):
                handles.append(module.register_forward_pre_hook(count))
            elif module is not model:
                handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
        with eval_mode(model), torch.no_grad():
            try:
                model(*args)
            except Exception as error:  # the user's model on the user's inputs: say which and what shapes
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise ValueError(f"fuse: running {type(model).__qualname__} on example_inputs "
                                 f"{describe_inputs(args)} raised {type(error).__name__}: {first_line}") from error
    finally:
        for handle in handles:
            handle.remove()
    return _Observation(calls, ranks, arguments)


#: The same observation for other passes over a model (branch merging).
observe = _observe


# -- planning -------------------------------------------------------------------------------

@dataclass
class _Step:
    norm: nn.Module
    info: NormInfo
    position: str   # a NormPosition: the norm runs after or before the layer
    order: int      # norms between this one and the layer
    channels: tuple[int, int] | None = None  # the norm's channel slice the layer produces (concat); None: all


@dataclass
class _LayerPlan:
    layer: Any  # the nn.Module conv, transposed conv or linear layer: its weight, bias, groups are read
    kind: str
    steps: list[_Step]
    target: torch.Tensor                 # the parameter the folds rewrite: the weight, or weight_norm's g
    normed: WeightNormed | None = None   # the layer's weight_norm, when ``target`` is its g
    weight: torch.Tensor | None = None   # the new ``target``, or None when ``factor`` scales it in place
    factor: torch.Tensor | None = None   # W' = W * factor, applied to the weight's own storage
    bias: torch.Tensor | None = None
    changes: list[float] | None = None


#: One norm call site's chosen fold: one candidate, or one per conv of a channel concat (kept or dropped
#: together); all of the same position.
_Choice = tuple[FoldCandidate, ...]
_SiteKey = tuple[int, Any]


class _Planner:
    """Chooses one fold per norm call site such that every module is treated alike at all its calls."""

    def __init__(self, index: ModelIndex, analysis: SiteAnalysis):
        self.index = index
        self.analysis = analysis
        self.reasons: dict[int, list[tuple[str, str]]] = {}
        self.vetoed_layers: dict[int, tuple[str, str]] = {}
        self.vetoed_norms: dict[int, tuple[str, str]] = {}

    def note(self, norm: nn.Module, code: str, detail: str) -> None:
        self.reasons.setdefault(id(norm), []).append((code, detail))

    def choose(self) -> dict[_SiteKey, _Choice]:
        """One fold per norm call site, consistent across every module's call sites.

        Each site starts with the fold into the layer it runs after (conv -> BN is preferred),
        falls back to the fold into the layer it runs before, then to nothing. The three rules
        below only ever move a site down that list, so the loop ends after at most two
        downgrades per site.
        """
        norm_sites = self._norm_sites()
        choice = self._first_choices(norm_sites)
        changed = True
        while changed:
            changed = self._drop_partly_folded_norms(choice, norm_sites)
            changed |= self._drop_broken_chains(choice)
            changed |= self._drop_inconsistent_layers(choice)
        return choice

    def _norm_sites(self) -> dict[int, list[CallSite]]:
        """The call sites of every foldable norm that is called in the traced graphs."""
        a = self.analysis
        return {module_id: a.sites[module_id] for module_id, verdict in self.index.norms.items()
                if isinstance(verdict, NormInfo) and module_id in a.sites}

    def _first_choices(self, norm_sites: dict[int, list[CallSite]]) -> dict[_SiteKey, _Choice]:
        choice: dict[_SiteKey, _Choice] = {}
        for sites in norm_sites.values():
            for site in sites:
                key = self.analysis.site_key(site)
                cands = self._first_allowed(key, (NormPosition.AFTER, NormPosition.BEFORE))
                if cands is not None:
                    choice[key] = cands
        return choice

    def _drop_partly_folded_norms(self, choice: dict[_SiteKey, _Choice], norm_sites: dict[int, list[CallSite]]
                                  ) -> bool:
        """A norm is removed only if every one of its calls folds: otherwise none of them does."""
        changed = False
        for sites in norm_sites.values():
            keys = [self.analysis.site_key(s) for s in sites]
            present = [k for k in keys if k in choice]
            if present and len(present) != len(keys):
                norm = sites[0].module
                self.note(norm, "reused_incompatibly", f"{self.index.name(norm)} is called at {len(keys)} "
                          f"sites but only {len(present)} of them can be folded")
                for k in present:
                    del choice[k]
                changed = True
        return changed

    def _drop_broken_chains(self, choice: dict[_SiteKey, _Choice]) -> bool:
        """Every norm between a norm and its layer (conv -> BN -> BN) must fold into that layer the same way."""
        changed = False
        for key in list(choice):
            cands = choice[key]
            cand = cands[0]
            region = cand.norm.region
            for node in cand.between:
                other = choice.get((id(region), node))
                if (other is None or other[0].position != cand.position
                        or [c.layer.node for c in other] != [c.layer.node for c in cands]):
                    norm = cand.norm.module
                    between = self.index.name(region.module(node))
                    self.note(norm, "no_fusable_neighbour", f"{between}, between "
                              f"{self.index.name(norm)} and {self.index.name(cand.layer.module)}, is not folded")
                    self._downgrade(choice, key)
                    changed = True
                    break
        return changed

    def _drop_inconsistent_layers(self, choice: dict[_SiteKey, _Choice]) -> bool:
        """A layer folds only if each of its calls gets the same folds (the same norms, in the same places)."""
        a = self.analysis
        per_site: dict[_SiteKey, list[tuple]] = {}
        for cands in choice.values():
            for cand in cands:
                per_site.setdefault(a.site_key(cand.layer), []).append(
                    (cand.position, len(cand.between), id(cand.norm.module), cand.channels or ()))
        changed = False
        layers_seen: set[int] = set()
        for layer in [c.layer.module for cands in list(choice.values()) for c in cands]:
            if id(layer) in layers_seen:
                continue
            layers_seen.add(id(layer))
            signatures = {tuple(sorted(per_site.get(a.site_key(s), []))) for s in a.sites[id(layer)]}
            if len(signatures) > 1:
                for k, cs in list(choice.items()):
                    if any(c.layer.module is layer for c in cs):
                        self.note(cs[0].norm.module, "reused_incompatibly", f"{self.index.name(layer)} is "
                                  f"called at {len(a.sites[id(layer)])} sites that are not all followed/preceded "
                                  "by the same norm layers")
                        self._downgrade(choice, k)
                changed = True
        return changed

    def _first_allowed(self, key: _SiteKey, positions: tuple[str, ...]) -> _Choice | None:
        """The site's candidates for the first of ``positions`` that no veto blocks (noting each veto met)."""
        a = self.analysis
        for position in positions:
            cands: _Choice | None
            if position == NormPosition.AFTER:
                cands = a.after.get(key)
            else:
                cands = (a.before[key],) if key in a.before else None
            if not cands:
                continue
            norm = cands[0].norm.module
            norm_veto = self.vetoed_norms.get(id(norm))
            if norm_veto is not None:
                self.note(norm, *norm_veto)
                return None
            layer_vetoes = [self.vetoed_layers[id(c.layer.module)] for c in cands
                            if id(c.layer.module) in self.vetoed_layers]
            if layer_vetoes:
                self.note(norm, *layer_vetoes[0])
                continue
            return cands
        return None

    def _downgrade(self, choice: dict[_SiteKey, _Choice], key: _SiteKey) -> None:
        """Drop the site's choice; a fold into the layer it runs after falls back to the one it runs before."""
        cands = choice.pop(key)
        if cands[0].position == NormPosition.AFTER:
            fallback = self._first_allowed(key, (NormPosition.BEFORE,))
            if fallback is not None:
                choice[key] = fallback

    def layer_plans(self, choice: dict[_SiteKey, _Choice]) -> list[_LayerPlan]:
        plans: dict[int, _LayerPlan] = {}
        seen_sites: set[_SiteKey] = set()
        for cand in [c for cands in choice.values() for c in cands]:
            layer = cand.layer.module
            site_key = self.analysis.site_key(cand.layer)
            plan = plans.get(id(layer))
            if plan is None:
                normed = self.index.weight_normed(layer)
                target = normed.magnitude if normed is not None else cast(torch.Tensor, layer.weight)
                kind = cast(str, self.index.layer(layer)[0])  # a candidate's layer is foldable
                plan = plans[id(layer)] = _LayerPlan(layer, kind, [], target, normed)
                seen_sites.add(site_key)
            elif site_key not in seen_sites:
                continue  # another call of the same layer: identical folds (checked), counted once
            info = cast(NormInfo, self.index.norms[id(cand.norm.module)])  # a candidate's norm is foldable
            plan.steps.append(_Step(cand.norm.module, info, cand.position, len(cand.between), cand.channels))
        for plan in plans.values():
            # Dataflow order: norms before the layer (nearest first), then norms after it (nearest first).
            plan.steps.sort(key=lambda s: (s.position != NormPosition.BEFORE, s.order))
        ordered = sorted(plans.values(), key=lambda p: self.index.name(p.layer))
        return ordered


def _fold_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; there the fold is computed in float32 (still one rounding to the parameter dtype).
    return torch.float32 if device.type == "mps" else torch.float64


def _fold_step(plan: _LayerPlan, step: _Step, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype,
               index: ModelIndex) -> tuple[torch.Tensor, torch.Tensor]:
    """One refimpl fold of ``step.norm`` into weight ``w`` / bias ``b`` (tensors in the fold dtype)."""
    layer = plan.layer
    stats = _step_stats(step)
    device = w.device

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=dtype)

    args = (cast(stats.mean), cast(stats.var), stats.eps, cast(stats.weight), cast(stats.bias))
    try:
        fold = fold_for(plan.kind, step.position)
        return fold(w, b, *args, groups=layer.groups if fold.layer.spatial else 1)
    except (ValueError, TypeError) as exc:
        layer_name, norm_name = index.name(layer), index.name(step.norm)
        after = step.position == NormPosition.AFTER
        order = f"{layer_name} -> {norm_name}" if after else f"{norm_name} -> {layer_name}"
        part = "" if step.channels is None else f" channels [{step.channels[0]}, {step.channels[1]})"
        raise type(exc)(f"cannot fold {order} ({type(layer).__name__} weight {tuple(layer.weight.shape)}, "
                        f"{type(step.norm).__name__}({step.info.num_features}){part}): {exc}") from exc


def _step_stats(step: _Step) -> NormStats:
    """The norm's statistics for the channels this step folds: all, or the slice a concat gives the layer."""
    stats = norm_stats(step.norm, step.info)
    if step.channels is None:
        return stats
    start, stop = step.channels

    def part(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[start:stop]

    return replace(stats, mean=stats.mean[start:stop], var=stats.var[start:stop], weight=part(stats.weight),
                   bias=part(stats.bias), num_features=stop - start)


def _unit_shape(plan: _LayerPlan) -> tuple[int, ...]:
    """Shape of the smallest kernel whose folds carry the per-slot factor of the layer's weight.

    Folds of norms after the layer scale a conv/linear weight per output channel (axis 0) and a
    transposed conv weight per (input channel, output channel in group) pair (axes 0 and 1). A
    weight_norm's g has exactly that shape already (a transposed conv's: ``[1, out, 1, ...]``).
    """
    weight = plan.target
    tail = (1,) * (weight.dim() - 1)
    if plan.kind == LayerKind.CONV_TRANSPOSE:
        return tuple(weight.shape[:2]) + tail[1:]
    return (weight.shape[0],) + tail


_SLOT_MAX_BLOCK = 1 << 18


def _slot_max_abs(weight: torch.Tensor, unit_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """max |W| over each slot of ``unit_shape`` (the positions one factor entry scales), shaped like it."""
    rows = 1
    for d in unit_shape:
        rows *= d
    weight = weight.detach()
    if weight.dtype in (torch.float16, torch.bfloat16):
        # CPU reductions over fp16/bf16 are slow; their magnitudes order like their bit patterns
        # with the sign bit cleared (NaN above inf), so one integer pass and one integer max suffice.
        bits = weight.view(torch.int16).reshape(rows, -1)
        # A block of rows at a time through one scratch tensor: no full-size copy, no allocation per block.
        step = max(1, _SLOT_MAX_BLOCK // max(1, bits.shape[1]))
        scratch = torch.empty((min(step, rows), bits.shape[1]), dtype=torch.int16, device=weight.device)
        largest = torch.empty(rows, dtype=torch.int16, device=weight.device)
        for start in range(0, rows, step):
            block = bits[start:start + step]
            magnitude = torch.bitwise_and(block, 0x7FFF, out=scratch[:block.shape[0]])
            torch.amax(magnitude, dim=1, out=largest[start:start + step])
        return largest.view(weight.dtype).to(dtype).reshape(unit_shape)
    flat = weight.reshape(rows, -1)
    # amax and amin separately: torch.aminmax along a dim is several times slower on CPU.
    return torch.maximum(flat.amax(dim=1), flat.amin(dim=1).neg()).to(dtype).reshape(unit_shape)


def _slot_max_abs_of_computed(weight: torch.Tensor, unit_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """max |W| over each slot of ``unit_shape`` for a weight of another shape (a weight_norm's computed
    weight, whose g holds one entry per slot): the maximum over every axis where the slot is 1 wide."""
    axes = [d for d, size in enumerate(unit_shape) if size == 1]
    magnitude = weight.detach().abs()
    return (magnitude.amax(dim=axes, keepdim=True) if axes else magnitude).to(dtype)


def _batched_folds(plans: list[_LayerPlan]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """refimpl's fold for many layers in one call: ``{id(plan): (factor per output channel, bias)}``.

    The common case -- one norm after a conv or linear layer -- needs only the fold of a unit
    kernel per layer (see :func:`_compute`). Those unit kernels, biases and statistics are
    concatenated per (device, eps) and folded by a single ``refimpl.fold_conv_bn`` call:
    per-call overhead (validation, namespace lookup, dtype casts) dominates for small layers.
    Absent affine parameters and biases become ones and zeros, which gives the same values.
    A group that refimpl rejects is left to the per-layer path, whose error names the layer.
    """
    groups: dict[tuple, list[tuple[_LayerPlan, Any]]] = {}
    for plan in plans:
        if (len(plan.steps) != 1 or plan.steps[0].position != NormPosition.AFTER
                or plan.kind == LayerKind.CONV_TRANSPOSE):
            continue
        step = plan.steps[0]
        stats = _step_stats(step)
        device = plan.target.device
        if stats.var.device != device or stats.var.numel() != plan.target.shape[0]:
            continue
        groups.setdefault((device, stats.eps), []).append((plan, stats))
    folded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for (device, eps), members in groups.items():
        for batch in _channel_batches(members):
            if len(batch) > 1:
                folded.update(_fold_batch(batch, device, eps))
    return folded


_BATCH_CHANNELS = 1 << 14  # channels per batched fold: large enough to amortise calls, small enough for memory


def _channel_batches(members: list[tuple[_LayerPlan, Any]]) -> list[list[tuple[_LayerPlan, Any]]]:
    """``members`` in consecutive batches of at most ``_BATCH_CHANNELS`` channels (a wider layer alone)."""
    batches: list[list[tuple[_LayerPlan, Any]]] = [[]]
    width = 0
    for member in members:
        channels = member[1].var.numel()
        if batches[-1] and width + channels > _BATCH_CHANNELS:
            batches.append([])
            width = 0
        batches[-1].append(member)
        width += channels
    return batches


def _fold_batch(members: list[tuple[_LayerPlan, Any]], device: torch.device, eps: float
                ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """One ``refimpl.fold_conv_bn`` call for the unit kernels of several layers (see :func:`_batched_folds`)."""
    dtype = _fold_dtype(device)
    sizes = [stats.var.numel() for _, stats in members]
    # Absent parameters as views of one ones / zeros vector; cat promotes mixed float dtypes to the widest,
    # and widening to the fold dtype is exact.
    ones = torch.ones(max(sizes), dtype=dtype, device=device)
    zeros = torch.zeros(max(sizes), dtype=dtype, device=device)

    def cat(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts).to(dtype)

    try:
        factor, bias = refimpl.fold_conv_bn(
            torch.ones((sum(sizes), 1), dtype=dtype, device=device),
            cat([zeros[:n] if p.layer.bias is None else p.layer.bias.detach()
                 for n, (p, _) in zip(sizes, members, strict=True)]),
            cat([s.mean for _, s in members]), cat([s.var for _, s in members]), eps,
            cat([ones[:n] if s.weight is None else s.weight for n, (_, s) in zip(sizes, members, strict=True)]),
            cat([zeros[:n] if s.bias is None else s.bias for n, (_, s) in zip(sizes, members, strict=True)]))
    except (ValueError, TypeError):
        return {}  # left to the per-layer path, whose error names the layer
    return {id(plan): (f, b) for (plan, _), f, b in zip(members, factor.split(sizes), bias.split(sizes), strict=True)}


def _relative(change: float, scale: float) -> float:
    return change / scale if scale > 0 else (0.0 if change == 0 else float("inf"))


def _compute(plan: _LayerPlan, index: ModelIndex,
             folded: tuple[torch.Tensor, torch.Tensor] | None = None) -> str | None:
    """Compute the layer's new bias and its new weight, or the factor that :func:`_apply` scales the
    weight by. Returns an overflow detail instead when they do not fit.

    Every fold step is refimpl's, in float64 (float32 on devices without it), rounded once to
    the parameter dtype. Folds of norms *after* the layer scale the weight per (axis-0, axis-1)
    slot and leave the bias independent of the weight, so they are composed on a unit kernel
    (:func:`_unit_shape`): refimpl returns the combined factor ``S`` in the weight's
    layout and the new bias, and ``W' = W * S`` is then one float64 multiply rounded once into
    the parameter dtype, with no full-size temporaries for the intermediate steps or for the
    change measure (which uses per-slot maxima), which is what keeps large models fast. Folds of
    norms *before* the layer add ``W @ t`` to the bias, so they run on the full weight.
    """
    layer = plan.layer
    weight = plan.target
    dtype = _fold_dtype(weight.device)
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    bias_dtype = weight.dtype if layer.bias is None else layer.bias.dtype
    layer_name = index.name(layer)
    changes: list[float] = []
    finfo = torch.finfo(weight.dtype)
    if any(step.position == NormPosition.BEFORE for step in plan.steps):
        w = weight.detach().to(dtype)
        for step in plan.steps:
            new_w, new_bias = _fold_step(plan, step, w, bias, dtype, index)
            scale = float(w.abs().max()) if w.numel() else 0.0
            change = float((new_w - w).abs().max()) if w.numel() else 0.0
            changes.append(_relative(change, scale))
            w, bias = new_w, new_bias
        peak = float(w.abs().max()) if w.numel() else 0.0
        new_weight = torch.empty_like(weight, memory_format=torch.preserve_format).copy_(round_once(w, weight.dtype))
    else:
        unit_shape = _unit_shape(plan)
        factor = torch.ones(unit_shape, dtype=dtype, device=weight.device)
        if plan.normed is None:
            slot_max = _slot_max_abs(weight, unit_shape, dtype)
        else:
            # The changes and the overflow test concern the weight the layer computes, g * v / ||v||.
            slot_max = _slot_max_abs_of_computed(plan.normed.weight(layer), unit_shape, dtype)
        weight_max = float(slot_max.max()) if slot_max.numel() else 0.0
        for step in plan.steps:
            if folded is not None:  # computed by refimpl together with other layers' folds
                new_factor, new_bias = folded[0].reshape(unit_shape), folded[1]
            else:
                new_factor, new_bias = _fold_step(plan, step, factor, bias, dtype, index)
            # max |W'_k - W_k| over the weight is max over slots of max|W_slot| * |S'_k - S_k|.
            change = float((slot_max * (new_factor - factor).abs()).max()) if slot_max.numel() else 0.0
            changes.append(_relative(change, weight_max))
            factor, bias = new_factor, new_bias
        # Rounding is monotone, so the slot maxima times |S| decide whether any element overflows.
        peak = float((slot_max * factor.abs()).max()) if slot_max.numel() else 0.0
        if plan.normed is not None and weight.numel():
            peak = max(peak, float((weight.detach().to(dtype).abs() * factor.abs()).max()))  # g' itself
        new_weight = None
        plan.factor = factor
    assert bias is not None  # every plan has a step, and every fold returns a bias
    bias_peak = float(bias.abs().max()) if bias.numel() else 0.0
    if not rounds_to_finite(peak, weight.dtype) or not rounds_to_finite(bias_peak, bias_dtype):
        plan.factor = None
        largest = max(peak, bias_peak)
        return (f"folding into {layer_name} gives weight/bias magnitudes up to {largest:.3g}, beyond the largest "
                f"finite {weight.dtype} ({finfo.max:.3g})")
    plan.weight = new_weight
    plan.bias = round_once(bias, bias_dtype)
    plan.changes = changes
    return None


def _owns_storage(tensor: torch.Tensor, storage_users: dict[int, int]) -> bool:
    """Whether ``tensor`` alone uses its storage within the model (so rewriting it in place is invisible elsewhere)."""
    storage = tensor.untyped_storage()
    return (storage_users.get(storage.data_ptr(), 0) == 1
            and storage.nbytes() == tensor.numel() * tensor.element_size())


def _work_buffers(plans: list[_LayerPlan]) -> dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]]:
    """Per device, the float64 buffer the in-place scaling runs through (and an int64 scratch where fp16/bf16
    weights are rounded to odd), sized to a small share of the weights they scale."""
    weight_bytes: dict[torch.device, int] = {}
    odd: dict[torch.device, bool] = {}
    fold_dtype: dict[torch.device, torch.dtype] = {}
    for plan in plans:
        device = plan.target.device
        weight_bytes[device] = weight_bytes.get(device, 0) + plan.target.numel() * plan.target.element_size()
        odd[device] = odd.get(device, False) or rounds_to_odd(plan.target.dtype)
        fold_dtype[device] = cast(torch.Tensor, plan.factor).dtype
    buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for device, total in weight_bytes.items():
        elements = scaled_copy_buffer_size(total, odd[device])
        scratch = torch.empty(elements, dtype=torch.int64, device=device) if odd[device] else None
        buffers[device] = (torch.empty(elements, dtype=fold_dtype[device], device=device), scratch)
    return buffers


def _apply(plans: list[_LayerPlan], folded_norms: list[nn.Module], index: ModelIndex) -> None:
    """Swap new tensors in and replace folded norms.

    Everything that can fail for an ordinary reason happens first, without touching the model:
    replacement modules and bias parameters are built, and a weight whose storage is shared
    with another tensor of the model gets a new tensor (``scaled_copy``). Then the weights are
    scaled in place, ``W <- W * S`` through a small float64 buffer: rewriting the weight's own
    storage avoids faulting in fresh pages for a second copy of every weight, which costs more
    than the arithmetic. That loop only does arithmetic on validated tensors, with keyboard
    interrupts held back; the pointer swaps after it are undone if anything raises.
    """
    storage_users: dict[int, int] = {}
    tensors = [t for m in index.modules for t in list(m._parameters.values()) + list(m._buffers.values())
               if t is not None]
    for tensor in tensors:  # per registration: a tied parameter counts once per module holding it
        key = tensor.untyped_storage().data_ptr()
        storage_users[key] = storage_users.get(key, 0) + 1
    in_place: list[_LayerPlan] = []
    for plan in plans:
        if plan.factor is None:
            continue
        weight = plan.target.detach()
        if _owns_storage(weight, storage_users):
            in_place.append(plan)
        else:
            plan.weight = scaled_copy(weight, plan.factor)
    replacements = []
    for norm in folded_norms:
        verdict = cast(NormInfo, index.norms[id(norm)])  # folded, so recognised
        replacement: nn.Module = (FoldedNormAct(cast(nn.Module, norm.drop), cast(nn.Module, norm.act))
                                  if verdict.has_act else nn.Identity())
        replacement.training = norm.training
        replacements.append((norm, replacement))
    new_biases = {id(plan): nn.Parameter(cast(torch.Tensor, plan.bias), requires_grad=plan.target.requires_grad)
                  for plan in plans if plan.layer.bias is None}
    buffers = _work_buffers(in_place)

    with interrupts_held():
        with torch.no_grad():
            for plan in in_place:
                weight = plan.target.detach()
                buffer, scratch = buffers[weight.device]
                scaled_copy(weight, cast(torch.Tensor, plan.factor), out=weight, buffer=buffer, scratch=scratch)

    undo: list = []
    try:
        for plan in plans:
            layer = plan.layer
            old_weight = plan.target
            if plan.weight is not None:
                # Assigning .data keeps the Parameter object (optimisers and hooks that hold it stay
                # valid) and its requires_grad.
                undo.append(("data", old_weight, old_weight.data))
                old_weight.data = plan.weight
            if layer.bias is not None:
                undo.append(("data", layer.bias, layer.bias.data))
                layer.bias.data = plan.bias
            else:
                undo.append(("bias", layer, None))
                layer.bias = new_biases[id(plan)]
            if plan.normed is not None and plan.normed.hook is not None:
                # torch.nn.utils.weight_norm keeps the weight it last computed as an attribute.
                name = plan.normed.hook.name
                undo.append(("attribute", layer, (name, getattr(layer, name))))
                plan.normed.refresh(layer)
        for norm, replacement in replacements:
            for parent, attr in index.registrations.get(id(norm), []):
                undo.append(("module", parent, (attr, parent._modules[attr])))
                parent._modules[attr] = replacement
    except BaseException:
        for action, target, value in reversed(undo):
            if action == "data":
                target.data = value
            elif action == "bias":
                target._parameters["bias"] = None
            elif action == "attribute":
                setattr(target, *value)
            else:
                attr, module = value
                target._modules[attr] = module
        raise


# -- the public entry points ----------------------------------------------------------------

def fuse(model: nn.Module, *, inplace: bool = False,
         example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None) -> tuple[nn.Module, FusionReport]:
    """Fold every BatchNorm that dataflow allows into its neighbouring conv/linear layer.

    Parameters
    ----------
    model : nn.Module
        The model. Its classes and attribute names are kept; folded norms become ``nn.Identity``
        (norm+activation layers keep their ``drop`` and ``act``).
    inplace : bool
        Fold into ``model`` itself; otherwise a deep copy is folded and ``model`` is untouched.
        In place, a folded weight is rewritten in its own storage when no other tensor of the
        model shares that storage (tensors outside the model that view it see the new values).
    example_inputs : tensor or tuple of tensors, optional
        Inputs for one eval-mode forward pass of the original: proves the rank of Linear /
        BatchNorm1d inputs and confirms that every fold-relevant module is called only where
        the traced graphs say (calls hidden in untraceable code block the fold).

    Returns
    -------
    (model, report)
        The fused model (``model`` itself when ``inplace``) and a :class:`FusionReport`.

    Raises
    ------
    TypeError
        TorchScript modules, or something that is not an ``nn.Module``.
    ValueError
        Lazy (uninitialised) or meta tensors; a norm whose width does not match its layer, or
        whose running variance is negative or not finite. The model is left unchanged.
    """
    _check_model(model)
    if not inplace:
        model = copy_model(model)
    with _gc_paused():
        return _fuse(model, example_inputs)


@contextlib.contextmanager
def _gc_paused():
    """Pause Python's cyclic garbage collector while fusing.

    Tracing allocates many small objects, which triggers full collections that walk every live
    object of the process -- with a few model copies alive, most of the fusion time. Nothing
    here creates garbage cycles worth collecting early; the previous state is restored.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _fuse(model: nn.Module, example_inputs: Any) -> tuple[nn.Module, FusionReport]:
    index = ModelIndex(model)
    # With example inputs, the dataflow is the graph of the real run (recorded.py); without them, or for a model
    # that is itself a single layer, the symbolic trace.
    recording = record(model, index, example_inputs) if example_inputs is not None else None
    calls: dict[int, int] | None = None
    if recording is not None:
        inspect_leaves(recording, index)
        # Submodules the run never called (the other side of a branch) are analysed from their symbolic trace.
        uncalled = _uncalled_subtrees(model, index, recording.calls)
        if uncalled:
            with eval_mode(model):
                traced = trace_regions(model, index, uncalled)
        else:
            traced = TraceResult(regions=[])
        traced.regions.insert(0, recording.region)
        analysis = analyse_sites(index, traced.regions, recording.ranks)
        calls = recording.calls
    else:
        observation = _observe(model, index, example_inputs) if example_inputs is not None else None
        # Trace in eval mode: folding assumes eval semantics, and modules that branch on
        # self.training (stochastic depth, ...) must show their eval-mode dataflow.
        with eval_mode(model):
            traced = trace_regions(model, index)
        analysis = analyse_sites(index, traced.regions, observation.ranks if observation else None)
        calls = observation.calls if observation else None

    planner = _Planner(index, analysis)
    _veto_unshareable_layers(planner, index, analysis)
    if calls is not None:
        _veto_hidden_calls(planner, index, analysis, calls)

    while True:
        planner.reasons = {}
        choice = planner.choose()
        plans = planner.layer_plans(choice)
        overflowed = False
        batched = _batched_folds(plans)
        for plan in plans:
            detail = _compute(plan, index, batched.get(id(plan)))
            if detail is not None:
                planner.vetoed_layers[id(plan.layer)] = ("overflow", detail)
                overflowed = True
        if not overflowed:
            break

    folded_norm_ids = {id(cands[0].norm.module) for cands in choice.values()}
    folded_norms = [m for m in index.modules if id(m) in folded_norm_ids]
    _apply(plans, folded_norms, index)

    notes = _specialised_notes(recording, index, choice) if recording is not None else {}
    report = _build_report(model, index, traced, analysis, planner, plans, folded_norm_ids, notes,
                           recording is not None)
    if report.training_mode:
        log.warning("the model is in training mode; BatchNorm was folded with eval semantics (running statistics)")
    log.info("%s", report.summary())
    return model, report


def _veto_unshareable_layers(planner: _Planner, index: ModelIndex, analysis: SiteAnalysis) -> None:
    for layer_id, where in analysis.weight_reads.items():
        planner.vetoed_layers[layer_id] = ("reused_incompatibly", f"a parameter of the layer is read directly at "
                                           f"{where}; folding would change that use")
    for cand in [c for cands in analysis.after.values() for c in cands] + list(analysis.before.values()):
        layer = cand.layer.module
        if id(layer) not in planner.vetoed_layers and index.shares_parameters(layer):
            planner.vetoed_layers[id(layer)] = ("reused_incompatibly", f"{index.name(layer)} shares a parameter "
                                                "with another module (tied weights)")


def _uncalled_subtrees(model: nn.Module, index: ModelIndex, calls: dict[int, int]) -> list[tuple[str, nn.Module]]:
    """The largest submodules holding a norm of which the recorded run called nothing (the other side of a
    branch). Containers the code iterates over instead of calling (``for layer in self.layers``) are not among
    them when it called some of their children."""
    holds_norm: dict[int, bool] = {}
    ran: dict[int, bool] = {}

    def has_norm(module: nn.Module) -> bool:
        key = id(module)
        if key not in holds_norm:
            holds_norm[key] = key in index.norms or any(has_norm(c) for c in module._modules.values()
                                                        if c is not None)
        return holds_norm[key]

    def any_called(module: nn.Module) -> bool:
        key = id(module)
        if key not in ran:
            ran[key] = bool(calls.get(key)) or any(any_called(c) for c in module._modules.values() if c is not None)
        return ran[key]

    found: list[tuple[str, nn.Module]] = []
    stack = [("", model)]
    while stack:
        prefix, module = stack.pop()
        for name, child in module._modules.items():
            if child is None or index.is_leaf(child):
                continue
            qualified = f"{prefix}.{name}" if prefix else name
            if any_called(child):
                stack.append((qualified, child))
            elif has_norm(child):
                found.append((qualified, child))
    return found


def _specialised_notes(recording: Recording, index: ModelIndex, choice: dict[_SiteKey, _Choice]
                       ) -> dict[tuple[int, int], str]:
    """Per (norm id, layer id) folded, why its pairing rests on the recorded path (see Recording.specialised)."""
    notes: dict[tuple[int, int], str] = {}
    for cands in choice.values():
        norm_site = cands[0].norm
        nodes = [norm_site.node, *[c.layer.node for c in cands], *cands[0].between]
        why = recording.specialised(nodes, index)
        info = index.norms.get(id(norm_site.module))
        if not why and isinstance(info, NormInfo) and info.observed:
            why = f"the map of {index.name(norm_site.module)} comes from a forward that read its input's shape or value"
        for cand in cands:
            layer = cand.layer.module
            text = why
            if not text and index.padded.get(id(layer)):
                text = f"{index.name(layer)} ({type(layer).__qualname__}) read its input's shape in its forward"
            key = (id(norm_site.module), id(layer))
            if text and not notes.get(key):
                notes[key] = "rests on the recorded path: " + text
            else:
                notes.setdefault(key, text)
    return notes


def _veto_hidden_calls(planner: _Planner, index: ModelIndex, analysis: SiteAnalysis, calls: dict[int, int]) -> None:
    leaves = {id(m) for m in index.modules if index.is_leaf(m)}
    for module_id, count in calls.items():
        traced = len(analysis.sites.get(module_id, ()))
        if count > traced and module_id in leaves:
            name = index.name_of.get(module_id, "?")
            veto = ("untraceable", f"{name} ran {count} time(s) with example_inputs but the traced graphs show "
                    f"{traced} call site(s); calls in untraced code may see a different fold")
            if isinstance(index.norms.get(module_id), NormInfo):
                planner.vetoed_norms[module_id] = veto
            else:
                planner.vetoed_layers[module_id] = veto


def _under(name: str, prefixes: dict[str, str]) -> str | None:
    """The longest proper ancestor (or the name itself) of ``name`` found in ``prefixes``."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        candidate = ".".join(parts[:i])
        if candidate in prefixes:
            return candidate
    return None


def _build_report(model, index, traced, analysis, planner, plans, folded_norm_ids, notes, recorded=False
                  ) -> FusionReport:
    report = FusionReport()
    norm_modules = [m for m in index.modules if id(m) in index.norms]
    report.norms_found = len(norm_modules)
    report.training_mode = bool(model.training or any(m.training for m in norm_modules))
    for plan in plans:
        for step, change in zip(plan.steps, plan.changes, strict=True):
            report.folded.append(FoldedPair(norm=index.name(step.norm), layer=index.name(plan.layer),
                                            kind=fold_for(plan.kind, step.position).kind, max_rel_change=change,
                                            note=notes.get((id(step.norm), id(plan.layer)), "")))
    for norm in norm_modules:
        if id(norm) in folded_norm_ids:
            continue
        name = index.name(norm)
        verdict = index.norms[id(norm)]
        if isinstance(verdict, NormRejection):
            report.skipped.append(SkippedNorm(name, verdict.reason, verdict.detail))
            continue
        reasons = planner.reasons.get(id(norm), []) + analysis.reasons.get(id(norm), [])
        if id(norm) in planner.vetoed_norms:
            reasons.append(planner.vetoed_norms[id(norm)])
        if reasons:
            report.skipped.append(SkippedNorm(name, *most_specific_reason(reasons)))
            continue
        if id(norm) not in analysis.sites:
            opaque = _under(name, traced.opaque)
            if opaque is not None:
                report.skipped.append(SkippedNorm(name, "unsupported_layer", f"it sits inside {opaque} "
                                                  f"({traced.opaque[opaque]}), a layer treated as opaque"))
                continue
            failed = _under(name, traced.failures)
            if failed is not None:
                report.skipped.append(SkippedNorm(name, "untraceable", f"'{failed or '<model>'}' could not be "
                                                  f"traced ({traced.failures[failed]})"))
                continue
            never = ("the model never calls it on example_inputs (nor does a traced forward of the submodule "
                     "holding it)") if recorded else "it is never called in the traced forward"
            report.skipped.append(SkippedNorm(name, "no_fusable_neighbour", never))
            continue
        report.skipped.append(SkippedNorm(name, "no_fusable_neighbour", "no foldable layer next to it"))
    return report


def fuse_conv_bn(module: nn.Module) -> nn.Module:
    """Drop-in for ``mmcv.cnn.fuse_conv_bn``: fold in place and return the same module object."""
    fused, _ = fuse(module, inplace=True)
    return fused


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
import copy
import gc
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

import refimpl

from ..interrupts import interrupts_held
from ..report import FoldedPair, FusionReport, SkippedNorm, most_specific_reason
from .graph import CallSite, LayerKind, ModelIndex, SiteAnalysis, analyse_sites, trace_regions
from .norms import NormInfo, NormRejection, NormStats, norm_stats
from .precision import round_once, scaled_copy, scaled_copy_buffer_size

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
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse expects a torch.nn.Module, got {type(model).__qualname__}")
    lazy, meta = [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            raise TypeError(f"submodule '{name}' is a TorchScript module ({type(module).__name__}); fuse the eager "
                            "model before scripting it")
        for kind, tensors in (("parameter", module._parameters), ("buffer", module._buffers)):
            for tname, tensor in tensors.items():
                if tensor is None:
                    continue
                qualified = f"{name}.{tname}" if name else tname
                if is_lazy(tensor):
                    lazy.append(f"{qualified} ({type(module).__name__})")
                elif tensor.is_meta:
                    meta.append(f"{qualified} ({type(module).__name__}, shape {tuple(tensor.shape)})")
    if lazy:
        raise ValueError(f"lazy modules are not initialised; run one forward pass first. Uninitialised: "
                         f"{', '.join(lazy[:10])}{' ...' if len(lazy) > 10 else ''}")
    if meta:
        raise ValueError(f"the model has tensors on the meta device (no values to fold); materialise it first. "
                         f"Meta tensors: {', '.join(meta[:10])}{' ...' if len(meta) > 10 else ''}")


# -- observation with example inputs --------------------------------------------------------

@dataclass
class _Observation:
    calls: dict[int, int]
    ranks: dict[int, set[int]]


def _observe(model: nn.Module, index: ModelIndex, example_inputs: Any) -> _Observation:
    """Run the model once in eval mode, counting calls and input ranks of every fold-relevant module.

    Training flags and running statistics are left exactly as they were: the run is in eval
    mode (no statistics update) under ``no_grad``, and every module's flag is restored.
    """
    if isinstance(example_inputs, torch.Tensor):
        args: tuple = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    else:
        raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got "
                        f"{type(example_inputs).__qualname__}")
    calls: dict[int, int] = {}
    ranks: dict[int, set[int]] = {}

    def count(module, inputs):
        key = id(module)
        calls[key] = calls.get(key, 0) + 1
        if inputs and isinstance(inputs[0], torch.Tensor):
            ranks.setdefault(key, set()).add(inputs[0].dim())

    flags = [(m, m.training) for m in index.modules]
    handles = []
    try:
        for module in index.modules:
            if index.is_leaf(module):
                handles.append(module.register_forward_pre_hook(count))
        model.eval()
        with torch.no_grad():
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag
    return _Observation(calls, ranks)


# -- planning -------------------------------------------------------------------------------

@dataclass
class _Step:
    norm: nn.Module
    info: NormInfo
    direction: str  # "forward": the norm runs after the layer; "backward": before it
    order: int      # norms between this one and the layer
    channels: tuple[int, int] | None = None  # the norm's channel slice the layer produces (concat); None: all


@dataclass
class _LayerPlan:
    layer: nn.Module
    kind: str
    steps: list[_Step]
    weight: torch.Tensor | None = None   # the new weight, or None when ``factor`` scales it in place
    factor: torch.Tensor | None = None   # W' = W * factor, applied to the weight's own storage
    bias: torch.Tensor | None = None
    changes: list[float] | None = None


class _Planner:
    def __init__(self, index: ModelIndex, analysis: SiteAnalysis):
        self.index = index
        self.analysis = analysis
        self.reasons: dict[int, list[tuple[str, str]]] = {}
        self.vetoed_layers: dict[int, tuple[str, str]] = {}
        self.vetoed_norms: dict[int, tuple[str, str]] = {}

    def note(self, norm: nn.Module, code: str, detail: str) -> None:
        self.reasons.setdefault(id(norm), []).append((code, detail))

    def choose(self) -> dict[tuple, tuple[str, tuple]]:
        """One fold per norm call site, consistent across every module's call sites.

        Each site starts with its forward candidates (conv -> BN is preferred), falls back to its
        backward candidate, then to nothing; choices only ever move down that list, so the
        loop ends after at most two downgrades per site. A choice is ``(direction, candidates)``:
        one candidate, or one per conv of a channel concat, which are kept or dropped together.
        """
        a = self.analysis
        choice: dict[tuple, tuple[str, tuple]] = {}
        norm_sites: dict[int, list[CallSite]] = {}
        for module_id, verdict in self.index.norms.items():
            if isinstance(verdict, NormInfo) and module_id in a.sites:
                norm_sites[module_id] = a.sites[module_id]
        for module_id, sites in norm_sites.items():
            for site in sites:
                key = a.site_key(site)
                cand = self._first_allowed(key, start="forward")
                if cand is not None:
                    choice[key] = cand
        changed = True
        while changed:
            changed = False
            # A norm is removed only if every one of its calls folds.
            for module_id, sites in norm_sites.items():
                keys = [a.site_key(s) for s in sites]
                present = [k for k in keys if k in choice]
                if present and len(present) != len(keys):
                    norm = sites[0].module
                    self.note(norm, "reused_incompatibly", f"{self.index.name(norm)} is called at {len(keys)} "
                              f"sites but only {len(present)} of them can be folded")
                    for k in present:
                        del choice[k]
                    changed = True
            # Chains: every norm between a norm and its layer must fold into that layer the same way.
            for key in list(choice):
                direction, cands = choice[key]
                cand = cands[0]
                region = cand.norm.region
                for node in cand.between:
                    other = choice.get((id(region), node))
                    if (other is None or other[0] != direction
                            or [c.layer.node for c in other[1]] != [c.layer.node for c in cands]):
                        norm = cand.norm.module
                        between = self.index.name(region.module(node))
                        self.note(norm, "no_fusable_neighbour", f"{between}, between "
                                  f"{self.index.name(norm)} and {self.index.name(cand.layer.module)}, is not folded")
                        self._downgrade(choice, key)
                        changed = True
                        break
            # A layer folds only if each of its calls gets the same folds.
            per_site: dict[tuple, list[tuple]] = {}
            for key, (direction, cands) in choice.items():
                for cand in cands:
                    per_site.setdefault(a.site_key(cand.layer), []).append(
                        (direction, len(cand.between), id(cand.norm.module), cand.channels or ()))
            layers_seen: set[int] = set()
            for layer in [c.layer.module for _, cands in list(choice.values()) for c in cands]:
                if id(layer) in layers_seen:
                    continue
                layers_seen.add(id(layer))
                signatures = {tuple(sorted(per_site.get(a.site_key(s), []))) for s in a.sites[id(layer)]}
                if len(signatures) > 1:
                    for k, (d, cs) in list(choice.items()):
                        if any(c.layer.module is layer for c in cs):
                            self.note(cs[0].norm.module, "reused_incompatibly", f"{self.index.name(layer)} is "
                                      f"called at {len(a.sites[id(layer)])} sites that are not all followed/preceded "
                                      "by the same norm layers")
                            self._downgrade(choice, k)
                    changed = True
        return choice

    def _first_allowed(self, key: tuple, start: str) -> tuple[str, tuple] | None:
        a = self.analysis
        order = ("forward", "backward") if start == "forward" else ("backward",)
        for direction in order:
            if direction == "forward":
                cands = a.forward.get(key)
            else:
                cands = (a.backward[key],) if key in a.backward else None
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
            return (direction, cands)
        return None

    def _downgrade(self, choice: dict, key: tuple) -> None:
        direction, _ = choice.pop(key)
        if direction == "forward":
            cand = self._first_allowed(key, start="backward")
            if cand is not None:
                choice[key] = cand

    def layer_plans(self, choice: dict) -> list[_LayerPlan]:
        plans: dict[int, _LayerPlan] = {}
        seen_sites: set[tuple] = set()
        for cand, direction in [(c, d) for d, cands in choice.values() for c in cands]:
            layer = cand.layer.module
            site_key = self.analysis.site_key(cand.layer)
            plan = plans.get(id(layer))
            if plan is None:
                plan = plans[id(layer)] = _LayerPlan(layer, self.index.layer(layer)[0], [])
                seen_sites.add(site_key)
            elif site_key not in seen_sites:
                continue  # another call of the same layer: identical folds (checked), counted once
            info = self.index.norms[id(cand.norm.module)]
            plan.steps.append(_Step(cand.norm.module, info, direction, len(cand.between), cand.channels))
        for plan in plans.values():
            # Dataflow order: norms before the layer (nearest first), then norms after it (nearest first).
            plan.steps.sort(key=lambda s: (s.direction != "backward", s.order))
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
        if step.direction == "forward":
            if plan.kind == LayerKind.LINEAR:
                return refimpl.fold_linear_bn(w, b, *args)
            return refimpl.fold_conv_bn(w, b, *args, transposed=plan.kind == LayerKind.CONV_TRANSPOSE,
                                        groups=layer.groups)
        if plan.kind == LayerKind.LINEAR:
            return refimpl.fold_bn_linear(w, b, *args)
        return refimpl.fold_bn_conv(w, b, *args, groups=layer.groups)
    except (ValueError, TypeError) as exc:
        layer_name, norm_name = index.name(layer), index.name(step.norm)
        order = f"{layer_name} -> {norm_name}" if step.direction == "forward" else f"{norm_name} -> {layer_name}"
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

    return replace(stats, mean=part(stats.mean), var=part(stats.var), weight=part(stats.weight),
                   bias=part(stats.bias), num_features=stop - start)


def _unit_shape(plan: _LayerPlan) -> tuple[int, ...]:
    """Shape of the smallest kernel whose folds carry the per-slot factor of the layer's weight.

    Forward folds scale a conv/linear weight per output channel (axis 0) and a transposed conv
    weight per (input channel, output channel in group) pair (axes 0 and 1).
    """
    weight = plan.layer.weight
    tail = (1,) * (weight.dim() - 1)
    if plan.kind == LayerKind.CONV_TRANSPOSE:
        return tuple(weight.shape[:2]) + tail[1:]
    return (weight.shape[0],) + tail


def _slot_max_abs(weight: torch.Tensor, unit_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """max |W| over each slot of ``unit_shape`` (the positions one factor entry scales), shaped like it."""
    rows = 1
    for d in unit_shape:
        rows *= d
    flat = weight.detach().reshape(rows, -1)
    # amax and amin separately: torch.aminmax along a dim is several times slower on CPU.
    return torch.maximum(flat.amax(dim=1), flat.amin(dim=1).neg()).to(dtype).reshape(unit_shape)


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
        if len(plan.steps) != 1 or plan.steps[0].direction != "forward" or plan.kind == LayerKind.CONV_TRANSPOSE:
            continue
        step = plan.steps[0]
        stats = _step_stats(step)
        device = plan.layer.weight.device
        if stats.var.device != device or stats.var.numel() != plan.layer.weight.shape[0]:
            continue
        groups.setdefault((device, stats.eps), []).append((plan, stats))
    folded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for (device, eps), members in groups.items():
        if len(members) < 2:
            continue
        dtype = _fold_dtype(device)

        def cat(parts: list[torch.Tensor]) -> torch.Tensor:
            # cat promotes mixed float dtypes to the widest; widening to float64 is exact.
            return torch.cat(parts).to(dtype)

        sizes = [stats.var.numel() for _, stats in members]
        ones = [torch.ones(n, dtype=stats.var.dtype, device=device) for n, (_, stats) in zip(sizes, members)]
        zeros = [torch.zeros(n, dtype=stats.var.dtype, device=device) for n, (_, stats) in zip(sizes, members)]
        try:
            factor, bias = refimpl.fold_conv_bn(
                torch.ones((sum(sizes), 1), dtype=dtype, device=device),
                cat([z if p.layer.bias is None else p.layer.bias.detach() for z, (p, _) in zip(zeros, members)]),
                cat([s.mean for _, s in members]), cat([s.var for _, s in members]), eps,
                cat([o if s.weight is None else s.weight for o, (_, s) in zip(ones, members)]),
                cat([z if s.bias is None else s.bias for z, (_, s) in zip(zeros, members)]))
        except (ValueError, TypeError):
            continue
        for (plan, _), f, b in zip(members, factor.split(sizes), bias.split(sizes)):
            folded[id(plan)] = (f, b)
    return folded


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
    weight = layer.weight
    dtype = _fold_dtype(weight.device)
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    bias_dtype = weight.dtype if layer.bias is None else layer.bias.dtype
    layer_name = index.name(layer)
    changes: list[float] = []
    finfo = torch.finfo(weight.dtype)
    if any(step.direction == "backward" for step in plan.steps):
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
        slot_max = _slot_max_abs(weight, unit_shape, dtype)
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
        new_weight = None
        plan.factor = factor
    new_bias = round_once(bias, bias_dtype)
    weight_fits = math.isfinite(peak) and bool(round_once(torch.tensor(peak, dtype=torch.float64),
                                                          weight.dtype).isfinite())
    if not weight_fits or not bool(torch.isfinite(new_bias).all()):
        plan.factor = None
        largest = max(peak, float(bias.abs().max()) if bias.numel() else 0.0)
        return (f"folding into {layer_name} gives weight/bias magnitudes up to {largest:.3g}, beyond the largest "
                f"finite {weight.dtype} ({finfo.max:.3g})")
    plan.weight = new_weight
    plan.bias = new_bias
    plan.changes = changes
    return None


def _owns_storage(tensor: torch.Tensor, storage_users: dict[int, int]) -> bool:
    """Whether ``tensor`` alone uses its storage within the model (so rewriting it in place is invisible elsewhere)."""
    storage = tensor.untyped_storage()
    return (storage_users.get(storage.data_ptr(), 0) == 1
            and storage.nbytes() == tensor.numel() * tensor.element_size())


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
        weight = plan.layer.weight.detach()
        if _owns_storage(weight, storage_users):
            in_place.append(plan)
        else:
            plan.weight = scaled_copy(weight, plan.factor)
    replacements = []
    for norm in folded_norms:
        verdict = index.norms[id(norm)]
        replacement: nn.Module = FoldedNormAct(norm.drop, norm.act) if verdict.has_act else nn.Identity()
        replacement.training = norm.training
        replacements.append((norm, replacement))
    new_biases = {id(plan): nn.Parameter(plan.bias, requires_grad=plan.layer.weight.requires_grad)
                  for plan in plans if plan.layer.bias is None}
    buffers = {}
    for plan in in_place:
        device = plan.layer.weight.device
        if device not in buffers:
            buffers[device] = torch.empty(scaled_copy_buffer_size(), dtype=plan.factor.dtype, device=device)

    with interrupts_held():
        with torch.no_grad():
            for plan in in_place:
                weight = plan.layer.weight.detach()
                scaled_copy(weight, plan.factor, out=weight, buffer=buffers[weight.device])

    undo: list = []
    try:
        for plan in plans:
            layer = plan.layer
            old_weight = layer.weight
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
        model = copy.deepcopy(model)
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
    observation = _observe(model, index, example_inputs) if example_inputs is not None else None

    flags = [(m, m.training) for m in index.modules]
    try:
        # Trace in eval mode: folding assumes eval semantics, and modules that branch on
        # self.training (stochastic depth, ...) must show their eval-mode dataflow.
        for module in index.modules:
            module.training = False
        traced = trace_regions(model, index)
    finally:
        for module, flag in flags:
            module.training = flag
    analysis = analyse_sites(index, traced.regions, observation.ranks if observation else None)

    planner = _Planner(index, analysis)
    _veto_unshareable_layers(planner, index, analysis)
    if observation is not None:
        _veto_hidden_calls(planner, index, analysis, observation)

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

    folded_norm_ids = {id(cands[0].norm.module) for _, cands in choice.values()}
    folded_norms = [m for m in index.modules if id(m) in folded_norm_ids]
    _apply(plans, folded_norms, index)

    report = _build_report(model, index, traced, analysis, planner, plans, folded_norm_ids)
    if report.training_mode:
        log.warning("the model is in training mode; BatchNorm was folded with eval semantics (running statistics)")
    log.info("%s", report.summary())
    return model, report


def _veto_unshareable_layers(planner: _Planner, index: ModelIndex, analysis: SiteAnalysis) -> None:
    for layer_id, where in analysis.weight_reads.items():
        planner.vetoed_layers[layer_id] = ("reused_incompatibly", f"a parameter of the layer is read directly at "
                                           f"{where}; folding would change that use")
    for cand in [c for cands in analysis.forward.values() for c in cands] + list(analysis.backward.values()):
        layer = cand.layer.module
        if id(layer) not in planner.vetoed_layers and index.shares_parameters(layer):
            planner.vetoed_layers[id(layer)] = ("reused_incompatibly", f"{index.name(layer)} shares a parameter "
                                                "with another module (tied weights)")


def _veto_hidden_calls(planner: _Planner, index: ModelIndex, analysis: SiteAnalysis, obs: _Observation) -> None:
    for module_id, count in obs.calls.items():
        traced = len(analysis.sites.get(module_id, ()))
        if count > traced:
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


def _build_report(model, index, traced, analysis, planner, plans, folded_norm_ids) -> FusionReport:
    report = FusionReport()
    norm_modules = [m for m in index.modules if id(m) in index.norms]
    report.norms_found = len(norm_modules)
    report.training_mode = bool(model.training or any(m.training for m in norm_modules))
    kinds = {(LayerKind.CONV, "forward"): "conv->bn", (LayerKind.CONV_TRANSPOSE, "forward"): "conv_transpose->bn",
             (LayerKind.LINEAR, "forward"): "linear->bn", (LayerKind.CONV, "backward"): "bn->conv",
             (LayerKind.LINEAR, "backward"): "bn->linear"}
    for plan in plans:
        for step, change in zip(plan.steps, plan.changes):
            report.folded.append(FoldedPair(norm=index.name(step.norm), layer=index.name(plan.layer),
                                            kind=kinds[(plan.kind, step.direction)], max_rel_change=change))
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
            report.skipped.append(SkippedNorm(name, "no_fusable_neighbour", "it is never called in the traced "
                                              "forward"))
            continue
        report.skipped.append(SkippedNorm(name, "no_fusable_neighbour", "no foldable layer next to it"))
    return report


def fuse_conv_bn(module: nn.Module) -> nn.Module:
    """Drop-in for ``mmcv.cnn.fuse_conv_bn``: fold in place and return the same module object."""
    fused, _ = fuse(module, inplace=True)
    return fused


"""Dataflow of a model: tracing with a norm-preserving leaf policy, and candidate fold pairs.

Pairs come from the traced computation, never from registration order. The model is traced
with :class:`LeafTracer`, which keeps every layer that can take part in a fold (conv, transposed
conv, linear, recognised norms, eval-mode identities) as a ``call_module`` node. Where tracing a
module fails, each of its children is traced on its own, so one untraceable ``forward`` only
hides the modules it calls directly.

Everything here is linear in model size: module tables are built once, and each call site is
walked along its own short path of single-user nodes.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import fx, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm as _WeightNormParametrization
from torch.nn.utils.weight_norm import WeightNorm as _WeightNormHook

from .norms import NormInfo, NormKind, NormRejection, classify_norm, forward_hooks, weight_hooks

__all__ = ["LayerKind", "ModelIndex", "Region", "CallSite", "NormPosition", "FoldCandidate", "SiteAnalysis",
           "LeafTracer", "trace_regions", "analyse_sites", "classify_layer", "channel_cat_inputs", "CONCAT_FUNCTIONS",
           "value_users"]

log = logging.getLogger(__name__)


class LayerKind:
    """Values of :func:`classify_layer` for layers a norm can fold into."""

    CONV = "conv"
    CONV_TRANSPOSE = "conv_transpose"
    LINEAR = "linear"


_LAYER_BASES = (
    (nn.Conv1d, LayerKind.CONV), (nn.Conv2d, LayerKind.CONV), (nn.Conv3d, LayerKind.CONV),
    (nn.ConvTranspose1d, LayerKind.CONV_TRANSPOSE), (nn.ConvTranspose2d, LayerKind.CONV_TRANSPOSE),
    (nn.ConvTranspose3d, LayerKind.CONV_TRANSPOSE), (nn.Linear, LayerKind.LINEAR),
)
_IDENTITY_BASES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                   nn.FeatureAlphaDropout)
_QUANTIZED_PACKAGES = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic",
                       "torch.nn.intrinsic", "torch.ao.nn.qat", "torch.nn.qat", "torch.ao.nn.quantizable")
# Modules and functions whose output has the shape of their (first) input: rank proofs pass through them.
_SHAPE_PRESERVING_MODULES = _IDENTITY_BASES + (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh)
_SHAPE_PRESERVING_FUNCTIONS = {
    torch.relu, torch.sigmoid, torch.tanh, nn.functional.relu, nn.functional.relu6, nn.functional.gelu,
    nn.functional.silu, nn.functional.leaky_relu, nn.functional.elu, nn.functional.hardswish,
    nn.functional.hardsigmoid, nn.functional.dropout, nn.functional.mish, torch.sigmoid, nn.functional.sigmoid,
    nn.functional.tanh, nn.functional.softplus,
}
_SHAPE_PRESERVING_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "float", "half", "double",
                             "bfloat16", "to", "type_as"}
# Users that read only metadata of a tensor: folding changes values, never shape/dtype/device.
_METADATA_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "get_device"}
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout"}
# Methods whose (second) tensor argument only lends its shape or dtype.
_SHAPE_REFERENCE_METHODS = {"reshape_as", "view_as", "expand_as", "type_as"}


def _leading_flatten(node: fx.Node) -> bool:
    """``x.flatten(0, k)`` / ``torch.flatten(x, 0, k)``: merges leading dims (k given explicitly)."""
    is_flatten = ((node.op == "call_method" and node.target == "flatten")
                  or (node.op == "call_function" and node.target is torch.flatten))
    if not is_flatten or node.kwargs or len(node.args) != 3 or not isinstance(node.args[0], fx.Node):
        return False
    return bool(node.args[1] == 0) and isinstance(node.args[2], int)


def _known_forward(module: nn.Module, bases: tuple) -> type | None:
    """The base among ``bases`` that ``module`` is an instance of, if its forward is that base's own."""
    for base in bases:
        if isinstance(module, base):
            return base if type(module).forward is base.forward else None
    return None


def is_identity_in_eval(module: nn.Module) -> bool:
    """Identity and dropout layers: the identity in eval semantics, which folding assumes."""
    return _known_forward(module, _IDENTITY_BASES) is not None and not forward_hooks(module)


def is_quantized(module: nn.Module) -> bool:
    return type(module).__module__.startswith(_QUANTIZED_PACKAGES)


def classify_layer(module: nn.Module) -> tuple[str | None, str]:
    """Classify a potential fold partner.

    Returns ``(kind, "")`` for a foldable conv/transposed conv/linear, ``(None, reason)``
    for a layer that looks like one but cannot be folded (``reason`` is a report code), and
    ``(None, "")`` for anything else. A layer under ``weight_norm`` with one magnitude per output
    channel is foldable (:func:`weight_normed`); any other computed weight is ``parametrized``.
    """
    if is_quantized(module):
        return None, "unsupported_layer"
    for base, kind in _LAYER_BASES:
        if isinstance(module, base):
            if forward_hooks(module):
                return None, "unsupported_layer"
            known_forward = is_same_padded_conv(module) or type(module).forward is base.forward
            if not known_forward:
                # A subclass with its own forward (weight standardisation, dynamic padding, ...)
                # may not apply its weight linearly; folding into it is not known to be exact.
                return None, "parametrized" if parametrize.is_parametrized(module) else "unsupported_layer"
            if parametrize.is_parametrized(module) or _has_weight_hook(module):
                normed, _ = _weight_reparametrization(module, kind)
                return (kind, "") if normed is not None else (None, "parametrized")
            return kind, ""
    return None, ""


@dataclass(frozen=True)
class WeightNormed:
    """A layer whose weight is ``g * v / ||v||`` (``weight_norm``) with one magnitude ``g`` per output channel.

    A norm that runs after the layer scales each output channel of the weight by ``s``, which is
    ``g`` scaled by ``s`` (``v / ||v||`` is unchanged): the fold rewrites ``g`` and keeps the
    reparametrization, so training can go on. ``g`` has the shape of one weight slot per output
    channel: ``[out, 1, ...]`` for conv and linear layers (``dim=0``), ``[1, out, 1, ...]`` for a
    transposed conv with one group (``dim=1``).
    """

    magnitude: nn.Parameter     # g: ``parametrizations.weight.original0``, or ``weight_g`` with the hook
    hook: Any = None            # torch.nn.utils.weight_norm's hook (it recomputes ``weight`` before a forward)

    def weight(self, layer: nn.Module) -> torch.Tensor:
        """The weight the layer computes from ``g`` and ``v`` now (for the hook: not its cached copy)."""
        return self.hook.compute_weight(layer) if self.hook is not None else cast(torch.Tensor, layer.weight)

    def refresh(self, layer: nn.Module) -> None:
        """After ``g`` changed: recompute the hook's cached ``weight`` attribute (the parametrization needs nothing)."""
        if self.hook is not None:
            setattr(layer, self.hook.name, self.hook.compute_weight(layer))


def weight_normed(module: nn.Module) -> WeightNormed | None:
    """The ``weight_norm`` a norm after ``module`` folds into (see :class:`WeightNormed`), or None."""
    kind, _ = classify_layer(module)
    return _weight_reparametrization(module, kind)[0] if kind is not None else None


def weight_refusal(module: nn.Module) -> str:
    """Why a layer whose weight is computed (parametrize, weight_norm, spectral_norm) cannot take a fold."""
    for base, kind in _LAYER_BASES:
        if isinstance(module, base):
            if not (is_same_padded_conv(module) or type(module).forward is base.forward):
                return (f"its weight is computed (a parametrization or a weight hook) and {type(module).__qualname__} "
                        "has a forward of its own")
            return _weight_reparametrization(module, kind)[1]
    return _REFUSAL_TEXT["parametrized"]


def _weight_reparametrization(module: nn.Module, kind: str) -> tuple[WeightNormed | None, str]:
    """``(WeightNormed, "")`` for weight_norm per output channel, else ``(None, why a fold cannot pass)``."""
    # Attributes are read through _modules / _parameters: this runs during tracing too, where fx
    # hands out proxies for parameters read as attributes.
    hooks = weight_hooks(module)
    if parametrize.is_parametrized(module):
        parametrizations = cast(nn.Module, module._modules["parametrizations"])
        others = [name for name in parametrizations._modules if name != "weight"]
        if others or hooks or "weight" not in parametrizations._modules:
            what = f"its {', '.join(others)} also" if others else "a weight hook also"
            return None, f"{what} computed by a parametrization: a fold would have to rewrite it too"
        weight_list = cast(nn.Module, parametrizations._modules["weight"])
        chain = list(weight_list._modules.values())
        if len(chain) == 1 and type(chain[0]) is _WEIGHT_NORM_PARAMETRIZATION:
            original = cast(nn.Parameter, weight_list._parameters["original0"])
            return _per_output_channel(module, kind, chain[0].dim, original, None)
        names = " -> ".join(type(p).__qualname__ for p in chain)
        return None, (f"its weight is computed by the parametrization {names}, which a per-channel scale does not "
                      "pass through")
    if len(hooks) == 1 and type(hooks[0]) is _WEIGHT_NORM_HOOK and hooks[0].name == "weight" \
            and isinstance(module._parameters.get("weight_g"), nn.Parameter):
        magnitude = cast(nn.Parameter, module._parameters["weight_g"])
        return _per_output_channel(module, kind, hooks[0].dim, magnitude, hooks[0])
    if any(type(h).__name__ == "SpectralNorm" for h in hooks) or "weight_orig" in module._parameters:
        return None, ("spectral_norm divides its weight by its largest singular value, which a per-channel scale "
                      "changes")
    return None, ("its weight is recomputed from other tensors by a hook before every forward: a folded weight "
                  "would be overwritten")


def _per_output_channel(module: nn.Module, kind: str, dim: int, magnitude: nn.Parameter, hook: Any
                        ) -> tuple[WeightNormed | None, str]:
    weight = magnitude  # g has the weight's rank
    if kind == LayerKind.CONV_TRANSPOSE:
        axis, out = 1, int(cast(int, module.out_channels))
        if module.groups != 1:
            return None, (f"its weight is under weight_norm(dim={dim}) and it has groups={module.groups}: the output "
                          "channels of all groups share one magnitude per column, so a per-output-channel scale "
                          "does not fit it")
    else:
        axis = 0
        out = int(cast(int, module.out_features if kind == LayerKind.LINEAR else module.out_channels))
    expected = tuple(out if d == axis else 1 for d in range(weight.dim()))
    if dim != axis or tuple(magnitude.shape) != expected:
        where = "the whole tensor" if dim == -1 else f"everything but axis {dim}"
        return None, (f"its weight is under weight_norm(dim={None if dim == -1 else dim}), which normalises over "
                      f"{where}, not over each output channel (axis {axis}): a per-output-channel scale does not "
                      "commute with it")
    return WeightNormed(magnitude, hook), ""


# torch's own classes, compared by identity: a subclass could compute anything.
_WEIGHT_NORM_PARAMETRIZATION = _WeightNormParametrization
_WEIGHT_NORM_HOOK = _WeightNormHook


# Conv2d subclasses whose forward zero-pads the input to TensorFlow's "SAME" size and then applies
# F.conv2d(x, self.weight, self.bias, ...) unchanged (timm's Conv2dSame and Conv2dSameExport,
# recognised by name so that timm is not required). Their output is a plain conv of a padded
# input, so a BN after them folds exactly; a BN before them meets the zero padding.
_SAME_PADDED_CONVS = ("Conv2dSame", "Conv2dSameExport")


def is_same_padded_conv(module: nn.Module) -> bool:
    return (type(module).__name__ in _SAME_PADDED_CONVS and isinstance(module, nn.Conv2d)
            and all(p == 0 for p in module.padding) and module.padding_mode == "zeros")


def _has_weight_hook(module: nn.Module) -> bool:
    # torch.nn.utils.weight_norm / spectral_norm (the hook-based, pre-parametrize versions)
    # recompute `weight` from other tensors before every forward.
    return bool(weight_hooks(module)) or "weight_g" in module._parameters or "weight_orig" in module._parameters


class ModelIndex:
    """Lookup tables over a model, built once: names, norm classification, registrations."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.name_of: dict[int, str] = {}
        self.modules: list[nn.Module] = []
        for name, module in model.named_modules():
            self.name_of[id(module)] = name
            self.modules.append(module)
        # Every (parent, attribute) under which a module is registered: a folded norm is replaced at all of them.
        self.registrations: dict[int, list[tuple[nn.Module, str]]] = {}
        for parent in self.modules:
            for attr, child in parent._modules.items():
                if child is not None:
                    self.registrations.setdefault(id(child), []).append((parent, attr))
        self.norms: dict[int, NormInfo | NormRejection] = {}
        param_users: dict[int, int] = {}
        for module in self.modules:
            verdict = classify_norm(module)
            if verdict is not None:
                self.norms[id(module)] = verdict
            for param in module._parameters.values():
                if param is not None:
                    param_users[id(param)] = param_users.get(id(param), 0) + 1
        self._param_users = param_users
        self._layer_cache: dict[int, tuple[str | None, str]] = {}
        self._normed_cache: dict[int, WeightNormed | None] = {}
        # Layers recognised from their recorded forward (pad, then the conv/linear op on their own weight and
        # bias), by id: whether that forward read a tensor's shape or value. A norm before them meets the padding.
        self.padded: dict[int, bool] = {}

    def adopt_layer(self, module: nn.Module, kind: str, observed: bool) -> None:
        """Treat ``module`` as a fold partner of ``kind`` for norms after it (see :attr:`padded`)."""
        self._layer_cache[id(module)] = (kind, "")
        self.padded[id(module)] = observed

    def name(self, module: nn.Module) -> str:
        return self.name_of.get(id(module), f"<unregistered {type(module).__name__}>")

    def layer(self, module: nn.Module) -> tuple[str | None, str]:
        key = id(module)
        cached = self._layer_cache.get(key)
        if cached is None:
            cached = self._layer_cache[key] = classify_layer(module)
        return cached

    def refusal_detail(self, module: nn.Module) -> str:
        """Why a conv/linear-like layer that :meth:`layer` refuses cannot take a fold (for messages)."""
        reason = self.layer(module)[1]
        if reason == "unsupported_layer" and forward_hooks(module):
            return f"it has forward hooks ({', '.join(forward_hooks(module))}), which a fold would bypass"
        return weight_refusal(module) if reason == "parametrized" else _REFUSAL_TEXT[reason]

    def weight_normed(self, module: nn.Module) -> WeightNormed | None:
        """The layer's per-output-channel ``weight_norm`` (folds rewrite its ``g``), or None (cached)."""
        key = id(module)
        if key not in self._normed_cache:
            self._normed_cache[key] = weight_normed(module)
        return self._normed_cache[key]

    def is_foldable_norm(self, module: nn.Module) -> bool:
        """Whether ``module`` is a norm recognised as foldable (:func:`classify_norm` gave a NormInfo)."""
        return isinstance(self.norms.get(id(module)), NormInfo)

    def shares_parameters(self, module: nn.Module) -> bool:
        """Whether a parameter of ``module`` is also registered in another module (tied weights)."""
        return any(p is not None and self._param_users.get(id(p), 0) > 1 for p in module._parameters.values())

    def is_leaf(self, module: nn.Module) -> bool:
        if id(module) in self.norms or is_identity_in_eval(module):
            return True
        kind, reason = self.layer(module)
        return kind is not None or reason != ""


class TensorArgument:
    """Stands for a tensor passed to a module at a call seen while running the model (the tensor is not kept)."""

    def __repr__(self) -> str:
        return "<tensor>"


TENSOR_ARGUMENT = TensorArgument()


def summarize_arguments(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A module call's arguments with every tensor replaced by :data:`TENSOR_ARGUMENT` (containers kept)."""
    def summary(value):
        if isinstance(value, torch.Tensor):
            return TENSOR_ARGUMENT
        if isinstance(value, (tuple, list)):
            return type(value)(summary(v) for v in value) if not hasattr(value, "_fields") else value
        if isinstance(value, dict):
            return {k: summary(v) for k, v in value.items()}
        return value
    return tuple(summary(a) for a in args), {k: summary(v) for k, v in kwargs.items()}


class LeafTracer(fx.Tracer):
    """An fx tracer that keeps fold partners as leaves and records which module each target names.

    Plain fx traces through modules defined outside ``torch.nn`` (torchvision's
    FrozenBatchNorm2d, timm's BatchNormAct2d), which would hide them as arithmetic.
    """

    def __init__(self, index: ModelIndex):
        super().__init__()
        self.index = index
        self.target_modules: dict[str, nn.Module] = {}
        self.opaque_leaves: list[nn.Module] = []
        # The arguments each module traced through was called with (proxies, and the values the caller's
        # code fixed: None, flags, numbers), by module id: a pass that re-traces such a module on its own
        # must trace it with those values.
        self.call_arguments: dict[int, list[tuple[tuple, dict]]] = {}
        # Modules traced through whose call returned one of its inputs (DropPath, Identity-like code in eval
        # semantics): they leave no node in the graph.
        self.transparent: set[int] = set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.index.is_leaf(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        if self.is_leaf_module(m, ""):
            target = self.path_of_module(m)
            self.target_modules[target] = m
            if m._modules and not self.index.is_leaf(m):
                self.opaque_leaves.append(m)
            return super().call_module(m, forward, args, kwargs)
        self.call_arguments.setdefault(id(m), []).append((tuple(args), dict(kwargs)))
        out = super().call_module(m, forward, args, kwargs)
        if isinstance(out, fx.Proxy) and any(isinstance(a, fx.Proxy) and a.node is out.node
                                             for a in (*args, *kwargs.values())):
            self.transparent.add(id(m))
        return out


@dataclass
class Region:
    """One traced part of the model: the graph of ``root``'s forward."""

    prefix: str              # qualified name of ``root`` in the model ('' for the model itself)
    root: nn.Module
    graph: fx.Graph
    modules: dict[str, nn.Module]

    @property
    def is_model(self) -> bool:
        return self.prefix == ""

    def module(self, node: fx.Node) -> nn.Module:
        return self.modules[cast(str, node.target)]  # a call_module node's target is the qualified name


@dataclass
class TraceResult:
    regions: list[Region]
    failures: dict[str, str] = field(default_factory=dict)   # qualified name -> why tracing it failed
    opaque: dict[str, str] = field(default_factory=dict)     # qualified name of an unknown leaf with children
    call_arguments: dict[int, list[tuple[tuple, dict]]] = field(default_factory=dict)  # see LeafTracer
    transparent: set[int] = field(default_factory=set)                                 # see LeafTracer


def trace_regions(model: nn.Module, index: ModelIndex, roots: list[tuple[str, nn.Module]] | None = None
                  ) -> TraceResult:
    """Trace ``model`` (or the submodules ``roots``, by qualified name); where a module cannot be traced, trace its
    non-leaf children separately."""
    result = TraceResult(regions=[])
    stack = list(reversed(roots)) if roots is not None else [("", model)]
    while stack:
        prefix, root = stack.pop()
        tracer = LeafTracer(index)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                graph = tracer.trace(root)
            for w in caught:
                log.debug("while tracing %r: %s", prefix or type(root).__name__, w.message)
        except Exception as exc:  # noqa: BLE001 - any failure means "not traceable here": descend
            summary = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            result.failures[prefix] = summary
            log.debug("cannot trace %r (%s); tracing its children separately", prefix or "<model>", summary)
            children = [(f"{prefix}.{n}" if prefix else n, c) for n, c in root.named_children()]
            stack.extend((n, c) for n, c in reversed(children) if not index.is_leaf(c))
            continue
        result.regions.append(Region(prefix, root, graph, tracer.target_modules))
        result.transparent |= tracer.transparent
        for module_id, calls in tracer.call_arguments.items():
            result.call_arguments.setdefault(module_id, []).extend(calls)
        for m in tracer.opaque_leaves:
            result.opaque[index.name(m)] = type(m).__qualname__
    return result


@dataclass(frozen=True)
class CallSite:
    region: Region
    node: fx.Node

    @property
    def module(self) -> nn.Module:
        return self.region.module(self.node)


class NormPosition:
    """Where a norm runs relative to the layer it folds into (values of :attr:`FoldCandidate.position`).

    The report's fold kinds name the same thing in dataflow order: a norm *after* its layer is
    ``conv->bn``, ``conv_transpose->bn`` or ``linear->bn``; a norm *before* it is ``bn->conv`` or
    ``bn->linear``.
    """

    AFTER = "after"    # the layer's output is the norm's input: the norm scales the layer's output channels
    BEFORE = "before"  # the norm's output is the layer's input: the norm scales the layer's input channels


@dataclass
class FoldCandidate:
    """Norm call site ``norm`` may fold into the layer call site ``layer`` that it runs after or before.

    ``between`` are the norm call sites that sit between the two (conv -> BN -> BN): they must
    fold into the same layer call for this one to. ``channels`` is ``(start, stop)`` when the
    layer produces only that slice of the norm's channels (one conv of a channel concat, for a
    norm after it), and None when the layer and the norm share all of them.
    """

    position: str
    layer: CallSite
    norm: CallSite
    between: tuple[fx.Node, ...]
    channels: tuple[int, int] | None = None


def _value_users(node: fx.Node) -> list[fx.Node]:
    users = []
    for user in node.users:
        if user.op == "call_method" and user.target in _METADATA_METHODS:
            continue
        if (user.op == "call_method" and user.target in _SHAPE_REFERENCE_METHODS and len(user.args) == 2
                and user.args[0] is not node and user.args[1] is node):
            continue  # y.reshape_as(node): reads node's shape only
        if (user.op == "call_function" and user.target is getattr and len(user.args) == 2
                and user.args[1] in _METADATA_ATTRS):
            continue
        users.append(user)
    return users


#: The same notion of "the consumers of a value" for other passes over these graphs (branch merging).
value_users = _value_users


def _sole_input(node: fx.Node, source: fx.Node) -> bool:
    return node.args == (source,) and not node.kwargs


class _RankProof:
    """Whether a tensor in a traced graph is provably 2-D (N, C): from the graph, or observed at run time."""

    def __init__(self, index: ModelIndex, input_ranks: dict[int, set[int]]):
        self.index = index
        self.input_ranks = input_ranks
        self._memo: dict[fx.Node, bool] = {}

    def input_is_2d(self, site: CallSite) -> bool:
        ranks = self.input_ranks.get(id(site.module))
        if ranks:
            # Observed at run time with the example inputs: every call saw (N, C).
            return ranks == {2}
        arg = site.node.args[0] if site.node.args else None
        return isinstance(arg, fx.Node) and self.proven_2d(site.region, arg)

    def proven_2d(self, region: Region, node: fx.Node) -> bool:
        """Whether the tensor ``node`` is provably 2-D (N, C) from the graph alone."""
        memo = self._memo
        path = []
        current = node
        result = False
        # Follow shape-preserving ops iteratively (long chains must not recurse deeply).
        while True:
            if current in memo:
                result = memo[current]
                break
            path.append(current)
            verdict, following = self._step(region, current)
            if following is None:
                result = verdict
                break
            current = following
        for visited in path:
            memo[visited] = result
        return result

    def _step(self, region: Region, node: fx.Node) -> tuple[bool, fx.Node | None]:
        """``(answer, None)`` when decided at ``node``, ``(False, input)`` to defer to ``input``."""
        first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if node.op == "call_function":
            if node.target is torch.flatten:
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
                return bool(start == 1 and end == -1), None
            if node.target is torch.reshape:
                shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")
                return isinstance(shape, (tuple, list)) and len(shape) == 2, None
            if node.target in _SHAPE_PRESERVING_FUNCTIONS and first is not None:
                return False, first
            return False, None
        if node.op == "call_method":
            if node.target == "flatten":
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
                return bool(start == 1 and end == -1), None
            if node.target in ("view", "reshape"):
                shape = node.args[1:]
                if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                    shape = shape[0]
                return len(shape) == 2 and not node.kwargs, None
            if node.target in _SHAPE_PRESERVING_METHODS and first is not None:
                return False, first
            return False, None
        if node.op == "call_module":
            module = region.module(node)
            ranks = self.input_ranks.get(id(module))
            if isinstance(module, nn.Flatten) and type(module).forward is nn.Flatten.forward:
                return module.start_dim == 1 and module.end_dim == -1, None
            if first is None:
                return False, None
            if self.index.layer(module)[0] == LayerKind.LINEAR:
                if ranks:
                    return ranks == {2}, None
                return False, first
            if self.index.is_foldable_norm(module) or _known_forward(module, _SHAPE_PRESERVING_MODULES):
                if ranks:
                    return ranks == {2}, None
                return False, first
        return False, None


@dataclass
class _WalkBack:
    """From a norm call back through pass-through nodes to the node that produces its input."""

    source: fx.Node                                    # the producer: the first node not passed through
    reader: fx.Node                                    # the node that reads ``source`` (the norm or a pass-through)
    between: list[fx.Node]                             # foldable norms passed on the way
    shared: tuple[fx.Node, list[fx.Node]] | None       # the first value on the way with other users, and its users
    flattened: fx.Node | None                          # a leading-dims flatten passed on the way


@dataclass
class _WalkOn:
    """From a norm call on through pass-through nodes to the node that consumes its output."""

    consumer: fx.Node
    between: list[fx.Node]
    shared: tuple[fx.Node, list[fx.Node]] | None


class SiteAnalysis:
    """Per-call-site analysis over all traced regions.

    Collects call sites per module (:meth:`collect_sites`), then for every call of a foldable norm
    the candidate folds (:attr:`after`: into the layer or layers it runs after; :attr:`before`:
    into the layer it runs before) and, where a direction has none, the reasons found while
    looking (each a ``(code, detail)``).
    """

    def __init__(self, index: ModelIndex, regions: list[Region], input_ranks: dict[int, set[int]] | None):
        self.index = index
        self.regions = regions
        self.input_ranks = input_ranks or {}
        self.sites: dict[int, list[CallSite]] = {}
        self.weight_reads: dict[int, str] = {}
        # Per norm call site, the layer calls that produce its input: one, or one per conv of a
        # channel concat (``torch.cat([conv_1(a), ..., conv_k(b)], dim=1)``), which fold all or none.
        self.after: dict[tuple[int, fx.Node], tuple[FoldCandidate, ...]] = {}
        # Per norm call site, the layer call that consumes its output.
        self.before: dict[tuple[int, fx.Node], FoldCandidate] = {}
        self.reasons: dict[int, list[tuple[str, str]]] = {}
        self._ranks = _RankProof(index, self.input_ranks)

    def site_key(self, site: CallSite) -> tuple[int, fx.Node]:
        return (id(site.region), site.node)

    def note(self, norm: nn.Module, code: str, detail: str) -> None:
        self.reasons.setdefault(id(norm), []).append((code, detail))

    def run(self) -> None:
        self.collect_sites()
        for region in self.regions:
            for node in region.graph.nodes:
                if node.op == "call_module":
                    verdict = self.index.norms.get(id(region.module(node)))
                    if isinstance(verdict, NormInfo):
                        site = CallSite(region, node)
                        self._find_layer_it_follows(site, verdict)
                        self._find_layer_it_feeds(site, verdict)

    def collect_sites(self) -> None:
        """Every call of a module, per module; and every parameter read directly (``get_attr``), per owner."""
        for region in self.regions:
            for node in region.graph.nodes:
                if node.op == "call_module":
                    module = region.module(node)
                    self.sites.setdefault(id(module), []).append(CallSite(region, node))
                elif node.op == "get_attr":
                    owner_path, _, _ = str(node.target).rpartition(".")
                    try:
                        owner = region.root.get_submodule(owner_path)
                    except AttributeError:
                        continue
                    where = f"{region.prefix}.{node.target}" if region.prefix else str(node.target)
                    self.weight_reads[id(owner)] = where

    # -- helpers -------------------------------------------------------------------------
    def _passes_through(self, region: Region, node: fx.Node) -> bool:
        """Whether a node is the identity for folding purposes (eval identity, or a foldable pure norm)."""
        if node.op != "call_module":
            return False
        module = region.module(node)
        if is_identity_in_eval(module):
            return True
        verdict = self.index.norms.get(id(module))
        if not isinstance(verdict, NormInfo):
            return False
        return not verdict.has_act or (is_identity_in_eval(cast(nn.Module, module.drop))
                                       and is_identity_in_eval(cast(nn.Module, module.act)))

    def _is_norm_node(self, region: Region, node: fx.Node) -> bool:
        return node.op == "call_module" and self.index.is_foldable_norm(region.module(node))

    def _boundary_reason(self, region: Region, where: str) -> tuple[str, str]:
        if region.is_model:
            return "no_fusable_neighbour", f"its {where} is the model's {where}"
        return "untraceable", (f"its {where} crosses the boundary of '{region.prefix}', whose caller could not be "
                               "traced")

    def _fold_partner(self, region: Region, node: fx.Node, norm: nn.Module, reads: str, meets: str
                      ) -> tuple[nn.Module, str, str] | None:
        """The conv/linear layer called at ``node``, next to ``norm``: ``(module, name, kind)``, or None
        after noting why nothing there can take the fold (``reads``/``meets`` start the message)."""
        if node.op != "call_module":
            self.note(norm, "no_fusable_neighbour", f"{reads} {describe_node(node)}")
            return None
        layer_module = region.module(node)
        layer_name = self.index.name(layer_module)
        kind, refusal = self.index.layer(layer_module)
        if kind is None:
            what = f"{meets} {layer_name} ({type(layer_module).__qualname__}), which"
            if refusal:
                self.note(norm, refusal, f"{what} cannot be folded into: {self.index.refusal_detail(layer_module)}")
            else:
                self.note(norm, "no_fusable_neighbour", f"{what} is not a conv or linear layer")
            return None
        return layer_module, layer_name, kind

    def _note_shared(self, region: Region, norm: nn.Module, shared: tuple[fx.Node, list[fx.Node]], reader: fx.Node,
                     path: str = "") -> None:
        node, users = shared
        others = ", ".join(describe_node(u) for u in users if u is not reader)
        self.note(norm, "output_used_elsewhere", f"the output of {_describe_in(region, node, self.index)} that "
                  f"feeds {self.index.name(norm)}{path} is also used by {others or 'another consumer'}")

    def _note_unless_fits(self, info: NormInfo, norm: nn.Module, layer: nn.Module, kind: str, position: str) -> bool:
        """Whether the norm's channel axis is the one of ``layer`` it meets; if not, note why not."""
        if norm_fits_layer(info, layer, kind):
            return True
        described = f"{self.index.name(layer)} ({type(layer).__qualname__})"
        axis = f"of {described}" if position == NormPosition.AFTER else f"that {described} reads"
        self.note(norm, "no_fusable_neighbour", f"{self.index.name(norm)} ({type(norm).__qualname__}) does not "
                  f"normalise the channel axis {axis}")
        return False

    # -- layer -> norm: the norm runs after the layer ------------------------------------------
    def _find_layer_it_follows(self, site: CallSite, info: NormInfo) -> None:
        walk = self._walk_back(site)
        if walk is None:
            return
        if walk.flattened is None and channel_cat_inputs(walk.source) is not None:
            self._find_concatenated_layers(site, info, walk)
            return
        region, norm = site.region, site.module
        name = self.index.name(norm)
        partner = self._fold_partner(region, walk.source, norm, f"{name} reads the output of", f"{name} follows")
        if partner is None:
            return
        layer_module, layer_name, kind = partner
        if walk.shared is not None:
            self._note_shared(region, norm, walk.shared, walk.reader)
            return
        if not self._note_unless_fits(info, norm, layer_module, kind, NormPosition.AFTER):
            return
        if walk.flattened is not None:
            # linear -> x.flatten(0, k) -> BatchNorm1d: exact when the norm sees (rows, features), i.e. the
            # flatten merged every dim but the linear's feature dim; a conv's channels are not last.
            if kind != LayerKind.LINEAR or info.kind != NormKind.BATCH_NORM:
                self.note(norm, "no_fusable_neighbour",
                          f"{name} reads {describe_node(walk.flattened)} of {layer_name}, "
                          "whose channel axis is not the last")
                return
            if self.input_ranks.get(id(norm)) != {2}:
                self.note(norm, "rank_unknown", f"{layer_name} -> {describe_node(walk.flattened)} -> {name}: the norm "
                          "input is not proven 2-D (pass example_inputs)")
                return
        elif kind == LayerKind.LINEAR:
            if not self._ranks.input_is_2d(CallSite(region, walk.source)):
                self.note(norm, "rank_unknown", f"{layer_name} -> {name}: the linear input is not proven 2-D "
                          "(pass example_inputs)")
                return
        self.after[self.site_key(site)] = (
            FoldCandidate(NormPosition.AFTER, CallSite(region, walk.source), site, tuple(walk.between)),)

    def _walk_back(self, site: CallSite) -> _WalkBack | None:
        """Walk from the norm to the producer of its input, or note why there is none and return None."""
        region, norm_node = site.region, site.node
        norm = site.module
        between: list[fx.Node] = []
        current = norm_node
        shared: tuple[fx.Node, list[fx.Node]] | None = None
        flattened: fx.Node | None = None  # a leading-dims flatten between a linear layer and the norm
        while True:
            source = current.args[0] if current.args and isinstance(current.args[0], fx.Node) else None
            if flattened is None and current is not norm_node and _leading_flatten(current):
                flattened = current
            elif source is None or not _sole_input(current, source):
                self.note(norm, "no_fusable_neighbour", f"{self.index.name(norm)} is not called on a single tensor")
                return None
            assert source is not None
            users = _value_users(source)
            if len(users) != 1 and shared is None:
                shared = (source, users)
            if source.op == "placeholder":
                self.note(norm, *self._boundary_reason(region, "input"))
                return None
            if self._passes_through(region, source) or (flattened is None and _leading_flatten(source)):
                if self._is_norm_node(region, source):
                    between.append(source)
                current = source
                continue
            return _WalkBack(source, current, between, shared, flattened)

    def _find_concatenated_layers(self, site: CallSite, info: NormInfo, walk: _WalkBack) -> None:
        """conv_1, ..., conv_k -> torch.cat(dim=1) -> norm: channel slice i of the norm folds into conv_i.

        Exact because the norm is a per-channel affine map and the concat only places each
        conv's output channels at offset ``o_i`` (the earlier convs' widths summed).
        """
        region, norm = site.region, site.module
        name = self.index.name(norm)
        if walk.shared is not None:
            self._note_shared(region, norm, walk.shared, walk.reader)
            return
        cat = walk.source
        inputs = channel_cat_inputs(cat) or []
        candidates: list[FoldCandidate] = []
        seen: set[int] = set()
        start = 0
        for position, node in enumerate(inputs):
            if not isinstance(node, fx.Node) or node.op != "call_module":
                what = describe_node(node) if isinstance(node, fx.Node) else repr(node)
                self.note(norm, "no_fusable_neighbour", f"{name} reads torch.cat() whose input {position} is "
                          f"{what}, not the output of a conv layer")
                return
            layer_module = region.module(node)
            layer_name = self.index.name(layer_module)
            kind, refusal = self.index.layer(layer_module)
            if kind not in (LayerKind.CONV, LayerKind.CONV_TRANSPOSE):
                code = refusal or "no_fusable_neighbour"
                why = self.index.refusal_detail(layer_module) if refusal else "not a conv or transposed conv layer"
                self.note(norm, code, f"{name} reads torch.cat() whose input {position} comes from {layer_name} "
                          f"({type(layer_module).__qualname__}): {why}")
                return
            if id(layer_module) in seen:
                self.note(norm, "no_fusable_neighbour", f"{name} reads torch.cat() in which {layer_name} appears "
                          "more than once")
                return
            seen.add(id(layer_module))
            users = _value_users(node)
            if users != [cat]:
                self._note_shared(region, norm, (node, users), cat, " through torch.cat()")
                return
            if not self._note_unless_fits(info, norm, layer_module, kind, NormPosition.AFTER):
                return
            width = cast(int, layer_module.out_channels)
            candidates.append(FoldCandidate(NormPosition.AFTER, CallSite(region, node), site, tuple(walk.between),
                                            (start, start + width)))
            start += width
        if start != info.num_features:
            widths = " + ".join(str(c.layer.module.out_channels) for c in candidates)
            self.note(norm, "no_fusable_neighbour", f"{name} has {info.num_features} channels but the convs "
                      f"concatenated before it have {widths} = {start}")
            return
        self.after[self.site_key(site)] = tuple(candidates)

    # -- norm -> layer: the norm runs before the layer -----------------------------------------
    def _find_layer_it_feeds(self, site: CallSite, info: NormInfo) -> None:
        region, norm = site.region, site.module
        name = self.index.name(norm)
        if info.has_act and not self._passes_through(region, site.node):
            self.note(norm, "no_fusable_neighbour", f"{name} applies its activation "
                      f"({type(norm.act).__qualname__}) before any following layer")
            return
        walk = self._walk_on(site)
        if walk is None:
            return
        partner = self._fold_partner(region, walk.consumer, norm, f"{name} feeds", f"{name} feeds")
        if partner is None:
            return
        layer_module, layer_name, kind = partner
        if self.index.weight_normed(layer_module) is not None:
            self.note(norm, "parametrized", f"{name} feeds {layer_name}, whose weight is under weight_norm: the norm "
                      "scales its input channels, which does not commute with the per-output-channel weight norm")
            return
        if walk.shared is not None:
            node, users = walk.shared
            self.note(norm, "output_used_elsewhere", f"the output of {_describe_in(region, node, self.index)} "
                      f"after {name} has {len(users)} consumers")
            return
        if not self._note_unless_fits(info, norm, layer_module, kind, NormPosition.BEFORE):
            return
        if kind == LayerKind.CONV_TRANSPOSE:
            self.note(norm, "transposed_after_bn", f"{name} feeds the transposed conv {layer_name}: the shift is "
                      "not a per-channel constant")
            return
        if id(layer_module) in self.index.padded:
            self.note(norm, "zero_padding", f"{name} feeds {layer_name}, whose own forward pads its input before "
                      "the conv: a shift does not pass through the padding")
            return
        if kind == LayerKind.CONV and not conv_pads_exactly(layer_module):
            how = ("'SAME' padding computed at run time" if is_same_padded_conv(layer_module) else
                   f"padding={layer_module.padding!r}, padding_mode={layer_module.padding_mode!r}")
            self.note(norm, "zero_padding", f"{name} feeds {layer_name}, which zero-pads ({how}): not exact at borders")
            return
        if kind == LayerKind.LINEAR and not self._ranks.input_is_2d(site):
            self.note(norm, "rank_unknown", f"{name} -> {layer_name}: the norm input is not proven 2-D "
                      "(pass example_inputs)")
            return
        self.before[self.site_key(site)] = FoldCandidate(NormPosition.BEFORE, CallSite(region, walk.consumer), site,
                                                         tuple(walk.between))

    def _walk_on(self, site: CallSite) -> _WalkOn | None:
        """Walk from the norm to the consumer of its output, or note why there is none and return None."""
        region, norm = site.region, site.module
        name = self.index.name(norm)
        between: list[fx.Node] = []
        current = site.node
        shared = None
        while True:
            users = _value_users(current)
            if len(users) != 1:
                if not users:
                    return None
                if shared is None:
                    shared = (current, users)
                # Keep looking along the first user only to say whether a layer would follow.
            user = users[0]
            if user.op == "output":
                self.note(norm, *self._boundary_reason(region, "output"))
                return None
            if not _sole_input(user, current):
                self.note(norm, "no_fusable_neighbour", f"{name} feeds {describe_node(user)}")
                return None
            if self._passes_through(region, user):
                if self._is_norm_node(region, user):
                    between.append(user)
                current = user
                continue
            return _WalkOn(user, between, shared)


_REFUSAL_TEXT = {
    "unsupported_layer": "quantized, or a subclass with its own forward",
    "parametrized": "its weight is parametrized (parametrize / weight_norm / spectral_norm)",
}


def norm_fits_layer(info: NormInfo, layer: nn.Module, kind: str) -> bool:
    """Whether the norm's channel axis is the layer's channel axis.

    FrozenBatchNorm2d and timm's norm+act layers broadcast over (or assert) 4-D input: they
    pair only with 2-D (transposed) convolutions. Linear layers pair with torch's own
    BatchNorm classes, whose channel axis is 1 (the feature axis once the input is 2-D).
    """
    if info.kind not in (NormKind.BATCH_NORM, NormKind.AFFINE):
        return kind != LayerKind.LINEAR and cast(torch.Tensor, layer.weight).dim() == 4
    return True


def conv_pads_exactly(module: nn.Module) -> bool:
    """Whether every input position a conv reads is a real input value (no zeros inserted)."""
    conv = cast(nn.modules.conv._ConvNd, module)
    if is_same_padded_conv(conv):
        # pad_same adds max((ceil(n / s) - 1) * s + d * (k - 1) + 1 - n, 0) zeros: none for 1x1 kernels.
        return all(k == 1 for k in conv.kernel_size)
    if conv.padding_mode != "zeros":
        return True  # reflect / replicate / circular padding copies input values
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            return True
        # 'same': total padding per dim is dilation * (kernel - 1)
        return all(d * (k - 1) == 0 for d, k in zip(conv.dilation, conv.kernel_size, strict=True))
    return all(p == 0 for p in padding)


#: The functions that concatenate tensors. A channel concat of conv outputs folds slice by slice
#: (:func:`channel_cat_inputs`); ``verify`` does not compare a concat of folded layers' outputs.
CONCAT_FUNCTIONS = (torch.cat, torch.concat)


def channel_cat_inputs(node: fx.Node) -> list | None:
    """The tensor list of ``torch.cat(tensors, dim=1)`` / ``torch.concat``, else None.

    Only ``dim=1`` (the channel axis of conv outputs) is accepted: a negative dim names the
    channel axis only for a known rank, and any other dim mixes channels within a slice.
    """
    if node.op != "call_function" or node.target not in CONCAT_FUNCTIONS:
        return None
    args, kwargs = list(node.args), dict(node.kwargs)
    tensors = args.pop(0) if args else kwargs.pop("tensors", None)
    dim = args.pop(0) if args else kwargs.pop("dim", 0)
    if args or kwargs or dim != 1 or not isinstance(tensors, (list, tuple)) or not tensors:
        return None
    return list(tensors)


def describe_node(node: fx.Node) -> str:
    """A node as a reason's detail names it: ``module 'a.b'``, ``add()``, ``.view()``, ``the output``."""
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)}()"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "output":
        return "the output"
    return f"{node.op} '{node.name}'"


def _describe_in(region: Region, node: fx.Node, index: ModelIndex) -> str:
    if node.op == "call_module":
        return index.name(region.module(node))
    return describe_node(node)


def analyse_sites(index: ModelIndex, regions: list[Region],
                  input_ranks: dict[int, set[int]] | None = None) -> SiteAnalysis:
    analysis = SiteAnalysis(index, regions, input_ranks)
    analysis.run()
    return analysis


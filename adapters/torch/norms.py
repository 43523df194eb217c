"""Recognising BatchNorm-like layers and reading their eval-mode statistics.

A layer is foldable only if its forward is known to compute eval-mode BatchNorm (optionally
followed by dropout and an activation, for timm's norm+act layers). Recognition never imports
torchvision or timm: their classes are identified by class name, base class and attributes,
and the forward is checked to be the one of the known class (a subclass that overrides
``forward`` could compute anything, so it is reported, not folded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

__all__ = ["NormKind", "NormInfo", "NormRejection", "is_norm", "classify_norm", "norm_stats", "affine_candidate"]


class NormKind:
    """How a recognised norm computes its output (values of :attr:`NormInfo.kind`)."""

    BATCH_NORM = "batch_norm"            # torch BatchNorm1d/2d/3d, SyncBatchNorm, their plain subclasses
    BATCH_NORM_ACT = "batch_norm_act"    # timm BatchNormAct2d / SyncBatchNormAct: batch_norm -> drop -> act
    FROZEN = "frozen"                    # FrozenBatchNorm2d (torchvision, detectron2, timm): buffers only
    FROZEN_ACT = "frozen_act"            # timm FrozenBatchNormAct2d: frozen batch norm -> drop -> act
    AFFINE = "affine"                    # any layer whose recorded forward is a per-channel affine map (axis 1)


@dataclass(frozen=True)
class NormInfo:
    """A recognised norm layer. ``kind`` is a :class:`NormKind` value."""

    kind: str
    num_features: int
    #: For :data:`NormKind.AFFINE`: ``y = scale[c] * x + shift[c]`` (float64, from the replayed recorded forward),
    #: and whether that forward read a tensor's shape or value (its map then rests on the recorded path).
    scale: Any = field(default=None, compare=False, repr=False)
    shift: Any = field(default=None, compare=False, repr=False)
    observed: bool = False

    @property
    def has_act(self) -> bool:
        """Whether the layer applies dropout + activation after normalising (kept when folded)."""
        return self.kind in (NormKind.BATCH_NORM_ACT, NormKind.FROZEN_ACT)


@dataclass(frozen=True)
class NormRejection:
    """A norm-like layer that cannot be folded, with the report's reason code and a detail."""

    reason: str
    detail: str


@dataclass(frozen=True)
class NormStats:
    """Eval-mode statistics of a norm layer (detached tensors on the layer's device)."""

    mean: torch.Tensor
    var: torch.Tensor
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    num_features: int


# Forwards known to compute eval-mode BatchNorm of their input (given running statistics).
_BATCH_NORM_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)
_TIMM_NORM_ACT: dict[str, type[_BatchNorm]] = {"BatchNormAct2d": nn.BatchNorm2d, "SyncBatchNormAct": nn.SyncBatchNorm}


def _class_in_mro(module: nn.Module, name: str, package: str | None = None) -> type[Any] | None:
    for cls in type(module).__mro__:
        if cls.__name__ == name and (package is None or cls.__module__.split(".")[0] == package):
            return cls
    return None


def _has_drop_and_act(module: nn.Module) -> bool:
    modules = module._modules
    return isinstance(modules.get("drop"), nn.Module) and isinstance(modules.get("act"), nn.Module)


def _frozen_buffers(module: nn.Module) -> int | None:
    """Channel count if ``module`` holds exactly the FrozenBatchNorm buffers and no parameters."""
    if module._parameters:
        return None
    buffers = module._buffers
    names = ("weight", "bias", "running_mean", "running_var")
    tensors = [t for t in (buffers.get(n) for n in names) if t is not None and t.dim() == 1]
    if len(tensors) != len(names):
        return None
    width = int(tensors[0].shape[0])
    if any(int(t.shape[0]) != width for t in tensors):
        return None
    eps = getattr(module, "eps", None)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        return None
    return width


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm-like normalisation layer: the project's one test of "is this a norm?".

    True for torch's norm classes with running statistics (``_NormBase``: BatchNorm1d/2d/3d,
    SyncBatchNorm, InstanceNorm, and subclasses such as timm's BatchNormAct2d), for anything
    :func:`classify_norm` recognises (FrozenBatchNorm2d by name), and for any module holding
    ``running_mean`` and ``running_var`` buffers of its own (look-alikes that subclass none of
    them). Foldable or not: it also answers "is a norm still there?" after a fuser has run, so
    it is deliberately broader than the set :func:`classify_norm` folds.

    >>> is_norm(nn.BatchNorm2d(3)), is_norm(nn.Conv2d(3, 3, 1)), is_norm(nn.GroupNorm(1, 3))
    (True, False, False)
    """
    if isinstance(module, _NormBase) or classify_norm(module) is not None:
        return True
    buffers = module._buffers
    return buffers.get("running_mean") is not None and buffers.get("running_var") is not None


#: Forward pre-hooks that recompute a weight (weight_norm, spectral_norm): the fold passes handle them themselves.
_WEIGHT_HOOKS = ("WeightNorm", "SpectralNorm")


def weight_hooks(module: nn.Module) -> list[Any]:
    """The hook-based ``weight_norm`` / ``spectral_norm`` pre-hooks on ``module``, which recompute its weight from
    other tensors before every forward."""
    return [hook for hook in module._forward_pre_hooks.values() if type(hook).__name__ in _WEIGHT_HOOKS]


def forward_hooks(module: nn.Module) -> list[str]:
    """The forward hooks and pre-hooks registered on ``module`` itself (weight_norm's and spectral_norm's weight
    hooks excepted), by name. A hook may change what the module takes or returns, which folding the module
    would bypass (or feed other values): such a module is no fold partner and no merged branch."""
    found = []
    for attribute in ("_forward_pre_hooks", "_forward_hooks"):
        for hook in (getattr(module, attribute, None) or {}).values():
            if type(hook).__name__ not in _WEIGHT_HOOKS:
                found.append(getattr(hook, "__qualname__", None) or type(hook).__qualname__)
    return found


def classify_norm(module: nn.Module) -> NormInfo | NormRejection | None:
    """Recognise a BatchNorm-like layer.

    Returns a :class:`NormInfo` for a foldable norm, a :class:`NormRejection` for a norm-like
    layer that cannot be folded (unknown forward, no running statistics), and None for
    anything that is not a BatchNorm at all.
    """
    if isinstance(module, _BatchNorm):
        forward = type(module).forward
        kind = None
        for name, base in _TIMM_NORM_ACT.items():
            # By name, not by package: timm's class and re-implementations of it (same name, same
            # base, `drop` and `act` children) share the forward batch_norm -> drop -> act.
            cls = _class_in_mro(module, name)
            if cls is not None and issubclass(cls, base) and forward is cls.forward and _has_drop_and_act(module):
                kind = NormKind.BATCH_NORM_ACT
                break
        if kind is None:
            if forward not in _BATCH_NORM_FORWARDS:
                return NormRejection("unknown_norm", f"{type(module).__qualname__} subclasses "
                                     f"{_BatchNorm.__name__} but overrides forward; its computation is unknown")
            kind = NormKind.BATCH_NORM
        if forward_hooks(module):
            return NormRejection("unknown_norm", f"{type(module).__qualname__} has forward hooks "
                                 f"({', '.join(forward_hooks(module))}), which folding it would bypass")
        if not module.track_running_stats or module.running_mean is None or module.running_var is None:
            return NormRejection("no_running_stats", f"{type(module).__qualname__}(track_running_stats="
                                 f"{module.track_running_stats}) normalises with batch statistics")
        return NormInfo(kind, int(module.num_features))
    if "FrozenBatchNorm" in type(module).__name__:
        width = _frozen_buffers(module)
        if width is None:
            return NormRejection("unknown_norm", _frozen_mismatch(module))
        if forward_hooks(module):
            return NormRejection("unknown_norm", f"{type(module).__qualname__} has forward hooks "
                                 f"({', '.join(forward_hooks(module))}), which folding it would bypass")
        timm_frozen_act = _class_in_mro(module, "FrozenBatchNormAct2d", "timm")
        if timm_frozen_act is not None:
            if type(module).forward is timm_frozen_act.forward and _has_drop_and_act(module):
                return NormInfo(NormKind.FROZEN_ACT, width)
            return NormRejection("unknown_norm", f"{type(module).__qualname__} overrides the forward of "
                                 "timm's FrozenBatchNormAct2d")
        if module._modules:
            # A frozen norm with children does more than normalise; we do not know what.
            return NormRejection("unknown_norm", f"{type(module).__qualname__} has child modules "
                                 f"{list(module._modules)}; its computation is unknown")
        return NormInfo(NormKind.FROZEN, width)
    buffers = module._buffers
    if not module._modules and buffers.get("running_mean") is not None and buffers.get("running_var") is not None:
        return NormRejection("unknown_norm", f"{type(module).__qualname__} holds running_mean and running_var but is "
                             "not a known BatchNorm class; pass example_inputs so that its recorded forward shows "
                             "what it computes")
    return None


def _frozen_mismatch(module: nn.Module) -> str:
    """What a FrozenBatchNorm-named layer lacks (for its skip detail): the buffers, parameters or eps."""
    name = type(module).__qualname__
    names = ("weight", "bias", "running_mean", "running_var")
    present = [n for n in names if isinstance(module._buffers.get(n), torch.Tensor)]
    if module._parameters:
        return f"{name} has parameters ({', '.join(module._parameters)}), which FrozenBatchNorm2d does not"
    if len(present) != len(names):
        missing = [n for n in names if n not in present]
        return f"{name} lacks the FrozenBatchNorm buffers {', '.join(missing)}"
    shapes = {n: tuple(cast(torch.Tensor, module._buffers[n]).shape) for n in names}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        return f"{name} has FrozenBatchNorm buffers of shapes {shapes}, not one vector per channel"
    return (f"{name} holds the FrozenBatchNorm buffers but no numeric eps attribute (its eps is fixed in its "
            "forward); pass example_inputs so that its recorded forward gives eps, scale and shift")


def affine_candidate(module: nn.Module) -> bool:
    """Whether ``module`` may be a per-channel affine layer: no children, not a torch.nn class, and its
    floating tensors (at least one) are all vectors of one length (possibly with unit axes: [1, C, 1, 1])."""
    if module._modules or type(module).__module__.startswith("torch."):
        return False
    width = None
    for tensor in (*module._parameters.values(), *module._buffers.values()):
        if tensor is None or not tensor.is_floating_point():
            continue
        sizes = [d for d in tensor.shape if d != 1]
        if len(sizes) > 1 or tensor.dim() == 0:
            return False
        size = sizes[0] if sizes else 1
        if width is not None and size != width:
            return False
        width = size
    return width is not None


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def norm_stats(module: nn.Module, info: NormInfo) -> NormStats:
    """Read the running statistics, eps and affine parameters of a recognised norm."""
    norm: Any = module  # a _BatchNorm or a FrozenBatchNorm lookalike: its attributes are read by duck typing
    if info.kind == NormKind.AFFINE:
        # y = scale * x + shift, as BatchNorm with mean 0, var 1, eps 0: s = scale / sqrt(1) is scale exactly.
        scale = info.scale
        return NormStats(mean=torch.zeros_like(scale), var=torch.ones_like(scale), eps=0.0, weight=scale,
                         bias=info.shift, num_features=info.num_features)
    eps = float(norm.eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{type(norm).__qualname__} has eps={norm.eps!r}; it must be finite and >= 0")
    if info.kind in (NormKind.FROZEN, NormKind.FROZEN_ACT):
        weight, bias = norm.weight, norm.bias
    else:
        weight = norm.weight if norm.affine else None
        bias = norm.bias if norm.affine else None
    return NormStats(mean=norm.running_mean.detach(), var=norm.running_var.detach(), eps=eps,
                     weight=_detached(weight), bias=_detached(bias), num_features=info.num_features)

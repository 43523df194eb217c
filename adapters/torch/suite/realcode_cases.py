"""Cases written from the patterns of real model code that a symbolic trace or a class name misses.

Each builder is plain torch, written from a rule (not copied from a library): a FrozenBatchNorm copy
with a hard-coded eps under another class name, a custom module calling ``F.batch_norm``, a forward
with an optional ``mask`` argument whose dtype it tests, TF-"same" padding computed from ``x.shape``,
a head looping over feature maps, a conv subclass that pads and then calls ``conv2d`` on its own weight
(with a BN after it, which folds, and before it, which must not fold across the padding), and a
BN-lookalike whose forward is not affine.

The registered expectations (``foldable``, ``left``, ``skips``) are those of a fuse *without* example
inputs (symbolic trace); :data:`RECORDED_OUTCOMES` gives, per case, what a fuse *with* example inputs
(the recorded run, ``adapters/torch/recorded.py``) must do instead, worked out by hand the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .cases import Case
from .cases import _register as register_case

__all__ = ["RECORDED_OUTCOMES", "RecordedOutcome", "recorded_case", "FrozenCopy", "CustomBatchNormCall",
           "ChannelScale", "PaddedConv2d", "SquaredLookalike"]


@dataclass(frozen=True)
class RecordedOutcome:
    """What ``fuse(model, example_inputs=x)`` must do on a case, where it differs from a fuse without inputs."""

    foldable: int
    left: int
    skips: Mapping[str, tuple[str, ...]]
    pairs: tuple[tuple[str, str, str], ...] | None = None


RECORDED_OUTCOMES: dict[str, RecordedOutcome] = {
    # A BatchNorm2d subclass whose forward is BN * 2 + 0.25: per channel, an affine map of its input with
    # constant parameters, so it folds once its recorded forward is replayed.
    "trap_unknown_norm_subclass": RecordedOutcome(1, 0, {}, (("1", "0", "conv->bn"),)),
    # The data-dependent branch reads bn's output after conv -> bn: the conv's output still reaches only bn,
    # so that fold holds on every path (it is reported with a note: the forward read a value).
    "trap_untraceable_parent_own_pair": RecordedOutcome(2, 0, {}, (("bn", "conv", "conv->bn"),
                                                                   ("child.1", "child.0", "conv->bn"))),
}


def recorded_case(case: Case) -> Case:
    """``case`` with the expectations of a fuse with example inputs (:data:`RECORDED_OUTCOMES`)."""
    outcome = RECORDED_OUTCOMES.get(case.name)
    if outcome is None:
        return case
    return replace(case, foldable=outcome.foldable, left=outcome.left, skips=dict(outcome.skips),
                   pairs=None if outcome.pairs is None else frozenset(outcome.pairs))


def _record(name: str, foldable: int, left: int, skips: Mapping[str, tuple[str, ...]] | None = None,
            pairs: tuple[tuple[str, str, str], ...] | None = None) -> None:
    RECORDED_OUTCOMES[name] = RecordedOutcome(foldable, left, dict(skips or {}), pairs)


# ---------------------------------------------------------------------------------------------
# Layers

class FrozenCopy(nn.Module):
    """A FrozenBatchNorm2d copy under another class name: four buffers, no parameters, no ``eps``
    attribute; eps is a literal in forward, which computes ``x * scale + bias`` (as several model
    libraries' own copies do)."""

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.reshape(1, -1, 1, 1)
        bias = self.bias.reshape(1, -1, 1, 1)
        running_var = self.running_var.reshape(1, -1, 1, 1)
        running_mean = self.running_mean.reshape(1, -1, 1, 1)
        epsilon = 1e-5
        scale = weight * (running_var + epsilon).rsqrt()
        bias = bias - running_mean * scale
        return x * scale + bias


class CustomBatchNormCall(nn.Module):
    """Not a BatchNorm subclass: holds the statistics itself and calls ``F.batch_norm`` in eval mode
    with its own eps (1e-3)."""

    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 1e-3)


class ChannelScale(nn.Module):
    """A per-channel scale-and-shift layer (``x * gamma[c] + beta[c]``): no statistics, still an affine map."""

    def __init__(self, n: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, n))
        self.beta = nn.Parameter(torch.linspace(-0.25, 0.25, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma[None, :, None, None] + self.beta[None, :, None, None]


class SquaredLookalike(nn.Module):
    """Has running_mean and running_var, but squares the normalised input: not affine, so not a norm to fold."""

    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x - self.running_mean[None, :, None, None]) * (self.running_var[None, :, None, None] + 1e-5).rsqrt()
        return y * y


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class PaddedConv2d(nn.Conv2d):
    """A Conv2d subclass that zero-pads to TF's "SAME" size computed from ``x.shape`` and then calls
    ``F.conv2d`` on its own weight and bias (padding=0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_h = _same_padding(height, self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_w = _same_padding(width, self.kernel_size[1], self.stride[1], self.dilation[1])
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


# ---------------------------------------------------------------------------------------------
# Models

class _OptionalMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = mask.to(x.dtype)
            x = x * mask
        return torch.relu(self.bn(self.conv(x)))


class _TfSamePadding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = _same_padding(x.shape[-1], 3, 2, 1)
        x = F.pad(x, [pad // 2, pad - pad // 2, pad // 2, pad - pad // 2])
        return self.bn(self.conv(x))


class _FeatureMapLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(2, 3, 1) for _ in range(3))
        self.bns = nn.ModuleList(nn.BatchNorm2d(3) for _ in range(3))
        self.fuse = nn.Conv2d(9, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.chunk(x, 3, dim=1)
        outs = []
        for i, feature in enumerate(features):
            out = F.relu(self.bns[i](self.convs[i](feature)))
            outs.append(F.interpolate(out, size=features[0].shape[-2:], mode="nearest"))
        return self.fuse(torch.cat(outs, dim=1))


def _seq(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


@register_case("realcode_frozen_bn_copy", (2, 3, 8, 8), foldable=0, left=1, family="norms",
               skips={"1": ("unknown_norm",)})
def _frozen_bn_copy() -> nn.Module:
    """Conv2d -> FrozenCopy (FrozenBatchNorm2d's buffers, eps a literal in forward, no .eps): without inputs it
    is reported (unknown_norm, with running statistics); with inputs its recorded forward is replayed in
    float64, found per-channel affine, and folded: one fold, nothing left."""
    return _seq(nn.Conv2d(3, 4, 3), FrozenCopy(4))


_record("realcode_frozen_bn_copy", 1, 0, {}, (("1", "0", "conv->bn"),))


@register_case("realcode_custom_batch_norm_call", (2, 3, 8, 8), foldable=0, left=1, family="norms",
               skips={"1": ("unknown_norm",)})
def _custom_batch_norm_call() -> nn.Module:
    """Conv2d(bias=False) -> CustomBatchNormCall (F.batch_norm on its own statistics, eps=1e-3): unknown_norm
    without inputs; with inputs its forward is an affine map per channel, so it folds: one fold."""
    return _seq(nn.Conv2d(3, 4, 3, bias=False), CustomBatchNormCall(4))


_record("realcode_custom_batch_norm_call", 1, 0, {}, (("1", "0", "conv->bn"),))


@register_case("realcode_optional_mask", (2, 3, 8, 8), foldable=0, left=1, family="trap",
               skips={"bn": ("untraceable",)})
def _optional_mask() -> nn.Module:
    """forward(x, mask=None) tests mask.dtype when a mask is given: symbolic tracing fails on it
    (untraceable); the recorded run (no mask) folds conv -> bn, with a note: the model's forward got a
    default argument, which may choose another path."""
    return _OptionalMask()


_record("realcode_optional_mask", 1, 0, {}, (("bn", "conv", "conv->bn"),))


@register_case("realcode_tf_same_padding", (2, 3, 9, 9), foldable=0, left=1, family="trap",
               skips={"bn": ("untraceable",)})
def _tf_same_padding() -> nn.Module:
    """TF-"same" zero padding computed from x.shape, then conv -> bn: untraceable symbolically; recorded,
    the pad runs before the conv, whose output reaches only bn: one fold (noted: the forward read x.shape)."""
    return _TfSamePadding()


_record("realcode_tf_same_padding", 1, 0, {}, (("bn", "conv", "conv->bn"),))


@register_case("realcode_feature_map_loop", (2, 6, 4, 4), foldable=0, left=3, family="trap",
               skips={f"bns.{i}": ("untraceable",) for i in range(3)})
def _feature_map_loop() -> nn.Module:
    """A head looping over the chunks of its input (iterating a traced tensor fails): three convs ->
    bns -> relu -> interpolate -> cat -> conv. Recorded, each conv's output reaches only its bn: three folds."""
    return _FeatureMapLoop()


_record("realcode_feature_map_loop", 3, 0, {},
        tuple((f"bns.{i}", f"convs.{i}", "conv->bn") for i in range(3)))


@register_case("realcode_padded_conv_bn_after", (2, 3, 9, 9), foldable=0, left=1, family="trap",
               skips={"1": ("unsupported_layer",)})
def _padded_conv_bn_after() -> nn.Module:
    """PaddedConv2d (pads from x.shape, then F.conv2d on its own weight and bias) -> BatchNorm2d: without inputs
    the subclass's forward is unknown (unsupported_layer); recorded, it is pad + conv, so the BN after it
    folds into its weight and bias: one fold."""
    return _seq(PaddedConv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4))


_record("realcode_padded_conv_bn_after", 1, 0, {}, (("1", "0", "conv->bn"),))


@register_case("realcode_padded_conv_bn_before", (2, 3, 9, 9), foldable=0, left=1, family="trap",
               skips={"0": ("unsupported_layer",)})
def _padded_conv_bn_before() -> nn.Module:
    """BatchNorm2d -> PaddedConv2d: the padding inserts zeros after the BN, where its shift would be missing,
    so it never folds (without inputs: unsupported_layer; recorded: zero_padding). One norm left."""
    return _seq(nn.BatchNorm2d(3), PaddedConv2d(3, 4, 3))


_record("realcode_padded_conv_bn_before", 0, 1, {"0": ("zero_padding",)})


@register_case("realcode_lookalike_not_affine", (2, 3, 8, 8), foldable=0, left=1, family="trap",
               skips={"1": ("unknown_norm",)})
def _lookalike_not_affine() -> nn.Module:
    """Conv2d -> SquaredLookalike (running statistics, but it squares its output): reported as unknown_norm
    either way (recorded: its forward is not an affine map) and never folded. One norm left."""
    return _seq(nn.Conv2d(3, 3, 3), SquaredLookalike(3))


_record("realcode_lookalike_not_affine", 0, 1, {"1": ("unknown_norm",)})

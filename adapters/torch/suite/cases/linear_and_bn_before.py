"""Cases of the fold families linear -> BN1d, BN -> conv and BN -> linear."""

from __future__ import annotations

import torch
from torch import nn

from .registry import _PADDING_MODES, _PaddingMode, _register, _seq


@_register("linear_bn1d_2d_input", (4, 5), foldable=1, left=0, family="linear->bn",
           rank_dependent=("1",),
           pairs=(("1", "0", "linear->bn"),))
def _linear_bn1d() -> nn.Module:
    """Linear -> BatchNorm1d on a 2-D (N, C) model input: BN's channel axis is the linear's
    output features, so it folds -- but only the example input proves the rank."""
    return _seq(nn.Linear(5, 6), nn.BatchNorm1d(6))


@_register("flatten_linear_bn1d", (2, 3, 8, 8), foldable=1, left=0, family="linear->bn",
           rank_dependent=("5",),
           pairs=(("5", "4", "linear->bn"),))
def _flatten_linear_bn1d() -> nn.Module:
    """Conv2d -> ReLU -> pool -> Flatten -> Linear -> BatchNorm1d: the conv has no BN (ReLU
    follows); the Linear gets a 2-D input from Flatten, so Linear -> BN1d folds."""
    return _seq(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 6),
                nn.BatchNorm1d(6))


@_register("bn_conv2d_valid", (2, 3, 8, 8), foldable=1, left=0, family="bn->conv",
           pairs=(("0", "1", "bn->conv"),))
def _bn_conv2d_valid() -> nn.Module:
    """BatchNorm2d -> Conv2d without padding: every input the conv reads is a BN output, so the
    BN folds into the conv (W' = W s per input channel, b' = b + sum W t); nothing is left."""
    return _seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3))


for _mode in _PADDING_MODES[1:]:
    def _make(mode: _PaddingMode = _mode) -> nn.Module:
        return _seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode))
    _make.__doc__ = (f"BatchNorm2d -> Conv2d with padding 1, padding_mode={_mode!r}: the padding copies BN outputs, "
                     f"so every position the conv reads is a BN output and the fold is exact; nothing is left.")
    _register(f"bn_conv2d_pad_{_mode}", (2, 3, 8, 8), foldable=1, left=0, family="bn->conv",
              pairs=(("0", "1", "bn->conv"),))(_make)


@_register("bn_conv2d_groups_stride", (2, 4, 9, 9), foldable=1, left=0, family="bn->conv",
           pairs=(("0", "1", "bn->conv"),))
def _bn_conv2d_groups() -> nn.Module:
    """BatchNorm2d -> Conv2d (groups=2, stride 2, no padding, no bias): input channel c feeds
    group c // (in/groups); folds; the conv gains a bias."""
    return _seq(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False))


@_register("bn_conv1d_circular", (2, 3, 8), foldable=1, left=0, family="bn->conv",
           pairs=(("0", "1", "bn->conv"),))
def _bn_conv1d_circular() -> nn.Module:
    """BatchNorm1d -> Conv1d with circular padding: exact, folds."""
    return _seq(nn.BatchNorm1d(3), nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular"))


@_register("bn_conv3d_replicate", (2, 2, 4, 5, 5), foldable=1, left=0, family="bn->conv",
           pairs=(("0", "1", "bn->conv"),))
def _bn_conv3d_replicate() -> nn.Module:
    """BatchNorm3d -> Conv3d with replicate padding: exact, folds."""
    return _seq(nn.BatchNorm3d(2), nn.Conv3d(2, 3, 3, padding=1, padding_mode="replicate"))


@_register("bn_conv2d_zero_padding", (2, 3, 8, 8), foldable=0, left=1, family="bn->conv",
           skips={"0": ("zero_padding",)})
def _bn_conv2d_zero_padding() -> nn.Module:
    """BatchNorm2d -> Conv2d with zero padding 1: the zeros are inserted after the BN, where a
    folded conv would see the BN shift t instead -- wrong at the borders. Not folded: the
    BN runs once ("zero_padding")."""
    return _seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1))


@_register("bn_linear_2d_input", (4, 5), foldable=1, left=0, family="bn->linear", rank_dependent=("0",),
           pairs=(("0", "1", "bn->linear"),))
def _bn_linear() -> nn.Module:
    """BatchNorm1d -> Linear on a 2-D (N, C) model input: folds into the linear (proven 2-D only
    by the example input)."""
    return _seq(nn.BatchNorm1d(5), nn.Linear(5, 3))


class _ReidHead(nn.Module):
    """Re-identification model: backbone -> global pool -> flatten -> BN1d 'bottleneck' -> Dropout -> classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = _seq(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bottleneck = nn.BatchNorm1d(8)
        self.dropout = nn.Dropout(0.5)
        self.classifier = nn.Linear(8, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.flatten(self.pool(self.backbone(x)), 1)
        return self.classifier(self.dropout(self.bottleneck(features)))


@_register("reid_bn_dropout_linear", (2, 3, 8, 8), foldable=2, left=0, family="bn->linear",
           rank_dependent=("bottleneck",),
           pairs=(("backbone.1", "backbone.0", "conv->bn"), ("bottleneck", "classifier", "bn->linear")))
def _reid_head() -> nn.Module:
    """Conv -> BN -> ReLU -> pool -> flatten -> BN1d -> Dropout -> Linear: backbone.1 folds into
    backbone.0; the bottleneck BN1d folds into the classifier through the Dropout (the identity
    in eval mode) on the 2-D flattened features. Nothing is left."""
    return _ReidHead()


@_register("flatten_bn1d_linear", (2, 3, 8, 8), foldable=1, left=0, family="bn->linear", rank_dependent=("4",),
           pairs=(("4", "5", "bn->linear"),))
def _flatten_bn1d_linear() -> nn.Module:
    """Conv2d -> ReLU -> pool -> Flatten -> BatchNorm1d -> Linear: the conv has no BN; the BN1d
    sees 2-D features and folds into the Linear."""
    return _seq(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.BatchNorm1d(8),
                nn.Linear(8, 3))


del _mode, _make

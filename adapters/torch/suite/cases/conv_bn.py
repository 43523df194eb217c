"""Cases of the fold family conv -> BN."""

from __future__ import annotations

import torch
from torch import nn

from .registry import _PADDING_MODES, _PaddingMode, _register, _seq


@_register("conv1d_bn", (2, 3, 8), foldable=1, left=0, family="conv->bn",
           pairs=(("1", "0", "conv->bn"),))
def _conv1d_bn() -> nn.Module:
    """Conv1d (stride 2, reflect padding, bias) -> BatchNorm1d on (N, C, L): the conv's output
    channels are BN's channels whatever the padding, so the BN folds; nothing is left."""
    return _seq(nn.Conv1d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"), nn.BatchNorm1d(4))


for _mode in _PADDING_MODES:
    def _make(mode: _PaddingMode = _mode) -> nn.Module:
        return _seq(nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode), nn.BatchNorm2d(4))
    _make.__doc__ = (f"Conv2d with padding_mode={_mode!r} -> BatchNorm2d: a BN after a conv folds whatever the conv "
                     f"pads with (padding happens before the products), so it folds; nothing is left.")
    _register(f"conv2d_bn_pad_{_mode}", (2, 3, 8, 8), foldable=1, left=0, family="conv->bn",
              pairs=(("1", "0", "conv->bn"),))(_make)


@_register("conv2d_nobias_same_bn", (2, 3, 8, 8), foldable=1, left=0, family="conv->bn",
           pairs=(("1", "0", "conv->bn"),))
def _conv2d_nobias_same_bn() -> nn.Module:
    """Conv2d without bias and padding='same' -> BatchNorm2d: folds; the fused conv gains a bias."""
    return _seq(nn.Conv2d(3, 4, 3, padding="same", bias=False), nn.BatchNorm2d(4))


@_register("conv2d_groups_stride_dilation_bn", (2, 4, 9, 9), foldable=1, left=0, family="conv->bn",
           pairs=(("1", "0", "conv->bn"),))
def _conv2d_groups_bn() -> nn.Module:
    """Conv2d (groups=2, stride 2, dilation 2) -> BatchNorm2d: groups do not change that weight
    row o produces channel o, so the BN folds; nothing is left."""
    return _seq(nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), nn.BatchNorm2d(6))


@_register("conv2d_depthwise_bn", (2, 4, 8, 8), foldable=1, left=0, family="conv->bn",
           pairs=(("1", "0", "conv->bn"),))
def _conv2d_depthwise_bn() -> nn.Module:
    """Depthwise Conv2d (groups = channels, no bias) -> BatchNorm2d -> ReLU: folds; nothing is left."""
    return _seq(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU())


class _NormAfterMerge(nn.Module):
    """Two convs merged by a concat (``cat``), a concat with the input itself (``cat_input``) or a sum (``add``),
    then one BatchNorm: the concat of convs folds slice by slice, the other two do not (see traps)."""

    def __init__(self, merge: str) -> None:
        super().__init__()
        self.merge = merge
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d({"cat": 8, "cat_input": 7, "add": 4}[merge])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x)
        if self.merge == "cat":
            merged = torch.cat([a, self.conv2(x)], dim=1)
        elif self.merge == "cat_input":
            merged = torch.cat([a, x], dim=1)
        else:
            merged = a + self.conv2(x)
        return torch.relu(self.bn(merged))


@_register("conv_concat_bn", (2, 3, 8, 8), foldable=1, left=0, family="conv->bn",
           pairs=(("bn", "conv1", "conv->bn"), ("bn", "conv2", "conv->bn")))
def _conv_concat_bn() -> nn.Module:
    """bn(cat([conv1(x), conv2(x)], dim=1)) -> ReLU, as in MixNet's mixed convs: BN channels 0-3
    are conv1's output and 4-7 conv2's, and BN is per-channel, so each conv takes its slice of the
    fold; the BN is removed and nothing is left."""
    return _NormAfterMerge("cat")


@_register("conv3d_bn", (2, 2, 5, 6, 6), foldable=1, left=0, family="conv->bn",
           pairs=(("1", "0", "conv->bn"),))
def _conv3d_bn() -> nn.Module:
    """Conv3d (groups=2, stride (1, 2, 2), replicate padding, no bias) -> BatchNorm3d: folds."""
    return _seq(nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1, padding_mode="replicate", groups=2, bias=False),
                nn.BatchNorm3d(4))


@_register("conv_bn_bn", (2, 3, 8, 8), foldable=2, left=0, family="conv->bn",
           pairs=(("1", "0", "conv->bn"), ("2", "0", "conv->bn")))
def _conv_bn_bn() -> nn.Module:
    """Conv2d -> BatchNorm2d -> BatchNorm2d: the first BN folds into the conv, and the conv
    (now ending in a per-channel affine map) still feeds only the second, which folds too."""
    return _seq(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4))


@_register("conv_identity_bn", (2, 3, 8, 8), foldable=1, left=0, family="conv->bn",
           pairs=(("2", "0", "conv->bn"),))
def _conv_identity_bn() -> nn.Module:
    """Conv2d -> nn.Identity -> BatchNorm2d: Identity computes nothing, so the BN folds."""
    return _seq(nn.Conv2d(3, 4, 3), nn.Identity(), nn.BatchNorm2d(4))


del _mode, _make

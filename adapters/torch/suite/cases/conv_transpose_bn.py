"""Cases of the fold family conv_transpose -> BN."""

from __future__ import annotations

from torch import nn

from .registry import _register, _seq


@_register("conv_transpose1d_bn", (2, 3, 8), foldable=1, left=0, family="conv_transpose->bn",
           pairs=(("1", "0", "conv_transpose->bn"),))
def _conv_transpose1d_bn() -> nn.Module:
    """ConvTranspose1d (stride 2, output_padding 1) -> BatchNorm1d: the transposed weight is
    [in, out/groups, k]; the BN scales its output-channel axis (dim 1); folds."""
    return _seq(nn.ConvTranspose1d(3, 4, 3, stride=2, output_padding=1), nn.BatchNorm1d(4))


@_register("conv_transpose2d_groups_bn", (2, 4, 5, 5), foldable=1, left=0, family="conv_transpose->bn",
           pairs=(("1", "0", "conv_transpose->bn"),))
def _conv_transpose2d_groups_bn() -> nn.Module:
    """ConvTranspose2d (groups=2, stride 2, padding 1, output_padding 1) -> BatchNorm2d: with
    groups the output channel of weight[i, j] is (i // (in/groups)) * (out/groups) + j, which a
    fuser ignoring groups gets wrong (torch.nn.utils.fusion does); folds."""
    return _seq(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), nn.BatchNorm2d(6))


@_register("conv_transpose2d_dilation_bn", (2, 3, 5, 5), foldable=1, left=0, family="conv_transpose->bn",
           pairs=(("1", "0", "conv_transpose->bn"),))
def _conv_transpose2d_dilation_bn() -> nn.Module:
    """ConvTranspose2d (dilation 2, no bias) -> BatchNorm2d: folds; the fused layer gains a bias."""
    return _seq(nn.ConvTranspose2d(3, 4, 3, dilation=2, bias=False), nn.BatchNorm2d(4))


@_register("conv_transpose3d_groups_bn", (2, 4, 3, 3, 3), foldable=1, left=0, family="conv_transpose->bn",
           pairs=(("1", "0", "conv_transpose->bn"),))
def _conv_transpose3d_groups_bn() -> nn.Module:
    """ConvTranspose3d (groups=2, stride 2, no bias) -> BatchNorm3d: folds."""
    return _seq(nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2, bias=False), nn.BatchNorm3d(6))

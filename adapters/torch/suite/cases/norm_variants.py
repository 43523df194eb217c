"""Cases of norm-layer variants: affine=False, frozen, with activation, synchronised, without running
statistics."""

from __future__ import annotations

from torch import nn

from .norm_layers import BatchNormAct2d, FrozenBatchNorm2d
from .registry import _register, _seq


@_register("bn_affine_false", (2, 3, 8, 8), foldable=1, left=0, family="norms",
           pairs=(("1", "0", "conv->bn"),))
def _bn_affine_false() -> nn.Module:
    """Conv2d -> BatchNorm2d(affine=False): gamma = 1, beta = 0, running stats still apply; folds."""
    return _seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False))


@_register("frozen_bn", (2, 3, 8, 8), foldable=1, left=0, family="norms",
           pairs=(("1", "0", "conv->bn"),))
def _frozen_bn() -> nn.Module:
    """Conv2d (no bias) -> FrozenBatchNorm2d (torchvision's buffers, not a _BatchNorm) -> ReLU:
    recognised by its buffers and folded; nothing is left."""
    return _seq(nn.Conv2d(3, 4, 3, bias=False), FrozenBatchNorm2d(4), nn.ReLU())


@_register("batchnorm_act", (2, 3, 8, 8), foldable=1, left=0, family="norms",
           pairs=(("1", "0", "conv->bn"),))
def _batchnorm_act() -> nn.Module:
    """Conv2d -> BatchNormAct2d (timm-style: BN, drop, ReLU): the BN part folds into the conv,
    the module is replaced by one keeping drop and act, so the ReLU still runs; no BN is left."""
    return _seq(nn.Conv2d(3, 4, 3, padding=1, bias=False), BatchNormAct2d(4, act_layer=nn.ReLU),
                nn.Conv2d(4, 2, 1))


@_register("sync_bn_eval", (2, 3, 8, 8), foldable=1, left=0, family="norms",
           pairs=(("1", "0", "conv->bn"),))
def _sync_bn() -> nn.Module:
    """Conv2d -> SyncBatchNorm in eval mode: eval semantics are plain BN with running stats; folds."""
    return _seq(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))


@_register("bn_no_running_stats", (2, 3, 8, 8), foldable=0, left=1, family="norms",
           skips={"1": ("no_running_stats",)})
def _bn_no_running_stats() -> nn.Module:
    """Conv2d -> BatchNorm2d(track_running_stats=False): uses batch statistics even in eval, so
    it is not a fixed affine map and must not fold; it runs once."""
    return _seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))

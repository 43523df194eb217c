"""Norm layers defined here so that neither torchvision nor timm is needed: stand-ins with the same buffers and
forward as theirs, and a norm subclass whose forward is not a BatchNorm's."""

from __future__ import annotations

import torch
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """Same buffers and forward as ``torchvision.ops.FrozenBatchNorm2d`` (not a ``_BatchNorm``)."""

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` in miniature: batch norm, then ``self.drop``, then ``self.act``.

    A fuser that folds the norm part must keep ``drop`` and ``act``; losing the activation
    changes the output completely, which the output comparison catches.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True, apply_act: bool = True,
                 act_layer: type[nn.Module] = nn.ReLU, drop_layer: type[nn.Module] | None = None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer() if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.BatchNorm2d.forward(self, x)
        x = self.drop(x)
        return self.act(x)


class Conv2dSame(nn.Conv2d):
    """timm's ``Conv2dSame`` in miniature: zero-pad to TensorFlow's 'SAME' size at run time, then a
    plain conv (a BN after it folds; a BN before it meets the zero padding unless the kernel is 1x1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ph = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        x = nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ShiftedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d subclass whose ``forward`` does more than batch norm: a fuser cannot know it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0 + 0.25

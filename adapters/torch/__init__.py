"""The torch adapter: dataflow-correct BatchNorm folding for ``nn.Module`` models.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
>>> fused, report = fuse(model)
>>> [(p.norm, p.layer, p.kind) for p in report.folded]
[('1', '0', 'conv->bn')]
>>> type(fused[1]).__name__
'Identity'
"""

from ..report import FOLD_KINDS, REASONS, FoldedPair, FusionReport, MergedBranches, SkippedMerge, SkippedNorm
from .checking import Verdict, rounded_copy, verify
from .fusion import FoldedNormAct, fuse, fuse_conv_bn
from .reparam import reparameterize

__all__ = ["fuse", "fuse_conv_bn", "reparameterize", "verify", "Verdict", "rounded_copy", "FusionReport", "FoldedPair",
           "SkippedNorm", "MergedBranches", "SkippedMerge", "FoldedNormAct", "REASONS", "FOLD_KINDS"]

"""The torch adapter: dataflow-correct BatchNorm folding for ``nn.Module`` models.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
>>> fused, report = fuse(model, example_inputs=torch.randn(1, 3, 8, 8))
>>> [(p.norm, p.layer, p.kind) for p in report.folded]
[('1', '0', 'conv->bn')]
>>> type(fused[1]).__name__
'Identity'
>>> verify(model, fused, torch.randn(2, 3, 8, 8)).ok
True

Both take example inputs the same way: a tensor, or a tuple of tensors for a model with several
arguments. What callers catch or inspect is exported here: the results (:class:`FusionReport` with
its :class:`FoldedPair` and :class:`SkippedNorm` entries; :class:`Verdict` with its
:class:`OutputCheck` and :class:`LayerDivergence`) and :class:`ModelRunError`, which ``verify``
raises when a model cannot run on the inputs. Bad input to ``fuse`` raises ``ValueError`` or
``TypeError`` naming the layers, and leaves the model as it was.
"""

from ..report import FOLD_KINDS, REASONS, FoldedPair, FusionReport, MergedBranches, SkippedMerge, SkippedNorm
from .checking import LayerDivergence, ModelRunError, OutputCheck, Verdict, rounded_copy, verify
from .fusion import FoldedNormAct, fuse, fuse_conv_bn
from .reparam import reparameterize

__all__ = ["fuse", "fuse_conv_bn", "reparameterize", "verify", "rounded_copy", "FusionReport", "FoldedPair",
           "SkippedNorm", "MergedBranches", "SkippedMerge", "Verdict", "OutputCheck", "LayerDivergence",
           "ModelRunError", "FoldedNormAct", "REASONS", "FOLD_KINDS"]

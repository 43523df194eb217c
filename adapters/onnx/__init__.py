"""The ONNX adapter: fold BatchNormalization in ONNX graphs with the numpy core (``refimpl``); no torch needed.

- :func:`fuse` -- ``fuse(model, *, inplace=False) -> (onnx.ModelProto, FusionReport)``;
- :func:`fuse_bn` -- a folded copy, the report logged to the ``adapters.onnx`` logger;
- :func:`verify` -- judge any folded graph against the float64 reference of the original (:class:`Verdict`).

The report and verdict types are the torch adapter's own (:mod:`adapters.report`, :mod:`adapters.verdict`):
:class:`FusionReport` with :class:`FoldedPair` and :class:`SkippedNorm` (reason codes :data:`REASONS`, fold
kinds :data:`FOLD_KINDS`), :class:`Verdict` with :class:`OutputCheck` and :class:`LayerDivergence`, and
:class:`ModelRunError`, which ``verify`` raises when a graph cannot run.
"""

from ..report import FOLD_KINDS, REASONS, FoldedPair, FusionReport, SkippedNorm
from .checking import LayerDivergence, ModelRunError, OutputCheck, Verdict, rounded_copy, verify
from .fusion import fuse, fuse_bn

__all__ = ["fuse", "fuse_bn", "verify", "rounded_copy", "FusionReport", "FoldedPair", "SkippedNorm", "Verdict",
           "OutputCheck", "LayerDivergence", "ModelRunError", "REASONS", "FOLD_KINDS"]

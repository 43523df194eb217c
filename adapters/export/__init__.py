"""The torch.export adapter: fold, verify and audit BatchNorm in ExportedPrograms and FX graphs.

- :func:`fuse` -- ``fuse(program, *, inplace=False) -> (ExportedProgram | GraphModule, FusionReport)``;
- :func:`verify` -- judge a folded program against the float64 reference of the original (:class:`Verdict`).

The fold math is refimpl's (float64, rounded once), the report and reason codes are the other
adapters' (:mod:`adapters.report`), and the verdict is the torch adapter's error model applied to
the programs' modules.
"""

from ..report import FoldedPair, FusionReport, SkippedNorm
from ..verdict import ModelRunError, Verdict
from .checking import verify
from .fusion import fuse

__all__ = ["fuse", "verify", "FusionReport", "FoldedPair", "SkippedNorm", "Verdict", "ModelRunError"]

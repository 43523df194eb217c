"""The ONNX adapter: fold BatchNormalization in ONNX graphs with the numpy core (``refimpl``); no torch needed.

- :func:`fuse` -- ``fuse(model, *, inplace=False) -> (onnx.ModelProto, FusionReport)``;
- :func:`fuse_bn` -- a folded copy, the report logged to the ``adapters.onnx`` logger;
- :func:`verify` -- judge any folded graph against the float64 reference of the original (:class:`Verdict`).
"""

from .checking import Verdict, verify
from .fusion import fuse, fuse_bn

__all__ = ["fuse", "fuse_bn", "verify", "Verdict"]

"""The ONNX adapter: fold BatchNormalization in ONNX graphs with the numpy core (``refimpl``); no torch needed.

- :func:`fuse` -- ``fuse(model, *, inplace=False) -> (onnx.ModelProto, FusionReport)``;
- :func:`fuse_bn` -- a folded copy, the report logged to the ``adapters.onnx`` logger.
"""

from .fusion import fuse, fuse_bn

__all__ = ["fuse", "fuse_bn"]

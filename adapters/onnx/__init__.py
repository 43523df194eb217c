"""The ONNX adapter: fold BatchNormalization in ONNX graphs with the numpy core (``refimpl``); no torch needed."""

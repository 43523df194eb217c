"""Tools that ship with the ONNX adapter but that ``fuse`` does not need.

- :mod:`.cases` -- the named ONNX case suite (every fold family and trap, with hand-worked counts).
"""

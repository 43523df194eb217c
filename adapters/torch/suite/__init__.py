"""Tools that ship with the torch adapter but that ``fuse`` does not need.

- :mod:`.cases` -- the named case suite (every fold family and trap, with hand-worked counts);
- :mod:`.zoo` -- real torchvision/timm architectures with seeded random weights;
- :mod:`.audit` -- run any fuser over the cases and the zoo and judge each result;
- :mod:`.demo` -- the main job of ``python -m adapters.torch``: fuse, verify and time models.
"""

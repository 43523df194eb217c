"""Verify a folded exported program against the float64 reference run of the original."""

from __future__ import annotations

from typing import Any

from torch import fx, nn
from torch.export import ExportedProgram

from ..torch.checking import verify as verify_modules
from ..verdict import Verdict

__all__ = ["verify", "as_module"]


def as_module(program: Any, which: str) -> nn.Module:
    """The module that runs ``program``: an ExportedProgram's ``.module()``, a GraphModule or module itself."""
    if isinstance(program, ExportedProgram):
        return program.module()
    if isinstance(program, (fx.GraphModule, nn.Module)):
        return program
    raise TypeError(f"verify: the {which} program must be a torch.export.ExportedProgram, a torch.fx.GraphModule "
                    f"or an nn.Module, got {type(program).__module__}.{type(program).__qualname__}")


def verify(original: Any, folded: Any, example_inputs: Any, *, rounding_trials: int = 3) -> Verdict:
    """Check a folded program against the float64 reference run of the original program.

    ``original`` and ``folded`` are ExportedPrograms, GraphModules or modules (any mix: a program
    folded by another tool, a module it returned). Each is run through its module
    (``ExportedProgram.module()``); the reference is a float64 copy of the original's module run on
    the inputs in float64, and the folded program passes when its relative RMS error is within
    :data:`refimpl.MODEL_RATIO` times the original's own (:func:`adapters.torch.verify`, whose
    error model and output this is). ``example_inputs``: a tensor, or a tuple of the program's
    positional arguments.

    >>> import torch
    >>> from torch import nn
    >>> from adapters.export import fuse
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> x = torch.randn(2, 3, 8, 8)
    >>> exported = torch.export.export(model, (x,))
    >>> verify(exported, fuse(exported)[0], x).ok
    True
    """
    return verify_modules(as_module(original, "original"), as_module(folded, "folded"), example_inputs,
                          per_layer=False, rounding_trials=rounding_trials)

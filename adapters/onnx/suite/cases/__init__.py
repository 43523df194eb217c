"""Named ONNX graphs with a hand-worked answer: how many BatchNormalization nodes a correct folder removes.

Each :class:`Case` builds a tiny ``onnx.ModelProto`` with ``onnx.helper``, in the style of ONNX's own
node tests: a few channels, 6x6 inputs, random weights and randomised BatchNorm statistics drawn
from a ``numpy`` generator seeded by the case name, so every build is identical. Every model passes
``onnx.checker.check_model(full_check=True)`` and runs in onnxruntime.

The expected numbers are the oracle, worked out by hand from each graph's *dataflow*, never by
running a folder (each case's ``doc`` says why):

``folds``
    BatchNormalization nodes a correct folder removes (counted over the main graph, subgraphs
    and model-local functions);
``norms_left``
    BatchNormalization nodes that must remain;
``skips``
    for each BatchNormalization node that must remain (by node name), the report reason codes
    (``adapters.report.REASONS``) a correct folder may give;
``pairs``
    the folds themselves: :class:`Pair` (norm node, layer node, fold kind of
    ``adapters.report.FOLD_KINDS``, the norm's channel slice the layer takes), listed per layer in
    the order the folds apply (norms before the layer nearest first, then norms after it nearest
    first). Tests check the report and every folded weight against them.

One module per family (``conv_bn``, ``linear_bn``, ..., ``traps``); :mod:`.base` holds the registry
and :class:`GraphBuilder`.

The suite depends on numpy and onnx only.
"""

from __future__ import annotations

import importlib

from .base import CASES, FAMILIES, Case, GraphBuilder, Pair, count_batch_norms, get_case, iter_cases

__all__ = ["Case", "CASES", "FAMILIES", "Pair", "get_case", "iter_cases", "count_batch_norms", "GraphBuilder"]

#: The family modules, imported in this order: the order of registration, of ``iter_cases`` and of the audit.
FAMILY_MODULES = ("conv_bn", "conv_transpose_bn", "linear_bn", "bn_conv", "bn_linear", "norms", "structure", "traps")
for _module in FAMILY_MODULES:
    importlib.import_module(f"{__name__}.{_module}")

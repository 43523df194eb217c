"""The torch case suite: small named models, each with a hand-worked answer (what a correct fuser folds and what
it leaves), registered by family.

``registry`` holds the :class:`Case` type and the registry (the expected numbers are explained there); one module
per family registers its cases, in the order below, which is the suite's order; ``model_tools`` recognises,
randomises and counts norm layers; ``norm_layers`` defines the torchvision/timm norm layers the cases need.
Cases written from real model code register from :mod:`adapters.torch.suite.realcode_cases`.
"""

# The registry first; realcode_cases (imported last) takes Case and _register from here.
from .registry import CASES, FAMILIES, Case, _register, get_case, iter_cases  # noqa: F401, I001
from .model_tools import (
    count_calls,
    count_norm_calls,
    is_norm_module,
    norm_module_names,
    randomize_norm_stats,
    randomize_parameters,
)
from .norm_layers import BatchNormAct2d, Conv2dSame, FrozenBatchNorm2d, ShiftedBatchNorm2d
from . import conv_bn, conv_transpose_bn, linear_and_bn_before, norm_variants, traps  # noqa: F401  (register, in order)
from .. import realcode_cases  # noqa: F401  (registers the cases written from real model code)

__all__ = [
    "Case", "CASES", "FAMILIES", "get_case", "iter_cases", "is_norm_module", "norm_module_names",
    "randomize_parameters", "randomize_norm_stats", "count_calls", "count_norm_calls",
    "FrozenBatchNorm2d", "BatchNormAct2d", "ShiftedBatchNorm2d", "Conv2dSame",
]

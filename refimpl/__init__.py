"""bnfold's reference implementation: the BatchNorm fold math, the branch-merging kernel algebra, float64
reference ops, and the error model.

The fold functions are written once over the array API namespace of their inputs, so they
run unchanged on numpy arrays and torch tensors (CPU or CUDA). The reference ops are plain
float64 numpy transcriptions of their definitions, mirroring ``torch.nn.functional``.
"""

from .fold import bn_scale_shift, fold_bn_conv, fold_bn_linear, fold_conv_bn, fold_linear_bn
from .merge import (
                    ConvGeometry,
                    Kernel,
                    MergeError,
                    add_branches,
                    avg_pool_geometry,
                    avg_pool_kernel,
                    chain_kernels,
                    check_padding_shift,
                    compose_geometry,
                    compose_kernels,
                    identity_kernel,
                    merge_geometry,
                    pad_kernel,
                    regroup_kernel,
                    scale_channels,
                    sum_kernels,
)
from .ops import avg_pool, batch_norm, conv, conv_transpose, linear
from .tolerance import (
                        MODEL_RATIO,
                        SAFETY,
                        UNIT_ROUNDOFF,
                        Comparison,
                        ModelComparison,
                        assert_within,
                        compare,
                        compare_models,
                        error_bound,
                        relative_rms_error,
                        unit_roundoff,
)

__all__ = [
    "bn_scale_shift", "fold_conv_bn", "fold_linear_bn", "fold_bn_conv", "fold_bn_linear",
    "ConvGeometry", "MergeError", "pad_kernel", "identity_kernel", "avg_pool_kernel", "scale_channels",
    "regroup_kernel", "add_branches", "compose_kernels", "merge_geometry", "compose_geometry", "check_padding_shift",
    "avg_pool_geometry", "Kernel", "sum_kernels", "chain_kernels",
    "conv", "conv_transpose", "batch_norm", "linear", "avg_pool",
    "UNIT_ROUNDOFF", "SAFETY", "MODEL_RATIO", "unit_roundoff", "error_bound", "Comparison", "compare", "assert_within",
    "relative_rms_error", "ModelComparison", "compare_models",
]
__version__ = "0.1.0"

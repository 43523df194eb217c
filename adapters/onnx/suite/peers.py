"""Other tools that fold BatchNormalization in ONNX graphs, each as a pass ``ModelProto -> ModelProto``.

Every function takes the model and returns a new one (the argument is not modified), called the
way each tool's documentation shows, with its defaults; they are what ``python -m adapters.onnx
audit`` and the benchmarks run. The tools come with the ``peers`` extra (onnxruntime with ``onnx``).

- :func:`onnxoptimizer_fuse_bn` -- ``onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])``.
- :func:`onnxscript_fuse_bn` -- onnxscript's BatchNorm fusion rules (``fuse_batchnorm_into_conv``,
  ``_conv_transpose``, ``_gemm`` from ``onnxscript.rewriter.rules.common``), the rules that
  ``torch.onnx.export(..., dynamo=True)`` applies through onnxscript's optimizer by default.
- :func:`onnxsim_simplify` -- ``onnxsim.simplify(model)`` (constant folding, shape inference and
  onnxoptimizer's fusions, ``fuse_bn_into_conv`` among them).
- :func:`onnxslim_slim` -- ``onnxslim.slim(model)``.
- :func:`onnxruntime_basic` / :func:`onnxruntime_extended` -- the model onnxruntime writes to
  ``SessionOptions.optimized_model_filepath`` after its basic / extended graph optimizations on
  the CPU (the offline-optimized model its documentation recommends for deployment). The
  extended level writes onnxruntime's own ops (domain ``com.microsoft``), which only onnxruntime runs.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx

__all__ = ["PEERS", "TOOL_CALLS", "onnxoptimizer_fuse_bn", "onnxscript_fuse_bn", "onnxsim_simplify", "onnxslim_slim",
           "onnxruntime_basic", "onnxruntime_extended"]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


@contextlib.contextmanager
def _quiet():
    """The tools print progress tables and banners to stdout; a pass returns a model and says nothing."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# Each tool's own call. It may modify or consume the model it is given (the benchmarks hand it a fresh copy,
# made outside the timed region); the public functions below give it a copy of the caller's model.


def _onnxoptimizer(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxoptimizer

    return onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])


def _onnxscript(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
    )

    rules = [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule]
    return rewriter.rewrite(model, pattern_rewrite_rules=rules)


def _onnxsim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    with _quiet():
        simplified, _ = onnxsim.simplify(model)
    return simplified


def _onnxslim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    with _quiet():
        return onnxslim.slim(model)


def _onnxruntime_offline(model: onnx.ModelProto, level_name: str) -> onnx.ModelProto:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel, level_name)
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "model.onnx"
        target = Path(folder) / "optimized.onnx"
        onnx.save_model(model, source, save_as_external_data=model.ByteSize() > 1_800_000_000,
                        location="model.onnx.data")
        options.optimized_model_filepath = str(target)
        onnxruntime.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        return onnx.load(target)


def onnxoptimizer_fuse_bn(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxoptimizer's ``fuse_bn_into_conv`` pass alone."""
    return _onnxoptimizer(_copy(model))


def onnxscript_fuse_bn(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxscript's three BatchNorm fusion rewrite rules (Conv, ConvTranspose, Gemm)."""
    return _onnxscript(_copy(model))


def onnxsim_simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """``onnxsim.simplify`` with its defaults (its own output check is off by default: ``check_n=0``)."""
    return _onnxsim(_copy(model))


def onnxslim_slim(model: onnx.ModelProto) -> onnx.ModelProto:
    """``onnxslim.slim`` with its defaults."""
    return _onnxslim(_copy(model))


def onnxruntime_basic(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model onnxruntime saves after its basic graph optimizations (constant folding, Conv+BN fusion, ...)."""
    return _onnxruntime_offline(model, "ORT_ENABLE_BASIC")


def onnxruntime_extended(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model onnxruntime saves after its extended graph optimizations (basic plus its own fused ops)."""
    return _onnxruntime_offline(model, "ORT_ENABLE_EXTENDED")


#: The folding tools' own calls, for timing: each may modify the model it is given.
TOOL_CALLS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "onnxoptimizer": _onnxoptimizer,
    "onnxscript": _onnxscript,
    "onnxsim": _onnxsim,
    "onnxslim": _onnxslim,
}


#: Every peer by the name the audit table uses, as ``module:function`` for ``python -m adapters.onnx audit``.
PEERS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "onnxoptimizer": onnxoptimizer_fuse_bn,
    "onnxscript": onnxscript_fuse_bn,
    "onnxsim": onnxsim_simplify,
    "onnxslim": onnxslim_slim,
    "onnxruntime-basic": onnxruntime_basic,
    "onnxruntime-extended": onnxruntime_extended,
}

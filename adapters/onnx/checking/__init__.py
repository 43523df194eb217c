"""Verify a folded ONNX graph against the float64 reference run of the original graph.

:func:`verify` runs the original graph in float64 with onnx's ``ReferenceEvaluator`` (a retyped copy,
:mod:`.retype`, with the evaluator's faulty kernels replaced from :mod:`refimpl.ops`, :mod:`.kernels`), both
graphs in their own dtype with onnxruntime, every optimization off (:mod:`.run`), and judges each output and
each shared intermediate value with the project's error model (:mod:`.judge`). Why three engines, which
kernels are replaced and which values a fold may change: spec/onnx.md, "Verifying a folded graph".
"""

from ...verdict import LayerDivergence, ModelRunError, OutputCheck, Verdict
from .feeds import choose_input_shapes, graph_feeds, make_feeds
from .judge import verify
from .kernels import REFERENCE_KERNELS
from .retype import load_model, retyped_copy
from .run import onnxruntime_session, reference_outputs, rounded_copy, run_onnxruntime

__all__ = ["verify", "reference_outputs", "run_onnxruntime", "retyped_copy", "rounded_copy", "make_feeds",
           "choose_input_shapes", "load_model", "graph_feeds", "onnxruntime_session", "REFERENCE_KERNELS",
           "Verdict", "OutputCheck", "LayerDivergence", "ModelRunError"]

"""ONNX fold accuracy: the folded graph's error against the float64 reference, divided by the unfused graph's own.

For each ONNX zoo network (``adapters.onnx.suite.zoo``, exported with every BatchNormalization kept)
and each dtype: float32 as exported, and float16 -- the export with every floating-point tensor
rounded once to float16 (``adapters.onnx.checking.retyped_copy``: initializers, Constants, inputs,
outputs and value_info, so the whole graph is a float16 graph, as a float16 deployment gets it).
The reference is the float64 run of that graph (its own parameters, exactly) by the reference
evaluator; the unfused graph, each tool's folded graph and a copy of the unfused graph with every
parameter rounded once more (``rounded_copy``, the ``perturbed`` baseline of
``refimpl.compare_models``) run in onnxruntime on the CPU with graph optimizations disabled.

Columns: the unfused graph's relative RMS error, the parameter-rounded copy's, and for each tool
its error as a multiple of the unfused error (target for ours: <= 1.2x in float32 and float16).

Two engines run the float16 graphs. onnxruntime's CPU execution provider has no float16 Conv on
x86: it inserts Cast nodes (also with optimizations disabled) and computes a float16 graph in
float32 between float16 inputs, outputs and parameters -- its unfused error is little more than
the output's rounding, and any fold that stores its parameters in float16 is many times that. So
float16 is also run by onnx's reference evaluator on float16 arrays (``engine`` = evaluator): every
intermediate tensor is float16, dot products accumulate in float32 (numpy), BatchNormalization is
computed exactly and rounded once -- float16 arithmetic as a float16 accelerator does it.

Command: ``python benchmarks/onnx_accuracy.py [--models a,b] [--batch 8] [--json [PATH]]``
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from onnx import TensorProto  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from adapters.onnx.checking import (  # noqa: E402
    REFERENCE_KERNELS,
    reference_outputs,
    retyped_copy,
    rounded_copy,
    run_onnxruntime,
)
from adapters.onnx.suite.cases import count_batch_norms  # noqa: E402
from benchmarks.common import Report, Table, base_parser, format_float, machine_info, parse_models  # noqa: E402
from refimpl import relative_rms_error  # noqa: E402

log = logging.getLogger("bnfold.benchmarks.onnx_accuracy")

DEFAULT_MODELS = ("torchvision/resnet50", "torchvision/mobilenet_v3_large", "torchvision/efficientnet_b0",
                  "torchvision/regnet_y_800mf", "torchvision/vgg16_bn")
QUICK_MODELS = ("torchvision/mobilenet_v3_large",)
PEER_NAMES = ("onnxoptimizer", "onnxscript", "onnxsim", "onnxslim")
TOOL_NAMES = ("ours", *PEER_NAMES)
TARGET = 1.2


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def run_evaluator(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The graph in its own dtype in onnx's reference evaluator (with the reference's BatchNormalization kernels)."""
    evaluator = ReferenceEvaluator(model, new_ops=list(REFERENCE_KERNELS))
    return np.asarray(evaluator.run(None, feeds)[0])


def run_onnxruntime_output(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return run_onnxruntime(model, feeds)[0]


ENGINES = {"onnxruntime": run_onnxruntime_output, "evaluator": run_evaluator}


def measure(model: onnx.ModelProto, feeds: dict[str, np.ndarray], rounding_trials: int, engine: str,
            reference: np.ndarray) -> dict[str, Any]:
    from adapters.onnx import fuse
    from adapters.onnx.suite.peers import TOOL_CALLS

    run = ENGINES[engine]
    calls = {"ours": lambda m: fuse(m, inplace=True)[0], **{name: TOOL_CALLS[name] for name in PEER_NAMES}}
    unfused_error = relative_rms_error(run(model, feeds), reference)
    rounded_error = max(relative_rms_error(run(rounded_copy(model, seed), feeds), reference)
                        for seed in range(rounding_trials))
    tools: dict[str, Any] = {}
    for name, call in calls.items():
        try:
            folded = call(_copy(model))
            output = run(folded, feeds)
        except Exception as error:  # a tool that fails is reported in its cell
            tools[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''}"}
            continue
        error_ = relative_rms_error(output, reference)
        tools[name] = {"rms_error": error_, "ratio": error_ / unfused_error if unfused_error else float("inf"),
                       "ratio_to_rounded": error_ / max(unfused_error, rounded_error),
                       "norms_left": count_batch_norms(folded)}
    return {"unfused_rms_error": unfused_error, "rounded_rms_error": rounded_error, "tools": tools}


def _cell(tool: dict[str, Any], key: str) -> str:
    if "error" in tool:
        return f"error: {tool['error']}"
    return f"{tool[key]:.2f}×" if tool[key] < 100 else f"{tool[key]:.3g}×"


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__ or "", default_models=DEFAULT_MODELS, quick_models=QUICK_MODELS)
    parser.add_argument("--batch", type=int, default=8, help="batch of the exported graphs (default 8)")
    parser.add_argument("--rounding-trials", type=int, default=3, help="parameter-rounded copies (default 3)")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    from adapters.onnx.suite.zoo import ONNX_ZOO

    names = parse_models(args.models, args.quick, DEFAULT_MODELS, QUICK_MODELS, list(ONNX_ZOO))
    report = Report("ONNX fold accuracy", machine_info(torch.device("cpu")),
                    {"batch": args.batch, "input": f"{args.batch}x3x64x64", "exporter": args.exporter,
                     "rounding_trials": args.rounding_trials, "onnx": onnx.__version__})
    ratios = Table("Folded RMS error / unfused RMS error, against the float64 reference of the same graph",
                   ["model", "dtype", "engine", "unfused RMS err", "rounded RMS err",
                    *[f"{t} RMS×" for t in TOOL_NAMES], "ours target"])
    rounded = Table("Folded RMS error / the larger of the unfused and the parameter-rounded errors",
                    ["model", "dtype", "engine", *[f"{t} RMS×" for t in TOOL_NAMES]])
    for name in names:
        print(f"exporting {name} ...", file=sys.stderr, flush=True)
        model32, feeds32 = ONNX_ZOO[name].export(seed=args.seed, batch=args.batch, exporter=args.exporter)
        for dtype, engine in (("fp32", "onnxruntime"), ("fp16", "onnxruntime"), ("fp16", "evaluator")):
            print(f"measuring {name} {dtype} {engine} ...", file=sys.stderr, flush=True)
            if dtype == "fp32":
                model, feeds = model32, feeds32
            else:
                model = retyped_copy(model32, TensorProto.FLOAT16)
                feeds = {k: v.astype(np.float16) for k, v in feeds32.items()}
            (reference,) = reference_outputs(model, feeds)
            result = measure(model, feeds, args.rounding_trials, engine, reference)
            ours = result["tools"]["ours"]
            target = ("—" if "error" in ours else
                      f"{'meets' if ours['ratio'] <= TARGET else 'MISSES'} <= {TARGET:g}×")
            ratios.rows.append([name, dtype, engine, format_float(result["unfused_rms_error"]),
                                format_float(result["rounded_rms_error"]),
                                *[_cell(result["tools"][t], "ratio") for t in TOOL_NAMES], target])
            rounded.rows.append([name, dtype, engine,
                                 *[_cell(result["tools"][t], "ratio_to_rounded") for t in TOOL_NAMES]])
            ratios.records.append({"model": name, "dtype": dtype, "engine": engine, **result})
    report.tables += [ratios, rounded]
    report.emit(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

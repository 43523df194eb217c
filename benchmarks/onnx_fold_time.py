"""ONNX fold time and peak memory: ours against onnxoptimizer, onnxscript's rules, onnxsim and onnxslim.

The ONNX zoo (``adapters.onnx.suite.zoo``: torchvision networks with random weights and calibrated
BatchNorm statistics, exported with every BatchNormalization kept) is exported once; then, per
model, every tool folds its own fresh copy of the model (the copy is made before the clock starts),
in an order rotated each round so that no tool always runs first or last. Reported: the median
over ``--reps`` rounds (after one untimed warm-up round) of each call's CPU time
(``time.process_time``: every thread of this process, robust to other load on the machine) and
wall time, with BLAS/OpenMP/torch limited to one thread. The tools' own calls are those of
``adapters.onnx.suite.peers.TOOL_CALLS``; ours is ``fuse(model, inplace=True)`` (and, for
reference, ``fuse(model)``, which first copies the model).

Peak extra memory: each (model, tool) runs once in a fresh child process, which first folds a tiny
model with the same tool (so that imports and first-use set-up are not counted), loads the model,
resets the resident-set high-water mark (``echo 5 > /proc/self/clear_refs``), folds, and reports
``VmHWM`` minus the resident set just before the fold: what the fold needs on top of the model
it was given, output included. Targets (issue 8): ours <= the fastest peer's time on every model,
peak extra memory <= 0.1x the model's weights.

Command: ``python benchmarks/onnx_fold_time.py [--models a,b] [--reps 5] [--no-memory] [--json [PATH]]``
"""

from __future__ import annotations

import os

# One thread everywhere, before numpy/onnxruntime/torch are imported: the comparison is of the tools, not of
# how many cores they grab on a shared machine.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import gc  # noqa: E402
import logging  # noqa: E402
import multiprocessing  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx  # noqa: E402

# torch (and benchmarks.common, which imports it) are imported in main() only: the memory measurements run in
# spawned children that re-import this module and need nothing but onnx and the tools.

log = logging.getLogger("bnfold.benchmarks.onnx_fold_time")

DEFAULT_MODELS = ("torchvision/resnet50", "torchvision/mobilenet_v3_large", "torchvision/efficientnet_b0",
                  "torchvision/regnet_y_800mf", "torchvision/vgg16_bn")
QUICK_MODELS = ("torchvision/mobilenet_v3_large",)
PEER_NAMES = ("onnxoptimizer", "onnxscript", "onnxsim", "onnxslim")
TOOL_NAMES = ("ours", "ours, copy", *PEER_NAMES)


def tool_calls() -> dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]]:
    """Every tool's call by name; each may modify the model it is given."""
    from adapters.onnx import fuse
    from adapters.onnx.suite.peers import TOOL_CALLS

    return {"ours": lambda model: fuse(model, inplace=True)[0],
            "ours, copy": lambda model: fuse(model)[0],
            **{name: TOOL_CALLS[name] for name in PEER_NAMES}}


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def parameters(model: onnx.ModelProto) -> int:
    return sum(int(_prod(t.dims)) for t in model.graph.initializer)


def _prod(dims: Any) -> int:
    total = 1
    for d in dims:
        total *= d
    return total


def time_tools(model: onnx.ModelProto, reps: int) -> dict[str, dict[str, Any]]:
    """Interleaved rounds; per tool the median CPU and wall seconds and the BatchNormalization nodes left."""
    from adapters.onnx.suite.cases import count_batch_norms

    calls = tool_calls()
    names = list(calls)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    left: dict[str, int] = {}
    errors: dict[str, str] = {}
    for round_index in range(reps + 1):  # round 0 is the warm-up
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            if name in errors:
                continue
            given = _copy(model)
            gc.collect()
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            try:
                result = calls[name](given)
            except Exception as error:  # a tool that fails on a model is reported as such, not fatal
                errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''}"
                continue
            elapsed_cpu, elapsed_wall = time.process_time() - start_cpu, time.perf_counter() - start_wall
            if round_index:
                cpu[name].append(elapsed_cpu)
                wall[name].append(elapsed_wall)
            left[name] = count_batch_norms(result)
            del result, given
    return {name: {"cpu_s": statistics.median(cpu[name]) if cpu[name] else None,
                   "wall_s": statistics.median(wall[name]) if wall[name] else None,
                   "runs": len(cpu[name]), "norms_left": left.get(name), "error": errors.get(name)}
            for name in names}


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _memory_child(path: str, tool: str, queue: Any) -> None:
    try:
        from adapters.onnx.suite.cases import get_case

        call = tool_calls()[tool]
        call(get_case("conv2d_bn").build())  # imports and first-use set-up are not the fold's memory
        model = onnx.load(path)
        given = _copy(model) if tool != "ours, copy" else model
        del model
        gc.collect()
        before = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")  # resets VmHWM to the current resident set
        result = call(given)
        peak = _status_kb("VmHWM")
        queue.put(((peak - before) * 1024, None))
        del result
    except Exception as error:  # reported in the table
        queue.put((None, f"{type(error).__name__}: {error}"))


def peak_extra_memory(path: str, tool: str) -> tuple[int | None, str | None]:
    """Peak resident memory the fold adds, measured in a fresh process (bytes), or the error."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_memory_child, args=(path, tool, queue))
    process.start()
    try:
        return queue.get(timeout=1800)
    finally:
        process.join()


def _ms_cell(measured: dict[str, Any]) -> str:
    return f"error: {measured['error']}" if measured["error"] else f"{1e3 * measured['cpu_s']:.1f}"


def _share_cell(extra: int | None, weights: int) -> str:
    if extra is None:
        return "—"
    verdict = "meets" if extra <= 0.1 * weights else "MISSES"
    return f"{extra / weights:.3f}× ({verdict} <= 0.1×)"


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.common import Report, Table, base_parser, format_ratio, machine_info, parse_models

    parser = base_parser(__doc__ or "", default_models=DEFAULT_MODELS, quick_models=QUICK_MODELS)
    parser.add_argument("--reps", type=int, default=5, help="timed rounds per model (default 5)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    from adapters.onnx.suite.zoo import ONNX_ZOO

    names = parse_models(args.models, args.quick, DEFAULT_MODELS, QUICK_MODELS, list(ONNX_ZOO))
    reps = 2 if args.quick and args.reps == 5 else args.reps
    report = Report("ONNX fold time and peak memory", machine_info(torch.device("cpu")),
                    {"reps": reps, "exporter": args.exporter, "threads": 1, "input": "2x3x64x64",
                     "onnx": onnx.__version__})
    times = Table("Fold time (median CPU ms; wall ms in the JSON)",
                  ["model", "params", "BN", *[f"{t} ms" for t in TOOL_NAMES], "ours / fastest peer",
                   "BN left (" + "/".join(TOOL_NAMES) + ")"])
    memory = Table("Peak extra memory during the fold (MB; ratio to the model's weights)",
                   ["model", "weights MB", *[f"{t} MB" for t in TOOL_NAMES], "ours / weights", "ours, copy / weights"])
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            entry = ONNX_ZOO[name]
            print(f"exporting {name} ...", file=sys.stderr, flush=True)
            model, _ = entry.export(seed=args.seed, exporter=args.exporter)
            weights = weight_bytes(model)
            print(f"timing {name} ({weights / 1e6:.0f} MB of weights) ...", file=sys.stderr, flush=True)
            measured = time_tools(model, reps)
            peers = [measured[p]["cpu_s"] for p in PEER_NAMES if measured[p]["cpu_s"] is not None]
            fastest = min(peers) if peers else None
            ours = measured["ours"]["cpu_s"]
            ratio = ours / fastest if ours is not None and fastest else None
            verdict = "—" if ratio is None else f"{format_ratio(ratio)} ({'meets' if ratio <= 1 else 'MISSES'} <= 1×)"
            times.rows.append([name, f"{parameters(model) / 1e6:.1f} M", entry.batch_norms,
                               *[_ms_cell(measured[t]) for t in TOOL_NAMES], verdict,
                               "/".join(str(measured[t]["norms_left"]) for t in TOOL_NAMES)])
            times.records.append({"model": name, "parameters": parameters(model), "weight_bytes": weights,
                                  "batch_norms": entry.batch_norms, "tools": measured, "ours_over_fastest": ratio})
            if args.no_memory:
                continue
            path = str(Path(folder) / "model.onnx")
            onnx.save_model(model, path)
            del model
            extra = {}
            for tool in TOOL_NAMES:
                print(f"memory {name} {tool} ...", file=sys.stderr, flush=True)
                extra[tool] = peak_extra_memory(path, tool)
            cells = [f"error: {e[1]}" if e[0] is None else f"{e[0] / 1e6:.1f}" for e in extra.values()]
            memory.rows.append([name, f"{weights / 1e6:.1f}", *cells, _share_cell(extra["ours"][0], weights),
                                _share_cell(extra["ours, copy"][0], weights)])
            memory.records.append({"model": name, "weight_bytes": weights,
                                   "peak_extra_bytes": {t: e[0] for t, e in extra.items()},
                                   "errors": {t: e[1] for t, e in extra.items() if e[1]}})
    report.tables.append(times)
    if not args.no_memory:
        report.tables.append(memory)
    report.emit(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

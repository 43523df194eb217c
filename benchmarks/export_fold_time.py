"""Export fold time and peak memory: adapters.export against pt2e's ``_fuse_conv_bn_``.

Each network of the export zoo (``adapters.export.suite.zoo``: torchvision/timm with random weights
and statistics, input 1x3x64x64) is exported once (training IR) and saved to memory; every timed
call gets a fresh program loaded from those bytes (before the clock starts), and the tools run in
an order rotated each round. Tools:

- ``bnfold (program)`` -- ``adapters.export.fuse(program, inplace=True)`` on the ExportedProgram;
- ``bnfold (module)`` -- ``adapters.export.fuse(program.module(), inplace=True)``: the same input pt2e gets;
- ``pt2e`` -- ``_fuse_conv_bn_(program.module())`` (torchao; in place, as ``prepare_pt2e`` calls it);
- ``bnfold (copy)`` -- ``adapters.export.fuse(program)``, which copies graph and tables first (reference).

Reported: the median CPU time (``time.process_time``, one torch thread) over ``--reps`` rounds after
one untimed warm-up round, and the peak extra memory: each (model, tool) once in a forked child
that first folds a small model with the same tool (imports and first-use set-up are not counted),
loads the program, resets the resident-set high-water mark (``echo 5 > /proc/self/clear_refs``),
folds, and reports ``VmHWM`` minus the resident set just before the fold, as a multiple of the
model's weights (glibc's mmap threshold fixed at 128 KiB, so that freed weights leave the resident
set; tensors under 128 KiB come from the heap and are not seen). Targets (issue 16): bnfold's time
<= pt2e's, peak extra <= 0.1x the weights.

Command: ``python benchmarks/export_fold_time.py [--models a,b] [--reps 5] [--no-memory]``
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import multiprocessing  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import describe_machine, machine_info, markdown_table  # noqa: E402

DEFAULT_MODELS = ("torchvision/resnet18", "torchvision/mobilenet_v3_small", "torchvision/efficientnet_b0",
                  "timm/mobilenetv3_large_100", "torchvision/resnet50")


def _pt2e() -> Callable[[Any], None]:
    from adapters.export.suite.peers import _pt2e_fuse
    return _pt2e_fuse()


def _tools() -> dict[str, tuple[bool, Callable[[Any], Any]]]:
    """name -> (takes program.module(), fold)."""
    from adapters.export import fuse
    tools: dict[str, tuple[bool, Callable[[Any], Any]]] = {
        "bnfold (program)": (False, lambda p: fuse(p, inplace=True)),
        "bnfold (module)": (True, lambda m: fuse(m, inplace=True)),
        "bnfold (copy)": (False, lambda p: fuse(p)),
    }
    try:
        fold = _pt2e()
        tools["pt2e"] = (True, fold)
    except ImportError as error:
        print(f"note: pt2e left out: {error}", file=sys.stderr)
    return tools


def _load(data: bytes, as_module: bool) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.load(io.BytesIO(data))
    return program.module() if as_module else program


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(data: bytes, small: bytes, tool: str, queue: Any) -> None:
    as_module, fold = _tools()[tool]
    fold(_load(small, as_module))
    target = _load(data, as_module)
    gc.collect()
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")
    fold(target)
    queue.put((_status_kb("VmHWM") - before) * 1024)


def _peak_extra(data: bytes, small: bytes, tool: str) -> float | None:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=_memory_child, args=(data, small, tool, queue))
    process.start()
    process.join(600)
    return queue.get() if process.exitcode == 0 and not queue.empty() else None


def _fixed_mmap_threshold() -> None:
    """Large allocations through mmap, always: glibc otherwise raises its threshold after the first large free,
    and freed weights then stay in the heap and in the resident set, which would hide what a fold frees."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD; a fixed value stops the adjustment
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    from adapters.export.suite.zoo import build

    _fixed_mmap_threshold()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tools = _tools()
    small_model, small_x = build("torchvision/resnet18")
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(small_model, (small_x[:, :, :32, :32],)), buffer)
    small = buffer.getvalue()
    rows = []
    for name in args.models.split(","):
        model, x = build(name)
        program = torch.export.export(model, (x,))
        weights = sum(t.numel() * t.element_size() for t in program.state_dict.values())
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        data = buffer.getvalue()
        times: dict[str, list[float]] = {tool: [] for tool in tools}
        order = list(tools)
        for round_ in range(args.reps + 1):
            for tool in order[round_ % len(order):] + order[:round_ % len(order)]:
                as_module, fold = tools[tool]
                target = _load(data, as_module)
                gc.collect()
                start = time.process_time()
                fold(target)
                elapsed = time.process_time() - start
                if round_:
                    times[tool].append(elapsed)
                del target
        row = [name, f"{weights / 2**20:.1f}"]
        for tool in tools:
            row.append(f"{statistics.median(times[tool]) * 1000:.0f}")
        if not args.no_memory:
            for tool in tools:
                extra = _peak_extra(data, small, tool)
                row.append("-" if extra is None else f"{extra / weights:.3f}")
        rows.append(row)
        print(" | ".join(row), file=sys.stderr, flush=True)
    headers = ["model", "weights MiB"] + [f"{t} ms" for t in tools]
    if not args.no_memory:
        headers += [f"{t} peak extra / weights" for t in tools]
    machine = describe_machine(machine_info(torch.device("cpu")))
    print(f"# export fold time (median of {args.reps}, CPU time, 1 thread); {machine}")
    print(markdown_table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

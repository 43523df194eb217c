"""Structural re-parameterisation: inference time and accuracy of ours against the model's own and BN folding alone.

Usage: ``python benchmarks/reparam.py [--models a,b] [--size N] [--rounds N] [--threads-list 1,2] [--quick]
[--json [PATH]]``

Each model -- timm's repvgg_a0, mobileone_s0, fastvit_t8, repghostnet_050, repvit_m1 and the YOLO-style
RepConv backbone of ``adapters/torch/suite/merge_cases.py`` -- is built with random weights and calibrated
random BatchNorm statistics (``adapters.torch.suite.zoo.randomize_calibrated_norm_stats``) and prepared
four ways: unfused; BN folding alone (``adapters.torch.fuse``); ours (``adapters.torch.reparameterize``);
the model's own re-parameterisation (``timm.utils.reparameterize_model``, which calls each block's
hand-written ``reparameterize``/``fuse``; the RepConv backbone has none, so that column repeats unfused).

Time (CPU, fp32, batch 1). The variants run interleaved -- one forward pass of each in turn, ``--rounds``
times, each round starting one variant later -- and each cell is the median. With one thread (the default)
the time is the process's CPU time (``time.process_time``), which other processes on a shared machine do
not inflate; with more threads (``--threads-list 1,2``) it is wall time (``time.perf_counter``), since CPU
time would add up the threads.

Accuracy. The relative RMS error of the output against a float64 run of the original, divided by the
unfused model's own error in the same dtype (fp32 and fp16), for ours and BN folding alone on the model
converted to the dtype, and for ours and timm's re-parameterisation done on the float32 model and then
converted (what a user of timm deploys), plus timm's done directly on the fp16 model. Batch 8 at
``--accuracy-size``; each cell is the mean (and worst) ratio over ``--seeds`` models with different weights
and statistics, since one model's rounding pattern makes a single ratio noisy.
"""

from __future__ import annotations

import copy
import logging
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import (  # noqa: E402
    Report,
    Table,
    base_parser,
    format_float,
    machine_info,
    parse_models,
    short_error,
)

log = logging.getLogger("bnfold.benchmarks.reparam")

MODELS = ("repvgg_a0", "mobileone_s0", "fastvit_t8", "repghostnet_050", "repvit_m1", "repconv_backbone")
QUICK_MODELS = ("repvgg_a0", "repconv_backbone")
VARIANTS = ("unfused", "fuse", "ours", "timm")


def build(name: str, seed: int) -> nn.Module:
    import timm

    from adapters.torch.suite.merge_cases import repconv_backbone
    from adapters.torch.suite.zoo import randomize_calibrated_norm_stats

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = repconv_backbone() if name == "repconv_backbone" else timm.create_model(name, pretrained=False)
    randomize_calibrated_norm_stats(model, (3, 64, 64), torch.Generator().manual_seed(seed))
    return model.eval()


def variants(model: nn.Module, example: torch.Tensor) -> dict[str, nn.Module]:
    from timm.utils import reparameterize_model

    from adapters.torch import fuse, reparameterize

    return {"unfused": model,
            "fuse": fuse(model, example_inputs=(example,))[0],
            "ours": reparameterize(model, example_inputs=(example,))[0],
            "timm": reparameterize_model(copy.deepcopy(model))}


def _clock(threads: int) -> Callable[[], float]:
    return time.process_time if threads == 1 else time.perf_counter


def time_variants(models: dict[str, nn.Module], x: torch.Tensor, *, rounds: int, threads: int) -> dict[str, float]:
    """Median seconds per forward pass of each model, run interleaved (one pass of each per round).

    Each round starts one model later than the last, so that every model runs equally often in every place of
    the round: the model run first in a round is slower (by ~1% for two copies of one model on a 2-core AMD EPYC),
    and a fixed order would hand that to one of them.
    """
    clock = _clock(threads)
    samples: dict[str, list[float]] = {name: [] for name in models}
    order = list(models.items())
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model(x)
        for round_index in range(rounds):
            shift = round_index % len(order)
            for name, model in order[shift:] + order[:shift]:
                start = clock()
                model(x)
                samples[name].append(clock() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def count_calls(model: nn.Module, x: torch.Tensor) -> tuple[int, int, int]:
    """Conv/linear calls, norm calls and calls of any module (each costs Python overhead besides its
    arithmetic) during one forward pass."""
    from adapters.torch.suite import cases
    from adapters.torch.suite.merge_cases import count_layer_calls

    return count_layer_calls(model, x), cases.count_norm_calls(model, x), cases.count_calls(model, x)


ACCURACY_VARIANTS = ("ours", "fuse", "ours (fp32, then converted)", "timm (fp32, then converted)",
                     "timm (in the dtype)")


def accuracy(model: nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    """Per dtype, the unfused model's relative RMS error and each variant's error over it (or why it failed)."""
    from timm.utils import reparameterize_model

    from adapters.torch import fuse, reparameterize
    from refimpl import relative_rms_error

    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())
    records = []
    for dtype_name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        low = copy.deepcopy(model).to(dtype)
        xd = x.to(dtype)
        makers: dict[str, Callable[[], nn.Module]] = {
            "ours": partial(lambda m, x: reparameterize(m, example_inputs=(x,))[0], low, xd),
            "fuse": partial(lambda m, x: fuse(m, example_inputs=(x,))[0], low, xd),
            "timm (fp32, then converted)": partial(lambda d: reparameterize_model(copy.deepcopy(model)).to(d), dtype)}
        if dtype != torch.float32:  # in fp32 these are the rows above
            makers["ours (fp32, then converted)"] = partial(lambda d: reparameterize(model)[0].to(d), dtype)
            makers["timm (in the dtype)"] = partial(lambda m: reparameterize_model(copy.deepcopy(m)), low)
        with torch.no_grad():
            unfused = relative_rms_error(low(xd).double(), reference)
            record: dict[str, Any] = {"dtype": dtype_name, "unfused_error": unfused}
            for name, make in makers.items():
                try:
                    record[name] = relative_rms_error(make()(xd).double(), reference) / unfused
                except Exception as exc:  # the model's own code may fail in fp16: a result, not a crash
                    record[name] = f"fails: {short_error(exc, 60)}"
        records.append(record)
    return records


def timing_rows(name: str, args, rounds: int, thread_counts: list[int], table: Table) -> None:
    torch.set_num_threads(1)
    model = build(name, args.seed)
    x = torch.randn((1, 3, args.size, args.size), generator=torch.Generator().manual_seed(args.seed + 1))
    prepared = variants(model, x)
    calls = {v: count_calls(m, x) for v, m in prepared.items()}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        medians = time_variants(prepared, x, rounds=rounds, threads=threads)
        ms = {v: medians[v] * 1e3 for v in VARIANTS}
        row = [name, threads, "CPU" if threads == 1 else "wall", f"{ms['unfused']:.1f}"]
        row += [f"{ms[v]:.1f} ({ms['unfused'] / ms[v]:.2f}×)" for v in ("fuse", "ours", "timm")]
        row += [f"{ms['ours'] / ms['timm']:.3f}", "/".join(str(calls[v][0]) for v in VARIANTS),
                "/".join(str(calls[v][1]) for v in ("fuse", "ours", "timm")),
                "/".join(str(calls[v][2]) for v in ("fuse", "ours", "timm"))]
        table.rows.append(row)
        table.records.append({"model": name, "threads": threads, "ms": ms, "calls": calls})
    torch.set_num_threads(1)


def accuracy_rows(name: str, args, table: Table) -> None:
    torch.set_num_threads(1)
    per_seed = []
    for seed in range(args.seed, args.seed + args.seeds):
        xa = torch.randn((8, 3, args.accuracy_size, args.accuracy_size),
                         generator=torch.Generator().manual_seed(seed + 2))
        per_seed.append(accuracy(build(name, seed), xa))
    for rows in zip(*per_seed, strict=True):
        cells = [name, rows[0]["dtype"], format_float(statistics.mean(r["unfused_error"] for r in rows))]
        for variant in ACCURACY_VARIANTS:
            values = [r.get(variant) for r in rows]
            failed = next((v for v in values if isinstance(v, str)), None)
            if failed:
                cells.append(failed)
            elif values[0] is None:
                cells.append("—")
            else:
                cells.append(f"{statistics.mean(values):.2f}× ({max(values):.2f}×)")
        table.rows.append(cells)
        table.records.append({"model": name, "seeds": list(rows)})


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], default_models=MODELS, quick_models=QUICK_MODELS)
    parser.add_argument("--size", type=int, default=224, help="input height and width for timing (default 224)")
    parser.add_argument("--accuracy-size", type=int, default=64, help="input size for accuracy (default 64)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per timing (default 15)")
    parser.add_argument("--threads-list", default="1",
                        help="torch thread counts to time with (default 1: CPU time, which other processes on a "
                             "shared machine do not inflate; more threads are timed by the wall clock)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="models (weights and statistics) per accuracy cell: mean (worst) ratio (default 3)")
    parser.add_argument("--only", choices=("timing", "accuracy"), default=None, help="measure only this")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.device != "cpu":
        raise SystemExit("benchmarks/reparam.py measures on the CPU only")
    models = parse_models(args.models, args.quick, MODELS, QUICK_MODELS, MODELS)
    rounds = args.rounds or (5 if args.quick else 15)
    thread_counts = [int(t) for t in args.threads_list.split(",") if t.strip()]
    flushed = torch.set_flush_denormal(True)
    started = time.perf_counter()
    timing = Table("Inference time, fp32, batch 1 (median ms per forward pass; speed-up over unfused)",
                   ["model", "threads", "clock", "unfused ms", "BN folding alone ms", "ours ms", "timm's own ms",
                    "ours / timm", "convs+linears (unfused/fuse/ours/timm)", "norms left (fuse/ours/timm)",
                    "module calls (fuse/ours/timm)"])
    timing.notes.append("ours / timm < 1 means ours is faster; CPU time with 1 thread, wall time with more.")
    accuracy_table = Table(
        f"Accuracy: relative RMS error vs the float64 original over the unfused model's own, mean (worst) of "
        f"{args.seeds} seeds, batch 8",
        ["model", "dtype", "unfused error", "ours on the model in the dtype", "BN folding alone",
         "ours in fp32, then converted", "timm in fp32, then converted", "timm on the model in the dtype"])
    accuracy_table.notes.append(
        "In fp32 the three re-parameterisations are the same computation. In fp16, 'ours on the model in the dtype' "
        "merges parameters already rounded to fp16 (float64 merge, one more rounding) and compares with 'timm on the "
        "model in the dtype' (the model's own code in fp16 arithmetic); 'in fp32, then converted' merges the fp32 "
        "parameters and rounds the result to fp16, for ours and timm alike.")
    tables = []
    for name in models if args.only != "accuracy" else ():
        try:
            timing_rows(name, args, rounds, thread_counts, timing)
        except Exception as exc:  # keep the other models' numbers
            log.exception("%s: not timed", name)
            timing.rows.append([name, "—", "—", f"fails: {short_error(exc)}"] + ["—"] * 7)
    for name in models if args.only != "timing" else ():
        try:
            accuracy_rows(name, args, accuracy_table)
        except Exception as exc:
            log.exception("%s: accuracy not measured", name)
            accuracy_table.rows.append([name, "—", f"fails: {short_error(exc)}"] + ["—"] * 5)
    tables = [t for t, skip in ((timing, args.only == "accuracy"), (accuracy_table, args.only == "timing")) if not skip]
    report = Report("Structural re-parameterisation", machine_info(torch.device("cpu")),
                    {"timing input": f"1x3x{args.size}x{args.size}", "rounds": rounds, "threads": args.threads_list,
                     "accuracy input": f"8x3x{args.accuracy_size}x{args.accuracy_size}", "seeds": args.seeds,
                     "wall_s": round(time.perf_counter() - started, 1)},
                    tables,
                    [f"Subnormals flushed to zero (torch.set_flush_denormal: {'on' if flushed else 'unsupported'})."])
    report.emit(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

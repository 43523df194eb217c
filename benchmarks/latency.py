"""Inference latency before and after folding: unfused, ours and torch.fx, at batch 1 and 64, fp32 and fp16.

Usage: ``python benchmarks/latency.py [--device cpu|cuda] [--models a,b] [--batches 1,64] [--dtypes fp32,fp16]
[--size N] [--reps N] [--quick] [--json [PATH]]``

Each model (zoo: random weights, randomised BatchNorm statistics) is converted to the dtype and
then fused, as in ``accuracy.py``. Latency is the median (on a GPU; the fastest run on a shared CPU,
``--stat``) wall time of one forward pass under
``torch.inference_mode()`` after warm-up runs, the device synchronised around each run. A
configuration stops repeating once its timed runs have used ``--budget`` seconds (at least one
timed run), so slow cases -- fp16 convolutions on a CPU -- cannot blow the script's run time;
the number of timed runs is reported. TF32 is left at PyTorch's defaults (what users run); the
header says which.
"""

from __future__ import annotations

import copy
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DTYPES,
    Report,
    Table,
    base_parser,
    configure_threads,
    machine_info,
    make_fusers,
    parse_models,
    resolve_device,
    short_error,
    timed_runs,
)

log = logging.getLogger("bnfold.benchmarks.latency")

DEFAULT_MODELS = ("torchvision/resnet50", "torchvision/mobilenet_v3_large", "torchvision/efficientnet_b0",
                  "torchvision/regnet_y_800mf", "torchvision/densenet121", "timm/resnet50d")
#: On a CPU fp16 convolutions are slow (no native kernels on most CPUs): fewer models by default.
CPU_MODELS = ("torchvision/resnet50", "torchvision/mobilenet_v3_large", "torchvision/efficientnet_b0")
QUICK_MODELS = ("torchvision/resnet50", "torchvision/mobilenet_v3_large")
FUSERS = ("ours", "torch.fx")


def _tf32_line(device: torch.device) -> str:
    if device.type != "cuda":
        return "TF32: not applicable (CPU)."
    return (f"TF32 at PyTorch defaults: matmul {torch.backends.cuda.matmul.allow_tf32}, "
            f"cuDNN convolutions {torch.backends.cudnn.allow_tf32}.")


def measure(name: str, *, device: torch.device, dtypes: list[str], batches: list[int], size: int, seed: int,
            reps: int, warmup: int, budget: float, fusers: list, stat: str) -> list[dict[str, Any]]:
    """Latency records of one model, one per (dtype, batch, variant); failures are recorded, not raised."""
    from adapters.torch.suite.zoo import ZOO

    entry = ZOO[name]
    model = entry.build(seed).to(device)
    generator = torch.Generator().manual_seed(seed + 1)
    records = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        variants: dict[str, torch.nn.Module | str] = {"unfused": copy.deepcopy(model).to(dtype)}
        for fuser in fusers:
            if fuser.unavailable:
                variants[fuser.name] = fuser.unavailable
                continue
            try:
                variants[fuser.name] = fuser.fuse(variants["unfused"])[0].eval()
            except Exception as exc:  # torch.fx cannot trace every model: a result, not a crash
                variants[fuser.name] = short_error(exc)
        for batch in batches:
            x = torch.randn((batch, entry.input_shape[0], size, size), generator=generator).to(device, dtype)
            for variant, module in variants.items():
                record: dict[str, Any] = {"model": name, "dtype": dtype_name, "batch": batch, "variant": variant}
                if isinstance(module, str):
                    record["error"] = module
                else:
                    try:
                        with torch.inference_mode():
                            times = timed_runs(lambda module=module, x=x: module(x), reps=reps, warmup=warmup,
                                               device=device, budget_s=budget)
                        record.update(median_ms=statistics.median(times) * 1e3, min_ms=min(times) * 1e3,
                                      runs=len(times))
                        record["ms"] = record[f"{stat}_ms"]
                    except Exception as exc:
                        record["error"] = f"fails to run: {short_error(exc)}"
                records.append(record)
                log.info("%s", record)
        del variants
    return records


def build_table(records: list[dict[str, Any]], fuser_names: list[str], stat: str) -> Table:
    what = "median" if stat == "median" else "fastest (min)"
    table = Table(f"5. Inference latency: {what} ms per forward pass (speed-up over unfused)",
                  ["model", "dtype", "batch", "unfused ms"] + [f"{f} ms" for f in fuser_names] + ["timed runs"])
    keyed: dict[tuple, dict[str, dict[str, Any]]] = {}
    for rec in records:
        keyed.setdefault((rec["model"], rec["dtype"], rec["batch"]), {})[rec["variant"]] = rec
    failures: dict[str, str] = {}
    for (model, dtype, batch), variants in keyed.items():
        base = variants.get("unfused", {})
        base_ms = base.get("ms")
        row = [model, dtype, batch, f"{base_ms:.2f}" if base_ms is not None else "fails"]
        runs = [str(base.get("runs", "—"))]
        for fname in fuser_names:
            rec = variants.get(fname, {})
            if rec.get("ms") is None:
                row.append("fails")
                failures.setdefault(f"{fname}: {rec.get('error', 'not run')}", model)
                continue
            speedup = f" ({base_ms / rec['ms']:.2f}×)" if base_ms else ""
            row.append(f"{rec['ms']:.2f}{speedup}")
            runs.append(str(rec.get("runs")))
        table.rows.append(row + ["/".join(runs)])
    table.records = records
    for what, model in failures.items():
        table.notes.append(f"{what} (first seen on {model})")
    return table


def main(argv: list[str] | None = None) -> int:
    from adapters.torch.suite.zoo import ZOO

    parser = base_parser(__doc__.splitlines()[0], default_models=DEFAULT_MODELS, quick_models=QUICK_MODELS)
    parser.epilog = f"Default models on cpu: {','.join(CPU_MODELS)}."
    parser.add_argument("--dtypes", default="fp32,fp16", help="comma-separated dtypes (fp32,fp16,bf16)")
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes (default 1,64)")
    parser.add_argument("--size", type=int, default=None,
                        help="input height and width (default: 32 on cpu, 224 on cuda)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per configuration (default: 5 cpu, 30 cuda)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 1 cpu, 5 cuda)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed runs per configuration before stopping early (default: 3 cpu, 2 cuda)")
    parser.add_argument("--stat", choices=("median", "min"), default=None,
                        help="statistic of the timed runs shown (default: median on cuda; min on cpu, where other "
                             "processes share the cores and the fastest run is the least disturbed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    configure_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    models = parse_models(args.models, args.quick, DEFAULT_MODELS if cuda else CPU_MODELS, QUICK_MODELS, sorted(ZOO))
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        raise SystemExit(f"--dtypes: got {args.dtypes!r}; known: {', '.join(DTYPES)}")
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"--batches must be comma-separated integers, got {args.batches!r}") from None
    if not batches or min(batches) < 1:
        raise SystemExit(f"--batches must be positive integers, got {args.batches!r}")
    size = args.size or (224 if cuda else 32)
    reps = args.reps or (30 if cuda else (3 if args.quick else 5))
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    budget = args.budget if args.budget is not None else (2.0 if cuda else 3.0)
    stat = args.stat or ("median" if cuda else "min")
    notes = [_tf32_line(device)]
    if not cuda:
        # Subnormal activations (random weights produce some, in either model) make x86 arithmetic
        # 10-100x slower, data-dependently: measured here, one model ran 1 s instead of 6 ms per forward.
        flushed = torch.set_flush_denormal(True)
        notes.append(f"Subnormals flushed to zero (torch.set_flush_denormal: {'on' if flushed else 'unsupported'}); "
                     "without it the CPU timings measure denormal stalls, not folding.")
    fusers = make_fusers(FUSERS)
    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    for name in models:
        try:
            records += measure(name, device=device, dtypes=dtypes, batches=batches, size=size, seed=args.seed,
                               reps=reps, warmup=warmup, budget=budget, fusers=fusers, stat=stat)
        except Exception as exc:  # keep the other models' numbers
            log.exception("%s: not measured", name)
            records.append({"model": name, "dtype": "—", "batch": "—", "variant": "unfused",
                            "error": short_error(exc)})
    report = Report(
        "Inference latency",
        machine_info(device),
        {"device": str(device), "input": f"3x{size}x{size}", "batches": ",".join(map(str, batches)),
         "dtypes": ",".join(dtypes), "statistic": stat, "reps": reps, "warmup": warmup, "budget_s": budget,
         "wall_s": round(time.perf_counter() - started, 1)},
        [build_table(records, [f.name for f in fusers], stat)],
        notes + ["Models are converted to the dtype, then fused; 'timed runs' per variant "
         "(unfused/ours/torch.fx) is below --reps where the time budget ran out."])
    report.emit(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

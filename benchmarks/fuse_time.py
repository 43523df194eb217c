"""Fuse time and peak memory: ours against mmcv, torch.fx and AIMET.

The peers: mmcv's ``fuse_conv_bn``, ``torch.fx.experimental.optimization.fuse`` and AIMET's
``fold_all_batch_norms``.

Each fuser folds a fresh deep copy of the same prepared model in place; the deep copy is made
before the clock starts, so only the fusing is timed (ours runs as ``fuse(model, inplace=True)``,
fx's as ``fuse(model, inplace=True)``, mmcv's and AIMET's fuse in place anyway; the peers are the
functions of ``adapters/torch/suite/peers.py``, and a peer that does not import here is left out
with a note). AIMET traces the model on an example input, so every fuser is handed one (made
untimed; fusers that do not trace ignore it). The fusers are run in turns
(one run of each per round, ``--reps`` rounds, after one untimed warm-up run each), so that a load
change on a shared machine hits all of them alike; the median per fuser is reported. By default
on CPU with one thread, timed with this process's CPU time (``--clock process``), which time spent
descheduled on a busy machine does not inflate.

Tables:

1. Real models (zoo: random weights, randomised BatchNorm statistics), one row per model and
   parameter dtype (``--dtypes``): time per fuser, our time relative to each peer's (targets in
   float32: <= 2.5x mmcv's, <= 0.75x torch.fx's) and to our own float32 time (target for fp16 and
   bf16: <= 1.3x), the peak extra memory of one fuse (the high-water mark of the process's
   resident memory above what it held before, from ``/proc/self/status`` after resetting it; on
   CUDA ``torch.cuda.max_memory_allocated``; target for ours: <= 0.05x the model's parameters),
   and the norm evaluations each fused model has left (so a fuser that does less work shows).
   ``--big [ARCH]`` adds a torchvision model over 100 M parameters (default regnet_y_32gf, 145 M),
   where the target for fp16 and bf16 is also <= mmcv's time.
2. Growth: a plain chain of N conv -> BN pairs at two lengths (default 200 and 2,000); the ratio of
   the times is the growth factor for 10x the pairs (target for ours: <= 15x, i.e. linear).

``--profile`` adds a cProfile of our fuser on the first model (top functions by cumulative time).

``ours`` is timed twice: without example inputs (``ours``: symbolic trace) and with them (``ours+inputs``:
the recorded run, ``adapters/torch/recorded.py``); the notes give the median of each over mmcv's across the
models (target: <= 3x over a zoo of >= 30 detection and classification models; ``--realcode`` adds
ultralytics and transformers models built from their YAMLs and configs by ``benchmarks/realcode_zoo.py``).

Command: ``python benchmarks/fuse_time.py [--dtypes float32,float16,bfloat16] [--big [ARCH]] [--reps 5]
[--models ...] [--realcode NAMES] [--chains 200,2000] [--clock process|wall] [--json [PATH]]``
"""

from __future__ import annotations

import copy
import cProfile
import ctypes
import gc
import io
import logging
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import (  # noqa: E402
    Report,
    Table,
    base_parser,
    configure_threads,
    format_ratio,
    machine_info,
    parse_models,
    resolve_device,
    short_error,
    synchronize,
)

log = logging.getLogger("bnfold.benchmarks.fuse_time")

DEFAULT_MODELS = ("torchvision/resnet50", "torchvision/mobilenet_v3_large", "torchvision/regnet_y_800mf")
QUICK_MODELS = ("torchvision/resnet50",)
FUSER_NAMES = ("ours", "ours+inputs", "mmcv", "torch.fx", "aimet")
#: Our two ways to fuse: without example inputs (symbolic trace) and with them (the recorded run).
OURS = ("ours", "ours+inputs")
#: Target from the recorded-dataflow issue: the median over the models of our time over mmcv's.
TARGET_MEDIAN_VS_MMCV = 3.0
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: The model over 100 M parameters that ``--big`` adds by default (torchvision, 145 M parameters).
BIG_DEFAULT = "regnet_y_32gf"

#: Targets from the adapter issue: our float32 time over the peer's.
TARGET_VS = {"mmcv": 2.5, "torch.fx": 0.75}
#: Our fp16/bf16 time over our own float32 time, and (on the big model) over mmcv's time in that dtype.
TARGET_HALF_VS_FLOAT32 = 1.3
TARGET_HALF_VS_MMCV_BIG = 1.0
#: Our peak extra memory over the bytes of the model's parameters.
TARGET_MEMORY = 0.05
#: Growth target: time for the long chain over time for the short one, when it is 10x longer.
TARGET_GROWTH = 15.0


@dataclass(frozen=True)
class InPlaceFuser:
    """A fuser that folds ``model`` in place (or returns a new model built from it); ``None`` when unavailable.

    Called as ``fuse(model, example_inputs)``; fusers that do not trace the model ignore the inputs.
    """

    name: str
    fuse: Callable[[nn.Module, tuple[torch.Tensor, ...]], nn.Module] | None
    unavailable: str | None = None


def in_place_fusers() -> list[InPlaceFuser]:
    """Ours and the peers (mmcv, torch.fx, AIMET), each working on the model it is given (no copy of its own)."""
    from adapters.torch import fuse as ours
    from adapters.torch.suite.peers import PEERS, peer_unavailable

    fusers = [InPlaceFuser("ours", lambda model, inputs: ours(model, inplace=True)[0]),
              InPlaceFuser("ours+inputs", lambda model, inputs: ours(model, inplace=True, example_inputs=inputs)[0])]
    for peer in PEERS.values():
        missing = peer_unavailable(peer)
        if missing is not None:
            print(f"{peer.name} unavailable, continuing without it: {missing}", file=sys.stderr)
        fusers.append(InPlaceFuser(peer.name, None if missing else peer, missing))
    return fusers


# --------------------------------------------------------------------------------------------------
# Peak memory

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's resident memory (Linux: ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def _return_freed_memory() -> None:
    """Give freed heap memory back to the OS, so that what the fuser allocates shows in the resident size."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_bytes(fuse: Callable[[nn.Module, tuple[torch.Tensor, ...]], Any], prepared: nn.Module,
                     inputs: tuple[torch.Tensor, ...], device: torch.device) -> int | None:
    """Bytes a fuse of a fresh copy of ``prepared`` (example ``inputs``) holds at its peak beyond what it held before.

    CPU: the high-water mark of the resident set (reset just before the fuse) minus the resident
    set before it. CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before.
    None where the platform cannot tell.
    """
    model = copy.deepcopy(prepared)
    _return_freed_memory()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fuse(model, inputs)
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = _status_kib("VmRSS")
    if before is None or not _reset_peak_rss():
        return None
    fuse(model, inputs)
    peak = _status_kib("VmHWM")
    return None if peak is None else max(0, peak - before) * 1024


# --------------------------------------------------------------------------------------------------
# Timing

def time_fusers(fusers: list[InPlaceFuser], prepared: nn.Module, inputs: tuple[torch.Tensor, ...], *, reps: int,
                device: torch.device, clock: Callable[[], float], keep_result: bool = True
                ) -> dict[str, dict[str, Any]]:
    """Each fuser on fresh deep copies of ``prepared`` with example ``inputs`` (copies untimed), in turns: one
    warm-up round, ``reps`` timed rounds, then one untimed run measuring its peak extra memory.

    Returns per fuser ``{"median_s", "times_s", "peak_extra_bytes", "result"}`` (``result``: the last fused model,
    when ``keep_result``), or ``{"error": ...}`` for a fuser that is unavailable or fails on this model.
    """
    results: dict[str, dict[str, Any]] = {}
    running = []
    for fuser in fusers:
        if fuser.fuse is None:
            results[fuser.name] = {"error": f"unavailable: {fuser.unavailable}"}
            continue
        try:
            # warm-up: first-call imports and caches are not the fuser's cost
            fuser.fuse(copy.deepcopy(prepared), inputs)
        except Exception as exc:  # a peer that cannot fuse this model is a result, not a crash
            log.warning("%s failed: %s", fuser.name, short_error(exc))
            results[fuser.name] = {"error": short_error(exc)}
            continue
        results[fuser.name] = {"times_s": []}
        running.append(fuser)
    for _ in range(reps):
        for fuser in running:
            assert fuser.fuse is not None
            model = copy.deepcopy(prepared)
            gc.collect()
            synchronize(device)
            start = clock()
            fused = fuser.fuse(model, inputs)
            synchronize(device)
            results[fuser.name]["times_s"].append(clock() - start)
            results[fuser.name]["result"] = fused if keep_result else None
            del model, fused
    for fuser in running:
        assert fuser.fuse is not None
        record = results[fuser.name]
        record["median_s"] = statistics.median(record["times_s"])
        record["peak_extra_bytes"] = peak_extra_bytes(fuser.fuse, prepared, inputs, device)
    return results


def conv_bn_chain(pairs: int, channels: int = 8, seed: int = 0) -> nn.Sequential:
    """``pairs`` Conv2d(3x3) -> BatchNorm2d pairs in one Sequential, with random statistics, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for _ in range(pairs):
            layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.5, generator=generator)
    return model.eval()


def big_model(arch: str, seed: int) -> nn.Module:
    """A torchvision architecture with seeded random weights and calibrated random norm statistics (32x32 input)."""
    import torchvision

    from adapters.torch.suite.zoo import randomize_calibrated_norm_stats

    factory = getattr(torchvision.models, arch, None)
    if factory is None:
        raise SystemExit(f"--big {arch!r}: torchvision.models has no such architecture")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(weights=None)
    return randomize_calibrated_norm_stats(model, (3, 32, 32), torch.Generator().manual_seed(seed))


def norms_left(fused: nn.Module, inputs: torch.Tensor, original: nn.Module) -> int | None:
    """Norm evaluations in one forward pass of ``fused`` (norms torch.fx inlined count as left)."""
    from adapters.torch.suite.cases import count_norm_calls
    from benchmarks.accuracy import norm_evaluations
    try:
        return norm_evaluations(fused, inputs, count_norm_calls, original)
    except Exception as exc:  # a peer's fused model that cannot run is a result, not a crash
        log.warning("counting norm calls failed: %s", short_error(exc))
        return None


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Tables

@dataclass
class Row:
    """One model in one dtype: what was measured, and what the table needs besides."""

    model: str
    dtype: str
    parameters: int            # count
    weight_bytes: int
    norms: int | None
    unfoldable: int | None
    big: bool
    fusers: dict[str, dict[str, Any]]


def _ms(record: dict[str, Any]) -> str:
    return f"{record['median_s'] * 1e3:.1f}" if "median_s" in record else "fails"


def _ratio_cell(numerator: dict[str, Any], denominator: dict[str, Any] | None, target: float | None
                ) -> tuple[str, float | None]:
    if denominator is None or "median_s" not in numerator or "median_s" not in denominator:
        return "—", None
    ratio = numerator["median_s"] / denominator["median_s"]
    if target is None:
        return format_ratio(ratio), ratio
    return f"{format_ratio(ratio)} ({'meets' if ratio <= target else 'MISSES'} ≤ {target:g}×)", ratio


def _mb(value: int | None) -> str:
    return "—" if value is None else f"{value / 2**20:.1f}"


def model_table(rows: list[Row], fuser_names: list[str]) -> Table:
    peers = [f for f in fuser_names if f not in OURS]
    recorded = "ours+inputs" in fuser_names and "mmcv" in fuser_names
    headers = (["model", "dtype", "params M", "norms", "cannot fold"] + [f"{f} ms" for f in fuser_names]
               + [f"ours / {peer}" for peer in peers] + (["ours+inputs / mmcv"] if recorded else [])
               + ["ours / ours float32"]
               + ["peak extra MB (" + "/".join(fuser_names) + ")", "ours peak / weights"]
               + ["norms left (" + "/".join(fuser_names) + ")"])
    table = Table("Fuse time and peak memory per model and dtype (median; deep copy excluded)", headers)
    float32_rows = {row.model: row for row in rows if row.dtype == "float32"}
    for row in rows:
        ours = row.fusers["ours"]
        half = row.dtype != "float32"
        record: dict[str, Any] = {"model": row.model, "dtype": row.dtype, "parameters": row.parameters,
                                  "weight_bytes": row.weight_bytes, "norms": row.norms, "cannot_fold": row.unfoldable,
                                  "fusers": {name: {k: v for k, v in data.items() if k != "result"}
                                             for name, data in row.fusers.items()}}
        cells: list[Any] = [row.model, row.dtype, f"{row.parameters / 1e6:.1f}",
                            "—" if row.norms is None else row.norms,
                            "—" if row.unfoldable is None else row.unfoldable]
        cells += [_ms(row.fusers[f]) for f in fuser_names]
        for peer in peers:
            target = TARGET_VS.get(peer) if not half else (TARGET_HALF_VS_MMCV_BIG if row.big and peer == "mmcv"
                                                           else None)
            cell, ratio = _ratio_cell(ours, row.fusers[peer], target)
            cells.append(cell)
            record[f"ours_over_{peer}"] = ratio
        if recorded:
            target_mmcv = None if half else TARGET_VS["mmcv"]
            cell, ratio = _ratio_cell(row.fusers["ours+inputs"], row.fusers["mmcv"], target_mmcv)
            cells.append(cell)
            record["ours+inputs_over_mmcv"] = ratio
        base = float32_rows.get(row.model)
        cell, ratio = _ratio_cell(ours, base.fusers["ours"] if half and base else None, TARGET_HALF_VS_FLOAT32)
        cells.append(cell)
        record["ours_over_ours_float32"] = ratio
        cells.append("/".join(_mb(row.fusers[f].get("peak_extra_bytes")) for f in fuser_names))
        peak = ours.get("peak_extra_bytes")
        share = None if peak is None or not row.weight_bytes else peak / row.weight_bytes
        record["ours_peak_over_weights"] = share
        cells.append("—" if share is None else
                     f"{share:.3f} ({'meets' if share <= TARGET_MEMORY else 'MISSES'} ≤ {TARGET_MEMORY:g})")
        cells.append("/".join("—" if row.fusers[f].get("norms_left") is None else str(row.fusers[f]["norms_left"])
                              for f in fuser_names))
        table.rows.append(cells)
        table.records.append(record)
    for row in rows:
        for f in fuser_names:
            if "error" in row.fusers[f]:
                table.notes.append(f"{f} on {row.model} ({row.dtype}): {row.fusers[f]['error']}")
    for ours_name in OURS:
        key = "ours_over_mmcv" if ours_name == "ours" else "ours+inputs_over_mmcv"
        ratios = [r[key] for r in table.records if r["dtype"] == "float32" and r.get(key) is not None]
        if ratios:
            median = statistics.median(ratios)
            table.notes.append(f"median of {ours_name} / mmcv over {len(ratios)} model(s): {format_ratio(median)} "
                               f"({'meets' if median <= TARGET_MEDIAN_VS_MMCV else 'MISSES'} ≤ "
                               f"{TARGET_MEDIAN_VS_MMCV:g}× over a zoo of ≥ 30 models)")
    table.notes.append("'ours+inputs': fuse(model, inplace=True, example_inputs=x), whose dataflow is the recorded run "
                       "of x (adapters/torch/recorded.py); 'ours' traces symbolically.")
    table.notes.append("'cannot fold': norm evaluations no dataflow-correct fuser can remove, worked out by hand "
                       "(adapters/torch/suite/zoo.py); 'norms left': norm module calls in one forward pass of each "
                       "fused model, so a fuser that did less work shows. Fewer left than 'cannot fold' is a wrong "
                       "model: mmcv replaces timm's BatchNormAct2d, activation included, by nn.Identity "
                       "(benchmarks/accuracy.py measures the damage).")
    table.notes.append("'peak extra MB': the most memory one fuse held at once beyond what the process held before "
                       "it (deep copy excluded); 'ours peak / weights' divides ours by the bytes of the model's "
                       "parameters.")
    return table


def growth_table(results: dict[int, dict[str, dict[str, Any]]], fuser_names: list[str]) -> Table:
    lengths = sorted(results)
    headers = ["fuser"] + [f"{n} pairs ms" for n in lengths] + [f"growth {lengths[-1]}/{lengths[0]}"]
    table = Table(f"Growth: a chain of conv -> BN pairs ({lengths[-1] // lengths[0]}x longer)", headers)
    for f in fuser_names:
        row: list[Any] = [f] + [_ms(results[n][f]) for n in lengths]
        short, long_ = results[lengths[0]][f], results[lengths[-1]][f]
        growth = long_["median_s"] / short["median_s"] if "median_s" in short and "median_s" in long_ else None
        cell = format_ratio(growth)
        if f == "ours" and growth is not None and lengths[-1] == 10 * lengths[0]:
            cell += f" ({'meets' if growth <= TARGET_GROWTH else 'MISSES'} ≤ {TARGET_GROWTH:g}×)"
        table.rows.append(row + [cell])
        table.records.append({"fuser": f, **{f"pairs_{n}": {k: v for k, v in results[n][f].items() if k != "result"}
                                             for n in lengths}, "growth": growth})
    table.notes.append("Conv2d(8, 8, 3, padding=1, bias=False) -> BatchNorm2d(8), repeated, in one nn.Sequential: "
                       "the fold arithmetic per pair is tiny, so growth measures the analysis itself.")
    return table


def profile_ours(prepared: nn.Module, top: int = 25) -> str:
    """cProfile of one ``fuse(model, inplace=True)`` run, top functions by cumulative time."""
    from adapters.torch import fuse
    model = copy.deepcopy(prepared)
    profiler = cProfile.Profile()
    profiler.enable()
    fuse(model, inplace=True)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def _parse_dtypes(arg: str) -> list[str]:
    names = [d.strip() for d in arg.split(",") if d.strip()]
    unknown = [d for d in names if d not in DTYPES]
    if unknown or not names:
        raise SystemExit(f"--dtypes: unknown {unknown or arg!r}; known: {', '.join(DTYPES)}")
    # float32 first: the half-precision rows are compared with it.
    return sorted(set(names), key=list(DTYPES).index)


def main(argv: list[str] | None = None) -> int:
    from adapters.torch.suite.cases import is_norm_module
    from adapters.torch.suite.zoo import ZOO

    parser = base_parser(__doc__.splitlines()[0], default_models=DEFAULT_MODELS, quick_models=QUICK_MODELS)
    parser.set_defaults(threads=1)
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 5; --quick 3)")
    parser.add_argument("--dtypes", default="float32",
                        help=f"comma-separated parameter dtypes, each a row per model ({', '.join(DTYPES)}; "
                             "default: float32)")
    parser.add_argument("--big", nargs="?", const=BIG_DEFAULT, default=None, metavar="ARCH",
                        help=f"also a torchvision model over 100 M parameters (default {BIG_DEFAULT}); its "
                             "calibration run takes a few seconds")
    parser.add_argument("--chains", default=None,
                        help="comma-separated chain lengths in conv->BN pairs (default 200,2000; --quick 20,200; "
                             "'none' to skip)")
    parser.add_argument("--clock", choices=("process", "wall"), default=None,
                        help="what is timed: this process's CPU time (default on CPU with one thread: steady on a "
                             "machine shared with other work) or wall time (default otherwise; always on cuda)")
    parser.add_argument("--realcode", default=None, metavar="NAMES",
                        help="also these models of benchmarks/realcode_zoo.py (comma-separated, e.g. "
                             "ultralytics/yolov8n,transformers/resnet), each on its own example inputs")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of ours on the first model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    configure_threads(args.threads)
    device = resolve_device(args.device)
    models = parse_models(args.models, args.quick, DEFAULT_MODELS, QUICK_MODELS, sorted(ZOO))
    dtypes = _parse_dtypes(args.dtypes)
    reps = args.reps or (3 if args.quick else 5)
    if reps < 1:
        raise SystemExit(f"--reps must be >= 1, got {reps}")
    chains: list[int] = []
    if (args.chains or "").strip().lower() != "none":
        try:
            chains = [int(n) for n in (args.chains or ("20,200" if args.quick else "200,2000")).split(",")
                      if n.strip()]
        except ValueError:
            raise SystemExit(f"--chains must be comma-separated integers or 'none', got {args.chains!r}") from None
        if len(chains) < 2 or min(chains) < 1:
            raise SystemExit(f"--chains needs at least two positive lengths, got {args.chains!r}")
    clock_name = args.clock or ("process" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall")
    if clock_name == "process" and device.type == "cuda":
        raise SystemExit("--clock process times the CPU only: use --clock wall with --device cuda")
    clock = time.process_time if clock_name == "process" else time.perf_counter

    fusers = in_place_fusers()
    names = [f.name for f in fusers if f.unavailable is None]  # a peer that does not import gets no column
    started = time.perf_counter()
    rows: list[Row] = []
    first_prepared = None
    builds: list[tuple[str, Callable[[], nn.Module], torch.Tensor | None, int | None, int | None, bool]] = []
    for name in models:
        entry = ZOO[name]
        builds.append((name, lambda entry=entry: entry.build(seed=args.seed),
                       entry.example_input(batch=1, seed=args.seed), entry.norm_layers, entry.unfoldable, False))
    if args.big:
        builds.append((f"torchvision/{args.big}", lambda: big_model(args.big, args.seed), None, None, None, True))
    for name, build, example, norms, unfoldable, big in builds:
        built = build()
        if norms is None:
            norms = sum(1 for m in built.modules() if is_norm_module(m))
        for dtype_name in dtypes:
            prepared = copy.deepcopy(built).to(device=device, dtype=DTYPES[dtype_name])
            if first_prepared is None:
                first_prepared = prepared
            # The big model is calibrated at 32x32 (big_model); a batch of one traces it.
            traced_with = example if example is not None else torch.randn(1, 3, 32, 32)
            x = traced_with.to(device=device, dtype=DTYPES[dtype_name])
            measured = time_fusers(fusers, prepared, (x,), reps=reps, device=device, clock=clock,
                                   keep_result=example is not None)
            if example is not None:
                for record in measured.values():
                    if record.get("result") is not None:
                        record["norms_left"] = norms_left(record.pop("result"), x, prepared)
            rows.append(Row(name, dtype_name, sum(p.numel() for p in prepared.parameters()), parameter_bytes(prepared),
                            norms, unfoldable, big, measured))
            if prepared is not first_prepared:
                del prepared
        del built
    for name in [n.strip() for n in (args.realcode or "").split(",") if n.strip()]:
        from benchmarks.realcode_zoo import build as build_realcode
        real = build_realcode(name, seed=args.seed)
        prepared = real.module.eval().to(device)
        inputs = tuple(t.to(device) for t in real.inputs)
        measured = time_fusers(fusers, prepared, inputs, reps=reps, device=device, clock=clock, keep_result=False)
        rows.append(Row(name, "float32", sum(p.numel() for p in prepared.parameters()), parameter_bytes(prepared),
                        sum(1 for m in prepared.modules() if is_norm_module(m)), None, False, measured))
        del prepared, real
    tables = [model_table(rows, names)]
    if chains:
        chain_input = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(args.seed)).to(device)
        per_chain = {pairs: time_fusers(fusers, conv_bn_chain(pairs, seed=args.seed).to(device), (chain_input,),
                                        reps=reps, device=device, clock=clock, keep_result=False) for pairs in chains}
        tables.append(growth_table(per_chain, names))

    report = Report(
        "Fuse time",
        machine_info(device),
        {"device": str(device), "reps": reps, "dtypes": ",".join(dtypes), "big": args.big or "none",
         "chains": ",".join(map(str, chains)) or "none", "clock": clock_name,
         "wall_s": round(time.perf_counter() - started, 1)},
        tables,
        [f"Median of {reps} rounds after one warm-up round; in each round every fuser folds a fresh deep copy, made "
         "before its clock starts. ours: adapters.torch.fuse(model, inplace=True); mmcv: mmcv.cnn.fuse_conv_bn; "
         "torch.fx: torch.fx.experimental.optimization.fuse(model, inplace=True); aimet: "
         "aimet_torch.batch_norm_fold.fold_all_batch_norms(model, input_shapes, dummy_input) on the example input."])
    report.emit(args.json)
    if args.profile and first_prepared is not None:
        print(f"\ncProfile of ours on {models[0] if models else rows[0].model}:\n" + profile_ours(first_prepared),
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fuse time: ours against mmcv's ``fuse_conv_bn``, ``torch.fx.experimental.optimization.fuse`` and AIMET.

Each fuser folds a fresh deep copy of the same prepared model in place; the deep copy is made
before the clock starts, so only the fusing is timed (ours runs as ``fuse(model, inplace=True)``,
fx's as ``fuse(model, inplace=True)``, mmcv's and AIMET's fuse in place anyway; the peers are the
functions of ``adapters/torch/suite/peers.py``). AIMET traces the model on an example input, so it
is handed one (untimed to make, timed to use); a peer that does not import here is left out with a
note. Median of ``--reps`` runs after one untimed warm-up run, on CPU with one thread by default.

Two tables:

1. Real models (zoo: random weights, randomised BatchNorm statistics): time per fuser, our time
   relative to each peer's (targets: <= 2.5x mmcv's, <= 0.75x torch.fx's), and the norm evaluations
   each fused model has left (so a fuser that does less work is visible as such).
2. Growth: a plain chain of N conv -> BN pairs at two lengths (default 200 and 2,000); the ratio of
   the times is the growth factor for 10x the pairs (target for ours: <= 15x, i.e. linear).

``--profile`` adds a cProfile of our fuser on the first model (top functions by cumulative time).

Command: ``python benchmarks/fuse_time.py [--json [PATH]] [--models ...] [--reps 5] [--chains 200,2000]
[--clock wall|process]``
"""

from __future__ import annotations

import copy
import cProfile
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
FUSER_NAMES = ("ours", "mmcv", "torch.fx", "aimet")

#: Targets from the adapter issue: our time over the peer's time.
TARGET_VS = {"mmcv": 2.5, "torch.fx": 0.75}
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

    fusers = [InPlaceFuser("ours", lambda model, inputs: ours(model, inplace=True)[0])]
    for peer in PEERS.values():
        missing = peer_unavailable(peer)
        if missing is not None:
            print(f"{peer.name} unavailable, continuing without it: {missing}", file=sys.stderr)
        fusers.append(InPlaceFuser(peer.name, None if missing else peer, missing))
    return fusers


def time_fuse(fuse: Callable[[nn.Module, tuple[torch.Tensor, ...]], nn.Module], prepared: nn.Module,
              inputs: tuple[torch.Tensor, ...], *, reps: int, device: torch.device,
              clock: Callable[[], float] = time.perf_counter) -> tuple[float, list[float], nn.Module]:
    """Median seconds of ``fuse(deepcopy(prepared), inputs)`` over ``reps`` runs (copy untimed), the times, the
    last result. ``clock``: wall time, or ``time.process_time`` (this process's CPU time: on one thread, steady
    on a machine shared with other work)."""
    result = fuse(copy.deepcopy(prepared), inputs)  # warm-up: first-call imports and caches are not the fuser's cost
    times = []
    for _ in range(reps):
        model = copy.deepcopy(prepared)
        gc.collect()
        synchronize(device)
        start = clock()
        result = fuse(model, inputs)
        synchronize(device)
        times.append(clock() - start)
    return statistics.median(times), times, result


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


def norms_left(fused: nn.Module, inputs: torch.Tensor, original: nn.Module) -> int | None:
    """Norm evaluations in one forward pass of ``fused`` (norms torch.fx inlined count as left)."""
    from adapters.torch.suite.cases import count_norm_calls
    from benchmarks.accuracy import norm_evaluations
    try:
        return norm_evaluations(fused, inputs, count_norm_calls, original)
    except Exception as exc:  # a peer's fused model that cannot run is a result, not a crash
        log.warning("counting norm calls failed: %s", short_error(exc))
        return None


def measure(prepared: nn.Module, inputs: torch.Tensor | None, fusers: list[InPlaceFuser], *, reps: int,
            device: torch.device, trace_input: torch.Tensor | None = None,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, dict[str, Any]]:
    """``trace_input``: the example input for fusers that trace the model (default: ``inputs``)."""
    results: dict[str, dict[str, Any]] = {}
    example = trace_input if trace_input is not None else inputs
    for fuser in fusers:
        if fuser.fuse is None:
            results[fuser.name] = {"error": f"unavailable: {fuser.unavailable}"}
            continue
        try:
            median, times, fused = time_fuse(fuser.fuse, prepared, () if example is None else (example,), reps=reps,
                                             device=device, clock=clock)
        except Exception as exc:  # a peer that cannot fuse this model is a result, not a crash
            log.warning("%s failed: %s", fuser.name, short_error(exc))
            results[fuser.name] = {"error": short_error(exc)}
            continue
        results[fuser.name] = {"median_s": median, "times_s": times,
                               "norms_left": norms_left(fused, inputs, prepared) if inputs is not None else None}
        del fused
    return results


def _ms(record: dict[str, Any]) -> str:
    return f"{record['median_s'] * 1e3:.1f}" if "median_s" in record else "fails"


def _vs(ours: dict[str, Any], peer: dict[str, Any], target: float | None) -> tuple[str, float | None]:
    if "median_s" not in ours or "median_s" not in peer:
        return "—", None
    ratio = ours["median_s"] / peer["median_s"]
    if target is None:
        return format_ratio(ratio), ratio
    return f"{format_ratio(ratio)} ({'meets' if ratio <= target else 'MISSES'} ≤ {target:g}×)", ratio


def model_table(results: dict[str, dict[str, dict[str, Any]]], fuser_names: list[str],
                norms: dict[str, tuple[int, int]]) -> Table:
    """``norms``: per model, (norm layers, norm evaluations that cannot be folded)."""
    headers = ["model", "norms", "cannot fold"] + [f"{f} ms" for f in fuser_names] + \
              [f"ours / {peer}" for peer in fuser_names if peer != "ours"] + \
              ["norms left (" + "/".join(fuser_names) + ")"]
    table = Table("Fuse time per model (median; deep copy excluded)", headers)
    for model, per_fuser in results.items():
        total, unfoldable = norms[model]
        row: list[Any] = [model, total, unfoldable] + [_ms(per_fuser[f]) for f in fuser_names]
        record: dict[str, Any] = {"model": model, "norms": total, "cannot_fold": unfoldable, "fusers": per_fuser}
        for peer in fuser_names:
            if peer != "ours":
                cell, ratio = _vs(per_fuser["ours"], per_fuser[peer], TARGET_VS.get(peer))
                row.append(cell)
                record[f"ours_over_{peer}"] = ratio
        row.append("/".join("—" if per_fuser[f].get("norms_left") is None else str(per_fuser[f]["norms_left"])
                            for f in fuser_names))
        table.rows.append(row)
        table.records.append(record)
    for f in fuser_names:
        errors = {m: r[f]["error"] for m, r in results.items() if "error" in r[f]}
        for model, error in errors.items():
            table.notes.append(f"{f} on {model}: {error}")
    table.notes.append("'cannot fold': norm evaluations no dataflow-correct fuser can remove, worked out by hand "
                       "(adapters/torch/suite/zoo.py); 'norms left': norm module calls in one forward pass of each "
                       "fused model, so a fuser that did less work shows. Fewer left than 'cannot fold' is a wrong "
                       "model: mmcv replaces timm's BatchNormAct2d, activation included, by nn.Identity "
                       "(benchmarks/accuracy.py measures the damage).")
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
        table.records.append({"fuser": f, **{f"pairs_{n}": results[n][f] for n in lengths}, "growth": growth})
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


def main(argv: list[str] | None = None) -> int:
    from adapters.torch.suite.zoo import ZOO

    parser = base_parser(__doc__.splitlines()[0], default_models=DEFAULT_MODELS, quick_models=QUICK_MODELS)
    parser.set_defaults(threads=1)
    parser.add_argument("--reps", type=int, default=None, help="timed runs per fuser and model (default 5; --quick 3)")
    parser.add_argument("--chains", default=None,
                        help="comma-separated chain lengths in conv->BN pairs (default 200,2000; --quick 20,200)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of ours on the first model")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="what is timed: wall time (default), or this process's CPU time (time.process_time: "
                             "on CPU with one thread, steady on a machine shared with other work; not for cuda)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    configure_threads(args.threads)
    device = resolve_device(args.device)
    models = parse_models(args.models, args.quick, DEFAULT_MODELS, QUICK_MODELS, sorted(ZOO))
    reps = args.reps or (3 if args.quick else 5)
    if reps < 1:
        raise SystemExit(f"--reps must be >= 1, got {reps}")
    try:
        chains = [int(n) for n in (args.chains or ("20,200" if args.quick else "200,2000")).split(",") if n.strip()]
    except ValueError:
        raise SystemExit(f"--chains must be comma-separated integers, got {args.chains!r}") from None
    if len(chains) < 2 or min(chains) < 1:
        raise SystemExit(f"--chains needs at least two positive lengths, got {args.chains!r}")

    all_fusers = in_place_fusers()
    fusers = [f for f in all_fusers if f.fuse is not None]
    left_out = [f"{f.name} left out: {f.unavailable}." for f in all_fusers if f.fuse is None]
    names = [f.name for f in fusers]
    if args.clock == "process" and device.type == "cuda":
        raise SystemExit("--clock process times the CPU only: use --clock wall with --device cuda")
    clock = time.process_time if args.clock == "process" else time.perf_counter
    started = time.perf_counter()
    per_model: dict[str, dict[str, dict[str, Any]]] = {}
    norms: dict[str, tuple[int, int]] = {}
    first_prepared = None
    for name in models:
        entry = ZOO[name]
        prepared = entry.build(seed=args.seed).to(device)
        if first_prepared is None:
            first_prepared = prepared
        norms[name] = (entry.norm_layers, entry.unfoldable)
        per_model[name] = measure(prepared, entry.example_input(batch=1, seed=args.seed).to(device), fusers,
                                  reps=reps, device=device, clock=clock)
    per_chain: dict[int, dict[str, dict[str, Any]]] = {}
    chain_input = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(args.seed)).to(device)
    for pairs in chains:
        per_chain[pairs] = measure(conv_bn_chain(pairs, seed=args.seed).to(device), None, fusers, reps=reps,
                                   device=device, trace_input=chain_input, clock=clock)

    report = Report(
        "Fuse time",
        machine_info(device),
        {"device": str(device), "reps": reps, "chains": ",".join(map(str, chains)), "clock": args.clock,
         "wall_s": round(time.perf_counter() - started, 1)},
        [model_table(per_model, names, norms), growth_table(per_chain, names)],
        [f"Median of {reps} runs after one warm-up run; each run fuses a fresh deep copy, made before the clock "
         "starts. ours: adapters.torch.fuse(model, inplace=True); mmcv: mmcv.cnn.fuse_conv_bn; torch.fx: "
         "torch.fx.experimental.optimization.fuse(model, inplace=True); aimet: "
         "aimet_torch.batch_norm_fold.fold_all_batch_norms(model, input_shapes, dummy_input) on the model's example "
         "input (batch 1), where aimet-torch imports.", *left_out])
    report.emit(args.json)
    if args.profile and first_prepared is not None:
        print(f"\ncProfile of ours on {models[0]}:\n" + profile_ours(first_prepared), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

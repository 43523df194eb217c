"""Real-code sweep of the torch adapter: transformers and ultralytics models built from configs and YAMLs.

Usage: ``python benchmarks/sweep_realcode.py [--library transformers|ultralytics|all] [--models NAME,...]
[--quick] [--reps 3] [--json [PATH]] [--markdown] [--timeout 300] [--isolate] [--threads 1] [--seed 0]``;
``--render A.json[,B.json]`` prints the tables of saved runs; ``--list`` the model names.

Model code people actually run, beyond timm/torchvision, with random weights and nothing downloaded
(``benchmarks/realcode_zoo.py`` enumerates and builds them: every transformers model type whose
code has BatchNorm, built from its default config with layer counts cut to 2; every ultralytics
model YAML at its smallest scale). Per model, in eval mode with randomised BN statistics
(:func:`benchmarks.realcode_zoo.randomize_bn`) and example inputs of batch 2 built from the config:

- **BN calls / foldable**: BN-like calls in one recorded run, and how many of them are exactly
  foldable, counted by :mod:`benchmarks.foldable` without any ``adapters`` code (its docstring
  states the rule: a BN call whose input is the very tensor a conv/linear call returned, that
  layer's weight a parameter read once and its output read by nothing else; or a BN whose only
  reader is a conv that reads no zero padding, or a linear on 2-D input; spec/folding.md 3-4);
- **folded**: BN calls the fused model no longer makes (the same recorder run on it), and the
  norms ``adapters.torch.fuse(model, example_inputs=...)`` left, counted by reason code; **unrep.**:
  BN-like modules the report neither folds nor lists as skipped (it must list every one);
- **verdict**: ``adapters.torch.verify(original, fused, inputs)`` against the float64 reference:
  ``ok``, ``WRONG`` (verify fails) or ``CRASH`` (fuse or verify raised; one line);
- **ours ms**: the process's CPU time of ``fuse(copy, inplace=True, example_inputs=...)``, median of
  ``--reps`` runs each on a fresh deep copy made before the clock starts (1 torch thread by default),
  after one untimed run (the one verified);
- **mmcv ms**: the same for mmcv's ``fuse_conv_bn`` (``adapters/torch/suite/peers.py``), with its
  verdict (``verify`` on the outputs, one rounded baseline copy: a peer's verdict costs less time);
  **own ms**: the library's own fuse where it has one (ultralytics ``model.fuse()``, which also
  merges RepConv branches), with its verdict; the ratios are ours over each;
- **flag**: ``folded>foldable`` where the fused model dropped more BN calls than the independent
  count allows (a counting gap or a wrong fold: investigate), ``unreported`` where the report misses
  a BN-like module.

A model is swept in its own try/except (a ``CRASH`` row with one line) under a per-model time
limit (``--timeout``, SIGALRM); ``--isolate`` runs each model in a subprocess instead, so that even a
hang in C code cannot stop the sweep. ``--quick`` sweeps a few models of each library.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import gc
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import realcode_zoo as zoo  # noqa: E402
from benchmarks.common import (  # noqa: E402
    Report,
    Table,
    configure_threads,
    format_counts,
    machine_info,
    short_error,
)
from benchmarks.foldable import count_foldable  # noqa: E402

log = logging.getLogger("bnfold.benchmarks.sweep_realcode")

LIBRARIES = ("transformers", "ultralytics")
QUICK_MODELS = {"transformers": ("transformers/resnet", "transformers/mobilenet_v2", "transformers/detr"),
                "ultralytics": ("ultralytics/yolov8n", "ultralytics/yolo11n-cls", "ultralytics/yoloe-11n")}
SCRIPT = "benchmarks/sweep_realcode.py"


# --------------------------------------------------------------------------------------------------
# One model

class ModelTimeout(Exception):
    pass


class NotBuilt(Exception):
    """The model could not be built or run from its default config (before any fold was tried)."""


_NO_BN = "has no module with running statistics"


def classify(record: dict[str, Any]) -> dict[str, Any]:
    """A record whose model could not be built is ``not built`` (``no BN`` when it has no BN-like module), never
    ``CRASH``: ``CRASH`` is for fuse or verify raising (also applied to records saved by older runs)."""
    if record.get("status") == "CRASH" and "ours" not in record and "bn_calls" not in record:
        detail = record.get("detail", "")
        if _NO_BN in detail:
            return dict(record, status="no BN")
        if detail.startswith("TooLarge"):
            return dict(record, status="skipped")
        if record.get("stage") == "build" or record.get("stage") is None:
            return dict(record, status="not built")
    return record


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise :class:`ModelTimeout` in the main thread after ``seconds`` (0: no limit)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise ModelTimeout(f"over the {seconds} s time limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def cpu_times(fn: Callable[[nn.Module], Any], prepared: nn.Module, reps: int) -> list[float]:
    """CPU seconds of ``fn(copy)`` over ``reps`` fresh deep copies of ``prepared`` (copies made untimed)."""
    times = []
    for _ in range(reps):
        model = copy.deepcopy(prepared)
        gc.collect()
        start = time.process_time()
        fn(model)
        times.append(time.process_time() - start)
        del model
    return times


def judge(original: nn.Module, fused: nn.Module, inputs: tuple[torch.Tensor, ...], *, light: bool = False
          ) -> tuple[str, str]:
    """``("ok", "")``, ``("WRONG", first divergence)`` or ``("CRASH", error)`` from ``adapters.torch.verify``.

    ``light`` (the peers): outputs only, one parameter-rounded baseline copy instead of three.
    """
    from adapters.torch import verify

    try:
        verdict = verify(original, fused, inputs, per_layer=not light, rounding_trials=1 if light else 3)
    except Exception as exc:
        return "CRASH", f"verify: {short_error(exc, 160)}"
    if verdict.ok:
        return "ok", ""
    where = verdict.first_divergence.describe()[:160] if verdict.first_divergence is not None else ""
    return "WRONG", f"ratio {float(verdict.ratio):.3g}; {where}".rstrip("; ")


def bn_calls_after(fused: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    return count_foldable(fused, inputs).bn_calls


def run_peer(name: str, fn: Callable[[nn.Module], nn.Module], prepared: nn.Module,
             inputs: tuple[torch.Tensor, ...], reps: int) -> dict[str, Any]:
    """One peer fuser on ``prepared``: median CPU ms, verdict, BN calls left; ``{"error": ...}`` if it raises."""
    try:
        fused = fn(copy.deepcopy(prepared))
    except Exception as exc:
        return {"verdict": "CRASH", "detail": f"{name}: {short_error(exc, 160)}"}
    verdict, detail = judge(prepared, fused, inputs, light=True)
    record: dict[str, Any] = {"verdict": verdict, "detail": detail}
    try:
        record["bn_calls_left"] = bn_calls_after(fused, inputs)
    except Exception as exc:  # the fused model cannot run: the verdict says so already
        record["detail"] = record["detail"] or f"running the fused model: {short_error(exc, 160)}"
    del fused
    times = cpu_times(fn, prepared, reps)
    record["ms"] = statistics.median(times) * 1e3
    record["times_ms"] = [round(t * 1e3, 2) for t in times]
    return record


def sweep_model(name: str, seed: int, reps: int) -> dict[str, Any]:
    """One model's record (plain data)."""
    from adapters.torch import fuse
    from adapters.torch.suite.peers import PEERS, peer_unavailable

    started = time.process_time()
    try:
        built = zoo.build(name, seed)
    except Exception as exc:  # the library's own code failing from its default config: not a finding about folding
        raise NotBuilt(short_error(exc, 200)) from exc
    model, inputs = built.module.eval(), built.inputs
    record: dict[str, Any] = {"model": name, "library": built.library, "notes": list(built.notes),
                              "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}
    if record["params_m"] > zoo.MAX_PARAMS_M:
        return dict(record, status="skipped", detail=f"{record['params_m']} M parameters > {zoo.MAX_PARAMS_M:g} M")
    record["statistics"] = zoo.randomize_bn(model, inputs, torch.Generator().manual_seed(seed + 2))
    count = count_foldable(model, inputs)
    record.update(bn_calls=count.bn_calls, foldable=count.foldable, bn_modules=len(count.modules),
                  not_foldable=count.not_foldable, other_classes=count.other_classes)
    if count.bn_calls == 0:
        return dict(record, status="no BN", detail="no BN-like call in the recorded run")

    # ours
    ours: dict[str, Any] = {}
    record["ours"] = ours
    try:
        fused, report = fuse(model, example_inputs=inputs)
    except Exception as exc:
        ours.update(verdict="CRASH", detail=f"fuse: {short_error(exc, 160)}")
    else:
        ours["verdict"], ours["detail"] = judge(model, fused, inputs)
        ours["folded_norms"] = len({p.norm for p in report.folded})
        ours["skipped"] = dict(collections.Counter(s.reason for s in report.skipped))
        reported = {p.norm for p in report.folded} | {s.norm for s in report.skipped}
        unreported = sorted(set(count.modules) - reported)
        ours["unreported"] = len(unreported)
        ours["unreported_names"] = unreported[:5]
        try:
            ours["folded"] = count.bn_calls - bn_calls_after(fused, inputs)
        except Exception as exc:
            ours["detail"] = ours["detail"] or f"running the fused model: {short_error(exc, 160)}"
        del fused
        times = cpu_times(lambda m: fuse(m, inplace=True, example_inputs=inputs), model, reps)
        ours["ms"] = statistics.median(times) * 1e3
        ours["times_ms"] = [round(t * 1e3, 2) for t in times]

    # peers
    mmcv = PEERS["mmcv"]
    missing = peer_unavailable(mmcv)
    record["mmcv"] = {"verdict": "—", "detail": missing} if missing else \
        run_peer("mmcv", lambda m: mmcv(m, inputs), model, inputs, reps)
    if built.own_fuse is not None:
        record["own"] = run_peer("own fuse", built.own_fuse, model, inputs, reps)

    flags = []
    if ours.get("folded") is not None and ours["folded"] > count.foldable:
        flags.append("folded>foldable")
    if ours.get("unreported"):
        flags.append("unreported")
    record["flags"] = flags
    record["status"] = ours.get("verdict", "CRASH")
    record["detail"] = ours.get("detail", "")
    record["seconds"] = round(time.process_time() - started, 1)
    return record


def sweep_isolated(name: str, args: Any) -> dict[str, Any]:
    """:func:`sweep_model` in a subprocess with a wall-clock limit (``--isolate``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--models", name, "--reps", str(args.reps),
                   "--seed", str(args.seed), "--threads", str(args.threads), "--timeout", "0", "--json", str(out)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout or None,
                                  check=False)
        except subprocess.TimeoutExpired:
            return {"model": name, "status": "CRASH", "detail": f"over the {args.timeout} s time limit (subprocess)"}
        if done.returncode != 0 or not out.exists():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
            return {"model": name, "status": "CRASH", "detail": f"subprocess exit {done.returncode}: {last}"}
        records = json.loads(out.read_text(encoding="utf-8"))["tables"][0]["records"]
        return dict(records[0])


# --------------------------------------------------------------------------------------------------
# Tables

def _ms(peer: dict[str, Any] | None) -> str:
    if not peer:
        return "—"
    if "ms" not in peer:
        return peer.get("verdict", "—")
    verdict = "" if peer.get("verdict") == "ok" else f" {peer.get('verdict')}"
    return f"{peer['ms']:.1f}{verdict}"


def _left(r: dict[str, Any]) -> str:
    ours = r["ours"].get("folded")
    cells = ["—" if ours is None else str(r["bn_calls"] - ours)]
    for peer in ("mmcv", "own"):
        cells.append(str((r.get(peer) or {}).get("bn_calls_left", "—")))
    return "/".join(cells)


def _ratio(ours: dict[str, Any], peer: dict[str, Any] | None) -> float | None:
    if not peer or "ms" not in peer or "ms" not in ours or peer["ms"] <= 0:
        return None
    return float(ours["ms"] / peer["ms"])


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}×"


HEADERS = ["model", "params M", "BN calls", "foldable", "folded", "left by reason", "unrep.", "verdict",
           "BN calls left ours/mmcv/own", "ours ms", "mmcv ms", "own ms", "ours/mmcv", "ours/own", "flag"]


def table_row(r: dict[str, Any]) -> list[Any]:
    if "ours" not in r:
        return [r["model"], r.get("params_m", "—"), r.get("bn_calls", "—"), r.get("foldable", "—"), "—", "—", "—",
                r["status"], "—", "—", "—", "—", "—", "—", r.get("detail", "")]
    ours = r["ours"]
    verdict = r["status"] if not r.get("detail") else f"{r['status']}: {r['detail']}"
    return [r["model"], r["params_m"], r["bn_calls"], r["foldable"], ours.get("folded", "—"),
            format_counts(ours.get("skipped")), ours.get("unreported", "—"), verdict, _left(r), _ms(ours),
            _ms(r.get("mmcv")), _ms(r.get("own")), _fmt_ratio(_ratio(ours, r.get("mmcv"))),
            _fmt_ratio(_ratio(ours, r.get("own"))),
            ", ".join(r.get("flags", []))]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def totals(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Sums and medians over the swept models (those with BN calls and a fuse result)."""
    swept = [r for r in records if "ours" in r]
    statuses = collections.Counter(r["status"] for r in records)
    left: collections.Counter[str] = collections.Counter()
    for r in swept:
        left.update(r["ours"].get("skipped", {}))
    bn = sum(r["bn_calls"] for r in swept)
    foldable = sum(r["foldable"] for r in swept)
    folded = sum(r["ours"].get("folded") or 0 for r in swept)
    both = [r for r in swept if "ms" in r["ours"] and "ms" in (r.get("mmcv") or {})]
    with_own = [r for r in swept if "ms" in r["ours"] and "ms" in (r.get("own") or {})]
    return {
        "models": len(records), "swept": len(swept), "statuses": dict(statuses), "bn_calls": bn,
        "foldable": foldable, "folded": folded, "coverage": folded / foldable if foldable else None,
        "left": dict(left), "unreported": sum(r["ours"].get("unreported") or 0 for r in swept),
        "flags": {f: sum(1 for r in swept if f in r.get("flags", [])) for f in ("folded>foldable", "unreported")},
        "median_ours_ms": _median([r["ours"]["ms"] for r in swept if "ms" in r["ours"]]),
        "median_mmcv_ms": _median([r["mmcv"]["ms"] for r in both]),
        "median_own_ms": _median([r["own"]["ms"] for r in with_own]),
        "median_ours_ms_with_mmcv": _median([r["ours"]["ms"] for r in both]),
        "median_ratio_mmcv": _median([r["ours"]["ms"] / r["mmcv"]["ms"] for r in both]),
        "ratio_of_medians_mmcv": (_median([r["ours"]["ms"] for r in both]) or 0)
        / (_median([r["mmcv"]["ms"] for r in both]) or 1) if both else None,
        "median_ratio_own": _median([r["ours"]["ms"] / r["own"]["ms"] for r in with_own]),
        "mmcv_verdicts": dict(collections.Counter(r["mmcv"]["verdict"] for r in swept if r.get("mmcv"))),
        "own_verdicts": dict(collections.Counter(r["own"]["verdict"] for r in swept if r.get("own"))),
    }


def totals_line(t: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "—" if value is None else f"{value:.1f} ms"

    coverage = "—" if t["coverage"] is None else f"{100 * t['coverage']:.1f} %"
    parts = [f"{t['models']} models ({format_counts(t['statuses'])})",
             f"{t['bn_calls']} BN calls, {t['foldable']} exactly foldable, {t['folded']} folded ({coverage})",
             f"left: {format_counts(t['left']) or 'none'}", f"unreported BN modules: {t['unreported']}",
             f"flags: {format_counts(t['flags'])}",
             f"median fuse time: ours {ms(t['median_ours_ms'])}, mmcv {ms(t['median_mmcv_ms'])} "
             f"(ours on those models {ms(t['median_ours_ms_with_mmcv'])}; median of per-model ratios "
             f"{_fmt_ratio(t['median_ratio_mmcv'])}, ratio of medians {_fmt_ratio(t['ratio_of_medians_mmcv'])}), "
             f"own fuse {ms(t['median_own_ms'])} (median ratio {_fmt_ratio(t['median_ratio_own'])})",
             f"mmcv verdicts: {format_counts(t['mmcv_verdicts'])}"]
    if t["own_verdicts"]:
        parts.append(f"own-fuse verdicts: {format_counts(t['own_verdicts'])}")
    return "; ".join(parts) + "."


def library_table(library: str, records: list[dict[str, Any]]) -> Table:
    table = Table(f"{library}: fold coverage, verdict and fuse time per model", HEADERS,
                  [table_row(r) for r in records], records)
    table.notes.append(f"Totals: {totals_line(totals(records))}")
    return table


# --------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv: list[str] | None) -> Any:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", choices=(*LIBRARIES, "all"), default="all")
    parser.add_argument("--models", default=None, help="comma-separated names (transformers/<type>, "
                                                        "ultralytics/<yaml stem>); default: every model of --library")
    parser.add_argument("--quick", action="store_true", help="three models per library")
    parser.add_argument("--reps", type=int, default=3, help="timed fuse runs per fuser and model (median; default 3)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write the records as JSON to PATH ('-' or no PATH: stdout, instead of the tables)")
    parser.add_argument("--markdown", action="store_true", help="print the markdown tables also with --json - "
                                                                "(they are printed anyway otherwise)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model (0: none; default 300)")
    parser.add_argument("--isolate", action="store_true", help="each model in its own subprocess")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="print the model names and exit")
    parser.add_argument("--render", metavar="JSON", default=None,
                        help="print the tables of a saved --json file (its machine, settings and records) and exit")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    return args


def model_names(args: Any) -> list[str]:
    libraries = LIBRARIES if args.library == "all" else (args.library,)
    names: list[str] = []
    if args.models:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        bad = [m for m in names if m.split("/", 1)[0] not in LIBRARIES or "/" not in m]
        if bad:
            raise SystemExit(f"{SCRIPT}: model names are transformers/<type> or ultralytics/<yaml stem>; got {bad}")
        return names
    if args.quick:
        return [m for lib in libraries for m in QUICK_MODELS[lib]]
    for lib in libraries:
        names += zoo.transformers_models() if lib == "transformers" else zoo.ultralytics_models()
    return names


def require(library: str) -> None:
    try:
        __import__(library)
    except ImportError as exc:
        raise SystemExit(f"{SCRIPT} needs {library} for the models asked for (pip install {library}): "
                         f"{short_error(exc)}") from None


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    for name in ("transformers", "ultralytics", "timm", "mmcv", "adapters.torch", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        import transformers

        transformers.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    configure_threads(args.threads)
    for library in () if args.render else LIBRARIES if args.library == "all" and not args.models else \
            sorted({m.split("/", 1)[0] for m in (args.models or "").split(",") if "/" in m} or {args.library}):
        require(library)
    if args.render:
        render(args.render)
        return 0
    quiet_libraries()
    names = model_names(args)
    if args.list:
        print("\n".join(names))
        return 0
    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    for name in names:
        if args.isolate:
            record = sweep_isolated(name, args)
        else:
            try:
                with time_limit(args.timeout):
                    record = sweep_model(name, args.seed, args.reps)
            except NotBuilt as exc:
                record = classify({"model": name, "status": "CRASH", "stage": "build", "detail": str(exc)})
            except Exception as exc:  # running or fusing failed: one line, and the sweep goes on
                log.debug("%s", name, exc_info=True)
                record = {"model": name, "status": "CRASH", "stage": "sweep", "detail": short_error(exc, 200)}
        record.setdefault("library", name.split("/", 1)[0])
        print(f"{name}: {record['status']} {record.get('detail') or ''}".rstrip(), file=sys.stderr, flush=True)
        records.append(record)
        if args.json not in (None, "-"):  # after every model: a sweep killed half-way keeps what it measured
            partial = make_report(records, versions(), {"models": len(names), "partial": True})
            Path(args.json).write_text(json.dumps(partial.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
    wall_s = time.perf_counter() - started
    info = versions()
    report = make_report(records, info, {"models": len(names), "reps": args.reps, "seed": args.seed,
                                         "batch": zoo.BATCH, "clock": "process CPU time",
                                         "wall_s": round(wall_s, 1)})
    if args.markdown and args.json == "-":  # both on stdout: the tables first
        print(report.markdown(), end="")
    report.emit(args.json)  # markdown unless --json -, and the JSON where --json says
    return 0


def versions() -> dict[str, Any]:
    """The machine, and the versions of the swept libraries and mmcv."""
    info = machine_info(torch.device("cpu"))
    for library in (*LIBRARIES, "mmcv"):
        with contextlib.suppress(ImportError):
            info[library] = __import__(library).__version__
    return info


def make_report(records: list[dict[str, Any]], info: dict[str, Any], settings: dict[str, Any]) -> Report:
    records = [classify(r) for r in records]
    tables = [library_table(lib, [r for r in records if r["library"] == lib])
              for lib in LIBRARIES if any(r["library"] == lib for r in records)]
    versions = ", ".join(f"{k} {info[k]}" for k in (*LIBRARIES, "mmcv") if k in info)
    return Report("Real-code sweep: transformers and ultralytics models, fold coverage, verdict, fuse time", info,
                  settings, tables, [f"Versions: {versions}.", f"All libraries: {totals_line(totals(records))}"])


def render(path: str) -> None:
    """Print the markdown of one or more saved ``--json`` files (comma-separated; their records joined, a later
    file's record of a model replacing an earlier one's)."""
    by_model: dict[str, dict[str, Any]] = {}
    info: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    for one in path.split(","):
        data = json.loads(Path(one).read_text(encoding="utf-8"))
        info, settings = data["machine"], data["settings"]
        by_model.update({r["model"]: r for table in data["tables"] for r in table["records"]})
    records = sorted(by_model.values(), key=lambda r: r["model"])
    settings = dict(settings, models=len(records))
    settings.pop("wall_s", None)
    print(make_report(records, info, settings).markdown(), end="")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

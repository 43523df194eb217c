"""Shared plumbing for the benchmark scripts: command line, machine description, timing, tables.

Every script under ``benchmarks/`` prints plain markdown tables headed by the machine that
produced them (CPU model or GPU name, torch version, threads) and accepts the same options:
``--device cpu|cuda``, ``--models a,b,...``, ``--quick`` and ``--json [PATH]``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Scripts run as ``python benchmarks/x.py`` from anywhere, or with ``PYTHONPATH=.`` where the project is not installed.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

log = logging.getLogger("bnfold.benchmarks")

__all__ = ["REPO_ROOT", "Table", "Report", "base_parser", "parse_models", "resolve_device", "machine_info",
           "markdown_table", "median_time", "timed_runs", "disable_tf32", "format_float", "format_ratio", "set_seed",
           "format_counts", "require"]


def base_parser(description: str, *, default_models: Sequence[str], quick_models: Sequence[str]
                ) -> argparse.ArgumentParser:
    """The options every benchmark script shares."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the models run (default: cpu); cuda without a GPU exits with a message")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated model names (default: {','.join(default_models)}; "
                             f"--quick: {','.join(quick_models)})")
    parser.add_argument("--quick", action="store_true", help="fewer models and repetitions, for a smoke run")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write the results as JSON to PATH ('-' or no PATH: to stdout, instead of the tables)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, statistics and inputs")
    return parser


def parse_models(arg: str | None, quick: bool, default_models: Sequence[str], quick_models: Sequence[str],
                 known: Sequence[str]) -> list[str]:
    """The model list from ``--models`` (or the defaults), each checked against the known names."""
    names = [m.strip() for m in arg.split(",") if m.strip()] if arg else list(quick_models if quick else default_models)
    unknown = [m for m in names if m not in known]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(known)}")
    return names


def resolve_device(name: str) -> torch.device:
    """The torch device for ``--device``; exits with a clear message when CUDA was asked for but is absent."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False); "
                         "nothing measured")
    return torch.device(name)


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def disable_tf32() -> str:
    """Turn TF32 off for matmuls and cuDNN convolutions, returning a line that says so.

    PyTorch enables TF32 for cuDNN convolutions by default on Ampere and later, which gives fp32
    convolutions fp16's 10-bit mantissa: an accuracy comparison in "fp32" would then measure TF32.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return (f"TF32 off (torch.backends.cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
            f"torch.backends.cudnn.allow_tf32={torch.backends.cudnn.allow_tf32})")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What produced the numbers: enough to tell two tables' machines apart."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def describe_machine(info: dict[str, Any]) -> str:
    where = f"GPU {info['gpu']} (CUDA {info['cuda']}, cuDNN {info['cudnn']}), host CPU {info['cpu']}" \
        if "gpu" in info else f"CPU {info['cpu']} ({info['cpu_count']} cores)"
    return f"{where}; torch {info['torch']}, {info['torch_threads']} threads, Python {info['python']}"


def format_float(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.{digits - 1}e}"


def format_ratio(x: float | None) -> str:
    if x is None:
        return "—"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.2f}×" if x < 100 else f"{x:.3g}×"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain markdown table; cells are str()-ed, '|' escaped so an error message cannot break the layout."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Table:
    """One result table: markdown cells for people, ``records`` (plain data) for ``--json``."""

    title: str
    headers: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        parts = [f"### {self.title}", "", markdown_table(self.headers, self.rows)]
        if self.notes:
            parts += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(parts)


@dataclass
class Report:
    """A script's whole output: the machine, the command, its settings and its tables."""

    benchmark: str
    machine: dict[str, Any]
    settings: dict[str, Any]
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        command = "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}"] + sys.argv[1:])
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        parts = [f"## {self.benchmark}", "", f"Machine: {describe_machine(self.machine)}.", "",
                 f"Command: `{command}`", "", f"Settings: {settings}."]
        parts += [""] + [f"{n}" for n in self.notes] if self.notes else []
        for table in self.tables:
            parts += ["", table.markdown()]
        return "\n".join(parts) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "machine": self.machine, "settings": self.settings, "notes": self.notes,
                "tables": [{"title": t.title, "records": t.records, "notes": t.notes} for t in self.tables]}

    def emit(self, json_path: str | None) -> None:
        """Print the markdown, or the JSON to stdout (``--json`` / ``--json -``), or both (``--json PATH``)."""
        if json_path is None or json_path != "-":
            print(self.markdown(), end="", flush=True)
        if json_path is None:
            return
        text = json.dumps(self.to_dict(), indent=2, default=_json_default, allow_nan=True)
        if json_path == "-":
            print(text, flush=True)
        else:
            Path(json_path).write_text(text + "\n", encoding="utf-8")


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__} {value!r}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], *, reps: int, warmup: int = 1, device: torch.device | None = None,
                budget_s: float | None = None) -> tuple[float, int]:
    """Median wall time of ``fn()`` in seconds (see :func:`timed_runs`) and the number of runs timed."""
    times = timed_runs(fn, reps=reps, warmup=warmup, device=device, budget_s=budget_s)
    return statistics.median(times), len(times)


def timed_runs(fn: Callable[[], Any], *, reps: int, warmup: int = 1, device: torch.device | None = None,
               budget_s: float | None = None) -> list[float]:
    """Wall times of ``fn()`` in seconds over up to ``reps`` runs, after ``warmup`` untimed runs.

    The device is synchronised around every run so GPU work is inside the timed interval. When
    ``budget_s`` is given, stops early (after at least one timed run) once the timed runs have
    used it up, so a slow configuration cannot blow the whole script's time.
    """
    dev = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    synchronize(dev)
    times: list[float] = []
    spent = 0.0
    for _ in range(reps):
        synchronize(dev)
        start = time.perf_counter()
        fn()
        synchronize(dev)
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
        if budget_s is not None and spent >= budget_s:
            break
    return times


def configure_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def format_counts(counts: Mapping[str, int] | None) -> str:
    """``{"b": 2, "a": 1}`` as one table cell: ``"a 1, b 2"`` (empty for none)."""
    return ", ".join(f"{key} {n}" for key, n in sorted((counts or {}).items()))


def require(library: str, *, script: str, purpose: str) -> Any:
    """Import ``library`` or exit with one line saying which script needs it, what for, and what to install."""
    try:
        return importlib.import_module(library)
    except ImportError as exc:
        raise SystemExit(f"{script} needs {library} {purpose} (pip install {library}): {short_error(exc)}") from None


def short_error(exc: BaseException, limit: int = 90) -> str:
    """An exception as one short table cell: type and the first line of its message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------------------
# The fusers compared side by side. Each takes a model and its example inputs (a tuple of input tensors,
# used only by fusers that trace the model on them: AIMET) and returns ``(fused_model, report_or_None)``
# without modifying the model, so one prepared model can be handed to all of them in turn.

@dataclass(frozen=True)
class Fuser:
    """A BatchNorm fuser under comparison; ``unavailable`` says why it cannot run here (None: it can)."""

    name: str
    fuse: Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], tuple[torch.nn.Module, Any]] | None
    unavailable: str | None = None


def _ours() -> Fuser:
    try:
        from adapters.torch import fuse
    except ImportError as exc:
        return Fuser("ours", None, f"adapters.torch not importable ({short_error(exc)})")
    return Fuser("ours", lambda model, inputs: fuse(model, inplace=False))


def _peer(name: str) -> Fuser:
    """A peer of adapters/torch/suite/peers.py, given a deep copy (peers fold the model they get in place)."""
    import copy

    from adapters.torch.suite.peers import PEERS, peer_unavailable

    peer = PEERS[name]
    missing = peer_unavailable(peer)
    if missing is not None:
        return Fuser(name, None, missing)
    return Fuser(name, lambda model, inputs: (peer(copy.deepcopy(model), inputs), None))


#: Ours first, then every peer of adapters/torch/suite/peers.py.
FUSER_NAMES = ("ours", "mmcv", "torch.fx", "aimet")


def make_fusers(names: Sequence[str] = FUSER_NAMES) -> list[Fuser]:
    """The fusers by name, in the order given; one that cannot be imported comes back with ``unavailable`` set."""
    unknown = [n for n in names if n not in FUSER_NAMES]
    if unknown:
        raise ValueError(f"unknown fuser(s) {unknown}; known: {', '.join(FUSER_NAMES)}")
    fusers = [_ours() if n == "ours" else _peer(n) for n in names]
    for f in fusers:
        if f.unavailable:
            log.warning("%s skipped: %s", f.name, f.unavailable)
    return fusers


DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

"""The framework-neutral parts of a fuser audit: statuses, the result of one model, printing, loading a fuser.

An audit runs somebody's BatchNorm folder over a suite of models and gives each model one status
(:data:`STATUSES`); the torch adapter's audit (``adapters.torch.suite.audit``) and the ONNX
adapter's (``adapters.onnx.suite.audit``) differ in how they build, run and count models, and share
everything here: what a status means, the result record, the text and JSON output and the exit code.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["STATUSES", "FAILING", "AuditResult", "load_object", "one_line", "summarize", "format_header",
           "format_result", "format_summary", "markdown_table", "exit_code"]

#: Every status, in the order summaries list them:
#: ``ok`` right output, every foldable norm folded; ``missed`` right output, a foldable norm left;
#: ``WRONG`` output beyond the error model; ``CRASH`` the fuser or the fused model raised;
#: ``INVALID`` the fused model is not a valid model of its format (ONNX: fails
#: ``onnx.checker.check_model(full_check=True)`` or onnxruntime cannot load it).
STATUSES = ("ok", "missed", "WRONG", "CRASH", "INVALID")

#: The statuses that make an audit fail (exit code 1): the fuser broke a model.
FAILING = frozenset({"WRONG", "CRASH", "INVALID"})


def load_object(spec: str, what: str = "object") -> Any:
    """Import ``"package.module:attribute"`` (the attribute may be dotted: ``module:Class.method``)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{what} must be given as 'package.module:function', got {spec!r}")
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import module {module_name!r} for {what} {spec!r}: {error}") from error
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r} ({what} {spec!r})") from None
    return target


def one_line(error: BaseException, limit: int = 160) -> str:
    """``"TypeName: message"`` on one line, the message shortened to ``limit`` characters."""
    message = " ".join(str(error).split())
    if len(message) > limit:
        message = message[:limit - 3] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


@dataclass(frozen=True)
class AuditResult:
    """Outcome of one model. ``left`` (norms left after fusing) is None when the fused model never ran.

    A correct fuser leaves between ``expected_left`` and ``expected_left + rank_dependent`` norms
    (``rank_dependent``: folds exact only on inputs the fuser cannot prove to be 2-D).
    """

    name: str
    family: str
    status: str
    left: int | None
    expected_left: int
    ratio: float | None
    max_abs_error: float | None
    detail: str
    seconds: float
    rank_dependent: int = 0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"AuditResult.status must be one of {STATUSES}, got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("ratio", "max_abs_error"):
            if data[key] is not None and not math.isfinite(data[key]):
                data[key] = str(data[key])  # JSON has no inf/nan
        return data


def summarize(results: Iterable[AuditResult], statuses: Sequence[str] = STATUSES) -> dict[str, int]:
    """How many results have each status."""
    counts = {status: 0 for status in statuses}
    for outcome in results:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    return counts


def exit_code(results: Iterable[AuditResult]) -> int:
    """0 when no result is WRONG, CRASH or INVALID, else 1."""
    return int(any(r.status in FAILING for r in results))


_NAME_WIDTH = 38
_FAMILY_WIDTH = 18


def format_header() -> str:
    return f"{'status':<7} {'model':<{_NAME_WIDTH}} {'family':<{_FAMILY_WIDTH}} {'left':>7} {'ratio':>8}  detail"


def format_result(outcome: AuditResult) -> str:
    """One line: status, model, family, norms left / expected, error ratio, detail."""
    expected = str(outcome.expected_left)
    if outcome.rank_dependent:
        expected += f"+{outcome.rank_dependent}"
    left = "-" if outcome.left is None else f"{outcome.left}/{expected}"
    ratio = "-" if outcome.ratio is None else f"{outcome.ratio:.3g}"
    line = (f"{outcome.status:<7} {outcome.name:<{_NAME_WIDTH}} {outcome.family:<{_FAMILY_WIDTH}} {left:>7} "
            f"{ratio:>8}  {outcome.detail}")
    return line.rstrip()


def format_summary(results: Sequence[AuditResult], fuser_name: str, statuses: Sequence[str] = STATUSES) -> str:
    counts = summarize(results, statuses)
    listed = ", ".join(f"{counts[s]} {s}" for s in statuses)
    return f"summary: {listed} ({len(results)} models) -- fuser {fuser_name}"


def markdown_table(runs: dict[str, Sequence[AuditResult]]) -> str:
    """A markdown table, one row per model and one status column per fuser (``runs``: fuser -> results).

    The models are listed in the order of the first fuser's results.
    """
    if not runs:
        return ""
    fusers = list(runs)
    by_fuser = {fuser: {r.name: r for r in results} for fuser, results in runs.items()}
    first = runs[fusers[0]]
    lines = ["| case | family | " + " | ".join(fusers) + " |",
             "| --- | --- | " + " | ".join("---" for _ in fusers) + " |"]
    for result in first:
        cells = [by_fuser[f][result.name].status if result.name in by_fuser[f] else "-" for f in fusers]
        lines.append(f"| {result.name} | {result.family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

"""The framework-neutral parts of a fuser audit: statuses, the result of one model, printing, loading a fuser.

An audit runs somebody's BatchNorm folder over a suite of models and gives each model one status
(:data:`STATUSES`); the torch adapter's audit (``adapters.torch.suite.audit``) and the ONNX
adapter's (``adapters.onnx.suite.audit``) differ in how they build, run and count models, and share
everything here: what a status means, choosing the models, the status a verdict and a count of
norms left give, the result record, the text and JSON output, the progress lines and the exit code.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TextIO

from .verdict import Verdict

__all__ = ["STATUSES", "FAILING", "AuditResult", "load_object", "one_line", "selection", "warnings_note",
           "verdict_status", "summarize", "format_header", "format_result", "format_summary", "markdown_table",
           "exit_code", "estimate_seconds_left", "format_duration", "AuditProgress"]

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


def selection(select: Iterable[str]) -> Callable[[str, str], bool]:
    """Whether a model, given its name and family, is among ``select`` (names or families); all when it is empty."""
    wanted = set(select)

    def keep(name: str, family: str) -> bool:
        return not wanted or name in wanted or family in wanted

    return keep


def warnings_note(caught: Sequence[warnings.WarningMessage]) -> str:
    """The detail's note on the warnings a fuser issued (recorded, so that a caller's filters cannot make
    them crashes of the audit); empty when there were none."""
    if not caught:
        return ""
    return f"{len(caught)} warning(s), first: {caught[0].category.__name__}: {caught[0].message}"


def verdict_status(verdict: Verdict, left: int, expected_left: int, notes: Iterable[str], *, leftover: str,
                   rank_dependent: int = 0) -> tuple[str, str]:
    """The status and detail of a fused model that ran: ``verdict`` on its output, ``left`` norms left in it.

    ``WRONG`` when the verdict fails (by how much, the first diverging layer, the outputs' details);
    ``missed`` when more than ``expected_left + rank_dependent`` norms are left (``leftover`` names
    what is counted, e.g. ``"norm evaluation(s)"``); ``ok`` otherwise, saying when the count differs
    from the hand-worked one. ``notes`` (e.g. :func:`warnings_note`) end the detail.
    """
    notes = [note for note in notes if note]
    if not verdict.ok:
        nonfinite = not all(math.isfinite(o.fused_error) for o in verdict.outputs)
        parts = ["the output has NaN or infinite values where the original's is within the error model" if nonfinite
                 else f"error {verdict.ratio:.3g}x the unfused model's (limit 4x)"]
        if verdict.first_divergence is not None:
            parts.append(verdict.first_divergence.describe())
        parts.extend(o.detail for o in verdict.outputs if o.detail)
        return "WRONG", "; ".join([*parts, *notes])
    if left > expected_left + rank_dependent:
        return "missed", "; ".join([f"{left - expected_left} foldable {leftover} left", *notes])
    if left > expected_left:
        return "ok", "; ".join([f"{left - expected_left} BatchNorm1d<->Linear left: exact only on 2-D inputs, "
                                "not provable without example inputs", *notes])
    if left < expected_left:
        # Not a fault (the output is right): e.g. a GraphModule can fold a shared norm at one call site and
        # keep it at another, or a norm is folded into a layer the case expects it to stay out of.
        return "ok", "; ".join([f"folded beyond the hand-worked count ({left} left < {expected_left})", *notes])
    return "ok", "; ".join(notes)


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


# --------------------------------------------------------------------------------------------------
# Progress: how many models are done, and about how long the rest will take.


def estimate_seconds_left(done: Sequence[tuple[str, float]], remaining: Sequence[str]) -> tuple[float, bool]:
    """Estimated seconds for the ``remaining`` targets (their families, in order), from the ``done`` ones.

    ``done`` holds (family, seconds) of the finished targets. A remaining target is estimated at the
    mean time of the finished ones of its family -- a zoo network takes a hundred times longer than
    a case -- or, for a family not timed yet, at the mean of all finished targets. Returns the
    estimate and whether every remaining family had been timed (if not, the estimate is a guess
    that is usually low: the zoo comes after the small cases).
    """
    if not remaining:
        return 0.0, True
    if not done:
        return math.nan, False
    by_family: dict[str, list[float]] = {}
    for family, seconds in done:
        by_family.setdefault(family, []).append(seconds)
    overall = sum(seconds for _, seconds in done) / len(done)
    means = {family: sum(times) / len(times) for family, times in by_family.items()}
    total = sum(means.get(family, overall) for family in remaining)
    return total, all(family in means for family in remaining)


def format_duration(seconds: float) -> str:
    """``'<1 s'``, ``'42 s'``, ``'3 min 05 s'``, ``'1 h 02 min'``; ``'?'`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    whole = round(seconds)
    if whole < 1:
        return "<1 s"
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


class _Target(Protocol):
    @property
    def family(self) -> str: ...


class AuditProgress:
    """Writes one progress line per audited model to ``stream``: ``[done/total] status name (time); ... left``.

    ``targets``: the models to be audited, in order (anything with a ``family``). Meant for stderr,
    so that the table or JSON on stdout stays clean. On a terminal the line is rewritten in place
    (call :meth:`clear` before printing anything else to the same terminal); elsewhere (a log file,
    a pipe) each update is a line of its own.
    """

    def __init__(self, targets: Sequence[_Target], stream: TextIO, *, transient: bool | None = None):
        self._families = [target.family for target in targets]
        self._done: list[tuple[str, float]] = []
        self._stream = stream
        self._transient = _isatty(stream) if transient is None else transient
        self._shown = False

    def line(self, outcome: AuditResult) -> str:
        """The progress text after ``outcome`` (the next finished target), without updating anything."""
        done = len(self._done) + 1
        left, sure = estimate_seconds_left([*self._done, (outcome.family, outcome.seconds)],
                                           self._families[done:])
        if done >= len(self._families):
            tail = "done"
        else:
            tail = f"about {format_duration(left)} left"
            if not sure:
                timed = {family for family, _ in self._done} | {outcome.family}
                untimed = sorted(set(self._families[done:]) - timed)
                tail += f" (not timed yet: {', '.join(untimed)})"
        return (f"[{done}/{len(self._families)}] {outcome.status:<7} {outcome.name} "
                f"({format_duration(outcome.seconds)}); {tail}")

    def update(self, outcome: AuditResult) -> None:
        text = self.line(outcome)
        self._done.append((outcome.family, outcome.seconds))
        if self._transient:
            self._stream.write("\r\033[K" + text)
            self._shown = True
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def clear(self) -> None:
        """Remove a transient line from the terminal (no-op otherwise)."""
        if self._transient and self._shown:
            self._stream.write("\r\033[K")
            self._stream.flush()
            self._shown = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or file-like objects without a terminal
        return False

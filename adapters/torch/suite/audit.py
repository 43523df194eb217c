"""Audit a BatchNorm fuser -- this project's or anyone's -- over the case suite and the model zoo.

A fuser is any callable ``fuser(model) -> model`` named as ``"module:function"`` (for example
``mmcv.cnn:fuse_conv_bn``, ``torch.fx.experimental.optimization:fuse`` or
``adapters.torch:fuse_conv_bn``). A fuser that traces the model on example inputs (AIMET's
``fold_all_batch_norms``, wrapped as :func:`adapters.torch.suite.peers.aimet_fold`) is audited with
``with_inputs=True`` and called as ``fuser(model, example_inputs)``, ``example_inputs`` being the
tuple of the model's positional input tensors (a copy of the input it is verified on). Which
convention a fuser has is said, not guessed: a fuser called the wrong way usually raises a
``TypeError``, reported as CRASH with a note saying which convention its signature asks for.
For each model of :mod:`adapters.torch.suite.cases` (and of
:mod:`adapters.torch.suite.zoo` when torchvision/timm are installed) the fuser gets a deep copy of the
model in eval mode; its result is checked with :func:`adapters.torch.verify` against the float64
reference run of the original, and the norm evaluations left in one forward pass are counted and
compared with the hand-worked number a correct fuser leaves. Each model gets one status:

``ok``      the output is right and every foldable norm was folded;
``missed``  the output is right but more norm evaluations are left than necessary (a
            BatchNorm1d <-> Linear pair whose 2-D input cannot be proven without example inputs
            may be left: ``fuser(model)`` gets none);
``WRONG``   the output breaks the error model (by how much, and the first diverging layer);
``CRASH``   the fuser, or the fused model, raised (exception type and message).

:class:`AuditProgress` writes a count and an estimate of the time left to a stream (stderr in
the CLI), and whatever a fuser prints is sent to stderr, so that the report on stdout stays clean.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, TextIO, TypeVar

import torch
import torch.fx
from torch import nn

from ..checking import ModelRunError, verify
from . import cases as case_suite

__all__ = ["AuditResult", "AuditTarget", "AuditProgress", "STATUSES", "load_object", "audit_targets", "audit_one",
           "run_audit", "format_header", "format_result", "format_summary", "summarize", "estimate_seconds_left",
           "format_duration"]

logger = logging.getLogger(__name__)

#: Statuses in the order the summary lists them.
STATUSES = ("ok", "missed", "WRONG", "CRASH")

_ModuleOrTensor = TypeVar("_ModuleOrTensor", nn.Module, torch.Tensor)


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


@dataclass(frozen=True)
class AuditTarget:
    """One model to audit: how to build it and its input, and how many norm evaluations must remain."""

    name: str
    family: str
    build: Callable[[], nn.Module]
    make_input: Callable[[], torch.Tensor]
    expected_left: int
    #: Further norm evaluations a correct fuser may leave: BatchNorm1d <-> Linear folds that are
    #: exact only on 2-D inputs, which ``fuser(model)``, given no example input, cannot always prove.
    rank_dependent: int = 0


@dataclass(frozen=True)
class AuditResult:
    """Outcome of one model. ``left`` is None when the fused model never ran (CRASH).

    A correct fuser leaves between ``expected_left`` and ``expected_left + rank_dependent`` norm
    evaluations (see :attr:`AuditTarget.rank_dependent`).
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

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("ratio", "max_abs_error"):
            if data[key] is not None and not math.isfinite(data[key]):
                data[key] = str(data[key])  # JSON has no inf/nan
        return data


def _built_on(make: Callable[[], _ModuleOrTensor], device: torch.device | str) -> _ModuleOrTensor:
    return make().to(device)


def audit_targets(*, cases: bool = True, zoo: bool = True, select: Iterable[str] = (),
                  device: torch.device | str = "cpu") -> Iterator[AuditTarget]:
    """The case suite, then the zoo entries whose library is installed; ``select``: names or families to keep."""
    wanted = set(select)

    def keep(name: str, family: str) -> bool:
        return not wanted or name in wanted or family in wanted

    if cases:
        for case in case_suite.iter_cases():
            if keep(case.name, case.family):
                yield AuditTarget(case.name, case.family, partial(_built_on, case.build, device),
                                  partial(case.make_input, device=device), case.left, len(case.rank_dependent))
    if zoo:
        from . import zoo as model_zoo

        for entry in model_zoo.ZOO.values():
            if not keep(entry.name, "zoo"):
                continue
            try:
                importlib.import_module(entry.library)
            except ImportError:
                logger.warning("skipping zoo model %s: %s is not installed (the 'zoo' extra)", entry.name,
                               entry.library)
                continue
            yield AuditTarget(entry.name, "zoo", partial(_built_on, entry.build, device),
                              partial(_built_on, entry.example_input, device), entry.unfoldable)


def _inlined_norms(model: nn.Module) -> int:
    """Norm layers a ``torch.fx.GraphModule`` evaluates as inlined ops rather than by calling the module.

    Tracing through a norm whose class fx does not keep as a leaf (e.g. FrozenBatchNorm2d) turns
    it into graph ops that read its ``running_var`` with ``get_attr``; forward hooks never see
    those evaluations, so they are counted from the graph (once per forward pass each).
    """
    count = 0
    for module in model.modules():
        graph = getattr(module, "graph", None)
        if not isinstance(module, torch.fx.GraphModule) or graph is None:
            continue
        owners = {node.target.rpartition(".")[0] for node in graph.nodes
                  if node.op == "get_attr" and isinstance(node.target, str) and node.target.endswith("running_var")}
        count += len(owners)
    return count


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split())
    if len(message) > 160:
        message = message[:157] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _required_positional(function: Callable[..., Any]) -> tuple[int, bool] | None:
    """(required positional parameters, whether it takes a second positional argument at all); None if unknown."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return None
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(1 for p in positional if p.default is p.empty)
    takes_more = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in parameters)
    return required, takes_more


def _convention_note(fuser: Callable[..., Any], with_inputs: bool, error: BaseException) -> str:
    """For a TypeError raised by a fuser called the wrong way: which convention its signature asks for."""
    if not isinstance(error, TypeError):
        return ""
    shape = _required_positional(fuser)
    if shape is None:
        return ""
    required, takes_more = shape
    if not with_inputs and required >= 2:
        return (f" (its signature requires {required} positional arguments: a fuser that takes example inputs "
                f"is audited as FUNCTION(model, example_inputs) with --with-inputs)")
    if with_inputs and not takes_more:
        return " (its signature takes the model only: audit it without --with-inputs)"
    return ""


def audit_one(fuser: Callable[..., nn.Module], target: AuditTarget, *, with_inputs: bool = False) -> AuditResult:
    """Fuse a deep copy of ``target``'s model with ``fuser`` and judge the result.

    ``with_inputs``: call ``fuser(model, example_inputs)``, ``example_inputs`` a tuple holding a copy
    of the input the fused model is then verified on; otherwise ``fuser(model)``.
    """
    start = time.perf_counter()
    model = target.build().eval()
    x = target.make_input()

    def result(status: str, detail: str, left: int | None = None, ratio: float | None = None,
               max_abs: float | None = None) -> AuditResult:
        return AuditResult(target.name, target.family, status, left, target.expected_left, ratio, max_abs, detail,
                           time.perf_counter() - start, target.rank_dependent)

    # A fuser's warnings are its own business; recording them keeps a caller's warning filters
    # (e.g. "error") from turning them into crashes of the audit.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # What a fuser prints is its own chatter, not part of the report that goes to stdout.
            with contextlib.redirect_stdout(sys.stderr):
                fused = fuser(copy.deepcopy(model), (x.clone(),)) if with_inputs else fuser(copy.deepcopy(model))
        except Exception as error:  # the fuser under audit may raise anything: that is the finding
            return result("CRASH", f"fuser raised {_one_line(error)}{_convention_note(fuser, with_inputs, error)}")
        if not isinstance(fused, nn.Module):
            return result("CRASH", f"TypeError: fuser returned {type(fused).__name__}, not an nn.Module")
        try:
            verdict = verify(model, fused, x)
            left = case_suite.count_norm_calls(fused, x) + _inlined_norms(fused)
        except ModelRunError as error:
            if error.which == "fused":
                return result("CRASH", f"fused model raised {_one_line(error.__cause__ or error)}")
            raise
    note = f"; {len(caught)} warning(s), first: {caught[0].category.__name__}: {caught[0].message}" if caught else ""
    if not verdict.ok:
        parts = [f"error {verdict.ratio:.3g}x the unfused model's (limit 4x)"]
        if verdict.first_divergence is not None:
            parts.append(verdict.first_divergence.describe())
        parts.extend(o.detail for o in verdict.outputs if o.detail)
        return result("WRONG", "; ".join(parts) + note, left, verdict.ratio, verdict.max_abs_error)
    if left > target.expected_left + target.rank_dependent:
        return result("missed", f"{left - target.expected_left} foldable norm evaluation(s) left{note}", left,
                      verdict.ratio, verdict.max_abs_error)
    detail = note.removeprefix("; ")
    if left > target.expected_left:
        detail = (f"{left - target.expected_left} BatchNorm1d<->Linear left: exact only on 2-D inputs, "
                  f"not provable without example inputs" + note)
    if left < target.expected_left:
        # Not a fault: e.g. a GraphModule can fold a shared norm at one call site and keep it at another.
        detail = f"folded beyond the hand-worked count ({left} left < {target.expected_left})" + note
    return result("ok", detail, left, verdict.ratio, verdict.max_abs_error)


def run_audit(fuser: Callable[..., nn.Module], targets: Iterable[AuditTarget],
              on_result: Callable[[AuditResult], None] | None = None, *, with_inputs: bool = False
              ) -> list[AuditResult]:
    """Audit every target in order; ``on_result`` is called as each finishes (for streaming output).

    ``with_inputs``: the fuser is called as ``fuser(model, example_inputs)`` (see :func:`audit_one`).
    """
    results = []
    for target in targets:
        logger.info("auditing %s", target.name)
        outcome = audit_one(fuser, target, with_inputs=with_inputs)
        results.append(outcome)
        if on_result is not None:
            on_result(outcome)
    return results


def summarize(results: Iterable[AuditResult]) -> dict[str, int]:
    counts = {status: 0 for status in STATUSES}
    for outcome in results:
        counts[outcome.status] += 1
    return counts


_NAME_WIDTH = 38
_FAMILY_WIDTH = 18


def format_header() -> str:
    return f"{'status':<7} {'model':<{_NAME_WIDTH}} {'family':<{_FAMILY_WIDTH}} {'left':>7} {'ratio':>8}  detail"


def format_result(outcome: AuditResult) -> str:
    """One line: status, model, family, norm evaluations left / expected, error ratio, detail."""
    expected = str(outcome.expected_left)
    if outcome.rank_dependent:
        expected += f"+{outcome.rank_dependent}"
    left = "-" if outcome.left is None else f"{outcome.left}/{expected}"
    ratio = "-" if outcome.ratio is None else f"{outcome.ratio:.3g}"
    line = (f"{outcome.status:<7} {outcome.name:<{_NAME_WIDTH}} {outcome.family:<{_FAMILY_WIDTH}} {left:>7} "
            f"{ratio:>8}  {outcome.detail}")
    return line.rstrip()


def format_summary(results: list[AuditResult], fuser_name: str) -> str:
    counts = summarize(results)
    listed = ", ".join(f"{counts[s]} {s}" for s in STATUSES)
    return f"summary: {listed} ({len(results)} models) -- fuser {fuser_name}"


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


class AuditProgress:
    """Writes one progress line per audited model to ``stream``: ``[done/total] status name (time); ... left``.

    Meant for stderr, so that the table or JSON on stdout stays clean. On a terminal the line is
    rewritten in place (call :meth:`clear` before printing anything else to the same terminal);
    elsewhere (a log file, a pipe) each update is a line of its own.
    """

    def __init__(self, targets: Sequence[AuditTarget], stream: TextIO, *, transient: bool | None = None):
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

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

The statuses, the result record, its printing and the progress lines (:class:`AuditProgress`: a
count and an estimate of the time left, on stderr in the CLI) are the framework-neutral ones of
:mod:`adapters.audit`, re-exported here; a torch audit never gives ``INVALID``, so its summaries list
:data:`STATUSES`. Whatever a fuser prints is sent to stderr, so that the report on stdout stays clean.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch
import torch.fx
from torch import nn

from ... import audit as shared
from ...audit import (
    AuditProgress,
    AuditResult,
    estimate_seconds_left,
    exit_code,
    format_duration,
    format_header,
    format_result,
    load_object,
    one_line,
    selection,
    verdict_status,
    warnings_note,
)
from ..checking import ModelRunError, verify
from . import cases as case_suite

__all__ = ["AuditResult", "AuditTarget", "AuditProgress", "STATUSES", "load_object", "audit_targets", "audit_one",
           "run_audit", "format_header", "format_result", "format_summary", "summarize", "exit_code",
           "estimate_seconds_left", "format_duration"]

logger = logging.getLogger(__name__)

#: The statuses a torch audit gives, in the order the summary lists them: those of
#: :data:`adapters.audit.STATUSES` but ``INVALID`` (an ``nn.Module`` that runs is a valid model).
STATUSES = tuple(status for status in shared.STATUSES if status != "INVALID")

_ModuleOrTensor = TypeVar("_ModuleOrTensor", nn.Module, torch.Tensor)


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


def _built_on(make: Callable[[], _ModuleOrTensor], device: torch.device | str) -> _ModuleOrTensor:
    return make().to(device)


def audit_targets(*, cases: bool = True, zoo: bool = True, select: Iterable[str] = (),
                  device: torch.device | str = "cpu") -> Iterator[AuditTarget]:
    """The case suite, then the zoo entries whose library is installed; ``select``: names or families to keep."""
    keep = selection(select)
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
            return result("CRASH", f"fuser raised {one_line(error)}{_convention_note(fuser, with_inputs, error)}")
        if not isinstance(fused, nn.Module):
            return result("CRASH", f"TypeError: fuser returned {type(fused).__name__}, not an nn.Module")
        try:
            verdict = verify(model, fused, x)
            left = case_suite.count_norm_calls(fused, x) + _inlined_norms(fused)
        except ModelRunError as error:
            if error.which == "fused":
                return result("CRASH", f"fused model raised {one_line(error.__cause__ or error)}")
            raise
    status, detail = verdict_status(verdict, left, target.expected_left, [warnings_note(caught)],
                                    leftover="norm evaluation(s)", rank_dependent=target.rank_dependent)
    return result(status, detail, left, verdict.ratio, verdict.max_abs_error)


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
    """How many results have each of :data:`STATUSES`."""
    return shared.summarize(results, STATUSES)


def format_summary(results: Sequence[AuditResult], fuser_name: str) -> str:
    """``summary: N ok, N missed, N WRONG, N CRASH (N models) -- fuser NAME``."""
    return shared.format_summary(results, fuser_name, STATUSES)

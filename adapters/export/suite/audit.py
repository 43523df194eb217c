"""Audit a BatchNorm folder for exported programs -- this project's or anyone's -- over the export case suite.

A folder is any callable ``fold_pass(program) -> result`` named as ``"module:function"``
(``adapters.export.suite.peers:bnfold``, ``adapters.export.suite.peers:pt2e_fuse_conv_bn``, ...).
Each case (:mod:`.cases`) is handed over in the IRs the folder takes (its ``irs`` attribute; all by
default): ``training`` (``torch.export.export``), ``inference`` (``run_decompositions()``),
``edge`` (ExecuTorch's ``to_edge``, where executorch is installed) and ``fx``
(``torch.fx.symbolic_trace`` of the model). The folder gets a program of a freshly built model, so
nothing it writes can reach the reference: the training-IR export of another fresh build, whose
graph fixes what the program computes (a train-mode export normalises with batch statistics).

The result (an ExportedProgram, a GraphModule or any module or callable) gets one status
(:data:`adapters.audit.STATUSES`): ``INVALID`` when an ExportedProgram fails ``validate()`` or
the result no longer runs on the case's inputs; ``CRASH`` when the folder raised; ``WRONG`` when
:func:`adapters.export.verify` fails; ``missed`` when more BatchNorm nodes (or modules) are left
than the case's hand-worked count; ``ok`` otherwise. A folder whose result is compiled code (no
graph to count in) is judged on its outputs only, which the detail says.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram

from ...audit import AuditResult, one_line, selection, verdict_status, warnings_note
from ..checking import verify
from ..graph import norm_call
from .cases import CASES, ExportCase

__all__ = ["IRS", "AuditTarget", "audit_targets", "audit_one", "run_audit", "build_program", "count_norms"]

#: The IRs a case is handed over in.
IRS = ("training", "inference", "edge", "fx")


@dataclass(frozen=True)
class AuditTarget:
    """One case in one IR."""

    case: ExportCase
    ir: str

    @property
    def name(self) -> str:
        return f"{self.case.name}[{self.ir}]"

    @property
    def family(self) -> str:
        return self.case.family


def edge_available() -> bool:
    try:
        import executorch.exir  # noqa: F401
    except Exception:  # noqa: BLE001 -- a broken install (missing dependency) is as good as none
        return False
    return True


def audit_targets(irs: Iterable[str] = ("training", "inference"), select: Iterable[str] = ()) -> list[AuditTarget]:
    """The cases in each of ``irs`` (``edge`` only where executorch imports), optionally only ``select``
    (case names or families)."""
    keep = selection(select)
    wanted = [ir for ir in irs if ir != "edge" or edge_available()]
    for ir in wanted:
        if ir not in IRS:
            raise ValueError(f"unknown IR {ir!r}; known: {', '.join(IRS)}")
    return [AuditTarget(case, ir) for case in CASES for ir in wanted
            if keep(case.name, case.family) and ir not in case.not_in]


def build_program(case: ExportCase, ir: str) -> tuple[Any, tuple]:
    """A fresh model of ``case`` in ``ir`` and its inputs."""
    model, inputs = case.build()
    if ir == "fx":
        return fx.symbolic_trace(model), inputs
    program = torch.export.export(model, inputs)
    if ir == "inference":
        program = program.run_decompositions()
    elif ir == "edge":
        from executorch.exir import EdgeCompileConfig, to_edge
        program = to_edge(program, compile_config=EdgeCompileConfig(_check_ir_validity=False)).exported_program()
    return program, inputs


def count_norms(result: Any) -> int | None:
    """BatchNorm nodes (and BatchNorm modules called by a torch-level graph) left in ``result``; None for
    compiled code, which has no graph to count in."""
    if isinstance(result, ExportedProgram):
        result = result.graph_module
    if isinstance(result, fx.GraphModule):
        count = 0
        for node in result.graph.nodes:
            if norm_call(node) is not None:
                count += 1
            elif node.op == "call_module" and isinstance(result.get_submodule(str(node.target)),
                                                         nn.modules.batchnorm._NormBase):
                count += 1
        return count
    if isinstance(result, nn.Module) and any(hasattr(m, "_orig_mod") for m in result.modules()):
        return None  # torch.compile'd: what runs is generated code
    if isinstance(result, nn.Module):
        return sum(1 for m in result.modules() if isinstance(m, nn.modules.batchnorm._NormBase))
    return None


class _Callable(nn.Module):
    """A plain callable returned by a folder, as a module that verify can run."""

    def __init__(self, function: Callable[..., Any]):
        super().__init__()
        self.function = function

    def forward(self, *args: Any) -> Any:
        return self.function(*args)


def audit_one(fold_pass: Callable[[Any], Any], target: AuditTarget) -> AuditResult:
    """Fold one target with ``fold_pass`` and judge the result."""
    start = time.perf_counter()
    case = target.case

    def result(status: str, detail: str, left: int | None = None, ratio: float | None = None,
               max_abs: float | None = None) -> AuditResult:
        return AuditResult(target.name, target.family, status, left, case.norms_left, ratio, max_abs, detail,
                           time.perf_counter() - start, rank_dependent)

    rank_dependent = case.rank_dependent if target.ir == "fx" else 0

    program, inputs = build_program(case, target.ir)
    original = torch.export.export(case.build()[0], inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            folded = fold_pass(program)
        except Exception as error:  # noqa: BLE001 -- any failure of the folder is its CRASH
            return result("CRASH", f"the folder raised {one_line(error)}")
    note = warnings_note(caught)
    if isinstance(folded, ExportedProgram):
        try:
            folded.validate()
        except Exception as error:  # noqa: BLE001
            return result("INVALID", f"the result fails ExportedProgram.validate(): {one_line(error)}")
        runnable: Any = folded.module()
    elif isinstance(folded, nn.Module):
        runnable = folded
    elif callable(folded):
        runnable = _Callable(folded)
    else:
        return result("CRASH", f"the folder returned {type(folded).__name__}, not a program or a module")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runnable(*inputs)
    except Exception as error:  # noqa: BLE001
        return result("INVALID", f"the result no longer runs: {one_line(error)}")
    left = count_norms(folded)
    notes = [note]
    if left is None:
        notes.append("compiled code: judged on its outputs, norms left not counted")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            verdict = verify(original, runnable, inputs)
    except Exception as error:  # noqa: BLE001
        return result("CRASH", f"running the result raised {one_line(error)}")
    counted = case.norms_left if left is None else left
    status, detail = verdict_status(verdict, counted, case.norms_left, notes, leftover="BatchNorm node(s)",
                                    rank_dependent=rank_dependent)
    return result(status, detail, left, verdict.ratio, verdict.max_abs_error)


def run_audit(fold_pass: Callable[[Any], Any], targets: Iterable[AuditTarget],
              progress: Callable[[AuditResult], None] | None = None) -> list[AuditResult]:
    """:func:`audit_one` over ``targets`` that the folder takes (its ``irs`` attribute, all when it has none)."""
    irs = getattr(fold_pass, "irs", IRS)
    results = []
    for target in targets:
        if target.ir not in irs:
            continue
        outcome = audit_one(fold_pass, target)
        results.append(outcome)
        if progress is not None:
            progress(outcome)
    return results

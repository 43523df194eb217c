"""Audit an ONNX BatchNorm folding pass -- this project's or anyone's -- over the ONNX case suite.

A pass is any callable ``fold_pass(model: onnx.ModelProto) -> onnx.ModelProto`` named as
``"module:function"`` (``adapters.onnx:fuse_bn``, ``adapters.onnx.suite.peers:onnxoptimizer_fuse_bn``,
...). For each model of :mod:`adapters.onnx.suite.cases` (and, on request, of the ONNX zoo,
:mod:`adapters.onnx.suite.zoo`, which needs torch and torchvision to export) the pass gets a copy
of the model; what it returns is checked and given one status (:data:`adapters.audit.STATUSES`):

``ok``       the output is right and every foldable BatchNormalization was folded;
``missed``   the output is right but more BatchNormalization nodes are left than the case's
             hand-worked ``norms_left``;
``WRONG``    the output breaks the error model (:func:`adapters.onnx.verify`: by how much, and the
             first diverging value);
``CRASH``    the pass raised, returned something that is not a ModelProto, or the returned model
             raised when onnxruntime ran it;
``INVALID``  the returned model fails ``onnx.checker.check_model(full_check=True)`` or onnxruntime
             cannot load it.

A pass that modifies the model it is given, besides returning a result, is noted in the detail.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import importlib.util
import logging
import multiprocessing
import pickle
import signal
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ...audit import AuditResult, one_line, selection, verdict_status, warnings_note
from ..checking import ModelRunError, onnxruntime_session, verify
from .cases import count_batch_norms
from .zoo import OnnxZooEntry

__all__ = ["AuditTarget", "audit_targets", "audit_one", "run_audit"]

logger = logging.getLogger(__name__)

Pass = Callable[[onnx.ModelProto], onnx.ModelProto]


@dataclass(frozen=True)
class AuditTarget:
    """One model to audit: how to build it and its feeds, and how many BatchNormalization nodes must remain."""

    name: str
    family: str
    build: Callable[[], onnx.ModelProto]
    inputs: Callable[[], dict[str, np.ndarray]]
    norms_left: int


def audit_targets(*, cases: bool = True, zoo: bool = False, select: Iterable[str] = (),
                  exporter: str = "dynamo") -> Iterator[AuditTarget]:
    """The case suite, then (``zoo=True``) the ONNX zoo exports; ``select``: names or families to keep."""
    keep = selection(select)
    if cases:
        from . import cases as case_suite

        for case in case_suite.iter_cases():
            if keep(case.name, case.family):
                yield AuditTarget(case.name, case.family, case.build, case.inputs, case.norms_left)
    if zoo:
        from .zoo import ONNX_ZOO

        for entry in ONNX_ZOO.values():
            if not keep(entry.name, "zoo"):
                continue
            missing = [m for m in ("torch", "torchvision") if importlib.util.find_spec(m) is None]
            if missing:
                logger.warning("skipping zoo model %s: %s not installed", entry.name, " and ".join(missing))
                continue
            export = _CachedExport(entry, exporter)
            yield AuditTarget(entry.name, "zoo", export.model, export.feeds, entry.norms_left)


class _CachedExport:
    """One zoo export, made on first use and shared by every pass audited on it."""

    def __init__(self, entry: OnnxZooEntry, exporter: str):
        self.entry = entry
        self.exporter = exporter
        self.exported: tuple[onnx.ModelProto, dict[str, np.ndarray]] | None = None

    def _get(self) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        if self.exported is None:
            self.exported = self.entry.export(exporter=self.exporter)
        return self.exported

    def model(self) -> onnx.ModelProto:
        return _copy(self._get()[0])

    def feeds(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._get()[1].items()}


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def audit_one(fold_pass: Pass, target: AuditTarget, *, isolate: bool = True) -> AuditResult:
    """Run ``fold_pass`` on a copy of ``target``'s model and judge what it returns.

    With ``isolate`` the pass and every run of what it returned happen in a separate worker process
    (see :class:`IsolatedJudge`); otherwise in this one.
    """
    if not isolate:
        start = time.perf_counter()
        return _judge(fold_pass, target, target.build(), target.inputs(), start, lambda stage: None)
    with IsolatedJudge() as judge:
        return judge(fold_pass, target)


#: After judging a model larger than this the worker is replaced (its heap stays as large as the largest job).
_RESTART_AFTER_BYTES = 100_000_000


class IsolatedJudge:
    """Judges passes in a worker process, so that a graph which crashes onnxruntime itself (a segmentation
    fault on some malformed BatchNormalization nodes) is that model's CRASH and not the audit's end.

    The worker is a fresh interpreter (``spawn``): onnxruntime does not survive ``fork`` once a session
    existed in the parent (destroying a session in the child waits forever on the parent's threads). It
    is started on first use, reused for every model, and restarted after it dies. The pass must be
    picklable (a module-level function or class instance, as ``MODULE:FUNCTION`` names); the model and
    its feeds are built here (zoo exports run torch) and sent to the worker.
    """

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._connection: Any = None

    def __enter__(self) -> IsolatedJudge:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def _start(self) -> None:
        parent, child = self._context.Pipe()
        self._process = self._context.Process(target=_worker, args=(child,), name="bnfold audit worker", daemon=True)
        self._process.start()
        child.close()
        self._connection = parent

    def close(self) -> None:
        if self._process is None:
            return
        try:
            self._connection.send(None)
        except OSError:
            pass
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._connection.close()
        self._process = self._connection = None

    def __call__(self, fold_pass: Pass, target: AuditTarget) -> AuditResult:
        start = time.perf_counter()
        model, feeds = target.build(), target.inputs()
        if self._process is None or not self._process.is_alive():
            self._start()
        stage = "the worker started"
        serialized = model.SerializeToString()
        del model
        try:
            self._connection.send((fold_pass, _meta(target), serialized, feeds))
            while True:
                kind, payload = self._connection.recv()
                if kind == "stage":
                    stage = payload
                elif kind == "result":
                    if len(serialized) > _RESTART_AFTER_BYTES:
                        self.close()  # a fresh worker, rather than one holding on to a large model's heap
                    return dataclasses.replace(payload, seconds=time.perf_counter() - start)
                else:
                    raise RuntimeError(f"auditing {target.name} failed in the worker: {payload}")
        except (EOFError, OSError):
            pass  # the worker died: below
        self._process.join()
        code = self._process.exitcode or 0
        self._connection.close()
        self._process = self._connection = None
        cause = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        return AuditResult(target.name, target.family, "CRASH", None, target.norms_left, None, None,
                           f"the process died ({cause}) while {stage}", time.perf_counter() - start)


def _meta(target: AuditTarget) -> AuditTarget:
    """``target`` without its build functions (which need not be picklable); the worker gets the model itself."""
    return AuditTarget(target.name, target.family, _unavailable, _unavailable, target.norms_left)


def _unavailable() -> Any:
    raise RuntimeError("the worker is sent the built model, not the means to build it")


def _worker(connection: Any) -> None:
    """The worker's loop: judge each (pass, target, model, feeds) it is sent until it gets None."""
    faulthandler.disable()  # a native crash is reported as that model's CRASH, not as a traceback dump
    while True:
        try:
            job = connection.recv()
        except EOFError:
            return
        if job is None:
            return
        fold_pass, target, serialized, feeds = job
        del job
        model = onnx.ModelProto.FromString(serialized)
        del serialized
        try:
            outcome = _judge(fold_pass, target, model, feeds, time.perf_counter(),
                             lambda stage: connection.send(("stage", stage)))
            connection.send(("result", outcome))
        except BaseException as error:  # reported to the parent, which raises it there
            connection.send(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))


def _judge(fold_pass: Pass, target: AuditTarget, model: onnx.ModelProto, feeds: dict[str, np.ndarray],
           start: float, report_stage: Callable[[str], None]) -> AuditResult:
    pristine = model.SerializeToString()

    def result(status: str, detail: str, left: int | None = None, ratio: float | None = None,
               max_abs: float | None = None) -> AuditResult:
        return AuditResult(target.name, target.family, status, left, target.norms_left, ratio, max_abs, detail,
                           time.perf_counter() - start)

    given = _copy(model)
    # A pass's warnings are its own business; recording them keeps a caller's warning filters
    # (e.g. "error") from turning them into crashes of the audit.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report_stage("the pass ran")
        try:
            folded = fold_pass(given)
        except Exception as error:  # the pass under audit may raise anything: that is the finding
            return result("CRASH", f"pass raised {one_line(error)}")
        if not isinstance(folded, onnx.ModelProto):
            return result("CRASH", f"TypeError: pass returned {type(folded).__name__}, not an onnx.ModelProto")
        notes = []
        if given is not folded and given.SerializeToString() != pristine:
            notes.append("it also modified the model it was given")
        report_stage("onnx.checker checked the returned model")
        try:
            onnx.checker.check_model(folded, full_check=True)
        except Exception as error:  # ValidationError, or shape inference's own errors
            return result("INVALID", f"fails onnx.checker.check_model(full_check=True): {one_line(error)}",
                          count_batch_norms(folded))
        report_stage("onnxruntime loaded the returned model")
        try:
            onnxruntime_session(folded)
        except Exception as error:  # onnxruntime's Fail / InvalidGraph / NotImplemented ...
            return result("INVALID", f"onnxruntime cannot load it: {one_line(error)}", count_batch_norms(folded))
        left = count_batch_norms(folded)
        report_stage("onnxruntime ran the models")
        try:
            verdict = verify(model, folded, feeds)
        except ModelRunError as error:
            if error.which == "folded":
                cause = error.__cause__ or error
                return result("CRASH", f"the returned model raised in onnxruntime: {one_line(cause)}", left)
            raise
    status, detail = verdict_status(verdict, left, target.norms_left, [*notes, warnings_note(caught)],
                                    leftover="BatchNormalization node(s)")
    return result(status, detail, left, verdict.ratio, verdict.max_abs_error)


def run_audit(fold_pass: Pass, targets: Iterable[AuditTarget],
              on_result: Callable[[AuditResult], None] | None = None, *, isolate: bool = True) -> list[AuditResult]:
    """Audit every target in order; ``on_result`` is called as each finishes (for streaming output).

    ``isolate``: judge in a worker process (:class:`IsolatedJudge`). A pass that cannot be pickled
    (a lambda, a local function) is judged in this process, with a warning logged.
    """
    if isolate:
        try:
            pickle.dumps(fold_pass)
        except Exception as error:  # pickling may raise anything for an arbitrary object
            logger.warning("the pass cannot be sent to a worker process (%s): judging it in this process, where a "
                           "crash of onnxruntime ends the audit", one_line(error))
            isolate = False
    results = []
    with IsolatedJudge() as judge:
        for target in targets:
            logger.info("auditing %s", target.name)
            if isolate:
                outcome = judge(fold_pass, target)
            else:
                outcome = audit_one(fold_pass, target, isolate=False)
            results.append(outcome)
            if on_result is not None:
                on_result(outcome)
    return results

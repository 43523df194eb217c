"""The export audit's judge: each status is given for what it means, by folders built to earn it."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from adapters.export.suite.audit import audit_targets, run_audit  # noqa: E402
from adapters.export.suite.peers import bnfold  # noqa: E402


def statuses(fold_pass, *select, irs=("training",)):
    return {r.name: r.status for r in run_audit(fold_pass, audit_targets(irs, select))}


def identity(program):
    return program


def raises(program):
    raise RuntimeError("no")


def breaks_the_signature(program):
    program.graph_signature.input_specs.pop(0)
    return program


def scales_every_weight(program):
    """A folder that 'folds' by doubling each weight and leaving the norms: a wrong output."""
    with torch.no_grad():
        for tensor in program.state_dict.values():
            if tensor.is_floating_point() and tensor.dim() == 4:
                tensor.mul_(2)
    return program


def test_ok_and_missed():
    assert statuses(bnfold, "conv2d_bn", "conv_output_second_user") == {
        "conv2d_bn[training]": "ok", "conv_output_second_user[training]": "ok"}
    assert statuses(identity, "conv2d_bn", "conv_output_second_user") == {
        "conv2d_bn[training]": "missed", "conv_output_second_user[training]": "ok"}


def test_wrong_crash_invalid():
    assert statuses(scales_every_weight, "conv2d_bn") == {"conv2d_bn[training]": "WRONG"}
    assert statuses(raises, "conv2d_bn") == {"conv2d_bn[training]": "CRASH"}
    assert statuses(breaks_the_signature, "conv2d_bn") == {"conv2d_bn[training]": "INVALID"}


def test_a_folder_only_gets_the_irs_it_takes():
    def training_only(program):
        return program
    training_only.irs = ("training",)  # type: ignore[attr-defined]
    results = run_audit(training_only, audit_targets(["training", "inference"], ["conv2d_bn"]))
    assert [r.name for r in results] == ["conv2d_bn[training]"]


def test_unknown_ir_is_refused():
    with pytest.raises(ValueError, match="unknown IR 'tosa'"):
        audit_targets(["tosa"])

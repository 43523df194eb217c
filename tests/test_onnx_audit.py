"""The ONNX pass audit: broken passes are caught as WRONG, CRASH, INVALID or missed.

Each broken pass below has one deliberate fault of a kind real passes have (folding across an
activation by walking back to the nearest conv, raising, returning nothing, returning a graph that
fails the checker or that onnxruntime cannot load or run, dying in native code). Their folds use
``refimpl`` so that the only fault is the one named. The expected statuses are worked out from the
case graphs (``adapters/onnx/suite/cases/``), never by running a correct folder.
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import refimpl
from adapters.audit import STATUSES, AuditResult, exit_code, format_result, format_summary, markdown_table
from adapters.onnx.__main__ import main
from adapters.onnx.suite.audit import AuditTarget, IsolatedJudge, audit_one, audit_targets, run_audit
from adapters.onnx.suite.cases import get_case

pytest.importorskip("onnxruntime")


# --------------------------------------------------------------------------------------------------
# Passes under audit (importable as test_onnx_audit:<name> from the CLI)


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def nearest_conv_pass(model: onnx.ModelProto) -> onnx.ModelProto:
    """Folds every BatchNormalization into the nearest Conv upstream, walking back through one-input nodes.

    Right when the BN reads the conv's output directly; wrong across an activation in between.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    producers = {o: n for n in model.graph.node for o in n.output}
    params = _initializers(model)
    for bn in [n for n in model.graph.node if n.op_type == "BatchNormalization"]:
        node = producers.get(bn.input[0])
        while node is not None and node.op_type != "Conv" and len(node.input) == 1:
            node = producers.get(node.input[0])
        if node is None or node.op_type != "Conv" or not all(i in params for i in [*node.input[1:], *bn.input[1:]]):
            continue
        scale, shift, mean, var = (params[i].astype(np.float64) for i in bn.input[1:])
        bias = params[node.input[2]].astype(np.float64) if len(node.input) > 2 else None
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        weight, new_bias = refimpl.fold_conv_bn(params[node.input[1]].astype(np.float64), bias, mean, var, eps,
                                                scale, shift)
        dtype = params[node.input[1]].dtype
        names = (f"{node.name}.folded_weight", f"{node.name}.folded_bias")
        model.graph.initializer.extend([numpy_helper.from_array(weight.astype(dtype), names[0]),
                                        numpy_helper.from_array(new_bias.astype(dtype), names[1])])
        del node.input[1:]
        node.input.extend(names)
        # the BN becomes an Identity: whatever ran between the conv and the BN now sees folded values
        bn.op_type = "Identity"
        del bn.input[1:]
        del bn.attribute[:]
    return model


def crashing_pass(model: onnx.ModelProto) -> onnx.ModelProto:
    raise RuntimeError("cannot fold\nthis model")


def none_returning_pass(model: onnx.ModelProto) -> None:
    return None


def identity_pass(model: onnx.ModelProto) -> onnx.ModelProto:
    return model


def dangling_input_pass(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drops every initializer: the nodes read values nothing defines (onnx.checker rejects it)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    del model.graph.initializer[:]
    return model


def unknown_op_pass(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replaces each BatchNormalization by an op of an unknown domain: valid ONNX that onnxruntime cannot load."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            node.domain = "bnfold.test"
            node.op_type = "FoldedNorm"
            del node.attribute[:]
    model.opset_import.append(helper.make_opsetid("bnfold.test", 1))
    return model


def out_of_range_gather_pass(model: onnx.ModelProto) -> onnx.ModelProto:
    """Appends a Gather of a batch index that does not exist: loads, then fails when onnxruntime runs it."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    output = model.graph.output[0]
    renamed = output.name + "_before_gather"
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            if name == output.name:
                node.output[i] = renamed
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, 1000], dtype=np.int64), "rows"))
    model.graph.node.append(helper.make_node("Gather", [renamed, "rows"], [output.name], axis=0))
    return model


def segfaulting_pass(model: onnx.ModelProto) -> onnx.ModelProto:
    os.kill(os.getpid(), signal.SIGSEGV)
    return model


def mutating_identity_pass(model: onnx.ModelProto) -> onnx.ModelProto:
    """Returns a copy but renames the doc string of the model it was given."""
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    model.doc_string = "touched"
    return copy


def _target(name: str) -> AuditTarget:
    (target,) = audit_targets(select=[name])
    return target


@pytest.fixture(scope="module")
def judge():
    """One worker process for the module's audits (starting one takes about a second)."""
    with IsolatedJudge() as isolated:
        yield isolated


# --------------------------------------------------------------------------------------------------


def test_folding_across_an_activation_is_wrong_and_named(judge):
    result = judge(nearest_conv_pass, _target("conv_relu_bn"))
    assert result.status == "WRONG", result
    assert result.ratio is not None and result.ratio > refimpl.MODEL_RATIO
    assert result.left == 0 and result.expected_left == 1


def test_a_direct_fold_is_ok(judge):
    result = judge(nearest_conv_pass, _target("conv2d_bn"))
    assert result.status == "ok", result
    assert result.left == 0


def test_leaving_a_foldable_norm_is_missed_and_an_unfoldable_one_is_ok(judge):
    missed = judge(identity_pass, _target("conv2d_bn"))
    assert missed.status == "missed" and missed.left == 1 and "1 foldable" in missed.detail
    assert audit_one(identity_pass, _target("conv_relu_bn"), isolate=False).status == "ok"


@pytest.mark.parametrize("fold_pass, status, detail", [
    (crashing_pass, "CRASH", "pass raised RuntimeError: cannot fold this model"),
    (none_returning_pass, "CRASH", "pass returned NoneType, not an onnx.ModelProto"),
    (dangling_input_pass, "INVALID", "fails onnx.checker.check_model(full_check=True)"),
    (unknown_op_pass, "INVALID", "onnxruntime cannot load it"),
    (out_of_range_gather_pass, "CRASH", "the returned model raised in onnxruntime"),
])
def test_broken_passes_get_their_status(judge, fold_pass, status, detail):
    result = judge(fold_pass, _target("conv2d_bn"))
    assert result.status == status, result
    assert detail in result.detail


def test_a_pass_that_kills_its_process_is_a_crash_of_that_case_only():
    results = run_audit(segfaulting_pass, [_target("conv2d_bn"), _target("gemm_bn")])
    assert [r.status for r in results] == ["CRASH", "CRASH"]
    assert "signal SIGSEGV" in results[0].detail and "while the pass ran" in results[0].detail
    # the worker is restarted after each death, and a pass that cannot be sent to it is judged here
    results = run_audit(lambda model: identity_pass(model), [_target("conv_relu_bn")])
    assert [r.status for r in results] == ["ok"]


def test_a_pass_that_modifies_its_argument_is_noted():
    result = audit_one(mutating_identity_pass, _target("conv_relu_bn"), isolate=False)
    assert result.status == "ok"
    assert "modified the model it was given" in result.detail


def test_targets_select_by_name_and_family():
    names = [t.name for t in audit_targets(select=["trap"])]
    assert "conv_relu_bn" in names and "conv2d_bn" not in names
    target = _target("conv2d_bn")
    assert target.norms_left == get_case("conv2d_bn").norms_left


def test_exit_code_summary_and_markdown():
    def result(name, status):
        return AuditResult(name, "conv->bn", status, 0, 0, 1.0, 0.0, "", 0.0)

    fine = [result("a", "ok"), result("b", "missed")]
    assert exit_code(fine) == 0
    for status in ("WRONG", "CRASH", "INVALID"):
        assert exit_code([*fine, result("c", status)]) == 1
    assert format_summary(fine, "p") == "summary: 1 ok, 1 missed, 0 WRONG, 0 CRASH, 0 INVALID (2 models) -- fuser p"
    assert format_result(fine[1]).startswith("missed  b")
    table = markdown_table({"p": fine, "q": [result("a", "WRONG")]})
    assert table.splitlines()[2] == "| a | conv->bn | ok | WRONG |"
    assert table.splitlines()[3] == "| b | conv->bn | missed | - |"
    assert set(STATUSES) == {"ok", "missed", "WRONG", "CRASH", "INVALID"}
    with pytest.raises(ValueError, match="status"):
        result("d", "fine")


def test_cli_audit_exit_codes_and_json(capsys):
    code = main(["audit", "tests.test_onnx_audit:nearest_conv_pass", "--select", "conv_relu_bn",
                 "--select", "conv2d_bn", "--json"])
    data = json.loads(capsys.readouterr().out)
    statuses = {r["name"]: r["status"] for r in data["tests.test_onnx_audit:nearest_conv_pass"]}
    assert statuses == {"conv2d_bn": "ok", "conv_relu_bn": "WRONG"}
    assert code == 1
    assert main(["audit", "tests.test_onnx_audit:identity_pass", "--select", "conv2d_bn"]) == 0
    out = capsys.readouterr().out
    assert "missed  conv2d_bn" in out and "summary: 0 ok, 1 missed" in out

"""Every named ONNX case: the hand-worked fold counts, the reasons for what stays, a valid and faithful model,
and the folded graph's output judged against the float64 reference of the original by the error model."""

from __future__ import annotations

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx_helpers import assert_faithful, graphs  # noqa: E402

from adapters.onnx import fuse  # noqa: E402
from adapters.onnx.checking import verify  # noqa: E402
from adapters.onnx.suite.cases import CASES, FAMILIES, count_batch_norms, get_case, iter_cases  # noqa: E402
from adapters.report import FOLD_KINDS, REASONS  # noqa: E402

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

CASE_NAMES = list(CASES)


def test_suite_covers_every_family_and_the_named_traps():
    assert {case.family for case in iter_cases()} == set(FAMILIES)
    for name in ("conv_relu_bn", "conv_output_shared", "shared_weight_two_bns", "conv_weight_graph_input",
                 "training_mode_bn", "bn_conv_zero_padded", "bn_conv_transpose", "conv_output_is_graph_output",
                 "fp16_overflow", "cancelling_bias", "bn_opset9_optional_outputs_used", "if_branches_bn",
                 "function_constant_weights_bn", "bn_opset7_ir3", "bn_opset14_training_mode_0",
                 "bn_opset15_mixed_dtypes"):
        assert get_case(name).name == name
    for case in iter_cases():
        assert case.doc, case.name
        assert all(code in REASONS for codes in case.skips.values() for code in codes), case.name
        assert all(pair.kind in FOLD_KINDS for pair in case.pairs), case.name
        # The norms named in skips and pairs are BatchNormalization nodes of the graph, the layers are layer nodes.
        nodes = {n.name: n.op_type for _, body in graphs(case.build()) for n in body.node}
        assert all(nodes.get(name) == "BatchNormalization" for name in case.skips), case.name
        assert all(nodes.get(p.norm) == "BatchNormalization" and nodes.get(p.layer) in LAYER_OPS
                   for p in case.pairs), case.name
        assert len(case.skips) == case.norms_left, case.name
    with pytest.raises(KeyError, match="no ONNX case"):
        get_case("nope")
    with pytest.raises(ValueError, match="unknown family"):
        list(iter_cases("nope"))


def test_cases_build_deterministically():
    case = get_case("shared_weight_two_bns")
    assert case.build().SerializeToString() == case.build().SerializeToString()
    first, second = case.inputs(), case.inputs()
    assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_case(name):
    case = get_case(name)
    model = case.build()
    before = model.SerializeToString()
    assert count_batch_norms(model) == case.folds + case.norms_left

    folded, report = fuse(model)

    assert model.SerializeToString() == before, "fuse(model) modified its argument"
    onnx.checker.check_model(folded, full_check=True)
    assert count_batch_norms(folded) == case.norms_left
    assert report.norms_found == case.folds + case.norms_left
    assert len({pair.norm for pair in report.folded}) == case.folds
    assert len(report.skipped) == case.norms_left
    skipped = {s.norm.rsplit("/", 1)[-1]: s.reason for s in report.skipped}
    assert set(skipped) == set(case.skips), (report.skipped, case.skips)
    for norm, reason in skipped.items():
        assert reason in case.skips[norm], (norm, reason, case.skips)
    pairs = {(p.norm.rsplit("/", 1)[-1], p.layer.rsplit("/", 1)[-1], p.kind) for p in report.folded}
    assert pairs == {(p.norm, p.layer, p.kind) for p in case.pairs}
    assert_faithful(model, folded, report)
    verdict = verify(model, folded, case.inputs(), per_node=False)
    assert verdict.ok, str(verdict)

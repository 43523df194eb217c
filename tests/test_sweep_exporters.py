"""The exporter sweep's own logic (benchmarks/sweep_exporters.py) on small onnx.helper graphs: the structural census,
the statuses it gives ours (a wrong or input-modifying fold must be flagged), the file search and a peer's audit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks import sweep_exporters as sweep

RNG = np.random.default_rng(0)


def _init(name: str, shape: tuple[int, ...], low: float = -1.0, high: float = 1.0) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.uniform(low, high, shape).astype(np.float32), name)


def _bn(prefix: str, channels: int) -> list[onnx.TensorProto]:
    return [_init(f"{prefix}.s", (channels,), 0.5, 1.5), _init(f"{prefix}.b", (channels,)),
            _init(f"{prefix}.m", (channels,)), _init(f"{prefix}.v", (channels,), 0.5, 2.0)]


def paddle_like() -> onnx.ModelProto:
    """Conv -> Add(per-channel constant) -> BN (after a layer), Relu -> BN (not after a layer), BN -> Conv -> BN whose
    conv output is also a graph output (not private): 3 BatchNormalization nodes, 1 after a layer by the rule."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "b1"], ["a1"]),
        helper.make_node("BatchNormalization", ["a1", "n1.s", "n1.b", "n1.m", "n1.v"], ["y1"]),
        helper.make_node("Relu", ["y1"], ["r1"]),
        helper.make_node("BatchNormalization", ["r1", "n2.s", "n2.b", "n2.m", "n2.v"], ["y2"]),
        helper.make_node("Conv", ["y2", "w2"], ["c2"]),
        helper.make_node("BatchNormalization", ["c2", "n3.s", "n3.b", "n3.m", "n3.v"], ["y3"]),
    ]
    initializers = [_init("w1", (4, 3, 3, 3)), _init("b1", (1, 4, 1, 1)), _init("w2", (5, 4, 1, 1)),
                    *_bn("n1", 4), *_bn("n2", 4), *_bn("n3", 5)]
    graph = helper.make_graph(nodes, "paddle_like",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y3", TensorProto.FLOAT, [-1, 5, 8, 8]),
                               helper.make_tensor_value_info("c2", TensorProto.FLOAT, [-1, 5, 8, 8])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="test")
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def graph_file(tmp_path: Path) -> Path:
    path = tmp_path / "paddle__tiny.onnx"
    onnx.save(paddle_like(), path)
    return path


def test_census_counts_the_norms_after_a_layer_by_the_rule() -> None:
    assert sweep.after_layer(paddle_like()) == (3, 1)
    record = sweep.census(paddle_like())
    assert (record["bn"], record["after_layer"], record["opset"]) == (3, 1, 13)
    assert record["inputs"] == "x[-1,3,8,8]"


def test_sweep_of_one_file_verifies_ours(graph_file: Path) -> None:
    record = sweep.sweep_file(graph_file, [], {}, None, 1)
    assert (record["source"], record["graph"]) == ("paddle", "tiny")
    assert record["status"] == "ok", record
    assert record["ours"]["folded"] >= 1 and record["ours"]["bn_after"] == 3 - record["ours"]["folded"]
    assert record["feed"] == "x[1, 3, 8, 8]"


def test_a_wrong_fold_and_a_modified_input_are_flagged(graph_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fuse = sweep.ao.fuse

    def off_by_one_channel(model: onnx.ModelProto):
        folded, report = real_fuse(model)
        for tensor in folded.graph.initializer:
            if tensor.name == "n3.b":  # n3 is left by every rule (its conv output is a graph output): shift it
                values = numpy_helper.to_array(tensor).copy()
                values[0] += 0.5
                tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
        return folded, report

    monkeypatch.setattr(sweep.ao, "fuse", off_by_one_channel)
    assert sweep.sweep_file(graph_file, [], {}, None, 1)["status"] == "WRONG"

    def modifying(model: onnx.ModelProto):
        result = real_fuse(model)
        model.producer_name = "changed"
        return result

    monkeypatch.setattr(sweep.ao, "fuse", modifying)
    assert sweep.sweep_file(graph_file, [], {}, None, 1)["status"] == "MODIFIED"


def test_files_are_found_and_a_bad_path_is_one_line(graph_file: Path, tmp_path: Path) -> None:
    assert sweep.onnx_files([str(tmp_path)]) == [graph_file]
    with pytest.raises(SystemExit, match="neither an .onnx file nor a folder"):
        sweep.onnx_files([str(tmp_path / "missing")])


@pytest.mark.skipif(importlib.util.find_spec("onnxoptimizer") is None, reason="needs onnxoptimizer (peers extra)")
def test_a_peer_is_audited_against_the_census(graph_file: Path) -> None:
    from adapters.onnx.suite.audit import IsolatedJudge

    with IsolatedJudge() as judge:
        record = sweep.sweep_file(graph_file, ["onnxoptimizer"], {}, judge, 1)
    peer = record["peers"]["onnxoptimizer"]
    # fuse_bn_into_conv folds a BatchNormalization right after a Conv only: n1 is behind an Add, n3's conv output is
    # a graph output, n2 is after a Relu -- all three stay, one more than the census allows: missed
    assert (peer["status"], peer["left"]) == ("missed", 3), peer

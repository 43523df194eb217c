"""Graphs in the style of PaddlePaddle's ONNX exports: a layer's bias as its own Add, ``dim_value: -1`` for a
dynamic dim, and the two ways a feed of 1s made ``verify`` meaningless -- a detector whose outputs are one
value at 1x1 (it passed on a comparison that proved nothing), a recogniser whose Reshape fails at width 1 (the
reference crashed). The graphs are written with onnx.helper; the oracles are onnxruntime's and the float64
reference's own runs and hand-worked counts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx_helpers import assert_faithful  # noqa: E402

from adapters.onnx import fuse, verify  # noqa: E402
from adapters.onnx.checking import make_feeds, reference_outputs, run_onnxruntime  # noqa: E402
from adapters.onnx.graph import ModelIndex  # noqa: E402
from adapters.onnx.suite.cases import count_batch_norms  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _dynamic(name: str, dims: list[int]) -> onnx.ValueInfoProto:
    """A float tensor type with the dims as written, -1 for a dynamic one (as PaddlePaddle writes it)."""
    info = helper.make_tensor_value_info(name, TensorProto.FLOAT, [1] * len(dims))
    for dim, value in zip(info.type.tensor_type.shape.dim, dims, strict=True):
        dim.dim_value = value
    return info


class _Graph:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.inits: list[TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []

    def init(self, name: str, values, dtype=np.float32) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def conv_add_bn(self, x: str, k: int, cin: int, cout: int, kernel: int, stride: int, bias_shape) -> str:
        """conv2d_k (no bias) -> elementwise_add_k (its bias) -> batch_norm_k, Paddle's names."""
        w = self.init(f"conv2d_{k}.w_0", self.rng.uniform(-1, 1, (cout, cin, kernel, kernel))
                      * np.sqrt(3 / (cin * kernel * kernel)))
        y = self.node("Conv", [x, w], f"conv2d_{k}.tmp_0", f"conv2d_{k}", pads=[kernel // 2] * 4, strides=[stride] * 2)
        b = self.init(f"conv2d_{k}.b_0", self.rng.uniform(-0.5, 0.5, bias_shape))
        y = self.node("Add", [y, b], f"conv2d_{k}.tmp_1", f"elementwise_add_{k}")
        params = [self.init(f"batch_norm_{k}.{n}", v) for n, v in (
            ("w_0", self.rng.uniform(0.5, 1.5, cout)), ("b_0", self.rng.normal(0, 0.5, cout)),
            ("w_1", self.rng.normal(0, 0.5, cout)), ("w_2", self.rng.uniform(0.5, 2, cout)))]
        return self.node("BatchNormalization", [y, *params], f"batch_norm_{k}.tmp_2", f"batch_norm_{k}")

    def model(self, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "paddle", inputs, outputs, self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], producer_name="PaddlePaddle")


def detector() -> onnx.ModelProto:
    """x [-1, 3, -1, -1] -> two conv+Add+BN+Relu blocks -> a head that centres the features on their mean over the
    image and maps them to 2 score maps: at 1x1 every score is exactly 0."""
    g = _Graph(0)
    y = g.node("Relu", [g.conv_add_bn("x", 0, 3, 8, 3, 2, (1, 8, 1, 1))], "relu_0.tmp_0", "relu_0")
    y = g.node("Relu", [g.conv_add_bn(y, 1, 8, 8, 3, 1, (1, 8, 1, 1))], "relu_1.tmp_0", "relu_1")
    mean = g.node("GlobalAveragePool", [y], "pool_0.tmp_0", "pool_0")
    centred = g.node("Sub", [y, mean], "centred", "elementwise_sub_0")
    g.node("Conv", [centred, g.init("conv2d_2.w_0", g.rng.uniform(-1, 1, (2, 8, 1, 1)))], "maps", "conv2d_2")
    return g.model([_dynamic("x", [-1, 3, -1, -1])], [_dynamic("maps", [-1, 2, -1, -1])])


def recogniser(features: int = 40) -> onnx.ModelProto:
    """x [-1, 3, 32, -1] -> conv (stride 2) + Add([4, 1, 1]) + BN -> Reshape to (N, -1, ``features``) -> MatMul: the
    Reshape runs only when 4 * 16 * W/2 is a multiple of ``features`` (never at W = 1)."""
    g = _Graph(1)
    y = g.conv_add_bn("x", 0, 3, 4, 3, 2, (4, 1, 1))
    seq = g.node("Reshape", [y, g.init("reshape2_0.shape", [0, -1, features], np.int64)], "seq", "reshape2_0")
    g.node("MatMul", [seq, g.init("linear_0.w_0", g.rng.uniform(-1, 1, (features, 6)) * 0.2)], "logits", "linear_0")
    return g.model([_dynamic("x", [-1, 3, 32, -1])], [_dynamic("logits", [-1, -1, 6])])


def test_a_negative_dim_is_dynamic_in_the_graph_analysis():
    model = detector()
    index = ModelIndex(model)
    main = index.scopes[0]
    assert index.shape(main, "x") == (None, 3, None, None)
    # shape inference sees the dims as unknown, not as the number -1 (which made the conv's height 0)
    assert index.shape(main, "conv2d_0.tmp_0") == (None, 8, None, None)


def test_detector_folds_its_add_biases_and_verify_avoids_the_degenerate_feed():
    model = detector()
    onnx.checker.check_model(model)
    folded, report = fuse(model)
    assert count_batch_norms(folded) == 0 and len(report.folded) == 2 and not report.skipped
    assert not [n for n in folded.graph.node if n.op_type == "Add"]
    assert_faithful(model, folded, report)

    ones = make_feeds(model)  # what verify fed before: 1 for every dynamic dim
    assert ones["x"].shape == (1, 3, 1, 1)
    (maps,) = run_onnxruntime(model, ones)
    assert float(maps.max()) == float(maps.min())  # the trap is real: one value everywhere

    verdict = verify(model, folded)
    assert verdict.ok, str(verdict)
    note = next(n for n in verdict.notes if n.startswith("dynamic dims"))
    assert "'x' [?, 3, ?, ?] as [1, 3, 8, 8]" in note
    (maps,) = run_onnxruntime(model, make_feeds(model, {"x": [1, 3, 8, 8]}))
    assert np.isfinite(maps).all() and float(maps.max()) > float(maps.min())

    forced = verify(model, folded, input_shapes={"x": (1, 3, 1, 1)})
    assert any("warning" in n and "one value" in n for n in forced.notes), forced.notes


def test_recogniser_gets_a_width_its_reshape_accepts():
    model = recogniser()
    folded, report = fuse(model)
    assert count_batch_norms(folded) == 0 and len(report.folded) == 1
    with pytest.raises(Exception, match="(?i)reshape"):  # width 1: the float64 reference itself cannot run
        reference_outputs(model, make_feeds(model))
    verdict = verify(model, folded)
    assert verdict.ok, str(verdict)
    # the Reshape's own constant 40 is the first candidate that works: 4 * 16 * 20 = 32 * 40
    assert any("as [1, 3, 32, 40]" in n for n in verdict.notes), verdict.notes


def test_verify_refuses_when_no_candidate_size_runs_and_accepts_a_shape_for_a_negative_dim():
    model = recogniser(111)  # only widths with W/2 a multiple of 111
    folded, _ = fuse(model)
    with pytest.raises(ValueError, match=r"dynamic dims of 'x' \[\?, 3, 32, \?\].*--input-shape x=1,3,32,"):
        verify(model, folded)
    verdict = verify(model, folded, input_shapes={"x": (1, 3, 32, 222)})  # -1 is dynamic, not a fixed dim
    assert verdict.ok, str(verdict)
    assert not any(n.startswith("dynamic dims") for n in verdict.notes)


def test_verify_warns_when_the_original_is_far_from_its_float64_reference():
    # (x + 1e8) - 1e8 in float32 loses x entirely; in float64 it keeps it: the original's own error is ~1.
    g = _Graph(2)
    big = g.init("big", [1e8])
    g.node("Sub", [g.node("Add", ["x", big], "shifted", "add"), big], "y", "sub")
    model = g.model([_dynamic("x", [2, 3])], [_dynamic("y", [2, 3])])
    verdict = verify(model, model)
    assert any("far from its float64 reference" in n for n in verdict.notes), verdict.notes


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "adapters.onnx", *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False, cwd=ROOT)


def test_cli_folds_and_verifies_a_paddle_graph_with_negative_dims(tmp_path):
    source = tmp_path / "rec.onnx"
    onnx.save_model(recogniser(111), source)
    out = tmp_path / "folded.onnx"
    refused = _run(str(source), "-o", str(out), "--verify")
    assert refused.returncode == 2 and refused.stdout == "", refused.stdout + refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "--input-shape x=1,3,32," in lines[0], refused.stderr
    assert not out.exists()
    done = _run(str(source), "-o", str(out), "--verify", "--input-shape", "x=1,3,32,222")
    assert done.returncode == 0, done.stdout + done.stderr
    assert count_batch_norms(onnx.load(str(out))) == 0
    checked = _run("verify", str(source), str(out), "--input-shape", "x=1,3,32,222")
    assert checked.returncode == 0 and checked.stdout.startswith("OK"), checked.stdout + checked.stderr

"""The float64 reference of ONNX graphs and ``adapters.onnx.verify``.

The reference is checked against independent oracles: ``refimpl.ops`` (itself checked against
scipy and torch in test_ops.py), torch's float64 ops, onnxruntime in float64 where it has float64
kernels, and onnxruntime in float32 within the per-element error model. ``verify`` must pass
correct folds (computed here with ``refimpl``'s fold functions, graph edits by hand) and catch
deliberately broken ones, naming the first diverging value.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import refimpl
from adapters.onnx.checking import (
    ModelRunError,
    make_feeds,
    reference_outputs,
    retyped_copy,
    rounded_copy,
    run_onnxruntime,
    verify,
)
from refimpl import assert_within, error_bound

F32 = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=(), opset=17, functions=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], functions=list(functions))
    model.ir_version = 8
    return model


def _inits(**arrays):
    return [numpy_helper.from_array(np.asarray(a), name) for name, a in arrays.items()]


def _io(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def _rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------------
# The reference against refimpl.ops, torch and onnxruntime


@pytest.mark.parametrize("attrs, spatial, kernel, group", [
    (dict(pads=[1, 0, 2, 1]), (7, 6), (3, 3), 1),
    (dict(strides=[2, 1], dilations=[1, 2], group=2), (9, 8), (3, 2), 2),
    (dict(auto_pad="SAME_UPPER", strides=[2, 2]), (7, 8), (4, 3), 1),
    (dict(auto_pad="SAME_LOWER", strides=[2, 2]), (7, 8), (4, 3), 1),
    (dict(group=4), (5,), (3,), 4),
    (dict(pads=[1, 1, 1, 0, 0, 1], strides=[1, 2, 1]), (4, 5, 4), (2, 3, 2), 1),
])
def test_reference_conv_matches_refimpl(attrs, spatial, kernel, group):
    rng = _rng(1)
    x = rng.standard_normal((2, 4) + spatial).astype(np.float32)
    w = rng.standard_normal((6 if group != 4 else 8, 4 // group) + kernel).astype(np.float32)
    b = rng.standard_normal(w.shape[0]).astype(np.float32)
    model = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)], [_io("x", x.shape)],
                   [_io("y", None)], _inits(w=w, b=b))
    (y,) = reference_outputs(model, {"x": x})
    assert y.dtype == np.float64
    dims = len(spatial)
    strides = attrs.get("strides", [1] * dims)
    dilations = attrs.get("dilations", [1] * dims)
    if "auto_pad" in attrs:  # the ONNX spec's SAME padding, worked out here: total = (out-1)*s + d*(k-1) + 1 - n
        pads_begin, pads_end = [], []
        for n, s, d, k in zip(spatial, strides, dilations, kernel, strict=True):
            out = -(-n // s)
            total = max((out - 1) * s + d * (k - 1) + 1 - n, 0)
            small, large = total // 2, total - total // 2
            pads_begin.append(small if attrs["auto_pad"] == "SAME_UPPER" else large)
            pads_end.append(large if attrs["auto_pad"] == "SAME_UPPER" else small)
    else:
        pads = attrs.get("pads", [0] * 2 * dims)
        pads_begin, pads_end = pads[:dims], pads[dims:]
    padded = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + list(zip(pads_begin, pads_end, strict=True)))
    expected = refimpl.conv(padded, w, b, stride=strides, dilation=dilations, groups=group)
    magnitude = refimpl.conv(np.abs(padded), np.abs(w), np.abs(b), stride=strides, dilation=dilations, groups=group)
    n = (4 // group) * int(np.prod(kernel)) + 1
    assert_within(y, expected, error_bound(magnitude, n, "float64"), "reference Conv")


@pytest.mark.parametrize("attrs", [
    dict(group=2, strides=[2, 1], pads=[1, 0, 0, 1], dilations=[1, 2]),     # grouped: onnx/onnx#8446
    dict(group=2, strides=[2, 2], output_padding=[1, 0]),
    dict(group=1, strides=[2, 2], auto_pad="SAME_UPPER"),
    dict(group=1, strides=[2, 2], auto_pad="SAME_LOWER"),
    dict(group=2, strides=[2, 3], output_shape=[11, 14]),
    dict(group=4, strides=[3, 2], pads=[2, 1, 1, 0], output_padding=[2, 1]),
])
def test_reference_conv_transpose_matches_torch_and_onnxruntime(attrs):
    torch = pytest.importorskip("torch")
    rng = _rng(2)
    group = attrs["group"]
    x = rng.standard_normal((2, 4, 5, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    b = rng.standard_normal(3 * group).astype(np.float32)
    model = _model([helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], **attrs)], [_io("x", x.shape)],
                   [_io("y", None)], _inits(w=w, b=b))
    (y,) = reference_outputs(model, {"x": x})
    # torch's conv_transpose without padding gives the full scatter; the ONNX output is a window of it
    # (pads crop at both ends, output_padding/output_shape extend the end with zeros).
    strides, dilations = attrs["strides"], attrs.get("dilations", [1, 1])
    full = torch.nn.functional.conv_transpose2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(), None,
                                                stride=strides, groups=group, dilation=dilations).numpy()
    out_shape = y.shape[2:]
    extended = np.zeros(full.shape[:2] + tuple(max(f, 64) for f in full.shape[2:]))
    extended[:, :, :full.shape[2], :full.shape[3]] = full
    if "output_shape" in attrs or "auto_pad" in attrs:
        lengths = [(n - 1) * s + (k - 1) * d + 1 for n, s, k, d in zip((5, 6), strides, (3, 2), dilations,
                                                                       strict=True)]
        total = [f - o for f, o in zip(lengths, out_shape, strict=True)]
        lower = attrs.get("auto_pad") == "SAME_UPPER"
        begin = [t // 2 if lower else t - t // 2 for t in total]
    else:
        begin = attrs.get("pads", [0, 0, 0, 0])[:2]
    window = extended[:, :, begin[0]:begin[0] + out_shape[0], begin[1]:begin[1] + out_shape[1]]
    expected = window + b.reshape(1, -1, 1, 1)
    if "output_shape" in attrs:
        assert list(out_shape) == attrs["output_shape"]
    bound = error_bound(np.abs(expected) + 10.0, 4 * 6 + 1, "float64")
    assert_within(y, expected, bound, "reference ConvTranspose vs torch")
    (y32,) = run_onnxruntime(model, {"x": x})
    magnitude_model = _model([helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], **attrs)],
                             [_io("x", x.shape)], [_io("y", None)], _inits(w=np.abs(w), b=np.abs(b)))
    (magnitude,) = reference_outputs(magnitude_model, {"x": np.abs(x)})
    assert_within(y32, y, error_bound(magnitude, 4 * 6 + 1, "float32"), "onnxruntime float32 vs reference")


def _bn_model(opset, x_shape, params, outputs=("y",), **attrs):
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], list(outputs), **attrs)
    return _model([node], [_io("x", x_shape)], [_io(o, None) for o in outputs if o],
                  _inits(**dict(zip("sbmv", params, strict=True))), opset=opset)


@pytest.mark.parametrize("opset", [7, 9, 13, 14, 15])
def test_reference_batchnorm_is_inference_mode_in_every_opset(opset):
    """onnx/onnx#8442: the evaluator's own kernel uses batch statistics for opsets 7-13."""
    rng = _rng(3)
    x = (3 + 2 * rng.standard_normal((4, 5, 3, 3))).astype(np.float32)
    s, b, m = (rng.standard_normal(5).astype(np.float32) for _ in range(3))
    v = (0.5 + rng.random(5)).astype(np.float32)
    epsilon = np.float32(1e-3)  # ONNX attributes are float32: the reference uses that value
    (y,) = reference_outputs(_bn_model(opset, x.shape, (s, b, m, v), epsilon=float(epsilon)), {"x": x})
    expected = refimpl.batch_norm(x, m, v, s, b, eps=float(epsilon))
    magnitude = refimpl.batch_norm(np.abs(x), np.zeros(5), v, np.abs(s), np.abs(b), eps=float(epsilon)) + np.abs(
        m / np.sqrt(v + epsilon) * s).reshape(1, -1, 1, 1)
    assert_within(y, expected, error_bound(magnitude, 4, "float64"), f"BatchNormalization-{opset}")
    (ort,) = run_onnxruntime(_bn_model(opset, x.shape, (s, b, m, v), epsilon=float(epsilon)), {"x": x})
    assert_within(ort, expected, error_bound(magnitude, 4, "float32"), f"onnxruntime BatchNormalization-{opset}")


def test_reference_batchnorm_training_mode_uses_batch_statistics():
    torch = pytest.importorskip("torch")
    rng = _rng(4)
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    s, b, m = (rng.standard_normal(4).astype(np.float32) for _ in range(3))
    v = (0.5 + rng.random(4)).astype(np.float32)
    model = _bn_model(15, x.shape, (s, b, m, v), outputs=("y", "rm", "rv"), training_mode=1, momentum=0.75)
    y, running_mean, running_var = reference_outputs(model, {"x": x})
    t_mean, t_var = torch.from_numpy(m).double(), torch.from_numpy(v).double()
    expected = torch.nn.functional.batch_norm(torch.from_numpy(x).double(), t_mean, t_var, torch.from_numpy(s).double(),
                                              torch.from_numpy(b).double(), training=True, momentum=0.0, eps=1e-5)
    assert_within(y, expected.numpy(), error_bound(np.abs(expected.numpy()) + 10, 3 * 5 + 4, "float64"))
    batch_mean = x.astype(np.float64).mean(axis=(0, 2))
    batch_var = x.astype(np.float64).var(axis=(0, 2))
    m64, v64 = m.astype(np.float64), v.astype(np.float64)
    assert_within(running_mean, 0.75 * m64 + 0.25 * batch_mean, error_bound(np.abs(m64) + np.abs(batch_mean), 4,
                                                                             "float64"))
    assert_within(running_var, 0.75 * v64 + 0.25 * batch_var, error_bound(v64 + batch_var, 4, "float64"))


def test_reference_batchnorm_opset7_per_activation():
    """spatial=0: one statistic per (channel, position)."""
    rng = _rng(5)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    s, b, m = (rng.standard_normal((3, 4)).astype(np.float32) for _ in range(3))
    v = (0.5 + rng.random((3, 4))).astype(np.float32)
    (y,) = reference_outputs(_bn_model(7, x.shape, (s, b, m, v), spatial=0, epsilon=0.5), {"x": x})
    x64, s64, b64, m64, v64 = (a.astype(np.float64) for a in (x, s, b, m, v))
    expected = (x64 - m64) / np.sqrt(v64 + 0.5) * s64 + b64
    assert_within(y, expected, error_bound(np.abs(expected) + 10, 4, "float64"))


def test_reference_matches_onnxruntime_float64_on_gemm_batchnorm_matmul():
    """Where onnxruntime has float64 kernels for every op, both float64 runs agree to float64 rounding."""
    rng = _rng(6)
    x = rng.standard_normal((5, 6))
    w = rng.standard_normal((4, 6))
    c = rng.standard_normal(4)
    s, b, m = (rng.standard_normal(4) for _ in range(3))
    v = 0.5 + rng.random(4)
    w2 = rng.standard_normal((4, 3))
    b2 = rng.standard_normal(3)
    f64 = TensorProto.DOUBLE
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["g"], transB=1, alpha=0.5, beta=2.0),
             helper.make_node("BatchNormalization", ["g", "s", "b", "m", "v"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["mm"]),
             helper.make_node("Add", ["mm", "b2"], ["y"])]
    model = _model(nodes, [_io("x", x.shape, f64)], [_io("y", None, f64)],
                   _inits(w=w, c=c, s=s, b=b, m=m, v=v, w2=w2, b2=b2), opset=9)
    (reference,) = reference_outputs(model, {"x": x})
    (ort,) = run_onnxruntime(model, {"x": x})
    assert_within(reference, ort, error_bound(np.abs(ort) + 100, 20, "float64"))


def test_retyped_copy_makes_every_float_double_including_casts_and_constants():
    rng = _rng(7)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    third = helper.make_tensor("third", TensorProto.FLOAT16, [], [1 / 3])
    nodes = [helper.make_node("Constant", [], ["k"], value_float=1 / 3),
             helper.make_node("Mul", ["x", "k"], ["a"]),
             helper.make_node("Cast", ["a"], ["h"], to=TensorProto.FLOAT16),
             helper.make_node("Constant", [], ["t"], value=third),
             helper.make_node("Mul", ["h", "t"], ["h2"]),
             helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("ConstantOfShape", ["shape"], ["ones"],
                              value=helper.make_tensor("one", TensorProto.FLOAT16, [1], [1.0])),
             helper.make_node("Add", ["h2", "ones"], ["y"])]
    model = _model(nodes, [_io("x", x.shape)], [_io("y", x.shape, TensorProto.FLOAT16)])
    onnx.checker.check_model(model, full_check=True)
    double = retyped_copy(model)
    assert double.graph.output[0].type.tensor_type.elem_type == TensorProto.DOUBLE
    assert [a.i for n in double.graph.node for a in n.attribute if a.name == "to"] == [TensorProto.DOUBLE]
    onnx.checker.check_model(double, full_check=True)
    (y,) = reference_outputs(model, {"x": x})
    assert y.dtype == np.float64
    # float64 arithmetic throughout: x * (1/3) * (1/3) + 1 in float64, not via a float16 cast.
    expected = x.astype(np.float64) * float(np.float32(1 / 3)) * float(np.float16(1 / 3)) + 1
    assert_within(y, expected, error_bound(np.abs(expected), 3, "float64"))
    assert not np.allclose(y, expected.astype(np.float16), rtol=0, atol=1e-6)


def test_reference_runs_batchnorm_inside_if_subgraph_in_inference_mode():
    rng = _rng(8)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    s, b, m = (rng.standard_normal(3).astype(np.float32) for _ in range(3))
    v = (0.5 + rng.random(3)).astype(np.float32)
    branch = helper.make_graph([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["yb"])],
                               "then", [], [_io("yb", None)], _inits(s=s, b=b, m=m, v=v))
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["yo"])], "else", [], [_io("yo", None)])
    nodes = [helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)]
    model = _model(nodes, [_io("x", x.shape)], [_io("y", None)], opset=9)
    (y,) = reference_outputs(model, {"x": x})
    expected = refimpl.batch_norm(x, m, v, s, b, eps=1e-5)
    assert_within(y, expected, error_bound(np.abs(expected) + 10, 4, "float64"))


# --------------------------------------------------------------------------------------------------
# verify on correct and broken folds


def _conv_bn_net(opset=15, dynamic_batch=True):
    """conv(3->8, 3x3, pad 1) -> BN -> Relu -> conv(8->4, 1x1) -> BN -> y; deterministic parameters."""
    rng = _rng(10)
    p = {"w1": rng.standard_normal((8, 3, 3, 3)), "b1": rng.standard_normal(8),
         "w2": rng.standard_normal((4, 8, 1, 1)) / 3}
    for k, width in (("1", 8), ("2", 4)):
        p["g" + k] = rng.uniform(0.5, 1.5, width)
        p["be" + k] = rng.standard_normal(width)
        p["m" + k] = rng.standard_normal(width)
        p["v" + k] = rng.uniform(0.5, 2, width)
    p = {k: v.astype(np.float32) for k, v in p.items()}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["n1"], name="bn1"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
             helper.make_node("BatchNormalization", ["c2", "g2", "be2", "m2", "v2"], ["y"], name="bn2")]
    batch = "N" if dynamic_batch else 2
    return _model(nodes, [_io("x", [batch, 3, 8, 8])], [_io("y", [batch, 4, 8, 8])], _inits(**p), opset=opset), p


def _fold_by_hand(p, scale_channel=None, drop_relu=False):
    """The conv->BN folds of _conv_bn_net done with refimpl, graph rewritten by hand; optionally broken."""
    f64 = {k: v.astype(np.float64) for k, v in p.items()}
    w1, b1 = refimpl.fold_conv_bn(f64["w1"], f64["b1"], f64["m1"], f64["v1"], 1e-5, f64["g1"], f64["be1"])
    w2, b2 = refimpl.fold_conv_bn(f64["w2"], None, f64["m2"], f64["v2"], 1e-5, f64["g2"], f64["be2"])
    if scale_channel is not None:
        w1 = w1.copy()
        w1[scale_channel] *= 1.5
    relu_out = "n1" if drop_relu else "r1"
    nodes = [helper.make_node("Conv", ["x", "w1f", "b1f"], ["n1"], pads=[1, 1, 1, 1], name="conv1"),
             *([] if drop_relu else [helper.make_node("Relu", ["n1"], ["r1"], name="relu1")]),
             helper.make_node("Conv", [relu_out, "w2f", "b2f"], ["y"], name="conv2")]
    inits = _inits(w1f=w1.astype(np.float32), b1f=b1.astype(np.float32), w2f=w2.astype(np.float32),
                   b2f=b2.astype(np.float32))
    return _model(nodes, [_io("x", ["N", 3, 8, 8])], [_io("y", ["N", 4, 8, 8])], inits)


def test_verify_passes_a_correct_fold():
    original, p = _conv_bn_net()
    verdict = verify(original, _fold_by_hand(p), input_shapes={"x": [3, 3, 8, 8]})
    assert verdict.ok, str(verdict)
    assert verdict.dtype == "float32"
    assert verdict.layers_compared == 1  # relu1's output: shared by name and not changed by folding
    assert verdict.ratio <= refimpl.MODEL_RATIO
    assert verdict.to_dict()["ok"] is True


@pytest.mark.parametrize("opset", [9, 14])
def test_verify_passes_the_original_against_itself_in_older_opsets(opset):
    original, _ = _conv_bn_net(opset=opset)
    assert verify(original, original).ok


def test_verify_names_the_first_diverging_value_of_a_wrong_fold():
    original, p = _conv_bn_net()
    verdict = verify(original, _fold_by_hand(p, scale_channel=3))
    assert not verdict.ok
    assert verdict.ratio > 100
    assert verdict.first_divergence is not None
    assert verdict.first_divergence.module == "relu1" and verdict.first_divergence.path == "r1"
    assert "conv1" in verdict.first_divergence.suspects and "bn1" in verdict.first_divergence.suspects
    assert "FAILED" in str(verdict) and "relu1 output r1" in str(verdict)


def test_verify_catches_a_fold_that_drops_an_activation():
    original, p = _conv_bn_net()
    verdict = verify(original, _fold_by_hand(p, drop_relu=True))
    assert not verdict.ok
    assert not verdict.outputs[0].ok


def test_verify_reports_a_different_number_of_outputs():
    original, p = _conv_bn_net()
    folded = _fold_by_hand(p)
    folded.graph.output.append(_io("n1", None))
    verdict = verify(original, folded)
    assert not verdict.ok
    assert "output structure differs" in verdict.outputs[0].detail


def test_verify_notes_dynamic_dims_and_honours_input_shapes():
    original, p = _conv_bn_net()
    verdict = verify(original, _fold_by_hand(p))
    assert any("dynamic dims: fed 'x' [N, 3, 8, 8] as [1, 3, 8, 8]" in note for note in verdict.notes)
    assert not any("dynamic" in n for n in verify(original, _fold_by_hand(p), input_shapes={"x": (2, 3, 8, 8)}).notes)
    with pytest.raises(ValueError, match="contradicts the fixed dims"):
        verify(original, _fold_by_hand(p), input_shapes={"x": (2, 4, 8, 8)})
    with pytest.raises(ValueError, match="names no graph input"):
        verify(original, _fold_by_hand(p), input_shapes={"image": (2, 3, 8, 8)})


def test_verify_reports_a_folded_graph_that_cannot_run():
    original, p = _conv_bn_net()
    folded = _fold_by_hand(p)
    folded.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((8, 5, 3, 3), np.float32), "w1f"))
    with pytest.raises(ModelRunError) as caught:
        verify(original, folded)
    assert caught.value.which == "folded"


def test_make_feeds_is_seeded_and_typed():
    original, _ = _conv_bn_net(dynamic_batch=False)
    a, b = make_feeds(original, seed=3), make_feeds(original, seed=3)
    assert a["x"].dtype == np.float32 and a["x"].shape == (2, 3, 8, 8)
    np.testing.assert_array_equal(a["x"], b["x"])


def test_rounded_copy_rounds_each_parameter_within_one_unit():
    original, p = _conv_bn_net()
    copy = rounded_copy(original, seed=0)
    for tensor in copy.graph.initializer:
        new = numpy_helper.to_array(tensor).astype(np.float64)
        old = p[tensor.name].astype(np.float64)
        assert np.all(np.abs(new - old) <= 2 * 2.0**-24 * np.abs(old))
    assert any(not np.array_equal(numpy_helper.to_array(t), p[t.name]) for t in copy.graph.initializer)


def test_reference_resolves_a_function_attribute_reference():
    """A BatchNormalization in a model-local function whose epsilon refers to the call's attribute (1e-3)."""
    from adapters.onnx.suite.cases import get_case

    case = get_case("function_epsilon_attribute")
    model, feeds = case.build(), case.inputs()
    (function,) = model.functions
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t).astype(np.float64)
                 for n in function.node if n.op_type == "Constant"}
    conv = next(n for n in function.node if n.op_type == "Conv")
    bn = next(n for n in function.node if n.op_type == "BatchNormalization")
    call = next(n for n in model.graph.node if n.op_type == "ConvBnEps")
    epsilon = float(np.float32(next(a.f for a in call.attribute if a.name == "eps")))
    x = next(iter(feeds.values()))
    scale, shift, mean, var = (constants[i] for i in bn.input[1:])
    expected = refimpl.batch_norm(refimpl.conv(x, constants[conv.input[1]]), mean, var, scale, shift, eps=epsilon)
    (y,) = reference_outputs(model, feeds)
    magnitude = refimpl.conv(np.abs(x), np.abs(constants[conv.input[1]]))
    assert_within(y, expected, error_bound(np.abs(expected) + magnitude, 6, "float64"))


def test_reference_runs_batchnorm_inside_a_model_local_function_in_inference_mode():
    """The evaluator runs functions without the replacement kernels: an opset-13 BN there would use batch stats."""
    rng = _rng(9)
    x = (2 + rng.standard_normal((4, 3, 5))).astype(np.float32)
    s, b, m = (rng.standard_normal(3).astype(np.float32) for _ in range(3))
    v = (0.5 + rng.random(3)).astype(np.float32)
    constants = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(a, name))
                 for name, a in zip("sbmv", (s, b, m, v), strict=True)]
    body = [*constants, helper.make_node("BatchNormalization", ["fx", "s", "b", "m", "v"], ["fy"], epsilon=0.25)]
    function = helper.make_function("bnfold.test", "Norm", ["fx"], ["fy"], body,
                                    [helper.make_opsetid("", 13)])
    nodes = [helper.make_node("Norm", ["x"], ["y"], domain="bnfold.test")]
    model = _model(nodes, [_io("x", x.shape)], [_io("y", x.shape)], opset=13, functions=[function])
    model.opset_import.append(helper.make_opsetid("bnfold.test", 1))
    onnx.checker.check_model(model, full_check=True)
    (y,) = reference_outputs(model, {"x": x})
    expected = refimpl.batch_norm(x, m, v, s, b, eps=0.25)
    assert_within(y, expected, error_bound(np.abs(expected) + 10, 4, "float64"))


def test_verify_ignores_stale_value_info_of_the_folded_graph():
    """Optimizers leave value_info for values they removed: such a value is not fetched from the folded graph."""
    original, p = _conv_bn_net()
    folded = _fold_by_hand(p)
    for node in folded.graph.node:
        node.input[:] = ["r1_renamed" if i == "r1" else i for i in node.input]
        node.output[:] = ["r1_renamed" if o == "r1" else o for o in node.output]
    folded.graph.value_info.append(_io("r1", ["N", 8, 8, 8]))
    verdict = verify(original, folded)
    assert verdict.ok, str(verdict)
    assert verdict.layers_compared == 0


def test_verify_notes_an_original_that_overflows_on_the_inputs():
    f16 = TensorProto.FLOAT16
    nodes = [helper.make_node("Mul", ["x", "k"], ["y"])]
    model = _model(nodes, [_io("x", [4, 4], f16)], [_io("y", [4, 4], f16)],
                   [numpy_helper.from_array(np.array(60000, dtype=np.float16), "k")])
    verdict = verify(model, model)  # standard normal inputs: |x| > 1.1 overflows float16
    assert any("not finite on these inputs" in note for note in verdict.notes), str(verdict)


def test_verify_accepts_a_fold_through_a_reflect_pad():
    """BN -> Pad(reflect) -> Conv folds into the conv: the Pad's output then legitimately differs (not compared),
    while a Relu between Pad and Conv makes the same fold wrong, and its output is named."""
    rng = _rng(11)
    s, b, m = (rng.standard_normal(3) for _ in range(3))
    v = rng.uniform(0.5, 2, 3)
    w = rng.standard_normal((4, 3, 3, 3))
    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64), "pads")

    def graph(nodes, inits):
        return _model(nodes, [_io("x", [2, 3, 6, 6])], [_io("y", [2, 4, 6, 6])], [pads, *inits], opset=18)

    original = graph([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["n"]),
                      helper.make_node("Pad", ["n", "pads"], ["p"], mode="reflect"),
                      helper.make_node("Relu", ["p"], ["r"]),
                      helper.make_node("Conv", ["r", "w"], ["y"])],
                     _inits(s=s.astype(np.float32), b=b.astype(np.float32), m=m.astype(np.float32),
                            v=v.astype(np.float32), w=w.astype(np.float32)))
    wf, bf = refimpl.fold_bn_conv(w.astype(np.float32).astype(np.float64), None, m.astype(np.float32),
                                  v.astype(np.float32), 1e-5, s.astype(np.float32), b.astype(np.float32))
    folded = graph([helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
                    helper.make_node("Relu", ["p"], ["r"]),
                    helper.make_node("Conv", ["r", "wf", "bf"], ["y"])],
                   _inits(wf=wf.astype(np.float32), bf=bf.astype(np.float32)))
    verdict = verify(original, folded)
    assert not verdict.ok and verdict.first_divergence is not None
    assert verdict.first_divergence.path == "r"  # the Relu's output, not the Pad's
    no_relu = [n for n in original.graph.node if n.op_type != "Relu"]
    no_relu[-1].input[0] = "p"
    original_direct = graph(no_relu, list(original.graph.initializer)[1:])
    folded_direct = graph([helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
                           helper.make_node("Conv", ["p", "wf", "bf"], ["y"])],
                          _inits(wf=wf.astype(np.float32), bf=bf.astype(np.float32)))
    verdict = verify(original_direct, folded_direct)
    assert verdict.ok, str(verdict)


@pytest.mark.parametrize("spatial, kernel, strides, pads, dilations", [
    ((8,), 3, 1, 1, 1), ((8, 8), 3, 1, 1, 1), ((7, 7, 7), 3, 1, 1, 1), ((8, 8), 2, 1, 0, 1),
    ((8, 8), 3, 2, 1, 1), ((9, 9), 3, 2, 0, 1), ((7, 7), 3, 1, 1, 2), ((8, 8), 3, 3, 1, 1)])
def test_reference_max_pool_ceil_mode_matches_onnxruntime(spatial, kernel, strides, pads, dilations):
    # The evaluator's own kernel gives 10 outputs for kernel 3, stride 1, pads 1 on 8 values in ceil mode (not 8).
    dims = len(spatial)
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[kernel] * dims, strides=[strides] * dims,
                            pads=[pads] * (2 * dims), dilations=[dilations] * dims, ceil_mode=1)
    model = _model([node], [_io("x", [2, 3, *spatial])], [_io("y", None)])
    x = _rng(dims).standard_normal((2, 3, *spatial)).astype(np.float32)
    expected = run_onnxruntime(model, {"x": x})[0]
    got = reference_outputs(model, {"x": x})[0]
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got.astype(np.float32), expected)  # a max selects: exact


def test_verify_runs_a_ceil_mode_pool_branch_beside_a_conv_branch():
    # GoogLeNet / Inception: conv -> BN beside MaxPool(3, stride 1, pads 1, ceil_mode) -> conv -> BN, concatenated.
    rng = _rng(7)
    p = {"w1": rng.standard_normal((4, 3, 1, 1)), "w2": rng.standard_normal((2, 3, 1, 1))}
    for i, c in ((1, 4), (2, 2)):
        p |= {f"g{i}": rng.uniform(0.5, 1.5, c), f"be{i}": rng.standard_normal(c), f"m{i}": rng.standard_normal(c),
              f"v{i}": rng.uniform(0.5, 2, c)}
    p = {k: v.astype(np.float32) for k, v in p.items()}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["n1"], name="bn1"),
             helper.make_node("MaxPool", ["x"], ["pool"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1],
                              ceil_mode=1, name="pool"),
             helper.make_node("Conv", ["pool", "w2"], ["c2"], name="conv2"),
             helper.make_node("BatchNormalization", ["c2", "g2", "be2", "m2", "v2"], ["n2"], name="bn2"),
             helper.make_node("Concat", ["n1", "n2"], ["y"], axis=1, name="concat")]
    original = _model(nodes, [_io("x", [2, 3, 8, 8])], [_io("y", [2, 6, 8, 8])], _inits(**p))
    verdict = verify(original, original)
    assert verdict.ok, str(verdict)
    assert verdict.layers_compared == 1  # the pool's output


def _shape_arithmetic_net():
    """Conv -> BN -> Pad whose amounts are computed in float and cast to int (as timm's Conv2dSame exports:
    begin = int(2.0 / 2.0), end = 2 - begin) -> Resize by float scales [1, 1, 2, 2] -> Add of a constant grid."""
    rng = _rng(11)
    p = {"w": rng.standard_normal((4, 3, 3, 3)), "b": rng.standard_normal(4), "g": rng.uniform(0.5, 1.5, 4),
         "be": rng.standard_normal(4), "m": rng.standard_normal(4), "v": rng.uniform(0.5, 2, 4),
         "grid": rng.standard_normal((1, 4, 16, 16))}
    p = {k: v.astype(np.float32) for k, v in p.items()}
    shape = {"total": np.array([2.0], np.float32), "two": np.array([2.0], np.float32),
             "scales": np.array([1, 1, 2, 2], np.float32)}
    ints = {"zeros": np.zeros(2, np.int64), "total_int": np.array([2], np.int64)}

    def constant(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name), name=name)
    nodes = [*(constant(k, v) for k, v in {**shape, **ints}.items()),
             helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["n"], name="bn"),
             helper.make_node("Div", ["total", "two"], ["half"], name="half"),
             helper.make_node("Cast", ["half"], ["begin"], to=TensorProto.INT64, name="begin"),
             helper.make_node("Sub", ["total_int", "begin"], ["end"], name="end"),
             helper.make_node("Concat", ["zeros", "begin", "begin", "zeros", "end", "end"], ["pads"], axis=0,
                              name="pads"),
             helper.make_node("Pad", ["n", "pads"], ["padded"], name="pad"),
             helper.make_node("Resize", ["padded", "", "scales"], ["up"], mode="nearest", name="resize"),
             helper.make_node("Add", ["up", "grid"], ["y"], name="add")]
    model = _model(nodes, [_io("x", [1, 3, 8, 8])], [_io("y", [1, 4, 16, 16])], _inits(**p))
    f64 = {k: v.astype(np.float64) for k, v in p.items()}
    w, b = refimpl.fold_conv_bn(f64["w"], f64["b"], f64["m"], f64["v"], 1e-5, f64["g"], f64["be"])
    return model, shape, w, b


def _refolded(model, w, b):
    """``model`` with conv -> BN replaced by a conv of weight ``w`` and bias ``b`` (float32)."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    nodes = [n for n in folded.graph.node if n.name != "bn"]
    next(n for n in nodes if n.name == "conv").output[0] = "n"
    del folded.graph.node[:]
    folded.graph.node.extend(nodes)
    kept = [t for t in folded.graph.initializer if t.name not in ("w", "b", "g", "be", "m", "v")]
    del folded.graph.initializer[:]
    folded.graph.initializer.extend(kept + _inits(w=w.astype(np.float32), b=b.astype(np.float32)))
    return folded


def test_rounded_copy_leaves_constants_that_decide_shapes_and_pads_alone():
    # One more rounding of 2.0 in the pad computation (to 1.9999999) moves the pad by one pixel; of a Resize
    # scale, makes 15 rows of 16: the baseline then runs a different network, or none at all.
    model, shape, _, _ = _shape_arithmetic_net()
    for seed in range(8):
        copy = rounded_copy(model, seed=seed)
        constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in copy.graph.node
                     if n.op_type == "Constant"}
        for name, value in shape.items():
            np.testing.assert_array_equal(constants[name], value)
        perturbed = {t.name: numpy_helper.to_array(t) for t in copy.graph.initializer}
        assert not np.array_equal(perturbed["w"], numpy_helper.to_array(
            next(t for t in model.graph.initializer if t.name == "w")))


def test_verify_is_not_fooled_by_shape_arithmetic_in_float():
    model, _, w, b = _shape_arithmetic_net()
    x = {"x": _rng(12).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    assert verify(model, _refolded(model, w, b), x, per_node=False).ok
    wrong = b.copy()
    wrong[1] += 0.02 * np.abs(b).max()
    verdict = verify(model, _refolded(model, w, wrong), x, per_node=False)
    assert not verdict.ok, str(verdict)
    assert verdict.outputs[0].limit < 1e-4  # the error model's baseline, not a shifted or resized network


def _upsample_asymmetric(x, scales, mode):
    """Upsample by the ONNX specification, axis by axis in float64: output index i reads input i / scale."""
    y = np.asarray(x, dtype=np.float64)
    for axis, scale in enumerate(scales):
        n = y.shape[axis]
        coordinate = np.arange(int(np.floor(n * scale))) / scale
        low = np.minimum(np.floor(coordinate).astype(int), n - 1)
        if mode == "nearest":
            y = np.take(y, low, axis=axis)
            continue
        high = np.minimum(low + 1, n - 1)
        weight = (coordinate - low).reshape([-1 if a == axis else 1 for a in range(y.ndim)])
        y = np.take(y, low, axis=axis) * (1 - weight) + np.take(y, high, axis=axis) * weight
    return y


@pytest.mark.parametrize("opset", [7, 9])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("scales", [[1, 1, 8, 8], [1, 1, 1.5, 2.5], [1, 1, 3, 1]])
def test_reference_upsample_follows_the_specification(opset, mode, scales):
    # The evaluator implements nearest with integer scales only (an FCN head at opset 9 upsamples bilinearly by 8).
    scales = np.array(scales, np.float32)
    if opset == 9:
        node = helper.make_node("Upsample", ["x", "scales"], ["y"], mode=mode)
        initializers = _inits(scales=scales)
    else:
        node = helper.make_node("Upsample", ["x"], ["y"], mode=mode, scales=scales.tolist())
        initializers = []
    model = _model([node], [_io("x", [1, 2, 5, 4])], [_io("y", None)], initializers, opset=opset)
    model.ir_version = 7
    x = _rng(opset).standard_normal((1, 2, 5, 4)).astype(np.float32)
    got = reference_outputs(model, {"x": x})[0]
    expected = _upsample_asymmetric(x, scales.astype(np.float64), mode)
    assert got.shape == expected.shape == run_onnxruntime(model, {"x": x})[0].shape
    # Per axis a weighted sum of two values (3 operations, plus the coordinate's); magnitude: |input| interpolated.
    magnitude = _upsample_asymmetric(np.abs(x), scales.astype(np.float64), mode)
    assert_within(got, expected, error_bound(magnitude, 4 * len(scales), "float64"), "reference Upsample")


def test_verify_chooses_no_size_on_which_the_float64_reference_pools_an_empty_map():
    """x [N,1,h,w] -> Conv(3x3, stride 8, pad 1) -> BN -> MaxPool(2, stride 2) -> ReduceMean. At h = w = 8 the conv
    map is floor(7 / 8) + 1 = 1 wide and the pool's is floor((1 - 2) / 2) + 1 = 0 by the operator's definition (the
    reference evaluator's), while onnxruntime returns 1x1: no meaningful run. At 16 the conv map is 2 and the pool's
    1 in both, so 16 is the size chosen, and the fold verifies there."""
    from onnx import TensorProto, helper, numpy_helper

    import adapters.onnx as ao
    from adapters.onnx.checking import choose_input_shapes

    rng = np.random.default_rng(0)

    def init(name, shape, low=-1.0, high=1.0):
        return numpy_helper.from_array(rng.uniform(low, high, shape).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], strides=[8, 8], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"]),
             helper.make_node("MaxPool", ["n"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("ReduceMean", ["p"], ["y"], axes=[2, 3], keepdims=0)]
    graph = helper.make_graph(
        nodes, "pool_on_one_pixel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 1, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 2])],
        [init("w", (2, 1, 3, 3)), init("s", (2,), 0.5, 1.5), init("b", (2,)), init("m", (2,)),
         init("v", (2,), 0.5, 2.0)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert choose_input_shapes(model) == {"x": [1, 1, 16, 16]}
    folded, report = ao.fuse(model)
    assert len(report.folded) == 1
    assert ao.verify(model, folded).ok

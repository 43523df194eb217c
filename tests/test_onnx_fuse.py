"""adapters.onnx.fuse: folded values against refimpl folds computed independently in float64 and rounded once,
inplace semantics, files and external data, what is kept, shared weights, and bad input (one clear error,
nothing modified)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx_helpers import assert_faithful, graphs  # noqa: E402

import refimpl  # noqa: E402
from adapters.onnx import fuse, fuse_bn  # noqa: E402
from adapters.onnx.checking import run_onnxruntime, verify  # noqa: E402
from adapters.onnx.suite.cases import CASES, GraphBuilder, count_batch_norms, get_case  # noqa: E402
from adapters.report import FOLD_KINDS  # noqa: E402
from refimpl.rounding import round_once  # noqa: E402

# -- an independent oracle ------------------------------------------------------------------


def _initializers(model: onnx.ModelProto) -> dict[str, TensorProto]:
    return {t.name: t for _, body in graphs(model) if isinstance(body, onnx.GraphProto) for t in body.initializer}


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for _, body in graphs(model) for n in body.node if n.name == name)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _float64(tensor: TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor).astype(np.float64)


def _bits(values: np.ndarray) -> np.ndarray:
    """Comparable bit patterns of a float array of any width (bfloat16 included)."""
    return values.view(np.dtype(f"u{values.dtype.itemsize}"))


_DTYPE_NAME = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.DOUBLE: "float64",
               TensorProto.BFLOAT16: "bfloat16"}


def _expected(original: onnx.ModelProto, layer: str, norms: list[tuple[str, str, tuple[int, int] | None]]
              ) -> tuple[np.ndarray, np.ndarray]:
    """The folded weight and bias of ``layer`` in float64 (stored layout), from refimpl applied in dataflow order:
    ``norms`` lists (norm node, "before"/"after", channel slice) nearest-first for each side, "before" first."""
    inits = _initializers(original)
    node = _node(original, layer)
    w = _float64(inits[node.input[1]])
    kind = node.op_type
    bias_name = None
    shift = None
    if kind == "MatMul":
        add = next((n for n in original.graph.node if n.op_type == "Add" and node.output[0] in n.input), None)
        if add is not None:
            bias_name = next(i for i in add.input if i in inits)
    else:
        if len(node.input) > 2:
            bias_name = node.input[2]
        shift = _constant_add(original, node.output[0])  # conv/Gemm -> Add(constant) -> norm: more bias
    out_channels = {"Conv": w.shape[0], "ConvTranspose": w.shape[1] * _attr(node, "group", 1),
                    "Gemm": w.shape[0] if _attr(node, "transB", 0) else w.shape[1], "MatMul": w.shape[1]}[kind]
    b = None if bias_name is None else np.broadcast_to(_float64(inits[bias_name]).reshape(-1), (out_channels,))
    if kind == "Gemm":
        w = (w if _attr(node, "transB", 0) else w.T) * _attr(node, "alpha", 1.0)
        b = None if b is None else b * _attr(node, "beta", 1.0)
    elif kind == "MatMul":
        w = w.T
    if shift is not None and any(side == "after" for _, side, _ in norms):
        b = np.broadcast_to(shift.reshape(-1), (out_channels,)) + (0.0 if b is None else b)
    group = _attr(node, "group", 1)
    for norm_name, side, channels in norms:
        bn = _node(original, norm_name)
        scale, beta, mean, var = (_float64(inits[n]) for n in bn.input[1:])
        added = _constant_add(original, bn.output[0]) if side == "before" else None
        if added is not None:  # norm -> Add(constant) -> layer: the norm's shift grows by the constant
            beta = beta + added.reshape(-1)
        if channels is not None:
            scale, beta, mean, var = (v[channels[0]:channels[1]] for v in (scale, beta, mean, var))
        stats = (mean, var, float(np.float32(_attr(bn, "epsilon", 1e-5))), scale, beta)  # a float32 attribute
        if side == "after" and kind in ("Gemm", "MatMul"):
            w, b = refimpl.fold_linear_bn(w, b, *stats)
        elif side == "after":
            w, b = refimpl.fold_conv_bn(w, b, *stats, transposed=kind == "ConvTranspose", groups=group)
        elif kind in ("Gemm", "MatMul"):
            w, b = refimpl.fold_bn_linear(w, b, *stats)
        else:
            w, b = refimpl.fold_bn_conv(w, b, *stats, groups=group)
    if kind in ("Gemm", "MatMul") and not (kind == "Gemm" and _attr(node, "transB", 0)):
        w = w.T
    return w, b


def _folded(folded: onnx.ModelProto, layer: str) -> tuple[TensorProto, TensorProto]:
    inits = _initializers(folded)
    node = _node(folded, layer)
    if node.op_type == "MatMul":
        add = next(n for n in folded.graph.node if n.op_type == "Add" and node.output[0] in n.input)
        return inits[node.input[1]], inits[next(i for i in add.input if i in inits)]
    return inits[node.input[1]], inits[node.input[2]]


def _constant_add(model: onnx.ModelProto, value: str) -> np.ndarray | None:
    """The initializer an Add adds to ``value`` (the only reader of ``value``), or None."""
    inits = _initializers(model)
    readers = [n for _, body in graphs(model) for n in body.node if value in n.input]
    if len(readers) == 1 and readers[0].op_type == "Add":
        other = [i for i in readers[0].input if i != value]
        if len(other) == 1 and other[0] in inits:
            return _float64(inits[other[0]])
    return None


def _pairings() -> list[tuple[str, str, list[tuple[str, str, tuple[int, int] | None]]]]:
    """(case, layer, [(norm, "before"/"after", channel slice)]) from every case's registered pairs whose layer and
    norms read initializers only (the oracle reads those)."""
    out = []
    for case in CASES.values():
        if not case.pairs:
            continue
        model = case.build()
        inits = _initializers(model)
        by_layer: dict[str, list] = {}
        for pair in case.pairs:
            side = "before" if pair.kind.startswith("bn->") else "after"
            by_layer.setdefault(pair.layer, []).append((pair.norm, side, pair.channels))
        for layer, norms in by_layer.items():
            nodes = [_node(model, layer)] + [_node(model, n) for n, _, _ in norms]
            if all(i in inits for n in nodes for i in n.input[1:] if i):
                # dataflow order: norms before the layer (nearest first), then after it (nearest first)
                out.append((case.name, layer, sorted(norms, key=lambda n: n[1] == "after")))
    return out


PAIRINGS = _pairings()


def _assert_weights(case: str, layer: str, norms: list, *, ulps: int = 0) -> None:
    model = get_case(case).build()
    folded, _ = fuse(model)
    weight, bias = _folded(folded, layer)
    expected_w, expected_b = _expected(model, layer, norms)
    for what, tensor, expected in (("weight", weight, expected_w), ("bias", bias, expected_b)):
        dtype = _DTYPE_NAME[tensor.data_type]
        got = numpy_helper.to_array(tensor)
        want = round_once(np.broadcast_to(expected, tuple(tensor.dims)), dtype)
        assert got.shape == want.shape, (what, got.shape, want.shape)
        if ulps == 0:
            assert np.array_equal(_bits(got), _bits(want)), f"{case}/{layer} {what}: not the correctly rounded fold"
        else:  # several folds composed in another float64 order: at most `ulps` apart after rounding
            a = _bits(got).astype(np.int64) * np.sign(got.astype(np.float64))
            b = _bits(want).astype(np.int64) * np.sign(want.astype(np.float64))
            assert np.abs(a - b).max() <= ulps, f"{case}/{layer} {what}"


@pytest.mark.parametrize(("case", "layer", "norms"), PAIRINGS, ids=[f"{c}-{lay}" for c, lay, _ in PAIRINGS])
def test_folded_values_are_refimpl_folds_rounded_once(case, layer, norms):
    # One fold is the correctly rounded refimpl fold; several composed in another float64 order are 1 ulp apart.
    _assert_weights(case, layer, norms, ulps=0 if len(norms) == 1 else 1)


def test_pairings_cover_every_fold_kind_and_the_add_bias_cases():
    kinds = {pair.kind for case in CASES.values() for pair in case.pairs}
    assert kinds == set(FOLD_KINDS)
    covered = {case for case, _, _ in PAIRINGS}
    assert {"paddle_conv_add_bn", "conv_bias_add_bn", "gemm_add_bn", "paddle_conv_transpose_add_bn", "bn_add_conv",
            "bn_add_bn_add_conv", "bn_add_gemm", "bn_conv_add_bn", "conv_concat_bn"} <= covered


def _bfloat16_model(op: str) -> onnx.ModelProto:
    b = GraphBuilder(f"bf16_{op}", opset=22)
    if op == "Conv":
        x = b.input("x", [2, 3, 5, 5], np.float32)
        y = b.conv(x, "conv", 3, 4, 3)
    else:
        x = b.input("x", [3, 4], np.float32)
        y = b.node("Gemm", [x, b.weight("fc.weight", (4, 5), 4), b.init("fc.bias", b.uniform((5,), 0.5))], "fc")
    b.output(b.bn(y, "bn", 4 if op == "Conv" else 5))
    model = b.model()
    bf16 = {}
    for t in model.graph.initializer:  # round every float32 value to bfloat16 (exactly representable afterwards)
        bits = round_once(numpy_helper.to_array(t).astype(np.float64), "bfloat16")
        new = helper.make_tensor(t.name, TensorProto.BFLOAT16, list(t.dims), bits.tobytes(), raw=True)
        bf16[t.name] = new
    del model.graph.initializer[:]
    model.graph.initializer.extend(bf16.values())
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.BFLOAT16
    return model


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_bfloat16_folds_are_correctly_rounded(op):
    model = _bfloat16_model(op)
    onnx.checker.check_model(model, full_check=True)
    folded, report = fuse(model)
    onnx.checker.check_model(folded, full_check=True)
    assert count_batch_norms(folded) == 0 and len(report.folded) == 1
    layer = "conv" if op == "Conv" else "fc"
    weight, bias = _folded(folded, layer)
    assert weight.data_type == bias.data_type == TensorProto.BFLOAT16
    expected_w, expected_b = _expected(model, layer, [("bn", "after", None)])
    for tensor, expected in ((weight, expected_w), (bias, expected_b)):
        got = np.frombuffer(tensor.raw_data, dtype="<u2").reshape(tuple(tensor.dims))
        assert np.array_equal(got, round_once(expected, "bfloat16").reshape(got.shape))


def test_max_rel_change_is_the_weight_change_in_float64():
    model = get_case("conv_transpose2d_groups_bn").build()
    _, report = fuse(model)
    w = _float64(_initializers(model)["convt.weight"])
    new_w, _ = _expected(model, "convt", [("bn", "after", None)])
    (pair,) = report.folded
    assert (pair.norm, pair.layer, pair.kind) == ("bn", "convt", "conv_transpose->bn")
    assert math.isclose(pair.max_rel_change, np.abs(new_w - w).max() / np.abs(w).max(), rel_tol=1e-12)


@pytest.mark.parametrize(("case", "kinds"), [
    ("conv_transpose2d_bn", {"conv_transpose->bn"}), ("gemm_bn", {"linear->bn"}), ("matmul_add_bn", {"linear->bn"}),
    ("bn_conv_valid", {"bn->conv"}), ("bn_gemm", {"bn->linear"}), ("bn_matmul", {"bn->linear"}),
    ("bn_opset9", {"conv->bn", "bn->conv"}), ("conv_concat_bn", {"conv->bn"}),
])
def test_report_kinds(case, kinds):
    _, report = fuse(get_case(case).build())
    assert {p.kind for p in report.folded} == kinds


# -- inplace, paths, external data ----------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_inplace_folds_the_model_itself_into_the_same_bytes(name):
    model = get_case(name).build()
    copy_result, copy_report = fuse(model)
    same, report = fuse(model, inplace=True)
    assert same is model
    assert model.SerializeToString() == copy_result.SerializeToString()
    assert report.to_dict() == copy_report.to_dict()


def test_paths_are_read(tmp_path):
    model = get_case("conv_bn_value_info").build()
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    expected, _ = fuse(model)
    for given in (path, str(path)):
        folded, report = fuse(given)
        assert folded.SerializeToString() == expected.SerializeToString() and len(report.folded) == 2
    assert onnx.load(path).SerializeToString() == model.SerializeToString()


def test_external_data_loads_folds_and_saves(tmp_path):
    case = get_case("shared_weight_two_bns")
    model = case.build()
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    onnx.save(model, source, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
              size_threshold=16)
    assert (source.parent / "weights.bin").stat().st_size > 0
    folded, report = fuse(source)
    assert len(report.folded) == 2
    target = tmp_path / "out" / "folded.onnx"
    target.parent.mkdir()
    onnx.save(folded, target, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
              size_threshold=16)
    onnx.checker.check_model(str(target), full_check=True)
    reloaded = onnx.load(target, load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in reloaded.graph.initializer)
    reloaded = onnx.load(target)
    assert count_batch_norms(reloaded) == 0
    assert verify(case.build(), reloaded, case.inputs(), per_node=False).ok  # (onnx.save externalised `model`)
    # The same model with its external data not loaded: the fold says which tensor it cannot read.
    unloaded = onnx.load(source, load_external_data=False)
    before = unloaded.SerializeToString()
    with pytest.raises(ValueError, match="external data that is not loaded"):
        fuse(unloaded, inplace=True)
    assert unloaded.SerializeToString() == before


# -- what is kept, what goes ----------------------------------------------------------------

def test_names_doc_strings_metadata_and_unused_initializers():
    model = get_case("conv_bn_value_info").build()
    model.doc_string = "model doc"
    model.graph.doc_string = "graph doc"
    helper.set_model_props(model, {"author": "bnfold", "purpose": "test"})
    for node in model.graph.node:
        node.doc_string = f"doc of {node.name}"
    weight = next(t for t in model.graph.initializer if t.name == "conv1.weight")
    weight.doc_string = "conv1 weight doc"
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "unused_before"))
    folded, report = fuse(model)
    assert_faithful(model, folded, report)
    names = {t.name for t in folded.graph.initializer}
    assert "unused_before" in names, "an initializer unused in the original is not ours to remove"
    assert not {n for n in names if n.startswith(("bn1.", "bn2."))}, "BN parameters left behind"
    assert next(t for t in folded.graph.initializer if t.name == "conv1.weight").doc_string == "conv1 weight doc"
    assert [n.name for n in folded.graph.node] == ["conv1", "relu", "conv2"]
    assert [v.name for v in folded.graph.value_info] == ["bn1_out", "relu_out"]


def test_shared_weights_get_their_own_initializers():
    model = get_case("shared_weight_two_bns").build()
    folded, _ = fuse(model)
    inits = _initializers(folded)
    a, b = _node(folded, "conv_a"), _node(folded, "conv_b")
    assert "shared.weight" not in inits and "shared.bias" not in inits
    assert len({a.input[1], b.input[1], a.input[2], b.input[2]}) == 4

    model = get_case("shared_weight_one_unfolded").build()
    folded, _ = fuse(model)
    inits = _initializers(folded)
    a, b = _node(folded, "conv_a"), _node(folded, "conv_b")
    assert b.input[1] == "shared.weight" and a.input[1] != "shared.weight"
    original = next(t for t in model.graph.initializer if t.name == "shared.weight")
    assert inits["shared.weight"].SerializeToString() == original.SerializeToString()

    model = get_case("weight_is_also_graph_output").build()
    folded, _ = fuse(model)
    assert _node(folded, "conv").input[2] != "conv.bias"
    feeds = get_case("weight_is_also_graph_output").inputs()
    kept = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "conv.bias"))
    assert np.array_equal(run_onnxruntime(folded, feeds)[1], kept)


def test_gemm_attributes_and_matmul_to_gemm():
    folded, _ = fuse(get_case("gemm_transa_alpha_beta_bn").build())
    fc = _node(folded, "fc")
    assert (_attr(fc, "alpha", 1.0), _attr(fc, "beta", 1.0), _attr(fc, "transA", 0)) == (1.0, 1.0, 1)
    assert list(_initializers(folded)[fc.input[2]].dims) == [1, 5]
    folded, _ = fuse(get_case("gemm_scalar_c_bn").build())
    assert list(_initializers(folded)[_node(folded, "fc").input[2]].dims) == [5]
    folded, _ = fuse(get_case("matmul_bn").build())
    fc = _node(folded, "fc")
    assert fc.op_type == "Gemm" and len(fc.input) == 3 and not fc.attribute


def test_ir3_initializers_stay_listed_as_inputs():
    model = get_case("bn_opset7_ir3").build()
    folded, _ = fuse(model)
    inputs = {i.name for i in folded.graph.input}
    assert {t.name for t in folded.graph.initializer} <= inputs
    assert not {n for n in inputs if n.startswith("bn.")}


def test_overflow_leaves_the_layer_untouched():
    model = get_case("fp16_overflow").build()
    folded, report = fuse(model)
    (skipped,) = report.skipped
    assert (skipped.norm, skipped.reason) == ("bn1", "overflow") and "65504" in skipped.detail
    before = next(t for t in model.graph.initializer if t.name == "conv1.weight")
    assert _initializers(folded)["conv1.weight"].SerializeToString() == before.SerializeToString()


def test_fuse_bn_returns_a_folded_copy_and_logs_the_report(caplog):
    model = get_case("conv2d_bn").build()
    before = model.SerializeToString()
    with caplog.at_level(logging.INFO, logger="adapters.onnx"):
        folded = fuse_bn(model)
    assert isinstance(folded, onnx.ModelProto) and count_batch_norms(folded) == 0
    assert model.SerializeToString() == before
    assert "1 of 1 norm layer(s) folded" in caplog.text


# -- bad input ------------------------------------------------------------------------------

def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, text
    return text


def test_not_a_model():
    with pytest.raises(TypeError, match="ModelProto or a path"):
        fuse(42)


def test_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="cannot read ONNX model") as excinfo:
        fuse(tmp_path / "missing.onnx")
    _one_line(excinfo)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xff not a protobuf \xff" * 10)
    with pytest.raises(ValueError) as excinfo:
        fuse(garbage)
    _one_line(excinfo)


def _two_wide_convs() -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Conv -> BN with weights too large for the checker's skeleton (> 1024 values)."""
    b = GraphBuilder("two_wide_convs")
    x = b.input("x", [1, 3, 5, 5])
    y = b.node("Relu", [b.bn(b.conv(x, "conv1", 3, 48, 3, pads=[1, 1, 1, 1]), "bn1", 48)], "relu")
    b.output(b.bn(b.conv(y, "conv2", 48, 48, 1), "bn2", 48))
    return b.model()


def _broken(kind: str) -> onnx.ModelProto:
    model = get_case("conv_bn_bn").build() if kind != "weight_bytes" else _two_wide_convs()
    if kind == "weight_bytes":  # the second of two folded convs: the first must not be written either
        t = next(t for t in model.graph.initializer if t.name == "conv2.weight")
        t.raw_data = t.raw_data[:-4]
    elif kind == "invalid":
        conv = _node(model, "conv")
        del conv.input[1:]
    elif kind == "channels":
        bn = _node(model, "bn1")
        for name in bn.input[1:]:
            t = next(t for t in model.graph.initializer if t.name == name)
            t.CopyFrom(numpy_helper.from_array(np.ones(5, np.float32), name))
    elif kind == "variance":
        t = next(t for t in model.graph.initializer if t.name == "bn2.var")
        t.CopyFrom(numpy_helper.from_array(np.array([1, -0.5, 1, 1], np.float32), "bn2.var"))
    elif kind == "old_opset":
        model.opset_import[0].version = 6
    elif kind == "new_opset":
        model.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    return model


@pytest.mark.parametrize(("kind", "message"), [
    ("invalid", r"invalid ONNX model: .*conv"),
    ("channels", r"'bn1' has 5 channels but Conv 'conv' has 4 output channels"),
    ("variance", r"cannot fold conv -> bn2 .*bn_var must be finite and non-negative; channel 1 .*-0\.5"),
    ("weight_bytes", r"Conv 'conv2': tensor 'conv2.weight' holds a different number of bytes than its dims"),
    ("old_opset", r"imports opset 6 .*supported: 7 to"),
    ("new_opset", r"imports opset \d+ .*supported: 7 to"),
])
def test_bad_models_raise_one_line_and_change_nothing(kind, message):
    model = _broken(kind)
    before = model.SerializeToString()
    with pytest.raises(ValueError, match=message) as excinfo:
        fuse(model, inplace=True)
    _one_line(excinfo)
    assert model.SerializeToString() == before


def test_a_saved_file_is_never_written(tmp_path: Path):
    path = tmp_path / "model.onnx"
    onnx.save(get_case("conv2d_bn").build(), path)
    before = path.read_bytes()
    fuse(path, inplace=True)
    assert path.read_bytes() == before

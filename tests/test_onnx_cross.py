"""Cross-test of the two adapters: for the same torch model, ``adapters.onnx`` folding its ONNX graph and
``adapters.torch`` folding the module give bit-identical folded weights and biases, in float32 and float16.

Both fold in float64 with refimpl and round once, correctly, to the parameter dtype -- the torch adapter
with its own torch-side rounding (round to odd through float32), the ONNX adapter with
``refimpl.rounding`` -- so any difference in layout handling, fold order, eps or rounding shows as
differing bits. The ONNX graphs are written with ``onnx.helper`` from the modules' own parameters
(and one model goes through ``torch.onnx.export`` with the norms kept). The BatchNorm eps is 2**-17:
an ONNX epsilon is a float32 attribute, so the two models are the same function only when eps is
a float32 value.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from onnx import helper, numpy_helper  # noqa: E402
from torch import nn  # noqa: E402

import adapters.onnx as onnx_adapter  # noqa: E402
import adapters.torch as torch_adapter  # noqa: E402
from adapters.torch.suite.cases import randomize_norm_stats, randomize_parameters  # noqa: E402

EPS = 2.0**-17
_ONNX_TYPE = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16}


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def to_onnx(model: nn.Sequential, input_shape: tuple[int, ...], dtype: torch.dtype) -> onnx.ModelProto:
    """The Sequential as an ONNX graph, node i named str(i), its parameters as initializers 'i.weight' etc."""
    nodes, inits = [], []
    x = "x"
    for i, m in enumerate(model):
        y = f"y{i}"
        if isinstance(m, nn.ReLU):
            nodes.append(helper.make_node("Relu", [x], [y], name=str(i)))
            x = y
            continue
        params = [f"{i}.weight"] + ([f"{i}.bias"] if getattr(m, "bias", None) is not None else [])
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            names = [f"{i}.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
            inits += [numpy_helper.from_array(_array(getattr(m, p.split(".")[1])), p) for p in names]
            nodes.append(helper.make_node("BatchNormalization", [x, *names], [y], name=str(i), epsilon=m.eps))
        else:
            inits += [numpy_helper.from_array(_array(getattr(m, p.split(".")[1])), p) for p in params]
            if isinstance(m, nn.Linear):
                nodes.append(helper.make_node("Gemm", [x, *params], [y], name=str(i), transB=1))
            else:
                op = "ConvTranspose" if isinstance(m, nn.ConvTranspose2d) else "Conv"
                pads = list(m.padding) * 2
                attrs = {"group": m.groups, "strides": list(m.stride), "pads": pads, "dilations": list(m.dilation)}
                if op == "ConvTranspose":
                    attrs["output_padding"] = list(m.output_padding)
                nodes.append(helper.make_node(op, [x, *params], [y], name=str(i), **attrs))
        x = y
    graph = helper.make_graph(nodes, "cross", [helper.make_tensor_value_info("x", _ONNX_TYPE[dtype], input_shape)],
                              [helper.make_tensor_value_info(x, _ONNX_TYPE[dtype], [None] * len(input_shape))], inits)
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model_proto.ir_version = 8
    return model_proto


MODELS = {
    "conv_bn_batched": ((2, 3, 6, 6), lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 1, stride=2), nn.BatchNorm2d(4))),
    # 73,728 weights: a rounding that is not correct (float16 through float32 rounds twice, wrong for about one
    # value in 2**13) shows here with near certainty.
    "wide_conv_bn": ((1, 64, 4, 4), lambda: nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128))),
    "conv_bn_bn": ((2, 3, 6, 6), lambda: nn.Sequential(nn.Conv2d(3, 5, 3, dilation=2), nn.BatchNorm2d(5),
                                                       nn.BatchNorm2d(5))),
    "conv_transpose_groups_bn": ((2, 4, 5, 5), lambda: nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), nn.BatchNorm2d(6))),
    "linear_bn": ((3, 5), lambda: nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7))),
    "bn_conv": ((2, 3, 6, 6), lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, groups=1))),
    "bn_linear": ((3, 5), lambda: nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 2, bias=False))),
}


def _build(name: str, dtype: torch.dtype) -> tuple[nn.Sequential, tuple[int, ...]]:
    shape, make = MODELS[name]
    torch.manual_seed(0)
    model = make()
    generator = torch.Generator().manual_seed(len(name))
    randomize_parameters(model, generator)
    randomize_norm_stats(model, generator)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = EPS
    return model.to(dtype).eval(), shape


def _assert_same_folds(module: nn.Sequential, folded_onnx: onnx.ModelProto, report) -> None:
    by_name = {t.name: numpy_helper.to_array(t) for t in folded_onnx.graph.initializer}
    nodes = {n.name: n for n in folded_onnx.graph.node}
    layers = {pair.layer for pair in report.folded}
    assert layers
    for name in layers:
        node, layer = nodes[name], module[int(name)]
        for tensor, onnx_name in ((layer.weight, node.input[1]), (layer.bias, node.input[2])):
            ours = _array(tensor)
            theirs = by_name[onnx_name].reshape(ours.shape)
            assert ours.dtype == theirs.dtype
            bits = np.dtype(f"u{ours.dtype.itemsize}")
            assert np.array_equal(ours.view(bits), theirs.view(bits)), f"layer {name}: {onnx_name} differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_both_adapters_fold_to_the_same_bits(name, dtype, one_thread):
    module, shape = _build(name, dtype)
    graph = to_onnx(module, shape, dtype)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    fused_module, torch_report = torch_adapter.fuse(module, example_inputs=example)
    folded_onnx, onnx_report = onnx_adapter.fuse(graph)
    assert len(onnx_report.folded) == len(torch_report.folded) > 0
    assert sorted((p.layer, p.kind) for p in onnx_report.folded) == sorted(
        (p.layer, p.kind) for p in torch_report.folded)
    _assert_same_folds(fused_module, folded_onnx, onnx_report)


def test_a_real_export_folds_to_the_same_bits(one_thread):
    zoo = pytest.importorskip("adapters.onnx.suite.zoo")
    module, shape = _build("conv_bn_batched", torch.float32)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    exported = zoo.export_keeping_bn(module, (example,), exporter="torchscript")
    folded_onnx, report = onnx_adapter.fuse(exported)
    fused_module, _ = torch_adapter.fuse(module)
    weights = {t.name: numpy_helper.to_array(t) for t in folded_onnx.graph.initializer}
    convs = [n for n in folded_onnx.graph.node if n.op_type == "Conv"]
    layers = [m for m in fused_module if isinstance(m, nn.Conv2d)]
    assert len(report.folded) == len(convs) == len(layers) == 3
    for node, layer in zip(convs, layers, strict=True):
        for tensor, onnx_name in ((layer.weight, node.input[1]), (layer.bias, node.input[2])):
            ours = _array(tensor)
            assert np.array_equal(ours.view(np.uint32), weights[onnx_name].reshape(ours.shape).view(np.uint32))

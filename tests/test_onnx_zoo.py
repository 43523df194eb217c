"""ONNX exports of zoo networks keep every BatchNormalization, match the torch module, and fold correctly.

The oracles are torch itself (the module's float32 output, judged by the error model against its
own float64 run) and the hand-worked norm counts of the zoo. Only small networks and inputs run
here; the benchmarks export the large ones.
"""

from __future__ import annotations

import numpy as np
import pytest

from adapters.onnx.checking import reference_outputs, run_onnxruntime
from adapters.onnx.suite.cases import count_batch_norms
from refimpl import compare_models

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

pytestmark = [pytest.mark.zoo, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def resnet18():
    pytest.importorskip("torchvision")
    from adapters.onnx.suite.zoo import ONNX_ZOO

    entry = ONNX_ZOO["torchvision/resnet18"]
    model, feeds = entry.export(exporter="torchscript")
    return entry, model, feeds


def _torch_outputs(module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out32 = module(torch.from_numpy(x)).numpy()
        out64 = module.double()(torch.from_numpy(x).double()).numpy()
    module.float()
    return out32, out64


def test_resnet18_export_keeps_every_norm_and_matches_torch(resnet18):
    entry, model, feeds = resnet18
    assert count_batch_norms(model) == entry.batch_norms == 20
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 20
    out32, out64 = _torch_outputs(entry.build_module(), feeds["input"])
    (onnx_out,) = run_onnxruntime(model, feeds)
    # The export run by onnxruntime is judged like a fused model: its error against torch's float64
    # run must stay within the error model of torch's own float32 run.
    judged = compare_models(onnx_out, out32, out64, "float32")
    assert judged.ok, judged.describe("onnxruntime run of the export")
    # The float64 reference of the export agrees with torch's float64 run far inside float32's error.
    (reference,) = reference_outputs(model, feeds)
    judged = compare_models(reference, out32, out64, "float32")
    assert judged.ok and judged.fused_error < 1e-3 * judged.unfused_error, judged


class _Small(torch.nn.Module):
    """conv -> BN -> ReLU, conv_transpose (groups 2) -> BN, flatten -> linear -> BatchNorm1d: 3 norms."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.up = torch.nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2)
        self.bn_up = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 8 * 8, 5)
        self.bn_fc = torch.nn.BatchNorm1d(5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.bn_up(self.up(x))
        return self.bn_fc(self.fc(x.flatten(1)))


def _small_module():
    from adapters.torch.suite.zoo import randomize_calibrated_norm_stats

    torch.manual_seed(0)
    module = _Small()
    return randomize_calibrated_norm_stats(module, (3, 4, 4), torch.Generator().manual_seed(0))


def test_dynamo_export_keeps_norms_that_the_default_export_folds():
    from adapters.onnx.suite.zoo import export_keeping_bn

    module = _small_module()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    model = export_keeping_bn(module, (x,), exporter="dynamo")
    assert count_batch_norms(model) == 3
    assert {"Conv", "ConvTranspose", "Gemm"} <= {n.op_type for n in model.graph.node}
    out32, out64 = _torch_outputs(module, x.numpy())
    (onnx_out,) = run_onnxruntime(model, {model.graph.input[0].name: x.numpy()})
    judged = compare_models(onnx_out, out32, out64, "float32")
    assert judged.ok, judged.describe("onnxruntime run of the export")
    # The premise: torch.onnx.export with its defaults folds every one of them.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = torch.onnx.export(module.eval(), (x,), dynamo=True, verbose=False).model_proto
    assert count_batch_norms(default) == 0


def test_export_refuses_what_it_cannot_keep():
    from adapters.onnx.suite.zoo import export_keeping_bn

    with pytest.raises(ValueError, match="exporter must be one of"):
        export_keeping_bn(_small_module(), (torch.randn(2, 3, 4, 4),), exporter="tflite")


def test_zoo_counts_agree_with_the_torch_zoo():
    from adapters.onnx.suite.zoo import ONNX_ZOO
    from adapters.torch.suite.zoo import ZOO

    for name, entry in ONNX_ZOO.items():
        if name in ZOO:
            assert (entry.batch_norms, entry.norms_left) == (ZOO[name].norm_layers, ZOO[name].unfoldable)
    assert max(entry.parameters_m for entry in ONNX_ZOO.values()) > 100


def test_resnet18_export_folds_completely_and_verifies(resnet18):
    from adapters.onnx import fuse, verify

    entry, model, feeds = resnet18
    folded, report = fuse(model)
    assert count_batch_norms(folded) == entry.norms_left == 0
    assert len(report.folded) == entry.batch_norms and not report.skipped
    verdict = verify(model, folded, feeds)
    assert verdict.ok, str(verdict)
    assert verdict.layers_compared > 0

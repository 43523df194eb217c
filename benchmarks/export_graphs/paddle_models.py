"""Export PaddlePaddle vision models (random weights) to ONNX with paddle2onnx, BatchNormalization kept.

Runs in its own virtual environment (paddle's numpy/protobuf pins do not fit the project's)::

    python3 -m venv ../venv-paddle && ../venv-paddle/bin/pip install paddlepaddle paddle2onnx packaging
    ../venv-paddle/bin/python benchmarks/export_graphs/paddle_models.py OUT_DIR [--models resnet18,...]

Each model is built with ``pretrained=False`` from ``paddle.vision.models`` (plus one network of conv / conv-transpose /
linear blocks with biases, the layer kinds the vision zoo lacks), seeded, its BatchNorm statistics calibrated on one
random batch (momentum 0: the running statistics are that batch's) and its affine parameters drawn near 1 and 0, so
that every fold changes the weights. The input is declared ``[None, 3, None, None]`` (dims -1 in the ONNX graph, as the
shipped PaddleOCR graphs have). Two files per model: ``paddle__NAME.onnx`` exported with ``enable_optimize=False``
(every BatchNormalization kept) and, with ``--default-too``, ``paddle-default__NAME.onnx`` with paddle2onnx's defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback

import numpy as np
import paddle
import paddle2onnx
from paddle import nn
from paddle.static import InputSpec

MODELS = {
    "resnet18": ("resnet18", {}), "resnet50": ("resnet50", {}), "resnext50_32x4d": ("resnext50_32x4d", {}),
    "mobilenet_v1": ("mobilenet_v1", {}), "mobilenet_v2": ("mobilenet_v2", {}),
    "mobilenet_v3_small": ("mobilenet_v3_small", {}), "mobilenet_v3_large": ("mobilenet_v3_large", {}),
    "shufflenet_v2_x0_5": ("shufflenet_v2_x0_5", {}), "shufflenet_v2_swish": ("shufflenet_v2_swish", {}),
    "densenet121": ("densenet121", {}), "googlenet": ("googlenet", {}), "inception_v3": ("inception_v3", {}),
    "vgg11_bn": ("vgg11", {"batch_norm": True}), "squeezenet1_1": ("squeezenet1_1", {}),
}
SIZES = {"inception_v3": 96}


class Blocks(nn.Layer):
    """Conv(bias) -> BN, ConvTranspose(bias) -> BN, grouped conv -> BN, Linear -> BN1D: the bias is a separate Add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2D(8)
        self.up = nn.Conv2DTranspose(8, 8, 2, stride=2)
        self.bn2 = nn.BatchNorm2D(8)
        self.dw = nn.Conv2D(8, 8, 3, padding=1, groups=8)
        self.bn3 = nn.BatchNorm2D(8)
        self.fc = nn.Linear(8, 16)
        self.bn4 = nn.BatchNorm1D(16)

    def forward(self, x):
        x = nn.functional.relu(self.bn1(self.conv(x)))
        x = nn.functional.relu(self.bn2(self.up(x)))
        x = self.bn3(self.dw(x))
        x = paddle.mean(x, axis=[2, 3])
        return self.bn4(self.fc(x))


def build(name: str) -> nn.Layer:
    if name == "blocks":
        return Blocks()
    function, kwargs = MODELS[name]
    return getattr(paddle.vision.models, function)(pretrained=False, **kwargs)


def calibrate(model: nn.Layer, size: int, rng: np.random.Generator) -> None:
    """Running statistics of one random batch (momentum 0), affine parameters drawn near (1, 0)."""
    norms = [m for m in model.sublayers() if isinstance(m, nn.layer.norm._BatchNormBase)]
    for m in norms:
        m._momentum = 0.0
        if m.weight is not None:
            m.weight.set_value(rng.uniform(0.5, 1.5, m.weight.shape).astype("float32"))
            m.bias.set_value(rng.normal(0.0, 0.2, m.bias.shape).astype("float32"))
    model.train()
    with paddle.no_grad():
        model(paddle.to_tensor(rng.standard_normal((4, 3, size, size)).astype("float32")))
    model.eval()


def export(name: str, out_dir: str, default_too: bool, seed: int) -> None:
    paddle.seed(seed)
    model = build(name)
    calibrate(model, SIZES.get(name, 64), np.random.default_rng(seed))
    with tempfile.TemporaryDirectory() as folder:
        prefix = os.path.join(folder, "model")
        paddle.jit.save(model, prefix, input_spec=[InputSpec([None, 3, None, None], "float32", "x")])
        graph = prefix + (".json" if os.path.exists(prefix + ".json") else ".pdmodel")
        paddle2onnx.export(graph, prefix + ".pdiparams", os.path.join(out_dir, f"paddle__{name}.onnx"),
                           opset_version=13, enable_optimize=False)
        if default_too:
            paddle2onnx.export(graph, prefix + ".pdiparams", os.path.join(out_dir, f"paddle-default__{name}.onnx"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--models", default=",".join([*MODELS, "blocks"]))
    parser.add_argument("--default-too", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    failed = 0
    for name in args.models.split(","):
        try:
            export(name, args.out_dir, args.default_too, args.seed)
            print(f"exported {name}", flush=True)
        except Exception as exc:  # one model's export failure is reported, the others go on
            failed += 1
            print(f"EXPORT_FAIL {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  flush=True)
            traceback.print_exc(limit=3)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

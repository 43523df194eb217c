"""Export keras.applications models (weights=None) to ONNX with tf2onnx, for the exporter sweep.

Runs in its own virtual environment (tensorflow's numpy/protobuf pins do not fit the project's)::

    python3 -m venv ../venv-tf && ../venv-tf/bin/pip install tensorflow-cpu tf2onnx
    ../venv-tf/bin/python benchmarks/export_graphs/keras_models.py OUT_DIR [--models ResNet50,...]

Each model is built with ``weights=None`` at a small input (64x64, 75 for the Inception family), seeded, its
BatchNormalization statistics calibrated on one random batch (momentum 0: the moving statistics are that batch's) and
its affine parameters drawn near 1 and 0; then ``tf2onnx.convert.from_function`` writes ``keras__NAME.onnx`` (opset
17, batch dim dynamic). What tf2onnx emits for a Keras BatchNormalization -- a BatchNormalization node, or Mul/Add
after the conv -- is what the sweep reports.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import numpy as np
import tensorflow as tf
import tf2onnx

MODELS = ("ResNet50", "ResNet50V2", "MobileNet", "MobileNetV2", "MobileNetV3Small", "EfficientNetB0",
          "EfficientNetV2B0", "DenseNet121", "InceptionV3", "Xception", "NASNetMobile", "RegNetX002")
SIZES = {"InceptionV3": 75, "Xception": 71, "InceptionResNetV2": 75}


def calibrate(model: tf.keras.Model, size: int, rng: np.random.Generator) -> None:
    """Moving statistics of one random batch (momentum 0), affine parameters drawn near (1, 0)."""
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, tf.keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
        if layer.gamma is not None:
            layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape).astype("float32"))
        if layer.beta is not None:
            layer.beta.assign(rng.normal(0.0, 0.2, layer.beta.shape).astype("float32"))
    model(rng.standard_normal((4, size, size, 3)).astype("float32"), training=True)


def export(name: str, out_dir: str, seed: int) -> None:
    tf.keras.utils.set_random_seed(seed)
    size = SIZES.get(name, 64)
    model = getattr(tf.keras.applications, name)(weights=None, input_shape=(size, size, 3))
    calibrate(model, size, np.random.default_rng(seed))
    spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name="input"),)
    function = tf.function(lambda x: model(x, training=False), input_signature=spec)
    tf2onnx.convert.from_function(function, input_signature=spec, opset=17,
                                  output_path=os.path.join(out_dir, f"keras__{name}.onnx"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    failed = 0
    for name in args.models.split(","):
        try:
            export(name, args.out_dir, args.seed)
            print(f"exported {name}", flush=True)
        except Exception as exc:  # one model's export failure is reported, the others go on
            failed += 1
            print(f"EXPORT_FAIL {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  flush=True)
            traceback.print_exc(limit=3)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

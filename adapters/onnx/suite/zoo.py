"""ONNX exports of real networks with every BatchNormalization kept in the graph.

torch.onnx.export folds eval-mode BatchNorm on its own, by both of its exporters: the dynamo
exporter's default ``optimize=True`` runs onnxscript's optimizer, whose rewrite rules include
``fuse_batchnorm_into_conv`` / ``_conv_transpose`` / ``_gemm`` (onnxscript/rewriter/rules/common/
_fuse_batchnorm.py), and the TorchScript exporter's ``do_constant_folding=True`` folds BatchNorm
into the preceding conv in eval mode (``_jit_pass_onnx_eval_peephole``). Measured on
torchvision's resnet18 with torch 2.14: 0 of 20 BatchNormalization nodes are left either way.
:func:`export_keeping_bn` turns both off:

- ``exporter="dynamo"`` (the default; torch's recommended exporter): ``optimize=False``, then
  onnxscript's constant folding alone (without the optimizer's rewrite rules), which turns the
  zero biases that the unoptimised graph computes with Shape/Expand/CastLike for bias-free convs
  back into initializers, and drops the nodes left unused. The graph then has the same ops as an
  optimised export, with the norms left in: resnet18 has 20 Conv and 20 BatchNormalization.
- ``exporter="torchscript"`` (deprecated by torch, about 5x faster to export): ``training=
  TrainingMode.EVAL`` with ``do_constant_folding=False``. BatchNormalization is exported with
  ``training_mode=0`` (opset >= 14) or with its single output (opsets 9-13), i.e. in inference
  mode. (``TrainingMode.TRAINING`` would keep the norms too, but with ``training_mode=1``: batch
  statistics, a different function.) Identical initializers are deduplicated by that exporter
  into ``Identity`` nodes (a network with default-initialised norms shares them all; the zoo's
  randomised statistics are all distinct, only some zero-initialised biases of squeeze-excitation
  convs are shared).

Either way the export is checked (:func:`export_keeping_bn` raises otherwise): the graph has one
BatchNormalization node per norm module call, and it passes ``onnx.checker.check_model
(full_check=True)``. :data:`ONNX_ZOO` lists the networks the ONNX adapter is tested and
benchmarked on, built by ``adapters.torch.suite.zoo`` (seeded random weights, randomised and
calibrated norm statistics; nothing is downloaded).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx

from .cases import count_batch_norms

__all__ = ["export_keeping_bn", "OnnxZooEntry", "ONNX_ZOO", "EXPORTERS"]

logger = logging.getLogger(__name__)

#: The exporters :func:`export_keeping_bn` knows.
EXPORTERS = ("dynamo", "torchscript")


def _torch_batch_norm_calls(module: Any, example_inputs: tuple) -> int:
    """How many times norm modules (``_BatchNorm`` subclasses) run in one forward pass."""
    import torch

    calls = 0

    def hook(*_: Any) -> None:
        nonlocal calls
        calls += 1

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.no_grad():
            module(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _export_dynamo(module: Any, example_inputs: tuple, opset: int | None, input_names: Sequence[str] | None,
                   output_names: Sequence[str] | None) -> onnx.ModelProto:
    import onnx_ir as ir
    import onnxscript.optimizer
    import torch
    from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass

    program = torch.onnx.export(module, example_inputs, dynamo=True, optimize=False, opset_version=opset,
                                input_names=input_names, output_names=output_names, verbose=False)
    assert program is not None
    model = program.model
    # Constant folding only: the optimizer's rewrite rules (optimize=True) include the BatchNorm fusion.
    onnxscript.optimizer.fold_constants(model)
    RemoveUnusedNodesPass()(model)
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(model)
    RemoveUnusedNodesPass()(model)
    return ir.serde.serialize_model(model)


def _export_torchscript(module: Any, example_inputs: tuple, opset: int | None, input_names: Sequence[str] | None,
                        output_names: Sequence[str] | None) -> onnx.ModelProto:
    import torch

    buffer = io.BytesIO()
    torch.onnx.export(module, example_inputs, buffer, dynamo=False,  # type: ignore[arg-type]  # accepts a file object
                      training=torch.onnx.TrainingMode.EVAL, do_constant_folding=False, opset_version=opset or 17,
                      input_names=input_names, output_names=output_names)
    return onnx.load_from_string(buffer.getvalue())


def export_keeping_bn(module: Any, example_inputs: Any, *, exporter: str = "dynamo", opset: int | None = None,
                      input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None
                      ) -> onnx.ModelProto:
    """Export a torch module to ONNX with every eval-mode BatchNorm kept as a BatchNormalization node.

    Parameters
    ----------
    module : torch.nn.Module
        Exported in eval mode (its ``training`` flags are restored afterwards).
    example_inputs : tensor or tuple of tensors
        The positional inputs the graph is traced with; their shapes become the graph's (static).
    exporter : {"dynamo", "torchscript"}
        Which torch.onnx exporter (see the module docstring for the options that keep the norms).
    opset : int, optional
        ONNX opset; default: the exporter's own (18+ for dynamo, 17 for TorchScript here).
    input_names, output_names : sequence of str, optional

    Returns
    -------
    onnx.ModelProto
        Passes ``onnx.checker.check_model(full_check=True)``.

    Raises
    ------
    RuntimeError
        The export has fewer BatchNormalization nodes than the module runs norm layers (the
        exporter folded some after all), or fails the ONNX checker.
    ValueError
        Unknown ``exporter``.
    """
    import torch

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    states = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        expected = _torch_batch_norm_calls(module, inputs)
        # The exporters warn about their own deprecations and tracing details; those are not the caller's.
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            export = _export_dynamo if exporter == "dynamo" else _export_torchscript
            model = export(module, inputs, opset, input_names, output_names)
        for warning in caught:
            logger.debug("torch.onnx.export (%s): %s: %s", exporter, warning.category.__name__, warning.message)
    finally:
        for m, training in states:
            m.training = training
    found = count_batch_norms(model)
    if found < expected:
        raise RuntimeError(f"the {exporter} export has {found} BatchNormalization node(s) but the module runs "
                           f"{expected} norm layer(s): the exporter folded {expected - found}")
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as error:
        raise RuntimeError(f"the {exporter} export fails onnx.checker: {error}") from error
    return model


# --------------------------------------------------------------------------------------------------
# The zoo


@dataclass(frozen=True)
class OnnxZooEntry:
    """A network of the zoo, exported with its norms kept, and what a correct folder must leave.

    ``batch_norms`` is the number of BatchNormalization nodes in the export (one per norm module
    call) and ``norms_left`` the number a dataflow-correct folder leaves, both worked out by hand
    from the architecture (the derivations are beside :data:`ONNX_ZOO` and in
    ``adapters.torch.suite.zoo``). ``parameters`` counts the network's weights (millions).
    """

    name: str
    batch_norms: int
    norms_left: int
    parameters_m: float
    input_shape: tuple[int, int, int]
    _build: Callable[[int], Any] = field(repr=False)

    def build_module(self, seed: int = 0) -> Any:
        """The torch network: seeded random weights, randomised and calibrated norm statistics, eval mode."""
        return self._build(seed)

    def example_input(self, batch: int = 2, seed: int = 0) -> Any:
        """A seeded standard-normal float32 batch (a torch tensor)."""
        import torch

        generator = torch.Generator().manual_seed(seed + 1)
        return torch.randn((batch, *self.input_shape), generator=generator)

    def export(self, *, seed: int = 0, batch: int = 2, exporter: str = "dynamo", opset: int | None = None
               ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        """The ONNX export (norms kept, input named ``input``) and the feeds it was traced with."""
        module = self.build_module(seed)
        x = self.example_input(batch, seed)
        model = export_keeping_bn(module, (x,), exporter=exporter, opset=opset, input_names=["input"],
                                  output_names=["output"])
        model.doc_string = f"{self.name}, seed {seed}: random weights and calibrated BatchNorm statistics"
        return model, {"input": x.numpy()}


def _from_torch_zoo(name: str) -> Callable[[int], Any]:
    def build(seed: int) -> Any:
        from adapters.torch.suite import zoo

        return zoo.build(name, seed)
    return build


def _vgg16_bn(seed: int) -> Any:
    import torch
    from torch import nn

    from adapters.torch.suite import zoo

    torchvision = zoo._require("torchvision")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: nn.Module = torchvision.models.vgg16_bn(weights=None)
    generator = torch.Generator().manual_seed(seed)
    return zoo.randomize_calibrated_norm_stats(model, (3, 64, 64), generator).eval()


_SMALL = (3, 64, 64)

_ENTRIES = [
    # The counts are those of adapters.torch.suite.zoo (derived there from each architecture):
    # every norm module runs once per forward pass and becomes one BatchNormalization node, each
    # directly after its Conv in the exported graph (the exporters keep the module order).
    OnnxZooEntry("torchvision/resnet18", 20, 0, 11.7, _SMALL, _from_torch_zoo("torchvision/resnet18")),
    OnnxZooEntry("torchvision/resnet50", 53, 0, 25.6, _SMALL, _from_torch_zoo("torchvision/resnet50")),
    OnnxZooEntry("torchvision/mobilenet_v3_large", 46, 0, 5.5, _SMALL,
                 _from_torch_zoo("torchvision/mobilenet_v3_large")),
    OnnxZooEntry("torchvision/efficientnet_b0", 49, 0, 5.3, _SMALL, _from_torch_zoo("torchvision/efficientnet_b0")),
    OnnxZooEntry("torchvision/regnet_y_800mf", 47, 0, 6.4, _SMALL, _from_torch_zoo("torchvision/regnet_y_800mf")),
    # torchvision VGG-16-BN (models/vgg.py), cfg "D" with batch_norm=True: 13 x (conv3x3 -> BN ->
    # ReLU) with 5 max-pools, then AdaptiveAvgPool(7) and a Linear(25088, 4096) -> ReLU -> Dropout ->
    # Linear(4096, 4096) -> ReLU -> Dropout -> Linear(4096, 1000) classifier without norms.
    # 13 norms, each directly after its conv; 138.4 M parameters (102.8 M in the first Linear).
    OnnxZooEntry("torchvision/vgg16_bn", 13, 0, 138.4, _SMALL, _vgg16_bn),
]

#: Every ONNX zoo network by name.
ONNX_ZOO: Mapping[str, OnnxZooEntry] = MappingProxyType({entry.name: entry for entry in _ENTRIES})

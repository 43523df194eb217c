"""The folders the export audit compares with, each as ``fold_pass(program) -> result`` with the IRs it takes.

- :func:`bnfold` -- this project's :func:`adapters.export.fuse` (every IR);
- :func:`pt2e_fuse_conv_bn` -- pt2e quantization's ``_fuse_conv_bn_`` on the exported module (torchao, or
  ``torch.ao.quantization.pt2e`` where torch still ships it);
- :func:`inductor_freezing` -- ``torch.compile`` with ``torch._inductor.config.freezing`` (conv-BN folding
  by binary folding); judged on the compiled callable's outputs;
- :func:`xnnpack_fuse_batch_norm` -- ExecuTorch's XNNPACK ``FuseBatchNormPass`` on the edge dialect;
- :func:`fuse_fx` -- ``torch.ao.quantization.fuse_fx`` on a torch-level FX graph;
- :func:`fx_optimization_fuse` -- ``torch.fx.experimental.optimization.fuse`` on a torch-level FX graph.

A peer whose package does not import raises ImportError when called (the audit records a CRASH);
:func:`available` lists those that import here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram

from ..fusion import fuse

__all__ = ["bnfold", "pt2e_fuse_conv_bn", "inductor_freezing", "xnnpack_fuse_batch_norm", "fuse_fx",
           "fx_optimization_fuse", "PEERS", "available"]


def _irs(*irs: str) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    def mark(function: Callable[[Any], Any]) -> Callable[[Any], Any]:
        function.irs = irs  # type: ignore[attr-defined]
        return function
    return mark


@_irs("training", "inference", "edge", "fx")
def bnfold(program: ExportedProgram | fx.GraphModule) -> ExportedProgram | fx.GraphModule:
    """:func:`adapters.export.fuse`, the folded program only."""
    return fuse(program)[0]


def _pt2e_fuse() -> Callable[[fx.GraphModule], None]:
    for module in ("torchao.quantization.pt2e.utils", "torch.ao.quantization.pt2e.utils"):
        try:
            return importlib.import_module(module)._fuse_conv_bn_
        except ImportError:
            continue
    raise ImportError("pt2e's _fuse_conv_bn_ needs torchao (pip install --no-deps torchao)")


@_irs("training", "inference")
def pt2e_fuse_conv_bn(program: ExportedProgram) -> fx.GraphModule:
    """pt2e's ``_fuse_conv_bn_`` on ``program.module()`` (in place, as ``prepare_pt2e`` calls it)."""
    fold = _pt2e_fuse()
    module = program.module()
    fold(module)
    return module


class _Frozen(nn.Module):
    """``torch.compile(module)`` run with Inductor's freezing on and gradients off (freezing's condition)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.compiled = torch.compile(module, backend="inductor")

    def forward(self, *args: Any) -> Any:
        from torch._inductor import config
        with config.patch(freezing=True), torch.no_grad():
            return self.compiled(*args)


@_irs("training")
def inductor_freezing(program: ExportedProgram) -> nn.Module:
    """Inductor with ``freezing=True`` compiling ``program.module()``: a callable module (compiled on first call)."""
    return _Frozen(program.module())


@_irs("edge")
def xnnpack_fuse_batch_norm(program: ExportedProgram) -> ExportedProgram:
    """ExecuTorch's XNNPACK ``FuseBatchNormPass`` on an edge-dialect program, applied the way the XNNPACK
    pass manager applies it (``executorch.exir.program._program._transform``)."""
    from executorch.backends.xnnpack._passes.fuse_batch_norm import FuseBatchNormPass
    from executorch.exir.program._program import _transform
    return _transform(program, FuseBatchNormPass(program))


@_irs("fx")
def fuse_fx(model: fx.GraphModule) -> nn.Module:
    """``torch.ao.quantization.fuse_fx`` (conv/linear + BN modules) on a torch-level graph, in eval mode."""
    from torch.ao.quantization.quantize_fx import fuse_fx as fuse_modules
    return fuse_modules(model.eval())


@_irs("fx")
def fx_optimization_fuse(model: fx.GraphModule) -> nn.Module:
    """``torch.fx.experimental.optimization.fuse`` (conv + BN modules) on a torch-level graph, in eval mode."""
    from torch.fx.experimental.optimization import fuse as fuse_modules
    return fuse_modules(model.eval())


#: name in tables -> the ``module:function`` the audit loads.
PEERS = {
    "bnfold": "adapters.export.suite.peers:bnfold",
    "pt2e _fuse_conv_bn_": "adapters.export.suite.peers:pt2e_fuse_conv_bn",
    "Inductor freezing": "adapters.export.suite.peers:inductor_freezing",
    "XNNPACK FuseBatchNormPass": "adapters.export.suite.peers:xnnpack_fuse_batch_norm",
    "fuse_fx": "adapters.export.suite.peers:fuse_fx",
    "fx optimization.fuse": "adapters.export.suite.peers:fx_optimization_fuse",
}


def available() -> dict[str, str]:
    """The peers whose packages import here."""
    found = {}
    checks: dict[str, Callable[[], Any]] = {
        "pt2e _fuse_conv_bn_": _pt2e_fuse,
        "XNNPACK FuseBatchNormPass": lambda: importlib.import_module(
            "executorch.backends.xnnpack._passes.fuse_batch_norm"),
    }
    for name, spec in PEERS.items():
        try:
            checks.get(name, lambda: None)()
        except Exception:  # noqa: BLE001 -- a broken install (a missing dependency) is as good as none
            continue
        found[name] = spec
    return found

"""Other BatchNorm folders, as named functions with one calling convention each, for the audit and the benchmarks.

Each peer folds the model it is given (in place where the tool can; callers hand it a copy) and
returns the fused model:

- :func:`mmcv_fuse` -- mmcv's ``fuse_conv_bn(model)``: walks the children in registration order;
- :func:`fx_fuse` -- ``torch.fx.experimental.optimization.fuse(model, inplace=True)``: traces the
  model and folds module-call patterns of the graph;
- :func:`aimet_fold` -- Qualcomm AIMET's ``aimet_torch.batch_norm_fold.fold_all_batch_norms``:
  builds a connected graph by tracing the model on example inputs and folds BN after and before
  conv/linear layers. It needs those inputs, so it is called as ``aimet_fold(model, example_inputs)``.

The libraries are imported when a peer is first called, so this module imports without any of
them. :data:`PEERS` says how to call each one; ``python -m adapters.torch audit`` runs them as

    python -m adapters.torch audit adapters.torch.suite.peers:mmcv_fuse
    python -m adapters.torch audit adapters.torch.suite.peers:fx_fuse
    python -m adapters.torch audit adapters.torch.suite.peers:aimet_fold --with-inputs

>>> sorted(PEERS)
['aimet', 'mmcv', 'torch.fx']
>>> PEERS["aimet"].takes_inputs, PEERS["mmcv"].takes_inputs
(True, False)
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

__all__ = ["Peer", "PEERS", "mmcv_fuse", "fx_fuse", "aimet_fold", "peer_unavailable"]


def mmcv_fuse(model: nn.Module) -> nn.Module:
    """mmcv's ``fuse_conv_bn``: folds in place and returns ``model``."""
    from mmcv.cnn import fuse_conv_bn

    return fuse_conv_bn(model)


def fx_fuse(model: nn.Module) -> nn.Module:
    """torch.fx's ``fuse(model, inplace=True)``: returns a new ``GraphModule`` sharing ``model``'s folded layers."""
    from torch.fx.experimental.optimization import fuse

    return fuse(model, inplace=True)


def aimet_fold(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> nn.Module:
    """AIMET's ``fold_all_batch_norms(model, input_shapes, dummy_input)``: folds in place and returns ``model``.

    ``example_inputs`` is one tensor or a sequence of the model's positional input tensors; AIMET
    traces the model on them (its ``input_shapes`` argument is taken from their shapes).
    """
    from aimet_torch.batch_norm_fold import fold_all_batch_norms

    _aimet_logs_to_stderr()
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs:
        raise ValueError("aimet_fold needs at least one example input tensor to trace the model")
    shapes = [tuple(x.shape) for x in inputs]
    fold_all_batch_norms(model, shapes if len(shapes) > 1 else shapes[0],
                         dummy_input=inputs if len(inputs) > 1 else inputs[0])
    return model


def _aimet_logs_to_stderr() -> None:
    """Point AIMET's log handlers at stderr.

    AIMET configures its loggers (one per area: ConnectedGraph, BatchNormFolding, ...) with handlers
    writing to stdout, where its messages would land inside a report or JSON document printed there.
    """
    from aimet_torch.common.utils import AimetLogger

    # AIMET's own console handlers, whatever they write to now: they were made with whatever sys.stdout was when
    # AIMET was first imported, which need not be today's (a caller may have redirected it since). Handlers that
    # others attached (a test runner's log capture) are left alone.
    for area in AimetLogger.LogAreas:
        for handler in logging.getLogger(area.value).handlers:
            if isinstance(handler, logging.StreamHandler) and type(handler).__module__.startswith("aimet_torch."):
                try:
                    handler.setStream(sys.stderr)
                except ValueError:  # its old stream is closed (setStream flushes it first): nothing to flush
                    handler.stream = sys.stderr


@dataclass(frozen=True)
class Peer:
    """A peer fuser: its table name, the function, its calling convention and the module it needs."""

    name: str
    function: Callable[..., nn.Module]
    #: True: called as ``function(model, example_inputs)``; False: ``function(model)``.
    takes_inputs: bool
    #: The import that must succeed for the peer to run.
    library: str
    #: How to install it.
    install: str

    @property
    def spec(self) -> str:
        """The ``MODULE:FUNCTION`` name for ``python -m adapters.torch audit``."""
        return f"{__name__}:{self.function.__name__}"

    def __call__(self, model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> nn.Module:
        """Fold ``model`` with this peer, handing it ``example_inputs`` only if it takes them."""
        return self.function(model, example_inputs) if self.takes_inputs else self.function(model)


#: The peers by table name, in table order.
PEERS: Mapping[str, Peer] = MappingProxyType({
    "mmcv": Peer("mmcv", mmcv_fuse, False, "mmcv.cnn", "pip install 'bnfold[peers]' (mmcv-lite)"),
    "torch.fx": Peer("torch.fx", fx_fuse, False, "torch.fx.experimental.optimization", "part of torch"),
    "aimet": Peer("aimet", aimet_fold, True, "aimet_torch.batch_norm_fold",
                  "pip install 'bnfold[aimet]' (aimet-torch; heavy: best in its own environment)"),
})


def peer_unavailable(peer: Peer) -> str | None:
    """Why ``peer`` cannot run here (its library does not import), or None when it can."""
    try:
        importlib.import_module(peer.library)
    except Exception as error:  # a peer's import can fail on any of its dependencies, not only ImportError
        message = " ".join(str(error).split())
        detail = f"{type(error).__name__}: {message}" if message else type(error).__name__
        return f"{peer.library} does not import ({detail}); {peer.install}"
    return None

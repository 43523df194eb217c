"""Norm-layer recognition, randomisation and counting: what the case suite, its tests and the benchmarks use to
build reproducible models and count what a fuser left."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ...norms import is_norm

#: "Is this module a norm?" -- the adapter's one predicate (:func:`adapters.torch.norms.is_norm`), under the
#: name the case suite has always exported.
is_norm_module = is_norm


def norm_module_names(model: nn.Module) -> list[str]:
    """Qualified names of the norm-like modules in ``model`` (each module once)."""
    return [name for name, module in model.named_modules() if is_norm_module(module)]


def _uniform(shape: torch.Size | tuple[int, ...], low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def _fan_in(module: nn.Module, weight: torch.Tensor) -> int:
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        # ConvTranspose weights are [in, out/groups, *k]: each output sums over in/groups * prod(k) taps at most.
        return max(1, weight.shape[0] // module.groups * math.prod(weight.shape[2:]))
    return max(1, weight[0].numel())


@torch.no_grad()
def randomize_parameters(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Redraw every parameter of the non-norm modules from ``generator``, in place.

    Weights are uniform with unit variance per output (scale ``sqrt(3 / fan_in)``), biases
    uniform in [-0.5, 0.5], so activations stay of order one through the tiny models.
    """
    for module in model.modules():
        if is_norm_module(module):
            continue
        for name, param in module.named_parameters(recurse=False):
            if name == "weight" and param.dim() >= 2:
                bound = math.sqrt(3.0 / _fan_in(module, param))
            else:
                bound = 0.5
            param.copy_(_uniform(param.shape, -bound, bound, generator))
    return model


@torch.no_grad()
def randomize_norm_stats(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every norm-like module random statistics and affine parameters, in place.

    ``running_mean ~ N(0, 1) * 0.5``, ``running_var ~ U(0.5, 2)``, ``|weight| ~ U(0.5, 1.5)``
    with a negative sign one time in four (a fold that mishandles the sign of gamma must show),
    ``bias ~ N(0, 1) * 0.5``. Modules without running statistics keep their (absent) buffers.
    """
    for module in model.modules():
        if not is_norm_module(module):
            continue
        mean = getattr(module, "running_mean", None)
        var = getattr(module, "running_var", None)
        if mean is not None and var is not None:
            mean.copy_(0.5 * torch.randn(mean.shape, generator=generator, dtype=torch.float64))
            var.copy_(_uniform(var.shape, 0.5, 2.0, generator))
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            sign = torch.where(torch.rand(weight.shape, generator=generator, dtype=torch.float64) < 0.25, -1.0, 1.0)
            weight.copy_(sign * _uniform(weight.shape, 0.5, 1.5, generator))
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(0.5 * torch.randn(bias.shape, generator=generator, dtype=torch.float64))
    return model


def count_calls(model: nn.Module, *inputs: torch.Tensor,
                counted: Callable[[nn.Module], bool] = lambda module: True) -> int:
    """Forward calls of the modules ``counted`` selects (every module by default, the model itself too)
    during one ``model(*inputs)`` (no grad); a module called twice counts twice."""
    calls = 0

    def hook(module: nn.Module, args: tuple) -> None:
        nonlocal calls
        calls += bool(counted(module))

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        handle.remove()
    return calls


def count_norm_calls(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Number of forward calls of norm-like modules during one ``model(*inputs)`` (no grad)."""
    return count_calls(model, *inputs, counted=is_norm_module)

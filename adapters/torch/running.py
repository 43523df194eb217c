"""Running users' models: in eval mode without changing them, and describing what they were given.

Folding assumes eval semantics, so every run of a user's model here -- tracing, the observation
run with example inputs, verify's reference and comparison runs, the demo's timing -- happens in
eval mode; afterwards every module's own ``training`` flag is as it was, mixed flags included.
When a run fails, the error names the model and the inputs' shapes (:func:`describe_inputs`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["eval_mode", "as_args", "describe_inputs", "meta_tensors", "listed", "copy_model"]


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every module of ``models`` has ``training = False`` inside the block; each flag is restored after it.

    The flags are set directly rather than through ``Module.eval()``, so a model's own ``train()``
    override is not run. Restored even when the block raises.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.BatchNorm1d(2)).train()
    >>> with eval_mode(model):
    ...     model.training, model[0].training
    (False, False)
    >>> model.training, model[0].training
    (True, True)
    """
    flags = [(module, module.training) for model in models for module in model.modules()]
    try:
        for module, _ in flags:
            module.training = False
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def as_args(example_inputs: Any, what: str = "example_inputs") -> tuple:
    """The positional arguments a model is called with: a tensor is one argument, a tuple or list is several.

    Anything else (a dict, a custom object) is one argument too; wrap a single tuple argument in a
    tuple of its own: ``((a, b),)``.
    """
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    if example_inputs is None:
        raise TypeError(f"{what} is None: pass a tensor or a tuple of tensors")
    return (example_inputs,)


def describe_inputs(args: tuple) -> str:
    """Shapes, dtypes and devices of a model's arguments, for error messages.

    >>> describe_inputs((torch.zeros(2, 3), [torch.zeros(1, dtype=torch.int64)], 4))
    '(tensor (2, 3) float32 cpu, [tensor (1,) int64 cpu], int)'
    """
    def one(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')} {value.device}"
        if isinstance(value, (tuple, list)):
            inner = ", ".join(one(v) for v in value)
            return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k!r}: {one(v)}" for k, v in value.items()) + "}"
        return type(value).__name__
    return one(tuple(args))


def meta_tensors(model: nn.Module) -> list[str]:
    """``name (ModuleClass, shape ...)`` of each of the model's parameters and buffers on the meta device.

    Meta tensors have a shape but no values: nothing can be folded or run with them.
    """
    found = []
    for name, module in model.named_modules():
        for tensors in (module._parameters, module._buffers):
            for tname, tensor in tensors.items():
                if tensor is not None and tensor.is_meta:
                    qualified = f"{name}.{tname}" if name else tname
                    found.append(f"{qualified} ({type(module).__name__}, shape {tuple(tensor.shape)})")
    return found


def listed(items: list[str], limit: int = 10) -> str:
    """The first ``limit`` items, comma-separated, with ``...`` when there are more."""
    return ", ".join(items[:limit]) + (" ..." if len(items) > limit else "")


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also for models that keep a computed tensor as a module attribute.

    ``torch.nn.utils.weight_norm`` and ``spectral_norm`` (the hook-based versions) store the weight
    they compute from their parameters as a plain attribute, a tensor with autograd history,
    which ``copy.deepcopy`` refuses. Such attributes are copied detached (the copy's hook
    recomputes them before its next forward); the original keeps its own.
    """
    computed = [(module, name, value) for module in model.modules() for name, value in vars(module).items()
                if isinstance(value, torch.Tensor) and not value.is_leaf]
    try:
        for module, name, value in computed:
            vars(module)[name] = value.detach()
        return copy.deepcopy(model)
    finally:
        for module, name, value in computed:
            vars(module)[name] = value

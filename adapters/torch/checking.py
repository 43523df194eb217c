"""Verify a fused model against the float64 reference run of the original.

:func:`verify` judges a fused model -- produced by this project or by any other tool -- with the
project's error model for whole networks (:func:`refimpl.compare_models`): the original is run
in float64 (the reference) and in the compute dtype (its own error), the fused model in the
compute dtype, and the fused model passes when its relative RMS error is within
:data:`refimpl.MODEL_RATIO` times the original's own.

The same test is applied per layer, wherever the fused and the original model have a module
under the same qualified name whose output should not change when norms are folded: containers
and blocks, activations, pooling and other leaves. Conv, linear and norm layers are not compared
(folding legitimately changes a conv's output, and a norm replaced by ``nn.Identity`` passes on
something else when it was folded into the *following* conv), and neither is any output that is
just such a layer's result handed on unchanged (a ``nn.Sequential`` ending in a conv whose norm
sits in the next ``Sequential``) or concatenated with others (timm's ``MixedConv2d`` returns
``torch.cat`` of its convs' outputs, and the norm after it may be folded into those convs).
The first module in execution order whose output breaks the error model is named, with the
conv/linear/norm layers that ran just before it as suspects.

Neither model is modified: the reference is a deep copy, and the two models are run in eval
mode under ``torch.no_grad()`` with every module's ``training`` flag restored afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from refimpl import compare_models, unit_roundoff

from ..verdict import LayerDivergence, ModelRunError, OutputCheck, Verdict
from .graph import CONCAT_FUNCTIONS
from .norms import is_norm
from .running import as_args, copy_model, describe_inputs, eval_mode, listed, meta_tensors

__all__ = ["verify", "rounded_copy", "Verdict", "OutputCheck", "LayerDivergence", "ModelRunError"]

logger = logging.getLogger(__name__)

_CONV_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)
#: Leaves that return their input unchanged in eval mode; a folded layer's output passes through them.
_TRANSPARENT = (nn.Identity, nn.modules.dropout._DropoutNd)


# --------------------------------------------------------------------------------------------------
# Module kinds and output flattening


def _changes_with_folding(module: nn.Module) -> bool:
    return isinstance(module, _CONV_LINEAR) or is_norm(module)


def _parametrization_modules(modules: dict[str, nn.Module]) -> set[str]:
    """Names of the modules inside any ``parametrizations`` of a model (torch.nn.utils.parametrize)."""
    roots = [name for name, module in modules.items() if isinstance(module, parametrize.ParametrizationList)]
    return {name for name in modules for root in roots if name == root or name.startswith(root + ".")}


def _kind(original: nn.Module | None, fused: nn.Module | None) -> str:
    """How a module name is treated: 'changed' (not compared), 'transparent', 'container' or 'leaf'."""
    present = [m for m in (original, fused) if m is not None]
    if any(_changes_with_folding(m) for m in present):
        return "changed"
    reference = present[0]  # the original's module when it has one
    if isinstance(reference, _TRANSPARENT):
        return "transparent"
    if next(reference.children(), None) is not None:
        return "container"
    return "leaf"


def _flatten(obj: Any, path: str = "output") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _flatten(value, f"{path}[{key!r}]")
    elif isinstance(obj, (tuple, list)):
        for i, value in enumerate(obj):
            yield from _flatten(value, f"{path}[{i}]")


def _map_tensors(obj: Any, fn) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _map_tensors(v, fn)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _reference_device(model: nn.Module) -> torch.device:
    tensor: torch.Tensor | None = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    # MPS has no float64; the reference then runs on the CPU.
    return torch.device("cpu") if device.type == "mps" else device


# --------------------------------------------------------------------------------------------------
# Recording one run


@dataclass
class _Run:
    output: Any = None
    order: list[tuple[str, int]] = field(default_factory=list)           # hook completion order
    calls: dict[str, int] = field(default_factory=dict)                  # name -> number of calls
    outputs: dict[tuple[str, int], dict[str, torch.Tensor]] = field(default_factory=dict)


class _FoldedValues:
    """Tensors whose values are a folded layer's output (or a concat of one), handed on unchanged.

    A tensor that is a conv/linear/norm output, handed on unchanged, is identified by its object
    and its version counter: an in-place op (ReLU(inplace=True), ``out += identity``) bumps the
    version, after which the values are no longer just the folded layer's.
    """

    def __init__(self) -> None:
        self._marked: set[tuple[int, int]] = set()
        self._keep_alive: list[torch.Tensor] = []  # so that ids in ``_marked`` are not reused during the run

    def __bool__(self) -> bool:
        return bool(self._marked)

    def mark(self, tensor: torch.Tensor) -> None:
        self._marked.add((id(tensor), tensor._version))
        self._keep_alive.append(tensor)

    def holds(self, tensor: torch.Tensor) -> bool:
        return (id(tensor), tensor._version) in self._marked


class _ConcatMarks(torch.overrides.TorchFunctionMode):
    """Marks ``torch.cat`` of any folded layer's output: those channels change with folding too."""

    def __init__(self, folded: _FoldedValues):
        super().__init__()
        self.folded = folded

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in CONCAT_FUNCTIONS and self.folded:
            parts = args[0] if args else kwargs.get("tensors", ())
            if isinstance(out, torch.Tensor) and any(isinstance(t, torch.Tensor) and self.folded.holds(t)
                                                     for t in parts):
                self.folded.mark(out)
        return out


def _recording_hook(run: _Run, folded: _FoldedValues, name: str, kind: str, per_layer: bool):
    """A forward hook for module ``name`` of the given kind (see :func:`_kind`): records the call and,
    with ``per_layer``, the outputs that should not change with folding."""
    def hook(module, args, output):
        call = run.calls.get(name, 0)
        run.calls[name] = call + 1
        tensors = list(_flatten(output))
        run.order.append((name, call))
        if kind == "changed":
            for _, t in tensors:
                folded.mark(t)
            return
        if kind == "transparent" and any(folded.holds(t) for _, t in _flatten(args)):
            for _, t in tensors:
                folded.mark(t)
        if not per_layer:
            return
        run.outputs[(name, call)] = {path: t.detach().clone() for path, t in tensors
                                     if t.is_floating_point() and (kind == "leaf" or not folded.holds(t))}
    return hook


def _run(model: nn.Module, inputs: tuple, kinds: dict[str, str], per_layer: bool, which: str) -> _Run:
    """Run ``model`` once in eval mode under no_grad, recording comparable module outputs."""
    run = _Run()
    folded = _FoldedValues()
    handles = [module.register_forward_hook(_recording_hook(run, folded, name, kinds[name], per_layer))
               for name, module in model.named_modules() if name in kinds]
    try:
        with eval_mode(model), torch.no_grad(), (_ConcatMarks(folded) if per_layer else contextlib.nullcontext()):
            try:
                run.output = model(*inputs)
            except Exception as error:  # any failure of a user's model is reported, naming the model
                raise ModelRunError(which, error, type(model).__qualname__,
                                    describe_inputs(inputs) if inputs else "") from error
    finally:
        for handle in handles:
            handle.remove()
    return run


# --------------------------------------------------------------------------------------------------
# Comparisons


def _judge(fused: torch.Tensor, unfused: torch.Tensor, reference: torch.Tensor,
           perturbed: Sequence[torch.Tensor] = ()) -> tuple[Any, float, str]:
    if fused.shape != reference.shape or unfused.shape != reference.shape:
        return None, math.inf, (f"shape {tuple(fused.shape)} in the fused model vs {tuple(reference.shape)} "
                                f"in the original")
    perturbed = [t for t in perturbed if t.shape == reference.shape]
    result = compare_models(fused, unfused, reference, fused.dtype, perturbed=perturbed)
    max_abs = float((fused.detach().double() - reference.detach().double().to(fused.device)).abs().max()) \
        if fused.numel() else 0.0
    if math.isnan(max_abs):
        max_abs = math.inf
    return result, max_abs, ""


def _check_outputs(fused: Any, unfused: Any, reference: Any, perturbed: Sequence[Any] = ()
                   ) -> tuple[list[OutputCheck], list[str]]:
    notes: list[str] = []
    f_items = dict(_flatten(fused))
    u_items = dict(_flatten(unfused))
    r_items = dict(_flatten(reference))
    p_items = [dict(_flatten(p)) for p in perturbed]
    checks = []
    if set(f_items) != set(r_items):
        checks.append(OutputCheck("output", False, math.inf, 0.0, 0.0, math.inf, math.inf,
                                  f"output structure differs: fused has {sorted(f_items)}, original {sorted(r_items)}"))
        return checks, notes
    if not r_items:
        raise TypeError(f"the model returned {type(reference).__name__}, which holds no tensor to compare")
    for path, ref in r_items.items():
        fus, unf = f_items[path], u_items[path]
        if not unf.is_floating_point():
            # Integer outputs (argmax, indices) may legitimately flip on near-ties; they are not judged.
            notes.append(f"{path} is {unf.dtype}, not compared")
            continue
        result, max_abs, detail = _judge(fus, unf, ref, [p[path] for p in p_items if path in p])
        if result is None:
            checks.append(OutputCheck(path, False, math.inf, 0.0, 0.0, math.inf, math.inf, detail))
        else:
            checks.append(OutputCheck(path, result.ok, result.fused_error, result.unfused_error, result.limit,
                                      result.ratio, max_abs))
    return checks, notes


def _first_divergence(fused: _Run, unfused: _Run, reference: _Run, kinds: dict[str, str],
                      perturbed: Sequence[_Run] = ()) -> tuple[LayerDivergence | None, int, list[str]]:
    compared = 0
    not_compared = sorted(name for name, count in fused.calls.items()
                          if kinds.get(name) != "changed"
                          and (reference.calls.get(name) != count or unfused.calls.get(name) != count))
    skip = set(not_compared)
    suspects: list[str] = []
    for name, call in fused.order:
        if kinds.get(name) == "changed":
            suspects.append(name)
            continue
        if name in skip:
            continue
        f_out = fused.outputs.get((name, call), {})
        u_out = unfused.outputs.get((name, call), {})
        r_out = reference.outputs.get((name, call), {})
        paths = [p for p in r_out if p in f_out and p in u_out]
        if not paths:
            continue
        compared += 1
        p_outs = [p.outputs.get((name, call), {}) for p in perturbed]
        for path in paths:
            result, max_abs, detail = _judge(f_out[path], u_out[path], r_out[path],
                                             [p[path] for p in p_outs if path in p])
            if result is None:
                return LayerDivergence(name, call, path, math.inf, 0.0, 0.0, math.inf, math.inf,
                                       tuple(suspects[-4:]), detail), compared, not_compared
            if not result.ok:
                return LayerDivergence(name, call, path, result.fused_error, result.unfused_error, result.limit,
                                       result.ratio, max_abs, tuple(suspects[-4:])), compared, not_compared
        suspects.clear()
    return None, compared, not_compared


# --------------------------------------------------------------------------------------------------


def rounded_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose floating parameters and buffers are each rounded once more.

    Every element is multiplied by ``1 + delta``, ``delta`` uniform in ``[-u, u]`` for the tensor's
    own dtype, and stored back in that dtype: the perturbation a fused model's folded parameters
    carry by being rounded to the dtype. Its output is the ``perturbed`` baseline of
    :func:`refimpl.compare_models`.
    """
    copied = copy_model(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(copied.parameters()) + list(copied.buffers()):
            if tensor.is_floating_point() and tensor.numel():
                u = unit_roundoff(tensor.dtype)
                delta = (torch.rand(tensor.shape, generator=generator, dtype=torch.float64) * 2 - 1) * u
                tensor.copy_(tensor.double() * (1 + delta.to(tensor.device)))
    return copied


def _refuse_meta(original: nn.Module, fused: nn.Module, inputs: tuple) -> None:
    """One clear error for meta tensors (a shape, no values): in either model, or among the inputs."""
    for which, model in (("original", original), ("fused", fused)):
        meta = meta_tensors(model)
        if meta:
            raise ValueError(f"verify: the {which} model ({type(model).__qualname__}) has tensors on the meta device, "
                             f"which hold no values to run; materialise it first (e.g. load a state_dict with "
                             f"assign=True). Meta tensors: {listed(meta)}")
    if any(t.is_meta for _, t in _flatten(inputs)):
        raise ValueError(f"verify: the inputs {describe_inputs(inputs)} include tensors on the meta device, which "
                         "hold no values to run the models on")


def verify(original: nn.Module, fused: nn.Module, example_inputs: Any = None, *more_inputs: Any,
           per_layer: bool = True, rounding_trials: int = 3) -> Verdict:
    """Check a fused model against the float64 reference run of the original model.

    Parameters
    ----------
    original : nn.Module
        The model before fusion, in its compute dtype (its output in that dtype is the error
        baseline the fused model is held to).
    fused : nn.Module
        The fused model, from this project or any other tool (an ``fx.GraphModule`` is fine).
    example_inputs : tensor or tuple of tensors
        What both models are called with, as for :func:`adapters.torch.fuse`: a tensor is the one
        argument, a tuple or list holds several positional arguments (each a tensor, or a
        tuple/list/dict of tensors); a model taking a single tuple gets ``((a, b),)``. Passing
        several inputs as further positional arguments still works but is deprecated.
    per_layer : bool
        Also compare corresponding intermediate modules and name the first that diverges. Costs
        memory for every compared module's output; turn off for very large inputs.
    rounding_trials : int
        How many copies of the original with every parameter rounded once more (:func:`rounded_copy`)
        are run as the error baseline besides the original itself: the fused model's parameters
        are necessarily rounded once, and some networks are far more sensitive to that than to
        the rounding of their activations.

    Returns
    -------
    Verdict
        ``ok``, the per-output errors (``ratio`` = fused error / unfused error, ``max_abs_error``),
        the first diverging layer if any; ``str()`` prints it, ``to_dict()`` gives plain data.

    Raises
    ------
    TypeError
        A model is not an ``nn.Module`` (or is TorchScript); the original cannot be copied.
    ValueError
        No inputs; a model or an input on the meta device (named, with shapes).
    ModelRunError
        Running a model raised; the message names the model and the inputs' shapes.

    Notes
    -----
    The reference is a copy of the original in float64 run on the inputs converted to float64,
    on the original's device (the CPU for MPS). Both models are run in eval mode; the error model
    is :func:`refimpl.compare_models` applied to each floating-point output tensor.
    """
    for name, model in (("original", original), ("fused", fused)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"verify: {name} must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, torch.jit.ScriptModule):
            raise TypeError(f"verify: the {name} model is a TorchScript module; pass the eager nn.Module")
    if more_inputs:
        warnings.warn("verify(original, fused, x, y, ...) is deprecated: pass several inputs as one tuple, "
                      "verify(original, fused, (x, y))", DeprecationWarning, stacklevel=2)
        example_inputs = (example_inputs, *more_inputs)
    if example_inputs is None:
        raise ValueError("verify: pass example_inputs (a tensor or a tuple of tensors; the models are run on it)")
    inputs = as_args(example_inputs)
    _refuse_meta(original, fused, inputs)

    originals = dict(original.named_modules())
    fuseds = dict(fused.named_modules())
    kinds = {name: _kind(originals[name], fuseds[name]) for name in originals.keys() & fuseds.keys()}
    # A parametrization computes a layer's weight (weight_norm's g * v / ||v||): folding changes it too.
    for name in _parametrization_modules(originals) | _parametrization_modules(fuseds):
        kinds[name] = "changed"
    # What runs inside a layer that changes with folding changes too: the drop/act children of a norm folded
    # forward into the next layer (bn->conv) see the un-normalised input.
    changed = {name for name, kind in kinds.items() if kind == "changed" and name}
    for name in kinds:
        parts = name.split(".")
        if any(".".join(parts[:depth]) in changed for depth in range(1, len(parts))):
            kinds[name] = "changed"
    # The fused model's own conv/linear/norm layers are never compared (names it added included),
    # but their outputs must be tracked so that what merely hands them on is not compared either.
    kinds.update({name: "changed" for name, m in fuseds.items() if name not in kinds and _changes_with_folding(m)})
    kinds_original = {**kinds, **{name: "changed" for name, m in originals.items()
                                  if name not in kinds and _changes_with_folding(m)}}

    device = _reference_device(original)
    try:
        reference_model = copy_model(original)
    except Exception as error:
        raise TypeError(f"verify: cannot deep-copy the original model for the float64 reference: "
                        f"{type(error).__name__}: {error}") from error
    reference_model.to(device=device, dtype=torch.float64)
    reference_inputs = _map_tensors(inputs, lambda t: t.to(device=device, dtype=torch.float64)
                                    if t.is_floating_point() else t.to(device))

    reference = _run(reference_model, reference_inputs, kinds_original, per_layer, "reference")
    del reference_model
    unfused = _run(original, inputs, kinds_original, per_layer, "original")
    fused_run = _run(fused, inputs, kinds, per_layer, "fused")
    perturbed = [_run(rounded_copy(original, seed), inputs, kinds_original, per_layer, "original")
                 for seed in range(rounding_trials)]

    outputs, notes = _check_outputs(fused_run.output, unfused.output, reference.output, [p.output for p in perturbed])
    divergence, compared = None, 0
    not_compared: list[str] = []
    if per_layer:
        divergence, compared, not_compared = _first_divergence(fused_run, unfused, reference, kinds, perturbed)
    ok = all(o.ok for o in outputs) and divergence is None
    dtype = next((str(t.dtype).removeprefix("torch.") for _, t in _flatten(unfused.output)
                  if t.is_floating_point()), "unknown")
    verdict = Verdict(ok=ok, dtype=dtype, outputs=tuple(outputs), first_divergence=divergence,
                      layers_compared=compared, layers_not_compared=tuple(not_compared), notes=tuple(notes))
    logger.debug("verify: %s", verdict)
    return verdict

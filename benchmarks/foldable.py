"""An independent count of the BatchNorm calls a model makes that are exactly foldable, from a recorded run.

This module does not use ``adapters/``: it is the oracle the real-code sweep
(``benchmarks/sweep_realcode.py``) holds the torch adapter's fold count against. It runs the
model once, in eval mode, under a :class:`torch.overrides.TorchFunctionMode` that records every
torch function and tensor method called (with the module whose forward was running), and then
applies the rules of ``spec/folding.md`` to the recorded calls.

What is a BN call
    A call of a *BN-like module*: torch's ``_BatchNorm`` layers (``nn.BatchNorm*``, ``SyncBatchNorm``,
    also with ``track_running_stats=False``), and any module with its own ``running_mean`` and
    ``running_var`` tensor buffers (``FrozenBatchNorm2d`` and its copies under any class name,
    custom modules that call ``F.batch_norm`` on their own statistics), counted
    where it is not called inside another BN-like module's forward; and a ``batch_norm`` function
    call with running statistics made outside every BN-like module (a model's forward calling
    ``F.batch_norm`` itself; calls without running statistics, such as BiT's weight standardisation,
    normalise something else and are not counted).

When a BN call is exactly foldable
    It normalises with running statistics (the module is not ``track_running_stats=False``; the
    functional call gets ``running_mean``/``running_var`` and ``training=False``), its input and
    output have the same shape, its statistics have one entry per channel of axis 1, and one of:

    * **layer -> BN** (spec 3.1-3.3): its input tensor is *the very tensor object* a
      ``conv{1,2,3}d``, ``conv_transpose{1,2,3}d`` or ``linear`` call returned, and
      - that call's weight is a parameter of the model (not a computed tensor: a parametrized or
        hooked weight is not), read by no other recorded call (the layer runs once, its weight is
        not tied), and its bias is ``None`` or such a parameter too;
      - the layer's output channels (``weight.shape[0]``; ``weight.shape[1] * groups`` transposed)
        are the BN's channels; for ``linear`` the tensor is 2-D (spec 4.5), or a ``flatten`` /
        ``reshape`` / ``view`` of the linear's output into 2-D rows that keeps its last axis (LeViT's
        ``x.flatten(0, 1)`` of token features), that output read by nothing else;
      - the tensor has no consumer besides this BN call: no recorded call outside the BN's own
        forward reads it (views, in-place ops and ``torch.cat`` count; reading only its shape,
        dtype or device does not), and it is not an output of the model;
    * **BN -> layer** (spec 3.4-3.5, 4.1-4.2): its output tensor has exactly one consumer, a
      ``conv{1,2,3}d`` call that reads no zero padding (``padding`` 0 or ``"valid"``, or
      ``"same"`` with a 1-sized kernel) or a ``linear`` call on a 2-D tensor, possibly through one
      ``F.pad`` in ``reflect``/``replicate``/``circular`` mode (which commutes with a per-channel
      affine map), with the same weight conditions; never a transposed conv.

    A call whose result is the very input object and that is not in-place (``nn.Identity``,
    ``dropout`` in eval mode, ``.contiguous()`` of a contiguous tensor, ``.to()`` a dtype it has)
    is transparent: it is neither a consumer nor a break (spec 4.4). A BN module called several
    times is foldable only if every one of its calls is (one module is replaced as a whole); its
    calls are then all counted.

What the count cannot see
    One recorded run is one path through the model's Python: a fold that a different input would
    invalidate (a branch taken only for other shapes) is counted from the path recorded. Calls that
    bypass ``__torch_function__`` (C++ extensions, TorchScript) are not seen, so a consumer there
    would be missed; none of the swept libraries do this on the eval path. A BN before a conv that
    zero-pads is counted as not foldable even where its shift happens to be zero.

>>> import torch
>>> from torch import nn
>>> m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
>>> count = count_foldable(m, torch.randn(2, 3, 9, 9))
>>> count.bn_calls, count.foldable
(2, 2)
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["FoldableCount", "count_foldable", "is_bn_like"]

#: Calls that only read a tensor's metadata: not a use of its values.
_METADATA = frozenset({
    "size", "dim", "ndim", "ndimension", "shape", "dtype", "device", "is_floating_point", "is_complex", "numel",
    "nelement", "element_size", "stride", "is_contiguous", "requires_grad", "is_cuda", "is_sparse", "is_quantized",
    "is_meta", "layout", "names", "data_ptr", "storage_offset", "get_device", "__len__", "grad_fn", "is_leaf",
    "_version", "__hash__", "__format__", "__repr__", "grad", "_base",
    "is_nested", "is_mkldnn", "output_nr", "_cdata", "has_names", "is_inference", "is_mps",
    "is_xpu", "is_ipu", "is_vulkan", "is_xla", "is_mtia", "is_maia", "untyped_storage", "itemsize", "nbytes",
})
_CONV = frozenset({"conv1d", "conv2d", "conv3d"})
_CONV_T = frozenset({"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"})
_LAYER = _CONV | _CONV_T | {"linear"}
_COMMUTING_PAD = frozenset({"reflect", "replicate", "circular"})
_MERGING_VIEWS = frozenset({"flatten", "reshape", "view"})
#: Methods whose other tensor argument gives only a shape or dtype: ``x.reshape_as(y)`` does not read ``y``.
_SHAPE_OF_OTHER = frozenset({"reshape_as", "view_as", "expand_as", "type_as"})


def is_bn_like(module: nn.Module) -> bool:
    """A torch ``_BatchNorm`` (also with ``track_running_stats=False``) or a module with its own ``running_mean``
    and ``running_var`` tensor buffers."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    buffers = module._buffers
    return isinstance(buffers.get("running_mean"), torch.Tensor) and isinstance(buffers.get("running_var"),
                                                                                torch.Tensor)


def _name(func: Any) -> str:
    name = getattr(func, "__name__", None)
    if name == "__get__":  # a Tensor property (x.shape, x.T, ...): its name is the descriptor's
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", None) or getattr(getattr(owner, "fget", None), "__name__", "__get__")
    return str(name or func)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)
    else:
        to_tuple = getattr(obj, "to_tuple", None)  # transformers' ModelOutput and similar records
        if callable(to_tuple):
            yield from _tensors(to_tuple())


def _freeze(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_freeze(item) for item in obj]
    if isinstance(obj, tuple) and type(obj) is tuple:
        return tuple(_freeze(item) for item in obj)
    if type(obj) is dict:
        return {key: _freeze(value) for key, value in obj.items()}
    return obj


@dataclass
class _Call:
    """One recorded torch function call: which function, its arguments and result, inside which modules."""

    index: int
    name: str
    args: tuple
    kwargs: dict
    result: Any
    stack: tuple[int, ...]  # ids of the modules whose forward was running, outermost first

    def arg(self, position: int, keyword: str, default: Any = None) -> Any:
        if keyword in self.kwargs:
            return self.kwargs[keyword]
        return self.args[position] if len(self.args) > position else default


@dataclass
class _ModuleCall:
    module: nn.Module
    name: str
    inputs: tuple
    output: Any = None
    first: int = 0   # index of the first recorded call inside this module call
    last: int = 0    # one past the last


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[_Call] = []
        self.stack: list[int] = []

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = _name(func)
        if name not in _METADATA:  # containers copied: a list argument appended to later (DenseNet) stays as it was
            self.calls.append(_Call(len(self.calls), name, _freeze(args), _freeze(kwargs), _freeze(result),
                                    tuple(self.stack)))
        return result


@dataclass
class FoldableCount:
    """What one recorded run found: BN calls, how many are exactly foldable, and why the others are not."""

    bn_calls: int = 0
    foldable: int = 0
    #: BN-like modules (qualified names) and how many calls each made.
    modules: dict[str, int] = field(default_factory=dict)
    #: Why calls are not foldable, counted by a short rule name.
    not_foldable: dict[str, int] = field(default_factory=dict)
    #: BN calls of each direction that are foldable: ``{"layer->bn": n, "bn->layer": m}``.
    directions: dict[str, int] = field(default_factory=dict)
    #: Class names of the BN-like modules that are not torch's ``_BatchNorm``.
    other_classes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"bn_calls": self.bn_calls, "foldable": self.foldable, "bn_modules": len(self.modules),
                "not_foldable": dict(self.not_foldable), "directions": dict(self.directions),
                "other_classes": dict(self.other_classes)}


@contextlib.contextmanager
def _module_calls(model: nn.Module, recorder: _Recorder, out: list[_ModuleCall]) -> Iterator[None]:
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    open_calls: list[_ModuleCall] = []
    handles = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = _ModuleCall(module, names.get(id(module), type(module).__name__), tuple(args) + tuple(kwargs.values()),
                           first=len(recorder.calls))
        open_calls.append(call)
        recorder.stack.append(id(module))

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        # Pop to this module's own call (a forward that raised inside a child leaves nothing open here).
        while open_calls and open_calls[-1].module is not module:
            open_calls.pop()
            recorder.stack.pop()
        if not open_calls:
            return
        call = open_calls.pop()
        recorder.stack.pop()
        call.output, call.last = output, len(recorder.calls)
        out.append(call)

    for module in {id(m): m for m in model.modules()}.values():
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _zero_padding_read(call: _Call) -> bool:
    """Whether a conv call pads with zeros (``padding`` not 0 / ``"valid"``, or ``"same"`` with a kernel > 1)."""
    padding = call.arg(4, "padding", 0)
    if isinstance(padding, str):
        if padding == "valid":
            return False
        weight = call.arg(1, "weight")
        return any(k > 1 for k in tuple(weight.shape[2:]))
    values = (padding,) if isinstance(padding, int) else tuple(padding)
    return any(int(v) != 0 for v in values)


class _Analysis:
    def __init__(self, model: nn.Module, calls: list[_Call], module_calls: list[_ModuleCall], outputs: Any) -> None:
        self.calls = calls
        self.params = {id(p) for p in model.parameters()}
        self.bn_ids = {id(m) for m in model.modules() if is_bn_like(m)}
        # tensor id -> indices of the recorded calls that read it (argument anywhere, nested in lists too)
        self.readers: dict[int, list[int]] = collections.defaultdict(list)
        # tensor id -> index of the recorded call that returned it (the last, if several returned the same object)
        self.producer: dict[int, int] = {}
        self.transparent: set[int] = set()
        for call in calls:
            inputs = list(_tensors((call.args, call.kwargs)))
            if call.name in _SHAPE_OF_OTHER and call.args:  # x.reshape_as(y) reads only y's shape
                inputs = [inputs[0]] if inputs and inputs[0] is call.args[0] else inputs
            result_ids = {id(t) for t in _tensors(call.result)}
            if self._is_transparent(call, inputs, result_ids):
                self.transparent.add(call.index)
                continue
            for t in {id(t): t for t in inputs}:
                self.readers[t].append(call.index)
            for t in result_ids:
                self.producer[t] = call.index
        self.outputs = {id(t) for t in _tensors(outputs)}
        self.module_calls = module_calls
        #: output tensor id of a BN call found foldable layer -> BN: a BN reading only it folds too (conv -> BN -> BN)
        self.folded_outputs: dict[int, str] = {}

    @staticmethod
    def _is_transparent(call: _Call, inputs: list[torch.Tensor], result_ids: set[int]) -> bool:
        if not isinstance(call.result, torch.Tensor) or not inputs or id(inputs[0]) not in result_ids:
            return False
        if call.name.startswith("dropout") or call.name.endswith("dropout"):
            return call.arg(2, "training", True) is False or call.arg(2, "train", True) is False
        in_place = call.name.endswith("_") and not call.name.startswith("__") or call.kwargs.get("inplace") is True \
            or "out" in call.kwargs
        return not in_place

    def reads_outside(self, tensor: torch.Tensor, inside: _ModuleCall) -> list[int]:
        """Recorded reads of ``tensor`` not made inside the module call ``inside``."""
        return [i for i in self.readers.get(id(tensor), []) if not inside.first <= i < inside.last]

    def weight_ok(self, layer: _Call) -> str | None:
        """None if the layer call's weight and bias are model parameters read by no other call, else why not."""
        weight, bias = layer.arg(1, "weight"), layer.arg(2, "bias")
        for what, tensor in (("weight", weight), ("bias", bias)):
            if tensor is None and what == "bias":
                continue
            if not isinstance(tensor, torch.Tensor) or id(tensor) not in self.params:
                return "layer weight computed"
            if len(self.readers.get(id(tensor), [])) != 1:
                return "layer weight read elsewhere"
        return None

    def channels_ok(self, layer: _Call, channels: int, tensor: torch.Tensor, flattened: bool = False) -> bool:
        weight = layer.arg(1, "weight")
        if layer.name in _CONV_T:
            out = weight.shape[1] * int(layer.arg(6, "groups", 1))
        else:
            out = weight.shape[0]
        if layer.name == "linear" and tensor.dim() != 2 and not flattened:
            return False
        return bool(out == channels)


def _bn_input(call: _ModuleCall) -> torch.Tensor | None:
    return call.inputs[0] if call.inputs and isinstance(call.inputs[0], torch.Tensor) else None


def _functional_bn(call: _Call) -> bool:
    return call.name == "batch_norm"


def count_foldable(model: nn.Module, example_inputs: Any, kwargs: dict[str, Any] | None = None) -> FoldableCount:
    """Run ``model(*example_inputs, **kwargs)`` once (eval mode, no grad) and count its exactly foldable BN calls.

    ``example_inputs`` is a tensor or a tuple of positional arguments. The model's mode is restored afterwards;
    nothing in it is changed.
    """
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    recorder = _Recorder()
    module_calls: list[_ModuleCall] = []
    was_training = {id(m): m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), _module_calls(model, recorder, module_calls), recorder:
            outputs = model(*args, **(kwargs or {}))
    finally:
        for m in model.modules():
            m.train(was_training[id(m)])
    return _count(model, recorder.calls, module_calls, outputs)


def _count(model: nn.Module, calls: list[_Call], module_calls: list[_ModuleCall], outputs: Any) -> FoldableCount:
    analysis = _Analysis(model, calls, module_calls, outputs)
    result = FoldableCount()
    per_module: dict[int, list[str | None]] = collections.defaultdict(list)  # None: foldable, else why not
    directions: dict[int, list[str]] = collections.defaultdict(list)
    modules: dict[int, _ModuleCall] = {}
    for mc in module_calls:
        if id(mc.module) not in analysis.bn_ids:
            continue
        if any(i in analysis.bn_ids for i in _enclosing(mc, module_calls)):
            continue  # a BN-like module inside another BN-like module's forward: the outer one is the call
        why, direction = _judge_module_call(mc, analysis)
        if why is None and direction == "layer->bn" and isinstance(mc.output, torch.Tensor):
            analysis.folded_outputs[id(mc.output)] = mc.name
        per_module[id(mc.module)].append(why)
        if direction:
            directions[id(mc.module)].append(direction)
        modules[id(mc.module)] = mc
    for key, whys in per_module.items():
        mc = modules[key]
        result.modules[mc.name] = len(whys)
        result.bn_calls += len(whys)
        if not isinstance(mc.module, nn.modules.batchnorm._BatchNorm):
            name = type(mc.module).__name__
            result.other_classes[name] = result.other_classes.get(name, 0) + len(whys)
        if all(w is None for w in whys):
            result.foldable += len(whys)
            for d in directions[key]:
                result.directions[d] = result.directions.get(d, 0) + 1
        else:
            for w in whys:
                reason = w or "another call of the module is not foldable"
                result.not_foldable[reason] = result.not_foldable.get(reason, 0) + 1
    # functional batch_norm calls outside every BN-like module
    for call in calls:
        if not _functional_bn(call) or any(i in analysis.bn_ids for i in call.stack):
            continue
        if call.arg(1, "running_mean") is None or call.arg(2, "running_var") is None:
            continue  # batch statistics of something that is not an activation (BiT's weight standardisation)
        result.bn_calls += 1
        why, direction = _judge_functional(call, analysis)
        if why is None:
            result.foldable += 1
            result.directions[direction] = result.directions.get(direction, 0) + 1
        else:
            result.not_foldable[why] = result.not_foldable.get(why, 0) + 1
    return result


def _enclosing(mc: _ModuleCall, module_calls: list[_ModuleCall]) -> list[int]:
    """Ids of the modules whose calls strictly enclose ``mc`` (by the recorded-call intervals and nesting)."""
    return [id(o.module) for o in module_calls
            if o is not mc and o.first <= mc.first and mc.last <= o.last and o.module is not mc.module
            and _nested(o, mc)]


def _nested(outer: _ModuleCall, inner: _ModuleCall) -> bool:
    return any(inner.module is m for m in outer.module.modules()) and outer.module is not inner.module


def _judge_module_call(mc: _ModuleCall, analysis: _Analysis) -> tuple[str | None, str | None]:
    module = mc.module
    if getattr(module, "track_running_stats", True) is False:
        return "batch statistics", None
    if module.training:
        return "training mode", None
    x, y = _bn_input(mc), mc.output
    running_mean = module._buffers.get("running_mean")
    if running_mean is None:
        return "batch statistics", None
    channels = running_mean.numel()
    if x is None or not isinstance(y, torch.Tensor) or x.dim() < 2 or x.shape != y.shape or x.shape[1] != channels:
        return "not a per-channel map of its input", None
    for first in range(mc.first, mc.last):  # a BN-like module running batch_norm with batch statistics
        call = analysis.calls[first]
        if _functional_bn(call) and call.arg(5, "training", False):
            return "batch statistics", None
    return _judge_tensors(x, y, channels, mc, analysis)


def _judge_functional(call: _Call, analysis: _Analysis) -> tuple[str | None, str]:
    x, y = call.arg(0, "input"), call.result
    mean, var = call.arg(1, "running_mean"), call.arg(2, "running_var")
    if mean is None or var is None or call.arg(5, "training", False):
        return "batch statistics", ""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() < 2 \
            or x.shape[1] != mean.numel():
        return "not a per-channel map of its input", ""
    fake = _ModuleCall(nn.Identity(), "batch_norm", (x,), y, call.index, call.index + 1)
    why, direction = _judge_tensors(x, y, mean.numel(), fake, analysis)
    return why, direction or ""


def _layer_output_problem(x: torch.Tensor, channels: int, analysis: _Analysis, flattened: bool = False
                          ) -> str | None:
    """None if ``x`` is the output of a foldable layer call (or a channel concat of such outputs), else why not."""
    before = analysis.producer.get(id(x))
    if before is None:
        return "no conv/linear neighbour"
    call = analysis.calls[before]
    if call.name == "cat" and x.dim() >= 2 and int(call.arg(1, "dim", 0)) % x.dim() == 1:
        parts = list(call.arg(0, "tensors", ()))
        if not parts or sum(p.shape[1] for p in parts) != channels:
            return "layer -> BN on another axis"
        for part in parts:
            if id(part) in analysis.outputs or analysis.readers.get(id(part), []) != [call.index]:
                return "layer output used elsewhere"
            problem = _layer_output_problem(part, part.shape[1], analysis)
            if problem:
                return problem
        return None
    if call.name in _MERGING_VIEWS and x.dim() == 2 and call.args and isinstance(call.args[0], torch.Tensor):
        # tokens of a linear layer flattened into rows, (N, L, C) -> (N*L, C): the BN axis is still its last (LeViT)
        source = call.args[0]
        inner = analysis.producer.get(id(source))
        if inner is not None and analysis.calls[inner].name == "linear" and source.shape[-1] == x.shape[1] \
                and source.numel() == x.numel() and id(source) not in analysis.outputs \
                and analysis.readers.get(id(source), []) == [call.index]:
            return _layer_output_problem(source, channels, analysis, flattened=True)
    if call.name not in _LAYER:
        return "no conv/linear neighbour"
    problem = analysis.weight_ok(call)
    if problem:
        return problem
    if not analysis.channels_ok(call, channels, x, flattened):
        return "layer -> BN on another axis"
    return None


def _judge_tensors(x: torch.Tensor, y: torch.Tensor, channels: int, mc: _ModuleCall, analysis: _Analysis
                   ) -> tuple[str | None, str | None]:
    # layer -> BN (also after a channel concat of layer outputs, and after a BN that folds so: conv -> BN -> BN)
    reasons = []
    used_elsewhere = bool(analysis.reads_outside(x, mc)) or id(x) in analysis.outputs
    if analysis.folded_outputs.get(id(x)) is not None:
        if not used_elsewhere:
            return None, "layer->bn"
        reasons.append("layer output used elsewhere")
    else:
        problem = _layer_output_problem(x, channels, analysis)
        if problem is None and used_elsewhere:
            problem = "layer output used elsewhere"
        if problem is None:
            return None, "layer->bn"
        if problem != "no conv/linear neighbour":
            reasons.append(problem)
    # BN -> layer
    readers = [] if id(y) in analysis.outputs else analysis.reads_outside(y, mc)
    if len(readers) == 1:
        after = analysis.calls[readers[0]]
        tensor = y
        if after.name == "pad" and str(after.arg(2, "mode", "constant")) in _COMMUTING_PAD \
                and isinstance(after.result, torch.Tensor) and id(after.result) not in analysis.outputs:
            padded_readers = analysis.readers.get(id(after.result), [])
            if len(padded_readers) == 1:
                after, tensor = analysis.calls[padded_readers[0]], after.result
        if after.name in _CONV_T:
            reasons.append("BN -> transposed conv")
        elif after.name in _CONV or after.name == "linear":
            weight = after.arg(1, "weight")
            weight_problem = analysis.weight_ok(after)
            in_channels = weight.shape[1] * int(after.arg(6, "groups", 1)) if after.name in _CONV \
                else weight.shape[-1]
            if weight_problem:
                reasons.append(weight_problem)
            elif after.name == "linear" and tensor.dim() != 2:
                reasons.append("BN -> linear on another axis")
            elif in_channels != channels:
                reasons.append("BN -> layer on another axis")
            elif after.name in _CONV and _zero_padding_read(after):
                reasons.append("BN -> zero-padded conv")
            else:
                return None, "bn->layer"
    if reasons:
        return reasons[0], None
    return "no conv/linear neighbour", None

"""Dataflow from a real run: the graph of what the model computed on its example inputs.

With example inputs, the model is run once (in eval mode, under ``no_grad``) with a
``TorchFunctionMode`` that sees every torch function and tensor method Python code calls, and
forward hooks that see every module call. The run yields a ``torch.fx.Graph`` with the same
node kinds a symbolic trace gives (``call_module`` for fold partners and norms, ``call_function``
/ ``call_method`` for everything else), so :mod:`.graph` finds the same sites in it and the
planner never knows which one it got. Python control flow, shape arithmetic, loops and optional
arguments are simply executed.

The first run is shape-only: conv and linear layers return zeros of their output's shape instead
of computing it (most of a forward's time); when code reads a tensor's values (a branch on a value,
a data-dependent shape) the model runs again, really. Whatever the shape-only run assigned to the
model's modules is put back.

Leaves whose forward is not known from their class (a norm with running statistics under an
unknown class, a per-channel scale layer, a conv subclass with its own forward) have the ops of
their forward recorded as a small program: :func:`inspect_leaves` replays it in float64 to decide
what it computes (see :func:`affine_map` and :func:`conv_program`).

A pairing rests on the recorded path unless every module call between the two layers' calls
and their innermost common caller read no tensor value or metadata in its own code and got
only tensors for all its parameters (:meth:`Recording.specialised`): the rule of ``spec/folding.md``,
"Recorded dataflow".
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import fx, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from refimpl.tolerance import error_bound

from .graph import LayerKind, ModelIndex, Region, classify_layer
from .norms import NormInfo, NormKind, NormRejection, affine_candidate, forward_hooks
from .running import as_args, describe_inputs, eval_mode

__all__ = ["Recording", "record", "inspect_leaves", "affine_map", "conv_program", "recorded_constant"]


def recorded_constant() -> None:
    """Target of the nodes that stand for a tensor the run did not produce in recorded code (never called)."""
    raise RuntimeError("a recorded constant node is not executable")


#: What Python may read of a tensor without reading its values (the tensor's metadata).
_METADATA_READS = {"shape", "size", "dim", "ndim", "ndimension", "numel", "nelement", "dtype", "device", "is_cuda",
                   "is_cpu", "is_meta", "layout", "stride", "is_contiguous", "element_size", "__len__", "get_device",
                   "is_floating_point", "is_complex", "requires_grad", "is_sparse", "storage_offset", "is_quantized",
                   "names", "grad_fn", "is_leaf", "data_ptr", "itemsize", "nbytes", "is_mps", "is_xpu", "mT", "T"}
#: Ops whose output shape depends on their input's values.
_VALUE_SHAPED = {"nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "bincount", "histc",
                 "nonzero_static", "repeat_interleave"}
#: Ops that take sizes, counts or offsets: given as a tensor, they read its value in C++ (no Python call shows it).
_SIZE_TAKING = {"arange", "range", "linspace", "logspace", "zeros", "ones", "empty", "full", "rand", "randn",
                "randint", "new_zeros", "new_ones", "new_empty", "new_full", "view", "reshape", "expand", "repeat",
                "tile", "narrow", "split", "tensor_split", "topk", "kthvalue", "roll", "unflatten", "interpolate",
                "upsample", "pad", "select", "chunk", "movedim", "permute", "flatten", "squeeze", "unsqueeze",
                "transpose", "diagonal", "tril", "triu", "sum", "mean", "amax", "amin", "max", "min", "cumsum"}
#: Layer ops whose output a shape-only run replaces by zeros of the right shape (see _layer_output_shape).
_LAYER_OPS = {"conv1d", "conv2d", "conv3d", "linear", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
_PAD_FUNCTIONS = {"pad", "constant_pad_nd"}
_LAYER_FUNCTIONS = {LayerKind.CONV: {"conv1d", "conv2d", "conv3d"}, LayerKind.LINEAR: {"linear"}}
#: Casting methods that a float64 replay skips (they would round the probe).
_FLOAT_CASTS = {"float", "half", "bfloat16", "double"}


#: Whether this torch's fx.Graph has the internals the recorder's fast node creation uses (else create_node).
_FAST_NODES = all(hasattr(fx.Graph(), a) for a in ("_insert", "_find_nodes_lookup_table", "_len"))


class _NeedsRealRun(Exception):
    """The shape-only run met code that reads tensor values: only the real run can answer it."""


@dataclass
class Frame:
    """One call of a module that is not a leaf: the code whose path the recorded graph follows."""

    module: nn.Module
    parent: Frame | None
    args_are_tensors: bool    # every argument it got is a tensor (or a tuple/list of tensors)
    given: int                # how many arguments it got (positional and keyword)
    observed: str = ""        # what its own code read of a tensor (shape, value, dtype, ...), if anything

    def depth(self) -> int:
        depth, frame = 0, self.parent
        while frame is not None:
            depth, frame = depth + 1, frame.parent
        return depth


@dataclass
class Step:
    """One op of a leaf's recorded forward: ``func(*args, **kwargs)``; tensors in args are :class:`Ref`."""

    func: Callable
    args: tuple
    kwargs: dict
    outputs: list[int]        # the ids of the tensors it returned (a Ref("op", k) names outputs[k]'s producer)
    observation: bool         # it returned no tensor (a shape, a value): Python code read the tensor


@dataclass(frozen=True)
class Ref:
    """A tensor in a :class:`Program`: the leaf's input ("input"), the result of op ``index`` ("op", its output
    ``item``), one of the leaf's own parameters or buffers ("own", its name), or any other tensor ("other")."""

    kind: str
    index: int = 0
    item: int = 0
    name: str = ""


@dataclass
class Program:
    """The ops one call of a leaf ran, with its input and output tensors' shapes."""

    input_shape: tuple[int, ...] | None
    input_dtype: torch.dtype | None
    steps: list[Step] = field(default_factory=list)
    output: Ref | None = None
    extra_inputs: bool = False   # it was called with more than one argument
    others: list[torch.Tensor] = field(default_factory=list)  # tensors read that are none of the above


@dataclass
class Recording:
    region: Region
    calls: dict[int, int]                       # module id -> calls seen (leaves inside leaves included)
    ranks: dict[int, set[int]]                  # leaf module id -> ranks of its first input
    programs: dict[int, list[Program]]          # inspected leaf id -> one program per call
    frames: dict[fx.Node, Frame | None]         # call_module node -> the frame it was called from
    shape_only: bool                            # the layers' outputs were zeros (no value was read)

    def specialised(self, nodes: list[fx.Node], index: ModelIndex) -> str:
        """Why the pairing of the calls ``nodes`` rests on the recorded path ('' when it holds for every call).

        Every frame from each call up to their innermost common caller (included) must have read no
        tensor value or metadata in its own code and got a tensor for each of its forward's parameters.
        """
        chains = []
        for node in nodes:
            chain, frame = [], self.frames.get(node)
            while frame is not None:
                chain.append(frame)
                frame = frame.parent
            chains.append(chain)
        common = set(id(f) for f in chains[0])
        for chain in chains[1:]:
            common &= {id(f) for f in chain}
        path: dict[int, Frame] = {}
        for chain in chains:
            for frame in chain:
                path[id(frame)] = frame
                if id(frame) in common:
                    break
        for frame in sorted(path.values(), key=Frame.depth, reverse=True):
            name = index.name(frame.module) or "<model>"
            if frame.observed:
                return f"{name} ({type(frame.module).__qualname__}) read {frame.observed} in its forward"
            if not frame.args_are_tensors or frame.given < _parameter_count(frame.module):
                return (f"{name} ({type(frame.module).__qualname__}) was called with non-tensor or default "
                        "arguments, which may choose its path")
        return ""


_PARAMETER_COUNTS: dict[Any, int] = {}


def _parameter_count(module: nn.Module) -> int:
    """Parameters of ``type(module).forward`` besides ``self`` (``*args``/``**kwargs`` count as none)."""
    forward = type(module).forward
    count = _PARAMETER_COUNTS.get(forward)
    if count is None:
        code = getattr(forward, "__code__", None)
        if code is None:
            count = 0
        else:
            count = max(0, code.co_argcount + code.co_kwonlyargcount - 1)
        _PARAMETER_COUNTS[forward] = count
    return count


def _is_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and bool(value) and all(isinstance(v, torch.Tensor) for v in value)


def _pair(value: Any, dims: int) -> tuple[int, ...] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * dims
    if isinstance(value, (tuple, list)) and len(value) == dims and all(isinstance(v, int) for v in value):
        return tuple(value)
    return None


_CONV_DEFAULTS = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}
_CONV_ORDER = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_TRANSPOSE_ORDER = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")


def _layer_output_shape(name: str, args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """The output shape of ``torch.<name>(*args, **kwargs)`` for a conv or linear op, or None when not sure."""
    order = _CONV_TRANSPOSE_ORDER if name.startswith("conv_transpose") else _CONV_ORDER
    bound = dict(zip(order, args, strict=False))
    bound.update(kwargs)
    x, weight = bound.get("input"), bound.get("weight")
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return None
    if name == "linear":
        if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
            return None
        return (*x.shape[:-1], int(weight.shape[0]))
    dims = weight.dim() - 2
    if x.dim() != dims + 2 or dims < 1:
        return None
    stride, dilation = _pair(bound.get("stride", 1), dims), _pair(bound.get("dilation", 1), dims)
    groups, padding = bound.get("groups", 1), bound.get("padding", 0)
    if stride is None or dilation is None or not isinstance(groups, int) or groups < 1:
        return None
    kernel = tuple(int(k) for k in weight.shape[2:])
    size = tuple(int(n) for n in x.shape[2:])
    if name.startswith("conv_transpose"):
        pad, extra = _pair(padding, dims), _pair(bound.get("output_padding", 0), dims)
        if pad is None or extra is None or x.shape[1] != weight.shape[0]:
            return None
        spatial = tuple((n - 1) * s - 2 * p + d * (k - 1) + e + 1
                        for n, s, p, d, k, e in zip(size, stride, pad, dilation, kernel, extra, strict=True))
        channels = int(weight.shape[1]) * groups
    else:
        if x.shape[1] != weight.shape[1] * groups:
            return None
        if padding == "same":
            spatial = size
        else:
            pad = (0,) * dims if padding == "valid" else _pair(padding, dims)
            if pad is None:
                return None
            spatial = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                            for n, s, p, d, k in zip(size, stride, pad, dilation, kernel, strict=True))
        channels = int(weight.shape[0])
    if any(n < 1 for n in spatial):
        return None
    return (int(x.shape[0]), channels, *spatial)


def _func_name(func: Callable) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", "") or name
    return name


def _tensors_in(value: Any, found: list[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _tensors_in(v, found)
    elif isinstance(value, dict):
        for v in value.values():
            _tensors_in(v, found)
    return found


class _Recorder(TorchFunctionMode):
    """Builds the graph while the model runs (see the module docstring)."""

    def __init__(self, model: nn.Module, index: ModelIndex, inspected: set[int], shape_only: bool):
        super().__init__()
        self.model = model
        self.index = index
        self.inspected = inspected
        # Decided before the hooks exist: forward_hooks() would see the recorder's own hooks.
        self.leaves = {id(m) for m in index.modules if index.is_leaf(m)} | inspected
        # Standard layers, whose outputs a shape-only run replaces by zeros.
        self.zeroed = {key for key in self.leaves if key not in inspected} & {
            id(m) for m in index.modules if index.layer(m)[0] is not None or index.is_foldable_norm(m)}
        self.known = {id(m) for m in index.modules}
        self.thread = threading.get_ident()
        self.shape_only = shape_only
        self.graph = fx.Graph()
        self.values: dict[int, tuple[fx.Node, torch.Tensor]] = {}   # tensor id -> (node, tensor kept alive)
        self.modules: dict[str, nn.Module] = {}
        self.calls: dict[int, int] = {}
        self.ranks: dict[int, set[int]] = {}
        self.programs: dict[int, list[Program]] = {}
        self.frames: dict[fx.Node, Frame | None] = {}
        self.frame: Frame | None = None
        self.leaf_depth = 0
        self.leaf_zeroed = False
        self.leaf_stack: list[tuple[nn.Module, Program | None]] = []
        self.program: Program | None = None
        self.program_values: dict[int, Ref] = {}
        self.program_keep: list[torch.Tensor] = []
        self.tensor_names: dict[int, str] | None = None
        self.in_hook = False      # the hooks' own tensor reads (shape, dim) are not the model's
        self.node_count = 0

    # -- values ------------------------------------------------------------------------------
    def _node(self, op: str, target: Any, args: tuple = (), kwargs: dict | None = None) -> fx.Node:
        """A new node at the end of the graph. ``Graph.create_node`` walks every argument again and derives a
        name from the target (a third of the recording's time); names here only need to be unique."""
        graph = self.graph
        if not _FAST_NODES:
            return graph.create_node(op, target, args, kwargs)
        self.node_count += 1
        node = fx.Node(graph, f"{op}_{self.node_count}", op, target, args, kwargs or {})
        graph._insert(node)
        graph._find_nodes_lookup_table.insert(node)
        graph._len += 1
        return node

    def _node_of(self, tensor: torch.Tensor) -> fx.Node:
        known = self.values.get(id(tensor))
        if known is not None and known[1] is tensor:
            return known[0]
        if self.tensor_names is None:
            names: dict[int, str] = {}
            for qualified, param in self.model.named_parameters(remove_duplicate=False):
                names.setdefault(id(param), qualified)
            for qualified, buffer in self.model.named_buffers(remove_duplicate=False):
                names.setdefault(id(buffer), qualified)
            self.tensor_names = names
        owner_name = self.tensor_names.get(id(tensor))
        if owner_name is not None:
            node = self._node("get_attr", owner_name)
        else:
            node = self._node("call_function", recorded_constant)
            node.meta["value"] = tensor
        self.values[id(tensor)] = (node, tensor)
        return node

    def _mapped(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self._node_of(value)
        if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
            return type(value)(self._mapped(v) for v in value)
        if isinstance(value, dict):
            return {k: self._mapped(v) for k, v in value.items()}
        if isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.Size, slice,
                              torch.memory_format, torch.layout, type(Ellipsis))):
            return value
        return repr(value)  # an object fx cannot hold as an argument: its description keeps the node honest

    def _bind(self, node: fx.Node, result: Any) -> None:
        """Map the tensors ``result`` holds to ``node`` (a tuple's items to getitem nodes)."""
        if isinstance(result, torch.Tensor):
            self.values[id(result)] = (node, result)
        elif isinstance(result, (tuple, list)):
            for i, item in enumerate(result):
                if isinstance(item, torch.Tensor):
                    item_node = self._node("call_function", operator.getitem, (node, i))
                    self.values[id(item)] = (item_node, item)

    def _observe(self, what: str) -> None:
        if self.frame is not None and not self.frame.observed:
            self.frame.observed = what

    # -- program of an inspected leaf ------------------------------------------------------------
    def _program_ref(self, tensor: torch.Tensor, own: dict[int, str]) -> Ref:
        ref = self.program_values.get(id(tensor))
        if ref is not None:
            return ref
        name = own.get(id(tensor))
        if name is not None:
            return Ref("own", name=name)
        program = cast(Program, self.program)
        program.others.append(tensor)
        return Ref("other", index=len(program.others) - 1)

    def _program_args(self, value: Any, own: dict[int, str]) -> Any:
        if isinstance(value, torch.Tensor):
            return self._program_ref(value, own)
        if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
            return type(value)(self._program_args(v, own) for v in value)
        if isinstance(value, dict):
            return {k: self._program_args(v, own) for k, v in value.items()}
        return value

    # -- the mode ----------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.in_hook:
            return func(*args, **kwargs)
        if self.leaf_depth:
            if self.leaf_zeroed and self.leaf_depth == 1:
                name = _func_name(func)
                if name == "batch_norm" and args and isinstance(args[0], torch.Tensor):
                    return torch.zeros_like(args[0])  # eval-mode batch norm keeps its input's shape
                if name in _LAYER_OPS:
                    shape = _layer_output_shape(name, args, kwargs)
                    if shape is not None:
                        return torch.zeros(shape, dtype=args[0].dtype, device=args[0].device)
            if self.program is None or self.leaf_depth != 1:
                return func(*args, **kwargs)
        name = _func_name(func)
        result = func(*args, **kwargs)
        returns_tensor = isinstance(result, torch.Tensor) or (
            isinstance(result, (tuple, list)) and any(isinstance(r, torch.Tensor) for r in result))
        if self.leaf_depth:
            module = self.leaf_stack[-1][0]
            program = cast(Program, self.program)
            own = {id(t): n for n, t in (*module._parameters.items(), *module._buffers.items()) if t is not None}
            step = Step(func, self._program_args(args, own), self._program_args(kwargs, own), [], not returns_tensor)
            k = len(program.steps)
            program.steps.append(step)
            for item, tensor in enumerate(_tensors_in(result, [])):
                self.program_values[id(tensor)] = Ref("op", index=k, item=item)
                self.program_keep.append(tensor)
            return result
        reads_values = (not returns_tensor and result is not None and name not in _METADATA_READS)
        if self.shape_only and (reads_values or name in _VALUE_SHAPED or (name == "__getitem__" and _bool_index(args))
                                or (name == "where" and len(args) == 1 and not kwargs)
                                or (name in _SIZE_TAKING and _tensor_sizes(name, args, kwargs))):
            raise _NeedsRealRun(f"the model reads tensor values ({name})")
        if not returns_tensor:
            if result is not None:
                self._observe(name or "a value")
            if name in _METADATA_READS:
                return result
            # A value read or an in-place write returning None (x[i] = y): a use of its tensors all the same.
        is_method = getattr(torch.Tensor, name, None) is func or getattr(torch._C.TensorBase, name, None) is func
        node = self._node("call_method" if is_method else "call_function",
                                      name if is_method else func,
                                      cast(tuple, self._mapped(tuple(args))), cast(dict, self._mapped(kwargs)))
        self._bind(node, result)
        return result

    # -- module hooks ------------------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: tuple) -> None:
        if id(module) not in self.known or threading.get_ident() != self.thread:
            return
        self.in_hook = True
        try:
            self._enter(module, args)
        finally:
            self.in_hook = False

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if id(module) not in self.known or threading.get_ident() != self.thread:
            return
        self.in_hook = True
        try:
            self._leave(module, args, kwargs, output)
        finally:
            self.in_hook = False

    def _enter(self, module: nn.Module, args: tuple) -> None:
        key = id(module)
        self.calls[key] = self.calls.get(key, 0) + 1
        if self.leaf_depth:
            self.leaf_depth += 1
            self.leaf_stack.append((module, None))
            return
        if module is self.model:
            for i, tensor in enumerate(_tensors_in(args, [])):
                node = self.graph.placeholder(f"input_{i}")
                self.values[id(tensor)] = (node, tensor)
        if key in self.leaves:
            program = None
            if key in self.inspected:
                first = args[0] if args and isinstance(args[0], torch.Tensor) else None
                program = Program(None if first is None else tuple(first.shape),
                                  None if first is None else first.dtype, extra_inputs=len(args) != 1)
                self.program_values = {} if first is None else {id(first): Ref("input")}
                self.program_keep = [] if first is None else [first]
                self.programs.setdefault(key, []).append(program)
            self.program = program
            self.leaf_depth = 1
            self.leaf_zeroed = self.shape_only and key in self.zeroed
            self.leaf_stack.append((module, program))
            return
        # Keyword arguments are not seen here (global pre-hooks get none): they count at the frame's exit.
        self.frame = Frame(module, self.frame, all(_is_tensors(a) for a in args), len(args))

    def _leave(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.leaf_depth:
            _, program = self.leaf_stack.pop()
            self.leaf_depth -= 1
            if self.leaf_depth:
                return
            self.leaf_zeroed = False
            key = id(module)
            if args and isinstance(args[0], torch.Tensor):
                self.ranks.setdefault(key, set()).add(args[0].dim())
            target = self.index.name(module)
            self.modules[target] = module
            node = self._node("call_module", target, cast(tuple, self._mapped(tuple(args))),
                                          cast(dict, self._mapped(kwargs)))
            self.frames[node] = self.frame
            if program is not None:
                program.output = self.program_values.get(id(output)) if isinstance(output, torch.Tensor) else None
                program.extra_inputs = program.extra_inputs or bool(kwargs)
                self.program = None
                self.program_values = {}
                self.program_keep = []
            self._bind(node, output)
        else:
            frame = self.frame
            if frame is not None and frame.module is module:
                if kwargs:
                    frame.args_are_tensors = frame.args_are_tensors and all(_is_tensors(v) for v in kwargs.values())
                    frame.given += len(kwargs)
                self.frame = frame.parent
        if module is self.model:
            self.graph.output(self._mapped(output))


_FACTORIES = {"arange", "range", "linspace", "logspace", "zeros", "ones", "empty", "full", "rand", "randn", "randint"}


def _tensor_sizes(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether a size-taking op got a size, count or offset as a tensor (anything but its first tensor argument)."""
    rest = args if name in _FACTORIES else args[1:]
    if name in ("full", "new_full"):  # the fill value is a value, not a size
        rest, kwargs = rest[:1], {k: v for k, v in kwargs.items() if k == "size"}
    found = _tensors_in((rest, kwargs), [])
    return any(t.dim() == 0 or not t.is_floating_point() for t in found)


def _bool_index(args: tuple) -> bool:
    """Whether ``x[index]`` indexes with a boolean tensor (its shape then depends on the mask's values)."""
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


_Snapshot = list[tuple[nn.Module, tuple, tuple, dict, dict]]


def _snapshot(modules: list[nn.Module]) -> _Snapshot:
    return [(m, tuple(vars(m)), tuple(vars(m).values()), dict(m._buffers), dict(m._parameters)) for m in modules]


def _restore(snapshot: _Snapshot) -> None:
    """Put back every attribute, buffer and parameter a run assigned (what it wrote into tensors stays)."""
    for module, names, values, buffers, parameters in snapshot:
        current = vars(module)
        if tuple(current) != names or not all(map(operator.is_, current.values(), values)):
            current.clear()
            current.update(zip(names, values, strict=True))
        for mine, saved in ((module._buffers, buffers), (module._parameters, parameters)):
            if mine.keys() != saved.keys() or not all(map(operator.is_, mine.values(), saved.values())):
                mine.clear()
                mine.update(saved)


def _run(model: nn.Module, index: ModelIndex, inspected: set[int], args: tuple, shape_only: bool) -> _Recorder:
    recorder = _Recorder(model, index, inspected, shape_only)
    # A shape-only run may leave zeros where a forward caches what it computed: those assignments are undone.
    snapshot = _snapshot(index.modules) if shape_only else []
    handles = [register_module_forward_pre_hook(recorder.pre_hook),
               register_module_forward_hook(recorder.post_hook, with_kwargs=True)]
    try:
        with eval_mode(model), torch.no_grad(), recorder:
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
        if shape_only:
            _restore(snapshot)
    return recorder


def record(model: nn.Module, index: ModelIndex, example_inputs: Any) -> Recording | None:
    """Run ``model`` on ``example_inputs`` and return its recorded dataflow (None when the model itself is a leaf).

    The first run is shape-only: conv and linear layers return zeros of their output's shape instead of
    computing it (most of a forward's time). Code that reads a tensor's values (a branch on a value, a
    data-dependent shape) stops it, and the model runs again, really.

    Raises ValueError naming the model and the inputs' shapes when the model cannot run on them.
    """
    if not isinstance(example_inputs, (torch.Tensor, tuple, list)):
        raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got "
                        f"{type(example_inputs).__qualname__}")
    if index.is_leaf(model):
        return None
    args = as_args(example_inputs)
    inspected = {id(m) for m in index.modules if _inspected(m, index)}
    recorder = None
    try:
        recorder = _run(model, index, inspected, args, shape_only=True)
    except Exception:  # noqa: BLE001 - whatever stops the shape-only run, the real run decides
        recorder = None
    if recorder is None:
        try:
            recorder = _run(model, index, inspected, args, shape_only=False)
        except Exception as error:  # the user's model on the user's inputs: say which and what shapes
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ValueError(f"fuse: running {type(model).__qualname__} on example_inputs "
                             f"{describe_inputs(args)} raised {type(error).__name__}: {first_line}") from error
    if not any(node.op == "output" for node in recorder.graph.nodes):
        raise ValueError(f"fuse: {type(model).__qualname__} on example_inputs {describe_inputs(args)} returned "
                         "without its forward hooks running")
    region = Region("", model, recorder.graph, recorder.modules)
    return Recording(region, recorder.calls, recorder.ranks, recorder.programs, recorder.frames,
                     recorder.shape_only)


def _inspected(module: nn.Module, index: ModelIndex) -> bool:
    """Leaves whose computation is read from their recorded forward: unknown norms, per-channel affine layers,
    conv/linear subclasses with a forward of their own."""
    if forward_hooks(module):
        return False
    verdict = index.norms.get(id(module))
    if isinstance(verdict, NormRejection):
        return verdict.reason == "unknown_norm" and not module._modules
    if verdict is not None:
        return False
    kind, reason = classify_layer(module)
    if kind is None and reason == "unsupported_layer":
        return _subclass_base(module) is not None
    return kind is None and affine_candidate(module)


def _subclass_base(module: nn.Module) -> str | None:
    """``conv`` / ``linear`` for a (non-transposed, non-quantized) conv or linear subclass without parametrizations."""
    from .graph import is_quantized
    if is_quantized(module) or module._modules:
        return None
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return LayerKind.CONV
    if isinstance(module, nn.Linear):
        return LayerKind.LINEAR
    return None


# -- what an inspected leaf computes ------------------------------------------------------------

def conv_program(module: nn.Module, programs: list[Program]) -> str | None:
    """The layer kind when every call of ``module`` padded its input (or not) and then ran the conv/linear
    function on its own ``weight`` and ``bias``, whose result it returned; else None."""
    kind = _subclass_base(module)
    if kind is None or not programs:
        return None
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    for program in programs:
        if program.extra_inputs or program.output is None or program.others:
            return None
        current = Ref("input")
        conv_at = None
        for k, step in enumerate(program.steps):
            if step.observation:
                continue
            name = _func_name(step.func)
            if conv_at is None and name in _PAD_FUNCTIONS and step.args and step.args[0] == current:
                tensors = [a for a in (*step.args[1:], *step.kwargs.values()) if isinstance(a, Ref)]
                if tensors:
                    return None
                current = Ref("op", index=k)
                continue
            if conv_at is None and name in _LAYER_FUNCTIONS[kind]:
                call = list(step.args) + [step.kwargs.get(n) for n in ("weight", "bias") if n in step.kwargs]
                if len(call) < 2 or call[0] != current or call[1] != Ref("own", name="weight"):
                    return None
                given_bias = call[2] if len(call) > 2 else None
                if (bias is None) != (given_bias is None):
                    return None
                if bias is not None and given_bias != Ref("own", name="bias"):
                    return None
                conv_at = k
                continue
            return None  # anything else in the forward
        if conv_at is None or program.output != Ref("op", index=conv_at) or weight is None:
            return None
    return kind


@dataclass(frozen=True)
class AffineMap:
    """``y = scale[c] * x + shift[c]`` along axis 1, in float64 (from a recorded forward replayed in float64)."""

    scale: torch.Tensor
    shift: torch.Tensor


def _replay(module: nn.Module, program: Program, probe: torch.Tensor) -> torch.Tensor:
    """Run ``program`` again on ``probe`` (float64), with the leaf's own floating tensors in float64."""
    results: list[list[torch.Tensor]] = []
    own = {n: t for n, t in (*module._parameters.items(), *module._buffers.items()) if t is not None}

    def value(arg: Any) -> Any:
        if isinstance(arg, Ref):
            if arg.kind == "input":
                return probe
            if arg.kind == "op":
                return results[arg.index][arg.item]
            tensor = own[arg.name].detach()
            return tensor.to(torch.float64) if tensor.is_floating_point() else tensor
        if isinstance(arg, torch.device) and arg.type == "meta":
            return probe.device
        if isinstance(arg, torch.dtype) and arg.is_floating_point:
            return torch.float64
        if isinstance(arg, (tuple, list)) and not hasattr(arg, "_fields"):
            return type(arg)(value(a) for a in arg)
        if isinstance(arg, dict):
            return {k: value(a) for k, a in arg.items()}
        return arg

    for step in program.steps:
        args, kwargs = value(step.args), value(step.kwargs)
        if _func_name(step.func) in _FLOAT_CASTS and len(args) == 1 and not kwargs:
            result: Any = args[0]
        else:
            result = step.func(*args, **kwargs)
        if isinstance(result, torch.Tensor) and result.is_meta:
            raise ValueError("an op gives no values")
        results.append(_tensors_in(result, []))
    assert program.output is not None
    return cast(torch.Tensor, value(program.output))


#: Ops that are affine in a tensor operand that depends on the leaf's input (see :func:`_nonlinear_step`).
_SUM_OPS = {"add", "__add__", "__radd__", "add_", "__iadd__", "sub", "__sub__", "__rsub__", "rsub", "sub_",
            "__isub__", "subtract", "neg", "__neg__", "negative", "positive", "__pos__"}
_PRODUCT_OPS = {"mul", "__mul__", "__rmul__", "mul_", "__imul__", "multiply"}
_QUOTIENT_OPS = {"div", "__truediv__", "true_divide", "div_", "__itruediv__", "divide"}
_LAYOUT_OPS = {"view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "contiguous", "clone", "to",
               "type", "type_as", "permute", "transpose", "unsqueeze", "squeeze", "movedim", "detach",
               *_FLOAT_CASTS}


def _depends(value: Any, dependent: set[int]) -> bool:
    if isinstance(value, Ref):
        return value.kind == "input" or (value.kind == "op" and value.index in dependent)
    if isinstance(value, (tuple, list)):
        return any(_depends(v, dependent) for v in value)
    if isinstance(value, dict):
        return any(_depends(v, dependent) for v in value.values())
    return False


def _nonlinear_step(program: Program) -> str:
    """The first op of ``program`` that is not affine in the leaf's input ('' when every op is).

    Probes alone cannot prove a map affine: ``clamp(x, -8, 8)`` agrees with ``x`` on every probe of
    moderate size. Each op whose result depends on the input must be a sum, a product with at most
    one input-dependent factor, a quotient whose divisor is constant, a batch_norm (instance_norm) of
    the input by constant running statistics, or a change of layout or dtype; ops on constants alone (``rsqrt``
    of a variance, ...) are free. Then the map is affine for every input, and the probes only
    measure it.
    """
    dependent: set[int] = set()
    for k, step in enumerate(program.steps):
        name = _func_name(step.func)
        operands = (*step.args, *step.kwargs.values())
        if not _depends(operands, dependent):
            continue
        if name in _METADATA_READS:
            continue
        flags = [_depends(a, dependent) for a in step.args]
        if name in _SUM_OPS or name in _LAYOUT_OPS:
            ok = True
        elif name in _PRODUCT_OPS:
            ok = sum(flags) <= 1 and not _depends(step.kwargs, dependent)
        elif name in _QUOTIENT_OPS:
            ok = (not any(flags[1:]) and not _depends(step.kwargs, dependent)
                  and step.kwargs.get("rounding_mode") is None)
        elif name == "addcmul":
            ok = sum(flags[1:3]) <= 1 and not _depends(step.kwargs, dependent)
        elif name in ("batch_norm", "native_batch_norm"):
            training = step.kwargs.get("training", step.args[5] if len(step.args) > 5 else False)
            ok = not any(flags[1:]) and not _depends(step.kwargs, dependent) and training is False
        elif name == "instance_norm":  # by its running statistics (use_input_stats=False): affine
            by_input = step.kwargs.get("use_input_stats", step.args[5] if len(step.args) > 5 else True)
            ok = not any(flags[1:]) and not _depends(step.kwargs, dependent) and by_input is False
        else:
            ok = False
        if not ok:
            return f"{name or step.func!r} is applied to its input (not an affine op)"
        dependent.add(k)
    return ""


def affine_map(module: nn.Module, programs: list[Program]) -> AffineMap | str:
    """The per-channel affine map every call of ``module`` computes, or why it is not one.

    Each call's program is replayed in float64 on three probes of its input's shape -- zeros, ones
    and seeded random values: ``shift = y(0)``, ``scale = y(1) - y(0)`` must be constant along every
    axis but 1, the random probe must give ``scale * x + shift`` within the float64 error bound of the
    program's length, and every call must give the same map.
    """
    found: AffineMap | None = None
    for program in programs:
        if program.extra_inputs or program.output is None or program.input_shape is None:
            return "it is not called on one tensor returning one tensor"
        if program.others:
            return "its forward reads tensors that are neither its input nor its own parameters or buffers"
        nonlinear = _nonlinear_step(program)
        if nonlinear:
            return f"it is not an affine map of its input: {nonlinear}"
        shape = program.input_shape
        if len(shape) < 2 or shape[1] < 1:
            return f"its input has shape {shape}: no channel axis"
        device = next((t.device for t in (*module._parameters.values(), *module._buffers.values())
                       if t is not None and not t.is_meta), torch.device("cpu"))
        generator = torch.Generator(device="cpu").manual_seed(0)
        probes = (torch.zeros(shape, dtype=torch.float64, device=device),
                  torch.ones(shape, dtype=torch.float64, device=device),
                  torch.randn(shape, dtype=torch.float64, generator=generator).to(device))
        try:
            with torch.no_grad():
                outputs = [_replay(module, program, p) for p in probes]
        except Exception as error:  # noqa: BLE001 - a forward that cannot be replayed is not a known map
            return f"its recorded forward cannot be replayed in float64 ({type(error).__name__}: {error})"
        if any(not isinstance(o, torch.Tensor) or tuple(o.shape) != shape or o.dtype != torch.float64
               for o in outputs):
            return "its output does not have its input's shape (or is not computed from it in float64)"
        channels = shape[1]
        view = (1, channels) + (1,) * (len(shape) - 2)
        shift = outputs[0].reshape(shape[0], channels, -1)[0, :, 0]
        scale = outputs[1].reshape(shape[0], channels, -1)[0, :, 0] - shift
        if not (torch.equal(outputs[0], shift.reshape(view).expand(shape))
                and torch.equal(outputs[1] - outputs[0], scale.reshape(view).expand(shape))):
            return "it does not map each channel alike at every position (not a per-channel map along axis 1)"
        expected = scale.reshape(view) * probes[2] + shift.reshape(view)
        magnitude = (scale.reshape(view) * probes[2]).abs() + shift.reshape(view).abs()
        bound = torch.from_numpy(error_bound(magnitude.cpu().numpy(), max(1, 2 * len(program.steps)), "float64"))
        if not bool(((outputs[2] - expected).abs().cpu() <= bound).all()) or not bool(torch.isfinite(scale).all()):
            return "it is not an affine map of its input (a random input is not mapped to scale * x + shift)"
        current = AffineMap(scale, shift)
        if found is not None and not (torch.equal(found.scale, scale) and torch.equal(found.shift, shift)):
            return "its calls compute different maps"
        found = current
    if found is None:
        return "it is never called"
    return found


def _calls_batch_norm(programs: list[Program]) -> bool:
    return any(_func_name(s.func) in ("batch_norm", "native_batch_norm") for p in programs for s in p.steps)


def inspect_leaves(recording: Recording, index: ModelIndex) -> None:
    """Decide from their recorded forwards what the inspected leaves compute, and record it in ``index``.

    A per-channel affine map becomes a foldable norm (:data:`NormKind.AFFINE`); a module with running
    statistics or a batch_norm call whose forward is not one is a norm left with the reason why; a
    conv/linear subclass that pads and then runs its own weight and bias becomes a fold partner
    for a norm after it (:attr:`ModelIndex.padded`).
    """
    for module in index.modules:
        programs = recording.programs.get(id(module))
        if programs is None:
            continue
        kind = conv_program(module, programs)
        if kind is not None:
            index.adopt_layer(module, kind, any(s.observation for p in programs for s in p.steps))
            continue
        if _subclass_base(module) is not None:
            continue
        verdict = affine_map(module, programs)
        name = f"{index.name(module)} ({type(module).__qualname__})"
        if isinstance(verdict, AffineMap):
            observed = any(s.observation for p in programs for s in p.steps)
            index.norms[id(module)] = NormInfo(NormKind.AFFINE, int(verdict.scale.numel()), verdict.scale,
                                               verdict.shift, observed)
        elif isinstance(index.norms.get(id(module)), NormRejection) or _calls_batch_norm(programs):
            index.norms[id(module)] = NormRejection("unknown_norm", f"{name} is not folded: its recorded forward "
                                                    f"is not a per-channel affine map: {verdict}")

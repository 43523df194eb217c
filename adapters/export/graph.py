"""Reading torch.export programs and FX graphs: which nodes are BatchNorms and layers, and where tensors come from.

Every IR a user hands over spells the same computation with other ops: the training IR
(``aten.conv2d``, ``aten.linear``, ``aten.batch_norm``), the inference IR after
``run_decompositions`` (``aten.convolution``, ``aten.addmm`` of a transposed weight,
``_native_batch_norm_legit_no_training`` and a ``getitem``), the edge dialect (the same ops wrapped
as ``EdgeOpOverload``), and torch-level FX graphs (``torch.conv2d``, ``F.batch_norm``). A node is
read by binding its arguments to the op's schema (by argument name, never by node or parameter
names), so one description serves every spelling: :func:`norm_call` and :func:`layer_call` return
what a fold needs to know -- input, weight, bias and statistics nodes, ``transposed``, ``groups``,
padding, training flag -- or None for any other node.

:class:`Program` is the other half: for a node that feeds a weight or statistic, the tensor it
stands for (a parameter, buffer or constant of an ExportedProgram's signature, or a ``get_attr``
of a GraphModule), or why it is not a constant (a user input, a buffer the program mutates, a
value computed in the graph); and the edits a fold makes -- a new parameter, a value replaced,
a source nothing reads any more removed -- kept consistent with the graph signature, the state
dict and the constants.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, OutputKind, TensorArgument

__all__ = ["NormCall", "LayerCall", "Program", "norm_call", "layer_call", "op_name", "module_path", "rank",
           "is_transpose_2d", "functional_calls"]

F = nn.functional

# Torch-level callables (symbolic_trace output) read with the schema of the ATen op they dispatch to.
_TORCH_LEVEL: dict[Any, Any] = {
    torch.conv1d: torch.ops.aten.conv1d.default, torch.conv2d: torch.ops.aten.conv2d.default,
    torch.conv3d: torch.ops.aten.conv3d.default,
    torch.conv_transpose1d: torch.ops.aten.conv_transpose1d.default,
    torch.conv_transpose2d: torch.ops.aten.conv_transpose2d.input,
    torch.conv_transpose3d: torch.ops.aten.conv_transpose3d.input,
    F.linear: torch.ops.aten.linear.default, torch.batch_norm: torch.ops.aten.batch_norm.default,
    torch.addmm: torch.ops.aten.addmm.default, torch.mm: torch.ops.aten.mm.default,
    torch.cat: torch.ops.aten.cat.default, torch.concat: torch.ops.aten.cat.default,
    F.pad: torch.ops.aten.pad.default,
}
_F_BATCH_NORM_PARAMETERS = tuple(inspect.signature(F.batch_norm).parameters)


def op_name(target: Any) -> str:
    """``"aten::convolution"`` for an OpOverload or EdgeOpOverload (or a torch-level callable of the
    same op); ``"F.batch_norm"`` for ``torch.nn.functional.batch_norm``; ``""`` for anything else."""
    if target is F.batch_norm:
        return "F.batch_norm"
    target = _TORCH_LEVEL.get(target, target) if _hashable(target) else target
    schema = getattr(target, "_schema", None)
    return schema.name if schema is not None else ""


def _hashable(target: Any) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


def bind(node: fx.Node) -> dict[str, Any] | None:
    """The node's arguments by name (defaults filled in), or None when its op has no known signature."""
    target = node.target
    if target is F.batch_norm:
        names = _F_BATCH_NORM_PARAMETERS
        defaults = {name: p.default for name, p in inspect.signature(F.batch_norm).parameters.items()}
        bound = dict(defaults)
        bound.update(zip(names, node.args, strict=False))
        bound.update(node.kwargs)
        return bound
    target = _TORCH_LEVEL.get(target, target) if _hashable(target) else target
    schema = getattr(target, "_schema", None)
    if schema is None:
        return None
    bound = {}
    for index, argument in enumerate(schema.arguments):
        if index < len(node.args) and not argument.kwarg_only:
            bound[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            bound[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
        else:
            bound[argument.name] = None
    return bound


def argument_position(node: fx.Node, name: str) -> int | None:
    """Position of argument ``name`` in the node's schema (None when it is keyword-only or unknown)."""
    target = node.target
    if target is F.batch_norm:
        return _F_BATCH_NORM_PARAMETERS.index(name)
    target = _TORCH_LEVEL.get(target, target) if _hashable(target) else target
    schema = getattr(target, "_schema", None)
    if schema is None:
        return None
    for index, argument in enumerate(schema.arguments):
        if argument.name == name:
            return None if argument.kwarg_only else index
    return None


def set_argument(node: fx.Node, name: str, value: Any) -> None:
    """Set argument ``name`` of ``node`` (positional where the call gives it so, defaults filled up to it)."""
    if name in node.kwargs:
        node.update_kwarg(name, value)
        return
    position = argument_position(node, name)
    if position is None:
        node.update_kwarg(name, value)
        return
    if position < len(node.args):
        node.update_arg(position, value)
        return
    bound = bind(node)
    assert bound is not None
    target: Any = _TORCH_LEVEL.get(node.target, node.target) if _hashable(node.target) else node.target
    names = [a.name for a in target._schema.arguments] if node.target is not F.batch_norm \
        else list(_F_BATCH_NORM_PARAMETERS)
    args = list(node.args)
    kwargs = dict(node.kwargs)
    for index in range(len(args), position + 1):
        arg_name = names[index]
        args.append(value if index == position else kwargs.pop(arg_name, bound[arg_name]))
    node.args = tuple(args)
    node.kwargs = kwargs


def module_path(node: fx.Node) -> str:
    """The qualified name of the module whose forward made ``node`` (from ``nn_module_stack``), else the node's name."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if isinstance(path, str) and path:
            return path
    return node.name


def rank(node: Any) -> int | None:
    """The rank of the tensor a node computes, from ``meta['val']`` (None when unknown)."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(value, torch.Tensor):
        return value.dim()
    tensor_meta = node.meta.get("tensor_meta")
    shape = getattr(tensor_meta, "shape", None)
    return len(shape) if shape is not None else None


# --------------------------------------------------------------------------------------------------
# BatchNorm calls

#: op -> (argument names: input, weight, bias, mean, var, training (or a constant), eps; tuple output?)
_NORM_OPS: dict[str, tuple[tuple[str, str, str, str | None, str | None, str | bool, str], bool]] = {
    "aten::batch_norm": (("input", "weight", "bias", "running_mean", "running_var", "training", "eps"), False),
    "F.batch_norm": (("input", "weight", "bias", "running_mean", "running_var", "training", "eps"), False),
    "aten::_native_batch_norm_legit_no_training": (("input", "weight", "bias", "running_mean", "running_var", False,
                                                    "eps"), True),
    "aten::_native_batch_norm_legit": (("input", "weight", "bias", "running_mean", "running_var", "training", "eps"),
                                       True),
    "aten::_native_batch_norm_legit_functional": (("input", "weight", "bias", "running_mean", "running_var",
                                                   "training", "eps"), True),
    "aten::native_batch_norm": (("input", "weight", "bias", "running_mean", "running_var", "training", "eps"), True),
}


@dataclass
class NormCall:
    """A BatchNorm node read from the graph.

    ``value`` is the node that carries the normalised tensor (the call itself, or its ``getitem(.., 0)``);
    ``extra`` holds the other outputs' nodes that something reads (saved mean/invstd, updated statistics).
    ``training`` is True when the graph normalises with batch statistics.
    """

    node: fx.Node
    input: Any
    weight: Any
    bias: Any
    mean: Any
    var: Any
    eps: float
    training: bool
    value: fx.Node | None
    extra: list[fx.Node] = field(default_factory=list)

    @property
    def nodes(self) -> list[fx.Node]:
        """The nodes folding it removes: the getitems, then the call."""
        getitems = [u for u in self.node.users if u.op == "call_function" and u.target is operator.getitem]
        return [*getitems, self.node] if getitems or self.value is not self.node else [self.node]


def norm_call(node: fx.Node) -> NormCall | None:
    """The BatchNorm that ``node`` computes, or None."""
    if node.op != "call_function":
        return None
    spec = _NORM_OPS.get(op_name(node.target))
    if spec is None:
        return None
    bound = bind(node)
    if bound is None:
        return None
    (x, w, b, mean, var, training, eps), tuple_output = spec
    is_training = bool(bound.get(training)) if isinstance(training, str) else training
    value: fx.Node | None = node
    extra: list[fx.Node] = []
    if tuple_output:
        value = None
        for user in node.users:
            if user.op == "call_function" and user.target is operator.getitem:
                if user.args[1] == 0:
                    value = user
                elif user.users:
                    extra.append(user)
            else:
                extra.append(user)
    return NormCall(node=node, input=bound[x], weight=bound[w], bias=bound[b],
                    mean=bound.get(mean) if mean else None, var=bound.get(var) if var else None,
                    eps=float(bound[eps]), training=is_training, value=value, extra=extra)


# --------------------------------------------------------------------------------------------------
# Conv and linear calls

_CONVS = {f"aten::conv{d}d" for d in (1, 2, 3)}
_CONV_TRANSPOSES = {f"aten::conv_transpose{d}d" for d in (1, 2, 3)}
_TRANSPOSES_2D = {"aten::t", "aten::t_copy", "aten::numpy_T"}
_PERMUTES = {"aten::permute", "aten::permute_copy"}
_TRANSPOSE_DIMS = {"aten::transpose", "aten::transpose_copy"}


def is_transpose_2d(node: Any) -> bool:
    """Whether ``node`` transposes a 2-D tensor (``t``, ``permute(.., [1, 0])``, ``transpose(.., 0, 1)``)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    name = op_name(node.target)
    bound = bind(node)
    if bound is None:
        return False
    if name in _TRANSPOSES_2D:
        return True
    if name in _PERMUTES:
        return list(bound.get("dims") or ()) == [1, 0]
    if name in _TRANSPOSE_DIMS:
        return {bound.get("dim0"), bound.get("dim1")} in ({0, 1}, {0, -1}, {-2, 1}, {-2, -1})
    return False


@dataclass
class LayerCall:
    """A conv or linear node read from the graph.

    ``kind`` is ``"conv"``, ``"conv_transpose"`` or ``"linear"``. ``weight`` is the node holding the
    ``[out, in/groups, *k]`` (conv, linear) or ``[in, out/groups, *k]`` (transposed) weight;
    ``transposed_weight`` is the transpose node in between for ``addmm``/``mm`` (which read ``W.T``).
    ``zero_padding`` is True when the layer pads with zeros (a BatchNorm before it is then not exact).
    ``input_rank`` is the rank of its input when the graph proves it, else None.
    """

    node: fx.Node
    op: str
    kind: str
    input: Any
    weight: Any
    bias: Any
    groups: int
    zero_padding: bool
    input_rank: int | None
    transposed_weight: fx.Node | None = None

    @property
    def input_argument(self) -> str:
        return {"aten::addmm": "mat1", "aten::mm": "self"}.get(self.op, "input")


def _pads(padding: Any) -> bool:
    if isinstance(padding, str):
        return padding != "valid"
    if isinstance(padding, int):
        return padding != 0
    return any(p != 0 for p in padding)


def layer_call(node: fx.Node) -> LayerCall | None:
    """The conv or linear layer that ``node`` computes, or None."""
    if node.op != "call_function":
        return None
    name = op_name(node.target)
    if not name:
        return None
    bound = bind(node)
    if bound is None:
        return None
    if name in ("aten::convolution", "aten::_convolution"):
        transposed = bool(bound["transposed"])
        return LayerCall(node, name, "conv_transpose" if transposed else "conv", bound["input"], bound["weight"],
                         bound["bias"], int(bound["groups"]), _pads(bound["padding"]), rank(bound["input"]))
    if name in _CONVS or name in _CONV_TRANSPOSES:
        kind = "conv" if name in _CONVS else "conv_transpose"
        return LayerCall(node, name, kind, bound["input"], bound["weight"], bound["bias"], int(bound["groups"]),
                         _pads(bound["padding"]), rank(bound["input"]))
    if name == "aten::linear":
        return LayerCall(node, name, "linear", bound["input"], bound["weight"], bound["bias"], 1, False,
                         rank(bound["input"]))
    if name in ("aten::addmm", "aten::mm"):
        if name == "aten::addmm" and (bound.get("beta", 1) != 1 or bound.get("alpha", 1) != 1):
            return None
        mat2 = bound["mat2"]
        if not is_transpose_2d(mat2):
            return None
        source = mat2.args[0]
        bias = bound["self"] if name == "aten::addmm" else None
        x = bound["mat1"] if name == "aten::addmm" else bound["self"]
        return LayerCall(node, name, "linear", x, source, bias, 1, False, 2, transposed_weight=mat2)
    return None


# --------------------------------------------------------------------------------------------------
# Where tensors come from, and the edits a fold makes


def _writes(node: fx.Node) -> set[fx.Node]:
    """The nodes among ``node``'s arguments that its op writes into (schema alias ``(a!)``, or an in-place
    tensor method such as ``x.mul_(...)`` in a torch-level graph)."""
    if node.op == "call_method":
        name = str(node.target)
        first = node.args[0] if node.args else None
        if name.endswith("_") and not name.startswith("_") and isinstance(first, fx.Node):
            return {first}
        return set()
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is None:
        return set()
    written = set()
    for index, argument in enumerate(schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
            if isinstance(value, fx.Node):
                written.add(value)
    return written


def _get_attr(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


class Program:
    """An ExportedProgram's (or a GraphModule's) graph with its tensors, edited consistently.

    For an ExportedProgram, ``state_dict``, ``constants`` and ``input_specs``/``output_specs`` are the
    objects the edits go to (copies unless the program is edited in place); for a GraphModule the
    tensors are its attributes.
    """

    def __init__(self, gm: fx.GraphModule, *, state_dict: dict[str, Any] | None = None,
                 constants: dict[str, Any] | None = None, input_specs: list[InputSpec] | None = None,
                 output_specs: list[Any] | None = None):
        self.gm = gm
        self.graph = gm.graph
        self.exported = input_specs is not None
        self.state_dict = state_dict if state_dict is not None else {}
        self.constants = constants if constants is not None else {}
        self.input_specs = input_specs if input_specs is not None else []
        self.output_specs = output_specs if output_specs is not None else []
        self._spec = {spec.arg.name: spec for spec in self.input_specs if isinstance(spec.arg, TensorArgument)}
        mutated_targets = {spec.target for spec in self.output_specs
                           if spec.kind in (OutputKind.BUFFER_MUTATION, OutputKind.PARAMETER_MUTATION)}
        self._written: set[fx.Node] = set()
        for node in self.graph.nodes:
            self._written |= _writes(node)
        self._written_attributes = {n.target for n in self._written if n.op == "get_attr"}
        self._mutated = {name for name, spec in self._spec.items() if spec.target in mutated_targets}
        self.removed_modules: set[str] = set()

    @classmethod
    def of(cls, program: ExportedProgram | fx.GraphModule) -> Program:
        if isinstance(program, ExportedProgram):
            sig = program.graph_signature
            return cls(program.graph_module, state_dict=program.state_dict, constants=program.constants,
                       input_specs=sig.input_specs, output_specs=sig.output_specs)
        return cls(program)

    # ---------------------------------------------------------------- reading

    def source(self, node: Any) -> tuple[str, torch.Tensor] | str:
        """``(key, tensor)`` for a node that stands for a constant tensor, else why it is not one."""
        if not isinstance(node, fx.Node):
            return f"{node!r} is not a tensor of the graph"
        if node in self._written or (node.op == "get_attr" and node.target in self._written_attributes):
            return f"{node.name} is written in place by the graph"
        if node.op == "placeholder" and self.exported:
            spec = self._spec.get(node.name)
            if spec is None or spec.kind == InputKind.USER_INPUT:
                return f"{node.name} is an input of the program, not a parameter"
            if node.name in self._mutated:
                return f"{node.name} ({spec.target}) is a buffer the program mutates"
            assert spec.target is not None
            if spec.kind == InputKind.PARAMETER or (spec.kind == InputKind.BUFFER and spec.persistent):
                value = self.state_dict.get(spec.target)
            elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                value = self.constants.get(spec.target)
            else:
                return f"{node.name} is a {spec.kind.name.lower()} input"
            if not isinstance(value, torch.Tensor):
                return f"{node.name} ({spec.target}) has no tensor in the program"
            return spec.target, value
        if node.op == "placeholder":
            return f"{node.name} is an input of the graph, not a parameter"
        if node.op == "get_attr":
            try:
                value = _get_attr(self.gm, str(node.target))
            except AttributeError:
                return f"{node.name} reads {node.target}, which the module does not have"
            if not isinstance(value, torch.Tensor):
                return f"{node.name} ({node.target}) is not a tensor"
            return str(node.target), value
        return f"{node.name} is computed in the graph ({node.op} {op_name(node.target) or node.target})"

    def kind(self, node: fx.Node) -> str:
        """``"parameter"``, ``"buffer"`` or ``"constant"``: what a new tensor like ``node``'s should be."""
        if node.op == "placeholder" and self.exported:
            spec = self._spec[node.name]
            return {InputKind.PARAMETER: "parameter", InputKind.BUFFER: "buffer"}.get(spec.kind, "constant")
        value = _get_attr(self.gm, str(node.target))
        if isinstance(value, nn.Parameter):
            return "parameter"
        owner_path, _, leaf = str(node.target).rpartition(".")
        owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
        return "buffer" if leaf in owner._buffers else "constant"

    # ---------------------------------------------------------------- editing

    def _taken(self, key: str) -> bool:
        if self.exported:
            return key in self.state_dict or key in self.constants or any(s.target == key for s in self.input_specs)
        try:
            _get_attr(self.gm, key)
        except AttributeError:
            return False
        return True

    def unique_key(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``, ... : the first that no tensor of the program has."""
        key, count = base, 0
        while self._taken(key):
            count += 1
            key = f"{base}_{count}"
        return key

    def replace_value(self, node: fx.Node, value: torch.Tensor) -> None:
        """Give the tensor that ``node`` stands for a new value (same shape and dtype), keeping its kind."""
        found = self.source(node)
        assert not isinstance(found, str)
        key, old = found
        if isinstance(old, nn.Parameter):
            value = nn.Parameter(value, requires_grad=old.requires_grad)
        if self.exported:
            spec = self._spec[node.name]
            table = self.state_dict if (spec.kind == InputKind.PARAMETER or
                                        (spec.kind == InputKind.BUFFER and spec.persistent)) else self.constants
            table[key] = value
            return
        owner_path, _, leaf = key.rpartition(".")
        owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
        if leaf in owner._parameters:
            owner._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = value
        else:
            setattr(owner, leaf, value)

    def add_tensor(self, key: str, value: torch.Tensor, kind: str, before: fx.Node, like: fx.Node | None,
                   requires_grad: bool = False) -> fx.Node:
        """A new parameter / buffer / constant ``key`` holding ``value`` and the node that reads it."""
        if kind == "parameter":
            value = nn.Parameter(value, requires_grad=requires_grad)
        if self.exported:
            return self._add_placeholder(key, value, kind, like)
        owner_path, _, leaf = key.rpartition(".")
        owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
        if kind == "parameter":
            owner.register_parameter(leaf, value)  # type: ignore[arg-type]
        elif kind == "buffer":
            owner.register_buffer(leaf, value)
        else:
            setattr(owner, leaf, value)
        with self.graph.inserting_before(before):
            node = self.graph.get_attr(key)
        self._copy_meta(node, value, like)
        return node

    def _add_placeholder(self, key: str, value: torch.Tensor, kind: str, like: fx.Node | None) -> fx.Node:
        spec_kind = {"parameter": InputKind.PARAMETER, "buffer": InputKind.BUFFER}.get(kind, InputKind.CONSTANT_TENSOR)
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        # After the last input of the same kind (the signature lists parameters, buffers, constants, user inputs).
        order = [InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR]
        rank_of = {k: i for i, k in enumerate(order)}
        position = 0
        for index, spec in enumerate(self.input_specs):
            if rank_of.get(spec.kind, len(order)) <= rank_of[spec_kind]:
                position = index + 1
        prefix = {"parameter": "p_", "buffer": "b_"}.get(kind, "c_")
        name = prefix + key.replace(".", "_")
        if position < len(placeholders):
            context = self.graph.inserting_before(placeholders[position])
        else:
            first_other = next((n for n in self.graph.nodes if n.op != "placeholder"), None)
            context = self.graph.inserting_before(first_other)
        with context:
            node = self.graph.placeholder(name)
        spec = InputSpec(kind=spec_kind, arg=TensorArgument(name=node.name), target=key,
                         persistent=True if spec_kind == InputKind.BUFFER else None)
        self.input_specs.insert(position, spec)
        self._spec[node.name] = spec
        if spec_kind == InputKind.CONSTANT_TENSOR:
            self.constants[key] = value
        else:
            self.state_dict[key] = value
        self._copy_meta(node, value, like)
        return node

    def _copy_meta(self, node: fx.Node, value: torch.Tensor, like: fx.Node | None) -> None:
        if like is None:
            return
        fake = like.meta.get("val")
        fake_mode = getattr(fake, "fake_mode", None)
        if fake_mode is not None:
            node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)
        elif "tensor_meta" in like.meta:
            from torch.fx.passes.shape_prop import _extract_tensor_metadata
            node.meta["tensor_meta"] = _extract_tensor_metadata(value)

    def remove_if_unused(self, node: Any) -> None:
        """Remove a parameter/buffer/constant node nothing reads any more, with its tensor where nothing else
        refers to it."""
        if not isinstance(node, fx.Node) or node.users or node.op not in ("placeholder", "get_attr"):
            return
        if self.exported:
            spec = self._spec.get(node.name)
            if node.op != "placeholder" or spec is None or spec.kind == InputKind.USER_INPUT:
                return
            self._remove_spec(node, spec)
            return
        if node.op == "get_attr":
            target = str(node.target)
            self.graph.erase_node(node)
            if not any(n.op == "get_attr" and n.target == target for n in self.graph.nodes):
                self._delete_attribute(target)
                self.removed_modules.add(target.rpartition(".")[0])

    def _remove_spec(self, node: fx.Node, spec: InputSpec) -> None:
        self.graph.erase_node(node)
        self.input_specs.remove(spec)
        del self._spec[node.name]
        target = spec.target
        if target is not None and not any(s.target == target for s in self.input_specs):
            self.state_dict.pop(target, None)
            self.constants.pop(target, None)
            self.removed_modules.add(target.rpartition(".")[0])

    def _delete_attribute(self, target: str) -> None:
        owner_path, _, leaf = target.rpartition(".")
        owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
        for table in (owner._parameters, owner._buffers):
            if leaf in table:
                del table[leaf]
                return
        if hasattr(owner, leaf):
            delattr(owner, leaf)

    def remove_orphaned_buffers(self) -> None:
        """Buffers nothing reads of the modules whose every tensor the folds removed (a folded BatchNorm's
        ``num_batches_tracked``)."""
        if not self.removed_modules:
            return
        def module_of(key: str | None) -> str | None:
            return None if key is None else key.rpartition(".")[0]
        if self.exported:
            read_nodes = {n.name for n in self.graph.nodes if n.op == "placeholder" and n.users}
            live = {module_of(s.target) for s in self.input_specs
                    if s.kind != InputKind.USER_INPUT and s.arg.name in read_nodes}
            for spec in list(self.input_specs):
                if spec.kind != InputKind.BUFFER or module_of(spec.target) not in self.removed_modules:
                    continue
                if module_of(spec.target) in live or spec.target in {s.target for s in self.output_specs}:
                    continue
                node = self._node(spec.arg.name)
                if node is not None and not node.users:
                    self._remove_spec(node, spec)
            return
        for node in list(self.graph.nodes):
            if node.op != "get_attr" or node.users or module_of(str(node.target)) not in self.removed_modules:
                continue
            owner_path, _, leaf = str(node.target).rpartition(".")
            owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
            if leaf in owner._buffers:
                self.graph.erase_node(node)
        read = {module_of(str(n.target)) for n in self.graph.nodes if n.op == "get_attr"}
        for path in self.removed_modules - read:
            try:
                owner = self.gm.get_submodule(path) if path else self.gm
            except AttributeError:
                continue
            if path and not owner._parameters and not list(owner.children()):
                for leaf in list(owner._buffers):
                    del owner._buffers[leaf]

    def _node(self, name: str) -> fx.Node | None:
        return next((n for n in self.graph.nodes if n.op == "placeholder" and n.name == name), None)

    def rename_output(self, old: str, new: str) -> None:
        """An output spec (or module call signature) that named ``old`` names ``new`` after a fold replaced it."""
        for spec in self.output_specs:
            if isinstance(spec.arg, TensorArgument) and spec.arg.name == old:
                spec.arg = TensorArgument(name=new)



# --------------------------------------------------------------------------------------------------
# Torch-level graphs: module calls as the functional calls they make

_CONV_FUNCTIONS = {nn.Conv1d: torch.conv1d, nn.Conv2d: torch.conv2d, nn.Conv3d: torch.conv3d}
_CONV_TRANSPOSE_FUNCTIONS = {nn.ConvTranspose1d: torch.conv_transpose1d, nn.ConvTranspose2d: torch.conv_transpose2d,
                             nn.ConvTranspose3d: torch.conv_transpose3d}
_NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or getattr(module, "_parametrizations", None))


def functional_calls(gm: fx.GraphModule) -> list[fx.Node]:
    """Replace each call of a conv, transposed conv, linear or eval-mode BatchNorm module by the functional call
    its forward makes, reading the module's tensors with ``get_attr`` (so the folds see one node per call and the
    tensors' own nodes). Modules with hooks or parametrizations, convs that pad other than with zeros, transposed
    convs given an ``output_size`` and BatchNorms in training mode (whose forward also counts batches) stay module
    calls. Returns the norm module calls left, for the report."""
    graph = gm.graph
    left = []
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        kind = type(module)
        if isinstance(module, nn.modules.batchnorm._NormBase) and (kind not in _NORM_MODULES or module.training
                                                                   or not module.track_running_stats):
            left.append(node)
            continue
        if _hooked(module) or len(node.args) != 1 or node.kwargs:
            if isinstance(module, nn.modules.batchnorm._NormBase):
                left.append(node)
            continue
        prefix = str(node.target)

        def attr(name: str, prefix: str = prefix, module: nn.Module = module) -> fx.Node | None:
            return graph.get_attr(f"{prefix}.{name}") if getattr(module, name, None) is not None else None

        with graph.inserting_before(node):
            if kind in _CONV_FUNCTIONS and module.padding_mode == "zeros":
                args: tuple = (node.args[0], attr("weight"), attr("bias"), module.stride, module.padding,
                               module.dilation, module.groups)
                function: Any = _CONV_FUNCTIONS[kind]
            elif kind in _CONV_FUNCTIONS and not isinstance(module.padding, str):
                # What _ConvNd._conv_forward does for reflect/replicate/circular: pad, then convolve unpadded.
                conv: Any = module
                padded = graph.call_function(F.pad, (node.args[0], list(conv._reversed_padding_repeated_twice),
                                                     conv.padding_mode))
                args = (padded, attr("weight"), attr("bias"), conv.stride, (0,) * len(conv.kernel_size),
                        conv.dilation, conv.groups)
                function = _CONV_FUNCTIONS[kind]
            elif kind in _CONV_TRANSPOSE_FUNCTIONS and module.padding_mode == "zeros":
                args = (node.args[0], attr("weight"), attr("bias"), module.stride, module.padding,
                        module.output_padding, module.groups, module.dilation)
                function = _CONV_TRANSPOSE_FUNCTIONS[kind]
            elif kind is nn.Linear:
                args = (node.args[0], attr("weight"), attr("bias"))
                function = F.linear
            elif kind in _NORM_MODULES:
                args = (node.args[0], attr("running_mean"), attr("running_var"), attr("weight"), attr("bias"), False,
                        0.0, module.eps)
                function = F.batch_norm
            else:
                continue
            call = graph.call_function(function, args)
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    gm.recompile()
    return left

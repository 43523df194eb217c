"""Rewriting a block whose forward computes a merged sum.

The sum is computed by the block's own code, so merging changes what the block runs. The block is
traced on its own -- every child module stays a call (keeping its class) except those between the
block and the merged nodes, which are traced through -- the merged parts of the graph are replaced by
calls of the new layers, and the block is replaced, under the same name, by a ``torch.fx.GraphModule``
of that graph: it runs the merged layer and whatever the block did around the sum (activation, SE,
...), with every kept child at its old name. When the block did nothing but the sum, the merged layer
itself takes its place.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..graph import LeafTracer, ModelIndex, Region, TensorArgument
from .analysis import Expr, Group, Sum, SumRoot, constant_nodes, expression_nodes

__all__ = ["BlockTracer", "trace_block", "fixed_arguments", "VaryingArguments", "MergeEdit", "rewrite_graph",
           "build_block", "bare_layer"]

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")


class BlockTracer(LeafTracer):
    """Traces one block: every module is a leaf except those in ``through`` (looked into)."""

    def __init__(self, index: ModelIndex, through: set[int]):
        super().__init__(index)
        self.through = through

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) not in self.through


def trace_block(index: ModelIndex, block: nn.Module, name: str, through: set[int],
                fixed: dict[str, object] | None = None) -> Region:
    """The block's forward as a graph, with the arguments in ``fixed`` taken as those values (see
    :func:`fixed_arguments`); raises whatever torch.fx raises when it cannot be traced."""
    tracer = BlockTracer(index, through)
    graph = tracer.trace(block, concrete_args=fixed or None)
    if fixed:
        # torch.fx renames the placeholder of a fixed argument ('mask_1', guarded by an assert that it keeps its
        # value): the rewritten forward must still take it by its own name, as its callers pass it.
        placeholders = [node for node in graph.nodes if node.op == "placeholder"]
        parameters = list(inspect.signature(block.forward).parameters.values())
        if len(placeholders) == len(parameters):
            for node, parameter in zip(placeholders, parameters, strict=True):
                prefix = ("*" if parameter.kind == inspect.Parameter.VAR_POSITIONAL
                          else "**" if parameter.kind == inspect.Parameter.VAR_KEYWORD else "")
                node.target = prefix + parameter.name
    return Region(name, block, graph, tracer.target_modules)


class VaryingArguments(ValueError):
    """A block is called with different non-tensor arguments at different sites: one graph cannot run them all."""


def _holds_tensor(value: object) -> bool:
    """Whether a recorded argument is (or holds) a tensor: a proxy while tracing, a tensor seen while running."""
    if isinstance(value, (fx.Proxy, TensorArgument, torch.Tensor)):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return False


def fixed_arguments(block: nn.Module, calls: list[tuple[tuple, dict]]) -> dict[str, object]:
    """The arguments of ``block.forward`` that the callers' code fixes, by name: a value that is not a tensor
    (None, a flag, a number, a default left out) and the same at every call recorded (while tracing the model,
    or while running it on example inputs).

    Tracing the block on its own with such an argument as a proxy would take the wrong side of its ``if mask
    is not None`` and bake that into the rewritten forward. Raises :class:`VaryingArguments` when an argument
    is fixed at one call and different (or a tensor) at another, or when no call was recorded and the forward
    has optional arguments (the block's callers could not be traced: what they pass is unknown).
    """
    try:
        signature = inspect.signature(block.forward)
    except (TypeError, ValueError):
        return {}
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    if not calls:
        optional = [p.name for p in list(signature.parameters.values())[1:]
                    if p.kind in variadic or p.default is not inspect.Parameter.empty]
        if optional:
            raise VaryingArguments(f"the code that calls it could not be traced, and its forward has optional "
                                   f"arguments ({', '.join(optional)}) whose values are unknown; pass "
                                   f"example_inputs")
        return {}
    seen: dict[str, list[object]] = {}
    for args, kwargs in calls:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return {}
        bound.apply_defaults()
        for pname, value in bound.arguments.items():
            if signature.parameters[pname].kind not in variadic:
                seen.setdefault(pname, []).append(value)
    fixed: dict[str, object] = {}
    for pname, values in seen.items():
        proxies = [_holds_tensor(v) for v in values]
        if all(proxies):
            continue
        if any(proxies) or any(isinstance(v, torch.Tensor) for v in values):
            raise VaryingArguments(f"its argument '{pname}' is a tensor at some calls and a fixed value at others")
        first = values[0]
        if any(type(v) is not type(first) or v != first for v in values[1:]):
            shown = ", ".join(sorted({repr(v) for v in values}))
            raise VaryingArguments(f"it is called with different values of '{pname}' ({shown})")
        fixed[pname] = first
    return fixed


@dataclass
class MergeEdit:
    """One merge to apply to a block's graph: the groups of ``root`` that merge, each with its new layer's name."""

    root: SumRoot
    groups: list[tuple[Group, str]]            # (group, attribute name of the new layer in the block)
    full: bool                                 # the whole expression (sum and what follows it) merges
    modules: dict[str, nn.Module] = field(default_factory=dict)


def _chain(graph: fx.Graph, pieces: list[tuple[float, fx.Node]]) -> fx.Node:
    """``sum(c * node)`` as graph nodes, added left to right."""
    result: fx.Node | None = None
    for coefficient, node in pieces:
        if result is None:
            if coefficient == 1:
                result = node
            elif coefficient == -1:
                result = graph.call_function(torch.neg, (node,))
            else:
                result = graph.call_function(torch.mul, (node, coefficient))
        elif coefficient == 1:
            result = graph.call_function(torch.add, (result, node))
        elif coefficient == -1:
            result = graph.call_function(torch.sub, (result, node))
        else:
            result = graph.call_function(torch.add, (result, node), {"alpha": coefficient})
    if result is None:
        raise ValueError("an empty sum cannot be rebuilt")
    return result


def _top(expr: Expr) -> fx.Node:
    if isinstance(expr, Sum):
        return expr.nodes[0]
    return expr.node


def rewrite_graph(graph: fx.Graph, edits: list[MergeEdit]) -> None:
    """Replace each edit's merged parts by calls of its new layers and erase the nodes they computed."""
    erase: set[fx.Node] = set()
    constants: set[fx.Node] = set()  # erased only where nothing else reads them
    # One edit's result can be another's source (a sum, then an identity, feeding a second sum's branches):
    # the nodes each edit found are those of the graph before any edit, so follow what replaced them.
    replaced: dict[fx.Node, fx.Node] = {}

    def current(node: fx.Node) -> fx.Node:
        while node in replaced:
            node = replaced[node]
        return node

    for edit in edits:
        root = edit.root
        if edit.full:
            (group, name), = edit.groups
            with graph.inserting_before(root.top):
                merged = graph.call_module(name, (current(group.source),))
            root.top.replace_all_uses_with(merged)
            replaced[root.top] = merged
            expr = root.expr if root.expr is not None else root.sum
            erase.update(expression_nodes(expr))
            constants.update(constant_nodes(expr))
            erase.add(root.top)
            continue
        pieces: list[tuple[float, fx.Node]] = []
        merged_groups = {id(g) for g, _ in edit.groups}
        with graph.inserting_before(root.node):
            for group, name in edit.groups:
                pieces.append((1.0, graph.call_module(name, (current(group.source),))))
                for _, term in group.terms:
                    erase.update(expression_nodes(term))
                    constants.update(constant_nodes(term))
            for group in root.groups:
                if id(group) not in merged_groups:
                    pieces += [(c, current(_top(term))) for c, term in group.terms]
            rebuilt = _chain(graph, pieces)
        root.node.replace_all_uses_with(rebuilt)
        replaced[root.node] = rebuilt
        erase.update(root.sum.nodes)
        for constant in root.sum.constants:
            erase.update(constant.nodes)
            constants.update(constant.nodes)
    for node in reversed(list(graph.nodes)):
        if node not in erase:
            continue
        if node.users:
            if node in constants:
                continue  # a constant (or a reshape of one) still read elsewhere
            raise RuntimeError(f"internal error: node '{node.name}' of a merged expression is still used by "
                               f"{[u.name for u in node.users]}")
        graph.erase_node(node)
    graph.lint()


def _fetch(root: nn.Module, target: str):
    return functools.reduce(getattr, target.split("."), root)


def bare_layer(graph: fx.Graph) -> str | None:
    """The target of the one module a graph calls, when the graph is just ``output(module(input))``."""
    nodes = list(graph.nodes)
    if len(nodes) != 3:
        return None
    placeholder, call, output = nodes
    if (placeholder.op == "placeholder" and call.op == "call_module" and call.args == (placeholder,)
            and not call.kwargs and output.op == "output" and output.args == (call,)):
        return str(call.target)
    return None


def build_block(block: nn.Module, graph: fx.Graph, new_modules: dict[str, nn.Module],
                replacements: dict[int, nn.Module]) -> nn.Module:
    """What replaces ``block``: the merged layer itself when the block's rewritten forward only calls it (as a
    model's own re-parameterisation would leave it), else a GraphModule running ``graph`` with ``block``'s
    children (or their replacements) and the new layers. The block's forward hooks are kept."""
    target = bare_layer(graph)
    if target is not None and target in new_modules:
        layer = new_modules[target]
        _copy_hooks(block, layer)
        return layer
    attributes: dict[str, object] = {}
    for node in graph.nodes:
        if node.op not in ("call_module", "get_attr") or node.target in attributes:
            continue
        target = str(node.target)
        if target in new_modules:
            attributes[target] = new_modules[target]
            continue
        value = _fetch(block, target)
        if isinstance(value, nn.Module):
            value = replacements.get(id(value), value)
        attributes[target] = value
    # Unpickling a GraphModule re-traces its code with the tracer class recorded here, constructed without
    # arguments; the default tracer keeps every module a call (pickling and torch.save must work).
    graph._tracer_cls = None
    module = fx.GraphModule(attributes, graph, class_name=f"{type(block).__name__}Reparameterized")
    module.training = block.training
    for child in module.modules():
        if type(child) is nn.Module:  # containers fx creates for dotted targets
            child.training = block.training
    _copy_hooks(block, module)
    return module


def _copy_hooks(source: nn.Module, target: nn.Module) -> None:
    for name in _HOOK_DICTS:
        hooks = getattr(source, name, None)
        if hooks:
            getattr(target, name).update(hooks)


def free_name(taken: set[str], base: str) -> str:
    """An attribute name for a new layer that no other attribute of the rewritten block uses (``taken``)."""
    name, counter = base, 0
    while name in taken:
        counter += 1
        name = f"{base}_{counter}"
    taken.add(name)
    return name


def modules_called(graph: fx.Graph, root: nn.Module) -> set[int]:
    """Ids of the modules a graph calls or reads from, and of everything inside them."""
    found: set[int] = set()
    for node in graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        target = str(node.target)
        parts = target.split(".")
        for depth in range(1, len(parts) + 1):
            try:
                value = _fetch(root, ".".join(parts[:depth]))
            except AttributeError:
                break
            if isinstance(value, nn.Module):
                found.add(id(value))
                if depth == len(parts):
                    found.update(id(m) for m in value.modules())
    return found

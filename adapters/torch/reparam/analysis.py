"""Finding sums of affine branches in a traced graph.

A *sum* is an add/sub node (``+``, ``-``, ``+=``, ``torch.add``/``sub`` with ``alpha``, ``Tensor.add``/
``add_``/``sub``/``sub_``; Python's ``sum`` of a list traces as a chain of adds). Chains of sums whose
intermediate results feed nothing else are flattened into one list of signed *terms*. Each term is
walked down through the operations that are affine per channel or convolutions --

- a conv or linear layer (``classify_layer``), a recognised norm in eval semantics, an identity or
  dropout layer, an average pool that is a convolution (``count_include_pad=True`` or no padding,
  ``ceil_mode=False``);
- a product or quotient by a constant (a Python number or a tensor read from the model: a layer
  scale), a negation;
- a nested sum --

for as long as each intermediate result feeds only the next operation. Where the walk stops is the
term's *source*: usually the tensor ``x`` the block's branches all read (it feeds several branches).
Terms with the same source form a *group*; a group that contains a conv or linear layer and adds at
least two tensors is a merge candidate. When every term of a sum has the same source, norms,
scales and identities applied to the sum's result (RepViT's ``bn(conv(x) + conv1(x) + x)``) join
the expression, inside the same block.

Everything here reads the graph; nothing is computed or changed (see ``kernels`` and ``rewrite``).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import fx, nn

import refimpl

from ..graph import LayerKind, ModelIndex, Region, describe_node, is_identity_in_eval, value_users
from ..norms import NormInfo, forward_hooks

__all__ = ["Source", "Apply", "Scale", "Sum", "Constant", "Expr", "Group", "SumRoot", "find_sums", "sum_operands",
           "expression_nodes", "constant_nodes", "layers_in", "describe", "source_of", "avg_pool_geometry"]


@dataclass(eq=False)
class Source:
    """Where the walk down a branch stopped: the tensor the branch is an affine function of.

    ``stop`` says why: ``shared`` (the value feeds several operations), ``input`` (a placeholder or
    a constant), ``nonlinear`` (an operation that is not affine), ``unsupported`` (affine, but not
    a convolution: a transposed conv, an average pool that excludes its padding), ``inplace`` (an
    in-place operation writes into a tensor that is also used elsewhere), ``mixed`` (a sum whose
    operands come from different sources, nested where it cannot be flattened).
    """

    node: fx.Node
    stop: str
    detail: str = ""


@dataclass(eq=False)
class Apply:
    """A module applied to an affine expression: ``role`` is conv, linear, norm, pool or identity."""

    node: fx.Node
    role: str
    module: nn.Module
    inner: Expr


@dataclass(eq=False)
class Scale:
    """An expression times a constant (float64 scalar or tensor as it broadcasts in the model)."""

    node: fx.Node
    factor: float | torch.Tensor
    constant_nodes: tuple[fx.Node, ...]
    inner: Expr
    text: str


@dataclass(eq=False)
class Constant:
    """A constant operand of a sum (a Python number, or a tensor read from the model)."""

    value: float | torch.Tensor
    nodes: tuple[fx.Node, ...]
    text: str


@dataclass(eq=False)
class Sum:
    """A flattened sum: ``sum(c * term) + sum(constants)``. ``nodes`` are its add/sub nodes, the top one first
    (empty for a group taken out of a larger sum)."""

    nodes: tuple[fx.Node, ...]
    terms: list[tuple[float, Expr]]
    constants: list[Constant]


Expr = Source | Apply | Scale | Sum


@dataclass(eq=False)
class Group:
    """The terms of a sum that share one source; ``mergeable`` when they are worth one merged layer."""

    source: fx.Node
    terms: list[tuple[float, Expr]]
    mergeable: bool


@dataclass(eq=False)
class SumRoot:
    """A maximal sum in a region, with its groups, or the reason nothing in it can merge.

    ``expr`` is the whole affine expression (including norms/scales after the sum) when every term has
    the same source, else None. ``top`` is the node whose value the merged layer replaces: the last of
    those operations after the sum, or the sum itself. ``block_keys`` are the ``nn_module_stack`` keys
    of the innermost module whose forward contains every node of the sum and its branches (empty: the
    traced root itself).
    """

    region: Region
    node: fx.Node
    top: fx.Node
    sum: Sum
    expr: Expr | None
    groups: list[Group]
    block_keys: tuple[str, ...]
    block_path: str | None                            # the block's path in the region root; None: the root itself
    left: tuple[str, str] | None = None
    through: set[str] = field(default_factory=set)    # paths (in the region root) of the modules between the block
                                                      # and the expression's nodes: its rewrite traces through them

    @property
    def mergeable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.mergeable]


# -- op classification ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Op:
    """What a node does to its one tensor input, when that is affine: ``role`` conv, linear, norm, pool, identity
    (with ``module``) or scale (with ``factor``, ``constant_nodes``, ``text``); or ``stop`` (a recognised layer that
    cannot take part, with ``stop``/``detail`` as in :class:`Source`)."""

    role: str
    input: fx.Node | None = None
    module: nn.Module | None = None
    factor: float | torch.Tensor = 1.0
    constant_nodes: tuple[fx.Node, ...] = ()
    text: str = ""
    stop: str = ""
    detail: str = ""


_ADD_FUNCTIONS = {operator.add: 1.0, operator.iadd: 1.0, operator.sub: -1.0, operator.isub: -1.0}
_TORCH_SUMS = {torch.add: 1.0, torch.sub: -1.0, torch.subtract: -1.0}
_SUM_METHODS = {"add": 1.0, "add_": 1.0, "sub": -1.0, "sub_": -1.0, "subtract": -1.0}
_MUL_FUNCTIONS = (operator.mul, operator.imul, torch.mul, torch.multiply)
_DIV_FUNCTIONS = (operator.truediv, operator.itruediv, torch.div, torch.true_divide, torch.divide)
_MUL_METHODS = ("mul", "mul_", "multiply")
_DIV_METHODS = ("div", "div_", "true_divide", "divide")
_NEG_FUNCTIONS = (operator.neg, torch.neg, torch.negative)
_NEG_METHODS = ("neg", "neg_", "negative")
_INPLACE_METHODS = ("add_", "sub_", "mul_", "div_", "neg_")
# Operations that only reshape or convert a constant read from the model (layer scale gamma.view(1, -1, 1, 1)).
_CONSTANT_METHODS = ("view", "reshape", "unsqueeze", "squeeze", "flatten", "expand", "contiguous", "clone", "detach",
                     "float", "double", "half", "bfloat16", "to", "type_as")
_CONSTANT_FUNCTIONS = (torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sum_operands(node: fx.Node) -> list[tuple[float, object]] | None:
    """``[(coefficient, operand), ...]`` when ``node`` is a sum or difference of two values, else None."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        if len(node.args) != 2 or node.kwargs:
            return None
        return [(1.0, node.args[0]), (_ADD_FUNCTIONS[node.target], node.args[1])]
    if node.op == "call_function" and node.target in _TORCH_SUMS:
        sign = _TORCH_SUMS[node.target]
    elif node.op == "call_method" and node.target in _SUM_METHODS:
        sign = _SUM_METHODS[node.target]
    else:
        return None
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        return None
    alpha = node.kwargs.get("alpha", 1)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        return None
    operands: list[tuple[float, object]] = [(1.0, node.args[0]), (sign * float(alpha), node.args[1])]
    return operands if any(isinstance(a, fx.Node) for _, a in operands) else None


def _fetch(root: nn.Module, target: str):
    return functools.reduce(getattr, target.split("."), root)


def _stack(node: fx.Node) -> list[tuple[str, str]]:
    """``(key, path)`` of the modules whose forward created ``node``, outermost first (a leaf's own entry dropped).

    torch.fx records them in ``node.meta["nn_module_stack"]``; a key names one call of a module, the path
    is the module's qualified name in the traced root.
    """
    stack = node.meta.get("nn_module_stack") or {}
    entries = [(str(key), str(value[0])) for key, value in stack.items()]
    if node.op == "call_module" and entries and entries[-1][1] == node.target:
        entries.pop()
    return entries


def _stack_keys(node: fx.Node) -> tuple[str, ...]:
    return tuple(key for key, _ in _stack(node))




# -- the walk -------------------------------------------------------------------------------

class SumFinder:
    """Finds every maximal sum of a region's graph and its affine branches."""

    def __init__(self, index: ModelIndex, region: Region):
        self.index = index
        self.region = region
        self._constants: dict[fx.Node, tuple[torch.Tensor, tuple[fx.Node, ...]] | None] = {}

    # constants ---------------------------------------------------------------------------
    def constant(self, value) -> tuple[float | torch.Tensor, tuple[fx.Node, ...]] | None:
        """A number, or a tensor computed from the model's parameters/buffers only: (float64 value, nodes)."""
        if _number(value):
            return float(value), ()
        if not isinstance(value, fx.Node):
            return None
        if value not in self._constants:
            self._constants[value] = self._evaluate_constant(value)
        return self._constants[value]

    def _evaluate_constant(self, node: fx.Node) -> tuple[torch.Tensor, tuple[fx.Node, ...]] | None:
        if node.op == "get_attr":
            try:
                tensor = _fetch(self.region.root, str(node.target))
            except AttributeError:
                return None
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.is_meta:
                return None
            return tensor.detach().to(torch.float64), (node,)
        if node.op not in ("call_method", "call_function") or not node.args:
            return None
        if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
            # Indexing a constant with fixed indices (gamma[:, None, None]) gives a constant.
            base = self.constant(node.args[0])
            index_nodes: list[fx.Node] = []
            fx.node.map_arg(node.args[1], index_nodes.append)
            if base is None or not isinstance(base[0], torch.Tensor) or index_nodes:
                return None
            try:
                value = base[0][cast(tuple, node.args[1])]  # no node inside: plain ints, slices, None, Ellipsis
            except (IndexError, TypeError, ValueError, RuntimeError):
                return None
            return value, base[1] + (node,)
        if (node.op == "call_method" and node.target in _CONSTANT_METHODS) or (
                node.op == "call_function" and node.target in _CONSTANT_FUNCTIONS):
            base = self.constant(node.args[0])
            if base is None or not isinstance(base[0], torch.Tensor):
                return None
            rest = node.args[1:]
            if any(isinstance(a, fx.Node) for a in rest) or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
                return None
            name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
            if name in ("float", "double", "half", "bfloat16", "to", "type_as", "contiguous", "clone", "detach"):
                value = base[0]  # a conversion: the constant is kept exact in float64
            else:
                try:
                    value = getattr(base[0], name)(*rest, **node.kwargs)
                except (RuntimeError, TypeError, ValueError):
                    return None
            return value, base[1] + (node,)
        return None

    # classification ----------------------------------------------------------------------
    def _unary(self, node: fx.Node) -> _Op | None:
        """What ``node`` does, when it is an affine per-channel op or a conv/linear layer of one input, or a
        recognised layer that cannot take part; None for anything else."""
        region, index = self.region, self.index
        if node.op == "call_module":
            if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
                return None
            module = region.module(node)
            source = node.args[0]
            if forward_hooks(module):
                return _Op("stop", stop="nonlinear", detail=f"{describe_node(node)} has forward hooks "
                           f"({', '.join(forward_hooks(module))}): what it computes is not known")
            if is_identity_in_eval(module):
                return _Op("identity", source, module)
            verdict = index.norms.get(id(module))
            if isinstance(verdict, NormInfo):
                if verdict.has_act and not (is_identity_in_eval(cast(nn.Module, module.drop))
                                            and is_identity_in_eval(cast(nn.Module, module.act))):
                    return None
                return _Op("norm", source, module)
            if verdict is not None:
                return _Op("stop", stop="nonlinear", detail=f"{describe_node(node)}: {verdict.detail}")
            kind, refusal = index.layer(module)
            if kind == LayerKind.CONV:
                return _Op("conv", source, module)
            if kind == LayerKind.LINEAR:
                return _Op("linear", source, module)
            if kind == LayerKind.CONV_TRANSPOSE:
                return _Op("stop", stop="unsupported", detail=f"{describe_node(node)} is a transposed conv")
            if refusal:
                return _Op("stop", stop="unsupported", detail=f"{describe_node(node)} ({type(module).__qualname__}) "
                           f"cannot be merged: {refusal}")
            pool = next((b for b in _AVG_POOLS if isinstance(module, b)), None)
            if pool is not None and type(module).forward is pool.forward:
                why = _avg_pool_refusal(module)
                if why:
                    return _Op("stop", stop="unsupported", detail=f"{describe_node(node)}: {why}")
                return _Op("pool", source, module)
            return None
        first = node.args[0] if node.args else None
        if node.op == "call_function" and node.target in _NEG_FUNCTIONS or (
                node.op == "call_method" and node.target in _NEG_METHODS):
            if len(node.args) != 1 or node.kwargs or not isinstance(first, fx.Node):
                return None
            return _Op("scale", first, factor=-1.0, text="-1")
        is_mul = (node.op == "call_function" and node.target in _MUL_FUNCTIONS) or (
            node.op == "call_method" and node.target in _MUL_METHODS)
        is_div = (node.op == "call_function" and node.target in _DIV_FUNCTIONS) or (
            node.op == "call_method" and node.target in _DIV_METHODS)
        if not (is_mul or is_div) or len(node.args) != 2 or node.kwargs:
            return None
        left, right = node.args
        inplace = node.op == "call_method" and node.target in _INPLACE_METHODS
        orders = [(left, right)] if (is_div or inplace) else [(left, right), (right, left)]
        for tensor, other in orders:
            if not isinstance(tensor, fx.Node) or self.constant(tensor) is not None:
                continue
            found = self.constant(other)
            if found is None:
                continue
            value, nodes = found
            text = _constant_text(other, value)
            if is_div:
                if isinstance(value, torch.Tensor):
                    if not bool((value != 0).all()):
                        return None
                    value = 1.0 / value
                else:
                    if value == 0:
                        return None
                    value = 1.0 / value
                text = f"1/{text}"
            return _Op("scale", tensor, factor=value, constant_nodes=nodes, text=text)
        return None

    # the walk ----------------------------------------------------------------------------
    def operand(self, node: fx.Node) -> Expr:
        """The affine expression an operand computes: looked into only when it feeds nothing else."""
        if len(value_users(node)) != 1:
            return Source(node, "shared")
        return self.inside(node)

    def inside(self, node: fx.Node) -> Expr:
        if node.op in ("placeholder", "get_attr"):
            return Source(node, "input")
        if sum_operands(node) is not None:
            flat = self.flatten(node)
            if len({_source_node(t) for _, t in flat.terms}) > 1:
                return Source(node, "mixed")
            return flat
        op = self._unary(node)
        if op is None:
            return Source(node, "nonlinear", f"{describe_node(node)} is not an affine map known to bnfold")
        if op.input is None:
            return Source(node, op.stop, op.detail)
        if node.op == "call_method" and node.target in _INPLACE_METHODS and len(value_users(op.input)) != 1:
            return Source(node, "inplace", f"{describe_node(node)} writes into '{op.input.name}', which is also "
                          "used elsewhere")
        return _apply(node, op, self.operand(op.input))

    def flatten(self, node: fx.Node) -> Sum:
        """The signed terms of the sum at ``node`` in operand order, nested sums that feed only it included."""
        terms: list[tuple[float, Expr]] = []
        constants: list[Constant] = []
        nodes: list[fx.Node] = [node]
        # An explicit stack of operand iterators keeps the order of the operands without deep recursion.
        stack = [(1.0, node, iter(enumerate(sum_operands(node) or [])))]
        while stack:
            coefficient, current, operands = stack[-1]
            step = next(operands, None)
            if step is None:
                stack.pop()
                continue
            position, (sign, operand) = step
            c = coefficient * sign
            inplace = current.op == "call_method" and current.target in ("add_", "sub_")
            found = self.constant(operand)
            if found is not None:
                constants.append(Constant(c * found[0] if c != 1 else found[0], found[1],
                                          _constant_text(operand, found[0])))
            elif not isinstance(operand, fx.Node):
                terms.append((c, Source(current, "nonlinear", f"{describe_node(current)} has the operand "
                                                              f"{operand!r}")))
            elif inplace and position == 0 and len(value_users(operand)) != 1:
                terms.append((c, Source(operand, "inplace", f"{describe_node(current)} writes into "
                                                            f"'{operand.name}', which is also used elsewhere")))
            elif sum_operands(operand) is not None and len(value_users(operand)) == 1:
                nodes.append(operand)
                stack.append((c, operand, iter(enumerate(sum_operands(operand) or []))))
            else:
                terms.append((c, self.operand(operand)))
        return Sum(tuple(nodes), terms, constants)

    def find(self) -> list[SumRoot]:
        covered: set[fx.Node] = set()
        roots: list[SumRoot] = []
        for node in reversed(list(self.region.graph.nodes)):
            if node in covered or sum_operands(node) is None:
                continue
            root = self._root(node)
            covered.update(n for n in expression_nodes(root.expr or root.sum) if sum_operands(n) is not None)
            for _, term in root.sum.terms:
                covered.update(n for n in expression_nodes(term) if sum_operands(n) is not None)
            roots.append(root)
        roots.reverse()
        return roots

    def _root(self, node: fx.Node) -> SumRoot:
        flat = self.flatten(node)
        by_source: dict[fx.Node, list[tuple[float, Expr]]] = {}
        for c, term in flat.terms:
            by_source.setdefault(_source_node(term), []).append((c, term))
        groups = [Group(source, terms, _worth_merging(terms)) for source, terms in by_source.items()]
        common = self._common_stack(expression_nodes(flat))
        keys = tuple(key for key, _ in common)
        expr: Expr | None = None
        top = node
        if len(groups) == 1:
            expr = flat
            # Per-channel affine ops applied to the sum's result join it, within the sum's own block.
            while True:
                users = value_users(top)
                if len(users) != 1:
                    break
                user = users[0]
                op = self._unary(user)
                if op is None or op.role not in ("norm", "scale", "identity") or op.input is not top:
                    break
                if _stack_keys(user)[:len(keys)] != keys:
                    break
                expr = _apply(user, op, expr)
                top = user
        through: set[str] = set()
        for n in expression_nodes(expr or flat):
            through.update(path for _, path in _stack(n)[len(keys):])
        root = SumRoot(self.region, node, top, flat, expr, groups, keys, common[-1][1] if common else None,
                       through=through)
        if not root.mergeable_groups and any(layers_in(t, ("conv", "linear")) for _, t in flat.terms) and len(
                flat.terms) >= 2:
            root.left = self._left_reason(flat, keys)
        return root

    def _common_stack(self, nodes: Iterator[fx.Node]) -> list[tuple[str, str]]:
        """The ``nn_module_stack`` entries every node shares: the innermost module whose forward holds them all."""
        common: list[tuple[str, str]] | None = None
        for n in nodes:
            entries = _stack(n)
            if common is None:
                common = entries
                continue
            length = 0
            for a, b in zip(common, entries, strict=False):
                if a[0] != b[0]:
                    break
                length += 1
            common = common[:length]
        return common or []

    def _deep_source(self, node: fx.Node) -> fx.Node:
        """Where the walk from ``node`` would stop if no value fed anything else (sums not entered)."""
        seen = 0
        while seen < 10_000:
            seen += 1
            op = self._unary(node)
            if op is None or op.input is None:
                return node
            node = op.input
        return node

    def _left_reason(self, flat: Sum, keys: tuple[str, ...]) -> tuple[str, str]:
        """Why no group of a sum merges: the most specific of the reasons its terms' sources give.

        A source computed outside the sum's block (``keys``) is one of the block's inputs, whatever
        computed it: operands that are affine in different inputs have ``different_inputs``."""
        sources = [_find_source(t) for _, t in flat.terms]
        for source in sources:
            if source.stop == "inplace":
                return "branch_output_used_elsewhere", source.detail
        deep = {id(source): self._deep_source(source.node) for source in sources}
        for source in sources:
            if source.stop != "shared" or deep[id(source)] is source.node:
                continue
            if any(other is not source and deep[id(source)] in (other.node, deep[id(other)]) for other in sources):
                users = ", ".join(describe_node(u) for u in value_users(source.node))
                return "branch_output_used_elsewhere", (f"'{source.node.name}' ({describe_node(source.node)}) is an "
                                                        f"operand of the sum and also feeds: {users}")
        # A non-linear operand rules the sum out whatever else it holds; a layer that is affine but no convolution
        # (an average pool that excludes its padding) is the obstacle only when every operand is affine.
        for source in sources:
            if source.stop in ("nonlinear", "mixed") and _stack_keys(source.node)[:len(keys)] == keys:
                detail = source.detail or f"'{source.node.name}' ({describe_node(source.node)}) is not affine"
                return "nonlinear_branch", detail
        for source in sources:
            if source.stop == "unsupported":
                return "unsupported_layer", source.detail
        names = sorted({f"'{s.node.name}'" for s in sources})
        return "different_inputs", f"the operands are affine functions of {', '.join(names)}"


def _apply(node: fx.Node, op: _Op, inner: Expr) -> Expr:
    if op.role == "scale":
        return Scale(node, op.factor, op.constant_nodes, inner, op.text)
    return Apply(node, op.role, cast(nn.Module, op.module), inner)


def avg_pool_geometry(module: nn.Module) -> refimpl.ConvGeometry:
    """The geometry of the convolution an ``nn.AvgPool1d/2d/3d`` is; ``refimpl.MergeError`` when it is none."""
    pool = cast(nn.AvgPool2d, module)  # AvgPool1d/2d/3d share these attributes
    dims = next(i + 1 for i, kind in enumerate(_AVG_POOLS) if isinstance(pool, kind))

    def spread(value) -> tuple[int, ...]:
        return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * dims

    stride = spread(pool.stride) if pool.stride is not None else None
    return refimpl.avg_pool_geometry(spread(pool.kernel_size), stride, spread(pool.padding),
                                     count_include_pad=bool(pool.count_include_pad), ceil_mode=bool(pool.ceil_mode),
                                     divisor_override=getattr(pool, "divisor_override", None))


def _avg_pool_refusal(module: nn.Module) -> str:
    """Why an average pool is not a convolution ('' when it is one)."""
    try:
        avg_pool_geometry(module)
    except refimpl.MergeError as error:
        return str(error)
    return ""


def _constant_text(operand, value) -> str:
    if isinstance(operand, fx.Node):
        node = operand
        while node.op != "get_attr" and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        return str(node.target) if node.op == "get_attr" else node.name
    return f"{value:g}" if isinstance(value, float) else str(value)


def _source_node(expr: Expr) -> fx.Node:
    while not isinstance(expr, Source):
        if isinstance(expr, Sum):
            expr = expr.terms[0][1]
        else:
            expr = expr.inner
    return expr.node


def source_of(expr: Expr) -> fx.Node:
    """The node a single-source expression is a function of."""
    return _source_node(expr)


def expression_nodes(expr: Expr) -> Iterator[fx.Node]:
    """Every node the expression computes (not its source), constants included."""
    if isinstance(expr, Source):
        return
    if isinstance(expr, Sum):
        yield from expr.nodes
        for constant in expr.constants:
            yield from constant.nodes
        for _, term in expr.terms:
            yield from expression_nodes(term)
        return
    yield expr.node
    if isinstance(expr, Scale):
        yield from expr.constant_nodes
    yield from expression_nodes(expr.inner)


def constant_nodes(expr: Expr) -> Iterator[fx.Node]:
    """The nodes that read or reshape the expression's constants (layer scales, added tensors): values of the
    model, not of the input, which other code may read too."""
    if isinstance(expr, Source):
        return
    if isinstance(expr, Sum):
        for constant in expr.constants:
            yield from constant.nodes
        for _, term in expr.terms:
            yield from constant_nodes(term)
        return
    if isinstance(expr, Scale):
        yield from expr.constant_nodes
    yield from constant_nodes(expr.inner)


def layers_in(expr: Expr, roles: tuple[str, ...]) -> list[Apply]:
    """The :class:`Apply` nodes of the given roles in an expression."""
    if isinstance(expr, Source):
        return []
    if isinstance(expr, Sum):
        return [a for _, t in expr.terms for a in layers_in(t, roles)]
    found = [expr] if isinstance(expr, Apply) and expr.role in roles else []
    return found + layers_in(expr.inner, roles)


def _tensor_terms(expr: Expr) -> int:
    """How many tensors the largest sum inside ``expr`` adds."""
    if isinstance(expr, Source):
        return 0
    if isinstance(expr, Sum):
        return max([len(expr.terms)] + [_tensor_terms(t) for _, t in expr.terms])
    return _tensor_terms(expr.inner)


def _worth_merging(terms: list[tuple[float, Expr]]) -> bool:
    """A group merges when it holds a conv or linear layer and the merged layer replaces at least one add."""
    if not any(layers_in(t, ("conv", "linear")) for _, t in terms):
        return False
    return len(terms) >= 2 or any(_tensor_terms(t) >= 2 for _, t in terms)


def _find_source(expr: Expr) -> Source:
    while not isinstance(expr, Source):
        expr = expr.terms[0][1] if isinstance(expr, Sum) else expr.inner
    return expr


def describe(expr: Expr, name) -> str:
    """A compact text of an expression: ``bn(conv(x))``, ``gamma*(...)``; ``name(module)`` names modules."""
    if isinstance(expr, Source):
        return "x"
    if isinstance(expr, Sum):
        parts = []
        for c, term in expr.terms:
            text = describe(term, name)
            parts.append(text if c == 1 else f"-{text}" if c == -1 else f"{c:g}*{text}")
        parts += [constant.text for constant in expr.constants]
        return "(" + " + ".join(parts) + ")"
    if isinstance(expr, Scale):
        return f"{expr.text}*{describe(expr.inner, name)}"
    return f"{name(expr.module)}({describe(expr.inner, name)})"


def find_sums(index: ModelIndex, region: Region) -> list[SumRoot]:
    """Every maximal sum in the region's graph, in graph order."""
    return SumFinder(index, region).find()


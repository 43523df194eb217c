"""Structural re-parameterisation: merge parallel linear branches into one conv, from dataflow.

:func:`reparameterize` does what :func:`adapters.torch.fuse` does and, before that, merges every sum
of branches that are affine functions of the same tensor (RepVGG, MobileOne, FastViT's RepMixer,
ACNet, YOLO's RepConv, RepGhost, RepViT, DBB-style chains and user-written blocks alike) into one
convolution or linear layer, wherever refimpl's exactness rules allow it.

The pass:

1. **Find** (``analysis``): trace the model with the fold pass's tracer; in every graph, flatten each
   maximal sum into signed terms, walk each term down through conv/linear layers, norms, identities,
   average pools and constant scales to its source, group terms by source, and note for each sum the
   innermost module whose forward computes it (its *block*).
2. **Merge** (``kernels``, per block): trace the block on its own, find its sums again, and compute each
   group's merged kernel with refimpl in float64 on the parameters' device, rounded once to the
   parameter dtype. Nothing in the model changes here.
3. **Rewrite** (``rewrite``): build, for each block with a merge, a ``torch.fx.GraphModule`` of its
   forward with the merged layer in place of the branches (or take the merged layer itself when nothing
   else is left of that forward); swap the blocks in (same qualified names),
   then fold the remaining norms with :func:`~adapters.torch.fuse`. If anything raises, every swap is
   undone.
4. **Tidy** (``identities``): remove the ``nn.Identity`` that folded norms left at the end of sequential
   containers, where no code can tell (the module call it costs is what timm's own ``fuse`` saves).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import fx, nn

from ...report import FusionReport, MergedBranches, SkippedMerge
from ..fusion import check_model, fuse, observe
from ..graph import ModelIndex, Region, trace_regions
from .analysis import Apply, Expr, Scale, Sum, SumRoot, describe, find_sums, layers_in
from .identities import drop_folded_identities
from .kernels import MergedLayer, Refusal, evaluate_group
from .rewrite import (
    MergeEdit,
    VaryingArguments,
    bare_layer,
    build_block,
    fixed_arguments,
    free_name,
    modules_called,
    rewrite_graph,
    trace_block,
)

__all__ = ["reparameterize"]

log = logging.getLogger("adapters.torch")


@dataclass
class _Block:
    """A module whose forward computes at least one mergeable sum."""

    module: nn.Module
    name: str
    through: set[int] = field(default_factory=set)      # modules its rewrite traces through
    phase_a_nodes: list[tuple[SumRoot, str]] = field(default_factory=list)   # (root, block name) seen in the model


@dataclass
class _Accepted:
    root: SumRoot
    edit: MergeEdit
    records: list[MergedBranches]
    expressions: list[Expr]


@contextlib.contextmanager
def _eval_semantics(modules: list[nn.Module]) -> Iterator[dict[int, bool]]:
    """Every module in eval mode while tracing (folding assumes eval semantics); the flags are restored."""
    flags = {id(m): m.training for m in modules}
    try:
        for module in modules:
            module.training = False
        yield flags
    finally:
        for module in modules:
            module.training = flags[id(module)]


def reparameterize(model: nn.Module, *, inplace: bool = False,
                   example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None
                   ) -> tuple[nn.Module, FusionReport]:
    """Merge parallel linear branches into single layers, then fold every BatchNorm dataflow allows.

    Parameters
    ----------
    model : nn.Module
        The model. It keeps its class; each block whose forward computes a merged sum is replaced,
        under the same qualified name, by a ``torch.fx.GraphModule`` of its forward with the merged
        layer (``reparam_conv`` / ``reparam_linear``) in place of the branches, its other children
        keeping their names and classes -- or by the merged layer itself when the block's forward was
        the sum alone (RepViT's token mixer). Folded norms become ``nn.Identity`` as with ``fuse``; such an
        Identity at the end of a module whose forward is ``nn.Sequential.forward`` (a conv + BatchNorm
        container) is removed where nothing else can tell -- the remaining children keep their names,
        positions and ``state_dict`` keys (``report.removed_identities``; see ``reparam/identities.py``).
    inplace : bool
        Rewrite ``model`` itself; otherwise a deep copy, and ``model`` is untouched.
    example_inputs : tensor or tuple of tensors, optional
        Inputs for one eval-mode forward pass of the original: proves the rank of BatchNorm1d inputs
        among linear branches, and confirms that no merged layer is also called from code the tracer
        could not see.

    Returns
    -------
    (model, report)
        The re-parameterised model and a :class:`~adapters.report.FusionReport` whose ``merged`` lists
        every merge (block, sum node, branches, new layer, kernel size, norms merged away) and whose
        ``merges_skipped`` lists every sum of branches left, with a reason code.

    Raises
    ------
    TypeError
        TorchScript modules, or something that is not an ``nn.Module``.
    ValueError
        Lazy or meta tensors; a norm with a negative or non-finite running variance or the wrong
        width. The model is left unchanged.

    Examples
    --------
    A RepVGG block, twice: each block's three branches become one 3x3 conv.

    >>> import torch
    >>> from torch import nn
    >>> class RepVGGBlock(nn.Module):
    ...     def __init__(self, c):
    ...         super().__init__()
    ...         self.k3, self.bn3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
    ...         self.k1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
    ...         self.identity = nn.BatchNorm2d(c)
    ...     def forward(self, x):
    ...         return torch.relu(self.bn3(self.k3(x)) + self.bn1(self.k1(x)) + self.identity(x))
    >>> model = nn.Sequential(RepVGGBlock(4), RepVGGBlock(4)).eval()
    >>> merged, report = reparameterize(model)
    >>> [(m.block, m.layer, m.kernel_size, len(m.norms)) for m in report.merged]
    [('0', '0.reparam_conv', (3, 3), 3), ('1', '1.reparam_conv', (3, 3), 3)]
    >>> merged[0]
    RepVGGBlockReparameterized(
      (reparam_conv): Conv2d(4, 4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
    )
    """
    check_model(model)
    if not inplace:
        model = copy.deepcopy(model)
    index = ModelIndex(model)
    norms_found = len(index.norms)
    observation = observe(model, index, example_inputs) if example_inputs is not None else None
    ranks = observation.ranks if observation is not None else None

    with _eval_semantics(index.modules) as flags:
        traced = trace_regions(model, index)
        blocks, left_in_model = _find_blocks(model, index, traced.regions, ranks)
        sites = _call_sites(traced.regions)
        replacements: dict[int, nn.Module] = {}
        merged: list[MergedBranches] = []
        skipped: list[_Left | SkippedMerge] = list(left_in_model)
        superseded: set[int] = set()
        built: list[tuple[_Block, fx.Graph, dict[str, nn.Module]]] = []
        for block in sorted(blocks.values(), key=lambda b: -b.name.count(".")):
            # How the block is called: as run on example_inputs, else as the traced callers' code says.
            arguments = observation.arguments.get(id(block.module), []) if observation is not None else []
            arguments = arguments or traced.call_arguments.get(id(block.module), [])
            result = _merge_block(index, block, ranks, sites, observation.calls if observation else None, arguments,
                                  traced.transparent)
            superseded.add(id(block.module))
            superseded.update(block.through)
            if isinstance(result, list):
                skipped += result
                continue
            graph, new_modules, records, lefts = result
            merged += records
            skipped += lefts
            built.append((block, graph, new_modules))
    # Built outside eval semantics, so that every module carries its own training flag again.
    for block, graph, new_modules in sorted(built, key=lambda item: -item[0].name.count(".")):
        for layer in new_modules.values():
            layer.training = flags.get(id(block.module), False)
        replacements[id(block.module)] = build_block(block.module, graph, new_modules, replacements)
    skipped_report = _final_skips(skipped, superseded)

    undo = _swap_blocks(index, replacements)
    try:
        model, report = fuse(model, inplace=True, example_inputs=example_inputs)
    except BaseException:
        for parent, attr, module in reversed(undo):
            parent._modules[attr] = module
        raise
    # With example inputs, fuse also recognises norms by their recorded forward (per-channel scale layers, ...):
    # those count too.
    original_norms = {index.name(m) for m in index.modules if id(m) in index.norms}
    recognised = {p.norm for p in report.folded} | {s.norm for s in report.skipped}
    report.norms_found = norms_found + len(recognised - original_norms)
    report.merged = merged
    report.merges_skipped = skipped_report
    report.removed_identities = drop_folded_identities(model, [pair.norm for pair in report.folded])
    if merged:
        log.info("merged %d sum(s) of branches in %d block(s)", len(merged), len(replacements))
    return model, report


# -- finding blocks ---------------------------------------------------------------------------

@dataclass(eq=False)
class _Left:
    """A sum left as it is, tied to the module whose forward computes it (to drop it when that block is redone)."""

    module_id: int
    record: SkippedMerge


def _module_at(region: Region, path: str | None) -> nn.Module:
    return region.root if path is None else region.root.get_submodule(path)


def _find_blocks(model: nn.Module, index: ModelIndex, regions: list[Region], ranks
                 ) -> tuple[dict[int, _Block], list[_Left]]:
    """The blocks to rewrite, and the sums left in the model as traced (as ``_Left``)."""
    blocks: dict[int, _Block] = {}
    lefts: list[_Left] = []
    for region in regions:
        for root in find_sums(index, region):
            module = _module_at(region, root.block_path)
            name = index.name(module)
            if root.left is not None:
                lefts.append(_Left(id(module), SkippedMerge(name, root.node.name, *root.left)))
            if not root.mergeable_groups:
                continue
            if module is model:
                for group in root.mergeable_groups:
                    expr = root.expr if root.expr is not None else Sum((), group.terms, root.sum.constants)
                    try:
                        evaluate_group(index, expr, ranks, index.name)
                    except Refusal as refusal:
                        lefts.append(_Left(id(module), SkippedMerge("", root.node.name, refusal.reason,
                                                                    refusal.detail)))
                        continue
                    lefts.append(_Left(id(module), SkippedMerge(
                        "", root.node.name, "sum_in_model_forward", "the model's own forward computes this sum of "
                        f"{len(group.terms)} branches; bnfold keeps the model's class, so it cannot change that "
                        "forward")))
                continue
            block = blocks.setdefault(id(module), _Block(module, name))
            block.through.update(id(_module_at(region, path)) for path in root.through)
            block.phase_a_nodes.append((root, name))
    # A block traced through by another block's rewrite is rewritten as part of it.
    changed = True
    while changed:
        changed = False
        for outer in list(blocks.values()):
            for inner in list(blocks.values()):
                if inner is not outer and id(inner.module) in outer.through and id(inner.module) in blocks:
                    outer.through |= inner.through
                    outer.phase_a_nodes += inner.phase_a_nodes
                    del blocks[id(inner.module)]
                    changed = True
    return blocks, lefts


def _call_sites(regions: list[Region]) -> dict[int, list[tuple[Region, fx.Node]]]:
    """Where each module is called, or has a parameter or buffer read, in the traced model."""
    sites: dict[int, list[tuple[Region, fx.Node]]] = {}
    for region in regions:
        for node in region.graph.nodes:
            if node.op == "call_module":
                sites.setdefault(id(region.module(node)), []).append((region, node))
            elif node.op == "get_attr":
                owner_path = str(node.target).rpartition(".")[0]
                try:
                    owner = _module_at(region, owner_path or None)
                except AttributeError:
                    continue
                sites.setdefault(id(owner), []).append((region, node))
    return sites


def _inside(region: Region, node: fx.Node, block: _Block) -> bool:
    """Whether a node of the traced model belongs to a call of ``block`` (or of a module it traces through)."""
    if region.prefix == block.name or region.prefix.startswith(block.name + "."):
        return True
    stack = node.meta.get("nn_module_stack") or {}
    for value in stack.values():
        try:
            module = region.root.get_submodule(str(value[0]))
        except AttributeError:
            continue
        if module is block.module:
            return True
    return False


# -- merging one block ------------------------------------------------------------------------

def _merge_block(index: ModelIndex, block: _Block, ranks, sites, calls, call_arguments, transparent: set[int]):
    """Trace the block, merge its groups, rewrite its graph: ``(graph, new modules, merged, left)``, or the list
    of sums left when nothing in it merges."""
    name = block.name
    try:
        fixed = fixed_arguments(block.module, call_arguments)
    except VaryingArguments as exc:
        return [SkippedMerge(block_name, root.node.name, "untraceable", f"'{name}' cannot be rewritten as one "
                             f"graph: {exc}") for root, block_name in block.phase_a_nodes]
    try:
        # Modules that left no node in the model's trace (a DropPath in eval semantics) are traced through too:
        # kept as calls, they would hide the branches they sit on.
        through = block.through | {id(m) for m in block.module.modules() if id(m) in transparent}
        region = trace_block(index, block.module, name, through, fixed)
    except Exception as exc:  # noqa: BLE001 - any tracing failure leaves the block as it is
        summary = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return [SkippedMerge(block_name, root.node.name, "untraceable", f"'{name}' could not be traced on its own "
                             f"({summary})") for root, block_name in block.phase_a_nodes]

    def relative(module: nn.Module) -> str:
        full = index.name(module)
        return full[len(name) + 1:] if full.startswith(name + ".") else full

    taken: set[str] = {str(n.target).split(".")[0] for n in region.graph.nodes if n.op in ("call_module", "get_attr")}
    accepted: list[_Accepted] = []
    lefts: list[SkippedMerge] = []
    for root in find_sums(index, region):
        where = name if root.block_path is None else f"{name}.{root.block_path}"
        if root.left is not None:
            lefts.append(SkippedMerge(where, root.node.name, *root.left))
        groups = root.mergeable_groups
        if not groups:
            continue
        full = root.expr is not None
        edit = MergeEdit(root, [], full)
        records, expressions = [], []
        constants = list(root.sum.constants)
        for group in groups:
            expr: Expr = root.expr if full and root.expr is not None else Sum((), group.terms, constants)
            refusal = _hidden_calls(expr, sites, calls, index)
            merged_layer: MergedLayer | None = None
            if refusal is None:
                try:
                    merged_layer = evaluate_group(index, expr, ranks, relative)
                except Refusal as error:
                    refusal = error
            if merged_layer is None or refusal is not None:
                reason, detail = (refusal.reason, refusal.detail) if refusal else ("untraceable", "")
                lefts.append(SkippedMerge(where, root.node.name, reason, detail))
                continue
            constants = []  # the first merged group took the sum's constants
            attr = free_name(taken, "reparam_linear" if not merged_layer.kernel_size else "reparam_conv")
            edit.groups.append((group, attr))
            edit.modules[attr] = merged_layer.module
            expressions.append(expr)
            branches, then = _branch_texts(expr, group, relative)
            records.append(MergedBranches(
                block=name, node=root.node.name, branches=branches, layer=f"{name}.{attr}",
                kernel_size=tuple(merged_layer.kernel_size), norms=tuple(index.name(n) for n in merged_layer.norms),
                block_class=type(block.module).__qualname__, then=then))
        if edit.groups:
            accepted.append(_Accepted(root, edit, records, expressions))
    if not accepted:
        return lefts
    graph = region.graph
    before = {id(m) for m in block.module.modules()}
    rewrite_graph(graph, [a.edit for a in accepted])
    kept = modules_called(graph, block.module)
    dropped = before - kept - {id(block.module)}
    for module_id in dropped:
        outside = [node for region_a, node in sites.get(module_id, []) if not _inside(region_a, node, block)]
        if outside:
            detail = (f"{index.name_of.get(module_id, '?')} is also used outside '{name}' (at "
                      f"{outside[0].name}); replacing the block would remove it")
            return lefts + [SkippedMerge(r.block, r.node, "reused_incompatibly", detail)
                            for a in accepted for r in a.records]
    new_modules = {attr: module for a in accepted for attr, module in a.edit.modules.items()}
    records = [r for a in accepted for r in a.records]
    if bare_layer(graph) is not None:
        # The block's forward is now the merged layer alone: the layer itself replaces the block.
        records = [replace(r, layer=name) for r in records]
    return graph, new_modules, records, lefts


def _hidden_calls(expr: Expr, sites, calls, index: ModelIndex) -> Refusal | None:
    if calls is None:
        return None
    for apply in layers_in(expr, ("conv", "linear", "norm")):
        module_id = id(apply.module)
        traced = sum(1 for _, node in sites.get(module_id, []) if node.op == "call_module")
        if calls.get(module_id, 0) > traced:
            return Refusal("untraceable", f"{index.name(apply.module)} ran {calls[module_id]} time(s) with "
                           f"example_inputs but the traced graphs show {traced} call site(s)")
    return None


def _branch_texts(expr: Expr, group, relative) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The group's terms (and constants) as text, and the operations applied after the sum."""
    texts = []
    for c, term in group.terms:
        text = describe(term, relative)
        texts.append(text if c == 1 else f"-{text}" if c == -1 else f"{c:g}*{text}")
    after = []
    while isinstance(expr, (Apply, Scale)):
        if isinstance(expr, Scale):
            after.append(f"*{expr.text}")
        elif expr.role != "identity":
            after.append(relative(expr.module))
        expr = expr.inner
    if isinstance(expr, Sum):
        texts += [constant.text for constant in expr.constants]
    return tuple(texts), tuple(reversed(after))


def _final_skips(skipped: list[_Left | SkippedMerge], superseded: set[int]) -> list[SkippedMerge]:
    out = []
    for item in skipped:
        if isinstance(item, _Left):
            if item.module_id in superseded:
                continue
            out.append(item.record)
        else:
            out.append(item)
    return out


def _swap_blocks(index: ModelIndex, replacements: dict[int, nn.Module]) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put each replacement at every registration of its block whose parent stays in the model."""
    inside_replaced: set[int] = set()
    for module in index.modules:
        if id(module) in replacements:
            inside_replaced.update(id(m) for m in module.modules())
    undo: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for block_id, new in replacements.items():
            for parent, attr in index.registrations.get(block_id, []):
                if id(parent) in inside_replaced:
                    continue
                old = parent._modules[attr]
                if old is None:
                    continue
                undo.append((parent, attr, old))
                parent._modules[attr] = new
    except BaseException:
        for parent, attr, module in reversed(undo):
            parent._modules[attr] = module
        raise
    return undo


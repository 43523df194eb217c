"""Dropping the ``nn.Identity`` that folded norms leave at the end of sequential containers.

:func:`~adapters.torch.fuse` keeps a folded norm's place as an ``nn.Identity``, so every name and
class of the model stays. A container whose forward is ``nn.Sequential.forward`` runs its children
in turn, so such an Identity only costs a module call per forward pass (a conv + BatchNorm pair,
such as timm's ``ConvNorm``, becomes ``Sequential(conv, Identity)``, which timm's own
re-parameterisation replaces by the bare conv). :func:`drop_folded_identities` removes them where
nothing else can tell:

- the container's class does not override ``nn.Sequential.forward``, and it is not the model itself
  (the object the caller holds and indexes);
- the Identity replaced a norm that this fold folded, and has no hooks;
- it is in the trailing run of such Identities, so every remaining child keeps its name, its
  ``state_dict`` keys *and its position* (``seq[i]`` and slices ``seq[:k]`` of the remaining
  children mean what they meant; only ``len(seq)`` and negative indices past the last remaining
  child change);
- in the traced model every call of every child of the container comes from the container's own
  forward (no other forward indexes it, and no ``GraphModule`` calls the Identity by name), and the
  container is called from a traced forward (it is not the root of a separately traced part).

A container left with a single child is *not* replaced by that child: the child's ``state_dict``
keys would lose the container's name (``conv.c.weight`` -> ``conv.weight``) and the container's
class would be gone.
"""

from __future__ import annotations

from torch import nn

from ..graph import ModelIndex, Region, trace_regions

__all__ = ["drop_folded_identities"]

_UNKNOWN = -1  # the id of a caller that could not be identified (never a module's id)


def _callers(regions: list[Region]) -> dict[int, set[int]]:
    """For every module of the traced model, the modules whose traced forward called it (by ``id``)."""
    callers: dict[int, set[int]] = {}
    for region in regions:
        for node in region.graph.nodes:
            if node.op != "call_module":
                continue
            stack = [str(entry[0]) for entry in (node.meta.get("nn_module_stack") or {}).values()]
            if not stack or stack[-1] != node.target:
                stack.append(str(node.target))  # the call itself, when the tracer recorded no entry for it
            try:
                chain = [region.root] + [region.root.get_submodule(path) for path in stack]
            except AttributeError:  # a caller the model does not hold: attribute the call to no container
                callers.setdefault(id(region.module(node)), set()).add(_UNKNOWN)
                continue
            for outer, inner in zip(chain, chain[1:], strict=False):
                callers.setdefault(id(inner), set()).add(id(outer))
    return callers


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _is_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def drop_folded_identities(model: nn.Module, folded_norms: list[str]) -> list[str]:
    """Remove the ``nn.Identity`` children that the norms named in ``folded_norms`` left at the end of sequential
    containers, where nothing can tell (see the module docstring); return the qualified names removed.

    The model is only changed once every removal has been decided.
    """
    identities = set()
    for name in folded_norms:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if type(module) is nn.Identity and not _has_hooks(module):
            identities.add(id(module))
    candidates = []  # (container, its name, its children, the names of its trailing folded Identities)
    for parent_name, parent in model.named_modules():
        if parent is model or not _is_sequential(parent):
            continue
        children = [(name, child) for name, child in parent._modules.items() if child is not None]
        trailing = []
        for name, child in reversed(children):
            if id(child) not in identities:
                break
            trailing.append(name)
        if trailing:
            candidates.append((parent, parent_name, [child for _, child in children], trailing[::-1]))
    if not candidates:
        return []
    traced = trace_regions(model, ModelIndex(model))
    callers = _callers(traced.regions)
    region_roots = {id(region.root) for region in traced.regions}
    plan: list[tuple[nn.Module, str, str]] = []
    for parent, parent_name, children, trailing in candidates:
        if id(parent) in region_roots or any(callers.get(id(child)) != {id(parent)} for child in children):
            continue
        plan += [(parent, name, f"{parent_name}.{name}" if parent_name else name) for name in trailing]
    for parent, name, _ in plan:
        del parent._modules[name]
    return [qualified for _, _, qualified in plan]

"""The layers a BatchNorm folds into: one object per layer kind, and the one table that chooses the fold.

Each :class:`LayerKind` says, once, what the adapters and the conformance vectors need to know about a kind of
layer: its weight layout (torch's, which refimpl's folds take: a conv ``[out, in/groups, *kernel]``, a transposed
conv ``[in, out/groups, *kernel]``, a linear layer ``[out, in]``), its channel counts read from that layout, the
*unit shape* (the shape of the per-slot factor a fold of a norm after the layer multiplies into the weight: one
entry per output channel, and per (input channel, output channel in its group) pair for a transposed conv), and
how many terms one output element sums. :data:`FOLDS` maps a (layer kind, norm position) pair to its
:class:`Fold`: the report's fold kind (``"conv->bn"``, ...) and the refimpl function that computes it. A pair
that is not in the table is not foldable (a BatchNorm before a transposed conv: ``spec/folding.md`` §4.2), and
:func:`fold_for` says so.

The position is the norm's, seen from the layer (``spec/folding.md`` §3): :data:`NORM_AFTER` -- the layer's
output feeds the norm (``layer -> bn``); :data:`NORM_BEFORE` -- the norm's output feeds the layer
(``bn -> layer``).

>>> fold = fold_for("conv_transpose", NORM_AFTER)
>>> fold.kind, CONV_TRANSPOSE.unit_shape((4, 3, 2, 2), groups=2), CONV_TRANSPOSE.out_channels((4, 3, 2, 2), groups=2)
('conv_transpose->bn', (4, 3, 1, 1), 6)
>>> fold_for("conv_transpose", NORM_BEFORE)
Traceback (most recent call last):
...
ValueError: a BatchNorm before a conv_transpose layer does not fold (spec/folding.md §4.2: the number of taps that \
reach an output position depends on the position, so no bias absorbs the norm's shift); foldable: conv->bn, \
conv_transpose->bn, linear->bn, bn->conv, bn->linear
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .fold import fold_bn_conv, fold_bn_linear, fold_conv_bn, fold_linear_bn

__all__ = ["LayerKind", "CONV", "CONV_TRANSPOSE", "LINEAR", "LAYER_KINDS", "NORM_AFTER", "NORM_BEFORE",
           "POSITIONS", "Fold", "FOLDS", "fold_for", "layer_kind"]

Array = Any

#: The norm runs after the layer: the layer's output feeds it (``conv -> bn``).
NORM_AFTER = "after"
#: The norm runs before the layer: its output feeds the layer (``bn -> conv``).
NORM_BEFORE = "before"
POSITIONS = (NORM_AFTER, NORM_BEFORE)


@dataclass(frozen=True)
class LayerKind:
    """A kind of layer a BatchNorm folds into, described by its weight layout.

    ``name`` is the kind's name (``conv``, ``conv_transpose``, ``linear``); ``spatial`` says whether the weight
    has kernel dims after the two channel axes; ``transposed`` whether the first axis holds the input channels
    (a transposed conv) rather than the output channels. Every method takes a weight shape in that layout and
    the layer's ``groups`` (1 for a linear layer).
    """

    name: str
    spatial: bool
    transposed: bool

    def _check(self, weight_shape: Sequence[int], groups: int) -> tuple[int, ...]:
        shape = tuple(int(d) for d in weight_shape)
        if len(shape) < 2 or (not self.spatial and len(shape) != 2):
            layout = "[out, in]" if not self.spatial else (
                "[in, out/groups, *kernel]" if self.transposed else "[out, in/groups, *kernel]")
            raise ValueError(f"a {self.name} weight is {layout}, got shape {shape}")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or (not self.spatial and groups != 1):
            raise ValueError(f"{self.name}: groups must be a positive integer (1 for linear), got {groups!r}")
        return shape

    def weight_shape(self, in_channels: int, out_channels: int, kernel_size: Sequence[int] = (), *,
                     groups: int = 1) -> tuple[int, ...]:
        """The weight's shape for a layer with these channel counts, kernel size and groups."""
        kernel = tuple(int(k) for k in kernel_size)
        if self.spatial != bool(kernel):
            raise ValueError(f"a {self.name} layer takes {'a' if self.spatial else 'no'} kernel size, got {kernel}")
        if self.transposed:
            return (in_channels, out_channels // groups, *kernel)
        return (out_channels, in_channels // groups, *kernel)

    def out_channels(self, weight_shape: Sequence[int], groups: int = 1) -> int:
        """Channels the layer writes: what a norm after it normalises."""
        shape = self._check(weight_shape, groups)
        return shape[1] * groups if self.transposed else shape[0]

    def in_channels(self, weight_shape: Sequence[int], groups: int = 1) -> int:
        """Channels the layer reads: what a norm before it normalises."""
        shape = self._check(weight_shape, groups)
        return shape[0] if self.transposed else shape[1] * groups

    def unit_shape(self, weight_shape: Sequence[int], groups: int = 1) -> tuple[int, ...]:
        """Shape of the per-slot factor a fold of a norm after the layer multiplies into the weight (broadcast
        over the rest): one entry per output channel (axis 0), and for a transposed conv one per (input channel,
        output channel in its group) pair (axes 0 and 1), as :func:`refimpl.fold_conv_bn` lays it out."""
        shape = self._check(weight_shape, groups)
        if self.transposed:
            return shape[:2] + (1,) * (len(shape) - 2)
        return (shape[0],) + (1,) * (len(shape) - 1)

    def reduction_length(self, weight_shape: Sequence[int], groups: int = 1) -> int:
        """Terms summed into one output element: in/groups times the kernel size (a transposed conv sums at
        most that many taps into an output element, like a conv)."""
        shape = self._check(weight_shape, groups)
        if self.transposed:
            return shape[0] // groups * math.prod(shape[2:])
        return math.prod(shape[1:])


CONV = LayerKind("conv", spatial=True, transposed=False)
CONV_TRANSPOSE = LayerKind("conv_transpose", spatial=True, transposed=True)
LINEAR = LayerKind("linear", spatial=False, transposed=False)
#: Every layer kind, by name.
LAYER_KINDS = {kind.name: kind for kind in (CONV, CONV_TRANSPOSE, LINEAR)}


def layer_kind(kind: LayerKind | str) -> LayerKind:
    """``kind`` itself, or the kind of that name."""
    if isinstance(kind, LayerKind):
        return kind
    try:
        return LAYER_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown layer kind {kind!r}; known: {', '.join(LAYER_KINDS)}") from None


@dataclass(frozen=True)
class Fold:
    """One fold: a norm at ``position`` of a ``layer`` kind, computed by ``function`` (a refimpl fold).

    ``kind`` is the name a report gives it (``adapters.report.FOLD_KINDS``). Calling it takes the layer's weight
    and bias and the norm's statistics in the order of every refimpl fold, plus the layer's ``groups``.
    """

    kind: str
    layer: LayerKind
    position: str
    function: Callable[..., tuple[Array, Array]]

    def __call__(self, weight: Array, bias: Array | None, bn_mean: Array, bn_var: Array, bn_eps: float,
                 bn_weight: Array | None = None, bn_bias: Array | None = None, *,
                 groups: int = 1) -> tuple[Array, Array]:
        args = (weight, bias, bn_mean, bn_var, bn_eps, bn_weight, bn_bias)
        if not self.layer.spatial:
            if groups != 1:
                raise ValueError(f"{self.kind}: a linear layer has no groups, got groups={groups!r}")
            return self.function(*args)
        if self.position == NORM_AFTER:
            return self.function(*args, transposed=self.layer.transposed, groups=groups)
        return self.function(*args, groups=groups)


#: The one table that chooses the fold: (layer kind name, norm position) -> :class:`Fold`.
FOLDS: dict[tuple[str, str], Fold] = {
    (fold.layer.name, fold.position): fold for fold in (
        Fold("conv->bn", CONV, NORM_AFTER, fold_conv_bn),
        Fold("conv_transpose->bn", CONV_TRANSPOSE, NORM_AFTER, fold_conv_bn),
        Fold("linear->bn", LINEAR, NORM_AFTER, fold_linear_bn),
        Fold("bn->conv", CONV, NORM_BEFORE, fold_bn_conv),
        Fold("bn->linear", LINEAR, NORM_BEFORE, fold_bn_linear),
    )
}


def fold_for(layer: LayerKind | str, position: str) -> Fold:
    """The fold of a norm at ``position`` (:data:`NORM_AFTER` or :data:`NORM_BEFORE`) of a ``layer`` kind;
    ValueError, naming the rule, when there is none."""
    kind = layer_kind(layer)
    if position not in POSITIONS:
        raise ValueError(f"unknown norm position {position!r}; known: {', '.join(POSITIONS)}")
    try:
        return FOLDS[(kind.name, position)]
    except KeyError:
        foldable = ", ".join(fold.kind for fold in FOLDS.values())
        raise ValueError(f"a BatchNorm {position} a {kind.name} layer does not fold (spec/folding.md §4.2: the "
                         f"number of taps that reach an output position depends on the position, so no bias "
                         f"absorbs the norm's shift); foldable: {foldable}") from None

"""Traps: models where a fuser that pairs layers by registration order, or ignores dataflow, goes wrong."""

from __future__ import annotations

import torch
from torch import nn

from .conv_bn import _NormAfterMerge
from .norm_layers import BatchNormAct2d, ShiftedBatchNorm2d
from .registry import _register, _seq


class _ConvRegisteredFirst(nn.Module):
    """``self.conv`` is registered before ``self.bn`` but forward applies the BN first."""

    def __init__(self, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=padding)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


@_register("trap_bn_before_conv_zero_padding", (2, 4, 8, 8), foldable=0, left=1, family="trap",
           skips={"bn": ("zero_padding",)})
def _trap_bn_before_conv_zero_padding() -> nn.Module:
    """conv registered first, forward does conv(bn(x)), the conv zero-pads. A registration-order
    walk (mmcv) folds bn into conv as if it ran after it (channel counts match, so it does so
    silently). Dataflow says BN -> zero-padded conv: not exact, not folded; the BN runs once."""
    return _ConvRegisteredFirst(padding=1)


@_register("trap_bn_before_conv_valid", (2, 4, 8, 8), foldable=1, left=0, family="trap",
           pairs=(("bn", "conv", "bn->conv"),))
def _trap_bn_before_conv_valid() -> nn.Module:
    """conv registered first, forward does conv(bn(x)), no padding: a correct fuser folds the BN
    *into the conv's input side* (BN -> conv); a registration-order walk folds it on the output
    side, which is a different function. Nothing is left."""
    return _ConvRegisteredFirst(padding=0)


@_register("trap_activation_between", (2, 3, 8, 8), foldable=0, left=1, family="trap",
           skips={"2": ("no_fusable_neighbour",)})
def _trap_activation_between() -> nn.Module:
    """Conv2d -> ReLU -> BatchNorm2d: the ReLU sits between, and the BN is the model output:
    nothing to fold into; the BN runs once."""
    return _seq(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))


@_register("trap_pool_between", (2, 3, 8, 8), foldable=0, left=1, family="trap",
           skips={"2": ("no_fusable_neighbour",)})
def _trap_pool_between() -> nn.Module:
    """Conv2d -> MaxPool2d -> BatchNorm2d: max pooling does not commute with a negative scale;
    not folded; the BN runs once."""
    return _seq(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.BatchNorm2d(4))


class _ConvUsedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + torch.relu(y)


@_register("trap_conv_output_used_twice", (2, 3, 8, 8), foldable=0, left=1, family="trap",
           skips={"bn": ("output_used_elsewhere",)})
def _trap_conv_output_used_twice() -> nn.Module:
    """y = conv(x); bn(y) + relu(y): folding would change the relu branch's input too; not
    folded; the BN runs once."""
    return _ConvUsedTwice()


class _ConvReusedTwoNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv(x)) + self.bn2(self.conv(torch.flip(x, dims=(-1,))))


@_register("trap_conv_reused_two_bns", (2, 3, 8, 8), foldable=0, left=2, family="trap",
           skips={"bn1": ("reused_incompatibly",), "bn2": ("reused_incompatibly",)})
def _trap_conv_reused_two_bns() -> nn.Module:
    """One conv called twice, followed by bn1 at one call and bn2 at the other: one weight
    cannot hold both folds, so neither folds; both BNs run."""
    return _ConvReusedTwoNorms()


class _ConvReusedSameNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.bn(self.conv(y))


@_register("trap_conv_reused_same_bn", (2, 4, 8, 8), foldable=1, left=0, family="trap",
           pairs=(("bn", "conv", "conv->bn"),))
def _trap_conv_reused_same_bn() -> nn.Module:
    """The same conv -> same BN pair called twice (ReLU between the calls): every call of the
    conv is followed by the same BN, and every BN call follows that conv, so it folds once and
    both calls use the folded weight; nothing is left."""
    return _ConvReusedSameNorm()


class _SharedNorm(nn.Module):
    def __init__(self, leak: bool) -> None:
        super().__init__()
        self.leak = leak
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(3, 4, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y2 = self.conv2(x)
        out = self.bn(self.conv1(x)) + self.bn(y2)
        if self.leak:
            out = out + y2
        return out


@_register("trap_bn_shared_by_two_convs", (2, 3, 8, 8), foldable=1, left=0, family="trap",
           pairs=(("bn", "conv1", "conv->bn"), ("bn", "conv2", "conv->bn")))
def _trap_bn_shared_by_two_convs() -> nn.Module:
    """One BN called after conv1 and after conv2, each conv feeding only it: the BN folds into
    both convs and becomes Identity (one norm module folded, two folded pairs); nothing is left."""
    return _SharedNorm(leak=False)


@_register("trap_bn_shared_one_conv_leaks", (2, 3, 8, 8), foldable=0, left=2, family="trap",
           skips={"bn": ("output_used_elsewhere", "reused_incompatibly")})
def _trap_bn_shared_one_conv_leaks() -> nn.Module:
    """As trap_bn_shared_by_two_convs, but conv2's output is also added to the result: the BN
    cannot fold into conv2, and folding it into conv1 alone would still need the module at the
    conv2 call: not folded; it runs twice."""
    return _SharedNorm(leak=True)


@_register("trap_split_sequential", (2, 3, 8, 8), foldable=2, left=0, family="trap",
           pairs=(("1.0", "0.0", "conv->bn"), ("3.1.0", "3.0", "conv->bn")))
def _trap_split_sequential() -> nn.Module:
    """Sequential(Sequential(conv), Sequential(bn), ReLU, Sequential(conv, Sequential(bn))): each
    pair straddles container boundaries but is adjacent in the dataflow; both fold."""
    return _seq(_seq(nn.Conv2d(3, 4, 3)), _seq(nn.BatchNorm2d(4)), nn.ReLU(),
                _seq(nn.Conv2d(4, 4, 1, bias=False), _seq(nn.BatchNorm2d(4))))


class _ModuleListLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # Norms registered before convs: registration order must not matter.
        self.norms = nn.ModuleList([nn.BatchNorm2d(4) for _ in range(3)])
        self.convs = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, bias=False),
                                    nn.Conv2d(4, 4, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = torch.relu(norm(conv(x)))
        return x


@_register("trap_modulelist_loop", (2, 3, 8, 8), foldable=3, left=0, family="trap",
           pairs=tuple((f"norms.{i}", f"convs.{i}", "conv->bn") for i in range(3)))
def _trap_modulelist_loop() -> nn.Module:
    """convs and norms in two ModuleLists (norms registered first), paired in a Python loop:
    conv_i -> norm_i -> ReLU three times; all three fold."""
    return _ModuleListLoop()


class _ModuleDictLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({
            "norm_b": nn.BatchNorm2d(4), "conv_a": nn.Conv2d(3, 4, 3, padding=1),
            "conv_b": nn.Conv2d(4, 4, 3), "norm_a": nn.BatchNorm2d(4),
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for key in ("a", "b"):
            x = torch.relu(self.layers[f"norm_{key}"](self.layers[f"conv_{key}"](x)))
        return x


@_register("trap_moduledict_loop", (2, 3, 8, 8), foldable=2, left=0, family="trap",
           pairs=(("layers.norm_a", "layers.conv_a", "conv->bn"), ("layers.norm_b", "layers.conv_b", "conv->bn")))
def _trap_moduledict_loop() -> nn.Module:
    """A ModuleDict registered in scrambled order, used in a loop: conv_a -> norm_a -> ReLU ->
    conv_b -> norm_b -> ReLU; both fold."""
    return _ModuleDictLoop()


class _DataDependentRouter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = _seq(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.neg = _seq(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this forward
            return self.pos(x)
        return self.neg(x)


@_register("trap_untraceable_parent", (2, 3, 8, 8), foldable=2, left=0, family="trap",
           pairs=(("pos.1", "pos.0", "conv->bn"), ("neg.1", "neg.0", "conv->bn")))
def _trap_untraceable_parent() -> nn.Module:
    """The parent's forward branches on x.sum() (untraceable), its children pos and neg are
    traceable conv -> BN -> ReLU blocks: analysing each child folds both BNs; whichever
    branch runs evaluates no BN."""
    return _DataDependentRouter()


class _DataDependentWithOwnPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.child = _seq(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.mean() > 0:  # data-dependent: nothing in this forward is visible to a tracer
            y = torch.relu(y)
        return self.child(y)


@_register("trap_untraceable_parent_own_pair", (2, 3, 8, 8), foldable=1, left=1, family="trap",
           skips={"bn": ("untraceable",)},
           pairs=(("child.1", "child.0", "conv->bn"),))
def _trap_untraceable_parent_own_pair() -> nn.Module:
    """The untraceable parent calls conv -> bn itself (not through a child): that region cannot
    be traced, so bn stays ("untraceable"); the traceable child's conv -> BN folds. One BN runs."""
    return _DataDependentWithOwnPair()


class _ResidualNormBeforeConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        return h + self.conv2(self.bn(h))


@_register("trap_residual_bn_before_conv", (2, 3, 8, 8), foldable=1, left=0, family="trap",
           pairs=(("bn", "conv2", "bn->conv"),))
def _trap_residual_bn_before_conv() -> nn.Module:
    """h = conv1(x); h + conv2(bn(h)), registered conv1, bn, conv2. conv1's output also feeds the
    add, so bn must not fold into conv1 (what a registration-order walk does); bn's output feeds
    only conv2, a 1x1 conv without padding, so bn folds into conv2. Nothing is left."""
    return _ResidualNormBeforeConv()


class _NormOutputShared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        return y + self.conv(y)


@_register("trap_residual_bn_output_shared", (2, 3, 8, 8), foldable=0, left=1, family="trap",
           skips={"bn": ("output_used_elsewhere", "no_fusable_neighbour")})
def _trap_residual_bn_output_shared() -> nn.Module:
    """y = bn(x); y + conv(y): the BN's output also feeds the add, so folding it into the conv
    would leave the skip branch unnormalised; nothing precedes it; it runs once."""
    return _NormOutputShared()


@_register("trap_bn_after_add", (2, 3, 8, 8), foldable=0, left=1, family="trap",
           skips={"bn": ("no_fusable_neighbour",)})
def _trap_bn_after_add() -> nn.Module:
    """bn(conv1(x) + conv2(x)) -> ReLU: the BN's producer is an add, not a layer: not folded."""
    return _NormAfterMerge("add")


@_register("trap_bn_after_concat", (2, 3, 8, 8), foldable=0, left=1, family="trap",
           skips={"bn": ("no_fusable_neighbour",)})
def _trap_bn_after_concat() -> nn.Module:
    """bn(cat([conv1(x), x])) -> ReLU: BN channels 4-6 are the model input itself, which no
    layer produces, and the BN (one module) is either removed or kept whole: not folded."""
    return _NormAfterMerge("cat_input")


@_register("trap_bn_before_conv_transpose", (2, 3, 8, 8), foldable=0, left=1, family="trap",
           skips={"0": ("transposed_after_bn",)})
def _trap_bn_before_conv_transpose() -> nn.Module:
    """BatchNorm2d -> ConvTranspose2d: the number of taps reaching an output varies with the
    position, so the BN shift is not a per-channel bias: not folded; it runs once."""
    return _seq(nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 4, 3, stride=2))


@_register("trap_bnact_before_conv", (2, 3, 8, 8), foldable=0, left=1, family="trap",
           skips={"0": ("no_fusable_neighbour",)})
def _trap_bnact_before_conv() -> nn.Module:
    """BatchNormAct2d (BN then ReLU) -> 1x1 Conv2d on the model input: the ReLU inside the norm
    module sits between its BN and the conv, and nothing precedes it: not folded."""
    return _seq(BatchNormAct2d(3, act_layer=nn.ReLU), nn.Conv2d(3, 4, 1))


@_register("trap_unknown_norm_subclass", (2, 3, 8, 8), foldable=0, left=1, family="trap",
           skips={"1": ("unknown_norm",)})
def _trap_unknown_norm_subclass() -> nn.Module:
    """Conv2d -> a BatchNorm2d subclass whose forward also scales and shifts: its forward is
    not batch norm, so it is left alone and runs once."""
    return _seq(nn.Conv2d(3, 4, 3), ShiftedBatchNorm2d(4))


@_register("trap_linear_bn1d_on_sequence", (2, 6, 5), foldable=0, left=1, family="trap",
           skips={"1": ("rank_unknown", "no_fusable_neighbour", "unsupported_layer")})
def _trap_linear_bn1d_on_sequence() -> nn.Module:
    """Linear(5, 6) -> BatchNorm1d(6) on a 3-D (N, L=6, C=5) input: the linear's features are the
    last axis, BN1d normalises axis 1 (L, which happens to be 6 too), so the widths match but
    the fold would be wrong: not folded; it runs once."""
    return _seq(nn.Linear(5, 6), nn.BatchNorm1d(6))

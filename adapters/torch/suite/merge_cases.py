"""Named branch-merging cases with a hand-worked answer: what a correct re-parameteriser merges and leaves.

Each :class:`MergeCase` builds a small model (4-8 channels, 8x8 inputs) in eval mode with random weights
and randomised norm statistics, seeded by the case name, in which a *block* -- the child module named
``block`` -- computes a sum of branches from the model's input. The expected numbers are worked out by
hand from each block's dataflow and refimpl's exactness rules (``spec/folding.md`` section 8), never by
running the code under test:

``merges``
    how many groups of branches merge into one layer (``len(report.merged)``);
``convs``
    conv and linear layer calls left in one forward pass of the re-parameterised model;
``norms``
    norm layer calls left (the remaining BatchNorms fold with ``fuse``'s rules);
``left``
    the reason codes of the sums left (``report.merges_skipped``), sorted;
``reference``
    for merged cases, the sum the merged layer replaces, computed from the *original* block's
    layers with the float64 reference ops (:class:`Reference`), value and magnitude for the error model.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

import refimpl

from .cases import count_calls, randomize_norm_stats, randomize_parameters

__all__ = ["MergeCase", "MERGE_CASES", "iter_merge_cases", "Pair", "Reference", "RepConv", "LayerScale2d", "DropPath",
           "count_layer_calls", "repconv_backbone"]


# ---------------------------------------------------------------------------------------------
# The float64 reference of the original branches: value and magnitude together

@dataclass
class Pair:
    """A float64 value and its magnitude (the same computation on absolute values: the error model's scale)."""

    value: np.ndarray
    magnitude: np.ndarray

    def __add__(self, other: Pair) -> Pair:
        return Pair(self.value + other.value, self.magnitude + other.magnitude)

    def __sub__(self, other: Pair) -> Pair:
        return Pair(self.value - other.value, self.magnitude + other.magnitude)

    def scaled(self, factor) -> Pair:
        """Times a constant: a number or one value per channel (axis 1; the last axis for 2-D input)."""
        c = np.asarray(factor, dtype=np.float64)
        if c.ndim == 1:
            c = c.reshape((1, -1) + (1,) * (self.value.ndim - 2)) if self.value.ndim > 2 else c.reshape(1, -1)
        return Pair(self.value * c, self.magnitude * np.abs(c))


def _np(t: Any) -> Any:
    return None if t is None else t.detach().to(torch.float64).cpu().numpy()


class Reference:
    """Applies a model's layers with refimpl's float64 reference ops (torch's own float64 pool for pooling)."""

    @staticmethod
    def input(x: torch.Tensor) -> Pair:
        v = x.detach().to(torch.float64).cpu().numpy()
        return Pair(v, np.abs(v))

    @staticmethod
    def conv(x: Pair, conv: Any) -> Pair:
        w, b = _np(conv.weight), _np(conv.bias)
        args = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                    padding_mode=conv.padding_mode)
        value = refimpl.conv(x.value, w, b, **args)
        magnitude = refimpl.conv(x.magnitude, np.abs(w), None if b is None else np.abs(b), **args)
        return Pair(value, magnitude)

    @staticmethod
    def linear(x: Pair, layer: Any) -> Pair:
        w, b = _np(layer.weight), _np(layer.bias)
        return Pair(refimpl.linear(x.value, w, b), refimpl.linear(x.magnitude, np.abs(w), None if b is None
                                                                   else np.abs(b)))

    @staticmethod
    def bn(x: Pair, bn: Any) -> Pair:
        mean, var, gamma, beta = _np(bn.running_mean), _np(bn.running_var), _np(bn.weight), _np(bn.bias)
        value = refimpl.batch_norm(x.value, mean, var, gamma, beta, eps=bn.eps)
        s, _ = refimpl.bn_scale_shift(mean, var, bn.eps, gamma, beta)
        channel = (slice(None),) + (None,) * (x.value.ndim - 2)
        shift = np.abs(s * mean) + (0.0 if beta is None else np.abs(beta))
        return Pair(value, np.abs(s)[channel] * x.magnitude + shift[channel])

    @staticmethod
    def pool(x: Pair, pool: Any) -> Pair:
        def run(a: np.ndarray) -> np.ndarray:
            function = {3: nn.functional.avg_pool1d, 4: nn.functional.avg_pool2d, 5: nn.functional.avg_pool3d}
            return function[a.ndim](torch.from_numpy(a), pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode,
                                    pool.count_include_pad).numpy()
        return Pair(run(x.value), run(x.magnitude))


# ---------------------------------------------------------------------------------------------
# Blocks

class LayerScale2d(nn.Module):
    """timm's LayerScale2d: ``x * gamma`` with ``gamma`` of shape (C, 1, 1)."""

    def __init__(self, dim: int, init: float = 0.5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """timm's DropPath (stochastic depth): drops whole samples in training; in eval its forward returns its input
    (a Python branch: a tracer sees no operation at all)."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class ConvBN(nn.Module):
    """A conv and its BatchNorm (a YOLO/timm ``Conv`` without activation)."""

    def __init__(self, cin: int, cout: int, k, stride=1, padding=0, groups=1, dilation=1,
                 padding_mode="zeros") -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False, padding_mode=padding_mode)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _convbn(r: type[Reference], x: Pair, m: ConvBN) -> Pair:
    return r.bn(r.conv(x, m.conv), m.bn)


class RepConv(nn.Module):
    """The re-parameterisable conv of YOLOv6/v7 and ultralytics, written out: ``act(conv1(x) + conv2(x) + bn(x))``
    with a 3x3 conv+BN, a 1x1 conv+BN and, when in == out and stride 1, an identity BatchNorm."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, p: int = 1, bn: bool = True) -> None:
        super().__init__()
        self.act = nn.SiLU()
        self.bn = nn.BatchNorm2d(c1) if bn and c2 == c1 and s == 1 else None
        self.conv1 = ConvBN(c1, c2, k, s, p)
        self.conv2 = ConvBN(c1, c2, 1, s, p - k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        id_out = 0 if self.bn is None else self.bn(x)
        return self.act(self.conv1(x) + self.conv2(x) + id_out)


class _Block(nn.Module):
    """A block built from a forward function and named children (the cases below)."""

    def __init__(self, forward: Callable, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)
        self._forward = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(self, x)


class _Net(nn.Module):
    """The model around a block: ``head(block(x))`` (a 1x1 conv head, so the block is not the model)."""

    def __init__(self, block: nn.Module, channels: int, dims: int = 2) -> None:
        super().__init__()
        self.block = block
        self.head = {0: nn.Linear, 1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](channels, 3, *(() if dims == 0
                                                                                                  else (1,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


# ---------------------------------------------------------------------------------------------
# Registry

@dataclass(frozen=True)
class MergeCase:
    """A named model with its hand-worked re-parameterisation outcome (see the module docstring)."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    merges: int
    convs: int
    norms: int
    left: tuple[str, ...]
    description: str
    reference: Callable[[type[Reference], nn.Module, Pair], Pair] | None = None
    block: str = "block"

    def make_input(self, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(self.input_shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


MERGE_CASES: dict[str, MergeCase] = {}


def iter_merge_cases() -> Iterator[MergeCase]:
    return iter(MERGE_CASES.values())


@torch.no_grad()
def _randomize(model: nn.Module, generator: torch.Generator) -> None:
    randomize_parameters(model, generator)
    randomize_norm_stats(model, generator)
    for module in model.modules():
        if isinstance(module, LayerScale2d):  # a layer scale is a per-channel constant: make it one
            module.gamma.copy_(0.5 + torch.rand(module.gamma.shape, generator=generator, dtype=torch.float64))


def _case(name: str, shape: tuple[int, ...], *, merges: int, convs: int, norms: int, left: tuple[str, ...] = (),
          reference=None, wrap: int | None = 4, dims: int = 2):
    """Register a builder of the block (or, with ``wrap=None``, of the whole model); its docstring is the case's
    hand-worked reasoning."""
    def decorator(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        if name in MERGE_CASES:
            raise ValueError(f"merge case {name!r} registered twice")
        seed = zlib.crc32(name.encode())

        def build() -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                made = make()
                model = made if wrap is None else _Net(made, wrap, dims)
            _randomize(model, torch.Generator().manual_seed(seed))
            return model.eval()

        MERGE_CASES[name] = MergeCase(name, build, shape, merges, convs, norms, tuple(sorted(left)),
                                      " ".join((make.__doc__ or "").split()), reference)
        return make
    return decorator


def count_layer_calls(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Forward calls of conv (incl. transposed) and linear layers during one ``model(*inputs)`` (no grad)."""
    return count_calls(model, *inputs, counted=lambda m: isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)))


C = 4
X = (2, C, 8, 8)


def _bn(c: int = C) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


# ---------------------------------------------------------------------------------------------
# Each branch kind

@_case("repvgg_block", X, merges=1, convs=2, norms=0,
       reference=lambda r, b, x: _convbn(r, x, b.kxk) + _convbn(r, x, b.k1) + r.bn(x, b.identity))
def _repvgg_block():
    """RepVGG: relu(bn(conv3x3(x)) + bn(conv1x1(x)) + bn(x)). Every branch is affine in x; the 1x1 kernel
    centred in 3x3 reads what it read with padding 0 = 1 - (3-1)/2; the identity BN is a depthwise 1x1
    identity scaled per channel. One 3x3 conv remains, plus the head: 2 convs, no norm."""
    return _Block(lambda m, x: torch.relu(m.kxk(x) + m.k1(x) + m.identity(x)),
                  kxk=ConvBN(C, C, 3, padding=1), k1=ConvBN(C, C, 1), identity=_bn())


@_case("repvgg_stride2_no_identity", X, merges=1, convs=2, norms=0, wrap=8,
       reference=lambda r, b, x: _convbn(r, x, b.kxk) + _convbn(r, x, b.k1))
def _repvgg_stride2():
    """RepVGG's downsampling block, 4 -> 8 channels, stride 2: bn(conv3x3 s2 p1) + bn(conv1x1 s2 p0), no
    identity (shapes differ). Strides agree; the 1x1 centred at offset 1 needs padding 1 - 1 = 0: it merges."""
    return _Block(lambda m, x: torch.relu(m.kxk(x) + m.k1(x)),
                  kxk=ConvBN(C, 8, 3, stride=2, padding=1), k1=ConvBN(C, 8, 1, stride=2))


@_case("identity_plain_x", X, merges=1, convs=2, norms=0,
       reference=lambda r, b, x: r.conv(x, b.conv) + x)
def _identity_plain_x():
    """A residual without norms: conv3x3(x) + x, the conv with a bias. x is the identity kernel (1 at the
    centre of each channel's own input): one conv."""
    return _Block(lambda m, x: m.conv(x) + x, conv=nn.Conv2d(C, C, 3, padding=1))


@_case("identity_module_and_dropout", X, merges=1, convs=2, norms=0,
       reference=lambda r, b, x: r.conv(x, b.conv) + x + r.conv(x, b.k1))
def _identity_module_and_dropout():
    """conv3x3(x) + Identity(x) + Dropout(conv1x1(x)): identity and dropout are the identity in eval mode,
    so the three branches are affine in x and merge into one 3x3 conv."""
    return _Block(lambda m, x: m.conv(x) + m.ident(x) + m.drop(m.k1(x)), conv=nn.Conv2d(C, C, 3, padding=1),
                  ident=nn.Identity(), k1=nn.Conv2d(C, C, 1), drop=nn.Dropout(0.2))


@_case("avgpool_branch", X, merges=1, convs=2, norms=0,
       reference=lambda r, b, x: _convbn(r, x, b.kxk) + r.bn(r.pool(x, b.pool), b.pool_bn))
def _avgpool_branch():
    """DBB's pooling branch on x: bn(conv3x3 p1 (x)) + bn(avgpool3x3 s1 p1 (x)) with count_include_pad=True,
    which is a depthwise 3x3 conv of 1/9 with zero padding 1: it merges (one 3x3 conv)."""
    return _Block(lambda m, x: m.kxk(x) + m.pool_bn(m.pool(x)), kxk=ConvBN(C, C, 3, padding=1),
                  pool=nn.AvgPool2d(3, 1, 1, count_include_pad=True), pool_bn=_bn())


@_case("layer_scale_branch", X, merges=1, convs=2, norms=0,
       reference=lambda r, b, x: x + _convbn(r, x, b.mix).scaled(b.ls.gamma.detach().reshape(-1).numpy()))
def _layer_scale_branch():
    """x + LayerScale2d(bn(conv3x3(x))): the layer scale is a constant (C, 1, 1) factor, folded into the
    branch per output channel; with the identity, one 3x3 conv."""
    return _Block(lambda m, x: x + m.ls(m.mix(x)), mix=ConvBN(C, C, 3, padding=1), ls=LayerScale2d(C))


def _repmixer_reference(r, b, x):
    mixer = _convbn(r, x, b.dw3) + _convbn(r, x, b.dw1) + r.bn(x, b.mixer_identity)
    return x + (mixer - r.bn(x, b.norm)).scaled(b.ls.gamma.detach().reshape(-1).numpy())


@_case("drop_path_branch", X, merges=1, convs=2, norms=0,
       reference=lambda r, b, x: x + _convbn(r, x, b.mix).scaled(b.ls.gamma.detach().reshape(-1).numpy()))
def _drop_path_branch():
    """x + DropPath(LayerScale2d(bn(conv3x3(x)))), a ConvNeXt/FastViT-style residual: the drop path is the
    identity in eval and leaves no node in a trace, so the branch is affine in x. One 3x3 conv + the head."""
    return _Block(lambda m, x: x + m.drop_path(m.ls(m.mix(x))), mix=ConvBN(C, C, 3, padding=1), ls=LayerScale2d(C),
                  drop_path=DropPath(0.2))


class _IndexedScale(nn.Module):
    """``x + conv3x3(x) * gamma[:, None, None]`` with ``gamma`` of shape (C,)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.gamma = nn.Parameter(torch.ones(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) * self.gamma[:, None, None]


@_case("layer_scale_indexed", X, merges=1, convs=2, norms=0,
       reference=lambda r, b, x: x + r.conv(x, b.conv).scaled(b.gamma.detach().numpy()))
def _layer_scale_indexed():
    """A layer scale broadcast by indexing, gamma[:, None, None] (C, 1, 1): a constant indexed with fixed indices
    is a constant, one value per channel; with the identity, one 3x3 conv + the head."""
    return _IndexedScale()


@_case("repmixer_difference", X, merges=1, convs=2, norms=0, reference=_repmixer_reference)
def _repmixer_difference():
    """FastViT's RepMixer: x + gamma * ((bn(dw3x3(x)) + bn(dw1x1(x)) + bn(x)) - bn(x)) with depthwise convs:
    a difference of sums under a layer scale, all affine in x. One depthwise 3x3 conv."""
    def forward(m, x):
        mixer = m.dw3(x) + m.dw1(x) + m.mixer_identity(x)
        return x + m.ls(mixer - m.norm(x))
    return _Block(forward, dw3=ConvBN(C, C, 3, padding=1, groups=C), dw1=ConvBN(C, C, 1, groups=C),
                  mixer_identity=_bn(), norm=_bn(), ls=LayerScale2d(C))


@_case("bn_after_sum", X, merges=1, convs=2, norms=0,
       reference=lambda r, b, x: r.bn(_convbn(r, x, b.conv) + r.conv(x, b.conv1) + x, b.bn))
def _bn_after_sum():
    """RepViT's RepVggDw: bn(convbn_dw3x3(x) + conv_dw1x1(x) + x). The BN after the sum is a per-channel
    affine map of the merged conv's output: it folds in too. One depthwise conv, no norm."""
    return _Block(lambda m, x: m.bn(m.conv(x) + m.conv1(x) + x), conv=ConvBN(C, C, 3, padding=1, groups=C),
                  conv1=nn.Conv2d(C, C, 1, groups=C), bn=_bn())


@_case("acnet_asymmetric", X, merges=1, convs=2, norms=0,
       reference=lambda r, b, x: _convbn(r, x, b.square) + _convbn(r, x, b.hor) + _convbn(r, x, b.ver))
def _acnet():
    """ACNet: bn(conv3x3 p1) + bn(conv1x3 p(0,1)) + bn(conv3x1 p(1,0)). Each kernel is centred in 3x3 dim by
    dim (1 -> offset 1, needs padding 0); one 3x3 conv."""
    return _Block(lambda m, x: m.square(x) + m.hor(x) + m.ver(x), square=ConvBN(C, C, 3, padding=1),
                  hor=ConvBN(C, C, (1, 3), padding=(0, 1)), ver=ConvBN(C, C, (3, 1), padding=(1, 0)))


def _dbb_reference(r, b, x):
    return _convbn(r, x, b.kxk) + r.bn(r.conv(r.bn(r.conv(x, b.k1), b.mid_bn), b.k3), b.out_bn)


@_case("dbb_sequential_valid", X, merges=1, convs=2, norms=0, reference=_dbb_reference)
def _dbb_valid():
    """DBB's 1x1 -> BN -> kxk branch without padding: bn(conv3x3 p0 (x)) + bn(conv3x3 p0 (bn(conv1x1(x)))). The
    inner BN's shift never meets padding, so the chain is one 3x3 conv and the sum one conv."""
    def forward(m, x):
        return m.kxk(x) + m.out_bn(m.k3(m.mid_bn(m.k1(x))))
    return _Block(forward, kxk=ConvBN(C, C, 3), k1=nn.Conv2d(C, C, 1, bias=False), mid_bn=_bn(),
                  k3=nn.Conv2d(C, C, 3, bias=False), out_bn=_bn())


@_case("dbb_sequential_zero_padding", X, merges=0, convs=4, norms=0, left=("zero_padding",))
def _dbb_padding():
    """The same chain with padding 1: the inner BN's shift would enter the 3x3 conv's zero padding, so the
    chain is not a conv of x: left with zero_padding. Folds still apply: kxk's BN and out_bn fold forward,
    mid_bn folds into the 1x1 before it: 3 convs in the block + the head, no norm."""
    def forward(m, x):
        return m.kxk(x) + m.out_bn(m.k3(m.mid_bn(m.k1(x))))
    return _Block(forward, kxk=ConvBN(C, C, 3, padding=1), k1=nn.Conv2d(C, C, 1, bias=False), mid_bn=_bn(),
                  k3=nn.Conv2d(C, C, 3, padding=1, bias=False), out_bn=_bn())


@_case("dbb_sequential_no_shift", X, merges=1, convs=2, norms=0,
       reference=lambda r, b, x: _convbn(r, x, b.kxk) + r.conv(r.conv(x, b.k1), b.k3))
def _dbb_no_shift():
    """1x1 (no bias) -> 3x3 p1 beside a 3x3 conv+BN: the 1x1 adds no constant, so zero padding of its output
    equals the 1x1 of zero padding: exact, one conv."""
    return _Block(lambda m, x: m.kxk(x) + m.k3(m.k1(x)), kxk=ConvBN(C, C, 3, padding=1),
                  k1=nn.Conv2d(C, C, 1, bias=False), k3=nn.Conv2d(C, C, 3, padding=1, bias=False))


@_case("dbb_avgpool_after_1x1", X, merges=0, convs=3, norms=0, left=("zero_padding",))
def _dbb_avgpool_after_1x1():
    """DBB's 1x1 -> BN -> avgpool(3, s1, p1) branch beside a 3x3 conv: the pool zero-pads the BN's output,
    whose shift is not zero: left with zero_padding. Both BNs fold forward into their convs: 2 convs in the
    block + the head."""
    return _Block(lambda m, x: m.kxk(x) + m.pool(m.mid_bn(m.k1(x))), kxk=ConvBN(C, C, 3, padding=1),
                  k1=nn.Conv2d(C, C, 1, bias=False), mid_bn=_bn(), pool=nn.AvgPool2d(3, 1, 1))


@_case("linear_branches", (4, 6), merges=1, convs=2, norms=0, wrap=6, dims=0,
       reference=lambda r, b, x: r.linear(x, b.fc1) + r.linear(x, b.fc2) + x)
def _linear_branches():
    """fc1(x) + fc2(x) + x on (N, 6): linear layers are convs without spatial dims; x is the identity
    matrix. One linear layer + the head."""
    return _Block(lambda m, x: m.fc1(x) + m.fc2(x) + x, fc1=nn.Linear(6, 6), fc2=nn.Linear(6, 6, bias=False))


@_case("linear_bn_heads_averaged", (4, 6), merges=1, convs=2, norms=0, wrap=5, dims=0,
       reference=lambda r, b, x: (r.linear(r.bn(x, b.bn1), b.l1) + r.linear(r.bn(x, b.bn2), b.l2)).scaled(0.5))
def _linear_bn_heads():
    """RepViT's distillation head: (l1(bn1(x)) + l2(bn2(x))) / 2 with BatchNorm1d on (N, 6) (proven 2-D by the
    example input): BN -> linear is exact, the halving a constant scale. One linear + the head."""
    return _Block(lambda m, x: (m.l1(m.bn1(x)) + m.l2(m.bn2(x))) / 2, bn1=nn.BatchNorm1d(6), l1=nn.Linear(6, 5),
                  bn2=nn.BatchNorm1d(6), l2=nn.Linear(6, 5))


@_case("grouped_conv_depthwise_identity", X, merges=1, convs=2, norms=0,
       reference=lambda r, b, x: _convbn(r, x, b.kxk) + r.bn(x, b.identity))
def _grouped_identity():
    """A grouped 3x3 conv (groups=2) + BN beside an identity BN: the depthwise identity is laid out in the
    conv's two groups (channel c reads its own input at position c mod 2 of its group). One grouped conv."""
    return _Block(lambda m, x: m.kxk(x) + m.identity(x), kxk=ConvBN(C, C, 3, padding=1, groups=2), identity=_bn())


@_case("sum_of_list_and_inplace_add", X, merges=1, convs=2, norms=0,
       reference=lambda r, b, x: _convbn(r, x, b.kxk) + r.bn(x, b.identity) + r.conv(x, b.k1).scaled(0.5))
def _sum_forms():
    """Python's sum() of a list (0 + a + b), then Tensor.add_(alpha=0.5): one flattened sum
    kxk(x) + bn(x) + 0.5 * k1(x); the in-place add writes into the sum's own partial result. One conv."""
    def forward(m, x):
        out = sum([m.kxk(x), m.identity(x)])
        out = out.add_(m.k1(x), alpha=0.5)
        return out
    return _Block(forward, kxk=ConvBN(C, C, 3, padding=1), k1=nn.Conv2d(C, C, 1), identity=_bn())


@_case("mixed_sum_partial_merge", X, merges=1, convs=3, norms=0,
       reference=None)
def _mixed_sum():
    """relu(cz(x)) + c1(x) + c3(x): the last two are affine in x and merge into one 3x3 conv; the ReLU term
    stays. 2 convs in the block (cz and the merged one) + the head."""
    return _Block(lambda m, x: torch.relu(m.cz(x)) + m.c1(x) + m.c3(x), cz=nn.Conv2d(C, C, 1),
                  c1=nn.Conv2d(C, C, 1), c3=nn.Conv2d(C, C, 3, padding=1))


@_case("two_groups_in_one_sum", X, merges=2, convs=3, norms=0)
def _two_groups():
    """a1(x) + b1(y) + a3(x) + b3(y) with y = tanh(x): one sum, two groups (the x terms and the y terms), each
    merged into its own 3x3 conv; the sum adds the two. 2 convs in the block + the head."""
    def forward(m, x):
        y = torch.tanh(x)
        return m.a1(x) + m.b1(y) + m.a3(x) + m.b3(y)
    return _Block(forward, a1=nn.Conv2d(C, C, 1), b1=nn.Conv2d(C, C, 1), a3=nn.Conv2d(C, C, 3, padding=1),
                  b3=nn.Conv2d(C, C, 3, padding=1))


@_case("chained_sums_through_identity", X, merges=2, convs=3, norms=0, wrap=2 * C)
def _chained_sums_through_identity():
    """GhostNetV3's ghost module: x1 = act(bn(x) + bn(conv1x1(x)) + bn(conv3x3(x))) with act an nn.Identity,
    then x2 = bn(x1) + bn(dw3x3(x1)), and cat(x1, x2). The Identity joins the first sum's expression (its
    output is what the merged conv replaces), and that same output is the source of the second sum, which
    must read the first merged conv. Two 3x3 convs in the block + the head; all five BNs merge away."""
    def forward(m, x):
        x1 = m.act(m.skip(x) + m.scale(x) + m.kxk(x))
        x2 = m.cheap_skip(x1) + m.cheap(x1)
        return torch.cat([x1, x2], dim=1)
    return _Block(forward, skip=_bn(), scale=ConvBN(C, C, 1), kxk=ConvBN(C, C, 3, padding=1), act=nn.Identity(),
                  cheap_skip=_bn(), cheap=ConvBN(C, C, 3, padding=1, groups=C))


class _SharedScale(nn.Module):
    """``relu(conv3x3(x) * g + x) * g`` with ``g = torch.reshape(gamma, (1, C, 1, 1))`` computed once."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.gamma = nn.Parameter(torch.ones(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.reshape(self.gamma, (1, C, 1, 1))
        return torch.relu(self.conv(x) * g + x) * g


@_case("layer_scale_also_read_after_the_sum", X, merges=1, convs=2, norms=0,
       reference=lambda r, b, x: r.conv(x, b.conv).scaled(b.gamma.detach().numpy()) + x)
def _layer_scale_also_read_after_the_sum():
    """A layer scale reshaped by a function (torch.reshape), used in the sum conv3x3(x) * g + x and again after
    the activation. The sum merges into one 3x3 conv; the reshaped constant stays for its other reader.
    One conv in the block + the head."""
    return _SharedScale()


@_case("conv1d_branches", (2, C, 9), merges=1, convs=2, norms=0, dims=1,
       reference=lambda r, b, x: r.bn(r.conv(x, b.c5), b.bn5) + r.conv(x, b.c1) + r.bn(x, b.identity))
def _conv1d():
    """1-d: bn(conv k5 p2) + conv k1 + bn(x) on (N, 4, 9): one k5 conv."""
    return _Block(lambda m, x: m.bn5(m.c5(x)) + m.c1(x) + m.identity(x), c5=nn.Conv1d(C, C, 5, padding=2),
                  bn5=nn.BatchNorm1d(C), c1=nn.Conv1d(C, C, 1), identity=nn.BatchNorm1d(C))


@_case("conv3d_branches", (2, C, 4, 5, 5), merges=1, convs=2, norms=0, dims=3,
       reference=lambda r, b, x: r.bn(r.conv(x, b.c3), b.bn3) + r.conv(x, b.c1) + x)
def _conv3d():
    """3-d: bn(conv 3x3x3 p1) + conv 1x1x1 + x: one 3x3x3 conv."""
    return _Block(lambda m, x: m.bn3(m.c3(x)) + m.c1(x) + x, c3=nn.Conv3d(C, C, 3, padding=1),
                  bn3=nn.BatchNorm3d(C), c1=nn.Conv3d(C, C, 1))


@_case("reflect_padding_branches", X, merges=1, convs=2, norms=0,
       reference=lambda r, b, x: r.conv(x, b.c3) + r.conv(x, b.c1) + x)
def _reflect():
    """conv3x3 with reflect padding + conv1x1 + x: only the 3x3 pads, so the merged conv pads with reflect."""
    return _Block(lambda m, x: m.c3(x) + m.c1(x) + x, c3=nn.Conv2d(C, C, 3, padding=1, padding_mode="reflect"),
                  c1=nn.Conv2d(C, C, 1))


@_case("yolo_repconv", X, merges=1, convs=2, norms=0,
       reference=lambda r, b, x: _convbn(r, x, b.conv1) + _convbn(r, x, b.conv2) + r.bn(x, b.bn))
def _yolo_repconv():
    """YOLO's RepConv (written out in this module): SiLU(bn(conv3x3) + bn(conv1x1) + bn(x)), the identity
    term written as ``0 if self.bn is None else self.bn(x)``. One 3x3 conv."""
    return RepConv(C, C)


@_case("mobileone_k_branches", X, merges=1, convs=2, norms=0,
       reference=lambda r, b, x: (_convbn(r, x, b.k0) + _convbn(r, x, b.k1) + _convbn(r, x, b.k2)
                                  + _convbn(r, x, b.scale) + r.bn(x, b.identity)))
def _mobileone():
    """MobileOne (depthwise): three over-parameterised 3x3 conv+BN branches, a 1x1 scale branch and an identity
    BN, added in a loop onto ``out = scale + identity``. One depthwise 3x3 conv."""
    def forward(m, x):
        out = m.scale(x) + m.identity(x)
        for branch in (m.k0, m.k1, m.k2):
            out += branch(x)
        return out
    return _Block(forward, k0=ConvBN(C, C, 3, padding=1, groups=C), k1=ConvBN(C, C, 3, padding=1, groups=C),
                  k2=ConvBN(C, C, 3, padding=1, groups=C), scale=ConvBN(C, C, 1, groups=C), identity=_bn())


# ---------------------------------------------------------------------------------------------
# Traps: sums that must be left, with the reason

@_case("trap_even_kernel_misaligned", X, merges=0, convs=3, norms=0, left=("padding_misaligned",))
def _even_kernel():
    """conv2x2 s2 p0 + conv1x1 s2 p0: both give 4x4 from 8x8 (not from 9x9: 4x4 and 5x5), and a 2-tap kernel
    has no centre to put the 1x1 kernel at. Only sums exact at every input size merge: left; 2 convs + the
    head."""
    return _Block(lambda m, x: m.c2(x) + m.c1(x), c2=nn.Conv2d(C, C, 2, 2), c1=nn.Conv2d(C, C, 1, 2))


@_case("trap_padding_misaligned_stride4", X, merges=0, convs=3, norms=0, left=("padding_misaligned",))
def _stride4():
    """conv5x5 s4 p2 + conv3x3 s4 p0: 2x2 outputs from 8x8 both (from 10x10: 3x3 and 2x2), but the 3x3 centred
    in 5x5 needs padding 2 - 1 = 1, not 0: centred, it would read other positions. Left."""
    return _Block(lambda m, x: m.c5(x) + m.c3(x), c5=nn.Conv2d(C, C, 5, 4, 2), c3=nn.Conv2d(C, C, 3, 4, 0))


@_case("trap_dilation_mismatch", X, merges=0, convs=3, norms=0, left=("dilation_mismatch",))
def _dilation():
    """conv3x3 dilation 2 pad 2 + conv3x3 dilation 1 pad 1: same size, different taps. Left."""
    return _Block(lambda m, x: m.d2(x) + m.d1(x), d2=nn.Conv2d(C, C, 3, padding=2, dilation=2),
                  d1=nn.Conv2d(C, C, 3, padding=1))


@_case("trap_padding_mode_mismatch", X, merges=0, convs=3, norms=0, left=("padding_mode_mismatch",))
def _padding_mode():
    """conv3x3 reflect p1 + conv3x3 zeros p1: one merged conv cannot pad both ways. Left."""
    return _Block(lambda m, x: m.a(x) + m.b(x), a=nn.Conv2d(C, C, 3, padding=1, padding_mode="reflect"),
                  b=nn.Conv2d(C, C, 3, padding=1))


@_case("trap_groups_incompatible", X, merges=0, convs=3, norms=0, left=("groups_incompatible",))
def _groups():
    """depthwise conv3x3 + dense conv1x1: merging would make the depthwise conv dense. Left."""
    return _Block(lambda m, x: m.dw(x) + m.pw(x), dw=nn.Conv2d(C, C, 3, padding=1, groups=C),
                  pw=nn.Conv2d(C, C, 1))


@_case("trap_stride_mismatch", (2, C, 1, 1), merges=0, convs=3, norms=0, left=("stride_mismatch",))
def _stride():
    """conv1x1 stride 1 + conv1x1 stride 2 on a 1x1 input: the outputs happen to match in size here, not for
    other sizes. Left."""
    return _Block(lambda m, x: m.s1(x) + m.s2(x), s1=nn.Conv2d(C, C, 1), s2=nn.Conv2d(C, C, 1, 2))


@_case("trap_avgpool_excludes_padding", X, merges=0, convs=2, norms=0, left=("unsupported_layer",))
def _pool_exclude():
    """conv3x3 + avgpool(3, s1, p1, count_include_pad=False): the pool's divisor changes at the borders, so
    it is no conv. Left."""
    return _Block(lambda m, x: m.c(x) + m.pool(x), c=nn.Conv2d(C, C, 3, padding=1),
                  pool=nn.AvgPool2d(3, 1, 1, count_include_pad=False))


@_case("trap_nonlinear_beside_avgpool_shortcut", X, merges=0, convs=4, norms=0, left=("nonlinear_branch",), wrap=8)
def _nonlinear_beside_avgpool_shortcut():
    """ResNet-D's downsampling block, 4 -> 8 channels: bn(c2(relu(bn(c1 s2 (x))))) + bn(c1x1(avgpool(2, 2,
    ceil_mode, count_include_pad=False)(x))). The shortcut's pool is no conv, but the sum could not merge even if
    it were: the residual operand is not affine in x. Left as nonlinear_branch; all three BNs fold into their
    convs. 3 convs + the head."""
    def forward(m, x):
        return m.b2(m.c2(torch.relu(m.b1(m.c1(x))))) + m.db(m.dc(m.pool(x)))
    return _Block(forward, c1=nn.Conv2d(C, 8, 3, 2, 1, bias=False), b1=_bn(8), c2=nn.Conv2d(8, 8, 3, 1, 1, bias=False),
                  b2=_bn(8), pool=nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                  dc=nn.Conv2d(C, 8, 1, bias=False), db=_bn(8))


@_case("trap_branch_output_used_elsewhere", X, merges=0, convs=3, norms=0, left=("branch_output_used_elsewhere",))
def _used_elsewhere():
    """y = bn1(c1(x)); (y + bn3(c3(x))) * sigmoid(y): y feeds the sum and the gate, so merging would not remove
    c1. Left; both BNs fold into their convs (the convs' own outputs feed only them)."""
    def forward(m, x):
        y = m.b1(m.c1(x))
        return (y + m.b3(m.c3(x))) * torch.sigmoid(y)
    return _Block(forward, c1=nn.Conv2d(C, C, 1), b1=_bn(), c3=nn.Conv2d(C, C, 3, padding=1), b3=_bn())


@_case("trap_inplace_into_shared", X, merges=0, convs=3, norms=0, left=("branch_output_used_elsewhere",))
def _inplace_shared():
    """h = c1(x); s = h.add_(c3(x)); s * sigmoid(h): the in-place add writes into h, which the gate reads
    too (it sees the sum, since s and h are one tensor). Merging would leave h unchanged. Left."""
    def forward(m, x):
        h = m.c1(x)
        s = h.add_(m.c3(x))
        return s * torch.sigmoid(h)
    return _Block(forward, c1=nn.Conv2d(C, C, 1), c3=nn.Conv2d(C, C, 3, padding=1))


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ca = nn.Conv2d(C, C, 3, padding=1)
        self.cb = nn.Conv2d(C, C, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.ca(a) + self.cb(b)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = _Pair()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pair(torch.relu(x), torch.tanh(x))


@_case("trap_different_inputs", X, merges=0, convs=3, norms=0, left=("different_inputs",))
def _different_inputs():
    """pair(relu(x), tanh(x)) computes ca(a) + cb(b): affine in two different tensors. Left."""
    return _TwoInputs()


@_case("trap_nonlinear_operand", X, merges=0, convs=3, norms=0, left=("nonlinear_branch",))
def _nonlinear():
    """c1(x) + relu(c3(x)): the ReLU branch is not affine. Left."""
    return _Block(lambda m, x: m.c1(x) + torch.relu(m.c3(x)), c1=nn.Conv2d(C, C, 1),
                  c3=nn.Conv2d(C, C, 3, padding=1))


class _SumInModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv2d(C, C, 3, padding=1)
        self.c1 = nn.Conv2d(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(x) + self.c1(x)


@_case("trap_sum_in_model_forward", X, merges=0, convs=2, norms=0, left=("sum_in_model_forward",), wrap=None)
def _sum_in_model():
    """The model's own forward computes c3(x) + c1(x): merging would change the model's class. Left."""
    return _SumInModel()


class _CallsBlockLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Block(lambda m, x: m.c3(x) + m.c1(x), c3=nn.Conv2d(C, C, 3, padding=1),
                            c1=nn.Conv2d(C, C, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return torch.relu(self.block.get_submodule("c1")(torch.tanh(y)))


@_case("trap_layer_used_outside_block", X, merges=0, convs=3, norms=0, left=("reused_incompatibly",), wrap=None)
def _used_outside():
    """The block merges c3(x) + c1(x), but the model also calls block.c1 itself: replacing the block would
    remove c1. Left with reused_incompatibly."""
    return _CallsBlockLayer()



def repconv_backbone() -> nn.Module:
    """A YOLO-style backbone of RepConv blocks (random weights; a factory for ``--model``): 3 -> 16 -> 32
    channels, each stride-2 RepConv (no identity branch) followed by a stride-1 one (with it), then a
    classifier. Four sums, each of which merges into one 3x3 conv."""
    return nn.Sequential(RepConv(3, 16, s=2), RepConv(16, 16), RepConv(16, 32, s=2), RepConv(32, 32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

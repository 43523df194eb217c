"""A registry of small named models with a hand-worked answer: what a correct fuser folds and leaves.

Each :class:`Case` builds a tiny ``nn.Module`` (a few channels, 8x8 inputs) in eval mode with
random weights and randomised BatchNorm statistics, drawn from a local ``torch.Generator``
seeded by the case name, so every build is identical and the global RNG is never touched.

The expected numbers are the oracle, worked out by hand from each model's *dataflow* (what
``forward`` computes), never from registration order and never from running a fuser:

``foldable``
    how many norm *modules* a correct fuser folds away (a BatchNorm shared by two convs that
    both fold counts once);
``left``
    how many norm *evaluations* (forward calls of norm modules) remain in one forward pass
    of the fused model, counted with :func:`count_norm_calls`;
``skips``
    for each norm module that must stay, the report reason codes a correct fuser may give.
    Where two codes describe the same situation equally well (the conv feeding a shared
    BatchNorm is also used elsewhere: "output used elsewhere" and "reused incompatibly" are
    both true) both are accepted;
``pairs``
    where given, the exact set of ``(norm, layer, kind)`` folds (qualified module names, kind as
    in the report: "conv->bn", "conv_transpose->bn", "linear->bn", "bn->conv", "bn->linear");
``rank_dependent``
    BatchNorm1d <-> Linear folds that are exact only on 2-D ``(N, C)`` inputs. With
    ``example_inputs`` a correct fuser folds them; without, it may prove the rank statically
    (after ``flatten``) or report them as ``"rank_unknown"``.

The suite is used by the tests, the model zoo, the demo CLI, the benchmarks and the audit of
third-party fusers, so it lives inside the package and depends on torch only.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..norms import is_norm

__all__ = [
    "Case", "CASES", "FAMILIES", "get_case", "iter_cases", "is_norm_module", "norm_module_names",
    "randomize_parameters", "randomize_norm_stats", "count_calls", "count_norm_calls",
    "FrozenBatchNorm2d", "BatchNormAct2d", "ShiftedBatchNorm2d", "Conv2dSame",
]

#: Families a case belongs to: the five fold kinds of the report, norm-layer variants, and traps.
FAMILIES = ("conv->bn", "conv_transpose->bn", "linear->bn", "bn->conv", "bn->linear", "norms", "trap")


@dataclass(frozen=True)
class Case:
    """One named model with its hand-worked expected fuse outcome (see the module docstring)."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    foldable: int
    left: int
    family: str
    description: str
    skips: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    rank_dependent: tuple[str, ...] = ()
    pairs: frozenset[tuple[str, str, str]] | None = None

    def make_input(self, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """A deterministic standard-normal input of ``input_shape``."""
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(self.input_shape, generator=generator, dtype=torch.float64)
        return x.to(dtype=dtype, device=device)


CASES: dict[str, Case] = {}


def get_case(name: str) -> Case:
    try:
        return CASES[name]
    except KeyError:
        raise KeyError(f"no case named {name!r}; known cases: {sorted(CASES)}") from None


def iter_cases(family: str | None = None) -> Iterator[Case]:
    """All cases in registration order, optionally only one family."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; families: {FAMILIES}")
    return (case for case in CASES.values() if family is None or case.family == family)


# ---------------------------------------------------------------------------------------------
# Norm-layer recognition, randomisation and counting

#: "Is this module a norm?" -- the adapter's one predicate (:func:`adapters.torch.norms.is_norm`), under the
#: name the case suite has always exported.
is_norm_module = is_norm


def norm_module_names(model: nn.Module) -> list[str]:
    """Qualified names of the norm-like modules in ``model`` (each module once)."""
    return [name for name, module in model.named_modules() if is_norm_module(module)]


def _uniform(shape: torch.Size | tuple[int, ...], low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def _fan_in(module: nn.Module, weight: torch.Tensor) -> int:
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        # ConvTranspose weights are [in, out/groups, *k]: each output sums over in/groups * prod(k) taps at most.
        return max(1, weight.shape[0] // module.groups * math.prod(weight.shape[2:]))
    return max(1, weight[0].numel())


@torch.no_grad()
def randomize_parameters(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Redraw every parameter of the non-norm modules from ``generator``, in place.

    Weights are uniform with unit variance per output (scale ``sqrt(3 / fan_in)``), biases
    uniform in [-0.5, 0.5], so activations stay of order one through the tiny models.
    """
    for module in model.modules():
        if is_norm_module(module):
            continue
        for name, param in module.named_parameters(recurse=False):
            if name == "weight" and param.dim() >= 2:
                bound = math.sqrt(3.0 / _fan_in(module, param))
            else:
                bound = 0.5
            param.copy_(_uniform(param.shape, -bound, bound, generator))
    return model


@torch.no_grad()
def randomize_norm_stats(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every norm-like module random statistics and affine parameters, in place.

    ``running_mean ~ N(0, 1) * 0.5``, ``running_var ~ U(0.5, 2)``, ``|weight| ~ U(0.5, 1.5)``
    with a negative sign one time in four (a fold that mishandles the sign of gamma must show),
    ``bias ~ N(0, 1) * 0.5``. Modules without running statistics keep their (absent) buffers.
    """
    for module in model.modules():
        if not is_norm_module(module):
            continue
        mean = getattr(module, "running_mean", None)
        var = getattr(module, "running_var", None)
        if mean is not None and var is not None:
            mean.copy_(0.5 * torch.randn(mean.shape, generator=generator, dtype=torch.float64))
            var.copy_(_uniform(var.shape, 0.5, 2.0, generator))
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            sign = torch.where(torch.rand(weight.shape, generator=generator, dtype=torch.float64) < 0.25, -1.0, 1.0)
            weight.copy_(sign * _uniform(weight.shape, 0.5, 1.5, generator))
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(0.5 * torch.randn(bias.shape, generator=generator, dtype=torch.float64))
    return model


def count_calls(model: nn.Module, *inputs: torch.Tensor,
                counted: Callable[[nn.Module], bool] = lambda module: True) -> int:
    """Forward calls of the modules ``counted`` selects (every module by default, the model itself too)
    during one ``model(*inputs)`` (no grad); a module called twice counts twice."""
    calls = 0

    def hook(module: nn.Module, args: tuple) -> None:
        nonlocal calls
        calls += bool(counted(module))

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        handle.remove()
    return calls


def count_norm_calls(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Number of forward calls of norm-like modules during one ``model(*inputs)`` (no grad)."""
    return count_calls(model, *inputs, counted=is_norm_module)


# ---------------------------------------------------------------------------------------------
# Norm layers defined here so that neither torchvision nor timm is needed

class FrozenBatchNorm2d(nn.Module):
    """Same buffers and forward as ``torchvision.ops.FrozenBatchNorm2d`` (not a ``_BatchNorm``)."""

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` in miniature: batch norm, then ``self.drop``, then ``self.act``.

    A fuser that folds the norm part must keep ``drop`` and ``act``; losing the activation
    changes the output completely, which the output comparison catches.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True, apply_act: bool = True,
                 act_layer: type[nn.Module] = nn.ReLU, drop_layer: type[nn.Module] | None = None) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer() if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.BatchNorm2d.forward(self, x)
        x = self.drop(x)
        return self.act(x)


class Conv2dSame(nn.Conv2d):
    """timm's ``Conv2dSame`` in miniature: zero-pad to TensorFlow's 'SAME' size at run time, then a
    plain conv (a BN after it folds; a BN before it meets the zero padding unless the kernel is 1x1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ph = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        x = nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ShiftedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d subclass whose ``forward`` does more than batch norm: a fuser cannot know it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0 + 0.25


# ---------------------------------------------------------------------------------------------
# Registration

def _register(name: str, input_shape: tuple[int, ...], *, foldable: int, left: int, family: str,
              skips: Mapping[str, tuple[str, ...]] | None = None, rank_dependent: tuple[str, ...] = (),
              pairs: tuple[tuple[str, str, str], ...] | None = None
              ) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Register a builder; its docstring is the case description (the hand-worked reasoning)."""
    if family not in FAMILIES:
        raise ValueError(f"case {name!r}: unknown family {family!r}; families: {FAMILIES}")

    def decorator(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        if name in CASES:
            raise ValueError(f"case {name!r} registered twice")
        seed = zlib.crc32(name.encode())

        def build() -> nn.Module:
            generator = torch.Generator().manual_seed(seed)
            # Module constructors draw their default init from the global RNG; every value is redrawn
            # below, so only the global RNG's state needs protecting from the side effect.
            with torch.random.fork_rng(devices=[]):
                model = make()
            randomize_parameters(model, generator)
            randomize_norm_stats(model, generator)
            return model.eval()

        build.__name__ = f"build_{name}"
        build.__doc__ = make.__doc__
        description = " ".join((make.__doc__ or "").split())
        CASES[name] = Case(name=name, build=build, input_shape=tuple(input_shape), foldable=foldable, left=left,
                           family=family, description=description, skips=dict(skips or {}),
                           rank_dependent=tuple(rank_dependent),
                           pairs=None if pairs is None else frozenset(pairs))
        return make

    return decorator


def _seq(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------
# Fold families: conv -> BN

@_register("conv1d_bn", (2, 3, 8), foldable=1, left=0, family="conv->bn",
           pairs=(("1", "0", "conv->bn"),))
def _conv1d_bn() -> nn.Module:
    """Conv1d (stride 2, reflect padding, bias) -> BatchNorm1d on (N, C, L): the conv's output
    channels are BN's channels whatever the padding, so the BN folds; nothing is left."""
    return _seq(nn.Conv1d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"), nn.BatchNorm1d(4))


_PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
_PADDING_MODES: tuple[_PaddingMode, ...] = ("zeros", "reflect", "replicate", "circular")

for _mode in _PADDING_MODES:
    def _make(mode: _PaddingMode = _mode) -> nn.Module:
        return _seq(nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode), nn.BatchNorm2d(4))
    _make.__doc__ = (f"Conv2d with padding_mode={_mode!r} -> BatchNorm2d: a BN after a conv folds whatever the conv "
                     f"pads with (padding happens before the products), so it folds; nothing is left.")
    _register(f"conv2d_bn_pad_{_mode}", (2, 3, 8, 8), foldable=1, left=0, family="conv->bn",
              pairs=(("1", "0", "conv->bn"),))(_make)


@_register("conv2d_nobias_same_bn", (2, 3, 8, 8), foldable=1, left=0, family="conv->bn",
           pairs=(("1", "0", "conv->bn"),))
def _conv2d_nobias_same_bn() -> nn.Module:
    """Conv2d without bias and padding='same' -> BatchNorm2d: folds; the fused conv gains a bias."""
    return _seq(nn.Conv2d(3, 4, 3, padding="same", bias=False), nn.BatchNorm2d(4))


@_register("conv2d_groups_stride_dilation_bn", (2, 4, 9, 9), foldable=1, left=0, family="conv->bn",
           pairs=(("1", "0", "conv->bn"),))
def _conv2d_groups_bn() -> nn.Module:
    """Conv2d (groups=2, stride 2, dilation 2) -> BatchNorm2d: groups do not change that weight
    row o produces channel o, so the BN folds; nothing is left."""
    return _seq(nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), nn.BatchNorm2d(6))


@_register("conv2d_depthwise_bn", (2, 4, 8, 8), foldable=1, left=0, family="conv->bn",
           pairs=(("1", "0", "conv->bn"),))
def _conv2d_depthwise_bn() -> nn.Module:
    """Depthwise Conv2d (groups = channels, no bias) -> BatchNorm2d -> ReLU: folds; nothing is left."""
    return _seq(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU())


@_register("conv_concat_bn", (2, 3, 8, 8), foldable=1, left=0, family="conv->bn",
           pairs=(("bn", "conv1", "conv->bn"), ("bn", "conv2", "conv->bn")))
def _conv_concat_bn() -> nn.Module:
    """bn(cat([conv1(x), conv2(x)], dim=1)) -> ReLU, as in MixNet's mixed convs: BN channels 0-3
    are conv1's output and 4-7 conv2's, and BN is per-channel, so each conv takes its slice of the
    fold; the BN is removed and nothing is left."""
    return _NormAfterMerge("cat")


@_register("conv3d_bn", (2, 2, 5, 6, 6), foldable=1, left=0, family="conv->bn",
           pairs=(("1", "0", "conv->bn"),))
def _conv3d_bn() -> nn.Module:
    """Conv3d (groups=2, stride (1, 2, 2), replicate padding, no bias) -> BatchNorm3d: folds."""
    return _seq(nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1, padding_mode="replicate", groups=2, bias=False),
                nn.BatchNorm3d(4))


@_register("conv_bn_bn", (2, 3, 8, 8), foldable=2, left=0, family="conv->bn",
           pairs=(("1", "0", "conv->bn"), ("2", "0", "conv->bn")))
def _conv_bn_bn() -> nn.Module:
    """Conv2d -> BatchNorm2d -> BatchNorm2d: the first BN folds into the conv, and the conv
    (now ending in a per-channel affine map) still feeds only the second, which folds too."""
    return _seq(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4))


@_register("conv_identity_bn", (2, 3, 8, 8), foldable=1, left=0, family="conv->bn",
           pairs=(("2", "0", "conv->bn"),))
def _conv_identity_bn() -> nn.Module:
    """Conv2d -> nn.Identity -> BatchNorm2d: Identity computes nothing, so the BN folds."""
    return _seq(nn.Conv2d(3, 4, 3), nn.Identity(), nn.BatchNorm2d(4))


# ---------------------------------------------------------------------------------------------
# Fold families: conv_transpose -> BN

@_register("conv_transpose1d_bn", (2, 3, 8), foldable=1, left=0, family="conv_transpose->bn",
           pairs=(("1", "0", "conv_transpose->bn"),))
def _conv_transpose1d_bn() -> nn.Module:
    """ConvTranspose1d (stride 2, output_padding 1) -> BatchNorm1d: the transposed weight is
    [in, out/groups, k]; the BN scales its output-channel axis (dim 1); folds."""
    return _seq(nn.ConvTranspose1d(3, 4, 3, stride=2, output_padding=1), nn.BatchNorm1d(4))


@_register("conv_transpose2d_groups_bn", (2, 4, 5, 5), foldable=1, left=0, family="conv_transpose->bn",
           pairs=(("1", "0", "conv_transpose->bn"),))
def _conv_transpose2d_groups_bn() -> nn.Module:
    """ConvTranspose2d (groups=2, stride 2, padding 1, output_padding 1) -> BatchNorm2d: with
    groups the output channel of weight[i, j] is (i // (in/groups)) * (out/groups) + j, which a
    fuser ignoring groups gets wrong (torch.nn.utils.fusion does); folds."""
    return _seq(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), nn.BatchNorm2d(6))


@_register("conv_transpose2d_dilation_bn", (2, 3, 5, 5), foldable=1, left=0, family="conv_transpose->bn",
           pairs=(("1", "0", "conv_transpose->bn"),))
def _conv_transpose2d_dilation_bn() -> nn.Module:
    """ConvTranspose2d (dilation 2, no bias) -> BatchNorm2d: folds; the fused layer gains a bias."""
    return _seq(nn.ConvTranspose2d(3, 4, 3, dilation=2, bias=False), nn.BatchNorm2d(4))


@_register("conv_transpose3d_groups_bn", (2, 4, 3, 3, 3), foldable=1, left=0, family="conv_transpose->bn",
           pairs=(("1", "0", "conv_transpose->bn"),))
def _conv_transpose3d_groups_bn() -> nn.Module:
    """ConvTranspose3d (groups=2, stride 2, no bias) -> BatchNorm3d: folds."""
    return _seq(nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2, bias=False), nn.BatchNorm3d(6))


# ---------------------------------------------------------------------------------------------
# Fold families: linear -> BN1d, BN -> conv, BN -> linear

@_register("linear_bn1d_2d_input", (4, 5), foldable=1, left=0, family="linear->bn",
           rank_dependent=("1",),
           pairs=(("1", "0", "linear->bn"),))
def _linear_bn1d() -> nn.Module:
    """Linear -> BatchNorm1d on a 2-D (N, C) model input: BN's channel axis is the linear's
    output features, so it folds -- but only the example input proves the rank."""
    return _seq(nn.Linear(5, 6), nn.BatchNorm1d(6))


@_register("flatten_linear_bn1d", (2, 3, 8, 8), foldable=1, left=0, family="linear->bn",
           rank_dependent=("5",),
           pairs=(("5", "4", "linear->bn"),))
def _flatten_linear_bn1d() -> nn.Module:
    """Conv2d -> ReLU -> pool -> Flatten -> Linear -> BatchNorm1d: the conv has no BN (ReLU
    follows); the Linear gets a 2-D input from Flatten, so Linear -> BN1d folds."""
    return _seq(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 6),
                nn.BatchNorm1d(6))


@_register("bn_conv2d_valid", (2, 3, 8, 8), foldable=1, left=0, family="bn->conv",
           pairs=(("0", "1", "bn->conv"),))
def _bn_conv2d_valid() -> nn.Module:
    """BatchNorm2d -> Conv2d without padding: every input the conv reads is a BN output, so the
    BN folds into the conv (W' = W s per input channel, b' = b + sum W t); nothing is left."""
    return _seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3))


for _mode in _PADDING_MODES[1:]:
    def _make(mode: _PaddingMode = _mode) -> nn.Module:
        return _seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode))
    _make.__doc__ = (f"BatchNorm2d -> Conv2d with padding 1, padding_mode={_mode!r}: the padding copies BN outputs, "
                     f"so every position the conv reads is a BN output and the fold is exact; nothing is left.")
    _register(f"bn_conv2d_pad_{_mode}", (2, 3, 8, 8), foldable=1, left=0, family="bn->conv",
              pairs=(("0", "1", "bn->conv"),))(_make)


@_register("bn_conv2d_groups_stride", (2, 4, 9, 9), foldable=1, left=0, family="bn->conv",
           pairs=(("0", "1", "bn->conv"),))
def _bn_conv2d_groups() -> nn.Module:
    """BatchNorm2d -> Conv2d (groups=2, stride 2, no padding, no bias): input channel c feeds
    group c // (in/groups); folds; the conv gains a bias."""
    return _seq(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False))


@_register("bn_conv1d_circular", (2, 3, 8), foldable=1, left=0, family="bn->conv",
           pairs=(("0", "1", "bn->conv"),))
def _bn_conv1d_circular() -> nn.Module:
    """BatchNorm1d -> Conv1d with circular padding: exact, folds."""
    return _seq(nn.BatchNorm1d(3), nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular"))


@_register("bn_conv3d_replicate", (2, 2, 4, 5, 5), foldable=1, left=0, family="bn->conv",
           pairs=(("0", "1", "bn->conv"),))
def _bn_conv3d_replicate() -> nn.Module:
    """BatchNorm3d -> Conv3d with replicate padding: exact, folds."""
    return _seq(nn.BatchNorm3d(2), nn.Conv3d(2, 3, 3, padding=1, padding_mode="replicate"))


@_register("bn_conv2d_zero_padding", (2, 3, 8, 8), foldable=0, left=1, family="bn->conv",
           skips={"0": ("zero_padding",)})
def _bn_conv2d_zero_padding() -> nn.Module:
    """BatchNorm2d -> Conv2d with zero padding 1: the zeros are inserted after the BN, where a
    folded conv would see the BN shift t instead -- wrong at the borders. Not folded: the
    BN runs once ("zero_padding")."""
    return _seq(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1))


@_register("bn_linear_2d_input", (4, 5), foldable=1, left=0, family="bn->linear", rank_dependent=("0",),
           pairs=(("0", "1", "bn->linear"),))
def _bn_linear() -> nn.Module:
    """BatchNorm1d -> Linear on a 2-D (N, C) model input: folds into the linear (proven 2-D only
    by the example input)."""
    return _seq(nn.BatchNorm1d(5), nn.Linear(5, 3))


class _ReidHead(nn.Module):
    """Re-identification model: backbone -> global pool -> flatten -> BN1d 'bottleneck' -> Dropout -> classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = _seq(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.bottleneck = nn.BatchNorm1d(8)
        self.dropout = nn.Dropout(0.5)
        self.classifier = nn.Linear(8, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.flatten(self.pool(self.backbone(x)), 1)
        return self.classifier(self.dropout(self.bottleneck(features)))


@_register("reid_bn_dropout_linear", (2, 3, 8, 8), foldable=2, left=0, family="bn->linear",
           rank_dependent=("bottleneck",),
           pairs=(("backbone.1", "backbone.0", "conv->bn"), ("bottleneck", "classifier", "bn->linear")))
def _reid_head() -> nn.Module:
    """Conv -> BN -> ReLU -> pool -> flatten -> BN1d -> Dropout -> Linear: backbone.1 folds into
    backbone.0; the bottleneck BN1d folds into the classifier through the Dropout (the identity
    in eval mode) on the 2-D flattened features. Nothing is left."""
    return _ReidHead()


@_register("flatten_bn1d_linear", (2, 3, 8, 8), foldable=1, left=0, family="bn->linear", rank_dependent=("4",),
           pairs=(("4", "5", "bn->linear"),))
def _flatten_bn1d_linear() -> nn.Module:
    """Conv2d -> ReLU -> pool -> Flatten -> BatchNorm1d -> Linear: the conv has no BN; the BN1d
    sees 2-D features and folds into the Linear."""
    return _seq(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.BatchNorm1d(8),
                nn.Linear(8, 3))


# ---------------------------------------------------------------------------------------------
# Norm-layer variants

@_register("bn_affine_false", (2, 3, 8, 8), foldable=1, left=0, family="norms",
           pairs=(("1", "0", "conv->bn"),))
def _bn_affine_false() -> nn.Module:
    """Conv2d -> BatchNorm2d(affine=False): gamma = 1, beta = 0, running stats still apply; folds."""
    return _seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False))


@_register("frozen_bn", (2, 3, 8, 8), foldable=1, left=0, family="norms",
           pairs=(("1", "0", "conv->bn"),))
def _frozen_bn() -> nn.Module:
    """Conv2d (no bias) -> FrozenBatchNorm2d (torchvision's buffers, not a _BatchNorm) -> ReLU:
    recognised by its buffers and folded; nothing is left."""
    return _seq(nn.Conv2d(3, 4, 3, bias=False), FrozenBatchNorm2d(4), nn.ReLU())


@_register("batchnorm_act", (2, 3, 8, 8), foldable=1, left=0, family="norms",
           pairs=(("1", "0", "conv->bn"),))
def _batchnorm_act() -> nn.Module:
    """Conv2d -> BatchNormAct2d (timm-style: BN, drop, ReLU): the BN part folds into the conv,
    the module is replaced by one keeping drop and act, so the ReLU still runs; no BN is left."""
    return _seq(nn.Conv2d(3, 4, 3, padding=1, bias=False), BatchNormAct2d(4, act_layer=nn.ReLU),
                nn.Conv2d(4, 2, 1))


@_register("sync_bn_eval", (2, 3, 8, 8), foldable=1, left=0, family="norms",
           pairs=(("1", "0", "conv->bn"),))
def _sync_bn() -> nn.Module:
    """Conv2d -> SyncBatchNorm in eval mode: eval semantics are plain BN with running stats; folds."""
    return _seq(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))


@_register("bn_no_running_stats", (2, 3, 8, 8), foldable=0, left=1, family="norms",
           skips={"1": ("no_running_stats",)})
def _bn_no_running_stats() -> nn.Module:
    """Conv2d -> BatchNorm2d(track_running_stats=False): uses batch statistics even in eval, so
    it is not a fixed affine map and must not fold; it runs once."""
    return _seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))


# ---------------------------------------------------------------------------------------------
# Traps

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


class _NormAfterMerge(nn.Module):
    def __init__(self, merge: str) -> None:
        super().__init__()
        self.merge = merge
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d({"cat": 8, "cat_input": 7, "add": 4}[merge])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x)
        if self.merge == "cat":
            merged = torch.cat([a, self.conv2(x)], dim=1)
        elif self.merge == "cat_input":
            merged = torch.cat([a, x], dim=1)
        else:
            merged = a + self.conv2(x)
        return torch.relu(self.bn(merged))


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


del _mode, _make
from . import realcode_cases  # noqa: E402, F401  (registers the cases written from real model code)

"""Real networks with random weights and randomised BatchNorm statistics, for tests and benchmarks.

Each entry of :data:`ZOO` builds one torchvision or timm architecture without downloading anything
(``weights=None`` / ``pretrained=False``) and records, worked out by hand from the architecture's
source, how many norm layers it has and how many norm evaluations a dataflow-correct fuser must
leave in place (those with no convolution or linear layer it can be folded into exactly). The
derivations are written next to each entry.

torchvision and timm are imported only when an entry is built, so this module imports without
them; building an entry whose library is missing raises an ``ImportError`` naming the ``zoo``
extra.

Statistics. Random weights with the default ``running_mean = 0, running_var = 1`` make every
BatchNorm a near-identity and let activations drift by orders of magnitude through fifty layers,
which says nothing about folding real checkpoints and overflows fp16. So each built model is first
given seeded random affine parameters and then *calibrated*: one forward pass in training mode
with ``momentum = 1`` sets the running statistics to the statistics of a random batch, so every
channel has its own mean and scale (no fold is a near no-op) and every layer sees roughly the
input its statistics describe, as in a trained network. The result is deterministic for a given
seed.

>>> sorted(ZOO)[:2]
['timm/efficientnet_b0', 'timm/mixnet_s']
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType

import torch
from torch import nn

from ..norms import is_norm

__all__ = ["ZooEntry", "ZOO", "build", "example_input", "randomize_calibrated_norm_stats"]

log = logging.getLogger(__name__)

#: Default input shape (C, H, W): large enough that every entry's deepest stage still has a 2x2
#: feature map (all entries downsample by 32), small enough to keep a float64 reference run cheap.
SMALL_INPUT = (3, 64, 64)

#: Batch used for calibration: with a 2x2 deepest feature map it gives 32 samples per channel.
_CALIBRATION_BATCH = 8


def _require(library: str) -> ModuleType:
    try:
        return importlib.import_module(library)
    except ImportError as error:
        raise ImportError(
            f"the model zoo needs {library!r}, which is not installed: install the 'zoo' extra "
            f"(pip install 'bnfold[zoo]')") from error


def _norms(model: nn.Module) -> tuple[list[nn.modules.batchnorm._BatchNorm], list[nn.Module]]:
    """The model's norms (the adapter's one predicate, :func:`adapters.torch.norms.is_norm`), split into
    those a training-mode pass calibrates (``_BatchNorm``: BatchNorm1d/2d/3d, SyncBatchNorm, timm's
    BatchNormAct2d) and the rest (FrozenBatchNorm2d: buffers only, no training mode)."""
    trainable: list[nn.modules.batchnorm._BatchNorm] = []
    frozen: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            trainable.append(module)
        elif is_norm(module):
            frozen.append(module)
    return trainable, frozen


@torch.no_grad()
def randomize_calibrated_norm_stats(model: nn.Module, input_shape: tuple[int, ...], generator: torch.Generator
                                    ) -> nn.Module:
    """Randomise every norm's affine parameters, then calibrate its running statistics on a random batch.

    Parameters
    ----------
    model : nn.Module
        Any network. Its BatchNorm layers (``_BatchNorm`` subclasses) and FrozenBatchNorm2d-like
        layers (recognised by their buffers) get random affine parameters; the BatchNorm layers are
        calibrated (FrozenBatchNorm2d has no training mode: see :meth:`ZooEntry.build`).
    input_shape : tuple of int
        Shape of one sample, ``(C, H, W)``.
    generator : torch.Generator
        Source of every random number drawn here (a CPU generator).

    Returns
    -------
    nn.Module
        ``model`` itself, in eval mode.

    Notes
    -----
    The affine parameters are drawn per channel, ``weight ~ U(0.5, 1.5)`` with a random sign on one
    channel in ten (trained networks have negative scales too) and ``bias ~ N(0, 0.25)``; the
    running statistics are then the statistics of the calibration batch, so they are random (they
    come from random weights and a random batch), differ per channel, and match what each layer
    actually sees. They are deliberately not perturbed afterwards: a layer whose statistics do not
    match its input passes a mis-scaled output on to the next, and through fifty layers with
    squeeze-excitation gates such mismatches compound to 1e4-fold growth (measured on
    EfficientNet-B0), which would overflow fp16 and make the network's own rounding error huge.
    Variances are floored at 1% of the layer's mean variance, so a channel that happened to be dead
    on the calibration batch does not get a near-zero variance whose fold would scale its weights
    by ``1/sqrt(eps)``.
    """
    norms, frozen = _norms(model)
    # The affine parameters are drawn first so that calibration sees them: architectures that
    # initialise them specially (timm zero-inits the last gamma of each residual block, RepVGG draws
    # gamma ~ N(0.1, 0.1)) would otherwise be calibrated for a scale they no longer have.
    for m in [*norms, *frozen]:
        weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
        if weight is not None:
            width = weight.numel()
            scale = torch.empty(width, dtype=weight.dtype).uniform_(0.5, 1.5, generator=generator)
            flip = torch.rand(width, generator=generator) < 0.1
            weight.copy_(torch.where(flip, -scale, scale))
        if bias is not None:
            bias.copy_(0.25 * torch.randn(bias.numel(), generator=generator, dtype=bias.dtype))

    saved = [(m, m.momentum) for m in norms]
    sample = torch.randn((_CALIBRATION_BATCH, *input_shape), generator=generator)
    try:
        model.eval()
        for m in norms:
            if m.track_running_stats:
                m.reset_running_stats()
                # momentum 1: the running statistics become exactly this batch's statistics.
                m.momentum = 1.0
                m.train()
        model(sample)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.eval()

    for m in [*norms, *frozen]:
        var = getattr(m, "running_var", None)
        if var is not None:
            layer_mean = float(var.mean())
            var.clamp_(min=0.01 * layer_mean if layer_mean > 0 else 1.0)
    return model


@dataclass(frozen=True)
class ZooEntry:
    """One architecture of the zoo and what a dataflow-correct fuser must do with it.

    Attributes
    ----------
    name : str
        ``"<library>/<architecture>"``, e.g. ``"torchvision/resnet50"``.
    library : str
        ``"torchvision"`` or ``"timm"`` (the import an entry needs).
    norm_layers : int
        Norm modules in the network; each runs exactly once per forward pass.
    unfoldable : int
        Norm evaluations that cannot be folded: what is left after a correct fuse.
    skip_reasons : Mapping[str, int]
        The adapter's reason code for each unfoldable norm, counted (sums to ``unfoldable``).
    input_shape : tuple of int
        A small ``(C, H, W)`` sample shape the network accepts.
    """

    name: str
    library: str
    norm_layers: int
    unfoldable: int
    skip_reasons: Mapping[str, int]
    input_shape: tuple[int, int, int]
    _factory: Callable[..., nn.Module] = field(repr=False)  # factory(frozen: bool = True)

    def __post_init__(self) -> None:
        if sum(self.skip_reasons.values()) != self.unfoldable:
            raise ValueError(f"{self.name}: skip_reasons {dict(self.skip_reasons)} do not add up to "
                             f"unfoldable={self.unfoldable}")

    @property
    def foldable(self) -> int:
        return self.norm_layers - self.unfoldable

    def build(self, seed: int = 0) -> nn.Module:
        """The network with seeded random weights and randomised, calibrated norm statistics, in eval mode."""
        _require(self.library)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self._factory()
        generator = torch.Generator().manual_seed(seed)
        trainable, frozen = _norms(model)
        if frozen and not trainable:
            # FrozenBatchNorm2d has no training mode to calibrate: calibrate the same network built
            # with BatchNorm2d and copy its state (FrozenBatchNorm2d drops num_batches_tracked on load).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                twin = self._factory(frozen=False)
            randomize_calibrated_norm_stats(twin, self.input_shape, generator)
            model.load_state_dict(twin.state_dict())
        else:
            randomize_calibrated_norm_stats(model, self.input_shape, generator)
        log.debug("built %s (seed %d)", self.name, seed)
        return model.eval()

    def example_input(self, batch: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A seeded standard-normal batch of ``input_shape`` samples."""
        generator = torch.Generator().manual_seed(seed + 1)
        return torch.randn((batch, *self.input_shape), generator=generator).to(dtype)


# --------------------------------------------------------------------------------------------------
# Factories. Each takes no download path: torchvision's weights=None, timm's pretrained=False.


def _torchvision(arch: str, **kwargs) -> Callable[..., nn.Module]:
    def factory(frozen: bool = True) -> nn.Module:
        models = _require("torchvision").models
        return getattr(models, arch)(weights=None, **kwargs)
    return factory


def _torchvision_frozen_resnet(arch: str) -> Callable[..., nn.Module]:
    def factory(frozen: bool = True) -> nn.Module:
        torchvision = _require("torchvision")
        norm_layer = torchvision.ops.misc.FrozenBatchNorm2d if frozen else nn.BatchNorm2d
        return getattr(torchvision.models, arch)(weights=None, norm_layer=norm_layer)
    return factory


def _timm(arch: str) -> Callable[..., nn.Module]:
    def factory(frozen: bool = True) -> nn.Module:
        return _require("timm").create_model(arch, pretrained=False)
    return factory


def _entry(name: str, norm_layers: int, unfoldable: int, factory: Callable[..., nn.Module],
           skip_reasons: Mapping[str, int] | None = None, input_shape: tuple[int, int, int] = SMALL_INPUT
           ) -> ZooEntry:
    return ZooEntry(name=name, library=name.split("/")[0], norm_layers=norm_layers, unfoldable=unfoldable,
                    skip_reasons=MappingProxyType(dict(skip_reasons or {})), input_shape=input_shape,
                    _factory=factory)


_ENTRIES = [
    # torchvision ResNet (models/resnet.py). Every norm directly follows a conv: BasicBlock and
    # Bottleneck run conv_i -> bn_i (-> relu), the shortcut is Sequential(conv1x1, norm), and the
    # stem is conv1 -> bn1 -> relu -> maxpool.
    #   resnet18 = BasicBlock x (2,2,2,2): 1 stem + 8 blocks x 2 + 3 downsamples (layers 2-4) = 20.
    #   resnet50 = Bottleneck x (3,4,6,3): 1 stem + 16 blocks x 3 + 4 downsamples (layer1 widens
    #   64 -> 256, layers 2-4 stride 2) = 53. Nothing is left.
    _entry("torchvision/resnet18", 20, 0, _torchvision("resnet18")),
    _entry("torchvision/resnet50", 53, 0, _torchvision("resnet50")),
    # The same resnet50 with norm_layer=FrozenBatchNorm2d (as detection backbones are built): the
    # topology is unchanged, so 53 norms, all foldable.
    _entry("torchvision/resnet50_frozenbn", 53, 0, _torchvision_frozen_resnet("resnet50")),
    # torchvision MobileNetV3-Large (models/mobilenetv3.py). Norms live only in
    # Conv2dNormActivation = conv -> bn (-> act); SqueezeExcitation and the classifier have none.
    # Stem 1; 15 InvertedResidual blocks: the first has expanded == input channels (16), so no
    # expand conv (depthwise + project = 2), the other 14 have 3; last 1x1 conv 1.
    # 1 + 2 + 14 x 3 + 1 = 46, all directly after their conv.
    _entry("torchvision/mobilenet_v3_large", 46, 0, _torchvision("mobilenet_v3_large")),
    # torchvision EfficientNet-B0 (models/efficientnet.py). MBConv = [expand] -> depthwise -> SE ->
    # project, each a Conv2dNormActivation; StochasticDepth and the residual add come after the
    # project norm. Stage depths (1,2,2,3,3,4,1) = 16 blocks; the first has expand ratio 1 (no expand
    # conv: 2 norms), the other 15 have 3. Stem 1 + 2 + 45 + head 1 = 49, all after their conv.
    _entry("torchvision/efficientnet_b0", 49, 0, _torchvision("efficientnet_b0")),
    # torchvision RegNetY-800MF (models/regnet.py): depth 14, w_0 56, w_a 38.84, w_m 2.4. The widths
    # w_0 * w_m ** round(log((w_0 + i w_a) / w_0) / log w_m), quantised to multiples of 8, are
    # 56 | 136 x3 | 320 x8 | 776 x2, i.e. stage depths (1, 3, 8, 2). ResBottleneckBlock =
    # f: a (1x1 conv-bn-act) -> b (3x3 group conv-bn-act) -> SE -> c (1x1 conv-bn), plus
    # proj (1x1 conv-bn) on each stage's first block (stride 2). Stem 1 + 14 x 3 + 4 = 47, all
    # directly after their conv (the add comes after c's and proj's norms).
    _entry("torchvision/regnet_y_800mf", 47, 0, _torchvision("regnet_y_800mf")),
    # torchvision DenseNet-121 (models/densenet.py), blocks (6, 12, 24, 16) = 58 dense layers.
    #   norm0 follows conv0: foldable.
    #   _DenseLayer: conv1(relu1(norm1(cat(features)))) then conv2(relu2(norm2(.))). norm1's input is
    #   a torch.cat of earlier outputs and its output goes to a ReLU: nothing to fold into (58).
    #   norm2 directly follows conv1: foldable (58).
    #   _Transition: norm -> relu -> conv -> pool on the block's cat output: not foldable (3).
    #   norm5 on the last block's cat, followed by F.relu in DenseNet.forward: not foldable (1).
    # 1 + 58 x 2 + 3 + 1 = 121 norms; 58 + 3 + 1 = 62 left, each with no foldable neighbour.
    _entry("torchvision/densenet121", 121, 62, _torchvision("densenet121"), {"no_fusable_neighbour": 62}),
    # torchvision ShuffleNetV2 x1.0 (models/shufflenetv2.py), stage repeats (4, 8, 4). conv1 and conv5
    # are conv -> bn -> relu. InvertedResidual branch2 = 1x1 conv-bn-relu -> 3x3 dw conv-bn -> 1x1
    # conv-bn-relu (3 norms); the stride-2 first block of each stage adds branch1 = dw conv-bn ->
    # 1x1 conv-bn-relu (2). channel_shuffle/chunk/cat sit between blocks, never between a conv and
    # its norm. 2 + 3 x 5 + 13 x 3 = 56, all foldable.
    _entry("torchvision/shufflenet_v2_x1_0", 56, 0, _torchvision("shufflenet_v2_x1_0")),
    # timm EfficientNet-B0 (models/efficientnet.py, _efficientnet_blocks.py). Norms are
    # BatchNormAct2d (bn + drop + act in one module). Arch: ds_r1 | ir_r2 | ir_r2 | ir_r3 | ir_r3 |
    # ir_r4 | ir_r1. DepthwiseSeparableConv: conv_dw -> bn1 -> aa -> se -> conv_pw -> bn2 (2);
    # InvertedResidual: conv_pw -> bn1 -> conv_dw -> bn2 -> aa -> se -> conv_pwl -> bn3 (3 each, 15
    # blocks); stem conv_stem -> bn1; head conv_head -> bn2. 1 + 2 + 45 + 1 = 49, all foldable (each
    # BatchNormAct2d folds its BN part into the conv and keeps its act).
    _entry("timm/efficientnet_b0", 49, 0, _timm("efficientnet_b0")),
    # timm TF-EfficientNet-B0: the same blocks as efficientnet_b0 (49 norms), built with TensorFlow
    # 'SAME' padding: the strided convs are Conv2dSame (zero-pad at run time, then a plain conv),
    # which a BN after them folds into exactly. 49, all foldable.
    _entry("timm/tf_efficientnet_b0", 49, 0, _timm("tf_efficientnet_b0")),
    # timm ResNet-50-D (models/resnet.py): deep stem conv1 = Sequential(conv, bn, act, conv, bn, act,
    # conv) followed by the top-level bn1 (a pair split across the Sequential boundary); Bottleneck
    # conv1 -> bn1 -> act1 -> conv2 -> bn2 -> drop_block -> act2 -> aa -> conv3 -> bn3, 16 blocks;
    # avg_down shortcut = Sequential(pool, conv1x1, bn) on each stage's first block (4).
    # 2 + 1 + 48 + 4 = 55, all foldable.
    _entry("timm/resnet50d", 55, 0, _timm("resnet50d")),
    # timm RepVGG-A0 (models/byobnet.py), the smallest RepVGG: stem = RepVggBlock(3 -> 48, stride 2),
    # stages of depth (2, 4, 14, 1). RepVggBlock (not re-parameterised) = conv_kxk (conv -> bn) +
    # conv_1x1 (conv -> bn), plus identity = BatchNormAct2d(apply_act=False) when in == out and
    # stride 1, added to the sum. The identity norm reads the block input (the previous block's
    # activation output, which the two convs also read) and feeds an add: nothing to fold into.
    # Each stage's first block has stride 2, so identity norms = 1 + 3 + 13 + 0 = 17.
    # Norms: 22 blocks x 2 + 17 = 61 (no final conv: num_features is unset); 17 left.
    _entry("timm/repvgg_a0", 61, 17, _timm("repvgg_a0"), {"no_fusable_neighbour": 17}),
    # timm MobileNetV3-Large-100 (models/mobilenetv3.py): ds_r1 | ir_r1 ir_r1 | ir_r3 | ir_r1 ir_r1
    # ir_r2 | ir_r2 | ir_r3 | cn_r1, so 1 DepthwiseSeparableConv (2 norms), 14 InvertedResidual (3)
    # and one ConvBnAct (conv -> bn1); stem conv_stem -> bn1. The head (pool -> conv_head -> act2)
    # has no norm (head_norm=False). 1 + 2 + 42 + 1 = 46, all foldable.
    _entry("timm/mobilenetv3_large_100", 46, 0, _timm("mobilenetv3_large_100")),
    # timm MixNet-S (models/efficientnet.py _gen_mixnet_s, _efficientnet_blocks.py). Arch: ds_r1 |
    # ir_r1 ir_r1 | ir_r1 ir_r3 | ir_r1 ir_r2 | ir_r1 ir_r2 | ir_r1 ir_r2, so 1 DepthwiseSeparableConv
    # (conv_dw -> bn1, conv_pw -> bn2) and 15 InvertedResidual (conv_pw -> bn1 -> conv_dw -> bn2 ->
    # se -> conv_pwl -> bn3); stem conv_stem -> bn1, head conv_head -> bn2: 1 + 2 + 45 + 1 = 49.
    # A kernel list (k3.5.7, a1.1, p1.1) makes the conv a MixedConv2d: split -> one conv per kernel
    # -> torch.cat(dim=1), whose norm folds slice by slice into those convs. MixedConv2d norms:
    # stage 1: 2 x (a, p) = 4; stage 2: k + 3 x (k, a, p) = 10; stage 3: (k, p) + 2 x (k, p) = 6;
    # stage 4: 3 x (k, a, p) = 9; stage 5: k + 2 x (k, p) = 5, i.e. 34; the other 15 follow a plain
    # conv. 49, all foldable.
    _entry("timm/mixnet_s", 49, 0, _timm("mixnet_s")),
]

#: Every zoo entry by name.
ZOO: Mapping[str, ZooEntry] = MappingProxyType({entry.name: entry for entry in _ENTRIES})


def _lookup(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; known: {sorted(ZOO)}") from None


def build(name: str, seed: int = 0) -> nn.Module:
    """Build zoo entry ``name`` (see :data:`ZOO`) with seeded random weights and statistics, in eval mode."""
    return _lookup(name).build(seed)


def example_input(name: str, batch: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A seeded random input batch of the shape zoo entry ``name`` is checked with."""
    return _lookup(name).example_input(batch, seed, dtype)

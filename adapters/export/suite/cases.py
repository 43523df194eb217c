"""The export case suite: small models, each exported and handed to a folder, with a hand-worked count of the
BatchNorm nodes a correct folder must leave.

Each case builds a fresh, seeded model (so that a folder that writes into the weights it is given
cannot touch the reference) and its inputs. The traps are the ones graph-level folders fall into:
a ConvTranspose with equal in/out channels (its weight is ``[in, out, *k]``: scaling axis 0 is
wrong and goes unnoticed by shape checks), conv -> BN -> BN, a train-mode export, a conv called
twice with two norms (fused-weight names collide, or the shared weight is overwritten), a conv
output with a second user, Linear -> BatchNorm1d on a 3-D input, fp16 folds that overflow, a
weight shared by two convs, statistics passed in as user inputs, a mutated running mean, and
BN -> conv where it is (no padding) and is not (zero padding, transposed) exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ExportCase", "CASES", "randomize_norms"]


@dataclass(frozen=True)
class ExportCase:
    """``build()`` returns a fresh model and its example inputs; ``norms_left`` is what a correct folder leaves."""

    name: str
    family: str
    build: Callable[[], tuple[nn.Module, tuple]]
    norms_left: int
    why: str = ""
    #: folds BatchNorm1d <-> Linear exact only on 2-D inputs, which a graph without shapes (``fx``) cannot prove
    rank_dependent: int = 0
    #: IRs the case is not given in (a torch-level graph runs its modules in the mode verify sets)
    not_in: tuple[str, ...] = ()


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (identity norms hide wrong folds)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                shape = (module.num_features,)
                if module.running_mean is not None and module.running_var is not None:
                    module.running_mean.copy_(torch.rand(shape, generator=generator) * 2 - 1)
                    module.running_var.copy_(torch.rand(shape, generator=generator) * 1.5 + 0.25)
                if module.affine:
                    module.weight.copy_(torch.rand(shape, generator=generator) * 1.5 + 0.25)
                    module.bias.copy_(torch.rand(shape, generator=generator) * 2 - 1)
    return model


def _seeded(make: Callable[[], nn.Module], *shapes: tuple[int, ...], train: bool = False,
            dtype: torch.dtype = torch.float32) -> Callable[[], tuple[nn.Module, tuple]]:
    def build() -> tuple[nn.Module, tuple]:
        torch.manual_seed(0)
        model = randomize_norms(make())
        model.train(train)
        generator = torch.Generator().manual_seed(1)
        inputs = tuple(torch.randn(shape, generator=generator) for shape in shapes)
        if dtype != torch.float32:
            model = model.to(dtype)
            inputs = tuple(x.to(dtype) for x in inputs)
        return model, inputs
    return build


class _CalledTwice(nn.Module):
    """One conv applied to two inputs, each result with its own BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn_a = nn.BatchNorm2d(6)
        self.bn_b = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x * 2))


class _SharedWeight(nn.Module):
    """Two conv modules holding one weight Parameter, with different BatchNorms and strides."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 6, 3)
        self.conv_b = nn.Conv2d(3, 6, 3, stride=2)
        self.conv_b.weight = self.conv_a.weight
        self.bn_a = nn.BatchNorm2d(6)
        self.bn_b = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn_a(self.conv_a(x)).mean((2, 3)) + self.bn_b(self.conv_b(x)).mean((2, 3))


class _SecondUser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y.relu()


class _StatsAsInputs(nn.Module):
    """The BatchNorm's statistics are arguments of the program, not its buffers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)

    def forward(self, x, mean, var):
        return nn.functional.batch_norm(self.conv(x), mean, var.abs() + 0.5, training=False)


class _MutatedStats(nn.Module):
    """The forward writes into the BatchNorm's running mean (a mutated buffer) before using it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        self.bn.running_mean.mul_(1.0)  # type: ignore[union-attr]
        return self.bn(self.conv(x))


class _Linear3d(nn.Module):
    """Linear over the last axis of (N, C, L), then BatchNorm1d over C: the norm's channels are not the features."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(10, 12)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.linear(x))


class _Concat(nn.Module):
    """Two convs of one input concatenated along the channels, then one BatchNorm: each conv folds its slice."""

    def __init__(self, second_user: bool = False):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(12)
        self.second_user = second_user

    def forward(self, x):
        a = self.a(x)
        y = self.bn(torch.cat([a, self.b(x)], dim=1))
        return y + a.mean() if self.second_user else y


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.down, self.bn3 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
        return (y + self.bn3(self.down(x))).relu()


def _overflowing() -> tuple[nn.Module, tuple]:
    """fp16 conv -> BN whose unfused output is finite but whose folded weight is not: ``|W| ~ 1000``, ``s ~ 100``
    (``W * s`` beyond fp16's 65504) on inputs of size 1e-3."""
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    model = nn.Sequential(conv, norm).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.rand(conv.weight.shape) * 1000 + 500)
        norm.running_mean.fill_(20.0)  # type: ignore[union-attr]
        norm.running_var.fill_(1.0)  # type: ignore[union-attr]
        norm.weight.fill_(100.0)
    x = torch.rand((2, 3, 9, 9), generator=torch.Generator().manual_seed(1)) * 1e-3
    return model.half(), (x.half(),)


CASES: tuple[ExportCase, ...] = (
    ExportCase("conv2d_bn", "conv->bn", _seeded(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8),
                                                                      nn.ReLU()), (2, 3, 9, 9)), 0),
    ExportCase("conv1d_bn", "conv->bn", _seeded(lambda: nn.Sequential(nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8)),
                                                (2, 3, 12)), 0),
    ExportCase("conv3d_bn", "conv->bn", _seeded(lambda: nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4)),
                                                (1, 2, 6, 6, 6)), 0),
    ExportCase("conv_nobias_bn", "conv->bn", _seeded(lambda: nn.Sequential(nn.Conv2d(3, 8, 3, bias=False),
                                                                           nn.BatchNorm2d(8)), (2, 3, 9, 9)), 0),
    ExportCase("depthwise_bn", "conv->bn", _seeded(lambda: nn.Sequential(nn.Conv2d(8, 8, 3, groups=8),
                                                                         nn.BatchNorm2d(8)), (2, 8, 9, 9)), 0),
    ExportCase("bn_affine_false", "conv->bn", _seeded(lambda: nn.Sequential(nn.Conv2d(3, 8, 3),
                                                                            nn.BatchNorm2d(8, affine=False)),
                                                      (2, 3, 9, 9)), 0),
    ExportCase("residual_block", "conv->bn", _seeded(_Residual, (2, 8, 9, 9)), 0),
    ExportCase("conv_transpose_equal_channels", "conv_transpose->bn",
               _seeded(lambda: nn.Sequential(nn.ConvTranspose2d(8, 8, 3, stride=2), nn.BatchNorm2d(8)), (2, 8, 5, 5)),
               0, "weight [in, out, k, k] with in == out: a fold along axis 0 passes every shape check"),
    ExportCase("conv_transpose_groups", "conv_transpose->bn",
               _seeded(lambda: nn.Sequential(nn.ConvTranspose2d(8, 12, 3, groups=4), nn.BatchNorm2d(12)),
                       (2, 8, 5, 5)), 0),
    ExportCase("conv_bn_bn", "chain", _seeded(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8),
                                                                    nn.BatchNorm2d(8)), (2, 3, 9, 9)), 0),
    ExportCase("conv_called_twice", "shared", _seeded(_CalledTwice, (2, 3, 9, 9)), 0,
               "one conv node per call, one BatchNorm each: fused-weight names collide"),
    ExportCase("shared_weight_two_convs", "shared", _seeded(_SharedWeight, (2, 3, 9, 9)), 0,
               "one weight, two convs, two norms: each fold needs a weight of its own"),
    ExportCase("concat_convs_bn", "concat", _seeded(_Concat, (2, 3, 9, 9)), 0,
               "one norm over cat([conv_a, conv_b]): each conv folds its slice of the statistics"),
    ExportCase("concat_second_user", "left", _seeded(lambda: _Concat(second_user=True), (2, 3, 9, 9)), 1,
               "a conv in the concat is also read elsewhere: no slice folds"),
    ExportCase("conv_output_second_user", "left", _seeded(_SecondUser, (2, 3, 9, 9)), 1,
               "the conv's output is also read unnormalised"),
    ExportCase("train_mode_export", "left", _seeded(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)),
                                                    (4, 3, 9, 9), train=True), 1,
               "exported in training mode: the graph normalises with batch statistics", not_in=("fx",)),
    ExportCase("no_running_stats", "left",
               _seeded(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False)),
                       (4, 3, 9, 9)), 1),
    ExportCase("stats_as_user_inputs", "left", _seeded(_StatsAsInputs, (2, 3, 9, 9), (6,), (6,)), 1,
               "running mean and variance are program inputs"),
    ExportCase("mutated_running_mean", "left", _seeded(_MutatedStats, (2, 3, 9, 9)), 1,
               "the program writes into the norm's running mean (symbolic_trace runs that write while tracing: "
               "its graph has none)", not_in=("fx",)),
    ExportCase("fp16_overflow", "precision", _overflowing, 1,
               "the folded fp16 weight would be inf"),
    ExportCase("fp16_conv_bn", "precision", _seeded(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)),
                                                    (2, 3, 9, 9), dtype=torch.float16), 0),
    ExportCase("linear_bn1d", "linear->bn", _seeded(lambda: nn.Sequential(nn.Linear(10, 12), nn.BatchNorm1d(12)),
                                                    (4, 10)), 0, rank_dependent=1),
    ExportCase("linear_nobias_bn1d", "linear->bn",
               _seeded(lambda: nn.Sequential(nn.Linear(10, 12, bias=False), nn.BatchNorm1d(12)), (4, 10)), 0,
               rank_dependent=1),
    ExportCase("linear_bn1d_3d_input", "left", _seeded(_Linear3d, (4, 5, 10)), 1,
               "BatchNorm1d normalises dim 1 of (N, C, L); the linear layer's features are dim 2"),
    ExportCase("linear_bn1d_3d_equal_sizes", "left", _seeded(lambda: nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)),
                                                             (4, 8, 8)), 1,
               "Linear(8, 8) over the last axis of (N, 8, 8), BatchNorm1d(8) over dim 1: the sizes match, the axes "
               "do not"),
    ExportCase("bn_conv_no_padding", "bn->layer", _seeded(lambda: nn.Sequential(nn.BatchNorm2d(3),
                                                                                nn.Conv2d(3, 8, 3)), (2, 3, 9, 9)), 0),
    ExportCase("bn_conv_zero_padding", "left", _seeded(lambda: nn.Sequential(nn.BatchNorm2d(3),
                                                                             nn.Conv2d(3, 8, 3, padding=1)),
                                                       (2, 3, 9, 9)), 1, "zero padding after the norm"),
    ExportCase("bn_conv_reflect_padding", "bn->layer",
               _seeded(lambda: nn.Sequential(nn.BatchNorm2d(3),
                                             nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")), (2, 3, 9, 9)), 0,
               "reflect padding copies BN outputs: the fold is exact (after run_decompositions the pad is index "
               "arithmetic, not read as a pad)",
               not_in=("inference", "edge")),
    ExportCase("bn_conv_transpose", "left", _seeded(lambda: nn.Sequential(nn.BatchNorm2d(4),
                                                                          nn.ConvTranspose2d(4, 4, 3)), (2, 4, 5, 5)),
               1, "a BatchNorm before a transposed conv does not fold"),
    ExportCase("bn_linear", "bn->layer", _seeded(lambda: nn.Sequential(nn.BatchNorm1d(10), nn.Linear(10, 6)),
                                                 (4, 10)), 0, rank_dependent=1),
)

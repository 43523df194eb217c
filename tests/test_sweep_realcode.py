"""The independent foldable-BN counter of the real-code sweep (benchmarks/foldable.py), on plain torch models.

Every expected count is worked out by hand from spec/folding.md (sections 3 and 4), not produced by the counter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.foldable import count_foldable


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


class FrozenCopy(nn.Module):
    """A FrozenBatchNorm2d copy under another name: buffers, a hard-coded eps, no ``eps`` attribute."""

    def __init__(self, n: int) -> None:
        super().__init__()
        for name, value in (("weight", torch.ones(n)), ("bias", torch.zeros(n)), ("running_mean", torch.zeros(n)),
                            ("running_var", torch.ones(n))):
            self.register_buffer(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return x * scale.reshape(1, -1, 1, 1) + (self.bias - self.running_mean * scale).reshape(1, -1, 1, 1)


class Residual(nn.Module):  # conv output read by the BN and by the add: 0 of 1
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class SharedConv(nn.Module):  # one conv called twice, a BN after each call: its weight is read twice, 0 of 2
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn1(self.conv(x))) + torch.relu(self.bn2(self.conv(x)))


class Concat(nn.Module):  # BN after a channel concat of two conv outputs: 1 of 1; with the input as a third part: 0
    def __init__(self, with_input: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 2, 3, padding=1), nn.Conv2d(4, 3, 1)
        self.with_input = with_input
        self.bn = nn.BatchNorm2d(9 if with_input else 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.a(x), self.b(x)] + ([x] if self.with_input else [])
        return self.bn(torch.cat(parts, dim=1))


class FunctionalBN(nn.Module):
    """F.batch_norm on its own statistics after a conv: 1 of 1. BiT-style weight standardisation (batch_norm of
    the weight with batch statistics) is not a BN call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))
        self.std_weight = nn.Parameter(torch.randn(4, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(self.conv(x), self.mean, self.var, training=False)
        w = F.batch_norm(self.std_weight.reshape(1, 4, -1), None, None, training=True).reshape_as(self.std_weight)
        return F.conv2d(torch.relu(y), w)


class TwoCalls(nn.Module):  # one BN module called after a conv and after a ReLU: neither call counts, 0 of 2
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.bn(torch.relu(x))


class ReturnsConvOutput(nn.Module):  # the conv output is also a model output: 0 of 1
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return self.bn(y), y


class Transposed(nn.Module):  # BN1d over channels of a linear applied to (N, L, C), transposed: 0 of 1
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.fc(x).transpose(1, 2)))


class FlattenedTokens(nn.Module):
    """LeViT: Linear on (N, L, C), flatten(0, 1) into rows, BatchNorm1d on them: 1 of 1. Reshaped into rows of
    two tokens each, the BN axis is no longer the linear's output features: 0 of 1."""

    def __init__(self, keep_axis: bool) -> None:
        super().__init__()
        self.keep_axis = keep_axis
        self.fc, self.bn = nn.Linear(4, 6), nn.BatchNorm1d(6 if keep_axis else 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        rows = y.flatten(0, 1) if self.keep_axis else y.reshape(-1, 12)
        return self.bn(rows).reshape_as(y)  # as LeViT: y's shape only, not a second reader of y


CASES = {
    # name: (model, input, BN calls, exactly foldable)
    "conv_bn_relu_conv_bn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                                   nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)), (2, 3, 9, 9), 2, 2),
    "through_identity_and_dropout": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Identity(), nn.Dropout(0.5),
                                                           nn.BatchNorm2d(4), nn.ReLU()), (2, 3, 9, 9), 1, 1),
    "conv_bn_bn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.ReLU()),
                   (2, 3, 9, 9), 2, 2),
    "residual_reads_conv_output": (Residual, (2, 4, 6, 6), 1, 0),
    "shared_conv": (SharedConv, (2, 4, 6, 6), 2, 0),
    "bn_relu_conv": (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3)), (2, 3, 9, 9), 1, 0),
    "bn_conv_unpadded": (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)), (2, 3, 9, 9), 1, 1),
    "bn_conv_zero_padded": (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)),
                            (2, 3, 9, 9), 1, 0),
    "bn_conv_reflect_padded": (lambda: nn.Sequential(nn.BatchNorm2d(3),
                                                     nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")),
                               (2, 3, 9, 9), 1, 1),
    "bn_conv_transpose": (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 4, 3)), (2, 3, 5, 5), 1, 0),
    "conv_transpose_bn_groups": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6),
                                                       nn.ReLU()), (2, 4, 5, 5), 1, 1),
    "linear_bn1d_2d": (lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU()), (3, 5), 1, 1),
    "bn1d_linear_2d": (lambda: nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 4)), (3, 5), 1, 1),
    "linear_3d_transposed_bn1d": (Transposed, (2, 6, 4), 1, 0),
    "frozen_copy": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), FrozenCopy(4), nn.ReLU()), (2, 3, 9, 9), 1, 1),
    "batch_statistics": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
                         (2, 3, 9, 9), 1, 0),
    "concat_of_convs": (lambda: Concat(False), (2, 4, 6, 6), 1, 1),
    "concat_with_input": (lambda: Concat(True), (2, 4, 6, 6), 1, 0),
    "functional_batch_norm": (FunctionalBN, (2, 3, 9, 9), 1, 1),
    "one_module_two_calls": (TwoCalls, (2, 4, 6, 6), 2, 0),
    "conv_output_returned": (ReturnsConvOutput, (2, 4, 6, 6), 1, 0),
    "linear_tokens_flattened_bn1d": (lambda: FlattenedTokens(True), (2, 5, 4), 1, 1),
    "linear_tokens_reshaped_across_features": (lambda: FlattenedTokens(False), (2, 4, 4), 1, 0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hand_worked_counts(name: str) -> None:
    factory, shape, bn_calls, foldable = CASES[name]
    torch.manual_seed(0)
    model = factory().eval()
    count = count_foldable(model, _x(*shape))
    assert (count.bn_calls, count.foldable) == (bn_calls, foldable), count.to_dict()
    assert sum(count.not_foldable.values()) == bn_calls - foldable


def test_other_norm_classes_are_named_and_the_model_is_left_as_it_was() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenCopy(4), nn.BatchNorm2d(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count = count_foldable(model, _x(2, 3, 9, 9))
    assert count.other_classes == {"FrozenCopy": 1}
    assert count.modules == {"1": 1, "2": 1}
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not model[0]._forward_pre_hooks

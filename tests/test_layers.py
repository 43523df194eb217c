"""Tests of ``refimpl.layers``: the layer kinds and the table that chooses the fold.

Oracles: torch's own modules (their weight shapes and channel counts, and the unfused layer and BatchNorm run in
float64), the fold's own output (which weight positions one factor entry scales), and tap counts from torch's
float64 convolutions on all-ones tensors.
"""

from __future__ import annotations

import numpy as np
import pytest

from refimpl import error_bound
from refimpl.layers import (
    CONV,
    CONV_TRANSPOSE,
    FOLDS,
    LAYER_KINDS,
    LINEAR,
    NORM_AFTER,
    NORM_BEFORE,
    fold_for,
    layer_kind,
)

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from adapters.report import FOLD_KINDS  # noqa: E402

# (kind, torch module, groups, kernel size): every rank, grouped and not.
MODULES = [
    pytest.param(CONV, lambda: nn.Conv1d(6, 4, 3, groups=2), 2, (3,), id="conv1d-groups"),
    pytest.param(CONV, lambda: nn.Conv2d(3, 5, (2, 3)), 1, (2, 3), id="conv2d"),
    pytest.param(CONV, lambda: nn.Conv3d(4, 8, 2, groups=4), 4, (2, 2, 2), id="conv3d-groups"),
    pytest.param(CONV_TRANSPOSE, lambda: nn.ConvTranspose1d(4, 6, 3, groups=2), 2, (3,), id="convT1d-groups"),
    pytest.param(CONV_TRANSPOSE, lambda: nn.ConvTranspose2d(3, 5, (2, 3)), 1, (2, 3), id="convT2d"),
    pytest.param(CONV_TRANSPOSE, lambda: nn.ConvTranspose3d(6, 9, 2, groups=3), 3, (2, 2, 2), id="convT3d-groups"),
    pytest.param(LINEAR, lambda: nn.Linear(7, 3), 1, (), id="linear"),
]


def _channels(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


@pytest.mark.parametrize(("kind", "make", "groups", "kernel"), MODULES)
def test_layout_and_channel_counts_are_torchs(kind, make, groups, kernel):
    module = make()
    in_channels, out_channels = _channels(module)
    shape = tuple(module.weight.shape)
    assert kind.weight_shape(in_channels, out_channels, kernel, groups=groups) == shape
    assert kind.out_channels(shape, groups) == out_channels
    assert kind.in_channels(shape, groups) == in_channels


@pytest.mark.parametrize(("kind", "make", "groups", "kernel"), MODULES)
def test_unit_shape_is_what_one_factor_entry_scales(kind, make, groups, kernel):
    """Fold a norm after the layer into an all-ones weight with a different scale per channel: the folded weight
    is constant over the positions of each unit slot, and differs between slots."""
    module = make()
    shape = tuple(module.weight.shape)
    channels = kind.out_channels(shape, groups)
    scale = 2.0 ** np.arange(channels)  # distinct, exact: var + eps = 1, gamma = 2**c
    folded, _ = fold_for(kind, NORM_AFTER)(np.ones(shape), None, np.zeros(channels), np.ones(channels), 0.0, scale,
                                           np.zeros(channels), groups=groups)
    unit = kind.unit_shape(shape, groups)
    axes = tuple(axis for axis, size in enumerate(unit) if size == 1)
    assert all(unit[axis] == shape[axis] for axis in range(len(shape)) if axis not in axes)
    slot_max, slot_min = folded.max(axis=axes, keepdims=True), folded.min(axis=axes, keepdims=True)
    assert np.array_equal(slot_max, slot_min), "the fold varies within a unit slot"
    assert len(np.unique(slot_max)) == channels, "some slots share a factor they should not"


@pytest.mark.parametrize(("kind", "make", "groups", "kernel"), MODULES)
def test_reduction_length_counts_the_taps(kind, make, groups, kernel):
    module = make().double()
    shape = tuple(module.weight.shape)
    in_channels, _ = _channels(module)
    with torch.no_grad():
        module.weight.fill_(1.0)
        module.bias.zero_()
        size = (1, in_channels) + tuple(3 * k for k in kernel) if kernel else (1, in_channels)
        most = module(torch.ones(size, dtype=torch.float64)).max().item()
    assert kind.reduction_length(shape, groups) == most


def test_the_table_names_the_reports_fold_kinds_both_ways():
    assert {fold.kind for fold in FOLDS.values()} == set(FOLD_KINDS)
    assert len(FOLDS) == len(FOLD_KINDS)
    for (name, position), fold in FOLDS.items():
        assert fold.layer is LAYER_KINDS[name] and fold.position == position
        assert fold_for(name, position) is fold and fold_for(fold.layer, position) is fold


# (kind, module, groups, norm position, input shape)
PAIRS = [
    pytest.param(lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", groups=2), NORM_AFTER, (2, 4, 5, 5),
                 id="conv->bn"),
    pytest.param(lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), NORM_AFTER, (2, 4, 4, 4),
                 id="conv_transpose->bn"),
    pytest.param(lambda: nn.Linear(5, 3), NORM_AFTER, (4, 5), id="linear->bn"),
    pytest.param(lambda: nn.Conv1d(4, 6, 3, groups=2), NORM_BEFORE, (2, 4, 7), id="bn->conv"),
    pytest.param(lambda: nn.Linear(5, 3), NORM_BEFORE, (4, 5), id="bn->linear"),
]


@pytest.mark.parametrize(("make", "position", "input_shape"), PAIRS)
def test_each_entry_computes_what_the_two_layers_compute(make, position, input_shape):
    """The table's fold of each (kind, position) against torch running the layer and the BatchNorm in float64."""
    torch.manual_seed(0)
    layer = make().double().eval()
    kind = layer_kind("linear" if isinstance(layer, nn.Linear) else
                      "conv_transpose" if isinstance(layer, nn.modules.conv._ConvTransposeNd) else "conv")
    groups = getattr(layer, "groups", 1)
    in_channels, out_channels = _channels(layer)
    channels = out_channels if position == NORM_AFTER else in_channels
    dims = len(input_shape) - 2
    norm = (nn.BatchNorm1d if dims <= 1 else nn.BatchNorm2d)(channels).double().eval()
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(input_shape, dtype=torch.float64)
    with torch.no_grad():
        unfused = norm(layer(x)) if position == NORM_AFTER else layer(norm(x))
    fold = fold_for(kind, position)
    w, b, mean, var, gamma, beta = (t.detach().numpy() for t in (layer.weight, layer.bias, norm.running_mean,
                                                                  norm.running_var, norm.weight, norm.bias))
    weight, bias = fold(w, b, mean, var, norm.eps, gamma, beta, groups=groups)
    # The magnitude each output is accurate to: the fold run on absolute values (|gamma|, |beta|, -|mu| make the
    # scale |s| and every shift term positive), applied to |x|; it bounds the terms of both sides.
    magnitude_weight, magnitude_bias = fold(np.abs(w), np.abs(b), -np.abs(mean), var, norm.eps, np.abs(gamma),
                                            np.abs(beta), groups=groups)
    folded = _run(make, weight, bias, x)
    magnitude = _run(make, magnitude_weight, magnitude_bias, x.abs())
    # Roundings behind one element: the reduction on each side (K terms each), a shift summed over K more terms
    # when the norm comes first, and the few operations of the scale and the BatchNorm itself.
    n = 3 * kind.reduction_length(tuple(layer.weight.shape), groups) + 16
    error = np.abs(folded - unfused.numpy())
    assert np.all(error <= error_bound(magnitude, n, "float64")), f"worst error {error.max():.3g}"
    # The norm is far from the identity: the layer alone, unfolded, would fail the same check.
    assert not np.allclose(folded, _run(make, w, b, x)), "the fold changed nothing: the check could not fail"


def _run(make, weight: np.ndarray, bias: np.ndarray, x: torch.Tensor) -> np.ndarray:
    """A fresh layer from ``make`` with ``weight`` and ``bias``, run on ``x`` in float64."""
    layer = make().double().eval()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
        layer.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias)))
        return layer(x).numpy()


def test_a_pair_that_does_not_fold_says_why():
    with pytest.raises(ValueError, match=r"a BatchNorm before a conv_transpose layer does not fold \(spec/folding.md"):
        fold_for("conv_transpose", NORM_BEFORE)
    with pytest.raises(ValueError, match="unknown layer kind 'gemm'; known: conv, conv_transpose, linear"):
        fold_for("gemm", NORM_AFTER)
    with pytest.raises(ValueError, match="unknown norm position 'forward'; known: after, before"):
        fold_for("conv", "forward")


@pytest.mark.parametrize(("call", "message"), [
    pytest.param(lambda: LINEAR.out_channels((3, 4, 1)), r"a linear weight is \[out, in\], got shape \(3, 4, 1\)",
                 id="linear-rank"),
    pytest.param(lambda: CONV.in_channels((3,), 1), r"a conv weight is \[out, in/groups, \*kernel\], got shape \(3,\)",
                 id="conv-rank"),
    pytest.param(lambda: CONV_TRANSPOSE.unit_shape((4, 2, 3), 0), "conv_transpose: groups must be a positive integer",
                 id="zero-groups"),
    pytest.param(lambda: LINEAR.weight_shape(3, 4, (3,)), r"a linear layer takes no kernel size, got \(3,\)",
                 id="linear-kernel"),
    pytest.param(lambda: fold_for("linear", NORM_AFTER)(np.ones((2, 2)), None, np.zeros(2), np.ones(2), 0.0,
                                                        groups=2),
                 "linear->bn: a linear layer has no groups, got groups=2", id="linear-groups"),
])
def test_bad_input_names_the_kind_and_shape(call, message):
    with pytest.raises(ValueError, match=message):
        call()

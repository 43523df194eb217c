"""Cross-tests: the adapter's fused torch layers against the numpy float64 reference ops.

For every fold family, the torch layers are built with random weights and BatchNorm statistics,
fused by ``adapters.torch.fuse``, and the fused layer's output (fp32, or TF32 where cuDNN uses
it) is compared element by element with ``refimpl``'s float64 ops applied to the *original*
layers' parameters (numpy, never torch). The bound is ``refimpl.error_bound(magnitude, n, dtype)``:

* ``magnitude`` is the same reference chain run on absolute values, with the BatchNorm mean
  entering as ``-|mean|`` -- an upper bound of ``sum_i |w'_i x_i| + |b'|`` for the folded
  weights, obtained without writing the fold formula a second time;
* ``n`` is the reduction length of one output element plus one for the bias and two for the
  BatchNorm's multiply and add.

The unfused torch layers must meet the same bound: that keeps the bound honest (not so tight
that a correct computation fails it), and :func:`test_bound_catches_a_wrong_fold` shows that it
is tight enough to catch the classic grouped transposed-conv mistake.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import refimpl
from adapters.report import FOLD_KINDS
from adapters.torch import fuse
from adapters.torch.suite.cases import randomize_norm_stats, randomize_parameters

Layer = nn.Module


@dataclass(frozen=True)
class CrossCase:
    name: str
    kind: str
    make: Callable[[], list[Layer]]  # the layers in dataflow order: [layer, norm] or [norm, layer]
    input_shape: tuple[int, ...]


def _conv_bn(conv: Callable[[], Layer], bn: Callable[[], Layer]) -> Callable[[], list[Layer]]:
    return lambda: [conv(), bn()]


CROSS_CASES = [
    # conv -> BN
    CrossCase("conv1d_stride_reflect", "conv->bn", _conv_bn(
        lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"), lambda: nn.BatchNorm1d(4)), (2, 3, 9)),
    CrossCase("conv1d_groups_dilation_nobias", "conv->bn", _conv_bn(
        lambda: nn.Conv1d(4, 6, 3, dilation=2, groups=2, bias=False), lambda: nn.BatchNorm1d(6)), (2, 4, 10)),
    *[CrossCase(f"conv2d_pad_{mode}", "conv->bn", _conv_bn(
        lambda mode=mode: nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode), lambda: nn.BatchNorm2d(4)), (2, 3, 8, 8))
      for mode in ("zeros", "reflect", "replicate", "circular")],
    CrossCase("conv2d_groups_stride_dilation", "conv->bn", _conv_bn(
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), lambda: nn.BatchNorm2d(6)),
        (2, 4, 9, 9)),
    CrossCase("conv2d_depthwise_nobias", "conv->bn", _conv_bn(
        lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), lambda: nn.BatchNorm2d(4)), (2, 4, 8, 8)),
    CrossCase("conv2d_same_affine_false", "conv->bn", _conv_bn(
        lambda: nn.Conv2d(3, 4, (3, 1), padding="same"), lambda: nn.BatchNorm2d(4, affine=False)), (2, 3, 8, 8)),
    CrossCase("conv3d_groups_stride_circular", "conv->bn", _conv_bn(
        lambda: nn.Conv3d(2, 4, 3, stride=(1, 2, 2), padding=1, padding_mode="circular", groups=2),
        lambda: nn.BatchNorm3d(4)), (2, 2, 4, 6, 6)),
    # conv_transpose -> BN
    CrossCase("conv_transpose1d_output_padding", "conv_transpose->bn", _conv_bn(
        lambda: nn.ConvTranspose1d(3, 4, 3, stride=2, output_padding=1), lambda: nn.BatchNorm1d(4)), (2, 3, 6)),
    CrossCase("conv_transpose2d_groups", "conv_transpose->bn", _conv_bn(
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
        lambda: nn.BatchNorm2d(6)), (2, 4, 5, 5)),
    CrossCase("conv_transpose2d_groups3_dilation_nobias", "conv_transpose->bn", _conv_bn(
        lambda: nn.ConvTranspose2d(3, 6, 2, dilation=2, groups=3, bias=False), lambda: nn.BatchNorm2d(6)),
        (2, 3, 5, 5)),
    CrossCase("conv_transpose3d_groups", "conv_transpose->bn", _conv_bn(
        lambda: nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2), lambda: nn.BatchNorm3d(6)), (2, 4, 3, 3, 3)),
    # linear -> BN
    CrossCase("linear", "linear->bn", _conv_bn(lambda: nn.Linear(7, 6), lambda: nn.BatchNorm1d(6)), (5, 7)),
    CrossCase("linear_nobias", "linear->bn", _conv_bn(lambda: nn.Linear(7, 6, bias=False),
                                                       lambda: nn.BatchNorm1d(6)), (5, 7)),
    # BN -> conv (exact: no padding, or padding that copies BN outputs)
    CrossCase("bn_conv2d_valid", "bn->conv", lambda: [nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)], (2, 3, 8, 8)),
    *[CrossCase(f"bn_conv2d_pad_{mode}", "bn->conv",
                lambda mode=mode: [nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode)], (2, 3, 8, 8))
      for mode in ("reflect", "replicate", "circular")],
    CrossCase("bn_conv2d_groups_stride_nobias", "bn->conv",
              lambda: [nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False)], (2, 4, 9, 9)),
    CrossCase("bn_conv2d_dilation_reflect", "bn->conv",
              lambda: [nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=2, dilation=2, padding_mode="reflect")],
              (2, 3, 8, 8)),
    CrossCase("bn_conv1d_circular", "bn->conv",
              lambda: [nn.BatchNorm1d(3), nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular")], (2, 3, 8)),
    CrossCase("bn_conv3d_replicate", "bn->conv",
              lambda: [nn.BatchNorm3d(2), nn.Conv3d(2, 3, 3, padding=1, padding_mode="replicate")], (2, 2, 4, 5, 5)),
    # BN -> linear
    CrossCase("bn_linear", "bn->linear", lambda: [nn.BatchNorm1d(7), nn.Linear(7, 3)], (5, 7)),
    CrossCase("bn_linear_nobias", "bn->linear", lambda: [nn.BatchNorm1d(7), nn.Linear(7, 3, bias=False)], (5, 7)),
]

# Wide enough that cuDNN picks tensor-core kernels, which use TF32 when allowed; the tiny cases
# above run on kernels that never do, so only these exercise the TF32 side of the bound.
WIDE_CASES = [
    CrossCase("conv2d_wide", "conv->bn", _conv_bn(lambda: nn.Conv2d(64, 64, 3, padding=1),
                                                  lambda: nn.BatchNorm2d(64)), (2, 64, 16, 16)),
    CrossCase("bn_conv2d_wide_reflect", "bn->conv", lambda: [
        nn.BatchNorm2d(64), nn.Conv2d(64, 32, 3, padding=1, padding_mode="reflect", bias=False)], (2, 64, 16, 16)),
    CrossCase("conv_transpose2d_wide_groups", "conv_transpose->bn", _conv_bn(
        lambda: nn.ConvTranspose2d(64, 64, 2, stride=2, groups=2), lambda: nn.BatchNorm2d(64)), (2, 64, 8, 8)),
]


def _build(case: CrossCase, seed: int) -> tuple[nn.Sequential, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(*case.make())
    randomize_parameters(model, generator)
    randomize_norm_stats(model, generator)
    x = torch.randn(case.input_shape, generator=generator, dtype=torch.float64).float()
    return model.eval(), x


def _np(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.detach().cpu().double().numpy()


def _layer_ref(layer: Layer, x: np.ndarray, absolute: bool) -> np.ndarray:
    weight, bias = _np(layer.weight), _np(layer.bias)
    if absolute:
        weight, bias = np.abs(weight), (None if bias is None else np.abs(bias))
    if isinstance(layer, nn.Linear):
        return refimpl.linear(x, weight, bias)
    if layer.transposed:
        return refimpl.conv_transpose(x, weight, bias, stride=layer.stride, padding=layer.padding,
                                      output_padding=layer.output_padding, groups=layer.groups,
                                      dilation=layer.dilation)
    return refimpl.conv(x, weight, bias, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                        groups=layer.groups, padding_mode=layer.padding_mode)


def _norm_ref(norm: nn.modules.batchnorm._BatchNorm, x: np.ndarray, absolute: bool) -> np.ndarray:
    mean, var, weight, bias = _np(norm.running_mean), _np(norm.running_var), _np(norm.weight), _np(norm.bias)
    if absolute:
        # (|z| + |mean|) |s| + |beta| bounds |s z + t| term by term, whatever the signs.
        mean = -np.abs(mean)
        weight = None if weight is None else np.abs(weight)
        bias = None if bias is None else np.abs(bias)
    return refimpl.batch_norm(x, mean, var, weight, bias, eps=norm.eps)


def _reduction_length(layer: Layer) -> int:
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        return weight.shape[1]
    if layer.transposed:  # [in, out/groups, *k]: an output sums over in/groups channels and at most prod(k) taps
        return weight.shape[0] // layer.groups * math.prod(weight.shape[2:])
    return weight.shape[1] * math.prod(weight.shape[2:])


def reference_and_bound(case: CrossCase, layers: list[Layer], x: torch.Tensor, dtype: str
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Float64 reference output of the original layers, and the per-element error bound."""
    x64 = _np(x)
    if case.kind.startswith("bn->"):
        norm, layer = layers
        expected = _layer_ref(layer, _norm_ref(norm, x64, False), False)
        magnitude = _layer_ref(layer, _norm_ref(norm, np.abs(x64), True), True)
    else:
        layer, norm = layers
        expected = _norm_ref(norm, _layer_ref(layer, x64, False), False)
        magnitude = _norm_ref(norm, _layer_ref(layer, np.abs(x64), True), True)
    n = _reduction_length(layer) + 1 + 2
    return expected, refimpl.error_bound(magnitude, n, dtype)


def _compute_dtype(layer: Layer, device: str) -> str:
    """The precision the fused layer's products run in: TF32 where cuDNN / cuBLAS are allowed to use it."""
    if device != "cuda":
        return "float32"
    if isinstance(layer, nn.Linear):
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "float32"
    return "tf32" if torch.backends.cudnn.allow_tf32 else "float32"


def check_cross(case: CrossCase, device: str, seed: int = 0) -> None:
    model, x = _build(case, seed)
    original_layers = [copy.deepcopy(layer) for layer in model]
    model, x = model.to(device), x.to(device)
    with torch.no_grad():
        unfused = model(x)
    fused, report = fuse(model, example_inputs=x)

    assert [(pair.norm, pair.kind) for pair in report.folded] == [("1" if case.kind[0] != "b" else "0", case.kind)], (
        f"{case.name}: expected one {case.kind} fold, report: {report.folded} / skipped {report.skipped}")
    layer_index = 0 if case.kind[0] != "b" else 1
    fused_layer = fused[layer_index]
    assert fused_layer.weight.device.type == device and fused_layer.weight.dtype == torch.float32
    assert type(fused[1 - layer_index]) is nn.Identity
    with torch.no_grad():
        actual = fused_layer(x)

    dtype = _compute_dtype(fused_layer, device)
    expected, bound = reference_and_bound(case, original_layers, x, dtype)
    refimpl.assert_within(actual, expected, bound, f"{case.name} fused on {device} ({dtype})")
    # The unfused layers meet the same bound: the bound is not tighter than a correct computation.
    refimpl.assert_within(unfused, expected, bound, f"{case.name} unfused on {device} ({dtype})")


@pytest.mark.parametrize("case", CROSS_CASES + WIDE_CASES, ids=lambda case: case.name)
def test_cross_cpu(case: CrossCase) -> None:
    check_cross(case, "cpu")


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("name", ["conv_transpose2d_groups", "bn_conv2d_groups_stride_nobias", "bn_linear"])
def test_cross_cpu_more_seeds(name: str, seed: int) -> None:
    check_cross(next(case for case in CROSS_CASES if case.name == name), "cpu", seed)


def test_every_fold_family_is_covered() -> None:
    assert {case.kind for case in CROSS_CASES} == set(FOLD_KINDS)


@pytest.fixture(params=[True, False], ids=["tf32", "no-tf32"])
def cudnn_tf32(request):
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = request.param
    try:
        yield request.param
    finally:
        torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.cuda
@pytest.mark.parametrize("case", CROSS_CASES + WIDE_CASES, ids=lambda case: case.name)
def test_cross_cuda(case: CrossCase, cudnn_tf32: bool) -> None:
    assert torch.cuda.is_available()
    assert torch.backends.cudnn.allow_tf32 is cudnn_tf32
    check_cross(case, "cuda")


def _folded_copy(layer: Layer, folded: tuple[torch.Tensor, torch.Tensor]) -> Layer:
    weight, bias = folded
    wrong = copy.deepcopy(layer)
    with torch.no_grad():
        wrong.weight.copy_(weight)
        if wrong.bias is None:
            wrong.bias = nn.Parameter(bias.float())
        else:
            wrong.bias.copy_(bias)
    return wrong


def _norm_args(norm: nn.modules.batchnorm._BatchNorm, roll: int = 0) -> tuple:
    def vector(t: torch.Tensor) -> torch.Tensor:
        return torch.roll(t.detach().double(), roll)
    return (vector(norm.running_mean), vector(norm.running_var), norm.eps, vector(norm.weight), vector(norm.bias))


def test_bound_catches_a_wrong_channel_mapping() -> None:
    """A grouped transposed conv folded with the channels of its two groups swapped (what reading the
    [in, out/groups, *k] layout as [out, ...] amounts to) must fail the bound; the right fold passes."""
    case = next(case for case in CROSS_CASES if case.name == "conv_transpose2d_groups")
    model, x = _build(case, 0)
    layer, norm = model
    expected, bound = reference_and_bound(case, [layer, norm], x, "float32")
    weight, bias = layer.weight.detach().double(), layer.bias.detach().double()
    for roll, should_pass in ((0, True), (3, False)):
        folded = refimpl.fold_conv_bn(weight, bias, *_norm_args(norm, roll), transposed=True, groups=2)
        with torch.no_grad():
            actual = _folded_copy(layer, folded)(x)
        assert refimpl.compare(actual, expected, bound).ok is should_pass, f"roll={roll}"


def test_bound_catches_a_fold_into_zero_padding() -> None:
    """BN folded into a zero-padded conv is wrong only at the borders; the bound must see it."""
    case = CrossCase("bn_conv2d_zeros", "bn->conv", lambda: [nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)],
                     (2, 3, 8, 8))
    model, x = _build(case, 0)
    norm, layer = model
    expected, bound = reference_and_bound(case, [norm, layer], x, "float32")
    folded = refimpl.fold_bn_conv(layer.weight.detach().double(), layer.bias.detach().double(), *_norm_args(norm))
    with torch.no_grad():
        actual = _folded_copy(layer, folded)(x)
    result = refimpl.compare(actual, expected, bound)
    assert not result.ok
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert refimpl.compare(actual[interior], expected[interior], bound[interior]).ok, "interior should be exact"

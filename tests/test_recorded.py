"""Dataflow from a recorded run (adapters/torch/recorded.py): what it sees, what it proves, what it never does.

Every expected fold count is worked out by hand in the test's comment; outputs are judged against the
original model run in float64 with the project's whole-network error model (refimpl.compare_models).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapters.torch import fuse
from adapters.torch.graph import ModelIndex
from adapters.torch.recorded import _layer_output_shape, record
from adapters.torch.suite.cases import randomize_norm_stats, randomize_parameters
from adapters.torch.suite.realcode_cases import ChannelScale, FrozenCopy, PaddedConv2d
from refimpl import compare_models


def _prepared(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    randomize_parameters(model, generator)
    randomize_norm_stats(model, generator)
    return model.eval()


def _assert_same_function(original: nn.Module, fused: nn.Module, *inputs: torch.Tensor) -> None:
    with torch.no_grad():
        reference = copy.deepcopy(original).double()(*(x.double() for x in inputs))
        result = compare_models(fused(*inputs), original(*inputs), reference, torch.float32)
    assert result.ok, result.describe()


def _pairs(report) -> list[tuple[str, str, str]]:
    return sorted((p.norm, p.layer, p.kind) for p in report.folded)


class TestNormsBySemantics:
    def test_channel_scale_layer_folds_and_is_no_norm_without_inputs(self):
        # conv -> x * gamma[c] + beta[c]: an affine map per channel with constant parameters: one fold.
        model = _prepared(nn.Sequential(nn.Conv2d(3, 4, 3), ChannelScale(4), nn.ReLU()))
        x = torch.randn(2, 3, 7, 7)
        fused, report = fuse(model, example_inputs=x)
        assert _pairs(report) == [("1", "0", "conv->bn")] and report.skipped == []
        assert type(fused[1]) is nn.Identity
        _assert_same_function(model, fused, x)
        # Without inputs nothing says it is a norm: it holds no running statistics, so it is not reported.
        _, plain = fuse(model)
        assert plain.folded == [] and plain.norms_found == 0

    def test_scale_along_the_last_axis_is_not_a_channel_norm(self):
        # A layer scale on (N, T, C) tokens scales the last axis, not axis 1: never a norm for the linear before it.
        class LayerScale(nn.Module):
            def __init__(self):
                super().__init__()
                self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 4))

            def forward(self, x):
                return x * self.gamma

        model = _prepared(nn.Sequential(nn.Linear(4, 4), LayerScale()))
        fused, report = fuse(model, example_inputs=torch.randn(2, 5, 4))
        assert report.folded == [] and report.norms_found == 0 and report.skipped == []

    def test_instance_norm_with_running_statistics_folds_in_eval(self):
        # InstanceNorm2d(track_running_stats=True) normalises with its running statistics in eval: affine per
        # channel, one fold; without inputs it is reported (it holds running statistics), not folded.
        model = _prepared(nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True,
                                                                             track_running_stats=True)))
        x = torch.randn(2, 3, 6, 6)
        fused, report = fuse(model, example_inputs=x)
        assert _pairs(report) == [("1", "0", "conv->bn")]
        _assert_same_function(model, fused, x)
        _, plain = fuse(model)
        assert [(s.norm, s.reason) for s in plain.skipped] == [("1", "unknown_norm")]

    def test_frozen_copy_detail_names_the_missing_eps_not_missing_buffers(self):
        class FrozenBatchNorm2dCopy(FrozenCopy):
            pass

        model = _prepared(nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2dCopy(4)))
        _, report = fuse(model)
        [skip] = report.skipped
        assert skip.reason == "unknown_norm" and "no numeric eps" in skip.detail and "lacks" not in skip.detail
        fused, recorded = fuse(model, example_inputs=torch.randn(2, 3, 6, 6))
        assert _pairs(recorded) == [("1", "0", "conv->bn")]
        _assert_same_function(model, fused, torch.randn(2, 3, 6, 6))

    def test_norm_whose_calls_compute_different_maps_is_left(self):
        # The map depends on a call counter: each call is affine, but not with the same constants. Left.
        class Drifting(nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("running_mean", torch.zeros(4))
                self.register_buffer("running_var", torch.ones(4))
                self.calls = 0

            def forward(self, x):
                self.calls += 1
                return (x - self.running_mean[None, :, None, None]) * float(self.calls)

        class Twice(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 1)
                self.norm = Drifting()

            def forward(self, x):
                return self.norm(self.conv(x)) + self.norm(self.conv(x))

        model = _prepared(Twice())
        _, report = fuse(model, example_inputs=torch.randn(2, 3, 4, 4))
        assert report.folded == []
        assert [(s.norm, s.reason) for s in report.skipped] == [("norm", "unknown_norm")]
        assert "different maps" in report.skipped[0].detail


    @pytest.mark.parametrize("squash", [lambda x: x.clamp(-8.0, 8.0), lambda x: torch.maximum(x, torch.tensor(-20.0)),
                                        lambda x: F.hardtanh(x, -50.0, 50.0)],
                             ids=["clamp", "maximum", "hardtanh"])
    def test_piecewise_map_that_every_probe_sees_as_affine_is_no_norm(self, squash):
        # clamp(x, -8, 8) * w + b agrees with an affine map on zeros, ones and N(0, 1) probes, yet not on large
        # inputs: a fold would be silently wrong there. Its forward applies a non-affine op to the input: no fold,
        # and (it holds running statistics) it is reported as unknown_norm naming the op.
        class Squashed(nn.Module):
            def __init__(self):
                super().__init__()
                self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 4))
                self.bias = nn.Parameter(torch.linspace(-1.0, 1.0, 4))
                self.register_buffer("running_mean", torch.zeros(4))
                self.register_buffer("running_var", torch.ones(4))

            def forward(self, x):
                return squash(x) * self.weight[None, :, None, None] + self.bias[None, :, None, None]

        model = _prepared(nn.Sequential(nn.Conv2d(3, 4, 3), Squashed()))
        fused, report = fuse(model, example_inputs=torch.randn(2, 3, 6, 6))
        assert report.folded == []
        assert [(s.norm, s.reason) for s in report.skipped] == [("1", "unknown_norm")]
        assert "not an affine op" in report.skipped[0].detail
        big = 100 * torch.randn(2, 3, 6, 6)
        assert torch.equal(fused(big), model(big))

class TestConvPartnersBySemantics:
    def test_padded_conv_takes_a_bn_after_it_not_before(self):
        # bn0 -> PaddedConv2d -> bn2: bn2 folds into the conv (1 fold); bn0 would meet the padding (zero_padding).
        model = _prepared(nn.Sequential(nn.BatchNorm2d(3), PaddedConv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4)))
        x = torch.randn(2, 3, 9, 9)
        fused, report = fuse(model, example_inputs=x)
        assert _pairs(report) == [("2", "1", "conv->bn")]
        assert [(s.norm, s.reason) for s in report.skipped] == [("0", "zero_padding")]
        assert "rests on the recorded path" in report.folded[0].note  # its forward read x.shape
        _assert_same_function(model, fused, x)
        # Another input size (other padding amounts): still the same function.
        _assert_same_function(model, fused, torch.randn(1, 3, 12, 7))

    def test_conv_subclass_that_transforms_its_weight_is_no_partner(self):
        class Standardised(nn.Conv2d):
            def forward(self, x):
                w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
                return F.conv2d(x, w, self.bias, self.stride, self.padding)

        model = _prepared(nn.Sequential(Standardised(3, 4, 3), nn.BatchNorm2d(4)))
        _, report = fuse(model, example_inputs=torch.randn(2, 3, 6, 6))
        assert report.folded == [] and [s.reason for s in report.skipped] == ["unsupported_layer"]


class TestDataflow:
    def test_in_place_write_between_conv_and_bn_blocks_the_fold(self):
        class Written(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

            def forward(self, x):
                y = self.conv(x)
                y[:, 0] = 1.0  # the BN reads values the conv did not compute
                return self.bn(y)

        model = _prepared(Written())
        x = torch.randn(2, 3, 4, 4)
        fused, report = fuse(model, example_inputs=x)
        assert report.folded == [] and [s.reason for s in report.skipped] == ["output_used_elsewhere"]
        _assert_same_function(model, fused, x)

    def test_value_dependent_code_runs_for_real_and_shape_code_does_not(self):
        class Shapes(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

            def forward(self, x):
                return self.bn(self.conv(x)).flatten(2).mean(-1) * x.shape[-1]

        class Values(Shapes):
            def forward(self, x):
                y = self.bn(self.conv(x))
                return y if bool(y.mean() > -1e9) else -y

        class SizedByValue(Shapes):
            def forward(self, x):  # a length taken from a value, read in C++ by arange
                y = self.bn(self.conv(x))
                n = (y.abs().amax() > -1).sum() + 2
                return y.flatten(1)[:, torch.arange(n)]

        x = torch.randn(2, 3, 5, 5)
        for cls, shape_only in ((Shapes, True), (Values, False), (SizedByValue, False)):
            model = _prepared(cls())
            recording = record(model, ModelIndex(model), x)
            assert recording is not None and recording.shape_only is shape_only, cls.__name__

    def test_shape_only_run_leaves_the_model_as_it_was(self):
        class Caching(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
                self.seen = None

            def forward(self, x):
                y = self.bn(self.conv(x))
                self.seen = y  # a forward that keeps what it computed
                return y

        model = _prepared(Caching())
        fused, report = fuse(model, example_inputs=torch.randn(2, 3, 4, 4), inplace=True)
        assert len(report.folded) == 1 and fused.seen is None

    def test_pairing_in_a_clean_child_holds_for_every_call(self):
        # A head that reads shapes in its own code calls conv -> bn blocks whose forward reads nothing:
        # the two folds carry no note; the block at the root called with a default argument does.
        class ConvBn(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

            def forward(self, x):
                return torch.relu(self.bn(self.conv(x)))

        class Head(nn.Module):
            def __init__(self):
                super().__init__()
                self.blocks = nn.ModuleList(ConvBn() for _ in range(2))
                self.stem, self.stem_bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

            def forward(self, x, scale=None):
                y = self.stem_bn(self.stem(x))
                for block in self.blocks[: y.shape[1] // 2]:
                    y = block(y)
                return y if scale is None else y * scale

        model = _prepared(Head())
        x = torch.randn(2, 3, 4, 4)
        fused, report = fuse(model, example_inputs=x)
        notes = {p.norm: p.note for p in report.folded}
        assert set(notes) == {"stem_bn", "blocks.0.bn", "blocks.1.bn"}
        assert notes["blocks.0.bn"] == notes["blocks.1.bn"] == ""
        assert notes["stem_bn"].startswith("rests on the recorded path")
        _assert_same_function(model, fused, x)

    def test_bad_inputs_raise_one_line_naming_the_model(self):
        model = _prepared(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match=r"running Sequential on example_inputs \(tensor \(2, 5, 6, 6\)"):
            fuse(model, example_inputs=torch.randn(2, 5, 6, 6), inplace=True)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name, layer, shape", [
    ("conv1d", nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2), (2, 3, 11)),
    ("conv2d", nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), groups=2), (1, 4, 9, 8)),
    ("conv2d", nn.Conv2d(3, 4, 3, padding="same", dilation=2), (1, 3, 7, 6)),
    ("conv2d", nn.Conv2d(3, 4, 3, padding="valid"), (1, 3, 7, 6)),
    ("conv3d", nn.Conv3d(2, 3, 2, stride=2), (1, 2, 5, 6, 7)),
    ("conv_transpose2d", nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
     (1, 4, 5, 4)),
    ("linear", nn.Linear(5, 3), (2, 7, 5)),
])
def test_layer_output_shape_matches_torch(name, layer, shape):
    x = torch.randn(shape)
    with torch.no_grad():
        expected = tuple(layer(x).shape)
    if name == "linear":
        args: tuple = (x, layer.weight, layer.bias)
    elif name.startswith("conv_transpose"):
        args = (x, layer.weight, layer.bias, layer.stride, layer.padding, layer.output_padding, layer.groups,
                layer.dilation)
    else:
        args = (x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    assert _layer_output_shape(name, args, {}) == expected

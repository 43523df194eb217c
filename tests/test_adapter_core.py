"""Unit tests of the torch adapter's core: error paths, transactionality, report, preservation of
dtype / memory format / requires_grad, and the special inputs (parametrized, lazy, TorchScript,
meta, quantized, training mode, fp16 overflow).

Numerical judgement: whole models are compared with :func:`refimpl.compare_models` (the fused
fp32 error against the float64 run of the original must stay within a small factor of the
unfused fp32 error); a per-element bound through several layers would be vacuous.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import refimpl  # noqa: E402
from adapters.report import REASONS  # noqa: E402
from adapters.torch import FoldedNormAct, FusionReport, fuse, fuse_conv_bn  # noqa: E402
from adapters.torch.running import copy_model  # noqa: E402
from adapters.torch.suite.cases import Conv2dSame  # noqa: E402


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters (fresh BNs are the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_var", None) is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.3)
                w, b = getattr(m, "weight", None), getattr(m, "bias", None)
                if w is not None:
                    w.copy_(torch.randn(w.shape, generator=g))
                if b is not None:
                    b.copy_(torch.randn(b.shape, generator=g))
    return model


def assert_same_output(original: nn.Module, fused: nn.Module, x: torch.Tensor, dtype=torch.float32):
    original, fused = original.eval(), fused.eval()
    with torch.no_grad():
        reference = copy_model(original).double()(x.double())
        verdict = refimpl.compare_models(fused(x), original(x), reference, dtype)
    assert verdict.ok, verdict.describe()


def snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()],
            {n: p for n, p in model.named_parameters()})


def assert_unchanged(model: nn.Module, snap) -> None:
    state, classes, params = snap
    now = model.state_dict()
    assert set(now) == set(state)
    for key, value in state.items():
        same = (now[key] == value) | (now[key].isnan() & value.isnan()) if value.is_floating_point() \
            else now[key] == value
        assert now[key].shape == value.shape and bool(same.all()), key
    assert [(n, type(m)) for n, m in model.named_modules()] == classes
    assert all(p is params[n] for n, p in model.named_parameters())


class ConvBN(nn.Module):
    def __init__(self, cin=3, cout=4, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, **conv_kwargs)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


# -- the basic fold, against independent oracles ----------------------------------------------------

class TestBasicFold:
    def test_conv_bn_single_layer_within_per_element_bound(self):
        model = randomise(ConvBN(bias=True)).eval()
        x = torch.randn(2, 3, 9, 9)
        fused, report = fuse(model)
        assert [(p.norm, p.layer, p.kind) for p in report.folded] == [("bn", "conv", "conv->bn")]
        conv, bn = model.conv, model.bn
        with torch.no_grad():
            # Oracle: torch's own float64 conv followed by the float64 BN definition.
            y = nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double())
            ref = (y - bn.running_mean.double()[:, None, None]) / torch.sqrt(
                bn.running_var.double()[:, None, None] + bn.eps) * bn.weight.double()[:, None, None] \
                + bn.bias.double()[:, None, None]
            scale = (bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)).abs()
            magnitude = nn.functional.conv2d(x.double().abs(), conv.weight.double().abs(),
                                             conv.bias.double().abs()) * scale[:, None, None] \
                + (bn.running_mean.double() * scale).abs()[:, None, None] + bn.bias.double().abs()[:, None, None]
            got = fused.conv(x)
        refimpl.assert_within(got, ref, refimpl.error_bound(magnitude.numpy(), 3 * 9 + 2, torch.float32),
                              "fused conv")
        assert isinstance(fused.bn, nn.Identity)

    def test_max_rel_change_matches_definition(self):
        model = randomise(ConvBN()).eval()
        fused, report = fuse(model)
        w0, w1 = model.conv.weight.detach().double(), fused.conv.weight.detach().double()
        expected = float((w1 - w0).abs().max() / w0.abs().max())
        # The report measures the float64 fold before rounding; the stored weight is rounded once,
        # which moves each |w1 - w0| by at most u |w1|: one float32 rounding of max|w1| / max|w0|.
        magnitude = float(w1.abs().max() / w0.abs().max())
        refimpl.assert_within(report.folded[0].max_rel_change, expected,
                              refimpl.error_bound(magnitude, 1, torch.float32), "max_rel_change")

    def test_inplace_false_leaves_original_untouched(self):
        model = randomise(ConvBN()).eval()
        snap = snapshot(model)
        fused, _ = fuse(model)
        assert fused is not model
        assert_unchanged(model, snap)

    def test_fuse_conv_bn_returns_same_object_and_keeps_names(self):
        model = randomise(ConvBN()).eval()
        original = copy.deepcopy(model)
        keys = set(model.state_dict())
        assert fuse_conv_bn(model) is model
        assert isinstance(model.bn, nn.Identity) and type(model) is ConvBN
        # Only the folded BN's keys go away; the conv gains a bias key.
        assert set(model.state_dict()) == {k for k in keys if not k.startswith("bn.")} | {"conv.bias"}
        assert_same_output(original, model, torch.randn(2, 3, 8, 8))

    @pytest.mark.parametrize("groups", [1, 2, 4])
    @pytest.mark.parametrize("dims", [1, 2, 3])
    def test_conv_transpose_groups(self, groups, dims):
        conv_t = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1]
        norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
        model = randomise(nn.Sequential(conv_t(4, 8, 3, stride=2, groups=groups), norm(8))).eval()
        fused, report = fuse(model)
        assert [p.kind for p in report.folded] == ["conv_transpose->bn"]
        assert_same_output(model, fused, torch.randn(2, 4, *([5] * dims)))

    def test_bn_before_conv_exact_padding_folds_zero_padding_does_not(self):
        model = randomise(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
                                        nn.BatchNorm2d(6), nn.ReLU(), nn.BatchNorm2d(6), nn.Conv2d(6, 2, 3, padding=1),
                                        nn.ReLU(), nn.BatchNorm2d(2), nn.ConvTranspose2d(2, 2, 3))).eval()
        fused, report = fuse(model)
        assert sorted((p.norm, p.layer, p.kind) for p in report.folded) == [
            ("0", "1", "bn->conv"), ("2", "1", "conv->bn")]
        assert {s.norm: s.reason for s in report.skipped} == {"4": "zero_padding", "7": "transposed_after_bn"}
        assert_same_output(model, fused, torch.randn(2, 4, 8, 8))

    def test_linear_bn_needs_rank_proof(self):
        class Head(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(6, 5)
                self.bn = nn.BatchNorm1d(5)

            def forward(self, x):
                return self.bn(self.fc(x))

        model = randomise(Head()).eval()
        _, report = fuse(model)
        assert [(s.norm, s.reason) for s in report.skipped] == [("bn", "rank_unknown")]
        x = torch.randn(4, 6)
        fused, report = fuse(model, example_inputs=x)
        assert [(p.norm, p.kind) for p in report.folded] == [("bn", "linear->bn")]
        assert_same_output(model, fused, x)

    def test_bn_dropout_linear_after_flatten(self):
        model = randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(36),
                                        nn.Dropout(0.3), nn.Linear(36, 5))).eval()
        fused, report = fuse(model)
        assert [(p.norm, p.layer, p.kind) for p in report.folded] == [("3", "5", "bn->linear")]
        assert_same_output(model, fused, torch.randn(3, 3, 5, 5))


# -- bad input, and the model left exactly as it was ------------------------------------------------

class TestErrors:
    def test_width_mismatch_names_layers_and_changes_nothing(self):
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5))
        snap = snapshot(model)
        with pytest.raises(ValueError, match=r"0 -> 1.*Conv2d.*BatchNorm2d\(5\)"):
            fuse(model, inplace=True)
        assert_unchanged(model, snap)

    @pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
    def test_bad_running_variance(self, bad):
        model = randomise(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                                        nn.BatchNorm2d(4))).eval()
        model[3].running_var[2] = bad
        snap = snapshot(model)
        with pytest.raises(ValueError, match=r"2 -> 3.*variance"):
            fuse(model, inplace=True)
        assert_unchanged(model, snap)

    def test_torchscript_rejected(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated; users still have them
            scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval())
        with pytest.raises(TypeError, match="TorchScript"):
            fuse(scripted)
        wrapper = nn.Sequential(scripted)
        with pytest.raises(TypeError, match="submodule '0' is a TorchScript"):
            fuse(wrapper)

    def test_exported_program_and_its_module_point_to_the_export_adapter(self):
        # An ExportedProgram is no nn.Module; its unlifted .module() is a GraphModule whose BatchNorm is an ATen
        # call (aten.batch_norm) and whose flag `training` says nothing about it: both go to adapters.export,
        # and the graph module is left as it was.
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        x = torch.randn(1, 3, 8, 8)
        program = torch.export.export(model, (x,))
        with pytest.raises(TypeError, match=r"ExportedProgram.*adapters\.export\.fuse"):
            fuse(program)
        unlifted = program.module()
        snap = snapshot(unlifted)
        with pytest.raises(TypeError, match=r"ATen-level fx graph.*batch_norm.*adapters\.export\.fuse"):
            fuse(unlifted, example_inputs=x)
        assert_unchanged(unlifted, snap)

    def test_lazy_rejected(self):
        model = nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4))
        with pytest.raises(ValueError, match=r"0\.weight.*LazyConv2d"):
            fuse(model)

    def test_meta_rejected(self):
        with torch.device("meta"):
            model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        with pytest.raises(ValueError, match=r"meta.*0\.weight"):
            fuse(model)

    def test_not_a_module(self):
        with pytest.raises(TypeError, match="nn.Module"):
            fuse(lambda x: x)

    def test_bad_example_inputs(self):
        with pytest.raises(TypeError, match="example_inputs"):
            fuse(ConvBN(), example_inputs={"x": 1})

    def test_example_inputs_of_the_wrong_shape_name_the_model_and_the_shapes(self):
        model = randomise(ConvBN()).eval()
        snap = snapshot(model)
        with pytest.raises(ValueError, match=r"fuse: running ConvBN on example_inputs \(tensor \(2, 5, 8, 8\) "
                                             r"float32 cpu\) raised RuntimeError: .*expected input\[2, 5, 8, 8\] to "
                                             "have 3 channels"):
            fuse(model, inplace=True, example_inputs=torch.randn(2, 5, 8, 8))
        assert_unchanged(model, snap)

    def test_failure_while_mutating_is_undone(self, monkeypatch):
        import adapters.torch.fusion as fusion

        model = randomise(nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                                        nn.BatchNorm2d(4))).eval()
        snap = snapshot(model)

        class Boom(nn.Module):
            def __init__(self):
                raise RuntimeError("boom")

        # Norm replacement comes after every weight has been swapped: the worst moment to fail.
        monkeypatch.setattr(fusion.nn, "Identity", Boom)
        with pytest.raises(RuntimeError, match="boom"):
            fuse(model, inplace=True)
        monkeypatch.undo()
        assert_unchanged(model, snap)
        assert model[0].bias is None


# -- dtype, memory format, requires_grad ------------------------------------------------------------

class TestPreservation:
    def test_channels_last_requires_grad_and_parameter_identity(self):
        model = randomise(ConvBN(bias=False)).eval().to(memory_format=torch.channels_last)
        model.conv.weight.requires_grad_(False)
        weight = model.conv.weight
        fuse(model, inplace=True)
        assert model.conv.weight is weight
        assert weight.is_contiguous(memory_format=torch.channels_last)
        assert not weight.requires_grad and not model.conv.bias.requires_grad
        assert model.conv.bias.dtype == weight.dtype

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
    def test_low_and_high_precision(self, dtype):
        model = randomise(ConvBN()).eval()
        fused, _ = fuse(copy.deepcopy(model).to(dtype))
        assert all(p.dtype == dtype for p in fused.parameters())
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            reference = model.double()(x.double())
            unfused = copy.deepcopy(model).to(dtype)(x.to(dtype))
            verdict = refimpl.compare_models(fused(x.to(dtype)), unfused, reference, dtype)
        assert verdict.ok, verdict.describe()

    def test_fp16_overflow_is_skipped_not_inf(self):
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
        with torch.no_grad():
            model[0].weight.fill_(1000.0)
            model[1].running_var.fill_(1e-4)
            model[1].weight.fill_(10.0)
        model = model.half()
        snap = snapshot(model)
        _, report = fuse(model, inplace=True)
        assert report.folded == []
        assert [(s.norm, s.reason) for s in report.skipped] == [("1", "overflow")]
        assert "float16" in report.skipped[0].detail
        assert_unchanged(model, snap)


# -- special layers and modes -----------------------------------------------------------------------

def _hook_weight_norm(module: nn.Module, **kwargs) -> nn.Module:
    """torch.nn.utils.weight_norm (the hook-based version, deprecated in favour of the parametrization)."""
    with pytest.warns(FutureWarning):
        return torch.nn.utils.weight_norm(module, **kwargs)


def _scale(norm: nn.BatchNorm2d | nn.BatchNorm1d) -> torch.Tensor:
    """s = gamma / sqrt(var + eps) per channel, in float64 (the reference's own formula)."""
    scale, _ = refimpl.bn_scale_shift(norm.running_mean.double(), norm.running_var.double(), norm.eps,
                                      norm.weight.double(), norm.bias.double())
    return scale


def _nearest(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 ``exact`` rounded to nearest in ``dtype``, ties to even, by comparing it with its neighbours there."""
    rough = exact.to(dtype)  # within one unit of the answer (it may round twice)
    inf = torch.full_like(rough, float("inf"))
    candidates = torch.stack([torch.nextafter(rough, -inf), rough, torch.nextafter(rough, inf)])
    distance = (candidates.double() - exact).abs()     # exact: neighbours within a factor of two
    even = candidates.view(torch.int16) % 2 == 0
    # Among the nearest candidates (one, or two on a tie), the one with an even last bit.
    rank = torch.where(distance == distance.min(0).values, torch.where(even, 0, 1), 2)
    return candidates.gather(0, rank.argmin(0).unsqueeze(0)).squeeze(0)


class TestWeightNorm:
    """A norm after a layer under weight_norm (one g per output channel) folds into g; the rest is refused."""

    @pytest.mark.parametrize("layer, norm, shape, dim", [
        (lambda: nn.Conv1d(3, 4, 3), nn.BatchNorm1d, (2, 3, 9), 0),
        (lambda: nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d, (2, 3, 7, 7), 0),
        (lambda: nn.Conv3d(3, 4, 2), nn.BatchNorm3d, (2, 3, 4, 4, 4), 0),
        (lambda: nn.Linear(6, 4), nn.BatchNorm1d, (5, 6), 0),
        (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2), nn.BatchNorm2d, (2, 3, 5, 5), 1),
    ], ids=["conv1d", "conv2d", "conv3d", "linear", "conv_transpose2d"])
    @pytest.mark.parametrize("style", ["parametrization", "hook"])
    def test_folds_into_g_and_keeps_the_reparametrization(self, layer, norm, shape, dim, style):
        torch.manual_seed(0)
        model = randomise(nn.Sequential(layer(), norm(4), nn.ReLU())).eval()
        if style == "parametrization":
            torch.nn.utils.parametrizations.weight_norm(model[0], dim=dim)
            g, v = model[0].parametrizations.weight.original0, model[0].parametrizations.weight.original1
        else:
            _hook_weight_norm(model[0], dim=dim)
            g, v = model[0].weight_g, model[0].weight_v
        x = torch.randn(*shape)
        fused, report = fuse(model, example_inputs=x)      # a copy: the hook-based one deep-copies too
        assert [(p.norm, p.layer) for p in report.folded] == [("1", "0")] and report.skipped == []
        assert isinstance(fused[1], nn.Identity)
        if style == "parametrization":
            assert torch.nn.utils.parametrize.is_parametrized(fused[0], "weight")
            new_g, new_v = fused[0].parametrizations.weight.original0, fused[0].parametrizations.weight.original1
        else:
            new_g, new_v = fused[0].weight_g, fused[0].weight_v
        # g' = g * s rounded once; v untouched; the original model untouched.
        s = _scale(model[1]).reshape(g.shape)
        assert torch.equal(new_g, (g.detach().double() * s).float())
        assert torch.equal(new_v, v)
        assert torch.equal(g, model[0].parametrizations.weight.original0 if style == "parametrization"
                           else model[0].weight_g)
        assert_same_output(model, fused, x)
        # Training can go on: gradients reach g and v through the kept reparametrization.
        fused.train()
        fused(x).sum().backward()
        assert new_g.grad is not None and new_v.grad is not None

    def test_hook_weight_is_recomputed_after_the_fold(self):
        model = randomise(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).eval()
        _hook_weight_norm(model[0])
        fuse(model, inplace=True)
        with torch.no_grad():
            v = model[0].weight_v
            expected = model[0].weight_g * v / torch.linalg.vector_norm(v, dim=(1, 2, 3), keepdim=True)
        torch.testing.assert_close(model[0].weight, expected, rtol=2 * 2.0**-23, atol=0.0)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_low_precision_g_rounded_once(self, dtype):
        torch.manual_seed(1)
        model = randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
        torch.nn.utils.parametrizations.weight_norm(model[0])
        half = copy.deepcopy(model).to(dtype)
        fused, report = fuse(half)
        assert len(report.folded) == 1
        g = half[0].parametrizations.weight.original0
        exact = g.detach().double() * _scale(half[1]).reshape(g.shape)
        assert torch.equal(fused[0].parametrizations.weight.original0, _nearest(exact, dtype))
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            reference = copy.deepcopy(model).double()(x.double())
            verdict = refimpl.compare_models(fused(x.to(dtype)), half(x.to(dtype)), reference, dtype)
        assert verdict.ok, verdict.describe()

    @pytest.mark.parametrize("build, detail", [
        (lambda m: torch.nn.utils.parametrizations.weight_norm(m[0], dim=1), r"weight_norm\(dim=1\)"),
        (lambda m: torch.nn.utils.parametrizations.weight_norm(m[0], dim=None), "the whole tensor"),
        (lambda m: torch.nn.utils.parametrizations.spectral_norm(m[0]), "_SpectralNorm"),
        (lambda m: _hook_weight_norm(m[0], dim=1), r"weight_norm\(dim=1\)"),
    ], ids=["dim1", "dim_none", "spectral_parametrization", "hook_dim1"])
    def test_other_reparametrizations_are_left_with_a_reason(self, build, detail):
        model = randomise(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).eval()
        build(model)
        twin = copy_model(model)
        snap = snapshot(twin)
        _, report = fuse(twin, inplace=True)
        assert [(s.norm, s.reason) for s in report.skipped] == [("1", "parametrized")]
        assert re.search(detail, report.skipped[0].detail), report.skipped[0].detail
        assert_unchanged(twin, snap)

    def test_custom_parametrization_and_grouped_transposed_conv_are_left(self):
        class Double(nn.Module):
            def forward(self, w):
                return w * 2

        model = randomise(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                                        nn.ConvTranspose2d(4, 4, 3, groups=2), nn.BatchNorm2d(4))).eval()
        torch.nn.utils.parametrize.register_parametrization(model[0], "weight", Double())
        torch.nn.utils.parametrizations.weight_norm(model[3], dim=1)
        _, report = fuse(model)
        details = {s.norm: (s.reason, s.detail) for s in report.skipped}
        assert details["1"][0] == "parametrized" and "Double" in details["1"][1]
        assert details["4"][0] == "parametrized" and "groups=2" in details["4"][1]

    def test_norm_before_a_weight_normed_layer_is_left(self):
        model = randomise(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1))).eval()
        torch.nn.utils.parametrizations.weight_norm(model[1])
        _, report = fuse(model)
        assert [(s.norm, s.reason) for s in report.skipped] == [("0", "parametrized")]
        assert "does not commute" in report.skipped[0].detail

    def test_failure_while_mutating_is_undone(self, monkeypatch):
        import adapters.torch.fusion as fusion

        model = randomise(nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))).eval()
        _hook_weight_norm(model[0])
        snap = snapshot(model)
        weight = model[0].weight

        class Boom(nn.Module):
            def __init__(self):
                raise RuntimeError("boom")

        monkeypatch.setattr(fusion.nn, "Identity", Boom)
        with pytest.raises(RuntimeError, match="boom"):
            fuse(model, inplace=True)
        monkeypatch.undo()
        assert_unchanged(model, snap)
        assert model[0].bias is None and model[0].weight is weight


class TestSpecialInputs:
    def test_quantized_neighbour_unsupported(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # quantized tensor creation is deprecated
            qconv = torch.ao.nn.quantized.Conv2d(3, 4, 1)
        model = nn.Sequential(qconv, nn.BatchNorm2d(4)).eval()
        _, report = fuse(model)
        assert [(s.norm, s.reason) for s in report.skipped] == [("1", "unsupported_layer")]

    def test_training_mode_flag_and_warning(self, caplog):
        model = randomise(ConvBN()).train()
        with caplog.at_level(logging.WARNING, logger="adapters.torch"):
            fused, report = fuse(model)
        assert report.training_mode and "training mode" in caplog.text
        assert fused.training and fused.conv.training  # flags untouched
        assert_same_output(model, fused, torch.randn(2, 3, 6, 6))
        assert model.bn.num_batches_tracked.item() == 0

    def test_norm_families(self):
        class FrozenBatchNorm2d(nn.Module):
            """torchvision's buffers-only BN, re-declared here: torchvision must not be needed."""

            def __init__(self, n):
                super().__init__()
                self.eps = 1e-5
                for name, value in (("weight", torch.ones(n)), ("bias", torch.zeros(n)),
                                    ("running_mean", torch.zeros(n)), ("running_var", torch.ones(n))):
                    self.register_buffer(name, value)

            def forward(self, x):
                scale = self.weight * (self.running_var + self.eps).rsqrt()
                return x * scale[None, :, None, None] + (self.bias - self.running_mean * scale)[None, :, None, None]

        class ShiftedBN(nn.BatchNorm2d):
            def forward(self, x):
                return super().forward(x) + 1

        model = randomise(nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4), nn.Conv2d(4, 4, 1),
                                        nn.BatchNorm2d(4, affine=False), nn.Conv2d(4, 4, 1), ShiftedBN(4),
                                        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))).eval()
        fused, report = fuse(model)
        assert sorted(p.norm for p in report.folded) == ["1", "3"]
        assert {s.norm: s.reason for s in report.skipped} == {"5": "unknown_norm", "7": "no_running_stats"}
        assert report.norms_found == 4
        assert_same_output(model, fused, torch.randn(2, 3, 4, 4))

    def test_one_norm_predicate_covers_every_norm_the_fuser_recognises(self):
        from adapters.torch.norms import classify_norm, is_norm
        from adapters.torch.suite import cases

        recognised = [nn.BatchNorm1d(2), nn.BatchNorm3d(2), nn.SyncBatchNorm(2), nn.BatchNorm2d(2, affine=False),
                      nn.BatchNorm2d(2, track_running_stats=False), cases.FrozenBatchNorm2d(2),
                      cases.BatchNormAct2d(2), cases.ShiftedBatchNorm2d(2),
                      nn.InstanceNorm2d(2, track_running_stats=True)]  # running statistics: reported
        other_norms = [nn.InstanceNorm2d(2)]
        not_norms = [nn.Conv2d(2, 2, 1), nn.GroupNorm(1, 2), nn.LayerNorm(2), nn.Identity(), nn.Linear(2, 2)]
        assert all(classify_norm(m) is not None and is_norm(m) for m in recognised)
        assert all(classify_norm(m) is None and is_norm(m) for m in other_norms)
        assert not any(is_norm(m) for m in not_norms)
        # The case suite's judge of "is a norm still there?" is this predicate.
        assert cases.is_norm_module is is_norm

    def test_eval_mode_restores_mixed_flags_after_an_error(self):
        from adapters.torch.running import eval_mode

        model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.Dropout()).train()
        model[1].eval()
        flags = [m.training for m in model.modules()]
        with pytest.raises(RuntimeError, match="inside"):
            with eval_mode(model):
                assert not any(m.training for m in model.modules())
                raise RuntimeError("inside")
        assert [m.training for m in model.modules()] == flags == [True, True, False, True]

    def test_timm_batchnorm_act_keeps_activation(self):
        timm_norm_act = pytest.importorskip("timm.layers.norm_act")
        norm = timm_norm_act.BatchNormAct2d(4, act_layer=nn.ReLU)
        model = randomise(nn.Sequential(nn.Conv2d(3, 4, 3), norm)).eval()
        fused, report = fuse(model)
        assert isinstance(fused[1], FoldedNormAct) and fused[1].act is not None
        assert isinstance(fused[1].act, nn.ReLU)
        assert [p.kind for p in report.folded] == ["conv->bn"]
        assert_same_output(model, fused, torch.randn(2, 3, 7, 7))

    def test_untraceable_parent_traceable_children(self):
        class Gate(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
                self.bn = nn.BatchNorm2d(4)

            def forward(self, x):
                y = self.body(x)
                return self.bn(y) if y.mean() > 0 else y  # data-dependent: fx cannot trace this

        model = randomise(Gate()).eval()
        fused, report = fuse(model)
        assert [(p.norm, p.layer) for p in report.folded] == [("body.1", "body.0")]
        assert [(s.norm, s.reason) for s in report.skipped] == [("bn", "untraceable")]
        assert_same_output(model, fused, torch.randn(2, 3, 4, 4))

    def test_hidden_call_found_with_example_inputs(self):
        class Hidden(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))

            def forward(self, x):
                y = self.body(x)
                if y.sum() > -1e9:  # untraceable, and calls the conv a second time directly
                    y = y + self.body[0](x)
                return y

        model = randomise(Hidden()).eval()
        x = torch.randn(2, 3, 4, 4)
        _, report = fuse(model, example_inputs=x)
        assert report.folded == []
        # The recorded run sees both calls of body.0, only one of them followed by body.1.
        assert [(s.norm, s.reason) for s in report.skipped] == [("body.1", "reused_incompatibly")]

    def test_tied_weights_not_folded(self):
        model = randomise(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1))).eval()
        model[2].weight = model[0].weight
        fused, report = fuse(model)
        assert [(s.norm, s.reason) for s in report.skipped] == [("1", "reused_incompatibly")]
        assert_same_output(model, fused, torch.randn(2, 3, 4, 4))


# -- the report ----------------------------------------------------------------------------------

class TestReport:
    def test_table_and_dict(self):
        model = randomise(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))).train()
        _, report = fuse(model)
        assert isinstance(report, FusionReport)
        text = report.table()
        assert str(report) == text
        lines = text.splitlines()
        assert lines[0].split() == ["norm", "layer", "kind", "max", "rel", "change"]
        assert any(line.split()[:3] == ["1", "0", "conv->bn"] for line in lines)
        assert any(line.split()[:2] == ["3", "no_fusable_neighbour"] for line in lines)
        assert "1 of 2 norm layer(s) folded" in lines[-1] and "training mode" in lines[-1]
        data = json.loads(json.dumps(report.to_dict()))
        assert data["folded"][0] == {"norm": "1", "layer": "0", "kind": "conv->bn",
                                     "max_rel_change": report.folded[0].max_rel_change, "note": ""}
        assert data["skipped"][0]["reason"] == "no_fusable_neighbour"
        assert data["training_mode"] is True and data["norms_found"] == 2

    def test_every_skip_reason_is_a_known_code(self):
        model = randomise(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                        nn.BatchNorm2d(4))).eval()
        _, report = fuse(model)
        assert all(s.reason in REASONS and s.detail for s in report.skipped)


# -- weights rewritten in their own storage ---------------------------------------------------------

class TestInPlaceWeights:
    def test_weight_sharing_storage_with_another_layer_is_not_rewritten_in_place(self):
        # Two convs whose distinct Parameters share one storage: folding conv_a's BN must not
        # change conv_b (a fuser that scales conv_a's storage in place would).
        model = randomise(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1)))
        shared = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            shared.weight = nn.Parameter(model[0].weight.data)   # same storage, another Parameter
            shared.bias = nn.Parameter(torch.zeros(4))
        holder = nn.ModuleDict({"net": model, "other": shared}).eval()  # no forward: each child is traced
        other_before = shared.weight.detach().clone()
        x = torch.randn(2, 3, 5, 5)
        expected = holder["net"](x)
        _, report = fuse(holder, inplace=True)
        assert [(p.norm, p.layer) for p in report.folded] == [("net.1", "net.0")]
        assert torch.equal(shared.weight.detach(), other_before)
        reference = expected.double()
        verdict = refimpl.compare_models(holder["net"](x), expected, reference, torch.float32)
        assert verdict.ok, verdict.describe()

    def test_weight_that_views_a_larger_storage_is_copied(self):
        model = randomise(ConvBN(bias=False)).eval()
        flat = torch.randn(model.conv.weight.numel() + 7)
        with torch.no_grad():
            model.conv.weight = nn.Parameter(flat[7:].view_as(model.conv.weight))
        before = flat.clone()
        original = copy.deepcopy(model)
        fuse(model, inplace=True)
        assert torch.equal(flat, before), "the surrounding storage was written"
        assert_same_output(original, model, torch.randn(2, 3, 6, 6))

    def test_in_place_rewrite_keeps_parameter_and_storage(self):
        model = randomise(ConvBN(bias=False)).eval()
        weight = model.conv.weight
        pointer = weight.data_ptr()
        original = copy.deepcopy(model)
        fuse(model, inplace=True)
        assert model.conv.weight is weight and weight.data_ptr() == pointer
        assert_same_output(original, model, torch.randn(2, 3, 6, 6))


# -- timm's TensorFlow-'SAME' conv (recognised by name, timm not required) --------------------------

class TestSamePaddedConv:
    def test_bn_after_same_padded_conv_folds(self):
        model = randomise(nn.Sequential(Conv2dSame(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU())).eval()
        fused, report = fuse(model)
        assert [(p.norm, p.layer, p.kind) for p in report.folded] == [("1", "0", "conv->bn")]
        assert isinstance(fused[0], Conv2dSame)
        assert_same_output(model, fused, torch.randn(2, 3, 7, 9))

    def test_bn_before_same_padded_conv_meets_zero_padding(self):
        model = randomise(nn.Sequential(nn.BatchNorm2d(3), Conv2dSame(3, 4, 3))).eval()
        _, report = fuse(model)
        assert not report.folded
        assert [(s.norm, s.reason) for s in report.skipped] == [("0", "zero_padding")]
        assert "'SAME' padding" in report.skipped[0].detail

    def test_bn_before_same_padded_1x1_conv_folds(self):
        model = randomise(nn.Sequential(nn.BatchNorm2d(3), Conv2dSame(3, 4, 1, stride=2))).eval()
        fused, report = fuse(model)
        assert [(p.norm, p.kind) for p in report.folded] == [("0", "bn->conv")]
        assert_same_output(model, fused, torch.randn(2, 3, 7, 9))

    def test_other_conv_subclasses_with_own_forward_stay_unsupported(self):
        class Standardised(nn.Conv2d):  # weight standardisation: not linear in the weight
            def forward(self, x):
                w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3),
                                                                                             keepdim=True)
                return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)

        model = randomise(nn.Sequential(Standardised(3, 4, 3), nn.BatchNorm2d(4))).eval()
        _, report = fuse(model)
        assert [(s.norm, s.reason) for s in report.skipped] == [("1", "unsupported_layer")]


# -- linear -> x.flatten(0, k) -> BatchNorm1d (LeViT's LinearNorm) ----------------------------------

class LinearNorm(nn.Module):
    """As timm's LeViT: a linear layer over tokens whose features are normalised per (token, sample)."""

    def __init__(self, cin=6, cout=5):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class TestLinearFlattenNorm:
    def test_folds_when_example_inputs_prove_the_norm_input_2d(self):
        model = randomise(LinearNorm()).eval()
        x = torch.randn(2, 7, 6)
        fused, report = fuse(model, example_inputs=x)
        assert [(p.norm, p.layer, p.kind) for p in report.folded] == [("bn", "linear", "linear->bn")]
        assert isinstance(fused.bn, nn.Identity)
        assert_same_output(model, fused, x)

    def test_without_example_inputs_the_rank_is_unknown(self):
        model = randomise(LinearNorm()).eval()
        _, report = fuse(model)
        assert not report.folded
        assert [(s.norm, s.reason) for s in report.skipped] == [("bn", "rank_unknown")]

    def test_flatten_that_keeps_a_middle_axis_is_not_folded(self):
        # 4-D tokens flattened to 3-D: BatchNorm1d then normalises axis 1 (not the features), even
        # when the sizes happen to match.
        class Flatten3d(LinearNorm):
            def __init__(self):
                super().__init__(6, 3)

        model = randomise(Flatten3d()).eval()
        x = torch.randn(2, 4, 3, 6)      # linear -> (2, 4, 3, 3); flatten(0, 1) -> (8, 3, 3): 3-D
        _, report = fuse(model, example_inputs=x)
        assert not report.folded
        assert [(s.norm, s.reason) for s in report.skipped] == [("bn", "rank_unknown")]

    def test_conv_output_flattened_is_not_folded(self):
        class ConvFlatNorm(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv1d(3, 4, 1)
                self.bn = nn.BatchNorm1d(4)

            def forward(self, x):
                y = self.conv(x)               # (N, 4, L) with L == 4: flatten(0, 1) -> (4N, 4)
                return self.bn(y.flatten(0, 1))

        model = randomise(ConvFlatNorm()).eval()
        _, report = fuse(model, example_inputs=torch.randn(2, 3, 4))
        assert not report.folded
        assert [(s.norm, s.reason) for s in report.skipped] == [("bn", "no_fusable_neighbour")]


# -- a norm after a channel concat of conv outputs (MixNet's MixedConv2d) --------------------------

class MixedConv(nn.Module):
    """split -> a 3x3 conv (no bias) and a grouped 5x5 conv of other widths -> cat(dim=1) -> norm -> ReLU."""

    def __init__(self, norm: nn.Module | None = None):
        super().__init__()
        self.c3 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.c5 = nn.Conv2d(4, 10, 5, padding=2, groups=2)
        self.bn = norm if norm is not None else nn.BatchNorm2d(16)

    def branches(self, x):
        a, b = torch.split(x, 4, dim=1)
        return [self.c3(a), self.c5(b)]

    def forward(self, x):
        return torch.relu(self.bn(torch.cat(self.branches(x), dim=1)))


class TestConcatFold:
    def test_mixed_conv_folds_each_slice(self):
        model = randomise(MixedConv()).eval()
        original = copy.deepcopy(model)
        fused, report = fuse(model)
        assert isinstance(fused.bn, nn.Identity)
        assert sorted((p.norm, p.layer, p.kind) for p in report.folded) == [("bn", "c3", "conv->bn"),
                                                                              ("bn", "c5", "conv->bn")]
        assert not report.skipped
        # Independent check of the slice placement: conv_i's output channels are BN channels [o_i, o_i + n_i).
        # The float64 reference is computed in float64 from the float32 parameters.
        bn = original.bn
        gamma, beta = bn.weight.detach().double(), bn.bias.detach().double()
        mean, var = bn.running_mean.double(), bn.running_var.double()
        scale = gamma / torch.sqrt(var + bn.eps)
        shift = beta - mean * scale
        c5_bias = original.c5.bias.detach().double()
        expected_bias_c3 = shift[:6]
        expected_bias_c5 = c5_bias * scale[6:] + shift[6:]
        shift_magnitude = beta.abs() + mean.abs() * scale.abs()
        # Folded in float64 and rounded once to float32: the fold's 7 roundings, within the error model.
        refimpl.assert_within(fused.c3.bias.detach(), expected_bias_c3,
                              refimpl.error_bound(shift_magnitude[:6].numpy(), 7, torch.float32), "c3 bias")
        refimpl.assert_within(fused.c5.bias.detach(), expected_bias_c5,
                              refimpl.error_bound((c5_bias.abs() * scale[6:].abs() + shift_magnitude[6:]).numpy(), 7,
                                                  torch.float32), "c5 bias")
        assert_same_output(original, fused, torch.randn(2, 8, 9, 9))

    def test_concat_keyword_dim_and_transposed_conv(self):
        class Up(nn.Module):
            def __init__(self):
                super().__init__()
                self.up = nn.ConvTranspose2d(3, 4, 2, stride=2, groups=1)
                self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
                self.bn = nn.BatchNorm2d(9)

            def forward(self, x, y):
                return self.bn(torch.concat([self.up(x), self.conv(y)], dim=1))

        model = randomise(Up()).eval()
        fused, report = fuse(model)
        assert sorted((p.layer, p.kind) for p in report.folded) == [("conv", "conv->bn"),
                                                                     ("up", "conv_transpose->bn")]
        x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            reference = copy.deepcopy(model).double()(x.double(), y.double())
            verdict = refimpl.compare_models(fused(x, y), model(x, y), reference, torch.float32)
        assert verdict.ok, verdict.describe()

    def test_batchnorm_act_after_concat_keeps_activation(self):
        from adapters.torch.suite.cases import BatchNormAct2d
        model = randomise(MixedConv(BatchNormAct2d(16, act_layer=nn.SiLU))).eval()
        fused, report = fuse(model)
        assert isinstance(fused.bn, FoldedNormAct) and isinstance(fused.bn.act, nn.SiLU)
        assert sorted(p.layer for p in report.folded) == ["c3", "c5"]
        assert_same_output(model, fused, torch.randn(2, 8, 6, 6))

    def test_conv_with_norm_before_and_concat_after(self):
        # bn0 -> 1x1 conv (backward fold) and conv -> cat -> bn (a channel slice of bn): both in one layer.
        class Both(nn.Module):
            def __init__(self):
                super().__init__()
                self.bn0 = nn.BatchNorm2d(3)
                self.c1 = nn.Conv2d(3, 5, 1)
                self.c2 = nn.Conv2d(3, 2, 3, padding=1)
                self.bn = nn.BatchNorm2d(7)

            def forward(self, x):
                return self.bn(torch.cat([self.c2(x), self.c1(self.bn0(x))], 1))

        model = randomise(Both()).eval()
        fused, report = fuse(model)
        assert sorted((p.norm, p.layer, p.kind) for p in report.folded) == [
            ("bn", "c1", "conv->bn"), ("bn", "c2", "conv->bn"), ("bn0", "c1", "bn->conv")]
        assert_same_output(model, fused, torch.randn(2, 3, 5, 5))

    @pytest.mark.parametrize("other", ["input", "relu"])
    def test_input_that_is_not_a_conv_output(self, other):
        class Partial(MixedConv):
            def forward(self, x):
                a, b = torch.split(x, 4, dim=1)
                first = torch.relu(a) if other == "relu" else a
                first = torch.cat([first, first[:, :2]], 1)
                return self.bn(torch.cat([first, self.c5(b)], 1))

        model = randomise(Partial()).eval()
        fused, report = fuse(model)
        assert not report.folded
        assert [(s.norm, s.reason) for s in report.skipped] == [("bn", "no_fusable_neighbour")]
        assert isinstance(fused.bn, nn.BatchNorm2d)
        assert_same_output(model, fused, torch.randn(2, 8, 6, 6))

    def test_conv_output_used_elsewhere(self):
        class Leaky(MixedConv):
            def forward(self, x):
                a3, a5 = self.branches(x)
                return self.bn(torch.cat([a3, a5], 1)), a3.mean()

        model = randomise(Leaky()).eval()
        fused, report = fuse(model)
        assert not report.folded
        assert [(s.norm, s.reason) for s in report.skipped] == [("bn", "output_used_elsewhere")]

    def test_concat_output_used_elsewhere(self):
        class Leaky(MixedConv):
            def forward(self, x):
                y = torch.cat(self.branches(x), 1)
                return self.bn(y) + y

        model = randomise(Leaky()).eval()
        _, report = fuse(model)
        assert not report.folded
        assert [(s.norm, s.reason) for s in report.skipped] == [("bn", "output_used_elsewhere")]

    def test_concat_along_another_dim(self):
        class Rows(MixedConv):
            def __init__(self):
                super().__init__(nn.BatchNorm2d(6))
                self.c5 = nn.Conv2d(4, 6, 5, padding=2)

            def forward(self, x):
                return self.bn(torch.cat(self.branches(x), dim=2))

        model = randomise(Rows()).eval()
        fused, report = fuse(model)
        assert not report.folded
        assert [(s.norm, s.reason) for s in report.skipped] == [("bn", "no_fusable_neighbour")]
        assert_same_output(model, fused, torch.randn(2, 8, 6, 6))

    def test_conv_reused_with_another_norm(self):
        class Reused(MixedConv):
            def __init__(self):
                super().__init__()
                self.bn_other = nn.BatchNorm2d(6)

            def forward(self, x):
                a, b = torch.split(x, 4, dim=1)
                return self.bn(torch.cat([self.c3(a), self.c5(b)], 1)), self.bn_other(self.c3(b))

        model = randomise(Reused()).eval()
        fused, report = fuse(model)
        assert not report.folded
        assert {s.norm: s.reason for s in report.skipped} == {"bn": "reused_incompatibly",
                                                              "bn_other": "reused_incompatibly"}
        x = torch.randn(2, 8, 6, 6)
        with torch.no_grad():
            for got, want in zip(fused(x), model(x), strict=True):
                assert torch.equal(got, want)  # nothing folded: the same computation

    def test_norm_called_after_concat_and_elsewhere(self):
        class Twice(MixedConv):
            def forward(self, x):
                return self.bn(torch.cat(self.branches(x), 1)), self.bn(torch.cat([x, x], 1))

        model = randomise(Twice()).eval()
        fused, report = fuse(model)
        assert not report.folded
        assert [(s.norm, s.reason) for s in report.skipped] == [("bn", "reused_incompatibly")]
        assert isinstance(fused.bn, nn.BatchNorm2d)


@pytest.mark.parametrize("hooked", ["conv_forward", "conv_pre", "bn_forward", "identity_forward"])
def test_a_layer_with_forward_hooks_is_no_fold_partner(hooked):
    """A hook may change what a layer takes or returns (here: doubles it); folding the BN into the conv (or passing
    through a hooked Identity between them) would bypass it. The BN is left, and the output
    is the original's exactly: the fused model runs the same modules with the same weights."""
    from adapters.torch import reparameterize
    from adapters.torch.suite.cases import count_norm_calls

    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Identity(), nn.BatchNorm2d(4),
                                    nn.Conv2d(4, 2, 3, padding=1))).eval()  # zero padding: no bn->conv fold either
    layer = {"conv_forward": model[0], "conv_pre": model[0], "bn_forward": model[2],
             "identity_forward": model[1]}[hooked]

    def double(module, *args):
        return (args[0][0] * 2,) if hooked == "conv_pre" else args[-1] * 2
    if hooked == "conv_pre":
        layer.register_forward_pre_hook(double)
    else:
        layer.register_forward_hook(double)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    for run in (fuse, reparameterize):
        fused, report = run(model, example_inputs=x)
        assert [s.norm for s in report.skipped] == ["2"], report
        assert count_norm_calls(fused, x) == 1
        with torch.no_grad():
            assert torch.equal(fused(x), model(x))

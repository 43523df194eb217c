"""adapters.torch.verify: passes correct fused models, names the first diverging layer of broken ones.

The broken fused models are built by hand from the original's layers with ``refimpl``'s fold
functions and then damaged in one known place, so the layer verify must name is known
independently of the code under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adapters.torch.checking import ModelRunError, verify
from refimpl import MODEL_RATIO, fold_bn_conv, fold_conv_bn


@pytest.fixture(autouse=True)
def seeded_weights():
    # Layer constructors draw from the global RNG: seed it per test (and restore it after), so each
    # test's models are the same whatever ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def _randomize(bn: nn.BatchNorm2d, generator: torch.Generator) -> None:
    # Non-trivial statistics, so that a fold is never a near no-op and a wrong one shows.
    width = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.empty(width).uniform_(-1, 1, generator=generator))
        bn.running_var.copy_(torch.empty(width).uniform_(0.5, 2.0, generator=generator))
        bn.weight.copy_(torch.empty(width).uniform_(0.5, 1.5, generator=generator))
        bn.bias.copy_(torch.empty(width).uniform_(-1, 1, generator=generator))


def _stats(bn: nn.BatchNorm2d) -> tuple:
    return (bn.running_mean.double(), bn.running_var.double(), bn.eps, bn.weight.double(), bn.bias.double())


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d, *, before: bool = False) -> nn.Conv2d:
    """``conv`` with ``bn`` folded in (``before``: the BN runs before the conv), via refimpl, in float64."""
    bias = None if conv.bias is None else conv.bias.double()
    if before:
        weight, new_bias = fold_bn_conv(conv.weight.double(), bias, *_stats(bn), groups=conv.groups)
    else:
        weight, new_bias = fold_conv_bn(conv.weight.double(), bias, *_stats(bn), groups=conv.groups)
    folded = copy.deepcopy(conv)
    folded.bias = nn.Parameter(torch.empty(conv.out_channels, dtype=conv.weight.dtype))
    with torch.no_grad():
        folded.weight.copy_(weight)
        folded.bias.copy_(new_bias)
    return folded


class Chain(nn.Module):
    """stem (conv | bn, relu) split across two Sequentials, a conv-bn-relu block, a head returning a tuple."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False))
        self.stem_norm = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem_norm(self.stem(x))
        y = self.act(self.bn(self.conv(x))) + x
        return self.fc(self.pool(y).flatten(1)), y


class PreNorm(nn.Module):
    """conv -> relu -> bn -> conv(zero padding) -> relu: the BN cannot be folded into the padded conv."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 6, 3)
        self.act0 = nn.ReLU()
        self.bn = nn.BatchNorm2d(6)
        self.conv1 = nn.Conv2d(6, 4, 3, padding=1)
        self.act1 = nn.Tanh()

    def forward(self, x):
        return self.act1(self.conv1(self.bn(self.act0(self.conv0(x)))))


@pytest.fixture
def chain():
    generator = torch.Generator().manual_seed(1)
    model = Chain().eval()
    _randomize(model.stem_norm[0], generator)
    _randomize(model.bn, generator)
    return model


def _fuse_chain(model: Chain) -> Chain:
    fused = copy.deepcopy(model)
    fused.stem[0] = _folded_conv(model.stem[0], model.stem_norm[0])
    fused.stem_norm[0] = nn.Identity()
    fused.conv = _folded_conv(model.conv, model.bn)
    fused.bn = nn.Identity()
    return fused


def _input(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(2))


class TestVerify:
    def test_correct_fold_passes_across_sequential_boundary(self, chain):
        # stem (a Sequential ending in the folded conv) legitimately changes; it must not be blamed.
        verdict = verify(chain, _fuse_chain(chain), _input(2, 3, 12, 12))
        assert verdict.ok, str(verdict)
        assert verdict.first_divergence is None
        assert [o.path for o in verdict.outputs] == ["output[0]", "output[1]"]
        assert verdict.ratio <= MODEL_RATIO
        assert verdict.layers_compared >= 4  # stem_norm, its relu, act, pool at least

    def test_wrong_channel_scale_names_the_next_layer(self, chain):
        fused = _fuse_chain(chain)
        with torch.no_grad():
            fused.conv.weight[3] *= 1.01  # one output channel scaled wrongly
        verdict = verify(chain, fused, _input(2, 3, 12, 12))
        assert not verdict.ok
        assert verdict.first_divergence.module == "act"
        assert "conv" in verdict.first_divergence.suspects
        assert verdict.ratio > MODEL_RATIO
        assert "first diverging layer: act" in str(verdict)

    def test_dropped_activation_is_named(self, chain):
        fused = _fuse_chain(chain)
        fused.act = nn.Identity()
        verdict = verify(chain, fused, _input(2, 3, 12, 12))
        assert not verdict.ok
        assert verdict.first_divergence.module == "act"

    def test_dropped_activation_inside_sequential_is_named(self, chain):
        fused = _fuse_chain(chain)
        fused.stem_norm[1] = nn.Identity()
        verdict = verify(chain, fused, _input(2, 3, 12, 12))
        assert verdict.first_divergence.module == "stem_norm.1"

    def test_bn_folded_across_zero_padding_fails(self):
        generator = torch.Generator().manual_seed(3)
        model = PreNorm().eval()
        _randomize(model.bn, generator)
        x = _input(2, 3, 10, 10)
        fused = copy.deepcopy(model)
        # What a registration-order fuser does: fold bn into the conv after it, ignoring its zero padding.
        fused.conv1 = _folded_conv(model.conv1, model.bn, before=True)
        fused.bn = nn.Identity()
        verdict = verify(model, fused, x)
        assert not verdict.ok
        assert verdict.first_divergence.module == "act1"
        assert verdict.first_divergence.suspects == ("bn", "conv1")
        # The same fold is exact when the conv does not pad: verify accepts it.
        exact = copy.deepcopy(model)
        exact.conv1.padding = (0, 0)
        exact_fused = copy.deepcopy(exact)
        exact_fused.conv1 = _folded_conv(exact.conv1, exact.bn, before=True)
        exact_fused.bn = nn.Identity()
        assert verify(exact, exact_fused, x).ok

    def test_dict_outputs(self):
        class Heads(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 1)
                self.bn = nn.BatchNorm2d(4)
                self.act = nn.SiLU()

            def forward(self, x):
                y = self.bn(self.conv(x))
                return {"features": y, "activated": self.act(y), "argmax": y.argmax(1)}

        model = Heads().eval()
        _randomize(model.bn, torch.Generator().manual_seed(4))
        fused = copy.deepcopy(model)
        fused.conv = _folded_conv(model.conv, model.bn)
        fused.bn = nn.Identity()
        verdict = verify(model, fused, _input(2, 3, 5, 5))
        assert verdict.ok, str(verdict)
        assert {o.path for o in verdict.outputs} == {"output['features']", "output['activated']"}
        assert any("argmax" in note for note in verdict.notes)
        broken = copy.deepcopy(fused)
        with torch.no_grad():
            broken.conv.bias[0] += 0.5
        bad = verify(model, broken, _input(2, 3, 5, 5))
        assert not bad.ok and bad.first_divergence.module == "act"

    def test_output_structure_mismatch_fails(self, chain):
        fused = _fuse_chain(chain)
        fused.forward = lambda x: Chain.forward(fused, x)[0]
        verdict = verify(chain, fused, _input(1, 3, 8, 8))
        assert not verdict.ok
        assert "output structure differs" in verdict.outputs[0].detail

    def test_does_not_modify_either_model(self, chain):
        chain.train()
        chain.stem[0].weight.requires_grad_(False)
        fused = _fuse_chain(chain)
        before = {k: v.clone() for k, v in chain.state_dict().items()}
        fused_before = {k: v.clone() for k, v in fused.state_dict().items()}
        verdict = verify(chain, fused, _input(4, 3, 8, 8))
        assert verdict.ok, str(verdict)  # run in eval mode: the running statistics are used
        assert all(m.training for m in chain.modules()) and all(m.training for m in fused.modules())
        # A training-mode forward would have updated the running statistics.
        assert all(torch.equal(before[k], v) for k, v in chain.state_dict().items())
        assert all(torch.equal(fused_before[k], v) for k, v in fused.state_dict().items())
        assert not chain.stem[0].weight.requires_grad and chain.conv.weight.requires_grad
        assert all(not m._forward_hooks for m in [*chain.modules(), *fused.modules()])
        assert next(chain.parameters()).dtype == torch.float32

    def test_torch_fx_graph_module(self):
        from torch.fx.experimental.optimization import fuse

        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                              nn.BatchNorm2d(4)).eval()
        generator = torch.Generator().manual_seed(5)
        _randomize(model[1], generator)
        _randomize(model[4], generator)
        verdict = verify(model, fuse(model), _input(2, 3, 9, 9))
        assert verdict.ok, str(verdict)
        assert verdict.layers_compared >= 1  # the ReLU, under the same name in the GraphModule

    def test_plain_data_and_text(self, chain):
        verdict = verify(chain, _fuse_chain(chain), _input(1, 3, 8, 8))
        data = verdict.to_dict()
        assert data["ok"] is True and data["dtype"] == "float32"
        assert data["ratio"] == verdict.ratio and data["max_abs_error"] == verdict.max_abs_error
        import json
        assert json.loads(json.dumps(data)) == data
        assert str(verdict).startswith("OK: fused model vs float64 reference (float32)")

    def test_bfloat16_models(self, chain):
        model = chain.to(torch.bfloat16)
        fused = _fuse_chain(chain)
        x = _input(2, 3, 8, 8).to(torch.bfloat16)
        assert verify(model, fused, x).ok
        with torch.no_grad():
            # Channel 2 is live on this input (0 is cut by the ReLU). Doubling it puts the output ~10 bf16
            # units off; a 25% error (~2.5 units) sits at the edge of the error model, which admits 4x
            # the error of the original with every parameter rounded once more (2-5e-3 here).
            fused.conv.weight[2] *= 2.0
        assert not verify(model, fused, x).ok

    def test_bad_arguments(self, chain):
        with pytest.raises(TypeError, match="fused must be an nn.Module"):
            verify(chain, lambda x: x, _input(1, 3, 8, 8))
        with pytest.raises(ValueError, match="pass example_inputs"):
            verify(chain, chain)

    def test_fused_model_crash_is_attributed(self, chain):
        fused = _fuse_chain(chain)
        fused.fc = nn.Linear(7, 5)  # wrong width: the fused model cannot run
        with pytest.raises(ModelRunError, match=r"running the fused model \(Chain\) on \(tensor \(1, 3, 8, 8\) "
                                                r"float32 cpu\) raised RuntimeError") as info:
            verify(chain, fused, _input(1, 3, 8, 8))
        assert info.value.which == "fused"

    def test_inputs_of_the_wrong_shape_name_the_model_and_the_shapes(self, chain):
        with pytest.raises(ModelRunError, match=r"running the float64 reference copy of the original model \(Chain\) "
                                                r"on \(tensor \(1, 5, 8, 8\) float64 cpu\) raised RuntimeError"):
            verify(chain, _fuse_chain(chain), _input(1, 5, 8, 8))

    def test_meta_tensors_give_one_clear_error(self, chain):
        on_meta = copy.deepcopy(chain).to("meta")
        with pytest.raises(ValueError, match=r"the fused model \(Chain\) has tensors on the meta device.*"
                                             r"shape \(\d+, 3, 3, 3\)"):
            verify(chain, on_meta, _input(1, 3, 8, 8))
        with pytest.raises(ValueError, match=r"the original model \(Chain\) has tensors on the meta device"):
            verify(on_meta, chain, _input(1, 3, 8, 8))
        with pytest.raises(ValueError, match=r"inputs \(tensor \(1, 3, 8, 8\) float32 meta\) include tensors on "
                                             "the meta device"):
            verify(chain, chain, _input(1, 3, 8, 8).to("meta"))

    def test_several_inputs_as_one_tuple_and_the_old_form_deprecated(self):
        class Two(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 1)

            def forward(self, a, b):
                return self.conv(a) + self.conv(b)

        model = Two().eval()
        a, b = _input(1, 3, 4, 4), _input(1, 3, 4, 4)
        assert verify(model, model, (a, b)).ok
        assert verify(model, model, example_inputs=[a, b]).ok
        with pytest.warns(DeprecationWarning, match="pass several inputs as one tuple"):
            assert verify(model, model, a, b).ok



@pytest.mark.parametrize("name", ["conv_bn_bn", "conv_transpose2d_groups_bn", "flatten_linear_bn1d",
                                  "bn_conv2d_pad_reflect", "reid_bn_dropout_linear", "frozen_bn",
                                  "trap_split_sequential", "trap_bn_shared_by_two_convs", "trap_modulelist_loop",
                                  "trap_residual_bn_before_conv"])
def test_passes_our_fused_models(name):
    from adapters.torch import fuse
    from adapters.torch.suite import cases

    case = cases.get_case(name)
    model, x = case.build(), case.make_input()
    fused, report = fuse(model, example_inputs=x)
    assert report.folded, "the case folds something, so the comparison is not trivial"
    verdict = verify(model, fused, x)
    assert verdict.ok, str(verdict)
    assert verdict.first_divergence is None


def test_rounded_copy_perturbs_every_parameter_by_at_most_one_rounding():
    from adapters.torch.checking import rounded_copy

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).half()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    copied = rounded_copy(model, seed=0)
    u = 2.0**-11
    changed = 0
    for (name, before), after in zip(model.state_dict().items(), copied.state_dict().values(), strict=True):
        if not before.is_floating_point():
            assert torch.equal(before, after), name
            continue
        before64, after64 = before.double(), after.double()
        # |x(1 + d)| rounded to fp16: at most u from the product, which is at most u from x.
        assert bool(((after64 - before64).abs() <= 2 * u * before64.abs() + 2.0**-24).all()), name
        changed += int((after64 != before64).sum())
    assert changed > 0
    assert copied is not model and model[0].weight.dtype == torch.float16


class _Mixed(nn.Module):
    """timm's MixedConv2d in miniature: a container returning torch.cat of its convs' outputs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 5, 1, bias=False)

    def forward(self, x):
        left, right = torch.split(x, 2, dim=1)
        return torch.cat([self.a(left), self.b(right)], 1)


class _MixedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixed = _Mixed()
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.mixed(x)))


def _fold_mixed(block: _MixedBlock, damage: bool = False) -> _MixedBlock:
    fused = copy.deepcopy(block)
    stats = _stats(block.bn)
    for conv, start, stop in ((fused.mixed.a, 0, 3), (fused.mixed.b, 3, 8)):
        part = [t[start:stop] if isinstance(t, torch.Tensor) else t for t in stats]
        bias = None if conv.bias is None else conv.bias.double()
        w, b = fold_conv_bn(conv.weight.double(), bias, *part)
        if damage and conv is fused.mixed.b:
            w = w * 1.01
        conv.weight.data = w.float()
        conv.bias = nn.Parameter(b.float())
    fused.bn = nn.Identity()
    return fused


class TestVerifyConcat:
    def test_container_returning_cat_of_folded_convs_is_not_blamed(self):
        block = _MixedBlock().eval()
        _randomize(block.bn, torch.Generator().manual_seed(1))
        verdict = verify(block, _fold_mixed(block), _input(2, 4, 6, 6))
        assert verdict.ok, str(verdict)
        assert verdict.first_divergence is None
        assert "mixed" not in verdict.layers_not_compared

    def test_wrong_slice_is_caught_after_the_cat(self):
        block = _MixedBlock().eval()
        _randomize(block.bn, torch.Generator().manual_seed(1))
        verdict = verify(block, _fold_mixed(block, damage=True), _input(2, 4, 6, 6))
        assert not verdict.ok
        assert verdict.first_divergence is not None and verdict.first_divergence.module == "act"


def test_the_children_of_a_norm_folded_into_the_next_layer_are_not_compared():
    """A BatchNorm+act module (timm's BatchNormAct2d, no activation) after something that is not a conv folds
    *forward* into the 1x1 conv after it (bn->conv): its ``drop``/``act`` children then see the un-normalised
    input. They change with folding like the norm itself, so they must not be reported as a divergence."""
    from adapters.torch import fuse
    from adapters.torch.suite.cases import BatchNormAct2d, randomize_norm_stats, randomize_parameters

    model = nn.Sequential(nn.MaxPool2d(2), BatchNormAct2d(4, apply_act=False), nn.Conv2d(4, 3, 1))
    generator = torch.Generator().manual_seed(0)
    randomize_parameters(model, generator)
    randomize_norm_stats(model, generator)
    model.eval()
    x = _input(2, 4, 8, 8)
    fused, report = fuse(model, example_inputs=x)
    assert [(p.norm, p.kind) for p in report.folded] == [("1", "bn->conv")]
    verdict = verify(model, fused, x)
    assert verdict.ok, str(verdict)
    assert verdict.first_divergence is None

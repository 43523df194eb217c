"""Real networks folded end to end: every torchvision and timm entry of :mod:`adapters.torch.suite.zoo`.

For each entry the fused network must

* match the original within the project's error model for whole networks
  (:func:`refimpl.compare_models`: fused fp32 vs the float64 run of the original, relative to the
  original's own fp32 error);
* leave exactly the hand-derived number of norm evaluations (the derivations are in ``zoo.py``),
  each reported with the expected reason;
* have folded only pairs that are real dataflow edges of the original (checked here independently
  with forward hooks: the norm's input tensor *is* the layer's output tensor);
* keep its class, every module name and every state_dict key, and leave the original untouched.

Inputs are 2 x 3 x 64 x 64, so the whole file runs in well under a minute on two cores.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from adapters.torch import FusionReport, fuse, fuse_conv_bn
from adapters.torch.suite.cases import count_norm_calls, is_norm_module
from adapters.torch.suite.zoo import ZOO, ZooEntry, build
from refimpl import compare_models

pytestmark = pytest.mark.zoo


@dataclass
class Built:
    """One zoo entry, built once per module, with the runs of the original every test shares."""

    entry: ZooEntry
    model: nn.Module
    inputs: torch.Tensor
    reference: torch.Tensor                  # the original in float64
    unfused: torch.Tensor                    # the original in float32
    largest_activation: dict[str, float]     # per module, max |output| of the float64 run
    outputs: dict[str, list[torch.Tensor]]   # conv/linear outputs of the float32 run, per call
    norm_inputs: dict[str, list[torch.Tensor]]  # norm inputs of the float32 run, per call


@dataclass
class Folded:
    built: Built
    state_before: dict[str, torch.Tensor]
    fused: nn.Module
    report: FusionReport

    @property
    def entry(self) -> ZooEntry:
        return self.built.entry

    @property
    def model(self) -> nn.Module:
        return self.built.model


def _run_recording(model: nn.Module, inputs: torch.Tensor, record) -> torch.Tensor:
    """``model(inputs)`` without grad, with ``record(name, module, args, output)`` hooked on every module."""
    handles = [module.register_forward_hook(lambda m, args, out, name=name: record(name, m, args, out))
               for name, module in model.named_modules()]
    try:
        with torch.no_grad():
            return model(inputs)
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module", params=sorted(ZOO))
def built(request) -> Built:
    entry = ZOO[request.param]
    pytest.importorskip(entry.library)
    model, inputs = entry.build(seed=0), entry.example_input(batch=2)

    largest: dict[str, float] = {}

    def record_largest(name, module, args, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            largest[name] = max(largest.get(name, 0.0), float(output.abs().max()))

    reference = _run_recording(copy.deepcopy(model).double(), inputs.double(), record_largest)

    outputs: dict[str, list[torch.Tensor]] = {}
    norm_inputs: dict[str, list[torch.Tensor]] = {}

    def record_edges(name, module, args, output):
        # The tensors themselves are kept (not their ids), so no id can be reused during the run.
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            outputs.setdefault(name, []).append(output)
        elif is_norm_module(module):
            norm_inputs.setdefault(name, []).append(args[0])

    unfused = _run_recording(model, inputs, record_edges)
    return Built(entry, model, inputs, reference, unfused, largest, outputs, norm_inputs)


@pytest.fixture(scope="module")
def folded(built: Built) -> Folded:
    state_before = {key: value.clone() for key, value in built.model.state_dict().items()}
    fused, report = fuse(built.model)
    return Folded(built, state_before, fused, report)


def _norm_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if is_norm_module(module)]


# --------------------------------------------------------------------------------------------------
# The zoo's own definitions


def test_entry_matches_its_derivation(built: Built):
    """The hand-derived norm count is the network's, and each norm runs exactly once per forward."""
    entry, model = built.entry, built.model
    assert len(_norm_names(model)) == entry.norm_layers, f"{entry.name}: norm modules {_norm_names(model)}"
    calls = {name: len(inputs) for name, inputs in built.norm_inputs.items()}
    assert sorted(calls) == sorted(_norm_names(model)) and set(calls.values()) == {1}, calls


def test_statistics_are_randomised_and_sane(built: Built):
    for name, module in built.model.named_modules():
        if not is_norm_module(module):
            continue
        var, weight = module.running_var, module.weight
        assert torch.isfinite(var).all() and (var > 0).all(), f"{built.entry.name}: {name}.running_var = {var}"
        # Calibrated on a random batch: never the constructor's defaults, and not one shared value.
        assert not torch.equal(var, torch.ones_like(var)) and var.unique().numel() > 1, f"{name}: {var}"
        assert not torch.equal(weight, torch.ones_like(weight)), f"{name}: weight {weight}"


def test_activations_stay_within_half_precision_range(built: Built):
    """Sane statistics: every module's output stays far below fp16's largest finite value (65504)."""
    largest = built.largest_activation
    assert largest, "no module output was recorded"
    worst = max(largest, key=largest.get)
    assert largest[worst] < 1e3, f"{built.entry.name}: |{worst or 'output'}| reaches {largest[worst]:.3g}"


def test_build_is_deterministic_and_seeded():
    pytest.importorskip("torchvision")
    first, again, other = build("torchvision/resnet18"), build("torchvision/resnet18"), build("torchvision/resnet18", 1)
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    assert not torch.equal(first.bn1.running_var, other.bn1.running_var)


def test_unknown_entry_is_a_value_error():
    with pytest.raises(ValueError, match="unknown zoo model 'torchvision/resnet51'.*known:"):
        build("torchvision/resnet51")


def test_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail as if not installed
    with pytest.raises(ImportError, match=r"needs 'timm'.*'zoo' extra"):
        build("timm/repvgg_a0")


def test_zoo_imports_without_torchvision_or_timm():
    code = ("import sys; sys.modules['torchvision'] = None; sys.modules['timm'] = None\n"
            "from adapters.torch.suite import zoo\n"
            "assert len(zoo.ZOO) >= 12\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------------
# Folding


def test_fused_output_matches_the_float64_reference(folded: Folded):
    with torch.no_grad():
        fused = folded.fused(folded.built.inputs)
    result = compare_models(fused, folded.built.unfused, folded.built.reference, torch.float32)
    assert result.ok, result.describe(folded.entry.name)


def test_norm_evaluations_left_equal_the_unfoldable_count(folded: Folded):
    assert count_norm_calls(folded.fused, folded.built.inputs) == folded.entry.unfoldable, folded.report.table()


def test_report_accounts_for_every_norm(folded: Folded):
    entry, report = folded.entry, folded.report
    assert report.norms_found == entry.norm_layers
    assert not report.training_mode
    # One pair per (norm, layer): a norm on a channel concat of several convs folds into each of them.
    assert len({(pair.norm, pair.layer) for pair in report.folded}) == len(report.folded), report.table()
    folded_norms = sorted({pair.norm for pair in report.folded})
    assert len(folded_norms) == entry.foldable, report.table()
    assert Counter(skip.reason for skip in report.skipped) == Counter(entry.skip_reasons), report.table()
    skipped_norms = [skip.norm for skip in report.skipped]
    # Every norm appears exactly once, either folded or skipped.
    assert sorted(folded_norms + skipped_norms) == sorted(_norm_names(folded.model))
    modules = dict(folded.model.named_modules())
    for pair in report.folded:
        assert pair.kind == "conv->bn", pair
        assert isinstance(modules[pair.layer], nn.Conv2d), pair
        assert 0 <= pair.max_rel_change < float("inf"), pair


def test_folded_pairs_are_dataflow_edges_of_the_original(folded: Folded):
    """Independently of the adapter's tracer: each folded norm consumed exactly its layer's output, or
    (a norm folded into several layers) the concatenation of their outputs along channels, in the
    order the layers ran."""
    run_order = list(folded.built.outputs)  # layers in order of their first call
    layers_of: dict[str, list[str]] = {}
    for pair in folded.report.folded:
        layers_of.setdefault(pair.norm, []).append(pair.layer)
    for norm, layers in layers_of.items():
        consumed = folded.built.norm_inputs.get(norm, [])
        produced = [folded.built.outputs.get(layer, []) for layer in sorted(layers, key=run_order.index)]
        assert len(consumed) == 1 and all(len(p) == 1 for p in produced), (
            f"{norm} <- {layers}: norm called {len(consumed)}x, layers {[len(p) for p in produced]}x")
        if len(layers) == 1:
            assert consumed[0] is produced[0][0], f"{norm} <- {layers[0]}: the norm's input is not the layer's output"
        else:
            joined = torch.cat([p[0] for p in produced], dim=1)
            assert torch.equal(consumed[0], joined), f"{norm}: its input is not the channel concat of {layers}"


def test_keeps_class_names_and_state_dict_keys(folded: Folded):
    original, fused, report = folded.model, folded.fused, folded.report
    assert fused is not original and type(fused) is type(original)
    original_modules, fused_modules = dict(original.named_modules()), dict(fused.named_modules())
    assert fused_modules.keys() == original_modules.keys()
    folded_norms = {pair.norm for pair in report.folded}
    for name, module in original_modules.items():
        if name in folded_norms:
            replacement = fused_modules[name]
            assert not is_norm_module(replacement), f"{name} was folded but is still a norm: {replacement}"
            # BatchNormAct2d keeps its drop and act children (same names, same classes): the activation survives.
            for child_name, child in module.named_children():
                assert type(getattr(replacement, child_name)) is type(child), f"{name}.{child_name}"
        else:
            assert type(fused_modules[name]) is type(module), name
    original_keys, fused_keys = set(original.state_dict()), set(fused.state_dict())
    dropped = {key for key in original_keys if any(key.startswith(norm + ".") for norm in folded_norms)}
    assert original_keys - fused_keys == dropped
    # The only new keys are biases of folded layers that had none.
    assert fused_keys - original_keys <= {pair.layer + ".bias" for pair in report.folded}


def test_original_is_untouched(folded: Folded):
    state = folded.model.state_dict()
    assert state.keys() == folded.state_before.keys()
    for key, value in folded.state_before.items():
        assert torch.equal(state[key], value), key
    assert len(_norm_names(folded.model)) == folded.entry.norm_layers


@pytest.mark.parametrize("name", ["torchvision/resnet18", "timm/repvgg_a0"])
def test_fuse_conv_bn_is_a_drop_in(name: str):
    entry = ZOO[name]
    pytest.importorskip(entry.library)
    model = entry.build()
    assert fuse_conv_bn(model) is model
    assert count_norm_calls(model, entry.example_input()) == entry.unfoldable

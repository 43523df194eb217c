"""The torch adapter against the hand-worked case suite (``adapters.torch.suite.cases``).

For every case, fused three ways (``fuse`` without and with example inputs, and the mmcv
drop-in ``fuse_conv_bn``), the fused model must compute what the original computes (judged
against the original's float64 run with the project's whole-network error model), fold exactly
the norm modules the case says are foldable, leave exactly ``case.left`` norm evaluations, keep
every other module name, class and state_dict key, and report the expected skip reasons.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from adapters.report import FOLD_KINDS, REASON_PRIORITY
from adapters.torch import FoldedPair, FusionReport, SkippedNorm, fuse, fuse_conv_bn
from adapters.torch.suite.cases import (
    CASES,
    FAMILIES,
    BatchNormAct2d,
    Case,
    FrozenBatchNorm2d,
    ShiftedBatchNorm2d,
    count_norm_calls,
    get_case,
    is_norm_module,
    iter_cases,
    norm_module_names,
    randomize_norm_stats,
)
from adapters.torch.suite.realcode_cases import recorded_case
from refimpl import compare_models

# A norm left unfused gives a norm-level reason (ranked in REASON_PRIORITY), never a reason for a sum of branches.
NORM_REASONS = set(REASON_PRIORITY)
MODES = ["fuse", "fuse_example_inputs", "fuse_conv_bn"]

def _params(name: str, variant: str) -> object:
    return pytest.param(name, variant, id=f"{name}-{variant}")


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The original model run in float64 on a copy (the oracle for every output comparison)."""
    return _run(copy.deepcopy(model).double(), x.double())


def _snapshot(model: nn.Module) -> tuple[list[tuple[str, type]], dict[str, torch.Tensor]]:
    structure = [(name, type(module)) for name, module in model.named_modules()]
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    return structure, state


def _assert_unchanged(model: nn.Module, snapshot: tuple[list[tuple[str, type]], dict[str, torch.Tensor]]) -> None:
    structure, state = snapshot
    assert [(name, type(module)) for name, module in model.named_modules()] == structure, "module tree changed"
    now = model.state_dict()
    assert list(now) == list(state), f"state_dict keys changed: {sorted(set(now) ^ set(state))}"
    changed = [key for key in state if not torch.equal(now[key], state[key])]
    assert not changed, f"original model's tensors changed: {changed}"


def _apply(mode: str, model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, FusionReport | None]:
    if mode == "fuse":
        return fuse(model)
    if mode == "fuse_example_inputs":
        return fuse(model, example_inputs=x)
    working = copy.deepcopy(model)
    fused = fuse_conv_bn(working)
    assert fused is working, "fuse_conv_bn must return the same module object it was given"
    return fused, None


def _folded_norms(original: nn.Module, fused: nn.Module) -> set[str]:
    """Norm modules of ``original`` that are no longer norm modules in ``fused`` (read off the structure)."""
    modules = dict(fused.named_modules())
    return {name for name in norm_module_names(original) if name not in modules or not is_norm_module(modules[name])}


def check_case(case: Case, mode: str, *, dtype: torch.dtype = torch.float32,
               channels_last: bool = False) -> tuple[nn.Module, FusionReport | None]:
    if mode == "fuse_example_inputs":
        case = recorded_case(case)  # a recorded run may fold more (or name another reason)
    model = case.build().to(dtype)
    x = case.make_input(dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    before = _snapshot(model)
    reference = _reference(model, x)
    unfused = _run(model, x)
    all_norms = set(norm_module_names(model))

    fused, report = _apply(mode, model, x)

    if mode != "fuse_conv_bn":
        assert fused is not model, "fuse(inplace=False) must return a new model"
        _assert_unchanged(model, before)
    assert type(fused) is type(model), f"{case.name}: the model's class changed to {type(fused).__name__}"

    # Output: the fused model against the original's float64 run, relative to the original's own error.
    result = compare_models(_run(fused, x), unfused, reference, dtype)
    assert result.ok, f"{case.name} [{mode}, {dtype}]: {result.describe()}"

    # What folded, read off the fused model's structure (the report is checked against it below).
    expected = all_norms - set(case.skips)
    folded = _folded_norms(model, fused)
    if mode == "fuse_example_inputs":
        assert folded == expected, f"{case.name} [{mode}]: folded {sorted(folded)}, expected {sorted(expected)}"
    else:
        # Without example inputs a BN1d <-> Linear fold may stay unproven (reported "rank_unknown").
        required = expected - set(case.rank_dependent)
        assert required <= folded <= expected, (
            f"{case.name} [{mode}]: folded {sorted(folded)}, expected {sorted(required)} "
            f"(+ possibly {sorted(case.rank_dependent)})")
    assert len(expected) == case.foldable  # the case table is self-consistent
    unproven = expected - folded
    calls = count_norm_calls(fused, x)
    assert calls == case.left + len(unproven), (
        f"{case.name} [{mode}]: {calls} norm evaluations left, expected {case.left}"
        + (f" + {len(unproven)} unproven rank-dependent" if unproven else ""))

    _check_structure(case, model, fused, folded)
    _check_tensors_kept(model, fused, folded, dtype=dtype, channels_last=channels_last)
    if report is not None:
        _check_report(case, report, all_norms, folded, unproven)
    return fused, report


def _check_structure(case: Case, original: nn.Module, fused: nn.Module, folded: set[str]) -> None:
    fused_modules = dict(fused.named_modules())
    for name, module in original.named_modules():
        if name in folded:
            replacement = fused_modules[name]
            if "act" in module._modules or "drop" in module._modules:  # BatchNormAct2d-like
                # The activation and dropout must survive under the same names.
                for child in ("drop", "act"):
                    kept = getattr(replacement, child, None)
                    assert type(kept) is type(getattr(module, child)), (
                        f"{case.name}: folded {name} lost its {child} ({type(getattr(module, child)).__name__})")
            else:
                assert type(replacement) is nn.Identity, (
                    f"{case.name}: folded norm {name} replaced by {type(replacement).__name__}, expected nn.Identity")
            continue
        assert name in fused_modules, f"{case.name}: module {name!r} disappeared"
        assert type(fused_modules[name]) is type(module), (
            f"{case.name}: module {name!r} changed class {type(module).__name__} -> "
            f"{type(fused_modules[name]).__name__}")

    original_keys = set(original.state_dict())
    fused_keys = set(fused.state_dict())
    norm_keys = {key for key in original_keys if any(key.startswith(f"{norm}.") for norm in folded)}
    # BatchNormAct2d's drop/act children may own state in general; ours own none.
    assert not (fused_keys & norm_keys), f"{case.name}: folded norms still in the state_dict: {fused_keys & norm_keys}"
    missing = original_keys - norm_keys - fused_keys
    assert not missing, f"{case.name}: state_dict keys lost: {sorted(missing)}"
    layers = {name for name, module in original.named_modules() if isinstance(module, (nn.modules.conv._ConvNd,
                                                                                       nn.Linear))}
    extra = fused_keys - original_keys
    allowed = {f"{layer}.bias" for layer in layers}
    assert extra <= allowed, f"{case.name}: unexpected new state_dict keys {sorted(extra - allowed)}"


def _check_tensors_kept(original: nn.Module, fused: nn.Module, folded: set[str], *, dtype: torch.dtype,
                        channels_last: bool) -> None:
    """dtype, device, requires_grad and memory format of every surviving parameter are kept."""
    originals = dict(original.named_parameters())
    for name, param in fused.named_parameters():
        assert param.dtype == dtype, f"parameter {name} has dtype {param.dtype}, model was {dtype}"
        if name in originals:
            assert param.device == originals[name].device
            assert param.requires_grad == originals[name].requires_grad, f"requires_grad of {name} changed"
            if channels_last and param.dim() == 4:
                assert param.is_contiguous(memory_format=torch.channels_last), f"{name} lost channels_last"


def _check_report(case: Case, report: FusionReport, all_norms: set[str], folded: set[str], unproven: set[str]
                  ) -> None:
    assert isinstance(report, FusionReport)
    assert report.norms_found == len(all_norms), (
        f"{case.name}: report.norms_found={report.norms_found}, the model has {len(all_norms)}")
    assert report.training_mode is False
    for pair in report.folded:
        assert isinstance(pair, FoldedPair)
        assert pair.kind in FOLD_KINDS, f"{case.name}: unknown fold kind {pair.kind!r}"
        assert math.isfinite(pair.max_rel_change) and pair.max_rel_change >= 0, pair
    reported = {pair.norm for pair in report.folded}
    assert reported == folded, f"{case.name}: report says folded {sorted(reported)}, model shows {sorted(folded)}"
    if case.pairs is not None and not unproven:
        got = {(pair.norm, pair.layer, pair.kind) for pair in report.folded}
        assert got == set(case.pairs), f"{case.name}: folded pairs {sorted(got)}, expected {sorted(case.pairs)}"

    skipped: dict[str, str] = {}
    for skip in report.skipped:
        assert isinstance(skip, SkippedNorm)
        assert skip.reason in NORM_REASONS, f"{case.name}: unknown skip reason {skip.reason!r}"
        assert skip.norm not in skipped, f"{case.name}: {skip.norm} skipped twice"
        skipped[skip.norm] = skip.reason
    assert set(skipped) == all_norms - folded, (
        f"{case.name}: skipped {sorted(skipped)}, but the norms left are {sorted(all_norms - folded)}")
    for norm, reasons in case.skips.items():
        assert skipped[norm] in reasons, f"{case.name}: {norm} skipped as {skipped[norm]!r}, expected one of {reasons}"
    for norm in unproven:
        assert skipped[norm] == "rank_unknown", f"{case.name}: {norm} unfolded as {skipped[norm]!r}"

    text = str(report)
    assert all(name in text for name in folded | set(skipped) if name), f"{case.name}: table misses names:\n{text}"
    assert report.table() == text
    data = report.to_dict()
    json.loads(json.dumps(data))


# ---------------------------------------------------------------------------------------------
# Every case, three ways

@pytest.mark.parametrize(("name", "mode"), [_params(name, mode) for name in CASES for mode in MODES])
def test_case(name: str, mode: str) -> None:
    check_case(get_case(name), mode)


def test_example_inputs_as_tuple() -> None:
    case = get_case("reid_bn_dropout_linear")
    model = case.build()
    x = case.make_input()
    fused, report = fuse(model, example_inputs=(x,))
    assert {pair.norm for pair in report.folded} == {"backbone.1", "bottleneck"}
    assert count_norm_calls(fused, x) == 0


# ---------------------------------------------------------------------------------------------
# Precision and memory-format variants

LOW_PRECISION_CASES = ["conv2d_bn_pad_zeros", "conv_transpose2d_groups_bn", "bn_conv2d_pad_reflect", "batchnorm_act",
                       "frozen_bn", "trap_residual_bn_before_conv", "trap_bn_shared_by_two_convs",
                       "reid_bn_dropout_linear"]


@pytest.mark.parametrize(("name", "dtype"), [_params(name, dtype) for name in LOW_PRECISION_CASES
                                             for dtype in ("fp16", "bf16")])
def test_low_precision(name: str, dtype: str) -> None:
    check_case(get_case(name), "fuse_example_inputs", dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[dtype])


@pytest.mark.parametrize("mode", ["fuse", "fuse_conv_bn"])
@pytest.mark.parametrize(("name", "layout"), [_params(name, "channels_last") for name in (
    "conv2d_groups_stride_dilation_bn", "bn_conv2d_pad_circular", "batchnorm_act", "trap_modulelist_loop",
    "conv_transpose2d_groups_bn")])
def test_channels_last(name: str, layout: str, mode: str) -> None:
    check_case(get_case(name), mode, channels_last=True)


def test_float64_model_folds_in_float64() -> None:
    # In float64 the fold is exact up to a few roundings: the error floor of compare_models is u(float64).
    check_case(get_case("conv2d_groups_stride_dilation_bn"), "fuse", dtype=torch.float64)


def test_requires_grad_kept() -> None:
    case = get_case("conv_bn_bn")
    model = case.build()
    model[0].weight.requires_grad_(False)
    fused, _ = fuse(model)
    assert fused[0].weight.requires_grad is False
    assert fused[0].bias.requires_grad is True


# ---------------------------------------------------------------------------------------------
# Training mode: folded with eval semantics (running statistics), and said so

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["conv_bn_bn", "trap_residual_bn_before_conv", "reid_bn_dropout_linear",
                                  "bn_no_running_stats"])
def test_training_mode_folds_with_eval_semantics(name: str, mode: str) -> None:
    case = get_case(name)
    model = case.build().train()
    x = case.make_input()
    before = _snapshot(model)
    fused, report = _apply(mode, model, x)
    if report is not None:
        assert report.training_mode is True
        # Running the example input in training mode would update the running stats before folding.
        _assert_unchanged(model, before)
    evaluated = copy.deepcopy(model).eval()
    fused.eval()
    result = compare_models(_run(fused, x), _run(evaluated, x), _reference(evaluated, x), torch.float32)
    assert result.ok, f"{name} [{mode}] folded in training mode: {result.describe()}"
    assert len(_folded_norms(model, fused)) == case.foldable
    assert count_norm_calls(fused, x) == case.left


# ---------------------------------------------------------------------------------------------
# The case suite's own helpers (they are the oracle's instruments, so they are tested too)

def test_case_table_is_consistent() -> None:
    assert len(CASES) >= 50
    for case in iter_cases():
        assert case.family in FAMILIES
        assert case.description, case.name
        names = set(norm_module_names(case.build()))
        assert set(case.skips) <= names and set(case.rank_dependent) <= names, case.name
        assert case.foldable == len(names - set(case.skips)), case.name
        if case.pairs is not None:
            assert {norm for norm, _, _ in case.pairs} == names - set(case.skips), case.name
    for family in FAMILIES:
        assert any(True for _ in iter_cases(family)), family
    with pytest.raises(ValueError, match="unknown family"):
        iter_cases("conv")
    with pytest.raises(KeyError, match="no case named"):
        get_case("no-such-case")


def test_build_is_deterministic_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    first = get_case("reid_bn_dropout_linear").build()
    assert torch.equal(torch.get_rng_state(), state)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)  # a different global state must not change the build
        second = get_case("reid_bn_dropout_linear").build()
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert not first.training


def test_randomize_norm_stats_ranges() -> None:
    model = nn.Sequential(nn.BatchNorm2d(512), FrozenBatchNorm2d(512), nn.BatchNorm2d(8, track_running_stats=False))
    randomize_norm_stats(model, torch.Generator().manual_seed(3))
    for norm in (model[0], model[1]):
        assert 0.5 <= float(norm.running_var.min()) and float(norm.running_var.max()) <= 2.0
        assert 0.3 < float(norm.running_mean.std()) < 0.7
        weight, bias = norm.weight.detach(), norm.bias.detach()
        assert 0.5 <= float(weight.abs().min()) and float(weight.abs().max()) <= 1.5
        assert 0.1 < float((weight < 0).double().mean()) < 0.4
        assert 0.3 < float(bias.std()) < 0.7
    assert model[2].running_mean is None


def test_count_norm_calls_counts_every_norm_family() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), FrozenBatchNorm2d(3), BatchNormAct2d(3), nn.SyncBatchNorm(3),
                          ShiftedBatchNorm2d(3), nn.ReLU(), nn.Identity(), nn.GroupNorm(1, 3)).eval()
    x = torch.randn(1, 3, 4, 4)
    assert count_norm_calls(model, x) == 5
    # A module called twice counts twice; hooks are removed afterwards.
    shared = get_case("trap_bn_shared_by_two_convs").build()
    assert count_norm_calls(shared, get_case("trap_bn_shared_by_two_convs").make_input()) == 2
    assert not any(module._forward_hooks for module in shared.modules())

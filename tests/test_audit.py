"""The fuser audit: our fuser passes the case suite; broken fusers are caught as WRONG or CRASH.

The broken fusers below are deliberately wrong in ways real fusers are: pairing by registration
order (mmcv's walk), losing activations, raising, returning the wrong thing. Their folds use
``refimpl`` so the only fault is the one named.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from adapters.torch import fuse_conv_bn
from adapters.torch.__main__ import main
from adapters.torch.suite import cases as case_suite
from adapters.torch.suite.audit import AuditTarget, audit_one, audit_targets, format_result, load_object, run_audit
from refimpl import fold_conv_bn

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# Fusers under audit (importable as test_audit:<name> from the CLI)


@torch.no_grad()
def registration_order_fuser(model: nn.Module) -> nn.Module:
    """Pair each BatchNorm child with the conv child registered just before it, as mmcv's walk does."""
    last_conv = None
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and last_conv is not None:
            conv_name, conv = last_conv
            bias = None if conv.bias is None else conv.bias.double()
            weight, new_bias = fold_conv_bn(conv.weight.double(), bias, child.running_mean.double(),
                                            child.running_var.double(), child.eps,
                                            None if child.weight is None else child.weight.double(),
                                            None if child.bias is None else child.bias.double(),
                                            transposed=conv.transposed, groups=conv.groups)
            conv.weight.copy_(weight)
            conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
            setattr(model, name, nn.Identity())
            last_conv = None
        elif isinstance(child, nn.Conv2d):
            last_conv = (name, child)
        else:
            registration_order_fuser(child)
    return model


def activation_dropping_fuser(model: nn.Module) -> nn.Module:
    """A correct fold followed by the loss of every ReLU (as a fuser that rebuilds blocks might)."""
    model = fuse_conv_bn(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, child_name, nn.Identity())
    return model


def crashing_fuser(model: nn.Module) -> nn.Module:
    raise RuntimeError("cannot fuse\nthis model")


def none_returning_fuser(model: nn.Module) -> None:
    fuse_conv_bn(model)


def shape_breaking_fuser(model: nn.Module) -> nn.Module:
    """Returns a model that cannot run: every conv's input channels doubled."""
    for module in model.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d):
                setattr(module, name, nn.Conv2d(2 * child.in_channels, child.out_channels, child.kernel_size))
    return model


def identity_fuser(model: nn.Module) -> nn.Module:
    return model


def _targets(*names: str) -> list[AuditTarget]:
    return list(audit_targets(zoo=False, select=names))


# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(case_suite.CASES))
def test_our_fuser_is_ok_on_every_case(name):
    [target] = _targets(name)
    outcome = audit_one(fuse_conv_bn, target)
    assert outcome.status == "ok", format_result(outcome)


def test_cli_audit_of_our_fuser_exits_0(capsys):
    assert main(["audit", "adapters.torch:fuse_conv_bn", "--no-zoo", "--only", "trap"]) == 0
    lines = capsys.readouterr().out.splitlines()
    trap_cases = [c.name for c in case_suite.iter_cases("trap")]
    assert lines[0].split()[:2] == ["status", "model"]
    assert [line.split()[1] for line in lines[1:-1]] == trap_cases
    assert all(line.startswith("ok ") for line in lines[1:-1]), "\n".join(lines)
    assert lines[-1] == (f"summary: {len(trap_cases)} ok, 0 missed, 0 WRONG, 0 CRASH ({len(trap_cases)} models) "
                         f"-- fuser adapters.torch:fuse_conv_bn")


class TestBrokenFusers:
    def test_registration_order_pairing_is_wrong(self):
        outcomes = {o.name: o for o in run_audit(registration_order_fuser,
                                                 _targets("trap_bn_before_conv_zero_padding",
                                                          "trap_bn_before_conv_valid", "conv2d_bn_pad_zeros"))}
        # The BN runs *before* the conv registered ahead of it: folding it after the conv is wrong.
        for name in ("trap_bn_before_conv_zero_padding", "trap_bn_before_conv_valid"):
            assert outcomes[name].status == "WRONG", format_result(outcomes[name])
            assert outcomes[name].ratio > 4
            assert "the unfused model's (limit 4x)" in outcomes[name].detail
        assert outcomes["conv2d_bn_pad_zeros"].status == "ok"

    def test_cli_exit_code_1_on_wrong(self, capsys):
        assert main(["audit", "test_audit:registration_order_fuser", "--no-zoo", "--only", "trap_bn_before_conv_valid",
                     "--only", "conv2d_bn_pad_zeros"]) == 1
        out = capsys.readouterr().out
        assert "\nWRONG   trap_bn_before_conv_valid " in out
        assert "summary: 1 ok, 0 missed, 1 WRONG, 0 CRASH (2 models)" in out

    def test_dropped_activation_is_wrong_and_named(self):
        [outcome] = run_audit(activation_dropping_fuser, _targets("trap_activation_between"))
        assert outcome.status == "WRONG"
        # Sequential(conv, relu, bn): the first layer whose output should not change is the ReLU, "1".
        assert "first diverging layer: 1:" in outcome.detail

    def test_crashing_fuser(self):
        [outcome] = run_audit(crashing_fuser, _targets("conv1d_bn"))
        assert outcome.status == "CRASH"
        assert outcome.detail == "fuser raised RuntimeError: cannot fuse this model"  # one line
        assert outcome.left is None and outcome.ratio is None

    def test_fuser_returning_none(self):
        [outcome] = run_audit(none_returning_fuser, _targets("conv1d_bn"))
        assert outcome.status == "CRASH"
        assert "TypeError: fuser returned NoneType, not an nn.Module" in outcome.detail

    def test_fused_model_that_cannot_run(self):
        [outcome] = run_audit(shape_breaking_fuser, _targets("conv2d_bn_pad_zeros"))
        assert outcome.status == "CRASH"
        assert outcome.detail.startswith("fused model raised RuntimeError")

    def test_identity_fuser_misses_only_foldable_norms(self):
        outcomes = {o.name: o for o in run_audit(identity_fuser, _targets("conv_bn_bn", "trap_activation_between"))}
        assert outcomes["conv_bn_bn"].status == "missed"
        assert outcomes["conv_bn_bn"].left == 2 and outcomes["conv_bn_bn"].expected_left == 0
        assert outcomes["trap_activation_between"].status == "ok"

    def test_cli_crash_exit_code_and_json(self, capsys):
        assert main(["audit", "test_audit:crashing_fuser", "--no-zoo", "--only", "conv1d_bn", "--json"]) == 1
        captured = capsys.readouterr()
        data = json.loads(captured.out)
        assert data["fuser"] == "test_audit:crashing_fuser" and data["ok"] is False
        assert data["summary"] == {"ok": 0, "missed": 0, "WRONG": 0, "CRASH": 1}
        assert data["results"][0]["status"] == "CRASH" and data["results"][0]["name"] == "conv1d_bn"
        assert "CRASH   conv1d_bn" in captured.err  # progress on stderr


def test_fuser_warnings_do_not_crash_the_audit():
    def warning_fuser(model):
        import warnings
        warnings.warn("deprecated fuser", DeprecationWarning, stacklevel=2)
        return fuse_conv_bn(model)

    # pytest turns warnings into errors here; the audit records a fuser's warnings instead.
    [outcome] = run_audit(warning_fuser, _targets("conv1d_bn"))
    assert outcome.status == "ok"
    assert "1 warning(s), first: DeprecationWarning: deprecated fuser" in outcome.detail


def test_mmcv_runs_through():
    mmcv_cnn = pytest.importorskip("mmcv.cnn")
    outcomes = {o.name: o for o in run_audit(mmcv_cnn.fuse_conv_bn, _targets("trap", "norms"))}
    assert len(outcomes) == len(list(case_suite.iter_cases("trap"))) + len(list(case_suite.iter_cases("norms")))
    # mmcv pairs by registration order: this trap is folded as if the BN ran after the conv.
    assert outcomes["trap_bn_before_conv_zero_padding"].status == "WRONG"
    assert outcomes["trap_activation_between"].status == "WRONG"


def test_torch_fx_fuse_runs_through():
    from torch.fx.experimental.optimization import fuse

    outcomes = {o.name: o for o in run_audit(fuse, _targets("trap_untraceable_parent", "conv2d_bn_pad_zeros"))}
    assert outcomes["trap_untraceable_parent"].status == "CRASH"  # fx cannot trace data-dependent control flow
    assert "TraceError" in outcomes["trap_untraceable_parent"].detail
    assert outcomes["conv2d_bn_pad_zeros"].status == "ok"


class TestArguments:
    def test_load_object_errors(self):
        with pytest.raises(ValueError, match="must be given as 'package.module:function'"):
            load_object("mmcv.cnn.fuse_conv_bn")
        with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
            load_object("no_such_module_xyz:fuse")
        with pytest.raises(ValueError, match="has no attribute 'nope'"):
            load_object("adapters.torch:nope")
        assert load_object("adapters.torch.suite.audit:AuditTarget.__name__") == "AuditTarget"

    def test_cli_usage_errors_exit_2(self, capsys):
        with pytest.raises(SystemExit) as info:
            main(["audit", "adapters.torch:nope", "--no-zoo"])
        assert info.value.code == 2
        assert "has no attribute 'nope'" in capsys.readouterr().err
        with pytest.raises(SystemExit) as info:
            main(["audit", "adapters.torch:fuse_conv_bn", "--no-zoo", "--only", "no_such_case"])
        assert info.value.code == 2

    def test_help(self, capsys):
        with pytest.raises(SystemExit) as info:
            main(["audit", "--help"])
        assert info.value.code == 0
        out = capsys.readouterr().out
        for word in ("MODULE:FUNCTION", "--no-zoo", "missed", "WRONG", "CRASH", "--json"):
            assert word in out


class _FunctionalBatchNorm(nn.Module):
    """A norm fx traces through (not a torch.nn class): its evaluation becomes graph ops, not a module call."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("running_mean", torch.linspace(-1, 1, width))
        self.register_buffer("running_var", torch.linspace(0.5, 2, width))

    def forward(self, x):
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, training=False)


def test_norms_inlined_by_fx_are_counted_as_left():
    from torch.fx.experimental.optimization import fuse

    target = AuditTarget("functional_bn", "trap", lambda: nn.Sequential(nn.Conv2d(3, 4, 3), _FunctionalBatchNorm(4)),
                         lambda: torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)), 0)
    outcome = audit_one(fuse, target)
    # No module call of the norm survives in the GraphModule, but the norm still runs, unfolded.
    assert outcome.status == "missed" and outcome.left == 1, format_result(outcome)

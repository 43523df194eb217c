"""The fuser audit: our fuser passes the case suite; broken fusers are caught as WRONG or CRASH.

The broken fusers below are deliberately wrong in ways real fusers are: pairing by registration
order (mmcv's walk), losing activations, raising, returning the wrong thing. Their folds use
``refimpl`` so the only fault is the one named.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

from adapters.torch import fuse, fuse_conv_bn
from adapters.torch.__main__ import main
from adapters.torch.suite import cases as case_suite
from adapters.torch.suite import peers
from adapters.torch.suite.audit import (
    AuditProgress,
    AuditResult,
    AuditTarget,
    audit_one,
    audit_targets,
    estimate_seconds_left,
    format_duration,
    format_result,
    load_object,
    run_audit,
)
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


# --------------------------------------------------------------------------------------------------
# Fusers that take example inputs: FUNCTION(model, example_inputs), audited with with_inputs / --with-inputs


def inputs_fuser(model: nn.Module, example_inputs: tuple) -> nn.Module:
    """Our fuser given the example inputs, which prove the rank of a Linear <-> BatchNorm1d pair's input."""
    assert isinstance(example_inputs, tuple) and all(isinstance(x, torch.Tensor) for x in example_inputs)
    return fuse(model, inplace=True, example_inputs=example_inputs)[0]


def chatty_inputs_fuser(model: nn.Module, example_inputs: tuple) -> nn.Module:
    print("tracing the model ...")  # a fuser's own chatter must not end up inside the report on stdout
    return inputs_fuser(model, example_inputs)


class TestWithInputs:
    def test_fuser_gets_the_inputs_and_uses_them(self):
        [target] = _targets("linear_bn1d_2d_input")
        # Without inputs our fuser cannot prove the Linear's input is 2-D: the pair is left (allowed).
        without = audit_one(fuse_conv_bn, target)
        assert without.status == "ok" and without.left == 1, format_result(without)
        # With them it can, so the hand-worked count of the case (nothing left) is reached.
        with_inputs = audit_one(inputs_fuser, target, with_inputs=True)
        assert with_inputs.status == "ok" and with_inputs.left == 0 == target.expected_left, format_result(with_inputs)

    def test_inputs_fuser_called_without_inputs_is_a_crash_with_a_note(self):
        [outcome] = run_audit(inputs_fuser, _targets("conv1d_bn"))
        assert outcome.status == "CRASH"
        assert outcome.detail.startswith("fuser raised TypeError: inputs_fuser() missing 1 required positional")
        assert "FUNCTION(model, example_inputs) with --with-inputs" in outcome.detail

    def test_model_only_fuser_called_with_inputs_is_a_crash_with_a_note(self):
        [outcome] = run_audit(fuse_conv_bn, _targets("conv1d_bn"), with_inputs=True)
        assert outcome.status == "CRASH"
        assert "takes the model only: audit it without --with-inputs" in outcome.detail, outcome.detail

    def test_cli_json_stays_clean(self, capsys):
        assert main(["audit", "test_audit:chatty_inputs_fuser", "--with-inputs", "--no-zoo", "--only",
                     "linear_bn1d_2d_input", "--only", "conv1d_bn", "--json"]) == 0
        captured = capsys.readouterr()
        data = json.loads(captured.out)  # the whole of stdout is the JSON document
        assert data["with_inputs"] is True and data["summary"]["ok"] == 2
        assert [r["left"] for r in data["results"]] == [0, 0]
        assert "tracing the model ..." in captured.err
        assert "[2/2] ok      linear_bn1d_2d_input" in captured.err

    def test_cli_text_report_and_progress_are_separate(self, capsys):
        assert main(["audit", "test_audit:inputs_fuser", "--with-inputs", "--no-zoo", "--only", "trap"]) == 0
        captured = capsys.readouterr()
        lines = captured.out.splitlines()
        trap_cases = [c.name for c in case_suite.iter_cases("trap")]
        assert len(lines) == len(trap_cases) + 2  # header, one line per case, summary: no progress
        assert lines[-1].endswith("-- fuser test_audit:inputs_fuser (called with example inputs)")
        progress = captured.err.splitlines()
        assert [line.split()[0] for line in progress] == [f"[{i}/{len(trap_cases)}]"
                                                          for i in range(1, len(trap_cases) + 1)]
        assert all(line.endswith(" left") for line in progress[:-1]), progress
        assert progress[-1].endswith("; done")

    def test_quiet_prints_no_progress(self, capsys):
        assert main(["audit", "adapters.torch:fuse_conv_bn", "--no-zoo", "--only", "conv1d_bn", "-q"]) == 0
        assert capsys.readouterr().err == ""


class TestProgress:
    def test_estimate_uses_each_familys_mean(self):
        done = [("trap", 1.0), ("trap", 3.0), ("zoo", 10.0)]
        # trap: mean 2 s; zoo: 10 s.
        assert estimate_seconds_left(done, ["trap", "zoo", "zoo"]) == (22.0, True)
        # A family not timed yet counts at the mean of all finished targets, (1 + 3 + 10) / 3.
        seconds, sure = estimate_seconds_left(done, ["norms", "trap"])
        assert seconds == pytest.approx(14 / 3 + 2) and sure is False
        assert estimate_seconds_left(done, []) == (0.0, True)

    def test_format_duration(self):
        assert [format_duration(s) for s in (0.4, 42, 185, 3720)] == ["<1 s", "42 s", "3 min 05 s", "1 h 02 min"]
        assert format_duration(float("nan")) == "?"

    def test_lines_on_a_log_and_in_place_on_a_terminal(self):
        targets = [AuditTarget(name, family, nn.Identity, lambda: torch.zeros(1), 0)
                   for name, family in (("a", "trap"), ("b", "trap"), ("c", "zoo"))]

        def finished(name: str, family: str, seconds: float) -> AuditResult:
            return AuditResult(name, family, "ok", 0, 0, 1.0, 0.0, "", seconds)

        log = io.StringIO()
        progress = AuditProgress(targets, log)
        progress.update(finished("a", "trap", 2.0))
        progress.update(finished("b", "trap", 4.0))
        progress.update(finished("c", "zoo", 30.0))
        assert log.getvalue().splitlines() == [
            "[1/3] ok      a (2 s); about 4 s left (not timed yet: zoo)",
            "[2/3] ok      b (4 s); about 3 s left (not timed yet: zoo)",
            "[3/3] ok      c (30 s); done"]
        terminal = io.StringIO()
        progress = AuditProgress(targets, terminal, transient=True)
        progress.update(finished("a", "trap", 2.0))
        progress.clear()
        assert terminal.getvalue() == "\r\033[K[1/3] ok      a (2 s); about 4 s left (not timed yet: zoo)\r\033[K"


# --------------------------------------------------------------------------------------------------
# The peers as named functions (adapters/torch/suite/peers.py)


def test_peer_functions_run_through_the_audit():
    outcomes = {o.name: o for o in run_audit(peers.fx_fuse, _targets("trap_untraceable_parent", "conv_bn_bn"))}
    assert outcomes["trap_untraceable_parent"].status == "CRASH" and "TraceError" in outcomes[
        "trap_untraceable_parent"].detail
    assert outcomes["conv_bn_bn"].status == "ok"
    pytest.importorskip("mmcv.cnn")
    [outcome] = run_audit(peers.mmcv_fuse, _targets("trap_bn_before_conv_valid"))
    assert outcome.status == "WRONG"  # registration order: the BN is folded after a conv it runs before


def test_aimet_peer():
    if peers.peer_unavailable(peers.PEERS["aimet"]) is not None:
        pytest.skip("aimet-torch is not installed (the 'aimet' extra)")
    outcomes = {o.name: o for o in run_audit(peers.aimet_fold, _targets("conv2d_bn_pad_zeros", "bn_conv2d_valid",
                                                                        "trap_linear_bn1d_on_sequence"),
                                             with_inputs=True)}
    assert outcomes["conv2d_bn_pad_zeros"].status == "ok", format_result(outcomes["conv2d_bn_pad_zeros"])
    assert outcomes["bn_conv2d_valid"].status == "ok", format_result(outcomes["bn_conv2d_valid"])
    # AIMET folds a BatchNorm1d over a (N, L, C) sequence into the Linear as if it normalised C.
    assert outcomes["trap_linear_bn1d_on_sequence"].status == "WRONG"


def test_aimet_logs_stay_out_of_the_json(capsys):
    if peers.peer_unavailable(peers.PEERS["aimet"]) is not None:
        pytest.skip("aimet-torch is not installed (the 'aimet' extra)")
    # AIMET logs a warning ("Unable to isolate model outputs") on these two models, to stdout unless redirected.
    assert main(["audit", "adapters.torch.suite.peers:aimet_fold", "--with-inputs", "--no-zoo", "--only",
                 "conv_identity_bn", "--only", "sync_bn_eval", "--json"]) in (0, 1)
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["with_inputs"] is True and len(data["results"]) == 2


def test_cli_refuses_a_peer_that_does_not_import(capsys):
    if peers.peer_unavailable(peers.PEERS["aimet"]) is None:
        pytest.skip("aimet-torch is installed here")
    with pytest.raises(SystemExit) as info:
        main(["audit", "adapters.torch.suite.peers:aimet_fold", "--with-inputs", "--no-zoo"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "'adapters.torch.suite.peers:aimet_fold' cannot run here: aimet_torch.batch_norm_fold does not import" in err
    assert "bnfold[aimet]" in err

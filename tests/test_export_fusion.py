"""adapters.export: folding BatchNorm in ExportedPrograms and FX graphs.

Oracles: refimpl's float64 fold computed in numpy and rounded once by refimpl.rounding (a path
that shares no code with the adapter's torch rounding), the module adapter's folds (bit for bit),
verify's float64 reference of the original program, and hand-worked counts of norms left.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import fx, nn  # noqa: E402

import refimpl  # noqa: E402
from adapters.export import fuse, verify  # noqa: E402
from adapters.export.graph import norm_call  # noqa: E402
from adapters.export.suite.audit import audit_targets, build_program, count_norms, run_audit  # noqa: E402
from adapters.export.suite.cases import CASES, _Concat, randomize_norms  # noqa: E402
from adapters.export.suite.peers import bnfold  # noqa: E402
from adapters.report import REASONS  # noqa: E402
from refimpl.rounding import round_once  # noqa: E402

CASE = {case.name: case for case in CASES}


def export(model: nn.Module, *inputs: torch.Tensor, ir: str = "training"):
    program = torch.export.export(model, inputs)
    return program.run_decompositions() if ir == "inference" else program


def conv_bn(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())).eval().to(dtype)


def norms_in(program) -> int:
    graph = program.graph
    return sum(1 for node in graph.nodes if norm_call(node) is not None)


class TestSuite:
    """Every case, in every IR the suite builds here, comes out ok: the right output, the hand-worked count left."""

    @pytest.mark.parametrize("ir", ["training", "inference", "fx"])
    def test_every_case_is_ok(self, ir):
        results = run_audit(bnfold, audit_targets([ir]))
        assert len(results) >= len(CASES) - 2
        bad = [f"{r.name}: {r.status} {r.detail}" for r in results if r.status != "ok"]
        assert not bad, bad

    def test_edge_dialect(self):
        pytest.importorskip("executorch.exir")
        results = run_audit(bnfold, audit_targets(["edge"], select=["conv->bn", "shared", "linear->bn", "left"]))
        bad = [f"{r.name}: {r.status} {r.detail}" for r in results if r.status != "ok"]
        assert results and not bad, bad

    @pytest.mark.parametrize("name, code", [
        ("conv_output_second_user", "output_used_elsewhere"), ("train_mode_export", "training_mode"),
        ("concat_second_user", "output_used_elsewhere"),
        ("no_running_stats", "no_running_stats"), ("stats_as_user_inputs", "not_constant"),
        ("mutated_running_mean", "not_constant"), ("fp16_overflow", "overflow"),
        ("linear_bn1d_3d_input", "no_fusable_neighbour"), ("linear_bn1d_3d_equal_sizes", "no_fusable_neighbour"),
        ("bn_conv_zero_padding", "zero_padding"), ("bn_conv_transpose", "transposed_after_bn"),
    ])
    def test_reason_for_each_norm_left(self, name, code):
        program, _ = build_program(CASE[name], "training")
        _, report = fuse(program)
        assert [s.reason for s in report.skipped] == [code]
        assert code in REASONS and report.skipped[0].detail
        assert report.norms_found == 1 and not report.folded


class TestValues:
    @pytest.mark.parametrize("ir", ["training", "inference"])
    def test_conv_fold_is_refimpl_rounded_once(self, ir):
        model = conv_bn()
        program = export(model, torch.randn(1, 3, 9, 9), ir=ir)
        folded, report = fuse(program)
        conv, bn = model[0], model[1]
        numpy = {k: v.detach().double().numpy() for k, v in [("w", conv.weight), ("b", conv.bias),
                                                             ("m", bn.running_mean), ("v", bn.running_var),
                                                             ("g", bn.weight), ("beta", bn.bias)]}
        w, b = refimpl.fold_conv_bn(numpy["w"], numpy["b"], numpy["m"], numpy["v"], bn.eps, numpy["g"],
                                    numpy["beta"])
        np.testing.assert_array_equal(folded.state_dict["0.weight"].detach().numpy(), round_once(w, "float32"))
        np.testing.assert_array_equal(folded.state_dict["0.bias"].detach().numpy(), round_once(b, "float32"))
        assert [(p.norm, p.layer, p.kind) for p in report.folded] == [("1", "0", "conv->bn")]

    def test_fp16_fold_is_rounded_once_from_float64(self):
        model = conv_bn(torch.float16)
        folded, _ = fuse(export(model, torch.randn(1, 3, 9, 9, dtype=torch.float16)))
        conv, bn = model[0], model[1]
        args = [t.detach().double().numpy() for t in (conv.weight, conv.bias, bn.running_mean, bn.running_var)]
        w, b = refimpl.fold_conv_bn(*args, bn.eps, bn.weight.detach().double().numpy(),
                                    bn.bias.detach().double().numpy())
        assert folded.state_dict["0.weight"].dtype == torch.float16
        np.testing.assert_array_equal(folded.state_dict["0.weight"].detach().numpy(), round_once(w, "float16"))
        np.testing.assert_array_equal(folded.state_dict["0.bias"].detach().numpy(), round_once(b, "float16"))


def _cross_models():
    torch.manual_seed(0)
    return {
        "conv": nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)),
        "conv_transpose": nn.Sequential(nn.ConvTranspose2d(8, 8, 3, groups=2), nn.BatchNorm2d(8)),
        "conv_bn_bn": nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.BatchNorm2d(8)),
        "bn_conv": nn.Sequential(nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)),
        "linear": nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6)),
        "concat": _Concat(),
    }


class TestSameAsModuleAdapter:
    """The same model through adapters.torch and adapters.export: bit-identical folded weights."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize("name", list(_cross_models()))
    def test_bit_identical(self, name, dtype):
        from adapters.torch import fuse as fuse_modules

        model = randomize_norms(_cross_models()[name]).eval().to(dtype)
        x = torch.randn((4, 8) if name == "linear" else (2, 3 if name in ("conv", "conv_bn_bn", "concat") else 8, 9, 9),
                        dtype=dtype)
        fused_module, module_report = fuse_modules(model, example_inputs=x)
        folded, report = fuse(export(model, x))
        assert len(report.folded) == len(module_report.folded) > 0
        expected = {k: v for k, v in fused_module.state_dict().items() if "running" not in k and "num_batches" not in k}
        assert set(folded.state_dict) == set(expected)
        for key, value in expected.items():
            assert folded.state_dict[key].dtype == value.dtype
            assert torch.equal(folded.state_dict[key], value), key


class TestProgram:
    def test_valid_program_round_trips(self, tmp_path):
        model = conv_bn()
        x = torch.randn(2, 3, 9, 9)
        program = export(model, x)
        folded, _ = fuse(program)
        folded.validate()
        assert norms_in(folded) == 0
        signature = folded.graph_signature
        lifted = {s.target for s in signature.input_specs if s.target is not None}
        assert lifted == set(folded.state_dict) | set(folded.constants)  # no orphans either way
        assert all(isinstance(p, nn.Parameter) for p in folded.state_dict.values())
        assert not folded.constants
        path = tmp_path / "folded.pt2"
        torch.export.save(folded, path)
        loaded = torch.export.load(path)
        assert verify(program, loaded, x).ok
        again = torch.export.export(folded.module(), (x,))
        assert verify(program, again, x).ok and norms_in(again) == 0

    def test_original_is_left_as_it_was(self):
        program = export(conv_bn(), torch.randn(1, 3, 9, 9))
        before = {k: v.clone() for k, v in program.state_dict.items()}
        specs = list(program.graph_signature.input_specs)
        fuse(program)
        assert norms_in(program) == 1 and list(program.graph_signature.input_specs) == specs
        assert all(torch.equal(program.state_dict[k], v) for k, v in before.items())

    def test_inplace_edits_the_program_itself(self):
        x = torch.randn(1, 3, 9, 9)
        program = export(conv_bn(), x)
        reference = export(conv_bn(), x)
        folded, _ = fuse(program, inplace=True)
        assert folded is program and norms_in(program) == 0
        assert "1.running_mean" not in program.state_dict
        assert verify(reference, program, x).ok

    def test_called_twice_gets_a_weight_per_fold(self):
        case = CASE["conv_called_twice"]
        program, x = build_program(case, "training")
        folded, report = fuse(program)
        assert len(report.folded) == 2
        weights = [k for k in folded.state_dict if k.startswith("conv.weight")]
        # The first fold gets a new parameter; the second conv is then the weight's only reader and folds into it.
        assert sorted(weights) == ["conv.weight", "conv.weight_folded"]
        original = case.build()[0].conv.weight
        assert not any(torch.equal(folded.state_dict[k], original) for k in weights)
        assert not torch.equal(folded.state_dict[weights[0]], folded.state_dict[weights[1]])
        assert verify(torch.export.export(case.build()[0], x), folded, x).ok

    def test_new_names_collide_with_nothing(self):
        class Taken(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3)
                self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
                self.register_parameter("conv_extra", nn.Parameter(torch.ones(1)))
                self.conv.register_parameter("weight_folded", nn.Parameter(torch.ones(1)))

            def forward(self, x):
                return self.bn_a(self.conv(x)) + self.bn_b(self.conv(-x)) + self.conv.weight_folded

        model = randomize_norms(Taken()).eval()
        x = torch.randn(1, 3, 9, 9)
        folded, report = fuse(export(model, x))
        assert len(report.folded) == 2
        assert torch.equal(folded.state_dict["conv.weight_folded"], torch.ones(1))
        assert verify(export(model, x), folded, x).ok

    def test_linear_without_bias_in_inference_ir(self):
        torch.manual_seed(0)
        model = randomize_norms(nn.Sequential(nn.Linear(6, 4, bias=False), nn.BatchNorm1d(4))).eval()
        x = torch.randn(3, 6)
        program = export(model, x, ir="inference")
        folded, report = fuse(program)
        assert [p.kind for p in report.folded] == ["linear->bn"]
        ops = {str(n.target) for n in folded.graph.nodes if n.op == "call_function"}
        assert "aten.addmm.default" in ops and "aten.mm.default" not in ops
        assert verify(program, folded, x).ok

    def test_graph_module_of_a_program(self):
        x = torch.randn(2, 3, 9, 9)
        program = export(conv_bn(), x)
        module = program.module()
        folded, report = fuse(module)
        assert isinstance(folded, fx.GraphModule) and norms_in(folded) == 0 and count_norms(folded) == 0
        assert len(report.folded) == 1 and verify(program, folded, x).ok
        assert norms_in(module) == 1

    def test_torch_level_graph(self):
        model = conv_bn()
        x = torch.randn(2, 3, 9, 9)
        traced = fx.symbolic_trace(model)
        folded, report = fuse(traced)
        assert count_norms(folded) == 0 and [p.kind for p in report.folded] == ["conv->bn"]
        assert verify(model, folded, x).ok

    def test_lowers_to_edge(self):
        exir = pytest.importorskip("executorch.exir")
        x = torch.randn(2, 3, 9, 9)
        folded, _ = fuse(export(conv_bn(), x))
        edge = exir.to_edge(folded).exported_program()
        assert norms_in(edge) == 0
        assert verify(export(conv_bn(), x), edge, x).ok


class TestBadInput:
    def test_not_a_program(self):
        with pytest.raises(TypeError, match="ExportedProgram or a torch.fx.GraphModule, got"):
            fuse(nn.Linear(2, 2))

    def test_negative_variance_names_the_nodes_and_leaves_the_program(self):
        model = conv_bn()
        with torch.no_grad():
            model[1].running_var[3] = -1.0
        program = export(model, torch.randn(1, 3, 9, 9))
        before = {k: v.clone() for k, v in program.state_dict.items()}
        with pytest.raises(ValueError, match=r"cannot fold 0 -> 1 \(node conv2d .*channel 3 .*-1\.0"):
            fuse(program, inplace=True)
        assert norms_in(program) == 1
        assert set(program.state_dict) == set(before)
        assert all(torch.equal(program.state_dict[k], v) for k, v in before.items())


class TestCommandLine:
    def run(self, *args):
        return subprocess.run([sys.executable, "-m", "adapters.export", *args], capture_output=True, text=True,
                              timeout=120)

    def test_fuse_and_verify_files(self, tmp_path):
        source, target = tmp_path / "model.pt2", tmp_path / "folded.pt2"
        torch.export.save(export(conv_bn(), torch.randn(1, 3, 9, 9)), source)
        done = self.run("fuse", str(source), "-o", str(target))
        assert done.returncode == 0, done.stderr
        assert "1 fold(s): 1 of 1 norm layer(s) folded" in done.stdout
        checked = self.run("verify", str(source), str(target))
        assert checked.returncode == 0 and checked.stdout.startswith("OK"), checked.stdout + checked.stderr

    def test_errors_are_one_line(self, tmp_path):
        bad = tmp_path / "bad.pt2"
        bad.write_text("not a program")
        for args in (("fuse", str(bad)), ("fuse", str(tmp_path / "missing.pt2")), ("audit", "nosuch:thing")):
            done = self.run(*args)
            assert done.returncode == 2
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr

"""``python -m adapters.onnx``: the main job, ``verify`` and ``audit``, and every bad-input path.

Bad input must give one line on stderr, exit status 2, and write nothing; these run the CLI in a
subprocess, as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import refimpl
from adapters.onnx.__main__ import main
from adapters.onnx.suite.cases import count_batch_norms, get_case

pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "adapters.onnx", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False, cwd=ROOT)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, path)
    return path


@pytest.fixture
def conv_bn(tmp_path) -> Path:
    return _save(get_case("conv2d_bn").build(), tmp_path / "conv_bn.onnx")


def _assert_bad_input(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _folded_by_hand(model: onnx.ModelProto, scale_channel: int | None = None) -> onnx.ModelProto:
    """conv2d_bn (Conv -> BatchNormalization -> Relu) folded with refimpl, optionally with one channel wrong."""
    params = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    scale, shift, mean, var = (params[i] for i in bn.input[1:])
    weight, bias = refimpl.fold_conv_bn(params[conv.input[1]], params[conv.input[2]], mean, var, 1e-5, scale, shift)
    if scale_channel is not None:
        weight[scale_channel] *= 1.25
    folded = onnx.ModelProto.FromString(model.SerializeToString())
    nodes = [n for n in folded.graph.node if n.op_type != "BatchNormalization"]
    for node in nodes:
        if node.op_type == "Conv":
            node.output[0] = bn.output[0]
    del folded.graph.node[:]
    folded.graph.node.extend(nodes)
    del folded.graph.initializer[:]
    folded.graph.initializer.extend([numpy_helper.from_array(weight.astype(np.float32), conv.input[1]),
                                     numpy_helper.from_array(bias.astype(np.float32), conv.input[2])])
    onnx.checker.check_model(folded, full_check=True)
    return folded


# --------------------------------------------------------------------------------------------------
# The main job


def test_main_job_folds_writes_and_reports(conv_bn, tmp_path):
    from adapters.onnx import verify

    out = tmp_path / "folded.onnx"
    result = _run(str(conv_bn), "-o", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "conv->bn" in result.stdout and "1 of 1 norm layer(s) folded" in result.stdout
    assert result.stdout.rstrip().endswith(f"wrote {out}")
    folded = onnx.load(out)
    onnx.checker.check_model(folded, full_check=True)
    assert count_batch_norms(folded) == 0
    assert verify(onnx.load(conv_bn), folded).ok


def test_main_job_json_with_verify(conv_bn, tmp_path, capsys):
    out = tmp_path / "folded.onnx"
    assert main([str(conv_bn), "-o", str(out), "--json", "--verify"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(p["norm"], p["layer"], p["kind"]) for p in data["report"]["folded"]] == [("bn", "conv", "conv->bn")]
    assert data["verify"]["ok"] is True and data["output"] == str(out)


def test_main_job_bad_values_are_named_and_nothing_is_written(tmp_path):
    model = get_case("conv2d_bn").build()
    for tensor in model.graph.initializer:
        if tensor.name.endswith(".var"):
            values = numpy_helper.to_array(tensor).copy()
            values[1] = -3.0
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    path = _save(model, tmp_path / "negative_variance.onnx")
    out = tmp_path / "out.onnx"
    _assert_bad_input(_run(str(path), "-o", str(out)), "cannot fold", "channel 1", "-3.0")
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# Bad input of the main job: one line, exit 2, nothing written


def test_missing_model_file(tmp_path):
    out = tmp_path / "out.onnx"
    _assert_bad_input(_run(str(tmp_path / "absent.onnx"), "-o", str(out)), "absent.onnx", "no such file")
    assert not out.exists()


def test_model_path_is_a_directory(tmp_path):
    out = tmp_path / "out.onnx"
    _assert_bad_input(_run(str(tmp_path), "-o", str(out)), "is a directory")
    assert not out.exists()


def test_not_an_onnx_file(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07this is not a protobuf\xff\xff\xff")
    out = tmp_path / "out.onnx"
    _assert_bad_input(_run(str(garbage), "-o", str(out)), "garbage.onnx", "not a readable ONNX model")
    assert not out.exists()


def test_invalid_model(tmp_path):
    model = get_case("conv2d_bn").build()
    del model.graph.initializer[0]  # the conv's weight is now read but never defined
    path = _save(model, tmp_path / "invalid.onnx")
    out = tmp_path / "out.onnx"
    _assert_bad_input(_run(str(path), "-o", str(out)), "invalid.onnx", "not a valid ONNX model")
    assert not out.exists()


@pytest.mark.parametrize("opset, needle", [(6, "opset 6: unsupported"), (99, "newer than the installed onnx")])
def test_unsupported_opset(tmp_path, opset, needle):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    path = tmp_path / "old.onnx"
    path.write_bytes(model.SerializeToString())
    out = tmp_path / "out.onnx"
    _assert_bad_input(_run(str(path), "-o", str(out)), needle)
    assert not out.exists()


def test_output_in_a_missing_directory(conv_bn, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "out.onnx"
    _assert_bad_input(_run(str(conv_bn), "-o", str(out)), "does not exist")
    assert not out.parent.exists()


def test_output_is_a_directory(conv_bn, tmp_path):
    _assert_bad_input(_run(str(conv_bn), "-o", str(tmp_path)), "is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv_bn.onnx"]


def test_output_is_the_input(conv_bn):
    before = conv_bn.read_bytes()
    _assert_bad_input(_run(str(conv_bn), "-o", str(conv_bn)), "is the input model")
    assert conv_bn.read_bytes() == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_output_not_writable(conv_bn, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _assert_bad_input(_run(str(conv_bn), "-o", str(locked / "out.onnx")), "permission denied")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


# --------------------------------------------------------------------------------------------------
# verify


def test_verify_subcommand_passes_a_correct_fold_and_fails_a_wrong_one(conv_bn, tmp_path):
    original = onnx.load(conv_bn)
    good = _save(_folded_by_hand(original), tmp_path / "good.onnx")
    bad = _save(_folded_by_hand(original, scale_channel=2), tmp_path / "bad.onnx")
    result = _run("verify", str(conv_bn), str(good), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["ok"] is True
    result = _run("verify", str(conv_bn), str(bad))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith("FAILED") and "relu_out: " in result.stdout and "EXCEEDS" in result.stdout


def test_verify_subcommand_bad_input(conv_bn, tmp_path, capsys):
    _assert_bad_input(_run("verify", str(conv_bn), str(tmp_path / "absent.onnx")), "folded model", "no such file")
    for args, needle in [(["--input-shape", "image=2,3,6,6"], "no graph input 'image'"),
                         (["--input-shape", "2,three,6,6"], "comma-separated integers"),
                         (["--input-shape", "x=2,5,6,6"], "contradicts the fixed dims"),
                         (["--input-shape", "2,3,6,6", "--input-shape", "2,3,6,6"], "more shapes than graph inputs")]:
        assert main(["verify", str(conv_bn), str(conv_bn), *args]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and needle in captured.err, captured.err


# --------------------------------------------------------------------------------------------------
# audit


def test_audit_subcommand_bad_pass_names(capsys):
    _assert_bad_input(_run("audit", "no_such_module_xyz:fold"), "cannot import module 'no_such_module_xyz'")
    for args, needle in [(["adapters.onnx.suite.peers:no_such_pass"], "has no attribute 'no_such_pass'"),
                         (["adapters.onnx.suite.peers:PEERS.keys.__doc__"], "not a function"),
                         (["adapters.onnx.suite.peers"], "must be given as 'package.module:function'"),
                         (["adapters.onnx.suite.peers:onnxoptimizer_fuse_bn", "--select", "no_such_case"],
                          "matches no case")]:
        assert main(["audit", *args]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1 and needle in captured.err, captured.err


def test_audit_subcommand_runs_a_pass(capsys):
    assert main(["audit", "adapters.onnx.suite.peers:onnxscript_fuse_bn", "--select", "conv2d_bn",
                 "--select", "conv_relu_bn", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| conv2d_bn | conv->bn | ok |" in out and "| conv_relu_bn | trap | ok |" in out


def test_help(capsys):
    for args in ([], ["verify"], ["audit"]):
        with pytest.raises(SystemExit) as exited:
            main([*args, "--help"])
        assert exited.value.code == 0
        assert "usage: python -m adapters.onnx" in capsys.readouterr().out


def test_the_console_script_runs_the_onnx_tools(conv_bn, tmp_path, capsys):
    from adapters.cli import main as bnfold

    folded_path = tmp_path / "folded.onnx"
    assert bnfold(["onnx", str(conv_bn), "-o", str(folded_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["report"]
    assert len(report["folded"]) == 1 and report["skipped"] == []
    assert count_batch_norms(onnx.load(folded_path)) == 0
    assert bnfold(["onnx", "verify", str(conv_bn), str(folded_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    with pytest.raises(SystemExit):
        bnfold(["onnx", "verify", "--help"])
    assert capsys.readouterr().out.startswith("usage: bnfold onnx verify")

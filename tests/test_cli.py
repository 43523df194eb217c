"""The command line: the main job, --model/--json/-o on a user's model, the verify subcommand, --help.

Factories for ``--model`` are defined here and imported by the CLI as ``test_cli:<name>`` (the
tests directory is put on ``PYTHONPATH`` for the subprocesses).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from adapters.torch.__main__ import main
from adapters.torch.checking import verify
from adapters.torch.suite.demo import DEFAULT_CASES

TESTS = Path(__file__).resolve().parent


def small_net() -> nn.Module:
    """conv -> bn -> relu -> conv -> bn -> pool -> flatten -> linear: 2 norms, both foldable (conv -> bn)."""
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 4, 3, bias=False), nn.BatchNorm2d(4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def relu_first_net() -> nn.Module:
    """conv -> relu -> bn: the norm has nothing to fold into and stays."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))


def not_a_module() -> str:
    return "not a module"


def scale_one_channel(model: nn.Module) -> nn.Module:
    """A broken 'fuser' for the verify subcommand: scales output channel 1 of the first conv by 1.5."""
    with torch.no_grad():
        model[0].weight[1] *= 1.5
    return model


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "adapters.torch", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_main_job_prints_a_row_per_model():
    result = _run("--repeats", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["model", "norms", "folded", "left"]
    rows = {line.split()[0]: line for line in lines[2:2 + len(DEFAULT_CASES)]}
    assert list(rows) == list(DEFAULT_CASES)
    assert all(row.rstrip().endswith("ok") for row in rows.values()), result.stdout
    # Hand-worked: conv -> BN -> BN folds both; BN -> zero-padded conv is left for its padding.
    assert rows["conv_bn_bn"].split()[1:4] == ["2", "2", "0"]
    assert rows["bn_conv2d_zero_padding"].split()[1:5] == ["1", "0", "1", "(zero_padding)"]
    assert f"{len(DEFAULT_CASES)} of {len(DEFAULT_CASES)} fused models verified" in result.stdout
    # The table explains its columns, the error ratio's limit included, and points to --model.
    assert "error ratio     the fused model's relative RMS error" in result.stdout
    assert "at most 4 passes" in result.stdout
    assert result.stdout.rstrip().splitlines()[-3].startswith("your own model: python -m adapters.torch --model ")
    # Progress goes to stderr, one line per model.
    assert len([line for line in result.stderr.splitlines() if line.startswith("[")]) == len(DEFAULT_CASES)


def test_model_json_round_trip():
    result = _run("--model", "test_cli:small_net", "--input-shape", "2,3,8,8", "--random-stats", "--json",
                  "--repeats", "2", "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert json.loads(json.dumps(data)) == data
    assert data["ok"] is True and data["dtype"] == "float32" and data["device"] == "cpu"
    [row] = data["models"]
    assert row["name"] == "test_cli:small_net"
    assert (row["norms_found"], row["folded"], row["left"]) == (2, 2, 0)
    assert {(p["norm"], p["layer"], p["kind"]) for p in row["report"]["folded"]} == {
        ("1", "0", "conv->bn"), ("4", "3", "conv->bn")}
    assert row["verdict"]["ok"] is True and row["ratio"] <= 4
    assert row["unfused_seconds"] > 0 and row["fused_seconds"] > 0
    # The documented definition; JSON keeps floats exactly, so the quotient is reproduced bit for bit.
    assert row["speedup"] == row["unfused_seconds"] / row["fused_seconds"]


def test_output_file_is_a_loadable_fused_model(tmp_path, capsys):
    path = tmp_path / "fused.pt"
    code = main(["--model", "test_cli:small_net", "--input-shape", "2,3,8,8", "--random-stats", "--seed", "3",
                 "--repeats", "1", "-q", "-o", str(path)])
    assert code == 0
    assert "test_cli:small_net" in capsys.readouterr().out
    fused = torch.load(path, weights_only=False)
    assert isinstance(fused, nn.Sequential)
    assert [type(m).__name__ for m in fused][:5] == ["Conv2d", "Identity", "ReLU", "Conv2d", "Identity"]
    # Rebuild the original the way the CLI did (same seed) and check the saved model against it.
    from adapters.torch.suite.demo import load_user_model
    original, inputs = load_user_model("test_cli:small_net", input_shape=(2, 3, 8, 8), random_stats=True, seed=3)
    assert verify(original, fused, *inputs).ok

    # The verify subcommand accepts the saved file, and fails a broken fuser naming the layer after it.
    assert main(["verify", "--model", "test_cli:small_net", "--input-shape", "2,3,8,8", "--random-stats",
                 "--seed", "3", "--fused", str(path)]) == 0
    assert capsys.readouterr().out.startswith("OK: fused model vs float64 reference (float32)")
    assert main(["verify", "--model", "test_cli:small_net", "--input-shape", "2,3,8,8", "--random-stats",
                 "--fuser", "test_cli:scale_one_channel", "--json"]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["ok"] is False and verdict["first_divergence"]["module"] == "2"  # the ReLU after conv 0


def test_skipped_norms_and_reasons_in_json(capsys):
    assert main(["--model", "test_cli:relu_first_net", "--input-shape", "1,3,6,6", "--json", "-q",
                 "--repeats", "1"]) == 0
    [row] = json.loads(capsys.readouterr().out)["models"]
    assert (row["norms_found"], row["folded"], row["left"]) == (1, 0, 1)
    assert row["left_reasons"] == {"no_fusable_neighbour": 1}


def test_verify_a_state_dict_file_is_refused(tmp_path, capsys):
    path = tmp_path / "state.pt"
    torch.save(small_net().state_dict(), path)
    assert main(["verify", "--model", "test_cli:small_net", "--input-shape", "1,3,6,6", "--fused", str(path)]) == 2
    assert "not a whole nn.Module" in capsys.readouterr().err


class TestArguments:
    @pytest.mark.parametrize("args", [[], ["verify"], ["audit"]])
    def test_help(self, args, capsys):
        with pytest.raises(SystemExit) as info:
            main([*args, "--help"])
        assert info.value.code == 0
        assert "usage: python -m adapters.torch" in capsys.readouterr().out

    def test_main_help_documents_every_option(self, capsys):
        with pytest.raises(SystemExit):
            main(["--help"])
        out = capsys.readouterr().out
        for option in ("--model", "--checkpoint", "--input-shape", "--dtype", "--device", "-o", "--json",
                       "whole module", "verify", "audit", "speedup", "error ratio"):
            assert option in out, option

    @pytest.mark.parametrize("args, message", [
        (["-o", "x.pt"], "-o/--output needs --model"),
        (["--model", "test_cli:small_net", "--case", "conv1d_bn"], "cannot be combined with --model"),
        (["--case", "no_such_case"], "unknown case(s) ['no_such_case']"),
        (["--dtype", "int8"], "invalid choice: 'int8'"),
        (["verify", "--model", "test_cli:small_net"], "one of the arguments --fused --fuser is required"),
    ])
    def test_usage_errors_exit_2(self, args, message, capsys):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2
        assert message in capsys.readouterr().err

    @pytest.mark.parametrize("args, message", [
        (["--model", "test_cli:not_a_module"], "returned str, not an nn.Module"),
        (["--model", "test_cli:small_net", "--input-shape", "1,x,8"], "comma-separated positive integers"),
        (["--model", "test_cli:no_such_factory"], "has no attribute 'no_such_factory'"),
    ])
    def test_bad_models_exit_2(self, args, message, capsys):
        assert main(args) == 2
        assert message in capsys.readouterr().err

    def test_checkpoint_is_loaded(self, tmp_path, capsys):
        torch.manual_seed(7)
        net = small_net()
        with torch.no_grad():
            net[1].running_var.fill_(4.0)
        path = tmp_path / "ckpt.pth"
        torch.save({"state_dict": net.state_dict(), "epoch": 3}, path)
        out_path = tmp_path / "fused.pt"
        assert main(["--model", "test_cli:small_net", "--checkpoint", str(path), "--input-shape", "1,3,6,6",
                     "-q", "--repeats", "1", "-o", str(out_path)]) == 0
        fused = torch.load(out_path, weights_only=False)
        x = torch.randn(1, 3, 6, 6)
        with torch.no_grad():
            assert verify(net.eval(), fused, x).ok


def test_wrong_input_shape_for_the_model_exits_2(capsys):
    assert main(["--model", "test_cli:small_net", "--input-shape", "2,8", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: test_cli:small_net with input shape (2, 8): ")


def counting_net() -> nn.Module:
    """small_net, counting its builds: a command that fails early must not build the model."""
    counting_net.builds += 1
    return small_net()


counting_net.builds = 0


class _Unpicklable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.post = lambda t: t * 2  # a lambda attribute: torch.save cannot pickle the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.bn(self.conv(x)))


def unpicklable_net() -> nn.Module:
    return _Unpicklable()


MODEL_FILE = '''\
from torch import nn


def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def broken():
    return _config()["layers"]


def _config():
    return {}
'''


@pytest.fixture
def restore_imports(monkeypatch):
    """--model path/to/file.py imports the file as a module and puts its folder on sys.path: undo both."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def write_model_file(folder: Path, stem: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.py"
    path.write_text(MODEL_FILE, encoding="utf-8")
    return path


def one_error_line(err: str) -> str:
    """The single line a CLI error must be: 'error: ...', no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


class TestBadFilesAndMessages:
    def test_checkpoint_holding_a_whole_model_is_refused_in_one_line(self, tmp_path, capsys):
        path = tmp_path / "whole.pt"
        torch.save(small_net(), path)  # the format -o writes
        assert main(["--model", "test_cli:small_net", "--checkpoint", str(path), "--input-shape", "1,3,6,6",
                     "-q"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "holds pickled Python objects" in line and "state_dict" in line and "verify --fused" in line

    def test_corrupt_checkpoint_and_corrupt_fused_file(self, tmp_path, capsys):
        whole = tmp_path / "whole.pt"
        torch.save(small_net(), whole)
        corrupt = tmp_path / "corrupt.pt"
        corrupt.write_bytes(whole.read_bytes()[:200])  # truncated
        assert main(["--model", "test_cli:small_net", "--checkpoint", str(corrupt), "--input-shape", "1,3,6,6",
                     "-q"]) == 2
        assert "is not a readable torch.save file" in one_error_line(capsys.readouterr().err)
        assert main(["verify", "--model", "test_cli:small_net", "--input-shape", "1,3,6,6", "--fused",
                     str(corrupt)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: --fused {str(corrupt)!r} is not a readable torch.save file")

    def test_checkpoint_that_does_not_fit_the_model(self, tmp_path, capsys):
        path = tmp_path / "other.pt"
        torch.save(relu_first_net().state_dict(), path)
        assert main(["--model", "test_cli:small_net", "--checkpoint", str(path), "--input-shape", "1,3,6,6",
                     "-q"]) == 2
        assert "does not fit test_cli:small_net" in one_error_line(capsys.readouterr().err)

    def test_output_into_a_missing_folder_fails_before_any_work(self, tmp_path, capsys):
        builds = counting_net.builds
        target = tmp_path / "no_such_folder" / "fused.pt"
        assert main(["--model", "test_cli:counting_net", "--input-shape", "1,3,6,6", "-o", str(target)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "the folder" in line and "does not exist" in line
        assert counting_net.builds == builds  # refused before the model was built
        assert main(["--model", "test_cli:counting_net", "--input-shape", "1,3,6,6", "-o", str(tmp_path)]) == 2
        assert "is a folder" in one_error_line(capsys.readouterr().err)

    def test_unsaveable_model_leaves_no_file(self, tmp_path, capsys):
        target = tmp_path / "fused.pt"
        assert main(["--model", "test_cli:unpicklable_net", "--input-shape", "1,3,6,6", "-q", "--repeats", "1",
                     "-o", str(target)]) == 2
        assert one_error_line(capsys.readouterr().err).startswith(f"error: cannot save the fused model to "
                                                                  f"{str(target)!r}")
        assert not target.exists()

    def test_factory_that_raises_names_the_exception_and_where(self, tmp_path, capsys, restore_imports):
        path = write_model_file(tmp_path / "nets", "cli_raising_net")
        assert main(["--model", f"{path}:broken", "--input-shape", "1,3,6,6", "-q"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "the factory raised KeyError: 'layers'" in line
        assert f"(at {path}:" in line and "in broken)" in line

    def test_module_not_found_hints_at_the_working_directory(self, tmp_path, capsys, monkeypatch):
        monkeypatch.chdir(tmp_path)
        assert main(["--model", "no_such_module_here:build", "-q"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"working directory {tmp_path}" in line and "--model path/to/no_such_module_here.py:FACTORY" in line


class TestModelFromAFile:
    def test_path_to_file_and_file_from_its_folder(self, tmp_path, capsys, monkeypatch, restore_imports):
        path = write_model_file(tmp_path / "nets", "cli_file_net")
        assert main(["--model", f"{path}:build", "--input-shape", "1,3,6,6", "--json", "-q",
                     "--repeats", "1"]) == 0
        [row] = json.loads(capsys.readouterr().out)["models"]
        assert (row["norms_found"], row["folded"], row["left"]) == (1, 1, 0)
        monkeypatch.chdir(path.parent)
        assert main(["--model", "cli_file_net.py:build", "--input-shape", "1,3,6,6", "--json", "-q",
                     "--repeats", "1"]) == 0
        [row] = json.loads(capsys.readouterr().out)["models"]
        assert row["name"] == "cli_file_net.py:build" and row["folded"] == 1

    def test_missing_file(self, tmp_path, capsys):
        assert main(["--model", f"{tmp_path / 'absent.py'}:build", "-q"]) == 2
        assert "is not a file" in one_error_line(capsys.readouterr().err)


def test_single_model_progress_is_stage_by_stage(capsys):
    assert main(["--model", "test_cli:small_net", "--input-shape", "1,3,6,6", "--repeats", "1"]) == 0
    stages = [line.split(": ", 1)[1] for line in capsys.readouterr().err.splitlines()
              if line.startswith("[1/1] test_cli:small_net: ")]
    assert [s.split(" ")[0] for s in stages] == ["building", "fusing", "fused", "verified", "done"]
    assert stages[2].startswith("fused (2 of 2 norm layers folded) after ")


def test_half_precision_on_the_cpu_warns(capsys):
    assert main(["--model", "test_cli:small_net", "--input-shape", "1,3,6,6", "--dtype", "bfloat16", "-q",
                 "--repeats", "1"]) == 0
    err = capsys.readouterr().err
    assert "warning: bfloat16 on the CPU: torch's CPU half-precision kernels are slow" in err
    assert main(["--model", "test_cli:small_net", "--input-shape", "1,3,6,6", "-q", "--repeats", "1"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_reader_that_goes_away_ends_the_cli_quietly():
    """`bnfold ... | head`: the pipe closes while output is still written; one exit status, no traceback."""
    root = Path(__file__).resolve().parents[1]
    code = ("import sys\nfrom adapters.cli import run\n"
            "def job():\n    for _ in range(100000):\n        print('x' * 100)\n    return 0\n"
            "run(job)\n")
    env = {**os.environ, "PYTHONPATH": str(root)}
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env, cwd=root)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.read(10)
    process.stdout.close()  # what `head` does after its lines
    with process.stderr:
        stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 1
    assert stderr == ""

"""The wheel, installed without a checkout: it ships the conformance vectors, and ``bnfold`` works.

The project's files are copied to a temporary folder, built into a wheel there (offline:
``pip wheel --no-build-isolation`` with the test environment's setuptools) and installed with
``pip install --target`` into a folder of their own. Every command then runs from a third folder
with only that install on ``PYTHONPATH``, so nothing can come from the checkout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from refimpl import conformance

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "refimpl", "adapters", "spec/vectors"]

if importlib.util.find_spec("setuptools") is None:
    pytest.skip("building the wheel offline needs setuptools (the 'test' extra)", allow_module_level=True)


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def install(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    for name in SOURCES:
        origin = ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, source / name)
    pip_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "-w", str(base / "dist"), str(source)], base, pip_env)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = (base / "dist").glob("bnfold-*.whl")
    site = base / "site"
    installed = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site),
                      str(wheel)], base, pip_env)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    results = elsewhere / "results.json"
    results.write_text(json.dumps(conformance.reference_results(conformance.load_vectors(conformance.VECTORS_DIR))),
                       encoding="utf-8")
    return {"site": site, "cwd": elsewhere, "results": results}


def _installed(install: dict[str, Path], *args: str) -> subprocess.CompletedProcess:
    """Run a command with only the installed wheel importable (and the test environment's numpy)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(install["site"])
    return _run(list(args), install["cwd"], env)


def test_the_wheel_ships_the_vectors_byte_for_byte(install):
    shipped = install["site"] / "refimpl" / "conformance" / "vectors"
    committed = sorted(p.name for p in conformance.VECTORS_DIR.glob("*.json"))
    assert sorted(p.name for p in shipped.glob("*.json")) == committed
    for name in committed:
        assert (shipped / name).read_bytes() == (conformance.VECTORS_DIR / name).read_bytes(), name


def test_installed_refimpl_finds_its_vectors(install):
    done = _installed(install, sys.executable, "-c",
                      "import refimpl, refimpl.conformance as c; "
                      "print(refimpl.__file__); print(c.VECTORS_DIR); print(len(c.load_vectors()))")
    assert done.returncode == 0, done.stderr
    module_file, vectors_dir, count = done.stdout.split()
    assert Path(module_file).is_relative_to(install["site"])
    assert Path(vectors_dir) == install["site"] / "refimpl" / "conformance" / "vectors"
    assert int(count) == len(conformance.CASES)


def test_python_m_refimpl_check_uses_the_shipped_vectors(install):
    done = _installed(install, sys.executable, "-m", "refimpl", "check", str(install["results"]))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"against {len(conformance.CASES)} cases in {install['site']}" in done.stdout
    assert f"{len(conformance.CASES)} passed, 0 failed" in done.stdout


def test_console_script_check_fails_a_wrong_result_without_torch(install):
    results = json.loads(install["results"].read_text(encoding="utf-8"))
    del results["results"]["bn_linear"]
    broken = install["cwd"] / "broken.json"
    broken.write_text(json.dumps(results), encoding="utf-8")
    bnfold = install["site"] / "bin" / "bnfold"
    done = _installed(install, str(bnfold), "check", str(broken))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL  bn_linear: missing from the results" in done.stdout
    # `bnfold check` never imports torch: it works where torch cannot be imported at all.
    blocked = _installed(install, sys.executable, "-c",
                         "import sys; sys.modules['torch'] = None; from adapters.cli import main; "
                         f"sys.exit(main(['check', {str(install['results'])!r}]))")
    assert blocked.returncode == 0, blocked.stdout + blocked.stderr
    assert f"{len(conformance.CASES)} passed, 0 failed" in blocked.stdout


def test_console_script_lists_and_dispatches_its_commands(install):
    bnfold = str(install["site"] / "bin" / "bnfold")
    listing = _installed(install, bnfold, "--help")
    assert listing.returncode == 0
    for command in ("fuse", "verify", "audit", "vectors", "check", "results", "self-check"):
        assert f"\n  {command} " in listing.stdout, command
    assert _installed(install, bnfold, "nonsense").returncode == 2
    fuse_help = _installed(install, bnfold, "fuse", "--help")
    assert fuse_help.returncode == 0 and fuse_help.stdout.startswith("usage: bnfold fuse"), fuse_help.stderr
    vectors = _installed(install, bnfold, "vectors", "--out", "regenerated")
    assert vectors.returncode == 0, vectors.stderr
    regenerated = install["cwd"] / "regenerated"
    for path in conformance.VECTORS_DIR.glob("*.json"):
        assert (regenerated / path.name).read_bytes() == path.read_bytes(), path.name

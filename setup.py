"""Build step that ships the conformance vectors inside the wheel.

``spec/vectors/`` is the one source of the vectors. Building copies its JSON files into the
package being built, as ``refimpl/conformance/vectors/``, so that an installed wheel finds them
(``refimpl.conformance.VECTORS_DIR``) without a source checkout. Everything else about the
project is declared in ``pyproject.toml``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

VECTORS_SOURCE = Path(__file__).resolve().parent / "spec" / "vectors"
VECTORS_PACKAGE_DIR = Path("refimpl", "conformance", "vectors")


class BuildPyWithVectors(build_py):
    """``build_py`` that also copies ``spec/vectors/*.json`` into the built ``refimpl.conformance``."""

    def _vector_files(self) -> list[Path]:
        files = sorted(VECTORS_SOURCE.glob("*.json"))
        if not (VECTORS_SOURCE / "manifest.json").is_file():
            raise FileNotFoundError(f"{VECTORS_SOURCE}/manifest.json is missing: the conformance vectors cannot be "
                                    "shipped (regenerate them with `python -m refimpl vectors --out spec/vectors`)")
        return files

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / VECTORS_PACKAGE_DIR
        target.mkdir(parents=True, exist_ok=True)
        for source in self._vector_files():
            shutil.copyfile(source, target / source.name)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        shipped = [str(Path(self.build_lib) / VECTORS_PACKAGE_DIR / p.name) for p in self._vector_files()]
        return [*super().get_outputs(include_bytecode), *shipped]


setup(cmdclass={"build_py": BuildPyWithVectors})

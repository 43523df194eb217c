"""adapters.onnx imports and folds without torch: a fresh interpreter in which ``import torch`` fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import adapters.onnx
from adapters.onnx import fuse
from adapters.onnx.suite.cases import count_batch_norms, iter_cases
folded_total = 0
for case in iter_cases():
    model, _ = fuse(case.build())
    assert count_batch_norms(model) == case.norms_left, case.name
    folded_total += case.folds
assert sys.modules["torch"] is None
assert not any(name.startswith("torch.") for name in sys.modules), sorted(n for n in sys.modules if "torch" in n)
print("folded", folded_total)
"""


def test_fold_without_torch():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("folded ") and int(result.stdout.split()[1]) > 50

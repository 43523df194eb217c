"""Exported torchvision/timm networks: adapters.export folds exactly what adapters.torch folds, bit for bit, and
the folded program is right (verify's float64 reference)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("timm")

from adapters.export.suite.zoo import compare  # noqa: E402

pytestmark = pytest.mark.zoo


@pytest.mark.parametrize("name", ["torchvision/resnet18", "torchvision/mobilenet_v3_small",
                                  "torchvision/efficientnet_b0", "timm/mobilenetv3_large_100"])
def test_folds_equal_the_module_adapters(name):
    result = compare(name)
    assert result.folded == result.module_folded == result.norms > 0
    assert result.identical, result.mismatched
    assert result.ok, result

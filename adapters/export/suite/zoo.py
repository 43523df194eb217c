"""Exported torchvision and timm networks: folded by adapters.export, compared with the module adapter's folds.

Each entry builds a network without downloading anything (seeded random weights and statistics;
:mod:`adapters.torch.suite.zoo` builds the same entries for the module adapter) and exports it on a
small input. :func:`compare` folds the export and the module and reports whether every folded
parameter is bit-identical, with the verdict of the folded program against the float64
reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..checking import verify
from ..fusion import fuse
from .cases import randomize_norms

__all__ = ["ZOO", "build", "ZooComparison", "compare"]

#: name -> (library, architecture). Input 1 x 3 x 64 x 64.
ZOO = {
    "torchvision/resnet18": ("torchvision", "resnet18"),
    "torchvision/mobilenet_v3_small": ("torchvision", "mobilenet_v3_small"),
    "torchvision/efficientnet_b0": ("torchvision", "efficientnet_b0"),
    "timm/mobilenetv3_large_100": ("timm", "mobilenetv3_large_100"),
    "torchvision/resnet50": ("torchvision", "resnet50"),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Zoo entry ``name`` in eval mode with seeded random weights and BatchNorm statistics, and an input."""
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; known: {sorted(ZOO)}")
    library, arch = ZOO[name]
    torch.manual_seed(seed)
    if library == "torchvision":
        import torchvision
        model = torchvision.models.get_model(arch, weights=None)
    else:
        import timm
        model = timm.create_model(arch, pretrained=False)
    model = randomize_norms(model, seed).eval()
    x = torch.randn((1, 3, 64, 64), generator=torch.Generator().manual_seed(seed))
    return model, x


@dataclass(frozen=True)
class ZooComparison:
    name: str
    norms: int
    folded: int
    module_folded: int
    identical: bool
    mismatched: tuple[str, ...]
    ok: bool
    ratio: float
    seconds: float


def compare(name: str) -> ZooComparison:
    """Fold ``name`` exported (training IR) and as a module; compare the folded parameters bit for bit."""
    from ...torch import fuse as fuse_modules

    model, x = build(name)
    program = torch.export.export(model, (x,))
    start = time.process_time()
    folded, report = fuse(program)
    seconds = time.process_time() - start
    assert isinstance(folded, torch.export.ExportedProgram)  # fuse returns the kind it was given
    fused_module, module_report = fuse_modules(model, example_inputs=x)
    expected = {k: v for k, v in fused_module.state_dict().items() if isinstance(v, torch.Tensor)
                and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    # Norms the module adapter left keep their affine parameters; the export keeps them too.
    mismatched = sorted(k for k in expected.keys() | folded.state_dict.keys()
                        if k not in expected or k not in folded.state_dict
                        or not torch.equal(expected[k], folded.state_dict[k]))
    verdict = verify(torch.export.export(build(name)[0], (x,)), folded, x)
    return ZooComparison(name, report.norms_found, len(report.folded), len(module_report.folded), not mismatched,
                         tuple(mismatched), verdict.ok, verdict.ratio, seconds)

"""The public names of each package, pinned: a name added to or dropped from an ``__all__`` is a decision this
test makes visible. Every listed name exists, and the adapters share one set of report and verdict types."""

from __future__ import annotations

import importlib

import pytest

#: package -> its __all__, as the public API promises it.
PUBLIC = {
    "refimpl": ["bn_scale_shift", "fold_conv_bn", "fold_linear_bn", "fold_bn_conv", "fold_bn_linear", "ConvGeometry",
                "MergeError", "pad_kernel", "identity_kernel", "avg_pool_kernel", "scale_channels", "regroup_kernel",
                "add_branches", "compose_kernels", "merge_geometry", "compose_geometry", "check_padding_shift",
                "avg_pool_geometry", "Kernel", "sum_kernels", "chain_kernels", "conv", "conv_transpose",
                "batch_norm", "linear", "avg_pool", "UNIT_ROUNDOFF", "SAFETY", "MODEL_RATIO", "unit_roundoff",
                "error_bound", "Comparison", "compare", "assert_within", "relative_rms_error", "ModelComparison",
                "compare_models"],
    "adapters.report": ["FoldedPair", "SkippedNorm", "MergedBranches", "SkippedMerge", "FusionReport", "REASONS",
                        "REASON_PRIORITY", "FOLD_KINDS", "most_specific_reason"],
    "adapters.torch": ["fuse", "fuse_conv_bn", "reparameterize", "verify", "rounded_copy", "FusionReport",
                       "FoldedPair", "SkippedNorm", "MergedBranches", "SkippedMerge", "Verdict", "OutputCheck",
                       "LayerDivergence", "ModelRunError", "FoldedNormAct", "REASONS", "FOLD_KINDS"],
    "adapters.onnx": ["fuse", "fuse_bn", "verify", "rounded_copy", "FusionReport", "FoldedPair", "SkippedNorm",
                      "Verdict", "OutputCheck", "LayerDivergence", "ModelRunError", "REASONS", "FOLD_KINDS"],
    # -- adapters.export: its entry goes here (the torch.export adapter pins its own names) --
}

#: What the packages need besides numpy (a package whose dependency is absent is skipped).
NEEDS = {"adapters.torch": "torch", "adapters.onnx": "onnx", "adapters.export": "torch"}

#: The report and verdict types every adapter exports, each the very object of adapters.report / adapters.verdict.
SHARED = ("FusionReport", "FoldedPair", "SkippedNorm", "REASONS", "FOLD_KINDS", "Verdict", "OutputCheck",
          "LayerDivergence", "ModelRunError")


def _import(name: str):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    return importlib.import_module(name)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_all_is_pinned_and_every_name_exists(name):
    module = _import(name)
    assert list(module.__all__) == PUBLIC[name]
    assert len(set(module.__all__)) == len(module.__all__), "a name listed twice"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, missing


@pytest.mark.parametrize("name", sorted(n for n in PUBLIC if n.startswith("adapters.") and n != "adapters.report"))
def test_adapters_export_the_one_set_of_report_and_verdict_types(name):
    module = _import(name)
    report, verdict = importlib.import_module("adapters.report"), importlib.import_module("adapters.verdict")
    for shared in SHARED:
        if shared not in module.__all__ and name == "adapters.export":
            continue  # the export adapter may export fewer; what it exports must be the shared object
        assert shared in module.__all__, f"{name} does not export {shared}"
        origin = getattr(report, shared, None) or getattr(verdict, shared)
        assert getattr(module, shared) is origin, f"{name}.{shared} is not adapters' own {shared}"

"""Named conformance cases: language-neutral test vectors for other BatchNorm-folding (and branch-merging)
implementations.

Each case is a small function in :mod:`.cases` (folds) or :mod:`.merge_cases` (merges of parallel
branches and chains), registered by the :func:`case` decorator under its own name, that builds its
inputs from a fixed seed (or from hand-picked values) and computes the expected result with
``refimpl``: the fold functions or the kernel algebra of :mod:`refimpl.merge` in float64 for the
folded (merged) weight and bias, the float64 reference ops for the optional probe output, and the
expected verdict for layers that must not be folded or merged. The function's docstring is the
case's description. ``python -m refimpl vectors --out DIR`` writes one JSON file per case plus
``manifest.json``; ``python -m refimpl check VECTORS RESULTS`` judges another implementation's
results file. The formats are documented in ``spec/conformance.md``.

The modules, one job each:

- :mod:`.cases` -- the registry (:func:`case`, :data:`CASES`, :func:`build_case`) and the fold cases;
- :mod:`.merge_cases` -- the merge cases (registered with the same decorator);
- :mod:`.build` -- assembling a vector: expected values, tolerance, probe;
- :mod:`.layers` -- layer descriptions run with the float64 reference ops, the fold, magnitudes;
- :mod:`.branches` -- branch descriptions run with the reference ops, merged with ``refimpl.merge``,
  magnitudes and rounding counts of a merge;
- :mod:`.rounding` -- exact rounding to float16/bfloat16/float32 and raw bits;
- :mod:`.encoding` -- format tags, verdicts, tensors as JSON, deterministic JSON text;
- :mod:`.vectors` -- the manifest, writing and reading vector files, the shipped set;
- :mod:`.results` -- refimpl's own results file (a working example of the format);
- :mod:`.check` -- judging a results file against the vectors.

Tolerance policies (stated again in the manifest):

``error_model``
    Parameters stored in float32 or float64. Element ``i`` passes when
    ``|actual - expected| <= SAFETY * (gamma_n + u) * magnitude[i]``, with ``u`` the storage
    dtype's unit roundoff and ``n``, ``magnitude`` stored in the vector (see :mod:`refimpl.tolerance`).
``bit_exact``
    Parameters stored in float16 or bfloat16. The expected value is the float64 fold rounded once,
    to nearest-even, to the storage dtype; the result must have exactly these bits. The generator
    refuses a case whose float64 fold lies so close to a rounding midpoint that its own error could
    flip the rounding, so the expected bits are those of the exact real-number fold.
``verdict``
    Layers that must not be folded or merged (or whose parameters are invalid): the result is a
    verdict string.

A merge into a conv is also judged on its geometry (kernel size, stride, padding, dilation, groups,
padding mode), exactly.
"""

from . import merge_cases as _merge_cases  # noqa: F401 -- registers the merge cases
from .cases import CASES, build_all, build_case, case
from .check import CaseOutcome, ResultsFormatError, check_results
from .encoding import (
    FORMAT,
    MANIFEST_FORMAT,
    RESULTS_FORMAT,
    VERDICTS,
    decode_bn,
    decode_merge_inputs,
    decode_tensor,
    dumps,
)
from .layers import apply_bn, apply_layer, fold_magnitude, fold_pair, verify_fold
from .results import judge_verdict, reference_results
from .rounding import LOW_PRECISION, bits_to_values, round_to_dtype
from .vectors import VECTORS_DIR, load_vectors, manifest, write_vectors

__all__ = [
    "CASES", "case", "build_case", "build_all",
    "FORMAT", "MANIFEST_FORMAT", "RESULTS_FORMAT", "VERDICTS", "decode_tensor", "decode_bn", "decode_merge_inputs",
    "dumps",
    "apply_layer", "apply_bn", "fold_pair", "fold_magnitude", "verify_fold",
    "LOW_PRECISION", "round_to_dtype", "bits_to_values",
    "VECTORS_DIR", "manifest", "write_vectors", "load_vectors",
    "judge_verdict", "reference_results",
    "CaseOutcome", "ResultsFormatError", "check_results",
]

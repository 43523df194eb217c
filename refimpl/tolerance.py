"""The error model: how far a computation in some precision may be from the float64 reference.

Every float comparison in the project goes through this module (see ``spec/folding.md``,
"Error model and tolerance policy").

A dot product of length ``n`` computed in a precision with unit roundoff ``u`` has forward error

    |fl(sum_i w_i x_i) - sum_i w_i x_i|  <=  gamma_n * sum_i |w_i x_i|,   gamma_n = n u / (1 - n u)

(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., eq. 3.5), whatever the
summation order. Rounding the result to the storage dtype adds at most ``u * |y|`` more. The
*magnitude* ``sum_i |w_i x_i|`` is obtained by running the same reference op on ``|x|`` and
``|w|`` (plus ``|b|``), so it is exact in float64 for any layer.

The bound used is ``SAFETY * (gamma_n + u) * magnitude``. ``SAFETY = 2`` covers what the plain
dot-product model does not: the per-channel scale-and-shift of an unfused BatchNorm (two more
roundings per element), the one extra product per weight when a folded weight is applied, and
convolution algorithms that re-associate more than a dot product does (Winograd and FFT
variants in cuDNN and oneDNN, whose worst cases exceed the dot-product bound by a small
constant). It is not a fudge for sloppiness: typical errors are ``~sqrt(n) u`` times the
magnitude, far inside the bound, while a wrong fold (a misplaced channel scale, a lost shift, a
padding border) is off by a fraction of the magnitude itself, many orders of magnitude beyond it.
Unit-in-the-last-place questions (is a stored fp16 weight the correctly rounded fold?) are not
judged by this bound but bit for bit (``spec/conformance.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["UNIT_ROUNDOFF", "SAFETY", "MODEL_RATIO", "unit_roundoff", "error_bound", "Comparison", "compare",
           "assert_within", "relative_rms_error", "ModelComparison", "compare_models", "perturb_once"]

#: Unit roundoff ``u`` (half the machine epsilon) of each compute precision. TF32 keeps fp16's
#: 10-bit mantissa with fp32's range; bf16 keeps 7 bits.
UNIT_ROUNDOFF: dict[str, float] = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "tf32": 2.0**-11,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}

#: Safety factor applied on top of the worst-case dot-product bound (module docstring says why).
SAFETY = 2.0


def _dtype_name(dtype: Any) -> str:
    """Map numpy dtypes, torch dtypes and strings ('fp16', 'half', 'tf32', ...) to a key of UNIT_ROUNDOFF."""
    name = str(dtype).removeprefix("torch.").lower()
    aliases = {"double": "float64", "float": "float32", "fp32": "float32", "half": "float16", "fp16": "float16",
               "bf16": "bfloat16", "fp64": "float64"}
    name = aliases.get(name, name)
    if name not in UNIT_ROUNDOFF:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            pass
    if name not in UNIT_ROUNDOFF:
        raise ValueError(f"no unit roundoff known for dtype {dtype!r}; known: {sorted(UNIT_ROUNDOFF)}")
    return name


def unit_roundoff(dtype: Any) -> float:
    """Unit roundoff of a precision given as a numpy dtype, torch dtype or name ('tf32', 'bf16', ...).

    >>> unit_roundoff("float16") == 2.0**-11
    True
    """
    return UNIT_ROUNDOFF[_dtype_name(dtype)]


def error_bound(magnitude: Any, n: int, dtype: Any, *, safety: float = SAFETY) -> np.ndarray:
    """Largest admissible |computed - reference| per element.

    Parameters
    ----------
    magnitude : array_like
        ``sum_i |w_i x_i|`` for each output element (the reference op run on absolute values).
    n : int
        Reduction length of each output element (e.g. ``in/groups * prod(kernel)`` for a conv),
        plus the number of further operations applied to it in sequence (a BatchNorm adds 2).
    dtype
        The compute precision being judged.
    safety : float
        Multiplier on the worst-case bound; :data:`SAFETY` unless a test states why otherwise.

    Returns
    -------
    numpy.ndarray
        ``safety * (gamma_n + u) * magnitude`` in float64.

    >>> float(error_bound(1.0, 1, "float64", safety=1.0)) > 2.0**-53
    True
    """
    if n < 1:
        raise ValueError(f"reduction length n must be >= 1, got {n}")
    u = unit_roundoff(dtype)
    if n * u >= 1:
        raise ValueError(f"n={n} is too long for dtype {dtype!r} (n*u={n * u:.3g} >= 1): the bound is vacuous")
    gamma = n * u / (1 - n * u)
    return safety * (gamma + u) * np.abs(np.asarray(magnitude, dtype=np.float64))


@dataclass(frozen=True)
class Comparison:
    """Outcome of comparing an array with its reference under a bound.

    ``ratio`` is ``max |actual - expected| / bound``: the comparison passes when it is <= 1.
    ``index`` is the worst element (largest ratio), with both values and the bound there.
    """

    ok: bool
    ratio: float
    index: tuple[int, ...]
    actual: float
    expected: float
    bound: float
    max_abs_error: float

    def describe(self, what: str = "result") -> str:
        status = "within" if self.ok else "EXCEEDS"
        return (f"{what}: worst element at index {self.index}: actual={self.actual!r}, expected={self.expected!r}, "
                f"|diff|={abs(self.actual - self.expected):.3e}, bound={self.bound:.3e} "
                f"(ratio {self.ratio:.3g}, {status} the error model); max |diff| overall {self.max_abs_error:.3e}")


def _to_numpy64(x: Any) -> np.ndarray:
    # torch tensors (any device, any float dtype incl. bf16) expose .detach().cpu(); numpy has no bf16.
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def compare(actual: Any, expected: Any, bound: Any) -> Comparison:
    """Compare ``actual`` with ``expected`` element-wise against ``bound`` (broadcast).

    Shapes of ``actual`` and ``expected`` must agree exactly. Non-finite values in ``actual``
    fail unless ``expected`` holds the same value at that position.
    """
    a, e = _to_numpy64(actual), _to_numpy64(expected)
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: actual {a.shape} vs expected {e.shape}")
    b = np.broadcast_to(_to_numpy64(bound), e.shape)
    if a.size == 0:
        return Comparison(True, 0.0, (), 0.0, 0.0, 0.0, 0.0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        same = (a == e)  # also covers equal infinities
        diff = np.where(same, 0.0, np.abs(a - e))
        diff = np.where(np.isnan(diff), np.inf, diff)
        ratio = np.where(diff == 0, 0.0, np.where(b > 0, diff / b, np.inf))
    flat = int(np.argmax(ratio))
    index = tuple(int(i) for i in np.unravel_index(flat, e.shape))
    worst = float(ratio.flat[flat])
    return Comparison(ok=worst <= 1.0, ratio=worst, index=index, actual=float(a.flat[flat]),
                      expected=float(e.flat[flat]), bound=float(b.flat[flat]), max_abs_error=float(diff.max()))


def assert_within(actual: Any, expected: Any, bound: Any, what: str = "result") -> Comparison:
    """Test helper: :func:`compare`, raising ``AssertionError`` with the worst element when it fails."""
    result = compare(actual, expected, bound)
    if not result.ok:
        raise AssertionError(result.describe(what))
    return result


#: Whole networks: how much larger the fused model's error may be than the unfused model's own.
#: A per-element bound through dozens of layers and nonlinearities is vacuous, so a network is
#: judged relative to itself: run the original in float64 (the reference), the original in the
#: compute dtype and the fused model in the compute dtype, and compare their relative RMS errors.
#: Folding in float64 and rounding once performs *fewer* roundings than the unfused model, so the
#: expected ratio is <= 1; two error norms over one batch fluctuate, and 4 leaves room for that
#: while a wrong fold (lost activation, wrong channel, wrong padding) is off by orders of magnitude.
MODEL_RATIO = 4.0


def relative_rms_error(actual: Any, reference: Any) -> float:
    """``||actual - reference||_2 / ||reference||_2`` over all elements, in float64."""
    a, r = _to_numpy64(actual), _to_numpy64(reference)
    if a.shape != r.shape:
        raise ValueError(f"shape mismatch: actual {a.shape} vs reference {r.shape}")
    denominator = float(np.linalg.norm(r.ravel()))
    numerator = float(np.linalg.norm((a - r).ravel()))
    if denominator == 0:
        return 0.0 if numerator == 0 else float("inf")
    return numerator / denominator


@dataclass(frozen=True)
class ModelComparison:
    """Fused vs unfused network errors against the float64 reference (see :data:`MODEL_RATIO`).

    ``baseline`` is the error the fused model is allowed to be compared with: the largest of the
    unfused model's own error, the errors of its parameter-rounded copies (if given) and ``u``.
    """

    ok: bool
    fused_error: float
    unfused_error: float
    limit: float
    perturbed_error: float = 0.0

    @property
    def ratio(self) -> float:
        return self.fused_error / max(self.unfused_error, np.finfo(np.float64).tiny)

    def describe(self, what: str = "fused model") -> str:
        status = "within" if self.ok else "EXCEEDS"
        rounded = (f", with its parameters rounded once more {self.perturbed_error:.3e}" if self.perturbed_error
                   else "")
        return (f"{what}: relative RMS error {self.fused_error:.3e} vs the unfused model's own {self.unfused_error:.3e}"
                f"{rounded} (limit {self.limit:.3e} = {MODEL_RATIO:g} x the larger of those and u); {status} the "
                "error model")


def compare_models(fused: Any, unfused: Any, reference: Any, dtype: Any, *, ratio: float = MODEL_RATIO,
                   perturbed: Sequence[Any] = ()) -> ModelComparison:
    """Judge a fused network's output against the float64 ``reference`` run of the original.

    ``unfused`` is the original network run in the same compute ``dtype`` as ``fused``. Passes
    when the fused error is at most ``ratio * max(unfused error, perturbed errors, u(dtype))``;
    the floor ``u`` keeps a float64 or exactly-representable comparison from demanding zero error.

    ``perturbed``: outputs of the original run in ``dtype`` with every parameter and statistic
    multiplied by ``1 + delta``, ``|delta| <= u`` (one more rounding of each). A fused model *must*
    round its folded parameters to the dtype, so its error is of that size whenever the network is
    more sensitive to its parameters than to the rounding of its activations (a shift folded
    through a conv that nearly cancels its bias, say) -- where the unfused error alone is a
    lucky, too-small yardstick.
    """
    fused_error = relative_rms_error(fused, reference)
    unfused_error = relative_rms_error(unfused, reference)
    perturbed_error = max((relative_rms_error(p, reference) for p in perturbed), default=0.0)
    limit = ratio * max(unfused_error, perturbed_error, unit_roundoff(dtype))
    return ModelComparison(ok=fused_error <= limit, fused_error=fused_error, unfused_error=unfused_error,
                           limit=limit, perturbed_error=perturbed_error)


def perturb_once(values: Any, dtype: Any, rng: np.random.Generator) -> np.ndarray:
    """``values * (1 + delta)`` in float64, ``delta`` uniform in ``[-u, u]`` per element, ``u`` of ``dtype``.

    Stored back in ``dtype``, this is one more rounding of every element: the parameters of the
    ``perturbed`` baseline of :func:`compare_models`.

    >>> y = perturb_once(np.ones(1000), "float16", np.random.default_rng(0))
    >>> bool(np.all(np.abs(y - 1) <= 2.0**-11)) and bool(np.any(y != 1))
    True
    """
    x = np.asarray(values, dtype=np.float64)
    u = unit_roundoff(dtype)
    return x * (1 + rng.uniform(-u, u, size=x.shape))

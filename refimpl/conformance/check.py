"""Judging another implementation's results file against the vectors (``python -m refimpl check``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..tolerance import Comparison, compare, error_bound
from .branches import GEOMETRY_KEYS
from .encoding import RESULTS_FORMAT, decode_tensor, positive_verdict
from .rounding import LOW_PRECISION, bits_to_values, ulp_distance, values_to_bits

__all__ = ["CaseOutcome", "ResultsFormatError", "check_results"]


@dataclass(frozen=True)
class CaseOutcome:
    """The judgement of one case: ``ok`` and a one-line ``detail`` naming the worst element."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'pass' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


class ResultsFormatError(ValueError):
    """A results file that cannot be read as the documented format (as opposed to wrong values)."""


# One compared tensor: (ok, ratio for ranking the worst part, description).
Part = tuple[bool, float, str]


def _numbers(value: Any, where: str) -> np.ndarray:
    def number(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ResultsFormatError(f"{where}: expected numbers (or 'inf'/'-inf'/'nan' strings), got {v!r}")
        try:
            return float(v)
        except ValueError:
            raise ResultsFormatError(f"{where}: {v!r} is not a number") from None
    try:
        raw = np.array(value, dtype=object)
    except ValueError as error:  # ragged nesting
        raise ResultsFormatError(f"{where}: not a rectangular nested list ({error})") from None
    if raw.dtype != object or any(isinstance(v, list) for v in raw.ravel()):
        raise ResultsFormatError(f"{where}: not a rectangular nested list")
    return np.array([number(v) for v in raw.ravel()], dtype=np.float64).reshape(raw.shape)


def _bits(value: Any, dtype: str, where: str) -> np.ndarray:
    try:
        raw = np.array(value, dtype=object)
    except ValueError as error:
        raise ResultsFormatError(f"{where}: not a rectangular nested list ({error})") from None
    if raw.size and not all(isinstance(v, str) for v in raw.ravel()):
        raise ResultsFormatError(f"{where}: expected hex strings such as '0x3c00'")
    try:
        return bits_to_values(raw, dtype) if raw.size else raw.astype(np.float64)
    except ValueError as error:
        raise ResultsFormatError(f"{where}: {error}") from None


def _describe(result: Comparison, what: str) -> Part:
    return result.ok, result.ratio, (f"{what}{list(result.index)}: expected={result.expected!r}, "
                                     f"actual={result.actual!r}, bound={result.bound:.3e}, ratio={result.ratio:.3g}")


def _compare_bit_exact(vector: dict, entry: dict, what: str) -> Part:
    name, dtype = vector["name"], vector["storage_dtype"]
    where = f"results[{name!r}]"
    expected = decode_tensor(vector["expected"][f"{what}_rounded"])
    if f"{what}_bits" in entry:
        actual = _bits(entry[f"{what}_bits"], dtype, f"{where}[{what + '_bits'!r}]")
        if what in entry:
            as_numbers = _numbers(entry[what], f"{where}[{what!r}]")
            if as_numbers.shape != actual.shape or not np.array_equal(as_numbers, actual, equal_nan=True):
                return False, math.inf, f"{what}: '{what}' and '{what}_bits' disagree"
    elif what in entry:
        actual = _numbers(entry[what], f"{where}[{what!r}]")
    else:
        return False, math.inf, f"{what}: missing (give '{what}' or '{what}_bits')"
    if actual.shape != expected.shape:
        return False, math.inf, f"{what}: shape {list(actual.shape)}, expected {list(expected.shape)}"
    result = compare(actual, expected, 0.0)
    if result.ok:
        return True, 0.0, f"{what} bit-exact ({dtype})"
    bits = f" ({values_to_bits(np.array([result.expected]), dtype)[0]})"
    return False, result.ratio, (f"{what}{list(result.index)}: expected={result.expected!r}{bits}, "
                                 f"actual={result.actual!r}, {ulp_distance(result.actual, result.expected, dtype)} "
                                 f"off; {dtype} requires the correctly rounded value, bit for bit")


def _compare_tensor(vector: dict, entry: dict, what: str) -> Part:
    """Compare one folded tensor (``what`` is "weight" or "bias") under the vector's policy."""
    if vector["storage_dtype"] in LOW_PRECISION:
        return _compare_bit_exact(vector, entry, what)
    if what not in entry:
        return False, math.inf, f"{what}: missing"
    actual = _numbers(entry[what], f"results[{vector['name']!r}][{what!r}]")
    expected = decode_tensor(vector["expected"][what])
    if actual.shape != expected.shape:
        return False, math.inf, f"{what}: shape {list(actual.shape)}, expected {list(expected.shape)}"
    policy = vector["tolerance"][what]
    bound = error_bound(decode_tensor(policy["magnitude"]), policy["n"], vector["storage_dtype"],
                        safety=vector["tolerance"]["safety"])
    return _describe(compare(actual, expected, bound), what)


def _compare_output(vector: dict, entry: dict) -> Part:
    probe = vector["probe"]
    actual = _numbers(entry["output"], f"results[{vector['name']!r}]['output']")
    expected = decode_tensor(probe["y"])
    if actual.shape != expected.shape:
        return False, math.inf, f"output: shape {list(actual.shape)}, expected {list(expected.shape)}"
    # The probe runs the folded layer in the compute precision: float32 for low-precision storage
    # is not assumed; the storage dtype's own roundoff bounds it.
    bound = error_bound(decode_tensor(probe["magnitude"]), probe["n"], vector["storage_dtype"])
    return _describe(compare(actual, expected, bound), "output")


def _compare_geometry(vector: dict, entry: dict) -> Part:
    """A merged conv's kernel size, stride, padding, dilation, groups and padding mode: exactly."""
    expected = vector["expected"]["layer"]
    given = entry.get("layer")
    if not isinstance(given, dict):
        return False, math.inf, ("layer: missing (give the merged conv's "
                                 f"{', '.join(GEOMETRY_KEYS)} as 'layer')")
    wrong = [f"{key} {given.get(key)!r}, expected {expected[key]!r}" for key in GEOMETRY_KEYS
             if given.get(key) != expected[key]]
    if wrong:
        return False, math.inf, "layer: " + "; ".join(wrong)
    return True, 0.0, "layer geometry exact"


def _check_case(vector: dict, entry: Any) -> CaseOutcome:
    name = vector["name"]
    if entry is None:
        return CaseOutcome(name, False, "missing from the results")
    if not isinstance(entry, dict):
        raise ResultsFormatError(f"results[{name!r}] must be an object, got {type(entry).__name__}")
    expected_verdict = vector["expected"]["verdict"]
    positive = positive_verdict(vector)
    verdict = entry.get("verdict", positive if ("weight" in entry or "weight_bits" in entry) else None)
    if verdict is not None and not isinstance(verdict, str):
        raise ResultsFormatError(f"results[{name!r}]['verdict'] must be a string, got {verdict!r}")
    if expected_verdict != positive:
        if verdict == expected_verdict:
            return CaseOutcome(name, True, f"verdict {verdict!r}")
        got = "no verdict" if verdict is None else (
            f"{'merged' if positive == 'mergeable' else 'folded'} weights" if verdict == positive
            else f"verdict {verdict!r}")
        return CaseOutcome(name, False, f"expected verdict {expected_verdict!r}, got {got}")
    if verdict != positive:
        got = "neither weights nor a verdict" if verdict is None else f"verdict {verdict!r}"
        return CaseOutcome(name, False, f"{positive}, but the results give {got}")
    parts = [_compare_tensor(vector, entry, "weight"), _compare_tensor(vector, entry, "bias")]
    if vector["expected"].get("layer", {}).get("type") == "conv":
        parts.append(_compare_geometry(vector, entry))
    if "output" in entry and "probe" in vector:
        parts.append(_compare_output(vector, entry))
    failed = [detail for ok, _, detail in parts if not ok]
    if failed:
        return CaseOutcome(name, False, "; ".join(failed))
    return CaseOutcome(name, True, max(parts, key=lambda part: part[1])[2])


def check_results(vectors: dict[str, dict], results: Any) -> tuple[list[CaseOutcome], list[str]]:
    """Judge a parsed results file against the vectors: one outcome per case, plus notes.

    Raises :class:`ResultsFormatError` (a ``ValueError``) when ``results`` is not the documented format.
    """
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
        raise ResultsFormatError("a results file must be a JSON object with a 'results' object mapping case names "
                                 f"to entries (format {RESULTS_FORMAT!r})")
    if results.get("format", RESULTS_FORMAT) != RESULTS_FORMAT:
        raise ResultsFormatError(f"results format {results.get('format')!r} is not {RESULTS_FORMAT!r}")
    entries = results["results"]
    outcomes = [_check_case(vector, entries.get(name)) for name, vector in sorted(vectors.items())]
    notes = [f"results give unknown case {name!r} (ignored)" for name in sorted(set(entries) - set(vectors))]
    return outcomes, notes

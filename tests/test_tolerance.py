"""Meta tests of the error model: the helpers every other comparison in the project relies on."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from itertools import pairwise

import numpy as np
import pytest

from refimpl import (
    MODEL_RATIO,
    SAFETY,
    UNIT_ROUNDOFF,
    assert_within,
    compare,
    compare_models,
    error_bound,
    relative_rms_error,
    unit_roundoff,
)

torch = pytest.importorskip("torch")


class TestUnitRoundoff:
    # The oracle is each library's own machine epsilon: u = eps / 2 for round-to-nearest.
    @pytest.mark.parametrize("name, eps", [
        ("float64", np.finfo(np.float64).eps),
        ("float32", np.finfo(np.float32).eps),
        ("float16", np.finfo(np.float16).eps),
        ("bfloat16", torch.finfo(torch.bfloat16).eps),
    ])
    def test_half_machine_epsilon(self, name, eps):
        assert unit_roundoff(name) == eps / 2

    def test_tf32_has_fp16_mantissa(self):
        # TF32 stores 10 explicit mantissa bits, like fp16: u = 2^-(10+1).
        assert unit_roundoff("tf32") == unit_roundoff("float16") == 2.0**-11

    def test_every_entry_is_half_its_machine_epsilon(self):
        # TF32 keeps fp16's 10 explicit mantissa bits; the others come from their libraries' finfo.
        epsilon = {"float64": np.finfo(np.float64).eps, "float32": np.finfo(np.float32).eps,
                   "float16": np.finfo(np.float16).eps, "bfloat16": torch.finfo(torch.bfloat16).eps,
                   "tf32": 2.0**-10}
        assert {name: u * 2 for name, u in UNIT_ROUNDOFF.items()} == epsilon

    @pytest.mark.parametrize("alias, name", [
        (np.float16, "float16"), (np.dtype("float16"), "float16"), (torch.float16, "float16"),
        (torch.half, "float16"), ("fp16", "float16"), ("half", "float16"), ("torch.float16", "float16"),
        (np.float32, "float32"), (torch.float32, "float32"), ("fp32", "float32"),
        (np.float64, "float64"), (float, "float64"), (torch.float64, "float64"), (torch.double, "float64"),
        ("double", "float64"), ("fp64", "float64"),
        (torch.bfloat16, "bfloat16"), ("bf16", "bfloat16"), ("BF16", "bfloat16"),
        ("tf32", "tf32"), ("TF32", "tf32"),
    ])
    def test_aliases(self, alias, name):
        assert unit_roundoff(alias) == UNIT_ROUNDOFF[name]

    @pytest.mark.parametrize("bad", [np.int32, "int8", torch.int64, np.complex128, "float8", "nonsense"])
    def test_unknown_dtype_raises_naming_it(self, bad):
        with pytest.raises(ValueError, match=r"no unit roundoff known for dtype .*known: \["):
            unit_roundoff(bad)


class TestErrorBound:
    @pytest.mark.parametrize("dtype", sorted(UNIT_ROUNDOFF))
    @pytest.mark.parametrize("n", [1, 7, 100])
    def test_matches_formula_exactly(self, dtype, n):
        # Recomputed in exact rational arithmetic, then rounded once: the float64 result may
        # differ from it only by the few roundings of the float formula.
        u = Fraction(UNIT_ROUNDOFF[dtype])
        exact = 2 * (n * u / (1 - n * u) + u) * Fraction(3, 1)
        got = float(error_bound(3.0, n, dtype))
        assert abs(Fraction(got) - exact) <= 4 * Fraction(2.0**-53) * exact

    def test_bound_is_linear_in_safety(self):
        # The default safety itself (2, as spec/folding.md states) is pinned by the exact formula above.
        assert error_bound(1.0, 5, "float32") == SAFETY * error_bound(1.0, 5, "float32", safety=1.0)
        assert error_bound(1.0, 5, "float32", safety=3.0) == 3 * error_bound(1.0, 5, "float32", safety=1.0)

    def test_monotone_in_n(self):
        bounds = [float(error_bound(1.0, n, "float16")) for n in (1, 2, 10, 100, 1000, 2000)]
        assert all(a < b for a, b in pairwise(bounds))

    def test_monotone_in_precision(self):
        ordered = ["float64", "float32", "float16", "bfloat16"]
        bounds = [float(error_bound(1.0, 16, d)) for d in ordered]
        assert all(a < b for a, b in pairwise(bounds))
        assert error_bound(1.0, 16, "tf32") == error_bound(1.0, 16, "float16")

    def test_linear_in_magnitude_and_uses_absolute_value(self):
        magnitude = np.array([[0.0, -1.0], [2.0, 4.0]])
        bound = error_bound(magnitude, 3, "float32")
        assert bound.dtype == np.float64 and bound.shape == (2, 2)
        unit = float(error_bound(1.0, 3, "float32"))
        assert bound.tolist() == [[0.0, unit], [2 * unit, 4 * unit]]

    @pytest.mark.parametrize("n", [0, -3])
    def test_rejects_non_positive_n(self, n):
        with pytest.raises(ValueError, match=rf"reduction length n must be >= 1, got {n}"):
            error_bound(1.0, n, "float32")

    def test_rejects_vacuous_bound(self):
        # n * u = 256 * 2^-8 = 1: gamma_n is infinite.
        with pytest.raises(ValueError, match=r"n=256 is too long for dtype 'bfloat16'"):
            error_bound(1.0, 256, "bfloat16")
        assert np.isfinite(error_bound(1.0, 255, "bfloat16"))

    @pytest.mark.parametrize("dtype", [np.float32, np.float16])
    def test_bounds_real_sequential_dot_products(self, dtype):
        # The model must hold for the worst summation order: accumulate left to right in the
        # low precision itself, with every product and partial sum rounded (no wider accumulator).
        rng = np.random.default_rng(7)
        n = 64
        for _ in range(20):
            w, x = rng.standard_normal(n), rng.standard_normal(n)
            w_low, x_low = w.astype(dtype), x.astype(dtype)
            acc = dtype(0)
            for wi, xi in zip(w_low, x_low, strict=True):
                acc = dtype(acc + dtype(wi * xi))
            exact = float(np.dot(w_low.astype(np.longdouble), x_low.astype(np.longdouble)))
            magnitude = float(np.dot(np.abs(w_low.astype(np.float64)), np.abs(x_low.astype(np.float64))))
            assert_within(float(acc), exact, error_bound(magnitude, n, dtype, safety=1.0), what="sequential dot")


class TestCompare:
    def test_reports_worst_by_ratio_not_by_absolute_error(self):
        expected = np.zeros((2, 3))
        actual = np.array([[0.0, 0.5, 0.0], [0.0, 0.0, 0.25]])
        # The larger absolute error sits under a looser bound: (0, 1) has ratio 0.5/1 = 0.5,
        # (1, 2) has ratio 0.25/0.0625 = 4.
        bound = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0625]])
        c = compare(actual, expected, bound)
        assert (c.ok, c.index, c.ratio) == (False, (1, 2), 4.0)
        assert (c.actual, c.expected, c.bound) == (0.25, 0.0, 0.0625)
        assert c.max_abs_error == 0.5

    def test_within_bound_passes_with_exact_ratio(self):
        c = compare([1.0, 2.0, 3.0], [1.0, 2.125, 3.0], 0.25)
        assert (c.ok, c.index, c.ratio, c.max_abs_error) == (True, (1,), 0.5, 0.125)

    def test_ratio_exactly_one_passes(self):
        assert compare([1.5], [1.0], 0.5).ok
        assert not compare([1.5], [1.0], np.nextafter(0.5, 0.0)).ok

    def test_bound_broadcasts_per_channel(self):
        actual = np.array([[1.0, 1.0], [1.0, 1.0]])
        c = compare(actual, np.zeros((2, 2)), np.array([[2.0], [0.5]]))
        assert (c.ok, c.index, c.ratio) == (False, (1, 0), 2.0)

    def test_nan_in_actual_fails_at_its_index(self):
        c = compare([1.0, np.nan, 3.0], [1.0, 2.0, 3.0], 1e3)
        assert not c.ok and c.index == (1,) and math.isinf(c.ratio) and math.isnan(c.actual)

    def test_nan_never_matches_even_nan(self):
        # A NaN reference is itself a failure to report, not a pass.
        assert not compare([np.nan], [np.nan], 1.0).ok

    def test_equal_infinities_match(self):
        c = compare([np.inf, -np.inf, 1.0], [np.inf, -np.inf, 1.0], 0.0)
        assert c.ok and c.ratio == 0.0

    @pytest.mark.parametrize("actual, expected", [([np.inf], [1.0]), ([1.0], [np.inf]), ([np.inf], [-np.inf])])
    def test_infinity_mismatch_fails(self, actual, expected):
        c = compare(actual, expected, 1e300)
        assert not c.ok and math.isinf(c.ratio)

    def test_zero_bound_demands_equality(self):
        assert compare([0.0, 2.0], [0.0, 2.0], 0.0).ok
        c = compare([0.0, 2.0], [0.0, 2.0 + 2.0**-51], 0.0)
        assert not c.ok and c.index == (1,) and math.isinf(c.ratio)

    @pytest.mark.parametrize("actual_shape, expected_shape", [((3,), (1, 3)), ((2, 3), (3, 2)), ((4,), (3,))])
    def test_shape_mismatch_raises_with_both_shapes(self, actual_shape, expected_shape):
        with pytest.raises(ValueError, match=re.escape(f"shape mismatch: actual {actual_shape} vs expected "
                                                      f"{expected_shape}")):
            compare(np.zeros(actual_shape), np.zeros(expected_shape), 1.0)

    def test_empty_arrays_pass(self):
        assert compare(np.zeros((0, 3)), np.zeros((0, 3)), 1.0).ok

    def test_accepts_torch_tensors_including_bfloat16(self):
        actual = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
        expected = np.array([1.0, 2.0, 3.0078125])  # a tie between the bf16 values 3 and 3 + 2^-6
        c = compare(actual, expected, error_bound(np.abs(expected), 1, "bfloat16"))
        assert c.ok and c.index == (2,) and c.actual == 3.0

    def test_describe_names_index_values_and_verdict(self):
        text = compare(np.array([[1.0, 2.0], [3.0, 4.5]]), np.array([[1.0, 2.0], [3.0, 4.0]]), 0.125).describe("conv")
        assert text.startswith("conv: worst element at index (1, 1): actual=4.5, expected=4.0")
        assert "EXCEEDS" in text and "ratio 4" in text


class TestAssertWithin:
    def test_wrong_value_fails_naming_the_index(self):
        expected = np.arange(12.0).reshape(3, 4)
        actual = expected.copy()
        actual[2, 1] += 1e-3
        with pytest.raises(AssertionError, match=r"folded weight: worst element at index \(2, 1\): actual=9\.001"):
            assert_within(actual, expected, error_bound(expected, 4, "float64"), what="folded weight")

    def test_returns_comparison_when_within(self):
        result = assert_within([1.0], [1.0 + 2.0**-52], error_bound(1.0, 1, "float64"))
        assert result.ok and 0 < result.ratio <= 1


class TestModelComparison:
    def test_relative_rms_error_hand_computed(self):
        # The difference (0, 0, 3, 4) has norm 5, the reference (6, 8, 0, 0) norm 10.
        reference = np.array([6.0, 8.0, 0.0, 0.0])
        assert relative_rms_error(reference + np.array([0.0, 0.0, 3.0, 4.0]), reference) == 0.5
        assert relative_rms_error(np.zeros(2), np.zeros(2)) == 0.0
        assert relative_rms_error(np.ones(2), np.zeros(2)) == math.inf
        with pytest.raises(ValueError, match=r"shape mismatch: actual \(2,\) vs reference \(3,\)"):
            relative_rms_error(np.zeros(2), np.zeros(3))

    def test_fused_judged_against_unfused_error(self):
        reference = np.full(4, 8.0)
        unfused = reference + np.array([0.5, 0.0, 0.0, 0.0])           # relative error 1/32
        within = reference + np.array([0.0, 1.0, 0.0, 0.0])            # 2x the unfused error
        beyond = reference + np.array([0.0, 4.0, 0.0, 0.0]) * 1.25     # 10x the unfused error
        ok = compare_models(within, unfused, reference, "float32")
        assert ok.ok and ok.ratio == 2.0 and ok.limit == MODEL_RATIO / 32
        bad = compare_models(beyond, unfused, reference, "float32")
        assert not bad.ok and "EXCEEDS" in bad.describe()

    def test_parameter_rounded_runs_raise_the_baseline(self):
        reference = np.full(4, 8.0)
        unfused = reference + np.array([0.5, 0.0, 0.0, 0.0])           # relative error 1/32
        beyond = reference + np.array([0.0, 4.0, 0.0, 0.0]) * 1.25     # 10x the unfused error
        rounded = [reference + np.array([0.0, 0.0, 2.0, 0.0]),          # 4x, the largest: 1/8
                   reference + np.array([0.0, 0.0, 0.0, 1.0])]
        result = compare_models(beyond, unfused, reference, "float32", perturbed=rounded)
        assert result.ok and result.perturbed_error == 1 / 8 and result.limit == MODEL_RATIO / 8
        assert "rounded once more 1.250e-01" in result.describe()
        assert not compare_models(beyond * 2, unfused, reference, "float32", perturbed=rounded).ok

    def test_exact_unfused_uses_unit_roundoff_floor(self):
        reference = np.ones(4)
        result = compare_models(reference, reference, reference, "float16")
        assert result.ok and result.limit == MODEL_RATIO * 2.0**-11

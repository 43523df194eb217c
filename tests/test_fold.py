"""Tests of the fold math in ``refimpl.fold``.

Oracles: hand-computed cases on dyadic numbers (exact in float64), the two original layers
applied with the float64 reference ops (``refimpl.ops``), and, for rounding, the fold
computed in extended precision (``np.longdouble``) and rounded correctly by a routine below
that does not go through any library cast.
"""

from __future__ import annotations

import math
import re
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refimpl import (
    assert_within,
    batch_norm,
    bn_scale_shift,
    compare,
    conv,
    conv_transpose,
    error_bound,
    fold_bn_conv,
    fold_bn_linear,
    fold_conv_bn,
    fold_linear_bn,
    linear,
)

torch = pytest.importorskip("torch")

from conftest import run_on_backend  # noqa: E402

# Operations applied in sequence on top of the reduction, per output element: the bias add
# (1), the roundings inside s = gamma / sqrt(var + eps) (add, sqrt, divide, multiply: 4) and
# the scale-and-shift or the product W * s that applies it (1). Both the two-layer result
# and the folded one carry at most this many, and SAFETY = 2 covers the two sides' errors.
EXTRA_OPS = 6

# The backend fixture is set up once per test, not per example: it only swaps the functions under test.
PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

#: The array-API functions under test: each test marked ON_EVERY_BACKEND calls them on every backend.
ARRAY_FUNCTIONS = ("bn_scale_shift", "fold_conv_bn", "fold_linear_bn", "fold_bn_conv", "fold_bn_linear")


@pytest.fixture
def on_every_backend(backend, monkeypatch):
    run_on_backend(backend, monkeypatch, sys.modules[__name__], ARRAY_FUNCTIONS)
    return backend


ON_EVERY_BACKEND = pytest.mark.usefixtures("on_every_backend")


def _bn(rng: np.random.Generator, channels: int, affine: bool) -> dict:
    """BatchNorm parameters; some variances exactly 0 (then eps alone keeps s finite)."""
    var = rng.uniform(0.05, 4.0, channels)
    var[rng.random(channels) < 0.2] = 0.0
    return dict(bn_mean=rng.standard_normal(channels), bn_var=var, bn_eps=float(rng.choice([1e-5, 1e-3, 0.1])),
                bn_weight=rng.standard_normal(channels) if affine else None,
                bn_bias=rng.standard_normal(channels) if affine else None)


def _apply_bn(x: np.ndarray, bn: dict) -> np.ndarray:
    return batch_norm(x, bn["bn_mean"], bn["bn_var"], bn["bn_weight"], bn["bn_bias"], eps=bn["bn_eps"])


def _abs_bn_output(x: np.ndarray, bn: dict) -> np.ndarray:
    """Elementwise bound on |BN(x)| and on the magnitude its float64 evaluation is accurate to:
    |s|·|x| + |s|·|mu| + |beta| (the subtraction x - mu and the shift beta each contribute)."""
    s, _ = bn_scale_shift(bn["bn_mean"], bn["bn_var"], bn["bn_eps"], bn["bn_weight"], bn["bn_bias"])
    beta = np.zeros_like(s) if bn["bn_bias"] is None else bn["bn_bias"]
    channel = (slice(None),) + (None,) * (x.ndim - 2)
    return np.abs(s)[channel] * np.abs(x) + (np.abs(s * bn["bn_mean"]) + np.abs(beta))[channel]


def _abs_after_bn(y_magnitude: np.ndarray, bn: dict) -> np.ndarray:
    """Magnitude of BN applied to a value of magnitude ``y_magnitude`` (which already includes |b|):
    |s|·(y + |mu|) + |beta|."""
    s, _ = bn_scale_shift(bn["bn_mean"], bn["bn_var"], bn["bn_eps"], bn["bn_weight"], bn["bn_bias"])
    beta = np.zeros_like(s) if bn["bn_bias"] is None else bn["bn_bias"]
    channel = (slice(None),) + (None,) * (y_magnitude.ndim - 2)
    return np.abs(s)[channel] * (y_magnitude + np.abs(bn["bn_mean"])[channel]) + np.abs(beta)[channel]


# --------------------------------------------------------------------------------------------
# Hypothesis strategies: conv geometries whose output is non-empty.

@st.composite
def conv_geometry(draw, transposed=False, bn_first=False):
    """A conv (or transposed conv) geometry. With ``bn_first`` only the geometries where BN -> conv
    is exact: zero padding only as no padding at all."""
    rank = draw(st.integers(1, 3))
    depthwise = draw(st.booleans())
    groups = draw(st.integers(1, 3))
    in_per_group = 1 if depthwise else draw(st.integers(1, 3))
    out_per_group = draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    max_size = 6 if rank < 3 else 4
    if transposed:
        size = tuple(draw(st.integers(1, max_size)) for _ in range(rank))
        output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation, strict=True))
        # Keep the output non-empty: 2P <= (L-1)S + D(K-1) + output_padding.
        padding = tuple(min(draw(st.integers(0, 2)), ((n - 1) * s + d * (k - 1) + op) // 2)
                        for n, s, d, k, op in zip(size, stride, dilation, kernel, output_padding, strict=True))
        return dict(rank=rank, groups=groups, in_per_group=in_per_group, out_per_group=out_per_group, kernel=kernel,
                    size=size, args=dict(stride=stride, padding=padding, output_padding=output_padding,
                                         groups=groups, dilation=dilation))
    padding = tuple(0 if bn_first and mode == "zeros" else draw(st.integers(0 if mode == "zeros" else 1, 2))
                    for _ in range(rank))
    size = []
    for p, d, k in zip(padding, dilation, kernel, strict=True):
        smallest = max(1, d * (k - 1) + 1 - 2 * p, p + 1 if mode == "reflect" else 1, p if mode == "circular" else 1)
        size.append(smallest + draw(st.integers(0, 2)))
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=mode)
    if mode == "zeros" and draw(st.booleans()):
        # The string forms: "valid" (no padding) and "same" (stride 1 only).
        if all(s == 1 for s in stride) and not bn_first:
            args.update(stride=1, padding="same")
        else:
            args["padding"] = "valid"
            size = [max(n, d * (k - 1) + 1) for n, d, k in zip(size, dilation, kernel, strict=True)]
    return dict(rank=rank, groups=groups, in_per_group=in_per_group, out_per_group=out_per_group, kernel=kernel,
                size=tuple(size), args=args)


# --------------------------------------------------------------------------------------------

@ON_EVERY_BACKEND
class TestBnScaleShift:
    def test_hand_computed(self):
        # var + eps = 4 and 1: sqrt is exact, so s and t are exact.
        s, t = bn_scale_shift(np.array([1.0, -3.0]), np.array([3.75, 0.0]), 0.25, np.array([4.0, 0.5]),
                              np.array([1.0, 2.0]))
        assert s.tolist() == [2.0, 1.0]
        assert t.tolist() == [1.0 - 2.0, 2.0 + 3.0]

    def test_affine_false(self):
        s, t = bn_scale_shift(np.array([3.0]), np.array([0.0]), 0.25)   # s = 1/sqrt(1/4)
        assert (s.tolist(), t.tolist()) == ([2.0], [-6.0])

    def test_zero_eps_with_positive_variance(self):
        s, t = bn_scale_shift(np.array([0.5]), np.array([16.0]), 0.0, np.array([-8.0]))
        assert (s.tolist(), t.tolist()) == ([-2.0], [1.0])

    def test_matches_the_reference_batch_norm(self):
        rng = np.random.default_rng(0)
        bn = _bn(rng, 5, affine=True)
        x = rng.standard_normal((3, 5, 4))
        s, t = bn_scale_shift(**bn)
        assert_within(s[:, None] * x + t[:, None], _apply_bn(x, bn),
                      error_bound(_abs_bn_output(x, bn), EXTRA_OPS, "float64"), what="s*x + t")


@ON_EVERY_BACKEND
class TestFoldConvBn:
    def test_hand_computed_2d(self):
        w = np.arange(1.0, 9.0).reshape(2, 1, 2, 2)
        # s = (2, 1/2); t = beta - mu*s = (1 - 2, 0 + 1/2).
        weight, bias = fold_conv_bn(w, np.array([1.0, 3.0]), np.array([1.0, -1.0]), np.array([3.0, 15.0]), 1.0,
                                    np.array([4.0, 2.0]), np.array([1.0, 0.0]))
        assert weight.tolist() == [[[[2.0, 4.0], [6.0, 8.0]]], [[[2.5, 3.0], [3.5, 4.0]]]]
        assert bias.tolist() == [(1.0 - 1.0) * 2.0 + 1.0, (3.0 + 1.0) * 0.5 + 0.0]

    def test_transposed_groups_scale_follows_layout(self):
        # [in=2, out/groups=2, k=1], groups=2: output channels 0, 1 come from input channel 0,
        # 2, 3 from input channel 1. s = (1, 2, 4, 8) via var + eps = 1/s^2.
        w = np.array([[[1.0], [1.0]], [[1.0], [1.0]]])
        s = np.array([1.0, 2.0, 4.0, 8.0])
        weight, bias = fold_conv_bn(w, None, np.zeros(4), 1 / s**2, 0.0, transposed=True, groups=2)
        assert weight.tolist() == [[[1.0], [2.0]], [[4.0], [8.0]]]
        assert bias.tolist() == [0.0, 0.0, 0.0, 0.0]

    def test_transposed_depthwise_keeps_shape(self):
        # out/groups = 1: torch's helper broadcasts this to [4, 4, 3]; the fold must keep [4, 1, 3].
        w = np.ones((4, 1, 3))
        s = np.array([1.0, 2.0, 4.0, 8.0])
        weight, _ = fold_conv_bn(w, None, np.zeros(4), 1 / s**2, 0.0, transposed=True, groups=4)
        assert weight.shape == (4, 1, 3)
        assert weight[:, 0, 0].tolist() == s.tolist()

    @PROPERTY
    @given(geometry=conv_geometry(), bias=st.booleans(), affine=st.booleans(), seed=st.integers(0, 2**32 - 1))
    def test_folded_conv_equals_conv_then_bn(self, geometry, bias, affine, seed):
        rng = np.random.default_rng(seed)
        g, args = geometry["groups"], geometry["args"]
        c_in, c_out = g * geometry["in_per_group"], g * geometry["out_per_group"]
        x = rng.standard_normal((2, c_in) + geometry["size"])
        w = rng.standard_normal((c_out, geometry["in_per_group"]) + geometry["kernel"])
        b = rng.standard_normal(c_out) if bias else None
        bn = _bn(rng, c_out, affine)
        weight, folded_bias = fold_conv_bn(w, b, **bn, groups=g)
        expected = _apply_bn(conv(x, w, b, **args), bn)
        # |BN(conv(x) + b)| <= |s|(conv(|x|, |W|) + |b| + |mu|) + |beta|: the conv on absolute
        # values (same padding, which copies or zeroes and so commutes with abs) gives sum |W x|.
        abs_b = np.zeros(c_out) if b is None else np.abs(b)
        magnitude = _abs_after_bn(conv(np.abs(x), np.abs(w), abs_b, **args), bn)
        n = geometry["in_per_group"] * math.prod(geometry["kernel"]) + EXTRA_OPS
        assert_within(conv(x, weight, folded_bias, **args), expected, error_bound(magnitude, n, "float64"),
                      what=f"conv->BN fold, {args}")

    @PROPERTY
    @given(geometry=conv_geometry(transposed=True), bias=st.booleans(), affine=st.booleans(),
           seed=st.integers(0, 2**32 - 1))
    def test_folded_transposed_conv_equals_transposed_conv_then_bn(self, geometry, bias, affine, seed):
        rng = np.random.default_rng(seed)
        g, args = geometry["groups"], geometry["args"]
        c_in, c_out = g * geometry["in_per_group"], g * geometry["out_per_group"]
        x = rng.standard_normal((2, c_in) + geometry["size"])
        w = rng.standard_normal((c_in, geometry["out_per_group"]) + geometry["kernel"])
        b = rng.standard_normal(c_out) if bias else None
        bn = _bn(rng, c_out, affine)
        weight, folded_bias = fold_conv_bn(w, b, **bn, transposed=True, groups=g)
        assert weight.shape == w.shape
        expected = _apply_bn(conv_transpose(x, w, b, **args), bn)
        # As for conv; an output element sums at most in/groups * prod(kernel) products.
        abs_b = np.zeros(c_out) if b is None else np.abs(b)
        magnitude = _abs_after_bn(conv_transpose(np.abs(x), np.abs(w), abs_b, **args), bn)
        n = geometry["in_per_group"] * math.prod(geometry["kernel"]) + EXTRA_OPS
        assert_within(conv_transpose(x, weight, folded_bias, **args), expected,
                      error_bound(magnitude, n, "float64"), what=f"transposed conv->BN fold, {args}")


@ON_EVERY_BACKEND
class TestFoldLinearBn:
    def test_hand_computed(self):
        # s = (1/2, 4), t = (0 - 1/2, 1 - 8).
        weight, bias = fold_linear_bn(np.array([[2.0, -4.0], [0.25, 1.0]]), np.array([8.0, 1.0]),
                                      np.array([1.0, 2.0]), np.array([4.0, 0.0625]), 0.0,
                                      np.array([1.0, 1.0]), np.array([0.0, 1.0]))
        assert weight.tolist() == [[1.0, -2.0], [1.0, 4.0]]
        assert bias.tolist() == [(8.0 - 1.0) * 0.5 + 0.0, (1.0 - 2.0) * 4.0 + 1.0]

    @PROPERTY
    @given(batch=st.integers(1, 4), features=st.tuples(st.integers(1, 8), st.integers(1, 8)), bias=st.booleans(),
           affine=st.booleans(), seed=st.integers(0, 2**32 - 1))
    def test_folded_linear_equals_linear_then_bn(self, batch, features, bias, affine, seed):
        rng = np.random.default_rng(seed)
        n_in, n_out = features
        x, w = rng.standard_normal((batch, n_in)), rng.standard_normal((n_out, n_in))
        b = rng.standard_normal(n_out) if bias else None
        bn = _bn(rng, n_out, affine)
        weight, folded_bias = fold_linear_bn(w, b, **bn)
        abs_b = np.zeros(n_out) if b is None else np.abs(b)
        magnitude = _abs_after_bn(linear(np.abs(x), np.abs(w), abs_b), bn)
        assert_within(linear(x, weight, folded_bias), _apply_bn(linear(x, w, b), bn),
                      error_bound(magnitude, n_in + EXTRA_OPS, "float64"), what="linear->BN fold")


@ON_EVERY_BACKEND
class TestFoldBnConv:
    def test_hand_computed_groups(self):
        # Two groups of one input channel each; s = (2, 4), t = (1, -1).
        w = np.array([[[1.0, 2.0]], [[3.0, -1.0]]])
        weight, bias = fold_bn_conv(w, np.array([0.5, 0.25]), np.array([0.0, 0.25]), np.array([0.25, 0.0625]), 0.0,
                                    None, np.array([1.0, 0.0]), groups=2)
        assert weight.tolist() == [[[2.0, 4.0]], [[12.0, -4.0]]]
        assert bias.tolist() == [0.5 + (1.0 + 2.0) * 1.0, 0.25 + (3.0 - 1.0) * -1.0]

    def test_hand_computed_dense(self):
        # One output reading two input channels: s = (1/2, 2), t = (-1/2, -4).
        w = np.array([[[1.0], [3.0]]])
        weight, bias = fold_bn_conv(w, None, np.array([1.0, 2.0]), np.array([4.0, 0.25]), 0.0)
        assert weight.tolist() == [[[0.5], [6.0]]]
        assert bias.tolist() == [1.0 * -0.5 + 3.0 * -4.0]

    @PROPERTY
    @given(geometry=conv_geometry(bn_first=True), bias=st.booleans(), affine=st.booleans(),
           seed=st.integers(0, 2**32 - 1))
    def test_folded_conv_equals_bn_then_conv(self, geometry, bias, affine, seed):
        # Only the exact cases: no padding, or padding that copies BN outputs (see the test below).
        args = geometry["args"]
        rng = np.random.default_rng(seed)
        g = geometry["groups"]
        c_in, c_out = g * geometry["in_per_group"], g * geometry["out_per_group"]
        x = rng.standard_normal((2, c_in) + geometry["size"])
        w = rng.standard_normal((c_out, geometry["in_per_group"]) + geometry["kernel"])
        b = rng.standard_normal(c_out) if bias else None
        bn = _bn(rng, c_in, affine)
        weight, folded_bias = fold_bn_conv(w, b, **bn, groups=g)
        expected = conv(_apply_bn(x, bn), w, b, **args)
        # conv(BN(x)) sums W * (s x + t): magnitude conv(|s||x| + |s mu| + |beta|, |W|) + |b|.
        # The folded side sums the same products (W s) x plus b + sum W t, bounded the same way.
        abs_b = np.zeros(c_out) if b is None else np.abs(b)
        magnitude = conv(_abs_bn_output(x, bn), np.abs(w), abs_b, **args)
        n = geometry["in_per_group"] * math.prod(geometry["kernel"]) + 1 + EXTRA_OPS
        assert_within(conv(x, weight, folded_bias, **args), expected, error_bound(magnitude, n, "float64"),
                      what=f"BN->conv fold, {args}")

    @pytest.mark.parametrize("rank", [1, 2, 3])
    def test_zero_padding_is_wrong_exactly_at_the_borders(self, rank):
        rng = np.random.default_rng(rank)
        size, kernel, pad = (5,) * rank, (3,) * rank, 1
        x = rng.standard_normal((2, 3) + size)
        w = rng.standard_normal((4, 3) + kernel)
        bn = _bn(rng, 3, affine=True)
        _, t = bn_scale_shift(**bn)
        assert np.abs(t).min() > 0.05, "the seeded draw must have a material shift for the border error to show"
        weight, folded_bias = fold_bn_conv(w, None, **bn)
        folded = conv(x, weight, folded_bias, padding=pad)
        two_layers = conv(_apply_bn(x, bn), w, padding=pad)
        n = 3 * math.prod(kernel) + 1 + EXTRA_OPS
        magnitude = conv(_abs_bn_output(x, bn), np.abs(w), padding=pad)
        bound = error_bound(magnitude, n, "float64")
        assert not compare(folded, two_layers, bound).ok
        # The folded bias counts every tap's t; the original saw 0 on the taps in the padding.
        # Predicted error = sum_{all taps} W t - sum_{taps inside} W t, the latter a conv of the
        # constant field t with zero padding.
        t_field = np.broadcast_to(t[(slice(None),) + (None,) * rank], (1, 3) + size)
        all_taps = conv(np.broadcast_to(t[(slice(None),) + (None,) * rank], (1, 3) + kernel), w)
        predicted = all_taps - conv(t_field, w, padding=pad)
        t_magnitude = conv(np.broadcast_to(np.abs(t)[(slice(None),) + (None,) * rank], (1, 3) + kernel), np.abs(w))
        assert_within(folded - two_layers, np.broadcast_to(predicted, folded.shape),
                      2 * bound + error_bound(2 * t_magnitude, n, "float64"), what="border error")
        interior = (slice(None), slice(None)) + (slice(1, -1),) * rank
        assert_within(folded[interior], two_layers[interior], bound[interior], what="interior")

    def test_zero_padding_is_exact_when_shift_is_zero(self):
        rng = np.random.default_rng(5)
        x, w = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3))
        bn = dict(bn_mean=np.zeros(3), bn_var=rng.uniform(0.5, 2.0, 3), bn_eps=1e-5,
                  bn_weight=rng.standard_normal(3), bn_bias=None)
        weight, folded_bias = fold_bn_conv(w, None, **bn)
        assert folded_bias.tolist() == [0.0] * 4
        magnitude = conv(_abs_bn_output(x, bn), np.abs(w), padding=1)
        assert_within(conv(x, weight, folded_bias, padding=1), conv(_apply_bn(x, bn), w, padding=1),
                      error_bound(magnitude, 27 + 1 + EXTRA_OPS, "float64"), what="t = 0, zero padding")


@ON_EVERY_BACKEND
class TestFoldBnLinear:
    def test_hand_computed(self):
        # s = (2, 1/4), t = (-2, 1/4 * 0 + 1).
        weight, bias = fold_bn_linear(np.array([[1.0, 4.0], [-2.0, 8.0]]), np.array([0.5, 1.0]),
                                      np.array([1.0, 0.0]), np.array([0.25, 16.0]), 0.0, None, np.array([0.0, 1.0]))
        assert weight.tolist() == [[2.0, 1.0], [-4.0, 2.0]]
        assert bias.tolist() == [0.5 + 1.0 * -2.0 + 4.0 * 1.0, 1.0 + -2.0 * -2.0 + 8.0 * 1.0]

    @PROPERTY
    @given(batch=st.integers(1, 4), features=st.tuples(st.integers(1, 8), st.integers(1, 8)), bias=st.booleans(),
           affine=st.booleans(), seed=st.integers(0, 2**32 - 1))
    def test_folded_linear_equals_bn_then_linear(self, batch, features, bias, affine, seed):
        rng = np.random.default_rng(seed)
        n_in, n_out = features
        x, w = rng.standard_normal((batch, n_in)), rng.standard_normal((n_out, n_in))
        b = rng.standard_normal(n_out) if bias else None
        bn = _bn(rng, n_in, affine)
        weight, folded_bias = fold_bn_linear(w, b, **bn)
        abs_b = np.zeros(n_out) if b is None else np.abs(b)
        magnitude = linear(_abs_bn_output(x, bn), np.abs(w), abs_b)
        assert_within(linear(x, weight, folded_bias), linear(_apply_bn(x, bn), w, b),
                      error_bound(magnitude, n_in + 1 + EXTRA_OPS, "float64"), what="BN->linear fold")


# --------------------------------------------------------------------------------------------
# Bad input: every check in refimpl/fold.py, with the argument and the shapes/values named.

def _ok_bn(channels: int) -> tuple:
    return np.zeros(channels), np.ones(channels), 1e-5


BAD_INPUT = [
    # (call, exception, message pattern)
    pytest.param(lambda: bn_scale_shift(np.zeros(2, dtype=np.int64), np.ones(2), 1e-5), TypeError,
                 "bn_mean must have a real floating dtype, got int64 (shape (2,))", id="int-mean"),
    pytest.param(lambda: bn_scale_shift(np.zeros(2), np.ones(2, dtype=np.int32), 1e-5), TypeError,
                 "bn_var must have a real floating dtype, got int32 (shape (2,))", id="int-var"),
    pytest.param(lambda: bn_scale_shift(np.zeros(2), np.ones(2), 1e-5, np.ones(2, dtype=bool)), TypeError,
                 "bn_weight must have a real floating dtype, got bool (shape (2,))", id="bool-weight"),
    pytest.param(lambda: bn_scale_shift(np.zeros(2), np.ones(2), 1e-5, None, np.ones(2, dtype=np.complex128)),
                 TypeError, "bn_bias must have a real floating dtype, got complex128 (shape (2,))", id="complex-bias"),
    pytest.param(lambda: bn_scale_shift(np.zeros((2, 1)), np.ones((2, 1)), 1e-5), ValueError,
                 "bn_var must be a vector (C,), got shape (2, 1)", id="var-not-vector"),
    pytest.param(lambda: bn_scale_shift(np.zeros(3), np.ones(2), 1e-5), ValueError,
                 "bn_mean must have shape (2,) to match bn_var's shape (2,), got shape (3,)", id="mean-length"),
    pytest.param(lambda: bn_scale_shift(np.zeros(2), np.ones(2), 1e-5, np.ones(1)), ValueError,
                 "bn_weight must have shape (2,) to match bn_var's shape (2,), got shape (1,)", id="weight-length"),
    pytest.param(lambda: bn_scale_shift(np.zeros(2), np.ones(2), 1e-5, None, np.ones((2, 2))), ValueError,
                 "bn_bias must have shape (2,) to match bn_var's shape (2,), got shape (2, 2)", id="bias-shape"),
    pytest.param(lambda: bn_scale_shift(np.zeros(2), np.ones(2), -1e-5), ValueError,
                 "bn_eps must be finite and >= 0, got -1e-05", id="negative-eps"),
    pytest.param(lambda: bn_scale_shift(np.zeros(2), np.ones(2), float("nan")), ValueError,
                 "bn_eps must be finite and >= 0, got nan", id="nan-eps"),
    pytest.param(lambda: bn_scale_shift(np.zeros(3), np.array([1.0, 2.0, -0.25]), 1e-5), ValueError,
                 "bn_var must be finite and non-negative; channel 2 has running variance -0.25 (shape (3,))",
                 id="negative-var"),
    pytest.param(lambda: bn_scale_shift(np.zeros(2), np.array([np.nan, 1.0]), 1e-5), ValueError,
                 "channel 0 has running variance nan", id="nan-var"),
    pytest.param(lambda: bn_scale_shift(np.zeros(2), np.array([1.0, np.inf]), 1e-5), ValueError,
                 "channel 1 has running variance inf", id="inf-var"),
    pytest.param(lambda: bn_scale_shift(np.zeros(2), np.array([1.0, 0.0]), 0.0), ValueError,
                 "bn_var + bn_eps is zero at channel 1 (var=0.0, eps=0.0)", id="zero-denominator"),
    pytest.param(lambda: fold_conv_bn(np.ones((2, 1, 3), dtype=np.int64), None, *_ok_bn(2)), TypeError,
                 "conv_weight must have a real floating dtype, got int64 (shape (2, 1, 3))", id="int-conv-weight"),
    pytest.param(lambda: fold_conv_bn(np.ones((2, 1, 3)), np.ones(2, dtype=np.int8), *_ok_bn(2)), TypeError,
                 "conv_bias must have a real floating dtype, got int8 (shape (2,))", id="int-conv-bias"),
    pytest.param(lambda: fold_conv_bn(np.ones(2), None, *_ok_bn(2)), ValueError,
                 "conv_weight must have rank >= 2", id="rank-1-weight"),
    pytest.param(lambda: fold_conv_bn(np.ones((2, 1, 3)), None, *_ok_bn(2), groups=0), ValueError,
                 "groups must be a positive integer, got 0", id="zero-groups"),
    pytest.param(lambda: fold_conv_bn(np.ones((2, 1, 3)), None, *_ok_bn(2), groups=1.0), ValueError,
                 "groups must be a positive integer, got 1.0", id="float-groups"),
    pytest.param(lambda: fold_conv_bn(np.ones((3, 1, 3)), None, *_ok_bn(3), groups=2), ValueError,
                 "conv_weight has 3 output channels (shape (3, 1, 3)), not divisible by groups=2", id="groups-out"),
    pytest.param(lambda: fold_conv_bn(np.ones((3, 2, 3)), None, *_ok_bn(4), transposed=True, groups=2), ValueError,
                 "conv_weight of a transposed conv has 3 input channels (shape (3, 2, 3)), not divisible by groups=2",
                 id="groups-transposed-in"),
    pytest.param(lambda: fold_conv_bn(np.ones((2, 1, 3)), np.ones(3), *_ok_bn(2)), ValueError,
                 "conv_bias must have shape (2,) to match the 2 output channels of conv_weight (2, 1, 3), "
                 "got shape (3,)", id="conv-bias-length"),
    pytest.param(lambda: fold_conv_bn(np.ones((2, 1, 3)), None, *_ok_bn(3)), ValueError,
                 "BatchNorm has (3,) channels (bn_var shape) but the conv has 2 output channels "
                 "(conv_weight shape (2, 1, 3), groups=1, transposed=False)", id="bn-vs-out"),
    pytest.param(lambda: fold_conv_bn(np.ones((4, 1, 3)), None, *_ok_bn(4), transposed=True, groups=2), ValueError,
                 "BatchNorm has (4,) channels (bn_var shape) but the conv has 2 output channels "
                 "(conv_weight shape (4, 1, 3), groups=2, transposed=True)", id="bn-vs-transposed-out"),
    pytest.param(lambda: fold_linear_bn(np.ones((2, 1, 1)), None, *_ok_bn(2)), ValueError,
                 "linear_weight must be [out, in], got shape (2, 1, 1)", id="linear-bn-rank"),
    pytest.param(lambda: fold_linear_bn(np.ones((2, 3)), None, *_ok_bn(3)), ValueError,
                 "BatchNorm has (3,) channels (bn_var shape) but the linear has 2 output channels",
                 id="linear-bn-channels"),
    pytest.param(lambda: fold_bn_conv(np.ones((4, 2, 3)), None, *_ok_bn(2), groups=2), ValueError,
                 "BatchNorm has (2,) channels (bn_var shape) but the conv reads 4 input channels "
                 "(conv_weight shape (4, 2, 3), groups=2)", id="bn-vs-in"),
    pytest.param(lambda: fold_bn_conv(np.ones((3, 2, 3)), None, *_ok_bn(4), groups=2), ValueError,
                 "conv_weight has 3 output channels (shape (3, 2, 3)), not divisible by groups=2",
                 id="bn-conv-groups"),
    pytest.param(lambda: fold_bn_conv(np.ones((2, 2, 3)), np.ones(1), *_ok_bn(2)), ValueError,
                 "conv_bias must have shape (2,)", id="bn-conv-bias-length"),
    pytest.param(lambda: fold_bn_conv(np.ones((2, 2, 3), dtype=np.float32), None, *_ok_bn(2)[:2],
                                      1e-5, np.ones(2, dtype=np.int16)), TypeError,
                 "bn_weight must have a real floating dtype, got int16", id="bn-conv-int-weight"),
    pytest.param(lambda: fold_bn_linear(np.ones(4), None, *_ok_bn(4)), ValueError,
                 "linear_weight must be [out, in], got shape (4,)", id="bn-linear-rank"),
    pytest.param(lambda: fold_bn_linear(np.ones((2, 3)), None, *_ok_bn(2)), ValueError,
                 "BatchNorm has (2,) channels (bn_var shape) but the linear reads 3 input channels", id="bn-linear-in"),
]


@ON_EVERY_BACKEND
@pytest.mark.parametrize("call, exception, message", BAD_INPUT)
def test_bad_input_raises_naming_argument_and_values(call, exception, message):
    with pytest.raises(exception, match=re.escape(message)):
        call()


@ON_EVERY_BACKEND
@pytest.mark.parametrize("fold", ["fold_linear_bn", "fold_bn_linear"])
def test_linear_folds_name_linear_arguments(fold):
    fold = globals()[fold]
    with pytest.raises(TypeError, match="linear_weight"):
        fold(np.ones((2, 2), dtype=np.int64), None, *_ok_bn(2))


def test_mixed_namespaces_are_rejected():
    with pytest.raises(TypeError):
        fold_conv_bn(torch.ones(2, 1, 3, dtype=torch.float64), None, *_ok_bn(2))


# --------------------------------------------------------------------------------------------
# Backends: the one implementation on torch tensors (CPU; CUDA where present) equals numpy.

def _fold_cases(rng: np.random.Generator) -> list:
    """(fold, layer weight, layer bias, bn channels, kwargs, reduction length of the bias)."""
    return [
        (fold_conv_bn, rng.standard_normal((6, 2, 3, 3)), rng.standard_normal(6), 6, dict(groups=3), 1),
        (fold_conv_bn, rng.standard_normal((4, 3, 2, 2)), None, 6, dict(transposed=True, groups=2), 1),
        (fold_linear_bn, rng.standard_normal((5, 7)), rng.standard_normal(5), 5, {}, 1),
        (fold_bn_conv, rng.standard_normal((6, 2, 3, 3)), rng.standard_normal(6), 4, dict(groups=2), 2 * 9 + 1),
        (fold_bn_linear, rng.standard_normal((5, 7)), None, 7, {}, 7 + 1),
    ]


def _bias_magnitude(fold, w, b, bn, kwargs):
    """What the folded bias sums, on absolute values: |s|(|b| + |mu|) + |beta| when BN runs after
    the layer; |b| + sum_{j,k} |W| (|s mu| + |beta|) when it runs before (a valid conv of that
    constant field over one kernel window)."""
    s, _ = bn_scale_shift(**bn)
    abs_b = 0.0 if b is None else np.abs(b)
    abs_t = np.abs(s * bn["bn_mean"]) + np.abs(bn["bn_bias"])
    if fold in (fold_conv_bn, fold_linear_bn):
        return np.abs(s) * (abs_b + np.abs(bn["bn_mean"])) + np.abs(bn["bn_bias"])
    kernel = w.shape[2:]
    field = np.broadcast_to(abs_t[(slice(None),) + (None,) * len(kernel)], (1, abs_t.shape[0]) + kernel)
    taps = conv(field, np.abs(w), groups=kwargs.get("groups", 1)) if kernel else linear(field, np.abs(w))
    return abs_b + taps.reshape(-1)


@pytest.mark.parametrize("case", range(5), ids=["conv-bn", "convT-bn", "linear-bn", "bn-conv", "bn-linear"])
def test_backends_agree_with_numpy(backend, case):
    rng = np.random.default_rng(11)
    fold, w, b, channels, kwargs, bias_n = _fold_cases(rng)[case]
    bn = _bn(rng, channels, affine=True)
    expected_w, expected_b = fold(w, b, **bn, **kwargs)
    on_backend = {k: (backend(v) if isinstance(v, np.ndarray) else v) for k, v in bn.items()}
    got_w, got_b = fold(backend(w), None if b is None else backend(b), **on_backend, **kwargs)
    reference = backend(np.zeros(1))
    for got in (got_w, got_b):
        assert type(got) is type(reference)
        assert got.dtype == reference.dtype
        assert getattr(got, "device", None) == getattr(reference, "device", None)
    # W' = W * s is one product per element: its own magnitude is |W'|.
    assert_within(got_w, expected_w, error_bound(np.abs(expected_w), EXTRA_OPS, "float64"), what="folded weight")
    assert_within(got_b, expected_b, error_bound(_bias_magnitude(fold, w, b, bn, kwargs), bias_n + EXTRA_OPS,
                                                 "float64"), what="folded bias")


# --------------------------------------------------------------------------------------------
# Rounding: fold in float64, round once, compared with the correctly rounded exact fold.

# (mantissa bits incl. the implicit one, exponent of the smallest subnormal)
_FORMATS = {"float16": (11, -24), "bfloat16": (8, -133), "float32": (24, -149)}


def _round_correctly(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round extended-precision ``x`` to ``dtype`` once, to nearest with ties to even.

    Written out rather than cast because the library casts round twice: numpy converts
    longdouble to float16 through float32, and torch converts float64 to float16 and
    bfloat16 through float32 as well. Returns float64 holding values exactly representable in
    ``dtype`` (finite inputs in range only).
    """
    bits, smallest_exponent = _FORMATS[dtype]
    x = np.asarray(x, dtype=np.longdouble)
    _, exponent = np.frexp(x)                                     # x = m * 2**e, 0.5 <= |m| < 1
    quantum = np.maximum(exponent - bits, smallest_exponent).astype(np.int32)
    # Scaling by a power of two is exact; rint rounds half to even on the integer significand.
    return np.ldexp(np.rint(np.ldexp(x, -quantum)), quantum).astype(np.float64)


def _to_dtype(x64: np.ndarray, dtype: str):
    """The project's single rounding of a float64 result: numpy for fp16/fp32, torch for bf16."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(x64)).to(torch.bfloat16).double().numpy()
    return x64.astype(dtype).astype(np.float64)


def _params_in(params: dict, kind):
    """``params`` (float64 arrays holding dtype values) converted to longdouble, float64, or the dtype."""
    def convert(v):
        if not isinstance(v, np.ndarray):
            return v
        if kind == "bfloat16":
            return torch.from_numpy(v).to(torch.bfloat16)
        return v.astype(kind)
    return {k: convert(v) for k, v in params.items()}


_EXTENDED = np.finfo(np.longdouble).nmant >= 60
needs_extended = pytest.mark.skipif(not _EXTENDED, reason="np.longdouble is no wider than float64 here")


class TestCorrectRoundingOracle:
    # The oracle must be right before it judges anything: hand cases at ties and near ties.
    @pytest.mark.parametrize("value, dtype, expected", [
        (1 + 2.0**-11, "float16", 1.0),                                  # tie -> even (down)
        (1 + 3 * 2.0**-11, "float16", 1 + 2.0**-9),                      # tie -> even (up)
        (1 + 2.0**-11 + 2.0**-40, "float16", 1 + 2.0**-10),             # just above a tie: up
        (1 + 2.0**-8 + 2.0**-30, "bfloat16", 1 + 2.0**-7),
        (-(1 + 2.0**-24 + 2.0**-52), "float32", -(1 + 2.0**-23)),
        (3 * 2.0**-26, "float16", 2.0**-24),                             # subnormal, tie -> even
        (2.0**-25 + 2.0**-40, "float16", 2.0**-24),
        (0.0, "float16", 0.0),
        (65504.0, "float16", 65504.0),
    ])
    def test_hand_cases(self, value, dtype, expected):
        assert _round_correctly(np.array([value]), dtype).tolist() == [expected]

    @needs_extended
    def test_extended_input_below_float64_resolution(self):
        just_above_tie = np.longdouble(1) + np.longdouble(2.0**-11) + np.ldexp(np.longdouble(1), -60)
        assert _round_correctly(np.array([just_above_tie]), "float16").tolist() == [1 + 2.0**-10]

    def test_agrees_with_numpy_from_float64(self):
        # numpy's float64 -> float16/float32 casts round once, correctly.
        x = np.random.default_rng(3).standard_normal(20000) * 8
        for dtype in ("float16", "float32"):
            assert np.array_equal(_round_correctly(x, dtype), x.astype(dtype).astype(np.float64))


ROUNDING_FOLDS = [
    pytest.param(fold_conv_bn, (64, 16, 3, 3), 64, {}, id="conv-bn"),
    pytest.param(fold_conv_bn, (16, 32, 3, 3), 64, dict(transposed=True, groups=2), id="convT-bn"),
    pytest.param(fold_linear_bn, (128, 96), 128, {}, id="linear-bn"),
    pytest.param(fold_bn_conv, (64, 8, 3, 3), 16, dict(groups=2), id="bn-conv"),
    pytest.param(fold_bn_linear, (128, 96), 96, {}, id="bn-linear"),
]


@needs_extended
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("fold, shape, channels, kwargs", ROUNDING_FOLDS)
def test_float64_fold_rounded_once_is_correctly_rounded(fold, shape, channels, kwargs, dtype):
    rng = np.random.default_rng(17)
    # Parameters as the dtype holds them (rounded once from float64), kept in float64 exactly.
    raw = dict(w=rng.standard_normal(shape), b=rng.standard_normal(shape[1] * kwargs.get("groups", 1)
                                                                   if kwargs.get("transposed") else shape[0]),
               bn_mean=rng.standard_normal(channels), bn_var=rng.uniform(0.01, 4.0, channels),
               bn_weight=rng.standard_normal(channels), bn_bias=rng.standard_normal(channels))
    params = {k: _round_correctly(v, dtype) for k, v in raw.items()}

    def run(kind):
        p = _params_in(params, kind)
        return fold(p.pop("w"), p.pop("b"), bn_eps=1e-5, **p, **kwargs)

    exact = run(np.longdouble)
    once = [_to_dtype(r, dtype) for r in run(np.float64)]
    in_dtype = [(r.double().numpy() if hasattr(r, "double") else r.astype(np.float64)) for r in run(dtype)]
    correct = [_round_correctly(e, dtype) for e in exact]

    u64 = 2.0**-53
    for name, e, o, c, d in zip(("weight", "bias"), exact, once, correct, in_dtype, strict=True):
        agree = o == c
        assert agree.mean() >= 0.999, f"{name}: only {agree.mean():.4%} correctly rounded"
        # Every disagreement must be a double-rounding tie: the exact value lies within the
        # float64 fold's own error (and, for bf16 via torch, float32's half-ulp) of the midpoint
        # between the two neighbours. The float64 error is measured, not assumed.
        midpoint = (o.astype(np.longdouble) + c.astype(np.longdouble)) / 2
        fold_error = np.abs(np.asarray(run(np.float64)[0 if name == "weight" else 1], dtype=np.longdouble) - e)
        slack = fold_error + (2.0**-24 * np.abs(e) if dtype == "bfloat16" else 0) + 4 * u64 * np.abs(e)
        near_tie = np.abs(e - midpoint) <= slack
        assert np.all(near_tie | agree), (
            f"{name}: {int((~(near_tie | agree)).sum())} elements rounded wrongly and not at a tie")
        # Folding in the parameter dtype itself (what mmcv and torch.fx do) is measurably worse.
        assert (d == c).mean() < agree.mean(), f"{name}: folding in {dtype} was not worse"

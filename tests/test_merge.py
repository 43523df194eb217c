"""Tests of the branch-merging kernel algebra in ``refimpl.merge``.

Oracles: hand-computed cases on small integers (exact in float64); the branches themselves applied
with the float64 reference conv (``refimpl.conv``) and summed; torch's own float64 average pooling; and,
for the exactness rules, the outputs: a geometry is accepted exactly when the centred merge gives the
branches' sum on every input size tried, and refused exactly when it does not.
"""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
from conftest import run_on_backend
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import refimpl
from refimpl import (
    ConvGeometry,
    Kernel,
    MergeError,
    add_branches,
    avg_pool_geometry,
    avg_pool_kernel,
    batch_norm,
    chain_kernels,
    check_padding_shift,
    compare,
    compose_geometry,
    compose_kernels,
    conv,
    error_bound,
    fold_conv_bn,
    identity_kernel,
    merge_geometry,
    pad_kernel,
    regroup_kernel,
    scale_channels,
    sum_kernels,
)
from refimpl.merge import MERGE_REASONS

# The backend fixture is set up once per test, not per example: it only swaps the functions under test.
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

#: The array-API functions under test: each test marked ON_EVERY_BACKEND calls them on every backend.
ARRAY_FUNCTIONS = ("add_branches", "avg_pool_kernel", "chain_kernels", "check_padding_shift", "compose_kernels",
                   "fold_conv_bn", "identity_kernel", "pad_kernel", "regroup_kernel", "scale_channels", "sum_kernels")


@pytest.fixture
def on_every_backend(backend, monkeypatch):
    run_on_backend(backend, monkeypatch, sys.modules[__name__], ARRAY_FUNCTIONS)
    return backend


ON_EVERY_BACKEND = pytest.mark.usefixtures("on_every_backend")


def _within(actual, expected, magnitude, n, what=""):
    result = compare(actual, expected, error_bound(magnitude, n, "float64"))
    assert result.ok, result.describe(what)


def _conv_args(g: ConvGeometry) -> dict:
    return dict(stride=g.stride, padding=g.padding, dilation=g.dilation, padding_mode=g.padding_mode)


# --------------------------------------------------------------------------------------------
# Kernels, each against an independent oracle

@ON_EVERY_BACKEND
class TestKernels:
    def test_pad_kernel_centres_exactly(self):
        w = np.arange(1.0, 7.0).reshape(1, 1, 2, 3)
        padded = pad_kernel(w, (4, 5))
        assert padded.shape == (1, 1, 4, 5)
        assert padded[0, 0].tolist() == [[0, 0, 0, 0, 0], [0, 1, 2, 3, 0], [0, 4, 5, 6, 0], [0, 0, 0, 0, 0]]
        assert np.array_equal(pad_kernel(w, (2, 3)), w)
        assert refimpl.pad_kernel(w, (2, 3)) is w  # nothing to pad: the same array, no copy

    @pytest.mark.parametrize("size, message", [((3, 3), "difference must be even"), ((0, 3), "difference must be"),
                                               ((4,), "has 1 dims")])
    def test_pad_kernel_rejects(self, size, message):
        with pytest.raises(ValueError, match=message):
            pad_kernel(np.ones((1, 1, 2, 3)), size)

    @given(channels=st.sampled_from([1, 2, 4, 6]), dims=st.integers(0, 3), data=st.data())
    @PROPERTY
    def test_identity_kernel_is_the_identity_in_every_grouping(self, channels, dims, data):
        groups = data.draw(st.sampled_from([g for g in (1, 2, 3, 6) if channels % g == 0]))
        x = np.random.default_rng(channels * 10 + dims).standard_normal((2, channels) + (3,) * dims)
        kernel = identity_kernel(channels, dims, groups=groups, like=x)
        assert kernel.shape == (channels, channels // groups) + (1,) * dims
        if dims == 0:
            assert np.array_equal(x @ kernel.T, x) if groups == 1 else kernel.sum() == channels
        else:
            assert np.array_equal(conv(x, kernel, groups=groups), x)   # one product by 1, the rest by 0: exact

    @pytest.mark.parametrize("dims, kernel, stride, padding, divisor", [
        (1, 3, 1, 1, None), (1, 2, 2, 0, None), (2, 3, 1, 1, None), (2, 3, 2, 1, None), (2, 3, 1, 1, 5),
        (3, 3, 2, 1, None), (3, 2, 1, 0, 3)])
    def test_avg_pool_kernel_is_torchs_average_pool(self, dims, kernel, stride, padding, divisor):
        torch = pytest.importorskip("torch")
        functional = {1: torch.nn.functional.avg_pool1d, 2: torch.nn.functional.avg_pool2d,
                      3: torch.nn.functional.avg_pool3d}[dims]
        x = np.random.default_rng(dims).standard_normal((2, 3) + (7,) * dims)
        kwargs = dict(count_include_pad=True) | ({"divisor_override": divisor} if divisor else {})
        expected = functional(torch.from_numpy(x), kernel, stride, padding, **kwargs).numpy()
        k = avg_pool_kernel(3, (kernel,) * dims, groups=3, divisor=divisor, like=x)
        got = conv(x, k, stride=stride, padding=padding, groups=3)
        _within(got, expected, conv(np.abs(x), np.abs(k), stride=stride, padding=padding, groups=3), kernel ** dims + 1)

    def test_scale_channels(self):
        w, b = scale_channels(np.ones((2, 1, 3)), None, -2.0)
        assert w.tolist() == [[[-2.0] * 3]] * 2 and b.tolist() == [0.0, 0.0]
        rng = np.random.default_rng(1)
        x, w, b, c = rng.standard_normal((2, 4, 6)), rng.standard_normal((3, 4, 3)), rng.standard_normal(3), \
            rng.standard_normal(3)
        w2, b2 = scale_channels(w, b, c)
        _within(conv(x, w2, b2), c[:, None] * conv(x, w, b), np.abs(c)[:, None] * conv(abs(x), abs(w), abs(b)), 14)
        with pytest.raises(ValueError, match=r"scale must be a scalar or have shape \(3,\)"):
            scale_channels(w, b, np.ones(4))

    @given(data=st.data())
    @PROPERTY
    def test_regroup_keeps_the_convolution(self, data):
        per_out = data.draw(st.integers(1, 2))
        groups = data.draw(st.sampled_from([1, 2, 4, 6, 12]))
        new_groups = data.draw(st.sampled_from([g for g in (1, 2, 3, 4, 6, 12) if groups % g == 0]))
        channels = 12
        rng = np.random.default_rng(groups * 100 + new_groups)
        x = rng.standard_normal((2, channels, 5, 5))
        w = rng.standard_normal((per_out * groups, channels // groups, 3, 3))
        regrouped = regroup_kernel(w, groups, new_groups)
        assert regrouped.shape == (per_out * groups, channels // new_groups, 3, 3)
        expected = conv(x, w, padding=1, groups=groups)
        got = conv(x, regrouped, padding=1, groups=new_groups)
        _within(got, expected, conv(abs(x), abs(w), padding=1, groups=groups), 9 * channels // new_groups)

    def test_regroup_rejects_a_finer_grouping(self):
        with pytest.raises(ValueError, match="new_groups=2 must divide groups=3"):
            regroup_kernel(np.ones((6, 2, 1)), 3, 2)

    def test_add_branches_exact_integers(self):
        # RepVGG in one dim: [1, 2, 3] (padding 1) + [10] + identity, checked on the branches themselves.
        x = np.array([[[1.0, -2.0, 3.0, 4.0, -5.0]]])
        w3, w1, ident = np.array([[[1.0, 2.0, 3.0]]]), np.array([[[10.0]]]), identity_kernel(1, 1, like=x)
        w, b = add_branches([w3, w1, ident], [np.array([1.0]), np.array([-3.0]), None], [1.0, 1.0, 2.0], constant=0.5)
        assert w.tolist() == [[[1.0, 14.0, 3.0]]] and b.tolist() == [-1.5]
        assert conv(x, w, b, padding=1).tolist() == (conv(x, w3, [1.0], padding=1) + conv(x, w1, [-3.0]) + 2 * x
                                                     + 0.5).tolist()

    def test_add_branches_rejects_mismatched_shapes(self):
        with pytest.raises(ValueError, match=r"weights\[1\] has shape \(2, 1, 1\) but weights\[0\] has \(1, 1, 3\)"):
            add_branches([np.ones((1, 1, 3)), np.ones((2, 1, 1))], [None, None])
        with pytest.raises(ValueError, match=r"biases\[0\] must have shape \(1,\)"):
            add_branches([np.ones((1, 1, 3))], [np.ones(2)])
        with pytest.raises(TypeError, match=r"weights\[0\] must have a real floating dtype"):
            add_branches([np.ones((1, 1, 3), dtype=np.int64)], [None])

    def test_bn_alone_is_a_scaled_identity(self):
        # A BatchNorm alone, folded with the one BN formula into the identity kernel: s_c x + t_c.
        rng = np.random.default_rng(3)
        x = rng.standard_normal((2, 3, 4, 4))
        mean, var, gamma, beta = rng.standard_normal(3), rng.uniform(0.5, 2, 3), rng.standard_normal(3), \
            rng.standard_normal(3)
        w, b = fold_conv_bn(identity_kernel(3, 2, groups=3, like=x), None, mean, var, 1e-5, gamma, beta, groups=3)
        from refimpl import batch_norm, bn_scale_shift
        s, _ = bn_scale_shift(mean, var, 1e-5, gamma, beta)
        magnitude = np.abs(s)[:, None, None] * (abs(x) + abs(mean)[:, None, None]) + abs(beta)[:, None, None]
        _within(conv(x, w, b, groups=3), batch_norm(x, mean, var, gamma, beta, eps=1e-5), magnitude, 6)


# --------------------------------------------------------------------------------------------
# Geometry: merge_geometry accepts exactly the sums the centred merge computes

@st.composite
def branch_sets(draw):
    """Two or three branch geometries around a common one: each centred, or with one defect -- another
    padding, dilation, stride or padding mode, or an even kernel (which has no centre)."""
    dims = draw(st.integers(1, 2))
    stride = tuple(draw(st.sampled_from([1, 2])) for _ in range(dims))
    dilation = tuple(draw(st.sampled_from([1, 2])) for _ in range(dims))
    kernel = tuple(draw(st.sampled_from([3, 5])) for _ in range(dims))
    padding = tuple(d * (k - 1) // 2 if draw(st.booleans()) else draw(st.integers(0, 3))
                    for d, k in zip(dilation, kernel, strict=True))
    mode = draw(st.sampled_from(["zeros", "reflect", "circular"]))
    geometries = [ConvGeometry(kernel, stride, padding, dilation, mode)]
    for _ in range(draw(st.integers(1, 2))):
        defect = draw(st.sampled_from(["none", "padding", "dilation", "stride", "mode", "even"]))
        k_b = tuple(draw(st.sampled_from([1, 3, k])) for k in kernel)
        if defect == "even":
            k_b = (2,) + k_b[1:]
        d_b = tuple(3 - d if defect == "dilation" and i == 0 else d for i, d in enumerate(dilation))
        p_b = []
        for d in range(dims):
            # The padding that gives this branch the common output size (with its own dilation), if any.
            twice = 2 * padding[d] - dilation[d] * (kernel[d] - 1) + d_b[d] * (k_b[d] - 1)
            same_size = twice // 2 if twice >= 0 else 0
            p_b.append(same_size + (1 if defect == "padding" and d == 0 else 0))
        s_b = tuple(3 - s for s in stride) if defect == "stride" else stride
        m_b = ("zeros" if mode != "zeros" else "reflect") if defect == "mode" else mode
        geometries.append(ConvGeometry(k_b, s_b, tuple(p_b), d_b, m_b))
    return geometries


SIZES = (7, 8, 9, 10)


def _outputs(geometries, seed):
    """Weights; the branches' outputs for each input size at which their shapes agree (the sum exists); and
    whether the sum exists at every size at which any branch has an output."""
    rng = np.random.default_rng(seed)
    dims = len(geometries[0].kernel_size)
    weights = [rng.standard_normal((1, 2) + g.kernel_size) for g in geometries]
    runs, everywhere = [], True
    for size in SIZES:
        x = rng.standard_normal((1, 2) + (size,) * dims)
        outs = []
        for w, g in zip(weights, geometries, strict=True):
            try:
                outs.append(conv(x, w, **_conv_args(g)))
            except ValueError:  # the input is too small for this branch
                outs.append(None)
        if all(o is None for o in outs):
            continue
        if any(o is None for o in outs) or len({o.shape for o in outs}) != 1:
            everywhere = False
            continue
        runs.append((x, outs))
    return weights, runs, everywhere


def _magnitude(x, weights, geometries):
    return sum(conv(abs(x), abs(w), **_conv_args(g)) for w, g in zip(weights, geometries, strict=True))


@ON_EVERY_BACKEND
@given(branch_sets())
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_merge_geometry_accepts_exactly_what_the_merge_computes(geometries):
    weights, runs, everywhere = _outputs(geometries, seed=len(geometries))
    assume(runs)
    dims = len(geometries[0].kernel_size)
    try:
        merged = merge_geometry(geometries)
    except MergeError as error:
        assert error.reason in MERGE_REASONS
        if not everywhere:
            return  # the branches agree in size only for some inputs: a merge exact for every size cannot exist
        # Refused: the largest kernel with every branch centred in it (either way, for an odd difference)
        # does not give the sum at some input size.
        size = tuple(max(g.kernel_size[d] for g in geometries) for d in range(dims))
        largest = max(geometries, key=lambda g: g.kernel_size)
        attempt = ConvGeometry(size, largest.stride, largest.padding, largest.dilation,
                               next((g.padding_mode for g in geometries if g.pads), "zeros"))
        for offsets in itertools.product(range(2), repeat=dims):
            padded = 0
            for w, g in zip(weights, geometries, strict=True):
                full = np.zeros(w.shape[:2] + size)
                starts = [(size[d] - g.kernel_size[d] + offsets[d] * ((size[d] - g.kernel_size[d]) % 2)) // 2
                          for d in range(dims)]
                full[(slice(None), slice(None)) + tuple(slice(s, s + k) for s, k in
                                                        zip(starts, g.kernel_size, strict=True))] = w
                padded = padded + full
            differs = False
            for x, outs in runs:
                try:
                    got = conv(x, padded, **_conv_args(attempt))
                except ValueError:
                    differs = True
                    break
                bound = error_bound(_magnitude(x, weights, geometries), 2 * padded[0, 0].size + 3, "float64")
                if got.shape != outs[0].shape or not compare(got, sum(outs), bound).ok:
                    differs = True
                    break
            assert differs, f"merge_geometry refused {geometries} ({error}) but the centred merge is exact"
        return
    assert everywhere, "an accepted sum must exist at every input size"
    w, b = add_branches(weights, [None] * len(weights))
    for x, outs in runs:
        _within(conv(x, w, b, **_conv_args(merged)), sum(outs), _magnitude(x, weights, geometries),
                2 * w[0, 0].size + len(weights), f"merged {geometries}")


class TestGeometry:
    def test_one_tap_kernels_ignore_dilation_and_unpadded_branches_ignore_the_mode(self):
        three = ConvGeometry((3,), (1,), (2,), (2,), "reflect")
        one = ConvGeometry((1,), (1,), (0,), (3,), "zeros")
        assert merge_geometry([three, one]) == three

    @pytest.mark.parametrize("second, reason", [
        (ConvGeometry((3,), (2,), (1,), (1,)), "stride_mismatch"),
        (ConvGeometry((3,), (1,), (2,), (2,)), "dilation_mismatch"),
        (ConvGeometry((1,), (1,), (1,), (1,)), "padding_misaligned"),
        (ConvGeometry((2,), (1,), (0,), (1,)), "padding_misaligned"),
        (ConvGeometry((3,), (1,), (1,), (1,), "reflect"), "padding_mode_mismatch"),
    ])
    def test_each_refusal_names_its_reason(self, second, reason):
        with pytest.raises(MergeError) as caught:
            merge_geometry([ConvGeometry((3,), (1,), (1,), (1,)), second])
        assert caught.value.reason == reason

    def test_reasons_are_the_reports_codes(self):
        pytest.importorskip("torch")
        from adapters.report import REASONS
        assert set(MERGE_REASONS) <= set(REASONS)

    def test_invalid_geometry(self):
        with pytest.raises(ValueError, match="padding has 2 entries"):
            ConvGeometry((3,), (1,), (1, 1), (1,))
        with pytest.raises(ValueError, match="padding_mode must be one of"):
            ConvGeometry((3,), (1,), (1,), (1,), "mirror")
        with pytest.raises(ValueError, match="stride must hold integers >= 1"):
            ConvGeometry((3,), (0,), (1,), (1,))


# --------------------------------------------------------------------------------------------
# The sequential case

@ON_EVERY_BACKEND
@given(data=st.data())
@PROPERTY
def test_compose_is_exact_exactly_when_check_padding_shift_allows_it(data):
    dims = data.draw(st.integers(1, 2))
    groups = data.draw(st.sampled_from([1, 2]))
    kernel = tuple(data.draw(st.sampled_from([1, 3, 5])) for _ in range(dims))
    padding = tuple(data.draw(st.integers(0, 2)) for _ in range(dims))
    mode = data.draw(st.sampled_from(["zeros", "zeros", "replicate", "circular"]))
    stride = tuple(data.draw(st.sampled_from([1, 2])) for _ in range(dims))
    shift = data.draw(st.sampled_from(["zero", "random", "centre_only"]))
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    x = rng.standard_normal((2, 4) + (8,) * dims)
    inner_w = rng.standard_normal((6, 4 // groups) + (1,) * dims)
    inner_b = np.zeros(6) if shift == "zero" else rng.standard_normal(6)
    outer_w = rng.standard_normal((4, 6 // groups) + kernel)
    if shift == "centre_only":  # the outer kernel is zero wherever a tap can read padding
        mask = np.zeros(kernel)
        mask[tuple(slice(p, k - p) if p < k - p else slice(0, 0) for p, k in zip(padding, kernel, strict=True))] = 1
        outer_w = outer_w * mask
    outer_b = rng.standard_normal(4)
    outer = ConvGeometry(kernel, stride, padding, (1,) * dims, mode)
    assert compose_geometry(outer, ConvGeometry.pointwise(dims)) == outer
    args = dict(stride=stride, padding=padding, padding_mode=mode, groups=groups)
    expected = conv(conv(x, inner_w, inner_b, groups=groups), outer_w, outer_b, **args)
    w, b = compose_kernels(outer_w, outer_b, inner_w, inner_b, groups=groups)
    got = conv(x, w, b, **args)
    magnitude = conv(conv(abs(x), abs(inner_w), abs(inner_b), groups=groups), abs(outer_w), abs(outer_b), **args)
    n = 4 // groups + (6 // groups) * int(np.prod(kernel)) + 2
    try:
        check_padding_shift(outer_w, inner_b, outer, groups=groups)
    except MergeError as error:
        assert error.reason == "zero_padding"
        assert not compare(got, expected, error_bound(magnitude, n, "float64")).ok
        return
    _within(got, expected, magnitude, n, f"{outer}, shift {shift}")


@ON_EVERY_BACKEND
def test_pointwise_after_a_kernel_is_always_exact():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 7, 7))
    w3, b3 = rng.standard_normal((6, 4, 3, 3)), rng.standard_normal(6)
    w1, b1 = rng.standard_normal((5, 6, 1, 1)), rng.standard_normal(5)
    inner = ConvGeometry((3, 3), (2, 2), (1, 1), (1, 1))
    assert compose_geometry(ConvGeometry.pointwise(2), inner) == inner
    w, b = compose_kernels(w1, b1, w3, b3)
    expected = conv(conv(x, w3, b3, stride=2, padding=1), w1, b1)
    magnitude = conv(conv(abs(x), abs(w3), abs(b3), stride=2, padding=1), abs(w1), abs(b1))
    _within(conv(x, w, b, stride=2, padding=1), expected, magnitude, 36 + 6 + 2)


@ON_EVERY_BACKEND
def test_compose_needs_a_pointwise_layer():
    g3 = ConvGeometry((3,), (1,), (1,), (1,))
    with pytest.raises(MergeError) as caught:
        compose_geometry(g3, g3)
    assert caught.value.reason == "sequential_unsupported"
    with pytest.raises(MergeError):
        compose_geometry(g3, ConvGeometry((1,), (2,), (0,), (1,)))   # a strided 1x1 is not pointwise
    with pytest.raises(ValueError, match="compose_kernels needs a 1x1 kernel"):
        compose_kernels(np.ones((1, 1, 3)), None, np.ones((1, 1, 3)), None)
    with pytest.raises(ValueError, match=r"reads 2 channels \(groups=1\) but inner_weight \(3, 1, 1\) writes 3"):
        compose_kernels(np.ones((1, 2, 3)), None, np.ones((3, 1, 1)), None)


# --------------------------------------------------------------------------------------------
# Whole branches: Kernel, sum_kernels, chain_kernels, avg_pool_geometry

@ON_EVERY_BACKEND
def test_sum_kernels_of_a_grouped_conv_a_norm_a_scale_and_a_pool_is_the_branches():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 4, 6, 6))
    wg, bg = rng.standard_normal((4, 2, 3, 3)), rng.standard_normal(4)
    mean, var, gamma, beta = rng.standard_normal(4), rng.uniform(0.5, 2, 4), rng.standard_normal(4), \
        rng.standard_normal(4)
    scale = rng.standard_normal(4)
    conv_branch = Kernel(wg, bg, ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1)), 2)
    norm_branch = Kernel.identity(4, 2, like=x).batch_norm(mean, var, 1e-5, gamma, beta)
    pool_branch = Kernel.avg_pool(4, avg_pool_geometry((3, 3), (1, 1), (1, 1)), like=x).scaled(scale)
    merged = sum_kernels([conv_branch, norm_branch, pool_branch], [1.0, -1.0, 1.0])
    assert merged.groups == 2 and not merged.regroupable and merged.geometry == conv_branch.geometry
    pooled = conv(x, np.full((4, 1, 3, 3), 1 / 9), padding=1, groups=4)
    expected = (conv(x, wg, bg, padding=1, groups=2) - batch_norm(x, mean, var, gamma, beta, eps=1e-5)
                + scale[:, None, None] * pooled)
    s = np.abs(gamma) / np.sqrt(var + 1e-5)
    magnitude = (conv(abs(x), abs(wg), abs(bg), padding=1, groups=2)
                 + s[:, None, None] * (abs(x) + abs(mean)[:, None, None]) + abs(beta)[:, None, None]
                 + abs(scale)[:, None, None] * conv(abs(x), np.full((4, 1, 3, 3), 1 / 9), padding=1, groups=4))
    _within(conv(x, merged.weight, merged.bias, padding=1, groups=2), expected, magnitude, 2 * 18 + 12)


@ON_EVERY_BACKEND
def test_sum_and_chain_refuse_with_reasons():
    like = np.zeros(1)
    dense = Kernel(np.ones((4, 4, 1, 1)), np.zeros(4), ConvGeometry.pointwise(2), 1)
    grouped = Kernel(np.ones((4, 2, 1, 1)), np.zeros(4), ConvGeometry.pointwise(2), 2)
    wider = Kernel(np.ones((6, 4, 1, 1)), np.zeros(6), ConvGeometry.pointwise(2), 1)
    cases = [(lambda: sum_kernels([dense, grouped]), "groups_incompatible"),
             (lambda: sum_kernels([dense, wider]), "channels_mismatch"),
             (lambda: sum_kernels([dense, Kernel.identity(3, 2, like=like)]), "channels_mismatch"),
             (lambda: chain_kernels(dense, wider), "channels_mismatch"),
             (lambda: chain_kernels(grouped, dense), "groups_incompatible"),
             (lambda: chain_kernels(Kernel(np.ones((4, 4, 3, 3)), np.zeros(4), ConvGeometry((3, 3), (1, 1), (1, 1),
                                                                                            (1, 1)), 1),
                                    Kernel(np.ones((4, 4, 1, 1)), np.ones(4), ConvGeometry.pointwise(2), 1)),
              "zero_padding")]
    for attempt, reason in cases:
        with pytest.raises(MergeError) as caught:
            attempt()
        assert caught.value.reason == reason
    # A regroupable kernel takes the conv's groups on either side of a chain.
    assert chain_kernels(grouped, Kernel.identity(4, 2, like=like)).groups == 2
    assert chain_kernels(Kernel.identity(4, 2, like=like), grouped).groups == 2


@pytest.mark.parametrize("kwargs, is_conv", [
    ({"padding": (1, 1)}, True), ({"padding": (0, 0), "count_include_pad": False}, True),
    ({"padding": (1, 1), "count_include_pad": False}, False),
    ({"padding": (1, 1), "count_include_pad": False, "divisor_override": 9}, True),
    ({"padding": (0, 0), "ceil_mode": True}, False),
])
def test_avg_pool_geometry_accepts_exactly_the_pools_that_are_convolutions(kwargs, is_conv):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(3).standard_normal((1, 2, 6, 6))
    extra = {"divisor_override": kwargs["divisor_override"]} if "divisor_override" in kwargs else {}
    pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(x), 3, 2, kwargs["padding"],
                                            kwargs.get("ceil_mode", False), kwargs.get("count_include_pad", True),
                                            **extra).numpy()
    kernel = avg_pool_kernel(2, (3, 3), groups=2, divisor=kwargs.get("divisor_override"), like=x)
    as_conv = conv(x, kernel, stride=2, padding=kwargs["padding"], groups=2)
    magnitude = conv(abs(x), abs(kernel), stride=2, padding=kwargs["padding"], groups=2)
    same = as_conv.shape == pooled.shape and compare(as_conv, pooled, error_bound(magnitude, 10, "float64")).ok
    try:
        geometry = avg_pool_geometry((3, 3), (2, 2), **kwargs)
    except MergeError as error:
        assert error.reason == "unsupported_layer" and not is_conv and not same
        return
    assert is_conv and same and geometry == ConvGeometry((3, 3), (2, 2), kwargs["padding"], (1, 1))


# --------------------------------------------------------------------------------------------
# One function for every array namespace

def test_same_results_on_every_backend(backend):
    rng = np.random.default_rng(7)
    w3, w1, b3 = rng.standard_normal((4, 2, 3, 3)), rng.standard_normal((4, 2, 1, 1)), rng.standard_normal(4)
    inner, c = rng.standard_normal((4, 4, 1, 1)), rng.standard_normal(4)
    expected_sum = add_branches([w3, w1], [b3, None], [1.0, -0.5], constant=0.25)
    magnitude_sum = add_branches([abs(w3), abs(w1)], [abs(b3), None], [1.0, 0.5], constant=0.25)
    expected_compose = compose_kernels(w3, b3, inner, c, groups=2)
    magnitude_compose = compose_kernels(abs(w3), abs(b3), abs(inner), abs(c), groups=2)
    got_sum = add_branches([backend(w3), backend(w1)], [backend(b3), None], [1.0, -0.5], constant=0.25)
    got_compose = compose_kernels(backend(w3), backend(b3), backend(inner), backend(c), groups=2)
    checks = [*zip(got_sum, expected_sum, magnitude_sum, strict=True),
              *zip(got_compose, expected_compose, magnitude_compose, strict=True)]
    for got, expected, magnitude in checks:
        got = np.asarray(got.cpu()) if hasattr(got, "cpu") else np.asarray(got)
        _within(got, expected, magnitude, 2 * 9 + 2)
    # Placing values (no arithmetic) is exact on every backend.
    exact = [(regroup_kernel(backend(w3), 2, 1), regroup_kernel(w3, 2, 1)),
             (identity_kernel(4, 2, groups=2, like=backend(w3)), identity_kernel(4, 2, groups=2, like=w3)),
             (avg_pool_kernel(4, (3, 3), groups=4, like=backend(w3)), avg_pool_kernel(4, (3, 3), groups=4, like=w3))]
    for got, expected in exact:
        got = np.asarray(got.cpu()) if hasattr(got, "cpu") else np.asarray(got)
        assert np.array_equal(got, expected)
    with pytest.raises(MergeError):
        check_padding_shift(backend(w3), backend(np.ones(4)), ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1)), groups=2)

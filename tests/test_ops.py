"""The float64 reference ops against independent oracles.

Three kinds of oracle: tiny hand-computed cases on integer data (compared exactly: every
partial sum is a small integer, so float64 is exact), ``scipy.signal.correlate`` on unpadded
cases, and torch's own float64 ops over a broad, hypothesis-drawn set of layer configurations.
Float comparisons use the error model: the bound scales with the op run on absolute values.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.signal
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl import avg_pool, batch_norm, conv, conv_transpose, linear
from refimpl.tolerance import assert_within, error_bound

torch = pytest.importorskip("torch")
F = torch.nn.functional

SETTINGS = settings(max_examples=60, deadline=None)


def _t(a: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def _conv_bound(x, w, b, n, **kwargs):
    """Float64 bound for a conv-like op: the op on |x|, |w|, |b| is the magnitude sum |w_i x_i| (+ |b|)."""
    magnitude = conv(np.abs(x), np.abs(w), None if b is None else np.abs(b), **kwargs)
    return error_bound(magnitude, n, "float64")


def _torch_conv_module(dims, x, w, b, stride, padding, dilation, groups, padding_mode):
    module = getattr(torch.nn, f"Conv{dims}d")(
        x.shape[1], w.shape[0], w.shape[2:], stride=stride, padding=padding, dilation=dilation, groups=groups,
        bias=b is not None, padding_mode=padding_mode).double()
    with torch.no_grad(), warnings.catch_warnings():
        # torch warns that it pads an even 'same' kernel by copying: a note on its speed, not on its result.
        warnings.filterwarnings("ignore", message="Using padding='same'", category=UserWarning)
        module.weight.copy_(_t(w))
        if b is not None:
            module.bias.copy_(_t(b))
        return module(_t(x)).numpy()


@st.composite
def conv_configs(draw):
    dims = draw(st.integers(1, 3))
    depthwise = draw(st.booleans())
    groups = draw(st.integers(1, 4))
    group_in = 1 if depthwise else draw(st.integers(1, 3))
    group_out = draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if kind == "same":
        stride = (1,) * dims
        totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        pads = [(t // 2, t - t // 2) for t in totals]
        padding = "same"
    else:
        stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
        if kind == "valid":
            per_dim = (0,) * dims
            padding = "valid"
        elif kind == "int":
            padding = draw(st.integers(0, 2))
            per_dim = (padding,) * dims
        else:
            per_dim = padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
        pads = [(p, p) for p in per_dim]
    sizes = []
    for (lo, hi), k, d in zip(pads, kernel, dilation, strict=True):
        smallest = max(1, d * (k - 1) + 1 - lo - hi)
        if padding_mode == "reflect":
            smallest = max(smallest, max(lo, hi) + 1)
        if padding_mode == "circular":
            smallest = max(smallest, max(lo, hi))
        sizes.append(smallest + draw(st.integers(0, 6 if dims < 3 else 2)))
    batch = draw(st.integers(1, 2))
    has_bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    return dict(dims=dims, groups=groups, group_in=group_in, group_out=group_out, kernel=kernel, stride=stride,
                dilation=dilation, padding=padding, padding_mode=padding_mode, sizes=tuple(sizes), batch=batch,
                has_bias=has_bias, seed=seed)


class TestConv:
    def test_1d_by_hand(self):
        assert conv([[[1, 2, 3, 4]]], [[[1, 0, -1]]]).tolist() == [[[-2.0, -2.0]]]
        # Stride 2, dilation 2, bias: windows {x0, x2} and {x2, x4}.
        y = conv([[[1, 2, 3, 4, 5, 6]]], [[[10, 1]]], [100], stride=2, dilation=2)
        assert y.tolist() == [[[100 + 10 + 3, 100 + 30 + 5]]]

    def test_grouped_2d_by_hand(self):
        x = np.stack([np.arange(9.0).reshape(3, 3), np.full((3, 3), 2.0)])[None]
        w = np.array([[[[1, 0], [0, -1]]], [[[1, 1], [1, 1]]]], dtype=float)
        # Group 0 differences along the diagonal: x[i, j] - x[i+1, j+1] = -4; group 1 sums four 2s.
        y = conv(x, w, groups=2)
        assert y.shape == (1, 2, 2, 2)
        assert (y[0, 0] == -4).all() and (y[0, 1] == 8).all()

    @pytest.mark.parametrize("padding_mode, expected", [
        ("zeros", [210, 321, 32]),       # padded [0, 1, 2, 3, 0]
        ("reflect", [212, 321, 232]),    # padded [2, 1, 2, 3, 2]
        ("replicate", [211, 321, 332]),  # padded [1, 1, 2, 3, 3]
        ("circular", [213, 321, 132]),   # padded [3, 1, 2, 3, 1]
    ])
    def test_padding_modes_by_hand(self, padding_mode, expected):
        # Kernel digits 1, 10, 100 make every padded value visible in the result.
        y = conv([[[1, 2, 3]]], [[[1, 10, 100]]], padding=1, padding_mode=padding_mode)
        assert y.tolist() == [[expected]]

    def test_same_padding_puts_the_odd_unit_on_the_right(self):
        # Kernel 4: total padding 3 = 1 left + 2 right, padded [0, 1, 2, 3, 0, 0].
        y = conv([[[1, 2, 3]]], [[[1, 10, 100, 1000]]], padding="same")
        assert y.tolist() == [[[3210, 321, 32]]]

    def test_unbatched_input(self):
        rng = np.random.default_rng(1)
        x, w = rng.standard_normal((3, 5, 6)), rng.standard_normal((4, 3, 2, 2))
        assert np.array_equal(conv(x, w, padding=1), conv(x[None], w, padding=1)[0])

    @pytest.mark.parametrize("dims", [1, 2, 3])
    def test_against_scipy_correlate(self, dims):
        rng = np.random.default_rng(dims)
        x = rng.standard_normal((2, 3) + (6,) * dims)
        w = rng.standard_normal((4, 3) + (3, 2, 2)[:dims])
        expected = np.array([[sum(scipy.signal.correlate(x[n, c], w[o, c], mode="valid", method="direct")
                                  for c in range(3)) for o in range(4)] for n in range(2)])
        assert_within(conv(x, w), expected, _conv_bound(x, w, None, 3 * w[0, 0].size))

    @pytest.mark.parametrize("shape, kernel, stride, padding, groups", [
        ((2, 8, 9, 9), (1, 1), 1, 0, 1),   # 1x1 fast path
        ((2, 8, 9, 9), (1, 1), 2, 1, 2),   # strided 1x1 on a padded input
        ((2, 6, 9, 9), (3, 3), 1, 1, 6),   # depthwise
        ((2, 6, 9, 9), (3, 3), 2, 1, 6),   # depthwise, channel multiplier below
        ((1, 4, 11, 13), (5, 3), (2, 3), (2, 1), 2),
        # Large enough feature maps for the per-sample products (small ones merge the batch).
        ((2, 4, 34, 34), (3, 3), 1, 1, 2),
        ((2, 4, 34, 34), (1, 1), 1, 0, 2),
    ])
    def test_against_torch_fixed(self, shape, kernel, stride, padding, groups):
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape)
        w = rng.standard_normal((groups * 2, shape[1] // groups) + kernel)
        b = rng.standard_normal(groups * 2)
        expected = F.conv2d(_t(x), _t(w), _t(b), stride, padding, 1, groups).numpy()
        bound = _conv_bound(x, w, b, w[0].size + 1, stride=stride, padding=padding, groups=groups)
        assert_within(conv(x, w, b, stride, padding, 1, groups), expected, bound)

    @SETTINGS
    @given(conv_configs())
    def test_against_torch(self, config):
        rng = np.random.default_rng(config["seed"])
        groups, dims = config["groups"], config["dims"]
        x = rng.standard_normal((config["batch"], groups * config["group_in"]) + config["sizes"])
        w = rng.standard_normal((groups * config["group_out"], config["group_in"]) + config["kernel"])
        b = rng.standard_normal(w.shape[0]) if config["has_bias"] else None
        kwargs = {key: config[key] for key in ("stride", "padding", "dilation", "groups", "padding_mode")}
        expected = _torch_conv_module(dims, x, w, b, **kwargs)
        actual = conv(x, w, b, **kwargs)
        bound = _conv_bound(x, w, b, w[0].size + 1, **kwargs)
        assert_within(actual, expected, bound, what=f"conv {config}")

    @pytest.mark.parametrize("x_shape, w_shape, kwargs, message", [
        ((1, 2, 5), (2, 2), {}, "weight must have 3, 4 or 5 dims"),
        ((1, 2, 5, 5), (2, 2, 3), {}, "input must have 3 dims"),
        ((1, 4, 5), (3, 2, 3), {"groups": 2}, "not divisible by groups"),
        ((1, 3, 5), (2, 2, 3), {}, "input has 3 channels but weight expects"),
        ((1, 2, 5), (2, 2, 3), {"groups": 0}, "groups must be positive"),
        ((1, 2, 5), (2, 2, 3), {"bias": np.zeros(3)}, r"bias.shape=\(3,\) must be \(2,\)"),
        ((1, 2, 5), (2, 2, 3), {"stride": 0}, "stride and dilation must be positive"),
        ((1, 2, 5), (2, 2, 3), {"dilation": (0,)}, "stride and dilation must be positive"),
        ((1, 2, 5, 5), (2, 2, 3, 3), {"stride": (1, 1, 1)}, "must be an int or have 2 entries"),
        ((1, 2, 5), (2, 2, 3), {"padding_mode": "mirror"}, "padding_mode must be one of"),
        ((1, 2, 5), (2, 2, 3), {"padding": "same", "stride": 2}, "'same' requires stride 1"),
        ((1, 2, 5), (2, 2, 3), {"padding": "full"}, "must be 'same' or 'valid'"),
        ((1, 2, 5), (2, 2, 3), {"padding": -1}, "padding must be non-negative"),
        ((1, 2, 3), (2, 2, 3), {"padding": 3, "padding_mode": "reflect"}, "reflect padding must be smaller"),
        ((1, 2, 3), (2, 2, 3), {"padding": 4, "padding_mode": "circular"}, "circular padding must not exceed"),
        ((1, 2, 3), (2, 2, 5), {}, "output would be empty"),
        ((1, 2, 3), (2, 2, 0), {}, "kernel size must be positive"),
    ])
    def test_value_errors(self, x_shape, w_shape, kwargs, message):
        with pytest.raises(ValueError, match=message) as info:
            conv(np.zeros(x_shape), np.zeros(w_shape), **kwargs)
        # Every message echoes the shapes involved.
        assert f"input.shape={x_shape}" in str(info.value) and f"weight.shape={w_shape}" in str(info.value)

    def test_type_errors(self):
        with pytest.raises(TypeError, match="stride=1.5"):
            conv(np.zeros((1, 1, 4)), np.zeros((1, 1, 2)), stride=1.5)
        with pytest.raises(TypeError, match="groups must be an int"):
            conv(np.zeros((1, 1, 4)), np.zeros((1, 1, 2)), groups="1")


@st.composite
def conv_transpose_configs(draw):
    dims = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    group_in, group_out = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation, strict=True))
    sizes = []
    for k, s, d, p, op in zip(kernel, stride, dilation, padding, output_padding, strict=True):
        # Smallest input whose output (n-1)s + d(k-1) + 1 + op - 2p is at least 1.
        smallest = 1 + math.ceil(max(0, 2 * p - d * (k - 1) - op) / s)
        sizes.append(smallest + draw(st.integers(0, 4 if dims < 3 else 2)))
    return dict(dims=dims, groups=groups, group_in=group_in, group_out=group_out, kernel=kernel, stride=stride,
                dilation=dilation, padding=padding, output_padding=output_padding, sizes=tuple(sizes),
                batch=draw(st.integers(1, 2)), has_bias=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


class TestConvTranspose:
    def test_stride_2_by_hand(self):
        # Each input scatters the kernel [1, 10, 100] at 2*i: [1, 10, 100] + [0, 0, 2, 20, 200].
        assert conv_transpose([[[1, 2]]], [[[1, 10, 100]]], stride=2).tolist() == [[[1, 10, 102, 20, 200]]]
        assert conv_transpose([[[1, 2]]], [[[1, 10, 100]]], stride=2, padding=1).tolist() == [[[10, 102, 20]]]
        # output_padding extends the end; nothing scatters there, so it holds only the bias.
        y = conv_transpose([[[1, 2]]], [[[1, 10, 100]]], [5], stride=2, output_padding=1)
        assert y.tolist() == [[[6, 15, 107, 25, 205, 5]]]

    def test_grouped_by_hand(self):
        # Weight layout [in, out/groups, k]: input channel 0 feeds output 0 only, channel 1 output 1 only.
        y = conv_transpose([[[1, 2], [3, 4]]], [[[1, 10]], [[100, 1000]]], groups=2)
        assert y.tolist() == [[[1, 12, 20], [300, 3400, 4000]]]

    def test_dilation_by_hand(self):
        # Kernel taps land at i + 2k: [1, 0, 10] + [0, 2, 0, 20].
        assert conv_transpose([[[1, 2]]], [[[1, 10]]], dilation=2).tolist() == [[[1, 2, 10, 20]]]

    @SETTINGS
    @given(conv_transpose_configs())
    def test_against_torch(self, config):
        rng = np.random.default_rng(config["seed"])
        groups, dims = config["groups"], config["dims"]
        x = rng.standard_normal((config["batch"], groups * config["group_in"]) + config["sizes"])
        w = rng.standard_normal((groups * config["group_in"], config["group_out"]) + config["kernel"])
        b = rng.standard_normal(groups * config["group_out"]) if config["has_bias"] else None
        args = (config["stride"], config["padding"], config["output_padding"], groups, config["dilation"])
        expected = getattr(F, f"conv_transpose{dims}d")(_t(x), _t(w), None if b is None else _t(b), *args).numpy()
        actual = conv_transpose(x, w, b, *args)
        magnitude = conv_transpose(np.abs(x), np.abs(w), None if b is None else np.abs(b), *args)
        bound = error_bound(magnitude, config["group_in"] * math.prod(config["kernel"]) + 1, "float64")
        assert_within(actual, expected, bound, what=f"conv_transpose {config}")

    @pytest.mark.parametrize("x_shape, w_shape, kwargs, message", [
        ((1, 2, 5), (2, 2), {}, "weight must have 3, 4 or 5 dims"),
        ((1, 3, 5), (2, 2, 3), {}, r"input has 3 channels but weight.shape\[0\]=2"),
        ((1, 3, 5), (3, 2, 3), {"groups": 2}, "not divisible by groups"),
        ((1, 2, 5), (2, 2, 3), {"groups": 2, "bias": np.zeros(2)}, r"bias.shape=\(2,\) must be \(4,\)"),
        ((1, 2, 5), (2, 2, 3), {"stride": 0}, "stride and dilation must be positive"),
        ((1, 2, 5), (2, 2, 3), {"padding": -1}, "must be non-negative"),
        ((1, 2, 5), (2, 2, 3), {"stride": 2, "output_padding": 2}, "output_padding must be smaller"),
        ((1, 2, 5), (2, 2, 3), {"output_padding": 1}, "output_padding must be smaller"),
        ((1, 2, 1), (2, 2, 1), {"padding": 1}, "output would be empty"),
    ])
    def test_value_errors(self, x_shape, w_shape, kwargs, message):
        with pytest.raises(ValueError, match=message) as info:
            conv_transpose(np.zeros(x_shape), np.zeros(w_shape), **kwargs)
        assert f"input.shape={x_shape}" in str(info.value) and f"weight.shape={w_shape}" in str(info.value)

    def test_output_padding_allowed_below_dilation(self):
        # torch's rule: output_padding must be below the stride OR the dilation, not both.
        y = conv_transpose(np.ones((1, 1, 3)), np.ones((1, 1, 2)), stride=1, dilation=2, output_padding=1)
        assert y.tolist() == [[[1, 1, 2, 1, 1, 0]]]


class TestBatchNorm:
    def test_by_hand(self):
        y = batch_norm([[1.0, 7.0]], running_mean=[1.0, 3.0], running_var=[1.0, 4.0], weight=[5.0, 2.0],
                       bias=[0.5, 1.0], eps=0.0)
        assert y.tolist() == [[0.5, 5.0]]
        # affine=False: only normalised; var + eps = 4 gives an exact square root.
        assert batch_norm([[[3.0, 5.0]]], running_mean=[1.0], running_var=[3.0], eps=1.0).tolist() == [[[1.0, 2.0]]]

    @pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5), (2, 3, 4, 5), (1, 3, 2, 3, 4)])
    @pytest.mark.parametrize("affine", [True, False])
    def test_against_torch(self, shape, affine):
        rng = np.random.default_rng(len(shape))
        x = rng.standard_normal(shape)
        mean, var = rng.standard_normal(3), rng.uniform(0.1, 3.0, 3)
        weight, bias = (rng.standard_normal(3), rng.standard_normal(3)) if affine else (None, None)
        eps = 1e-3
        def opt(a):
            return None if a is None else _t(a)

        expected = F.batch_norm(_t(x), _t(mean), _t(var), opt(weight), opt(bias), training=False, eps=eps).numpy()
        actual = batch_norm(x, mean, var, weight, bias, eps=eps)
        # Magnitude of the scale-and-shift chain; n = 4 operations in sequence (sub, sqrt, div, mul) + add.
        def channel(v):
            return np.reshape(v, (1, 3) + (1,) * (x.ndim - 2))

        scale = np.abs(weight if affine else 1.0) / np.sqrt(var + eps)
        magnitude = (np.abs(x) + channel(np.abs(mean))) * channel(scale) + (channel(np.abs(bias)) if affine else 0.0)
        assert_within(actual, expected, error_bound(magnitude, 5, "float64"))

    @pytest.mark.parametrize("kwargs, message", [
        ({"input": np.zeros(3)}, r"at least 2 dims .* input.shape=\(3,\)"),
        ({"running_mean": np.zeros(2)}, r"running_mean.shape=\(2,\) must be \(3,\) to match input.shape=\(2, 3\)"),
        ({"running_var": np.ones((3, 1))}, r"running_var.shape=\(3, 1\) must be \(3,\)"),
        ({"weight": np.ones(4)}, r"weight.shape=\(4,\)"),
        ({"bias": np.ones(1)}, r"bias.shape=\(1,\)"),
        ({"running_var": np.array([1.0, -1.0, 1.0]), "eps": 0.5}, "channel 1 has running_var=-1.0, eps=0.5"),
        ({"running_var": np.array([1.0, 1.0, 0.0]), "eps": 0.0}, "channel 2 has running_var=0.0"),
        ({"running_mean": None}, "running_mean and running_var are required"),
    ])
    def test_value_errors(self, kwargs, message):
        args = {"input": np.zeros((2, 3)), "running_mean": np.zeros(3), "running_var": np.ones(3), **kwargs}
        with pytest.raises(ValueError, match=message):
            batch_norm(**args)


class TestLinear:
    def test_by_hand(self):
        assert linear([[1, 2]], [[1, 0], [3, -1]], [10, 20]).tolist() == [[11, 21]]
        assert linear([1, 2], [[1, 0], [3, -1]]).tolist() == [1, 1]

    @pytest.mark.parametrize("leading", [(), (3,), (2, 3)])
    @pytest.mark.parametrize("with_bias", [True, False])
    def test_against_torch(self, leading, with_bias):
        rng = np.random.default_rng(len(leading))
        x, w = rng.standard_normal(leading + (7,)), rng.standard_normal((5, 7))
        b = rng.standard_normal(5) if with_bias else None
        expected = F.linear(_t(x), _t(w), None if b is None else _t(b)).numpy()
        magnitude = linear(np.abs(x), np.abs(w), None if b is None else np.abs(b))
        assert_within(linear(x, w, b), expected, error_bound(magnitude, 7 + 1, "float64"))

    @pytest.mark.parametrize("x_shape, w_shape, b_shape, message", [
        ((2, 3), (3,), None, "weight must be 2-d"),
        ((2, 4), (5, 3), None, "last dim of input must equal weight.shape"),
        ((2, 3), (5, 3), (4,), r"bias.shape=\(4,\) must be \(5,\)"),
    ])
    def test_value_errors(self, x_shape, w_shape, b_shape, message):
        b = None if b_shape is None else np.zeros(b_shape)
        with pytest.raises(ValueError, match=message) as info:
            linear(np.zeros(x_shape), np.zeros(w_shape), b)
        assert f"input.shape={x_shape}" in str(info.value) and f"weight.shape={w_shape}" in str(info.value)


class TestAvgPool:
    @pytest.mark.parametrize("dims", [1, 2, 3])
    @pytest.mark.parametrize("ceil_mode", [False, True])
    @pytest.mark.parametrize("count_include_pad", [False, True])
    def test_against_torch(self, dims, ceil_mode, count_include_pad):
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
        rng = np.random.default_rng(dims)
        for kernel, stride, padding, divisor in [(3, 2, 1, None), (2, 1, 1, None), ((3,) * dims, None, 0, None),
                                                 (3, 2, 1, 5 if dims > 1 else None)]:
            x = rng.standard_normal((2, 3) + (7,) * dims)
            extra = {} if divisor is None else {"divisor_override": divisor}
            expected = pool(_t(x), kernel, stride, padding, ceil_mode, count_include_pad, **extra).numpy()
            actual = avg_pool(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor)
            assert actual.shape == expected.shape
            # A window's sum, then one division: taps + 1 roundings of at most |x| each.
            taps = math.prod(kernel) if isinstance(kernel, tuple) else kernel**dims
            magnitude = avg_pool(np.abs(x), kernel, stride, padding, ceil_mode, count_include_pad, divisor)
            assert_within(actual, expected, error_bound(magnitude, taps + 1, "float64"))

    def test_by_hand(self):
        x = [[[3.0, 6.0, 9.0, 12.0]]]
        assert avg_pool(x, 3, 1, 1).tolist() == [[[3.0, 6.0, 9.0, 7.0]]]  # (0 + 3 + 6) / 3 at the left border
        assert avg_pool(x, 3, 1, 1, count_include_pad=False).tolist() == [[[4.5, 6.0, 9.0, 10.5]]]
        assert avg_pool(x, 2, 3, 0, ceil_mode=True).tolist() == [[[4.5, 12.0]]]  # the last window holds one value
        assert avg_pool(x, 2, 2, divisor_override=1).tolist() == [[[9.0, 21.0]]]

    @pytest.mark.parametrize("kwargs, message", [
        ({"kernel_size": 3, "padding": 2}, "padding at most half the kernel"),
        ({"kernel_size": (3, 3)}, "one spatial dim per kernel entry"),
        ({"kernel_size": 9}, "larger than the padded input"),
    ])
    def test_value_errors(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            avg_pool(np.zeros((1, 1, 4)), **kwargs)

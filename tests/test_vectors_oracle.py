"""Every foldable conformance vector against oracles that share no code with its generator.

The generator computes the expected values with refimpl (its fold functions in float64, its
rounding and bit encoding, its reference ops). Here they are recomputed independently:

- the fold in 60-digit decimal arithmetic from the formulas of ``spec/folding.md`` (every float64
  input converts to ``Decimal`` exactly; ``Decimal.sqrt`` is correctly rounded), so the float64
  expected values are checked against the real-number fold within the float64 error model;
- the float16/bfloat16 expected values and bits by rounding that 60-digit value to nearest-even
  by hand, in exact rational arithmetic, and packing sign, exponent and mantissa fields;
- the probe outputs with torch's own float64 ops (``torch.nn.functional``), not refimpl's.
"""

from __future__ import annotations

import copy
import math
from decimal import Decimal, localcontext
from fractions import Fraction

import numpy as np
import pytest

from refimpl import conv as refimpl_conv
from refimpl import error_bound
from refimpl import linear as refimpl_linear
from refimpl.conformance import VECTORS_DIR, load_vectors

torch = pytest.importorskip("torch")
F = torch.nn.functional

DIGITS = 60
VECTORS = load_vectors(VECTORS_DIR)
FOLDABLE = sorted(name for name, v in VECTORS.items() if v["expected"]["verdict"] == "foldable")
WITH_PROBE = [name for name in FOLDABLE if "probe" in VECTORS[name]]
LOW_PRECISION = [name for name in FOLDABLE if VECTORS[name]["storage_dtype"] in ("float16", "bfloat16")]

# (precision including the implicit bit, smallest normal exponent, largest exponent, exponent bits)
FORMATS = {"float16": (11, -14, 15, 5), "bfloat16": (8, -126, 127, 8)}


def test_the_oracles_cover_every_foldable_vector():
    assert len(FOLDABLE) == 25 and len(WITH_PROBE) == 21 and len(LOW_PRECISION) == 4


# ---------------------------------------------------------------------------------------------
# The fold in 60-digit decimal arithmetic

def _decimals(tensor: dict | None) -> np.ndarray | None:
    if tensor is None:
        return None
    values = np.empty(len(tensor["data"]), dtype=object)
    values[:] = [Decimal(v) for v in tensor["data"]]  # exact: every float64 is a finite decimal
    return values.reshape(tensor["shape"])


def exact_fold(vector: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(weight, bias, |weight| magnitude, |bias| magnitude) of the real-number fold, to 60 digits."""
    layer, fold, inputs = vector["layer"], vector["fold"], vector["inputs"]
    bn = inputs["bn"]
    weight = _decimals(inputs["weight"])
    mean, var = _decimals(bn["running_mean"]), _decimals(bn["running_var"])
    channels = len(mean)
    gamma = _decimals(bn["weight"]) if bn["weight"] is not None else np.array([Decimal(1)] * channels, dtype=object)
    beta = _decimals(bn["bias"]) if bn["bias"] is not None else np.array([Decimal(0)] * channels, dtype=object)
    eps = Decimal(bn["eps"])
    with localcontext() as ctx:
        ctx.prec = DIGITS
        s = np.array([g / (v + eps).sqrt() for g, v in zip(gamma, var, strict=True)], dtype=object)
        t = beta - mean * s
        t_magnitude = np.abs(beta) + np.abs(mean) * np.abs(s)
        groups = layer.get("groups", 1)
        out_features = weight.shape[1] * groups if layer.get("transposed") else weight.shape[0]
        layer_bias = (_decimals(inputs["bias"]) if inputs["bias"] is not None
                      else np.array([Decimal(0)] * out_features, dtype=object))
        spatial = (1,) * (weight.ndim - 2)
        if fold in ("conv_bn", "linear_bn"):
            # The norm scales the layer's output channel of each weight entry, then shifts.
            if layer.get("transposed"):  # weight [in, out/groups, *k]: entry (i, j) feeds channel g(i)*out/g + j
                per_group_in, per_group_out = weight.shape[0] // groups, weight.shape[1]
                channel = np.array([[i // per_group_in * per_group_out + j for j in range(per_group_out)]
                                    for i in range(weight.shape[0])])
                scale = s[channel].reshape(channel.shape + spatial)
            else:
                scale = s.reshape((-1,) + (1,) * (weight.ndim - 1))
            folded_weight = weight * scale
            folded_bias = layer_bias * s + t
            bias_magnitude = np.abs(layer_bias) * np.abs(s) + t_magnitude
            return folded_weight, folded_bias, np.abs(folded_weight), bias_magnitude
        # BN before the layer: it scales the layer's input channel of each weight entry, and its
        # shift reaches every output through the weights: b' = b + sum W t.
        per_group_out, per_group_in = weight.shape[0] // groups, weight.shape[1]
        channel = np.array([[o // per_group_out * per_group_in + c for c in range(per_group_in)]
                            for o in range(weight.shape[0])])
        folded_weight = weight * s[channel].reshape(channel.shape + spatial)
        shift = t[channel].reshape(channel.shape + spatial)
        shift_magnitude = t_magnitude[channel].reshape(channel.shape + spatial)
        axes = tuple(range(1, weight.ndim))
        folded_bias = layer_bias + (weight * shift).sum(axis=axes)
        bias_magnitude = np.abs(layer_bias) + (np.abs(weight) * shift_magnitude).sum(axis=axes)
        return folded_weight, folded_bias, np.abs(folded_weight), bias_magnitude


def _roundings(vector: dict) -> tuple[int, int]:
    """``n`` of the weight and the bias, as spec/conformance.md states them."""
    if vector["fold"] in ("conv_bn", "linear_bn"):
        return 4, 7
    return 4, math.prod(vector["inputs"]["weight"]["shape"][1:]) + 7


def float64_violations(vector: dict) -> list[str]:
    """Elements of the float64 expected weight and bias farther from the real fold than the error model allows."""
    weight, bias, weight_magnitude, bias_magnitude = exact_fold(vector)
    n_weight, n_bias = _roundings(vector)
    violations = []
    for what, exact, magnitude, n in (("weight", weight, weight_magnitude, n_weight),
                                      ("bias", bias, bias_magnitude, n_bias)):
        assert list(exact.shape) == vector["expected"][what]["shape"], what
        stored = [Decimal(v) for v in vector["expected"][what]["data"]]
        error = np.array([float(abs(a - b)) for a, b in zip(stored, exact.ravel(), strict=True)])
        bound = error_bound(np.array([float(m) for m in magnitude.ravel()]), n, "float64")
        violations += [f"{what}[{i}]: stored {stored[i]}, real fold {exact.ravel()[i]}, error {error[i]:.3g} > "
                       f"bound {bound[i]:.3g}" for i in np.flatnonzero(error > bound)]
    return violations


@pytest.mark.parametrize("name", FOLDABLE)
def test_float64_expected_values_are_the_real_fold(name):
    assert float64_violations(VECTORS[name]) == []


# ---------------------------------------------------------------------------------------------
# Correct rounding to float16 / bfloat16, by hand

def round_by_hand(value: Decimal, dtype: str) -> tuple[Fraction, int]:
    """The nearest ``dtype`` value (ties to even) to ``value`` and its 16 bits."""
    precision, emin, emax, exponent_bits = FORMATS[dtype]
    sign = 1 if value < 0 else 0
    magnitude = abs(Fraction(value))  # exact: a Decimal is a rational
    if magnitude == 0:
        return Fraction(0), sign << 15
    exponent = magnitude.numerator.bit_length() - magnitude.denominator.bit_length()
    if Fraction(2) ** exponent > magnitude:
        exponent -= 1
    assert Fraction(2) ** exponent <= magnitude < Fraction(2) ** (exponent + 1)
    exponent = max(exponent, emin)
    quantum = Fraction(2) ** (exponent - precision + 1)
    scaled = magnitude / quantum
    whole = math.floor(scaled)
    remainder = scaled - whole
    # The 60-digit value stands for the real fold: it must not be so close to a tie that its
    # last digits could decide the rounding (the generator keeps every value far from ties).
    assert abs(remainder - Fraction(1, 2)) * quantum > magnitude * Fraction(10) ** -(DIGITS - 10), value
    mantissa = whole + (1 if remainder > Fraction(1, 2) else 0)
    if mantissa == 2 ** precision:  # rounded up into the next binade
        mantissa, exponent = 2 ** (precision - 1), exponent + 1
    assert exponent <= emax, f"{value} overflows {dtype}"
    rounded = mantissa * Fraction(2) ** (exponent - precision + 1)
    if mantissa < 2 ** (precision - 1):  # subnormal (only at the smallest exponent)
        exponent_field, fraction_field = 0, mantissa
    else:
        exponent_field = exponent + 2 ** (exponent_bits - 1) - 1
        fraction_field = mantissa - 2 ** (precision - 1)
    bits = sign << 15 | exponent_field << (precision - 1) | fraction_field
    return (-rounded if sign else rounded), bits


def test_rounding_by_hand_on_known_values():
    # float16: 1 + 2^-11 is a tie (to even: 1.0), 65504 its largest value, 2^-24 its smallest subnormal.
    assert round_by_hand(Decimal(1) + Decimal(2) ** -11 + Decimal(2) ** -40, "float16") == (1 + Fraction(1, 1024),
                                                                                            0x3C01)
    assert round_by_hand(Decimal(-65504), "float16") == (Fraction(-65504), 0xFBFF)
    assert round_by_hand(Decimal(2) ** -24, "float16") == (Fraction(1, 2**24), 0x0001)
    assert round_by_hand(Decimal("0.1"), "bfloat16")[1] == 0x3DCD  # 0.1 = 0x3DCCCCCD in float32, rounded up
    with pytest.raises(AssertionError):
        round_by_hand(Decimal(1) + Decimal(2) ** -11, "float16")  # an exact tie is refused, not guessed


def bits_by_hand(vector: dict, what: str) -> tuple[list[str], list[float]]:
    """The correctly rounded ``what`` ("weight" or "bias") of a float16/bfloat16 vector: bits and values."""
    exact = exact_fold(vector)[0 if what == "weight" else 1]
    by_hand = [round_by_hand(v, vector["storage_dtype"]) for v in exact.ravel()]
    return [f"0x{bits:04x}" for _, bits in by_hand], [float(value) for value, _ in by_hand]


@pytest.mark.parametrize("name", LOW_PRECISION)
def test_low_precision_expected_bits_are_the_correctly_rounded_real_fold(name):
    vector = VECTORS[name]
    for what in ("weight", "bias"):
        expected = vector["expected"][f"{what}_rounded"]
        assert expected["dtype"] == vector["storage_dtype"]
        assert (expected["bits"], expected["data"]) == bits_by_hand(vector, what), what


# ---------------------------------------------------------------------------------------------
# The probe output with torch's float64 ops

def _torch_layer(layer: dict, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if layer["type"] == "linear":
        return F.linear(x, weight, bias)
    dims = layer["dims"]
    if layer["transposed"]:
        transposed = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        return transposed(x, weight, bias, stride=layer["stride"], padding=layer["padding"],
                          output_padding=layer["output_padding"], groups=layer["groups"],
                          dilation=layer["dilation"])
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    if layer["padding_mode"] != "zeros":  # nn.ConvNd pads in its mode first, then convolves unpadded
        pad = [p for p in reversed(layer["padding"]) for _ in range(2)]
        x = F.pad(x, pad, mode=layer["padding_mode"])
        return conv(x, weight, bias, stride=layer["stride"], dilation=layer["dilation"], groups=layer["groups"])
    return conv(x, weight, bias, stride=layer["stride"], padding=layer["padding"], dilation=layer["dilation"],
                groups=layer["groups"])


def _tensor(entry: dict | None) -> torch.Tensor | None:
    if entry is None:
        return None
    return torch.tensor(entry["data"], dtype=torch.float64).reshape(entry["shape"])


def probe_error_ratio(vector: dict) -> float:
    """Largest |stored probe output - torch's float64 unfused pair| over its error bound."""
    layer, fold, inputs, probe = vector["layer"], vector["fold"], vector["inputs"], vector["probe"]
    bn = {key: _tensor(value) if isinstance(value, dict) else value for key, value in inputs["bn"].items()}
    weight, bias, x = _tensor(inputs["weight"]), _tensor(inputs["bias"]), _tensor(probe["x"])
    gamma = bn["weight"] if bn["weight"] is not None else torch.ones_like(bn["running_mean"])
    beta = bn["bias"] if bn["bias"] is not None else torch.zeros_like(bn["running_mean"])

    def norm(z: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(z, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], training=False,
                            eps=bn["eps"])

    def channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
        return v.reshape((1, -1) + (1,) * (ndim - 2))

    scale = (gamma / torch.sqrt(bn["running_var"] + bn["eps"])).abs()
    if fold in ("conv_bn", "linear_bn"):
        y = norm(_torch_layer(layer, x, weight, bias))
        # |s| (|W| * |x| + |b| + |mu|) + |beta| bounds every term of BN(layer(x)).
        pre = _torch_layer(layer, x.abs(), weight.abs(), None if bias is None else bias.abs())
        magnitude = channel(scale, pre.ndim) * (pre + channel(bn["running_mean"].abs(), pre.ndim)) \
            + channel(beta.abs(), pre.ndim)
    else:
        y = _torch_layer(layer, norm(x), weight, bias)
        normalized = channel(scale, x.ndim) * (x.abs() + channel(bn["running_mean"].abs(), x.ndim)) \
            + channel(beta.abs(), x.ndim)
        magnitude = _torch_layer(layer, normalized, weight.abs(), None if bias is None else bias.abs())
    reduction = math.prod(inputs["weight"]["shape"][1:]) if not layer.get("transposed") else \
        inputs["weight"]["shape"][0] // layer["groups"] * math.prod(layer["kernel_size"])
    # Both float64 runs: the reduction, the bias and the BatchNorm's five operations.
    bound = error_bound(magnitude.numpy(), reduction + 6, "float64")
    stored = np.asarray(probe["y"]["data"]).reshape(probe["y"]["shape"])
    assert list(y.shape) == probe["y"]["shape"]
    return float((np.abs(y.numpy() - stored) / bound).max())


@pytest.mark.parametrize("name", WITH_PROBE)
def test_probe_output_is_torchs_float64_unfused_pair(name):
    assert probe_error_ratio(VECTORS[name]) <= 1


def test_oracles_detect_a_wrong_vector():
    """Each oracle fails a vector with one value changed just beyond what float64 folding can explain."""
    vector = copy.deepcopy(VECTORS["conv2d_bn_float64"])
    vector["expected"]["weight"]["data"][5] *= 1 + 2.0**-44  # 512 float64 units of roundoff
    assert [v.split(":")[0] for v in float64_violations(vector)] == ["weight[5]"]
    vector = copy.deepcopy(VECTORS["bn_conv1d_circular"])
    vector["expected"]["bias"]["data"][1] += 2.0**-40
    assert [v.split(":")[0] for v in float64_violations(vector)] == ["bias[1]"]
    vector = copy.deepcopy(VECTORS["conv2d_bn_float16"])
    bits, _ = bits_by_hand(vector, "bias")
    vector["expected"]["bias_rounded"]["bits"][2] = f"0x{int(bits[2], 16) + 1:04x}"  # one ulp
    assert bits_by_hand(vector, "bias")[0] != vector["expected"]["bias_rounded"]["bits"]
    vector = copy.deepcopy(VECTORS["conv_transpose2d_bn_grouped"])
    vector["probe"]["y"]["data"][7] *= 1 + 2.0**-40
    assert probe_error_ratio(vector) > 1


def test_every_case_geometry_meets_the_probe_oracle():
    layers = [VECTORS[name]["layer"] for name in WITH_PROBE]
    assert any(layer.get("transposed") and layer["groups"] > 1 for layer in layers)
    assert {layer.get("padding_mode") for layer in layers} >= {"zeros", "reflect", "replicate", "circular"}
    assert {layer.get("dims") for layer in layers} >= {1, 2, 3}
    assert any(max(layer.get("dilation", [1])) > 1 for layer in layers)
    assert any(max(layer.get("stride", [1])) > 1 for layer in layers)
    assert {VECTORS[name]["fold"] for name in WITH_PROBE} == {"conv_bn", "linear_bn", "bn_conv", "bn_linear"}


# ---------------------------------------------------------------------------------------------
# Merge vectors: the merged layer by exact arithmetic, the branches by torch's float64 ops
#
# Independent of refimpl.merge: each branch becomes a *dense* kernel (groups spelled out as zero
# blocks) in 60-digit decimals, composed and centred by the formulas of spec/folding.md section 8;
# the probe runs the original branches with torch.nn.functional. Neither uses refimpl's kernel algebra.

MERGES = sorted(name for name, v in VECTORS.items() if v["fold"] == "merge")
MERGEABLE = [name for name in MERGES if VECTORS[name]["expected"]["verdict"] == "mergeable"]
MERGE_REFUSED = [name for name in MERGES if name not in MERGEABLE]
# Roundings any float64 merge of these vectors may make on one element's longest path (the deepest
# is a chain: BN fold 4 + composition over <= 8 mid channels + sum of <= 5 branches + scales).
MERGE_ROUNDINGS = 64


def test_the_oracles_cover_every_merge_vector():
    assert len(MERGEABLE) == 17 and len(MERGE_REFUSED) == 8
    assert sum(VECTORS[name]["storage_dtype"] in FORMATS for name in MERGEABLE) == 2


def _zeros(shape) -> np.ndarray:
    return np.full(shape, Decimal(0), dtype=object)


class Dense:
    """An affine map of the input as one dense convolution in decimals: weight [out, in, *k], bias, geometry."""

    def __init__(self, weight, bias, kernel, stride, padding, dilation, mode="zeros"):
        self.weight, self.bias = weight, bias
        self.kernel, self.stride, self.padding, self.dilation = (tuple(kernel), tuple(stride), tuple(padding),
                                                                 tuple(dilation))
        self.mode = mode

    @property
    def pointwise(self) -> bool:
        return set(self.kernel) <= {1} and set(self.stride) <= {1} and not any(self.padding)

    @classmethod
    def diagonal(cls, values, dims, kernel=None, stride=None, padding=None):
        """Each channel reads its own input channel, with the same value at every tap."""
        kernel = kernel or (1,) * dims
        weight = _zeros((len(values), len(values)) + tuple(kernel))
        for c, v in enumerate(values):
            weight[c, c] = v
        return cls(weight, _zeros(len(values)), kernel, stride or (1,) * dims, padding or (0,) * dims, (1,) * dims)


def _dense_layer(op: dict, absolute: bool) -> Dense:
    layer = op["layer"]
    weight = _decimals(op["weight"])
    bias = _decimals(op["bias"]) if op["bias"] is not None else _zeros(weight.shape[0])
    if absolute:
        weight, bias = np.abs(weight), np.abs(bias)
    if layer["type"] == "linear":
        return Dense(weight, bias, (), (), (), ())
    groups, (out, per_group) = layer["groups"], weight.shape[:2]
    dense = _zeros((out, per_group * groups) + weight.shape[2:])
    for o in range(out):
        g = o // (out // groups)
        dense[o, g * per_group:(g + 1) * per_group] = weight[o]
    return Dense(dense, bias, layer["kernel_size"], layer["stride"], layer["padding"], layer["dilation"],
                 layer["padding_mode"])


def _bn_scale_shift(bn: dict, absolute: bool) -> tuple[np.ndarray, np.ndarray]:
    mean, var = _decimals(bn["running_mean"]), _decimals(bn["running_var"])
    gamma = _decimals(bn["weight"]) if bn["weight"] is not None else np.array([Decimal(1)] * len(mean), dtype=object)
    beta = _decimals(bn["bias"]) if bn["bias"] is not None else _zeros(len(mean))
    s = np.array([g / (v + Decimal(bn["eps"])).sqrt() for g, v in zip(gamma, var, strict=True)], dtype=object)
    if absolute:
        return np.abs(s), np.abs(beta) + np.abs(mean) * np.abs(s)
    return s, beta - mean * s


def _chain(outer: Dense, inner: Dense) -> Dense:
    """outer(inner(x)) when one is pointwise: a sum over the middle channels, the constant through every tap."""
    if inner.pointwise:
        a = inner.weight.reshape(inner.weight.shape[:2])
        weight = np.moveaxis(np.tensordot(np.moveaxis(outer.weight, 1, -1), a, axes=([-1], [0])), -1, 1)
        taps_summed = outer.weight.reshape(outer.weight.shape[:2] + (-1,)).sum(axis=2)
        return Dense(weight, outer.bias + np.dot(taps_summed, inner.bias), outer.kernel, outer.stride,
                     outer.padding, outer.dilation, outer.mode)
    assert outer.pointwise, "a chain of two layers neither of which is pointwise"
    a = outer.weight.reshape(outer.weight.shape[:2])
    weight = np.tensordot(a, inner.weight, axes=([1], [0]))
    return Dense(weight, outer.bias + np.dot(a, inner.bias), inner.kernel, inner.stride, inner.padding,
                 inner.dilation, inner.mode)


def _dense_op(op: dict, current: Dense, absolute: bool) -> Dense:
    kind = op["op"]
    if kind == "batch_norm":
        s, t = _bn_scale_shift(op["bn"], absolute)
        column = s.reshape((-1,) + (1,) * (current.weight.ndim - 1))
        return Dense(current.weight * column, current.bias * s + t, current.kernel, current.stride,
                     current.padding, current.dilation, current.mode)
    if kind == "scale":
        s = _decimals(op["scale"])
        s = np.array(np.abs(s), dtype=object) if absolute else s
        column = s.reshape((-1,) + (1,) * (current.weight.ndim - 1)) if s.ndim else s
        return Dense(current.weight * column, current.bias * s, current.kernel, current.stride, current.padding,
                     current.dilation, current.mode)
    if kind == "avg_pool":
        count = Decimal(math.prod(op["kernel_size"]))
        pool = Dense.diagonal([1 / count] * current.weight.shape[0], len(op["kernel_size"]), op["kernel_size"],
                              op["stride"], op["padding"])
        return _chain(pool, current)
    return _chain(_dense_layer(op, absolute), current)


def exact_merge(vector: dict, absolute: bool = False) -> Dense:
    """The merged layer of a merge vector in 60-digit decimals (``absolute``: every term's absolute value)."""
    inputs = vector["inputs"]
    dims, channels = inputs["dims"], inputs["in_channels"]
    with localcontext() as ctx:
        ctx.prec = DIGITS
        terms = []
        for branch in inputs["branches"]:
            term = Dense.diagonal([Decimal(1)] * channels, dims)
            for op in branch["ops"]:
                term = _dense_op(op, term, absolute)
            coefficient = Decimal(abs(branch["coefficient"]) if absolute else branch["coefficient"])
            terms.append((coefficient, term))
        # Centre every kernel in the largest; the padding each branch implies must agree.
        size = tuple(max(t.kernel[d] for _, t in terms) for d in range(dims))
        weight, bias = _zeros(terms[0][1].weight.shape[:2] + size), _zeros(terms[0][1].weight.shape[0])
        paddings, dilations = set(), set()
        for coefficient, t in terms:
            offsets = [(size[d] - t.kernel[d]) // 2 for d in range(dims)]
            assert all((size[d] - t.kernel[d]) % 2 == 0 for d in range(dims))
            dilation = tuple(t.dilation[d] if t.kernel[d] > 1 else None for d in range(dims))
            dilations.add(dilation)
            region = (slice(None), slice(None)) + tuple(slice(o, o + k) for o, k in zip(offsets, t.kernel,
                                                                                         strict=True))
            weight[region] = weight[region] + coefficient * t.weight
            bias = bias + coefficient * t.bias
        merged_dilation = tuple(next((d[i] for d in dilations if d[i] is not None), 1) for i in range(dims))
        for _, t in terms:
            paddings.add(tuple(t.padding[d] + merged_dilation[d] * (size[d] - t.kernel[d]) // 2 for d in range(dims)))
        assert len(paddings) == 1, paddings
        modes = {t.mode for _, t in terms if any(t.padding)} or {"zeros"}
        assert len(modes) == 1
        strides = {t.stride for _, t in terms}
        assert len(strides) == 1
        merged = Dense(weight, bias, size, strides.pop(), paddings.pop(), merged_dilation, modes.pop())
        for op in inputs["after"]:
            merged = _dense_op(op, merged, absolute)
        return merged


def _grouped_to_dense(vector: dict, stored: np.ndarray) -> np.ndarray:
    layer = vector["expected"]["layer"]
    if layer["type"] == "linear":
        return stored
    groups, (out, per_group) = layer["groups"], stored.shape[:2]
    dense = np.zeros((out, per_group * groups) + stored.shape[2:], dtype=stored.dtype)
    for o in range(out):
        g = o // (out // groups)
        dense[o, g * per_group:(g + 1) * per_group] = stored[o]
    return dense


def _dense_to_grouped(vector: dict, dense: np.ndarray) -> np.ndarray:
    groups = vector["expected"]["layer"].get("groups", 1)
    out, per_group = dense.shape[0], dense.shape[1] // groups
    return np.stack([dense[o, o // (out // groups) * per_group:(o // (out // groups) + 1) * per_group]
                     for o in range(out)])


def merge_violations(vector: dict) -> list[str]:
    """Elements of the float64 expected merged weight and bias off the exact merge beyond the error model, the
    geometry if it differs, and stored magnitudes that do not bound the terms."""
    exact, magnitude = exact_merge(vector), exact_merge(vector, absolute=True)
    layer = vector["expected"]["layer"]
    violations = []
    if layer["type"] == "conv":
        geometry = (tuple(layer["kernel_size"]), tuple(layer["stride"]), tuple(layer["padding"]),
                    tuple(layer["dilation"]), layer["padding_mode"])
        if geometry != (exact.kernel, exact.stride, exact.padding, exact.dilation, exact.mode):
            real = (exact.kernel, exact.stride, exact.padding, exact.dilation, exact.mode)
            return [f"layer {geometry} but the exact merge has {real}"]
    for what, real, terms in (("weight", exact.weight, magnitude.weight), ("bias", exact.bias, magnitude.bias)):
        entry = vector["expected"][what]
        stored = np.asarray(entry["data"], dtype=np.float64).reshape(entry["shape"])
        stored = _grouped_to_dense(vector, stored) if what == "weight" else stored
        if stored.shape != real.shape:
            return violations + [f"{what} has shape {stored.shape}, the exact merge {real.shape}"]
        error = np.array([float(abs(Decimal(a) - b)) for a, b in zip(stored.ravel(), real.ravel(), strict=True)])
        bound = error_bound(np.array([float(m) for m in terms.ravel()]), MERGE_ROUNDINGS, "float64")
        violations += [f"{what}[{i}]: stored {stored.ravel()[i]!r}, exact {real.ravel()[i]}, error {error[i]:.3g} > "
                       f"bound {bound[i]:.3g}" for i in np.flatnonzero(error > bound)]
        if "magnitude" in vector["tolerance"].get(what, {}):
            stored_terms = np.asarray(vector["tolerance"][what]["magnitude"]["data"])
            stored_terms = (_grouped_to_dense(vector, stored_terms.reshape(entry["shape"])) if what == "weight"
                            else stored_terms).ravel()
            violations += [f"{what} magnitude[{i}] {stored_terms[i]!r} < the terms' {terms.ravel()[i]}"
                           for i in range(stored_terms.size) if Decimal(stored_terms[i]) < terms.ravel()[i]]
    return violations


@pytest.mark.parametrize("name", MERGEABLE)
def test_merged_expected_values_are_the_exact_merge(name):
    assert merge_violations(VECTORS[name]) == []


@pytest.mark.parametrize("name", [n for n in MERGEABLE if VECTORS[n]["storage_dtype"] in FORMATS])
def test_merged_low_precision_bits_are_the_correctly_rounded_exact_merge(name):
    vector = VECTORS[name]
    exact = exact_merge(vector)
    for what, real in (("weight", exact.weight), ("bias", exact.bias)):
        expected = vector["expected"][f"{what}_rounded"]
        if what == "weight":  # the dense exact merge, read at the grouped layout's entries
            real = _dense_to_grouped(vector, real)
        by_hand = [round_by_hand(v, vector["storage_dtype"]) for v in real.ravel()]
        assert expected["bits"] == [f"0x{bits:04x}" for _, bits in by_hand], what
        assert expected["data"] == [float(value) for value, _ in by_hand], what


def _torch_op(op: dict, y: torch.Tensor, absolute: bool) -> torch.Tensor:
    kind = op["op"]
    if kind == "layer":
        weight, bias = _tensor(op["weight"]), _tensor(op["bias"])
        if absolute:
            weight, bias = weight.abs(), None if bias is None else bias.abs()
        return _torch_layer(op["layer"], y, weight, bias)
    if kind == "batch_norm":
        bn = {key: _tensor(value) if isinstance(value, dict) else value for key, value in op["bn"].items()}
        mean, gamma, beta = bn["running_mean"], bn["weight"], bn["bias"]
        if absolute:  # (|y| + |mu|) |s| + |beta|
            mean = -mean.abs()
            gamma, beta = None if gamma is None else gamma.abs(), None if beta is None else beta.abs()
        return F.batch_norm(y, mean, bn["running_var"], gamma, beta, training=False, eps=bn["eps"])
    if kind == "avg_pool":
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(op["kernel_size"]) - 1]
        extra = {} if op["divisor_override"] is None else {"divisor_override": op["divisor_override"]}
        return pool(y, op["kernel_size"], op["stride"], op["padding"], False, op["count_include_pad"], **extra)
    scale = _tensor(op["scale"])
    scale = scale.abs() if absolute else scale
    return y * (scale if scale.dim() == 0 else scale.reshape((1, -1) + (1,) * (y.dim() - 2)))


def torch_branches(inputs: dict, x: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """The original expression run with torch's float64 ops: every branch, scaled, summed, then ``after``."""
    total = torch.zeros(())
    for branch in inputs["branches"]:
        y = x
        for op in branch["ops"]:
            y = _torch_op(op, y, absolute)
        total = total + (abs(branch["coefficient"]) if absolute else branch["coefficient"]) * y
    for op in inputs["after"]:
        total = _torch_op(op, total, absolute)
    return total


def _probe_bound(vector: dict, x: torch.Tensor) -> np.ndarray:
    """The float64 error model for two runs of the expression: every reduction on the way plus the merged layer's
    (the largest branch layer's for a refused merge)."""
    inputs = vector["inputs"]
    ops = [op for branch in inputs["branches"] for op in branch["ops"]] + inputs["after"]
    reductions = [math.prod(op["weight"]["shape"][1:]) if op["op"] == "layer" else math.prod(op.get("kernel_size", [1]))
                  for op in ops]
    merged = (math.prod(vector["expected"]["weight"]["shape"][1:]) if "weight" in vector["expected"]
              else max(reductions))
    magnitude = torch_branches(inputs, x.abs(), absolute=True)
    return error_bound(magnitude.numpy(), sum(reductions) + merged + MERGE_ROUNDINGS, "float64")


def merged_probe_ratios(vector: dict) -> tuple[float, float]:
    """(stored probe output, refimpl.conv of the expected merged layer) against torch's run of the branches:
    the largest |difference| over its bound, for each."""
    x = _tensor(vector["probe"]["x"])
    y = torch_branches(vector["inputs"], x)
    bound = _probe_bound(vector, x)
    stored = np.asarray(vector["probe"]["y"]["data"]).reshape(vector["probe"]["y"]["shape"])
    assert stored.shape == tuple(y.shape)
    layer = vector["expected"]["layer"]
    weight, bias = (np.asarray(vector["expected"][w]["data"]).reshape(vector["expected"][w]["shape"])
                    for w in ("weight", "bias"))
    if layer["type"] == "linear":
        merged = refimpl_linear(x.numpy(), weight, bias)
    else:
        merged = refimpl_conv(x.numpy(), weight, bias, stride=layer["stride"], padding=layer["padding"],
                              dilation=layer["dilation"], groups=layer["groups"], padding_mode=layer["padding_mode"])
    if merged.shape != stored.shape:
        return float((np.abs(y.numpy() - stored) / bound).max()), math.inf
    return float((np.abs(y.numpy() - stored) / bound).max()), float((np.abs(y.numpy() - merged) / bound).max())


@pytest.mark.parametrize("name", MERGEABLE)
def test_merge_probe_is_torchs_float64_branches_and_the_merged_layer_reproduces_them(name):
    stored, merged = merged_probe_ratios(VECTORS[name])
    assert stored <= 1 and merged <= 1, (stored, merged)


# Refusals: the premise of each verdict, checked on the branches themselves.

def _branch_outputs(vector: dict, x: torch.Tensor) -> list[torch.Tensor]:
    outputs = []
    for branch in vector["inputs"]["branches"]:
        y = x
        for op in branch["ops"]:
            y = _torch_op(op, y, absolute=False)
        outputs.append(y)
    return outputs


def _layers(vector: dict) -> list[dict]:
    return [op["layer"] for branch in vector["inputs"]["branches"] for op in branch["ops"] if op["op"] == "layer"]


def refusal_premise(vector: dict) -> bool:
    """Whether the branches show what the expected verdict says (torch float64 and the layer entries)."""
    verdict, inputs = vector["expected"]["verdict"], vector["inputs"]
    generator = torch.Generator().manual_seed(0)

    def x_of(size: int) -> torch.Tensor:
        return torch.randn((1, inputs["in_channels"]) + (size,) * inputs["dims"], generator=generator,
                           dtype=torch.float64)

    if verdict in ("not_mergeable: stride_mismatch", "not_mergeable: padding_misaligned"):
        # The branch outputs do not even have the same size at every input size.
        return any(len({tuple(y.shape) for y in _branch_outputs(vector, x_of(size))}) > 1 for size in range(4, 13))
    if verdict == "not_mergeable: dilation_mismatch":
        # No common dilation: neither kernel centres in the other. (A dense kernel with dilation 1 could hold
        # both; refimpl's merge keeps one dilation and refuses.)
        return len({tuple(layer["dilation"]) for layer in _layers(vector) if max(layer["kernel_size"]) > 1}) > 1
    if verdict == "not_mergeable: padding_mode_mismatch":
        # One conv with the summed kernel differs from the branches at the borders, whichever mode it pads with.
        x = x_of(5)
        y = sum(_branch_outputs(vector, x))
        layers = [op for branch in inputs["branches"] for op in branch["ops"]]
        weight = sum(_tensor(op["weight"]) for op in layers)
        bias = sum(_tensor(op["bias"]) for op in layers)
        bound = _probe_bound(vector, x)
        return all(((_torch_layer({**layers[0]["layer"], "padding_mode": mode}, x, weight, bias) - y).abs().numpy()
                    > bound).any() for mode in ("zeros", "reflect"))
    if verdict == "not_mergeable: zero_padding":
        # The exact composition, padded as the outer conv pads, differs from the chain at the borders only.
        x = x_of(5)
        y = sum(_branch_outputs(vector, x))
        composed = exact_merge(vector)
        weight = torch.tensor(composed.weight.astype(float))
        bias = torch.tensor(composed.bias.astype(float))
        merged = _torch_layer({**_layers(vector)[-1], "groups": 1}, x, weight, bias)
        wrong = ((merged - y).abs().numpy() > _probe_bound(vector, x))[0, 0]
        return bool(wrong.any()) and not wrong[1:-1, 1:-1].any()
    if verdict == "not_mergeable: sequential_unsupported":
        pointwise = [set(layer["kernel_size"]) == {1} and set(layer["stride"]) == {1} and not any(layer["padding"])
                     for layer in _layers(vector)]
        return len(pointwise) == 2 and not any(pointwise)
    if verdict == "not_mergeable: unsupported_layer":
        # The pool differs from the convolution with 1/n at every tap, at the borders.
        pool = next(op for branch in inputs["branches"] for op in branch["ops"] if op["op"] == "avg_pool")
        x = x_of(5)
        channels = inputs["in_channels"]
        kernel = torch.full((channels, 1, *pool["kernel_size"]), 1 / math.prod(pool["kernel_size"]),
                            dtype=torch.float64)
        as_conv = F.conv2d(x, kernel, stride=pool["stride"], padding=pool["padding"], groups=channels)
        return bool(((_torch_op(pool, x, absolute=False) - as_conv).abs().numpy() > _probe_bound(vector, x)).any())
    raise AssertionError(f"no oracle for the verdict {verdict!r}")


@pytest.mark.parametrize("name", MERGE_REFUSED)
def test_merge_refusals_have_their_premise(name):
    assert refusal_premise(VECTORS[name])


def test_merge_oracles_detect_a_wrong_vector():
    """Each merge oracle fails a vector changed just beyond what float64 merging can explain."""
    vector = copy.deepcopy(VECTORS["merge_repmixer_difference"])
    vector["expected"]["weight"]["data"][4] *= 1 + 2.0**-44  # 512 float64 units of roundoff
    assert [v.split(":")[0] for v in merge_violations(vector)] == ["weight[4]"]
    vector = copy.deepcopy(VECTORS["compose_1x1_bn_3x3_valid"])
    vector["expected"]["bias"]["data"][1] += 2.0**-40
    assert [v.split(":")[0] for v in merge_violations(vector)] == ["bias[1]"]
    vector = copy.deepcopy(VECTORS["merge_reflect_with_unpadded"])
    vector["expected"]["layer"]["padding_mode"] = "zeros"
    assert merge_violations(vector)[0].startswith("layer") and merged_probe_ratios(vector)[1] > 1
    vector = copy.deepcopy(VECTORS["merge_repvgg_3x3_1x1_identity"])
    weight = np.asarray(vector["expected"]["weight"]["data"]).reshape(vector["expected"]["weight"]["shape"])
    weight[:, :, [0, 1], [0, 1]] = weight[:, :, [1, 0], [1, 0]]  # the centre tap moved to a corner
    vector["expected"]["weight"]["data"] = weight.ravel().tolist()
    assert merge_violations(vector) and merged_probe_ratios(vector)[1] > 1
    vector = copy.deepcopy(VECTORS["merge_linear_bn_before"])
    vector["probe"]["y"]["data"][5] *= 1 + 2.0**-40
    assert merged_probe_ratios(vector)[0] > 1
    vector = copy.deepcopy(VECTORS["merge_repvgg_float16"])
    bits = vector["expected"]["bias_rounded"]["bits"]
    bits[2] = f"0x{int(bits[2], 16) + 1:04x}"  # one ulp
    exact = exact_merge(vector)
    assert [f"0x{b:04x}" for _, b in (round_by_hand(v, "float16") for v in exact.bias)] != bits
    vector = copy.deepcopy(VECTORS["compose_zero_padding"])
    vector["inputs"]["branches"][0]["ops"][2]["layer"]["padding"] = [0, 0]  # unpadded: the chain is exact
    assert not refusal_premise(vector)

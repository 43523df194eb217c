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

from refimpl import error_bound
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

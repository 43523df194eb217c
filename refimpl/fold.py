"""The fold math: the only place in the project where the folding formulas are written.

Every function here is written once against the array API namespace of its inputs
(``array_api_compat.array_namespace``), so the same code runs on numpy arrays and on
torch tensors on any device. Each computes in the dtype it is given: a caller that wants
the float64 reference passes float64 arrays (the torch adapter converts parameters to
float64 on their own device, folds, and rounds once to the parameter dtype).

Notation (see ``spec/folding.md``): eval-mode BatchNorm computes, per channel ``c``,

    BN(x)_c = (x_c - mu_c) / sqrt(var_c + eps) * gamma_c + beta_c = s_c * x_c + t_c

with ``s = gamma / sqrt(var + eps)`` and ``t = beta - mu * s``.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace

__all__ = [
    "bn_scale_shift",
    "fold_conv_bn",
    "fold_linear_bn",
    "fold_bn_conv",
    "fold_bn_linear",
]

Array = Any


def _shape(x: Array) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


def _dtype_name(dtype: Any) -> str:
    """``int64`` for numpy's ``int64``, torch's ``torch.int64`` and array_api_strict's ``array_api_strict.int64``
    alike, so that an error reads the same whatever the namespace."""
    return str(dtype).rpartition(".")[2]


def _require_float(xp, name: str, x: Array | None) -> None:
    if x is not None and not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{name} must have a real floating dtype, got {_dtype_name(x.dtype)} (shape {_shape(x)})")


def _require_vector(name: str, x: Array | None, length: int, what: str) -> None:
    if x is not None and _shape(x) != (length,):
        raise ValueError(f"{name} must have shape ({length},) to match {what}, got shape {_shape(x)}")


def bn_scale_shift(bn_mean: Array, bn_var: Array, bn_eps: float, bn_weight: Array | None = None,
                   bn_bias: Array | None = None) -> tuple[Array, Array]:
    """Per-channel scale and shift of eval-mode BatchNorm.

    Parameters
    ----------
    bn_mean, bn_var : array, shape (C,)
        Running mean ``mu`` and running variance ``var``. The variance must be finite and
        non-negative, and ``var + eps`` must be positive.
    bn_eps : float
        The ``eps`` added to the variance; finite and non-negative.
    bn_weight, bn_bias : array of shape (C,), or None
        The affine ``gamma`` and ``beta``; None for ``affine=False`` (gamma = 1, beta = 0).

    Returns
    -------
    s, t : arrays of shape (C,)
        ``s = gamma / sqrt(var + eps)`` and ``t = beta - mu * s``, so that
        ``BN(x)_c = s_c * x_c + t_c``.

    Raises
    ------
    TypeError
        An argument has a non-floating dtype.
    ValueError
        Shapes disagree, the variance is negative or not finite, ``var + eps`` is zero,
        or ``eps`` is negative or not finite.

    Examples
    --------
    >>> import numpy as np
    >>> s, t = bn_scale_shift(np.array([1.0]), np.array([3.0]), 1.0, np.array([2.0]), np.array([0.5]))
    >>> s.tolist(), t.tolist()
    ([1.0], [-0.5])
    """
    xp = array_namespace(bn_mean, bn_var, bn_weight, bn_bias)
    for name, x in (("bn_mean", bn_mean), ("bn_var", bn_var), ("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        _require_float(xp, name, x)
    if len(_shape(bn_var)) != 1:
        raise ValueError(f"bn_var must be a vector (C,), got shape {_shape(bn_var)}")
    channels = _shape(bn_var)[0]
    for name, x in (("bn_mean", bn_mean), ("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        _require_vector(name, x, channels, f"bn_var's shape ({channels},)")
    eps = float(bn_eps)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"bn_eps must be finite and >= 0, got {bn_eps!r}")
    # bool() on a reduction: works for numpy and torch (it synchronises a CUDA device).
    bad = ~xp.isfinite(bn_var) | (bn_var < 0)
    if bool(xp.any(bad)):
        index = int(xp.argmax(xp.astype(bad, xp.int8)))
        raise ValueError(
            f"bn_var must be finite and non-negative; channel {index} has running variance "
            f"{float(bn_var[index])!r} (shape {_shape(bn_var)})")
    denominator = bn_var + eps
    if bool(xp.any(denominator == 0)):
        index = int(xp.argmax(xp.astype(denominator == 0, xp.int8)))
        raise ValueError(f"bn_var + bn_eps is zero at channel {index} (var={float(bn_var[index])!r}, eps={eps!r}): "
                         "the BatchNorm divides by zero")
    inv_std = 1 / xp.sqrt(denominator)
    s = inv_std if bn_weight is None else bn_weight * inv_std
    t = -bn_mean * s if bn_bias is None else bn_bias - bn_mean * s
    return s, t


def _channel_axis_scale(xp, s: Array, weight_shape: tuple[int, ...], groups: int, transposed: bool) -> Array:
    """Reshape ``s`` (one value per output channel) to broadcast against a conv weight.

    Conv weights are ``[out, in/groups, *k]``: output channels on axis 0. Transposed conv
    weights are ``[in, out/groups, *k]``: output channel ``g * (out/groups) + j`` lives at
    axis-1 index ``j`` of every input channel of group ``g``, so the scale is laid out per
    group (torch's own ``fuse_conv_bn_weights`` ignores this and fails for groups > 1).
    """
    spatial = (1,) * (len(weight_shape) - 2)
    if not transposed:
        return xp.reshape(s, (weight_shape[0], 1) + spatial)
    in_channels, out_per_group = weight_shape[0], weight_shape[1]
    in_per_group = in_channels // groups
    # (groups, out/groups) -> one row per input channel of the group, repeated in/groups times.
    per_group = xp.reshape(s, (groups, 1, out_per_group))
    per_input = xp.broadcast_to(per_group, (groups, in_per_group, out_per_group))
    return xp.reshape(per_input, (in_channels, out_per_group) + spatial)


def _check_conv_weight(xp, name: str, weight: Array, groups: int, transposed: bool) -> int:
    """Validate a conv/linear weight and return its number of output channels."""
    _require_float(xp, name, weight)
    shape = _shape(weight)
    if len(shape) < 2:
        raise ValueError(f"{name} must have rank >= 2 ([out, in, *kernel] or [in, out/groups, *kernel]), "
                         f"got shape {shape}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
    if transposed:
        if shape[0] % groups:
            raise ValueError(f"{name} of a transposed conv has {shape[0]} input channels (shape {shape}), "
                             f"not divisible by groups={groups}")
        return shape[1] * groups
    if shape[0] % groups:
        raise ValueError(f"{name} has {shape[0]} output channels (shape {shape}), not divisible by groups={groups}")
    return shape[0]


def fold_conv_bn(conv_weight: Array, conv_bias: Array | None, bn_mean: Array, bn_var: Array, bn_eps: float,
                 bn_weight: Array | None = None, bn_bias: Array | None = None, *, transposed: bool = False,
                 groups: int = 1) -> tuple[Array, Array]:
    """Fold an eval-mode BatchNorm that runs *after* a convolution into the convolution.

    Same argument order as ``torch.nn.utils.fusion.fuse_conv_bn_weights``, plus ``groups``.

    Parameters
    ----------
    conv_weight : array
        ``[out, in/groups, *k]`` for a convolution, ``[in, out/groups, *k]`` when
        ``transposed`` (any number of spatial dims, including none for a linear layer).
    conv_bias : array of shape (out,), or None
        None for a convolution without bias (treated as zeros).
    bn_mean, bn_var, bn_eps, bn_weight, bn_bias
        The BatchNorm's running statistics, eps and optional affine parameters (shape (out,)).
    transposed : bool
        Whether ``conv_weight`` is a transposed-convolution weight.
    groups : int
        The convolution's groups; only affects the transposed layout.

    Returns
    -------
    weight, bias : arrays
        ``W' = W * s`` along the output-channel axis and ``b' = (b - mu) * s + beta``, in the
        dtype and namespace of the inputs.

    Notes
    -----
    With ``s = gamma / sqrt(var + eps)``: ``BN(conv(x, W) + b) = conv(x, W * s) + (b - mu) * s + beta``,
    exactly, for every padding mode, stride, dilation and group count, because BN is a per-channel
    affine map applied to the conv output.

    Examples
    --------
    >>> import numpy as np
    >>> w, b = fold_conv_bn(np.ones((2, 1, 1)), None, np.array([1.0, 2.0]), np.array([3.0, 0.0]), 1.0)
    >>> w.ravel().tolist(), b.tolist()
    ([0.5, 1.0], [-0.5, -2.0])
    """
    return _fold_after(conv_weight, conv_bias, bn_mean, bn_var, bn_eps, bn_weight, bn_bias, transposed=transposed,
                       groups=groups, layer="conv")


def _fold_after(weight: Array, bias: Array | None, bn_mean: Array, bn_var: Array, bn_eps: float,
                bn_weight: Array | None, bn_bias: Array | None, *, transposed: bool, groups: int, layer: str
                ) -> tuple[Array, Array]:
    """Layer -> BN: shared by the conv and linear folds; ``layer`` names the arguments in messages."""
    xp = array_namespace(weight, bias, bn_mean, bn_var, bn_weight, bn_bias)
    w_name, b_name = f"{layer}_weight", f"{layer}_bias"
    out_channels = _check_conv_weight(xp, w_name, weight, groups, transposed)
    _require_float(xp, b_name, bias)
    _require_vector(b_name, bias, out_channels, f"the {out_channels} output channels of {w_name} {_shape(weight)}")
    if _shape(bn_var) != (out_channels,):
        raise ValueError(f"BatchNorm has {_shape(bn_var)} channels (bn_var shape) but the {layer} has {out_channels} "
                         f"output channels ({w_name} shape {_shape(weight)}, groups={groups}, "
                         f"transposed={transposed})")
    s, t = bn_scale_shift(bn_mean, bn_var, bn_eps, bn_weight, bn_bias)
    folded_weight = weight * _channel_axis_scale(xp, s, _shape(weight), groups, transposed)
    folded_bias = t if bias is None else bias * s + t
    return folded_weight, folded_bias


def fold_linear_bn(linear_weight: Array, linear_bias: Array | None, bn_mean: Array, bn_var: Array, bn_eps: float,
                   bn_weight: Array | None = None, bn_bias: Array | None = None) -> tuple[Array, Array]:
    """Fold an eval-mode BatchNorm1d that runs *after* a linear layer into it.

    Same argument order as ``torch.nn.utils.fusion.fuse_linear_bn_weights``. ``linear_weight``
    is ``[out, in]``; the result is ``W' = W * s[:, None]``, ``b' = (b - mu) * s + beta``.
    A linear layer is a convolution with no spatial dims, so this is :func:`fold_conv_bn`.

    Examples
    --------
    >>> import numpy as np
    >>> w, b = fold_linear_bn(np.array([[1.0, 2.0]]), np.array([1.0]), np.array([3.0]), np.array([4.0]), 0.0)
    >>> w.tolist(), b.tolist()
    ([[0.5, 1.0]], [-1.0])
    """
    if len(_shape(linear_weight)) != 2:
        raise ValueError(f"linear_weight must be [out, in], got shape {_shape(linear_weight)}")
    return _fold_after(linear_weight, linear_bias, bn_mean, bn_var, bn_eps, bn_weight, bn_bias, transposed=False,
                       groups=1, layer="linear")


def fold_bn_conv(conv_weight: Array, conv_bias: Array | None, bn_mean: Array, bn_var: Array, bn_eps: float,
                 bn_weight: Array | None = None, bn_bias: Array | None = None, *,
                 groups: int = 1) -> tuple[Array, Array]:
    """Fold an eval-mode BatchNorm that runs *before* a convolution into the convolution.

    The arguments are in the same order as :func:`fold_conv_bn` (layer first, then the
    BatchNorm), so the two can be swapped; the function name gives the order of dataflow.

    Parameters
    ----------
    conv_weight : array, ``[out, in/groups, *k]``
        The BatchNorm has ``in`` channels: channel ``c`` feeds group ``c // (in/groups)``.
    conv_bias : array of shape (out,), or None
    bn_mean, bn_var, bn_eps, bn_weight, bn_bias
        The BatchNorm that feeds the convolution (shape (in,)).
    groups : int

    Returns
    -------
    weight, bias : arrays
        ``W'[o, j, k] = W[o, j, k] * s[c]`` and ``b'[o] = b[o] + sum_{j,k} W[o, j, k] * t[c]``,
        where ``c = g(o) * (in/groups) + j`` is the input channel that ``(o, j)`` reads.

    Notes
    -----
    Exact only when every input position the kernel reads is a BatchNorm output: the conv
    pads nothing, or pads with ``reflect``/``replicate``/``circular`` (which copy BN outputs).
    Zero padding inserts zeros *after* the BatchNorm, where the folded conv would see
    ``t_c`` instead; the result is wrong at the borders unless ``t`` is zero. Transposed
    convolutions are not foldable this way: the number of kernel taps that reach an output
    position varies with the position, so the shift is not a per-channel constant.
    Checking the padding is the caller's job (it is a property of the layer, not the weights).

    Examples
    --------
    >>> import numpy as np
    >>> w, b = fold_bn_conv(np.ones((1, 2, 1)), None, np.array([1.0, 2.0]), np.array([3.0, 0.0]), 1.0)
    >>> w.ravel().tolist(), b.tolist()
    ([0.5, 1.0], [-2.5])
    """
    return _fold_before(conv_weight, conv_bias, bn_mean, bn_var, bn_eps, bn_weight, bn_bias, groups=groups,
                        layer="conv")


def _fold_before(weight: Array, bias: Array | None, bn_mean: Array, bn_var: Array, bn_eps: float,
                 bn_weight: Array | None, bn_bias: Array | None, *, groups: int, layer: str) -> tuple[Array, Array]:
    """BN -> layer: shared by the conv and linear folds; ``layer`` names the arguments in messages."""
    xp = array_namespace(weight, bias, bn_mean, bn_var, bn_weight, bn_bias)
    w_name, b_name = f"{layer}_weight", f"{layer}_bias"
    out_channels = _check_conv_weight(xp, w_name, weight, groups, transposed=False)
    _require_float(xp, b_name, bias)
    _require_vector(b_name, bias, out_channels, f"the {out_channels} output channels of {w_name} {_shape(weight)}")
    shape = _shape(weight)
    in_per_group = shape[1]
    in_channels = in_per_group * groups
    if _shape(bn_var) != (in_channels,):
        raise ValueError(f"BatchNorm has {_shape(bn_var)} channels (bn_var shape) but the {layer} reads {in_channels} "
                         f"input channels ({w_name} shape {shape}, groups={groups})")
    s, t = bn_scale_shift(bn_mean, bn_var, bn_eps, bn_weight, bn_bias)
    spatial = (1,) * (len(shape) - 2)
    out_per_group = out_channels // groups
    # Row o of the weight reads input channels g(o)*in_per_group + j; lay s and t out per output row.
    def per_row(v: Array) -> Array:
        grouped = xp.reshape(v, (groups, 1, in_per_group))
        rows = xp.broadcast_to(grouped, (groups, out_per_group, in_per_group))
        return xp.reshape(rows, (out_channels, in_per_group) + spatial)

    folded_weight = weight * per_row(s)
    reduce_axes = tuple(range(1, len(shape)))
    shift = xp.sum(weight * per_row(t), axis=reduce_axes)
    folded_bias = shift if bias is None else bias + shift
    return folded_weight, folded_bias


def fold_bn_linear(linear_weight: Array, linear_bias: Array | None, bn_mean: Array, bn_var: Array, bn_eps: float,
                   bn_weight: Array | None = None, bn_bias: Array | None = None) -> tuple[Array, Array]:
    """Fold an eval-mode BatchNorm1d that runs *before* a linear layer into it.

    Argument order as :func:`fold_linear_bn`. Returns ``W' = W * s[None, :]`` and
    ``b' = b + W @ t``; always exact (a linear layer has no padding). This is
    :func:`fold_bn_conv` with no spatial dims.

    Examples
    --------
    >>> import numpy as np
    >>> w, b = fold_bn_linear(np.array([[1.0, 2.0]]), None, np.array([1.0, 2.0]), np.array([3.0, 0.0]), 1.0)
    >>> w.tolist(), b.tolist()
    ([[0.5, 2.0]], [-4.5])
    """
    if len(_shape(linear_weight)) != 2:
        raise ValueError(f"linear_weight must be [out, in], got shape {_shape(linear_weight)}")
    return _fold_before(linear_weight, linear_bias, bn_mean, bn_var, bn_eps, bn_weight, bn_bias, groups=1,
                        layer="linear")

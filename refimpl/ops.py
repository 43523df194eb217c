"""Float64 reference ops: plain numpy transcriptions of their definitions.

Each function mirrors its ``torch.nn.functional`` counterpart argument for argument (names,
order, defaults), so a test can swap one for the other: :func:`conv` (``conv1d``/``conv2d``/
``conv3d``, plus the ``padding_mode`` of ``nn.ConvNd``), :func:`conv_transpose`
(``conv_transpose{1,2,3}d``), :func:`batch_norm` (eval mode: no ``training`` or ``momentum``, so
``eps`` is keyword only), :func:`linear` and :func:`avg_pool` (``avg_pool{1,2,3}d``). Inputs are converted with
``np.asarray(..., dtype=float64)`` (callers convert torch tensors); results are float64.

These ops are the oracle the folds are checked against, so they never call ``refimpl.fold``.
Convolution is written once for 1, 2 and 3 spatial dimensions: the sum over kernel offsets of
strided, dilated windows of the padded input, contracted over the input channels of each
group. The windows are gathered into one ``(channels * kernel, positions)`` matrix per group
(and per sample, on large feature maps), so the whole contraction is a single BLAS product each.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["conv", "conv_transpose", "batch_norm", "linear", "avg_pool"]

#: ``nn.ConvNd`` padding modes and the ``numpy.pad`` mode with the same semantics.
_NUMPY_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}

#: Feature maps with fewer output positions than this are convolved with the batch merged into
#: one product. Above it the per-sample products are already wide, and merging would only add a
#: transpose of a large output (``benchmarks/reference_ops.py``: 512 channels at 7x7 runs ~30%
#: faster merged; 64 channels at 56x56 gains nothing).
_MERGE_BATCH_BELOW = 1024


def _f64(name: str, value: Any) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be convertible to a float64 array, got {type(value).__name__}: {error}") from None


def _int_tuple(name: str, value: Any, dims: int, context: str) -> tuple[int, ...]:
    """An int or a sequence of ``dims`` ints, as a tuple (torch's ``_ntuple``)."""
    items = value if isinstance(value, (tuple, list)) else (value,) * dims
    if len(items) != dims:
        raise ValueError(f"{name}={value!r} must be an int or have {dims} entries (one per spatial dim); {context}")
    try:
        return tuple(operator.index(v) for v in items)
    except TypeError:
        raise TypeError(f"{name}={value!r} must be an int or a tuple of ints; {context}") from None


def _check_bias(bias: Any, out_channels: int, context: str) -> np.ndarray | None:
    if bias is None:
        return None
    b = _f64("bias", bias)
    if b.shape != (out_channels,):
        raise ValueError(f"bias.shape={b.shape} must be ({out_channels},), one entry per output channel; {context}")
    return b


def _channel_view(vector: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a per-channel vector to broadcast along axis 1 of an ``ndim``-d array."""
    return vector.reshape((1, -1) + (1,) * (ndim - 2))


def _conv_operands(op: str, input: Any, weight: Any, groups: Any) -> tuple[np.ndarray, np.ndarray, int, bool, str]:
    """Common checks of conv and conv_transpose: returns (input batched, weight, groups, was_unbatched, context)."""
    x = _f64("input", input)
    weight = _f64("weight", weight)
    context = f"input.shape={x.shape}, weight.shape={weight.shape}, groups={groups!r}"
    if weight.ndim not in (3, 4, 5):
        raise ValueError(f"{op}: weight must have 3, 4 or 5 dims (1, 2 or 3 spatial dims); {context}")
    if x.ndim not in (weight.ndim, weight.ndim - 1):
        raise ValueError(f"{op}: input must have {weight.ndim} dims (batched) or {weight.ndim - 1} (unbatched) "
                         f"to match weight's {weight.ndim - 2} spatial dims; {context}")
    try:
        groups = operator.index(groups)
    except TypeError:
        raise TypeError(f"{op}: groups must be an int; {context}") from None
    if groups < 1:
        raise ValueError(f"{op}: groups must be positive; {context}")
    unbatched = x.ndim == weight.ndim - 1
    if unbatched:
        x = x[None]
    if any(k == 0 for k in weight.shape[2:]):
        raise ValueError(f"{op}: kernel size must be positive in every spatial dim; {context}")
    return x, weight, groups, unbatched, context


def conv(input: Any, weight: Any, bias: Any = None, stride: int | Sequence[int] = 1,
         padding: int | Sequence[int] | str = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
         padding_mode: str = "zeros") -> np.ndarray:
    """N-d convolution (cross-correlation) in float64, as ``torch.nn.functional.conv{1,2,3}d``.

    Parameters
    ----------
    input : array_like, shape (N, C_in, *spatial) or (C_in, *spatial)
        Input; the number of spatial dims (1, 2 or 3) is that of ``weight``.
    weight : array_like, shape (C_out, C_in / groups, *kernel)
        Filters; output channels ``g * C_out/groups ... (g+1) * C_out/groups - 1`` see only the
        input channels of group ``g``.
    bias : array_like, shape (C_out,), optional
    stride, dilation : int or tuple of ints, optional
        Positive, per spatial dim.
    padding : int, tuple of ints, "same" or "valid", optional
        Padding added on both sides of each spatial dim. ``"valid"`` is no padding; ``"same"``
        (stride 1 only) pads ``dilation * (kernel - 1)`` in total, the odd extra on the right,
        as torch does.
    groups : int, optional
        Divides both ``C_in`` and ``C_out``.
    padding_mode : {"zeros", "reflect", "replicate", "circular"}, optional
        How the padding is filled, as the ``padding_mode`` of ``torch.nn.ConvNd`` (which pads
        with ``F.pad`` in that mode and then convolves without padding).

    Returns
    -------
    numpy.ndarray, float64, shape (N, C_out, *out)
        ``out_d = floor((spatial_d + pad_left_d + pad_right_d - dilation_d * (kernel_d - 1) - 1)
        / stride_d) + 1`` (no batch axis when ``input`` had none).

    Raises
    ------
    ValueError
        Ranks, channel counts, groups or bias length disagree; a stride or dilation is not
        positive; padding is negative, or "same" with a stride > 1; unknown ``padding_mode``;
        reflect/circular padding at least as large as (reflect) or larger than (circular) the
        input; the output would be empty.
    TypeError
        A stride, padding, dilation or groups is not an int (or tuple of ints).

    Notes
    -----
    With ``xp`` the padded input, ``G`` groups, ``C = C_in / G`` input channels per group and
    ``g`` the group of output channel ``o``:

    .. math::

        y_{n,o,i} = b_o + \\sum_{c=0}^{C-1} \\sum_{k} w_{o,c,k}\\,
                    xp_{n,\\,gC + c,\\; s \\odot i + d \\odot k}

    where ``i`` and ``k`` are spatial multi-indices (output position and kernel offset) and
    ``s``, ``d`` are the stride and dilation.

    Examples
    --------
    >>> conv([[[1, 2, 3, 4]]], [[[1, 0, -1]]]).tolist()
    [[[-2.0, -2.0]]]
    >>> conv([[[1, 2, 3, 4]]], [[[1, 0, -1]]], padding=1, padding_mode="circular").tolist()
    [[[2.0, -2.0, -2.0, 2.0]]]
    """
    x, weight, groups, unbatched, context = _conv_operands("conv", input, weight, groups)
    dims = weight.ndim - 2
    kernel = weight.shape[2:]
    context += f", stride={stride!r}, padding={padding!r}, dilation={dilation!r}, padding_mode={padding_mode!r}"
    out_channels, group_in = weight.shape[:2]
    if out_channels % groups:
        raise ValueError(f"conv: out channels weight.shape[0]={out_channels} not divisible by groups; {context}")
    if x.shape[1] != group_in * groups:
        raise ValueError(f"conv: input has {x.shape[1]} channels but weight expects "
                         f"weight.shape[1] * groups = {group_in * groups}; {context}")
    bias = _check_bias(bias, out_channels, context)
    stride = _int_tuple("stride", stride, dims, context)
    dilation = _int_tuple("dilation", dilation, dims, context)
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"conv: stride and dilation must be positive; {context}")
    if padding_mode not in _NUMPY_PAD_MODE:
        raise ValueError(f"conv: padding_mode must be one of {sorted(_NUMPY_PAD_MODE)}; {context}")

    pads = _conv_pads(padding, stride, dilation, kernel, context)
    xp = _pad(x, pads, padding_mode, context)
    out_shape = _conv_output_shape(xp.shape[2:], kernel, stride, dilation, context)
    y = _correlate(xp, weight, groups, stride, dilation, out_shape)
    if bias is not None:
        y += _channel_view(bias, y.ndim)
    return y[0] if unbatched else y


def _conv_pads(padding: int | Sequence[int] | str, stride: tuple[int, ...], dilation: tuple[int, ...],
               kernel: tuple[int, ...], context: str) -> list[tuple[int, int]]:
    """``(before, after)`` padding per spatial dim, from an int, a tuple, "valid" or "same"."""
    dims = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * dims
        if padding == "same":
            if max(stride) > 1:
                raise ValueError(f"conv: padding='same' requires stride 1 (as in torch); {context}")
            # torch puts the odd unit of a 'same' padding on the right (end) side.
            totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
            return [(t // 2, t - t // 2) for t in totals]
        raise ValueError(f"conv: padding string must be 'same' or 'valid'; {context}")
    pads = [(p, p) for p in _int_tuple("padding", padding, dims, context)]
    if min(min(p) for p in pads) < 0:
        raise ValueError(f"conv: padding must be non-negative; {context}")
    return pads


def _pad(x: np.ndarray, pads: list[tuple[int, int]], padding_mode: str, context: str) -> np.ndarray:
    """``x`` padded in its spatial dims, filled as ``nn.ConvNd``'s ``padding_mode`` fills them."""
    spatial = x.shape[2:]
    if padding_mode == "reflect" and any(max(p) >= n for p, n in zip(pads, spatial, strict=True)):
        raise ValueError(f"conv: reflect padding must be smaller than the input size in each spatial dim; {context}")
    if padding_mode == "circular" and any(max(p) > n for p, n in zip(pads, spatial, strict=True)):
        raise ValueError(f"conv: circular padding must not exceed the input size in each spatial dim; {context}")
    if not any(lo or hi for lo, hi in pads):
        return x
    return np.pad(x, [(0, 0), (0, 0), *pads], mode=_NUMPY_PAD_MODE[padding_mode])  # type: ignore[call-overload]


def _conv_output_shape(padded: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
                       dilation: tuple[int, ...], context: str) -> tuple[int, ...]:
    out_shape = tuple((n - d * (k - 1) - 1) // s + 1
                      for n, d, k, s in zip(padded, dilation, kernel, stride, strict=True))
    if min(out_shape) < 1:
        raise ValueError(f"conv: output would be empty (spatial size {out_shape}): the dilated kernel "
                         f"is larger than the padded input {tuple(padded)}; {context}")
    return out_shape


def _correlate(xp: np.ndarray, weight: np.ndarray, groups: int, stride: tuple[int, ...],
               dilation: tuple[int, ...], out_shape: tuple[int, ...]) -> np.ndarray:
    """Unpadded grouped cross-correlation of the padded input: one BLAS product per group (and
    per sample, unless the batch is merged)."""
    batch = xp.shape[0]
    out_channels, group_in = weight.shape[:2]
    kernel = weight.shape[2:]
    group_out = out_channels // groups
    positions = math.prod(out_shape)
    taps = math.prod(kernel)
    # Weights per group as (G, C_out/G, C_in/G * K): row o, column (c, k) holds w[g*C_out/G + o, c, k].
    w = weight.reshape(groups, group_out, group_in * taps)

    # BLAS runs best on wide products. Deep layers have few positions per sample, so there the
    # whole batch goes side by side into one product per group, paying one transpose of the output.
    merge_batch = batch > 1 and positions < _MERGE_BATCH_BELOW
    if merge_batch:
        source = np.moveaxis(xp, 0, 1)  # (C_in, N, *padded)
        grouped = (groups, group_in, batch) + out_shape
    else:
        source = xp
        grouped = (batch, groups, group_in) + out_shape
    columns = _windows(source, kernel, stride, dilation, out_shape, grouped, tap_axis=2 if merge_batch else 3)

    # One BLAS product (C_out/G, C*K) @ (C*K, positions) per group, and per sample unless merged.
    if merge_batch:
        y = np.matmul(w, columns.reshape(groups, group_in * taps, batch * positions))
        y = np.ascontiguousarray(np.moveaxis(y.reshape((out_channels, batch) + out_shape), 0, 1))
    else:
        y = np.empty((batch, groups, group_out, positions))
        np.matmul(w, columns.reshape(batch, groups, group_in * taps, positions), out=y)
    return y.reshape((batch, out_channels) + out_shape)


def _windows(source: np.ndarray, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
             out_shape: tuple[int, ...], grouped: tuple[int, ...], tap_axis: int) -> np.ndarray:
    """The strided, dilated window of every kernel offset, stacked on ``tap_axis`` of ``grouped``
    (im2col): ``columns[..., c, k, ...] = xp[n, g*C + c, s*i + d*k]``."""
    taps = math.prod(kernel)
    if taps == 1 and max(stride) == 1:
        # A 1x1 kernel with stride 1 reads every (padded) input position once: the input already is
        # the (channels, positions) matrix, so the product needs no gathering.
        return source.reshape(grouped)
    # Each kernel offset's window copied once, each copy writing whole contiguous rows of positions.
    columns = np.empty(grouped[:tap_axis] + (taps,) + grouped[tap_axis:])
    offsets = itertools.product(*(range(k) for k in kernel))
    for tap, offset in enumerate(offsets):
        window = tuple(slice(d * k, d * k + s * (o - 1) + 1, s)
                       for d, k, s, o in zip(dilation, offset, stride, out_shape, strict=True))
        columns[(slice(None),) * tap_axis + (tap,)] = source[(slice(None), slice(None)) + window].reshape(grouped)
    return columns


def conv_transpose(input: Any, weight: Any, bias: Any = None, stride: int | Sequence[int] = 1,
                   padding: int | Sequence[int] = 0, output_padding: int | Sequence[int] = 0, groups: int = 1,
                   dilation: int | Sequence[int] = 1) -> np.ndarray:
    """N-d transposed convolution in float64, as ``torch.nn.functional.conv_transpose{1,2,3}d``.

    Parameters
    ----------
    input : array_like, shape (N, C_in, *spatial) or (C_in, *spatial)
    weight : array_like, shape (C_in, C_out / groups, *kernel)
        Note the layout: input channels first, as in ``nn.ConvTransposeNd``.
    bias : array_like, shape (C_out,), optional
    stride, dilation : int or tuple of ints, optional
        Positive, per spatial dim.
    padding : int or tuple of ints, optional
        Removed from both ends of the full output (non-negative).
    output_padding : int or tuple of ints, optional
        Extra size added to one side (the end) of the output; each entry must be smaller than
        the stride or the dilation of its dim (torch's rule).
    groups : int, optional
        Divides both ``C_in`` and ``C_out``.

    Returns
    -------
    numpy.ndarray, float64, shape (N, C_out, *out)
        ``out_d = (spatial_d - 1) * stride_d - 2 * padding_d + dilation_d * (kernel_d - 1)
        + output_padding_d + 1``.

    Raises
    ------
    ValueError
        Ranks, channel counts, groups or bias length disagree; a stride or dilation is not
        positive; padding or output_padding is negative; output_padding is not smaller than
        the stride or the dilation; the output would be empty.
    TypeError
        A stride, padding, output_padding, dilation or groups is not an int (or tuple of ints).

    Notes
    -----
    The adjoint of :func:`conv`: every input element scatters its value times the kernel into
    the output. With ``C = C_in / G`` input and ``O = C_out / G`` output channels per group,
    input channel ``gC + c`` and output channel ``gO + o``:

    .. math::

        y_{n,\\,gO + o,\\; s \\odot i + d \\odot k - p} \\mathrel{+}= x_{n,\\,gC + c,\\,i}\\, w_{gC + c,\\,o,\\,k}

    for every input position ``i`` and kernel offset ``k``, then ``y += b``. Targets past the
    end (only reachable through ``output_padding``) receive nothing but the bias.

    Examples
    --------
    >>> conv_transpose([[[1, 2]]], [[[1, 10, 100]]], stride=2).tolist()
    [[[1.0, 10.0, 102.0, 20.0, 200.0]]]
    """
    x, weight, groups, unbatched, context = _conv_operands("conv_transpose", input, weight, groups)
    dims = weight.ndim - 2
    batch, in_channels = x.shape[:2]
    group_out = weight.shape[1]
    kernel = weight.shape[2:]
    out_channels = group_out * groups
    context += (f", stride={stride!r}, padding={padding!r}, output_padding={output_padding!r}, "
                f"dilation={dilation!r}")
    if weight.shape[0] % groups:
        raise ValueError(f"conv_transpose: in channels weight.shape[0]={weight.shape[0]} not divisible by groups; "
                         f"{context}")
    if in_channels != weight.shape[0]:
        raise ValueError(f"conv_transpose: input has {in_channels} channels but weight.shape[0]={weight.shape[0]} "
                         f"(weight layout is [in, out/groups, *kernel]); {context}")
    bias = _check_bias(bias, out_channels, context)
    stride = _int_tuple("stride", stride, dims, context)
    dilation = _int_tuple("dilation", dilation, dims, context)
    padding = _int_tuple("padding", padding, dims, context)
    output_padding = _int_tuple("output_padding", output_padding, dims, context)
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"conv_transpose: stride and dilation must be positive; {context}")
    if min(padding) < 0 or min(output_padding) < 0:
        raise ValueError(f"conv_transpose: padding and output_padding must be non-negative; {context}")
    if any(op >= s and op >= d for op, s, d in zip(output_padding, stride, dilation, strict=True)):
        raise ValueError(f"conv_transpose: output_padding must be smaller than either stride or dilation "
                         f"in each spatial dim; {context}")
    spatial = x.shape[2:]
    # Full extent of the scatter, before cropping `padding` from both ends.
    full_shape = tuple((n - 1) * s + d * (k - 1) + 1 + op
                       for n, s, d, k, op in zip(spatial, stride, dilation, kernel, output_padding, strict=True))
    out_shape = tuple(f - 2 * p for f, p in zip(full_shape, padding, strict=True))
    if min(out_shape) < 1:
        raise ValueError(f"conv_transpose: output would be empty (spatial size {out_shape}); {context}")

    group_in = in_channels // groups
    taps = math.prod(kernel)
    positions = math.prod(spatial)
    # contributions[n, g, o, k, i] = sum_c w[gC + c, o, k] * x[n, gC + c, i]: one product per (sample, group).
    w_t = weight.reshape(groups, group_in, group_out * taps).transpose(0, 2, 1)
    contributions = np.matmul(w_t, x.reshape(batch, groups, group_in, positions))
    contributions = contributions.reshape((batch, out_channels, taps) + spatial)

    full = np.zeros((batch, out_channels) + full_shape)
    offsets = itertools.product(*(range(k) for k in kernel))
    for tap, offset in enumerate(offsets):
        target = tuple(slice(d * k, d * k + s * (n - 1) + 1, s)
                       for d, k, s, n in zip(dilation, offset, stride, spatial, strict=True))
        full[(slice(None), slice(None)) + target] += contributions[:, :, tap]
    y = full[(slice(None), slice(None)) + tuple(slice(p, p + o) for p, o in zip(padding, out_shape, strict=True))]
    y = np.ascontiguousarray(y)
    if bias is not None:
        y += _channel_view(bias, y.ndim)
    return y[0] if unbatched else y


def batch_norm(input: Any, running_mean: Any, running_var: Any, weight: Any = None, bias: Any = None, *,
               eps: float = 1e-5) -> np.ndarray:
    """Eval-mode batch normalisation in float64, as ``torch.nn.functional.batch_norm(training=False)``.

    Parameters
    ----------
    input : array_like, shape (N, C, *rest)
        Any rank >= 2; the channel axis is 1.
    running_mean, running_var : array_like, shape (C,)
        Running mean and running variance.
    weight, bias : array_like of shape (C,), optional
        The affine ``gamma`` and ``beta``; omitted means 1 and 0 (``affine=False``).
    eps : float, optional, keyword only
        Added to the variance. (``torch``'s ``training`` and ``momentum`` come before it there;
        this reference is eval mode only, so it has neither.)

    Returns
    -------
    numpy.ndarray, float64, shape of ``input``

    Raises
    ------
    ValueError
        ``input`` has fewer than 2 dims, a per-channel argument does not have shape (C,), or
        ``running_var + eps`` is not positive in some channel.

    Notes
    -----
    .. math::

        y_{n,c,\\dots} = \\frac{x_{n,c,\\dots} - \\mu_c}{\\sqrt{\\sigma^2_c + \\varepsilon}}\\,\\gamma_c + \\beta_c

    Examples
    --------
    >>> batch_norm([[1.0, 7.0]], [1.0, 3.0], [1.0, 4.0], weight=[5.0, 2.0], bias=[0.5, 1.0], eps=0.0).tolist()
    [[0.5, 5.0]]
    """
    x = _f64("input", input)
    if x.ndim < 2:
        raise ValueError(f"batch_norm: input must have at least 2 dims (N, C, ...), got input.shape={x.shape}")
    channels = x.shape[1]
    if running_mean is None or running_var is None:
        raise ValueError("batch_norm: running_mean and running_var are required in eval mode")
    mean, var = _f64("running_mean", running_mean), _f64("running_var", running_var)
    gamma = None if weight is None else _f64("weight", weight)
    beta = None if bias is None else _f64("bias", bias)
    for name, value in (("running_mean", mean), ("running_var", var), ("weight", gamma), ("bias", beta)):
        if value is not None and value.shape != (channels,):
            raise ValueError(f"batch_norm: {name}.shape={value.shape} must be ({channels},) to match "
                             f"input.shape={x.shape} (channel axis 1)")
    denominator = var + float(eps)
    bad = np.flatnonzero(~(denominator > 0) & ~np.isnan(denominator))
    if bad.size:
        c = int(bad[0])
        raise ValueError(f"batch_norm: running_var + eps must be positive, but channel {c} has "
                         f"running_var={float(var[c])!r}, eps={eps!r} (input.shape={x.shape})")
    y = (x - _channel_view(mean, x.ndim)) / _channel_view(np.sqrt(denominator), x.ndim)
    if gamma is not None:
        y = y * _channel_view(gamma, x.ndim)
    if beta is not None:
        y = y + _channel_view(beta, x.ndim)
    return y


def linear(input: Any, weight: Any, bias: Any = None) -> np.ndarray:
    """Affine map in float64, as ``torch.nn.functional.linear``.

    Parameters
    ----------
    input : array_like, shape (*, in_features)
    weight : array_like, shape (out_features, in_features)
    bias : array_like, shape (out_features,), optional

    Returns
    -------
    numpy.ndarray, float64, shape (*, out_features)

    Raises
    ------
    ValueError
        ``weight`` is not 2-d, ``input`` has no feature axis or its last dim differs from
        ``in_features``, or ``bias`` does not have shape (out_features,).

    Notes
    -----
    :math:`y = x W^T + b`.

    Examples
    --------
    >>> linear([[1, 2]], [[1, 0], [3, -1]], [10, 20]).tolist()
    [[11.0, 21.0]]
    """
    x = _f64("input", input)
    weight = _f64("weight", weight)
    context = f"input.shape={x.shape}, weight.shape={weight.shape}"
    if weight.ndim != 2:
        raise ValueError(f"linear: weight must be 2-d (out_features, in_features); {context}")
    if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: the last dim of input must equal weight.shape[1] (in_features); {context}")
    bias = _check_bias(bias, weight.shape[0], context)
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    return y


def avg_pool(input: Any, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
             padding: int | Sequence[int] = 0, ceil_mode: bool = False, count_include_pad: bool = True,
             divisor_override: int | None = None) -> np.ndarray:
    """N-d average pooling in float64, as ``torch.nn.functional.avg_pool{1,2,3}d``.

    Parameters
    ----------
    input : array_like, shape (N, C, *spatial)
        The number of spatial dims is ``len(kernel_size)`` for a tuple, else ``input.ndim - 2``.
    kernel_size, stride, padding : int or tuple of ints
        ``stride`` defaults to ``kernel_size``; zero padding on both sides, at most half the kernel.
    ceil_mode : bool
        Round the output size up (a last window may stick out of the padded input; it must start
        inside the input or its left padding).
    count_include_pad : bool
        Divide by the taps inside the zero-padded input (``True``) or inside the input only.
    divisor_override : int, optional
        Divide every window by this instead.

    Returns
    -------
    numpy.ndarray, float64, shape (N, C, *out)

    Notes
    -----
    Window ``i`` covers positions ``s*i - p ... s*i - p + k - 1``; its sum (padding zeros count as 0)
    is divided by the number of its positions inside ``[-p, L + p)`` (``count_include_pad``) or
    inside ``[0, L)``, as torch does.

    Examples
    --------
    >>> avg_pool([[[3.0, 6.0, 9.0, 12.0]]], 3, 1, 1).tolist()
    [[[3.0, 6.0, 9.0, 7.0]]]
    >>> avg_pool([[[3.0, 6.0, 9.0, 12.0]]], 3, 1, 1, count_include_pad=False).tolist()
    [[[4.5, 6.0, 9.0, 10.5]]]
    """
    x = _f64("input", input)
    dims = len(kernel_size) if isinstance(kernel_size, (tuple, list)) else x.ndim - 2
    context = (f"input.shape={x.shape}, kernel_size={kernel_size!r}, stride={stride!r}, padding={padding!r}, "
               f"ceil_mode={ceil_mode!r}")
    if dims < 1 or x.ndim != dims + 2:
        raise ValueError(f"avg_pool: input must be (N, C, *spatial) with one spatial dim per kernel entry; {context}")
    kernel = _int_tuple("kernel_size", kernel_size, dims, context)
    strides = kernel if stride is None else _int_tuple("stride", stride, dims, context)
    pads = _int_tuple("padding", padding, dims, context)
    if min(kernel) < 1 or min(strides) < 1 or min(pads) < 0 or any(2 * p > k for p, k in zip(pads, kernel,
                                                                                              strict=True)):
        raise ValueError(f"avg_pool: kernel and stride must be positive and padding at most half the kernel; "
                         f"{context}")
    if divisor_override is not None and (isinstance(divisor_override, bool) or operator.index(divisor_override) < 1):
        raise ValueError(f"avg_pool: divisor_override must be a positive int, got {divisor_override!r}")
    spatial = x.shape[2:]
    out_shape = []
    for n, k, s, p in zip(spatial, kernel, strides, pads, strict=True):
        span = n + 2 * p - k
        if span < 0:
            raise ValueError(f"avg_pool: the window is larger than the padded input; {context}")
        out = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (out - 1) * s >= n + p:  # the last window must start inside the input or left padding
            out -= 1
        out_shape.append(out)
    # Zeros on the right as far as the last window reaches (ceil_mode), and masks of the positions that count.
    right = [max(p, (o - 1) * s + k - n - p) for n, k, s, p, o in zip(spatial, kernel, strides, pads, out_shape,
                                                                       strict=True)]
    widths = [(0, 0), (0, 0), *((p, r) for p, r in zip(pads, right, strict=True))]
    padded = np.pad(x, widths)
    inside_input = np.pad(np.ones((1, 1) + spatial), widths)
    inside_padding = np.pad(np.ones((1, 1) + tuple(n + 2 * p for n, p in zip(spatial, pads, strict=True))),
                            [(0, 0), (0, 0), *((0, r - p) for p, r in zip(pads, right, strict=True))])

    def window_sums(a: np.ndarray) -> np.ndarray:
        total = np.zeros(a.shape[:2] + tuple(out_shape))
        for offset in itertools.product(*(range(k) for k in kernel)):
            total += a[(slice(None), slice(None)) + tuple(slice(o, o + s * (n - 1) + 1, s) for o, s, n in
                                                          zip(offset, strides, out_shape, strict=True))]
        return total

    if divisor_override is not None:
        divisor: Any = float(divisor_override)
    else:
        divisor = window_sums(inside_padding if count_include_pad else inside_input)
    return window_sums(padded) / divisor

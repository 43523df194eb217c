"""Structural re-parameterisation: the kernel algebra that merges linear branches into one convolution.

Networks such as RepVGG, MobileOne, ACNet or RepViT are trained with several *branches* that are
all affine functions of the same input ``x`` and are summed: ``conv3x3(x) + conv1x1(x) + BN(x)``.
Every branch is a convolution in disguise, so the sum is one convolution. This module is the only
place in the project where that algebra is written: centring a kernel in a larger one, the identity
and average-pool kernels, a per-channel constant scale, moving a kernel into a coarser grouping,
summing branches, composing a 1x1 convolution with another convolution, and the *geometry* rules
that say when the merged convolution is exact (:func:`merge_geometry`, :func:`compose_geometry`,
:func:`check_padding_shift`). A BatchNorm on a branch (or after the sum) is folded with
:func:`refimpl.fold_conv_bn`, never with a formula of its own here.

Like :mod:`refimpl.fold`, every array function is written once against the array API namespace of
its inputs and computes in the dtype it is given: a caller that wants the float64 reference passes
float64 arrays (the torch adapter converts the parameters to float64 on their own device, merges,
and rounds once to the parameter dtype). Weights use the convolution layout
``[out, in/groups, *kernel]``; a linear layer is a convolution with no spatial dims (``[out, in]``).

Notation (see ``spec/folding.md`` section 8): a branch is ``y = conv(x, W, b)`` with kernel size
``K``, stride ``S``, padding ``P`` (the same on both sides of each dim), dilation ``D`` and a padding
mode; output position ``p`` reads ``x_pad[p*S - P + k*D]`` for ``k < K``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as array_device

from .fold import _require_float, fold_conv_bn

__all__ = [
    "MERGE_REASONS",
    "MergeError",
    "ConvGeometry",
    "pad_kernel",
    "identity_kernel",
    "avg_pool_kernel",
    "scale_channels",
    "regroup_kernel",
    "add_branches",
    "compose_kernels",
    "merge_geometry",
    "compose_geometry",
    "check_padding_shift",
    "avg_pool_geometry",
    "Kernel",
    "sum_kernels",
    "chain_kernels",
]

Array = Any

#: Reason codes :class:`MergeError` carries. They are codes of the project's one reason vocabulary
#: (``adapters.report.REASONS``), which explains each; refimpl depends on no adapter, so they are listed here.
MERGE_REASONS = ("stride_mismatch", "dilation_mismatch", "padding_misaligned", "padding_mode_mismatch",
                 "groups_incompatible", "channels_mismatch", "sequential_unsupported", "zero_padding",
                 "unsupported_layer")

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class MergeError(ValueError):
    """The branches cannot be merged exactly. ``reason`` is one of :data:`MERGE_REASONS`."""

    def __init__(self, reason: str, message: str):
        if reason not in MERGE_REASONS:
            raise ValueError(f"MergeError reason must be one of {MERGE_REASONS}, got {reason!r}")
        super().__init__(message)
        self.reason = reason


def _shape(x: Array | None) -> tuple[int, ...] | None:
    return None if x is None else tuple(int(d) for d in x.shape)


def _require_weight(xp, name: str, weight: Array) -> tuple[int, ...]:
    _require_float(xp, name, weight)
    shape = tuple(int(d) for d in weight.shape)
    if len(shape) < 2:
        raise ValueError(f"{name} must have rank >= 2 ([out, in/groups, *kernel]), got shape {shape}")
    return shape


def _require_bias(xp, name: str, bias: Array | None, out_channels: int, weight_name: str,
                  weight_shape: tuple[int, ...]) -> None:
    _require_float(xp, name, bias)
    if bias is not None and _shape(bias) != (out_channels,):
        raise ValueError(f"{name} must have shape ({out_channels},) to match the output channels of {weight_name} "
                         f"{weight_shape}, got shape {_shape(bias)}")


def _require_groups(name: str, groups: int) -> None:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{name} must be a positive integer, got {groups!r}")


def _zeros_bias(xp, weight: Array) -> Array:
    return xp.zeros((int(weight.shape[0]),), dtype=weight.dtype, device=array_device(weight))


# -- geometry ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvGeometry:
    """Where a convolution's taps fall: kernel size, stride, padding (both sides), dilation, padding mode.

    One entry per spatial dim; a linear layer has none (all tuples empty).

    Examples
    --------
    >>> ConvGeometry.pointwise(2)
    ConvGeometry(kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), padding_mode='zeros')
    """

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    padding_mode: str = "zeros"

    def __post_init__(self):
        dims = len(self.kernel_size)
        for name in ("stride", "padding", "dilation"):
            value = getattr(self, name)
            if len(value) != dims:
                raise ValueError(f"ConvGeometry.{name} has {len(value)} entries but kernel_size {self.kernel_size} "
                                 f"has {dims}")
        for name, low in (("kernel_size", 1), ("stride", 1), ("padding", 0), ("dilation", 1)):
            value = getattr(self, name)
            if any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in value):
                raise ValueError(f"ConvGeometry.{name} must hold integers >= {low}, got {value!r}")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"ConvGeometry.padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}")

    @classmethod
    def pointwise(cls, dims: int) -> ConvGeometry:
        """The geometry of a 1x1 convolution (and of the identity, a BatchNorm or a per-channel scale)."""
        return cls((1,) * dims, (1,) * dims, (0,) * dims, (1,) * dims)

    @property
    def is_pointwise(self) -> bool:
        """Kernel 1 in every dim, stride 1, no padding: reads exactly the input position it writes."""
        return all(k == 1 for k in self.kernel_size) and all(s == 1 for s in self.stride) and not any(self.padding)

    @property
    def pads(self) -> bool:
        return any(p > 0 for p in self.padding)


def merge_geometry(geometries: Sequence[ConvGeometry]) -> ConvGeometry:
    """The geometry of one convolution equal to the sum of branches with these geometries.

    The merged kernel has, in each dim, the largest branch kernel ``K``; a smaller kernel ``K_b``
    is zero-padded to ``K`` and centred (:func:`pad_kernel`), which shifts its taps by
    ``(K - K_b)/2`` positions of ``D``. The sum is exact, for every input size, if and only if

    - every branch has the same stride;
    - every branch whose kernel is larger than 1 in a dim has the same dilation ``D`` there
      (a kernel of size 1 reads one position whatever its dilation);
    - ``K - K_b`` is even and ``P_b = P - D * (K - K_b) / 2`` in every dim, where ``P`` is the
      padding of the largest kernel: the centred taps then read exactly the positions the
      branch read (this is also what makes every branch's output the same size);
    - the branches that pad at all use the same padding mode (the merged convolution pads with
      it; a branch with ``P_b = 0`` never reads padding, so its mode does not matter).

    Parameters
    ----------
    geometries : sequence of ConvGeometry
        One per branch, all with the same number of spatial dims.

    Returns
    -------
    ConvGeometry
        The merged convolution's geometry.

    Raises
    ------
    MergeError
        With ``reason`` ``stride_mismatch``, ``dilation_mismatch``, ``padding_misaligned`` or
        ``padding_mode_mismatch``, and a message naming the branches and their values.
    ValueError
        No geometry, or geometries with different numbers of spatial dims.

    Examples
    --------
    A 3x3 branch with padding 1 and a 1x1 branch with padding 0 (RepVGG):

    >>> g3 = ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1))
    >>> merge_geometry([g3, ConvGeometry.pointwise(2)]) == g3
    True
    >>> try:
    ...     merge_geometry([g3, ConvGeometry((1, 1), (1, 1), (1, 1), (1, 1))])   # a 1x1 branch that pads
    ... except MergeError as error:
    ...     print(error.reason, "--", str(error).split(": ")[-1])
    padding_misaligned -- in dim 0 it needs padding 0 = 1 - 1 * (3 - 1) / 2, not 1
    """
    geometries = list(geometries)
    if not geometries:
        raise ValueError("merge_geometry needs at least one geometry")
    dims = len(geometries[0].kernel_size)
    for i, g in enumerate(geometries):
        if len(g.kernel_size) != dims:
            raise ValueError(f"branch {i} has {len(g.kernel_size)} spatial dims, branch 0 has {dims}")
    for i, g in enumerate(geometries):
        if g.stride != geometries[0].stride:
            raise MergeError("stride_mismatch", f"branch {i} has stride {g.stride} but branch 0 has stride "
                             f"{geometries[0].stride}")
    kernel, padding, dilation = [], [], []
    for d in range(dims):
        dilations = {g.dilation[d] for g in geometries if g.kernel_size[d] > 1}
        if len(dilations) > 1:
            raise MergeError("dilation_mismatch", f"in dim {d} the branches with kernels larger than 1 have "
                             f"dilations {sorted(dilations)}")
        dilation.append(dilations.pop() if dilations else 1)
        largest = max(geometries, key=lambda g: g.kernel_size[d])
        kernel.append(largest.kernel_size[d])
        padding.append(largest.padding[d])
    size = "x".join(str(k) for k in kernel)
    for i, g in enumerate(geometries):
        for d in range(dims):
            offset2 = kernel[d] - g.kernel_size[d]
            where = (f"branch {i} (kernel {g.kernel_size}, padding {g.padding}) is not centred in the merged {size} "
                     f"kernel with padding {tuple(padding)}: in dim {d}")
            if offset2 % 2:
                raise MergeError("padding_misaligned", f"{where} the kernel sizes {g.kernel_size[d]} and {kernel[d]} "
                                 "differ by an odd number of taps")
            needed = padding[d] - dilation[d] * offset2 // 2
            if g.padding[d] != needed:
                raise MergeError("padding_misaligned", f"{where} it needs padding {needed} = {padding[d]} - "
                                 f"{dilation[d]} * ({kernel[d]} - {g.kernel_size[d]}) / 2, not {g.padding[d]}")
    modes = {g.padding_mode for g in geometries if g.pads}
    if len(modes) > 1:
        raise MergeError("padding_mode_mismatch", f"the branches that pad use different padding modes {sorted(modes)}")
    mode = modes.pop() if modes else "zeros"
    return ConvGeometry(tuple(kernel), geometries[0].stride, tuple(padding), tuple(dilation), mode)


def compose_geometry(outer: ConvGeometry, inner: ConvGeometry) -> ConvGeometry:
    """The geometry of one convolution equal to ``outer(inner(x))``, where one of the two is pointwise.

    A pointwise layer (kernel 1, stride 1, no padding: :attr:`ConvGeometry.is_pointwise`) maps each
    position to itself, so the composition reads the positions the other layer reads: its geometry
    is the other one's. When the *inner* layer is the pointwise one and the outer one pads, the
    inner layer's constant term (its bias, a BatchNorm's shift) would have to be in the padding;
    whether it is zero there is a question about values, which :func:`check_padding_shift` answers.
    Two layers that both read several positions (or a strided 1x1 layer) are not composed.

    Raises
    ------
    MergeError
        ``sequential_unsupported`` when neither layer is pointwise; ``padding_misaligned`` when
        the two have different numbers of spatial dims.

    Examples
    --------
    >>> g3 = ConvGeometry((3, 3), (2, 2), (1, 1), (1, 1))
    >>> compose_geometry(g3, ConvGeometry.pointwise(2)) == g3 == compose_geometry(ConvGeometry.pointwise(2), g3)
    True
    """
    if len(outer.kernel_size) != len(inner.kernel_size):
        raise MergeError("padding_misaligned", f"the outer layer has {len(outer.kernel_size)} spatial dims, the inner "
                         f"{len(inner.kernel_size)}")
    if inner.is_pointwise:
        return outer
    if outer.is_pointwise:
        return inner
    raise MergeError("sequential_unsupported", f"neither layer of the chain is a 1x1 layer with stride 1 and no "
                     f"padding (inner kernel {inner.kernel_size} stride {inner.stride} padding {inner.padding}, "
                     f"outer kernel {outer.kernel_size} stride {outer.stride} padding {outer.padding})")


def check_padding_shift(outer_weight: Array, inner_bias: Array | None, geometry: ConvGeometry, *,
                        groups: int = 1) -> None:
    """Check that a pointwise layer's constant term survives the zero padding of the layer after it.

    ``outer(inner(x))`` with a pointwise ``inner(x) = A x + c`` and an ``outer`` that zero-pads: in
    the original, a tap of ``outer`` that lands in the padding reads ``0``; in the composed
    convolution (which pads ``x``) it reads ``A 0 + c = c``. The composition is off at that output
    by ``v[o, k] = sum_m W[o, m, k] * c[m]`` for each such tap ``k``. A tap never reads padding,
    whatever the input size, exactly when ``P <= k*D <= (K-1)*D - P`` in every dim that pads (it
    stays inside the first and the last window); every other tap reads padding at some output of
    some input size. So the composition is exact if and only if ``v[o, k] = 0`` for every output
    channel ``o`` and every tap ``k`` outside that box -- in practice, if ``c = 0``. Copying
    padding modes (reflect, replicate, circular) pad with values of ``inner(x)`` and commute with
    the pointwise map: always exact.

    Parameters
    ----------
    outer_weight : array, ``[out, mid/groups, *kernel]``
    inner_bias : array of shape (mid,), or None (zero)
    geometry : ConvGeometry
        The outer layer's geometry.
    groups : int
        The outer layer's groups.

    Raises
    ------
    MergeError
        ``zero_padding``, naming the first offending output channel and tap and ``v`` there.

    Examples
    --------
    >>> import numpy as np
    >>> g = ConvGeometry((3,), (1,), (1,), (1,))
    >>> check_padding_shift(np.ones((1, 1, 3)), np.zeros(1), g)            # no shift: exact
    >>> check_padding_shift(np.array([[[0.0, 1.0, 0.0]]]), np.ones(1), g)  # only the centre tap: exact
    >>> try:
    ...     check_padding_shift(np.ones((1, 1, 3)), np.ones(1), g)
    ... except MergeError as error:
    ...     print(error.reason, "--", str(error).split(": ")[-1])
    zero_padding -- output channel 0, tap (0,) reads the padding and would see 1 instead of 0
    """
    xp = array_namespace(outer_weight, inner_bias)
    shape = _require_weight(xp, "outer_weight", outer_weight)
    _require_groups("groups", groups)
    if len(shape) - 2 != len(geometry.kernel_size) or tuple(shape[2:]) != geometry.kernel_size:
        raise ValueError(f"outer_weight shape {shape} does not match the geometry's kernel size {geometry.kernel_size}")
    mid = shape[1] * groups
    _require_float(xp, "inner_bias", inner_bias)
    if inner_bias is not None and _shape(inner_bias) != (mid,):
        raise ValueError(f"inner_bias must have shape ({mid},) (outer_weight {shape}, groups={groups}), "
                         f"got shape {_shape(inner_bias)}")
    if inner_bias is None or geometry.padding_mode != "zeros" or not geometry.pads:
        return
    out, per_group = shape[0], shape[1]
    taps = shape[2:]
    # v[o, k] = sum over the group's mid channels m of W[o, m, k] * c[m]
    grouped_bias = xp.reshape(inner_bias, (groups, 1, per_group) + (1,) * len(taps))
    weight = xp.reshape(outer_weight, (groups, out // groups, per_group) + tuple(taps))
    shift = xp.reshape(xp.sum(weight * grouped_bias, axis=2), (out,) + tuple(taps))
    inside = None
    for d, (k, p, dil) in enumerate(zip(geometry.kernel_size, geometry.padding, geometry.dilation, strict=True)):
        if p == 0:
            continue
        offsets = xp.arange(k, device=array_device(shift)) * dil
        ok = (offsets >= p) & (offsets <= (k - 1) * dil - p)
        along = xp.reshape(ok, (1,) * (1 + d) + (k,) + (1,) * (len(taps) - d - 1))
        inside = along if inside is None else inside & along
    bad = (shift != 0) & ~inside if inside is not None else shift != 0
    if bool(xp.any(bad)):
        flat = int(xp.argmax(xp.astype(xp.reshape(bad, (-1,)), xp.int8)))
        per_channel = math.prod(taps)
        channel, rest = divmod(flat, per_channel)
        tap = []
        for k in reversed(taps):
            rest, index = divmod(rest, k)
            tap.append(index)
        tap_index = tuple(reversed(tap))
        value = float(shift[(channel,) + tap_index])
        raise MergeError("zero_padding", f"zero padding after a constant term: output channel {channel}, tap "
                         f"{tap_index} reads the padding and would see {value:.6g} instead of 0")


def avg_pool_geometry(kernel_size: Sequence[int], stride: Sequence[int] | None = None,
                      padding: Sequence[int] | None = None, *, count_include_pad: bool = True, ceil_mode: bool = False,
                      divisor_override: int | None = None) -> ConvGeometry:
    """The geometry of the convolution that equals an average pool, which must be one.

    Average pooling divides each window's sum by ``prod(kernel_size)`` (or ``divisor_override``),
    counting the zeros of its padding -- the convolution with :func:`avg_pool_kernel` and the pool's
    stride and zero padding. Two options make the divisor depend on the position, and then no
    convolution equals the pool: ``count_include_pad=False`` with padding (border windows are divided
    by the taps inside the input only) unless ``divisor_override`` fixes the divisor, and
    ``ceil_mode=True`` (a last, partial window is averaged over fewer taps, and the output has a
    size a convolution does not produce).

    Parameters
    ----------
    kernel_size, stride, padding : sequences of int, one entry per spatial dim
        As ``torch.nn.AvgPoolNd`` (``stride`` defaults to ``kernel_size``, ``padding`` to zeros).
    count_include_pad, ceil_mode, divisor_override
        As ``torch.nn.AvgPoolNd``.

    Raises
    ------
    MergeError
        ``unsupported_layer`` when the pool is not a convolution.

    Examples
    --------
    >>> avg_pool_geometry((3, 3), (1, 1), (1, 1))
    ConvGeometry(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), padding_mode='zeros')
    >>> try:
    ...     avg_pool_geometry((3,), (1,), (1,), count_include_pad=False)
    ... except MergeError as error:
    ...     print(error.reason)
    unsupported_layer
    """
    kernel = tuple(int(k) for k in kernel_size)
    strides = kernel if stride is None else tuple(int(v) for v in stride)
    pads = (0,) * len(kernel) if padding is None else tuple(int(v) for v in padding)
    if ceil_mode:
        raise MergeError("unsupported_layer", "an average pool with ceil_mode=True is not a convolution (a last, "
                         "partial window is averaged over fewer positions)")
    if not count_include_pad and any(pads) and divisor_override is None:
        raise MergeError("unsupported_layer", f"an average pool with count_include_pad=False and padding {pads} is "
                         "not a convolution (the divisor changes at the borders)")
    return ConvGeometry(kernel, strides, pads, (1,) * len(kernel), "zeros")


# -- kernels ----------------------------------------------------------------------------------

def pad_kernel(weight: Array, kernel_size: Sequence[int]) -> Array:
    """Zero-pad a kernel to a larger size, centred.

    Parameters
    ----------
    weight : array, ``[out, in/groups, *k]``
    kernel_size : sequence of int
        The new spatial size, one entry per spatial dim; each ``kernel_size[d] - k[d]`` must be
        even and non-negative (a centre must exist).

    Returns
    -------
    array, ``[out, in/groups, *kernel_size]``
        ``W'[..., (K-k)/2 + i] = W[..., i]``, zeros elsewhere.

    Examples
    --------
    >>> import numpy as np
    >>> pad_kernel(np.array([[[2.0]]]), (3,)).tolist()
    [[[0.0, 2.0, 0.0]]]
    >>> pad_kernel(np.ones((1, 1, 1, 3)), (3, 3))[0, 0].tolist()
    [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    """
    xp = array_namespace(weight)
    shape = _require_weight(xp, "weight", weight)
    size = tuple(int(k) for k in kernel_size)
    if len(size) != len(shape) - 2:
        raise ValueError(f"kernel_size {size} has {len(size)} dims but weight {shape} has {len(shape) - 2} spatial "
                         "dims")
    starts = []
    for d, (old, new) in enumerate(zip(shape[2:], size, strict=True)):
        if new < old or (new - old) % 2:
            raise ValueError(f"cannot centre a kernel of size {old} in size {new} (dim {d} of weight {shape}): the "
                             "difference must be even and >= 0")
        starts.append((new - old) // 2)
    if size == tuple(shape[2:]):
        return weight
    padded = xp.zeros(tuple(shape[:2]) + size, dtype=weight.dtype, device=array_device(weight))
    region = (slice(None), slice(None)) + tuple(slice(s, s + k) for s, k in zip(starts, shape[2:], strict=True))
    padded[region] = weight
    return padded


def identity_kernel(channels: int, spatial_dims: int, *, groups: int = 1, like: Array) -> Array:
    """The kernel of the identity map as a convolution with ``groups`` groups.

    Output channel ``o`` reads input channels ``g(o)*(C/groups) + j``; it must read its own channel
    ``o``, which is ``j = o mod (C/groups)``. With ``groups = channels`` this is the depthwise
    identity ``[C, 1, 1, ...]`` of ones; with one group, the identity matrix.

    Parameters
    ----------
    channels : int
        ``C``; the identity has as many outputs as inputs.
    spatial_dims : int
        Number of spatial dims (0 for a linear layer); the kernel is 1 in each.
    groups : int
        Must divide ``channels``.
    like : array
        An array whose namespace, dtype and device the result takes.

    Returns
    -------
    array, ``[C, C/groups, 1, ..., 1]``

    Examples
    --------
    >>> import numpy as np
    >>> identity_kernel(4, 0, groups=2, like=np.zeros(1)).tolist()
    [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    >>> identity_kernel(2, 2, groups=2, like=np.zeros(1)).shape
    (2, 1, 1, 1)
    """
    xp = array_namespace(like)
    _require_float(xp, "like", like)
    _require_groups("groups", groups)
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1 or channels % groups:
        raise ValueError(f"channels must be a positive multiple of groups={groups}, got {channels!r}")
    per_group = channels // groups
    where = array_device(like)
    own = xp.arange(channels, device=where) % per_group
    matrix = xp.astype(xp.reshape(own, (channels, 1)) == xp.reshape(xp.arange(per_group, device=where),
                                                                     (1, per_group)), like.dtype)
    return xp.reshape(matrix, (channels, per_group) + (1,) * spatial_dims)


def avg_pool_kernel(channels: int, kernel_size: Sequence[int], *, groups: int = 1, divisor: int | None = None,
                    like: Array) -> Array:
    """The kernel of average pooling as a convolution: ``1/n`` at every tap of each channel's own input.

    Average pooling with ``count_include_pad=True`` divides every window by ``n = prod(kernel_size)``
    (or by ``divisor``, torch's ``divisor_override``), padding zeros included, so it is this
    depthwise convolution with the pool's stride and padding (zeros). With ``count_include_pad=False``
    and padding the divisor changes at the borders: no convolution equals it.

    Parameters
    ----------
    channels : int
    kernel_size : sequence of int
        The pooling window.
    groups : int
        The grouping the kernel is laid out in (see :func:`identity_kernel`).
    divisor : int, optional
        Divide by this instead of ``prod(kernel_size)``.
    like : array
        Namespace, dtype and device of the result.

    Examples
    --------
    >>> import numpy as np
    >>> avg_pool_kernel(1, (2, 2), like=np.zeros(1)).tolist()
    [[[[0.25, 0.25], [0.25, 0.25]]]]
    """
    size = tuple(int(k) for k in kernel_size)
    if any(k < 1 for k in size):
        raise ValueError(f"kernel_size must be positive, got {size}")
    if divisor is not None and (isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1):
        raise ValueError(f"divisor must be a positive integer, got {divisor!r}")
    xp = array_namespace(like)
    identity = identity_kernel(channels, len(size), groups=groups, like=like)
    count = divisor if divisor is not None else math.prod(size)
    return xp.broadcast_to(identity, tuple(identity.shape[:2]) + size) / count


def scale_channels(weight: Array, bias: Array | None, scale: Array | float) -> tuple[Array, Array]:
    """A per-output-channel constant scale applied after a convolution: ``c * conv(x, W, b)``.

    ``c * (sum W x + b) = sum (c W) x + c b``, so ``W' = c_o * W[o]`` and ``b' = c_o * b_o``; exact
    for every geometry. This is a layer scale (FastViT, ConvNeXt), a ``x * gamma`` by a constant,
    or the ``-1`` of a difference.

    Parameters
    ----------
    weight : array, ``[out, in/groups, *k]``
    bias : array of shape (out,), or None (zero)
    scale : float, or array of shape () or (out,)

    Returns
    -------
    weight, bias : arrays

    Examples
    --------
    >>> import numpy as np
    >>> w, b = scale_channels(np.ones((2, 1, 1)), np.array([1.0, 2.0]), np.array([3.0, -0.5]))
    >>> w.ravel().tolist(), b.tolist()
    ([3.0, -0.5], [3.0, -1.0])
    """
    xp = array_namespace(weight, bias)
    shape = _require_weight(xp, "weight", weight)
    _require_bias(xp, "bias", bias, shape[0], "weight", shape)
    if bias is None:
        bias = _zeros_bias(xp, weight)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale!r}")
        return weight * scale, bias * scale
    _require_float(xp, "scale", scale)
    scale_shape = _shape(scale)
    if scale_shape not in ((), (shape[0],)):
        raise ValueError(f"scale must be a scalar or have shape ({shape[0]},) to match weight {shape}, got shape "
                         f"{scale_shape}")
    column = xp.reshape(scale, (-1,) + (1,) * (len(shape) - 1))
    return weight * column, bias * scale


def regroup_kernel(weight: Array, groups: int, new_groups: int) -> Array:
    """The same convolution laid out for fewer groups: ``new_groups`` must divide ``groups``.

    With ``groups`` groups, output channel ``o`` reads input channels ``g(o)*m + j`` (``m = C/groups``).
    In a coarser grouping each new group holds ``r = groups/new_groups`` old ones, so ``o`` finds its
    old inputs at offset ``(g(o) mod r) * m`` of its new group's ``r*m`` inputs; the other entries are
    zero. This is how a depthwise kernel (identity, BatchNorm, average pool) joins a grouped or dense
    convolution.

    Examples
    --------
    >>> import numpy as np
    >>> regroup_kernel(np.array([[[1.0]], [[2.0]]]), 2, 1)[:, :, 0].tolist()     # depthwise -> dense
    [[1.0, 0.0], [0.0, 2.0]]
    """
    xp = array_namespace(weight)
    shape = _require_weight(xp, "weight", weight)
    _require_groups("groups", groups)
    _require_groups("new_groups", new_groups)
    out = shape[0]
    if out % groups:
        raise ValueError(f"weight {shape} has {out} output channels, not divisible by groups={groups}")
    if groups % new_groups:
        raise ValueError(f"new_groups={new_groups} must divide groups={groups}")
    ratio = groups // new_groups
    if ratio == 1:
        return weight
    per_group, taps = shape[1], tuple(shape[2:])
    where = array_device(weight)
    old_group = xp.arange(out, device=where) // (out // groups)
    slot = xp.astype(xp.reshape(old_group % ratio, (out, 1)) == xp.reshape(xp.arange(ratio, device=where),
                                                                           (1, ratio)), weight.dtype)
    placed = (xp.reshape(slot, (out, ratio, 1) + (1,) * len(taps))
              * xp.reshape(weight, (out, 1, per_group) + taps))
    return xp.reshape(placed, (out, ratio * per_group) + taps)


def add_branches(weights: Sequence[Array], biases: Sequence[Array | None],
                 coefficients: Sequence[float] | None = None,
                 constant: Array | float | None = None) -> tuple[Array, Array]:
    """The kernel and bias of a weighted sum of convolution branches that read the same input.

    ``sum_i c_i conv(x, W_i, b_i) + constant = conv(x, sum_i c_i pad(W_i), sum_i c_i b_i + constant)``
    when every branch is centred in the largest kernel and the geometries agree (checked by
    :func:`merge_geometry`, which is about the layers, not these arrays).

    Parameters
    ----------
    weights : sequence of arrays, each ``[out, in/groups, *k_i]``
        Same ``out``, same ``in/groups`` (lay depthwise kernels out with :func:`regroup_kernel`
        first) and same number of spatial dims; each is centred in the elementwise largest size.
    biases : sequence of arrays of shape (out,) or None, one per weight
    coefficients : sequence of float, optional
        ``c_i``; ones by default (``-1`` for the right side of a difference).
    constant : float or array of shape (out,), optional
        A constant added to the sum (a scalar operand, a per-channel constant tensor).

    Returns
    -------
    weight, bias : arrays

    Examples
    --------
    RepVGG in one dim: a 3-tap branch, a 1-tap branch and the identity (exact integers):

    >>> import numpy as np
    >>> w, b = add_branches([np.array([[[1.0, 2.0, 3.0]]]), np.array([[[10.0]]]), np.ones((1, 1, 1))],
    ...                     [np.array([0.5]), None, None], coefficients=[1.0, 1.0, -1.0], constant=2.0)
    >>> w.tolist(), b.tolist()
    ([[[1.0, 11.0, 3.0]]], [2.5])
    """
    weights, biases = list(weights), list(biases)
    if not weights:
        raise ValueError("add_branches needs at least one branch")
    if len(biases) != len(weights):
        raise ValueError(f"add_branches got {len(weights)} weights but {len(biases)} biases")
    coefficients = [1.0] * len(weights) if coefficients is None else [float(c) for c in coefficients]
    if len(coefficients) != len(weights):
        raise ValueError(f"add_branches got {len(weights)} weights but {len(coefficients)} coefficients")
    xp = array_namespace(*weights, *[b for b in biases if b is not None])
    shapes = [_require_weight(xp, f"weights[{i}]", w) for i, w in enumerate(weights)]
    for i, (shape, bias) in enumerate(zip(shapes, biases, strict=True)):
        if shape[:2] != shapes[0][:2] or len(shape) != len(shapes[0]):
            raise ValueError(f"weights[{i}] has shape {shape} but weights[0] has {shapes[0]}: the branches must have "
                             "the same output channels, input channels per group and number of spatial dims")
        _require_bias(xp, f"biases[{i}]", bias, shape[0], f"weights[{i}]", shape)
    size = tuple(max(s[d] for s in shapes) for d in range(2, len(shapes[0])))
    weight = None
    bias = _zeros_bias(xp, weights[0])
    for w, b, c in zip(weights, biases, coefficients, strict=True):
        term = pad_kernel(w, size) * c
        weight = term if weight is None else weight + term
        if b is not None:
            bias = bias + b * c
    if constant is not None:
        if not isinstance(constant, (int, float)):
            _require_float(xp, "constant", constant)
            if _shape(constant) not in ((), (shapes[0][0],)):
                raise ValueError(f"constant must be a scalar or have shape ({shapes[0][0]},), got shape "
                                 f"{_shape(constant)}")
        bias = bias + constant
    return weight, bias


def compose_kernels(outer_weight: Array, outer_bias: Array | None, inner_weight: Array, inner_bias: Array | None, *,
                    groups: int = 1) -> tuple[Array, Array]:
    """The kernel and bias of ``conv(conv(x, W_in, b_in), W_out, b_out)`` where one kernel is 1x1.

    Both layers have ``groups`` groups; the inner one maps ``C`` to ``M`` channels, the outer one
    ``M`` to ``O``. Within group ``g`` (writing ``o, m, c`` for channels of that group):

    - inner pointwise (DBB's 1x1 -> kxk): ``W[o, c, k] = sum_m W_out[o, m, k] W_in[m, c]`` and
      ``b[o] = b_out[o] + sum_{m,k} W_out[o, m, k] b_in[m]``;
    - outer pointwise (kxk -> 1x1): ``W[o, c, k] = sum_m W_out[o, m] W_in[m, c, k]`` and
      ``b = b_out + W_out b_in``.

    Exact when the geometry allows it (:func:`compose_geometry`, :func:`check_padding_shift`).

    Examples
    --------
    >>> import numpy as np
    >>> outer = np.array([[[1.0, 2.0, 3.0]]])                                  # 1 -> 1, 3 taps
    >>> inner = np.array([[[2.0]]])                                            # 1 -> 1, pointwise
    >>> w, b = compose_kernels(outer, np.array([1.0]), inner, np.array([0.5]))
    >>> w.tolist(), b.tolist()
    ([[[2.0, 4.0, 6.0]]], [4.0])
    """
    xp = array_namespace(outer_weight, outer_bias, inner_weight, inner_bias)
    o_shape = _require_weight(xp, "outer_weight", outer_weight)
    i_shape = _require_weight(xp, "inner_weight", inner_weight)
    _require_groups("groups", groups)
    if len(o_shape) != len(i_shape):
        raise ValueError(f"outer_weight {o_shape} and inner_weight {i_shape} have different numbers of spatial dims")
    for name, shape in (("outer_weight", o_shape), ("inner_weight", i_shape)):
        if shape[0] % groups:
            raise ValueError(f"{name} {shape} has {shape[0]} output channels, not divisible by groups={groups}")
    mid, out, per_in = i_shape[0], o_shape[0], i_shape[1]
    if o_shape[1] * groups != mid:
        raise ValueError(f"outer_weight {o_shape} reads {o_shape[1] * groups} channels (groups={groups}) but "
                         f"inner_weight {i_shape} writes {mid}")
    _require_bias(xp, "outer_bias", outer_bias, out, "outer_weight", o_shape)
    _require_bias(xp, "inner_bias", inner_bias, mid, "inner_weight", i_shape)
    if outer_bias is None:
        outer_bias = _zeros_bias(xp, outer_weight)
    if inner_bias is None:
        inner_bias = _zeros_bias(xp, inner_weight)
    o_taps, i_taps = tuple(o_shape[2:]), tuple(i_shape[2:])
    g, mg, og = groups, mid // groups, out // groups
    if all(k == 1 for k in i_taps):
        taps = o_taps
        n = math.prod(taps)
        # [g, O/g, M/g, n] -> [g, O/g, n, M/g] @ [g, 1, M/g, C/g] -> [g, O/g, n, C/g] -> [g, O/g, C/g, n]
        a = xp.permute_dims(xp.reshape(outer_weight, (g, og, mg, n)), (0, 1, 3, 2))
        b = xp.reshape(inner_weight, (g, 1, mg, per_in))
        weight = xp.reshape(xp.permute_dims(xp.matmul(a, b), (0, 1, 3, 2)), (out, per_in) + taps)
        summed = xp.sum(xp.reshape(outer_weight, (g, og, mg, n)), axis=3)
    elif all(k == 1 for k in o_taps):
        taps = i_taps
        n = math.prod(taps)
        a = xp.reshape(outer_weight, (g, og, mg))
        weight = xp.reshape(xp.matmul(a, xp.reshape(inner_weight, (g, mg, per_in * n))), (out, per_in) + taps)
        summed = a
    else:
        raise ValueError(f"compose_kernels needs a 1x1 kernel on one side; got outer {o_shape}, inner {i_shape}")
    shift = xp.reshape(xp.matmul(summed, xp.reshape(inner_bias, (g, mg, 1))), (out,))
    return weight, outer_bias + shift


# -- whole branches ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Kernel:
    """One convolution (a linear layer: no spatial dims) equal to an affine function of an input.

    ``conv(x, weight, bias)`` with ``geometry`` and ``groups``; ``weight`` is ``[out, in/groups, *kernel]``
    and ``bias`` has shape ``(out,)``. A branch is evaluated into a Kernel step by step (a layer,
    then its BatchNorm, a scale, ...) and branches are summed (:func:`sum_kernels`) or chained
    (:func:`chain_kernels`) as Kernels.

    ``regroupable``: the kernel is made of the identity, BatchNorms, per-channel scales and average
    pools only, so every output channel reads its own input channel and it joins any grouping of
    the same channels (:func:`regroup_kernel`). A conv layer's kernel keeps its own groups.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.zeros(1)
    >>> k = Kernel.identity(2, 1, like=x).scaled(np.array([2.0, 3.0]))
    >>> k.weight.ravel().tolist(), k.groups, k.regroupable
    ([2.0, 3.0], 2, True)
    """

    weight: Array
    bias: Array
    geometry: ConvGeometry
    groups: int
    regroupable: bool = False

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.groups

    @classmethod
    def identity(cls, channels: int, spatial_dims: int, *, like: Array) -> Kernel:
        """The identity map of ``channels`` channels (depthwise, regroupable)."""
        xp = array_namespace(like)
        weight = identity_kernel(channels, spatial_dims, groups=channels, like=like)
        return cls(weight, xp.zeros((channels,), dtype=like.dtype, device=array_device(like)),
                   ConvGeometry.pointwise(spatial_dims), channels, True)

    @classmethod
    def avg_pool(cls, channels: int, geometry: ConvGeometry, *, divisor: int | None = None, like: Array) -> Kernel:
        """An average pool with the geometry :func:`avg_pool_geometry` returned (depthwise, regroupable)."""
        xp = array_namespace(like)
        weight = avg_pool_kernel(channels, geometry.kernel_size, groups=channels, divisor=divisor, like=like)
        return cls(weight, xp.zeros((channels,), dtype=like.dtype, device=array_device(like)), geometry, channels,
                   True)

    def scaled(self, scale: Array | float) -> Kernel:
        """A constant scale (a scalar or one value per output channel) applied after this kernel."""
        weight, bias = scale_channels(self.weight, self.bias, scale)
        return replace(self, weight=weight, bias=bias)

    def batch_norm(self, running_mean: Array, running_var: Array, eps: float, weight: Array | None = None,
                   bias: Array | None = None) -> Kernel:
        """An eval-mode BatchNorm applied after this kernel, folded with :func:`refimpl.fold_conv_bn`."""
        folded_weight, folded_bias = fold_conv_bn(self.weight, self.bias, running_mean, running_var, eps, weight, bias,
                                                  groups=self.groups)
        return replace(self, weight=folded_weight, bias=folded_bias)

    def regrouped(self, groups: int) -> Array:
        """This kernel's weight laid out for ``groups`` groups."""
        return self.weight if groups == self.groups else regroup_kernel(self.weight, self.groups, groups)


def sum_kernels(kernels: Sequence[Kernel], coefficients: Sequence[float] | None = None,
                constant: Array | float | None = None) -> Kernel:
    """The one convolution equal to ``sum_i c_i kernel_i(x) + constant`` (all reading the same ``x``).

    The geometry must merge exactly (:func:`merge_geometry`), all kernels must have the same input and
    output channels, and the conv layers among them the same groups; regroupable kernels (identity,
    BatchNorm, scale, pool) are laid out in those groups (:func:`regroup_kernel`), then every kernel
    is centred in the largest and summed (:func:`add_branches`).

    Raises
    ------
    MergeError
        ``channels_mismatch``, ``groups_incompatible`` or a reason of :func:`merge_geometry`.

    Examples
    --------
    RepVGG in one dim, on integers: a 3-tap conv, a 1-tap conv and the identity.

    >>> import numpy as np
    >>> g3 = ConvGeometry((3,), (1,), (1,), (1,))
    >>> k3 = Kernel(np.array([[[1.0, 2.0, 3.0]]]), np.array([0.5]), g3, 1)
    >>> k1 = Kernel(np.array([[[10.0]]]), np.array([0.0]), ConvGeometry.pointwise(1), 1)
    >>> merged = sum_kernels([k3, k1, Kernel.identity(1, 1, like=np.zeros(1))])
    >>> merged.weight.tolist(), merged.bias.tolist(), merged.geometry == g3
    ([[[1.0, 13.0, 3.0]]], [0.5], True)
    """
    kernels = list(kernels)
    if not kernels:
        raise ValueError("sum_kernels needs at least one kernel")
    outs = sorted({k.out_channels for k in kernels})
    ins = sorted({k.in_channels for k in kernels})
    if len(outs) > 1 or len(ins) > 1:
        raise MergeError("channels_mismatch", f"the branches have output channels {outs} and input channels {ins}")
    geometry = merge_geometry([k.geometry for k in kernels])
    fixed = sorted({k.groups for k in kernels if not k.regroupable})
    if len(fixed) > 1:
        raise MergeError("groups_incompatible", f"the conv branches have groups {fixed}")
    groups = fixed[0] if fixed else kernels[0].groups
    weight, bias = add_branches([k.regrouped(groups) for k in kernels], [k.bias for k in kernels], coefficients,
                                constant)
    return Kernel(weight, bias, geometry, groups, all(k.regroupable for k in kernels))


def chain_kernels(outer: Kernel, inner: Kernel) -> Kernel:
    """The one convolution equal to ``outer(inner(x))``, where one of the two is pointwise.

    The geometry composes by :func:`compose_geometry`; when ``inner`` is the pointwise one, its
    constant term must survive ``outer``'s zero padding (:func:`check_padding_shift`). Conv layers
    on both sides must have the same groups; a regroupable side takes the other's.

    Raises
    ------
    MergeError
        ``channels_mismatch``, ``groups_incompatible``, ``sequential_unsupported``, ``zero_padding``.

    Examples
    --------
    A 1x1 conv without bias, then a 3-tap conv with padding 1: exact (no constant term).

    >>> import numpy as np
    >>> inner = Kernel(np.array([[[2.0]]]), np.array([0.0]), ConvGeometry.pointwise(1), 1)
    >>> outer = Kernel(np.array([[[1.0, 2.0, 3.0]]]), np.array([1.0]), ConvGeometry((3,), (1,), (1,), (1,)), 1)
    >>> chained = chain_kernels(outer, inner)
    >>> chained.weight.tolist(), chained.bias.tolist(), chained.geometry.padding
    ([[[2.0, 4.0, 6.0]]], [1.0], (1,))
    """
    if outer.in_channels != inner.out_channels:
        raise MergeError("channels_mismatch", f"a layer reading {outer.in_channels} channels follows one writing "
                         f"{inner.out_channels}")
    geometry = compose_geometry(outer.geometry, inner.geometry)
    if outer.regroupable:
        groups = inner.groups
    elif inner.regroupable or outer.groups == inner.groups:
        groups = outer.groups
    else:
        raise MergeError("groups_incompatible", f"a conv with groups={outer.groups} follows one with "
                         f"groups={inner.groups}")
    outer_weight, inner_weight = outer.regrouped(groups), inner.regrouped(groups)
    if inner.geometry.is_pointwise:
        check_padding_shift(outer_weight, inner.bias, outer.geometry, groups=groups)
    weight, bias = compose_kernels(outer_weight, outer.bias, inner_weight, inner.bias, groups=groups)
    return Kernel(weight, bias, geometry, groups, outer.regroupable and inner.regroupable)

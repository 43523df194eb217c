"""Evaluating an affine expression of branches into one convolution (or linear layer), with refimpl.

Every step is refimpl's kernel algebra (:class:`refimpl.Kernel`) on float64 tensors on the parameters'
device: a branch's conv weight as it is, its BatchNorm folded (:meth:`refimpl.Kernel.batch_norm`), the
identity and average-pool kernels, per-channel scales, sums of branches (:func:`refimpl.sum_kernels`:
regrouping, centring, summing) and chains with a 1x1 layer (:func:`refimpl.chain_kernels`). The geometry
of every step is checked by refimpl's exactness rules (:func:`refimpl.merge_geometry`,
:func:`refimpl.compose_geometry`, :func:`refimpl.check_padding_shift`, :func:`refimpl.avg_pool_geometry`);
a step that is not exact raises :class:`Refusal` with the report's reason code. This module only reads
the torch modules (their parameters, geometry and statistics) and builds the new layer. The result is rounded
once to the parameter dtype by :func:`~adapters.torch.precision.round_once`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

import refimpl
from refimpl import Kernel

from ..graph import ModelIndex, is_same_padded_conv
from ..norms import NormInfo, NormKind, norm_stats
from ..precision import round_once
from .analysis import Apply, Expr, Scale, Source, Sum, avg_pool_geometry, layers_in

__all__ = ["Refusal", "MergedLayer", "evaluate_group"]


class Refusal(Exception):
    """The expression cannot be merged exactly: ``reason`` is a report reason code, ``detail`` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class MergedLayer:
    """The new layer for a merged group, and what it replaced."""

    module: nn.Module
    kernel_size: tuple[int, ...]
    norms: list[nn.Module]


def _weight(module: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)


def _geometry_of(layer: nn.Module, name: str) -> refimpl.ConvGeometry:
    module = cast(nn.modules.conv._ConvNd, layer)
    dims = module.weight.dim() - 2
    kernel = tuple(int(k) for k in module.kernel_size)
    dilation = tuple(int(d) for d in module.dilation)
    if is_same_padded_conv(module):
        if any(k != 1 for k in kernel):
            raise Refusal("unsupported_layer", f"{name} ({type(module).__qualname__}) pads to TensorFlow's 'SAME' size "
                          "at run time")
        padding = (0,) * dims
    elif isinstance(module.padding, str):
        if module.padding == "valid":
            padding = (0,) * dims
        else:  # 'same': total d * (k - 1) per dim, the odd unit on the right
            totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
            if any(t % 2 for t in totals):
                raise Refusal("padding_misaligned", f"{name} has padding='same' with an even kernel {kernel}: "
                              "torch pads it asymmetrically")
            padding = tuple(t // 2 for t in totals)
    else:
        padding = tuple(int(p) for p in module.padding)
    return refimpl.ConvGeometry(kernel, tuple(int(s) for s in module.stride), padding, dilation,
                                str(module.padding_mode))


class Evaluator:
    """Evaluates the expressions of one group: conv layers with ``dims`` spatial dims, or linear layers (``dims`` 0).

    ``channels`` is the number of channels of the group's source; ``ranks`` the input ranks observed with
    example inputs (a BatchNorm1d among linear layers needs 2-D input).
    """

    def __init__(self, index: ModelIndex, dims: int, channels: int, device: torch.device, dtype: torch.dtype,
                 ranks: dict[int, set[int]] | None, names):
        self.index = index
        self.dims = dims
        self.channels = channels
        self.device = device
        self.dtype = dtype
        self.ranks = ranks or {}
        self.name = names
        self._like = torch.zeros(1, dtype=dtype, device=device)

    def _tensor(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to(device=self.device, dtype=self.dtype)

    def identity(self, channels: int) -> Kernel:
        return Kernel.identity(channels, self.dims, like=self._like)

    def evaluate(self, expr: Expr) -> Kernel:
        try:
            return self._evaluate(expr)
        except refimpl.MergeError as error:
            raise Refusal(error.reason, str(error)) from None

    def _evaluate(self, expr: Expr) -> Kernel:
        if isinstance(expr, Source):
            return self.identity(self.channels)
        if isinstance(expr, Sum):
            return self._sum(expr)
        if isinstance(expr, Scale):
            inner = self._evaluate(expr.inner)
            return inner.scaled(self._per_channel(expr.factor, inner.out_channels, f"the factor {expr.text}"))
        role, module = expr.role, expr.module
        name = self.name(module)
        if role == "identity":
            return self._evaluate(expr.inner)
        if role == "norm":
            inner = self._evaluate(expr.inner)
            return self._norm(inner, module, name)
        if role == "pool":
            inner = self._evaluate(expr.inner)
            pool = Kernel.avg_pool(inner.out_channels, avg_pool_geometry(module),
                                   divisor=getattr(module, "divisor_override", None), like=self._like)
            return pool if isinstance(expr.inner, Source) else refimpl.chain_kernels(pool, inner)
        layer = self._layer(module, name, role)
        if isinstance(expr.inner, Source):
            if layer.in_channels != self.channels:
                raise Refusal("channels_mismatch", f"{name} reads {layer.in_channels} channels, the sum's input has "
                              f"{self.channels}")
            return layer
        return refimpl.chain_kernels(layer, self._evaluate(expr.inner))

    def _layer(self, module: nn.Module, name: str, role: str) -> Kernel:
        weight = _weight(module).detach().to(device=self.device, dtype=self.dtype)
        out = int(weight.shape[0])
        layer_bias = cast("torch.Tensor | None", module.bias)
        if layer_bias is None:
            bias = torch.zeros(out, dtype=self.dtype, device=self.device)
        else:
            bias = layer_bias.detach().to(device=self.device, dtype=self.dtype)
        if role == "linear":
            return Kernel(weight, bias, refimpl.ConvGeometry.pointwise(0), 1)
        return Kernel(weight, bias, _geometry_of(module, name), int(cast(nn.modules.conv._ConvNd, module).groups))

    def _norm(self, inner: Kernel, module: nn.Module, name: str) -> Kernel:
        info = self.index.norms.get(id(module))
        if not isinstance(info, NormInfo):
            raise Refusal("unknown_norm", f"{name} ({type(module).__qualname__}) is not a recognised norm")
        if self.dims == 0:
            if info.kind != NormKind.BATCH_NORM:
                raise Refusal("unsupported_layer", f"{name} ({type(module).__qualname__}) normalises 4-D input only")
            if self.ranks.get(id(module)) != {2}:
                raise Refusal("rank_unknown", f"{name} normalises axis 1, the linear layers the last axis: the same "
                              "only for 2-D input, not proven (pass example_inputs)")
        elif info.kind != NormKind.BATCH_NORM and self.dims != 2:
            raise Refusal("unsupported_layer", f"{name} ({type(module).__qualname__}) normalises 4-D input only")
        stats = norm_stats(module, info)
        try:
            return inner.batch_norm(self._tensor(stats.mean), self._tensor(stats.var), stats.eps,
                                    self._tensor(stats.weight), self._tensor(stats.bias))
        except (ValueError, TypeError) as error:
            raise type(error)(f"cannot merge {name} ({type(module).__qualname__}({info.num_features})): "
                              f"{error}") from error

    def _per_channel(self, value: float | torch.Tensor, channels: int, what: str) -> float | torch.Tensor:
        """A constant that multiplies or is added to a tensor of ``channels`` channels, as a scalar or (channels,)."""
        if not isinstance(value, torch.Tensor):
            return float(value)
        value = value.to(device=self.device, dtype=self.dtype)
        shape = tuple(value.shape)
        if value.numel() == 1 and len(shape) <= (1 if self.dims == 0 else self.dims + 2):
            return value.reshape(())
        if self.dims == 0:
            ok = len(shape) >= 1 and all(s == 1 for s in shape[:-1]) and shape[-1] == channels and len(shape) <= 2
        else:
            rank = self.dims + 2
            padded = (1,) * (rank - len(shape)) + shape if len(shape) <= rank else None
            ok = padded is not None and padded[1] == channels and all(s == 1 for i, s in enumerate(padded) if i != 1)
        if not ok:
            axis = "last" if self.dims == 0 else "channel (1)"
            raise Refusal("constant_not_per_channel", f"{what} has shape {shape}: not one value per {axis}-axis "
                          f"channel of a tensor with {channels} channels")
        return value.reshape(channels)

    def _sum(self, expr: Sum) -> Kernel:
        kernels = [self._evaluate(term) for _, term in expr.terms]
        outs = {k.out_channels for k in kernels}
        constant = None
        for c in expr.constants if len(outs) == 1 else ():  # else sum_kernels refuses: channels_mismatch
            value = self._per_channel(c.value, next(iter(outs)), f"the constant {c.text}")
            constant = value if constant is None else constant + value
        return refimpl.sum_kernels(kernels, [c for c, _ in expr.terms], constant)


def _source_channels(expr: Expr) -> int | None:
    """The channel count of the expression's source, read off the first layer that reads it directly."""
    if isinstance(expr, Source):
        return None
    if isinstance(expr, Sum):
        for _, term in expr.terms:
            found = _source_channels(term)
            if found is not None:
                return found
        return None
    if isinstance(expr, Apply) and _reads_source(expr.inner):
        if expr.role in ("conv", "linear"):
            weight = _weight(expr.module)
            groups = int(cast(nn.modules.conv._ConvNd, expr.module).groups) if expr.role == "conv" else 1
            return int(weight.shape[1]) * groups
        if expr.role == "norm":
            return int(cast(torch.Tensor, expr.module.running_mean).numel())
    return _source_channels(expr.inner)


def _reads_source(expr: Expr) -> bool:
    """Whether ``expr`` keeps the source's channels: the source through identities, scales and pools."""
    while True:
        if isinstance(expr, Source):
            return True
        if isinstance(expr, Scale) or (isinstance(expr, Apply) and expr.role in ("identity", "pool")):
            expr = expr.inner
            continue
        return False


def evaluate_group(index: ModelIndex, expr: Expr, ranks: dict[int, set[int]] | None, names) -> MergedLayer:
    """The merged layer of a group's expression (every term reads the same source).

    Raises :class:`Refusal` when the merge is not exact (or not supported), and ValueError/TypeError for
    invalid parameters (a negative running variance, ...) naming the layer.
    """
    layers = layers_in(expr, ("conv", "linear"))
    if not layers:
        raise Refusal("no_fusable_neighbour", "no conv or linear layer among the branches")
    kinds = {("linear" if a.role == "linear" else f"conv{_weight(a.module).dim() - 2}d") for a in layers}
    if len(kinds) > 1:
        raise Refusal("unsupported_layer", f"the branches mix {' and '.join(sorted(kinds))} layers")
    dims = 0 if layers[0].role == "linear" else _weight(layers[0].module).dim() - 2
    weights = [_weight(a.module) for a in layers]
    dtypes = {w.dtype for w in weights}
    devices = {w.device for w in weights}
    if len(dtypes) > 1 or len(devices) > 1:
        raise Refusal("unsupported_layer", f"the branches' layers have dtypes {sorted(map(str, dtypes))} and devices "
                      f"{sorted(map(str, devices))}")
    dtype, device = dtypes.pop(), devices.pop()
    if not dtype.is_floating_point:
        raise Refusal("unsupported_layer", f"the branches' layers have dtype {dtype}")
    channels = _source_channels(expr)
    if channels is None:
        raise Refusal("channels_mismatch", "no layer of the branches reads the sum's input directly")
    fold_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    evaluator = Evaluator(index, dims, channels, device, fold_dtype, ranks, names)
    kernel = evaluator.evaluate(expr)
    if kernel.regroupable:
        raise Refusal("no_fusable_neighbour", "no conv or linear layer among the branches")
    return MergedLayer(_build_layer(kernel, layers, dtype, device, dims, names),
                       kernel.geometry.kernel_size, [a.module for a in layers_in(expr, ("norm",))])


def _build_layer(kernel: Kernel, layers: list[Apply], dtype: torch.dtype, device: torch.device, dims: int,
                 names) -> nn.Module:
    weight = round_once(kernel.weight, dtype)
    bias = round_once(kernel.bias, dtype)
    if not bool(torch.isfinite(weight).all()) or not bool(torch.isfinite(bias).all()):
        largest = max(float(kernel.weight.abs().max()), float(kernel.bias.abs().max()) if kernel.bias.numel() else 0.0)
        raise Refusal("overflow", f"the merged weight or bias reaches {largest:.3g}, beyond the largest finite {dtype} "
                      f"({torch.finfo(dtype).max:.3g})")
    template = _weight(max((a.module for a in layers), key=lambda m: _weight(m)[0].numel()))
    g = kernel.geometry
    if dims == 0:
        layer: nn.Module = nn.utils.skip_init(nn.Linear, kernel.in_channels, kernel.out_channels, bias=True,
                                             device=device, dtype=dtype)
    else:
        conv_class = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        layer = nn.utils.skip_init(conv_class, kernel.in_channels, kernel.out_channels, g.kernel_size, stride=g.stride,
                                   padding=g.padding, dilation=g.dilation, groups=kernel.groups, bias=True,
                                   padding_mode=g.padding_mode, device=device, dtype=dtype)
    if dims == 2 and template.is_contiguous(memory_format=torch.channels_last) and not template.is_contiguous():
        weight = weight.contiguous(memory_format=torch.channels_last)
    layer.weight = nn.Parameter(weight, requires_grad=template.requires_grad)
    layer.bias = nn.Parameter(bias, requires_grad=template.requires_grad)
    return layer

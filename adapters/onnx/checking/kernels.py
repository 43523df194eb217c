"""Kernels that replace the faulty ones of onnx's ReferenceEvaluator in the float64 reference run: BatchNormalization
(every opset, inference and training), ConvTranspose (group > 1), MaxPool (ceil_mode with unit strides) and Upsample
(opsets 7-9, as the Resize it is); see spec/onnx.md.
"""


from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from onnx import helper
from onnx.reference.op_run import OpRun
from onnx.reference.ops import op_resize as _resize_ops
from onnx.reference.ops.op_max_pool import MaxPool as _EvaluatorMaxPool

import refimpl


def _attributes(op: OpRun, given: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes the node sets, those referring to a function's attribute resolved (``given``: the
    evaluator's keyword arguments, whose defaults come from the newest schema only and are not used)."""
    found = {}
    for attribute in op.onnx_node.attribute:
        if not attribute.ref_attr_name:
            found[attribute.name] = helper.get_attribute_value(attribute)
        elif given.get(attribute.name) is not None:
            found[attribute.name] = given[attribute.name]
    return found


class BatchNormalization(OpRun):
    """``BatchNormalization`` of every opset (7 onwards), backed by :func:`refimpl.batch_norm`.

    Inference mode normalises with the running statistics. Training mode -- ``training_mode=1``
    (opset 14+), more than one output (opsets 7-13, whose schema says the number of outputs selects
    the mode), ``is_test=0`` (opset 6) -- normalises with the batch statistics (population variance)
    and returns the updated running statistics, as the specification describes.
    """

    op_domain = ""

    def _run(self, x, scale, bias, mean, var, **given):
        attributes = _attributes(self, given)
        epsilon = float(attributes.get("epsilon", 1e-5))
        momentum = float(attributes.get("momentum", 0.9))
        version = int(self.run_params.get("opsets", {}).get("", 15))
        outputs = list(self.onnx_node.output)
        if version >= 14:
            training = bool(attributes.get("training_mode", 0))
        elif version >= 7:
            training = sum(1 for name in outputs if name) > 1
        else:
            training = not attributes.get("is_test", 0)
        x = np.asarray(x)
        params = [np.asarray(p, dtype=np.float64) for p in (scale, bias, mean, var)]
        channels = x.shape[1]
        per_activation = any(p.size != channels for p in params) or attributes.get("spatial", 1) == 0
        if per_activation:
            # spatial=0 (opsets 7-8): one statistic per activation, shaped like x without its batch axis.
            flat_x = x.reshape(x.shape[0], -1)
            params = [np.broadcast_to(p.reshape(p.shape + (1,) * (x.ndim - 1 - p.ndim)), x.shape[1:]).reshape(-1)
                      for p in params]
        else:
            flat_x = x
        scale_v, bias_v, mean_v, var_v = params
        if training:
            axes = tuple(i for i in range(flat_x.ndim) if i != 1)
            batch_mean = flat_x.astype(np.float64).mean(axis=axes)
            batch_var = flat_x.astype(np.float64).var(axis=axes)
            y = refimpl.batch_norm(flat_x, batch_mean, batch_var, scale_v, bias_v, eps=epsilon)
        else:
            y = refimpl.batch_norm(flat_x, mean_v, var_v, scale_v, bias_v, eps=epsilon)
        y = y.reshape(x.shape).astype(x.dtype, copy=False)
        if not training:
            return (y,)
        running_mean = mean_v * momentum + batch_mean * (1 - momentum)
        running_var = var_v * momentum + batch_var * (1 - momentum)
        extra = [running_mean, running_var, batch_mean, batch_var]
        if per_activation:
            extra = [e.reshape(np.shape(mean)) if e.size == np.size(mean) else e for e in extra]
        results = [y, *(e.astype(x.dtype) for e in extra)]
        return tuple(results[:len(outputs)])


def _conv_transpose_pads(attributes: Mapping[str, Any], spatial: Sequence[int], kernel: Sequence[int],
                         strides: Sequence[int], dilations: Sequence[int], output_padding: Sequence[int]
                         ) -> tuple[list[int], list[int]]:
    """ONNX ConvTranspose's (begin, end) pads per spatial dim, from pads, output_shape or auto_pad."""
    dims = len(spatial)
    full = [s * (n - 1) + op + (k - 1) * d + 1
            for n, s, d, k, op in zip(spatial, strides, dilations, kernel, output_padding, strict=True)]
    auto_pad = attributes.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    output_shape = attributes.get("output_shape")
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if output_shape is None:
            output_shape = [n * s for n, s in zip(spatial, strides, strict=True)]
        output_shape = list(output_shape)[-dims:]
        total = [f - o for f, o in zip(full, output_shape, strict=True)]
        if auto_pad == "SAME_UPPER":
            return [t // 2 for t in total], [t - t // 2 for t in total]
        return [t - t // 2 for t in total], [t // 2 for t in total]
    if auto_pad == "VALID":
        return [0] * dims, [0] * dims
    pads = list(attributes.get("pads", [0] * (2 * dims)))
    return pads[:dims], pads[dims:]


class ConvTranspose(OpRun):
    """``ConvTranspose`` of every opset, any group, backed by :func:`refimpl.conv_transpose`.

    ONNX pads may differ at the two ends of a dim, and ``output_shape``/``auto_pad`` derive them
    from the requested size: the full scatter is computed with :func:`refimpl.conv_transpose`
    (no padding), then cropped by the begin/end pads, ``output_padding`` adding zeros at the end.
    """

    op_domain = ""

    def _run(self, x, w, b=None, **given):
        attributes = _attributes(self, given)
        x = np.asarray(x)
        w = np.asarray(w)
        dims = w.ndim - 2
        spatial = x.shape[2:]
        kernel = w.shape[2:]
        group = int(attributes.get("group", 1))
        strides = list(attributes.get("strides", [1] * dims))
        dilations = list(attributes.get("dilations", [1] * dims))
        output_padding = list(attributes.get("output_padding", [0] * dims))
        begin, end = _conv_transpose_pads(attributes, spatial, kernel, strides, dilations, output_padding)
        scatter = refimpl.conv_transpose(x, w, None, stride=strides, groups=group, dilation=dilations)
        full = [size + op for size, op in zip(scatter.shape[2:], output_padding, strict=True)]
        out_shape = [f - pb - pe for f, pb, pe in zip(full, begin, end, strict=True)]
        if min(out_shape) < 1:
            raise ValueError(f"ConvTranspose {self.onnx_node.name!r}: empty output {out_shape} (x {x.shape}, "
                             f"w {w.shape}, pads {begin + end})")
        y = np.zeros(scatter.shape[:2] + tuple(out_shape))
        # Output index j is index j + begin of the (output-padded) scatter; negative pads add zeros.
        source, target = [], []
        for size, length, pb in zip(scatter.shape[2:], out_shape, begin, strict=True):
            lo, hi = max(pb, 0), min(size, pb + length)
            source.append(slice(lo, max(hi, lo)))
            target.append(slice(lo - pb, max(hi, lo) - pb))
        everything = (slice(None), slice(None))
        y[everything + tuple(target)] = scatter[everything + tuple(source)]
        if b is not None:
            y += np.asarray(b, dtype=np.float64).reshape((1, -1) + (1,) * dims)
        return (y.astype(x.dtype, copy=False),)


class MaxPool(_EvaluatorMaxPool):
    """``MaxPool`` with ``ceil_mode=1`` routed to the evaluator's general kernel.

    The evaluator's shortcut for unit strides and dilations sizes a ``ceil_mode`` output as if the
    last windows could start in the end padding (kernel 3, stride 1, pads 1 on 8 values gives 10
    outputs, not 8: Inception's and GoogLeNet's branch pools then fail to concatenate); its general
    kernel (1- to 3-D) drops windows that would start in the end padding, as the specification says.
    """

    op_domain = ""

    # The signature of onnx's own MaxPool._run (which already differs from CommonPool's).
    def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, pads=None,  # type: ignore[override]
             storage_order=None, strides=None):
        rank = len(kernel_shape) if kernel_shape is not None else 0
        if ceil_mode and 1 <= rank <= 3 and (auto_pad in (None, "NOTSET", b"NOTSET")):
            return self._max_pool(x, auto_pad=auto_pad, ceil_mode=ceil_mode, dilations=dilations or [1] * rank,
                                  kernel_shape=kernel_shape, pads=pads, storage_order=storage_order,
                                  strides=strides or [1] * rank)
        return super()._run(x, auto_pad=auto_pad, ceil_mode=ceil_mode, dilations=dilations,
                            kernel_shape=kernel_shape, pads=pads, storage_order=storage_order, strides=strides)


class Upsample(OpRun):
    """``Upsample`` (opsets 7 to 9; deprecated since 10), nearest and linear, with the evaluator's Resize kernel.

    The evaluator implements only nearest with integer scales (FCN heads exported at opset 9 upsample
    bilinearly by 8). Upsample is Resize with ``coordinate_transformation_mode="asymmetric"`` (an output
    index i reads the input at i / scale), nearest rounding down, output size floor(size * scale), as the
    version converter's Upsample-9 -> Resize-10 adapter maps it.
    """

    op_domain = ""

    def _run(self, x, scales=None, **given):
        attributes = _attributes(self, given)
        factors = np.asarray(scales if scales is not None else attributes["scales"], dtype=np.float64)
        mode = attributes.get("mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if mode == "nearest":
            def coefficients(ratio, scale):
                return _resize_ops._nearest_coeffs(ratio, mode="floor")
        elif mode in ("linear", "bilinear"):
            coefficients = _resize_ops._linear_coeffs
        else:
            raise ValueError(f"Upsample {self.onnx_node.name!r}: unknown mode {mode!r}")
        y = _resize_ops._interpolate_nd(x, coefficients, scale_factors=list(factors),
                                        coordinate_transformation_mode="asymmetric")
        return (np.asarray(y, dtype=x.dtype),)


#: The kernels that replace the evaluator's own in the float64 reference.
REFERENCE_KERNELS: tuple[type[OpRun], ...] = (BatchNormalization, ConvTranspose, MaxPool, Upsample)

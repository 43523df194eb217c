"""Rounding a float64 fold result once to the parameter dtype.

The precision policy (``spec/folding.md``): fold in float64, round *once* to the parameter
dtype. torch's own float64 -> float16/bfloat16 conversion goes through float32 and so rounds
twice: ``1 + 2**-11 + 2**-40`` becomes float32's ``1 + 2**-11``, an fp16 tie, which rounds to even
(1.0) although the value is above the tie. Rounding to float32 *to odd* first (of the two float32
neighbours of an inexact value, take the one with an odd last bit) and then to nearest is
correctly rounded whenever the intermediate format has at least two more bits than the target
(Boldo & Melquiond, "Emulation of FMA and correctly rounded sums: proved algorithms using
rounding to odd", IEEE TC 2008); float32 has 13 more than fp16 and 16 more than bf16.
"""

from __future__ import annotations

import torch

__all__ = ["round_once", "scaled_copy"]

_VIA_FLOAT32 = (torch.float16, torch.bfloat16)


def round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float64) rounded to nearest-even in ``dtype`` with a single rounding.

    >>> x = torch.tensor([1 + 2**-11 + 2**-40], dtype=torch.float64)
    >>> x.to(torch.float16).item(), round_once(x, torch.float16).item()
    (1.0, 1.0009765625)
    """
    if x.dtype != torch.float64 or dtype not in _VIA_FLOAT32:
        return x.to(dtype)  # a single conversion: already one rounding
    nearest = x.to(torch.float32)
    inexact = nearest.to(torch.float64) != x
    even = (nearest.view(torch.int32) & 1) == 0
    # Move the even neighbour one float32 step toward x: it becomes the odd neighbour.
    toward = torch.where(x > nearest.to(torch.float64), torch.inf, -torch.inf).to(torch.float32)
    odd = torch.where(inexact & even, torch.nextafter(nearest, toward), nearest)
    return odd.to(dtype)


_CHUNK_ELEMENTS = 1 << 18


def scaled_copy_buffer_size() -> int:
    """Elements of the float64 work buffer :func:`scaled_copy` needs (one block of rows)."""
    return _CHUNK_ELEMENTS


def scaled_copy(weight: torch.Tensor, factor: torch.Tensor, *, out: torch.Tensor | None = None,
                buffer: torch.Tensor | None = None) -> torch.Tensor:
    """``weight * factor`` computed in ``factor``'s dtype (float64) and rounded once to ``weight``'s dtype.

    ``factor`` (from ``refimpl``) broadcasts against ``weight`` and varies only along its leading
    axes. The product runs a block of rows at a time through a small float64 buffer that stays
    in cache: a mixed float32 x float64 multiply is not vectorised on CPU (~10x slower), and a
    full-size float64 temporary per layer costs more in memory traffic than the arithmetic.
    ``out`` may be ``weight`` itself (each block is read before it is written); by default a new
    tensor with the weight's memory format (e.g. channels_last). ``buffer``: a reusable float64
    tensor of at least :func:`scaled_copy_buffer_size` elements.
    """
    if out is None:
        out = torch.empty_like(weight, memory_format=torch.preserve_format)
    rows = weight.shape[0]
    per_row = weight[0].numel() if rows else 0
    if rows == 0 or per_row == 0:
        return out
    step = max(1, _CHUNK_ELEMENTS // per_row)
    needed = min(rows, step) * per_row
    if buffer is None or buffer.numel() < needed:
        buffer = torch.empty(needed, dtype=factor.dtype, device=weight.device)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = buffer[:(stop - start) * per_row].view((stop - start,) + tuple(weight.shape[1:]))
        block.copy_(weight[start:stop]).mul_(factor[start:stop])
        # copy_ from float64 rounds once for float32 targets; fp16/bf16 need round_once's detour.
        out[start:stop].copy_(round_once(block, weight.dtype) if weight.dtype in _VIA_FLOAT32 else block)
    return out

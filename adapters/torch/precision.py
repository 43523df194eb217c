"""Rounding a float64 fold result once to the parameter dtype.

The precision policy (``spec/folding.md``): fold in float64, round *once* to the parameter
dtype. torch's own float64 -> float16/bfloat16 conversion goes through float32 and so rounds
twice: ``1 + 2**-11 + 2**-40`` becomes float32's ``1 + 2**-11``, an fp16 tie, which rounds to even
(1.0) although the value is above the tie.

The fix is rounding *to odd* first: of the two neighbours of an inexact value in a format with
``k >= 2`` more significand bits than the target, take the one whose last bit is odd; rounding that
to nearest-even in the target is correctly rounded (Boldo & Melquiond, "Emulation of FMA and
correctly rounded sums: proved algorithms using rounding to odd", IEEE TC 2008). The odd value
is never a midpoint of the target and lies strictly between the same two midpoints as ``x``.

Here the intermediate has exactly ``k = 2`` more bits than the target (13 significand bits for
fp16, 10 for bf16) and is computed on the float64 bit pattern with five integer operations on
whole tensors: truncate the dropped low bits, and set the lowest kept bit if any of them was
nonzero. Such a value is exactly representable in float32 wherever the target can be nonzero
(the 13- or 10-bit grid is at least as coarse as float32's, subnormals included), so torch's
conversion through float32 then rounds only once, and the intermediate grid stays at least two
bits finer than the target's everywhere, fp16 and bf16 subnormals included. Signs, zeros,
infinities and NaNs pass through (a NaN keeps a nonzero significand). This costs a few passes
over a block that stays in cache; the float32-odd-rounding written with comparisons and
``torch.where`` costs ten times more on CPU.
"""

from __future__ import annotations

import math

import torch

__all__ = ["round_once", "rounds_to_finite", "rounds_to_odd", "scaled_copy", "scaled_copy_buffer_size"]

#: float64 significand bits dropped by the round-to-odd step: 52 - (target significand bits + 2 - 1).
_DROPPED_BITS = {torch.float16: 52 - 12, torch.bfloat16: 52 - 9}


def _round_to_odd_(bits: torch.Tensor, dropped: int, scratch: torch.Tensor) -> None:
    """In place: float64 values viewed as int64 ``bits``, rounded to odd with ``dropped`` low bits cleared.

    ``scratch``: an int64 tensor of ``bits``' shape (overwritten).
    """
    low = (1 << dropped) - 1
    torch.bitwise_and(bits, low, out=scratch)   # the dropped bits
    scratch.neg_()                              # nonzero -> every bit from `dropped` up is set; zero stays 0
    scratch.bitwise_and_(1 << dropped)          # the sticky bit, at the last kept place
    bits.bitwise_and_(~low)                     # truncate toward zero (sign-magnitude: same as the magnitude)
    bits.bitwise_or_(scratch)                   # odd last place iff anything was dropped


def round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float64) rounded to nearest-even in ``dtype`` with a single rounding.

    >>> x = torch.tensor([1 + 2**-11 + 2**-40], dtype=torch.float64)
    >>> x.to(torch.float16).item(), round_once(x, torch.float16).item()
    (1.0, 1.0009765625)
    """
    dropped = _DROPPED_BITS.get(dtype)
    if x.dtype != torch.float64 or dropped is None:
        return x.to(dtype)  # a single conversion: already one rounding
    bits = x.detach().contiguous().view(torch.int64).clone()
    _round_to_odd_(bits, dropped, torch.empty_like(bits))
    return bits.view(torch.float64).to(dtype)


def rounds_to_finite(value: float, dtype: torch.dtype) -> bool:
    """Whether float64 ``value`` (a magnitude, or anything) rounds to a finite ``dtype`` value (no tensor made).

    Rounding to nearest gives inf from the midpoint between the largest finite value and the next
    power of two on (the tie goes to that power's even significand, which is inf).

    >>> rounds_to_finite(65519.99, torch.float16), rounds_to_finite(65520.0, torch.float16)
    (True, False)
    """
    if not math.isfinite(value):
        return False
    if not dtype.is_floating_point or dtype == torch.float64:
        return True
    largest = float(torch.finfo(dtype).max)
    _, exponent = math.frexp(largest)          # largest = m * 2**exponent, 0.5 <= m < 1
    half_step = torch.finfo(dtype).eps * 2.0 ** (exponent - 2)  # half a unit in the last place of `largest`
    return abs(value) < largest + half_step


_CHUNK_ELEMENTS = 1 << 18          # 2 MB of float64: fast, and small beside a large model
_SMALLEST_CHUNK = 1 << 12
_WORK_SHARE = 0.05                 # the work buffers' largest share of the bytes of the weights they scale


def scaled_copy_buffer_size(weight_bytes: int | None = None, rounds_to_odd: bool = False) -> int:
    """Elements per block of the work buffers :func:`scaled_copy` uses (one block of rows at a time).

    Larger blocks are faster (fewer, longer passes), up to ``2**18``; given the bytes of the weights
    to be scaled, the block shrinks (by halves, down to ``2**12``) until the buffers -- float64, plus
    an int64 scratch for fp16/bf16 weights (``rounds_to_odd``) -- take at most 5% of them.
    """
    if weight_bytes is None:
        return _CHUNK_ELEMENTS
    limit = _WORK_SHARE * weight_bytes / (16 if rounds_to_odd else 8)
    elements = _CHUNK_ELEMENTS
    while elements > _SMALLEST_CHUNK and elements > limit:
        elements //= 2
    return elements


def rounds_to_odd(dtype: torch.dtype) -> bool:
    """Whether rounding a float64 value to ``dtype`` goes through :func:`round_once`'s round-to-odd step."""
    return dtype in _DROPPED_BITS


def scaled_copy(weight: torch.Tensor, factor: torch.Tensor, *, out: torch.Tensor | None = None,
                buffer: torch.Tensor | None = None, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``weight * factor`` computed in ``factor``'s dtype (float64) and rounded once to ``weight``'s dtype.

    ``factor`` (from ``refimpl``) broadcasts against ``weight`` and varies only along its leading
    axes. The product runs a block of rows at a time through a small float64 buffer that stays
    in cache: a mixed float32 x float64 multiply is not vectorised on CPU (~10x slower), and a
    full-size float64 temporary per layer costs more in memory traffic than the arithmetic.
    ``out`` may be ``weight`` itself (each block is read before it is written); by default a new
    tensor with the weight's memory format (e.g. channels_last). ``buffer`` and ``scratch``:
    reusable float64 and int64 tensors (see :func:`scaled_copy_buffer_size`); the buffer's size sets
    the block (at least one row), the scratch is used for fp16/bf16 weights only.
    """
    if out is None:
        out = torch.empty_like(weight, memory_format=torch.preserve_format)
    rows = weight.shape[0]
    per_row = weight[0].numel() if rows else 0
    if rows == 0 or per_row == 0:
        return out
    step = max(1, (_CHUNK_ELEMENTS if buffer is None else buffer.numel()) // per_row)
    needed = min(rows, step) * per_row
    if buffer is None or buffer.numel() < needed:
        buffer = torch.empty(needed, dtype=factor.dtype, device=weight.device)
    dropped = _DROPPED_BITS.get(weight.dtype) if factor.dtype == torch.float64 else None
    if dropped is not None and (scratch is None or scratch.numel() < needed):
        scratch = torch.empty(needed, dtype=torch.int64, device=weight.device)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        count = (stop - start) * per_row
        shape = (stop - start,) + tuple(weight.shape[1:])
        block = buffer[:count].view(shape)
        if weight.dtype == torch.float16 and weight.device.type == "cpu" and scratch is not None:
            # CPU float16 -> float64 is not vectorised; through float32 (both exact) it is 3x faster.
            widened = scratch[:count].view(torch.float32)[:count].view(shape)
            block.copy_(widened.copy_(weight[start:stop]))
        else:
            block.copy_(weight[start:stop])
        block.mul_(factor[start:stop])
        if dropped is not None:
            assert scratch is not None
            _round_to_odd_(block.view(torch.int64), dropped, scratch[:count].view(shape))
        # A float32 target rounds once in this copy; an fp16/bf16 target gets an odd-rounded value
        # that float32 holds exactly, so the copy (through float32) rounds once as well.
        out[start:stop].copy_(block)
    return out

"""Window geometry shared by convolution and pooling: sizes, pairs and where a window cell reads.

Notation as in :mod:`tinynet.nn.conv`: input H x W, window KH x KW, strides
SH, SW, zero (or -inf) padding PH, PW on each side, output OH x OW::

    OH = (H + 2*PH - KH) // SH + 1

Output position ``o`` of window cell ``k`` reads input index ``SH*o + k - PH``;
:func:`kernel_offsets` gives, for every cell, the range of output positions
for which that index falls inside the image, so that no layer ever builds a
padded copy of its input.
"""
from __future__ import annotations

import numbers

__all__ = ["positive_int", "pair", "conv_output_size", "kernel_offsets"]


def _int(value, name: str, owner: str = "", what: str = "an int or a pair of ints") -> int:
    where = f"{owner}: " if owner else ""
    # bool is an Integral too, but Conv2d(3, 4, True) is a mistake, not a 1x1 kernel.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}{name} must be {what}, got {value!r} "
                        f"({type(value).__name__}); sizes are never rounded")
    return int(value)


def positive_int(value, name: str, owner: str = "") -> int:
    """``value`` as an int, refusing floats (2.7 is not silently 2) and non-positive numbers."""
    number = _int(value, name, owner, what="an int")
    if number <= 0:
        raise ValueError(f"{owner + ': ' if owner else ''}{name} must be positive, got {value!r}")
    return number


def pair(value, name: str = "value", owner: str = "") -> tuple:
    """``3 -> (3, 3)``; ``(3, 1)`` stays; floats, bools and other lengths are errors."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{owner + ': ' if owner else ''}{name} must be an int or a pair of ints, "
                             f"got {value!r}")
        a, b = value
    else:
        a = b = value
    return _int(a, name, owner), _int(b, name, owner)


def conv_output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """``(size + 2*pad - kernel) // stride + 1``."""
    return (size + 2 * pad - kernel) // stride + 1


def _inside(offset: int, pad: int, stride: int, size: int, out_size: int):
    """Output positions ``[lo, hi)`` whose input index ``stride*o + offset - pad`` lies in ``[0, size)``.

    Returns ``(lo, hi, first)`` with ``first`` the input index read at ``lo``.
    """
    lo = max(0, -((offset - pad) // stride))  # ceil((pad - offset) / stride)
    hi = min(out_size, (size - 1 + pad - offset) // stride + 1)
    hi = max(hi, lo)
    return lo, hi, stride * lo + offset - pad


def kernel_offsets(kernel, stride, padding, in_size, out_size):
    """For every kernel offset (i, j), where it reads inside the image.

    Yields ``(i, j, out_rows, out_cols, in_rows, in_cols)``: the output
    positions (slices of OH and OW) whose window cell (i, j) falls on a real
    pixel, and the strided slices of the input (of H and W) they read.
    Positions outside ``out_rows x out_cols`` read padding.
    """
    (kh, kw), (sh, sw), (ph, pw), (h, w), (oh, ow) = kernel, stride, padding, in_size, out_size
    for i in range(kh):
        y0, y1, r0 = _inside(i, ph, sh, h, oh)
        for j in range(kw):
            x0, x1, c0 = _inside(j, pw, sw, w, ow)
            yield (i, j, slice(y0, y1), slice(x0, x1),
                   slice(r0, r0 + sh * (y1 - y0), sh), slice(c0, c0 + sw * (x1 - x0), sw))

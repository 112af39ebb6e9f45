"""Pooling: max, average and global (adaptive) average.

Notation as in :mod:`tinynet.nn.conv`: input (N, C, H, W), window KH x KW,
strides SH, SW, padding PH, PW, output (N, C, OH, OW) with
``OH = (H + 2*PH - KH) // SH + 1``.

Max pooling::

    out[n, c, y, x] = max_{i,j} xpad[n, c, SH*y + i, SW*x + j]

It is padded with ``-inf``, so a padded cell never wins.  Its gradient is
routed: the whole of ``dout[n, c, y, x]`` goes to the input cell that held the
maximum, and nothing to the others.  **Ties**: the first maximum in row-major
window order (smallest i, then smallest j) takes the gradient, as in PyTorch's
CPU kernel.  When windows overlap (stride < kernel, e.g. the ResNet stem's
3x3 / stride 2 / padding 1) one input cell can be the maximum of several
windows, so dx *accumulates* (``+=``) the routed gradients.

Average pooling::

    out = (1 / D) * sum_{i,j} xpad[..., SH*y + i, SW*x + j]
    dx[cell] += dout / D for every window containing the cell,

with ``D = KH*KW`` (padded zeros count: ``count_include_pad=True``, PyTorch's
default) or ``D`` = the number of the window's cells inside the image.

Global average pooling over H x W: ``out = mean(x, axis=(2, 3))``,
``dx = dout / (H*W)`` broadcast over the window.

Like convolution, the pools read window slices of the channels-first,
batch-last view (C, H, W, N) of their input and return NCHW views of CHWN
buffers (see :mod:`tinynet.nn.layout`).  Padding is never materialised:
:func:`tinynet.nn.conv.kernel_offsets` gives, for every window cell, the
output positions where that cell falls on a real pixel.  For max pooling the
other positions read ``-inf`` and can be skipped; for average pooling they
read 0 and add nothing.
"""
from __future__ import annotations

import numpy as np

from .. import backend, kernels
from .conv import conv_output_size, kernel_offsets, pair
from .layout import from_chwn, to_chwn
from .module import Module
from .validation import check_grad, check_input

__all__ = [
    "max_pool2d_forward", "max_pool2d_backward",
    "avg_pool2d_forward", "avg_pool2d_backward",
    "adaptive_avg_pool2d_forward", "adaptive_avg_pool2d_backward",
    "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d",
]


def _check_window(layer, x, kernel, padding):
    (kh, kw), (ph, pw) = kernel, padding
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"{layer._describe()}: padding {padding} must be at most half the kernel {kernel}")
    if x.shape[2] + 2 * ph < kh or x.shape[3] + 2 * pw < kw:
        raise ValueError(
            f"{layer._describe()}: input of spatial size {tuple(x.shape[2:])} is smaller than the "
            f"window {kernel} (padding {padding})"
        )


# ---------------------------------------------------------------------------
# Max pooling
# ---------------------------------------------------------------------------
def max_pool2d_forward(x, kernel, stride, padding):
    """Returns ``(out, cache)``; out (N, C, OH, OW).

    The cache holds ``argmax`` (C, OH, OW, N): the window index k = i*KW + j
    of each maximum, one byte per output (two beyond 256 window cells).
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    xp = backend.get_array_module(x)
    xc = to_chwn(x)  # (C, H, W, N)
    index_dtype = xp.uint8 if kh * kw <= 256 else xp.int16
    if kernels.enabled(x):
        out, argmax = kernels.max_pool_forward(xc, kernel, stride, padding, oh, ow, index_dtype)
        return from_chwn(out), (argmax, x.shape, kernel, stride, padding)
    out = xp.full((c, oh, ow, n), -xp.inf, dtype=x.dtype)  # the padding's value
    argmax = xp.zeros(out.shape, dtype=index_dtype)
    won = xp.empty(out.shape, dtype=index_dtype)
    for i, j, rows, cols, in_rows, in_cols in kernel_offsets(kernel, stride, padding, (h, w), (oh, ow)):
        cand, best, arg, k_if_won = xc[:, in_rows, in_cols], out[:, rows, cols], argmax[:, rows, cols], won[:, rows, cols]
        # k_if_won = k where this cell beats the maximum so far, else 0.  Strictly greater:
        # on a tie the earlier cell keeps the maximum (the documented rule).
        xp.greater(cand, best, out=k_if_won)
        k_if_won *= i * kw + j
        # The cell index k grows through the loop, so max(argmax, k_if_won) is k exactly where
        # this cell won and the old index elsewhere: a masked assignment without a mask (masked
        # stores with a random mask are ten times slower in NumPy).
        xp.maximum(arg, k_if_won, out=arg)
        xp.maximum(best, cand, out=best)
    return from_chwn(out), (argmax, x.shape, kernel, stride, padding)


def max_pool2d_backward(dout, cache):
    """Route each ``dout`` value to the input cell that was the maximum of its window."""
    argmax, x_shape, kernel, stride, padding = cache
    kw = kernel[1]
    n, c, h, w = x_shape
    oh, ow = argmax.shape[1:3]
    xp = backend.get_array_module(dout)
    doutc = to_chwn(dout)
    if kernels.enabled(dout):
        return from_chwn(kernels.max_pool_backward(doutc, argmax, (c, h, w, n), kernel, stride, padding))
    dx = xp.zeros((c, h, w, n), dtype=dout.dtype)
    for i, j, rows, cols, in_rows, in_cols in kernel_offsets(kernel, stride, padding, (h, w), (oh, ow)):
        routed = doutc[:, rows, cols] * (argmax[:, rows, cols] == i * kw + j)
        # += : with overlapping windows (stride < kernel) one cell can win several windows.
        dx[:, in_rows, in_cols] += routed
    return from_chwn(dx)


# ---------------------------------------------------------------------------
# Average pooling
# ---------------------------------------------------------------------------
def _avg_scale(kernel, stride, padding, in_size, out_size, count_include_pad, like):
    """``1 / D`` for every output position: a number, or an array (1, OH, OW, 1) without padded cells."""
    kh, kw = kernel
    if count_include_pad:
        return 1.0 / (kh * kw)
    counts = np.zeros(out_size)
    for _, _, rows, cols, _, _ in kernel_offsets(kernel, stride, padding, in_size, out_size):
        counts[rows, cols] += 1
    xp = backend.get_array_module(like)
    return xp.asarray((1.0 / counts)[None, :, :, None], dtype=like.dtype)


def avg_pool2d_forward(x, kernel, stride, padding, count_include_pad=True):
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    xp = backend.get_array_module(x)
    xc = to_chwn(x)
    out = xp.zeros((c, oh, ow, n), dtype=x.dtype)
    for _, _, rows, cols, in_rows, in_cols in kernel_offsets(kernel, stride, padding, (h, w), (oh, ow)):
        out[:, rows, cols] += xc[:, in_rows, in_cols]
    out *= _avg_scale(kernel, stride, padding, (h, w), (oh, ow), count_include_pad, out)
    return from_chwn(out), (x.shape, kernel, stride, padding, count_include_pad)


def avg_pool2d_backward(dout, cache):
    x_shape, kernel, stride, padding, count_include_pad = cache
    n, c, h, w = x_shape
    xp = backend.get_array_module(dout)
    oh, ow = dout.shape[2:]
    # each window cell receives 1/D of its window's dout
    share = to_chwn(dout) * _avg_scale(kernel, stride, padding, (h, w), (oh, ow), count_include_pad, dout)
    dx = xp.zeros((c, h, w, n), dtype=dout.dtype)
    for _, _, rows, cols, in_rows, in_cols in kernel_offsets(kernel, stride, padding, (h, w), (oh, ow)):
        dx[:, in_rows, in_cols] += share[:, rows, cols]
    return from_chwn(dx)


# ---------------------------------------------------------------------------
# Adaptive (global) average pooling
# ---------------------------------------------------------------------------
def _adaptive_bins(size, out_size):
    """PyTorch's bins: cell i covers [floor(i*size/out), ceil((i+1)*size/out))."""
    return [(i * size // out_size, -(-(i + 1) * size // out_size)) for i in range(out_size)]


def adaptive_avg_pool2d_forward(x, output_size):
    n, c, h, w = x.shape
    oh, ow = output_size
    xp = backend.get_array_module(x)
    if (oh, ow) == (1, 1):  # global average pooling
        return x.mean(axis=(2, 3), keepdims=True), (x.shape, output_size)
    out = xp.empty((n, c, oh, ow), dtype=x.dtype)
    for y, (r0, r1) in enumerate(_adaptive_bins(h, oh)):
        for z, (c0, c1) in enumerate(_adaptive_bins(w, ow)):
            out[:, :, y, z] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out, (x.shape, output_size)


def adaptive_avg_pool2d_backward(dout, cache):
    x_shape, (oh, ow) = cache
    n, c, h, w = x_shape
    xp = backend.get_array_module(dout)
    if (oh, ow) == (1, 1):
        # dx[n, c, :, :] = dout[n, c] / (H*W), written CHWN like the other layers' gradients.
        dx = xp.empty((c, h, w, n), dtype=dout.dtype)
        dx[...] = (dout[:, :, 0, 0].T * (1.0 / (h * w)))[:, None, None, :]
        return from_chwn(dx)
    dx = xp.zeros(x_shape, dtype=dout.dtype)
    for y, (r0, r1) in enumerate(_adaptive_bins(h, oh)):
        for z, (c0, c1) in enumerate(_adaptive_bins(w, ow)):
            area = (r1 - r0) * (c1 - c0)
            dx[:, :, r0:r1, c0:c1] += dout[:, :, y:y + 1, z:z + 1] * (1.0 / area)
    return dx


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------
class _Pool2d(Module):
    """A pooling layer around a pair of ``*_forward(x, kernel, stride, padding)`` / ``*_backward(dout, cache)`` functions."""

    _forward_fn = _backward_fn = None

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else pair(stride, "stride")
        self.padding = pair(padding, "padding")
        if min(self.kernel_size) <= 0 or min(self.stride) <= 0 or min(self.padding) < 0:
            raise ValueError(
                f"{type(self).__name__}: kernel_size and stride must be positive and padding non-negative, "
                f"got kernel_size={kernel_size}, stride={stride}, padding={padding}"
            )

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

    def forward(self, x):
        check_input(self, x, "(N, C, H, W)", 4)
        _check_window(self, x, self.kernel_size, self.padding)
        out, cache = type(self)._forward_fn(x, self.kernel_size, self.stride, self.padding, **self._options())
        self._save_for_backward(cache, out.shape, out.dtype)
        return out

    def backward(self, dout):
        cache, shape, dtype = self._saved_for_backward()
        check_grad(self, dout, shape, dtype)
        return type(self)._backward_fn(dout, cache)

    def _options(self) -> dict:
        return {}


class MaxPool2d(_Pool2d):
    """``MaxPool2d(kernel_size, stride=None, padding=0)``; stride defaults to the kernel size."""

    _forward_fn, _backward_fn = max_pool2d_forward, max_pool2d_backward


class AvgPool2d(_Pool2d):
    """``AvgPool2d(kernel_size, stride=None, padding=0, count_include_pad=True)``, as PyTorch's."""

    _forward_fn, _backward_fn = avg_pool2d_forward, avg_pool2d_backward

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad: bool = True):
        super().__init__(kernel_size, stride, padding)
        self.count_include_pad = bool(count_include_pad)

    def extra_repr(self):
        return super().extra_repr() + ("" if self.count_include_pad else ", count_include_pad=False")

    def _options(self) -> dict:
        return {"count_include_pad": self.count_include_pad}


class AdaptiveAvgPool2d(Module):
    """``AdaptiveAvgPool2d(output_size)``; ``AdaptiveAvgPool2d(1)`` is global average pooling."""

    def __init__(self, output_size=1):
        super().__init__()
        self.output_size = pair(output_size, "output_size")
        if min(self.output_size) <= 0:
            raise ValueError(f"AdaptiveAvgPool2d: output_size must be positive, got {output_size}")

    def extra_repr(self):
        return f"output_size={self.output_size}"

    def forward(self, x):
        check_input(self, x, "(N, C, H, W)", 4)
        out, cache = adaptive_avg_pool2d_forward(x, self.output_size)
        self._save_for_backward(cache, out.shape, out.dtype)
        return out

    def backward(self, dout):
        cache, shape, dtype = self._saved_for_backward()
        check_grad(self, dout, shape, dtype)
        return adaptive_avg_pool2d_backward(dout, cache)
